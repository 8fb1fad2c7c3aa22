r"""Import an official PyTorch checkpoint as a dim_jax run directory.

    python -m dim_jax.import_official --checkpoint model.pth.tar --phase vq_listener \
        --workdir runs/vq_listener_official
    python -m dim_jax.import_official --checkpoint best_vico_causal.pt --phase listener \
        --workdir runs/ft_listener_official --max_len 64

`--phase`: `vq_listener`, `vq_speaker` (VQAutoEncoder), `pretrain` (SLM), `listener`
(SLMFT), `speaker` (SpeakerSLMFT; its BiWi mesh converter and speaker table are not used).
Files: `.pth` / `.pth.tar` / `.pt` read with `torch.load(weights_only=True)` (a dict holding
`state_dict` or `model`, or the bare state_dict; nothing in the file is executed), or
`.safetensors` read without torch. DataParallel's `module.` prefix is removed, older
x-transformers LayerNorm names (`gamma`, zero `beta` buffers) are mapped as the official
fine-tuning script does, and a tokenizer can be taken out of an SLM/SLMFT file
(`speaker_vq.*` / `listener_vq.*`).

The workdir gets what a phase of ours leaves (`checkpoints/` with one Orbax step holding the
params, and meta = the task's model meta + run config; `config.json`), so `generate`,
`evaluate` and the later phases (`init.*`) accept it like one of ours. Sizes are read off the
shapes; what shapes cannot tell (head counts) comes from `--heads`/`--dim_head`/
`--decoder_heads`/`--vq_heads` (official defaults 12 x 64 and 8), or from the `FILE.json`
that `dim_jax.export` writes beside its files (`--hparams`), which reproduces an exported
run exactly. Without that JSON the official switches are set: VQ
`positional_encoding='official_first_row'`, no decoder positions in SLMFT, and
`data.normalize='none'` (the official code trains on raw features; the meta records
normalization None).

Bad files stop with one line naming the file and what does not fit (missing and unexpected
keys with their shapes); keys of the official class that dim_jax does not use are printed.

The official code tokenizes one sample at a time wherever tokens feed DIM (positional table
row 0 for every sample): `official_first_row` does the same for every row of our batches, so
batched generation and evaluation of an imported tokenizer give the official tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Optional

import jax
import ml_collections
import numpy as np

from dim_jax import config_lib, errors, files
from dim_jax import torch_layout as layout
from dim_jax.data import normalization as normalization_lib
from dim_jax.models import vqvae
from dim_jax.training import checkpointing, dim_tasks
from dim_jax.training import vq as vq_lib

# --phase values -> (dim_jax phase, VQ role).
PHASES = {"vq_listener": ("vq", "listener"), "vq_speaker": ("vq", "speaker"),
          "pretrain": ("pretrain", None), "listener": ("finetune_listener", None),
          "speaker": ("finetune_speaker", None), "finetune_listener": ("finetune_listener", None),
          "finetune_speaker": ("finetune_speaker", None)}
OFFICIAL_VQ_HEADS = 8
# Stored sinusoid buffers vs the table dim_jax computes: float32 sin/cos of position x
# frequency, where one ulp of a frequency moves the argument at row 5000 by ~5e-4 (measured
# torch vs NumPy, hidden 384: 7e-4 at row ~4800, 3e-5 over the first 256 rows). A buffer that
# was changed or learned differs by O(1).
PE_TOLERANCE = 2e-3
PE_ROWS_USED = 256  # rows a batch (official_batch_index) or a window ('time') reads in practice
_LISTED = 12  # keys named in a one-line error before "... and N more"
PRINTED = 20  # unmatched keys printed (all are recorded)


class CheckpointFileError(layout.LayoutError):
  """An official checkpoint cannot be read or does not fit the requested phase."""


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def _listing(items: dict[str, tuple]) -> str:
  names = [f"{k} {list(v)}" for k, v in sorted(items.items())]
  more = f" ... and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
  return ", ".join(names[:_LISTED]) + more


# --- reading ------------------------------------------------------------------------------

def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], list[str]]:
  """({name: float32 array}, notes) of a .pth/.pth.tar/.pt/.safetensors checkpoint."""
  if not os.path.isfile(path):
    raise CheckpointFileError(f"{path}: no such file")
  notes = []
  if path.endswith(".safetensors"):
    try:
      from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise CheckpointFileError(
          f"{path}: reading .safetensors needs the `safetensors` package") from None
    try:
      raw = safetensors_numpy.load_file(path)
    except Exception as error:  # pylint: disable=broad-except
      raise CheckpointFileError(
          f"{path}: not a readable safetensors file ({_first_line(error)})") from None
  else:
    raw = _torch_load(path)
  state_dict = {}
  for key, value in raw.items():
    array = value.detach().cpu().float().numpy() if hasattr(value, "detach") else np.asarray(value)
    if array.dtype.kind != "f":
      raise CheckpointFileError(
          f"{path}: entry {key} is {array.dtype}, not a floating-point tensor")
    state_dict[key] = np.asarray(array, np.float32)
  return _official_names(state_dict, path, notes), notes


def _torch_load(path: str) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointFileError(
        f"{path}: reading PyTorch files needs torch (or convert the file to .safetensors)"
    ) from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as error:  # pylint: disable=broad-except
    raise CheckpointFileError(f"{path}: cannot be read as a PyTorch checkpoint with "
                              f"weights_only=True ({_first_line(error)})") from None
  if isinstance(obj, dict):
    for key in ("state_dict", "model"):
      if isinstance(obj.get(key), dict):
        obj = obj[key]
        break
  if not isinstance(obj, dict) or not obj:
    raise CheckpointFileError(
        f"{path}: holds a {type(obj).__name__}, not a state_dict (a dict of tensors, or a dict "
        "with a 'state_dict' or 'model' entry)")
  not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
  if not_tensors:
    names = ", ".join(map(str, not_tensors[:_LISTED]))
    raise CheckpointFileError(f"{path}: entries that are not tensors: {names}")
  return obj


def _official_names(sd: dict[str, np.ndarray], path: str, notes: list[str]) -> dict:
  """Removes DataParallel's prefix; maps older x-transformers LayerNorm names."""
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
    notes.append("removed the DataParallel prefix 'module.'")
  out, renamed, dropped = {}, 0, 0
  for key, value in sd.items():
    if key.endswith(".gamma"):
      out[key[:-len("gamma")] + "weight"] = value
      renamed += 1
    elif key.endswith(".beta") and ".attn_layers." in key:
      if np.any(value):
        raise CheckpointFileError(
            f"{path}: {key} is a nonzero LayerNorm bias; x-transformers 1.30.16 LayerNorms "
            "have none")
      dropped += 1
    else:
      out[key] = value
  if renamed or dropped:
    notes.append(f"older x-transformers LayerNorm names: {renamed} '.gamma' -> '.weight', "
                 f"{dropped} zero '.beta' buffers dropped (as the official fine-tuning script)")
  return out


def _shapes(sd: dict[str, np.ndarray]) -> dict[str, tuple]:
  return {k: tuple(v.shape) for k, v in sd.items()}


# --- fitting a state_dict to a task --------------------------------------------------------

def _check_fit(path: str, sd: dict, expected: layout.Shapes, needed: set[str],
               what: str) -> dict[str, tuple]:
  """Refuses missing/unexpected/misshapen keys; returns the official keys left unused."""
  got = _shapes(sd)
  missing = {k: expected[k] for k in needed if k not in got}
  unexpected = {k: got[k] for k in got if k not in expected}
  differs = {k: f"file {list(got[k])} vs {list(expected[k])}" for k in got
             if k in expected and got[k] != tuple(expected[k])}
  if missing or unexpected or differs:
    parts = []
    if missing:
      parts.append(f"missing {_listing(missing)}")
    if unexpected:
      parts.append(f"unexpected {_listing(unexpected)}")
    if differs:
      parts.append("shape differs " + ", ".join(
          f"{k} {v}" for k, v in sorted(differs.items())[:_LISTED]))
    raise CheckpointFileError(
        f"{path}: does not fit the official {what} layout: " + "; ".join(parts))
  return {k: got[k] for k in got if k not in needed}


def _check_pe(path: str, sd: dict, prefix: str, hidden: int) -> Optional[tuple[float, float]]:
  """(max |stored - computed| over all rows, over the first rows) of the tokenizer's sinusoid
  buffers; None when the file has none."""
  worst = None
  for key in layout.VQ_BUFFERS:
    if prefix + key not in sd:
      continue
    diff = np.abs(sd[prefix + key] - layout.pe_buffer(hidden))
    if float(diff.max()) > PE_TOLERANCE:
      raise CheckpointFileError(
          f"{path}: {prefix + key} differs from the sinusoid table by {float(diff.max()):.3g} "
          "(dim_jax computes the table; a changed buffer cannot be imported)")
    found = (float(diff.max()), float(diff[:PE_ROWS_USED].max()))
    worst = found if worst is None else (max(worst[0], found[0]), max(worst[1], found[1]))
  return worst


def _pe_note(diffs: list) -> list[str]:
  diffs = [d for d in diffs if d is not None]
  if not diffs:
    return ["no positional-encoding buffers in the file (dim_jax computes them)"]
  return [f"positional-encoding buffers match the sinusoid table dim_jax computes (max |diff| "
          f"{max(d[0] for d in diffs):.1e}, {max(d[1] for d in diffs):.1e} over the first "
          f"{PE_ROWS_USED} rows: float32 rounding)"]


def _abstract_params(task, frames: int = 8):
  """The task's parameter shapes (what `init_params` makes), traced, not computed.

  The dummy batch is built here rather than by the data pipeline, whose import loads
  TensorFlow (seconds) for nothing.
  """
  if isinstance(task, vq_lib.VQTask):
    batch = {task.motion_key: np.zeros((1, frames, task.model.config.in_dim), np.float32)}
  else:
    cfg = task.model.config
    motion = np.zeros((1, frames, cfg.motion_dim), np.float32)
    batch = dict(speaker_motion=motion, listener_motion=motion,
                 speaker_audio=np.zeros((1, frames, cfg.audio_dim), np.float32))
  batch["mask"] = np.ones((1, frames), bool)
  return jax.eval_shape(lambda r: task.init_params(r, batch), jax.random.PRNGKey(0))


def _verified(path: str, abstract, params: dict) -> dict:
  problems = checkpointing.tree_mismatches(abstract, params)
  if problems:
    raise CheckpointFileError(f"{path}: the mapped parameters do not fit the model: "
                              + "; ".join(problems[:_LISTED]))
  return params


def _exported_meta(hparams: Optional[dict], phase: str, role: Optional[str], path: str):
  """The dim_jax meta recorded by `dim_jax.export` (None for official files)."""
  if not hparams or "dim_jax" not in hparams:
    return None
  meta = hparams["dim_jax"]
  if meta.get("phase") != phase or (role and meta.get("role") != role):
    recorded = f"phase {meta.get('phase')!r}" + (f" role {meta.get('role')!r}"
                                                 if meta.get("role") else "")
    wanted = f"phase {phase!r}" + (f" role {role!r}" if role else "")
    raise CheckpointFileError(f"{path}: its JSON records {recorded}, not {wanted}")
  return meta


def _vq_task(sd, path, role, meta, vq_heads, notes):
  """(config, task, params) of a tokenizer state_dict (prefix already removed)."""
  if meta is not None:
    config = ml_collections.ConfigDict(meta["config"])
    normalization = normalization_lib.from_meta(meta, path)
  else:
    inferred = layout.infer_vq_config(_shapes(sd), vq_heads or OFFICIAL_VQ_HEADS, path)
    config = config_lib.vq_config(role)
    config.model.update(inferred)
    config.model.positional_encoding = "official_first_row"
    config.data.normalize = "none"
    normalization = None
  task = vq_lib.VQTask.from_config(config, normalization)
  cfg = task.model.config
  needed = {k for k, _, _ in layout.vq_entries(cfg)}
  _check_fit(path, sd, layout.vq_official_shapes(cfg), needed, "VQAutoEncoder")
  notes += _pe_note([_check_pe(path, sd, "", cfg.hidden_size)])
  return config, task, _verified(path, _abstract_params(task), layout.vq_from_torch(sd, cfg))


def _dim_task(sd, path, phase, meta, heads, dim_head, decoder_heads, vq_heads, max_len, notes):
  """(config, task, params, unused official keys) of an SLM/SLMFT/SpeakerSLMFT state_dict."""
  shapes = _shapes(sd)
  if meta is not None:
    config = ml_collections.ConfigDict(meta["config"])
    vq_configs = dict(speaker_vq=meta["speaker_vq"], listener_vq=meta["listener_vq"])
    normalization = normalization_lib.from_meta(meta, path)
  else:
    config = config_lib.dim_config(phase)
    inferred = layout.infer_dim_config(shapes, path, heads=heads, dim_head=dim_head,
                                       decoder_heads=decoder_heads)
    official_positions = phase != "finetune_listener"
    if inferred["decoder_positions"] != official_positions:
      other = "listener" if official_positions else "pretrain or speaker"
      raise CheckpointFileError(
          f"{path}: the official {layout.OFFICIAL_CLASSES[phase]} decoder has "
          f"{'' if official_positions else 'no '}absolute positions "
          "(decoder_joint.net.pos_emb.emb.weight) and this file "
          f"{'does not' if official_positions else 'does'}: a checkpoint of another phase? "
          f"(try --phase {other})")
    config.model.update(inferred)
    vq_configs = {}
    for role in ("speaker", "listener"):
      prefix = f"{role}_vq."
      fields = layout.infer_vq_config({k[len(prefix):]: v for k, v in shapes.items()
                                       if k.startswith(prefix)},
                                      vq_heads or OFFICIAL_VQ_HEADS, f"{path} ({role}_vq)")
      vq_configs[f"{role}_vq"] = vqvae.VQConfig(**fields,
                                                positional_encoding="official_first_row")
    config.data.normalize = "none"
    normalization = None
    if max_len is None:
      per_role = config.model.max_seq_len // (2 if phase == "pretrain" else 1)
      max_len = min(int(config.data.max_len), per_role)
  if max_len is not None:
    config.data.max_len = int(max_len)
  task = dim_tasks.DIMTask.from_config(config, normalization=normalization, **vq_configs)
  cfg, spk, lst = task.model.config, task.speaker_vq.config, task.listener_vq.config
  # Which official keys our model reads: the export of a zero tree of our shapes.
  abstract = _abstract_params(task)
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  candidates, unmapped = layout.dim_to_torch(zeros, cfg, spk, lst)
  official = layout.dim_official_shapes(phase, cfg, spk, lst)
  comparison = layout.compare(candidates, official, unmapped)
  if comparison.ours_only or comparison.shape_differs:
    extra = {**comparison.ours_only,
             **{k: v["ours"] for k, v in comparison.shape_differs.items()}}
    raise CheckpointFileError(
        f"{path}: this model has parameters with no place in the official "
        f"{layout.OFFICIAL_CLASSES[phase]}: {_listing(extra)}")
  # Needed: what our model reads (the pe buffers are computed); the rest of the official
  # layout (SpeakerSLMFT's mesh converter, ...) may be absent, as in exports of ours.
  needed = {k for k in comparison.state_dict if not k.endswith(layout.VQ_BUFFERS)}
  unused = _check_fit(path, sd, official, needed, layout.OFFICIAL_CLASSES[phase])
  notes += _pe_note([_check_pe(path, sd, f"{role}_vq.", vq.hidden_size)
                     for role, vq in (("speaker", spk), ("listener", lst))])
  unused = {k: v for k, v in unused.items() if not k.endswith(layout.VQ_BUFFERS)}
  params = _verified(path, abstract, layout.dim_from_torch(sd, cfg, spk, lst))
  return config, task, params, unused


# --- writing the run ------------------------------------------------------------------------

def write_run(workdir: str, task, config, params: dict, *, step: int, source: dict) -> str:
  """One Orbax step in `workdir/checkpoints` with the meta a phase of ours writes."""
  files.ensure_writable_dir(workdir)
  directory = os.path.join(workdir, "checkpoints")
  if os.path.isdir(directory) and os.listdir(directory):
    raise CheckpointFileError(
        f"{directory} already holds checkpoints; import into a new workdir")
  meta = dict(task.model_meta(), config=json.loads(config.to_json_best_effort()),
              batches_consumed=0, imported_from=source)
  state = dict(step=np.int32(step), params=params,
               rng=np.asarray(jax.random.PRNGKey(int(config.seed))))
  ckpt = checkpointing.Checkpointer(directory, keep=1)
  try:
    ckpt.save(step, state, meta=meta)
  finally:
    ckpt.close()
  files.write_text_atomic(os.path.join(workdir, "config.json"),
                          config.to_json_best_effort(indent=2))
  return directory


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def import_checkpoint(checkpoint: str, phase_name: str, workdir: str, *,
                      hparams: Optional[str] = None, max_len: Optional[int] = None,
                      heads: Optional[int] = None, dim_head: Optional[int] = None,
                      decoder_heads: Optional[int] = None, vq_heads: Optional[int] = None,
                      step: int = 0) -> dict:
  """Imports `checkpoint` as phase `phase_name` into `workdir`; returns a summary dict."""
  if phase_name not in PHASES:
    raise CheckpointFileError(f"--phase={phase_name!r}; expected one of {sorted(PHASES)}")
  phase, role = PHASES[phase_name]
  if hparams is None and os.path.isfile(checkpoint + ".json"):
    hparams = checkpoint + ".json"
  description = None
  if hparams:
    try:
      with open(hparams, encoding="utf-8") as f:
        description = json.load(f)
    except (OSError, ValueError) as error:
      raise CheckpointFileError(
          f"{hparams}: cannot be read as JSON ({_first_line(error)})") from None
  meta = _exported_meta(description, phase, role, checkpoint)
  sd, notes = read_state_dict(checkpoint)
  if phase == "vq":
    prefix = f"{role}_vq."
    if any(k.startswith(prefix) for k in sd):  # a tokenizer inside an SLM / SLMFT file
      notes.append(f"took the {role} tokenizer ({prefix}*) out of a DIM checkpoint")
      sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    config, task, params = _vq_task(sd, checkpoint, role, meta, vq_heads, notes)
    unused = {}
  else:
    config, task, params, unused = _dim_task(sd, checkpoint, phase, meta, heads, dim_head,
                                             decoder_heads, vq_heads, max_len, notes)
  source = dict(file=os.path.abspath(checkpoint), sha256=_sha256(checkpoint),
                official_class=layout.OFFICIAL_CLASSES[phase], hparams=hparams,
                not_used={k: list(v) for k, v in unused.items()})
  directory = write_run(workdir, task, config, params, step=step, source=source)
  return dict(phase=phase, role=role, checkpoints=directory, step=step, notes=notes,
              not_used=unused, official_switches=meta is None,
              num_parameters=int(sum(np.size(v) for v in jax.tree.leaves(params))))


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dim_jax.import_official",
      description="Import an official PyTorch DIM checkpoint as a dim_jax run directory.")
  parser.add_argument("--checkpoint", required=True, help=".pth / .pth.tar / .pt / .safetensors")
  parser.add_argument("--phase", required=True, choices=sorted(PHASES))
  parser.add_argument("--workdir", required=True, help="new run directory to write")
  parser.add_argument("--hparams", default=None,
                      help="JSON written by dim_jax.export (default: CHECKPOINT.json if present)")
  parser.add_argument("--max_len", type=int, default=None,
                      help="data.max_len recorded for the run (generation window)")
  parser.add_argument("--heads", type=int, default=None, help="encoder heads (official 12)")
  parser.add_argument("--dim_head", type=int, default=None, help="head width (official 64)")
  parser.add_argument("--decoder_heads", type=int, default=None, help="decoder heads (official 12)")
  parser.add_argument("--vq_heads", type=int, default=None, help="VQ-VAE heads (official 8)")
  parser.add_argument("--step", type=int, default=0, help="step number of the written checkpoint")
  args = parser.parse_args(argv)
  try:
    summary = import_checkpoint(args.checkpoint, args.phase, args.workdir, hparams=args.hparams,
                                max_len=args.max_len, heads=args.heads, dim_head=args.dim_head,
                                decoder_heads=args.decoder_heads, vq_heads=args.vq_heads,
                                step=args.step)
  except errors.DimJaxError as error:
    if os.environ.get("DIM_JAX_TRACEBACK"):
      raise
    print(f"dim_jax: error: {error}", file=sys.stderr)
    return 1
  how = ("official switches: VQ positional_encoding='official_first_row', "
         "data.normalize='none'" + (", no decoder positions" if summary["phase"] ==
                                    "finetune_listener" else "")
         if summary["official_switches"] else "configuration from the export's JSON")
  print(f"{args.workdir}: {summary['phase']}{' ' + summary['role'] if summary['role'] else ''} "
        f"run, {summary['num_parameters']:,} parameters from {args.checkpoint} at step "
        f"{summary['step']} ({how})")
  for note in summary["notes"]:
    print(f"  {note}")
  unused = [f"not used by dim_jax: {k} {list(v)}" for k, v in summary["not_used"].items()]
  for line in unused[:PRINTED]:
    print(f"  {line}")
  if len(unused) > PRINTED:
    print(f"  ... and {len(unused) - PRINTED} more not used (listed in the checkpoint's meta, "
          "imported_from.not_used)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
