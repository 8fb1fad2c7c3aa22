"""Export to and import from the official PyTorch layouts (dim_jax/export.py,
dim_jax/import_official.py, dim_jax/torch_layout.py) against a PyTorch reference of the
official classes (tests/torch_reference/official_dim.py, x-transformers 1.30.16).

Tiny models (VQ width 32, DIM width 32, one layer each, 16 codes; the official 768-wide
audio so that generation's shape checks apply), random parameters saved with
`checkpointing` instead of training. Checked:
  * layouts: what `torch_layout` enumerates as the official state_dict equals the
    reference's own; exports load into the reference with strict=True (SpeakerSLMFT: the
    missing keys are exactly those the JSON lists);
  * numbers: VQ tokens identical and decoded motion within 1e-4 on a padded batch; SLMFT
    teacher-forced logits within 1e-4 on a padded batch; a pretraining checkpoint's InfoNCE,
    cross-entropy (and, unpadded, continuous) losses equal the reference's;
  * round trips JAX -> torch -> JAX bit-identical for every phase, through torch and
    safetensors files;
  * an official-style SLMFT file (module. prefix, no JSON) imports with the official
    switches and generates, greedily, the reference's tokens through `Generator`;
  * bad files stop with one line naming the file and the mismatch.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("x_transformers")

import jax  # noqa: E402

from dim_jax import config_lib, export, generate, import_official, sampler  # noqa: E402
from dim_jax import torch_layout  # noqa: E402
from dim_jax.data import pipeline  # noqa: E402
from dim_jax.models import dim as dim_lib  # noqa: E402
from dim_jax.models import vqvae  # noqa: E402
from dim_jax.training import checkpointing, dim_tasks  # noqa: E402
from dim_jax.training import vq as vq_lib  # noqa: E402
from helpers import params as params_helper  # noqa: E402
from torch_reference import official_dim as ref  # noqa: E402

TINY_VQ = dict(hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64, codebook_size=16,
               code_dim=8)
TINY_DIM = dict(dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64, num_tokens=16,
                decoder_depth=1, decoder_heads=2)
VQ_CONFIG = vqvae.VQConfig(**TINY_VQ, positional_encoding="official_batch_index")
DIM_PHASES = ("pretrain", "finetune_listener", "finetune_speaker")
REFERENCE_CLASSES = {"pretrain": ref.SLM, "finetune_listener": ref.SLMFT,
                     "finetune_speaker": ref.SpeakerSLMFT}
SMALL_CONVERTER = dict(mesh_size=30, lstm_hidden=8)  # SpeakerSLMFT's mesh converter, shrunk
LENGTHS = (12, 9, 5, 12)
FRAMES = 12
ATOL = 1e-4


# --- helpers ------------------------------------------------------------------------------

def _flat(tree):
  return torch_layout.flatten(tree)


def _same_bits(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _save_run(workdir, task, config, params, step=3):
  """A finished phase's workdir as the trainer leaves it (meta = model meta + run config)."""
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2)
  meta = dict(task.model_meta(), config=json.loads(config.to_json_best_effort()),
              batches_consumed=step)
  ckpt.save(step, dict(step=np.int32(step), params=params, rng=np.zeros(2, np.uint32)),
            meta=meta, val_loss=1.0)
  ckpt.close()


def _vq_run(workdir, role="listener"):
  config = config_lib.vq_config(role)
  config.model.update(TINY_VQ, positional_encoding="official_batch_index")
  config.data.normalize = "none"
  task = vq_lib.VQTask.from_config(config)
  batch = {f"{role}_motion": np.zeros((1, 8, 56), np.float32), "mask": np.ones((1, 8), bool)}
  params = params_helper.random_params(
      jax.eval_shape(task.init_params, jax.random.PRNGKey(0), batch), 0, bias_scale=0.1)
  _save_run(workdir, task, config, params)
  return task, params


def _dim_run(workdir, phase, seed):
  config = config_lib.dim_config(phase)
  config.model.update(TINY_DIM)
  config.data.max_len = FRAMES
  config.data.normalize = "none"
  task = dim_tasks.DIMTask.from_config(config, speaker_vq=VQ_CONFIG, listener_vq=VQ_CONFIG)
  params = params_helper.random_params(
      jax.eval_shape(task.init_params, jax.random.PRNGKey(0), pipeline.dummy_batch(1)), seed,
      bias_scale=0.1)
  _save_run(workdir, task, config, params)
  return task, params


def _reference(description, phase):
  """The reference class an export's JSON describes, built from that JSON alone."""
  c = description["constructor"]
  if phase == "vq":
    return ref.VQAutoEncoder(ref.VQArgs(**c["args"])).eval()
  extra = SMALL_CONVERTER if phase == "finetune_speaker" else {}
  return REFERENCE_CLASSES[phase](ref.DIMArgs(**c["args"]), ref.VQArgs(**c["speaker_vq"]),
                                  ref.VQArgs(**c["listener_vq"]), **extra).eval()


def _batch(seed, lengths=LENGTHS, frames=FRAMES):
  rng = np.random.default_rng(seed)
  mask = np.arange(frames)[None, :] < np.asarray(lengths)[:, None]
  batch = dict(speaker_motion=rng.normal(size=(len(lengths), frames, 56)).astype(np.float32),
               listener_motion=rng.normal(size=(len(lengths), frames, 56)).astype(np.float32),
               speaker_audio=rng.normal(size=(len(lengths), frames, 768)).astype(np.float32),
               mask=mask)
  for key in ("speaker_motion", "listener_motion", "speaker_audio"):
    batch[key] = np.where(mask[..., None], batch[key], 0.0).astype(np.float32)
  return batch


def _t(x):
  return torch.from_numpy(np.array(x))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Checkpoints of every phase (random params) and their torch exports."""
  root = tmp_path_factory.mktemp("export")
  out = {}
  for phase, seed in (("vq", 0),) + tuple(zip(DIM_PHASES, (1, 2, 3))):
    workdir = str(root / phase)
    task, params = _vq_run(workdir) if phase == "vq" else _dim_run(workdir, phase, seed)
    path = str(root / f"{phase}.pth")
    description = export.export(workdir, path)
    out[phase] = dict(workdir=workdir, task=task, params=params, path=path,
                      description=description,
                      state_dict=torch.load(path, weights_only=True))
  out["root"] = root
  return out


# --- layouts ------------------------------------------------------------------------------

def test_official_layouts_equal_the_reference_state_dicts(runs):
  """torch_layout's enumeration of each official class = the reference's state_dict."""
  task = runs["vq"]["task"]
  model = _reference(runs["vq"]["description"], "vq")
  assert torch_layout.vq_official_shapes(task.model.config) == {
      k: tuple(v.shape) for k, v in model.state_dict().items()}
  for phase in DIM_PHASES:
    task = runs[phase]["task"]
    extra = SMALL_CONVERTER if phase == "finetune_speaker" else {}
    shapes = torch_layout.dim_official_shapes(phase, task.model.config, task.speaker_vq.config,
                                              task.listener_vq.config, **extra)
    model = _reference(runs[phase]["description"], phase)
    assert shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}, phase


@pytest.mark.parametrize("phase", ("vq",) + DIM_PHASES)
def test_export_loads_into_the_reference(runs, phase):
  run = runs[phase]
  description, state_dict = run["description"], run["state_dict"]
  assert all(v.dtype == torch.float32 for v in state_dict.values())
  model = _reference(description, phase)
  saved = json.loads(open(export.json_path(run["path"]), encoding="utf-8").read())
  assert saved["official_class"] == torch_layout.OFFICIAL_CLASSES[phase]
  assert saved["dim_jax"]["phase"] == phase and saved["normalization"] is None
  if phase != "finetune_speaker":
    model.load_state_dict(state_dict, strict=True)
    assert saved["official_only"] == {} and saved["ours_only"] == {}
    assert saved["shape_differs"] == {}
  else:
    # The BiWi mesh converter, W and the speaker table have no counterpart: exactly the
    # keys the JSON lists are missing, nothing is unexpected.
    result = model.load_state_dict(state_dict, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(saved["official_only"])
    assert "speaker_embed.weight" in saved["official_only"] and "W" in saved["official_only"]
  pe = [k for k in state_dict if k.endswith("_pos_embedding.pe")]
  assert sorted(saved["generated"]) == sorted(pe) and len(pe) == (2 if phase == "vq" else 4)
  assert saved["num_parameters"] == sum(v.numel() for k, v in state_dict.items() if k not in pe)


def test_switches_without_official_counterpart_are_listed(tmp_path):
  """A tiny-config checkpoint (ours-only switches) exports with every difference listed."""
  config = config_lib.shrink_dim_to_tiny(config_lib.dim_config("finetune_listener"))
  config.model.update(TINY_DIM, audio_projection=16, causal_context=True)
  config.data.update(max_len=FRAMES, normalize="none")
  vq_config = vqvae.VQConfig(**TINY_VQ, codebook_normalize=True, conv_norm="frame")
  task = dim_tasks.DIMTask.from_config(config, speaker_vq=vq_config, listener_vq=vq_config)
  params = params_helper.random_params(
      jax.eval_shape(task.init_params, jax.random.PRNGKey(0), pipeline.dummy_batch(1)))
  comparison, description = export.official_state_dict(params, dict(task.model_meta()))
  # Decoder positions (SLMFT has none) and the audio projection are ours only; the decoder is
  # 32 + 16 wide instead of 32 + 768, so its tensors differ in shape.
  assert "decoder_joint.net.pos_emb.emb.weight" in comparison.ours_only
  assert {"dim/audio_projector/kernel", "dim/audio_projector/bias"} <= set(comparison.ours_only)
  assert comparison.shape_differs["decoder_joint.net.to_logits.weight"] == dict(
      ours=(16, 48), official=(16, 800))
  assert not set(comparison.shape_differs) & set(comparison.state_dict)
  differences = " ".join(description["behaviour_differences"])
  for switch in ("decoder_positions", "audio_projection", "causal_context",
                 "positional_encoding='time'", "codebook_normalize", "conv_norm='frame'"):
    assert switch in differences, switch
  assert len(comparison.unmatched_lines()) == (len(comparison.ours_only)
                                               + len(comparison.shape_differs))
  with pytest.raises(torch_layout.LayoutError, match="code_groups=2"):
    torch_layout.vq_to_torch({}, vqvae.VQConfig(**dict(TINY_VQ, codebook_size=256), code_groups=2))
  with pytest.raises(torch_layout.LayoutError, match="token_factors"):
    torch_layout.dim_to_torch({}, dim_lib.DIMConfig(num_tokens=16, token_factors=(4, 4)),
                              vqvae.VQConfig(**TINY_VQ), vqvae.VQConfig(**TINY_VQ))


# --- numbers --------------------------------------------------------------------------------

def test_vq_tokens_and_motion_match_on_a_padded_batch(runs):
  run = runs["vq"]
  model = _reference(run["description"], "vq")
  model.load_state_dict(run["state_dict"], strict=True)
  vq = run["task"].model
  batch = _batch(0, lengths=(12, 9, 5))
  out = jax.jit(vq.apply)({"params": run["params"]}, batch["listener_motion"], batch["mask"])
  tokens, motion = np.asarray(out["tokens"]), np.asarray(out["reconstruction"])
  assert len(np.unique(tokens[batch["mask"]])) > 3
  for b, n in enumerate((12, 9, 5)):
    # The official class on this sequence alone, at batch position b (its table row b, as
    # `official_batch_index` adds in ours): b + 1 copies, the last one read.
    x = _t(np.repeat(batch["listener_motion"][b:b + 1, :n], b + 1, axis=0))
    with torch.no_grad():
      recon, _, info = model(x)
    np.testing.assert_array_equal(tokens[b, :n], info[2].view(b + 1, n)[b].numpy())
    np.testing.assert_allclose(motion[b, :n], recon[b].numpy(), atol=ATOL)


def test_pretraining_losses_match_the_reference(runs):
  run = runs["pretrain"]
  task, params = run["task"], run["params"]
  model = _reference(run["description"], "pretrain")
  model.load_state_dict(run["state_dict"], strict=True)
  eval_sums = jax.jit(task.eval_sums)
  encode = jax.jit(lambda p, x, m: task.speaker_vq.apply({"params": p}, x, m,
                                                         method=vqvae.VQVAE.encode)["tokens"])
  for lengths in (LENGTHS, (FRAMES,) * len(LENGTHS)):
    batch = _batch(1, lengths)
    ours = task.finalize_eval(jax.device_get(eval_sums(params, batch)))
    # The frame masks eval_sums draws (DIMTask._forward: split(PRNGKey(0), 4), first two).
    r_s, r_l, _, _ = jax.random.split(jax.random.PRNGKey(0), 4)
    hidden = [np.asarray(dim_tasks.random_frame_mask(r, batch["mask"], 0.15)) for r in (r_s, r_l)]
    # Targets: ours tokenizes in one padded batch (table row b for sample b); the official
    # loop tokenizes each sample alone (row 0), so the targets are given to the reference.
    tokens = [_t(np.array(encode(params[f"{r}_vq"], batch[f"{r}_motion"], batch["mask"]))).long()
              for r in ("speaker", "listener")]
    with torch.no_grad():
      _, terms, _ = model(_t(batch["speaker_motion"]), _t(batch["listener_motion"]),
                          _t(batch["speaker_audio"]), _t(batch["mask"]), tokens=tokens,
                          frame_masks=[_t(h) for h in hidden])
    np.testing.assert_allclose(ours["nce"], float(terms["nce"]), rtol=1e-5, atol=ATOL)
    np.testing.assert_allclose(ours["contrastive_accuracy"], float(terms["c_acc"]))
    np.testing.assert_allclose(ours["ce_speaker"], float(terms["l_ce_s"]), rtol=1e-5, atol=ATOL)
    np.testing.assert_allclose(ours["ce_listener"], float(terms["l_ce_l"]), rtol=1e-5, atol=ATOL)
    if min(lengths) == FRAMES:
      # Unpadded: the official VQ decode of the argmax tokens sees no padding either.
      for role, key in (("speaker", "l_cont_s"), ("listener", "l_cont_l")):
        continuous = ours[f"continuous_pose_{role}"] + ours[f"continuous_expression_{role}"]
        np.testing.assert_allclose(continuous, float(terms[key]), rtol=1e-5, atol=ATOL)


def test_finetune_logits_match_on_a_padded_batch(runs):
  run = runs["finetune_listener"]
  task, params = run["task"], run["params"]
  model = _reference(run["description"], "finetune_listener")
  model.load_state_dict(run["state_dict"], strict=True)
  batch = _batch(2)
  tokens = np.random.default_rng(3).integers(0, 16, (len(LENGTHS), FRAMES)).astype(np.int32)
  inputs = np.where(batch["mask"], tokens, 0)[:, :-1]  # AutoregressiveWrapper's inputs

  @jax.jit
  def logits_fn(params, batch, inputs):
    context = task.conditioning(params, batch)
    return task.model.apply({"params": params["dim"]}, inputs, context, batch["mask"],
                            method=dim_lib.DIM.decode)

  ours = np.asarray(logits_fn(params, batch, inputs))
  with torch.no_grad():
    mask = _t(batch["mask"])
    features = model.forward_encoder(_t(batch["speaker_motion"]), mask)
    context = torch.cat([features + model.patch_embed_dec_s, _t(batch["speaker_audio"])], -1)
    theirs = model.decoder_joint.net(_t(inputs).long(), context=context, context_mask=mask).numpy()
  valid = batch["mask"][:, 1:]  # rows whose targets count
  np.testing.assert_allclose(ours[valid], theirs[valid], atol=ATOL)


# --- round trips ----------------------------------------------------------------------------

@pytest.mark.parametrize("phase", ("vq",) + DIM_PHASES)
def test_round_trip_is_bit_identical(runs, phase):
  run = runs[phase]
  workdir = str(runs["root"] / f"{phase}_back")
  role = "vq_listener" if phase == "vq" else phase
  assert import_official.main(["--checkpoint", run["path"], "--phase", role,
                               "--workdir", workdir]) == 0
  back, meta = checkpointing.load_params(workdir)
  original, restored = _flat(run["params"]), _flat(back)
  assert original.keys() == restored.keys()
  assert all(_same_bits(original[k], restored[k]) for k in original)
  # The run's model is the exported one (from the JSON), not the official switches.
  model_meta = run["task"].model_meta()
  assert {k: meta[k] for k in model_meta} == json.loads(json.dumps(model_meta))
  assert meta["imported_from"]["official_class"] == torch_layout.OFFICIAL_CLASSES[phase]


def test_safetensors_export_and_import(runs, tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  run = runs["pretrain"]
  path = str(tmp_path / "slm.safetensors")
  assert export.main(["--workdir", run["workdir"], "--out", path, "--format", "safetensors",
                      "--step", "latest"]) == 0
  arrays = safetensors_numpy.load_file(path)
  assert arrays.keys() == run["state_dict"].keys()
  assert all(_same_bits(arrays[k], run["state_dict"][k].numpy()) for k in arrays)
  workdir = str(tmp_path / "back")
  assert import_official.main(["--checkpoint", path, "--phase", "pretrain",
                               "--workdir", workdir]) == 0
  back, _ = checkpointing.load_params(workdir)
  original, restored = _flat(run["params"]), _flat(back)
  assert all(_same_bits(original[k], restored[k]) for k in original)


# --- official files -----------------------------------------------------------------------

def _official_slmft(seed=2):
  """A reference SLMFT with torch's own init, norms and codebooks spread (no export)."""
  torch.manual_seed(seed)
  args = ref.DIMArgs(dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64, num_tokens=16,
                     dec_depth=1, dec_heads=2)
  vq_args = ref.VQArgs(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64, n_embed=16, zquant_dim=8)
  model = ref.SLMFT(args, vq_args, vq_args)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 or "patch_embed" in name:
        p.add_(0.3 * torch.randn_like(p))
      if name.endswith("quantize.embedding.weight"):
        p.normal_()
  return model.eval()


def test_official_slmft_generates_the_reference_tokens(tmp_path, capsys):
  model = _official_slmft()
  path = str(tmp_path / "best_vico_causal.pth.tar")
  # As the official scripts save it: DataParallel names inside a dict.
  torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
             path)
  workdir = str(tmp_path / "slmft")
  assert import_official.main(["--checkpoint", path, "--phase", "listener", "--workdir", workdir,
                               "--heads", "2", "--dim_head", "16", "--decoder_heads", "2",
                               "--vq_heads", "4", "--max_len", str(FRAMES)]) == 0
  printed = capsys.readouterr().out
  assert "official switches" in printed and "module." in printed
  meta = checkpointing.load_meta(workdir)
  assert meta["normalization"] is None and meta["config"]["data"]["normalize"] == "none"
  assert meta["model"]["decoder_positions"] is False
  assert {meta[f"{r}_vq"]["positional_encoding"] for r in ("speaker", "listener")} == {
      "official_first_row"}
  gen = generate.Generator.from_workdir(workdir, sampler.SamplingConfig(temperature=0.0))
  assert gen.window == FRAMES

  rng = np.random.default_rng(5)
  speaker = rng.normal(size=(1, FRAMES, 56)).astype(np.float32)
  audio = rng.normal(size=(1, FRAMES, 768)).astype(np.float32)
  # The official generation starts from the first token of the whole ground truth, ours from
  # the code of a still window at its first frame: a still listener makes them the same.
  listener = np.repeat(rng.normal(size=(1, 1, 56)).astype(np.float32), FRAMES, axis=1)
  mask = np.ones((1, FRAMES), bool)
  out = gen(dict(speaker_motion=speaker, listener_motion=listener, speaker_audio=audio,
                 mask=mask), jax.random.PRNGKey(0), num_samples=1, start="first_frame")
  tokens = np.asarray(out["tokens"])[0, 0]
  with torch.no_grad():
    model(_t(speaker), _t(listener), _t(audio), _t(mask), mode="val",
          generate_kwargs=dict(temperature=0.0))
    first = model.forward_vq(_t(speaker), _t(listener), _t(mask))[1][:, :1]
    theirs = torch.cat([first, model.last_tokens], dim=1)
    motion = model._decode_ids(model.listener_vq, theirs)  # pylint: disable=protected-access
  np.testing.assert_array_equal(tokens, theirs[0].numpy())
  assert len(np.unique(tokens)) > 1
  np.testing.assert_allclose(np.asarray(out["motion"])[0, 0], motion[0].numpy(), atol=ATOL)


def test_official_vq_file_imports_with_official_switches(tmp_path):
  torch.manual_seed(1)
  model = ref.VQAutoEncoder(ref.VQArgs(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=64, n_embed=16, zquant_dim=8)).eval()
  with torch.no_grad():
    model.quantize.embedding.weight.normal_()
  path = str(tmp_path / "model.pth.tar")
  torch.save({"epoch": 3, "state_dict": model.state_dict()}, path)  # official save_checkpoint
  workdir = str(tmp_path / "vq")
  assert import_official.main(["--checkpoint", path, "--phase", "vq_speaker",
                               "--workdir", workdir, "--vq_heads", "4"]) == 0
  params, meta = checkpointing.load_params(workdir)
  assert meta["phase"] == "vq" and meta["role"] == "speaker" and meta["normalization"] is None
  assert meta["model"]["positional_encoding"] == "official_first_row"
  assert meta["config"]["data"]["normalize"] == "none"
  x = np.random.default_rng(2).normal(size=(2, 10, 56)).astype(np.float32)
  vq = vqvae.VQVAE(dim_tasks.vq_config_from_meta(meta["model"]))
  out = jax.jit(vq.apply)({"params": params}, x, np.ones((2, 10), bool))
  # The official code tokenizes one sample at a time (table row 0 for each): so does the
  # import's `official_first_row` for every row of a batch.
  with torch.no_grad():
    alone = [model(_t(x[b:b + 1])) for b in range(2)]
  np.testing.assert_array_equal(np.asarray(out["tokens"]).reshape(-1),
                                np.concatenate([info[2].view(-1).numpy() for _, _, info in alone]))
  np.testing.assert_allclose(np.asarray(out["reconstruction"]),
                             np.concatenate([recon.numpy() for recon, _, _ in alone]), atol=ATOL)


def test_official_slm_chains_into_fine_tuning(tmp_path):
  """An imported official SLM is what `init.pretrain` of a fine-tune phase accepts."""
  torch.manual_seed(0)
  args = ref.DIMArgs(dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64, num_tokens=16,
                     dec_depth=1, dec_heads=2)
  vq_args = ref.VQArgs(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64, n_embed=16, zquant_dim=8)
  model = ref.SLM(args, vq_args, vq_args)
  path = str(tmp_path / "best_model_candor_pretrain.pt")
  torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)  # bare, DataParallel
  workdir = str(tmp_path / "pretrain")
  assert import_official.main(["--checkpoint", path, "--phase", "pretrain", "--workdir", workdir,
                               "--dim_head", "16", "--vq_heads", "4"]) == 0
  config = config_lib.dim_config("finetune_listener")
  config.model.update(TINY_DIM)
  config.data.update(max_len=FRAMES, normalize="none")
  config.init.pretrain = workdir
  metas = dim_tasks.init_metas(config)
  dim_tasks.check_normalization(None, metas)  # raw features on both sides
  task = dim_tasks.DIMTask.from_config(config, **dim_tasks.tokenizer_configs(config, metas))
  abstract = jax.eval_shape(task.init_params, jax.random.PRNGKey(0), pipeline.dummy_batch(1))
  grafted = task.pretrained_params(abstract)
  assert len(grafted) == len(jax.tree.leaves(abstract))  # every leaf from the SLM
  np.testing.assert_array_equal(grafted["dim/speaker_encoder/project_in/kernel"],
                                model.encoder_s.project_in.weight.detach().numpy().T)


class _NotATensor:
  """Anything a weights_only load must refuse to build."""


def _bad_file_error(tmp_path, capsys, name, payload, phase="vq_listener", extra=()):
  path = str(tmp_path / name)
  if isinstance(payload, bytes):
    with open(path, "wb") as f:
      f.write(payload)
  else:
    torch.save(payload, path)
  code = import_official.main(["--checkpoint", path, "--phase", phase,
                               "--workdir", str(tmp_path / f"run_{name}"), *extra])
  err = capsys.readouterr().err.strip()
  assert code == 1 and len(err.splitlines()) == 1 and path in err, err
  assert not os.path.exists(tmp_path / f"run_{name}" / "checkpoints")
  return err


def test_bad_files_are_one_line_errors(tmp_path, capsys):
  model = ref.VQAutoEncoder(ref.VQArgs(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=64, n_embed=16, zquant_dim=8))
  sd = dict(model.state_dict())
  err = _bad_file_error(tmp_path, capsys, "garbage.pth", b"\x00not a checkpoint" * 10)
  assert "cannot be read as a PyTorch checkpoint" in err
  err = _bad_file_error(tmp_path, capsys, "object.pth", {"state_dict": sd, "x": _NotATensor()})
  assert "weights_only" in err
  del sd["decoder.vertice_map_reverse.weight"]
  sd["decoder.extra.weight"] = torch.zeros(3, 4)
  err = _bad_file_error(tmp_path, capsys, "keys.pth", {"state_dict": sd},
                        extra=("--vq_heads", "4"))
  assert "missing decoder.vertice_map_reverse.weight [56, 32]" in err
  assert "unexpected decoder.extra.weight [3, 4]" in err
  err = _bad_file_error(tmp_path, capsys, "vq_as_slm.pth", {"state_dict": dict(model.state_dict())},
                        phase="pretrain")
  assert "not an official SLM/SLMFT layout" in err
  slmft = _official_slmft()
  err = _bad_file_error(tmp_path, capsys, "slmft_as_slm.pth", slmft.state_dict(), phase="pretrain",
                        extra=("--dim_head", "16", "--vq_heads", "4"))
  assert "has absolute positions" in err and "--phase listener" in err
