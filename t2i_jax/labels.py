"""Row labels for image grids: what each row was asked (its prompt, weight, stage), drawn in a
left margin so that a person can tell the rows apart.

    labelled = label_rows(grid, labels, row_height, pad)   # uint8 [H, W, C] -> [H, margin + W, C]

Text is drawn glyph by glyph with the first font that has the glyph: DejaVu Sans (shipped with
matplotlib), then the system's fonts (a CJK or emoji font where one is installed), then Last
Resort (also shipped with matplotlib), whose glyph for a code point nobody covers is a box naming
its Unicode block: a clear fallback, never a blank. A label wider than the margin is cut with
"...".
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np

FONT_SIZE = 11
MAX_MARGIN = 220  # pixels: a long prompt is cut, the images keep their size


@functools.lru_cache(maxsize=1)
def font_paths() -> tuple:
    """The fonts tried in order: DejaVu Sans, the system's, Last Resort."""
    import matplotlib
    from matplotlib import font_manager
    shipped = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    system = sorted(p for p in font_manager.findSystemFonts() if p.lower().endswith((".ttf", ".otf"))
                    and "dejavu" not in os.path.basename(p).lower())
    return (os.path.join(shipped, "DejaVuSans.ttf"), *system,
            os.path.join(shipped, "LastResortHE-Regular.ttf"))


@functools.lru_cache(maxsize=64)
def _coverage(path: str):
    from matplotlib.ft2font import FT2Font
    try:
        return FT2Font(path)
    except (OSError, RuntimeError):
        return None


@functools.lru_cache(maxsize=64)
def _font(path: str, size: int):
    from PIL import ImageFont
    return ImageFont.truetype(path, size)


def font_for(ch: str) -> str:
    """The first font (font_paths) with a glyph for `ch`."""
    paths = font_paths()
    for path in paths[:-1]:
        f = _coverage(path)
        if f is not None and f.get_char_index(ord(ch)):
            return path
    return paths[-1]


def draw_text(text: str, height: int, max_width: int, size: int = FONT_SIZE) -> np.ndarray:
    """uint8 [height, width <= max_width] ink (255 = text) of one line of `text`."""
    from PIL import Image, ImageDraw
    runs, width = [], 0
    for ch in text.replace("\n", " "):
        path = font_for(ch)
        advance = int(np.ceil(_font(path, size).getlength(ch)))
        runs.append((ch, path, advance))
        width += advance
    if width > max_width:  # cut, and say so
        dots = int(np.ceil(_font(font_paths()[0], size).getlength("...")))
        kept, used = [], 0
        for run in runs:
            if used + run[2] > max_width - dots:
                break
            kept.append(run)
            used += run[2]
        runs = kept + [(".", font_paths()[0], dots // 3)] * 3
        width = used + 3 * (dots // 3)
    canvas = Image.new("L", (max(width, 1), height), 0)
    draw = ImageDraw.Draw(canvas)
    x, y = 0, max(0, (height - size) // 2 - 1)
    for ch, path, advance in runs:
        draw.text((x, y), ch, fill=255, font=_font(path, size))
        x += advance
    return np.asarray(canvas)


def label_rows(grid: np.ndarray, labels: Sequence[str], row_height: int, pad: int,
               background: int = 255, ink: int = 0) -> np.ndarray:
    """The grid with a left margin holding labels[r] beside row r (rows of row_height pixels
    after a pad)."""
    grid = np.asarray(grid)
    texts = [draw_text(str(t), max(row_height, FONT_SIZE + 4), MAX_MARGIN) for t in labels]
    margin = max((t.shape[1] for t in texts), default=0) + 2 * pad
    h, _, c = grid.shape
    out = np.full((h, margin + grid.shape[1], c), background, np.uint8)
    out[:, margin:] = grid
    for r, t in enumerate(texts):
        top = pad + r * (row_height + pad) + (row_height - t.shape[0]) // 2
        top = max(0, min(top, h - t.shape[0]))
        region = out[top:top + t.shape[0], pad:pad + t.shape[1]].astype(np.float32)
        a = (t.astype(np.float32) / 255.0)[..., None]
        out[top:top + t.shape[0], pad:pad + t.shape[1]] = np.round(
            region * (1 - a) + ink * a).astype(np.uint8)
    return out
