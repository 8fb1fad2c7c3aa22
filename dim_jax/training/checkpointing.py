"""Orbax checkpointing: exact resume, best-by-validation, phase chaining, mismatch errors.

One `CheckpointManager` per workdir (`<workdir>/checkpoints`). Each step directory holds
  state/      the TrainState (params, optimizer state, step, rng) as sharded arrays,
  data_iter/  each process's tf.data iterator state (tf.train.Checkpoint),
  meta/       JSON: phase, model config, full run config, batches consumed.
Orbax commits a step directory atomically; a half-written step is never restored.
Kept: the latest `keep` steps plus the best by validation loss.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
import shutil
import tempfile
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

PyTree = Any


class CheckpointMismatchError(ValueError):
  """A checkpoint in the workdir or named by the config does not fit the model."""


# --- tf.data iterator state as an Orbax item --------------------------------------------

class DataIteratorHandler(ocp.CheckpointHandler):
  """Stores each process's tf.data iterator checkpoint inside the Orbax step directory.

  The iterator state is written synchronously to a staging folder when `save` is asked
  for (the loop keeps advancing the iterator while Orbax finishes in the background), and
  this handler only moves the staged files into the step directory.
  """

  def save(self, directory: epath.Path, args: "DataIteratorSave"):
    target = epath.Path(directory) / f"process_{jax.process_index()}"
    target.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(args.staged_dir):
      shutil.move(os.path.join(args.staged_dir, name), os.fspath(target / name))
    shutil.rmtree(args.staged_dir, ignore_errors=True)

  def restore(self, directory: epath.Path, args: "DataIteratorRestore"):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    prefix = epath.Path(directory) / f"process_{jax.process_index()}" / "iterator"
    if not (epath.Path(directory) / f"process_{jax.process_index()}").exists():
      raise FileNotFoundError(f"no iterator state for process {jax.process_index()} in {directory}")
    tf.train.Checkpoint(iterator=args.iterator).read(os.fspath(prefix)).assert_consumed()
    return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  staged_dir: str


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


def stage_iterator(iterator, staging_root: str) -> str:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  os.makedirs(staging_root, exist_ok=True)
  staged = tempfile.mkdtemp(prefix=f"iter_p{jax.process_index()}_", dir=staging_root)
  tf.train.Checkpoint(iterator=iterator).write(os.path.join(staged, "iterator"))
  return staged


# --- tree comparison (clear errors instead of Orbax stack traces) ------------------------

def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def tree_mismatches(expected: PyTree, found: PyTree) -> list[str]:
  """Lists paths missing, unexpected or of a different shape between two trees of arrays."""
  exp = {path_str(p): tuple(np.shape(v) if not hasattr(v, "shape") else v.shape)
         for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  got = {path_str(p): tuple(np.shape(v) if not hasattr(v, "shape") else v.shape)
         for p, v in jax.tree_util.tree_flatten_with_path(found)[0]}
  problems = [f"missing in checkpoint: {k} {exp[k]}" for k in sorted(exp.keys() - got.keys())]
  problems += [f"not in model: {k} {got[k]}" for k in sorted(got.keys() - exp.keys())]
  problems += [f"shape differs: {k} model {exp[k]} vs checkpoint {got[k]}"
               for k in sorted(exp.keys() & got.keys()) if exp[k] != got[k]]
  return problems


def config_differences(expected: dict, found: dict, prefix: str = "") -> list[str]:
  out = []
  for key in sorted(set(expected) | set(found)):
    a, b = expected.get(key, "<absent>"), found.get(key, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_differences(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}: this run {a!r}, checkpoint {b!r}")
  return out


# --- the manager ------------------------------------------------------------------------

class Checkpointer:
  """Owns the workdir's CheckpointManager; save/restore of state + iterator + meta."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.staging = os.path.join(os.path.dirname(self.directory), ".staging")
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, preservation_policy=policy,
        best_fn=lambda m: m["val_loss"], best_mode="min",
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def best_step(self) -> Optional[int]:
    return self.manager.best_step()

  def save(self, step: int, state: PyTree, *, meta: dict, iterator=None,
           val_loss: Optional[float] = None) -> None:
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if iterator is not None:
      items["data_iter"] = DataIteratorSave(stage_iterator(iterator, self.staging))
    metrics = None if val_loss is None else {"val_loss": float(val_loss)}
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def saved_state_shapes(self, step: int) -> PyTree:
    metadata = self.manager.item_metadata(step)
    return metadata["state"]

  def restore_state(self, step: int, abstract_state: PyTree) -> PyTree:
    """Restores the TrainState onto the shardings carried by `abstract_state`'s leaves."""
    saved = self.saved_state_shapes(step)
    if saved is not None:
      problems = tree_mismatches(abstract_state, saved)
      if problems:
        raise CheckpointMismatchError(
            f"checkpoint {self.directory}/{step} does not match the model:\n  "
            + "\n  ".join(problems[:50])
            + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""))
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def restore_iterator(self, step: int, iterator) -> bool:
    """Restores the data iterator position; False if this checkpoint has none for us."""
    try:
      self.manager.restore(step, args=ocp.args.Composite(
          data_iter=DataIteratorRestore(iterator)))
      return True
    except (FileNotFoundError, KeyError, ValueError) as error:  # pragma: no cover - fallback
      del error
      return False

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _read_only_manager(workdir: str) -> tuple[ocp.CheckpointManager, str]:
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints under {directory} (has that phase run?)")
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, best_fn=lambda m: m["val_loss"], best_mode="min")), directory


def _choose_step(manager, directory: str, step) -> int:
  chosen = manager.best_step() if step == "best" else (
      manager.latest_step() if step in (None, "latest") else int(step))
  if chosen is None:
    chosen = manager.latest_step()
  if chosen is None:
    raise FileNotFoundError(f"no committed checkpoint under {directory}")
  return chosen


def load_meta(workdir: str, step: Optional[str] = "best") -> dict:
  """The meta JSON (phase, model configs, run config) of a finished phase's checkpoint."""
  manager, directory = _read_only_manager(workdir)
  chosen = _choose_step(manager, directory, step)
  meta = manager.restore(chosen, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  manager.close()
  return dict(meta, step=chosen)


def load_params(workdir: str, step: Optional[str] = "best") -> tuple[PyTree, dict]:
  """Reads the params (host numpy) and meta of a finished phase's checkpoint.

  Used to chain phases (VQ -> pretrain -> fine-tune) and by evaluation/export; a missing
  checkpoint is a clear error naming the directory.
  """
  manager, directory = _read_only_manager(workdir)
  chosen = _choose_step(manager, directory, step)
  with warnings.catch_warnings():
    # Host-side restore (no target shardings) is intended here: the caller places the arrays.
    warnings.filterwarnings("ignore", message="Sharding info not provided")
    restored = manager.restore(chosen, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(), meta=ocp.args.JsonRestore()))
  manager.close()
  return restored["state"]["params"], dict(restored["meta"], step=chosen)
