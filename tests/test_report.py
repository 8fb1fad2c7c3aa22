"""Tests for dim_jax.evaluation.report: Table-1 layout, report files, plots."""

import copy
import errno
import importlib.metadata
import json
import os

import matplotlib.image
from matplotlib.container import BarContainer
import numpy as np
import pytest

from dim_jax import files
from dim_jax.evaluation import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KEYS = [f"{m}_{p}" for m in ("fd", "pfd", "mse", "sid", "var", "rpcc", "sts")
        for p in ("expression", "pose")]
EXPECTED_HEADER = [
    "Method", "FD Exp ↓", "FD Pose ↓", "P-FD Exp ↓", "P-FD Pose ↓", "MSE Exp ↓", "MSE Pose ↓",
    "SID Exp", "SID Pose", "Var Exp", "Var Pose", "rPCC Exp ↓", "rPCC Pose ↓", "STS Exp ↓",
    "STS Pose ↓"]
LOWER_IS_BETTER = [k for k in KEYS if not k.startswith(("sid", "var"))]


def _metrics(scale, overrides=None, keys=KEYS, std=0.01):
  """Distinct values per key (so a column mix-up changes a cell), times ``scale``."""
  out = {k: {"mean": scale * (1.0 + 0.1 * i), "std": std, "values": []}
         for i, k in enumerate(keys)}
  for key, value in (overrides or {}).items():
    out[key] = value
  return out


def _results():
  model = _metrics(1.0, {"fd_expression": {"mean": 1.23, "std": 0.04, "values": [1.2, 1.23, 1.26]},
                         "fd_pose": {"mean": 0.5, "std": 0.01}})
  random = _metrics(2.0, {"fd_expression": {"mean": 2.0, "std": 0.0},
                          "fd_pose": {"mean": 0.3, "std": None}})
  mirror = _metrics(3.0, {"fd_expression": {"mean": 5.5}, "fd_pose": {"mean": 0.45}})
  mirror.pop("sts_pose")  # Absent metric for a non-reference row.
  truth = _metrics(1.5, {"sid_expression": {"mean": 5.03, "std": None}},
                   keys=["sid_expression", "sid_pose", "var_expression", "var_pose"])
  # The oracle beats everyone: it must still never be bold.
  oracle = _metrics(0.1, {"fd_expression": {"mean": 0.9, "std": 0.02}})
  per_seq = lambda m, f: {k: dict(v, mean=v["mean"] * f) for k, v in m.items()}
  rows = [("DIM-Listener", "model", 3, model), ("Random", "baseline", 1, random),
          ("Mirror", "baseline", 1, mirror), ("Ground truth", "reference", 1, truth),
          ("DIM-Listener best-of-N (oracle, diagnostic)", "diagnostic", 3, oracle)]
  return {
      "protocols": ["dim_compat", "per_sequence"],
      "headline_protocol": "dim_compat",
      "split": "test", "clips": 32, "frames": 12345,
      "settings": {"checkpoint": "ckpt/1000", "seeds": [0, 1, 2], "temperature": 1.0},
      "plots": ["plots/traj_clip0.png", "plots/bars_dim_compat.png"],
      "methods": [{"name": n, "kind": k, "runs": r, "note": f"{n} note",
                   "metrics": {"dim_compat": m, "per_sequence": per_seq(m, 7.0)}}
                  for n, k, r, m in rows],
  }


def _parse(table):
  lines = table.strip().splitlines()
  split = lambda line: [c.strip() for c in line.strip().strip("|").split(" | ")]
  assert set(lines[1].replace("|", "").replace(":", "").replace("-", "")) == set()
  return split(lines[0]), [split(line) for line in lines[2:]]


def test_table_header_follows_table_1_order():
  header, rows = _parse(report.format_table(_results(), "dim_compat"))
  assert header == EXPECTED_HEADER
  assert all(len(row) == len(header) for row in rows)
  assert [k for k, _, _ in report.metric_columns()] == KEYS


def test_table_cells_rows_and_missing():
  results = _results()
  header, rows = _parse(report.format_table(results, "dim_compat"))
  col = {h: i for i, h in enumerate(header)}
  assert [r[0] for r in rows] == ["DIM-Listener", "Random", "Mirror", "Ground truth",
                                  "*DIM-Listener best-of-N (oracle, diagnostic)*"]
  model, random, mirror, truth, oracle = rows
  assert model[col["FD Exp ↓"]] == "**1.230 ± 0.040**"
  assert model[col["FD Pose ↓"]] == "0.5000 ± 0.0100"  # std on the mean's decimals
  # Single run: no spread shown even when a std (0.0) is present.
  assert random[col["FD Exp ↓"]] == "2.000"
  assert random[col["FD Pose ↓"]] == "**0.3000**"
  assert mirror[col["STS Pose ↓"]] == "—"
  assert truth[col["SID Exp"]] == "5.030"
  assert all(truth[col[h]] == "—" for h in EXPECTED_HEADER
             if not h.startswith(("Method", "SID", "Var")))
  assert oracle[col["FD Exp ↓"]] == "0.9000 ± 0.0200"


def test_bold_marks_minimum_of_model_and_baseline_rows_only():
  results = _results()
  for protocol in results["protocols"]:
    header, rows = _parse(report.format_table(results, protocol))
    for key, head in zip(KEYS, EXPECTED_HEADER[1:]):
      j = header.index(head)
      bold = [i for i, row in enumerate(rows) if row[j].startswith("**")]
      if key not in LOWER_IS_BETTER:
        assert bold == [], head
        continue
      ranked = {i: m["metrics"][protocol][key]["mean"]
                for i, m in enumerate(results["methods"])
                if m["kind"] in ("model", "baseline") and key in m["metrics"][protocol]}
      assert bold == [min(ranked, key=ranked.get)], head
  # The oracle's 0.9 is the column minimum, the model's 1.23 is the bold one.
  assert report.best_methods(results, "dim_compat", "fd_expression") == {0}


def test_diagnostic_label_added_once():
  results = _results()
  results["methods"][4]["name"] = "best-of-10"
  _, rows = _parse(report.format_table(results, "dim_compat"))
  assert rows[4][0] == "*best-of-10 (oracle, diagnostic)*"
  _, rows = _parse(report.format_table(_results(), "dim_compat"))
  assert rows[4][0].count("(oracle, diagnostic)") == 1


@pytest.mark.parametrize("mean, std, expected", [
    (1.23, 0.04, "1.230 ± 0.040"),
    (72.88, None, "72.88"),
    (9.9996, None, "10.00"),
    (1.234e-5, 2e-6, "1.234e-05 ± 2.0e-06"),
    (2.5, 1e-6, "2.500 ± 1.0e-06"),  # A nonzero std never prints as 0.000.
    (0.0, None, "0.000"),
    (None, None, "—"),
    (float("nan"), None, "nan"),
])
def test_format_value(mean, std, expected):
  assert report.format_value(mean, std) == expected


def test_report_headline_first_links_and_settings():
  results = _results()
  results["headline_protocol"] = "per_sequence"  # Not the first listed: must still lead.
  text = report.format_report(results)
  head = text.index("## Headline protocol: `per_sequence`")
  other = text.index("## Other protocol: `dim_compat`")
  assert head < other
  assert text.index(report.format_table(results, "per_sequence")) == text.index("| Method", head)
  assert text.index(report.format_table(results, "dim_compat")) == text.index("| Method", other)
  assert "(oracle, diagnostic)" in text and "oracle" in text[:head]
  assert "lowest FD to the ground truth over all 56 dims" in text[:head]
  assert "validation split" in text[:head]
  assert "(plots/traj_clip0.png)" in text and "(plots/bars_dim_compat.png)" in text
  assert "- `checkpoint`: `ckpt/1000`" in text and "- `seeds`: `[0, 1, 2]`" in text
  assert text.index("## Plots") > other and text.index("## Settings") > other


def test_report_states_the_frame_alignment():
  results = _results()
  assert "Frames:" not in report.format_report(results)  # Not recorded: nothing claimed.
  for alignment, phrase in (("official", "listener frame t + 1 is scored against speaker "
                                         "frame t and listener frame 0"),
                            ("same_frame", "listener frame t is scored against speaker frame t")):
    results["settings"]["alignment"] = alignment
    text = report.format_report(results)
    assert phrase in text[:text.index("## Headline")], alignment


def test_variant_row_is_ranked_plain_and_explained_and_seams_are_reported():
  results = _results()
  variant = copy.deepcopy(results["methods"][0])
  variant.update(name="DIM-Listener (no ground truth)", kind="variant")
  variant["metrics"]["dim_compat"]["fd_expression"] = {"mean": 1.1, "std": 0.02}
  results["methods"].insert(1, variant)
  header, rows = _parse(report.format_table(results, "dim_compat"))
  assert rows[1][0] == "DIM-Listener (no ground truth)"  # neither italic nor relabelled
  # A variant competes for bold: its 1.1 beats the model's 1.23 (the oracle never counts).
  assert report.best_methods(results, "dim_compat", "fd_expression") == {1}
  assert rows[1][header.index("FD Exp ↓")].startswith("**")
  results["seams"] = {"window": 64, "overlap": 16, "seams": 40,
                      "expression": {"ratio": 1.234, "ratio_mean": 1.01},
                      "pose": {"ratio": 0.98, "ratio_mean": 0.97}}
  text = report.format_report(results)
  intro = text[:text.index("## Headline")]
  assert "Variant rows" in intro and "no ground truth" in intro
  assert ("Window seams (windows of 64 frames overlapping by 16, cross-faded)" in intro
          and "40 seams: expression 1.234 (whole seam 1.010), pose 0.9800" in intro)
  results["seams"] = {"window": 64, "overlap": 16, "seams": 0}
  assert "none, every clip fits one window" in report.format_report(results)
  del results["seams"]
  assert "Window seams" not in report.format_report(results)


def test_report_without_plots_has_no_plot_section():
  results = _results()
  del results["plots"]
  assert "## Plots" not in report.format_report(results)


def test_write_report_round_trips(tmp_path):
  results = _results()
  paths = report.write_report(str(tmp_path), results)
  assert paths == {"md": str(tmp_path / "report.md"), "json": str(tmp_path / "report.json")}
  assert "versions" not in results  # The caller's dict is not modified.
  with open(paths["json"]) as f:
    saved = json.load(f)
  saved.pop("versions")  # Added by write_report (test_report_json_records_library_versions).
  assert saved == results
  with open(paths["md"], encoding="utf-8") as f:
    assert f.read() == report.format_report(results)
  assert sorted(os.listdir(tmp_path)) == ["report.json", "report.md"]


def test_report_json_records_library_versions(tmp_path):
  # k-means (SID) moves between scikit-learn releases, sqrtm / eigh (FD) between SciPy /
  # NumPy / BLAS builds: report.json must say which ones produced its numbers.
  paths = report.write_report(str(tmp_path), _results())
  with open(paths["json"]) as f:
    versions = json.load(f)["versions"]
  for name in ("scikit-learn", "scipy", "numpy"):
    assert versions[name] == importlib.metadata.version(name), name
  assert versions == files.library_versions()
  # A caller's own record is kept, not overwritten.
  results = dict(_results(), versions={"numpy": "from the run"})
  with open(report.write_report(str(tmp_path), results)["json"]) as f:
    assert json.load(f)["versions"] == {"numpy": "from the run"}


def _read_all(directory):
  return {name: open(os.path.join(directory, name), "rb").read()
          for name in sorted(os.listdir(directory))}


def test_write_report_failure_keeps_previous_pair(tmp_path, monkeypatch):
  report.write_report(str(tmp_path), _results())
  before = _read_all(tmp_path)
  changed = copy.deepcopy(_results())
  changed["clips"] = 99

  # Fail while writing the second temp file: the first must not have replaced its target yet.
  calls = []
  real_fsync = os.fsync

  def failing_fsync(fd):
    calls.append(fd)
    if len(calls) == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    real_fsync(fd)

  monkeypatch.setattr(os, "fsync", failing_fsync)
  # files.write_temp turns it into one line naming the file and what to do.
  with pytest.raises(files.OutputError, match=r"report\.md: the disk is full"):
    report.write_report(str(tmp_path), changed)
  assert len(calls) == 2
  assert _read_all(tmp_path) == before  # Same files, same bytes, no temp left.
  monkeypatch.undo()

  def failing_dumps(*args, **kwargs):
    raise TypeError("boom")

  monkeypatch.setattr(report.json, "dumps", failing_dumps)
  with pytest.raises(TypeError, match="boom"):
    report.write_report(str(tmp_path), changed)
  assert _read_all(tmp_path) == before


def _motion(rng, *shape):
  return rng.normal(size=shape + (56,)).astype(np.float32)


def test_trajectory_figure_plots_given_data():
  rng = np.random.default_rng(0)
  frames, num_samples, fps = 40, 3, 25.0
  truth, speaker = _motion(rng, frames), _motion(rng, frames)
  samples = _motion(rng, num_samples, frames)
  fig = report.trajectory_figure(clip_id="clip_7", truth=truth, samples=samples, speaker=speaker,
                                 fps=fps, expression_dims=(1, 3), method_name="DIM-Listener")
  axes = fig.axes
  assert len(axes) == 5
  titles = [ax.get_title(loc="left") for ax in axes]
  # Head pitch first: it is where the listener's nods show.
  assert titles == ["head pitch (col 0): nods", "expression 1 (col 7)", "expression 3 (col 9)",
                    "head yaw (col 1)", "head roll (col 2)"]
  assert "clip_7" in fig.get_suptitle()
  seconds = np.arange(frames) / fps
  for ax, col in zip(axes, (0, 7, 9, 1, 2)):
    assert not ax.patches  # No speaker_activity: no pause shading.
    lines = ax.get_lines()
    truth_line = [l for l in lines if l.get_label() == "ground-truth listener"]
    sample_lines = [l for l in lines if l.get_label().startswith("DIM-Listener sample")]
    speaker_line = [l for l in lines if l.get_label() == "speaker"]
    assert len(truth_line) == 1 and len(speaker_line) == 1
    assert len(sample_lines) == num_samples
    np.testing.assert_allclose(truth_line[0].get_xdata(), seconds)
    np.testing.assert_allclose(truth_line[0].get_ydata(), truth[:, col], rtol=1e-6)
    assert truth_line[0].get_color() == "black"
    for s, line in enumerate(sample_lines):
      assert line.get_label() == f"DIM-Listener sample {s + 1}"
      np.testing.assert_allclose(line.get_ydata(), samples[s, :, col], rtol=1e-6)
    np.testing.assert_allclose(speaker_line[0].get_ydata(), speaker[:, col], rtol=1e-6)
    assert speaker_line[0].get_linestyle() == "--"


def test_trajectory_figure_rejects_bad_shapes():
  rng = np.random.default_rng(0)
  truth = _motion(rng, 10)
  with pytest.raises(ValueError, match="samples"):
    report.trajectory_figure(clip_id="c", truth=truth, samples=_motion(rng, 2, 9), speaker=truth)
  with pytest.raises(ValueError, match="expression dim 50"):
    report.trajectory_figure(clip_id="c", truth=truth, samples=truth[None], speaker=truth,
                             expression_dims=(50,))


def _span_x(patch):
  """(left, right) data x of an axvspan patch (a Rectangle, or a Polygon before matplotlib 3.9)."""
  xs = patch.get_patch_transform().transform(patch.get_path().vertices)[:, 0]
  return xs.min(), xs.max()


def test_trajectory_figure_shades_speaker_pauses_on_every_panel():
  rng = np.random.default_rng(2)
  frames, fps = 40, 25.0
  truth, speaker = _motion(rng, frames), _motion(rng, frames)
  activity = np.ones(frames)
  activity[0:3] = 0.0    # A pause at the clip's start,
  activity[10:15] = 0.2  # one inside (below the 0.5 threshold),
  activity[20:22] = 0.6  # not a pause (above it),
  activity[37:] = 0.0    # and one running to the end.
  expected = [(0, 3), (10, 15), (37, 40)]
  assert report.pause_intervals(activity) == expected
  fig = report.trajectory_figure(clip_id="c", truth=truth, samples=_motion(rng, 2, frames),
                                 speaker=speaker, fps=fps, speaker_activity=activity)
  assert len(fig.axes) == 7
  for i, ax in enumerate(fig.axes):
    assert len(ax.patches) == len(expected), ax.get_title(loc="left")
    for patch, (first, end) in zip(ax.patches, expected):
      np.testing.assert_allclose(_span_x(patch), ((first - 0.5) / fps, (end - 0.5) / fps))
      assert patch.get_zorder() < min(line.get_zorder() for line in ax.get_lines())
    labels = [patch.get_label() for patch in ax.patches]
    assert labels.count("speaker pause") == (1 if i == 0 else 0)
  legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
  assert legend_texts.count("speaker pause") == 1
  with pytest.raises(ValueError, match="speaker_activity"):
    report.trajectory_figure(clip_id="c", truth=truth, samples=truth[None], speaker=speaker,
                             speaker_activity=activity[:-1])


def test_speech_activity_from_jaw_matches_synthetic_speech():
  from dim_jax.data import synthetic
  clip = synthetic.generate_clip(np.random.default_rng(0), 300, return_latents=True)
  speaking = clip["latents"]["speaking"]
  assert 0.1 < speaking.mean() < 0.9  # The clip has both speech and pauses.
  activity = report.speech_activity_from_jaw(clip["speaker_motion"], clip["fps"])
  assert activity.shape == (300,) and set(np.unique(activity)) <= {0.0, 1.0}
  assert (activity == speaking).mean() >= 0.85
  # Jaw range, relative threshold: a jaw offset (held open) and a scale (normalised data) do
  # not change the answer.
  moved = np.array(clip["speaker_motion"], dtype=np.float64)
  moved[:, 3] = 3.0 * moved[:, 3] + 0.7
  np.testing.assert_array_equal(report.speech_activity_from_jaw(moved, clip["fps"]), activity)
  # A jaw that never moves tells nothing: no frame is called a pause.
  moved[:, 3] = 0.1
  np.testing.assert_array_equal(report.speech_activity_from_jaw(moved, 30.0), np.ones(300))


def _check_png(path, width, height):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  image = matplotlib.image.imread(path)
  assert abs(image.shape[0] - height) <= 2 and abs(image.shape[1] - width) <= 2, image.shape
  # Not a blank canvas: something was drawn.
  assert image[..., :3].std() > 0.01


def test_plot_trajectories_writes_png(tmp_path):
  rng = np.random.default_rng(1)
  path = tmp_path / "traj.png"
  report.plot_trajectories(str(path), clip_id="clip_0", truth=_motion(rng, 30),
                           samples=_motion(rng, 2, 30), speaker=_motion(rng, 30))
  # Pitch (double height) + 4 expression + yaw + roll: 10 x (1.05 * 8 + 1.2) inches at dpi 100.
  _check_png(path, 1000, 960)
  assert os.listdir(tmp_path) == ["traj.png"]


def test_metric_bars_figure_values_and_styles():
  results = _results()
  fig = report.metric_bars_figure(results, "dim_compat", ("fd_expression", "sid_expression"))
  fd_ax, sid_ax = fig.axes
  fd = results["methods"]
  fd_rows = [m for m in fd if "fd_expression" in m["metrics"]["dim_compat"]]
  bars, = [c for c in fd_ax.containers if isinstance(c, BarContainer)]
  assert len(bars) == len(fd_rows) == 4  # The reference row has no FD.
  np.testing.assert_allclose([b.get_height() for b in bars],
                             [m["metrics"]["dim_compat"]["fd_expression"]["mean"]
                              for m in fd_rows])
  assert [t.get_text().replace("\n", " ") for t in fd_ax.get_xticklabels()] == [
      m["name"] for m in fd_rows]
  assert [b.get_hatch() for b in bars] == [None, None, None, "//"]
  # Error bars span 2 std for multi-run rows (model, oracle), none for single runs.
  errorbar, = [c for c in fd_ax.containers if not isinstance(c, BarContainer)]
  segments = errorbar.lines[2][0].get_segments()
  drawn = [seg for seg in segments if len(seg) == 2 and np.isfinite(seg).all()]
  spans = {round(seg[0][0]): seg[1][1] - seg[0][1] for seg in drawn}
  assert spans == pytest.approx({0: 0.08, 3: 0.04})
  sid_bars, = [c for c in sid_ax.containers if isinstance(c, BarContainer)]
  assert len(sid_bars) == 5  # Ground truth has SID.
  assert sid_bars[3].get_facecolor()[:3] == pytest.approx((0.827, 0.827, 0.827), abs=1e-3)


def test_plot_metric_bars_writes_png(tmp_path):
  path = tmp_path / "bars.png"
  report.plot_metric_bars(str(path), _results(), "per_sequence",
                          metrics=("fd_expression", "rpcc_pose"))
  _check_png(path, 840, 420)  # 2 subplots: (4.2 * 2) x (3.6 + 0.6) inches at dpi 100.
  assert os.listdir(tmp_path) == ["bars.png"]
