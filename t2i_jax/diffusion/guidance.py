"""Guidance: classifier-free (Ho & Salimans 2022), gradient guidance (ADM, semantic/CLIP-style),
and thresholding of the predicted x0 (Imagen), as GUIDES: each takes the chain's denoiser and
returns a changed one, so they compose in any order a caller picks, and the sampling chain
(samplers.chain) knows none of them.

A denoiser is what the chain calls each step: (x_t [B, ...], t int32 [B]) -> (eps_hat, x0_hat),
or (eps_hat, x0_hat, v) for a learned-variance model (v: its variance output, IDDPM eq. 15),
which every guide passes on unchanged.
`model_denoiser` makes one from a network (with CFG's paired call when a null condition is
given, its two rows combined by a rule of diffusion/cfg.py: CFG, guidance rescale, a guidance
interval, APG); `gradient_guided` and `thresholded` change one. Scales are traced values: a
sweep over them reuses one compiled program.

A denoiser may carry state across the chain's steps (APG's momentum): it is then a `Stateful`,
whose init_state(x_T) gives the state (leaves [B, ...], one row per example) and whose
step(x_t, t, state) returns ((eps_hat, x0_hat[, v]), state); samplers.chain threads it through
its lax.scan (`initial_state`, `call`). A plain (x_t, t) function is a denoiser with no state, as
before. A guide written with `map_outputs` wraps either kind.

Guidance weight convention (the CFG paper's): eps~ = (1 + w) eps(x, y) - w eps(x, null).
w = 0 is plain conditional sampling, w = -1 unconditional. The "guidance scale" s of other
tools (GLIDE, diffusers' guidance_scale) is s = 1 + w: s = 7.5 there is w = 6.5 here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from t2i_jax.diffusion import cfg, forward
from t2i_jax.diffusion.cfg import cfg_combine, per_example  # noqa: F401  (their home was here)
from t2i_jax.diffusion.schedules import Schedule

ThresholdFn = Callable[[jax.Array], jax.Array]
Denoiser = Callable[[jax.Array, jax.Array], tuple]  # (x_t, t [B]) -> (eps_hat, x0_hat[, v])


def classifier_guidance(eps: jax.Array, x_t: jax.Array, t: jax.Array, cond,
                        log_prob_fn: Callable, scale, sqrt_one_minus_alpha_bar: jax.Array) -> jax.Array:
    """Returns eps - sqrt(1 - abar_t) * scale * grad_x log p(y | x_t) (Dhariwal & Nichol 2021, eq. 14).

    log_prob_fn(x_t [B, ...], t [B], cond) -> [B] is any differentiable function of the noisy
    image: a noisy classifier's log-probability of the class in `cond` (ADM), or a similarity
    sim(x_t, y) between a noisy-image encoder and a text/image embedding (semantic guidance).
    Each example's gradient is its own, since examples do not interact. scale (gamma) is [] or [B].
    """
    def total(x):
        log_p = log_prob_fn(x, t, cond)
        if log_p.shape != (x.shape[0],):
            raise ValueError(f"guidance_fn must return one value per example, shape [{x.shape[0]}]; "
                             f"got shape {log_p.shape}.")
        return jnp.sum(log_p.astype(jnp.float32))

    grad = jax.grad(total)(x_t).astype(eps.dtype)  # [B, ...]
    return eps - sqrt_one_minus_alpha_bar * per_example(scale, eps) * grad


def static_clip(x0: jax.Array, bound: float = 1.0) -> jax.Array:
    """Returns x0 clipped to [-bound, bound] (static thresholding, Imagen sec. 2.3)."""
    return jnp.clip(x0, -bound, bound)


def dynamic_threshold(x0: jax.Array, percentile: float = 0.995) -> jax.Array:
    """Returns clip(x0, -s, s) / s with s = max(1, quantile(|x0|, p)) per example (Imagen sec. 2.3)."""
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"the dynamic-thresholding percentile must be in (0, 1], got {percentile}.")
    flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0).astype(x0.dtype)  # [B]
    s = per_example(s, x0)
    return jnp.clip(x0, -s, s) / s


def resolve_thresholding(thresholding: Union[None, str, ThresholdFn]) -> Optional[ThresholdFn]:
    """Returns the x0 -> x0 function named by `thresholding`: None, "static", "dynamic" or a callable."""
    if thresholding is None or callable(thresholding):
        return thresholding
    named = {"static": static_clip, "dynamic": dynamic_threshold}
    if thresholding not in named:
        raise ValueError(f"unknown thresholding {thresholding!r}; use None, 'static', 'dynamic', or "
                         "a function x0 -> x0 such as functools.partial(dynamic_threshold, percentile=0.99).")
    return named[thresholding]


def _at(schedule: Schedule, name: str, t: jax.Array, x: jax.Array) -> jax.Array:
    """The schedule's field `name` at t [B], shaped [B, 1, ..., 1] against x (float32
    coefficients, like the samplers'; a fractional t reads between timesteps: Schedule.at)."""
    return schedule.at(name, t, x.ndim)


def like(b: jax.Array, a: jax.Array) -> jax.Array:
    """Returns b broadcast to a's shape and, under a mesh with explicit axes, to a's sharding."""
    b = jnp.broadcast_to(b, a.shape)
    sharding = jax.typeof(a).sharding
    if any(kind == jax.sharding.AxisType.Explicit for kind in sharding.mesh.axis_types):
        b = jax.sharding.reshard(b, sharding.spec)
    return b


def interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """Returns [a0, b0, a1, b1, ...] [2B, ...]: each sample's conditional and null rows sit side
    by side, so a batch sharded over devices stays sharded the same way, with no data movement."""
    return jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])


@dataclasses.dataclass(frozen=True)
class Stateful:
    """A denoiser that carries state across the chain's steps (APG's momentum): init_state(x_T
    [B, ...]) -> state (leaves [B, ...], one row per example), step(x_t, t, state) ->
    ((eps_hat, x0_hat[, v]), new state). samplers.chain threads the state; a guide wraps it
    with `map_outputs`."""
    init_state: Callable
    step: Callable

    def __call__(self, x, t):
        raise TypeError("this denoiser carries state across the chain's steps (APG's momentum): "
                        "run it with samplers.chain, which threads the state, or call "
                        ".step(x_t, t, state); a guide that wraps it must use "
                        "guidance.map_outputs.")


def initial_state(denoiser, x_T: jax.Array):
    """The state a denoiser carries from x_T [B, ...]: () for a plain (x_t, t) function."""
    return denoiser.init_state(x_T) if isinstance(denoiser, Stateful) else ()


def call(denoiser, x_t: jax.Array, t: jax.Array, state) -> tuple:
    """((eps_hat, x0_hat[, v]), new state) of one step of any denoiser."""
    if isinstance(denoiser, Stateful):
        return denoiser.step(x_t, t, state)
    return denoiser(x_t, t), state


def map_outputs(denoiser, fn: Callable):
    """The denoiser whose outputs are fn(x_t, t, (eps_hat, x0_hat[, v])): a guide that changes
    the outputs, written once for plain and Stateful denoisers (the state passes through)."""
    if isinstance(denoiser, Stateful):
        def step(x, t, state):
            out, state = denoiser.step(x, t, state)
            return fn(x, t, out), state
        return Stateful(denoiser.init_state, step)
    return lambda x, t: fn(x, t, denoiser(x, t))


def _check_channels(out: jax.Array, c: int, learn_sigma: bool) -> None:
    if out.shape[-1] != c * (2 if learn_sigma else 1):
        raise ValueError(f"the model outputs {out.shape[-1]} channels for {c}-channel x_t; "
                         + (f"a learned variance needs 2 x {c} (the prediction, then v): was "
                            "it trained with diffusion.learn_sigma?" if learn_sigma else
                            f"expected {c}; a 2 x {c} output holds a learned variance: pass "
                            "learn_sigma=True."))


def model_denoiser(denoise_fn: Callable, schedule: Schedule, prediction: str, cond: Any = None,
                   null_cond: Any = None, guidance_weight=0.0, learn_sigma: bool = False,
                   rule: Any = None) -> Denoiser:
    """The denoiser of a network denoise_fn(x_t [N, ...], t [N], cond) -> output predicting
    `prediction` (eps, x0, v or flow; a flow model reads forward.model_input). With null_cond
    (leaves with a leading axis B or 1), classifier-free guidance: ONE call on 2B rows (each
    sample's conditional and null rows side by side), combined by `rule` with w =
    guidance_weight ([] or [B]).
    rule: diffusion/cfg.py's Rule (None: Rule(), CFG's (1 + w) out(cond) - w out(null) on the
      model's output), with guidance rescale, a guidance interval or APG, or any object with
      its protocol; a stateful rule (APG's momentum) makes the denoiser a `Stateful`. Without
      null_cond there is nothing to combine and the rule is not used.
    learn_sigma: the output's last axis holds 2C channels, the prediction then the variance
    output v; the rule combines the predictions, and v is the conditional row's (GLIDE)."""
    forward.check_prediction(prediction)
    rule = cfg.Rule() if rule is None else rule
    if null_cond is not None:  # loop-invariant: paired once, reused at every step
        paired = jax.tree_util.tree_map(lambda c, n: interleave(c, like(n, c)), cond, null_cond)

    def step(x, t, state):
        c = x.shape[-1]  # the prediction's channels; a learned variance's v follows them
        alpha_bar = _at(schedule, "alphas_cumprod", t, x)
        x_in = forward.model_input(x, alpha_bar, prediction)  # a flow model's own point
        if null_cond is None:
            out = denoise_fn(x_in, t, cond)
            _check_channels(out, c, learn_sigma)
            eps_x0 = forward.eps_and_x0(out[..., :c].astype(x.dtype), x, alpha_bar, prediction)
        else:
            out = denoise_fn(interleave(x_in, x_in), jnp.repeat(t, 2), paired)
            _check_channels(out, c, learn_sigma)
            out = out.reshape((x.shape[0], 2) + out.shape[1:])       # [B, 2, ...]: cond, null
            rows = cfg.Rows(out[:, 0, ..., :c], out[:, 1, ..., :c], x, t, alpha_bar, prediction,
                            schedule)
            eps_x0, state = rule.combine(rows, guidance_weight, state)
            out = out[:, 0]  # a learned variance's v: the conditional row's
        return tuple(eps_x0) + ((out[..., c:],) if learn_sigma else ()), state

    if null_cond is not None and rule.stateful:
        return Stateful(rule.init_state, step)
    return lambda x, t: step(x, t, ())[0]


def gradient_guided(denoiser: Denoiser, schedule: Schedule, guidance_fn: Callable, scale=1.0,
                    cond: Any = None) -> Denoiser:
    """eps~ = eps - sqrt(1 - abar_t) * scale * grad_x guidance_fn(x_t, t, cond) (ADM eq. 14; SDG
    with a similarity as guidance_fn); x0_hat follows eps~. At zero SNR (abar = 0) x_t carries no
    information about the condition: x0_hat is the model's.

    x0_hat moves by the change of eps times d x0 / d eps = -sqrt(1 - abar) / sqrt(abar) (the same
    as recomputing it from eps~), so a zero scale returns (eps, x0) bit for bit whatever the
    compiler does."""
    def guided(x, t, outputs):
        eps, x0, *rest = outputs
        s1m = _at(schedule, "sqrt_one_minus_alphas_cumprod", t, x)
        guided_eps = classifier_guidance(eps, x, t, cond, guidance_fn, scale, s1m)
        abar = _at(schedule, "alphas_cumprod", t, x)
        slope = jnp.where(abar > 0, s1m / jnp.sqrt(jnp.where(abar > 0, abar, 1.0)), 0.0)
        return (guided_eps, jnp.where(abar > 0, x0 - slope * (guided_eps - eps), x0), *rest)
    return map_outputs(denoiser, guided)


def thresholded(denoiser: Denoiser, schedule: Schedule, thresholding) -> Denoiser:
    """x0_hat thresholded (None: the denoiser itself; "static", "dynamic" or a function x0 -> x0),
    eps_hat recomputed from it so the two stay consistent."""
    threshold_fn = resolve_thresholding(thresholding)
    if threshold_fn is None:
        return denoiser

    def clipped(x, t, outputs):
        _, x0, *rest = outputs
        x0 = threshold_fn(x0)
        return (forward.eps_from_x0(x, x0, _at(schedule, "alphas_cumprod", t, x)), x0, *rest)
    return map_outputs(denoiser, clipped)
