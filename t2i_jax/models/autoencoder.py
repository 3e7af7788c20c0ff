"""The KL autoencoder of latent diffusion (Rombach et al. 2022, CompVis/latent-diffusion's
AutoencoderKL), and LDM's patch discriminator (pix2pix's NLayerDiscriminator).

    enc = model.apply(params, x, method=Autoencoder.encode)     # Posterior(mean, logvar)
    z   = enc.sample(key)                                         # [B, H/f, W/f, c]
    x_hat = model.apply(params, z, method=Autoencoder.decode)    # [B, H, W, C]

The encoder halves the resolution log2(f) times (channel_mult has log2(f) + 1 entries, as LDM's
ch_mult), the decoder doubles it back; both are ResBlocks with GroupNorm and SiLU, no time input.
The encoder's last conv gives 2c channels: the mean and the log-variance of a diagonal Gaussian
posterior q(z | x), the log-variance clipped to [-30, 20] as LDM's DiagonalGaussianDistribution.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from t2i_jax.models.layers import Downsample, GroupNorm, Upsample, zeros_init


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    factor: int = 4                       # f: the latent is [H/f, W/f, latent_channels]
    latent_channels: int = 4              # c
    out_channels: int = 3                 # the image's channels
    channels: int = 32                    # base width; level i has channels * channel_mult[i]
    channel_mult: Tuple[int, ...] = (1, 2, 2)  # log2(f) + 1 levels
    num_res_blocks: int = 1
    num_groups: int = 8

    def __post_init__(self):
        levels = len(self.channel_mult) - 1
        if self.factor < 1 or 2 ** levels != self.factor:
            raise ValueError(f"model.ae.factor={self.factor} needs len(model.ae.channel_mult) = "
                             f"log2(factor) + 1 (each level but the last halves the size), got "
                             f"channel_mult={tuple(self.channel_mult)} ({levels} halvings: factor "
                             f"{2 ** levels}).")
        if self.latent_channels < 1:
            raise ValueError(f"model.ae.latent_channels must be >= 1, got {self.latent_channels}.")
        for m in self.channel_mult:
            if (self.channels * m) % self.num_groups:
                raise ValueError(f"model.ae.num_groups={self.num_groups} must divide every "
                                 f"level's width channels * channel_mult = {self.channels * m}.")


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    channels: int = 32
    num_layers: int = 2                   # pix2pix's n_layers (LDM: 3); patches of 2^(n+1)+... px


@struct.dataclass
class Posterior:
    """A diagonal Gaussian q(z | x) = N(mean, exp(logvar))."""
    mean: jax.Array      # [B, h, w, c]
    logvar: jax.Array    # [B, h, w, c]

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def kl(self) -> jax.Array:
        """KL(q(z | x) || N(0, I)) per example [B], summed over the latent's elements."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar,
                             axis=(1, 2, 3))


class _ResBlock(nn.Module):
    out_channels: int
    num_groups: int

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.out_channels, (3, 3), padding="SAME", name="conv1")(
            nn.silu(GroupNorm(self.num_groups, epsilon=1e-6, name="norm1")(x)))
        h = nn.Conv(self.out_channels, (3, 3), padding="SAME", kernel_init=zeros_init, name="conv2")(
            nn.silu(GroupNorm(self.num_groups, epsilon=1e-6, name="norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), name="skip")(x)
        return x + h


class Encoder(nn.Module):
    cfg: AutoencoderConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        h = nn.Conv(c.channels * c.channel_mult[0], (3, 3), padding="SAME", name="conv_in")(x)
        for i, m in enumerate(c.channel_mult):
            for j in range(c.num_res_blocks):
                h = _ResBlock(c.channels * m, c.num_groups, name=f"down{i}_res{j}")(h)
            if i < len(c.channel_mult) - 1:
                h = Downsample(name=f"down{i}_sample")(h)
        h = _ResBlock(h.shape[-1], c.num_groups, name="mid")(h)
        h = nn.silu(GroupNorm(c.num_groups, epsilon=1e-6, name="norm_out")(h))
        moments = nn.Conv(2 * c.latent_channels, (3, 3), padding="SAME", name="conv_out")(h)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return Posterior(mean, jnp.clip(logvar, -30.0, 20.0))


class Decoder(nn.Module):
    """z -> the features before the last conv (the Autoencoder holds that conv apart: LDM's
    adaptive GAN weight is a ratio of gradient norms at its kernel)."""
    cfg: AutoencoderConfig

    @nn.compact
    def __call__(self, z):
        c = self.cfg
        h = nn.Conv(c.channels * c.channel_mult[-1], (3, 3), padding="SAME", name="conv_in")(z)
        h = _ResBlock(h.shape[-1], c.num_groups, name="mid")(h)
        for i in reversed(range(len(c.channel_mult))):
            for j in range(c.num_res_blocks):
                h = _ResBlock(c.channels * c.channel_mult[i], c.num_groups, name=f"up{i}_res{j}")(h)
            if i > 0:
                h = Upsample(name=f"up{i}_sample")(h)
        return nn.silu(GroupNorm(c.num_groups, epsilon=1e-6, name="norm_out")(h))


def conv_out_apply(cfg: AutoencoderConfig, conv_params: dict, h: jax.Array) -> jax.Array:
    """The decoder's last conv with the given {"kernel", "bias"} (for gradients at its kernel)."""
    return nn.Conv(cfg.out_channels, (3, 3), padding="SAME").apply({"params": conv_params}, h)


class Autoencoder(nn.Module):
    cfg: AutoencoderConfig

    def setup(self):
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)
        self.conv_out = nn.Conv(self.cfg.out_channels, (3, 3), padding="SAME")

    def __call__(self, x, key):
        post = self.encode(x)
        return self.decode(post.sample(key)), post

    def encode(self, x) -> Posterior:
        return self.encoder(x)

    def decode(self, z):
        return self.conv_out(self.decoder(z))

    def decode_features(self, z):
        """The decoder up to its last conv (params["conv_out"] maps them to pixels)."""
        return self.decoder(z)


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN (LDM's NLayerDiscriminator, without its BatchNorm: GroupNorm here, so
    the logits of an example do not depend on the rest of its batch): stride-2 4x4 convs with
    LeakyReLU(0.2), then a 1-channel conv: one real/fake logit per patch [B, h, w]."""
    cfg: DiscriminatorConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        h = nn.leaky_relu(nn.Conv(c.channels, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)),
                                  name="conv0")(x), 0.2)
        for i in range(1, c.num_layers + 1):
            width = c.channels * min(2 ** i, 8)
            stride = 2 if i < c.num_layers else 1
            h = nn.Conv(width, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                        name=f"conv{i}")(h)
            h = nn.leaky_relu(GroupNorm(min(8, width), epsilon=1e-6, name=f"norm{i}")(h), 0.2)
        return nn.Conv(1, (4, 4), padding=((1, 1), (1, 1)), name="logits")(h)[..., 0]


def latent_shape(cfg: AutoencoderConfig, image_size: int) -> tuple:
    if image_size % cfg.factor:
        raise ValueError(f"data.image_size={image_size} is not a multiple of the autoencoder's "
                         f"factor f={cfg.factor}.")
    s = image_size // cfg.factor
    return (s, s, cfg.latent_channels)
