"""Tiny user data sources written with Pillow for the tests: an imagefolder (images +
metadata.jsonl/csv) and webdataset shards of the same records."""

import csv
import io
import json
import os
import tarfile

import numpy as np


def pixels(seed: int, h: int = 20, w: int = 24) -> np.ndarray:
    """uint8 [h, w, 3]: a smooth gradient plus noise, different for every seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, np.full((h, w), rng.integers(0, 255))], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "png", **save) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **save)
    return buf.getvalue()


def records(n: int, seed: int = 0, h: int = 20, w: int = 24) -> list:
    """[(key, png bytes, caption)], keys "img000", "img001", ... (every third in sub/)."""
    out = []
    for i in range(n):
        key = f"sub/img{i:03d}" if i % 3 == 2 else f"img{i:03d}"
        out.append((key, encode(pixels(seed * 1000 + i, h + i % 3, w)), f"a picture number {i}"))
    return out


def write_imagefolder(root, recs, *, meta: str = "jsonl", caption_key: str = "text",
                      ext: str = "png") -> str:
    """Writes recs [(key, image bytes or None, caption or None)] as root/KEY.ext + one metadata
    file (rows for captions that are not None); returns root."""
    root = str(root)
    rows = []
    for key, data, caption in recs:
        name = f"{key}.{ext}"
        if data is not None:
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            with open(os.path.join(root, name), "wb") as f:
                f.write(data)
        if caption is not None:
            rows.append({"file_name": name, caption_key: caption})
    os.makedirs(root, exist_ok=True)
    if meta == "jsonl":
        with open(os.path.join(root, "metadata.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif meta == "csv":
        with open(os.path.join(root, "metadata.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file_name", caption_key])
            w.writeheader()
            w.writerows(rows)
    return root


def write_webdataset(folder, recs, *, shards: int = 1, caption: str = "txt",
                     caption_key: str = "caption", ext: str = "png") -> str:
    """Writes recs [(key, image bytes or None, caption or None)] into `shards` tar files
    folder/part-00000.tar, ... (round robin); caption "txt" (KEY.txt) or "json" (KEY.json with
    caption_key); returns the brace pattern naming them."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    tars = [tarfile.open(os.path.join(folder, f"part-{s:05d}.tar"), "w") for s in range(shards)]
    for i, (key, data, cap) in enumerate(recs):
        members = []
        if data is not None:
            members.append((f"{key}.{ext}", data))
        if cap is not None:
            members.append((f"{key}.txt", cap.encode()) if caption == "txt" else
                           (f"{key}.json", json.dumps({caption_key: cap, "url": "x"}).encode()))
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tars[i % shards].addfile(info, io.BytesIO(payload))
    for t in tars:
        t.close()
    return os.path.join(folder, "part-{%05d..%05d}.tar" % (0, shards - 1))
