"""Listener-generation metrics of the DIM paper (FD, P-FD, MSE, SID, Var, rPCC, STS, LVE, FDD).

Vectorised NumPy versions of the official evaluation (Boese0601/Dyadic-Interaction-Modeling,
``code/mymetrics.py`` and ``code/metrics/eval_utils.py``). A motion frame holds 56 floats:
head pose in dims 0:6, expression in dims 6:56.

Inputs are padded arrays plus lengths: ``[N, T, 56]`` truth / prediction / speaker and
``lengths [N]`` (frame ``t`` of clip ``i`` is valid iff ``t < lengths[i]``). Padded frames never
enter a metric; they may hold anything, NaN included.

Two protocols:

* ``"dim_compat"``: the official pooling. FD, P-FD and MSE per clip, averaged over clips; SID,
  Var, rPCC and STS on all valid frames of all clips pooled in clip order (STS therefore includes
  the differences across clip boundaries, as the official code does).
* ``"per_sequence"``: every metric per clip, then averaged over clips. SID uses the clusters of
  the pooled ground truth (shared by all clips) and a histogram per clip.

SID needs k-means clusters of the ground truth (`fit_clusters`): fit them once per test set and
reuse them for every method and seed; they are checked to belong to the evaluated truth.

Two frame alignments (``alignment=`` of `listener_metrics`, `listener_metrics_by_protocol`,
`reference_metrics` and `fit_clusters`; the evaluate phase's ``evaluate.official_alignment``):

* ``"same_frame"`` (default): listener frame ``t`` is scored against speaker frame ``t``; every
  valid frame counts.
* ``"official"``: the official evaluation (``code/x_engine_pt.py``: `evaluate_test_epoch`
  lines 250-254, `evaluate_finetune_epoch` lines 218-223) keeps ``y_true = tgt[:, 1:][:L-1]``
  (listener frames 1..L-1), the prediction for those frames (generation returns only the
  tokens after the ground-truth seed, ``code/seq2seq_pretrain.py`` line 450) and
  ``x = src[:, :L-1]`` (speaker frames 0..L-2), then feeds the three lists to `print_metrics`
  (``code/test_s2s_pretrain.py`` lines 73-74). So listener frame ``t + 1`` is paired with
  speaker frame ``t`` (this changes P-FD and rPCC) and listener frame 0 (the ground-truth
  first token generation is seeded with) is dropped from every metric: FD, MSE, SID (k-means
  is fitted on the shifted truth too), Var and STS. Our predictions are in the
  listener's own frames (``[T, 56]``, frame ``t`` = listener frame ``t``), so the truth and the
  prediction both drop frame 0 and the speaker drops its last frame; clips then need 3 frames.
  The alignment applies to every protocol of a call, so the two protocols still differ only
  by pooling.

LVE and FDD (vertex metrics of the speaker task, official `print_biwi_metrics`) are tested
functions, but no phase calls them: the speaker task with vertex inputs is not wired into the
evaluate phase (dim_jax ships no mesh decoder; DIM-Speaker is scored on the 56 motion values).

Everything is computed in float64 except k-means, which clusters in the input's float dtype as
the official code does (the official code also keeps float32 for some reductions when fed float32
arrays, so on float32 inputs the two agree only up to float32 rounding). Every returned value is
finite: invalid inputs raise `MetricInputError` (listener metrics refuse clips shorter than 2
frames: one frame has no covariance, np.cov gives NaN) and undefined quantities have documented
values (a correlation with a constant series is 0).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from sklearn import cluster as sk_cluster
import threadpoolctl

from dim_jax import errors

MOTION_DIM = 56
POSE = slice(0, 6)
EXPRESSION = slice(6, 56)
PARTS = {"expression": EXPRESSION, "pose": POSE}
# Official k-means sizes of `calcuate_sid`.
DEFAULT_K = {"expression": 40, "pose": 20}
PROTOCOLS = ("dim_compat", "per_sequence")
# Frame alignments (module docstring): listener frames dropped at the start, speaker frames
# dropped at the end. "official" = x_engine_pt.evaluate_test_epoch: tgt[:, 1:] vs src[:, :-1].
ALIGNMENTS = {"same_frame": 0, "official": 1}
# Official constants: entropy smoothing of `calcuate_sid` and frame step of `sts`.
SID_EPS = 1e-6
STS_TIMESTEP = 0.1
# Clips per batch in per-clip computations: bounds temporaries to ~100 MB at T=300, D=100.
_CHUNK = 128
# Clip names listed in one error message before eliding the rest.
_MAX_NAMED = 8


class MetricInputError(errors.DimJaxError, ValueError):
  """Inputs a metric cannot be computed on (the message names the offending clips)."""


# --------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------


def valid_mask(lengths: Any, num_frames: int) -> np.ndarray:
  """``[N, num_frames]`` bool mask of valid frames (``t < lengths[i]``)."""
  return np.arange(num_frames)[None, :] < np.asarray(lengths)[:, None]


def pad_clips(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """``[T_i, D]`` arrays -> (zero-padded ``[N, T_max, D]`` float32, lengths ``[N]``)."""
  lengths = np.array([a.shape[0] for a in arrays], np.int64)
  out = np.zeros((len(arrays), int(lengths.max()), arrays[0].shape[1]), np.float32)
  for i, a in enumerate(arrays):  # One copy per clip (not per frame).
    out[i, : a.shape[0]] = a
  return out, lengths


def _clip_names(indices: np.ndarray, clip_ids: Sequence[Any] | None) -> str:
  """Human-readable list of clips: their ids, or ``#index`` without ids."""
  indices = [int(i) for i in np.asarray(indices).reshape(-1)]
  names = [repr(clip_ids[i]) if clip_ids is not None else f"#{i}" for i in indices]
  text = ", ".join(names[:_MAX_NAMED])
  if len(names) > _MAX_NAMED:
    text += f", ... ({len(names) - _MAX_NAMED} more)"
  return f"[{text}]"


def _check_array(name: str, x: Any, ndim_min: int = 3) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim < ndim_min:
    raise MetricInputError(f"{name} must have at least {ndim_min} dims [N, T, ...], "
                           f"got shape {x.shape}")
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
    raise MetricInputError(f"{name} must be real-valued, got dtype {x.dtype}")
  return x


def _check_lengths(lengths: Any, num_clips: int, num_frames: int, min_frames: int,
                   clip_ids: Sequence[Any] | None) -> np.ndarray:
  lengths = np.asarray(lengths)
  if lengths.ndim != 1 or lengths.shape[0] != num_clips:
    raise MetricInputError(f"lengths must have shape [{num_clips}] (one per clip), "
                           f"got {lengths.shape}")
  if not np.issubdtype(lengths.dtype, np.integer):
    raise MetricInputError(f"lengths must be integers, got dtype {lengths.dtype}")
  lengths = lengths.astype(np.int64)
  bad = np.flatnonzero((lengths < 1) | (lengths > num_frames))
  if bad.size:
    raise MetricInputError(
        f"lengths outside [1, {num_frames}] (T of the padded arrays) for clips "
        f"{_clip_names(bad, clip_ids)}: {lengths[bad[:_MAX_NAMED]].tolist()}")
  short = np.flatnonzero(lengths < min_frames)
  if short.size:
    raise MetricInputError(
        f"clips {_clip_names(short, clip_ids)} have fewer than {min_frames} valid frames "
        f"(lengths {lengths[short[:_MAX_NAMED]].tolist()}); this metric needs at least "
        f"{min_frames} (a covariance of one frame is undefined)")
  return lengths


def _check_finite(name: str, x: np.ndarray, mask: np.ndarray,
                  clip_ids: Sequence[Any] | None) -> None:
  """Raises if ``x`` has NaN/Inf on a valid frame (padded frames may hold anything)."""
  if np.issubdtype(x.dtype, np.integer):
    return
  finite = np.isfinite(x).reshape(x.shape[0], x.shape[1], -1).all(axis=-1)
  bad = ~finite & mask
  bad_clips = np.flatnonzero(bad.any(axis=1))
  if bad_clips.size:
    first = np.argmax(bad[bad_clips], axis=1)
    where = ", ".join(f"{_clip_names([c], clip_ids)[1:-1]} at frame {int(t)}"
                      for c, t in zip(bad_clips[:_MAX_NAMED], first[:_MAX_NAMED]))
    raise MetricInputError(
        f"{name} has NaN/Inf on valid frames of clips {_clip_names(bad_clips, clip_ids)} "
        f"(first bad frame: {where})")


def check_inputs(truth: Any, prediction: Any, lengths: Any, *, speaker: Any = None,
                 clip_ids: Sequence[Any] | None = None, min_frames: int = 2,
                 width: int | None = None) -> None:
  """Validates padded metric inputs; raises `MetricInputError` naming the offending clips.

  Args:
    truth: ``[N, T, ...]`` ground truth.
    prediction: same shape as ``truth``.
    lengths: ``[N]`` integers in ``[max(1, min_frames), T]``.
    speaker: optional, same shape as ``truth``.
    clip_ids: optional ``N`` names used in messages (clip indices otherwise).
    min_frames: fewest valid frames a clip may have (FD needs 2 for a sample covariance).
    width: required size of the last axis (56 for motion), or None for any.
  """
  truth = _check_array("truth", truth)
  prediction = _check_array("prediction", prediction)
  arrays = {"truth": truth, "prediction": prediction}
  if speaker is not None:
    arrays["speaker"] = _check_array("speaker", speaker)
  for name, x in arrays.items():
    if x.shape != truth.shape:
      raise MetricInputError(f"{name} shape {x.shape} != truth shape {truth.shape} "
                             "(clips, frames and feature widths must match)")
  if width is not None and truth.shape[-1] != width:
    raise MetricInputError(f"feature width must be {width}, got shape {truth.shape}")
  num_clips, num_frames = truth.shape[:2]
  if clip_ids is not None and len(clip_ids) != num_clips:
    raise MetricInputError(f"{len(clip_ids)} clip_ids for {num_clips} clips")
  lengths = _check_lengths(lengths, num_clips, num_frames, min_frames, clip_ids)
  mask = valid_mask(lengths, num_frames)
  for name, x in arrays.items():
    _check_finite(name, x, mask, clip_ids)


def _check_protocol(protocol: str) -> None:
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")


def _alignment_shift(alignment: str) -> int:
  if alignment not in ALIGNMENTS:
    raise ValueError(f"unknown alignment {alignment!r}; valid alignments: "
                     f"{', '.join(ALIGNMENTS)}")
  return ALIGNMENTS[alignment]


def _check_aligned_lengths(lengths: Any, alignment: str, min_frames: int,
                           clip_ids: Sequence[Any] | None) -> None:
  """Refuses clips that keep fewer than ``min_frames`` frames once the alignment drops some."""
  shift = _alignment_shift(alignment)
  if not shift:
    return
  lengths = np.asarray(lengths)
  short = np.flatnonzero(lengths < min_frames + shift)
  if short.size:
    raise MetricInputError(
        f"clips {_clip_names(short, clip_ids)} have fewer than {min_frames + shift} valid frames "
        f"(lengths {lengths[short[:_MAX_NAMED]].tolist()}); the {alignment!r} alignment drops "
        f"listener frame 0, and this metric needs at least {min_frames} frames after that")


def align_frames(alignment: str, lengths: Any, listener: Sequence[Any],
                 speaker: Any = None) -> tuple[np.ndarray, list[np.ndarray], np.ndarray | None]:
  """The frames a metric scores under ``alignment`` (module docstring).

  Args:
    alignment: ``"same_frame"`` (inputs returned as they are) or ``"official"``.
    lengths: ``[N]`` valid frames per clip.
    listener: padded ``[N, T, ...]`` arrays in the listener's frames (truth, predictions).
    speaker: optional padded ``[N, T, ...]`` speaker array.

  Returns:
    ``(lengths, listener arrays, speaker)``; for ``"official"``: ``lengths - 1``, every
    listener array without frame 0 (``x[:, 1:]``) and the speaker without its last frame
    (``speaker[:, :-1]``: valid frames 0..L-2, padding beyond), so that frame ``t`` of the
    result pairs listener frame ``t + 1`` with speaker frame ``t``.
  """
  shift = _alignment_shift(alignment)
  lengths = np.asarray(lengths)
  listener = [np.asarray(x) for x in listener]
  if not shift:
    return lengths, listener, None if speaker is None else np.asarray(speaker)
  if np.any(lengths <= shift):
    raise MetricInputError(f"the {alignment!r} alignment needs clips of at least "
                           f"{shift + 1} frames, got lengths {lengths.tolist()[:_MAX_NAMED]}")
  return (lengths - shift, [x[:, shift:] for x in listener],
          None if speaker is None else np.asarray(speaker)[:, :-shift])


def _part_slice(part: str | slice) -> slice:
  if isinstance(part, slice):
    return part
  if part not in PARTS:
    raise ValueError(f"unknown part {part!r}; valid parts: {', '.join(PARTS)} or a slice")
  return PARTS[part]


# --------------------------------------------------------------------------------------
# Masked helpers. All take zero-padded float64 arrays ``[B, T, D]`` and a mask ``[B, T]``.
# --------------------------------------------------------------------------------------


def _chunks(num_clips: int) -> Iterator[slice]:
  for start in range(0, num_clips, _CHUNK):
    yield slice(start, min(start + _CHUNK, num_clips))


def _zeroed(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """float64 copy with 0 on padded frames (which may hold NaN, so select, don't multiply)."""
  return np.where(mask[..., None], x, 0.0).astype(np.float64, copy=False)


def _pooled(x: np.ndarray, mask: np.ndarray, part: slice) -> np.ndarray:
  """Valid frames of all clips in clip order ``[M, D]`` float64 (official concatenation)."""
  return np.asarray(x[..., part][mask], dtype=np.float64)


def _moments(x: np.ndarray, mask: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-clip mean and ddof=1 covariance, two-pass like np.cov."""
  mean = x.sum(axis=1) / n[:, None]
  centred = np.where(mask[..., None], x - mean[:, None, :], 0.0)
  cov = np.matmul(np.swapaxes(centred, 1, 2), centred) / (n - 1.0)[:, None, None]
  return mean, cov


def _per_clip_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Mean over valid frames and features of ``[B, T, D]`` zero-padded values -> ``[B]``."""
  return values.sum(axis=(1, 2)) / (mask.sum(axis=1) * values.shape[-1])


def _masked_variance(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Variance (ddof=0) of all valid values of each clip -> ``[B]``."""
  mean = _per_clip_mean(x, mask)
  dev = np.where(mask[..., None], x - mean[:, None, None], 0.0)
  return _per_clip_mean(dev * dev, mask)


def _is_constant(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Whether all valid values of each clip are exactly equal -> ``[B]``."""
  hi = np.where(mask[..., None], x, -np.inf).max(axis=(1, 2))
  lo = np.where(mask[..., None], x, np.inf).min(axis=(1, 2))
  return hi == lo


def _pearson_per_clip(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Pearson correlation of the flattened valid values of each clip; 0 if one is constant."""
  mx = _per_clip_mean(x, mask)[:, None, None]
  my = _per_clip_mean(y, mask)[:, None, None]
  dx = np.where(mask[..., None], x - mx, 0.0)
  dy = np.where(mask[..., None], y - my, 0.0)
  sxy = (dx * dy).sum(axis=(1, 2))
  sxx = (dx * dx).sum(axis=(1, 2))
  syy = (dy * dy).sum(axis=(1, 2))
  constant = _is_constant(x, mask) | _is_constant(y, mask)
  with np.errstate(invalid="ignore", divide="ignore"):
    r = np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0)
  return np.where(constant, 0.0, r)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  """np.corrcoef of two flattened arrays, except 0 when either is constant.

  For a constant series np.corrcoef gives NaN, or, when the float mean is not exactly the
  constant, an arbitrary value from rounding noise; "constant" here is exact (min == max).
  """
  x = x.reshape(-1)
  y = y.reshape(-1)
  if x.min() == x.max() or y.min() == y.max():
    return 0.0
  return float(np.corrcoef(x, y)[0, 1])


def _sts_pooled(x: np.ndarray, y: np.ndarray, timestep: float) -> float:
  """Official `sts` on pooled ``[M, D]`` frames (consecutive rows, any clip boundary)."""
  d = np.diff(x, axis=0) - np.diff(y, axis=0)
  return float(np.sqrt(np.sum(d * d) / timestep))


def _sts_per_clip(x: np.ndarray, y: np.ndarray, mask: np.ndarray, timestep: float) -> np.ndarray:
  """`sts` of each clip on its own valid frames (no differences across clips) -> ``[B]``."""
  d = np.diff(x, axis=1) - np.diff(y, axis=1)
  # A difference is valid iff frame t (hence t-1) is valid; frame t-1 valid, t padded is not.
  d = np.where(mask[:, 1:, None], d, 0.0)
  return np.sqrt((d * d).sum(axis=(1, 2)) / timestep)


# --------------------------------------------------------------------------------------
# Fréchet distance, MSE.
# --------------------------------------------------------------------------------------


def sequence_moments(x: Any, lengths: Any) -> tuple[np.ndarray, np.ndarray]:
  """Per-clip mean ``[N, D]`` and covariance ``[N, D, D]`` (ddof=1) of valid frames, float64.

  Equals ``np.mean(x[i, :L], 0)`` and ``np.cov(x[i, :L], rowvar=False)`` for every clip;
  needs ``lengths >= 2``.
  """
  x = _check_array("x", x)
  if x.ndim != 3:
    raise MetricInputError(f"x must be [N, T, D], got shape {x.shape}")
  lengths = _check_lengths(lengths, x.shape[0], x.shape[1], 2, None)
  mask = valid_mask(lengths, x.shape[1])
  _check_finite("x", x, mask, None)
  return _moments(_zeroed(x, mask), mask, lengths.astype(np.float64))


def _psd_eigvals(w: np.ndarray) -> np.ndarray:
  """Eigenvalues of a PSD matrix with those at rounding-noise level (<= max * D * eps) set to 0.

  A rank-deficient covariance (a clip shorter than its feature width) has eigenvalues that are
  0 exactly but come out of eigh as +-1e-16 * max; their square roots (~1e-8 * sqrt(max)) would
  bias tr sqrtm by up to 1e-7 relative, more than the official scipy error.
  """
  tol = w.max(axis=-1, keepdims=True) * w.shape[-1] * np.finfo(np.float64).eps
  return np.where(w > tol, w, 0.0)


def frechet_distance(mu1: Any, cov1: Any, mu2: Any, cov2: Any) -> np.ndarray:
  """Fréchet distance between Gaussians, batched over leading dims, float64.

  ``|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2)``, with
  ``tr sqrtm(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1)))`` (similar matrices, and the latter
  is symmetric PSD), computed with batched ``eigh``; eigenvalues at rounding-noise level are
  set to 0. For PSD covariances this equals the official value (``scipy.linalg.sqrtm``) up to
  float error; unlike it, it stays exact for singular covariances (clips shorter than the
  feature width, the usual case for P-FD: ~1e-14 relative against a 40-digit reference where
  the official is off by ~1e-7) and never produces a complex or NaN result.
  """
  mu1, cov1, mu2, cov2 = (np.asarray(a, dtype=np.float64) for a in (mu1, cov1, mu2, cov2))
  w, v = np.linalg.eigh(cov1)
  root1 = np.matmul(v * np.sqrt(_psd_eigvals(w))[..., None, :], np.swapaxes(v, -1, -2))
  inner = np.matmul(np.matmul(root1, cov2), root1)
  inner = 0.5 * (inner + np.swapaxes(inner, -1, -2))  # Symmetric up to rounding; make it exact.
  tr_covmean = np.sqrt(_psd_eigvals(np.linalg.eigvalsh(inner))).sum(axis=-1)
  diff = mu1 - mu2
  return (np.sum(diff * diff, axis=-1) + np.trace(cov1, axis1=-2, axis2=-1)
          + np.trace(cov2, axis1=-2, axis2=-1) - 2.0 * tr_covmean)


def _fd_chunks(truth: np.ndarray, prediction: np.ndarray, lengths: np.ndarray, part: slice,
               speaker: np.ndarray | None) -> np.ndarray:
  """FD per clip of ``part`` (prefixed with the speaker's ``part`` for P-FD) -> ``[N]``."""
  # Batches of <= 100 x 100 problems gain nothing from BLAS threads, and threaded OpenBLAS eigh
  # on a busy 2-core machine measured 150x slower (17 s vs 0.1 s per chunk).
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    out = [_fd_chunk(truth[s], prediction[s], lengths[s], part,
                     None if speaker is None else speaker[s])
           for s in _chunks(len(lengths))]
  return np.concatenate(out)


def _fd_chunk(truth: np.ndarray, prediction: np.ndarray, lengths: np.ndarray, part: slice,
              speaker: np.ndarray | None) -> np.ndarray:
  """`_fd_chunks` of one batch of clips."""
  mask = valid_mask(lengths, truth.shape[1])
  n = lengths.astype(np.float64)
  gt = _zeroed(truth[..., part], mask)
  pred = _zeroed(prediction[..., part], mask)
  if speaker is not None:
    # Official order [speaker, listener] along features (FD is permutation invariant anyway).
    sp = _zeroed(speaker[..., part], mask)
    gt = np.concatenate([sp, gt], axis=-1)
    pred = np.concatenate([sp, pred], axis=-1)
  mu1, cov1 = _moments(gt, mask, n)
  mu2, cov2 = _moments(pred, mask, n)
  return frechet_distance(mu1, cov1, mu2, cov2)


def fd_per_sequence(truth: Any, prediction: Any, lengths: Any, part: str | slice, *,
                    clip_ids: Sequence[Any] | None = None) -> np.ndarray:
  """FD between truth and prediction statistics of each clip -> ``[N]`` (official FD_pose/exp)."""
  check_inputs(truth, prediction, lengths, clip_ids=clip_ids, min_frames=2)
  return _fd_chunks(np.asarray(truth), np.asarray(prediction), np.asarray(lengths, np.int64),
                    _part_slice(part), None)


def paired_fd_per_sequence(speaker: Any, truth: Any, prediction: Any, lengths: Any,
                           part: str | slice, *,
                           clip_ids: Sequence[Any] | None = None) -> np.ndarray:
  """P-FD of each clip: FD of ``[speaker, truth]`` vs ``[speaker, prediction]`` -> ``[N]``."""
  check_inputs(truth, prediction, lengths, speaker=speaker, clip_ids=clip_ids, min_frames=2)
  return _fd_chunks(np.asarray(truth), np.asarray(prediction), np.asarray(lengths, np.int64),
                    _part_slice(part), np.asarray(speaker))


def _mse_chunks(truth: np.ndarray, prediction: np.ndarray, lengths: np.ndarray,
                part: slice) -> np.ndarray:
  out = []
  for s in _chunks(len(lengths)):
    mask = valid_mask(lengths[s], truth.shape[1])
    d = _zeroed(truth[s, :, part], mask) - _zeroed(prediction[s, :, part], mask)
    out.append(_per_clip_mean(d * d, mask))
  return np.concatenate(out)


def mse_per_sequence(truth: Any, prediction: Any, lengths: Any, part: str | slice, *,
                     clip_ids: Sequence[Any] | None = None) -> np.ndarray:
  """Mean squared error over valid frames and ``part`` dims of each clip -> ``[N]``."""
  check_inputs(truth, prediction, lengths, clip_ids=clip_ids, min_frames=1)
  return _mse_chunks(np.asarray(truth), np.asarray(prediction), np.asarray(lengths, np.int64),
                     _part_slice(part))


# --------------------------------------------------------------------------------------
# SID: entropy of the prediction's histogram over k-means clusters of the ground truth.
# --------------------------------------------------------------------------------------


def _fingerprint(frames: np.ndarray) -> str:
  """Digest of pooled frames (float64), to tell whether clusters belong to this truth."""
  data = np.ascontiguousarray(frames, dtype=np.float64)
  return hashlib.blake2b(data.tobytes() + repr(data.shape).encode(), digest_size=16).hexdigest()


def _distinct_rows_at_least(frames: np.ndarray, k: int) -> bool:
  """Whether ``frames`` holds at least ``k`` distinct rows (exact, cheap in the usual case)."""
  if frames.shape[0] < k:
    return False
  # Distinct projections imply distinct rows; only when they collide fall back to sorting rows.
  projection = frames.astype(np.float64) @ np.random.default_rng(0).normal(size=frames.shape[1])
  if np.unique(projection).size >= k:
    return True
  return np.unique(frames, axis=0).shape[0] >= k


@dataclasses.dataclass(frozen=True)
class FrameClusters:
  """k-means clusters of the pooled ground-truth frames of one part, reusable across methods.

  Fitting is the expensive part of SID and depends only on the ground truth: fit once with
  `FrameClusters.fit` and pass the object to every `listener_metrics` call on that truth.
  """

  part: str | slice
  k: int
  kmeans: sk_cluster.KMeans
  fingerprint: str
  num_frames: int

  @classmethod
  def fit(cls, truth: Any, lengths: Any, part: str | slice, k: int | None = None, seed: int = 0,
          *, clip_ids: Sequence[Any] | None = None) -> FrameClusters:
    """Fits ``KMeans(k, random_state=seed, n_init='auto')`` on all valid truth frames.

    Exactly the official `calcuate_sid` clustering: frames pooled in clip order, the input's
    float dtype kept (sklearn clusters float32 in float32). ``k`` defaults to 40 for
    expression and 20 for pose.
    """
    truth = _check_array("truth", truth)
    if k is None:
      if not isinstance(part, str):
        raise ValueError("k is required when part is a slice")
      k = DEFAULT_K[part]
    sl = _part_slice(part)
    lengths = _check_lengths(lengths, truth.shape[0], truth.shape[1], 1, clip_ids)
    mask = valid_mask(lengths, truth.shape[1])
    _check_finite("truth", truth, mask, clip_ids)
    frames = truth[..., sl][mask]
    if not np.issubdtype(frames.dtype, np.floating):
      frames = frames.astype(np.float64)
    if not _distinct_rows_at_least(frames, k):
      raise MetricInputError(
          f"k-means with k={k} needs at least {k} distinct ground-truth frames of part {part!r}; "
          f"{frames.shape[0]} valid frames hold fewer")
    kmeans = sk_cluster.KMeans(n_clusters=k, random_state=seed, n_init="auto").fit(frames)
    return cls(part=part, k=k, kmeans=kmeans, fingerprint=_fingerprint(frames),
               num_frames=int(frames.shape[0]))

  def assign(self, x: Any, lengths: Any, *,
             clip_ids: Sequence[Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest cluster of every valid frame of ``x [N, T, 56]``.

    Returns:
      ``(labels [M], clip_index [M])`` for the ``M`` valid frames in clip order.
    """
    x = _check_array("x", x)
    lengths = _check_lengths(lengths, x.shape[0], x.shape[1], 1, clip_ids)
    mask = valid_mask(lengths, x.shape[1])
    _check_finite("x", x, mask, clip_ids)
    frames = x[..., _part_slice(self.part)][mask]
    if frames.shape[1] != self.kmeans.n_features_in_:
      raise MetricInputError(f"frames have {frames.shape[1]} features of part {self.part!r}, "
                             f"the clusters {self.kmeans.n_features_in_}")
    labels = self.kmeans.predict(frames.astype(self.kmeans.cluster_centers_.dtype, copy=False))
    clip_index = np.repeat(np.arange(x.shape[0]), lengths)
    return labels.astype(np.int64), clip_index

  def matches(self, truth: Any, lengths: Any) -> bool:
    """Whether these clusters were fitted on exactly this truth (same valid frames)."""
    truth = np.asarray(truth)
    lengths = np.asarray(lengths, np.int64)
    frames = truth[..., _part_slice(self.part)][valid_mask(lengths, truth.shape[1])]
    return frames.shape[0] == self.num_frames and _fingerprint(frames) == self.fingerprint


def fit_clusters(truth: Any, lengths: Any, *, seed: int = 0,
                 clip_ids: Sequence[Any] | None = None,
                 alignment: str = "same_frame") -> dict[str, FrameClusters]:
  """`FrameClusters` of both parts with the official k (the ``clusters`` of `listener_metrics`).

  Fitted on the truth frames that ``alignment`` scores (the official alignment fits k-means on
  listener frames 1..L-1, as the official `calcuate_sid` sees them); pass the same alignment to
  the metrics.
  """
  _check_aligned_lengths(lengths, alignment, 1, clip_ids)
  lengths, (truth,), _ = align_frames(alignment, lengths, [truth])
  return {name: FrameClusters.fit(truth, lengths, name, seed=seed, clip_ids=clip_ids)
          for name in PARTS}


def entropy_bits(labels: Any, k: int) -> float:
  """Official SID entropy ``-sum_i p_i log2(p_i + 1e-6)`` of the label histogram, in bits."""
  labels = np.asarray(labels, dtype=np.int64)
  if labels.size == 0:
    raise MetricInputError("entropy of an empty label set")
  p = np.bincount(labels, minlength=k) / labels.size
  # cumsum accumulates left to right like the official Python loop: bit-identical result.
  return float(-np.cumsum(p * np.log2(p + SID_EPS))[-1])


def entropy_bits_per_clip(labels: Any, clip_index: Any, num_clips: int, k: int) -> np.ndarray:
  """`entropy_bits` of each clip's own histogram -> ``[num_clips]``."""
  labels = np.asarray(labels, dtype=np.int64)
  clip_index = np.asarray(clip_index, dtype=np.int64)
  counts = np.bincount(clip_index * k + labels, minlength=num_clips * k).reshape(num_clips, k)
  totals = counts.sum(axis=1, keepdims=True)
  if np.any(totals == 0):
    raise MetricInputError(f"clips {_clip_names(np.flatnonzero(totals[:, 0] == 0), None)} "
                           "have no labelled frames")
  p = counts / totals
  return -np.cumsum(p * np.log2(p + SID_EPS), axis=1)[:, -1]


def _checked_clusters(clusters: Mapping[str, FrameClusters], name: str, truth: np.ndarray,
                      lengths: np.ndarray) -> FrameClusters:
  if name not in clusters:
    raise MetricInputError(f"clusters lack part {name!r} (have {sorted(clusters)}); "
                           "build them with fit_clusters(truth, lengths)")
  c = clusters[name]
  if _part_slice(c.part) != PARTS[name]:
    raise MetricInputError(f"clusters[{name!r}] were fitted on part {c.part!r}")
  if not c.matches(truth, lengths):
    raise MetricInputError(f"clusters[{name!r}] were not fitted on this ground truth (SID "
                           "clusters must come from the evaluated truth, with the same "
                           "alignment: fit_clusters(truth, lengths, alignment=...))")
  return c


# --------------------------------------------------------------------------------------
# Listener metrics.
# --------------------------------------------------------------------------------------


def _finite_or_raise(metrics: dict[str, float]) -> dict[str, float]:
  bad = [k for k, v in metrics.items() if not np.isfinite(v)]
  if bad:
    raise MetricInputError(f"metrics {bad} are not finite (inputs too large for float64?)")
  return metrics


def _part_statistics(truth: np.ndarray, prediction: np.ndarray, speaker: np.ndarray,
                     lengths: np.ndarray, part: slice, protocol: str,
                     sts_timestep: float) -> dict[str, float]:
  """Var of the prediction, rPCC and STS of one part under ``protocol``."""
  if protocol == "dim_compat":
    mask = valid_mask(lengths, truth.shape[1])
    gt, pred, sp = (_pooled(a, mask, part) for a in (truth, prediction, speaker))
    # STS on the pooled frames, as the official code: the last frame of clip i and the first
    # of clip i + 1 count as consecutive (per_sequence drops these cross-clip differences).
    return dict(var=float(np.var(pred.reshape(-1))),
                rpcc=abs(_pearson(gt, sp) - _pearson(pred, sp)),
                sts=_sts_pooled(gt, pred, sts_timestep))
  var, rpcc, sts = [], [], []
  for s in _chunks(len(lengths)):
    mask = valid_mask(lengths[s], truth.shape[1])
    gt, pred, sp = (_zeroed(a[s, :, part], mask) for a in (truth, prediction, speaker))
    var.append(_masked_variance(pred, mask))
    rpcc.append(np.abs(_pearson_per_clip(gt, sp, mask) - _pearson_per_clip(pred, sp, mask)))
    sts.append(_sts_per_clip(gt, pred, mask, sts_timestep))
  return {name: float(np.mean(np.concatenate(v)))
          for name, v in (("var", var), ("rpcc", rpcc), ("sts", sts))}


def _sid_of_labels(c: FrameClusters, labels: np.ndarray, clip_index: np.ndarray,
                   num_clips: int, protocol: str) -> float:
  if protocol == "dim_compat":
    return entropy_bits(labels, c.k)
  return float(np.mean(entropy_bits_per_clip(labels, clip_index, num_clips, c.k)))


def _sid(c: FrameClusters, x: np.ndarray, lengths: np.ndarray, protocol: str) -> float:
  return _sid_of_labels(c, *c.assign(x, lengths), len(lengths), protocol)


def listener_metrics(truth: Any, prediction: Any, speaker: Any, lengths: Any, *, protocol: str,
                     clusters: Mapping[str, FrameClusters], sts_timestep: float = STS_TIMESTEP,
                     clip_ids: Sequence[Any] | None = None,
                     alignment: str = "same_frame") -> dict[str, float]:
  """DIM listener metrics of a prediction, all finite floats.

  Args:
    truth: ``[N, T, 56]`` ground-truth listener motion.
    prediction: ``[N, T, 56]`` generated listener motion.
    speaker: ``[N, T, 56]`` speaker motion (P-FD and rPCC).
    lengths: ``[N]`` valid frames per clip, each >= 2.
    protocol: ``"dim_compat"`` (official pooling) or ``"per_sequence"`` (module docstring).
    clusters: `fit_clusters(truth, lengths)`; must have been fitted on this truth.
    sts_timestep: the ``timestep`` of the official `sts`.
    clip_ids: optional clip names for error messages.
    alignment: ``"same_frame"`` or ``"official"`` (listener frame t + 1 against speaker frame
      t, listener frame 0 dropped; module docstring). ``clusters`` must be fitted with it.

  Returns:
    ``fd_*, pfd_*, mse_*, sid_*, var_*, rpcc_*, sts_*`` for ``* in (expression, pose)``. A
    correlation involving a constant series (official: NaN) counts as 0.
  """
  return listener_metrics_by_protocol(
      truth, prediction, speaker, lengths, protocols=(protocol,), clusters=clusters,
      sts_timestep=sts_timestep, clip_ids=clip_ids, alignment=alignment)[protocol]


def listener_metrics_by_protocol(truth: Any, prediction: Any, speaker: Any, lengths: Any, *,
                                 protocols: Sequence[str], clusters: Mapping[str, FrameClusters],
                                 sts_timestep: float = STS_TIMESTEP,
                                 clip_ids: Sequence[Any] | None = None,
                                 alignment: str = "same_frame"
                                 ) -> dict[str, dict[str, float]]:
  """`listener_metrics` under several protocols: ``{protocol: metrics}``.

  FD, P-FD and MSE are per sequence in both protocols and the cluster labels do not depend
  on the protocol either: they are computed once. ``alignment`` applies to every protocol.
  """
  for protocol in protocols:
    _check_protocol(protocol)
  _alignment_shift(alignment)
  check_inputs(truth, prediction, lengths, speaker=speaker, clip_ids=clip_ids, min_frames=2,
               width=MOTION_DIM)
  _check_aligned_lengths(lengths, alignment, 2, clip_ids)
  lengths, (truth, prediction), speaker = align_frames(
      alignment, np.asarray(lengths, np.int64), [truth, prediction], speaker)
  per_part = {protocol: {} for protocol in protocols}
  for name, part in PARTS.items():
    c = _checked_clusters(clusters, name, truth, lengths)
    shared = dict(fd=_fd_chunks(truth, prediction, lengths, part, None).mean(),
                  pfd=_fd_chunks(truth, prediction, lengths, part, speaker).mean(),
                  mse=_mse_chunks(truth, prediction, lengths, part).mean())
    labels, clip_index = c.assign(prediction, lengths)
    for protocol in protocols:
      per_part[protocol][name] = dict(
          shared, sid=_sid_of_labels(c, labels, clip_index, len(lengths), protocol),
          **_part_statistics(truth, prediction, speaker, lengths, part, protocol, sts_timestep))
  return {protocol: _finite_or_raise({
      f"{metric}_{name}": float(parts[name][metric])
      for metric in ("fd", "pfd", "mse", "sid", "var", "rpcc", "sts") for name in PARTS})
          for protocol, parts in per_part.items()}


def reference_metrics(truth: Any, lengths: Any, *, protocol: str,
                      clusters: Mapping[str, FrameClusters],
                      clip_ids: Sequence[Any] | None = None,
                      alignment: str = "same_frame") -> dict[str, float]:
  """SID and Var of the ground truth itself (the paper's GT row): ``sid_*, var_*``.

  On the truth frames ``alignment`` scores (official: listener frames 1..L-1).
  """
  _check_protocol(protocol)
  _alignment_shift(alignment)
  check_inputs(truth, truth, lengths, clip_ids=clip_ids, min_frames=1, width=MOTION_DIM)
  _check_aligned_lengths(lengths, alignment, 1, clip_ids)
  lengths, (truth,), _ = align_frames(alignment, np.asarray(lengths, np.int64), [truth])
  metrics = {}
  for name in PARTS:
    c = _checked_clusters(clusters, name, truth, lengths)
    metrics[f"sid_{name}"] = _sid(c, truth, lengths, protocol)
  for name, part in PARTS.items():
    if protocol == "dim_compat":
      var = np.var(_pooled(truth, valid_mask(lengths, truth.shape[1]), part).reshape(-1))
    else:
      var = np.mean(np.concatenate([
          _masked_variance(_zeroed(truth[s, :, part], m), m)
          for s in _chunks(len(lengths))
          for m in [valid_mask(lengths[s], truth.shape[1])]]))
    metrics[f"var_{name}"] = float(var)
  return _finite_or_raise(metrics)


# --------------------------------------------------------------------------------------
# Vertex metrics (BiWi-style talking-head evaluation, official `print_biwi_metrics`).
# --------------------------------------------------------------------------------------
# Tested, but no phase calls them: the speaker task with vertex inputs is not wired (no mesh
# decoder ships with dim_jax; the evaluate phase scores the 56 motion values).


def _vertex_inputs(truth: Any, prediction: Any, lengths: Any, indices: Any,
                   clip_ids: Sequence[Any] | None, templates: Any = None):
  """Validates ``[N, T, V, 3]`` vertex inputs; returns gathered float64 ``[N, T, U, 3]``."""
  truth = _check_array("truth_vertices", truth, 4)
  prediction = _check_array("pred_vertices", prediction, 4)
  if truth.ndim != 4 or truth.shape[-1] != 3:
    raise MetricInputError(f"vertices must be [N, T, V, 3], got {truth.shape}")
  if prediction.shape != truth.shape:
    raise MetricInputError(f"pred_vertices shape {prediction.shape} != truth_vertices shape "
                           f"{truth.shape}")
  num_vertices = truth.shape[2]
  indices = np.asarray(indices)
  if (indices.ndim != 1 or indices.size == 0 or not np.issubdtype(indices.dtype, np.integer)
      or indices.min() < 0 or indices.max() >= num_vertices):
    raise MetricInputError(f"vertex indices must be a non-empty 1-D integer list in "
                           f"[0, {num_vertices}), got {indices!r}")
  gt = truth[:, :, indices]
  pred = prediction[:, :, indices]
  check_inputs(gt, pred, lengths, clip_ids=clip_ids, min_frames=1)
  lengths = np.asarray(lengths, np.int64)
  mask = valid_mask(lengths, truth.shape[1])
  gt = np.where(mask[..., None, None], gt, 0.0).astype(np.float64, copy=False)
  pred = np.where(mask[..., None, None], pred, 0.0).astype(np.float64, copy=False)
  if templates is None:
    return gt, pred, lengths, mask, None
  templates = _check_array("templates", templates, 3)
  if templates.shape != (truth.shape[0], num_vertices, 3):
    raise MetricInputError(f"templates must be [N, V, 3] = {(truth.shape[0], num_vertices, 3)}, "
                           f"got {templates.shape}")
  tpl = np.asarray(templates[:, indices], dtype=np.float64)
  bad = np.flatnonzero(~np.isfinite(tpl).all(axis=(1, 2)))
  if bad.size:
    raise MetricInputError(f"templates have NaN/Inf for clips {_clip_names(bad, clip_ids)}")
  return gt, pred, lengths, mask, tpl


def lip_vertex_error(truth_vertices: Any, pred_vertices: Any, lengths: Any, lip_indices: Any, *,
                     protocol: str = "dim_compat",
                     clip_ids: Sequence[Any] | None = None) -> float:
  """LVE: per frame, the max over lip vertices of the squared L2 error; averaged.

  Official: squared distance (no sqrt), mean over all frames of all clips pooled
  (``dim_compat``); ``per_sequence`` averages the per-clip means.
  """
  _check_protocol(protocol)
  gt, pred, lengths, mask, _ = _vertex_inputs(truth_vertices, pred_vertices, lengths,
                                              lip_indices, clip_ids)
  per_frame = np.square(gt - pred).sum(axis=-1).max(axis=-1)  # [N, T], 0 on padding.
  if protocol == "dim_compat":
    return float(per_frame[mask].mean())
  return float(np.mean(per_frame.sum(axis=1) / lengths))


def fdd_per_sequence(truth_vertices: Any, pred_vertices: Any, templates: Any, lengths: Any,
                     upper_indices: Any, *,
                     clip_ids: Sequence[Any] | None = None) -> np.ndarray:
  """Signed upper-face dynamics deviation of each clip (truth minus prediction) -> ``[N]``."""
  gt, pred, lengths, mask, tpl = _vertex_inputs(truth_vertices, pred_vertices, lengths,
                                                upper_indices, clip_ids, templates)

  def motion_std(v: np.ndarray) -> np.ndarray:
    # Squared displacement from the template per frame and vertex, std over valid frames.
    sq = np.where(mask[..., None], np.square(v - tpl[:, None]).sum(axis=-1), 0.0)  # [N, T, U]
    mean = sq.sum(axis=1) / lengths[:, None]
    dev = np.where(mask[..., None], sq - mean[:, None], 0.0)
    return np.sqrt((dev * dev).sum(axis=1) / lengths[:, None]).mean(axis=-1)

  return motion_std(gt) - motion_std(pred)


def upper_face_dynamics_deviation(truth_vertices: Any, pred_vertices: Any, templates: Any,
                                  lengths: Any, upper_indices: Any, *,
                                  clip_ids: Sequence[Any] | None = None) -> float:
  """FDD: `fdd_per_sequence` averaged over clips (signed; per clip in both protocols)."""
  return float(np.mean(fdd_per_sequence(truth_vertices, pred_vertices, templates, lengths,
                                        upper_indices, clip_ids=clip_ids)))
