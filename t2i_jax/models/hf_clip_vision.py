"""CLIP's vision tower (Radford et al. 2021, sec. 2.4) in Flax, and CLIP's image preprocessing.

A ViT: a class token prepended to the patches, `pre_layrnorm` (sic, transformers' name) before
the blocks (models/hf_clip.py's EncoderLayer, shared with the text tower), post_layernorm of the
class token pooled, and visual_projection where the checkpoint has one. Its config
(CLIPVisionConfig, vision_config_from_hf) and publisher names (vision_param_map) are in
models/hf_clip.py with the text tower's.

    vision_cfg = hf_clip.vision_config_from_hf(hf_config)  # "clip" or "clip_vision_model"
    params = weights.params_from_tensors(hf_clip.vision_param_map(vision_cfg), tensors)
    out = CLIPVisionTransformer(vision_cfg).apply(params, preprocess(images, vision_cfg.image_size))
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax.models.hf_clip import CLIPVisionConfig, EncoderLayer, layer_norm
from t2i_jax.models.layers import Embed

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionFeatures(NamedTuple):
    last_hidden_state: jax.Array  # [B, 1 + N, D]: class token then patches, before post_layernorm
    pooled: jax.Array             # [B, D]: post_layernorm(class token)
    image_embeds: jax.Array       # [B, P]: visual_projection(pooled); pooled where there is none


class _VisionEmbeddings(nn.Module):
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixels):
        cfg, d, p = self.cfg, self.cfg.hidden_size, self.cfg.patch_size
        patches = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          dtype=jnp.dtype(cfg.dtype), name="patch_embedding")(pixels)  # [B, H/p, W/p, D]
        b = patches.shape[0]
        patches = patches.reshape(b, -1, d).astype(jnp.float32)  # row-major grid, as torch flattens
        cls = self.param("class_embedding", nn.initializers.normal(d ** -0.5), (d,))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), patches], axis=1)  # [B, 1 + N, D]
        return x + Embed(cfg.num_positions, d, name="position_embedding")(jnp.arange(cfg.num_positions))


class CLIPVisionTransformer(nn.Module):
    """CLIP's ViT image tower (Radford et al. 2021, sec. 2.4; transformers'
    CLIPVisionTransformer + visual_projection): pixels [B, H, W, C], already CLIP-normalised
    (see `preprocess`), -> VisionFeatures."""
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixels) -> VisionFeatures:
        cfg = self.cfg
        s = cfg.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (s, s, cfg.num_channels):
            raise ValueError(f"CLIPVisionTransformer takes pixels [B, {s}, {s}, {cfg.num_channels}] "
                             f"(NHWC, this model's image_size), got {pixels.shape}; see preprocess().")
        x = _VisionEmbeddings(cfg, name="embeddings")(pixels)
        x = layer_norm(cfg, "pre_layrnorm")(x)
        for i in range(cfg.num_hidden_layers):
            x = EncoderLayer(cfg, name=f"layers_{i}")(x, None)
        pooled = layer_norm(cfg, "post_layernorm")(x[:, 0])  # [B, D]
        embeds = pooled
        if cfg.projection_dim is not None:
            embeds = nn.Dense(cfg.projection_dim, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                              name="visual_projection")(pooled).astype(jnp.float32)  # [B, P]
        return VisionFeatures(x, pooled, embeds)


def preprocess(images, image_size: int = 224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
               processor_config: Optional[dict] = None):
    """Returns CLIP's input pixels [B, S, S, C] from images in [-1, 1] [B, H, W, C], as
    CLIPImageProcessor makes them: bicubic resize of the short side to S (clipped to [0, 1] like
    its 8-bit images), centre crop S x S, then (x - mean) / std on [0, 1] pixels. A
    `preprocessor_config.json` dict, if given, supplies crop_size, size.shortest_edge, image_mean
    and image_std."""
    short = image_size
    if processor_config is not None:
        crop = processor_config.get("crop_size", image_size)
        image_size = int(crop["height"] if isinstance(crop, dict) else crop)
        size = processor_config.get("size", image_size)
        short = int(size.get("shortest_edge", image_size) if isinstance(size, dict) else size)
        mean = processor_config.get("image_mean", mean)
        std = processor_config.get("image_std", std)
    x = (jnp.asarray(images, jnp.float32) + 1.0) / 2.0
    b, h, w, c = x.shape
    if (h, w) != (image_size, image_size):
        nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        if min(nh, nw) < image_size:
            raise ValueError(f"resizing the short side to {short} leaves less than the crop "
                             f"{image_size}; set size.shortest_edge >= crop_size.")
        x = jnp.clip(jax.image.resize(x, (b, nh, nw, c), "bicubic"), 0.0, 1.0)
        top, left = (nh - image_size) // 2, (nw - image_size) // 2
        x = x[:, top:top + image_size, left:left + image_size]
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)  # [B, S, S, C]
