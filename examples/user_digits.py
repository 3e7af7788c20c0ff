"""The default digits recipe on a user's data: scikit-learn's digits written as a user would bring
them (not through the project's builder), then trained with configs/digits.py and read back.

    python examples/user_digits.py write --out data/user_digits
    python train.py --config configs/digits.py --workdir runs/user_digits \\
        --config.data.name=webdataset --config.data.path='data/user_digits/webdataset/part-{00000..00003}.tar'
    python examples/user_digits.py evaluate --workdir runs/user_digits --out runs/user_digits/eval

`write` makes both layouts of the same 1797 records plus a few bad ones:
  webdataset/part-0000{0..3}.tar   KEY.jpg (JPEG q 92) beside KEY.txt (or KEY.json {"caption"})
  imagefolder/                     KEY.png files and metadata.jsonl {"file_name", "text"}
Each scan (8x8, 17 levels, white ink on black) becomes a 24x24 RGB image (bicubic), with a
caption in phrasings the project's builder never uses ("a picture of the number seven", "7,
written by hand", "the numeral seven in ink"). Bad records, mixed in: a truncated JPEG, an empty
caption, a 6x6 image (below the 16-pixel training size), an image with no caption file, and a
caption with no image; the preparation skips and counts them.

`evaluate` samples `--n` images per digit at w = 3 (DDIM 50) with the prompt "a picture of the
number {word}" (a phrasing of the training captions) and reads them with the project's digits
evaluator (trained on the embedded digits' training split): the fraction read as the asked digit.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PHRASINGS = ("a picture of the number {w}", "{d}, written by hand", "the numeral {w} in ink")
SHARDS = 4
SIZE = 24


def caption(label: int, i: int) -> str:
    return PHRASINGS[i % len(PHRASINGS)].format(w=WORDS[label], d=label)


def prompt(label: int) -> str:
    return PHRASINGS[0].format(w=WORDS[label], d=label)


def records():
    """(key, RGB uint8 [24, 24, 3], caption) of every scikit-learn digit."""
    from PIL import Image
    from sklearn.datasets import load_digits
    d = load_digits()
    for i, (scan, label) in enumerate(zip(d.images, d.target)):
        grey = Image.fromarray(np.rint(scan * 255 / 16).astype(np.uint8))
        rgb = np.asarray(grey.resize((SIZE, SIZE), Image.BICUBIC).convert("RGB"))
        yield f"digit{i:05d}", rgb, caption(int(label), i)


def _encode(rgb, fmt: str, **kw) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write(out: str) -> None:
    wds, folder = os.path.join(out, "webdataset"), os.path.join(out, "imagefolder")
    os.makedirs(wds, exist_ok=True)
    os.makedirs(folder, exist_ok=True)
    rows = list(records())
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    bad = [("bad_truncated", _encode(noise, "JPEG", quality=92)[:200], "a truncated file"),
           ("bad_empty_caption", _encode(noise, "JPEG", quality=92), ""),
           ("bad_too_small", _encode(noise[:6, :6], "JPEG", quality=92), "a tiny image")]
    tars = [tarfile.open(os.path.join(wds, f"part-{s:05d}.tar"), "w") for s in range(SHARDS)]
    meta = []
    for i, (key, rgb, text) in enumerate(rows):
        tar = tars[i % SHARDS]
        _add(tar, f"{key}.jpg", _encode(rgb, "JPEG", quality=92))
        if i % 2:
            _add(tar, f"{key}.txt", text.encode())
        else:
            _add(tar, f"{key}.json", json.dumps({"caption": text}).encode())
        with open(os.path.join(folder, f"{key}.png"), "wb") as f:
            f.write(_encode(rgb, "PNG"))
        meta.append({"file_name": f"{key}.png", "text": text})
    for j, (key, data, text) in enumerate(bad):
        _add(tars[j], f"{key}.jpg", data)
        _add(tars[j], f"{key}.txt", text.encode())
        name = f"{key}.png" if key != "bad_truncated" else f"{key}.jpg"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        meta.append({"file_name": name, "text": text})
    _add(tars[3], "bad_no_caption.jpg", _encode(noise, "JPEG", quality=92))   # image alone
    _add(tars[3], "bad_no_image.txt", b"a caption without its image")          # caption alone
    with open(os.path.join(folder, "bad_no_caption.png"), "wb") as f:
        f.write(_encode(noise, "PNG"))
    for t in tars:
        t.close()
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for m in meta:
            f.write(json.dumps(m) + "\n")
    print(f"wrote {len(rows)} records and 5 bad ones to {wds} ({SHARDS} shards) and {folder}")


def evaluate(workdir: str, out: str, n: int, steps: int, seed: int) -> dict:
    import dataclasses
    import ml_collections
    from t2i_jax.evaluation import evaluator as ev_lib
    from t2i_jax.evaluation.reproduce import common
    from t2i_jax.sampling.load import load_trained
    trained = load_trained(workdir)
    cfg = trained.config
    digits_cfg = ml_collections.ConfigDict(dict(
        name="digits", image_size=cfg.data.image_size, channels=cfg.data.channels,
        data_dir=cfg.data.get("data_dir", None), random_flip=False, caption="random"))
    ev = ev_lib.load_or_train(digits_cfg, os.path.join(out, "evaluator"))
    options = dataclasses.replace(common.config_options(cfg, steps), sampler="ddim", eta=0.0)
    prompts = [prompt(d) for d in range(10)]
    x, rows, stats = common.sample_job(trained, os.path.join(out, "samples"), prompts,
                                       num_per_prompt=n, guidance=[3.0], seed=seed,
                                       options=options, batch_size=100, progress=False)
    asked = np.asarray([prompts.index(r["prompt"]) for r in rows])
    read = ev.predict(x)
    per_digit = [float(np.mean(read[asked == d] == d)) for d in range(10)]
    result = dict(workdir=os.path.abspath(workdir), checkpoint_step=trained.step, n_per_digit=n,
                  guidance=3.0, sampler="ddim", steps=steps, seed=seed,
                  evaluator_accuracy=ev.accuracy, accuracy=float(np.mean(read == asked)),
                  per_digit=per_digit, prompts=prompts)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "prompts"}))
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("--out", required=True)
    e = sub.add_parser("evaluate")
    e.add_argument("--workdir", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--n", type=int, default=50)
    e.add_argument("--steps", type=int, default=50)
    e.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.command == "write":
        write(a.out)
    else:
        evaluate(a.workdir, a.out, a.n, a.steps, a.seed)


if __name__ == "__main__":
    main()
