"""Atomic file writers and run provenance: the one place that puts result files on disk.

Every writer puts the bytes under a temporary name next to the target (fsynced), then
`os.replace`s it, so a reader sees the old file or the new one, never half of one; a failure
removes the temporary and leaves the old file alone. A full disk or a read-only directory is
raised as `OutputError`, one line naming the path and what to do.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import re
import uuid
from typing import Any, Mapping, Sequence

import numpy as np

from dim_jax import errors


class OutputError(errors.DimJaxError, OSError):
  """A result file could not be written (full disk, read-only or missing directory)."""

  def __str__(self):
    return str(self.strerror)


def explain_os_error(path: str, error: OSError) -> OutputError:
  """`error` as one line naming `path` and what to do."""
  hint = {errno.ENOSPC: "the disk is full: free space or choose another workdir",
          errno.EDQUOT: "the disk quota is exhausted: free space or choose another workdir",
          errno.EROFS: "the file system is read-only: choose a writable workdir",
          errno.EACCES: "permission denied: choose a writable workdir",
          errno.EPERM: "permission denied: choose a writable workdir",
          errno.ENOTDIR: "a parent of this path is a file, not a directory",
          errno.ENOENT: "its directory does not exist"}.get(error.errno, error.strerror)
  out = OutputError(error.errno, f"cannot write {path}: {hint}")
  out.filename = path
  return out


def _remove_quietly(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


def write_temp(path: str, data: bytes) -> str:
  """Writes `data` next to `path` under a temporary name (fsynced); returns that name."""
  directory, name = os.path.split(os.path.abspath(path))
  temp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
  try:
    with open(temp, "xb") as f:  # Created with the umask's mode, like a plain open().
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
  except OSError as error:
    _remove_quietly(temp)
    raise explain_os_error(path, error) from None
  except BaseException:
    _remove_quietly(temp)
    raise
  return temp


def atomic_write_many(contents: Mapping[str, bytes]) -> None:
  """Writes several files; all are staged before any is renamed (a failure changes none)."""
  temps: dict[str, str] = {}
  try:
    for path, data in contents.items():
      temps[path] = write_temp(path, data)
    for path in list(temps):
      try:
        os.replace(temps[path], path)
      except OSError as error:
        raise explain_os_error(path, error) from None
      del temps[path]
  finally:
    for temp in temps.values():
      _remove_quietly(temp)


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Replaces `path` with `data` atomically."""
  atomic_write_many({path: data})


def json_default(value: Any) -> Any:
  """numpy scalars/arrays (and anything with `tolist`) as JSON values."""
  if isinstance(value, np.generic):
    return value.item()
  if hasattr(value, "tolist"):
    return value.tolist()
  raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def json_bytes(payload: Any) -> bytes:
  return (json.dumps(payload, indent=2, sort_keys=True, default=json_default) + "\n").encode()


def write_json_atomic(path: str, payload: Any) -> None:
  atomic_write_bytes(path, json_bytes(payload))


def write_text_atomic(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def save_npy_atomic(path: str, array: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  atomic_write_bytes(path, buffer.getvalue())


def ensure_writable_dir(path: str, what: str = "workdir") -> str:
  """Creates `path` if needed and proves it writable (a probe file), else `OutputError`."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise OutputError(errno.ENOTDIR, f"{what} {path} is a file, not a directory: choose "
                      "another path or move the file away")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as error:
    raise explain_os_error(path, error) from None
  probe = write_temp(os.path.join(path, ".write_probe"), b"")
  _remove_quietly(probe)
  return path


# The libraries whose versions change a result: k-means (SID) moves between scikit-learn
# releases, sqrtm/eigh (FD) between SciPy/NumPy/BLAS builds, the model between jax/flax.
RESULT_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy",
                    "scikit-learn", "tensorflow-cpu", "tensorflow")


def library_versions(names: Sequence[str] = RESULT_LIBRARIES) -> dict[str, str]:
  """Installed versions of the libraries a result depends on (absent ones are skipped)."""
  versions = {"python": platform.python_version()}
  for name in names:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  try:  # The BLAS a metric ran on (threadpoolctl is a scikit-learn dependency).
    import threadpoolctl  # pylint: disable=g-import-not-at-top
    versions["blas"] = ", ".join(sorted({f"{p.get('internal_api')} {p.get('version')}"
                                         for p in threadpoolctl.threadpool_info()
                                         if p.get("user_api") == "blas"}))
  except Exception:  # pylint: disable=broad-except  # provenance must never fail a run.
    pass
  return versions


# --- clip ids as file names -----------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_HASHED = re.compile(r"~[0-9a-f]{8}$")


def clip_filename(clip_id: str, suffix: str = ".npy") -> str:
  """A clip id as a file name, distinct for distinct ids.

  Ids may hold '/', spaces or other characters a file name cannot; those become '_', and then
  a stable hash of the original id is appended (`s1/c1` -> `s1_c1~1c1a2b3c.npy`) so that
  `s1/c1` and `s1_c1` never share a file. Ids that are already safe keep their name.
  """
  if not isinstance(clip_id, str) or not clip_id:
    raise ValueError(f"clip id {clip_id!r}: expected a non-empty string")
  name = _UNSAFE.sub("_", clip_id)
  if name.startswith("."):
    name = "_" + name
  if name != clip_id or _HASHED.search(clip_id):
    digest = hashlib.sha256(clip_id.encode("utf-8")).hexdigest()[:8]
    name = f"{name}~{digest}"
  return name + suffix


def clip_filenames(clip_ids: Sequence[str], suffix: str = ".npy") -> dict[str, str]:
  """{clip_id: file name}; refuses repeated ids or (however unlikely) a shared name."""
  names: dict[str, str] = {}
  owner: dict[str, str] = {}
  for clip_id in clip_ids:
    name = clip_filename(clip_id, suffix)
    if clip_id in names:
      raise ValueError(f"clip id {clip_id!r} appears twice")
    if name in owner:
      raise ValueError(f"clip ids {owner[name]!r} and {clip_id!r} map to the same file {name}")
    names[clip_id] = name
    owner[name] = clip_id
  return names
