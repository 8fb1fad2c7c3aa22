"""Non-learned listener baselines evaluated next to DIM-Listener (LM_Listener / DIM papers).

* ``random``: every frame is a listener frame drawn uniformly from the training split, plus
  small Gaussian noise.
* ``mirror``: the listener copies the speaker's motion, smoothed over time.
* ``nn_motion`` / ``nn_audio``: windowed nearest neighbour; each window of the test speaker's
  motion (or audio) is matched to the closest training speaker window and the listener motion
  of that training window is returned.

Baselines may use the whole training split but never the test split's listener motion: they
only receive the test speaker's motion / audio and the clip lengths.

All arrays are padded: ``[N, T, D]`` plus ``lengths [N]`` (frame ``t`` of clip ``i`` is valid
iff ``t < lengths[i]``). Outputs are float32 ``[N, T, 56]``, exactly 0 on padded frames, and
padded input frames (which may hold garbage or NaN) never influence them. Everything is
vectorised NumPy; loops only run over chunks that bound memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dim_jax.evaluation.metrics import pad_clips, valid_mask

# Same values as records.MOTION_DIM / AUDIO_DIM (a test checks it); not imported from there
# because records imports TensorFlow, which scoring baselines does not need.
MOTION_DIM = 56
AUDIO_DIM = 768

# 9 frames = 0.3 s at the datasets' 30 fps. A centred moving average of that width has its
# first zero at 30 / 9 = 3.3 Hz: it removes per-frame tracking jitter and most of the
# 3-5 Hz syllable-rate jaw motion of talking (a listener does not mirror articulation) while
# keeping the slow (<= 1 Hz) head and expression motion a listener mirrors (gain 0.86 at 1 Hz).
DEFAULT_SMOOTHING_FRAMES = 9
# 32 frames (~1 s at 30 fps): long enough to hold a listener reaction with its cause (a pause
# onset and the nod ~0.2-1 s later, the 8-frame mirroring lag), short enough that the training
# set still holds close matches (nearest neighbours degrade as the key dimension grows).
DEFAULT_WINDOW = 32
# Training windows start every 4 frames: a test window is at most 2 frames out of phase with
# the best-aligned training window, at 1/4 of the cost of indexing every start frame.
DEFAULT_STRIDE = 4
# Top principal components of the audio used as nearest-neighbour keys (see nn_audio_baseline).
DEFAULT_AUDIO_DIMS = 16

BASELINES = ("random", "mirror", "nn_motion", "nn_audio")

_STREAM_WIDTHS = {
    "speaker_motion": MOTION_DIM,
    "listener_motion": MOTION_DIM,
    "speaker_audio": AUDIO_DIM,
}
# Float64 elements per matrix in a chunk of nearest-neighbour search or projection (64 MiB).
_CHUNK_ELEMENTS = 1 << 23




def _check_lengths(lengths: Any, num_clips: int | None, num_frames: int, name: str,
                   min_length: int = 0) -> np.ndarray:
  lengths = np.asarray(lengths)
  if lengths.ndim != 1 or (num_clips is not None and lengths.shape[0] != num_clips):
    expected = "[clips]" if num_clips is None else f"[{num_clips}]"
    raise ValueError(f"{name}: expected shape {expected}, got {lengths.shape}")
  if lengths.size and not np.issubdtype(lengths.dtype, np.integer):
    raise ValueError(f"{name}: expected integers, got dtype {lengths.dtype}")
  lengths = lengths.astype(np.int64)
  bad = (lengths < min_length) | (lengths > num_frames)
  if bad.any():
    index = int(np.argmax(bad))
    raise ValueError(f"{name}[{index}] = {lengths[index]}: lengths must lie in "
                     f"[{min_length}, {num_frames}] (the padded frame count)")
  return lengths


def _check_padded(name: str, array: Any, lengths: Any, width: int | None,
                  min_length: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Validates a padded ``[N, T, width]`` array; returns it, its lengths and valid mask."""
  array = np.asarray(array)
  if array.ndim != 3 or (width is not None and array.shape[2] != width):
    raise ValueError(f"{name}: expected shape [clips, frames, {width or 'features'}], got "
                     f"{array.shape}")
  if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
    raise ValueError(f"{name}: expected a float array, got dtype {array.dtype}")
  lengths = _check_lengths(lengths, array.shape[0], array.shape[1], f"{name} lengths",
                           min_length)
  mask = valid_mask(lengths, array.shape[1])
  bad = mask & ~np.isfinite(array).all(axis=2)
  if bad.any():
    clip, frame = (int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"{name}: NaN or Inf in valid frame {frame} of clip {clip} "
                     f"(length {lengths[clip]}); only padded frames may be non-finite")
  return array, lengths, mask


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingClips:
  """The training split, padded; baselines may use all of it.

  ``eq=False``: element-wise array equality has no single truth value.

  Attributes:
    speaker_motion: [M, T, 56] float32.
    listener_motion: [M, T, 56] float32.
    speaker_audio: [M, T, 768] float32.
    lengths: [M] int64, each in [1, T]; frames at ``t >= lengths[m]`` are padding (any value).
  """

  speaker_motion: np.ndarray
  listener_motion: np.ndarray
  speaker_audio: np.ndarray
  lengths: np.ndarray

  def __post_init__(self) -> None:
    shape = None
    for field, width in _STREAM_WIDTHS.items():
      array, lengths, _ = _check_padded(f"TrainingClips.{field}", getattr(self, field),
                                        self.lengths, width, min_length=1)
      if shape is None:
        shape = array.shape[:2]
        if shape[0] == 0:
          raise ValueError("TrainingClips: no clips")
      elif array.shape[:2] != shape:
        raise ValueError(f"TrainingClips.{field}: shape {array.shape} does not match "
                         f"[clips, frames] = {list(shape)} of speaker_motion")
      object.__setattr__(self, field, array.astype(np.float32, copy=False))
    object.__setattr__(self, "lengths", lengths)

  @classmethod
  def from_clips(cls, clips: Sequence[Mapping[str, Any]]) -> TrainingClips:
    """Pads clip dicts (as returned by ``records.read_clips``) into one ``TrainingClips``.

    Args:
      clips: dicts with ``speaker_motion`` [T, 56], ``listener_motion`` [T, 56] and
        ``speaker_audio`` [T, 768]; ``clip_id`` and ``length`` are used when present.

    Raises:
      ValueError: no clips, or a clip with a missing stream, wrong shape, streams of
        different frame counts, no frames, a ``length`` that disagrees with its streams,
        or NaN / Inf (the message names the clip id and the field).
    """
    if not clips:
      raise ValueError("TrainingClips.from_clips: no clips")
    streams: dict[str, list[np.ndarray]] = {field: [] for field in _STREAM_WIDTHS}
    lengths = []
    for index, clip in enumerate(clips):
      where = f"training clip {index} (clip_id {clip.get('clip_id', '<none>')!r})"
      frames = None
      for field, width in _STREAM_WIDTHS.items():
        if field not in clip:
          raise ValueError(f"{where}: missing field {field}")
        array = np.asarray(clip[field])
        if array.ndim != 2 or array.shape[1] != width:
          raise ValueError(f"{where}: field {field}: expected shape [frames, {width}], got "
                           f"{array.shape}")
        if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
          raise ValueError(f"{where}: field {field}: expected a float array, got dtype "
                           f"{array.dtype}")
        bad_frames = ~np.isfinite(array).all(axis=1)
        if bad_frames.any():
          raise ValueError(f"{where}: field {field}: NaN or Inf at frame "
                           f"{int(np.argmax(bad_frames))}")
        if frames is None:
          frames = array.shape[0]
        elif array.shape[0] != frames:
          raise ValueError(f"{where}: field {field} has {array.shape[0]} frames, "
                           f"speaker_motion has {frames}")
        streams[field].append(array)
      if frames == 0:
        raise ValueError(f"{where}: no frames")
      if "length" in clip and int(clip["length"]) != frames:
        raise ValueError(f"{where}: field length = {clip['length']} but the streams have "
                         f"{frames} frames")
      lengths.append(frames)
    padded = {field: pad_clips(arrays)[0] for field, arrays in streams.items()}
    return cls(**padded, lengths=np.asarray(lengths, np.int64))

  @property
  def num_frames(self) -> int:
    return self.speaker_motion.shape[1]

  def mask(self) -> np.ndarray:
    """[M, T] bool mask of valid frames."""
    return valid_mask(self.lengths, self.num_frames)


def random_baseline(train: TrainingClips, lengths: Any, num_frames: int,
                    rng: np.random.Generator, noise_scale: float = 0.1) -> np.ndarray:
  """Training listener frames drawn independently and uniformly, plus small noise.

  Each valid output frame is one of the valid training listener frames (all frames of the
  split equally likely, whatever clip they are in) plus Gaussian noise of standard deviation
  ``noise_scale`` times that dimension's standard deviation over the training frames.

  Args:
    train: the training split.
    lengths: [N] valid frames of each output clip.
    num_frames: T, the padded output length.
    rng: source of the draws (same state, same output).
    noise_scale: noise std in units of the per-dim training std (>= 0).

  Returns:
    [N, T, 56] float32, 0 on padded frames.
  """
  if noise_scale < 0:
    raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
  lengths = _check_lengths(lengths, None, num_frames, "lengths")
  pool = train.listener_motion[train.mask()]
  std = pool.std(axis=0, dtype=np.float64)
  # Draw for padded frames too: a clip's draws then do not depend on the lengths.
  index = rng.integers(0, pool.shape[0], size=(lengths.shape[0], num_frames))
  noise = rng.standard_normal((lengths.shape[0], num_frames, MOTION_DIM))
  out = pool[index] + (noise_scale * std) * noise
  return np.where(valid_mask(lengths, num_frames)[..., None], out, 0.0).astype(np.float32)


def mirror_baseline(speaker_motion: Any, lengths: Any,
                    smoothing_frames: int = DEFAULT_SMOOTHING_FRAMES) -> np.ndarray:
  """The speaker's own motion, smoothed by a centred moving average.

  The window covers frames ``t - (w - 1) // 2 .. t + w // 2`` (``w = smoothing_frames``;
  centred for odd ``w``) and averages only the valid frames under it, so clip ends are not
  pulled towards zero and padding never leaks in. Offline evaluation: the future half of the
  window is available. See ``DEFAULT_SMOOTHING_FRAMES`` for the default width.

  Args:
    speaker_motion: [N, T, 56] test speaker motion.
    lengths: [N] valid frames.
    smoothing_frames: window width w >= 1 (1 copies the speaker).

  Returns:
    [N, T, 56] float32, 0 on padded frames.
  """
  if smoothing_frames < 1:
    raise ValueError(f"smoothing_frames must be >= 1, got {smoothing_frames}")
  motion, lengths, mask = _check_padded("speaker_motion", speaker_motion, lengths,
                                        MOTION_DIM)
  num_clips, num_frames, width = motion.shape
  values = np.where(mask[..., None], motion, 0.0).astype(np.float64)
  # Window sums as differences of prefix sums (a leading 0 makes window [lo, hi) = c[hi]-c[lo]).
  sums = np.zeros((num_clips, num_frames + 1, width))
  np.cumsum(values, axis=1, out=sums[:, 1:])
  counts = np.zeros((num_clips, num_frames + 1))
  np.cumsum(mask, axis=1, out=counts[:, 1:])
  frames = np.arange(num_frames)
  lo = np.maximum(frames - (smoothing_frames - 1) // 2, 0)
  hi = np.minimum(frames + smoothing_frames // 2 + 1, num_frames)
  window_counts = counts[:, hi] - counts[:, lo]
  # A valid frame counts itself, so the clamp only touches padded frames (zeroed below).
  out = (sums[:, hi] - sums[:, lo]) / np.maximum(window_counts, 1.0)[..., None]
  return np.where(mask[..., None], out, 0.0).astype(np.float32)


def nearest_neighbour_baseline(query: Any, query_lengths: Any, train_keys: Any,
                               train_lengths: Any, train_listener: Any, *, window: int,
                               stride: int, standardize: bool = True) -> np.ndarray:
  """Windowed nearest neighbour: each test window gets the closest training window's listener.

  Training clips are cut into windows of ``window`` frames starting every ``stride`` frames
  (full windows only); a clip shorter than ``window`` gives one window of its length,
  extended with its last frame. Each test clip is cut into consecutive windows of ``window``
  frames (the last may be partial). A test window is matched to the training window with the
  smallest mean squared key distance over the test window's valid frames (keys standardised
  with the training frames' per-feature mean and std), ties going to the earliest training
  window, and takes that window's listener motion (extended with its last frame if shorter).

  Args:
    query: [N, T, K] test keys.
    query_lengths: [N] valid test frames (0 allowed: an all-zero output clip).
    train_keys: [M, T', K] training keys.
    train_lengths: [M] valid training frames, each >= 1.
    train_listener: [M, T', 56] training listener motion, aligned with ``train_keys``.
    window: window length in frames (>= 1).
    stride: training window hop in frames (>= 1).
    standardize: divide keys by the training std per feature (they are always centred).
      False keeps the keys' own metric, e.g. for PCA scores (see ``nn_audio_baseline``).

  Returns:
    [N, T, 56] float32, 0 on padded frames.
  """
  if window < 1 or stride < 1:
    raise ValueError(f"window and stride must be >= 1, got window={window}, stride={stride}")
  query, query_lengths, query_mask = _check_padded("query", query, query_lengths, None)
  features = query.shape[2]
  train_keys, train_lengths, train_mask = _check_padded(
      "train_keys", train_keys, train_lengths, features, min_length=1)
  train_listener, _, _ = _check_padded("train_listener", train_listener, train_lengths,
                                       MOTION_DIM, min_length=1)
  if train_keys.shape[0] == 0:
    raise ValueError("nearest_neighbour_baseline: no training clips")
  if train_listener.shape[:2] != train_keys.shape[:2]:
    raise ValueError(f"train_listener shape {train_listener.shape} does not match train_keys "
                     f"shape {train_keys.shape} in [clips, frames]")
  num_clips, num_frames = query.shape[:2]

  frames = train_keys[train_mask].astype(np.float64)
  mean = frames.mean(axis=0)
  # Always centre: it keeps ||a||^2 + ||b||^2 - 2 a.b from cancelling large norms.
  scale = frames.std(axis=0) if standardize else np.ones(features)
  # A constant feature carries no information; leave it unscaled instead of dividing by 0.
  scale = np.where(scale > 0, scale, 1.0)
  train_z = np.where(train_mask[..., None], (train_keys - mean) / scale, 0.0)

  # Training windows: clip, first frame and number of real frames (< window: short clip).
  counts = np.where(train_lengths >= window, (train_lengths - window) // stride + 1, 1)
  win_clip = np.repeat(np.arange(train_lengths.shape[0]), counts)
  win_start = (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)) * stride
  win_span = np.minimum(train_lengths[win_clip], window)
  offsets = np.arange(window)

  def window_frames(indices: np.ndarray) -> np.ndarray:
    # Frame indices [len(indices), window]; a short window repeats its last frame.
    return win_start[indices, None] + np.minimum(offsets, win_span[indices, None] - 1)

  # Test windows that hold at least one valid frame.
  per_clip = -(-num_frames // window)
  padded_frames = per_clip * window
  query_z = np.zeros((num_clips, padded_frames, features))
  query_z[:, :num_frames] = np.where(query_mask[..., None], (query - mean) / scale, 0.0)
  query_m = np.zeros((num_clips, padded_frames))
  query_m[:, :num_frames] = query_mask
  q_clip, q_win = np.nonzero(np.arange(per_clip)[None, :] * window < query_lengths[:, None])
  q_vec = query_z.reshape(num_clips, per_clip, window * features)[q_clip, q_win]
  q_m = query_m.reshape(num_clips, per_clip, window)[q_clip, q_win]
  q_sq = np.einsum("qd,qd->q", q_vec, q_vec)

  # Masked squared distance sum_j m_j ||q_j - w_j||^2 = ||q||^2 + m.||w_j||^2 - 2 q.w as
  # GEMMs (q is already 0 on its invalid frames). Chunks over both sides bound memory.
  row = window * features
  train_chunk = max(1, _CHUNK_ELEMENTS // row)
  query_chunk = max(1, min(_CHUNK_ELEMENTS // row, _CHUNK_ELEMENTS // train_chunk))
  best = np.full(q_vec.shape[0], np.inf)
  best_index = np.zeros(q_vec.shape[0], np.int64)
  for w0 in range(0, win_clip.shape[0], train_chunk):
    indices = np.arange(w0, min(w0 + train_chunk, win_clip.shape[0]))
    keys = train_z[win_clip[indices, None], window_frames(indices)]
    w_sq = np.einsum("cjk,cjk->cj", keys, keys)
    keys = keys.reshape(indices.shape[0], row)
    for q0 in range(0, q_vec.shape[0], query_chunk):
      rows = slice(q0, q0 + query_chunk)
      distance = q_sq[rows, None] + q_m[rows] @ w_sq.T - 2.0 * (q_vec[rows] @ keys.T)
      local = np.argmin(distance, axis=1)
      value = distance[np.arange(local.shape[0]), local]
      # Strict: on a tie the earlier chunk, hence the earliest window, is kept.
      better = value < best[rows]
      best[rows] = np.where(better, value, best[rows])
      best_index[rows] = np.where(better, indices[local], best_index[rows])

  out = np.zeros((num_clips, per_clip, window, MOTION_DIM), np.float32)
  out[q_clip, q_win] = train_listener[win_clip[best_index, None], window_frames(best_index)]
  out = out.reshape(num_clips, padded_frames, MOTION_DIM)[:, :num_frames]
  return np.where(query_mask[..., None], out, 0.0).astype(np.float32)


def nn_motion_baseline(train: TrainingClips, speaker_motion: Any, lengths: Any,
                       window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE) -> np.ndarray:
  """Nearest neighbour keyed on the speaker's motion (see ``nearest_neighbour_baseline``)."""
  return nearest_neighbour_baseline(
      speaker_motion, lengths, train.speaker_motion, train.lengths, train.listener_motion,
      window=window, stride=stride)


def _fit_pca(audio: np.ndarray, mask: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and top ``dims`` principal directions [D, dims] of the valid frames."""
  frames = audio[mask]
  mean = frames.mean(axis=0, dtype=np.float64)
  covariance = np.zeros((audio.shape[2], audio.shape[2]))
  step = max(1, _CHUNK_ELEMENTS // audio.shape[2])
  for start in range(0, frames.shape[0], step):
    centred = frames[start:start + step].astype(np.float64) - mean
    covariance += centred.T @ centred
  _, vectors = np.linalg.eigh(covariance)  # Ascending eigenvalues.
  return mean, vectors[:, ::-1][:, :dims]


def _project(audio: np.ndarray, mask: np.ndarray, mean: np.ndarray,
             components: np.ndarray) -> np.ndarray:
  """PCA scores [N, T, dims] of the valid frames, 0 on padding (chunks of frames)."""
  frames = audio[mask]
  scores = np.zeros((frames.shape[0], components.shape[1]))
  step = max(1, _CHUNK_ELEMENTS // audio.shape[2])
  for start in range(0, frames.shape[0], step):
    scores[start:start + step] = (frames[start:start + step].astype(np.float64) - mean) @ components
  out = np.zeros(audio.shape[:2] + (components.shape[1],))
  out[mask] = scores
  return out


def nn_audio_baseline(train: TrainingClips, speaker_audio: Any, lengths: Any,
                      window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE,
                      audio_dims: int = DEFAULT_AUDIO_DIMS) -> np.ndarray:
  """Nearest neighbour keyed on the speaker's audio, reduced by PCA.

  Raw keys would be 768 dims x ``window`` frames (24576 for 32 frames), which makes the
  distance GEMM (test windows x training windows x key size) and the gathered training
  windows too large; the top ``audio_dims`` principal components, fitted on the training
  split's valid audio frames, keep most of the variance at a 48x smaller key. The PCA scores
  are compared unscaled (``standardize=False``) so the truncated distance approximates the
  full 768-dim Euclidean one; whitening would give the weakest kept component the weight of
  the strongest.

  Args:
    train: the training split.
    speaker_audio: [N, T, 768] test speaker audio.
    lengths: [N] valid frames.
    window, stride: see ``nearest_neighbour_baseline``.
    audio_dims: number of principal components, in [1, 768].

  Returns:
    [N, T, 56] float32, 0 on padded frames.
  """
  if not 1 <= audio_dims <= AUDIO_DIM:
    raise ValueError(f"audio_dims must lie in [1, {AUDIO_DIM}], got {audio_dims}")
  audio, lengths, mask = _check_padded("speaker_audio", speaker_audio, lengths, AUDIO_DIM)
  train_mask = train.mask()
  mean, components = _fit_pca(train.speaker_audio, train_mask, audio_dims)
  return nearest_neighbour_baseline(
      _project(audio, mask, mean, components), lengths,
      _project(train.speaker_audio, train_mask, mean, components), train.lengths,
      train.listener_motion, window=window, stride=stride, standardize=False)


def run_baselines(train: TrainingClips, speaker_motion: Any, speaker_audio: Any, lengths: Any,
                  *, seed: int = 0,
                  names: Sequence[str] = BASELINES) -> dict[str, np.ndarray]:
  """Runs the named baselines with their defaults on a test split.

  Args:
    train: the training split.
    speaker_motion: [N, T, 56] test speaker motion.
    speaker_audio: [N, T, 768] test speaker audio.
    lengths: [N] valid frames.
    seed: seed of the random baseline.
    names: subset of ``BASELINES``.

  Returns:
    ``{name: prediction [N, T, 56] float32}`` in the order of ``names``, 0 on padding.
  """
  unknown = [name for name in names if name not in BASELINES]
  if unknown:
    raise ValueError(f"unknown baseline(s) {unknown}; known: {list(BASELINES)}")
  motion = np.asarray(speaker_motion)
  audio = np.asarray(speaker_audio)
  if motion.ndim != 3 or audio.ndim != 3 or motion.shape[:2] != audio.shape[:2]:
    raise ValueError(f"speaker_motion {motion.shape} and speaker_audio {audio.shape} must be "
                     f"[N, T, D] with the same N and T")
  runners: dict[str, Callable[[], np.ndarray]] = {
      "random": lambda: random_baseline(train, lengths, motion.shape[1],
                                        np.random.default_rng(seed)),
      "mirror": lambda: mirror_baseline(motion, lengths),
      "nn_motion": lambda: nn_motion_baseline(train, motion, lengths),
      "nn_audio": lambda: nn_audio_baseline(train, audio, lengths),
  }
  return {name: runners[name]() for name in names}
