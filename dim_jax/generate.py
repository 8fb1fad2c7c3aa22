"""Phase `generate` and the Python generation API: DIM-Listener / DIM-Speaker motion.

    from dim_jax import generate
    generator = generate.Generator.from_workdir("runs/finetune_listener",
                                                 sampler.SamplingConfig(temperature=1.0))
    out = generator(batch, jax.random.PRNGKey(0), num_samples=4, start="first_frame")
    out["motion"]  # [B, 4, T, 56] raw units, zero on padded frames; T any length

A fine-tuned checkpoint (`finetune_listener` or `finetune_speaker`) holds the DIM params, both
tokenizers and the normalization statistics the model was trained with. Inputs are raw units:
they are standardised inside the jitted function (`task.normalization`, padding exactly 0 as in
training) and the motion comes back in raw units (`denormalize`).

Clips of any length, as one continuous stream (a sliding window): window length W is the
model's training window (`data.max_len` of the fine-tuning run; `Generator.window`), overlap O
(`Generator.overlap`, default W // 4), hop H = W - O; window k covers frames [k H, k H + W),
the last one padded with the mask. Each window is conditioned on the speaker motion and audio
of its own frames (`task.conditioning` on that slice, as in training). Window 0 is sampled
from frame 0's token; every later window is prompted with the model's own tokens of its first
O frames (the previous window's last O, `sampler.generate_tokens(prompt_tokens=...)`) and
samples only the rest, so the tokens form one stream and no window restarts. A Python loop
over windows (not frames) calls one jitted window step: one compiled program per (batch,
samples) shape whatever the clip length; the host assembles the clip. Each window's tokens
are VQ-decoded on their own and the decodes are cross-faded linearly over the overlaps
(`crossfade_weights`); `seam_statistics` measures what is left of the seams.

Frame 0 (`start`): 'first_frame' (the official protocol) takes the VQ code of a still window
repeating the ground truth's first frame (token 0), so no later ground-truth frame reaches the
model; only that frame enters the jitted function, and later windows are never re-seeded.
'none' uses no ground truth at all: the model's start token if it was trained with
`model.start='start_token'` (with 'first_frame' such a model gets [start, frame-0 token]),
otherwise the code of a still window at the training mean (0 in standardised units, or raw 0
when the model was trained on raw features). With an InstanceNorm tokenizer (official
`conv_norm='instance'`) a still window is zero after the first conv block, so its code does
not depend on the first frame (README "Frame 0 with InstanceNorm tokenizers"). The parallel
variant (trained with every position masked) and the no-VQ ablation use no ground truth in
either mode; their windows are generated independently and cross-faded the same way. A parallel model trained with partial
masks (`loss.parallel_mask_schedule`) decodes in `Generator.iterative` passes and is given
frame 0's token and each later window's overlap tokens, as the autoregressive one. N samples per input are one batch.

Randomness and devices: clip c is drawn from its own key, `fold_in(seed, hash of c's id)`
(`clip_keys`; the window step is vmapped over clips), so its samples do not depend on the
other clips, the batch size, the mesh or the process count (tokens equal; motion to float
rounding). The phases generate on the training mesh (`config.mesh`, `sharding.make_mesh`):
params placed as training places them (replicated over 'data', FSDP over 'fsdp'), each batch
of `batch_size` rows split over all devices, so each process samples only its devices'
rows, and the outputs gathered so every process holds every clip.

The phase reads the split's clips directly (`records.read_clips`, raw units), groups them by
window count, and writes into `<workdir>/generated/`, in raw units, the formats of
`generate.formats` (`handoff`): `sample_<k>/<clip_id>.npy` ((T, 56) float32, one file per clip
and sample), the official predictions pickle per sample, the per-frame EMOCA folders PIRenderer
reads, `render.md` (which official script reads which file), and `sampling.json` (settings,
source checkpoint, errors against the ground truth over every clip); files are written to a
temporary name and renamed. With several processes each writes the per-clip files of every
P-th clip and process 0 the pickles, `render.md` and `sampling.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from dim_jax import files, handoff, sampler
from dim_jax import sharding as sharding_lib
from dim_jax.data import pipeline, records
from dim_jax.models import dim as dim_lib
from dim_jax.models import quantize, vqvae
from dim_jax.training import checkpointing, dim_tasks

GENERATING_PHASES = {"finetune_listener": "listener", "finetune_speaker": "speaker"}


START_MODES = ("first_frame", "none")


def num_windows(length: int, window: int, overlap: int) -> int:
  """Windows of `window` frames, `window - overlap` apart, needed to cover `length` frames."""
  if length <= window:
    return 1
  hop = window - overlap
  return 1 + -(-(length - window) // hop)


def padded_length(windows: int, window: int, overlap: int) -> int:
  """Frames covered by `windows` windows: the time axis the jitted function works on."""
  return window + (windows - 1) * (window - overlap)


def crossfade_weights(windows: int, window: int, overlap: int) -> np.ndarray:
  """[windows, window] float32 weights of each window's decoded motion in the clip.

  In the overlap of windows k-1 and k (window k's frames j < overlap) window k weighs
  (j + 1) / (overlap + 1) and window k-1 the rest, so every frame's weights sum to one and
  neither window ever enters or leaves at full weight; elsewhere a frame has one window of
  weight 1 (exactly: its motion passes unchanged).
  """
  ramp = np.arange(1, overlap + 1, dtype=np.float64) / (overlap + 1)
  weights = np.ones((windows, window), np.float64)
  weights[1:, :overlap] = ramp
  if overlap:
    weights[:-1, window - overlap:] = 1.0 - ramp
  return weights.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Generator:
  """Samples the target role's motion from a fine-tuned DIM (see module docstring).

  Attributes:
    task: the fine-tuned phase's task (model, tokenizers, normalization statistics).
    params: its parameter tree.
    sampling: how each token is drawn.
    window: frames per generated window: the training window (`data.max_len` of the
      fine-tuning run) unless overridden.
    overlap: frames each window shares with the previous one (1 <= overlap <= window // 2;
      None = window // 4, at least 1).
    source: where the params come from (for the records).
    weights: how the joint decoder's kernels are held: 'float32', 'bfloat16' or 'int8'
      (per output column); `params` is quantized once here (`models/quantize.py`) and each
      kernel is dequantized inside the jitted step where its matmul reads it.
    iterative: passes and mask schedule of the parallel decoder (`sampler.iterative_decode`).
    mesh: the ('data', 'fsdp') device mesh to generate on (`sharding.make_mesh`, as
      training), or None for the default device. With a mesh the params are placed with
      the training shardings (FSDP over 'fsdp', replicated over 'data'), every batch's
      clips are split over all devices (the batch size must be a multiple of the device
      count) and the outputs are gathered, so every process gets every row.
  """
  task: dim_tasks.DIMTask
  params: Any
  sampling: sampler.SamplingConfig
  window: int
  overlap: Optional[int] = None
  source: str = ""
  weights: str = "float32"
  iterative: sampler.IterativeConfig = sampler.IterativeConfig()
  mesh: Optional[Mesh] = None

  def __post_init__(self):
    window = int(self.window)
    overlap = max(1, window // 4) if self.overlap is None else int(self.overlap)
    object.__setattr__(self, "window", window)
    object.__setattr__(self, "overlap", overlap)
    if window < 2 or not 1 <= overlap <= window // 2:
      raise ValueError(f"generation window {window} with overlap {overlap}: expected "
                       "window >= 2 and 1 <= overlap <= window // 2")
    cfg = self.task.model.config
    longest = window + (cfg.start == "start_token" and not cfg.parallel)
    if longest > cfg.max_seq_len:
      raise ValueError(f"generation window {window} needs {longest} decoder positions; "
                       f"model.max_seq_len is {cfg.max_seq_len}")
    object.__setattr__(self, "params", quantize.quantize_params(self.params, self.weights))
    if self.mesh is not None:
      object.__setattr__(self, "params", sharding_lib.place_tree(self.params, self.mesh))

  @classmethod
  def from_workdir(cls, workdir: str, sampling: sampler.SamplingConfig, step: str = "best",
                   *, window: Optional[int] = None, overlap: Optional[int] = None,
                   weights: str = "float32",
                   iterative: Optional[sampler.IterativeConfig] = None,
                   mesh: Optional[Mesh] = None) -> "Generator":
    """The checkpoint of a fine-tune workdir; `window` defaults to its `data.max_len`."""
    meta = checkpointing.load_meta(workdir, step)
    if meta.get("phase") not in GENERATING_PHASES:
      raise checkpointing.CheckpointMismatchError(
          f"{workdir} holds a {meta.get('phase')!r} checkpoint; generation needs a "
          f"fine-tuned model (phase one of {sorted(GENERATING_PHASES)})")
    task = dim_tasks.DIMTask.from_meta(meta)
    if window is None:
      window = (meta.get("config") or {}).get("data", {}).get("max_len")
      if window is None:
        raise checkpointing.CheckpointMismatchError(
            f"{workdir} records no data.max_len (its training window); pass window=")
    params, _ = checkpointing.load_params(workdir, step)
    abstract = jax.eval_shape(functools.partial(task.init_params, jax.random.PRNGKey(0)),
                              pipeline.dummy_batch(1))
    problems = checkpointing.tree_mismatches(abstract, params)
    if problems:
      raise checkpointing.CheckpointMismatchError(
          f"{workdir} (step {meta['step']}) does not match its own recorded model:\n  "
          + "\n  ".join(problems[:50]))
    params = jax.tree.map(jnp.asarray, params)
    return cls(task=task, params=params, sampling=sampling, window=int(window),
               overlap=overlap, source=f"{os.path.abspath(workdir)}@{meta['step']}",
               weights=weights, iterative=iterative or sampler.IterativeConfig(), mesh=mesh)

  @property
  def role(self) -> str:
    return GENERATING_PHASES[self.task.name]

  def __call__(self, batch: dict, rng: jax.Array, num_samples: int = 1,
               start: str = "first_frame") -> dict:
    """Generates whole clips for a batch of raw-unit inputs (padded to a common length).

    Args:
      batch: speaker_audio [B, T, A], mask [B, T] (True on each clip's first frames),
        speaker_motion [B, T, 56] (DIM-Listener's conditioning) and, with
        start='first_frame', the target role's motion (`listener_motion` for DIM-Listener),
        of which only frame 0 is read. Raw units; other keys are ignored.
      rng: a PRNG key (row b is drawn with `fold_in(rng, b)`) or [B] keys, one per row
        (`clip_keys`). Row b's N samples depend only on its own key and inputs (window k
        uses `fold_in(key, k)`; the N samples of a row draw jointly), not on the other
        rows, the batch size or the mesh.
      num_samples: N samples per clip, one batch.
      start: 'first_frame' (official: the ground truth's first frame seeds frame 0's
        token) or 'none' (no ground truth at all; module docstring).

    Returns:
      dict(motion [B, N, T, 56] float32 raw units, zero on padding; tokens [B, N, T] int32
      (zero on padding) and window_tokens [B, N, K, W] int32 (each window's tokens), both
      None for the no-VQ ablation).
    """
    if start not in START_MODES:
      raise ValueError(f"start={start!r}; expected one of {START_MODES}")
    # Host arrays: the per-window slices below are NumPy views, not device ops.
    mask = np.asarray(batch["mask"], bool)
    size, frames = mask.shape
    if self.mesh is not None and size % self.mesh.devices.size:
      raise ValueError(f"a batch of {size} clips cannot be split over the mesh's "
                       f"{self.mesh.devices.size} devices (data {self.mesh.shape['data']} x "
                       f"fsdp {self.mesh.shape['fsdp']}): pad it to a multiple")
    keys = _row_keys(rng, size)
    windows = num_windows(frames, self.window, self.overlap)
    pad = padded_length(windows, self.window, self.overlap) - frames

    def padded(x):
      x = np.asarray(x, np.float32)
      return np.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

    # Only what the model may see enters the jitted functions: DIM-Speaker is conditioned on
    # audio alone, and of the target role's ground truth at most frame 0 is passed.
    speaker = (batch["speaker_motion"] if self.role == "listener"
               else np.zeros((size, frames, records.MOTION_DIM), np.float32))
    first_frame = (np.asarray(batch[f"{self.role}_motion"], np.float32)[:, 0]
                   if start == "first_frame"
                   else np.zeros((size, records.MOTION_DIM), np.float32))
    inputs = dict(speaker_motion=padded(speaker), speaker_audio=padded(batch["speaker_audio"]),
                  mask=np.pad(mask, [(0, 0), (0, pad)]), first_frame=first_frame)
    out = _generate(self, self.params, inputs, keys, np.bool_(start == "first_frame"),
                    num_samples=num_samples, num_windows=windows)
    out["motion"] = out["motion"][:, :, :frames]
    if out["tokens"] is not None:
      out["tokens"] = out["tokens"][:, :, :frames]
    return out

  def __hash__(self):  # static jit argument: identity of the task and generation settings.
    # The mesh too: the jitted steps constrain their outputs to its batch sharding.
    return hash((self.task, self.sampling, self.window, self.overlap, self.iterative,
                 self.mesh))

  def __eq__(self, other):
    return (isinstance(other, Generator) and self.task == other.task
            and self.sampling == other.sampling and self.window == other.window
            and self.overlap == other.overlap and self.iterative == other.iterative
            and self.mesh == other.mesh)


def clip_keys(rng: jax.Array, clip_ids: Sequence[str]) -> np.ndarray:
  """[len(clip_ids), 2] uint32: clip c's key `fold_in(rng, h(c))`, h = 31 bits of sha256(c).

  A clip's samples depend only on the seed and its id: not on the other clips, the order,
  the batch size, the mesh or the process count.
  """
  hashes = np.array([int.from_bytes(hashlib.sha256(str(c).encode()).digest()[:4], "little")
                     & 0x7FFFFFFF for c in clip_ids], np.uint32)
  return _fold_rows(rng, hashes)


def _raw_key(rng) -> np.ndarray:
  """Host uint32 key data of a raw (`PRNGKey`) or typed (`jax.random.key`) key array."""
  if jnp.issubdtype(getattr(rng, "dtype", np.uint32), jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return np.asarray(rng, np.uint32)


def _fold_rows(rng, data: np.ndarray) -> np.ndarray:
  return _raw_key(jax.vmap(jax.random.fold_in, (None, 0))(jnp.asarray(_raw_key(rng)),
                                                          jnp.asarray(data, jnp.uint32)))


def _row_keys(rng, size: int) -> np.ndarray:
  """[size, 2] uint32 host keys: given per row, or `fold_in(rng, row)` of one key."""
  keys = _raw_key(rng)
  if keys.ndim == 1:
    return _fold_rows(keys, np.arange(size))
  if keys.ndim != 2 or keys.shape[0] != size:
    raise ValueError(f"rng of shape {keys.shape}: expected one key or one per row "
                     f"([{size}] keys) for a batch of {size} clips")
  return keys


def _generate(gen: Generator, params, inputs: dict, keys: np.ndarray, use_first_frame,
              *, num_samples: int, num_windows: int) -> dict:
  """All windows of a padded batch, one jitted window step each (module docstring).

  A Python loop over windows (not frames) calling one compiled `_window_step`: clips of any
  length share one executable per (batch, samples) shape. Raw units in and out. With
  `gen.mesh` every input is a global array split over the batch axis (each device, hence
  each process, computes only its rows) and the windows' outputs are gathered once, after
  the loop, so the host assembly below sees every row on every process.
  """
  window, overlap = gen.window, gen.overlap
  hop = window - overlap
  mask = inputs["mask"]
  if mask.shape[1] != padded_length(num_windows, window, overlap):
    raise ValueError(f"{mask.shape[1]} frames do not fill {num_windows} windows")
  cfg = gen.task.model.config
  tokens_out = cfg.output == "tokens"
  place = functools.partial(_place_rows, gen.mesh)
  first = _first_tokens(gen, params, place(inputs["first_frame"]), use_first_frame,
                        num_samples=num_samples)
  rows = mask.shape[0] * num_samples
  weights = crossfade_weights(num_windows, window, overlap)
  previous = _no_tokens(gen, rows)
  keys = place(keys)
  outputs = []
  for k in range(num_windows):
    frames = slice(k * hop, k * hop + window)
    window_inputs = {key: place(inputs[key][:, frames])
                     for key in ("speaker_motion", "speaker_audio", "mask")}
    tokens, window_motion = _window_step(gen, params, window_inputs, previous, first,
                                         np.int32(k), keys, use_first_frame,
                                         num_samples=num_samples)
    outputs.append((tokens, window_motion))
    if tokens_out:
      previous = tokens
  # Assembled on the host: every window's slice offset differs, device updates would compile
  # once per offset. One gather after the loop: the windows are dispatched without waiting.
  motion = np.zeros((rows, mask.shape[1], records.MOTION_DIM), np.float32)
  token_stream = np.zeros((rows, mask.shape[1]), np.int32)
  window_tokens = []
  for k, (tokens, window_motion) in enumerate(sharding_lib.to_host(outputs)):
    frames = slice(k * hop, k * hop + window)
    motion[:, frames] += weights[k][None, :, None] * window_motion
    if tokens_out:
      token_stream[:, frames] = tokens
      window_tokens.append(token_stream[:, frames])
  return _finish(gen, motion, token_stream,
                 np.stack(window_tokens, axis=1) if tokens_out else None, mask,
                 num_samples=num_samples)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("num_samples",))
def _first_tokens(gen: Generator, params, first_frame: jax.Array, use_first_frame: jax.Array,
                  *, num_samples: int) -> jax.Array:
  """[B * N] frame-0 tokens: the VQ code of a still window at the ground truth's first frame
  (no later frame can reach it), or of a still window at the training mean (0 standardised,
  or raw 0 without normalization) when no ground truth is used."""
  task, norm = gen.task, gen.task.normalization
  vq = task.speaker_vq if gen.role == "speaker" else task.listener_vq
  frame0 = first_frame if norm is None else norm.normalize(first_frame, f"{gen.role}_motion")
  still = jnp.where(use_first_frame, frame0, 0.0)
  still = jnp.broadcast_to(still[:, None, :], (still.shape[0], gen.window, still.shape[-1]))
  first = vq.apply({"params": params[f"{gen.role}_vq"]}, still,
                   jnp.ones(still.shape[:2], bool), method=vqvae.VQVAE.encode)["tokens"][:, 0]
  return _split_rows(gen, sampler.repeat_for_samples(first, num_samples))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _no_tokens(gen: Generator, rows: int) -> jax.Array:
  """[rows, W] zeros: the `previous` tokens of window 0, made on the devices with the
  sharding the window step gives its own tokens (an input sharding that differed from the
  fed-back one would compile the step twice)."""
  return _split_rows(gen, jnp.zeros((rows, gen.window), jnp.int32))


def _place_rows(mesh: Optional[Mesh], array: np.ndarray):
  """A host batch array (rows first) split over the mesh's devices; as is without a mesh."""
  if mesh is None:
    return array
  return sharding_lib.host_to_global(array, sharding_lib.batch_sharding(mesh))


def _split_rows(gen: Generator, x: jax.Array) -> jax.Array:
  """Rows (axis 0) split over the mesh as the inputs: the outputs fed back into the next
  window keep the sharding the first window's inputs had, so there is one compile."""
  if gen.mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, sharding_lib.batch_sharding(gen.mesh))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("num_samples",))
def _window_step(gen: Generator, params, window_inputs: dict, previous: jax.Array,
                 first: jax.Array, k: jax.Array, keys: jax.Array, use_first_frame: jax.Array,
                 *, num_samples: int):
  """Window k of every clip: (tokens [B * N, W] or None, standardised motion [B * N, W, 56]).

  `_clip_window_step` vmapped over the B clips: clip b's draws use its own key `keys[b]`
  only, so its samples do not depend on the other rows, the batch size or how the rows are
  split over devices and processes.
  """
  size = keys.shape[0]

  def per_clip(x):  # [B * N, ...] -> [B, N, ...] (row b * N + n = sample n of clip b).
    return x.reshape((size, num_samples) + x.shape[1:])

  def one_clip(clip_inputs, clip_previous, clip_first, key):
    clip_inputs = jax.tree.map(lambda x: x[None], clip_inputs)  # a batch of one clip
    return _clip_window_step(gen, params, clip_inputs, clip_previous, clip_first, k, key,
                             use_first_frame, num_samples=num_samples)

  tokens, motion = jax.vmap(one_clip)(window_inputs, per_clip(previous), per_clip(first), keys)
  rows = lambda x: _split_rows(gen, x.reshape((size * num_samples,) + x.shape[2:]))
  return (None if tokens is None else rows(tokens)), rows(motion)


def _clip_window_step(gen: Generator, params, window_inputs: dict, previous: jax.Array,
                      first: jax.Array, k: jax.Array, rng: jax.Array,
                      use_first_frame: jax.Array, *, num_samples: int):
  """Window k of a batch drawn with one key (`_window_step` calls it per clip): (tokens
  [B * N, W] or None, standardised motion [B * N, W, 56])."""
  task, cfg = gen.task, gen.task.model.config
  model, norm = task.model, task.normalization
  window, overlap = gen.window, gen.overlap
  mask = window_inputs["mask"]

  def standardized(x, stream):
    # As the training pipeline: standardised, then exactly 0 on padding.
    x = x if norm is None else norm.normalize(x, stream)
    return jnp.where(mask[..., None], x, 0.0)

  window_batch = dict(speaker_motion=standardized(window_inputs["speaker_motion"],
                                                  "speaker_motion"),
                      speaker_audio=standardized(window_inputs["speaker_audio"],
                                                 "speaker_audio"), mask=mask)
  context = sampler.repeat_for_samples(task.conditioning(params, window_batch), num_samples)
  window_mask = sampler.repeat_for_samples(mask, num_samples)
  window_rng = jax.random.fold_in(rng, k)
  dim_params = {"params": params["dim"]}
  if cfg.output != "tokens":
    motion = model.apply(dim_params, context, window_mask, window_mask,
                         method=dim_lib.DIM.regress)
    return None, jnp.where(window_mask[..., None], motion, 0.0)
  rows = window_mask.shape[0]
  if cfg.parallel:
    # K passes of masked decoding (K=1: one pass, bit for bit the earlier sampler). A model
    # trained with partial masks (loss.parallel_mask_schedule != 'all') is given frame 0's
    # token (start='first_frame') in window 0 and the previous window's overlap tokens later,
    # so windows continue one stream; one trained with every frame masked never saw given
    # tokens, so its windows stay independent (and read no ground truth).
    positions = jnp.arange(window)[None, :]
    if task.options.parallel_mask_schedule == "all":
      given = jnp.zeros(window_mask.shape, bool)
    else:
      given = jnp.where(k == 0, (positions == 0) & use_first_frame, positions < overlap)
      given = jnp.broadcast_to(given, window_mask.shape)
    known = jnp.where(k == 0, jnp.zeros_like(previous).at[:, 0].set(first),
                      jnp.roll(previous, overlap - window, axis=1))
    decode = lambda inputs: model.apply(dim_params, inputs, context, window_mask, None,
                                        window_mask, method=dim_lib.DIM.decode)
    tokens = sampler.iterative_decode(decode, tokens=known, given=given, valid=window_mask,
                                      mask_token=cfg.mask_token, rng=window_rng,
                                      sampling=gen.sampling, iterative=gen.iterative)
  else:
    offset = 1 if cfg.start == "start_token" else 0  # [start, frame tokens...] as trained.
    length = window + offset
    # Window 0 starts from frame 0's token; later windows continue the token stream,
    # prompted with the previous window's tokens of the overlap, and sample only the rest.
    first_prompt = jnp.zeros((rows, length), jnp.int32).at[:, offset].set(first)
    continued = jnp.zeros((rows, length), jnp.int32).at[:, offset:offset + overlap].set(
        previous[:, window - overlap:])
    prompt = jnp.where(k == 0, first_prompt, continued)
    if offset:
      prompt = prompt.at[:, 0].set(cfg.start_token)
    # With a start token, frame 0 is given only with start='first_frame'.
    first_length = jnp.where(use_first_frame, 2, 1) if offset else 1
    prompt_length = jnp.where(k == 0, first_length, overlap + offset)
    decoder = dim_lib.joint_decoder_module(cfg)
    tokens = sampler.generate_tokens(
        decoder, params["dim"]["joint_decoder"], prompt_tokens=prompt,
        prompt_length=prompt_length, length=length, context=context,
        context_mask=window_mask, rng=window_rng, sampling=gen.sampling)[:, offset:]
  vq = task.speaker_vq if gen.role == "speaker" else task.listener_vq
  motion = vq.apply({"params": params[f"{gen.role}_vq"]}, tokens, window_mask,
                    method=vqvae.VQVAE.decode_tokens)
  return tokens, motion


def _finish(gen: Generator, motion, token_stream, window_tokens, mask, *, num_samples: int):
  """Raw units, zero on padding, [B, N, ...] layout (host arrays: no per-length compile)."""
  norm = gen.task.normalization
  if norm is not None:
    motion = norm.denormalize(motion, f"{gen.role}_motion").astype(np.float32)
  row_mask = sampler.repeat_for_samples(mask, num_samples)
  motion = np.where(row_mask[..., None], motion, np.float32(0.0))
  out = dict(motion=sampler.split_samples(motion, num_samples), tokens=None, window_tokens=None)
  if window_tokens is not None:
    out["tokens"] = sampler.split_samples(np.where(row_mask, token_stream, 0), num_samples)
    out["window_tokens"] = sampler.split_samples(window_tokens, num_samples)
  return out


def _clip_length(clip: dict) -> int:
  return int(np.asarray(clip["speaker_audio"]).shape[0])


def _batch_of(clips: list[dict], size: int, frames: int, role: str, start: str) -> dict:
  """Zero-padded raw arrays of `clips` plus empty filler rows up to `size` (one shape)."""
  audio_dim = np.asarray(clips[0]["speaker_audio"]).shape[-1]
  batch = dict(speaker_motion=np.zeros((size, frames, records.MOTION_DIM), np.float32),
               speaker_audio=np.zeros((size, frames, audio_dim), np.float32),
               mask=np.zeros((size, frames), bool))
  if start == "first_frame":  # Only frame 0 of the ground truth is ever read.
    batch[f"{role}_motion"] = np.zeros((size, 1, records.MOTION_DIM), np.float32)
  for row, clip in enumerate(clips):
    n = _clip_length(clip)
    if role == "listener":
      batch["speaker_motion"][row, :n] = clip["speaker_motion"]
    batch["speaker_audio"][row, :n] = clip["speaker_audio"]
    batch["mask"][row, :n] = True
    if start == "first_frame":
      batch[f"{role}_motion"][row, 0] = np.asarray(clip[f"{role}_motion"])[0]
  return batch


def generate_clips(generator: Generator, clips: list[dict], num_samples: int, rng: jax.Array,
                   *, batch_size: int, start: str = "first_frame") -> dict[str, np.ndarray]:
  """Samples every clip (dicts as `records.read_clips` returns, raw units) whole.

  Clips are grouped by window count (ascending, in input order within a group) and batched
  `batch_size` at a time, filler rows completing the last batch of a group (every batch has
  the same rows, so one compiled window step serves them all). Clip c is drawn with
  `clip_keys(rng, [c's id])`: its samples depend only on the seed and its id (and N), not
  on the other clips, their order, `batch_size`, the mesh or the process count; the motion
  is equal up to float rounding (XLA may sum a row's matmuls in another order for another
  batch shape), the tokens exactly unless such rounding flips a draw.

  With `generator.mesh`, each batch is one global batch of `batch_size` rows split over all
  devices: every process samples only the rows its devices hold (its share of the clips),
  and every process returns every clip (the outputs are gathered). Every process must call
  this with the same clips (all of them), as the phases do.

  Returns:
    {clip_id: samples [N, T, 56] float32 raw units}, T the clip's length.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}; expected >= 1")
  if generator.mesh is not None:
    sharding_lib.check_batch_size(batch_size, generator.mesh, jax.process_count(),
                                  "batch_size")
  ids = [clip["clip_id"] for clip in clips]
  if len(set(ids)) != len(ids):
    raise ValueError(f"clip ids repeat: {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
  keys = dict(zip(ids, clip_keys(rng, ids)))
  groups: dict[int, list[dict]] = {}
  for clip in clips:
    count = num_windows(_clip_length(clip), generator.window, generator.overlap)
    groups.setdefault(count, []).append(clip)
  out = {}
  for count in sorted(groups):
    frames = padded_length(count, generator.window, generator.overlap)
    members = groups[count]
    for first in range(0, len(members), batch_size):
      chunk = members[first:first + batch_size]
      batch = _batch_of(chunk, batch_size, frames, generator.role, start)
      # Filler rows reuse the first clip's key: their draws are discarded.
      batch_keys = np.stack([keys[clip["clip_id"]] for clip in chunk]
                            + [keys[chunk[0]["clip_id"]]] * (batch_size - len(chunk)))
      motion = generator(batch, batch_keys, num_samples, start=start)["motion"]
      for row, clip in enumerate(chunk):
        out[clip["clip_id"]] = motion[row, :, :_clip_length(clip)]
  return out


# --- the tokenizer's residual: what no token carries (opt-in sampling noise) ---------------
#
# Ours, not the official code's: the official decoder output is the motion. A token sequence
# cannot carry frame-level jitter (on the embedded synthetic data, i.i.d. noise on 47 of 50
# expression dims; real EMOCA fits jitter too), so decoded motion is smoother than the data,
# and FD, which compares each clip's frame covariance, charges it (the synthetic ground truth
# without its own noise scores expression FD 0.11). With `residual_noise`, samples add white
# Gaussian noise with the std of the white part of the tokenizer's residual on the training
# split: the VQ decoder read as a Gaussian whose frame-level variance is what it cannot
# represent. Only the white part: the residual's smooth part (a pose slightly off for a
# second) is an error, and white noise would be the wrong model of it. It costs MSE (adds
# that variance) and renders jitter: off by default; evaluate reports both rows.

RESIDUAL_KEY_TAG = 0x5E5D  # folds the sampling seed into the residual noise's own stream


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(gen: "Generator", params, windows: jax.Array, mask: jax.Array) -> jax.Array:
  vq = gen.task.speaker_vq if gen.role == "speaker" else gen.task.listener_vq
  decoded = vq.apply({"params": params[f"{gen.role}_vq"]}, windows, mask)["reconstruction"]
  if gen.mesh is not None:  # every process reads the whole result
    decoded = jax.lax.with_sharding_constraint(decoded, sharding_lib.replicated(gen.mesh))
  return decoded


def tokenizer_residual_std(generator: "Generator", clips: list[dict], *,
                           max_windows: int = 512, batch_size: int = 64) -> np.ndarray:
  """[56] std per dimension of the white (frame-level) part of what the tokenizer loses.

  The generator's own tokenizer (its role's VQ-VAE, as generation uses it) encodes and
  decodes each clip's target-role motion in consecutive windows of `generator.window`
  frames (the last one padded and masked), at most `max_windows` windows in clip order. Of
  the residual r = motion - reconstruction, the white part's variance is estimated from
  consecutive valid frames of a window: E[(r[t+1] - r[t])^2] / 2 (the first-difference
  estimator: white noise of variance v contributes v, a smooth error almost nothing).
  Units: standardised when the model was trained on normalised features (multiply by the
  data std for raw units, `residual_scale`), else raw.
  """
  if not clips:
    raise ValueError("tokenizer_residual_std needs at least one clip")
  window, stream = generator.window, f"{generator.role}_motion"
  norm = generator.task.normalization
  chunks, masks = [], []
  for clip in clips:
    motion = np.asarray(clip[stream], np.float32)
    if norm is not None:
      motion = np.asarray(norm.normalize(motion, stream), np.float32)
    for start in range(0, len(motion), window):
      piece = motion[start:start + window]
      chunks.append(np.pad(piece, [(0, window - len(piece)), (0, 0)]))
      masks.append(np.arange(window) < len(piece))
    if len(chunks) >= max_windows:
      break
  chunks, masks = np.stack(chunks[:max_windows]), np.stack(masks[:max_windows])
  filler = -len(chunks) % batch_size  # one compiled shape
  windows = np.pad(chunks, [(0, filler), (0, 0), (0, 0)])
  mask = np.pad(masks, [(0, filler), (0, 0)])
  residual = np.concatenate([
      np.asarray(windows[i:i + batch_size] - _reconstruct(
          generator, generator.params, windows[i:i + batch_size], mask[i:i + batch_size]))
      for i in range(0, len(windows), batch_size)])
  pairs = mask[:len(residual), 1:] & mask[:len(residual), :-1]  # [W, window - 1]
  steps = np.diff(residual, axis=1)[pairs]
  if not len(steps):
    raise ValueError("tokenizer_residual_std needs clips of at least 2 frames")
  return np.sqrt(0.5 * np.square(steps.astype(np.float64)).mean(axis=0)).astype(np.float32)


def residual_scale(generator: "Generator", residual_std: np.ndarray) -> np.ndarray:
  """[56] raw-unit std of the residual noise (`tokenizer_residual_std` x the data std)."""
  norm = generator.task.normalization
  if norm is None:
    return np.asarray(residual_std, np.float32)
  return (np.asarray(residual_std, np.float64)
          * np.asarray(norm.std(f"{generator.role}_motion"), np.float64)).astype(np.float32)


def add_residual_noise(samples: dict[str, np.ndarray], rng: jax.Array,
                       scale: np.ndarray) -> dict[str, np.ndarray]:
  """Samples plus Gaussian noise of std `scale` [56] (raw units) per dimension and frame.

  Clip c's noise is drawn from its own key, `clip_keys(fold_in(rng, RESIDUAL_KEY_TAG), [c])`:
  it depends only on the seed, c's id and its shape, as the samples themselves.
  """
  ids = list(samples)
  keys = clip_keys(jax.random.fold_in(jnp.asarray(_raw_key(rng)), RESIDUAL_KEY_TAG), ids)
  scale = np.asarray(scale, np.float32)
  out = {}
  for clip_id, key in zip(ids, keys):
    motion = np.asarray(samples[clip_id], np.float32)
    noise = np.random.default_rng([int(k) for k in key]).standard_normal(motion.shape)
    out[clip_id] = (motion + noise.astype(np.float32) * scale).astype(np.float32)
  return out


# --- generation from a recording: wav (+ the speaker's motion) -> listener / speaker motion ---

def clips_from_recordings(recordings: Sequence[dict], extractor, *, fps: float,
                          role: str = "listener") -> list[dict]:
  """Clips for `generate_clips` from recordings: HuBERT features extracted, at the motion rate.

  Args:
    recordings: dicts with `clip_id`, `wav` (a path, or float mono 16 kHz samples), for a
      listener model `speaker_motion` ([T, 56] raw EMOCA features of the speaker), and
      optionally `first_frame` ([56] or [T', 56]: the predicted role's first frame, read
      only with start='first_frame').
    extractor: a `dim_jax.data.audio.AudioFeatureExtractor` (the one `tools/extract_audio.py`
      uses: one batched, jitted HuBERT pass over every recording).
    fps: the motion frame rate the model was trained at.
    role: the generator's role; a speaker model needs only the wav.

  Returns:
    clip dicts as `records.read_clips` gives them (raw units); the audio is mapped to the
    motion frames with the rule of `tools/convert_official.py --format emoca` (a listener
    clip has the speaker motion's length, the wav must agree with it within 2 frames; a
    speaker clip has the frames the audio covers). The predicted role's motion is zero but
    for `first_frame`.
  """
  from dim_jax.data import audio as audio_lib  # pylint: disable=g-import-not-at-top
  waves = [audio_lib.read_wav(r["wav"]) if isinstance(r["wav"], (str, os.PathLike))
           else extractor.check(np.asarray(r["wav"], np.float32), f"{r['clip_id']} wav")
           for r in recordings]
  features = extractor(waves)
  clips = []
  for recording, feats in zip(recordings, features):
    clip_id = recording["clip_id"]
    source = str(recording["wav"]) if isinstance(recording["wav"], (str, os.PathLike)) else (
        f"{clip_id} wav")
    speaker = recording.get("speaker_motion")
    if role == "listener":
      if speaker is None:
        raise ValueError(f"{clip_id}: a listener model needs the speaker's motion")
      speaker = np.asarray(speaker, np.float32)
      if speaker.ndim != 2 or speaker.shape[1] != records.MOTION_DIM or len(speaker) < 2:
        raise ValueError(f"{clip_id}: speaker motion of shape {speaker.shape}; expected "
                         f"[T >= 2, {records.MOTION_DIM}]")
      frames = speaker.shape[0]
    else:
      frames = audio_lib.motion_frame_count(feats.shape[0], fps, extractor.frame_rate)
      speaker = np.zeros((frames, records.MOTION_DIM), np.float32)
    speaker_audio = audio_lib.to_motion_frame_rate(feats, fps, frames,
                                                   audio_fps=extractor.frame_rate, source=source)
    predicted = np.zeros((frames, records.MOTION_DIM), np.float32)
    if recording.get("first_frame") is not None:
      first = np.asarray(recording["first_frame"], np.float32).reshape(-1, records.MOTION_DIM)
      predicted[0] = first[0]
    clip = dict(clip_id=clip_id, speaker_motion=speaker, speaker_audio=speaker_audio,
                length=frames, fps=float(fps), listener_motion=predicted)
    if role == "speaker":
      clip["speaker_motion"] = predicted
    clips.append(clip)
  return clips


def read_recordings(directory: str, role: str = "listener") -> list[dict]:
  """`<clip>.wav` (+ `<clip>.speaker.npy` [T, 56] for a listener model, optional
  `<clip>.first_frame.npy`) of a folder -> `clips_from_recordings` inputs, sorted by clip."""
  try:
    names = sorted(os.listdir(directory))
  except OSError as error:
    raise files.explain_os_error(directory, error) from None
  wavs = [n for n in names if n.lower().endswith(".wav")]
  if not wavs:
    raise ValueError(f"{directory}: no .wav files (expected <clip>.wav"
                     + (" and <clip>.speaker.npy)" if role == "listener" else ")"))
  recordings = []
  for wav in wavs:
    clip_id = wav[:-4]
    recording = dict(clip_id=clip_id, wav=os.path.join(directory, wav))
    for key, suffix in (("speaker_motion", ".speaker.npy"), ("first_frame", ".first_frame.npy")):
      path = os.path.join(directory, clip_id + suffix)
      if os.path.exists(path):
        try:
          recording[key] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
          raise ValueError(f"{path}: not a readable .npy ({error})") from None
      elif key == "speaker_motion" and role == "listener":
        raise ValueError(f"{path}: missing (a listener model needs the speaker's motion "
                         "beside each wav)")
    recordings.append(recording)
  return recordings


def write_samples(out_dir: str, samples: dict[str, np.ndarray], num_samples: int, *,
                  process_index: int = 0, process_count: int = 1) -> None:
  """`<out_dir>/sample_<k>/<clip>.npy` ((T, 56) float32) for this process's share of clips."""
  names = files.clip_filenames(list(samples))  # distinct ids never share a file
  for k in range(num_samples):
    os.makedirs(os.path.join(out_dir, f"sample_{k}"), exist_ok=True)
  for i, (clip, stacked) in enumerate(samples.items()):
    if i % process_count != process_index:
      continue
    for k in range(num_samples):
      files.save_npy_atomic(os.path.join(out_dir, f"sample_{k}", names[clip]),
                            np.asarray(stacked[k], np.float32))


def write_handoff(out_dir: str, samples: dict[str, np.ndarray],
                  truths: dict[str, Optional[np.ndarray]], num_samples: int, *, role: str,
                  formats: Sequence[str] = ("npy",), emoca_smoothing: int = 0,
                  fps: Optional[float] = None, process_index: int = 0,
                  process_count: int = 1) -> None:
  """Writes `samples` ({clip: [S, T, 56]} raw) in every format of `formats` (handoff.FORMATS).

  npy: `sample_<k>/<clip>.npy`; emoca: `emoca/sample_<k>/<clip>/<frame>/{pose,exp}.npy` (each
  process its share of clips, as for npy); pickle: `<role>_predictions_sample_<k>.pkl`
  (process 0: every process holds every clip); plus `render.md` (process 0) unless only npy.
  """
  if "npy" in formats:
    write_samples(out_dir, samples, num_samples, process_index=process_index,
                  process_count=process_count)
  names = {clip: handoff.clip_folder_name(clip) for clip in samples}
  if len(set(names.values())) != len(names):
    raise ValueError("two clip ids map to the same EMOCA folder name")
  if "emoca" in formats:
    for i, (clip, stacked) in enumerate(samples.items()):
      if i % process_count != process_index:
        continue
      for k in range(num_samples):
        handoff.write_emoca_frames(os.path.join(out_dir, "emoca", f"sample_{k}", names[clip]),
                                   handoff.smooth(stacked[k], emoca_smoothing))
  if process_index != 0:
    return
  if "pickle" in formats:
    for k in range(num_samples):
      handoff.write_predictions(
          os.path.join(out_dir, handoff.PREDICTIONS_NAME.format(role=role, sample=k)),
          [samples[clip][k] for clip in samples], [truths.get(clip) for clip in samples],
          [names[clip] for clip in samples])
  if set(formats) - {"npy"}:
    files.write_text_atomic(os.path.join(out_dir, "render.md"), handoff.render_instructions(
        role=role, formats=formats, num_samples=num_samples, smoothing=emoca_smoothing,
        fps=fps))


def seam_statistics(samples: np.ndarray, lengths: np.ndarray, window: int,
                    overlap: int) -> dict[str, Any]:
  """Frame-to-frame motion change at window seams versus inside windows.

  A seam is where window k >= 1 takes over: the cross-fade frames t = k*hop .. k*hop +
  overlap (every |x[t] - x[t-1]| that mixes the two windows' decodes; from t = k*hop +
  overlap on, frames are window k's own samples). Per part (expression dims 6:56, pose 0:6),
  `boundary` is the largest, over the offsets j = 0..overlap, of the mean absolute change
  at t = k*hop + j (mean over samples, clips, seams and dims), so a jump at any single offset
  is not diluted by the others; `boundary_mean` averages the whole seam; `inside` is the
  mean over every other valid frame t >= 1; `ratio` = boundary / inside.

  Args:
    samples: [S, N, T, 56] generated motion (raw units), zero-padded.
    lengths: [N] valid frames per clip.
    window, overlap: the generation windows.

  Returns:
    dict(window, overlap, seams (count over clips), expression / pose: dict(boundary,
    boundary_mean, inside, ratio, ratio_mean)); values None when no clip has a seam.
  """
  samples = np.asarray(samples, np.float64)
  hop = window - overlap
  change = np.abs(np.diff(samples, axis=2))  # [S, N, T-1, 56]: change[..., t-1] = |x[t]-x[t-1]|
  by_offset = [[] for _ in range(overlap + 1)]
  inside, seams = [], 0
  for i, n in enumerate(np.asarray(lengths, int)):
    seam_frames = set()
    for k in range(1, num_windows(n, window, overlap)):
      seams += 1
      for j in range(overlap + 1):
        t = k * hop + j
        if t < n:
          by_offset[j].append(change[:, i, t - 1])
          seam_frames.add(t)
    rest = [t for t in range(1, n) if t not in seam_frames]
    inside.append(change[:, i, np.asarray(rest, int) - 1])
  inside = np.concatenate([x.reshape(-1, records.MOTION_DIM) for x in inside]) if inside else (
      np.zeros((0, records.MOTION_DIM)))
  out: dict[str, Any] = dict(window=window, overlap=overlap, seams=seams)
  for part, dims in (("expression", slice(6, records.MOTION_DIM)), ("pose", slice(0, 6))):
    inside_mean = float(inside[:, dims].mean()) if inside.size else None
    per_offset = [float(np.mean([x[:, dims].mean() for x in group])) for group in by_offset
                  if group]
    counts = [len(group) for group in by_offset if group]
    if not per_offset or not inside_mean:
      out[part] = dict(boundary=None, boundary_mean=None, inside=inside_mean, ratio=None,
                       ratio_mean=None)
      continue
    boundary = max(per_offset)
    boundary_mean = float(np.average(per_offset, weights=counts))
    out[part] = dict(boundary=boundary, boundary_mean=boundary_mean, inside=inside_mean,
                     ratio=boundary / inside_mean, ratio_mean=boundary_mean / inside_mean)
  return out


def run_generate(config, workdir: str) -> dict:
  """Generates for every clip of `generate.split`; returns summary errors vs ground truth."""
  gc = config.generate
  sampling = sampler.SamplingConfig.from_config(gc.sampling)
  if int(gc.num_samples) < 1:
    raise ValueError(f"generate.num_samples={gc.num_samples}; expected >= 1")
  start = gc.get("start", "first_frame")
  if start not in START_MODES:
    raise ValueError(f"generate.start={start!r}; expected one of {START_MODES}")
  if not config.init.model:
    raise ValueError("set init.model to the workdir of a finetune_listener / "
                     "finetune_speaker run")
  # The training mesh (config.mesh): each process samples its devices' rows of every batch.
  mesh = sharding_lib.make_mesh(config.mesh)
  sharding_lib.check_batch_size(int(gc.batch_size), mesh, jax.process_count(),
                                "generate.batch_size")
  generator = Generator.from_workdir(config.init.model, sampling, **window_settings(gc),
                                     mesh=mesh)
  recordings_dir = gc.get("recordings", "")
  if recordings_dir:
    clips = _recording_clips(gc, recordings_dir, generator.role, start)
  else:
    data_dir = pipeline.ensure_data(config)
    clips = pipeline.read_split_clips(config, data_dir, gc.split)
    if not clips:
      raise records.RecordError(f"{data_dir}: split {gc.split!r} has no clips to generate for")
  num_samples = int(gc.num_samples)
  formats = handoff.parse_formats(gc.get("formats", "npy"))
  smoothing = int(gc.get("emoca_smoothing", 0))
  out_dir = os.path.join(workdir, "generated")
  # Every process samples its share of every batch and gets every clip back (the numbers of
  # one process), writes its share of the files; process 0 the summary of every clip.
  samples = generate_clips(generator, clips, num_samples, jax.random.PRNGKey(int(gc.seed)),
                           batch_size=int(gc.batch_size), start=start)
  residual_std = None
  if bool(gc.get("residual_noise", False)):
    residual_clips = pipeline.read_split_clips(config, pipeline.ensure_data(config),
                                               str(gc.get("residual_split", "train")))
    if not residual_clips:
      raise records.RecordError(f"generate.residual_noise: split {gc.residual_split!r} of "
                                "data.dir has no clips to measure the tokenizer's residual on")
    residual_std = tokenizer_residual_std(generator, residual_clips)
    samples = add_residual_noise(samples, jax.random.PRNGKey(int(gc.seed)),
                                 residual_scale(generator, residual_std))
  # Recordings have no ground truth: no errors, y_true None in the pickles.
  truths = {clip["clip_id"]: None if recordings_dir else clip[f"{generator.role}_motion"]
            for clip in clips}
  write_handoff(out_dir, samples, truths, num_samples, role=generator.role, formats=formats,
                emoca_smoothing=smoothing, fps=float(clips[0]["fps"]),
                process_index=jax.process_index(), process_count=jax.process_count())
  errors = {"pose_abs": 0.0, "expression_abs": 0.0, "pose_sq": 0.0, "expression_sq": 0.0,
            "frames": 0}
  for clip in clips:
    if recordings_dir:
      break
    diff = samples[clip["clip_id"]] - clip[f"{generator.role}_motion"][None]
    errors["pose_abs"] += float(np.abs(diff[..., :6]).sum())
    errors["expression_abs"] += float(np.abs(diff[..., 6:]).sum())
    errors["pose_sq"] += float(np.square(diff[..., :6]).sum())
    errors["expression_sq"] += float(np.square(diff[..., 6:]).sum())
    errors["frames"] += diff.shape[0] * diff.shape[1]
  frames = max(errors["frames"], 1)
  model_cfg = generator.task.model.config
  summary = dict(
      role=generator.role, clips=len(clips), num_samples=num_samples,
      split=None if recordings_dir else gc.split, recordings=recordings_dir or None,
      source=generator.source, sampling=sampling.to_dict(), seed=int(gc.seed),
      start=model_cfg.start, ground_truth=start, window=generator.window,
      formats=list(formats), emoca_smoothing=smoothing,
      window_overlap=generator.overlap, decoding=model_cfg.decoding, weights=generator.weights,
      residual_noise=residual_std is not None,
      residual_std=None if residual_std is None else residual_std.tolist(),
      normalized=generator.task.normalization is not None,
      pose_l1=errors["pose_abs"] / (frames * 6), expression_l1=errors["expression_abs"] / (frames * 50),
      pose_mse=errors["pose_sq"] / (frames * 6), expression_mse=errors["expression_sq"] / (frames * 50))
  if recordings_dir:  # nothing to compare with
    summary.update(pose_l1=None, expression_l1=None, pose_mse=None, expression_mse=None,
                   hubert_dir=gc.hubert_dir, hubert_layer=str(gc.get("hubert_layer", "last")))
  if jax.process_index() == 0:
    files.write_json_atomic(os.path.join(out_dir, "sampling.json"), summary)
  logging.info("generated %d clips x %d samples into %s", len(clips), num_samples, out_dir)
  return summary


def _recording_clips(gc, directory: str, role: str, start: str) -> list[dict]:
  """The phase's clips from `generate.recordings` (see `read_recordings`)."""
  from dim_jax.data import audio as audio_lib  # pylint: disable=g-import-not-at-top
  if not gc.get("hubert_dir", ""):
    raise ValueError("generate.recordings needs generate.hubert_dir: a Hugging Face HuBERT "
                     "checkpoint folder (facebook/hubert-base-ls960, the features the model "
                     "was trained on)")
  recordings = read_recordings(directory, role)
  if start == "first_frame":
    missing = [r["clip_id"] for r in recordings if r.get("first_frame") is None]
    if missing:
      raise ValueError(f"{directory}: generate.start='first_frame' needs <clip>.first_frame.npy "
                       f"(the {role}'s first frame) for {missing[:5]}; or set "
                       "generate.start=none (no ground truth at all)")
  layer = str(gc.get("hubert_layer", "last"))
  extractor = audio_lib.AudioFeatureExtractor.from_pretrained(
      gc.hubert_dir, layer=None if layer == "last" else int(layer))
  return clips_from_recordings(recordings, extractor, fps=float(gc.get("fps", 30.0)), role=role)


def window_settings(phase_config) -> dict[str, Any]:
  """`Generator.from_workdir` window (and weights) arguments from `generate.*` / `evaluate.*`."""
  window = int(phase_config.get("window", 0))
  overlap = int(phase_config.get("window_overlap", -1))
  return dict(window=window or None, overlap=None if overlap < 0 else overlap,
              weights=str(phase_config.get("weights", "float32")),
              iterative=sampler.IterativeConfig(
                  iterations=int(phase_config.get("iterations", 1)),
                  schedule=str(phase_config.get("mask_schedule", "cosine")),
                  choice_temperature=float(phase_config.get("choice_temperature", 0.0))))
