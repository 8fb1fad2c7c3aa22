"""Parity of dim_jax.models.transformer with x-transformers 1.30.16 (tiny DIM-shaped models).

Torch runs in float64 as the reference; ours in float32.  Outputs are compared on valid
positions only (x-transformers leaves padded rows non-zero after the FF branch).
"""

import numpy as np
import pytest

x_transformers = pytest.importorskip("x_transformers")
torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dim_jax.models.transformer import ContinuousEncoder, TokenDecoder  # noqa: E402

DIM, DEPTH, HEADS, MAX_LEN = 32, 2, 2, 16  # dim_head stays 64 (x-transformers default), as in DIM
ATOL = 1e-5


def _perturb_norms(model):
  # LayerNorm weights init to ones, which would hide a mis-mapped norm; randomise them.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and "ff" not in name:
        p.add_(0.3 * torch.randn_like(p))


def _lengths_mask(lengths, n):
  return np.arange(n)[None, :] < np.asarray(lengths)[:, None]


def _n_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


def _init_shapes(model, *args):
  # Shapes only (eval_shape): un-jitted init would dominate the test time.
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)["params"]


def _check_tree_and_export(ours, torch_model, params, init):
  """Same parameter count and tree as torch; the export reproduces its state_dict exactly."""
  assert _n_params(init) == sum(p.numel() for p in torch_model.parameters())
  assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(params)
  assert all(a.shape == np.shape(b) for a, b in zip(jax.tree_util.tree_leaves(init),
                                                    jax.tree_util.tree_leaves(params)))
  tsd = torch_model.state_dict()
  exported = ours.to_torch_state_dict(params)
  assert set(exported) == set(tsd)
  assert all(np.array_equal(exported[k], tsd[k].float().numpy()) for k in tsd)


def _torch_encoder(dim_in):
  from x_transformers import ContinuousTransformerWrapper, Encoder
  torch.manual_seed(0)
  m = ContinuousTransformerWrapper(dim_in=dim_in, dim_out=DIM, max_seq_len=MAX_LEN,
                                   attn_layers=Encoder(dim=DIM, depth=DEPTH, heads=HEADS))
  _perturb_norms(m)
  return m.eval()


def _torch_decoder(use_abs_pos_emb, num_tokens=11):
  from x_transformers import TransformerWrapper, Decoder
  torch.manual_seed(1)
  m = TransformerWrapper(num_tokens=num_tokens, max_seq_len=MAX_LEN, emb_dropout=0,
                         scaled_sinu_pos_emb=False, use_abs_pos_emb=use_abs_pos_emb,
                         attn_layers=Decoder(dim=DIM, depth=DEPTH, heads=HEADS, cross_attend=True))
  _perturb_norms(m)
  return m.eval()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dim_in", [7, DIM])
def test_encoder_parity(causal, dim_in):
  tm = _torch_encoder(dim_in)
  ours = ContinuousEncoder(dim=DIM, depth=DEPTH, heads=HEADS, max_seq_len=MAX_LEN,
                           dim_in=dim_in, dim_out=DIM)
  params = ours.from_torch_state_dict(tm.state_dict())

  rng = np.random.default_rng(0)
  b, n = 3, 10
  x = rng.standard_normal((b, n, dim_in)).astype(np.float32)
  mask = _lengths_mask([10, 6, 3], n)

  kwargs = {}
  if causal:  # how the official fine-tuning encoders are made causal
    kwargs["attn_mask"] = ~torch.triu(torch.ones(n, n), diagonal=1).bool()
  with torch.no_grad():
    ref = tm.double()(torch.from_numpy(x).double(), mask=torch.from_numpy(mask),
                      return_embeddings=True, **kwargs).numpy()
  out = np.asarray(jax.jit(lambda p, x, m: ours.apply({"params": p}, x, m, causal=causal))(
      params, x, mask))
  diff = np.abs(out - ref)[mask].max()
  print(f"encoder causal={causal} dim_in={dim_in}: max|diff| on valid rows = {diff:.2e}")
  assert diff < ATOL

  # Parameter count / tree shape / export round trip.
  _check_tree_and_export(ours, tm, params, _init_shapes(ours, x, mask))


def test_encoder_without_padding_matches_per_sequence():
  """A padded batch gives each sequence's unpadded result (padding does not leak)."""
  tm = _torch_encoder(7)
  ours = ContinuousEncoder(dim=DIM, depth=DEPTH, heads=HEADS, max_seq_len=MAX_LEN, dim_in=7,
                           dim_out=DIM)
  params = ours.from_torch_state_dict(tm.state_dict())
  x = np.random.default_rng(1).standard_normal((2, 9, 7)).astype(np.float32)
  mask = _lengths_mask([9, 4], 9)
  apply = jax.jit(ours.apply)
  full = np.asarray(apply({"params": params}, x, mask))
  alone = np.asarray(apply({"params": params}, x[1:, :4]))
  np.testing.assert_allclose(full[1, :4], alone[0], atol=ATOL)


@pytest.mark.parametrize("use_abs_pos_emb", [True, False])
@pytest.mark.parametrize("with_token_mask", [False, True])
def test_decoder_parity(use_abs_pos_emb, with_token_mask):
  num_tokens = 11
  tm = _torch_decoder(use_abs_pos_emb, num_tokens)
  ours = TokenDecoder(num_tokens=num_tokens, dim=DIM, depth=DEPTH, heads=HEADS,
                      max_seq_len=MAX_LEN, use_abs_pos_emb=use_abs_pos_emb)
  params = ours.from_torch_state_dict(tm.state_dict())

  rng = np.random.default_rng(2)
  b, n, m = 3, 9, 8
  tokens = rng.integers(0, num_tokens, (b, n)).astype(np.int32)
  context = rng.standard_normal((b, m, DIM)).astype(np.float32)
  cmask = _lengths_mask([8, 5, 2], m)
  tmask = _lengths_mask([9, 7, 4], n) if with_token_mask else None

  with torch.no_grad():
    ref = tm.double()(torch.from_numpy(tokens).long(), context=torch.from_numpy(context).double(),
                      context_mask=torch.from_numpy(cmask),
                      mask=None if tmask is None else torch.from_numpy(tmask)).numpy()
  out = np.asarray(jax.jit(ours.apply)({"params": params}, tokens, context, cmask, tmask))
  valid = np.ones((b, n), bool) if tmask is None else tmask
  diff = np.abs(out - ref)[valid].max()
  print(f"decoder abs_pos={use_abs_pos_emb} token_mask={with_token_mask}: "
        f"max|diff| logits = {diff:.2e}")
  assert diff < ATOL

  _check_tree_and_export(ours, tm, params, _init_shapes(ours, tokens, context, cmask))


def test_decoder_kv_cache_matches_full_forward():
  num_tokens = 11
  ours = TokenDecoder(num_tokens=num_tokens, dim=DIM, depth=DEPTH, heads=HEADS,
                      max_seq_len=MAX_LEN)
  rng = np.random.default_rng(3)
  b, n, m = 2, 7, 5
  tokens = rng.integers(0, num_tokens, (b, n)).astype(np.int32)
  context = rng.standard_normal((b, m, DIM)).astype(np.float32)
  cmask = _lengths_mask([5, 3], m)
  params = jax.jit(ours.init)(jax.random.PRNGKey(0), tokens, context, cmask)
  full = np.asarray(jax.jit(ours.apply)(params, tokens, context, cmask))

  cross_kv = ours.apply(params, context, method=TokenDecoder.precompute_cross)
  assert len(cross_kv) == DEPTH
  for precomputed in (None, cross_kv):  # context projected per step, or once up front
    step = jax.jit(lambda p, t, i, c, kv: ours.apply(p, t, i, c, context, cmask, kv,
                                                     method=TokenDecoder.decode_step))
    cache = ours.init_cache(b, MAX_LEN)
    # Prefill with 3 tokens, then one token at a time.
    logits, cache = step(params, tokens[:, :3], jnp.int32(0), cache, precomputed)
    outs = [np.asarray(logits)]
    for i in range(3, n):
      logits, cache = step(params, tokens[:, i:i + 1], jnp.int32(i), cache, precomputed)
      outs.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=ATOL)


def test_bf16_compute_close():
  tm = _torch_encoder(7)
  f32 = ContinuousEncoder(dim=DIM, depth=DEPTH, heads=HEADS, max_seq_len=MAX_LEN, dim_in=7,
                          dim_out=DIM)
  bf16 = f32.clone(dtype=jnp.bfloat16)
  params = f32.from_torch_state_dict(tm.state_dict())
  x = np.random.default_rng(4).standard_normal((2, 6, 7)).astype(np.float32)
  a = np.asarray(jax.jit(f32.apply)({"params": params}, x))
  c = jax.jit(bf16.apply)({"params": params}, x)
  assert c.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(c), a, atol=0.1)
