"""Weight-only quantization for decoding: the joint decoder's kernels as int8 or bfloat16.

Token-by-token decoding reads every decoder weight once per token, so at batch 1 its speed is
set by the bytes those weights take (official size: 64 M float32 weights, 257 MB per token).
`quantize_params(params, mode)` stores the large matmul kernels of a param tree in fewer bytes,
once; `dequantize(quantized)` turns the whole tree back into float32 arrays.

    quantized = quantize.quantize_params(params, "int8")   # once, outside jit
    logits = model.apply({"params": quantized["dim"]}, ..., method=dim_lib.DIM.decode)  # jitted

Format. A quantized kernel is a `QuantizedKernel` box in place of its [in, out] float32 array:
  int8      values int8 [in, out] = round(W / scale), clipped to +-127; scale float32 [out] =
            max_i |W[i, out]| / 127 (symmetric, per output column; an all-zero column gets
            scale 1 and values 0). Elementwise |W - dequantized| <= scale / 2: at most 1/254
            of the column's largest weight.
  bfloat16  values bfloat16 [in, out] (round to nearest even), no scale: elementwise
            |W - dequantized| <= 2^-8 |W|.
Only 2-D leaves named `kernel` whose '/'-joined path matches `kernels` are quantized (default:
the joint decoder's, `DECODER_KERNELS`: every matmul the per-token step reads, plus the
cross-attention key/value projections it reads once per window). Norm scales, biases, token
and position tables (one row per token is read, not the table), the encoders and the
tokenizers (once per window, compute-bound) stay float32.

Where dequantization happens. The box is a Flax `AxisMetadata`, whose `unbox()` Flax calls
when a module reads the parameter (`self.param`). A module applied to a quantized tree therefore
dequantizes each kernel right where its matmul reads it, inside whatever jitted function or
`lax.scan` body applies the module: the arrays that enter the jitted function are the int8 /
bfloat16 ones and no float32 tree is built by the caller. `dequantize` is the same conversion
for a whole tree (tests, or code that reads params outside a module). Activations and
accumulation stay float32 (the dequantized kernel is float32; `model.compute_dtype` still
applies on top).

What XLA:CPU makes of it (jax 0.10.2; the official-size window step compiled, README
Benchmarks): the executable's parameter buffers are the narrow arrays (arguments 417 MB with
float32 weights, 275 MB bfloat16, 204 MB int8), but while-loop invariant code motion hoists every
dequantization out of the token loop: all 41 kernels are converted once per call, before
the loop (temp buffers 5.6 MB -> 288 MB, the float32 decoder), and every token then streams
float32 as before. XLA:CPU has no dot that reads int8 or bfloat16 operands (it inserts float32
converts for bf16 x bf16 and f32 x s8 dots too), and keeping the conversion inside the loop
(an optimization barrier) converts 257 MB per token, 2-3x slower. On this backend the narrow
formats therefore save resident memory between calls (decoder 288 -> 74 MB), not time: a call
is slightly slower (the per-call conversion) and peaks higher. A backend that fuses the
convert into the matmul's operand (XLA:GPU's Triton GEMMs) could read the narrow weights per
token, unless it hoists the conversion too: not measured here (no accelerator).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from flax.core import meta

Array = jax.Array
# A param tree in which some kernels are `QuantizedKernel` boxes (any Flax module reads it).
QuantizedParams = Any

MODES = ("float32", "bfloat16", "int8")
# The joint decoder's matmul kernels (self- and cross-attention, feed-forward, logits).
DECODER_KERNELS = r"(^|/)joint_decoder/(.+/)?kernel$"
INT8_MAX = 127


class QuantizedKernel(struct.PyTreeNode, meta.AxisMetadata):
  """A matmul kernel stored as int8 + per-column scale, or as bfloat16 (module docstring).

  Attributes:
    values: [in, out] int8 (mode 'int8') or bfloat16 (mode 'bfloat16').
    scale: [out] float32 per output column (int8), or None (bfloat16).
    mode: 'int8' or 'bfloat16' (static: part of the tree structure, not a traced leaf).
  """
  values: Array
  scale: Optional[Array]
  mode: str = struct.field(pytree_node=False, default="int8")

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape)

  def unbox(self) -> Array:
    """The float32 [in, out] kernel (Flax calls this where a module reads the parameter)."""
    return dequantize_kernel(self)

  def replace_boxed(self, val: Array) -> "QuantizedKernel":
    """A new float32 value in the box is quantized the same way."""
    return quantize_kernel(val, self.mode)

  def add_axis(self, index: int, params: dict) -> "QuantizedKernel":
    raise NotImplementedError("quantized kernels do not pass through nn.scan / nn.vmap "
                              "(DIM's modules use neither)")

  def remove_axis(self, index: int, params: dict) -> "QuantizedKernel":
    raise NotImplementedError("quantized kernels do not pass through nn.scan / nn.vmap "
                              "(DIM's modules use neither)")


def quantize_kernel(kernel: Array, mode: str) -> QuantizedKernel:
  """One [in, out] float kernel -> `QuantizedKernel` ('int8' or 'bfloat16')."""
  if np.ndim(kernel) != 2:
    raise ValueError(f"quantize_kernel expects an [in, out] kernel, got shape {np.shape(kernel)}")
  if mode not in ("int8", "bfloat16"):
    raise ValueError(f"kernel mode {mode!r}; expected 'int8' or 'bfloat16'")
  return _quantize_kernel(jnp.asarray(kernel, jnp.float32), mode)


@functools.partial(jax.jit, static_argnames=("mode",))
def _quantize_kernel(kernel: Array, mode: str) -> QuantizedKernel:
  # One compiled program per kernel shape (not one per op and shape, as op by op).
  if mode == "bfloat16":
    return QuantizedKernel(kernel.astype(jnp.bfloat16), None, mode="bfloat16")
  peak = jnp.max(jnp.abs(kernel), axis=0)
  scale = jnp.where(peak > 0, peak / INT8_MAX, 1.0).astype(jnp.float32)
  values = jnp.clip(jnp.round(kernel / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return QuantizedKernel(values, scale, mode="int8")


def dequantize_kernel(kernel: QuantizedKernel) -> Array:
  """float32 [in, out]: values x scale (int8) or the bfloat16 values widened."""
  values = kernel.values.astype(jnp.float32)
  return values if kernel.scale is None else values * kernel.scale


def _is_box(x: Any) -> bool:
  return isinstance(x, QuantizedKernel)


def _path_str(path) -> str:
  # As training/checkpointing.path_str (models do not import training).
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def quantize_params(params: Any, mode: str, *, kernels: str = DECODER_KERNELS) -> QuantizedParams:
  """The tree with every selected kernel quantized to `mode`; other leaves untouched.

  Args:
    params: a param tree (the task's {'dim': ..., 'speaker_vq': ..., ...} or any subtree).
    mode: 'float32' (`params` itself, unchanged), 'bfloat16' or 'int8'.
    kernels: regex searched in each leaf's '/'-joined path; matching 2-D leaves are quantized.

  Returns:
    The same structure with `QuantizedKernel` boxes in place of the selected kernels. Kernels
    already quantized to `mode` are kept (quantizing twice is a no-op); a different mode is
    refused, since the float32 values are gone.
  """
  if mode not in MODES:
    raise ValueError(f"weights={mode!r}; expected one of {MODES}")
  if mode == "float32":  # the very same tree: float32 generation is untouched
    already = quantized_paths(params)
    if already:
      raise ValueError(f"{already[0]} is already quantized; float32 needs the float32 params")
    return params
  pattern = re.compile(kernels)

  def leaf(path, x):
    if _is_box(x):
      if x.mode != mode:
        raise ValueError(f"{_path_str(path)} is already quantized to {x.mode}; quantize the "
                         f"float32 params to {mode} instead")
      return x
    if np.ndim(x) != 2 or not pattern.search(_path_str(path)):
      return x
    return quantize_kernel(x, mode)

  return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=_is_box)


def dequantize(quantized: QuantizedParams) -> Any:
  """The float32 param tree of `quantize_params`'s result (other leaves as they are)."""
  return jax.tree.map(lambda x: x.unbox() if _is_box(x) else x, quantized, is_leaf=_is_box)


def quantized_paths(quantized: QuantizedParams) -> list[str]:
  """'/'-joined paths of the quantized kernels in a tree."""
  found = []
  jax.tree_util.tree_map_with_path(lambda path, x: found.append(_path_str(path)) if _is_box(x)
                                   else None, quantized, is_leaf=_is_box)
  return found


def tree_bytes(tree: Any) -> int:
  """Bytes the arrays of a (possibly quantized) tree take: values, scales and the rest."""
  return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))
