"""Phases `pretrain`, `finetune_listener`, `finetune_speaker`: DIM's losses as pure functions.

Each task plugs into the generic trainer (`training/trainer.py`): `init_params`, `loss_fn`,
`eval_sums`, `finalize_eval`, plus `trainable_mask` (frozen parameters get no update and stay
bit-identical) and `pretrained_params` (the earlier phase's checkpoint grafted in after init).

The param tree is {'dim': DIM params, 'speaker_vq': VQVAE params, 'listener_vq': VQVAE params};
the tokenizers' encoders and codebooks are always frozen, their decoders per config.

Official semantics (seq2seq_pretrain.py) and where we differ, one line each:
  * Tokens come from the frozen VQ encoders in one batched call (official: a per-sample loop,
    tokenizing with dropout on because `model.train()` undoes `.eval()`; ours: eval mode).
  * Masking: floor(mask_ratio x valid length) distinct valid frames per sequence and role
    (official `random_masking_unstructured`), drawn in one vectorised call.
  * InfoNCE over the whole global batch (official: per DataParallel replica).
  * Teacher forcing as `AutoregressiveWrapper`: input = targets[:-1] with ignored (-100)
    positions replaced by token 0, target = targets[1:], mean CE over non-ignored targets.
  * Fine-tune decoder key masking (`AutoregressiveWrapper(mask_prob=0.15)`): official draws
    int(padded length x p) keys; ours int(valid length x p) among valid keys, never key 0.
  * Continuous loss: mean pairwise L2 distance (torch `pairwise_distance`, eps 1e-6) over the
    frames whose tokens are predicted, pose and expression separately, summed.
  * Parallel decoder, fine-tuning (not official, the official decoder is autoregressive):
    `loss.parallel_mask_schedule='all'` masks every valid frame (one-pass generation);
    'cosine' / 'linear' mask a random fraction r = schedule(u), u ~ U(0, 1), per sequence
    (MaskGIT), the other frames are given as their true tokens: trains the iterative decoder
    (`sampler.iterative_decode`). CE and continuous loss on the masked frames only.
"""

from __future__ import annotations

import dataclasses
import re
import logging
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dim_jax import errors
from dim_jax.models import dim as dim_lib
from dim_jax.models import vqvae
from dim_jax.data import normalization as normalization_lib
from dim_jax.training import checkpointing

POSE = slice(0, 6)
EXPRESSION = slice(6, 56)
IGNORE = -100
PHASES = ("pretrain", "finetune_listener", "finetune_speaker")
PAIRWISE_EPS = 1e-6  # torch.nn.functional.pairwise_distance default.
PARALLEL_MASK_SCHEDULES = ("all", "cosine", "linear")


# --- pure helpers (tested directly) -----------------------------------------------------

def random_frame_mask(rng: jax.Array, mask: jax.Array, ratio: float) -> jax.Array:
  """[B, T] bool: exactly floor(ratio * valid_length) distinct valid frames per row.

  Uniform random scores on valid frames (+inf on padding), ranked per row: the lowest
  `count` ranks are chosen, so padding is never chosen and the count is exact.
  """
  scores = jnp.where(mask, jax.random.uniform(rng, mask.shape), jnp.inf)
  ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  count = jnp.floor(mask.sum(axis=1) * ratio).astype(jnp.int32)
  return (ranks < count[:, None]) & mask


def scheduled_frame_mask(rng: jax.Array, mask: jax.Array, schedule: str) -> jax.Array:
  """[B, T] bool: a random fraction r = schedule(u), u ~ U(0, 1), of each row's valid frames.

  MaskGIT's training mask: ceil(r * valid_length) distinct valid frames (at least one, so
  every non-empty row has a target), with `sampler.mask_schedule` ('cosine': r = cos(pi/2 u)).
  """
  from dim_jax import sampler  # pylint: disable=g-import-not-at-top
  r_ratio, r_frames = jax.random.split(rng)
  ratio = sampler.mask_schedule(schedule, jax.random.uniform(r_ratio, mask.shape[:1]))
  length = mask.sum(axis=1)
  count = jnp.clip(jnp.ceil(ratio * length).astype(jnp.int32), 1, length)
  scores = jnp.where(mask, jax.random.uniform(r_frames, mask.shape), jnp.inf)
  ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  return (ranks < count[:, None]) & mask


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over axis 1 of [B, T, D] using only frames where mask [B, T] is True."""
  w = mask[..., None].astype(jnp.float32)
  return (x * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)


def info_nce(speaker_features: jax.Array, listener_features: jax.Array, mask: jax.Array,
             example_valid: jax.Array, temperature: float, bidirectional: bool):
  """InfoNCE on time-mean-pooled, L2-normalised role features (official `forward_contrastive`).

  total[i, j] = <s_i, l_j> / temperature.  One direction (official default):
  -mean_j log_softmax(total, axis=0)[j, j] (for each listener, pick its speaker); the other
  direction uses axis 1; bidirectional averages both.  Rows of `example_valid` False (filler
  examples) are neither positives nor negatives.

  Returns:
    (loss, accuracy) scalars.
  """
  s = masked_mean(speaker_features, mask)
  l = masked_mean(listener_features, mask)
  # torch F.normalize (eps 1e-12) with a finite gradient at 0: filler rows pool to zero.
  normalize = lambda v: v * jax.lax.rsqrt(
      jnp.maximum(jnp.sum(jnp.square(v), axis=-1, keepdims=True), 1e-24))
  total = normalize(s) @ normalize(l).T / temperature
  pair_ok = example_valid[:, None] & example_valid[None, :]
  total = jnp.where(pair_ok, total, -jnp.inf)
  n = jnp.maximum(example_valid.sum(), 1)
  eye = jnp.eye(total.shape[0], dtype=bool)

  def one_way(logits):  # softmax over axis 0 (columns are the anchors)
    logp = jax.nn.log_softmax(logits, axis=0)
    diag = jnp.where(example_valid, jnp.sum(jnp.where(eye, logp, 0.0), axis=0), 0.0)
    correct = (jnp.argmax(logits, axis=0) == jnp.arange(logits.shape[0])) & example_valid
    return -diag.sum() / n, correct.sum() / n

  loss, acc = one_way(total)
  if bidirectional:
    loss2, acc2 = one_way(total.T)
    loss, acc = (loss + loss2) / 2, (acc + acc2) / 2
  return loss, acc


def teacher_forcing(targets: jax.Array, start_token: Optional[int]):
  """AutoregressiveWrapper's shift: (decoder inputs, targets) from [B, T] targets (-100 = ignore).

  Without a start token (official): inputs targets[:, :-1] with -100 -> 0 (a real code, as
  officially), targets targets[:, 1:] (T-1 predictions for frames 1..T-1).  With a start
  token: inputs [start, targets[:, :-1]], targets all T frames.
  """
  inputs = jnp.where(targets == IGNORE, 0, targets)
  if start_token is None:
    return inputs[:, :-1], targets[:, 1:]
  start = jnp.full(targets[:, :1].shape, start_token, targets.dtype)
  return jnp.concatenate([start, inputs[:, :-1]], axis=1), targets


def cross_entropy_sums(logits: jax.Array, targets: jax.Array):
  """(sum of CE over non-ignored targets, their count, correct argmax count)."""
  valid = targets != IGNORE
  safe = jnp.where(valid, targets, 0)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == safe) & valid
  return jnp.sum(jnp.where(valid, nll, 0.0)), valid.sum(), correct.sum()


def factored_cross_entropy_sums(factor_logits: jax.Array, targets: jax.Array,
                                factors: tuple):
  """`cross_entropy_sums` of a factorised head from its [..., P + E] code logits, without
  the [..., P * E] pair table: log p(t) = log p(t // E) + log p(t % E) under the two codes'
  own softmaxes (the softmax of pair sums factorises), and the argmax pair is the pair of
  argmaxes."""
  first_size, second_size = factors
  valid = targets != IGNORE
  safe = jnp.where(valid, targets, 0)
  logits = factor_logits.astype(jnp.float32)
  nll, correct = 0.0, valid
  for part, digit in ((logits[..., :first_size], safe // second_size),
                      (logits[..., first_size:], safe % second_size)):
    logp = jax.nn.log_softmax(part, axis=-1)
    nll = nll - jnp.take_along_axis(logp, digit[..., None], axis=-1)[..., 0]
    correct = correct & (jnp.argmax(part, axis=-1) == digit)
  return jnp.sum(jnp.where(valid, nll, 0.0)), valid.sum(), correct.sum()


def pairwise_distance_sums(pred: jax.Array, target: jax.Array, frames: jax.Array):
  """(sum of pose distances, sum of expression distances, frame count) over `frames`."""
  diff = pred - target + PAIRWISE_EPS
  w = frames.astype(jnp.float32)
  pose = jnp.sqrt(jnp.sum(jnp.square(diff[..., POSE]), axis=-1))
  expression = jnp.sqrt(jnp.sum(jnp.square(diff[..., EXPRESSION]), axis=-1))
  return (pose * w).sum(), (expression * w).sum(), w.sum()


def _factored_decode(factor_logits: jax.Array, codebook: jax.Array, factors: tuple, *,
                     soft: bool) -> jax.Array:
  """`_decode_motion`'s code vectors from a factorised head's [.., P + E] code logits.

  A part tokenizer's code vector of t = (a, b) is its pose code and its expression code side
  by side, so row a * E + b = row a * E + row b - row 0, and the expected vector under
  p(a) p(b) is p(a) @ rows(a * E) + p(b) @ rows(b) - row 0 (each distribution sums to 1).
  """
  first_size, second_size = factors
  logits = factor_logits.astype(jnp.float32)
  first, second = logits[..., :first_size], logits[..., first_size:]
  if not soft:
    return codebook[jnp.argmax(first, axis=-1) * second_size + jnp.argmax(second, axis=-1)]
  first_rows = codebook[jnp.arange(first_size) * second_size]
  return (jax.nn.softmax(first, axis=-1) @ first_rows
          + jax.nn.softmax(second, axis=-1) @ codebook[:second_size] - codebook[0])


def decoder_key_mask(rng: jax.Array, valid: jax.Array, prob: float) -> Optional[jax.Array]:
  """Fine-tune regulariser: hide int(valid_len * prob) random decoder keys, never key 0."""
  if prob <= 0:
    return None
  eligible = valid.at[:, 0].set(False)
  count = jnp.floor(valid.sum(axis=1) * prob).astype(jnp.int32)
  scores = jnp.where(eligible, jax.random.uniform(rng, valid.shape), jnp.inf)
  ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  hidden = (ranks < count[:, None]) & eligible
  return valid & ~hidden


# --- options ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LossOptions:
  """Loss switches of the DIM phases (config `loss.*`, documented in config_lib)."""
  mask_ratio: float = 0.15
  contrastive_weight: float = 1.0
  contrastive_temperature: float = 0.05
  contrastive_bidirectional: bool = False
  continuous_weight: float = 1.0
  decode: str = "argmax"
  decoder_key_mask_prob: float = 0.0
  vq_decoder_trainable: bool = True
  causal_encoders: bool = True
  # Fine-tuning mask of the parallel decoder: 'all' (every valid frame, one-pass decoding;
  # also what checkpoints without this field were trained with), 'cosine' or 'linear'.
  parallel_mask_schedule: str = "all"

  def __post_init__(self):
    if self.decode not in ("argmax", "soft"):
      raise errors.ConfigError(f"loss.decode={self.decode!r}; expected 'argmax' or 'soft'")
    if not 0.0 <= self.mask_ratio < 1.0:
      raise errors.ConfigError(f"loss.mask_ratio={self.mask_ratio}; expected 0 <= ratio < 1")
    if self.parallel_mask_schedule not in PARALLEL_MASK_SCHEDULES:
      raise errors.ConfigError(f"loss.parallel_mask_schedule={self.parallel_mask_schedule!r}; "
                               f"expected one of {PARALLEL_MASK_SCHEDULES}")


def trainable_by_patterns(params, frozen_patterns) -> Any:
  """Bool tree: False where a pattern matches the leaf's path ('a/b/c') or a module above it.

  Patterns are Python regexes matched in full against '/'-joined names, as big_vision's
  parameter patterns: `dim/listener_encoder` freezes that module, `.*_vq/decoder/.*` every
  leaf under both VQ decoders.
  """
  compiled = [re.compile(p) for p in frozen_patterns]

  def trainable(path) -> bool:
    parts = checkpointing.path_str(path).split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return not any(c.fullmatch(prefix) for c in compiled for prefix in prefixes)

  return jax.tree_util.tree_map_with_path(lambda path, _: trainable(path), params)


def _flatten(tree) -> dict[str, Any]:
  return {checkpointing.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- the task ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DIMTask:
  """Pure functions of one DIM phase; the generic trainer jits and shards them."""
  name: str
  model: dim_lib.DIM
  speaker_vq: vqvae.VQVAE
  listener_vq: vqvae.VQVAE
  options: LossOptions
  init_sources: tuple = ()   # ((subtree, workdir), ...) restored after init, in order.
  frozen_params: tuple = ()  # train.frozen_params: patterns of parameters that never train.
  # The statistics the inputs are standardised with (None: raw features); recorded in every
  # checkpoint so generation can standardise its inputs and return raw motion.
  normalization: Optional[normalization_lib.Normalization] = None

  # -- construction --

  @classmethod
  def from_config(cls, config, *, speaker_vq, listener_vq,
                  normalization=None) -> "DIMTask":
    """The task of `config.phase`, built from the config and the two tokenizers' configs.

    Pure: reads no file. `speaker_vq` / `listener_vq` are `VQConfig`s or the `model` dicts
    recorded in a checkpoint's meta (`tokenizer_configs(config)` reads them from the
    workdirs that `config.init` names). The earlier phases' params are grafted later, by
    the trainer (`init_sources` names where they come from).
    """
    phase = config.phase
    if phase not in PHASES:
      raise errors.ConfigError(f"config.phase={phase!r}; expected one of {PHASES}")
    init = config.init
    ablation = config.get("ablation", "none")
    if ablation == "no_pretrain" and (phase == "pretrain" or init.pretrain):
      raise errors.ConfigError("ablation=no_pretrain is a fine-tune phase with init.pretrain='' "
                       f"(got phase={phase!r}, init.pretrain={init.pretrain!r})")
    if phase == "pretrain" or not init.pretrain:
      sources = tuple((f"{role}_vq", init[f"{role}_vq"]) for role in ("speaker", "listener")
                      if init[f"{role}_vq"])
    else:
      sources = (("", init.pretrain),)
    as_vq = lambda c: c if isinstance(c, vqvae.VQConfig) else vq_config_from_meta(c)
    speaker_vq, listener_vq = vqvae.VQVAE(as_vq(speaker_vq)), vqvae.VQVAE(as_vq(listener_vq))
    model_cfg = dim_lib.dim_config_from(config.model)
    longest = int(config.data.max_len) * (2 if phase == "pretrain" and model_cfg.two_branch else 1)
    if longest > model_cfg.max_seq_len:
      raise errors.ConfigError(f"model.max_seq_len={model_cfg.max_seq_len} < {longest}: the "
                       + ("joint encoder sees both roles, 2 x data.max_len frames"
                          if phase == "pretrain" else "data.max_len"))
    for role, vq in (("speaker", speaker_vq), ("listener", listener_vq)):
      if vq.config.codebook_size != model_cfg.num_tokens:
        raise errors.ConfigError(f"model.num_tokens={model_cfg.num_tokens} but the {role} VQ-VAE has "
                         f"{vq.config.codebook_size} codes")
      # The factorised head reads token t as (t // E, t % E): only right for a tokenizer whose
      # tokens are (pose code, expression code) with those sizes.
      sizes = vq.config.group_sizes if vq.config.part_encoders else None
      if model_cfg.token_factors and sizes != model_cfg.token_factors:
        raise errors.ConfigError(
            f"model.token_factors={model_cfg.token_factors} but the {role} VQ-VAE's tokens are "
            + (f"(pose, expression) codes of sizes {sizes}" if sizes else
               "not (pose code, expression code) pairs (model.part_encoders=False)"))
    options = LossOptions(**dict(config.loss))
    return cls(name=phase, model=dim_lib.DIM(model_cfg), speaker_vq=speaker_vq,
               listener_vq=listener_vq, options=options, init_sources=sources,
               frozen_params=tuple(config.train.get("frozen_params", ())),
               normalization=normalization)

  @classmethod
  def from_meta(cls, meta: dict) -> "DIMTask":
    """The task recorded in a checkpoint's meta (model, tokenizers, loss); pure."""
    model_cfg = dict(meta["model"])
    dtype = model_cfg.pop("dtype", "float32")
    model = dim_lib.DIM(dim_lib.DIMConfig(
        **model_cfg, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32))
    loss = dict(meta.get("config", {}).get("loss", {}))
    return cls(name=meta["phase"], model=model,
               speaker_vq=vqvae.VQVAE(vq_config_from_meta(meta["speaker_vq"])),
               listener_vq=vqvae.VQVAE(vq_config_from_meta(meta["listener_vq"])),
               options=LossOptions(**loss) if loss else LossOptions(),
               normalization=normalization_lib.from_meta(meta, f"{meta['phase']} checkpoint"))

  def model_meta(self) -> dict:
    return dict(phase=self.name, model=checkpointing.config_meta(self.model.config),
                speaker_vq=checkpointing.config_meta(self.speaker_vq.config),
                listener_vq=checkpointing.config_meta(self.listener_vq.config),
                normalization=normalization_lib.to_meta(self.normalization))

  def meta_defaults(self) -> dict:
    """`model_meta`'s config fields at their defaults: a checkpoint written before a field
    existed was made with its default (checkpointing.config_differences)."""
    vq_defaults = checkpointing.config_meta(vqvae.VQConfig())
    return dict(model=checkpointing.config_meta(dim_lib.DIMConfig()), speaker_vq=vq_defaults,
                listener_vq=vq_defaults)

  # -- params --

  def init_params(self, rng: jax.Array, batch: dict) -> dict:
    r_dim, r_s, r_l = jax.random.split(rng, 3)
    dim_params = self.model.init(r_dim, batch["speaker_motion"], batch["listener_motion"],
                                 batch["speaker_audio"], batch["mask"])["params"]
    vq_init = lambda vq, r, motion: vq.init({"params": r, "dropout": r}, motion, batch["mask"])["params"]
    return dict(dim=dim_params,
                speaker_vq=vq_init(self.speaker_vq, r_s, batch["speaker_motion"]),
                listener_vq=vq_init(self.listener_vq, r_l, batch["listener_motion"]))

  def trainable_mask(self, params: dict) -> dict:
    """True where the optimizer may change a parameter (frozen ones stay bit-identical).

    Frozen: what `train.frozen_params` names (config patterns; each phase's default is the
    official set, config_lib.FROZEN_PARAMS), plus two rules that are not choices: the
    tokenizers' encoders and codebooks (the targets must not move), and the VQ decoders
    unless `loss.vq_decoder_trainable` and the phase decodes that role.
    """
    decoded_roles = {"pretrain": ("speaker", "listener"), "finetune_listener": ("listener",),
                     "finetune_speaker": ("speaker",)}[self.name]
    if self.model.config.output == "continuous":
      decoded_roles = ()
    patterns = list(self.frozen_params)
    for role in ("speaker", "listener"):
      train_decoder = self.options.vq_decoder_trainable and role in decoded_roles
      patterns += [f"{role}_vq/{re.escape(k)}" for k in params[f"{role}_vq"]
                   if k != "decoder" or not train_decoder]
    return trainable_by_patterns(params, patterns)

  def after_update(self, params, hook_inputs: dict, rng: jax.Array):
    del hook_inputs, rng
    return params

  def pretrained_params(self, abstract_params: dict) -> dict[str, np.ndarray]:
    """Leaves restored from earlier phases: {'path/to/leaf': host array}.

    Raises CheckpointMismatchError listing every missing or differently shaped leaf.
    """
    grafted = {}
    for subtree, workdir in self.init_sources:
      params, meta = checkpointing.load_params(workdir)
      expected = abstract_params[subtree] if subtree else abstract_params
      problems = checkpointing.tree_mismatches(expected, params)
      missing_or_shape = [p for p in problems if not p.startswith("not in model")]
      unused = [p for p in problems if p.startswith("not in model")]
      if missing_or_shape:
        raise checkpointing.CheckpointMismatchError(
            f"{workdir} (phase {meta.get('phase')}, step {meta.get('step')}) does not fit "
            f"{subtree or 'this model'}:\n  " + "\n  ".join(missing_or_shape[:50])
            + (f"\n  ... and {len(missing_or_shape) - 50} more" if len(missing_or_shape) > 50 else ""))
      if unused:
        logging.info("%s: %d checkpoint leaves not used by %s (e.g. %s)", workdir, len(unused),
                     self.name, unused[0])
      prefix = f"{subtree}/" if subtree else ""
      flat_expected = _flatten(expected)
      for path, value in _flatten(params).items():
        if path in flat_expected:
          grafted[prefix + path] = np.asarray(value)
      logging.info("restored %d leaves of %s from %s (step %s)", len(flat_expected),
                   subtree or "the model", workdir, meta.get("step"))
    return grafted

  # -- building blocks --

  def _tokens(self, params, role: str, motion, mask):
    vq = self.speaker_vq if role == "speaker" else self.listener_vq
    out = vq.apply({"params": params[f"{role}_vq"]}, motion, mask, method=vqvae.VQVAE.encode)
    return jax.lax.stop_gradient(out["tokens"])

  @property
  def _factored(self) -> bool:
    """Teacher-forced losses read a factorised head's [.., P + E] code logits, not the
    [.., P * E] pair logits (the same values; 272 instead of 4,096 columns at 16 x 256). The
    parallel decoder's given-token rows need the pair logits: it keeps them."""
    cfg = self.model.config
    return bool(cfg.token_factors) and cfg.output == "tokens" and not cfg.parallel

  def _decode_motion(self, params, role: str, logits, frames, rng, train: bool):
    """VQ-decodes predicted tokens ('argmax', official) or the expected code ('soft')."""
    vq = self.speaker_vq if role == "speaker" else self.listener_vq
    # The decoder's code vectors, not the raw parameter (they differ with codebook_normalize).
    codebook = vq.apply({"params": params[f"{role}_vq"]}, method=vqvae.VQVAE.code_vectors)
    if self._factored:
      quantized = _factored_decode(logits, codebook, self.model.config.token_factors,
                                   soft=self.options.decode == "soft")
    elif self.options.decode == "soft":
      quantized = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) @ codebook
    else:
      quantized = codebook[jnp.argmax(logits, axis=-1)]
    rngs = {"dropout": rng} if train else {}
    return vq.apply({"params": params[f"{role}_vq"]}, quantized, frames,
                    train=train and self.options.vq_decoder_trainable,
                    method=vqvae.VQVAE.decode, rngs=rngs)

  def _start(self) -> Optional[int]:
    cfg = self.model.config
    return cfg.start_token if cfg.start == "start_token" else None

  def _predict_role(self, params, role, tokens, hidden, context, mask, rng, train):
    """CE and continuous-loss sums for one role's tokens predicted from `context`.

    hidden: [B, T] frames whose tokens are targets (masked frames in pretraining, all valid
    frames in fine-tuning).
    """
    cfg = self.model.config
    r_key, r_dec = jax.random.split(rng)
    motion = logits = None
    targets = jnp.where(hidden, tokens, IGNORE)
    if cfg.output == "continuous":
      motion = self.model.apply({"params": params["dim"]}, context, mask, mask,
                                method=dim_lib.DIM.regress)
      frames = hidden
      ce = (jnp.zeros(()), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    elif cfg.decoding == "parallel":
      if self.name != "pretrain" and self.options.parallel_mask_schedule != "all":
        # Fine-tuning predicts every valid frame: mask a scheduled fraction of them instead,
        # the rest are given (pretraining keeps its encoder mask: the hidden frames).
        hidden = scheduled_frame_mask(r_key, hidden, self.options.parallel_mask_schedule)
        targets = jnp.where(hidden, tokens, IGNORE)
      inputs = jnp.where(hidden, cfg.mask_token, tokens)
      logits = self.model.apply({"params": params["dim"]}, inputs, context, mask, None, mask,
                                method=dim_lib.DIM.decode)
      ce = cross_entropy_sums(logits, targets)
      frames = hidden
    else:
      inputs, shifted = teacher_forcing(targets, self._start())
      input_valid = mask[:, :inputs.shape[1]]
      key_mask = decoder_key_mask(r_key, input_valid, self.options.decoder_key_mask_prob) if train else None
      logits = self.model.apply({"params": params["dim"]}, inputs, context, mask, key_mask,
                                factor_logits=self._factored, method=dim_lib.DIM.decode)
      ce = (factored_cross_entropy_sums(logits, shifted, cfg.token_factors) if self._factored
            else cross_entropy_sums(logits, shifted))
      frames = shifted != IGNORE
    return (logits if cfg.output == "tokens" else None), motion, frames, ce, r_dec

  def _continuous(self, params, role, logits, motion, frames, target, mask, rng, train,
                  given_tokens=None):
    """Pairwise-distance sums of the decoded prediction against `target` on `frames`."""
    n = frames.shape[1]
    target = target[:, -n:]  # official: predictions cover frames 1..T-1 (or all T)
    if motion is None:
      valid = mask[:, -n:]
      if given_tokens is not None:
        # Given frames decode their true code (a one-hot row: exact under argmax and soft),
        # so the VQ decoder sees the sequence the model completes.
        true_row = jax.nn.one_hot(given_tokens, logits.shape[-1], dtype=bool)
        logits = jnp.where(frames[..., None], logits,
                           jnp.where(true_row, 0.0, -jnp.inf).astype(logits.dtype))
      motion = self._decode_motion(params, role, logits, valid, rng, train)
    return pairwise_distance_sums(motion, target, frames)

  # -- the phases --

  def conditioning(self, params, batch) -> jax.Array:
    """The decoder context of a fine-tuned phase: what the predicted role is conditioned on.

    DIM-Listener: the speaker's encoded motion + audio; DIM-Speaker: speech plus the
    listener context (zeros, official, or one learned row). One place for the loss and for
    generation, so both always see the same conditioning.
    """
    dim_params = {"params": params["dim"]}
    mask, audio = batch["mask"], batch["speaker_audio"]
    if self.name == "finetune_listener":
      feats = self.model.apply(dim_params, batch["speaker_motion"], mask,
                               self.options.causal_encoders, method=dim_lib.DIM.encode_speaker)
      return self.model.apply(dim_params, feats, audio, "speaker",
                              method=dim_lib.DIM.decoder_context)
    if self.name == "finetune_speaker":
      b, t = mask.shape
      feats = self.model.apply(dim_params, jnp.zeros((b,), jnp.int32), b, t,
                               method=dim_lib.DIM.identity_context)
      return self.model.apply(dim_params, feats, audio, "listener",
                              method=dim_lib.DIM.decoder_context)
    raise errors.ConfigError(f"phase {self.name!r} has no single conditioning (pretraining predicts "
                     "both roles)")

  def _forward(self, params, batch, rng, train: bool) -> dict:
    """All loss terms of this phase as (sum, count) pairs; shared by loss_fn and eval_sums."""
    opts = self.options
    mask = batch["mask"]
    speaker, listener, audio = batch["speaker_motion"], batch["listener_motion"], batch["speaker_audio"]
    r_mask_s, r_mask_l, r_s, r_l = jax.random.split(rng, 4)
    terms = {}
    if self.name == "pretrain":
      hidden_s = random_frame_mask(r_mask_s, mask, opts.mask_ratio)
      hidden_l = random_frame_mask(r_mask_l, mask, opts.mask_ratio)
      enc = self.model.apply({"params": params["dim"]}, speaker, listener, mask, hidden_s,
                             hidden_l, method=dim_lib.DIM.encode_dyad)
      if opts.contrastive_weight > 0:
        nce, acc = info_nce(enc["speaker_alone"], enc["listener_alone"], mask, mask.any(axis=1),
                            opts.contrastive_temperature, opts.contrastive_bidirectional)
        terms["nce"] = (nce, jnp.ones(()))
        terms["contrastive_accuracy"] = (acc, jnp.ones(()))
      ctx = lambda feats, role: self.model.apply({"params": params["dim"]}, feats, audio, role,
                                                 method=dim_lib.DIM.decoder_context)
      jobs = (("speaker", speaker, hidden_s, ctx(enc["joint_listener"], "listener"), r_s),
              ("listener", listener, hidden_l, ctx(enc["joint_speaker"], "speaker"), r_l))
    elif self.name == "finetune_listener":
      jobs = (("listener", listener, mask, self.conditioning(params, batch), r_l),)
    else:  # finetune_speaker: speech (plus a zero or learned listener context) -> speaker
      jobs = (("speaker", speaker, mask, self.conditioning(params, batch), r_s),)
    for role, motion, hidden, context, r in jobs:
      tokens = (jnp.zeros(mask.shape, jnp.int32) if self.model.config.output == "continuous"
                else self._tokens(params, role, motion, mask))
      logits, pred_motion, frames, ce, r_dec = self._predict_role(
          params, role, tokens, hidden, context, mask, r, train)
      if self.model.config.output == "tokens":
        terms[f"ce_{role}"] = (ce[0], ce[1])
        terms[f"token_accuracy_{role}"] = (ce[2], ce[1])
      # A partly masked parallel decoder is given the true tokens of its other frames.
      given = (tokens if self.model.config.output == "tokens"
               and self.model.config.decoding == "parallel" and self.name != "pretrain"
               and opts.parallel_mask_schedule != "all" else None)
      pose, expression, count = self._continuous(params, role, logits, pred_motion, frames,
                                                 motion, mask, r_dec, train, given)
      terms[f"continuous_pose_{role}"] = (pose, count)
      terms[f"continuous_expression_{role}"] = (expression, count)
    return terms

  def _total(self, means: dict) -> jax.Array:
    opts = self.options
    total = 0.0
    for key, value in means.items():
      if key.startswith("ce_"):
        total = total + value
      elif key.startswith("continuous_"):
        total = total + opts.continuous_weight * value
      elif key == "nce":
        total = total + opts.contrastive_weight * value
    return total

  def loss_fn(self, params, batch, rng):
    terms = self._forward(params, batch, rng, train=True)
    means = {k: s / jnp.maximum(c, 1) for k, (s, c) in terms.items()}
    return self._total(means), means

  def eval_sums(self, params, batch) -> dict:
    # Fixed masking rng: validation numbers are comparable across steps.
    terms = self._forward(params, batch, jax.random.PRNGKey(0), train=False)
    out = {}
    for k, (s, c) in terms.items():
      out[f"{k}/sum"] = jnp.asarray(s, jnp.float32)
      out[f"{k}/count"] = jnp.asarray(c, jnp.float32)
    return out

  def finalize_eval(self, sums: dict) -> dict:
    means = {}
    for key in sums:
      if key.endswith("/sum"):
        name = key[:-4]
        means[name] = float(sums[key]) / max(float(sums[f"{name}/count"]), 1.0)
    means["loss"] = float(self._total(means))
    return means


def init_metas(config) -> dict[str, tuple[str, dict]]:
  """The checkpoint metas of the earlier phases `config.init` names, checked.

  The one place where building a DIM phase reads the disk: {'speaker_vq': (workdir, meta),
  'listener_vq': ...} (pretraining, or a fine-tune without pretraining) or {'pretrain':
  (workdir, meta)}. A workdir of the wrong phase or role is refused here.
  """
  init, phase = config.init, config.phase
  if phase == "pretrain" or not init.pretrain:
    if not (init.speaker_vq and init.listener_vq):
      raise errors.ConfigError(f"phase {phase}: set init.speaker_vq and init.listener_vq to the "
                       "workdirs of the two `vq` phases" + (
                           "" if phase == "pretrain" else " (or init.pretrain)"))
    out = {}
    for role in ("speaker", "listener"):
      workdir = init[f"{role}_vq"]
      meta = checkpointing.load_meta(workdir)
      if meta.get("phase") != "vq":
        raise checkpointing.CheckpointMismatchError(
            f"init.{role}_vq={workdir} holds a {meta.get('phase')!r} checkpoint, not a VQ-VAE")
      if meta.get("role") != role:
        # Swapped workdirs would train on the wrong tokenizer without any other symptom.
        raise checkpointing.CheckpointMismatchError(
            f"init.{role}_vq={workdir} holds the {meta.get('role')!r} tokenizer, not the "
            f"{role!r} one (are init.speaker_vq and init.listener_vq swapped?)")
      out[f"{role}_vq"] = (workdir, meta)
    return out
  meta = checkpointing.load_meta(init.pretrain)
  if meta.get("phase") != "pretrain":
    raise checkpointing.CheckpointMismatchError(
        f"init.pretrain={init.pretrain} holds a {meta.get('phase')!r} checkpoint, not "
        "a DIM pretraining run")
  return {"pretrain": (init.pretrain, meta)}


def tokenizer_configs(config, metas: Optional[dict] = None) -> dict[str, dict]:
  """The two tokenizers' model configs (keyword arguments for `DIMTask.from_config`), from
  `init_metas(config)` (read here unless given)."""
  metas = init_metas(config) if metas is None else metas
  if "pretrain" in metas:
    meta = metas["pretrain"][1]
    return dict(speaker_vq=meta["speaker_vq"], listener_vq=meta["listener_vq"])
  return {key: meta["model"] for key, (_, meta) in metas.items()}


def check_normalization(stats, metas: dict) -> None:
  """Refuses earlier phases (`init_metas`) trained on differently standardised features.

  A tokenizer trained on raw features (or on another training split's statistics) would
  see inputs it was never trained on, and nothing else would show it.
  """
  for key, (workdir, meta) in metas.items():
    # A tokenizer reads its role's motion; a pretraining run every stream.
    streams = ((f"{key[:-len('_vq')]}_motion",) if key.endswith("_vq")
               else normalization_lib.STREAMS)
    theirs = normalization_lib.from_meta(meta, workdir)
    for stream in streams:
      if not normalization_lib.same(stats, theirs, stream):
        describe = lambda s: "raw features" if s is None else (
            f"per-{s.scope} statistics of {s.num_frames} {s.split} frames")
        raise checkpointing.CheckpointMismatchError(
            f"{workdir} was trained on {describe(theirs)} for {stream}, this run uses "
            f"{describe(stats)}; train every phase on the same dataset with the same "
            "data.normalize")


def task_from_config(config) -> DIMTask:
  """`DIMTask.from_config` with the tokenizer configs read from `config.init`'s workdirs.

  The normalization statistics come from the run's dataset (`data.normalize`); the earlier
  phases must have been trained with the same.
  """
  from dim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  normalization = pipeline.normalization_for(config, pipeline.ensure_data(config))
  metas = init_metas(config)
  check_normalization(normalization, metas)
  return DIMTask.from_config(config, normalization=normalization,
                             **tokenizer_configs(config, metas))


def vq_config_from_meta(meta_model: dict) -> vqvae.VQConfig:
  """The VQConfig recorded in a checkpoint meta (`model` of a vq phase, `*_vq` of DIM)."""
  values = dict(meta_model)
  dtype = values.pop("dtype", "float32")
  fields = {f.name for f in dataclasses.fields(vqvae.VQConfig)}
  values = {k: v for k, v in values.items() if k in fields}
  return vqvae.VQConfig(**values, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
