"""TrainState (params, EMA params, optimizer state, step, root key), the optimizer, and EMA.

Everything a resumed run needs lives in the TrainState (plus the data iterator's state, saved
next to it): the per-step randomness is fold_in(root key, step), so no key is ever carried.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from t2i_jax.errors import UsageError

LR_SCHEDULES = ("constant", "cosine")


@struct.dataclass
class TrainState:
    step: jax.Array        # int32 []: optimizer updates done
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array         # uint32 key data of the root key (raw, so checkpoints store it as is)

    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-4
    warmup_steps: int = 500
    lr_schedule: str = "constant"
    end_lr_factor: float = 0.0
    num_steps: int = 10_000
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True

    @classmethod
    def from_config(cls, train) -> "OptimConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(train).items() if k in names})

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise UsageError(f"unknown train.lr_schedule {self.lr_schedule!r}; choose one of "
                             f"{LR_SCHEDULES}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UsageError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}.")
        if self.learning_rate < 0 or self.warmup_steps < 0 or self.num_steps < 1:
            raise UsageError("train.learning_rate must be >= 0 (0 changes nothing: a fine-tune "
                             "that samples its base), train.warmup_steps >= 0 and "
                             "train.num_steps >= 1.")


def learning_rate_fn(cfg: OptimConfig) -> optax.Schedule:
    """Linear warm-up from 0 to the peak over warmup_steps, then constant or cosine decay."""
    peak = cfg.learning_rate
    warm = max(cfg.warmup_steps, 1)
    if cfg.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warm, max(cfg.num_steps, warm + 1), end_value=peak * cfg.end_lr_factor)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warm), optax.constant_schedule(peak)], [warm])


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Global-norm gradient clipping, then AdamW with the learning-rate schedule."""
    chain = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))
    chain.append(optax.adamw(learning_rate_fn(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2,
                             weight_decay=cfg.weight_decay))
    return optax.chain(*chain)


def ema_decay(cfg: OptimConfig, step: jax.Array) -> jax.Array:
    """The decay used after update `step` (0-based): min(decay, (1 + step) / (10 + step)) with
    warm-up (so early averages are not dominated by the initialisation), else the constant."""
    step = jnp.asarray(step, jnp.float32)
    if not cfg.ema_warmup:
        return jnp.asarray(cfg.ema_decay, jnp.float32)
    return jnp.minimum(cfg.ema_decay, (1.0 + step) / (10.0 + step))


def ema_update(ema, params, decay: jax.Array):
    """ema + (1 - decay) (params - ema): decay * ema + (1 - decay) * params, written so that an
    average equal to the parameters stays bit-identical (a learning rate of 0 changes nothing)."""
    return jax.tree_util.tree_map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)


def init_state(params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A fresh state: step 0, EMA equal to the initial parameters."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree_util.tree_map(jnp.copy, params),
                      opt_state=tx.init(params), rng=jax.random.key_data(rng))
