"""VQ-VAE: padding invariance, straight-through gradient, layer semantics against NumPy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dim_jax.models import vqvae

TINY = vqvae.VQConfig(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                      codebook_size=64, code_dim=16, dropout_rate=0.0)


def _init(config, frames=16, batch=2, seed=0):
  model = vqvae.VQVAE(config)
  motion = jnp.zeros((batch, frames, config.in_dim))
  mask = jnp.ones((batch, frames), bool)
  params = model.init({"params": jax.random.PRNGKey(seed)}, motion, mask)["params"]
  return model, params


def _random_motion(rng, frames):
  return rng.normal(size=(frames, 56)).astype(np.float32)


def test_padded_batch_tokenizes_like_each_sequence_alone():
  model, params = _init(TINY)
  rng = np.random.default_rng(0)
  lengths = [23, 9, 16, 2]
  clips = [_random_motion(rng, n) for n in lengths]
  frames = 32
  batch = np.zeros((len(clips), frames, 56), np.float32)
  # Garbage (not zeros) in padding: it must not leak anywhere.
  batch[:] = 1e3
  mask = np.zeros((len(clips), frames), bool)
  for i, clip in enumerate(clips):
    batch[i, : len(clip)] = clip
    mask[i, : len(clip)] = True
  apply = jax.jit(model.apply)
  out = apply({"params": params}, jnp.asarray(batch), jnp.asarray(mask))
  for i, clip in enumerate(clips):
    alone = apply({"params": params}, clip[None], jnp.ones((1, len(clip)), bool))
    np.testing.assert_array_equal(np.asarray(out["tokens"][i, : len(clip)]),
                                  np.asarray(alone["tokens"][0]))
    np.testing.assert_allclose(np.asarray(out["reconstruction"][i, : len(clip)]),
                               np.asarray(alone["reconstruction"][0]), rtol=1e-4, atol=1e-4)
    # Padded frames of the reconstruction are exactly zero.
    assert np.all(np.asarray(out["reconstruction"][i, len(clip):]) == 0)


def test_straight_through_gradient_reaches_encoder():
  model, params = _init(TINY)
  rng = np.random.default_rng(1)
  motion = jnp.asarray(rng.normal(size=(2, 16, 56)).astype(np.float32))
  mask = jnp.ones((2, 16), bool)

  def reconstruction_only(p):
    out = model.apply({"params": p}, motion, mask)
    return jnp.mean(jnp.abs(out["reconstruction"] - motion))

  grads = jax.jit(jax.grad(reconstruction_only))(params)
  encoder_grad = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["encoder"]))
  # Without the straight-through estimator the reconstruction loss could only reach the
  # encoder through argmin, i.e. never.
  assert encoder_grad > 1e-6
  # The reconstruction loss alone gives the codebook no gradient (only the quant loss does).
  assert float(jnp.abs(grads["quantizer"]["codebook"]).sum()) == 0.0


def test_masked_instance_norm_matches_numpy_on_valid_frames():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 10, 3)).astype(np.float32)
  mask = np.zeros((2, 10), bool)
  mask[0, :7] = True
  mask[1, :10] = True
  got = np.asarray(vqvae.masked_instance_norm(jnp.asarray(x), jnp.asarray(mask)))
  for b, n in enumerate([7, 10]):
    valid = x[b, :n]
    expected = (valid - valid.mean(0)) / np.sqrt(valid.var(0) + 1e-5)
    np.testing.assert_allclose(got[b, :n], expected, atol=1e-5)


@pytest.mark.parametrize("norm", ["instance", "frame", "none"])
def test_conv_block_norms_and_window_offsets(norm):
  """The block is conv -> LeakyReLU -> norm (official InstanceNorm, ours per frame, none)."""
  rng = np.random.default_rng(4)
  x = rng.normal(size=(1, 12, 3)).astype(np.float32)
  mask = np.ones((1, 12), bool)
  block = vqvae.ConvBlock(features=6, leaky_slope=0.2, norm=norm)
  params = block.init(jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(mask))
  kernel = np.asarray(params["params"]["conv"]["kernel"])  # [5, 3, 6]
  bias = np.asarray(params["params"]["conv"]["bias"])
  padded = np.pad(x[0], ((2, 2), (0, 0)), mode="edge")
  conv = np.stack([np.einsum("kc,kcf->f", padded[t:t + 5], kernel) for t in range(12)]) + bias
  act = np.where(conv > 0, conv, 0.2 * conv)
  if norm == "instance":
    want = (act - act.mean(0)) / np.sqrt(act.var(0) + 1e-5)
  elif norm == "frame":
    want = (act - act.mean(1, keepdims=True)) / np.sqrt(act.var(1, keepdims=True) + 1e-5)
  else:
    want = act
  got = np.asarray(block.apply(params, jnp.asarray(x), jnp.asarray(mask)))[0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # A per-channel offset over the window (a slow drift): instance norm erases it, frame
  # norm keeps it.
  offset = jnp.asarray(act + rng.normal(size=(1, 6)), jnp.float32)[None]
  base = jnp.asarray(act, jnp.float32)[None]
  erased = np.allclose(vqvae.masked_instance_norm(offset, jnp.asarray(mask)),
                       vqvae.masked_instance_norm(base, jnp.asarray(mask)), atol=1e-4)
  kept = not np.allclose(vqvae.frame_norm(offset), vqvae.frame_norm(base), atol=1e-2)
  assert erased and kept
  with pytest.raises(ValueError, match="conv_norm"):
    vqvae.VQConfig(conv_norm="batch")


def test_replicate_pad_repeats_last_valid_frame():
  x = np.arange(2 * 6 * 1, dtype=np.float32).reshape(2, 6, 1)
  lengths = np.array([4, 6])
  got = np.asarray(vqvae.replicate_pad(jnp.asarray(x), jnp.asarray(lengths), pad=2))
  expected0 = np.pad(x[0, :4], ((2, 2), (0, 0)), mode="edge")
  np.testing.assert_array_equal(got[0, : 4 + 4], expected0)
  np.testing.assert_array_equal(got[1], np.pad(x[1], ((2, 2), (0, 0)), mode="edge"))


def test_quantizer_tokens_and_loss_match_numpy():
  quantizer = vqvae.VectorQuantizer(codebook_size=8, code_dim=4, beta=0.25)
  rng = np.random.default_rng(3)
  latents = rng.normal(size=(2, 5, 4)).astype(np.float32)
  mask = np.ones((2, 5), bool)
  mask[1, 3:] = False
  params = quantizer.init(jax.random.PRNGKey(0), jnp.asarray(latents), jnp.asarray(mask))
  codebook = np.asarray(params["params"]["codebook"])
  out = quantizer.apply(params, jnp.asarray(latents), jnp.asarray(mask))
  distances = ((latents[..., None, :] - codebook) ** 2).sum(-1)
  tokens = distances.argmin(-1)
  np.testing.assert_array_equal(np.asarray(out["tokens"])[mask], tokens[mask])
  sq = ((codebook[tokens] - latents) ** 2)[mask]
  np.testing.assert_allclose(float(out["quant_loss"]), 1.25 * sq.mean(), rtol=1e-5)
  counts = np.bincount(tokens[mask], minlength=8)
  np.testing.assert_array_equal(np.asarray(out["code_counts"]), counts)
  probs = counts / counts.sum()
  nz = probs[probs > 0]
  np.testing.assert_allclose(float(out["perplexity"]), np.exp(-(nz * np.log(nz)).sum()), rtol=1e-5)


def test_positional_encoding_official_indexes_batch_position():
  config = dataclasses.replace(TINY, positional_encoding="official_batch_index")
  module = vqvae.PositionalEncoding(config)
  x = np.zeros((3, 5, config.hidden_size), np.float32)
  out = np.asarray(module.apply({}, jnp.asarray(x), train=False))
  table = vqvae.sinusoid_table(10, config.hidden_size)
  for b in range(3):
    np.testing.assert_allclose(out[b], np.broadcast_to(table[b], (5, config.hidden_size)), atol=1e-6)
  time_module = vqvae.PositionalEncoding(TINY)
  out = np.asarray(time_module.apply({}, jnp.asarray(x), train=False))
  np.testing.assert_allclose(out[2], table[:5], atol=1e-6)


def test_official_size_parameter_count():
  model = vqvae.VQVAE(vqvae.VQConfig())
  shapes = jax.eval_shape(
      lambda: model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 8, 56)),
                         jnp.ones((1, 8), bool)))
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes))
  # Official VQAutoEncoder (DESIGN.md: 23.3 M), counted by hand:
  h, m, layers = 384, 1536, 6
  block = 2 * 2 * h + 3 * h * h + h * h + h + h * m + m + m * h + h
  conv = 5 * h * h + h
  encoder = (56 * h + h) + conv + (h * h + h) + layers * block + (h * 128 + 128)
  decoder = (128 * h + h) + conv + (h * h + h) + layers * block + h * 56
  assert count == encoder + decoder + 512 * 128


def test_bad_config_is_refused():
  with pytest.raises(ValueError, match="positional_encoding"):
    vqvae.VQConfig(positional_encoding="sideways")


def test_vq_task_eval_metrics_match_direct_computation():
  from dim_jax import config_lib
  from dim_jax.training import vq
  config = config_lib.shrink_to_tiny(config_lib.vq_config("speaker"))
  task = vq.VQTask.from_config(config)
  rng = np.random.default_rng(5)
  motion = rng.normal(size=(3, 12, 56)).astype(np.float32)
  motion[:, :, :6] *= 0.1
  mask = np.zeros((3, 12), bool)
  for i, n in enumerate([12, 7, 3]):
    mask[i, :n] = True
  motion[~mask] = 0.0
  batch = dict(speaker_motion=jnp.asarray(motion), mask=jnp.asarray(mask))
  params = task.init_params(jax.random.PRNGKey(0), batch)
  # Split the batch in two to check that sums combine exactly.
  halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
  sums = [jax.device_get(jax.jit(task.eval_sums)(params, h)) for h in halves]
  metrics = task.finalize_eval(jax.tree.map(np.add, *sums))
  out = task.model.apply({"params": params}, batch["speaker_motion"], batch["mask"])
  err = (np.asarray(out["reconstruction"]) - motion)[mask]
  target = motion[mask]
  assert metrics["frames"] == mask.sum()
  np.testing.assert_allclose(metrics["pose_l1"], np.abs(err[:, :6]).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["expression_mse"], np.square(err[:, 6:]).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["expression_unexplained"],
                             np.square(err[:, 6:]).sum() / (target[:, 6:].var(0).sum() * len(target)),
                             rtol=1e-4)
  tokens = np.asarray(out["tokens"])[mask]
  assert metrics["codes_used"] == len(np.unique(tokens))


def test_product_quantizer_tokens_are_mixed_radix_of_per_group_nearest_codes():
  quantizer = vqvae.VectorQuantizer(256, 32, 0.25, normalize=True, groups=2)
  latents = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 32))
  mask = jnp.ones((2, 5), bool)
  variables = quantizer.init(jax.random.PRNGKey(1), latents, mask)
  out = quantizer.apply(variables, latents, mask)
  codebook = np.asarray(variables["params"]["codebook"])          # [2 groups, 16, 16]
  assert codebook.shape == (2, 16, 16)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  groups = unit(np.asarray(latents).reshape(2, 5, 2, 16))
  nearest = [np.argmax(np.einsum("btd,kd->btk", groups[:, :, g], unit(codebook[g])), -1)
             for g in range(2)]
  np.testing.assert_array_equal(np.asarray(out["tokens"]), nearest[0] * 16 + nearest[1])
  # The decoder's vector of a token is its two groups' codes side by side.
  codes = np.asarray(quantizer.apply(variables, method=quantizer.codes))
  assert codes.shape == (256, 32)
  np.testing.assert_allclose(np.asarray(out["quantized"]), codes[np.asarray(out["tokens"])],
                             atol=1e-6)
  np.testing.assert_allclose(codes[3 * 16 + 5], np.concatenate([unit(codebook[0])[3],
                                                               unit(codebook[1])[5]]), atol=1e-6)
  want_counts = np.stack([np.bincount(nearest[g].reshape(-1), minlength=16) for g in range(2)])
  np.testing.assert_array_equal(np.asarray(out["group_code_counts"]), want_counts)
  np.testing.assert_array_equal(np.asarray(out["code_counts"]),
                                np.bincount((nearest[0] * 16 + nearest[1]).reshape(-1),
                                            minlength=256))
  with pytest.raises(ValueError, match="code_groups"):
    vqvae.VQConfig(codebook_size=128, code_dim=32, code_groups=2)  # 128 is not a square


@pytest.mark.parametrize("pose_codes", [0, 4])
def test_part_encoders_give_a_pose_code_and_an_expression_code(pose_codes):
  # part_encoders: token = pose code * E + expression code, each code read from its own part
  # (pose_codes=0: 16 x 16 codes; 4: 4 pose x 64 expression codes).
  config = dataclasses.replace(TINY, codebook_size=256, code_groups=2, part_encoders=True,
                               codebook_normalize=True, pose_codes=pose_codes)
  pose, expression = (pose_codes, 256 // pose_codes) if pose_codes else (16, 16)
  model, params = _init(config, frames=12)
  assert {"pose_encoder", "expression_encoder"} <= set(params) and "encoder" not in params
  rng = np.random.default_rng(3)
  motion = jnp.asarray(rng.normal(size=(4, 12, 56)).astype(np.float32))
  mask = jnp.ones((4, 12), bool)
  encode = lambda m: np.asarray(model.apply({"params": params}, m, mask,
                                            method=vqvae.VQVAE.encode)["tokens"])
  tokens = encode(motion)
  other_expression = encode(motion.at[..., 6:].set(rng.normal(size=(4, 12, 50))))
  other_pose = encode(motion.at[..., :6].set(rng.normal(size=(4, 12, 6))))
  # New expression: the pose digit stays, the expression digit moves (and vice versa).
  np.testing.assert_array_equal(other_expression // expression, tokens // expression)
  np.testing.assert_array_equal(other_pose % expression, tokens % expression)
  assert (other_expression % expression != tokens % expression).mean() > 0.5
  assert (other_pose // expression != tokens // expression).mean() > 0.25
  assert tokens.max() < 256 and (tokens // expression).max() < pose
  # The decoder's vector of a token: the pose code's vector, then the expression code's.
  quantizer = vqvae.VectorQuantizer(256, 16, 0.25, True, 2, config.code_sizes)
  table = np.asarray(params["quantizer"]["codebook"])               # [2, max(P, E), 8]
  unit = table / np.linalg.norm(table, axis=-1, keepdims=True)
  codes = np.asarray(quantizer.apply({"params": params["quantizer"]}, method=quantizer.codes))
  token = (pose - 1) * expression + 2
  np.testing.assert_allclose(codes[token], np.r_[unit[0, pose - 1], unit[1, 2]], atol=1e-6)
  for bad in (dict(code_groups=1, codebook_size=64), dict(code_groups=4, codebook_size=256)):
    with pytest.raises(ValueError, match="part_encoders"):
      dataclasses.replace(config, **bad)
  with pytest.raises(ValueError, match="pose_codes"):
    dataclasses.replace(config, pose_codes=3)  # does not divide 256
  # Sizes need not make a square vocabulary: 8 pose x 16 expression codes.
  assert dataclasses.replace(config, codebook_size=128, pose_codes=8).group_sizes == (8, 16)


def test_part_balanced_loss_is_each_parts_relative_raw_error():
  from dim_jax import config_lib
  from dim_jax.data import normalization
  from dim_jax.training import vq
  rng = np.random.default_rng(0)
  clip = {s: rng.normal(size=(40, 768 if s == "speaker_audio" else 56)) for s in
          normalization.STREAMS}
  clip["listener_motion"] *= np.r_[np.full(6, 0.03), np.linspace(0.05, 1.0, 50)]
  stats = normalization.compute([clip])
  config = config_lib.shrink_to_tiny(config_lib.vq_config("listener"))
  task = vq.VQTask.from_config(config, stats)
  assert (task.reconstruction_weighting, task.reconstruction_loss) == ("part_balanced", "mse")
  weights = task.dim_weights()
  np.testing.assert_allclose(weights.sum(), 56, rtol=1e-5)
  np.testing.assert_allclose(weights[:6].sum() / 56, task.pose_weight, rtol=1e-5)
  # On standardised errors e the weighted MSE is, per part, share x raw squared error over
  # the part's raw variance: the part's unexplained variance when e is the target itself.
  std = stats.std("listener_motion").astype(np.float64)
  error = rng.normal(size=(100, 56))
  weighted = (np.square(error) * weights).sum(1).mean() / 56
  raw = np.square(error * std)
  expected = (task.pose_weight * raw[:, :6].sum(1).mean() / np.square(std[:6]).sum()
              + (1 - task.pose_weight) * raw[:, 6:].sum(1).mean() / np.square(std[6:]).sum())
  np.testing.assert_allclose(weighted, expected, rtol=1e-5)
