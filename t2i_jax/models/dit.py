"""DiT, the Diffusion Transformer (Peebles & Xie 2023), conditioned on text as PixArt-alpha
(Chen et al. 2023): cross-attention to the text tokens in every block. NHWC in and out.

eps_hat = DiT(x_t, t, context, context_mask, pooled, label, ...), with the UNet's signature and
meaning (models/unet.py). B batch, H x W x C image, p patch, N = HW / p^2 tokens, D width:

    tokens  h = patchify(x_t) W_patch + b + pos                  [B, N, D]  (DiT sec. 3.2, Patchify)
            patchify: [B, H, W, C] -> [B, N, p p C], row-major patches (a reshape), then a Dense:
            the same map as a p x p convolution of stride p; pos: fixed 2-D sin-cos (MAE)
    cond    c = MLP(emb(t)) + W_p pooled + E[label] + MLP(emb(1000 s)) + W_e embedding   [B, D]
    block   (b1, g1, a1, b2, g2, a2) = W_ada silu(c), W_ada = 0 at init   (sec. 3.2, adaLN-Zero)
            h += a1 * SelfAttn(LN(h) (1 + g1) + b1)
            h += CrossAttn(LN'(h), context, context_mask)           W_out = 0 at init
            h += a2 * MLP(LN(h) (1 + g2) + b2)
    final   out = unpatchify(Dense(LN(h) (1 + g) + b))              [B, H, W, C_out], Dense = 0

so every block is exactly the identity at initialisation and eps_hat is exactly 0. An SR stage's
low-resolution image and an inpainting model's [known * mask, mask] are concatenated with x_t on
the channel axis before patchify, as in the UNet; the label table has a null row (num_classes).

Optionally there are convolutions on either side (off by default, as in DiT): `conv_stem` F, a
3x3 conv to F channels and SiLU before patchify (Xiao et al. 2021, "Early convolutions help
transformers see better"), and `conv_head` G: the final Dense emits G features a pixel, and
after unpatchify a 3x3 conv maps them to C_out (with G = C_out, U-ViT's "extra 3x3 conv block
after the linear projection", Bao et al. 2023, sec. 3.1). With large patches on a small image
(4x4 at 32x32) they let a token see its neighbours' edges and let the output cross patch seams;
the head's input is the zero Dense's output and its bias starts at 0, so eps_hat is still 0 at
init.

Text enters by cross-attention (PixArt-alpha sec. 2.3) rather than MMDiT's joint attention over
image and text tokens (SD3): it adds O(N L) per block for L text tokens where joint attention
costs O((N + L)^2) and a second stream of weights; it reads the text encoders' token features
and padding masks as they are (the UNet's interface, so every encoder and null works
unchanged); and PixArt-alpha shows it trains text-to-image well. PixArt has no norm before its
cross-attention, and shares one adaLN across blocks (adaLN-single); we keep DiT's per-block
adaLN-Zero and the LayerNorm of Stable Diffusion's blocks (LN').

The blocks are ONE module run by nn.scan over `depth` (parameters stacked on a leading [depth]
axis, under "block_stack"), so the compiled program, and its compile time, do not grow with
depth; cfg.scan=False unrolls them (bench/dit_compile.py compares the two: on the CPU the
unrolled step runs faster, and compiles slower from depth ~8 on).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from t2i_jax.diffusion import augmentation
from t2i_jax.models.layers import ATTENTION_IMPLS, Embed, attention, timestep_embedding, zeros_init

STACK = "block_stack"  # the scanned blocks; sharding.py never splits a *_stack's leading axis
xavier = nn.initializers.xavier_uniform()


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """The DiT's shape (DiT-S/2: width 384, depth 12, 6 heads). `DiTConfig(**config.model.dit)`."""
    out_channels: int = 3
    patch_size: int = 2
    width: int = 384                  # D
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: Optional[int] = None  # class-conditional: labels 0..n-1, n is the null label
    freq_dim: int = 256               # sinusoidal features of t before its MLP (DiT)
    dropout: float = 0.0              # on the MLP's hidden units
    attention_impl: str = "einsum"    # "einsum" or "dot_product" (cuDNN-fused on GPUs)
    dtype: str = "float32"            # computation dtype; parameters stay float32
    remat: bool = False               # rematerialise each block in the backward pass
    scan: bool = True                 # nn.scan over the blocks; False: an unrolled loop
    conv_stem: int = 0                # > 0: a 3x3 conv to this many channels (+ SiLU) before
    #                                   patchify (Xiao et al. 2021, early convolutions)
    conv_head: int = 0                # > 0: the final layer emits this many features a pixel,
    #                                   a 3x3 conv after unpatchify maps them to out_channels

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; choose one of "
                             f"{ATTENTION_IMPLS}.")
        if self.width % self.num_heads:
            raise ValueError(f"dit.width={self.width} does not split into {self.num_heads} heads.")
        if self.width % 4:
            raise ValueError(f"dit.width={self.width} must be a multiple of 4 (the 2-D sin-cos "
                             "position embedding has sin and cos of the row and of the column).")
        if self.conv_stem < 0 or self.conv_head < 0 or isinstance(self.conv_head, bool):
            raise ValueError(f"dit.conv_stem={self.conv_stem} and dit.conv_head={self.conv_head} "
                             "are channel counts >= 0 (0: none).")
        if self.patch_size < 1 or self.depth < 1:
            raise ValueError(f"dit.patch_size={self.patch_size} and dit.depth={self.depth} must "
                             "be >= 1.")
        jnp.dtype(self.dtype)  # raises on an unknown dtype name

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


def patchify(x, p: int):
    """Returns the [B, (H/p)(W/p), p p C] patches of x [B, H, W, C], row-major: token i * W/p + j
    is x[:, i p:(i+1) p, j p:(j+1) p, :] flattened in (row, column, channel) order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, p: int, h: int, w: int):
    """Inverse of patchify: [B, (h/p)(w/p), p p C] -> [B, h, w, C]."""
    b, _, f = tokens.shape
    c = f // (p * p)
    x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def pos_embed_2d(dim: int, rows: int, cols: int) -> np.ndarray:
    """Returns the fixed 2-D sin-cos position embedding [rows * cols, dim] (MAE, as DiT): the first
    half [sin, cos] of the token's column, the second of its row, frequencies 1/10000^(k/(dim/4))."""
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    row, col = np.divmod(np.arange(rows * cols), cols)
    half = lambda pos: np.concatenate([np.sin(pos[:, None] * omega), np.cos(pos[:, None] * omega)], 1)
    return np.concatenate([half(col), half(row)], axis=1).astype(np.float32)  # [N, dim]


def modulate(x, shift, scale):
    """adaLN: x (1 + scale) + shift, with shift and scale [B, 1, D] regressed from c."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """emb(t) -> Dense -> SiLU -> Dense: [B] (int or fractional t) -> [B, D] (DiT's t_embedder)."""
    width: int
    freq_dim: int = 256
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t):
        init = nn.initializers.normal(0.02)
        emb = timestep_embedding(t, self.freq_dim).astype(self.dtype)       # [B, freq_dim]
        emb = nn.silu(nn.Dense(self.width, dtype=self.dtype, kernel_init=init)(emb))
        return nn.Dense(self.width, dtype=self.dtype, kernel_init=init)(emb)  # [B, D]


class Attention(nn.Module):
    """Multi-head attention from x [B, Lq, D] to context [B, Lk, Dc] (x itself when None), with
    biased q/k/v and output projections (timm's Attention, as DiT); `out_init` of the output."""
    num_heads: int
    impl: str = "einsum"
    dtype: jnp.dtype = jnp.float32
    out_init: nn.initializers.Initializer = xavier

    @nn.compact
    def __call__(self, x, context=None, mask=None):
        kv = x if context is None else context.astype(self.dtype)
        d = x.shape[-1]
        dense = lambda name: nn.DenseGeneral((self.num_heads, d // self.num_heads), dtype=self.dtype,
                                             kernel_init=xavier, name=name)
        q, k, v = dense("to_q")(x), dense("to_k")(kv), dense("to_v")(kv)  # [B, L, H, D/H]
        out = attention(q, k, v, mask, self.impl)
        out = out.reshape(out.shape[:2] + (d,))
        return nn.Dense(d, dtype=self.dtype, kernel_init=self.out_init, name="to_out")(out)  # [B, Lq, D]


def _layer_norm(dtype, name=None):
    """LayerNorm without its own affine (the adaLN supplies it), eps 1e-6 (DiT)."""
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)


class DiTBlock(nn.Module):
    """One adaLN-Zero block with cross-attention: (h [B, N, D], c [B, D], context, mask) -> h.
    Returns (h, None): the carry and output of nn.scan."""
    cfg: DiTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, h, c, context=None, context_mask=None):
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        d = h.shape[-1]
        ada = nn.Dense(6 * d, dtype=dtype, kernel_init=zeros_init, name="adaLN")(nn.silu(c))
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(ada[:, None], 6, -1)  # [B, 1, D]
        attn = lambda name, **kw: Attention(cfg.num_heads, cfg.attention_impl, dtype, name=name, **kw)
        h = h + gate1 * attn("self_attn")(modulate(_layer_norm(dtype)(h), shift1, scale1))
        if context is not None:
            y = nn.LayerNorm(epsilon=1e-6, dtype=dtype, name="ln_cross")(h)
            h = h + attn("cross_attn", out_init=zeros_init)(y, context, context_mask)
        y = modulate(_layer_norm(dtype)(h), shift2, scale2)
        y = nn.gelu(nn.Dense(cfg.mlp_width, dtype=dtype, kernel_init=xavier, name="mlp_in")(y))
        y = nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)
        y = nn.Dense(d, dtype=dtype, kernel_init=xavier, name="mlp_out")(y)
        return h + gate2 * y, None


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a zero-initialised Dense: [B, N, D] -> [B, N, p p C_out]
    (p p conv_head with a conv head)."""
    cfg: DiTConfig

    @nn.compact
    def __call__(self, h, c):
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        ada = nn.Dense(2 * h.shape[-1], dtype=dtype, kernel_init=zeros_init, name="adaLN")(nn.silu(c))
        shift, scale = jnp.split(ada[:, None, :], 2, axis=-1)  # [B, 1, D]
        h = modulate(_layer_norm(dtype)(h), shift, scale)
        return nn.Dense(cfg.patch_size ** 2 * (cfg.conv_head or cfg.out_channels), dtype=dtype,
                        kernel_init=zeros_init, name="linear")(h)


def _blocks(cfg: DiTConfig):
    """The block module class: rematerialised if configured, and scanned over depth."""
    block = nn.remat(DiTBlock, prevent_cse=not cfg.scan) if cfg.remat else DiTBlock
    if not cfg.scan:
        return block
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.depth)


class DiT(nn.Module):
    """Returns eps_hat [B, H, W, out_channels] (float32) for x_t [B, H, W, C] and t [B]."""
    cfg: DiTConfig

    @nn.compact
    def __call__(self, x, t, context=None, context_mask=None, pooled=None, label=None,
                 deterministic: bool = True, low_res=None, aug_level=None, embedding=None,
                 known=None, known_mask=None):
        cfg, dtype = self.cfg, self.cfg.compute_dtype
        b, height, width, _ = x.shape
        p, d = cfg.patch_size, cfg.width
        if height % p or width % p:
            raise ValueError(f"image size {(height, width)} must be divisible by dit.patch_size={p}.")
        c = TimestepEmbedder(d, cfg.freq_dim, dtype, name="t_embed")(t)  # [B, D]
        if pooled is not None:  # GLIDE: the pooled text feature joins the conditioning vector
            c = c + nn.Dense(d, dtype=dtype, name="pooled_proj")(pooled.astype(dtype))
        if embedding is not None:  # unCLIP: the CLIP image embedding joins it
            c = c + nn.Dense(d, dtype=dtype, name="embedding_proj")(embedding.astype(dtype))
        if cfg.num_classes is not None:
            if label is None:
                raise ValueError("this DiT is class-conditional (num_classes is set): pass label [B].")
            c = c + Embed(cfg.num_classes + 1, d, dtype, name="label_embed")(label)
        if aug_level is not None:  # the level s in [0, 1) on the timestep scale 0..1000
            c = c + TimestepEmbedder(d, cfg.freq_dim, dtype, name="aug_embed")(aug_level * 1000.0)
        if low_res is not None:
            x = jnp.concatenate([x, augmentation.upsample(low_res, height).astype(x.dtype)], -1)
        if known is not None:  # GLIDE's inpainting input: [x_t, known * mask, mask]
            m = known_mask.astype(x.dtype)
            x = jnp.concatenate([x, known.astype(x.dtype) * m, m], -1)
        x = x.astype(dtype)
        if cfg.conv_stem:  # each token sees its patch's neighbours' edges, not only its pixels
            x = nn.silu(nn.Conv(cfg.conv_stem, (3, 3), dtype=dtype, name="conv_stem")(x))
        patches = patchify(x, p)                                              # [B, N, p p C']
        h = nn.Dense(d, dtype=dtype, kernel_init=xavier, name="patch_embed")(patches)  # [B, N, D]
        h = h + jnp.asarray(pos_embed_2d(d, height // p, width // p), dtype)
        Block = _blocks(cfg)
        if cfg.scan:
            h, _ = Block(cfg, deterministic, name=STACK)(h, c, context, context_mask)
        else:
            for i in range(cfg.depth):
                h, _ = Block(cfg, deterministic, name=f"block_{i}")(h, c, context, context_mask)
        out = FinalLayer(cfg, name="final_layer")(h, c)                    # [B, N, p p C']
        out = unpatchify(out, p, height, width)                            # [B, H, W, C']
        if cfg.conv_head:  # mends the seams between patches; 0 in, 0 out, so still 0 at init
            out = nn.Conv(cfg.out_channels, (3, 3), dtype=dtype, name="conv_head")(out)
        return out.astype(jnp.float32)
