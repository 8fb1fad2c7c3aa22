"""InfoNCE negatives come from the whole global batch, across data-parallel devices.

The child process (tests/helpers/dim_sharded_loss.py) runs the pretraining loss on 4
simulated host devices with the batch sharded 4 ways: every loss term must equal the
single-device value, and the contrastive term must differ from the per-replica value (two
examples per device) that the official DataParallel code computes.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_contrastive_negatives_span_the_global_batch():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4 " + os.environ.get("XLA_FLAGS", ""),
             TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "helpers", "dim_sharded_loss.py")],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["sharded_devices"] == 4
  single, sharded = out["single"], out["sharded"]
  assert set(single) == set(sharded) and "nce" in single
  for key in single:
    assert abs(single[key] - sharded[key]) <= 1e-4 * max(1.0, abs(single[key])), key
  # 8 candidates per anchor vs 2: a per-device InfoNCE is a different (smaller) number.
  assert abs(out["per_device_nce"] - single["nce"]) > 0.1, out
