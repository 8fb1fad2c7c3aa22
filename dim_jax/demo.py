r"""`make demo`: the whole pipeline on the embedded synthetic data with tiny configs.

  python -m dim_jax.demo --workdir runs/demo

Steps (each a phase of `python -m dim_jax.main`, chained through Orbax checkpoints):
  1. tokenizers: `vq` for the listener and the speaker          -> <workdir>/vq_<role>
  2. DIM pretraining (restores both tokenizers)                  -> <workdir>/pretrain
  3. DIM-Listener fine-tuning (restores the pretraining run)     -> <workdir>/finetune_listener
  4. evaluation on the test split: DIM-Listener (one sample per clip, several sampling seeds,
     with the tokenizer's residual noise; the decoder output beside it) against the Random,
     Mirror, NN-motion and NN-audio baselines                       -> <workdir>/evaluate
Then writes <workdir>/report.md and report.json: tokenizer reconstruction, each phase's
validation losses, the evaluation tables and whether DIM-Listener beats every baseline on
expression FD and MSE. Rerunning resumes or reuses.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from dim_jax import config_lib, files, phases
from dim_jax.evaluation import report as report_lib
from dim_jax.training import metric_writer

flags.DEFINE_string("workdir", "runs/demo", "Where the demo writes everything.")
flags.DEFINE_integer("vq_steps", 0, "Training steps per tokenizer (0: the tiny config's, 400 "
                     "for the listener, 800 for the speaker).")
# 60: on the demo data the validation loss of pretraining is best near step 50 (of 150).
flags.DEFINE_integer("pretrain_steps", 60, "DIM pretraining steps.")
flags.DEFINE_integer("finetune_steps", 1500, "DIM-Listener fine-tuning steps.")
flags.DEFINE_integer("num_seeds", 3, "Sampling seeds of the evaluation's headline row.")
FLAGS = flags.FLAGS

# One 64-frame bucket: a single compiled shape per step function keeps the demo short.
DEMO_MAX_LEN = 64
# Training clips of the synthetic dataset (the config default is 256): with 256, DIM-Listener
# fine-tuning overfits (validation loss rises after ~400 steps) before it has learned to use
# the speaker. The baselines read the same training split.
DEMO_TRAIN_CLIPS = 1024


# Tokens that keep the head (README "Keeping the head"): each tokenizer has a pose encoder
# and an expression encoder, the frame's token is the pair (16 pose codes x 256 expression
# codes) and the DIM decoder predicts it with a factorised head. Against one shared encoder
# of 512 codes, on the demo data: listener tokenizer pose / expression unexplained 0.41 / 0.29
# -> 0.22 / 0.23, speaker 0.40 / 0.28 -> 0.16 / 0.26; DIM-Listener pose FD 0.00120 ->
# 0.00097, pose MSE 0.00052 -> 0.00049, pose SID 3.30 -> 4.03 (ground truth 4.20); expression
# FD 0.300 -> 0.333 (all on the synthetic law 1). With the head posture (law 2), 64 pose codes
# gave listener pose unexplained 0.17 (16: 0.26) but speaker expression 0.35, pose SID 3.06
# (ground truth 4.24) and a 12-minute demo: 16 kept.
POSE_CODES, EXPRESSION_CODES = 16, 256


def _part_tokens(config):
  """The demo's tokenizer (`vq` phase) or DIM vocabulary (DIM phases): pose x expression."""
  if config.phase == "vq":
    config.model.update(code_groups=2, part_encoders=True, pose_codes=POSE_CODES,
                        codebook_size=POSE_CODES * EXPRESSION_CODES)
  else:
    config.model.num_tokens = POSE_CODES * EXPRESSION_CODES
    config.model.token_factors = (POSE_CODES, EXPRESSION_CODES)
  return config


def _demo_data(config, data_dir: str):
  config.data.dir = data_dir
  config.data.synthetic = True
  config.data.synthetic_num_train = DEMO_TRAIN_CLIPS
  config.data.max_len = DEMO_MAX_LEN
  config.data.bucket_boundaries = (DEMO_MAX_LEN,)
  return config


def _fmt(value) -> str:
  return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_report(reports: dict) -> str:
  lines = ["# dim_jax demo report", "",
           "Synthetic dyadic data (dim_jax/data/synthetic.py), tiny configs "
           "(configs/vq_tiny.py, configs/dim.py:size=tiny), 64-frame windows.", "",
           "## 1. VQ-VAE tokenizers (validation split, best checkpoint)", "",
           "Unexplained = squared error / data variance (1 - R^2).", "",
           "| role | steps | pose L1 | expression L1 | pose unexplained "
           "| expression unexplained | codes used | perplexity |",
           "|---|---|---|---|---|---|---|---|"]
  for role in ("listener", "speaker"):
    rep = reports[f"vq_{role}"]
    t = rep["best_val"]
    lines.append(f"| {role} | {rep['step']} | {t['pose_l1']:.4f} | {t['expression_l1']:.4f} | "
                 f"{t['pose_unexplained']:.3f} | {t['expression_unexplained']:.3f} | "
                 f"{t['codes_used']} / {rep['codebook_size']} | {t['perplexity']:.1f} |")
  for name, title in (("pretrain", "2. DIM pretraining"),
                      ("finetune_listener", "3. DIM-Listener fine-tuning")):
    rep = reports[name]
    lines += ["", f"## {title} (validation split, teacher forced, step {rep['step']}, "
              f"best {rep['best_step']})", "", "| term | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(rep["val"].items())]
  evaluation = reports["evaluate"]
  lines += ["", "## 4. Evaluation on the test split", ""]
  lines += [f"- {line}" for line in verdict(evaluation)]
  # The evaluation report, one heading level down, with plot links relative to this file.
  body = report_lib.format_report(evaluation).replace("](plots/", "](evaluate/plots/")
  lines += [""] + [("#" + l if l.startswith("#") else l) for l in body.splitlines()[1:]]
  return "\n".join(lines) + "\n"


HEADLINE_KEYS = ("fd_expression", "mse_expression", "fd_pose", "mse_pose")
# Does the generated head move like the ground truth's? Pose SID (entropy of the pose
# clusters the frames fall in) within this fraction of the ground truth's.
SID_TOLERANCE = 0.25
# Window seams: boundary change at most this multiple of the change inside windows.
SEAM_LIMIT = 1.5


def verdict(evaluation: dict) -> list[str]:
  """One line per check: headline keys (does the model's mean beat every baseline's, lower is
  better), pose SID against the ground truth's, and the window seams."""
  protocol = evaluation["headline_protocol"]
  methods = evaluation["methods"]
  model = next(m for m in methods if m["kind"] == "model")
  baselines = [m for m in methods if m["kind"] == "baseline"]
  lines = []
  for key in HEADLINE_KEYS:
    ours = model["metrics"][protocol][key]["mean"]
    others = {m["name"]: m["metrics"][protocol][key]["mean"] for m in baselines}
    best_name = min(others, key=others.get)
    wins = all(ours < v for v in others.values())
    lines.append(f"{model['name']} {'beats' if wins else 'does NOT beat'} every baseline on "
                 f"{key} ({protocol}): {ours:.4g} vs best baseline {best_name} "
                 f"{others[best_name]:.4g}.")
  law = next((m for m in methods if m["name"].startswith("Synthetic data's own law")), None)
  if law is not None:
    # What a perfect generative model scores: a check it cannot pass is not a model failure.
    lost = [key for key in HEADLINE_KEYS
            if not all(law["metrics"][protocol][key]["mean"] < m["metrics"][protocol][key]["mean"]
                       for m in baselines)]
    lines.append("The synthetic data's own law (other listeners to the same speakers, drawn by "
                 "the generator) " + (f"does NOT beat every baseline on {', '.join(lost)}: no "
                                      "faithful generative model can pass those checks here"
                                      if lost else "beats every baseline on every check") + ".")
  truth = next((m for m in methods if m["kind"] == "reference"), None)
  if truth is not None:
    ours = model["metrics"][protocol]["sid_pose"]["mean"]
    target = truth["metrics"][protocol]["sid_pose"]["mean"]
    close = abs(ours - target) <= SID_TOLERANCE * abs(target)
    lines.append(f"Pose SID {ours:.3g} vs ground truth {target:.3g}: "
                 f"{'within' if close else 'NOT within'} {SID_TOLERANCE:.0%} (does the head "
                 "move like the ground truth's).")
  seams = evaluation.get("seams")
  if seams:
    parts = {part: seams[part]["ratio"] for part in ("expression", "pose")
             if seams.get(part, {}).get("ratio") is not None}
    if parts:
      ok = all(r <= SEAM_LIMIT for r in parts.values())
      lines.append("Window seams (frame-to-frame change at window boundaries / inside): "
                   + ", ".join(f"{p} {r:.2f}" for p, r in parts.items())
                   + f" ({'at most' if ok else 'NOT at most'} {SEAM_LIMIT}).")
  return lines


def run_demo(workdir: str, vq_steps: int = 0, pretrain_steps: int = 60,
             finetune_steps: int = 1500, num_seeds: int = 3) -> dict:
  data_dir = os.path.join(workdir, "data")
  path = lambda name: os.path.join(workdir, name)
  reports = {}
  for role in ("listener", "speaker"):
    config = _part_tokens(_demo_data(config_lib.shrink_to_tiny(config_lib.vq_config(role)),
                                     data_dir))
    if vq_steps:
      config.train.num_steps = vq_steps
    reports[f"vq_{role}"] = phases.run(config, path(f"vq_{role}"))
  for phase, steps in (("pretrain", pretrain_steps), ("finetune_listener", finetune_steps)):
    config = _part_tokens(_demo_data(
        config_lib.shrink_dim_to_tiny(config_lib.dim_config(phase)), data_dir))
    config.train.num_steps = steps
    config.train.eval_every_steps = max(steps // 3, 1)
    config.train.checkpoint_every_steps = config.train.eval_every_steps
    config.init.speaker_vq, config.init.listener_vq = path("vq_speaker"), path("vq_listener")
    if phase != "pretrain":
      config.init.pretrain = path("pretrain")
      # The deployable listener: cross-attention to speaker frames up to the predicted one
      # (streaming needs it; ours, official False). Same budget, on the demo data: expression
      # FD 0.357 -> 0.300, MSE 0.029 -> 0.013; pose unchanged (README, "Fewer passes and a
      # live listener").
      config.model.causal_context = True
    reports[phase] = phases.run(config, path(phase))
  config = _demo_data(config_lib.evaluate_config(), data_dir)
  config.init.model = path("finetune_listener")
  config.evaluate.num_seeds = num_seeds
  # Samples carry the tokenizer's residual noise (generate.py, "the tokenizer's residual"):
  # the decoder output lacks the data's frame-level noise, which FD charges; the report
  # shows the decoder output beside it.
  config.evaluate.residual_noise = True
  reports["evaluate"] = phases.run(config, path("evaluate"))
  text = format_report(reports)
  files.write_json_atomic(path("report.json"), dict(reports, versions=files.library_versions()))
  files.write_text_atomic(path("report.md"), text)
  print(text)
  print(f"Report: {path('report.md')}")
  return reports


def main(argv):
  del argv
  metric_writer.quiet_library_logs()
  run_demo(FLAGS.workdir, FLAGS.vq_steps, FLAGS.pretrain_steps, FLAGS.finetune_steps,
           FLAGS.num_seeds)


if __name__ == "__main__":
  app.run(main)
