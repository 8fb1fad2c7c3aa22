"""Tests of the DIM listener metrics (dim_jax/evaluation/metrics.py)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from dim_jax.evaluation import metrics

_HELPER = os.path.join(os.path.dirname(__file__), "helpers", "official_metrics.py")
_spec = importlib.util.spec_from_file_location("official_metrics", _HELPER)
official = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(official)

# Golden values of the official formulas on official.golden_motion() / golden_vertices(),
# computed by the loop-based transcription tests/helpers/official_metrics.py (scipy sqrtm FD,
# sklearn KMeans SID, the official `sts` double loop and BiWi loops). Regenerate with
# `python tests/helpers/official_metrics.py` (only if the golden inputs change on purpose).
GOLDEN = {
    "dim_compat/fd_pose": 0.1862991358728059,
    "dim_compat/fd_expression": 19.979528746083762,
    "dim_compat/pfd_pose": 0.1908126933512745,
    "dim_compat/pfd_expression": 20.147469584657912,
    "dim_compat/mse_pose": 0.03472496629852038,
    "dim_compat/mse_expression": 0.40101314414905476,
    "dim_compat/sid_pose": 3.9986321837263143,
    "dim_compat/gt_sid_pose": 4.212855589698221,
    "dim_compat/sid_expression": 4.552288584984309,
    "dim_compat/gt_sid_expression": 5.2477218239138335,
    "dim_compat/gt_var_pose": 0.22010457501608932,
    "dim_compat/var_pose": 0.10199908880199346,
    "dim_compat/gt_var_expression": 1.9497867992864357,
    "dim_compat/var_expression": 0.883459854127542,
    "dim_compat/rpcc_pose": 0.0013387683393746297,
    "dim_compat/rpcc_expression": 0.027442009271947843,
    "dim_compat/sts_pose": 9.117999765556375,
    "dim_compat/sts_expression": 66.10163981357468,
    "lve": 0.015163790986552048,
    "fdd": -0.004426371223656847,
}
# Tolerances. These values go through LAPACK/BLAS (sqrtm, eigh, matmul in np.cov and our
# moments, k-means) and numpy's SIMD loops, whose rounding changes with the CPU, the BLAS build
# and its thread count. Each tolerance is an error bound of the computation with a margin, not
# the last bits one machine produced; checked with OPENBLAS_CORETYPE=Haswell / Sandybridge /
# Nehalem / Prescott, OPENBLAS_NUM_THREADS=1 and NPY_DISABLE_CPU_FEATURES=X86_V3.
GOLDEN_RTOL = {
    # scipy sqrtm of the singular covariances of these short clips (20..40 frames < 50 / 100
    # features) is off by ~3e-7 relative, by an amount that moves with the BLAS (1.5e-8 between
    # OpenBLAS kernels); ours is exact (test_fd_of_short_clips_equals_the_nuclear_norm_form).
    "fd_expression": 3e-6, "pfd_expression": 3e-6,
    # Full-rank 6 / 12-dim covariances: sqrtm and eigh are accurate to ~1e-14 here.
    "fd_pose": 1e-9, "pfd_pose": 1e-9,
    # |corr(gt, sp) - corr(pred, sp)| cancels ~400x of the BLAS rounding of np.cov's dot.
    "rpcc_expression": 1e-9, "rpcc_pose": 1e-9,
}
# Everything else (MSE, Var, STS, LVE, FDD: no BLAS, sums of same-sign terms, so any order is
# within ~n eps; SID: same labels give the same histogram, and only log2's last ulp (numpy's SIMD
# vs scalar path) and the order of 40 same-sign terms may differ, while one changed label
# moves SID by >= 1e-5 relative, so this still fails on any change of the clustering).
DEFAULT_RTOL = 1e-12
# Ours against ours on differently padded inputs: longer padding changes the BLAS blocking of
# the zero-padded reductions; FD's eigh turns ~eps covariance changes into ~1e-13 (the noise
# eigenvalues of these singular covariances stay below 3% of the zeroing threshold on every
# OpenBLAS kernel tried, so no eigenvalue changes side).
PADDING_RTOL = 1e-10


def golden_rtol(key: str) -> float:
  """Tolerance of a golden key like ``dim_compat/gt_sid_pose`` or ``fd_expression``."""
  name = key.rsplit("/", 1)[-1]
  return GOLDEN_RTOL.get(name[3:] if name.startswith("gt_") else name, DEFAULT_RTOL)

LISTENER_KEYS = [f"{m}_{p}" for m in ("fd", "pfd", "mse", "sid", "var", "rpcc", "sts")
                 for p in ("expression", "pose")]


# --------------------------------------------------------------------------------------
# Helpers and fixtures.
# --------------------------------------------------------------------------------------


def _pad(clips, num_frames: int, garbage) -> np.ndarray:
  """Stacks ``[L, ...]`` clips into ``[N, num_frames, ...]`` with ``garbage`` on padding."""
  out = np.full((len(clips), num_frames) + clips[0].shape[1:], garbage, dtype=np.float64)
  for i, clip in enumerate(clips):
    out[i, :len(clip)] = clip
  return out


@pytest.fixture(scope="module")
def golden():
  """Golden motion, padded with garbage that must never enter a metric."""
  truth, prediction, speaker = official.golden_motion()
  lengths = np.array([len(c) for c in truth])
  num_frames = official.GOLDEN_FRAMES
  return dict(lists=(truth, prediction, speaker), lengths=lengths,
              truth=_pad(truth, num_frames, np.nan), prediction=_pad(prediction, num_frames, 1e6),
              speaker=_pad(speaker, num_frames, -np.inf))


@pytest.fixture(scope="module")
def clusters(golden):
  return metrics.fit_clusters(golden["truth"], golden["lengths"])


@pytest.fixture(scope="module")
def vertices():
  truth, prediction, templates = official.golden_vertices()
  lengths = np.array([len(c) for c in truth])
  num_frames = official.VERTEX_FRAMES
  return dict(lists=(truth, prediction, templates), lengths=lengths,
              truth=_pad(truth, num_frames, np.nan), prediction=_pad(prediction, num_frames, -1e9),
              templates=np.stack(templates))


def _all_metrics(truth, prediction, speaker, lengths, clusters_):
  out = {}
  for protocol in metrics.PROTOCOLS:
    out.update({f"{protocol}/{k}": v for k, v in metrics.listener_metrics(
        truth, prediction, speaker, lengths, protocol=protocol, clusters=clusters_).items()})
    out.update({f"{protocol}/gt_{k}": v for k, v in metrics.reference_metrics(
        truth, lengths, protocol=protocol, clusters=clusters_).items()})
  return out


def _assert_matches(ours: dict, expected: dict, prefix: str = "") -> None:
  for key, value in ours.items():
    np.testing.assert_allclose(value, expected[prefix + key], rtol=golden_rtol(key), err_msg=key)


# --------------------------------------------------------------------------------------
# Golden constants: the official formulas.
# --------------------------------------------------------------------------------------


def test_transcription_reproduces_golden_constants():
  """Guards the constants (and sklearn's KMeans, numpy's rng) against silent drift."""
  values = official.golden_values()
  assert values.keys() == GOLDEN.keys()
  for key, want in GOLDEN.items():
    np.testing.assert_allclose(values[key], want, rtol=golden_rtol(key), err_msg=key)


def test_dim_compat_equals_golden_constants(golden, clusters):
  ours = metrics.listener_metrics(golden["truth"], golden["prediction"], golden["speaker"],
                                  golden["lengths"], protocol="dim_compat", clusters=clusters)
  assert list(ours) == LISTENER_KEYS
  _assert_matches(ours, GOLDEN, "dim_compat/")
  reference = metrics.reference_metrics(golden["truth"], golden["lengths"],
                                        protocol="dim_compat", clusters=clusters)
  assert sorted(reference) == ["sid_expression", "sid_pose", "var_expression", "var_pose"]
  _assert_matches(reference, GOLDEN, "dim_compat/gt_")


def test_per_sequence_equals_per_clip_loop_of_transcription(golden, clusters):
  truth, prediction, speaker = golden["lists"]
  expected = official.print_metrics_per_clip(truth, prediction, speaker)
  ours = metrics.listener_metrics(golden["truth"], golden["prediction"], golden["speaker"],
                                  golden["lengths"], protocol="per_sequence", clusters=clusters)
  _assert_matches(ours, expected)
  reference = metrics.reference_metrics(golden["truth"], golden["lengths"],
                                        protocol="per_sequence", clusters=clusters)
  _assert_matches(reference, expected, "gt_")
  # The protocols differ where they should (pooled vs per clip), and agree on FD/P-FD/MSE.
  compat = metrics.listener_metrics(golden["truth"], golden["prediction"], golden["speaker"],
                                    golden["lengths"], protocol="dim_compat", clusters=clusters)
  for key in LISTENER_KEYS:
    if key.startswith(("fd_", "pfd_", "mse_")):
      # The same computation on the same inputs; the tolerance only admits a BLAS whose
      # rounding depends on memory alignment (MKL without CNR).
      np.testing.assert_allclose(ours[key], compat[key], rtol=1e-12, err_msg=key)
    else:
      assert abs(ours[key] - compat[key]) > 1e-3 * abs(compat[key]), key


def test_vertex_metrics_equal_golden_constants(vertices):
  # No BLAS in LVE / FDD (elementwise squares, max, np.std): DEFAULT_RTOL.
  args = (vertices["truth"], vertices["prediction"])
  lengths = vertices["lengths"]
  np.testing.assert_allclose(
      metrics.lip_vertex_error(*args, lengths, official.LIP_INDICES), GOLDEN["lve"], rtol=DEFAULT_RTOL)
  np.testing.assert_allclose(
      metrics.upper_face_dynamics_deviation(*args, vertices["templates"], lengths,
                                            official.UPPER_INDICES), GOLDEN["fdd"],
      rtol=DEFAULT_RTOL)
  # per_sequence LVE: the per-clip transcription, averaged.
  truth, prediction, templates = vertices["lists"]
  per_clip = [official.print_biwi_metrics([t], [p], [tp], official.LIP_INDICES,
                                          official.UPPER_INDICES)
              for t, p, tp in zip(truth, prediction, templates)]
  np.testing.assert_allclose(
      metrics.lip_vertex_error(*args, lengths, official.LIP_INDICES, protocol="per_sequence"),
      np.mean([lve for lve, _ in per_clip]), rtol=DEFAULT_RTOL)
  np.testing.assert_allclose(
      metrics.fdd_per_sequence(*args, vertices["templates"], lengths, official.UPPER_INDICES),
      [fdd for _, fdd in per_clip], rtol=DEFAULT_RTOL)


# --------------------------------------------------------------------------------------
# Closed forms.
# --------------------------------------------------------------------------------------


def test_identical_prediction_scores_zero(golden, clusters):
  truth = golden["truth"]
  out = metrics.listener_metrics(truth, truth, golden["speaker"], golden["lengths"],
                                 protocol="dim_compat", clusters=clusters)
  for part in metrics.PARTS:
    # tr S + tr S - 2 tr sqrt(S S) cancels: eigh rounding of ~1e-15 * tr S (tr S ~ 10) remains.
    assert abs(out[f"fd_{part}"]) < 1e-9
    assert abs(out[f"pfd_{part}"]) < 1e-9
    # x - x is exactly 0 on any machine (no BLAS in MSE / STS).
    assert out[f"mse_{part}"] == 0.0
    assert out[f"sts_{part}"] == 0.0
    # Two np.corrcoef (BLAS dot) of equal data: equal, unless a BLAS rounds by alignment.
    assert abs(out[f"rpcc_{part}"]) < 1e-12


@pytest.mark.parametrize("part", ["expression", "pose"])
def test_fd_of_shifted_prediction_is_squared_shift(golden, part):
  c = np.random.default_rng(0).normal(size=56)
  truth = golden["truth"]
  fd = metrics.fd_per_sequence(truth, truth + c, golden["lengths"], part)
  # eigh of (rank-deficient) covariances; 2e-13 is the most seen across OpenBLAS kernels.
  np.testing.assert_allclose(fd, np.sum(c[metrics.PARTS[part]]**2), rtol=1e-9)


@pytest.mark.parametrize("a", [0.5, 1.7])
def test_fd_of_scaled_prediction(golden, a):
  # S2 = a^2 S1, sqrtm(S1 S2) = a S1: FD = |mu (1 - a)|^2 + tr S (1 + a^2 - 2 a).
  truth, lengths = golden["truth"], golden["lengths"]
  fd = metrics.fd_per_sequence(truth, a * truth, lengths, "expression")
  for i, length in enumerate(lengths):
    clip = truth[i, :length, 6:]
    want = (1 - a)**2 * (np.sum(clip.mean(0)**2) + np.trace(np.cov(clip, rowvar=False)))
    # eigh of rank-deficient covariances, with cancellation near a = 1; 4e-13 seen at most.
    np.testing.assert_allclose(fd[i], want, rtol=1e-9)


def test_fd_of_two_frame_clips_rank_one_closed_form():
  # Two frames: cov = u u^T with u = (x1 - x0) / sqrt 2, so tr sqrtm(S1 S2) = |u . v|.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(5, 2, 56))
  y = rng.normal(size=(5, 2, 56))
  fd = metrics.fd_per_sequence(x, y, np.full(5, 2), "expression")
  x, y = x[..., 6:], y[..., 6:]
  u = (x[:, 1] - x[:, 0]) / np.sqrt(2)
  v = (y[:, 1] - y[:, 0]) / np.sqrt(2)
  mu_diff = x.mean(1) - y.mean(1)
  want = (np.sum(mu_diff**2, -1) + np.sum(u**2, -1) + np.sum(v**2, -1)
          - 2 * np.abs(np.sum(u * v, -1)))
  # eigh of 50 x 50 rank-one matrices: ~D eps of the one nonzero eigenvalue (2e-16 seen).
  np.testing.assert_allclose(fd, want, rtol=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_when_well_conditioned():
  rng = np.random.default_rng(2)
  a = rng.normal(size=(4, 80, 10))
  b = rng.normal(size=(4, 80, 10)) @ rng.normal(size=(10, 10)) + 0.3
  mu1, cov1 = metrics.sequence_moments(a, np.full(4, 80))
  mu2, cov2 = metrics.sequence_moments(b, np.full(4, 80))
  ours = metrics.frechet_distance(mu1, cov1, mu2, cov2)
  for i in range(4):
    m1, s1 = official.calculate_activation_statistics(a[i])
    m2, s2 = official.calculate_activation_statistics(b[i])
    np.testing.assert_allclose(mu1[i], m1, rtol=1e-12)  # Sums of 80 numbers, no BLAS.
    # Covariance entries are 80-term dot products (BLAS in both): error ~80 eps of the largest
    # entry; relative to a near-zero off-diagonal entry it is unbounded, so scale by the max.
    np.testing.assert_allclose(cov1[i], s1, rtol=0, atol=1e-12 * np.abs(s1).max())
    # Well-conditioned 10 x 10 sqrtm vs eigh: ~cond * eps (2e-15 seen).
    np.testing.assert_allclose(ours[i], official.calculate_frechet_distance(m1, s1, m2, s2),
                               rtol=1e-10)


def test_frechet_distance_of_singular_covariances_is_finite():
  # Zero covariance (a constant clip): FD = |mu1 - mu2|^2 + tr S2, no NaN, no complex.
  cov2 = np.diag([1.0, 4.0, 0.0])
  fd = metrics.frechet_distance(np.zeros(3), np.zeros((3, 3)), np.ones(3), cov2)
  np.testing.assert_allclose(fd, 3.0 + 5.0, rtol=1e-12)  # eigh of diagonal matrices: exact.


def test_fd_of_short_clips_equals_the_nuclear_norm_form(golden):
  # With S1 = A^T A, S2 = B^T B (A, B the centred L x D clips / sqrt(L - 1)), the nonzero
  # eigenvalues of S1 S2 are the squared singular values of the L x L matrix A B^T, so
  # tr sqrtm(S1 S2) = ||A B^T||_* : no square root of a singular matrix is taken. Our eigh
  # form must agree to rounding on these rank-deficient clips (L < 50 and < 100 features),
  # where the official scipy sqrtm is off by ~3e-7 (GOLDEN_RTOL).
  truth, prediction, speaker = golden["lists"]
  lengths = golden["lengths"]
  ours = {"fd": metrics.fd_per_sequence(golden["truth"], golden["prediction"], lengths,
                                        "expression"),
          "pfd": metrics.paired_fd_per_sequence(golden["speaker"], golden["truth"],
                                                golden["prediction"], lengths, "expression")}
  for i, (gt, pred, sp) in enumerate(zip(truth, prediction, speaker)):
    for name, (x, y) in (("fd", (gt[:, 6:], pred[:, 6:])),
                         ("pfd", (np.c_[sp[:, 6:], gt[:, 6:]], np.c_[sp[:, 6:], pred[:, 6:]]))):
      a = (x - x.mean(0)) / np.sqrt(len(x) - 1)
      b = (y - y.mean(0)) / np.sqrt(len(y) - 1)
      assert len(x) - 1 < x.shape[1]  # Singular covariances: the case this test is about.
      want = (np.sum((x.mean(0) - y.mean(0))**2) + np.sum(a * a) + np.sum(b * b)
              - 2 * np.linalg.svd(a @ b.T, compute_uv=False).sum())
      # SVD of a well-conditioned 20..40 square matrix and our eigh: 2e-12 at most seen.
      np.testing.assert_allclose(ours[name][i], want, rtol=1e-10, err_msg=f"{name} clip {i}")


def test_entropy_of_uniform_and_collapsed_labels():
  k = 40
  uniform = np.tile(np.arange(k), 7)
  # 40 equal terms summed (<= 40 ulp) and log2's last ulp (numpy's SIMD vs scalar path).
  assert metrics.entropy_bits(uniform, k) == pytest.approx(-np.log2(1 / k + 1e-6), rel=1e-13)
  assert metrics.entropy_bits(uniform, k) == pytest.approx(np.log2(k), abs=1e-4)
  # A collapsed prediction: the official eps makes it -log2(1 + 1e-6), a hair below 0.
  # One term: only log2's last ulp may differ.
  assert metrics.entropy_bits(np.full(50, 3), k) == pytest.approx(-np.log2(1 + 1e-6), rel=1e-12)
  per_clip = metrics.entropy_bits_per_clip(np.r_[uniform, np.full(9, 5)],
                                           np.r_[np.zeros(len(uniform)), np.ones(9)], 2, k)
  np.testing.assert_allclose(per_clip, [-np.log2(1 / k + 1e-6), -np.log2(1 + 1e-6)],
                             rtol=1e-12)


def test_sid_counts_clusters_of_the_ground_truth():
  # Ground truth: k well-separated blobs, equally used. A prediction visiting all blobs
  # equally has SID log2 k; one staying in a blob has SID ~0.
  k = 20
  rng = np.random.default_rng(3)
  centres = rng.normal(size=(k, 56)) * 100
  labels = np.tile(np.arange(k), 6)
  truth = (centres[labels] + rng.normal(size=(len(labels), 56)) * 0.01).reshape(4, 30, 56)
  lengths = np.full(4, 30)
  c = metrics.FrameClusters.fit(truth, lengths, "pose")
  assert c.k == 20
  got, clip_index = c.assign(truth, lengths)
  np.testing.assert_array_equal(clip_index, np.repeat(np.arange(4), 30))
  # Blobs map one-to-one onto clusters.
  assert len(set(zip(labels.tolist(), got.tolist()))) == k
  assert metrics.entropy_bits(got, k) == pytest.approx(np.log2(k), abs=1e-4)
  collapsed = np.broadcast_to(truth[0, 0], truth.shape)
  assert metrics.entropy_bits(c.assign(collapsed, lengths)[0], k) == pytest.approx(0, abs=1e-5)


def test_sts_dim_compat_includes_clip_boundaries(golden, clusters):
  # Prediction = truth + a per-clip constant: within-clip differences agree, so per_sequence
  # STS is 0; the official pooling sees the jumps between consecutive clips' offsets.
  truth, lengths = golden["truth"], golden["lengths"]
  offsets = np.random.default_rng(4).normal(size=(len(lengths), 1, 56))
  prediction = truth + offsets
  args = (truth, prediction, golden["speaker"], lengths)
  compat = metrics.listener_metrics(*args, protocol="dim_compat", clusters=clusters)
  per_seq = metrics.listener_metrics(*args, protocol="per_sequence", clusters=clusters)
  jumps = np.diff(offsets[:, 0], axis=0)
  for part, sl in metrics.PARTS.items():
    assert per_seq[f"sts_{part}"] == pytest.approx(0, abs=1e-6)
    # Sums of squares, no BLAS; the within-clip rounding left by (x + o) - x is ~1e-16 * |x|.
    np.testing.assert_allclose(compat[f"sts_{part}"], np.sqrt(np.sum(jumps[:, sl]**2) / 0.1),
                               rtol=1e-9)


@pytest.mark.parametrize("protocol", metrics.PROTOCOLS)
def test_correlation_with_a_constant_is_zero(golden, clusters, protocol):
  truth, speaker, lengths = golden["truth"], golden["speaker"], golden["lengths"]
  constant = np.full_like(truth, 0.1)  # Its float mean is not exactly 0.1: still constant.
  out = metrics.listener_metrics(truth, constant, speaker, lengths, protocol=protocol,
                                 clusters=clusters)
  assert all(np.isfinite(v) for v in out.values())
  mask = np.arange(truth.shape[1]) < lengths[:, None]
  for part, sl in metrics.PARTS.items():
    # rPCC = |corr(truth, speaker) - corr(constant, speaker)| = |corr(truth, speaker) - 0|.
    if protocol == "dim_compat":
      want = abs(np.corrcoef(truth[mask][:, sl].ravel(), speaker[mask][:, sl].ravel())[0, 1])
    else:
      want = np.mean([abs(np.corrcoef(truth[i, :n, sl].ravel(), speaker[i, :n, sl].ravel())[0, 1])
                      for i, n in enumerate(lengths)])
    assert want > 0.05
    # np.corrcoef and ours both reduce through BLAS / pairwise sums: ~1e-15, far inside 1e-9.
    np.testing.assert_allclose(out[f"rpcc_{part}"], want, rtol=1e-9)
  # A constant speaker: both correlations are 0.
  out = metrics.listener_metrics(truth, golden["prediction"], constant, lengths,
                                 protocol=protocol, clusters=clusters)
  assert out["rpcc_expression"] == 0.0 and out["rpcc_pose"] == 0.0


def test_lip_vertex_error_closed_form(vertices):
  truth, lengths = vertices["truth"], vertices["lengths"]
  prediction = truth.copy()
  lip = list(official.LIP_INDICES)
  prediction[:, :, lip[2], 0] += 0.5  # One lip vertex off by 0.5: max squared error 0.25.
  prediction[:, :, 0, :] += 3.0  # Not a lip vertex: ignored.
  assert metrics.lip_vertex_error(truth, prediction, lengths, lip) == pytest.approx(0.25)
  assert metrics.lip_vertex_error(truth, truth, lengths, lip, protocol="per_sequence") == 0.0
  assert metrics.upper_face_dynamics_deviation(
      truth, truth, vertices["templates"], lengths, official.UPPER_INDICES) == 0.0


# --------------------------------------------------------------------------------------
# Frame alignment.
# --------------------------------------------------------------------------------------


def _officially_aligned_lists(golden):
  """The lists the official evaluation scores: truth / prediction [1:L], speaker [0:L-1]."""
  truth, prediction, speaker = golden["lists"]
  return [t[1:] for t in truth], [p[1:] for p in prediction], [s[:-1] for s in speaker]


def test_official_alignment_is_the_transcription_on_hand_shifted_clips(golden):
  # Independent derivation: shift the unpadded clips by hand and run the official formulas
  # (scipy sqrtm, sklearn k-means fitted on the shifted truth, the sts loop) on them.
  truth, prediction, speaker = _officially_aligned_lists(golden)
  expected = official.print_metrics(truth, prediction, speaker)
  lengths = golden["lengths"]
  clusters = metrics.fit_clusters(golden["truth"], lengths, alignment="official")
  args = (golden["truth"], golden["prediction"], golden["speaker"], lengths)
  ours = metrics.listener_metrics(*args, protocol="dim_compat", clusters=clusters,
                                  alignment="official")
  _assert_matches(ours, expected)
  _assert_matches(metrics.reference_metrics(golden["truth"], lengths, protocol="dim_compat",
                                            clusters=clusters, alignment="official"),
                  expected, "gt_")
  # per_sequence: the unshifted metric on arrays shifted and re-padded by hand.
  shifted = [_pad(x, official.GOLDEN_FRAMES, np.nan) for x in (truth, prediction, speaker)]
  by_hand = metrics.listener_metrics(
      *shifted, lengths - 1, protocol="per_sequence",
      clusters=metrics.fit_clusters(shifted[0], lengths - 1))
  aligned = metrics.listener_metrics(*args, protocol="per_sequence", clusters=clusters,
                                     alignment="official")
  for key in LISTENER_KEYS:
    np.testing.assert_allclose(aligned[key], by_hand[key], rtol=PADDING_RTOL, err_msg=key)
  # It is not a no-op: every metric moves (P-FD and rPCC also by the speaker shift).
  same = metrics.listener_metrics(*args, protocol="dim_compat",
                                  clusters=metrics.fit_clusters(golden["truth"], lengths))
  for key in LISTENER_KEYS:
    if not key.startswith("sid_"):  # A histogram may survive dropping 6 of 175 frames.
      assert abs(ours[key] - same[key]) > 1e-6 * abs(same[key]), key


@pytest.mark.parametrize("protocol", metrics.PROTOCOLS)
def test_official_alignment_pairs_listener_t_plus_1_with_speaker_t(protocol):
  # The listener repeats the speaker one frame later: listener[t + 1] = speaker[t]. Under the
  # official alignment the truth-speaker correlation is exactly 1, so a constant prediction
  # (correlation 0 by definition) has rPCC 1; with same-frame pairing it is less than 1.
  rng = np.random.default_rng(21)
  lengths = np.array([30, 24, 41])
  speaker = np.cumsum(rng.normal(size=(3, 42, 56)), axis=1)
  truth = np.concatenate([rng.normal(size=(3, 1, 56)), speaker[:, :-1]], axis=1)
  constant = np.full_like(truth, 0.3)
  for alignment, check in (("official", lambda r: r == pytest.approx(1.0, abs=1e-12)),
                           ("same_frame", lambda r: r < 0.999)):
    clusters = metrics.fit_clusters(truth, lengths, alignment=alignment)
    out = metrics.listener_metrics(truth, constant, speaker, lengths, protocol=protocol,
                                   clusters=clusters, alignment=alignment)
    for part in metrics.PARTS:
      assert check(out[f"rpcc_{part}"]), (alignment, part, out[f"rpcc_{part}"])


def test_alignment_errors(golden, clusters):
  args = (golden["truth"], golden["prediction"], golden["speaker"], golden["lengths"])
  with pytest.raises(ValueError, match="valid alignments: same_frame, official"):
    metrics.listener_metrics(*args, protocol="dim_compat", clusters=clusters,
                             alignment="shifted")
  # Clusters of the unshifted truth do not fit the officially aligned one.
  with pytest.raises(metrics.MetricInputError, match="same alignment"):
    metrics.listener_metrics(*args, protocol="dim_compat", clusters=clusters,
                             alignment="official")
  # Two frames are enough for a covariance, not once frame 0 is dropped.
  d = _good()
  d["lengths"] = np.array([10, 2, 8])
  with pytest.raises(metrics.MetricInputError,
                     match=r"clips \['clip_b'\] have fewer than 3 .*drops listener frame 0"):
    metrics.listener_metrics(d["truth"], d["prediction"], d["speaker"], d["lengths"],
                             protocol="dim_compat", clusters=clusters, alignment="official",
                             clip_ids=IDS)
  with pytest.raises(metrics.MetricInputError, match="drops listener frame 0"):
    metrics.fit_clusters(d["truth"], np.array([10, 1, 8]), alignment="official")


# --------------------------------------------------------------------------------------
# Padding independence.
# --------------------------------------------------------------------------------------


def test_padding_never_enters_any_metric(golden, clusters, vertices):
  lengths = golden["lengths"]
  base = _all_metrics(golden["truth"], golden["prediction"], golden["speaker"], lengths,
                      clusters)
  extra = 7  # Other garbage, and more padded frames.
  mask = np.arange(golden["truth"].shape[1] + extra) < lengths[:, None]

  def repad(x, garbage):
    x = np.concatenate([x, np.zeros((x.shape[0], extra) + x.shape[2:])], axis=1)
    return np.where(mask[..., None], x, garbage)

  other = _all_metrics(repad(golden["truth"], 0.0), repad(golden["prediction"], np.inf),
                       repad(golden["speaker"], 3e5), lengths, clusters)
  assert other.keys() == base.keys()
  for key, value in base.items():
    # Longer padding changes the BLAS blocking of the zero-padded reductions (frames are the
    # reduction axis of the covariance matmul), so rounding may move, not the value.
    np.testing.assert_allclose(other[key], value, rtol=PADDING_RTOL, err_msg=key)
  # Vertex metrics.
  vt, vp = vertices["truth"], vertices["prediction"]
  vl = vertices["lengths"]
  vmask = np.arange(vt.shape[1] + extra) < vl[:, None]
  vrepad = lambda x, g: np.where(vmask[..., None, None], np.concatenate(
      [x, np.zeros((x.shape[0], extra) + x.shape[2:])], axis=1), g)
  for protocol in metrics.PROTOCOLS:
    assert metrics.lip_vertex_error(vrepad(vt, 5.0), vrepad(vp, np.nan), vl, official.LIP_INDICES,
                                    protocol=protocol) == pytest.approx(
        metrics.lip_vertex_error(vt, vp, vl, official.LIP_INDICES, protocol=protocol), rel=1e-12)
  assert metrics.upper_face_dynamics_deviation(
      vrepad(vt, 5.0), vrepad(vp, np.nan), vertices["templates"], vl,
      official.UPPER_INDICES) == pytest.approx(GOLDEN["fdd"], rel=1e-12)


# --------------------------------------------------------------------------------------
# Bad inputs.
# --------------------------------------------------------------------------------------

IDS = ["clip_a", "clip_b", "clip_c"]


def _good():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(3, 10, 56))
  return dict(truth=x, prediction=x + 0.1, speaker=x * 2, lengths=np.array([10, 6, 8]))


def _break(case: str) -> tuple[dict, str]:
  """Inputs broken in one way, and a regex the error message must match."""
  d = _good()
  if case == "shape":
    d["prediction"] = d["prediction"][:, :9]
    return d, r"prediction shape \(3, 9, 56\) != truth shape \(3, 10, 56\)"
  if case == "speaker_width":
    d["speaker"] = d["speaker"][..., :55]
    return d, r"speaker shape .* != truth shape"
  if case == "count":
    d["lengths"] = np.array([10, 6])
    return d, r"lengths must have shape \[3\]"
  if case == "float_lengths":
    d["lengths"] = np.array([10.0, 6.0, 8.0])
    return d, "lengths must be integers"
  if case == "zero_length":
    d["lengths"] = np.array([10, 0, 8])
    return d, r"lengths outside \[1, 10\].*'clip_b'"
  if case == "too_long":
    d["lengths"] = np.array([10, 6, 11])
    return d, r"lengths outside \[1, 10\].*'clip_c'.*\[11\]"
  if case == "one_frame":
    d["lengths"] = np.array([10, 1, 8])
    return d, r"clips \['clip_b'\] have fewer than 2 valid frames"
  if case == "nan":
    d["prediction"] = d["prediction"].copy()
    d["prediction"][2, 4, 17] = np.nan
    return d, r"prediction has NaN/Inf on valid frames of clips \['clip_c'\].*frame 4"
  if case == "inf_speaker":
    d["speaker"] = d["speaker"].copy()
    d["speaker"][0, 9, 0] = np.inf
    d["speaker"][1, 2, 0] = -np.inf
    return d, r"speaker has NaN/Inf .*\['clip_a', 'clip_b'\].*'clip_a' at frame 9.*frame 2"
  raise ValueError(case)


BAD_CASES = ["shape", "speaker_width", "count", "float_lengths", "zero_length", "too_long",
             "one_frame", "nan", "inf_speaker"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_check_inputs_names_the_problem(case):
  d, pattern = _break(case)
  with pytest.raises(metrics.MetricInputError, match=pattern):
    metrics.check_inputs(d["truth"], d["prediction"], d["lengths"], speaker=d["speaker"],
                         clip_ids=IDS)


def test_check_inputs_without_ids_names_indices_and_accepts_padded_garbage():
  d = _good()
  truth = d["truth"].copy()
  truth[1, 6:] = np.nan  # Padding of clip 1: fine.
  metrics.check_inputs(truth, d["prediction"], d["lengths"], speaker=d["speaker"])
  truth[1, 5, 3] = np.nan  # Last valid frame of clip 1: not fine.
  with pytest.raises(metrics.MetricInputError, match=r"truth has NaN.*\[#1\].*frame 5"):
    metrics.check_inputs(truth, d["prediction"], d["lengths"])


def test_metric_entry_points_validate(golden, clusters):
  d, _ = _break("nan")
  with pytest.raises(metrics.MetricInputError, match="prediction has NaN"):
    metrics.listener_metrics(d["truth"], d["prediction"], d["speaker"], d["lengths"],
                             protocol="dim_compat", clusters=clusters)
  d, _ = _break("one_frame")
  with pytest.raises(metrics.MetricInputError, match="fewer than 2"):
    metrics.fd_per_sequence(d["truth"], d["prediction"], d["lengths"], "pose")
  with pytest.raises(ValueError, match="valid protocols: dim_compat, per_sequence"):
    metrics.listener_metrics(golden["truth"], golden["prediction"], golden["speaker"],
                             golden["lengths"], protocol="pooled", clusters=clusters)
  # Clusters must come from the evaluated ground truth.
  with pytest.raises(metrics.MetricInputError, match="not fitted on this ground truth"):
    metrics.listener_metrics(golden["prediction"], golden["truth"], golden["speaker"],
                             golden["lengths"], protocol="dim_compat", clusters=clusters)
  # Too few distinct frames for k clusters.
  d = _good()
  repeated = np.broadcast_to(d["truth"][:, :1], d["truth"].shape)
  with pytest.raises(metrics.MetricInputError, match="at least 40 distinct"):
    metrics.FrameClusters.fit(repeated, d["lengths"], "expression")
  with pytest.raises(metrics.MetricInputError, match="vertex indices"):
    metrics.lip_vertex_error(np.zeros((1, 3, 4, 3)), np.zeros((1, 3, 4, 3)), [3], [1, 4])
