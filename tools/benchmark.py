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
Each measurement runs in its own child process
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


def child(case: str, batch: int, frames: int, dtype: str, warmup: int, steps: int) -> dict:
  if case == "metrics":
    return metrics_child()
  if case == "hubert":
    return hubert_child()
  import functools  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from dim_jax import config_lib, sharding
  from dim_jax.training import trainer, vq

  if case in ("pretrain", "finetune", "generate"):
    return dim_child(case, batch, frames, dtype, warmup, steps)
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


def dim_child(case: str, batch: int, frames: int, dtype: str, warmup: int, steps: int) -> dict:
  """Train step of pretrain / finetune_listener, or generation latency, at official sizes."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from dim_jax import config_lib, generate, sampler
  from dim_jax.models import vqvae
  from dim_jax.training import dim_tasks, trainer

  phase = {"pretrain": "pretrain", "finetune": "finetune_listener",
           "generate": "finetune_listener"}[case]
  config = config_lib.dim_config(phase)
  config.model.compute_dtype = dtype
  vq_model = config_lib.vq_model_config()
  vq_model.compute_dtype = dtype
  vq_cfg = vqvae.vq_config_from(vq_model)
  task = dim_tasks.DIMTask.from_config(config, speaker_vq=vq_cfg, listener_vq=vq_cfg)
  rng = np.random.default_rng(1)
  local = dict(speaker_motion=rng.normal(size=(batch, frames, 56)).astype(np.float32),
               listener_motion=rng.normal(size=(batch, frames, 56)).astype(np.float32),
               speaker_audio=rng.normal(size=(batch, frames, 768)).astype(np.float32),
               mask=np.ones((batch, frames), bool))
  params = jax.jit(task.init_params)(jax.random.PRNGKey(0), local)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  if case == "generate":
    gen = generate.Generator(task=task, params=params, sampling=sampler.SamplingConfig())
    compile_s, times = time_calls(
        lambda i: jax.block_until_ready(gen(local, jax.random.PRNGKey(i + 1))["motion"]),
        warmup, steps)
    return dict(times=times, compile_s=compile_s, n_params=n_params)
  trainable = task.trainable_mask(params)
  optimizer = trainer.make_optimizer(config.train, trainable)
  state = dict(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
               opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1))
  step_fn = jax.jit(functools.partial(trainer.train_step, task=task, optimizer=optimizer,
                                      trainable=trainable), donate_argnums=0)
  compile_s, times = time_calls(train_step_calls(step_fn, state, local), warmup, steps)
  return dict(times=times, compile_s=compile_s, n_params=n_params)


PEER_CASES = {"vq": "vq", "pretrain": "slm", "finetune": "slmft", "generate": "gen"}


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


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--case", default="vq")
  parser.add_argument("--batch", type=int, default=None,
                      help="default: 32 for vq, 8 for pretrain/finetune, 1 for generate")
  parser.add_argument("--frames", type=int, default=64)
  parser.add_argument("--dtype", default="float32")
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
                           args.steps)))
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
