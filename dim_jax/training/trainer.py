"""The training spine shared by every phase: mesh, sharded state, jitted steps, loop, Orbax.

Restore order (documented in every config):
  1. the latest committed checkpoint in this workdir (exact resume: params, optimizer state,
     step, rng and the data iterator position),
  2. otherwise a fresh init (later phases graft earlier phases' params in `Task.init_params`).
A workdir holding a checkpoint of a different model is refused with the differences listed.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dim_jax import errors, files
from dim_jax import sharding as sharding_lib
from dim_jax.data import pipeline, records
from dim_jax.training import checkpointing, metric_writer

PyTree = Any


class Task(Protocol):
  """What the trainer needs of a phase (VQTask, DIMTask): pure functions it jits and shards."""
  name: str

  def init_params(self, rng: jax.Array, batch: dict) -> PyTree: ...
  def loss_fn(self, params: PyTree, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]: ...
  def eval_sums(self, params: PyTree, batch: dict) -> dict: ...
  def finalize_eval(self, sums: dict) -> dict: ...
  def model_meta(self) -> dict: ...
  def meta_defaults(self) -> dict:
    """`model_meta`'s config fields at their defaults (a checkpoint from before a field
    existed matches at its default: checkpointing.config_differences)."""

  def trainable_mask(self, params: PyTree) -> Optional[PyTree]:
    """Bool tree, False = frozen (no optimizer state, bit-identical); None = all train."""

  def after_update(self, params: PyTree, hook_inputs: dict, rng: jax.Array) -> PyTree:
    """Params after the optimizer update (e.g. dead-code restarts); `hook_inputs` are the
    loss outputs whose names start with '_'."""

  def pretrained_params(self, abstract_params: PyTree) -> dict[str, np.ndarray]:
    """Leaves grafted from earlier phases' checkpoints onto a fresh init: {path: array}."""


StepHook = Callable[[int, checkpointing.Checkpointer], None]


class NonFiniteLossError(errors.DimJaxError, FloatingPointError):
  pass


# --- pure step functions ----------------------------------------------------------------

def make_optimizer(train_config, trainable: Optional[PyTree] = None) -> optax.GradientTransformation:
  """AdamW (official: lr 1e-4, torch defaults b1 .9, b2 .999, eps 1e-8, weight decay .01)."""
  lr = float(train_config.learning_rate)
  warmup = int(train_config.warmup_steps)
  if train_config.schedule == "constant":
    schedule = optax.constant_schedule(lr) if warmup == 0 else optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  elif train_config.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1),
                                                  max(int(train_config.num_steps), warmup + 1))
  else:
    raise ValueError(f"train.schedule={train_config.schedule!r}; expected 'constant' or 'cosine'")
  parts = []
  if float(train_config.grad_clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(train_config.grad_clip_norm)))
  parts.append(optax.adamw(schedule, b1=float(train_config.b1), b2=float(train_config.b2),
                           eps=float(train_config.eps),
                           weight_decay=float(train_config.weight_decay)))
  optimizer = optax.chain(*parts)
  if trainable is None:
    return optimizer
  # Frozen leaves get no optimizer state and no update (weight decay would move them);
  # `train_step` also keeps their old values so they stay bit-identical.
  labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
  return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)


def train_step(state: dict, batch: dict, *, task: Task, optimizer,
               trainable: Optional[PyTree] = None) -> tuple[dict, dict]:
  """One optimizer step; the step's rng is `fold_in(state.rng, step)` so resume replays it."""
  rng = jax.random.fold_in(state["rng"], state["step"])
  def loss_fn(params, batch, rng):
    if trainable is not None:
      # Frozen leaves enter the loss as constants, so XLA drops their backward pass entirely
      # (e.g. the frozen VQ decoder behind the continuous loss), as torch does for
      # requires_grad=False.
      params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
    return task.loss_fn(params, batch, rng)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, metrics), grads = grad_fn(state["params"], batch, rng)
  if trainable is not None:
    grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  if trainable is not None:
    params = jax.tree.map(lambda new, old, t: new if t else old, params, state["params"],
                          trainable)
  # Keys starting with '_' are loss outputs for the task's post-update hook, not metrics.
  hook_inputs = {k: v for k, v in metrics.items() if k.startswith("_")}
  metrics = {k: v for k, v in metrics.items() if not k.startswith("_")}
  # E.g. the VQ phase re-seeds dead codebook entries from this batch's latents.
  params = task.after_update(params, hook_inputs, jax.random.fold_in(rng, 1))
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params))
  new_state = dict(step=state["step"] + 1, params=params, opt_state=opt_state, rng=state["rng"])
  return new_state, metrics


def eval_step(params: PyTree, batch: dict, *, task) -> dict:
  return task.eval_sums(params, batch)


# --- helpers ----------------------------------------------------------------------------

def _synchronized_batches(local_batches: Iterator[dict], template: dict) -> Iterator[dict]:
  """Yields until every process is exhausted; exhausted hosts contribute masked fillers.

  Hosts can hold different numbers of eval batches (length buckets, uneven shards); every
  global step needs all of them, so each step first agrees (one all-gather) on whether any
  host still has data.
  """
  if jax.process_count() == 1:
    yield from local_batches
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  filler = template
  exhausted = False
  while True:
    batch = None if exhausted else next(local_batches, None)
    exhausted = batch is None
    if not int(np.max(multihost_utils.process_allgather(np.int32(not exhausted)))):
      return
    if batch is not None:
      filler = {k: np.zeros_like(v) for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}
      yield batch
    else:
      yield filler


def evaluate(task, params, *, dataset, mesh, compiled_eval, batch_size: int,
             min_frames: int = 8, split: str = "the evaluation split") -> dict[str, float]:
  """Full pass over a split; exact (sum, count) aggregation, padding never counted.

  ``split`` names the split in the error raised when it yields no batch.
  """
  totals = None
  template = dict(pipeline.dummy_batch(batch_size, min_frames), example_mask=np.zeros(batch_size, bool))
  template["mask"][:] = False
  for local in _synchronized_batches(pipeline.as_numpy(iter(dataset)), template):
    sums = compiled_eval(params, sharding_lib.to_global_batch(local, mesh))
    sums = jax.device_get(sums)
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  if totals is None:
    raise records.RecordError(f"{split}: no clips to evaluate on")
  return task.finalize_eval(totals)


class _Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint and exits cleanly.

  With several processes the flag is agreed on every step (max over processes, one tiny
  all-gather), so hosts signalled at different steps all save the same step and stop
  together instead of one entering the collective save while another trains on.
  """

  def __init__(self):
    self.signalled = False
    self._previous = None

  def agreed(self) -> bool:
    if jax.process_count() == 1:
      return self.signalled
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.signalled))))

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.signalled = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# --- the loop ---------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str, task: Task, *, step_hooks: Sequence[StepHook] = ()) -> dict:
  """Trains `task` per `config`, checkpointing into `workdir`; returns final metrics.

  `step_hooks` are called as `hook(step, checkpointer)` after each step's checkpoint logic
  (tests use one to kill or signal the process at a chosen step).
  """
  files.ensure_writable_dir(workdir)
  mesh = sharding_lib.make_mesh(config.mesh)
  tc = config.train
  local_batch = sharding_lib.check_batch_size(int(tc.batch_size), mesh, jax.process_count(),
                                              "train.batch_size")
  local_eval_batch = sharding_lib.check_batch_size(int(tc.eval_batch_size), mesh,
                                                   jax.process_count(), "train.eval_batch_size")
  data_dir = pipeline.ensure_data(config)
  train_ds = pipeline.make_split_dataset(config, data_dir, "train", train=True, batch_size=local_batch)
  val_ds = pipeline.make_split_dataset(config, data_dir, "val", train=False, batch_size=local_eval_batch)

  if tc.data_state not in ("iterator", "replay"):
    raise ValueError(f"train.data_state={tc.data_state!r}; expected 'iterator' or 'replay'")
  root = jax.random.PRNGKey(int(config.seed))
  init_rng, train_rng = jax.random.split(root)
  dummy = sharding_lib.to_global_batch(pipeline.dummy_batch(local_batch), mesh)
  trainable = task.trainable_mask(
      jax.eval_shape(lambda r: task.init_params(r, dummy), init_rng))
  optimizer = make_optimizer(tc, trainable)

  def init_state(rng):
    params = task.init_params(rng, dummy)
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                rng=train_rng)

  abstract_state = jax.eval_shape(init_state, init_rng)
  state_shardings = sharding_lib.tree_shardings(abstract_state, mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  repl = sharding_lib.replicated(mesh)

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    keep=int(tc.keep_checkpoints))
  meta = dict(task.model_meta(), config=json.loads(config.to_json_best_effort()))
  train_iter = iter(train_ds)
  latest, state = None, None
  abstract_sharded = checkpointing.abstract_with_shardings(abstract_state, state_shardings)
  for step in reversed(ckpt.all_steps()):
    # The newest step that reads and verifies; an older one only if the user asked for it.
    try:
      saved_meta = ckpt.read_meta(step)
      differences = checkpointing.config_differences(
          {k: meta[k] for k in meta if k != "config"},
          {k: saved_meta.get(k) for k in meta if k != "config"},
          defaults=task.meta_defaults())
      if differences:
        raise checkpointing.CheckpointMismatchError(
            f"{workdir} holds a checkpoint (step {step}) of a different model; use another "
            "workdir or the same config. Differences:\n  " + "\n  ".join(differences))
      state = ckpt.restore_state(step, abstract_sharded)
      latest = step
      break
    except checkpointing.CheckpointCorruptError as error:
      if not tc.checkpoint_fallback:
        raise
      logging.warning("%s; train.checkpoint_fallback: moved aside, trying the previous step",
                      error)
      ckpt.quarantine(step)
  if latest is not None:
    restored_iterator = tc.data_state == "iterator" and ckpt.restore_iterator(latest, train_iter)
    if not restored_iterator:
      if tc.data_state == "iterator":
        logging.warning("no usable iterator state for this process; replaying the data "
                        "pipeline")
        train_iter = iter(train_ds)  # A fresh position, whatever a failed restore left.
      for _ in range(int(saved_meta.get("batches_consumed", latest))):
        next(train_iter)
    logging.info("resumed from %s at step %d", workdir, latest)
  else:
    state = jax.jit(init_state, out_shardings=state_shardings)(init_rng)
    # Earlier phases' params (host arrays) placed onto this run's shardings.
    grafted = task.pretrained_params(jax.eval_shape(lambda p: p, state["params"]))
    if grafted:
      state["params"] = jax.tree_util.tree_map_with_path(
          lambda path, leaf: (jax.device_put(grafted[checkpointing.path_str(path)], leaf.sharding)
                              if checkpointing.path_str(path) in grafted else leaf),
          state["params"])
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state["params"]))
    logging.info("initialised %s: %.2fM parameters", task.name, n_params / 1e6)

  compiled_train = jax.jit(
      functools.partial(train_step, task=task, optimizer=optimizer, trainable=trainable),
      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, repl),
      donate_argnums=0)
  compiled_eval = jax.jit(functools.partial(eval_step, task=task),
                          in_shardings=(state_shardings["params"], batch_sharding),
                          out_shardings=repl)

  run_validation = functools.partial(
      evaluate, task, dataset=val_ds, mesh=mesh, compiled_eval=compiled_eval,
      batch_size=local_eval_batch, min_frames=min(config.data.bucket_boundaries),
      split=f"{data_dir}: split 'val'")
  writer = metric_writer.MetricWriter(workdir)
  if latest is None and jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))

  start = int(jax.device_get(state["step"]))
  preempted = False
  num_steps = int(tc.num_steps)
  train_batches = pipeline.as_numpy(train_iter)
  pending = []
  val_metrics = None
  if start == 0 and bool(tc.eval_at_start):
    initial = run_validation(state["params"])
    writer.write(0, {f"val/{k}": v for k, v in initial.items()})
  with _Preemption() as preemption, metric_writer.progress_bar(
      num_steps, start, f"{task.name}") as bar:
    for step in range(start + 1, num_steps + 1):
      batch = sharding_lib.to_global_batch(next(train_batches), mesh)
      state, metrics = compiled_train(state, batch)
      pending.append(metrics)
      bar.update(1)
      if step % int(tc.log_every_steps) == 0 or step == num_steps:
        summary = metric_writer.summarize(jax.device_get(pending))
        pending = []
        if not math.isfinite(summary["loss"]):
          raise NonFiniteLossError(
              f"non-finite training loss {summary['loss']} in steps "
              f"{step - int(tc.log_every_steps) + 1}..{step}; last good checkpoint: "
              f"{ckpt.latest_step()}")
        writer.write(step, {f"train/{k}": v for k, v in summary.items()})
        bar.set_postfix(loss=f"{summary['loss']:.4f}")
      val_loss = None
      if step % int(tc.eval_every_steps) == 0 or step == num_steps:
        val_metrics = run_validation(state["params"])
        writer.write(step, {f"val/{k}": v for k, v in val_metrics.items()})
        val_loss = val_metrics["loss"]
      preempted = preemption.agreed()
      if (step % int(tc.checkpoint_every_steps) == 0 or step == num_steps
          or preempted or val_loss is not None):
        ckpt.save(step, state, iterator=train_iter if tc.data_state == "iterator" else None,
                  val_loss=val_loss,
                  meta=dict(meta, batches_consumed=step))
      for hook in step_hooks:
        hook(step, ckpt)
      if preempted:
        logging.warning("SIGTERM: checkpoint saved at step %d, exiting", step)
        break
  if val_metrics is None and not preempted:
    # A finished run reopened (nothing left to train): report its validation metrics anyway.
    val_metrics = run_validation(state["params"])
  ckpt.close()
  writer.close()
  return dict(val=val_metrics, step=int(jax.device_get(state["step"])),
              best_step=ckpt.best_step(), state=state, mesh=mesh, compiled_eval=compiled_eval,
              preempted=preempted)
