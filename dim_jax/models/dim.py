"""DIM: the dyadic interaction model (official `SLM` / `SLMFT` / `SpeakerSLMFT`), in Flax Linen.

One module holds every trainable part of the three DIM phases; each phase calls the methods
it needs (`model.apply(variables, ..., method=DIM.<name>)`).  The frozen VQ-VAE tokenizers are
separate `VQVAE` modules whose params live next to these in the task's param tree, so a
checkpoint of any phase holds everything needed to generate.

Official names (seq2seq_pretrain.py) -> ours:
  encoder_s / encoder_l / encoder_joint   -> speaker_encoder / listener_encoder / joint_encoder
  patch_embed_s / patch_embed_l           -> speaker_role_embedding / listener_role_embedding
  patch_embed_dec_s / patch_embed_dec_l   -> speaker_context_embedding / listener_context_embedding
  norm_s / norm_l / norm                  -> speaker_norm / listener_norm / joint_norm
  decoder_joint (AutoregressiveWrapper.net) -> joint_decoder
  SpeakerSLMFT.speaker_embed              -> identity_embedding (DIM-Speaker listener context)

Switches beyond the official model (each changes the parameter tree as stated):
  decoding='parallel'   the paper's masked joint decoding: a learned mask token (an extra
                        embedding row) at every position to predict, bidirectional decoder,
                        all positions in one pass.  Needs decoder positions (identical mask
                        inputs are otherwise indistinguishable).
  start='start_token'   an extra embedding row used as the first decoder input, so generation
                        needs no ground-truth token (official: the first ground-truth token).
  output='continuous'   the "no VQ" ablation: the decoder gets mask tokens only and a linear
                        `motion_head` regresses the 56 motion dims (no codebook, no tokens).
  two_branch=False      the "no speaker-listener two-branch" ablation: one motion encoder
                        (`speaker_encoder`) serves both roles and the joint encoder sees each
                        role alone (no cross-role attention); `listener_encoder` is absent.
  causal_context=True   (parameter tree unchanged) the joint decoder's cross-attention sees
                        only the context frames up to the frame each position predicts, so
                        with the causal SLMFT encoders no future speaker frame or audio reaches
                        a token (live streaming, `dim_jax/streaming.py`).  Official: the
                        x-transformers cross-attention has no mask, so every SLMFT decoder
                        position sees the whole window's speaker context.
  context_lag=L         (ours, with causal_context) each position sees the context only up to
                        L frames before the frame it predicts: a listener reacting L frames
                        late, so a live stream can compute frame t + 1 before frame t + 1
                        arrives (`dim_jax/streaming.py`, pipelined).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dim_jax.models import transformer

Array = jax.Array

DECODINGS = ("autoregressive", "parallel")
STARTS = ("ground_truth", "start_token")
OUTPUTS = ("tokens", "continuous")


@dataclasses.dataclass(frozen=True)
class DIMConfig:
  """Static architecture of DIM (official sizes by default).

  Attributes:
    motion_dim: per-frame motion width (pose 6 + expression 50).
    audio_dim: per-frame audio feature width (HuBERT 768).
    dim: width of the role and joint encoders (official 384).
    depth: blocks per encoder (official 4).
    heads: attention heads of width `dim_head` (official 12 x 64).
    dim_head: per-head width (x-transformers default 64).
    max_seq_len: rows of the learned position tables (official 2048).
    num_tokens: VQ codebook size = decoder vocabulary (official 512).
    decoder_depth / decoder_heads: joint decoder blocks and heads (official 4 / 12); its
      width is dim + audio_dim (official 1152).
    decoder_positions: learned absolute positions in the decoder (official: on in
      pretraining, off in SLMFT).
    decoding: 'autoregressive' (official) or 'parallel' (paper).
    start: 'ground_truth' (official) or 'start_token'.
    output: 'tokens' (official) or 'continuous' (no-VQ ablation).
    two_branch: separate speaker and listener encoders (official) or one shared.
    num_identities: rows of the DIM-Speaker identity table (0 = zero listener context, as
      official without speaker ids).
    audio_projection: 0 = the raw audio features join the decoder context (official, width
      dim + audio_dim); n > 0 = a learned Linear(audio_dim, n) first (ours, for small
      models: the 768-wide audio otherwise sets the decoder width).
    causal_context: decoder position p sees context frames <= the frame it predicts
      (`context_shift`); False = the whole context (official).
    context_lag: with causal_context, frames of reaction lag: position p sees context frames
      <= (the frame it predicts) - context_lag (at least frame 0); 0 = up to its own frame.
    token_factors: () (official) or (P, E): factorised embedding and logits over the two
      codes of a part-encoder tokenizer's token (`TokenDecoder.token_factors`).
    dtype: matmul input dtype (params float32, accumulation float32).
  """
  motion_dim: int = 56
  audio_dim: int = 768
  dim: int = 384
  depth: int = 4
  heads: int = 12
  dim_head: int = 64
  max_seq_len: int = 2048
  num_tokens: int = 512
  decoder_depth: int = 4
  decoder_heads: int = 12
  decoder_positions: bool = True
  decoding: str = "autoregressive"
  start: str = "ground_truth"
  output: str = "tokens"
  two_branch: bool = True
  num_identities: int = 0
  audio_projection: int = 0
  causal_context: bool = False
  context_lag: int = 0
  # Ours (() = official): (P, E) = factorised token embedding and logits over the pose and
  # expression codes (t // E, t % E) of part-encoder tokenizers; `TokenDecoder`.
  token_factors: tuple = ()
  dtype: Any = jnp.float32

  def __post_init__(self):
    for field, allowed in (("decoding", DECODINGS), ("start", STARTS), ("output", OUTPUTS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f"model.{field}={getattr(self, field)!r}; expected one of {allowed}")
    parallel = self.decoding == "parallel" or self.output == "continuous"
    if parallel and not self.decoder_positions:
      raise ValueError("model.decoder_positions must be True for parallel decoding and the "
                       "continuous head: their decoder inputs are all the same mask token, so "
                       "only positions tell the frames apart")
    object.__setattr__(self, "token_factors", tuple(int(k) for k in self.token_factors))
    if self.token_factors and (len(self.token_factors) != 2
                               or self.token_factors[0] * self.token_factors[1] != self.num_tokens):
      raise ValueError(f"model.token_factors={self.token_factors} with model.num_tokens="
                       f"{self.num_tokens}: expected () or (pose codes, expression codes) whose "
                       "product is num_tokens")
    if not isinstance(self.context_lag, int) or self.context_lag < 0:
      raise ValueError(f"model.context_lag={self.context_lag!r}; expected an int >= 0")
    if self.context_lag and not self.causal_context:
      raise ValueError(f"model.context_lag={self.context_lag} needs model.causal_context=True "
                       "(without it the decoder sees the whole window's context)")
    if self.causal_context and parallel:
      raise ValueError("model.causal_context needs autoregressive token decoding: a "
                       "bidirectional decoder would pass later frames' context back through "
                       "self-attention")

  @property
  def decoder_dim(self) -> int:
    return self.dim + (self.audio_projection or self.audio_dim)

  @property
  def start_token(self) -> int:
    """Input id of the start token (an embedding row past the vocabulary)."""
    return self.num_tokens

  @property
  def mask_token(self) -> int:
    """Input id of the mask token used by parallel decoding and the continuous head."""
    return self.num_tokens + 1

  @property
  def parallel(self) -> bool:
    return self.decoding == "parallel" or self.output == "continuous"

  @property
  def context_shift(self) -> Optional[int]:
    """Decoder position p may see context frames <= p + shift (None: all frames).

    Position p predicts the token of frame p + 1 without a start token (its input is frame
    p's token; frame 0 is given) and of frame p with one (position 0 is the start token), so
    the shift is 1 or 0: each prediction sees the context up to and including its own frame,
    exactly what a live listener has received when it must emit that frame; `context_lag`
    frames less with a reaction lag (the attention keeps at least frame 0).
    """
    if not self.causal_context:
      return None
    return (0 if self.start == "start_token" else 1) - self.context_lag

  @property
  def num_input_tokens(self) -> int:
    extra = 0
    if self.parallel:
      extra = 2  # rows num_tokens (unused start) and num_tokens + 1 (mask): fixed ids.
    elif self.start == "start_token":
      extra = 1
    return self.num_tokens + extra


def _torch_layer_norm() -> nn.LayerNorm:
  # torch nn.LayerNorm(dim): scale and bias, eps 1e-5, two-pass variance.
  return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False)


class DIM(nn.Module):
  """Role encoders, joint encoder and joint token decoder of DIM (see module docstring)."""
  config: DIMConfig

  def setup(self):
    cfg = self.config
    encoder = lambda dim_in: transformer.ContinuousEncoder(
        dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, max_seq_len=cfg.max_seq_len,
        dim_in=dim_in, dim_out=cfg.dim, dim_head=cfg.dim_head, dtype=cfg.dtype)
    self.speaker_encoder = encoder(cfg.motion_dim)
    if cfg.two_branch:
      self.listener_encoder = encoder(cfg.motion_dim)
    self.joint_encoder = encoder(cfg.dim)
    zeros = nn.initializers.zeros
    self.speaker_role_embedding = self.param("speaker_role_embedding", zeros, (cfg.motion_dim,))
    self.listener_role_embedding = self.param("listener_role_embedding", zeros, (cfg.motion_dim,))
    self.speaker_context_embedding = self.param("speaker_context_embedding", zeros, (cfg.dim,))
    self.listener_context_embedding = self.param("listener_context_embedding", zeros, (cfg.dim,))
    self.speaker_norm = _torch_layer_norm()
    self.listener_norm = _torch_layer_norm()
    self.joint_norm = _torch_layer_norm()
    self.joint_decoder = joint_decoder_module(cfg)
    if cfg.output == "continuous":
      self.motion_head = transformer.Linear(cfg.motion_dim, use_bias=True, dtype=cfg.dtype)
    if cfg.audio_projection > 0:
      self.audio_projector = transformer.Linear(cfg.audio_projection, use_bias=True,
                                                dtype=cfg.dtype)
    if cfg.num_identities > 0:
      self.identity_embedding = nn.Embed(cfg.num_identities, cfg.dim,
                                         embedding_init=nn.initializers.normal(1.0))

  # --- encoders -------------------------------------------------------------------------

  def _listener_encoder(self):
    return self.listener_encoder if self.config.two_branch else self.speaker_encoder

  def encode_dyad(self, speaker_motion: Array, listener_motion: Array, mask: Array,
                  speaker_hidden: Array, listener_hidden: Array) -> dict[str, Array]:
    """Pretraining encoder pass (official `SLM.forward_encoder`).

    Args:
      speaker_motion, listener_motion: [B, T, motion_dim].
      mask: [B, T] bool valid frames (both roles share it).
      speaker_hidden, listener_hidden: [B, T] bool frames zeroed before encoding (the
        masked-reconstruction targets).

    Returns:
      dict with `joint_speaker`, `joint_listener` ([B, T, dim], from the joint encoder over
      both roles, normed by `joint_norm`) and `speaker_alone`, `listener_alone` (the joint
      encoder on each role separately, normed by `speaker_norm` / `listener_norm`: the
      contrastive features).
    """
    cfg = self.config
    # Role embedding added, then masked frames zeroed (the official order).
    speaker_in = jnp.where(speaker_hidden[..., None], 0.0,
                           speaker_motion + self.speaker_role_embedding)
    listener_in = jnp.where(listener_hidden[..., None], 0.0,
                            listener_motion + self.listener_role_embedding)
    speaker_x = self.speaker_encoder(speaker_in, mask)
    listener_x = self._listener_encoder()(listener_in, mask)
    t = speaker_x.shape[1]
    if cfg.two_branch:
      # Both roles in one sequence along time (official); the listener's frames sit at
      # positions T..2T-1 of the joint position table.
      joint = self.joint_encoder(jnp.concatenate([speaker_x, listener_x], axis=1),
                                 jnp.concatenate([mask, mask], axis=1))
      joint = self.joint_norm(joint)
      joint_speaker, joint_listener = joint[:, :t], joint[:, t:]
    else:
      joint_speaker = self.joint_norm(self.joint_encoder(speaker_x, mask))
      joint_listener = self.joint_norm(self.joint_encoder(listener_x, mask))
    return dict(joint_speaker=joint_speaker, joint_listener=joint_listener,
                speaker_alone=self.speaker_norm(self.joint_encoder(speaker_x, mask)),
                listener_alone=self.listener_norm(self.joint_encoder(listener_x, mask)))

  def encode_speaker(self, speaker_motion: Array, mask: Array, causal: bool = True) -> Array:
    """DIM-Listener encoder pass (official `SLMFT.forward_encoder`): [B, T, dim].

    The official fine-tuning encoders are causal (`attn_mask=~triu(ones, 1)`).
    """
    x = speaker_motion + self.speaker_role_embedding
    x = self.speaker_encoder(x, mask, causal=causal)
    x = self.joint_encoder(x, mask, causal=causal)
    return self.speaker_norm(x)

  def encode_speaker_step(self, speaker_motion: Array, index: Array,
                          caches: dict) -> tuple[Array, dict]:
    """Incremental `encode_speaker` (causal) for streaming: frames at index..index+n-1.

    Args:
      speaker_motion: [B, n, motion_dim] new frames.
      index: scalar int position of speaker_motion[:, 0] in the window.
      caches: {'speaker', 'joint'} K/V buffers (`init_encoder_caches`).

    Returns:
      ([B, n, dim] features equal to the causal whole-window pass's rows, updated caches).
    """
    x = speaker_motion + self.speaker_role_embedding
    x, speaker = self.speaker_encoder(x, cache=caches["speaker"], cache_index=index)
    x, joint = self.joint_encoder(x, cache=caches["joint"], cache_index=index)
    return self.speaker_norm(x), dict(speaker=speaker, joint=joint)

  # --- decoder --------------------------------------------------------------------------

  def decoder_context(self, features: Array, audio: Array, role: str) -> Array:
    """[features + role context embedding ; audio] -> [B, T, dim + audio_dim].

    `role` names whose features these are (official: x_s + patch_embed_dec_s).
    """
    embedding = (self.speaker_context_embedding if role == "speaker"
                 else self.listener_context_embedding)
    audio = audio.astype(jnp.float32)
    if self.config.audio_projection > 0:
      audio = self.audio_projector(audio)
    return jnp.concatenate([features + embedding, audio], axis=-1)

  def identity_context(self, identity: Optional[Array], batch: int, frames: int) -> Array:
    """DIM-Speaker listener features: a learned identity row, or zeros (official default)."""
    if self.config.num_identities == 0 or identity is None:
      return jnp.zeros((batch, frames, self.config.dim), jnp.float32)
    return jnp.broadcast_to(self.identity_embedding(identity)[:, None, :],
                            (batch, frames, self.config.dim))

  def decode(self, tokens: Array, context: Array, context_mask: Array,
             self_key_mask: Optional[Array] = None, mask: Optional[Array] = None,
             factor_logits: bool = False) -> Array:
    """Joint decoder logits [B, N, num_tokens] for decoder input ids `tokens` [B, N]
    ([B, N, P + E] per-code logits with `factor_logits` and token_factors (P, E))."""
    return self.joint_decoder(tokens, context, context_mask, mask=mask,
                              self_key_mask=self_key_mask, factor_logits=factor_logits)

  def regress(self, context: Array, context_mask: Array, mask: Array) -> Array:
    """No-VQ ablation: motion [B, T, motion_dim] regressed from mask-token decoder features."""
    tokens = jnp.full(context.shape[:2], self.config.mask_token, jnp.int32)
    features = self.joint_decoder(tokens, context, context_mask, mask=mask,
                                  return_embeddings=True)
    return self.motion_head(features)

  def __call__(self, speaker_motion: Array, listener_motion: Array, audio: Array, mask: Array):
    """Touches every parameter (for `init`); returns pretraining-style outputs."""
    hidden = jnp.zeros_like(mask)
    enc = self.encode_dyad(speaker_motion, listener_motion, mask, hidden, hidden)
    self.encode_speaker(speaker_motion, mask)
    context = self.decoder_context(enc["joint_speaker"], audio, "speaker")
    tokens = jnp.zeros(mask.shape, jnp.int32)
    out = dict(enc, logits=self.decode(tokens, context, mask))
    if self.config.output == "continuous":
      out["motion"] = self.regress(context, mask, mask)
    if self.config.num_identities > 0:
      self.identity_context(jnp.zeros(mask.shape[:1], jnp.int32), *mask.shape)
    return out


def joint_decoder_module(cfg: DIMConfig) -> transformer.TokenDecoder:
  """The joint decoder alone (params: `params['joint_decoder']`), e.g. for cached sampling."""
  return transformer.TokenDecoder(
      num_tokens=cfg.num_tokens, dim=cfg.decoder_dim, depth=cfg.decoder_depth,
      heads=cfg.decoder_heads, max_seq_len=cfg.max_seq_len,
      use_abs_pos_emb=cfg.decoder_positions, dim_head=cfg.dim_head, dtype=cfg.dtype,
      num_input_tokens=cfg.num_input_tokens, causal=not cfg.parallel,
      context_shift=cfg.context_shift, token_factors=cfg.token_factors)


def init_encoder_caches(cfg: DIMConfig, batch: int, length: int) -> dict:
  """Zero K/V buffers of the speaker and joint encoders for `DIM.encode_speaker_step`."""
  shape = (batch, cfg.heads, length, cfg.dim_head)
  cache = lambda: [{"k": jnp.zeros(shape), "v": jnp.zeros(shape)} for _ in range(cfg.depth)]
  return dict(speaker=cache(), joint=cache())


def dim_config_from(model_config) -> DIMConfig:
  """Builds the static DIMConfig from the run config's `model.dim` ConfigDict."""
  fields = {f.name for f in dataclasses.fields(DIMConfig)}
  values = dict(model_config)
  unknown = set(values) - fields - {"compute_dtype"}
  if unknown:
    raise ValueError(f"unknown model.dim fields: {sorted(unknown)}")
  dtype = values.pop("compute_dtype", "float32")
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"model.dim.compute_dtype={dtype!r}; expected 'float32' or 'bfloat16'")
  values.pop("dtype", None)
  return DIMConfig(**values, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
