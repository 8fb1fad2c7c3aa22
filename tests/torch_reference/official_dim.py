"""The official DIM classes in PyTorch, transcribed for the export/import parity tests.

Transcribed from the authors' code (github.com/Boese0601/Dyadic-Interaction-Modeling, folder
`code/`), module by module and with the official parameter and buffer names, so an official
`state_dict` loads with `strict=True` and the same weights give the same numbers:

  models/stage1_BIWI.py      VQAutoEncoder, TransformerEncoder, TransformerDecoder
  models/lib/base_models.py  Norm, Residual, MLP, Attention, Transformer, LinearEmbedding,
                             PositionalEncoding
  models/lib/quantizer.py    VectorQuantizer
  utils/base_model_util.py   gelu (tanh form)
  seq2seq_pretrain.py        SLM, SLMFT, and the parameter layout of SpeakerSLMFT, built from
                             x-transformers 1.30.16 with the official keyword arguments

What differs from the official files (no name, shape or number changes):
  * Constructors load no checkpoint: the official ones read `./config.yaml` and two
    `model.pth.tar` files; here the tokenizers are built from `VQArgs` and weights are loaded
    afterwards with `load_state_dict`, as a user of an exported checkpoint does.
  * Sizes are constructor arguments with the official values as defaults (`VQArgs`,
    `DIMArgs`), so tests can build tiny models; the per-head width reaches x-transformers as
    `attn_dim_head` (official: the library default 64).
  * `Encoder(..., max_seq_len=2048)` from the official `enc_kwargs` is left out: x-transformers
    1.30.16 refuses that keyword, so the released classes cannot be built with it.
  * `.cuda()` calls use the inputs' device; `512` (codebook size) is `num_tokens`.
  * Test hooks, off by default: `SLM.forward(tokens=, frame_masks=)` replaces the tokenizer
    loop and the random frame masks by given ones (both random or dropout-dependent in the
    official run); `SLMFT.forward(generate_kwargs=)` reaches `AutoregressiveWrapper.generate`
    (e.g. `temperature=0.` for greedy decoding) and `SLMFT.last_tokens` keeps the token ids
    behind the returned motion.
  * Only `quant_factor == 0` (one token per frame, what DIM uses) is transcribed.
  * `SpeakerSLMFT` is the parameter layout only (its forward needs BiWi meshes and a trained
    mesh converter); the converter's sizes are arguments (official 70110 = 23370 vertices x 3).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from x_transformers import (AutoregressiveWrapper, ContinuousTransformerWrapper, Decoder,
                            Encoder, TransformerWrapper)


# --- hyper-parameters ----------------------------------------------------------------------

@dataclasses.dataclass
class VQArgs:
  """The `NETWORK` and `VQuantizer` fields of the official config.yaml."""
  in_dim: int = 56
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 8
  intermediate_size: int = 1536
  quant_factor: int = 0
  face_quan_num: int = 1
  neg: float = 0.2
  INaffine: bool = False  # pylint: disable=invalid-name  (the official field name)
  n_embed: int = 512
  zquant_dim: int = 128


@dataclasses.dataclass
class DIMArgs:
  """The sizes hard-coded in the official SLM / SLMFT constructors."""
  dim_in: int = 56
  dim: int = 384
  dim_a: int = 768
  depth: int = 4
  heads: int = 12
  dim_head: int = 64
  max_seq_len: int = 2048
  num_tokens: int = 512
  dec_depth: int = 4
  dec_heads: int = 12


# --- models/lib/base_models.py, utils/base_model_util.py -----------------------------------

def gelu(x):
  cdf = 0.5 * (1.0 + torch.tanh((np.sqrt(2 / np.pi) * (x + 0.044715 * torch.pow(x, 3)))))
  return x * cdf


class Norm(nn.Module):
  def __init__(self, fn, size):
    super().__init__()
    self.norm = nn.LayerNorm(size, eps=1e-5)
    self.fn = fn

  def forward(self, x_data):
    x, mask_info = x_data
    x_norm, _ = self.fn((self.norm(x), mask_info))
    return (x_norm, mask_info)


class Residual(nn.Module):
  def __init__(self, fn):
    super().__init__()
    self.fn = fn

  def forward(self, x_data):
    x, mask_info = x_data
    x_resid, _ = self.fn(x_data)
    return (x_resid + x, mask_info)


class MLP(nn.Module):
  def __init__(self, in_dim, out_dim, hidden_dim):
    super().__init__()
    self.l1 = nn.Linear(in_dim, hidden_dim)
    self.activation = gelu
    self.l2 = nn.Linear(hidden_dim, out_dim)

  def forward(self, x_data):
    x, mask_info = x_data
    return (self.l2(self.activation(self.l1(x))), mask_info)


class Attention(nn.Module):
  def __init__(self, in_dim, dim, heads=8):
    super().__init__()
    self.heads = heads
    self.scale = dim**-0.5  # the model width, not the head width
    self.to_qkv = nn.Linear(in_dim, dim * 3, bias=False)
    self.to_out = nn.Linear(dim, dim)
    self.rearrange_qkv = Rearrange("b n (qkv h d) -> qkv b h n d", qkv=3, h=self.heads)
    self.rearrange_out = Rearrange("b h n d -> b n (h d)")

  def forward(self, x_data):
    x, mask_info = x_data
    max_mask, mask = mask_info["max_mask"], mask_info["mask"]
    qkv = self.rearrange_qkv(self.to_qkv(x))
    q, k, v = qkv[0], qkv[1], qkv[2]
    dots = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale
    if max_mask is not None:
      dots[:, :, :max_mask, :max_mask] = dots[:, :, :max_mask, :max_mask].masked_fill(
          mask == 0., float("-inf"))
    attn = F.softmax(dots, dim=-1)
    out = self.rearrange_out(torch.einsum("bhij,bhjd->bhid", attn, v))
    return (self.to_out(out), mask_info)


class Transformer(nn.Module):
  """The non-cross-modal branch of the official `Transformer` (the only one the VQ uses)."""

  def __init__(self, in_size=50, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072):
    super().__init__()
    blocks = []
    for _ in range(num_hidden_layers):
      blocks.extend([
          Residual(Norm(Attention(in_size, hidden_size, heads=num_attention_heads), hidden_size)),
          Residual(Norm(MLP(hidden_size, hidden_size, intermediate_size), hidden_size)),
      ])
    self.net = torch.nn.Sequential(*blocks)

  def forward(self, x_data):
    x, mask_info = x_data
    x, _ = self.net((x, mask_info))
    return x


class LinearEmbedding(nn.Module):
  def __init__(self, size, dim):
    super().__init__()
    self.net = nn.Linear(size, dim)

  def forward(self, x):
    return self.net(x)


class PositionalEncoding(nn.Module):
  def __init__(self, d_model, dropout=0.1, max_len=5000):
    super().__init__()
    self.dropout = nn.Dropout(p=dropout)
    pe = torch.zeros(max_len, d_model)
    position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    pe = pe.unsqueeze(0).transpose(0, 1)
    self.register_buffer("pe", pe)

  def forward(self, x):
    # x is batch-first: x.size(0) is the batch, so row b of the table is added to every
    # frame of sample b (the official behaviour).
    x = x + self.pe[:x.size(0), :]
    return self.dropout(x)


# --- models/lib/quantizer.py ---------------------------------------------------------------

class VectorQuantizer(nn.Module):
  def __init__(self, n_e, e_dim, beta):
    super().__init__()
    self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
    self.embedding = nn.Embedding(self.n_e, self.e_dim)
    self.embedding.weight.data.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)

  def forward(self, z):
    z_flattened = z.view(-1, self.e_dim)
    d = (torch.sum(z_flattened ** 2, dim=1, keepdim=True)
         + torch.sum(self.embedding.weight**2, dim=1)
         - 2 * torch.matmul(z_flattened, self.embedding.weight.t()))
    min_encoding_indices = torch.argmin(d, dim=1).unsqueeze(1)
    min_encodings = torch.zeros(min_encoding_indices.shape[0], self.n_e).to(z)
    min_encodings.scatter_(1, min_encoding_indices, 1)
    z_q = torch.matmul(min_encodings, self.embedding.weight).view(z.shape)
    loss = (self.beta * torch.mean((z_q.detach() - z) ** 2)
            + torch.mean((z_q - z.detach()) ** 2))
    z_q = z + (z_q - z).detach()
    e_mean = torch.mean(min_encodings, dim=0)
    perplexity = torch.exp(-torch.sum(e_mean * torch.log(e_mean + 1e-10)))
    z_q = z_q.permute(0, 2, 1).contiguous()
    return z_q, loss, (perplexity, min_encodings, min_encoding_indices)

  def get_codebook_entry(self, indices, shape):
    min_encodings = torch.zeros(indices.shape[0], self.n_e).to(indices)
    min_encodings.scatter_(1, indices[:, None], 1)
    z_q = torch.matmul(min_encodings.float(), self.embedding.weight)
    return z_q if shape is None else z_q.view(shape)


# --- models/stage1_BIWI.py -------------------------------------------------------------------

def _conv_block(dim, args):
  return nn.Sequential(
      nn.Conv1d(dim, dim, 5, stride=1, padding=2, padding_mode="replicate"),
      nn.LeakyReLU(args.neg, True),
      nn.InstanceNorm1d(dim, affine=args.INaffine))


class TransformerEncoder(nn.Module):
  def __init__(self, args):
    super().__init__()
    if args.quant_factor != 0:
      raise NotImplementedError("only quant_factor 0 is transcribed")
    self.args = args
    dim = args.hidden_size
    self.vertice_mapping = nn.Sequential(nn.Linear(args.in_dim, dim), nn.LeakyReLU(args.neg, True))
    self.squasher = nn.Sequential(_conv_block(dim, args))
    self.encoder_transformer = Transformer(
        in_size=dim, hidden_size=dim, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, intermediate_size=args.intermediate_size)
    self.encoder_pos_embedding = PositionalEncoding(dim)
    self.encoder_linear_embedding = LinearEmbedding(dim, dim)
    self.encoder_linear_embedding_post = LinearEmbedding(dim, args.face_quan_num * args.zquant_dim)

  def forward(self, inputs):
    dummy_mask = {"max_mask": None, "mask_index": -1, "mask": None}
    inputs = self.vertice_mapping(inputs)
    inputs = self.squasher(inputs.permute(0, 2, 1)).permute(0, 2, 1)
    features = self.encoder_linear_embedding(inputs)
    features = self.encoder_pos_embedding(features)
    features = self.encoder_transformer((features, dummy_mask))
    return self.encoder_linear_embedding_post(features)


class TransformerDecoder(nn.Module):
  def __init__(self, args, out_dim):
    super().__init__()
    if args.quant_factor != 0:
      raise NotImplementedError("only quant_factor 0 is transcribed")
    self.args = args
    dim = args.hidden_size
    self.expander = nn.ModuleList([_conv_block(dim, args)])
    self.decoder_transformer = Transformer(
        in_size=dim, hidden_size=dim, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, intermediate_size=args.intermediate_size)
    self.decoder_pos_embedding = PositionalEncoding(dim)
    self.decoder_linear_embedding = LinearEmbedding(dim, dim)
    self.decoder_linear_embedding_pre = LinearEmbedding(args.face_quan_num * args.zquant_dim, dim)
    self.vertice_map_reverse = nn.Linear(dim, out_dim, bias=False)

  def forward(self, inputs):
    dummy_mask = {"max_mask": None, "mask_index": -1, "mask": None}
    inputs = inputs.permute(0, 2, 1)
    inputs = self.decoder_linear_embedding_pre(inputs)
    inputs = inputs.permute(0, 2, 1)
    for i, module in enumerate(self.expander):
      inputs = module(inputs)
      if i > 0:
        inputs = inputs.repeat_interleave(2, dim=2)
    inputs = inputs.permute(0, 2, 1)
    features = self.decoder_linear_embedding(inputs)
    features = self.decoder_pos_embedding(features)
    features = self.decoder_transformer((features, dummy_mask))
    return self.vertice_map_reverse(features)


class VQAutoEncoder(nn.Module):
  """encode(x [B, L, in_dim]) -> (z_q [B, C, L], loss, (perplexity, one-hots, ids [B*L, 1]))."""

  def __init__(self, args: VQArgs):
    super().__init__()
    self.encoder = TransformerEncoder(args)
    self.decoder = TransformerDecoder(args, args.in_dim)
    self.quantize = VectorQuantizer(args.n_embed, args.zquant_dim, beta=0.25)
    self.args = args

  def encode(self, x, x_a=None):
    del x_a
    h = self.encoder(x)
    h = h.view(x.shape[0], -1, self.args.face_quan_num, self.args.zquant_dim)
    h = h.view(x.shape[0], -1, self.args.zquant_dim)
    return self.quantize(h)

  def decode(self, quant):
    quant = quant.permute(0, 2, 1)
    groups, width = self.args.face_quan_num, self.args.zquant_dim
    quant = quant.view(quant.shape[0], -1, groups, width).contiguous()
    quant = quant.view(quant.shape[0], -1, groups * width).contiguous()
    quant = quant.permute(0, 2, 1).contiguous()
    return self.decoder(quant)

  def forward(self, x):
    quant, emb_loss, info = self.encode(x)
    return self.decode(quant), emb_loss, info


def calc_vq_loss(pred, target, quant_loss, quant_loss_weight=1.0):
  """Official `metrics/loss.py` VQ objective: L1 reconstruction + quantizer loss."""
  rec_loss = nn.L1Loss()(pred, target)
  return quant_loss.mean() * quant_loss_weight + rec_loss, [rec_loss, quant_loss]


# --- seq2seq_pretrain.py -------------------------------------------------------------------

def _role_encoder(dim_in, args: DIMArgs):
  # Official enc_kwargs also hold max_seq_len=2048, which Encoder refuses in 1.30.16.
  return ContinuousTransformerWrapper(
      dim_in=dim_in, dim_out=args.dim, max_seq_len=args.max_seq_len,
      attn_layers=Encoder(dim=args.dim, depth=args.depth, heads=args.heads,
                          attn_dim_head=args.dim_head))


def _joint_decoder(args: DIMArgs, use_abs_pos_emb: bool, mask_prob: float):
  net = TransformerWrapper(
      num_tokens=args.num_tokens, max_seq_len=args.max_seq_len, emb_dropout=0,
      scaled_sinu_pos_emb=False, use_abs_pos_emb=use_abs_pos_emb,
      attn_layers=Decoder(dim=args.dim + args.dim_a, cross_attend=True, depth=args.dec_depth,
                          heads=args.dec_heads, attn_dim_head=args.dim_head))
  return AutoregressiveWrapper(net, ignore_index=-100, pad_value=0, mask_prob=mask_prob)


class _DIMParameters(nn.Module):
  """The parameters SLM, SLMFT and SpeakerSLMFT share, with the official names."""

  def __init__(self, args, speaker_vq_args, listener_vq_args, use_abs_pos_emb, mask_prob):
    super().__init__()
    self.args = args = args or DIMArgs()
    speaker_vq_args = speaker_vq_args or VQArgs()
    self.speaker_face_quan_num = speaker_vq_args.face_quan_num
    self.speaker_zquant_dim = speaker_vq_args.zquant_dim
    self.speaker_vq = VQAutoEncoder(speaker_vq_args)
    self.listener_vq = VQAutoEncoder(listener_vq_args or VQArgs())
    self.encoder_s = _role_encoder(args.dim_in, args)
    self.encoder_l = _role_encoder(args.dim_in, args)
    self.encoder_joint = _role_encoder(args.dim, args)
    self.patch_embed_s = nn.Parameter(torch.zeros(1, 1, args.dim_in))
    self.patch_embed_l = nn.Parameter(torch.zeros(1, 1, args.dim_in))
    self.patch_embed_dec_s = nn.Parameter(torch.zeros(1, 1, args.dim))
    self.patch_embed_dec_l = nn.Parameter(torch.zeros(1, 1, args.dim))
    self.norm_s, self.norm_l, self.norm = (nn.LayerNorm(args.dim), nn.LayerNorm(args.dim),
                                           nn.LayerNorm(args.dim))
    self.decoder_joint = _joint_decoder(args, use_abs_pos_emb, mask_prob)

  def _freeze_tokenizers(self, decoders_trainable: bool):
    for vq in (self.speaker_vq, self.listener_vq):
      vq.eval()
      for param in vq.quantize.parameters():
        param.requires_grad = False
      for param in vq.encoder.parameters():
        param.requires_grad = False
      for param in vq.decoder.parameters():
        param.requires_grad = decoders_trainable

  def forward_vq(self, v_speaker, v_listener, mask):
    batch_sz, seq_len, _ = v_speaker.shape
    padded_dim = seq_len * self.speaker_face_quan_num
    z_speaker, z_listener = [], []
    for i in range(batch_sz):
      speaker_feats = self.speaker_vq.encode(
          v_speaker[i, :, :][mask[i]].unsqueeze(0))[2][2].squeeze()
      z_speaker.append(F.pad(speaker_feats, (0, padded_dim - speaker_feats.shape[-1]), value=0))
      listener_feats = self.listener_vq.encode(
          v_listener[i, :, :][mask[i]].unsqueeze(0))[2][2].squeeze()
      z_listener.append(F.pad(listener_feats, (0, seq_len - listener_feats.shape[-1]), value=-100))
    return torch.stack(z_speaker, dim=0), torch.stack(z_listener, dim=0)

  def _decode_ids(self, vq, pred_seq):
    min_encodings = torch.zeros(pred_seq.shape[0], pred_seq.shape[1],
                                self.args.num_tokens).to(vq.quantize.embedding.weight.device)
    min_encodings.scatter_(2, pred_seq.unsqueeze(2), 1)
    zq = torch.matmul(min_encodings, vq.quantize.embedding.weight).permute(0, 2, 1)
    return vq.decode(zq)

  @staticmethod
  def forward_continuous_loss(pred, target, mask):
    target, mask = target[:, 1:, :], mask[:, 1:]
    b = len(target)
    target = target.reshape(b * target.shape[1], -1)
    pred = pred.reshape(b * pred.shape[1], -1)
    mask = mask.reshape(b * mask.shape[1])
    pred_flat, target_flat = pred[mask], target[mask]
    pose = F.pairwise_distance(pred_flat[:, 0:6], target_flat[:, 0:6])
    exp = F.pairwise_distance(pred_flat[:, 6:], target_flat[:, 6:])
    return torch.mean(exp) + torch.mean(pose)


class SLM(_DIMParameters):
  """DIM pretraining (official `seq2seq_pretrain.SLM`)."""

  def __init__(self, args: DIMArgs | None = None, speaker_vq_args: VQArgs | None = None,
               listener_vq_args: VQArgs | None = None):
    super().__init__(args, speaker_vq_args, listener_vq_args, use_abs_pos_emb=True, mask_prob=0.)
    self._freeze_tokenizers(decoders_trainable=True)

  @staticmethod
  def random_masking_unstructured(x, mask, mask_ratio):
    n, length, _ = x.shape
    len_keep = torch.sum(mask, dim=1, dtype=torch.int32)
    final_mask = torch.zeros(n, length, dtype=torch.bool, device=mask.device)
    for i in range(n):
      cur_len = len_keep[i]
      mask_indices = torch.randperm(cur_len)[:int(cur_len * mask_ratio)]
      final_mask[i, :cur_len][mask_indices] = True
    return final_mask

  def forward_encoder(self, v_speaker, v_listener, mask, mask_ratio=0.15, frame_masks=None):
    v_speaker_cp, v_listener_cp = v_speaker.clone(), v_listener.clone()
    if frame_masks is None:
      mask_speaker = self.random_masking_unstructured(v_speaker, mask, mask_ratio)
      mask_listener = self.random_masking_unstructured(v_listener, mask, mask_ratio)
    else:
      mask_speaker, mask_listener = frame_masks
    v_speaker_cp = v_speaker_cp + self.patch_embed_s
    v_listener_cp = v_listener_cp + self.patch_embed_l
    v_speaker_cp[mask_speaker] = 0
    v_listener_cp[mask_listener] = 0
    x_s = self.encoder_s(v_speaker_cp, mask=mask, return_embeddings=True)
    x_l = self.encoder_l(v_listener_cp, mask=mask, return_embeddings=True)
    x_joint = torch.cat([x_s, x_l], dim=1)
    x_joint = self.encoder_joint(x_joint, mask=torch.cat([mask, mask], dim=-1),
                                 return_embeddings=True)
    x_l = self.encoder_joint(x_l, mask=mask, return_embeddings=True)
    x_s = self.encoder_joint(x_s, mask=mask, return_embeddings=True)
    x_joint, x_l, x_s = self.norm(x_joint), self.norm_l(x_l), self.norm_s(x_s)
    return x_s, x_l, x_joint, mask_speaker, mask_listener

  def forward_decoder(self, x_s, x_l, z_s, z_l, x_a, mask):
    x_s = torch.cat([x_s + self.patch_embed_dec_s, x_a], dim=-1)
    x_l = torch.cat([x_l + self.patch_embed_dec_l, x_a], dim=-1)
    l_ce_s, (px_s, _) = self.decoder_joint(z_s, context=x_l, context_mask=mask, return_outputs=True)
    l_ce_l, (px_l, _) = self.decoder_joint(z_l, context=x_s, context_mask=mask, return_outputs=True)
    return l_ce_s, l_ce_l, px_s, px_l

  def forward_vq_decoder(self, logits_s, logits_l):
    return (self._decode_ids(self.speaker_vq, torch.argmax(logits_s, dim=-1)),
            self._decode_ids(self.listener_vq, torch.argmax(logits_l, dim=-1)))

  @staticmethod
  def forward_contrastive(s_rep, l_rep, mask, bidirect_contrast=False):
    len_keep = torch.sum(mask, dim=1, dtype=torch.int32)
    s_rep = torch.stack([torch.mean(s_rep[i, :len_keep[i]], dim=0) for i in range(len(len_keep))])
    l_rep = torch.stack([torch.mean(l_rep[i, :len_keep[i]], dim=0) for i in range(len(len_keep))])
    s_rep = F.normalize(s_rep, dim=-1)
    l_rep = F.normalize(l_rep, dim=-1)
    total = torch.mm(s_rep, torch.transpose(l_rep, 0, 1)) / 0.05
    arange = torch.arange(0, total.shape[0], device=s_rep.device)

    def one_way(t):
      nce = -torch.mean(torch.diag(F.log_softmax(t, dim=0)))
      acc = torch.sum(torch.eq(torch.argmax(F.softmax(t, dim=0), dim=0), arange)) / t.shape[0]
      return nce, acc

    if not bidirect_contrast:
      return one_way(total)
    (nce_1, acc_1), (nce_2, acc_2) = one_way(total), one_way(total.t())
    return (nce_1 + nce_2) / 2, (acc_1 + acc_2) / 2

  def forward(self, v_speaker, v_listener, v_audio, mask, tokens=None, frame_masks=None):
    if tokens is None:
      with torch.no_grad():
        z_s, z_l = self.forward_vq(v_speaker, v_listener, mask)
    else:
      z_s, z_l = (t.clone() for t in tokens)
    x_s, x_l, x_joint, mask_speaker, mask_listener = self.forward_encoder(
        v_speaker, v_listener, mask, frame_masks=frame_masks)
    nce, c_acc = self.forward_contrastive(x_s, x_l, mask)
    x_joint_s = x_joint[:, :x_s.shape[1], :]
    x_joint_l = x_joint[:, x_s.shape[1]:, :]
    z_s[~mask_speaker] = -100
    z_l[~mask_listener] = -100
    l_ce_s, l_ce_l, px_s, px_l = self.forward_decoder(x_joint_s, x_joint_l, z_s, z_l, v_audio, mask)
    pred_s, pred_l = self.forward_vq_decoder(px_s, px_l)
    l_cont_s = self.forward_continuous_loss(pred_s, v_speaker, mask_speaker)
    l_cont_l = self.forward_continuous_loss(pred_l, v_listener, mask_listener)
    total_loss = l_ce_s + l_ce_l + l_cont_s + l_cont_l + nce
    d = dict(l_ce_s=l_ce_s, l_ce_l=l_ce_l, l_cont_s=l_cont_s, l_cont_l=l_cont_l, nce=nce,
             c_acc=c_acc)
    return total_loss, d, None


class SLMFT(_DIMParameters):
  """DIM-Listener fine-tune (official `seq2seq_pretrain.SLMFT`): no decoder positions,
  AutoregressiveWrapper(mask_prob=0.15), causal encoders."""

  def __init__(self, args: DIMArgs | None = None, speaker_vq_args: VQArgs | None = None,
               listener_vq_args: VQArgs | None = None):
    super().__init__(args, speaker_vq_args, listener_vq_args, use_abs_pos_emb=False,
                     mask_prob=0.15)
    self._freeze_tokenizers(decoders_trainable=False)

  def forward_encoder(self, v_speaker, mask):
    v_speaker_cp = v_speaker.clone() + self.patch_embed_s
    n = v_speaker_cp.shape[1]
    attn_mask = ~torch.triu(torch.ones(n, n), diagonal=1).bool().to(v_speaker.device)
    x_s = self.encoder_s(v_speaker_cp, mask=mask, attn_mask=attn_mask, return_embeddings=True)
    x_s = self.encoder_joint(x_s, mask=mask, attn_mask=attn_mask, return_embeddings=True)
    return self.norm_s(x_s)

  def forward_decoder(self, x_s, z_l, x_a, mask, mode, generate_kwargs=None):
    x_s = torch.cat([x_s + self.patch_embed_dec_s, x_a], dim=-1)
    if mode == "train":
      l_ce_l, (px_l, _) = self.decoder_joint(z_l, context=x_s, context_mask=mask,
                                             return_outputs=True)
    else:
      px_l = self.decoder_joint.generate(z_l[:, 0].unsqueeze(1), seq_len=z_l.shape[1] - 1,
                                         context=x_s, context_mask=mask,
                                         **(generate_kwargs or {}))
      l_ce_l = 0.0
    return l_ce_l, px_l

  def forward_vq_decoder(self, logits_l, mode="train"):
    pred_seq_l = torch.argmax(logits_l, dim=-1) if mode == "train" else logits_l
    return self._decode_ids(self.listener_vq, pred_seq_l)

  def forward(self, v_speaker, v_listener, v_audio, mask, mode="train", generate_kwargs=None):
    with torch.no_grad():
      _, z_l = self.forward_vq(v_speaker, v_listener, mask)
      z_l[~mask] = -100
    _, z_l = self.forward_vq(v_speaker, v_listener, mask)
    x_s = self.forward_encoder(v_speaker, mask)
    l_ce_l, px_l = self.forward_decoder(x_s, z_l, v_audio, mask, mode=mode,
                                        generate_kwargs=generate_kwargs)
    pred_cont_seq_l = self.forward_vq_decoder(px_l, mode=mode)
    l_cont_l = self.forward_continuous_loss(pred_cont_seq_l, v_listener, mask)
    d = dict(l_ce_s=0, l_ce_l=l_ce_l, l_cont_s=0, l_cont_l=l_cont_l, nce=0, c_acc=0)
    # Test hook: the generated token ids as well (the official forward returns the motion).
    self.last_tokens = px_l if mode != "train" else torch.argmax(px_l, dim=-1)
    return l_ce_l + l_cont_l, d, pred_cont_seq_l


class SpeakerSLMFT(_DIMParameters):
  """Parameter layout of the official DIM-Speaker (`seq2seq_pretrain.SpeakerSLMFT`).

  Besides the shared parts it holds the BiWi mesh converter's layers (taken from
  `EmocaConverter`: `mesh_size` = 23370 vertices x 3 officially, LSTM width 384), a 2-vector
  `W` and a 15-row speaker table. Decoder positions on, mask_prob 0.
  """

  def __init__(self, args: DIMArgs | None = None, speaker_vq_args: VQArgs | None = None,
               listener_vq_args: VQArgs | None = None, mesh_size: int = 70110,
               lstm_hidden: int = 384, num_speakers: int = 15):
    super().__init__(args, speaker_vq_args, listener_vq_args, use_abs_pos_emb=True, mask_prob=0.)
    dim = self.args.dim_in
    self.vertice_mapping = nn.Sequential(nn.Linear(mesh_size, dim), nn.LeakyReLU(0.2, True))
    self.squasher = nn.Sequential(nn.Sequential(
        nn.Conv1d(dim, dim, 5, stride=1, padding=2, padding_mode="replicate"),
        nn.LeakyReLU(0.2, True), nn.InstanceNorm1d(dim, affine=False)))
    lstm = lambda: nn.LSTM(input_size=dim, hidden_size=lstm_hidden, num_layers=2,
                           batch_first=True, bidirectional=True)
    self.vertice_map_reverse_lstm = lstm()
    self.vertice_map_reverse_lstm_2 = lstm()
    head = lambda: nn.Sequential(nn.Linear(2 * lstm_hidden, 2 * lstm_hidden),
                                 nn.LeakyReLU(0.2, True), nn.Linear(2 * lstm_hidden, mesh_size))
    self.vertice_map_reverse = head()
    self.vertice_map_reverse2 = head()
    self.W = torch.nn.Parameter(torch.randn(2))  # pylint: disable=invalid-name
    self.speaker_embed = nn.Embedding(num_speakers, self.args.dim)
