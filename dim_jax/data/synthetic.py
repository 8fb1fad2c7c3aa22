"""Embedded synthetic dyadic data: a speaker and a listener who reacts to them.

The real DIM datasets (ViCo, LM_Listener, CANDOR) are large and licence-bound, so tests, the
demo and notebooks train on this generator instead. It is deterministic from a seed and its
listener *reacts* to the speaker with documented structure, so a model that uses dyadic
context can be shown to beat one that does not.

Every clip is simulated over ``HISTORY_SECONDS`` of warm-up before its first frame and the
warm-up is then cut off, so lagged and integrated reactions are already in their steady state
at frame 0 (the listener's first frames react to speaker behaviour "before" the clip).
All time constants are in seconds and converted to frames with the clip's ``fps`` (the
frame counts below are at the default 30 fps).

Motion per frame is 56 floats in EMOCA order: pose (6: global rotation pitch/yaw/roll 0:3,
jaw 3:6) then expression (50). Below, ``exp[k]`` is motion column ``6 + k``.

Speaker:
  * Speech activity: alternating speech segments of U(``SPEECH_SECONDS``) and pauses of
    U(``PAUSE_SECONDS``); the binary on/off signal ``speaking`` is smoothed with a Hann window
    of ``ACTIVITY_EDGE_SECONDS`` into ``speech_activity`` in [0, 1].
  * Jaw opening (pose 3) = ``SPEAKER_JAW_GAIN`` (0.25 rad) * speech_activity *
    (0.5 + 0.5 sin(2 pi f_syl t + phase)), f_syl ~ U(``SYLLABLE_HZ``) (3-5 Hz syllables).
    Pose 4:6 (other jaw axes): N(0, 0.01) noise.
  * Head rotation (pose 0:3): slow drift, per axis a sum of 2 sinusoids of amplitude
    U(0.02, 0.05) rad and frequency U(``HEAD_DRIFT_HZ``) (0.05-0.3 Hz).
  * Expression: ``SPEAKER_EXPRESSION_ACTIVE_DIMS`` (6) leading dims are sums of 3 sinusoids of
    amplitude U(0.4, 0.9) and frequency U(``EXPRESSION_HZ``) (0.2-1.0 Hz) with random phases,
    plus N(0, 0.05) noise; the remaining 44 dims are N(0, 0.1) noise.
  * Audio [T, 768] ("HuBERT features"): per-frame features (speech_activity,
    speech_activity * syllable oscillation, energy = speech_activity * slow envelope, 1)
    times a fixed [4, 768] N(0, 1) projection drawn from ``AUDIO_PROJECTION_SEED`` (the same
    for every clip and seed), plus N(0, ``AUDIO_NOISE``) noise. Audio therefore carries speech
    activity (pauses) and syllable rhythm, but not the speaker's expression.

Listener (the learnable dyadic structure):
  * Delayed mirroring: ``exp[0:3] = MIRROR_GAIN (0.7) * speaker exp[0:3]`` delayed by
    ``MIRROR_LAG_SECONDS`` (8 frames at 30 fps) and smoothed by a centred 5-frame Hann window
    (so frame t depends on speaker frames t-10..t-6: causal). The speaker's current frame
    predicts this worse than the lagged one (expression moves up to 1 Hz: 96 deg in 8 frames).
  * Nods: every pause onset of the speaker (speaking 1 -> 0) triggers, ``NOD_DELAY_SECONDS``
    (0.2 s = 6 frames) later, a damped oscillation of the head pitch (pose 0):
    ``NOD_AMPLITUDE_RAD (0.15) * exp(-tau / NOD_DECAY_SECONDS (0.3)) * sin(2 pi NOD_HZ (2.0) tau)``
    for tau in [0, 1) s; its first peak (about +0.10 rad) is 3 frames after it starts.
  * Smile: ``exp[3] = SMILE_GAIN (1.2) * leaky_integral(speaking)`` with time constant
    ``SMILE_SECONDS`` (2 s): it rises while the speaker talks for long and decays in pauses.
  * Posture: the listener's head rotation (pose 0:3) is offset by a per-clip constant
    N(0, ``LISTENER_POSTURE_RAD`` (0.03)) rad per axis, the way a person sits towards the
    camera. It belongs to the person in this clip, not to the moment: the clip's first frame
    shows it (the official first-frame protocol carries it into generation) and
    `listener_redraws` keeps it. (Until 2026-11 the head had no posture and a larger drift,
    U(0.01, 0.03) per sinusoid; then even the data's own law lost pose FD to the Random
    baseline, because every faithful sample paid the unpredictable per-clip offset twice.)
  * Idiosyncratic, not predictable from the speaker: head sway of amplitude
    ``LISTENER_SWAY_RAD`` U(0.005, 0.015) rad per sinusoid and axis (2 sinusoids at
    ``HEAD_DRIFT_HZ``), exp[4:6] own sinusoids (amplitude U(0.1, 0.3), 0.2-1.0 Hz), jaw pose 3 at
    0.02 rad, and N(0, ``LISTENER_NOISE``) (0.05) noise on every expression dim and N(0, 0.005)
    on every pose dim.

Randomness: clip ``i`` of ``generate_clips(seed=s, id_prefix=p)`` draws everything from
``np.random.default_rng([s, crc32(p), i])``, so a clip does not depend on how many clips are
generated, and splits with different prefixes are independent.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any, Optional

import numpy as np

from dim_jax import files
from dim_jax.data import records

POSE_DIM = records.POSE_DIM
EXPRESSION_DIM = records.EXPRESSION_DIM
MOTION_DIM = records.MOTION_DIM
AUDIO_DIM = records.AUDIO_DIM

HISTORY_SECONDS = 6.0

# Speaker.
SPEECH_SECONDS = (0.8, 3.0)
PAUSE_SECONDS = (0.3, 1.2)
ACTIVITY_EDGE_SECONDS = 0.15
SYLLABLE_HZ = (3.0, 5.0)
SPEAKER_JAW_GAIN = 0.25
HEAD_DRIFT_HZ = (0.05, 0.3)
EXPRESSION_HZ = (0.2, 1.0)
SPEAKER_EXPRESSION_ACTIVE_DIMS = 6
AUDIO_PROJECTION_SEED = 20240917
AUDIO_NOISE = 0.1

# Listener.
MIRROR_DIMS = 3
MIRROR_GAIN = 0.7
MIRROR_LAG_SECONDS = 8.0 / 30.0
MIRROR_SMOOTH_FRAMES = 5
NOD_DELAY_SECONDS = 0.2
NOD_AMPLITUDE_RAD = 0.15
NOD_HZ = 2.0
NOD_DECAY_SECONDS = 0.3
NOD_DURATION_SECONDS = 1.0
SMILE_DIM = 3
SMILE_GAIN = 1.2
SMILE_SECONDS = 2.0
LISTENER_NOISE = 0.05
LISTENER_POSTURE_RAD = 0.03
LISTENER_SWAY_RAD = (0.005, 0.015)

# Column indices inside the 56-wide motion vector.
PITCH = 0
JAW_OPEN = 3


def expression_column(k: int) -> int:
  """Motion column of expression coefficient ``k`` (pose comes first)."""
  return POSE_DIM + k


def mirror_lag_frames(fps: float = 30.0) -> int:
  """Delay of the listener's mirrored expression, in frames (8 at 30 fps)."""
  return int(round(MIRROR_LAG_SECONDS * fps))


def nod_delay_frames(fps: float = 30.0) -> int:
  """Frames from a speaker pause onset to the start of the listener's nod (6 at 30 fps)."""
  return int(round(NOD_DELAY_SECONDS * fps))


def _hann(width: int) -> np.ndarray:
  """Normalised Hann smoothing kernel with ``width`` non-zero taps."""
  kernel = np.hanning(width + 2)[1:-1]
  return kernel / kernel.sum()


def _smooth(signal: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """Centred ('same') convolution along axis 0 of a [frames] or [frames, dims] signal."""
  if signal.ndim == 1:
    return np.convolve(signal, kernel, mode="same")
  return np.stack([np.convolve(column, kernel, mode="same") for column in signal.T], axis=1)


def _causal_filter(signal: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """Causal FIR filter: out[t] = sum_k kernel[k] * signal[t - k] (zero before frame 0)."""
  return np.convolve(signal, kernel, mode="full")[: signal.shape[0]]


def _sinusoid_sum(rng: np.random.Generator, times: np.ndarray, dims: int, terms: int,
                  amplitude: tuple[float, float], hz: tuple[float, float]) -> np.ndarray:
  """Smooth random processes: per dim a sum of ``terms`` sinusoids with random phases.

  Returns:
    [frames, dims] float64.
  """
  amplitudes = rng.uniform(*amplitude, size=(dims, terms))
  freqs = rng.uniform(*hz, size=(dims, terms))
  phases = rng.uniform(0.0, 2.0 * np.pi, size=(dims, terms))
  angles = 2.0 * np.pi * freqs[None] * times[:, None, None] + phases[None]
  return (amplitudes[None] * np.sin(angles)).sum(axis=-1)


def _speaking_mask(rng: np.random.Generator, frames: int, fps: float) -> np.ndarray:
  """Binary speech on/off signal [frames] of alternating speech segments and pauses."""
  # Draw enough segments to cover the clip even if every segment has the minimum length.
  shortest = max(1, int(min(SPEECH_SECONDS[0], PAUSE_SECONDS[0]) * fps))
  pairs = frames // shortest + 2
  speech = np.maximum(1, np.round(rng.uniform(*SPEECH_SECONDS, size=pairs) * fps))
  pause = np.maximum(1, np.round(rng.uniform(*PAUSE_SECONDS, size=pairs) * fps))
  durations = np.stack([speech, pause], axis=1).reshape(-1).astype(np.int64)
  is_speech = np.tile([True, False], pairs)
  # Start at a random point of the first segment so clips do not all begin speaking.
  offset = int(rng.integers(0, durations[0] + durations[1]))
  ends = np.cumsum(durations)
  segment = np.searchsorted(ends, np.arange(frames) + offset, side="right")
  return is_speech[segment]


def audio_projection() -> np.ndarray:
  """The fixed [4, 768] projection from speech features to synthetic audio features."""
  return np.random.default_rng(AUDIO_PROJECTION_SEED).standard_normal((4, AUDIO_DIM))


def generate_clip(rng: np.random.Generator, length: int, fps: float = 30.0,
                  clip_id: str = "clip", speaker_id: str = "speaker",
                  listener_id: str = "listener", session_id: str = "session",
                  return_latents: bool = False,
                  listener_rng: Optional[np.random.Generator] = None) -> dict[str, Any]:
  """Simulates one dyadic clip (see the module docstring for the model).

  Args:
    rng: source of all randomness of this clip.
    length: number of frames T (>= 2).
    fps: frame rate; time constants are in seconds.
    clip_id, speaker_id, listener_id, session_id: ids stored with the clip.
    return_latents: also return the hidden signals under ``latents`` (for tests/analysis;
      the record writer ignores that key).
    listener_rng: source of the listener's own randomness (None: ``rng``, which draws it
      after all of the speaker's); another one gives another listener to the same speaker,
      a draw from the listener's true conditional law (`listener_redraws`).

  Returns:
    A clip dict: ``speaker_motion`` [T, 56] float32, ``listener_motion`` [T, 56] float32,
    ``speaker_audio`` [T, 768] float32, the four ids (str) and ``fps`` (float). With
    ``return_latents``, ``latents`` holds ``speaking`` [T] bool, ``speech_activity`` [T]
    float32 and ``nod_starts`` (int64 frames where a listener nod starts, within the clip).
  """
  if length < 2:
    raise ValueError(f"length must be >= 2 frames, got {length}")
  history = int(round(HISTORY_SECONDS * fps))
  frames = history + length
  times = np.arange(frames) / fps

  # --- Speaker --------------------------------------------------------------------------
  speaking = _speaking_mask(rng, frames, fps)
  edge = max(1, int(round(ACTIVITY_EDGE_SECONDS * fps)))
  speech_activity = np.clip(_smooth(speaking.astype(np.float64), _hann(edge)), 0.0, 1.0)
  syllable_hz = rng.uniform(*SYLLABLE_HZ)
  syllable = 0.5 + 0.5 * np.sin(2 * np.pi * syllable_hz * times + rng.uniform(0, 2 * np.pi))

  speaker_pose = np.zeros((frames, POSE_DIM))
  speaker_pose[:, 0:3] = _sinusoid_sum(rng, times, 3, 2, (0.02, 0.05), HEAD_DRIFT_HZ)
  speaker_pose[:, JAW_OPEN] = SPEAKER_JAW_GAIN * speech_activity * syllable
  speaker_pose[:, 4:6] = 0.01 * rng.standard_normal((frames, 2))

  speaker_exp = 0.1 * rng.standard_normal((frames, EXPRESSION_DIM))
  active = SPEAKER_EXPRESSION_ACTIVE_DIMS
  speaker_exp[:, :active] = (_sinusoid_sum(rng, times, active, 3, (0.4, 0.9), EXPRESSION_HZ)
                             + 0.05 * rng.standard_normal((frames, active)))

  envelope = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * times
                                + rng.uniform(0, 2 * np.pi))
  audio_features = np.stack([speech_activity, speech_activity * syllable,
                             speech_activity * envelope, np.ones(frames)], axis=1)
  speaker_audio = (audio_features @ audio_projection()
                   + AUDIO_NOISE * rng.standard_normal((frames, AUDIO_DIM)))

  # --- Listener -------------------------------------------------------------------------
  # The posture comes from the clip's stream, so that redraws of the listener keep it.
  posture = LISTENER_POSTURE_RAD * rng.standard_normal(3)
  rng = rng if listener_rng is None else listener_rng  # every draw below is the listener's
  listener_exp = LISTENER_NOISE * rng.standard_normal((frames, EXPRESSION_DIM))
  lag = mirror_lag_frames(fps)
  delayed = np.zeros((frames, MIRROR_DIMS))
  delayed[lag:] = speaker_exp[: frames - lag, :MIRROR_DIMS]
  listener_exp[:, :MIRROR_DIMS] += MIRROR_GAIN * _smooth(delayed, _hann(MIRROR_SMOOTH_FRAMES))

  smile_frames = SMILE_SECONDS * fps
  decay = np.exp(-1.0 / smile_frames)
  smile_kernel = (1.0 - decay) * decay ** np.arange(int(5 * smile_frames))
  listener_exp[:, SMILE_DIM] += SMILE_GAIN * _causal_filter(speaking.astype(np.float64),
                                                            smile_kernel)
  listener_exp[:, 4:6] += _sinusoid_sum(rng, times, 2, 2, (0.1, 0.3), EXPRESSION_HZ)

  # Nods: an impulse at (pause onset + delay) convolved with the damped-oscillation kernel.
  pause_onsets = np.flatnonzero(speaking[:-1] & ~speaking[1:]) + 1
  nod_starts = pause_onsets + nod_delay_frames(fps)
  nod_starts = nod_starts[nod_starts < frames]
  impulses = np.zeros(frames)
  impulses[nod_starts] = 1.0
  tau = np.arange(int(round(NOD_DURATION_SECONDS * fps))) / fps
  nod_kernel = (NOD_AMPLITUDE_RAD * np.exp(-tau / NOD_DECAY_SECONDS)
                * np.sin(2 * np.pi * NOD_HZ * tau))
  listener_pose = 0.005 * rng.standard_normal((frames, POSE_DIM))
  listener_pose[:, 0:3] += posture + _sinusoid_sum(rng, times, 3, 2, LISTENER_SWAY_RAD,
                                                   HEAD_DRIFT_HZ)
  listener_pose[:, PITCH] += _causal_filter(impulses, nod_kernel)
  listener_pose[:, JAW_OPEN] += 0.02

  # Drop the warm-up so lagged / integrated reactions are stationary from frame 0.
  keep = slice(history, frames)
  clip: dict[str, Any] = {
      "speaker_motion": np.concatenate([speaker_pose, speaker_exp], 1)[keep].astype(np.float32),
      "listener_motion": np.concatenate([listener_pose, listener_exp],
                                        1)[keep].astype(np.float32),
      "speaker_audio": speaker_audio[keep].astype(np.float32),
      "clip_id": clip_id,
      "speaker_id": speaker_id,
      "listener_id": listener_id,
      "session_id": session_id,
      "fps": float(fps),
  }
  if return_latents:
    in_clip = nod_starts[nod_starts >= history] - history
    clip["latents"] = {
        "speaking": speaking[keep].copy(),
        "speech_activity": speech_activity[keep].astype(np.float32),
        "nod_starts": in_clip.astype(np.int64),
    }
  return clip


CLIPS_PER_SESSION = 4


def generate_clips(num_clips: int, seed: int, min_len: int = 48, max_len: int = 160,
                   fps: float = 30.0, id_prefix: str = "clip",
                   return_latents: bool = False) -> list[dict[str, Any]]:
  """Generates ``num_clips`` clips with lengths uniform in [min_len, max_len].

  Clip ``i`` gets id ``f"{id_prefix}-{i:05d}"``; every ``CLIPS_PER_SESSION`` consecutive
  clips share a session and its two people (``...-s0003-a`` speaks, ``...-s0003-b`` listens).

  Args:
    num_clips: how many clips.
    seed: integer seed; together with ``id_prefix`` it fixes every clip bit for bit.
    min_len, max_len: inclusive frame-count range (min_len >= 2).
    fps: frame rate of all clips.
    id_prefix: prefix of the ids; also mixed into each clip's seed.
    return_latents: see ``generate_clip``.

  Returns:
    List of clip dicts (see ``generate_clip``).
  """
  if not 2 <= min_len <= max_len:
    raise ValueError(f"need 2 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
  prefix_key = zlib.crc32(id_prefix.encode("utf-8"))
  clips = []
  for index in range(num_clips):
    rng = np.random.default_rng([seed, prefix_key, index])
    session = index // CLIPS_PER_SESSION
    clips.append(generate_clip(
        rng, int(rng.integers(min_len, max_len + 1)), fps=fps,
        clip_id=f"{id_prefix}-{index:05d}",
        speaker_id=f"{id_prefix}-s{session:04d}-a",
        listener_id=f"{id_prefix}-s{session:04d}-b",
        session_id=f"{id_prefix}-s{session:04d}",
        return_latents=return_latents))
  return clips


def listener_redraws(clips: list[dict[str, Any]], arguments: dict[str, Any],
                     draws: int) -> np.ndarray:
  """Other listeners to the same speakers: the data's own conditional law, as a reference.

  Each clip (as read back from a dataset that `write_synthetic_dataset` wrote with
  ``arguments``, its ``dataset_info.json`` marker) is regenerated with the same speaker,
  audio, reactions' timing and head posture, and the listener's idiosyncratic randomness
  (head sway, own expression sinusoids, noise) drawn afresh ``draws`` times. A perfect
  generative model scores like these draws: what no model can beat on a metric shows here.

  Returns:
    [draws, N, T_max, 56] float32 listener motion, zero past each clip's length.

  Raises:
    ValueError: a clip id is not ``<split>-<index>`` or its regenerated speaker differs from
      the stored one (the records were not written with ``arguments``).
  """
  lengths = [len(clip["listener_motion"]) for clip in clips]
  out = np.zeros((draws, len(clips), max(lengths), MOTION_DIM), np.float32)
  for n, clip in enumerate(clips):
    prefix, _, index = str(clip["clip_id"]).rpartition("-")
    if not prefix or not index.isdigit():
      raise ValueError(f"clip id {clip['clip_id']!r} is not <split>-<index> of a synthetic split")
    key = [int(arguments["seed"]), zlib.crc32(prefix.encode("utf-8")), int(index)]
    for draw in range(draws):
      rng = np.random.default_rng(key)  # the clip's own stream: length, then the speaker
      length = int(rng.integers(int(arguments["min_len"]), int(arguments["max_len"]) + 1))
      redrawn = generate_clip(rng, length, fps=float(arguments["fps"]),
                              listener_rng=np.random.default_rng(key + [1 + draw]))
      if length != lengths[n] or not np.array_equal(redrawn["speaker_motion"],
                                                    clip["speaker_motion"]):
        raise ValueError(f"clip {clip['clip_id']}: regenerating it with {arguments} does not "
                         "give its stored speaker; the records were written otherwise")
      out[draw, n, :length] = redrawn["listener_motion"]
  return out


# Key of dataset_info.json that marks a complete dataset written by `write_synthetic_dataset`
# (added last, after every split), with the arguments it was written with.
INFO_MARKER = "synthetic"
# Version of the generator's law, stored in the marker: a dataset written under another law
# is not reused, and `evaluate` shows no law row for it (its redraws would follow another law).
# 2: the listener's head posture (2026-11). 1 (markers without a version): head drift only.
LAW_VERSION = 2


def law_version(marker: dict[str, Any]) -> int:
  """The law version of a dataset's synthetic marker (1 for markers written before versions)."""
  return int(marker.get("law_version", 1))


def _entries(count: int) -> str:
  return f"{count} entr{'y' if count == 1 else 'ies'}"


def _listing(names: list[str], shown: int = 4) -> str:
  more = f" and {len(names) - shown} more" if len(names) > shown else ""
  return ", ".join(names[:shown]) + more


def check_target_dir(data_dir: str,
                     arguments: Optional[dict[str, Any]] = None) -> Optional[dict[str, Any]]:
  """Checks that the synthetic writer may use ``data_dir``; never writes.

  The writer writes only into an absent or empty directory; a directory holding exactly a
  complete synthetic dataset that it wrote (``INFO_MARKER`` in ``dataset_info.json``, no other
  file) is reused.

  Args:
    data_dir: the directory to write into.
    arguments: the writer's arguments; a reused dataset must have been written with the same
      (None accepts any).

  Returns:
    None if the directory is absent or empty (write it), else the info dict of the reusable
    synthetic dataset there.

  Raises:
    records.RecordError: anything else is there (the message names the directory, how many
      entries it holds and a few of them), or a synthetic dataset written with other
      arguments or missing shards.
  """
  if not os.path.lexists(data_dir):
    return None
  if not os.path.isdir(data_dir):
    raise records.RecordError(f"{data_dir}: not a directory; the synthetic dataset needs an "
                              "empty or new directory")
  entries = sorted(os.listdir(data_dir))
  if not entries:
    return None
  info = None
  if records.INFO_FILENAME in entries:
    try:
      info = records.read_info(data_dir)
    except records.RecordError:
      info = None
  marker = info.get(INFO_MARKER) if info else None
  listed = ({records.INFO_FILENAME} | {shard["file"] for entry in info["splits"].values()
                                       for shard in entry["shards"]}) if marker else set()
  foreign = [name for name in entries if name not in listed]
  if foreign:
    if marker:
      what = (f"{_entries(len(entries))}, {len(foreign)} of them not listed by its synthetic "
              f"dataset_info.json ({_listing(foreign)})")
    else:
      if records.INFO_FILENAME not in entries:
        info_file = "no dataset_info.json" + (
            " (records of an incomplete dataset?)"
            if any(name.endswith(".tfrecord") for name in entries) else "")
      elif info is None:
        info_file = "a dataset_info.json that cannot be read"
      else:
        info_file = "a dataset_info.json that the synthetic writer did not write"
      what = f"{_entries(len(entries))} ({_listing(entries)}) and {info_file}"
    raise records.RecordError(
        f"{data_dir}: holds {what}; the synthetic dataset is written only into an empty or "
        "new directory: choose another data.dir, or remove what is there")
  if law_version(marker) != LAW_VERSION:
    raise records.RecordError(
        f"{data_dir}: holds a synthetic dataset written by an older generator (law version "
        f"{law_version(marker)}, now {LAW_VERSION}: the listener got a head posture); remove "
        "it to write it again, or choose another directory")
  written_with = marker.get("arguments") or {}
  if arguments is not None and written_with != arguments:
    differences = ", ".join(f"{key}={written_with.get(key)} (not {value})"
                            for key, value in arguments.items()
                            if written_with.get(key) != value)
    raise records.RecordError(
        f"{data_dir}: holds a synthetic dataset written with {differences}; choose another "
        "directory, or remove it to write it again")
  for split in info["splits"]:
    records.split_shards(data_dir, split)  # every listed shard is there, at its size
  return info


def write_synthetic_dataset(data_dir: str, seed: int = 0, num_train: int = 256,
                            num_val: int = 32, num_test: int = 32, num_shards: int = 4,
                            min_len: int = 48, max_len: int = 160,
                            fps: float = 30.0) -> dict[str, Any]:
  """Writes train/val/test splits of synthetic clips as TFRecords under ``data_dir``.

  Never writes into a directory holding a file that it did not write (``check_target_dir``):
  ``data_dir`` must be absent or empty, or already hold the complete synthetic dataset of
  the same arguments, which is then returned as it is.

  Args:
    data_dir: output directory (created if needed).
    seed: seed of all three splits (they differ through their id prefixes).
    num_train, num_val, num_test: clips per split; a split with 0 clips is not written.
    num_shards: shards of the train split; val and test get ``min(num_shards, clips)``
      shards too, capped so that no shard is empty.
    min_len, max_len: inclusive clip length range in frames.
    fps: frame rate.

  Returns:
    The dataset info dict (as written to ``dataset_info.json``).

  Raises:
    records.RecordError: ``data_dir`` holds something else (see ``check_target_dir``).
  """
  arguments = dict(seed=int(seed), num_train=int(num_train), num_val=int(num_val),
                   num_test=int(num_test), num_shards=int(num_shards), min_len=int(min_len),
                   max_len=int(max_len), fps=float(fps))
  existing = check_target_dir(data_dir, arguments)
  if existing is not None:
    return existing
  for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
    if count <= 0:
      continue
    clips = generate_clips(count, seed, min_len=min_len, max_len=max_len, fps=fps,
                           id_prefix=split)
    records.write_split(data_dir, split, clips, num_shards=max(1, min(num_shards, count)))
  # The marker goes in last: only a complete dataset carries it.
  info = records.read_info(data_dir)
  info[INFO_MARKER] = {"writer": "dim_jax.data.synthetic.write_synthetic_dataset",
                       "arguments": arguments, "law_version": LAW_VERSION}
  files.write_text_atomic(os.path.join(data_dir, records.INFO_FILENAME),
                          json.dumps(info, indent=2, sort_keys=True) + "\n")
  return info
