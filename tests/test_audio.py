"""dim_jax.data.audio (wav reading, batched/chunked feature extraction, frame-rate mapping) and
tools/extract_audio.py, on small random HuBERT models (no download)."""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest
from scipy.io import wavfile

from dim_jax.data import audio, official
from dim_jax.models import hubert
from helpers import params as params_helper

REPO = pathlib.Path(__file__).resolve().parents[1]

# 800 frames/s (hop 20 samples, receptive field 40), so chunking shows on short clips.
TINY = hubert.HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, conv_dim=(16, 16, 16), conv_stride=(5, 2, 2),
                           conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
                           num_conv_pos_embedding_groups=4)


def _random_params(config, seed=0):
  """Random values without compiling an init program; biases and LayerNorms moved off
  0 / 1 so every part of the model matters."""
  abstract = jax.eval_shape(hubert.HubertModel(config).init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 4000), np.float32))["params"]
  params = params_helper.random_params(abstract, seed, bias_scale=0.1)
  rng = np.random.default_rng(seed + 1)
  return jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), params)


@pytest.fixture(scope="module")
def tiny_params():
  return _random_params(TINY)


def _band_limited(rng, n, fmax=3000.0, tones=20, rate=16000):
  """Sum of tones below fmax with raised-cosine fades, peak 0.4 (no clipping, no edge click)."""
  t = np.arange(n) / rate
  f = rng.uniform(80.0, fmax, tones)
  phase = rng.uniform(0, 2 * np.pi, tones)
  x = (rng.uniform(0.2, 1.0, tones)[:, None]
       * np.sin(2 * np.pi * f[:, None] * t[None] + phase[:, None])).sum(0)
  fade = np.sin(np.linspace(0, np.pi / 2, n // 20)) ** 2
  x[:fade.size] *= fade
  x[-fade.size:] *= fade[::-1]
  return 0.4 * x / np.abs(x).max()


def _speech_like(rng, n):
  """Noise with a near-silent stretch: per-chunk GroupNorm statistics would differ from the
  whole clip's there."""
  env = np.ones(n)
  env[n // 3:n // 2] = 0.01
  return (0.3 * rng.normal(size=n) * env).astype(np.float32)


# ---------------------------------------------------------------------------
# Reading wavs.


def test_sample_formats_are_scaled_like_soundfile():
  np.testing.assert_array_equal(audio.to_float(np.array([0, 128, 255], np.uint8)),
                                [-1.0, 0.0, 127 / 128])
  np.testing.assert_array_equal(audio.to_float(np.array([-32768, 16384], np.int16)), [-1, 0.5])
  np.testing.assert_array_equal(audio.to_float(np.array([-2**31, 2**30], np.int32)), [-1, 0.5])
  np.testing.assert_array_equal(audio.to_float(np.array([0.25], np.float64)), [0.25])


def test_8k_stereo_int16_and_16k_float_read_as_the_16k_mono_signal(tmp_path, tiny_params):
  rng = np.random.default_rng(0)
  n = 16000
  signal = _band_limited(rng, n)
  side = _band_limited(rng, n)
  wavfile.write(tmp_path / "float16k.wav", 16000, signal.astype(np.float32))
  # The same band-limited signal sampled at 8 kHz; left/right differ by `side`, which the
  # channel average cancels.
  stereo = np.stack([signal[::2] + side[::2], signal[::2] - side[::2]], axis=1)
  wavfile.write(tmp_path / "stereo8k.wav", 8000,
                np.clip(np.round(stereo * 32768), -32768, 32767).astype(np.int16))
  direct = audio.read_wav(tmp_path / "float16k.wav")
  upsampled = audio.read_wav(tmp_path / "stereo8k.wav")
  assert direct.dtype == upsampled.dtype == np.float32
  np.testing.assert_array_equal(direct, signal.astype(np.float32))  # No resampling at 16 kHz.
  assert upsampled.shape == (n,)
  # resample_poly's Kaiser(beta=5) anti-imaging filter ripples by ~2e-3 of the amplitude in
  # the passband below 3 kHz: <= 8e-4 at peak 0.4, plus 1 int16 step (3e-5); measured 4.3e-4.
  assert np.abs(upsampled - signal).max() < 1e-3
  extractor = audio.AudioFeatureExtractor(TINY, tiny_params, chunk_seconds=1.0,
                                          context_seconds=0.0)
  want, got = extractor([direct, upsampled])
  # The waveform error is ~1e-3 of its RMS; features follow with gain ~1 (measured 1.3e-3).
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


def test_bad_wav_names_the_file(tmp_path):
  bad = tmp_path / "broken.wav"
  bad.write_bytes(b"RIFF0000WAVEnot really")
  with pytest.raises(audio.AudioError, match="broken.wav: not a readable wav file") as info:
    audio.read_wav(bad)
  assert "\n" not in str(info.value)
  with pytest.raises(audio.AudioError, match="missing.wav: no such file"):
    audio.read_wav(tmp_path / "missing.wav")


# ---------------------------------------------------------------------------
# Extraction.


def test_batch_with_buckets_equals_each_clip_alone(tiny_params):
  rng = np.random.default_rng(1)
  waves = [_speech_like(rng, n) for n in (1500, 777, 41)]
  extractor = audio.AudioFeatureExtractor(TINY, tiny_params, batch_size=2,
                                          chunk_seconds=0.1, context_seconds=0.0)
  assert extractor.bucket_frames == (40, 80)  # 74, 37, 1 frames: two buckets.
  got = extractor(waves)
  for wave, features in zip(waves, got):  # Alone: one real row in the batch.
    assert features.shape == (TINY.num_frames(len(wave)), 32)
    np.testing.assert_allclose(features, extractor([wave])[0], atol=1e-5)
  # And the unpadded model (test_hubert checks it against transformers).
  want = jax.jit(hubert.HubertModel(TINY).apply)({"params": tiny_params}, waves[1][None])
  np.testing.assert_allclose(got[1], np.asarray(want.last_hidden_state[0]), atol=1e-4)
  with pytest.raises(audio.AudioError, match="shorter than one frame"):
    extractor([np.zeros(39, np.float32)])


def test_chunks_reproduce_whole_clip_below_the_attention(tiny_params):
  # Hidden state 0 (conv features + positional conv) sees +-8 frames, inside the 10-frame
  # context: chunked extraction must equal the whole clip's to float rounding. This checks
  # chunk offsets, stitching, the positional conv at chunk edges and the whole-clip GroupNorm
  # statistics (the silent stretch would change per-chunk statistics by orders of magnitude).
  wave = _speech_like(np.random.default_rng(2), 24000)  # 1199 frames
  whole = audio.AudioFeatureExtractor(TINY, tiny_params, layer=0, chunk_seconds=2.0,
                                      context_seconds=0.0)([wave])[0]
  chunked_extractor = audio.AudioFeatureExtractor(
      TINY, tiny_params, layer=0, batch_size=8, chunk_seconds=50 / 800, context_seconds=10 / 800)
  assert chunked_extractor.max_window_frames == 70
  assert len(chunked_extractor._plan(0, len(wave))) == 24  # pylint: disable=protected-access
  chunked = chunked_extractor([wave])[0]
  assert chunked.shape == whole.shape
  np.testing.assert_allclose(chunked, whole, atol=2e-5)


def test_chunked_last_layer_converges_to_whole_clip(tiny_params):
  # Beyond hidden state 0, attention sees the whole clip, so a chunk differs by the context
  # it lacks. The random model attends almost uniformly (a trained HuBERT is far more local),
  # the worst case: measured relative errors 0.32 / 0.11 for 10 / 400 frames of context out
  # of 1199. The bounds check the error stays bounded and shrinks with context.
  rng = np.random.default_rng(3)
  wave = _speech_like(rng, 24000)
  whole = audio.AudioFeatureExtractor(TINY, tiny_params, chunk_seconds=2.0,
                                      context_seconds=0.0)([wave])[0]
  errors = []
  for context in (10, 400):
    chunked = audio.AudioFeatureExtractor(TINY, tiny_params, batch_size=8,
                                          chunk_seconds=80 / 800,
                                          context_seconds=context / 800)([wave])[0]
    errors.append(np.linalg.norm(chunked - whole) / np.linalg.norm(whole))
  assert errors[0] < 0.5 and errors[1] < errors[0] / 2, errors


# ---------------------------------------------------------------------------
# Frame rate.


def _emoca_video(folder, frames, rng):
  for t in range(frames):
    frame = folder / f"{t:06d}_000"
    frame.mkdir(parents=True)
    np.save(frame / "pose.npy", rng.normal(size=6).astype(np.float32))
    np.save(frame / "exp.npy", rng.normal(size=50).astype(np.float32))


def test_motion_frame_rate_is_convert_officials_emoca_rule(tmp_path):
  rng = np.random.default_rng(4)
  features = rng.normal(size=(101, 768)).astype(np.float32)  # 2.02 s at 50 Hz
  frames = audio.motion_frame_count(101, 30.0)
  assert frames == 61  # ceil(60.6)
  assert audio.motion_frame_count(100, 30.0) == 60
  _emoca_video(tmp_path / "emoca" / "spk", frames, rng)
  _emoca_video(tmp_path / "emoca" / "lst", frames, rng)
  (tmp_path / "hubert").mkdir()
  np.save(tmp_path / "hubert" / "utt.npy", features)
  meta = official.VicoMeta("positive", "utt", "lst", "spk", "l", "s", "train")
  clip = official.convert_emoca_utterance(tmp_path, meta, fps=30.0,
                                          audio_fps=official.HUBERT_FPS).clip
  np.testing.assert_array_equal(audio.to_motion_frame_rate(features, 30.0),
                                clip["speaker_audio"])
  np.testing.assert_array_equal(audio.to_motion_frame_rate(features, 30.0, num_frames=frames),
                                clip["speaker_audio"])
  # Frame i reads audio row i * 50 / 30 (linear interpolation): row 3 is 5.0, row 1 is 1.667.
  out = audio.to_motion_frame_rate(features, 30.0)
  np.testing.assert_allclose(out[3], features[5], rtol=1e-6)
  np.testing.assert_allclose(out[1], features[1] / 3 + features[2] * 2 / 3, rtol=1e-5,
                             atol=1e-6)


# ---------------------------------------------------------------------------
# CLI.


def _cli():
  spec = importlib.util.spec_from_file_location("extract_audio",
                                                REPO / "tools" / "extract_audio.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_extract_audio_cli_writes_what_convert_official_reads(tmp_path, capsys):
  # 768 wide, as the official readers require; hop 320 (50 fps) and one small layer.
  config = hubert.HubertConfig(
      hidden_size=768, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
      conv_dim=(16, 16), conv_stride=(5, 64), conv_kernel=(10, 80),
      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=16)
  hubert.save_pretrained(tmp_path / "model", config, _random_params(config))
  rng = np.random.default_rng(5)
  wavs = tmp_path / "wavs"
  wavs.mkdir()
  signals = {"a": _band_limited(rng, 14000), "b": _band_limited(rng, 9000)}  # one bucket
  wavfile.write(wavs / "a.wav", 16000, signals["a"].astype(np.float32))
  wavfile.write(wavs / "b.wav", 16000, (signals["b"] * 32768).astype(np.int16))
  out = tmp_path / "out"
  cli = _cli()
  assert cli.main(["--model_dir", str(tmp_path / "model"), "--out", str(out),
                   "--batch_size", "2", str(wavs)]) == 0
  assert sorted(p.name for p in (out / "hubert").iterdir()) == ["a.npy", "b.npy"]
  extractor = audio.AudioFeatureExtractor.from_pretrained(tmp_path / "model")
  for clip_id in ("a", "b"):
    stored = official.load_hubert(out / "hubert" / f"{clip_id}.npy")  # convert_official's reader
    assert stored.dtype == np.float32 and stored.shape[1] == 768
    want = extractor([audio.read_wav(wavs / f"{clip_id}.wav")])[0]
    assert stored.shape[0] == extractor.config.num_frames(len(signals[clip_id]))
    # Other batch shapes than the CLI's (batch 8, not 2): float32 rounding differs slightly.
    np.testing.assert_allclose(stored, want, atol=1e-4)
  (wavs / "c.wav").write_bytes(b"junk")
  capsys.readouterr()
  assert cli.main(["--model_dir", str(tmp_path / "model"), "--out", str(out), str(wavs)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "c.wav" in err[0] and "not a readable wav" in err[0], err
  assert not [p for p in (out / "hubert").iterdir() if p.suffix != ".npy"]  # No temp files.
  assert cli.main(["--model_dir", str(tmp_path / "none"), "--out", str(out),
                   str(wavs / "a.wav")]) == 1
  assert "huggingface-cli download facebook/hubert-base-ls960" in capsys.readouterr().err
