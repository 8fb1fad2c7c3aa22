r"""`dim_jax.main` with a step hook that signals this process: test-only, not in the loop.

    python tests/helpers/signal_at_step.py --signal_step=4 --signal=KILL [dim_jax.main flags]

KILL waits until the step's checkpoint is committed, then dies like a killed job; TERM sends
SIGTERM (a preemption notice) after that step. With --coordinator/--num_processes/
--process_id the process joins a local jax.distributed run first (gloo CPU collectives).
"""

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from dim_jax import main as dim_main  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_integer("signal_step", -1, "Step after which the signal is sent.")
flags.DEFINE_enum("signal", "KILL", ["KILL", "TERM"], "Signal to send to this process.")
flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process's index.")
FLAGS = flags.FLAGS


def hook(step, checkpointer):
  if step != FLAGS.signal_step:
    return
  if FLAGS.signal == "KILL":
    checkpointer.wait()
    os.kill(os.getpid(), signal.SIGKILL)
  else:
    os.kill(os.getpid(), signal.SIGTERM)


def run(argv):
  if FLAGS.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  dim_main.main(argv, step_hooks=(hook,))


if __name__ == "__main__":
  app.run(run, flags_parser=dim_main.parse_flags)
