"""Converts official DIM dataset files into dim_jax TFRecord shards.

Examples:
  # ViCo processed pickles (<src>/<utterance>.pkl), test split from the CSV.
  python tools/convert_official.py --format vico \
      --src data/vico_processed_30fps --metadata data/RLD_data.csv \
      --split test --out data/vico_records

  # CANDOR processed pickles (<src>/speaker/*.pkl + <src>/listener/*.pkl).
  python tools/convert_official.py --format candor --src data/candor_processed \
      --out data/candor_records --split train --num_shards 16

  # Raw EMOCA frames + HuBERT features (<src>/emoca, <src>/hubert), audio
  # resampled from 50 fps to the 30 fps video.
  python tools/convert_official.py --format emoca --src data/vico_dataset \
      --metadata data/RLD_data.csv --split train --out data/vico_raw_records

Formats and the differences from the official loaders are described in
docs/official_data.md and in `dim_jax.data.official`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from dim_jax.data import official


def _audio_fps(value: str) -> float | str:
  """Parses --audio_fps: a positive number, or "match" (stretch to length)."""
  if value.lower() == "match":
    return "match"
  try:
    fps = float(value)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"--audio_fps must be a number or 'match', got {value!r}") from None
  if not fps > 0:
    raise argparse.ArgumentTypeError("--audio_fps must be positive or 'match'")
  return fps


def _byte_count(value: str) -> int:
  """Parses --max_pickle_bytes: a positive byte count, optionally with K/M/G/T (powers of 1024)."""
  scales = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
  text = value.strip().lower().removesuffix("b")
  scale = scales.get(text[-1:], 1)
  try:
    count = float(text[:-1] if text[-1:] in scales else text) * scale
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"--max_pickle_bytes must be a byte count like 8G or 500M, got {value!r}") from None
  if not count >= 1:
    raise argparse.ArgumentTypeError("--max_pickle_bytes must be positive")
  return int(count)


def resolve_audio_fps(fmt: str, value: float | str | None) -> float | None:
  """Maps the --audio_fps flag to `official` semantics (None = match length).

  Unset means the dataset default: processed ViCo/CANDOR files already hold
  one audio row per video frame (match length), raw HuBERT is 50 fps.
  """
  if value is None:
    return official.HUBERT_FPS if fmt == "emoca" else None
  return None if value == "match" else float(value)


def build_parser() -> argparse.ArgumentParser:
  """Returns the command-line parser."""
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n", 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--format", required=True,
                 choices=sorted(official.DEFAULT_FPS), help="Input layout.")
  p.add_argument("--src", required=True, help="Input dataset folder.")
  p.add_argument("--out", required=True, help="Output records folder.")
  p.add_argument("--split", default="train",
                 help="Split name to write (and to select in --metadata).")
  p.add_argument("--fps", type=float, default=None,
                 help="Video frame rate. Defaults: " + ", ".join(
                     f"{k} {v:g}" for k, v in official.DEFAULT_FPS.items()))
  p.add_argument("--audio_fps", type=_audio_fps, default=None,
                 help="Audio frame rate, or 'match' to stretch audio to the "
                      f"video length. Default: match (vico, candor), "
                      f"{official.HUBERT_FPS:g} (emoca).")
  p.add_argument("--num_shards", type=int, default=1,
                 help="Number of output shards.")
  p.add_argument("--list", dest="id_list", default=None,
                 help="File of utterance ids (one per line) to convert; "
                      "default: --metadata rows of --split, else all files.")
  p.add_argument("--metadata", default=None,
                 help="ViCo metadata CSV (RLD_data.csv): split selection and "
                      "speaker/listener ids; required for --format emoca.")
  p.add_argument("--max_length_diff", type=int,
                 default=official.DEFAULT_MAX_LENGTH_DIFF,
                 help="Trim speaker/listener (and tolerate audio) length "
                      "differences up to this many frames; error beyond.")
  p.add_argument("--emoca_subdir", default=official.DEFAULT_EMOCA_SUBDIR,
                 help="Frame folder inside each EMOCA video folder, used when "
                      "present (emoca only).")
  p.add_argument("--skip_bad", action="store_true",
                 help="Skip (and report) bad utterances instead of stopping "
                      "at the first one.")
  p.add_argument("--report", default=None,
                 help="Write a JSON report (per-clip notes, skipped inputs).")
  p.add_argument("--max_pickle_bytes", type=_byte_count, default=None,
                 help="Most memory one input pickle may make the converter "
                      "allocate (e.g. 8G); default: half the memory available.")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the conversion; returns the process exit status.

  Bad input (missing or unreadable files, forbidden or oversized pickles, bad
  clips) is logged as one line naming the file, and the status is 1.
  """
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  if args.num_shards < 1:
    raise SystemExit("--num_shards must be >= 1")
  if args.max_length_diff < 0:
    raise SystemExit("--max_length_diff must be >= 0")
  # Imported here so `--help` works without TensorFlow.
  from dim_jax.data import records

  try:
    return _convert(args, records)
  except records.RecordError as e:
    logging.error("%s", e)
  except OSError as e:  # --out unwritable, a file vanishing mid-run, a full disk.
    logging.error("%s: %s", e.filename or args.out, e.strerror or e)
  return 1


def _convert(args: argparse.Namespace, records: Any) -> int:
  """The conversion itself; raises RecordError / OSError on bad input."""
  audio_fps = resolve_audio_fps(args.format, args.audio_fps)
  official.check_src(args.src)
  ids = official.read_id_list(args.id_list) if args.id_list else None
  metadata = (official.read_vico_metadata(args.metadata)
              if args.metadata else None)
  if args.format == "emoca" and metadata is None:
    raise SystemExit("--format emoca needs --metadata (pairs speaker and "
                     "listener videos)")
  if args.format == "candor" and metadata is not None:
    logging.warning("--metadata is ViCo-specific; ignored for candor")
    metadata = None

  skipped: list[dict[str, str]] = []
  notes: dict[str, list[str]] = {}

  def on_error(source: str, error: Exception) -> None:
    logging.warning("skipped %s: %s", source, error)
    skipped.append({"source": source, "error": str(error)})

  def clips():
    for converted in official.iter_converted(
        args.format, args.src, fps=args.fps, audio_fps=audio_fps,
        max_length_diff=args.max_length_diff, ids=ids, metadata=metadata,
        split=args.split if metadata is not None else None,
        emoca_subdir=args.emoca_subdir or None,
        on_error=on_error if args.skip_bad else None,
        max_pickle_bytes=args.max_pickle_bytes):
      if converted.notes:
        notes[converted.clip["clip_id"]] = list(converted.notes)
      yield converted.clip

  summary = records.write_split(args.out, args.split, clips(),
                                num_shards=args.num_shards)
  report: dict[str, Any] = {
      "format": args.format,
      "src": args.src,
      "split": args.split,
      "audio_fps": audio_fps if audio_fps is not None else "match",
      "fps": args.fps if args.fps is not None
             else official.DEFAULT_FPS[args.format],
      "max_length_diff": args.max_length_diff,
      "write_split": summary,
      "clips_with_notes": notes,
      "skipped": skipped,
  }
  if args.report:
    with open(args.report, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2, default=str)
  logging.info("wrote split %r to %s (%d clips with notes, %d skipped)",
               args.split, args.out, len(notes), len(skipped))
  return 0


if __name__ == "__main__":
  sys.exit(main())
