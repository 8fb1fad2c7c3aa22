"""Child process of tests/test_dim_sharding.py (needs XLA_FLAGS with 4 host devices).

Prints JSON: the pretraining loss terms computed (a) on one device and (b) jitted over a
4-way data-parallel mesh with the batch sharded, plus (c) the mean of per-shard InfoNCE
losses (what per-replica negatives, the official DataParallel behaviour, would give).
"""

import json
import os
import sys

import jax
import numpy as np

from dim_jax import config_lib, sharding
from dim_jax.models import dim as dim_lib
from dim_jax.models import vqvae
from dim_jax.training import dim_tasks

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import params as params_helper  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  assert jax.device_count() == 4, jax.devices()
  config = config_lib.dim_config("pretrain")
  for key, value in dict(audio_dim=8, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64,
                         num_tokens=16, decoder_depth=1, decoder_heads=2).items():
    config.model[key] = value
  vq_cfg = vqvae.VQConfig(hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64,
                          codebook_size=16, code_dim=8, dropout_rate=0.0)
  config.data.max_len = 32
  task = dim_tasks.DIMTask.from_config(config, speaker_vq=vq_cfg, listener_vq=vq_cfg)
  rng = np.random.default_rng(0)
  b, t = 8, 16
  lengths = rng.integers(6, t + 1, b)
  mask = np.arange(t)[None] < lengths[:, None]
  batch = dict(speaker_motion=rng.normal(size=(b, t, 56)).astype(np.float32),
               listener_motion=rng.normal(size=(b, t, 56)).astype(np.float32),
               speaker_audio=rng.normal(size=(b, t, 8)).astype(np.float32), mask=mask)
  # Random values on the init shapes (no init program to compile: the claim is about the
  # loss of any parameters); nonzero biases and embeddings, so every term sees them.
  params = params_helper.random_params(jax.eval_shape(task.init_params, jax.random.PRNGKey(0),
                                                      batch), 0, bias_scale=0.1)
  key = jax.random.PRNGKey(3)
  single = jax.jit(task.loss_fn)(params, batch, key)[1]
  config.mesh.data = 4
  mesh = sharding.make_mesh(config.mesh)
  sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  repl = sharding.replicated(mesh)
  sharded = jax.jit(task.loss_fn, in_shardings=(repl, sharding.batch_sharding(mesh), repl))(
      params, sharded_batch, key)[1]
  # Per-replica negatives: the same features, InfoNCE within each device's 2 examples.
  enc = jax.jit(lambda p: task.model.apply(
      {"params": p}, batch["speaker_motion"], batch["listener_motion"], mask,
      np.zeros_like(mask), np.zeros_like(mask), method=dim_lib.DIM.encode_dyad))(params["dim"])
  per_device = [float(dim_tasks.info_nce(enc["speaker_alone"][i:i + 2], enc["listener_alone"][i:i + 2],
                                         mask[i:i + 2], mask[i:i + 2].any(1), 0.05, False)[0])
                for i in range(0, b, 2)]
  print(json.dumps(dict(single={k: float(v) for k, v in single.items()},
                        sharded={k: float(v) for k, v in sharded.items()},
                        sharded_devices=len(sharded_batch["mask"].sharding.device_set),
                        per_device_nce=float(np.mean(per_device)))))


if __name__ == "__main__":
  main()
