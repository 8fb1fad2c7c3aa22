"""Streaming DIM-Listener (dim_jax/streaming.py) and the causal-context decoder, tiny models.

A DIM-Listener task from the tiny configs narrowed further (as tests/test_generate.py), random
params, normalization statistics far from the identity (mean 5, std 4). Window 16, overlap 4
(hop 12): a 45-frame clip spans 4 windows (3 window switches).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dim_jax import config_lib, generate, sampler, streaming
from dim_jax.data import normalization as normalization_lib
from dim_jax.data import pipeline
from dim_jax.models import dim as dim_lib
from dim_jax.models import transformer, vqvae
from helpers import params as params_helper
from helpers import tiny_dim

WINDOW, OVERLAP = 16, 4
FRAMES = 45
SAMPLING = sampler.SamplingConfig(temperature=1.0, top_k_fraction=0.0)
MEAN, STD = 5.0, 4.0
RNG = jax.random.PRNGKey(3)


def _normalization():
  widths = {"speaker_motion": 56, "listener_motion": 56, "speaker_audio": 768}
  return normalization_lib.Normalization(
      means=tuple((s, (MEAN,) * w) for s, w in widths.items()),
      stds=tuple((s, (STD,) * w) for s, w in widths.items()))


@functools.lru_cache(maxsize=None)
def _generator(start="ground_truth", causal_context=True, overlap=OVERLAP, context_lag=0):
  config = tiny_dim.finetune_config(WINDOW, start=start, causal_context=causal_context,
                                    context_lag=context_lag)
  task = tiny_dim.task(config, _normalization())
  abstract = jax.eval_shape(functools.partial(task.init_params, jax.random.PRNGKey(0)),
                            pipeline.dummy_batch(1))
  params = jax.tree.map(jnp.asarray, params_helper.random_params(abstract, 0, bias_scale=0.1))
  return generate.Generator(task=task, params=params, sampling=SAMPLING, window=WINDOW,
                            overlap=overlap)


def _clip(seed=0, frames=FRAMES):
  rng = np.random.default_rng(seed)
  speaker = (rng.normal(size=(frames, 56)) * STD + MEAN).astype(np.float32)
  audio = (rng.normal(size=(frames, 768)) * STD + MEAN).astype(np.float32)
  first = (rng.normal(size=(56,)) * STD + MEAN).astype(np.float32)
  return speaker, audio, first


def _stream(listener, speaker, audio, first=None, rng=RNG):
  listener.reset(rng, first_frame=first)
  return np.stack([listener.push(s, a) for s, a in zip(speaker, audio)])


# The window as history (the default: the VQ decode slides once t >= W) and a history
# holding every token (so the stream's whole token sequence can be read back).
@pytest.mark.parametrize("start,first,history", [("ground_truth", True, None),
                                                 ("start_token", False, FRAMES)])
def test_stream_equals_offline_causal_generation(start, first, history):
  gen = _generator(start)
  speaker, audio, first_frame = _clip(1)
  first_frame = first_frame if first else None
  listener = streaming.StreamingListener(gen, history=history)
  streamed = _stream(listener, speaker, audio, first_frame)
  offline = streaming.causal_generate(gen, speaker, audio, RNG, first_frame=first_frame,
                                      history=history, chunk=48)
  kept = listener.history
  np.testing.assert_array_equal(np.asarray(listener.state["history"]), offline["tokens"][-kept:])
  np.testing.assert_allclose(streamed, offline["motion"], atol=1e-4, rtol=1e-5)
  # The VQ decoder is not causal: the Generator's whole-window decodes of the same tokens
  # (which also see later tokens) differ from the stream's history decodes.
  assert np.abs(offline["motion"] - offline["offline_motion"]).max() > 1e-3


@pytest.mark.parametrize("start", ["ground_truth", "start_token"])
def test_stream_equals_offline_with_the_widest_overlap(start):
  """Overlap = window / 2: the next window starts filling (its first overlap frame) at the
  very push that promotes the current one."""
  gen = _generator(start, overlap=WINDOW // 2)
  speaker, audio, first_frame = _clip(2)
  first_frame = first_frame if start == "ground_truth" else None
  listener = streaming.StreamingListener(gen, history=FRAMES)
  streamed = _stream(listener, speaker, audio, first_frame)
  offline = streaming.causal_generate(gen, speaker, audio, RNG, first_frame=first_frame,
                                      history=FRAMES, chunk=48)
  np.testing.assert_array_equal(np.asarray(listener.state["history"]), offline["tokens"])
  np.testing.assert_allclose(streamed, offline["motion"], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("overlap", [OVERLAP, WINDOW // 2])
def test_pipelined_stream_equals_offline_causal_generation(overlap):
  """model.context_lag=1: each push returns the frame computed one push earlier and starts
  the next; the frames are those of the offline causal generation (4 windows)."""
  gen = _generator(overlap=overlap, context_lag=1)
  speaker, audio, first = _clip(6)
  listener = streaming.StreamingListener(gen, history=FRAMES + 1)
  assert listener.pipelined
  streamed = _stream(listener, speaker, audio, first)
  offline = streaming.causal_generate(gen, speaker, audio, RNG, first_frame=first,
                                      history=FRAMES + 1, chunk=48)
  # The state is one frame ahead: the 45 frames' tokens and the next one's.
  np.testing.assert_array_equal(np.asarray(listener.state["history"])[:FRAMES],
                                offline["tokens"])
  np.testing.assert_allclose(streamed, offline["motion"], atol=1e-4, rtol=1e-5)


def test_pipelined_frame_is_ready_before_its_speaker_frame():
  """With model.context_lag=1 the frame a push returns does not depend on the frame pushed
  with it (nor on later ones); the next frame does."""
  gen = _generator(context_lag=1)
  speaker, audio, first = _clip(7)
  listener = streaming.StreamingListener(gen)
  a = _stream(listener, speaker, audio, first)
  t = 20  # window 1
  changed_speaker, changed_audio = speaker.copy(), audio.copy()
  changed_speaker[t:] += 3.0 * STD
  changed_audio[t:] += 3.0 * STD
  b = _stream(listener, changed_speaker, changed_audio, first)
  np.testing.assert_array_equal(a[:t + 1], b[:t + 1])
  assert np.abs(a[t + 1:] - b[t + 1:]).max() > 1e-3


def test_history_decoding_matches_a_direct_decode():
  """Independent derivation of `decode_histories`: decode each history alone, take its end."""
  gen = _generator()
  tokens = np.random.default_rng(0).integers(0, 16, size=20).astype(np.int32)
  history = 6
  got = streaming.decode_histories(gen, tokens, history, chunk=8)
  decode = jax.jit(lambda window: gen.task.listener_vq.apply(
      {"params": gen.params["listener_vq"]}, window[None], jnp.ones((1, window.shape[0]), bool),
      method=vqvae.VQVAE.decode_tokens)[0, -1])
  for t in (2, 5, 19):  # a short history (alone, unpadded) and full ones
    window = tokens[max(0, t - history + 1):t + 1]
    np.testing.assert_allclose(got[t], np.asarray(decode(window)) * STD + MEAN, atol=1e-4)


@pytest.mark.parametrize("start,causal_context,lag", [
    ("ground_truth", True, 0), ("start_token", True, 0), ("ground_truth", False, 0),
    ("start_token", False, 0), ("ground_truth", True, 1), ("start_token", True, 2)])
def test_future_speaker_frames_reach_the_past_only_without_causal_context(start, causal_context,
                                                                          lag):
  """Teacher-forced logits of the frames <= t + lag are unchanged by speaker frames > t
  exactly when model.causal_context (the shift follows model.start: position p predicts
  frame p + 1 - offset; model.context_lag = lag frames of reaction lag)."""
  gen = _generator(start, causal_context, context_lag=lag)
  task, params = gen.task, gen.params
  speaker, audio, _ = _clip(2, WINDOW)
  changed_speaker = speaker.copy()
  t = 7
  changed_speaker[t + 1:] += 3.0 * STD
  offset = 1 if start == "start_token" else 0
  tokens = np.random.default_rng(1).integers(0, 16, size=(1, WINDOW - 1 + offset))
  mask = np.ones((1, WINDOW), bool)

  @jax.jit
  def logits(speaker):
    norm = task.normalization
    batch = dict(speaker_motion=norm.normalize(speaker, "speaker_motion")[None],
                 speaker_audio=norm.normalize(audio, "speaker_audio")[None], mask=mask)
    context = task.conditioning(params, batch)
    return task.model.apply({"params": params["dim"]}, tokens, context, mask,
                            method=dim_lib.DIM.decode)[0]

  before, after = np.asarray(logits(speaker)), np.asarray(logits(changed_speaker))
  past = t + lag + offset  # positions p predicting frames p + 1 - offset <= t + lag
  if causal_context:
    np.testing.assert_allclose(after[:past], before[:past], atol=1e-5)
  else:
    assert np.abs(after[:past] - before[:past]).max() > 1e-3
  assert np.abs(after[past] - before[past]).max() > 1e-3  # the next frame does move


def test_stream_ignores_future_frames():
  """Tokens and motion <= t of the stream (and of its offline twin) do not depend on later
  speaker frames or audio, across window switches."""
  gen = _generator()
  speaker, audio, first = _clip(3)
  t = 30  # in window 2 (frames 24..39), after two switches
  other_speaker, other_audio, _ = _clip(4)
  speaker2 = np.concatenate([speaker[:t + 1], other_speaker[t + 1:]])
  audio2 = np.concatenate([audio[:t + 1], other_audio[t + 1:]])
  listener = streaming.StreamingListener(gen)
  a = _stream(listener, speaker, audio, first)
  b = _stream(listener, speaker2, audio2, first)
  np.testing.assert_array_equal(a[:t + 1], b[:t + 1])
  # (That later frames do reach the model is checked on the logits above.)
  offline_a = streaming.causal_generate(gen, speaker, audio, RNG, first_frame=first, chunk=48)
  offline_b = streaming.causal_generate(gen, speaker2, audio2, RNG, first_frame=first, chunk=48)
  np.testing.assert_array_equal(offline_a["tokens"][:t + 1], offline_b["tokens"][:t + 1])


def test_state_stays_bounded_and_compiles_once():
  gen = _generator()
  speaker, audio, first = _clip(5, 1000)
  listener = streaming.StreamingListener(gen)
  listener.reset(RNG, first_frame=first)
  for s, a in zip(speaker[:WINDOW + 1], audio[:WINDOW + 1]):  # through the first switch
    listener.push(s, a)
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), listener.state)
  jitted = (streaming._begin, streaming._step)  # pylint: disable=protected-access
  compiled = [fn._cache_size() for fn in jitted]  # pylint: disable=protected-access
  for s, a in zip(speaker[WINDOW + 1:], audio[WINDOW + 1:]):
    out = listener.push(s, a)
  assert listener.frames_pushed == 1000
  assert jax.tree.map(lambda x: (x.shape, x.dtype), listener.state) == shapes
  assert out.shape == (56,) and np.isfinite(out).all()
  # No compile as the stream advances.
  assert [fn._cache_size() for fn in jitted] == compiled  # pylint: disable=protected-access


def test_bad_inputs_are_named():
  listener = streaming.StreamingListener(_generator())
  with pytest.raises(ValueError, match=r"speaker_motion_frame has shape \(55,\)"):
    listener.push(np.zeros(55), np.zeros(768))
  with pytest.raises(ValueError, match=r"audio_frame has shape \(2, 768\)"):
    listener.push(np.zeros(56), np.zeros((2, 768)))
  with pytest.raises(ValueError, match="speaker_motion_frame has non-finite"):
    listener.push(np.full(56, np.nan), np.zeros(768))
  with pytest.raises(ValueError, match=r"first_frame has shape \(1, 56\)"):
    listener.reset(first_frame=np.zeros((1, 56)))
  with pytest.raises(ValueError, match="history=0"):
    streaming.StreamingListener(_generator(), history=0)
  assert listener.frames_pushed == 0  # rejected frames are not consumed
  with pytest.raises(ValueError, match="causal_context=False"):
    streaming.StreamingListener(_generator(causal_context=False))


def test_incremental_encoder_equals_the_causal_pass():
  encoder = transformer.ContinuousEncoder(dim=32, depth=2, heads=2, max_seq_len=16, dim_in=8,
                                          dim_out=32, dim_head=16)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 10, 8))
  variables = encoder.init(jax.random.PRNGKey(1), x)
  full = jax.jit(lambda x: encoder.apply(variables, x, causal=True))(x)
  step = jax.jit(lambda x, cache, i: encoder.apply(variables, x, cache=cache, cache_index=i))
  cache = encoder.init_cache(1, 12)
  first, cache = step(x[:, :4], cache, 0)  # a prefill
  rows = [first]
  for i in range(4, 10):
    row, cache = step(x[:, i:i + 1], cache, i)
    rows.append(row)
  np.testing.assert_allclose(np.concatenate(rows, axis=1), full, atol=1e-5)


def test_causal_context_config_and_official_default():
  assert config_lib.dim_config("finetune_listener").model.causal_context is False
  assert dim_lib.DIMConfig().context_shift is None
  assert dim_lib.DIMConfig(causal_context=True).context_shift == 1
  assert dim_lib.DIMConfig(causal_context=True, start="start_token").context_shift == 0
  assert dim_lib.DIMConfig(causal_context=True, context_lag=1).context_shift == 0
  with pytest.raises(ValueError, match="context_lag=1 needs model.causal_context"):
    dim_lib.DIMConfig(context_lag=1)
  with pytest.raises(ValueError, match="context_lag=-1"):
    dim_lib.DIMConfig(causal_context=True, context_lag=-1)
  with pytest.raises(ValueError, match="causal_context needs autoregressive"):
    dim_lib.DIMConfig(causal_context=True, decoding="parallel")
  # The parameter tree does not change.
  shapes = lambda g: jax.tree.map(lambda x: x.shape, g.params)
  assert shapes(_generator(causal_context=True)) == shapes(_generator(causal_context=False))
