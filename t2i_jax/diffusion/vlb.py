"""The variational bound of DDPM and Improved DDPM's learned variance (Nichol & Dhariwal 2021).

  L_vlb = L_0 + sum_{t=1}^{T-1} L_t + L_T                                  (IDDPM eqs. 4-7)
    L_0 = -log p(x_0 | x_1)                 the discretised Gaussian decoder (8-bit data)
    L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
    L_T = KL(q(x_T | x_0) || N(0, I))       the prior term (no parameters)
  (timesteps are 0-indexed here: t = 0 is the decoder term, x_{-1} is the data.)

Learned variance (IDDPM eq. 15): the model's extra output v in [-1, 1] (unconstrained) gives
  log Sigma = frac log beta_t + (1 - frac) log beta~_t,  frac = (v + 1) / 2,
with beta~ clipped at t = 0 to beta~_1 as the paper's code does.
Hybrid objective (IDDPM sec. 3.1): L_hybrid = L_simple + lambda L_vlb, lambda = 0.001. L_vlb is
estimated with one uniform t as T * L_t; the mean enters L_t through a stop-gradient, so L_vlb
trains only the variance. Everything is in bits per dimension (mean over the non-batch axes / ln 2).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.diffusion import forward
from t2i_jax.diffusion.schedules import Schedule

LAMBDA_VLB = 0.001  # IDDPM's lambda
_LN2 = math.log(2.0)


def mean_flat(x: jax.Array) -> jax.Array:
    """Returns the mean over every non-batch axis [B]."""
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """Returns KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _log_ndtr(x):
    return jax.scipy.special.log_ndtr(x)


def discretized_gaussian_log_likelihood(x0: jax.Array, mean: jax.Array, log_scale: jax.Array,
                                        num_bins: int = 256) -> jax.Array:
    """Returns log P(x0) elementwise [nats] of N(mean, exp(log_scale)^2) integrated over x0's bin.

    x0 lies on the grid of `num_bins` levels of [-1, 1] (8-bit data: 256), bins of width
    2 / (num_bins - 1) centred on the levels; the first bin reaches -inf and the last +inf
    (DDPM sec. 3.3, eq. 13). The exact normal CDF is used, in log space at both tails (no
    log of a difference of two numbers near 1).
    """
    half = 1.0 / (num_bins - 1)
    inv_s = jnp.exp(-log_scale)
    upper = (x0 - mean + half) * inv_s
    lower = (x0 - mean - half) * inv_s
    log_cdf_upper = _log_ndtr(upper)
    log_sf_lower = _log_ndtr(-lower)  # log(1 - Phi(lower))
    # log(Phi(upper) - Phi(lower)) on whichever side of the mean is numerically safe; each side
    # is evaluated on inputs made safe for it, so the side not taken has no NaN gradient either
    right = lower > 0
    lo_r, up_r = jnp.where(right, lower, 0.0), jnp.where(right, upper, 1.0)
    lo_l, up_l = jnp.where(right, -1.0, lower), jnp.where(right, 0.0, upper)
    sf_lo_r = _log_ndtr(-lo_r)
    from_right = sf_lo_r + jnp.log(-jnp.expm1(_log_ndtr(-up_r) - sf_lo_r))
    cdf_up_l = _log_ndtr(up_l)
    from_left = cdf_up_l + jnp.log(-jnp.expm1(_log_ndtr(lo_l) - cdf_up_l))
    mid = jnp.where(right, from_right, from_left)
    edge = 1.0 - 1e-3 * half  # the first and last levels, however x0 was rounded
    return jnp.where(x0 < -edge, log_cdf_upper, jnp.where(x0 > edge, log_sf_lower, mid))


def continuous_gaussian_log_likelihood(x, mean, log_var) -> jax.Array:
    """Returns log N(x; mean, exp(log_var)) elementwise, in nats (for continuous data)."""
    return -0.5 * (math.log(2 * math.pi) + log_var + jnp.square(x - mean) * jnp.exp(-log_var))


def learned_log_variance(v: jax.Array, log_beta: jax.Array, log_beta_tilde: jax.Array) -> jax.Array:
    """Returns frac log beta + (1 - frac) log beta~, frac = (v + 1) / 2 (IDDPM eq. 15)."""
    frac = (v + 1.0) / 2.0
    return frac * log_beta + (1.0 - frac) * log_beta_tilde


def model_log_variance(schedule: Schedule, v: jax.Array, t: jax.Array) -> jax.Array:
    """Returns log Sigma_theta(x_t, t) [B, ...] of the training chain from the model's v [B, ...]."""
    nd = v.ndim
    log_beta = jnp.log(schedule.at("betas", t, nd))
    log_beta_tilde = schedule.at("posterior_log_variance_clipped", t, nd)
    return learned_log_variance(v, log_beta, log_beta_tilde)


def fixed_log_variance(schedule: Schedule, t: jax.Array, ndim: int, kind: str) -> jax.Array:
    """Returns log beta~_t (kind "posterior", clipped at t = 0) or log beta_t ("beta": DDPM's
    other fixed choice; beta~_1 at t = 0 as IDDPM's code does) [B, 1, ...]."""
    if kind == "posterior":
        return schedule.at("posterior_log_variance_clipped", t, ndim)
    if kind == "beta":
        betas = jnp.append(schedule.posterior_variance[1], schedule.betas[1:]) \
            if schedule.num_timesteps > 1 else schedule.betas
        return jnp.log(betas[t]).reshape(t.shape + (1,) * (ndim - 1))
    raise ValueError(f"unknown fixed variance {kind!r}; choose 'posterior' or 'beta'.")


def vb_terms_bpd(schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array,
                 x0_hat: jax.Array, log_var: jax.Array, discrete: bool = True) -> jax.Array:
    """Returns L_t in bits per dimension [B]: KL(q(x_{t-1} | x_t, x0) || N(mu(x_t, x0_hat),
    Sigma)) for t > 0, the decoder's -log p(x0 | x_1) at t = 0.

    x0_hat: the model's x0 estimate (the mean follows the posterior formula, DDPM eq. 7);
    log_var: log Sigma [B, ...] (broadcastable). discrete: 8-bit data (the discretised decoder);
    False: continuous data (the Gaussian density).
    """
    true_mean, _, true_log_var = forward.q_posterior(schedule, x0, x_t, t)
    model_mean, _, _ = forward.q_posterior(schedule, x0_hat, x_t, t)
    log_var = jnp.broadcast_to(log_var, x_t.shape)
    kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, log_var)) / _LN2
    if discrete:
        ll = discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_var)
    else:
        ll = continuous_gaussian_log_likelihood(x0, model_mean, log_var)
    decoder_nll = -mean_flat(ll) / _LN2
    return jnp.where(t == 0, decoder_nll, kl)


def prior_bpd(schedule: Schedule, x0: jax.Array) -> jax.Array:
    """Returns L_T = KL(q(x_T | x0) || N(0, I)) in bits per dimension [B] (no parameters)."""
    t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, jnp.int32)
    mean = schedule.at("sqrt_alphas_cumprod", t, x0.ndim) * x0
    log_var = jnp.log(jnp.square(schedule.at("sqrt_one_minus_alphas_cumprod", t, x0.ndim)))
    return mean_flat(normal_kl(mean, jnp.broadcast_to(log_var, x0.shape), 0.0, 0.0)) / _LN2


def hybrid_vlb_term(schedule: Schedule, x0, x_t, t, mean_output, v, prediction: str,
                    lambda_vlb: float = LAMBDA_VLB) -> jax.Array:
    """Returns lambda T L_t [B] (bits/dim): the VLB part of L_hybrid for one uniform t, with the
    model's mean output behind a stop-gradient (IDDPM sec. 3.1: L_vlb trains Sigma only).

    mean_output: the model's first C channels (predicting `prediction`); v: its last C.
    With lambda = 0.001 this is improved-diffusion's `vb * T / 1000`.
    """
    frozen = jax.lax.stop_gradient(mean_output).astype(jnp.float32)
    alpha_bar = schedule.at("alphas_cumprod", t, x_t.ndim)
    _, x0_hat = forward.eps_and_x0(frozen, x_t, alpha_bar, prediction)
    log_var = model_log_variance(schedule, v.astype(jnp.float32), t)
    return lambda_vlb * schedule.num_timesteps * vb_terms_bpd(schedule, x0, x_t, t, x0_hat, log_var)


def split_output(output: jax.Array, learn_sigma: bool):
    """Returns (mean output [B, ..., C], v [B, ..., C] or None) of a model's output: a learned-
    variance model's last axis holds 2C channels (the mean's prediction, then v)."""
    if not learn_sigma:
        return output, None
    c = output.shape[-1]
    if c % 2:
        raise ValueError(f"a learned-variance output needs 2C channels, got {c}.")
    return output[..., : c // 2], output[..., c // 2:]


def check_num_bins(x0: np.ndarray, num_bins: int = 256, tolerance: float = 1e-3) -> None:
    """Raises ValueError unless x0 (host array in [-1, 1]) lies on the grid of num_bins levels:
    the discretised decoder's likelihood means nothing for other data."""
    x = np.asarray(x0, np.float64)
    levels = (x + 1.0) * (num_bins - 1) / 2.0
    if np.abs(levels - np.round(levels)).max() > tolerance or x.min() < -1 - 1e-6 or x.max() > 1 + 1e-6:
        raise ValueError(f"the data are not {num_bins}-level images in [-1, 1] (8-bit data scaled "
                         "to [-1, 1]); the discretised decoder likelihood needs such data.")
