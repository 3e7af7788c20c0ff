"""The forward process q(x_t | x_0) in closed form, its posterior, and prediction conversions.

x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps                          (DDPM eq. 4)
v   = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0                           (Salimans & Ho 2022)

A "flow" model (flow matching, diffusion/flow.py) predicts u = eps - x_0 from the path's own
point (1 - tau) x_0 + tau eps = x_t / n, n = sqrt(abar) + sqrt(1 - abar), tau = sqrt(1 - abar) / n:
`model_input` scales x_t to it, and `eps_and_x0` reads (eps_hat, x0_hat) back, so every sampler
and guide, written on (eps_hat, x0_hat) at abar, runs a flow model unchanged.

Conversions take `alpha_bar` as an array broadcastable against x ([B, 1, ..., 1]), not t, so
samplers can use them at any point of a respaced chain, including abar = 1 after the last step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t2i_jax.diffusion.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v", "flow", "flow_x0")
FLOW_PREDICTIONS = ("flow", "flow_x0")  # a flow model's: u = eps - x0, or x0 itself (JiT)


def check_timesteps(x: jax.Array, t: jax.Array, name: str = "x") -> None:
    """Raises ValueError unless t is an integer array of shape [B] with B = x.shape[0]."""
    if x.ndim < 1:
        raise ValueError(f"{name} must have a leading batch axis, got shape {x.shape}.")
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape [B] = [{x.shape[0]}] to match {name} of shape "
                         f"{x.shape}; got t of shape {t.shape}. Pass one timestep per example.")
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"t must be an integer array of timesteps in 0..T-1, got dtype {t.dtype}.")


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Returns x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, a draw of q(x_t | x_0) (DDPM eq. 4).

    x0, noise: [B, ...] any shape; t: int [B].
    """
    check_timesteps(x0, t, "x0")
    if noise.shape != x0.shape:
        raise ValueError(f"noise has shape {noise.shape} but x0 has shape {x0.shape}; they must match.")
    return (schedule.at("sqrt_alphas_cumprod", t, x0.ndim) * x0
            + schedule.at("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise)  # [B, ...]


def q_posterior(schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array):
    """Returns (mean, variance, log_variance_clipped) of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7).

    mean = coef1 x0 + coef2 x_t, variance = beta~_t; all broadcast to x_t's shape [B, ...].
    """
    check_timesteps(x_t, t, "x_t")
    if x0.shape != x_t.shape:
        raise ValueError(f"x0 has shape {x0.shape} but x_t has shape {x_t.shape}; they must match.")
    nd = x_t.ndim
    mean = schedule.at("posterior_mean_coef1", t, nd) * x0 + schedule.at("posterior_mean_coef2", t, nd) * x_t
    variance = jnp.broadcast_to(schedule.at("posterior_variance", t, nd), x_t.shape)
    log_variance = jnp.broadcast_to(schedule.at("posterior_log_variance_clipped", t, nd), x_t.shape)
    return mean, variance, log_variance


def x0_from_eps(x_t, eps, alpha_bar):
    """Returns x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar); undefined where abar = 0."""
    return (x_t - jnp.sqrt(1.0 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)


def eps_from_x0(x_t, x0, alpha_bar):
    """Returns eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar); undefined where abar = 1."""
    return (x_t - jnp.sqrt(alpha_bar) * x0) / jnp.sqrt(1.0 - alpha_bar)


def v_from_x0_eps(x0, eps, alpha_bar):
    """Returns v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, sec. 4)."""
    return jnp.sqrt(alpha_bar) * eps - jnp.sqrt(1.0 - alpha_bar) * x0


def x0_from_v(x_t, v, alpha_bar):
    """Returns x0 = sqrt(abar) x_t - sqrt(1 - abar) v; finite for every abar in [0, 1]."""
    return jnp.sqrt(alpha_bar) * x_t - jnp.sqrt(1.0 - alpha_bar) * v


def eps_from_v(x_t, v, alpha_bar):
    """Returns eps = sqrt(1 - abar) x_t + sqrt(abar) v; finite for every abar in [0, 1]."""
    return jnp.sqrt(1.0 - alpha_bar) * x_t + jnp.sqrt(alpha_bar) * v


def flow_scale(alpha_bar):
    """Returns (1 / n, tau): the flow path's point is x_t / n, n = sqrt(abar) + sqrt(1 - abar),
    at flow time tau = sqrt(1 - abar) / n (1 at zero SNR, 0 at the data)."""
    a, b = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
    return 1.0 / (a + b), b / (a + b)


def model_input(x_t, alpha_bar, prediction: str):
    """What the network reads for x_t at abar: x_t itself, or a flow model's point x_t / n."""
    if prediction not in FLOW_PREDICTIONS:
        return x_t
    return x_t * flow_scale(alpha_bar)[0].astype(x_t.dtype)


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; choose one of {PREDICTIONS}.")


def eps_and_x0(output: jax.Array, x_t: jax.Array, alpha_bar: jax.Array, prediction: str):
    """Returns (eps_hat, x0_hat) from a model output that predicts `prediction` (eps, x0, v, or
    flow's u = eps - x0 at the point x = x_t / n: eps = x + (1 - tau) u, x0 = x - tau u; a
    flow_x0 model's output is x0 read at that point, and eps follows as for x0)."""
    check_prediction(prediction)
    if prediction == "flow":
        inv_n, tau = flow_scale(alpha_bar)
        x = x_t * inv_n
        return x + (1.0 - tau) * output, x - tau * output
    if prediction == "eps":
        return output, x0_from_eps(x_t, output, alpha_bar)
    if prediction in ("x0", "flow_x0"):
        return eps_from_x0(x_t, output, alpha_bar), output
    return eps_from_v(x_t, output, alpha_bar), x0_from_v(x_t, output, alpha_bar)


def prediction_target(x0: jax.Array, eps: jax.Array, alpha_bar: jax.Array, prediction: str):
    """Returns what a model that predicts `prediction` should output for (x0, eps) at abar."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction in ("x0", "flow_x0"):
        return x0
    if prediction == "flow":
        return eps - x0
    return v_from_x0_eps(x0, eps, alpha_bar)
