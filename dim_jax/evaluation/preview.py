r"""Schematic preview of speaker, listener and generated motion, without the licensed face model.

DIM's output is EMOCA/FLAME parameters, normally rendered with FLAME + PIRenderer, which need
licensed models. This module draws a *schematic* head instead, with matplotlib only, so anyone
can look at a clip:

  * a sphere (the head, radius 1) carrying a wireframe face: face outline, eyes with pupils,
    brows, nose, lips;
  * turned by the global pose (motion columns 0:3, an axis-angle vector in radians) about the
    head's centre and projected orthographically onto the image plane. Axes as in FLAME/EMOCA:
    x points to the subject's left (image right when they face the camera), y up, z out of the
    face towards the camera; x = pitch (positive: the face turns down, as in a nod's first
    half), y = yaw (positive: the nose turns to image right), z = roll (positive: the eye line
    turns counter-clockwise in the image);
  * the jaw (motion columns 3:6, axis-angle) rotates the lower lip and the chin about a hinge
    behind the mouth (column 3, jaw pitch, opens the mouth);
  * the expression coefficients (columns 6:56) are **not** drawn on the face: EMOCA's 50
    coefficients are FLAME's expression PCA components, with no fixed meaning such as "smile"
    or "brow raise". A bar strip under each head shows coefficients 0-9, the components of
    largest variance in FLAME's PCA basis, as plain numbers.

What it does not show: identity/shape, eye gaze, eyelids, the neck (FLAME rotates about the
neck joint, the schematic about the head's centre: the orientation is the same, the position
is not), and any expression detail. It is a way to see *when* heads nod, turn and talk, not how
the face looks.

Python API::

  from dim_jax.evaluation import preview
  path = preview.write_preview("clip.mp4", speaker=speaker, truth=listener, samples=samples,
                               fps=30.0, clip_id="test-00000")   # may return "clip.gif"
  preview.write_preview_frame("clip.png", speaker=speaker, truth=listener, samples=samples,
                              fps=30.0, clip_id="test-00000", frame=60)

Command line (after ``python -m dim_jax.main --config configs/generate.py``)::

  python -m dim_jax.evaluation.preview --generated runs/generate/generated \
      --data_dir /path/to/records --split test --clip CLIP_ID --sample 0 --out clip.mp4

Geometry is computed for every frame of a clip at once with numpy (``preview_frames``); the
animation then only moves artists. Figures use the Agg canvas directly (no pyplot global
state), like ``report.py``; files are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import textwrap
import uuid
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib import animation
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle
from matplotlib.text import Text
from PIL import Image

from dim_jax import errors, files
from dim_jax.evaluation import report

MOTION_DIM = report.MOTION_DIM
GLOBAL_POSE = slice(0, 3)  # Axis-angle head rotation: x = pitch, y = yaw, z = roll.
JAW_POSE = slice(3, 6)  # Axis-angle jaw rotation; x (column 3) opens the mouth.
EXPRESSION_OFFSET = report.EXPRESSION_OFFSET
EXPRESSION_BARS = 10  # Coefficients 0..9: FLAME's largest-variance expression components.

# Face model, in head radii, head-centred coordinates (x subject's left, y up, z to camera).
NOSE_TIP = np.array([0.0, 0.0, 1.2])  # At the centre's height, so pitch/yaw move it by sin.
NOSE_LENGTH = float(np.linalg.norm(NOSE_TIP))  # Distance of the nose tip from the centre.
EYE_CENTRES = np.array([[-0.3, 0.24], [0.3, 0.24]])  # (x, y) on the sphere's surface.
MOUTH_Y = -0.44  # Height of the mouth corners.
MOUTH_HALF_WIDTH = 0.26
JAW_HINGE = np.array([0.0, -0.2, -0.1])  # The jaw rotates about this point (behind the mouth).
# Points whose rotated z is below this face away from the viewer and are hidden.
HIDDEN_BELOW_Z = 0.0

PANEL_LIMITS = ((-1.12, 1.12), (-1.42, 1.1))  # Face axes (x, y) limits; the readout sits below.
PANEL_WIDTH = 2.3  # Inches per panel (the figure is at least 6 in wide).
FIGURE_HEIGHT = 5.6
SPEAKER_COLOR = "0.35"
TRUTH_COLOR = "black"
CURSOR_COLOR = "C3"
SAMPLE_COLORS = ("C0", "C1", "C2", "C4", "C5", "C6", "C8", "C9")  # Not the cursor's red.
SCHEMATIC_NOTE = (
    "Schematic, not a face render: a sphere turned by the global pose (axis-angle; x = pitch, "
    "y = yaw, z = roll, as in FLAME/EMOCA) with the jaw pose opening the mouth. Bars: "
    f"expression coefficients 0-{EXPRESSION_BARS - 1} (FLAME PCA order, largest variance "
    "first); they have no fixed meaning and are not drawn on the face.")


class PreviewError(errors.DimJaxError, ValueError):
  """A preview input (clip id, sample file, array shape) is missing or does not fit."""


# --- geometry ----------------------------------------------------------------------------------


def axis_angle_to_matrix(rotvec: Any) -> np.ndarray:
  """Rotation matrices [..., 3, 3] of axis-angle vectors [..., 3] (radians; Rodrigues).

  The direction is the axis, the norm the angle (right-hand rule), as in FLAME/EMOCA poses.
  """
  r = np.asarray(rotvec, dtype=np.float64)
  if r.shape[-1:] != (3,):
    raise ValueError(f"rotvec: expected [..., 3], got {r.shape}")
  theta = np.linalg.norm(r, axis=-1)[..., None, None]
  small = theta < 1e-4
  safe = np.where(small, 1.0, theta)
  # Below 1e-4 rad, 1 - cos(t) cancels to a few digits (and 0/0 at t = 0): Taylor series
  # instead, whose truncation error there is below 1e-18.
  a = np.where(small, 1.0 - theta**2 / 6.0, np.sin(safe) / safe)
  b = np.where(small, 0.5 - theta**2 / 24.0, (1.0 - np.cos(safe)) / safe**2)
  x, y, z = r[..., 0], r[..., 1], r[..., 2]
  zero = np.zeros_like(x)
  skew = np.stack([np.stack([zero, -z, y], -1), np.stack([z, zero, -x], -1),
                   np.stack([-y, x, zero], -1)], -2)
  return np.eye(3) + a * skew + b * (skew @ skew)


def _on_sphere(x: Any, y: Any) -> np.ndarray:
  """Points [n, 3] on the front of the unit sphere above image points (x, y)."""
  x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
  return np.stack([x, y, np.sqrt(np.clip(1.0 - x**2 - y**2, 0.0, None))], axis=-1)


_BREAK = np.full((1, 3), np.nan)  # Separates the polylines of one feature (one Line2D each).


def _join(*polylines: np.ndarray) -> np.ndarray:
  parts = []
  for i, polyline in enumerate(polylines):
    parts += [_BREAK] * (i > 0) + [polyline]
  return np.concatenate(parts)


@functools.lru_cache(maxsize=None)
def _face_model() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{feature: (points [n, 3] in head coordinates, NaN rows = breaks; jaw weights [n])}.

  A jaw weight of 1 moves a point rigidly with the jaw, 0 leaves it on the skull; in between
  it is blended, so the lips stay joined at the corners and the chin follows the jaw smoothly.
  """
  t = np.linspace(0.0, 2.0 * np.pi, 65)
  outline = _on_sphere(0.74 * np.sin(t), 0.12 + 0.84 * np.cos(t))
  outline_jaw = np.clip((MOUTH_Y - outline[:, 1]) / 0.2, 0.0, 1.0)

  eyes = _join(*(_on_sphere(cx + 0.11 * np.cos(t[::2]), cy + 0.055 * np.sin(t[::2]))
                 for cx, cy in EYE_CENTRES))
  brow_x = np.linspace(0.17, 0.45, 12)
  brow_y = 0.40 + 0.05 * np.sin(np.pi * (brow_x - 0.17) / 0.28)
  brows = _join(_on_sphere(-brow_x, brow_y), _on_sphere(brow_x, brow_y))
  nose = _join(np.stack([_on_sphere(0.0, 0.22), NOSE_TIP, _on_sphere(0.0, -0.12)]),
               _on_sphere([-0.08, 0.0, 0.08], [-0.10, -0.13, -0.10]))

  u = np.linspace(-1.0, 1.0, 21)
  upper = _on_sphere(MOUTH_HALF_WIDTH * u, MOUTH_Y + 0.015 * (1.0 - u**2))
  lower = _on_sphere(MOUTH_HALF_WIDTH * u, MOUTH_Y - 0.035 * (1.0 - u**2))
  mouth = _join(upper, lower)
  mouth_jaw = np.concatenate([np.zeros(len(u)), [0.0], 1.0 - u**2])

  def still(points):
    return points, np.zeros(len(points))

  return {"outline": (outline, outline_jaw), "eyes": still(eyes), "brows": still(brows),
          "nose": still(nose), "mouth": (mouth, mouth_jaw),
          "pupils": still(_on_sphere(EYE_CENTRES[:, 0], EYE_CENTRES[:, 1]))}


FEATURE_STYLE = {  # Line widths in points; pupils are markers.
    "outline": 1.6, "eyes": 1.0, "brows": 1.5, "nose": 1.2, "mouth": 1.5}


@dataclasses.dataclass(frozen=True)
class HeadFrames:
  """Projected schematic head of every frame of one motion sequence.

  Attributes:
    points: {feature: [T, n, 2] image (x right, y up) points in head radii}; NaN separates
      the polylines of a feature and hides points facing away from the viewer. Features:
      outline, eyes, brows, nose, mouth, pupils (two points).
    pose: [T, 3] global pose (pitch, yaw, roll axis-angle components, radians).
    jaw: [T, 3] jaw pose (axis-angle, radians; component 0, motion column 3, opens the
      mouth).
    expression: [T, 50] expression coefficients.
  """
  points: dict[str, np.ndarray]
  pose: np.ndarray
  jaw: np.ndarray
  expression: np.ndarray

  @property
  def num_frames(self) -> int:
    return self.pose.shape[0]


def _motion_array(motion: Any, name: str) -> np.ndarray:
  array = np.asarray(motion, dtype=np.float64)
  if array.ndim != 2 or array.shape[1] != MOTION_DIM:
    raise PreviewError(f"{name}: expected [frames, {MOTION_DIM}], got {array.shape}")
  return array


def preview_frames(motion: Any) -> HeadFrames:
  """Schematic head geometry of every frame of ``motion`` ([T, 56] or one [56] frame).

  All frames at once: the jaw rotation (about ``JAW_HINGE``, blended by each point's jaw
  weight) and then the global rotation (about the head's centre) are batched matrix products,
  followed by an orthographic projection (drop z) and hiding of points with z < 0.
  """
  motion = np.asarray(motion, dtype=np.float64)
  motion = _motion_array(motion[None] if motion.ndim == 1 else motion, "motion")
  head = axis_angle_to_matrix(motion[:, GLOBAL_POSE])  # [T, 3, 3]
  jaw = axis_angle_to_matrix(motion[:, JAW_POSE])
  points = {}
  for name, (local, jaw_weight) in _face_model().items():
    relative = local - JAW_HINGE
    opened = np.einsum("tij,nj->tni", jaw, relative) + JAW_HINGE  # [T, n, 3]
    moved = local + jaw_weight[:, None] * (opened - local)
    world = np.einsum("tij,tnj->tni", head, moved)
    xy = world[..., :2].copy()
    xy[world[..., 2] < HIDDEN_BELOW_Z] = np.nan
    points[name] = xy
  return HeadFrames(points=points, pose=motion[:, GLOBAL_POSE], jaw=motion[:, JAW_POSE],
                    expression=motion[:, EXPRESSION_OFFSET:])


def _readout(head: HeadFrames, t: int) -> str:
  # The axis-angle components, in degrees: for a head's small rotations they are close to
  # Euler angles, but they are not Euler angles (a pure roll reads exactly as roll, a mixed
  # rotation only approximately).
  pitch, yaw, roll = np.degrees(head.pose[t])
  jaw = np.degrees(head.jaw[t, 0])
  return f"pitch {pitch:+5.1f}° yaw {yaw:+5.1f}°\nroll {roll:+5.1f}° jaw {jaw:+5.1f}°"


@dataclasses.dataclass
class HeadArtists:
  """The artists of one schematic head panel; ``show(t)`` moves them to frame ``t``."""
  head: HeadFrames
  lines: dict[str, Line2D]
  readout: Text
  bars: Optional[LineCollection] = None
  bar_segments: Optional[np.ndarray] = None  # [T, EXPRESSION_BARS, 2, 2]

  def artists(self) -> list[Any]:
    """The artists ``show`` changes (everything else in the panel is static)."""
    return [*self.lines.values(), self.readout] + ([self.bars] if self.bars is not None else [])

  def show(self, t: int) -> None:
    for name, line in self.lines.items():
      line.set_data(self.head.points[name][t, :, 0], self.head.points[name][t, :, 1])
    self.readout.set_text(_readout(self.head, t))
    if self.bars is not None:
      self.bars.set_segments(self.bar_segments[t])


def expression_limit(*motions: Any) -> float:
  """Symmetric y limit of the expression bars that fits coefficients 0-9 of all ``motions``."""
  largest = max((float(np.nanmax(np.abs(np.asarray(m, np.float64)[
      ..., EXPRESSION_OFFSET:EXPRESSION_OFFSET + EXPRESSION_BARS]), initial=0.0))
                 for m in motions if m is not None), default=0.0)
  return max(0.5, 1.1 * largest) if math.isfinite(largest) else 1.0


def draw_frame(ax: Axes, motion: Any, frame: int = 0, *, title: Optional[str] = None,
               expression_ax: Optional[Axes] = None, color: str = "black",
               bar_limit: Optional[float] = None) -> HeadArtists:
  """Draws the schematic head of one frame onto ``ax`` (and its expression bars).

  Args:
    ax: axes of the head (its limits and aspect are set here; axis lines are hidden).
    motion: one [56] frame, a [T, 56] sequence, or its ``preview_frames`` (then ``frame``
      selects the frame; reuse the returned artists' ``show(t)`` to move to another frame).
    frame: frame index into ``motion``.
    title: panel title.
    expression_ax: optional axes for the bar strip of expression coefficients 0-9.
    color: line colour of the face and bars.
    bar_limit: symmetric y limit of the bars; default ``expression_limit(motion)``.

  Returns:
    The panel's ``HeadArtists``.
  """
  head = motion if isinstance(motion, HeadFrames) else preview_frames(motion)
  if not 0 <= frame < head.num_frames:
    raise PreviewError(f"frame {frame} outside [0, {head.num_frames})")
  ax.add_patch(Circle((0.0, 0.0), 1.0, facecolor="0.95", edgecolor="0.75", linewidth=0.8,
                      zorder=0))
  lines = {name: ax.plot([], [], color=color, linewidth=width, solid_capstyle="round")[0]
           for name, width in FEATURE_STYLE.items()}
  lines["pupils"] = ax.plot([], [], linestyle="none", marker="o", markersize=2.5,
                            color=color)[0]
  readout = ax.text(0.5, 0.0, "", transform=ax.transAxes, ha="center", va="bottom",
                    fontsize=6.5, family="monospace", color="0.25")
  ax.set_xlim(*PANEL_LIMITS[0])
  ax.set_ylim(*PANEL_LIMITS[1])
  ax.set_aspect("equal")
  ax.set_axis_off()
  if title:
    ax.set_title(title, fontsize=9, color=color)
  artists = HeadArtists(head=head, lines=lines, readout=readout)
  if expression_ax is not None:
    limit = bar_limit if bar_limit is not None else expression_limit(head.expression)
    coefficients = head.expression[:, :EXPRESSION_BARS]
    index = np.broadcast_to(np.arange(EXPRESSION_BARS, dtype=np.float64), coefficients.shape)
    # Segment k of frame t runs from (k, 0) to (k, coefficient): a bar drawn as a thick line.
    artists.bar_segments = np.stack([np.stack([index, np.zeros_like(index)], -1),
                                     np.stack([index, coefficients], -1)], axis=-2)
    artists.bars = LineCollection(artists.bar_segments[frame], colors=color, linewidths=5.0,
                                  capstyle="butt")
    expression_ax.add_collection(artists.bars)
    expression_ax.axhline(0.0, color="0.6", linewidth=0.6)
    expression_ax.set_xlim(-0.7, EXPRESSION_BARS - 0.3)
    expression_ax.set_ylim(-limit, limit)
    expression_ax.set_xticks(range(EXPRESSION_BARS))
    expression_ax.tick_params(labelsize=6, length=2, pad=1)
    expression_ax.set_title(f"expression coeffs 0-{EXPRESSION_BARS - 1}", fontsize=7,
                            color="0.3")
    for side in ("top", "right"):
      expression_ax.spines[side].set_visible(False)
  artists.show(frame)
  return artists


# --- the clip figure ---------------------------------------------------------------------------


@dataclasses.dataclass
class PreviewFigure:
  """A clip's preview figure; ``show(t)`` moves every panel and the time cursor to frame t."""
  figure: Figure
  panels: list[HeadArtists]
  cursor: Line2D
  clock: Text
  fps: float
  num_frames: int  # Frames shown (the clip, or its first max_seconds).
  _background: Any = None  # Agg pixels of everything static, once frames are blitted.
  _background_size: Optional[tuple[int, int]] = None

  def artists(self) -> list[Any]:
    """The artists ``show`` changes; the rest of the figure is the same in every frame."""
    return [a for panel in self.panels for a in panel.artists()] + [self.cursor, self.clock]

  def show(self, t: int) -> None:
    for panel in self.panels:
      panel.show(t)
    self.cursor.set_xdata([t / self.fps, t / self.fps])
    # Frame number and time change every frame, so no two frames of a GIF are identical
    # (Pillow merges identical consecutive frames, which would change the frame count).
    self.clock.set_text(f"t = {t / self.fps:6.2f} s  frame {t:>{len(str(self.num_frames))}d}"
                        f"/{self.num_frames}")

  def frame_rgba(self, t: int) -> memoryview:
    """Pixels [height, width, 4] (RGBA bytes, row-major) of frame ``t``, by blitting.

    A full draw of the figure (ticks, titles, pitch curves) takes most of a second; here the
    static part is drawn once and cached, and each frame restores it and draws only the
    moving artists (``artists``), several times faster. The moving artists become
    ``animated`` (a normal draw or ``savefig`` of this figure then leaves them out). The
    returned buffer is the canvas's own: it changes with the next call.
    """
    canvas = self.figure.canvas
    size = canvas.get_width_height(physical=True)
    if self._background is None or self._background_size != size:
      for artist in self.artists():
        artist.set_animated(True)
      canvas.draw()
      self._background = canvas.copy_from_bbox(self.figure.bbox)
      self._background_size = size
    canvas.restore_region(self._background)
    self.show(t)
    for artist in self.artists():
      self.figure.draw_artist(artist)
    return canvas.buffer_rgba()


def _panels(speaker, truth, samples, sample_names, method_name):
  """(title, motion [T, 56], colour) per panel, every motion checked against the speaker's."""
  speaker = _motion_array(speaker, "speaker")
  panels = [("speaker", speaker, SPEAKER_COLOR)]
  if truth is not None:
    truth = _motion_array(truth, "truth")
    if truth.shape != speaker.shape:
      raise PreviewError(f"truth: expected {speaker.shape} like the speaker, got {truth.shape}")
    panels.append(("listener (ground truth)", truth, TRUTH_COLOR))
  if samples is None:
    samples = np.zeros((0,) + speaker.shape)
  samples = np.asarray(samples, dtype=np.float64)
  if samples.ndim == 2:
    samples = samples[None]
  if samples.ndim != 3 or samples.shape[1:] != speaker.shape:
    raise PreviewError(f"samples: expected [samples, {speaker.shape[0]}, {MOTION_DIM}] like the "
                       f"speaker, got {samples.shape}")
  if sample_names is None:
    sample_names = [f"{method_name} sample {k + 1}" for k in range(samples.shape[0])]
  if len(sample_names) != samples.shape[0]:
    raise PreviewError(f"{len(sample_names)} sample names for {samples.shape[0]} samples")
  for k, (name, sample) in enumerate(zip(sample_names, samples)):
    panels.append((name, sample, SAMPLE_COLORS[k % len(SAMPLE_COLORS)]))
  return panels


def _shown_frames(length: int, fps: float, max_seconds: Optional[float]) -> int:
  if fps <= 0:
    raise PreviewError(f"fps must be positive, got {fps}")
  if length < 1:
    raise PreviewError("the clip has no frames")
  if max_seconds is None:
    return length
  if not max_seconds > 0:
    raise PreviewError(f"max_seconds must be positive, got {max_seconds}")
  return max(1, min(length, int(round(max_seconds * fps))))


def preview_figure(*, speaker: Any, truth: Any, samples: Any, fps: float, clip_id: str,
                   speaker_activity: Any = None, max_seconds: Optional[float] = None,
                   sample_names: Optional[Sequence[str]] = None,
                   method_name: str = "generated", frame: int = 0,
                   dpi: float = 100.0) -> PreviewFigure:
  """Builds the preview layout (see ``write_preview``) at ``frame``, its layout fixed.

  Top row: one schematic head per panel (speaker, ground-truth listener if ``truth`` is not
  None, each sample), each with its expression bars below. Bottom: head pitch of every panel
  over the shown frames, the speaker's pauses shaded when ``speaker_activity`` is given, and
  the time cursor.
  """
  panels = _panels(speaker, truth, samples, sample_names, method_name)
  length = panels[0][1].shape[0]
  shown = _shown_frames(length, fps, max_seconds)
  if not 0 <= frame < shown:
    raise PreviewError(f"frame {frame} outside the shown frames [0, {shown})")
  pauses = []
  if speaker_activity is not None:
    speaker_activity = np.asarray(speaker_activity, dtype=np.float64)
    if speaker_activity.shape != (length,):
      raise PreviewError(f"speaker_activity: expected [{length}], got {speaker_activity.shape}")
    pauses = report.pause_intervals(speaker_activity[:shown])

  columns = len(panels)
  width = max(6.0, PANEL_WIDTH * columns)
  fig = report._new_figure((width, FIGURE_HEIGHT))  # pylint: disable=protected-access
  fig.set_dpi(dpi)  # The blitted animation frames are drawn at the figure's own dpi.
  grid = fig.add_gridspec(3, columns, height_ratios=(2.8, 0.9, 1.5))
  limit = expression_limit(*(motion[:shown] for _, motion, _ in panels))
  heads = []
  for i, (title, motion, color) in enumerate(panels):
    heads.append(draw_frame(fig.add_subplot(grid[0, i]), preview_frames(motion[:shown]), frame,
                            title=title, expression_ax=fig.add_subplot(grid[1, i]),
                            color=color, bar_limit=limit))

  strip = fig.add_subplot(grid[2, :])
  seconds = np.arange(shown) / fps
  for j, (first, end) in enumerate(pauses):
    strip.axvspan((first - 0.5) / fps, (end - 0.5) / fps, color=report.PAUSE_COLOR,
                  linewidth=0, zorder=0, label=report.PAUSE_LABEL if j == 0 else "_nolegend_")
  for i, (title, motion, color) in enumerate(panels):  # Panel 0 is the speaker: dashed.
    strip.plot(seconds, motion[:shown, 0], color=color, label=title,
               linestyle="--" if i == 0 else "-",
               linewidth=1.6 if color == TRUTH_COLOR else 1.0)
  if shown > 1:
    strip.set_xlim(seconds[0], seconds[-1])
  cursor = strip.axvline(frame / fps, color=CURSOR_COLOR, linewidth=1.2)
  strip.set_title(report.PITCH_TITLE, fontsize=8, loc="left")
  clock = strip.set_title("", fontsize=8, loc="right", family="monospace")
  strip.set_xlabel("time (s)", fontsize=8)
  strip.set_ylabel("rad", fontsize=8)
  strip.tick_params(labelsize=7)
  strip.grid(alpha=0.3)
  strip.legend(fontsize=6, loc="upper left", ncol=min(columns + 1, 6), framealpha=0.7)
  fig.suptitle(f"Clip {clip_id}: schematic preview", fontsize=10)
  # Wrapped to the figure's width: about 19 characters per inch at 6.5 pt.
  fig.supxlabel(textwrap.fill(SCHEMATIC_NOTE, int(width * 19)), fontsize=6.5, color="0.3")

  preview = PreviewFigure(figure=fig, panels=heads, cursor=cursor, clock=clock, fps=fps,
                          num_frames=shown)
  preview.show(frame)
  # Lay out once, then freeze: re-solving constrained layout for every frame is slow and
  # could make the panels jump as the readout texts change.
  fig.canvas.draw()
  fig.set_layout_engine("none")
  return preview


# --- files -------------------------------------------------------------------------------------

WRITERS = ("auto", "ffmpeg", "gif")


def ffmpeg_available() -> bool:
  """Whether matplotlib finds ``ffmpeg`` (``rcParams['animation.ffmpeg_path']``, PATH)."""
  return animation.FFMpegWriter.isAvailable()


def animation_path(path: str, writer: str = "auto") -> tuple[str, str]:
  """(writer "ffmpeg" | "gif", the path it writes) for a requested ``path`` and ``writer``.

  "auto": a ``.gif`` path is written as a GIF; anything else as MP4 when ffmpeg is available,
  else as a GIF. The extension is replaced to match what is written (``clip.mp4`` ->
  ``clip.gif`` without ffmpeg).
  """
  if writer not in WRITERS:
    raise PreviewError(f"writer={writer!r}; expected one of {WRITERS}")
  root, ext = os.path.splitext(path)
  if writer == "auto":
    writer = "gif" if ext.lower() == ".gif" or not ffmpeg_available() else "ffmpeg"
  if writer == "ffmpeg" and not ffmpeg_available():
    raise PreviewError("writer='ffmpeg' but ffmpeg is not on PATH: install it or use "
                       "writer='gif'")
  wanted = ".mp4" if writer == "ffmpeg" else ".gif"
  return writer, (path if ext.lower() == wanted else root + wanted)


def _checked_frame(writer: animation.AbstractMovieWriter, preview: PreviewFigure,
                   frame: int) -> memoryview:
  pixels = preview.frame_rgba(frame)
  size = tuple(int(round(v)) for v in writer.frame_size)
  if (pixels.shape[1], pixels.shape[0]) != size:
    raise RuntimeError(f"frame of {pixels.shape[1]}x{pixels.shape[0]} pixels, the writer "
                       f"expects {size[0]}x{size[1]} (figure dpi differs from the writer's?)")
  return pixels


class _BlitPillowWriter(animation.PillowWriter):
  """matplotlib's GIF writer, fed blitted frames (``PreviewFigure.frame_rgba``), not savefig."""

  def __init__(self, preview: PreviewFigure, **kwargs):
    super().__init__(**kwargs)
    self._preview = preview

  def grab_frame(self, *, frame: int, **savefig_kwargs):  # pylint: disable=arguments-differ
    del savefig_kwargs
    pixels = _checked_frame(self, self._preview, frame)
    # RGB (the figure is opaque): Pillow converts it to a GIF palette better than RGBA, as
    # PillowWriter.grab_frame does; convert() also copies out of the canvas's buffer.
    self._frames.append(Image.fromarray(np.asarray(pixels), "RGBA").convert("RGB"))


class _BlitFFMpegWriter(animation.FFMpegWriter):
  """matplotlib's ffmpeg writer (raw RGBA frames piped to ffmpeg), fed blitted frames."""

  def __init__(self, preview: PreviewFigure, **kwargs):
    super().__init__(**kwargs)
    self._preview = preview
    self.frame_format = "rgba"  # What ffmpeg is told the piped frames are (-pix_fmt).

  def grab_frame(self, *, frame: int, **savefig_kwargs):  # pylint: disable=arguments-differ
    del savefig_kwargs
    # setup() may have resized the figure to even pixel sizes for h264: the blit background
    # follows the canvas size, and frame_size is checked against the buffer.
    self._proc.stdin.write(_checked_frame(self, self._preview, frame))


def _make_parent(path: str) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as error:
    raise files.explain_os_error(path, error) from None


def write_preview(path: str, *, speaker: Any, truth: Any, samples: Any, fps: float,
                  clip_id: str, speaker_activity: Any = None,
                  max_seconds: Optional[float] = None, writer: str = "auto",
                  dpi: float = 80.0, sample_names: Optional[Sequence[str]] = None,
                  method_name: str = "generated") -> str:
  """Writes an animation of one clip: speaker, ground truth and samples side by side.

  One panel per person (schematic head, see the module docstring, and expression bars):
  the speaker, the ground-truth listener (skipped when ``truth`` is None, e.g. a split without
  listener motion), then each generated sample; below, every panel's head pitch with a time
  cursor, the speaker's pauses shaded when ``speaker_activity`` is given.

  Args:
    path: the file to write. Its extension may change: see Returns.
    speaker: [T, 56] speaker motion.
    truth: [T, 56] ground-truth listener motion, or None.
    samples: [S, T, 56] (or one [T, 56]) generated listener motion; None for no samples.
    fps: frame rate of the clip; the animation plays in real time.
    clip_id: shown in the title.
    speaker_activity: optional [T] speech activity (1 speaking, 0 pause; e.g.
      ``report.speech_activity_from_jaw(speaker, fps)``); pauses (< 0.5) are shaded.
    max_seconds: animate only the clip's first ``round(max_seconds * fps)`` frames.
    writer: "auto" (MP4 through matplotlib's FFMpegWriter when ``ffmpeg`` is on PATH, else a
      GIF through PillowWriter; a ``.gif`` path is always a GIF), "ffmpeg" or "gif".
    dpi: resolution; the figure is ``PANEL_WIDTH`` (2.3 in) per panel, at least 6 in, by
      ``FIGURE_HEIGHT`` (5.6 in).
    sample_names: panel titles of the samples (default "<method_name> sample <k + 1>").
    method_name: used in the default sample titles.

  Returns:
    The path written: ``path`` with its extension replaced by ``.mp4`` or ``.gif`` to match
    the format written (``animation_path``). The file appears complete or not at all (written
    under a temporary name in the same directory, then renamed).
  """
  kind, out_path = animation_path(path, writer)
  preview = preview_figure(speaker=speaker, truth=truth, samples=samples, fps=fps,
                           clip_id=clip_id, speaker_activity=speaker_activity,
                           max_seconds=max_seconds, sample_names=sample_names,
                           method_name=method_name, dpi=dpi)
  movie = (_BlitFFMpegWriter(preview, fps=fps) if kind == "ffmpeg"
           else _BlitPillowWriter(preview, fps=fps))
  _make_parent(out_path)
  directory, name = os.path.split(os.path.abspath(out_path))
  base, ext = os.path.splitext(name)
  # The temporary keeps the extension: ffmpeg and Pillow pick the format from it.
  temp = os.path.join(directory, f".{base}.{uuid.uuid4().hex}.tmp{ext}")
  try:
    with movie.saving(preview.figure, temp, dpi):
      for t in range(preview.num_frames):  # Only moves artists: the geometry is precomputed.
        movie.grab_frame(frame=t)
    os.replace(temp, out_path)
  except OSError as error:
    raise files.explain_os_error(out_path, error) from None
  finally:
    if os.path.exists(temp):
      os.remove(temp)
  return out_path


def write_preview_frame(path: str, *, speaker: Any, truth: Any, samples: Any, fps: float,
                        clip_id: str, frame: int, speaker_activity: Any = None,
                        max_seconds: Optional[float] = None, dpi: float = 100.0,
                        sample_names: Optional[Sequence[str]] = None,
                        method_name: str = "generated") -> str:
  """Writes one still PNG of ``write_preview``'s layout at ``frame``; returns ``path``.

  For READMEs, reports and machines without any animation writer. Arguments as in
  ``write_preview``; ``frame`` must lie in the shown frames (the first ``max_seconds``).
  """
  preview = preview_figure(speaker=speaker, truth=truth, samples=samples, fps=fps,
                           clip_id=clip_id, speaker_activity=speaker_activity,
                           max_seconds=max_seconds, sample_names=sample_names,
                           method_name=method_name, frame=frame, dpi=dpi)
  _make_parent(path)
  report._save_png(preview.figure, path, dpi)  # pylint: disable=protected-access
  return path


# --- command line ------------------------------------------------------------------------------


def generated_dir(path: str) -> str:
  """The ``generated`` directory of a generate run: ``path`` itself or ``path/generated``."""
  if not os.path.isdir(path):
    raise PreviewError(f"--generated {path}: no such directory")
  nested = os.path.join(path, "generated")
  if not any(n.startswith("sample_") for n in os.listdir(path)) and os.path.isdir(nested):
    path = nested
  summary = os.path.join(path, "sampling.json")  # Written by the generate phase.
  if os.path.isfile(summary):
    with open(summary, encoding="utf-8") as f:
      role = json.load(f).get("role", "listener")
    if role != "listener":
      raise PreviewError(f"{path} holds generated {role} motion ({summary}); the preview "
                         "draws generated listeners next to their speaker")
  return path


def read_sample(generated: str, clip_id: str, sample: int, length: int) -> np.ndarray:
  """The [T, 56] generated motion ``<generated>/sample_<k>/<clip file>.npy`` of one clip."""
  name = files.clip_filename(clip_id)
  path = os.path.join(generated, f"sample_{sample}", name)
  if not os.path.isfile(path):
    present = sorted(int(n[len("sample_"):]) for n in os.listdir(generated)
                     if n.startswith("sample_") and n[len("sample_"):].isdigit())
    if os.path.isdir(os.path.dirname(path)):
      why = f"sample {sample} has no file for clip {clip_id!r} (a different split?)"
    else:
      why = f"no sample {sample} (samples present: {present or 'none'})"
    raise PreviewError(f"{path} not found: {why}")
  motion = np.load(path, allow_pickle=False)
  if motion.shape != (length, MOTION_DIM):
    raise PreviewError(f"{path}: expected [{length}, {MOTION_DIM}] (the clip's frames), got "
                       f"{motion.shape}")
  return motion


def find_clip(data_dir: str, split: str, clip_id: str) -> dict[str, Any]:
  """The clip dict (``records.read_clips``) of ``clip_id`` in ``split``, or a PreviewError."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before TensorFlow's first import.
  from dim_jax.data import records  # pylint: disable=g-import-not-at-top  # TF: only here.
  clips = records.read_clips(data_dir, split)
  for clip in clips:
    if clip["clip_id"] == clip_id:
      return clip
  ids = [clip["clip_id"] for clip in clips]
  examples = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
  raise PreviewError(f"clip {clip_id!r} not in split {split!r} of {data_dir} ({len(ids)} clips: "
                     f"{examples or 'none'})")


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dim_jax.evaluation.preview",
      description="Schematic preview (no face model needed) of one clip: speaker, ground-truth "
      "listener and generated samples side by side.")
  parser.add_argument("--generated", required=True,
                      help="the generate phase's `generated` directory (or its workdir)")
  parser.add_argument("--data_dir", required=True, help="records directory of the clips")
  parser.add_argument("--split", default="test")
  parser.add_argument("--clip", required=True, help="clip id")
  parser.add_argument("--sample", type=int, nargs="+", default=[0],
                      help="sample index(es) k of sample_<k>/ (default 0)")
  parser.add_argument("--out", required=True,
                      help="output file: .mp4 (a .gif without ffmpeg), .gif, or .png for a still")
  parser.add_argument("--frame", type=int, default=0, help="frame of a .png still")
  parser.add_argument("--max_seconds", type=float, default=None,
                      help="animate only the clip's first seconds")
  parser.add_argument("--writer", choices=WRITERS, default="auto")
  parser.add_argument("--dpi", type=float, default=None,
                      help="resolution (default 80 for animations, 100 for stills)")
  parser.add_argument("--no_truth", action="store_true",
                      help="leave out the ground-truth listener panel")
  args = parser.parse_args(argv)
  try:
    generated = generated_dir(args.generated)
    clip = find_clip(args.data_dir, args.split, args.clip)
    samples = np.stack([read_sample(generated, args.clip, k, clip["length"])
                        for k in args.sample])
    speaker = clip["speaker_motion"]
    common = dict(speaker=speaker, truth=None if args.no_truth else clip["listener_motion"],
                  samples=samples, fps=clip["fps"], clip_id=args.clip,
                  speaker_activity=report.speech_activity_from_jaw(speaker, clip["fps"]),
                  max_seconds=args.max_seconds,
                  sample_names=[f"generated sample_{k}" for k in args.sample])
    if args.out.lower().endswith(".png"):
      written = write_preview_frame(args.out, frame=args.frame, dpi=args.dpi or 100.0, **common)
    else:
      written = write_preview(args.out, writer=args.writer, dpi=args.dpi or 80.0, **common)
  except errors.DimJaxError as error:
    if os.environ.get("DIM_JAX_TRACEBACK"):
      raise
    print(f"dim_jax: error: {error}", file=sys.stderr)
    return 1
  print(f"wrote {written}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
