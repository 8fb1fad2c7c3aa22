"""Phase `evaluate` on prediction files (no model needed): rows, protocol, report, bad input.

The model path (init.model) is exercised in tests/test_dim.py next to the generate phase,
whose trained fixture it shares.
"""

import json
import os

import numpy as np
import pytest

from dim_jax import config_lib, files, phases
from dim_jax.data import records, synthetic
from dim_jax.evaluation import evaluate
from dim_jax.evaluation import metrics as metrics_lib

NUM_SAMPLES = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("eval_data"))
  synthetic.write_synthetic_dataset(path, seed=3, num_train=16, num_val=4, num_test=6,
                                    min_len=30, max_len=50)
  return path


@pytest.fixture(scope="module")
def test_clips(data_dir):
  return records.read_clips(data_dir, "test")


def write_predictions(directory, clips, make):
  """sample_<k>/<clip>.npy files, as the generate phase writes them; make(k, clip) -> array."""
  for k in range(NUM_SAMPLES):
    os.makedirs(os.path.join(directory, f"sample_{k}"), exist_ok=True)
    for clip in clips:
      np.save(os.path.join(directory, f"sample_{k}", files.clip_filename(clip["clip_id"])),
              make(k, clip))
  return directory


def noisy(k, clip):
  rng = np.random.default_rng([k, int(clip["clip_id"].split("-")[-1])])
  truth = clip["listener_motion"]
  return (truth + 0.05 * (k + 1) * rng.standard_normal(truth.shape)).astype(np.float32)


def eval_config(data_dir, predictions, **overrides):
  config = config_lib.evaluate_config()
  config.data.dir = data_dir
  config.evaluate.predictions = predictions
  config.evaluate.method_name = "Noisy truth"
  config.evaluate.num_seeds = 2
  config.evaluate.best_of = 3
  config.evaluate.plot_clips = 1
  for key, value in overrides.items():
    config.evaluate[key] = value
  return config


@pytest.fixture(scope="module")
def evaluated(data_dir, test_clips, tmp_path_factory):
  root = tmp_path_factory.mktemp("evaluated")
  predictions = write_predictions(str(root / "predictions"), test_clips, noisy)
  workdir = str(root / "eval")
  results = phases.run(eval_config(data_dir, predictions), workdir)
  return dict(results=results, workdir=workdir, predictions=predictions)


def _row(results, name):
  return next(m for m in results["methods"] if m["name"] == name)


def test_rows_are_the_method_its_oracle_and_the_four_baselines(evaluated):
  rows = {m["name"]: m for m in evaluated["results"]["methods"]}
  assert list(rows) == ["Ground truth", "Noisy truth", "Noisy truth best-of-3 (oracle, diagnostic)",
                        "Random", "Mirror", "NN-motion", "NN-audio"]
  assert rows["Noisy truth"]["kind"] == "model" and rows["Noisy truth"]["runs"] == 2
  assert rows["Random"]["runs"] == 2  # the Random baseline runs over the same seeds
  assert rows["Mirror"]["runs"] == 1
  assert rows["Noisy truth best-of-3 (oracle, diagnostic)"]["kind"] == "diagnostic"
  assert set(rows["Ground truth"]["metrics"]["dim_compat"]) == {
      "sid_expression", "sid_pose", "var_expression", "var_pose"}


def test_model_row_is_mean_and_std_over_seeds_of_the_metric_library(evaluated, test_clips):
  truth, lengths = evaluate.pad_clips([c["listener_motion"] for c in test_clips])
  speaker, _ = evaluate.pad_clips([c["speaker_motion"] for c in test_clips])
  clusters = metrics_lib.fit_clusters(truth, lengths)
  row = _row(evaluated["results"], "Noisy truth")
  for protocol in ("dim_compat", "per_sequence"):
    per_seed = [metrics_lib.listener_metrics(
        truth, evaluate.pad_clips([noisy(k, c) for c in test_clips])[0], speaker, lengths,
        protocol=protocol, clusters=clusters) for k in range(2)]
    for key in ("fd_expression", "mse_pose", "sid_expression", "rpcc_expression", "sts_pose"):
      values = [m[key] for m in per_seed]
      got = row["metrics"][protocol][key]
      np.testing.assert_allclose(got["values"], values, rtol=1e-6)
      np.testing.assert_allclose(got["mean"], np.mean(values), rtol=1e-6)
      np.testing.assert_allclose(got["std"], np.std(values, ddof=1), rtol=1e-6)


def test_best_of_is_the_per_clip_oracle(evaluated):
  rows = {m["name"]: m for m in evaluated["results"]["methods"]}
  # Sample 0 has the smallest noise on every clip, so the oracle is sample 0 and beats the
  # single-sample mean (which averages samples 0 and 1).
  oracle = rows["Noisy truth best-of-3 (oracle, diagnostic)"]["metrics"]["dim_compat"]
  single = rows["Noisy truth"]["metrics"]["dim_compat"]
  np.testing.assert_allclose(oracle["mse_expression"]["mean"],
                             single["mse_expression"]["values"][0], rtol=1e-6)
  assert oracle["mse_expression"]["mean"] < single["mse_expression"]["mean"]


def test_best_of_samples_picks_lowest_error_per_clip():
  truth = np.zeros((2, 4, 56), np.float32)
  samples = np.stack([np.full((2, 4, 56), v, np.float32) for v in (3.0, 1.0, 2.0)])
  samples[2, 0] = 0.1  # clip 0: sample 2 is closest
  samples[0, 1] = 0.5  # clip 1 (2 valid frames): sample 1 is closest on its valid frames...
  samples[1, 1] = 0.2
  samples[1, 1, 2:] = 100.0  # ...its large values lie only in padded frames, which don't count
  best = evaluate.best_of_samples(samples, truth, np.array([4, 2]))
  np.testing.assert_array_equal(best[0], samples[2, 0])
  np.testing.assert_array_equal(best[1], samples[1, 1])


def test_report_files_and_plots(evaluated):
  workdir = evaluated["workdir"]
  text = open(os.path.join(workdir, "report.md"), encoding="utf-8").read()
  assert "| Noisy truth |" in text and "oracle, diagnostic" in text and "NN-audio" in text
  saved = json.load(open(os.path.join(workdir, "report.json")))
  assert saved["methods"][1]["metrics"]["dim_compat"]["fd_expression"]["mean"] == pytest.approx(
      evaluated["results"]["methods"][1]["metrics"]["dim_compat"]["fd_expression"]["mean"])
  assert saved["plots"] and all(p.endswith(".png") for p in saved["plots"])
  for plot in saved["plots"]:
    with open(os.path.join(workdir, plot), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert plot in text  # linked from the report


def test_perfect_predictions_score_zero(data_dir, test_clips, tmp_path):
  predictions = write_predictions(str(tmp_path / "exact"), test_clips,
                                  lambda k, clip: clip["listener_motion"])
  results = phases.run(eval_config(data_dir, predictions, baselines=(), best_of=0),
                       str(tmp_path / "eval"))
  row = _row(results, "Noisy truth")["metrics"]
  for protocol in ("dim_compat", "per_sequence"):
    for key in ("fd_expression", "fd_pose", "pfd_expression", "mse_expression", "rpcc_pose",
                "sts_expression"):
      assert abs(row[protocol][key]["mean"]) < 1e-6, (protocol, key)
    reference = _row(results, "Ground truth")["metrics"][protocol]
    assert row[protocol]["sid_expression"]["mean"] == pytest.approx(
        reference["sid_expression"]["mean"])


@pytest.mark.parametrize("case, message", [
    ("short", r"shape \(\d+, 56\).*needs \(\d+, 56\)"),
    ("narrow", r"shape \(\d+, 50\)"),
    ("nan", "NaN|non-finite|not finite"),
    ("missing", "no prediction for clip"),
    ("pickle", "not a plain .npy"),
])
def test_bad_prediction_files_name_the_clip(data_dir, test_clips, tmp_path, case, message):
  bad = test_clips[2]

  def make(k, clip):
    motion = clip["listener_motion"].copy()
    if clip is bad and case == "short":
      return motion[:-3]
    if clip is bad and case == "narrow":
      return motion[:, :50]
    if clip is bad and case == "nan":
      motion[5, 10] = np.nan
    return motion

  predictions = write_predictions(str(tmp_path / "p"), test_clips, make)
  path = os.path.join(predictions, "sample_1", files.clip_filename(bad["clip_id"]))
  if case == "missing":
    os.remove(path)
  elif case == "pickle":
    np.save(path, np.array([{"not": "an array"}], dtype=object), allow_pickle=True)
  with pytest.raises((metrics_lib.MetricInputError, FileNotFoundError), match=message) as info:
    phases.run(eval_config(data_dir, predictions, baselines=()), str(tmp_path / "eval"))
  assert bad["clip_id"] in str(info.value) or files.clip_filename(bad["clip_id"]) in str(
      info.value)
  assert not os.path.exists(tmp_path / "eval" / "report.md")  # nothing half-written


def test_config_errors(data_dir, tmp_path):
  config = eval_config(data_dir, "")
  with pytest.raises(ValueError, match="init.model"):
    phases.run(config, str(tmp_path / "a"))
  for key, value, message in (("num_seeds", 0, "num_seeds"), ("best_of", 1, "best_of"),
                              ("baselines", ("oracle",), "unknown"),
                              ("protocols", ("pooled",), "protocols")):
    config = eval_config(data_dir, str(tmp_path / "none"), **{key: value})
    with pytest.raises(ValueError, match=message):
      phases.run(config, str(tmp_path / "b"))
