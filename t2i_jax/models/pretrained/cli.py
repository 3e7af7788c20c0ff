"""The command line of the pretrained encoders (models/pretrained): encode prompts or images
with a local publisher directory, or write a tiny random T5 or CLIP in the publisher's layout.

    python -m t2i_jax.models.pretrained encode DIR --text "..." [--text ...] --out F.npz
    python -m t2i_jax.models.pretrained encode CLIP_DIR --image a.png [--image ...] --out F.npz
    python -m t2i_jax.models.pretrained make-tiny DIR [--kind t5|clip] [--size tiny|base]
"""

from __future__ import annotations

import os

import numpy as np

from t2i_jax.models import pretrained, tiny_pretrained
from t2i_jax.models.pretrained import KINDS, load, load_image_encoder


def _read_images(paths) -> np.ndarray:
    from PIL import Image
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(np.asarray(im.convert("RGB"), np.float32) / 127.5 - 1.0)
        except (OSError, ValueError) as e:
            raise ValueError(f"--image {p} is not a readable image ({e}).") from e
    if len({a.shape for a in out}) > 1:
        raise ValueError(f"the --image files have different sizes {sorted({a.shape for a in out})}; "
                         "encode images of one size per call.")
    return np.stack(out)


def _encode_main(args) -> None:
    if not args.text and not args.image:
        raise ValueError("give --text PROMPT (repeatable) and/or --image FILE (a CLIP directory).")
    arrays, said = {}, []
    if args.image:
        images = _read_images(args.image)  # refused before the model is read
    if args.text:
        enc = load(args.directory, max_length=args.max_length)
        feats, toks = enc.encode(args.text)
        arrays.update(tokens=feats.tokens, mask=feats.mask, pooled=feats.pooled,
                      ids=toks.ids, truncated=toks.truncated, text=np.asarray(args.text))
        said.append(f"{enc.kind} text encoder: {len(args.text)} prompt(s) -> tokens "
                    f"{feats.tokens.shape}, mask {feats.mask.shape}, pooled {feats.pooled.shape}")
    if args.image:
        vis = load_image_encoder(args.directory)
        out = vis.encode(images)
        arrays.update(image_embeds=out.image_embeds, image_pooled=out.pooled,
                      image_tokens=out.last_hidden_state)
        said.append(f"CLIP image tower: {len(images)} image(s) -> image_embeds "
                    f"{out.image_embeds.shape}, image_tokens {out.last_hidden_state.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    np.savez(args.out, **arrays)
    print(f"[t2i_jax] {args.directory}: " + "; ".join(said) + f": {args.out}")


def _make_tiny_main(args) -> None:
    if os.path.exists(os.path.join(args.directory, "config.json")) and not args.overwrite:
        raise SystemExit(f"error: {args.directory} already holds a model (config.json); pass "
                         "--overwrite to replace it, or choose another directory.")
    overrides = {}
    if args.size == "base":
        if args.kind != "t5":
            raise ValueError("--size base is available for --kind t5 only.")
        overrides = tiny_pretrained.T5_BASE_SHAPES
    write = tiny_pretrained.WRITERS[args.kind]
    write(args.directory, seed=args.seed, shards=args.shards, **overrides)
    print(f"[t2i_jax] wrote a {args.size} random {args.kind} in the publisher's layout to "
          f"{args.directory}: {sorted(os.listdir(args.directory))}")


def main(argv=None) -> None:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m t2i_jax.models.pretrained",
                                     description=pretrained.__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("encode", help="encode prompts (T5, CLIP) or images (CLIP) into an .npz")
    p.add_argument("directory", help="the model's directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--text", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--image", action="append", default=[],
                   help="an image file for CLIP's image tower (repeatable)")
    p.add_argument("--out", required=True, help="the .npz to write: tokens [B, L, D], mask, "
                   "pooled (text); image_embeds [B, P], image_pooled, image_tokens (images)")
    p.add_argument("--max_length", type=int, default=None, help="tokens per prompt")
    p = sub.add_parser("make-tiny", help="write a tiny random T5 or CLIP in the publisher's layout")
    p.add_argument("directory")
    p.add_argument("--kind", choices=KINDS, default="t5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1, help="weight files (>1: with an index)")
    p.add_argument("--size", choices=("tiny", "base"), default="tiny",
                   help="base: t5-v1_1-base's layer sizes (random, tiny vocabulary), for timing")
    p.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        (_encode_main if args.command == "encode" else _make_tiny_main)(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
