"""Masked iterative decoding (MaskGIT) of the parallel decoder and its training mask.

`sampler.iterative_decode` is checked with a small bidirectional stand-in decoder (an
embedding lookup mixed over the window, re-derived in NumPy); the training mask
(`dim_tasks.scheduled_frame_mask`) against the schedule's law; the loss and the generation
window step with a tiny random-init DIM-Listener.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dim_jax import errors, generate, sampler
from dim_jax.data import pipeline
from dim_jax.training import dim_tasks
from helpers import params as params_helper
from helpers import tiny_dim

VOCAB = 12
MASK = VOCAB + 1  # as DIMConfig: num_tokens (unused start row), num_tokens + 1 (mask)
WIDTH = 10
_tables = np.random.default_rng(0)
EMBED = _tables.normal(size=(VOCAB + 2, VOCAB)).astype(np.float32)
POSITION = _tables.normal(size=(WIDTH, VOCAB)).astype(np.float32)


def fake_decode(inputs):
  """Bidirectional stand-in decoder: every position's logits depend on every input."""
  e = jnp.asarray(EMBED)[inputs]
  return 2.0 * (e + jnp.asarray(POSITION)[: inputs.shape[1]] + e.mean(axis=1, keepdims=True))


def numpy_decode(inputs):
  e = EMBED[inputs].astype(np.float64)
  return 2.0 * (e + POSITION[: inputs.shape[1]] + e.mean(axis=1, keepdims=True))


def numpy_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@functools.partial(jax.jit, static_argnames=("sampling", "iterative"))
def decode(tokens, given, valid, rng, *, sampling, iterative):
  return sampler.iterative_decode(fake_decode, tokens=tokens, given=given, valid=valid,
                                  mask_token=MASK, rng=rng, sampling=sampling,
                                  iterative=iterative, return_passes=True)


def test_masked_counts_follow_the_schedule():
  free = np.array([0, 1, 7, 10, 63])
  for schedule, law in (("cosine", lambda x: np.cos(np.pi / 2 * x)),
                        ("linear", lambda x: 1.0 - x)):
    for k_total in (1, 4, 8):
      counts = np.asarray(sampler.masked_counts(jnp.asarray(free), k_total, schedule))
      assert counts.shape == (k_total, len(free))
      for k in range(1, k_total + 1):
        # Independent: floor(free * law(k/K)) in float64, 0 after the last pass.
        expected = 0 if k == k_total else np.floor(free * law(k / k_total) + 1e-9)
        np.testing.assert_array_equal(counts[k - 1], expected, err_msg=f"{schedule} {k}/{k_total}")
      assert np.all(np.diff(counts, axis=0) <= 0)
  assert sampler.mask_schedule("cosine", 0.0) == 1.0
  with pytest.raises(ValueError, match="mask schedule"):
    sampler.mask_schedule("square", 0.5)


def test_iterative_config_refuses_bad_settings():
  for bad, match in ((dict(iterations=0), "iterations"), (dict(iterations=2.0), "iterations"),
                     (dict(schedule="cos"), "mask_schedule"),
                     (dict(choice_temperature=-1.0), "choice_temperature")):
    with pytest.raises(ValueError, match=match):
      sampler.IterativeConfig(**bad)
  with pytest.raises(errors.ConfigError, match="parallel_mask_schedule"):
    dim_tasks.LossOptions(parallel_mask_schedule="cos")


def test_one_pass_equals_one_shot_parallel_sampling():
  """K=1 with nothing given is the earlier `decoding=parallel` sampler, bit for bit."""
  b = 3
  valid = np.ones((b, WIDTH), bool)
  valid[2, 6:] = False
  rng = jax.random.PRNGKey(5)
  sampling = sampler.SamplingConfig(temperature=1.0, top_k_fraction=0.5)
  tokens, passes = decode(jnp.zeros((b, WIDTH), jnp.int32), jnp.zeros((b, WIDTH), bool),
                          jnp.asarray(valid), rng, sampling=sampling,
                          iterative=sampler.IterativeConfig(iterations=1))
  logits = fake_decode(jnp.full((b, WIDTH), MASK, jnp.int32))
  one_shot = sampler.sample_next(rng, logits.reshape(-1, VOCAB), sampling).reshape(b, WIDTH)
  np.testing.assert_array_equal(tokens, one_shot)
  np.testing.assert_array_equal(passes["fixed"][0], valid)  # every valid frame fixed at once


@pytest.mark.parametrize("iterations,schedule,noise", [(WIDTH, "cosine", 0.0),
                                                       (4, "cosine", 0.0),
                                                       (3, "linear", 0.0),
                                                       (WIDTH, "cosine", 4.5)])
def test_each_pass_fixes_the_scheduled_most_confident_tokens(iterations, schedule, noise):
  """Re-derives every pass in NumPy: the decoder input (fixed tokens, mask elsewhere), the
  count fixed (schedule), which ones (most confident: greedy log-probability), and that
  given and already fixed tokens never change."""
  b = 4
  rng = np.random.default_rng(1)
  valid = np.ones((b, WIDTH), bool)
  valid[1, 7:] = False
  valid[3, 4:] = False
  given = np.zeros((b, WIDTH), bool)
  given[0, 0] = given[1, :3] = given[3, :2] = True  # frame-0 token, overlap prompts
  prompt = rng.integers(0, VOCAB, size=(b, WIDTH)).astype(np.int32)
  greedy = sampler.SamplingConfig(temperature=0.0)
  iterative = sampler.IterativeConfig(iterations=iterations, schedule=schedule,
                                      choice_temperature=noise)
  tokens, passes = decode(jnp.asarray(prompt), jnp.asarray(given), jnp.asarray(valid),
                          jax.random.PRNGKey(0), sampling=greedy, iterative=iterative)
  tokens, fixed_by_pass = np.asarray(tokens), np.asarray(passes["fixed"])
  tokens_by_pass = np.asarray(passes["tokens"])
  law = {"cosine": lambda x: math.cos(math.pi / 2 * x), "linear": lambda x: 1.0 - x}[schedule]
  free = valid.sum(1) - given.sum(1)
  fixed, current = given.copy(), np.where(given, prompt, 0)
  for k in range(iterations):
    logits = numpy_decode(np.where(fixed, current, MASK))
    drawn = logits.argmax(-1)
    confidence = np.take_along_axis(numpy_log_softmax(logits), drawn[..., None], -1)[..., 0]
    still_masked = np.floor(free * law((k + 1) / iterations) + 1e-9).astype(int)
    if k == iterations - 1:
      still_masked[:] = 0
    now = fixed_by_pass[k]
    assert np.all(now[fixed]) and not np.any(now & ~valid), "fixed or padding changed"
    np.testing.assert_array_equal((valid & ~now).sum(1), still_masked, err_msg=f"pass {k}")
    new = now & ~fixed
    np.testing.assert_array_equal(tokens_by_pass[k][new], drawn[new])
    np.testing.assert_array_equal(tokens_by_pass[k][fixed], current[fixed])
    if noise == 0.0:
      for row in range(b):  # the newly fixed are the most confident of the free ones
        open_ = valid[row] & ~fixed[row]
        kept, left = confidence[row][new[row]], confidence[row][open_ & ~new[row]]
        if kept.size and left.size:
          assert kept.min() >= left.max() - 1e-5, (k, row)
    current = np.where(new, drawn, current)
    fixed = now
  np.testing.assert_array_equal(tokens[given], prompt[given])
  np.testing.assert_array_equal(tokens[valid], current[valid])
  if iterations == WIDTH and schedule == "cosine" and noise == 0.0:
    # One position per pass at the end of the cosine: K passes really iterate.
    assert (fixed_by_pass.sum((1, 2))[1:] > fixed_by_pass.sum((1, 2))[:-1]).sum() >= 4


_scheduled_mask = jax.jit(dim_tasks.scheduled_frame_mask, static_argnums=2)


def test_training_mask_ratio_follows_the_schedule():
  """ceil(r * n) of n valid frames, r = schedule(u): at x with x n an integer,
  P(count / n <= x) = P(r <= x) exactly; cosine: 1 - (2/pi) acos(x), linear: x. The DKW
  inequality bounds the empirical CDF's deviation by sqrt(ln(2/alpha) / (2 rows)) with
  probability 1 - alpha (alpha = 1e-6)."""
  rows, frames = 4000, 200
  mask = jnp.ones((rows, frames), bool)
  bound = math.sqrt(math.log(2 / 1e-6) / (2 * rows))
  grid = np.arange(1, 20) / 20  # x * 200 integral
  for schedule, cdf in (("cosine", lambda x: 1 - 2 / np.pi * np.arccos(x)),
                        ("linear", lambda x: x)):
    chosen = np.asarray(_scheduled_mask(jax.random.PRNGKey(3), mask, schedule))
    fraction = chosen.sum(1) / frames
    empirical = (fraction[:, None] <= grid[None, :] + 1e-9).mean(0)
    assert np.abs(empirical - cdf(grid)).max() < bound, schedule
    # Not the other law: the two CDFs differ by more than twice the bound somewhere.
    other = (lambda x: x) if schedule == "cosine" else (lambda x: 1 - 2 / np.pi * np.arccos(x))
    assert np.abs(empirical - other(grid)).max() > 2 * bound
  # Padding never chosen, at least one frame per non-empty row, never more than valid.
  lengths = np.tile([1, 2, 5, 9, 0, 16], 50)
  valid = np.arange(16)[None, :] < lengths[:, None]
  chosen = np.asarray(_scheduled_mask(jax.random.PRNGKey(4), jnp.asarray(valid),
                                                     "cosine"))
  assert not np.any(chosen & ~valid)
  np.testing.assert_array_equal(chosen.sum(1) >= 1, lengths > 0)


# --- a tiny DIM-Listener with the parallel decoder ---------------------------------------

WINDOW, OVERLAP = 16, 4


@functools.lru_cache(maxsize=None)
def _task(schedule="cosine"):
  config = tiny_dim.finetune_config(WINDOW, decoding="parallel")
  config.loss.parallel_mask_schedule = schedule
  return tiny_dim.task(config)


@functools.lru_cache(maxsize=None)
def _params():
  """Random params (the mask schedule does not change the tree)."""
  task = _task()
  abstract = jax.eval_shape(functools.partial(task.init_params, jax.random.PRNGKey(0)),
                            pipeline.dummy_batch(1))
  return jax.tree.map(jnp.asarray, params_helper.random_params(abstract, 0, bias_scale=0.1))


@functools.lru_cache(maxsize=None)
def _jitted_predict(schedule):
  task = _task(schedule)
  return jax.jit(lambda params, tokens, mask, context, key: task._predict_role(
      params, "listener", tokens, mask, context, mask, key, True))


def test_loss_covers_the_masked_frames_only():
  task, params = _task(), _params()
  b, t = 4, WINDOW
  rng = np.random.default_rng(2)
  lengths = np.array([16, 12, 5, 9])
  mask = np.arange(t)[None, :] < lengths[:, None]
  tokens = rng.integers(0, 16, size=(b, t)).astype(np.int32)
  context = jnp.asarray(rng.normal(size=(b, t, 32 + 16)).astype(np.float32))

  def predict(toks, key=7, schedule="cosine"):
    logits, _, frames, ce, _ = _jitted_predict(schedule)(
        _params(), jnp.asarray(toks), jnp.asarray(mask), context, jax.random.PRNGKey(key))
    return np.asarray(logits, np.float64), np.asarray(frames), [float(v) for v in ce]

  logits, frames, ce = predict(tokens)
  assert not np.any(frames & ~mask) and np.all(frames.sum(1) >= 1)
  assert np.any(frames.sum(1) < lengths), "every frame masked: not a partial mask"
  assert ce[1] == frames.sum()
  nll = -np.take_along_axis(numpy_log_softmax(logits), tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(ce[0], nll[frames].sum(), rtol=1e-5)
  # Masked frames' tokens do not reach the decoder (no leak); unmasked ones are its inputs.
  leaked = np.where(frames, (tokens + 1) % 16, tokens)
  np.testing.assert_array_equal(predict(leaked)[0], logits)
  row, col = np.argwhere(mask & ~frames)[0]
  moved = tokens.copy()
  moved[row, col] = (moved[row, col] + 1) % 16
  assert np.abs(predict(moved)[0] - logits).max() > 1e-6
  # The other key draws another mask; the continuous terms count the same frames as the CE.
  assert not np.array_equal(predict(tokens, key=8)[1], frames)
  batch = dict(speaker_motion=jnp.asarray(rng.normal(size=(b, t, 56)).astype(np.float32)),
               listener_motion=jnp.asarray(rng.normal(size=(b, t, 56)).astype(np.float32)),
               speaker_audio=jnp.asarray(rng.normal(size=(b, t, 768)).astype(np.float32)),
               mask=jnp.asarray(mask))
  terms = jax.jit(lambda p, x: task._forward(p, x, jax.random.PRNGKey(0), train=True))(
      params, batch)
  assert 0 < float(terms["ce_listener"][1]) < mask.sum()
  assert float(terms["continuous_pose_listener"][1]) == float(terms["ce_listener"][1])
  # 'all' (the one-pass training) still predicts every valid frame.
  _, all_frames, all_ce = predict(tokens, schedule="all")
  np.testing.assert_array_equal(all_frames, mask)
  assert all_ce[1] == mask.sum()


def test_windows_continue_the_token_stream():
  """A partly masked model is given frame 0's token and each window's overlap tokens: the
  windows form one stream (K passes each)."""
  task, params = _task(), _params()
  gen = generate.Generator(task=task, params=params, window=WINDOW, overlap=OVERLAP,
                           sampling=sampler.SamplingConfig(temperature=1.0, top_k_fraction=0.0),
                           iterative=sampler.IterativeConfig(iterations=4))
  rng = np.random.default_rng(3)
  frames = 40  # 3 windows of 16, hop 12
  batch = dict(speaker_motion=rng.normal(size=(2, frames, 56)).astype(np.float32),
               speaker_audio=rng.normal(size=(2, frames, 768)).astype(np.float32),
               listener_motion=rng.normal(size=(2, frames, 56)).astype(np.float32),
               mask=np.arange(frames)[None, :] < np.array([[40], [30]]))
  out = gen(batch, jax.random.PRNGKey(1), num_samples=2, start="first_frame")
  windows = out["window_tokens"]
  assert windows.shape == (2, 2, 3, WINDOW)
  np.testing.assert_array_equal(windows[:, :, 1:, :OVERLAP],
                                windows[:, :, :-1, WINDOW - OVERLAP:])
  first = generate._first_tokens(gen, gen.params, jnp.asarray(batch["listener_motion"][:, 0]),
                                 jnp.asarray(True), num_samples=2)
  np.testing.assert_array_equal(windows[:, :, 0, 0], np.asarray(first).reshape(2, 2))
  # The two samples of a clip differ (independent draws per row).
  assert not np.array_equal(windows[:, 0], windows[:, 1])
  one = generate.Generator(task=task, params=params, window=WINDOW, overlap=OVERLAP,
                           sampling=gen.sampling, iterative=sampler.IterativeConfig(iterations=1))
  assert one != gen and hash(one) != hash(gen)  # K is static: its own compiled step
