"""Tests of the non-learned listener baselines (dim_jax/evaluation/baselines.py)."""

from __future__ import annotations

import numpy as np
import pytest

from dim_jax.evaluation import baselines

MOTION = baselines.MOTION_DIM
AUDIO = baselines.AUDIO_DIM


# --------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------


def _pad_garbage(array: np.ndarray, lengths, value: float | np.ndarray = np.nan) -> np.ndarray:
  """Copy of ``array`` with ``value`` on every padded frame."""
  mask = baselines.valid_mask(np.asarray(lengths), array.shape[1])
  return np.where(mask[..., None], array, value).astype(array.dtype)


def _training(rng: np.random.Generator, lengths, num_frames: int,
              garbage: float = np.nan) -> baselines.TrainingClips:
  """Random training split with ``garbage`` on its padded frames."""
  m = len(lengths)
  return baselines.TrainingClips(
      speaker_motion=_pad_garbage(
          rng.standard_normal((m, num_frames, MOTION)).astype(np.float32), lengths, garbage),
      listener_motion=_pad_garbage(
          rng.standard_normal((m, num_frames, MOTION)).astype(np.float32), lengths, garbage),
      speaker_audio=_pad_garbage(
          rng.standard_normal((m, num_frames, AUDIO)).astype(np.float32), lengths, garbage),
      lengths=np.asarray(lengths))


def _assert_zero_padding(prediction: np.ndarray, lengths) -> None:
  mask = baselines.valid_mask(np.asarray(lengths), prediction.shape[1])
  assert np.all(prediction[~mask] == 0.0)


def _brute_force_nn(query, query_lengths, keys, train_lengths, listener, window, stride,
                    standardize=True):
  """Loop-by-loop reference of nearest_neighbour_baseline."""
  valid = np.concatenate([keys[m, :length] for m, length in enumerate(train_lengths)])
  valid = valid.astype(np.float64)
  mean = valid.mean(0)
  scale = valid.std(0) if standardize else np.ones(valid.shape[1])
  scale[scale == 0] = 1.0
  windows = []  # (clip, start, span)
  for m, length in enumerate(train_lengths):
    if length < window:
      windows.append((m, 0, length))
    else:
      for start in range(0, length - window + 1, stride):
        windows.append((m, start, window))
  out = np.zeros(query.shape[:2] + (MOTION,), np.float32)
  for n, length in enumerate(query_lengths):
    for q_start in range(0, length, window):
      valid_frames = min(window, length - q_start)
      best, best_window = np.inf, None
      for m, start, span in windows:
        total = 0.0
        for j in range(valid_frames):
          a = (query[n, q_start + j].astype(np.float64) - mean) / scale
          b = (keys[m, start + min(j, span - 1)].astype(np.float64) - mean) / scale
          total += float(np.sum((a - b) ** 2))
        if total / valid_frames < best:
          best, best_window = total / valid_frames, (m, start, span)
      m, start, span = best_window
      for j in range(valid_frames):
        out[n, q_start + j] = listener[m, start + min(j, span - 1)]
  return out


# --------------------------------------------------------------------------------------
# TrainingClips.
# --------------------------------------------------------------------------------------


def _clip_dict(rng, length, clip_id):
  return {
      "speaker_motion": rng.standard_normal((length, MOTION)).astype(np.float32),
      "listener_motion": rng.standard_normal((length, MOTION)).astype(np.float32),
      "speaker_audio": rng.standard_normal((length, AUDIO)).astype(np.float32),
      "clip_id": clip_id, "length": length,
  }


def test_from_clips_pads_with_zeros_and_keeps_values():
  rng = np.random.default_rng(0)
  clips = [_clip_dict(rng, length, f"c{i}") for i, length in enumerate([5, 9, 2])]
  train = baselines.TrainingClips.from_clips(clips)
  np.testing.assert_array_equal(train.lengths, [5, 9, 2])
  assert train.speaker_audio.shape == (3, 9, AUDIO)
  assert train.listener_motion.dtype == np.float32
  for i, clip in enumerate(clips):
    for field in ("speaker_motion", "listener_motion", "speaker_audio"):
      np.testing.assert_array_equal(getattr(train, field)[i, : clip["length"]], clip[field])
      assert np.all(getattr(train, field)[i, clip["length"]:] == 0)


@pytest.mark.parametrize("field", ["speaker_motion", "listener_motion", "speaker_audio"])
def test_from_clips_names_clip_and_field_on_bad_input(field):
  rng = np.random.default_rng(1)
  clips = [_clip_dict(rng, 4, "good"), _clip_dict(rng, 4, "bad-one")]
  wrong_width = [dict(clip) for clip in clips]
  wrong_width[1][field] = wrong_width[1][field][:, :-1]
  with pytest.raises(ValueError, match=rf"'bad-one'.*{field}.*shape"):
    baselines.TrainingClips.from_clips(wrong_width)
  non_finite = [dict(clip) for clip in clips]
  non_finite[1][field] = non_finite[1][field].copy()
  non_finite[1][field][2, 3] = np.inf
  with pytest.raises(ValueError, match=rf"'bad-one'.*{field}.*frame 2"):
    baselines.TrainingClips.from_clips(non_finite)


def test_from_clips_rejects_mismatched_frames_and_empty():
  rng = np.random.default_rng(2)
  clip = _clip_dict(rng, 4, "short-audio")
  clip["speaker_audio"] = clip["speaker_audio"][:3]
  with pytest.raises(ValueError, match="short-audio.*speaker_audio has 3 frames"):
    baselines.TrainingClips.from_clips([clip])
  with pytest.raises(ValueError, match="no clips"):
    baselines.TrainingClips.from_clips([])


def test_training_clips_rejects_non_finite_valid_frames_but_not_padding():
  rng = np.random.default_rng(3)
  train = _training(rng, [3, 5], 5)  # NaN padding is fine.
  motion = train.speaker_motion.copy()
  motion[0, 2, 0] = np.nan
  with pytest.raises(ValueError, match="speaker_motion.*frame 2 of clip 0"):
    baselines.TrainingClips(motion, train.listener_motion, train.speaker_audio, train.lengths)
  with pytest.raises(ValueError, match="lengths"):
    baselines.TrainingClips(train.speaker_motion, train.listener_motion, train.speaker_audio,
                            np.array([0, 5]))


# --------------------------------------------------------------------------------------
# Random baseline.
# --------------------------------------------------------------------------------------


def test_random_draws_uniformly_from_valid_training_frames():
  rng = np.random.default_rng(4)
  # Clips of very different lengths: drawing a clip first, then a frame, would not be
  # uniform over frames. Padding holds huge values that must never be drawn.
  train = _training(rng, [1, 7, 2], 7, garbage=1e6)
  pool = train.listener_motion[train.mask()]
  lengths = rng.integers(0, 300, size=40)
  out = baselines.random_baseline(train, lengths, 300, np.random.default_rng(0),
                                  noise_scale=0.0)
  _assert_zero_padding(out, lengths)
  frames = out[baselines.valid_mask(lengths, 300)]
  match = np.all(frames[:, None, :] == pool[None, :, :], axis=2)
  assert np.all(match.sum(1) == 1), "every output frame must be exactly one training frame"
  frequency = match.sum(0) / frames.shape[0]
  np.testing.assert_allclose(frequency, 1 / pool.shape[0], rtol=0.1)


@pytest.mark.parametrize("noise_scale", [0.1, 0.3])
def test_random_noise_std_is_scale_times_training_std_per_dim(noise_scale):
  rng = np.random.default_rng(5)
  # Listener frames are +-a_d per dim, a_d spanning 3 decades: the sign of an output frame
  # identifies its source frame (noise is 10 std away from a sign flip), so out - source
  # is the noise. NaN padding would poison a std that includes padded frames.
  amplitude = np.logspace(-2, 1, MOTION)
  lengths = [40, 25, 60]
  train = _training(rng, lengths, 60)
  signs = rng.choice([-1.0, 1.0], size=(3, 60, MOTION))
  listener = _pad_garbage((signs * amplitude).astype(np.float32), lengths)
  train = baselines.TrainingClips(train.speaker_motion, listener, train.speaker_audio,
                                  train.lengths)
  train_std = listener[train.mask()].std(0, dtype=np.float64)
  out = baselines.random_baseline(train, np.full(100, 200), 200, np.random.default_rng(1),
                                  noise_scale=noise_scale).reshape(-1, MOTION)
  noise = out - np.sign(out) * amplitude.astype(np.float32)
  np.testing.assert_allclose(noise.std(0), noise_scale * train_std, rtol=0.05)
  np.testing.assert_allclose(noise.mean(0), 0.0, atol=0.03 * noise_scale * train_std.max())


def test_random_is_deterministic_given_the_rng_seed():
  train = _training(np.random.default_rng(6), [5, 8], 8)
  lengths = [3, 10, 0]
  first = baselines.random_baseline(train, lengths, 10, np.random.default_rng(42))
  again = baselines.random_baseline(train, lengths, 10, np.random.default_rng(42))
  other = baselines.random_baseline(train, lengths, 10, np.random.default_rng(43))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  assert first.dtype == np.float32 and first.shape == (3, 10, MOTION)
  _assert_zero_padding(first, lengths)


# --------------------------------------------------------------------------------------
# Mirror baseline.
# --------------------------------------------------------------------------------------


def test_mirror_keeps_a_constant_speaker_constant_up_to_the_clip_ends():
  constant = np.linspace(-2.0, 3.0, MOTION).astype(np.float32)
  lengths = [12, 3, 1, 20]
  speaker = _pad_garbage(np.broadcast_to(constant, (4, 20, MOTION)).copy(), lengths)
  out = baselines.mirror_baseline(speaker, lengths, smoothing_frames=9)
  mask = baselines.valid_mask(np.asarray(lengths), 20)
  np.testing.assert_allclose(out[mask], np.broadcast_to(constant, out[mask].shape), rtol=1e-6)
  _assert_zero_padding(out, lengths)


@pytest.mark.parametrize("smoothing_frames, expected", [
    (1, [1.0, 2.0, 4.0, 8.0, 16.0]),
    (3, [3 / 2, 7 / 3, 14 / 3, 28 / 3, 24 / 2]),
    # Even width: one frame more after t than before it.
    (4, [7 / 3, 15 / 4, 30 / 4, 28 / 3, 24 / 2]),
])
def test_mirror_is_the_hand_computed_moving_average(smoothing_frames, expected):
  speaker = np.full((1, 7, MOTION), np.nan, np.float32)
  speaker[0, :5] = np.array([1.0, 2.0, 4.0, 8.0, 16.0])[:, None] * np.arange(1, MOTION + 1)
  out = baselines.mirror_baseline(speaker, [5], smoothing_frames=smoothing_frames)
  np.testing.assert_allclose(out[0, :5],
                             np.array(expected)[:, None] * np.arange(1, MOTION + 1), rtol=1e-6)
  assert np.all(out[0, 5:] == 0)


def test_mirror_ignores_padding_and_other_clips():
  rng = np.random.default_rng(7)
  lengths = [10, 4, 16]
  speaker = rng.standard_normal((3, 16, MOTION)).astype(np.float32)
  clean = baselines.mirror_baseline(_pad_garbage(speaker, lengths, 0.0), lengths)
  for garbage in (np.nan, np.inf, 1e30):
    np.testing.assert_array_equal(
        baselines.mirror_baseline(_pad_garbage(speaker, lengths, garbage), lengths), clean)
  # Each clip alone, unpadded, gives the same frames.
  for i, length in enumerate(lengths):
    alone = baselines.mirror_baseline(speaker[i:i + 1, :length], [length])
    np.testing.assert_allclose(clean[i, :length], alone[0], rtol=1e-6, atol=1e-7)
  _assert_zero_padding(clean, lengths)


def test_mirror_rejects_nan_in_valid_frames():
  speaker = np.zeros((1, 4, MOTION), np.float32)
  speaker[0, 1, 5] = np.nan
  with pytest.raises(ValueError, match="frame 1 of clip 0"):
    baselines.mirror_baseline(speaker, [4])


# --------------------------------------------------------------------------------------
# Nearest neighbour.
# --------------------------------------------------------------------------------------


def test_nn_motion_returns_the_planted_training_window():
  rng = np.random.default_rng(8)
  window, stride = 8, 4
  train = _training(rng, [40, 33, 40], 40)
  speaker = train.speaker_motion.copy()
  query = rng.standard_normal((1, 20, MOTION)).astype(np.float32)
  # Test window 0 is (almost) training clip 1 frames 12..19 (a stride-aligned window);
  # test window 1 is exactly training clip 2 frames 28..35; window 2 is partial (4 frames).
  speaker[1, 12:20] = query[0, 0:8] + 0.01 * rng.standard_normal((8, MOTION))
  speaker[2, 28:36] = query[0, 8:16]
  train = baselines.TrainingClips(speaker, train.listener_motion, train.speaker_audio,
                                  train.lengths)
  out = baselines.nn_motion_baseline(train, query, [20], window=window, stride=stride)
  np.testing.assert_array_equal(out[0, 0:8], train.listener_motion[1, 12:20])
  np.testing.assert_array_equal(out[0, 8:16], train.listener_motion[2, 28:36])
  assert np.all(np.isfinite(out))


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("chunk_elements", [None, 40])
def test_nn_matches_a_brute_force_loop(standardize, chunk_elements, monkeypatch):
  if chunk_elements is not None:  # Many small chunks: the running argmin must be right.
    monkeypatch.setattr(baselines, "_CHUNK_ELEMENTS", chunk_elements)
  rng = np.random.default_rng(9)
  window, stride, features = 6, 2, 3
  train_lengths = [23, 17, 5, 12, 9, 6]  # 5 < window: one short window, edge-padded.
  query_lengths = [20, 13, 1, 7, 0]
  # Per-feature scales differ, so standardising changes which window is nearest.
  keys = rng.standard_normal((6, 23, features)) * np.array([1.0, 5.0, 0.2])
  # Padding that would wreck the standardisation statistics if they included it.
  keys = _pad_garbage(keys, train_lengths, np.array([300.0, np.nan, 0.0]))
  listener = _pad_garbage(rng.standard_normal((6, 23, MOTION)).astype(np.float32),
                          train_lengths)
  query = rng.standard_normal((5, 20, features)) * np.array([1.0, 5.0, 0.2])
  query = _pad_garbage(query, query_lengths)
  out = baselines.nearest_neighbour_baseline(
      query, query_lengths, keys, train_lengths, listener, window=window, stride=stride,
      standardize=standardize)
  expected = _brute_force_nn(query, query_lengths, keys, train_lengths, listener, window,
                             stride, standardize)
  # Exact: the outputs are copied training frames, chosen by distances whose best and second
  # best differ by >= 0.9% here, far above the rounding of either formula (BLAS expansion vs
  # loop, ~1e-13 relative).
  np.testing.assert_array_equal(out, expected)
  _assert_zero_padding(out, query_lengths)


def test_nn_breaks_ties_towards_the_earliest_training_window():
  rng = np.random.default_rng(13)
  keys = np.repeat(rng.standard_normal((1, 8, 2)), 3, axis=0)  # Three identical clips.
  listener = np.arange(3, dtype=np.float32)[:, None, None] * np.ones((3, 8, MOTION),
                                                                     np.float32)
  query = rng.standard_normal((2, 8, 2))
  for chunk_elements in (baselines._CHUNK_ELEMENTS, 8):  # pylint: disable=protected-access
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(baselines, "_CHUNK_ELEMENTS", chunk_elements)
      out = baselines.nearest_neighbour_baseline(query, [8, 8], keys, [8, 8, 8], listener,
                                                 window=4, stride=4)
    # Identical key windows give bit-identical distances: the same dot products, each in the
    # same order in every column of the BLAS product (checked on OpenBLAS Haswell, Sandybridge,
    # Nehalem and generic kernels); a ulp of difference would make this tie arbitrary.
    assert np.all(out == 0.0), "equal distances must pick training clip 0"


def test_nn_uses_the_short_training_clip_padded_with_its_last_frame():
  window = 6
  keys = np.zeros((2, 10, 1))
  keys[0, :10, 0] = 100.0  # Far from the query.
  keys[1, :3, 0] = [1.0, 2.0, 3.0]  # Clip of 3 frames < window: keys 1 2 3 3 3 3.
  listener = np.zeros((2, 10, MOTION), np.float32)
  listener[1, :3] = np.array([7.0, 8.0, 9.0])[:, None]
  listener[1, 3:] = np.nan
  query = np.array([1.0, 2.0, 3.0, 3.0, 3.0])[None, :, None]
  out = baselines.nearest_neighbour_baseline(query, [5], keys, [10, 3], listener,
                                             window=window, stride=1, standardize=False)
  np.testing.assert_array_equal(out[0, :, 0], [7.0, 8.0, 9.0, 9.0, 9.0])


def test_nn_audio_recovers_a_planted_neighbour_through_pca():
  rng = np.random.default_rng(10)
  window = 8
  lengths = [48, 40, 48, 30]
  train = _training(rng, lengths, 48)
  # Low-rank audio (6 latent signals) plus small noise, like HuBERT features.
  projection = rng.standard_normal((6, AUDIO)).astype(np.float32)
  audio = (rng.standard_normal((4, 48, 6)) @ projection
           + 0.05 * rng.standard_normal((4, 48, AUDIO))).astype(np.float32)
  audio = _pad_garbage(audio, lengths)
  train = baselines.TrainingClips(train.speaker_motion, train.listener_motion, audio,
                                  train.lengths)
  query = (rng.standard_normal((1, 16, 6)) @ projection).astype(np.float32)
  query[0, 0:8] = audio[2, 24:32] + 0.05 * rng.standard_normal((8, AUDIO))
  query[0, 8:16] = audio[1, 8:16] + 0.05 * rng.standard_normal((8, AUDIO))
  out = baselines.nn_audio_baseline(train, query, [16], window=window, stride=4,
                                    audio_dims=6)
  np.testing.assert_array_equal(out[0, 0:8], train.listener_motion[2, 24:32])
  np.testing.assert_array_equal(out[0, 8:16], train.listener_motion[1, 8:16])


def test_nn_audio_pca_ignores_training_padding():
  rng = np.random.default_rng(14)
  lengths = [30, 12, 21, 30]
  train = _training(rng, lengths, 30, garbage=0.0)
  # Large rank-2 garbage on padded frames would dominate a PCA that included them.
  garbage = 100.0 * (rng.standard_normal((4, 30, 2)) @ rng.standard_normal((2, AUDIO)))
  mask = train.mask()[..., None]
  dirty = baselines.TrainingClips(train.speaker_motion, train.listener_motion,
                                  np.where(mask, train.speaker_audio, garbage), train.lengths)
  query = rng.standard_normal((3, 24, AUDIO)).astype(np.float32)
  outputs = [baselines.nn_audio_baseline(split, query, [24, 10, 17], window=4, stride=2,
                                         audio_dims=3) for split in (train, dirty)]
  # Exact: padded frames are dropped before any arithmetic, so both PCAs see the same frames.
  np.testing.assert_array_equal(outputs[1], outputs[0])


def test_nn_audio_with_all_components_is_euclidean_nn_on_raw_audio():
  # Full-rank PCA is a rotation: it must not change which window is nearest.
  rng = np.random.default_rng(11)
  lengths = [20, 14, 9]
  train = _training(rng, lengths, 20)
  query_lengths = [15, 6]
  query = _pad_garbage(rng.standard_normal((2, 15, AUDIO)).astype(np.float32), query_lengths)
  out = baselines.nn_audio_baseline(train, query, query_lengths, window=5, stride=2,
                                    audio_dims=AUDIO)
  expected = baselines.nearest_neighbour_baseline(
      query, query_lengths, train.speaker_audio, train.lengths, train.listener_motion,
      window=5, stride=2, standardize=False)
  # Exact: copied training frames; the eigh rotation changes distances by ~1e-12 relative,
  # far below the >= 0.2% gap between the best and second-best window here.
  np.testing.assert_array_equal(out, expected)


# --------------------------------------------------------------------------------------
# run_baselines.
# --------------------------------------------------------------------------------------


def test_run_baselines_shapes_padding_and_padding_independence():
  rng = np.random.default_rng(12)
  train = _training(rng, [40, 25, 36], 40)
  lengths = [30, 7, 19]
  motion = rng.standard_normal((3, 30, MOTION)).astype(np.float32)
  audio = rng.standard_normal((3, 30, AUDIO)).astype(np.float32)
  clean = baselines.run_baselines(train, _pad_garbage(motion, lengths, 0.0),
                                  _pad_garbage(audio, lengths, 0.0), lengths, seed=3)
  # Garbage on the padded frames of the test inputs and of the training split.
  dirty_train = baselines.TrainingClips(
      *(_pad_garbage(getattr(train, field), train.lengths,
                     rng.uniform(-50.0, 50.0, getattr(train, field).shape[2]))
        for field in ("speaker_motion", "listener_motion", "speaker_audio")),
      lengths=train.lengths)
  dirty = baselines.run_baselines(dirty_train, _pad_garbage(motion, lengths),
                                  _pad_garbage(audio, lengths, 1e30), lengths, seed=3)
  assert tuple(clean) == baselines.BASELINES
  for name, prediction in clean.items():
    assert prediction.shape == (3, 30, MOTION) and prediction.dtype == np.float32, name
    assert np.all(np.isfinite(prediction)), name
    assert np.any(prediction != 0), name
    _assert_zero_padding(prediction, lengths)
    np.testing.assert_array_equal(dirty[name], prediction, err_msg=name)
  subset = baselines.run_baselines(train, motion, audio, lengths, names=("mirror",))
  assert list(subset) == ["mirror"]
  with pytest.raises(ValueError, match="unknown baseline"):
    baselines.run_baselines(train, motion, audio, lengths, names=("oracle",))


def test_baselines_run_on_synthetic_data():
  # Imported here: the data package pulls in TensorFlow, which the other tests do not need.
  from dim_jax.data import records  # pylint: disable=g-import-not-at-top
  from dim_jax.data import synthetic  # pylint: disable=g-import-not-at-top

  assert (baselines.MOTION_DIM, baselines.AUDIO_DIM) == (records.MOTION_DIM, records.AUDIO_DIM)
  train = baselines.TrainingClips.from_clips(
      synthetic.generate_clips(8, seed=0, min_len=40, max_len=70, id_prefix="train"))
  test_clips = synthetic.generate_clips(3, seed=0, min_len=30, max_len=60, id_prefix="test")
  lengths = np.array([clip["speaker_motion"].shape[0] for clip in test_clips])
  num_frames = int(lengths.max())
  motion = np.zeros((3, num_frames, MOTION), np.float32)
  audio = np.zeros((3, num_frames, AUDIO), np.float32)
  for i, clip in enumerate(test_clips):
    motion[i, : lengths[i]] = clip["speaker_motion"]
    audio[i, : lengths[i]] = clip["speaker_audio"]
  predictions = baselines.run_baselines(train, motion, audio, lengths)
  assert set(predictions) == set(baselines.BASELINES)
  for name, prediction in predictions.items():
    assert prediction.shape == (3, num_frames, MOTION), name
    assert np.all(np.isfinite(prediction)), name
    _assert_zero_padding(prediction, lengths)
