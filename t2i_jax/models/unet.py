"""The conditional UNet of ADM / GLIDE / Imagen / Stable Diffusion, in flax.linen (NHWC).

eps_hat = UNet(x_t, t, context=text tokens [B, L, Dc], context_mask [B, L], pooled [B, Dp],
label [B], low_res [B, h, w, C], aug_level [B], embedding [B, E]). Time enters every ResBlock by scale-shift (FiLM); the pooled text embedding (GLIDE)
a CLIP image embedding (unCLIP) and a class-label embedding (one extra row for the
null label) add to the time embedding; text
tokens enter by cross-attention in the SpatialTransformers. A super-resolution stage's
low-resolution image is resized up to x_t's size and concatenated with it on the channel axis,
and its noise-augmentation level is embedded like t and added to the time embedding (Imagen,
CDM). The output convolution is
zero-initialised, so eps_hat is exactly 0 at initialisation.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax.diffusion import augmentation
from t2i_jax.models.layers import (ATTENTION_IMPLS, Downsample, Embed, GroupNorm, ResBlock, SpatialTransformer,
                                   Upsample, heads_and_width, timestep_embedding, zeros_init)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The UNet's shape. Built from a ConfigDict by `UNetConfig(**config.model.unet)`."""
    out_channels: int = 3             # 2x for a learned-variance output (later): nothing assumes 3
    channels: int = 64                # base width; level i has channels * channel_mult[i]
    channel_mult: Tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_levels: Tuple[int, ...] = (1, 2)  # levels with self- and cross-attention
    mid_attention: bool = True
    num_heads: Optional[int] = 8      # heads by number ...
    head_dim: Optional[int] = None    # ... or by width (wins when set)
    num_groups: int = 32
    dropout: float = 0.0
    num_classes: Optional[int] = None  # class-conditional: labels 0..n-1, n is the null label
    attention_impl: str = "einsum"    # "einsum" or "dot_product" (cuDNN-fused on GPUs)
    dtype: str = "float32"            # computation dtype; parameters stay float32
    remat: bool = False               # rematerialise blocks: less memory, more compute

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; choose one of {ATTENTION_IMPLS}.")
        bad = [lv for lv in self.attention_levels if not 0 <= lv < len(self.channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} are not levels of channel_mult {self.channel_mult}.")
        for lv in set(self.attention_levels) | ({len(self.channel_mult) - 1} if self.mid_attention else set()):
            heads_and_width(self.channels * self.channel_mult[lv], self.num_heads, self.head_dim)
        for m in self.channel_mult:
            if (self.channels * m) % self.num_groups:
                raise ValueError(f"{self.channels * m} channels are not divisible into {self.num_groups} groups.")
        jnp.dtype(self.dtype)  # raises on an unknown dtype name

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


def _blocks(cfg: UNetConfig):
    """Returns the ResBlock and SpatialTransformer classes, rematerialised if configured."""
    if cfg.remat:
        return nn.remat(ResBlock, static_argnums=(3,)), nn.remat(SpatialTransformer)
    return ResBlock, SpatialTransformer


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of t followed by a 2-layer MLP (ADM): [B] -> [B, 4 * channels]."""
    channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t):
        emb = timestep_embedding(t, self.channels)
        emb = nn.Dense(4 * self.channels, dtype=self.dtype)(emb)
        return nn.Dense(4 * self.channels, dtype=self.dtype)(nn.silu(emb))


class Encoder(nn.Module):
    """The UNet's input convolution, down path and middle block: returns (h, skips)."""
    cfg: UNetConfig

    @nn.compact
    def __call__(self, x, emb, context=None, context_mask=None, deterministic=True):
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        Res, Attn = _blocks(cfg)
        attn = lambda name: Attn(cfg.num_heads, cfg.head_dim, cfg.num_groups, cfg.attention_impl, dtype,
                                 name=name)
        h = nn.Conv(cfg.channels, (3, 3), padding="SAME", dtype=dtype, name="conv_in")(x.astype(dtype))
        skips = [h]
        for level, mult in enumerate(cfg.channel_mult):
            for i in range(cfg.num_res_blocks):
                h = Res(cfg.channels * mult, cfg.dropout, cfg.num_groups, dtype,
                        name=f"down{level}_res{i}")(h, emb, deterministic)
                if level in cfg.attention_levels:
                    h = attn(f"down{level}_attn{i}")(h, context, context_mask)
                skips.append(h)
            if level != len(cfg.channel_mult) - 1:
                h = Downsample(dtype, name=f"down{level}_downsample")(h)
                skips.append(h)
        width = cfg.channels * cfg.channel_mult[-1]
        h = Res(width, cfg.dropout, cfg.num_groups, dtype, name="mid_res0")(h, emb, deterministic)
        if cfg.mid_attention:
            h = attn("mid_attn")(h, context, context_mask)
        h = Res(width, cfg.dropout, cfg.num_groups, dtype, name="mid_res1")(h, emb, deterministic)
        return h, skips


class UNet(nn.Module):
    """Returns eps_hat [B, H, W, out_channels] (float32) for x_t [B, H, W, C] and t [B]."""
    cfg: UNetConfig

    @nn.compact
    def __call__(self, x, t, context=None, context_mask=None, pooled=None, label=None,
                 deterministic: bool = True, low_res=None, aug_level=None, embedding=None,
                 known=None, known_mask=None):
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        levels = len(cfg.channel_mult)
        if x.shape[1] % 2 ** (levels - 1) or x.shape[2] % 2 ** (levels - 1):
            raise ValueError(f"image size {x.shape[1:3]} must be divisible by 2^{levels - 1} for "
                             f"{levels} levels.")
        emb = TimeEmbedding(cfg.channels, dtype, name="time_embed")(t)  # [B, 4 * channels]
        if pooled is not None:  # GLIDE: the pooled text feature joins the time embedding
            emb = emb + nn.Dense(emb.shape[-1], dtype=dtype, name="pooled_proj")(pooled.astype(dtype))
        if embedding is not None:  # unCLIP: the CLIP image embedding joins the time embedding
            emb = emb + nn.Dense(emb.shape[-1], dtype=dtype, name="embedding_proj")(embedding.astype(dtype))
        if cfg.num_classes is not None:
            if label is None:
                raise ValueError("this UNet is class-conditional (num_classes is set): pass label [B].")
            emb = emb + Embed(cfg.num_classes + 1, emb.shape[-1], dtype, name="label_embed")(label)
        if aug_level is not None:  # the level s in [0, 1) on the timestep scale 0..1000
            emb = emb + TimeEmbedding(cfg.channels, dtype, name="aug_embed")(aug_level * 1000.0)
        if low_res is not None:
            x = jnp.concatenate([x, augmentation.upsample(low_res, x.shape[1]).astype(x.dtype)], -1)
        if known is not None:  # GLIDE's inpainting input: [x_t, known * mask, mask]
            m = known_mask.astype(x.dtype)
            x = jnp.concatenate([x, known.astype(x.dtype) * m, m], -1)
        h, skips = Encoder(cfg, name="encoder")(x, emb, context, context_mask, deterministic)
        Res, Attn = _blocks(cfg)
        for level in reversed(range(levels)):
            width = cfg.channels * cfg.channel_mult[level]
            for i in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = Res(width, cfg.dropout, cfg.num_groups, dtype, name=f"up{level}_res{i}")(h, emb, deterministic)
                if level in cfg.attention_levels:
                    h = Attn(cfg.num_heads, cfg.head_dim, cfg.num_groups, cfg.attention_impl, dtype,
                             name=f"up{level}_attn{i}")(h, context, context_mask)
            if level != 0:
                h = Upsample(dtype, name=f"up{level}_upsample")(h)
        h = nn.silu(GroupNorm(cfg.num_groups, dtype=dtype, name="out_norm")(h))
        out = nn.Conv(cfg.out_channels, (3, 3), padding="SAME", dtype=dtype, kernel_init=zeros_init,
                      name="conv_out")(h)
        return out.astype(jnp.float32)


def count_params(params) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
