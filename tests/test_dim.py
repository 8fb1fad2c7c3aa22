"""DIM model and phases: masking, InfoNCE, cross-entropy, frozen parameters, learning, phase
chaining (VQ -> pretrain -> fine-tune), the ablation switches, and official parameter counts.

Expected values are derived independently: NumPy transcriptions of the official torch code
(`code/seq2seq_pretrain.py`, x-transformers 1.30.16 `AutoregressiveWrapper`), hand counts of the
official modules, and which parameters the official `SLM` / `SLMFT` / `SpeakerSLMFT` train.
Module and task tests use tiny widths and a 24-wide audio feature (any width works as long
as the batch matches `audio_dim`); the phase-chaining test uses the real trainer and records.
"""

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dim_jax import config_lib, generate, handoff, phases, sampler
from dim_jax.data import pipeline, records, synthetic
from dim_jax.evaluation import evaluate as evaluate_lib
from dim_jax.evaluation import metrics as metrics_lib
from dim_jax.models import dim as dim_lib
from dim_jax.models import vqvae
from dim_jax.training import checkpointing, dim_tasks, metric_writer, trainer, vq
from helpers import params as params_helper

AUDIO = 24
TINY_DIM = dict(audio_dim=AUDIO, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64,
                num_tokens=16, decoder_depth=1, decoder_heads=2)
TINY_VQ = vqvae.VQConfig(hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64,
                         codebook_size=16, code_dim=8, dropout_rate=0.0)
FRAMES = 24
LENGTHS = (24, 17, 9, 20)
PHASES = ("pretrain", "finetune_listener", "finetune_speaker")


# --- helpers ------------------------------------------------------------------------------

def flat(tree) -> dict:
  return {checkpointing.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def same_bits(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def task_from_config(config, vq_config=TINY_VQ) -> dim_tasks.DIMTask:
  """`DIMTask.from_config` (no checkpoints needed): model and loss from `config` (tiny widths
  applied on top), tiny in-memory VQ-VAEs."""
  for key, value in TINY_DIM.items():
    config.model[key] = value
  config.data.max_len = TINY_DIM["max_seq_len"] // 2
  return dim_tasks.DIMTask.from_config(config, speaker_vq=vq_config, listener_vq=vq_config)


def make_task(phase, ablation="none") -> dim_tasks.DIMTask:
  return task_from_config(config_lib.dim_config(phase, ablation))


def make_batch(seed, lengths=LENGTHS, frames=FRAMES, audio_dim=AUDIO) -> dict:
  """Synthetic dyadic clips, zero-padded to `frames`, audio cut to `audio_dim` columns."""
  clips = synthetic.generate_clips(len(lengths), seed, min_len=frames, max_len=frames,
                                   id_prefix="dimtest")
  b = len(lengths)
  batch = dict(speaker_motion=np.zeros((b, frames, 56), np.float32),
               listener_motion=np.zeros((b, frames, 56), np.float32),
               speaker_audio=np.zeros((b, frames, audio_dim), np.float32),
               mask=np.zeros((b, frames), bool))
  for i, (clip, n) in enumerate(zip(clips, lengths)):
    batch["speaker_motion"][i, :n] = clip["speaker_motion"][:n]
    batch["listener_motion"][i, :n] = clip["listener_motion"][:n]
    batch["speaker_audio"][i, :n] = clip["speaker_audio"][:n, :audio_dim]
    batch["mask"][i, :n] = True
  return batch


def prefix_mask(lengths, frames) -> np.ndarray:
  return np.arange(frames)[None, :] < np.asarray(lengths)[:, None]


@pytest.fixture(scope="module")
def batches():
  return [make_batch(seed) for seed in range(2)]


def random_params(abstract, seed=0):
  """Random values for a param tree (tests/helpers/params.py) with zero biases and
  embeddings: these tests are about losses and freezing, not about initialisation (the
  trainer's real init runs in `chain`)."""
  return params_helper.random_params(abstract, seed)


@pytest.fixture(scope="module")
def base_params(batches):
  """Params of the tiny pretrain task (the finetune_speaker tree is the same; the
  finetune_listener tree lacks the decoder positions)."""
  task = make_task("pretrain")
  return random_params(jax.eval_shape(task.init_params, jax.random.PRNGKey(0), batches[0]))


def params_for(phase, base_params):
  if phase != "finetune_listener":
    return base_params
  dim = dict(base_params["dim"])
  dim["joint_decoder"] = {k: v for k, v in dim["joint_decoder"].items() if k != "pos_emb"}
  return dict(base_params, dim=dim)


# --- 1. masking -----------------------------------------------------------------------------

def _floor_count(n, ratio):
  # Official `int(cur_len * mask_ratio)`: an int32 tensor times a float is float32 in torch.
  return int(np.floor(np.float32(n) * np.float32(ratio)))


def _random_validity(rng, rows, frames):
  """Prefix masks of random lengths (0..frames) and, for half the rows, random holes."""
  lengths = rng.integers(0, frames + 1, size=rows)
  mask = prefix_mask(lengths, frames)
  holes = rng.random((rows, frames)) < rng.random((rows, 1))
  mask[::2] = holes[::2]
  return mask


def test_random_frame_mask_exact_count_never_padding():
  fn = jax.jit(dim_tasks.random_frame_mask)  # ratio traced: one compile for all ratios.
  rng = np.random.default_rng(0)
  for trial, ratio in enumerate([0.15, 0.3, 0.5, 0.9, 0.15, 0.07]):
    mask = _random_validity(rng, 64, 70)
    got = np.asarray(fn(jax.random.PRNGKey(trial), jnp.asarray(mask), ratio))
    assert got.dtype == bool and got.shape == mask.shape
    assert not np.any(got & ~mask), "a padded frame was masked"
    expected = [_floor_count(n, ratio) for n in mask.sum(1)]
    np.testing.assert_array_equal(got.sum(1), expected)

  # Rows and rngs draw different frames, and every valid frame is drawn equally often.
  mask = prefix_mask([40] * 8 + [30] * 8, 48)
  a = np.asarray(fn(jax.random.PRNGKey(1), jnp.asarray(mask), 0.15))
  b = np.asarray(fn(jax.random.PRNGKey(2), jnp.asarray(mask), 0.15))
  assert not np.array_equal(a, b)
  assert len({row.tobytes() for row in a}) == len(a)
  many = np.asarray(jax.vmap(lambda k: dim_tasks.random_frame_mask(k, jnp.asarray(mask), 0.15))(
      jax.random.split(jax.random.PRNGKey(3), 400)))
  assert not np.any(many & ~mask[None])
  frequency = many[:, :8, :40].mean(axis=(0, 1))  # rows of length 40: 6 of 40 frames each.
  assert np.all(np.abs(frequency - 6 / 40) < 0.05), frequency


def test_decoder_key_mask_hides_exact_count_never_key0_or_padding():
  assert dim_tasks.decoder_key_mask(jax.random.PRNGKey(0), jnp.ones((2, 5), bool), 0.0) is None
  fn = jax.jit(dim_tasks.decoder_key_mask, static_argnums=2)
  rng = np.random.default_rng(1)
  for trial, prob in enumerate([0.15, 0.5, 0.8]):
    valid = _random_validity(rng, 64, 70)
    keep = np.asarray(fn(jax.random.PRNGKey(trial), jnp.asarray(valid), prob))
    assert keep.shape == valid.shape and keep.dtype == bool
    np.testing.assert_array_equal(keep[:, 0], valid[:, 0])  # key 0 is never hidden.
    assert not np.any(keep & ~valid)                         # padding stays unattended.
    hidden = valid & ~keep
    np.testing.assert_array_equal(hidden.sum(1), [_floor_count(n, prob) for n in valid.sum(1)])
  valid = prefix_mask([70] * 64, 70)
  a = np.asarray(fn(jax.random.PRNGKey(1), jnp.asarray(valid), 0.15))
  b = np.asarray(fn(jax.random.PRNGKey(2), jnp.asarray(valid), 0.15))
  assert not np.array_equal(a, b) and len({row.tobytes() for row in a}) == 64


# --- 2. InfoNCE -----------------------------------------------------------------------------

def official_forward_contrastive(s_rep, l_rep, lengths, bidirect, temperature=0.05):
  """NumPy (float64) transcription of official `SLM.forward_contrastive`."""
  s = np.stack([s_rep[i, :n].astype(np.float64).mean(0) for i, n in enumerate(lengths)])
  l = np.stack([l_rep[i, :n].astype(np.float64).mean(0) for i, n in enumerate(lengths)])
  normalize = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  total = normalize(s) @ normalize(l).T / temperature

  def log_softmax0(x):
    m = x.max(0, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(0, keepdims=True))

  def one(t):
    nce = -np.mean(np.diag(log_softmax0(t)))
    acc = np.sum(np.argmax(np.exp(log_softmax0(t)), axis=0) == np.arange(len(t))) / len(t)
    return nce, acc

  if not bidirect:
    return one(total)
  (n1, a1), (n2, a2) = one(total), one(total.T)
  return (n1 + n2) / 2, (a1 + a2) / 2


info_nce = jax.jit(dim_tasks.info_nce, static_argnums=(4, 5))


def test_info_nce_matches_official_formula_and_ignores_padding_and_fillers():
  rng = np.random.default_rng(6)
  lengths = [12, 5, 9, 3, 12, 7]
  frames, width = 12, 8
  shared = rng.normal(size=(6, 1, width))
  s = (shared + 1.5 * rng.normal(size=(6, frames, width))).astype(np.float32)
  l = (shared + 3.0 * rng.normal(size=(6, frames, width))).astype(np.float32)
  # Pool with a filler example (no valid frame) inserted at row 2: a copy of example 0, so
  # that counting it as a positive or negative would change both loss and accuracy.
  s_full = np.concatenate([s[:2], s[:1], s[2:]]).copy()
  l_full = np.concatenate([l[:2], l[:1], l[2:]]).copy()
  lengths_full = lengths[:2] + [0] + lengths[2:]
  mask = prefix_mask(lengths_full, frames)
  # Huge garbage on every padded frame (including the whole filler row).
  s_full[~mask] = 1e6
  l_full[~mask] = -3e5
  example_valid = mask.any(1)
  for bidirectional in (False, True):
    want_loss, want_acc = official_forward_contrastive(s, l, lengths, bidirectional)
    assert 0 < want_acc < 1  # a non-trivial case: some pairs right, some wrong.
    loss, acc = info_nce(jnp.asarray(s_full), jnp.asarray(l_full), jnp.asarray(mask),
                                   jnp.asarray(example_valid), 0.05, bidirectional)
    np.testing.assert_allclose(float(loss), want_loss, rtol=2e-5)
    np.testing.assert_allclose(float(acc), want_acc, atol=1e-6)
  # Without the filler (and without padding garbage) the same numbers come out.
  loss_plain, _ = info_nce(jnp.asarray(s), jnp.asarray(l),
                                     jnp.asarray(prefix_mask(lengths, frames)),
                                     jnp.ones(6, bool), 0.05, False)
  np.testing.assert_allclose(float(loss_plain),
                             official_forward_contrastive(s, l, lengths, False)[0], rtol=2e-5)



# --- 3. cross-entropy and teacher forcing ---------------------------------------------------

def official_shift(x, start_token=None):
  """x-transformers 1.30.16 AutoregressiveWrapper.forward (ignore_index -100, pad_value 0):
  inp, target = x[:, :-1], x[:, 1:]; inp = where(inp == ignore_index, pad_value, inp).
  The start-token variant prepends `start_token` to the inputs and predicts every frame."""
  if start_token is not None:
    x_in = np.concatenate([np.full((len(x), 1), start_token), x], axis=1)
    inp, target = x_in[:, :-1], x
  else:
    inp, target = x[:, :-1], x[:, 1:]
  inp = np.where(inp == -100, 0, inp)
  return inp, target


def numpy_ce_sums(logits, targets):
  logits = np.asarray(logits, np.float64)
  valid = targets != -100
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], -1)[..., 0]
  correct = (logits.argmax(-1) == targets) & valid
  return nll[valid].sum(), valid.sum(), correct.sum()


def test_teacher_forcing_matches_autoregressive_wrapper():
  rng = np.random.default_rng(6)
  x = rng.integers(0, 16, size=(3, 9))
  x[rng.random(x.shape) < 0.4] = -100
  x[1, 6:] = -100  # padding
  inp, target = dim_tasks.teacher_forcing(jnp.asarray(x), None)
  want_inp, want_target = official_shift(x)
  np.testing.assert_array_equal(np.asarray(inp), want_inp)
  np.testing.assert_array_equal(np.asarray(target), want_target)
  inp, target = dim_tasks.teacher_forcing(jnp.asarray(x), 16)
  want_inp, want_target = official_shift(x, start_token=16)
  np.testing.assert_array_equal(np.asarray(inp), want_inp)
  np.testing.assert_array_equal(np.asarray(target), want_target)
  assert np.all(np.asarray(inp)[:, 0] == 16) and np.asarray(inp).shape == x.shape


def test_cross_entropy_sums_ignore_positions():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(3, 10, 16)).astype(np.float32) * 3
  targets = rng.integers(0, 16, size=(3, 10))
  targets[rng.random(targets.shape) < 0.5] = -100
  got = [float(v) for v in dim_tasks.cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets))]
  want = numpy_ce_sums(logits, targets)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  assert got[1:] == [want[1], want[2]]
  # Any change of the logits at ignored positions changes nothing.
  other = logits.copy()
  other[targets == -100] = rng.normal(size=other[targets == -100].shape) * 1e3
  again = dim_tasks.cross_entropy_sums(jnp.asarray(other), jnp.asarray(targets))
  assert [float(v) for v in again] == got


def _predict_ce(task, params, role, tokens, hidden, context, mask):
  out = task._predict_role(params, role, jnp.asarray(tokens), jnp.asarray(hidden),
                           jnp.asarray(context), jnp.asarray(mask), jax.random.PRNGKey(9), True)
  logits, _, frames, ce, _ = out
  return np.asarray(logits), np.asarray(frames), [float(v) for v in ce]


@pytest.mark.parametrize("phase", ["pretrain", "finetune_listener"])
def test_phase_cross_entropy_only_on_predicted_valid_frames(phase, base_params):
  """Pretrain: CE only on masked frames; fine-tune: on every valid frame; never padding.
  Changing a token where it is not predicted (unmasked or padded) changes nothing."""
  task = make_task(phase)
  params = params_for(phase, base_params)
  rng = np.random.default_rng(8)
  mask = prefix_mask(LENGTHS, FRAMES)
  tokens = rng.integers(0, 16, size=mask.shape).astype(np.int32)
  context = rng.normal(size=(len(LENGTHS), FRAMES, TINY_DIM["dim"] + AUDIO)).astype(np.float32)
  if phase == "pretrain":
    hidden = np.asarray(dim_tasks.random_frame_mask(jax.random.PRNGKey(4), jnp.asarray(mask), 0.3))
  else:
    hidden = mask  # `_forward` predicts every valid listener frame in fine-tuning.
  role = "listener"
  logits, frames, ce = _predict_ce(task, params, role, tokens, hidden, context, mask)
  # Targets are frames 1..T-1 where predicted; the CE is the NumPy CE on exactly those.
  targets = np.where(hidden, tokens, -100)[:, 1:]
  want = numpy_ce_sums(logits, targets)
  np.testing.assert_allclose(ce[0], want[0], rtol=1e-5)
  assert ce[1] == hidden[:, 1:].sum() == want[1]
  np.testing.assert_array_equal(frames, hidden[:, 1:])
  # Tokens at frames that are not predicted (unmasked in pretraining, padding always).
  changed = np.where(hidden, tokens, (tokens + 7) % 16)
  assert _predict_ce(task, params, role, changed, hidden, context, mask)[2] == ce
  # A token at a predicted frame (beyond the first) does change the loss.
  row, col = np.argwhere(hidden[:, 1:])[0] + np.array([0, 1])
  changed = tokens.copy()
  changed[row, col] = (changed[row, col] + 5) % 16
  assert _predict_ce(task, params, role, changed, hidden, context, mask)[2][0] != ce[0]


def test_factorised_head_scores_the_pose_and_expression_codes_of_part_tokenizers():
  """model.token_factors=(P, E) with part-encoder tokenizers: CE of token t is the pose
  code's CE plus the expression code's, each under its own softmax; mismatched tokenizers
  are refused."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  part_vq = dataclasses.replace(TINY_VQ, code_groups=2, part_encoders=True, pose_codes=2)
  assert part_vq.group_sizes == (2, 8)  # 16 is a square: unequal sizes must still win
  config = config_lib.dim_config("finetune_listener")
  config.model.token_factors = (2, 8)
  task = task_from_config(config, part_vq)
  for factors, tokenizer in (((4, 4), part_vq), ((2, 8), TINY_VQ)):
    config.model.token_factors = factors
    with pytest.raises(ValueError, match="token_factors"):
      task_from_config(config, tokenizer)
  batch = make_batch(0)
  params = random_params(jax.eval_shape(task.init_params, jax.random.PRNGKey(0), batch), seed=3)
  rng = np.random.default_rng(8)
  mask = prefix_mask(LENGTHS, FRAMES)
  tokens = rng.integers(0, 16, size=mask.shape).astype(np.int32)
  context = rng.normal(size=(len(LENGTHS), FRAMES, TINY_DIM["dim"] + AUDIO)).astype(np.float32)
  out = task._predict_role(params, "listener", jnp.asarray(tokens), jnp.asarray(mask),
                           jnp.asarray(context), jnp.asarray(mask), jax.random.PRNGKey(9), False)
  ce = [float(v) for v in out[3]]
  assert out[0].shape == (*tokens[:, 1:].shape, 2 + 8)  # the loss reads the two codes' logits
  # The reference: the decoder's pair logits (what generation samples from), teacher forced
  # as in fine-tuning (start = ground truth: inputs are frames 0..T-2).
  logits = np.asarray(task.model.apply({"params": params["dim"]}, jnp.asarray(tokens[:, :-1]),
                                       jnp.asarray(context), jnp.asarray(mask), None,
                                       method=dim_lib.DIM.decode), np.float64)
  pairs = logits.reshape(*logits.shape[:2], 2, 8)
  log_softmax = lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))
  targets = tokens[:, 1:]  # position p predicts frame p + 1
  valid = mask[:, 1:]
  flat_nll = -np.take_along_axis(log_softmax(logits), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(ce[0], flat_nll[valid].sum(), rtol=1e-5)
  assert ce[2] == (np.argmax(logits, -1) == targets)[valid].sum()
  # ... which is the pose code's CE plus the expression code's, each under its own softmax.
  pose_logp, expression_logp = log_softmax(pairs[..., :, 0]), log_softmax(pairs[..., 0, :])
  nll = -(np.take_along_axis(pose_logp, (targets // 8)[..., None], -1)[..., 0]
          + np.take_along_axis(expression_logp, (targets % 8)[..., None], -1)[..., 0])
  # (float32 pair sums: equal to float32 rounding)
  np.testing.assert_allclose(nll[valid].sum(), flat_nll[valid].sum(), rtol=1e-6)
  assert np.std(pose_logp) > 0.01 and np.std(expression_logp) > 0.01  # not a uniform head
  # The continuous loss's decode ('soft' expectation / 'argmax' token) from the code logits
  # equals the decode from the pair logits over the tokenizer's whole code table.
  codebook = np.asarray(task.listener_vq.apply({"params": params["listener_vq"]},
                                               method=vqvae.VQVAE.code_vectors), np.float64)
  probs = np.exp(log_softmax(logits))
  for soft, want in ((True, probs @ codebook), (False, codebook[np.argmax(logits, -1)])):
    got = dim_tasks._factored_decode(out[0], jnp.asarray(codebook, jnp.float32), (2, 8), soft=soft)
    # Valid positions (the loss's padded inputs differ from the raw tokens used here).
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], rtol=1e-5, atol=1e-6)
  assert np.std(codebook[:, :codebook.shape[1] // 2]) > 1e-3  # both halves carry codes


# --- 4. continuous loss ---------------------------------------------------------------------

def test_pairwise_distance_sums_match_torch_formula():
  rng = np.random.default_rng(10)
  pred = rng.normal(size=(3, 11, 56)).astype(np.float32)
  target = rng.normal(size=(3, 11, 56)).astype(np.float32)
  frames = rng.random((3, 11)) < 0.6
  pred[~frames] = 1e6  # not counted
  pose, expression, n = dim_tasks.pairwise_distance_sums(
      jnp.asarray(pred), jnp.asarray(target), jnp.asarray(frames))
  # torch F.pairwise_distance(x1, x2) = ||x1 - x2 + 1e-6||_2 per row; official mean per stream.
  p, t = pred[frames].astype(np.float64), target[frames].astype(np.float64)
  want_pose = np.linalg.norm(p[:, :6] - t[:, :6] + 1e-6, axis=-1)
  want_exp = np.linalg.norm(p[:, 6:] - t[:, 6:] + 1e-6, axis=-1)
  assert float(n) == frames.sum()
  np.testing.assert_allclose(float(pose) / float(n), want_pose.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(expression) / float(n), want_exp.mean(), rtol=1e-5)
  # The eps matters where prediction equals target (torch gives sqrt(d) * 1e-6, not 0).
  same = dim_tasks.pairwise_distance_sums(jnp.asarray(target), jnp.asarray(target),
                                          jnp.ones((3, 11), bool))
  np.testing.assert_allclose(float(same[0]) / 33, np.sqrt(6) * 1e-6, rtol=1e-3)


# --- 5./6. frozen parameters and learning, through the real train step ----------------------

# What the official code trains in each phase (parameters with a gradient; VQ encoders and
# codebooks never).  SLM: all of its own modules + both VQ decoders.  SLMFT: speaker encoder,
# joint encoder, speaker norm/role/context embeddings, joint decoder; VQ decoders frozen.
# SpeakerSLMFT: joint decoder, listener context embedding, speaker VQ decoder.  Ours adds the
# optional audio projector (part of the decoder context, trained wherever the decoder is).
TRAINED = {
    "pretrain": ("dim/", "speaker_vq/decoder/", "listener_vq/decoder/"),
    "finetune_listener": ("dim/speaker_encoder/", "dim/joint_encoder/",
                          "dim/speaker_role_embedding", "dim/speaker_norm/",
                          "dim/speaker_context_embedding", "dim/joint_decoder/",
                          "dim/audio_projector/"),
    "finetune_speaker": ("dim/joint_decoder/", "dim/listener_context_embedding",
                         "dim/audio_projector/", "speaker_vq/decoder/"),
}
STEPS = 40
PRETRAIN_STEPS = 40


@pytest.mark.parametrize("audio_projection", [0, 8])
@pytest.mark.parametrize("phase", PHASES)
def test_trainable_mask_matches_official_phase(phase, audio_projection, batches):
  config = config_lib.dim_config(phase)
  config.model.audio_projection = audio_projection
  task = task_from_config(config)
  abstract = jax.eval_shape(task.init_params, jax.random.PRNGKey(0), batches[0])
  assert ("audio_projector" in abstract["dim"]) == (audio_projection > 0)
  mask = flat(task.trainable_mask(abstract))
  want = {path: path.startswith(TRAINED[phase]) for path in flat(abstract)}
  assert mask == want
  assert any(want.values()) and not all(want.values())


@pytest.fixture(scope="module", params=["finetune_listener", "finetune_speaker"])
def trained(request, base_params, batches):
  """STEPS AdamW steps (weight decay 0.1, clip 1.0) of a fine-tune phase on two fixed batches
  through `trainer.train_step` (pretraining runs through the whole trainer in `chain`)."""
  phase = request.param
  task = make_task(phase)
  params = params_for(phase, base_params)
  train_cfg = config_lib.train_config()
  train_cfg.learning_rate = 1e-3
  train_cfg.weight_decay = 0.1
  train_cfg.grad_clip_norm = 1.0
  trainable = task.trainable_mask(params)
  optimizer = trainer.make_optimizer(train_cfg, trainable)
  step = jax.jit(functools.partial(trainer.train_step, task=task, optimizer=optimizer,
                                   trainable=trainable))
  state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
               rng=jax.random.PRNGKey(1))
  snapshots, metrics = {0: params}, []
  for i in range(STEPS):
    state, m = step(state, batches[i % 2])
    metrics.append(jax.device_get(m))
    if i + 1 in (3, STEPS):
      snapshots[i + 1] = jax.device_get(state["params"])
  return dict(phase=phase, task=task, trainable=trainable, snapshots=snapshots, metrics=metrics)


def test_frozen_parameters_are_bit_identical_after_training(trained):
  phase = trained["phase"]
  before = flat(trained["snapshots"][0])
  for step in (3, STEPS):
    after = flat(trained["snapshots"][step])
    assert after.keys() == before.keys()
    frozen = [p for p in before if not p.startswith(TRAINED[phase])]
    assert frozen
    moved = [p for p in frozen if not same_bits(before[p], after[p])]
    assert not moved, f"{phase}: frozen leaves changed after {step} steps: {moved[:5]}"
    still = [p for p in before if p.startswith(TRAINED[phase])
             and np.array_equal(np.asarray(before[p]), np.asarray(after[p]))]
    assert not still, f"{phase}: trainable leaves unchanged after {step} steps: {still[:5]}"


def test_each_phase_loss_falls_on_synthetic_data(trained):
  phase = trained["phase"]
  metrics = trained["metrics"]
  first = {k: np.mean([m[k] for m in metrics[:2]]) for k in metrics[0]}
  last = {k: np.mean([m[k] for m in metrics[-2:]]) for k in metrics[0]}
  assert all(np.isfinite(float(m["loss"])) for m in metrics)
  ce_terms = [k for k in first if k.startswith("ce_")]
  assert ce_terms == {"finetune_listener": ["ce_listener"],
                      "finetune_speaker": ["ce_speaker"]}[phase]
  for k in ce_terms:
    assert last[k] < 0.7 * first[k], (phase, k, first[k], last[k])
  if phase == "finetune_listener":
    # Official SLMFT freezes the VQ decoder and the continuous loss goes through argmax (no
    # gradient), so the fall comes from the cross-entropy.
    assert last["loss"] < first["loss"] - 0.5 * (first["ce_listener"] - last["ce_listener"])
  else:
    assert last["loss"] < 0.7 * first["loss"], (phase, first["loss"], last["loss"])


# --- 7. phase chaining: VQ checkpoints -> pretrain (whole trainer) -> fine-tune --------------

# max_seq_len 128: the pretraining joint encoder sees both roles (2 x 64 frames).
CHAIN_DIM = dict(dim=32, depth=1, heads=2, dim_head=16, max_seq_len=128, num_tokens=16,
                 decoder_depth=1, decoder_heads=2)


def _chain_common(config, data_dir, steps):
  config.data.dir = data_dir
  config.data.max_len = 64
  config.data.bucket_boundaries = (64,)
  config.train.batch_size = 4
  config.train.eval_batch_size = 4
  config.train.num_steps = steps
  config.train.eval_every_steps = max(steps, 1)
  config.train.checkpoint_every_steps = max(steps, 1)
  config.train.log_every_steps = 1
  config.train.schedule = "constant"
  config.train.warmup_steps = 0
  config.train.learning_rate = 1e-3
  return config


def vq_chain_config(role, data_dir):
  config = config_lib.shrink_to_tiny(config_lib.vq_config(role))
  config.model.hidden_size = TINY_VQ.hidden_size
  config.model.num_layers = TINY_VQ.num_layers
  config.model.num_heads = TINY_VQ.num_heads
  config.model.mlp_dim = TINY_VQ.mlp_dim
  config.model.codebook_size = TINY_VQ.codebook_size
  config.model.code_dim = TINY_VQ.code_dim
  return _chain_common(config, data_dir, 2)


def dim_chain_config(phase, data_dir, steps=2, ablation="none"):
  config = config_lib.dim_config(phase, ablation)
  official_loss, official_positions = config.loss.to_dict(), config.model.decoder_positions
  config = config_lib.shrink_dim_to_tiny(config)
  # These tests check the official losses, freezing and (SLMFT) decoder without positions.
  config.loss.update(official_loss)
  config.model.decoder_positions = official_positions
  for key, value in CHAIN_DIM.items():
    config.model[key] = value
  return _chain_common(config, data_dir, steps)


def write_vq_checkpoint(workdir, role, data_dir, seed):
  """A finished `vq` phase's workdir as the trainer leaves it (Orbax state with `params`,
  meta = the VQ task's model meta + run config), holding an untrained tiny tokenizer with
  random weights: training the VQ phase is tests/test_training.py's job, and skipping it
  here keeps this file fast."""
  config = vq_chain_config(role, data_dir)
  task = vq.VQTask.from_config(config, pipeline.normalization_for(config, data_dir))
  batch = {f"{role}_motion": jnp.zeros((1, 8, 56)), "mask": jnp.ones((1, 8), bool)}
  params = random_params(jax.eval_shape(task.init_params, jax.random.PRNGKey(0), batch), seed)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2)
  meta = dict(task.model_meta(), config=json.loads(config.to_json_best_effort()),
              batches_consumed=2)
  ckpt.save(2, dict(step=jnp.int32(2), params=params, rng=jax.random.PRNGKey(seed)),
            meta=meta, val_loss=1.0)
  ckpt.close()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  root = tmp_path_factory.mktemp("chain")
  data_dir = str(root / "data")
  synthetic.write_synthetic_dataset(data_dir, seed=0, num_train=16, num_val=8, num_test=8,
                                    min_len=20, max_len=40)
  dirs = {role: str(root / f"vq_{role}") for role in ("speaker", "listener")}
  for seed, (role, workdir) in enumerate(dirs.items()):
    write_vq_checkpoint(workdir, role, data_dir, seed + 1)
  # Pretraining through the whole trainer, with weight decay (frozen leaves must not decay).
  config = dim_chain_config("pretrain", data_dir, steps=PRETRAIN_STEPS)
  config.train.weight_decay = 0.1
  config.train.eval_at_start = True
  config.init.speaker_vq = dirs["speaker"]
  config.init.listener_vq = dirs["listener"]
  dirs["pretrain"] = str(root / "pretrain")
  report = phases.run(config, dirs["pretrain"])
  assert report["step"] == PRETRAIN_STEPS and report["val"]["loss"] > 0
  return dict(data_dir=data_dir, root=root, **dirs)


def _dummy_batch(frames=8):
  return dict(speaker_motion=jnp.zeros((2, frames, 56)), listener_motion=jnp.zeros((2, frames, 56)),
              speaker_audio=jnp.zeros((2, frames, records.AUDIO_DIM)),
              mask=jnp.ones((2, frames), bool))


@dataclasses.dataclass(frozen=True)
class ZeroInitTask(dim_tasks.DIMTask):
  """The same task with every fresh parameter zero (and no init program to compile)."""

  def init_params(self, rng, batch):
    abstract = jax.eval_shape(super().init_params, rng, batch)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)


def _abstract(task):
  return jax.eval_shape(lambda r: task.init_params(r, _dummy_batch()), jax.random.PRNGKey(0))


def test_pretrain_loss_falls_through_the_trainer(chain):
  logged = metric_writer.read_metrics(chain["pretrain"])
  train = [m for m in logged if "train/loss" in m]
  assert [m["step"] for m in train] == list(range(1, PRETRAIN_STEPS + 1))
  first = {k: np.mean([m[k] for m in train[:4]]) for k in train[0]}  # the first epoch
  last = {k: np.mean([m[k] for m in train[-4:]]) for k in train[0]}   # the last epoch
  # The continuous terms (random tokenizers' decodes on standardised motion) fall slower.
  assert last["train/loss"] < 0.8 * first["train/loss"], (first, last)
  assert last["train/nce"] < 0.7 * first["train/nce"], (first, last)
  # Only ~15 % of the frames are targets, so the token CE is noisy over 40 steps; over the last
  # 10 steps the decoders must at least beat uniform guessing over the 16 codes.
  ce = np.mean([m["train/ce_speaker"] + m["train/ce_listener"] for m in train[-10:]])
  assert ce < 2 * np.log(16), ce
  val = {m["step"]: m["val/loss"] for m in logged if "val/loss" in m}
  assert sorted(val) == [0, PRETRAIN_STEPS] and val[PRETRAIN_STEPS] < val[0]


def test_pretrain_checkpoint_grafts_vq_and_keeps_it_frozen(chain):
  params, meta = checkpointing.load_params(chain["pretrain"])
  assert meta["phase"] == "pretrain" and meta["step"] == PRETRAIN_STEPS
  pre = flat(params)
  for role in ("speaker", "listener"):
    vq = flat(checkpointing.load_params(chain[role])[0])
    for path, value in vq.items():
      got = pre[f"{role}_vq/{path}"]
      if path.startswith("decoder/"):
        continue  # trained in pretraining (official SLM)
      assert same_bits(got, value), f"{role}_vq/{path} is not the {role} VQ checkpoint's"
    changed = [p for p in vq if p.startswith("decoder/")
               and not np.array_equal(np.asarray(pre[f"{role}_vq/{p}"]), np.asarray(vq[p]))]
    assert changed, f"the {role} VQ decoder was not trained in pretraining"
  # The two tokenizers really differ (a speaker/listener swap would be caught above).
  assert not np.array_equal(np.asarray(pre["speaker_vq/quantizer/codebook"]),
                            np.asarray(pre["listener_vq/quantizer/codebook"]))


def test_finetune_restores_every_pretrained_leaf(chain, tmp_path, caplog):
  config = dim_chain_config("finetune_listener", chain["data_dir"], steps=0)
  config.init.pretrain = chain["pretrain"]
  task = dim_tasks.task_from_config(config)
  assert task.init_sources == (("", chain["pretrain"]),)
  abstract = _abstract(task)
  expected = flat(abstract)
  pre = flat(checkpointing.load_params(chain["pretrain"])[0])
  assert "dim/joint_decoder/pos_emb" in pre and "dim/joint_decoder/pos_emb" not in expected
  with caplog.at_level(logging.INFO):
    grafted = task.pretrained_params(abstract)
  assert set(grafted) == set(expected)
  for path, value in grafted.items():
    assert same_bits(value, pre[path]), path
  # The decoder positions (off in SLMFT) are reported as unused, not an error.
  assert any("not used" in r.getMessage() and "pos_emb" in r.getMessage() for r in caplog.records)

  # The trainer starts fine-tuning from exactly these values (step-0 params).  Fresh leaves
  # are zeros here, so any leaf the trainer failed to graft would stand out.
  zero_init = ZeroInitTask(**{f.name: getattr(task, f.name) for f in dataclasses.fields(task)})
  result = trainer.train_and_evaluate(config, str(tmp_path / "ft"), zero_init)
  assert result["step"] == 0
  start = flat(jax.device_get(result["state"]["params"]))
  assert start.keys() == expected.keys()
  for path, value in start.items():
    if path.startswith("dim/"):  # all trained in pretraining, so none is zero
      assert np.any(pre[path] != 0), path
    assert same_bits(value, pre[path]), path


def test_phase_chaining_errors_are_clear(chain, tmp_path):
  data_dir = chain["data_dir"]
  # A pretrain checkpoint of another size: every mismatched leaf with both shapes.
  config = dim_chain_config("finetune_listener", data_dir)
  config.model.dim = 48
  config.init.pretrain = chain["pretrain"]
  task = dim_tasks.task_from_config(config)
  with pytest.raises(checkpointing.CheckpointMismatchError) as error:
    task.pretrained_params(_abstract(task))
  message = str(error.value)
  assert chain["pretrain"] in message
  width = 48 + (config.model.audio_projection or 768)  # decoder: dim + audio (projected)
  saved = 32 + (config.model.audio_projection or 768)
  assert (f"shape differs: dim/joint_decoder/token_emb model (16, {width}) vs checkpoint "
          f"(16, {saved})") in message
  assert (f"dim/joint_decoder/attn_layers/layers_0/to_q/kernel model ({width}, 32) vs "
          f"checkpoint ({saved}, 32)") in message
  assert message.count("shape differs: dim/") >= 30
  # A workdir that does not exist: FileNotFoundError naming the directory.
  missing = str(tmp_path / "never_pretrained")
  config = dim_chain_config("finetune_listener", data_dir)
  config.init.pretrain = missing
  with pytest.raises(FileNotFoundError, match="never_pretrained"):
    dim_tasks.task_from_config(config)
  # init.pretrain naming a VQ workdir, init.speaker_vq naming a pretraining workdir.
  config.init.pretrain = chain["listener"]
  with pytest.raises(checkpointing.CheckpointMismatchError, match="not a DIM pretraining run"):
    dim_tasks.task_from_config(config)
  config = dim_chain_config("pretrain", data_dir)
  config.init.speaker_vq = chain["pretrain"]
  config.init.listener_vq = chain["listener"]
  with pytest.raises(checkpointing.CheckpointMismatchError, match="not a VQ-VAE"):
    dim_tasks.task_from_config(config)
  # The no-pretraining ablation naming a pretraining run is a contradiction.
  config = dim_chain_config("finetune_listener", data_dir, ablation="no_pretrain")
  config.init.pretrain = chain["pretrain"]
  with pytest.raises(ValueError, match="no_pretrain"):
    dim_tasks.task_from_config(config)
  config = dim_chain_config("pretrain", data_dir)
  config.init.speaker_vq = chain["speaker"]
  config.init.listener_vq = chain["listener"]
  # A vocabulary that is not the tokenizers' codebook.
  config.model.num_tokens = 32
  with pytest.raises(ValueError, match="num_tokens"):
    dim_tasks.task_from_config(config)


def test_no_pretrain_finetune_restores_only_the_tokenizers(chain):
  config = dim_chain_config("finetune_listener", chain["data_dir"], ablation="no_pretrain")
  config.init.speaker_vq = chain["speaker"]
  config.init.listener_vq = chain["listener"]
  task = dim_tasks.task_from_config(config)
  grafted = task.pretrained_params(_abstract(task))
  assert {p.split("/")[0] for p in grafted} == {"speaker_vq", "listener_vq"}
  for role in ("speaker", "listener"):
    vq = flat(checkpointing.load_params(chain[role])[0])
    assert {p for p in grafted if p.startswith(f"{role}_vq/")} == {f"{role}_vq/{p}" for p in vq}
    for path, value in vq.items():
      assert same_bits(grafted[f"{role}_vq/{path}"], value)


# --- 8. ablation switches -------------------------------------------------------------------

def _loss_keys(task, params_abstract, batch):
  _, metrics = jax.eval_shape(task.loss_fn, params_abstract, batch, jax.random.PRNGKey(0))
  return set(metrics)


def test_ablation_no_vq_regresses_motion_without_tokens(batches):
  config = config_lib.dim_config("pretrain", "no_vq")
  task = task_from_config(config)
  assert task.model.config.output == "continuous"
  abstract = jax.eval_shape(task.init_params, jax.random.PRNGKey(0), batches[0])
  dims = abstract["dim"]
  assert dims["motion_head"]["kernel"].shape == (TINY_DIM["dim"] + AUDIO, 56)
  # Mask token row (and the fixed start row) in the token table: decoder input only.
  assert dims["joint_decoder"]["token_emb"].shape[0] == TINY_DIM["num_tokens"] + 2
  keys = _loss_keys(task, abstract, batches[0])
  assert not any(k.startswith(("ce_", "token_accuracy")) for k in keys)
  assert {"continuous_pose_speaker", "continuous_expression_listener", "nce"} <= keys
  # Nothing goes through a VQ decoder, so none is trained.
  mask = flat(task.trainable_mask(abstract))
  assert not any(v for p, v in mask.items() if "_vq/" in p)
  full = make_task("pretrain")
  assert "motion_head" not in jax.eval_shape(full.init_params, jax.random.PRNGKey(0),
                                             batches[0])["dim"]


def test_ablation_single_stream_has_one_motion_encoder_and_no_nce(batches):
  task = make_task("pretrain", "single_stream")
  abstract = jax.eval_shape(task.init_params, jax.random.PRNGKey(0), batches[0])
  assert "listener_encoder" not in abstract["dim"] and "speaker_encoder" in abstract["dim"]
  full = jax.eval_shape(make_task("pretrain").init_params, jax.random.PRNGKey(0), batches[0])
  assert count(full["dim"]) - count(abstract["dim"]) == count(full["dim"]["listener_encoder"])
  keys = _loss_keys(task, abstract, batches[0])
  assert "nce" not in keys and "contrastive_accuracy" not in keys
  assert {"ce_speaker", "ce_listener"} <= keys


def test_ablation_no_contrastive_drops_exactly_the_nce_term(base_params, batches):
  full, ablated = make_task("pretrain"), make_task("pretrain", "no_contrastive")
  assert ablated.options.contrastive_weight == 0.0
  abstract = jax.eval_shape(ablated.init_params, jax.random.PRNGKey(0), batches[0])
  assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(lambda x: x.shape, base_params)
  rng = jax.random.PRNGKey(11)
  loss_full, m_full = full.loss_fn(base_params, batches[1], rng)
  loss_ablated, m_ablated = ablated.loss_fn(base_params, batches[1], rng)
  assert "nce" in m_full and "nce" not in m_ablated
  assert set(m_full) - set(m_ablated) == {"nce", "contrastive_accuracy"}
  for k in m_ablated:  # same masks, same predictions
    np.testing.assert_allclose(float(m_ablated[k]), float(m_full[k]), rtol=1e-6, err_msg=k)
  assert float(m_full["nce"]) > 0.1
  np.testing.assert_allclose(float(loss_full) - float(loss_ablated), float(m_full["nce"]),
                             rtol=1e-5)


def test_ablation_vq_decoder_switches(base_params):
  def vq_decoder_trainable(task, params):
    mask = flat(task.trainable_mask(params))
    return {role: all(v for p, v in mask.items() if p.startswith(f"{role}_vq/decoder/"))
            for role in ("speaker", "listener")}
  pre = params_for("pretrain", base_params)
  ft = params_for("finetune_listener", base_params)
  assert vq_decoder_trainable(make_task("pretrain"), pre) == dict(speaker=True, listener=True)
  assert vq_decoder_trainable(make_task("pretrain", "frozen_vq_decoder"), pre) == dict(
      speaker=False, listener=False)
  assert vq_decoder_trainable(make_task("finetune_listener"), ft) == dict(
      speaker=False, listener=False)
  assert vq_decoder_trainable(make_task("finetune_listener", "trainable_vq_decoder"), ft) == dict(
      speaker=False, listener=True)
  # Encoders and codebooks stay frozen whatever the switch.
  for task, params in ((make_task("pretrain"), pre),
                       (make_task("finetune_listener", "trainable_vq_decoder"), ft)):
    mask = flat(task.trainable_mask(params))
    assert not any(v for p, v in mask.items()
                   if "_vq/" in p and not p.split("/")[1] == "decoder")


@pytest.mark.parametrize("decode", ["argmax", "soft"])
def test_continuous_loss_decodes_tokens_as_generation_does(base_params, decode):
  """With cosine codes (`codebook_normalize`) the raw codebook parameter is not what the VQ
  decoder was trained on: the DIM loss must decode with the same code vectors as
  `decode_tokens` (generation), or pretraining fits the VQ decoder to the wrong inputs."""
  vq_config = dataclasses.replace(TINY_VQ, codebook_normalize=True)
  config = config_lib.dim_config("pretrain")
  config.loss.decode = decode
  task = task_from_config(config, vq_config)
  params = base_params
  tokens = np.array([[3, 3, 7, 0, 15, 9], [1, 2, 3, 4, 5, 6]])
  mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], bool)
  # Confident logits: soft decoding then equals the one-hot code too.
  logits = jnp.asarray(np.eye(16)[tokens] * 200.0)
  ours = task._decode_motion(params, "listener", logits, jnp.asarray(mask),
                             jax.random.PRNGKey(0), train=False)
  want = task.listener_vq.apply({"params": params["listener_vq"]}, jnp.asarray(tokens),
                                jnp.asarray(mask), method=vqvae.VQVAE.decode_tokens)
  np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)
  raw = np.asarray(params["listener_vq"]["quantizer"]["codebook"])
  assert not np.allclose(np.linalg.norm(raw, axis=-1), 1.0)  # the two really differ


def test_audio_projection_switch_sets_the_decoder_width(batches):
  for projection, width in ((0, TINY_DIM["dim"] + AUDIO), (8, TINY_DIM["dim"] + 8)):
    config = config_lib.dim_config("pretrain")
    config.model.audio_projection = projection
    task = task_from_config(config)
    abstract = jax.eval_shape(task.init_params, jax.random.PRNGKey(0), batches[0])["dim"]
    assert abstract["joint_decoder"]["token_emb"].shape == (16, width)
    if projection:
      assert abstract["audio_projector"]["kernel"].shape == (AUDIO, projection)
      assert abstract["audio_projector"]["bias"].shape == (projection,)
    else:
      assert "audio_projector" not in abstract
  assert config_lib.dim_config("pretrain").model.audio_projection == 0  # official: raw audio


def test_decoder_positions_let_queries_address_context_frames(base_params):
  """Why the tiny listener fine-tune keeps decoder positions: without them, a run of one code
  (the typical state of a slowly moving listener) gives the same logits at every frame, so
  the decoder cannot tell which speaker frame its frame reacts to; with them it can."""
  b, n = 2, 12
  rng = np.random.default_rng(21)
  tokens = jnp.full((b, n), 5, jnp.int32)
  context = jnp.asarray(rng.normal(size=(b, n, TINY_DIM["dim"] + AUDIO)).astype(np.float32))
  ones = jnp.ones((b, n), bool)

  def logits(decoder_positions):
    model = dim_lib.DIM(dim_lib.DIMConfig(**TINY_DIM, decoder_positions=decoder_positions))
    return np.asarray(model.apply({"params": base_params["dim"]}, tokens, context, ones, None,
                                  ones, method=dim_lib.DIM.decode))

  without, with_positions = logits(False), logits(True)
  np.testing.assert_allclose(without, np.broadcast_to(without[:, :1], without.shape), atol=1e-5)
  assert np.abs(with_positions - with_positions[:, :1]).max() > 1e-3
  tiny = config_lib.shrink_dim_to_tiny(config_lib.dim_config("finetune_listener"))
  assert tiny.model.decoder_positions
  assert not config_lib.dim_config("finetune_listener").model.decoder_positions  # official


def test_parallel_decoding_is_bidirectional_with_mask_token(base_params):
  b, n = 2, 10
  rng = np.random.default_rng(12)
  tokens = rng.integers(0, 16, size=(b, n)).astype(np.int32)
  context = jnp.asarray(rng.normal(size=(b, n, TINY_DIM["dim"] + AUDIO)).astype(np.float32))
  cmask = jnp.ones((b, n), bool)
  later = tokens.copy()
  later[:, 5:] = (later[:, 5:] + 3) % 16

  def decode(model, params, toks):
    return np.asarray(model.apply({"params": params}, jnp.asarray(toks), context, cmask, None,
                                  jnp.ones((b, n), bool), method=dim_lib.DIM.decode))

  # Official autoregressive decoder: position 0 cannot see later inputs.
  causal = dim_lib.DIM(dim_lib.DIMConfig(**TINY_DIM))
  a0, a1 = decode(causal, base_params["dim"], tokens), decode(causal, base_params["dim"], later)
  np.testing.assert_array_equal(a0[:, :5], a1[:, :5])
  assert base_params["dim"]["joint_decoder"]["token_emb"].shape[0] == 16

  cfg = dim_lib.DIMConfig(**TINY_DIM, decoding="parallel")
  assert cfg.mask_token == 17 and cfg.num_input_tokens == 18
  model = dim_lib.DIM(cfg)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 56)),
                          jnp.zeros((1, 4, 56)), jnp.zeros((1, 4, AUDIO)),
                          jnp.ones((1, 4), bool))["params"]
  assert shapes["joint_decoder"]["token_emb"].shape == (18, TINY_DIM["dim"] + AUDIO)
  assert shapes["joint_decoder"]["to_logits"]["kernel"].shape[1] == 16  # never predicts them
  # The same tree as the autoregressive model but for the two extra input rows.
  params = dict(base_params["dim"])
  emb = np.asarray(params["joint_decoder"]["token_emb"])
  params["joint_decoder"] = dict(params["joint_decoder"], token_emb=np.concatenate(
      [emb, np.random.default_rng(13).normal(size=(2, emb.shape[1])).astype(np.float32)]))
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda x: x.shape, shapes)
  p0, p1 = decode(model, params, tokens), decode(model, params, later)
  assert np.abs(p0[:, 0] - p1[:, 0]).max() > 1e-4, "parallel decoder is causal"

  # In the parallel task every hidden frame (also frame 0) is a target and its input is the
  # mask token: the hidden tokens themselves cannot leak into their own prediction.
  task = dim_tasks.DIMTask(name="pretrain", model=model, speaker_vq=vqvae.VQVAE(TINY_VQ),
                           listener_vq=vqvae.VQVAE(TINY_VQ), options=dim_tasks.LossOptions())
  full = dict(base_params, dim=params)
  mask = np.ones((b, n), bool)
  hidden = np.zeros((b, n), bool)
  hidden[:, [0, 3, 4, 8]] = True
  logits, frames, ce = _predict_ce(task, full, "speaker", tokens, hidden, context, mask)
  assert ce[1] == hidden.sum()
  np.testing.assert_array_equal(frames, hidden)
  np.testing.assert_allclose(ce[0], numpy_ce_sums(logits, np.where(hidden, tokens, -100))[0],
                             rtol=1e-5)
  leaked = np.where(hidden, (tokens + 1) % 16, tokens)
  assert _predict_ce(task, full, "speaker", leaked, hidden, context, mask)[0].tobytes() == \
      logits.tobytes()

  # start='start_token' adds one input row to the autoregressive decoder.
  start = dim_lib.DIMConfig(**TINY_DIM, start="start_token")
  assert start.num_input_tokens == 17 and start.start_token == 16
  shapes = jax.eval_shape(dim_lib.DIM(start).init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 56)),
                          jnp.zeros((1, 4, 56)), jnp.zeros((1, 4, AUDIO)), jnp.ones((1, 4), bool))
  assert shapes["params"]["joint_decoder"]["token_emb"].shape[0] == 17

  # Parallel decoding (and the continuous head) without decoder positions is refused.
  with pytest.raises(ValueError, match="decoder_positions"):
    dim_lib.DIMConfig(**TINY_DIM, decoding="parallel", decoder_positions=False)
  with pytest.raises(ValueError, match="decoder_positions"):
    dim_lib.DIMConfig(**TINY_DIM, output="continuous", decoder_positions=False)
  with pytest.raises(ValueError, match="decoding"):
    dim_lib.DIMConfig(decoding="sideways")


# --- 9. official parameter counts -----------------------------------------------------------

def _xt_layers(d, depth, cross_attend, heads=12, dim_head=64):
  """x-transformers AttentionLayers: pre-norm LayerNorm without bias, attention q/k/v/out
  without bias (inner width heads x 64), FF Linear(d,4d)+Linear(4d,d) with biases, final norm."""
  inner = heads * dim_head
  attention = d + 3 * d * inner + inner * d
  ff = d + (d * 4 * d + 4 * d) + (4 * d * d + d)
  return depth * ((2 if cross_attend else 1) * attention + ff) + d


def _official_counts():
  d, a, seq, vocab = 384, 768, 2048, 512
  # ContinuousTransformerWrapper(dim_in, dim_out=dim, max_seq_len=2048, Encoder(384, 4, 12)):
  # project_in (no bias), pos_emb 2048 x dim, layers, project_out (no bias).
  encoder = lambda dim_in: dim_in * d + seq * d + _xt_layers(d, 4, False) + d * d
  # TransformerWrapper(512, 2048, Decoder(1152, 4, 12, cross_attend)): token_emb, [pos_emb],
  # layers, to_logits (no bias).
  decoder_no_pos = vocab * (d + a) + _xt_layers(d + a, 4, True) + (d + a) * vocab
  decoder_pos = seq * (d + a)
  # patch_embed_s/l (56), patch_embed_dec_s/l (384), norm_s/norm_l/norm (nn.LayerNorm: w + b).
  extras = 2 * 56 + 2 * d + 3 * 2 * d
  slm_own = 2 * encoder(56) + encoder(d) + extras + decoder_no_pos + decoder_pos
  # VQAutoEncoder (as tests/test_vqvae.py): encoder, decoder, codebook.
  h, m, layers = 384, 1536, 6
  block = 2 * 2 * h + 3 * h * h + h * h + h + h * m + m + m * h + h
  conv = 5 * h * h + h
  vq_encoder = (56 * h + h) + conv + (h * h + h) + layers * block + (h * 128 + 128)
  vq_decoder = (128 * h + h) + conv + (h * h + h) + layers * block + h * 56
  vq = vq_encoder + vq_decoder + vocab * 128
  return dict(slm_own=slm_own, decoder_pos=decoder_pos, vq=vq, vq_decoder=vq_decoder)


def test_official_parameter_counts():
  c = _official_counts()
  # The hand counts reproduce the official totals (DESIGN.md: SLM 152.2 M with 128.9 M
  # trainable, SLMFT 149.9 M, one VQ-VAE 23.3 M).
  assert c["slm_own"] == 105_696_112 and c["vq"] == 23_258_496
  assert c["slm_own"] + 2 * c["vq"] == 152_213_104
  assert c["slm_own"] + 2 * c["vq"] - c["decoder_pos"] == 149_853_808
  assert c["slm_own"] + 2 * c["vq_decoder"] == 128_888_944

  batch = dict(speaker_motion=jax.ShapeDtypeStruct((1, 8, 56), jnp.float32),
               listener_motion=jax.ShapeDtypeStruct((1, 8, 56), jnp.float32),
               speaker_audio=jax.ShapeDtypeStruct((1, 8, 768), jnp.float32),
               mask=jax.ShapeDtypeStruct((1, 8), jnp.bool_))

  def official_task(phase):
    return dim_tasks.DIMTask.from_config(config_lib.dim_config(phase),
                                         speaker_vq=vqvae.VQConfig(), listener_vq=vqvae.VQConfig())

  pretrain = official_task("pretrain")
  shapes = jax.eval_shape(pretrain.init_params, jax.random.PRNGKey(0), batch)
  assert count(shapes["dim"]) == c["slm_own"]
  assert count(shapes["speaker_vq"]) == count(shapes["listener_vq"]) == c["vq"]
  assert count(shapes) == 152_213_104
  trainable = pretrain.trainable_mask(shapes)
  n_trainable = sum(int(np.prod(x.shape)) for x, t in zip(jax.tree.leaves(shapes),
                                                           jax.tree.leaves(trainable)) if t)
  assert n_trainable == 128_888_944

  finetune = official_task("finetune_listener")
  shapes = jax.eval_shape(finetune.init_params, jax.random.PRNGKey(0), batch)
  assert "pos_emb" not in shapes["dim"]["joint_decoder"]
  assert count(shapes) == 149_853_808


# --- 2b. InfoNCE gradient with filler rows (kept last: it fails on a reported bug) ---------

def test_info_nce_gradient_is_finite_with_filler_rows():
  """A filler example (evaluation batches carry them) pools to the zero vector; it must not
  turn the gradient into NaN (which would reach every parameter through the encoders).

  Fails while `info_nce` normalises with `v / maximum(jnp.linalg.norm(v), 1e-12)`: the value
  is clamped but the norm's derivative at v = 0 is 0/0 = NaN, and masked_mean's backward
  multiplies it by the zero frame weights (0 * NaN = NaN).  torch's F.normalize has the same
  forward; `v * rsqrt(maximum(sum(v * v), 1e-24))` has it too, with a finite gradient."""
  rng = np.random.default_rng(6)
  frames, width = 12, 8
  lengths = [12, 5, 0, 9, 3]
  mask = prefix_mask(lengths, frames)
  example_valid = mask.any(1)
  s_full = rng.normal(size=(5, frames, width)).astype(np.float32)
  l_full = rng.normal(size=(5, frames, width)).astype(np.float32)
  grad = jax.jit(jax.grad(lambda a, b: dim_tasks.info_nce(a, b, jnp.asarray(mask),
                                                          jnp.asarray(example_valid), 0.05,
                                                          True)[0],
                          argnums=(0, 1)))(jnp.asarray(s_full), jnp.asarray(l_full))
  for g in grad:
    g = np.asarray(g)
    assert np.all(np.isfinite(g))
    assert np.all(g[~mask] == 0)
    assert np.any(g[mask] != 0)


# --- phase `generate` -----------------------------------------------------------------------

def _generate_config(data_dir, model_dir, num_samples, temperature, max_len=16):
  config = config_lib.generate_config()
  config.data.dir = data_dir
  # 16-frame generation windows: the 20-40-frame test clips are generated as one continuous
  # sequence over 2-3 sliding windows.
  config.generate.window = max_len
  config.init.model = model_dir
  config.generate.num_samples = num_samples
  config.generate.batch_size = 4
  config.generate.sampling.temperature = temperature
  return config


@pytest.fixture(scope="module")
def finetuned(chain):
  """A (barely) fine-tuned DIM-Listener: what `generate` and `evaluate` restore."""
  config = dim_chain_config("finetune_listener", chain["data_dir"], steps=2)
  config.init.pretrain = chain["pretrain"]
  finetune_dir = str(chain["root"] / "generate_finetune")
  phases.run(config, finetune_dir)
  return finetune_dir


@pytest.fixture(scope="module")
def generated(chain, finetuned):
  out = str(chain["root"] / "generate_sampled")
  config = _generate_config(chain["data_dir"], finetuned, 2, 1.0)
  config.generate.formats = "npy,emoca,pickle"
  summary = phases.run(config, out)
  return out, summary


def test_generate_hands_off_emoca_folders_and_official_pickles(chain, generated):
  """The EMOCA folders and the official predictions pickles hold exactly the .npy samples."""
  out, summary = generated
  root = os.path.join(out, "generated")
  assert summary["formats"] == ["npy", "emoca", "pickle"]
  clips = {c["clip_id"]: c for c in records.read_clips(chain["data_dir"], "test")}
  for k in range(2):
    predictions = handoff.read_predictions(
        os.path.join(root, f"listener_predictions_sample_{k}.pkl"))
    # postprocess2emoca.py names each clip's folder data_id.split('/')[-1].split('.')[0].
    ids = [d.split("/")[-1].split(".")[0] for d in predictions["data_ids"]]
    assert sorted(ids) == sorted(clips)
    for clip_id, pred, truth in zip(ids, predictions["y_pred"], predictions["y_true"]):
      npy = np.load(os.path.join(root, f"sample_{k}", f"{clip_id}.npy"))
      np.testing.assert_array_equal(pred, npy)
      np.testing.assert_array_equal(truth, clips[clip_id]["listener_motion"])
      frames = handoff.read_emoca_frames(os.path.join(root, "emoca", f"sample_{k}", clip_id))
      np.testing.assert_array_equal(frames, npy)  # emoca_smoothing 0: unsmoothed
      pose = np.load(os.path.join(root, "emoca", f"sample_{k}", clip_id, "0", "pose.npy"))
      np.testing.assert_array_equal(pose, npy[0, :6])
  render = open(os.path.join(root, "render.md")).read()
  assert "inference_newmodel.py" in render and "postprocess2emoca.py" in render


def test_generate_phase_writes_one_file_per_clip_and_sample(chain, finetuned, generated):
  finetune_dir = finetuned
  clips = {c["clip_id"]: c for c in records.read_clips(chain["data_dir"], "test")}
  assert max(c["length"] for c in clips.values()) > 16  # windows really are reassembled

  out, summary = generated
  assert summary["clips"] == len(clips) and summary["role"] == "listener"
  settings = json.load(open(os.path.join(out, "generated", "sampling.json")))
  assert settings["num_samples"] == 2 and settings["sampling"]["top_k_fraction"] == 0.1
  assert settings["start"] == "ground_truth"
  differs = 0
  for clip_id, clip in clips.items():
    samples = [np.load(os.path.join(out, "generated", f"sample_{k}", f"{clip_id}.npy"))
               for k in range(2)]
    for sample in samples:
      assert sample.shape == (clip["length"], 56) and sample.dtype == np.float32
      assert np.all(np.isfinite(sample)) and np.abs(sample).sum() > 0
    differs += not np.array_equal(samples[0], samples[1])
  assert differs > 0  # independent samples of the same clip
  # The summary's errors are those of the written files against the ground truth.
  diff = np.concatenate([np.load(os.path.join(out, "generated", f"sample_{k}", f"{c}.npy"))
                         - clips[c]["listener_motion"] for c in clips for k in range(2)])
  np.testing.assert_allclose(summary["expression_l1"], np.abs(diff[:, 6:]).mean(), rtol=1e-4)
  np.testing.assert_allclose(summary["pose_mse"], np.square(diff[:, :6]).mean(), rtol=1e-4)

  # The same seed reproduces the samples exactly (one compiled program per bucket).
  again = str(chain["root"] / "generate_again")
  phases.run(_generate_config(chain["data_dir"], finetune_dir, 2, 1.0), again)
  for clip_id in clips:
    for k in range(2):
      np.testing.assert_array_equal(
          np.load(os.path.join(out, "generated", f"sample_{k}", f"{clip_id}.npy")),
          np.load(os.path.join(again, "generated", f"sample_{k}", f"{clip_id}.npy")))


def _tone_sequence_wav(path, seconds, rate=22050):
  """A 'recording': alternating tones and pauses, stereo int16 at 22.05 kHz (resampled)."""
  t = np.arange(int(seconds * rate)) / rate
  pitch = np.where((t // 0.25) % 2 == 0, 220.0, 330.0)
  voiced = (t % 1.0) < 0.7  # 0.3-s pauses
  left = 0.4 * np.sin(2 * np.pi * pitch * t) * voiced
  stereo = np.stack([left, 0.5 * left], axis=1)
  from scipy.io import wavfile  # pylint: disable=g-import-not-at-top
  wavfile.write(path, rate, (stereo * 32767).astype(np.int16))


def test_generate_from_a_recording_uses_the_extract_audio_features(chain, finetuned, tmp_path):
  """Phase `generate` from <clip>.wav + <clip>.speaker.npy: HuBERT features made in the run
  (the extractor `tools/extract_audio.py` uses, mapped to the motion rate as convert_official
  does), no listener ground truth at all."""
  import sys  # pylint: disable=g-import-not-at-top
  from dim_jax.data import audio  # pylint: disable=g-import-not-at-top
  from dim_jax.models import hubert  # pylint: disable=g-import-not-at-top
  # A tiny random HuBERT with the 768-wide output the model's audio input has.
  config = hubert.HubertConfig(num_hidden_layers=1, num_attention_heads=12,
                               intermediate_size=64, conv_dim=(16,) * 7,
                               num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=16)
  hubert_dir = str(tmp_path / "hubert")
  hubert.save_pretrained(hubert_dir, config, hubert.init_params(config, jax.random.PRNGKey(0)))
  clip = max(records.read_clips(chain["data_dir"], "test"), key=lambda c: c["length"])
  frames = int(clip["length"])
  recordings = tmp_path / "recordings"
  recordings.mkdir()
  _tone_sequence_wav(str(recordings / "talk.wav"), frames / clip["fps"])
  np.save(recordings / "talk.speaker.npy", clip["speaker_motion"])

  gen_config = _generate_config(chain["data_dir"], finetuned, 2, 1.0)
  gen_config.generate.recordings = str(recordings)
  gen_config.generate.hubert_dir = hubert_dir
  gen_config.generate.start = "none"
  out = str(tmp_path / "generate")
  summary = phases.run(gen_config, out)
  assert summary["clips"] == 1 and summary["recordings"] == str(recordings)
  assert summary["expression_mse"] is None  # no ground truth to compare with
  written = [np.load(os.path.join(out, "generated", f"sample_{k}", "talk.npy")) for k in range(2)]
  assert written[0].shape == (frames, 56) and np.all(np.isfinite(written[0]))
  assert handoff.read_predictions(os.path.join(
      out, "generated", "listener_predictions_sample_0.pkl"))["y_true"] == [None]

  # The audio the model saw is what tools/extract_audio.py writes, mapped to 30 fps.
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
  import extract_audio  # pylint: disable=g-import-not-at-top,import-error
  assert extract_audio.main(["--model_dir", hubert_dir, "--out", str(tmp_path / "features"),
                             str(recordings / "talk.wav")]) == 0
  extracted = np.load(tmp_path / "features" / "hubert" / "talk.npy")
  extractor = audio.AudioFeatureExtractor.from_pretrained(hubert_dir)
  clips = generate.clips_from_recordings(
      [dict(clip_id="talk", wav=str(recordings / "talk.wav"), speaker_motion=clip["speaker_motion"])],
      extractor, fps=clip["fps"])
  np.testing.assert_array_equal(clips[0]["speaker_audio"],
                                audio.to_motion_frame_rate(extracted, clip["fps"], frames))
  assert np.abs(clips[0]["speaker_audio"]).sum() > 0
  # ... and the Python API gives the phase's samples exactly.
  gen = generate.Generator.from_workdir(finetuned, sampler.SamplingConfig(temperature=1.0),
                                        window=16)
  samples = generate.generate_clips(gen, clips, 2, jax.random.PRNGKey(0), batch_size=4,
                                    start="none")["talk"]
  for k in range(2):
    np.testing.assert_array_equal(samples[k], written[k])


def test_evaluate_scores_the_models_own_samples(chain, finetuned, generated):
  """Phase `evaluate` on a model: its rows are the metrics of the samples `generate` writes
  (with evaluate.residual_noise: the headline those of generate.residual_noise, the decoder
  output row those without)."""
  out, _ = generated
  gen_config = _generate_config(chain["data_dir"], str(chain["root"] / "unused"), 2, 1.0)
  config = config_lib.evaluate_config()
  config.data.dir = chain["data_dir"]
  config.evaluate.window = gen_config.generate.window
  config.init.model = str(chain["root"] / "generate_finetune")
  config.evaluate.num_seeds = 2
  config.evaluate.best_of = 2
  config.evaluate.batch_size = gen_config.generate.batch_size
  config.evaluate.seed = gen_config.generate.seed
  config.evaluate.sampling.temperature = gen_config.generate.sampling.temperature
  config.evaluate.plot_clips = 1
  config.evaluate.residual_noise = True
  results = phases.run(config, str(chain["root"] / "evaluate"))
  # The same samples with the tokenizer's residual noise, as `generate` writes them.
  noisy_out = str(chain["root"] / "generate_residual")
  noisy_config = _generate_config(chain["data_dir"], finetuned, 2, 1.0)
  noisy_config.generate.residual_noise = True
  noisy_summary = phases.run(noisy_config, noisy_out)
  np.testing.assert_allclose(results["settings"]["residual_std"], noisy_summary["residual_std"],
                             rtol=1e-6)

  # Same checkpoint, seed, batches and sampling settings as the generate runs: same samples.
  clips = records.read_clips(chain["data_dir"], "test")
  truth, lengths = evaluate_lib.pad_clips([c["listener_motion"] for c in clips])
  speaker, _ = evaluate_lib.pad_clips([c["speaker_motion"] for c in clips])
  ids = [c["clip_id"] for c in clips]
  clusters = metrics_lib.fit_clusters(truth, lengths, clip_ids=ids)
  rows = {m["name"]: m for m in results["methods"]}
  assert rows["DIM-Listener"]["runs"] == 2
  assert "residual noise" in rows["DIM-Listener"]["note"]
  for row, directory in (("DIM-Listener", noisy_out),
                         ("DIM-Listener (decoder output, no residual noise)", out)):
    files = np.stack([evaluate_lib.pad_clips(
        [np.load(os.path.join(directory, "generated", f"sample_{k}", f"{c['clip_id']}.npy"))
         for c in clips])[0] for k in range(2)])
    for protocol in ("dim_compat", "per_sequence"):
      want = [metrics_lib.listener_metrics(truth, files[k], speaker, lengths,
                                           protocol=protocol, clusters=clusters, clip_ids=ids)
              for k in range(2)]
      got = rows[row]["metrics"][protocol]
      for key in ("fd_expression", "mse_pose", "sid_expression", "rpcc_pose"):
        np.testing.assert_allclose(got[key]["values"], [w[key] for w in want], rtol=1e-5)
      if row == "DIM-Listener":
        oracle = metrics_lib.listener_metrics(
            truth, evaluate_lib.best_of_samples(files, truth, lengths), speaker, lengths,
            protocol=protocol, clusters=clusters, clip_ids=ids)
        got = rows["DIM-Listener best-of-2 (oracle, diagnostic)"]["metrics"][protocol]
        np.testing.assert_allclose(got["mse_expression"]["mean"], oracle["mse_expression"],
                                   rtol=1e-5)
  assert {"Random", "Mirror", "NN-motion", "NN-audio"} <= set(rows)
  assert os.path.exists(os.path.join(chain["root"], "evaluate", "report.md"))


def test_generate_refuses_models_that_cannot_generate(chain, tmp_path):
  config = _generate_config(chain["data_dir"], chain["pretrain"], 1, 1.0)
  with pytest.raises(checkpointing.CheckpointMismatchError, match="fine-tuned"):
    phases.run(config, str(tmp_path / "out"))
  config.init.model = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    phases.run(config, str(tmp_path / "out"))
  config.init.model = chain["pretrain"]
  config.generate.sampling.top_p = 1.5
  with pytest.raises(ValueError, match="top_p"):
    phases.run(config, str(tmp_path / "out"))
