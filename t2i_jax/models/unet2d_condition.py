"""diffusers' UNet2DConditionModel (Stable Diffusion 1.x and 2.x; Rombach et al. 2022, "High-
Resolution Image Synthesis with Latent Diffusion Models") in Flax, reading the publisher's
`unet/` folder: config.json and diffusion_pytorch_model[.fp16].safetensors (or its shards).

    cfg, params = load("/data/sd15/unet")
    eps_hat = UNet2DConditionModel(cfg).apply(params, z_t, t, context)   # [B, h, w, 4]

Layout NHWC throughout; the param map transposes torch's OIHW convolutions and [out, in] Linears
once at load. Names and channel bookkeeping follow diffusers' unet_2d_condition.py and
unet_2d_blocks.py (get_down_block / get_up_block), so each tensor's shape checks them.
The blocks shared with the autoencoder (ResnetBlock2D, Downsample2D, Upsample2D, Attention) are
in models/diffusers_blocks.py.

Details that differ from what one might guess:
- config `attention_head_dim` is the NUMBER of heads (diffusers keeps the misnomer); a config
  giving `num_attention_heads` means the same. The mid block takes the last block's value.
- `use_linear_projection` (SD 2.x): Transformer2D's proj_in / proj_out are Linears; SD 1.x's
  are 1x1 convolutions.
- up blocks concatenate [hidden, skip] on channels, in that order.
Parameters keep the dtype they are loaded as; cfg.dtype is the computation dtype; GroupNorm,
LayerNorm and softmax run in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax.models.diffusers_blocks import (ACTIVATIONS, Attention, Downsample2D, ResnetBlock2D,
                                             Upsample2D, check_blocks, check_fields, conv,
                                             conv_map, dense_map, group_norm, norm_map,
                                             read_config, refuse, resnet_map, timestep_embedding)
from t2i_jax.models.weights import ParamMap, load_params

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK = "UNetMidBlock2DCrossAttn"

# config.json fields the port reads; the ones that change nothing for the blocks it implements
# (dropout at inference; the Simple*/ResnetDownsample blocks' resnet_skip_time_act,
# resnet_out_scale_factor, cross_attention_norm, mid_block_only_cross_attention; embeddings'
# inputs of a class/addition embedding that is absent) are read and ignored.
_UNET_FIELDS = frozenset("""
    sample_size in_channels out_channels center_input_sample flip_sin_to_cos freq_shift
    down_block_types mid_block_type up_block_types only_cross_attention block_out_channels
    layers_per_block downsample_padding mid_block_scale_factor dropout act_fn norm_num_groups
    norm_eps cross_attention_dim transformer_layers_per_block reverse_transformer_layers_per_block
    encoder_hid_dim encoder_hid_dim_type attention_head_dim num_attention_heads dual_cross_attention
    use_linear_projection class_embed_type addition_embed_type addition_time_embed_dim
    num_class_embeds upcast_attention resnet_time_scale_shift resnet_skip_time_act
    resnet_out_scale_factor time_embedding_type time_embedding_dim time_embedding_act_fn
    timestep_post_act time_cond_proj_dim conv_in_kernel conv_out_kernel
    projection_class_embeddings_input_dim attention_type class_embeddings_concat
    mid_block_only_cross_attention cross_attention_norm addition_embed_type_num_heads
""".split())


def _per_block(model: str, field: str, value, n: int) -> Tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{model} config field {field}={list(value)} has {len(value)} "
                             f"entries for {n} down blocks.")
        return tuple(int(v) for v in value)
    return (int(value),) * n


def _strip(kind: str) -> str:
    return kind[len("UNetRes"):] if kind.startswith("UNetRes") else kind  # as get_down_block


# ---- config ----

@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
    """The network's shape; defaults are Stable Diffusion 1.5's. Per-block tuples are indexed by
    down block (the up path reads them reversed, as diffusers does)."""
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: Tuple[int, ...] = (2, 2, 2, 2)
    num_attention_heads: Tuple[int, ...] = (8, 8, 8, 8)  # config.json's attention_head_dim
    cross_attention_dim: Tuple[int, ...] = (768,) * 4
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    center_input_sample: bool = False
    time_embedding_dim: Optional[int] = None  # None: 4 * block_out_channels[0]
    sample_size: Any = None                   # the latent size it was trained at (int or [h, w])
    dtype: str = "float32"
    attention_impl: str = "einsum"            # layers.attention: "einsum" or "dot_product"
    remat: bool = False                       # rematerialise each block in the backward pass

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "layers_per_block",
                     "num_attention_heads", "cross_attention_dim"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"UNet2DConditionModel {name} has {len(getattr(self, name))} "
                                 f"entries for {n} block_out_channels.")
        for name in ("down_block_types", "up_block_types", "layers_per_block",
                     "num_attention_heads", "cross_attention_dim", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # hashable
        bad = [k for k in self.down_block_types if k not in DOWN_BLOCKS]
        bad += [k for k in self.up_block_types if k not in UP_BLOCKS]
        if bad:
            raise ValueError(f"block types {bad} are not ported: down blocks {DOWN_BLOCKS}, up "
                             f"blocks {UP_BLOCKS}.")
        check_blocks(self)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def from_diffusers(cls, config: dict, **overrides) -> "UNet2DConditionConfig":
        """The config of a diffusers UNet2DConditionModel config.json dict (absent fields take
        diffusers' defaults); ValueError naming any field whose value the port does not
        implement (SDXL's addition_embed_type "text_time", class embeddings, other block types,
        ...) and what it supports. overrides: dtype, attention_impl."""
        m, c = "UNet2DConditionModel", dict(config)
        check_fields(m, c, _UNET_FIELDS)
        g = lambda k, d=None: c.get(k, d)  # noqa: E731
        if g("act_fn", "silu") not in ACTIVATIONS:
            refuse(m, "act_fn", g("act_fn"), "act_fn 'silu'")
        if g("mid_block_type", MID_BLOCK) != MID_BLOCK:
            refuse(m, "mid_block_type", g("mid_block_type"), f"mid_block_type {MID_BLOCK!r}")
        only = g("only_cross_attention", False)
        if any(only) if isinstance(only, (list, tuple)) else only:
            refuse(m, "only_cross_attention", only, "self- then cross-attention (false)")
        tl = g("transformer_layers_per_block", 1)
        if any(v != 1 for v in (tl if isinstance(tl, (list, tuple)) else [tl])):
            refuse(m, "transformer_layers_per_block", tl, "one transformer layer per block (1)")
        for field, default, supports in (
                ("addition_embed_type", None, "addition_embed_type None (Stable Diffusion "
                 "1.x/2.x); SDXL's 'text_time' and the other added embeddings are not ported"),
                ("class_embed_type", None, "no class embedding (class_embed_type None)"),
                ("num_class_embeds", None, "no class embedding (num_class_embeds None)"),
                ("class_embeddings_concat", False, "class_embeddings_concat false"),
                ("dual_cross_attention", False, "single cross-attention (false)"),
                ("reverse_transformer_layers_per_block", None, "symmetric blocks (None)"),
                ("encoder_hid_dim", None, "context fed to cross-attention as is (None)"),
                ("encoder_hid_dim_type", None, "context fed to cross-attention as is (None)"),
                ("resnet_time_scale_shift", "default", "resnet_time_scale_shift 'default' "
                 "(time embedding added after conv1)"),
                ("time_embedding_type", "positional", "sinusoidal timesteps ('positional')"),
                ("time_embedding_act_fn", None, "time_embedding_act_fn None"),
                ("timestep_post_act", None, "timestep_post_act None"),
                ("time_cond_proj_dim", None, "time_cond_proj_dim None (no timestep_cond)"),
                ("conv_in_kernel", 3, "conv_in_kernel 3"),
                ("conv_out_kernel", 3, "conv_out_kernel 3"),
                ("attention_type", "default", "attention_type 'default' (no GLIGEN)"),
        ):
            if g(field, default) != default:
                refuse(m, field, g(field), supports)
        if g("norm_num_groups", 32) is None:
            refuse(m, "norm_num_groups", None, "GroupNorm in every resnet (an integer)")
        boc = tuple(int(v) for v in g("block_out_channels", (320, 640, 1280, 1280)))
        n = len(boc)
        down = tuple(_strip(k) for k in g("down_block_types", cls.down_block_types))
        up = tuple(_strip(k) for k in g("up_block_types", cls.up_block_types))
        for field, kinds, ok in (("down_block_types", down, DOWN_BLOCKS),
                                 ("up_block_types", up, UP_BLOCKS)):
            if len(kinds) != n:
                raise ValueError(f"{m} config field {field} has {len(kinds)} entries for {n} "
                                 "block_out_channels.")
            if any(k not in ok for k in kinds):
                refuse(m, field, list(kinds), f"{field} from {ok}")
        heads_field = "num_attention_heads" if g("num_attention_heads") else "attention_head_dim"
        heads = g(heads_field, 8)  # either way the head COUNT (diffusers' misnomer)
        kwargs = dict(
            in_channels=int(g("in_channels", 4)), out_channels=int(g("out_channels", 4)),
            block_out_channels=boc, down_block_types=down, up_block_types=up,
            layers_per_block=_per_block(m, "layers_per_block", g("layers_per_block", 2), n),
            num_attention_heads=_per_block(m, heads_field, heads, n),
            cross_attention_dim=_per_block(m, "cross_attention_dim",
                                           g("cross_attention_dim", 1280), n),
            use_linear_projection=bool(g("use_linear_projection", False)),
            upcast_attention=bool(g("upcast_attention", False)),
            norm_num_groups=int(g("norm_num_groups", 32)), norm_eps=float(g("norm_eps", 1e-5)),
            downsample_padding=int(g("downsample_padding", 1)),
            mid_block_scale_factor=float(g("mid_block_scale_factor", 1.0)),
            flip_sin_to_cos=bool(g("flip_sin_to_cos", True)), freq_shift=float(g("freq_shift", 0)),
            center_input_sample=bool(g("center_input_sample", False)),
            time_embedding_dim=g("time_embedding_dim"), sample_size=g("sample_size"))
        sample = kwargs["sample_size"]
        kwargs["sample_size"] = tuple(sample) if isinstance(sample, list) else sample
        kwargs.update(overrides)
        return cls(**kwargs)


class _Block(NamedTuple):
    """One down or up block as diffusers builds it: each resnet's input channels (an up block's
    include the concatenated skip), the block's channels, heads, context width, and whether it
    ends with a down/up sampler."""
    attn: bool
    resnet_in: Tuple[int, ...]
    out: int
    heads: int
    cross_dim: int
    resample: bool


def down_blocks(cfg: UNet2DConditionConfig) -> Tuple[_Block, ...]:
    boc, n, out = cfg.block_out_channels, len(cfg.block_out_channels), []
    for i, kind in enumerate(cfg.down_block_types):
        cin = boc[max(i - 1, 0)]
        ins = (cin,) + (boc[i],) * (cfg.layers_per_block[i] - 1)
        out.append(_Block(kind == "CrossAttnDownBlock2D", ins, boc[i], cfg.num_attention_heads[i],
                          cfg.cross_attention_dim[i], i < n - 1))
    return tuple(out)


def up_blocks(cfg: UNet2DConditionConfig) -> Tuple[_Block, ...]:
    """diffusers' up path: block i (of the reversed lists) has layers + 1 resnets; resnet j takes
    (prev_output_channel if j == 0 else out) + (the skip: input_channel for the last, else out)."""
    rev, n, out = cfg.block_out_channels[::-1], len(cfg.block_out_channels), []
    prev = rev[0]
    for i, kind in enumerate(cfg.up_block_types):
        cout, cin = rev[i], rev[min(i + 1, n - 1)]
        layers = cfg.layers_per_block[::-1][i] + 1
        ins = tuple((prev if j == 0 else cout) + (cin if j == layers - 1 else cout)
                    for j in range(layers))
        out.append(_Block(kind == "CrossAttnUpBlock2D", ins, cout,
                          cfg.num_attention_heads[::-1][i], cfg.cross_attention_dim[::-1][i],
                          i < n - 1))
        prev = cout
    return tuple(out)


# ---- the UNet's transformer ----

class BasicTransformerBlock(nn.Module):
    """LN -> self-attention, LN -> cross-attention to the context, LN -> GEGLU feed-forward
    (Linear to 2 * 4 dim, hidden * gelu(gate), exact erf GELU; Linear back), each residual."""
    dim: int
    heads: int
    upcast: bool
    impl: str
    dtype: Any

    @nn.compact
    def __call__(self, x, context):
        ln = lambda name: (lambda a: nn.LayerNorm(  # noqa: E731
            1e-5, dtype=jnp.float32, use_fast_variance=False, name=name)(
                a.astype(jnp.float32)).astype(self.dtype))
        attn = lambda name: Attention(  # noqa: E731
            self.heads, self.dim // self.heads, self.dim, upcast=self.upcast, impl=self.impl,
            dtype=self.dtype, name=name)
        x = x + attn("attn1")(ln("norm1")(x))
        x = x + attn("attn2")(ln("norm2")(x), context)
        h = nn.Dense(8 * self.dim, dtype=self.dtype, name="ff_net_0_proj")(ln("norm3")(x))
        hidden, gate = jnp.split(h, 2, axis=-1)
        h = hidden * jax.nn.gelu(gate, approximate=False)
        return x + nn.Dense(self.dim, dtype=self.dtype, name="ff_net_2")(h)


class Transformer2D(nn.Module):
    """diffusers' Transformer2DModel (continuous input): x + proj_out(block(proj_in(norm(x))))."""
    heads: int
    groups: int
    linear: bool
    upcast: bool
    impl: str
    dtype: Any

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        inner = self.heads * (c // self.heads)
        y = group_norm(self.groups, 1e-6, "norm")(x).astype(self.dtype)
        if self.linear:
            y = nn.Dense(inner, dtype=self.dtype, name="proj_in")(y.reshape(b, h * w, c))
        else:
            y = conv(inner, 1, self.dtype, "proj_in")(y).reshape(b, h * w, inner)
        y = BasicTransformerBlock(inner, self.heads, self.upcast, self.impl, self.dtype,
                                  name="transformer_blocks_0")(y, context)
        if self.linear:
            y = nn.Dense(c, dtype=self.dtype, name="proj_out")(y).reshape(b, h, w, c)
        else:
            y = conv(c, 1, self.dtype, "proj_out")(y.reshape(b, h, w, inner))
        return y + x


# ---- the UNet ----

class _UNetBlock(nn.Module):
    """A down, mid or up block: resnets, each followed by a Transformer2D where `attn`."""
    cfg: UNet2DConditionConfig
    block: _Block
    kind: str  # "down" | "mid" | "up"

    @nn.compact
    def __call__(self, x, emb, context, skips=(), size=None):
        # (size: the static output size of an up block's upsampler; remat's argument 5)
        cfg, blk = self.cfg, self.block
        dtype = jnp.dtype(cfg.dtype)
        scale = cfg.mid_block_scale_factor if self.kind == "mid" else 1.0
        resnet = lambda j: ResnetBlock2D(  # noqa: E731
            blk.out, cfg.norm_num_groups, cfg.norm_eps, scale, dtype, name=f"resnets_{j}")
        transformer = lambda j: Transformer2D(  # noqa: E731
            blk.heads, cfg.norm_num_groups, cfg.use_linear_projection, cfg.upcast_attention,
            cfg.attention_impl, dtype, name=f"attentions_{j}")
        if self.kind == "mid":  # resnet, then (transformer, resnet)
            return resnet(1)(transformer(0)(resnet(0)(x, emb), context), emb)
        outs, skips = [], list(skips)
        for j in range(len(blk.resnet_in)):
            if self.kind == "up":
                x = jnp.concatenate([x, skips.pop()], axis=-1)  # [hidden, skip], as torch.cat
            x = resnet(j)(x, emb)
            if blk.attn:
                x = transformer(j)(x, context)
            outs.append(x)
        if self.kind == "up":
            return Upsample2D(blk.out, dtype, name="upsamplers_0")(x, size) if blk.resample else x
        if blk.resample:
            x = Downsample2D(blk.out, cfg.downsample_padding, dtype, name="downsamplers_0")(x)
            outs.append(x)
        return x, outs


class UNet2DConditionModel(nn.Module):
    """diffusers' UNet2DConditionModel: (sample [B, H, W, C_in] NHWC, timesteps [B] or scalar,
    int or fractional, encoder_hidden_states [B, L, D]) -> [B, H, W, C_out] float32 (what the
    checkpoint predicts: eps for SD 1.x and 2.x-base, v for the 768-v models). Cross-attention
    attends to every context position (no mask), as diffusers' pipelines call it."""
    cfg: UNet2DConditionConfig

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be [B, H, W, {cfg.in_channels}] (NHWC), got "
                             f"{sample.shape}.")
        b = sample.shape[0]
        widths = set(cfg.cross_attention_dim)
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b or \
                encoder_hidden_states.shape[-1] not in widths or len(widths) != 1:
            raise ValueError(f"encoder_hidden_states must be [{b}, L, {cfg.cross_attention_dim[0]}]"
                             f" (cross_attention_dim), got {encoder_hidden_states.shape}.")
        t = jnp.asarray(timesteps).reshape(-1)
        if t.shape[0] not in (1, b):
            raise ValueError(f"timesteps must be a scalar or [{b}], got {jnp.shape(timesteps)}.")
        t = jnp.broadcast_to(t, (b,))
        x = sample.astype(jnp.float32)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        c0, ted = cfg.block_out_channels[0], cfg.time_embed_dim
        emb = timestep_embedding(t, c0, cfg.flip_sin_to_cos, cfg.freq_shift).astype(dtype)
        emb = nn.Dense(ted, dtype=dtype, name="time_embedding_linear_1")(emb)
        emb = nn.Dense(ted, dtype=dtype, name="time_embedding_linear_2")(nn.silu(emb))  # [B, T]
        context = encoder_hidden_states.astype(dtype)                                    # [B, L, D]
        x = conv(c0, 3, dtype, "conv_in")(x.astype(dtype))
        # remat: each block's activations are recomputed in the backward pass (training memory
        # ~ one block's, not the network's); the parameter tree is the same either way.
        block = nn.remat(_UNetBlock, static_argnums=(5,)) if cfg.remat else _UNetBlock
        skips = [x]
        for i, blk in enumerate(down_blocks(cfg)):
            x, outs = block(cfg, blk, "down", name=f"down_blocks_{i}")(x, emb, context, (), None)
            skips += outs
        last = down_blocks(cfg)[-1]
        mid = _Block(True, (last.out, last.out), last.out, last.heads, last.cross_dim, False)
        x = block(cfg, mid, "mid", name="mid_block")(x, emb, context, (), None)
        for i, blk in enumerate(up_blocks(cfg)):
            n = len(blk.resnet_in)
            mine, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[1:3] if blk.resample else None  # the next skip's size
            x = block(cfg, blk, "up", name=f"up_blocks_{i}")(x, emb, context, tuple(mine), size)
        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out")(x))
        return conv(cfg.out_channels, 3, dtype, "conv_out")(x.astype(dtype)).astype(jnp.float32)


def _attention_map(fx: str, hf: str, dim: int, ctx: int) -> ParamMap:
    return {**dense_map(f"{fx}/to_q", f"{hf}.to_q", dim, dim, bias=False),
            **dense_map(f"{fx}/to_k", f"{hf}.to_k", dim, ctx, bias=False),
            **dense_map(f"{fx}/to_v", f"{hf}.to_v", dim, ctx, bias=False),
            **dense_map(f"{fx}/to_out_0", f"{hf}.to_out.0", dim, dim)}


def _transformer_map(fx: str, hf: str, c: int, heads: int, ctx: int, linear: bool) -> ParamMap:
    inner = heads * (c // heads)
    proj = (lambda f, h, o, i: dense_map(f, h, o, i)) if linear else \
        (lambda f, h, o, i: conv_map(f, h, o, i, 1))
    tb, hb = f"{fx}/transformer_blocks_0", f"{hf}.transformer_blocks.0"
    pmap = {**norm_map(f"{fx}/norm", f"{hf}.norm", c),
            **proj(f"{fx}/proj_in", f"{hf}.proj_in", inner, c),
            **proj(f"{fx}/proj_out", f"{hf}.proj_out", c, inner),
            **_attention_map(f"{tb}/attn1", f"{hb}.attn1", inner, inner),
            **_attention_map(f"{tb}/attn2", f"{hb}.attn2", inner, ctx),
            **dense_map(f"{tb}/ff_net_0_proj", f"{hb}.ff.net.0.proj", 8 * inner, inner),
            **dense_map(f"{tb}/ff_net_2", f"{hb}.ff.net.2", inner, 4 * inner)}
    for n in ("norm1", "norm2", "norm3"):
        pmap.update(norm_map(f"{tb}/{n}", f"{hb}.{n}", inner))
    return pmap


def param_map(cfg: UNet2DConditionConfig) -> ParamMap:
    """Flax path -> (diffusers names, shape in diffusers' layout, transform) of every parameter:
    conv_in, time_embedding.linear_{1,2}, down_blocks.{i}.(resnets.{j}, attentions.{j},
    downsamplers.0.conv), mid_block.(resnets.{0,1}, attentions.0), up_blocks.{i}.(resnets.{j},
    attentions.{j}, upsamplers.0.conv), conv_norm_out, conv_out. Convolutions OIHW -> HWIO,
    Linears [out, in] -> [in, out], norms' weight -> scale."""
    c0, ted = cfg.block_out_channels[0], cfg.time_embed_dim
    pmap = {**conv_map("conv_in", "conv_in", c0, cfg.in_channels, 3),
            **dense_map("time_embedding_linear_1", "time_embedding.linear_1", ted, c0),
            **dense_map("time_embedding_linear_2", "time_embedding.linear_2", ted, ted)}

    def block(fx, hf, blk, sampler):
        for j, cin in enumerate(blk.resnet_in):
            pmap.update(resnet_map(f"{fx}/resnets_{j}", f"{hf}.resnets.{j}", cin, blk.out, ted))
            if blk.attn:
                pmap.update(_transformer_map(f"{fx}/attentions_{j}", f"{hf}.attentions.{j}",
                                             blk.out, blk.heads, blk.cross_dim,
                                             cfg.use_linear_projection))
        if blk.resample:
            pmap.update(conv_map(f"{fx}/{sampler}_0/conv", f"{hf}.{sampler}.0.conv",
                                 blk.out, blk.out, 3))

    for i, blk in enumerate(down_blocks(cfg)):
        block(f"down_blocks_{i}", f"down_blocks.{i}", blk, "downsamplers")
    last = down_blocks(cfg)[-1]
    block("mid_block", "mid_block", _Block(True, (last.out,), last.out, last.heads,
                                           last.cross_dim, False), None)
    pmap.update(resnet_map("mid_block/resnets_1", "mid_block.resnets.1", last.out, last.out, ted))
    for i, blk in enumerate(up_blocks(cfg)):
        block(f"up_blocks_{i}", f"up_blocks.{i}", blk, "upsamplers")
    pmap.update(norm_map("conv_norm_out", "conv_norm_out", c0))
    pmap.update(conv_map("conv_out", "conv_out", cfg.out_channels, c0, 3))
    return pmap


def load(directory: str, *, dtype: str = "float32", param_dtype: str = "float32", mesh=None,
         variant: Optional[str] = None):
    """(UNet2DConditionConfig, {"params": ...}) from a diffusers unet/ folder: config.json and
    diffusion_pytorch_model.safetensors, its .fp16. variant, or shards with their index (see
    weights.weight_files). dtype: the computation dtype; param_dtype: the parameters'."""
    cfg = UNet2DConditionConfig.from_diffusers(read_config(directory), dtype=dtype)
    return cfg, load_params(directory, param_map(cfg), mesh=mesh, dtype=param_dtype,
                            variant=variant)
