"""Phase dispatch: `config.phase` -> the trainer or tool that runs it."""

from __future__ import annotations

import os

import jax

from dim_jax import files
from dim_jax.training import checkpointing, dim_tasks, trainer, vq

PHASES = ("vq", "pretrain", "finetune_listener", "finetune_speaker", "generate", "evaluate")


def run(config, workdir: str) -> dict:
  if config.phase not in PHASES:
    raise ValueError(f"config.phase={config.phase!r} is not implemented; available: {PHASES}")
  if config.phase == "vq":
    return run_vq(config, workdir)
  if config.phase == "generate":
    from dim_jax import generate  # pylint: disable=g-import-not-at-top
    return generate.run_generate(config, workdir)
  if config.phase == "evaluate":
    from dim_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
    return evaluate.run_evaluate(config, workdir)
  return run_dim(config, workdir)


def run_dim(config, workdir: str) -> dict:
  """Trains a DIM phase; its checkpoints (best by validation loss) feed the next phase."""
  task = dim_tasks.DIMTask.from_config(config)
  result = trainer.train_and_evaluate(config, workdir, task)
  report = dict(phase=config.phase, step=result["step"], best_step=result["best_step"],
                val=result["val"], preempted=result["preempted"])
  if jax.process_index() == 0 and not result["preempted"]:
    files.write_json_atomic(os.path.join(workdir, "report.json"),
                              dict(report, versions=files.library_versions()))
  return report


def run_vq(config, workdir: str) -> dict:
  """Trains a tokenizer, then reports its best checkpoint's metrics on the validation split."""
  task = vq.VQTask.from_config(config)
  result = trainer.train_and_evaluate(config, workdir, task)
  if result["preempted"]:
    # SIGTERM: the checkpoint is saved; the same command resumes and finishes the phase.
    return dict(phase="vq", role=config.role, step=result["step"], preempted=True)
  mesh = result["mesh"]
  params = result["state"]["params"]
  best = result["best_step"]
  if best is not None and best != result["step"]:
    # Restore the best (by validation) params onto the training shardings.
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1 << 30)
    abstract = jax.eval_shape(lambda s: s, result["state"])
    shardings = jax.tree.map(lambda x: x.sharding, result["state"])
    params = ckpt.restore_state(best, checkpointing.abstract_with_shardings(abstract, shardings))["params"]
    ckpt.close()
  data_dir = trainer.ensure_data(config)
  local_batch = int(config.train.eval_batch_size) // jax.process_count()
  # The best checkpoint's full validation metrics: the test split is read only by `evaluate`.
  val_ds = trainer.make_split_dataset(config, data_dir, "val", train=False,
                                      batch_size=local_batch)
  best_val = trainer.evaluate(task, params, dataset=val_ds, mesh=mesh,
                          compiled_eval=result["compiled_eval"],
                          batch_size=local_batch, min_frames=min(config.data.bucket_boundaries))
  report = dict(phase="vq", role=config.role, step=result["step"], best_step=best,
                codebook_size=int(config.model.codebook_size),
                val=result["val"], best_val=best_val)
  if jax.process_index() == 0:
    files.write_json_atomic(os.path.join(workdir, "report.json"),
                              dict(report, versions=files.library_versions()))
  return report
