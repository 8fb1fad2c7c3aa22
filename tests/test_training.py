"""Training spine: learning, sharded equivalence, exact resume after a kill, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dim_jax import config_lib, phases
from dim_jax.data import records, synthetic
from dim_jax.training import checkpointing, metric_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("data"))
  synthetic.write_synthetic_dataset(path, seed=0, num_train=48, num_val=16, num_test=16,
                                    min_len=40, max_len=120)
  return path


def tiny_config(data_dir, **train):
  config = config_lib.shrink_to_tiny(config_lib.vq_config("listener"))
  config.data.dir = data_dir
  config.train.batch_size = 8
  config.train.eval_batch_size = 8
  for key, value in train.items():
    config.train[key] = value
  return config


SIGNAL_HELPER = os.path.join(ROOT, "tests", "helpers", "signal_at_step.py")


def run_main(workdir, data_dir, *flags, devices=1, entry=("-m", "dim_jax.main")):
  env = dict(os.environ)  # with the session's XLA cache (tests/conftest.py)
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      + os.environ.get("XLA_FLAGS", ""))
  env["CI"] = "1"
  cmd = [sys.executable, *entry, "--config", "configs/vq_tiny.py",
         f"--workdir={workdir}", f"--config.data.dir={data_dir}",
         "--config.train.batch_size=8", "--config.train.eval_batch_size=8",
         "--config.data.bucket_boundaries=(128,)", *flags]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def losses(workdir, key="train/loss"):
  return {m["step"]: m[key] for m in metric_writer.read_metrics(workdir) if key in m}


def test_vq_training_lowers_validation_error(data_dir, tmp_path):
  config = tiny_config(data_dir, num_steps=100, eval_every_steps=100, log_every_steps=10,
                       checkpoint_every_steps=100, eval_at_start=True)
  report = phases.run(config, str(tmp_path))
  val = losses(str(tmp_path), "val/rec_l1")
  # The best constant prediction (per-dim median of the validation frames), computed here
  # from the records: the tiny decoder starts near a constant (zero-initialised output), so
  # beating it by a wide margin means the tokens carry the motion.
  frames = np.concatenate([c["listener_motion"] for c in records.read_clips(data_dir, "val")])
  constant_l1 = float(np.abs(frames - np.median(frames, axis=0)).mean())
  assert val[0] > 0.9 * constant_l1, (val, constant_l1)
  assert val[100] < 0.85 * constant_l1, (val, constant_l1)  # 0.76 measured at 100 steps
  # The report is the best checkpoint on the validation split (test is for `evaluate` only).
  assert report["best_val"]["frames"] > 0
  assert report["best_val"]["codes_used"] > 1
  saved = json.load(open(tmp_path / "report.json"))
  assert saved["best_val"]["rec_l1"] == pytest.approx(report["best_val"]["rec_l1"])


# One uninterrupted 14-step run, the reference of the 8-device and the killed-run tests (one
# worker runs this file: tests/conftest.py). The default shuffle buffer (1024 > the 48 windows of an
# epoch: 6 batches) and 14 steps, so steps 5..14 cross two epoch boundaries. Warmup 20 steps:
# the cosine schedule decays over max(num_steps, warmup + 1) = 21 steps, so steps 1..4 have
# the same learning rates in a 4-step run.
REFERENCE = ["--config.train.num_steps=14", "--config.train.log_every_steps=1",
             "--config.train.eval_every_steps=14", "--config.train.checkpoint_every_steps=4",
             "--config.train.warmup_steps=20", "--config.model.dropout_rate=0.1"]


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  full = run_main(workdir, data_dir, *REFERENCE)
  assert full.returncode == 0, full.stderr[-3000:]
  return workdir


@pytest.mark.multidevice
def test_eight_device_data_fsdp_mesh_matches_one_device(data_dir, reference_run, tmp_path):
  # The reference's first 4 steps (same batches, learning rates and dropout draws) against 4
  # steps on a data 4 x fsdp 2 mesh of 8 devices.
  eight = run_main(tmp_path / "eight", data_dir, *REFERENCE, "--config.train.num_steps=4",
                   "--config.train.eval_every_steps=4", "--config.mesh.data=4",
                   "--config.mesh.fsdp=2", devices=8)
  assert eight.returncode == 0, eight.stderr[-3000:]
  a = {step: loss for step, loss in losses(reference_run).items() if step <= 4}
  b = losses(tmp_path / "eight")
  assert sorted(a) == [1, 2, 3, 4] and sorted(b) == sorted(a)
  for step in a:
    assert abs(a[step] - b[step]) <= 1e-5 * max(1.0, abs(a[step])), (step, a[step], b[step])
  # Losses really change over the steps (the comparison is not of constants).
  assert len({round(v, 6) for v in a.values()}) == 4


def test_killed_run_resumes_exactly(data_dir, reference_run, tmp_path):
  # The resumed steps 5..14 cross two epoch boundaries: a restored tf.data iterator whose next
  # epochs were ordered by lost seed-generator state diverged there (from step 7 on).
  a = losses(reference_run)
  for data_state in ("iterator", "replay"):
    workdir = tmp_path / data_state
    flags = [*REFERENCE, f"--config.train.data_state={data_state}"]
    killed = run_main(workdir, data_dir, *flags, "--signal_step=4", "--signal=KILL",
                      entry=(SIGNAL_HELPER,))
    assert killed.returncode != 0  # SIGKILL'd right after the step-4 checkpoint.
    assert 5 not in losses(workdir)
    has_iterator = (workdir / "checkpoints" / "4" / "data_iter").exists()
    assert has_iterator == (data_state == "iterator")
    resumed = run_main(workdir, data_dir, *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    b = losses(workdir)
    assert {step: b[step] for step in range(5, 15)} == {step: a[step] for step in range(5, 15)}, (
        data_state, a, b)
    assert losses(workdir, "val/loss")[14] == losses(reference_run, "val/loss")[14]
  # The resumed steps really depend on the data position: the losses all differ.
  assert len({a[step] for step in range(5, 15)}) == 10


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
  env = dict(os.environ, CI="1", XLA_FLAGS="--xla_force_host_platform_device_count=1 " + os.environ.get("XLA_FLAGS", ""))
  cmd = [sys.executable, "-m", "dim_jax.main", "--config", "configs/vq_tiny.py",
         f"--workdir={tmp_path}", f"--config.data.dir={data_dir}",
         "--config.train.batch_size=8", "--config.train.eval_batch_size=8",
         "--config.data.bucket_boundaries=(128,)", "--config.train.num_steps=100000",
         "--config.train.log_every_steps=1", "--config.train.checkpoint_every_steps=100000",
         "--config.train.eval_every_steps=100000"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "metrics.jsonl"
  try:
    # Wait (bounded) until training is under way: the first logged step.
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.stat().st_size > 0):
      assert proc.poll() is None, proc.stderr.read()[-3000:]
      assert time.monotonic() < deadline, "training never started"
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, stderr[-3000:]
  saved = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=3).latest_step()
  last_logged = max(losses(tmp_path))
  assert saved == last_logged and 1 <= saved < 100000


def test_checkpoints_keep_latest_and_best(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=2)
  val = {1: 5.0, 2: 1.0, 3: None, 4: 3.0, 5: None, 6: 4.0}
  for step, loss in val.items():
    ckpt.save(step, {"w": np.full(3, step, np.float32)}, meta={"step": step}, val_loss=loss)
  ckpt.wait()
  assert sorted(ckpt.manager.all_steps()) == [2, 5, 6]  # best (2) + latest two
  assert ckpt.best_step() == 2
  restored = ckpt.restore_state(2, {"w": np.zeros(3, np.float32)})
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.full(3, 2.0))
  ckpt.close()


def test_unknown_config_field_is_refused(data_dir, tmp_path):
  result = run_main(tmp_path, data_dir, "--config.train.nonexistent_field=3")
  assert result.returncode != 0
  assert "nonexistent_field" in result.stderr


def test_workdir_with_another_models_checkpoint_is_refused(data_dir, tmp_path):
  config = tiny_config(data_dir, num_steps=1, eval_every_steps=1, checkpoint_every_steps=1)
  phases.run(config, str(tmp_path))
  other = tiny_config(data_dir, num_steps=2, eval_every_steps=1, checkpoint_every_steps=1)
  other.model.hidden_size = 48
  with pytest.raises(checkpointing.CheckpointMismatchError, match="hidden_size"):
    phases.run(other, str(tmp_path))
  # Phase chaining reads the finished phase's params and meta back.
  params, meta = checkpointing.load_params(str(tmp_path))
  assert meta["step"] == 1 and meta["model"]["hidden_size"] == config.model.hidden_size
  assert params["encoder"]["vertice_mapping"]["kernel"].shape == (56, config.model.hidden_size)
  # Nothing was written over the original checkpoint.
  assert checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=3).latest_step() == 1


def test_missing_dataset_is_a_clear_error(tmp_path):
  config = tiny_config(str(tmp_path / "nowhere"), num_steps=1)
  config.data.synthetic = False
  with pytest.raises(records.RecordError, match="nowhere"):
    phases.run(config, str(tmp_path / "work"))


def test_params_tree_mismatch_lists_paths():
  expected = {"a": np.zeros((2, 3)), "b": {"c": np.zeros(4)}}
  found = {"a": np.zeros((2, 4)), "d": np.zeros(1)}
  problems = checkpointing.tree_mismatches(expected, found)
  assert any("b/c" in p and "missing" in p for p in problems)
  assert any(p.startswith("not in model: d") for p in problems)
  assert any("a" in p and "(2, 3)" in p and "(2, 4)" in p for p in problems)


def test_train_step_compiles_once_and_keeps_shapes(data_dir):
  # Recompilation guard on the jitted step: batches of one bucket reuse one executable, and
  # the state keeps its shapes and dtypes (a drifting dtype would retrace every step).
  import chex  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from dim_jax.data import pipeline
  from dim_jax.training import trainer, vq
  import tensorflow as tf
  config = tiny_config(data_dir)
  task = vq.VQTask.from_config(config)
  optimizer = trainer.make_optimizer(config.train)
  params = task.init_params(jax.random.PRNGKey(0), pipeline.dummy_batch(2, 16))
  state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
               rng=jax.random.PRNGKey(1))
  def step(state, batch):
    return trainer.train_step(state, batch, task=task, optimizer=optimizer)

  step_fn = jax.jit(chex.assert_max_traces(step, n=1))
  dataset = pipeline.make_split_dataset(config, data_dir, "train", train=True, batch_size=2)
  batches = pipeline.as_numpy(iter(dataset.filter(lambda b: tf.shape(b["mask"])[1] == 128)))
  losses_seen = []
  for _ in range(3):
    batch = {k: v for k, v in next(batches).items() if k in pipeline.dummy_batch(1)}
    new_state, metrics = step_fn(state, batch)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    losses_seen.append(float(metrics["loss"]))
    state = new_state
  assert int(state["step"]) == 3 and len(set(losses_seen)) == 3


def test_config_differences_read_tuples_as_the_saved_lists():
  # A checkpoint's meta is JSON: a tuple field (model.token_factors) reads back as a list. A
  # rerun of the same config must resume, not report a difference (the demo's rerun did).
  ours = {"model": {"token_factors": (16, 256), "dim": 8}, "phase": "pretrain"}
  saved = json.loads(json.dumps(ours))
  assert saved["model"]["token_factors"] == [16, 256]
  assert checkpointing.config_differences(ours, saved) == []
  changed = dict(saved, model=dict(saved["model"], token_factors=[16, 128]))
  assert checkpointing.config_differences(ours, changed) == [
      "model.token_factors: this run (16, 256), checkpoint [16, 128]"]


def test_a_field_newer_than_the_checkpoint_matches_at_its_default():
  # A checkpoint written before model.context_lag existed has no such key in its meta; a
  # rerun at the default (what that checkpoint was made with) resumes, another value not.
  ours = {"model": {"context_lag": 0, "dim": 8}, "phase": "pretrain"}
  old = {"model": {"dim": 8}, "phase": "pretrain"}
  defaults = {"model": {"context_lag": 0, "dim": 256}}
  assert checkpointing.config_differences(ours, old, defaults=defaults) == []
  lagged = dict(ours, model=dict(ours["model"], context_lag=1))
  assert checkpointing.config_differences(lagged, old, defaults=defaults) == [
      "model.context_lag: this run 1, checkpoint 0"]
  # Without defaults an absent field is a difference, and a present one is never defaulted.
  assert checkpointing.config_differences(ours, old) == [
      "model.context_lag: this run 0, checkpoint '<absent>'"]
  assert checkpointing.config_differences(ours, dict(old, model={"dim": 9}),
                                          defaults=defaults) == [
      "model.dim: this run 8, checkpoint 9"]
