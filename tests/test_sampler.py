"""Tests for dim_jax.sampler: filters vs x-transformers, sampling law, cached generation."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dim_jax import sampler as gen
from dim_jax.models.transformer import TokenDecoder

VOCAB, DIM, DEPTH, HEADS, DIM_HEAD, MAX_LEN = 24, 32, 2, 2, 16, 64
CTX_LEN = 10
GREEDY = gen.SamplingConfig(temperature=0.0)
# Jitted once per (shape, config): eager dispatch of the sort/scatter ops costs more.
_filter = jax.jit(gen.filter_logits, static_argnums=1)
_sample = jax.jit(gen.sample_next, static_argnums=2)


def _decoder(use_abs_pos_emb):
  return TokenDecoder(VOCAB, DIM, DEPTH, HEADS, MAX_LEN, use_abs_pos_emb=use_abs_pos_emb,
                      dim_head=DIM_HEAD)


@functools.lru_cache(maxsize=None)
def _params_with_pos():
  """Random params drawn in NumPy on the init shapes (a jitted `init` costs seconds here)."""
  dec = _decoder(True)
  shapes = jax.eval_shape(dec.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32),
                          jnp.zeros((1, CTX_LEN, DIM)))["params"]
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":  # torch Linear init range.
      bound = 1.0 / np.sqrt(leaf.shape[0])
      return rng.uniform(-bound, bound, leaf.shape).astype(np.float32)
    if name == "bias":
      return rng.uniform(-0.1, 0.1, leaf.shape).astype(np.float32)
    if name == "scale":  # norms at 1 +- noise.
      return (1.0 + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
    if name == "token_emb":
      # 8x the torch init std sqrt(2/dim): at init the embedding is small next to the rest
      # and greedy decoding tends to repeat one token; a larger one makes the argmax move
      # with the input, so that token-for-token equality tests something.
      return (8.0 * np.sqrt(2.0 / DIM) * rng.standard_normal(leaf.shape)).astype(np.float32)
    return rng.standard_normal(leaf.shape).astype(np.float32)  # pos_emb: N(0, 1) as torch.

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def _setup(use_abs_pos_emb):
  """(decoder, params, context [3, M, dim], context_mask [3, M]) shared by the tests."""
  params = dict(_params_with_pos())
  if not use_abs_pos_emb:
    del params["pos_emb"]  # the only parameter that differs.
  ctx = jnp.asarray(np.random.default_rng(1).standard_normal((3, CTX_LEN, DIM)), jnp.float32)
  # Row 0: full context; row 1: padded after 4 frames; row 2: no valid frame at all.
  mask = jnp.asarray(np.arange(CTX_LEN)[None, :] < np.array([CTX_LEN, 4, 0])[:, None])
  return _decoder(use_abs_pos_emb), params, ctx, mask


def _run(dec, params, length, sampling, first, ctx, mask, rng, cached=True):
  fn = gen.make_generate_fn(dec, length, sampling, cached=cached)
  return np.asarray(fn(params, first, ctx, mask, rng))


FIRST = jnp.array([0, 5, 11], jnp.int32)


# Cached vs uncached generation.


@pytest.mark.parametrize("use_abs_pos_emb,length", [(True, 2), (True, 33), (False, 40)])
def test_cached_greedy_equals_uncached(use_abs_pos_emb, length):
  dec, params, ctx, mask = _setup(use_abs_pos_emb)
  rng = jax.random.PRNGKey(3)
  cached = _run(dec, params, length, GREEDY, FIRST, ctx, mask, rng)
  ref = _run(dec, params, length, GREEDY, FIRST, ctx, mask, rng, cached=False)
  assert cached.shape == (3, length) and cached.dtype == np.int32
  np.testing.assert_array_equal(cached[:, 0], np.asarray(FIRST))
  np.testing.assert_array_equal(cached, ref)
  assert np.all((cached[:, 1:] >= 0) & (cached[:, 1:] < VOCAB))
  # Independent of both loops: one teacher-forced pass over the finished sequence must
  # predict each token from its prefix (x-transformers' loop, by causality).
  logits = jax.jit(dec.apply)({"params": params}, jnp.asarray(cached), ctx, mask)
  np.testing.assert_array_equal(np.argmax(np.asarray(logits[:, :-1]), -1), cached[:, 1:])
  if length >= 9:
    for row in cached:  # not a constant sequence: the comparison is not vacuous.
      assert len(set(row[1:].tolist())) > 1, row


PROMPT = jnp.array([[0, 5, 11, 7, 2, 19], [3, 3, 8, 1, 0, 4], [12, 6, 6, 9, 23, 1]], jnp.int32)


def test_prompt_positions_hold_the_prompt_and_cached_equals_uncached():
  # Per-row prompt lengths (traced): rows get 6, 1 and 4 given tokens; the rest is sampled.
  dec, params, ctx, mask = _setup(True)
  rng = jax.random.PRNGKey(3)
  lengths = jnp.array([6, 1, 4], jnp.int32)
  fast = gen.make_generate_fn(dec, 20, GREEDY)
  slow = gen.make_generate_fn(dec, 20, GREEDY, cached=False)
  cached = np.asarray(fast(params, PROMPT, ctx, mask, rng, prompt_length=lengths))
  np.testing.assert_array_equal(cached, slow(params, PROMPT, ctx, mask, rng,
                                             prompt_length=lengths))
  for row, n in enumerate([6, 1, 4]):
    np.testing.assert_array_equal(cached[row, :n], np.asarray(PROMPT)[row, :n])
  # Greedy continuation of the prompt: the teacher-forced pass predicts every token after it
  # from its prefix, so positions >= prompt_length really are sampled from the model.
  logits = jax.jit(dec.apply)({"params": params}, jnp.asarray(cached), ctx, mask)
  predicted = np.argmax(np.asarray(logits[:, :-1]), -1)
  for row, n in enumerate([6, 1, 4]):
    np.testing.assert_array_equal(predicted[row, n - 1:], cached[row, n:])
  # Row 0's given tokens are not what greedy sampling would have produced (not vacuous).
  free = np.asarray(fast(params, PROMPT[:, :1], ctx, mask, rng))
  assert not np.array_equal(free[0, :6], cached[0, :6])
  # A prompt of length 1 is the first_tokens API, bit for bit; the same executable serves
  # every traced prompt length.
  np.testing.assert_array_equal(np.asarray(fast(params, PROMPT, ctx, mask, rng,
                                                prompt_length=jnp.ones(3, jnp.int32))), free)


def test_prompt_with_sampling_keeps_the_noise_of_each_position():
  # The draw of position t uses fold_in(rng, t) whether or not earlier positions were given:
  # a prompt equal to the tokens sampled without it reproduces the same continuation.
  dec, params, ctx, mask = _setup(True)
  sampling = gen.SamplingConfig()
  fn = gen.make_generate_fn(dec, 16, sampling)
  rng = jax.random.PRNGKey(8)
  free = np.asarray(fn(params, FIRST, ctx, mask, rng))
  prompted = np.asarray(fn(params, jnp.asarray(free), ctx, mask, rng, prompt_length=5))
  np.testing.assert_array_equal(prompted, free)
  slow = gen.make_generate_fn(dec, 16, sampling, cached=False)
  other = jnp.asarray(np.roll(free, 1, axis=0))
  np.testing.assert_array_equal(fn(params, other, ctx, mask, rng, prompt_length=5),
                                slow(params, other, ctx, mask, rng, prompt_length=5))


def test_prompt_arguments_are_checked():
  dec, params, ctx, mask = _setup(True)
  kwargs = dict(length=8, context=ctx, context_mask=mask, rng=jax.random.PRNGKey(0),
                sampling=GREEDY)
  with pytest.raises(ValueError, match="exactly one"):
    gen.generate_tokens(dec, params, first_tokens=FIRST, prompt_tokens=PROMPT, **kwargs)
  with pytest.raises(ValueError, match="exactly one"):
    gen.generate_tokens(dec, params, **kwargs)
  with pytest.raises(ValueError, match="P <= length"):
    gen.generate_tokens(dec, params, prompt_tokens=jnp.zeros((3, 9), jnp.int32), **kwargs)


def test_length_one_and_too_long():
  dec, params, ctx, mask = _setup(True)
  out = gen.generate_tokens(dec, params, first_tokens=FIRST, length=1, context=ctx,
                            context_mask=mask, rng=jax.random.PRNGKey(0), sampling=GREEDY)
  np.testing.assert_array_equal(out, np.asarray(FIRST)[:, None])
  with pytest.raises(ValueError, match="max_seq_len"):
    gen.generate_tokens(dec, params, first_tokens=FIRST, length=MAX_LEN + 1, context=ctx,
                        context_mask=mask, rng=jax.random.PRNGKey(0), sampling=GREEDY)


def test_masked_context_frames_are_ignored():
  dec, params, ctx, mask = _setup(False)
  rng = jax.random.PRNGKey(3)
  sampling = GREEDY  # same compiled function as a greedy test above.
  base = _run(dec, params, 40, sampling, FIRST, ctx, mask, rng)
  noise = 100.0 * np.random.default_rng(2).standard_normal(ctx.shape).astype(np.float32)
  garbage = jnp.where(mask[..., None], ctx, noise)
  out = _run(dec, params, 40, sampling, FIRST, garbage, mask, rng)
  np.testing.assert_array_equal(out[:2], base[:2])
  # Row 2 has no valid frame: as in x-transformers (masked scores = -finfo.max, not -inf)
  # its cross-attention is uniform over all frames, so the padding values do matter there.
  assert not np.array_equal(out[2], base[2])
  # ...while a valid frame does matter (the context reaches the logits at all).
  changed = ctx.at[0, 0].set(100.0)
  assert not np.array_equal(_run(dec, params, 40, sampling, FIRST, changed, mask, rng)[0],
                            base[0])


@pytest.mark.parametrize("use_abs_pos_emb,sampling", [
    (True, gen.SamplingConfig()),  # official: temperature 1, top-k 10% (3 of 24).
    (False, gen.SamplingConfig(temperature=1.3, top_k=0, top_k_fraction=0.0)),
    (True, gen.SamplingConfig(temperature=0.8, top_k=10, top_p=0.9)),
])
def test_cached_sampling_equals_uncached(use_abs_pos_emb, sampling):
  dec, params, ctx, mask = _setup(use_abs_pos_emb)
  # Compiled once; several keys reuse it.
  fast = gen.make_generate_fn(dec, 25, sampling)
  slow = gen.make_generate_fn(dec, 25, sampling, cached=False)
  for seed in (0, 1):
    rng = jax.random.PRNGKey(seed)
    cached = np.asarray(fast(params, FIRST, ctx, mask, rng))
    np.testing.assert_array_equal(cached, slow(params, FIRST, ctx, mask, rng))
    for row in cached:
      assert len(set(row[1:].tolist())) > 1, row


def test_partial_jit_matches_make_generate_fn():
  # The documented alternative to make_generate_fn.
  dec, params, ctx, mask = _setup(True)
  sampling = gen.SamplingConfig()
  fn = jax.jit(functools.partial(gen.generate_tokens, dec, length=12, sampling=sampling))
  rng = jax.random.PRNGKey(7)
  out = fn({"params": params}, first_tokens=FIRST, context=ctx, context_mask=mask, rng=rng)
  np.testing.assert_array_equal(out, _run(dec, params, 12, sampling, FIRST, ctx, mask, rng))


# Filters against x-transformers.


def _np_top_k(logits, k=None, frac=0.1):
  """NumPy transcription of x_transformers.autoregressive_wrapper.top_k."""
  n = logits.shape[-1]
  k = math.ceil(frac * n) if k is None else k
  k = min(k, n)
  out = np.full_like(logits, -np.inf)
  ind = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
  np.put_along_axis(out, ind, np.take_along_axis(logits, ind, -1), -1)
  return out


def _np_top_p(logits, thres):
  """NumPy transcription of x_transformers.autoregressive_wrapper.top_p (float64 maths)."""
  order = np.argsort(-logits, axis=-1, kind="stable")
  srt = np.take_along_axis(logits, order, -1).astype(np.float64)
  e = np.exp(srt - srt[:, :1])
  cum = np.cumsum(e / e.sum(-1, keepdims=True), -1)
  remove = cum > thres
  remove = np.concatenate([np.zeros_like(remove[:, :1]), remove[:, :-1]], -1)  # pad (1, -1)
  srt = np.where(remove, -np.inf, srt).astype(logits.dtype)
  out = np.empty_like(logits)
  np.put_along_axis(out, order, srt, -1)
  return out


def _random_logits(seed, b, v, scale=3.0):
  return (scale * np.random.default_rng(seed).standard_normal((b, v))).astype(np.float32)


def test_top_k_fraction_count():
  assert gen.SamplingConfig().num_kept(512) == 52
  assert gen.SamplingConfig().num_kept(24) == 3
  # Python float product, as x-transformers: 0.07 * 100 == 7.000000000000001 -> 8.
  assert gen.SamplingConfig(top_k_fraction=0.07).num_kept(100) == 8
  assert gen.SamplingConfig(top_k=7).num_kept(512) == 7
  assert gen.SamplingConfig(top_k=700).num_kept(512) == 512
  assert gen.SamplingConfig(top_k_fraction=0.0).num_kept(512) is None


@pytest.mark.parametrize("sampling,ref", [
    (gen.SamplingConfig(), lambda x: _np_top_k(x, frac=0.1)),
    (gen.SamplingConfig(top_k_fraction=0.25), lambda x: _np_top_k(x, frac=0.25)),
    (gen.SamplingConfig(top_k=5), lambda x: _np_top_k(x, k=5)),
    (gen.SamplingConfig(top_k_fraction=0.0, top_p=0.9), lambda x: _np_top_p(x, 0.9)),
    (gen.SamplingConfig(top_k_fraction=0.0, top_p=0.3), lambda x: _np_top_p(x, 0.3)),
    (gen.SamplingConfig(top_k=40, top_p=0.8), lambda x: _np_top_p(_np_top_k(x, k=40), 0.8)),
    (gen.SamplingConfig(top_k_fraction=0.0), lambda x: x),
])
def test_filter_logits_matches_numpy(sampling, ref):
  logits = _random_logits(0, 8, 512)
  ours = np.asarray(_filter(jnp.asarray(logits), sampling))
  expected = ref(logits)
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
  np.testing.assert_array_equal(ours, expected)
  k = sampling.num_kept(512)
  if k is not None and not sampling.top_p:
    assert np.all(np.isfinite(ours).sum(-1) == k)  # 52 for the official 10% of 512.


def test_top_p_keeps_first_token_above_threshold():
  # probs 0.5, 0.3, 0.15, 0.05: cum 0.5, 0.8, 0.95, 1.0.
  logits = np.log(np.array([[0.15, 0.5, 0.05, 0.3]], np.float32))
  top_p = jax.jit(gen.top_p_filter)  # threshold traced: one compile.
  f = lambda p: np.isfinite(np.asarray(top_p(jnp.asarray(logits), p)))[0].tolist()
  assert f(0.6) == [False, True, False, True]  # 0.5 < 0.6, the 0.3 entry crosses: kept.
  assert f(0.4) == [False, True, False, False]  # the top token alone crosses.
  assert f(0.01) == [False, True, False, False]  # the top token always survives.
  assert f(0.9) == [True, True, False, True]
  assert f(1.0) == [True, True, True, True]


def test_filters_match_x_transformers():
  torch = pytest.importorskip("torch")
  ar = pytest.importorskip("x_transformers.autoregressive_wrapper")
  cases = [  # (vocab, ours, theirs); each config compiles once, so keep the list short.
      (512, gen.SamplingConfig(), lambda t: ar.top_k(t, frac_num_tokens=0.1)),
      (30, gen.SamplingConfig(), lambda t: ar.top_k(t, frac_num_tokens=0.1)),
      (512, gen.SamplingConfig(top_k_fraction=0.5), lambda t: ar.top_k(t, frac_num_tokens=0.5)),
      (512, gen.SamplingConfig(top_k=3), lambda t: ar.top_k(t, k=3)),
      (512, gen.SamplingConfig(top_k_fraction=0.0, top_p=0.9), lambda t: ar.top_p(t, thres=0.9)),
      (30, gen.SamplingConfig(top_k_fraction=0.0, top_p=0.5), lambda t: ar.top_p(t, thres=0.5)),
  ]
  for seed, (v, sampling, theirs) in enumerate(cases):
    logits = _random_logits(seed, 6, v)
    np.testing.assert_array_equal(np.asarray(_filter(jnp.asarray(logits), sampling)),
                                  theirs(torch.from_numpy(logits)).numpy())


# Sampling law.


def test_top_k_one_is_greedy():
  logits = jnp.asarray(_random_logits(3, 64, 50))
  greedy = _sample(jax.random.PRNGKey(0), logits, GREEDY)
  np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), -1))
  for seed in range(3):
    for temperature in (0.5, 1.0, 3.0):
      s = gen.SamplingConfig(temperature=temperature, top_k=1)
      np.testing.assert_array_equal(_sample(jax.random.PRNGKey(seed), logits, s), greedy)


def test_greedy_ignores_filter():
  # x-transformers: greedy takes argmax of the raw logits; the filter never runs.
  logits = jnp.asarray(_random_logits(4, 16, 30))
  s = gen.SamplingConfig(temperature=0.0, top_k=2, top_p=0.1)
  np.testing.assert_array_equal(_sample(jax.random.PRNGKey(0), logits, s),
                                np.argmax(np.asarray(logits), -1))


@pytest.mark.parametrize("sampling", [
    gen.SamplingConfig(temperature=1.0, top_k_fraction=0.0),
    gen.SamplingConfig(temperature=0.7, top_k=4),
    gen.SamplingConfig(temperature=1.5, top_k_fraction=0.5),  # ceil(0.5 * 6) = 3 kept.
    gen.SamplingConfig(temperature=1.0, top_k_fraction=0.0, top_p=0.8),
])
def test_sampling_frequencies(sampling):
  logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 1.7], np.float32)
  n = 200_000
  draws = _sample(jax.random.PRNGKey(11), jnp.broadcast_to(jnp.asarray(logits), (n, 6)),
                          sampling)
  counts = np.bincount(np.asarray(draws), minlength=6)
  filtered = np.asarray(_filter(jnp.asarray(logits[None]), sampling))[0]
  z = filtered.astype(np.float64) / sampling.temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  assert np.all(counts[p == 0] == 0)
  std = np.sqrt(n * p * (1 - p))
  np.testing.assert_array_less(np.abs(counts - n * p), 5 * std + 1e-9)


# Several samples per input.


def test_repeat_and_split_layout():
  tree = {"a": np.arange(6).reshape(3, 2), "b": jnp.arange(3), "none": None}
  rep = gen.repeat_for_samples(tree, 4)
  assert isinstance(rep["a"], np.ndarray) and rep["none"] is None
  assert rep["a"].shape == (12, 2) and rep["b"].shape == (12,)
  for b in range(3):
    for k in range(4):
      np.testing.assert_array_equal(rep["a"][b * 4 + k], tree["a"][b])
      assert int(rep["b"][b * 4 + k]) == b
  split = gen.split_samples(rep["a"], 4)
  assert split.shape == (3, 4, 2)
  np.testing.assert_array_equal(split[:, 2], tree["a"])
  with pytest.raises(ValueError):
    gen.split_samples(rep["a"], 5)


def test_samples_differ_and_are_reproducible():
  dec, params, ctx, mask = _setup(True)
  n = 4
  inputs = gen.repeat_for_samples((FIRST, ctx, mask), n)
  sampling = gen.SamplingConfig()
  fn = gen.make_generate_fn(dec, 16, sampling)
  out = gen.split_samples(np.asarray(fn(params, *inputs, jax.random.PRNGKey(5))), n)
  again = gen.split_samples(np.asarray(fn(params, *inputs, jax.random.PRNGKey(5))), n)
  other = gen.split_samples(np.asarray(fn(params, *inputs, jax.random.PRNGKey(6))), n)
  assert out.shape == (3, n, 16)
  np.testing.assert_array_equal(out, again)
  assert not np.array_equal(out, other)
  for b in range(3):
    np.testing.assert_array_equal(out[b, :, 0], int(FIRST[b]))
    assert len({tuple(row) for row in out[b].tolist()}) == n  # all n samples distinct.


# Config.


def test_config_round_trip():
  from dim_jax import config_lib  # the generate phase's config holds the official defaults
  cfg = config_lib.generate_config().generate.sampling
  assert gen.SamplingConfig.from_config(cfg) == gen.SamplingConfig()
  assert gen.SamplingConfig().to_dict() == {"temperature": 1.0, "top_k": 0,
                                            "top_k_fraction": 0.1, "top_p": 0.0}
  custom = ml_collections.ConfigDict({"temperature": 0, "top_k": 5.0, "top_p": 0.9})
  s = gen.SamplingConfig.from_config(custom)
  assert s == gen.SamplingConfig(temperature=0.0, top_k=5, top_p=0.9) and s.greedy
  assert isinstance(s.top_k, int) and isinstance(s.temperature, float)
  assert gen.SamplingConfig.from_config(ml_collections.ConfigDict(s.to_dict())) == s
  hash(s)  # static jit argument.


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "hot"),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True),
    ("top_k_fraction", -0.1), ("top_k_fraction", 1.5),
    ("top_p", -0.5), ("top_p", 1.01), ("top_p", float("inf")),
])
def test_bad_config_values_raise(field, value):
  with pytest.raises(ValueError, match=field):
    gen.SamplingConfig.from_config(ml_collections.ConfigDict({field: value}))
  with pytest.raises(ValueError, match=field):
    gen.SamplingConfig(**{field: value})


def test_unknown_config_field_raises():
  with pytest.raises(ValueError, match="topk"):
    gen.SamplingConfig.from_config({"topk": 3})


def test_sampler_compiles_once_per_shape():
  # Recompilation guard: new rngs, first tokens and contexts of the same shapes reuse the
  # compiled sampler; only a new shape (here the length) may trace again.
  import chex  # pylint: disable=g-import-not-at-top
  dec, params, ctx, mask = _setup(True)
  guarded = jax.jit(chex.assert_max_traces(gen.generate_tokens, n=1), **gen._STATIC)
  outs = []
  for seed in range(3):
    out = guarded(dec, params, first_tokens=(FIRST + seed) % VOCAB, length=12, context=ctx + seed,
                  context_mask=mask, rng=jax.random.PRNGKey(seed), sampling=GREEDY)
    chex.assert_shape(out, (3, 12))
    chex.assert_type(out, jnp.int32)
    outs.append(np.asarray(out))
  assert not np.array_equal(outs[0], outs[1])  # the inputs really changed
  with pytest.raises(AssertionError, match="traced"):
    guarded(dec, params, first_tokens=FIRST, length=13, context=ctx, context_mask=mask,
            rng=jax.random.PRNGKey(0), sampling=GREEDY)


def test_factorised_decoder_equals_the_flat_decoder_of_summed_rows():
  # token_factors (P, E): token t = (t // E, t % E). A flat decoder whose embedding row t is
  # the sum of the two codes' rows and whose logit column t is the sum of their columns must
  # compute the same logits, for code ids and for the special (start) id past the vocabulary.
  pose, size, special = 3, 5, 1
  vocab = pose * size
  factorised = TokenDecoder(vocab, DIM, 1, HEADS, MAX_LEN, dim_head=DIM_HEAD,
                            num_input_tokens=vocab + special, token_factors=(pose, size))
  flat = factorised.clone(token_factors=())
  rng = np.random.default_rng(7)
  tokens = jnp.asarray(rng.integers(0, vocab + special, (3, 9)), jnp.int32)
  context = jnp.asarray(rng.normal(size=(3, CTX_LEN, DIM)), jnp.float32)
  params = factorised.init(jax.random.PRNGKey(0), tokens, context)["params"]
  emb, kernel = np.asarray(params["token_emb"]), np.asarray(params["to_logits"]["kernel"])
  assert emb.shape == (pose + size + special, DIM) and kernel.shape == (DIM, pose + size)
  first, second = np.arange(vocab) // size, pose + np.arange(vocab) % size
  flat_params = dict(params, token_emb=np.concatenate([emb[first] + emb[second],
                                                       emb[pose + size:]]),
                     to_logits={"kernel": kernel[:, first] + kernel[:, second]})
  expected = np.asarray(flat.apply({"params": flat_params}, tokens, context))
  got = np.asarray(factorised.apply({"params": params}, tokens, context))
  assert got.shape == (3, 9, vocab)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # The incremental step (generation) gives the same logits as the full pass.
  cache = factorised.init_cache(3, MAX_LEN)
  stepped, _ = factorised.apply({"params": params}, tokens, jnp.int32(0), cache, context,
                                method=TokenDecoder.decode_step)
  np.testing.assert_allclose(np.asarray(stepped), got, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="product"):
    TokenDecoder(24, DIM, 1, HEADS, MAX_LEN, token_factors=(5, 5)).init(
        jax.random.PRNGKey(0), tokens % 24, context)
