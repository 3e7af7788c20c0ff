"""Full-reference image metrics, per image: PSNR and SSIM (numpy, float64).

    psnr(a, b)   10 log10(max_val^2 / MSE), MSE over every pixel and channel of an image
                 (inf where the images are equal).
    ssim(a, b)   Wang, Bovik, Sheikh & Simoncelli (2004), "Image quality assessment: from error
                 visibility to structural similarity": local statistics under an 11x11 Gaussian
                 window (sigma 1.5, normalised to sum 1), K1 = 0.01, K2 = 0.03,
                 C1 = (K1 L)^2, C2 = (K2 L)^2 with L = max_val,

                   SSIM(x, y) = (2 mu_x mu_y + C1)(2 sigma_xy + C2)
                                / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),

                 the local (co)variances weighted by the window without the sample correction
                 (Wang's MATLAB ssim_index; skimage's structural_similarity with
                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=L).
                 Filtering is 'valid': the map covers only the positions where the whole window
                 lies inside the image (H - 10) x (W - 10), no padding (skimage filters the padded
                 image and then crops the same border away, so its mean is over the same
                 positions). The image's SSIM is the mean of the map over positions and channels
                 (the mean of the per-channel SSIMs). No downsampling of large images (the later
                 MATLAB ssim.m's automatic step) is done.

Inputs: arrays [N, H, W, C] or [N, H, W] (grey) in [0, max_val] (e.g. uint8 / 255); returns [N].
"""

from __future__ import annotations

from typing import Optional

import numpy as np

K1, K2 = 0.01, 0.03
WIN_SIZE, SIGMA = 11, 1.5


def _as_images(a, b) -> tuple:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"the images differ in shape: {a.shape} and {b.shape}.")
    if a.ndim == 3:
        a, b = a[..., None], b[..., None]
    if a.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C] or [N, H, W], got shape {a.shape}.")
    return a, b


def psnr(a, b, max_val: float = 1.0) -> np.ndarray:
    """float64 [N]: 10 log10(max_val^2 / MSE) per image (inf where a == b)."""
    a, b = _as_images(a, b)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(-1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(float(max_val) ** 2 / mse)


def window(win_size: int = WIN_SIZE, sigma: Optional[float] = SIGMA) -> np.ndarray:
    """The separable 1-D window [win_size], summing to 1: Gaussian of `sigma` centred on the
    middle tap, or uniform (a box) when sigma is None."""
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"the window size must be odd and >= 1, got {win_size}.")
    if sigma is None:
        g = np.ones(win_size)
    else:
        r = np.arange(win_size) - (win_size - 1) / 2
        g = np.exp(-r ** 2 / (2.0 * float(sigma) ** 2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """x [N, H, W, C] filtered by the separable window g (g x g), 'valid' positions only."""
    k = len(g)
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    rows = sum(g[i] * x[:, i:i + h] for i in range(k))
    return sum(g[i] * rows[:, :, i:i + w] for i in range(k))


def ssim_map(a, b, max_val: float = 1.0, *, win_size: int = WIN_SIZE,
             sigma: Optional[float] = SIGMA) -> np.ndarray:
    """float64 [N, H - win_size + 1, W - win_size + 1, C]: the local SSIM (module docstring)."""
    a, b = _as_images(a, b)
    if min(a.shape[1:3]) < win_size:
        raise ValueError(f"{a.shape[1]}x{a.shape[2]} images are smaller than the "
                         f"{win_size}x{win_size} SSIM window.")
    g = window(win_size, sigma)
    c1, c2 = (K1 * max_val) ** 2, (K2 * max_val) ** 2
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a ** 2
    var_b = _filter_valid(b * b, g) - mu_b ** 2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
            / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))


def ssim(a, b, max_val: float = 1.0, *, win_size: int = WIN_SIZE,
         sigma: Optional[float] = SIGMA) -> np.ndarray:
    """float64 [N]: the mean SSIM of each image pair over valid positions and channels (module
    docstring; sigma=None: a uniform win_size x win_size window)."""
    m = ssim_map(a, b, max_val, win_size=win_size, sigma=sigma)
    return m.reshape(len(m), -1).mean(-1)
