"""Which timesteps a sampling chain visits, and the coefficients of each of its steps.

`timesteps` gives the project's own spacings; `Steps` states a chain explicitly: step k calls
the model at t[k] and moves x from t_from[k] (default t[k]) to s[k], s = -1 being the end at
`final_alpha_bar` (1: the data; a diffusers DDIM with set_alpha_to_one=False stops at
alphas_cumprod[0]); diffusion/diffusers_scheduler.py builds them as each diffusers scheduler
class visits its timesteps. `step_coefficients` turns them into the scalars a sampler's step
reads (samplers.py). A fractional t (diffusers' Euler on "linspace" spacing) is read between
timesteps (Schedule.at). Notation: DDPM / Improved DDPM (abar = alphas_cumprod).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.diffusion import flow
from t2i_jax.diffusion.schedules import Schedule

SPACINGS = ("trailing", "leading", "linspace")



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
             prediction: str = "eps", sampler: str = "ddim", shift: float = 1.0) -> Steps:
    """The project's own chain: the visited timesteps of `check_chain`, each step to the next
    visited one, the last to the data (PLMS: `plms_steps` of them; Heun: `heun_steps`). On a
    flow Schedule, the flow times flow.time_grid(num_steps, shift) at t = tau T - 1 (float32;
    `spacing` is a VP chain's)."""
    if schedule.process == "flow":
        return _flow_steps(schedule.num_timesteps, num_steps, shift, sampler)
    if shift != 1.0:
        raise ValueError("a time shift is flow matching's (diffusion.process='flow'); this is a "
                         "VP model: leave the shift at 1.")
    ts = check_chain(schedule, num_steps, spacing, prediction)
    if sampler == "pndm":
        return plms_steps(ts, np.append(ts[1:], -1))
    if sampler == "heun":
        return heun_steps(ts, np.append(ts[1:], -1).astype(np.int32))
    return Steps(ts, np.append(ts[1:], -1).astype(np.int32))


def _flow_steps(num_timesteps: int, num_steps: int, shift: float, sampler: str) -> Steps:
    if not shift > 0:
        raise ValueError(f"the flow time shift must be > 0 (1: none; SD3 uses 3.0), got {shift}.")
    if sampler == "pndm":
        raise ValueError("PLMS (--sampler pndm) is written for a VP model's discrete timesteps; "
                         "a flow model samples with euler, heun, ddim, dpmpp_2m, ddpm or euler_a.")
    tau = flow.time_grid(num_steps, shift)
    t = (tau * num_timesteps - 1.0).astype(np.float32)  # [N]
    s = np.append(t[1:], -1.0).astype(np.float32)
    return heun_steps(t, s) if sampler == "heun" else Steps(t, s)


def heun_steps(ts: np.ndarray, s: np.ndarray, final_alpha_bar: float = 1.0) -> Steps:
    """Heun's calls for steps ts[k] -> s[k] (Karras et al. 2022, Alg. 1): two per step, the
    model at ts[k] (Euler's predictor) then at s[k] (the corrector), both moving x from ts[k];
    the last step, to the data (s = -1), is Euler's alone: 2N - 1 calls."""
    ts, s = np.asarray(ts), np.asarray(s)
    inner = s[:-1] if s[-1] < 0 else s
    t = np.empty(len(ts) + len(inner), ts.dtype)
    t[0::2], t[1::2] = ts, inner
    starts = np.repeat(ts, 2)[:len(t)]
    to = np.repeat(s, 2)[:len(t)]
    return Steps(t, to.astype(ts.dtype), final_alpha_bar, 1.0, starts)


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
        raise ValueError("img2img starts a chain part-way, which the paired calls of PLMS's "
                         "warm-up and of Heun's steps do not allow: use --sampler ddim, "
                         "dpmpp_2m or euler.")
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
    low = -1 if schedule.process == "flow" else 0  # flow: t in (-1, T-1], tau in (0, 1]
    if np.any(t <= low - 1) or (low == 0 and np.any(t < 0)) or np.any(t_from >= T) \
            or np.any(t >= T) or np.any(s < -1) or np.any(s >= t_from):
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
    """step_coefficients at fractional timesteps (read between timesteps: Schedule.at; a flow
    Schedule's in closed form, where t in (-1, 0) is a time before its first timestep)."""
    last = s <= -1
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
