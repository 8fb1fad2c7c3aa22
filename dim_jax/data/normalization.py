"""Per-dimension feature standardisation with statistics of a dataset's training split.

Raw EMOCA features mix scales: head pose in radians of order 0.05, expression coefficients of
order 1, HuBERT features of order 1-10. A reconstruction loss averaged over raw dimensions
spends all its capacity on the large ones (the tokenizer then drops the head), so every model
sees each stream standardised per dimension:  ``normalized = (raw - mean) / std``.

* The statistics are computed once, over every valid frame of the ``train`` split, when the
  split is written (``records.write_split``) and stored in ``dataset_info.json`` under
  ``normalization``. Older datasets get them with
  ``python -m dim_jax.data.normalization DATA_DIR``.
* The input pipeline applies them (``data.normalize=True``, the default); every checkpoint's
  metadata carries the statistics its model was trained with, and everything that leaves a
  model (generated files, metrics, plots) is mapped back to raw units with ``denormalize``.
* A dimension that is constant on the training split (std < ``MIN_STD``) is centred but not
  scaled (std 1), so a value that does vary at test time is not blown up.
* ``data.normalize=False`` keeps raw features, as the official code (official checkpoints).

``Normalization`` is a frozen, hashable value (tuples), so tasks holding it stay usable as
static jit arguments; its arrays become constants of the compiled function.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Iterable, Mapping

import numpy as np

from dim_jax import errors

STREAMS = ("speaker_motion", "listener_motion", "speaker_audio")
STATS_SPLIT = "train"
INFO_KEY = "normalization"
MIN_STD = 1e-6
# 'dimension': every dim standardised on its own. 'part': mean per dim, one std per part
# (pose, expression, audio), so the relative scale of dims inside a part survives.
SCOPES = ("part", "dimension")
PARTS = {"speaker_motion": (slice(0, 6), slice(6, 56)),
         "listener_motion": (slice(0, 6), slice(6, 56)),
         "speaker_audio": (slice(None),)}
COMMAND = "python -m dim_jax.data.normalization {data_dir}"


class NormalizationError(errors.DimJaxError):
  """Statistics missing, malformed, or different from what a model was trained with."""


@dataclasses.dataclass(frozen=True)
class Normalization:
  """Per-stream mean and std (tuples of floats, one per dimension)."""
  means: tuple[tuple[str, tuple[float, ...]], ...]
  stds: tuple[tuple[str, tuple[float, ...]], ...]
  split: str = STATS_SPLIT
  num_frames: int = 0
  scope: str = "dimension"  # what one std covers: SCOPES

  def with_scope(self, scope: str) -> "Normalization":
    """The same moments with each std pooled over `scope` ('part': pose, expression, audio).

    Pooled std = sqrt(mean of the per-dim variances over the part), exact because every dim
    of a stream has the same frames. Dims constant on the training split (std 1 by the
    `MIN_STD` rule) are left out of the pool.
    """
    if scope not in SCOPES:
      raise NormalizationError(f"data.normalize={scope!r}; expected one of {SCOPES} or 'none'")
    if scope == self.scope:
      return self
    if self.scope != "dimension":
      raise NormalizationError(f"cannot re-scope {self.scope!r} statistics to {scope!r}")
    stds = []
    for name, std in self.stds:
      std = np.asarray(std, np.float64)
      pooled = std.copy()
      for part in PARTS[name]:
        varying = std[part][std[part] != 1.0] if np.any(std[part] != 1.0) else std[part]
        pooled[part] = np.sqrt(np.mean(np.square(varying)))
      stds.append((name, tuple(float(v) for v in pooled)))
    return dataclasses.replace(self, stds=tuple(stds), scope=scope)

  def mean(self, stream: str) -> np.ndarray:
    return np.asarray(dict(self.means)[stream], np.float32)

  def std(self, stream: str) -> np.ndarray:
    return np.asarray(dict(self.stds)[stream], np.float32)

  def normalize(self, x, stream: str):
    """(raw - mean) / std; works on NumPy, JAX and TF arrays of [..., dims]."""
    return (x - self.mean(stream)) / self.std(stream)

  def denormalize(self, x, stream: str):
    """normalized * std + mean: back to raw units."""
    return x * self.std(stream) + self.mean(stream)

  def to_json(self) -> dict[str, Any]:
    return {"split": self.split, "num_frames": self.num_frames, "min_std": MIN_STD,
            "scope": self.scope,
            "streams": {name: {"mean": list(mean), "std": list(dict(self.stds)[name])}
                        for name, mean in self.means}}

  @classmethod
  def from_json(cls, value: Mapping[str, Any], where: str) -> "Normalization":
    try:
      streams = value["streams"]
      means = tuple((name, tuple(float(v) for v in streams[name]["mean"])) for name in STREAMS)
      stds = tuple((name, tuple(float(v) for v in streams[name]["std"])) for name in STREAMS)
    except (KeyError, TypeError, ValueError) as error:
      raise NormalizationError(f"{where}: field {INFO_KEY}: malformed ({error!r}); recompute "
                               f"it with `{COMMAND.format(data_dir='DATA_DIR')}`") from None
    for (name, mean), (_, std) in zip(means, stds):
      if len(mean) != len(std) or not np.all(np.isfinite(mean)) or not np.all(
          np.asarray(std) > 0):
        raise NormalizationError(f"{where}: field {INFO_KEY}.streams.{name}: mean/std must be "
                                 "finite, of equal length, with std > 0")
    return cls(means=means, stds=stds, split=str(value.get("split", STATS_SPLIT)),
               num_frames=int(value.get("num_frames", 0)),
               scope=str(value.get("scope", "dimension")))


class MomentAccumulator:
  """Streaming float64 sums of x and x^2 per stream and dimension (one pass over clips)."""

  def __init__(self):
    self.count = 0
    self.sums: dict[str, np.ndarray] = {}
    self.squares: dict[str, np.ndarray] = {}

  def add(self, clip: Mapping[str, Any]) -> None:
    for stream in STREAMS:
      values = np.asarray(clip[stream], np.float64)
      self.sums[stream] = self.sums.get(stream, 0.0) + values.sum(axis=0)
      self.squares[stream] = self.squares.get(stream, 0.0) + np.square(values).sum(axis=0)
    self.count += int(np.asarray(clip[STREAMS[0]]).shape[0])

  def result(self, split: str = STATS_SPLIT) -> Normalization:
    if not self.count:
      raise NormalizationError("no frames to compute normalization statistics from")
    means, stds = [], []
    for stream in STREAMS:
      mean = self.sums[stream] / self.count
      variance = np.maximum(self.squares[stream] / self.count - mean**2, 0.0)
      std = np.sqrt(variance)
      std = np.where(std < MIN_STD, 1.0, std)
      means.append((stream, tuple(float(v) for v in mean)))
      stds.append((stream, tuple(float(v) for v in std)))
    return Normalization(means=tuple(means), stds=tuple(stds), split=split,
                         num_frames=self.count)


def compute(clips: Iterable[Mapping[str, Any]], split: str = STATS_SPLIT) -> Normalization:
  accumulator = MomentAccumulator()
  for clip in clips:
    accumulator.add(clip)
  return accumulator.result(split)


def from_info(info: Mapping[str, Any], data_dir: str) -> Normalization:
  """The dataset's statistics; a clear error naming the command when it has none."""
  where = os.path.join(data_dir, "dataset_info.json")
  if INFO_KEY not in info:
    raise NormalizationError(
        f"{where}: no normalization statistics (datasets written before they existed). Add "
        f"them with `{COMMAND.format(data_dir=data_dir)}`, or set data.normalize='none' to "
        "train on raw features")
  return Normalization.from_json(info[INFO_KEY], where)


def for_dataset(data_dir: str) -> Normalization:
  from dim_jax.data import records  # pylint: disable=g-import-not-at-top
  return from_info(records.read_info(data_dir), data_dir)


def from_meta(meta: Mapping[str, Any], where: str) -> Normalization | None:
  """The statistics a checkpoint's model was trained with (None: raw features)."""
  value = meta.get(INFO_KEY)
  return None if value is None else Normalization.from_json(value, where)


def to_meta(stats: Normalization | None) -> dict[str, Any] | None:
  return None if stats is None else stats.to_json()


def same(a: Normalization | None, b: Normalization | None, stream: str) -> bool:
  """Do two statistics treat `stream` identically (both raw, or equal mean and std)?"""
  if a is None or b is None:
    return a is None and b is None
  return (np.array_equal(a.mean(stream), b.mean(stream))
          and np.array_equal(a.std(stream), b.std(stream)))


def add_to_dataset(data_dir: str) -> Normalization:
  """Computes the training split's statistics and writes them into dataset_info.json."""
  from dim_jax import files  # pylint: disable=g-import-not-at-top
  from dim_jax.data import records  # pylint: disable=g-import-not-at-top
  info = records.read_info(data_dir)
  if STATS_SPLIT not in info["splits"]:
    raise NormalizationError(f"{data_dir}: no {STATS_SPLIT!r} split to compute statistics "
                             f"from; the dataset has {sorted(info['splits'])}")
  stats = compute(records.read_clips(data_dir, STATS_SPLIT))
  info[INFO_KEY] = stats.to_json()
  files.write_text_atomic(os.path.join(data_dir, records.INFO_FILENAME),
                          json.dumps(info, indent=2, sort_keys=True) + "\n")
  return stats


def main(argv: list[str]) -> int:
  if len(argv) != 2 or argv[1].startswith("-"):
    print(f"usage: {COMMAND.format(data_dir='DATA_DIR')}\n  adds per-dimension mean/std of the "
          "train split to DATA_DIR/dataset_info.json", file=sys.stderr)
    return 2
  try:
    stats = add_to_dataset(argv[1])
  except errors.DimJaxError as error:
    print(f"dim_jax: error: {error}", file=sys.stderr)
    return 1
  print(f"{argv[1]}: normalization statistics of {stats.num_frames} {STATS_SPLIT} frames "
        "written to dataset_info.json")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
