"""Writes the embedded synthetic dyadic dataset (``dim_jax.data.synthetic``) as TFRecords.

Example:
  python tools/make_synthetic_data.py --out runs/demo/data --seed 0 \
      --num_train 256 --num_val 32 --num_test 32

Output: ``<out>/{train,val,test}-NNNNN-of-NNNNN.tfrecord`` and ``<out>/dataset_info.json``
(format: ``docs/records.md``). The same arguments always give bit-identical records.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

# Quiet TF's C++ start-up banner; must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dim_jax.data import synthetic  # pylint: disable=wrong-import-position


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="output directory (created if needed)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_train", type=int, default=256)
  parser.add_argument("--num_val", type=int, default=32)
  parser.add_argument("--num_test", type=int, default=32)
  parser.add_argument("--num_shards", type=int, default=4,
                      help="shards per split (capped at the split's clip count)")
  parser.add_argument("--min_len", type=int, default=48, help="shortest clip, frames")
  parser.add_argument("--max_len", type=int, default=160, help="longest clip, frames")
  parser.add_argument("--fps", type=float, default=30.0)
  args = parser.parse_args(argv)

  info = synthetic.write_synthetic_dataset(
      args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
      num_test=args.num_test, num_shards=args.num_shards, min_len=args.min_len,
      max_len=args.max_len, fps=args.fps)
  for split, entry in sorted(info["splits"].items()):
    print(f"{split}: {entry['num_clips']} clips, {entry['num_frames']} frames, "
          f"{len(entry['shards'])} shard(s)")
  print(f"wrote {os.path.join(args.out, 'dataset_info.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
