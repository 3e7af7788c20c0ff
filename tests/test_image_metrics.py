"""PSNR and SSIM (t2i_jax/evaluation/image_metrics.py): closed forms and hand computations."""

import numpy as np
import pytest

from t2i_jax.evaluation import image_metrics as im

C1, C2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2


def _images(n=3, size=16, c=3, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, size, size, c))


def test_psnr_of_a_constant_offset_is_the_closed_form():
    # Multiples of 1/8 and c = 1/4: x + c - x is exactly c in float64, so the MSE is exactly c^2.
    x = np.random.default_rng(0).integers(0, 6, (2, 8, 8, 3)) / 8.0
    c = 0.25
    got = im.psnr(x, x + c)
    assert got.shape == (2,)
    np.testing.assert_array_equal(got, np.full(2, 10 * np.log10(1.0 / c ** 2)))
    # max_val scales the peak: 255-range images, offset 4 -> 10 log10(255^2 / 16).
    np.testing.assert_allclose(im.psnr(x * 255, x * 255 + 4, max_val=255.0),
                               10 * np.log10(255.0 ** 2 / 16), rtol=0, atol=1e-12)
    assert np.isinf(im.psnr(x, x)).all()


def test_ssim_of_an_image_with_itself_is_one():
    x = _images()
    np.testing.assert_allclose(im.ssim(x, x), 1.0, rtol=0, atol=1e-12)
    assert im.ssim(x, x).shape == (3,)
    g = x[..., 0]  # grey [N, H, W]
    np.testing.assert_allclose(im.ssim(g, g), 1.0, rtol=0, atol=1e-12)


def test_ssim_is_symmetric():
    x, y = _images(seed=0), _images(seed=1)
    np.testing.assert_allclose(im.ssim(x, y), im.ssim(y, x), rtol=1e-12, atol=0)
    assert (im.ssim(x, y) < 0.5).all()  # independent noise is dissimilar


@pytest.mark.parametrize("p, a, b", [(0.5, 0.5, 0.1), (0.2, 1.0, 0.3), (0.8, 0.0, 0.0)])
def test_ssim_of_constant_images_is_the_luminance_term(p, a, b):
    """x = p everywhere, y = a x + b: no variance, no covariance, so the contrast-structure term is
    C2 / C2 = 1 and SSIM = (2 p q + C1) / (p^2 + q^2 + C1) with q = a p + b."""
    x = np.full((1, 12, 12, 3), p)
    y = a * x + b
    q = a * p + b
    want = (2 * p * q + C1) / (p ** 2 + q ** 2 + C1)
    np.testing.assert_allclose(im.ssim(x, y), want, rtol=1e-9)


def test_ssim_by_hand_on_a_tiny_image_with_a_uniform_window():
    """3x3 images, a uniform 3x3 window: one position, whose statistics are the images' own
    (population) mean, variance and covariance.
      x: two rows of 0, a row of 0.9   -> mu_x = 0.3, E[x^2] = 0.27, var_x = 0.18
      y = x / 2 + 0.1                 -> mu_y = 0.25, var_y = 0.045, cov = 0.09"""
    x = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.9, 0.9, 0.9]])[None, :, :, None]
    y = x / 2 + 0.1
    want = ((2 * 0.3 * 0.25 + C1) * (2 * 0.09 + C2)) / ((0.09 + 0.0625 + C1) * (0.18 + 0.045 + C2))
    np.testing.assert_allclose(im.ssim(x, y, win_size=3, sigma=None), want, rtol=1e-9)
    # A constant y = 0.3 (the same mean): luminance term 1, contrast-structure C2 / (0.18 + C2).
    np.testing.assert_allclose(im.ssim(x, np.full_like(x, 0.3), win_size=3, sigma=None),
                               C2 / (0.18 + C2), rtol=1e-9)


def test_ssim_window_is_wangs_gaussian_and_valid_filtering():
    g = im.window()
    assert g.shape == (11,) and abs(g.sum() - 1) < 1e-12 and g.argmax() == 5
    np.testing.assert_allclose(g[6] / g[5], np.exp(-1 / (2 * 1.5 ** 2)))
    assert im.ssim_map(_images(size=16), _images(size=16, seed=2)).shape == (3, 6, 6, 3)
    with pytest.raises(ValueError, match="smaller than"):
        im.ssim(np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="shape"):
        im.psnr(np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 8, 3)))


def test_ssim_matches_skimages_algorithm():
    """skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False) filters the reflect-padded image with scipy's Gaussian (truncate
    3.5: the same 11 taps) and averages the map without a border of 5: the same positions."""
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    a = rng.uniform(size=(2, 20, 24, 3))
    b = np.clip(a + 0.1 * rng.normal(size=a.shape), 0, 1)
    f = lambda z: ndimage.gaussian_filter(z, 1.5, truncate=3.5, mode="reflect")  # noqa: E731
    want = []
    for i in range(len(a)):
        per_channel = []
        for c in range(a.shape[-1]):
            x, y = a[i, ..., c], b[i, ..., c]
            mx, my = f(x), f(y)
            vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
            s = ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx ** 2 + my ** 2 + C1) * (vx + vy + C2))
            per_channel.append(s[5:-5, 5:-5].mean())
        want.append(np.mean(per_channel))
    np.testing.assert_allclose(im.ssim(a, b), want, rtol=1e-10)


def test_to_uint8_rounds_as_its_stated_convention_not_adms_truncation():
    """images.to_uint8 is UINT8_CONVERSION: (x + 1) * 127.5 in float32, halves to even, clipped.
    The floats below land exactly on .5 in float32 (126.5, 127.5, 254.5): halves to even give
    126, 128, 254; truncation (ADM's samplers) 126, 127, 254; rounding halves up 127, 128, 255."""
    from t2i_jax import images
    x = np.float32([-0.007843138, 0.0, 0.99607843, -1.5, -1.0, 1.0, 2.0, 0.2])
    u = (x + np.float32(1)) * np.float32(127.5)
    assert list(u[:3]) == [126.5, 127.5, 254.5]  # exact halves
    want = [126, 128, 254, 0, 0, 255, 255, 153]  # 153.0 exactly: no rounding at all
    np.testing.assert_array_equal(images.to_uint8(x), np.uint8(want))
    assert images.UINT8_CONVERSION.startswith("round_half_even")
    adm = np.clip(u, 0, 255).astype(np.uint8)  # ADM: .clamp(0, 255).to(uint8) truncates
    assert list(adm[:3]) == [126, 127, 254] and not np.array_equal(adm, want)
