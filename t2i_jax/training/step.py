"""The pure training step of any family: the family's loss, gradients, clipping and AdamW,
EMA. Jitted once by the loop with the state donated; the same function runs on one CPU or a
pod (the batch is split over the mesh, XLA inserts the gradient all-reduce).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from t2i_jax.families.base import Family
from t2i_jax.training.state import OptimConfig, TrainState, ema_decay, ema_update, learning_rate_fn


def make_train_step(family: Family, optim: OptimConfig,
                    tx: optax.GradientTransformation) -> Callable:
    """Returns train_step(state, batch, hparams) -> (state, metrics), pure and jittable.

    batch: the family's batch_keys (image [B, H, W, C] in [-1, 1], tokens/mask [B, L], label [B]).
    hparams: `family.hparams()`, the loss's traced inputs that are not trained: scalars (runs
    differing only in them share a program) and frozen models' parameters; the loss also sees
    hp["step"], the step being taken (a term that starts at a given step reads it).
    metrics: loss (the mean of the family's per-example loss), the family's own metrics,
    grad_norm (before clipping), lr, and finite (bool: the loss, the gradient norm and every
    updated parameter are finite; the loop's NaN guard reads it).
    """
    lr_fn = learning_rate_fn(optim)

    def train_step(state: TrainState, batch: dict, hp: dict):
        key = jax.random.fold_in(state.key(), state.step)

        def loss_fn(params):
            per_example, metrics = family.loss(params, batch, key, dict(hp, step=state.step))
            return jnp.mean(per_example), metrics

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, ema_decay(optim, state.step))

        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
        params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p))
                                           for p in jax.tree_util.tree_leaves(params)]))
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=lr_fn(state.step),
                       params_finite=params_finite,
                       finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite)
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                                  opt_state=opt_state)
        return new_state, metrics

    return train_step
