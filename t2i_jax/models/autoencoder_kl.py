"""diffusers' AutoencoderKL (Stable Diffusion's VAE; Rombach et al. 2022, sec. 3.1 and app. G) in
Flax, reading the publisher's `vae/` folder: config.json and
diffusion_pytorch_model[.fp16].safetensors (or its shards).

    cfg, params = load("/data/sd15/vae")
    vae = AutoencoderKL(cfg)
    mean, logvar = vae.apply(params, x, method=AutoencoderKL.encode)   # x [B, H, W, 3] in [-1, 1]
    x_hat = vae.apply(params, z, method=AutoencoderKL.decode)          # z [B, H/8, W/8, 4]

The raw module: latents are the encoder's (mean, or mean + exp(logvar / 2) * noise); the latent
diffusion model sees (z - shift_factor) * scaling_factor, which callers apply (the config keeps
both). Encoder: conv_in, DownEncoderBlock2D's (resnets, then a stride-2 conv after diffusers'
asymmetric (0, 1) pad), a mid block (resnet, single-head attention, resnet), norm, conv_out to
2 * latent_channels, quant_conv. Decoder: post_quant_conv, conv_in, the mid block,
UpDecoderBlock2D's (layers + 1 resnets, nearest 2x + conv), norm, conv_out. GroupNorm eps 1e-6
everywhere (diffusers' Encoder/Decoder fix it). The mid-block attention reads its weights under
diffusers' names (to_q, to_k, to_v, to_out.0) or the old ones (query, key, value, proj_attn).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from t2i_jax.models.diffusers_blocks import (ACTIVATIONS, Attention, Downsample2D, ResnetBlock2D,
                                             Upsample2D, check_blocks, check_fields, conv,
                                             conv_map, dense_map, group_norm, norm_map,
                                             read_config, refuse, resnet_map)
from t2i_jax.models.weights import ParamMap, load_params

EPS = 1e-6  # diffusers' Encoder and Decoder pass resnet_eps=1e-6 and GroupNorm eps=1e-6
_VAE_FIELDS = frozenset("""
    in_channels out_channels down_block_types up_block_types block_out_channels layers_per_block
    act_fn latent_channels norm_num_groups sample_size scaling_factor shift_factor latents_mean
    latents_std force_upcast use_quant_conv use_post_quant_conv mid_block_add_attention
""".split())


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The VAE's shape; defaults are diffusers' AutoencoderKL defaults (SD's VAE has
    block_out_channels (128, 256, 512, 512), layers_per_block 2)."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.18215      # for callers: z = (mean - shift_factor) * scaling_factor
    shift_factor: Optional[float] = None
    sample_size: Any = 32
    dtype: str = "float32"
    attention_impl: str = "einsum"

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        check_blocks(self)

    @classmethod
    def from_diffusers(cls, config: dict, **overrides) -> "AutoencoderKLConfig":
        """The config of a diffusers AutoencoderKL config.json dict (absent fields take
        diffusers' defaults; force_upcast is ignored: cfg.dtype decides); ValueError naming a
        field whose value the port does not implement. overrides: dtype, attention_impl."""
        m, c = "AutoencoderKL", dict(config)
        check_fields(m, c, _VAE_FIELDS)
        g = c.get
        if g("act_fn", "silu") not in ACTIVATIONS:
            refuse(m, "act_fn", g("act_fn"), "act_fn 'silu'")
        boc = tuple(int(v) for v in g("block_out_channels", (64,)))
        for field, kind in (("down_block_types", "DownEncoderBlock2D"),
                            ("up_block_types", "UpDecoderBlock2D")):
            kinds = list(g(field, [kind]))
            if kinds != [kind] * len(boc):
                refuse(m, field, kinds, f"{len(boc)} (one per block_out_channels) {kind!r} blocks")
        for field in ("latents_mean", "latents_std"):
            if g(field) is not None:
                refuse(m, field, g(field), "latents normalised by scaling_factor and shift_factor "
                       "only (latents_mean / latents_std None); per-channel latent statistics "
                       "are not applied by this port's callers")
        shift = g("shift_factor")
        kwargs = dict(
            in_channels=int(g("in_channels", 3)), out_channels=int(g("out_channels", 3)),
            block_out_channels=boc, layers_per_block=int(g("layers_per_block", 1)),
            latent_channels=int(g("latent_channels", 4)),
            norm_num_groups=int(g("norm_num_groups", 32)),
            use_quant_conv=bool(g("use_quant_conv", True)),
            use_post_quant_conv=bool(g("use_post_quant_conv", True)),
            mid_block_add_attention=bool(g("mid_block_add_attention", True)),
            scaling_factor=float(g("scaling_factor", 0.18215)),
            shift_factor=None if shift is None else float(shift),
            sample_size=g("sample_size", 32))
        if isinstance(kwargs["sample_size"], list):
            kwargs["sample_size"] = tuple(kwargs["sample_size"])
        kwargs.update(overrides)
        return cls(**kwargs)


class _MidBlock(nn.Module):
    """diffusers' UNetMidBlock2D without time: resnet, single-head attention (GroupNorm first,
    residual), resnet."""
    cfg: AutoencoderKLConfig

    @nn.compact
    def __call__(self, x):
        cfg, c = self.cfg, x.shape[-1]
        dtype = jnp.dtype(cfg.dtype)
        x = ResnetBlock2D(c, cfg.norm_num_groups, EPS, dtype=dtype, name="resnets_0")(x)
        if cfg.mid_block_add_attention:
            x = Attention(1, c, c, qkv_bias=True, groups=cfg.norm_num_groups, eps=EPS,
                          residual=True, impl=cfg.attention_impl, dtype=dtype,
                          name="attentions_0")(x)
        return ResnetBlock2D(c, cfg.norm_num_groups, EPS, dtype=dtype, name="resnets_1")(x)


class _Resnets(nn.Module):
    """`layers` resnets to `channels`, then a Downsample2D (padding 0) or an Upsample2D."""
    cfg: AutoencoderKLConfig
    channels: int
    layers: int
    sampler: Optional[str]  # "down" | "up" | None

    @nn.compact
    def __call__(self, x):
        dtype = jnp.dtype(self.cfg.dtype)
        for j in range(self.layers):
            x = ResnetBlock2D(self.channels, self.cfg.norm_num_groups, EPS, dtype=dtype,
                              name=f"resnets_{j}")(x)
        if self.sampler == "down":
            x = Downsample2D(self.channels, 0, dtype, name="downsamplers_0")(x)
        elif self.sampler == "up":
            x = Upsample2D(self.channels, dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    cfg: AutoencoderKLConfig

    @nn.compact
    def __call__(self, x):
        cfg, boc = self.cfg, self.cfg.block_out_channels
        dtype = jnp.dtype(cfg.dtype)
        h = conv(boc[0], 3, dtype, "conv_in")(x.astype(dtype))
        for i, c in enumerate(boc):
            h = _Resnets(cfg, c, cfg.layers_per_block, "down" if i < len(boc) - 1 else None,
                         name=f"down_blocks_{i}")(h)
        h = _MidBlock(cfg, name="mid_block")(h)
        h = nn.silu(group_norm(cfg.norm_num_groups, EPS, "conv_norm_out")(h)).astype(dtype)
        return conv(2 * cfg.latent_channels, 3, dtype, "conv_out")(h)  # [B, h, w, 2 L]


class Decoder(nn.Module):
    cfg: AutoencoderKLConfig

    @nn.compact
    def __call__(self, z):
        cfg, rev = self.cfg, self.cfg.block_out_channels[::-1]
        dtype = jnp.dtype(cfg.dtype)
        h = conv(rev[0], 3, dtype, "conv_in")(z.astype(dtype))
        h = _MidBlock(cfg, name="mid_block")(h)
        for i, c in enumerate(rev):
            h = _Resnets(cfg, c, cfg.layers_per_block + 1, "up" if i < len(rev) - 1 else None,
                         name=f"up_blocks_{i}")(h)
        h = nn.silu(group_norm(cfg.norm_num_groups, EPS, "conv_norm_out")(h)).astype(dtype)
        return conv(cfg.out_channels, 3, dtype, "conv_out")(h)  # [B, H, W, 3]


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL: `encode` and `decode` (apply with method=); __call__ runs both
    (for init)."""
    cfg: AutoencoderKLConfig

    def setup(self):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, dtype, "quant_conv")
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, dtype, "post_quant_conv")

    def encode(self, x):
        """(mean, logvar) [B, H/f, W/f, latent_channels] float32 of the posterior q(z | x) for x
        [B, H, W, in_channels] in [-1, 1]; logvar clipped to [-30, 20] as diffusers'
        DiagonalGaussianDistribution does."""
        cfg = self.cfg
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"encode takes images [B, H, W, {cfg.in_channels}] (NHWC) in "
                             f"[-1, 1], got {x.shape}.")
        moments = self.encoder(x)
        if cfg.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        """Images [B, H, W, out_channels] float32 (about [-1, 1]) of latents z [B, h, w, L] (the
        raw latents: divide by scaling_factor, add shift_factor first)."""
        cfg = self.cfg
        if z.ndim != 4 or z.shape[-1] != cfg.latent_channels:
            raise ValueError(f"decode takes latents [B, h, w, {cfg.latent_channels}], got "
                             f"{z.shape}.")
        z = z.astype(jnp.dtype(cfg.dtype))
        if cfg.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)


# ---- the publisher's names ----

_OLD_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _mid_map(fx: str, hf: str, cfg: AutoencoderKLConfig) -> ParamMap:
    c = cfg.block_out_channels[-1]
    pmap = {**resnet_map(f"{fx}/resnets_0", f"{hf}.resnets.0", c, c, None),
            **resnet_map(f"{fx}/resnets_1", f"{hf}.resnets.1", c, c, None)}
    if cfg.mid_block_add_attention:
        a, h = f"{fx}/attentions_0", f"{hf}.attentions.0"
        pmap.update(norm_map(f"{a}/group_norm", f"{h}.group_norm", c))
        for new, old in _OLD_ATTENTION_NAMES.items():
            pmap.update(dense_map(f"{a}/{new.replace('.', '_')}", f"{h}.{new}", c, c,
                                  aliases=(f"{h}.{old}",)))
    return pmap


def param_map(cfg: AutoencoderKLConfig) -> ParamMap:
    """Flax path -> (diffusers names, shape in diffusers' layout, transform) of every parameter:
    encoder.(conv_in, down_blocks.{i}.(resnets.{j}, downsamplers.0.conv), mid_block,
    conv_norm_out, conv_out), quant_conv, post_quant_conv, decoder.(conv_in, mid_block,
    up_blocks.{i}.(resnets.{j}, upsamplers.0.conv), conv_norm_out, conv_out). The mid-block
    attention's projections read `to_q`... or, where absent, the old `query`, `key`, `value`,
    `proj_attn`."""
    boc, rev, lat = cfg.block_out_channels, cfg.block_out_channels[::-1], cfg.latent_channels
    pmap = {**conv_map("encoder/conv_in", "encoder.conv_in", boc[0], cfg.in_channels, 3)}
    for i, c in enumerate(boc):
        fx, hf = f"encoder/down_blocks_{i}", f"encoder.down_blocks.{i}"
        for j in range(cfg.layers_per_block):
            cin = boc[max(i - 1, 0)] if j == 0 else c
            pmap.update(resnet_map(f"{fx}/resnets_{j}", f"{hf}.resnets.{j}", cin, c, None))
        if i < len(boc) - 1:
            pmap.update(conv_map(f"{fx}/downsamplers_0/conv", f"{hf}.downsamplers.0.conv", c, c, 3))
    pmap.update(_mid_map("encoder/mid_block", "encoder.mid_block", cfg))
    pmap.update(norm_map("encoder/conv_norm_out", "encoder.conv_norm_out", boc[-1]))
    pmap.update(conv_map("encoder/conv_out", "encoder.conv_out", 2 * lat, boc[-1], 3))
    if cfg.use_quant_conv:
        pmap.update(conv_map("quant_conv", "quant_conv", 2 * lat, 2 * lat, 1))
    if cfg.use_post_quant_conv:
        pmap.update(conv_map("post_quant_conv", "post_quant_conv", lat, lat, 1))
    pmap.update(conv_map("decoder/conv_in", "decoder.conv_in", rev[0], lat, 3))
    pmap.update(_mid_map("decoder/mid_block", "decoder.mid_block", cfg))
    for i, c in enumerate(rev):
        fx, hf = f"decoder/up_blocks_{i}", f"decoder.up_blocks.{i}"
        for j in range(cfg.layers_per_block + 1):
            cin = rev[max(i - 1, 0)] if j == 0 else c
            pmap.update(resnet_map(f"{fx}/resnets_{j}", f"{hf}.resnets.{j}", cin, c, None))
        if i < len(rev) - 1:
            pmap.update(conv_map(f"{fx}/upsamplers_0/conv", f"{hf}.upsamplers.0.conv", c, c, 3))
    pmap.update(norm_map("decoder/conv_norm_out", "decoder.conv_norm_out", boc[0]))
    pmap.update(conv_map("decoder/conv_out", "decoder.conv_out", cfg.out_channels, boc[0], 3))
    return pmap


def load(directory: str, *, dtype: str = "float32", param_dtype: str = "float32", mesh=None,
         variant: Optional[str] = None):
    """(AutoencoderKLConfig, {"params": ...}) from a diffusers vae/ folder: config.json and
    diffusion_pytorch_model.safetensors, its .fp16. variant, or shards with their index.
    dtype: the computation dtype; param_dtype: the parameters'."""
    cfg = AutoencoderKLConfig.from_diffusers(read_config(directory), dtype=dtype)
    return cfg, load_params(directory, param_map(cfg), mesh=mesh, dtype=param_dtype,
                            variant=variant)
