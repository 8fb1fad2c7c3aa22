"""Weight-only int8 / bfloat16 decoding (dim_jax/models/quantize.py) with a tiny random DIM.

A DIM-Listener task narrower than the tiny configs (decoder width 48, 2 decoder blocks, 16
tokens), random params drawn in NumPy on the init shapes (no init program to compile). The
official-size figures (speed, memory, agreement on the demo checkpoint) are in the README's
Benchmarks section.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dim_jax import config_lib, generate, sampler
from dim_jax.data import pipeline
from dim_jax.models import dim as dim_lib
from dim_jax.models import quantize
from dim_jax.training import checkpointing
from helpers import params as params_helper
from helpers import tiny_dim

WINDOW = 16
DECODER_DEPTH = 2
# Quantized matmuls in series from a token to its logit: per decoder block self-attention
# (q/k/v, out), cross-attention (q, out) and feed-forward (in, out), then to_logits.
MATMULS_IN_SERIES = 6 * DECODER_DEPTH + 1
# Largest elementwise error relative to the weights' magnitude: int8 half a step (1/254 of the
# column's largest weight), bfloat16 round to nearest (2^-8 of the weight).
RELATIVE_STEP = {"int8": 0.5 / quantize.INT8_MAX, "bfloat16": 2.0 ** -8}


@functools.lru_cache(maxsize=None)
def _task():
  return tiny_dim.task(tiny_dim.finetune_config(WINDOW, decoder_depth=DECODER_DEPTH))


@functools.lru_cache(maxsize=None)
def _params(seed=0):
  task = _task()
  abstract = jax.eval_shape(functools.partial(task.init_params, jax.random.PRNGKey(0)),
                            pipeline.dummy_batch(1))
  return jax.tree.map(jnp.asarray, params_helper.random_params(abstract, seed, bias_scale=0.1))


def _inputs(batch, frames, seed=0):
  rng = np.random.default_rng(seed)
  return dict(speaker_motion=rng.normal(size=(batch, frames, 56)).astype(np.float32),
              listener_motion=rng.normal(size=(batch, frames, 56)).astype(np.float32),
              speaker_audio=rng.normal(size=(batch, frames, 768)).astype(np.float32),
              mask=np.ones((batch, frames), bool))


# Margins: a fully random decoder's 16-way logits are near ties (median top-1 margin 0.16,
# largest logit 1.9), so any change flips tokens; trained decoders are far from that (the demo's
# DIM-Listener: median margin 1.26, largest logit 12). With `to_logits` tied to the token
# embedding, the random blocks' decoder mostly copies its input token (59 % here), as trained
# tiny models largely do (README), with margins like the demo's (median 1.30, largest logit 9.3):
# agreement is measured on that decoder.
TIED_LOGITS_SCALE = 2.0


@functools.lru_cache(maxsize=None)
def _copying_decoder():
  """(joint decoder module, params): random blocks, to_logits tied to the token embedding."""
  decoder = dim_lib.joint_decoder_module(_task().model.config)
  params = dict(_params()["dim"]["joint_decoder"])
  table = np.asarray(params["token_emb"])[:decoder.num_tokens]
  params["to_logits"] = {"kernel": jnp.asarray(
      TIED_LOGITS_SCALE * table.T / np.linalg.norm(table, axis=1)[None, :])}
  return decoder, params


@jax.jit
def _teacher_forced_logits(params, tokens, context):
  decoder, _ = _copying_decoder()
  return decoder.apply({"params": params}, tokens, context)


def _teacher_forced_batch(batch=16, frames=64, seed=1):
  decoder, _ = _copying_decoder()
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.integers(0, decoder.num_tokens, (batch, frames)), jnp.int32),
          jnp.asarray(rng.normal(size=(batch, frames, decoder.dim)), jnp.float32))


def test_kernels_are_within_half_a_step():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(40, 6)).astype(np.float32)
  kernel[:, 2] = 0.0        # an all-zero column
  kernel[3, 4] = 50.0       # an outlier sets its column's step
  q = quantize.quantize_kernel(kernel, "int8")
  assert q.values.dtype == jnp.int8 and q.scale.dtype == jnp.float32 and q.scale.shape == (6,)
  assert int(jnp.max(jnp.abs(q.values.astype(jnp.int32)))) == quantize.INT8_MAX
  np.testing.assert_allclose(q.scale, np.where(np.abs(kernel).max(0) > 0,
                                               np.abs(kernel).max(0) / 127, 1.0), rtol=1e-7)
  error = np.abs(np.asarray(quantize.dequantize_kernel(q)) - kernel)
  assert np.all(error <= np.asarray(q.scale) / 2 * (1 + 1e-6))
  assert np.all(np.asarray(quantize.dequantize_kernel(q))[:, 2] == 0.0)
  b = quantize.quantize_kernel(kernel, "bfloat16")
  assert b.values.dtype == jnp.bfloat16 and b.scale is None
  error = np.abs(np.asarray(quantize.dequantize_kernel(b)) - kernel)
  assert np.all(error <= 2.0 ** -8 * np.abs(kernel))
  with pytest.raises(ValueError, match="expected 'int8' or 'bfloat16'"):
    quantize.quantize_kernel(kernel, "int4")


def test_quantize_params_takes_the_joint_decoder_kernels_only():
  params = _params()
  assert quantize.quantize_params(params, "float32") is params
  q = quantize.quantize_params(params, "int8")
  flat, flat_q = _flat(params), _flat(q)
  kernels = [p for p, x in flat.items()
             if "joint_decoder/" in p and p.endswith("kernel") and x.ndim == 2]
  assert sorted(quantize.quantized_paths(q)) == sorted(kernels)
  assert len(kernels) == 10 * DECODER_DEPTH + 1  # q, k, v, out twice; ff in, out; logits
  for path, x in flat.items():
    if path not in kernels:  # everything else is the very same array
      assert flat_q[path] is x, path
  # The decoder kernels take a quarter of their bytes plus one float32 scale per column.
  kernel_bytes = sum(flat[p].size * 4 for p in kernels)
  scale_bytes = sum(flat[p].shape[1] * 4 for p in kernels)
  assert quantize.tree_bytes(params) - quantize.tree_bytes(q) == (
      kernel_bytes - kernel_bytes // 4 - scale_bytes)
  # Quantizing twice is a no-op (the same boxes); another mode needs the float32 values.
  assert all(a is b for a, b in zip(_flat(quantize.quantize_params(q, "int8")).values(),
                                    flat_q.values()))
  with pytest.raises(ValueError, match="already quantized to int8"):
    quantize.quantize_params(q, "bfloat16")
  with pytest.raises(ValueError, match="weights='int4'"):
    quantize.quantize_params(params, "int4")


def _flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, quantize.QuantizedKernel))[0]
  return {checkpointing.path_str(path): x for path, x in leaves}


@pytest.mark.parametrize("mode", ["int8", "bfloat16"])
def test_teacher_forced_logits_agree_with_float32(mode):
  """Top-1 tokens agree on >= 99 % of 1,024 teacher-forced positions, and the largest logit
  change is within the first-order bound of the quantization step: each of the matmuls in
  series on a token's path changes what it carries by at most RELATIVE_STEP of its magnitude
  (measured: 1/8 of the bound with int8, 1/16 with bfloat16)."""
  _, params = _copying_decoder()
  tokens, context = _teacher_forced_batch()
  reference = np.asarray(_teacher_forced_logits(params, tokens, context))
  quantized = quantize.quantize_params(params, mode, kernels="kernel$")
  assert len(quantize.quantized_paths(quantized)) == 10 * DECODER_DEPTH + 1
  logits = np.asarray(_teacher_forced_logits(quantized, tokens, context))
  # The modules dequantize where they read each kernel: the same numbers as a float32 tree.
  np.testing.assert_array_equal(
      logits, _teacher_forced_logits(quantize.dequantize(quantized), tokens, context))
  agreement = np.mean(logits.argmax(-1) == reference.argmax(-1))
  assert agreement >= 0.99, agreement
  bound = MATMULS_IN_SERIES * RELATIVE_STEP[mode] * np.abs(reference).max()
  assert 0 < np.abs(logits - reference).max() <= bound, (np.abs(logits - reference).max(), bound)


def test_quantized_weights_enter_the_compiled_step_narrow():
  """XLA's parameter buffers are the int8 / bfloat16 arrays (what the executable holds)."""
  _, params = _copying_decoder()
  tokens, context = _teacher_forced_batch()
  sizes = {}
  for mode in quantize.MODES:
    quantized = quantize.quantize_params(params, mode, kernels="kernel$")
    compiled = _teacher_forced_logits.lower(quantized, tokens, context).compile()
    sizes[mode] = compiled.memory_analysis().argument_size_in_bytes
    # Every input is a parameter buffer, at its stored width.
    assert sizes[mode] == quantize.tree_bytes((quantized, tokens, context)), mode
  assert sizes["int8"] < sizes["bfloat16"] < sizes["float32"]


def test_generator_weights_option():
  task, params = _task(), _params()
  int8 = generate.Generator(task=task, params=params, sampling=sampler.SamplingConfig(),
                            window=WINDOW, weights="int8")
  decoder = int8.params["dim"]["joint_decoder"]["attn_layers"]["layers_2"]["ff_in"]["kernel"]
  assert isinstance(decoder, quantize.QuantizedKernel) and decoder.values.dtype == jnp.int8
  # Replacing a setting keeps the quantized params (quantizing twice is a no-op).
  replaced = dataclasses.replace(int8, overlap=2)
  logits_kernel = lambda gen: gen.params["dim"]["joint_decoder"]["to_logits"]["kernel"]
  assert logits_kernel(replaced) is logits_kernel(int8)
  # The int8 generator runs exactly what a float32 one runs on the dequantized params.
  same = generate.Generator(task=task, params=quantize.dequantize(int8.params),
                            sampling=sampler.SamplingConfig(), window=WINDOW)
  batch = _inputs(2, 40)
  out = int8(batch, jax.random.PRNGKey(3), num_samples=2)
  reference = same(batch, jax.random.PRNGKey(3), num_samples=2)
  np.testing.assert_array_equal(out["tokens"], reference["tokens"])
  np.testing.assert_allclose(out["motion"], reference["motion"], rtol=1e-6, atol=1e-6)
  assert np.isfinite(out["motion"]).all() and out["motion"].shape == (2, 2, 40, 56)
  with pytest.raises(ValueError, match="weights='int4'"):
    generate.Generator(task=task, params=params, sampling=sampler.SamplingConfig(),
                       window=WINDOW, weights="int4")
  # The phases pass generate.weights / evaluate.weights on to Generator.from_workdir.
  for phase_config in (config_lib.generate_config().generate,
                       config_lib.evaluate_config().evaluate):
    assert generate.window_settings(phase_config)["weights"] == "float32"
    phase_config.weights = "int8"
    assert generate.window_settings(phase_config)["weights"] == "int8"
