"""Shared config pieces: the official VQ-VAE settings and `get_config(arg)` parsing.

Config files under `configs/` return an `ml_collections.ConfigDict` from `get_config(arg)`;
`arg` is the text after the colon in `--config configs/vq.py:role=speaker,size=tiny`.
Unknown keys raise (the ConfigDict is locked by `config_flags`).
"""

from __future__ import annotations

import difflib

import ml_collections

from dim_jax import errors


def parse_arg(arg: str | None, **defaults):
  """Parses 'a=1,b=x' into a ConfigDict over `defaults`, casting to each default's type."""
  parsed = ml_collections.ConfigDict(defaults)
  if not arg:
    return parsed
  for item in arg.split(","):
    if not item:
      continue
    key, _, value = item.partition("=")
    if key not in defaults:
      raise errors.ConfigError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      parsed[key] = value.lower() in ("1", "true", "yes", "")
    else:
      parsed[key] = kind(value)
  return parsed


TRAINING_PHASES = ("vq", "pretrain", "finetune_listener", "finetune_speaker")


def validate(config) -> None:
  """Refuses configs no run can use, before anything is written (`ConfigError`, one line)."""
  def fail(message):
    raise errors.ConfigError(f"config: {message}")
  phase = config.get("phase")
  if phase in TRAINING_PHASES:
    train = config.train
    for field in ("num_steps", "batch_size", "eval_batch_size", "eval_every_steps",
                  "checkpoint_every_steps", "log_every_steps", "keep_checkpoints"):
      value = train.get(field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        fail(f"train.{field}={value!r}; expected an integer >= 1")
    if train.learning_rate <= 0:
      fail(f"train.learning_rate={train.learning_rate!r}; expected > 0")
    if train.data_state not in ("iterator", "replay"):
      fail(f"train.data_state={train.data_state!r}; expected 'iterator' or 'replay'")
  if phase in DIM_PHASES:
    ablation = config.get("ablation", "none")
    if ablation not in ABLATIONS:
      fail(f"ablation={ablation!r}; expected one of {ABLATIONS}")
    if ablation == "no_pretrain" and (phase == "pretrain" or config.init.pretrain):
      fail(f"ablation=no_pretrain is a fine-tune phase without DIM pretraining (got "
           f"phase={phase!r}, init.pretrain={config.init.pretrain!r}); use "
           "phase=finetune_listener or finetune_speaker with init.pretrain=''")
    if int(config.model.get("num_identities", 0)) not in (0, 1):
      # Records carry speaker ids, but no id -> row table reaches the model: every clip would
      # read row 0, so more rows would only pretend to model identities.
      fail(f"model.num_identities={config.model.num_identities}; expected 0 (zero listener "
           "context, official) or 1 (one learned listener-context row): speaker ids are not "
           "wired to the model")
  if "data" in config:
    if int(config.data.max_len) < 2:
      fail(f"data.max_len={config.data.max_len}; expected >= 2")
    boundaries = list(config.data.bucket_boundaries)
    if not boundaries or sorted(set(boundaries)) != boundaries or boundaries[0] < 1:
      fail(f"data.bucket_boundaries={tuple(boundaries)}; expected increasing lengths >= 1")


def unknown_field_message(config, dotted: str) -> str:
  """'train.foo' is not a field: the message names the closest existing fields."""
  parts = dotted.split(".")
  node, prefix = config, []
  for part in parts:
    keys = sorted(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      where = ".".join(prefix) or "the config"
      close = difflib.get_close_matches(part, keys, n=3)
      hint = f"; did you mean {', '.join('.'.join(prefix + [c]) for c in close)}?" if close else (
          f"; fields of {where}: {', '.join(keys)}" if keys else "")
      return f"config: unknown field {dotted!r} ({part!r} is not in {where}){hint}"
    node, prefix = node[part], prefix + [part]
  return f"config: cannot set {dotted!r}"


def data_config() -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  data.dir = ""                    # dim_jax TFRecords (docs/records.md); required.
  # 'records' (data.dir holds our TFRecords) or 'tfds' (data.dir is a prepared dim_clips
  # tfds dataset, <data_dir>/dim_clips/<config>/<version>: docs/tfds.md).
  data.source = "records"
  data.synthetic = False           # write the embedded synthetic dataset into data.dir if absent.
  data.synthetic_seed = 0          # seed of the synthetic dataset.
  data.synthetic_num_train = 256   # synthetic clips per split.
  data.synthetic_num_val = 32
  data.synthetic_num_test = 32
  data.max_len = 256               # longer clips are split into consecutive windows (not dropped).
  data.bucket_boundaries = (64, 128, 256)  # padded lengths: one compiled shape each.
  data.shuffle_buffer = 1024       # training shuffle buffer (windows).
  # Ours: standardise the features with the training split's statistics (dataset_info.json):
  # 'part' = mean per dim, one std per part (pose, expression, audio); 'dimension' = a std
  # per dim; outputs are mapped back to raw units. 'none' = raw features, as the official
  # code (needed to run official checkpoints).
  data.normalize = "part"
  return data


def vq_model_config() -> ml_collections.ConfigDict:
  """Official VQ-VAE sizes (code/config.yaml NETWORK + VQuantizer)."""
  model = ml_collections.ConfigDict()
  model.name = "vqvae"
  model.in_dim = 56                # pose (6) then expression (50).
  model.hidden_size = 384
  model.num_layers = 6
  model.num_heads = 8
  model.mlp_dim = 1536
  model.codebook_size = 512
  model.code_dim = 128
  model.beta = 0.25                # commitment weight.
  model.codebook_normalize = False  # ours: cosine-distance codes (True in the tiny config).
  model.code_groups = 1            # ours: >1 = product quantizer (codebook_size = K**groups).
  model.part_encoders = False      # ours: with code_groups=2, pose and expression encoders of their own.
  model.pose_codes = 0             # ours, with part_encoders: pose codes (0 = sqrt(codebook_size)).
  model.conv_norm = "instance"     # after each conv: 'instance' (official), 'frame' (ours), 'none'.
  model.zero_init_output = False   # ours: decoder output layer starts at 0 (True when tiny).
  model.leaky_slope = 0.2
  model.dropout_rate = 0.1         # after the positional encoding, as officially.
  # 'time' (ours); 'official_batch_index' (the official table indexed by batch position, as
  # in official VQ training); 'official_first_row' (its row 0 for every sample: how official
  # code tokenizes for DIM, one sample at a time; imported checkpoints use it); or 'none'.
  model.positional_encoding = "time"
  model.max_len = 5000
  model.compute_dtype = "float32"  # or 'bfloat16': bf16 matmul inputs, f32 accumulation.
  return model


def train_config() -> ml_collections.ConfigDict:
  train = ml_collections.ConfigDict()
  train.batch_size = 32            # global batch (clips), divisible by devices and processes.
  train.eval_batch_size = 32
  train.num_steps = 20000
  train.learning_rate = 1e-4       # official AdamW lr.
  train.weight_decay = 0.01        # torch AdamW default (the official code passes none).
  train.b1 = 0.9
  train.b2 = 0.999
  train.eps = 1e-8
  train.schedule = "constant"      # official: constant; or 'cosine'.
  train.warmup_steps = 0
  train.grad_clip_norm = 0.0       # 0 = off (official: off).
  train.quant_loss_weight = 1.0
  train.log_every_steps = 50
  train.eval_every_steps = 1000    # validation split; also where 'best' is decided.
  train.eval_at_start = False      # also evaluate the initial params (logged as step 0).
  train.checkpoint_every_steps = 1000
  train.keep_checkpoints = 3       # latest N kept, plus the best by validation loss.
  # How a resume finds its place in the data (both exact, the pipeline is deterministic):
  # 'iterator' saves each host's tf.data iterator in the checkpoint (instant resume, but the
  # state holds the shuffle buffer: tens of MB or more); 'replay' stores only the number of
  # batches consumed and replays the pipeline to there on resume (tiny checkpoints).
  train.data_state = "iterator"
  # Parameters that never train (regexes over '/'-joined names, matched in full against a
  # leaf or a module above it, e.g. 'dim/listener_encoder'): no optimizer state, bit-identical.
  # DIM phases default to the official sets (FROZEN_PARAMS below).
  train.frozen_params = ()
  # A resume whose newest checkpoint is corrupt (unreadable, or its arrays differ from the
  # checksums saved with it) stops with an error; True moves it to checkpoints_corrupt/ and
  # resumes from the newest step that reads and verifies.
  train.checkpoint_fallback = False
  return train


def mesh_config() -> ml_collections.ConfigDict:
  mesh = ml_collections.ConfigDict()
  mesh.data = -1                   # -1: all remaining devices.
  mesh.fsdp = 1                    # parameter-sharding axis size.
  return mesh


def vq_config(role: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.phase = "vq"
  config.role = role               # 'speaker' or 'listener': whose motion is tokenized.
  config.seed = 0                  # init, dropout and data order.
  config.data = data_config()
  config.model = vq_model_config()
  config.train = train_config()
  config.train.restart_dead_codes = False  # ours: re-seed unused codes (True in the tiny config).
  # 'uniform' (official: L1 over all dims) or 'part_balanced' (ours: pose and expression
  # weigh half each, dims by raw std; dim_jax/training/vq.py).
  config.train.reconstruction_weighting = "uniform"
  config.train.pose_weight = 0.5   # the pose part's share under 'part_balanced'.
  config.train.reconstruction_loss = "l1"  # official L1, or 'mse'.
  config.mesh = mesh_config()
  return config


def shrink_to_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """CPU-sized VQ-VAE for the demo and tests (same architecture, smaller widths)."""
  config.model.hidden_size = 64
  config.model.num_layers = 2
  config.model.num_heads = 4
  config.model.mlp_dim = 128
  # 512 codes (the official size): with 128 the head and the expression compete for too few
  # codes per frame (demo validation unexplained pose/expression 0.34/0.36 vs 0.36/0.31).
  config.model.codebook_size = 512
  config.model.code_dim = 32
  config.model.dropout_rate = 0.0
  # A few hundred steps on small data: without these the official quantizer keeps ~20 of its
  # codes and the decoder barely leaves the mean (README "Tokenizers on small data").
  config.model.codebook_normalize = True
  config.model.zero_init_output = True
  # Instance norm removes each window's slow offsets (the synthetic smile, head drift): the
  # per-frame norm keeps them (validation expression unexplained 0.33 -> 0.24).
  config.model.conv_norm = "frame"
  config.train.restart_dead_codes = True
  # Keep the head (README "Tokenizers on small data"): official raw L1 spends the codes on
  # the expression and drops the pose (demo: pose unexplained 1.01). Part-balanced MSE weighs
  # each part by its raw-unit unexplained variance; pose gets 30 % of the loss.
  config.train.reconstruction_weighting = "part_balanced"
  config.train.reconstruction_loss = "mse"
  config.train.pose_weight = 0.3
  tiny_data(config.data)
  # The speaker's tokenizer (six independent expression signals, the fast syllable jaw) needs
  # 800 steps for the listener's bounds (validation pose / expression unexplained 0.40 / 0.25;
  # 0.37 / 0.34 at 400).
  steps = 800 if config.role == "speaker" else 400
  return tiny_training(config, num_steps=steps, learning_rate=2e-3, eval_every_steps=steps // 2)


def tiny_data(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The embedded synthetic data in windows of up to 128 frames (demo, tests, tiny configs)."""
  data.synthetic = True
  data.max_len = 128
  data.bucket_boundaries = (64, 128)
  return data


def tiny_training(config, *, num_steps: int, learning_rate: float, eval_every_steps: int):
  """CPU-sized training schedule shared by the tiny configs."""
  train = config.train
  train.batch_size = 16
  train.eval_batch_size = 16
  train.data_state = "replay"  # a few hundred batches replay instantly.
  train.keep_checkpoints = 2
  train.num_steps = num_steps
  train.learning_rate = learning_rate
  train.weight_decay = 0.0
  train.schedule = "cosine"
  train.warmup_steps = 20
  train.log_every_steps = 20
  train.eval_every_steps = eval_every_steps
  train.checkpoint_every_steps = eval_every_steps
  return config


# --- DIM phases ---------------------------------------------------------------------------

DIM_PHASES = ("pretrain", "finetune_listener", "finetune_speaker")
# Paper Table 3 rows as config edits (`ablation=` argument of configs/dim.py).
ABLATIONS = ("none", "no_vq", "no_pretrain", "frozen_vq_decoder", "trainable_vq_decoder",
             "no_contrastive", "single_stream")


# What each DIM phase freezes by default: the model parts its official class gives no
# gradient (they would only drift under weight decay). The tokenizers' encoders and
# codebooks are always frozen, their decoders per `loss.vq_decoder_trainable`.
FROZEN_PARAMS = {
    "pretrain": (),
    # SLMFT trains the speaker branch, the joint encoder and the decoder.
    "finetune_listener": ("dim/listener_(encoder|norm|role_embedding|context_embedding)",
                          "dim/joint_norm", "dim/identity_embedding"),
    # SpeakerSLMFT trains the joint decoder, the listener context and the audio projection.
    "finetune_speaker": ("dim/(speaker|listener)_(encoder|norm|role_embedding)",
                         "dim/joint_(encoder|norm)", "dim/speaker_context_embedding"),
}


def dim_model_config(phase: str) -> ml_collections.ConfigDict:
  """Official DIM sizes (seq2seq_pretrain.py SLM / SLMFT / SpeakerSLMFT)."""
  model = ml_collections.ConfigDict()
  model.motion_dim = 56
  model.audio_dim = 768            # HuBERT features per frame.
  model.dim = 384                  # role and joint encoders.
  model.depth = 4
  model.heads = 12                 # of width dim_head: attention inner width 768.
  model.dim_head = 64
  model.max_seq_len = 2048
  model.num_tokens = 512           # must equal both VQ codebook sizes.
  model.decoder_depth = 4          # joint decoder, width dim + audio_dim (1152).
  model.decoder_heads = 12
  # Learned decoder positions: official on in SLM and SpeakerSLMFT, off in SLMFT.
  model.decoder_positions = phase != "finetune_listener"
  model.decoding = "autoregressive"  # official; 'parallel' = the paper's masked decoding.
  model.causal_context = False     # official; True = decoder cross-attention sees frames <= t only.
  model.context_lag = 0            # ours, with causal_context: frames <= t - lag (a pipelined stream).
  model.token_factors = ()         # official; (P, E) = factorised head over (pose code, expression code).
  model.start = "ground_truth"     # official first input; 'start_token' needs no ground truth.
  model.output = "tokens"          # 'continuous' = Table 3 "no VQ" regression head.
  model.two_branch = True          # False = Table 3 "no speaker-listener two-branch".
  model.num_identities = 0         # DIM-Speaker listener context: 0 = zeros (official), 1 = one learned row (ids are not wired, so no more rows).
  model.audio_projection = 0       # 0 = raw audio in the decoder context (official); n = Linear to n.
  model.compute_dtype = "float32"  # or 'bfloat16' (matmul inputs; f32 params and accumulation).
  return model


def dim_loss_config(phase: str) -> ml_collections.ConfigDict:
  loss = ml_collections.ConfigDict()
  loss.mask_ratio = 0.15           # pretrain: fraction of each role's valid frames masked.
  loss.contrastive_weight = 1.0 if phase == "pretrain" else 0.0  # InfoNCE (pretrain only).
  loss.contrastive_temperature = 0.05
  loss.contrastive_bidirectional = False  # official: one direction.
  loss.continuous_weight = 1.0     # pairwise-distance loss on VQ-decoded predictions.
  # 'argmax' (official: the continuous loss reaches only the VQ decoders) or 'soft' (decode
  # the softmax-weighted codebook so it also trains the transformer).
  loss.decode = "argmax"
  # AutoregressiveWrapper(mask_prob): official 0.15 in SLMFT, 0 elsewhere.
  loss.decoder_key_mask_prob = 0.15 if phase == "finetune_listener" else 0.0
  # VQ decoder(s) of the predicted role(s) trainable: official True in SLM and SpeakerSLMFT,
  # False in SLMFT (the paper's full model unfreezes it: Table 3 "Dec_VQ").
  loss.vq_decoder_trainable = phase != "finetune_listener"
  loss.causal_encoders = True      # SLMFT encoders are causal (official).
  # model.decoding=parallel, fine-tuning: 'all' = every valid frame masked (one-pass decoding);
  # 'cosine' / 'linear' = MaskGIT's random fraction, for generate.iterations > 1.
  loss.parallel_mask_schedule = "all"
  return loss


def dim_config(phase: str, ablation: str = "none") -> ml_collections.ConfigDict:
  """Config of a DIM phase at official sizes; `ablation` applies one Table 3 row."""
  if phase not in DIM_PHASES:
    raise errors.ConfigError(f"phase={phase!r}; expected one of {DIM_PHASES}")
  if ablation not in ABLATIONS:
    raise errors.ConfigError(f"ablation={ablation!r}; expected one of {ABLATIONS}")
  if ablation == "no_pretrain" and phase == "pretrain":
    raise errors.ConfigError("ablation=no_pretrain is a fine-tune without DIM pretraining; "
                             "use phase=finetune_listener or finetune_speaker")
  config = ml_collections.ConfigDict()
  config.phase = phase
  config.seed = 0
  config.data = data_config()
  config.model = dim_model_config(phase)
  config.loss = dim_loss_config(phase)
  config.train = train_config()
  config.train.batch_size = 8
  config.train.eval_batch_size = 8
  config.train.learning_rate = 1e-5 if phase != "pretrain" else 1e-4
  config.train.grad_clip_norm = 1.0  # official clip_grad_norm_(1.0) in the DIM loops.
  config.train.frozen_params = FROZEN_PARAMS[phase]
  config.mesh = mesh_config()
  config.init = ml_collections.ConfigDict()
  # Workdirs of earlier phases (their best checkpoint by validation loss is used).
  config.init.speaker_vq = ""      # pretrain (and fine-tune without pretraining).
  config.init.listener_vq = ""
  config.init.pretrain = ""        # fine-tune phases; '' = no DIM pretraining (Table 3).
  config.ablation = ablation
  if ablation == "no_vq":
    config.model.output = "continuous"
    config.model.decoder_positions = True
  elif ablation == "frozen_vq_decoder":
    config.loss.vq_decoder_trainable = False
  elif ablation == "trainable_vq_decoder":
    config.loss.vq_decoder_trainable = True
  elif ablation == "no_contrastive":
    config.loss.contrastive_weight = 0.0
  elif ablation == "single_stream":
    config.model.two_branch = False
    config.loss.contrastive_weight = 0.0  # Table 3: that row also drops L_c.
  # 'no_pretrain' is a fine-tune with init.pretrain = '' (set by the caller).
  return config


def shrink_dim_to_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """CPU-sized DIM for the demo and tests (same architecture, smaller widths)."""
  config.model.dim = 64
  config.model.depth = 2
  config.model.heads = 4
  config.model.dim_head = 16
  config.model.max_seq_len = 256
  config.model.num_tokens = 512    # = the tiny VQ codebook.
  config.model.decoder_depth = 2
  config.model.decoder_heads = 4
  config.model.audio_projection = 64  # else the 768-wide audio makes the decoder 832 wide.
  # A few hundred pretraining steps leave the token predictions near uniform; the official
  # trainable VQ decoders would then learn to map those argmax tokens to the mean motion and
  # forget the tokenizer (demo: expression unexplained 0.35 -> 1.03). Table 3's "Dec_VQ" off.
  config.loss.vq_decoder_trainable = False
  if config.phase != "pretrain":
    # The paper's continuous loss through the softmax-weighted codes (the official argmax
    # cannot reach the transformer): with a few hundred steps on 256 clips, cross-entropy
    # alone learns to copy the previous token and ignores the speaker (val CE with shuffled
    # speakers +0.02); with this the speaker matters (+0.19) and MSE/FD improve.
    config.loss.decode = "soft"
    config.loss.continuous_weight = 10.0
  # Ours (official SLMFT drops them): without positions the decoder's queries cannot address
  # the speaker frame t - lag, so cross-entropy learns to copy the previous code and sampled
  # rollouts ignore the speaker (demo: teacher-forced accuracy 0.627 vs copying 0.617,
  # expression FD 0.31 -> 0.27, MSE 0.025 -> 0.015 with them). Pretraining already has them.
  config.model.decoder_positions = True
  tiny_data(config.data)
  return tiny_training(config, num_steps=300, learning_rate=1e-3, eval_every_steps=100)


def _from_finetuned_config(phase: str) -> ml_collections.ConfigDict:
  """The fields shared by the phases that read a fine-tuned model (generate, evaluate)."""
  config = ml_collections.ConfigDict()
  config.phase = phase
  config.seed = 0
  config.data = data_config()
  config.mesh = mesh_config()
  config.init = ml_collections.ConfigDict()
  config.init.model = ""           # workdir of a finetune_listener / finetune_speaker run.
  return config


def inference_config_from_arg(config: ml_collections.ConfigDict,
                              arg: str | None) -> ml_collections.ConfigDict:
  """`configs/generate.py` / `configs/evaluate.py` argument: `size=tiny` = the demo's data."""
  args = parse_arg(arg, size="official")
  if args.size == "tiny":
    tiny_data(config.data)
  elif args.size != "official":
    raise errors.ConfigError(f"size={args.size!r}; expected 'official' or 'tiny'")
  return config


def generate_config() -> ml_collections.ConfigDict:
  """Phase `generate`: sample motion for every clip of a split from a fine-tuned model."""
  config = _from_finetuned_config("generate")
  config.generate = ml_collections.ConfigDict()
  config.generate.split = "test"
  config.generate.num_samples = 1  # independent samples per clip (one batch).
  config.generate.batch_size = 8   # clips per generation batch.
  config.generate.seed = 0         # sampling seed (clip c: fold_in(seed, hash of c's id)).
  # Frame 0 of each clip: 'first_frame' (official) = the ground truth's first frame seeds it,
  # nothing later; 'none' = no ground truth (start token, or the code of the mean motion).
  config.generate.start = "first_frame"
  config.generate.window = 0          # frames per generated window; 0 = the model's data.max_len.
  config.generate.window_overlap = -1  # frames shared with the previous window; -1 = window // 4.
  config.generate.weights = "float32"  # decoder kernels held as 'float32', 'bfloat16' or 'int8'.
  # model.decoding=parallel: decoder passes per window (MaskGIT; 1 = one pass), the schedule of
  # masked positions ('cosine', 'linear') and the annealed Gumbel noise on the confidences.
  config.generate.iterations = 1
  config.generate.mask_schedule = "cosine"
  config.generate.choice_temperature = 0.0
  # What to write (dim_jax/handoff.py): 'npy' = sample_<k>/<clip>.npy; 'pickle' = the official
  # predictions pickle per sample; 'emoca' = per-frame EMOCA folders PIRenderer reads.
  config.generate.formats = "npy,pickle"
  config.generate.emoca_smoothing = 0  # moving-average frames for the EMOCA folders (official: 10).
  # From recordings instead of a split: a folder of <clip>.wav + <clip>.speaker.npy ([T, 56],
  # listener models) [+ <clip>.first_frame.npy]; audio features made with HuBERT from
  # hubert_dir (a Hugging Face checkpoint folder) at `hubert_layer` ('last' or an index).
  config.generate.recordings = ""
  config.generate.hubert_dir = ""
  config.generate.hubert_layer = "last"
  config.generate.fps = 30.0  # motion frame rate of the recordings' clips (the model's data).
  # Ours: add white Gaussian noise with the std of the white part of the tokenizer's residual
  # per dimension (measured on the data.dir split generate.residual_split) to every sample;
  # the decoder output (default) is smoother than the data (generate.py, "the tokenizer's
  # residual").
  config.generate.residual_noise = False
  config.generate.residual_split = "train"
  sampling = ml_collections.ConfigDict()
  sampling.temperature = 1.0       # 0 = greedy.  Official: 1.0 with top-k over 10 %.
  sampling.top_k = 0               # a count; 0 = use top_k_fraction.
  sampling.top_k_fraction = 0.1    # x-transformers top_k(frac_num_tokens); 0 = off.
  sampling.top_p = 0.0             # nucleus threshold; 0 = off.
  config.generate.sampling = sampling
  return config


def evaluate_config() -> ml_collections.ConfigDict:
  """Phase `evaluate`: the model and baselines on the test split, report + plots."""
  config = _from_finetuned_config("evaluate")
  ev = config.evaluate = ml_collections.ConfigDict()
  ev.role = "listener"             # whose motion is scored: 'listener' or 'speaker'.
  ev.split = "test"                # the only phase that reads it.
  ev.train_split = "train"         # what the baselines may use.
  ev.num_seeds = 3                 # headline: one sample per clip, mean ± std over seeds.
  ev.best_of = 10                  # oracle diagnostic row (official protocol); 0 = off.
  ev.batch_size = 8                # clips per generation batch.
  ev.seed = 0                      # sampling seed; Random baseline seeds seed..seed+n-1.
  ev.kmeans_seed = 0               # SID k-means random_state (official 0).
  ev.baselines = ("random", "mirror", "nn_motion", "nn_audio")
  ev.protocols = ("dim_compat", "per_sequence")  # the first is the headline table.
  ev.plot_clips = 3                # test clips drawn as trajectory plots.
  # Score as the official code: listener frame t+1 vs speaker frame t, listener frame 0 (the
  # ground-truth seed of generation) dropped from every metric, the SID clusters and best-of.
  ev.official_alignment = False
  ev.predictions = ""              # score sample_<k>/<clip>.npy files instead of a model.
  ev.method_name = ""              # row name; '' = DIM-Listener / DIM-Speaker.
  ev.sampling = generate_config().generate.sampling
  ev.window = 0                    # generation window; 0 = the model's data.max_len.
  ev.window_overlap = -1           # frames shared by consecutive windows; -1 = window // 4.
  ev.weights = "float32"           # decoder kernels as generate.weights ('bfloat16', 'int8').
  ev.iterations = 1                # parallel decoder passes, as generate.iterations.
  ev.mask_schedule = "cosine"      # as generate.mask_schedule.
  ev.choice_temperature = 0.0      # as generate.choice_temperature.
  # A second model row generated without any ground truth (generate.start='none'); the
  # headline row sees the listener's first ground-truth frame, as the official protocol.
  ev.no_ground_truth_row = True
  # On the embedded synthetic data: a diagnostic row of listeners redrawn by the generator
  # itself (its true conditional law), what a perfect model would score.
  ev.synthetic_oracle = True
  # Add the tokenizer's residual noise to the samples (as generate.residual_noise; std from
  # the train_split); the decoder output is reported beside it as a variant row.
  ev.residual_noise = False
  return config
