"""Tests for the restricted unpickler and the official-dataset converters."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import pathlib
import pickle
from typing import Any

import numpy as np
import pytest

from dim_jax.data import official
from dim_jax.data import safe_pickle

REPO = pathlib.Path(__file__).resolve().parents[1]


def _records():
  from dim_jax.data import records
  return records


def _cli():
  """Imports tools/convert_official.py (tools/ is not a package)."""
  spec = importlib.util.spec_from_file_location(
      "convert_official", REPO / "tools" / "convert_official.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _dump(path: pathlib.Path, obj: Any, protocol: int = 4) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "wb") as f:
    pickle.dump(obj, f, protocol=protocol)
  return path


def _rand(rng: np.random.Generator, t: int, d: int,
          dtype: Any = np.float32) -> np.ndarray:
  return rng.standard_normal((t, d)).astype(dtype)


def _by_id(clips: list[dict]) -> dict[str, dict]:
  return {c["clip_id"]: c for c in clips}


# ---------------------------------------------------------------------------
# safe_pickle


class _Payload:
  """Unpickling this runs os.system under a plain unpickler."""

  def __init__(self, sentinel: pathlib.Path):
    self.sentinel = sentinel

  def __reduce__(self):
    return (os.system, (f"touch {self.sentinel}",))


class _EvalPayload:

  def __reduce__(self):
    return (eval, ("1 + 1",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_os_system_payload_is_refused_and_not_run(tmp_path, protocol):
  sentinel = tmp_path / "pwned"
  path = _dump(tmp_path / "evil.pkl", {"video": _Payload(sentinel)}, protocol)
  with pytest.raises(safe_pickle.UnsafePickleError) as info:
    safe_pickle.load_pickle(path)
  message = str(info.value)
  assert str(path) in message
  assert "system" in message  # posix.system / nt.system
  assert not sentinel.exists()
  assert isinstance(info.value, ValueError)
  assert isinstance(info.value, _records().RecordError)


@pytest.mark.parametrize("protocol", [2, 4])
def test_builtin_eval_is_refused(tmp_path, protocol):
  # Protocol 2 spells the module `__builtin__`, protocol 4 `builtins`.
  path = _dump(tmp_path / "eval.pkl", [_EvalPayload()], protocol)
  with pytest.raises(safe_pickle.UnsafePickleError,
                     match=r"'(builtins|__builtin__)\.eval'"):
    safe_pickle.load_pickle(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_numpy_arrays_load_exactly(tmp_path, protocol, dtype):
  rng = np.random.default_rng(0)
  arr = (rng.standard_normal((7, 5)) * 1000).astype(dtype)
  fortran = np.asfortranarray(arr)
  obj = [arr, fortran, arr[::2, 1:], np.array(3, dtype=dtype), dtype(4)]
  path = _dump(tmp_path / "a.pkl", obj, protocol)
  got = safe_pickle.load_pickle(path)
  for want, have in zip(obj, got):
    assert type(have) is type(want)
    assert have.dtype == want.dtype and have.shape == want.shape
    np.testing.assert_array_equal(have, want)


def test_dict_of_arrays_and_plain_containers(tmp_path):
  rng = np.random.default_rng(1)
  obj = {
      "video_speaker": _rand(rng, 9, 56),
      "audio": _rand(rng, 15, 768, np.float64),
      "meta": ("id", 3, 2.5, 1 + 2j, b"raw", bytearray(b"x"), {1, 2},
               frozenset({"a"}), [None, True], {"nested": [np.int64(5)]}),
  }
  for protocol in (0, 2, 4, 5):
    path = _dump(tmp_path / f"d{protocol}.pkl", obj, protocol)
    got = safe_pickle.load_pickle(path)
    assert set(got) == set(obj)
    for key in ("video_speaker", "audio"):
      assert got[key].dtype == obj[key].dtype
      np.testing.assert_array_equal(got[key], obj[key])
    assert got["meta"] == obj["meta"]


def test_numpy1_module_names_load(tmp_path):
  # Pickles written by numpy 1.x name `numpy.core.multiarray`.
  arr = np.arange(6, dtype=np.float32).reshape(2, 3)
  raw = pickle.dumps(arr, protocol=2)
  raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
  assert b"numpy.core.multiarray" in raw
  path = tmp_path / "np1.pkl"
  path.write_bytes(raw)
  np.testing.assert_array_equal(safe_pickle.load_pickle(path), arr)


def test_persistent_id_and_corrupt_file(tmp_path):
  class _Persist(pickle.Pickler):

    def persistent_id(self, obj):
      return "storage0" if isinstance(obj, str) and obj == "tensor" else None

  path = tmp_path / "persist.pkl"
  with open(path, "wb") as f:
    _Persist(f, protocol=2).dump({"x": "tensor"})
  with pytest.raises(safe_pickle.UnsafePickleError, match="persistent"):
    safe_pickle.load_pickle(path)

  bad = tmp_path / "truncated.pkl"
  bad.write_bytes(pickle.dumps({"a": np.zeros(10)}, protocol=4)[:-20])
  with pytest.raises(_records().RecordError, match="truncated.pkl"):
    safe_pickle.load_pickle(bad)


# ---------------------------------------------------------------------------
# Resampling


def test_resample_to_length_endpoints_and_linearity():
  ramp = np.linspace(0.0, 1.0, 11)[:, None] * np.ones((1, 3))
  out = official.resample_to_length(ramp.astype(np.float32), 7)
  assert out.shape == (7, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out[0], ramp[0])
  np.testing.assert_array_equal(out[-1], ramp[-1])
  np.testing.assert_allclose(out[:, 0], np.linspace(0, 1, 7), atol=1e-6)
  same = np.arange(12, dtype=np.float32).reshape(4, 3)
  np.testing.assert_array_equal(official.resample_to_length(same, 4), same)


def test_resample_by_rate():
  x = np.arange(6, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
  out, note = official.resample_by_rate(x, 50.0, 30.0, 4)
  # Video frame i samples audio row i * 50 / 30.
  np.testing.assert_allclose(out[:, 0], [0, 5 / 3, 10 / 3, 5], atol=1e-6)
  np.testing.assert_array_equal(out[-1], x[-1])
  assert note is None
  with pytest.raises(_records().RecordError, match="max_length_diff"):
    official.resample_by_rate(x, 50.0, 30.0, 10, source="clip.pkl")


# ---------------------------------------------------------------------------
# ViCo


def _vico(path, rng, t=12, t_listener=None, t_audio=None, **overrides):
  data = {
      "video_speaker": _rand(rng, t, 56, np.float64),
      "video_listener": _rand(rng, t if t_listener is None else t_listener,
                              56, np.float64),
      "audio": _rand(rng, t if t_audio is None else t_audio, 768),
  }
  data.update(overrides)
  _dump(path, data, protocol=5)
  return data


def _write_metadata(path, rows):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["sentiment", "uid", "listener", "speaker", "listener_id",
                "speaker_id", "mode"])
    w.writerows(rows)


def test_vico_convert_and_read_back(tmp_path):
  rng = np.random.default_rng(2)
  src = tmp_path / "vico"
  same = _vico(src / "utt_a.pkl", rng, t=12)
  stretched = _vico(src / "utt_b.pkl", rng, t=10, t_audio=17)
  out = tmp_path / "records"
  assert _cli().main(["--format", "vico", "--src", str(src), "--out",
                      str(out), "--split", "train", "--fps", "30"]) == 0
  clips = _by_id(_records().read_clips(str(out), "train"))
  assert set(clips) == {"utt_a", "utt_b"}
  a = clips["utt_a"]
  np.testing.assert_array_equal(a["speaker_motion"],
                                same["video_speaker"].astype(np.float32))
  np.testing.assert_array_equal(a["listener_motion"],
                                same["video_listener"].astype(np.float32))
  np.testing.assert_array_equal(a["speaker_audio"], same["audio"])
  assert a["fps"] == 30.0 and a["session_id"] == "utt_a"
  b = clips["utt_b"]
  assert b["speaker_audio"].shape == (10, 768)
  np.testing.assert_array_equal(b["speaker_audio"][0], stretched["audio"][0])
  np.testing.assert_array_equal(b["speaker_audio"][-1], stretched["audio"][-1])


def test_vico_list_metadata_trim_and_report(tmp_path):
  rng = np.random.default_rng(3)
  src = tmp_path / "vico"
  _vico(src / "u1.pkl", rng, t=8)
  trimmed = _vico(src / "u2.pkl", rng, t=8, t_listener=10)
  _vico(src / "u3.pkl", rng, t=8)  # Not selected.
  meta = tmp_path / "RLD_data.csv"
  _write_metadata(meta, [
      ["neutral", "u1", "lv1", "sv1", 7, 3, "train"],
      ["positive", "u2", "lv2", "sv2", 8, 4, "test"],
      ["negative", "u3", "lv3", "sv3", 9, 5, "test"],
  ])
  ids = tmp_path / "ids.txt"
  ids.write_text("# chosen\nu1\nu2.pkl\n\n")
  out, report = tmp_path / "rec", tmp_path / "report.json"
  assert _cli().main([
      "--format", "vico", "--src", str(src), "--out", str(out), "--split",
      "train", "--list", str(ids), "--metadata", str(meta), "--report",
      str(report)]) == 0
  clips = _by_id(_records().read_clips(str(out), "train"))
  assert set(clips) == {"u1", "u2"}
  assert (clips["u1"]["speaker_id"], clips["u1"]["listener_id"]) == ("3", "7")
  u2 = clips["u2"]
  assert u2["listener_motion"].shape == (8, 56)
  np.testing.assert_array_equal(
      u2["listener_motion"], trimmed["video_listener"][:8].astype(np.float32))
  notes = json.loads(report.read_text())["clips_with_notes"]
  assert any("trimmed" in n for n in notes["u2"])

  # Without --list the metadata split selects the rows.
  out2 = tmp_path / "rec_test"
  assert _cli().main(["--format", "vico", "--src", str(src), "--out",
                      str(out2), "--split", "test", "--metadata",
                      str(meta)]) == 0
  assert {c["clip_id"] for c in _records().read_clips(str(out2), "test")} == {
      "u2", "u3"}


@pytest.mark.parametrize("case, match", [
    ("missing_key", "missing key.*video_listener"),
    ("wide", r"video_speaker.*shape \(6, 57\)"),
    ("nan", "NaN/Inf"),
    ("inf", "NaN/Inf"),
    ("mismatch", "max_length_diff"),
    ("not_dict", "expected a pickled dict"),
    ("unsafe", "forbidden global"),
])
def test_vico_errors_name_the_file(tmp_path, case, match):
  rng = np.random.default_rng(4)
  path = tmp_path / f"{case}.pkl"
  if case == "missing_key":
    _dump(path, {"video_speaker": _rand(rng, 6, 56), "audio": _rand(rng, 6,
                                                                    768)})
  elif case == "wide":
    _vico(path, rng, t=6, video_speaker=_rand(rng, 6, 57))
  elif case in ("nan", "inf"):
    listener = _rand(rng, 6, 56)
    listener[3, 10] = np.nan if case == "nan" else np.inf
    _vico(path, rng, t=6, video_listener=listener)
  elif case == "mismatch":
    _vico(path, rng, t=6, t_listener=9)
  elif case == "not_dict":
    _dump(path, [_rand(rng, 6, 56)])
  else:
    _dump(path, {"video_speaker": _Payload(tmp_path / "pwned")})
  with pytest.raises(_records().RecordError, match=match) as info:
    official.convert_vico_file(path)
  assert str(path) in str(info.value)
  assert not (tmp_path / "pwned").exists()


def test_float64_overflow_is_inf(tmp_path):
  rng = np.random.default_rng(5)
  audio = _rand(rng, 6, 768, np.float64)
  audio[0, 0] = 1e300  # Finite in float64, Inf in float32.
  path = tmp_path / "big.pkl"
  _vico(path, rng, t=6, audio=audio)
  with pytest.raises(_records().RecordError,
                     match="big.pkl: field 'audio'.*NaN/Inf"):
    official.convert_vico_file(path)


def test_too_short_clip(tmp_path):
  rng = np.random.default_rng(11)
  path = tmp_path / "one.pkl"
  _vico(path, rng, t=1)
  with pytest.raises(_records().RecordError, match="one.pkl: clip has 1 frame"):
    official.convert_vico_file(path)


def test_cli_skip_bad_and_missing_listed_file(tmp_path):
  rng = np.random.default_rng(6)
  src = tmp_path / "vico"
  _vico(src / "good.pkl", rng, t=5)
  _vico(src / "bad.pkl", rng, t=5, t_listener=50)
  ids = tmp_path / "ids.txt"
  ids.write_text("good\nbad\nabsent\n")
  out, report = tmp_path / "rec", tmp_path / "r.json"
  argv = ["--format", "vico", "--src", str(src), "--out", str(out), "--list",
          str(ids)]
  assert _cli().main(argv + ["--skip_bad", "--report", str(report)]) == 0
  assert [c["clip_id"] for c in _records().read_clips(str(out), "train")] == [
      "good"]
  skipped = json.loads(report.read_text())["skipped"]
  assert [s["source"] for s in skipped] == [str(src / "bad.pkl"),
                                            str(src / "absent.pkl")]
  assert "absent.pkl: file does not exist" in skipped[1]["error"]
  # Without --skip_bad the first bad file stops the conversion.
  assert _cli().main(argv + ["--out", str(tmp_path / "rec2")]) == 1


# ---------------------------------------------------------------------------
# CANDOR


def test_candor_convert_and_read_back(tmp_path):
  rng = np.random.default_rng(7)
  src = tmp_path / "candor"
  sid = "0a1b2c3d-aaaa-bbbb_17"
  speaker = {"video": _rand(rng, 9, 56), "audio": _rand(rng, 9, 768)}
  listener = {"video": _rand(rng, 9, 56)}
  _dump(src / "speaker" / f"{sid}.pkl", speaker)
  _dump(src / "listener" / f"{sid}.pkl", listener)
  out = tmp_path / "rec"
  assert _cli().main(["--format", "candor", "--src", str(src), "--out",
                      str(out), "--split", "val", "--num_shards", "2"]) == 0
  (clip,) = _records().read_clips(str(out), "val")
  assert clip["clip_id"] == sid and clip["session_id"] == "0a1b2c3d-aaaa-bbbb"
  assert clip["fps"] == 5.0
  np.testing.assert_array_equal(clip["speaker_motion"], speaker["video"])
  np.testing.assert_array_equal(clip["listener_motion"], listener["video"])
  np.testing.assert_array_equal(clip["speaker_audio"], speaker["audio"])


def test_candor_errors_name_the_file(tmp_path):
  rng = np.random.default_rng(8)
  src = tmp_path / "candor"
  _dump(src / "speaker" / "s_1.pkl", {"video": _rand(rng, 4, 56),
                                      "audio": _rand(rng, 4, 768)})
  with pytest.raises(_records().RecordError,
                     match=r"listener[/\\]s_1.pkl: file does not exist"):
    list(official.iter_converted("candor", src))
  _dump(src / "listener" / "s_1.pkl", {"video": _rand(rng, 4, 56)})
  _dump(src / "speaker" / "s_2.pkl", {"video": _rand(rng, 4, 56)})
  _dump(src / "listener" / "s_2.pkl", {"video": _rand(rng, 4, 56)})
  with pytest.raises(_records().RecordError,
                     match=r"speaker[/\\]s_2.pkl: missing key.*audio"):
    list(official.iter_converted("candor", src))


# ---------------------------------------------------------------------------
# Raw EMOCA


def _emoca_video(folder: pathlib.Path, t: int, offset: float,
                 subdir: str | None = official.DEFAULT_EMOCA_SUBDIR
                 ) -> np.ndarray:
  """Writes frames whose values encode (frame, channel); returns [T, 56]."""
  base = folder / subdir if subdir else folder
  want = np.empty((t, 56), np.float32)
  for i in range(t):
    frame = base / f"{i:06d}_000"
    frame.mkdir(parents=True)
    pose = (offset + i + np.arange(6) / 100).astype(np.float32)
    exp = (offset + i + 0.5 + np.arange(50) / 1000).astype(np.float32)
    np.save(frame / "pose.npy", pose)
    np.save(frame / "exp.npy", exp)
    want[i] = np.concatenate([pose, exp])
  (base / "notes.txt").write_text("ignored plain file")
  return want


def test_emoca_pose_then_expression_and_resampled_audio(tmp_path):
  rng = np.random.default_rng(9)
  src = tmp_path / "vico_raw"
  speaker = _emoca_video(src / "emoca" / "sv1", 4, 100.0)
  listener = _emoca_video(src / "emoca" / "lv1", 4, 200.0, subdir=None)
  hubert = _rand(rng, 6, 768)  # 50 fps; rows 0, 5/3, 10/3, 5 at 30 fps.
  _dump(src / "hubert" / "u1.pkl", [hubert[None]], protocol=2)
  meta = tmp_path / "RLD_data.csv"
  _write_metadata(meta, [["neutral", "u1", "lv1", "sv1", 1, 2, "train"]])
  out = tmp_path / "rec"
  assert _cli().main(["--format", "emoca", "--src", str(src), "--out",
                      str(out), "--metadata", str(meta)]) == 0
  (clip,) = _records().read_clips(str(out), "train")
  np.testing.assert_array_equal(clip["speaker_motion"], speaker)
  np.testing.assert_array_equal(clip["listener_motion"], listener)
  # Pose (6) first, then expression (50).
  np.testing.assert_array_equal(clip["speaker_motion"][:, 0],
                                100 + np.arange(4))
  np.testing.assert_array_equal(clip["speaker_motion"][:, 6],
                                100.5 + np.arange(4))
  audio = clip["speaker_audio"]
  assert audio.shape == (4, 768) and clip["fps"] == 30.0
  np.testing.assert_array_equal(audio[0], hubert[0])
  np.testing.assert_array_equal(audio[-1], hubert[-1])
  want_1 = (hubert[1].astype(np.float64) / 3 + hubert[2] * (2 / 3))
  np.testing.assert_allclose(audio[1], want_1, rtol=1e-6, atol=1e-6)
  assert (clip["speaker_id"], clip["listener_id"]) == ("2", "1")


def test_emoca_errors_name_the_file(tmp_path):
  rng = np.random.default_rng(10)
  src = tmp_path / "raw"
  _emoca_video(src / "emoca" / "sv", 3, 0.0)
  _emoca_video(src / "emoca" / "lv", 3, 0.0)
  np.save(src / "emoca" / "lv" / official.DEFAULT_EMOCA_SUBDIR / "000001_000"
          / "exp.npy", np.zeros(49, np.float32))
  (src / "hubert").mkdir(parents=True)
  np.save(src / "hubert" / "u.npy", _rand(rng, 5, 768))
  meta = official.VicoMeta("neutral", "u", "lv", "sv", "1", "2", "train")
  with pytest.raises(_records().RecordError,
                     match=r"000001_000[/\\]exp.npy: shape \(49,\)"):
    official.convert_emoca_utterance(src, meta)
  os.remove(src / "emoca" / "lv" / official.DEFAULT_EMOCA_SUBDIR /
            "000001_000" / "exp.npy")
  with pytest.raises(_records().RecordError,
                     match=r"000001_000[/\\]exp.npy: missing EMOCA file"):
    official.convert_emoca_utterance(src, meta)
