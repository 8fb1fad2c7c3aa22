"""Tests for the tensorflow_datasets builder over dim_jax clips (dim_jax/data/tfds_dataset.py).

Everything is built under pytest's tmp dirs (tfds data_dir, manual_dir): nothing in the home
directory, no network.
"""

from __future__ import annotations

import csv
import importlib.util
import pathlib
import pickle

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dim_jax.data import normalization
from dim_jax.data import records
from dim_jax.data import synthetic
from dim_jax.data import tfds_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]
SPLIT_SIZES = {"train": 6, "val": 3, "test": 2}


def _convert_official_cli():
  """Imports tools/convert_official.py (tools/ is not a package)."""
  spec = importlib.util.spec_from_file_location(
      "convert_official", REPO / "tools" / "convert_official.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _numpy_clip(clip) -> dict:
  """A clip of tf tensors (clip_dataset / tfds.as_numpy) as read_clips's types."""
  clip = {key: value.numpy() if isinstance(value, tf.Tensor) else value
          for key, value in clip.items()}
  return {
      **{field: clip[field] for field in records.STREAM_WIDTHS},
      **{field: clip[field].decode("utf-8") for field in records.ID_FIELDS},
      "fps": float(clip["fps"]),
      "length": int(clip["length"]),
  }


def _assert_same_clips(got: list[dict], want: list[dict]) -> None:
  """Same clips in the same order: ids and arrays exactly equal, float32."""
  assert [clip["clip_id"] for clip in got] == [clip["clip_id"] for clip in want]
  for have, expected in zip(got, want):
    assert set(have) == set(expected)
    for field in records.STREAM_WIDTHS:
      assert have[field].dtype == np.float32
      np.testing.assert_array_equal(have[field], expected[field])
    for key in (*records.ID_FIELDS, "fps", "length"):
      assert have[key] == expected[key], key


@pytest.fixture(scope="module", autouse=True)
def _quiet():
  tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def synthetic_build(tmp_path_factory):
  """A tiny synthetic records dataset and its tfds build (2 files per split)."""
  root = tmp_path_factory.mktemp("synthetic")
  records_dir = str(root / "records")
  synthetic.write_synthetic_dataset(
      records_dir, seed=3, num_train=SPLIT_SIZES["train"], num_val=SPLIT_SIZES["val"],
      num_test=SPLIT_SIZES["test"], num_shards=2, min_len=6, max_len=20)
  data_dir = str(root / "tfds")
  builder = tfds_dataset.prepare(records_dir, data_dir, "records", num_shards=2)
  return records_dir, data_dir, builder


def test_tfds_load_gives_the_records_clips(synthetic_build):
  records_dir, data_dir, builder = synthetic_build
  assert builder.data_dir.startswith(data_dir)
  assert set(builder.info.splits) == set(records.read_info(records_dir)["splits"])
  for split, size in SPLIT_SIZES.items():
    loaded = tfds.load(f"{tfds_dataset.NAME}/records", split=split, data_dir=data_dir,
                       download=False)
    got = [_numpy_clip(clip) for clip in tfds.as_numpy(loaded)]
    want = records.read_clips(records_dir, split)
    assert len(want) == size
    _assert_same_clips(got, want)  # same order too: the tfds dataset is ordered
  info = builder.info
  assert info.version == tfds_dataset.DimClips.VERSION
  assert str(info.version) in tfds_dataset.DimClips.RELEASE_NOTES
  assert "Dyadic Interaction Modeling" in info.citation and info.homepage
  assert info.features["speaker_audio"].shape == (None, records.AUDIO_DIM)


def test_clip_dataset_matches_decode_record(synthetic_build):
  records_dir, _, builder = synthetic_build
  for split in SPLIT_SIZES:
    shards = records.split_shards(records_dir, split)
    files = tf.data.Dataset.from_tensor_slices(
        (tf.constant([shard.path for shard in shards]),
         tf.constant([shard.num_clips for shard in shards], tf.int64)))
    decoded = files.flat_map(records.file_records).map(records.decode_record)
    ours = tfds_dataset.clip_dataset(builder.data_dir, split)  # opened from the directory
    # Key for key: dtype and (static) shape.
    assert ours.element_spec == decoded.element_spec
    assert set(ours.element_spec) == set(tfds_dataset.CLIP_KEYS)
    _assert_same_clips([_numpy_clip(clip) for clip in ours],
                       [_numpy_clip(clip) for clip in decoded])


@pytest.mark.parametrize("process_count", [2, 3])
def test_host_partition_covers_every_clip_once(synthetic_build, process_count):
  _, _, builder = synthetic_build
  for split in SPLIT_SIZES:
    all_ids = [clip["clip_id"].numpy() for clip in tfds_dataset.clip_dataset(builder, split)]
    hosts = []
    for host in range(process_count):
      partition = tfds_dataset.host_partition(builder, split, process_index=host,
                                              process_count=process_count)
      ids = [clip["clip_id"].numpy() for clip in tfds_dataset.clip_dataset(
          builder, split, process_index=host, process_count=process_count)]
      assert len(ids) == partition.num_clips
      hosts.append(ids)
    flat = [clip_id for ids in hosts for clip_id in ids]
    assert sorted(flat) == sorted(all_ids) and len(set(flat)) == len(flat) == SPLIT_SIZES[split]
  # Two files per split: whole files for up to 2 hosts (train: 3 + 3 clips), records for 3.
  by_file = tfds_dataset.host_partition(builder, "train", process_index=0,
                                        process_count=process_count).by_file
  assert by_file == (process_count <= 2)


def test_shuffled_files_keep_the_partition_and_checkpoint(synthetic_build):
  _, _, builder = synthetic_build
  host_ids = []
  for host in range(2):
    dataset = tfds_dataset.clip_dataset(builder, "train", process_index=host,
                                        process_count=2, shuffle_seed=7)
    epochs = [sorted(clip["clip_id"].numpy() for clip in dataset) for _ in range(2)]
    assert epochs[0] == epochs[1]  # every epoch is this host's whole part
    host_ids.append(epochs[0])
  assert not set(host_ids[0]) & set(host_ids[1])
  assert len(host_ids[0]) + len(host_ids[1]) == SPLIT_SIZES["train"]

  # The iterator checkpoints and restores its position (the pipeline saves it).
  iterator = iter(tfds_dataset.clip_dataset(builder, "train", shuffle_seed=7))
  next(iterator)
  checkpoint = tf.train.Checkpoint(iterator=iterator)
  path = checkpoint.save(str(pathlib.Path(builder.data_dir).parent.parent / "ckpt" / "it"))
  rest = [clip["clip_id"].numpy() for clip in iterator]
  checkpoint.restore(path)
  assert [clip["clip_id"].numpy() for clip in iterator] == rest and len(rest) == 5


def test_normalization_round_trips(synthetic_build):
  records_dir, _, builder = synthetic_build
  want = normalization.for_dataset(records_dir)
  assert tfds_dataset.read_normalization(builder) == want
  reopened = tfds_dataset.load_builder(builder.data_dir)  # metadata.json from disk
  assert tfds_dataset.read_normalization(reopened) == want
  # They are the train split's statistics (recomputed here in another order: not bitwise).
  recomputed = normalization.compute(records.read_clips(records_dir, "train"))
  for stream in normalization.STREAMS:
    np.testing.assert_allclose(want.mean(stream), recomputed.mean(stream), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(want.std(stream), recomputed.std(stream), rtol=1e-6)
  assert reopened.info.metadata[tfds_dataset.METADATA_SOURCE]["source"] == "records"


def test_errors_name_the_problem(synthetic_build):
  records_dir, data_dir, builder = synthetic_build
  with pytest.raises(ValueError, match="dim_jax records directory"):
    tfds_dataset.clip_dataset(records_dir, "train")
  with pytest.raises(ValueError, match="not a prepared tfds dataset"):
    tfds_dataset.load_builder(data_dir)
  with pytest.raises(records.RecordError, match=r"split 'nope' not found.*'train'"):
    tfds_dataset.clip_dataset(builder, "nope")
  with pytest.raises(ValueError, match="process_index"):
    tfds_dataset.host_partition(builder, "train", process_index=2, process_count=2)
  with pytest.raises(ValueError, match="source 'pickles'"):
    tfds_dataset.DimClipsConfig(name="bad", source="pickles")
  # The command line reports a bad source without a traceback.
  assert tfds_dataset.main(["--manual_dir", str(pathlib.Path(data_dir) / "absent"),
                            "--data_dir", data_dir]) == 1


# ---------------------------------------------------------------------------
# An official layout in manual_dir.


def _write_vico_layout(root: pathlib.Path, rng: np.random.Generator) -> None:
  """ViCo processed pickles + RLD_data.csv, as tests/test_official.py writes them."""
  root.mkdir(parents=True)

  def utterance(name, frames, listener_frames=None, audio_frames=None):
    data = {
        "video_speaker": rng.standard_normal((frames, 56)),  # float64, cast on conversion
        "video_listener": rng.standard_normal((listener_frames or frames, 56)),
        "audio": rng.standard_normal((audio_frames or frames, 768)).astype(np.float32),
    }
    with open(root / f"{name}.pkl", "wb") as handle:
      pickle.dump(data, handle, protocol=5)

  utterance("utt_a", 12)
  utterance("utt_b", 10, audio_frames=17)  # audio stretched onto the video
  utterance("utt_c", 8, listener_frames=9)  # trimmed to 8 frames
  utterance("utt_d", 7)
  utterance("utt_e", 9)
  utterance("utt_bad", 6, listener_frames=40)  # beyond max_length_diff
  with open(root / "RLD_data.csv", "w", newline="", encoding="utf-8") as handle:
    writer = csv.writer(handle)
    writer.writerow(["sentiment", "uid", "listener", "speaker", "listener_id", "speaker_id",
                     "mode"])
    for uid, split in (("utt_a", "train"), ("utt_b", "train"), ("utt_c", "train"),
                       ("utt_d", "test"), ("utt_bad", "test"), ("utt_e", "test")):
      writer.writerow(["pos", uid, f"{uid}_l.mp4", f"{uid}_s.mp4", f"L{uid[-1]}",
                       f"S{uid[-1]}", split])


def test_official_vico_layout_matches_convert_official(tmp_path):
  manual_dir = tmp_path / "manual"
  _write_vico_layout(manual_dir, np.random.default_rng(5))
  data_dir = str(tmp_path / "tfds")

  # The predefined config stops at the bad utterance, as the CLI does without --skip_bad,
  # and leaves no dataset behind.
  with pytest.raises(records.RecordError, match="utt_bad.pkl.*max_length_diff"):
    tfds_dataset.prepare(str(manual_dir), data_dir, "vico")
  vico_dir = tmp_path / "tfds" / tfds_dataset.NAME / "vico"
  assert not vico_dir.exists() or not any(vico_dir.iterdir())  # incomplete.* removed too

  config = tfds_dataset.DimClipsConfig(name="vico_skip_bad", source="vico",
                                       metadata="RLD_data.csv", skip_bad=True)
  builder = tfds_dataset.prepare(str(manual_dir), data_dir, config)

  records_dir = str(tmp_path / "records")
  cli = _convert_official_cli()
  for split in ("train", "test"):
    assert cli.main(["--format", "vico", "--src", str(manual_dir), "--out", records_dir,
                     "--metadata", str(manual_dir / "RLD_data.csv"), "--split", split,
                     "--skip_bad"]) == 0

  reopened = tfds_dataset.load_builder(builder.data_dir)  # a custom config: from its dir
  assert set(reopened.info.splits) == {"train", "test"}  # the CSV's split column
  for split in ("train", "test"):
    got = [_numpy_clip(clip) for clip in tfds_dataset.clip_dataset(reopened, split)]
    _assert_same_clips(got, records.read_clips(records_dir, split))
  train = {clip["clip_id"].numpy(): clip
           for clip in tfds_dataset.clip_dataset(reopened, "train")}
  assert train[b"utt_c"]["length"].numpy() == 8 and train[b"utt_b"]["speaker_id"] == b"Sb"

  assert tfds_dataset.read_normalization(reopened) == normalization.for_dataset(records_dir)
  metadata = reopened.info.metadata
  assert metadata[tfds_dataset.METADATA_SOURCE]["fps"] == 30.0
  conversion = metadata[tfds_dataset.METADATA_CONVERSION]
  assert set(conversion["notes"]["train"]) == {"utt_b", "utt_c"}
  assert [entry["source"] for entry in conversion["skipped"]["test"]] == [
      str(manual_dir / "utt_bad.pkl")]


def _pipeline_config(data_dir: str, source: str):
  from dim_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.shrink_to_tiny(config_lib.vq_config("listener"))
  config.data.dir = data_dir
  config.data.source = source
  config.data.synthetic = False
  config.data.max_len = 8
  config.data.bucket_boundaries = (4, 8)
  return config


def test_pipeline_reads_the_tfds_source_like_the_records(synthetic_build):
  """data.source=tfds: the phases' batches, clips and statistics equal the records'."""
  from dim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  records_dir, _, builder = synthetic_build
  by_source = {}
  for source, data_dir in (("records", records_dir), ("tfds", str(builder.data_dir))):
    config = _pipeline_config(data_dir, source)
    assert pipeline.ensure_data(config) == data_dir  # train and val checked
    stats = pipeline.normalization_for(config, data_dir)
    evaluation = list(pipeline.as_numpy(iter(pipeline.make_split_dataset(
        config, data_dir, "val", train=False, batch_size=2))))
    training = pipeline.make_split_dataset(config, data_dir, "train", train=True, batch_size=2)
    train_windows = []
    for batch in pipeline.as_numpy(iter(training.take(12))):
      train_windows += [(c, int(w)) for c, w in zip(batch["clip_id"], batch["window_index"])]
    by_source[source] = (stats, evaluation, train_windows,
                         pipeline.read_split_clips(config, data_dir, "test"))
  (stats, evaluation, train_windows, test_clips) = by_source["tfds"]
  assert all(normalization.same(stats, by_source["records"][0], stream)
             for stream in records.STREAM_WIDTHS)
  # Evaluation: one pass over the same windows, standardised identically (the records
  # interleave their files, tfds reads its files in turn: the order may differ).
  def windows(batches):
    out = {}
    for batch in batches:
      for row in np.flatnonzero(batch["example_mask"]):
        n = batch["length"][row]
        out[(batch["clip_id"][row], int(batch["window_index"][row]))] = {
            key: batch[key][row, :n] for key in ("speaker_motion", "listener_motion",
                                                 "speaker_audio")}
    return out
  got, want = windows(evaluation), windows(by_source["records"][1])
  assert sorted(got) == sorted(want) and len(want) > 0
  for key, arrays in want.items():
    for stream, values in arrays.items():
      np.testing.assert_array_equal(got[key][stream], values)
  # Training: shuffled windows of the train split only; every window of an epoch once.
  windows_per_epoch = sum(-(-clip["length"] // 8) for clip in
                          records.read_clips(records_dir, "train"))
  first_epoch = train_windows[:windows_per_epoch]
  assert len(set(first_epoch)) == windows_per_epoch
  assert all(clip.startswith(b"train") for clip, _ in train_windows)
  _assert_same_clips(test_clips, records.read_clips(records_dir, "test"))
  # A tfds dataset without a split the phase reads fails before the first step.
  config = _pipeline_config(str(builder.data_dir), "tfds")
  config.phase = "evaluate"
  config.evaluate = dict(split="missing", train_split="train")
  with pytest.raises(records.RecordError, match="missing"):
    pipeline.ensure_data(config)
