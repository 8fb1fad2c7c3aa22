"""Shared config pieces: the official VQ-VAE settings and `get_config(arg)` parsing.

Config files under `configs/` return an `ml_collections.ConfigDict` from `get_config(arg)`;
`arg` is the text after the colon in `--config configs/vq.py:role=speaker,size=tiny`.
Unknown keys raise (the ConfigDict is locked by `config_flags`).
"""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults):
  """Parses 'a=1,b=x' into a ConfigDict over `defaults`, casting to each default's type."""
  parsed = ml_collections.ConfigDict(defaults)
  if not arg:
    return parsed
  for item in arg.split(","):
    if not item:
      continue
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      parsed[key] = value.lower() in ("1", "true", "yes", "")
    else:
      parsed[key] = kind(value)
  return parsed


def data_config() -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  data.dir = ""                    # dim_jax TFRecords (docs/records.md); required.
  data.synthetic = False           # write the embedded synthetic dataset into data.dir if absent.
  data.synthetic_seed = 0          # seed of the synthetic dataset.
  data.synthetic_num_train = 256   # synthetic clips per split.
  data.synthetic_num_val = 32
  data.synthetic_num_test = 32
  data.max_len = 256               # longer clips are split into consecutive windows (not dropped).
  data.bucket_boundaries = (64, 128, 256)  # padded lengths: one compiled shape each.
  data.shuffle_buffer = 1024       # training shuffle buffer (clips).
  return data


def vq_model_config() -> ml_collections.ConfigDict:
  """Official VQ-VAE sizes (code/config.yaml NETWORK + VQuantizer)."""
  model = ml_collections.ConfigDict()
  model.name = "vqvae"
  model.in_dim = 56                # pose (6) then expression (50).
  model.hidden_size = 384
  model.num_layers = 6
  model.num_heads = 8
  model.mlp_dim = 1536
  model.codebook_size = 512
  model.code_dim = 128
  model.beta = 0.25                # commitment weight.
  model.leaky_slope = 0.2
  model.dropout_rate = 0.1         # after the positional encoding, as officially.
  # 'time' (ours) or 'official_batch_index' (the official table indexed by batch position,
  # needed to run official checkpoints identically) or 'none'.
  model.positional_encoding = "time"
  model.max_len = 5000
  model.compute_dtype = "float32"  # or 'bfloat16': bf16 matmul inputs, f32 accumulation.
  return model


def train_config() -> ml_collections.ConfigDict:
  train = ml_collections.ConfigDict()
  train.batch_size = 32            # global batch (clips), divisible by devices and processes.
  train.eval_batch_size = 32
  train.num_steps = 20000
  train.learning_rate = 1e-4       # official AdamW lr.
  train.weight_decay = 0.01        # torch AdamW default (the official code passes none).
  train.b1 = 0.9
  train.b2 = 0.999
  train.eps = 1e-8
  train.schedule = "constant"      # official: constant; or 'cosine'.
  train.warmup_steps = 0
  train.grad_clip_norm = 0.0       # 0 = off (official: off).
  train.quant_loss_weight = 1.0
  train.log_every_steps = 50
  train.eval_every_steps = 1000    # validation split; also where 'best' is decided.
  train.eval_at_start = False      # also evaluate the initial params (logged as step 0).
  train.checkpoint_every_steps = 1000
  train.keep_checkpoints = 3       # latest N kept, plus the best by validation loss.
  # How a resume finds its place in the data (both exact, the pipeline is deterministic):
  # 'iterator' saves each host's tf.data iterator in the checkpoint (instant resume, but the
  # state holds the shuffle buffer: tens of MB or more); 'replay' stores only the number of
  # batches consumed and replays the pipeline to there on resume (tiny checkpoints).
  train.data_state = "iterator"
  train.simulate_preemption_at_step = -1  # tests only: SIGKILL self after this step's save.
  return train


def mesh_config() -> ml_collections.ConfigDict:
  mesh = ml_collections.ConfigDict()
  mesh.data = -1                   # -1: all remaining devices.
  mesh.fsdp = 1                    # parameter-sharding axis size.
  return mesh


def vq_config(role: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.phase = "vq"
  config.role = role               # 'speaker' or 'listener': whose motion is tokenized.
  config.seed = 0                  # init, dropout and data order.
  config.data = data_config()
  config.model = vq_model_config()
  config.train = train_config()
  config.mesh = mesh_config()
  return config


def shrink_to_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """CPU-sized VQ-VAE for the demo and tests (same architecture, smaller widths)."""
  config.model.hidden_size = 64
  config.model.num_layers = 2
  config.model.num_heads = 4
  config.model.mlp_dim = 128
  config.model.codebook_size = 128
  config.model.code_dim = 32
  config.model.dropout_rate = 0.0
  config.data.synthetic = True
  config.data.max_len = 128
  config.data.bucket_boundaries = (64, 128)
  config.train.batch_size = 16
  config.train.data_state = "replay"  # a few hundred batches replay instantly.
  config.train.keep_checkpoints = 2
  config.train.eval_batch_size = 16
  config.train.num_steps = 400
  config.train.learning_rate = 2e-3
  config.train.weight_decay = 0.0
  config.train.schedule = "cosine"
  config.train.warmup_steps = 20
  config.train.log_every_steps = 20
  config.train.eval_every_steps = 200
  config.train.checkpoint_every_steps = 200
  return config
