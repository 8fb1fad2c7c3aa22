"""Suite-wide pytest settings: test order and a shared XLA compilation cache."""

import os
import shutil
import tempfile

import pytest

# Compilation dominates this suite (a tiny train step takes seconds to compile, milliseconds
# to run), and many tests compile the same programs: in process (several phases.run of one
# config) and in subprocesses (which inherit these variables). A persistent cache shared by
# the xdist workers and their subprocesses compiles each program once per session.
if "DIM_JAX_TEST_CACHE" not in os.environ:
  os.environ["DIM_JAX_TEST_CACHE"] = tempfile.mkdtemp(prefix="dim_jax_test_xla_cache_")
  os.environ["DIM_JAX_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["DIM_JAX_TEST_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# LLVM -O0 compiles faster; the tiny test programs barely notice the slower code.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

# Two workers on two cores (`make test`): one BLAS/OpenMP thread per process, inherited by the
# subprocesses. A multithreaded OpenBLAS spins waiting for its threads on busy cores: the
# 768-dim eigh of the NN-audio baseline took 2-6 s instead of 0.15 s. Set before numpy loads.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")

# Scheduling (`make test`: two xdist workers, --dist loadgroup --no-loadscope-reorder): the
# tests of a file share its module fixtures (a trained DIM chain, a SLURM cluster), so a file
# is one group that one worker runs, except the files below, whose tests are independent
# training runs of their own and are spread over both workers. The longest come first, so
# no long group starts last while the other worker idles (measured worker seconds).
_SPREAD = ("test_hardening.py", "test_sampler.py")
# Files whose subprocesses compile the same programs share a group (one worker, one after the
# other), so the later one loads them from the persistent cache: the two-process training runs
# of test_multihost.py and test_slurm.py (training batch 2, the 128-frame bucket).
_SHARED = {"test_multihost.py": "two_process_training", "test_slurm.py": "two_process_training"}
_LONGEST_FIRST = ("test_training.py", "test_dim.py", "test_multihost.py", "test_slurm.py",
                  "test_notebook.py", "test_hardening.py", "test_inference_sharding.py",
                  "test_vqvae.py", "test_evaluate.py", "test_streaming.py", "test_data.py",
                  "test_export.py", "test_sampler.py")


def _group(nodeid: str) -> str:
  """The xdist work unit of a test: its file's group, or the test itself in a _SPREAD file."""
  name = os.path.basename(nodeid.split("::", 1)[0])
  return nodeid if name in _SPREAD else _SHARED.get(name, name)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))


def pytest_xdist_make_scheduler(config, log):
  """--dist loadgroup, grouped by `_group`. xdist 3.8 groups by renaming each marked item's
  `_nodeid`, which pytest 9 no longer reads: its loadgroup sent every test on its own, so both
  workers built the same module fixtures (the DIM chain, the SLURM cluster) for their share."""
  if config.getvalue("dist") != "loadgroup":
    return None
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class FileGroupScheduling(LoadScopeScheduling):

    def _split_scope(self, nodeid):
      return _group(nodeid)

  return FileGroupScheduling(config, log)


def pytest_unconfigure(config):
  # The process that made the cache removes it (the xdist controller, after its workers).
  if (not hasattr(config, "workerinput")
      and os.environ.get("DIM_JAX_TEST_CACHE_OWNER") == str(os.getpid())):
    shutil.rmtree(os.environ["DIM_JAX_TEST_CACHE"], ignore_errors=True)
