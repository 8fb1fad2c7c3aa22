"""Device mesh, parameter (FSDP) shardings and global batch assembly.

One code path for one CPU, one GPU or a pod: a `Mesh` with axes ('data', 'fsdp').
Batches are split over both axes (every device holds a slice of the batch); each
parameter is split over 'fsdp' along its largest divisible axis (big_vision's `fsdp`
strategy) and replicated over 'data'. With a 1x1 mesh this is plain single-device jit.
Inference (generate, evaluate) uses the same mesh: `place_tree` puts parameters every process
holds onto it, `host_to_global` splits a batch every process holds, and `to_host` gathers
the results back to every process.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
  """Builds the ('data', 'fsdp') mesh; one axis may be -1 (filled from the device count)."""
  devices = jax.devices() if devices is None else devices
  sizes = [int(mesh_config["data"]), int(mesh_config["fsdp"])]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got data={sizes[0]} fsdp={sizes[1]}")
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh: data={sizes[0]} x fsdp={sizes[1]} does not match the "
                     f"{len(devices)} available devices")
  device_grid = mesh_utils.create_device_mesh(sizes, devices=devices)
  return Mesh(device_grid, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2**10) -> P:
  """Splits the largest axis divisible by `fsdp_size`; small or indivisible leaves stay whole."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for axis in np.argsort(shape)[::-1]:
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for every leaf of an (abstract) pytree by the FSDP rule."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), fsdp_size)),
                      abstract_tree)


def check_batch_size(global_batch_size: int, mesh: Mesh, process_count: int, what: str) -> int:
  """Validates divisibility up front and returns the per-process batch size."""
  if global_batch_size % mesh.devices.size:
    raise ValueError(f"{what}={global_batch_size} must be divisible by the number of devices "
                     f"({mesh.devices.size} = data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']})")
  if global_batch_size % process_count:
    raise ValueError(f"{what}={global_batch_size} must be divisible by the process count "
                     f"({process_count})")
  return global_batch_size // process_count


def _pad_time(array: np.ndarray, length: int) -> np.ndarray:
  if array.ndim < 2 or array.shape[1] == length:
    return array
  pad = [(0, 0)] * array.ndim
  pad[1] = (0, length - array.shape[1])
  return np.pad(array, pad)


def to_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global `jax.Array`s split over the mesh.

  Non-numeric fields (clip ids) stay on the host. With several processes, hosts may have
  drawn different length buckets; they agree on the longest (one tiny all-gather) and pad
  to it, so every host contributes the same global shape.
  """
  numeric = {k: np.asarray(v) for k, v in local_batch.items()
             if np.asarray(v).dtype.kind in "biuf"}
  if jax.process_count() > 1 and "mask" in numeric:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    lengths = multihost_utils.process_allgather(np.int32(numeric["mask"].shape[1]))
    target = int(np.max(lengths))
    numeric = {k: (_pad_time(v, target) if v.ndim >= 2 else v) for k, v in numeric.items()}
  sharding = batch_sharding(mesh)
  out = {}
  for key, value in numeric.items():
    global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


def host_to_global(array: Any, sharding: NamedSharding) -> jax.Array:
  """A host array that every process holds in full -> one global `jax.Array`.

  Unlike `to_global_batch` (each process holds only its rows), every process passes the
  whole array and transfers only the slices its own devices hold, whatever the mesh layout.
  """
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def place_tree(tree: Any, mesh: Mesh) -> Any:
  """Every leaf on `mesh` with the training rule (`tree_shardings`: FSDP over 'fsdp').

  Leaves that every process holds in full (host or single-device arrays, e.g. params read
  from a checkpoint) are sliced per device; leaves that are already global are resharded.
  """
  shardings = tree_shardings(tree, mesh)

  def place(leaf, sharding):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return leaf if leaf.sharding == sharding else jax.device_put(leaf, sharding)
    return host_to_global(leaf, sharding)

  return jax.tree.map(place, tree, shardings)


def to_host(tree: Any) -> Any:
  """NumPy copies of every leaf, global ones gathered: each process gets the whole value.

  One all-gather per leaf that spans several processes; a no-op transfer otherwise.
  """
  def fetch(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)

  return jax.tree.map(fetch, tree)
