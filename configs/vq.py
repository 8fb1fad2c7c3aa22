r"""VQ-VAE motion tokenizer (phase `vq`), official sizes.

  python -m dim_jax.main --config configs/vq.py:role=listener --workdir runs/vq_listener \
      --config.data.dir=/path/to/records
Variants: `:role=speaker`. Any field: `--config.train.batch_size=64`.
"""

from dim_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, role="listener")
  return config_lib.vq_config(args.role)
