"""Images as files: [-1, 1] floats to uint8, grids (rows = prompts), atomic PNG writes."""

from __future__ import annotations

import numpy as np

from t2i_jax import files


def to_uint8(x) -> np.ndarray:
    """[-1, 1] floats [..., H, W, C] -> uint8 in [0, 255] (rounded, clipped), as ADM's samplers."""
    x = np.asarray(x, np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, rows: int, pad: int = 2, scale: int = 1,
              background: int = 255) -> np.ndarray:
    """Returns one [rows * (H + pad) + pad, cols * (W + pad) + pad, C] uint8 image of `images`
    [N, H, W, C] (uint8) laid out row by row; each image is magnified `scale` times (nearest)."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    if rows < 1 or n % rows:
        raise ValueError(f"{n} images do not fill {rows} rows evenly.")
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    cols = n // rows
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), background, np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = images[i]
    return grid


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 [H, W, C] (C = 1 or 3) image as PNG atomically: a reader never sees half a file."""
    from PIL import Image
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    with files.atomic_open(path, "wb") as f:
        Image.fromarray(image).save(f, format="PNG")


def load_png(path: str) -> np.ndarray:
    """Reads a PNG written by save_png as uint8 [H, W, C] (C = 1 for grey)."""
    from PIL import Image
    with Image.open(path) as im:
        x = np.asarray(im)
    return x[..., None] if x.ndim == 2 else x
