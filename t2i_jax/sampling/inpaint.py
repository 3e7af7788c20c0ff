"""Inpainting inputs of a sampling job: the image, its mask, and what the records say of them.

`sample.py --inpaint IMAGE --mask MASK.png` (white = keep, black = regenerate) or
`--mask_box x0,y0,x1,y1` (the pixel box to regenerate, x1 and y1 exclusive). The image must be
the model's size; the mask the image's. The method follows the model: GLIDE's x0 overwriting for
a mask-conditioned model (model.inpaint), RePaint (with --repaint_jumps) for any other
(t2i_jax/diffusion/inpainting.py). Every refusal comes before anything is written.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional, Sequence

import numpy as np

from t2i_jax.diffusion import inpainting


def _read_image(path: str, flag: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path} is not a file (pass a PNG or JPEG image).")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB") if flag == "--inpaint" else im.convert("L")
            return np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{flag} {path} is not a readable image ({e}); pass a PNG or JPEG "
                         "file.") from None


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


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
    x = _read_image(image, "--inpaint")
    if x.ndim == 2:
        x = x[..., None]
    if c == 1 and x.shape[-1] == 3:
        if not np.array_equal(x, x[..., :1].repeat(3, -1)):
            raise ValueError(f"--inpaint {image} is a colour image, but the model makes grey "
                             "images: pass a grey image.")
        x = x[..., :1]
    if c == 3 and x.shape[-1] == 1:
        x = x.repeat(3, -1)
    if x.shape[:2] != (h, w):
        raise ValueError(f"--inpaint {image} is {x.shape[1]}x{x.shape[0]} (width x height), but "
                         f"the model makes {w}x{h} images: resize it to {w}x{h} first.")
    if mask is not None:
        m = _read_image(mask, "--mask")
        if m.ndim == 3:
            m = m[..., 0] if m.shape[-1] == 1 else m.mean(-1)
        if m.shape != (h, w):
            raise ValueError(f"--mask {mask} is {m.shape[1]}x{m.shape[0]} (width x height), but "
                             f"the image is {w}x{h}: the mask must have the image's size.")
        known = (m >= 128).astype(np.float32)[..., None]
        mask_record = {"mask": os.path.abspath(mask), "mask_sha256": _sha256(mask)}
    else:
        known = inpainting.box_mask(h, w, box)
        mask_record = {"mask_box": [int(v) for v in box]}
    n_known = int(known.sum())
    if n_known == 0:
        raise ValueError("the mask has no known pixel (all black, or the box covers the whole "
                         "image): everything would be regenerated, which is plain sampling; drop "
                         "--inpaint, or mark the pixels to keep in white.")
    if n_known == h * w:
        raise ValueError("the mask has no unknown pixel (all white, or an empty box): there is "
                         "nothing to regenerate; mark the region to regenerate in black.")
    record = {"method": method, "image": os.path.abspath(image), "image_sha256": _sha256(image),
              **mask_record, "known_fraction": round(n_known / (h * w), 6)}
    if method == "repaint":
        record.update(jumps=int(jumps), jump_length=int(jump_length))
    return np.asarray(x, np.float32) / 127.5 - 1.0, known, record
