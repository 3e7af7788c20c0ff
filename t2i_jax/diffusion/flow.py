"""Flow matching on the linear path (rectified flow: Liu et al. 2023; Lipman et al. 2023; SD3,
Esser et al. 2024), the second process beside VP diffusion.

    x_tau = (1 - tau) x0 + tau eps,   tau in [0, 1] (1: pure noise),   target u = eps - x0

The network reads (x_tau, t) with t = tau T - 1, the timestep of the "flow" Schedule
(schedules.make_schedule("flow", T): abar(tau) = (1 - tau)^2 / ((1 - tau)^2 + tau^2)), so the
chain runs a flow model as a VP model in the variables x_tau / n, n = sqrt((1 - tau)^2 + tau^2)
(forward.model_input, forward.eps_and_x0): DDIM with eta 0 is then exactly rectified flow's Euler
step, x_s = x_tau + (s - tau) u_hat; DPM-Solver++ and the guides run unchanged.

Training time tau: uniform, or logit-normal(m, s) (SD3 sec. 3.1: tau = sigmoid(m + s z)); either
optionally shifted, tau' = shift tau / (1 + (shift - 1) tau) (SD3 sec. 5.3.2's resolution shift,
shift = sqrt(m / n) for m pixels against a base of n). Sampling visits tau_i = shift(1 - i / N),
i = 0..N-1, then the data.

The network may instead predict x0 itself ("flow_x0", diffusion.prediction = "x0"; Li & He
2025, "Back to Basics: Let Denoising Generative Models Denoise", JiT): clean images lie near a
low-dimensional manifold where the noise does not, so a pixel transformer with large patches
learns x0 where it struggles to pass eps through. Its loss stays the velocity's (JiT's "x-pred,
v-loss"): u_hat = (x_tau - x0_hat) / max(tau, TAU_MIN) against u = eps - x0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


TIME_SAMPLINGS = ("uniform", "logit_normal")
TAU_MIN = 0.05  # JiT's clip of the velocity's denominator (its t_eps)


def shift_time(tau, shift: float):
    """Returns shift tau / (1 + (shift - 1) tau) (SD3 eq. 23): more time near noise for shift > 1;
    the identity at shift = 1; 0 and 1 are fixed points."""
    if shift == 1.0:
        return tau
    return shift * tau / (1.0 + (shift - 1.0) * tau)


def resolution_shift(height: int, width: int, base: int = 256) -> float:
    """SD3's shift for an image of height x width against a base x base one: sqrt(hw / base^2)."""
    return math.sqrt(height * width / float(base * base))


def sample_time(key: jax.Array, n: int, sampling: str = "logit_normal", mean: float = 0.0,
                std: float = 1.0, shift: float = 1.0) -> jax.Array:
    """Returns n training times tau in (0, 1) [n] (float32): uniform, or sigmoid(mean + std z)
    with z ~ N(0, 1) (logit-normal; SD3's default is mean 0, std 1), then shifted."""
    if sampling == "uniform":
        # in (0, 1]: tau = 0 is the data itself, where the target is still defined
        tau = 1.0 - jax.random.uniform(key, (n,), jnp.float32)
    elif sampling == "logit_normal":
        tau = jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,), jnp.float32))
    else:
        raise ValueError(f"unknown flow time sampling {sampling!r}; choose one of {TIME_SAMPLINGS}.")
    return shift_time(tau, shift)


def logit_normal_cdf(tau, mean: float = 0.0, std: float = 1.0, shift: float = 1.0):
    """The CDF of sample_time's logit-normal tau (NumPy): the shift is monotone, so
    P(tau' <= u) = Phi((logit(shift^-1(u)) - mean) / std), shift^-1(u) = u / (shift - (shift - 1) u)."""
    from math import erf, sqrt
    u = np.asarray(tau, np.float64)
    u = u / (shift - (shift - 1.0) * u)
    z = (np.log(u) - np.log1p(-u) - mean) / std
    return 0.5 * (1.0 + np.vectorize(erf)(z / sqrt(2.0)))


def interpolate(x0: jax.Array, noise: jax.Array, tau: jax.Array) -> jax.Array:
    """Returns x_tau = (1 - tau) x0 + tau noise [B, ...]; tau [B]."""
    tau = tau.reshape(tau.shape + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return (1.0 - tau) * x0 + tau * noise


def model_time(tau: jax.Array, num_timesteps: int) -> jax.Array:
    """The timestep t = tau T - 1 the network reads (and the flow Schedule indexes) [B]."""
    return tau * num_timesteps - 1.0


def per_example_loss(output: jax.Array, x0: jax.Array, noise: jax.Array,
                     tau: jax.Array = None, prediction: str = "flow") -> jax.Array:
    """Returns mean((u_hat - (noise - x0))^2) over every non-batch axis [B], in float32: u_hat
    the output ("flow"), or (x_tau - output) / max(tau, TAU_MIN) for an x0 output ("flow_x0",
    tau [B] needed)."""
    if output.shape != x0.shape or noise.shape != x0.shape:
        raise ValueError(f"output {output.shape}, x0 {x0.shape} and noise {noise.shape} must "
                         "have the same shape.")
    x0, noise, u_hat = (a.astype(jnp.float32) for a in (x0, noise, output))
    if prediction == "flow_x0":
        tau = jnp.asarray(tau, jnp.float32)
        tau_b = tau.reshape(tau.shape + (1,) * (x0.ndim - 1))
        u_hat = (interpolate(x0, noise, tau) - u_hat) / jnp.maximum(tau_b, TAU_MIN)
    elif prediction != "flow":
        raise ValueError(f"a flow model predicts 'flow' (u) or 'flow_x0', not {prediction!r}.")
    err = jnp.square(u_hat - (noise - x0))
    return jnp.mean(err.reshape(err.shape[0], -1), axis=1)


def time_grid(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """The flow times a chain visits [num_steps]: shift(1 - i / N), i = 0..N-1 (float64, NumPy)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) \
            or num_steps < 1:
        raise ValueError(f"the number of sampling steps must be an integer >= 1, got {num_steps!r}.")
    return shift_time(1.0 - np.arange(num_steps, dtype=np.float64) / num_steps, shift)
