"""Phase dispatch: `config.phase` -> the trainer or tool that runs it."""

from __future__ import annotations

import os

import jax

from dim_jax import config_lib, errors, files
from dim_jax.data import pipeline
from dim_jax.training import dim_tasks, metric_writer, trainer, vq

PHASES = ("vq", "pretrain", "finetune_listener", "finetune_speaker", "generate", "evaluate")


def run(config, workdir: str, *, step_hooks=()) -> dict:
  """Runs `config.phase` into `workdir`; the config is validated before anything is written."""
  if config.phase not in PHASES:
    raise errors.ConfigError(f"config.phase={config.phase!r} is not implemented; available: "
                             f"{PHASES}")
  config_lib.validate(config)
  if config.phase == "vq":
    return run_vq(config, workdir, step_hooks=step_hooks)
  if config.phase == "generate":
    from dim_jax import generate  # pylint: disable=g-import-not-at-top
    return generate.run_generate(config, workdir)
  if config.phase == "evaluate":
    from dim_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
    return evaluate.run_evaluate(config, workdir)
  return run_dim(config, workdir, step_hooks=step_hooks)


def run_dim(config, workdir: str, *, step_hooks=()) -> dict:
  """Trains a DIM phase; its checkpoints (best by validation loss) feed the next phase."""
  task = dim_tasks.task_from_config(config)
  result = trainer.train_and_evaluate(config, workdir, task, step_hooks=step_hooks)
  report = dict(phase=config.phase, step=result["step"], best_step=result["best_step"],
                val=result["val"], preempted=result["preempted"])
  if jax.process_index() == 0 and not result["preempted"]:
    files.write_json_atomic(os.path.join(workdir, "report.json"),
                              dict(report, versions=files.library_versions()))
  return report


def run_vq(config, workdir: str, *, step_hooks=()) -> dict:
  """Trains a tokenizer, then reports its best checkpoint's metrics on the validation split."""
  data_dir = pipeline.ensure_data(config)
  task = vq.VQTask.from_config(config, pipeline.normalization_for(config, data_dir))
  result = trainer.train_and_evaluate(config, workdir, task, step_hooks=step_hooks)
  if result["preempted"]:
    # SIGTERM: the checkpoint is saved; the same command resumes and finishes the phase.
    return dict(phase="vq", role=config.role, step=result["step"], preempted=True)
  best = result["best_step"]
  # The best checkpoint's validation metrics, as the trainer logged them when it chose that
  # step (the test split is read only by `evaluate`).
  logged = {m["step"]: m for m in metric_writer.read_metrics(workdir) if "val/loss" in m}
  best_val = ({k[len("val/"):]: v for k, v in logged[best].items() if k.startswith("val/")}
              if best in logged else result["val"])
  report = dict(phase="vq", role=config.role, step=result["step"], best_step=best,
                codebook_size=int(config.model.codebook_size),
                val=result["val"], best_val=best_val)
  if jax.process_index() == 0:
    files.write_json_atomic(os.path.join(workdir, "report.json"),
                              dict(report, versions=files.library_versions()))
  return report
