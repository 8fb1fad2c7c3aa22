"""Hand-off files for the official rendering path (dim_jax/handoff.py)."""

import os
import pickle

import numpy as np
import pytest

from dim_jax import handoff


def _motion(frames=23, seed=0):
  return np.random.default_rng(seed).normal(size=(frames, 56)).astype(np.float32)


def test_emoca_frames_round_trip_in_frame_order(tmp_path):
  motion = _motion()
  clip_dir = str(tmp_path / "emoca" / "clip_a")
  handoff.write_emoca_frames(clip_dir, motion)
  assert sorted(os.listdir(clip_dir), key=int) == [str(t) for t in range(23)]
  # The official layout: pose (6) and exp (50) per frame folder, float32.
  pose = np.load(os.path.join(clip_dir, "12", "pose.npy"))
  exp = np.load(os.path.join(clip_dir, "12", "exp.npy"))
  assert pose.shape == (6,) and exp.shape == (50,) and exp.dtype == np.float32
  np.testing.assert_array_equal(np.concatenate([pose, exp]), motion[12])
  # Folders "10".."22" sort before "2" by name; the reader orders by number.
  np.testing.assert_array_equal(handoff.read_emoca_frames(clip_dir), motion)
  # Rewriting replaces the clip whole (a shorter clip leaves no stale frames behind).
  handoff.write_emoca_frames(clip_dir, motion[:5])
  np.testing.assert_array_equal(handoff.read_emoca_frames(clip_dir), motion[:5])
  assert not [e for e in os.listdir(tmp_path / "emoca") if e.startswith(".")]


def test_emoca_reader_looks_through_emoca_model_folder_and_reports_gaps(tmp_path):
  motion = _motion(frames=3)
  for t in range(3):
    inner = tmp_path / "clip" / str(t) / "EMOCA_v2_lr_mse_20"
    inner.mkdir(parents=True)
    np.save(inner / "pose.npy", motion[t, :6][None])  # EMOCA writes [1, 6]
    np.save(inner / "exp.npy", motion[t, 6:][None])
  np.testing.assert_array_equal(handoff.read_emoca_frames(str(tmp_path / "clip")), motion)
  os.rename(tmp_path / "clip" / "1", tmp_path / "clip" / "7")
  with pytest.raises(handoff.HandoffError, match="not 0..2"):
    handoff.read_emoca_frames(str(tmp_path / "clip"))
  with pytest.raises(handoff.HandoffError, match="no numbered frame folders"):
    handoff.read_emoca_frames(str(tmp_path))


def test_smoothing_is_the_official_moving_average_inside_and_shrinks_at_the_ends():
  motion = _motion(frames=40).astype(np.float64)
  window = 10
  smoothed = handoff.smooth(motion, window)
  # postprocess2emoca.py: np.convolve(a, ones(w)/w, 'valid') placed at [w/2, T - w/2 + 1).
  for dim in (0, 5, 55):
    valid = np.convolve(motion[:, dim], np.ones(window) / window, mode="valid")
    np.testing.assert_allclose(smoothed[window // 2: 40 - window // 2 + 1, dim], valid,
                               rtol=1e-5, atol=1e-6)
  # Where the official code leaves zeros, the frames that exist are averaged.
  np.testing.assert_allclose(smoothed[0], motion[:5].mean(axis=0), rtol=1e-5, atol=1e-6)
  # Frame t averages t-5..t+4: the last frame the 6 frames 34..39.
  np.testing.assert_allclose(smoothed[-1], motion[-6:].mean(axis=0), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(handoff.smooth(motion, 1), motion.astype(np.float32))


def test_predictions_pickle_has_the_official_keys_and_loads_safely(tmp_path):
  preds = [_motion(10, 1), _motion(12, 2)]
  truths = [_motion(10, 3), None]
  path = str(tmp_path / "listener_predictions_sample_0.pkl")
  handoff.write_predictions(path, preds, truths, ["clip_a", "clip_b"])
  with open(path, "rb") as f:  # what the official post-processing does with it
    official = pickle.load(f)
  assert set(official) == {"y_pred", "y_true", "data_ids"}
  np.testing.assert_array_equal(official["y_pred"][1], preds[1])
  assert official["y_true"][1] is None
  ours = handoff.read_predictions(path)
  np.testing.assert_array_equal(ours["y_true"][0], truths[0])
  with open(tmp_path / "bad.pkl", "wb") as f:
    pickle.dump({"y_pred": [1]}, f)
  with pytest.raises(handoff.HandoffError, match="y_pred, y_true, data_ids"):
    handoff.read_predictions(str(tmp_path / "bad.pkl"))


def test_formats_parse_and_render_notes_name_the_official_scripts():
  assert handoff.parse_formats("pickle, npy") == ("npy", "pickle")
  with pytest.raises(ValueError, match="subset of npy, emoca, pickle"):
    handoff.parse_formats("npy,mp4")
  with pytest.raises(ValueError):
    handoff.parse_formats("")
  text = handoff.render_instructions(role="listener", formats=("emoca",), num_samples=2,
                                     smoothing=10, fps=30.0)
  assert "--customfeatdir /path/to/generated/emoca/sample_0/" in text
  assert "10-frame moving average" in text and "Predictions pickles" not in text
  # Clip ids that are already file names keep them (PIRender matches folders by name).
  assert handoff.clip_folder_name("Ew2z_sYABE0_000063_000083") == "Ew2z_sYABE0_000063_000083"
  assert handoff.clip_folder_name("s1/c1") != handoff.clip_folder_name("s1_c1")
