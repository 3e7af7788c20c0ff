"""Guidance: classifier-free (Ho & Salimans 2022), gradient guidance (ADM, semantic/CLIP-style),
and thresholding of the predicted x0 (Imagen).

Guidance weight convention (the CFG paper's): eps~ = (1 + w) eps(x, y) - w eps(x, null).
w = 0 is plain conditional sampling, w = -1 unconditional. The "guidance scale" s of other
tools (GLIDE, diffusers' guidance_scale) is s = 1 + w: s = 7.5 there is w = 6.5 here.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

ThresholdFn = Callable[[jax.Array], jax.Array]


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
