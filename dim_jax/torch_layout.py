"""Official PyTorch state_dict layouts <-> dim_jax parameter trees (NumPy only, no torch).

The official classes (authors' code, x-transformers 1.30.16) and the phase whose checkpoint
maps onto each:

  phase vq            VQAutoEncoder  (models/stage1_BIWI.py)
  phase pretrain      SLM            (seq2seq_pretrain.py; decoder positions, mask_prob 0)
  finetune_listener   SLMFT          (no decoder positions, mask_prob 0.15)
  finetune_speaker    SpeakerSLMFT   (the shared parts; its BiWi mesh converter has no
                                      counterpart here)

Name rules (ours -> official; kernels of Linear layers are transposed, [in, out] -> [out, in]):

  VQ-VAE (`speaker_vq/`, `listener_vq/` inside DIM):
    encoder/vertice_mapping           encoder.vertice_mapping.0
    encoder/squasher/conv             encoder.squasher.0.0      (conv [5, in, out] -> [out, in, 5])
    encoder/linear_embedding          encoder.encoder_linear_embedding.net
    encoder/transformer/block_i/      encoder.encoder_transformer.net.{2i}   attn_norm -> .fn.norm,
                                        attn/to_qkv -> .fn.fn.to_qkv, attn/to_out -> .fn.fn.to_out
                                      encoder.encoder_transformer.net.{2i+1} mlp_norm -> .fn.norm,
                                        l1 / l2 -> .fn.fn.l1 / .fn.fn.l2
    encoder/linear_embedding_post     encoder.encoder_linear_embedding_post.net
    quantizer/codebook                quantize.embedding.weight
    decoder/linear_embedding_pre      decoder.decoder_linear_embedding_pre.net
    decoder/expander/conv             decoder.expander.0.0
    decoder/linear_embedding          decoder.decoder_linear_embedding.net
    decoder/transformer               decoder.decoder_transformer (as the encoder's)
    decoder/vertice_map_reverse       decoder.vertice_map_reverse
    LayerNorm scale / bias            .weight / .bias
    (computed on export)              encoder.encoder_pos_embedding.pe,
                                      decoder.decoder_pos_embedding.pe: the sinusoid buffers
                                      [5000, 1, hidden]
  DIM (`dim/`):
    speaker_encoder / listener_encoder / joint_encoder   encoder_s / encoder_l / encoder_joint
    joint_decoder                     decoder_joint.net  (AutoregressiveWrapper.net)
    speaker_role_embedding [56]       patch_embed_s [1, 1, 56]    (listener_: patch_embed_l)
    speaker_context_embedding [d]     patch_embed_dec_s [1, 1, d] (listener_: patch_embed_dec_l)
    speaker_norm / listener_norm / joint_norm            norm_s / norm_l / norm
    inside the x-transformers stacks: `transformer.py`'s `to_torch_state_dict` (positional:
    layers_{i} -> attn_layers.layers.{i}, pos_emb -> pos_emb.emb.weight, ...)

What one side has and the other lacks is reported, never dropped silently (`Comparison`):
the official layout of a configuration is enumerated here (`official_shapes`), and the tests
check that enumeration against the reference classes' own state_dicts.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from dim_jax import errors
from dim_jax.models import dim as dim_lib
from dim_jax.models import transformer
from dim_jax.models import vqvae

X_TRANSFORMERS_VERSION = "1.30.16"
PE_ROWS = 5000  # official PositionalEncoding(d_model) always builds its default 5000 rows
# The official DIM-Speaker's BiWi mesh converter (seq2seq_pretrain.EmocaConverter): 23370
# vertices x 3, a 2-layer bidirectional LSTM of width 384, a 15-row speaker table.
BIWI_MESH_SIZE = 70110
BIWI_LSTM_HIDDEN = 384
OFFICIAL_SPEAKER_ROWS = 15

OFFICIAL_CLASSES = {"vq": "VQAutoEncoder", "pretrain": "SLM", "finetune_listener": "SLMFT",
                    "finetune_speaker": "SpeakerSLMFT"}
DIM_PHASES = ("pretrain", "finetune_listener", "finetune_speaker")

Shapes = dict[str, tuple[int, ...]]


class LayoutError(errors.DimJaxError, ValueError):
  """A parameter tree or state_dict does not fit the layout it is mapped to."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested dict."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, name + "/"))
    else:
      out[name] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for name, value in flat.items():
    node = out
    *parents, leaf = name.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out


def _f32(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def _linear_t(x) -> np.ndarray:
  return np.ascontiguousarray(_f32(x).T)


def _conv_t(x) -> np.ndarray:
  # flax Conv [width, in, out] <-> torch Conv1d [out, in, width] (both cross-correlate).
  return np.ascontiguousarray(np.transpose(_f32(x), (2, 1, 0)))


# --- VQ-VAE ---------------------------------------------------------------------------------

def vq_entries(cfg: vqvae.VQConfig) -> list[tuple[str, str, str]]:
  """(torch key, our path, transform) for every VQ parameter; transform: 'linear' (transpose),
  'conv' ([5, in, out] <-> [out, in, 5]) or 'copy'."""
  entries = []

  def linear(torch_name, ours, bias=True):
    entries.append((f"{torch_name}.weight", f"{ours}/kernel", "linear"))
    if bias:
      entries.append((f"{torch_name}.bias", f"{ours}/bias", "copy"))

  def norm(torch_name, ours):
    entries.append((f"{torch_name}.weight", f"{ours}/scale", "copy"))
    entries.append((f"{torch_name}.bias", f"{ours}/bias", "copy"))

  def conv(torch_name, ours):
    entries.append((f"{torch_name}.weight", f"{ours}/conv/kernel", "conv"))
    entries.append((f"{torch_name}.bias", f"{ours}/conv/bias", "copy"))

  def stack(torch_name, ours):
    for i in range(cfg.num_layers):
      attn, mlp = f"{torch_name}.net.{2 * i}", f"{torch_name}.net.{2 * i + 1}"
      block = f"{ours}/block_{i}"
      norm(f"{attn}.fn.norm", f"{block}/attn_norm")
      linear(f"{attn}.fn.fn.to_qkv", f"{block}/attn/to_qkv", bias=False)
      linear(f"{attn}.fn.fn.to_out", f"{block}/attn/to_out")
      norm(f"{mlp}.fn.norm", f"{block}/mlp_norm")
      linear(f"{mlp}.fn.fn.l1", f"{block}/l1")
      linear(f"{mlp}.fn.fn.l2", f"{block}/l2")

  linear("encoder.vertice_mapping.0", "encoder/vertice_mapping")
  conv("encoder.squasher.0.0", "encoder/squasher")
  linear("encoder.encoder_linear_embedding.net", "encoder/linear_embedding")
  stack("encoder.encoder_transformer", "encoder/transformer")
  linear("encoder.encoder_linear_embedding_post.net", "encoder/linear_embedding_post")
  entries.append(("quantize.embedding.weight", "quantizer/codebook", "copy"))
  linear("decoder.decoder_linear_embedding_pre.net", "decoder/linear_embedding_pre")
  conv("decoder.expander.0.0", "decoder/expander")
  linear("decoder.decoder_linear_embedding.net", "decoder/linear_embedding")
  stack("decoder.decoder_transformer", "decoder/transformer")
  linear("decoder.vertice_map_reverse", "decoder/vertice_map_reverse", bias=False)
  return entries


VQ_BUFFERS = ("encoder.encoder_pos_embedding.pe", "decoder.decoder_pos_embedding.pe")


def vq_official_shapes(cfg: vqvae.VQConfig) -> Shapes:
  """The official VQAutoEncoder's state_dict layout (parameters and the two pe buffers)."""
  h, m, d, k = cfg.hidden_size, cfg.mlp_dim, cfg.code_dim, cfg.codebook_size
  shapes = {"encoder.vertice_mapping.0.weight": (h, cfg.in_dim),
            "encoder.vertice_mapping.0.bias": (h,),
            "quantize.embedding.weight": (k, d),
            "decoder.vertice_map_reverse.weight": (cfg.in_dim, h)}
  for side in ("encoder", "decoder"):
    conv = "encoder.squasher.0.0" if side == "encoder" else "decoder.expander.0.0"
    shapes[f"{conv}.weight"], shapes[f"{conv}.bias"] = (h, h, 5), (h,)
    shapes[f"{side}.{side}_linear_embedding.net.weight"] = (h, h)
    shapes[f"{side}.{side}_linear_embedding.net.bias"] = (h,)
    shapes[f"{side}.{side}_pos_embedding.pe"] = (PE_ROWS, 1, h)
    for i in range(cfg.num_layers):
      attn = f"{side}.{side}_transformer.net.{2 * i}"
      mlp = f"{side}.{side}_transformer.net.{2 * i + 1}"
      shapes.update({f"{attn}.fn.norm.weight": (h,), f"{attn}.fn.norm.bias": (h,),
                     f"{attn}.fn.fn.to_qkv.weight": (3 * h, h),
                     f"{attn}.fn.fn.to_out.weight": (h, h), f"{attn}.fn.fn.to_out.bias": (h,),
                     f"{mlp}.fn.norm.weight": (h,), f"{mlp}.fn.norm.bias": (h,),
                     f"{mlp}.fn.fn.l1.weight": (m, h), f"{mlp}.fn.fn.l1.bias": (m,),
                     f"{mlp}.fn.fn.l2.weight": (h, m), f"{mlp}.fn.fn.l2.bias": (h,)})
  shapes["encoder.encoder_linear_embedding_post.net.weight"] = (d, h)
  shapes["encoder.encoder_linear_embedding_post.net.bias"] = (d,)
  shapes["decoder.decoder_linear_embedding_pre.net.weight"] = (h, d)
  shapes["decoder.decoder_linear_embedding_pre.net.bias"] = (h,)
  return shapes


def pe_buffer(hidden_size: int) -> np.ndarray:
  """The official PositionalEncoding buffer `pe`: [5000, 1, hidden] float32."""
  return vqvae.sinusoid_table(PE_ROWS, hidden_size)[:, None, :]


def _check_vq_supported(cfg: vqvae.VQConfig) -> None:
  if cfg.code_groups != 1:
    raise LayoutError(f"model.code_groups={cfg.code_groups} (product quantizer) has no official "
                      "layout: the official VectorQuantizer holds one [codebook_size, code_dim] "
                      "table")


def vq_to_torch(params: Mapping[str, Any], cfg: vqvae.VQConfig) -> dict[str, np.ndarray]:
  """VQVAE params (the inner dict) -> official names and layouts, pe buffers included."""
  _check_vq_supported(cfg)
  flat = flatten(params)
  transform = {"linear": _linear_t, "conv": _conv_t, "copy": _f32}
  sd = {key: transform[kind](flat[path]) for key, path, kind in vq_entries(cfg)}
  for key in VQ_BUFFERS:
    sd[key] = pe_buffer(cfg.hidden_size)
  return sd


def vq_from_torch(sd: Mapping[str, np.ndarray], cfg: vqvae.VQConfig) -> dict:
  """Official VQAutoEncoder state_dict (prefix removed) -> our nested params (pe ignored)."""
  _check_vq_supported(cfg)
  transform = {"linear": _linear_t, "conv": _conv_t, "copy": _f32}
  return unflatten({path: transform[kind](sd[key]) for key, path, kind in vq_entries(cfg)})


def vq_official_args(cfg: vqvae.VQConfig) -> dict[str, Any]:
  """Keyword fields of the official config.yaml (NETWORK + VQuantizer) for this tokenizer."""
  return dict(in_dim=cfg.in_dim, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim, quant_factor=0,
              face_quan_num=1, neg=cfg.leaky_slope, INaffine=False, n_embed=cfg.codebook_size,
              zquant_dim=cfg.code_dim)


def vq_behaviour_differences(cfg: vqvae.VQConfig, prefix: str = "") -> list[str]:
  """Switches of ours under which the official class computes something else."""
  out = []
  if cfg.positional_encoding not in ("official_batch_index", "official_first_row"):
    out.append(f"{prefix}model.positional_encoding={cfg.positional_encoding!r}: the official "
               "PositionalEncoding adds the table row of the batch position to every frame "
               "(row 0 in the official batch-size-1 calls), ours adds "
               + ("the row of each frame's time" if cfg.positional_encoding == "time"
                  else "nothing"))
  if cfg.codebook_normalize:
    out.append(f"{prefix}model.codebook_normalize=True: ours searches and decodes l2-normalised "
               "codes; the official quantizer uses the raw table")
  if cfg.conv_norm != "instance":
    out.append(f"{prefix}model.conv_norm={cfg.conv_norm!r}: the official conv blocks end in "
               "InstanceNorm1d over time")
  if cfg.beta != 0.25:
    out.append(f"{prefix}model.beta={cfg.beta}: the official quantizer fixes beta 0.25 "
               "(training loss only)")
  if cfg.dropout_rate != 0.1:
    out.append(f"{prefix}model.dropout_rate={cfg.dropout_rate}: the official positional "
               "dropout is 0.1 (training mode only)")
  return out


def infer_vq_config(shapes: Mapping[str, tuple], num_heads: int, where: str) -> dict[str, Any]:
  """VQConfig fields read off an official VQAutoEncoder layout (prefix removed).

  The head count is not in the shapes (to_qkv is [3 * hidden, hidden] whatever the heads),
  so it is an argument (official 8).
  """
  needed = ("encoder.vertice_mapping.0.weight", "encoder.encoder_linear_embedding_post.net.weight",
            "quantize.embedding.weight", "encoder.encoder_transformer.net.1.fn.fn.l1.weight")
  missing = [k for k in needed if k not in shapes]
  if missing:
    raise LayoutError(f"{where}: not an official VQAutoEncoder layout: missing "
                      f"{', '.join(missing)}")
  hidden, in_dim = shapes["encoder.vertice_mapping.0.weight"]
  codebook_size, code_dim = shapes["quantize.embedding.weight"]
  counts = {}
  for side in ("encoder", "decoder"):
    pattern = re.compile(rf"{side}\.{side}_transformer\.net\.(\d+)\.fn\.norm\.weight$")
    sublayers = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    counts[side] = len(sublayers) // 2
  if counts["encoder"] != counts["decoder"] or counts["encoder"] == 0:
    raise LayoutError(f"{where}: encoder and decoder transformers have {counts['encoder']} and "
                      f"{counts['decoder']} layers; dim_jax's VQ-VAE needs the same number (> 0)")
  if hidden % num_heads:
    raise LayoutError(f"{where}: hidden size {hidden} is not divisible by {num_heads} heads "
                      "(pass the tokenizer's head count)")
  return dict(in_dim=int(in_dim), hidden_size=int(hidden), num_layers=counts["encoder"],
              num_heads=int(num_heads),
              mlp_dim=int(shapes["encoder.encoder_transformer.net.1.fn.fn.l1.weight"][0]),
              codebook_size=int(codebook_size), code_dim=int(code_dim))


# --- DIM ------------------------------------------------------------------------------------

def _encoder_module(cfg: dim_lib.DIMConfig, dim_in: int) -> transformer.ContinuousEncoder:
  # As DIM.setup builds its encoders.
  return transformer.ContinuousEncoder(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                                       max_seq_len=cfg.max_seq_len, dim_in=dim_in,
                                       dim_out=cfg.dim, dim_head=cfg.dim_head)


def _xt_encoder_shapes(prefix: str, dim_in: int, dim: int, depth: int, inner: int,
                       max_seq_len: int) -> Shapes:
  shapes = {f"{prefix}.pos_emb.emb.weight": (max_seq_len, dim),
            f"{prefix}.project_in.weight": (dim, dim_in),
            f"{prefix}.project_out.weight": (dim, dim),
            f"{prefix}.attn_layers.final_norm.weight": (dim,)}
  shapes.update(_xt_layer_shapes(prefix, dim, depth, inner, ("a", "f")))
  return shapes


def _xt_layer_shapes(prefix: str, dim: int, depth: int, inner: int, block) -> Shapes:
  shapes = {}
  for i in range(depth * len(block)):
    layer = f"{prefix}.attn_layers.layers.{i}"
    shapes[f"{layer}.0.0.weight"] = (dim,)
    if block[i % len(block)] in ("a", "c"):
      for name in ("to_q", "to_k", "to_v"):
        shapes[f"{layer}.1.{name}.weight"] = (inner, dim)
      shapes[f"{layer}.1.to_out.weight"] = (dim, inner)
    else:
      shapes.update({f"{layer}.1.ff.0.0.weight": (4 * dim, dim),
                     f"{layer}.1.ff.0.0.bias": (4 * dim,),
                     f"{layer}.1.ff.2.weight": (dim, 4 * dim), f"{layer}.1.ff.2.bias": (dim,)})
  shapes[f"{prefix}.attn_layers.final_norm.weight"] = (dim,)
  return shapes


def _lstm_shapes(prefix: str, input_size: int, hidden: int) -> Shapes:
  shapes = {}
  for layer in range(2):
    width = input_size if layer == 0 else 2 * hidden
    for suffix in ("", "_reverse"):
      shapes[f"{prefix}.weight_ih_l{layer}{suffix}"] = (4 * hidden, width)
      shapes[f"{prefix}.weight_hh_l{layer}{suffix}"] = (4 * hidden, hidden)
      shapes[f"{prefix}.bias_ih_l{layer}{suffix}"] = (4 * hidden,)
      shapes[f"{prefix}.bias_hh_l{layer}{suffix}"] = (4 * hidden,)
  return shapes


def dim_official_shapes(phase: str, cfg: dim_lib.DIMConfig, speaker_vq: vqvae.VQConfig,
                        listener_vq: vqvae.VQConfig, *, mesh_size: int = BIWI_MESH_SIZE,
                        lstm_hidden: int = BIWI_LSTM_HIDDEN,
                        speaker_rows: int = OFFICIAL_SPEAKER_ROWS) -> Shapes:
  """The official SLM / SLMFT / SpeakerSLMFT state_dict layout for these sizes.

  Built like the official constructors: both tokenizers, three encoders, the embeddings and
  norms, and an x-transformers decoder of width dim + audio_dim over the *raw* audio (ours
  with `audio_projection` has no official counterpart); decoder positions in SLM and
  SpeakerSLMFT only. SpeakerSLMFT adds the BiWi mesh converter (sizes as arguments).
  """
  d, inner = cfg.dim, cfg.heads * cfg.dim_head
  width = cfg.dim + cfg.audio_dim
  shapes: Shapes = {}
  for role, vq in (("speaker", speaker_vq), ("listener", listener_vq)):
    shapes.update({f"{role}_vq.{k}": v for k, v in vq_official_shapes(vq).items()})
  for name, dim_in in (("encoder_s", cfg.motion_dim), ("encoder_l", cfg.motion_dim),
                       ("encoder_joint", d)):
    shapes.update(_xt_encoder_shapes(name, dim_in, d, cfg.depth, inner, cfg.max_seq_len))
  shapes.update({"patch_embed_s": (1, 1, cfg.motion_dim), "patch_embed_l": (1, 1, cfg.motion_dim),
                 "patch_embed_dec_s": (1, 1, d), "patch_embed_dec_l": (1, 1, d)})
  for norm in ("norm_s", "norm_l", "norm"):
    shapes[f"{norm}.weight"], shapes[f"{norm}.bias"] = (d,), (d,)
  dec = "decoder_joint.net"
  shapes[f"{dec}.token_emb.emb.weight"] = (cfg.num_tokens, width)
  if phase != "finetune_listener":
    shapes[f"{dec}.pos_emb.emb.weight"] = (cfg.max_seq_len, width)
  shapes.update(_xt_layer_shapes(dec, width, cfg.decoder_depth, cfg.decoder_heads * cfg.dim_head,
                                 ("a", "c", "f")))
  shapes[f"{dec}.to_logits.weight"] = (cfg.num_tokens, width)
  if phase == "finetune_speaker":
    m = cfg.motion_dim
    shapes.update({"vertice_mapping.0.weight": (m, mesh_size), "vertice_mapping.0.bias": (m,),
                   "squasher.0.0.weight": (m, m, 5), "squasher.0.0.bias": (m,),
                   "W": (2,), "speaker_embed.weight": (speaker_rows, d)})
    for name in ("vertice_map_reverse_lstm", "vertice_map_reverse_lstm_2"):
      shapes.update(_lstm_shapes(name, m, lstm_hidden))
    for name in ("vertice_map_reverse", "vertice_map_reverse2"):
      shapes.update({f"{name}.0.weight": (2 * lstm_hidden, 2 * lstm_hidden),
                     f"{name}.0.bias": (2 * lstm_hidden,),
                     f"{name}.2.weight": (mesh_size, 2 * lstm_hidden),
                     f"{name}.2.bias": (mesh_size,)})
  return shapes


# (official name, our path, transform) of the DIM parameters outside the x-transformers stacks.
_DIM_SMALL = (("patch_embed_s", "dim/speaker_role_embedding", "embed"),
              ("patch_embed_l", "dim/listener_role_embedding", "embed"),
              ("patch_embed_dec_s", "dim/speaker_context_embedding", "embed"),
              ("patch_embed_dec_l", "dim/listener_context_embedding", "embed"),
              ("norm_s.weight", "dim/speaker_norm/scale", "copy"),
              ("norm_s.bias", "dim/speaker_norm/bias", "copy"),
              ("norm_l.weight", "dim/listener_norm/scale", "copy"),
              ("norm_l.bias", "dim/listener_norm/bias", "copy"),
              ("norm.weight", "dim/joint_norm/scale", "copy"),
              ("norm.bias", "dim/joint_norm/bias", "copy"))
# Our DIM submodules the mapping covers (the rest, e.g. audio_projector, has no official twin).
_DIM_MAPPED = ("speaker_encoder", "listener_encoder", "joint_encoder", "joint_decoder",
               "speaker_role_embedding", "listener_role_embedding", "speaker_context_embedding",
               "listener_context_embedding", "speaker_norm", "listener_norm", "joint_norm")
_STACKS = (("encoder_s", "speaker_encoder"), ("encoder_l", "listener_encoder"),
           ("encoder_joint", "joint_encoder"))


def dim_to_torch(params: Mapping[str, Any], cfg: dim_lib.DIMConfig, speaker_vq: vqvae.VQConfig,
                 listener_vq: vqvae.VQConfig) -> tuple[dict[str, np.ndarray], Shapes]:
  """A DIM task's params {'dim', 'speaker_vq', 'listener_vq'} -> (state_dict candidates in the
  official names, {our path: shape} of parameters with no official name)."""
  if cfg.token_factors:
    raise LayoutError(f"model.token_factors={cfg.token_factors} (factorised head) has no "
                      "official layout: x-transformers holds one [num_tokens, dim] embedding "
                      "and one [num_tokens, dim] logit table")
  sd: dict[str, np.ndarray] = {}
  for role, vq in (("speaker", speaker_vq), ("listener", listener_vq)):
    sd.update({f"{role}_vq.{k}": v for k, v in vq_to_torch(params[f"{role}_vq"], vq).items()})
  ours = params["dim"]
  for torch_name, name in _STACKS:
    if name in ours:
      dim_in = cfg.motion_dim if torch_name != "encoder_joint" else cfg.dim
      sd.update({f"{torch_name}.{k}": v for k, v in
                 _encoder_module(cfg, dim_in).to_torch_state_dict(ours[name]).items()})
  decoder = dim_lib.joint_decoder_module(cfg)
  sd.update({f"decoder_joint.net.{k}": v
             for k, v in decoder.to_torch_state_dict(ours["joint_decoder"]).items()})
  flat = flatten(params)
  for key, path, kind in _DIM_SMALL:
    if path in flat:
      sd[key] = _f32(flat[path]).reshape(1, 1, -1) if kind == "embed" else _f32(flat[path])
  unmapped = {f"dim/{path}": tuple(np.shape(v)) for path, v in flatten(ours).items()
              if path.split("/")[0] not in _DIM_MAPPED}
  return sd, unmapped


def dim_from_torch(sd: Mapping[str, np.ndarray], cfg: dim_lib.DIMConfig,
                   speaker_vq: vqvae.VQConfig, listener_vq: vqvae.VQConfig) -> dict:
  """Official SLM / SLMFT / SpeakerSLMFT state_dict -> our params {'dim', 'speaker_vq',
  'listener_vq'} for a DIM of `cfg`, which must be an official variant (no audio projection,
  identity table, start/mask token rows or regression head: the file has none of them)."""
  if cfg.num_input_tokens != cfg.num_tokens or cfg.audio_projection or cfg.num_identities:
    raise LayoutError("an official checkpoint has no parameters for model.start='start_token', "
                      "parallel decoding, the no-VQ head, model.audio_projection or "
                      "model.num_identities")
  sub = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  dim: dict[str, Any] = {}
  for torch_name, name in _STACKS:
    if name == "listener_encoder" and not cfg.two_branch:
      continue
    dim_in = cfg.motion_dim if torch_name != "encoder_joint" else cfg.dim
    dim[name] = _encoder_module(cfg, dim_in).from_torch_state_dict(sub(f"{torch_name}."))
  dim["joint_decoder"] = dim_lib.joint_decoder_module(cfg).from_torch_state_dict(
      sub("decoder_joint.net."))
  small = {}
  for key, path, kind in _DIM_SMALL:
    small[path] = _f32(sd[key]).reshape(-1) if kind == "embed" else _f32(sd[key])
  dim.update(unflatten(small)["dim"])
  return dict(dim=dim, speaker_vq=vq_from_torch(sub("speaker_vq."), speaker_vq),
              listener_vq=vq_from_torch(sub("listener_vq."), listener_vq))


def dim_official_args(cfg: dim_lib.DIMConfig) -> dict[str, Any]:
  """The sizes the official SLM / SLMFT constructors hard-code, for this model."""
  return dict(dim_in=cfg.motion_dim, dim=cfg.dim, dim_a=cfg.audio_dim, depth=cfg.depth,
              heads=cfg.heads, dim_head=cfg.dim_head, max_seq_len=cfg.max_seq_len,
              num_tokens=cfg.num_tokens, dec_depth=cfg.decoder_depth, dec_heads=cfg.decoder_heads)


def dim_behaviour_differences(phase: str, cfg: dim_lib.DIMConfig) -> list[str]:
  """Switches of ours under which the official class computes something else."""
  out = []
  official_positions = phase != "finetune_listener"
  if cfg.decoder_positions != official_positions:
    out.append(f"model.decoder_positions={cfg.decoder_positions}: the official "
               f"{OFFICIAL_CLASSES[phase]} decoder has {'no ' if not official_positions else ''}"
               "absolute positions")
  if cfg.decoding != "autoregressive":
    out.append("model.decoding='parallel': the official decoder is autoregressive (causal)")
  if cfg.start != "ground_truth":
    out.append("model.start='start_token': the official decoder has no start-token row")
  if getattr(cfg, "causal_context", False):
    out.append("model.causal_context=True: trained with cross-attention to frames up to the "
               "predicted one; the official decoder's cross-attention sees the whole window "
               "(pass a causal context mask to reproduce ours)")
  if getattr(cfg, "context_lag", 0):
    out.append(f"model.context_lag={cfg.context_lag}: the causal context mask ends "
               f"{cfg.context_lag} frame(s) before the predicted frame")
  if cfg.output != "tokens":
    out.append("model.output='continuous': the no-VQ regression head has no official class")
  if not cfg.two_branch:
    out.append("model.two_branch=False: one shared motion encoder (official: encoder_s and "
               "encoder_l)")
  if cfg.audio_projection:
    out.append(f"model.audio_projection={cfg.audio_projection}: ours projects the audio before "
               "the decoder; the official decoder reads the raw audio features")
  if cfg.num_identities:
    out.append("model.num_identities=1: one learned listener-context row (official "
               "SpeakerSLMFT: a 15-row speaker table, zeros without speaker ids)")
  return out


def infer_dim_config(shapes: Mapping[str, tuple], where: str, *, heads: Optional[int] = None,
                     dim_head: Optional[int] = None,
                     decoder_heads: Optional[int] = None) -> dict[str, Any]:
  """DIMConfig fields read off an official SLM / SLMFT / SpeakerSLMFT layout.

  Heads and their width are not in the shapes (only their product is): `dim_head` defaults
  to x-transformers' 64 and the head counts to inner width / dim_head (official 12 x 64).
  """
  needed = ("encoder_s.project_in.weight", "encoder_s.attn_layers.layers.0.1.to_q.weight",
            "decoder_joint.net.token_emb.emb.weight", "decoder_joint.net.to_logits.weight",
            "decoder_joint.net.attn_layers.layers.0.1.to_q.weight", "encoder_s.pos_emb.emb.weight")
  missing = [k for k in needed if k not in shapes]
  if missing:
    raise LayoutError(f"{where}: not an official SLM/SLMFT layout: missing {', '.join(missing)}")
  dim, motion_dim = shapes["encoder_s.project_in.weight"]
  inner = shapes["encoder_s.attn_layers.layers.0.1.to_q.weight"][0]
  decoder_inner = shapes["decoder_joint.net.attn_layers.layers.0.1.to_q.weight"][0]
  if dim_head is None:
    dim_head = inner // heads if heads else transformer.DEFAULT_DIM_HEAD
  if dim_head < 1:
    raise LayoutError(f"{where}: {heads} heads do not fit the attention width {inner}")
  heads = heads or inner // dim_head
  decoder_heads = decoder_heads or decoder_inner // dim_head
  if heads * dim_head != inner or decoder_heads * dim_head != decoder_inner:
    raise LayoutError(f"{where}: attention widths {inner} (encoders) and {decoder_inner} "
                      f"(decoder) do not split into heads of {dim_head}; pass --heads / "
                      "--dim_head / --decoder_heads")

  def blocks(prefix: str, sublayers: int) -> int:
    pattern = re.compile(rf"{re.escape(prefix)}\.attn_layers\.layers\.(\d+)\.0\.0\.weight$")
    return len({int(m.group(1)) for k in shapes if (m := pattern.match(k))}) // sublayers

  num_tokens, width = shapes["decoder_joint.net.token_emb.emb.weight"]
  max_seq_len = shapes["encoder_s.pos_emb.emb.weight"][0]
  decoder_positions = "decoder_joint.net.pos_emb.emb.weight" in shapes
  if decoder_positions and shapes["decoder_joint.net.pos_emb.emb.weight"][0] != max_seq_len:
    raise LayoutError(f"{where}: decoder and encoder position tables differ in length "
                      f"({shapes['decoder_joint.net.pos_emb.emb.weight'][0]} vs {max_seq_len}); "
                      "dim_jax's DIM has one max_seq_len")
  return dict(motion_dim=int(motion_dim), audio_dim=int(width - dim), dim=int(dim),
              depth=blocks("encoder_s", 2), heads=int(heads), dim_head=int(dim_head),
              max_seq_len=int(max_seq_len), num_tokens=int(num_tokens),
              decoder_depth=blocks("decoder_joint.net", 3), decoder_heads=int(decoder_heads),
              decoder_positions=decoder_positions,
              two_branch="encoder_l.project_in.weight" in shapes)


# --- comparison -----------------------------------------------------------------------------

@dataclasses.dataclass
class Comparison:
  """What an exported state_dict holds against the official class's layout.

  Attributes:
    state_dict: the arrays that fit the official layout (names and shapes).
    official_only: {official key: shape} the official class has and the export does not.
    ours_only: {name: shape} of ours with no place in the official class (our parameter
      path, or the official-style name of an array the official class lacks).
    shape_differs: {official key: {'ours': shape, 'official': shape}}, left out.
    generated: official buffers computed on export (not parameters of ours).
  """
  state_dict: dict[str, np.ndarray]
  official_only: Shapes
  ours_only: Shapes
  shape_differs: dict[str, dict[str, tuple]]
  generated: list[str]

  def unmatched_lines(self) -> list[str]:
    lines = [f"official only (not exported): {k} {list(v)}" for k, v in self.official_only.items()]
    lines += [f"ours only (not exported): {k} {list(v)}" for k, v in self.ours_only.items()]
    lines += [f"shape differs (not exported): {k} ours {list(v['ours'])} official "
              f"{list(v['official'])}" for k, v in self.shape_differs.items()]
    return lines


def compare(candidates: Mapping[str, np.ndarray], official: Shapes, unmapped: Shapes,
            generated: Iterable[str] = ()) -> Comparison:
  """Splits exported candidates into what fits the official layout and what does not."""
  state_dict, ours_only, differs = {}, dict(unmapped), {}
  for key, value in candidates.items():
    shape = tuple(np.shape(value))
    if key not in official:
      ours_only[key] = shape
    elif tuple(official[key]) != shape:
      differs[key] = dict(ours=shape, official=tuple(official[key]))
    else:
      state_dict[key] = value
  official_only = {k: tuple(v) for k, v in official.items()
                   if k not in candidates and k not in differs}
  return Comparison(state_dict=state_dict, official_only=official_only, ours_only=ours_only,
                    shape_differs=differs,
                    generated=sorted(k for k in generated if k in state_dict))
