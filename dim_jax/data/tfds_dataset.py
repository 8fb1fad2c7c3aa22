"""A tensorflow_datasets builder over the dim_jax clip format, and the readers the pipeline needs.

``DimClips`` (tfds name ``dim_clips``) is a ``tfds.core.GeneratorBasedBuilder`` with one
example per clip, feature for feature what ``records.decode_record`` yields:

  =============== ============================ ==============================================
  feature         type / shape                 notes
  =============== ============================ ==============================================
  speaker_motion  float32 [T, 56]              EMOCA pose (6) then expression (50)
  listener_motion float32 [T, 56]              same layout
  speaker_audio   float32 [T, 768]             HuBERT features at the video frame rate
  length          int32 []                     T (>= 2)
  fps             float32 []                   frame rate of all three streams
  clip_id         string []                    unique within a split
  speaker_id, listener_id, session_id  string []
  =============== ============================ ==============================================

The float streams are stored as raw bytes (``Encoding.BYTES``: T varies, and a float list
would be parsed as a variable-length feature). Its splits are the source's splits, in the
source's order (``disable_shuffling``: a tfds split reads back in the order of the records'
files or of the official converter's selection).

Sources, all read from ``manual_dir`` (``DimClipsConfig.source``):

* ``records``: a dim_jax records directory (``dataset_info.json`` + shards, see
  ``docs/records.md``), read with ``records.split_shards`` / ``file_records`` /
  ``decode_record``, so every in-graph check of the pipeline runs on the way in.
* ``vico`` / ``candor`` / ``emoca``: the official DIM layouts that
  ``tools/convert_official.py`` reads, converted with ``official.iter_converted`` (same
  options, same split selection: ``--list`` files, the metadata CSV's split column, or every
  file as one split).

The training split's per-dimension statistics (``normalization.Normalization``) travel in the
tfds metadata (``metadata.json`` beside ``dataset_info.json``, key ``normalization``): copied
from the records' ``dataset_info.json``, or accumulated while the official ``train`` split is
converted, exactly as ``records.write_split`` does. ``read_normalization`` returns them.

``clip_dataset`` yields this host's clips with the keys, dtypes and shapes of
``records.file_records`` + ``records.decode_record`` and the host partition of
``pipeline.make_dataset``. See ``docs/tfds.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import operator
import os
import sys
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dim_jax import errors
from dim_jax.data import normalization
from dim_jax.data import official
from dim_jax.data import records

NAME = "dim_clips"
SOURCES = ("records", *official.DEFAULT_FPS)
# Keys of a clip as records.decode_record returns them (and as clip_dataset yields them).
CLIP_KEYS = (*records.STREAM_WIDTHS, "length", "fps", *records.ID_FIELDS)
# Keys of builder.info.metadata.
METADATA_NORMALIZATION = normalization.INFO_KEY
METADATA_SOURCE = "source"
METADATA_CONVERSION = "conversion"
# Parallel shard readers when the files are shuffled, as pipeline.make_dataset.
_MAX_INTERLEAVE = 8

_DESCRIPTION = """\
Dyadic conversation clips for Dyadic Interaction Modeling (DIM, ECCV 2024), in the dim_jax
clip schema (version {schema}): per frame the speaker's and the listener's EMOCA motion (pose 6
then expression 50) and the speaker's HuBERT audio features (768), at one frame rate per clip,
with clip, speaker, listener and session ids. Built from a dim_jax records directory or from
the official DIM data layouts (ViCo / LM_Listener pickles, CANDOR pickles, raw EMOCA + HuBERT)
placed in `manual_dir`. The training split's per-dimension mean and standard deviation travel in
the dataset's metadata (`metadata.json`, key `normalization`).
""".format(schema=records.SCHEMA_VERSION)

_CITATION = """\
@inproceedings{tran2024dyadic,
  title     = {Dyadic Interaction Modeling for Social Behavior Generation},
  author    = {Tran, Minh and Chang, Di and Siniukov, Maksim and Soleymani, Mohammad},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2024},
  note      = {arXiv:2403.09069},
}
"""

_HOMEPAGE = "https://github.com/Boese0601/Dyadic-Interaction-Modeling"

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Nothing is downloaded. Put the source in `manual_dir` (`tfds build --manual_dir DIR`, or
`tfds.download.DownloadConfig(manual_dir=DIR)`):

* config `records`: a dim_jax records directory (dataset_info.json + *.tfrecord shards),
  e.g. written by `tools/make_synthetic_data.py` or `tools/convert_official.py`;
* config `vico`: the official processed ViCo / LM_Listener pickles `<clip_id>.pkl` (keys
  video_speaker, video_listener, audio) and the ViCo metadata `RLD_data.csv` (its split column
  gives the splits);
* config `candor`: `speaker/<clip_id>.pkl` (video, audio) and `listener/<clip_id>.pkl` (video);
  one split `train` of every clip unless the config's `split_lists` names id lists;
* config `emoca`: `emoca/<video>/[EMOCA_v2_lr_mse_20/]<frame>/{pose,exp}.npy`,
  `hubert/<clip_id>.{pkl,npy}` and `RLD_data.csv`.

Formats and conversion rules: docs/official_data.md; options: DimClipsConfig, docs/tfds.md.
"""


@dataclasses.dataclass(eq=False)
class DimClipsConfig(tfds.core.BuilderConfig):
  """Where the clips come from and, for the official layouts, how they are converted.

  The conversion options mean what the same-named options of ``tools/convert_official.py``
  mean. Paths are relative to ``manual_dir`` (absolute paths are taken as they are).

  Attributes:
    source: "records" (a dim_jax records directory) or an official format: "vico",
      "candor", "emoca".
    src_subdir: folder inside ``manual_dir`` holding the source ("" = ``manual_dir``).
    fps: video frame rate; None: ``official.DEFAULT_FPS[source]``.
    audio_fps: audio frame rate, "match" (stretch the audio over the clip), or None (the
      format's default: match for vico/candor, ``official.HUBERT_FPS`` for emoca).
    max_length_diff: speaker/listener (and audio duration) differences trimmed, in frames.
    metadata: ViCo metadata CSV (``RLD_data.csv``); vico: split selection and person ids
      (None: no CSV), emoca: required, candor: ignored.
    split_lists: split name -> file of utterance ids (``--list``); when given, these are the
      splits. Otherwise the metadata CSV's split column gives them, otherwise every file is
      one split named ``default_split``.
    default_split: name of that single split.
    emoca_subdir: frame folder inside each EMOCA video folder, used when present.
    skip_bad: skip (and list in the metadata) utterances that fail to convert instead of
      failing the build (``--skip_bad``).
  """
  source: str = "records"
  src_subdir: str = ""
  fps: float | None = None
  audio_fps: float | str | None = None
  max_length_diff: int = official.DEFAULT_MAX_LENGTH_DIFF
  metadata: str | None = None
  split_lists: dict[str, str] = dataclasses.field(default_factory=dict)
  default_split: str = normalization.STATS_SPLIT
  emoca_subdir: str | None = official.DEFAULT_EMOCA_SUBDIR
  skip_bad: bool = False

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"DimClipsConfig {self.name!r}: source {self.source!r}; expected one "
                       f"of {SOURCES}")
    if self.max_length_diff < 0:
      raise ValueError(f"DimClipsConfig {self.name!r}: max_length_diff must be >= 0")

  def resolved_audio_fps(self) -> float | None:
    """``official`` semantics of ``audio_fps``: None = match length, else a rate.

    Mirrors ``tools/convert_official.resolve_audio_fps`` (tools/ is not an installed package).
    """
    if self.audio_fps is None:
      return official.HUBERT_FPS if self.source == "emoca" else None
    if isinstance(self.audio_fps, str):
      if self.audio_fps.lower() != "match":
        raise ValueError(f"DimClipsConfig {self.name!r}: audio_fps {self.audio_fps!r}; "
                         "expected a number, 'match' or None")
      return None
    if not float(self.audio_fps) > 0:
      raise ValueError(f"DimClipsConfig {self.name!r}: audio_fps must be positive")
    return float(self.audio_fps)

  def options(self) -> dict[str, Any]:
    """The conversion options, as recorded in the dataset's metadata."""
    if self.source == "records":
      return {"source": "records"}
    audio_fps = self.resolved_audio_fps()
    return {
        "source": self.source,
        "fps": self.fps if self.fps is not None else official.DEFAULT_FPS[self.source],
        "audio_fps": "match" if audio_fps is None else audio_fps,
        "max_length_diff": self.max_length_diff,
        "metadata": self.metadata if self.source != "candor" else None,
        "split_lists": dict(self.split_lists),
        "emoca_subdir": self.emoca_subdir if self.source == "emoca" else None,
        "skip_bad": self.skip_bad,
    }


class DimClips(tfds.core.GeneratorBasedBuilder):
  """DIM dyadic clips (one example per clip) from dim_jax records or official layouts."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": f"Initial release: the dim_jax clip schema version {records.SCHEMA_VERSION} "
               "(speaker/listener motion [T, 56], speaker audio [T, 768], length, fps, ids); "
               "the training split's normalization statistics in the metadata.",
  }
  BUILDER_CONFIGS = [
      DimClipsConfig(name="records", source="records",
                     description="A dim_jax records directory in manual_dir."),
      DimClipsConfig(name="vico", source="vico", metadata="RLD_data.csv",
                     description="Official processed ViCo / LM_Listener pickles + "
                                 "RLD_data.csv in manual_dir, 30 fps."),
      DimClipsConfig(name="candor", source="candor",
                     description="Official processed CANDOR speaker/ + listener/ pickles "
                                 "in manual_dir, 5 fps."),
      DimClipsConfig(name="emoca", source="emoca", metadata="RLD_data.csv",
                     description="Raw EMOCA frames + 50 fps HuBERT features + RLD_data.csv "
                                 "in manual_dir, 30 fps video."),
  ]
  DEFAULT_CONFIG_NAME = "records"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> tfds.core.Path:
    # tfds 4.9.10 infers this with the importlib_resources backport, which it only installs
    # on Python < 3.9 (tensorflow/datasets#11212): building would fail with
    # ModuleNotFoundError. The answer is this file (tfds looks for checksums.tsv beside it).
    return tfds.core.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    streams = {
        field: tfds.features.Tensor(
            shape=(None, width), dtype=np.float32, encoding=tfds.features.Encoding.BYTES,
            doc=doc)
        for (field, width), doc in zip(records.STREAM_WIDTHS.items(), (
            "speaker EMOCA motion per frame: pose (6: global rotation, jaw) then expression "
            "(50)",
            "listener EMOCA motion per frame, same layout",
            "speaker HuBERT audio features per frame, at the video frame rate"))
    }
    ids = {field: tfds.features.Text(doc=f"{field} (UTF-8)") for field in records.ID_FIELDS}
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            **streams,
            "length": tfds.features.Scalar(dtype=np.int32, doc="frames T (>= 2)"),
            "fps": tfds.features.Scalar(dtype=np.float32, doc="frame rate of all streams"),
            **ids,
        }),
        homepage=_HOMEPAGE,
        citation=_CITATION,
        metadata=tfds.core.MetadataDict(),
        # Examples keep the source's order (records file order, converter selection order).
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config: DimClipsConfig = self.builder_config
    source_dir = os.path.join(os.fspath(dl_manager.manual_dir), config.src_subdir)
    self.info.metadata[METADATA_SOURCE] = {
        **config.options(), "config": config.name,
        "records_schema_version": records.SCHEMA_VERSION}
    if config.source == "records":
      return self._records_splits(source_dir)
    return self._official_splits(config, source_dir, os.fspath(dl_manager.manual_dir))

  # ---- records source ---------------------------------------------------------------------

  def _records_splits(self, data_dir: str) -> dict[str, Iterator[tuple[str, dict]]]:
    info = records.read_info(data_dir)
    stats = None
    if normalization.INFO_KEY in info:
      # The stored statistics, not recomputed: a recomputation sums in another order (file
      # order instead of write order) and could differ in the last bit.
      stats = normalization.from_info(info, data_dir)
      self.info.metadata[METADATA_NORMALIZATION] = stats.to_json()
    return {split: self._records_examples(data_dir, split, accumulate=stats is None)
            for split in info["splits"]}

  def _records_examples(self, data_dir: str, split: str, *, accumulate: bool
                        ) -> Iterator[tuple[str, dict]]:
    shards = records.split_shards(data_dir, split)
    files = tf.data.Dataset.from_tensor_slices(
        (tf.constant([shard.path for shard in shards], tf.string),
         tf.constant([shard.num_clips for shard in shards], tf.int64)))
    decoded = files.flat_map(records.file_records).map(records.decode_record)
    clips = _numpy_clips(decoded, f"{data_dir} split {split!r}")
    yield from self._generate_examples(clips, split, accumulate=accumulate)

  # ---- official layouts -------------------------------------------------------------------

  def _official_splits(self, config: DimClipsConfig, source_dir: str, manual_dir: str
                       ) -> dict[str, Iterator[tuple[str, dict]]]:
    metadata = None
    if config.metadata and config.source != "candor":  # the CLI ignores it for candor too
      path = os.path.join(manual_dir, config.metadata)
      if not os.path.isfile(path):
        raise records.RecordError(
            f"{path}: missing; config {config.name!r} reads the ViCo metadata CSV from there "
            "(or build a DimClipsConfig with metadata=None to take every file as one split)")
      metadata = official.read_vico_metadata(path)
    if config.source == "emoca" and metadata is None:
      raise ValueError(f"config {config.name!r}: source 'emoca' needs the ViCo metadata CSV "
                       "(DimClipsConfig.metadata) to pair speaker and listener videos")
    # Split selection as tools/convert_official.py: id lists, else the CSV's split column
    # (official.iter_converted(split=...)), else every file.
    if config.split_lists:
      selections = {split: dict(ids=official.read_id_list(os.path.join(manual_dir, path)))
                    for split, path in config.split_lists.items()}
    elif metadata is not None:
      selections = {split: dict(split=split)
                    for split in sorted({row.split for row in metadata.values()})}
    else:
      selections = {config.default_split: {}}
    conversion = {"notes": {}, "skipped": {}}
    self.info.metadata[METADATA_CONVERSION] = conversion
    return {split: self._official_examples(config, source_dir, split, metadata, selection,
                                           conversion)
            for split, selection in selections.items()}

  def _official_examples(self, config: DimClipsConfig, source_dir: str, split: str,
                         metadata, selection: Mapping[str, Any],
                         conversion: dict[str, dict]) -> Iterator[tuple[str, dict]]:
    notes = conversion["notes"].setdefault(split, {})
    skipped = conversion["skipped"].setdefault(split, [])

    def on_error(source: str, error: Exception) -> None:
      skipped.append({"source": source, "error": str(error)})

    def clips():
      for converted in official.iter_converted(
          config.source, source_dir, fps=config.fps, audio_fps=config.resolved_audio_fps(),
          max_length_diff=config.max_length_diff, metadata=metadata,
          emoca_subdir=config.emoca_subdir or None,
          on_error=on_error if config.skip_bad else None, **selection):
        if converted.notes:
          notes[converted.clip["clip_id"]] = list(converted.notes)
        yield converted.clip

    # The statistics of the converted train split, accumulated in the order write_split
    # sees the clips: identical to convert_official's records.
    yield from self._generate_examples(clips(), split, accumulate=True)

  # ---- shared -----------------------------------------------------------------------------

  def _generate_examples(self, clips, split: str, *, accumulate: bool
                         ) -> Iterator[tuple[str, dict]]:
    """Validates clips as records.write_split does and yields (clip_id, example).

    With ``accumulate`` the train split's statistics are computed on the way and stored in
    the metadata once the split is exhausted.
    """
    moments = (normalization.MomentAccumulator()
               if accumulate and split == normalization.STATS_SPLIT else None)
    seen: set[str] = set()
    for index, clip in enumerate(clips):
      where = f"{self.name}/{self.builder_config.name} split {split!r} clip #{index}"
      records.validate_clip(clip, where)
      if clip["clip_id"] in seen:
        raise records.RecordError(f"{where}: field clip_id: {clip['clip_id']!r} repeats; "
                                  "clip ids must be unique within a split")
      seen.add(clip["clip_id"])
      example = {field: np.asarray(clip[field], np.float32)
                 for field in records.STREAM_WIDTHS}
      example.update({field: clip[field] for field in records.ID_FIELDS})
      example["length"] = np.int32(example["speaker_motion"].shape[0])
      example["fps"] = np.float32(clip["fps"])
      if moments is not None:
        moments.add(example)
      yield clip["clip_id"], example
    if moments is not None:
      # Runs once the split is exhausted, before tfds writes metadata.json.
      self.info.metadata[METADATA_NORMALIZATION] = moments.result(split).to_json()


def _numpy_clips(decoded: tf.data.Dataset, where: str) -> Iterator[dict[str, Any]]:
  """Clips of a decode_record dataset as numpy / str dicts (streamed, unlike read_clips)."""
  iterator = iter(decoded)
  while True:
    try:
      clip = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as error:
      raise records.record_error_from(error, where) from None
    yield {
        **{field: clip[field].numpy() for field in records.STREAM_WIDTHS},
        **{field: clip[field].numpy().decode("utf-8") for field in records.ID_FIELDS},
        "fps": float(clip["fps"].numpy()),
    }


# --------------------------------------------------------------------------------------
# Building and opening.
# --------------------------------------------------------------------------------------


def prepare(source_dir: str, data_dir: str, config: str | DimClipsConfig = "records", *,
            num_shards: int | None = None, overwrite: bool = False) -> DimClips:
  """Builds the tfds dataset from ``source_dir`` under ``data_dir`` (no network).

  Args:
    source_dir: the ``manual_dir``: a records directory or an official layout.
    data_dir: tfds data directory; the dataset goes to
      ``<data_dir>/dim_clips/<config>/<version>``.
    config: a predefined config name ("records", "vico", "candor", "emoca") or a
      ``DimClipsConfig`` with other options (a new ``name``).
    num_shards: files per split (None: tfds sizes them); with at least as many files as
      processes every host reads whole files (``host_partition``).
    overwrite: rebuild if the dataset exists (otherwise an existing one is reused as is).

  Returns:
    The prepared builder.
  """
  if not os.path.isdir(source_dir):
    raise FileNotFoundError(f"{source_dir}: source (manual_dir) is not a directory")
  builder = DimClips(data_dir=data_dir, config=config)
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=source_dir, try_download_gcs=False, num_shards=num_shards,
      download_mode=mode))
  return builder


def load_builder(builder_or_dir: tfds.core.DatasetBuilder | str | os.PathLike
                 ) -> tfds.core.DatasetBuilder:
  """A builder of a prepared dataset: returned as is, or opened from its directory.

  Args:
    builder_or_dir: a prepared builder, or the dataset's directory
      ``<data_dir>/dim_clips/<config>/<version>`` (opened without this module's configs, so
      custom configs work too).

  Raises:
    ValueError: a dim_jax records directory or another non-tfds directory.
  """
  if isinstance(builder_or_dir, tfds.core.DatasetBuilder):
    return builder_or_dir
  path = os.fspath(builder_or_dir)
  if tf.io.gfile.exists(os.path.join(path, "features.json")):
    return tfds.builder_from_directory(path)
  try:
    records.read_info(path)
    kind = "a dim_jax records directory"
  except records.RecordError:
    kind = "not a prepared tfds dataset"
  raise ValueError(f"{path}: {kind}; expected <data_dir>/{NAME}/<config>/<version> of a "
                   "prepared tfds dataset (build one with tfds_dataset.prepare or `tfds "
                   "build`, see docs/tfds.md)")


def read_normalization(builder_or_dir) -> normalization.Normalization:
  """The training split's per-dimension statistics stored with the tfds dataset.

  Raises:
    normalization.NormalizationError: the dataset has none (its source had no train split).
  """
  builder = load_builder(builder_or_dir)
  where = os.path.join(os.fspath(builder.data_dir), "metadata.json")
  metadata = builder.info.metadata
  if metadata is None or METADATA_NORMALIZATION not in metadata:
    raise normalization.NormalizationError(
        f"{where}: no normalization statistics (the source had no "
        f"{normalization.STATS_SPLIT!r} split; the dataset has "
        f"{sorted(builder.info.splits)}); set data.normalize='none' to use raw features")
  return normalization.Normalization.from_json(metadata[METADATA_NORMALIZATION], where)


# --------------------------------------------------------------------------------------
# Reading for the pipeline.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HostPartition:
  """Which clips of a split one host reads (``pipeline.make_dataset``'s rule).

  Attributes:
    by_file: True: this host reads whole tfds files (``files[process_index::process_count]``);
      False: every host reads all files and keeps records ``process_index::process_count``.
    files: indices of the files this host opens.
    num_clips: clips this host gets (a training host with none is an error in the pipeline).
  """
  by_file: bool
  files: tuple[int, ...]
  num_clips: int


def _split_info(builder: tfds.core.DatasetBuilder, split: str):
  if split not in builder.info.splits:
    raise records.RecordError(f"{builder.data_dir}: split {split!r} not found; the dataset "
                              f"has {sorted(builder.info.splits)}")
  return builder.info.splits[split]


def host_partition(builder_or_dir, split: str, *, process_index: int = 0,
                   process_count: int = 1) -> HostPartition:
  """This host's part of ``split``: every clip goes to exactly one host.

  With at least as many files as processes, and every host getting a clip that way, host i
  reads files i::n; otherwise every host reads all files and keeps records i::n of the
  fixed-order stream (as ``pipeline.make_dataset`` does with record shards).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index} of "
                     f"{process_count}")
  lengths = list(_split_info(load_builder(builder_or_dir), split).shard_lengths)
  by_file = len(lengths) >= process_count and all(
      sum(lengths[host::process_count]) > 0 for host in range(process_count))
  if by_file:
    files = tuple(range(process_index, len(lengths), process_count))
    return HostPartition(True, files, sum(lengths[index] for index in files))
  return HostPartition(False, tuple(range(len(lengths))),
                       len(range(process_index, sum(lengths), process_count)))


def clip_dataset(builder_or_dir, split: str, *, process_index: int = 0,
                 process_count: int = 1, shuffle_seed: int | None = None) -> tf.data.Dataset:
  """This host's clips of ``split``, as ``records.file_records`` + ``decode_record`` give them.

  Elements: ``speaker_motion`` / ``listener_motion`` float32 [T, 56], ``speaker_audio``
  float32 [T, 768], ``length`` int32 [], ``fps`` float32 [], ``clip_id``, ``speaker_id``,
  ``listener_id``, ``session_id`` string []: what ``pipeline.make_dataset`` maps next.

  Args:
    builder_or_dir: see ``load_builder``.
    split: split name.
    process_index, process_count: this host and the number of hosts (``host_partition``).
    shuffle_seed: None: one pass in the stored order. An int shuffles this host's files
      every epoch from that seed (only when hosts read whole files, as the pipeline's
      training mode) and reads up to 8 of them interleaved.

  Returns:
    A finite, deterministic ``tf.data.Dataset`` (no cache, no prefetch: its iterator
    checkpoints hold no buffered clips).
  """
  builder = load_builder(builder_or_dir)
  partition = host_partition(builder, split, process_index=process_index,
                             process_count=process_count)
  if partition.by_file:
    # One instruction per whole file, in file order.
    if not partition.files:
      raise AssertionError("by_file partitions give every host files")
    instruction = functools.reduce(operator.add, [
        tfds.core.ReadInstruction(split, from_=index, to=index + 1, unit="shard")
        for index in partition.files])
  else:
    instruction = split
  shuffle = shuffle_seed is not None and partition.by_file
  read_config = tfds.ReadConfig(
      # An in-memory cache or prefetch buffer would be part of every iterator checkpoint.
      try_autocache=False, skip_prefetch=True,
      shuffle_seed=shuffle_seed if shuffle else None,
      shuffle_reshuffle_each_iteration=True if shuffle else None,
      interleave_cycle_length=min(len(partition.files), _MAX_INTERLEAVE) if shuffle else 1,
      interleave_block_length=1,
      # The dataset is stored ordered; shuffling its files is what training asks for.
      enable_ordering_guard=not shuffle)
  dataset = builder.as_dataset(split=instruction, shuffle_files=shuffle,
                               read_config=read_config)
  if not partition.by_file and process_count > 1:
    dataset = dataset.shard(process_count, process_index)
  return dataset.map(lambda example: {key: example[key] for key in CLIP_KEYS})


def read_clips(builder_or_dir, split: str) -> list[dict[str, Any]]:
  """A whole split, eagerly, in stored order, as ``records.read_clips`` returns it."""
  builder = load_builder(builder_or_dir)
  clips = list(_numpy_clips(clip_dataset(builder, split),
                            f"{builder.data_dir} split {split!r}"))
  for clip in clips:
    clip["length"] = int(clip["speaker_motion"].shape[0])
  return clips


# --------------------------------------------------------------------------------------
# Command line (`tfds build` in tfds 4.9.10 needs apache_beam even for this builder).
# --------------------------------------------------------------------------------------


def _config_arg(value: str) -> str | DimClipsConfig:
  # As `tfds build --config`: a predefined name, or JSON keyword arguments of the config.
  if value.lstrip().startswith("{"):
    try:
      return DimClipsConfig(**json.loads(value))
    except (json.JSONDecodeError, TypeError, ValueError) as error:
      raise argparse.ArgumentTypeError(str(error)) from None
  return value


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dim_jax.data.tfds_dataset",
      description="Builds the dim_clips tensorflow_datasets dataset from a dim_jax records "
                  "directory or an official DIM layout (docs/tfds.md).")
  parser.add_argument("--manual_dir", required=True,
                      help="source: a records directory or an official layout")
  parser.add_argument("--data_dir", required=True, help="tfds data directory (output)")
  parser.add_argument("--config", type=_config_arg, default="records",
                      help="records, vico, candor, emoca, or JSON DimClipsConfig arguments, "
                           "e.g. '{\"name\": \"vico_25fps\", \"source\": \"vico\", "
                           "\"fps\": 25, \"metadata\": \"RLD_data.csv\"}'")
  parser.add_argument("--num_shards", type=int, default=None, help="files per split")
  parser.add_argument("--overwrite", action="store_true", help="rebuild if it exists")
  args = parser.parse_args(argv)
  try:
    builder = prepare(args.manual_dir, args.data_dir, args.config,
                      num_shards=args.num_shards, overwrite=args.overwrite)
  except (errors.DimJaxError, OSError) as error:
    print(f"dim_jax: error: {error}", file=sys.stderr)
    return 1
  splits = ", ".join(f"{name} {split.num_examples} clips in {split.num_shards} file(s)"
                     for name, split in sorted(builder.info.splits.items()))
  has_stats = METADATA_NORMALIZATION in builder.info.metadata
  print(f"{builder.data_dir}: {splits}; normalization statistics "
        f"{'stored' if has_stats else 'absent (no train split)'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
