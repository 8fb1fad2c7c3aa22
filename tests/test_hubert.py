"""dim_jax.models.hubert against transformers' PyTorch HubertModel on small random configs.

Each config is saved the way users get checkpoints (save_pretrained -> model.safetensors with
torch's weight-norm parametrization names, or a pytorch_model.bin with the hub's legacy
`weight_g`/`weight_v` names under a `hubert.` prefix), loaded with `load_pretrained`, and run
as ONE zero-padded batch of different lengths (padding filled with noise, so unmasked padding
would show); every hidden state of each example's valid frames must equal the torch model run
on that example alone, unpadded. Differences are float32 rounding (~3e-6 measured), the bound
is 1e-4.
"""

import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dim_jax.models import hubert  # pylint: disable=g-import-not-at-top

TOL = 1e-4
LENGTHS = (4000, 2777, 1234)  # Different frame counts, none a multiple of the hop.

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
             num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)


def _torch_model(**overrides):
  config = transformers.HubertConfig(**{**SMALL, **overrides})
  torch.manual_seed(0)
  model = transformers.HubertModel(config).eval()
  with torch.no_grad():  # Move every tensor off its init (LayerNorm ones/zeros included).
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def _save(model, folder, fmt):
  """Writes a HF checkpoint folder: "safetensors" as save_pretrained does, or a legacy .bin."""
  if fmt == "safetensors":
    model.save_pretrained(str(folder))
    return folder
  model.config.save_pretrained(str(folder))
  state = {}
  for name, value in model.state_dict().items():
    name = name.replace("parametrizations.weight.original0", "weight_g")
    name = name.replace("parametrizations.weight.original1", "weight_v")
    state["hubert." + name] = value.clone()
  torch.save(state, str(folder / "pytorch_model.bin"))
  return folder


def _padded_batch(seed=0):
  rng = np.random.default_rng(seed)
  waves = [rng.normal(size=n).astype(np.float32) for n in LENGTHS]
  x = rng.normal(size=(len(waves), max(LENGTHS))).astype(np.float32)  # Noise in the padding.
  mask = np.zeros(x.shape, bool)
  for i, w in enumerate(waves):
    x[i, :len(w)] = w
    mask[i, :len(w)] = True
  return waves, x, mask


@pytest.mark.parametrize("norm,stable,fmt,extra", [
    ("group", False, "safetensors", {}),
    ("group", True, "bin", dict(hidden_act="gelu_new")),
    ("layer", False, "bin", dict(conv_bias=True, num_conv_pos_embeddings=15)),
    ("layer", True, "safetensors", dict(feat_proj_layer_norm=False)),
])
def test_padded_batch_matches_transformers_per_example(tmp_path, norm, stable, fmt, extra):
  torch_model = _torch_model(feat_extract_norm=norm, do_stable_layer_norm=stable, **extra)
  config, params = hubert.load_pretrained(_save(torch_model, tmp_path, fmt))
  assert (config.feat_extract_norm, config.do_stable_layer_norm) == (norm, stable)
  waves, x, mask = _padded_batch()
  out = jax.jit(hubert.HubertModel(config).apply)({"params": params}, x, mask)
  assert len(out.hidden_states) == SMALL["num_hidden_layers"] + 1
  for i, wave in enumerate(waves):
    with torch.no_grad():
      ref = torch_model(torch.from_numpy(wave)[None], output_hidden_states=True)
    frames = ref.last_hidden_state.shape[1]
    assert frames == int(torch_model._get_feat_extract_output_lengths(len(wave)))
    assert config.num_frames(len(wave)) == frames
    np.testing.assert_array_equal(np.asarray(out.frame_mask[i]),
                                  np.arange(x.shape[1] // config.frame_hop + 1)[
                                      :out.frame_mask.shape[1]] < frames)
    pairs = list(zip(out.hidden_states, ref.hidden_states)) + [
        (out.last_hidden_state, ref.last_hidden_state)]
    for k, (ours, theirs) in enumerate(pairs):
      diff = np.abs(np.asarray(ours[i, :frames]) - theirs[0].numpy()).max()
      assert diff <= TOL, f"example {i} hidden state {k}: max abs diff {diff}"


def test_selected_layer_equals_hidden_state(tmp_path):
  # Pre-LN, so last_hidden_state (after the final LayerNorm) differs from hidden_states[-1].
  config, params = hubert.load_pretrained(
      _save(_torch_model(do_stable_layer_norm=True), tmp_path, "safetensors"))
  _, x, mask = _padded_batch(1)
  model = hubert.HubertModel(config)
  out = model.apply({"params": params}, x, mask)
  valid = np.asarray(out.frame_mask)
  assert np.abs(np.asarray(out.last_hidden_state - out.hidden_states[-1])[valid]).max() > 0.1
  for layer, want in [(0, out.hidden_states[0]), (1, out.hidden_states[1]),
                      (-1, out.hidden_states[2]), (None, out.last_hidden_state)]:
    got, frame_mask = model.apply({"params": params}, x, mask, layer=layer,
                                  method=hubert.HubertModel.features)
    np.testing.assert_array_equal(np.asarray(frame_mask), valid)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-6)
  with pytest.raises(ValueError, match="out of range"):
    model.apply({"params": params}, x, mask, layer=3, method=hubert.HubertModel.features)


def test_base_geometry_and_frame_counts():
  config = hubert.HubertConfig.from_hf(transformers.HubertConfig())  # hubert-base-ls960
  assert (config.frame_hop, config.receptive_field, config.frame_rate) == (320, 400, 50.0)
  torch_model = transformers.HubertModel(transformers.HubertConfig(**SMALL))
  base_lengths = np.array([400, 401, 719, 720, 16000, 16319, 160000])
  hf = transformers.HubertModel._get_feat_extract_output_lengths
  base = type("Base", (), {"config": transformers.HubertConfig()})()
  np.testing.assert_array_equal(config.num_frames(base_lengths),
                                hf(base, torch.from_numpy(base_lengths)).numpy())
  assert config.num_frames(16000) == 49 and config.num_frames(399) == 0
  small = hubert.HubertConfig.from_hf(torch_model.config)
  for n in (40, 59, 60, 1234):
    assert small.num_frames(n) == int(torch_model._get_feat_extract_output_lengths(n))


def test_missing_folder_is_one_line_with_download_hint(tmp_path):
  folder = tmp_path / "nowhere"
  with pytest.raises(hubert.HubertCheckpointError) as info:
    hubert.load_pretrained(folder)
  message = str(info.value)
  assert "\n" not in message and str(folder) in message
  assert f"huggingface-cli download facebook/hubert-base-ls960 --local-dir {folder}" in message
  transformers.HubertConfig(**SMALL).save_pretrained(str(tmp_path))  # config, no weights.
  with pytest.raises(hubert.HubertCheckpointError, match="no HuBERT weights.*hubert-base-ls960"):
    hubert.load_pretrained(tmp_path)


def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path):
  torch_model = _torch_model()
  config = hubert.HubertConfig.from_hf(torch_model.config)
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  assert hubert.params_from_state_dict(state, config) is not None
  broken = dict(state)
  del broken["encoder.layers.1.feed_forward.output_dense.bias"]
  broken["lm_head.weight"] = np.zeros((4, 32), np.float32)
  with pytest.raises(hubert.HubertCheckpointError) as info:
    hubert.params_from_state_dict(broken, config)
  message = str(info.value)
  assert "missing tensors: [encoder.layers.1.feed_forward.output_dense.bias]" in message
  assert "unexpected tensors: [lm_head.weight]" in message
  misshaped = dict(state, **{"feature_projection.projection.weight": np.zeros((32, 15))})
  with pytest.raises(hubert.HubertCheckpointError,
                     match=r"feature_projection\.projection\.weight \(32, 15\)"):
    hubert.params_from_state_dict(misshaped, config)
  # A checkpoint of the other feature-encoder norm: layer norms it lacks are named.
  layer_config = hubert.HubertConfig.from_hf(
      transformers.HubertConfig(**SMALL, feat_extract_norm="layer"))
  with pytest.raises(hubert.HubertCheckpointError,
                     match=r"missing tensors: \[feature_extractor\.conv_layers\.1\.layer_norm"):
    hubert.params_from_state_dict(state, layer_config)


def test_bin_without_torch_says_so(tmp_path, monkeypatch):
  _save(_torch_model(), tmp_path, "bin")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError.
  with pytest.raises(hubert.HubertCheckpointError, match="needs torch.*model.safetensors"):
    hubert.load_pretrained(tmp_path)


def test_save_pretrained_round_trips_through_transformers(tmp_path):
  torch_model = _torch_model(feat_extract_norm="layer", conv_bias=True)
  config, params = hubert.load_pretrained(_save(torch_model, tmp_path / "src", "safetensors"))
  hubert.save_pretrained(tmp_path / "ours", config, params)
  again, info = transformers.HubertModel.from_pretrained(str(tmp_path / "ours"),
                                                         output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  for name, value in torch_model.state_dict().items():
    torch.testing.assert_close(again.state_dict()[name], value, rtol=0, atol=0)
  assert hubert.load_pretrained(tmp_path / "ours")[0] == config
