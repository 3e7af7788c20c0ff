"""Classifier-free guidance's combination rules: how a sample's conditional and null rows become
one (eps_hat, x0_hat). guidance.model_denoiser calls the network ONCE on both rows and hands them
to a rule; the rules here are CFG and three methods that came after it, composable:

  CFG       out~ = (1 + w) out(x, y) - w out(x, null) (Ho & Salimans 2022, eq. 6) on the model's
            own output (eps, x0, v or flow's u); linear, so it is the same in any of them
  rescale   Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps Are Flawed",
            sec. 3.4, eqs. 15-17: x_rescaled = x_cfg std(x_pos) / std(x_cfg), x_final =
            phi x_rescaled + (1 - phi) x_cfg, on the MODEL'S PREDICTION (the paper's v, diffusers'
            rescale_noise_cfg on its eps or v): the CFG-combined output in the model's own space
  interval  Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
            Distribution Quality in Diffusion Models": guidance only where the chain's time
            schedule.time(t) lies in [lo, hi] (and/or sigma = sqrt((1 - abar) / abar) in the
            paper's (lo, hi]); the conditional prediction alone (w = 0) elsewhere
  APG       Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High Guidance Scales
            in Diffusion Models", Alg. 1, on the denoised prediction x0_hat: the update x0(y) -
            x0(null) with momentum, clipped to norm r, its part parallel to x0(y) weighted by eta;
            eps_hat recomputed from the guided x0_hat

Weights follow guidance.py's convention: w = s - 1 (w = 0 is conditional sampling); the papers'
scale is s = 1 + w. A `Rule` holds the methods after CFG: a field left None is off (a static
choice: another program), a given one's values are traced, [] or [B] each (a sweep over them
compiles once). Rule() is plain CFG, the very operations model_denoiser did before rules.

The rule protocol (any object may implement it): `stateful` (bool), `init_state(x_T)` -> the
state carried across the chain's steps (leaves [B, ...], one row per example, so sample i's
state never depends on its batch), and `combine(rows, w, state)` -> ((eps_hat, x0_hat), state).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.diffusion import forward
from t2i_jax.diffusion.schedules import Schedule

# APG's eta: 0, the paper's choice (Alg. 1's default, sec. 4: the parallel part is what
# oversaturates); eta = 1 keeps it, which with r = 0 and no momentum is CFG.
DEFAULT_APG_ETA = 0.0
NORM_EPS = 1e-12  # torch.nn.functional.normalize's floor of the norm (Alg. 1's `project`)


def per_example(value, x: jax.Array) -> jax.Array:
    """Returns a scalar or [B] value reshaped to broadcast against x [B, ...] as [B, 1, ..., 1]."""
    value = jnp.asarray(value, dtype=x.dtype)
    if value.ndim == 0:
        return value
    if value.ndim != 1 or value.shape[0] != x.shape[0]:
        raise ValueError(f"a per-example value must be a scalar or have shape [B] = [{x.shape[0]}], "
                         f"got shape {value.shape}.")
    return value.reshape(value.shape + (1,) * (x.ndim - 1))


def cfg_combine(out_cond: jax.Array, out_null: jax.Array, w) -> jax.Array:
    """Returns (1 + w) out_cond - w out_null (Ho & Salimans 2022, eq. 6); w is [] or [B].

    The combination is linear, so it gives the same eps whether the model predicts eps, x0 or v.
    """
    w = per_example(w, out_cond)
    return out_cond + w * (out_cond - out_null)


def _axes(x: jax.Array) -> tuple:
    return tuple(range(1, x.ndim))  # every non-batch axis


def rescale(x_cfg: jax.Array, x_pos: jax.Array, phi) -> jax.Array:
    """Returns phi x_cfg std(x_pos) / std(x_cfg) + (1 - phi) x_cfg [B, ...] (Lin et al. 2023,
    eqs. 15-17; std over every non-batch axis, per example, in float32). The population std:
    the paper's (torch's unbiased) differs by a factor that cancels in the ratio. A constant
    x_cfg (std 0) is left as it is."""
    std_pos = jnp.std(x_pos.astype(jnp.float32), axis=_axes(x_pos), keepdims=True)  # [B, 1, ...]
    std_cfg = jnp.std(x_cfg.astype(jnp.float32), axis=_axes(x_cfg), keepdims=True)
    ratio = jnp.where(std_cfg > 0, std_pos / jnp.where(std_cfg > 0, std_cfg, 1.0), 1.0)
    phi = per_example(phi, x_cfg)
    return phi * (x_cfg * ratio.astype(x_cfg.dtype)) + (1 - phi) * x_cfg


def _norm(x: jax.Array) -> jax.Array:
    """The L2 norm over every non-batch axis [B, 1, ..., 1] (float32)."""
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=_axes(x), keepdims=True))


class APG(NamedTuple):
    """APG's parameters (Sadat et al. 2024, Alg. 1), each [] or [B], traced."""
    eta: Any = DEFAULT_APG_ETA  # weight of the update's part parallel to x0(y) (1: CFG's)
    norm_threshold: Any = 0.0   # r: the update scaled to norm <= r; 0: no threshold
    momentum: Any = 0.0         # beta: running = diff + beta running (paper: < 0); 0: none


def apg(x0_cond: jax.Array, x0_null: jax.Array, w, running: jax.Array, params: APG) -> tuple:
    """Returns (x0_guided, running) [B, ...] each: Sadat et al. 2024, Alg. 1 on the denoised
    predictions, with our w = s - 1. diff = x0_cond - x0_null; momentum: running = diff + beta
    running, diff = running; diff *= min(1, r / ||diff||) (r > 0); update = orthogonal + eta
    parallel, the parts of diff against x0_cond / ||x0_cond||; x0_guided = x0_cond + w update.
    Norms over every non-batch axis, per example.

    The update is written diff - (1 - eta) parallel: at eta = 1 it IS diff, so with r = 0 and
    beta = 0 APG is x0_cond + w (x0_cond - x0_null), CFG on x0_hat, bit for bit."""
    eta, r, beta = (per_example(v, x0_cond) for v in params)
    diff = x0_cond - x0_null
    running = diff + beta * running          # the momentum buffer keeps the unclipped average
    norm = _norm(running)
    r32 = r.astype(jnp.float32)
    scale = jnp.where(r32 > 0, jnp.minimum(1.0, r32 / norm), 1.0)  # r / 0 = inf: min gives 1
    diff = running * scale.astype(running.dtype)
    unit = x0_cond / jnp.maximum(_norm(x0_cond), NORM_EPS).astype(x0_cond.dtype)
    parallel = jnp.sum(diff * unit, axis=_axes(diff), keepdims=True) * unit
    update = diff - (1 - eta) * parallel     # = orthogonal + eta parallel
    return x0_cond + per_example(w, x0_cond) * update, running


@dataclasses.dataclass(frozen=True)
class Rows:
    """What a combination rule reads at one step: both rows' outputs (the prediction channels,
    in the network's dtype) [B, ...], where they were evaluated (x_t [B, ...], t [B], abar
    [B, 1, ..., 1]), the model's prediction and the schedule."""
    cond: jax.Array
    null: jax.Array
    x_t: jax.Array
    t: jax.Array
    alpha_bar: jax.Array
    prediction: str
    schedule: Schedule

    def eps_and_x0(self, out: jax.Array) -> tuple:
        """(eps_hat, x0_hat) of an output in the model's prediction space."""
        return forward.eps_and_x0(out.astype(self.x_t.dtype), self.x_t, self.alpha_bar,
                                  self.prediction)


def in_interval(rows: Rows, interval=None, sigma_interval=None) -> Optional[jax.Array]:
    """Whether each example's step is guided [B, 1, ..., 1] (None: every step): the chain's time
    schedule.time(t) in [lo, hi], and sigma = sqrt((1 - abar) / abar) in (lo, hi] (the paper's
    bounds; sigma = inf at zero SNR lies above every finite hi)."""
    inside = None
    if interval is not None:
        lo, hi = (per_example(v, rows.t.astype(jnp.float32)) for v in interval)  # [B] or []
        time = rows.schedule.time(rows.t)                                       # [B]
        inside = (time >= lo) & (time <= hi)
    if sigma_interval is not None:
        lo, hi = (per_example(v, rows.t.astype(jnp.float32)) for v in sigma_interval)
        abar = rows.alpha_bar.reshape(rows.t.shape[:1]).astype(jnp.float32)
        sigma = jnp.sqrt((1.0 - abar) / abar)                                   # [B]; inf at 0
        on = (sigma > lo) & (sigma <= hi)
        inside = on if inside is None else inside & on
    return None if inside is None else inside.reshape(inside.shape + (1,) * (rows.x_t.ndim - 1))


class Rule(NamedTuple):
    """CFG and the methods after it (module docstring); None: off. A pytree: pass it to a jitted
    function as an argument and the values are traced, the None pattern static."""
    rescale: Any = None                 # phi in [0, 1] (Lin et al. 2023, eq. 16)
    interval: Any = None                # (lo, hi): schedule.time(t) in [lo, hi], 0 <= lo < hi <= 1
    sigma_interval: Any = None          # (lo, hi): sigma in (lo, hi] (Kynkaanniemi et al.)
    apg: Optional[APG] = None           # APG in place of CFG's linear rule

    @property
    def stateful(self) -> bool:
        return self.apg is not None

    def init_state(self, x_T: jax.Array):
        """APG's running average of the update: zeros [B, ...] (Alg. 1's MomentumBuffer); or ()."""
        return jnp.zeros_like(x_T) if self.apg is not None else ()

    def combine(self, rows: Rows, w, state) -> tuple:
        """((eps_hat, x0_hat), state) of one step. Outside the interval: the conditional row
        alone, and APG's momentum is not updated (diffusers' guiders do the same)."""
        inside = in_interval(rows, self.interval, self.sigma_interval)
        if self.apg is None:
            out = cfg_combine(rows.cond, rows.null, w)               # the model's own space
            if self.rescale is not None:
                out = rescale(out, rows.cond, self.rescale)
            if inside is not None:
                out = jnp.where(inside, out, rows.cond)
            return rows.eps_and_x0(out), state
        eps_c, x0_c = rows.eps_and_x0(rows.cond)
        _, x0_n = rows.eps_and_x0(rows.null)
        x0_g, running = apg(x0_c, x0_n, w, state, self.apg)
        eps_g = forward.eps_from_x0(rows.x_t, x0_g, rows.alpha_bar)  # the two agree
        if self.rescale is not None:  # on the guided prediction in the model's own space
            out = forward.prediction_target(x0_g, eps_g, rows.alpha_bar, rows.prediction)
            eps_g, x0_g = rows.eps_and_x0(rescale(out, rows.cond.astype(out.dtype),
                                                  self.rescale))
        if inside is not None:
            eps_g, x0_g = jnp.where(inside, eps_g, eps_c), jnp.where(inside, x0_g, x0_c)
            running = jnp.where(inside, running, state)
        return (eps_g, x0_g), running.astype(state.dtype)

    def check(self) -> None:
        """Refuses values no paper defines (ValueError naming the sample.py flag); traced values
        are not checked."""
        def known(v):
            try:
                return np.ravel(np.asarray(v, np.float64))
            except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
                return None
        phi = None if self.rescale is None else known(self.rescale)
        if phi is not None and not np.all((phi >= 0.0) & (phi <= 1.0)):  # NaN fails too
            raise ValueError(f"--guidance_rescale phi must be in [0, 1] (Lin et al.: 0.7; 0: plain "
                             f"CFG), got {self.rescale}.")
        for flag, bounds, top in (("--guidance_interval", self.interval, 1.0),
                                  ("--guidance_interval_sigma", self.sigma_interval, np.inf)):
            if bounds is None:
                continue
            if len(bounds) != 2:
                raise ValueError(f"{flag} takes two bounds, LO HI; got {bounds}.")
            lo, hi = known(bounds[0]), known(bounds[1])
            if lo is not None and hi is not None and not np.all(
                    (0.0 <= lo) & (lo < hi) & (hi <= top) & np.isfinite(hi)):
                raise ValueError(f"{flag} takes LO HI with 0 <= LO < HI"
                                 + (" <= 1 (the chain's time, 1: pure noise)" if top == 1.0
                                    else " (finite sigmas)") + f", got {list(bounds)}.")
        for name, v in ({} if self.apg is None else self.apg._asdict()).items():
            got = known(v)
            if got is not None and not np.all(np.isfinite(got)):
                raise ValueError(f"--apg_{name} must be a finite number, got {v}.")
            if got is not None and name == "norm_threshold" and np.any(got < 0):
                raise ValueError(f"--apg_norm_threshold must be >= 0 (0: no threshold), got {v}.")
