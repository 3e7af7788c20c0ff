"""CLIP's text and vision transformers (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision") in Flax, reading the publisher's weights: the configs, the
shared encoder layer, the text tower and the publisher's names of both towers here; the vision
tower and CLIP's image preprocessing in models/hf_clip_vision.py.

Reads Hugging Face's `openai/clip-vit-*` (CLIPModel), Stable Diffusion's `text_encoder`
(CLIPTextModel, or CLIPTextModelWithProjection) and CLIPVisionModel(WithProjection)
directories: `config.json` and the tensors by their names in transformers' modeling_clip.py (see
`text_param_map` / `vision_param_map`; `param_map(cfg)` picks by the config's type). CLIP's
byte-level BPE (`tokenizer.json`, or `vocab.json` + `merges.txt`) is conditioning.CLIPTokenizer.

    text_cfg = text_config_from_hf(hf_config)            # "clip" or "clip_text_model"
    params = weights.params_from_tensors(text_param_map(text_cfg), tensors)
    feats = CLIPTextTransformer(text_cfg).apply(params, tokens.ids, tokens.mask)  # TextFeatures

Both towers are pre-LayerNorm transformers (q, k, v, out projections with biases; fc1 -> act ->
fc2), act "quick_gelu" x * sigmoid(1.702 x) (OpenAI's) or exact "gelu". The text tower is causal;
its pooled vector is the final-layer-normed state at the EOS token (through text_projection when
the checkpoint has one). The vision tower prepends a class token to the patches, applies
`pre_layrnorm` (sic, transformers' name) before the blocks, and pools post_layernorm(class token).
Parameters are float32; cfg.dtype is the computation dtype; norms and softmax run in float32.
Checkpoint tensors the port does not read (`logit_scale`, old `*.embeddings.position_ids`
buffers, the other tower) are ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax.models.layers import Embed, GatherEmbed
from t2i_jax.models.text import TextFeatures
from t2i_jax.models.weights import ParamMap

ACTIVATIONS = ("quick_gelu", "gelu")
_READS = ("this port reads model_type 'clip' (CLIPModel: text_config, vision_config, "
          "projection_dim), 'clip_text_model' (CLIPTextModel, CLIPTextModelWithProjection: Stable "
          "Diffusion's text_encoder) and 'clip_vision_model'")


def _check_tower(cfg) -> None:
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported: the CLIP port implements "
                         "'quick_gelu' (x * sigmoid(1.702 x), OpenAI's) and 'gelu' (exact erf GELU).")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                         f"{cfg.num_attention_heads}.")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The text tower; defaults are transformers' CLIPTextConfig (ViT-B/32's text tower)."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407  # 2 in configs older than transformers PR #24773: pool at argmax(ids)
    pad_token_id: int = 1
    projection_dim: Optional[int] = None  # text_projection's width; None: no projection
    dtype: str = "float32"

    def __post_init__(self):
        _check_tower(self)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The vision tower; defaults are transformers' CLIPVisionConfig (ViT-B/32)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: Optional[int] = None  # visual_projection's width; None: no projection
    dtype: str = "float32"

    def __post_init__(self):
        _check_tower(self)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}.")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


def _tower_dict(d: dict, key: str) -> dict:
    """CLIPModel's `text_config` / `vision_config`, updated by `*_config_dict` where an old
    config.json has one (transformers' CLIPConfig lets the latter win)."""
    out = dict(d.get(key) or {})
    out.update(d.get(key + "_dict") or {})
    return out


def _from_fields(cls, sub: dict, projection_dim, overrides: dict):
    names = {f.name for f in dataclasses.fields(cls)} - {"projection_dim", "dtype"}
    kwargs = {k: sub[k] for k in names if sub.get(k) is not None}  # absent or null: the default
    kwargs["projection_dim"] = None if projection_dim is None else int(projection_dim)
    kwargs.update(overrides)
    return cls(**kwargs)


def text_config_from_hf(d: dict, **overrides) -> CLIPTextConfig:
    """The text tower's config from a publisher config.json dict: a CLIPModel ("clip"; projection
    of the top-level projection_dim, default 512) or a "clip_text_model" (with projection only for
    architectures CLIPTextModelWithProjection: Stable Diffusion's CLIPTextModel config carries a
    projection_dim its checkpoint has no weights for). Fields the file leaves out take
    transformers' defaults; bos/eos/pad ids are kept as the file says (old files: 0, 2, 1)."""
    kind = d.get("model_type")
    if kind == "clip":
        return _from_fields(CLIPTextConfig, _tower_dict(d, "text_config"),
                            d.get("projection_dim", 512), overrides)
    if kind == "clip_text_model":
        projected = "CLIPTextModelWithProjection" in (d.get("architectures") or ())
        return _from_fields(CLIPTextConfig, d, d.get("projection_dim", 512) if projected else None,
                            overrides)
    raise ValueError(f"config model_type is {kind!r}, which has no CLIP text tower: {_READS}.")


def vision_config_from_hf(d: dict, **overrides) -> CLIPVisionConfig:
    """The vision tower's config from a "clip" or "clip_vision_model" config.json dict (the latter
    projected only for architectures CLIPVisionModelWithProjection)."""
    kind = d.get("model_type")
    if kind == "clip":
        return _from_fields(CLIPVisionConfig, _tower_dict(d, "vision_config"),
                            d.get("projection_dim", 512), overrides)
    if kind == "clip_vision_model":
        projected = "CLIPVisionModelWithProjection" in (d.get("architectures") or ())
        return _from_fields(CLIPVisionConfig, d, d.get("projection_dim", 512) if projected else None,
                            overrides)
    raise ValueError(f"config model_type is {kind!r}, which has no CLIP vision tower: {_READS}.")


def configs_from_hf(d: dict, **overrides) -> Tuple[Optional[CLIPTextConfig], Optional[CLIPVisionConfig]]:
    """(text config or None, vision config or None) of the towers a config.json describes."""
    kind = d.get("model_type")
    if kind not in ("clip", "clip_text_model", "clip_vision_model"):
        raise ValueError(f"config model_type is {kind!r}: {_READS}.")
    text = text_config_from_hf(d, **overrides) if kind != "clip_vision_model" else None
    vision = vision_config_from_hf(d, **overrides) if kind != "clip_text_model" else None
    return text, vision


# ---- the towers ----

def _activation(name: str, x):
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=False)


def layer_norm(cfg, name: str):
    # Two-pass variance: CLIP's residual stream has a few large channels.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, use_fast_variance=False,
                        name=name)


class _Attention(nn.Module):
    cfg: Any  # CLIPTextConfig or CLIPVisionConfig

    @nn.compact
    def __call__(self, x, allowed):
        """Returns out_proj(softmax(q k^T / sqrt(head_dim)) v) [B, L, D]; allowed: bool
        [B or 1, 1, L, L] (query, key) or None."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        b, l, d = x.shape
        h = cfg.num_attention_heads
        dense = lambda name: nn.Dense(d, dtype=dtype, name=name)
        q, k, v = (dense(f"{n}_proj")(x).reshape(b, l, h, d // h) for n in "qkv")
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k).astype(jnp.float32) * (d // h) ** -0.5
        if allowed is not None:
            logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(dtype)  # [B, H, Lq, Lk]
        out = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, l, d)
        return dense("out_proj")(out)


class _MLP(nn.Module):
    cfg: Any

    @nn.compact
    def __call__(self, x):
        dtype = jnp.dtype(self.cfg.dtype)
        y = nn.Dense(self.cfg.intermediate_size, dtype=dtype, name="fc1")(x)
        return nn.Dense(self.cfg.hidden_size, dtype=dtype, name="fc2")(
            _activation(self.cfg.hidden_act, y))


class EncoderLayer(nn.Module):
    cfg: Any

    @nn.compact
    def __call__(self, x, allowed):
        """Returns x [B, L, D] after the pre-LN attention and MLP sublayers (residuals float32)."""
        dtype = jnp.dtype(self.cfg.dtype)
        y = layer_norm(self.cfg, "layer_norm1")(x).astype(dtype)
        x = x + _Attention(self.cfg, name="self_attn")(y, allowed).astype(jnp.float32)
        y = layer_norm(self.cfg, "layer_norm2")(x).astype(dtype)
        return x + _MLP(self.cfg, name="mlp")(y).astype(jnp.float32)


class _TextEmbeddings(nn.Module):
    cfg: CLIPTextConfig

    @nn.compact
    def __call__(self, ids):
        cfg = self.cfg
        tokens = GatherEmbed(cfg.vocab_size, cfg.hidden_size, name="token_embedding")(ids)
        positions = Embed(cfg.max_position_embeddings, cfg.hidden_size,
                          name="position_embedding")(jnp.arange(ids.shape[1]))
        return tokens + positions[None]  # [B, L, D]


class CLIPTextTransformer(nn.Module):
    """CLIP's causal text transformer (Radford et al. 2021, sec. 2.4; transformers'
    CLIPTextTransformer): (ids [B, L] int32, mask [B, L] bool) -> TextFeatures.

    tokens: final_layer_norm of the last layer's states [B, L, D] (what Stable Diffusion attends
    to). layer = -2 reads the penultimate layer's states instead (transformers' hidden_states
    index: -1 last, -2 penultimate, ..., -(layers + 1) the embeddings), through final_layer_norm
    unless layer_norm_tokens=False (SDXL uses hidden_states[-2] un-normed).
    pooled: final-layer-normed last-layer state at the EOS token [B, D], through text_projection
    where the checkpoint has one ([B, P]). EOS as transformers finds it: the first position
    holding eos_token_id, or argmax(ids) for old configs with eos_token_id 2 (where CLIP's EOS is
    the largest id).
    mask_padding: keys outside `mask` are masked as well as future ones (transformers with an
    attention_mask). This changes only positions after the EOS, which see padding; diffusers'
    Stable Diffusion pipelines call the encoder without a mask, so set False to reproduce their
    prompt embeddings at those positions.
    """
    cfg: CLIPTextConfig
    layer: int = -1
    layer_norm_tokens: bool = True
    mask_padding: bool = True

    @nn.compact
    def __call__(self, ids, mask) -> TextFeatures:
        cfg = self.cfg
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"CLIPTextTransformer takes ids and mask of one shape [B, L], got "
                             f"{ids.shape} and {mask.shape}.")
        b, l = ids.shape
        if l > cfg.max_position_embeddings:
            raise ValueError(f"token rows of length {l} exceed this CLIP's max_position_embeddings "
                             f"{cfg.max_position_embeddings}; tokenize with max_length <= "
                             f"{cfg.max_position_embeddings}.")
        if not -cfg.num_hidden_layers - 1 <= self.layer <= -1:
            raise ValueError(f"layer {self.layer} is not a hidden_states index of a "
                             f"{cfg.num_hidden_layers}-layer CLIP (-1 .. -{cfg.num_hidden_layers + 1}).")
        mask = mask.astype(bool)
        x = _TextEmbeddings(cfg, name="embeddings")(ids).astype(jnp.float32)  # [B, L, D]
        allowed = jnp.tril(jnp.ones((l, l), bool))[None, None]                 # [1, 1, Lq, Lk]
        if self.mask_padding:
            allowed = allowed & mask[:, None, None, :]                          # [B, 1, Lq, Lk]
        hidden = [x]
        for i in range(cfg.num_hidden_layers):
            x = EncoderLayer(cfg, name=f"layers_{i}")(x, allowed)
            hidden.append(x)
        final_norm = layer_norm(cfg, "final_layer_norm")
        last = final_norm(x)                                                    # [B, L, D]
        tokens = hidden[self.layer]                                             # [B, L, D]
        if self.layer_norm_tokens:
            tokens = last if self.layer == -1 else final_norm(tokens)
        if cfg.eos_token_id == 2:  # config-static, as transformers decides
            eos = jnp.argmax(ids, axis=-1)
        else:
            eos = jnp.argmax(ids == cfg.eos_token_id, axis=-1)                  # first EOS (0 if none)
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]    # [B, D]
        if cfg.projection_dim is not None:
            pooled = nn.Dense(cfg.projection_dim, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                              name="text_projection")(pooled)                   # [B, P]
        return TextFeatures(tokens.astype(jnp.float32), mask, pooled.astype(jnp.float32))


# ---- the publisher's names ----

def _layers_map(cfg, hf_prefix: str) -> ParamMap:
    d, ff = cfg.hidden_size, cfg.intermediate_size
    pmap: ParamMap = {}
    for i in range(cfg.num_hidden_layers):
        hf, fx = f"{hf_prefix}.encoder.layers.{i}.", f"layers_{i}/"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            pmap[fx + f"self_attn/{n}/kernel"] = ((hf + f"self_attn.{n}.weight",), (d, d), "transpose")
            pmap[fx + f"self_attn/{n}/bias"] = ((hf + f"self_attn.{n}.bias",), (d,), "none")
        for n in ("layer_norm1", "layer_norm2"):
            pmap[fx + f"{n}/scale"] = ((hf + f"{n}.weight",), (d,), "none")
            pmap[fx + f"{n}/bias"] = ((hf + f"{n}.bias",), (d,), "none")
        pmap[fx + "mlp/fc1/kernel"] = ((hf + "mlp.fc1.weight",), (ff, d), "transpose")
        pmap[fx + "mlp/fc1/bias"] = ((hf + "mlp.fc1.bias",), (ff,), "none")
        pmap[fx + "mlp/fc2/kernel"] = ((hf + "mlp.fc2.weight",), (d, ff), "transpose")
        pmap[fx + "mlp/fc2/bias"] = ((hf + "mlp.fc2.bias",), (d,), "none")
    return pmap


def _norm_map(flax_name: str, hf_name: str, d: int) -> ParamMap:
    return {f"{flax_name}/scale": ((f"{hf_name}.weight",), (d,), "none"),
            f"{flax_name}/bias": ((f"{hf_name}.bias",), (d,), "none")}


def text_param_map(cfg: CLIPTextConfig) -> ParamMap:
    """Flax path -> (publisher names, publisher shape, transform) of every CLIPTextTransformer
    parameter, as transformers' CLIPModel / CLIPTextModel(WithProjection) name them:
    `text_model.embeddings.{token,position}_embedding.weight`, `text_model.encoder.layers.{i}.`
    (self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2),
    `text_model.final_layer_norm` and, with a projection, `text_projection.weight` [P, D] (no
    bias); each also without the `text_model.` prefix (a CLIPTextModel saved by transformers
    v5). torch Linear weights [out, in] are transposed."""
    d = cfg.hidden_size
    pmap: ParamMap = {
        "embeddings/token_embedding/embedding": (
            ("text_model.embeddings.token_embedding.weight",), (cfg.vocab_size, d), "none"),
        "embeddings/position_embedding/embedding": (
            ("text_model.embeddings.position_embedding.weight",), (cfg.max_position_embeddings, d), "none"),
    }
    pmap.update(_layers_map(cfg, "text_model"))
    pmap.update(_norm_map("final_layer_norm", "text_model.final_layer_norm", d))
    # transformers v5 saves a CLIPTextModel without the text_model. prefix: read both
    prefix = "text_model."
    pmap = {path: (names + tuple(n[len(prefix):] for n in names if n.startswith(prefix)), shape, tr)
            for path, (names, shape, tr) in pmap.items()}
    if cfg.projection_dim is not None:
        pmap["text_projection/kernel"] = (("text_projection.weight",), (cfg.projection_dim, d), "transpose")
    return pmap


def vision_param_map(cfg: CLIPVisionConfig) -> ParamMap:
    """Flax path -> (publisher names, publisher shape, transform) of every CLIPVisionTransformer
    parameter: `vision_model.embeddings.class_embedding` [D], `.patch_embedding.weight`
    [D, C, p, p] (conv, no bias: OIHW -> HWIO), `.position_embedding.weight` [N + 1, D],
    `vision_model.pre_layrnorm`, the encoder layers as in the text tower,
    `vision_model.post_layernorm` and, with a projection, `visual_projection.weight` [P, D]."""
    d, p = cfg.hidden_size, cfg.patch_size
    pmap: ParamMap = {
        "embeddings/class_embedding": (("vision_model.embeddings.class_embedding",), (d,), "none"),
        "embeddings/patch_embedding/kernel": (
            ("vision_model.embeddings.patch_embedding.weight",), (d, cfg.num_channels, p, p), "conv"),
        "embeddings/position_embedding/embedding": (
            ("vision_model.embeddings.position_embedding.weight",), (cfg.num_positions, d), "none"),
    }
    pmap.update(_norm_map("pre_layrnorm", "vision_model.pre_layrnorm", d))
    pmap.update(_layers_map(cfg, "vision_model"))
    pmap.update(_norm_map("post_layernorm", "vision_model.post_layernorm", d))
    if cfg.projection_dim is not None:
        pmap["visual_projection/kernel"] = (
            ("visual_projection.weight",), (cfg.projection_dim, d), "transpose")
    return pmap


def param_map(cfg) -> ParamMap:
    """text_param_map or vision_param_map, by the type of cfg."""
    if isinstance(cfg, CLIPTextConfig):
        return text_param_map(cfg)
    if isinstance(cfg, CLIPVisionConfig):
        return vision_param_map(cfg)
    raise TypeError(f"param_map takes a CLIPTextConfig or CLIPVisionConfig, got {type(cfg).__name__}.")
