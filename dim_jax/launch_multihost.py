r"""Multi-process entry: `jax.distributed.initialize`, then the same `dim_jax.main`.

With no flags, `jax.distributed.initialize()` discovers the cluster (TPU pods, SLURM).
`--coordinator/--num_processes/--process_id` set it by hand (local simulation). CPU
collectives use gloo either way. Everything after is `dim_jax.main`'s flags.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax

flags.DEFINE_string("coordinator", None, "host:port of process 0 (None: auto-detect).")
flags.DEFINE_integer("num_processes", None, "Number of processes (None: auto-detect).")
flags.DEFINE_integer("process_id", None, "This process's index (None: auto-detect).")
FLAGS = flags.FLAGS

from dim_jax import main as dim_main  # pylint: disable=g-import-not-at-top,wrong-import-position


def run(argv):
  # Every run of this entry is multi-process: CPU collectives go through gloo (recent jax's
  # default; explicit for older ones), also when SLURM is auto-detected. Set before
  # initialize(): touching the backend first would pin a single-process runtime.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if FLAGS.coordinator:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  else:
    jax.distributed.initialize()
  dim_main.main(argv)


if __name__ == "__main__":
  app.run(run, flags_parser=dim_main.parse_flags)
