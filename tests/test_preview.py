"""Tests of the schematic preview (`dim_jax.evaluation.preview`): geometry, files, CLI."""

import os
import stat

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from dim_jax import files
from dim_jax.evaluation import preview

FPS = 30.0


def _frame(pitch=0.0, yaw=0.0, roll=0.0, jaw=0.0) -> np.ndarray:
  motion = np.zeros(56)
  motion[0:4] = pitch, yaw, roll, jaw
  return motion


def _points(feature, **pose) -> np.ndarray:
  return preview.preview_frames(_frame(**pose)).points[feature][0]


def _nose_tip_index() -> int:
  # The nose tip is the nose point that projects onto the head's centre at rest (it sits at
  # the centre's height, straight ahead), found without knowing how the polyline is ordered.
  return int(np.nanargmin(np.linalg.norm(_points("nose"), axis=-1)))


def test_axis_angle_matches_scipy():
  rotvecs = np.concatenate([np.random.default_rng(0).normal(0, 1.0, (64, 3)),
                            [[0, 0, 0], [1e-9, 0, 0], [0, -3e-7, 2e-7]]])
  np.testing.assert_allclose(preview.axis_angle_to_matrix(rotvecs),
                             Rotation.from_rotvec(rotvecs).as_matrix(), atol=1e-12)


def test_pitch_turns_the_nose_tip_down():
  # FLAME/EMOCA: x = pitch; a positive rotation about x turns the face (+z) towards -y.
  tip = _nose_tip_index()
  np.testing.assert_allclose(_points("nose")[tip], [0.0, 0.0], atol=1e-12)
  moved = _points("nose", pitch=0.3)[tip]
  np.testing.assert_allclose(moved, [0.0, -np.sin(0.3) * preview.NOSE_LENGTH], atol=1e-12)
  np.testing.assert_allclose(_points("nose", pitch=-0.3)[tip],
                             [0.0, np.sin(0.3) * preview.NOSE_LENGTH], atol=1e-12)


def test_yaw_moves_the_nose_tip_sideways():
  # y = yaw; a positive rotation about y turns the face (+z) towards +x (image right).
  moved = _points("nose", yaw=0.3)[_nose_tip_index()]
  np.testing.assert_allclose(moved, [np.sin(0.3) * preview.NOSE_LENGTH, 0.0], atol=1e-12)


@pytest.mark.parametrize("roll", [0.3, -0.2])
def test_roll_turns_the_eye_line_by_the_roll_angle(roll):
  (x0, y0), (x1, y1) = sorted(map(tuple, _points("pupils", roll=roll)))
  assert np.arctan2(y1 - y0, x1 - x0) == pytest.approx(roll, abs=1e-12)
  (x0, y0), (x1, y1) = sorted(map(tuple, _points("pupils")))
  assert y1 - y0 == pytest.approx(0.0, abs=1e-12)


def _mouth_gap(**pose) -> float:
  mouth = _points("mouth", **pose)
  breaks = np.flatnonzero(np.isnan(mouth[:, 0]))
  assert breaks.size == 1  # Upper lip, then lower lip.
  upper, lower = mouth[:breaks[0]], mouth[breaks[0] + 1:]
  return float(upper[len(upper) // 2, 1] - lower[len(lower) // 2, 1])


def test_jaw_opening_widens_the_mouth_monotonically():
  gaps = [_mouth_gap(jaw=jaw) for jaw in np.linspace(0.0, 0.5, 6)]
  assert gaps[0] > 0.0
  assert np.all(np.diff(gaps) > 0.01), gaps
  # The gap follows the jaw, not the head: a nod does not open the mouth (seen from above,
  # the projected gap only shrinks).
  assert 0.0 < _mouth_gap(pitch=0.3) <= gaps[0]
  # The corners stay put (the lips stay joined there).
  mouth = _points("mouth", jaw=0.4)
  np.testing.assert_allclose(mouth[0], mouth[np.flatnonzero(np.isnan(mouth[:, 0]))[0] + 1],
                             atol=1e-12)


def test_frames_are_computed_for_the_whole_clip_at_once():
  motion = np.random.default_rng(1).normal(0, 0.2, (7, 56))
  clip = preview.preview_frames(motion)
  assert clip.num_frames == 7
  for t in (0, 3, 6):
    one = preview.preview_frames(motion[t])
    for name, points in clip.points.items():
      np.testing.assert_array_equal(points[t], one.points[name][0])


def test_points_turned_away_are_hidden():
  # Turned around (yaw 180 degrees), the eyes face away from the viewer.
  assert np.isnan(_points("eyes", yaw=np.pi)).all()
  assert not np.isnan(_points("pupils")).any()


def _clip(frames=20, still=10, seed=0):
  """Speaker, truth and 2 samples whose motion is constant for `still` frames, then moves."""
  rng = np.random.default_rng(seed)
  base = rng.normal(0, 0.3, (4, 1, 56)) * np.ones((1, frames, 1))
  moving = np.zeros((frames, 56))
  ramp = np.linspace(0.0, 1.0, frames - still)
  moving[still:, 0] = 0.4 * ramp  # pitch
  moving[still:, 1] = -0.3 * ramp  # yaw
  moving[still:, 3] = 0.3 * ramp  # jaw
  moving[still:, 6:16] = ramp[:, None]
  motion = base + moving
  return dict(speaker=motion[0], truth=motion[1], samples=motion[2:], fps=FPS, clip_id="c/1")


def _gif_frames(path):
  with Image.open(path) as image:
    frames = []
    for i in range(image.n_frames):
      image.seek(i)
      frames.append(np.asarray(image.convert("RGB"), dtype=np.int16))
  return frames


def test_write_preview_gif_frames(tmp_path):
  clip = _clip()
  activity = np.ones(20)
  activity[5:9] = 0.0
  written = preview.write_preview(str(tmp_path / "clip.mp4"), writer="gif", dpi=40,
                                  speaker_activity=activity, **clip)
  assert written == str(tmp_path / "clip.gif")  # The extension follows the format.
  assert os.listdir(tmp_path) == ["clip.gif"]  # No temporary left behind.
  frames = _gif_frames(written)
  assert len(frames) == 20
  changed = [int((np.abs(a - b).sum(-1) > 30).sum()) for a, b in zip(frames, frames[1:])]
  # Frames 0..9 are still: only the time cursor and clock change; from 10 on every head moves.
  still, moving = max(changed[:9]), min(changed[10:])
  assert 0 < still and moving > 3 * still, changed


def test_write_preview_max_seconds_and_no_truth(tmp_path):
  clip = _clip()
  clip["truth"] = None
  written = preview.write_preview(str(tmp_path / "clip.gif"), max_seconds=0.5, dpi=30, **clip)
  assert written.endswith("clip.gif")
  with Image.open(written) as image:
    assert image.n_frames == 15  # 0.5 s at 30 fps.
    # Three panels (speaker, 2 samples), not four: the ground truth's is left out.
    assert image.size == (round(preview.PANEL_WIDTH * 3 * 30), round(preview.FIGURE_HEIGHT * 30))


def test_write_preview_through_ffmpeg(tmp_path, monkeypatch):
  # A stand-in ffmpeg that stores the raw RGBA frames matplotlib pipes to it, so the ffmpeg
  # path (chosen by "auto" when ffmpeg is on PATH) is checked without ffmpeg installed.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "ffmpeg"
  fake.write_text('#!/bin/sh\nfor last; do :; done\ncat > "$last"\n')
  fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  assert preview.ffmpeg_available()
  out = tmp_path / "out"
  written = preview.write_preview(str(out / "clip.avi"), dpi=30, max_seconds=0.2, **_clip())
  assert written == str(out / "clip.mp4")
  # Even pixel sizes (h264): the writer may have grown the figure by a pixel.
  width, height = (int(v) for v in np.ceil(np.array([preview.PANEL_WIDTH * 4,
                                                      preview.FIGURE_HEIGHT]) * 30 / 2) * 2)
  assert os.path.getsize(written) == 6 * width * height * 4


def test_ffmpeg_writer_refused_without_ffmpeg(monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))
  assert preview.animation_path("a/b.mp4") == ("gif", "a/b.gif")
  with pytest.raises(preview.PreviewError, match="ffmpeg is not on PATH"):
    preview.animation_path("a/b.mp4", writer="ffmpeg")


def test_write_preview_frame_png(tmp_path):
  path = str(tmp_path / "still.png")
  assert preview.write_preview_frame(path, frame=15, dpi=40, **_clip()) == path
  with Image.open(path) as image:
    assert image.format == "PNG" and image.size[0] > 100
  with pytest.raises(preview.PreviewError, match="frame 20 outside"):
    preview.write_preview_frame(path, frame=20, **_clip())
  bad = _clip()
  bad["samples"] = bad["samples"][:, :10]
  with pytest.raises(preview.PreviewError, match="samples: expected"):
    preview.write_preview_frame(path, frame=0, **bad)


def test_command_line(tmp_path, capsys):
  from dim_jax.data import records, synthetic  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / "records")
  synthetic.write_synthetic_dataset(data_dir, seed=3, num_train=1, num_val=1, num_test=2,
                                    num_shards=1, min_len=20, max_len=30)
  clip = records.read_clips(data_dir, "test")[1]
  # As `python -m dim_jax.main --config configs/generate.py` writes them (generate.write_samples).
  workdir = tmp_path / "generate"
  sample_dir = workdir / "generated" / "sample_0"
  sample_dir.mkdir(parents=True)
  fake = clip["listener_motion"] + np.float32(0.05)
  np.save(sample_dir / files.clip_filename(clip["clip_id"]), fake)
  common = ["--generated", str(workdir), "--data_dir", data_dir, "--split", "test",
            "--clip", clip["clip_id"]]

  assert preview.main(common + ["--out", str(tmp_path / "p" / "clip.mp4"), "--writer", "gif",
                                "--dpi", "30", "--max_seconds", "0.2"]) == 0
  assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'p' / 'clip.gif'}"
  with Image.open(tmp_path / "p" / "clip.gif") as image:
    assert image.n_frames == 6

  assert preview.main(common + ["--out", str(tmp_path / "still.png"), "--frame", "5",
                                "--dpi", "30"]) == 0
  assert (tmp_path / "still.png").stat().st_size > 0
  capsys.readouterr()

  assert preview.main(common[:-1] + ["no-such-clip", "--out", str(tmp_path / "x.gif")]) == 1
  error = capsys.readouterr().err.strip()
  assert error.startswith("dim_jax: error: clip 'no-such-clip' not in split 'test'")
  assert "\n" not in error and not (tmp_path / "x.gif").exists()

  assert preview.main(common + ["--sample", "3", "--out", str(tmp_path / "x.gif")]) == 1
  error = capsys.readouterr().err.strip()
  assert "sample_3" in error and "samples present: [0]" in error and "\n" not in error
