"""The pieces diffusers' UNet2DConditionModel and AutoencoderKL share, ported to Flax (models/
unet2d_condition.py, models/autoencoder_kl.py): reading a model folder's config.json and refusing
what a port does not implement; GroupNorm, ResnetBlock2D, Downsample2D, Upsample2D, Attention and
the sinusoidal timestep embedding as diffusers computes them (NHWC); and the parameter-map
entries of their publisher names (torch's OIHW convolutions and [out, in] Linears transposed at
load, norms' weight -> scale).
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax import files
from t2i_jax.models.layers import ATTENTION_IMPLS, attention
from t2i_jax.models.weights import ParamMap, jax_dtype

ACTIVATIONS = ("silu", "swish")  # the same function in diffusers' get_activation

# ---- reading a diffusers folder ----

def read_config(directory: str) -> dict:
    """config.json of a diffusers model folder (unet/, vae/); ValueError naming what is missing."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{directory} has no config.json: point at a diffusers model folder "
                         "(a pipeline's unet/ or vae/ subfolder: config.json + "
                         "diffusion_pytorch_model[.fp16].safetensors).")
    return files.read_json(path)


def check_blocks(cfg) -> None:
    """ValueError for a port config whose channels do not split into its norm groups, or whose
    dtype or attention implementation is unknown (the checks both ports share)."""
    for c in cfg.block_out_channels:
        if c % cfg.norm_num_groups:
            raise ValueError(f"block_out_channels {c} is not divisible by norm_num_groups "
                             f"{cfg.norm_num_groups}.")
    jax_dtype(cfg.dtype)
    if cfg.attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {cfg.attention_impl!r}: one of {ATTENTION_IMPLS}.")


def check_fields(model: str, config: dict, known: frozenset) -> None:
    """ValueError naming config fields the port does not know ("_"-prefixed ones are metadata)."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"{model} config has fields {unknown} this port does not know (from a "
                         "newer diffusers?): it cannot tell whether they change the network.")


def refuse(model: str, field: str, value, supports: str):
    raise ValueError(f"{model} config field {field}={value!r} is not supported: the port "
                     f"implements {supports}.")


# ---- layers shared with the autoencoder ----

class GroupNorm(nn.Module):
    """torch's GroupNorm over the channels (last axis) of x [B, ..., C], in float32: two-pass
    variance, and each mean taken one axis at a time (sums of at most a row's length), so a
    64 x 64 x 2-channel group is normalised to ~5e-7 of float64 where one flat float32 sum
    (flax's GroupNorm) is ~4e-6 off."""
    num_groups: int
    epsilon: float

    @nn.compact
    def __call__(self, x):
        c, g = x.shape[-1], self.num_groups
        xg = x.astype(jnp.float32).reshape(x.shape[:-1] + (g, c // g))  # [B, ..., G, C/G]

        def mean(a):
            a = jnp.mean(a, axis=-1, keepdims=True)
            for axis in range(x.ndim - 2, 0, -1):
                a = jnp.mean(a, axis=axis, keepdims=True)
            return a  # [B, 1.., G, 1]

        d = xg - mean(xg)
        y = (d * jax.lax.rsqrt(mean(d * d) + self.epsilon)).reshape(x.shape)
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return y * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def group_norm(groups: int, eps: float, name: str):
    """GroupNorm(groups, eps) in float32; its `scale` is torch's weight."""
    return GroupNorm(groups, eps, name=name)


def conv(features: int, k: int, dtype, name: str, stride: int = 1, pad: Optional[int] = None):
    p = (k - 1) // 2 if pad is None else pad
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=((p, p), (p, p)),
                   dtype=dtype, name=name)


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool, freq_shift: float):
    """diffusers' get_timestep_embedding [B, dim] (float32) of timesteps t [B], int or fractional:
    exp(-log(10000) * arange(dim/2) / (dim/2 - freq_shift)) frequencies; [sin, cos], or
    [cos, sin] with flip_sin_to_cos."""
    half = dim // 2
    exponent = np.float32(-math.log(10000)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - freq_shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)  # host constants, rounded once
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * freqs[None]  # [B, half]
    parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(parts, axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))  # [B, dim]


def upsample_nearest(x, size=None):
    """torch's F.interpolate(mode="nearest") of x [B, H, W, C] to size (h, w), default 2x."""
    b, h, w, c = x.shape
    hh, ww = size or (2 * h, 2 * w)
    if (hh, ww) == (2 * h, 2 * w):
        return jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c)).reshape(b, hh, ww, c)
    rows = np.minimum(np.floor(np.arange(hh) * (h / hh)).astype(np.int32), h - 1)
    cols = np.minimum(np.floor(np.arange(ww) * (w / ww)).astype(np.int32), w - 1)
    return x[:, rows][:, :, cols]


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D (time_embedding_norm "default"): returns
    (shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))) / scale."""
    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.silu(group_norm(self.groups, self.eps, "norm1")(x)).astype(self.dtype)
        h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
        if temb is not None:
            h = h + nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(
                nn.silu(temb))[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, "norm2")(h)).astype(self.dtype)
        h = conv(self.out_channels, 3, self.dtype, "conv2")(h)  # dropout: identity at inference
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x.astype(self.dtype))
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv: padding 1 (the UNet), or with padding 0 diffusers' asymmetric
    (0, 1) pad of the right and bottom (the VAE encoder)."""
    channels: int
    padding: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.channels, 3, self.dtype, "conv", stride=2, pad=self.padding)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour to `size` (default 2x), then a 3x3 conv."""
    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, size=None):
        return conv(self.channels, 3, self.dtype, "conv")(upsample_nearest(x, size))


class Attention(nn.Module):
    """diffusers' Attention (AttnProcessor2_0): to_out.0(softmax(q k^T / sqrt(head_dim)) v) from
    x [B, L, C] (or [B, H, W, C], flattened) to context [B, Lk, Dc] (x itself when None).
    groups: a GroupNorm before the projections (the VAE's mid block); residual and
    rescale_output_factor as diffusers' residual_connection / rescale_output_factor."""
    heads: int
    head_dim: int
    out_dim: int
    qkv_bias: bool = False
    upcast: bool = False
    groups: Optional[int] = None
    eps: float = 1e-6
    residual: bool = False
    rescale_output_factor: float = 1.0
    impl: str = "einsum"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        shape, residual = x.shape, x
        if self.groups is not None:
            x = group_norm(self.groups, self.eps, "group_norm")(x).astype(self.dtype)
        x = x.reshape(shape[0], -1, shape[-1])  # [B, L, C]
        ctx = x if context is None else context
        inner, (b, l), lk = self.heads * self.head_dim, x.shape[:2], ctx.shape[1]

        def project(name, a, length):
            y = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name=name)(a)
            y = y.reshape(b, length, self.heads, self.head_dim)
            return y.astype(jnp.float32) if self.upcast else y

        q, k, v = project("to_q", x, l), project("to_k", ctx, lk), project("to_v", ctx, lk)
        o = attention(q, k, v, None, self.impl).astype(self.dtype).reshape(b, l, inner)
        o = nn.Dense(self.out_dim, dtype=self.dtype, name="to_out_0")(o).reshape(shape)
        if self.residual:
            o = o + residual
        return o / self.rescale_output_factor


# ---- the publisher's names ----

def conv_map(fx: str, hf: str, cout: int, cin: int, k: int, aliases=()) -> ParamMap:
    return {f"{fx}/kernel": ((f"{hf}.weight",) + tuple(f"{a}.weight" for a in aliases),
                             (cout, cin, k, k), "conv"),
            f"{fx}/bias": ((f"{hf}.bias",) + tuple(f"{a}.bias" for a in aliases), (cout,), "none")}


def dense_map(fx: str, hf: str, cout: int, cin: int, bias: bool = True, aliases=()) -> ParamMap:
    out = {f"{fx}/kernel": ((f"{hf}.weight",) + tuple(f"{a}.weight" for a in aliases),
                            (cout, cin), "transpose")}
    if bias:
        out[f"{fx}/bias"] = ((f"{hf}.bias",) + tuple(f"{a}.bias" for a in aliases), (cout,), "none")
    return out


def norm_map(fx: str, hf: str, c: int) -> ParamMap:
    return {f"{fx}/scale": ((f"{hf}.weight",), (c,), "none"),
            f"{fx}/bias": ((f"{hf}.bias",), (c,), "none")}


def resnet_map(fx: str, hf: str, cin: int, cout: int, temb: Optional[int]) -> ParamMap:
    pmap = {**norm_map(f"{fx}/norm1", f"{hf}.norm1", cin),
            **conv_map(f"{fx}/conv1", f"{hf}.conv1", cout, cin, 3),
            **norm_map(f"{fx}/norm2", f"{hf}.norm2", cout),
            **conv_map(f"{fx}/conv2", f"{hf}.conv2", cout, cout, 3)}
    if temb is not None:
        pmap.update(dense_map(f"{fx}/time_emb_proj", f"{hf}.time_emb_proj", cout, temb))
    if cin != cout:
        pmap.update(conv_map(f"{fx}/conv_shortcut", f"{hf}.conv_shortcut", cout, cin, 1))
    return pmap
