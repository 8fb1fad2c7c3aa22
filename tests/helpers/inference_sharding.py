"""Child processes of tests/test_inference_sharding.py: generation on a mesh, one or two hosts.

`devices` mode (needs XLA_FLAGS with 8 host devices): a tiny random-init DIM-Listener
generates the same clips on one device and on two 8-device meshes (data 8; data 4 x fsdp 2);
prints JSON with the largest differences and the compile counts.

`process` mode (one of two processes, `--coordinator/--process_id`): `jax.distributed` with
gloo, then the generate and evaluate phases of `phase_configs` on the tiny checkpoint that
`write_finetuned` made; the test runs the same configs in one process and compares.
"""

import argparse
import json
import os
import sys

import jax
import numpy as np

from dim_jax import config_lib

WINDOW, OVERLAP = 16, 4
MEAN, STD = 5.0, 4.0
# Two window counts (1 and 3 windows at window 16, overlap 4): two shapes, odd group sizes.
LENGTHS = (40, 12, 33, 16, 29, 38, 9)


def finetune_config():
  """A tiny finetune_listener config (the model of tests/test_generate.py)."""
  config = config_lib.shrink_dim_to_tiny(config_lib.dim_config("finetune_listener"))
  config.model.update(dim=32, depth=1, heads=2, dim_head=16, num_tokens=16, decoder_depth=1,
                      decoder_heads=2, audio_projection=16, max_seq_len=64)
  config.data.max_len = WINDOW
  return config


def tiny_task():
  from dim_jax.data import normalization as normalization_lib  # pylint: disable=g-import-not-at-top
  from dim_jax.models import vqvae  # pylint: disable=g-import-not-at-top
  from dim_jax.training import dim_tasks  # pylint: disable=g-import-not-at-top
  vq = config_lib.shrink_to_tiny(config_lib.vq_config("listener")).model
  vq.update(hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64, codebook_size=16, code_dim=8)
  vq_config = vqvae.vq_config_from(vq)
  widths = {"speaker_motion": 56, "listener_motion": 56, "speaker_audio": 768}
  norm = normalization_lib.Normalization(
      means=tuple((s, (MEAN,) * w) for s, w in widths.items()),
      stds=tuple((s, (STD,) * w) for s, w in widths.items()))
  return dim_tasks.DIMTask.from_config(finetune_config(), speaker_vq=vq_config,
                                       listener_vq=vq_config, normalization=norm)


def tiny_params(task, seed=0):
  """Random values on the init shapes (tests/helpers/params.py), host NumPy."""
  import functools  # pylint: disable=g-import-not-at-top
  from dim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from helpers import params as params_helper  # pylint: disable=g-import-not-at-top
  abstract = jax.eval_shape(functools.partial(task.init_params, jax.random.PRNGKey(0)),
                            pipeline.dummy_batch(1))
  return params_helper.random_params(abstract, seed, bias_scale=0.1)


def write_finetuned(workdir):
  """A finished finetune_listener workdir (Orbax state + meta) holding the tiny model."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dim_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  task = tiny_task()
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1)
  meta = dict(task.model_meta(), config=json.loads(finetune_config().to_json_best_effort()),
              batches_consumed=1)
  ckpt.save(1, dict(step=jnp.int32(1), params=tiny_params(task), rng=jax.random.PRNGKey(0)),
            meta=meta, val_loss=1.0)
  ckpt.close()


def phase_configs(data_dir, model):
  """(generate, evaluate) configs: 2 samples, batch 4 (a multiple of 1 and 2 devices)."""
  gen = config_lib.generate_config()
  gen.data.dir = data_dir
  gen.init.model = model
  gen.generate.num_samples = 2
  gen.generate.batch_size = 4
  gen.generate.seed = 3
  gen.generate.formats = "npy,pickle"
  ev = config_lib.evaluate_config()
  ev.data.dir = data_dir
  ev.init.model = model
  ev.evaluate.update(num_seeds=2, best_of=2, batch_size=4, seed=3, plot_clips=1,
                     baselines=("random", "mirror"))
  return gen, ev


def clips(num=len(LENGTHS)):
  """Raw-unit clips of LENGTHS frames around the statistics' mean."""
  from dim_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  out = []
  for clip, n in zip(synthetic.generate_clips(num, seed=4, min_len=max(LENGTHS),
                                              max_len=max(LENGTHS), id_prefix="shard"),
                     LENGTHS):
    out.append(dict(clip_id=clip["clip_id"], fps=clip["fps"],
                    **{k: (np.asarray(clip[k][:n]) * STD + MEAN).astype(np.float32)
                       for k in ("speaker_motion", "listener_motion", "speaker_audio")}))
  return out


def devices_main():
  from dim_jax import generate, sampler  # pylint: disable=g-import-not-at-top
  from dim_jax import sharding  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, jax.devices()
  task = tiny_task()
  params = jax.tree.map(np.asarray, tiny_params(task))
  sampling = sampler.SamplingConfig(temperature=1.0, top_k_fraction=0.0)
  single = generate.Generator(task=task, params=params, sampling=sampling, window=WINDOW,
                              overlap=OVERLAP)
  rng = jax.random.PRNGKey(7)
  data = clips()
  # One device, batches of 3 (another batch size than the meshes' 8).
  reference = generate.generate_clips(single, data, 2, rng, batch_size=3)
  # A whole batch through the Python API (tokens too): 8 rows, 3 windows.
  batch = generate._batch_of(data, 8, 40, "listener", "first_frame")  # pylint: disable=protected-access
  keys = generate.clip_keys(rng, [c["clip_id"] for c in data] + ["filler"])
  direct = single(batch, keys, 2)
  out = dict(meshes={})
  for data_size, fsdp in ((8, 1), (4, 2)):
    mesh = sharding.make_mesh(dict(data=data_size, fsdp=fsdp))
    gen = generate.Generator(task=task, params=params, sampling=sampling, window=WINDOW,
                             overlap=OVERLAP, mesh=mesh)
    kernels = [leaf for leaf in jax.tree.leaves(gen.params) if leaf.ndim == 2]
    fsdp_split = sum("fsdp" in str(leaf.sharding.spec) for leaf in kernels)
    compiled = generate._window_step._cache_size()  # pylint: disable=protected-access
    sharded = generate.generate_clips(gen, data, 2, rng, batch_size=8)
    # Every window of every batch has one shape ([8 rows, 16 frames]): one program.
    new_programs = generate._window_step._cache_size() - compiled  # pylint: disable=protected-access
    sharded_direct = gen(batch, keys, 2)
    out["meshes"][f"{data_size}x{fsdp}"] = dict(
        clips=sorted(sharded) == sorted(reference),
        motion_max_abs=max(float(np.max(np.abs(sharded[c] - reference[c]))) for c in reference),
        motion_scale=max(float(np.max(np.abs(reference[c]))) for c in reference),
        tokens_equal=bool(np.array_equal(sharded_direct["tokens"], direct["tokens"])),
        window_tokens_equal=bool(np.array_equal(sharded_direct["window_tokens"],
                                                direct["window_tokens"])),
        direct_motion_max_abs=float(np.max(np.abs(sharded_direct["motion"]
                                                  - direct["motion"]))),
        new_programs=int(new_programs), kernels=len(kernels), fsdp_split=int(fsdp_split))
  out["tokens_moving"] = int(len(np.unique(direct["tokens"][0, 0])))
  print(json.dumps(out))


def process_main(args):
  from dim_jax import phases  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=2,
                             process_id=args.process_id)
  gen, ev = phase_configs(args.data_dir, args.model)
  phases.run(gen, args.generate_dir)
  results = phases.run(ev, args.evaluate_dir)
  if jax.process_index() == 1:  # process 0 writes report.json; process 1 says what it holds
    # Process 0 makes the workdir (it writes the report); process 1 may get here first.
    os.makedirs(args.evaluate_dir, exist_ok=True)
    with open(os.path.join(args.evaluate_dir, "process_1.json"), "w", encoding="utf-8") as f:
      json.dump(dict(methods=results["methods"], clips=results["clips"]), f)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=("devices", "process"))
  for flag in ("coordinator", "data_dir", "model", "generate_dir", "evaluate_dir"):
    parser.add_argument(f"--{flag}")
  parser.add_argument("--process_id", type=int)
  args = parser.parse_args()
  if args.mode == "devices":
    devices_main()
  else:
    process_main(args)


if __name__ == "__main__":
  main()
