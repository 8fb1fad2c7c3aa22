"""Generated motion in the files the official rendering path reads.

The official code renders a clip in two steps, both PyTorch, both needing licensed models:

1. `code/postprocess2emoca.py` reads a predictions pickle (`listener_predictions.pkl`: a dict
   `y_pred` / `y_true` = lists of [T, 56] arrays, `data_ids` = list of clip paths whose file
   stem names the clip), smooths every dim with a 10-frame moving average, and writes one folder
   per frame in the EMOCA layout: `<out>/<clip_id>/<frame>/pose.npy` (6: global rotation 3 +
   jaw 3) and `exp.npy` (50 expression coefficients).
2. `code/Pirender/inference_newmodel.py --customfeatdir <out>` reads those per-frame folders
   (plus a first frame image of the listener per clip) and renders one image per frame.

`generate` can write both (`generate.formats`): `pickle` (per sample, the official keys) and
`emoca` (the per-frame folders, so step 1 can be skipped), plus `render.md` saying which script
takes which file. Everything is in raw units (never standardised).

Difference from the official post-processing (optional here, `generate.emoca_smoothing`): its
moving average leaves the first w/2 and last w/2 - 1 frames at exactly zero (the loop that
was meant to keep them is a no-op), which renders as a head snapping to the zero pose at both
ends; our smoothing averages over the frames that exist there (a shrinking window).
"""

from __future__ import annotations

import os
import pickle
from typing import Optional, Sequence

import numpy as np

from dim_jax import files
from dim_jax.data import records
from dim_jax.data import safe_pickle

FORMATS = ("npy", "emoca", "pickle")
POSE_DIM = 6
# The file stem postprocess2emoca.py reads (`data_ids[i].split('/')[-1].split('.')[0]`).
PREDICTIONS_NAME = "{role}_predictions_sample_{sample}.pkl"


class HandoffError(ValueError):
  """A hand-off file or folder that cannot be read back as motion."""


def parse_formats(value: str | Sequence[str]) -> tuple[str, ...]:
  """`"npy,emoca"` or a sequence -> a tuple of known formats, in FORMATS order."""
  names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]
  names = [n for n in names if n]
  unknown = sorted(set(names) - set(FORMATS))
  if unknown or not names:
    raise ValueError(f"generate.formats={value!r}: expected a comma-separated subset of "
                     f"{', '.join(FORMATS)}")
  return tuple(f for f in FORMATS if f in names)


def smooth(motion: np.ndarray, window: int) -> np.ndarray:
  """Centred moving average over `window` frames per dim, [T, D] -> [T, D] float32.

  Frames t - window//2 .. t + (window - 1 - window//2) as in the official `np.convolve(...,
  'valid')` placement; near the ends only the frames that exist are averaged (the official
  code writes zeros there). window <= 1 returns the input.
  """
  motion = np.asarray(motion, np.float64)
  if window <= 1 or motion.shape[0] == 0:
    return motion.astype(np.float32)
  frames = motion.shape[0]
  before, after = window // 2, window - 1 - window // 2
  cumulative = np.concatenate([np.zeros((1, motion.shape[1])), np.cumsum(motion, axis=0)])
  t = np.arange(frames)
  lo = np.clip(t - before, 0, frames)
  hi = np.clip(t + after + 1, 0, frames)
  return ((cumulative[hi] - cumulative[lo]) / (hi - lo)[:, None]).astype(np.float32)


def clip_folder_name(clip_id: str) -> str:
  """The clip's folder (and pickle data id): the clip id, made file-safe as for `.npy` files.

  PIRender matches a folder to the listener's first-frame image by this name, so ids that are
  already file-safe (the official ViCo ids are) keep it unchanged.
  """
  return files.clip_filename(clip_id, suffix="")


def write_emoca_frames(clip_dir: str, motion: np.ndarray) -> None:
  """`<clip_dir>/<frame>/pose.npy` (6,) and `exp.npy` (50,), float32, frame = 0..T-1.

  Written into a temporary sibling folder and renamed, so a reader never sees half a clip.
  """
  motion = np.asarray(motion, np.float32)
  if motion.ndim != 2 or motion.shape[1] != records.MOTION_DIM:
    raise ValueError(f"{clip_dir}: motion of shape {motion.shape}; expected [T, "
                     f"{records.MOTION_DIM}]")
  parent = os.path.dirname(os.path.abspath(clip_dir))
  os.makedirs(parent, exist_ok=True)
  staging = os.path.join(parent, f".{os.path.basename(clip_dir)}.tmp{os.getpid()}")
  if os.path.exists(staging):
    _remove_tree(staging)
  try:
    for frame, values in enumerate(motion):  # one folder per frame is the format itself
      frame_dir = os.path.join(staging, str(frame))
      os.makedirs(frame_dir)
      np.save(os.path.join(frame_dir, "pose.npy"), values[:POSE_DIM])
      np.save(os.path.join(frame_dir, "exp.npy"), values[POSE_DIM:])
    if os.path.exists(clip_dir):
      _remove_tree(clip_dir)
    os.replace(staging, clip_dir)
  except OSError as error:
    _remove_tree(staging)
    raise files.explain_os_error(clip_dir, error) from None


def _remove_tree(path: str) -> None:
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(path, ignore_errors=True)


def read_emoca_frames(clip_dir: str) -> np.ndarray:
  """[T, 56] float32 from `<clip_dir>/<frame>/{pose,exp}.npy` (EMOCA's own output works too).

  Frames are ordered by their number (not by name: "10" after "9"); EMOCA's optional
  `EMOCA_v2_lr_mse_20/` level inside each frame folder is looked through.
  """
  try:
    entries = [e for e in os.listdir(clip_dir) if e.isdigit()]
  except OSError as error:
    raise HandoffError(f"{clip_dir}: cannot list frame folders ({error.strerror})") from None
  if not entries:
    raise HandoffError(f"{clip_dir}: no numbered frame folders (expected <frame>/pose.npy "
                       "and <frame>/exp.npy)")
  frames = sorted(entries, key=int)
  if [int(f) for f in frames] != list(range(len(frames))):
    raise HandoffError(f"{clip_dir}: frame folders are not 0..{len(frames) - 1} "
                       f"(found {frames[0]}..{frames[-1]}, {len(frames)} folders)")
  rows = []
  for frame in frames:
    frame_dir = os.path.join(clip_dir, frame)
    inner = os.path.join(frame_dir, "EMOCA_v2_lr_mse_20")
    if os.path.isdir(inner):
      frame_dir = inner
    parts = []
    for name, width in (("pose.npy", POSE_DIM), ("exp.npy", records.MOTION_DIM - POSE_DIM)):
      path = os.path.join(frame_dir, name)
      try:
        values = np.load(path, allow_pickle=False)
      except (OSError, ValueError) as error:
        raise HandoffError(f"{path}: cannot read ({error})") from None
      values = np.asarray(values, np.float32).reshape(-1)
      if values.shape[0] != width:
        raise HandoffError(f"{path}: {values.shape[0]} values; expected {width}")
      parts.append(values)
    rows.append(np.concatenate(parts))
  return np.stack(rows)


def write_predictions(path: str, predictions: Sequence[np.ndarray],
                      truths: Sequence[Optional[np.ndarray]], data_ids: Sequence[str]) -> None:
  """The official predictions pickle: dict(y_pred, y_true, data_ids), lists in clip order.

  `y_true` holds None for clips without a ground truth.
  """
  if not len(predictions) == len(truths) == len(data_ids):
    raise ValueError("predictions, truths and data_ids must have one entry per clip")
  payload = dict(
      y_pred=[np.asarray(p, np.float32) for p in predictions],
      y_true=[None if t is None else np.asarray(t, np.float32) for t in truths],
      data_ids=list(data_ids))
  files.atomic_write_bytes(path, pickle.dumps(payload, protocol=4))


def read_predictions(path: str) -> dict:
  """A predictions pickle (ours or the official code's) through the restricted unpickler."""
  payload = safe_pickle.load_pickle(path)
  if not isinstance(payload, dict) or not {"y_pred", "data_ids"} <= set(payload):
    raise HandoffError(f"{path}: expected a dict with keys y_pred, y_true, data_ids")
  if len(payload["y_pred"]) != len(payload["data_ids"]):
    raise HandoffError(f"{path}: {len(payload['y_pred'])} predictions for "
                       f"{len(payload['data_ids'])} data_ids")
  return payload


def render_instructions(*, role: str, formats: Sequence[str], num_samples: int,
                        smoothing: int, fps: Optional[float]) -> str:
  """`render.md`: which official script reads which of the files written beside it."""
  rate = f"{fps:g} fps" if fps else "the clips' frame rate"
  lines = [
      f"# Rendering these {role} clips with the official PyTorch tools",
      "",
      f"Motion here is in raw EMOCA units at {rate}: per frame 56 floats, pose (6: global "
      "head rotation 0:3 and jaw rotation 3:6, axis-angle radians) then 50 expression "
      "coefficients. Rendering needs the official repository "
      "(`Boese0601/Dyadic-Interaction-Modeling`) and its licensed models (FLAME/EMOCA, "
      "a PIRenderer checkpoint); nothing here needs them. For a look without them: "
      "`python -m dim_jax.evaluation.preview` (a schematic head).",
      ""]
  if smoothing > 1:
    lines += [f"The EMOCA folders were smoothed with a {smoothing}-frame moving average "
              "(`generate.emoca_smoothing`); the `.npy` files and the pickles are not.", ""]
  if "emoca" in formats:
    lines += [
        "## Per-frame EMOCA folders: `emoca/sample_<k>/<clip>/<frame>/{pose,exp}.npy`",
        "",
        "The layout `code/postprocess2emoca.py` writes and "
        "`code/Pirender/inference_newmodel.py` reads. Render sample 0:",
        "",
        "```",
        "cd Dyadic-Interaction-Modeling/code/Pirender",
        "python inference_newmodel.py --config config/face.yaml --single_gpu \\",
        f"    --customfeatdir /path/to/generated/emoca/sample_0/ --datanam dim_jax_{role}",
        "```",
        "",
        "It also needs `./datasets/vico/framsfst/<clip>.<n>.png` (a first frame of the "
        "listener of each clip; the folder name `<clip>` must equal its name here) and writes "
        f"`./datasets/vico/dim_jax_{role}/fake/<clip>.<n>/<frame>.png`. The script sets "
        "`opt.logdir` to its own checkpoint folder; edit it to where your PIRenderer "
        "checkpoint is.",
        ""]
  if "pickle" in formats:
    name = PREDICTIONS_NAME.format(role=role, sample="<k>")
    lines += [
        f"## Predictions pickles: `{name}`",
        "",
        "The dict `code/test_*.py` saves (`y_pred`, `y_true`: lists of [T, 56] float32 "
        "arrays; `data_ids`: the clip names). `code/postprocess2emoca.py` reads it as "
        "`listener_predictions.pkl` from its working directory and writes the EMOCA folders "
        "(with its own 10-frame smoothing, which zeroes the first 5 and last 4 frames):",
        "",
        "```",
        "cd Dyadic-Interaction-Modeling/code",
        f"cp /path/to/generated/{PREDICTIONS_NAME.format(role=role, sample=0)} "
        "listener_predictions.pkl",
        "python postprocess2emoca.py   # -> output_data_listener_new/<clip>/<frame>/",
        "```",
        ""]
  lines += [f"Samples: {num_samples} (`sample_0` .. `sample_{num_samples - 1}`).", ""]
  return "\n".join(lines)
