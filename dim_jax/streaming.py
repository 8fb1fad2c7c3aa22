"""Live DIM-Listener: one listener motion frame per pushed speaker frame, no future frames.

    from dim_jax import sampler, streaming
    listener = streaming.StreamingListener.from_workdir(
        "runs/finetune_causal", sampler.SamplingConfig(), rng=jax.random.PRNGKey(0))
    listener.reset(first_frame=listener_frame_0)     # or reset() for start='none'
    for speaker_frame, audio_frame in live_source:   # [56] raw EMOCA, [A] raw audio features
      listener_frame = listener.push(speaker_frame, audio_frame)   # [56] raw units

The stream follows the offline `generate.Generator` window by window (window W = the
training `data.max_len`, overlap O, hop H = W - O; window k covers frames [kH, kH + W) and
restarts the encoders' and decoder's learned positions), but a frame's token is sampled when
that frame arrives and from what has arrived: the causal SLMFT encoders see frames <= t of
the window, and the joint decoder's cross-attention must see context <= t too, which needs a
model fine-tuned with `model.causal_context=True` (an official model's decoder attends to the
whole window: `StreamingListener` refuses it unless `allow_noncausal_model=True`, which then
runs it with the causal mask it was not trained with).

State (fixed shapes, independent of how many frames were pushed; donated to each call, so
the caches are updated in place and a `state` read before a push is invalid after it):
  * per window (the current one and the next): speaker and joint encoder K/V caches
    [1, heads, W, dim_head] per layer (incremental causal encoding,
    `DIM.encode_speaker_step`), the decoder's cross-attention K/V of the window's context
    rows so far and its self-attention K/V cache (`TokenDecoder.decode_step`);
  * the last token and the last `history` tokens for the VQ decoder.
The next window k+1 is filled during its overlap with window k (frames (k+1)H .. (k+1)H +
O - 1): each of those pushes encodes the frame into both windows and feeds window k+1's
decoder the token of its previous position, in one batch-of-two call (the weights, which
dominate a push, are read once). At t = (k+1)H + O it becomes the current window, holding
what the offline Generator's prefill gives it (the last O frames, their O tokens as the
prompt), so the switch costs a push like any other (a prefill of O + 1 frames at once cost
2x a push: a dropped frame at 30 fps at official size on a 2-core CPU). Every push is one
jitted call: `_begin` at frame 0, `_step` after it (compiled once for each of: promote the
next window or not, fill it or not).

Pipelined (`model.context_lag >= 1`, ground-truth start). A listener fine-tuned to react at
least one frame late needs only frames <= t for frame t + 1, so `push(frame t)` returns frame
t's motion, computed during the previous push, and dispatches frame t + 1's computation
(`_step_ahead`: encode frame t, feed its token, sample and VQ-decode frame t + 1) without
waiting for it (JAX dispatches asynchronously): with a live source the caller waits only
when the computation of a frame takes longer than the time between frames. The frames are
those of the offline causal generation, as without the lag. `pipelined` says which mode runs.

Motion. The VQ decoder is not causal (bidirectional attention, k=5 convolutions, instance
norm over the window), so frame t's motion is the last frame of the VQ decode of the tokens
of frames max(0, t - history + 1)..t (left-aligned, masked while fewer): it uses tokens <= t
only. `causal_generate` computes the same for a whole clip offline (the `Generator`'s windows
for the tokens, then every frame's history window decoded in one batch); the stream equals it
for a batch of one with the same rng. The offline Generator instead decodes whole windows and
cross-fades them, so its frame t also uses tokens > t: `streaming_cost` measures the
difference on the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dim_jax import generate, sampler
from dim_jax.data import records
from dim_jax.models import dim as dim_lib
from dim_jax.models import vqvae

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Static settings of the jitted stream functions (hashable)."""
  generator: generate.Generator
  history: int

  @property
  def offset(self) -> int:  # decoder position of frame 0's token (1 after a start token)
    return 1 if self.generator.task.model.config.start == "start_token" else 0


def _check_model(generator: generate.Generator, allow_noncausal_model: bool) -> None:
  task, cfg = generator.task, generator.task.model.config
  if task.name != "finetune_listener":
    raise ValueError(f"streaming needs a DIM-Listener (finetune_listener) model, got {task.name!r}")
  if cfg.output != "tokens" or cfg.parallel:
    raise ValueError("streaming needs autoregressive token decoding (model.decoding="
                     f"{cfg.decoding!r}, model.output={cfg.output!r})")
  if not task.options.causal_encoders:
    raise ValueError("streaming needs the causal SLMFT encoders (loss.causal_encoders=True)")
  if not cfg.causal_context and not allow_noncausal_model:
    raise ValueError("this model was trained with model.causal_context=False: its decoder "
                     "attends to the whole window's speaker context, which a live stream does "
                     "not have yet; fine-tune with model.causal_context=True (or pass "
                     "allow_noncausal_model=True to run it masked anyway)")


class StreamingListener:
  """Push one speaker frame, get one listener frame (module docstring).

  Attributes:
    generator: the offline generator whose model, weights, sampling and windows are used.
    history: tokens the VQ decoder sees per emitted frame (default: the window).
    pipelined: each push returns the frame computed during the previous push (a model with
      `context_lag >= 1` and the ground-truth start; module docstring).
  """

  def __init__(self, generator: generate.Generator, rng: Optional[Array] = None, *,
               history: Optional[int] = None, allow_noncausal_model: bool = False):
    _check_model(generator, allow_noncausal_model)
    history = generator.window if history is None else int(history)
    if history < 1:
      raise ValueError(f"history={history}; expected >= 1 tokens")
    self.generator = generator
    self.history = history
    self._spec = _Spec(generator, history)
    self._audio_dim = generator.task.model.config.audio_dim
    self._rng = jax.random.PRNGKey(0) if rng is None else rng
    cfg = generator.task.model.config
    # With a reaction lag frame t + 1 needs frames <= t only: it is computed while the caller
    # waits for frame t + 1 (a start token would need its own first step: not pipelined).
    self.pipelined = cfg.context_lag >= 1 and self._spec.offset == 0
    self._ahead = None
    self.reset()

  @classmethod
  def from_workdir(cls, workdir: str, sampling: sampler.SamplingConfig, step: str = "best",
                   *, rng: Optional[Array] = None, window: Optional[int] = None,
                   overlap: Optional[int] = None, weights: str = "float32",
                   history: Optional[int] = None,
                   allow_noncausal_model: bool = False) -> "StreamingListener":
    """A fine-tuned DIM-Listener workdir (see `generate.Generator.from_workdir`)."""
    generator = generate.Generator.from_workdir(workdir, sampling, step, window=window,
                                                overlap=overlap, weights=weights)
    return cls(generator, rng, history=history, allow_noncausal_model=allow_noncausal_model)

  @property
  def frames_pushed(self) -> int:
    return self._t

  @property
  def state(self) -> Optional[dict]:
    """The stream's arrays (None before the first push): shapes never change. Donated to
    the next push: read it (or copy it) before pushing again. Pipelined, it is one frame
    ahead (after push t it holds frame t + 1's token)."""
    return self._state

  def reset(self, rng: Optional[Array] = None, first_frame: Optional[Any] = None) -> None:
    """Starts a new stream.

    Args:
      rng: new base key (default: keep the current one); window k's token of window
        position p is drawn with fold_in(fold_in(rng, k), p), as the offline Generator
        draws a clip whose row key is rng.
      first_frame: [56] raw listener motion of frame 0 (generate start='first_frame'); None
        = start='none' (no ground truth).
    """
    if rng is not None:
      self._rng = rng
    if first_frame is None:
      self._first = np.zeros((records.MOTION_DIM,), np.float32)
    else:
      self._first = _checked("first_frame", first_frame, records.MOTION_DIM)
    self._use_first = first_frame is not None
    self._t = 0
    self._state = None
    self._ahead = None

  def push(self, speaker_motion_frame: Any, audio_frame: Any) -> np.ndarray:
    """Frame t's listener motion [56] (raw units) from the speaker's frame t and its audio.

    Args:
      speaker_motion_frame: [56] raw EMOCA features (pose 6 + expression 50) of frame t.
      audio_frame: [audio_dim] raw audio features of frame t (motion frame rate).
    """
    speaker = _checked("speaker_motion_frame", speaker_motion_frame, records.MOTION_DIM)
    audio = _checked("audio_frame", audio_frame, self._audio_dim)
    gen, t = self.generator, self._t
    params = gen.params
    if self.pipelined:
      return self._push_ahead(speaker, audio)
    if t == 0:
      state, motion = _begin(self._spec, params, speaker, audio, self._first,
                             jnp.asarray(self._use_first), self._rng)
    else:
      k, j, promote, pair = _push_kind(t, gen.window, gen.overlap)
      # The history only needs t up to its length: every argument stays bounded.
      state, motion = _step(self._spec, params, self._state, speaker, audio, jnp.int32(k),
                            jnp.int32(j), jnp.int32(min(t, self.history)), promote=promote,
                            pair=pair)
    self._state = state
    self._t = t + 1
    return np.asarray(motion)

  def _push_ahead(self, speaker: np.ndarray, audio: np.ndarray) -> np.ndarray:
    """Pipelined push: returns frame t's motion, computed during the previous push (it
    needs frames < t only), and starts frame t + 1's computation without waiting for it."""
    gen, t, spec = self.generator, self._t, self._spec
    params = gen.params
    if t == 0:
      state, motion = _begin_ahead(spec, params, self._first, jnp.asarray(self._use_first),
                                   self._rng)
    else:
      state, motion = self._state, self._ahead
    k, j, promote, pair = _push_kind(t, gen.window, gen.overlap)
    # Frame t + 1 is the first frame window k + 1 samples (its promoting push): the next
    # window, filled up to it by now, samples it.
    from_next = _push_kind(t + 1, gen.window, gen.overlap)[2]
    # Dispatched, not awaited (JAX runs it asynchronously): the frame after this one.
    self._state, self._ahead = _step_ahead(
        spec, params, state, speaker, audio, jnp.int32(k), jnp.int32(j),
        jnp.int32(min(t + 1, self.history)), promote=promote, pair=pair, from_next=from_next)
    self._t = t + 1
    return np.asarray(motion)


def _window_position(t: int, window: int, overlap: int) -> tuple[int, int]:
  """(window k, position j in it) whose sampler emits frame t (windows k >= 1 sample
  positions O..W-1; window 0 positions 0..W-1)."""
  hop = window - overlap
  if t < window:
    return 0, t
  k = (t - overlap) // hop
  return k, t - k * hop


def _push_kind(t: int, window: int, overlap: int) -> tuple[int, int, bool, bool]:
  """(k, j, promote, pair) of the push of frame t: its window and position, whether the
  next window becomes the current one (t = kH + O, k >= 1) and whether frame t also fills
  the next window (j >= H, its overlap)."""
  k, j = _window_position(t, window, overlap)
  return k, j, k > 0 and j == overlap, j >= window - overlap


def _checked(name: str, x: Any, width: int) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.shape != (width,):
    raise ValueError(f"{name} has shape {x.shape}; expected ({width},) (one frame)")
  if not np.isfinite(x).all():
    raise ValueError(f"{name} has non-finite values")
  return x


# --- the jitted pieces ------------------------------------------------------------------

def _parts(spec: _Spec, params):
  gen = spec.generator
  task = gen.task
  cfg = task.model.config
  decoder = dim_lib.joint_decoder_module(cfg)
  return task, cfg, decoder, {"params": params["dim"]}, {"params": params["dim"]["joint_decoder"]}


def _standardized(task, speaker, audio):
  norm = task.normalization
  if norm is None:
    return speaker, audio
  return norm.normalize(speaker, "speaker_motion"), norm.normalize(audio, "speaker_audio")


def _fresh_window(spec: _Spec) -> dict:
  """Zero encoder caches, cross-attention K/V rows and decoder self-attention cache."""
  cfg, window = spec.generator.task.model.config, spec.generator.window
  decoder = dim_lib.joint_decoder_module(cfg)
  cross_shape = (1, cfg.decoder_heads, window, cfg.dim_head)
  return dict(encoders=dim_lib.init_encoder_caches(cfg, 1, window),
              cross=[(jnp.zeros(cross_shape), jnp.zeros(cross_shape))
                     for _ in range(cfg.decoder_depth)],
              decoder=decoder.init_cache(1, window + spec.offset))


def _encode(spec: _Spec, params, window: dict, speaker: Array, audio: Array, index) -> dict:
  """Encodes [n] new standardised frames at window positions index.. into the caches."""
  task, cfg, decoder, dim_vars, dec_vars = _parts(spec, params)
  model = task.model
  feats, encoders = model.apply(dim_vars, speaker[None], index, window["encoders"],
                                method=dim_lib.DIM.encode_speaker_step)
  context = model.apply(dim_vars, feats, audio[None], "speaker",
                        method=dim_lib.DIM.decoder_context)
  new_kv = decoder.apply(dec_vars, context, method=type(decoder).precompute_cross)
  write = lambda buf, x: jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype), (0, 0, index, 0))
  cross = [(write(k, nk), write(v, nv)) for (k, v), (nk, nv) in zip(window["cross"], new_kv)]
  return dict(window, encoders=encoders, cross=cross)


def _decode(spec: _Spec, params, window: dict, inputs: Array, position) -> tuple[Array, dict]:
  """Feeds decoder inputs [n] at positions position..; returns the last row's logits."""
  _, _, decoder, _, dec_vars = _parts(spec, params)
  logits, cache = decoder.apply(dec_vars, inputs[None], position, window["decoder"], None, None,
                                window["cross"], method=type(decoder).decode_step)
  return logits[:, -1], dict(window, decoder=cache)


def _advance(spec: _Spec, params, window: dict, speaker: Array, audio: Array, position,
             feed_token, feed_position) -> tuple[Array, dict]:
  """One frame of one window: encode the standardised frame at window `position`, feed the
  decoder `feed_token` at `feed_position`; ([1, num_tokens] logits after it, window)."""
  window = _encode(spec, params, window, speaker[None], audio[None], position)
  return _decode(spec, params, window, feed_token[None], feed_position)


def _advance_windows(spec: _Spec, params, state: dict, speaker: Array, audio: Array, j,
                     feed, next_feed=None, *, promote: bool) -> tuple[Array, Array, dict]:
  """One standardised frame into the current window (position j, decoder fed
  feed = (token, position)) and, with next_feed, into the next window too (position
  j - H, fed next_feed) in one batch-of-two call: the weights, which dominate a push, are
  read once. promote first makes the next window (filled during its overlap) the current
  one and starts a fresh next one. Returns (current logits, next logits or None, state)."""
  if promote:
    state = dict(state, window=state["next"], next=_fresh_window(spec))
  if next_feed is None:
    logits, window = _advance(spec, params, state["window"], speaker, audio, j, *feed)
    return logits, None, dict(state, window=window)
  gen = spec.generator
  both = jax.tree.map(lambda a, b: jnp.stack([a, b]), state["window"], state["next"])
  advance = lambda w, pos, tok, fpos: _advance(spec, params, w, speaker, audio, pos, tok, fpos)
  logits, both = jax.vmap(advance)(
      both, jnp.stack([j, j - (gen.window - gen.overlap)]), jnp.stack([feed[0], next_feed[0]]),
      jnp.stack([feed[1], next_feed[1]]))
  return logits[0], logits[1], dict(state, window=jax.tree.map(lambda x: x[0], both),
                                    next=jax.tree.map(lambda x: x[1], both))


def _sample(spec: _Spec, logits: Array, rng: Array, k, position) -> Array:
  key = jax.random.fold_in(jax.random.fold_in(rng, k), position)
  return sampler.sample_next(key, logits, spec.generator.sampling)[0]


def _new_state(spec: _Spec, rng: Array, window: dict) -> dict:
  """A stream's state at frame 0: `window` current, a fresh next one, no tokens yet."""
  return dict(rng=rng, history=jnp.zeros((spec.history,), jnp.int32),
              previous=jnp.zeros((), jnp.int32), window=window, next=_fresh_window(spec))


def _emit(spec: _Spec, params, state: dict, token: Array, t) -> tuple[dict, Array]:
  """Records frame t's token; VQ-decodes the history ending at t (raw motion).

  t may be capped at `spec.history` (all t >= history behave alike)."""
  gen, length = spec.generator, spec.history
  task = gen.task
  history = state["history"]
  appended = jnp.concatenate([history[1:], token[None]])
  history = jnp.where(t < length, history.at[jnp.minimum(t, length - 1)].set(token), appended)
  state = dict(state, history=history, previous=token)
  mask = jnp.arange(length) <= t
  motion = task.listener_vq.apply({"params": params["listener_vq"]}, history[None], mask[None],
                                  method=vqvae.VQVAE.decode_tokens)[0, jnp.minimum(t, length - 1)]
  if task.normalization is not None:
    motion = task.normalization.denormalize(motion, "listener_motion")
  return state, motion


@functools.partial(jax.jit, static_argnums=(0,))
def _begin(spec: _Spec, params, speaker, audio, first_frame, use_first_frame, rng):
  """Frame 0: a fresh state, frame 0 encoded, its token given (or sampled after a start)."""
  gen = spec.generator
  task, cfg, *_ = _parts(spec, params)
  speaker, audio = _standardized(task, speaker, audio)
  window = _encode(spec, params, _fresh_window(spec), speaker[None], audio[None], 0)
  # The offline Generator's frame-0 token (still-window code of the first frame, or of the
  # training mean with start='none').
  first = generate._first_tokens(gen, params, first_frame[None], use_first_frame,  # pylint: disable=protected-access
                                 num_samples=1)[0]
  if spec.offset:
    logits, window = _decode(spec, params, window, jnp.full((1,), cfg.start_token, jnp.int32), 0)
    token = jnp.where(use_first_frame, first, _sample(spec, logits, rng, 0, 1))
  else:
    token = first
  return _emit(spec, params, _new_state(spec, rng, window), token, 0)


# The state is donated: its caches are updated in place rather than copied every frame.
@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("promote", "pair"),
                   donate_argnums=(2,))
def _step(spec: _Spec, params, state, speaker, audio, k, j, t, *, promote: bool, pair: bool):
  """Frame t at position j of window k: encode it, feed frame j-1's token, sample frame j.

  promote: frame t = kH + O, the first window k samples: the next window, filled frame by
    frame during the overlap, becomes the current one (and a fresh next window starts).
  pair: j >= H: frame t is also position i = j - H of window k+1 (its overlap with window
    k): that window encodes it and is fed the token of its position i - 1, in the same
    batch-of-two call (the weights are read once), so at its switch it holds exactly what
    the offline Generator's prefill gives it: the last O frames and their O tokens (after a
    start token) as a prompt."""
  gen, task = spec.generator, spec.generator.task
  speaker, audio = _standardized(task, speaker, audio)
  previous = state["previous"]
  next_feed = None
  if pair:
    i = j - (gen.window - gen.overlap)
    # Window k+1's decoder: the start token at position 0 (with one), else its position i-1's
    # token; at i = 0 without a start token there is nothing to feed yet: position 0 gets a
    # placeholder, overwritten at i = 1 before anything reads it (its logits are dropped).
    start = jnp.int32(task.model.config.start_token if spec.offset else 0)
    next_feed = (jnp.where(i == 0, start, previous) if spec.offset else previous,
                 jnp.maximum(i - 1 + spec.offset, 0))
  logits, _, state = _advance_windows(spec, params, state, speaker, audio, j,
                                      (previous, j - 1 + spec.offset), next_feed,
                                      promote=promote)
  token = _sample(spec, logits, state["rng"], k, j + spec.offset)
  return _emit(spec, params, state, token, t)


# --- pipelined (model.context_lag >= 1) ---------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0,))
def _begin_ahead(spec: _Spec, params, first_frame, use_first_frame, rng):
  """Pipelined frame 0 (ground-truth start): its token is given; nothing encoded yet."""
  gen = spec.generator
  first = generate._first_tokens(gen, params, first_frame[None], use_first_frame,  # pylint: disable=protected-access
                                 num_samples=1)[0]
  return _emit(spec, params, _new_state(spec, rng, _fresh_window(spec)), first, 0)


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("promote", "pair", "from_next"), donate_argnums=(2,))
def _step_ahead(spec: _Spec, params, state, speaker, audio, k, j, t_next, *, promote: bool,
                pair: bool, from_next: bool):
  """Pipelined frame t at position j of window k: encode it and feed its token (sampled one
  push earlier), then sample and VQ-decode frame t + 1, whose context ends at frame t
  (context_lag >= 1). As `_step`, one frame later: `promote` and `pair` as there;
  `from_next`: frame t + 1 is the first frame window k + 1 samples (its position O), so the
  next window, fed up to position O - 1 by now, samples it."""
  gen, task = spec.generator, spec.generator.task
  speaker, audio = _standardized(task, speaker, audio)
  token = state["previous"]
  next_feed = (token, j - (gen.window - gen.overlap)) if pair else None
  logits, next_logits, state = _advance_windows(spec, params, state, speaker, audio, j,
                                                (token, j), next_feed, promote=promote)
  logits = next_logits if from_next else logits
  k_next, j_next = (k + 1, jnp.int32(gen.overlap)) if from_next else (k, j + 1)
  return _emit(spec, params, state, _sample(spec, logits, state["rng"], k_next, j_next), t_next)


# --- the offline twin -----------------------------------------------------------------

def causal_generate(generator: generate.Generator, speaker_motion: Any, speaker_audio: Any,
                    rng: Array, *, first_frame: Optional[Any] = None,
                    history: Optional[int] = None, chunk: int = 256) -> dict:
  """What the stream emits for a whole clip, computed offline (batch of one).

  Tokens: the offline `Generator` (whole-window conditioning, cached scan sampling) on the
  clip with `rng`; motion: frame t is the last frame of the VQ decode of tokens
  max(0, t - history + 1)..t (all frames' history windows decoded in batches of `chunk`).

  Args:
    generator: a Generator of a causal-context DIM-Listener.
    speaker_motion: [T, 56] raw; speaker_audio: [T, A] raw.
    rng: the stream's rng (a raw `PRNGKey`), used as the clip's row key.
    first_frame: [56] raw listener frame 0 (start='first_frame') or None (start='none').
    history: tokens per VQ decode (default: the window).

  Returns:
    dict(tokens [T] int32, motion [T, 56] raw float32, offline_motion [T, 56]: the
    Generator's own cross-faded motion of the same tokens).
  """
  speaker_motion = np.asarray(speaker_motion, np.float32)
  frames = speaker_motion.shape[0]
  history = generator.window if history is None else int(history)
  batch = dict(speaker_motion=speaker_motion[None],
               speaker_audio=np.asarray(speaker_audio, np.float32)[None],
               mask=np.ones((1, frames), bool))
  start = "none" if first_frame is None else "first_frame"
  if first_frame is not None:
    batch["listener_motion"] = np.asarray(first_frame, np.float32).reshape(1, 1, -1)
  # As the clip's own row key (`Generator` takes one key per row): the stream's rng.
  out = generator(batch, jnp.asarray(rng)[None], num_samples=1, start=start)
  tokens = np.asarray(out["tokens"][0, 0])
  motion = decode_histories(generator, tokens, history, chunk=chunk)
  return dict(tokens=tokens, motion=motion, offline_motion=np.asarray(out["motion"][0, 0]))


def decode_histories(generator: generate.Generator, tokens: Any, history: int,
                     chunk: int = 256) -> np.ndarray:
  """[T, 56] raw: frame t = last frame of the VQ decode of its `history` tokens ending at t."""
  tokens = np.asarray(tokens, np.int32)
  frames = tokens.shape[0]
  t = np.arange(frames)[:, None]
  first = np.maximum(t - history + 1, 0)
  index = np.minimum(first + np.arange(history)[None], frames - 1)
  rows = tokens[index]                                   # [T, history], left-aligned
  mask = (first + np.arange(history)[None]) <= t
  last = np.minimum(t[:, 0], history - 1)
  pad = -frames % chunk
  rows = np.pad(rows, [(0, pad), (0, 0)])
  mask = np.pad(mask, [(0, pad), (0, 0)], constant_values=True)
  out = [np.asarray(_decode_rows(generator, generator.params, rows[i:i + chunk],
                                 mask[i:i + chunk]))
         for i in range(0, rows.shape[0], chunk)]
  decoded = np.concatenate(out)[:frames]
  return decoded[np.arange(frames), last].astype(np.float32)


@functools.partial(jax.jit, static_argnums=(0,))
def _decode_rows(generator: generate.Generator, params, rows, mask):
  task = generator.task
  motion = task.listener_vq.apply({"params": params["listener_vq"]}, rows, mask,
                                  method=vqvae.VQVAE.decode_tokens)
  if task.normalization is not None:
    motion = task.normalization.denormalize(motion, "listener_motion")
  return motion


def streaming_cost(streamed: Any, offline: Any) -> dict:
  """Mean squared difference of streamed (history-decoded) and cross-faded offline motion of
  the same tokens, per part (expression dims 6:56, pose 0:6), raw units."""
  diff = np.square(np.asarray(streamed, np.float64) - np.asarray(offline, np.float64))
  return dict(expression_mse=float(diff[..., 6:].mean()), pose_mse=float(diff[..., :6].mean()))
