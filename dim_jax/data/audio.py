"""Recordings -> HuBERT features [T_a, 768] at 50 Hz, and 50 Hz features -> motion frame rate.

What the official DIM code does (Boese0601/Dyadic-Interaction-Modeling): its only HuBERT
extraction, `code/dataset/biwi.py`, loads `librosa.load(wav, sr=16000)` (mono, float in
[-1, 1]) and feeds the raw waveform to s3prl's HuBERT-Base (whose task config has
`normalize=False`); the `Wav2Vec2Processor` call (which would normalise) is commented out
there, and `facebook/hubert-base-ls960`'s preprocessor config does not normalise either. So by
default we do not normalise (`normalize=True` gives Wav2Vec2FeatureExtractor's per-clip
zero-mean unit-variance). The features are the encoder output (`layer=None`), see
`dim_jax.models.hubert`.

* `read_wav`: scipy.io.wavfile (uint8 / int16 / int32 / float), channels averaged to mono,
  resampled to 16 kHz with `scipy.signal.resample_poly` (librosa's default is soxr; both are
  band-limited resamplers, so features differ by resampler ripple only).
* `AudioFeatureExtractor`: one jitted forward for every batch; inputs are padded to a few
  length buckets (one compile per bucket) and batched with sample masks.
  Long recordings are cut into chunks of `chunk_seconds` (default 20 s) of output frames, each
  run with `context_seconds` (default 5 s) of real audio on both sides, and the chunk centres
  are stitched, so cost grows linearly with length (attention is quadratic in the window, at
  most 30 s). Chunks start on the 320-sample frame grid, so their conv features equal the
  whole clip's exactly; the first conv's GroupNorm uses statistics of the WHOLE clip (a
  first pass sums each chunk's share), so a silent chunk is not normalised by its own
  silence. What remains is attention beyond the context window: zero below the attention
  (hidden state 0 matches the whole clip to 2e-5), and for the last layer of a random tiny
  model, whose near-uniform attention is the worst case, a relative error of 0.32 with 10
  frames of context and 0.11 with 400 frames (of 1199) (tests/test_audio.py). Clips up to
  chunk + 2 * context (30 s) run whole, exactly.
* `to_motion_frame_rate`: 50 Hz features -> motion frames with the rule of
  `tools/convert_official.py --format emoca` (`official.resample_by_rate`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import warnings
from typing import Any, Callable, Sequence

import jax
import numpy as np

from dim_jax import errors
from dim_jax.data import official
from dim_jax.models import hubert

PathLike = str | os.PathLike
SAMPLE_RATE = hubert.SAMPLE_RATE
# Shortest padded length (output frames) of the bucket ladder.
MIN_BUCKET_FRAMES = 32
# Wav2Vec2FeatureExtractor's zero_mean_unit_var_norm epsilon.
NORMALIZE_EPS = 1e-7


class AudioError(errors.DimJaxError, ValueError):
  """A recording cannot be read or is unusable (too short, empty, NaN)."""


# ---------------------------------------------------------------------------
# Waveforms.


def to_float(samples: np.ndarray, source: str = "<array>") -> np.ndarray:
  """PCM samples -> float64 in [-1, 1) as soundfile/librosa scale them.

  uint8 is offset binary ((x - 128) / 128), int16 / int32 are divided by 2**15 / 2**31
  (scipy reads 24-bit files as left-justified int32), floats are kept.
  """
  if samples.dtype == np.uint8:
    return (samples.astype(np.float64) - 128.0) / 128.0
  if samples.dtype == np.int16:
    return samples.astype(np.float64) / 2.0**15
  if samples.dtype == np.int32:
    return samples.astype(np.float64) / 2.0**31
  if np.issubdtype(samples.dtype, np.floating):
    return samples.astype(np.float64)
  raise AudioError(f"{source}: unsupported sample type {samples.dtype}")


def to_mono_16k(samples: np.ndarray, sample_rate: int, source: str = "<array>") -> np.ndarray:
  """[N] or [N, channels] samples at `sample_rate` -> float32 mono [M] at 16 kHz.

  Channels are averaged (librosa's `mono=True`); resampling is `resample_poly` by the
  reduced ratio 16000 / sample_rate (exact for integer rates).
  """
  x = to_float(np.asarray(samples), source)
  if x.ndim == 2:
    x = x.mean(axis=1)
  elif x.ndim != 1:
    raise AudioError(f"{source}: expected [samples] or [samples, channels], got {x.shape}")
  if x.size == 0:
    raise AudioError(f"{source}: no samples")
  if not np.all(np.isfinite(x)):
    raise AudioError(f"{source}: NaN or Inf samples")
  if sample_rate <= 0:
    raise AudioError(f"{source}: sample rate {sample_rate} is not positive")
  if sample_rate != SAMPLE_RATE:
    from scipy import signal  # pylint: disable=g-import-not-at-top
    g = math.gcd(int(sample_rate), SAMPLE_RATE)
    x = signal.resample_poly(x, SAMPLE_RATE // g, int(sample_rate) // g)
  return x.astype(np.float32)


def read_wav(path: PathLike) -> np.ndarray:
  """Reads a wav file as float32 mono 16 kHz samples (see `to_mono_16k`).

  Raises:
    AudioError: unreadable file, unsupported format, no samples, NaN/Inf (message names it).
  """
  from scipy.io import wavfile  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.is_file():
    raise AudioError(f"{path}: no such file")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", wavfile.WavFileWarning)  # Unknown chunks are harmless.
      rate, data = wavfile.read(str(path))
  except Exception as e:  # scipy raises ValueError, EOFError, struct.error, ...
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise AudioError(f"{path}: not a readable wav file ({message})") from None
  return to_mono_16k(data, rate, str(path))


def normalize_waveform(x: np.ndarray) -> np.ndarray:
  """Wav2Vec2FeatureExtractor(do_normalize=True): zero mean, unit variance per clip."""
  x = np.asarray(x, np.float64)
  return ((x - x.mean()) / np.sqrt(x.var() + NORMALIZE_EPS)).astype(np.float32)


# ---------------------------------------------------------------------------
# Feature extraction.


@dataclasses.dataclass(frozen=True)
class _Chunk:
  """One model input: samples [start, stop) of clip `clip`, keeping frames [keep_from, keep_to)
  of its output as clip frames [out_from, out_from + keep_to - keep_from), and contributing its
  first-conv frames [stats_from, stats_to) to the clip's GroupNorm statistics."""
  clip: int
  start: int
  stop: int
  keep_from: int
  keep_to: int
  out_from: int
  stats_from: int
  stats_to: int


class AudioFeatureExtractor:
  """Waveforms (16 kHz mono float) -> per-clip HuBERT features [T_a, H] at the model's frame
  rate (50 Hz for hubert-base), batched with padding masks.

  Args:
    config: model architecture.
    params: `HubertModel` parameters (`hubert.load_pretrained` or `hubert.init_params`).
    layer: None = encoder output (official); an int indexes the hidden states.
    batch_size: model inputs (chunks) per call; batches are padded to it.
    chunk_seconds: output frames per chunk of a long clip.
    context_seconds: audio on each side of a chunk the model also sees; clips up to
      chunk + 2 * context seconds run whole.
    normalize: per-clip zero-mean unit-variance (off in the official pipeline).
    precision: `HubertModel.precision`.
    bucket_frames: padded lengths in output frames (one compile each); default the longest
      window halved down to MIN_BUCKET_FRAMES. The longest window is always added.
  """

  def __init__(self, config: hubert.HubertConfig, params: Any, *, layer: int | None = None,
               batch_size: int = 8, chunk_seconds: float = 20.0, context_seconds: float = 5.0,
               normalize: bool = False, precision: Any = "highest",
               bucket_frames: Sequence[int] | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if layer is not None:
      hubert.normalize_layer(config, layer)  # Range check now, not at the first batch.
    self.config = config
    self.params = params
    self.layer = layer
    self.batch_size = int(batch_size)
    self.normalize = normalize
    if not chunk_seconds > 0 or not context_seconds >= 0:
      raise ValueError(f"need chunk_seconds > 0 and context_seconds >= 0, got "
                       f"{chunk_seconds}, {context_seconds}")
    self.chunk_frames = max(1, round(chunk_seconds * config.frame_rate))
    self.context_frames = round(context_seconds * config.frame_rate)
    self.max_window_frames = self.chunk_frames + 2 * self.context_frames
    # Bucket ladder: the longest window halved down to >= MIN_BUCKET_FRAMES (hubert-base:
    # 1500, 750, ..., 46 frames = 30 s .. 0.9 s); each bucket is one compile, and padding
    # wastes at most half of a batch.
    buckets = [self.max_window_frames]
    if bucket_frames is not None:
      buckets += [int(b) for b in bucket_frames if 0 < b < self.max_window_frames]
    else:
      while buckets[-1] // 2 >= MIN_BUCKET_FRAMES:
        buckets.append(buckets[-1] // 2)
    self.bucket_frames = tuple(sorted(set(buckets)))
    self._group_norm = config.feat_extract_norm == "group"
    model = hubert.HubertModel(config, precision=precision)

    def forward(params, x, mask, mean, var):
      stats = hubert.GroupNormStats(mean, var) if self._group_norm else None
      return model.apply({"params": params}, x, mask, layer=layer, norm_stats=stats,
                         method=hubert.HubertModel.features)

    def moments(params, x, mask, start, stop):
      return model.apply({"params": params}, x, mask, start, stop,
                         method=hubert.HubertModel.group_norm_moments)

    self._forward = jax.jit(forward)
    self._moments = jax.jit(moments)

  @classmethod
  def from_pretrained(cls, model_dir: PathLike, **kwargs: Any) -> "AudioFeatureExtractor":
    """Builds the extractor from a Hugging Face checkpoint folder (no network)."""
    config, params = hubert.load_pretrained(model_dir)
    return cls(config, params, **kwargs)

  @property
  def frame_rate(self) -> float:
    """Output frames per second (50 for hubert-base)."""
    return self.config.frame_rate

  def bucket_samples(self, frames: int) -> int:
    """Padded input length of a bucket of `frames` output frames.

    A window of f frames needs (f - 1) * hop + receptive_field samples; the last window of a
    clip also keeps its < hop trailing samples (they reach the GroupNorm statistics).
    """
    return (frames - 1) * self.config.frame_hop + self.config.receptive_field + (
        self.config.frame_hop - 1)

  def _plan(self, clip: int, num_samples: int) -> list[_Chunk]:
    """Chunks of one clip (a single chunk when it fits one window)."""
    c = self.config
    total = c.num_frames(num_samples)
    first_conv_total = c.num_frames(num_samples, layers=1)
    if total <= self.max_window_frames:
      return [_Chunk(clip, 0, num_samples, 0, total, 0, 0, first_conv_total)]
    hop, core, ctx = c.frame_hop, self.chunk_frames, self.context_frames
    # First-conv frames per output frame; chunk starts are multiples of the hop, so of it too.
    ratio = hop // c.conv_stride[0]
    chunks = []
    for core_start in range(0, total, core):
      core_stop = min(core_start + core, total)
      win_start = max(0, core_start - ctx)
      win_stop = min(total, core_stop + ctx)
      last = core_stop == total
      stop = num_samples if last else (win_stop - 1) * hop + c.receptive_field
      stats_from = (core_start - win_start) * ratio
      stats_to = c.num_frames(stop - win_start * hop, layers=1) if last else (
          core_stop - win_start) * ratio
      if stats_to > c.num_frames(stop - win_start * hop, layers=1):
        raise ValueError("conv kernels narrower than their strides are not supported "
                         "for chunked extraction")
      chunks.append(_Chunk(clip, win_start * hop, stop, core_start - win_start,
                           core_stop - win_start, core_start, stats_from, stats_to))
    return chunks

  def _bucket(self, num_samples: int) -> int:
    for frames in self.bucket_frames:
      if num_samples <= self.bucket_samples(frames):
        return self.bucket_samples(frames)
    raise AssertionError(f"no bucket for {num_samples} samples")  # _plan bounds the windows.

  def _batches(self, chunks: list[_Chunk]) -> list[tuple[int, list[_Chunk]]]:
    """(padded length, up to batch_size chunks) groups, one bucket per group."""
    by_bucket: dict[int, list[_Chunk]] = {}
    for chunk in chunks:
      by_bucket.setdefault(self._bucket(chunk.stop - chunk.start), []).append(chunk)
    return [(length, group[i:i + self.batch_size])
            for length, group in sorted(by_bucket.items())
            for i in range(0, len(group), self.batch_size)]

  def _inputs(self, waves: Sequence[np.ndarray], length: int, group: Sequence[_Chunk]):
    x = np.zeros((self.batch_size, length), np.float32)
    mask = np.zeros((self.batch_size, length), bool)
    for row, chunk in enumerate(group):
      n = chunk.stop - chunk.start
      x[row, :n] = waves[chunk.clip][chunk.start:chunk.stop]
      mask[row, :n] = True
    return x, mask

  def check(self, waveform: np.ndarray, source: str = "<waveform>") -> np.ndarray:
    """Returns `waveform` as float32 [N]; AudioError naming `source` if unusable."""
    w = np.asarray(waveform, np.float32)
    if w.ndim != 1:
      raise AudioError(f"{source}: expected a 1-D mono waveform, got shape {w.shape}")
    if self.config.num_frames(w.shape[0]) < 1:
      raise AudioError(
          f"{source}: {w.shape[0]} samples is shorter than one frame "
          f"({self.config.receptive_field} samples = "
          f"{1000 * self.config.receptive_field / SAMPLE_RATE:g} ms at 16 kHz)")
    if not np.all(np.isfinite(w)):
      raise AudioError(f"{source}: NaN or Inf samples")
    return w

  def __call__(self, waveforms: Sequence[np.ndarray],
               progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Features of each waveform.

    Args:
      waveforms: float mono 16 kHz waveforms (`read_wav`'s output), any lengths.
      progress: optional callback, called with the number of chunks each batch finished.

    Returns:
      float32 [num_frames(len), H] per waveform, `HubertConfig.num_frames` frames.

    Raises:
      AudioError: a waveform shorter than one frame's receptive field (25 ms for base).
    """
    waves = []
    for i, w in enumerate(waveforms):
      w = self.check(w, f"waveform {i}")
      waves.append(normalize_waveform(w) if self.normalize else w)
    chunks = [chunk for i, w in enumerate(waves) for chunk in self._plan(i, w.shape[0])]
    batches = self._batches(chunks)
    channels = self.config.conv_dim[0]
    mean = np.zeros((len(waves), channels), np.float32)
    var = np.ones((len(waves), channels), np.float32)
    if self._group_norm:
      mean, var = self._clip_statistics(waves, batches)
    out = [np.zeros((self.config.num_frames(w.shape[0]), self.config.hidden_size), np.float32)
           for w in waves]
    for length, group in batches:
      x, mask = self._inputs(waves, length, group)
      rows = [chunk.clip for chunk in group] + [0] * (self.batch_size - len(group))
      features, _ = self._forward(self.params, x, mask, mean[rows], var[rows])
      features = np.asarray(features)
      for row, chunk in enumerate(group):
        n = chunk.keep_to - chunk.keep_from
        out[chunk.clip][chunk.out_from:chunk.out_from + n] = features[
            row, chunk.keep_from:chunk.keep_to]
      if progress is not None:
        progress(len(group))
    return out

  def _clip_statistics(self, waves, batches) -> tuple[np.ndarray, np.ndarray]:
    """Whole-clip first-conv GroupNorm mean / variance, [clips, C] float32.

    Each chunk contributes the moments of its own share of the clip's first-conv frames; the
    shares partition the clip, and are merged in float64 with Chan et al.'s pairwise update.
    """
    channels = self.config.conv_dim[0]
    count = np.zeros(len(waves))
    mean = np.zeros((len(waves), channels))
    m2 = np.zeros((len(waves), channels))
    for length, group in batches:
      x, mask = self._inputs(waves, length, group)
      start = np.zeros(self.batch_size, np.int32)
      stop = np.zeros(self.batch_size, np.int32)
      for row, chunk in enumerate(group):
        start[row], stop[row] = chunk.stats_from, chunk.stats_to
      n_b, mean_b, m2_b = (np.asarray(a, np.float64)
                           for a in self._moments(self.params, x, mask, start, stop))
      for row, chunk in enumerate(group):
        i = chunk.clip
        n_a, n = count[i], count[i] + n_b[row]
        if n_b[row] == 0:
          continue
        delta = mean_b[row] - mean[i]
        mean[i] = mean[i] + delta * (n_b[row] / n)
        m2[i] = m2[i] + m2_b[row] + delta**2 * (n_a * n_b[row] / n)
        count[i] = n
    var = m2 / np.maximum(count, 1.0)[:, None]
    return mean.astype(np.float32), var.astype(np.float32)


# ---------------------------------------------------------------------------
# Frame rate.


def motion_frame_count(num_audio_frames: int, fps: float,
                       audio_fps: float = official.HUBERT_FPS) -> int:
  """Motion frames whose time i / fps falls inside the audio (ceil(T_a * fps / audio_fps))."""
  # The small slack keeps exact products (50 frames -> 30 at 30 fps) from rounding up.
  return max(1, math.ceil(num_audio_frames * fps / audio_fps - 1e-9))


def to_motion_frame_rate(features: np.ndarray, fps: float, num_frames: int | None = None, *,
                         audio_fps: float = official.HUBERT_FPS,
                         max_length_diff: int = official.DEFAULT_MAX_LENGTH_DIFF,
                         source: str = "<audio>") -> np.ndarray:
  """Resamples [T_a, D] features to the motion frame rate, as convert_official's emoca format.

  Calls `official.resample_by_rate` (motion frame i reads audio row i * audio_fps / fps,
  linearly interpolated), the rule `tools/convert_official.py --format emoca --audio_fps 50`
  applies to the speaker audio.

  Args:
    features: [T_a, D] features at `audio_fps`.
    fps: motion frame rate (ViCo 30).
    num_frames: motion frames to produce (a video's length); default the frames the audio
      covers, `motion_frame_count`.
    audio_fps: frame rate of `features` (HuBERT: 50).
    max_length_diff: allowed duration mismatch in motion frames (see `resample_by_rate`).
    source: name for error messages.

  Returns:
    float32 [num_frames, D].
  """
  features = np.asarray(features)
  if num_frames is None:
    num_frames = motion_frame_count(features.shape[0], fps, audio_fps)
  out, _ = official.resample_by_rate(features, audio_fps, fps, num_frames, source=source,
                                     field="speaker_audio", max_length_diff=max_length_diff)
  return out
