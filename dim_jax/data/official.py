"""Converters from the official DIM on-disk layouts into our clip dicts.

A clip dict is what `dim_jax.data.records.write_split` stores: `speaker_motion`
[T, 56] float32, `listener_motion` [T, 56] float32, `speaker_audio` [T, 768]
float32, `clip_id`, `speaker_id`, `listener_id`, `session_id` (str) and `fps`.
Motion is EMOCA pose (6: global rotation, jaw) THEN expression (50), the order
the official preprocessing concatenates `pose.npy` and `exp.npy`.

Supported inputs (see docs/official_data.md):

* ``vico``: per-utterance pickles ``<src>/<clip_id>.pkl`` holding a dict with
  `video_speaker` [T, 56], `video_listener` [T, 56] and `audio` [T_a, 768]
  (the official `vico_processed_30fps` files; LM_Listener-style pickles with
  the same keys work too). Optional ViCo metadata CSV (`RLD_data.csv`) for
  split selection and speaker/listener ids.
* ``candor``: ``<src>/speaker/<clip_id>.pkl`` (`video` [T, 56], `audio`
  [T_a, 768]) paired with ``<src>/listener/<clip_id>.pkl`` (`video` [T, 56]).
* ``emoca``: raw EMOCA output, one folder per video with one sub-folder per
  frame holding `exp.npy` (50) and `pose.npy` (6), plus HuBERT features per
  utterance and the ViCo metadata CSV that pairs speaker and listener videos
  (the inputs of the official `vico_preprocessing.py`).

Differences from the official loaders, on purpose:

* Audio whose frame count differs from the video's is RESAMPLED onto the video
  frames by linear interpolation over time, either by matching lengths (first
  and last frames aligned) or from a given audio frame rate. The official ViCo
  preprocessing instead keeps the first 60 % of the 50 fps HuBERT frames (its
  `downsample_mean` has a window of one frame), which misaligns audio and
  video; the official loaders drop clips whose lengths differ.
* Speaker and listener motion lengths that differ by at most
  `max_length_diff` frames are trimmed to the shorter (the trim is recorded in
  `ConvertedClip.notes`); larger differences raise `RecordError`.
* Real speaker motion is kept (the official ViCo loader replaces it by ones).
* No length filter (the official loaders keep 5..1024 ViCo frames, 5..250
  CANDOR frames): batches are padded with masks downstream.

Every bad input raises `dim_jax.data.records.RecordError` naming the file, the
field and the problem. Pickles go through `dim_jax.data.safe_pickle`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import pathlib
import types
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from dim_jax.data import safe_pickle

MOTION_DIM = 56
POSE_DIM = 6
EXP_DIM = 50
AUDIO_DIM = 768

# One documented frame rate per dataset (video frames per second of the
# official processed files). CANDOR is 5 fps because the official
# `preprocessing.py` samples EMOCA and averages HuBERT into 200 ms bins.
DEFAULT_FPS: Mapping[str, float] = types.MappingProxyType({
    "vico": 30.0,
    "candor": 5.0,
    "emoca": 30.0,
})

# HuBERT-base emits one frame per 20 ms of 16 kHz audio.
HUBERT_FPS = 50.0

# Default tolerance (in video frames) for speaker/listener length differences
# and audio/video duration differences before we refuse a clip.
DEFAULT_MAX_LENGTH_DIFF = 2

# Official EMOCA output folder inside each video folder (used when present).
DEFAULT_EMOCA_SUBDIR = "EMOCA_v2_lr_mse_20"

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class ConvertedClip:
  """One converted clip plus what the converter changed.

  Attributes:
    clip: The clip dict for `records.write_split`.
    source: The input file or folder(s) it came from.
    notes: Human-readable records of non-identity edits (trims, resampling).
  """
  clip: dict[str, Any]
  source: str
  notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class VicoMeta:
  """One row of the ViCo metadata CSV (`RLD_data.csv`).

  The official loaders index the CSV by position: 0 sentiment, 1 utterance
  id, 2 listener video, 3 speaker video, 4 listener id, 5 speaker id,
  6 split ("train"/"test"). We read the same positions.
  """
  sentiment: str
  clip_id: str
  listener_video: str
  speaker_video: str
  listener_id: str
  speaker_id: str
  split: str


def _record_error(message: str) -> Exception:
  """Builds a `records.RecordError` (ValueError if records is unavailable)."""
  # Imported lazily: records.py is owned elsewhere and may load TensorFlow.
  try:
    from dim_jax.data import records
  except ImportError:
    return ValueError(message)
  return records.RecordError(message)


def _min_frames() -> int:
  """Shortest clip the records format stores (1 if records is unavailable)."""
  try:
    from dim_jax.data import records
  except ImportError:
    return 1
  return int(getattr(records, "MIN_FRAMES", 1))


# ---------------------------------------------------------------------------
# Array checks and resampling.


def check_array(value: Any, source: str, field: str, width: int) -> np.ndarray:
  """Validates a [T, width] finite numeric array and returns it as float32.

  Args:
    value: The candidate array.
    source: File name for error messages.
    field: Field (key) name for error messages.
    width: Required size of the last axis.

  Returns:
    A C-contiguous float32 copy of shape [T, width].

  Raises:
    RecordError: Not an array, wrong rank or width, non-numeric, or NaN/Inf.
  """
  if not isinstance(value, np.ndarray):
    raise _record_error(
        f"{source}: field '{field}' is {type(value).__name__}, expected a "
        "numpy array")
  if value.ndim != 2 or value.shape[1] != width:
    raise _record_error(
        f"{source}: field '{field}' has shape {value.shape}, expected "
        f"[T, {width}]")
  if not (np.issubdtype(value.dtype, np.floating) or
          np.issubdtype(value.dtype, np.integer)):
    raise _record_error(
        f"{source}: field '{field}' has dtype {value.dtype}, expected a real "
        "numeric dtype")
  with np.errstate(over="ignore", invalid="ignore"):
    # Out-of-range float64 values become Inf here and are reported below.
    out = np.ascontiguousarray(value, dtype=np.float32)
  # Checked after the cast: float64 values beyond float32 range become Inf.
  if not np.all(np.isfinite(out)):
    bad = np.argwhere(~np.isfinite(out))[0]
    raise _record_error(
        f"{source}: field '{field}' has NaN/Inf (first at frame {bad[0]}, "
        f"channel {bad[1]}, after conversion to float32)")
  return out


def _interpolate(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """Linearly interpolates rows of `x` at fractional row `positions`."""
  n = x.shape[0]
  positions = np.clip(positions, 0.0, n - 1)
  lo = np.floor(positions).astype(np.int64)
  hi = np.minimum(lo + 1, n - 1)
  w = (positions - lo)[:, None]
  x64 = x.astype(np.float64)
  # At integer positions w == 0, so source frames are reproduced exactly.
  return (x64[lo] * (1.0 - w) + x64[hi] * w).astype(np.float32)


def resample_to_length(x: np.ndarray, length: int) -> np.ndarray:
  """Stretches `x` [N, D] to [length, D], aligning first and last frames.

  Args:
    x: Input frames, N >= 1.
    length: Output frame count, >= 1.

  Returns:
    float32 [length, D]; x itself (as float32) when N == length.
  """
  n = x.shape[0]
  if n == length:
    return x.astype(np.float32)
  if length == 1:
    return x[:1].astype(np.float32)
  if n == 1:
    return np.repeat(x.astype(np.float32), length, axis=0)
  positions = np.linspace(0.0, n - 1, length)
  return _interpolate(x, positions)


def resample_by_rate(x: np.ndarray, src_fps: float, dst_fps: float,
                     length: int, *, source: str = "<array>",
                     field: str = "audio",
                     max_length_diff: int = DEFAULT_MAX_LENGTH_DIFF
                     ) -> tuple[np.ndarray, str | None]:
  """Resamples `x` from `src_fps` to `length` frames at `dst_fps`.

  Output frame i samples `x` at time i / dst_fps, i.e. at fractional source
  row i * src_fps / dst_fps. Frame-time offsets inside the feature extractor
  (HuBERT's first frame is centred ~12.5 ms in) are ignored.

  Args:
    x: Input frames [N, D].
    src_fps: Frame rate of `x`.
    dst_fps: Frame rate of the output.
    length: Output frame count (the video's).
    source: File name for error messages.
    field: Field name for error messages.
    max_length_diff: Allowed duration mismatch in output frames; within it
      the last input frame is held (audio too short) or the surplus is
      dropped (audio too long).

  Returns:
    (float32 [length, D], a note describing a duration mismatch or None).

  Raises:
    RecordError: Durations differ by more than `max_length_diff` frames.
  """
  if src_fps <= 0 or dst_fps <= 0:
    raise _record_error(f"{source}: frame rates must be positive, got "
                        f"src_fps={src_fps}, dst_fps={dst_fps}")
  n = x.shape[0]
  # Duration mismatch expressed in output (video) frames.
  covered = n * dst_fps / src_fps
  diff = covered - length
  if abs(diff) > max_length_diff:
    raise _record_error(
        f"{source}: field '{field}' has {n} frames at {src_fps:g} fps "
        f"({covered:.2f} frames at {dst_fps:g} fps) but the video has "
        f"{length}; difference exceeds max_length_diff={max_length_diff}")
  positions = np.arange(length, dtype=np.float64) * (src_fps / dst_fps)
  out = _interpolate(x, positions)
  note = None
  if abs(diff) >= 1:
    note = (f"{field}: {n} frames at {src_fps:g} fps cover {covered:.2f} "
            f"video frames for {length}; "
            + ("held the last frame" if diff < 0 else "dropped the surplus"))
  return out, note


# ---------------------------------------------------------------------------
# Clip assembly.


def make_clip(*, source: str, speaker_motion: np.ndarray,
              listener_motion: np.ndarray, speaker_audio: np.ndarray,
              clip_id: str, speaker_id: str = "", listener_id: str = "",
              session_id: str = "", fps: float,
              audio_fps: float | None = None,
              max_length_diff: int = DEFAULT_MAX_LENGTH_DIFF) -> ConvertedClip:
  """Validates, aligns and packs one dyadic clip.

  Audio is aligned to the SPEAKER motion (it is the speaker's voice), then
  all three streams are trimmed to the common length.

  Args:
    source: Input name(s) for error messages and `ConvertedClip.source`.
    speaker_motion: [T_s, 56] pose-then-expression.
    listener_motion: [T_l, 56] pose-then-expression.
    speaker_audio: [T_a, 768] audio features.
    clip_id: Utterance id.
    speaker_id: Speaker identity ("" when unknown).
    listener_id: Listener identity ("" when unknown).
    session_id: Conversation id ("" when unknown).
    fps: Video frame rate of the motion, stored in the clip.
    audio_fps: Frame rate of `speaker_audio`. None means "match length":
      stretch the audio over the speaker motion with first and last frames
      aligned. A number resamples by time (see `resample_by_rate`).
    max_length_diff: Largest speaker/listener length difference (frames)
      that is trimmed to the shorter; also the audio duration tolerance.

  Returns:
    The converted clip with notes on every trim/resample.

  Raises:
    RecordError: Bad shape, NaN/Inf, empty motion, or length mismatch beyond
      the tolerance.
  """
  if not fps > 0 or not math.isfinite(fps):
    raise _record_error(f"{source}: fps must be positive, got {fps}")
  speaker = check_array(speaker_motion, source, "speaker_motion", MOTION_DIM)
  listener = check_array(listener_motion, source, "listener_motion",
                         MOTION_DIM)
  audio = check_array(speaker_audio, source, "speaker_audio", AUDIO_DIM)
  for field, arr in (("speaker_motion", speaker),
                     ("listener_motion", listener),
                     ("speaker_audio", audio)):
    if arr.shape[0] == 0:
      raise _record_error(f"{source}: field '{field}' has no frames")
  notes: list[str] = []
  t_s, t_l = speaker.shape[0], listener.shape[0]
  if abs(t_s - t_l) > max_length_diff:
    raise _record_error(
        f"{source}: speaker_motion has {t_s} frames, listener_motion {t_l}; "
        f"difference exceeds max_length_diff={max_length_diff}")
  if audio_fps is None:
    if audio.shape[0] != t_s:
      notes.append(f"speaker_audio: resampled {audio.shape[0]} -> {t_s} "
                   "frames (match length)")
    audio = resample_to_length(audio, t_s)
  else:
    audio, note = resample_by_rate(audio, audio_fps, fps, t_s, source=source,
                                   field="speaker_audio",
                                   max_length_diff=max_length_diff)
    if audio_fps != fps:
      notes.append(f"speaker_audio: resampled {audio_fps:g} -> {fps:g} fps")
    if note:
      notes.append(note)
  t = min(t_s, t_l)
  min_frames = _min_frames()
  if t < min_frames:
    raise _record_error(
        f"{source}: clip has {t} frame(s); the records need >= {min_frames}")
  if t_s != t_l:
    notes.append(f"trimmed speaker {t_s} / listener {t_l} frames to {t}")
  clip = {
      "speaker_motion": speaker[:t],
      "listener_motion": listener[:t],
      "speaker_audio": audio[:t],
      "clip_id": str(clip_id),
      "speaker_id": str(speaker_id),
      "listener_id": str(listener_id),
      "session_id": str(session_id),
      "fps": float(fps),
  }
  return ConvertedClip(clip=clip, source=source, notes=tuple(notes))


def _load_dict(path: pathlib.Path, keys: Sequence[str],
               max_pickle_bytes: int | None = None) -> dict[str, Any]:
  """Safely loads a pickled dict and checks that `keys` are present.

  `max_pickle_bytes` bounds what unpickling may allocate (see
  `safe_pickle.load_pickle`; None: half the memory available).
  """
  if not path.is_file():
    raise _record_error(f"{path}: file does not exist")
  data = safe_pickle.load_pickle(path, max_bytes=max_pickle_bytes)
  if not isinstance(data, dict):
    raise _record_error(
        f"{path}: expected a pickled dict, got {type(data).__name__}")
  missing = [k for k in keys if k not in data]
  if missing:
    raise _record_error(
        f"{path}: missing key(s) {missing}; found {sorted(map(str, data))}")
  return data


# ---------------------------------------------------------------------------
# ViCo / LM_Listener per-utterance pickles.


def _read_text(path: PathLike, what: str, newline: str | None = None) -> str:
  """The UTF-8 text of `path` (a BOM is dropped); errors name the file and what it is."""
  try:
    with open(path, encoding="utf-8-sig", newline=newline) as f:
      return f.read()
  except FileNotFoundError:
    raise _record_error(f"{path}: {what} does not exist") from None
  except IsADirectoryError:
    raise _record_error(f"{path}: {what} is a directory, not a file") from None
  except UnicodeDecodeError as e:
    raise _record_error(f"{path}: {what} is not UTF-8 text ({e.reason} at byte "
                        f"{e.start})") from None
  except OSError as e:
    raise _record_error(f"{path}: cannot read the {what} ({e.strerror})") from None


def read_id_list(path: PathLike) -> list[str]:
  """Reads utterance ids, one per line; blank lines and '#' comments skipped.

  A trailing ".pkl" is stripped so lists of file names work too.

  Raises:
    RecordError: The file is missing, a directory, or not UTF-8 text.
  """
  ids = []
  for line in _read_text(path, "id list").splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
      ids.append(line[:-4] if line.endswith(".pkl") else line)
  return ids


def read_vico_metadata(path: PathLike) -> dict[str, VicoMeta]:
  """Reads the ViCo metadata CSV (`RLD_data.csv`) keyed by utterance id.

  The first row is a header (the official code reads it with pandas'
  defaults); columns are used by position, as the official loaders do.

  Raises:
    RecordError: The file is missing, a directory, not UTF-8 or not CSV, a row
      has fewer than 7 columns or an id repeats.
  """
  out: dict[str, VicoMeta] = {}
  rows = csv.reader(io.StringIO(_read_text(path, "metadata CSV", newline="")))
  try:
    next(rows, None)  # Header.
    for line_no, row in enumerate(rows, start=2):
      if not row or not any(cell.strip() for cell in row):
        continue
      if len(row) < 7:
        raise _record_error(
            f"{path}: line {line_no} has {len(row)} columns, expected >= 7 "
            "(sentiment, id, listener video, speaker video, listener id, "
            "speaker id, split)")
      meta = VicoMeta(*(cell.strip() for cell in row[:7]))
      if meta.clip_id in out:
        raise _record_error(
            f"{path}: line {line_no} repeats utterance id '{meta.clip_id}'")
      out[meta.clip_id] = meta
  except csv.Error as e:
    raise _record_error(f"{path}: not a readable CSV file (line {rows.line_num}: "
                        f"{e})") from None
  return out


def convert_vico_file(path: PathLike, *, fps: float = DEFAULT_FPS["vico"],
                      audio_fps: float | None = None,
                      max_length_diff: int = DEFAULT_MAX_LENGTH_DIFF,
                      meta: VicoMeta | None = None,
                      max_pickle_bytes: int | None = None) -> ConvertedClip:
  """Converts one ViCo / LM_Listener-style utterance pickle.

  Args:
    path: `<clip_id>.pkl` holding `video_speaker`, `video_listener`, `audio`.
    fps: Video frame rate (ViCo processed files: 30).
    audio_fps: See `make_clip`. The official processed files already store
      audio with one row per video frame, so None (match length) is the
      identity for them.
    max_length_diff: See `make_clip`.
    meta: Metadata row for speaker/listener ids; ids are "" without it.
    max_pickle_bytes: Bound of what unpickling may allocate (None: half the
      memory available; `safe_pickle.load_pickle`).

  Returns:
    The converted clip. session_id is the clip id (ViCo has no session ids).
  """
  path = pathlib.Path(path)
  data = _load_dict(path, ("video_speaker", "video_listener", "audio"),
                    max_pickle_bytes)
  clip_id = path.stem
  return make_clip(
      source=str(path),
      speaker_motion=_field(data, "video_speaker", path, MOTION_DIM),
      listener_motion=_field(data, "video_listener", path, MOTION_DIM),
      speaker_audio=_field(data, "audio", path, AUDIO_DIM), clip_id=clip_id,
      speaker_id=meta.speaker_id if meta else "",
      listener_id=meta.listener_id if meta else "",
      session_id=clip_id, fps=fps, audio_fps=audio_fps,
      max_length_diff=max_length_diff)


def _field(data: Mapping[str, Any], key: str, path: pathlib.Path,
           width: int) -> np.ndarray:
  """Returns data[key] as checked float32 [T, width], errors naming `key`."""
  value = data[key]
  # Some feature dumps keep the extractor's batch axis of one.
  if isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[0] == 1:
    value = value[0]
  return check_array(value, str(path), key, width)


def vico_sources(src: PathLike, ids: Iterable[str] | None = None
                 ) -> list[pathlib.Path]:
  """Lists `<src>/<id>.pkl` for `ids`, or every `*.pkl` in `src` (sorted).

  Missing files are returned too: converting them raises a RecordError that
  names them (the official loader skips them silently).
  """
  src = pathlib.Path(src)
  if ids is None:
    return sorted(p for p in src.glob("*.pkl") if p.is_file())
  return [src / f"{i}.pkl" for i in ids]


# ---------------------------------------------------------------------------
# CANDOR speaker/ + listener/ pickles.


def candor_sources(src: PathLike, ids: Iterable[str] | None = None
                   ) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """Pairs `<src>/speaker/<id>.pkl` with `<src>/listener/<id>.pkl`.

  Args:
    src: Folder holding `speaker/` and `listener/`.
    ids: Utterance ids; default every speaker file (sorted).

  Returns:
    (speaker path, listener path) pairs; a missing listener file surfaces as
    a RecordError at conversion (the official loader skips it silently).
  """
  src = pathlib.Path(src)
  if ids is None:
    ids = sorted(p.stem for p in (src / "speaker").glob("*.pkl"))
  return [(src / "speaker" / f"{i}.pkl", src / "listener" / f"{i}.pkl")
          for i in ids]


def convert_candor_pair(speaker_path: PathLike, listener_path: PathLike, *,
                        fps: float = DEFAULT_FPS["candor"],
                        audio_fps: float | None = None,
                        max_length_diff: int = DEFAULT_MAX_LENGTH_DIFF,
                        max_pickle_bytes: int | None = None) -> ConvertedClip:
  """Converts one CANDOR utterance (speaker pickle + listener pickle).

  The listener window of the official preprocessing starts one frame
  (200 ms) after the speaker's; we keep it as stored.

  Args:
    speaker_path: Pickle with `video` [T, 56] and `audio` [T_a, 768].
    listener_path: Pickle with `video` [T, 56].
    fps: Video frame rate (official processed CANDOR: 5).
    audio_fps: See `make_clip` (processed CANDOR audio is already 5 fps).
    max_length_diff: See `make_clip`.
    max_pickle_bytes: See `convert_vico_file`.

  Returns:
    The converted clip. clip_id is the file stem `<session>_<utterance>`,
    session_id the part before the first "_" (how the official code splits
    train/val); speaker/listener ids are "" (the files do not carry them).
  """
  speaker_path = pathlib.Path(speaker_path)
  listener_path = pathlib.Path(listener_path)
  speaker = _load_dict(speaker_path, ("video", "audio"), max_pickle_bytes)
  listener = _load_dict(listener_path, ("video",), max_pickle_bytes)
  clip_id = speaker_path.stem
  source = f"{speaker_path} + {listener_path}"
  return make_clip(
      source=source,
      speaker_motion=_field(speaker, "video", speaker_path, MOTION_DIM),
      listener_motion=_field(listener, "video", listener_path, MOTION_DIM),
      speaker_audio=_field(speaker, "audio", speaker_path, AUDIO_DIM),
      clip_id=clip_id,
      session_id=clip_id.split("_", 1)[0], fps=fps, audio_fps=audio_fps,
      max_length_diff=max_length_diff)


# ---------------------------------------------------------------------------
# Raw EMOCA folders (+ HuBERT + ViCo metadata).


def _load_npy_vector(path: pathlib.Path, width: int) -> np.ndarray:
  """Loads a [width] (or [1, width]) .npy without allowing pickled objects."""
  if not path.is_file():
    raise _record_error(f"{path}: missing EMOCA file")
  try:
    value = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise _record_error(f"{path}: unreadable .npy ({e})") from e
  if value.size != width or value.ndim > 2:
    raise _record_error(
        f"{path}: shape {value.shape}, expected [{width}]")
  return value.reshape(width)


def load_emoca_folder(folder: PathLike) -> np.ndarray:
  """Reads one EMOCA video folder into [T, 56] pose-then-expression motion.

  Frames are the sub-folders of `folder`, sorted by name (EMOCA writes
  zero-padded frame names, so this is time order, as in the official code);
  hidden entries and plain files are ignored. Each frame needs `pose.npy`
  (6: global rotation 3 + jaw 3) and `exp.npy` (50).

  Raises:
    RecordError: No frame folders, a missing/ill-shaped file, or NaN/Inf.
  """
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise _record_error(f"{folder}: EMOCA folder does not exist")
  frames = sorted(p for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith("."))
  if not frames:
    raise _record_error(f"{folder}: no EMOCA frame folders")
  motion = np.empty((len(frames), MOTION_DIM), dtype=np.float32)
  for i, frame in enumerate(frames):
    # Pose first, then expression: the official concatenation order.
    motion[i, :POSE_DIM] = _load_npy_vector(frame / "pose.npy", POSE_DIM)
    motion[i, POSE_DIM:] = _load_npy_vector(frame / "exp.npy", EXP_DIM)
  return check_array(motion, str(folder), "motion", MOTION_DIM)


def load_hubert(path: PathLike,
                max_pickle_bytes: int | None = None) -> np.ndarray:
  """Loads HuBERT features [T_a, 768] from `.npy` or a pickle.

  Pickles may hold the array, a [1, T_a, 768] array, or a list/tuple whose
  first element is one of those (the official files are read as `[0]`).
  Pickled torch tensors are refused by the restricted unpickler: convert them
  to numpy first.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise _record_error(f"{path}: missing HuBERT feature file")
  if path.suffix == ".npy":
    try:
      value = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise _record_error(f"{path}: unreadable .npy ({e})") from e
  else:
    value = safe_pickle.load_pickle(path, max_bytes=max_pickle_bytes)
    if isinstance(value, (list, tuple)):
      if not value:
        raise _record_error(f"{path}: empty {type(value).__name__}")
      value = value[0]
  if isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[0] == 1:
    value = value[0]
  return check_array(value, str(path), "audio", AUDIO_DIM)


def _find_in(folder: pathlib.Path, stem: str,
             suffixes: Sequence[str]) -> pathlib.Path:
  """Returns folder/stem+suffix for the first existing suffix (else first)."""
  for suffix in suffixes:
    candidate = folder / f"{stem}{suffix}"
    if candidate.is_file():
      return candidate
  return folder / f"{stem}{suffixes[0]}"


def emoca_video_folder(emoca_root: PathLike, video: str,
                       subdir: str | None = DEFAULT_EMOCA_SUBDIR
                       ) -> pathlib.Path:
  """Returns `<emoca_root>/<video>/<subdir>` if it exists, else the video dir.

  The official layout nests frames under `EMOCA_v2_lr_mse_20`; other EMOCA
  runs write them directly into the video folder.
  """
  base = pathlib.Path(emoca_root) / video
  if subdir and (base / subdir).is_dir():
    return base / subdir
  return base


def convert_emoca_utterance(src: PathLike, meta: VicoMeta, *,
                            fps: float = DEFAULT_FPS["emoca"],
                            audio_fps: float | None = HUBERT_FPS,
                            max_length_diff: int = DEFAULT_MAX_LENGTH_DIFF,
                            emoca_subdir: str | None = DEFAULT_EMOCA_SUBDIR,
                            max_pickle_bytes: int | None = None
                            ) -> ConvertedClip:
  """Converts one utterance from raw EMOCA folders and HuBERT features.

  Layout (the inputs of the official `vico_preprocessing.py`)::

    <src>/emoca/<video>/[EMOCA_v2_lr_mse_20/]<frame>/{pose.npy,exp.npy}
    <src>/hubert/<clip_id>.{pkl,npy}

  with `meta` naming the speaker and listener videos.

  Args:
    src: Dataset root.
    meta: Metadata row of the utterance.
    fps: Video frame rate (ViCo: 30).
    audio_fps: HuBERT frame rate (50); None stretches to match length.
    max_length_diff: See `make_clip`.
    emoca_subdir: Optional sub-folder inside each video folder.
    max_pickle_bytes: See `convert_vico_file` (HuBERT pickles).

  Returns:
    The converted clip (session_id is the clip id).
  """
  src = pathlib.Path(src)
  speaker_dir = emoca_video_folder(src / "emoca", meta.speaker_video,
                                   emoca_subdir)
  listener_dir = emoca_video_folder(src / "emoca", meta.listener_video,
                                    emoca_subdir)
  audio_path = _find_in(src / "hubert", meta.clip_id, (".pkl", ".npy"))
  speaker = load_emoca_folder(speaker_dir)
  listener = load_emoca_folder(listener_dir)
  audio = load_hubert(audio_path, max_pickle_bytes)
  return make_clip(
      source=f"{speaker_dir} + {listener_dir} + {audio_path}",
      speaker_motion=speaker, listener_motion=listener, speaker_audio=audio,
      clip_id=meta.clip_id, speaker_id=meta.speaker_id,
      listener_id=meta.listener_id, session_id=meta.clip_id, fps=fps,
      audio_fps=audio_fps, max_length_diff=max_length_diff)


# ---------------------------------------------------------------------------
# Driver shared by the CLI and tests.


def check_src(src: PathLike) -> None:
  """Raises RecordError unless `src` is an existing dataset folder."""
  if not os.path.exists(src):
    raise _record_error(f"{src}: the dataset folder does not exist")
  if not os.path.isdir(src):
    raise _record_error(f"{src}: the dataset folder is a file, not a folder")


def iter_converted(fmt: str, src: PathLike, *, fps: float | None = None,
                   audio_fps: float | None = None,
                   max_length_diff: int = DEFAULT_MAX_LENGTH_DIFF,
                   ids: Sequence[str] | None = None,
                   metadata: Mapping[str, VicoMeta] | None = None,
                   split: str | None = None,
                   emoca_subdir: str | None = DEFAULT_EMOCA_SUBDIR,
                   on_error: Callable[[str, Exception], None] | None = None,
                   max_pickle_bytes: int | None = None
                   ) -> Iterator[ConvertedClip]:
  """Converts every selected utterance of a dataset, lazily.

  Selection: `ids` if given; else, with `metadata`, the rows whose split
  column equals `split`; else every file (vico/candor; emoca needs metadata).

  Args:
    fmt: "vico", "candor" or "emoca".
    src: Dataset folder (see the per-format converters).
    fps: Video frame rate; default `DEFAULT_FPS[fmt]`.
    audio_fps: Audio frame rate; None = match length. For "emoca" pass
      `HUBERT_FPS` (the CLI does).
    max_length_diff: See `make_clip`.
    ids: Utterance ids to convert.
    metadata: ViCo metadata (vico: ids and split; emoca: required).
    split: Split name for metadata-based selection.
    emoca_subdir: See `convert_emoca_utterance`.
    on_error: If given, called with (source, error) for each RecordError /
      OSError and the utterance is skipped; otherwise the error propagates.
    max_pickle_bytes: See `convert_vico_file`.

  Yields:
    Converted clips in selection order.

  Raises:
    RecordError: `src` is not a directory (at the first clip), and see above.
  """
  if fmt not in DEFAULT_FPS:
    raise ValueError(f"unknown format {fmt!r}; expected one of "
                     f"{sorted(DEFAULT_FPS)}")
  check_src(src)
  fps = DEFAULT_FPS[fmt] if fps is None else fps
  if ids is None and metadata is not None and split is not None:
    ids = [m.clip_id for m in metadata.values() if m.split == split]
  jobs: list[tuple[str, Callable[[], ConvertedClip]]] = []
  common = dict(fps=fps, audio_fps=audio_fps, max_length_diff=max_length_diff,
                max_pickle_bytes=max_pickle_bytes)
  if fmt == "vico":
    for path in vico_sources(src, ids):
      meta = metadata.get(path.stem) if metadata else None
      jobs.append((str(path), _bind(convert_vico_file, path, meta=meta,
                                    **common)))
  elif fmt == "candor":
    for s_path, l_path in candor_sources(src, ids):
      jobs.append((str(s_path), _bind(convert_candor_pair, s_path, l_path,
                                      **common)))
  else:
    if metadata is None:
      raise ValueError("format 'emoca' needs the ViCo metadata CSV to pair "
                       "speaker and listener videos")
    for clip_id in (ids if ids is not None else sorted(metadata)):
      jobs.append((clip_id, _bind(_convert_emoca_by_id, src, metadata,
                                  clip_id, emoca_subdir=emoca_subdir,
                                  **common)))
  record_error = type(_record_error(""))
  for source, job in jobs:
    try:
      yield job()
    except (record_error, OSError) as e:
      if on_error is None:
        raise
      on_error(source, e)


def _bind(fn: Callable[..., ConvertedClip], *args: Any,
          **kwargs: Any) -> Callable[[], ConvertedClip]:
  """Defers `fn(*args, **kwargs)` so errors surface per utterance."""
  return lambda: fn(*args, **kwargs)


def _convert_emoca_by_id(src: PathLike, metadata: Mapping[str, VicoMeta],
                         clip_id: str, **kwargs: Any) -> ConvertedClip:
  """Looks `clip_id` up in the metadata, then converts it."""
  meta = metadata.get(clip_id)
  if meta is None:
    raise _record_error(f"utterance '{clip_id}' is not in the metadata CSV")
  return convert_emoca_utterance(src, meta, **kwargs)
