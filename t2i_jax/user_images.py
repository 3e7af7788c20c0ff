"""Every image a user hands in (an inpainting image and mask, a guide's reference, low-resolution
inputs, variations and interpolation ends), read as a viewer shows it.

    img = read(path, channels=3, flag="--inpaint")   # img.pixels: float32 [H, W, C] in [-1, 1]

- EXIF orientation is honoured (the pixels as a viewer shows them, not as stored).
- Palette, grey, grey + alpha, RGBA, CMYK (and the other Pillow colour modes) and 16-bit images
  are converted to `channels`: alpha is composited on white (BACKGROUND), a palette is read as
  its colours, 16-bit levels are scaled to [-1, 1] (u / 65535), never clipped to 8 bits; colour
  becomes grey by ITU-R 601-2 luma (Pillow's "L"), grey becomes colour by repetition.
- Whatever cannot be read is refused with one line (a UsageError: the command line cannot run,
  exit code 2) naming the flag, the file and the fix: a
  missing file, a directory, not an image, truncated or damaged data, an image larger than
  MAX_PIXELS (checked from the header, before anything is decoded), 32-bit float data.
- `img.record` is what a job keeps of it: the file's path and sha256, and the sha256 of the
  decoded pixels the model sees (`pixels_sha256`), so a reader change that alters them is a
  different job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings

import numpy as np

from t2i_jax import images
from t2i_jax.errors import UsageError

MAX_PIXELS = 8192 * 8192  # larger images are refused before decoding (64 Mpx)
BACKGROUND = 255          # what transparent pixels are composited on: white
_GREY16 = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclasses.dataclass(frozen=True)
class UserImage:
    pixels: np.ndarray   # float32 [H, W, channels] in [-1, 1]
    record: dict         # {"path", "sha256", "pixels_sha256", "mode"}

    @property
    def uint8(self) -> np.ndarray:
        """The pixels as 8-bit levels (exactly the file's for an 8-bit file)."""
        return images.to_uint8(self.pixels)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pixels_sha256(pixels: np.ndarray) -> str:
    a = np.ascontiguousarray(pixels, np.float32)
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()


def read(path: str, channels: int, flag: str) -> UserImage:
    """The image file `path` as float32 [H, W, channels] in [-1, 1] with its record, or a
    ValueError (one line) naming `flag`, the file and what to pass instead."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    if channels not in (1, 3):
        raise UsageError(f"channels must be 1 or 3, got {channels}.")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory; pass an image file (PNG, JPEG, WebP).")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path} does not exist; pass an image file (PNG, JPEG, WebP).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise _TooLarge(w, h)
                im.load()
                im = ImageOps.exif_transpose(im)
                pixels, mode = _to_channels(im, channels, flag, path)
    except _TooLarge as e:
        raise UsageError(f"{flag} {path} is {e.w}x{e.h} pixels, more than this reader takes "
                         f"({MAX_PIXELS // 2**20} Mpx); downscale it to the model's size first."
                         ) from None
    except Image.DecompressionBombError:
        raise UsageError(f"{flag} {path} is larger than this reader takes ({MAX_PIXELS // 2**20} "
                         "Mpx); downscale it to the model's size first.") from None
    except UnidentifiedImageError:
        raise UsageError(f"{flag} {path} is not an image Pillow can read; pass a PNG, JPEG or "
                         "WebP file.") from None
    except (OSError, SyntaxError, EOFError) as e:  # truncated or damaged data
        raise UsageError(f"{flag} {path} is truncated or damaged ({_first_line(e)}); pass an "
                         "intact image file.") from None
    record = {"path": os.path.abspath(path), "sha256": file_sha256(path),
              "pixels_sha256": pixels_sha256(pixels), "mode": mode}
    return UserImage(pixels, record)


class _TooLarge(Exception):
    def __init__(self, w, h):
        super().__init__(f"{w}x{h}")
        self.w, self.h = w, h


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:160]


def _composite(rgb_or_l: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Float levels in [0, 1] over BACKGROUND by their alpha in [0, 1]."""
    return rgb_or_l * alpha + (BACKGROUND / 255.0) * (1.0 - alpha)


def _to_channels(im, channels: int, flag: str, path: str) -> tuple:
    """(float32 [H, W, channels] in [-1, 1], the file's Pillow mode) of a loaded image."""
    mode = im.mode
    if mode in _GREY16:
        a = np.asarray(im).astype(np.float64)
        if a.min() < 0 or a.max() > 65535:
            raise UsageError(f"{flag} {path} holds 32-bit integer levels outside 0..65535; save "
                             "it as an 8- or 16-bit image.")
        level = a / 65535.0                                   # [H, W] in [0, 1]
        return _finish(level[..., None], channels), mode
    if mode == "F":
        raise UsageError(f"{flag} {path} holds 32-bit float pixels; save it as an 8- or 16-bit "
                         "image.")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("La", "RGBa"):  # premultiplied alpha
        im = im.convert({"La": "LA", "RGBa": "RGBA"}[mode])
    elif mode not in ("L", "LA", "RGB", "RGBA"):  # CMYK, YCbCr, LAB, HSV, ...
        im = im.convert("RGB")
    if im.mode in ("LA", "RGBA"):
        a = np.asarray(im).astype(np.float64) / 255.0
        level = _composite(a[..., :-1], a[..., -1:])
        if level.shape[-1] == 3 and channels == 1:
            level = (level * np.array([299, 587, 114]) / 1000.0).sum(-1, keepdims=True)
        return _finish(level, channels), mode
    if im.mode == "RGB" and channels == 1:
        im = im.convert("L")                                  # Pillow's integer luma
    u = np.asarray(im)
    u = u[..., None] if u.ndim == 2 else u
    if u.shape[-1] == 1 and channels == 3:
        u = np.repeat(u, 3, axis=-1)
    return images.to_float(u), mode  # 8-bit levels: exactly images.to_float, as ever


def _finish(level: np.ndarray, channels: int) -> np.ndarray:
    """[H, W, 1 or 3] float levels in [0, 1] -> float32 [H, W, channels] in [-1, 1]."""
    if level.shape[-1] == 1 and channels == 3:
        level = np.repeat(level, 3, axis=-1)
    return (level * 2.0 - 1.0).astype(np.float32)
