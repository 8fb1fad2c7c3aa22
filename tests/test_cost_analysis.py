"""tools/cost_analysis.py: its numbers come from the compiled program and loops are corrected."""

import functools
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from dim_jax import sampler
from dim_jax.models.transformer import TokenDecoder

_SPEC = importlib.util.spec_from_file_location(
    "cost_analysis", os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools",
                                  "cost_analysis.py"))
cost_analysis = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("cost_analysis", cost_analysis)  # its dataclasses look the module up
_SPEC.loader.exec_module(cost_analysis)

F32 = jnp.float32


def _spec(*shape, dtype=F32):
  return jax.ShapeDtypeStruct(shape, dtype)


def test_dense_train_step_flops_equal_the_matmul_count():
  # A two-layer MLP, SGD on a squared error. Matmul FLOPs by hand (2mnk each): forward
  # x@W1 and h@W2; backward dW2 = h^T g, dh = g W2^T, dW1 = x^T dh (no dx: x is data).
  batch, d_in, hidden, d_out = 64, 256, 512, 256
  first, second = 2 * batch * d_in * hidden, 2 * batch * hidden * d_out
  analytic = 2 * first + 3 * second

  def step(params, x, y):
    def loss(p):
      h = jax.nn.relu(x @ p["w1"])
      return jnp.mean((h @ p["w2"] - y) ** 2)
    grads = jax.grad(loss)(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

  params = dict(w1=_spec(d_in, hidden), w2=_spec(hidden, d_out))
  cost = cost_analysis.compile_cost(step, params, _spec(batch, d_in), _spec(batch, d_out))
  # Elementwise work (relu, its mask, the error, the update) adds about 1 %; matmuls are
  # all of the rest. A missed or doubled matmul would be off by >= 20 %.
  assert analytic <= cost["flops"] <= 1.03 * analytic
  # The memory analysis sees the two weight matrices and the data as arguments.
  weight_bytes = 4 * (d_in * hidden + hidden * d_out)
  assert cost["argument_bytes"] == weight_bytes + 4 * batch * (d_in + d_out)
  assert cost["bytes_accessed"] >= weight_bytes  # each weight is read at least once


def test_loop_body_counted_once_and_corrected_by_trip_count():
  n, trips = 128, 12

  def body(x, w):
    return x @ w

  def loop(x, w):
    return jax.lax.scan(lambda c, _: (body(c, w), None), x, None, length=trips)[0]

  raw = cost_analysis.compile_cost(loop, _spec(n, n), _spec(n, n))
  one = cost_analysis.compile_cost(body, _spec(n, n), _spec(n, n))
  assert raw["while_loops"] == 1 and raw["kernels"]["loop_body"] >= 1
  # XLA counts the body once: were it to start multiplying by the trip count, the
  # correction below would double count, and this must fail.
  assert raw["flops"] == pytest.approx(2 * n**3, rel=0.01)
  corrected = cost_analysis.loop_corrected(raw, one, trips)
  assert corrected["flops"] == pytest.approx(trips * 2 * n**3, rel=0.01)


def test_token_loop_correction_equals_the_unrolled_program():
  # A small causal decoder sampled for `length` positions: the scan of
  # sampler.generate_tokens corrected with the standalone token step must cost what the
  # same steps cost written out one after another (no loop for XLA to count once).
  batch, frames, length = 2, 6, 5
  decoder = TokenDecoder(num_tokens=64, dim=128, depth=1, heads=2, max_seq_len=16,
                         use_abs_pos_emb=False, dim_head=64)
  sampling = sampler.SamplingConfig()
  context = _spec(batch, frames, 128)
  context_mask = _spec(batch, frames, dtype=jnp.bool_)
  first = _spec(batch, dtype=jnp.int32)
  variables = jax.eval_shape(decoder.init, jax.random.PRNGKey(0),
                             jnp.zeros((batch, length), jnp.int32),
                             jnp.zeros((batch, frames, 128)))
  key = cost_analysis.KEY

  generate = lambda v, f, c, m, r: sampler.generate_tokens(
      decoder, v, first_tokens=f, length=length, context=c, context_mask=m, rng=r,
      sampling=sampling)
  raw = cost_analysis.compile_cost(generate, variables, first, context, context_mask, key)

  step = cost_analysis.token_step_fn(decoder, sampling)
  cache = jax.eval_shape(lambda: decoder.init_cache(batch, length - 1))
  cross_kv = jax.eval_shape(functools.partial(decoder.apply,
                                              method=TokenDecoder.precompute_cross),
                            variables, context)
  scalar = _spec(dtype=jnp.int32)
  body = cost_analysis.compile_cost(step, variables, cache, first, scalar, first, first,
                                    context, context_mask, cross_kv, key)

  def unrolled(v, f, c, m, r):
    cache = decoder.init_cache(f.shape[0], length - 1)
    cross = decoder.apply(v, c, method=TokenDecoder.precompute_cross)
    token, out = f, [f]
    for t in range(1, length):
      cache, token = step(v, cache, token, jnp.int32(t), token, jnp.int32(1), c, m, cross, r)
      out.append(token)
    return jnp.stack(out, axis=1)

  reference = cost_analysis.compile_cost(unrolled, variables, first, context, context_mask,
                                         key)
  corrected = cost_analysis.loop_corrected(raw, body, length - 1)
  assert raw["flops"] < 0.5 * reference["flops"]  # uncorrected, most steps are missing
  assert corrected["flops"] == pytest.approx(reference["flops"], rel=0.01)


def test_roofline_estimate_by_hand():
  device = cost_analysis.DEVICES["h100_sxm"]
  compute_bound = dict(flops=1e12, bytes_accessed=1e9, kernels=dict(entry=10, loop_body=0))
  row = cost_analysis.estimate(compute_bound, device, "bfloat16", 0.4, 0.7)
  assert row["compute_s"] == pytest.approx(1e12 / (989e12 * 0.4))
  assert row["memory_s"] == pytest.approx(1e9 / (3.35e12 * 0.7))
  assert row["bound"] == "compute" and row["expected_s"] == row["compute_s"]
  # A batch-1 token: 257 MB of weights, 0.13 GFLOP, 300 kernels: launches dominate.
  token = dict(flops=1.3e8, bytes_accessed=2.57e8, kernels=dict(entry=300, loop_body=0))
  row = cost_analysis.estimate(token, device, "float32", 0.4, 0.7, repeats=63)
  assert row["launch_floor_s"] == pytest.approx(63 * 300 * device.kernel_s)
  assert row["bound"] == "launch"
  assert row["memory_s"] == pytest.approx(63 * 2.57e8 / (3.35e12 * 0.7))


def test_kernel_count_reads_entry_and_loop_bodies():
  def f(x, w):
    y = jnp.tanh(x @ w) + 1.0
    return jax.lax.fori_loop(0, 3, lambda i, c: jnp.sin(c @ w), y)

  compiled = jax.jit(f).lower(_spec(32, 32), _spec(32, 32)).compile()
  counts = cost_analysis.kernel_count(compiled.as_text())
  assert counts["entry"] >= 1 and counts["loop_body"] >= 1
  computations = cost_analysis.hlo_computations(compiled.as_text())
  # The loop itself is no kernel; its body's ops are counted per iteration instead.
  assert "while" in computations["__entry__"]
  entry_kernels = [op for op in computations["__entry__"] if op not in ("parameter", "while")]
  assert counts["entry"] <= len(entry_kernels)
