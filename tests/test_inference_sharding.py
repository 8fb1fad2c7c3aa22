"""Generation and evaluation on a mesh give one device's numbers (dim_jax/generate.py).

Each clip's samples are drawn from its own key (seed, clip id), vmapped per clip, so they do
not depend on how the clips are batched or split over devices and processes. The tokens are
then equal exactly; the motion (the VQ decode of equal tokens, cross-faded and
denormalised in float32) to float32 rounding: XLA may block a row's matmuls differently for
another per-device batch, ~1 ulp of the |motion| <= ~12 here (measured 1.9e-6), hence atol
1e-5. A wrong key, a lost row or a clip generated twice would differ by O(1).

* 8 simulated devices (a child process, tests/helpers/inference_sharding.py `devices`):
  data 8 and data 4 x fsdp 2 meshes against one device with another batch size.
* Two processes (jax.distributed on 127.0.0.1, gloo; the same helper, `process`): the
  generate and evaluate phases on a tiny checkpoint, against the same phases in this process.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from dim_jax import handoff, phases
from dim_jax.data import records, synthetic
from helpers import inference_sharding as helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "helpers", "inference_sharding.py")
MOTION_ATOL = 1e-5  # module docstring: float32 rounding of equal tokens' decodes


def _env(devices):
  flags = f"--xla_force_host_platform_device_count={devices} " + os.environ.get("XLA_FLAGS", "")
  return dict(os.environ, XLA_FLAGS=flags, TF_CPP_MIN_LOG_LEVEL="2", CI="1")


@pytest.mark.multidevice
def test_eight_devices_generate_what_one_device_does():
  proc = subprocess.run([sys.executable, HELPER, "devices"], cwd=ROOT, env=_env(8),
                        capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["tokens_moving"] > 3  # real draws, not a constant stream
  for name, mesh in out["meshes"].items():
    assert mesh["clips"], name  # every clip came back, once
    assert mesh["tokens_equal"] and mesh["window_tokens_equal"], name
    assert mesh["motion_max_abs"] <= MOTION_ATOL, (name, mesh)
    assert mesh["direct_motion_max_abs"] <= MOTION_ATOL, (name, mesh)
    assert mesh["new_programs"] == 1, (name, mesh)  # one compile for every window and batch
  # Parameters as training places them: replicated on data 8, FSDP-split on data 4 x fsdp 2.
  assert out["meshes"]["8x1"]["fsdp_split"] == 0
  assert out["meshes"]["4x2"]["fsdp_split"] > out["meshes"]["4x2"]["kernels"] // 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _same_json(a, b, path=""):
  """Equal structure and strings; numbers to MOTION_ATOL-level relative tolerance."""
  if isinstance(a, dict):
    assert set(a) == set(b), path
    for key in a:
      _same_json(a[key], b[key], f"{path}/{key}")
  elif isinstance(a, list):
    assert len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      _same_json(x, y, f"{path}/{i}")
  elif isinstance(a, float) and not isinstance(b, bool):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=path)
  else:
    assert a == b, path


@pytest.mark.multidevice
def test_two_processes_generate_and_evaluate_what_one_process_does(tmp_path):
  data_dir, model = str(tmp_path / "data"), str(tmp_path / "model")
  # 5 test clips of 10..40 frames: 1 to 3 windows of 16, odd group sizes (filler rows).
  synthetic.write_synthetic_dataset(data_dir, seed=5, num_train=6, num_val=2, num_test=5,
                                    num_shards=1, min_len=10, max_len=40)
  helper.write_finetuned(model)
  two = {name: str(tmp_path / f"two_{name}") for name in ("generate", "evaluate")}
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, HELPER, "process", f"--coordinator=127.0.0.1:{port}",
       f"--process_id={pid}", f"--data_dir={data_dir}", f"--model={model}",
       f"--generate_dir={two['generate']}", f"--evaluate_dir={two['evaluate']}"],
      cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for pid in range(2)]
  # Meanwhile the same phases in this one process (one device).
  gen_config, eval_config = helper.phase_configs(data_dir, model)
  one_summary = phases.run(gen_config, str(tmp_path / "one_generate"))
  one = phases.run(eval_config, str(tmp_path / "one_evaluate"))
  outs = [p.communicate(timeout=400) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]

  clips = records.read_clips(data_dir, "test")
  one_dir = tmp_path / "one_generate" / "generated"
  two_dir = os.path.join(two["generate"], "generated")
  # Every clip's file, once (the two processes wrote alternate clips), equal to one process's.
  for k in range(2):
    names = sorted(os.listdir(os.path.join(two_dir, f"sample_{k}")))
    assert names == sorted(f"{c['clip_id']}.npy" for c in clips)
    for name in names:
      np.testing.assert_allclose(np.load(os.path.join(two_dir, f"sample_{k}", name)),
                                 np.load(one_dir / f"sample_{k}" / name), rtol=0,
                                 atol=MOTION_ATOL, err_msg=name)
    # The official pickle (process 0) holds every clip, in the same order.
    mine = handoff.read_predictions(os.path.join(two_dir, f"listener_predictions_sample_{k}.pkl"))
    theirs = handoff.read_predictions(one_dir / f"listener_predictions_sample_{k}.pkl")
    assert mine["data_ids"] == theirs["data_ids"] and len(mine["data_ids"]) == len(clips)
    for a, b in zip(mine["y_pred"], theirs["y_pred"]):
      np.testing.assert_allclose(a, b, rtol=0, atol=MOTION_ATOL)
  # sampling.json covers every clip: its errors are those of all the clips' samples.
  summary = json.load(open(os.path.join(two_dir, "sampling.json")))
  assert summary["clips"] == len(clips)
  _same_json(json.loads(json.dumps(one_summary)), summary)

  # The evaluate report: every method's numbers as one process's, on both processes.
  report = json.load(open(os.path.join(two["evaluate"], "report.json")))
  assert report["clips"] == one["clips"] == len(clips)
  assert report["frames"] == sum(len(c["listener_motion"]) for c in clips)
  one_methods = json.loads(json.dumps(one["methods"]))
  _same_json(one_methods, report["methods"])
  _same_json(one_methods, json.load(open(os.path.join(two["evaluate"], "process_1.json")))["methods"])
  rows = {m["name"]: m for m in report["methods"]}
  assert rows["DIM-Listener"]["runs"] == 2 and "Mirror" in rows
