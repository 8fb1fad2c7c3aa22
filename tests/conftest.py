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

# Scheduling (`make test`: two xdist workers, --dist loadgroup --no-loadscope-reorder): the
# tests of a file share its module fixtures (a trained DIM chain, a SLURM cluster), so a file
# is one group that one worker runs, except the files below, whose tests are independent
# training runs of their own and are spread over both workers. The longest come first, so
# no long group starts last while the other worker idles.
_SPREAD = ("test_training.py", "test_hardening.py", "test_sampler.py")
_LONGEST_FIRST = ("test_notebook.py", "test_dim.py", "test_training.py", "test_multihost.py",
                  "test_slurm.py", "test_hardening.py", "test_evaluate.py", "test_dim_sharding.py",
                  "test_data.py", "test_vqvae.py")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
  for item in items:
    name = os.path.basename(str(item.fspath))
    if name not in _SPREAD:
      item.add_marker(pytest.mark.xdist_group(name))


def pytest_unconfigure(config):
  # The process that made the cache removes it (the xdist controller, after its workers).
  if (not hasattr(config, "workerinput")
      and os.environ.get("DIM_JAX_TEST_CACHE_OWNER") == str(os.getpid())):
    shutil.rmtree(os.environ["DIM_JAX_TEST_CACHE"], ignore_errors=True)
