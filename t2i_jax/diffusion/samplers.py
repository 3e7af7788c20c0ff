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
  heun      Heun's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without churn),
            two model calls a step, in k-diffusion's sigma form or in the flow path's variables
            (`ode`; default the model's own: "flow" on a flow model, "sigma" on a VP one)

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

from t2i_jax.diffusion import forward, guidance, noise
from t2i_jax.diffusion.schedules import Schedule
from t2i_jax.diffusion.steps import (SPACINGS, StepCoefficients, Steps, check_chain,  # noqa: F401
                                     check_steps, plms_steps, step_coefficients, steps_of,
                                     timesteps, truncated)

DDPM_VARIANCES = ("posterior", "beta", "learned")
ODES = ("sigma", "flow")  # Heun's variables (ode_variables)

initial_noise = noise.initial_noise  # re-exported: x_T for sample(), drawn per sample index


class Options(NamedTuple):
    eta: jax.Array          # DDIM's eta (traced)
    ddpm_variance: str      # "posterior" (beta~_ts), "beta" (beta_ts) or "learned" (the model's)
    ode: str = "sigma"      # Heun's variables: "sigma" (k-diffusion's) or "flow" (the flow path's)


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


def ode_variables(alpha_bar, ode: str):
    """Returns (c, a, b) with c x_t = a x0 + b eps the ODE's state and b its time: k-diffusion's
    x / sqrt(abar) = x0 + sigma eps (c = 1 / sqrt(abar), a = 1, b = sigma), or the flow path's
    (1 - tau) x0 + tau eps (c = 1 / (sqrt(abar) + sqrt(1 - abar)), a = 1 - tau, b = tau).
    The two are one ODE; only the time differs: sigma = sqrt((1 - abar) / abar) is unbounded
    (the cosine schedule's sigma_max at t = T-1 is ~3e4, inf at zero SNR), tau lies in [0, 1]
    (tau = 1 at abar = 0)."""
    if ode == "flow":
        inv_n, tau = forward.flow_scale(alpha_bar)  # the flow path's variables, one definition
        return inv_n, 1.0 - tau, tau
    root, root_m = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
    return 1.0 / root, jnp.ones_like(root), root_m / root


def ode_of(schedule: Schedule, ode: Optional[str]) -> str:
    """Heun's variables: `ode` checked, or None for the model's own ("flow" on a flow model's
    schedule, else "sigma")."""
    if ode is None:
        return "flow" if schedule.process == "flow" else "sigma"
    if ode not in ODES:
        raise ValueError(f"unknown ode {ode!r} (Heun's variables); choose one of {ODES}, or None "
                         "for the model's own.")
    return ode


def heun_step(x_t, eps_hat, x0_hat, c, z, state, opts, v=None):
    """Returns Heun's step (Karras et al. 2022, Alg. 1 without churn) over calls paired by
    steps.heun_steps: call 2k (the model at t) takes Euler's step to s, which is DDIM's eta = 0
    update, and keeps y_t and the slope d; call 2k + 1 (the model at s, on that x) returns
    y_s = y_t + (b_s - b_t) (d + d') / 2, in the ODE's variables (ode_variables: k-diffusion's
    sigma form, d = eps_hat; the flow path's, d = eps_hat - x0_hat, rectified flow's u).
    The corrector's trapezoid multiplies the error of d' by (b_s - b_t) / 2: in the sigma form
    that is ~sigma_max / 2 = 1.5e4 on the cosine schedule's first step, in the flow form at most
    1 / 2, so opts.ode = "flow" is Heun for a VP model with a large sigma_max. (Euler's step is
    the same in both.)"""
    del z, v
    y_kept, d_kept, n = state
    _, a_t, b_t = ode_variables(c.alpha_bar_t, opts.ode)
    c_s, _, b_s = ode_variables(c.alpha_bar_s, opts.ode)
    d = eps_hat if opts.ode == "sigma" else eps_hat - x0_hat
    corrector = (n % 2) == 1
    euler = jnp.sqrt(c.alpha_bar_s) * x0_hat + jnp.sqrt(c.one_minus_alpha_bar_s) * eps_hat
    heun = (y_kept + (b_s - b_t) * 0.5 * (d_kept + d)) / c_s
    x_s = jnp.where(corrector, heun, euler)
    y_t = a_t * x0_hat + b_t * eps_hat  # the predictor's own y_t (x_t's, on the ODE)
    return x_s, (jnp.where(corrector, y_kept, y_t), jnp.where(corrector, d_kept, d), n + 1)


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
    "heun": Sampler(heun_step, lambda x: (jnp.zeros_like(x), jnp.zeros_like(x),
                                          jnp.zeros((), jnp.int32)), stochastic=False),
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
           sample_ids: Optional[jax.Array] = None, learn_sigma: bool = False,
           guidance_rule: Any = None, ode: Optional[str] = None) -> jax.Array:
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
    guidance_rule: how the two rows combine (diffusion/cfg.py's Rule: guidance rescale, a
      guidance interval, APG; its values may be traced); None is CFG's rule above.
    guidance_fn(x_t, t, cond) -> [B]: a differentiable log p(y | x_t) or similarity; adds
      eps -= sqrt(1 - abar_t) * classifier_scale * grad (ADM). classifier_scale is [] or [B].
    thresholding: None, "static", "dynamic" or a function x0 -> x0, applied to x0_hat each step
      (eps_hat is then recomputed from it).
    rng, sample_ids, ode: see `chain`.
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
        if guidance_rule is not None:
            raise ValueError("guidance_rule combines the conditional and null rows of "
                             "classifier-free guidance: pass null_cond too, or leave it out.")
    denoiser = guidance.model_denoiser(denoise_fn, schedule, prediction, cond, null_cond,
                                       guidance_weight, learn_sigma=learn_sigma,
                                       rule=guidance_rule)
    if guidance_fn is not None:
        denoiser = guidance.gradient_guided(denoiser, schedule, guidance_fn, classifier_scale, cond)
    denoiser = guidance.thresholded(denoiser, schedule, thresholding)
    return chain(denoiser, schedule, x_T, sampler=sampler, num_steps=num_steps, eta=eta, rng=rng,
                 prediction=prediction, spacing=spacing, ddpm_variance=ddpm_variance,
                 sample_ids=sample_ids, ode=ode)


def check_variance_output(ddpm_variance: str, rest) -> None:
    if ddpm_variance == "learned" and not rest:
        raise ValueError("ddpm_variance='learned' needs a model with a learned variance "
                         "(diffusion.learn_sigma=True, IDDPM); this one has a fixed variance: use "
                         "'posterior' (beta~) or 'beta'.")


def chain(denoiser: guidance.Denoiser, schedule: Schedule, x_T: jax.Array, *,
          sampler: str = "ddim", num_steps: int = 50, eta=0.0, rng: Optional[jax.Array] = None,
          prediction: str = "eps", spacing: str = "trailing", ddpm_variance: str = "posterior",
          sample_ids: Optional[jax.Array] = None, steps: Optional[Steps] = None,
          ode: Optional[str] = None) -> jax.Array:
    """The sampling chain: one lax.scan over the visited timesteps, each step one call of
    denoiser(x_t [B, ...], t int32 [B]) -> (eps_hat, x0_hat[, v]) (guidance.py's model_denoiser
    with any guides applied; v: a learned-variance model's output, read by ddpm_variance
    "learned"), then the sampler's update. Returns the final x0 estimate [B, ...].
    A guidance.Stateful denoiser (APG's momentum) has its state carried in the scan beside the
    sampler's, from its init_state(x_T); a plain one carries none.

    prediction: the model's, only to refuse a chain that cannot run (check_chain).
    steps: the (t, s) pairs, final abar and x_T scale of a chain that is not the project's own
      (a diffusers scheduler's, diffusion/diffusers_scheduler.py); num_steps and spacing are then
      unused.
    rng: key for the noise of ddpm and of ddim with eta != 0; sample i's noise at step k comes
      from fold_in(fold_in(fold_in(rng, STEP_NOISE), sample_ids[i]), k) (noise.py; default ids
      0..B-1), so it is the same in any batch and on any number of devices.
    ode: Heun's variables (ode_variables): "sigma" (k-diffusion's) or "flow" (the flow path's);
      None: the model's own ("flow" for schedule.process "flow", else "sigma"). Other samplers
      do not read it.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {tuple(SAMPLERS)}.")
    ode = ode_of(schedule, ode)
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
    # In the flow variables zero SNR is tau = 1, a finite start; in the sigma form, sigma = inf.
    if sampler == "heun" and ode == "sigma" and schedule.zero_terminal_snr \
            and np.any(np.asarray(steps.t) >= schedule.num_timesteps - 1):
        raise ValueError("Heun in k-diffusion's sigma form cannot start at zero SNR (sigma = "
                         "inf at t = T-1): use --ode_variables flow, --sampler euler, dpmpp_2m "
                         "or ddim, or --spacing leading.")
    ts = jnp.asarray(steps.t)
    coeffs = step_coefficients(schedule, jnp.asarray(steps.starts), jnp.asarray(steps.s),
                               steps.final_alpha_bar)
    if steps.x_T_scale != 1.0:
        x_T = (x_T * steps.x_T_scale).astype(x_T.dtype)
    opts = Options(eta=jnp.asarray(eta, x_T.dtype), ddpm_variance=ddpm_variance, ode=ode)
    keys = noise.per_sample_keys(rng, sample_ids, noise.STEP_NOISE) if noisy else None

    def body(carry, inputs):
        x, state, guide_state = carry
        i, t, c = inputs
        (eps_hat, x0_hat, *rest), new_guide_state = guidance.call(
            denoiser, x, jnp.full((batch,), t, ts.dtype), guide_state)
        check_variance_output(ddpm_variance, rest)
        z = noise.batch_normal(keys, x.shape[1:], x.dtype, step=i) if noisy else None  # [B, ...]
        x_s, new_state = spec.step(x, eps_hat, x0_hat, c, z, state, opts, *rest[:1])
        # Coefficients are float32; a bfloat16 / float16 chain keeps its own dtype.
        new_state, new_guide_state = (
            jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), new, old)
            for new, old in ((new_state, state), (new_guide_state, guide_state)))
        return (x_s.astype(x.dtype), new_state, new_guide_state), None

    carry = (x_T, spec.init_state(x_T), guidance.initial_state(denoiser, x_T))
    (x0, _, _), _ = jax.lax.scan(body, carry, (jnp.arange(ts.shape[0]), ts, coeffs))
    return x0
