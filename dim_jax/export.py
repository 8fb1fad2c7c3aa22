r"""Export a dim_jax checkpoint as a state_dict of the official PyTorch classes.

    python -m dim_jax.export --workdir runs/ft_listener --out slmft.pth
    python -m dim_jax.export --workdir runs/vq_listener --out vq.safetensors \
        --format safetensors --step latest

Any phase's checkpoint: `vq` -> `VQAutoEncoder` (models/stage1_BIWI.py), `pretrain` -> `SLM`,
`finetune_listener` -> `SLMFT`, `finetune_speaker` -> `SpeakerSLMFT` (seq2seq_pretrain.py,
x-transformers 1.30.16), with the official names, shapes and layouts (`torch_layout.py`).

Writes two files, each under a temporary name then renamed:
  FILE        torch: `torch.save` of a plain {name: tensor} dict (load with
              `torch.load(FILE, weights_only=True)`); safetensors: `safetensors.numpy`
              (no torch needed to write or read).
  FILE.json   what constructs the official class (`constructor`: the config.yaml fields of
              each tokenizer, the SLM/SLMFT sizes), the lists of what does not match
              (`official_only`, `ours_only`, `shape_differs`, `generated`), the switches under
              which the official class computes something else (`behaviour_differences`),
              the input normalization the weights expect, and the checkpoint's own meta
              (`dim_jax`), from which `dim_jax.import_official` rebuilds the run exactly.
The unmatched lists are printed too; nothing is dropped without a line saying so.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Any, Optional

import numpy as np

from dim_jax import errors, files
from dim_jax import torch_layout as layout
from dim_jax.training import checkpointing, dim_tasks

FORMATS = ("torch", "safetensors")
JSON_FORMAT = "dim_jax.export/1"
PRINTED = 20  # unmatched lines printed (the JSON lists all)
OFFICIAL_REPOSITORY = "github.com/Boese0601/Dyadic-Interaction-Modeling (code/)"


def json_path(out: str) -> str:
  """Where the hyper-parameter JSON of an export named `out` lives."""
  return out + ".json"


def official_state_dict(params: Any, meta: dict) -> tuple[layout.Comparison, dict]:
  """(the comparison against the official layout, the JSON description) of a checkpoint.

  Args:
    params: the checkpoint's params (host arrays), as `checkpointing.load_params` returns.
    meta: its meta.
  """
  phase = meta.get("phase")
  if phase not in layout.OFFICIAL_CLASSES:
    raise layout.LayoutError(f"checkpoint phase {phase!r} has no official class; expected one "
                             f"of {sorted(layout.OFFICIAL_CLASSES)}")
  if phase == "vq":
    cfg = dim_tasks.vq_config_from_meta(meta["model"])
    comparison = layout.compare(layout.vq_to_torch(params, cfg), layout.vq_official_shapes(cfg),
                                {}, layout.VQ_BUFFERS)
    constructor = dict(args=layout.vq_official_args(cfg))
    differences = layout.vq_behaviour_differences(cfg)
  else:
    task = dim_tasks.DIMTask.from_meta(meta)
    cfg, spk, lst = task.model.config, task.speaker_vq.config, task.listener_vq.config
    candidates, unmapped = layout.dim_to_torch(params, cfg, spk, lst)
    buffers = [f"{role}_vq.{b}" for role in ("speaker", "listener") for b in layout.VQ_BUFFERS]
    comparison = layout.compare(candidates, layout.dim_official_shapes(phase, cfg, spk, lst),
                                unmapped, buffers)
    constructor = dict(args=layout.dim_official_args(cfg), speaker_vq=layout.vq_official_args(spk),
                       listener_vq=layout.vq_official_args(lst),
                       decoder_use_abs_pos_emb=phase != "finetune_listener",
                       decoder_mask_prob=0.15 if phase == "finetune_listener" else 0.0)
    if phase == "finetune_speaker":
      constructor["mesh_converter"] = dict(mesh_size=layout.BIWI_MESH_SIZE,
                                           lstm_hidden=layout.BIWI_LSTM_HIDDEN,
                                           speaker_rows=layout.OFFICIAL_SPEAKER_ROWS)
    differences = (layout.dim_behaviour_differences(phase, cfg)
                   + layout.vq_behaviour_differences(spk, "speaker_vq: ")
                   + layout.vq_behaviour_differences(lst, "listener_vq: "))
  normalization = meta.get("normalization")
  if normalization is not None:
    differences.append("inputs: the weights expect features standardised with `normalization` "
                       "(raw = normalized * std + mean per stream); the official code feeds raw "
                       "features")
  description = dict(
      format=JSON_FORMAT, official_class=layout.OFFICIAL_CLASSES[phase],
      official_code=OFFICIAL_REPOSITORY, x_transformers=layout.X_TRANSFORMERS_VERSION,
      phase=phase, role=meta.get("role"), constructor=constructor,
      num_tensors=len(comparison.state_dict),
      num_parameters=int(sum(np.size(v) for k, v in comparison.state_dict.items()
                             if k not in comparison.generated)),
      generated=comparison.generated,
      official_only={k: list(v) for k, v in comparison.official_only.items()},
      ours_only={k: list(v) for k, v in comparison.ours_only.items()},
      shape_differs={k: {s: list(v[s]) for s in v} for k, v in comparison.shape_differs.items()},
      behaviour_differences=differences, normalization=normalization,
      dim_jax={k: v for k, v in meta.items() if k != "checksums"})
  return comparison, description


def serialize(state_dict: dict[str, np.ndarray], fmt: str) -> bytes:
  """The file bytes of a {name: float32 array} state_dict in `fmt`."""
  arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()}
  if fmt == "safetensors":
    try:
      from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise errors.DimJaxError("--format safetensors needs the `safetensors` package "
                               "(pip install safetensors)") from None
    return safetensors_numpy.save(arrays)
  if fmt != "torch":
    raise errors.DimJaxError(f"--format={fmt!r}; expected one of {FORMATS}")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.DimJaxError("--format torch needs PyTorch; install it or use --format "
                             "safetensors") from None
  buffer = io.BytesIO()
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, buffer)
  return buffer.getvalue()


def export(workdir: str, out: str, fmt: str = "torch", step: Optional[str] = "best") -> dict:
  """Writes `out` and `out.json` from the checkpoint of `workdir`; returns the JSON dict."""
  params, meta = checkpointing.load_params(workdir, step)
  comparison, description = official_state_dict(params, meta)
  description["source"] = dict(workdir=os.path.abspath(workdir), step=meta.get("step"))
  description["file_format"] = fmt
  data = serialize(comparison.state_dict, fmt)
  files.atomic_write_many({out: data, json_path(out): files.json_bytes(description)})
  description["unmatched"] = comparison.unmatched_lines()
  return description


def _step_arg(value: str):
  return value if value in ("best", "latest") else int(value)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dim_jax.export",
      description="Export a dim_jax checkpoint as an official PyTorch state_dict (+ FILE.json).")
  parser.add_argument("--workdir", required=True, help="a phase's workdir (checkpoints/ inside)")
  parser.add_argument("--out", required=True, help="the state_dict file to write")
  parser.add_argument("--format", default="torch", choices=FORMATS)
  parser.add_argument("--step", default="best", type=_step_arg,
                      help="best (by validation loss), latest, or a step number")
  args = parser.parse_args(argv)
  try:
    description = export(args.workdir, args.out, args.format, args.step)
  except errors.DimJaxError as error:
    if os.environ.get("DIM_JAX_TRACEBACK"):
      raise
    print(f"dim_jax: error: {error}", file=sys.stderr)
    return 1
  print(f"{args.out}: {description['official_class']} state_dict of {description['num_tensors']} "
        f"tensors ({description['num_parameters']:,} parameters) from {args.workdir} step "
        f"{description['source']['step']} ({description['phase']}); hyper-parameters in "
        f"{json_path(args.out)}")
  unmatched = description["unmatched"]
  for line in unmatched[:PRINTED]:
    print(f"  {line}")
  if len(unmatched) > PRINTED:
    print(f"  ... and {len(unmatched) - PRINTED} more unmatched (all listed in "
          f"{json_path(args.out)})")
  for line in description["behaviour_differences"]:
    print(f"  differs from the official class: {line}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
