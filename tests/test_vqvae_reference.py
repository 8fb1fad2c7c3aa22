"""The Flax VQ-VAE against a NumPy transcription of the official PyTorch forward pass.

The reference below follows `code/models/stage1_BIWI.py` and `code/models/lib/` of the
official repository operation by operation, in PyTorch's conventions (Conv1d weights
[out, in, width], batch-first tensors, the positional table indexed by `x.size(0)`), written
without Flax. It pins the semantics a port most easily gets wrong: the fused qkv layout
"b n (qkv h d)", the hidden_size**-0.5 attention scale, LayerNorm with bias (eps 1e-5), the
tanh GELU, replicate padding, instance norm without affine, and the batch-indexed table.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from dim_jax.models import vqvae

CONFIG = vqvae.VQConfig(hidden_size=48, num_layers=2, num_heads=4, mlp_dim=96,
                        codebook_size=32, code_dim=16, dropout_rate=0.0,
                        positional_encoding="official_batch_index")


def _to_torch_layout(flax_params):
  """Our parameter tree -> official state_dict-like names and layouts (numpy)."""
  sd = {}

  def linear(prefix, p):
    sd[prefix + ".weight"] = np.asarray(p["kernel"]).T  # torch Linear: [out, in]
    if "bias" in p:
      sd[prefix + ".bias"] = np.asarray(p["bias"])

  def transformer(prefix, p):
    for i in range(CONFIG.num_layers):
      block = p[f"block_{i}"]
      base = f"{prefix}.net.{2 * i}"
      sd[f"{base}.fn.norm.weight"] = np.asarray(block["attn_norm"]["scale"])
      sd[f"{base}.fn.norm.bias"] = np.asarray(block["attn_norm"]["bias"])
      linear(f"{base}.fn.fn.to_qkv", block["attn"]["to_qkv"])
      linear(f"{base}.fn.fn.to_out", block["attn"]["to_out"])
      base = f"{prefix}.net.{2 * i + 1}"
      sd[f"{base}.fn.norm.weight"] = np.asarray(block["mlp_norm"]["scale"])
      sd[f"{base}.fn.norm.bias"] = np.asarray(block["mlp_norm"]["bias"])
      linear(f"{base}.fn.fn.l1", block["l1"])
      linear(f"{base}.fn.fn.l2", block["l2"])

  def conv(prefix, p):
    sd[prefix + ".weight"] = np.transpose(np.asarray(p["conv"]["kernel"]), (2, 1, 0))
    sd[prefix + ".bias"] = np.asarray(p["conv"]["bias"])

  enc, dec = flax_params["encoder"], flax_params["decoder"]
  linear("encoder.vertice_mapping.0", enc["vertice_mapping"])
  conv("encoder.squasher.0.0", enc["squasher"])
  linear("encoder.encoder_linear_embedding.net", enc["linear_embedding"])
  transformer("encoder.encoder_transformer", enc["transformer"])
  linear("encoder.encoder_linear_embedding_post.net", enc["linear_embedding_post"])
  sd["quantize.embedding.weight"] = np.asarray(flax_params["quantizer"]["codebook"])
  linear("decoder.decoder_linear_embedding_pre.net", dec["linear_embedding_pre"])
  conv("decoder.expander.0.0", dec["expander"])
  linear("decoder.decoder_linear_embedding.net", dec["linear_embedding"])
  transformer("decoder.decoder_transformer", dec["transformer"])
  linear("decoder.vertice_map_reverse", dec["vertice_map_reverse"])
  return sd


# --- NumPy transcription of the official modules (batch-first [B, L, C]) ---------------

def _linear(sd, name, x):
  y = x @ sd[name + ".weight"].T
  return y + sd[name + ".bias"] if name + ".bias" in sd else y


def _leaky(x):
  return np.where(x >= 0, x, 0.2 * x)


def _conv_replicate_instancenorm(sd, name, x):
  # nn.Conv1d(dim, dim, 5, padding=2, padding_mode='replicate') on [B, C, L].
  x = np.transpose(x, (0, 2, 1))
  padded = np.concatenate([x[:, :, :1]] * 2 + [x] + [x[:, :, -1:]] * 2, axis=2)
  weight, bias = sd[name + ".weight"], sd[name + ".bias"]
  length = x.shape[2]
  out = np.stack([np.einsum("oik,bik->bo", weight, padded[:, :, t:t + 5])
                  for t in range(length)], axis=2) + bias[None, :, None]
  out = _leaky(out)
  mean = out.mean(axis=2, keepdims=True)
  var = out.var(axis=2, keepdims=True)
  out = (out - mean) / np.sqrt(var + 1e-5)  # InstanceNorm1d(affine=False)
  return np.transpose(out, (0, 2, 1))


def _positional(x):
  d_model = x.shape[-1]
  pe = np.zeros((5000, d_model))
  position = np.arange(5000)[:, None]
  div_term = np.exp(np.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
  pe[:, 0::2] = np.sin(position * div_term)
  pe[:, 1::2] = np.cos(position * div_term)
  pe = pe[:, None, :]          # unsqueeze(0).transpose(0, 1): [max_len, 1, d]
  return x + pe[: x.shape[0]]  # x.size(0) is the batch size: row b for sample b.


def _layer_norm(x, weight, bias):
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5) * weight + bias


def _transformer(sd, prefix, x):
  heads, dim = CONFIG.num_heads, CONFIG.hidden_size
  for i in range(CONFIG.num_layers):
    base = f"{prefix}.net.{2 * i}"
    h = _layer_norm(x, sd[f"{base}.fn.norm.weight"], sd[f"{base}.fn.norm.bias"])
    qkv = _linear(sd, f"{base}.fn.fn.to_qkv", h)
    b, n, _ = qkv.shape
    qkv = qkv.reshape(b, n, 3, heads, dim // heads).transpose(2, 0, 3, 1, 4)  # qkv b h n d
    q, k, v = qkv
    dots = np.einsum("bhid,bhjd->bhij", q, k) * dim**-0.5
    attn = np.exp(dots - dots.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    out = np.einsum("bhij,bhjd->bhid", attn, v).transpose(0, 2, 1, 3).reshape(b, n, dim)
    x = x + _linear(sd, f"{base}.fn.fn.to_out", out)
    base = f"{prefix}.net.{2 * i + 1}"
    h = _layer_norm(x, sd[f"{base}.fn.norm.weight"], sd[f"{base}.fn.norm.bias"])
    h = _linear(sd, f"{base}.fn.fn.l1", h)
    h = h * 0.5 * (1.0 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    x = x + _linear(sd, f"{base}.fn.fn.l2", h)
  return x


def official_forward(sd, motion):
  """VQAutoEncoder.forward in eval mode: returns (reconstruction, token indices)."""
  h = _leaky(_linear(sd, "encoder.vertice_mapping.0", motion))
  h = _conv_replicate_instancenorm(sd, "encoder.squasher.0.0", h)
  h = _linear(sd, "encoder.encoder_linear_embedding.net", h)
  h = _transformer(sd, "encoder.encoder_transformer", _positional(h))
  z = _linear(sd, "encoder.encoder_linear_embedding_post.net", h)
  codebook = sd["quantize.embedding.weight"]
  flat = z.reshape(-1, codebook.shape[1])
  d = (flat**2).sum(1, keepdims=True) + (codebook**2).sum(1) - 2 * flat @ codebook.T
  tokens = d.argmin(1)
  quant = codebook[tokens].reshape(z.shape)
  h = _linear(sd, "decoder.decoder_linear_embedding_pre.net", quant)
  h = _conv_replicate_instancenorm(sd, "decoder.expander.0.0", h)
  h = _linear(sd, "decoder.decoder_linear_embedding.net", h)
  h = _transformer(sd, "decoder.decoder_transformer", _positional(h))
  return _linear(sd, "decoder.vertice_map_reverse", h), tokens.reshape(z.shape[:2])


def test_flax_vqvae_equals_official_forward():
  model = vqvae.VQVAE(CONFIG)
  rng = np.random.default_rng(0)
  motion = rng.normal(size=(3, 20, 56)).astype(np.float32)
  mask = np.ones((3, 20), bool)
  params = model.init({"params": jax.random.PRNGKey(1)}, jnp.asarray(motion),
                      jnp.asarray(mask))["params"]
  # Spread the codebook so several codes are in play (the official init is +-1/K).
  params = jax.tree.map(lambda x: x, params)
  params["quantizer"]["codebook"] = jnp.asarray(rng.normal(size=(32, 16)).astype(np.float32))
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(motion), jnp.asarray(mask))
  sd = _to_torch_layout(params)
  expected, tokens = official_forward({k: v.astype(np.float64) for k, v in sd.items()},
                                      motion.astype(np.float64))
  np.testing.assert_array_equal(np.asarray(out["tokens"]), tokens)
  assert len(np.unique(tokens)) > 3
  np.testing.assert_allclose(np.asarray(out["reconstruction"]), expected, rtol=2e-4, atol=2e-4)


def test_time_positions_differ_from_official_table():
  """Our default ('time') is a deliberate difference: it must change the output."""
  model_time = vqvae.VQVAE(dataclasses.replace(CONFIG, positional_encoding="time"))
  model_official = vqvae.VQVAE(CONFIG)
  motion = jnp.asarray(np.random.default_rng(2).normal(size=(1, 12, 56)).astype(np.float32))
  mask = jnp.ones((1, 12), bool)
  params = model_official.init({"params": jax.random.PRNGKey(0)}, motion, mask)["params"]
  a = model_time.apply({"params": params}, motion, mask)["reconstruction"]
  b = model_official.apply({"params": params}, motion, mask)["reconstruction"]
  assert float(jnp.abs(a - b).max()) > 1e-3
