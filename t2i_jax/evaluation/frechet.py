"""The Fréchet distance between Gaussians fitted to two feature sets (FID: Heusel et al. 2017).

    d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1^(1/2) S_2 S_1^(1/2))^(1/2))

The trace term is computed from the symmetric PSD matrix S_1^(1/2) S_2 S_1^(1/2), whose square
root has the same trace as (S_1 S_2)^(1/2) (the two products are similar) but comes from a
symmetric eigendecomposition: real, stable, no complex round-off as with a general sqrtm of the
non-symmetric S_1 S_2. Everything is float64 NumPy (the feature sets are host data).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Stats(NamedTuple):
    mu: np.ndarray      # [D]
    sigma: np.ndarray   # [D, D], the unbiased (N - 1) covariance, as pytorch-fid / TTUR
    n: int


def feature_stats(features) -> Stats:
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {f.shape}.")
    return Stats(f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]), f.shape[0])


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """The PSD square root of a symmetric PSD matrix (eigenvalues below 0 from round-off -> 0)."""
    a = np.asarray(a, np.float64)
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(s1: Stats, s2: Stats) -> float:
    """Fréchet distance d^2 between N(mu_1, S_1) and N(mu_2, S_2) (what FID reports)."""
    mu1, mu2 = np.asarray(s1.mu, np.float64), np.asarray(s2.mu, np.float64)
    a, b = np.asarray(s1.sigma, np.float64), np.asarray(s2.sigma, np.float64)
    if mu1.shape != mu2.shape or a.shape != b.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}.")
    root_a = sqrtm_psd(a)
    cross = sqrtm_psd(root_a @ b @ root_a)
    d2 = float(np.sum((mu1 - mu2) ** 2) + np.trace(a) + np.trace(b) - 2.0 * np.trace(cross))
    return max(d2, 0.0)  # round-off can make identical sets -1e-12


def frechet_distance_of(features_1, features_2) -> float:
    """The Fréchet distance of two feature sets [N1, D], [N2, D].

    With fewer samples than dimensions (e.g. a few hundred Inception features, D = 2048) the
    trace term comes from the samples instead of D x D matrices: with centred features X, Y and
    S_1 = X^T X / (N1 - 1), S_2 = Y^T Y / (N2 - 1), the nonzero eigenvalues of S_1^(1/2) S_2 S_1^(1/2)
    are those of M M^T, M = X Y^T / sqrt((N1 - 1)(N2 - 1)) [N1, N2], so the trace of its square
    root is the sum of M's singular values. Exact, and far cheaper than a D x D eigendecomposition.
    """
    x, y = np.asarray(features_1, np.float64), np.asarray(features_2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"features must be [N >= 2, D] with the same D, got {x.shape} and {y.shape}.")
    if max(len(x), len(y)) >= x.shape[1]:
        return frechet_distance(feature_stats(x), feature_stats(y))
    xc, yc = x - x.mean(0), y - y.mean(0)
    n1, n2 = len(x) - 1, len(y) - 1
    cross = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt(n1 * n2)
    d2 = float(np.sum((x.mean(0) - y.mean(0)) ** 2) + np.sum(xc * xc) / n1 + np.sum(yc * yc) / n2
               - 2.0 * cross)
    return max(d2, 0.0)
