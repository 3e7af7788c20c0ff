"""T5 encoder (Raffel et al. 2020) in Flax, reading the publisher's (Hugging Face) weights.

Reads T5 v1.1 / Flan-T5 (gated-GELU feed-forward, Shazeer 2020 "GLU Variants Improve
Transformer") and the original T5 (ReLU feed-forward) encoders: a `config.json`, the tensors by
their names in `transformers`' `T5EncoderModel` / `T5ForConditionalGeneration` (see
`param_map`); its SentencePiece model `spiece.model` is read by conditioning.T5Tokenizer. As
Imagen uses T5, the features are the encoder's final-layer-normed hidden states, pooled by a
masked mean.

What differs from a textbook transformer, all as in the publisher's code:
  * RMS norm without mean subtraction or bias, variance in float32;
  * no 1/sqrt(d) scaling of the attention logits (folded into the initialisation of q);
  * relative position biases bucketed by `relative_position_bucket`, one table
    [num_buckets, num_heads] that lives in block 0 and is reused by every block;
  * no scaling of the token embedding, no biases anywhere.

Parameters are float32; cfg.dtype is the computation dtype of the matmuls. The residual
stream, norm statistics and softmax stay in float32.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.models.layers import GatherEmbed
from t2i_jax.models.text import TextFeatures
from t2i_jax.models.weights import ParamMap

FEED_FORWARD_PROJS = ("gated-gelu", "relu")
_REQUIRED = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    dtype: str = "float32"

    def __post_init__(self):
        if self.feed_forward_proj not in FEED_FORWARD_PROJS:
            raise ValueError(
                f"feed_forward_proj {self.feed_forward_proj!r} is not supported; this port reads "
                f"{FEED_FORWARD_PROJS[0]!r} (T5 v1.1, Flan-T5: gelu_new, gated) and "
                f"{FEED_FORWARD_PROJS[1]!r} (original T5).")
        if self.relative_attention_num_buckets < 4:
            raise ValueError("relative_attention_num_buckets must be >= 4 (two directions, exact "
                             f"and log-spaced halves), got {self.relative_attention_num_buckets}.")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ValueError("relative_attention_max_distance must exceed num_buckets // 4 (the "
                             f"exact range), got {self.relative_attention_max_distance}.")

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    @classmethod
    def from_hf(cls, d: dict, dtype: str = "float32") -> "T5Config":
        """The encoder's config from a publisher `config.json` dict (decoder fields ignored;
        absent optional fields take transformers' T5Config defaults, e.g. "relu", 128)."""
        if d.get("model_type") != "t5":
            raise ValueError(f"config.json has model_type {d.get('model_type')!r}, not 't5': this "
                             "port reads T5 v1.1 / Flan-T5 / t5 encoders.")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(f"config.json lacks the required T5 field(s) {missing}.")
        return cls(**{k: int(d[k]) for k in _REQUIRED},
                   relative_attention_num_buckets=int(d.get("relative_attention_num_buckets", 32)),
                   relative_attention_max_distance=int(d.get("relative_attention_max_distance", 128)),
                   layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)),
                   feed_forward_proj=str(d.get("feed_forward_proj", "relu")), dtype=dtype)


def relative_position_bucket(relative_position, num_buckets: int = 32,
                             max_distance: int = 128) -> np.ndarray:
    """Returns T5's bidirectional bucket (int32, same shape) of each relative position
    memory - query (Raffel et al. 2020, sec. 2.1; transformers' `_relative_position_bucket`).

    Half the buckets per direction; of those, half are exact distances and half log-spaced up
    to max_distance (farther shares the last bucket). Host numpy, as the buckets depend only on
    the (static) sequence length. The log branch is float32 truncated toward zero, as the
    publisher computes it; its log is rounded from float64 so that the value at exact integers
    (e.g. distance 16 -> 2.0 with 32 buckets) does not hang on a float32 log's last bit.
    """
    rp = np.asarray(relative_position, np.int64)
    half = num_buckets // 2
    max_exact = half // 2
    distance = np.abs(rp)
    ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact)
    log_ratio = np.log(ratio.astype(np.float64)).astype(np.float32)
    scaled = log_ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    far = np.minimum(max_exact + np.maximum(scaled, 0).astype(np.int64), half - 1)
    bucket = np.where(rp > 0, half, 0) + np.where(distance < max_exact, distance, far)
    return bucket.astype(np.int32)


class T5LayerNorm(nn.Module):
    """Returns weight * x / rms(x) [..., D] (RMS norm: no mean, no bias; statistics in float32)."""
    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        return y.astype(self.dtype) * weight.astype(self.dtype)


class T5Block(nn.Module):
    """Returns x [B, L, D] after T5's self-attention and feed-forward sublayers (pre-norm)."""
    cfg: T5Config

    @nn.compact
    def __call__(self, x, position_bias, mask):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=dtype, name=name)
        b, l, _ = x.shape
        h = T5LayerNorm(cfg.layer_norm_epsilon, dtype, name="attn_norm")(x)
        inner = cfg.num_heads * cfg.d_kv
        q, k, v = (dense(inner, n)(h).reshape(b, l, cfg.num_heads, cfg.d_kv) for n in "qkv")
        # No 1/sqrt(d_kv): T5 folds it into q's initialisation.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + position_bias
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1)  # [B, H, Lq, Lk]
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(dtype), v).reshape(b, l, inner)
        x = x + dense(cfg.d_model, "o")(out).astype(jnp.float32)

        h = T5LayerNorm(cfg.layer_norm_epsilon, dtype, name="ff_norm")(x)
        if cfg.gated:  # wo(gelu_new(wi_0 h) * wi_1 h), gelu_new = tanh approximation
            h = nn.gelu(dense(cfg.d_ff, "wi_0")(h), approximate=True) * dense(cfg.d_ff, "wi_1")(h)
        else:
            h = nn.relu(dense(cfg.d_ff, "wi")(h))
        return x + dense(cfg.d_model, "wo")(h).astype(jnp.float32)  # [B, L, D]


class T5Encoder(nn.Module):
    """T5 encoder: (ids [B, L] int32, mask [B, L] bool) -> TextFeatures (tokens [B, L, D]
    float32, final-layer-normed; pooled [B, D]: masked mean, as Imagen pools T5)."""
    cfg: T5Config

    @nn.compact
    def __call__(self, ids, mask):
        cfg = self.cfg
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"T5Encoder takes ids and mask of one shape [B, L], got {ids.shape} "
                             f"and {mask.shape}.")
        mask = mask.astype(bool)
        length = ids.shape[1]
        x = GatherEmbed(cfg.vocab_size, cfg.d_model, jnp.float32, name="shared")(ids)  # [B, L, D]
        table = self.param("relative_attention_bias", nn.initializers.normal(cfg.d_model ** -0.5),
                           (cfg.relative_attention_num_buckets, cfg.num_heads))
        positions = np.arange(length)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None],
                                           cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)  # [Lq, Lk]
        position_bias = jnp.transpose(table[buckets], (2, 0, 1))[None].astype(jnp.float32)  # [1, H, Lq, Lk]
        for i in range(cfg.num_layers):
            x = T5Block(cfg, name=f"block_{i}")(x, position_bias, mask)
        x = T5LayerNorm(cfg.layer_norm_epsilon, jnp.float32, name="final_layer_norm")(x)  # [B, L, D]
        m = mask.astype(jnp.float32)[..., None]
        pooled = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)  # [B, D]
        return TextFeatures(x, mask, pooled)


def param_map(cfg: T5Config) -> ParamMap:
    """Flax path -> (publisher names, publisher shape, transform) of every T5Encoder parameter.

    Names as transformers' T5EncoderModel / T5ForConditionalGeneration save them: `shared.weight`
    (some checkpoints also, or only, hold the tied copy `encoder.embed_tokens.weight`),
    `encoder.block.{i}.layer.0` (self-attention), `.layer.1` (feed-forward), and the relative
    attention table in block 0 only. torch Linear weights are [out, in]: transposed.
    """
    d, inner, ff = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    pmap: ParamMap = {
        "shared/embedding": (("shared.weight", "encoder.embed_tokens.weight"), (cfg.vocab_size, d), "none"),
        "relative_attention_bias": (
            ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
            (cfg.relative_attention_num_buckets, cfg.num_heads), "none"),
        "final_layer_norm/weight": (("encoder.final_layer_norm.weight",), (d,), "none"),
    }
    ff_names = ("wi_0", "wi_1") if cfg.gated else ("wi",)
    for i in range(cfg.num_layers):
        hf, fx = f"encoder.block.{i}.layer.", f"block_{i}/"
        pmap[fx + "attn_norm/weight"] = ((hf + "0.layer_norm.weight",), (d,), "none")
        for n in "qkv":
            pmap[fx + f"{n}/kernel"] = ((hf + f"0.SelfAttention.{n}.weight",), (inner, d), "transpose")
        pmap[fx + "o/kernel"] = ((hf + "0.SelfAttention.o.weight",), (d, inner), "transpose")
        pmap[fx + "ff_norm/weight"] = ((hf + "1.layer_norm.weight",), (d,), "none")
        for n in ff_names:
            pmap[fx + f"{n}/kernel"] = ((hf + f"1.DenseReluDense.{n}.weight",), (ff, d), "transpose")
        pmap[fx + "wo/kernel"] = ((hf + "1.DenseReluDense.wo.weight",), (d, ff), "transpose")
    return pmap
