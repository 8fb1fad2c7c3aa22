r"""Phase `evaluate`: DIM-Listener (or DIM-Speaker) and the baselines on the test split.

  python -m dim_jax.main --config configs/evaluate.py --workdir runs/evaluate \
      --config.init.model=runs/finetune_listener --config.data.dir=/path/to/records
Writes runs/evaluate/report.md (Table-1 layout, both protocols), report.json and plots/*.png.
Score files made elsewhere instead of a checkpoint:
      --config.evaluate.predictions=runs/generate/generated --config.evaluate.method_name=Mine
Argument `size=tiny` uses the demo's data settings (synthetic data, 128-frame windows).
"""

from dim_jax import config_lib


def get_config(arg=None):
  return config_lib.inference_config_from_arg(config_lib.evaluate_config(), arg)
