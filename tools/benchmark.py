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
          weights: str = "float32", clips: str = "1") -> dict:
  if case == "metrics":
    return metrics_child()
  if case in WEIGHTS_CASES:
    return weights_child(frames, dtype, warmup, steps, weights.split(","),
                         [int(n) for n in clips.split(",")])
  if case == "hubert":
    return hubert_child()
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
  from dim_jax import generate, sampler
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
  optimizer = trainer.make_optimizer(config.train, trainable)
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

  compile_s = {setting: call(setting, -1) for setting in settings}
  times = {setting: [] for setting in settings}
  for i in range(warmup + steps):
    for setting in settings if i % 2 == 0 else settings[::-1]:
      elapsed = call(setting, i)
      if i >= warmup:
        times[setting].append(elapsed)
  out = {}
  for n, w in settings:
    held = generators[w].params
    out[f"{w}_clips{n}"] = dict(
        clips=n, weights=w, times=times[(n, w)], compile_s=compile_s[(n, w)],
        param_mb=quantize.tree_bytes(held) / 1e6,
        decoder_mb=quantize.tree_bytes(held["dim"]["joint_decoder"]) / 1e6)
  return out


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
  clip, clips per second and speed against float32 at the same clips per call."""
  clips = args.clips if args.case == "generate_throughput" else "1"
  out = run_child(["--child", "--case", args.case, "--frames", str(args.frames), "--dtype",
                   args.dtype, "--weights", args.weights, "--clips", clips, "--warmup",
                   str(args.warmup), "--steps", str(args.steps)], sys.executable,
                  os.path.abspath(__file__))
  results = {}
  for name, run in ({} if "error" in out else out).items():
    row = dict(stats(run["times"], run["clips"] * args.frames),
               **{k: v for k, v in run.items() if k != "times"})
    row.update(seconds_per_clip=row["median_s"] / run["clips"],
               clips_per_s=run["clips"] / row["median_s"])
    reference = out.get(f"float32_clips{run['clips']}")
    if reference:
      row["speed_vs_float32"] = statistics.median(reference["times"]) / row["median_s"]
    results[name] = row
  return dict(case=args.case, frames=args.frames, compute_dtype=args.dtype, results=results,
              errors=out.get("error", []), machine=dict(cpus=os.cpu_count()))


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
  parser.add_argument("--peer_python", default=None)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  if args.child and args.batch is None:
    args.batch = {"vq": 32, "generate": 1}.get(args.case, 8)
  if args.child:
    print(json.dumps(child(args.case, args.batch, args.frames, args.dtype, args.warmup,
                           args.steps, args.weights or "float32", args.clips)))
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
