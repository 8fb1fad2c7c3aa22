"""Runs fail loudly, early and clearly: corrupt checkpoints, bad workdirs, full disks, bad
configs, ambiguous clip file names, and preemption notices that reach hosts at different steps.
"""

import contextlib
import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dim_jax import config_lib, errors, files, phases
from dim_jax.data import synthetic
from dim_jax.training import checkpointing, metric_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("data"))
  synthetic.write_synthetic_dataset(path, seed=0, num_train=24, num_val=8, num_test=8,
                                    num_shards=2, min_len=40, max_len=120)
  return path


def tiny_vq(data_dir, **train):
  config = config_lib.shrink_to_tiny(config_lib.vq_config("listener"))
  config.data.dir = data_dir
  config.data.bucket_boundaries = (128,)
  config.train.batch_size = 8
  config.train.eval_batch_size = 8
  config.train.log_every_steps = 1
  for key, value in train.items():
    config.train[key] = value
  return config


def _state(seed):
  rng = np.random.default_rng(seed)
  # Random floats: the stored chunks are barely compressible, like trained weights.
  return {"params": {"w": rng.normal(size=4096).astype(np.float32),
                     "b": rng.normal(size=(8, 3)).astype(np.float32)},
          "step": np.full((), seed, np.int32)}


def _abstract(state):
  return {"params": {k: np.zeros_like(v) for k, v in state["params"].items()},
          "step": np.zeros((), np.int32)}


def _data_files(step_dir):
  return [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
          for name in names if os.sep + "d" + os.sep in os.path.join(root, name)]


def _xor_middle(path, nbytes=4):
  data = bytearray(open(path, "rb").read())
  middle = len(data) // 2
  for k in range(nbytes):
    data[middle + k] ^= 0x5A
  with open(path, "wb") as f:
    f.write(bytes(data))


@contextlib.contextmanager
def _tmpfs(path, options):
  """A small tmpfs (root only): a real full disk or read-only file system."""
  os.makedirs(path, exist_ok=True)
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
  if result.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


# --- checkpoints ----------------------------------------------------------------------------

def test_checksums_do_not_depend_on_sharding_or_host_path():
  # The device checksum (jit, any sharding) and the NumPy one (host restore) must agree, and
  # equal a plain-Python sum of the 32-bit words (independent derivation).
  state = _state(3)
  device = checkpointing.state_checksums(state)
  host = checkpointing.host_checksums(state)
  assert device == host
  # The jitted reduction (used when shards span processes) gives the same numbers.
  jitted = jax.tree_util.tree_flatten_with_path(checkpointing._device_checksums(state))[0]
  assert {checkpointing.path_str(p): [int(v) for v in np.asarray(x)] for p, x in jitted} == host
  words = state["params"]["b"].reshape(-1).view(np.uint32).astype(np.uint64)
  plain = int(words.sum() % 2**32)
  weighted = int(sum(int(w) * (2 * i + 1) for i, w in enumerate(words)) % 2**32)
  assert device["params/b"] == [plain, weighted]
  # One flipped bit changes the checksum; two swapped words change the weighted sum.
  flipped = state["params"]["b"].copy().reshape(-1)
  flipped.view(np.uint32)[5] ^= 1 << 17
  assert checkpointing.host_checksums({"b": flipped})["b"] != device["params/b"]
  swapped = state["params"]["b"].copy().reshape(-1)
  swapped[[0, 1]] = swapped[[1, 0]]
  got = checkpointing.host_checksums({"b": swapped})["b"]
  assert got[0] == device["params/b"][0] and got[1] != device["params/b"][1]


def test_flipped_bytes_in_checkpoint_data_are_an_error_naming_the_step(tmp_path):
  state = _state(1)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  ckpt.save(7, state, meta={"phase": "test"})
  ckpt.close()
  _xor_middle(max(_data_files(str(tmp_path / "checkpoints" / "7")), key=os.path.getsize))
  # Without verification the corruption passes silently (what happened before checksums).
  raw = ocp.PyTreeCheckpointer().restore(str(tmp_path / "checkpoints" / "7" / "state"))
  assert not np.array_equal(raw["params"]["w"], state["params"]["w"])
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  with pytest.raises(checkpointing.CheckpointCorruptError, match=r"step 7 is corrupt.*params/w"):
    ckpt.restore_state(7, _abstract(state))
  ckpt.close()
  # Phase chaining (host restore of the params) verifies too.
  with pytest.raises(checkpointing.CheckpointCorruptError, match="step 7"):
    checkpointing.load_params(str(tmp_path))


def test_unreadable_checkpoints_are_one_clear_error(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  for step in (1, 2):
    ckpt.save(step, _state(step), meta={"phase": "test"})
  ckpt.close()
  # Garbled metadata JSON of step 2.
  with open(tmp_path / "checkpoints" / "2" / "meta" / "metadata", "w") as f:
    f.write('{"phase": "te')
  # Truncated data of step 1.
  for path in _data_files(str(tmp_path / "checkpoints" / "1")):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 3)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  with pytest.raises(checkpointing.CheckpointCorruptError, match="step 2: its metadata") as info:
    ckpt.read_meta(2)
  assert "checkpoint_fallback" in str(info.value) and "\n" not in str(info.value)
  with pytest.raises(checkpointing.CheckpointCorruptError, match="step 1") as info:
    ckpt.restore_state(1, _abstract(_state(1)))
  assert "\n" not in str(info.value)
  ckpt.close()


def test_resume_refuses_a_corrupt_checkpoint_unless_fallback_is_asked(data_dir, tmp_path):
  config = tiny_vq(data_dir, num_steps=2, eval_every_steps=2, checkpoint_every_steps=1)
  phases.run(config, str(tmp_path))
  first = {m["step"]: m["train/loss"] for m in metric_writer.read_metrics(tmp_path)
           if "train/loss" in m}
  _xor_middle(max(_data_files(str(tmp_path / "checkpoints" / "2")), key=os.path.getsize))
  config.train.num_steps = 3
  with pytest.raises(checkpointing.CheckpointCorruptError, match="step 2"):
    phases.run(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]  # nothing written
  config.train.checkpoint_fallback = True
  phases.run(config, str(tmp_path))
  # Resumed from step 1: step 2 is trained again on the same batch, then step 3.
  again = [m for m in metric_writer.read_metrics(tmp_path) if "train/loss" in m]
  assert [m["step"] for m in again] == [1, 2, 2, 3]
  assert again[2]["train/loss"] == pytest.approx(first[2], abs=1e-6)
  assert os.listdir(tmp_path / "checkpoints_corrupt") == ["2"]
  assert "3" in os.listdir(tmp_path / "checkpoints")


# --- workdirs and disks ---------------------------------------------------------------------

def test_workdir_that_is_a_file_is_one_line_from_the_command_line(data_dir, tmp_path):
  workdir = tmp_path / "work"
  workdir.write_text("not a directory")
  result = subprocess.run(
      [sys.executable, "-m", "dim_jax.main", "--config", "configs/vq_tiny.py",
       f"--workdir={workdir}", f"--config.data.dir={data_dir}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, CI="1", XLA_FLAGS="--xla_force_host_platform_device_count=1 " + os.environ.get("XLA_FLAGS", "")))
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("dim_jax: error:") and str(workdir) in last and "is a file" in last


def test_read_only_workdir_is_refused_before_training(data_dir, tmp_path):
  with _tmpfs(tmp_path / "ro", "size=1m,ro") as mount:
    with pytest.raises(files.OutputError, match="read-only"):
      phases.run(tiny_vq(data_dir, num_steps=1), str(mount / "run"))


def test_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path):
  with _tmpfs(tmp_path / "small", "size=64k") as mount:
    target = mount / "report.json"
    files.write_json_atomic(str(target), {"old": True})
    with pytest.raises(files.OutputError, match=r"report\.json: the disk is full"):
      files.write_json_atomic(str(target), {"x": list(range(100_000))})
    assert json.loads(target.read_text()) == {"old": True}  # the old file is intact
    assert os.listdir(mount) == ["report.json"]  # no temporary left behind
    ckpt = checkpointing.Checkpointer(str(mount / "run" / "checkpoints"), keep=2)
    big = {"w": np.random.default_rng(0).normal(size=65536).astype(np.float32)}
    with pytest.raises(files.OutputError, match="disk is full"):
      ckpt.save(1, big, meta={})
      ckpt.wait()


# --- configs ------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("num_steps", 0), ("num_steps", -5),
                                         ("eval_every_steps", 0),
                                         ("checkpoint_every_steps", 0)])
def test_unusable_training_counts_are_refused_before_anything_is_written(data_dir, tmp_path,
                                                                         field, value):
  config = tiny_vq(data_dir, **{field: value})
  with pytest.raises(errors.ConfigError, match=f"train.{field}={value}"):
    phases.run(config, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


def test_pretrain_with_no_pretrain_ablation_is_refused_by_the_config():
  with pytest.raises(errors.ConfigError, match="no_pretrain"):
    config_lib.dim_config("pretrain", "no_pretrain")
  config = config_lib.dim_config("finetune_listener", "no_pretrain")
  config.init.pretrain = "runs/pretrain"
  with pytest.raises(errors.ConfigError, match="no_pretrain"):
    config_lib.validate(config)


def test_unknown_config_field_names_the_closest_fields():
  config = config_lib.vq_config("listener")
  message = config_lib.unknown_field_message(config, "train.num_stepz")
  assert "train.num_stepz" in message and "train.num_steps" in message
  assert "'trian' is not in the config" in config_lib.unknown_field_message(config,
                                                                             "trian.num_steps")


def _fake_vq_workdir(path, role):
  ckpt = checkpointing.Checkpointer(os.path.join(path, "checkpoints"), keep=1)
  ckpt.save(1, {"w": np.zeros(2, np.float32)}, meta={"phase": "vq", "role": role, "model": {}})
  ckpt.close()
  return str(path)


def test_swapped_tokenizer_workdirs_are_refused(data_dir, tmp_path):
  config = config_lib.shrink_dim_to_tiny(config_lib.dim_config("pretrain"))
  config.data.dir = data_dir
  config.init.speaker_vq = _fake_vq_workdir(tmp_path / "vq_l", "listener")
  config.init.listener_vq = _fake_vq_workdir(tmp_path / "vq_s", "speaker")
  with pytest.raises(checkpointing.CheckpointMismatchError, match="swapped"):
    phases.run(config, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


# --- clip file names ----------------------------------------------------------------------

def test_clip_file_names_are_distinct_and_stable():
  digest = hashlib.sha256(b"s1/c1").hexdigest()[:8]  # derived here, not by the code
  assert files.clip_filename("s1/c1") == f"s1_c1~{digest}.npy"
  assert files.clip_filename("s1_c1") == "s1_c1.npy"
  # An id that looks hashed is hashed too, so no raw id can take another id's name.
  assert files.clip_filename(f"s1_c1~{digest}") != files.clip_filename("s1/c1")
  ids = ["s1/c1", "s1_c1", "s1 c1", "s1:c1", ".hidden", "_.hidden"]
  names = files.clip_filenames(ids)
  assert len(set(names.values())) == len(ids)
  with pytest.raises(ValueError, match="twice"):
    files.clip_filenames(["a", "a"])
