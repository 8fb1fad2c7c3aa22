"""Sliding-window generation (dim_jax/generate.py) with tiny random-init models.

No training: a DIM-Listener task from the tiny configs (narrowed further), random params drawn
in NumPy on the init shapes, and normalization statistics far from the identity (mean 5, std
4: a power of two, so standardising inside and outside the jitted function agree bit for bit).
Window 16, overlap 4 (hop 12): a 40-frame clip is 3 windows, a 30-frame one too.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dim_jax import generate, sampler
from dim_jax import sharding as sharding_lib
from dim_jax.data import normalization as normalization_lib
from dim_jax.data import pipeline, synthetic
from dim_jax.models import vqvae
from helpers import params as params_helper
from helpers import tiny_dim

WINDOW, OVERLAP = 16, 4
HOP = WINDOW - OVERLAP
LENGTHS = (40, 30)  # both 3 windows: one compiled program serves both rows.
NUM_SAMPLES = 2
SAMPLING = sampler.SamplingConfig(temperature=1.0, top_k_fraction=0.0)
MEAN, STD = 5.0, 4.0


def _normalization(mean=MEAN, std=STD):
  widths = {"speaker_motion": 56, "listener_motion": 56, "speaker_audio": 768}
  return normalization_lib.Normalization(
      means=tuple((s, (mean,) * w) for s, w in widths.items()),
      stds=tuple((s, (std,) * w) for s, w in widths.items()))


def _random_params(abstract, seed=0):
  """Random values (tests/helpers/params.py), small nonzero biases and embeddings."""
  return params_helper.random_params(abstract, seed, bias_scale=0.1)


@functools.lru_cache(maxsize=None)
def _task(variant="official", normalized=True):
  ablation = {"continuous": "no_vq"}.get(variant, "none")
  config = tiny_dim.finetune_config(WINDOW, ablation)
  if variant == "start_token":
    config.model.start = "start_token"
  if variant == "parallel":
    config.model.decoding = "parallel"
  return tiny_dim.task(config, _normalization() if normalized else None)


@functools.lru_cache(maxsize=None)
def _generator(variant="official", normalized=True):
  task = _task(variant, normalized)
  abstract = jax.eval_shape(functools.partial(task.init_params, jax.random.PRNGKey(0)),
                            pipeline.dummy_batch(1))
  params = jax.tree.map(jnp.asarray, _random_params(abstract))
  return generate.Generator(task=task, params=params, sampling=SAMPLING, window=WINDOW,
                            overlap=OVERLAP)


@functools.lru_cache(maxsize=None)
def _clips():
  """Raw-unit clips (as records.read_clips), offset to live around the statistics' mean."""
  clips = synthetic.generate_clips(len(LENGTHS), seed=4, min_len=max(LENGTHS),
                                   max_len=max(LENGTHS), id_prefix="gen")
  out = []
  for clip, n in zip(clips, LENGTHS):
    out.append(dict(clip_id=clip["clip_id"], fps=clip["fps"],
                    **{k: (np.asarray(clip[k][:n]) * STD + MEAN).astype(np.float32)
                       for k in ("speaker_motion", "listener_motion", "speaker_audio")}))
  return out


def _batch(clips=None, frames=max(LENGTHS)):
  clips = clips or _clips()
  batch = dict(speaker_motion=np.zeros((len(clips), frames, 56), np.float32),
               listener_motion=np.zeros((len(clips), frames, 56), np.float32),
               speaker_audio=np.zeros((len(clips), frames, 768), np.float32),
               mask=np.zeros((len(clips), frames), bool))
  for row, clip in enumerate(clips):
    n = min(frames, len(clip["speaker_audio"]))
    for key in ("speaker_motion", "listener_motion", "speaker_audio"):
      batch[key][row, :n] = clip[key][:n]
    batch["mask"][row, :n] = True
  return batch


RNG = jax.random.PRNGKey(7)


@functools.lru_cache(maxsize=None)
def _generated(variant="official", start="first_frame"):
  out = _generator(variant)(_batch(), RNG, NUM_SAMPLES, start=start)
  return jax.tree.map(np.asarray, out)


def _same(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_window_layout():
  assert [generate.num_windows(n, 16, 4) for n in (1, 16, 17, 28, 29, 40, 41)] == [
      1, 1, 2, 2, 3, 3, 4]
  assert generate.padded_length(3, 16, 4) == 40
  weights = generate.crossfade_weights(3, 16, 4)
  # Every frame of the 40 covered ones weighs 1 in total; inside a window exactly 1.
  total = np.zeros(40)
  for k in range(3):
    total[k * 12:k * 12 + 16] += weights[k]
  np.testing.assert_allclose(total, 1.0, rtol=1e-6)
  assert np.all(weights[0, :12] == 1.0) and np.all(weights[1, 4:12] == 1.0)
  np.testing.assert_allclose(weights[1, :4], [0.2, 0.4, 0.6, 0.8], rtol=1e-6)
  with pytest.raises(ValueError, match="overlap"):
    dataclasses.replace(_generator(), overlap=9)
  assert generate.Generator(task=_task(), params=None, sampling=SAMPLING,
                            window=64).overlap == 16  # default W // 4


@pytest.mark.parametrize("variant", ["official", "start_token"])
def test_listener_ground_truth_after_frame_0_is_never_used(variant):
  generator, batch = _generator(variant), _batch()
  base = _generated(variant)
  assert base["motion"].shape == (2, NUM_SAMPLES, 40, 56)
  for poison in (np.nan, 1e6):
    poisoned = dict(batch, listener_motion=batch["listener_motion"].copy())
    poisoned["listener_motion"][:, 1:] = poison
    out = generator(poisoned, RNG, NUM_SAMPLES, start="first_frame")
    for key in ("motion", "tokens", "window_tokens"):
      assert _same(out[key], base[key]), (poison, key)
  # Without ground truth even frame 0 may be garbage.
  none = _generated(variant, "none")
  poisoned = dict(batch, listener_motion=np.full_like(batch["listener_motion"], np.nan))
  out = generator(poisoned, RNG, NUM_SAMPLES, start="none")
  for key in ("motion", "tokens", "window_tokens"):
    assert _same(out[key], none[key]), key
  for out in (base, none):
    assert np.all(np.isfinite(out["motion"]))
    assert not out["motion"][1, :, 30:].any() and not out["tokens"][1, :, 30:].any()


def _still_codes(generator, frame):
  """VQ code 0 of still windows repeating `frame` [B, 56] (standardised units)."""
  still = jnp.repeat(jnp.asarray(frame)[:, None], WINDOW, axis=1)
  return np.asarray(generator.task.listener_vq.apply(
      {"params": generator.params["listener_vq"]}, still, jnp.ones(still.shape[:2], bool),
      method=vqvae.VQVAE.encode)["tokens"][:, 0])


def test_frame_0_token_is_the_code_of_a_still_first_frame():
  # 'first_frame': VQ code 0 of a window repeating the (standardised) ground-truth frame 0;
  # 'none': of a still window at the training mean (0 standardised). Derived here directly.
  frame0 = (_batch()["listener_motion"][:, 0] - MEAN) / STD
  for variant in ("official", "start_token"):
    expected = _still_codes(_generator(variant), frame0)
    np.testing.assert_array_equal(_generated(variant)["window_tokens"][:, :, 0, 0],
                                  np.repeat(expected[:, None], NUM_SAMPLES, axis=1))
  neutral = _still_codes(_generator(), np.zeros_like(frame0))
  assert np.all(_generated(start="none")["window_tokens"][:, :, 0, 0] == neutral[0])
  # The start-token model without ground truth samples frame 0 (from [start] alone): the
  # samples' first tokens are not all the ground truth's code.
  sampled = _generated("start_token", "none")["window_tokens"][:, :, 0, 0]
  assert not np.array_equal(sampled, _generated("start_token")["window_tokens"][:, :, 0, 0])


@pytest.mark.parametrize("variant", ["official", "start_token"])
def test_windows_continue_one_token_stream(variant):
  out = _generated(variant)
  windows, stream = out["window_tokens"], out["tokens"]
  assert windows.shape == (2, NUM_SAMPLES, 3, WINDOW)
  for k in range(1, 3):
    # The overlap holds the tokens the previous window generated for those frames...
    np.testing.assert_array_equal(windows[:, :, k, :OVERLAP], windows[:, :, k - 1, HOP:])
  for k in range(3):  # ...and the stream is the windows laid end to end.
    frames = slice(k * HOP, min(k * HOP + WINDOW, 30))
    np.testing.assert_array_equal(stream[1, :, frames],
                                  windows[1, :, k, :frames.stop - frames.start])
  # The sampled part is not a copy of the prompt: the samples differ and move.
  assert not np.array_equal(stream[:, 0], stream[:, 1])
  assert len(np.unique(stream[0, 0])) > 3


def test_first_window_equals_generating_only_its_frames():
  generator = _generator()
  long = _generated()
  short = jax.tree.map(np.asarray, generator(_batch(frames=WINDOW), RNG, NUM_SAMPLES))
  np.testing.assert_array_equal(short["tokens"], long["window_tokens"][:, :, 0])
  # Before the first overlap only window 0 contributes (weight exactly 1).
  np.testing.assert_array_equal(short["motion"][:, :, :HOP], long["motion"][:, :, :HOP])


def test_outputs_are_raw_units_of_the_decoded_tokens_cross_faded():
  generator, out = _generator(), _generated()
  task, batch = generator.task, _batch()
  decode = jax.jit(lambda tokens, mask: task.listener_vq.apply(
      {"params": generator.params["listener_vq"]}, tokens, mask,
      method=vqvae.VQVAE.decode_tokens))
  weights = generate.crossfade_weights(3, WINDOW, OVERLAP)
  expected = np.zeros((2, NUM_SAMPLES, 40, 56), np.float64)
  for k in range(3):
    frames = slice(k * HOP, k * HOP + WINDOW)
    mask = np.repeat(batch["mask"][:, frames], NUM_SAMPLES, axis=0)
    decoded = np.asarray(decode(out["window_tokens"][:, :, k].reshape(-1, WINDOW), mask))
    expected[:, :, frames] += weights[k][:, None] * decoded.reshape(2, NUM_SAMPLES, WINDOW, 56)
  expected = expected * STD + MEAN
  expected[~np.broadcast_to(batch["mask"][:, None, :, None], expected.shape)] = 0.0
  np.testing.assert_allclose(out["motion"], expected, rtol=1e-5, atol=1e-5)
  assert abs(out["motion"][0].mean() - MEAN) < 2.0  # raw units, not standardised ones
  # Inputs are standardised inside: the same model trained on raw features, fed the
  # standardised inputs, samples the same tokens (its motion is then in standardised units).
  raw_model = dataclasses.replace(generator, task=dataclasses.replace(task, normalization=None))
  standard = {k: (v - MEAN) / STD * batch["mask"][..., None] if k != "mask" else v
              for k, v in batch.items()}
  out_std = jax.tree.map(np.asarray, raw_model(standard, RNG, NUM_SAMPLES))
  np.testing.assert_array_equal(out_std["tokens"], out["tokens"])
  np.testing.assert_allclose(out_std["motion"] * STD + MEAN * batch["mask"][:, None, :, None],
                             out["motion"], rtol=1e-5, atol=1e-5)


def test_generate_clips_and_written_files_are_the_returned_motion(tmp_path):
  generator, clips = _generator(), _clips()
  samples = generate.generate_clips(generator, clips, NUM_SAMPLES, RNG, batch_size=2)
  # Clip c is drawn with its own key, fold_in(RNG, hash of c's id).
  keys = generate.clip_keys(RNG, [clip["clip_id"] for clip in clips])
  direct = generator(_batch(), keys, NUM_SAMPLES)
  for row, clip in enumerate(clips):
    got = samples[clip["clip_id"]]
    assert got.shape == (NUM_SAMPLES, LENGTHS[row], 56) and got.dtype == np.float32
    np.testing.assert_array_equal(got, np.asarray(direct["motion"])[row, :, :LENGTHS[row]])
  generate.write_samples(str(tmp_path), samples, NUM_SAMPLES)
  names = generate.files.clip_filenames(list(samples))
  for clip_id, stacked in samples.items():
    for k in range(NUM_SAMPLES):
      written = np.load(tmp_path / f"sample_{k}" / names[clip_id])
      assert written.dtype == np.float32
      np.testing.assert_array_equal(written, stacked[k])


@pytest.mark.parametrize("variant", ["parallel", "continuous"])
def test_parallel_and_no_vq_variants_generate_long_clips(variant):
  out = _generated(variant)
  assert out["motion"].shape == (2, NUM_SAMPLES, 40, 56)
  assert np.all(np.isfinite(out["motion"])) and not out["motion"][1, :, 30:].any()
  if variant == "parallel":
    assert out["window_tokens"].shape == (2, NUM_SAMPLES, 3, WINDOW)
  else:
    assert out["tokens"] is None and out["window_tokens"] is None
  # They never read the listener's ground truth, frame 0 included.
  batch = _batch()
  poisoned = dict(batch, listener_motion=np.full_like(batch["listener_motion"], np.nan))
  again = _generator(variant)(poisoned, RNG, NUM_SAMPLES, start="first_frame")
  assert _same(again["motion"], out["motion"])


def test_seam_statistics_find_a_known_jump():
  # Slope 1 per frame everywhere (|change| 1), plus a jump of 5 at frame hop + 2 of each
  # seam of clip 0 (one of the overlap + 1 seam offsets), clip 1 a single window (no seam).
  window, overlap = 16, 4
  hop = window - overlap
  lengths = np.array([40, 14])
  samples = np.zeros((1, 2, 40, 56))
  samples[0, 0] = np.arange(40)[:, None]
  for k in (1, 2):
    samples[0, 0, k * hop + 2:] += 5.0
  samples[0, 1, :14] = np.arange(14)[:, None]
  stats = generate.seam_statistics(samples, lengths, window, overlap)
  assert stats["seams"] == 2
  for part in ("expression", "pose"):
    assert stats[part]["inside"] == pytest.approx(1.0)
    assert stats[part]["boundary"] == pytest.approx(6.0)
    assert stats[part]["ratio"] == pytest.approx(6.0)
    assert stats[part]["ratio_mean"] == pytest.approx((4 * 1.0 + 6.0) / 5 / 1.0)
  # A jump in a part's own dims only.
  smooth = samples.copy()
  for k in (1, 2):
    smooth[0, 0, k * hop + 2:] -= 5.0
  smooth[0, 0, 30:, :6] += 2.0  # t = 30 = 2 * hop + 6: inside window 2, not a seam.
  stats = generate.seam_statistics(smooth, lengths, window, overlap)
  assert stats["expression"]["ratio"] == pytest.approx(1.0)
  assert stats["pose"]["ratio"] < 1.0
  none = generate.seam_statistics(samples[:, 1:], lengths[1:], window, overlap)
  assert none["seams"] == 0 and none["expression"]["ratio"] is None


def test_each_clip_is_drawn_from_its_own_key_only():
  # Rows swapped together with their keys: the samples swap exactly. With draws shared by
  # the rows of a call (the earlier sampler) a row's tokens depended on its position.
  generator, clips = _generator(), _clips()
  keys = generate.clip_keys(RNG, [clip["clip_id"] for clip in clips])
  out = jax.tree.map(np.asarray, generator(_batch(), keys, NUM_SAMPLES))
  swapped = jax.tree.map(np.asarray, generator(_batch(clips[::-1]), keys[::-1], NUM_SAMPLES))
  for key in ("tokens", "window_tokens"):
    np.testing.assert_array_equal(swapped[key], out[key][::-1])
  # generate_clips: batches of 1 in reverse order give what batches of 2 give (equal tokens,
  # motion up to float rounding of the other batch shape); the key follows the clip's id.
  samples = generate.generate_clips(generator, clips, NUM_SAMPLES, RNG, batch_size=2)
  alone = generate.generate_clips(generator, clips[::-1], NUM_SAMPLES, RNG, batch_size=1)
  for clip_id in samples:
    np.testing.assert_allclose(alone[clip_id], samples[clip_id], rtol=0, atol=1e-5)
  renamed = [dict(clip, clip_id=clip["clip_id"] + "-b") for clip in clips]
  other = generate.generate_clips(generator, renamed, NUM_SAMPLES, RNG, batch_size=2)
  assert not np.allclose(other[renamed[0]["clip_id"]], samples[clips[0]["clip_id"]], atol=0.1)
  assert len({tuple(k) for k in generate.clip_keys(RNG, ["a", "b", "c"])}) == 3
  with pytest.raises(ValueError, match="one per row"):
    generator(_batch(), keys[:1], NUM_SAMPLES)


def test_window_step_compiles_once_for_every_window_and_batch():
  generator, clips = _generator(), _clips()
  generator(_batch(), RNG, NUM_SAMPLES)  # compiled (or cached) for [2 rows, 2 samples]
  before = generate._window_step._cache_size()  # pylint: disable=protected-access
  generate.generate_clips(generator, clips + [dict(clips[1], clip_id="short",
                                                   **{k: clips[1][k][:10] for k in (
                                                       "speaker_motion", "listener_motion",
                                                       "speaker_audio")})],
                          NUM_SAMPLES, RNG, batch_size=2)
  assert generate._window_step._cache_size() == before  # pylint: disable=protected-access


def _white_std(residuals):
  steps = np.concatenate([np.diff(r, axis=0) for r in residuals])
  return np.sqrt(0.5 * np.mean(steps.astype(np.float64) ** 2, axis=0))


def test_tokenizer_residual_std_is_the_white_part_of_each_windows_reconstruction_error():
  # Derived here window by window: each clip cut into consecutive 16-frame windows (the last
  # shorter one alone, unpadded), standardised, VQ-encoded and decoded on its own; half the
  # mean squared frame-to-frame step of the residual, pooled (steps never cross windows). The
  # function batches padded, masked windows.
  generator = _generator()
  clips = _clips()
  vq, variables = generator.task.listener_vq, {"params": generator.params["listener_vq"]}
  residuals = []
  for clip in clips:
    motion = (clip["listener_motion"] - MEAN) / STD
    for start in range(0, len(motion), WINDOW):
      piece = jnp.asarray(motion[None, start:start + WINDOW])
      mask = jnp.ones(piece.shape[:2], bool)
      tokens = vq.apply(variables, piece, mask, method=vqvae.VQVAE.encode)["tokens"]
      decoded = vq.apply(variables, tokens, mask, method=vqvae.VQVAE.decode_tokens)
      residuals.append(np.asarray(piece - decoded)[0])
  got = generate.tokenizer_residual_std(generator, clips, batch_size=4)
  np.testing.assert_allclose(got, _white_std(residuals), rtol=1e-4, atol=1e-6)
  assert got.shape == (56,) and np.all(got > 0)
  # max_windows: only the first clip's 3 windows.
  first = generate.tokenizer_residual_std(generator, clips, max_windows=3)
  np.testing.assert_allclose(first, _white_std(residuals[:3]), rtol=1e-4, atol=1e-6)
  # Raw units: times the data std.
  np.testing.assert_allclose(generate.residual_scale(generator, got), got * STD, rtol=1e-6)
  # On a mesh (params placed with the training shardings) the same numbers.
  on_mesh = dataclasses.replace(generator, mesh=sharding_lib.make_mesh({"data": -1, "fsdp": 1}))
  np.testing.assert_allclose(generate.tokenizer_residual_std(on_mesh, clips, batch_size=4), got,
                             rtol=1e-5, atol=1e-7)


def test_first_difference_estimator_sees_white_noise_not_smooth_error():
  # The estimator behind tokenizer_residual_std, on known signals: white noise of std 0.3 plus
  # a slow sinusoid of amplitude 2 (a smooth error) reads 0.3, not the total std (~1.4).
  rng = np.random.default_rng(0)
  t = np.arange(4000)[:, None]
  residual = 0.3 * rng.standard_normal((4000, 3)) + 2.0 * np.sin(2 * np.pi * t / 300.0)
  np.testing.assert_allclose(_white_std([residual]), 0.3, rtol=0.05)
  assert residual.std(axis=0).min() > 1.3


def test_residual_noise_has_the_scale_per_dimension_and_each_clips_own_draw():
  scale = np.linspace(0.01, 2.0, 56).astype(np.float32)
  base = {"a": np.full((2, 3000, 56), 3.0, np.float32), "b": np.zeros((1, 40, 56), np.float32)}
  noisy = generate.add_residual_noise(base, RNG, scale)
  noise = noisy["a"] - base["a"]
  # 6,000 draws per dimension: the std within 5 % of the scale (about 5 standard errors),
  # mean near 0, and dimensions independent (max |correlation| far below 1).
  np.testing.assert_allclose(noise.reshape(-1, 56).std(axis=0), scale, rtol=0.05)
  assert np.all(np.abs(noise.reshape(-1, 56).mean(axis=0)) < 0.06 * scale)
  correlation = np.corrcoef(noise.reshape(-1, 56).T) - np.eye(56)
  assert np.abs(correlation).max() < 0.08
  # A clip's draw depends only on the seed, its id and shape: not on the other clips.
  alone = generate.add_residual_noise({"b": base["b"]}, RNG, scale)
  np.testing.assert_array_equal(alone["b"], noisy["b"])
  other_seed = generate.add_residual_noise({"b": base["b"]}, jax.random.PRNGKey(8), scale)
  assert not np.array_equal(other_seed["b"], noisy["b"])
  renamed = generate.add_residual_noise({"c": base["b"]}, RNG, scale)
  assert not np.array_equal(renamed["c"], noisy["b"])
  # The samples themselves are not touched.
  assert np.all(base["a"] == 3.0) and noisy["a"].dtype == np.float32
