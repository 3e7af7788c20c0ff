"""Images as files: [-1, 1] floats to uint8, grids (rows = prompts), atomic PNG writes."""

from __future__ import annotations

import numpy as np

from t2i_jax import files


# How every image this project writes (samples, grids, reconstructions) goes from [-1, 1] floats
# to uint8; recorded with the FD/FID results computed on such images.
UINT8_CONVERSION = "round_half_even((x + 1) * 127.5), clipped to [0, 255]"


def to_uint8(x) -> np.ndarray:
    """[-1, 1] floats [..., H, W, C] -> uint8 in [0, 255]: (x + 1) * 127.5 in float32, rounded to
    the nearest level (halves to even, np.round), clipped (UINT8_CONVERSION).

    Rounding, not ADM's truncation: guided-diffusion's samplers write
    ((x + 1) * 127.5).clamp(0, 255).to(uint8), which truncates toward zero, so ADM's images sit
    half a level darker on average and only x = 1 reaches 255. Rounding is the nearest uint8 to
    each float (u / 127.5 - 1 is within half a level of x); FID against ADM's
    sample batches therefore compares two conventions (its reference batches of real images
    are uint8 data and are unaffected)."""
    x = np.asarray(x, np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, rows: int, pad: int = 2, scale: int = 1,
              background: int = 255, labels=None) -> np.ndarray:
    """Returns one [rows * (H + pad) + pad, cols * (W + pad) + pad, C] uint8 image of `images`
    [N, H, W, C] (uint8) laid out row by row; each image is magnified `scale` times (nearest).
    labels: one text per row (what it was asked), drawn in a left margin (t2i_jax/labels.py)."""
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
    if labels is not None:
        from t2i_jax import labels as labels_lib
        if len(labels) != rows:
            raise ValueError(f"{len(labels)} labels for {rows} rows.")
        grid = labels_lib.label_rows(grid, labels, h, pad, background)
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


def to_float(x_uint8) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1] (the inverse of to_uint8 up to rounding)."""
    return np.asarray(x_uint8, np.float32) / 127.5 - 1.0
