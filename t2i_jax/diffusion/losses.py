"""The denoising loss: a prediction target (eps, x0 or v) and a per-timestep weighting.

The three targets are the same regression seen through different scalings: with
SNR_t = abar_t / (1 - abar_t) and predictions that agree on x0_hat,
  |eps_hat - eps|^2 = SNR_t |x0_hat - x0|^2,   |v_hat - v|^2 = (SNR_t + 1) |x0_hat - x0|^2.
Min-SNR-gamma (Hang et al. 2023) weighs the x0 error by min(SNR_t, gamma), which in each
target's own units is min(SNR, gamma) / SNR (eps), min(SNR, gamma) (x0), and
min(SNR, gamma) / (SNR + 1) (v). Written as below they stay finite at SNR = 0 (zero
terminal SNR), where the eps weight takes its limit 1.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from t2i_jax.diffusion import forward
from t2i_jax.diffusion.schedules import Schedule

WEIGHTINGS = ("uniform", "min_snr")


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """Returns SNR_t = abar_t / (1 - abar_t) [B], from the float64-derived log-SNR (0 at zero SNR)."""
    return jnp.exp(schedule.log_snr[t])


def loss_weight(snr_t: jax.Array, prediction: str = "eps", weighting: str = "uniform",
                min_snr_gamma: float = 5.0, zero_snr_weight: Optional[float] = None) -> jax.Array:
    """Returns the weight [B] of the squared error of a `prediction` target at SNR snr_t [B].

    zero_snr_weight: if given, the min-SNR weight used where SNR = 0 (zero terminal SNR). The
    paper's formula gives x0 and v targets weight 0 there, so t = T-1, where every trailing-
    spaced sampling run starts, gets no gradient; diffusers' training scripts use 1.
    """
    forward.check_prediction(prediction)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {WEIGHTINGS}.")
    if weighting == "uniform":
        return jnp.ones_like(snr_t)
    clipped = jnp.minimum(snr_t, min_snr_gamma)
    if prediction == "eps":
        weight = jnp.minimum(1.0, min_snr_gamma / snr_t)  # gamma / 0 = inf -> weight 1 at SNR 0
    elif prediction == "x0":
        weight = clipped
    else:
        weight = clipped / (snr_t + 1.0)
    if zero_snr_weight is not None:
        weight = jnp.where(snr_t == 0, jnp.asarray(zero_snr_weight, weight.dtype), weight)
    return weight


def per_example_loss(schedule: Schedule, output: jax.Array, x0: jax.Array, t: jax.Array,
                     noise: jax.Array, *, prediction: str = "eps", weighting: str = "uniform",
                     min_snr_gamma: float = 5.0, zero_snr_weight: Optional[float] = None) -> jax.Array:
    """Returns the weighted mean squared error [B] of a model output [B, ...] against its target.

    The model saw x_t = q_sample(schedule, x0, t, noise); `prediction` says what it predicts.
    The mean runs over every non-batch axis, in float32 whatever the output's dtype.
    """
    forward.check_timesteps(x0, t, "x0")
    if output.shape != x0.shape or noise.shape != x0.shape:
        raise ValueError(f"output {output.shape}, x0 {x0.shape} and noise {noise.shape} must "
                         "have the same shape.")
    alpha_bar = schedule.at("alphas_cumprod", t, x0.ndim)
    target = forward.prediction_target(x0, noise, alpha_bar, prediction)
    err = jnp.square(output.astype(jnp.float32) - target.astype(jnp.float32))
    mse = jnp.mean(err.reshape(err.shape[0], -1), axis=1)  # [B]
    weight = loss_weight(snr(schedule, t), prediction, weighting, min_snr_gamma, zero_snr_weight)
    return weight * mse
