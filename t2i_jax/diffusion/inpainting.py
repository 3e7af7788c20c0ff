"""Inpainting: regenerate the unknown region of an image and keep the known one.

Two methods, both on any sampler's chain (mask = 1 where known, 0 where regenerated):
  RePaint (Lugmayr et al. 2022, Alg. 1), for ANY trained model: before each reverse step from t,
    the known region of x_t is replaced by q_sample(known, t); optionally, every `jump_length`
    steps the chain jumps back up (re-noised through q(x_t | x_s), beta_ts of each step) and
    redoes those steps, `jumps` more times ("resampling", for harmony between the regions).
  GLIDE (Nichol et al. 2022, sec. 4): a model whose input is [x_t, known * mask, mask]
    (models/unet.py, model.inpaint) and whose x0_hat is overwritten with the known pixels at every
    step (`known_region`), so the known region comes out exact.
Training masks for GLIDE's model (`random_masks`): random boxes and free-form strokes, drawn
inside the jitted step.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.diffusion import forward, guidance, noise, samplers
from t2i_jax.diffusion.schedules import Schedule

METHODS = ("repaint", "glide")


def box_mask(height: int, width: int, box) -> np.ndarray:
    """Returns the float32 mask [H, W, 1] that regenerates the pixel box (x0, y0, x1, y1), x1 and
    y1 exclusive (0 inside, 1 = known elsewhere)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"--mask_box {x0},{y0},{x1},{y1} is not a box inside the {width}x{height} "
                         "image: need 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height (x1, y1 "
                         "exclusive).")
    mask = np.ones((height, width, 1), np.float32)
    mask[y0:y1, x0:x1] = 0.0
    return mask


def random_masks(key: jax.Array, n: int, height: int, width: int) -> jax.Array:
    """Returns n training masks [n, H, W, 1] (1 = known): each a random box (half the rows) or
    free-form strokes (the other half). A box regenerates 1/16 to 9/16 of the image; strokes
    from a few percent up to about 60% (measured on 16x16 and 32x32).

    Box: sides uniform in [H/4, 3H/4], anywhere inside. Strokes: 2-4 thick segments between
    uniform points, thickness uniform in [H/16, H/6] (GLIDE erases random regions; free-form
    strokes follow the inpainting literature's irregular masks)."""
    k_kind, k_box, k_stroke = jax.random.split(key, 3)
    ys = jnp.arange(height, dtype=jnp.float32)[:, None] + 0.5
    xs = jnp.arange(width, dtype=jnp.float32)[None, :] + 0.5

    def box(k):
        kh, kw, ky, kx = jax.random.split(k, 4)
        h = jax.random.randint(kh, (), height // 4, 3 * height // 4 + 1)
        w = jax.random.randint(kw, (), width // 4, 3 * width // 4 + 1)
        y0 = jax.random.randint(ky, (), 0, height - h + 1)
        x0 = jax.random.randint(kx, (), 0, width - w + 1)
        inside = (ys >= y0) & (ys < y0 + h) & (xs >= x0) & (xs < x0 + w)
        return ~inside

    def strokes(k):
        kn, kp, kr = jax.random.split(k, 3)
        count = jax.random.randint(kn, (), 2, 5)
        pts = jax.random.uniform(kp, (4, 2, 2)) * jnp.asarray([height, width], jnp.float32)
        radius = jax.random.uniform(kr, (4,), minval=height / 16, maxval=height / 6)
        a, b = pts[:, 0], pts[:, 1]                                          # [4, 2] (y, x)
        d = b - a
        py, px = ys[None] - a[:, 0, None, None], xs[None] - a[:, 1, None, None]
        u = jnp.clip((py * d[:, 0, None, None] + px * d[:, 1, None, None])
                     / jnp.maximum(jnp.sum(d * d, -1), 1e-6)[:, None, None], 0.0, 1.0)
        dist2 = (jnp.square(py - u * d[:, 0, None, None]) + jnp.square(px - u * d[:, 1, None, None]))
        hit = (dist2 <= jnp.square(radius)[:, None, None]) & (jnp.arange(4) < count)[:, None, None]
        return ~jnp.any(hit, axis=0)

    use_box = jax.random.bernoulli(k_kind, 0.5, (n,))
    boxes = jax.vmap(box)(jax.random.split(k_box, n))
    free = jax.vmap(strokes)(jax.random.split(k_stroke, n))
    known = jnp.where(use_box[:, None, None], boxes, free)
    return known[..., None].astype(jnp.float32)  # [n, H, W, 1]


def known_region(denoiser: guidance.Denoiser, schedule: Schedule, known: jax.Array,
                 mask: jax.Array) -> guidance.Denoiser:
    """GLIDE's sampling: x0_hat <- mask * known + (1 - mask) * x0_hat at every step, eps_hat
    recomputed from it (so the chain's last x0_hat equals the known pixels exactly)."""
    def overwritten(x, t):
        _, x0, *rest = denoiser(x, t)
        x0 = mask * known + (1.0 - mask) * x0
        abar = guidance._at(schedule, "alphas_cumprod", t, x)
        return (forward.eps_from_x0(x, x0, abar), x0, *rest)
    return overwritten


def repaint_transitions(num_steps: int, jumps: int, jump_length: int) -> tuple:
    """Returns (kind [M], step [M]) int32 host arrays, RePaint's order of transitions over the
    visited steps 0..N-1 (N = num_steps): kind 0 = reverse step k (ts[k] -> ts[k+1], or the data
    after the last), kind 1 = forward step k (ts[k+1] -> ts[k], re-noising). At the jump points
    the chain goes back up jump_length (L) steps and down again, `jumps` times: as the reference
    code's get_schedule_jump (andreas128/RePaint), wherever r - 1 is a multiple of L, r = the
    reverse steps left, once at least L are done; the last point leaves one step, so the chain
    is resampled down to x_1. jumps = 0: N reverse steps, plain replacement."""
    if jumps < 0 or jump_length < 1:
        raise ValueError(f"--repaint_jumps must be >= 0 and --repaint_jump_length >= 1, got "
                         f"{jumps} and {jump_length}.")
    kind, step = [], []
    for k in range(num_steps):
        kind.append(0)
        step.append(k)
        done = k + 1
        left = num_steps - done
        if jumps and done >= jump_length and left >= 1 and (left - 1) % jump_length == 0:
            back = list(range(done - 1, done - 1 - jump_length, -1))  # forward through these
            for _ in range(jumps):
                kind += [1] * jump_length
                step += back
                kind += [0] * jump_length
                step += back[::-1]
    return np.asarray(kind, np.int32), np.asarray(step, np.int32)


def latent_mask(mask: jax.Array, factor: int) -> jax.Array:
    """A pixel mask [B, H, W, 1] (1 = known) at the latents' resolution [B, H/f, W/f, 1]: a
    latent is known only where every pixel it covers is (a min-pool over f x f blocks), so no
    pixel to regenerate is held fixed by RePaint in latent space."""
    b, h, w, c = mask.shape
    if h % factor or w % factor:
        raise ValueError(f"a {h}x{w} mask does not divide into {factor}x{factor} latent cells.")
    blocks = mask.reshape(b, h // factor, factor, w // factor, factor, c)
    return jnp.min(blocks, axis=(2, 4))


def repaint_chain(denoiser: guidance.Denoiser, schedule: Schedule, x_T: jax.Array,
                  known: jax.Array, mask: jax.Array, *, rng: jax.Array, sampler: str = "ddpm",
                  num_steps: int = 50, eta=0.0, prediction: str = "eps",
                  spacing: str = "trailing", ddpm_variance: str = "posterior",
                  sample_ids: Optional[jax.Array] = None, jumps: int = 0,
                  jump_length: int = 10, paste_known: bool = True,
                  steps: Optional[samplers.Steps] = None, ode: Optional[str] = None) -> jax.Array:
    """Returns x0 [B, ...] of RePaint (Lugmayr et al. 2022, Alg. 1) on `sampler`'s chain: one
    lax.scan over repaint_transitions. known [B, ...] in [-1, 1]; mask [B, ..., 1] (1 = known).

    Sample i's noise (the sampler's, the re-noising's, and that of q_sample(known, t)) comes
    from its sample id and the transition's index, as in samplers.chain: the same on any
    batch or device count. With jumps = 0 and the sampler's own noise, the unknown region is
    the chain of samplers.chain with the known region replaced before each step.

    paste_known: Alg. 1's last line, x_0 = m * x0_known + (1 - m) * x_0_unknown, with
    q(x_0 | x0) = x0 (alpha_bar_0 := 1 in the paper's indexing): the known pixels come out
    exactly. False returns the chain's own last x (its known region is the model's x0_hat from
    x_t whose known pixels were q_sample(known, t_last)), to test the steps themselves."""
    if sampler not in samplers.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {tuple(samplers.SAMPLERS)}.")
    spec = samplers.SAMPLERS[sampler]
    if jumps and not spec.stochastic:
        raise ValueError(f"RePaint's jumps re-noise the chain, which the multistep sampler "
                         f"{sampler!r} cannot resume from; use --sampler ddpm or ddim, or "
                         "--repaint_jumps 0.")
    batch = x_T.shape[0]
    sample_ids = jnp.arange(batch) if sample_ids is None else sample_ids
    steps = samplers.steps_of(schedule, num_steps, spacing, prediction, sampler) if steps is None \
        else samplers.check_steps(schedule, steps, prediction)  # a diffusers scheduler's (t, s)
    ts = jnp.asarray(steps.t)
    coeffs = samplers.step_coefficients(schedule, jnp.asarray(steps.starts), jnp.asarray(steps.s),
                                        steps.final_alpha_bar)
    x_T = (x_T * steps.x_T_scale).astype(x_T.dtype)
    kind, step = repaint_transitions(len(steps.t), jumps, jump_length)
    opts = samplers.Options(eta=jnp.asarray(eta, x_T.dtype), ddpm_variance=ddpm_variance,
                            ode=samplers.ode_of(schedule, ode))
    step_keys = noise.per_sample_keys(rng, sample_ids, noise.STEP_NOISE)
    known_keys = noise.per_sample_keys(rng, sample_ids, noise.KNOWN_NOISE)
    mask = jnp.broadcast_to(mask, x_T.shape[:-1] + (1,)).astype(x_T.dtype)
    take = lambda tree, k: jax.tree_util.tree_map(lambda a: a[k], tree)  # noqa: E731

    def reverse(x, state, n, k):
        t = ts[k]
        dtype = x.dtype  # q_sample's coefficients are float32: a bf16 chain stays bf16
        t_b = jnp.full((batch,), t, jnp.int32)
        eps_known = noise.batch_normal(known_keys, x.shape[1:], x.dtype, step=n)
        x = (mask * forward.q_sample(schedule, known, t_b, eps_known)
             + (1.0 - mask) * x).astype(dtype)
        eps_hat, x0_hat, *rest = denoiser(x, t_b)
        samplers.check_variance_output(ddpm_variance, rest)
        z = noise.batch_normal(step_keys, x.shape[1:], x.dtype, step=n)
        x_s, new_state = spec.step(x, eps_hat, x0_hat, take(coeffs, k), z, state, opts, *rest[:1])
        new_state = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), new_state, state)
        return x_s.astype(dtype), new_state

    def forward_step(x, state, n, k):
        beta = take(coeffs, k).beta_ts
        z = noise.batch_normal(step_keys, x.shape[1:], x.dtype, step=n)
        return (jnp.sqrt(1.0 - beta) * x + jnp.sqrt(beta) * z).astype(x.dtype), state

    def body(carry, inputs):
        x, state = carry
        n, kd, k = inputs
        return jax.lax.cond(kd == 0, reverse, forward_step, x, state, n, k), None

    (x0, _), _ = jax.lax.scan(body, (x_T, spec.init_state(x_T)),
                              (jnp.arange(len(kind)), jnp.asarray(kind), jnp.asarray(step)))
    if paste_known:
        x0 = (mask * known.astype(x0.dtype) + (1.0 - mask) * x0).astype(x0.dtype)
    return x0
