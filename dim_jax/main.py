r"""Entry point: `python -m dim_jax.main --config configs/<name>.py --workdir DIR`.

The config names the phase (`config.phase`); any field can be overridden on the command
line (`--config.train.num_steps=200`); unknown fields are refused.
"""

import os

# TF is only the input pipeline: keep it off accelerators (JAX owns them).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dim_jax import phases
from dim_jax.training import metric_writer

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
config_flags.DEFINE_config_file("config", None, "Run config file (get_config).",
                                 lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  metric_writer.quiet_library_logs()
  logging.info("process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  phases.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
