"""Tests of the data layer: synthetic generator, TFRecord schema and tf.data pipeline."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf

from dim_jax.data import pipeline
from dim_jax.data import records
from dim_jax.data import synthetic
from dim_jax.data.records import RecordError

REPO = pathlib.Path(__file__).resolve().parents[1]
EXP = synthetic.expression_column


# --------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------


def _clip(length: int = 6, clip_id: str = "c0", seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
      "speaker_motion": rng.standard_normal((length, 56)).astype(np.float32),
      "listener_motion": rng.standard_normal((length, 56)).astype(np.float32),
      "speaker_audio": rng.standard_normal((length, 768)).astype(np.float32),
      "clip_id": clip_id, "speaker_id": "spk", "listener_id": "lis", "session_id": "ses",
      "fps": 30.0,
  }


def _raw_example(clip: dict, length: int | None = None) -> bytes:
  """Serializes a clip WITHOUT validation, as a foreign writer might."""
  def as_bytes(array):
    return tf.train.Feature(bytes_list=tf.train.BytesList(
        value=[np.asarray(array, "<f4").tobytes()]))
  features = {
      "schema_version": tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
      "length": tf.train.Feature(int64_list=tf.train.Int64List(
          value=[len(clip["speaker_motion"]) if length is None else length])),
      "fps": tf.train.Feature(float_list=tf.train.FloatList(value=[clip["fps"]])),
  }
  for field in records.ID_FIELDS:
    features[field] = tf.train.Feature(bytes_list=tf.train.BytesList(
        value=[clip[field].encode()]))
  for field in records.STREAM_WIDTHS:
    features[field] = as_bytes(clip[field])
  return tf.train.Example(
      features=tf.train.Features(feature=features)).SerializeToString()


def _write_foreign_split(data_dir: pathlib.Path, payloads: list[bytes],
                         split: str = "train") -> str:
  """Writes records with a plain TFRecordWriter plus a matching info file."""
  data_dir.mkdir(parents=True, exist_ok=True)
  name = records.shard_filename(split, 0, 1)
  path = data_dir / name
  with tf.io.TFRecordWriter(str(path)) as writer:
    for payload in payloads:
      writer.write(payload)
  info = {"schema_version": 1, "dims": {"motion": 56, "pose": 6, "expression": 50,
                                        "audio": 768},
          "splits": {split: {"num_clips": len(payloads), "num_frames": 0, "fps": [30.0],
                             "shards": [{"file": name, "num_clips": len(payloads),
                                         "num_frames": 0,
                                         "num_bytes": path.stat().st_size}]}}}
  (data_dir / records.INFO_FILENAME).write_text(json.dumps(info))
  return str(path)


def _update_info_size(data_dir: pathlib.Path, shard_path: pathlib.Path) -> None:
  info = json.loads((data_dir / records.INFO_FILENAME).read_text())
  for entry in info["splits"].values():
    for shard in entry["shards"]:
      if shard["file"] == shard_path.name:
        shard["num_bytes"] = shard_path.stat().st_size
  (data_dir / records.INFO_FILENAME).write_text(json.dumps(info))


def _eval_batches(data_dir, split, **overrides) -> list[dict]:
  kwargs = dict(batch_size=3, train=False, seed=0, bucket_boundaries=[8, 16, 24],
                max_len=24)
  kwargs.update(overrides)
  return list(pipeline.as_numpy(iter(pipeline.make_dataset(str(data_dir), split,
                                                           **kwargs))))


def _pipeline_error(data_dir, split="train") -> str:
  with pytest.raises(RecordError) as caught:
    _eval_batches(data_dir, split)
  return str(caught.value)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> pathlib.Path:
  """train: 14 clips in 3 shards; val: 5 clips in 1 shard; lengths 10..50 frames."""
  data_dir = tmp_path_factory.mktemp("synthetic")
  synthetic.write_synthetic_dataset(str(data_dir), seed=3, num_train=14, num_val=0,
                                    num_test=0, num_shards=3, min_len=10, max_len=50)
  # val in a single shard so two processes must shard records rather than files.
  records.write_split(str(data_dir), "val",
                      synthetic.generate_clips(5, seed=3, min_len=10, max_len=50,
                                               id_prefix="val"), num_shards=1)
  return data_dir


# --------------------------------------------------------------------------------------
# Synthetic data.
# --------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_per_seed():
  first = synthetic.generate_clips(3, seed=7, min_len=20, max_len=40)
  again = synthetic.generate_clips(3, seed=7, min_len=20, max_len=40)
  other = synthetic.generate_clips(3, seed=8, min_len=20, max_len=40)
  for a, b in zip(first, again):
    for key in records.STREAM_WIDTHS:
      assert a[key].tobytes() == b[key].tobytes()
    assert {k: a[k] for k in records.ID_FIELDS} == {k: b[k] for k in records.ID_FIELDS}
  assert any(a["speaker_motion"].shape != b["speaker_motion"].shape
             or not np.array_equal(a["speaker_motion"], b["speaker_motion"])
             for a, b in zip(first, other))
  # A clip does not depend on how many clips are generated after it.
  single = synthetic.generate_clips(1, seed=7, min_len=20, max_len=40)[0]
  assert single["listener_motion"].tobytes() == first[0]["listener_motion"].tobytes()


def test_listener_redraws_keep_the_speaker_and_the_reactions_and_redraw_the_rest():
  arguments = dict(seed=7, min_len=20, max_len=40, fps=30.0)
  clips = synthetic.generate_clips(3, seed=7, min_len=20, max_len=40, id_prefix="test")
  redraws = synthetic.listener_redraws(clips, arguments, draws=2)
  assert redraws.shape == (2, 3, max(len(c["listener_motion"]) for c in clips), 56)
  column = synthetic.expression_column
  for n, clip in enumerate(clips):
    stored, length = clip["listener_motion"], len(clip["listener_motion"])
    assert not redraws[:, n, length:].any()
    for draw in redraws[:, n, :length]:
      # Mirroring and smile follow the (same) speaker: only the listener noise differs
      # (std 0.05 per draw, so about 0.07 between two draws).
      reactions = slice(column(0), column(synthetic.SMILE_DIM) + 1)
      assert np.std(draw[:, reactions] - stored[:, reactions]) < 0.1
      # The listener's own expression sinusoids are drawn afresh.
      own = slice(column(4), column(6))
      assert np.std(draw[:, own] - stored[:, own]) > 0.1
    assert not np.array_equal(redraws[0, n], redraws[1, n])
  with pytest.raises(ValueError, match="stored speaker"):
    synthetic.listener_redraws(clips, dict(arguments, seed=8), draws=1)
  with pytest.raises(ValueError, match="<split>-<index>"):
    synthetic.listener_redraws([dict(clips[0], clip_id="clip")], arguments, draws=1)


def test_listener_posture_is_shown_by_the_first_frame_and_kept_by_redraws():
  # The head posture is a per-clip constant (sd 0.03 rad) under a small sway (<= 0.03 rad):
  # across clips, a clip's mean head rotation follows its first frame, and other listeners
  # drawn for the same clip keep it (before the posture the redraws' means were unrelated).
  arguments = dict(seed=5, min_len=60, max_len=60, fps=30.0)
  clips = synthetic.generate_clips(64, seed=5, min_len=60, max_len=60, id_prefix="test")
  stored = np.stack([clip["listener_motion"] for clip in clips])
  redrawn = synthetic.listener_redraws(clips, arguments, draws=1)[0]
  axes = slice(1, 3)  # yaw and roll: no nods
  clip_means = stored[:, :, axes].mean(1)
  for other, name in ((stored[:, 0, axes], "first frame"),
                      (redrawn[:, :, axes].mean(1), "redraws' means")):
    for axis in range(2):
      correlation = np.corrcoef(clip_means[:, axis], other[:, axis])[0, 1]
      assert correlation > 0.8, (name, axis, correlation)
  # Yet the sway is the listener's own: redraws move differently inside the clip.
  inside = lambda x: x[:, :, axes] - x[:, :, axes].mean(1, keepdims=True)
  assert np.std(inside(redrawn) - inside(stored)) > 0.003


def test_synthetic_shapes_and_ranges():
  clips = synthetic.generate_clips(12, seed=0, min_len=48, max_len=160)
  lengths = [clip["speaker_motion"].shape[0] for clip in clips]
  assert min(lengths) >= 48 and max(lengths) <= 160 and len(set(lengths)) > 1
  for clip in clips:
    records.validate_clip(clip, "synthetic")
    for key, width in records.STREAM_WIDTHS.items():
      assert clip[key].dtype == np.float32 and clip[key].shape[1] == width
    for key in ("speaker_motion", "listener_motion"):
      assert np.abs(clip[key][:, :6]).max() < 0.5  # pose angles in radians
      assert np.abs(clip[key][:, 6:]).max() < 5.0  # expression about unit scale
  assert len({clip["clip_id"] for clip in clips}) == 12


@pytest.fixture(scope="module")
def long_clips():
  return synthetic.generate_clips(16, seed=11, min_len=300, max_len=300,
                                  return_latents=True)


def _correlation(a, b):
  return float(np.corrcoef(a, b)[0, 1])


def test_listener_mirrors_speaker_expression_with_documented_lag(long_clips):
  lag = synthetic.mirror_lag_frames(30.0)
  assert lag == 8

  def pooled_corr(shift):
    speaker = np.concatenate([c["speaker_motion"][: 300 - 20, EXP(0)] for c in long_clips])
    listener = np.concatenate([c["listener_motion"][shift: 300 - 20 + shift, EXP(0)]
                               for c in long_clips])
    return _correlation(speaker, listener)

  by_lag = [pooled_corr(shift) for shift in range(0, 20)]
  assert int(np.argmax(by_lag)) == lag
  assert by_lag[lag] > 0.9
  # Copying the speaker's current frame (mirror) explains clearly less.
  assert by_lag[lag] - by_lag[0] > 0.3
  # Only the first MIRROR_DIMS components are mirrored.
  unrelated = _correlation(
      np.concatenate([c["speaker_motion"][:280, EXP(5)] for c in long_clips]),
      np.concatenate([c["listener_motion"][lag:280 + lag, EXP(5)] for c in long_clips]))
  assert abs(unrelated) < 0.2


def test_listener_nods_after_speaker_pauses(long_clips):
  delay = synthetic.nod_delay_frames(30.0)
  rises, elsewhere = [], []
  for clip in long_clips:
    speaking = clip["latents"]["speaking"]
    pitch = clip["listener_motion"][:, synthetic.PITCH]
    onsets = np.flatnonzero(speaking[:-1] & ~speaking[1:]) + 1
    for onset in onsets:
      start = onset + delay
      if start + 3 < len(pitch):
        rises.append(pitch[start + 3] - pitch[start])
    # Control: the same difference 3 frames after arbitrary frames while speaking.
    speaking_frames = np.flatnonzero(speaking[:-40] & speaking[30:-10])
    elsewhere.extend(pitch[speaking_frames + 3] - pitch[speaking_frames])
  assert len(rises) > 20
  assert np.mean(rises) > 0.05  # the nod's first peak is ~0.1 rad, 3 frames in
  assert abs(np.mean(elsewhere)) < 0.01


def test_listener_smiles_when_speaker_talks_long_and_audio_carries_speech(long_clips):
  smile, talk_share, audio, activity = [], [], [], []
  for clip in long_clips:
    speaking = clip["latents"]["speaking"].astype(np.float64)
    # Leaky integral of speaking with the documented 2 s time constant (no warm-up here,
    # so skip the first 120 frames where the missing history still matters).
    decay = np.exp(-1.0 / (synthetic.SMILE_SECONDS * 30.0))
    kernel = (1.0 - decay) * decay ** np.arange(300)
    share = np.convolve(speaking, kernel, mode="full")[:300]
    smile.append(clip["listener_motion"][120:, EXP(synthetic.SMILE_DIM)])
    talk_share.append(share[120:])
    audio.append(clip["speaker_audio"][:, :32])  # a few dims suffice; keeps lstsq fast
    activity.append(clip["latents"]["speech_activity"])
  assert _correlation(np.concatenate(smile), np.concatenate(talk_share)) > 0.9
  # Speech activity is linearly decodable from the audio features.
  features = np.concatenate(audio)
  target = np.concatenate(activity)
  design = np.concatenate([features, np.ones((len(features), 1))], axis=1)
  weights, *_ = np.linalg.lstsq(design, target, rcond=None)
  residual = target - design @ weights
  assert 1.0 - residual.var() / target.var() > 0.95


# --------------------------------------------------------------------------------------
# Records: writer, reader, info file.
# --------------------------------------------------------------------------------------


def test_write_read_round_trip_is_exact(tmp_path):
  # Glob characters in the directory must not confuse the in-graph file existence check.
  tmp_path = tmp_path / "odd [dir]*?"
  clips = synthetic.generate_clips(5, seed=1, min_len=5, max_len=30)
  clips[2]["fps"] = 25.0
  entry = records.write_split(str(tmp_path), "train", clips, num_shards=2)
  read = {clip["clip_id"]: clip for clip in records.read_clips(str(tmp_path), "train")}
  assert sorted(read) == sorted(clip["clip_id"] for clip in clips)
  for clip in clips:
    got = read[clip["clip_id"]]
    for field in records.STREAM_WIDTHS:
      assert got[field].dtype == np.float32
      assert got[field].tobytes() == clip[field].tobytes()
    for field in records.ID_FIELDS:
      assert got[field] == clip[field]
    assert got["fps"] == clip["fps"]
    assert got["length"] == len(clip["speaker_motion"])

  # parse_example (the graph function) decodes a stored record the same way.
  first_file = records.split_files(str(tmp_path), "train")[0]
  serialized = next(iter(tf.data.TFRecordDataset(first_file)))
  # Map entries are serialized in sorted key order, so shards are reproducible bit for bit
  # across processes (the default order follows a per-process hash seed).
  keys = sorted(records.REQUIRED_CLIP_KEYS + ("length", "schema_version"))
  offsets = [serialized.numpy().find(b"\n" + bytes([len(key)]) + key.encode())
             for key in keys]
  assert -1 not in offsets and offsets == sorted(offsets)
  parsed = records.parse_example(serialized, first_file, 0)
  assert parsed["clip_id"].numpy().decode() == clips[0]["clip_id"]
  assert parsed["length"].dtype == tf.int32
  assert parsed["speaker_audio"].numpy().tobytes() == clips[0]["speaker_audio"].tobytes()

  info = records.read_info(str(tmp_path))
  assert info == json.loads((tmp_path / "dataset_info.json").read_text())
  assert info["schema_version"] == records.SCHEMA_VERSION
  split = info["splits"]["train"]
  assert split == entry
  assert split["num_clips"] == 5
  assert split["num_frames"] == sum(len(clip["speaker_motion"]) for clip in clips)
  assert split["fps"] == [25.0, 30.0]
  assert info["fps"] is None
  assert [shard["file"] for shard in split["shards"]] == [
      "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
  assert [shard["num_clips"] for shard in split["shards"]] == [3, 2]  # round robin
  for shard in split["shards"]:
    assert (tmp_path / shard["file"]).stat().st_size == shard["num_bytes"]
  assert records.split_files(str(tmp_path), "train") == [
      str(tmp_path / shard["file"]) for shard in split["shards"]]
  # Writing another split keeps the first one.
  records.write_split(str(tmp_path), "val", clips[:1])
  assert sorted(records.read_info(str(tmp_path))["splits"]) == ["train", "val"]
  assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_make_synthetic_data_tool(tmp_path):
  spec = importlib.util.spec_from_file_location("make_synthetic_data",
                                                REPO / "tools" / "make_synthetic_data.py")
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  assert tool.main(["--out", str(tmp_path), "--seed", "5", "--num_train", "3",
                    "--num_val", "2", "--num_test", "1", "--min_len", "4",
                    "--max_len", "9"]) == 0
  info = records.read_info(str(tmp_path))
  assert {split: entry["num_clips"] for split, entry in info["splits"].items()} == {
      "train": 3, "val": 2, "test": 1}
  expected = synthetic.generate_clips(2, seed=5, min_len=4, max_len=9, id_prefix="val")
  got = records.read_clips(str(tmp_path), "val")
  assert [c["listener_motion"].tobytes() for c in got] == [
      c["listener_motion"].tobytes() for c in expected]


def _bad(change):
  def make():
    clip = _clip(clip_id="bad-clip")
    change(clip)
    return clip
  return make


def _set_row(field, row, value):
  def change(clip):
    clip[field] = clip[field].copy()
    clip[field][row, 4] = value
  return change


WRITER_CASES = {
    "wrong_width": (_bad(lambda c: c.update(
        speaker_motion=c["speaker_motion"][:, :55])),
                    r"field speaker_motion: feature width 55, expected 56"),
    "nan": (_bad(_set_row("listener_motion", 3, np.nan)),
            r"field listener_motion: NaN at frame 3"),
    "inf": (_bad(_set_row("speaker_audio", 2, np.inf)),
            r"field speaker_audio: Inf at frame 2"),
    "empty": (_bad(lambda c: c.update(
        speaker_motion=np.zeros((0, 56), np.float32))),
              r"field speaker_motion: 0 frame\(s\); a clip needs at least 2"),
    "one_frame": (_bad(lambda c: c.update(
        {k: c[k][:1] for k in records.STREAM_WIDTHS})),
                  r"field speaker_motion: 1 frame\(s\); a clip needs at least 2"),
    "mismatched_lengths": (_bad(lambda c: c.update(
        speaker_audio=c["speaker_audio"][:-1])),
                           r"different frame counts \(speaker_motion 6, listener_motion 6, "
                           r"speaker_audio 5\)"),
    "missing_key": (_bad(lambda c: c.pop("listener_motion")),
                    r"missing field\(s\) listener_motion"),
}


@pytest.mark.parametrize("case", sorted(WRITER_CASES))
def test_writer_rejects_bad_clip_and_leaves_nothing(tmp_path, case):
  make_bad, pattern = WRITER_CASES[case]
  clips = [_clip(clip_id="good-0"), make_bad(), _clip(clip_id="good-2")]
  with pytest.raises(RecordError, match=pattern) as caught:
    records.write_split(str(tmp_path), "train", clips, num_shards=2)
  message = str(caught.value)
  # Names the destination file, the clip's position and its id.
  assert "train-00001-of-00002.tfrecord clip #1" in message
  if case != "missing_key":
    assert "'bad-clip'" in message
  assert os.listdir(tmp_path) == []  # no shard under its final name, no temp file, no info


def test_writer_rejects_duplicate_clip_ids_and_empty_split(tmp_path):
  with pytest.raises(RecordError, match=r"field clip_id: 'x' repeats"):
    records.write_split(str(tmp_path), "train", [_clip(clip_id="x"), _clip(clip_id="x")])
  with pytest.raises(RecordError, match=r"no clips"):
    records.write_split(str(tmp_path), "train", [])
  assert os.listdir(tmp_path) == []


def _with(clip, **arrays):
  return {**clip, **arrays}


def _nan_at(array, row):
  array = array.copy()
  array[row, 7] = np.nan
  return array


def _inf_at(array, row):
  array = array.copy()
  array[row, 0] = -np.inf
  return array


READER_CASES = {
    "wrong_width": (lambda c: _raw_example(_with(c, speaker_motion=c["speaker_motion"][:, :55])),
                    r"field speaker_motion: holds 330 floats .* expected length 6 x width 56"),
    "length_mismatch": (lambda c: _raw_example(_with(c, speaker_audio=c["speaker_audio"][:5])),
                        r"field speaker_audio: holds 3840 floats .* expected length 6 x "
                        r"width 768"),
    "nan": (lambda c: _raw_example(_with(c, listener_motion=_nan_at(c["listener_motion"], 4))),
            r"field listener_motion: NaN at frame 4"),
    "inf": (lambda c: _raw_example(_with(c, speaker_audio=_inf_at(c["speaker_audio"], 1))),
            r"field speaker_audio: Inf at frame 1"),
    "one_frame": (lambda c: _raw_example({**c, **{k: c[k][:1] for k in records.STREAM_WIDTHS}}),
                  r"field length: 1 frame\(s\)"),
    "empty": (lambda c: _raw_example({**c, **{k: c[k][:0] for k in records.STREAM_WIDTHS}}),
              r"field length: 0 frame\(s\)"),
    "not_an_example": (lambda c: b"\x08\x96\x01 certainly not a tf.train.Example",
                       r"record 1: not a tf.train.Example"),
}


@pytest.mark.parametrize("case", sorted(READER_CASES))
def test_reader_rejects_foreign_bad_records(tmp_path, case):
  make_payload, pattern = READER_CASES[case]
  bad = _clip(clip_id="bad-clip")
  path = _write_foreign_split(tmp_path, [_raw_example(_clip(clip_id="ok")),
                                         make_payload(bad)])
  for read in (lambda: records.read_clips(str(tmp_path), "train"),
               lambda: _eval_batches(tmp_path, "train")):
    with pytest.raises(RecordError, match=pattern) as caught:
      read()
    message = str(caught.value)
    assert message.startswith(f"{path} record 1")
    if case != "not_an_example":
      assert "(clip_id 'bad-clip')" in message


def test_missing_split_and_missing_shard(dataset_dir, tmp_path):
  with pytest.raises(RecordError, match=r"split 'test' not found; the dataset has "
                                        r"\['train', 'val'\]"):
    records.split_files(str(dataset_dir), "test")
  with pytest.raises(RecordError, match=r"split 'nope' not found"):
    pipeline.make_dataset(str(dataset_dir), "nope", batch_size=2, train=False, seed=0,
                          bucket_boundaries=[64], max_len=64)
  records.write_split(str(tmp_path), "train", [_clip(clip_id="a"), _clip(clip_id="b")],
                      num_shards=2)
  missing = tmp_path / "train-00001-of-00002.tfrecord"
  missing.unlink()
  for read in (lambda: records.read_clips(str(tmp_path), "train"),
               lambda: _eval_batches(tmp_path, "train")):
    with pytest.raises(RecordError, match=rf"{missing}: missing shard file of split "
                                          r"'train'"):
      read()
  # Deleted after make_dataset checked it: the in-graph check names it (and does not hang).
  records.write_split(str(tmp_path), "train", [_clip(clip_id="a"), _clip(clip_id="b")],
                      num_shards=2)
  dataset = pipeline.make_dataset(str(tmp_path), "train", batch_size=2, train=False,
                                  seed=0, bucket_boundaries=[8], max_len=8)
  missing.unlink()
  with pytest.raises(RecordError, match=rf"^{missing}: shard file missing"):
    list(pipeline.as_numpy(iter(dataset)))


def test_truncated_and_garbage_shards_name_the_file(tmp_path):
  records.write_split(str(tmp_path), "train",
                      [_clip(clip_id=f"c{i}", seed=i) for i in range(4)], num_shards=1)
  shard = tmp_path / "train-00000-of-00001.tfrecord"
  original = shard.read_bytes()

  # Truncated: caught before reading by the size the info file lists.
  shard.write_bytes(original[:-100])
  with pytest.raises(RecordError, match=rf"{shard}: file is \d+ bytes but .* lists "
                                        rf"{len(original)}: truncated"):
    records.read_clips(str(tmp_path), "train")
  assert str(shard) in _pipeline_error(tmp_path)

  # Truncated with a doctored info file: the in-graph record count catches it.
  _update_info_size(tmp_path, shard)
  for message in (_pipeline_error(tmp_path), ""):
    if not message:
      with pytest.raises(RecordError) as caught:
        records.read_clips(str(tmp_path), "train")
      message = str(caught.value)
    assert message.startswith(f"{shard}: only 3 of 4 records could be read")

  # Same size, corrupted in the middle (CRC failure).
  corrupt = bytearray(original)
  corrupt[len(original) // 2: len(original) // 2 + 64] = os.urandom(64)
  shard.write_bytes(bytes(corrupt))
  _update_info_size(tmp_path, shard)
  assert re.match(rf"{re.escape(str(shard))}: only [0-3] of 4 records could be read",
                  _pipeline_error(tmp_path))

  # Garbage file of the right size.
  shard.write_bytes(os.urandom(len(original)))
  with pytest.raises(RecordError, match=rf"{re.escape(str(shard))}: only 0 of 4 records"):
    records.read_clips(str(tmp_path), "train")


def test_missing_or_corrupt_info_file(tmp_path):
  with pytest.raises(RecordError, match=r"dataset_info.json: missing"):
    records.read_info(str(tmp_path))
  records.write_split(str(tmp_path), "train", [_clip(clip_id="a")])
  info_path = tmp_path / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info_path.write_text(json.dumps(info)[:-20])
  with pytest.raises(RecordError, match=r"dataset_info.json: not valid JSON"):
    records.split_files(str(tmp_path), "train")
  with pytest.raises(RecordError, match=r"dataset_info.json: not valid JSON"):
    pipeline.make_dataset(str(tmp_path), "train", batch_size=1, train=True, seed=0,
                          bucket_boundaries=[8], max_len=8)
  info_path.write_text(json.dumps({**info, "schema_version": 2}))
  with pytest.raises(RecordError, match=r"field schema_version: 2, this reader "
                                        r"understands 1"):
    records.read_info(str(tmp_path))
  info["splits"]["train"]["shards"][0].pop("num_bytes")
  info_path.write_text(json.dumps(info))
  with pytest.raises(RecordError, match=r"field splits.train.shards\[0\]"):
    records.read_info(str(tmp_path))


# --------------------------------------------------------------------------------------
# Pipeline.
# --------------------------------------------------------------------------------------


def test_window_bounds():
  assert pipeline.window_bounds(10, 24) == [(0, 10)]
  assert pipeline.window_bounds(48, 24) == [(0, 24), (24, 48)]
  assert pipeline.window_bounds(49, 24) == [(0, 24), (24, 47), (47, 49)]
  assert pipeline.window_bounds(50, 24) == [(0, 24), (24, 48), (48, 50)]
  for length in range(2, 100):
    bounds = pipeline.window_bounds(length, 5)
    assert bounds[0][0] == 0 and bounds[-1][1] == length
    assert all(2 <= end - start <= 5 for start, end in bounds)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def _check_batch_layout(batch, batch_size, boundaries):
  rows, bucket_length = batch["mask"].shape
  assert rows == batch_size and bucket_length in boundaries
  assert batch["speaker_motion"].shape == (batch_size, bucket_length, 56)
  assert batch["listener_motion"].shape == (batch_size, bucket_length, 56)
  assert batch["speaker_audio"].shape == (batch_size, bucket_length, 768)
  assert batch["mask"].dtype == np.bool_ and batch["example_mask"].dtype == np.bool_
  assert batch["length"].dtype == np.int32 and batch["window_index"].dtype == np.int32
  np.testing.assert_array_equal(
      batch["mask"], np.arange(bucket_length)[None] < batch["length"][:, None])
  # The smallest bucket that fits the longest row.
  valid_lengths = batch["length"][batch["example_mask"]]
  assert bucket_length == min(b for b in boundaries if b >= valid_lengths.max())
  for stream in records.STREAM_WIDTHS:
    assert np.all(batch[stream][~batch["mask"]] == 0.0)
  filler = ~batch["example_mask"]
  assert not batch["mask"][filler].any() and np.all(batch["length"][filler] == 0)
  assert all(clip_id == b"" for clip_id in batch["clip_id"][filler])


def _reassemble(batches) -> dict[str, dict[str, np.ndarray]]:
  windows = collections.defaultdict(dict)
  for batch in batches:
    for row in np.flatnonzero(batch["example_mask"]):
      key = batch["clip_id"][row].decode()
      index = int(batch["window_index"][row])
      assert index not in windows[key], f"window {index} of {key} seen twice"
      length = batch["length"][row]
      windows[key][index] = {stream: batch[stream][row, :length]
                             for stream in records.STREAM_WIDTHS}
  clips = {}
  for clip_id, parts in windows.items():
    assert sorted(parts) == list(range(len(parts)))
    clips[clip_id] = {stream: np.concatenate([parts[i][stream] for i in sorted(parts)])
                      for stream in records.STREAM_WIDTHS}
    clips[clip_id]["window_lengths"] = [len(parts[i]["speaker_motion"])
                                        for i in sorted(parts)]
  return clips


def test_eval_pass_yields_every_frame_exactly_once(dataset_dir):
  boundaries = [8, 16, 24]
  batches = _eval_batches(dataset_dir, "train", batch_size=3, bucket_boundaries=boundaries,
                          max_len=24)
  for batch in batches:
    _check_batch_layout(batch, 3, boundaries)
  assert any(not batch["example_mask"].all() for batch in batches)
  expected = {clip["clip_id"]: clip for clip in records.read_clips(str(dataset_dir),
                                                                   "train")}
  got = _reassemble(batches)
  assert sorted(got) == sorted(expected)
  assert any(len(clip["window_lengths"]) > 1 for clip in got.values())
  for clip_id, clip in got.items():
    assert clip["window_lengths"] == [
        end - start for start, end in pipeline.window_bounds(expected[clip_id]["length"], 24)]
    for stream in records.STREAM_WIDTHS:
      np.testing.assert_array_equal(clip[stream], expected[clip_id][stream])
  # One pass in a fixed order.
  again = _eval_batches(dataset_dir, "train", batch_size=3, bucket_boundaries=boundaries,
                        max_len=24)
  assert [b["clip_id"].tolist() for b in again] == [b["clip_id"].tolist() for b in batches]


@pytest.mark.parametrize("split", ["train", "val"])  # 3 shards: files; 1 shard: records
def test_two_processes_partition_the_clips(dataset_dir, split):
  per_host = [_reassemble(_eval_batches(dataset_dir, split, process_index=index,
                                        process_count=2)) for index in range(2)]
  everything = {clip["clip_id"] for clip in records.read_clips(str(dataset_dir), split)}
  assert per_host[0] and per_host[1]
  assert not set(per_host[0]) & set(per_host[1])
  assert set(per_host[0]) | set(per_host[1]) == everything


def _train_batches(data_dir, seed, count, **overrides):
  kwargs = dict(batch_size=4, train=True, seed=seed, bucket_boundaries=[16, 32, 50],
                max_len=50, shuffle_buffer=64)
  kwargs.update(overrides)
  iterator = iter(pipeline.make_dataset(str(data_dir), "train", **kwargs))
  return [batch for batch, _ in zip(pipeline.as_numpy(iterator), range(count))]


def test_train_batches_are_full_seeded_and_cover_all_clips(dataset_dir):
  first = _train_batches(dataset_dir, seed=1, count=12)
  again = _train_batches(dataset_dir, seed=1, count=12)
  other = _train_batches(dataset_dir, seed=2, count=12)
  order = lambda batches: [b["clip_id"].tolist() for b in batches]
  assert order(first) == order(again)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert order(first) != order(other)
  for batch in first:
    _check_batch_layout(batch, 4, [16, 32, 50])
    assert batch["example_mask"].all()
  # 12 batches of 4 = 48 windows > 3 epochs of 14 clips (all <= 50 frames): all seen.
  seen = collections.Counter(c for b in first for c in b["clip_id"].tolist())
  assert len(seen) == 14


def test_iterator_checkpoint_resumes_exactly_across_epochs(dataset_dir, tmp_path):
  # The defaults the official configs train with (shuffle buffer 1024 > the 14 windows of an
  # epoch, parallel interleave over the 3 shards), 7 batches per epoch. Restored into a newly
  # built dataset, the stream must continue exactly, also past epoch boundaries: with
  # reshuffling `shuffle` + `repeat` it diverged at the first boundary after the checkpoint.
  def make():
    return pipeline.make_dataset(str(dataset_dir), "train", batch_size=2, train=True,
                                 seed=0, bucket_boundaries=[16, 32, 50], max_len=50)

  def batch_ids(batch):
    return list(zip(batch["clip_id"].tolist(), batch["window_index"].tolist()))

  total = 30  # more than 4 epochs
  save_points = (1, 6, 7, 8, 13, 20)  # mid-epoch and around the boundaries
  iterator = iter(make())
  batches = pipeline.as_numpy(iterator)
  uninterrupted, saved = [], {}
  for position in range(total):
    if position in save_points:
      saved[position] = tf.train.Checkpoint(iterator=iterator).write(
          str(tmp_path / f"at{position}"))
    uninterrupted.append(next(batches))
  rebuilt = make()
  for position, path in saved.items():
    fresh = iter(rebuilt)
    tf.train.Checkpoint(iterator=fresh).read(path).assert_consumed()
    resumed = [batch for batch, _ in zip(pipeline.as_numpy(fresh), range(total - position))]
    for index, (want, got) in enumerate(zip(uninterrupted[position:], resumed)):
      assert batch_ids(got) == batch_ids(want), (position, position + index)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
  # Epochs differ in order (the comparison is not of one repeated order).
  assert batch_ids(uninterrupted[0]) + batch_ids(uninterrupted[1]) != (
      batch_ids(uninterrupted[7]) + batch_ids(uninterrupted[8]))


def test_make_dataset_argument_checks(dataset_dir):
  base = dict(batch_size=2, train=False, seed=0)
  with pytest.raises(ValueError, match=r"last bucket boundary \(16\) must be >= max_len"):
    pipeline.make_dataset(str(dataset_dir), "train", bucket_boundaries=[8, 16], max_len=24,
                          **base)
  with pytest.raises(ValueError, match=r"strictly ascending"):
    pipeline.make_dataset(str(dataset_dir), "train", bucket_boundaries=[16, 8, 24],
                          max_len=24, **base)
  with pytest.raises(ValueError, match=r"process_index"):
    pipeline.make_dataset(str(dataset_dir), "train", bucket_boundaries=[24], max_len=24,
                          process_index=2, process_count=2, **base)
  with pytest.raises(ValueError, match=r"process 5 would get none"):
    pipeline.make_dataset(str(dataset_dir), "val", bucket_boundaries=[64], max_len=64,
                          batch_size=2, train=True, seed=0, process_index=5,
                          process_count=6)
