"""x-transformers 1.30.16 stacks in Flax Linen, for the options DIM uses.

Two stacks, each numerically equal to the torch package on valid positions (checked in
tests/test_transformer_parity.py against the real package):

* `ContinuousEncoder` = `ContinuousTransformerWrapper(dim_in, dim_out, max_seq_len,
  attn_layers=Encoder(dim, depth, heads))` called with `return_embeddings=True`.
  `causal=True` reproduces the official fine-tuning encoders, which stay an `Encoder` but get
  `attn_mask = ~triu(ones, 1)` (x-transformers' `Encoder` refuses a `causal` keyword).
* `TokenDecoder` = `TransformerWrapper(num_tokens, max_seq_len, use_abs_pos_emb,
  attn_layers=Decoder(dim, depth, heads, cross_attend=True))` returning logits.

Behaviour reproduced (x_transformers.py line refs are for 1.30.16):
  * `ContinuousTransformerWrapper.project_in` is `Linear(dim_in, dim, bias=False)` whenever
    `dim_in` is given, even if `dim_in == dim` (the joint encoder has one); `project_out`
    likewise exists whenever `dim_out` is given and is unused with `return_embeddings=True`,
    but it is a parameter (it counts in the official parameter totals).
  * Absolute positions: `Embedding(max_seq_len, dim)` times `dim**-0.5`, added after
    `project_in` (encoder) or to the *unscaled* token embedding (decoder).
  * Pre-norm blocks, `nn.LayerNorm(dim, bias=False)` (eps 1e-5) on torch >= 2.1, final norm.
  * Attention: q/k/v/out projections without bias, heads of `dim_head=64` regardless of
    `dim` (inner width heads*64), scale `dim_head**-0.5`, masked logits filled with
    `-finfo(float32).max` (so a fully masked row becomes uniform, as in torch), and the output
    of every attention branch (self *and* cross) zeroed on padded query rows *before* the
    residual add (`Attention.forward`, `out.masked_fill(~mask, 0.)`).  Padded rows still
    receive the FF branch, so they are not zero at the output; compare valid rows only.
  * Self-attention keys are masked by the sequence mask; cross-attention keys by
    `context_mask` only (no mask at all when it is None).
  * FF: Linear(d, 4d) + exact erf GELU + Linear(4d, d), with biases.
  * Block order per layer: ('a', 'f') for the encoder, ('a', 'c', 'f') for the decoder; the
    torch layer index counts sublayers, so decoder layer l has torch indices 3l, 3l+1, 3l+2.
  * `to_logits` is `Linear(dim, num_tokens, bias=False)`, not tied to the token embedding.

Parameter names mirror the torch module tree, so export is a renaming plus transposes
(`to_torch_state_dict` / `from_torch_state_dict` on each module).

Not implemented (unused by DIM): dropout (DIM uses none in these stacks), memory tokens,
prepend embeds, rotary/relative positions, flash attention.  Incremental decoding is supported
through `TokenDecoder.init_cache` / `decode_step` (self-attention K/V cache) and
`precompute_cross` (cross-attention K/V of the context, computed once per sequence), and
incremental causal encoding through `ContinuousEncoder.init_cache` / `__call__(cache=...)`.
Ours, off by default: `TokenDecoder(context_shift=n)` masks cross-attention so that position p
sees context frames <= p + n (x-transformers' cross-attention has no causal mask).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

DEFAULT_DIM_HEAD = 64
LN_EPS = 1e-5
# x-transformers fills masked logits with -finfo(dtype).max (not -inf): a fully masked row
# then softmaxes to uniform rather than NaN.  We compute logits in float32 always.
MASK_VALUE = -float(np.finfo(np.float32).max)


def _torch_linear_kernel_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
  """torch.nn.Linear default weight init (kaiming_uniform a=sqrt(5)): U(+-1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nn.Module):
  """Dense layer with float32 params and `dtype` matmul inputs accumulated in float32.

  Attributes:
    features: output width.
    use_bias: whether to add a bias (torch `bias=`).
    dtype: compute dtype of the matmul inputs; the accumulation is always float32 (bf16
      inputs with float32 accumulation is the fast path on our CPUs and on accelerators).
  """
  features: int
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [..., in] -> [..., features] float32."""
    fan_in = x.shape[-1]
    kernel = self.param("kernel", _torch_linear_kernel_init, (fan_in, self.features), jnp.float32)
    # As a 2-D matmul (leading dims flattened, like torch): the weight gradient is then one
    # plain GEMM, which XLA:CPU runs much faster than a contraction over batch and time.
    lead = x.shape[:-1]
    y = jax.lax.dot_general(
        x.reshape(-1, fan_in).astype(self.dtype), kernel.astype(self.dtype),
        (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32).reshape(lead + (self.features,))
    if self.use_bias:
      bound = 1.0 / np.sqrt(fan_in)
      bias = self.param(
          "bias", lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound, bound),
          (self.features,))
      y = y + bias
    return y


class LayerNorm(nn.Module):
  """torch `nn.LayerNorm(dim, bias=False)`: biased variance, eps 1e-5, scale only, float32."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [..., d] -> [..., d] float32."""
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    # Two-pass variance (not E[x^2]-E[x]^2) to stay within 1e-6 of torch.
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * scale


class Attention(nn.Module):
  """x-transformers `Attention` with default options (no bias, dim_head 64).

  Attributes:
    dim: model width (output of `to_out`).
    heads: number of heads.
    dim_head: per-head width (64 by default, independent of `dim`).
    dtype: matmul input dtype.
  """
  dim: int
  heads: int
  dim_head: int = DEFAULT_DIM_HEAD
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Optional[Array] = None,
               key_mask: Optional[Array] = None, query_mask: Optional[Array] = None,
               causal: bool = False, cache: Optional[dict] = None,
               cache_index: Optional[Array] = None, cross_kv: Optional[tuple] = None,
               kv_only: bool = False, context_shift: Optional[int] = None,
               query_start: Any = 0) -> tuple[Array, Optional[dict]]:
    """Multi-head attention.

    Args:
      x: [B, Nq, dim] queries (already normed).
      context: [B, Nk, dim_ctx] keys/values source; None for self-attention.
      key_mask: [B, Nk] bool, True = attend; None = all keys valid.
      query_mask: [B, Nq] bool; rows where False get a zero output (x-transformers zeroes
        padded query rows of every attention branch).
      causal: mask keys j > i (offset by Nk - Nq, as torch's `create_causal_mask`).
      cache: self-attention only: {'k', 'v': [B, H, L, dh]} buffers to write the new K/V into
        at `cache_index`; attention then runs over the whole buffer (keys beyond the written
        prefix are masked by `key_mask`, which the caller builds).
      cache_index: scalar int position of x[:, 0] in the cache.
      cross_kv: precomputed (k, v) [B, H, Nk, dh] of `context` (generation computes them
        once per sequence instead of once per token).
      kv_only: return those (k, v) for `context` and nothing else.
      context_shift: cross-attention only: query i (absolute position query_start + i) sees
        context frames j <= max(query_start + i + context_shift, 0); None = every frame
        (official).
      query_start: position of x[:, 0] for `context_shift` (the cache index when decoding).

    Returns:
      ([B, Nq, dim] float32, updated cache or None); with kv_only, (k, v).
    """
    h, dh = self.heads, self.dim_head
    kv_in = x if context is None else context
    split = lambda t: t.reshape(t.shape[:2] + (h, dh)).transpose(0, 2, 1, 3)  # b h n d
    if kv_only:
      return (split(Linear(h * dh, dtype=self.dtype, name="to_k")(kv_in)),
              split(Linear(h * dh, dtype=self.dtype, name="to_v")(kv_in)))
    q = split(Linear(h * dh, dtype=self.dtype, name="to_q")(x))
    if cross_kv is not None:
      k, v = cross_kv
    else:
      k = split(Linear(h * dh, dtype=self.dtype, name="to_k")(kv_in))
      v = split(Linear(h * dh, dtype=self.dtype, name="to_v")(kv_in))
    new_cache = None
    if cache is not None:
      k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, 0, cache_index, 0))
      v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, 0, cache_index, 0))
      new_cache = {"k": k, "v": v}
    sim = jnp.einsum("bhid,bhjd->bhij", q.astype(self.dtype), k.astype(self.dtype),
                     preferred_element_type=jnp.float32) * (dh ** -0.5)
    nq, nk = sim.shape[-2:]
    allowed = jnp.ones((1, 1, nq, nk), bool)
    if key_mask is not None:
      allowed = allowed & key_mask[:, None, None, :]
    if causal:
      qpos = jnp.arange(nq)[:, None] + (nk - nq if cache is None else cache_index)
      allowed = allowed & (jnp.arange(nk)[None, :] <= qpos)
    if context_shift is not None:
      qpos = jnp.arange(nq)[:, None] + query_start
      # A negative shift (a reaction lag) still lets the first positions see frame 0: a
      # query with no key at all would attend to every frame, the future included.
      allowed = allowed & (jnp.arange(nk)[None, :] <= jnp.maximum(qpos + context_shift, 0))
    sim = jnp.where(allowed, sim, MASK_VALUE)
    attn = jax.nn.softmax(sim, axis=-1)
    out = jnp.einsum("bhij,bhjd->bhid", attn.astype(self.dtype), v.astype(self.dtype),
                     preferred_element_type=jnp.float32)
    out = out.transpose(0, 2, 1, 3).reshape(out.shape[0], nq, h * dh)
    out = Linear(self.dim, dtype=self.dtype, name="to_out")(out)
    if query_mask is not None:
      out = jnp.where(query_mask[..., None], out, 0.0)
    return out, new_cache


class FeedForward(nn.Module):
  """x-transformers `FeedForward` defaults: Linear(d, 4d) + erf GELU + Linear(4d, d)."""
  dim: int
  mult: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [..., dim] -> [..., dim] float32."""
    y = Linear(self.dim * self.mult, use_bias=True, dtype=self.dtype, name="ff_in")(x)
    y = jax.nn.gelu(y, approximate=False)  # torch nn.GELU() default is exact erf.
    return Linear(self.dim, use_bias=True, dtype=self.dtype, name="ff_out")(y)


class AttentionLayers(nn.Module):
  """Pre-norm stack with block ('a','f') or ('a','c','f'); submodule i = torch layer i.

  Submodules are named `layers_{i}_norm` and `layers_{i}` with i the torch sublayer index, so
  the state-dict mapping is positional (`attn_layers.layers.{i}.0.0` / `.1`).
  """
  dim: int
  depth: int
  heads: int
  cross_attend: bool = False
  dim_head: int = DEFAULT_DIM_HEAD
  dtype: Any = jnp.float32

  @property
  def block(self) -> tuple[str, ...]:
    return ("a", "c", "f") if self.cross_attend else ("a", "f")

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None, causal: bool = False,
               context: Optional[Array] = None, context_mask: Optional[Array] = None,
               cache: Optional[list] = None, cache_index: Optional[Array] = None,
               self_key_mask: Optional[Array] = None, cross_kv: Optional[list] = None,
               cross_kv_only: bool = False,
               context_shift: Optional[int] = None) -> tuple[Any, Optional[list]]:
    """Runs the stack.

    Args:
      x: [B, N, dim].
      mask: [B, N] bool, True = valid; masks self-attention keys and zeroes padded query rows.
      causal: causal self-attention.
      context: [B, M, dim] for cross-attention ('c' layers).
      context_mask: [B, M] bool for cross-attention keys.
      cache: per self-attention layer K/V buffers (incremental decoding) or None.
      cache_index: position of x[:, 0] in the cache.
      self_key_mask: overrides the self-attention key mask (used with a cache, where keys
        span the whole buffer while queries are only the new positions).
      cross_kv: per cross-attention layer (k, v) of `context`, from a `cross_kv_only` call.
      cross_kv_only: only compute those (k, v) (x is ignored): returns (list, None).
      context_shift: causal cross-attention: query position p sees context frames
        <= p + context_shift (p counted from cache_index); None = all frames.

    Returns:
      ([B, N, dim] float32 after the final norm, updated cache list or None).
    """
    if self.cross_attend and context is None and cross_kv is None:
      raise ValueError("cross_attend stack needs a context (or its cross_kv)")
    if cross_kv_only:
      return [Attention(self.dim, self.heads, self.dim_head, self.dtype, name=f"layers_{i}")(
                  None, context=context, kv_only=True)
              for i in range(self.depth * len(self.block))
              if self.block[i % len(self.block)] == "c"], None
    x = x.astype(jnp.float32)
    new_cache = [] if cache is not None else None
    a_idx = c_idx = 0
    for i in range(self.depth * len(self.block)):
      kind = self.block[i % len(self.block)]
      y = LayerNorm(name=f"layers_{i}_norm")(x)
      if kind == "a":
        layer_cache = cache[a_idx] if cache is not None else None
        kmask = self_key_mask if self_key_mask is not None else mask
        out, c = Attention(self.dim, self.heads, self.dim_head, self.dtype, name=f"layers_{i}")(
            y, key_mask=kmask, query_mask=mask, causal=causal, cache=layer_cache,
            cache_index=cache_index)
        if cache is not None:
          new_cache.append(c)
        a_idx += 1
      elif kind == "c":
        out, _ = Attention(self.dim, self.heads, self.dim_head, self.dtype, name=f"layers_{i}")(
            y, context=context, key_mask=context_mask, query_mask=mask,
            cross_kv=None if cross_kv is None else cross_kv[c_idx],
            context_shift=context_shift, query_start=0 if cache_index is None else cache_index)
        c_idx += 1
      else:
        out = FeedForward(self.dim, dtype=self.dtype, name=f"layers_{i}")(y)
      x = x + out
    return LayerNorm(name="final_norm")(x), new_cache


def _layers_to_torch(params: dict, depth: int, block: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Renames an AttentionLayers param tree to `attn_layers.*` torch keys (kernels transposed)."""
  sd = {}
  t = lambda a: np.asarray(a, np.float32).T.copy()
  for i in range(depth * len(block)):
    kind = block[i % len(block)]
    pre = f"attn_layers.layers.{i}"
    sd[f"{pre}.0.0.weight"] = np.asarray(params[f"layers_{i}_norm"]["scale"], np.float32)
    p = params[f"layers_{i}"]
    if kind in ("a", "c"):
      for n in ("to_q", "to_k", "to_v", "to_out"):
        sd[f"{pre}.1.{n}.weight"] = t(p[n]["kernel"])
    else:
      sd[f"{pre}.1.ff.0.0.weight"] = t(p["ff_in"]["kernel"])
      sd[f"{pre}.1.ff.0.0.bias"] = np.asarray(p["ff_in"]["bias"], np.float32)
      sd[f"{pre}.1.ff.2.weight"] = t(p["ff_out"]["kernel"])
      sd[f"{pre}.1.ff.2.bias"] = np.asarray(p["ff_out"]["bias"], np.float32)
  sd["attn_layers.final_norm.weight"] = np.asarray(params["final_norm"]["scale"], np.float32)
  return sd


def _layers_from_torch(sd: dict, depth: int, block: tuple[str, ...]) -> dict:
  """Inverse of `_layers_to_torch`."""
  g = lambda k: np.asarray(sd[k], np.float32)
  params = {"final_norm": {"scale": g("attn_layers.final_norm.weight")}}
  for i in range(depth * len(block)):
    kind = block[i % len(block)]
    pre = f"attn_layers.layers.{i}"
    params[f"layers_{i}_norm"] = {"scale": g(f"{pre}.0.0.weight")}
    if kind in ("a", "c"):
      params[f"layers_{i}"] = {n: {"kernel": g(f"{pre}.1.{n}.weight").T.copy()}
                               for n in ("to_q", "to_k", "to_v", "to_out")}
    else:
      params[f"layers_{i}"] = {
          "ff_in": {"kernel": g(f"{pre}.1.ff.0.0.weight").T.copy(), "bias": g(f"{pre}.1.ff.0.0.bias")},
          "ff_out": {"kernel": g(f"{pre}.1.ff.2.weight").T.copy(), "bias": g(f"{pre}.1.ff.2.bias")},
      }
  return params


class ContinuousEncoder(nn.Module):
  """`ContinuousTransformerWrapper(..., attn_layers=Encoder(...))`, `return_embeddings=True`.

  Attributes:
    dim: model width (DIM: 384).
    depth: number of ('a', 'f') blocks (DIM: 4).
    heads: attention heads of width `dim_head` (DIM: 12 x 64).
    max_seq_len: rows of the absolute position table (DIM: 2048); 0 disables positions.
    dim_in: input feature width; None = no `project_in` (identity), otherwise a bias-free
      Linear even when equal to `dim` (as x-transformers).
    dim_out: width of the (unused) `project_out`; None = absent.  DIM passes `dim_out=dim`.
    use_abs_pos_emb: learned absolute positions (x-transformers default True).
    dim_head: per-head width.
    dtype: matmul input dtype (params stay float32, accumulation float32).
  """
  dim: int
  depth: int
  heads: int
  max_seq_len: int
  dim_in: Optional[int] = None
  dim_out: Optional[int] = None
  use_abs_pos_emb: bool = True
  dim_head: int = DEFAULT_DIM_HEAD
  dtype: Any = jnp.float32

  @property
  def _has_pos(self) -> bool:
    return self.use_abs_pos_emb and self.max_seq_len > 0

  def init_cache(self, batch: int, length: int, dtype: Any = jnp.float32) -> list[dict]:
    """Zero self-attention K/V buffers for incremental causal encoding (`cache=`)."""
    shape = (batch, self.heads, length, self.dim_head)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(self.depth)]

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None, causal: bool = False,
               return_embeddings: bool = True, cache: Optional[list] = None,
               cache_index: Any = 0) -> Any:
    """Encodes a continuous sequence.

    Args:
      x: [B, N, dim_in] (or [B, N, dim] without project_in).
      mask: [B, N] bool, True = valid frame; None = all valid.
      causal: lower-triangular self-attention (the official fine-tuning encoders pass
        `attn_mask=~triu(ones(N, N), 1)`, which this reproduces).
      return_embeddings: True (DIM) returns the final-normed embeddings; False applies
        `project_out`.
      cache: incremental causal encoding (streaming): `init_cache` buffers; x holds the
        frames at positions cache_index..cache_index+N-1, which see the cached frames before
        them.  Equal to the causal pass over the whole prefix (mask and causal ignored).
      cache_index: position of x[:, 0] (may be traced).

    Returns:
      [B, N, dim] float32 (or [B, N, dim_out]).  Padded rows are not zero; ignore them.
      With a cache: (that, updated cache).
    """
    if self.dim_in is not None:
      x = Linear(self.dim, dtype=self.dtype, name="project_in")(x)
    x = x.astype(jnp.float32)
    if self._has_pos:
      n = x.shape[1]
      if n > self.max_seq_len:
        raise ValueError(f"sequence length {n} > max_seq_len {self.max_seq_len}")
      table = self.param("pos_emb", nn.initializers.normal(1.0), (self.max_seq_len, self.dim),
                         jnp.float32)
      x = x + jax.lax.dynamic_slice_in_dim(table, cache_index, n, axis=0) * (self.dim ** -0.5)
    layers = AttentionLayers(self.dim, self.depth, self.heads, False, self.dim_head, self.dtype,
                             name="attn_layers")
    if cache is not None:
      length = cache[0]["k"].shape[2]
      # Keys past the written prefix are hidden by causality (query offset cache_index).
      x, cache = layers(x, causal=True, cache=cache, cache_index=cache_index,
                        self_key_mask=jnp.ones((x.shape[0], length), bool))
    else:
      x, _ = layers(x, mask=mask, causal=causal)
    if self.dim_out is not None:
      # Always called so the parameter exists (it counts in the official totals); under jit
      # the unused matmul is dead code.
      projected = Linear(self.dim_out, dtype=self.dtype, name="project_out")(x)
      if not return_embeddings:
        x = projected
    return x if cache is None else (x, cache)

  def to_torch_state_dict(self, params: dict) -> dict[str, np.ndarray]:
    """Flax params (the inner dict, without 'params') -> torch state_dict names/layouts."""
    params = params.get("params", params)
    sd = _layers_to_torch(params["attn_layers"], self.depth, ("a", "f"))
    if self._has_pos:
      sd["pos_emb.emb.weight"] = np.asarray(params["pos_emb"], np.float32)
    for n in ("project_in", "project_out"):
      if n in params:
        sd[f"{n}.weight"] = np.asarray(params[n]["kernel"], np.float32).T.copy()
    return sd

  def from_torch_state_dict(self, sd: dict) -> dict:
    """torch state_dict (tensors or arrays) -> Flax param tree (without 'params')."""
    sd = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in sd.items()}
    params = {"attn_layers": _layers_from_torch(sd, self.depth, ("a", "f"))}
    if self._has_pos:
      params["pos_emb"] = np.asarray(sd["pos_emb.emb.weight"], np.float32)
    for n in ("project_in", "project_out"):
      if f"{n}.weight" in sd:
        params[n] = {"kernel": np.asarray(sd[f"{n}.weight"], np.float32).T.copy()}
    return params


class TokenDecoder(nn.Module):
  """`TransformerWrapper(num_tokens, max_seq_len, attn_layers=Decoder(cross_attend=True))`.

  Attributes:
    num_tokens: vocabulary size (DIM: 512).
    dim: model width (DIM: 384 + 768 = 1152); the context must have this width too
      (x-transformers' cross-attention uses `dim_context = dim` by default).
    depth: number of ('a', 'c', 'f') blocks (DIM: 4).
    heads: attention heads of width `dim_head` (DIM: 12 x 64).
    max_seq_len: rows of the position table (DIM: 2048).
    use_abs_pos_emb: DIM pretraining True, fine-tuning (SLMFT) False.
    dim_head: per-head width.
    dtype: matmul input dtype.
    num_input_tokens: rows of the token embedding; None = `num_tokens` (x-transformers).
      Ours adds rows for special input ids that are never predicted: a start token
      (generation without ground truth) and a mask token (the paper's parallel decoding).
    causal: causal self-attention (x-transformers `Decoder`); False for the paper's parallel
      masked decoding, where every position sees every other.
    context_shift: None = cross-attention sees the whole context (x-transformers, official);
      n = causal context (ours): decoder position p sees context frames <= p + n.
    token_factors: () = one embedding row and one logit per token (x-transformers,
      official). (P, E) (ours, P * E = num_tokens) = token t is the pair (t // E, t % E) (a
      part-encoder tokenizer's pose and expression codes): its embedding is the sum of the two
      codes' rows and its logit the sum of the two codes' logits, so each code is learned from
      every frame that uses it, not only from that pair (P * E pairs, P + E rows).
  """
  num_tokens: int
  dim: int
  depth: int
  heads: int
  max_seq_len: int
  use_abs_pos_emb: bool = True
  dim_head: int = DEFAULT_DIM_HEAD
  dtype: Any = jnp.float32
  num_input_tokens: Optional[int] = None
  causal: bool = True
  context_shift: Optional[int] = None
  token_factors: tuple = ()

  @property
  def _factors(self) -> tuple:
    if self.token_factors and (len(self.token_factors) != 2
                               or math.prod(self.token_factors) != self.num_tokens):
      raise ValueError(f"token_factors={self.token_factors} with num_tokens={self.num_tokens}: "
                       "expected () or two sizes whose product is num_tokens")
    return tuple(self.token_factors)

  @property
  def _has_pos(self) -> bool:
    return self.use_abs_pos_emb and self.max_seq_len > 0

  def setup(self):
    # setup (not compact): `__call__` and `decode_step` share the same submodules.
    # torch init_(): kaiming_normal_ on the (num_tokens, dim) table -> std sqrt(2 / dim).
    rows = self.num_input_tokens or self.num_tokens
    if rows < self.num_tokens:
      raise ValueError(f"num_input_tokens={rows} < num_tokens={self.num_tokens}")
    if self._factors:  # rows: P first codes, E second codes, then the special ids.
      rows = sum(self._factors) + rows - self.num_tokens
    self.token_emb = self.param("token_emb", nn.initializers.normal(np.sqrt(2.0 / self.dim)),
                                (rows, self.dim), jnp.float32)
    if self._has_pos:
      self.pos_emb = self.param("pos_emb", nn.initializers.normal(1.0),
                                (self.max_seq_len, self.dim), jnp.float32)
    self.attn_layers = AttentionLayers(self.dim, self.depth, self.heads, True, self.dim_head,
                                       self.dtype)
    self.to_logits = Linear(sum(self._factors) if self._factors else self.num_tokens,
                            dtype=self.dtype)

  def _logits(self, x: Array) -> Array:
    logits = self.to_logits(x)
    if not self._factors:
      return logits
    first = self._factors[0]  # log p(a, b) = log p(a) + log p(b): two independent codes.
    pair = logits[..., :first, None] + logits[..., None, first:]
    return pair.reshape(*logits.shape[:-1], self.num_tokens)

  def _embed(self, tokens: Array, start: Any = 0) -> Array:
    if not self._factors:
      x = jnp.take(self.token_emb, tokens, axis=0)  # not scaled (no sqrt(d) in TokenEmbedding)
    else:
      (first_size, second_size), code = self._factors, tokens < self.num_tokens
      special = first_size + second_size + tokens - self.num_tokens  # start / mask: a row each
      first = jnp.where(code, tokens // second_size, special)
      second = jnp.take(self.token_emb, first_size + tokens % second_size, axis=0)
      x = (jnp.take(self.token_emb, first, axis=0)
           + jnp.where(code[..., None], second, 0.0))
    if self._has_pos:
      pos = jax.lax.dynamic_slice_in_dim(self.pos_emb, start, tokens.shape[1], axis=0)
      x = x + pos * (self.dim ** -0.5)
    return x

  def __call__(self, tokens: Array, context: Array, context_mask: Optional[Array] = None,
               mask: Optional[Array] = None, self_key_mask: Optional[Array] = None,
               return_embeddings: bool = False, factor_logits: bool = False) -> Array:
    """Teacher-forced logits.

    Args:
      tokens: [B, N] int token ids.
      context: [B, M, dim] cross-attention memory.
      context_mask: [B, M] bool, True = valid context frame; None = all valid.
      mask: [B, N] bool token validity (the official code passes none: AutoregressiveWrapper
        uses -100 targets instead); masks self-attention keys and zeroes padded query rows.
      self_key_mask: [B, N] bool, overrides the self-attention key mask (x-transformers
        `self_attn_kv_mask`, which AutoregressiveWrapper(mask_prob>0) uses to hide random
        input tokens during fine-tuning).
      return_embeddings: return the final-normed [B, N, dim] features instead of logits.
      factor_logits: with token_factors (P, E), return the [B, N, P + E] logits of the two
        codes (the first P: pose code, the rest: expression code) instead of their
        [B, N, P * E] pair sums: a loss can use them without the P * E table.

    Returns:
      [B, N, num_tokens] float32 logits ([B, N, P + E] with factor_logits).
    """
    if tokens.shape[1] > self.max_seq_len and self._has_pos:
      raise ValueError(f"sequence length {tokens.shape[1]} > max_seq_len {self.max_seq_len}")
    x = self._embed(tokens)
    x, _ = self.attn_layers(x, mask=mask, causal=self.causal, context=context,
                            context_mask=context_mask, self_key_mask=self_key_mask,
                            context_shift=self.context_shift)
    if return_embeddings:
      return x
    if factor_logits:
      if not self._factors:
        raise ValueError("factor_logits needs token_factors")
      return self.to_logits(x)
    return self._logits(x)

  def init_cache(self, batch: int, length: int, dtype: Any = jnp.float32) -> list[dict]:
    """Zero K/V buffers for `decode_step`: one {'k','v': [B, H, length, dh]} per layer."""
    shape = (batch, self.heads, length, self.dim_head)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(self.depth)]

  def precompute_cross(self, context: Array) -> list:
    """Cross-attention (k, v) of `context` for every decoder layer (pass to decode_step)."""
    return self.attn_layers(None, context=context, cross_kv_only=True)[0]

  def decode_step(self, tokens: Array, index: Array, cache: list, context: Array,
                  context_mask: Optional[Array] = None,
                  cross_kv: Optional[list] = None) -> tuple[Array, list]:
    """Incremental decoding: logits for `tokens` placed at positions index..index+n-1.

    Equivalent to running `__call__` on the full prefix and keeping the last n rows (no
    token mask, as in generation).  Call with `method=TokenDecoder.decode_step`.  Only for
    causal decoders.

    Args:
      tokens: [B, n] new token ids (usually n = 1).
      index: scalar int32, position of tokens[:, 0].
      cache: from `init_cache` (or the previous step).
      context: [B, M, dim] (None when cross_kv is given); context_mask: [B, M] bool or None.
      cross_kv: `precompute_cross(context)`, so the context is projected once per sequence
        rather than at every token (the result is the same).  With `context_shift` a
        streaming caller may fill it frame by frame: slots past what position
        index + n - 1 may see are never read.

    Returns:
      ([B, n, num_tokens] logits, updated cache).
    """
    if not self.causal:
      raise ValueError("decode_step needs a causal decoder (parallel decoding is one pass)")
    x = self._embed(tokens, index)
    length = cache[0]["k"].shape[2]
    # Keys beyond the written prefix are masked by causality (qpos offset by index).
    x, cache = self.attn_layers(x, causal=True, context=context, context_mask=context_mask,
                              cache=cache, cache_index=index,
                              self_key_mask=jnp.ones((tokens.shape[0], length), bool),
                              cross_kv=cross_kv, context_shift=self.context_shift)
    return self._logits(x), cache

  def to_torch_state_dict(self, params: dict) -> dict[str, np.ndarray]:
    """Flax params (the inner dict, without 'params') -> torch state_dict names/layouts."""
    params = params.get("params", params)
    sd = {"token_emb.emb.weight": np.asarray(params["token_emb"], np.float32)}
    if self._has_pos:
      sd["pos_emb.emb.weight"] = np.asarray(params["pos_emb"], np.float32)
    sd.update(_layers_to_torch(params["attn_layers"], self.depth, ("a", "c", "f")))
    sd["to_logits.weight"] = np.asarray(params["to_logits"]["kernel"], np.float32).T.copy()
    return sd

  def from_torch_state_dict(self, sd: dict) -> dict:
    """torch state_dict (tensors or arrays) -> Flax param tree (without 'params')."""
    sd = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in sd.items()}
    params = {
        "token_emb": np.asarray(sd["token_emb.emb.weight"], np.float32),
        "attn_layers": _layers_from_torch(sd, self.depth, ("a", "c", "f")),
        "to_logits": {"kernel": np.asarray(sd["to_logits.weight"], np.float32).T.copy()},
    }
    if self._has_pos:
      params["pos_emb"] = np.asarray(sd["pos_emb.emb.weight"], np.float32)
    return params
