"""Preparing a user source's records: each unit decoded into a staging part, the parts'
summary and the refusal of a source with too many bad records, and the parts read back in order
for the TFDS writer (user_data.py drives these; user_sources.py lists and reads the source).

Decoding a record's image (`prepare_image`): Pillow, EXIF orientation honoured
(ImageOps.exif_transpose), converted to data.channels as t2i_jax/user_images.py converts a user's
image (alpha over white, a palette as its colours, CMYK to RGB, 16-bit levels scaled; colour to
grey by Pillow's luma), the shorter side resized to data.image_size with Pillow's antialiased
LANCZOS and centre-cropped (the pipeline's `process_image` geometry: new size
round(side * S / shorter), offsets (new - S) // 2). A JPEG is first decoded at the smallest DCT
scale that keeps both sides >= 2 S (Image.draft), which makes large photos cheap. RESIZE names all
of this; it is part of the prepared set's hash.

A part is `STAGING/part-UUUUU.bin` (the records' PNG bytes, concatenated) and `.json` (per record
[key, caption, offset, length]; the bad records' counts and first keys by kind), the JSON renamed
into place last: it exists only for a complete part.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
import time
import warnings
from typing import Callable, Optional

from t2i_jax.data.user_sources import Listing, Options, Unit, read_unit
from t2i_jax.errors import UsageError

SPLITS = ("train", "test")
RESIZE = "exif_transpose; to channels; JPEG draft >= 2S; shorter side LANCZOS; centre crop"
DRAFT_FACTOR = 2
MAX_PIXELS = 8192 * 8192  # larger images are undecodable_image, judged from the header
EXAMPLE_KEYS = 5          # bad keys named per kind


class Bad(Exception):
    """A record that cannot be used: `kind` is one of user_sources.BAD_KINDS."""

    def __init__(self, kind: str, size: Optional[tuple] = None):
        super().__init__(kind)
        self.kind, self.size = kind, size


def split_of(key: str, test_fraction: float) -> str:
    """"test" when sha256(key) as a fraction in [0, 1) is below test_fraction, else "train"."""
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "big")
    return "test" if u / 2.0 ** 64 < test_fraction else "train"


# ---------------------------------------------------------------------------------------------
# Decoding


def prepare_image(data: bytes, opts: Options):
    """The record's image as stored: PIL image S x S, mode "L" (1 channel) or "RGB" (3); Bad
    ("undecodable_image" | "too_small", with the image's size) otherwise."""
    from PIL import Image, ImageOps
    s = opts.image_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, EXIF and palette notes
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise Bad("undecodable_image", (w, h))
            if min(w, h) < opts.min_image_size:
                raise Bad("too_small", (w, h))
            if im.format == "JPEG":
                im.draft(im.mode, (DRAFT_FACTOR * s, DRAFT_FACTOR * s))
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_channels(im, opts.channels)
    except Bad:
        raise
    except Exception:  # noqa: BLE001  (truncated, damaged, not an image, an unusual mode)
        raise Bad("undecodable_image") from None
    return resize_and_crop(im, s)


def resize_and_crop(im, s: int):
    """Shorter side to s (LANCZOS, antialiased), centre crop s x s: process_image's geometry."""
    from PIL import Image
    w, h = im.size
    if (w, h) != (s, s):
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        im = im.resize((nw, nh), Image.LANCZOS)
        left, top = (nw - s) // 2, (nh - s) // 2
        im = im.crop((left, top, left + s, top + s))
    return im


def _to_channels(im, channels: int):
    """A loaded PIL image as mode "L" (channels 1) or "RGB" (3), 8 bits per level."""
    from PIL import Image
    if im.mode in ("L", "RGB"):  # nearly every photo: Pillow converts as user_images does
        want = "L" if channels == 1 else "RGB"
        return im if im.mode == want else im.convert(want)
    from t2i_jax import images, user_images
    pixels, _ = user_images._to_channels(im, channels, "data.path", "")  # [H, W, C] in [-1, 1]
    u8 = images.to_uint8(pixels)
    return Image.fromarray(u8[..., 0] if channels == 1 else u8)


# ---------------------------------------------------------------------------------------------
# Staging: units -> parts


def _part(staging: str, u: int) -> tuple:
    base = os.path.join(staging, f"part-{u:05d}")
    return base + ".bin", base + ".json"


def staged_units(staging: str, num_units: int) -> int:
    """How many of the units have a complete part."""
    return sum(os.path.exists(_part(staging, u)[1]) for u in range(num_units))


def _stage_unit(listing: Listing, unit: Unit, opts: Options, staging: str,
                tick: Optional[Callable] = None) -> None:
    """Decodes one unit's records into its part files (PNG bytes + a JSON index)."""
    bin_path, json_path = _part(staging, unit.index)
    tmp = f".tmp{os.getpid()}"
    records, bad, largest, fields = [], {}, None, set()
    with open(bin_path + tmp, "wb") as out:
        for raw in read_unit(listing, unit, opts):
            kind = ("caption_without_image" if raw.image is None else
                    "image_without_caption" if raw.caption is None else
                    "missing_caption" if not raw.caption else None)
            if kind is None:
                try:
                    buf = io.BytesIO()
                    prepare_image(raw.image, opts).save(buf, format="png")
                except Bad as b:
                    kind = b.kind
                    if b.size and (largest is None or min(b.size) > min(largest)):
                        largest = b.size
            if kind is None:
                data = buf.getvalue()
                records.append([raw.key, raw.caption, out.tell(), len(data)])
                out.write(data)
            else:
                n, keys = bad.setdefault(kind, [0, []])
                bad[kind][0] = n + 1
                if len(keys) < EXAMPLE_KEYS:
                    keys.append(raw.key)
                if kind == "missing_caption":
                    fields.update(raw.caption_fields)
            if tick is not None:
                tick(1, raw.nbytes)
    meta = {"unit": unit.index, "records": records, "bad": bad, "largest_small": largest,
            "caption_fields": sorted(fields)[:20], "bytes_read": unit.nbytes}
    with open(json_path + tmp, "w") as f:
        json.dump(meta, f)
    os.replace(bin_path + tmp, bin_path)
    os.replace(json_path + tmp, json_path)  # last: the part is complete


_COUNTS = None  # a pool worker's shared progress counters [records, bytes] (set by _init_worker)


def _init_worker(counts) -> None:
    global _COUNTS
    _COUNTS = counts


def _tick_shared(records: int, nbytes: int) -> None:
    with _COUNTS.get_lock():
        _COUNTS[0] += records
        _COUNTS[1] += nbytes


def _stage_job(args) -> None:
    listing, unit, opts, staging = args
    _stage_unit(listing, unit, opts, staging, _tick_shared)


def stage(listing: Listing, opts: Options, staging: str, units, *, workers: int = 1,
          progress: bool = False) -> dict:
    """Stages the units that have no complete part yet; returns what this call did:
    {"units", "records", "bytes_read", "seconds"}."""
    os.makedirs(staging, exist_ok=True)
    todo = [u for u in units if not os.path.exists(_part(staging, u.index)[1])]
    slim = dataclasses.replace(listing, files=(), units=())  # what a unit's job needs
    t0, done = time.time(), [0, 0]
    total = None if listing.num_records is None else sum(len(u.items) for u in todo)
    bar = progress_bar(progress, total, "decoding")

    def tick(records, nbytes):
        done[0] += records
        done[1] += nbytes
        if bar is not None:
            bar.update(records)
            bar.set_postfix_str(_rate(done[1], time.time() - t0), refresh=False)

    if workers <= 1 or len(todo) <= 1:
        for u in todo:
            _stage_unit(slim, u, opts, staging, tick)
    else:
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded (jax, grain) process
        counts = ctx.Array("q", 2)
        jobs = [(slim, u, opts, staging) for u in todo]
        with ctx.Pool(min(workers, len(todo)), _init_worker, (counts,)) as pool:
            result = pool.map_async(_stage_job, jobs, chunksize=1)
            while not result.ready():
                result.wait(0.25)
                with counts.get_lock():
                    now = list(counts)
                tick(now[0] - done[0], now[1] - done[1])
            try:
                result.get()  # a worker's error is raised here
            except UsageError as e:  # a damaged shard: one line, raised from our code
                raise UsageError(str(e)) from None
    if bar is not None:
        bar.close()
    return {"units": len(todo), "records": done[0], "bytes_read": done[1],
            "seconds": time.time() - t0}


def progress_bar(progress: bool, total, desc: str):
    """A tqdm bar on stderr (None: no progress shown)."""
    if not progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=" records", dynamic_ncols=True, file=sys.stderr)


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / 1e6 / max(seconds, 1e-9):.1f} MB/s read"


# ---------------------------------------------------------------------------------------------
# The summary, the refusal, the parts read back


def summarize(staging: str, num_units: int, opts: Options) -> tuple:
    """(summary dict, set of (unit, index) to drop: later records of a key already kept)."""
    seen, drop = set(), set()
    bad = {}
    splits = dict.fromkeys(SPLITS, 0)
    largest, fields = None, set()
    for u in range(num_units):
        with open(_part(staging, u)[1]) as f:
            meta = json.load(f)
        for kind, (n, keys) in meta["bad"].items():
            c = bad.setdefault(kind, {"count": 0, "keys": []})
            c["count"] += n
            c["keys"] = (c["keys"] + keys)[:EXAMPLE_KEYS]
        for i, (key, *_rest) in enumerate(meta["records"]):
            if key in seen:
                drop.add((u, i))
                c = bad.setdefault("duplicate_key", {"count": 0, "keys": []})
                c["count"] += 1
                if len(c["keys"]) < EXAMPLE_KEYS:
                    c["keys"].append(key)
            else:
                seen.add(key)
                splits[split_of(key, opts.test_fraction)] += 1
        s = meta.get("largest_small")
        if s and (largest is None or min(s) > min(largest)):
            largest = tuple(s)
        fields.update(meta.get("caption_fields", ()))
    n_bad = sum(c["count"] for c in bad.values())
    kept = len(seen)
    summary = {"kind": opts.kind, "path": opts.path, "records": kept + n_bad, "kept": kept,
               "splits": splits, "bad": n_bad,
               "bad_fraction": n_bad / max(1, kept + n_bad), "skipped": bad,
               "largest_too_small": largest, "json_fields": sorted(fields)[:20],
               "options": dataclasses.asdict(opts)}
    return summary, drop


def check(summary: dict, opts: Options) -> None:
    """Refuses (UsageError, one line) a source with too many bad records or nothing to train on."""
    total, kept, skipped = summary["records"], summary["kept"], summary["skipped"]
    where = f"data.path={opts.path}"
    small = skipped.get("too_small", {}).get("count", 0)
    if kept == 0 and small:
        w, h = summary["largest_too_small"]
        raise UsageError(
            f"data.image_size={opts.image_size} is larger than every image of {where} (the "
            f"largest is {w}x{h}); lower data.image_size, or set data.min_image_size to at most "
            f"{min(w, h)} to upscale smaller images. Nothing was prepared.")
    if total == 0:
        raise UsageError(f"{where} holds no records (no image or caption file); pass the folder "
                         "of your data.")
    if summary["bad_fraction"] > opts.max_bad_fraction or kept == 0:
        kinds = sorted(skipped.items(), key=lambda kv: -kv[1]["count"])
        parts = [f"{n['count']} {k} (e.g. {', '.join(map(str, n['keys'][:3]))})" for k, n in kinds]
        raise UsageError(
            f"{summary['bad']} of {total} records of {where} are bad ({summary['bad_fraction']:.1%}"
            f" > data.max_bad_fraction={opts.max_bad_fraction:g}): {'; '.join(parts)}; "
            f"{_hint(kinds[0][0], summary, opts)}. Nothing was prepared.")
    if summary["splits"]["train"] == 0:
        raise UsageError(f"all {kept} records of {where} fell into the held-out split "
                         f"(data.test_fraction={opts.test_fraction:g}); add records or lower "
                         "data.test_fraction.")


def _hint(kind: str, summary: dict, opts: Options) -> str:
    if kind == "missing_caption":
        seen = summary["json_fields"]
        return (f"set data.caption_key to the caption field (now {opts.caption_key!r}"
                + (f"; the .json files have: {', '.join(seen)})" if seen else ")"))
    if kind == "too_small":
        return (f"lower data.image_size or data.min_image_size (now {opts.min_image_size}) to keep "
                "smaller images")
    if kind == "image_without_caption":
        return "give every image a caption (a metadata row, or KEY.txt / KEY.json beside it)"
    if kind == "caption_without_image":
        return "remove the captions whose image is missing, or add the images"
    return "fix or remove those records, or raise data.max_bad_fraction"


class Plan:
    """The examples of each split, read back from the parts in unit order."""

    def __init__(self, staging: str, num_units: int, drop: set, opts: Options, splits, bar=None):
        self.staging, self.num_units, self.drop, self.opts = staging, num_units, drop, opts
        self.splits, self.bar = tuple(splits), bar

    def examples(self, split: str):
        for u in range(self.num_units):
            bin_path, json_path = _part(self.staging, u)
            with open(json_path) as f:
                records = json.load(f)["records"]
            with open(bin_path, "rb") as data:
                for i, (key, caption, offset, length) in enumerate(records):
                    if (u, i) in self.drop or split_of(key, self.opts.test_fraction) != split:
                        continue
                    data.seek(offset)
                    if self.bar is not None:
                        self.bar.update(1)
                    yield f"{u:06d}-{i:09d}", {"image": data.read(length), "caption": caption,
                                              "key": key}
