r"""DIM phases at official sizes: pretrain, finetune_listener, finetune_speaker.

  python -m dim_jax.main --config configs/dim.py:phase=pretrain --workdir runs/pretrain \
      --config.data.dir=/path/to/candor --config.init.speaker_vq=runs/vq_speaker \
      --config.init.listener_vq=runs/vq_listener
  python -m dim_jax.main --config configs/dim.py:phase=finetune_listener --workdir runs/ft \
      --config.data.dir=/path/to/vico --config.init.pretrain=runs/pretrain
Arguments: phase=..., size=official|tiny, ablation=none|no_vq|no_pretrain|frozen_vq_decoder|
trainable_vq_decoder|no_contrastive|single_stream (paper Table 3; no_pretrain leaves
init.pretrain empty and needs init.speaker_vq / init.listener_vq).
"""

from dim_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, phase="pretrain", size="official", ablation="none")
  config = config_lib.dim_config(args.phase, args.ablation)
  if args.size == "tiny":
    config = config_lib.shrink_dim_to_tiny(config)
  elif args.size != "official":
    raise ValueError(f"size={args.size!r}; expected 'official' or 'tiny'")
  return config
