r"""Phase `generate`: listener (or speaker) motion for every clip of a split.

  python -m dim_jax.main --config configs/generate.py --workdir runs/generate \
      --config.init.model=runs/finetune_listener --config.data.dir=/path/to/records \
      --config.generate.num_samples=10 --config.generate.sampling.temperature=1.0
Writes runs/generate/generated/sample_<k>/<clip_id>.npy ((T, 56) each) and sampling.json.
Argument `size=tiny` uses the demo's data settings (synthetic data, 128-frame windows).
"""

from dim_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, size="official")
  config = config_lib.generate_config()
  if args.size == "tiny":
    config_lib.tiny_data(config.data)
  elif args.size != "official":
    raise ValueError(f"size={args.size!r}; expected 'official' or 'tiny'")
  return config
