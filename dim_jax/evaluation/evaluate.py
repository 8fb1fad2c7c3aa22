"""Phase `evaluate`: DIM-Listener (or DIM-Speaker) against baselines, with an honest protocol.

    python -m dim_jax.main --config configs/evaluate.py --workdir runs/eval \
        --config.init.model=runs/finetune_listener --config.data.dir=DATA

Protocol (where we deliberately differ from the official evaluation, README "Differences"):
  * The model's checkpoint is the best by *validation* loss (phase-chained `best` step); this
    phase is the only one that reads the test split.
  * Headline: one sample per clip, reported as mean ± std (ddof 1) over `evaluate.num_seeds`
    sampling seeds.  The official code keeps, per clip, the best of 10 samples by FD to the
    ground truth over all 56 dims (`best_of_samples`); that oracle is reported only as a
    labelled diagnostic row (`evaluate.best_of`).
  * Generation (dim_jax/generate.py): every clip whole, as one sliding-window token stream
    (windows of the model's training length overlapping by `evaluate.window_overlap`, later
    windows continuing from the model's own tokens, cross-faded), inputs and outputs in raw
    units. The headline row sees the partner's motion and audio plus the target's first
    ground-truth frame, as the official protocol (start='first_frame'); with
    `evaluate.no_ground_truth_row` a "(no ground truth)" row (kind "variant") sees no ground
    truth at all (start='none'). `results["seams"]` compares the frame-to-frame change of the
    headline samples at window seams with that inside windows (`generate.seam_statistics`).
  * Baselines (dim_jax/evaluation/baselines.py) are methods of the same evaluation, fitted on
    `evaluate.train_split` only.  Random runs over the same seeds as the model.
  * Metrics (dim_jax/evaluation/metrics.py) under both protocols: `dim_compat` (official
    pooling) and `per_sequence`; k-means for SID is fitted once on the test ground truth.
  * Frame alignment: `evaluate.official_alignment=True` scores what the official evaluation
    scores (listener frame t + 1 against speaker frame t, listener frame 0 dropped; metrics
    module docstring), for every protocol, the best-of-N choice and the SID clusters; the
    default pairs same-index frames and keeps them all.  Recorded as `settings.alignment`.
    With `evaluate.role=speaker` the target role (the speaker) drops frame 0 and the partner
    its last frame, the same shift; the official speaker evaluation exists only as
    commented-out lines (code/x_engine_pt.py:225-228), so there is nothing else to follow.

Instead of a checkpoint, `evaluate.predictions` may name a directory in the layout the
`generate` phase writes (`sample_<k>/<clip>.npy`, (T, 56) float) to score outputs made
elsewhere; every file is checked against its clip (length, width, real floating-point dtype,
finite values), file names are `files.clip_filenames` of the clip ids, and `.npy` files that
match no clip of the split are refused (`load_predictions`).

Writes <workdir>/report.md, report.json and plots/*.png (trajectories of a few test clips and
per-method metric bars). With several devices or processes the model's samples are generated
on the training mesh (`config.mesh`): every batch is split over all devices, each process
samples only its share, and the samples are gathered, so every process holds every clip once
(each clip's samples depend on the seed and its id only: the numbers of one device, motion
to float rounding). The metrics and baselines (NumPy, cheap next to generation) then run on
every process over the gathered samples (FD, SID and STS need whole clips or pooled frames,
so samples, not partial sums, are gathered); process 0 writes the report.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

from dim_jax import files, sampler
from dim_jax import sharding as sharding_lib
from dim_jax.data import pipeline, records
from dim_jax.evaluation import baselines as baselines_lib
from dim_jax.evaluation import metrics as metrics_lib
from dim_jax.evaluation import report as report_lib
from dim_jax.evaluation.metrics import pad_clips

BASELINE_NAMES = {"random": "Random", "mirror": "Mirror", "nn_motion": "NN-motion",
                  "nn_audio": "NN-audio"}
# Baselines that read the partner's motion: DIM-Speaker is conditioned on audio only.
PARTNER_MOTION_BASELINES = ("mirror", "nn_motion")
MODEL_NAMES = {"listener": "DIM-Listener", "speaker": "DIM-Speaker"}
OTHER_ROLE = {"listener": "speaker", "speaker": "listener"}


def _model_samples(config, role: str, clips: list[dict], num_samples: int):
  """Samples of the fine-tuned model for every clip, per start mode.

  Returns ({start: [S, N, T_max, 56] raw units}, settings, generator): 'first_frame' always
  (the headline), 'none' too with `evaluate.no_ground_truth_row`.
  """
  from dim_jax import generate  # pylint: disable=g-import-not-at-top
  ec = config.evaluate
  # Generation on the training mesh (config.mesh): each process samples its devices' rows.
  mesh = sharding_lib.make_mesh(config.mesh)
  sharding_lib.check_batch_size(int(ec.batch_size), mesh, jax.process_count(),
                                "evaluate.batch_size")
  generator = generate.Generator.from_workdir(
      config.init.model, sampler.SamplingConfig.from_config(ec.sampling),
      **generate.window_settings(ec), mesh=mesh)
  if generator.role != role:
    raise ValueError(f"{config.init.model} generates {generator.role} motion; "
                     f"evaluate.role={role!r}")
  starts = ["first_frame"] + (["none"] if bool(ec.get("no_ground_truth_row", True)) else [])
  samples = {}
  # Each process samples its share of the clips; every process gets all of them back, so the
  # metrics below see the whole split once, as on one device.
  for start in starts:
    generated = generate.generate_clips(generator, clips, num_samples,
                                        jax.random.PRNGKey(int(ec.seed)),
                                        batch_size=int(ec.batch_size), start=start)
    per_clip = [generated[clip["clip_id"]] for clip in clips]  # [S, T, 56] each
    samples[start] = np.stack([pad_clips([c[k] for c in per_clip])[0]
                               for k in range(num_samples)])
    num_samples = min(num_samples, int(ec.num_seeds))  # the oracle row is headline-only
  settings = dict(source=generator.source, sampling=generator.sampling.to_dict(),
                  start=generator.task.model.config.start,
                  decoding=generator.task.model.config.decoding,
                  iterative=generator.iterative.to_dict(),
                  window=generator.window, window_overlap=generator.overlap,
                  normalized=generator.task.normalization is not None)
  return samples, settings, generator


# Why a dtype is refused (`_load_prediction`); any other non-float dtype is "not numeric".
_INTEGER_REFUSED = ("integer motion is refused: generate writes float32 and EMOCA/FLAME "
                    "coefficients are not integers, so an integer array is most likely token ids "
                    "or labels saved by mistake (or motion rounded away)")
_REFUSED_KINDS = {
    "c": "complex values are refused, not cast: a cast would silently drop the imaginary part",
    "i": _INTEGER_REFUSED,
    "u": _INTEGER_REFUSED,
}


def _load_prediction(path: str, clip: dict) -> np.ndarray:
  """One prediction file, checked: a plain real floating-point (length, 56) array."""
  try:
    array = np.load(path, allow_pickle=False)  # Untrusted files: no pickles.
  except ValueError as error:
    raise metrics_lib.MetricInputError(f"{path}: not a plain .npy array ({error})") from None
  except (OSError, EOFError) as error:  # Truncated or unreadable.
    raise metrics_lib.MetricInputError(f"{path}: unreadable .npy file ({error})") from None
  if not isinstance(array, np.ndarray):  # An .npz archive under a .npy name.
    getattr(array, "close", lambda: None)()
    raise metrics_lib.MetricInputError(
        f"{path}: not a plain .npy array (got {type(array).__name__}, e.g. an .npz archive)")
  if not np.issubdtype(array.dtype, np.floating):
    why = _REFUSED_KINDS.get(array.dtype.kind, "not numeric motion")
    raise metrics_lib.MetricInputError(
        f"{path}: prediction for clip {clip['clip_id']!r} has dtype {array.dtype}; expected "
        f"real floating-point motion (float16/32/64): {why}")
  expected = (clip["length"], records.MOTION_DIM)
  if array.shape != expected:
    raise metrics_lib.MetricInputError(
        f"{path}: prediction for clip {clip['clip_id']!r} has shape {array.shape}; the "
        f"ground truth needs {expected} (frames, 56 motion values)")
  return array


def load_predictions(directory: str, clips: list[dict], num_frames: int,
                     split: str = "") -> np.ndarray:
  """Reads `sample_<k>/<clip>.npy` files (generate-phase layout): [S, N, T_max, 56] float32.

  File names are `files.clip_filenames` of the clip ids (distinct ids, distinct names; a
  repeated id or a shared name is refused, naming both ids). Every file must be a plain
  real floating-point (length, 56) array: complex, integer, bool, string and object arrays
  are refused with `MetricInputError` naming the file. A `sample_<k>/` holding `.npy` files
  that match no clip of the split is refused too: such files mean the predictions were made
  for other clips (another split, other clip ids, an old naming), and scoring only the
  matching subset would report numbers for a set the user did not intend; remove the extra
  files or point `evaluate.predictions` at a directory holding only this split's clips.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"evaluate.predictions={directory!r} is not a directory")
  sample_dirs = sorted((d for d in os.listdir(directory)
                        if d.startswith("sample_") and d[len("sample_"):].isdigit()),
                       key=lambda d: int(d[len("sample_"):]))
  if not sample_dirs:
    raise FileNotFoundError(f"{directory}: no sample_<k>/ subdirectories of predictions")
  of_split = f" of split {split!r}" if split else ""
  try:
    names = files.clip_filenames([c["clip_id"] for c in clips])
  except ValueError as error:  # A repeated id, or two ids sharing a file name.
    raise metrics_lib.MetricInputError(
        f"{directory}: the clips{of_split} cannot be told apart by prediction file name: "
        f"{error}") from None
  expected = set(names.values())
  out = np.zeros((len(sample_dirs), len(clips), num_frames, records.MOTION_DIM), np.float32)
  for k, sample_dir in enumerate(sample_dirs):
    folder = os.path.join(directory, sample_dir)
    present = set(os.listdir(folder))
    stray = sorted(n for n in present if n.endswith(".npy") and n not in expected)
    if stray:
      missing = [c["clip_id"] for c in clips if names[c["clip_id"]] not in present]
      shown = ", ".join(stray[:8]) + (f", ... ({len(stray) - 8} more)" if len(stray) > 8 else "")
      hint = (f"; {len(missing)} clips{of_split} have no file there (e.g. {missing[:3]}): were "
              "the predictions written for other clip ids?" if missing else "")
      raise metrics_lib.MetricInputError(
          f"{folder}: {len(stray)} .npy file(s) match no clip{of_split}: {shown}{hint}. "
          "Remove them, or point evaluate.predictions at a directory holding only this "
          "split's clips.")
    for i, clip in enumerate(clips):
      path = os.path.join(folder, names[clip["clip_id"]])
      if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no prediction for clip {clip['clip_id']!r}")
      out[k, i, : clip["length"]] = _load_prediction(path, clip)
  return out


def _summarise(runs: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
  """Per metric: mean, std over runs (ddof 1; None for a single run) and the run values."""
  summary = {}
  for key in runs[0]:
    values = [float(run[key]) for run in runs]
    summary[key] = dict(mean=float(np.mean(values)),
                        std=float(np.std(values, ddof=1)) if len(values) > 1 else None,
                        values=values)
  return summary


def _method(name: str, kind: str, note: str, runs: list[np.ndarray], score) -> dict:
  per_protocol = [score(prediction) for prediction in runs]
  return dict(name=name, kind=kind, runs=len(runs), note=note,
              metrics={protocol: _summarise([r[protocol] for r in per_protocol])
                       for protocol in per_protocol[0]})


def _synthetic_oracle(config, data_dir: str, clips: list[dict], role: str,
                      draws: int) -> np.ndarray | None:
  """[draws, N, T, 56] listeners redrawn by the synthetic generator, when the split is the
  embedded synthetic data (`evaluate.synthetic_oracle`, on by default), else None."""
  from dim_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  if (role != "listener" or not bool(config.evaluate.get("synthetic_oracle", True))
      or config.data.get("source", "records") != "records"):
    return None
  marker = records.read_info(data_dir).get(synthetic.INFO_MARKER)
  if not marker:
    return None
  if synthetic.law_version(marker) != synthetic.LAW_VERSION:
    logging.warning("%s: written by the synthetic generator's law version %d (now %d): no "
                    "oracle row (its redraws would follow another law)", data_dir,
                    synthetic.law_version(marker), synthetic.LAW_VERSION)
    return None
  return synthetic.listener_redraws(clips, marker["arguments"], draws)


def _with_residual_noise(seed: int, generator, train_clips: list[dict], clips: list[dict],
                         lengths: np.ndarray, *sample_sets):
  """`evaluate.residual_noise`: each [S, N, T, 56] set plus the tokenizer's residual noise
  (`generate.add_residual_noise`, measured on `train_clips`; None stays None), and the
  residual std."""
  from dim_jax import generate  # pylint: disable=g-import-not-at-top
  residual_std = generate.tokenizer_residual_std(generator, train_clips)
  scale = generate.residual_scale(generator, residual_std)
  rng = jax.random.PRNGKey(seed)
  noisy = []
  for start, samples in enumerate(sample_sets):
    if samples is None:
      noisy.append(None)
      continue
    per_clip = {clip["clip_id"]: samples[:, n, :length]
                for n, (clip, length) in enumerate(zip(clips, lengths))}
    # The headline's noise is generate's (same seed: same files); the no-ground-truth row's
    # its own.
    per_clip = generate.add_residual_noise(
        per_clip, rng if start == 0 else jax.random.fold_in(rng, start), scale)
    out = np.zeros_like(samples)
    for n, clip in enumerate(clips):
      out[:, n, :lengths[n]] = per_clip[clip["clip_id"]]
    noisy.append(out)
  return (*noisy, residual_std)


def best_of_samples(samples: np.ndarray, truth: np.ndarray, lengths: np.ndarray, *,
                    alignment: str = "same_frame",
                    clip_ids: list[str] | None = None) -> np.ndarray:
  """Per clip, the sample with the lowest FD to the ground truth over all 56 dims.

  The official oracle (Boese0601/Dyadic-Interaction-Modeling, code/x_engine_pt.py,
  `evaluate_test_epoch`, lines 255-268): 10 samples per clip, and per clip the one whose
  `calculate_frechet_distance` between the Gaussians of the ground-truth and the predicted
  frames, pose and expression together (all 56 dims), is smallest; not MSE. Ties keep the
  earliest sample (official strict `<`; `np.argmin`). The frames are those ``alignment``
  scores (``"official"``: listener frames 1..L-1, as the official `ct`/`cp`). Our FD is exact
  where the official `scipy.linalg.sqrtm` is off by ~1e-7 relative (clips shorter than 57
  frames have singular covariances), so the choice can differ from the official one only
  between samples whose FDs agree to ~1e-7.

  Args:
    samples: [S, N, T, 56] predictions, in the listener's frames.
    truth: [N, T, 56] ground truth.
    lengths: [N] valid frames (>= 2, or >= 3 with the official alignment).
    alignment: see `metrics.align_frames`.
    clip_ids: optional names for error messages.

  Returns:
    [N, T, 56]: per clip, the chosen sample (all its frames, unaligned).
  """
  aligned_lengths, aligned, _ = metrics_lib.align_frames(
      alignment, lengths, [truth] + [samples[k] for k in range(samples.shape[0])])
  fd = np.stack([metrics_lib.fd_per_sequence(aligned[0], prediction, aligned_lengths,
                                             slice(0, records.MOTION_DIM), clip_ids=clip_ids)
                 for prediction in aligned[1:]])  # [S, N]
  best = np.argmin(fd, axis=0)
  return samples[best, np.arange(truth.shape[0])]


def run_evaluate(config, workdir: str) -> dict:
  """Scores the model and the baselines on `evaluate.split`; writes the report."""
  ec = config.evaluate
  role = ec.role
  if role not in MODEL_NAMES:
    raise ValueError(f"evaluate.role={role!r}; expected one of {sorted(MODEL_NAMES)}")
  num_seeds, best_of = int(ec.num_seeds), int(ec.best_of)
  if num_seeds < 1:
    raise ValueError(f"evaluate.num_seeds={num_seeds}; expected >= 1")
  if best_of == 1 or best_of < 0:
    raise ValueError(f"evaluate.best_of={best_of}; expected 0 (off) or >= 2")
  unknown = set(ec.baselines) - set(BASELINE_NAMES)
  if unknown:
    raise ValueError(f"evaluate.baselines: unknown {sorted(unknown)}; "
                     f"available {sorted(BASELINE_NAMES)}")
  protocols = tuple(ec.protocols)
  # evaluate.official_alignment: score listener frame t + 1 against speaker frame t and drop
  # listener frame 0, as the official evaluation (metrics module docstring).
  alignment = "official" if bool(ec.get("official_alignment", False)) else "same_frame"
  min_frames = 2 + metrics_lib.ALIGNMENTS[alignment]
  for protocol in protocols:
    if protocol not in metrics_lib.PROTOCOLS:
      raise ValueError(f"evaluate.protocols: {protocol!r} is not one of {metrics_lib.PROTOCOLS}")
  if ec.predictions and bool(ec.get("residual_noise", False)):
    raise ValueError("evaluate.residual_noise adds the model's tokenizer residual to its own "
                     "samples (init.model); it does not apply to evaluate.predictions")
  if not ec.predictions and not config.init.model:
    raise ValueError("set init.model to a finetune_listener / finetune_speaker workdir, or "
                     "evaluate.predictions to a directory of sample_<k>/<clip>.npy files")
  data_dir = pipeline.ensure_data(config)
  clips = pipeline.read_split_clips(config, data_dir, ec.split)
  if not clips:
    raise records.RecordError(f"{data_dir}: split {ec.split!r} has no clips")
  clip_ids = [c["clip_id"] for c in clips]
  truth, lengths = pad_clips([c[f"{role}_motion"] for c in clips])
  partner, _ = pad_clips([c[f"{OTHER_ROLE[role]}_motion"] for c in clips])
  audio, _ = pad_clips([c["speaker_audio"] for c in clips])
  short = [cid for cid, n in zip(clip_ids, lengths) if n < min_frames]
  if short:
    # FD needs a covariance; refuse rather than averaging NaN or silently dropping clips.
    dropped = (" after the official alignment drops listener frame 0"
               if alignment == "official" else "")
    raise metrics_lib.MetricInputError(
        f"{data_dir} split {ec.split!r}: clips {short[:8]} have fewer than {min_frames} "
        f"frames; FD needs a covariance (2+ frames{dropped}). Remove them from the split.")

  # Read once: the baselines' training split, and the tokenizer residual's (residual_noise).
  train_clips = pipeline.read_split_clips(config, data_dir, ec.train_split)
  settings: dict[str, Any] = dict(split=ec.split, role=role, num_seeds=num_seeds,
                                  best_of=best_of, seed=int(ec.seed), data_dir=data_dir,
                                  alignment=alignment)
  num_samples = max(num_seeds, best_of)
  no_ground_truth, seams, decoder_output = None, None, None
  model_note = f"one sample per clip; mean ± std over {num_seeds} sampling seed(s)"
  if ec.predictions:
    samples = load_predictions(ec.predictions, clips, truth.shape[1], split=ec.split)
    num_seeds = min(num_seeds, samples.shape[0])
    settings.update(predictions=os.path.abspath(ec.predictions), num_seeds=num_seeds)
    model_name = ec.method_name or "predictions"
  else:
    by_start, model_settings, generator = _model_samples(config, role, clips, num_samples)
    samples, no_ground_truth = by_start["first_frame"], by_start.get("none")
    settings.update(model_settings)
    model_name = ec.method_name or MODEL_NAMES[role]
    conditioning = ("the speaker's motion and audio" if role == "listener"
                    else "the speaker's audio")
    # Window seams are a property of the generator: measured on its decoder output.
    from dim_jax import generate  # pylint: disable=g-import-not-at-top
    seams = generate.seam_statistics(samples[:num_seeds], lengths, generator.window,
                                     generator.overlap)
    if bool(ec.get("residual_noise", False)):
      decoder_output = samples[:num_seeds]
      samples, no_ground_truth, residual_std = _with_residual_noise(
          int(ec.seed), generator, train_clips, clips, lengths, samples, no_ground_truth)
      settings.update(residual_noise=True, residual_std=residual_std.tolist())
      model_note += ("; plus the tokenizer's residual noise (generate.residual_noise: "
                     "white Gaussian, per dimension, the std of the white part of what the "
                     f"tokenizer loses on the {ec.train_split} split)")
    model_note += (f"; uses {conditioning} plus the {role}'s first ground-truth frame, as the "
                   "official protocol; windows after the first continue from the model's own "
                   "tokens")

  clusters = metrics_lib.fit_clusters(truth, lengths, seed=int(ec.kmeans_seed),
                                      clip_ids=clip_ids, alignment=alignment)

  def score(prediction):
    return metrics_lib.listener_metrics_by_protocol(
        truth, prediction, partner, lengths, protocols=protocols, clusters=clusters,
        clip_ids=clip_ids, alignment=alignment)

  methods = [dict(name="Ground truth", kind="reference", runs=1,
                  note="SID and Var of the ground truth itself (the paper's GT row)",
                  metrics={p: _summarise([metrics_lib.reference_metrics(
                      truth, lengths, protocol=p, clusters=clusters, alignment=alignment)])
                           for p in protocols})]
  methods.append(_method(model_name, "model", model_note,
                         [samples[k] for k in range(num_seeds)], score))
  if decoder_output is not None:
    methods.append(_method(
        f"{model_name} (decoder output, no residual noise)", "variant",
        f"the headline's samples before the residual noise is added (what generate writes "
        f"by default); mean ± std over {num_seeds} sampling seed(s)",
        [decoder_output[k] for k in range(num_seeds)], score))
  if no_ground_truth is not None:
    methods.append(_method(
        f"{model_name} (no ground truth)", "variant",
        f"one sample per clip; mean ± std over {num_seeds} sampling seed(s); no ground truth "
        "at all: frame 0 from the model's start token, or the code of the training-mean "
        "motion (generate.start='none')",
        [no_ground_truth[k] for k in range(num_seeds)], score))
  if best_of and samples.shape[0] >= 2:
    n = min(best_of, samples.shape[0])
    methods.append(_method(
        f"{model_name} best-of-{n} (oracle, diagnostic)", "diagnostic",
        f"per clip the sample with the lowest FD to the ground truth over all 56 dims among "
        f"{n}, the official selection (x_engine_pt.evaluate_test_epoch): it uses the test "
        "answer; not comparable with the other rows",
        [best_of_samples(samples[:n], truth, lengths, alignment=alignment,
                         clip_ids=clip_ids)], score))

  oracle = _synthetic_oracle(config, data_dir, clips, role, num_seeds)
  if oracle is not None:
    methods.append(_method(
        "Synthetic data's own law (oracle, diagnostic)", "diagnostic",
        f"{num_seeds} other listeners to the same speakers, drawn by the synthetic generator "
        "itself (same pauses, nods, mirroring and head posture; fresh head sway, own "
        "expression and noise): a perfect generative model scores like this; not a method",
        [oracle[k] for k in range(num_seeds)], score))

  if role == "speaker":  # Baselines predict the target role: swap the roles' motion.
    train_clips = [dict(c, speaker_motion=c["listener_motion"], listener_motion=c["speaker_motion"])
                   for c in train_clips]
  train = baselines_lib.TrainingClips.from_clips(train_clips)
  for name in ec.baselines:
    if role == "speaker" and name in PARTNER_MOTION_BASELINES:
      continue
    seeds = range(num_seeds) if name == "random" else range(1)
    runs = [baselines_lib.run_baselines(train, partner, audio, lengths, seed=int(ec.seed) + s,
                                        names=(name,))[name] for s in seeds]
    note = {"random": "training frames drawn at random plus small noise",
            "mirror": f"the {OTHER_ROLE[role]}'s motion, smoothed",
            "nn_motion": f"listener motion of the nearest training window by {OTHER_ROLE[role]} "
                         "motion",
            "nn_audio": "motion of the nearest training window by speaker audio"}[name]
    if len(runs) > 1:
      note += f"; mean ± std over {len(runs)} seeds"
    methods.append(_method(BASELINE_NAMES[name], "baseline", note, runs, score))

  results = dict(protocols=list(protocols), headline_protocol=protocols[0], split=ec.split,
                 clips=len(clips), frames=int(lengths.sum()), settings=settings,
                 methods=methods)
  if seams is not None:
    results["seams"] = seams
  if jax.process_index() == 0:
    results["plots"] = _plots(workdir, results, clips, truth, samples[:num_seeds], partner,
                              lengths, int(ec.plot_clips), model_name)
    report_lib.write_report(workdir, results)
  logging.info("evaluated %d clips: %s", len(clips), os.path.join(workdir, "report.md"))
  return results


def _plots(workdir: str, results: dict, clips: list[dict], truth: np.ndarray,
           samples: np.ndarray, partner: np.ndarray, lengths: np.ndarray, num_clips: int,
           model_name: str) -> list[str]:
  plot_dir = os.path.join(workdir, "plots")
  os.makedirs(plot_dir, exist_ok=True)
  paths = []
  # Shade the speaker's pauses (heuristic from their jaw, `speech_activity_from_jaw`), so the
  # plots show whether the listener nods after them. The speaker is the target itself when
  # evaluating the speaker role.
  speaker_motion = truth if results["settings"].get("role") == "speaker" else partner
  for i in range(min(num_clips, len(clips))):
    n = int(lengths[i])
    name = "trajectories_" + files.clip_filename(clips[i]["clip_id"])[:-4] + ".png"
    activity = report_lib.speech_activity_from_jaw(speaker_motion[i, :n], clips[i]["fps"])
    report_lib.plot_trajectories(
        os.path.join(plot_dir, name), clip_id=clips[i]["clip_id"], truth=truth[i, :n],
        samples=samples[:, i, :n], speaker=partner[i, :n], fps=clips[i]["fps"],
        method_name=model_name, speaker_activity=activity)
    paths.append(os.path.join("plots", name))
  for protocol in results["protocols"]:
    name = f"metrics_{protocol}.png"
    report_lib.plot_metric_bars(os.path.join(plot_dir, name), results, protocol)
    paths.append(os.path.join("plots", name))
  return paths
