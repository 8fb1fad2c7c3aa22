"""Loop-based transcription of the official DIM metrics, for tests only.

Transcribed from Boese0601/Dyadic-Interaction-Modeling ``code/metrics/eval_utils.py``
(`calculate_activation_statistics`, `calculate_frechet_distance`, `calcuate_sid`, `sts`) and
``code/mymetrics.py`` (`print_metrics`, `print_biwi_metrics`), with printing replaced by
returned dicts and the BiWi data files replaced by arguments. Inputs are lists of unpadded
clips ``[L, 56]`` (vertex clips ``[L, V, 3]``), as in the official code. Deliberately slow and
literal: it is the reference that tests/test_metrics.py derives its golden constants from.

Regenerate the golden constants with ``python tests/helpers/official_metrics.py``.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg
from sklearn.cluster import KMeans

GOLDEN_LENGTHS = (20, 33, 27, 40, 24, 31)
GOLDEN_FRAMES = 44  # Padded length T > max(GOLDEN_LENGTHS).
VERTEX_LENGTHS = (5, 9, 7, 12)
VERTEX_FRAMES = 14
NUM_VERTICES = 30
LIP_INDICES = (2, 3, 5, 8, 13, 21)
UPPER_INDICES = (0, 1, 4, 9, 10, 17, 25, 29)


# --- eval_utils.py ---------------------------------------------------------------------


def calculate_activation_statistics(activations):
  mu = np.mean(activations, axis=0)
  cov = np.cov(activations, rowvar=False)
  return mu, cov


def calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
  mu1 = np.atleast_1d(mu1)
  mu2 = np.atleast_1d(mu2)
  sigma1 = np.atleast_2d(sigma1)
  sigma2 = np.atleast_2d(sigma2)
  assert mu1.shape == mu2.shape
  assert sigma1.shape == sigma2.shape
  diff = mu1 - mu2
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # scipy's sqrtm `disp` deprecation / singular warnings.
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
      offset = np.eye(sigma1.shape[0]) * eps
      covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      m = np.max(np.abs(covmean.imag))
      raise ValueError("Imaginary component {}".format(m))
    covmean = covmean.real
  tr_covmean = np.trace(covmean)
  return (diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def official_entropy(pred_labels, k):
  """The histogram + entropy loop of `calcuate_sid`."""
  hist_cnt = [0] * k
  for i in range(len(pred_labels)):
    hist_cnt[pred_labels[i]] += 1
  hist_cnt = np.array(hist_cnt)
  hist_cnt = hist_cnt / np.sum(hist_cnt)
  entropy = 0
  eps = 1e-6
  for i in range(k):
    entropy += hist_cnt[i] * np.log2(hist_cnt[i] + eps)
  return -entropy


def fit_kmeans(gt, type="exp"):  # pylint: disable=redefined-builtin
  k = 40 if type == "exp" else 20
  merge_gt = np.concatenate(gt, axis=0)
  merge_gt = merge_gt[:, 6:] if type == "exp" else merge_gt[:, :6]
  return KMeans(n_clusters=k, random_state=0, n_init="auto").fit(merge_gt), k


def predict_labels(kmeans, pred, type="exp"):  # pylint: disable=redefined-builtin
  merge_pred = np.concatenate(pred, axis=0)
  merge_pred = merge_pred[:, 6:] if type == "exp" else merge_pred[:, :6]
  return kmeans.predict(merge_pred)


def calcuate_sid(gt, pred, type="exp"):  # pylint: disable=redefined-builtin
  kmeans_gt, k = fit_kmeans(gt, type)
  return official_entropy(predict_labels(kmeans_gt, pred, type), k)


def sts(x, y, timestep=0.1):
  ans = 0
  total_sample, dim = x.shape
  for di in range(dim):
    for i in range(1, total_sample):
      ans += ((x[i][di] - x[i - 1][di]) - (y[i][di] - y[i - 1][di]))**2 / timestep
  return np.sqrt(ans)


# --- mymetrics.py ------------------------------------------------------------------------


def _fd_mean(gt, pred, sl):
  fids = []
  for i in range(len(gt)):
    mu1, sigma1 = calculate_activation_statistics(gt[i][:, sl])
    mu2, sigma2 = calculate_activation_statistics(pred[i][:, sl])
    fids.append(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))
  return np.mean(fids)


def _pfd_mean(gt, pred, x, sl):
  pfids = []
  for i in range(len(gt)):
    gt_mu2, gt_cov2 = calculate_activation_statistics(
        np.concatenate([x[i][:, sl], gt[i][:, sl]], axis=-1))
    mu2, cov2 = calculate_activation_statistics(
        np.concatenate([x[i][:, sl], pred[i][:, sl]], axis=-1))
    pfids.append(calculate_frechet_distance(gt_mu2, gt_cov2, mu2, cov2))
  return np.mean(pfids)


def _mse_mean(gt, pred, sl):
  total_l2 = []
  for i in range(len(gt)):
    total_l2.append(np.mean((gt[i][:, sl] - pred[i][:, sl])**2))
  return np.mean(total_l2)


def print_metrics(y_true, y_pred, x, sid_labels=None):
  """`print_metrics` returning a dict (our key names) instead of printing.

  Also returns the GT row (``gt_sid_*``, ``gt_var_*``). ``sid_labels`` optionally maps
  ``"exp"/"pose"`` to ``(kmeans, k)`` fitted elsewhere (for the per-clip loop, where the
  clusters come from all clips), instead of refitting on ``y_true``.
  """
  gt = y_true
  pred = y_pred
  out = {}
  pose, exp = slice(0, 6), slice(6, None)
  out["fd_pose"] = _fd_mean(gt, pred, pose)
  out["fd_expression"] = _fd_mean(gt, pred, exp)
  out["pfd_pose"] = _pfd_mean(gt, pred, x, pose)
  out["pfd_expression"] = _pfd_mean(gt, pred, x, exp)
  out["mse_pose"] = _mse_mean(gt, pred, pose)
  out["mse_expression"] = _mse_mean(gt, pred, exp)
  for name, type_ in (("pose", "pose"), ("expression", "exp")):
    if sid_labels is None:
      out[f"sid_{name}"] = calcuate_sid(gt, pred, type=type_)
      out[f"gt_sid_{name}"] = calcuate_sid(gt, gt, type=type_)
    else:
      kmeans, k = sid_labels[type_]
      out[f"sid_{name}"] = official_entropy(predict_labels(kmeans, pred, type_), k)
      out[f"gt_sid_{name}"] = official_entropy(predict_labels(kmeans, gt, type_), k)

  gt = np.concatenate(gt, axis=0).reshape(-1, 56)
  pred = np.concatenate(pred, axis=0).reshape(-1, 56)
  out["gt_var_pose"] = np.var(gt[:, 0:6].reshape(-1,))
  out["var_pose"] = np.var(pred[:, 0:6].reshape(-1,))
  out["gt_var_expression"] = np.var(gt[:, 6:].reshape(-1,))
  out["var_expression"] = np.var(pred[:, 6:].reshape(-1,))

  x = np.concatenate(x, axis=0)
  x = x[:, 0:56]
  pcc_xy_pose = np.corrcoef(gt[:, 0:6].reshape(-1,), x[:, 0:6].reshape(-1,))[0, 1]
  pcc_xy_exp = np.corrcoef(gt[:, 6:].reshape(-1,), x[:, 6:].reshape(-1,))[0, 1]
  pcc_xypred_pose = np.corrcoef(pred[:, 0:6].reshape(-1,), x[:, 0:6].reshape(-1,))[0, 1]
  pcc_xypred_exp = np.corrcoef(pred[:, 6:].reshape(-1,), x[:, 6:].reshape(-1,))[0, 1]
  out["rpcc_pose"] = abs(pcc_xy_pose - pcc_xypred_pose)
  out["rpcc_expression"] = abs(pcc_xy_exp - pcc_xypred_exp)

  out["sts_pose"] = sts(gt[:, 0:6], pred[:, 0:6])
  out["sts_expression"] = sts(gt[:, 6:], pred[:, 6:])
  return {k: float(v) for k, v in out.items()}


def print_metrics_per_clip(y_true, y_pred, x):
  """Per-clip loop: `print_metrics` on each clip alone, SID over clusters of all clips; mean."""
  sid_labels = {t: fit_kmeans(y_true, t) for t in ("exp", "pose")}
  rows = [print_metrics([g], [p], [s], sid_labels) for g, p, s in zip(y_true, y_pred, x)]
  return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def print_biwi_metrics(y_true, y_pred, templates, mouth_map, upper_map):
  """`print_biwi_metrics` with per-clip templates and vertex maps passed in: (lve, fdd)."""
  num_vertices = templates[0].shape[0]
  vertices_gt_all = []
  vertices_pred_all = []
  motion_std_difference = []
  for i in range(len(y_true)):
    vertices_gt = y_true[i].reshape(-1, num_vertices, 3)
    vertices_pred = y_pred[i].reshape(-1, num_vertices, 3)
    vertices_pred = vertices_pred[:vertices_gt.shape[0], :, :]
    motion_pred = vertices_pred - templates[i].reshape(1, num_vertices, 3)
    motion_gt = vertices_gt - templates[i].reshape(1, num_vertices, 3)
    vertices_gt_all.extend(list(vertices_gt))
    vertices_pred_all.extend(list(vertices_pred))

    l2_dis_upper = np.array([np.square(motion_gt[:, v, :]) for v in upper_map])
    l2_dis_upper = np.transpose(l2_dis_upper, (1, 0, 2))
    l2_dis_upper = np.sum(l2_dis_upper, axis=2)
    l2_dis_upper = np.std(l2_dis_upper, axis=0)
    gt_motion_std = np.mean(l2_dis_upper)

    l2_dis_upper = np.array([np.square(motion_pred[:, v, :]) for v in upper_map])
    l2_dis_upper = np.transpose(l2_dis_upper, (1, 0, 2))
    l2_dis_upper = np.sum(l2_dis_upper, axis=2)
    l2_dis_upper = np.std(l2_dis_upper, axis=0)
    pred_motion_std = np.mean(l2_dis_upper)
    motion_std_difference.append(gt_motion_std - pred_motion_std)

  vertices_gt_all = np.array(vertices_gt_all)
  vertices_pred_all = np.array(vertices_pred_all)
  l2_dis_mouth_max = np.array([np.square(vertices_gt_all[:, v, :] - vertices_pred_all[:, v, :])
                               for v in mouth_map])
  l2_dis_mouth_max = np.transpose(l2_dis_mouth_max, (1, 0, 2))
  l2_dis_mouth_max = np.sum(l2_dis_mouth_max, axis=2)
  l2_dis_mouth_max = np.max(l2_dis_mouth_max, axis=1)
  lve = np.mean(l2_dis_mouth_max)
  fdd = sum(motion_std_difference) / len(motion_std_difference)
  return float(lve), float(fdd)


# --- golden inputs -----------------------------------------------------------------------


def golden_motion():
  """Fixed clips: lists (truth, prediction, speaker) of unpadded float64 ``[L, 56]``.

  Smooth random walks with per-dimension scales, the prediction correlated with the truth,
  the speaker correlated with both (so every metric is non-trivial).
  """
  rng = np.random.default_rng(20240607)
  scale = np.concatenate([np.full(6, 0.2), np.linspace(0.3, 1.5, 50)])
  truth, prediction, speaker = [], [], []

  def walk(length):
    return np.cumsum(rng.normal(size=(length, 56)), axis=0) * 0.3 * scale

  for length in GOLDEN_LENGTHS:
    sp = walk(length) + rng.normal(size=56)
    gt = 0.4 * sp + walk(length)
    pred = 0.6 * gt + 0.3 * walk(length) + 0.05 * rng.normal(size=(length, 56))
    truth.append(gt)
    prediction.append(pred)
    speaker.append(sp)
  return truth, prediction, speaker


def golden_vertices():
  """Fixed vertex clips: lists (truth, prediction) of ``[L, V, 3]`` and templates ``[V, 3]``."""
  rng = np.random.default_rng(777)
  truth, prediction, templates = [], [], []
  for length in VERTEX_LENGTHS:
    template = rng.normal(size=(NUM_VERTICES, 3))
    gt = template + 0.1 * np.cumsum(rng.normal(size=(length, NUM_VERTICES, 3)), axis=0)
    pred = gt + 0.05 * rng.normal(size=gt.shape)
    truth.append(gt)
    prediction.append(pred)
    templates.append(template)
  return truth, prediction, templates


def golden_values() -> dict[str, float]:
  """Every golden constant of tests/test_metrics.py, from this transcription."""
  truth, prediction, speaker = golden_motion()
  out = {f"dim_compat/{k}": v for k, v in print_metrics(truth, prediction, speaker).items()}
  vt, vp, templates = golden_vertices()
  lve, fdd = print_biwi_metrics(vt, vp, templates, LIP_INDICES, UPPER_INDICES)
  out["lve"] = lve
  out["fdd"] = fdd
  return out


if __name__ == "__main__":
  for key, value in golden_values().items():
    print(f"    {key!r}: {value!r},")
