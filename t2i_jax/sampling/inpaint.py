"""Inpainting inputs of a sampling job: the image, its mask, and what the records say of them.

`sample.py --inpaint IMAGE --mask MASK.png` (white = keep, black = regenerate) or
`--mask_box x0,y0,x1,y1` (the pixel box to regenerate, x1 and y1 exclusive). The image must be
the model's size; the mask the image's. The method follows the model: GLIDE's x0 overwriting for
a mask-conditioned model (model.inpaint), RePaint (with --repaint_jumps) for any other
(t2i_jax/diffusion/inpainting.py). Every refusal comes before anything is written.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from t2i_jax import user_images
from t2i_jax.diffusion import inpainting

# A mask's level (in [-1, 1]) from which its pixel is kept: 128 of 255 and above is white.
MASK_THRESHOLD = 128 / 127.5 - 1.0


def parse_box(text: str) -> tuple:
    """'x0,y0,x1,y1' -> four ints, or ValueError saying the format."""
    try:
        box = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise ValueError(f"--mask_box takes four integers x0,y0,x1,y1 (the pixel box to "
                         f"regenerate, x1 and y1 exclusive), got {text!r}.")
    return box


def load_inpaint(image: str, shape: Sequence[int], *, mask: Optional[str] = None,
                 box: Optional[Sequence[int]] = None, method: str = "repaint",
                 jumps: int = 0, jump_length: int = 10) -> tuple:
    """Returns (known float32 [H, W, C] in [-1, 1], mask float32 [H, W, 1] (1 = known), record)
    for a model of image `shape` (H, W, C); ValueError naming the problem and the fix."""
    if (mask is None) == (box is None):
        raise ValueError("--inpaint needs the region to regenerate: --mask MASK.png (white = keep, "
                         "black = regenerate) or --mask_box x0,y0,x1,y1 (one of them).")
    if method not in inpainting.METHODS:
        raise ValueError(f"unknown inpainting method {method!r}; choose one of {inpainting.METHODS}.")
    h, w, c = (int(v) for v in shape)
    img = user_images.read(image, c, "--inpaint")  # as a viewer shows it, at the model's channels
    x = img.pixels
    if x.shape[:2] != (h, w):
        raise ValueError(f"--inpaint {image} is {x.shape[1]}x{x.shape[0]} (width x height), but "
                         f"the model makes {w}x{h} images: resize it to {w}x{h} first.")
    if mask is not None:
        mk = user_images.read(mask, 1, "--mask")
        m = mk.pixels[..., 0]
        if m.shape != (h, w):
            raise ValueError(f"--mask {mask} is {m.shape[1]}x{m.shape[0]} (width x height), but "
                             f"the image is {w}x{h}: the mask must have the image's size.")
        known = (m >= MASK_THRESHOLD).astype(np.float32)[..., None]
        mask_record = {"mask": mk.record["path"], "mask_sha256": mk.record["sha256"],
                       "mask_pixels_sha256": mk.record["pixels_sha256"]}
    else:
        known = inpainting.box_mask(h, w, box)
        mask_record = {"mask_box": [int(v) for v in box]}
    n_known = int(known.sum())
    if n_known == 0:
        raise ValueError("the mask has no known pixel (every level is below 128, i.e. dark: "
                         "regenerate; or the box covers the whole image): everything would be "
                         "regenerated, which is plain sampling; drop --inpaint, or mark the pixels "
                         "to keep in white.")
    if n_known == h * w:
        raise ValueError("the mask has no pixel to regenerate (every level is 128 or more, which "
                         "counts as white: keep; or the box is empty): mark the region to "
                         "regenerate in black.")
    record = {"method": method, "image": img.record["path"], "image_sha256": img.record["sha256"],
              "image_pixels_sha256": img.record["pixels_sha256"], **mask_record,
              "known_fraction": round(n_known / (h * w), 6)}
    if method == "repaint":
        record.update(jumps=int(jumps), jump_length=int(jump_length))
    return x, known, record
