"""imagefolder and webdataset sources (t2i_jax/data/user_data.py, user_sources.py,
user_staging.py): prepared once into TFDS array_record, reused while unchanged, bad records
counted, bad input refused in one line."""

import io
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from t2i_jax import data
from t2i_jax.data import prepare as prepare_lib, user_data, user_staging
from t2i_jax.data.user_sources import expand_braces
from t2i_jax.errors import UsageError
from user_data_fixtures import encode, pixels, records, write_imagefolder, write_webdataset


def cfg(data_dir, name, path, **kw):
    base = dict(name=name, path=str(path), image_size=16, channels=3, data_dir=str(data_dir),
                random_flip=False, caption="random")
    base.update(kw)
    return ml_collections.ConfigDict(base)


def stored(c, split="train") -> dict:
    """key -> (uint8 image [S, S, C], caption) of a prepared split."""
    src = user_data.open_split(c, split)
    out = {}
    for i in range(len(src)):
        r = src[i]
        out[r["key"].decode()] = (r["image"], r["caption"].decode())
    return out


def stored_all(c) -> dict:
    return {**stored(c, "train"), **stored(c, "test")}


def listing(d) -> list:
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


@pytest.fixture
def dd(tmp_path):
    d = tmp_path / "tfds"
    d.mkdir()
    (d / "keep.txt").write_text("")  # data_dir already holds something: refusals add nothing
    return d


# ---------------------------------------------------------------------------------------------
# Prepared once, anew on change


def test_prepared_once_reused_and_prepared_anew_on_change(tmp_path, dd, monkeypatch):
    folder = write_imagefolder(tmp_path / "if", records(12))
    c = cfg(dd, "imagefolder", folder)
    p = user_data.prepare(c)
    assert p.name.startswith("t2i_imagefolder_") and len(p.name) == len("t2i_imagefolder_") + 16
    info = os.path.join(str(dd), p.name, "1.0.0", "dataset_info.json")
    mtime = os.path.getmtime(info)
    summary = json.load(open(os.path.join(os.path.dirname(info), user_data.SUMMARY_FILE)))
    assert summary["kept"] == 12 and summary["bad"] == 0 and summary["bytes_written"] > 0
    calls = []
    real = user_staging._stage_unit
    monkeypatch.setattr(user_staging, "_stage_unit",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    again = user_data.prepare(c)
    assert again.name == p.name and os.path.getmtime(info) == mtime and calls == []
    assert not any(n.endswith(".staging") for n in listing(dd))
    # a touched file, a changed file, another image_size: each a new prepared set
    img = os.path.join(folder, "img000.png")
    st = os.stat(img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = user_data.prepare(c)
    assert touched.name != p.name and calls
    with open(img, "wb") as f:
        f.write(encode(pixels(999)))
    changed = user_data.prepare(c)
    assert changed.name not in (p.name, touched.name)
    np.testing.assert_array_equal(stored_all(c)["img000"][0],
                                  _reference(os.path.join(folder, "img000.png"), 16, 3))
    bigger = user_data.prepare(cfg(dd, "imagefolder", folder, image_size=20))
    assert bigger.name not in (p.name, touched.name, changed.name)
    assert user_data.open_split(cfg(dd, "imagefolder", folder, image_size=20), "train")[0][
        "image"].shape == (20, 20, 3)
    assert user_data.prepare(c).name == changed.name  # and the old size's set is still there


def test_a_resume_against_changed_data_is_refused(tmp_path, dd):
    path = write_webdataset(tmp_path / "w", records(12))
    c = cfg(dd, "webdataset", path)
    it = data.make_train_iterator(c, seed=0, global_batch_size=4, max_length=32,
                                  process_index=0, process_count=1)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["data_hash"] == user_data.prepare(c).fingerprint[:16]
    assert data.data_identity(c) == {"data_hash": state["data_hash"]}
    tar = os.path.join(str(tmp_path / "w"), "part-00000.tar")
    st = os.stat(tar)
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fresh = data.make_train_iterator(c, seed=0, global_batch_size=4, max_length=32,
                                     process_index=0, process_count=1)
    with pytest.raises(ValueError, match="data_hash: saved '[0-9a-f]{16}', now '[0-9a-f]{16}'"):
        fresh.set_state(state)


# ---------------------------------------------------------------------------------------------
# Images and captions as stored


def _reference(path, s, channels):
    """The stored image computed directly with PIL: EXIF transpose, convert, shorter side to s
    (LANCZOS), centre crop."""
    from PIL import ImageOps
    im = ImageOps.exif_transpose(Image.open(path)).convert("L" if channels == 1 else "RGB")
    w, h = im.size
    nw, nh = max(s, round(w * s / min(w, h))), max(s, round(h * s / min(w, h)))
    a = np.asarray(im.resize((nw, nh), Image.LANCZOS))
    a = a[(nh - s) // 2:(nh - s) // 2 + s, (nw - s) // 2:(nw - s) // 2 + s]
    return a[..., None] if a.ndim == 2 else a


@pytest.mark.parametrize("channels", [3, 1])
def test_images_equal_a_direct_pil_resize_and_crop(tmp_path, dd, channels):
    recs = [(f"r{i}", encode(pixels(i, h, w)), f"cap {i}")
            for i, (h, w) in enumerate([(20, 24), (31, 17), (16, 16), (40, 23), (17, 50)])]
    folder = write_imagefolder(tmp_path / "if", recs, meta="csv")
    c = cfg(dd, "imagefolder", folder, channels=channels, test_fraction=0.0)
    got = stored(c)
    assert set(got) == {k for k, _, _ in recs}
    for key, _, caption in recs:
        image, cap = got[key]
        assert cap == caption and image.shape == (16, 16, channels) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, _reference(os.path.join(folder, key + ".png"), 16,
                                                        channels))
    # the pipeline reads them as they are stored (no second resize)
    ex = data.load_split(c, "train")
    i = ex["caption"].index("cap 3")
    np.testing.assert_array_equal(ex["image"][i], got["r3"][0].astype(np.float32) / 127.5 - 1)


def test_exif_orientation_is_honoured(tmp_path, dd):
    a = np.zeros((32, 48, 3), np.uint8)
    a[:16] = 255  # stored: top half white
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the top becomes the right side
    recs = [("rotated", encode(a, "jpeg", exif=exif, quality=95), "rotated"),
            ("plain", encode(a, "jpeg", quality=95), "plain")]
    path = write_webdataset(tmp_path / "w", recs, ext="jpg")
    got = stored(cfg(dd, "webdataset", path, test_fraction=0.0))
    rot, plain = got["rotated"][0].mean(-1), got["plain"][0].mean(-1)
    assert rot[:, :6].mean() < 30 and rot[:, -6:].mean() > 225       # left dark, right white
    assert plain[:6].mean() > 225 and plain[-6:].mean() < 30         # top white, bottom dark


def test_modes_become_the_configured_channels(tmp_path, dd):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent: white over white
    grey16 = (np.arange(400).reshape(20, 20) * 160).astype(np.uint16)  # mean level 124.2 of 255
    buf = {}
    for key, im in (("rgba", Image.fromarray(rgba, "RGBA")),
                    ("p", Image.fromarray(pixels(1)).quantize(8)),
                    ("grey16", Image.fromarray(grey16)),
                    ("cmyk", Image.fromarray(pixels(2)).convert("CMYK")),
                    ("grey", Image.fromarray(pixels(3)[..., 0]))):
        b = io.BytesIO()
        im.save(b, format="jpeg" if key == "cmyk" else "png")
        buf[key] = b.getvalue()
    folder = write_imagefolder(tmp_path / "if", [(k, v, k) for k, v in buf.items()])
    got = stored(cfg(dd, "imagefolder", folder, test_fraction=0.0))
    assert set(got) == set(buf)  # none undecodable
    assert all(v[0].shape == (16, 16, 3) for v in got.values())
    assert (got["rgba"][0] == 255).all()
    g = got["grey"][0]
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    assert abs(got["grey16"][0].mean() - 124.2) < 10  # scaled from 16 bits, not clipped to 255
    for key in ("p", "cmyk", "grey"):  # a palette as its colours, CMYK as Pillow's RGB
        np.testing.assert_array_equal(got[key][0], _reference(os.path.join(folder, key + ".png"),
                                                              16, 3))


def test_imagefolder_and_webdataset_of_the_same_content_give_the_same_records(tmp_path, dd):
    recs = records(24)
    a = stored(cfg(dd, "imagefolder", write_imagefolder(tmp_path / "if", recs), test_fraction=0.3))
    for caption in ("txt", "json"):
        c = cfg(dd, "webdataset", write_webdataset(tmp_path / caption, recs, shards=3,
                                                   caption=caption), test_fraction=0.3)
        b = stored(c)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k][0], b[k][0])
            assert a[k][1] == b[k][1]
        assert data.split_size(c, "test") == 24 - len(b)


def test_held_out_split_is_stable_and_about_test_fraction(tmp_path, dd):
    keys = [f"k{i}" for i in range(20000)]
    frac = np.mean([user_data.split_of(k, 0.1) == "test" for k in keys])
    assert abs(frac - 0.1) < 0.01
    assert user_data.split_of("img000", 0.5) == user_data.split_of("img000", 0.5)
    recs = records(60)
    c = cfg(dd, "webdataset", write_webdataset(tmp_path / "a", recs), test_fraction=0.25)
    test = stored(c, "test")
    assert set(test) == {k for k, _, _ in recs if user_data.split_of(k, 0.25) == "test"}
    assert 5 <= len(test) <= 25
    # dropping records does not move the others between splits
    c2 = cfg(dd, "webdataset", write_webdataset(tmp_path / "b", recs[::2]), test_fraction=0.25)
    assert set(stored(c2, "test")) == {k for k in test if int(k[-3:]) % 2 == 0}
    prompts = data.sample_prompts(c)
    assert 1 <= len(prompts) <= 8 and set(prompts) <= {v[1] for v in test.values()}
    assert len(set(prompts)) == len(prompts) == min(8, len({v[1] for v in test.values()}))
    assert data.sample_prompts(c) == prompts and data.class_names(c) is None
    assert sorted(data.all_captions(c)) == sorted(v[1] for v in stored(c).values())
    assert data.split_size(c) + data.split_size(c, "test") == 60


def test_concurrent_preparations_prepare_once(tmp_path, dd, monkeypatch):
    """Two processes (threads here: the lock is per open file) sharing a data_dir: the first
    prepares, the other waits on the lock and reuses what it wrote."""
    import threading
    c = cfg(dd, "imagefolder", write_imagefolder(tmp_path / "if", records(20)))
    calls = []
    real = user_staging._stage_unit
    monkeypatch.setattr(user_staging, "_stage_unit",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    names = []
    threads = [threading.Thread(target=lambda: names.append(user_data.prepare(c).name))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(names) == 2 and names[0] == names[1] and len(calls) == 1


# ---------------------------------------------------------------------------------------------
# Bad records


def _bad_webdataset(tmp_path, n_good=40):
    recs = records(n_good)
    small = encode(pixels(7, 8, 9))
    recs += [("bad/undecodable", b"not an image at all", "x"),
             ("bad/empty", encode(pixels(8)), "   "),
             ("bad/small", small, "too small"),
             ("bad/nocap", encode(pixels(9)), None),
             ("bad/noimage", None, "a caption without its image"),
             ("img001", encode(pixels(10)), "a duplicate key")]
    return write_webdataset(tmp_path / "bad", recs, shards=2)


def test_bad_records_are_counted_by_kind_with_their_keys(tmp_path, dd, capsys):
    c = cfg(dd, "webdataset", _bad_webdataset(tmp_path), max_bad_fraction=0.2)
    p = user_data.prepare(c)
    s = p.summary
    assert s["kept"] == 40 and s["bad"] == 6 and s["records"] == 46
    assert {k: (v["count"], v["keys"]) for k, v in s["skipped"].items()} == {
        "undecodable_image": (1, ["bad/undecodable"]), "missing_caption": (1, ["bad/empty"]),
        "too_small": (1, ["bad/small"]), "image_without_caption": (1, ["bad/nocap"]),
        "caption_without_image": (1, ["bad/noimage"]), "duplicate_key": (1, ["img001"])}
    out = capsys.readouterr().out
    assert "skipped 6" in out and "1 too_small (e.g. bad/small)" in out and "records/s" in out
    # the first record of a key is the one kept
    assert stored_all(c)["img001"][1] == "a picture number 1"
    # min_image_size lets a small image in (upscaled)
    p2 = user_data.prepare(cfg(dd, "webdataset", c.path, max_bad_fraction=0.2, min_image_size=8))
    assert p2.summary["bad"] == 5 and p2.name != p.name


def test_too_many_bad_records_are_refused_and_nothing_is_left(tmp_path, dd):
    path = _bad_webdataset(tmp_path, n_good=40)
    before = listing(dd)
    with pytest.raises(UsageError) as e:
        user_data.prepare(cfg(dd, "webdataset", path))
    msg = str(e.value)
    assert "\n" not in msg and "6 of 46 records" in msg and "max_bad_fraction=0.05" in msg
    assert "1 undecodable_image (e.g. bad/undecodable)" in msg and "Nothing was prepared" in msg
    assert listing(dd) == before


def test_a_wrong_caption_field_is_named_with_the_fields_seen(tmp_path, dd):
    path = write_webdataset(tmp_path / "w", records(6), caption="json", caption_key="alt")
    with pytest.raises(UsageError, match=r"6 missing_caption.*data\.caption_key.*now 'caption'; "
                                         r"the \.json files have: alt, url"):
        user_data.prepare(cfg(dd, "webdataset", path))
    assert len(stored(cfg(dd, "webdataset", path, caption_key="alt", test_fraction=0.0))) == 6


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the problem and the fix, nothing written


def _refusals(tmp_path):
    good = write_imagefolder(tmp_path / "good", records(3))
    nometa = write_imagefolder(tmp_path / "nometa", records(3), meta="none")
    nocol = write_imagefolder(tmp_path / "nocol", records(3), caption_key="caption")
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "part-00000.tar").write_bytes(b"\x89PNG not a tar" * 100)
    shards = write_webdataset(tmp_path / "shards", records(3))
    return [
        (dict(name="imagefolder", path=None), "data.path is not set.*--config.data.path=DIR"),
        (dict(name="imagefolder", path=str(tmp_path / "nowhere")), "does not exist"),
        (dict(name="imagefolder", path=str(tmp_path / "empty")), "holds no images"),
        (dict(name="imagefolder", path=os.path.dirname(shards)),
         "holds no images.*but 1 .tar file.*set data.name=webdataset"),
        (dict(name="imagefolder", path=nometa), "has no metadata.jsonl or metadata.csv"),
        (dict(name="imagefolder", path=nocol),
         r"no 'text' column.*\(it has: file_name, caption\).*data.caption_key"),
        (dict(name="webdataset", path=str(tmp_path / "fake")), "part-00000.tar is not a tar"),
        (dict(name="webdataset", path=str(tmp_path / "empty")), "holds no .tar files"),
        (dict(name="webdataset", path=str(tmp_path / "shards" / "x-{000..009}.tar")),
         r"matches no file \(it stands for 10 names, e.g. .*x-000.tar\)"),
        (dict(name="webdataset", path=str(tmp_path / "shards" / "*.tgz")), "matches no file"),
        (dict(name="imagefolder", path=good, image_size=64),
         r"data.image_size=64 is larger than every image.*largest is 24x22.*data.min_image_size"),
        (dict(name="webdataset", path=shards, test_fraction=1.5), "test_fraction must be in"),
    ]


def test_bad_input_is_refused_in_one_line_before_anything_is_written(tmp_path, dd):
    for kw, pattern in _refusals(tmp_path):
        kw = dict(kw)
        c = cfg(dd, kw.pop("name"), kw.pop("path"), **kw)
        if c.path == "None":
            c.path = None
        before = listing(dd)
        with pytest.raises(UsageError, match=pattern) as e:
            data.split_size(c)
        assert "\n" not in str(e.value), str(e.value)
        assert listing(dd) == before, (pattern, listing(dd))


def test_the_command_prepares_and_refuses_in_one_line(tmp_path, dd, capsys):
    path = write_webdataset(tmp_path / "w", records(10), shards=2)
    base = ["--config", os.path.join(os.path.dirname(__file__), "..", "configs", "shapes.py"),
            "--config.data.name=webdataset", f"--config.data.data_dir={dd}",
            "--config.data.image_size=16", "--noprogress"]
    assert prepare_lib.run(base + [f"--config.data.path={path}", "--process_count=2",
                                   "--process_index=1"]) == 0
    assert "process 1" in capsys.readouterr().out
    assert prepare_lib.run(base + [f"--config.data.path={path}", "--process_count=2",
                                   "--process_index=0"]) == 0
    out = capsys.readouterr().out
    assert "is ready in" in out and "t2i_webdataset_" in out
    alone = user_data.prepare(cfg(dd, "webdataset", path))  # what one process makes: reused
    assert alone.summary["kept"] == 10 and f"{alone.name} is ready" in out
    assert prepare_lib.run(base + ["--config.data.path=" + str(tmp_path / "no" / "*.tar")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matches no file" in err


def test_a_pool_of_workers_prepares_what_one_process_does(tmp_path, dd):
    recs = records(30)
    folder = write_imagefolder(tmp_path / "if", recs)
    one = stored(cfg(dd / "one", "imagefolder", folder))
    p = user_data.prepare(cfg(dd / "two", "imagefolder", folder), workers=2, chunk=7)
    two = stored(cfg(dd / "two", "imagefolder", folder))
    assert p.summary["kept"] == 30 and one.keys() == two.keys()
    for k in one:
        np.testing.assert_array_equal(one[k][0], two[k][0])


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("d/p-{000..002}.tar") == ["d/p-000.tar", "d/p-001.tar", "d/p-002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
