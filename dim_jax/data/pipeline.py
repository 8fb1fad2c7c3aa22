"""Per-host tf.data input pipeline over the clip TFRecords (see ``records``).

Stages, in order:

1. **Host sharding.** With at least as many shard files as processes (and no host left
   without clips), each host reads the files ``files[process_index::process_count]``;
   otherwise every host reads all files and keeps records ``process_index::process_count``
   of the fixed-order record stream (more I/O, same partition). Either way every clip goes
   to exactly one host, and sharding happens before any shuffling, so hosts may use the same
   seed or different ones.
2. **Read and check** every record in-graph (``records.file_records`` and
   ``records.decode_record``); bad records fail the iterator with a message that
   ``as_numpy`` turns into ``records.RecordError``.
3. **Windows.** A clip longer than ``max_len`` frames is cut into consecutive windows of
   ``max_len`` frames, the last one shorter; if that last one would have a single frame, it
   takes one frame from its neighbour (windows ``max_len - 1`` and 2 frames). Nothing is
   dropped or truncated; each window carries the ``clip_id`` and its ``window_index``, and
   concatenating a clip's windows by ``window_index`` gives the clip back.
4. **Train only:** files are shuffled per epoch (file sharding), windows are shuffled with a
   buffer of ``shuffle_buffer``, both from ``seed`` and reshuffled every epoch
   deterministically, then the stream repeats forever (before batching, so no partial batch
   is ever dropped at an epoch end).
5. **Buckets.** Each window is zero-padded to the smallest bucket boundary >= its length,
   and windows of the same bucket are batched together: batches have one of
   ``len(bucket_boundaries)`` shapes and little padding. Train batches are always full;
   eval batches at the end of each bucket are topped up with filler rows
   (``example_mask`` False, all-zero, ``mask`` all False) to ``batch_size``.
6. ``prefetch(PREFETCH_BATCHES)``; ``deterministic=True`` options throughout, and the
   shuffle-and-repeat fusion off so an epoch is exactly one pass.

A batch (numpy, from ``as_numpy``), with b = ``batch_size`` and L the bucket length:
``speaker_motion`` / ``listener_motion`` float32 [b, L, 56], ``speaker_audio`` float32
[b, L, 768] (exactly 0 on padded frames and filler rows), ``mask`` bool [b, L] (True on
valid frames), ``length`` int32 [b] (valid frames; 0 for filler), ``example_mask`` bool [b],
``clip_id`` bytes object [b] (b"" for filler), ``window_index`` int32 [b], ``window_start`` int32
[b] (the window's first frame in its clip: clips are reassembled by placing windows there).

The iterator of the returned dataset can be saved with ``tf.train.Checkpoint(iterator=it)``.
Its checkpoint holds the buffered elements: up to ``min(shuffle_buffer, windows per epoch)``
windows (about 0.56 MB per 160-frame window), partial bucket batches and prefetched batches.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator, Optional, Sequence

import jax
import numpy as np
import tensorflow as tf

from dim_jax import errors
from dim_jax.data import normalization as normalization_lib
from dim_jax.data import records

STREAMS = tuple(records.STREAM_WIDTHS)
# Parallel file readers per host; deterministic order does not depend on it.
_MAX_INTERLEAVE = 8
# Batches prefetched. Fixed rather than AUTOTUNE: prefetched batches are part of every
# iterator checkpoint (a 32 x 160 batch is 18 MB) and of host memory.
PREFETCH_BATCHES = 2


def window_bounds(length: int, max_len: int) -> list[tuple[int, int]]:
  """(start, end) frames of the windows a clip of ``length`` frames is cut into.

  The same rule as the pipeline's in-graph windowing, for consumers that reassemble clips.
  """
  count = -(-length // max_len)
  starts = [window * max_len for window in range(count)]
  if count > 1 and length % max_len == 1:
    starts[-1] -= 1
  return list(zip(starts, starts[1:] + [length]))


def _windows(max_len: int):
  """Returns a flat_map function from a decoded clip to its dataset of windows."""

  def split(clip):
    length = clip["length"]
    count = (length + max_len - 1) // max_len
    starts = tf.range(count, dtype=tf.int32) * max_len
    # A 1-frame tail would be useless for sequence models: move the last start back by one.
    shift = tf.cast((count > 1) & (length % max_len == 1), tf.int32)
    starts = starts - shift * tf.one_hot(count - 1, count, dtype=tf.int32)
    ends = tf.concat([starts[1:], [length]], axis=0)

    def window(index):
      start, end = starts[index], ends[index]
      element = {stream: clip[stream][start:end] for stream in STREAMS}
      element["length"] = end - start
      element["clip_id"] = clip["clip_id"]
      element["window_index"] = index
      element["window_start"] = start  # first frame of the window in its clip
      return element

    windows = tf.data.Dataset.range(tf.cast(count, tf.int64))
    return windows.map(lambda index: window(tf.cast(index, tf.int32)))

  return split


def _standardize(stats: normalization_lib.Normalization):
  """Returns a map function standardising every stream of a decoded clip."""
  means = {s: tf.constant(stats.mean(s)) for s in STREAMS}
  stds = {s: tf.constant(stats.std(s)) for s in STREAMS}

  def standardize(clip):
    return {**clip, **{s: (clip[s] - means[s]) / stds[s] for s in STREAMS}}

  return standardize


def _bucket_index(boundaries: tf.Tensor, length: tf.Tensor) -> tf.Tensor:
  """Index of the smallest boundary >= length, int64 []."""
  return tf.cast(tf.searchsorted(boundaries, tf.reshape(length, [1]), side="left")[0],
                 tf.int64)


def _pad_to_bucket(boundaries: tf.Tensor):
  """Returns a map function padding one window to its bucket length with zeros."""

  def pad(element):
    length = element["length"]
    bucket_length = boundaries[_bucket_index(boundaries, length)]
    padded = dict(element)
    for stream in STREAMS:
      padded[stream] = tf.pad(element[stream], [[0, bucket_length - length], [0, 0]])
    padded["mask"] = tf.range(bucket_length) < length
    return padded

  return pad


def _fill_rows(batch_size: int):
  """Returns a map function topping a partial eval batch up with masked filler rows."""

  def fill(batch):
    rows = tf.shape(batch["length"])[0]
    missing = batch_size - rows
    filled = {}
    for key, value in batch.items():
      padding = [[0, missing]] + [[0, 0]] * (len(value.shape) - 1)
      constant = "" if value.dtype == tf.string else tf.zeros([], value.dtype)
      filled[key] = tf.pad(value, padding, constant_values=constant)
    filled["example_mask"] = tf.range(batch_size) < rows
    return filled

  return fill


def _check_arguments(batch_size: int, bucket_boundaries: Sequence[int], max_len: int,
                     process_index: int, process_count: int, shuffle_buffer: int) -> None:
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if max_len < 3:
    # Windows of max_len - 1 >= 2 frames are needed to avoid a 1-frame tail.
    raise ValueError(f"max_len must be >= 3, got {max_len}")
  boundaries = list(bucket_boundaries)
  if not boundaries or any(int(b) != b or b < 1 for b in boundaries):
    raise ValueError(f"bucket_boundaries must be positive integers, got {boundaries}")
  if any(later <= earlier for earlier, later in zip(boundaries, boundaries[1:])):
    raise ValueError(f"bucket_boundaries must be strictly ascending, got {boundaries}")
  if boundaries[-1] < max_len:
    raise ValueError(f"the last bucket boundary ({boundaries[-1]}) must be >= max_len "
                     f"({max_len}) so every window fits a bucket")
  if not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index} of "
                     f"{process_count}")
  if shuffle_buffer < 1:
    raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")


def make_dataset(data_dir: str, split: str, *, batch_size: int, train: bool, seed: int,
                 bucket_boundaries: Sequence[int], max_len: int,
                 process_index: int = 0, process_count: int = 1,
                 shuffle_buffer: int = 1024,
                 normalization: Optional[normalization_lib.Normalization] = None
                 ) -> tf.data.Dataset:
  """Builds this host's dataset of padded, length-bucketed batches (see module docstring).

  Args:
    data_dir: directory with ``dataset_info.json`` and the shards.
    split: split name, e.g. "train".
    batch_size: examples per batch on THIS host.
    train: repeat forever, shuffle, full batches; else one ordered pass with filler rows.
    seed: shuffle seed (unused when ``train`` is False).
    bucket_boundaries: strictly ascending padded lengths; the last must be >= ``max_len``.
    max_len: longest window in frames (>= 3); longer clips are split into windows.
    process_index, process_count: this host and the number of hosts.
    shuffle_buffer: windows in the shuffle buffer.
    normalization: statistics that standardise each stream per dimension (padding stays
      exactly 0, as it is added afterwards); None keeps raw features.

  Returns:
    A ``tf.data.Dataset`` of batch dicts; iterate it through ``as_numpy``.

  Raises:
    ValueError: bad arguments, or a training host that would get no clips.
    records.RecordError: missing/corrupt info file, missing split, missing or resized shard.
  """
  _check_arguments(batch_size, bucket_boundaries, max_len, process_index, process_count,
                   shuffle_buffer)
  shards = records.split_shards(data_dir, split)
  shard_files = (len(shards) >= process_count and all(
      sum(shard.num_clips for shard in shards[host::process_count]) > 0
      for host in range(process_count)))
  if shard_files:
    shards = shards[process_index::process_count]
    host_clips = sum(shard.num_clips for shard in shards)
  else:
    total = sum(shard.num_clips for shard in shards)
    host_clips = len(range(process_index, total, process_count))
  if train and host_clips == 0:
    raise ValueError(f"split {split!r} of {data_dir} has too few clips for "
                     f"{process_count} processes: process {process_index} would get none")

  files = tf.data.Dataset.from_tensor_slices(
      (tf.constant([shard.path for shard in shards], tf.string),
       tf.constant([shard.num_clips for shard in shards], tf.int64)))
  if train and shard_files:
    files = files.shuffle(len(shards), seed=seed, reshuffle_each_iteration=True)
  cycle_length = min(len(shards), _MAX_INTERLEAVE)
  if cycle_length > 1:
    dataset = files.interleave(records.file_records, cycle_length=cycle_length,
                               block_length=1, num_parallel_calls=cycle_length,
                               deterministic=True)
  else:
    dataset = files.flat_map(records.file_records)
  if not shard_files and process_count > 1:
    dataset = dataset.shard(process_count, process_index)
  dataset = dataset.map(records.decode_record, num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=True)
  if normalization is not None:
    dataset = dataset.map(_standardize(normalization), num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True)
  dataset = dataset.flat_map(_windows(max_len))
  if train:
    # A different stream than the file shuffle, so the two permutations are unrelated.
    dataset = dataset.shuffle(shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=True)
    dataset = dataset.repeat()

  boundaries = tf.constant(list(bucket_boundaries), tf.int32)
  dataset = dataset.map(_pad_to_bucket(boundaries), num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=True)
  dataset = dataset.group_by_window(
      key_func=lambda element: _bucket_index(boundaries, element["length"]),
      reduce_func=lambda key, windows: windows.batch(batch_size, drop_remainder=train),
      window_size=batch_size)
  if train:
    dataset = dataset.map(lambda batch: {
        **batch, "example_mask": tf.ones([batch_size], tf.bool)})
  else:
    dataset = dataset.map(_fill_rows(batch_size))
  dataset = dataset.prefetch(PREFETCH_BATCHES)

  options = tf.data.Options()
  options.deterministic = True
  # The fused shuffle-and-repeat fills its buffer across epoch boundaries; unfused, every
  # epoch holds each window exactly once and the buffer (and so every iterator checkpoint)
  # never exceeds one epoch of windows.
  options.experimental_optimization.shuffle_and_repeat_fusion = False
  return dataset.with_options(options)


def as_numpy(iterator: Iterator[dict[str, tf.Tensor]]) -> Iterator[dict[str, np.ndarray]]:
  """Yields the batches of a tf iterator as numpy dicts.

  Errors from the in-graph record checks and from corrupt files become
  ``records.RecordError`` with a readable message. Keep the tf iterator itself for
  checkpointing: this generator reads from it one batch at a time and buffers nothing.
  """
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError,
            tf.errors.NotFoundError) as error:
      raise records.record_error_from(error) from None
    yield {key: value.numpy() for key, value in batch.items()}


# --- what the phases read: a config's splits, written first if synthetic ------------------

def ensure_data(config) -> str:
  """Returns the data dir; writes the embedded synthetic dataset there if asked and absent."""
  data_dir = config.data.dir
  if not data_dir:
    raise errors.ConfigError("config.data.dir is empty: name a directory of dim_jax TFRecords "
                     "(or one where the synthetic dataset should be written)")
  info = os.path.join(data_dir, "dataset_info.json")
  if not os.path.exists(info):
    if not config.data.synthetic:
      raise records.RecordError(f"{info}: no dataset here (set data.synthetic=True to generate "
                                "the embedded synthetic dataset)")
    if jax.process_index() == 0:
      from dim_jax.data import synthetic  # pylint: disable=g-import-not-at-top,cyclic-import
      logging.info("writing the synthetic dataset to %s", data_dir)
      synthetic.write_synthetic_dataset(
          data_dir, seed=int(config.data.synthetic_seed),
          num_train=int(config.data.synthetic_num_train),
          num_val=int(config.data.synthetic_num_val),
          num_test=int(config.data.synthetic_num_test))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("synthetic data written")
  return data_dir


def normalization_for(config, data_dir: str) -> Optional[normalization_lib.Normalization]:
  """The statistics a run standardises with (`data.normalize`), None for raw features."""
  scope = config.data.get("normalize", "part")
  if scope == "none":
    return None
  return normalization_lib.for_dataset(data_dir).with_scope(scope)


def make_split_dataset(config, data_dir: str, split: str, *, train: bool, batch_size: int):
  return make_dataset(
      data_dir, split, batch_size=batch_size, train=train, seed=int(config.seed),
      bucket_boundaries=list(config.data.bucket_boundaries), max_len=int(config.data.max_len),
      process_index=jax.process_index(), process_count=jax.process_count(),
      shuffle_buffer=int(config.data.shuffle_buffer),
      normalization=normalization_for(config, data_dir))


def dummy_batch(batch_size: int, frames: int = 8) -> dict[str, np.ndarray]:
  return dict(
      speaker_motion=np.zeros((batch_size, frames, records.MOTION_DIM), np.float32),
      listener_motion=np.zeros((batch_size, frames, records.MOTION_DIM), np.float32),
      speaker_audio=np.zeros((batch_size, frames, records.AUDIO_DIM), np.float32),
      mask=np.ones((batch_size, frames), bool),
      length=np.full((batch_size,), frames, np.int32))
