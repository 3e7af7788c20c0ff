"""Improved precision and recall of generative models (Kynkäänniemi et al. 2019).

Each set's manifold is the union of balls around its feature vectors, each ball's radius the
distance to that vector's k-th nearest neighbour within the set (k = 3 in the paper).
  precision = fraction of generated samples inside the real manifold (fidelity);
  recall    = fraction of real samples inside the generated manifold (coverage).
A model that drops modes keeps its precision and loses recall; one that makes off-manifold
images loses precision.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] squared Euclidean distances (float64, clipped at 0)."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def knn_radii(features: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """Squared distance of each vector to its k-th nearest OTHER vector of the same set
    (rows in chunks: memory chunk x N, not N x N)."""
    f = np.asarray(features, np.float64)
    if len(f) <= k:
        raise ValueError(f"need more than k = {k} feature vectors, got {len(f)}.")
    out = np.empty(len(f))
    for s in range(0, len(f), chunk):
        d = _sq_distances(f[s:s + chunk], f)
        out[s:s + chunk] = np.partition(d, k, axis=1)[:, k]  # column 0: the vector itself
    return out


def coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray,
             chunk: int = 4096) -> np.ndarray:
    """bool [len(queries)]: inside at least one ball (centre manifold[i], squared radius radii[i])."""
    m, q = np.asarray(manifold, np.float64), np.asarray(queries, np.float64)
    out = np.zeros(len(q), bool)
    for s in range(0, len(q), chunk):
        out[s:s + chunk] = (_sq_distances(q[s:s + chunk], m) <= radii[None, :]).any(axis=1)
    return out


def precision_recall(real_features, fake_features, k: int = 3) -> PrecisionRecall:
    real = np.asarray(real_features, np.float64)
    fake = np.asarray(fake_features, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got {real.shape} and {fake.shape}.")
    precision = coverage(real, knn_radii(real, k), fake).mean()
    recall = coverage(fake, knn_radii(fake, k), real).mean()
    return PrecisionRecall(float(precision), float(recall))
