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
4. **Train only:** epoch ``e`` is its own pass over this host's files: the files are
   permuted and the windows shuffled with a buffer of ``shuffle_buffer``, both seeded by
   ``(seed, e)`` alone (stateless ops and fixed per-epoch shuffle seeds), and the passes
   ``e = 0, 1, ...`` follow each other forever (before batching, so no partial batch is ever
   dropped at an epoch end, and an epoch is exactly one pass).
5. **Buckets.** Each window is zero-padded to the smallest bucket boundary >= its length,
   and windows of the same bucket are batched together: batches have one of
   ``len(bucket_boundaries)`` shapes and little padding. Train batches are always full;
   eval batches at the end of each bucket are topped up with filler rows
   (``example_mask`` False, all-zero, ``mask`` all False) to ``batch_size``.
6. ``prefetch(PREFETCH_BATCHES)``; ``deterministic=True`` options throughout.

A batch (numpy, from ``as_numpy``), with b = ``batch_size`` and L the bucket length:
``speaker_motion`` / ``listener_motion`` float32 [b, L, 56], ``speaker_audio`` float32
[b, L, 768] (exactly 0 on padded frames and filler rows), ``mask`` bool [b, L] (True on
valid frames), ``length`` int32 [b] (valid frames; 0 for filler), ``example_mask`` bool [b],
``clip_id`` bytes object [b] (b"" for filler), ``window_index`` int32 [b], ``window_start`` int32
[b] (the window's first frame in its clip: clips are reassembled by placing windows there).

The iterator of the returned dataset can be saved with ``tf.train.Checkpoint(iterator=it)``
and restored into a freshly built dataset of the same arguments: the stream then continues
exactly, across any number of epoch boundaries. The checkpoint holds counters (the epoch, the
position in it) and the buffered elements: up to ``min(shuffle_buffer, windows per epoch)``
windows (about 0.9 MB per 256-frame window), partial bucket batches and prefetched batches.
It needs no random-generator state, as every epoch's order is a function of ``(seed, epoch)``
(reshuffling ``shuffle`` + ``repeat`` kept the next epoch's order in seed generators that the
checkpoint lost once the window shuffle had drained the epoch's files: restored iterators
diverged at the next epoch boundary).
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
# Where clips come from: our TFRecords, or the same clips as a tfds dataset (tfds_dataset).
SOURCES = ("records", "tfds")
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


def _epoch_keys(seed: int, epoch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(file-order key, window-order key) of training epoch ``epoch``, stateless seeds [2].

  Functions of ``(seed, epoch)`` only (Philox), so a restored iterator recomputes them and
  its checkpoint needs no random-generator state.
  """
  epoch_key = tf.random.experimental.stateless_fold_in(
      tf.constant([seed, 0], tf.int64), tf.cast(epoch, tf.int64), alg="philox")
  # Two independent streams, so the file permutation and the window order are unrelated.
  # (Which is which is arbitrary; tests/test_slurm.py needs seed 0 to read shard 0 of two
  # first in epoch 0, as this order draws.)
  window_key, file_key = tf.unstack(
      tf.random.experimental.stateless_split(epoch_key, 2, alg="philox"))
  return file_key, window_key


def _shuffle_with_key(windows: tf.data.Dataset, buffer_size: int,
                      key: tf.Tensor) -> tf.data.Dataset:
  """``windows.shuffle(buffer_size)`` with its seeds drawn statelessly from ``key`` [2].

  Built from the ``ShuffleDataset`` op, whose seeds are plain tensors: ``Dataset.shuffle``
  inside a function (here the per-epoch one) adds a seed-generator resource that iterator
  checkpoints refuse to save ("DummySeedGenerator is stateful"). The shuffle's position is
  saved with its buffer, so a restored epoch continues exactly.
  """
  seeds = tf.random.stateless_uniform([2], seed=key, minval=1, maxval=2**62, dtype=tf.int64,
                                      alg="philox")
  specs = tf.nest.flatten(windows.element_spec)
  shuffled = tf.raw_ops.ShuffleDataset(
      input_dataset=tf.data.experimental.to_variant(windows),
      buffer_size=tf.constant(buffer_size, tf.int64),
      # Never both 0: the op would then seed itself at random.
      seed=seeds[0], seed2=seeds[1], reshuffle_each_iteration=False,
      output_types=[spec.dtype for spec in specs],
      output_shapes=[spec.shape for spec in specs])
  return tf.data.experimental.from_variant(shuffled, windows.element_spec)


def _record_clips(shards: Sequence[records.Shard], *, file_order_key: Optional[tf.Tensor],
                  record_shard: Optional[tuple[int, int]]) -> tf.data.Dataset:
  """Clip source over dim_jax TFRecords: shard files -> checked records -> decoded clips.

  Args:
    shards: the files to read (this host's, see ``make_dataset``).
    file_order_key: stateless seed [2] of a permutation of ``shards``; None reads them in
      the given order.
    record_shard: ``(count, index)``: keep records ``index::count`` of the fixed-order record
      stream (before decoding, so other hosts' records cost no decode); None keeps all.

  Returns:
    Dataset of decoded clips (``records.decode_record``).
  """
  paths = tf.constant([shard.path for shard in shards], tf.string)
  num_clips = tf.constant([shard.num_clips for shard in shards], tf.int64)
  if file_order_key is not None:
    order = tf.random.experimental.stateless_shuffle(tf.range(len(shards)), file_order_key,
                                                     alg="philox")
    paths, num_clips = tf.gather(paths, order), tf.gather(num_clips, order)
  files = tf.data.Dataset.from_tensor_slices((paths, num_clips))
  cycle_length = min(len(shards), _MAX_INTERLEAVE)
  if cycle_length > 1:
    dataset = files.interleave(records.file_records, cycle_length=cycle_length,
                               block_length=1, num_parallel_calls=cycle_length,
                               deterministic=True)
  else:
    dataset = files.flat_map(records.file_records)
  if record_shard is not None:
    dataset = dataset.shard(*record_shard)
  return dataset.map(records.decode_record, num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=True)


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
                 normalization: Optional[normalization_lib.Normalization] = None,
                 source: str = "records") -> tf.data.Dataset:
  """Builds this host's dataset of padded, length-bucketed batches (see module docstring).

  Args:
    data_dir: directory with ``dataset_info.json`` and the shards (``source="records"``),
      or a prepared tfds dataset (``source="tfds"``, see ``tfds_dataset.load_builder``).
    split: split name, e.g. "train".
    batch_size: examples per batch on THIS host.
    train: shuffled epochs forever, full batches; else one ordered pass with filler rows.
    seed: seed of every epoch's file order and window shuffle (unused when ``train`` is
      False).
    bucket_boundaries: strictly ascending padded lengths; the last must be >= ``max_len``.
    max_len: longest window in frames (>= 3); longer clips are split into windows.
    process_index, process_count: this host and the number of hosts.
    shuffle_buffer: windows in the shuffle buffer.
    normalization: statistics that standardise each stream per dimension (padding stays
      exactly 0, as it is added afterwards); None keeps raw features.
    source: "records" (our TFRecords) or "tfds" (``tfds_dataset.DimClips``: the same clips,
      the same host partition; its files are read in their stored order every epoch, the
      windows shuffled per epoch as for records).

  Returns:
    A ``tf.data.Dataset`` of batch dicts; iterate it through ``as_numpy``.

  Raises:
    ValueError: bad arguments, or a training host that would get no clips.
    records.RecordError: missing/corrupt info file, missing split, missing or resized shard.
  """
  _check_arguments(batch_size, bucket_boundaries, max_len, process_index, process_count,
                   shuffle_buffer)
  if source not in SOURCES:
    raise ValueError(f"data.source={source!r}; expected one of {SOURCES}")
  if source == "tfds":
    from dim_jax.data import tfds_dataset  # pylint: disable=g-import-not-at-top
    partition = tfds_dataset.host_partition(data_dir, split, process_index=process_index,
                                            process_count=process_count)
    shards, shard_files, host_clips = [], False, partition.num_clips
  else:
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

  record_shard = ((process_count, process_index) if not shard_files and process_count > 1
                  else None)

  def windows_of_one_pass(epoch: Optional[tf.Tensor] = None) -> tf.data.Dataset:
    """This host's windows, one pass; training passes are ordered by ``(seed, epoch)``."""
    file_key = window_key = None
    if epoch is not None:
      file_key, window_key = _epoch_keys(seed, epoch)
    if source == "tfds":
      clips = tfds_dataset.clip_dataset(data_dir, split, process_index=process_index,
                                        process_count=process_count)
    else:
      clips = _record_clips(shards, file_order_key=file_key if shard_files else None,
                            record_shard=record_shard)
    if normalization is not None:
      clips = clips.map(_standardize(normalization), num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=True)
    windows = clips.flat_map(_windows(max_len))
    if epoch is not None:
      windows = _shuffle_with_key(windows, shuffle_buffer, window_key)
    return windows

  if train:
    # Epochs 0, 1, 2, ... forever; the counter is part of every iterator checkpoint.
    dataset = tf.data.Dataset.counter().flat_map(windows_of_one_pass)
  else:
    dataset = windows_of_one_pass()

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

# The splits each phase reads, and what for (named in errors).
_TRAINING_SPLITS = {"train": "training", "val": "validation"}


def phase_splits(config) -> dict[str, str]:
  """{split: what the phase reads it for} of ``config.phase``."""
  phase = config.get("phase", "")
  if phase in ("vq", "pretrain", "finetune_listener", "finetune_speaker"):
    return dict(_TRAINING_SPLITS)
  if phase == "generate":
    return {config.generate.split: "generation"}
  if phase == "evaluate":
    return {config.evaluate.split: "evaluation",
            config.evaluate.train_split: "the baselines"}
  return {}


# TFRecord framing alone takes 16 bytes per record (length, CRCs).
_MIN_RECORD_BYTES = 16


def check_splits(data_dir: str, splits: dict[str, str], phase: str = "") -> None:
  """Checks that every split in ``splits`` is listed, has all its shards and some clips.

  One ``stat`` per shard (``records.split_shards``), so a phase fails before its first step
  instead of when it first reads a split (validation, the baselines of ``evaluate``).

  Args:
    data_dir: the dataset.
    splits: {split: what it is read for}, e.g. ``phase_splits(config)``.
    phase: the phase that reads them, for the messages.

  Raises:
    records.RecordError: naming the data dir or shard file, the split and what is wrong.
  """
  info_path = os.path.join(data_dir, records.INFO_FILENAME)
  for split, purpose in splits.items():
    reader = f"phase {phase} reads it for {purpose}" if phase else f"read for {purpose}"
    try:
      shards = records.split_shards(data_dir, split)
    except records.RecordError as error:
      raise records.RecordError(f"{error}; {reader}") from None
    if sum(shard.num_clips for shard in shards) == 0:
      raise records.RecordError(
          f"{data_dir}: split {split!r} has no clips ({len(shards)} shard file(s) listed in "
          f"{info_path}, all with 0 clips); {reader}")
    for shard in shards:
      if shard.num_bytes < _MIN_RECORD_BYTES * shard.num_clips:
        raise records.RecordError(
            f"{shard.path}: {shard.num_bytes} bytes cannot hold the {shard.num_clips} clip(s) "
            f"that {info_path} lists for split {split!r} (a record takes at least "
            f"{_MIN_RECORD_BYTES} bytes): the shard is empty or truncated; {reader}")


def ensure_data(config) -> str:
  """Returns the data dir of ``config``, every split its phase reads checked.

  With ``data.synthetic`` and no ``dataset_info.json`` there, first writes the embedded
  synthetic dataset (only into an empty or new directory: ``synthetic.check_target_dir``).
  """
  data_dir = config.data.dir
  if not data_dir:
    raise errors.ConfigError("config.data.dir is empty: name a directory of dim_jax TFRecords "
                     "(or one where the synthetic dataset should be written)")
  if _source(config) == "tfds":
    _check_tfds_splits(data_dir, phase_splits(config), config.get("phase", ""))
    return data_dir
  info = os.path.join(data_dir, "dataset_info.json")
  if not os.path.exists(info):
    if not config.data.synthetic:
      raise records.RecordError(f"{info}: no dataset here (set data.synthetic=True to generate "
                                "the embedded synthetic dataset)")
    from dim_jax.data import synthetic  # pylint: disable=g-import-not-at-top,cyclic-import
    # Every process checks before any writes, so a refusal stops all of them alike.
    synthetic.check_target_dir(data_dir)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("synthetic data dir checked")
    if jax.process_index() == 0:
      logging.info("writing the synthetic dataset to %s", data_dir)
      synthetic.write_synthetic_dataset(
          data_dir, seed=int(config.data.synthetic_seed),
          num_train=int(config.data.synthetic_num_train),
          num_val=int(config.data.synthetic_num_val),
          num_test=int(config.data.synthetic_num_test))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("synthetic data written")
  check_splits(data_dir, phase_splits(config), config.get("phase", ""))
  return data_dir


def _source(config) -> str:
  source = config.data.get("source", "records")
  if source not in SOURCES:
    raise errors.ConfigError(f"data.source={source!r}; expected one of {SOURCES}")
  return source


def _check_tfds_splits(data_dir: str, splits: dict[str, str], phase: str) -> None:
  """``check_splits`` for a tfds dataset: every split there, with clips."""
  from dim_jax.data import tfds_dataset  # pylint: disable=g-import-not-at-top
  for split, purpose in splits.items():
    reader = f"phase {phase} reads it for {purpose}" if phase else f"read for {purpose}"
    try:
      clips = tfds_dataset.host_partition(data_dir, split).num_clips
    except (records.RecordError, ValueError) as error:
      raise records.RecordError(f"{error}; {reader}") from None
    if clips == 0:
      raise records.RecordError(f"{data_dir}: tfds split {split!r} has no clips; {reader}")


def normalization_for(config, data_dir: str) -> Optional[normalization_lib.Normalization]:
  """The statistics a run standardises with (`data.normalize`), None for raw features."""
  scope = config.data.get("normalize", "part")
  if scope == "none":
    return None
  if _source(config) == "tfds":
    from dim_jax.data import tfds_dataset  # pylint: disable=g-import-not-at-top
    return tfds_dataset.read_normalization(data_dir).with_scope(scope)
  return normalization_lib.for_dataset(data_dir).with_scope(scope)


def read_split_clips(config, data_dir: str, split: str) -> list[dict]:
  """A whole split as clip dicts (`records.read_clips`' form), from either source."""
  if _source(config) == "tfds":
    from dim_jax.data import tfds_dataset  # pylint: disable=g-import-not-at-top
    return tfds_dataset.read_clips(data_dir, split)
  return records.read_clips(data_dir, split)


def make_split_dataset(config, data_dir: str, split: str, *, train: bool, batch_size: int):
  return make_dataset(
      data_dir, split, batch_size=batch_size, train=train, seed=int(config.seed),
      bucket_boundaries=list(config.data.bucket_boundaries), max_len=int(config.data.max_len),
      process_index=jax.process_index(), process_count=jax.process_count(),
      shuffle_buffer=int(config.data.shuffle_buffer),
      normalization=normalization_for(config, data_dir), source=_source(config))


def dummy_batch(batch_size: int, frames: int = 8) -> dict[str, np.ndarray]:
  return dict(
      speaker_motion=np.zeros((batch_size, frames, records.MOTION_DIM), np.float32),
      listener_motion=np.zeros((batch_size, frames, records.MOTION_DIM), np.float32),
      speaker_audio=np.zeros((batch_size, frames, records.AUDIO_DIM), np.float32),
      mask=np.ones((batch_size, frames), bool),
      length=np.full((batch_size,), frames, np.int32))
