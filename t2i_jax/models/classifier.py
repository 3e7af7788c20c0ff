"""Models of noisy images for gradient guidance.

NoisyClassifier: the UNet's encoder half (time-conditioned ResBlocks, attention, middle block)
plus ADM's attention-pooling head, returning class logits of x_t (Dhariwal & Nichol 2021, sec. 4).
TwoTowerSimilarity: a noisy-image tower and a text tower into one embedding space, with cosine
similarity sim(x_t, t, y) for semantic / CLIP-style guidance.
Both plug into samplers.sample(guidance_fn=...) through `log_prob_fn` and `similarity_fn`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax.models.layers import GroupNorm, MultiHeadAttention, heads_and_width
from t2i_jax.models.text import TextConfig, TextEncoder
from t2i_jax.models.unet import Encoder, TimeEmbedding, UNetConfig


class AttentionPool(nn.Module):
    """ADM's AttentionPool2d: the mean token, with positional embeddings, attends to all tokens."""
    out_dim: int
    num_heads: int = 4
    impl: str = "einsum"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        tokens = jnp.concatenate([jnp.mean(tokens, axis=1, keepdims=True), tokens], axis=1)  # [B, 1+HW, C]
        pos = self.param("pos_embed", nn.initializers.normal(c ** -0.5), (h * w + 1, c))
        tokens = tokens + pos[None].astype(tokens.dtype)
        heads, width = heads_and_width(c, self.num_heads, None)
        pooled = MultiHeadAttention(heads, width, self.impl, self.dtype, name="attn")(tokens[:, :1], tokens)
        return nn.Dense(self.out_dim, dtype=self.dtype, name="proj")(pooled[:, 0]).astype(jnp.float32)


class NoisyImageEncoder(nn.Module):
    """Returns a [B, out_dim] vector of a noisy image x_t [B, H, W, C] at timestep t [B]."""
    cfg: UNetConfig
    out_dim: int
    pool_heads: int = 4

    @nn.compact
    def __call__(self, x_t, t, deterministic: bool = True):
        dtype = self.cfg.compute_dtype
        emb = TimeEmbedding(self.cfg.channels, dtype, name="time_embed")(t)
        h, _ = Encoder(self.cfg, name="encoder")(x_t, emb, None, None, deterministic)
        h = nn.silu(GroupNorm(self.cfg.num_groups, dtype=dtype, name="out_norm")(h))
        return AttentionPool(self.out_dim, self.pool_heads, self.cfg.attention_impl, dtype, name="pool")(h)


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    encoder: UNetConfig
    num_classes: int


class NoisyClassifier(nn.Module):
    """Returns logits [B, num_classes] of p(y | x_t) (ADM's noisy classifier)."""
    cfg: ClassifierConfig

    @nn.compact
    def __call__(self, x_t, t, deterministic: bool = True):
        return NoisyImageEncoder(self.cfg.encoder, self.cfg.num_classes, name="image")(x_t, t, deterministic)


def log_prob_fn(model: NoisyClassifier, params):
    """Returns guidance_fn(x_t, t, label [B]) -> log p(label | x_t) [B] for samplers.sample."""
    def log_prob(x_t, t, label):
        logits = model.apply(params, x_t, t)
        return jnp.take_along_axis(jax.nn.log_softmax(logits), label[:, None], axis=-1)[:, 0]
    return log_prob


@dataclasses.dataclass(frozen=True)
class SimilarityConfig:
    image: UNetConfig
    text: TextConfig
    embed_dim: int = 128


class TwoTowerSimilarity(nn.Module):
    """Image tower on x_t and text tower on the prompt, both L2-normalised in one space."""
    cfg: SimilarityConfig

    def setup(self):
        self.image = NoisyImageEncoder(self.cfg.image, self.cfg.embed_dim)
        self.text = TextEncoder(self.cfg.text)
        self.text_proj = nn.Dense(self.cfg.embed_dim)
        self.log_temperature = self.param("log_temperature", nn.initializers.constant(jnp.log(10.0)), ())

    def embed_image(self, x_t, t, deterministic: bool = True):
        z = self.image(x_t, t, deterministic)
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)  # [B, E]

    def embed_text(self, ids, mask):
        z = self.text_proj(self.text(ids, mask).pooled)
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)  # [B, E]

    def encode_text(self, ids, mask):
        """(the text tower's TextFeatures (tokens [B, L, D], mask, pooled), the L2-normalised
        text embedding [B, E]): what unCLIP's prior reads of a caption."""
        feats = self.text(ids, mask)
        z = self.text_proj(feats.pooled)
        return feats, z / jnp.linalg.norm(z, axis=-1, keepdims=True)

    def __call__(self, x_t, t, ids, mask, deterministic: bool = True):
        """Returns the cosine similarity [B] of each noisy image with its own prompt."""
        return jnp.sum(self.embed_image(x_t, t, deterministic) * self.embed_text(ids, mask), axis=-1)

    def contrastive_logits(self, x_t, t, ids, mask):
        """Returns [B, B] scaled similarities of every image with every prompt (CLIP's loss input)."""
        sim = self.embed_image(x_t, t) @ self.embed_text(ids, mask).T
        return jnp.exp(self.log_temperature) * sim


def similarity_fn(model: TwoTowerSimilarity, params):
    """Returns guidance_fn(x_t, t, (ids, mask)) -> cosine similarity [B] for samplers.sample."""
    return lambda x_t, t, text_cond: model.apply(params, x_t, t, *text_cond)
