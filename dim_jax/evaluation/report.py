"""Evaluation report: Markdown tables laid out like the paper's Table 1, report files and plots.

Input is the plain, JSON-serialisable ``results`` dict of the evaluation phase::

  {"protocols": [...], "headline_protocol": "dim_compat", "split": "test", "clips": 32,
   "frames": 12345, "settings": {...}, "plots": ["plots/a.png", ...],  # plots optional
   "methods": [{"name": ..., "kind": "model" | "variant" | "baseline" | "reference" |
                        "diagnostic",
                "runs": 3, "note": ...,
                "metrics": {protocol: {metric_key: {"mean": m, "std": s, "values": [...]}}}}],
   "seams": {...}}  # optional: `generate.seam_statistics` of the model's samples

A "variant" row is another way of running the model (e.g. without any ground truth); it is
ranked with the model and the baselines, but only the first "model" row is the headline.

Plots are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly: no pyplot global
state (figure registry, backend switching), so this module is safe to call from training code
and tests alike. Every file is written to a temporary name in its directory and moved into place
with ``os.replace``, so a crash never leaves a truncated report or PNG behind.
"""

from __future__ import annotations

import io
import json
import math
import os
import textwrap
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dim_jax import files

Results = Mapping[str, Any]

# Column groups in the order of the paper's Table 1, then STS (the official mymetrics.py
# reports it; eval_utils.sts is a distance between frame-to-frame differences of generated and
# ground-truth motion, so lower is better). The paper puts ↓ on FD, P-FD, MSE and rPCC and no
# arrow on SID and Var: for those, closer to the ground-truth row is better.
METRIC_GROUPS: tuple[tuple[str, str, bool], ...] = (
    # (key prefix, header label, lower is better)
    ("fd", "FD", True),
    ("pfd", "P-FD", True),
    ("mse", "MSE", True),
    ("sid", "SID", False),
    ("var", "Var", False),
    ("rpcc", "rPCC", True),
    ("sts", "STS", True),
)
_PARTS = (("expression", "Exp"), ("pose", "Pose"))

DIAGNOSTIC_LABEL = "(oracle, diagnostic)"
MISSING = "—"
# Only these kinds compete for the bold "best" mark: a reference row is the target itself and a
# diagnostic row (best-of-N against ground truth) has seen the answer. A variant (the model
# run without ground truth) is an honest method of its own.
_RANKED_KINDS = ("model", "variant", "baseline")

_PROTOCOL_DESCRIPTIONS = {
    "dim_compat": (
        "Official pooling of the authors' `mymetrics.py`: FD, P-FD and MSE are computed per "
        "sequence and averaged over sequences; SID, Var, rPCC and STS are pooled over all frames "
        "of the split."),
    "per_sequence": (
        "Every metric is computed per clip and then averaged over clips, as later papers do; "
        "pooled metrics (SID, Var, rPCC, STS) therefore differ from `dim_compat` and the two "
        "tables are not comparable column by column."),
}

# `settings.alignment` of the evaluate phase: which frames every metric scores.
_ALIGNMENT_DESCRIPTIONS = {
    "same_frame": (
        "Frames: listener frame t is scored against speaker frame t; every valid frame counts."),
    "official": (
        "Frames: the official alignment (`x_engine_pt.evaluate_test_epoch`): listener frame t + 1 "
        "is scored against speaker frame t and listener frame 0 (the ground-truth first token "
        "generation starts from) is dropped from every metric, so P-FD and rPCC are comparable "
        "with the paper."),
}

POSE_CHANNELS = (("head pitch", 0), ("head yaw", 1), ("head roll", 2))
EXPRESSION_OFFSET = 6  # Expression coefficient k lives in motion column 6 + k.
NUM_EXPRESSION = 50
MOTION_DIM = 56


def metric_columns() -> list[tuple[str, str, bool]]:
  """Returns ``(metric_key, header, lower_is_better)`` for each table column, in table order."""
  columns = []
  for prefix, label, lower in METRIC_GROUPS:
    for part, short in _PARTS:
      header = f"{label} {short} ↓" if lower else f"{label} {short}"
      columns.append((f"{prefix}_{part}", header, lower))
  return columns


def format_value(mean: float | None, std: float | None = None) -> str:
  """Formats ``mean`` (± ``std``) with 4 significant digits; scientific for tiny/huge values.

  The std gets the mean's decimals so both read on the same scale; a nonzero std that would
  round to zero is shown in scientific notation rather than as a misleading "0.000".
  """
  if mean is None:
    return MISSING
  mean = float(mean)
  scientific, decimals = False, 3
  if not math.isfinite(mean):
    text = str(mean)
  else:
    # Round to 4 significant digits first so 9.9996 -> 10.00 (not 10.000) decides the decimals.
    rounded = float(f"{mean:.3e}")
    magnitude = abs(rounded)
    scientific = magnitude != 0.0 and (magnitude < 1e-3 or magnitude >= 1e5)
    decimals = 3 if magnitude == 0.0 else max(0, 3 - math.floor(math.log10(magnitude)))
    text = f"{mean:.3e}" if scientific else f"{mean:.{decimals}f}"
  if std is None:
    return text
  std = float(std)
  if scientific or not (math.isfinite(std) and math.isfinite(mean)):
    std_text = f"{std:.1e}" if math.isfinite(std) else str(std)
  else:
    std_text = f"{std:.{decimals}f}"
    if std != 0.0 and float(std_text) == 0.0:
      std_text = f"{std:.1e}"
  return f"{text} ± {std_text}"


def _metric(method: Mapping[str, Any], protocol: str, key: str) -> Mapping[str, Any] | None:
  entry = method.get("metrics", {}).get(protocol, {}).get(key)
  if entry is None or entry.get("mean") is None:
    return None
  return entry


def _cell(method: Mapping[str, Any], protocol: str, key: str) -> str:
  entry = _metric(method, protocol, key)
  if entry is None:
    return MISSING
  std = entry.get("std")
  # A single run has no spread; showing "± 0" would suggest a measured one.
  if int(method.get("runs", 1)) <= 1:
    std = None
  return format_value(entry["mean"], std)


def _escape(text: str) -> str:
  return str(text).replace("|", "\\|")


def _name_cell(method: Mapping[str, Any]) -> str:
  name = _escape(method["name"])
  if method.get("kind") == "diagnostic":
    if DIAGNOSTIC_LABEL not in name:
      name = f"{name} {DIAGNOSTIC_LABEL}"
    return f"*{name}*"
  return name


def best_methods(results: Results, protocol: str, key: str) -> set[int]:
  """Indices of the model/baseline rows holding the minimum finite mean of ``key`` (ties: all)."""
  means = {}
  for i, method in enumerate(results["methods"]):
    entry = _metric(method, protocol, key)
    if method.get("kind") in _RANKED_KINDS and entry is not None:
      value = float(entry["mean"])
      if math.isfinite(value):
        means[i] = value
  if not means:
    return set()
  best = min(means.values())
  return {i for i, value in means.items() if value == best}


def format_table(results: Results, protocol: str) -> str:
  """Returns a Markdown table of ``protocol``'s metrics: rows methods, columns as Table 1."""
  columns = metric_columns()
  lines = [
      "| Method | " + " | ".join(header for _, header, _ in columns) + " |",
      "|:--|" + "--:|" * len(columns),
  ]
  best = {key: best_methods(results, protocol, key) for key, _, lower in columns if lower}
  for i, method in enumerate(results["methods"]):
    cells = [_name_cell(method)]
    for key, _, lower in columns:
      text = _cell(method, protocol, key)
      if lower and i in best[key]:
        text = f"**{text}**"
      cells.append(text)
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _table_legend(results: Results) -> str:
  runs = sorted({int(m.get("runs", 1)) for m in results["methods"] if int(m.get("runs", 1)) > 1})
  spread = (f" Cells are mean ± std over {', '.join(map(str, runs))} sampling seeds where a row "
            "has several runs." if runs else "")
  return ("↓: lower is better; bold marks the best model or baseline row (reference and "
          "diagnostic rows excluded). SID and Var carry no arrow in the paper: closer to the "
          f"Ground truth row is better. {MISSING}: not defined for that row.{spread}")


def _protocol_sentence(protocol: str) -> str:
  return _PROTOCOL_DESCRIPTIONS.get(protocol, f"Protocol `{protocol}`.")


def _md_link_target(path: str) -> str:
  # CommonMark needs angle brackets around a destination that contains spaces.
  return f"<{path}>" if any(c.isspace() for c in path) else path


def format_seams(seams: Mapping[str, Any] | None) -> str:
  """One sentence on window seams (`generate.seam_statistics`), or '' without any."""
  if not seams:
    return ""
  head = (f"Window seams (windows of {seams['window']} frames overlapping by "
          f"{seams['overlap']}, cross-faded): ")
  if not seams.get("seams"):
    return head + "none, every clip fits one window."
  parts = []
  for part in ("expression", "pose"):
    entry = seams.get(part) or {}
    if entry.get("ratio") is None:
      parts.append(f"{part} {MISSING}")
      continue
    parts.append(f"{part} {format_value(entry['ratio'])} (whole seam "
                 f"{format_value(entry['ratio_mean'])})")
  return (head + f"mean frame-to-frame change at the worst seam frame / inside windows, over "
          f"{seams['seams']} seams: " + ", ".join(parts) + ".")


def format_report(results: Results) -> str:
  """Returns the whole `report.md` text: intro, one table per protocol, plots, settings."""
  headline = results["headline_protocol"]
  protocols = [headline] + [p for p in results.get("protocols", []) if p != headline]
  methods = results["methods"]
  model_runs = [int(m.get("runs", 1)) for m in methods if m.get("kind") == "model"]
  has_diagnostic = any(m.get("kind") == "diagnostic" for m in methods)

  seeds = (f"mean ± std over {max(model_runs)} sampling seeds" if model_runs
           and max(model_runs) > 1 else "one sampling seed")
  intro = (
      f"Split `{results.get('split', '?')}`: {results.get('clips', '?')} clips, "
      f"{results.get('frames', '?')} frames. The headline numbers use a single generated sample "
      f"per clip ({seeds}); deterministic baselines run once. The checkpoint was chosen on the "
      "validation split; the test split is touched only by this evaluation.")
  if has_diagnostic:
    intro += (
        " The best-of-N row picks, per clip, the sample with the lowest FD to the ground truth "
        "over all 56 dims: it is an oracle that has seen the answer, shown as a diagnostic only "
        "and not comparable with the other rows (it is what the official evaluation code "
        "reports).")
  if any(m.get("kind") == "variant" for m in methods):
    intro += (
        " Variant rows run the same model differently (\"no ground truth\": frame 0 from the "
        "model itself instead of the listener's first ground-truth frame; \"decoder output\": "
        "the samples without the tokenizer's residual noise); see Rows.")
  if (results.get("settings") or {}).get("residual_noise"):
    intro += (
        " The model's samples carry the tokenizer's residual noise (evaluate.residual_noise): "
        "white Gaussian noise per frame and dimension with the std of the white part of what "
        "the tokenizer loses, because decoded tokens lack the data's frame-level jitter, "
        "which FD charges; it costs MSE. Window seams are measured on the decoder output.")
  alignment = (results.get("settings") or {}).get("alignment")
  if alignment in _ALIGNMENT_DESCRIPTIONS:
    intro += " " + _ALIGNMENT_DESCRIPTIONS[alignment]
  seams = format_seams(results.get("seams"))
  if seams:
    intro += " " + seams

  out = ["# DIM-Listener evaluation report", "", intro, ""]
  for i, protocol in enumerate(protocols):
    role = "Headline protocol" if i == 0 else "Other protocol"
    out += [f"## {role}: `{protocol}`", "", _protocol_sentence(protocol), "",
            format_table(results, protocol), "", _table_legend(results), ""]

  notes = [m for m in methods if m.get("note")]
  if notes:
    out += ["## Rows", ""]
    out += [f"- {_name_cell(m)} ({m.get('kind', '?')}, {int(m.get('runs', 1))} run"
            f"{'s' if int(m.get('runs', 1)) != 1 else ''}): {m['note']}" for m in notes]
    out.append("")

  plots = results.get("plots") or []
  if plots:
    out += ["## Plots", ""]
    for path in plots:
      stem = os.path.splitext(os.path.basename(path))[0]
      out.append(f"- [{stem}]({_md_link_target(path)})  \n  ![{stem}]({_md_link_target(path)})")
    out.append("")

  settings = results.get("settings") or {}
  if settings:
    out += ["## Settings", ""]
    for key, value in settings.items():
      text = value if isinstance(value, str) else json.dumps(value, default=files.json_default)
      out.append(f"- `{key}`: `{text}`")
    out.append("")
  return "\n".join(out)


def write_report(workdir: str, results: Results) -> dict[str, str]:
  """Writes ``report.md`` and ``report.json`` into ``workdir``; returns ``{"md": .., "json": ..}``.

  Both files are rendered and staged under temporary names before either is moved into
  place, so a failure while rendering or writing leaves the previous pair untouched. The
  JSON records the versions of the libraries the numbers depend on (``versions``).
  """
  os.makedirs(workdir, exist_ok=True)
  paths = {"md": os.path.join(workdir, "report.md"),
           "json": os.path.join(workdir, "report.json")}
  results = dict(results)
  results.setdefault("versions", files.library_versions())
  files.atomic_write_many({
      paths["json"]: (json.dumps(results, indent=2, default=files.json_default) + "\n").encode(),
      paths["md"]: format_report(results).encode("utf-8"),
  })
  return paths


def _new_figure(figsize: tuple[float, float]) -> Figure:
  # Constrained layout makes room for the suptitle and an "outside" figure legend.
  fig = Figure(figsize=figsize, layout="constrained")
  FigureCanvasAgg(fig)  # Binds the Agg canvas to this figure only; pyplot never sees it.
  return fig


def _save_png(fig: Figure, path: str, dpi: float) -> None:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  files.atomic_write_bytes(path, buffer.getvalue())


JAW_OPEN_COLUMN = 3  # Motion column of the jaw opening (pose 3), used for speech activity.
PITCH_TITLE = "head pitch (col 0): nods"
PAUSE_LABEL = "speaker pause"
PAUSE_COLOR = "0.85"  # Light grey: the pause shading stays behind every curve.


def speech_activity_from_jaw(speaker_motion: Any, fps: float = 30.0, *,
                             window_seconds: float = 0.2,
                             threshold_fraction: float = 0.3) -> np.ndarray:
  """Heuristic speech activity of a speaker from their jaw opening: 1.0 speaking, 0.0 pause.

  Every dataset has the speaker's jaw (motion column 3) but not always usable audio, and the
  jaw moves when one speaks: syllables open and close it several times a second, while in a
  pause it rests. The score of frame t is the range (max - min) of the jaw opening over a
  centred window of ``window_seconds`` (0.2 s: about one syllable, so a closed jaw between two
  syllables still scores high; a constant offset such as a jaw held open scores zero). A frame
  counts as speaking when its score exceeds ``threshold_fraction`` of the clip's score range,
  measured between the 5th and 95th percentiles so a single tracking glitch does not set it.
  This is a heuristic, not voice activity detection: chewing or a laugh reads as speech, and a
  speaker talking with a barely moving jaw reads as a pause. On the synthetic data
  (`dim_jax.data.synthetic`) it agrees with the true speech mask on about 94 % of frames.

  Args:
    speaker_motion: [T, 56] speaker motion.
    fps: frame rate of the clip.
    window_seconds: width of the centred window of the jaw range (rounded to an odd number of
      frames, at least 1).
    threshold_fraction: in [0, 1]; the speaking threshold as a fraction of the score range.

  Returns:
    [T] float64 of 0.0 (pause) and 1.0 (speaking). All ones when the jaw never moves within
    the clip (nothing to tell pauses by: no frame is called a pause).
  """
  motion = np.asarray(speaker_motion, dtype=np.float64)
  if motion.ndim != 2 or motion.shape[1] != MOTION_DIM:
    raise ValueError(f"speaker_motion: expected [frames, {MOTION_DIM}], got {motion.shape}")
  if fps <= 0 or window_seconds <= 0:
    raise ValueError(f"fps and window_seconds must be positive, got {fps}, {window_seconds}")
  if not 0.0 <= threshold_fraction <= 1.0:
    raise ValueError(f"threshold_fraction must be in [0, 1], got {threshold_fraction}")
  jaw = motion[:, JAW_OPEN_COLUMN]
  if jaw.shape[0] == 0:
    return np.zeros(0)
  width = max(1, int(round(window_seconds * fps))) | 1  # Odd: centred on the frame.
  windows = np.lib.stride_tricks.sliding_window_view(np.pad(jaw, width // 2, mode="edge"), width)
  score = windows.max(axis=1) - windows.min(axis=1)
  low, high = np.percentile(score, (5.0, 95.0))
  if not high > low:
    return np.ones(jaw.shape[0])
  return (score > low + threshold_fraction * (high - low)).astype(np.float64)


def pause_intervals(activity: Any, threshold: float = 0.5) -> list[tuple[int, int]]:
  """Runs of frames with ``activity < threshold`` as ``(first, end)`` frames, end exclusive."""
  paused = np.asarray(activity, dtype=np.float64) < threshold
  edges = np.diff(np.concatenate([[0], paused.astype(np.int8), [0]]))
  return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def trajectory_channels(expression_dims: Sequence[int]) -> list[tuple[str, int]]:
  """Returns ``(title, motion_column)`` per subplot: head pitch, the expression dims, yaw, roll.

  Head pitch comes first: it is where the listener's nods show, the most visible listener
  behaviour (they follow the speaker's pauses).
  """
  channels = [(PITCH_TITLE, POSE_CHANNELS[0][1])]
  for k in expression_dims:
    k = int(k)
    if not 0 <= k < NUM_EXPRESSION:
      raise ValueError(f"expression dim {k} outside [0, {NUM_EXPRESSION})")
    channels.append((f"expression {k} (col {EXPRESSION_OFFSET + k})", EXPRESSION_OFFSET + k))
  channels += [(f"{name} (col {col})", col) for name, col in POSE_CHANNELS[1:]]
  return channels


def trajectory_figure(*, clip_id: str, truth: Any, samples: Any, speaker: Any, fps: float = 30.0,
                      expression_dims: Sequence[int] = (0, 1, 2, 3),
                      method_name: str = "DIM-Listener", speaker_activity: Any = None,
                      pause_threshold: float = 0.5) -> Figure:
  """Builds the trajectory figure (see ``plot_trajectories``) without saving it.

  Args:
    clip_id: shown in the title.
    truth: [T, 56] ground-truth listener motion.
    samples: [S, T, 56] generated listener motion, one per sample.
    speaker: [T, 56] speaker motion.
    fps: frame rate; the x axis is ``frame / fps`` seconds.
    expression_dims: indices into the 50 expression coefficients (motion column 6 + k).
    method_name: model name for the sample labels and title.
    speaker_activity: optional [T] speech activity of the speaker (e.g.
      ``speech_activity_from_jaw``); frames below ``pause_threshold`` are shaded light grey
      on every panel, so nods after the speaker's pauses can be seen. None: no shading.
    pause_threshold: activity below this is a pause.

  Returns:
    The figure: one subplot per channel (``trajectory_channels``: head pitch first, taller),
    ground truth as the axes' first line, then the S samples, then the speaker. A pause over
    frames ``first..end-1`` is one ``axvspan`` from ``(first - 0.5) / fps`` to
    ``(end - 0.5) / fps`` (half a frame either side of its frames), the first one labelled
    "speaker pause" for the legend.
  """
  truth = np.asarray(truth, dtype=np.float64)
  samples = np.asarray(samples, dtype=np.float64)
  speaker = np.asarray(speaker, dtype=np.float64)
  if truth.ndim != 2 or truth.shape[1] != MOTION_DIM:
    raise ValueError(f"truth: expected [frames, {MOTION_DIM}], got {truth.shape}")
  if samples.ndim != 3 or samples.shape[1:] != truth.shape:
    raise ValueError(f"samples: expected [samples, {truth.shape[0]}, {MOTION_DIM}], got "
                     f"{samples.shape}")
  if speaker.shape != truth.shape:
    raise ValueError(f"speaker: expected {truth.shape}, got {speaker.shape}")
  if fps <= 0:
    raise ValueError(f"fps must be positive, got {fps}")
  pauses = []
  if speaker_activity is not None:
    speaker_activity = np.asarray(speaker_activity, dtype=np.float64)
    if speaker_activity.shape != truth.shape[:1]:
      raise ValueError(f"speaker_activity: expected [{truth.shape[0]}], got "
                       f"{speaker_activity.shape}")
    pauses = pause_intervals(speaker_activity, pause_threshold)

  channels = trajectory_channels(expression_dims)
  seconds = np.arange(truth.shape[0]) / fps
  # Head pitch (nods) gets twice the height of the other panels; 1.05 in per other panel plus
  # room for the title, x label and legend keeps 7 channels at 9.6 in (was 12.8 in).
  ratios = [2.0] + [1.0] * (len(channels) - 1)
  fig = _new_figure((10.0, 1.05 * sum(ratios) + 1.2))
  axes = fig.subplots(len(channels), 1, sharex=True, squeeze=False,
                      height_ratios=ratios)[:, 0]
  colors = [f"C{i % 10}" for i in range(samples.shape[0])]
  for i, (ax, (title, col)) in enumerate(zip(axes, channels)):
    for j, (first, end) in enumerate(pauses):
      ax.axvspan((first - 0.5) / fps, (end - 0.5) / fps, color=PAUSE_COLOR, linewidth=0,
                 zorder=0, label=PAUSE_LABEL if i == 0 and j == 0 else "_nolegend_")
    ax.plot(seconds, truth[:, col], color="black", linewidth=1.8, label="ground-truth listener")
    for s in range(samples.shape[0]):
      ax.plot(seconds, samples[s, :, col], color=colors[s], linewidth=0.8, alpha=0.9,
              label=f"{method_name} sample {s + 1}")
    ax.plot(seconds, speaker[:, col], color="grey", linestyle="--", linewidth=1.0,
            label="speaker")
    ax.set_title(title, fontsize=9, loc="left", fontweight="bold" if i == 0 else "normal")
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
  if seconds.shape[0] > 1:
    axes[0].set_xlim(seconds[0], seconds[-1])  # Shared: no margins, pauses end at the edges.
  axes[-1].set_xlabel("time (s)")
  # Below the axes rather than inside one: a legend inside would hide part of the curves.
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside lower center", fontsize=8,
             ncol=min(6, len(handles)), frameon=False)
  fig.suptitle(f"Clip {clip_id}: {method_name} listener vs ground truth and speaker",
               fontsize=11)
  return fig


def plot_trajectories(path: str, *, clip_id: str, truth: Any, samples: Any, speaker: Any,
                      fps: float = 30.0, expression_dims: Sequence[int] = (0, 1, 2, 3),
                      method_name: str = "DIM-Listener", speaker_activity: Any = None,
                      dpi: float = 100.0) -> None:
  """Saves a PNG of listener trajectories (truth, each sample, speaker) per channel to ``path``.

  With ``speaker_activity`` ([T], see ``trajectory_figure``) the speaker's pauses are shaded.
  """
  fig = trajectory_figure(clip_id=clip_id, truth=truth, samples=samples, speaker=speaker, fps=fps,
                          expression_dims=expression_dims, method_name=method_name,
                          speaker_activity=speaker_activity)
  _save_png(fig, path, dpi)


def _metric_header(key: str) -> str:
  for column_key, header, _ in metric_columns():
    if column_key == key:
      return header
  return key


def metric_bars_figure(results: Results, protocol: str,
                       metrics: Sequence[str] = ("fd_expression", "mse_expression", "fd_pose",
                                                 "mse_pose", "pfd_expression",
                                                 "rpcc_expression")) -> Figure:
  """Builds the bar chart of ``metrics`` under ``protocol``: one subplot per metric.

  Each subplot has one bar per method that has the metric (in the results' order), error bars
  from std (multi-run rows only); the diagnostic row is hatched and faded, reference rows grey.
  """
  if not metrics:
    raise ValueError("metrics must name at least one metric")
  ncols = min(3, len(metrics))
  nrows = math.ceil(len(metrics) / ncols)
  fig = _new_figure((4.2 * ncols, 3.6 * nrows + 0.6))
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for ax, key in zip(axes, metrics):
    names, means, errors, styles = [], [], [], []
    for i, method in enumerate(results["methods"]):
      entry = _metric(method, protocol, key)
      if entry is None:
        continue
      std = entry.get("std") if int(method.get("runs", 1)) > 1 else None
      names.append(textwrap.fill(str(method["name"]), 22))
      means.append(float(entry["mean"]))
      # NaN draws no error bar at all (0 would still draw caps, suggesting a measured spread).
      errors.append(float(std) if std is not None else math.nan)
      styles.append((method.get("kind"), i))
    positions = np.arange(len(names))
    bars = ax.bar(positions, means, yerr=errors, capsize=3, color="C0", edgecolor="black",
                  linewidth=0.6)
    for bar, (kind, i) in zip(bars, styles):
      bar.set_facecolor(f"C{i % 10}")
      if kind == "diagnostic":
        bar.set_hatch("//")
        bar.set_alpha(0.45)
      elif kind == "reference":
        bar.set_facecolor("lightgrey")
    ax.set_xticks(positions, names, rotation=30, ha="right", rotation_mode="anchor", fontsize=7)
    ax.set_title(_metric_header(key), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
  for ax in axes[len(metrics):]:
    ax.set_visible(False)
  fig.suptitle(f"Metrics, protocol {protocol} (split {results.get('split', '?')})")
  return fig


def plot_metric_bars(path: str, results: Results, protocol: str,
                     metrics: Sequence[str] = ("fd_expression", "mse_expression", "fd_pose",
                                               "mse_pose", "pfd_expression", "rpcc_expression"),
                     dpi: float = 100.0) -> None:
  """Saves the bar chart of ``metric_bars_figure`` as a PNG at ``path``."""
  _save_png(metric_bars_figure(results, protocol, metrics), path, dpi)
