r"""Phase `generate`: listener (or speaker) motion for every clip of a split.

  python -m dim_jax.main --config configs/generate.py --workdir runs/generate \
      --config.init.model=runs/finetune_listener --config.data.dir=/path/to/records \
      --config.generate.num_samples=10 --config.generate.sampling.temperature=1.0
Writes runs/generate/generated/sample_<k>/<clip_id>.npy ((T, 56) each) and sampling.json.
Argument `size=tiny` uses the demo's data settings (synthetic data, 128-frame windows).
"""

from dim_jax import config_lib


def get_config(arg=None):
  return config_lib.inference_config_from_arg(config_lib.generate_config(), arg)
