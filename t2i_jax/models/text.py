"""Text: a byte-level tokenizer (any language, no vocabulary file) and a transformer encoder
trained jointly with the UNet (GLIDE, sec. 2.3).

Token ids: PAD = 0, BOS = 1, EOS = 2, and byte b -> b + 3 (vocabulary 259). A prompt becomes
[BOS, bytes..., EOS, PAD...] of fixed length; a prompt that does not fit is cut at a UTF-8
character boundary and reported (a warning naming it, and `truncated` in the result).

The seam for a frozen pretrained encoder (T5, CLIP, loaded from local weights): anything that
maps (tokens [B, L], mask [B, L]) to `TextFeatures(tokens [B, L, D], mask [B, L], pooled [B, D])`
can stand in for `TextEncoder`; the denoiser (models/denoiser.py) only sees TextFeatures. Its
tokenizer then replaces `tokenize`, with the same (ids, mask) output.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.models.layers import Embed, MultiHeadAttention

PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET


class Tokens(NamedTuple):
    ids: np.ndarray        # int32 [B, L]
    mask: np.ndarray       # bool [B, L], True on BOS, bytes and EOS
    truncated: np.ndarray  # bool [B], True where the prompt was cut to fit


def _fit(data: bytes, room: int) -> bytes:
    """Returns the longest prefix of UTF-8 `data` of at most `room` bytes that ends on a character."""
    if len(data) <= room:
        return data
    cut = room
    while cut > 0 and (data[cut] & 0xC0) == 0x80:  # data[cut] continues a character: step back
        cut -= 1
    return data[:cut]


def tokenize(texts: Sequence[str], max_length: int = 16, warn: bool = True) -> Tokens:
    """Returns the byte tokens of each text, [BOS, UTF-8 bytes, EOS] padded to max_length."""
    if isinstance(texts, str):
        raise TypeError("tokenize takes a list of prompts; wrap a single prompt as [prompt].")
    if max_length < 2:
        raise ValueError(f"max_length must leave room for BOS and EOS (>= 2), got {max_length}.")
    ids = np.full((len(texts), max_length), PAD, np.int32)
    truncated = np.zeros((len(texts),), bool)
    for i, text in enumerate(texts):
        data = text.encode("utf-8")
        kept = _fit(data, max_length - 2)
        truncated[i] = len(kept) < len(data)
        row = [BOS] + [b + BYTE_OFFSET for b in kept] + [EOS]
        ids[i, :len(row)] = row
    if warn and truncated.any():
        cut = [texts[i] for i in np.flatnonzero(truncated)[:3]]
        warnings.warn(f"{int(truncated.sum())} prompt(s) longer than {max_length - 2} UTF-8 bytes were "
                      f"truncated (e.g. {cut!r}); raise the text length in the config to keep them whole.",
                      stacklevel=2)
    return Tokens(ids, ids != PAD, truncated)


def detokenize(ids) -> list:
    """Returns the texts of token rows [B, L] (inverse of tokenize up to truncation)."""
    out = []
    for row in np.asarray(ids):
        data = bytes(int(v) - BYTE_OFFSET for v in row if v >= BYTE_OFFSET)
        out.append(data.decode("utf-8", errors="replace"))
    return out


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
