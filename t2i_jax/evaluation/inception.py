"""The FID InceptionV3 feature extractor (pool3, 2048-d) in Flax, and its weights from PyTorch.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium") compares the Gaussian statistics of the 2048-d "pool3" features of InceptionV3
(Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision") for real and
generated images. Published numbers use one particular network: the TensorFlow graph
inception-2015-12-05 of the authors' TTUR code, ported to PyTorch by pytorch-fid
(github.com/mseitzer/pytorch-fid, `fid_inception_v3()` in src/pytorch_fid/inception.py).
This module is that network, layer for layer:

* torchvision's Inception3 without the auxiliary classifier, where Mixed_5b..5d are
  FIDInceptionA, Mixed_6b..6e FIDInceptionC, Mixed_7b FIDInceptionE_1 and Mixed_7c
  FIDInceptionE_2 (Mixed_6a and Mixed_7a are the stock InceptionB and InceptionD);
* the FID blocks' pool branch is a 3x3 stride-1 average pool with padding 1 that does NOT count
  the padded zeros (torch `count_include_pad=False`, as TensorFlow does), except in Mixed_7c,
  whose pool branch is a 3x3 stride-1 max pool (a quirk of the original graph);
* every convolution is BasicConv2d: conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU;
* a 3x3 stride-2 max pool follows Conv2d_2b_3x3 and Conv2d_4a_3x3, and the output is the global
  average of Mixed_7c (torch's AdaptiveAvgPool2d((1, 1))): [B, 2048], >= 0. The 1008-way `fc`
  layer is not used.

Here each BasicConv2d is ONE convolution with a bias: `convert_state_dict` folds the inference
BatchNorm into it (kernel * gamma / sqrt(var + eps), bias = beta - mean * gamma / sqrt(var + eps)),
which is exact up to float rounding. The parameter tree mirrors the PyTorch names:
`Conv2d_1a_3x3.conv.weight` + `Conv2d_1a_3x3.bn.*` -> params["Conv2d_1a_3x3"]{"kernel", "bias"},
`Mixed_5b.branch1x1.conv.weight` + `Mixed_5b.branch1x1.bn.*` -> params["Mixed_5b"]["branch1x1"].
Kernels are HWIO (PyTorch: OIHW); images are NHWC.

Inputs are float images in [-1, 1] (the range the network was trained on). pytorch-fid takes
[0, 1] images, resizes them to 299x299 (bilinear, align_corners=False, no antialiasing) and maps
them to 2x - 1; `preprocess` resizes [-1, 1] images with the same filter, which is the same thing
because the resize is linear and its weights sum to one. Features therefore match pytorch-fid's
(up to float rounding), not bit-for-bit TTUR's TensorFlow graph, whose resize differs slightly.

Getting the weights on a machine without internet access or torch:

1. Anywhere with internet, download FID_WEIGHTS_URL (pytorch-fid's release file
   pt_inception-2015-12-05-6726825d.pth; 6726825d is the start of its SHA-256).
2. Anywhere with torch (`pip install torch`), convert it to a plain NumPy archive:
       python -m t2i_jax.evaluation.convert_inception pt_inception-2015-12-05-6726825d.pth \\
           inception_fid.npz
3. Copy inception_fid.npz to the machine that computes FID; it needs neither torch nor internet:
       params = load_params("inception_fid.npz")
       features = make_feature_fn(params)
       f = features(images)   # images [B, H, W, 1 or 3] in [-1, 1] -> [B, 2048] float32
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from t2i_jax import files

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
INPUT_SIZE = 299       # the network's input resolution (any side >= MIN_INPUT_SIZE runs)
MIN_INPUT_SIZE = 75    # the smallest input that leaves Mixed_7c a non-empty feature map
FEATURE_DIM = 2048
BN_EPS = 1e-3          # BasicConv2d's BatchNorm2d(eps=0.001)

Precision = Optional[lax.Precision]


# --------------------------------------------------------------------------------------------
# The architecture as data: every BasicConv2d's shape, stride and padding, keyed by its PyTorch
# name. The Flax modules below build from these tables and the converter checks against them.
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One BasicConv2d, in PyTorch's terms: Conv2d(in_channels, out_channels, kernel_size=kernel,
    stride=stride, padding=padding) with (height, width) pairs and symmetric zero padding."""
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @property
    def torch_weight_shape(self) -> tuple[int, int, int, int]:   # OIHW
        return (self.out_channels, self.in_channels, *self.kernel)

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:         # HWIO
        return (*self.kernel, self.in_channels, self.out_channels)


def _inception_a_convs(in_channels: int, pool_features: int) -> dict[str, ConvSpec]:
    c = in_channels
    return {
        "branch1x1": ConvSpec(c, 64, (1, 1)),
        "branch5x5_1": ConvSpec(c, 48, (1, 1)),
        "branch5x5_2": ConvSpec(48, 64, (5, 5), padding=(2, 2)),
        "branch3x3dbl_1": ConvSpec(c, 64, (1, 1)),
        "branch3x3dbl_2": ConvSpec(64, 96, (3, 3), padding=(1, 1)),
        "branch3x3dbl_3": ConvSpec(96, 96, (3, 3), padding=(1, 1)),
        "branch_pool": ConvSpec(c, pool_features, (1, 1)),
    }


def _inception_b_convs(in_channels: int) -> dict[str, ConvSpec]:
    c = in_channels
    return {
        "branch3x3": ConvSpec(c, 384, (3, 3), stride=2),
        "branch3x3dbl_1": ConvSpec(c, 64, (1, 1)),
        "branch3x3dbl_2": ConvSpec(64, 96, (3, 3), padding=(1, 1)),
        "branch3x3dbl_3": ConvSpec(96, 96, (3, 3), stride=2),
    }


def _inception_c_convs(in_channels: int, channels_7x7: int) -> dict[str, ConvSpec]:
    c, c7 = in_channels, channels_7x7
    return {
        "branch1x1": ConvSpec(c, 192, (1, 1)),
        "branch7x7_1": ConvSpec(c, c7, (1, 1)),
        "branch7x7_2": ConvSpec(c7, c7, (1, 7), padding=(0, 3)),
        "branch7x7_3": ConvSpec(c7, 192, (7, 1), padding=(3, 0)),
        "branch7x7dbl_1": ConvSpec(c, c7, (1, 1)),
        "branch7x7dbl_2": ConvSpec(c7, c7, (7, 1), padding=(3, 0)),
        "branch7x7dbl_3": ConvSpec(c7, c7, (1, 7), padding=(0, 3)),
        "branch7x7dbl_4": ConvSpec(c7, c7, (7, 1), padding=(3, 0)),
        "branch7x7dbl_5": ConvSpec(c7, 192, (1, 7), padding=(0, 3)),
        "branch_pool": ConvSpec(c, 192, (1, 1)),
    }


def _inception_d_convs(in_channels: int) -> dict[str, ConvSpec]:
    c = in_channels
    return {
        "branch3x3_1": ConvSpec(c, 192, (1, 1)),
        "branch3x3_2": ConvSpec(192, 320, (3, 3), stride=2),
        "branch7x7x3_1": ConvSpec(c, 192, (1, 1)),
        "branch7x7x3_2": ConvSpec(192, 192, (1, 7), padding=(0, 3)),
        "branch7x7x3_3": ConvSpec(192, 192, (7, 1), padding=(3, 0)),
        "branch7x7x3_4": ConvSpec(192, 192, (3, 3), stride=2),
    }


def _inception_e_convs(in_channels: int) -> dict[str, ConvSpec]:
    c = in_channels
    return {
        "branch1x1": ConvSpec(c, 320, (1, 1)),
        "branch3x3_1": ConvSpec(c, 384, (1, 1)),
        "branch3x3_2a": ConvSpec(384, 384, (1, 3), padding=(0, 1)),
        "branch3x3_2b": ConvSpec(384, 384, (3, 1), padding=(1, 0)),
        "branch3x3dbl_1": ConvSpec(c, 448, (1, 1)),
        "branch3x3dbl_2": ConvSpec(448, 384, (3, 3), padding=(1, 1)),
        "branch3x3dbl_3a": ConvSpec(384, 384, (1, 3), padding=(0, 1)),
        "branch3x3dbl_3b": ConvSpec(384, 384, (3, 1), padding=(1, 0)),
        "branch_pool": ConvSpec(c, 192, (1, 1)),
    }


# Conv2d_1a..Conv2d_4a; a 3x3 stride-2 max pool follows Conv2d_2b_3x3 and Conv2d_4a_3x3.
_STEM: dict[str, ConvSpec] = {
    "Conv2d_1a_3x3": ConvSpec(3, 32, (3, 3), stride=2),
    "Conv2d_2a_3x3": ConvSpec(32, 32, (3, 3)),
    "Conv2d_2b_3x3": ConvSpec(32, 64, (3, 3), padding=(1, 1)),
    "Conv2d_3b_1x1": ConvSpec(64, 80, (1, 1)),
    "Conv2d_4a_3x3": ConvSpec(80, 192, (3, 3)),
}
_POOL_AFTER = ("Conv2d_2b_3x3", "Conv2d_4a_3x3")


# --------------------------------------------------------------------------------------------
# Pools and resizing
# --------------------------------------------------------------------------------------------

def avg_pool_3x3(x: jax.Array) -> jax.Array:
    """F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False) on NHWC: every output is
    the mean of the in-bounds pixels of its 3x3 window (4 at corners, 6 on edges, 9 inside)."""
    h, w = x.shape[1:3]
    total = lax.reduce_window(x, jnp.zeros((), x.dtype), lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                              ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = np.minimum(np.arange(h) + 1, h - 1) - np.maximum(np.arange(h) - 1, 0) + 1
    cols = np.minimum(np.arange(w) + 1, w - 1) - np.maximum(np.arange(w) - 1, 0) + 1
    count = np.outer(rows, cols).astype(np.float32)[None, :, :, None]  # static, known at trace
    return total / count.astype(x.dtype)


def max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    """F.max_pool2d(x, 3, stride, padding) on NHWC (padding is -inf; floor of the output size)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, (1, 3, 3, 1),
                             (1, stride, stride, 1), pad)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of torch's 1-D linear resize with align_corners=False and no
    antialiasing (upsample_bilinear2d): output i samples the input at
    src = max((i + 0.5) * in_size / out_size - 0.5, 0) between floor(src) and the next pixel
    (clamped to the last). Computed in float32, as torch does."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5))
                     - np.float32(0.5), np.float32(0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0.astype(np.float32)
    w0 = np.float32(1) - w1
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), w0)
    np.add.at(m, (rows, i1), w1)
    return m


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resizes NHWC `images` to `size` = (height, width) exactly as torch's
    F.interpolate(x, size, mode="bilinear", align_corners=False) does on NCHW (a separable
    two-tap filter; no antialiasing when shrinking). Returns float32; a no-op at the same size."""
    x = jnp.asarray(images, jnp.float32)
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    hp = lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", bilinear_matrix(h, size[0]), x, precision=hp)
    return jnp.einsum("pw,bowc->bopc", bilinear_matrix(w, size[1]), x, precision=hp)


def preprocess(images: jax.Array) -> jax.Array:
    """[B, H, W, 1 or 3] float images in [-1, 1] -> the network's input [B, 299, 299, 3] float32:
    pytorch-fid's bilinear resize (align_corners=False); one channel is repeated to three (as
    pytorch-fid's PIL convert("RGB") does for grayscale files)."""
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images [B, H, W, 1 or 3] (NHWC), got shape {images.shape}")
    x = resize_bilinear(images, (INPUT_SIZE, INPUT_SIZE))
    if x.shape[-1] == 1:
        x = jnp.broadcast_to(x, (*x.shape[:3], 3))
    return x


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d (conv, inference BatchNorm eps 1e-3, ReLU) with the BatchNorm
    folded into the convolution: relu(conv(x, kernel) + bias). Params: kernel HWIO, bias [O]."""
    spec: ConvSpec
    precision: Precision = lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.spec
        if x.shape[-1] != s.in_channels:
            raise ValueError(f"{self.name}: expected {s.in_channels} input channels, got {x.shape}")
        kernel = self.param("kernel", nn.initializers.lecun_normal(), s.kernel_shape)
        bias = self.param("bias", nn.initializers.zeros_init(), (s.out_channels,))
        y = lax.conv_general_dilated(
            x, kernel.astype(x.dtype), window_strides=(s.stride, s.stride),
            padding=[(p, p) for p in s.padding], dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision)
        return nn.relu(y + bias.astype(x.dtype))


def _conv_factory(specs: Mapping[str, ConvSpec], precision: Precision) -> Callable[[str], BasicConv2d]:
    """Inside a compact method: name -> the BasicConv2d submodule of that name."""
    return lambda name: BasicConv2d(specs[name], precision, name=name)


class InceptionA(nn.Module):
    """pytorch-fid's FIDInceptionA (Mixed_5b..5d): the pool branch averages without the padding."""
    in_channels: int
    pool_features: int
    precision: Precision = lax.Precision.HIGHEST

    def conv_specs(self) -> dict[str, ConvSpec]:
        return _inception_a_convs(self.in_channels, self.pool_features)

    @nn.compact
    def __call__(self, x):
        conv = _conv_factory(self.conv_specs(), self.precision)
        b1 = conv("branch1x1")(x)
        b5 = conv("branch5x5_2")(conv("branch5x5_1")(x))
        b3 = conv("branch3x3dbl_3")(conv("branch3x3dbl_2")(conv("branch3x3dbl_1")(x)))
        bp = conv("branch_pool")(avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision's InceptionB (Mixed_6a): grid reduction 35 -> 17."""
    in_channels: int
    precision: Precision = lax.Precision.HIGHEST

    def conv_specs(self) -> dict[str, ConvSpec]:
        return _inception_b_convs(self.in_channels)

    @nn.compact
    def __call__(self, x):
        conv = _conv_factory(self.conv_specs(), self.precision)
        b3 = conv("branch3x3")(x)
        bd = conv("branch3x3dbl_3")(conv("branch3x3dbl_2")(conv("branch3x3dbl_1")(x)))
        return jnp.concatenate([b3, bd, max_pool(x, stride=2)], axis=-1)


class InceptionC(nn.Module):
    """pytorch-fid's FIDInceptionC (Mixed_6b..6e): factorised 7x7 convolutions; the pool branch
    averages without the padding."""
    in_channels: int
    channels_7x7: int
    precision: Precision = lax.Precision.HIGHEST

    def conv_specs(self) -> dict[str, ConvSpec]:
        return _inception_c_convs(self.in_channels, self.channels_7x7)

    @nn.compact
    def __call__(self, x):
        conv = _conv_factory(self.conv_specs(), self.precision)
        b1 = conv("branch1x1")(x)
        b7 = x
        for name in ("branch7x7_1", "branch7x7_2", "branch7x7_3"):
            b7 = conv(name)(b7)
        bd = x
        for i in range(1, 6):
            bd = conv(f"branch7x7dbl_{i}")(bd)
        bp = conv("branch_pool")(avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision's InceptionD (Mixed_7a): grid reduction 17 -> 8."""
    in_channels: int
    precision: Precision = lax.Precision.HIGHEST

    def conv_specs(self) -> dict[str, ConvSpec]:
        return _inception_d_convs(self.in_channels)

    @nn.compact
    def __call__(self, x):
        conv = _conv_factory(self.conv_specs(), self.precision)
        b3 = conv("branch3x3_2")(conv("branch3x3_1")(x))
        b7 = x
        for i in range(1, 5):
            b7 = conv(f"branch7x7x3_{i}")(b7)
        return jnp.concatenate([b3, b7, max_pool(x, stride=2)], axis=-1)


class InceptionE(nn.Module):
    """pytorch-fid's FIDInceptionE_1 (pool="avg", Mixed_7b: average without the padding) and
    FIDInceptionE_2 (pool="max", Mixed_7c: 3x3 stride-1 max pool)."""
    in_channels: int
    pool: str = "avg"
    precision: Precision = lax.Precision.HIGHEST

    def conv_specs(self) -> dict[str, ConvSpec]:
        return _inception_e_convs(self.in_channels)

    @nn.compact
    def __call__(self, x):
        if self.pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        conv = _conv_factory(self.conv_specs(), self.precision)
        b1 = conv("branch1x1")(x)
        b3 = conv("branch3x3_1")(x)
        b3 = jnp.concatenate([conv("branch3x3_2a")(b3), conv("branch3x3_2b")(b3)], axis=-1)
        bd = conv("branch3x3dbl_2")(conv("branch3x3dbl_1")(x))
        bd = jnp.concatenate([conv("branch3x3dbl_3a")(bd), conv("branch3x3dbl_3b")(bd)], axis=-1)
        pooled = avg_pool_3x3(x) if self.pool == "avg" else max_pool(x, stride=1, padding=1)
        bp = conv("branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


# (PyTorch name, block class, its constructor arguments), in forward order.
_MIXED: tuple[tuple[str, type, dict[str, Any]], ...] = (
    ("Mixed_5b", InceptionA, dict(in_channels=192, pool_features=32)),
    ("Mixed_5c", InceptionA, dict(in_channels=256, pool_features=64)),
    ("Mixed_5d", InceptionA, dict(in_channels=288, pool_features=64)),
    ("Mixed_6a", InceptionB, dict(in_channels=288)),
    ("Mixed_6b", InceptionC, dict(in_channels=768, channels_7x7=128)),
    ("Mixed_6c", InceptionC, dict(in_channels=768, channels_7x7=160)),
    ("Mixed_6d", InceptionC, dict(in_channels=768, channels_7x7=160)),
    ("Mixed_6e", InceptionC, dict(in_channels=768, channels_7x7=192)),
    ("Mixed_7a", InceptionD, dict(in_channels=768)),
    ("Mixed_7b", InceptionE, dict(in_channels=1280, pool="avg")),
    ("Mixed_7c", InceptionE, dict(in_channels=2048, pool="max")),
)


class InceptionV3(nn.Module):
    """The FID InceptionV3 (Szegedy et al. 2016; pytorch-fid's fid_inception_v3) up to pool3.

    __call__(x): x float [B, H, W, 3] in [-1, 1], NHWC, normally 299x299 (see `preprocess`; any
    side >= 75 runs) -> [B, 2048] float32, the global average of Mixed_7c (non-negative).
    `precision` is that of every convolution (HIGHEST: true float32 on GPU/TPU too).
    """
    precision: Precision = lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected x [B, H, W, 3] (NHWC), got shape {x.shape}")
        if min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(f"InceptionV3 needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, "
                             f"got {x.shape[1:3]}; use preprocess() to resize to 299x299")
        for name, spec in _STEM.items():
            x = BasicConv2d(spec, self.precision, name=name)(x)
            if name in _POOL_AFTER:
                x = max_pool(x, stride=2)
        for name, block, kwargs in _MIXED:
            x = block(**kwargs, precision=self.precision, name=name)(x)
        return jnp.mean(x, axis=(1, 2))


def torch_conv_specs() -> dict[str, ConvSpec]:
    """Every BasicConv2d of the network by its PyTorch module path ("Conv2d_1a_3x3",
    "Mixed_5b.branch1x1", ...), in forward order: 94 convolutions."""
    specs = dict(_STEM)
    for name, block, kwargs in _MIXED:
        for conv_name, spec in block(**kwargs).conv_specs().items():
            specs[f"{name}.{conv_name}"] = spec
    return specs


# --------------------------------------------------------------------------------------------
# PyTorch weights -> Flax params
# --------------------------------------------------------------------------------------------

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
_IGNORED_KEYS = ("fc.weight", "fc.bias")  # the 1008-way classifier; FID stops at pool3


def _name_list(names, limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def convert_state_dict(state_dict: Mapping[str, Any], eps: float = BN_EPS) -> dict:
    """pytorch-fid's FID Inception state dict (pt_inception-2015-12-05-6726825d.pth, i.e.
    fid_inception_v3().state_dict(); values NumPy arrays or anything np.asarray accepts) ->
    {"params": ...} for InceptionV3, with each BatchNorm folded into its convolution (float32).

    Needs every `<conv>.conv.weight` and `<conv>.bn.{weight,bias,running_mean,running_var}` of the
    94 BasicConv2d; ignores `fc.weight`, `fc.bias` and `*.bn.num_batches_tracked`. Raises
    ValueError naming every missing key, unexpected key, wrong shape or non-finite value.
    """
    specs = torch_conv_specs()
    expected: dict[str, tuple[int, ...]] = {}
    for prefix, spec in specs.items():
        expected[f"{prefix}.conv.weight"] = spec.torch_weight_shape
        for field in _BN_FIELDS:
            expected[f"{prefix}.bn.{field}"] = (spec.out_channels,)
    ignored = {*_IGNORED_KEYS, *(f"{p}.bn.num_batches_tracked" for p in specs)}

    arrays = {k: np.asarray(v) for k, v in state_dict.items() if k in expected}
    problems = []
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys() - ignored
    if missing:
        problems.append(f"missing keys: {_name_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_name_list(unexpected)}")
    wrong = [f"{k} has shape {arrays[k].shape}, expected {expected[k]}"
             for k in sorted(arrays) if arrays[k].shape != expected[k]]
    if wrong:
        problems.append("shape mismatches: " + "; ".join(wrong[:8])
                        + (f"; ... ({len(wrong)} in all)" if len(wrong) > 8 else ""))
    if not problems:
        bad = [k for k, a in arrays.items() if not np.all(np.isfinite(a))]
        bad += [k for k, a in arrays.items() if k.endswith("running_var") and np.any(a + eps <= 0)]
        if bad:
            problems.append(f"non-finite values or non-positive variances in: {_name_list(bad)}")
    if problems:
        raise ValueError("not the FID Inception state dict (pytorch-fid's "
                         "pt_inception-2015-12-05-6726825d.pth): " + "; ".join(problems))

    params: dict = {}
    for prefix, spec in specs.items():
        w = arrays[f"{prefix}.conv.weight"].astype(np.float64)               # OIHW
        gamma, beta, mean, var = (arrays[f"{prefix}.bn.{f}"].astype(np.float64) for f in _BN_FIELDS)
        scale = gamma / np.sqrt(var + eps)
        node = params
        for part in prefix.split("."):
            node = node.setdefault(part, {})
        node["kernel"] = (w.transpose(2, 3, 1, 0) * scale).astype(np.float32)  # HWIO
        node["bias"] = (beta - mean * scale).astype(np.float32)
    return {"params": params}


@functools.cache
def _module_param_shapes() -> dict[str, tuple[int, ...]]:
    tree = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3), jnp.float32))
    return {k: tuple(v.shape) for k, v in files.flatten_tree(tree).items()}


def param_shapes() -> dict[str, tuple[int, ...]]:
    """The shapes of InceptionV3's variables ({"params": ...}), flat with "/"-joined keys, as
    jax.eval_shape of InceptionV3().init gives them (a trace, no computation)."""
    return dict(_module_param_shapes())


def check_params(params: Mapping) -> None:
    """Raises ValueError unless `params` ({"params": ...}) has exactly InceptionV3's variables and
    shapes, naming what is missing, unexpected or of the wrong shape."""
    want = _module_param_shapes()
    got = {k: tuple(v.shape) if hasattr(v, "shape") else np.shape(v)
           for k, v in files.flatten_tree(params).items()}
    problems = []
    if want.keys() - got.keys():
        problems.append(f"missing: {_name_list(want.keys() - got.keys())}")
    if got.keys() - want.keys():
        problems.append(f"unexpected: {_name_list(got.keys() - want.keys())}")
    wrong = [f"{k} {got[k]} != {want[k]}" for k in sorted(want.keys() & got.keys()) if got[k] != want[k]]
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:8]))
    if problems:
        raise ValueError("not InceptionV3 params: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Params as a flat .npz, and the feature function
# --------------------------------------------------------------------------------------------

def save_params(path: str, params: Mapping) -> None:
    """Writes a nested dict of arrays to `path` as an uncompressed .npz with "/"-joined keys
    ("params/Mixed_5b/branch1x1/kernel"), atomically: a temporary file in the same directory,
    then os.replace, so a reader never sees half a file."""
    files.save_tree_npz(path, params)


def load_params(path: str) -> dict:
    """Reads a .npz written by save_params back into the nested dict of NumPy arrays."""
    return files.load_tree_npz(path)


def make_feature_fn(params: Mapping, precision: Precision = lax.Precision.HIGHEST
                    ) -> Callable[[jax.Array], jax.Array]:
    """Returns features(images) -> [B, 2048] float32 pool3 features: `preprocess` (resize to
    299x299, gray to RGB) then InceptionV3, jitted (one compile per input shape). `images` are
    [B, H, W, 1 or 3] floats in [-1, 1]. `params` ({"params": ...}, e.g. from load_params) are
    checked against the module and put on the device once, not baked into the program."""
    check_params(params)
    params = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params))
    apply = _jitted_features(precision)

    def features(images: jax.Array) -> jax.Array:
        """images [B, H, W, 1 or 3] in [-1, 1] -> [B, 2048] float32 FID Inception pool3 features."""
        return apply(params, images)

    return features


@functools.cache
def _jitted_features(precision: Precision) -> Callable:
    """One jitted preprocess + InceptionV3 per precision, shared by every make_feature_fn."""
    model = InceptionV3(precision=precision)
    return jax.jit(lambda variables, images: model.apply(variables, preprocess(images)))
