"""HuBERT (Hugging Face `HubertModel`, e.g. facebook/hubert-base-ls960) in Flax Linen, with padding masks.

The module reproduces transformers 5.x `HubertModel` in eval mode on valid frames:

  * feature encoder: `Conv1d` stack (no padding); `feat_extract_norm="group"` puts a
    `GroupNorm(C, C)` (per-channel statistics over time) after the first conv only, `"layer"`
    a `LayerNorm` over channels (eps 1e-5, not the config's) after every conv;
    `feat_extract_activation` after each;
  * feature projection: `LayerNorm(conv_dim[-1])` (if `feat_proj_layer_norm`) + `Linear`;
  * positional conv embedding: grouped `Conv1d(H, H, num_conv_pos_embeddings, padding=k//2,
    groups=num_conv_pos_embedding_groups)` with weight norm over the kernel axis (`dim=2`), the
    extra frame an even kernel makes removed, then `feat_extract_activation`; added to its input;
  * encoder: `do_stable_layer_norm=False` (hubert-base) is post-LN: LayerNorm after the
    positional embedding, then layers `x = LN(x + attn(x)); x = LN(x + ff(x))`;
    `do_stable_layer_norm=True` is pre-LN with a final LayerNorm after the last layer;
  * attention: q/k/v/out projections with bias, logits scaled by `head_dim**-0.5`; the FF is
    `Linear(H, I) + hidden_act + Linear(I, H)`.

Padding never leaks: a batch of zero-padded waveforms with a sample mask (valid samples first)
gives each example's valid frames the hidden states of that example run alone, unpadded
(tests/test_hubert.py, against the torch model): the GroupNorm statistics are taken over valid
frames only, padded frames are zeroed before the positional conv (as HF does when given an
attention mask), and attention masks padded keys. The frame count of n samples is HF's
`_get_feat_extract_output_lengths` (`HubertConfig.num_frames`).

Hidden states follow transformers 5.x `output_hidden_states`: the input of the first layer
(the "embedding output") and the output of every layer, L + 1 arrays; for pre-LN models the
last one is *before* the final LayerNorm, which only `last_hidden_state` includes.

Official DIM features (Boese0601/Dyadic-Interaction-Modeling): the ViCo/CANDOR loaders
(`code/vico_preprocessing.py`, `code/preprocessing.py`) read precomputed 50 fps
`hubert/<utterance>.pkl` features; the only extraction code in the repository,
`code/dataset/biwi.py`, runs s3prl's `S3PRLUpstream("hubert")` (fairseq HuBERT-Base LS-960, the
model `facebook/hubert-base-ls960` converts) on `librosa.load(wav, sr=16000)` waveforms without
normalisation and keeps `all_hs[-1]`, the encoder output = `last_hidden_state` (the default
`layer=None` here), at 50 fps without pooling. (It also builds a state dict from an IEMOCAP
emotion-recognition checkpoint but never loads it, so the pretrained weights are what run.) Pooling happens later, per dataset: CANDOR
averages 10 frames (5 fps), ViCo's `downsample_mean(factor=0.6)` keeps the first 60 % of the
frames (see docs/official_data.md; we resample over the whole utterance instead), BIWI
interpolates linearly to the vertex frame count. s3prl may pad its frame count up to
ceil(n / 320) by repeating the last frame; we keep HF's count.

Weights: `load_pretrained(model_dir)` reads a Hugging Face checkpoint folder (`config.json` +
`model.safetensors` or `pytorch_model.bin`) without the network and without torch for
safetensors; every checkpoint tensor must map to a parameter and every parameter must be
filled (`HubertCheckpointError` lists the missing and unexpected names).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dim_jax import errors

Array = jax.Array
PathLike = str | os.PathLike

SAMPLE_RATE = 16_000
HUB_MODEL = "facebook/hubert-base-ls960"
# Masked attention logits: the float32 minimum, so even an all-padding row stays finite.
MASK_VALUE = float(np.finfo(np.float32).min)

# HF ACT2FN names -> functions ("gelu" is the exact erf GELU of torch's default).
ACTIVATIONS: Mapping[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


class HubertCheckpointError(errors.DimJaxError, ValueError):
  """A HuBERT checkpoint folder is missing, incomplete or does not fit the architecture."""


def _download_hint(model_dir: PathLike) -> str:
  return (f"download {HUB_MODEL} (e.g. `huggingface-cli download {HUB_MODEL} --local-dir "
          f"{model_dir}`) and pass that folder as the model directory")


@dataclasses.dataclass(frozen=True)
class HubertConfig:
  """Architecture fields of a transformers `HubertConfig` (defaults: hubert-base-ls960)."""
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  feat_extract_norm: str = "group"
  feat_extract_activation: str = "gelu"
  conv_dim: tuple[int, ...] = (512,) * 7
  conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
  conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
  conv_bias: bool = False
  num_conv_pos_embeddings: int = 128
  num_conv_pos_embedding_groups: int = 16
  layer_norm_eps: float = 1e-5
  feat_proj_layer_norm: bool = True
  do_stable_layer_norm: bool = False
  # HF creates `masked_spec_embed` (SpecAugment, training only) when a mask probability is
  # positive; it is a checkpoint tensor we keep but never use.
  has_masked_spec_embed: bool = True

  def __post_init__(self):
    object.__setattr__(self, "conv_dim", tuple(int(d) for d in self.conv_dim))
    object.__setattr__(self, "conv_stride", tuple(int(s) for s in self.conv_stride))
    object.__setattr__(self, "conv_kernel", tuple(int(k) for k in self.conv_kernel))
    if not len(self.conv_dim) == len(self.conv_stride) == len(self.conv_kernel) >= 1:
      raise ValueError(f"conv_dim, conv_stride and conv_kernel must have one equal length, got "
                       f"{self.conv_dim}, {self.conv_stride}, {self.conv_kernel}")
    if self.feat_extract_norm not in ("group", "layer"):
      raise ValueError(f"feat_extract_norm must be 'group' or 'layer', got "
                       f"{self.feat_extract_norm!r}")
    for field in ("hidden_act", "feat_extract_activation"):
      if getattr(self, field) not in ACTIVATIONS:
        raise ValueError(f"{field}={getattr(self, field)!r} is not supported; expected one of "
                         f"{sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.hidden_size % self.num_conv_pos_embedding_groups:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_conv_pos_embedding_groups {self.num_conv_pos_embedding_groups}")

  @property
  def frame_hop(self) -> int:
    """Samples between consecutive output frames (320 for hubert-base: 50 fps at 16 kHz)."""
    return math.prod(self.conv_stride)

  @property
  def receptive_field(self) -> int:
    """Samples one output frame sees (400 for hubert-base)."""
    field, jump = 1, 1
    for kernel, stride in zip(self.conv_kernel, self.conv_stride):
      field += (kernel - 1) * jump
      jump *= stride
    return field

  @property
  def frame_rate(self) -> float:
    """Output frames per second of 16 kHz audio."""
    return SAMPLE_RATE / self.frame_hop

  def num_frames(self, num_samples: Any, layers: int | None = None) -> Any:
    """Frames after the first `layers` convs (all by default) for `num_samples` samples.

    HF's `_get_feat_extract_output_lengths` ((n - kernel) // stride + 1 per conv), floored at
    0 after every conv. Works on Python ints, numpy and jax integer arrays.
    """
    n = num_samples
    for kernel, stride in list(zip(self.conv_kernel, self.conv_stride))[:layers]:
      n = (n - kernel) // stride + 1
      if isinstance(n, jax.Array):
        n = jnp.maximum(n, 0)
      elif isinstance(n, np.ndarray):
        n = np.maximum(n, 0)
      else:
        n = max(int(n), 0)
    return n

  @classmethod
  def from_hf(cls, hf_config: Any) -> "HubertConfig":
    """Builds the config from a transformers `HubertConfig` (or anything with its fields)."""
    if getattr(hf_config, "conv_pos_batch_norm", False):
      raise HubertCheckpointError(
          "conv_pos_batch_norm=True (BatchNorm positional conv) is not supported")
    if getattr(hf_config, "adapter_attn_dim", None) is not None:
      raise HubertCheckpointError("adapter_attn_dim (attention adapters) is not supported")
    names = [f.name for f in dataclasses.fields(cls) if f.name != "has_masked_spec_embed"]
    kwargs = {name: getattr(hf_config, name) for name in names if hasattr(hf_config, name)}
    kwargs["has_masked_spec_embed"] = (getattr(hf_config, "mask_time_prob", 0.05) > 0
                                   or getattr(hf_config, "mask_feature_prob", 0.0) > 0)
    return cls(**kwargs)

  @classmethod
  def from_pretrained(cls, model_dir: PathLike) -> "HubertConfig":
    """Reads `<model_dir>/config.json` (with transformers' HubertConfig when installed)."""
    model_dir = pathlib.Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
      what = "folder does not exist" if not model_dir.is_dir() else "no config.json"
      raise HubertCheckpointError(f"no HuBERT checkpoint at {model_dir} ({what}): "
                                  + _download_hint(model_dir))
    try:
      from transformers import HubertConfig as HFHubertConfig  # pylint: disable=g-import-not-at-top
    except ImportError:  # Same defaults as transformers' for fields config.json omits.
      data = json.loads(path.read_text(encoding="utf-8"))
      return cls.from_hf(_Namespace(data))
    return cls.from_hf(HFHubertConfig.from_pretrained(str(model_dir)))


class _Namespace:
  """Attribute view of a config.json dict (fields it lacks keep the dataclass defaults)."""

  def __init__(self, data: Mapping[str, Any]):
    self.__dict__.update(data)


class HubertOutput(NamedTuple):
  """Outputs of `HubertModel.__call__`.

  Attributes:
    hidden_states: L + 1 arrays [B, T, H]: the first layer's input, then every layer's output
      (transformers 5.x `output_hidden_states`).
    last_hidden_state: [B, T, H] encoder output (after the final LayerNorm of pre-LN models;
      equal to `hidden_states[-1]` for post-LN models such as hubert-base).
    frame_mask: [B, T] bool, the valid frames of each example.
  """
  hidden_states: tuple[Array, ...]
  last_hidden_state: Array
  frame_mask: Array


class GroupNormStats(NamedTuple):
  """Per-example GroupNorm statistics of the first conv's output, [B, C] each."""
  mean: Array
  var: Array


# ---------------------------------------------------------------------------
# Layers.


def _masked_moments(x: Array, mask: Array) -> tuple[Array, Array, Array]:
  """(count [B], mean [B, C], centred sum of squares [B, C]) of x [B, T, C] over mask [B, T]."""
  weights = mask[..., None].astype(x.dtype)
  count = weights.sum(axis=1)
  mean = (x * weights).sum(axis=1) / jnp.maximum(count, 1.0)
  m2 = (jnp.square(x - mean[:, None]) * weights).sum(axis=1)
  return count[:, 0], mean, m2


def _layer_norm(epsilon: float, name: str | None = None) -> nn.LayerNorm:
  # use_fast_variance=False: E[(x - mean)^2] as torch, not E[x^2] - mean^2 (cancellation).
  return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, name=name)


class MaskedGroupNorm(nn.Module):
  """torch `GroupNorm(C, C)` on [B, T, C]: per-channel statistics over valid frames only.

  Attributes:
    epsilon: torch's default 1e-5.
  """
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: Array, frame_mask: Array, stats: GroupNormStats | None = None) -> Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    if stats is None:
      count, mean, m2 = _masked_moments(x, frame_mask)
      var = m2 / jnp.maximum(count, 1.0)[:, None]  # biased, as torch
    else:  # Statistics of the whole clip, given when it is processed in chunks.
      mean, var = stats
    return (x - mean[:, None]) * jax.lax.rsqrt(var[:, None] + self.epsilon) * scale + bias


class FeatureConvLayer(nn.Module):
  """One conv of the feature encoder (`HubertGroupNormConvLayer` / `LayerNorm` / `NoLayerNorm`).

  Attributes:
    config: model config.
    layer_id: index into `conv_dim` / `conv_kernel` / `conv_stride`.
    norm: "group", "layer" or "none".
    precision: matmul/conv precision.
  """
  config: HubertConfig
  layer_id: int
  norm: str
  precision: Any = None

  def setup(self):
    c = self.config
    self.conv = nn.Conv(
        c.conv_dim[self.layer_id], (c.conv_kernel[self.layer_id],),
        strides=(c.conv_stride[self.layer_id],), padding="VALID", use_bias=c.conv_bias,
        precision=self.precision, kernel_init=nn.initializers.he_normal())
    if self.norm == "group":
      self.layer_norm = MaskedGroupNorm()
    elif self.norm == "layer":
      self.layer_norm = _layer_norm(1e-5)  # torch LayerNorm default eps, not the config's.

  def __call__(self, x: Array, frame_mask: Array, stats: GroupNormStats | None = None) -> Array:
    x = self.conv(x)
    if self.norm == "group":
      x = self.layer_norm(x, frame_mask, stats)
    elif self.norm == "layer":
      x = self.layer_norm(x)
    return ACTIVATIONS[self.config.feat_extract_activation](x)


class FeatureEncoder(nn.Module):
  """Waveform [B, N] -> conv features [B, T, conv_dim[-1]] (`HubertFeatureEncoder`)."""
  config: HubertConfig
  precision: Any = None

  def setup(self):
    c = self.config
    if c.feat_extract_norm == "group":
      norms = ["group"] + ["none"] * (len(c.conv_dim) - 1)
    else:
      norms = ["layer"] * len(c.conv_dim)
    self.conv_layers = [FeatureConvLayer(c, i, norm, self.precision)
                        for i, norm in enumerate(norms)]

  def _frame_mask(self, lengths: Array, layer: int, num_frames: int) -> Array:
    valid = self.config.num_frames(lengths, layers=layer + 1)
    return jnp.arange(num_frames)[None, :] < valid[:, None]

  def __call__(self, waveform: Array, lengths: Array,
               stats: GroupNormStats | None = None) -> Array:
    c = self.config
    x = waveform[..., None]
    for i, layer in enumerate(self.conv_layers):
      # Only a GroupNorm needs the mask: every conv frame inside the valid length sees valid
      # samples only, since the convs are unpadded.
      num_frames = (x.shape[1] - c.conv_kernel[i]) // c.conv_stride[i] + 1
      x = layer(x, self._frame_mask(lengths, i, num_frames), stats)
    return x

  def first_conv_moments(self, waveform: Array, lengths: Array, frame_start: Array,
                         frame_stop: Array) -> tuple[Array, Array, Array]:
    """Moments of the first conv's output over valid frames in [frame_start, frame_stop)."""
    x = self.conv_layers[0].conv(waveform[..., None])
    t = jnp.arange(x.shape[1])[None, :]
    mask = (self._frame_mask(lengths, 0, x.shape[1]) & (t >= frame_start[:, None])
            & (t < frame_stop[:, None]))
    return _masked_moments(x, mask)


class FeatureProjection(nn.Module):
  """`HubertFeatureProjection`: optional LayerNorm over conv channels, then Linear to H."""
  config: HubertConfig
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.config.feat_proj_layer_norm:
      x = _layer_norm(self.config.layer_norm_eps, name="layer_norm")(x)
    return _dense(self.config.hidden_size, self.precision, "projection")(x)


def _dense(features: int, precision: Any, name: str) -> nn.Dense:
  # HF initialises Linear weights with N(0, initializer_range=0.02) and zero bias.
  return nn.Dense(features, precision=precision, name=name,
                  kernel_init=nn.initializers.normal(0.02))


class WeightNormConv(nn.Module):
  """Grouped Conv1d with torch weight norm over the kernel axis (`weight_norm(dim=2)`).

  Parameters keep torch's layout so checkpoints load without reshaping: `weight_v`
  [out, in / groups, kernel], `weight_g` [1, 1, kernel], `bias` [out]; the weight is
  `weight_g * weight_v / ||weight_v||`, the norm taken over the first two axes.

  Attributes:
    features: output (= input) channels.
    kernel_size: kernel width; the conv pads kernel_size // 2 frames on both sides.
    groups: channel groups.
    precision: conv precision.
  """
  features: int
  kernel_size: int
  groups: int
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_per_group = x.shape[-1] // self.groups
    fan_in = in_per_group * self.kernel_size
    weight_v = self.param(
        "weight_v", nn.initializers.normal(math.sqrt(2.0 / fan_in)),
        (self.features, in_per_group, self.kernel_size))
    # torch sets g = ||v|| at wrapping time; this constant is that norm's expected value.
    weight_g = self.param(
        "weight_g", nn.initializers.constant(math.sqrt(2.0 * self.features / self.kernel_size)),
        (1, 1, self.kernel_size))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    norm = jnp.sqrt(jnp.sum(jnp.square(weight_v), axis=(0, 1), keepdims=True))
    weight = weight_v * (weight_g / norm)
    pad = self.kernel_size // 2
    y = jax.lax.conv_general_dilated(
        x, jnp.transpose(weight, (2, 1, 0)), window_strides=(1,), padding=[(pad, pad)],
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=self.groups,
        precision=self.precision)
    return y + bias


class PositionalConvEmbedding(nn.Module):
  """`HubertPositionalConvEmbedding`: weight-normed grouped conv, even-kernel frame removed."""
  config: HubertConfig
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    y = WeightNormConv(c.hidden_size, c.num_conv_pos_embeddings, c.num_conv_pos_embedding_groups,
                       self.precision, name="conv")(x)
    if c.num_conv_pos_embeddings % 2 == 0:  # `HubertSamePadLayer`: padding made T + 1 frames.
      y = y[:, :-1]
    return ACTIVATIONS[c.feat_extract_activation](y)


class SelfAttention(nn.Module):
  """`HubertAttention` (eval): multi-head self-attention over valid keys only."""
  config: HubertConfig
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, frame_mask: Array) -> Array:
    c = self.config
    heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads

    def project(name):
      y = _dense(c.hidden_size, self.precision, name)(x)
      return y.reshape(*y.shape[:2], heads, head_dim)

    q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision) * head_dim**-0.5
    logits = jnp.where(frame_mask[:, None, None, :], logits, MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=self.precision)
    return _dense(c.hidden_size, self.precision, "out_proj")(out.reshape(x.shape))


class FeedForward(nn.Module):
  """`HubertFeedForward` (eval): Linear(H, I) + hidden_act + Linear(I, H)."""
  config: HubertConfig
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    x = _dense(c.intermediate_size, self.precision, "intermediate_dense")(x)
    x = ACTIVATIONS[c.hidden_act](x)
    return _dense(c.hidden_size, self.precision, "output_dense")(x)


class EncoderLayer(nn.Module):
  """`HubertEncoderLayer` (post-LN) or `HubertEncoderLayerStableLayerNorm` (pre-LN)."""
  config: HubertConfig
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, frame_mask: Array) -> Array:
    c = self.config
    attention = SelfAttention(c, self.precision, name="attention")
    layer_norm = _layer_norm(c.layer_norm_eps, name="layer_norm")
    feed_forward = FeedForward(c, self.precision, name="feed_forward")
    final_layer_norm = _layer_norm(c.layer_norm_eps, name="final_layer_norm")
    if c.do_stable_layer_norm:
      x = x + attention(layer_norm(x), frame_mask)
      return x + feed_forward(final_layer_norm(x))
    x = layer_norm(x + attention(x, frame_mask))
    return final_layer_norm(x + feed_forward(x))


class Encoder(nn.Module):
  """`HubertEncoder` / `HubertEncoderStableLayerNorm`: positional conv, layers, LayerNorm."""
  config: HubertConfig
  precision: Any = None

  def setup(self):
    c = self.config
    self.pos_conv_embed = PositionalConvEmbedding(c, self.precision)
    self.layer_norm = _layer_norm(c.layer_norm_eps)
    self.layers = [EncoderLayer(c, self.precision) for _ in range(c.num_hidden_layers)]

  def __call__(self, x: Array, frame_mask: Array,
               num_layers: int | None = None) -> tuple[list[Array], Array | None]:
    """(hidden states of the first `num_layers` layers (+ input), final output or None)."""
    # Padded frames are zero before the positional conv, as in the example run alone, whose
    # conv pads with zeros past its end.
    x = x * frame_mask[..., None].astype(x.dtype)
    x = x + self.pos_conv_embed(x)
    if not self.config.do_stable_layer_norm:
      x = self.layer_norm(x)
    hidden_states = [x]
    num_layers = len(self.layers) if num_layers is None else num_layers
    for layer in self.layers[:num_layers]:
      x = layer(x, frame_mask)
      hidden_states.append(x)
    if num_layers < len(self.layers):
      return hidden_states, None
    if self.config.do_stable_layer_norm:
      x = self.layer_norm(x)
    return hidden_states, x


class HubertModel(nn.Module):
  """transformers `HubertModel` (eval) on zero-padded waveform batches with sample masks.

  Parameter names mirror the torch module tree (`feature_extractor/conv_layers_0/conv/kernel`
  <-> `feature_extractor.conv_layers.0.conv.weight`), see `params_from_state_dict`.

  Attributes:
    config: architecture.
    precision: matmul/conv precision; "highest" keeps float32 accuracy on accelerators
      (TF32 would move features by ~1e-3); no effect on CPU.
  """
  config: HubertConfig
  precision: Any = "highest"

  def setup(self):
    c = self.config
    self.feature_extractor = FeatureEncoder(c, self.precision)
    self.feature_projection = FeatureProjection(c, self.precision)
    self.encoder = Encoder(c, self.precision)
    if c.has_masked_spec_embed:  # Training-only SpecAugment vector, kept for checkpoint parity.
      self.masked_spec_embed = self.param("masked_spec_embed", nn.initializers.uniform(1.0),
                                          (c.hidden_size,))

  def _lengths(self, input_values: Array, sample_mask: Array | None) -> Array:
    if sample_mask is None:
      return jnp.full(input_values.shape[:1], input_values.shape[1], jnp.int32)
    return jnp.sum(sample_mask, axis=1, dtype=jnp.int32)

  def _embed(self, input_values: Array, sample_mask: Array | None,
             norm_stats: GroupNormStats | None) -> tuple[Array, Array]:
    lengths = self._lengths(input_values, sample_mask)
    if sample_mask is not None:  # Padding may hold anything; the conv must see zeros.
      input_values = jnp.where(sample_mask, input_values, 0.0)
    features = self.feature_extractor(input_values, lengths, norm_stats)
    frame_mask = jnp.arange(features.shape[1])[None, :] < self.config.num_frames(lengths)[:, None]
    return self.feature_projection(features), frame_mask

  def __call__(self, input_values: Array, sample_mask: Array | None = None, *,
               norm_stats: GroupNormStats | None = None) -> HubertOutput:
    """All hidden states.

    Args:
      input_values: [B, N] float waveforms at 16 kHz, zero-padded (not normalised here).
      sample_mask: [B, N] bool, True on valid samples, which come first; None = all valid.
      norm_stats: optional whole-clip statistics for the first conv's GroupNorm (chunked
        extraction); by default each example's own valid frames give them.

    Returns:
      `HubertOutput`; padded frames hold unspecified values.
    """
    x, frame_mask = self._embed(input_values, sample_mask, norm_stats)
    hidden_states, last = self.encoder(x, frame_mask)
    return HubertOutput(tuple(hidden_states), last, frame_mask)

  def features(self, input_values: Array, sample_mask: Array | None = None, *,
               layer: int | None = None,
               norm_stats: GroupNormStats | None = None) -> tuple[Array, Array]:
    """One layer's features, running only the layers it needs.

    Args:
      input_values, sample_mask, norm_stats: as in `__call__`.
      layer: None = `last_hidden_state` (the official DIM choice, s3prl's `all_hs[-1]`);
        an int indexes `hidden_states` (0 = first layer's input, -1 = last layer's output).

    Returns:
      (features [B, T, H], frame_mask [B, T]).
    """
    x, frame_mask = self._embed(input_values, sample_mask, norm_stats)
    if layer is None:
      return self.encoder(x, frame_mask)[1], frame_mask
    index = normalize_layer(self.config, layer)
    hidden_states, _ = self.encoder(x, frame_mask, num_layers=index)
    return hidden_states[index], frame_mask

  def group_norm_moments(self, input_values: Array, sample_mask: Array | None,
                         frame_start: Array, frame_stop: Array) -> tuple[Array, Array, Array]:
    """(count [B], mean [B, C], centred sum of squares [B, C]) of the first conv's output.

    Taken over the valid first-conv frames in [frame_start, frame_stop) of each example, so
    the chunks of a long clip can each contribute their own frames to whole-clip statistics.
    """
    lengths = self._lengths(input_values, sample_mask)
    if sample_mask is not None:
      input_values = jnp.where(sample_mask, input_values, 0.0)
    return self.feature_extractor.first_conv_moments(input_values, lengths, frame_start,
                                                     frame_stop)


def normalize_layer(config: HubertConfig, layer: int) -> int:
  """Maps a hidden-state index (negative counts from the end) to 0..num_hidden_layers."""
  count = config.num_hidden_layers + 1
  if not -count <= layer < count:
    raise ValueError(f"layer {layer} is out of range for {count} hidden states "
                     f"(-{count}..{count - 1}); None selects last_hidden_state")
  return layer % count


def init_params(config: HubertConfig, rng: Array, num_samples: int = 4000) -> dict:
  """Random parameters (for tests and benchmarks; real weights come from `load_pretrained`)."""
  num_samples = max(num_samples, config.receptive_field)
  model = HubertModel(config)
  variables = jax.jit(model.init)(rng, jnp.zeros((1, num_samples), jnp.float32))
  return variables["params"]


# ---------------------------------------------------------------------------
# Checkpoint loading.

_HF_PREFIX = "hubert."
# Newer torch saves weight norm as a parametrization; older checkpoints (the hub's
# hubert-base-ls960) as weight_g / weight_v.
_PARAMETRIZATION_NAMES = {"parametrizations.weight.original0": "weight_g",
                          "parametrizations.weight.original1": "weight_v"}


def _flax_path(torch_name: str) -> tuple[str, ...]:
  """`encoder.layers.0.attention.q_proj.weight` -> ('encoder', 'layers_0', 'attention', ...)."""
  parts = torch_name.split(".")
  path: list[str] = []
  for part in parts:
    if part.isdigit():
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  return tuple(path)


def _expected_tensors(config: HubertConfig) -> dict[str, tuple[tuple[str, ...], str]]:
  """Torch state-dict name -> (flax param path, conversion) for `config`."""
  out: dict[str, tuple[tuple[str, ...], str]] = {}

  def linear(prefix):
    out[f"{prefix}.weight"] = (_flax_path(prefix) + ("kernel",), "linear")
    out[f"{prefix}.bias"] = (_flax_path(prefix) + ("bias",), "copy")

  def norm(prefix):
    out[f"{prefix}.weight"] = (_flax_path(prefix) + ("scale",), "copy")
    out[f"{prefix}.bias"] = (_flax_path(prefix) + ("bias",), "copy")

  for i in range(len(config.conv_dim)):
    prefix = f"feature_extractor.conv_layers.{i}"
    out[f"{prefix}.conv.weight"] = (_flax_path(prefix) + ("conv", "kernel"), "conv")
    if config.conv_bias:
      out[f"{prefix}.conv.bias"] = (_flax_path(prefix) + ("conv", "bias"), "copy")
    if config.feat_extract_norm == "layer" or i == 0:
      norm(f"{prefix}.layer_norm")
  if config.feat_proj_layer_norm:
    norm("feature_projection.layer_norm")
  linear("feature_projection.projection")
  for name in ("weight_g", "weight_v", "bias"):
    out[f"encoder.pos_conv_embed.conv.{name}"] = (
        ("encoder", "pos_conv_embed", "conv", name), "copy")
  norm("encoder.layer_norm")
  for i in range(config.num_hidden_layers):
    prefix = f"encoder.layers.{i}"
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      linear(f"{prefix}.attention.{proj}")
    norm(f"{prefix}.layer_norm")
    linear(f"{prefix}.feed_forward.intermediate_dense")
    linear(f"{prefix}.feed_forward.output_dense")
    norm(f"{prefix}.final_layer_norm")
  if config.has_masked_spec_embed:
    out["masked_spec_embed"] = (("masked_spec_embed",), "copy")
  return out


def _canonical_name(name: str) -> str:
  if name.startswith(_HF_PREFIX):
    name = name[len(_HF_PREFIX):]
  for long, short in _PARAMETRIZATION_NAMES.items():
    if name.endswith(long):
      name = name[:-len(long)] + short
  return name


def _limited(names: Sequence[str], limit: int = 20) -> str:
  names = sorted(names)
  more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def params_from_state_dict(state_dict: Mapping[str, Any], config: HubertConfig,
                           source: str = "<state dict>") -> dict:
  """Converts a torch `HubertModel` state dict (numpy arrays) to `HubertModel` params.

  Accepts the `hubert.` prefix of task models' checkpoints and both weight-norm spellings.
  Every tensor must be used and every parameter filled.

  Raises:
    HubertCheckpointError: missing, unexpected or ill-shaped tensors (all of them named).
  """
  expected = _expected_tensors(config)
  given: dict[str, Any] = {}
  for name, value in state_dict.items():
    canonical = _canonical_name(name)
    if canonical in given:
      raise HubertCheckpointError(f"{source}: tensor {canonical!r} appears twice")
    given[canonical] = value
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  if missing or unexpected:
    raise HubertCheckpointError(
        f"{source}: checkpoint does not fit the config (feat_extract_norm="
        f"{config.feat_extract_norm}, {config.num_hidden_layers} layers); missing tensors: "
        f"[{_limited(missing)}]; unexpected tensors: [{_limited(unexpected)}]")
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  params: dict = {}
  bad = []
  for name, (path, kind) in expected.items():
    value = np.asarray(given[name], dtype=np.float32)
    if kind == "linear":  # torch [out, in] -> flax [in, out]
      value = value.T
    elif kind == "conv":  # torch [out, in, kernel] -> flax [kernel, in, out]
      value = np.transpose(value, (2, 1, 0))
    want = functools.reduce(lambda tree, key: tree[key], path, shapes).shape
    if value.shape != tuple(want):
      bad.append(f"{name} {tuple(np.shape(given[name]))} (expected {tuple(want)} after "
                 f"conversion to {'/'.join(path)})")
      continue
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.asarray(value)
  if bad:
    raise HubertCheckpointError(f"{source}: tensors of the wrong shape: {'; '.join(bad)}")
  return params


def state_dict_from_params(params: Mapping[str, Any], config: HubertConfig) -> dict[str, np.ndarray]:
  """Inverse of `params_from_state_dict`: torch `HubertModel` names and layouts (numpy).

  Weight norm uses the legacy `weight_g` / `weight_v` names, which transformers loads too.
  """
  state = {}
  for name, (path, kind) in _expected_tensors(config).items():
    value = np.asarray(functools.reduce(lambda tree, key: tree[key], path, params), np.float32)
    if kind == "linear":
      value = value.T
    elif kind == "conv":
      value = np.transpose(value, (2, 1, 0))
    state[name] = np.ascontiguousarray(value)
  return state


def save_pretrained(model_dir: PathLike, config: HubertConfig, params: Mapping[str, Any]) -> None:
  """Writes `config.json` + `model.safetensors` that `load_pretrained` (and transformers) read."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  model_dir = pathlib.Path(model_dir)
  model_dir.mkdir(parents=True, exist_ok=True)
  fields = dataclasses.asdict(config)
  has_masked_spec_embed = fields.pop("has_masked_spec_embed")
  fields.update(model_type="hubert", architectures=["HubertModel"],
                num_feat_extract_layers=len(config.conv_dim),
                mask_time_prob=0.05 if has_masked_spec_embed else 0.0, mask_feature_prob=0.0)
  (model_dir / "config.json").write_text(json.dumps(fields, indent=2) + "\n", encoding="utf-8")
  save_file(state_dict_from_params(params, config), str(model_dir / "model.safetensors"))


def read_state_dict(model_dir: PathLike) -> tuple[dict[str, np.ndarray], str]:
  """Reads the weights of a HF checkpoint folder as numpy arrays: (state dict, file read).

  `model.safetensors` (or a sharded `model.safetensors.index.json`) is read with
  `safetensors.numpy`; `pytorch_model.bin` needs torch (`weights_only=True`).
  """
  model_dir = pathlib.Path(model_dir)
  if not model_dir.is_dir():
    raise HubertCheckpointError(f"no HuBERT checkpoint at {model_dir} (folder does not exist): "
                                + _download_hint(model_dir))
  single = model_dir / "model.safetensors"
  index = model_dir / "model.safetensors.index.json"
  binary = model_dir / "pytorch_model.bin"
  if single.is_file() or index.is_file():
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    files = [single] if single.is_file() else sorted(
        {model_dir / f for f in json.loads(index.read_text("utf-8"))["weight_map"].values()})
    state: dict[str, np.ndarray] = {}
    for path in files:
      if not path.is_file():
        raise HubertCheckpointError(f"{path}: missing weight shard: " + _download_hint(model_dir))
      state.update(load_file(str(path)))
    return state, str(files[0] if len(files) == 1 else index)
  if binary.is_file():
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise HubertCheckpointError(
          f"{binary}: reading pytorch_model.bin needs torch (pip install torch), or put "
          f"model.safetensors in {model_dir}") from None
    state_dict = torch.load(str(binary), map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() for k, v in state_dict.items()}, str(binary)
  raise HubertCheckpointError(f"no HuBERT weights in {model_dir} (model.safetensors or "
                              "pytorch_model.bin): " + _download_hint(model_dir))


def load_pretrained(model_dir: PathLike) -> tuple[HubertConfig, dict]:
  """(config, params) from a Hugging Face checkpoint folder, e.g. hubert-base-ls960's.

  Never touches the network; see `HubertCheckpointError` for what a bad folder reports.
  """
  config = HubertConfig.from_pretrained(model_dir)
  state_dict, source = read_state_dict(model_dir)
  return config, params_from_state_dict(state_dict, config, source)
