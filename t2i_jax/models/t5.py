"""T5 encoder (Raffel et al. 2020) in Flax, reading the publisher's (Hugging Face) weights.

Reads T5 v1.1 / Flan-T5 (gated-GELU feed-forward, Shazeer 2020 "GLU Variants Improve
Transformer") and the original T5 (ReLU feed-forward) encoders: a `config.json`, the tensors by
their names in `transformers`' `T5EncoderModel` / `T5ForConditionalGeneration` (see
`param_map`) and the SentencePiece model `spiece.model`. As Imagen uses T5, the features are the
encoder's final-layer-normed hidden states, pooled by a masked mean.

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
import io
import json
import math
import os
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.models.layers import GatherEmbed
from t2i_jax.models.pretrained import ParamMap
from t2i_jax.models.text import TextFeatures, Tokens
from t2i_jax.models.tokenizers import check_texts, report_truncation

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
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


class T5Tokenizer:
    """T5's SentencePiece tokenizer: [pieces..., EOS, PAD...] rows of max_length, as
    transformers' T5TokenizerFast(truncation=True, max_length) cuts them (EOS kept last)."""
    name = "t5"

    def __init__(self, processor, max_length: int, vocab_size: int, path: str = "spiece.model"):
        if max_length < 1:
            raise ValueError(f"max_length must leave room for EOS (>= 1), got {max_length}.")
        pieces = processor.get_piece_size()
        if pieces > vocab_size:
            raise ValueError(f"tokenizer does not match the model's vocabulary: {path} has {pieces} "
                             f"pieces, more than the model's vocab_size {vocab_size}.")
        if (processor.pad_id(), processor.eos_id()) != (PAD_ID, EOS_ID):
            raise ValueError(f"{path} has pad_id {processor.pad_id()} and eos_id {processor.eos_id()}; "
                             f"T5 models expect pad_id {PAD_ID} and eos_id {EOS_ID} (</s>).")
        self._sp = processor
        self.max_length = int(max_length)
        self.vocab_size = int(vocab_size)

    @classmethod
    def from_dir(cls, directory: str, max_length: int, vocab_size: int) -> "T5Tokenizer":
        """The tokenizer of `directory/spiece.model`, checked against the model's vocab_size."""
        import sentencepiece as spm
        path = os.path.join(directory, "spiece.model")
        if not os.path.isfile(path):
            raise ValueError(f"no {path}: a T5 directory needs its SentencePiece model `spiece.model` "
                             "(as published with the checkpoint) to tokenize prompts.")
        return cls(spm.SentencePieceProcessor(model_file=path), max_length, vocab_size, path)

    def __call__(self, texts: Sequence[str], warn: bool = True) -> Tokens:
        texts = check_texts(texts)
        ids = np.full((len(texts), self.max_length), PAD_ID, np.int32)
        lengths = np.zeros((len(texts),), np.int64)
        truncated = np.zeros((len(texts),), bool)
        room = self.max_length - 1
        for i, pieces in enumerate(self._sp.encode(texts, out_type=int) if texts else []):
            truncated[i] = len(pieces) > room
            row = list(pieces[:room]) + [EOS_ID]
            ids[i, :len(row)] = row
            lengths[i] = len(row)
        if warn:
            report_truncation(texts, truncated, self.max_length, "T5 tokens")
        mask = np.arange(self.max_length)[None, :] < lengths[:, None]  # [B, L]
        return Tokens(ids, mask, truncated)

    def decode(self, ids) -> list:
        """Returns the texts of rows [B, L]: pieces up to the first EOS (padding and ids past the
        SentencePiece model, i.e. T5's extra ids, are left out)."""
        out, size = [], self._sp.get_piece_size()
        for row in np.asarray(ids).reshape(-1, np.shape(ids)[-1]):
            row = [int(t) for t in row]
            row = row[:row.index(EOS_ID)] if EOS_ID in row else row
            out.append(self._sp.decode([t for t in row if t != PAD_ID and t < size]))
        return out


# ---- tiny publisher-layout models, for tests and `make-tiny` ----

_MULTILINGUAL = ("一个红色的圆在蓝色的正方形上面", "一个小的绿色三角形",
                 "a 🔴 red circle above a 🟦 blue square ✨",
                 "un grand cercle rouge à gauche d'un carré bleu",
                 "ein kleines gelbes Dreieck über einem lila Kreis")


def _tiny_sentences() -> list:
    from t2i_jax.data import shapes
    out = list(shapes.sample_prompts())
    for i, (size, colour, shape) in enumerate(
            (s, c, h) for s in shapes.SIZES for c in shapes.COLOURS for h in shapes.SHAPES):
        other = shapes.COLOURS[(i + 2) % len(shapes.COLOURS)], shapes.SHAPES[(i + 1) % len(shapes.SHAPES)]
        out.append(f"a {size} {colour} {shape}")
        relation = shapes.RELATIONS[i % len(shapes.RELATIONS)]
        out.append(f"a {colour} {shape} {relation} a {other[0]} {other[1]}")
    return out + list(_MULTILINGUAL)


def train_tiny_spiece(path: str, sentences: Optional[Sequence[str]] = None, vocab_size: int = 96) -> str:
    """Trains a SentencePiece unigram model with T5's special ids (pad 0, </s> 1, unk 2, no BOS)
    on `sentences` (default: the shapes captions plus a few Chinese, emoji and European lines)
    and writes it: an existing directory (or a path ending in a separator) gets `spiece.model`,
    a path ending in ".model" is the file, anything else is a prefix (SentencePiece's
    model_prefix: `path + ".model"`). Returns the file written; no other file is left behind."""
    import sentencepiece as spm
    if os.path.isdir(path) or path.endswith(os.sep):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, "spiece.model")
    elif not path.endswith(".model"):
        path += ".model"
    sentences = list(_tiny_sentences() if sentences is None else sentences)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, minloglevel=2)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def tiny_hf_config(**overrides) -> dict:
    """A publisher `config.json` dict of a tiny T5 v1.1 encoder (vocab_size 128 fits
    train_tiny_spiece's model, as 32128 fits T5's 32000 pieces)."""
    cfg = {
        "architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": 128,
        "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
        "relative_attention_num_buckets": 8, "relative_attention_max_distance": 20,
        "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
        "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0, "initializer_factor": 1.0,
        "is_encoder_decoder": True, "tie_word_embeddings": False, "use_cache": False,
        "pad_token_id": PAD_ID, "eos_token_id": EOS_ID, "decoder_start_token_id": PAD_ID,
        "torch_dtype": "float32", "transformers_version": "4.40.0",
    }
    cfg.update(overrides)
    if "feed_forward_proj" in overrides:  # keep the derived fields consistent, as transformers does
        gated = cfg["feed_forward_proj"].startswith("gated-")
        cfg["is_gated_act"] = gated
        cfg["dense_act_fn"] = "gelu_new" if cfg["feed_forward_proj"] == "gated-gelu" else \
            cfg["feed_forward_proj"].split("-")[-1]
    return cfg


def tiny_tensors(hf_config: dict, seed: int = 0) -> dict:
    """Random publisher tensors (name -> float32 array) for the encoder of `hf_config`, scaled
    as transformers initialises T5 so activations are O(1); norm weights near 1 and a unit-scale
    relative attention table (so position matters)."""
    cfg = T5Config.from_hf(hf_config)
    rng = np.random.default_rng(seed)
    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    std = {"q": (d * cfg.d_kv) ** -0.5, "k": d ** -0.5, "v": d ** -0.5, "o": inner ** -0.5,
           "wi": d ** -0.5, "wi_0": d ** -0.5, "wi_1": d ** -0.5, "wo": cfg.d_ff ** -0.5}
    out = {}
    for names, shape, _ in param_map(cfg).values():
        name = names[0]
        if name.endswith("layer_norm.weight"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            key = name.split(".")[-2]
            a = std.get(key, 1.0) * rng.standard_normal(shape)  # shared, relative_attention_bias: 1
        out[name] = a.astype(np.float32)
    return out


def write_tiny(directory: str, seed: int = 0, shards: int = 1, **overrides) -> str:
    """Writes a complete tiny publisher-layout T5 directory (config.json, safetensors weights,
    spiece.model) and returns its path."""
    from t2i_jax.models.pretrained import write_safetensors
    os.makedirs(directory, exist_ok=True)
    train_tiny_spiece(directory)
    hf_config = tiny_hf_config(**overrides)
    write_safetensors(directory, tiny_tensors(hf_config, seed), shards=shards)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    return directory
