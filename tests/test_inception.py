"""The FID InceptionV3 and its PyTorch weight converter, against independent NumPy references of
torch semantics (NCHW, OIHW weights, unfolded BatchNorm), on a synthetic state dict that has the
names and shapes of pytorch-fid's pt_inception-2015-12-05-6726825d.pth. No torch needed.
"""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from t2i_jax import images
from t2i_jax.evaluation import convert_inception
from t2i_jax.evaluation import inception as inc

EPS = 1e-3

# Every BasicConv2d of fid_inception_v3(): (module path, out channels, in channels, kh, kw), from
# torchvision's Inception3 / pytorch-fid's FID blocks. Each has `.conv.weight` [out, in, kh, kw]
# and `.bn.{weight, bias, running_mean, running_var}` [out] (+ `.bn.num_batches_tracked` []).
CONVS = [
    ("Conv2d_1a_3x3", 32, 3, 3, 3),
    ("Conv2d_2a_3x3", 32, 32, 3, 3),
    ("Conv2d_2b_3x3", 64, 32, 3, 3),
    ("Conv2d_3b_1x1", 80, 64, 1, 1),
    ("Conv2d_4a_3x3", 192, 80, 3, 3),
    ("Mixed_5b.branch1x1", 64, 192, 1, 1),
    ("Mixed_5b.branch5x5_1", 48, 192, 1, 1),
    ("Mixed_5b.branch5x5_2", 64, 48, 5, 5),
    ("Mixed_5b.branch3x3dbl_1", 64, 192, 1, 1),
    ("Mixed_5b.branch3x3dbl_2", 96, 64, 3, 3),
    ("Mixed_5b.branch3x3dbl_3", 96, 96, 3, 3),
    ("Mixed_5b.branch_pool", 32, 192, 1, 1),
    ("Mixed_5c.branch1x1", 64, 256, 1, 1),
    ("Mixed_5c.branch5x5_1", 48, 256, 1, 1),
    ("Mixed_5c.branch5x5_2", 64, 48, 5, 5),
    ("Mixed_5c.branch3x3dbl_1", 64, 256, 1, 1),
    ("Mixed_5c.branch3x3dbl_2", 96, 64, 3, 3),
    ("Mixed_5c.branch3x3dbl_3", 96, 96, 3, 3),
    ("Mixed_5c.branch_pool", 64, 256, 1, 1),
    ("Mixed_5d.branch1x1", 64, 288, 1, 1),
    ("Mixed_5d.branch5x5_1", 48, 288, 1, 1),
    ("Mixed_5d.branch5x5_2", 64, 48, 5, 5),
    ("Mixed_5d.branch3x3dbl_1", 64, 288, 1, 1),
    ("Mixed_5d.branch3x3dbl_2", 96, 64, 3, 3),
    ("Mixed_5d.branch3x3dbl_3", 96, 96, 3, 3),
    ("Mixed_5d.branch_pool", 64, 288, 1, 1),
    ("Mixed_6a.branch3x3", 384, 288, 3, 3),
    ("Mixed_6a.branch3x3dbl_1", 64, 288, 1, 1),
    ("Mixed_6a.branch3x3dbl_2", 96, 64, 3, 3),
    ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3),
    *[row for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192))
      for row in [
          (f"{name}.branch1x1", 192, 768, 1, 1),
          (f"{name}.branch7x7_1", c7, 768, 1, 1),
          (f"{name}.branch7x7_2", c7, c7, 1, 7),
          (f"{name}.branch7x7_3", 192, c7, 7, 1),
          (f"{name}.branch7x7dbl_1", c7, 768, 1, 1),
          (f"{name}.branch7x7dbl_2", c7, c7, 7, 1),
          (f"{name}.branch7x7dbl_3", c7, c7, 1, 7),
          (f"{name}.branch7x7dbl_4", c7, c7, 7, 1),
          (f"{name}.branch7x7dbl_5", 192, c7, 1, 7),
          (f"{name}.branch_pool", 192, 768, 1, 1)]],
    ("Mixed_7a.branch3x3_1", 192, 768, 1, 1),
    ("Mixed_7a.branch3x3_2", 320, 192, 3, 3),
    ("Mixed_7a.branch7x7x3_1", 192, 768, 1, 1),
    ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
    ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
    ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3),
    *[row for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048))
      for row in [
          (f"{name}.branch1x1", 320, cin, 1, 1),
          (f"{name}.branch3x3_1", 384, cin, 1, 1),
          (f"{name}.branch3x3_2a", 384, 384, 1, 3),
          (f"{name}.branch3x3_2b", 384, 384, 3, 1),
          (f"{name}.branch3x3dbl_1", 448, cin, 1, 1),
          (f"{name}.branch3x3dbl_2", 384, 448, 3, 3),
          (f"{name}.branch3x3dbl_3a", 384, 384, 1, 3),
          (f"{name}.branch3x3dbl_3b", 384, 384, 3, 1),
          (f"{name}.branch_pool", 192, cin, 1, 1)]],
]


def _state_dict_shapes(num_batches_tracked=True):
    shapes = {}
    for name, out, cin, kh, kw in CONVS:
        shapes[f"{name}.conv.weight"] = (out, cin, kh, kw)
        for field in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{field}"] = (out,)
        if num_batches_tracked:
            shapes[f"{name}.bn.num_batches_tracked"] = ()
    shapes["fc.weight"] = (1008, 2048)
    shapes["fc.bias"] = (1008,)
    return shapes


def _random_state_dict(seed=0):
    """Weights that keep activations O(1) through 94 layers: He-scaled convs, BN near identity."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in _state_dict_shapes().items():
        if key.endswith("num_batches_tracked"):
            sd[key] = np.array(0, np.int64)
        elif key.endswith("conv.weight"):
            sd[key] = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2 / np.prod(shape[1:])))
        elif key.endswith(("bn.weight", "running_var")):
            sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            sd[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return sd


@pytest.fixture(scope="module")
def state_dict():
    return _random_state_dict()


@pytest.fixture(scope="module")
def params(state_dict):
    return inc.convert_state_dict(state_dict)


def _shape_tree(tree):
    return jax.tree.map(lambda a: tuple(np.shape(a)), tree)


# ---------------------------------------------------------------- NumPy references, torch semantics

def _bn_relu_ref(y, sd, name):
    g, b, m, v = (sd[f"{name}.bn.{f}"].astype(np.float64)[None, :, None, None]
                  for f in ("weight", "bias", "running_mean", "running_var"))
    return np.maximum((y - m) / np.sqrt(v + EPS) * g + b, 0)


def _basic_conv_loops(x, sd, name, stride=1, pad=(0, 0)):
    """BasicConv2d by explicit loops over output pixels: x NCHW float64."""
    w = sd[f"{name}.conv.weight"].astype(np.float64)
    o, c, kh, kw = w.shape
    n, _, h, wd = x.shape
    ho, wo = (h + 2 * pad[0] - kh) // stride + 1, (wd + 2 * pad[1] - kw) // stride + 1
    y = np.zeros((n, o, ho, wo))
    for i in range(ho):
        for j in range(wo):
            for di in range(kh):
                for dj in range(kw):
                    r, s = i * stride + di - pad[0], j * stride + dj - pad[1]
                    if 0 <= r < h and 0 <= s < wd:
                        y[:, :, i, j] += x[:, :, r, s] @ w[:, :, di, dj].T
    return _bn_relu_ref(y, sd, name)


def _basic_conv(x, sd, name, stride=1, pad=(0, 0)):
    """BasicConv2d by patches and one contraction (fast enough for the whole network)."""
    w = sd[f"{name}.conv.weight"]
    kh, kw = w.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    patches = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    y = np.einsum("nchwij,ocij->nohw", patches, w.astype(x.dtype), optimize=True)
    return _bn_relu_ref(y, sd, name).astype(x.dtype)


def _avg_pool_loops(x):
    """F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) on NCHW by loops."""
    h, w = x.shape[2:]
    y = np.empty_like(x)
    for i in range(h):
        for j in range(w):
            win = x[:, :, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
            y[:, :, i, j] = win.mean(axis=(2, 3))
    return y


def _max_pool(x, stride, pad=0):
    """F.max_pool2d(x, 3, stride, pad) on NCHW."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    return sliding_window_view(xp, (3, 3), axis=(2, 3))[:, :, ::stride, ::stride].max(axis=(4, 5))


def _resize_ref(x, out_h, out_w):
    """torch F.interpolate(bilinear, align_corners=False) on NHWC, pixel by pixel (vectorised)."""
    def taps(out, size):
        src = np.maximum((np.arange(out) + 0.5) * size / out - 0.5, 0)
        i0 = np.floor(src).astype(int)
        i1 = np.where(i0 < size - 1, i0 + 1, i0)
        return i0, i1, src - i0
    h0, h1, lh = taps(out_h, x.shape[1])
    w0, w1, lw = taps(out_w, x.shape[2])
    h0, h1, lh = h0[:, None], h1[:, None], lh[:, None, None]
    lw = lw[None, :, None]
    top = (1 - lw) * x[:, h0, w0] + lw * x[:, h0, w1]
    bottom = (1 - lw) * x[:, h1, w0] + lw * x[:, h1, w1]
    return (1 - lh) * top + lh * bottom


def _inception_ref(x, sd):
    """fid_inception_v3() up to the final average pool, NCHW float32 -> [N, 2048]."""
    c = lambda name, x, stride=1, pad=(0, 0): _basic_conv(x, sd, name, stride, pad)  # noqa: E731
    x = c("Conv2d_1a_3x3", x, 2)
    x = c("Conv2d_2a_3x3", x)
    x = _max_pool(c("Conv2d_2b_3x3", x, pad=(1, 1)), 2)
    x = c("Conv2d_3b_1x1", x)
    x = _max_pool(c("Conv2d_4a_3x3", x), 2)
    for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):                      # FIDInceptionA
        b5 = c(f"{m}.branch5x5_2", c(f"{m}.branch5x5_1", x), pad=(2, 2))
        b3 = c(f"{m}.branch3x3dbl_1", x)
        b3 = c(f"{m}.branch3x3dbl_3", c(f"{m}.branch3x3dbl_2", b3, pad=(1, 1)), pad=(1, 1))
        x = np.concatenate([c(f"{m}.branch1x1", x), b5, b3,
                            c(f"{m}.branch_pool", _avg_pool_loops(x))], axis=1)
    m = "Mixed_6a"                                                       # InceptionB
    b3 = c(f"{m}.branch3x3dbl_2", c(f"{m}.branch3x3dbl_1", x), pad=(1, 1))
    x = np.concatenate([c(f"{m}.branch3x3", x, 2), c(f"{m}.branch3x3dbl_3", b3, 2),
                        _max_pool(x, 2)], axis=1)
    for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):          # FIDInceptionC
        b7 = c(f"{m}.branch7x7_1", x)
        b7 = c(f"{m}.branch7x7_3", c(f"{m}.branch7x7_2", b7, pad=(0, 3)), pad=(3, 0))
        bd = c(f"{m}.branch7x7dbl_1", x)
        for i, pad in ((2, (3, 0)), (3, (0, 3)), (4, (3, 0)), (5, (0, 3))):
            bd = c(f"{m}.branch7x7dbl_{i}", bd, pad=pad)
        x = np.concatenate([c(f"{m}.branch1x1", x), b7, bd,
                            c(f"{m}.branch_pool", _avg_pool_loops(x))], axis=1)
    m = "Mixed_7a"                                                       # InceptionD
    b3 = c(f"{m}.branch3x3_2", c(f"{m}.branch3x3_1", x), 2)
    b7 = c(f"{m}.branch7x7x3_2", c(f"{m}.branch7x7x3_1", x), pad=(0, 3))
    b7 = c(f"{m}.branch7x7x3_4", c(f"{m}.branch7x7x3_3", b7, pad=(3, 0)), 2)
    x = np.concatenate([b3, b7, _max_pool(x, 2)], axis=1)
    for m, pool in (("Mixed_7b", _avg_pool_loops), ("Mixed_7c", lambda v: _max_pool(v, 1, 1))):
        b3 = c(f"{m}.branch3x3_1", x)                                    # FIDInceptionE_1 / _2
        b3 = np.concatenate([c(f"{m}.branch3x3_2a", b3, pad=(0, 1)),
                             c(f"{m}.branch3x3_2b", b3, pad=(1, 0))], axis=1)
        bd = c(f"{m}.branch3x3dbl_2", c(f"{m}.branch3x3dbl_1", x), pad=(1, 1))
        bd = np.concatenate([c(f"{m}.branch3x3dbl_3a", bd, pad=(0, 1)),
                             c(f"{m}.branch3x3dbl_3b", bd, pad=(1, 0))], axis=1)
        x = np.concatenate([c(f"{m}.branch1x1", x), b3, bd, c(f"{m}.branch_pool", pool(x))], axis=1)
    return x.mean(axis=(2, 3))


# ---------------------------------------------------------------- the converter

def test_converted_tree_is_exactly_the_module_tree(params):
    expected = jax.eval_shape(inc.InceptionV3().init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    assert _shape_tree(params) == jax.tree.map(lambda s: tuple(s.shape), expected)
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))
    assert params["params"]["Mixed_5b"]["branch1x1"]["kernel"].shape == (1, 1, 192, 64)
    assert params["params"]["Mixed_6b"]["branch7x7_2"]["kernel"].shape == (1, 7, 128, 128)
    assert len(jax.tree.leaves(params)) == 2 * len(CONVS) == 188
    inc.check_params(params)


def test_converter_accepts_a_state_dict_without_batch_counters(state_dict, params):
    sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    again = inc.convert_state_dict(sd)
    assert jax.tree.all(jax.tree.map(np.array_equal, again, params))


@pytest.mark.parametrize("change, message", [
    ("drop", "missing keys: Mixed_6c.branch7x7dbl_3.bn.running_var"),
    ("reshape", "Mixed_7b.branch3x3_2a.conv.weight has shape (384, 384, 3, 1), expected (384, 384, 1, 3)"),
    ("extra", "unexpected keys: AuxLogits.conv0.conv.weight"),
    ("nan", "non-finite values or non-positive variances in: Conv2d_3b_1x1.bn.bias"),
])
def test_converter_names_what_is_wrong(state_dict, change, message):
    sd = dict(state_dict)
    if change == "drop":
        del sd["Mixed_6c.branch7x7dbl_3.bn.running_var"]
    elif change == "reshape":
        key = "Mixed_7b.branch3x3_2a.conv.weight"
        sd[key] = sd[key].transpose(0, 1, 3, 2)
    elif change == "extra":
        sd["AuxLogits.conv0.conv.weight"] = np.zeros((128, 768, 1, 1), np.float32)
    else:
        sd["Conv2d_3b_1x1.bn.bias"] = np.full(80, np.nan, np.float32)
    with pytest.raises(ValueError) as info:
        inc.convert_state_dict(sd)
    assert message in str(info.value)


def test_check_params_names_a_wrong_shape(params):
    bad = jax.tree.map(lambda a: a, params)
    bad["params"]["Mixed_7c"]["branch_pool"]["bias"] = np.zeros(191, np.float32)
    with pytest.raises(ValueError, match=r"params/Mixed_7c/branch_pool/bias \(191,\) != \(192,\)"):
        inc.check_params(bad)


@pytest.mark.parametrize("name, spec", [
    ("Conv2d_1a_3x3", inc.ConvSpec(3, 32, (3, 3), stride=2)),
    ("Mixed_6b.branch7x7_2", inc.ConvSpec(128, 128, (1, 7), padding=(0, 3))),
])
def test_one_folded_conv_equals_torch_conv_bn_relu(state_dict, params, name, spec):
    x = np.random.default_rng(1).standard_normal((2, spec.in_channels, 9, 11))   # NCHW
    want = _basic_conv_loops(x, state_dict, name, spec.stride, spec.padding)
    p = params["params"]
    for part in name.split("."):
        p = p[part]
    got = inc.BasicConv2d(spec).apply({"params": p}, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-5, atol=1e-5)
    assert (want > 0).mean() > 0.2 and (want == 0).mean() > 0.2  # the ReLU both passes and clips


# ---------------------------------------------------------------- pools and resizing

def test_avg_pool_leaves_the_padding_out_of_the_mean():
    x = np.random.default_rng(2).standard_normal((2, 5, 6, 3)).astype(np.float32) + 3.0   # NHWC
    got = np.asarray(inc.avg_pool_3x3(jnp.asarray(x)))
    want = _avg_pool_loops(x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[:, 0, 0], x[:, :2, :2].mean(axis=(1, 2)), rtol=1e-6)  # corner: 4
    np.testing.assert_allclose(got[:, 0, 2], x[:, :2, 1:4].mean(axis=(1, 2)), rtol=1e-6)  # edge: 6
    assert not np.allclose(got[:, 0, 0], x[:, :2, :2].sum(axis=(1, 2)) / 9)  # not count_include_pad


def test_max_pool_pads_with_minus_infinity():
    x = np.random.default_rng(3).standard_normal((1, 7, 8, 2)).astype(np.float32) - 5.0   # all < 0
    for stride, pad in ((1, 1), (2, 0)):
        got = np.asarray(inc.max_pool(jnp.asarray(x), stride, pad))
        want = _max_pool(x.transpose(0, 3, 1, 2), stride, pad).transpose(0, 2, 3, 1)
        np.testing.assert_array_equal(got, want)
    assert inc.max_pool(jnp.zeros((1, 71, 71, 1)), 2).shape == (1, 35, 35, 1)   # floor, as torch


def test_resize_matches_torch_bilinear_half_pixel():
    # torch: F.interpolate([[0, 1]], size=4, mode="linear", align_corners=False) -> [0, .25, .75, 1]
    np.testing.assert_allclose(inc.bilinear_matrix(2, 4) @ np.array([0.0, 1.0]), [0, 0.25, 0.75, 1])
    rng = np.random.default_rng(4)
    for shape, size in (((2, 16, 16, 3), (299, 299)), ((1, 37, 23, 2), (13, 11)), ((1, 5, 9, 1), (7, 4))):
        x = rng.uniform(-1, 1, shape)
        got = np.asarray(inc.resize_bilinear(jnp.asarray(x, jnp.float32), size))
        np.testing.assert_allclose(got, _resize_ref(x, *size), rtol=0, atol=1e-5)  # f32 taps
    assert np.allclose(inc.bilinear_matrix(37, 13).sum(axis=1), 1)


def test_preprocess_resizes_to_299_and_repeats_gray():
    gray = np.random.default_rng(5).uniform(-1, 1, (2, 20, 24, 1)).astype(np.float32)
    x = np.asarray(inc.preprocess(gray))
    assert x.shape == (2, 299, 299, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    np.testing.assert_allclose(x[..., :1], _resize_ref(gray, 299, 299), rtol=0, atol=1e-5)
    assert x.min() >= -1 and x.max() <= 1
    for bad in (np.zeros((2, 20, 20, 2)), np.zeros((20, 20, 3))):
        with pytest.raises(ValueError, match="NHWC"):
            inc.preprocess(bad)


# ---------------------------------------------------------------- the whole network

def test_features_equal_a_numpy_forward_of_the_torch_network(state_dict, params):
    image = np.random.default_rng(6).uniform(-1, 1, (1, 40, 40, 1)).astype(np.float32)
    got = np.asarray(inc.make_feature_fn(params)(image))
    assert got.shape == (1, 2048) and got.dtype == np.float32
    assert np.all(np.isfinite(got)) and got.min() >= 0 and (got > 0).mean() > 0.5
    x = np.repeat(_resize_ref(image.astype(np.float64), 299, 299), 3, axis=-1)
    want = _inception_ref(x.transpose(0, 3, 1, 2).astype(np.float32), state_dict)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6 * np.abs(want).max())  # f32 sums


# ---------------------------------------------------------------- files and the command line

def test_save_load_round_trip_is_atomic_and_exact(tmp_path, params):
    path = tmp_path / "out" / "inception.npz"
    inc.save_params(str(path), params)
    assert sorted(p.name for p in path.parent.iterdir()) == ["inception.npz"]   # no temp left
    with np.load(path) as f:
        assert "params/Mixed_5b/branch1x1/kernel" in f.files and len(f.files) == 188
    loaded = inc.load_params(str(path))
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, params))


def test_cli_converts_with_torch_and_explains_without(tmp_path, monkeypatch, state_dict, params, capsys):
    src, out = tmp_path / "pt_inception.pth", tmp_path / "inception.npz"
    src.write_bytes(b"not really a torch file")
    monkeypatch.setitem(sys.modules, "torch", None)          # `import torch` raises ImportError
    with pytest.raises(SystemExit, match="pip install torch to convert; the converted .npz needs no torch"):
        convert_inception.main([str(src), str(out)])

    class Tensor:  # what torch.load gives: tensors with .detach().cpu().numpy()
        def __init__(self, a):
            self.a = a

        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self.a

    fake = types.SimpleNamespace(load=lambda path, map_location, weights_only: (
        {k: Tensor(v) for k, v in state_dict.items()}))
    monkeypatch.setitem(sys.modules, "torch", fake)
    convert_inception.main([str(src), str(out)])
    assert "21,768,352 parameters" in capsys.readouterr().out
    assert jax.tree.all(jax.tree.map(np.array_equal, inc.load_params(str(out)), params))


@pytest.mark.slow
def test_fid_command_on_image_sets_and_saved_statistics(tmp_path, params, capsys):
    """FID(a, a) = 0; FID(a, b) equals the Fréchet distance of the features computed directly;
    the command (python -m t2i_jax.evaluation.fid) reads image .npz files and saved statistics."""
    from t2i_jax.evaluation import fid as fid_lib
    from t2i_jax.evaluation.frechet import frechet_distance_of
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
    feats = inc.make_feature_fn(params)
    f = lambda x: np.asarray(feats(x.astype(np.float32) / 127.5 - 1.0), np.float64)  # noqa: E731
    assert fid_lib.fid(feats, a, a) == pytest.approx(0.0, abs=1e-6)
    want = frechet_distance_of(f(b), f(a))
    assert want > 0 and fid_lib.fid(feats, b, a) == pytest.approx(want, rel=1e-6)

    weights = tmp_path / "inception.npz"
    inc.save_params(str(weights), params)
    np.savez(tmp_path / "a.npz", arr_0=a)
    np.savez(tmp_path / "b.npz", arr_0=b)
    w = ["--inception", str(weights)]
    assert fid_lib.main(w + [str(tmp_path / "b.npz"), str(tmp_path / "a.npz"),
                             "--save_stats", str(tmp_path / "b_stats.npz")]) == 0
    assert float(capsys.readouterr().out.split()[1]) == pytest.approx(want, abs=1e-4)
    # The saved statistics are b's (the D x D Fréchet path on Stats is tested at small D).
    stats = fid_lib.load_set(str(tmp_path / "b_stats.npz"))
    with np.load(tmp_path / "b_stats.npz") as z:  # the statistics say how their images were made
        assert str(z["uint8_conversion"]) == images.UINT8_CONVERSION
    np.testing.assert_allclose(stats.mu, f(b).mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.sigma, np.cov(f(b), rowvar=False), rtol=1e-6, atol=1e-9)
    assert fid_lib.main(w + [str(tmp_path / "missing.npz"), str(tmp_path / "a.npz")]) == 1
    assert "does not exist" in capsys.readouterr().err
