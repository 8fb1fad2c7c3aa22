r"""Compiled cost of every DIM step at official sizes, and what it predicts on accelerators.

  python tools/cost_analysis.py --out cost.json [--markdown cost.md] [--quick]

Each step is lowered and compiled from abstract inputs (`jax.ShapeDtypeStruct`: no weights
are allocated) and read back with XLA's `cost_analysis()` (FLOPs, transcendentals, bytes
accessed) and `memory_analysis()` (argument, output, temporary bytes):

  train steps  `trainer.train_step` of `vq` (speaker and listener tokenizers, 32 x 64
               frames), `pretrain`, `finetune_listener`, `finetune_speaker` (8 x 64), each at
               its config's batch size, AdamW and the phase's frozen set included;
  token step   one autoregressive decoder step with the KV cache, the body of
               `sampler.generate_tokens` (decode_step + top-k sampling) at batch 1 and 32,
               with the decoder kernels held as float32, bfloat16 or int8;
  window step  `generate._window_step`: one 64-frame clip (encode the speaker, 63 tokens,
               VQ-decode), at batch 1, 8 and 32.

Loops. XLA's cost analysis counts the body of a while loop (a `lax.scan`) once, whatever its
trip count (checked in tests/test_cost_analysis.py). The window step's token loop runs
`window - 1` times, so its FLOPs, transcendentals and bytes are corrected with the standalone
token step: window + (trips - 1) x token. Train steps have no loops but jax.random's (the
threefry hash of dropout and masking, 5 trips of elementwise integer work, left uncorrected:
at most 0.2 % of a step: the VQ step's two dropout masks count 43 MFLOP each, at most 5x
that uncounted, against 294 GFLOP); the tool fails if a train step holds any other loop.

Bytes. XLA:CPU's "bytes accessed" is an estimate: the sum of every fused kernel's operand and
output sizes after CPU fusion decisions; a GPU or TPU compiler fuses differently, so it is a
guide to the order of magnitude, not a measurement. Kernel counts (`kernels`) are the
top-level operations of the optimised CPU program that a GPU would launch as kernels
(fusions, dots, custom calls, copies, ...): a proxy for per-kernel launch overhead.

The accelerator estimates (`estimate`) are a roofline, max(flops / (peak x flop_eff),
bytes / (bandwidth x byte_eff)), next to a launch floor (kernels x per-kernel overhead), with
the peaks of `DEVICES` and the efficiencies of `--flop_eff` / `--byte_eff` (assumptions, not
measurements); docs/accelerators.md explains them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, ROOT)

FRAMES = 64  # the official training window (and the generated window).


@dataclasses.dataclass(frozen=True)
class Device:
  """Peak figures of one accelerator (data sheets) and the overheads assumed for it.

  Attributes:
    name: what it is.
    flops: peak dense FLOP/s by matmul precision: 'bfloat16' (bf16 inputs, f32 accumulate),
      'float32' (what a float32 program gets under JAX's default matmul precision), and
      'float32_highest' (precision='highest').
    bandwidth: peak HBM bytes/s.
    kernel_s: assumed seconds of overhead per launched kernel (launch + gap between small
      kernels) when kernels are too small to hide it.
    notes: where the numbers come from.
  """
  name: str
  flops: dict
  bandwidth: float
  kernel_s: float
  notes: str


DEVICES = {
    "h100_sxm": Device(
        name="NVIDIA H100 SXM (one GPU)",
        # JAX's default precision lets XLA:GPU run float32 dots as TF32 on Hopper.
        flops={"bfloat16": 989e12, "float32": 495e12, "float32_highest": 67e12},
        bandwidth=3.35e12, kernel_s=4e-6,
        notes="dense (no sparsity) tensor-core peaks; HBM3 3.35 TB/s; float32 = TF32 under "
              "JAX's default matmul precision, float32_highest = FP32 CUDA cores; ~4 us per "
              "kernel launch and gap (assumed, XLA without CUDA graphs)"),
    "tpu_v5e": Device(
        name="Google TPU v5e (one chip)",
        # JAX's default precision runs float32 dots as one bf16 MXU pass on TPU;
        # 'highest' takes about 6 passes.
        flops={"bfloat16": 197e12, "float32": 197e12, "float32_highest": 197e12 / 6},
        bandwidth=819e9, kernel_s=1e-6,
        notes="bf16 MXU peak 197 TFLOP/s, HBM 819 GB/s; float32 at JAX's default precision "
              "is one bf16 pass, 'highest' about 6; the whole program (token loop included) "
              "runs on the chip, ~1 us per fused op assumed"),
}

# Optimised-HLO opcodes that are no kernel of their own (views, tuples, loop plumbing).
_NOT_KERNELS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
                "call", "conditional", "after-all", "partition-id", "replica-id",
                "opt-barrier", "add-dependency"}
RNG_LOOP = re.compile(r"threefry|_uniform|_bernoulli|_gumbel|random_bits")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?[%\w.\-]+\s*=\s*(?:\([^=]*\)|[\w\[\]{},:\s]*?)\s*"
                          r"([a-z][a-z\-]*)\(")


# --- reading a compiled program ---------------------------------------------------------

def hlo_computations(hlo_text: str) -> dict[str, list[str]]:
  """{computation name: [opcode of each instruction]} of an HLO module's text."""
  computations, name = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and not line.startswith(" "):
      name = header.group(1)
      computations[name] = []
      if line.startswith("ENTRY"):
        computations["__entry__"] = computations[name]
      continue
    if name is None:
      continue
    match = _INSTRUCTION.match(line)
    if match:
      computations[name].append(match.group(1))
  return computations


def kernel_count(hlo_text: str) -> dict[str, int]:
  """Kernels a GPU would launch: top-level ops of the entry and of while-loop bodies.

  Returns:
    dict(entry=..., loop_body=...): the entry computation's kernels (a loop body's once),
    and the kernels of the while bodies (launched once per iteration).
  """
  computations = hlo_computations(hlo_text)
  bodies = set(re.findall(r"\bbody=%?([\w.\-]+)", hlo_text))
  count = lambda ops: sum(op not in _NOT_KERNELS for op in ops)
  return dict(entry=count(computations.get("__entry__", [])),
              loop_body=sum(count(computations.get(b, [])) for b in bodies))


def compiled_cost(compiled) -> dict[str, Any]:
  """FLOPs, bytes and memory of one compiled executable (`jax.stages.Compiled`)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per device
    cost = cost[0]
  out = dict(flops=float(cost.get("flops", 0.0)),
             transcendentals=float(cost.get("transcendentals", 0.0)),
             bytes_accessed=float(cost.get("bytes accessed", 0.0)))
  try:
    memory = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    memory = None
  if memory is not None:
    out.update(argument_bytes=int(memory.argument_size_in_bytes),
               output_bytes=int(memory.output_size_in_bytes),
               alias_bytes=int(memory.alias_size_in_bytes),
               temp_bytes=int(memory.temp_size_in_bytes))
  text = compiled.as_text()
  out["kernels"] = kernel_count(text)
  loops = re.findall(r"\bwhile\(.*?op_name=\"([^\"]*)\"", text)
  out["while_loops"] = len(re.findall(r"\bwhile\(", text))
  # jax.random's threefry hash runs its rounds as a short while loop (5 trips): elementwise
  # integer work, counted once like any loop but negligible (<= 0.2 % of a train step).
  out["rng_loops"] = sum(bool(RNG_LOOP.search(name)) for name in loops)
  return out


def compile_cost(fn: Callable, *args, static_kwargs: dict | None = None,
                 donate_argnums=()) -> dict[str, Any]:
  """`compiled_cost` of `jax.jit(fn)` lowered on `args` (arrays or ShapeDtypeStructs)."""
  t0 = time.perf_counter()
  jitted = jax.jit(functools.partial(fn, **(static_kwargs or {})), donate_argnums=donate_argnums)
  compiled = jitted.lower(*args).compile()
  return dict(compiled_cost(compiled), compile_s=time.perf_counter() - t0)


def loop_corrected(total: dict, body: dict, trips: int) -> dict:
  """Cost of a program whose loop body (cost `body`) XLA counted once but runs `trips` times."""
  out = dict(total)
  for key in ("flops", "transcendentals", "bytes_accessed"):
    out[key] = total[key] + (trips - 1) * body[key]
  out["loop_trips"] = trips
  return out


def tree_bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def abstract(tree):
  """ShapeDtypeStructs of a tree of arrays (or of ShapeDtypeStructs)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def batch_spec(batch: int, frames: int = FRAMES) -> dict:
  f32 = jnp.float32
  return dict(speaker_motion=jax.ShapeDtypeStruct((batch, frames, 56), f32),
              listener_motion=jax.ShapeDtypeStruct((batch, frames, 56), f32),
              speaker_audio=jax.ShapeDtypeStruct((batch, frames, 768), f32),
              mask=jax.ShapeDtypeStruct((batch, frames), jnp.bool_))


KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)  # a jax.random.PRNGKey


# --- the steps --------------------------------------------------------------------------

def official_task(phase: str, dtype: str):
  """(task, train config) of a phase at official sizes; 'vq_speaker' / 'vq_listener' too."""
  from dim_jax import config_lib  # pylint: disable=g-import-not-at-top
  from dim_jax.models import vqvae
  from dim_jax.training import dim_tasks, vq
  if phase.startswith("vq_"):
    config = config_lib.vq_config(phase[3:])
    config.model.compute_dtype = dtype
    return vq.VQTask.from_config(config), config.train
  config = config_lib.dim_config(phase)
  config.model.compute_dtype = dtype
  vq_model = config_lib.vq_model_config()
  vq_model.compute_dtype = dtype
  vq_cfg = vqvae.vq_config_from(vq_model)
  return (dim_tasks.DIMTask.from_config(config, speaker_vq=vq_cfg, listener_vq=vq_cfg),
          config.train)


def train_step_cost(phase: str, dtype: str = "float32", batch: int | None = None,
                    frames: int = FRAMES) -> dict:
  """Compiled cost of one optimizer step of `phase` (abstract state: nothing allocated)."""
  from dim_jax.training import trainer  # pylint: disable=g-import-not-at-top
  task, train_config = official_task(phase, dtype)
  batch = int(batch or train_config.batch_size)
  inputs = batch_spec(batch, frames)
  params = jax.eval_shape(task.init_params, KEY, inputs)
  trainable = task.trainable_mask(params)
  optimizer = trainer.make_optimizer(train_config, trainable)
  state = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
               opt_state=jax.eval_shape(optimizer.init, params), rng=KEY)
  cost = compile_cost(trainer.train_step, state, inputs, donate_argnums=0,
                      static_kwargs=dict(task=task, optimizer=optimizer, trainable=trainable))
  if cost["while_loops"] > cost["rng_loops"]:
    raise AssertionError(f"{phase}: the train step holds a while loop other than jax.random's; "
                         "its cost would need a trip-count correction")
  n_trainable = sum(int(np.prod(p.shape)) for p, t in zip(
      jax.tree.leaves(params), jax.tree.leaves(trainable if trainable is not None else
                                               jax.tree.map(lambda _: True, params))) if t)
  return dict(cost, kind="train_step", phase=phase, dtype=dtype, batch=batch, frames=frames,
              params=sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)),
              trainable_params=n_trainable, params_bytes=tree_bytes(params),
              state_bytes=tree_bytes(state))


def _generation_setup(dtype: str, weights: str, clips: int, frames: int):
  from dim_jax import generate, sampler  # pylint: disable=g-import-not-at-top
  from dim_jax.models import quantize
  task, _ = official_task("finetune_listener", dtype)
  params = jax.eval_shape(task.init_params, KEY, batch_spec(1, frames))
  if weights != "float32":  # the narrow kernels' shapes, without quantizing anything
    params = jax.eval_shape(functools.partial(quantize.quantize_params, mode=weights), params)
  # Already-quantized kernels of the same mode are kept as they are.
  gen = generate.Generator(task=task, params=params, sampling=sampler.SamplingConfig(),
                           window=frames, weights=weights)
  return task, gen, params


def token_step_fn(decoder, sampling) -> Callable:
  """The body of `sampler.generate_tokens`' scan as a function of its inputs:
  `step(variables, cache, prev, t, given, prompt_length, context, context_mask, cross_kv,
  rng) -> (cache, token)`."""
  from dim_jax import sampler  # pylint: disable=g-import-not-at-top

  def step(variables, cache, prev, t, given, prompt_length, context, context_mask, cross_kv,
           rng):
    logits, cache = decoder.apply(variables, prev[:, None], t - 1, cache, context, context_mask,
                                  cross_kv, method=type(decoder).decode_step)
    token = sampler.sample_next(jax.random.fold_in(rng, t), logits[:, -1], sampling)
    return cache, jnp.where(t < prompt_length, given, token)
  return step


def token_step_cost(dtype: str = "float32", clips: int = 1, frames: int = FRAMES,
                    weights: str = "float32") -> dict:
  """One decoder token with the KV cache: the body of `sampler.generate_tokens`' scan."""
  from dim_jax.models import dim as dim_lib  # pylint: disable=g-import-not-at-top
  task, gen, params = _generation_setup(dtype, weights, clips, frames)
  decoder = dim_lib.joint_decoder_module(task.model.config)
  variables = {"params": params["dim"]["joint_decoder"]}
  f32 = jnp.float32
  context = jax.ShapeDtypeStruct((clips, frames, decoder.dim), f32)
  context_mask = jax.ShapeDtypeStruct((clips, frames), jnp.bool_)
  cache = abstract(jax.eval_shape(lambda: decoder.init_cache(clips, frames - 1)))
  cross_kv = jax.eval_shape(functools.partial(decoder.apply, method=type(decoder).precompute_cross),
                            variables, context)

  tokens = jax.ShapeDtypeStruct((clips,), jnp.int32)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  cost = compile_cost(token_step_fn(decoder, gen.sampling), variables, cache, tokens, scalar,
                      tokens, tokens, context, context_mask, cross_kv, KEY, donate_argnums=1)
  return dict(cost, kind="token_step", dtype=dtype, weights=weights, clips=clips,
              cache_slots=frames - 1, decoder_params_bytes=tree_bytes(variables),
              cache_bytes=tree_bytes(cache))


def window_step_cost(dtype: str = "float32", clips: int = 1, frames: int = FRAMES,
                     weights: str = "float32", token: dict | None = None) -> dict:
  """One generated window (a 64-frame clip): encode, `frames - 1` tokens, VQ-decode.

  The token loop's body is counted once by XLA; `token` (a `token_step_cost` of the same
  batch) corrects it by the trip count.
  """
  from dim_jax import generate  # pylint: disable=g-import-not-at-top
  task, gen, params = _generation_setup(dtype, weights, clips, frames)
  window_inputs = {k: v for k, v in batch_spec(clips, frames).items() if k != "listener_motion"}
  tokens = jax.ShapeDtypeStruct((clips, frames), jnp.int32)
  first = jax.ShapeDtypeStruct((clips,), jnp.int32)
  t0 = time.perf_counter()
  compiled = generate._window_step.lower(  # pylint: disable=protected-access
      gen, params, window_inputs, tokens, first, jax.ShapeDtypeStruct((), jnp.int32),
      jax.ShapeDtypeStruct((clips, 2), jnp.uint32),  # one key per clip (generate.clip_keys)
      jax.ShapeDtypeStruct((), jnp.bool_), num_samples=1).compile()
  raw = dict(compiled_cost(compiled), compile_s=time.perf_counter() - t0)
  token = token or token_step_cost(dtype, clips, frames, weights)
  out = loop_corrected(raw, token, frames - 1)
  return dict(out, kind="window_step", dtype=dtype, weights=weights, clips=clips, frames=frames,
              counted_once=dict(flops=raw["flops"], bytes_accessed=raw["bytes_accessed"]),
              params_bytes=tree_bytes(params), token_step=dict(
                  flops=token["flops"], bytes_accessed=token["bytes_accessed"],
                  kernels=token["kernels"]["entry"]))


# --- accelerator estimates --------------------------------------------------------------

def estimate(cost: dict, device: Device, precision: str, flop_eff: float, byte_eff: float,
             kernels: int | None = None, repeats: int = 1) -> dict:
  """Roofline seconds and launch floor of `repeats` runs of a step of cost `cost`."""
  compute = cost["flops"] / (device.flops[precision] * flop_eff)
  memory = cost["bytes_accessed"] / (device.bandwidth * byte_eff)
  if kernels is None:  # loop bodies run at least once (the sampler's random hash: 5 times)
    kernels = cost["kernels"]["entry"] + cost["kernels"]["loop_body"]
  floor = kernels * device.kernel_s
  roofline = max(compute, memory)
  return dict(compute_s=compute * repeats, memory_s=memory * repeats,
              roofline_s=roofline * repeats, launch_floor_s=floor * repeats,
              expected_s=max(roofline, floor) * repeats,
              bound="launch" if floor > roofline else ("compute" if compute >= memory
                                                        else "memory"))


def estimates(report: dict, flop_eff: float, byte_eff: float) -> dict:
  """Per device and precision: seconds per train step, per token, per clip (batch N)."""
  out = {}
  for key, device in DEVICES.items():
    rows = {}
    for precision in ("float32", "bfloat16"):
      for name, cost in report["steps"].items():
        if cost["kind"] == "window_step":
          # Encode + decode once (the loop-free part) and the token loop per token.
          token = report["steps"][cost["token_name"]]
          once = dict(flops=cost["flops"] - cost["loop_trips"] * token["flops"],
                      bytes_accessed=cost["bytes_accessed"] - cost["loop_trips"]
                      * token["bytes_accessed"], kernels=cost["kernels"])
          first = estimate(once, device, precision, flop_eff, byte_eff,
                           kernels=cost["kernels"]["entry"])
          loop = estimate(token, device, precision, flop_eff, byte_eff,
                          repeats=cost["loop_trips"])
          total = {k: first[k] + loop[k] for k in ("compute_s", "memory_s", "roofline_s",
                                                   "launch_floor_s", "expected_s")}
          total.update(bound=loop["bound"] + " (token loop)", clips=cost["clips"],
                       seconds_per_clip=total["expected_s"] / cost["clips"],
                       clips_per_s=cost["clips"] / total["expected_s"],
                       token_loop_s=loop["expected_s"])
          rows[f"{name}/{precision}"] = total
        else:
          row = estimate(cost, device, precision, flop_eff, byte_eff)
          if cost["kind"] == "train_step":
            row["frames_per_s"] = cost["batch"] * cost["frames"] / row["expected_s"]
          rows[f"{name}/{precision}"] = row
    out[key] = dict(device=dataclasses.asdict(device), rows=rows)
  return out


# --- the report -------------------------------------------------------------------------

def run(quick: bool = False, dtype: str = "float32", flop_eff: float = 0.4,
        byte_eff: float = 0.7, log=print, reuse: dict | None = None,
        save: Callable[[dict], None] | None = None) -> dict:
  """Every step's compiled cost and the accelerator estimates (see module docstring).

  `reuse`: steps of an earlier report (same dtype) kept instead of compiled again; `save`
  is called with the steps so far after each compile (minutes each at official size).
  """
  steps = {}
  reuse = reuse or {}

  def remember(name, compute):
    steps[name] = reuse[name] if name in reuse else compute()
    if save is not None:
      save(steps)
    return steps[name]
  train_phases = (("vq_speaker", "pretrain") if quick else
                  ("vq_speaker", "vq_listener", "pretrain", "finetune_listener",
                   "finetune_speaker"))
  for phase in train_phases:
    remember(f"train/{phase}", functools.partial(train_step_cost, phase, dtype))
    log(f"train/{phase}: {steps[f'train/{phase}']['flops'] / 1e9:.1f} GFLOP, compiled in "
        f"{steps[f'train/{phase}']['compile_s']:.0f} s")
  for clips in ((1,) if quick else (1, 32)):
    for weights in (("float32",) if quick or clips != 1 else ("float32", "bfloat16", "int8")):
      name = f"token/clips{clips}/{weights}"
      remember(name, functools.partial(token_step_cost, dtype, clips, weights=weights))
      log(f"{name}: {steps[name]['flops'] / 1e6:.1f} MFLOP, "
          f"{steps[name]['bytes_accessed'] / 1e6:.0f} MB")
  for clips in ((1,) if quick else (1, 8, 32)):
    token_name = f"token/clips{clips}/float32"
    token = remember(token_name, functools.partial(token_step_cost, dtype, clips))
    name = f"window/clips{clips}"
    remember(name, lambda: dict(window_step_cost(dtype, clips, token=token),
                                token_name=token_name))
    log(f"{name}: {steps[name]['flops'] / 1e9:.1f} GFLOP (loop-corrected), compiled in "
        f"{steps[name]['compile_s']:.0f} s")
  for cost in steps.values():
    cost["arithmetic_intensity"] = cost["flops"] / max(cost["bytes_accessed"], 1.0)
  report = dict(
      jax=jax.__version__, backend=jax.default_backend(), compute_dtype=dtype,
      frames=FRAMES, flop_eff=flop_eff, byte_eff=byte_eff, steps=steps,
      notes=["cost_analysis counts a while-loop body once: window steps are corrected by the "
             "token step x (trips - 1)", "bytes_accessed is XLA:CPU's estimate after CPU fusion",
             "efficiencies and per-kernel overheads are assumptions, not measurements"])
  report["estimates"] = estimates(report, flop_eff, byte_eff)
  return report


def markdown(report: dict) -> str:
  """Tables of the compiled costs and the accelerator estimates."""
  lines = ["| step | GFLOP | GB accessed (est.) | FLOP/byte | kernels (+ in loop bodies) | "
           "args MB | temp MB |", "|---|---|---|---|---|---|---|"]
  for name, c in report["steps"].items():
    kernels = c["kernels"]["entry"]
    if c["kernels"]["loop_body"]:
      kernels = f"{kernels} + {c['kernels']['loop_body']}"
    lines.append(f"| {name} | {c['flops'] / 1e9:.3f} | {c['bytes_accessed'] / 1e9:.3f} | "
                 f"{c['arithmetic_intensity']:.1f} | {kernels} | "
                 f"{c.get('argument_bytes', 0) / 1e6:.0f} | {c.get('temp_bytes', 0) / 1e6:.0f} |")
  for key, est in report["estimates"].items():
    lines += ["", f"{est['device']['name']} (flop eff {report['flop_eff']:.0%}, byte eff "
              f"{report['byte_eff']:.0%}, {est['device']['kernel_s'] * 1e6:.0f} us/kernel; "
              "math at float32 = JAX's default precision, bytes of the float32 program):", "",
              "| step | math ms float32 | math ms bf16 | bytes ms | launch floor ms | "
              "expected ms (float32) | bound | throughput |", "|---|---|---|---|---|---|---|---|"]
    for key, r in est["rows"].items():
      name, precision = key.rsplit("/", 1)
      if precision != "float32":
        continue
      bf16 = est["rows"][f"{name}/bfloat16"]
      if "clips_per_s" in r:
        throughput = f"{r['clips_per_s']:.0f} clips/s"
      elif "frames_per_s" in r:
        throughput = f"{r['frames_per_s']:.0f} frames/s"
      else:
        throughput = ""
      lines.append(f"| {name} | {r['compute_s'] * 1e3:.3f} | {bf16['compute_s'] * 1e3:.3f} | "
                   f"{r['memory_s'] * 1e3:.3f} | {r['launch_floor_s'] * 1e3:.3f} | "
                   f"{r['expected_s'] * 1e3:.3f} | {r['bound']} | {throughput} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=None, help="JSON report")
  parser.add_argument("--markdown", default=None, help="tables as Markdown")
  parser.add_argument("--dtype", default="float32", help="model.compute_dtype of the programs")
  parser.add_argument("--flop_eff", type=float, default=0.4,
                      help="assumed fraction of peak FLOP/s reached")
  parser.add_argument("--byte_eff", type=float, default=0.7,
                      help="assumed fraction of peak memory bandwidth reached")
  parser.add_argument("--quick", action="store_true",
                      help="VQ and pretrain train steps, batch-1 generation only")
  parser.add_argument("--reuse", default=None,
                      help="a report (--out) of the same dtype whose steps are kept, not "
                      "compiled again (e.g. to change --flop_eff, or after an interruption)")
  args = parser.parse_args()
  reuse = None
  if args.reuse and os.path.exists(args.reuse):
    with open(args.reuse, encoding="utf-8") as f:
      previous = json.load(f)
    if previous.get("compute_dtype") != args.dtype:
      raise SystemExit(f"--reuse {args.reuse}: compute_dtype {previous.get('compute_dtype')}, "
                       f"not {args.dtype}")
    reuse = previous["steps"]

  def save(steps):  # partial results survive an interruption
    if args.out:
      with open(args.out, "w", encoding="utf-8") as f:
        json.dump(dict(compute_dtype=args.dtype, steps=steps, partial=True), f, indent=2)

  report = run(args.quick, args.dtype, args.flop_eff, args.byte_eff,
               log=lambda s: print(s, file=sys.stderr, flush=True), reuse=reuse, save=save)
  text = json.dumps(report, indent=2)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  table = markdown(report)
  if args.markdown:
    with open(args.markdown, "w", encoding="utf-8") as f:
      f.write(table)
  print(table)


if __name__ == "__main__":
  main()
