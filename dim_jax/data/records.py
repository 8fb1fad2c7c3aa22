"""Versioned TFRecord schema for dyadic clips: writer, eager reader and in-graph parser.

One ``tf.train.Example`` per clip (schema version ``SCHEMA_VERSION``):

  =============== ====== ==================================================
  feature         type   content
  =============== ====== ==================================================
  schema_version  int64  ``SCHEMA_VERSION``
  clip_id         bytes  UTF-8, non-empty, unique within a split
  speaker_id      bytes  UTF-8
  listener_id     bytes  UTF-8
  session_id      bytes  UTF-8
  fps             float  frame rate (> 0)
  length          int64  number of frames T (>= 2)
  speaker_motion  bytes  T x 56 float32, raw little-endian, row-major
  listener_motion bytes  T x 56 float32, raw little-endian, row-major
  speaker_audio   bytes  T x 768 float32, raw little-endian, row-major
  =============== ====== ==================================================

The float streams are raw bytes, not ``float_list``: T varies, so a float_list would have to
be parsed as a ``VarLenFeature`` (a sparse tensor, then densified), while a bytes feature
parses as one scalar string and ``tf.io.decode_raw`` turns it into floats with a memcpy.

Files: ``<data_dir>/<split>-<shard:05d>-of-<num_shards:05d>.tfrecord`` plus
``<data_dir>/dataset_info.json`` (see ``docs/records.md``), which is the authority on what a
split contains: readers never glob. Each shard and the info file are written under a temporary
name in the same directory and renamed into place, the info file last, so a crashed or failed
write never leaves something that looks complete.

Every problem with the data raises ``RecordError`` naming the file (and the record index and
clip_id when known), the field, and what is wrong. Reading checks the records inside the
tf.data graph (no ``tf.py_function``, so iterator state stays checkpointable); in-graph
failures surface as ``tf.errors.InvalidArgumentError`` whose message holds the text between
``@@ `` markers, which ``record_error_from`` turns back into a ``RecordError``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from typing import Any, Iterable, Mapping

import numpy as np
import tensorflow as tf

from dim_jax import errors, files
from dim_jax.data import normalization

SCHEMA_VERSION = 1
POSE_DIM = 6
EXPRESSION_DIM = 50
MOTION_DIM = POSE_DIM + EXPRESSION_DIM
AUDIO_DIM = 768
MIN_FRAMES = 2

INFO_FILENAME = "dataset_info.json"
FLOAT_ENCODING = "raw little-endian float32 bytes, row-major [length, width]"

# Width of every per-frame float stream, in the order they are checked.
STREAM_WIDTHS: dict[str, int] = {
    "speaker_motion": MOTION_DIM,
    "listener_motion": MOTION_DIM,
    "speaker_audio": AUDIO_DIM,
}
ID_FIELDS = ("clip_id", "speaker_id", "listener_id", "session_id")
REQUIRED_CLIP_KEYS = (*STREAM_WIDTHS, *ID_FIELDS, "fps")

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_.]+$")
# Marks the human-readable part of an in-graph assertion message.
_MARK = "@@"
_MESSAGE = re.compile(re.escape(_MARK) + r" (.*?) " + re.escape(_MARK), re.DOTALL)


class RecordError(errors.DimJaxError, ValueError):
  """Bad data on disk or handed to the writer; the message says where and what."""


def shard_filename(split: str, shard: int, num_shards: int) -> str:
  """Base name of shard ``shard`` of ``num_shards`` of ``split``."""
  return f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord"


def _check_split_name(split: str) -> None:
  # Split names become file names: refuse separators and glob characters.
  if not isinstance(split, str) or not _SPLIT_NAME.match(split):
    raise ValueError(f"split name must match {_SPLIT_NAME.pattern}, got {split!r}")


# --------------------------------------------------------------------------------------
# Writer side.
# --------------------------------------------------------------------------------------


def _checked_streams(clip: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
  """Validates a clip and returns its float streams as float32 [T, width] arrays."""
  if not isinstance(clip, Mapping):
    raise RecordError(f"{where}: a clip must be a dict, got {type(clip).__name__}")
  missing = [key for key in REQUIRED_CLIP_KEYS if key not in clip]
  if missing:
    raise RecordError(f"{where}: missing field(s) {', '.join(missing)}; a clip needs "
                      f"{', '.join(REQUIRED_CLIP_KEYS)}")
  for field in ID_FIELDS:
    if not isinstance(clip[field], str):
      raise RecordError(f"{where}: field {field}: must be a str, got "
                        f"{type(clip[field]).__name__}")
  if not clip["clip_id"]:
    raise RecordError(f"{where}: field clip_id: must not be empty")
  where = f"{where} (clip_id {clip['clip_id']!r})"
  try:
    fps = float(clip["fps"])
  except (TypeError, ValueError):
    raise RecordError(f"{where}: field fps: not a number: {clip['fps']!r}") from None
  if not (math.isfinite(fps) and fps > 0):
    raise RecordError(f"{where}: field fps: {fps} is not a positive finite frame rate")

  streams = {}
  for field, width in STREAM_WIDTHS.items():
    raw = np.asarray(clip[field])
    if raw.dtype == np.bool_ or not np.issubdtype(raw.dtype, np.number):
      raise RecordError(f"{where}: field {field}: expected a float array, got dtype "
                        f"{raw.dtype}")
    if raw.ndim != 2:
      raise RecordError(f"{where}: field {field}: expected shape [frames, {width}], got "
                        f"{raw.shape}")
    if raw.shape[1] != width:
      raise RecordError(f"{where}: field {field}: feature width {raw.shape[1]}, expected "
                        f"{width} (shape {raw.shape})")
    if raw.shape[0] < MIN_FRAMES:
      raise RecordError(f"{where}: field {field}: {raw.shape[0]} frame(s); a clip needs at "
                        f"least {MIN_FRAMES}")
    # Check after the float32 cast: float64 values beyond float32 range become Inf there.
    values = raw.astype(np.float32)
    bad_frames = ~np.isfinite(values).all(axis=1)
    if bad_frames.any():
      first = int(np.argmax(bad_frames))
      kind = "NaN" if np.isnan(values[first]).any() else "Inf"
      raise RecordError(f"{where}: field {field}: {kind} at frame {first} (first non-finite "
                        f"frame; {int(bad_frames.sum())} non-finite frame(s) in total)")
    streams[field] = values

  lengths = {field: array.shape[0] for field, array in streams.items()}
  if len(set(lengths.values())) > 1:
    listing = ", ".join(f"{field} {n}" for field, n in lengths.items())
    raise RecordError(f"{where}: streams have different frame counts ({listing}); every "
                      f"stream of a clip must have one row per frame")
  return streams


def validate_clip(clip: Mapping[str, Any], where: str) -> None:
  """Raises ``RecordError`` unless ``clip`` can be written.

  Args:
    clip: dict with ``speaker_motion`` [T, 56], ``listener_motion`` [T, 56],
      ``speaker_audio`` [T, 768] (float arrays), ``clip_id`` (non-empty str),
      ``speaker_id``, ``listener_id``, ``session_id`` (str) and ``fps`` (positive float).
      Other keys are ignored.
    where: prefix of the error message, e.g. the destination file and clip index.

  Raises:
    RecordError: missing key, wrong feature width, fewer than 2 frames, NaN or Inf (naming
      the stream and the first bad frame), or streams of different lengths.
  """
  _checked_streams(clip, where)


def _bytes_feature(value: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int_feature(value: int) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def _serialize(clip: Mapping[str, Any], streams: Mapping[str, np.ndarray]) -> bytes:
  """Serializes a validated clip to a ``tf.train.Example``."""
  feature = {
      "schema_version": _int_feature(SCHEMA_VERSION),
      "fps": tf.train.Feature(float_list=tf.train.FloatList(value=[float(clip["fps"])])),
      "length": _int_feature(next(iter(streams.values())).shape[0]),
  }
  for field in ID_FIELDS:
    feature[field] = _bytes_feature(clip[field].encode("utf-8"))
  for field, values in streams.items():
    feature[field] = _bytes_feature(values.astype("<f4", copy=False).tobytes(order="C"))
  example = tf.train.Example(features=tf.train.Features(feature=feature))
  # Sorted map keys: the same clip gives the same bytes in every process (the default map
  # order depends on a per-process hash seed), so shards are reproducible bit for bit.
  return example.SerializeToString(deterministic=True)


def _fsync(path: str) -> None:
  # Rename is only atomic for durable contents: flush the data before the rename.
  with open(path, "rb") as handle:
    os.fsync(handle.fileno())


def write_split(data_dir: str, split: str, clips: Iterable[Mapping[str, Any]],
                num_shards: int = 1) -> dict[str, Any]:
  """Validates and writes one split, then records it in ``dataset_info.json``.

  Clips are dealt round-robin over the shards (clip i goes to shard i % num_shards) and
  streamed, so ``clips`` may be a generator larger than memory. An existing split of the same
  name is replaced in the info file (other splits are kept).

  Args:
    data_dir: output directory (created if needed).
    split: split name, e.g. "train" (letters, digits, ``_`` and ``.``).
    clips: clip dicts, see ``validate_clip``.
    num_shards: number of shard files (>= 1); shards may end up empty if there are fewer
      clips than shards.

  Returns:
    The split's entry of the info file: ``num_clips``, ``num_frames``, ``fps`` (sorted
    distinct values) and ``shards`` (``file``, ``num_clips``, ``num_frames``, ``num_bytes``).

  Raises:
    RecordError: a clip is invalid (nothing of this call is left on disk: temporary files
      are removed and no shard gets its final name), the split is empty, a clip_id repeats,
      or the existing info file is unreadable.
  """
  _check_split_name(split)
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  os.makedirs(data_dir, exist_ok=True)
  info_path = os.path.join(data_dir, INFO_FILENAME)
  # Fail before writing gigabytes if the existing info file cannot be merged into.
  info = read_info(data_dir) if os.path.exists(info_path) else None

  names = [shard_filename(split, shard, num_shards) for shard in range(num_shards)]
  temps: list[str] = []
  writers: list[tf.io.TFRecordWriter] = []
  try:
    for name in names:
      descriptor, temp = tempfile.mkstemp(dir=data_dir, prefix=f".{name}.", suffix=".tmp")
      os.close(descriptor)
      temps.append(temp)
      writers.append(tf.io.TFRecordWriter(temp))
    shard_clips = [0] * num_shards
    shard_frames = [0] * num_shards
    seen_ids: set[str] = set()
    fps_values: set[float] = set()
    # The training split's per-dimension moments become the dataset's normalization.
    moments = normalization.MomentAccumulator() if split == normalization.STATS_SPLIT else None
    count = 0
    for index, clip in enumerate(clips):
      shard = index % num_shards
      where = f"{os.path.join(data_dir, names[shard])} clip #{index}"
      streams = _checked_streams(clip, where)
      if clip["clip_id"] in seen_ids:
        raise RecordError(f"{where}: field clip_id: {clip['clip_id']!r} repeats; clip ids "
                          f"must be unique within a split")
      seen_ids.add(clip["clip_id"])
      fps_values.add(float(np.float32(clip["fps"])))
      writers[shard].write(_serialize(clip, streams))
      if moments is not None:
        moments.add(streams)
      shard_clips[shard] += 1
      shard_frames[shard] += next(iter(streams.values())).shape[0]
      count = index + 1
    if count == 0:
      raise RecordError(f"{data_dir}: split {split!r}: no clips to write")
    for writer in writers:
      writer.close()
    shards = []
    for shard, (name, temp) in enumerate(zip(names, temps)):
      _fsync(temp)
      shards.append({"file": name, "num_clips": shard_clips[shard],
                     "num_frames": shard_frames[shard], "num_bytes": os.path.getsize(temp)})
    for name, temp in zip(names, temps):
      os.replace(temp, os.path.join(data_dir, name))
  except BaseException:
    for writer in writers:
      writer.close()
    for temp in temps:
      if os.path.exists(temp):
        os.remove(temp)
    raise

  entry = {"num_clips": count, "num_frames": sum(shard_frames),
           "fps": sorted(fps_values), "shards": shards}
  if info is None:
    info = {"schema_version": SCHEMA_VERSION, "float_encoding": FLOAT_ENCODING,
            "dims": {"motion": MOTION_DIM, "pose": POSE_DIM, "expression": EXPRESSION_DIM,
                     "audio": AUDIO_DIM},
            "splits": {}}
  info["splits"][split] = entry
  if moments is not None:
    info[normalization.INFO_KEY] = moments.result(split).to_json()
  all_fps = {fps for split_info in info["splits"].values() for fps in split_info["fps"]}
  info["fps"] = all_fps.pop() if len(all_fps) == 1 else None
  files.write_text_atomic(info_path, json.dumps(info, indent=2, sort_keys=True) + "\n")
  return entry


# --------------------------------------------------------------------------------------
# Info file and shard list.
# --------------------------------------------------------------------------------------


def read_info(data_dir: str) -> dict[str, Any]:
  """Reads and checks ``<data_dir>/dataset_info.json``.

  Returns:
    The info dict: ``schema_version``, ``dims``, ``fps``, ``float_encoding`` and ``splits``
    (per split ``num_clips``, ``num_frames``, ``fps`` and ``shards``).

  Raises:
    RecordError: the file is missing, not JSON, of another schema version, has other
      dimensions, or lacks a field.
  """
  path = os.path.join(data_dir, INFO_FILENAME)
  if not tf.io.gfile.exists(path):
    raise RecordError(f"{path}: missing; {data_dir} is not a complete dim_jax dataset (the "
                      f"info file is written last, after all shards)")
  try:
    with tf.io.gfile.GFile(path, "r") as handle:
      info = json.loads(handle.read())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise RecordError(f"{path}: not valid JSON ({error})") from None
  if not isinstance(info, dict):
    raise RecordError(f"{path}: expected a JSON object, got {type(info).__name__}")
  version = info.get("schema_version")
  if version != SCHEMA_VERSION:
    raise RecordError(f"{path}: field schema_version: {version!r}, this reader understands "
                      f"{SCHEMA_VERSION}")
  expected_dims = {"motion": MOTION_DIM, "pose": POSE_DIM, "expression": EXPRESSION_DIM,
                   "audio": AUDIO_DIM}
  if info.get("dims") != expected_dims:
    raise RecordError(f"{path}: field dims: {info.get('dims')!r}, expected {expected_dims}")
  splits = info.get("splits")
  if not isinstance(splits, dict):
    raise RecordError(f"{path}: field splits: missing or not an object")
  for split, entry in splits.items():
    shards = entry.get("shards") if isinstance(entry, dict) else None
    if not isinstance(shards, list):
      raise RecordError(f"{path}: field splits.{split}.shards: missing or not a list")
    for position, shard in enumerate(shards):
      ok = (isinstance(shard, dict) and isinstance(shard.get("file"), str)
            and "/" not in shard["file"] and shard["file"] not in ("", ".", "..")
            and all(isinstance(shard.get(key), int) and shard[key] >= 0
                    for key in ("num_clips", "num_bytes")))
      if not ok:
        raise RecordError(f"{path}: field splits.{split}.shards[{position}]: needs a plain "
                          f"'file' name and non-negative integer 'num_clips' and "
                          f"'num_bytes', got {shard!r}")
  return info


@dataclasses.dataclass(frozen=True)
class Shard:
  """One shard file of a split as listed by the info file."""
  path: str
  num_clips: int
  num_bytes: int


def split_shards(data_dir: str, split: str) -> list[Shard]:
  """Shards of ``split`` after checking each exists with the size the info file lists.

  The size check is one ``stat`` per file and catches truncated, extended or replaced shards
  before any record is read.

  Raises:
    RecordError: the split is not in the info file, lists no shards, or a shard is missing
      or has the wrong size.
  """
  info = read_info(data_dir)
  info_path = os.path.join(data_dir, INFO_FILENAME)
  if split not in info["splits"]:
    raise RecordError(f"{info_path}: split {split!r} not found; the dataset has "
                      f"{sorted(info['splits'])}")
  entries = info["splits"][split]["shards"]
  if not entries:
    raise RecordError(f"{info_path}: split {split!r} lists no shard files")
  shards = []
  for entry in entries:
    path = os.path.join(data_dir, entry["file"])
    if not tf.io.gfile.exists(path):
      raise RecordError(f"{path}: missing shard file of split {split!r} (listed in "
                        f"{info_path})")
    size = tf.io.gfile.stat(path).length
    if size != entry["num_bytes"]:
      raise RecordError(f"{path}: file is {size} bytes but {info_path} lists "
                        f"{entry['num_bytes']}: truncated, overwritten or corrupt")
    shards.append(Shard(path=path, num_clips=entry["num_clips"], num_bytes=size))
  return shards


def split_files(data_dir: str, split: str) -> list[str]:
  """Paths of the shard files of ``split``, in info-file order (see ``split_shards``)."""
  return [shard.path for shard in split_shards(data_dir, split)]


# --------------------------------------------------------------------------------------
# In-graph reading and checking.
# --------------------------------------------------------------------------------------


def _raw_feature_spec() -> dict[str, tf.io.FixedLenFeature]:
  # Defaults instead of required features: a missing feature then fails one of our checks
  # (with file, record and field in the message) instead of the parser's anonymous error.
  spec = {
      "schema_version": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
      "fps": tf.io.FixedLenFeature([], tf.float32, default_value=-1.0),
      "length": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
  }
  for field in (*ID_FIELDS, *STREAM_WIDTHS):
    spec[field] = tf.io.FixedLenFeature([], tf.string, default_value="")
  return spec


def _check(condition: tf.Tensor, *message: Any) -> tf.Operation:
  """In-graph assertion whose failure message is ``message`` joined, between markers."""
  parts = [part if isinstance(part, tf.Tensor) and part.dtype == tf.string
           else tf.strings.as_string(part) if isinstance(part, tf.Tensor)
           else str(part) for part in message]
  text = tf.strings.join([f"{_MARK} ", *parts, f" {_MARK}"])
  return tf.debugging.Assert(condition, [text], summarize=1)


def file_records(filename: tf.Tensor, num_records: tf.Tensor) -> tf.data.Dataset:
  """Records of one shard as ``(filename, record_index, raw_features)``.

  Checks in-graph that the file yields exactly ``num_records`` parseable records. Framing
  errors (truncated or corrupt TFRecord data) and unparseable Examples are swallowed by
  ``ignore_errors`` only to be reported by those checks with the file name and record index,
  which TF's own errors lack.

  Args:
    filename: scalar string tensor, path of the shard.
    num_records: scalar int64 tensor, number of records the info file lists for it.

  Returns:
    Dataset of (filename string, record_index int64, dict of raw feature tensors).
  """
  num_records = tf.cast(num_records, tf.int64)
  # ignore_errors retries a file that cannot be opened forever: check it exists first.
  # matching_files globs: escape glob characters so that any path matches only itself.
  literal = tf.strings.regex_replace(filename, r"([\\*?\[\]])", r"\\\1")
  exists = _check(tf.size(tf.io.matching_files(literal)) > 0, filename,
                  ": shard file missing")
  with tf.control_dependencies([exists]):
    filename = tf.identity(filename)
  # After a framing error TFRecordDataset moves past the file, so the count comes up short.
  serialized = tf.data.TFRecordDataset(filename).ignore_errors()
  end = tf.data.Dataset.from_tensors(tf.constant(b"", tf.string))
  # The end marker's index is the number of readable records.
  indexed = serialized.map(lambda record: (record, False)).concatenate(
      end.map(lambda record: (record, True))).enumerate()

  spec = _raw_feature_spec()

  def parse(index, record_and_flag):
    record, is_end = record_and_flag
    return index, is_end, tf.io.parse_single_example(record, spec)

  # A record that is no Example (or has a wrong feature type) fails to parse and is dropped
  # here; the gap in the record indices below names it.
  parsed = indexed.map(parse).ignore_errors()

  def find_gap(previous_index, element):
    index, _, _ = element
    return index, (previous_index + 1, element)

  def check(expected_index, element):
    index, is_end, raw = element
    gap = _check(tf.equal(index, expected_index), filename, " record ",
                 expected_index, ": not a tf.train.Example of the dim_jax schema (wrong "
                 "feature type, or not an Example at all)")
    with tf.control_dependencies([gap]):
      complete = _check(tf.logical_or(tf.logical_not(is_end), tf.equal(index, num_records)),
                        filename, ": only ", index, " of ", num_records, " records could "
                        "be read (the info file lists ", num_records, "); the file is "
                        "truncated or corrupt after record ", index - 1)
    with tf.control_dependencies([complete]):
      return tf.identity(is_end), filename, index, raw

  checked = parsed.scan(tf.constant(-1, tf.int64), find_gap).map(check)
  return checked.filter(lambda is_end, *_: tf.logical_not(is_end)).map(
      lambda is_end, name, index, raw: (name, index, raw))


def decode_record(filename: tf.Tensor, record_index: tf.Tensor,
                  raw: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """Checks and decodes one record's raw features (graph function, no Python side effects).

  Args:
    filename: scalar string, for error messages.
    record_index: scalar int64, for error messages.
    raw: output of ``tf.io.parse_single_example`` with the schema's raw spec.

  Returns:
    ``speaker_motion`` [T, 56], ``listener_motion`` [T, 56], ``speaker_audio`` [T, 768]
    float32; ``length`` int32 []; ``fps`` float32 []; ``clip_id``, ``speaker_id``,
    ``listener_id``, ``session_id`` string [].

  Raises (when the graph runs):
    tf.errors.InvalidArgumentError with a marked message (see ``record_error_from``).
  """
  clip_id = raw["clip_id"]
  where = [filename, " record ", record_index, " (clip_id '", clip_id, "')"]
  length = raw["length"]
  fps = raw["fps"]
  checks = [
      _check(tf.equal(raw["schema_version"], SCHEMA_VERSION), *where,
             ": field schema_version: ", raw["schema_version"], " (missing if -1), this "
             f"reader understands {SCHEMA_VERSION}"),
      _check(tf.strings.length(clip_id) > 0, *where, ": field clip_id: missing or empty"),
      _check(length >= MIN_FRAMES, *where, ": field length: ", length, " frame(s) (missing "
             f"if -1); a clip needs at least {MIN_FRAMES}"),
      _check(tf.math.is_finite(fps) & (fps > 0), *where, ": field fps: ", fps,
             " is not a positive finite frame rate (missing if -1)"),
  ]
  for field, width in STREAM_WIDTHS.items():
    num_floats = tf.cast(tf.strings.length(raw[field]), tf.int64) // 4
    checks.append(_check(
        tf.equal(tf.cast(tf.strings.length(raw[field]), tf.int64), length * width * 4)
        & (length >= MIN_FRAMES),
        *where, f": field {field}: holds ", num_floats, " floats (",
        tf.strings.length(raw[field]), " bytes), expected length ", length,
        f" x width {width} = ", length * width,
        " (wrong feature width, or a frame count different from the length field)"))

  clip = {}
  with tf.control_dependencies(checks):
    frames = tf.cast(length, tf.int32)
    for field, width in STREAM_WIDTHS.items():
      values = tf.reshape(tf.io.decode_raw(raw[field], tf.float32, little_endian=True),
                          [frames, width])
      bad_frames = tf.reduce_any(tf.logical_not(tf.math.is_finite(values)), axis=1)
      first_bad = tf.argmax(tf.cast(bad_frames, tf.int32), output_type=tf.int32)
      kind = tf.where(tf.reduce_any(tf.math.is_nan(values[first_bad])), "NaN", "Inf")
      finite = _check(tf.logical_not(tf.reduce_any(bad_frames)), *where,
                      f": field {field}: ", kind, " at frame ", first_bad,
                      " (first non-finite frame)")
      with tf.control_dependencies([finite]):
        clip[field] = tf.identity(values)
    clip["length"] = tf.identity(frames)
    clip["fps"] = tf.identity(fps)
    for field in ID_FIELDS:
      clip[field] = tf.identity(raw[field])
  return clip


def parse_example(serialized: tf.Tensor, filename: Any = "<unknown file>",
                  record_index: Any = -1) -> dict[str, tf.Tensor]:
  """Parses, checks and decodes one serialized clip Example (usable inside tf.data maps).

  Args:
    serialized: scalar string tensor, a serialized ``tf.train.Example``.
    filename, record_index: where the record came from, for error messages.

  Returns:
    See ``decode_record``.
  """
  raw = tf.io.parse_single_example(serialized, _raw_feature_spec())
  return decode_record(tf.convert_to_tensor(filename, tf.string),
                       tf.convert_to_tensor(record_index, tf.int64), raw)


def record_error_from(error: tf.errors.OpError, where: str | None = None) -> RecordError:
  """Turns a tf.data error from reading records into a ``RecordError``.

  Args:
    error: the TF error (an in-graph check failing, a corrupt file, ...).
    where: file or split to name when the TF message does not carry our own text.
  """
  match = _MESSAGE.search(error.message)
  if match:
    # tf.Assert C-escapes quotes and backslashes in string data; undo that.
    return RecordError(re.sub(r"\\(['\"\\])", r"\1", match.group(1)))
  first_line = error.message.strip().splitlines()[0] if error.message.strip() else ""
  # TF prefixes messages with "{{function_node ...}}"; keep only the readable tail.
  first_line = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", first_line)
  prefix = f"{where}: " if where else ""
  return RecordError(f"{prefix}could not read records: {type(error).__name__}: {first_line}")


def read_clips(data_dir: str, split: str) -> list[dict[str, Any]]:
  """Reads a whole split eagerly, in file order, with the same checks as the pipeline.

  Returns:
    List of clip dicts: ``speaker_motion`` [T, 56], ``listener_motion`` [T, 56],
    ``speaker_audio`` [T, 768] float32 numpy arrays, the four ids (str), ``fps`` (float) and
    ``length`` (int).

  Raises:
    RecordError: see ``split_shards`` and ``decode_record``.
  """
  shards = split_shards(data_dir, split)
  # One dataset over all shards (in order) so the graph functions are traced once.
  files = tf.data.Dataset.from_tensor_slices(
      (tf.constant([shard.path for shard in shards], tf.string),
       tf.constant([shard.num_clips for shard in shards], tf.int64)))
  dataset = files.flat_map(file_records).map(decode_record)
  clips = []
  try:
    for clip in dataset:
      clips.append({
          **{field: clip[field].numpy() for field in STREAM_WIDTHS},
          **{field: clip[field].numpy().decode("utf-8") for field in ID_FIELDS},
          "fps": float(clip["fps"].numpy()),
          "length": int(clip["length"].numpy()),
      })
  except tf.errors.OpError as error:
    raise record_error_from(error, f"{data_dir} split {split!r}") from None
  return clips
