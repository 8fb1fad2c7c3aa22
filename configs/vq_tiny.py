r"""CPU-sized VQ-VAE on the embedded synthetic data (demo and tests).

  python -m dim_jax.main --config configs/vq_tiny.py:role=speaker --workdir runs/vq_tiny \
      --config.data.dir=runs/synthetic_data
The synthetic dataset is written to data.dir if absent.
"""

from dim_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, role="listener")
  return config_lib.shrink_to_tiny(config_lib.vq_config(args.role))
