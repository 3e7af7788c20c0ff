"""Noise schedules: beta_t for t = 0..T-1 and every constant derived from it.

Everything is computed once, on the host, in float64 and stored as float32 arrays in a
`Schedule` pytree, so it can be passed into jitted code or closed over as a constant.
Notation follows DDPM (Ho et al. 2020) and Improved DDPM (Nichol & Dhariwal 2021):
alpha_t = 1 - beta_t, alphas_cumprod[t] = abar_t = prod_{s <= t} alpha_s.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SCHEDULE_KINDS = ("linear", "cosine", "sigmoid", "flow")

MAX_BETA = 0.999  # Improved DDPM clips betas here to avoid a singularity at t = T.


@struct.dataclass
class Schedule:
    """The discrete forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

    Every array field has shape [T] and dtype float32 (computed in float64). Index t runs
    over 0..T-1, with alphas_cumprod_prev[0] = 1 (x_{-1} is the data itself).
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_snr: jax.Array  # log(abar_t / (1 - abar_t)); -inf where abar_t = 0 (zero terminal SNR)
    posterior_variance: jax.Array  # beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    posterior_log_variance_clipped: jax.Array  # log beta~_t, with beta~_0 := beta~_1
    posterior_mean_coef1: jax.Array  # multiplies x_0
    posterior_mean_coef2: jax.Array  # multiplies x_t
    num_timesteps: int = struct.field(pytree_node=False)
    zero_terminal_snr: bool = struct.field(pytree_node=False)  # abar_{T-1} == 0 exactly
    # "flow": the linear path of flow matching (diffusion/flow.py), timestep t at flow time
    # tau = (t + 1) / T, read in closed form between timesteps; "vp": a beta schedule
    process: str = struct.field(pytree_node=False, default="vp")

    def time(self, t: jax.Array) -> jax.Array:
        """The chain's time in [0, 1] of timestep t (1: pure noise): flow's tau = (t + 1) / T,
        t / T for a VP schedule (the guidance interval's t)."""
        offset = 1.0 if self.process == "flow" else 0.0
        return (jnp.asarray(t, jnp.float32) + offset) / self.num_timesteps

    def at(self, name: str, t: jax.Array, ndim: int) -> jax.Array:
        """Returns field `name` gathered at t [B], reshaped to [B, 1, ..., 1] (ndim axes).

        A floating t may fall between timesteps (diffusers' Euler on "linspace" spacing calls
        the model at t = 799.2): then sigma = sqrt((1 - abar) / abar) is read linearly between
        the two neighbouring timesteps (diffusers' np.interp of its sigmas) and abar = 1 / (1 +
        sigma^2); only the fields of abar (alphas_cumprod, their square roots, log_snr) have
        such a reading."""
        t = jnp.asarray(t)
        if jnp.issubdtype(t.dtype, jnp.floating) and self.process == "flow":
            values = flow_field(name, (t + 1.0) / self.num_timesteps)
        elif jnp.issubdtype(t.dtype, jnp.floating):
            values = self._between(name, t)
        else:
            values = getattr(self, name)[t]  # [B]
        return values.reshape(values.shape + (1,) * (ndim - values.ndim))

    def _between(self, name: str, t: jax.Array) -> jax.Array:
        sigmas = jnp.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)   # [T]
        lo = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, self.num_timesteps - 1)
        hi = jnp.minimum(lo + 1, self.num_timesteps - 1)
        frac = (t - lo).astype(jnp.float32)
        sigma = (1.0 - frac) * sigmas[lo] + frac * sigmas[hi]
        # at whole t, the table itself (sigma's round trip would lose float32 digits)
        whole = frac == 0.0
        if name == "alphas_cumprod":
            return jnp.where(whole, self.alphas_cumprod[lo], 1.0 / (1.0 + jnp.square(sigma)))
        if name == "sqrt_alphas_cumprod":
            return jnp.where(whole, self.sqrt_alphas_cumprod[lo], jax.lax.rsqrt(1.0 + jnp.square(sigma)))
        if name == "sqrt_one_minus_alphas_cumprod":
            return jnp.where(whole, self.sqrt_one_minus_alphas_cumprod[lo],
                             sigma * jax.lax.rsqrt(1.0 + jnp.square(sigma)))
        if name == "log_snr":
            return jnp.where(whole, self.log_snr[lo], -2.0 * jnp.log(sigma))
        raise ValueError(f"the schedule's {name} has no value between timesteps (t = {t}); "
                         "only alphas_cumprod, its square roots and log_snr do.")


def flow_field(name: str, tau: jax.Array) -> jax.Array:
    """Field `name` of the flow path x = (1 - tau) x0 + tau eps seen as a VP process, at flow
    time tau [B] in [0, 1]: with n = sqrt((1 - tau)^2 + tau^2), x / n = sqrt(abar) x0 +
    sqrt(1 - abar) eps, sqrt(abar) = (1 - tau) / n, sqrt(1 - abar) = tau / n (closed form)."""
    tau = jnp.asarray(tau, jnp.float32)
    a, b = 1.0 - tau, tau
    n2 = jnp.square(a) + jnp.square(b)
    if name == "alphas_cumprod":
        return jnp.square(a) / n2
    if name == "sqrt_alphas_cumprod":
        return a * jax.lax.rsqrt(n2)
    if name == "sqrt_one_minus_alphas_cumprod":
        return b * jax.lax.rsqrt(n2)
    if name == "log_snr":
        return 2.0 * (jnp.log(a) - jnp.log(b))
    raise ValueError(f"the flow schedule's {name} has no value between timesteps; only "
                     "alphas_cumprod, its square roots and log_snr do.")


def flow_alpha_bar(tau: np.ndarray) -> np.ndarray:
    """abar(tau) = (1 - tau)^2 / ((1 - tau)^2 + tau^2) of the flow path (float64, NumPy)."""
    tau = np.asarray(tau, np.float64)
    return (1.0 - tau) ** 2 / ((1.0 - tau) ** 2 + tau ** 2)


def schedule_from_betas(betas: np.ndarray) -> Schedule:
    """Returns the Schedule of a beta sequence [T], deriving every constant in float64."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
    if not (np.all(betas > 0) and np.all(betas <= 1)):
        raise ValueError("betas must lie in (0, 1]; got min %g, max %g." % (betas.min(), betas.max()))
    if np.any(betas[:-1] >= 1):
        raise ValueError("only the last beta may equal 1 (zero terminal SNR).")
    num_timesteps = betas.shape[0]
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    one_minus = 1.0 - alphas_cumprod
    with np.errstate(divide="ignore"):
        log_snr = np.log(alphas_cumprod) - np.log(one_minus)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / one_minus
    # beta~_0 = 0; the log is clipped by repeating beta~_1 (Improved DDPM), when T > 1.
    clipped = np.append(posterior_variance[1], posterior_variance[1:]) if num_timesteps > 1 \
        else np.maximum(posterior_variance, betas)
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
    return Schedule(
        betas=f32(betas),
        alphas_cumprod=f32(alphas_cumprod),
        alphas_cumprod_prev=f32(alphas_cumprod_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(one_minus)),
        log_snr=f32(log_snr),
        posterior_variance=f32(posterior_variance),
        posterior_log_variance_clipped=f32(np.log(clipped)),
        posterior_mean_coef1=f32(betas * np.sqrt(alphas_cumprod_prev) / one_minus),
        posterior_mean_coef2=f32((1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / one_minus),
        num_timesteps=int(num_timesteps),
        zero_terminal_snr=bool(alphas_cumprod[-1] == 0.0),
    )


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[np.ndarray], np.ndarray],
                        max_beta: float = MAX_BETA) -> np.ndarray:
    """Returns betas [T] with beta_t = min(1 - abar((t+1)/T) / abar(t/T), max_beta) (IDDPM eq. 17)."""
    s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    a = alpha_bar(s)
    return np.minimum(1.0 - a[1:] / a[:-1], max_beta)


def linear_betas(num_timesteps: int) -> np.ndarray:
    """Returns DDPM's betas, 1e-4 to 0.02 at T = 1000, scaled by 1000 / T (IDDPM) for other T."""
    if num_timesteps <= 20:
        raise ValueError(f"the linear schedule needs T > 20 (its last beta is 20 / T), got {num_timesteps}; "
                         "for zero terminal SNR say so with zero_terminal_snr=True.")
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_alpha_bar(s: np.ndarray, offset: float = 0.008) -> np.ndarray:
    """Returns abar(s) = f(s) / f(0), f(s) = cos((s + offset) / (1 + offset) * pi / 2)^2 (IDDPM eq. 17)."""
    f = lambda u: np.cos((u + offset) / (1.0 + offset) * math.pi / 2) ** 2
    return f(s) / f(0.0)


def sigmoid_alpha_bar(s: np.ndarray, start: float = -3.0, end: float = 3.0,
                      tau: float = 1.0) -> np.ndarray:
    """Returns abar(s) of the sigmoid schedule (Chen 2023, "On the importance of noise
    scheduling", Algorithm 1; Jabri et al. 2023): 1 at s = 0, 0 at s = 1. Chen's clip_min is
    not applied: discretised through betas_for_alpha_bar, the last beta is capped at 0.999 instead."""
    sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))
    v_start, v_end = sigmoid(start / tau), sigmoid(end / tau)
    return (v_end - sigmoid((s * (end - start) + start) / tau)) / (v_end - v_start)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Returns betas whose abar_{T-1} is exactly 0, keeping sqrt(abar_0) (Lin et al. 2023, Alg. 1)."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab ** 2
    alphas = np.append(ab[0], ab[1:] / ab[:-1])
    return 1.0 - alphas


def make_schedule(kind: str, num_timesteps: int, *, zero_terminal_snr: bool = False,
                  **kwargs) -> Schedule:
    """Returns the Schedule named `kind` ("linear", "cosine", "sigmoid", or "flow": flow matching's
    linear path at tau = (t + 1) / T, t = 0..T-1) with T = num_timesteps.

    kwargs go to the schedule's alpha_bar function (cosine: offset; sigmoid: start, end, tau).
    zero_terminal_snr: rescale so that abar_{T-1} = 0 (Lin et al. 2023); use it with a v- or
    x0-predicting model, since x0 cannot be recovered from eps at zero SNR.
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of {SCHEDULE_KINDS}.")
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}.")
    if kind == "flow":
        if kwargs or zero_terminal_snr:
            raise ValueError("the flow schedule takes no options: its path reaches pure noise at "
                             "tau = 1 (zero terminal SNR) by construction.")
        tau = np.arange(1, num_timesteps + 1, dtype=np.float64) / num_timesteps
        abar = flow_alpha_bar(tau)
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        betas[-1] = 1.0
        return dataclasses.replace(schedule_from_betas(betas), process="flow")
    if kind == "linear":
        if kwargs:
            raise ValueError(f"the linear schedule takes no options, got {sorted(kwargs)}.")
        betas = linear_betas(num_timesteps)
    elif kind == "cosine":
        betas = betas_for_alpha_bar(num_timesteps, lambda s: cosine_alpha_bar(s, **kwargs))
    else:
        betas = betas_for_alpha_bar(num_timesteps, lambda s: sigmoid_alpha_bar(s, **kwargs))
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return schedule_from_betas(betas)
