"""Preparing your own images (t2i_jax/data/user_data.py): records/s with 1 and more workers.

    python bench/prepare_bench.py [--records 2000] [--source_size 256] [--image_size 64] \\
        [--shards 8] [--workers 1 2] [--kind webdataset imagefolder]

Writes N synthetic JPEG records (smooth colour fields with noise, source_size^2, quality 90,
captioned) once as webdataset shards and as an imagefolder, then prepares each into a fresh
data_dir with each worker count: decode (with JPEG draft), LANCZOS resize and centre crop to
image_size, PNG encode into staging parts, then TFDS's array_record write. Times are wall clock
for user_data.prepare (TFDS imported beforehand), pool start-up included. Prints a markdown table; the last line is it as
JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def synthetic(i: int, size: int):
    import numpy as np
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c = rng.uniform(0, 255, (3, 3)).astype(np.float32)
    img = c[0] * x[..., None] + c[1] * y[..., None] + c[2] * (1 - x * y)[..., None]
    noise = rng.integers(-20, 21, img.shape, dtype=np.int16)
    return np.clip(img / 2 + noise, 0, 255).astype(np.uint8)


def write_sources(root: str, n: int, size: int, shards: int) -> dict:
    import tarfile
    from PIL import Image
    folder, wds = os.path.join(root, "imagefolder"), os.path.join(root, "webdataset")
    os.makedirs(folder)
    os.makedirs(wds)
    tars = [tarfile.open(os.path.join(wds, f"part-{s:05d}.tar"), "w") for s in range(shards)]
    with open(os.path.join(folder, "metadata.jsonl"), "w") as meta:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(synthetic(i, size)).save(buf, format="jpeg", quality=90)
            data, caption = buf.getvalue(), f"synthetic colour field number {i}"
            with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
                f.write(data)
            meta.write(json.dumps({"file_name": f"{i:06d}.jpg", "text": caption}) + "\n")
            for name, payload in ((f"{i:06d}.jpg", data), (f"{i:06d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tars[i % shards].addfile(info, io.BytesIO(payload))
    for t in tars:
        t.close()
    return {"imagefolder": folder, "webdataset": os.path.join(wds, "part-{00000..%05d}.tar"
                                                             % (shards - 1))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--source_size", type=int, default=256)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--kind", nargs="+", default=["webdataset", "imagefolder"])
    a = p.parse_args()

    import ml_collections
    import tensorflow_datasets  # noqa: F401  (imported before the first timing, not in it)
    from t2i_jax.data import user_data
    root = tempfile.mkdtemp(prefix="t2i_prepare_bench_")
    try:
        t0 = time.time()
        paths = write_sources(root, a.records, a.source_size, a.shards)
        print(f"wrote {a.records} JPEGs of {a.source_size}x{a.source_size} in "
              f"{time.time() - t0:.1f} s", flush=True)
        rows = []
        for kind in a.kind:
            for workers in a.workers:
                d = os.path.join(root, f"tfds_{kind}_{workers}")
                cfg = ml_collections.ConfigDict(dict(
                    name=kind, path=paths[kind], image_size=a.image_size, channels=3, data_dir=d))
                t = time.time()
                prep = user_data.prepare(cfg, workers=workers, progress=False)
                sec = time.time() - t
                s = prep.summary
                rows.append(dict(kind=kind, workers=workers, records=s["records"], seconds=sec,
                                 records_per_s=s["records"] / sec,
                                 mb_read_per_s=s["bytes_read"] / 1e6 / sec,
                                 decode_seconds=s["staged"]["seconds"],
                                 write_seconds=s["write_seconds"],
                                 mb_read=s["bytes_read"] / 1e6,
                                 mb_written=s["bytes_written"] / 1e6))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{a.records} records, {a.source_size}^2 JPEG -> {a.image_size}^2 PNG; "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}\n")
    print("| source | workers | records/s | MB/s read | decode s | write s | total s | MB read "
          "| MB written |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['workers']} | {r['records_per_s']:.0f} | "
              f"{r['mb_read_per_s']:.1f} | {r['decode_seconds']:.2f} | {r['write_seconds']:.2f} | "
              f"{r['seconds']:.2f} | {r['mb_read']:.1f} | {r['mb_written']:.2f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
