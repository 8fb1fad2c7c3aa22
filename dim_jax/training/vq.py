"""Phase `vq`: the motion VQ-VAE tokenizer of one role (speaker or listener).

Loss (official `calc_vq_loss`): L1 reconstruction over valid frames + quant_loss_weight x the
quantizer loss. Evaluation reports reconstruction error per stream (pose dims 0:6,
expression dims 6:56) and codebook usage accumulated over the whole split.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dim_jax.data import normalization as normalization_lib
from dim_jax.models import vqvae
from dim_jax.training import checkpointing

POSE = slice(0, 6)
EXPRESSION = slice(6, 56)
ROLES = ("speaker", "listener")


@dataclasses.dataclass(frozen=True)
class VQTask:
  """Pure functions of the VQ phase; the generic trainer jits and shards them."""
  model: vqvae.VQVAE
  role: str
  quant_loss_weight: float = 1.0
  # Ours (off = official): codes unused in a training batch are re-seeded from that batch's
  # encoder outputs after the step (Jukebox / SoundStream "codebook expiry"); with few steps
  # on small data the official quantizer otherwise uses a handful of its codes.
  restart_dead_codes: bool = False
  frozen_params: tuple = ()  # train.frozen_params
  # Statistics the motion is standardised with (None: raw). The model trains on standardised
  # motion; the validation errors below are reported in raw units.
  normalization: Optional[normalization_lib.Normalization] = None
  # train.reconstruction_weighting. 'uniform' (official): L1 averaged over the 56 dims of
  # the model's input. 'part_balanced' (ours): pose and expression each weigh half, and
  # inside a part each dim weighs its raw std: the loss is then each part's raw-unit error
  # relative to that part's scale, so the head (radians of ~0.05) is not drowned by the
  # expression, and dims that are mostly noise on standardised input do not take over.
  reconstruction_weighting: str = "uniform"
  pose_weight: float = 0.5  # share of the pose part under 'part_balanced'
  reconstruction_loss: str = "l1"  # 'l1' (official) or 'mse'

  name = "vq"

  def dim_weights(self) -> np.ndarray:
    """[56] weights of the per-dim L1 terms (they sum to 56: 'uniform' is all ones)."""
    if self.reconstruction_weighting == "uniform":
      return np.ones(56, np.float32)
    if self.reconstruction_weighting != "part_balanced":
      raise ValueError(f"train.reconstruction_weighting={self.reconstruction_weighting!r}; "
                       "expected 'uniform' or 'part_balanced'")
    scale = (np.ones(56) if self.normalization is None
             else np.asarray(self.normalization.std(self.motion_key), np.float64))
    if self.reconstruction_loss == "mse":
      scale = scale**2  # squared errors: each part's weighted sum is its raw squared error
    weights = np.zeros(56)
    for part, share in ((POSE, self.pose_weight), (EXPRESSION, 1.0 - self.pose_weight)):
      weights[part] = share * 56 * scale[part] / scale[part].sum()
    return weights.astype(np.float32)

  @classmethod
  def from_config(cls, config, normalization=None) -> "VQTask":
    if config.role not in ROLES:
      raise ValueError(f"config.role={config.role!r}; expected one of {ROLES}")
    model = vqvae.VQVAE(vqvae.vq_config_from(config.model))
    return cls(model=model, role=config.role,
               quant_loss_weight=float(config.train.quant_loss_weight),
               restart_dead_codes=bool(config.train.get("restart_dead_codes", False)),
               frozen_params=tuple(config.train.get("frozen_params", ())),
               normalization=normalization,
               reconstruction_weighting=str(config.train.get("reconstruction_weighting",
                                                             "uniform")),
               pose_weight=float(config.train.get("pose_weight", 0.5)),
               reconstruction_loss=str(config.train.get("reconstruction_loss", "l1")))

  @property
  def motion_key(self) -> str:
    return f"{self.role}_motion"

  def model_meta(self) -> dict:
    return dict(phase=self.name, role=self.role,
                model=checkpointing.config_meta(self.model.config),
                normalization=normalization_lib.to_meta(self.normalization))

  def meta_defaults(self) -> dict:
    """`model_meta`'s config fields at their defaults (checkpointing.config_differences)."""
    return dict(model=checkpointing.config_meta(vqvae.VQConfig()))

  def init_params(self, rng: jax.Array, batch: dict[str, jax.Array]) -> Any:
    params_rng, dropout_rng = jax.random.split(rng)
    variables = self.model.init({"params": params_rng, "dropout": dropout_rng},
                                batch[self.motion_key], batch["mask"], train=False)
    return variables["params"]

  def _reconstruct(self, params, batch, rng, train):
    rngs = {"dropout": rng} if train else {}
    return self.model.apply({"params": params}, batch[self.motion_key], batch["mask"],
                            train=train, rngs=rngs)

  def loss_fn(self, params, batch, rng):
    """Scalar loss and metrics for one training batch."""
    out = self._reconstruct(params, batch, rng, train=True)
    target = batch[self.motion_key]
    valid = batch["mask"][..., None].astype(jnp.float32)
    frames = jnp.maximum(valid.sum(), 1.0)
    abs_err = jnp.abs(out["reconstruction"] - target) * valid
    per_dim = abs_err if self.reconstruction_loss == "l1" else jnp.square(abs_err)
    # The weighted reconstruction term: L1 (official) or MSE, per reconstruction_loss.
    reconstruction = (per_dim * self.dim_weights()).sum() / (frames * target.shape[-1])
    loss = reconstruction + self.quant_loss_weight * out["quant_loss"]
    metrics = dict(reconstruction=reconstruction, quant_loss=out["quant_loss"], perplexity=out["perplexity"],
                   pose_l1=abs_err[..., POSE].sum() / (frames * 6),
                   expression_l1=abs_err[..., EXPRESSION].sum() / (frames * 50))
    if self.restart_dead_codes:
      metrics.update(_code_counts=out["group_code_counts"], _latents=out["latents"],
                     _valid=batch["mask"])
    return loss, metrics

  def trainable_mask(self, params):
    if not self.frozen_params:
      return None  # every tokenizer parameter trains
    from dim_jax.training import dim_tasks  # pylint: disable=g-import-not-at-top
    return dim_tasks.trainable_by_patterns(params, self.frozen_params)

  def pretrained_params(self, abstract_params) -> dict:
    del abstract_params
    return {}  # the first phase: nothing to graft

  def after_update(self, params, hook_inputs: dict, rng: jax.Array):
    """Re-seeds codes unused in this batch with random valid latents of the batch (per
    group of a product quantizer)."""
    if not self.restart_dead_codes:
      return params
    codebook = params["quantizer"]["codebook"]
    grouped = codebook.reshape((-1,) + codebook.shape[-2:])            # [G, K, d]
    groups = grouped.shape[0]
    latents = hook_inputs["_latents"].reshape(-1, groups, grouped.shape[-1])
    valid = hook_inputs["_valid"].reshape(-1).astype(jnp.float32)
    picks = jax.random.choice(rng, latents.shape[0], (groups, grouped.shape[1]),
                              p=valid / jnp.maximum(valid.sum(), 1.0))
    dead = (hook_inputs["_code_counts"] == 0)[..., None]               # [G, K, 1]
    fresh = jax.lax.stop_gradient(latents[picks, jnp.arange(groups)[:, None]])
    restarted = jnp.where(dead, fresh.astype(codebook.dtype), grouped).reshape(codebook.shape)
    return dict(params, quantizer=dict(params["quantizer"], codebook=restarted))

  def eval_sums(self, params, batch) -> dict[str, jax.Array]:
    """Sums over a batch (deterministic model); combined exactly by `finalize_eval`."""
    out = self._reconstruct(params, batch, None, train=False)
    target = batch[self.motion_key]
    valid = batch["mask"][..., None].astype(jnp.float32)
    err = (out["reconstruction"] - target) * valid
    per_dim = jnp.abs(err) if self.reconstruction_loss == "l1" else jnp.square(err)
    objective = (per_dim * self.dim_weights()).sum()  # the training loss's reconstruction term
    if self.normalization is not None:
      # Raw units (radians, EMOCA coefficients): the mean cancels in errors and variances.
      scale = self.normalization.std(self.motion_key)
      err, target = err * scale, target * scale
    frames = valid.sum()
    return dict(frames=frames, objective=objective,
                pose_abs=jnp.abs(err[..., POSE]).sum(), expression_abs=jnp.abs(err[..., EXPRESSION]).sum(),
                pose_sq=jnp.square(err[..., POSE]).sum(),
                expression_sq=jnp.square(err[..., EXPRESSION]).sum(),
                quant_loss=out["quant_loss"] * frames, code_counts=out["code_counts"],
                # Per-dimension moments of the target, for the unexplained-variance ratio.
                target_sum=(target * valid).sum(axis=(0, 1)),
                target_sq=(jnp.square(target) * valid).sum(axis=(0, 1)))

  def finalize_eval(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
    frames = max(float(sums["frames"]), 1.0)
    counts = np.asarray(sums["code_counts"], np.float64)
    probs = counts / max(counts.sum(), 1.0)
    nonzero = probs[probs > 0]
    rec_l1 = (float(sums["pose_abs"]) + float(sums["expression_abs"])) / (frames * 56)
    quant = float(sums["quant_loss"]) / frames
    mean = np.asarray(sums["target_sum"], np.float64) / frames
    variance = np.maximum(np.asarray(sums["target_sq"], np.float64) / frames - mean**2, 1e-12)
    # The validation loss (checkpoint selection) is the training objective, in model units.
    reconstruction = float(sums["objective"]) / (frames * 56)
    return dict(loss=reconstruction + self.quant_loss_weight * quant, rec_l1=rec_l1, quant_loss=quant,
                pose_l1=float(sums["pose_abs"]) / (frames * 6),
                expression_l1=float(sums["expression_abs"]) / (frames * 50),
                pose_mse=float(sums["pose_sq"]) / (frames * 6),
                expression_mse=float(sums["expression_sq"]) / (frames * 50),
                # Squared error over the data variance, pooled over the stream (1 - R^2).
                pose_unexplained=float(sums["pose_sq"]) / (frames * variance[POSE].sum()),
                expression_unexplained=(float(sums["expression_sq"])
                                        / (frames * variance[EXPRESSION].sum())),
                codes_used=int((counts > 0).sum()),
                codebook_usage=float((counts > 0).mean()),
                perplexity=float(np.exp(-(nonzero * np.log(nonzero)).sum())),
                frames=int(frames))
