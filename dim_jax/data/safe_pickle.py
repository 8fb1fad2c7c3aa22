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
* `_codecs.encode` with the latin-1 codec (how protocols 0-2 store `bytes`);
* the container/scalar builtins `dict list tuple set frozenset str bytes
  bytearray int float complex bool` (most are opcodes; a few are referenced
  as globals by old protocols).

Every other global, and every persistent id (torch's zip pickles use them),
raises `UnsafePickleError` naming the file and the global before anything is
called.

A pickle can also ask for memory it does not contain: a length field of 1 TB,
an array of a declared shape, `bytearray(10**12)`, or millions of one-byte
instructions each making an object. `load_pickle` bounds all of it by a limit
(`max_bytes`; by default half the memory available): the file itself, every
array, bytes object and container a pickle instruction asks for (counted
before it is allocated), and a fixed amount per instruction. Past the limit
it raises `PickleTooLargeError`; declared lengths beyond the end of the file
are a truncated or crafted file. The count adds up allocations whether or not
they are freed later, so it bounds the peak.
"""

from __future__ import annotations

import builtins
import codecs
import functools
import importlib
import io
import math
import operator
import os
import pickle
import struct
from typing import Any, Callable

import numpy as np

try:
  # Part of the shared error hierarchy when the records module is present, so
  # callers can catch every bad-input problem with one `except RecordError`.
  from dim_jax.data.records import RecordError as _BaseError
except ImportError:  # records.py not available: fall back to ValueError.
  _BaseError = ValueError  # type: ignore[misc,assignment]


class UnsafePickleError(_BaseError):  # type: ignore[misc,valid-type]
  """A pickle referenced a global outside the numpy/container allowlist."""


class PickleTooLargeError(UnsafePickleError):
  """Unpickling would allocate more than the limit (`max_bytes`)."""


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

# Upper bounds of what is counted against the limit, in bytes: any one pickle
# instruction besides the data it declares (a new dict is 64 bytes, plus its
# stack slot), and one element of a container built by a constructor call (a
# slot plus possibly a new object, e.g. a numpy scalar or row view).
_INSTRUCTION_BYTES = 128
_ELEMENT_BYTES = 128
# How protocols 0-2 spell `bytes`: `_codecs.encode(text, "latin1")`.
_LATIN1 = frozenset({"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1"})


def _size(num_bytes: int) -> str:
  for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if num_bytes >= scale:
      return f"{num_bytes / scale:.1f} {unit}"
  return f"{num_bytes} bytes"


def available_memory_bytes() -> int:
  """Memory this machine can still give: MemAvailable, capped by a cgroup limit."""
  available = None
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          available = int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  if available is None:
    try:
      available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
      available = 4 << 30  # No way to ask (not Linux): assume a small machine.
  # A container may be limited below the machine's free memory (cgroup v2, v1).
  for limit_file, usage_file in (
      ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
      ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
       "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
    try:
      with open(limit_file, encoding="ascii") as f:
        limit = int(f.read().strip())
      with open(usage_file, encoding="ascii") as f:
        usage = int(f.read().strip())
    except (OSError, ValueError):
      continue
    available = min(available, max(limit - usage, 0))
  return available


def default_max_bytes() -> int:
  """The default limit of one `load_pickle`: half the memory available now."""
  return available_memory_bytes() // 2


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


class _Budget:
  """Counts the bytes a pickle asks for; raises past the limit."""

  def __init__(self, source: str, limit: int, origin: str):
    self.source = source
    self.limit = limit
    self.origin = origin
    self.total = 0

  def charge(self, num_bytes: int, what: str) -> None:
    if self.total + num_bytes > self.limit:
      raise PickleTooLargeError(
          f"{self.source}: unpickling would allocate more than {_size(self.limit)} "
          f"({self.origin}): it asks for {what} ({_size(num_bytes)}) after "
          f"{_size(self.total)}; a crafted or corrupt pickle, or raise the limit "
          "(load_pickle max_bytes, convert_official --max_pickle_bytes) if the file is "
          "genuine")
    self.total += num_bytes


def _element_count(shape: Any) -> int:
  """Product of a declared shape (Python ints: no overflow); ValueError if not one."""
  dims = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
  if not all(hasattr(type(d), "__index__") and operator.index(d) >= 0 for d in dims):
    raise ValueError(f"bad array shape {shape!r}")
  return math.prod(operator.index(d) for d in dims)


class _ArrayType:
  """What `numpy.ndarray` resolves to: `_reconstruct` maps it back to the type,
  and calling it directly (`ndarray(shape, dtype)`) allocates only within the limit.
  """

  def __init__(self, budget: _Budget):
    self._budget = budget
    self.__name__ = "ndarray"

  def __call__(self, shape, dtype=float, *args, **kwargs):
    count = _element_count(shape)
    self._budget.charge(count * np.dtype(dtype).itemsize,
                        f"an uninitialised array of shape {shape}")
    return np.ndarray(shape, dtype, *args, **kwargs)


class _BoundedFile:
  """Read access that refuses lengths beyond the end of the file (before reading them)."""

  def __init__(self, file: io.BufferedIOBase, start: int, size: int):
    self._file = file
    self._position = start  # Counted here: tell() costs a system call per instruction.
    self._size = size

  def read(self, n: int) -> bytes:
    if n > self._size - self._position:
      raise pickle.UnpicklingError(
          f"an instruction at byte {self._position} declares {n} bytes, but only "
          f"{self._size - self._position} remain: truncated or crafted")
    data = self._file.read(n)
    self._position += len(data)
    return data

  def readline(self) -> bytes:
    line = self._file.readline()
    self._position += len(line)
    return line


def _charged(load: Callable[[Any], None]) -> Callable[[Any], None]:
  @functools.wraps(load)
  def charged(self):
    self._budget.charge(_INSTRUCTION_BYTES, "the objects of one more pickle instruction")
    load(self)
  return charged


class RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Unpickler that resolves only allowlisted globals, within a memory limit.

  The pure-Python unpickler, whose instructions can be checked one by one
  (`pickle.Unpickler`, in C, allocates declared lengths before checking them).

  Attributes:
    source: A human-readable name of the input (usually its path), used in
      error messages.
  """

  # Every instruction counts against the limit.
  dispatch = {code: _charged(load) for code, load in
              pickle._Unpickler.dispatch.items()}  # pylint: disable=protected-access

  def __init__(self, file: io.BufferedIOBase, source: str = "<stream>",
               encoding: str = "ASCII", max_bytes: int | None = None) -> None:
    """Initialises the unpickler.

    Args:
      file: Binary, seekable file-like object positioned at the pickle.
      source: Name used in error messages.
      encoding: How to decode Python 2 `str` objects; numpy arrays pickled
        by Python 2 need "latin1".
      max_bytes: Limit of what the pickle may make this process allocate;
        None: `default_max_bytes()` (half the memory available).
    """
    if max_bytes is None:
      limit, origin = default_max_bytes(), "half the memory available"
    else:
      limit, origin = int(max_bytes), "the configured limit"
    self._budget = _Budget(source, limit, origin)
    start = file.tell()
    size = file.seek(0, io.SEEK_END)
    file.seek(start)
    self._budget.charge(size - start, "the file's contents")
    super().__init__(_BoundedFile(file, start, size), encoding=encoding)
    self.source = source

  # --- globals ---------------------------------------------------------------

  def find_class(self, module: str, name: str) -> Any:
    """Returns the allowlisted global (size-checked) or raises `UnsafePickleError`."""
    obj = self._allowed_global(module, name)
    if obj is None:
      raise UnsafePickleError(
          f"{self.source}: pickle references forbidden global "
          f"'{module}.{name}'; only numpy arrays and plain containers are "
          "allowed")
    return obj

  def _allowed_global(self, module: str, name: str) -> Any:
    """Maps an allowed (module, name) to its checked callable; None when not allowed."""
    if module in ("builtins", "__builtin__") and name in _BUILTIN_NAMES:
      return self._checked_builtin(name)
    if module == "numpy" and name == "ndarray":
      return _ArrayType(self._budget)
    if module == "numpy" and name == "dtype":
      return np.dtype  # A dtype allocates nothing; arrays of it are checked.
    if module == "_codecs" and name == "encode":
      return self._latin1_encode
    for package in ("numpy.core.", "numpy._core."):
      if module.startswith(package):
        submodule = module[len(package):]
        if (submodule, name) in _NUMPY_INTERNALS:
          checked = getattr(self, f"_checked_{name.lstrip('_')}")
          return functools.partial(checked, _resolve_numpy_internal(submodule, name))
    return None

  def _checked_builtin(self, name: str) -> Callable[..., Any]:
    """`builtins.<name>` behind a check of the size of what it would build."""
    constructor = getattr(builtins, name)
    budget = self._budget

    def build(*args):
      value = args[0] if args else None
      if name in ("bytes", "bytearray"):
        # bytes(n) is n zero bytes (numpy integers too); bytes(text, encoding) up to 4
        # per character.
        if hasattr(type(value), "__index__"):
          count = operator.index(value)
        elif isinstance(value, str):
          count = 4 * len(value)
        else:
          count = getattr(value, "nbytes", None) or (
              len(value) if hasattr(value, "__len__") else 0)
        budget.charge(count, f"{name}()")
      elif name in ("list", "tuple", "set", "frozenset", "dict"):
        count = len(value) if hasattr(value, "__len__") else 0
        budget.charge(count * _ELEMENT_BYTES, f"{name}() of {count} elements")
      elif name == "str":
        # repr() of a container or array can be far larger than the object.
        if value is not None and not isinstance(
            value, (str, bytes, bytearray, int, float, complex, bool)):
          raise UnsafePickleError(
              f"{self.source}: pickle calls str() on a {type(value).__name__}; "
              "only strings, bytes and numbers are allowed")
        budget.charge(4 * len(value) if hasattr(value, "__len__") else 64,
                      "str()")
      return constructor(*args)

    build.__name__ = name
    return build

  def _latin1_encode(self, text: Any, encoding: str = "utf-8",
                     errors: str = "strict") -> bytes:
    if not isinstance(text, str) or encoding.lower() not in _LATIN1:
      raise UnsafePickleError(
          f"{self.source}: pickle calls _codecs.encode with {encoding!r}; only "
          "latin-1 text (how old protocols store bytes) is allowed")
    self._budget.charge(len(text), "bytes")
    return codecs.encode(text, encoding, errors)

  def _checked_reconstruct(self, reconstruct, subtype, shape, dtype):
    if not isinstance(subtype, _ArrayType):
      raise UnsafePickleError(
          f"{self.source}: pickle reconstructs a {subtype!r}; only numpy.ndarray is allowed")
    count = _element_count(shape)
    self._budget.charge(count * np.dtype(dtype).itemsize, f"an array of shape {shape}")
    return reconstruct(np.ndarray, shape, dtype)

  def _checked_scalar(self, scalar, dtype, *args):
    self._budget.charge(np.dtype(dtype).itemsize, f"a numpy scalar of {dtype}")
    return scalar(dtype, *args)

  def _checked_frombuffer(self, frombuffer, buffer, dtype, shape, order):
    # A view of data the pickle holds: numpy checks that the shape fits the buffer.
    return frombuffer(buffer, dtype, shape, order)

  # --- instructions that allocate what they declare ----------------------------

  def _check_array_state(self, state: Any) -> None:
    """Counts the array `ndarray.__setstate__(state)` would allocate, before it does."""
    if not isinstance(state, tuple) or len(state) not in (4, 5):
      raise pickle.UnpicklingError(f"bad numpy array state of type {type(state).__name__}")
    shape, dtype, _, data = state[-4:]
    if not isinstance(dtype, np.dtype):
      raise pickle.UnpicklingError(f"numpy array state with dtype {dtype!r}")
    count = _element_count(shape)
    self._budget.charge(count * dtype.itemsize, f"a {dtype} array of shape {shape}")
    if dtype.hasobject:
      # numpy fills object arrays from a list; a shorter one makes it read past the end.
      if not isinstance(data, list) or len(data) != count:
        raise pickle.UnpicklingError(
            f"object array of {count} elements with "
            f"{len(data) if isinstance(data, list) else type(data).__name__} values")
    elif not isinstance(data, (bytes, bytearray, str)) or len(data) != count * dtype.itemsize:
      raise pickle.UnpicklingError(
          f"array of {count * dtype.itemsize} bytes stored in "
          f"{len(data) if hasattr(data, '__len__') else type(data).__name__} bytes")

  def load_build(self):
    if isinstance(self.stack[-2], np.ndarray):
      self._check_array_state(self.stack[-1])
    super().load_build()

  dispatch[pickle.BUILD[0]] = _charged(load_build)

  def load_bytearray8(self):
    length, = struct.unpack("<Q", self.read(8))
    self._budget.charge(length, "a bytearray")  # Allocated before its bytes are read.
    buffer = bytearray(length)
    self.readinto(buffer)
    self.append(buffer)

  dispatch[pickle.BYTEARRAY8[0]] = _charged(load_bytearray8)

  def persistent_load(self, pid: Any) -> Any:
    """Refuses persistent ids (torch zip pickles, custom stores)."""
    raise UnsafePickleError(
        f"{self.source}: pickle uses a persistent id ({pid!r:.80}); "
        "persistent references are not allowed")


def load_pickle(path: str | os.PathLike[str], encoding: str = "ASCII",
                max_bytes: int | None = None) -> Any:
  """Loads a pickle of numpy arrays / plain containers without running code.

  Args:
    path: File to read.
    encoding: Decoding for Python 2 `str` objects ("latin1" for Python 2
      numpy pickles).
    max_bytes: Most memory the pickle may make this process allocate (see the
      module docstring); None: half the memory available.

  Returns:
    The unpickled object.

  Raises:
    UnsafePickleError: The file names a global outside the allowlist.
    PickleTooLargeError: It would allocate more than `max_bytes`.
    RecordError (ValueError if records is unavailable): The file is truncated
      or not a pickle. The message names the file.
    OSError: The file cannot be opened.
  """
  source = os.fspath(path)
  with open(source, "rb") as f:
    try:
      return RestrictedUnpickler(f, source=source, encoding=encoding,
                                 max_bytes=max_bytes).load()
    except UnsafePickleError:
      raise
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, TypeError,
            ValueError, AttributeError, IndexError, KeyError, struct.error,
            OverflowError) as e:
      # Corrupt input surfaces as many exception types; report them all as
      # one bad-input error that names the file.
      raise _BaseError(
          f"{source}: not a readable pickle ({type(e).__name__}: {e})") from e
