"""Metrics to a JSON-lines log and TensorBoard event files (process 0 only), plus a progress bar."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Mapping, Optional

import jax
import numpy as np


class MetricWriter:
  """Writes `{"step": s, "name": value, ...}` lines to `<workdir>/metrics.jsonl` and TensorBoard."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.active:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
    with open(self.path, "a", encoding="utf-8") as log:
      log.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
    if self._tb is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with self._tb.as_default(step=int(step)):
        for name, value in scalars.items():
          tf.summary.scalar(name, value)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class _DropLibraryInfo(logging.Filter):
  """Orbax logs every save stage at INFO; keep its real warnings, drop the chatter."""

  # Read-only managers (phase chaining reads earlier checkpoints) announce their options.
  _EXPECTED = ("read_only=True", "Given directory is read only")

  def filter(self, record: logging.LogRecord) -> bool:
    if "/orbax/" not in record.pathname:
      return True
    if record.levelno == logging.WARNING and any(m in str(record.msg) for m in self._EXPECTED):
      return False
    return record.levelno >= logging.WARNING


def quiet_library_logs() -> None:
  """Installs the filter on the absl handler (call once from entry points)."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as log:
    return [json.loads(line) for line in log if line.strip()]


def progress_bar(total: int, initial: int, desc: str):
  """tqdm with steps/s and ETA on a terminal; silent in CI or when not a TTY."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  quiet = (not sys.stderr.isatty()) or bool(os.environ.get("CI")) or jax.process_index() > 0
  return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=quiet,
              dynamic_ncols=True)


def summarize(metric_list: list[Mapping[str, np.ndarray]]) -> Optional[dict]:
  if not metric_list:
    return None
  keys = metric_list[0].keys()
  return {k: float(np.mean([np.asarray(m[k]) for m in metric_list])) for k in keys}
