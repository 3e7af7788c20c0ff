"""Text: the transformer encoder trained jointly with the UNet (GLIDE, sec. 2.3), over the
byte-level tokens of conditioning/tokenizers.py (any language, no vocabulary file).

The seam for a frozen pretrained encoder (T5, CLIP, loaded from local weights): anything that
maps (tokens [B, L], mask [B, L]) to `TextFeatures(tokens [B, L, D], mask [B, L], pooled [B, D])`
can stand in for `TextEncoder`; the denoiser (models/denoiser.py) only sees TextFeatures. Its
tokenizer then replaces the byte tokenizer, with the same (ids, mask) output.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax.conditioning.tokenizers import VOCAB_SIZE
from t2i_jax.models.layers import Embed, MultiHeadAttention

class TextFeatures(NamedTuple):
    """What the denoiser sees of a prompt: per-token features, their mask, a pooled vector."""
    tokens: jax.Array  # [B, L, D]
    mask: jax.Array    # bool [B, L]
    pooled: jax.Array  # [B, D]


@dataclasses.dataclass(frozen=True)
class TextConfig:
    max_length: int = 16
    width: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    attention_impl: str = "einsum"
    dtype: str = "float32"


class TextEncoder(nn.Module):
    """Pre-LayerNorm transformer over byte tokens: returns TextFeatures (pooled: masked mean)."""
    cfg: TextConfig

    @nn.compact
    def __call__(self, ids, mask):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        if ids.shape[1] > cfg.max_length:
            raise ValueError(f"token rows of length {ids.shape[1]} exceed the encoder's max_length "
                             f"{cfg.max_length}; tokenize with max_length={cfg.max_length}.")
        x = Embed(VOCAB_SIZE, cfg.width, dtype, name="token_embed")(ids)
        pos = self.param("pos_embed", nn.initializers.normal(0.01), (cfg.max_length, cfg.width))
        x = x + pos[None, :ids.shape[1]].astype(dtype)
        head_dim = cfg.width // cfg.num_heads
        for i in range(cfg.num_layers):
            y = nn.LayerNorm(dtype=dtype, name=f"ln_attn{i}")(x)
            x = x + MultiHeadAttention(cfg.num_heads, head_dim, cfg.attention_impl, dtype, name=f"attn{i}")(
                y, None, mask)
            y = nn.LayerNorm(dtype=dtype, name=f"ln_mlp{i}")(x)
            y = nn.Dense(cfg.mlp_ratio * cfg.width, dtype=dtype, name=f"mlp_in{i}")(y)
            x = x + nn.Dense(cfg.width, dtype=dtype, name=f"mlp_out{i}")(nn.gelu(y))
        x = nn.LayerNorm(dtype=dtype, name="ln_final")(x).astype(jnp.float32)  # [B, L, D]
        m = mask.astype(jnp.float32)[..., None]
        pooled = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)  # [B, D]
        return TextFeatures(x, mask, pooled)
