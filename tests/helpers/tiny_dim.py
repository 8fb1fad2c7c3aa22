"""The tiny DIM-Listener of the generation tests (generate, streaming, maskgit, quantize,
inference sharding): a 32-wide model with a 16-code tokenizer, fast to compile."""

from dim_jax import config_lib
from dim_jax.models import vqvae
from dim_jax.training import dim_tasks

MODEL = dict(dim=32, depth=1, heads=2, dim_head=16, num_tokens=16, decoder_depth=1,
             decoder_heads=2, audio_projection=16, max_seq_len=64)


def finetune_config(window: int, ablation: str = "none", **model):
  """The tiny finetune_listener config; `model` overrides fields of MODEL or adds switches."""
  config = config_lib.shrink_dim_to_tiny(config_lib.dim_config("finetune_listener", ablation))
  config.model.update(dict(MODEL, **model))
  config.data.max_len = window
  return config


def vq_config() -> vqvae.VQConfig:
  vq = config_lib.shrink_to_tiny(config_lib.vq_config("listener")).model
  vq.update(hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64, codebook_size=16, code_dim=8)
  return vqvae.vq_config_from(vq)


def task(config, normalization=None) -> dim_tasks.DIMTask:
  """The task of `config` with the tiny tokenizer for both roles."""
  vq = vq_config()
  return dim_tasks.DIMTask.from_config(config, speaker_vq=vq, listener_vq=vq,
                                       normalization=normalization)
