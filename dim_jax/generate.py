"""Phase `generate` and the Python generation API: DIM-Listener / DIM-Speaker motion.

    from dim_jax import generate
    generator = generate.Generator.from_workdir("runs/finetune_listener",
                                                 sampler.SamplingConfig(temperature=1.0))
    out = generator(batch, jax.random.PRNGKey(0), num_samples=4)
    out["motion"]  # [B, 4, T, 56], zero on padded frames

A fine-tuned checkpoint (`finetune_listener` or `finetune_speaker`) holds the DIM params and
both tokenizers.  Generation encodes the conditioning (speaker motion + audio, or audio and
the listener context), samples the target role's tokens with the KV-cached decoder in one
compiled `lax.scan` (one executable per bucket length), and VQ-decodes them.  N samples per
input are one batch.  The first token is the ground-truth first token (official) unless the
model was trained with `model.start='start_token'`; the parallel variant samples every
position from one decoder pass; the no-VQ ablation regresses motion directly.

The phase writes `<workdir>/generated/sample_<k>/<clip_id>.npy` ((T, 56) float32, one file
per clip and sample, windows reassembled) and `<workdir>/generated/sampling.json` (settings,
source checkpoint), each file written to a temporary name and renamed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dim_jax import files, sampler
from dim_jax.data import pipeline, records
from dim_jax.models import dim as dim_lib
from dim_jax.models import vqvae
from dim_jax.training import checkpointing, dim_tasks

GENERATING_PHASES = {"finetune_listener": "listener", "finetune_speaker": "speaker"}


@dataclasses.dataclass(frozen=True)
class Generator:
  """Samples the target role's motion from a fine-tuned DIM (see module docstring)."""
  task: dim_tasks.DIMTask
  params: Any
  sampling: sampler.SamplingConfig
  source: str = ""

  @classmethod
  def from_workdir(cls, workdir: str, sampling: sampler.SamplingConfig,
                   step: str = "best") -> "Generator":
    meta = checkpointing.load_meta(workdir, step)
    if meta.get("phase") not in GENERATING_PHASES:
      raise checkpointing.CheckpointMismatchError(
          f"{workdir} holds a {meta.get('phase')!r} checkpoint; generation needs a "
          f"fine-tuned model (phase one of {sorted(GENERATING_PHASES)})")
    task = dim_tasks.DIMTask.from_meta(meta)
    params, _ = checkpointing.load_params(workdir, step)
    abstract = jax.eval_shape(functools.partial(task.init_params, jax.random.PRNGKey(0)),
                              pipeline.dummy_batch(1))
    problems = checkpointing.tree_mismatches(abstract, params)
    if problems:
      raise checkpointing.CheckpointMismatchError(
          f"{workdir} (step {meta['step']}) does not match its own recorded model:\n  "
          + "\n  ".join(problems[:50]))
    params = jax.tree.map(jnp.asarray, params)
    return cls(task=task, params=params, sampling=sampling,
               source=f"{os.path.abspath(workdir)}@{meta['step']}")

  @property
  def role(self) -> str:
    return GENERATING_PHASES[self.task.name]

  def __call__(self, batch: dict, rng: jax.Array, num_samples: int = 1) -> dict:
    """Generates for a batch (keys speaker_motion, listener_motion, speaker_audio, mask).

    Returns dict(motion [B, N, T, 56] float32 zero on padding, tokens [B, N, T] int32 or
    None for the no-VQ ablation).
    """
    inputs = {k: jnp.asarray(batch[k]) for k in
              ("speaker_motion", "listener_motion", "speaker_audio", "mask")}
    return _generate(self, self.params, inputs, rng, num_samples)

  def __hash__(self):  # static jit argument: identity of the task and sampling settings.
    return hash((self.task, self.sampling))

  def __eq__(self, other):
    return (isinstance(other, Generator) and self.task == other.task
            and self.sampling == other.sampling)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _generate(gen: Generator, params, batch: dict, rng: jax.Array, num_samples: int) -> dict:
  task, cfg = gen.task, gen.task.model.config
  model = task.model
  mask = batch["mask"]
  dim_params = {"params": params["dim"]}
  context = task.conditioning(params, batch)
  target = batch[f"{gen.role}_motion"]
  context, mask, target = sampler.repeat_for_samples((context, mask, target), num_samples)
  vq = task.speaker_vq if gen.role == "speaker" else task.listener_vq
  vq_params = {"params": params[f"{gen.role}_vq"]}
  tokens = None
  if cfg.output == "continuous":
    motion = model.apply(dim_params, context, mask, mask, method=dim_lib.DIM.regress)
    motion = jnp.where(mask[..., None], motion, 0.0)
  else:
    if cfg.parallel:
      inputs = jnp.full(mask.shape, cfg.mask_token, jnp.int32)
      logits = model.apply(dim_params, inputs, context, mask, None, mask,
                           method=dim_lib.DIM.decode)
      flat = sampler.sample_next(rng, logits.reshape(-1, logits.shape[-1]), gen.sampling)
      tokens = flat.reshape(mask.shape)
    else:
      decoder = dim_lib.joint_decoder_module(cfg)
      length = mask.shape[1]
      if cfg.start == "start_token":
        first = jnp.full(mask.shape[:1], cfg.start_token, jnp.int32)
        tokens = sampler.generate_tokens(
            decoder, params["dim"]["joint_decoder"], first_tokens=first, length=length + 1,
            context=context, context_mask=mask, rng=rng, sampling=gen.sampling)[:, 1:]
      else:  # official: the ground-truth first token seeds the sequence.
        first = vq.apply(vq_params, target, mask, method=vqvae.VQVAE.encode)["tokens"][:, 0]
        tokens = sampler.generate_tokens(
            decoder, params["dim"]["joint_decoder"], first_tokens=first, length=length,
            context=context, context_mask=mask, rng=rng, sampling=gen.sampling)
    motion = vq.apply(vq_params, tokens, mask, method=vqvae.VQVAE.decode_tokens)
    tokens = sampler.split_samples(jnp.where(mask, tokens, 0), num_samples)
  return dict(motion=sampler.split_samples(motion, num_samples), tokens=tokens)


def generate_clips(generator: Generator, dataset, num_samples: int,
                   rng: jax.Array) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Samples every clip of a windowed eval dataset; windows are reassembled per clip.

  Batch i uses `fold_in(rng, i)`. Returns {clip_id: (samples [N, T, 56], truth [T, 56])} with
  T the clip's full length (the target role's ground truth, for scoring).
  """
  windows: dict[str, dict[int, np.ndarray]] = {}
  truth: dict[str, dict[int, np.ndarray]] = {}
  for batch_index, batch in enumerate(pipeline.as_numpy(iter(dataset))):
    out = generator(batch, jax.random.fold_in(rng, batch_index), num_samples)
    motion = np.asarray(jax.device_get(out["motion"]))
    for row in np.flatnonzero(batch["example_mask"]):
      clip = batch["clip_id"][row].decode("utf-8")
      n = int(batch["length"][row])
      index = int(batch["window_index"][row])
      windows.setdefault(clip, {})[index] = motion[row, :, :n]
      truth.setdefault(clip, {})[index] = batch[f"{generator.role}_motion"][row, :n]
  clips = {}
  for clip, parts in windows.items():
    if sorted(parts) != list(range(len(parts))):
      raise RuntimeError(f"clip {clip!r}: windows {sorted(parts)} are not consecutive")
    clips[clip] = (np.concatenate([parts[i] for i in range(len(parts))], axis=1),
                   np.concatenate([truth[clip][i] for i in range(len(parts))], axis=0))
  return clips


def run_generate(config, workdir: str) -> dict:
  """Generates for every clip of `generate.split`; returns summary errors vs ground truth."""
  gc = config.generate
  sampling = sampler.SamplingConfig.from_config(gc.sampling)
  if int(gc.num_samples) < 1:
    raise ValueError(f"generate.num_samples={gc.num_samples}; expected >= 1")
  if not config.init.model:
    raise ValueError("set init.model to the workdir of a finetune_listener / "
                     "finetune_speaker run")
  generator = Generator.from_workdir(config.init.model, sampling)
  data_dir = pipeline.ensure_data(config)
  batch_size = int(gc.batch_size)
  dataset = pipeline.make_dataset(
      data_dir, gc.split, batch_size=batch_size, train=False, seed=int(config.seed),
      bucket_boundaries=list(config.data.bucket_boundaries), max_len=int(config.data.max_len),
      process_index=jax.process_index(), process_count=jax.process_count(),
      shuffle_buffer=1)
  num_samples = int(gc.num_samples)
  out_dir = os.path.join(workdir, "generated")
  clips = generate_clips(generator, dataset, num_samples, jax.random.PRNGKey(int(gc.seed)))
  if not clips:
    raise records.RecordError(f"{data_dir}: split {gc.split!r} has no clips to generate for")
  errors = {"pose_abs": 0.0, "expression_abs": 0.0, "pose_sq": 0.0, "expression_sq": 0.0,
            "frames": 0}
  names = files.clip_filenames(list(clips))  # distinct ids never share a file
  for k in range(num_samples):
    os.makedirs(os.path.join(out_dir, f"sample_{k}"), exist_ok=True)
  for clip, (stacked, target) in clips.items():
    name = names[clip]
    for k in range(num_samples):
      files.save_npy_atomic(os.path.join(out_dir, f"sample_{k}", name), stacked[k].astype(np.float32))
    diff = stacked - target[None]
    errors["pose_abs"] += float(np.abs(diff[..., :6]).sum())
    errors["expression_abs"] += float(np.abs(diff[..., 6:]).sum())
    errors["pose_sq"] += float(np.square(diff[..., :6]).sum())
    errors["expression_sq"] += float(np.square(diff[..., 6:]).sum())
    errors["frames"] += diff.shape[0] * diff.shape[1]
  frames = max(errors["frames"], 1)
  summary = dict(
      role=generator.role, clips=len(clips), num_samples=num_samples, split=gc.split,
      source=generator.source, sampling=sampling.to_dict(), seed=int(gc.seed),
      start=generator.task.model.config.start, decoding=generator.task.model.config.decoding,
      pose_l1=errors["pose_abs"] / (frames * 6), expression_l1=errors["expression_abs"] / (frames * 50),
      pose_mse=errors["pose_sq"] / (frames * 6), expression_mse=errors["expression_sq"] / (frames * 50))
  if jax.process_index() == 0:
    files.write_json_atomic(os.path.join(out_dir, "sampling.json"), summary)
  logging.info("generated %d clips x %d samples into %s", len(clips), num_samples, out_dir)
  return summary
