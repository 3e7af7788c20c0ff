"""Noise-conditioning augmentation of a super-resolution stage's low-resolution input
(Ho et al. 2021, Cascaded Diffusion Models, sec. 4.2; Saharia et al. 2022, Imagen, sec. 2.5).

The low-resolution image z is corrupted with the forward process at an augmentation level
s in [0, 1), and s is given to the model:

    z_s = sqrt(abar(s)) z + sqrt(1 - abar(s)) n,   n ~ N(0, I)

abar(s) is the continuous cosine schedule (Nichol & Dhariwal 2021, eq. 17) evaluated at s:
abar(s) = f(s) / f(0), f(s) = cos^2(((s + 0.008) / 1.008) pi / 2). So abar(0) = 1 exactly (level
0 hands the model the clean image, bit for bit) and abar decreases to 0 at s = 1 (pure noise).
It is its own schedule, continuous, not the SR model's discrete one: the SR model's t = 0
already has abar_0 < 1, and a level must exist between any two timesteps.
Training draws s ~ U[0, max_level) per example; sampling uses one fixed level (Imagen: 0.1-0.3).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

COSINE_S = 0.008


def _f(s):
    return jnp.cos((s + COSINE_S) / (1.0 + COSINE_S) * (math.pi / 2)) ** 2


def alpha_bar(level: jax.Array) -> jax.Array:
    """Returns abar(s) of augmentation levels s [B] (float32; 1 at s = 0, 0 at s = 1)."""
    s = jnp.asarray(level, jnp.float32)
    abar = jnp.clip(_f(s) / _f(jnp.zeros((), jnp.float32)), 0.0, 1.0)
    return jnp.where(s == 0.0, 1.0, abar)  # exactly 1: level 0 is the clean image


def noise_augment(z: jax.Array, level: jax.Array, noise: jax.Array) -> jax.Array:
    """Returns z_s = sqrt(abar(s)) z + sqrt(1 - abar(s)) noise [B, h, w, C] for levels s [B]."""
    if level.shape != z.shape[:1]:
        raise ValueError(f"one augmentation level per image: level has shape {level.shape}, the "
                         f"images {z.shape}.")
    abar = alpha_bar(level).reshape((-1,) + (1,) * (z.ndim - 1))
    return jnp.sqrt(abar) * z + jnp.sqrt(1.0 - abar) * noise


def check_level(level, name: str = "the augmentation level") -> float:
    """level as a float, or ValueError unless 0 <= level < 1."""
    try:
        value = float(level)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise ValueError(f"{name} must be in [0, 1) (0: the clean low-resolution image; Imagen "
                         f"samples at 0.1-0.3), got {level}.")
    return value


def downsample(x: jax.Array, size: int) -> jax.Array:
    """Returns the box-filter (area) downsample of x [B, H, W, C] to [B, size, size, C]: the mean
    of each (H / size) x (W / size) block, the resize an anti-aliased render at `size` matches."""
    b, h, w, c = x.shape
    if h % size or w % size:
        raise ValueError(f"a {h}x{w} image cannot be box-downsampled to {size}x{size}: the size "
                         "must divide the image size.")
    fh, fw = h // size, w // size
    return x.reshape(b, size, fh, size, fw, c).mean(axis=(2, 4))


def upsample(z: jax.Array, size: int) -> jax.Array:
    """Returns z [B, h, w, C] resized up to [B, size, size, C] (bilinear): the conditioning path
    of an SR stage, concatenated with x_t on the channel axis."""
    b, h, w, c = z.shape
    if (h, w) == (size, size):
        return z
    return jax.image.resize(z, (b, size, size, c), method="bilinear")
