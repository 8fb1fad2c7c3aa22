"""`launch/slurm_multihost.sh` under a real single-node SLURM: `srun -n 2` is one 2-process run.

The fixture installs Debian's SLURM packages when they are missing (root + apt-get; skipped
with the reason where that is impossible), starts slurmctld + slurmd with
`launch/slurm_single_node.sh` on free ports and stops them at the end. Two SLURM tasks (one
CPU device each, gloo collectives, `jax.distributed.initialize()` auto-detecting SLURM)
train the tiny VQ phase; one process with two CPU devices trains the same steps on the same
data, and both write the same losses.

Same global batches: each SLURM task reads its own train shard (two shards, two processes)
and contributes its rows to the global batch in process order; one process reads both shards
interleaved. With one clip per device per step (global batch 2), no window shuffle
(`shuffle_buffer=1`), every clip one window in one bucket (70..120 frames: bucket 128) and
the file order that seed 0 draws (shard 0 first), both runs see identical global batches,
row for row; the test checks that premise on the pipeline itself. Bigger batches hold the
same clips but in another order (hence other per-device sums and, with dead-code restarts,
other picks), and a shuffle buffer shuffles each host's stream on its own.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dim_jax.data import synthetic
from dim_jax.training import metric_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("slurmctld", "slurmd", "slurm-client")
TOOLS = ("slurmctld", "slurmd", "srun", "sinfo", "scontrol", "scancel", "squeue")
NUM_STEPS = 3
CONFIG = "configs/vq_tiny.py"
OVERRIDES = ["--config.train.batch_size=2", "--config.train.eval_batch_size=2",
             f"--config.train.num_steps={NUM_STEPS}", "--config.train.log_every_steps=1",
             f"--config.train.eval_every_steps={NUM_STEPS}",
             f"--config.train.checkpoint_every_steps={NUM_STEPS}",
             "--config.train.data_state=iterator", "--config.data.shuffle_buffer=1"]
# Both runs: XLA's LLVM backend at -O0 compiles the CPU code about a third faster (three
# processes compile here); same flag in both runs, and three steps of a tiny model run fast anyway.
FAST_COMPILE = "--xla_backend_optimization_level=0"
# The pipeline settings the runs use (configs/vq_tiny.py: max_len 128, buckets (64, 128)).
PIPELINE = dict(train=True, seed=0, bucket_boundaries=[64, 128], max_len=128, shuffle_buffer=1)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _clean_env(**extra) -> dict:
  """This environment without SLURM_* (e.g. when pytest itself runs in a SLURM job)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  return dict(env, CI="1", **extra)


def _install_slurm():
  """Returns None when the SLURM tools are there (installing them if needed), else why not."""
  if all(shutil.which(tool) for tool in TOOLS):
    return None
  if os.geteuid() != 0:
    return "SLURM is not installed and installing it needs root"
  if not shutil.which("apt-get"):
    return "SLURM is not installed and there is no apt-get to install it"
  env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
  install = ["apt-get", "install", "-y", "-q", "--no-install-recommends",
             "-o", "DPkg::Lock::Timeout=60", *PACKAGES]
  try:
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=240)
    if result.returncode != 0:  # e.g. no or stale package lists on a fresh machine
      subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=120)
      result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=240)
  except subprocess.TimeoutExpired as error:
    return f"`{' '.join(install)}` timed out: {error}"
  if result.returncode != 0:
    return f"`{' '.join(install)}` failed: {(result.stdout + result.stderr)[-800:]}"
  missing = [tool for tool in TOOLS if not shutil.which(tool)]
  return f"installed {PACKAGES} but {missing} are missing" if missing else None


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("slurm_data"))
  # Two shards, one per SLURM task; 70..120 frames: every clip is one window in bucket 128.
  synthetic.write_synthetic_dataset(path, seed=3, num_train=24, num_val=7, num_test=5,
                                    num_shards=2, min_len=70, max_len=120)
  return path


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
  """One process, two CPU devices; started first so that it overlaps the SLURM setup."""
  workdir = tmp_path_factory.mktemp("one_process")
  cmd = [sys.executable, "-m", "dim_jax.main", "--config", CONFIG, f"--workdir={workdir}",
         f"--config.data.dir={data_dir}", *OVERRIDES]
  env = _clean_env(XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  yield proc, workdir
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def slurm_conf(tmp_path_factory):
  """A running single-node SLURM (slurmctld + slurmd); yields its slurm.conf."""
  started = time.monotonic()
  reason = _install_slurm()
  if reason:
    pytest.skip(reason)
  installed = time.monotonic()
  directory = str(tmp_path_factory.mktemp("slurm"))
  script = os.path.join(ROOT, "launch", "slurm_single_node.sh")
  env = _clean_env(SLURMCTLD_PORT=str(_free_port()), SLURMD_PORT=str(_free_port()))
  result = subprocess.run(["bash", script, "start", directory], env=env, capture_output=True,
                          text=True, timeout=120)
  conf = os.path.join(directory, "slurm.conf")
  try:
    assert result.returncode == 0, result.stdout + result.stderr
    deadline = time.monotonic() + 60
    state = ""
    while time.monotonic() < deadline:  # the script waits for this too; check it here
      state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=dict(env, SLURM_CONF=conf),
                             capture_output=True, text=True, timeout=30).stdout.strip()
      if state == "idle":
        break
      time.sleep(0.2)
    assert state == "idle", f"node state {state!r}"
    print(f"SLURM: install {installed - started:.1f} s, start {time.monotonic() - installed:.1f} s")
    yield conf
  finally:
    subprocess.run(["bash", script, "stop", directory], env=env, capture_output=True,
                   timeout=120)


def _same_global_batches(data_dir) -> None:
  """The premise: 2 hosts x 1 row and 1 host x 2 rows give the same global batches."""
  from dim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  def batches(batch_size, index, count):
    dataset = pipeline.make_dataset(data_dir, "train", batch_size=batch_size,
                                    process_index=index, process_count=count, **PIPELINE)
    iterator = pipeline.as_numpy(iter(dataset))
    return [next(iterator) for _ in range(NUM_STEPS)]
  one = batches(2, 0, 1)
  hosts = [batches(1, index, 2) for index in range(2)]
  for step in range(NUM_STEPS):
    assert list(one[step]) == list(hosts[0][step])
    for key in one[step]:
      joined = np.concatenate([hosts[0][step][key], hosts[1][step][key]])
      np.testing.assert_array_equal(joined, one[step][key], err_msg=f"step {step + 1} {key}")


@pytest.mark.multidevice
def test_srun_two_tasks_join_one_run_with_one_process_losses(data_dir, reference_run,
                                                              slurm_conf, tmp_path):
  workdir = tmp_path / "slurm"
  # PYTHON: this interpreter (the venv); one CPU device per task.
  env = _clean_env(SLURM_CONF=slurm_conf, PYTHON=sys.executable,
                   XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}")
  cmd = ["srun", "-n", "2", "--kill-on-bad-exit=1", "--label", "--time=10",
         os.path.join(ROOT, "launch", "slurm_multihost.sh"), CONFIG, str(workdir),
         f"--config.data.dir={data_dir}", *OVERRIDES]
  srun = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    _same_global_batches(data_dir)
    out, _ = srun.communicate(timeout=400)
  finally:
    if srun.poll() is None:
      srun.kill()
      srun.communicate()
  assert srun.returncode == 0, out[-4000:]
  reference, reference_dir = reference_run
  reference_out, _ = reference.communicate(timeout=400)
  assert reference.returncode == 0, reference_out[-4000:]

  # One jax.distributed run of two processes: SLURM task i is jax process i of 2 ...
  for task in range(2):
    assert re.search(rf"^{task}: .*\] process {task}/2, devices", out, re.MULTILINE), out[-4000:]
  # ... whose checkpoint holds both processes' input-iterator states.
  iterator_states = {p.name for p in (workdir / "checkpoints").rglob("process_*") if p.is_dir()}
  assert iterator_states == {"process_0", "process_1"}, iterator_states

  slurm = metric_writer.read_metrics(workdir)
  single = metric_writer.read_metrics(reference_dir)
  assert [m["step"] for m in slurm if "train/loss" in m] == list(range(1, NUM_STEPS + 1))
  for key in ("train/loss", "val/loss"):
    got = [(m["step"], m[key]) for m in slurm if key in m]
    want = [(m["step"], m[key]) for m in single if key in m]
    print(key, "srun -n 2:", got, "one process:", want)
    assert [s for s, _ in got] == [s for s, _ in want]
    # Same global batches with each example on the same device in both runs; the two
    # per-device partial sums meet in an all-reduce of two operands (gloo between the tasks,
    # in-process in the reference), which adds them exactly either way: the runs agree bit
    # for bit here. The tolerance only allows XLA to fuse or order float32 reductions of the
    # multi-process program differently (a few ulp per op over three steps).
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-5, atol=0)
