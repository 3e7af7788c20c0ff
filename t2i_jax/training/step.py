"""The pure training step: sample t and noise, q_sample, CFG condition dropout, weighted loss,
AdamW, EMA. Jitted once by the loop with the state donated; the same function runs on one CPU
or a pod (the batch is split over the mesh, XLA inserts the gradient all-reduce).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from t2i_jax import conditioning
from t2i_jax.conditioning import Condition
from t2i_jax.diffusion import forward, losses
from t2i_jax.diffusion.schedules import Schedule
from t2i_jax.models.denoiser import Denoiser
from t2i_jax.training.state import OptimConfig, TrainState, ema_decay, ema_update, learning_rate_fn

# Streams of the per-step key fold_in(root, step): never reused for two purposes.
_T, _NOISE, _DROP, _DROPOUT = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class LossConfig:
    prediction: str = "eps"
    weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    p_uncond: float = 0.1


def condition_of(batch: dict, model: Denoiser) -> Condition:
    """The Condition a batch carries: text tokens, or the class label for class-conditional models."""
    n = batch["image"].shape[0]
    if model.cfg.text is not None:
        return Condition(tokens=batch["tokens"], mask=batch["mask"], is_null=jnp.zeros((n,), bool))
    if model.cfg.unet.num_classes is not None:
        return conditioning.class_condition(batch["label"])
    raise ValueError("the model has neither a text encoder nor class labels to condition on.")


def null_of(model: Denoiser) -> Condition:
    """The ONE null condition of a model (batch 1): what dropout inserts and sampling guides with."""
    if model.cfg.text is not None:
        return conditioning.null_condition(1, max_length=model.cfg.text.max_length)
    return conditioning.null_condition(1, num_classes=model.cfg.unet.num_classes)


def hparams(loss_cfg: LossConfig) -> dict:
    """The step's traced hyperparameters: values, not program constants, so runs (and tests)
    that differ only in them share one compiled step."""
    return dict(p_uncond=jnp.asarray(loss_cfg.p_uncond, jnp.float32))


def make_train_step(model: Denoiser, schedule: Schedule, optim: OptimConfig,
                    loss_cfg: LossConfig, tx: optax.GradientTransformation) -> Callable:
    """Returns train_step(state, batch, hparams) -> (state, metrics), pure and jittable.

    batch: dict with image [B, H, W, C] in [-1, 1] and tokens/mask [B, L] or label [B].
    hparams: `hparams(loss_cfg)` (p_uncond [] float32).
    metrics: loss, loss_q0..loss_q3 (mean loss of the examples whose t is in each quarter of
    [0, T); NaN where a quarter has none), grad_norm (before clipping), lr, null_fraction, and
    params_finite (bool: every updated parameter is finite; the loop's NaN guard reads it with
    the loss and the grad norm).
    """
    T = schedule.num_timesteps
    lr_fn = learning_rate_fn(optim)
    null = null_of(model)

    def train_step(state: TrainState, batch: dict, hp: dict):
        x0 = batch["image"]
        n = x0.shape[0]
        key = jax.random.fold_in(state.key(), state.step)
        t = jax.random.randint(jax.random.fold_in(key, _T), (n,), 0, T)
        noise = jax.random.normal(jax.random.fold_in(key, _NOISE), x0.shape, x0.dtype)
        x_t = forward.q_sample(schedule, x0, t, noise)
        cond = conditioning.drop_condition(condition_of(batch, model), null,
                                           jax.random.fold_in(key, _DROP), hp["p_uncond"])

        def loss_fn(params):
            out = model.apply(params, x_t, t, cond, deterministic=False,
                              rngs={"dropout": jax.random.fold_in(key, _DROPOUT)})
            per_example = losses.per_example_loss(
                schedule, out, x0, t, noise, prediction=loss_cfg.prediction,
                weighting=loss_cfg.weighting, min_snr_gamma=loss_cfg.min_snr_gamma)
            return jnp.mean(per_example), per_example

        (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, ema_decay(optim, state.step))

        quarter = (t * 4) // T
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
        params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p))
                                           for p in jax.tree_util.tree_leaves(params)]))
        metrics = dict(loss=loss, grad_norm=grad_norm, lr=lr_fn(state.step),
                       null_fraction=jnp.mean(cond.is_null.astype(jnp.float32)),
                       params_finite=params_finite)
        for q in range(4):
            in_q = (quarter == q).astype(jnp.float32)
            metrics[f"loss_q{q}"] = jnp.sum(per_example * in_q) / jnp.sum(in_q)  # NaN if empty
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                                  opt_state=opt_state)
        return new_state, metrics

    return train_step
