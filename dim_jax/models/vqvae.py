"""Motion VQ-VAE tokenizer (official `stage1_BIWI.VQAutoEncoder`, quant_factor 0) with padding masks.

Behaviour on valid frames matches the official model; padding never leaks:
  * instance-norm statistics are taken over valid frames only,
  * attention masks padded keys,
  * the k=5 replicate-padded convolution repeats the last *valid* frame,
so a padded batch tokenizes exactly as each sequence alone (tests/test_vqvae.py).

Kept from the official code for checkpoint parity: attention scaled by
`hidden_size**-0.5` (not per-head width), LayerNorm eps 1e-5 with bias, tanh-approximate
GELU (the official `base_model_util.gelu`), no final norm after the transformer stacks.
Deliberate difference: sinusoidal positions are indexed by time by default; the official
`PositionalEncoding` indexes its table by the *batch* position (`pe[:x.size(0)]` on a
batch-first tensor), available as `positional_encoding="official_batch_index"`. The official
code tokenizes one sample at a time wherever tokens feed DIM (its per-sample loops, batch 1
in testing), so every frame there gets row 0: `positional_encoding="official_first_row"`, the
setting imported official checkpoints run with (batched or not, the official numbers).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

POSITIONAL_ENCODINGS = ("time", "official_batch_index", "official_first_row", "none")


@dataclasses.dataclass(frozen=True)
class VQConfig:
  """Static model configuration (built from the run config's `model` block)."""
  in_dim: int = 56
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 8
  mlp_dim: int = 1536
  codebook_size: int = 512
  code_dim: int = 128
  beta: float = 0.25
  # Ours (off = official): l2-normalise latents and codes before the nearest-code search, as
  # ViT-VQGAN does; every code starts on the latents' scale, so small data cannot collapse
  # the codebook onto a few codes while Adam slowly moves codes initialised near zero.
  codebook_normalize: bool = False
  # Normalisation after each conv. 'instance' (official): InstanceNorm over time; it removes
  # every channel's per-window mean and scale, so a window's slow offsets (head drift,
  # low-frequency expression) cannot pass through. 'frame' (ours): each frame normalised over
  # channels, which keeps them; 'none'.
  conv_norm: str = "instance"
  # Ours (off = official init): the decoder's output layer starts at zero, so training starts
  # from the mean pose instead of spending its first steps shrinking O(1) outputs onto motion
  # whose pose dims move by ~0.01 rad.
  zero_init_output: bool = False
  leaky_slope: float = 0.2
  dropout_rate: float = 0.1
  positional_encoding: str = "time"
  max_len: int = 5000
  dtype: Any = jnp.float32  # compute dtype of matmuls; parameters stay float32.
  # Ours (1 = official): product quantization over this many latent slices (VectorQuantizer).
  code_groups: int = 1
  # Ours (False = official): with code_groups=2, the head pose (dims 0:6) and the expression
  # (6:56) get encoders of their own, each writing one latent slice, so the frame's token is
  # (pose code, expression code): the head no longer competes with the expression for one code.
  part_encoders: bool = False
  # With part_encoders: codes of the pose group (the expression group gets codebook_size /
  # pose_codes); 0 = sqrt(codebook_size) each.
  pose_codes: int = 0

  @property
  def code_sizes(self) -> tuple:
    """Codes per quantizer group: () = equal groups; (pose, expression) with pose_codes."""
    if self.pose_codes:
      return (self.pose_codes, self.codebook_size // self.pose_codes)
    return ()

  @property
  def group_sizes(self) -> tuple:
    """Codes per quantizer group, always spelled out (one entry per group)."""
    if self.code_sizes:
      return self.code_sizes
    return (group_codebook_size(self.codebook_size, self.code_groups),) * self.code_groups

  def __post_init__(self):
    if self.positional_encoding not in POSITIONAL_ENCODINGS:
      raise ValueError(
          f"model.positional_encoding={self.positional_encoding!r}; expected one of "
          f"{POSITIONAL_ENCODINGS}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by "
                       f"model.num_heads={self.num_heads}")
    if self.code_groups < 1 or self.code_dim % self.code_groups:
      raise ValueError(f"model.code_groups={self.code_groups} must be >= 1 and divide "
                       f"model.code_dim={self.code_dim}")
    if self.pose_codes and (not self.part_encoders or self.codebook_size % self.pose_codes):
      raise ValueError(f"model.pose_codes={self.pose_codes} needs model.part_encoders=True and "
                       f"must divide model.codebook_size={self.codebook_size}")
    if not self.pose_codes:
      group_codebook_size(self.codebook_size, self.code_groups)
    if self.part_encoders and (self.code_groups != 2 or self.in_dim != POSE_DIMS + 50):
      raise ValueError(f"model.part_encoders=True needs model.code_groups=2 (one code for the "
                       f"pose, one for the expression) and in_dim 56; got code_groups="
                       f"{self.code_groups}, in_dim={self.in_dim}")
    if self.conv_norm not in CONV_NORMS:
      raise ValueError(f"model.conv_norm={self.conv_norm!r}; expected one of {CONV_NORMS}")


CONV_NORMS = ("instance", "frame", "none")
POSE_DIMS = 6  # EMOCA order: global rotation (3) and jaw (3), then 50 expression coefficients.


def sinusoid_table(max_len: int, dim: int) -> np.ndarray:
  """The official sinusoidal table: [max_len, dim], sin on even, cos on odd channels."""
  position = np.arange(max_len, dtype=np.float32)[:, None]
  div_term = np.exp(np.arange(0, dim, 2, dtype=np.float32) * (-math.log(10000.0) / dim))
  table = np.zeros((max_len, dim), np.float32)
  table[:, 0::2] = np.sin(position * div_term)
  table[:, 1::2] = np.cos(position * div_term)
  return table


def masked_instance_norm(x: Array, mask: Array, eps: float = 1e-5) -> Array:
  """InstanceNorm1d (no affine) over valid frames. x: [B, T, C], mask: [B, T] bool."""
  weights = mask[..., None].astype(jnp.float32)
  count = jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)
  x32 = x.astype(jnp.float32)
  mean = (x32 * weights).sum(axis=1, keepdims=True) / count
  # Biased variance, as torch's InstanceNorm.
  var = (jnp.square(x32 - mean) * weights).sum(axis=1, keepdims=True) / count
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def frame_norm(x: Array, eps: float = 1e-5) -> Array:
  """LayerNorm without affine over channels, per frame: [B, T, C]."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(axis=-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def replicate_pad(x: Array, lengths: Array, pad: int) -> Array:
  """Pads time by `pad` each side, repeating the first and the last *valid* frame.

  Frames past a sequence's length are replaced by its last valid frame too, so a
  convolution at a valid position never sees padding. x: [B, T, C] -> [B, T+2*pad, C].
  """
  time = x.shape[1]
  index = jnp.arange(-pad, time + pad)[None, :]
  index = jnp.clip(index, 0, jnp.maximum(lengths[:, None] - 1, 0))
  return jnp.take_along_axis(x, index[..., None], axis=1)


def _flat_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                      **kwargs):
  """Dense's contraction as a 2-D matmul (leading dims flattened, like torch): the weight
  gradient is then one plain GEMM, much faster on XLA:CPU than a contraction over batch and
  time."""
  (lhs_contract, rhs_contract), batch_dims = dimension_numbers
  if lhs.ndim <= 2 or any(batch_dims) or tuple(lhs_contract) != (lhs.ndim - 1,):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
  out = jax.lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs,
                            (((1,), tuple(rhs_contract)), ((), ())), precision=precision,
                            preferred_element_type=preferred_element_type, **kwargs)
  return out.reshape(lhs.shape[:-1] + out.shape[1:])


def _matmul_precision(dtype):
  """dot_general for Dense layers: bf16 inputs accumulate in f32 (bf16 outputs would be
  slower than f32)."""
  if jnp.dtype(dtype) == jnp.float32:
    return _flat_dot_general
  return functools.partial(_flat_dot_general, preferred_element_type=jnp.float32)


def dense(features: int, dtype: Any, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, dot_general=_matmul_precision(dtype),
                  name=name)


class ConvBlock(nn.Module):
  """Conv1d(k5, replicate padding) -> LeakyReLU -> InstanceNorm (official `squasher`/`expander`)."""
  features: int
  leaky_slope: float
  dtype: Any = jnp.float32
  norm: str = "instance"  # VQConfig.conv_norm

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    lengths = mask.sum(axis=1)
    x = replicate_pad(x, lengths, pad=2)
    x = nn.Conv(self.features, kernel_size=(5,), padding="VALID", dtype=self.dtype,
                name="conv")(x)
    x = nn.leaky_relu(x, self.leaky_slope)
    if self.norm == "instance":
      return masked_instance_norm(x, mask)
    return frame_norm(x) if self.norm == "frame" else x


class SelfAttention(nn.Module):
  """Official VQ `Attention`: fused qkv without bias, scale hidden_size**-0.5, biased output."""
  hidden_size: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    batch, time, _ = x.shape
    head_dim = self.hidden_size // self.num_heads
    qkv = dense(3 * self.hidden_size, self.dtype, "to_qkv", use_bias=False)(x)
    # Official layout "b n (qkv h d)": q/k/v outermost, then heads.
    qkv = qkv.reshape(batch, time, 3, self.num_heads, head_dim).astype(self.dtype)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                        preferred_element_type=jnp.float32) * self.hidden_size**-0.5
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, value, preferred_element_type=jnp.float32)
    out = out.reshape(batch, time, self.hidden_size)
    return dense(self.hidden_size, self.dtype, "to_out")(out)


class TransformerBlock(nn.Module):
  """Pre-norm block: x + Attn(LN(x)); x + MLP(LN(x)) (official `Residual(Norm(...))`)."""
  hidden_size: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    y = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="attn_norm")(x)
    x = x + SelfAttention(self.hidden_size, self.num_heads, self.dtype, name="attn")(y, mask)
    y = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="mlp_norm")(x)
    y = dense(self.mlp_dim, self.dtype, "l1")(y)
    y = nn.gelu(y, approximate=True)  # official base_model_util.gelu is the tanh form.
    y = dense(self.hidden_size, self.dtype, "l2")(y)
    return x + y


class Transformer(nn.Module):
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    for i in range(self.num_layers):
      x = TransformerBlock(self.hidden_size, self.num_heads, self.mlp_dim, self.dtype,
                           name=f"block_{i}")(x, mask)
    return x


class PositionalEncoding(nn.Module):
  """Adds the sinusoidal table (by time, by batch position as officially, or its row 0)."""
  config: VQConfig

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    cfg = self.config
    if cfg.positional_encoding != "none":
      table = jnp.asarray(sinusoid_table(cfg.max_len, cfg.hidden_size))
      if cfg.positional_encoding == "time":
        if x.shape[1] > cfg.max_len:
          raise ValueError(f"sequence of {x.shape[1]} frames exceeds model.max_len={cfg.max_len}")
        x = x + table[None, : x.shape[1]].astype(x.dtype)
      elif cfg.positional_encoding == "official_first_row":
        x = x + table[0].astype(x.dtype)  # the official table at batch size 1
      else:
        x = x + table[: x.shape[0], None].astype(x.dtype)
    return nn.Dropout(cfg.dropout_rate, deterministic=not train)(x)


class MotionEncoder(nn.Module):
  """Official `TransformerEncoder`: motion [B, T, in_dim] -> latents [B, T, out_dim]."""
  config: VQConfig
  out_dim: Optional[int] = None  # None: code_dim

  @nn.compact
  def __call__(self, motion: Array, mask: Array, *, train: bool) -> Array:
    cfg = self.config
    x = dense(cfg.hidden_size, cfg.dtype, "vertice_mapping")(motion)
    x = nn.leaky_relu(x, cfg.leaky_slope)
    x = ConvBlock(cfg.hidden_size, cfg.leaky_slope, cfg.dtype, cfg.conv_norm,
                  name="squasher")(x, mask)
    x = dense(cfg.hidden_size, cfg.dtype, "linear_embedding")(x)
    x = PositionalEncoding(cfg, name="pos")(x, train=train)
    x = Transformer(cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim, cfg.dtype,
                    name="transformer")(x, mask)
    return dense(self.out_dim or cfg.code_dim, cfg.dtype, "linear_embedding_post")(x)


class MotionDecoder(nn.Module):
  """Official `TransformerDecoder`: latents [B, T, code_dim] -> motion [B, T, out_dim]."""
  config: VQConfig
  out_dim: int

  @nn.compact
  def __call__(self, latents: Array, mask: Array, *, train: bool) -> Array:
    cfg = self.config
    x = dense(cfg.hidden_size, cfg.dtype, "linear_embedding_pre")(latents)
    x = ConvBlock(cfg.hidden_size, cfg.leaky_slope, cfg.dtype, cfg.conv_norm,
                  name="expander")(x, mask)
    x = dense(cfg.hidden_size, cfg.dtype, "linear_embedding")(x)
    x = PositionalEncoding(cfg, name="pos")(x, train=train)
    x = Transformer(cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim, cfg.dtype,
                    name="transformer")(x, mask)
    if cfg.zero_init_output:
      return nn.Dense(self.out_dim, use_bias=False, dtype=cfg.dtype,
                      dot_general=_matmul_precision(cfg.dtype), kernel_init=nn.initializers.zeros,
                      name="vertice_map_reverse")(x)
    return dense(self.out_dim, cfg.dtype, "vertice_map_reverse", use_bias=False)(x)


class VectorQuantizer(nn.Module):
  """Nearest-codeword quantizer with straight-through gradient and the official loss.

  loss = beta * mean((sg[z_q] - z)^2) + mean((z_q - sg[z])^2), means over valid frames.

  With `groups` > 1 (ours; 1 = official) it is a product quantizer: the latent is split into
  `groups` equal slices, each quantized with its own codebook of K_g codes (K_g =
  codebook_size ** (1 / groups) each, or `sizes`), and the frame's token is the mixed-radix
  number of the slices' codes (token = sum_g code_g * prod(K_h for h > g)). The vocabulary
  stays one integer per frame (what DIM predicts), while a frame can hold prod(K_g)
  combinations with only sum(K_g) code vectors to learn, so head pose and expression need not
  compete for one code. Unequal sizes share one [groups, max K_g, d] table; the rows past a
  group's K_g are never chosen.
  """
  codebook_size: int
  code_dim: int
  beta: float
  normalize: bool = False
  groups: int = 1
  sizes: tuple = ()  # per-group code counts; () = equal

  @property
  def group_sizes(self) -> tuple:
    if self.sizes:
      if len(self.sizes) != self.groups or math.prod(self.sizes) != self.codebook_size:
        raise ValueError(f"code group sizes {self.sizes} do not multiply to "
                         f"{self.codebook_size} over {self.groups} groups")
      return tuple(int(k) for k in self.sizes)
    return (group_codebook_size(self.codebook_size, self.groups),) * self.groups

  @property
  def group_size(self) -> int:
    """Rows per group of the table (the largest group's code count)."""
    return max(self.group_sizes)

  def _codes(self, codebook: Array) -> Array:
    """[groups, K, code_dim / groups] code vectors (unit length per group when normalize)."""
    codebook = codebook.reshape(self.groups, self.group_size, self.code_dim // self.groups)
    return _l2_normalize(codebook) if self.normalize else codebook

  def _codebook(self) -> Array:
    # Official init: uniform(-1/K, 1/K). One group keeps the official [K, code_dim] shape.
    shape = ((self.codebook_size, self.code_dim) if self.groups == 1 else
             (self.groups, self.group_size, self.code_dim // self.groups))
    return self.param("codebook", _uniform_init(self.group_size), shape)

  def _radix(self) -> np.ndarray:
    sizes = self.group_sizes
    return np.array([math.prod(sizes[g + 1:]) for g in range(self.groups)], np.int32)

  @nn.compact
  def __call__(self, latents: Array, mask: Array) -> dict[str, Array]:
    codes = self._codes(self._codebook())                       # [G, K, d]
    batch, time, _ = latents.shape
    grouped = latents.astype(jnp.float32).reshape(batch, time, self.groups, -1)
    if self.normalize:
      grouped = _l2_normalize(grouped)
    distances = (jnp.sum(grouped**2, axis=-1, keepdims=True)
                 + jnp.sum(codes**2, axis=-1)[None, None]
                 - 2.0 * jnp.einsum("btgd,gkd->btgk", grouped, codes))
    if len(set(self.group_sizes)) > 1:  # rows past a group's own size are not codes
      unused = np.arange(self.group_size)[None] >= np.array(self.group_sizes)[:, None]
      distances = jnp.where(unused, jnp.inf, distances)
    group_tokens = jnp.argmin(distances, axis=-1).astype(jnp.int32)   # [B, T, G]
    quantized = jnp.take_along_axis(codes[None, None], group_tokens[..., None, None],
                                    axis=3)[..., 0, :]                 # [B, T, G, d]
    tokens = (group_tokens * self._radix()).sum(axis=-1)
    valid = mask[..., None, None].astype(jnp.float32)
    denom = jnp.maximum(mask.astype(jnp.float32).sum() * self.code_dim, 1.0)
    commit = jnp.sum(jnp.square(jax.lax.stop_gradient(quantized) - grouped) * valid) / denom
    codebook_loss = jnp.sum(jnp.square(quantized - jax.lax.stop_gradient(grouped)) * valid) / denom
    straight_through = grouped + jax.lax.stop_gradient(quantized - grouped)
    valid_frames = mask[..., None].astype(jnp.float32)
    usage = (jax.nn.one_hot(tokens, self.codebook_size) * valid_frames).sum(axis=(0, 1))
    group_usage = (jax.nn.one_hot(group_tokens, self.group_size)
                   * valid_frames[..., None]).sum(axis=(0, 1))           # [G, K]
    probs = usage / jnp.maximum(usage.sum(), 1.0)
    perplexity = jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))
    return dict(quantized=straight_through.reshape(batch, time, self.code_dim), tokens=tokens,
                latents=grouped, quant_loss=self.beta * commit + codebook_loss,
                perplexity=perplexity, code_counts=usage, group_code_counts=group_usage)

  def codes(self) -> Array:
    """The code vectors the decoder sees per token: [codebook_size, code_dim]."""
    codes = self._codes(self.get_variable("params", "codebook"))       # [G, K, d]
    tokens = jnp.arange(self.codebook_size)
    digits = [(tokens // radix) % size for radix, size in zip(self._radix(), self.group_sizes)]
    return jnp.concatenate([codes[g][digits[g]] for g in range(self.groups)], axis=-1)

  def lookup(self, tokens: Array) -> Array:
    return self.codes()[tokens]


def group_codebook_size(codebook_size: int, groups: int) -> int:
  """Codes per group of a product quantizer (codebook_size must be a perfect power)."""
  size = int(round(codebook_size ** (1.0 / groups)))
  if size ** groups != codebook_size:
    raise ValueError(f"model.codebook_size={codebook_size} is not a {groups}-th power "
                     f"(model.code_groups={groups})")
  return size


def _l2_normalize(x: Array) -> Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), 1e-12))


def _uniform_init(codebook_size: int):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -1.0 / codebook_size, 1.0 / codebook_size)
  return init


class VQVAE(nn.Module):
  """Motion tokenizer: one token per frame (official quant_factor 0).

  Methods (use with `model.apply(variables, ..., method=...)`):
    __call__(motion, mask, train) -> dict(reconstruction, tokens, quant_loss, perplexity, ...)
    encode(motion, mask, train) -> quantizer dict (tokens, quantized, quant_loss, ...)
    decode_tokens(tokens, mask, train) -> motion [B, T, in_dim]
    code_vectors() -> [K, code_dim], the decoder's input per token
  """
  config: VQConfig

  def setup(self):
    cfg = self.config
    if cfg.part_encoders:
      half = cfg.code_dim // 2
      self.pose_encoder = MotionEncoder(cfg, half)
      self.expression_encoder = MotionEncoder(cfg, half)
    else:
      self.encoder = MotionEncoder(cfg)
    self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.beta,
                                     cfg.codebook_normalize, cfg.code_groups, cfg.code_sizes)
    self.decoder = MotionDecoder(cfg, cfg.in_dim)

  def encode(self, motion: Array, mask: Array, train: bool = False) -> dict[str, Array]:
    motion = motion.astype(self.config.dtype)
    if self.config.part_encoders:  # quantizer group 0 = pose code, group 1 = expression code
      latents = jnp.concatenate(
          [self.pose_encoder(motion[..., :POSE_DIMS], mask, train=train),
           self.expression_encoder(motion[..., POSE_DIMS:], mask, train=train)], axis=-1)
    else:
      latents = self.encoder(motion, mask, train=train)
    return self.quantizer(latents, mask)

  def decode(self, quantized: Array, mask: Array, train: bool = False) -> Array:
    out = self.decoder(quantized.astype(self.config.dtype), mask, train=train)
    return jnp.where(mask[..., None], out.astype(jnp.float32), 0.0)

  def decode_tokens(self, tokens: Array, mask: Array, train: bool = False) -> Array:
    return self.decode(self.quantizer.lookup(tokens), mask, train=train)

  def code_vectors(self) -> Array:
    """[K, code_dim]: what `decode` expects per token (not the raw parameter if normalized)."""
    return self.quantizer.codes()

  def __call__(self, motion: Array, mask: Array, train: bool = False) -> dict[str, Array]:
    quant = self.encode(motion, mask, train=train)
    return dict(quant, reconstruction=self.decode(quant["quantized"], mask, train=train))


def vq_config_from(model_config) -> VQConfig:
  """Builds the static VQConfig from the run config's `model` ConfigDict."""
  fields = {f.name for f in dataclasses.fields(VQConfig)}
  values = {k: v for k, v in model_config.items() if k in fields}
  unknown = set(model_config.keys()) - fields - {"name", "compute_dtype"}
  if unknown:
    raise ValueError(f"unknown model config fields for the VQ-VAE: {sorted(unknown)}")
  dtype = model_config.get("compute_dtype", "float32")
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"model.compute_dtype={dtype!r}; expected 'float32' or 'bfloat16'")
  values["dtype"] = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  return VQConfig(**values)
