"""Two simulated hosts (two local processes, gloo collectives) train, agree on preemption,
checkpoint and resume."""

import os
import socket
import subprocess
import sys

import pytest

from dim_jax.data import synthetic
from dim_jax.training import metric_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


SIGNAL_HELPER = os.path.join(ROOT, "tests", "helpers", "signal_at_step.py")


def _launch(workdir, data_dir, num_steps, signal_steps=None):
  """Two processes; `signal_steps[i]`: process i gets SIGTERM after that step.

  Training batch 2 (one row per host) as in tests/test_slurm.py's two SLURM tasks: the files
  share a worker (tests/conftest.py), so the training programs of their common shape (the
  128-frame bucket) compile once and the later run loads them from the persistent cache.
  Validation batch 8 (4 rows per host): the 7 validation clips leave partial batches."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 " + os.environ.get("XLA_FLAGS", ""), CI="1")
  procs = []
  for pid in range(2):
    entry = (["-m", "dim_jax.launch_multihost"] if signal_steps is None else
             [SIGNAL_HELPER, f"--signal_step={signal_steps[pid]}", "--signal=TERM"])
    cmd = [sys.executable, *entry, f"--coordinator=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={pid}", "--config", "configs/vq_tiny.py",
           f"--workdir={workdir}", f"--config.data.dir={data_dir}",
           "--config.train.batch_size=2", "--config.train.eval_batch_size=8",
           f"--config.train.num_steps={num_steps}", "--config.train.log_every_steps=1",
           "--config.train.eval_every_steps=2", "--config.train.checkpoint_every_steps=2",
           "--config.train.data_state=iterator", "--config.data.shuffle_buffer=16"]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=400) for p in procs]
  return [p.returncode for p in procs], outs


@pytest.mark.multidevice
def test_two_processes_train_checkpoint_and_resume(tmp_path):
  data_dir = str(tmp_path / "data")
  # Two shards so each host reads its own file; odd split sizes exercise fillers.
  synthetic.write_synthetic_dataset(data_dir, seed=3, num_train=24, num_val=7, num_test=5,
                                    num_shards=2, min_len=40, max_len=120)
  workdir = tmp_path / "work"
  # Preemption notices reach the hosts at different steps (host 0 after step 2, host 1 after
  # step 4): they agree, so both save step 3 and stop cleanly instead of one entering the
  # collective save while the other trains on.
  codes, outs = _launch(workdir, data_dir, num_steps=50, signal_steps=(2, 4))
  assert codes == [0, 0], [o[1][-2000:] for o in outs]
  first = metric_writer.read_metrics(workdir)
  assert [m["step"] for m in first if "train/loss" in m] == [1, 2, 3]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3"]  # step 2: validation
  step_dir = workdir / "checkpoints" / "3" / "data_iter"
  assert {"process_0", "process_1"} <= set(os.listdir(step_dir))
  # The validation pass saw every validation frame exactly once across both hosts.
  val = [m for m in first if "val/frames" in m][-1]
  from dim_jax.data import records
  expected_frames = sum(len(c["listener_motion"]) for c in records.read_clips(data_dir, "val"))
  assert val["val/frames"] == expected_frames
  codes, outs = _launch(workdir, data_dir, num_steps=5)
  assert codes == [0, 0], [o[1][-2000:] for o in outs]
  steps = [m["step"] for m in metric_writer.read_metrics(workdir) if "train/loss" in m]
  assert steps == [1, 2, 3, 4, 5]
