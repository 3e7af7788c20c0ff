"""The model the train step and the sampler call: (x_t, t, Condition) -> eps_hat.

It composes the text encoder and the backbone (`model.backbone`: "unet", models/unet.py, or
"dit", models/dit.py; the same call either way), split in two methods so that a sampling run
encodes the prompts ONCE and reuses the features at every step:

    enc = model.apply(params, cond, method=Denoiser.encode)          # once
    eps = model.apply(params, x_t, t, enc, method=Denoiser.denoise)  # every step

`denoise_fn(model, params)` wraps the second line in the (x_t, t, cond) -> eps form of
t2i_jax.diffusion.samplers.sample, with `enc` (a pytree with a leading batch axis) as its cond.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from t2i_jax.conditioning import Condition, check_null_mode
from t2i_jax.models.dit import DiT, DiTConfig
from t2i_jax.models.text import TextConfig, TextEncoder, TextFeatures
from t2i_jax.models.unet import UNet, UNetConfig

BACKBONES = ("unet", "dit")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig = UNetConfig()
    backbone: str = "unet"                     # which network maps (x_t, t, condition): BACKBONES
    dit: DiTConfig = DiTConfig()               # read when backbone == "dit"
    text: Optional[TextConfig] = TextConfig()  # None: class-conditional or unconditional
    null: str = "empty_prompt"                 # or "learned" (see t2i_jax.conditioning)
    pooled_text: bool = True                   # add the pooled text feature to the time embedding
    # unCLIP's decoder: a CLIP image embedding [E] projected into the time embedding and into
    # `embedding_tokens` extra context tokens beside the text's (None: no image embedding)
    embedding_dim: Optional[int] = None
    embedding_tokens: int = 4
    # A frozen pretrained text encoder (T5, CLIP; families/frozen_text.py) of this token width:
    # the Condition then carries its features, and the model only layer-normalises them
    # (Imagen, appendix: layer norm on the frozen text embeddings). None: text (if any) goes
    # through the jointly trained encoder `text`.
    frozen_text_width: Optional[int] = None
    # GLIDE's inpainting model: the UNet's input is [x_t, known image * mask, mask] (2C + 1
    # channels; mask = 1 where known), from the Condition's known / known_mask
    inpaint: bool = False

    @classmethod
    def from_config(cls, config) -> "ModelConfig":
        """Builds the typed config from a ConfigDict (or dict) with `unet`, `text` and options."""
        d = dict(config)
        d.pop("autoencoder", None)  # a latent model's frozen autoencoder (families/latent.py)
        d.pop("clip", None)         # an unCLIP decoder's frozen CLIP (families/decoder.py)
        d.pop("text_encoder", None)  # which text encoder: the family reads it (frozen_text.py)
        text_cfg = d.pop("text", None)
        dit_cfg = d.pop("dit", None)  # absent from configs written before the DiT existed
        return cls(unet=UNetConfig(**dict(d.pop("unet", {}))),
                   dit=DiTConfig() if dit_cfg is None else DiTConfig(**dict(dit_cfg)),
                   text=None if text_cfg is None else TextConfig(**dict(text_cfg)), **d)

    def __post_init__(self):
        check_null_mode(self.null)
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown model.backbone {self.backbone!r}; choose one of {BACKBONES}.")
        if self.text_conditioned and self.num_classes is not None:
            raise ValueError("condition on text or on class labels, not both: set text=None or "
                             f"{self.backbone}.num_classes=None.")
        if self.frozen_text_width is not None:
            if self.text is not None:
                raise ValueError("a frozen text encoder replaces the trained one: text=None.")
            if self.null != "empty_prompt":
                raise ValueError(f"null={self.null!r}: with a frozen text encoder the null "
                                 "condition is the encoding of the empty prompt (SD, Imagen); set "
                                 "--config.model.null=empty_prompt.")

    @property
    def text_conditioned(self) -> bool:
        return self.text is not None or self.frozen_text_width is not None

    @property
    def context_width(self) -> Optional[int]:
        """The width of the text tokens cross-attention reads."""
        return self.text.width if self.text is not None else self.frozen_text_width

    # What the rest of the library reads of the network, whichever the backbone.
    @property
    def backbone_cfg(self):
        """The backbone's typed config (UNetConfig or DiTConfig)."""
        return self.dit if self.backbone == "dit" else self.unet

    @property
    def out_channels(self) -> int:
        return self.backbone_cfg.out_channels

    @property
    def num_classes(self) -> Optional[int]:
        return self.backbone_cfg.num_classes

    @property
    def size_multiple(self) -> int:
        """Image (or latent) sides must be multiples of this: the UNet halves them len(channel_mult)
        - 1 times, the DiT cuts them into patches."""
        if self.backbone == "dit":
            return self.dit.patch_size
        return 2 ** (len(self.unet.channel_mult) - 1)

    @property
    def embedding_width(self) -> int:
        """The width of the extra context tokens of an image embedding when there are no text
        tokens (unCLIP; the UNet's time-embedding width, the DiT's width)."""
        return self.dit.width if self.backbone == "dit" else 4 * self.unet.channels


@struct.dataclass
class Encoded:
    """A Condition after the text encoder: what every denoising step reads."""
    context: Optional[jax.Array] = None       # [B, L, D]
    context_mask: Optional[jax.Array] = None  # bool [B, L]
    pooled: Optional[jax.Array] = None        # [B, D]
    label: Optional[jax.Array] = None         # int32 [B]
    low_res: Optional[jax.Array] = None       # [B, h, w, C]: an SR stage's (augmented) input
    aug_level: Optional[jax.Array] = None     # [B]: its augmentation level
    embedding: Optional[jax.Array] = None     # [B, E]: a CLIP image embedding (unCLIP)
    known: Optional[jax.Array] = None         # [B, H, W, C]: an inpainting model's known image
    known_mask: Optional[jax.Array] = None    # [B, H, W, 1]: 1 where known, 0 to regenerate


class Denoiser(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        if cfg.backbone == "dit":
            self.dit = DiT(cfg.dit)
        else:
            self.unet = UNet(cfg.unet)  # the attribute names the parameters' subtree
        if cfg.embedding_dim is not None:
            width = cfg.context_width or cfg.embedding_width
            self.embedding_tokens = nn.Dense(cfg.embedding_tokens * width)
        if cfg.frozen_text_width is not None:
            self.text_norm = nn.LayerNorm(name="text_norm")
            self.pooled_norm = nn.LayerNorm(name="pooled_norm")
        if cfg.text is not None:
            self.text_encoder = TextEncoder(cfg.text)
            if cfg.null == "learned":
                init = nn.initializers.normal(0.02)
                self.null_tokens = self.param("null_tokens", init, (cfg.text.max_length, cfg.text.width))
                self.null_pooled = self.param("null_pooled", init, (cfg.text.width,))

    def encode(self, cond: Condition) -> Encoded:
        """Returns the Encoded condition [B, ...] (text through the encoder, labels as they are;
        an image embedding also as extra context tokens, unCLIP sec. 2.1)."""
        enc = self._encode(cond)
        cfg = self.cfg
        if cfg.inpaint:
            if cond.known is None or cond.known_mask is None:
                raise ValueError("this is an inpainting model (model.inpaint): the Condition needs "
                                 "known [B, H, W, C] and known_mask [B, H, W, 1] (sample.py "
                                 "--inpaint IMAGE with --mask or --mask_box).")
            enc = enc.replace(known=cond.known, known_mask=cond.known_mask)
        if cfg.embedding_dim is None:
            return enc
        e = cond.embedding
        if e is None or e.shape[-1] != cfg.embedding_dim:
            raise ValueError(f"this model is conditioned on an image embedding of "
                             f"{cfg.embedding_dim} dims: the Condition needs embedding [B, "
                             f"{cfg.embedding_dim}], got {None if e is None else e.shape}.")
        extra = self.embedding_tokens(e)
        extra = extra.reshape(e.shape[0], cfg.embedding_tokens, -1)          # [B, K, D]
        ones = jnp.ones(extra.shape[:2], bool)
        if enc.context is None:
            context, mask = extra, ones
        else:
            context = jnp.concatenate([extra, enc.context.astype(extra.dtype)], axis=1)
            mask = jnp.concatenate([ones, enc.context_mask], axis=1)
        return enc.replace(context=context, context_mask=mask, embedding=e)

    def _encode(self, cond: Condition) -> Encoded:
        cfg = self.cfg
        if cfg.frozen_text_width is not None:
            if cond.features is None or cond.features.shape[-1] != cfg.frozen_text_width:
                raise ValueError(
                    f"this model reads a frozen text encoder's features [B, L, "
                    f"{cfg.frozen_text_width}]: the Condition needs features and pooled (the "
                    "family's encode fills them in), got "
                    f"{None if cond.features is None else cond.features.shape}.")
            context = self.text_norm(cond.features)                       # [B, L, D]
            pooled = self.pooled_norm(cond.pooled) if cfg.pooled_text else None  # [B, P]
            return Encoded(context=context, context_mask=cond.mask, pooled=pooled,
                           low_res=cond.low_res, aug_level=cond.aug_level)
        if cfg.text is None:
            if cfg.num_classes is not None and cond.label is None:
                raise ValueError("this model is class-conditional: the Condition needs label [B].")
            return Encoded(label=cond.label, low_res=cond.low_res, aug_level=cond.aug_level)
        if cond.tokens is None:
            raise ValueError("this model is text-conditional: the Condition needs tokens and mask.")
        feats: TextFeatures = self.text_encoder(cond.tokens, cond.mask)
        context, mask, pooled = feats.tokens, feats.mask, feats.pooled
        if cfg.null == "learned":
            null = cond.is_null.reshape(-1, 1, 1)
            length = context.shape[1]
            context = jnp.where(null, self.null_tokens[None, :length], context)
            mask = jnp.where(null[..., 0], True, mask)
            pooled = jnp.where(cond.is_null[:, None], self.null_pooled[None], pooled)
        return Encoded(context=context, context_mask=mask,
                       pooled=pooled if cfg.pooled_text else None, label=None,
                       low_res=cond.low_res, aug_level=cond.aug_level)

    def denoise(self, x_t, t, enc: Encoded, deterministic: bool = True):
        """Returns eps_hat [B, H, W, C_out] (float32)."""
        net = self.dit if self.cfg.backbone == "dit" else self.unet
        return net(x_t, t, enc.context, enc.context_mask, enc.pooled, enc.label, deterministic,
                   low_res=enc.low_res, aug_level=enc.aug_level, embedding=enc.embedding,
                   known=enc.known, known_mask=enc.known_mask)

    def __call__(self, x_t, t, cond: Condition, deterministic: bool = True):
        return self.denoise(x_t, t, self.encode(cond), deterministic)


def denoise_fn(model: Denoiser, params):
    """Returns (x_t, t, enc: Encoded) -> eps_hat for samplers.sample (enc from Denoiser.encode)."""
    return lambda x_t, t, enc: model.apply(params, x_t, t, enc, method=Denoiser.denoise)


def encode(model: Denoiser, params, cond: Condition) -> Encoded:
    return model.apply(params, cond, method=Denoiser.encode)
