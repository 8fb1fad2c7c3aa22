"""Extracts HuBERT features from wav files, the audio input of `convert_official.py --format emoca`.

Examples:
  # Every *.wav of a folder (clip_id = file stem) with hubert-base-ls960, downloaded once with
  #   huggingface-cli download facebook/hubert-base-ls960 --local-dir models/hubert-base-ls960
  python tools/extract_audio.py --model_dir models/hubert-base-ls960 \
      --out data/vico_dataset data/vico_dataset/wav

  # Then, as for the official features:
  python tools/convert_official.py --format emoca --src data/vico_dataset \
      --metadata data/RLD_data.csv --split train --out data/vico_raw_records

Writes `<out>/hubert/<clip_id>.npy`, float32 [T_a, 768] at 50 Hz (the encoder output by
default, as the official code; `--layer N` picks hidden state N). Wavs of any sample rate,
sample format and channel count are mixed to mono and resampled to 16 kHz
(`dim_jax.data.audio.read_wav`). Each file is written under a temporary name and renamed, so
an interrupted run leaves no partial .npy. The first unreadable wav stops the run with a
one-line error naming it (exit status 1).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Sequence

import numpy as np


def _layer(value: str) -> int | None:
  """Parses --layer: "last" (encoder output) or a hidden-state index."""
  if value.lower() == "last":
    return None
  try:
    return int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"--layer must be 'last' or an integer, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
  """Returns the command-line parser."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("inputs", nargs="+", help="wav files and/or folders of *.wav files.")
  p.add_argument("--model_dir", required=True,
                 help="Hugging Face checkpoint folder (config.json + model.safetensors or "
                      "pytorch_model.bin), e.g. facebook/hubert-base-ls960 downloaded.")
  p.add_argument("--out", required=True, help="Output root; features go to <out>/hubert/.")
  p.add_argument("--layer", type=_layer, default=None,
                 help="'last' (default: encoder output, the official choice) or a hidden-"
                      "state index (0 = first layer's input, -1 = last layer's output).")
  p.add_argument("--batch_size", type=int, default=8, help="Model inputs per batch.")
  p.add_argument("--chunk_seconds", type=float, default=20.0,
                 help="Long recordings are processed in chunks of this many seconds ...")
  p.add_argument("--context_seconds", type=float, default=5.0,
                 help="... each seeing this much audio on both sides.")
  p.add_argument("--normalize", action="store_true",
                 help="Zero-mean unit-variance per clip (the official pipeline does not).")
  return p


def list_wavs(inputs: Sequence[str]) -> list[pathlib.Path]:
  """Files as given, folders expanded to their *.wav files (sorted); stems must be unique."""
  files: list[pathlib.Path] = []
  for item in inputs:
    path = pathlib.Path(item)
    if path.is_dir():
      files.extend(sorted(p for p in path.iterdir()
                          if p.is_file() and p.suffix.lower() == ".wav"))
    elif path.is_file():
      files.append(path)
    else:
      raise ValueError(f"{path}: no such file or folder")
  seen: dict[str, pathlib.Path] = {}
  for path in files:
    if path.stem in seen:
      raise ValueError(f"clip id {path.stem!r} comes from both {seen[path.stem]} and {path}")
    seen[path.stem] = path
  if not files:
    raise ValueError(f"no .wav files in {', '.join(inputs)}")
  return files


def save_atomic(path: pathlib.Path, array: np.ndarray) -> None:
  """np.save to a temporary name in the same folder, then rename over `path`."""
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      np.save(f, array)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the extraction; returns the process exit status."""
  args = build_parser().parse_args(argv)
  if args.batch_size < 1:
    raise SystemExit("--batch_size must be >= 1")
  # Imported here so --help answers without loading JAX.
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from dim_jax import errors  # pylint: disable=g-import-not-at-top
  from dim_jax.data import audio  # pylint: disable=g-import-not-at-top

  try:
    files = list_wavs(args.inputs)
    extractor = audio.AudioFeatureExtractor.from_pretrained(
        args.model_dir, layer=args.layer, batch_size=args.batch_size,
        chunk_seconds=args.chunk_seconds, context_seconds=args.context_seconds,
        normalize=args.normalize)
  except (errors.DimJaxError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  out_dir = pathlib.Path(args.out) / "hubert"
  out_dir.mkdir(parents=True, exist_ok=True)
  # disable=None: a bar on a terminal, silence in logs and pipes.
  with tqdm(total=len(files), unit="file", desc="hubert", disable=None) as bar:
    for i in range(0, len(files), args.batch_size):
      group = files[i:i + args.batch_size]
      try:
        waves = [extractor.check(audio.read_wav(path), str(path)) for path in group]
      except audio.AudioError as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
      features = extractor(waves)
      for path, array in zip(group, features):
        save_atomic(out_dir / f"{path.stem}.npy", array.astype(np.float32))
      bar.update(len(group))
  print(f"wrote {len(files)} feature files to {out_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
