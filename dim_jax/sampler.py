"""Autoregressive token sampling for DIM (x-transformers 1.30.16 `generate` semantics).

The official DIM code samples motion tokens with x-transformers'
`AutoregressiveWrapper.generate(prompts, seq_len, ...)` at its defaults, `temperature=1.` and
`filter_logits_fn=top_k`, i.e. `top_k(logits, frac_num_tokens=0.1)` (k = ceil(0.1 * 512) =
52 of the 512 codes), then `softmax(filtered / temperature)` and `torch.multinomial`.  This
module reproduces that in JAX (`SamplingConfig()` is that default):

* `filter_logits` = x-transformers `top_k` followed by `top_p` (each optional):
  - top_k keeps exactly k logits (`torch.topk` then scatter into a -inf row; k =
    `ceil(frac * vocab)` computed in Python floats, as x-transformers, capped at vocab);
  - top_p sorts descending, takes the cumulative softmax, removes entries whose cumulative
    probability is > threshold *shifted right by one* (so the first token that crosses the
    threshold is kept, and the top token always survives), and writes -inf elsewhere.
  x-transformers' `generate` only takes one filter function; applying top-k then top-p when
  both are set is our extension (the top-p softmax then runs on the top-k-filtered row).
* `sample_next`: temperature 0 is greedy `argmax` of the *unfiltered* logits (x-transformers
  skips the filter when greedy); otherwise a categorical draw from `filtered / temperature`.
  `jax.random.categorical` (Gumbel-max) and `torch.multinomial` draw from the same
  distribution, not the same numbers: samples match torch in law only.
* `generate_tokens`: the loop of `generate` with a self-attention KV cache, as one
  `jax.lax.scan`.  Position 0 holds `first_tokens` (the official code prompts with the
  ground-truth first token; a model trained with a start token uses its id instead, which
  may be >= num_tokens when `TokenDecoder.num_input_tokens` has extra rows); positions
  1..length-1 are sampled one at a time, step t feeding token t-1 at index t-1 through
  `TokenDecoder.decode_step` and drawing with `jax.random.fold_in(rng, t)`.  A longer prompt
  (`prompt_tokens` [B, P] with a possibly traced `prompt_length`, per row or shared) is fed
  instead of the draws at positions t < prompt_length, in the same scan: one executable
  whatever the prompt length (the sliding-window generation in `generate.py` prompts each
  window with the model's own tokens of the overlap).  The returned sequence includes the
  prompt (x-transformers returns only the new tokens: drop the prompt columns to get that).
  No eos handling (DIM generates fixed-length sequences).
* `generate_tokens_uncached`: the same loop recomputing the whole (causal) prefix with
  `TokenDecoder.__call__` every step; the slow reference used by tests.
* `iterative_decode` (not in x-transformers; MaskGIT, Chang et al. 2022): the parallel
  (bidirectional) decoder in K passes (`IterativeConfig`): each pass draws every masked
  position, keeps the most confident draws so that the masked count follows the schedule
  (cosine), and re-masks the rest; given tokens (a window's prompt) are never masked. One
  `lax.scan` over the passes.

Jitting: `decoder` (a Flax module, hashable), `length` and `sampling` (a frozen dataclass)
must be static.  Either `jax.jit(functools.partial(generate_tokens, decoder, length=L,
sampling=s))` or `make_generate_fn(decoder, L, s)`, whose functions share one module-level
jit cache (equal settings and shapes compile once per process).

Several samples per input: `repeat_for_samples(inputs, n)` puts n copies of every row in one
batch (row b*n + k is sample k of input b); all rows get independent noise because the
categorical draw is over the whole [B*n, V] array; `split_samples` reshapes the result to
[B, n, ...].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to draw each token (hashable: usable as a static jit argument).

  Attributes:
    temperature: softmax temperature; 0 = greedy argmax (x-transformers `temperature == 0.`).
    top_k: keep the k largest logits; 0 = off (then `top_k_fraction` applies).
    top_k_fraction: x-transformers `top_k(frac_num_tokens=...)`: k = ceil(frac * vocab),
      used when `top_k == 0`; 0 = off.  The official DIM setting is 0.1.
    top_p: nucleus threshold in (0, 1] applied after top-k; 0 = off.
  """
  temperature: float = 1.0
  top_k: int = 0
  top_k_fraction: float = 0.1
  top_p: float = 0.0

  def __post_init__(self):
    _check_finite("temperature", self.temperature)
    if self.temperature < 0:
      raise ValueError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)):
      raise ValueError(f"sampling.top_k must be an integer count, got {self.top_k!r}")
    if self.top_k < 0:
      raise ValueError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
    _check_finite("top_k_fraction", self.top_k_fraction)
    if not 0.0 <= self.top_k_fraction <= 1.0:
      raise ValueError(f"sampling.top_k_fraction must be in [0, 1] (0 = off), got "
                       f"{self.top_k_fraction}")
    _check_finite("top_p", self.top_p)
    if not 0.0 <= self.top_p <= 1.0:
      raise ValueError(f"sampling.top_p must be in [0, 1] (0 = off), got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def num_kept(self, vocab: int) -> Optional[int]:
    """k used by the top-k filter for a vocabulary of `vocab`, or None when off."""
    if self.top_k > 0:
      k = int(self.top_k)
    elif self.top_k_fraction > 0:
      # Python float product, exactly as x-transformers (ceil(0.1 * 30) == 4, not 3).
      k = math.ceil(self.top_k_fraction * vocab)
    else:
      return None
    return min(k, vocab)

  @classmethod
  def from_config(cls, cfg: Any) -> "SamplingConfig":
    """Builds from an `ml_collections.ConfigDict` (or mapping) with the field names.

    Missing fields keep their defaults; unknown keys raise ValueError (catches typos such
    as `topk`).  Values are validated by `__post_init__`.
    """
    items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(items) - names)
    if unknown:
      raise ValueError(f"unknown sampling config field(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for name in ("temperature", "top_k_fraction", "top_p"):
      if name in items:
        kwargs[name] = _as_float(name, items[name])
    if "top_k" in items:
      v = items["top_k"]
      # Accept integral floats (e.g. from a command-line override) but nothing fractional.
      if isinstance(v, (float, np.floating)) and float(v).is_integer():
        v = int(v)
      kwargs["top_k"] = v
    return cls(**kwargs)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _check_finite(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise ValueError(f"sampling.{name} must be a number, got {value!r}")
  if not math.isfinite(value):
    raise ValueError(f"sampling.{name} must be finite, got {value}")


def _as_float(name: str, value: Any) -> float:
  _check_finite(name, value)
  return float(value)


# Filtering.


def _scatter_rows(values: Array, indices: Array, fill: float, vocab: int) -> Array:
  """[B, k] values at [B, k] column indices of a [B, vocab] row filled with `fill`."""
  rows = jnp.arange(values.shape[0])[:, None]
  out = jnp.full((values.shape[0], vocab), fill, values.dtype)
  return out.at[rows, indices].set(values)


def top_k_filter(logits: Array, k: int) -> Array:
  """x-transformers `top_k(logits, k=k)`: exactly k entries kept (ties broken by index)."""
  vocab = logits.shape[-1]
  k = min(int(k), vocab)
  values, indices = jax.lax.top_k(logits, k)
  return _scatter_rows(values, indices, -jnp.inf, vocab)


def top_p_filter(logits: Array, thres: float) -> Array:
  """x-transformers `top_p(logits, thres)`: smallest descending prefix with mass > thres."""
  vocab = logits.shape[-1]
  # top_k over the whole row = a descending sort that also returns the permutation.
  sorted_logits, sorted_idx = jax.lax.top_k(logits, vocab)
  cum_probs = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
  remove = cum_probs > thres
  # F.pad(remove, (1, -1), value=False): shift right, so the first entry past the threshold
  # (and always the top entry) is kept.
  remove = jnp.concatenate([jnp.zeros_like(remove[:, :1]), remove[:, :-1]], axis=-1)
  sorted_logits = jnp.where(remove, -jnp.inf, sorted_logits)
  return _scatter_rows(sorted_logits, sorted_idx, -jnp.inf, vocab)


def filter_logits(logits: Array, sampling: SamplingConfig) -> Array:
  """Top-k (count or fraction) then top-p; removed entries are -inf.

  Args:
    logits: [B, V] float.
    sampling: which filters are on.

  Returns:
    [B, V] float32 (unchanged values where kept).
  """
  logits = logits.astype(jnp.float32)
  k = sampling.num_kept(logits.shape[-1])
  if k is not None:
    logits = top_k_filter(logits, k)
  if sampling.top_p > 0:
    logits = top_p_filter(logits, sampling.top_p)
  return logits


def sample_next(rng: Array, logits: Array, sampling: SamplingConfig) -> Array:
  """One token per row: [B, V] logits -> [B] int32.

  Greedy (`temperature == 0`) takes the argmax of the raw logits, as x-transformers (no
  filter); otherwise draws from softmax(filter_logits(logits) / temperature).
  """
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, sampling)
  return jax.random.categorical(rng, filtered / sampling.temperature, axis=-1).astype(jnp.int32)


# Generation.


def _check_generate_args(decoder: Any, length: int) -> None:
  if not isinstance(length, (int, np.integer)) or length < 1:
    raise ValueError(f"length must be a positive int (static), got {length!r}")
  if length > decoder.max_seq_len:
    # With absolute positions the table would be read out of range (dynamic_slice clamps
    # silently); without them x-transformers would slide a max_seq_len window, which we do
    # not implement.
    raise ValueError(f"length {length} > decoder.max_seq_len {decoder.max_seq_len}")
  if not getattr(decoder, "causal", True):
    raise ValueError("autoregressive generation needs a causal decoder")


def _prompt(first_tokens: Optional[Array], prompt_tokens: Optional[Array],
            prompt_length: Any, length: int) -> tuple[Array, Array]:
  """([B, length] int32 prompt buffer, [B] int32 prompt lengths >= 1) from either form."""
  if (first_tokens is None) == (prompt_tokens is None):
    raise ValueError("pass exactly one of first_tokens [B] and prompt_tokens [B, P]")
  if first_tokens is not None:
    if first_tokens.ndim != 1:
      raise ValueError(f"first_tokens must be [B], got shape {first_tokens.shape}")
    prompt_tokens, prompt_length = first_tokens[:, None], 1
  if prompt_tokens.ndim != 2 or not 1 <= prompt_tokens.shape[1] <= length:
    raise ValueError(f"prompt_tokens must be [B, P] with 1 <= P <= length={length}, got shape "
                     f"{prompt_tokens.shape}")
  batch, width = prompt_tokens.shape
  if prompt_length is None:
    prompt_length = width
  # Traced lengths cannot be checked: position 0 is never sampled, so < 1 acts as 1.
  prompt_length = jnp.maximum(jnp.broadcast_to(jnp.asarray(prompt_length, jnp.int32),
                                               (batch,)), 1)
  buffer = jnp.zeros((batch, length), jnp.int32).at[:, :width].set(
      prompt_tokens.astype(jnp.int32))
  return buffer, prompt_length


def generate_tokens(decoder: Any, decoder_params: Any, *, first_tokens: Optional[Array] = None,
                    length: int, context: Array, context_mask: Optional[Array], rng: Array,
                    sampling: SamplingConfig, prompt_tokens: Optional[Array] = None,
                    prompt_length: Any = None) -> Array:
  """Samples a [B, length] token sequence with a KV cache (one `lax.scan`).

  Args:
    decoder: a causal `TokenDecoder` (static under jit).
    decoder_params: its params, either the inner tree or {'params': tree}.
    first_tokens: [B] int, token at position 0 (ground-truth first code or start-token id);
      the same as `prompt_tokens=first_tokens[:, None]`.
    length: total sequence length including the prompt (static).
    context: [B, M, dim] cross-attention memory.
    context_mask: [B, M] bool (True = valid frame) or None.
    rng: PRNG key; position t (1 <= t < length) is drawn with `fold_in(rng, t)` (also at
      prompt positions, where the draw is discarded: a prompt does not shift the noise).
    sampling: `SamplingConfig` (static).
    prompt_tokens: [B, P] int (1 <= P <= length), instead of `first_tokens`: positions
      t < prompt_length are fed from it instead of being sampled.
    prompt_length: int or [B] int array, may be traced (one compiled scan for every prompt
      length); default P.  Values < 1 act as 1 (position 0 is always given).

  Returns:
    [B, length] int32; positions t < prompt_length hold the prompt.
  """
  _check_generate_args(decoder, length)
  prompt, prompt_length = _prompt(first_tokens, prompt_tokens, prompt_length, length)
  if length == 1:
    return prompt
  variables = _variables(decoder_params)
  batch = prompt.shape[0]
  # Only positions 0..length-2 are ever fed, so the cache needs length-1 slots.  float32
  # whatever decoder.dtype: attention casts K/V to the compute dtype as in `__call__`.
  cache = decoder.init_cache(batch, length - 1)
  # The context is fixed: project it to cross-attention K/V once, not at every token.
  cross_kv = decoder.apply(variables, context, method=type(decoder).precompute_cross)

  def step(carry, xs):
    cache, prev = carry
    t, given = xs
    logits, cache = decoder.apply(variables, prev[:, None], t - 1, cache, context, context_mask,
                                  cross_kv, method=type(decoder).decode_step)
    token = sample_next(jax.random.fold_in(rng, t), logits[:, -1], sampling)
    token = jnp.where(t < prompt_length, given, token)
    return (cache, token), token

  steps = jnp.arange(1, length, dtype=jnp.int32)
  _, tokens = jax.lax.scan(step, (cache, prompt[:, 0]), (steps, prompt[:, 1:].T))
  return jnp.concatenate([prompt[:, :1], tokens.T], axis=1)


def generate_tokens_uncached(decoder: Any, decoder_params: Any, *,
                             first_tokens: Optional[Array] = None, length: int,
                             context: Array, context_mask: Optional[Array], rng: Array,
                             sampling: SamplingConfig, prompt_tokens: Optional[Array] = None,
                             prompt_length: Any = None) -> Array:
  """Reference for `generate_tokens` without a cache (same arguments and result).

  Every step runs the teacher-forced `__call__` on the whole fixed-size [B, length] buffer
  and reads the logits at position t-1; causality makes the not-yet-written slots (zeros,
  or prompt tokens not yet reached) irrelevant.  O(length) full passes: for tests and as the
  documented slow path.
  """
  _check_generate_args(decoder, length)
  buf, prompt_length = _prompt(first_tokens, prompt_tokens, prompt_length, length)
  variables = _variables(decoder_params)

  def body(t, buf):
    logits = decoder.apply(variables, buf, context, context_mask)
    prev_logits = jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False)
    token = sample_next(jax.random.fold_in(rng, t), prev_logits, sampling)
    given = jax.lax.dynamic_index_in_dim(buf, t, axis=1, keepdims=False)
    token = jnp.where(t < prompt_length, given, token)
    return jax.lax.dynamic_update_index_in_dim(buf, token, t, axis=1)

  return jax.lax.fori_loop(1, length, body, buf)


# Module-level jits: the compilation cache is keyed on the static (decoder, length,
# sampling), so every `make_generate_fn` with equal settings reuses one executable.
_STATIC = dict(static_argnums=(0,), static_argnames=("length", "sampling"))
_generate_jit = jax.jit(generate_tokens, **_STATIC)
_generate_uncached_jit = jax.jit(generate_tokens_uncached, **_STATIC)


def make_generate_fn(decoder: Any, length: int, sampling: SamplingConfig, *,
                     cached: bool = True) -> Callable[..., Array]:
  """Jitted `fn(decoder_params, prompt, context, context_mask, rng, prompt_length=None)`.

  `prompt` is [B] first tokens or [B, P] prompt tokens (see `generate_tokens`); returns
  [B, length].  Compiled once per (decoder, length, sampling, input shapes), shared across
  calls of `make_generate_fn`; `cached=False` gives the uncached reference.
  """
  impl = _generate_jit if cached else _generate_uncached_jit

  def fn(decoder_params, prompt, context, context_mask, rng, prompt_length=None):
    prompt = jnp.asarray(prompt)
    given = (dict(first_tokens=prompt) if prompt.ndim == 1
             else dict(prompt_tokens=prompt, prompt_length=prompt_length))
    return impl(decoder, decoder_params, length=length, context=context,
                context_mask=context_mask, rng=rng, sampling=sampling, **given)

  return fn


def _variables(params: Any) -> Mapping[str, Any]:
  """Accepts the inner param tree or a full variables dict."""
  if isinstance(params, Mapping) and set(params) == {"params"}:
    return params
  return {"params": params}


# Masked iterative decoding (MaskGIT-style) for the parallel decoder.

MASK_SCHEDULES = ("cosine", "linear")


@dataclasses.dataclass(frozen=True)
class IterativeConfig:
  """Confidence-ordered iterative decoding of the parallel decoder (hashable, static).

  Attributes:
    iterations: K decoder passes per window; 1 = one pass (every free position sampled at
      once, the earlier `decoding=parallel` generation).
    schedule: fraction of the free positions still masked after pass k of K, as a function
      of k / K: 'cosine' cos(pi/2 * k/K) (MaskGIT) or 'linear' 1 - k/K.
    choice_temperature: MaskGIT's annealed Gumbel noise on the confidences used for
      ranking, scaled by choice_temperature * (1 - k/K); 0 = rank by the sampled token's
      log-probability alone (our default; MaskGIT uses 4.5).
  """
  iterations: int = 1
  schedule: str = "cosine"
  choice_temperature: float = 0.0

  def __post_init__(self):
    if (isinstance(self.iterations, bool) or not isinstance(self.iterations, (int, np.integer))
        or self.iterations < 1):
      raise ValueError(f"generate.iterations must be an integer >= 1, got {self.iterations!r}")
    if self.schedule not in MASK_SCHEDULES:
      raise ValueError(f"generate.mask_schedule={self.schedule!r}; expected one of "
                       f"{MASK_SCHEDULES}")
    _check_finite("choice_temperature", self.choice_temperature)
    if self.choice_temperature < 0:
      raise ValueError(f"generate.choice_temperature must be >= 0, got "
                       f"{self.choice_temperature}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def mask_schedule(schedule: str, progress: Any) -> Any:
  """Masked fraction at `progress` in [0, 1] (0: all masked, 1: none): cosine or linear.

  Works on floats and arrays (NumPy or JAX); the training mask ratio is this function of
  u ~ U(0, 1), the decoding passes evaluate it at k / K.
  """
  xp = jnp if isinstance(progress, jax.Array) else np
  if schedule == "cosine":
    return xp.cos(0.5 * math.pi * progress)
  if schedule == "linear":
    return 1.0 - progress
  raise ValueError(f"mask schedule {schedule!r}; expected one of {MASK_SCHEDULES}")


def masked_counts(num_free: Array, iterations: int, schedule: str) -> Array:
  """[K, B] int32: free positions still masked after pass k = 1..K of `num_free` [B].

  floor(num_free * schedule(k / K)), 0 after the last pass, non-increasing in k. The ratios
  are float64 host constants (K is static) and 1e-3 absorbs float32 rounding of the product,
  so e.g. 9 * (1 - 1/3) gives 6, not 5.
  """
  progress = np.arange(1, iterations + 1, dtype=np.float64) / iterations
  ratio = np.clip(mask_schedule(schedule, progress), 0.0, 1.0).astype(np.float32)
  counts = jnp.floor(ratio[:, None] * jnp.asarray(num_free)[None, :].astype(jnp.float32) + 1e-3)
  return counts.astype(jnp.int32).at[-1].set(0)


def _sampled_log_probs(logits: Array, tokens: Array, sampling: SamplingConfig) -> Array:
  """log p(token) under the distribution it was drawn from ([N, V] logits, [N] tokens)."""
  if sampling.greedy:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  else:
    logp = jax.nn.log_softmax(filter_logits(logits, sampling) / sampling.temperature, axis=-1)
  return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def iterative_decode(decode_fn: Callable[[Array], Array], *, tokens: Array, given: Array,
                     valid: Array, mask_token: int, rng: Array, sampling: SamplingConfig,
                     iterative: IterativeConfig, return_passes: bool = False) -> Any:
  """K passes of masked decoding, keeping the most confident tokens (MaskGIT).

  Pass k (0-based) feeds the mask token at every position not yet fixed, draws a token at
  every position (`sample_next` with `rng` for pass 0, `fold_in(rng, k)` after, so K=1 with
  nothing given is exactly one-pass parallel sampling), and fixes the most confident of the
  newly drawn tokens so that floor(free * schedule((k+1)/K)) free positions stay masked
  (`masked_counts`; free = valid and not given). Confidence = log-probability of the drawn
  token under the distribution it was drawn from, plus, with choice_temperature > 0,
  choice_temperature * (1 - (k+1)/K) * Gumbel noise (MaskGIT). Fixed tokens (given or from
  an earlier pass) never change. One `lax.scan` over K: one executable per shape.

  Args:
    decode_fn: decoder inputs [B, W] int32 -> logits [B, W, V] (bidirectional).
    tokens: [B, W] int; read where `given`.
    given: [B, W] bool, tokens that are never masked (frame 0's token, a window's overlap
      prompt).
    valid: [B, W] bool frames; padding is never fixed and holds the last pass's draw.
    mask_token: decoder input id of the mask token.
    rng: PRNG key.
    sampling: how each token is drawn (static).
    iterative: K, schedule and Gumbel noise (static).
    return_passes: also return each pass's state (for tests and diagnostics).

  Returns:
    [B, W] int32 tokens, equal to `tokens` where given (and valid); with `return_passes`,
    (tokens, dict(tokens=[K, B, W], fixed=[K, B, W] bool)) after each pass.
  """
  if tokens.ndim != 2 or tokens.shape != given.shape or tokens.shape != valid.shape:
    raise ValueError(f"tokens, given and valid must be [B, W] of one shape, got {tokens.shape}, "
                     f"{given.shape}, {valid.shape}")
  given = given & valid
  tokens = jnp.asarray(tokens, jnp.int32)
  counts = masked_counts(valid.sum(axis=1) - given.sum(axis=1), iterative.iterations,
                         iterative.schedule)
  num_valid = valid.sum(axis=1)
  keys = jnp.stack([rng] + [jax.random.fold_in(rng, k)
                            for k in range(1, iterative.iterations)])
  steps = jnp.arange(iterative.iterations, dtype=jnp.int32)

  def one_pass(carry, xs):
    tokens, fixed = carry
    key, step, still_masked = xs
    logits = decode_fn(jnp.where(fixed, tokens, mask_token))
    flat = logits.reshape(-1, logits.shape[-1])
    # `key` itself draws (not a split of it): K=1 is the one-pass sampler bit for bit.
    drawn = sample_next(key, flat, sampling)
    noise_key = jax.random.split(key)[1]
    confidence = _sampled_log_probs(flat, drawn, sampling).reshape(tokens.shape)
    drawn = drawn.reshape(tokens.shape)
    if iterative.choice_temperature > 0:
      anneal = iterative.choice_temperature * (1.0 - (step + 1) / iterative.iterations)
      confidence = confidence + anneal * jax.random.gumbel(noise_key, confidence.shape)
    # Fixed first (+inf), padding last (-inf): keep the num_valid - still_masked best.
    score = jnp.where(fixed, jnp.inf, jnp.where(valid, confidence, -jnp.inf))
    ranks = jnp.argsort(jnp.argsort(-score, axis=1), axis=1)
    keep = (ranks < (num_valid - still_masked)[:, None]) & valid
    tokens = jnp.where(fixed, tokens, drawn)
    fixed = keep | fixed
    return (tokens, fixed), ((tokens, fixed) if return_passes else None)

  (tokens, _), passes = jax.lax.scan(one_pass, (tokens, given), (keys, steps, counts))
  if return_passes:
    return tokens, dict(tokens=passes[0], fixed=passes[1])
  return tokens


# Several samples per input.


def repeat_for_samples(tree: Any, num_samples: int) -> Any:
  """Repeats every leaf num_samples times along axis 0 (row b*n + k = sample k of input b).

  NumPy leaves stay NumPy; everything else goes through `jnp.repeat`.  None leaves (e.g. a
  missing mask) pass through.
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")

  def rep(x):
    if isinstance(x, np.ndarray):
      return np.repeat(x, num_samples, axis=0)
    return jnp.repeat(x, num_samples, axis=0)

  return jax.tree_util.tree_map(rep, tree)


def split_samples(x: Array, num_samples: int) -> Array:
  """[B * n, ...] -> [B, n, ...], inverse layout of `repeat_for_samples`."""
  if x.shape[0] % num_samples:
    raise ValueError(f"leading dim {x.shape[0]} not divisible by num_samples {num_samples}")
  return x.reshape((x.shape[0] // num_samples, num_samples) + x.shape[1:])


__all__ = [
    "SamplingConfig", "filter_logits", "top_k_filter", "top_p_filter",
    "sample_next", "generate_tokens", "generate_tokens_uncached", "make_generate_fn",
    "repeat_for_samples", "split_samples", "IterativeConfig", "MASK_SCHEDULES",
    "mask_schedule", "masked_counts", "iterative_decode",
]
