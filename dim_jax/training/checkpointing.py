"""Orbax checkpointing: exact resume, best-by-validation, phase chaining, mismatch errors.

One `CheckpointManager` per workdir (`<workdir>/checkpoints`). Each step directory holds
  state/      the TrainState (params, optimizer state, step, rng) as sharded arrays,
  data_iter/  each process's tf.data iterator state (tf.train.Checkpoint),
  meta/       JSON: phase, model config, full run config, batches consumed, and a checksum
              of every array of the state.
Orbax commits a step directory atomically; a half-written step is never restored. Restores
verify the checksums, so a flipped bit on disk is an error naming the step, not different
weights; unreadable steps (truncated, garbage, garbled JSON) are one clear error too.
Kept: the latest `keep` steps plus the best by validation loss.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
import shutil
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from dim_jax import errors, files

PyTree = Any


class CheckpointMismatchError(errors.DimJaxError, ValueError):
  """A checkpoint in the workdir or named by the config does not fit the model."""


class CheckpointNotFoundError(errors.DimJaxError, FileNotFoundError):
  """A workdir named by the config holds no committed checkpoint."""


class CheckpointCorruptError(errors.DimJaxError, ValueError):
  """A checkpoint step cannot be read, or its arrays differ from the checksums saved with it."""

  def __init__(self, message: str, step: Optional[int] = None):
    super().__init__(message)
    self.step = step


def _what_to_do(directory: str, step: int) -> str:
  return (f"delete {os.path.join(directory, str(step))} to resume from the previous step, or "
          "rerun with --config.train.checkpoint_fallback=True to resume from the newest step "
          "that reads and verifies")


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:300] if text else ''}"


# --- checksums ----------------------------------------------------------------------------
# Per array: (sum of its 32-bit words, sum of word x (2 i + 1)), both mod 2^32. Integer sums
# are exact and order-free, so the value does not depend on sharding, devices or hosts; a
# changed word changes the first sum (the difference is below 2^32), and the odd weights make
# the second sum see moved words too. Not cryptographic: it guards against bit rot and
# truncation, not against an adversary.

def _words(x, xp):
  dtype = np.dtype(x.dtype)
  if dtype == np.bool_:
    return x.astype(xp.uint32)
  if dtype.itemsize == 4:
    return (jax.lax.bitcast_convert_type(x, jnp.uint32) if xp is jnp else x.view(np.uint32))
  if dtype.itemsize == 2:
    half = (jax.lax.bitcast_convert_type(x, jnp.uint16) if xp is jnp else x.view(np.uint16))
    return half.astype(xp.uint32)
  if dtype.itemsize == 1:
    return (x.astype(jnp.uint8) if xp is jnp else x.view(np.uint8)).astype(xp.uint32)
  # 8-byte types (only with jax_enable_x64): both halves of each word.
  pairs = (jax.lax.bitcast_convert_type(x, jnp.uint32) if xp is jnp
           else x.view(np.uint32).reshape(x.shape + (2,)))
  return pairs


def _leaf_checksum(x, xp):
  words = _words(x, xp).reshape(-1)
  weights = xp.arange(words.shape[0], dtype=xp.uint32) * xp.uint32(2) + xp.uint32(1)
  return xp.stack([xp.sum(words, dtype=xp.uint32), xp.sum(words * weights, dtype=xp.uint32)])


def _key_data(x):
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x)
  return x


@jax.jit
def _device_checksums(tree):
  return jax.tree.map(lambda x: _leaf_checksum(_key_data(x), jnp), tree)


def state_checksums(tree: PyTree) -> dict[str, list[int]]:
  """{leaf path: [sum, weighted sum]} of a tree of (sharded) jax arrays, host-independent."""
  leaves = jax.tree.leaves(tree)
  if all(getattr(x, "is_fully_addressable", True) for x in leaves):
    # One process holds every shard: NumPy on the host copies (which Orbax makes anyway)
    # costs no compilation. Across processes each host sees only its shards: reduce on device.
    return host_checksums(jax.tree.map(lambda x: np.asarray(_key_data(x)), tree))
  sums = _device_checksums(tree)
  flat = jax.tree_util.tree_flatten_with_path(sums)[0]
  # Fully replicated outputs: every process reads its own copy.
  return {path_str(p): [int(v) for v in np.asarray(x.addressable_data(0))] for p, x in flat}


def host_checksums(tree: PyTree, prefix: str = "") -> dict[str, list[int]]:
  """The same checksums computed with NumPy on host arrays."""
  return {prefix + path_str(p): [int(v) for v in _leaf_checksum(np.ascontiguousarray(x), np)]
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def verify_checksums(expected: Optional[dict], found: dict, *, where: str, step: int,
                     what_to_do: str) -> None:
  """Raises CheckpointCorruptError listing the arrays whose checksums differ."""
  if expected is None:
    logging.warning("%s step %d has no checksums (written before dim_jax stored them): "
                    "restored without verification", where, step)
    return
  bad = sorted(k for k in found if k in expected and list(expected[k]) != list(found[k]))
  missing = sorted(k for k in found if k not in expected)
  if bad or missing:
    detail = ", ".join((bad + missing)[:5]) + (" ..." if len(bad) + len(missing) > 5 else "")
    raise CheckpointCorruptError(
        f"checkpoint {where} step {step} is corrupt: {len(bad)} array(s) differ from the "
        f"checksums saved with them{f' and {len(missing)} have none' if missing else ''} "
        f"({detail}); {what_to_do}", step=step)


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


def _as_saved(value):
  """The value as the checkpoint's JSON meta holds it (tuples read back as lists)."""
  if isinstance(value, (tuple, list)):
    return [_as_saved(v) for v in value]
  return value


def config_meta(cfg) -> dict:
  """A model config dataclass as the checkpoint meta records it (dtype by name)."""
  d = dataclasses.asdict(cfg)
  d["dtype"] = jnp.dtype(d["dtype"]).name
  return d


def config_differences(expected: dict, found: dict, prefix: str = "",
                       defaults: Optional[dict] = None) -> list[str]:
  """Where this run's meta `expected` and a checkpoint's `found` differ ("key: this run ..,
  checkpoint .."). `defaults` (shaped like `expected`): a field the checkpoint does not have,
  because it was written before the field existed, matches this run at its default."""
  out = []
  defaults = defaults or {}
  for key in sorted(set(expected) | set(found)):
    a, b = expected.get(key, "<absent>"), found.get(key, "<absent>")
    if key not in found and key in defaults and not isinstance(defaults[key], dict):
      b = defaults[key]
    if isinstance(a, dict) and isinstance(b, dict):
      nested = defaults.get(key)
      out += config_differences(a, b, f"{prefix}{key}.",
                                nested if isinstance(nested, dict) else None)
    elif _as_saved(a) != _as_saved(b):
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
    meta = dict(meta, checksums=state_checksums(state))
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    metrics = None if val_loss is None else {"val_loss": float(val_loss)}
    try:
      if iterator is not None:
        items["data_iter"] = DataIteratorSave(stage_iterator(iterator, self.staging))
      self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    except Exception as error:  # pylint: disable=broad-except
      raise _output_error(self.directory, error) from None

  def read_meta(self, step: int) -> dict:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as error:  # pylint: disable=broad-except
      raise CheckpointCorruptError(
          f"checkpoint {self.directory} step {step}: its metadata cannot be read "
          f"({_first_line(error)}); {_what_to_do(self.directory, step)}", step=step) from None

  def saved_state_shapes(self, step: int) -> PyTree:
    try:
      return self.manager.item_metadata(step)["state"]
    except Exception as error:  # pylint: disable=broad-except
      raise CheckpointCorruptError(
          f"checkpoint {self.directory} step {step}: its array metadata cannot be read "
          f"({_first_line(error)}); {_what_to_do(self.directory, step)}", step=step) from None

  def restore_state(self, step: int, abstract_state: PyTree) -> PyTree:
    """Restores the TrainState onto the shardings carried by `abstract_state`'s leaves.

    The restored arrays are checked against the checksums saved in the step's meta.
    """
    meta = self.read_meta(step)
    saved = self.saved_state_shapes(step)
    if saved is not None:
      problems = tree_mismatches(abstract_state, saved)
      if problems:
        raise CheckpointMismatchError(
            f"checkpoint {self.directory}/{step} does not match the model:\n  "
            + "\n  ".join(problems[:50])
            + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""))
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]
    except Exception as error:  # pylint: disable=broad-except
      raise CheckpointCorruptError(
          f"checkpoint {self.directory} step {step}: its arrays cannot be read "
          f"({_first_line(error)}); {_what_to_do(self.directory, step)}", step=step) from None
    verify_checksums(meta.get("checksums"), state_checksums(restored), where=self.directory,
                     step=step, what_to_do=_what_to_do(self.directory, step))
    return restored

  def restore_iterator(self, step: int, iterator) -> bool:
    """Restores the data iterator position; False if this checkpoint has none for us.

    Also False (with a warning) for an iterator state of another pipeline (another dim_jax
    version or other data settings): tf.data cannot restore it into this one.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      self.manager.restore(step, args=ocp.args.Composite(
          data_iter=DataIteratorRestore(iterator)))
      return True
    except (FileNotFoundError, KeyError, ValueError) as error:  # pragma: no cover - fallback
      del error
      return False
    except tf.errors.OpError as error:
      logging.warning("checkpoint %s step %d: its data iterator state does not fit this "
                      "input pipeline (%s)", self.directory, step, _first_line(error))
      return False

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def quarantine(self, step: int) -> str:
    """Moves a corrupt step to `<workdir>/checkpoints_corrupt/<step>` (kept, never restored)."""
    self.wait()
    target_root = self.directory + "_corrupt"
    os.makedirs(target_root, exist_ok=True)
    target = os.path.join(target_root, f"{step}")
    if os.path.exists(target):
      target = tempfile.mkdtemp(prefix=f"{step}_", dir=target_root)
      os.rmdir(target)
    if jax.process_index() == 0:
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"quarantined checkpoint {step}")
    self.manager.reload()
    return target

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except  # async save errors surface here
      raise _output_error(self.directory, error) from None

  def close(self) -> None:
    self.wait()
    self.manager.close()


def _output_error(directory: str, error: BaseException) -> BaseException:
  """A failed save as one line (full disk, read-only...), else the original error."""
  chain, seen = error, set()
  while chain is not None and id(chain) not in seen:
    seen.add(id(chain))
    if isinstance(chain, OSError) and chain.errno is not None:
      return files.explain_os_error(directory, chain)
    chain = chain.__cause__ or chain.__context__
  text = str(error)
  for marker, code in (("No space left", 28), ("Read-only file system", 30),
                       ("Permission denied", 13)):
    if marker in text:
      return files.explain_os_error(directory, OSError(code, marker))
  return error


def abstract_with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _read_only_manager(workdir: str) -> tuple[ocp.CheckpointManager, str]:
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise CheckpointNotFoundError(f"no checkpoints under {directory} (has that phase run?)")
  try:
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, best_fn=lambda m: m["val_loss"], best_mode="min"))
  except Exception as error:  # pylint: disable=broad-except
    raise CheckpointCorruptError(f"{directory}: cannot open the checkpoints "
                                 f"({_first_line(error)})") from None
  return manager, directory


def _choose_step(manager, directory: str, step) -> int:
  chosen = manager.best_step() if step == "best" else (
      manager.latest_step() if step in (None, "latest") else int(step))
  if chosen is None:
    chosen = manager.latest_step()
  if chosen is None:
    raise CheckpointNotFoundError(f"no committed checkpoint under {directory}")
  return chosen


def _restore_chosen(workdir: str, step, items) -> tuple[dict, int, str]:
  """`items`: restore args by item name, or a function (directory, step) -> that dict."""
  manager, directory = _read_only_manager(workdir)
  try:
    chosen = _choose_step(manager, directory, step)
    try:
      if callable(items):
        items = items(directory, chosen)
      with warnings.catch_warnings():
        # Host-side restore (no target shardings) is intended: the caller places the arrays.
        warnings.filterwarnings("ignore", message="Sharding info not provided")
        restored = manager.restore(chosen, args=ocp.args.Composite(**items))
    except Exception as error:  # pylint: disable=broad-except
      raise CheckpointCorruptError(
          f"checkpoint {directory} step {chosen} cannot be read ({_first_line(error)}); "
          f"delete {os.path.join(directory, str(chosen))} and choose another step, or rerun "
          "the phase that wrote it", step=chosen) from None
  finally:
    manager.close()
  return restored, chosen, directory


def load_meta(workdir: str, step: Optional[str] = "best") -> dict:
  """The meta JSON (phase, model configs, run config) of a finished phase's checkpoint."""
  restored, chosen, _ = _restore_chosen(workdir, step, dict(meta=ocp.args.JsonRestore()))
  return dict(restored["meta"], step=chosen)


def load_params(workdir: str, step: Optional[str] = "best") -> tuple[PyTree, dict]:
  """Reads the params (host numpy) and meta of a finished phase's checkpoint, verified.

  Used to chain phases (VQ -> pretrain -> fine-tune) and by evaluation/export; a missing
  checkpoint is a clear error naming the directory, a corrupt one names the step.
  """
  def host_items(directory, chosen):
    # NumPy restore args for every saved leaf: no device needed, so a checkpoint written on
    # other devices or processes (its saved shardings name them) reads in any process.
    saved = ocp.PyTreeCheckpointer().metadata(os.path.join(directory, str(chosen), "state"))
    numpy_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                              saved.item_metadata.tree)
    return dict(state=ocp.args.PyTreeRestore(restore_args=numpy_args),
                meta=ocp.args.JsonRestore())

  restored, chosen, directory = _restore_chosen(workdir, step, host_items)
  params, meta = restored["state"]["params"], restored["meta"]
  expected = meta.get("checksums")
  verify_checksums(
      None if expected is None else {k: v for k, v in expected.items() if k.startswith("params/")},
      host_checksums(params, "params/"), where=directory, step=chosen,
      what_to_do=f"rerun the phase that wrote {workdir} or choose another step")
  return params, dict(meta, step=chosen)
