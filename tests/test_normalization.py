"""Per-dimension standardisation: statistics written with the records, applied by the
pipeline, recorded in checkpoints, and refused when they do not match."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dim_jax import config_lib
from dim_jax.data import normalization, pipeline, records
from dim_jax.training import checkpointing, dim_tasks, vq


def _clip(clip_id: str, length: int, seed: int, offset: float = 0.0) -> dict:
  rng = np.random.default_rng(seed)
  scale = np.linspace(0.01, 3.0, 56, dtype=np.float32)  # radians next to O(1) coefficients
  return {
      "speaker_motion": (offset + scale * rng.standard_normal((length, 56))).astype(np.float32),
      "listener_motion": (2 * offset + scale * rng.standard_normal((length, 56))).astype(
          np.float32),
      "speaker_audio": (5.0 + 4.0 * rng.standard_normal((length, 768))).astype(np.float32),
      "clip_id": clip_id, "speaker_id": "a", "listener_id": "b", "session_id": "s",
      "fps": 30.0,
  }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("norm_data"))
  train = [_clip(f"t{i}", 20 + 7 * i, i, offset=0.3) for i in range(5)]
  records.write_split(path, "train", train, num_shards=2)
  records.write_split(path, "val", [_clip("v0", 30, 99, offset=-4.0)], num_shards=1)
  return path, train


def test_statistics_are_the_training_splits_moments(data_dir):
  path, train = data_dir
  stats = normalization.for_dataset(path)
  assert stats.split == "train" and stats.num_frames == sum(len(c["speaker_motion"]) for c in train)
  for stream in normalization.STREAMS:
    frames = np.concatenate([c[stream] for c in train]).astype(np.float64)
    # Independent two-pass moments; the writer accumulates sums in float64 in one pass.
    np.testing.assert_allclose(stats.mean(stream), frames.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.std(stream), frames.std(0), rtol=1e-5, atol=1e-6)
  # The val split (offset -4) did not move them: the statistics are the train split's alone.
  assert abs(float(stats.mean("speaker_motion").mean()) - 0.3) < 0.2


def test_pipeline_standardises_and_padding_stays_zero(data_dir):
  path, train = data_dir
  stats = normalization.for_dataset(path)
  dataset = pipeline.make_dataset(path, "train", batch_size=8, train=False, seed=0,
                                  bucket_boundaries=[64], max_len=64, normalization=stats)
  batch = next(pipeline.as_numpy(iter(dataset)))
  by_id = {c["clip_id"]: c for c in train}
  for row in np.flatnonzero(batch["example_mask"]):
    clip = by_id[batch["clip_id"][row].decode()]
    n = int(batch["length"][row])
    for stream in normalization.STREAMS:
      expected = (clip[stream].astype(np.float64) - stats.mean(stream)) / stats.std(stream)
      np.testing.assert_allclose(batch[stream][row, :n], expected, rtol=1e-5, atol=1e-5)
      assert not batch[stream][row, n:].any()
  # Standardised on the training split: every motion dim near mean 0, std 1 over its frames.
  frames = batch["listener_motion"][batch["mask"]]
  np.testing.assert_allclose(frames.std(0), 1.0, atol=0.25)
  raw = np.concatenate([c["listener_motion"] for c in train])
  np.testing.assert_allclose(stats.denormalize(stats.normalize(raw, "listener_motion"),
                                               "listener_motion"), raw, rtol=1e-5, atol=1e-5)


def test_constant_dimension_is_centred_not_scaled():
  clips = [_clip("c", 10, 0)]
  clips[0]["listener_motion"][:, 7] = 2.5
  stats = normalization.compute(clips)
  assert stats.std("listener_motion")[7] == 1.0 and stats.mean("listener_motion")[7] == 2.5


def test_old_dataset_without_statistics_names_the_command(data_dir, tmp_path):
  path, train = data_dir
  old = str(tmp_path / "old")
  records.write_split(old, "train", train[:2])
  info_path = os.path.join(old, records.INFO_FILENAME)
  with open(info_path) as f:
    info = json.load(f)
  expected = info.pop(normalization.INFO_KEY)
  with open(info_path, "w") as f:
    json.dump(info, f)
  config = config_lib.vq_config("listener")
  config.data.dir = old
  with pytest.raises(normalization.NormalizationError,
                     match=r"python -m dim_jax.data.normalization .*old.*data.normalize=.none."):
    pipeline.normalization_for(config, old)
  config.data.normalize = "none"  # the explicit opt-out: raw features
  assert pipeline.normalization_for(config, old) is None
  # The command adds exactly what the writer would have written.
  result = subprocess.run([sys.executable, "-m", "dim_jax.data.normalization", old],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  added = normalization.for_dataset(old).to_json()
  for stream in normalization.STREAMS:
    np.testing.assert_allclose(added["streams"][stream]["mean"],
                               expected["streams"][stream]["mean"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(added["streams"][stream]["std"],
                               expected["streams"][stream]["std"], rtol=1e-9, atol=1e-12)


def test_statistics_round_trip_through_checkpoint_meta(data_dir, tmp_path):
  path, _ = data_dir
  stats = normalization.for_dataset(path)
  config = config_lib.shrink_to_tiny(config_lib.vq_config("listener"))
  task = vq.VQTask.from_config(config, stats)
  meta = json.loads(json.dumps(task.model_meta()))  # what the checkpoint's meta file holds
  again = normalization.from_meta(meta, "meta")
  assert again == stats and hash(again) == hash(stats)
  # A DIM phase refuses tokenizers trained on other statistics, or on raw features.
  other = normalization.compute([_clip("x", 12, 5, offset=1.0)])
  sources = {"listener_vq": ("vq_listener", meta)}
  dim_tasks.check_normalization(stats, sources)
  with pytest.raises(checkpointing.CheckpointMismatchError, match="listener_motion"):
    dim_tasks.check_normalization(other, sources)
  with pytest.raises(checkpointing.CheckpointMismatchError, match="raw features"):
    dim_tasks.check_normalization(None, sources)


def test_vq_validation_errors_are_reported_in_raw_units(data_dir):
  path, _ = data_dir
  stats = normalization.for_dataset(path)
  config = config_lib.shrink_to_tiny(config_lib.vq_config("listener"))
  raw_task = vq.VQTask.from_config(config, None)
  task = vq.VQTask.from_config(config, stats)
  import jax  # pylint: disable=g-import-not-at-top
  batch = pipeline.dummy_batch(2, 16)
  rng = np.random.default_rng(0)
  batch["listener_motion"] = rng.standard_normal((2, 16, 56)).astype(np.float32)
  params = task.init_params(jax.random.PRNGKey(0), batch)
  sums = jax.tree.map(np.asarray, jax.jit(task.eval_sums)(params, batch))
  raw_sums = jax.tree.map(np.asarray, jax.jit(raw_task.eval_sums)(params, batch))
  std = stats.std("listener_motion").astype(np.float64)
  # Same model, same standardised batch: the raw-unit squared error is the model-unit one
  # scaled per dim by std^2 (the zero-initialised decoder outputs 0: the error is the target).
  target = batch["listener_motion"].astype(np.float64)
  np.testing.assert_allclose(sums["pose_sq"], (np.square(target * std)[..., :6]).sum(),
                             rtol=1e-4)
  np.testing.assert_allclose(raw_sums["pose_sq"], np.square(target[..., :6]).sum(), rtol=1e-4)


def test_part_scope_pools_one_std_per_part(data_dir):
  path, train = data_dir
  per_dim = normalization.for_dataset(path)
  part = per_dim.with_scope("part")
  assert part.scope == "part" and part.to_json()["scope"] == "part"
  for stream, parts in (("listener_motion", ((0, 6), (6, 56))), ("speaker_audio", ((0, 768),))):
    frames = np.concatenate([c[stream] for c in train]).astype(np.float64)
    np.testing.assert_allclose(part.mean(stream), frames.mean(0), rtol=1e-5, atol=1e-6)
    for lo, hi in parts:
      pooled = np.sqrt(frames[:, lo:hi].var(0).mean())
      np.testing.assert_allclose(part.std(stream)[lo:hi], pooled, rtol=1e-5)
  # Inside a part the relative scale of the dims survives standardisation.
  raw = train[0]["listener_motion"]
  ratio = part.normalize(raw, "listener_motion")[:, 6:].std(0) / raw[:, 6:].std(0)
  np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
  config = config_lib.vq_config("listener")
  assert config.data.normalize == "part"
  assert pipeline.normalization_for(config, path) == part
  config.data.normalize = "frame"
  with pytest.raises(normalization.NormalizationError, match="frame"):
    pipeline.normalization_for(config, path)
