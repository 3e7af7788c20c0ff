"""The command line of the pretrained encoders (models/pretrained): encode prompts or images
with a local publisher directory, or write a tiny random T5 or CLIP in the publisher's layout.

    python -m t2i_jax.models.pretrained encode DIR --text "..." [--text ...] --out F.npz
    python -m t2i_jax.models.pretrained encode CLIP_DIR --image a.png [--image ...] --out F.npz
    python -m t2i_jax.models.pretrained make-tiny DIR [--kind t5|clip] [--size tiny|base]
"""

from __future__ import annotations

import os
import sys

import numpy as np

from t2i_jax import files
from t2i_jax.conditioning import tokenizers
from t2i_jax.errors import ArgumentParser, Boundary, UsageError
from t2i_jax.models import pretrained, tiny_pretrained
from t2i_jax.models.pretrained import KINDS, load, load_image_encoder


def _read_images(paths) -> np.ndarray:
    from t2i_jax import user_images
    out = [user_images.read(p, 3, "--image").pixels for p in paths]
    if len({a.shape for a in out}) > 1:
        raise ValueError(f"the --image files have different sizes {sorted({a.shape for a in out})}; "
                         "encode images of one size per call.")
    return np.stack(out)


def out_path(out: str) -> str:
    """The .npz --out names (numpy adds the suffix to a name without it), refused when it is a
    directory or its parent is a file: checked before any model is read."""
    path = os.path.abspath(out if out.endswith(".npz") else out + ".npz")
    if os.path.isdir(out) or os.path.isdir(path):
        raise UsageError(f"--out {out} is a directory; pass a file name such as "
                         f"{os.path.join(out, 'features.npz')}.")
    try:
        files.check_writable_dir(os.path.dirname(path), "--out's directory")
    except ValueError as e:
        raise UsageError(str(e)) from None
    return path


def check_texts(texts) -> None:
    for i, t in enumerate(texts):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"--text number {i + 1} is not valid UTF-8 (the shell passed bytes "
                             "in another encoding); pass the prompt as UTF-8 text.") from None


def _finite(arrays: dict, directory: str, params) -> None:
    """Refuses non-finite features, naming the weights that hold a NaN or Inf (or the input)."""
    bad = [k for k, v in arrays.items() if np.issubdtype(np.asarray(v).dtype, np.floating)
           and not np.isfinite(v).all()]
    if not bad:
        return
    import jax
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    where = [jax.tree_util.keystr(path) for path, leaf in flat
             if not np.isfinite(np.asarray(leaf, np.float32)).all()]
    cause = (f"its weights hold NaN or Inf ({len(where)} tensor(s), e.g. {where[0]})" if where
             else "the weights are finite, so the values overflowed")
    raise ValueError(f"the features {bad} of {directory} are not finite: {cause}. Nothing was "
                     "written; copy the weights again from the publisher.")


def _encode_main(args) -> None:
    if not args.text and not args.image:
        raise UsageError("give --text PROMPT (repeatable) and/or --image FILE (a CLIP directory).")
    if args.max_length is not None and args.max_length < 1:
        raise UsageError(f"--max_length must be at least 1, got {args.max_length}.")
    check_texts(args.text)
    if not os.path.isdir(args.directory):
        raise UsageError(f"{args.directory} is not a directory: point it at a local copy of the "
                         "model in its publisher's layout (config.json, *.safetensors, tokenizer).")
    out = out_path(args.out)  # refused before the model is read
    arrays, said = {}, []
    if args.image:
        images = _read_images(args.image)
    if args.text:
        enc = load(args.directory, max_length=args.max_length)
        feats, toks = enc.encode(args.text, warn=False)
        if toks.truncated.any():
            unit = "T5 tokens" if enc.kind == "t5" else "CLIP tokens"
            print("[t2i_jax] " + tokenizers.truncation_line(
                args.text, toks.truncated, enc.tokenizer.max_length, unit,
                f"raise --max_length (now {enc.tokenizer.max_length}) to keep them whole"),
                file=sys.stderr)
        arrays.update(tokens=feats.tokens, mask=feats.mask, pooled=feats.pooled,
                      ids=toks.ids, truncated=toks.truncated, text=np.asarray(args.text))
        _finite(arrays, args.directory, enc.params)
        said.append(f"{enc.kind} text encoder: {len(args.text)} prompt(s) -> tokens "
                    f"{feats.tokens.shape}, mask {feats.mask.shape}, pooled {feats.pooled.shape}")
    if args.image:
        vis = load_image_encoder(args.directory)
        feats = vis.encode(images)
        got = dict(image_embeds=feats.image_embeds, image_pooled=feats.pooled,
                   image_tokens=feats.last_hidden_state)
        _finite(got, args.directory, vis.params)
        arrays.update(got)
        said.append(f"CLIP image tower: {len(images)} image(s) -> image_embeds "
                    f"{feats.image_embeds.shape}, image_tokens {feats.last_hidden_state.shape}")
    with files.atomic_open(out, "wb") as f:
        np.savez(f, **arrays)
    print(f"[t2i_jax] {args.directory}: " + "; ".join(said) + f": {out}")


def _make_tiny_main(args) -> None:
    try:
        files.check_writable_dir(args.directory, "make-tiny's DIRECTORY")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if os.path.exists(os.path.join(args.directory, "config.json")) and not args.overwrite:
        raise UsageError(f"{args.directory} already holds a model (config.json); pass "
                         "--overwrite to replace it, or choose another directory.")
    overrides = {}
    if args.size == "base":
        if args.kind != "t5":
            raise UsageError("--size base is available for --kind t5 only.")
        overrides = tiny_pretrained.T5_BASE_SHAPES
    write = tiny_pretrained.WRITERS[args.kind]
    write(args.directory, seed=args.seed, shards=args.shards, **overrides)
    print(f"[t2i_jax] wrote a {args.size} random {args.kind} in the publisher's layout to "
          f"{args.directory}: {sorted(os.listdir(args.directory))}")


PROG = "python -m t2i_jax.models.pretrained"


def run(argv=None) -> int:
    """The command, under the error boundary every command has (errors.Boundary): one line
    per fault; returns the exit code (2: the command line cannot run, 1: the run failed)."""
    return Boundary(PROG).run(_main, argv)


def main(argv=None) -> None:
    Boundary(PROG).exit(_main, argv)


def _main(argv=None) -> None:
    parser = ArgumentParser(prog=PROG, description=pretrained.__doc__.split("\n\n")[0])
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
    (_encode_main if args.command == "encode" else _make_tiny_main)(args)
