"""The one reader of every image a user hands in (t2i_jax/user_images.py), against files Pillow
writes in every mode, with EXIF rotations: the decoded array equals what a viewer shows, computed
here independently (palette lookups, alpha over white, CMYK's inversion, 16-bit scaling, the
rotation a viewer applies)."""

import os

import numpy as np
import pytest
from PIL import Image

from t2i_jax import user_images

H, W = 6, 10  # not square: a rotation shows in the shape


def _rgb(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _grey(seed=1):
    return np.random.default_rng(seed).integers(0, 256, (H, W), dtype=np.uint8)


def _luma(rgb):
    """ITU-R 601-2 luma as Pillow's "L" rounds it: (299 R + 587 G + 114 B + 500) // 1000."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((299 * r + 587 * g + 114 * b + 500) // 1000).astype(np.uint8)


def _to_float(levels01):
    return (np.asarray(levels01, np.float64) * 2 - 1).astype(np.float32)


def _u8(u):
    return np.asarray(u, np.float32) / 127.5 - 1.0


def test_rgb_and_grey_files_are_read_at_the_models_channels(tmp_path):
    rgb, grey = _rgb(), _grey()
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    got = user_images.read(str(tmp_path / "rgb.png"), 3, "--x")
    np.testing.assert_array_equal(got.pixels, _u8(rgb))
    np.testing.assert_array_equal(got.uint8, rgb)  # exactly the file's levels back
    np.testing.assert_array_equal(user_images.read(str(tmp_path / "rgb.png"), 1, "--x").pixels,
                                  _u8(_luma(rgb))[..., None])
    np.testing.assert_array_equal(user_images.read(str(tmp_path / "grey.png"), 3, "--x").pixels,
                                  _u8(np.repeat(grey[..., None], 3, -1)))
    np.testing.assert_array_equal(user_images.read(str(tmp_path / "grey.png"), 1, "--x").pixels,
                                  _u8(grey)[..., None])


def test_a_palette_image_is_read_as_its_colours_not_its_indices(tmp_path):
    palette = np.random.default_rng(2).integers(0, 256, (16, 3), dtype=np.uint8)
    palette[0] = 0  # index 0 shows black, index 15 white: the indices would read inverted
    palette[15] = 255
    idx = np.random.default_rng(3).integers(0, 16, (H, W), dtype=np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(palette.reshape(-1).tolist())
    im.save(tmp_path / "p.png")
    got = user_images.read(str(tmp_path / "p.png"), 3, "--x").pixels
    np.testing.assert_array_equal(got, _u8(palette[idx]))
    # with a transparent entry: that colour composited over white
    im.info["transparency"] = 15
    im.save(tmp_path / "pt.png", transparency=3)
    want = palette[idx].astype(np.float64) / 255
    want[idx == 3] = 1.0
    np.testing.assert_allclose(user_images.read(str(tmp_path / "pt.png"), 3, "--x").pixels,
                               _to_float(want), atol=1e-6)


def test_alpha_is_composited_over_white(tmp_path):
    rgb, alpha = _rgb(), _grey(4)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    a = alpha[..., None] / 255.0
    want = rgb / 255.0 * a + (1 - a)
    np.testing.assert_allclose(user_images.read(str(tmp_path / "rgba.png"), 3, "--x").pixels,
                               _to_float(want), atol=1e-6)
    grey = _grey(5)
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "la.png")
    want = grey[..., None] / 255.0 * a + (1 - a)
    np.testing.assert_allclose(user_images.read(str(tmp_path / "la.png"), 1, "--x").pixels,
                               _to_float(want), atol=1e-6)


def test_cmyk_is_read_as_the_rgb_a_viewer_shows(tmp_path):
    cmyk = np.random.default_rng(6).integers(0, 256, (H, W, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    want = np.round((255 - c) * (255 - k) / 255).astype(np.uint8)  # R = 255 (1 - C)(1 - K)
    np.testing.assert_array_equal(user_images.read(str(tmp_path / "c.tif"), 3, "--x").pixels,
                                  _u8(want))


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    u16 = np.random.default_rng(7).integers(0, 65536, (H, W), dtype=np.uint16)
    Image.fromarray(u16).save(tmp_path / "g16.png")
    got = user_images.read(str(tmp_path / "g16.png"), 1, "--x").pixels
    np.testing.assert_allclose(got, _to_float(u16[..., None] / 65535.0), atol=1e-6)
    assert got.min() < -0.5 and got.max() > 0.5  # not all white, as a clip to 255 made it
    got3 = user_images.read(str(tmp_path / "g16.png"), 3, "--x").pixels
    np.testing.assert_array_equal(got3, np.repeat(got, 3, -1))


@pytest.mark.parametrize("orientation, turn", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_honoured(tmp_path, orientation, turn):
    """Orientation 3: the viewer turns the stored pixels 180 degrees; 6: 90 clockwise;
    8: 90 anticlockwise (np.rot90 turns anticlockwise for k > 0)."""
    stored = _rgb(8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    Image.fromarray(stored).save(path, exif=exif)
    got = user_images.read(str(path), 3, "--x")
    np.testing.assert_array_equal(got.uint8, np.rot90(stored, k=turn))


def test_the_record_holds_the_files_hash_and_the_decoded_pixels_hash(tmp_path):
    rgb = _rgb(9)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "b.png", compress_level=0)  # other bytes, same pixels
    a = user_images.read(str(tmp_path / "a.png"), 3, "--x").record
    b = user_images.read(str(tmp_path / "b.png"), 3, "--x").record
    assert a["sha256"] != b["sha256"] and a["pixels_sha256"] == b["pixels_sha256"]
    assert a["path"] == os.path.abspath(tmp_path / "a.png") and a["mode"] == "RGB"


def test_what_cannot_be_read_is_refused_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "notes.png").write_text("not an image")
    Image.fromarray(_rgb()).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    Image.fromarray(np.zeros((H, W), np.float32), "F").save(tmp_path / "f.tif")
    cases = [(tmp_path / "missing.png", "does not exist"),
             (tmp_path, "is a directory"),
             (tmp_path / "notes.png", "is not an image Pillow can read"),
             (tmp_path / "cut.png", "is truncated or damaged"),
             (tmp_path / "f.tif", "holds 32-bit float pixels")]
    for path, want in cases:
        with pytest.raises(ValueError, match=want) as e:
            user_images.read(str(path), 3, "--inpaint")
        assert str(e.value).startswith(f"--inpaint {path}") and "\n" not in str(e.value)
    # too large: refused from the header, before the pixels are decoded
    monkeypatch.setattr(user_images, "MAX_PIXELS", H * W - 1)
    with pytest.raises(ValueError, match=f"is {W}x{H} pixels, more than this reader takes"):
        user_images.read(str(tmp_path / "whole.png"), 3, "--guide_image")
