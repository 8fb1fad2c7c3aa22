"""Restricted unpickler for untrusted numpy pickles.

The official DIM data (ViCo, CANDOR, LM_Listener features) ship as pickles of
dicts of numpy arrays. A plain unpickler runs whatever callables a file names,
so a pickle from the internet can execute code. `load_pickle` only resolves the
globals that numpy arrays and plain containers need:

* `numpy.ndarray`, `numpy.dtype`;
* `_reconstruct` and `scalar` from `numpy.core.multiarray` (numpy 1.x names)
  or `numpy._core.multiarray` (numpy 2 names);
* `_frombuffer` from `numpy.core.numeric` / `numpy._core.numeric`
  (protocol 5 in-band buffers);
* `_codecs.encode` (how protocols 0-2 store `bytes`);
* the container/scalar builtins `dict list tuple set frozenset str bytes
  bytearray int float complex bool` (most are opcodes; a few are referenced
  as globals by old protocols).

Every other global, and every persistent id (torch's zip pickles use them),
raises `UnsafePickleError` naming the file and the global before anything is
called.
"""

from __future__ import annotations

import builtins
import codecs
import importlib
import io
import os
import pickle
from typing import Any, Callable

try:
  # Part of the shared error hierarchy when the records module is present, so
  # callers can catch every bad-input problem with one `except RecordError`.
  from dim_jax.data.records import RecordError as _BaseError
except ImportError:  # records.py not available: fall back to ValueError.
  _BaseError = ValueError  # type: ignore[misc,assignment]


class UnsafePickleError(_BaseError):  # type: ignore[misc,valid-type]
  """A pickle referenced a global outside the numpy/container allowlist."""


_BUILTIN_NAMES = frozenset({
    "dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray",
    "int", "float", "complex", "bool",
})

# (module, name) pairs for numpy internals. Both spellings are accepted
# because numpy 1.x pickles say `numpy.core` and numpy 2 pickles say
# `numpy._core`; we resolve either to whichever module this numpy has.
_NUMPY_INTERNALS = frozenset({
    ("multiarray", "_reconstruct"),
    ("multiarray", "scalar"),
    ("numeric", "_frombuffer"),
})


def _resolve_numpy_internal(submodule: str, name: str) -> Any:
  """Returns `numpy[._]core.<submodule>.<name>` for the installed numpy."""
  # numpy 2 keeps `numpy.core` only as a deprecated shim: prefer `_core` to
  # avoid importing the shim (and its DeprecationWarning).
  for package in ("numpy._core", "numpy.core"):
    try:
      module = importlib.import_module(f"{package}.{submodule}")
    except ImportError:
      continue
    if hasattr(module, name):
      return getattr(module, name)
  raise ImportError(f"numpy has no {submodule}.{name}")


def _allowed_global(module: str, name: str) -> Callable[..., Any] | None:
  """Maps an allowed (module, name) to its object; None when not allowed."""
  if module in ("builtins", "__builtin__") and name in _BUILTIN_NAMES:
    return getattr(builtins, name)
  if module == "numpy" and name == "ndarray":
    import numpy as np  # Lazy: only files that contain arrays need numpy.
    return np.ndarray
  if module == "numpy" and name == "dtype":
    import numpy as np
    return np.dtype
  if module == "_codecs" and name == "encode":
    return codecs.encode
  for package in ("numpy.core.", "numpy._core."):
    if module.startswith(package):
      submodule = module[len(package):]
      if (submodule, name) in _NUMPY_INTERNALS:
        return _resolve_numpy_internal(submodule, name)
  return None


class RestrictedUnpickler(pickle.Unpickler):
  """`pickle.Unpickler` that resolves only allowlisted globals.

  Attributes:
    source: A human-readable name of the input (usually its path), used in
      error messages.
  """

  def __init__(self, file: io.BufferedIOBase, source: str = "<stream>",
               encoding: str = "ASCII") -> None:
    """Initialises the unpickler.

    Args:
      file: Binary file-like object positioned at the pickle.
      source: Name used in error messages.
      encoding: How to decode Python 2 `str` objects; numpy arrays pickled
        by Python 2 need "latin1".
    """
    super().__init__(file, encoding=encoding)
    self.source = source

  def find_class(self, module: str, name: str) -> Any:
    """Returns the allowlisted global or raises `UnsafePickleError`."""
    obj = _allowed_global(module, name)
    if obj is None:
      raise UnsafePickleError(
          f"{self.source}: pickle references forbidden global "
          f"'{module}.{name}'; only numpy arrays and plain containers are "
          "allowed")
    return obj

  def persistent_load(self, pid: Any) -> Any:
    """Refuses persistent ids (torch zip pickles, custom stores)."""
    raise UnsafePickleError(
        f"{self.source}: pickle uses a persistent id ({pid!r:.80}); "
        "persistent references are not allowed")


def load_pickle(path: str | os.PathLike[str], encoding: str = "ASCII") -> Any:
  """Loads a pickle of numpy arrays / plain containers without running code.

  Args:
    path: File to read.
    encoding: Decoding for Python 2 `str` objects ("latin1" for Python 2
      numpy pickles).

  Returns:
    The unpickled object.

  Raises:
    UnsafePickleError: The file names a global outside the allowlist.
    RecordError (ValueError if records is unavailable): The file is truncated
      or not a pickle. The message names the file.
    OSError: The file cannot be opened.
  """
  source = os.fspath(path)
  with open(source, "rb") as f:
    try:
      return RestrictedUnpickler(f, source=source, encoding=encoding).load()
    except UnsafePickleError:
      raise
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, TypeError,
            ValueError, AttributeError, IndexError, KeyError) as e:
      # Corrupt input surfaces as many exception types; report them all as
      # one bad-input error that names the file.
      raise _BaseError(
          f"{source}: not a readable pickle ({type(e).__name__}: {e})") from e
