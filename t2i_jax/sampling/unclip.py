"""unCLIP's sampling inputs (Ramesh et al. 2022, sec. 3): where a decoder's image embeddings
come from, and the record each image keeps of it.

  prior          text -> prior (stage 0, its candidates) -> decoder: `--prior PRIOR`
  image          an image's clean CLIP embedding, decoded again: variations (`--variations`)
  slerp          slerp(z_a, z_b, t) between two images' embeddings, t = k / (K - 1), DDIM eta = 0
                 and one noise per row: interpolations (`--interpolate A B --frames K`)
  text_embedding the caption's CLIP text embedding in z_i's place (the paper's ablation)
  none           the null embedding: the decoder on text alone (the paper's ablation)
"""

from __future__ import annotations

import os

import numpy as np

def slerp(a: np.ndarray, b: np.ndarray, t) -> np.ndarray:
    """Spherical interpolation of unit vectors a, b [..., E] at t in [0, 1] (scalar or [T]):
    sin((1 - t) theta) / sin(theta) a + sin(t theta) / sin(theta) b, theta = arccos(a . b);
    the unit-norm great-circle path from a (t = 0) to b (t = 1). Falls back to the normalised
    lerp when a and b (nearly) coincide."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    t = np.asarray(t, np.float64)[..., None]
    dot = np.clip(np.sum(a * b, axis=-1, keepdims=True), -1.0, 1.0)
    theta = np.arccos(dot)
    sin = np.sin(theta)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(sin > 1e-6, (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b)
                       / np.where(sin > 1e-6, sin, 1.0), (1 - t) * a + t * b)
    return (out / np.linalg.norm(out, axis=-1, keepdims=True)).astype(np.float32)


def load_images(paths, shape: tuple, flag: str):
    """(uint8 [N, H, W, C], [{"path", "sha256"}]) of image files, each refused with a clear
    message unless it is an image of `shape` (H, W, C) (the decoder's data)."""
    from t2i_jax.sampling.stages import load_low_res
    out, rows = [], []
    for path in paths:
        if os.path.isdir(path) or path.endswith(".npz"):
            raise ValueError(f"{flag}: {path} is not an image file; pass PNG (or JPEG) files.")
        x, record = load_low_res(path, shape, flag=flag)
        out.append(x[0])
        rows.append({"path": record["path"], "sha256": record["sha256"]})
    return np.stack(out), rows


def embedding_record(embedding: dict, p: int, k: int, n: int) -> dict:
    """Image (prompt row p, sample k of n)'s record of where its embedding came from."""
    source = embedding["source"]
    rows = embedding.get("rows") or []
    out = dict({"source": source}, **{k2: v for k2, v in embedding.items()
                                      if k2 not in ("source", "rows")})
    if rows:
        out.update(rows[p])
    if source == "slerp":
        out["t"] = k / (n - 1) if n > 1 else 0.0
        out["frame"] = k
    return out
