"""Data safety: the synthetic writer never writes over foreign files, every split a phase
reads is checked before its first step, and pickles cannot ask for more memory than the limit
(and the official-data converter reports bad inputs in one line)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pathlib
import pickle
import struct

import numpy as np
import pytest

from dim_jax import config_lib, phases
from dim_jax.data import pipeline, records, safe_pickle, synthetic
from dim_jax.training import checkpointing

REPO = pathlib.Path(__file__).resolve().parents[1]
TB = 10**12

# Tiny but valid synthetic splits: a few clips of a few frames.
SMALL = dict(seed=1, num_train=4, num_val=2, num_test=2, num_shards=2, min_len=4, max_len=8)


def tiny_vq(data_dir) -> config_lib.ml_collections.ConfigDict:
  config = config_lib.shrink_to_tiny(config_lib.vq_config("listener"))  # data.synthetic=True
  config.data.dir = str(data_dir)
  config.train.num_steps = 1
  return config


def _snapshot(directory: pathlib.Path) -> dict[str, bytes]:
  return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


# --- the synthetic writer -------------------------------------------------------------------

def test_shards_without_info_file_are_not_overwritten_by_synthetic_data(tmp_path):
  # A real dataset whose dataset_info.json went missing (a crashed or half-copied write).
  data_dir = tmp_path / "records"
  synthetic.write_synthetic_dataset(str(data_dir), **SMALL)
  (data_dir / records.INFO_FILENAME).unlink()
  before = _snapshot(data_dir)
  with pytest.raises(records.RecordError) as info:
    phases.run(tiny_vq(data_dir), str(tmp_path / "work"))
  message = str(info.value)
  assert message.startswith(f"{data_dir}: holds 6 entries (test-00000-of-00002.tfrecord, ")
  assert "and 2 more) and no dataset_info.json (records of an incomplete dataset?)" in message
  assert "\n" not in message
  assert _snapshot(data_dir) == before  # nothing written, nothing removed
  assert not (tmp_path / "work").exists()


def test_synthetic_writer_refuses_any_foreign_file_and_reuses_its_own_dataset(tmp_path):
  # A directory holding one unrelated file.
  foreign = tmp_path / "notes"
  foreign.mkdir()
  (foreign / "README.txt").write_text("mine")
  with pytest.raises(records.RecordError,
                     match=r"notes: holds 1 entry \(README\.txt\) and no dataset_info.json;"):
    synthetic.write_synthetic_dataset(str(foreign), **SMALL)
  assert os.listdir(foreign) == ["README.txt"]
  with pytest.raises(records.RecordError, match="not a directory"):
    synthetic.write_synthetic_dataset(str(foreign / "README.txt"), **SMALL)

  # An empty directory is written, marked as the writer's own.
  data_dir = tmp_path / "empty"
  data_dir.mkdir()
  info = synthetic.write_synthetic_dataset(str(data_dir), **SMALL)
  marker = json.loads((data_dir / records.INFO_FILENAME).read_text())[synthetic.INFO_MARKER]
  assert marker["arguments"] == dict(SMALL, fps=30.0) and info[synthetic.INFO_MARKER] == marker
  written = _snapshot(data_dir)
  mtimes = {path.name: path.stat().st_mtime_ns for path in data_dir.iterdir()}
  # Asked again: reused as it is.
  assert synthetic.write_synthetic_dataset(str(data_dir), **SMALL) == info
  assert {path.name: path.stat().st_mtime_ns for path in data_dir.iterdir()} == mtimes
  # Other arguments, or a file the writer did not write next to its dataset: refused.
  with pytest.raises(records.RecordError, match=r"written with seed=1 \(not 2\); choose"):
    synthetic.write_synthetic_dataset(str(data_dir), **dict(SMALL, seed=2))
  # Written under an older law (a marker without a version): refused, nothing rewritten.
  assert marker["law_version"] == synthetic.LAW_VERSION
  info_path = data_dir / records.INFO_FILENAME
  current_info = info_path.read_text()
  old_info = json.loads(current_info)
  del old_info[synthetic.INFO_MARKER]["law_version"]
  info_path.write_text(json.dumps(old_info))
  with pytest.raises(records.RecordError, match=r"older generator \(law version 1, now 2"):
    synthetic.write_synthetic_dataset(str(data_dir), **SMALL)
  info_path.write_text(current_info)
  (data_dir / "extra.npy").write_bytes(b"x")
  with pytest.raises(records.RecordError,
                     match=r"holds 8 entries, 1 of them not listed by its synthetic "
                           r"dataset_info.json \(extra\.npy\)"):
    synthetic.write_synthetic_dataset(str(data_dir), **SMALL)
  del written["dataset_info.json"]
  assert {k: v for k, v in _snapshot(data_dir).items() if k in written} == written


# --- every split a phase reads, before its first step -----------------------------------------

@pytest.fixture()
def small_dataset(tmp_path) -> pathlib.Path:
  data_dir = tmp_path / "data"
  synthetic.write_synthetic_dataset(str(data_dir), **SMALL)
  return data_dir


def _edit_info(data_dir: pathlib.Path, edit) -> None:
  path = data_dir / records.INFO_FILENAME
  info = json.loads(path.read_text())
  edit(info)
  path.write_text(json.dumps(info))


def _empty_split(data_dir: pathlib.Path, split: str) -> None:
  """Makes ``split`` a listed split without clips: empty shard files, counts 0."""
  for shard in records.split_shards(str(data_dir), split):
    open(shard.path, "wb").close()

  def edit(info):
    for shard in info["splits"][split]["shards"]:
      shard["num_clips"] = shard["num_bytes"] = 0
    info["splits"][split]["num_clips"] = 0

  _edit_info(data_dir, edit)


def test_empty_validation_split_fails_before_the_first_step(small_dataset, tmp_path):
  _empty_split(small_dataset, "val")
  workdir = tmp_path / "work"
  with pytest.raises(records.RecordError) as info:
    phases.run(tiny_vq(small_dataset), str(workdir))
  assert str(info.value) == (
      f"{small_dataset}: split 'val' has no clips (2 shard file(s) listed in "
      f"{small_dataset / records.INFO_FILENAME}, all with 0 clips); phase vq reads it for "
      "validation")
  assert not workdir.exists()


def test_missing_or_emptied_shards_fail_before_the_first_step(small_dataset, tmp_path):
  val = records.split_shards(str(small_dataset), "val")
  os.remove(val[1].path)
  with pytest.raises(records.RecordError,
                     match=rf"^{val[1].path}: missing shard file of split 'val' .*; phase vq "
                           "reads it for validation$"):
    phases.run(tiny_vq(small_dataset), str(tmp_path / "work"))
  # A shard emptied with its size in the info file, but not its clip count.
  records.write_split(str(small_dataset), "val", synthetic.generate_clips(2, 1, 4, 8),
                      num_shards=1)
  shard = records.split_shards(str(small_dataset), "val")[0]
  open(shard.path, "wb").close()
  _edit_info(small_dataset, lambda info: info["splits"]["val"]["shards"][0].update(num_bytes=0))
  with pytest.raises(records.RecordError, match=r"0 bytes cannot hold the 2 clip\(s\) .*'val'"):
    phases.run(tiny_vq(small_dataset), str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


def test_evaluate_checks_its_test_and_training_splits_first(small_dataset):
  config = config_lib.evaluate_config()
  config.data.dir = str(small_dataset)
  assert pipeline.phase_splits(config) == {"test": "evaluation", "train": "the baselines"}
  _empty_split(small_dataset, "train")
  with pytest.raises(records.RecordError,
                     match="split 'train' has no clips .*phase evaluate reads it for the "
                           "baselines"):
    pipeline.ensure_data(config)
  _edit_info(small_dataset, lambda info: info["splits"].pop("test"))
  with pytest.raises(records.RecordError, match=r"split 'test' not found; the dataset has "
                                                r"\['train', 'val'\]; phase evaluate reads "
                                                "it for evaluation$"):
    pipeline.ensure_data(config)


def test_iterator_state_of_another_pipeline_is_replayed_not_a_crash(small_dataset, tmp_path,
                                                                   caplog):
  # E.g. a run checkpointed by an older dim_jax, whose pipeline tf.data cannot restore into
  # this one (here: the iterator of another dataset altogether).
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  other = iter(tf.data.Dataset.range(10).repeat())
  next(other)
  saving = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=1)
  saving.save(1, {"w": np.zeros(2, np.float32)}, meta={}, iterator=other)
  saving.close()
  restoring = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=1)
  dataset = pipeline.make_dataset(str(small_dataset), "train", batch_size=2, train=True,
                                  seed=0, bucket_boundaries=[8], max_len=8)
  with caplog.at_level(logging.WARNING):
    assert not restoring.restore_iterator(1, iter(dataset))
  assert "does not fit this input pipeline" in caplog.text
  restoring.close()


# --- pickles that ask for more memory than the limit --------------------------------------------

class _ArrayState:
  """Pickles as numpy does (`_reconstruct` + BUILD), with a state of our choosing."""

  def __init__(self, state):
    self.state = state

  def __reduce__(self):
    from numpy._core import multiarray  # pylint: disable=g-import-not-at-top
    return (multiarray._reconstruct, (np.ndarray, (0,), b"b"), self.state)


class _Call:
  """Pickles as the call `function(*args)`."""

  def __init__(self, function, *args):
    self.function, self.args = function, args

  def __reduce__(self):
    return (self.function, self.args)


def _dump(path: pathlib.Path, obj, protocol: int = 2) -> pathlib.Path:
  path.write_bytes(pickle.dumps(obj, protocol=protocol))
  return path


CRAFTED = {
    # An 8 TB float64 array declared by its state (numpy would allocate it first).
    "array state": lambda: pickle.dumps(
        _ArrayState((1, (TB,), np.dtype("f8"), False, b"")), protocol=2),
    "reconstruct shape": lambda: pickle.dumps(_Call(
        __import__("numpy._core.multiarray", fromlist=["x"])._reconstruct, np.ndarray,
        (TB,), b"b"), protocol=2),
    "ndarray call": lambda: pickle.dumps(_Call(np.ndarray, (TB,), "u1"), protocol=2),
    "bytearray(1 TB)": lambda: pickle.dumps(_Call(bytearray, TB), protocol=2),
    "bytes(1 TB)": lambda: pickle.dumps(_Call(bytes, TB), protocol=4),
    # Protocol 5's BYTEARRAY8 declaring 1 TB in a 20-byte file.
    "bytearray8": lambda: b"\x80\x05\x96" + struct.pack("<Q", TB) + b"abc.",
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_pickles_declaring_a_terabyte_are_refused_before_allocating(tmp_path, case):
  path = tmp_path / "huge.pkl"
  path.write_bytes(CRAFTED[case]())
  with pytest.raises(safe_pickle.PickleTooLargeError) as info:
    safe_pickle.load_pickle(path)  # the default limit: half the memory available
  message = str(info.value)
  assert message.startswith(f"{path}: unpickling would allocate more than ")
  assert "TB)" in message and "half the memory available" in message and "\n" not in message
  assert isinstance(info.value, records.RecordError)


def test_lengths_past_the_end_of_the_file_and_short_object_arrays(tmp_path):
  # BINBYTES8 declaring 1 TB: truncated or crafted, found before reading.
  path = tmp_path / "bytes8.pkl"
  path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", TB) + b"abc.")
  with pytest.raises(records.RecordError,
                     match=r"bytes8\.pkl: not a readable pickle .*declares 1000000000000 "
                           r"bytes, but only 4 remain"):
    safe_pickle.load_pickle(path)
  # An object array state with fewer values than its shape (numpy read past the list: a
  # segmentation fault).
  _dump(path, _ArrayState((1, (10**6,), np.dtype("O"), False, [1, 2])))
  with pytest.raises(records.RecordError, match="object array of 1000000 elements with 2"):
    safe_pickle.load_pickle(path)


def test_the_limit_is_configurable_and_counts_small_objects_too(tmp_path):
  array = np.arange(1 << 20, dtype=np.float64)  # 8 MB
  path = _dump(tmp_path / "a.pkl", {"audio": array}, protocol=4)
  np.testing.assert_array_equal(safe_pickle.load_pickle(path, max_bytes=64 << 20)["audio"],
                                array)
  with pytest.raises(safe_pickle.PickleTooLargeError, match=r"4\.2 MB \(the configured limit\)"):
    safe_pickle.load_pickle(path, max_bytes=4_200_000)
  # Two-byte instructions that each make a dict: the memory is in the count, not the file.
  flood = tmp_path / "flood.pkl"
  flood.write_bytes(b"\x80\x02]" + b"}a" * 200_000 + b".")
  assert len(safe_pickle.load_pickle(flood)) == 200_000
  with pytest.raises(safe_pickle.PickleTooLargeError, match="one more pickle instruction"):
    safe_pickle.load_pickle(flood, max_bytes=10 << 20)


# --- tools/convert_official.py: one line naming the file -----------------------------------------

def _cli():
  spec = importlib.util.spec_from_file_location(
      "convert_official", REPO / "tools" / "convert_official.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("case", ["src missing", "src is a file", "metadata missing",
                                  "metadata is a directory", "metadata not UTF-8",
                                  "list missing", "list is a directory", "list not UTF-8",
                                  "huge pickle"])
def test_converter_reports_bad_inputs_in_one_line(tmp_path, caplog, case):
  src = tmp_path / "src"
  src.mkdir()
  (tmp_path / "a_dir").mkdir()
  latin1 = tmp_path / "latin1.txt"
  latin1.write_bytes("clip,caf\u00e9\n".encode("latin-1"))
  flags, named = {
      "src missing": (["--src", str(tmp_path / "nowhere")], tmp_path / "nowhere"),
      "src is a file": (["--src", str(latin1)], latin1),
      "metadata missing": (["--metadata", str(tmp_path / "m.csv")], tmp_path / "m.csv"),
      "metadata is a directory": (["--metadata", str(tmp_path / "a_dir")], tmp_path / "a_dir"),
      "metadata not UTF-8": (["--metadata", str(latin1)], latin1),
      "list missing": (["--list", str(tmp_path / "ids.txt")], tmp_path / "ids.txt"),
      "list is a directory": (["--list", str(tmp_path / "a_dir")], tmp_path / "a_dir"),
      "list not UTF-8": (["--list", str(latin1)], latin1),
      "huge pickle": ([], src / "clip.pkl"),
  }[case]
  if case == "huge pickle":
    (src / "clip.pkl").write_bytes(CRAFTED["array state"]())
  argv = ["--format", "vico", "--src", str(src), "--out", str(tmp_path / "out"), *flags]
  with caplog.at_level(logging.ERROR):
    assert _cli().main(argv) == 1
  errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
  assert len(errors) == 1 and "\n" not in errors[0], errors
  assert errors[0].startswith(f"{named}: "), errors
