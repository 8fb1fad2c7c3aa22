r"""Benchmarks (JSON): training-step throughput of dim_jax phases at official sizes.

  python tools/benchmark.py --out bench.json [--peer_python .peer-venv/bin/python]

Cases (official sizes, float32 and bfloat16 compute):
  `vq`        one VQ-VAE train step (batch 32 x 64 frames, AdamW, L1 + quant loss);
  `pretrain`  one DIM pretraining step (official SLM; batch 8 x 64 by default);
  `finetune`  one DIM-Listener fine-tuning step (official SLMFT; batch 8 x 64);
  `generate`  latency of generating one clip (batch 1 x 64): encode the speaker, sample 63
              tokens with the KV cache (temperature 1, top-k 10 %), VQ-decode (the peer's
              `gen` case times the same path, including its tokenisation).
  `metrics`   seconds to evaluate 1,000 clips x 300 frames (lengths 150..300) with
              dim_jax.evaluation.metrics: k-means fit, dim_compat and per_sequence metrics.
  `hubert`    seconds of audio per second of wall time of dim_jax.data.audio feature
              extraction at hubert-base size (random weights), 4 clips x 7.5 s per call
              (374 frames: the 375-frame bucket, little padding).
  `generate_weights`     the `generate` latency (one 64-frame clip) with the joint decoder's
              kernels held as float32, bfloat16 and int8 (`Generator(weights=...)`,
              dim_jax/models/quantize.py; float32 compute), with the speed against float32.
  `generate_throughput`  clips per second with N clips per generation call (`--clips`,
              default 1,8,32) for each of `--weights` (default float32,int8).
              These two cases time every setting in one child process, called in turn
              (order reversed every step), so the machine's load hits each alike: their
              ratios hold on a busy machine, where separate processes differed by 2x.
              `generate_throughput` also times the PyTorch peer's batched generation
              (../shared/peer, `--impl peer_batched`) at each N, ours and the peer's children
              alternating over `--rounds`, and reports `speed_vs_peer`; the peer runs under
              `--peer_python` (default: this python) and is skipped, with the reason in the
              JSON and on stderr, when ../shared/peer or torch / x-transformers is absent
              (`--peer_python none` skips it).
  `bf16_phases`  per phase (`--phases`: matmul, vq, pretrain, finetune_listener,
              finetune_speaker, generate), the float32 and the bfloat16 `model.compute_dtype`
              programs in one child, sharing one set of weights, called in turn; prints the
              table of bf16 speed-ups (float32 time / bfloat16 time) and whether the CPU has
              bf16 units (`avx512_bf16` / `amx_bf16` flags). `matmul` (2048^3) is the gain
              the CPU offers; each phase shows how much of it survives.
  `generate_iterative`  latency of one 64-frame clip with the parallel decoder decoded in K
              masked passes (`--iterations`, default 1,2,4,8; `sampler.iterative_decode`,
              cosine schedule) beside autoregressive decoding (the `generate` path), all in
              one child called in turn, and the PyTorch peer's `gen` (../shared/peer; skipped,
              with the reason, as for `generate_throughput`) in alternating rounds; reports
              seconds per clip, speed against autoregressive and the peer, and whether 150 ms
              is met.
  `streaming`  per-frame latency of `dim_jax.streaming.StreamingListener.push` (official-size
              causal-context DIM-Listener, random weights, batch 1, window `--frames`): for each
              of `--weights` (default float32,bfloat16,int8) and `--history` (VQ-decode
              tokens per frame, default: the window), `--steps` pushes (default here 1000)
              after 2 windows of warm-up; p50 / p99 / max ms per frame, of all pushes, of the
              window-switch pushes alone and of the pushes that also fill the next window
              (its overlap), and whether p50 and p99 <= 5 ms. `--fps F` issues each push at
              its frame's time (a live source at F frames/s; pushes behind their time are
              counted); `--context_lag 1` times the pipelined stream (a listener one frame
              late, whose push returns the frame computed between the pushes).
Every other measurement runs in its own child process
(warm-up, then timed steps; median/min/max). With `--peer_python` (a venv holding torch and
the packages of ../shared/peer/README.md) the PyTorch peer of the official architecture is
measured in the same run, interleaved, and the ratio is reported: compare ratios, not
absolute figures, on these noisy machines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEER_BENCH = os.path.join(ROOT, "..", "shared", "peer", "bench_peer.py")


def time_calls(call, warmup: int, steps: int) -> tuple[float, list[float]]:
  """(first call incl. compile, timed calls after `warmup`); `call(i)` must block on its result."""
  t0 = time.perf_counter()
  call(-1)
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    call(i)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return compile_s, times


def time_interleaved(call, settings: list, warmup: int, steps: int) -> tuple[dict, dict]:
  """`time_calls` for several settings in one process, called in turn (order reversed every
  other round, so drift in machine load hits each alike): ({setting: first call incl.
  compile}, {setting: timed calls after `warmup`}); `call(setting, i)` returns its seconds."""
  compile_s = {setting: call(setting, -1) for setting in settings}
  times = {setting: [] for setting in settings}
  for i in range(warmup + steps):
    for setting in settings if i % 2 == 0 else settings[::-1]:
      elapsed = call(setting, i)
      if i >= warmup:
        times[setting].append(elapsed)
  return compile_s, times


def train_step_calls(step_fn, state, batch):
  """A `time_calls` callable running `step_fn` on a carried (donated) state."""
  import jax  # pylint: disable=g-import-not-at-top
  box = [state]

  def call(_):
    box[0], metrics = step_fn(box[0], batch)
    jax.block_until_ready(metrics["loss"])
  return call


def metrics_child() -> dict:
  """Seconds of the listener metrics on 1,000 random clips (fixed seed), both protocols."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dim_jax.evaluation import metrics

  clips, frames = 1000, 300
  rng = np.random.default_rng(0)
  lengths = rng.integers(150, frames + 1, size=clips)

  def motion():  # Smooth random walks, float32 like decoded motion.
    return (np.cumsum(rng.normal(size=(clips, frames, 56)), axis=1) * 0.05).astype(np.float32)

  truth, prediction, speaker = motion(), motion(), motion()
  t0 = time.perf_counter()
  clusters = metrics.fit_clusters(truth, lengths)
  t1 = time.perf_counter()
  metrics.listener_metrics(truth, prediction, speaker, lengths, protocol="dim_compat",
                           clusters=clusters)
  t2 = time.perf_counter()
  metrics.listener_metrics(truth, prediction, speaker, lengths, protocol="per_sequence",
                           clusters=clusters)
  t3 = time.perf_counter()
  return dict(clips=clips, frames=frames, valid_frames=int(lengths.sum()), kmeans_fit_s=t1 - t0,
              kmeans_iterations={k: int(c.kmeans.n_iter_) for k, c in clusters.items()},
              dim_compat_s=t2 - t1, per_sequence_s=t3 - t2, total_s=t3 - t0)


def hubert_child() -> dict:
  """Audio seconds per wall second of HuBERT-base feature extraction (random weights)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from dim_jax.data import audio
  from dim_jax.models import hubert

  config = hubert.HubertConfig()  # facebook/hubert-base-ls960's architecture
  params = hubert.init_params(config, jax.random.PRNGKey(0))
  clips, seconds = 4, 7.5
  rng = np.random.default_rng(0)
  waves = [(0.1 * rng.normal(size=int(seconds * hubert.SAMPLE_RATE))).astype(np.float32)
           for _ in range(clips)]
  extractor = audio.AudioFeatureExtractor(config, params, batch_size=clips)
  compile_s, times = time_calls(lambda _: extractor(waves), warmup=1, steps=3)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  return dict(clips=clips, clip_seconds=seconds, n_params=n_params, compile_s=compile_s,
              times=times, audio_seconds_per_s=clips * seconds / statistics.median(times))


def child(case: str, batch: int, frames: int, dtype: str, warmup: int, steps: int,
          weights: str = "float32", clips: str = "1", fps: float = 0.0,
          context_lag: int = 0) -> dict:
  if case == "metrics":
    return metrics_child()
  if case in WEIGHTS_CASES:
    return weights_child(frames, dtype, warmup, steps, weights.split(","),
                         [int(n) for n in clips.split(",")])
  if case == "hubert":
    return hubert_child()
  if case == "streaming":
    return streaming_child(frames, steps, weights.split(","), clips, fps, context_lag)
  if case == "generate_iterative":
    return iterative_child(frames, dtype, warmup, steps, [int(k) for k in clips.split(",")])
  import functools  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from dim_jax import config_lib, sharding
  from dim_jax.training import trainer, vq

  if case in ("pretrain", "finetune", "generate"):
    return dim_child(case, batch, frames, dtype, warmup, steps, weights)
  if case != "vq":
    raise ValueError(f"unknown case {case!r}")
  config = config_lib.vq_config("speaker")
  config.model.compute_dtype = dtype
  task = vq.VQTask.from_config(config)
  optimizer = trainer.make_optimizer(config.train)
  mesh = sharding.make_mesh(config.mesh)
  rng = np.random.default_rng(1)
  local = dict(speaker_motion=rng.normal(size=(batch, frames, 56)).astype(np.float32),
               mask=np.ones((batch, frames), bool))
  batch_arrays = sharding.to_global_batch(local, mesh)
  params = task.init_params(jax.random.PRNGKey(0), batch_arrays)
  state = dict(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
               opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1))
  step_fn = jax.jit(functools.partial(trainer.train_step, task=task, optimizer=optimizer),
                    donate_argnums=0)
  compile_s, times = time_calls(train_step_calls(step_fn, state, batch_arrays), warmup, steps)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  return dict(times=times, compile_s=compile_s, n_params=n_params)


def random_params(abstract, seed: int = 0):
  """Params of the init shapes without compiling init: matrices U(+-1/sqrt(fan_in)) (torch
  Linear), norm scales 1, vectors 0."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  rng = np.random.default_rng(seed)

  def leaf(path, shape_dtype):
    shape = shape_dtype.shape
    if len(shape) >= 2:
      bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
      return jax.numpy.asarray(rng.uniform(-bound, bound, shape).astype(np.float32))
    name = str(getattr(path[-1], "key", path[-1]))
    return jax.numpy.full(shape, 1.0 if name == "scale" else 0.0, np.float32)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def official_dim_task(phase: str, dtype: str):
  """The DIM task of `phase` at the official sizes, both tokenizers official too."""
  from dim_jax import config_lib  # pylint: disable=g-import-not-at-top
  from dim_jax.models import vqvae  # pylint: disable=g-import-not-at-top
  from dim_jax.training import dim_tasks  # pylint: disable=g-import-not-at-top
  config = config_lib.dim_config(phase)
  config.model.compute_dtype = dtype
  vq_model = config_lib.vq_model_config()
  vq_model.compute_dtype = dtype
  vq_cfg = vqvae.vq_config_from(vq_model)
  return dim_tasks.DIMTask.from_config(config, speaker_vq=vq_cfg, listener_vq=vq_cfg)


def dim_child(case: str, batch: int, frames: int, dtype: str, warmup: int, steps: int,
              weights: str = "float32") -> dict:
  """Train step of pretrain / finetune_listener, or generation latency, at official sizes."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from dim_jax import config_lib, generate, sampler
  from dim_jax.models import quantize
  from dim_jax.training import trainer

  phase = {"pretrain": "pretrain", "finetune": "finetune_listener",
           "generate": "finetune_listener"}[case]
  task = official_dim_task(phase, dtype)
  rng = np.random.default_rng(1)
  local = dict(speaker_motion=rng.normal(size=(batch, frames, 56)).astype(np.float32),
               listener_motion=rng.normal(size=(batch, frames, 56)).astype(np.float32),
               speaker_audio=rng.normal(size=(batch, frames, 768)).astype(np.float32),
               mask=np.ones((batch, frames), bool))
  if case == "generate":  # values do not change the timing; compiling init costs ~45 s here.
    params = random_params(jax.eval_shape(task.init_params, jax.random.PRNGKey(0), local))
  else:
    params = jax.jit(task.init_params)(jax.random.PRNGKey(0), local)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  if case == "generate":
    # One window of `frames` (the training window): no sliding-window seams in the timing.
    gen = generate.Generator(task=task, params=params, sampling=sampler.SamplingConfig(),
                             window=frames, weights=weights)
    compile_s, times = time_calls(
        lambda i: jax.block_until_ready(gen(local, jax.random.PRNGKey(i + 1))["motion"]),
        warmup, steps)
    return dict(times=times, compile_s=compile_s, n_params=n_params,
                param_bytes=quantize.tree_bytes(gen.params),
                decoder_bytes=quantize.tree_bytes(gen.params["dim"]["joint_decoder"]))
  trainable = task.trainable_mask(params)
  optimizer = trainer.make_optimizer(config_lib.dim_config(phase).train, trainable)
  state = dict(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
               opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1))
  step_fn = jax.jit(functools.partial(trainer.train_step, task=task, optimizer=optimizer,
                                      trainable=trainable), donate_argnums=0)
  compile_s, times = time_calls(train_step_calls(step_fn, state, local), warmup, steps)
  return dict(times=times, compile_s=compile_s, n_params=n_params)


def weights_child(frames: int, dtype: str, warmup: int, steps: int, weights: list[str],
                  clip_counts: list[int]) -> dict:
  """Generation of N clips per call (official size, one window of `frames`) with the decoder
  kernels held as each of `weights`: every (N, weights) setting compiled, then called in turn,
  the order reversed every step."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from dim_jax import generate, sampler
  from dim_jax.models import quantize

  task = official_dim_task("finetune_listener", dtype)
  rng = np.random.default_rng(1)
  batches = {n: dict(speaker_motion=rng.normal(size=(n, frames, 56)).astype(np.float32),
                     listener_motion=rng.normal(size=(n, frames, 56)).astype(np.float32),
                     speaker_audio=rng.normal(size=(n, frames, 768)).astype(np.float32),
                     mask=np.ones((n, frames), bool)) for n in clip_counts}
  params = random_params(jax.eval_shape(task.init_params, jax.random.PRNGKey(0),
                                        batches[clip_counts[0]]))
  generators = {w: generate.Generator(task=task, params=params, window=frames, weights=w,
                                      sampling=sampler.SamplingConfig()) for w in weights}
  settings = [(n, w) for n in clip_counts for w in weights]

  def call(setting, i):
    n, w = setting
    t0 = time.perf_counter()
    jax.block_until_ready(generators[w](batches[n], jax.random.PRNGKey(i + 1))["motion"])
    return time.perf_counter() - t0

  compile_s, times = time_interleaved(call, settings, warmup, steps)
  out = {}
  for n, w in settings:
    held = generators[w].params
    out[f"{w}_clips{n}"] = dict(
        clips=n, weights=w, times=times[(n, w)], compile_s=compile_s[(n, w)],
        param_mb=quantize.tree_bytes(held) / 1e6,
        decoder_mb=quantize.tree_bytes(held["dim"]["joint_decoder"]) / 1e6)
  return out


BF16_PHASES = ("matmul", "vq", "pretrain", "finetune_listener", "finetune_speaker", "generate")


def cpu_bf16_units() -> dict:
  """The CPU's bfloat16 instructions as /proc/cpuinfo lists them (Linux; empty elsewhere)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      lines = f.read().splitlines()
  except OSError:
    lines = []
  first = lambda key: next((l.split(":", 1)[1] for l in lines if l.startswith(key)), "")
  flags, model = first("flags").split(), first("model name").strip()
  return dict(model=model, avx512_bf16="avx512_bf16" in flags, amx_bf16="amx_bf16" in flags,
              avx512f="avx512f" in flags)


def bf16_child(phase: str, frames: int, warmup: int, steps: int) -> dict:
  """float32 against bfloat16 `model.compute_dtype` for one phase, in one process: both
  programs share one set of weights (random, official shapes), are compiled, then called in
  turn (order reversed every step). `matmul` is a 2048^3 product, float32 against bfloat16
  operands with float32 accumulation: the gain the CPU offers before any model overhead."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  from dim_jax import config_lib, generate, sampler
  from dim_jax.training import trainer, vq

  dtypes = ("float32", "bfloat16")
  rng = np.random.default_rng(1)
  calls, info = {}, {}
  if phase == "matmul":
    n = 2048
    a, b = (jnp.asarray(rng.normal(size=(n, n)), jnp.float32) for _ in range(2))
    f32 = jax.jit(jnp.matmul)
    bf16 = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)  # cast outside the timing
    calls = dict(float32=lambda _: f32(a, b).block_until_ready(),
                 bfloat16=lambda _: bf16(a16, b16).block_until_ready())
    info["flops"] = 2 * n**3
  else:
    batch = {"vq": 32, "generate": 1}.get(phase, 8)
    local = dict(speaker_motion=rng.normal(size=(batch, frames, 56)).astype(np.float32),
                 listener_motion=rng.normal(size=(batch, frames, 56)).astype(np.float32),
                 speaker_audio=rng.normal(size=(batch, frames, 768)).astype(np.float32),
                 mask=np.ones((batch, frames), bool))
    tasks = {}
    for dtype in dtypes:
      if phase == "vq":
        config = config_lib.vq_config("speaker")
        config.model.compute_dtype = dtype
        tasks[dtype] = (vq.VQTask.from_config(config), config.train)
      else:
        dim_phase = "finetune_listener" if phase == "generate" else phase
        tasks[dtype] = (official_dim_task(dim_phase, dtype),
                        config_lib.dim_config(dim_phase).train)
    task, train_config = tasks["float32"]
    # compute_dtype changes no parameter: one float32 tree serves both programs.
    params = random_params(jax.eval_shape(task.init_params, jax.random.PRNGKey(0), local))
    info.update(batch=batch, frames=frames)
    if phase == "generate":
      for dtype in dtypes:
        gen = generate.Generator(task=tasks[dtype][0], params=params, window=frames,
                                 sampling=sampler.SamplingConfig())
        calls[dtype] = functools.partial(
            lambda g, i: jax.block_until_ready(g(local, jax.random.PRNGKey(i + 1))["motion"]),
            gen)
    else:
      trainable = task.trainable_mask(params)
      optimizer = trainer.make_optimizer(train_config, trainable)
      # Not donated: both programs step from the same state (the timing does not depend on
      # the values), so one state is held instead of two.
      state = dict(step=jnp.zeros((), jnp.int32), params=params,
                   opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1))
      for dtype in dtypes:
        step_fn = jax.jit(functools.partial(trainer.train_step, task=tasks[dtype][0],
                                            optimizer=optimizer, trainable=trainable))
        calls[dtype] = functools.partial(
            lambda f, _: jax.block_until_ready(f(state, local)[1]["loss"]), step_fn)

  def timed(dtype, i):
    t0 = time.perf_counter()
    calls[dtype](i)
    return time.perf_counter() - t0

  compile_s, times = time_interleaved(timed, list(dtypes), warmup, steps)
  return dict(info, times=times, compile_s=compile_s)


def bf16_report(args) -> dict:
  """`bf16_phases`: per phase, float32 and bfloat16 seconds and the bf16 speed-up."""
  phases = [p for p in args.phases.split(",") if p]
  unknown = sorted(set(phases) - set(BF16_PHASES))
  if unknown:
    raise SystemExit(f"--phases: unknown {unknown}; expected some of {BF16_PHASES}")
  results, errors = {}, {}
  for phase in phases:
    out = run_child(["--child", "--case", "bf16_phases", "--phases", phase, "--frames",
                     str(args.frames), "--warmup", str(args.warmup), "--steps",
                     str(args.steps)], sys.executable, os.path.abspath(__file__))
    if "error" in out:
      errors[phase] = out["error"]
      continue
    row = {dtype: dict(median_s=statistics.median(t), min_s=min(t), max_s=max(t), n=len(t),
                       compile_s=out["compile_s"][dtype]) for dtype, t in out["times"].items()}
    row["bf16_speedup"] = row["float32"]["median_s"] / row["bfloat16"]["median_s"]
    if "flops" in out:
      for dtype in ("float32", "bfloat16"):
        row[dtype]["gflops_per_s"] = out["flops"] / row[dtype]["median_s"] / 1e9
    results[phase] = row
  units = cpu_bf16_units()
  table = ["| phase | float32 s | bfloat16 s | bf16 speed-up (f32 time / bf16 time) |",
           "|---|---|---|---|"]
  for phase, row in results.items():
    table.append(f"| {phase} | {row['float32']['median_s']:.3f} | "
                 f"{row['bfloat16']['median_s']:.3f} | {row['bf16_speedup']:.2f} |")
  verdict = ("this CPU has AVX-512 BF16" + (" and AMX" if units["amx_bf16"] else "")
             if units["avx512_bf16"] or units["amx_bf16"] else
             "this CPU has no bf16 units (no avx512_bf16 / amx_bf16 in its flags): XLA:CPU "
             "widens bf16 matmul operands to float32, so no gain is expected")
  return dict(case="bf16_phases", frames=args.frames, cpu=units, verdict=verdict,
              results=results, errors=errors, table=table,
              machine=dict(cpus=os.cpu_count(), load=os.getloadavg()))


def iterative_child(frames: int, dtype: str, warmup: int, steps: int,
                    iterations: list[int]) -> dict:
  """One clip of `frames` (one window), official size, random weights: autoregressive and
  the parallel decoder with K passes for each K of `iterations`, called in turn (order
  reversed every step)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from dim_jax import config_lib, generate, sampler
  from dim_jax.models import vqvae
  from dim_jax.training import dim_tasks

  rng = np.random.default_rng(1)
  batch = dict(speaker_motion=rng.normal(size=(1, frames, 56)).astype(np.float32),
               listener_motion=rng.normal(size=(1, frames, 56)).astype(np.float32),
               speaker_audio=rng.normal(size=(1, frames, 768)).astype(np.float32),
               mask=np.ones((1, frames), bool))
  generators = {}
  autoregressive = official_dim_task("finetune_listener", dtype)
  config = config_lib.dim_config("finetune_listener")
  config.model.update(decoding="parallel", decoder_positions=True, compute_dtype=dtype)
  config.loss.parallel_mask_schedule = "cosine"
  vq_model = config_lib.vq_model_config()
  vq_model.compute_dtype = dtype
  vq_cfg = vqvae.vq_config_from(vq_model)
  parallel = dim_tasks.DIMTask.from_config(config, speaker_vq=vq_cfg, listener_vq=vq_cfg)
  for name, task in (("autoregressive", autoregressive), ("parallel", parallel)):
    params = random_params(jax.eval_shape(task.init_params, jax.random.PRNGKey(0), batch))
    for k in ([None] if name == "autoregressive" else iterations):
      generators[name if k is None else f"parallel_k{k}"] = generate.Generator(
          task=task, params=params, window=frames, sampling=sampler.SamplingConfig(),
          iterative=sampler.IterativeConfig(iterations=k or 1))
  settings = list(generators)

  def call(name, i):
    t0 = time.perf_counter()
    jax.block_until_ready(generators[name](batch, jax.random.PRNGKey(i + 1))["motion"])
    return time.perf_counter() - t0

  compile_s, times = time_interleaved(call, settings, warmup, steps)
  return {name: dict(times=times[name], compile_s=compile_s[name]) for name in settings}


def iterative_report(args) -> dict:
  """`generate_iterative`: ours (one child per round) and the peer's `gen` (b=1) alternating
  over `--rounds`, timed calls pooled."""
  peer_python, skipped = peer_python_for(args)
  ours, peer, errors = {}, [], {}
  for round_index in range(max(1, args.rounds)):
    parts = ["ours", "peer"] if peer_python else ["ours"]
    for part in parts if round_index % 2 == 0 else parts[::-1]:
      if part == "peer":
        out = run_child(["--child", "--case", "gen", "--impl", "peer", "--b", "1", "--t",
                         str(args.frames), "--warmup", str(args.warmup), "--steps",
                         str(args.steps), "--mm-checks", "0"], peer_python, PEER_BENCH)
        if "error" in out:
          errors["peer"] = out["error"]
        else:
          peer.extend(out["times"])
        continue
      out = run_child(["--child", "--case", args.case, "--frames", str(args.frames), "--dtype",
                       args.dtype, "--clips", args.iterations, "--warmup", str(args.warmup),
                       "--steps", str(args.steps)], sys.executable, os.path.abspath(__file__))
      if "error" in out:
        errors["ours"] = out["error"]
        continue
      for name, run in out.items():
        ours.setdefault(name, dict(times=[], compile_s=[]))
        ours[name]["times"].extend(run["times"])
        ours[name]["compile_s"].append(run["compile_s"])
  results = {}
  reference = statistics.median(ours["autoregressive"]["times"]) if "autoregressive" in ours else None
  for name, run in ours.items():
    row = dict(stats(run["times"], args.frames), compile_s=max(run["compile_s"]))
    row.update(seconds_per_clip=row["median_s"], meets_150ms=row["median_s"] <= 0.150)
    if reference:
      row["speed_vs_autoregressive"] = reference / row["median_s"]
    if peer:
      row["speed_vs_peer"] = statistics.median(peer) / row["median_s"]
    results[name] = row
  if peer:
    results["peer_torch"] = dict(stats(peer, args.frames), seconds_per_clip=statistics.median(peer))
  return dict(case=args.case, frames=args.frames, compute_dtype=args.dtype, results=results,
              errors=errors, peer_skipped=skipped, machine=dict(cpus=os.cpu_count()))


PEER_CASES = {"vq": "vq", "pretrain": "slm", "finetune": "slmft", "generate": "gen"}
WEIGHTS_CASES = ("generate_weights", "generate_throughput")


def run_child(args_list: list[str], python: str, script: str) -> dict:
  env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([python, script, *args_list], capture_output=True, text=True, env=env,
                        cwd=ROOT)
  if proc.returncode != 0:
    return dict(error=proc.stderr.strip().splitlines()[-3:])
  return json.loads(proc.stdout.strip().splitlines()[-1])


def stats(times: list[float], frames_per_step: int) -> dict:
  med = statistics.median(times)
  return dict(median_s=med, min_s=min(times), max_s=max(times),
              frames_per_s=frames_per_step / med, n=len(times))


def weights_report(args) -> dict:
  """`generate_weights` / `generate_throughput` (one child, `weights_child`): seconds per
  clip, clips per second and speed against float32 at the same clips per call.

  `generate_throughput` also times the PyTorch peer's batched generation at each clip count
  (`peer_throughput`) when it can run: then `--rounds` rounds of ours and the peer's children,
  the order reversed every round, timed calls pooled, and `speed_vs_peer` = our clips/s over
  the peer's at the same clips per call."""
  clips = args.clips if args.case == "generate_throughput" else "1"
  counts = [int(n) for n in clips.split(",")]
  peer_python, skipped = None, None
  if args.case == "generate_throughput":
    peer_python, skipped = peer_python_for(args)
  parts = ("ours", "peer") if peer_python else ("ours",)
  ours, peer, errors, peer_errors = {}, {}, [], {}
  for round_index in range(max(1, args.rounds) if peer_python else 1):
    for part in parts if round_index % 2 == 0 else parts[::-1]:  # drift hits both alike
      if part == "peer":
        for n, out in peer_throughput(args, peer_python, counts).items():
          if "error" in out:
            peer_errors[f"clips{n}"] = out["error"]
          else:
            peer.setdefault(n, []).extend(out["times"])
        continue
      out = run_child(["--child", "--case", args.case, "--frames", str(args.frames), "--dtype",
                       args.dtype, "--weights", args.weights, "--clips", clips, "--warmup",
                       str(args.warmup), "--steps", str(args.steps)], sys.executable,
                      os.path.abspath(__file__))
      if "error" in out:
        errors = out["error"]
        continue
      for name, run in out.items():
        if name in ours:
          ours[name]["times"] = ours[name]["times"] + run["times"]
        else:
          ours[name] = dict(run)
  results = {}
  for name, run in ours.items():
    row = dict(stats(run["times"], run["clips"] * args.frames),
               **{k: v for k, v in run.items() if k != "times"})
    row.update(seconds_per_clip=row["median_s"] / run["clips"],
               clips_per_s=run["clips"] / row["median_s"])
    reference = ours.get(f"float32_clips{run['clips']}")
    if reference:
      row["speed_vs_float32"] = statistics.median(reference["times"]) / row["median_s"]
    if run["clips"] in peer:
      row["speed_vs_peer"] = statistics.median(peer[run["clips"]]) / row["median_s"]
    results[name] = row
  report = dict(case=args.case, frames=args.frames, compute_dtype=args.dtype, results=results,
                errors=errors, machine=dict(cpus=os.cpu_count()))
  if args.case == "generate_throughput":
    report["peer"] = {}
    for n, times in peer.items():
      row = stats(times, n * args.frames)
      row.update(clips=n, seconds_per_clip=row["median_s"] / n, clips_per_s=n / row["median_s"])
      report["peer"][f"peer_batched_clips{n}"] = row
    report.update(peer_errors=peer_errors, peer_skipped=skipped)
  return report


def peer_available(python: str) -> str:
  """'' when the PyTorch peer can run under `python`, else why not (a sentence)."""
  if not os.path.exists(PEER_BENCH):
    return f"the PyTorch peer is absent ({os.path.normpath(PEER_BENCH)} not found)"
  try:
    probe = subprocess.run([python, "-c", "import torch, x_transformers, einops"],
                           capture_output=True, text=True, check=False)
  except OSError as error:  # no such interpreter
    return f"{python} cannot run the PyTorch peer ({error})"
  if probe.returncode != 0:
    last = (probe.stderr.strip().splitlines() or ["?"])[-1]
    return f"{python} cannot run the PyTorch peer ({last})"
  return ""


def peer_python_for(args) -> tuple:
  """(python that runs the peer or None, why it is skipped or None); says so on stderr."""
  if args.peer_python == "none":
    return None, "--peer_python none"
  python = args.peer_python or sys.executable  # the project venv holds torch when installed
  missing = peer_available(python)
  if missing:
    print(f"{args.case}: PyTorch peer skipped: {missing}", file=sys.stderr)
    return None, missing
  return python, None


def peer_throughput(args, python: str, counts: list) -> dict:
  """{clips: child output} of the peer's batched generation (`bench_peer.py --case gen
  --impl peer_batched`: vectorised tokenisation, same outputs), one child per clip count."""
  return {n: run_child(["--child", "--case", "gen", "--impl", "peer_batched", "--b", str(n),
                        "--t", str(args.frames), "--warmup", str(args.warmup), "--steps",
                        str(args.steps), "--mm-checks", "0"], python, PEER_BENCH)
          for n in counts}


def streaming_child(frames: int, pushes: int, weights: list[str], histories: str,
                    fps: float = 0.0, context_lag: int = 0) -> dict:
  """Per-frame `push` latency of an official-size causal-context DIM-Listener: back to back
  (fps 0), or each push issued at its frame's time at `fps` (a live source), where a
  pipelined stream (context_lag >= 1) computes the next frame between pushes."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from dim_jax import config_lib, generate, sampler, streaming
  from dim_jax.models import quantize, vqvae
  from dim_jax.training import dim_tasks

  config = config_lib.dim_config("finetune_listener")
  config.model.causal_context = True  # what a live stream needs; the sizes are official
  config.model.context_lag = context_lag
  vq_cfg = vqvae.vq_config_from(config_lib.vq_model_config())
  task = dim_tasks.DIMTask.from_config(config, speaker_vq=vq_cfg, listener_vq=vq_cfg)
  params = random_params(jax.eval_shape(task.init_params, jax.random.PRNGKey(0),
                                        pipeline_dummy(frames)))
  rng = np.random.default_rng(1)
  warm = 2 * frames
  speaker = rng.normal(size=(warm + pushes, 56)).astype(np.float32)
  audio = rng.normal(size=(warm + pushes, 768)).astype(np.float32)
  out = {}
  for w in weights:
    gen = generate.Generator(task=task, params=params, window=frames, weights=w,
                             sampling=sampler.SamplingConfig())
    for history in [int(h) for h in histories.split(",")] if histories else [frames]:
      listener = streaming.StreamingListener(gen, jax.random.PRNGKey(0), history=history)
      listener.reset(first_frame=speaker[0])
      times, switches, fills, behind = [], [], [], 0
      paced_start = 0.0  # set after the warm-up
      t_compile = time.perf_counter()
      for t in range(warm + pushes):
        if fps and t >= warm:  # frame t is due at its time; a late push goes at once
          due = paced_start + (t - warm) / fps
          wait = due - time.perf_counter()
          if wait > 0:
            time.sleep(wait)
          else:
            behind += 1
        t0 = time.perf_counter()
        listener.push(speaker[t], audio[t])  # returns a host array: blocks on the frame
        elapsed = time.perf_counter() - t0
        if t >= warm:
          times.append(elapsed)
          _, _, promote, pair = streaming._push_kind(t, gen.window, gen.overlap)  # pylint: disable=protected-access
          if promote:
            switches.append(elapsed)
          if pair:
            fills.append(elapsed)
        elif t == warm - 1:
          warm_s = time.perf_counter() - t_compile
          paced_start = time.perf_counter() + 0.1
      ms = np.asarray(times) * 1e3
      switch_ms, fill_ms = np.asarray(switches) * 1e3, np.asarray(fills) * 1e3
      out[f"{w}_history{history}"] = dict(
          weights=w, history=history, window=gen.window, overlap=gen.overlap, pushes=pushes,
          fps=fps, context_lag=context_lag, pipelined=listener.pipelined,
          pushes_behind_their_frame_time=behind if fps else None,
          warmup_s_incl_compile=warm_s, p50_ms=float(np.percentile(ms, 50)),
          p99_ms=float(np.percentile(ms, 99)), max_ms=float(ms.max()),
          mean_ms=float(ms.mean()), switches=len(switches),
          switch_p50_ms=float(np.percentile(switch_ms, 50)) if len(switches) else None,
          switch_p99_ms=float(np.percentile(switch_ms, 99)) if len(switches) else None,
          fills=len(fills), fill_p50_ms=float(np.percentile(fill_ms, 50)) if len(fills) else None,
          meets_5ms=bool(np.percentile(ms, 50) <= 5 and np.percentile(ms, 99) <= 5),
          decoder_mb=quantize.tree_bytes(gen.params["dim"]["joint_decoder"]) / 1e6)
  return out


def pipeline_dummy(frames: int) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  return dict(speaker_motion=np.zeros((1, frames, 56), np.float32),
              listener_motion=np.zeros((1, frames, 56), np.float32),
              speaker_audio=np.zeros((1, frames, 768), np.float32),
              mask=np.ones((1, frames), bool))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--case", default="vq")
  parser.add_argument("--batch", type=int, default=None,
                      help="default: 32 for vq, 8 for pretrain/finetune, 1 for generate")
  parser.add_argument("--frames", type=int, default=64)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--weights", default=None,
                      help="generate: decoder kernels float32|bfloat16|int8; the weights cases: "
                      "a comma list (default float32,bfloat16,int8 / float32,int8)")
  parser.add_argument("--clips", default="1,8,32",
                      help="generate_throughput: clips per generation call, a comma list")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--iterations", default="1,2,4,8",
                      help="generate_iterative: decoder passes K of the parallel decoder, a "
                      "comma list")
  parser.add_argument("--peer_python", default=None,
                      help="python of the PyTorch peer (../shared/peer); generate_throughput "
                      "tries this python when unset, 'none' skips the peer")
  parser.add_argument("--phases", default=",".join(BF16_PHASES),
                      help="bf16_phases: a comma list of " + ",".join(BF16_PHASES))
  parser.add_argument("--history", default="",
                      help="streaming: VQ-decode tokens per frame, a comma list (default: the "
                      "window)")
  parser.add_argument("--fps", type=float, default=0.0,
                      help="streaming: issue each push at its frame time at this rate (a live "
                      "source); 0 = back to back")
  parser.add_argument("--context_lag", type=int, default=0,
                      help="streaming: model.context_lag of the official-size model (>= 1: "
                      "the pipelined stream)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  if args.child and args.batch is None:
    args.batch = {"vq": 32, "generate": 1}.get(args.case, 8)
  if args.child and args.case == "bf16_phases":
    print(json.dumps(bf16_child(args.phases, args.frames, args.warmup, args.steps)))
    return
  if args.child:
    print(json.dumps(child(args.case, args.batch, args.frames, args.dtype, args.warmup,
                           args.steps, args.weights or "float32", args.clips, args.fps,
                           args.context_lag)))
    return
  if args.case == "bf16_phases":
    report = bf16_report(args)
    text = json.dumps(report, indent=2)
    print(text)
    print(report["verdict"] + "\n" + "\n".join(report["table"]), file=sys.stderr)
    if args.out:
      with open(args.out, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return
  if args.case in WEIGHTS_CASES:
    if args.weights is None:
      args.weights = ("float32,bfloat16,int8" if args.case == "generate_weights"
                      else "float32,int8")
    text = json.dumps(weights_report(args), indent=2)
    print(text)
    if args.out:
      with open(args.out, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return
  if args.case == "generate_iterative":
    text = json.dumps(iterative_report(args), indent=2)
    print(text)
    if args.out:
      with open(args.out, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return
  if args.case == "streaming":  # One child: every weights setting, in turn.
    weights = args.weights or "float32,bfloat16,int8"
    steps = args.steps if args.steps != 5 else 1000  # 5 is the other cases' default
    results = run_child(["--child", "--case", "streaming", "--frames", str(args.frames),
                         "--steps", str(steps), "--weights", weights, "--clips", args.history,
                         "--fps", str(args.fps), "--context_lag", str(args.context_lag)],
                        sys.executable, os.path.abspath(__file__))
    text = json.dumps(dict(case=args.case, machine=dict(cpus=os.cpu_count()),
                           target_ms=5.0, results=results), indent=2)
    print(text)
    if args.out:
      with open(args.out, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return
  if args.case in ("metrics", "hubert"):  # One run, no dtypes or peer.
    text = json.dumps(dict(case=args.case, machine=dict(cpus=os.cpu_count()), results=run_child(
        ["--child", "--case", args.case], sys.executable, os.path.abspath(__file__))), indent=2)
    print(text)
    if args.out:
      with open(args.out, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return
  if args.batch is None:
    args.batch = {"vq": 32, "generate": 1}.get(args.case, 8)
  frames_per_step = args.batch * args.frames
  impls = [("dim_jax_float32", "float32"), ("dim_jax_bfloat16", "bfloat16")]
  if args.peer_python:
    impls.append(("peer_torch", None))
  pooled = {name: [] for name, _ in impls}
  errors = {}
  for round_index in range(args.rounds):
    order = impls if round_index % 2 == 0 else impls[::-1]  # drift hits every impl alike.
    for name, dtype in order:
      if dtype is None:
        out = run_child(["--child", "--case", PEER_CASES[args.case], "--impl", "peer", "--b", str(args.batch),
                         "--t", str(args.frames), "--warmup", str(args.warmup), "--steps",
                         str(args.steps), "--mm-checks", "0"], args.peer_python, PEER_BENCH)
      else:
        out = run_child(["--child", "--case", args.case, "--batch", str(args.batch), "--frames",
                         str(args.frames), "--dtype", dtype, "--warmup", str(args.warmup),
                         "--steps", str(args.steps)], sys.executable, os.path.abspath(__file__))
      if "error" in out:
        errors[name] = out["error"]
      else:
        pooled[name].extend(out["times"])
  results = {name: stats(t, frames_per_step) for name, t in pooled.items() if t}
  report = dict(case=args.case, batch=args.batch, frames=args.frames, results=results,
                errors=errors, machine=dict(cpus=os.cpu_count()))
  if "peer_torch" in results:
    for name in ("dim_jax_float32", "dim_jax_bfloat16"):
      if name in results:
        report[f"ratio_{name}_vs_peer"] = (results[name]["frames_per_s"]
                                           / results["peer_torch"]["frames_per_s"])
  text = json.dumps(report, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
