"""Samplers: one step function per method, all with one signature, driven by one lax.scan.

  ddpm      ancestral sampling of q(x_s | x_t, x0_hat) on any subset of timesteps, with the
            respaced beta_ts = 1 - abar_t / abar_s (DDPM Alg. 2; Improved DDPM sec. 4); the
            variance is beta~_ts, beta_ts, or a learned-variance model's
            exp(frac log beta_ts + (1 - frac) log beta~_ts) of the RESPACED betas (IDDPM eq. 15)
  ddim      x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,
            sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(beta_ts) (Song et al. 2021, eq. 12, 16)
  dpmpp_2m  DPM-Solver++(2M), multistep second order in data prediction (Lu et al. 2022, Alg. 2)
  euler     Euler's method on the probability-flow ODE in k-diffusion's sigma form, x / sqrt(abar)
            with sigma = sqrt((1 - abar) / abar) (Karras et al. 2022, Alg. 1 without churn;
            diffusers' EulerDiscreteScheduler): on the same steps it IS DDIM with eta = 0
  euler_a   k-diffusion's Euler ancestral: the step to sigma_down, then noise of sigma_up
            (diffusers' EulerAncestralDiscreteScheduler)
  pndm      PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models", eq. 12 with
            the DDIM transfer, eq. 11): a linear multistep method of order up to 4 on eps, its
            first step a Heun-like pair (the model called again at the step's end, the two eps
            averaged: diffusers' PNDMScheduler with skip_prk_steps, SD 1.x's default)

Here t is the timestep a step starts from and s the next (less noisy) visited one; after the
last visited timestep s is the data itself (abar_s = 1), so every sampler ends on x0_hat. A
`Steps` given to `chain` states the (t, s) pairs and the final abar explicitly instead, as a
diffusers scheduler visits them (diffusion/diffusers_scheduler.py: DDIM's s = t - T // S, the
last step to alphas_cumprod[0] with set_alpha_to_one=False).

`chain` is the loop and knows no guidance method: it calls a denoiser (x_t, t) -> (eps_hat,
x0_hat) that guidance.py's guides (CFG, gradient guidance, thresholding) have composed.
`sample` composes the common ones. Call them under jax.jit. The guidance weight, eta, guide
scales, rng and x_T are traced values: changing them does not recompile; num_steps, the sampler
and the functions do.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.diffusion import guidance, noise
from t2i_jax.diffusion.schedules import Schedule

SPACINGS = ("trailing", "leading", "linspace")
DDPM_VARIANCES = ("posterior", "beta", "learned")

initial_noise = noise.initial_noise  # re-exported: x_T for sample(), drawn per sample index


def timesteps(schedule: Schedule | int, num_steps: int, spacing: str = "trailing") -> np.ndarray:
    """Returns the num_steps decreasing int32 timesteps [num_steps] a sampler visits (NumPy).

    spacing (T = number of training timesteps, S = num_steps):
      "trailing" (default): round(T - i T / S) - 1 for i = 0..S-1; always starts at T-1, where x_T
                 ~ N(0, I) is closest to the forward marginal (Lin et al. 2023, table 2); S = T
                 visits every timestep.
      "leading":  i * (T // S), reversed (the DDIM paper's uniform subsequence; starts below T-1
                 unless S = T).
      "linspace": round(linspace(0, T-1, S)), reversed (ends at t = 0).
    """
    T = schedule.num_timesteps if isinstance(schedule, Schedule) else int(schedule)
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be an int in 1..T = 1..{T}, got {num_steps!r}.")
    if spacing == "trailing":
        ts = np.round(T - np.arange(num_steps) * (T / num_steps)).astype(np.int64) - 1
    elif spacing == "leading":
        ts = (np.arange(num_steps) * (T // num_steps))[::-1]
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, T - 1, num_steps)).astype(np.int64)[::-1]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}.")
    assert np.all(np.diff(ts) < 0) and ts[0] <= T - 1 and ts[-1] >= 0, ts
    return ts.astype(np.int32)  # host array: known at trace time, usable as a static value


class Steps(NamedTuple):
    """The steps of a chain: step k calls the model at t[k] and moves x_t to x_{s[k]}; s[k] = -1
    is past the last timestep, where abar = final_alpha_bar (1: the data; a diffusers DDIM with
    set_alpha_to_one=False stops at alphas_cumprod[0]). x_T_scale multiplies the unit noise the
    chain starts from (diffusers' Euler on "leading" spacing starts at sqrt(1 + sigma_max^2) in
    its sigma form: 1 here; on "linspace"/"trailing" at sigma_max: sqrt(1 - abar_T) here)."""
    t: np.ndarray                  # int32 [N] (float32 where a diffusers Euler visits
    s: np.ndarray                  # fractional timesteps: Schedule.at); s: -1 is the end
    final_alpha_bar: float = 1.0
    x_T_scale: float = 1.0
    t_from: Optional[np.ndarray] = None  # where step k moves x from, when it is not t[k] (PLMS's
                                         # second call: the model at t1, the step from t0)

    @property
    def starts(self) -> np.ndarray:
        """Where each step moves x from: t_from, or t."""
        return np.asarray(self.t if self.t_from is None else self.t_from)


def steps_of(schedule: Schedule, num_steps: int, spacing: str = "trailing",
             prediction: str = "eps", sampler: str = "ddim") -> Steps:
    """The project's own chain: the visited timesteps of `check_chain`, each step to the next
    visited one, the last to the data (PLMS: `plms_steps` of them)."""
    ts = check_chain(schedule, num_steps, spacing, prediction)
    if sampler == "pndm":
        return plms_steps(ts, np.append(ts[1:], -1))
    return Steps(ts, np.append(ts[1:], -1).astype(np.int32))


def plms_steps(ts: np.ndarray, s: np.ndarray, final_alpha_bar: float = 1.0,
               second: Optional[tuple] = None) -> Steps:
    """PLMS's calls for steps ts[k] -> s[k]: N + 1 model calls, the second at ts[1] redoing the
    first step (its eps averaged with the first's), then one per step. second: that redone
    step's (from, to), default (ts[0], s[0]); diffusers' PNDMScheduler takes (ts[1] + T // S,
    ts[1]), the same on "leading" spacing, not on the others."""
    ts, s = np.asarray(ts), np.asarray(s)
    if len(ts) == 1:
        return Steps(ts.astype(np.int32), s.astype(np.int32), final_alpha_bar)
    t_from, to = (ts[0], s[0]) if second is None else second
    t = np.concatenate([ts[:1], ts[1:2], ts[1:]])
    starts = np.concatenate([ts[:1], [t_from], ts[1:]])
    return Steps(t.astype(np.int32), np.concatenate([s[:1], [to], s[1:]]).astype(np.int32),
                 final_alpha_bar, 1.0, starts.astype(np.int32))


def truncated(steps: Steps, n: int) -> Steps:
    """The last n of the steps, started from a given x_t (img2img / SDEdit, Meng et al. 2022:
    the chain from t_0 = steps.t[-n] on an image noised to it; diffusers' img2img runs the last
    int(S * strength) of its S steps): no x_T scale, the start is not pure noise."""
    if steps.t_from is not None:
        raise ValueError("img2img starts a chain part-way, which PLMS's warm-up pair at its "
                         "first step does not allow: use --sampler ddim, dpmpp_2m or euler.")
    if not 1 <= n <= len(steps.t):
        raise ValueError(f"cannot keep {n} of {len(steps.t)} steps.")
    k = len(steps.t) - n
    return Steps(steps.t[k:], steps.s[k:], steps.final_alpha_bar, 1.0)


def check_steps(schedule: Schedule, steps: Steps, prediction: str = "eps") -> Steps:
    """steps, or ValueError for steps a chain cannot run (out of range, an eps model at zero SNR)."""
    t, s, t_from = np.asarray(steps.t), np.asarray(steps.s), steps.starts
    T = schedule.num_timesteps
    if t.ndim != 1 or t.shape != s.shape or t.shape != t_from.shape or t.size < 1:
        raise ValueError(f"steps.t, steps.s (and t_from) must be 1-D of one length, got "
                         f"{t.shape}, {s.shape}, {t_from.shape}.")
    if np.any(t < 0) or np.any(t_from >= T) or np.any(t >= T) or np.any(s < -1) \
            or np.any(s >= t_from):
        raise ValueError(f"every step must go from a timestep t in 0..{T - 1} to an earlier s "
                         f"(or -1, the end); got t={t.tolist()}, s={s.tolist()}.")
    if not 0.0 < steps.final_alpha_bar <= 1.0:
        raise ValueError(f"final_alpha_bar must be in (0, 1], got {steps.final_alpha_bar}.")
    if schedule.zero_terminal_snr and prediction == "eps" and np.any(t == T - 1):
        raise ValueError("the schedule has zero terminal SNR and the chain visits t = T-1, where x0 "
                         "cannot be recovered from eps: use a v- or x0-predicting model.")
    whole = np.all(t == np.round(t)) and np.all(s == np.round(s))
    dtype = np.int32 if whole else np.float32
    return Steps(t.astype(dtype), s.astype(dtype), float(steps.final_alpha_bar),
                 float(steps.x_T_scale),
                 None if steps.t_from is None else t_from.astype(dtype))


class StepCoefficients(NamedTuple):
    """Scalars of one step from timestep t to the next visited s (abar_s = 1 after the last)."""
    alpha_bar_t: jax.Array
    alpha_bar_s: jax.Array
    one_minus_alpha_bar_t: jax.Array  # 1 - abar_t, from the float64-derived sqrt(1 - abar)
    one_minus_alpha_bar_s: jax.Array
    beta_ts: jax.Array                # 1 - abar_t / abar_s, from the betas in (s, t]; betas[t] if s = t-1
    half_log_snr_t: jax.Array         # lambda_t = log(alpha_t / sigma_t); -inf at zero SNR
    half_log_snr_s: jax.Array         # +inf after the last step
    is_first: jax.Array
    is_last: jax.Array


def check_chain(schedule: Schedule, num_steps: int, spacing: str = "trailing",
                prediction: str = "eps") -> np.ndarray:
    """The visited timesteps, or ValueError for a chain that cannot run (a step count outside
    1..T, an eps model started at zero SNR); callers check it before writing anything."""
    ts = timesteps(schedule, num_steps, spacing)
    starts_at_zero_snr = schedule.zero_terminal_snr and ts[0] == schedule.num_timesteps - 1
    if starts_at_zero_snr and prediction == "eps":
        raise ValueError("the schedule has zero terminal SNR and sampling starts at t = T-1, where "
                         "x0 cannot be recovered from eps: use a v- or x0-predicting model "
                         "(prediction='v'), or spacing='leading'.")
    return ts


def step_coefficients(schedule: Schedule, ts: jax.Array, s: Optional[jax.Array] = None,
                      final_alpha_bar: float = 1.0) -> StepCoefficients:
    """Returns the StepCoefficients of every step from ts [N] to s [N] (default: the next entry
    of ts, the last step to the end), each [N]; at the end (s = -1) abar_s = final_alpha_bar."""
    n = ts.shape[0]
    s = jnp.append(ts[1:], -1) if s is None else jnp.asarray(s)  # [N]; -1 stands for the end
    if jnp.issubdtype(ts.dtype, jnp.floating):
        return _between_coefficients(schedule, ts, s, final_alpha_bar)
    last = s < 0
    s_idx = jnp.maximum(s, 0)
    final = float(final_alpha_bar)
    ab_t, ab_s = schedule.alphas_cumprod[ts], jnp.where(last, final, schedule.alphas_cumprod[s_idx])
    om_t = jnp.square(schedule.sqrt_one_minus_alphas_cumprod[ts])
    om_s = jnp.where(last, 1.0 - final, jnp.square(schedule.sqrt_one_minus_alphas_cumprod[s_idx]))
    # beta_ts = 1 - prod_{s < u <= t} (1 - beta_u) = -expm1(sum log1p(-beta_u)): no cancellation,
    # unlike 1 - abar_t / abar_s in float32 when the two are close (short strides near t = 0).
    u = jnp.arange(schedule.num_timesteps)
    in_window = (u[None, :] > s[:, None]) & (u[None, :] <= ts[:, None])  # [N, T]
    log_alpha_ts = jnp.sum(jnp.where(in_window, jnp.log1p(-schedule.betas)[None, :], 0.0), axis=1)
    beta_ts = jnp.where(s == ts - 1, schedule.betas[ts], -jnp.expm1(log_alpha_ts))  # exact at stride 1
    # to the end: 1 - abar_t / final (final = 1: om_t; final = abar_0: the window down to u = 1)
    beta_ts = jnp.where(last, om_t if final == 1.0 else 1.0 - ab_t / final, beta_ts)
    half_log_snr_end = np.inf if final == 1.0 else 0.5 * np.log(final / (1.0 - final))
    return StepCoefficients(
        alpha_bar_t=ab_t, alpha_bar_s=ab_s, one_minus_alpha_bar_t=om_t, one_minus_alpha_bar_s=om_s,
        beta_ts=beta_ts, half_log_snr_t=0.5 * schedule.log_snr[ts],
        half_log_snr_s=jnp.where(last, half_log_snr_end, 0.5 * schedule.log_snr[s_idx]),
        is_first=jnp.arange(n) == 0, is_last=last)


def _between_coefficients(schedule: Schedule, ts, s, final_alpha_bar: float) -> StepCoefficients:
    """step_coefficients at fractional timesteps (read between timesteps: Schedule.at)."""
    last = s < 0
    s_at = jnp.maximum(s, 0.0)
    ab = lambda t: schedule.at("alphas_cumprod", t, 1)  # noqa: E731
    om = lambda t: jnp.square(schedule.at("sqrt_one_minus_alphas_cumprod", t, 1))  # noqa: E731
    final = float(final_alpha_bar)
    ab_t, om_t = ab(ts), om(ts)
    ab_s = jnp.where(last, final, ab(s_at))
    om_s = jnp.where(last, 1.0 - final, om(s_at))
    half_log_snr_end = np.inf if final == 1.0 else 0.5 * np.log(final / (1.0 - final))
    return StepCoefficients(
        alpha_bar_t=ab_t, alpha_bar_s=ab_s, one_minus_alpha_bar_t=om_t, one_minus_alpha_bar_s=om_s,
        beta_ts=1.0 - ab_t / ab_s, half_log_snr_t=0.5 * schedule.at("log_snr", ts, 1),
        half_log_snr_s=jnp.where(last, half_log_snr_end, 0.5 * schedule.at("log_snr", s_at, 1)),
        is_first=jnp.arange(ts.shape[0]) == 0, is_last=last)


class Options(NamedTuple):
    eta: jax.Array          # DDIM's eta (traced)
    ddpm_variance: str      # "posterior" (beta~_ts), "beta" (beta_ts) or "learned" (the model's)


def learned_variance(c: StepCoefficients, v: jax.Array) -> jax.Array:
    """Returns exp(frac log beta_ts + (1 - frac) log beta~_ts) [B, ...], frac = (v + 1) / 2, with
    the RESPACED step's beta_ts and beta~_ts = beta_ts (1 - abar_s) / (1 - abar_t) (IDDPM sec. 4:
    a model trained on T steps sampled on a subset); 0 on the last step (to the data)."""
    from t2i_jax.diffusion import vlb
    beta_tilde = c.beta_ts * c.one_minus_alpha_bar_s / c.one_minus_alpha_bar_t
    log_beta = jnp.log(c.beta_ts)
    log_beta_tilde = jnp.log(jnp.where(c.is_last, c.beta_ts, beta_tilde))  # finite; unused there
    log_var = vlb.learned_log_variance(v.astype(jnp.float32), log_beta, log_beta_tilde)
    return jnp.where(c.is_last, 0.0, jnp.exp(log_var))


# Every step: (x_t, eps_hat, x0_hat, c: StepCoefficients, z, state, opts, v) -> (x_s, state),
# where z ~ N(0, I) [B, ...] is the step's noise (None for a sampler that draws none) and v the
# model's variance output [B, ...] (None for a fixed-variance model).

def ddpm_step(x_t, eps_hat, x0_hat, c, z, state, opts, v=None):
    """Returns a draw of q(x_s | x_t, x0_hat) with the respaced beta_ts (DDPM eqs. 6-7, Alg. 2)."""
    del eps_hat
    alpha_ts = 1.0 - c.beta_ts
    coef_x0 = c.beta_ts * jnp.sqrt(c.alpha_bar_s) / c.one_minus_alpha_bar_t
    coef_xt = c.one_minus_alpha_bar_s * jnp.sqrt(alpha_ts) / c.one_minus_alpha_bar_t
    if opts.ddpm_variance == "learned":
        var = learned_variance(c, v)
    elif opts.ddpm_variance == "posterior":
        var = c.beta_ts * c.one_minus_alpha_bar_s / c.one_minus_alpha_bar_t
    else:
        var = c.beta_ts
    var = jnp.where(c.is_last, 0.0, var)
    return coef_x0 * x0_hat + coef_xt * x_t + jnp.sqrt(var) * z, state


def ddim_step(x_t, eps_hat, x0_hat, c, z, state, opts, v=None):
    """Returns x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z (DDIM eq. 12);
    sigma^2 = eta^2 beta~_ts, or eta^2 times the learned variance (ddpm_variance="learned"),
    capped at 1 - abar_s: on a respaced chain the learned variance reaches beta_ts, which can
    exceed 1 - abar_s (more noise than q(x_s | x0) holds). With it, eta = 1 is the DDPM step
    only where v = -1 (sigma^2 = beta~); elsewhere DDIM's mean with the learned sigma
    (improved-diffusion's DDIM ignores the learned variance; this uses it where eta asks for noise)."""
    if opts.ddpm_variance == "learned":
        var = jnp.minimum(jnp.square(opts.eta) * learned_variance(c, v), c.one_minus_alpha_bar_s)
    else:
        var = jnp.square(opts.eta) * c.one_minus_alpha_bar_s / c.one_minus_alpha_bar_t * c.beta_ts
    dir_coef = jnp.sqrt(jnp.maximum(c.one_minus_alpha_bar_s - var, 0.0))
    x_s = jnp.sqrt(c.alpha_bar_s) * x0_hat + dir_coef * eps_hat
    if z is not None:
        x_s = x_s + jnp.sqrt(var) * z
    return x_s, state


def dpmpp_2m_step(x_t, eps_hat, x0_hat, c, z, state, opts, v=None):
    """Returns the DPM-Solver++(2M) update (Lu et al. 2022, Alg. 2); first order on the first
    and last steps (the last goes to abar_s = 1, where it returns x0_hat)."""
    del eps_hat, z, opts, v
    x0_prev, h_prev = state
    h = c.half_log_snr_s - c.half_log_snr_t  # > 0; +inf on the last step
    second = jnp.logical_not(c.is_first | c.is_last)
    r = jnp.where(second, h_prev / jnp.where(second, h, 1.0), 1.0)
    d = jnp.where(second, (1.0 + 0.5 / r) * x0_hat - (0.5 / r) * x0_prev, x0_hat)
    sigma_ratio = jnp.sqrt(c.one_minus_alpha_bar_s / c.one_minus_alpha_bar_t)
    x_s = sigma_ratio * x_t - jnp.sqrt(c.alpha_bar_s) * jnp.expm1(-h) * d
    return x_s, (x0_hat, h)


def _sigma(alpha_bar, one_minus_alpha_bar):
    """k-diffusion's sigma = sqrt((1 - abar) / abar) (0 at abar = 1)."""
    return jnp.sqrt(one_minus_alpha_bar / alpha_bar)


def euler_step(x_t, eps_hat, x0_hat, c, z, state, opts, v=None):
    """Returns Euler's step of the probability-flow ODE dx/dsigma = (x - x0_hat) / sigma = eps_hat
    in k-diffusion's variables x / sqrt(abar), sigma = sqrt((1 - abar) / abar) (Karras et al.
    2022, Alg. 1 without churn): x_s / sqrt(abar_s) = x_t / sqrt(abar_t) + (sigma_s - sigma_t)
    eps_hat. Since x_t / sqrt(abar_t) = x0_hat + sigma_t eps_hat, this is DDIM's eta = 0 update
    on the same (t, s), written here as sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_hat (no
    cancellation of two terms of size sigma_t); what makes diffusers' Euler differ from its DDIM
    is the steps it visits (diffusion/diffusers_scheduler.py)."""
    del x_t, z, opts, v
    return jnp.sqrt(c.alpha_bar_s) * x0_hat + jnp.sqrt(c.one_minus_alpha_bar_s) * eps_hat, state


def euler_ancestral_step(x_t, eps_hat, x0_hat, c, z, state, opts, v=None):
    """Returns k-diffusion's Euler ancestral step (sample_euler_ancestral, eta 1): Euler to
    sigma_down, then fresh noise of sigma_up, with sigma_up^2 = sigma_s^2 (sigma_t^2 - sigma_s^2)
    / sigma_t^2 and sigma_down^2 = sigma_s^2 - sigma_up^2 (sigma = sqrt((1 - abar) / abar)):
    x_s = sqrt(abar_s) (x0_hat + sigma_down eps_hat + sigma_up z); none on the last step to the data."""
    del x_t, opts, v
    # sqrt(abar_s) sigma_s = sqrt(1 - abar_s); sigma_up / sigma_s = sqrt(1 - sigma_s^2 / sigma_t^2)
    ratio = (c.one_minus_alpha_bar_s * c.alpha_bar_t) / (c.alpha_bar_s * c.one_minus_alpha_bar_t)
    up = jnp.sqrt(c.one_minus_alpha_bar_s) * jnp.sqrt(jnp.clip(1.0 - ratio, 0.0, 1.0))
    down = jnp.sqrt(jnp.maximum(c.one_minus_alpha_bar_s - jnp.square(up), 0.0))
    return jnp.sqrt(c.alpha_bar_s) * x0_hat + down * eps_hat + up * z, state


def plms_step(x_t, eps_hat, x0_hat, c, z, state, opts, v=None):
    """Returns PLMS's update (PNDM eqs. 11-12; diffusers' PNDMScheduler.step_plms): call n = 0
    steps with e0 and keeps x_t; call 1 (the model at the first step's end) redoes that step
    from the kept x_t with (e1 + e0) / 2; then Adams-Bashforth of order 2, 3, 4 over the eps of
    the calls (call 1's excepted), newest first e, e1, e2, e3: (3 e - e1) / 2,
    (23 e - 16 e1 + 5 e2) / 12, (55 e - 59 e1 + 37 e2 - 9 e3) / 24. The transfer is DDIM's
    (eta 0) with that eps."""
    del x0_hat, z, opts, v
    ets, n, kept = state   # ets[0] the newest eps kept
    new = jnp.where(n != 1, jnp.concatenate([eps_hat[None], ets[:-1]]), ets)
    e = jnp.where(n == 0, eps_hat,
        jnp.where(n == 1, 0.5 * (eps_hat + ets[0]),
        jnp.where(n == 2, 1.5 * new[0] - 0.5 * new[1],
        jnp.where(n == 3, (23.0 * new[0] - 16.0 * new[1] + 5.0 * new[2]) / 12.0,
                  (55.0 * new[0] - 59.0 * new[1] + 37.0 * new[2] - 9.0 * new[3]) / 24.0))))
    x = jnp.where(n == 1, kept, x_t)
    x0 = (x - jnp.sqrt(c.one_minus_alpha_bar_t) * e) / jnp.sqrt(c.alpha_bar_t)
    x_s = jnp.sqrt(c.alpha_bar_s) * x0 + jnp.sqrt(c.one_minus_alpha_bar_s) * e
    return x_s, (new, n + 1, jnp.where(n == 0, x_t, kept))


class Sampler(NamedTuple):
    step: Callable
    init_state: Callable[[jax.Array], Any]
    stochastic: bool  # whether its step draws noise


SAMPLERS = {
    "ddpm": Sampler(ddpm_step, lambda x: (), stochastic=True),
    "ddim": Sampler(ddim_step, lambda x: (), stochastic=True),
    "dpmpp_2m": Sampler(dpmpp_2m_step, lambda x: (jnp.zeros_like(x), jnp.ones((), x.dtype)),
                        stochastic=False),
    "euler": Sampler(euler_step, lambda x: (), stochastic=False),
    "euler_a": Sampler(euler_ancestral_step, lambda x: (), stochastic=True),
    "pndm": Sampler(plms_step, lambda x: (jnp.zeros((4,) + x.shape, x.dtype),
                                          jnp.zeros((), jnp.int32), jnp.zeros_like(x)),
                    stochastic=False),
}


def _static_value(x) -> Optional[np.ndarray]:
    """Returns x as a numpy array if it is known at trace time, else None."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_batch(tree, batch: int, name: str, allow_one: bool = False) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = jnp.shape(leaf)
        if not shape or (shape[0] != batch and not (allow_one and shape[0] == 1)):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} has shape {shape}, but every leaf of {name} "
                f"needs a leading batch axis of size {batch} (the batch of x_T)"
                + (" or 1" if allow_one else "") + ".")


def sample(denoise_fn: Callable, schedule: Schedule, x_T: jax.Array, *, cond: Any = None,
           null_cond: Any = None, guidance_weight=0.0, sampler: str = "ddim", num_steps: int = 50,
           eta=0.0, rng: Optional[jax.Array] = None, thresholding=None,
           guidance_fn: Optional[Callable] = None, classifier_scale=1.0,
           prediction: str = "eps", spacing: str = "trailing", ddpm_variance: str = "posterior",
           sample_ids: Optional[jax.Array] = None, learn_sigma: bool = False) -> jax.Array:
    """Returns the final x0 estimate [B, ...] of a reverse diffusion from x_T [B, ...]: the
    common guides composed (guidance.py: the network with CFG, then gradient guidance, then
    thresholding) and checked, then `chain`. Other compositions call `chain` themselves.

    denoise_fn(x_t [N, ...], t int32 [N], cond) -> output [N, ...]: any function (a network or an
      exact formula); its output predicts `prediction` ("eps", "x0" or "v"); with learn_sigma,
      it has 2C channels: the prediction, then the variance output v (IDDPM eq. 15).
    cond, null_cond: pytrees whose leaves have a leading batch axis B (null_cond: B or 1). With
      null_cond given, each step makes ONE denoise_fn call on 2B rows (each sample's conditional
      and null rows side by side) and combines (1 + w) out(cond) - w out(null), w =
      guidance_weight ([] or [B]; w = 0 is conditional sampling; "scale" s = 1 + w).
    guidance_fn(x_t, t, cond) -> [B]: a differentiable log p(y | x_t) or similarity; adds
      eps -= sqrt(1 - abar_t) * classifier_scale * grad (ADM). classifier_scale is [] or [B].
    thresholding: None, "static", "dynamic" or a function x0 -> x0, applied to x0_hat each step
      (eps_hat is then recomputed from it).
    rng, sample_ids: see `chain`.
    """
    if x_T.ndim < 1:
        raise ValueError(f"x_T must have a leading batch axis, got shape {x_T.shape}.")
    batch = x_T.shape[0]
    _check_batch(cond, batch, "cond")
    if null_cond is not None:
        if cond is None:
            raise ValueError("null_cond was given without cond; pass the condition to guide with.")
        if jax.tree_util.tree_structure(null_cond) != jax.tree_util.tree_structure(cond):
            raise ValueError("null_cond must have the same pytree structure as cond.")
        _check_batch(null_cond, batch, "null_cond", allow_one=True)
    else:
        w_static = _static_value(guidance_weight)
        if w_static is None or np.any(w_static != 0):
            raise ValueError("guidance_weight needs null_cond: pass the null condition (the empty "
                             "prompt or the learned null embedding) to use classifier-free guidance.")
    denoiser = guidance.model_denoiser(denoise_fn, schedule, prediction, cond, null_cond,
                                       guidance_weight, learn_sigma=learn_sigma)
    if guidance_fn is not None:
        denoiser = guidance.gradient_guided(denoiser, schedule, guidance_fn, classifier_scale, cond)
    denoiser = guidance.thresholded(denoiser, schedule, thresholding)
    return chain(denoiser, schedule, x_T, sampler=sampler, num_steps=num_steps, eta=eta, rng=rng,
                 prediction=prediction, spacing=spacing, ddpm_variance=ddpm_variance,
                 sample_ids=sample_ids)


def check_variance_output(ddpm_variance: str, rest) -> None:
    if ddpm_variance == "learned" and not rest:
        raise ValueError("ddpm_variance='learned' needs a model with a learned variance "
                         "(diffusion.learn_sigma=True, IDDPM); this one has a fixed variance: use "
                         "'posterior' (beta~) or 'beta'.")


def chain(denoiser: guidance.Denoiser, schedule: Schedule, x_T: jax.Array, *,
          sampler: str = "ddim", num_steps: int = 50, eta=0.0, rng: Optional[jax.Array] = None,
          prediction: str = "eps", spacing: str = "trailing", ddpm_variance: str = "posterior",
          sample_ids: Optional[jax.Array] = None, steps: Optional[Steps] = None) -> jax.Array:
    """The sampling chain: one lax.scan over the visited timesteps, each step one call of
    denoiser(x_t [B, ...], t int32 [B]) -> (eps_hat, x0_hat[, v]) (guidance.py's model_denoiser
    with any guides applied; v: a learned-variance model's output, read by ddpm_variance
    "learned"), then the sampler's update. Returns the final x0 estimate [B, ...].

    prediction: the model's, only to refuse a chain that cannot run (check_chain).
    steps: the (t, s) pairs, final abar and x_T scale of a chain that is not the project's own
      (a diffusers scheduler's, diffusion/diffusers_scheduler.py); num_steps and spacing are then
      unused.
    rng: key for the noise of ddpm and of ddim with eta != 0; sample i's noise at step k comes
      from fold_in(fold_in(fold_in(rng, STEP_NOISE), sample_ids[i]), k) (noise.py; default ids
      0..B-1), so it is the same in any batch and on any number of devices.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {tuple(SAMPLERS)}.")
    if ddpm_variance not in DDPM_VARIANCES:
        raise ValueError(f"unknown ddpm_variance {ddpm_variance!r}; choose one of {DDPM_VARIANCES}.")
    if x_T.ndim < 1:
        raise ValueError(f"x_T must have a leading batch axis, got shape {x_T.shape}.")
    batch = x_T.shape[0]
    eta_static = _static_value(eta)
    if eta_static is not None and np.any(eta_static < 0):
        raise ValueError(f"eta must be >= 0 (0 is deterministic DDIM, 1 is DDPM-like), got {eta_static}.")
    if sample_ids is None:
        sample_ids = jnp.arange(batch)
    elif jnp.shape(sample_ids) != (batch,):
        raise ValueError(f"sample_ids must have shape [B] = [{batch}], got {jnp.shape(sample_ids)}.")

    spec = SAMPLERS[sampler]
    noisy = spec.stochastic and not (sampler == "ddim" and eta_static is not None
                                     and np.all(eta_static == 0))
    if noisy and rng is None:
        raise ValueError(f"sampler {sampler!r}" + (" with eta != 0" if sampler == "ddim" else "")
                         + " draws noise: pass rng=jax.random.key(seed).")
    steps = steps_of(schedule, num_steps, spacing, prediction, sampler) if steps is None \
        else check_steps(schedule, steps, prediction)
    ts = jnp.asarray(steps.t)
    coeffs = step_coefficients(schedule, jnp.asarray(steps.starts), jnp.asarray(steps.s),
                               steps.final_alpha_bar)
    if steps.x_T_scale != 1.0:
        x_T = (x_T * steps.x_T_scale).astype(x_T.dtype)
    opts = Options(eta=jnp.asarray(eta, x_T.dtype), ddpm_variance=ddpm_variance)
    keys = noise.per_sample_keys(rng, sample_ids, noise.STEP_NOISE) if noisy else None

    def body(carry, inputs):
        x, state = carry
        i, t, c = inputs
        eps_hat, x0_hat, *rest = denoiser(x, jnp.full((batch,), t, ts.dtype))
        check_variance_output(ddpm_variance, rest)
        z = noise.batch_normal(keys, x.shape[1:], x.dtype, step=i) if noisy else None  # [B, ...]
        x_s, new_state = spec.step(x, eps_hat, x0_hat, c, z, state, opts, *rest[:1])
        # Coefficients are float32; a bfloat16 / float16 chain keeps its own dtype.
        new_state = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), new_state, state)
        return (x_s.astype(x.dtype), new_state), None

    (x0, _), _ = jax.lax.scan(body, (x_T, spec.init_state(x_T)),
                              (jnp.arange(ts.shape[0]), ts, coeffs))
    return x0
