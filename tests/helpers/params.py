"""Random parameter values for a param tree of given shapes (instant, unlike compiling an
init program): kernels and tables U(+-1/sqrt(fan_in)), LayerNorm scales 1, biases and the
role/context embeddings U(+-bias_scale) (0: zero, as their initialisers)."""

import jax
import numpy as np

from dim_jax.training import checkpointing


def random_params(abstract, seed: int = 0, bias_scale: float = 0.0):
  rng = np.random.default_rng(seed)

  def leaf(path, shape_dtype):
    name, shape = checkpointing.path_str(path), shape_dtype.shape
    if name.endswith("scale"):
      return np.ones(shape, np.float32)
    if name.endswith(("bias", "_embedding")):
      if not bias_scale:  # no draw: the kernels' values do not depend on bias_scale=0
        return np.zeros(shape, np.float32)
      return rng.uniform(-bias_scale, bias_scale, shape).astype(np.float32)
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
    return (rng.uniform(-1, 1, shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, abstract)
