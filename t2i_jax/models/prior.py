"""unCLIP's diffusion prior network (Ramesh et al. 2022, sec. 2.2): a decoder-only transformer
that predicts the clean CLIP image embedding x0 from its noised version.

The sequence, in order (DALL-E 2: "the encoded text, the CLIP text embedding, an embedding for
the diffusion timestep, the noised CLIP image embedding, and a final embedding whose output from
the Transformer is used to predict the unnoised CLIP image embedding"):

    [text tokens (L, the frozen CLIP text tower's features), CLIP text embedding, timestep
     embedding, noised z_i, learned query]  -> read the output at the query -> x0_hat [E]

Attention is causal (PriorConfig.causal, the paper's and DALLE2-pytorch's choice) and padded text
tokens are never attended. Why causal is enough: the prediction is read at the LAST position,
which sees every position under a causal mask, so it loses nothing there; what the mask does is
keep the text positions' features independent of the noised z_i and of t, so they are the same
at every step of the chain (the text half of the sequence is a fixed encoding of the caption,
as in a decoder-only language model). With causal=False every position attends to every one
(also tested).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax.models.layers import MultiHeadAttention, timestep_embedding


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    embed_dim: int = 64          # E: the CLIP embedding's dimension (set from the CLIP)
    width: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    causal: bool = True
    dropout: float = 0.0
    attention_impl: str = "einsum"

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"prior width {self.width} does not split into {self.num_heads} heads.")


EXTRA_POSITIONS = 4  # text embedding, timestep, noised z_i, query


def attention_mask(text_mask: jax.Array, causal: bool) -> jax.Array:
    """bool [B, L+4, L+4]: query i may attend key j. Padded text keys never; with causal, only
    j <= i. The first text token (BOS) is never padding, so every query has a key."""
    b, length = text_mask.shape
    keys = jnp.concatenate([text_mask, jnp.ones((b, EXTRA_POSITIONS), bool)], axis=1)  # [B, S]
    s = length + EXTRA_POSITIONS
    allowed = jnp.broadcast_to(keys[:, None, :], (b, s, s))
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((s, s), bool))[None]
    return allowed


class PriorTransformer(nn.Module):
    """(z_t [B, E], t [B], text tokens [B, L, Dt], text mask [B, L], text embedding [B, E]) ->
    x0_hat [B, E] (float32), in the prior's space (L2-normalised embeddings times sqrt(E))."""
    cfg: PriorConfig

    @nn.compact
    def __call__(self, z_t, t, tokens, text_mask, text_embed, deterministic: bool = True):
        cfg = self.cfg
        w = cfg.width
        scale = math.sqrt(cfg.embed_dim)  # the text embedding enters at the same scale as z
        tok = nn.Dense(w, name="text_tokens_in")(tokens)                           # [B, L, W]
        txt = nn.Dense(w, name="text_embed_in")(text_embed * scale)[:, None]        # [B, 1, W]
        temb = timestep_embedding(t, w)
        temb = nn.Dense(w, name="time_in1")(nn.silu(nn.Dense(w, name="time_in0")(temb)))[:, None]
        z = nn.Dense(w, name="z_in")(z_t)[:, None]
        query = self.param("query", nn.initializers.normal(0.02), (w,))
        query = jnp.broadcast_to(query, (z_t.shape[0], 1, w))
        x = jnp.concatenate([tok, txt, temb, z, query], axis=1)                    # [B, L+4, W]
        pos = self.param("pos_embed", nn.initializers.normal(0.01), (x.shape[1], w))
        x = x + pos[None]
        mask = attention_mask(text_mask, cfg.causal)
        head = w // cfg.num_heads
        for i in range(cfg.num_layers):
            y = nn.LayerNorm(name=f"ln_attn{i}")(x)
            y = MultiHeadAttention(cfg.num_heads, head, cfg.attention_impl, name=f"attn{i}")(
                y, None, mask)
            x = x + nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
            y = nn.LayerNorm(name=f"ln_mlp{i}")(x)
            y = nn.Dense(cfg.mlp_ratio * w, name=f"mlp_in{i}")(y)
            y = nn.Dense(w, name=f"mlp_out{i}")(nn.gelu(y))
            x = x + nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
        out = nn.LayerNorm(name="ln_final")(x[:, -1])                              # the query
        return nn.Dense(cfg.embed_dim, name="out")(out).astype(jnp.float32)        # [B, E]
