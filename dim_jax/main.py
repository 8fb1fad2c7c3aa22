r"""Entry point: `python -m dim_jax.main --config configs/<name>.py --workdir DIR`.

The config names the phase (`config.phase`); any field can be overridden on the command
line (`--config.train.num_steps=200`); unknown fields are refused.
"""

import os
import runpy
import sys

# TF is only the input pipeline: keep it off accelerators (JAX owns them).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dim_jax import config_lib, errors, phases
from dim_jax.training import metric_writer

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
config_flags.DEFINE_config_file("config", None, "Run config file (get_config).",
                                 lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv, step_hooks=()):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  metric_writer.quiet_library_logs()
  logging.info("process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  try:
    phases.run(FLAGS.config, FLAGS.workdir, step_hooks=step_hooks)
  except errors.DimJaxError as error:
    # Input, config and file problems: the message says what and where; no traceback.
    if os.environ.get("DIM_JAX_TRACEBACK"):
      raise
    print(f"dim_jax: error: {error}", file=sys.stderr)
    sys.exit(1)


def parse_flags(argv):
  """absl flag parsing; an unknown `--config.x.y` field or a bad config argument is one line."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError) as error:
    cause, link = None, error
    while link is not None:  # the innermost DimJaxError (config_flags re-wraps the message)
      cause = link if isinstance(link, errors.DimJaxError) else cause
      link = link.__cause__ or link.__context__
    if cause is not None:  # e.g. `configs/dim.py:ablation=...` refused by get_config
      print(f"dim_jax: error: {cause}", file=sys.stderr)
      sys.exit(2)
    config = FLAGS["config"].value or _load_config_file(argv)
    unknown = [arg.split("=", 1)[0][len("--config."):] for arg in argv[1:]
               if arg.startswith("--config.") and config is not None
               and not _has_field(config, arg.split("=", 1)[0][len("--config."):])]
    if not unknown:
      raise
    print(f"dim_jax: error: {config_lib.unknown_field_message(config, unknown[0])}",
          file=sys.stderr)
    sys.exit(2)


def _load_config_file(argv):
  """The config named by `--config FILE[:ARG]` (for the error message only), or None."""
  spec = next((argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg[len("--config="):]
               for i, arg in enumerate(argv) if arg == "--config" or arg.startswith("--config=")),
              None)
  if not spec:
    return None
  path, _, arg = spec.partition(":")
  try:
    return runpy.run_path(path)["get_config"](*([arg] if arg else []))
  except Exception:  # pylint: disable=broad-except  # only for a better message
    return None


def _has_field(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
