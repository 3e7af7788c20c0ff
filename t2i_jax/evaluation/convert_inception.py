"""Converts pytorch-fid's FID Inception weights to the .npz that t2i_jax.evaluation.inception loads.

    python -m t2i_jax.evaluation.convert_inception pt_inception-2015-12-05-6726825d.pth inception_fid.npz

The input is pytorch-fid's release file (inception.FID_WEIGHTS_URL; download it wherever there is
internet). Only this conversion needs torch; the .npz it writes is plain NumPy, so computing FID
needs neither torch nor internet (see the inception module's docstring).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import Optional, Sequence

import jax
import numpy as np

from t2i_jax.evaluation import inception


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_torch_state_dict(path: str) -> dict:
    try:
        import torch
    except ImportError as e:
        raise SystemExit("pip install torch to convert; the converted .npz needs no torch") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:  # torch < 1.13 has no weights_only
        state = torch.load(path, map_location="cpu")
    if not hasattr(state, "items"):
        raise SystemExit(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
            for k, v in state.items()}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m t2i_jax.evaluation.convert_inception",
        description="pytorch-fid's pt_inception-2015-12-05-6726825d.pth -> a plain NumPy .npz of "
                    "Flax InceptionV3 params (BatchNorm folded into the convolutions).")
    parser.add_argument("input", help="the .pth file (from inception.FID_WEIGHTS_URL)")
    parser.add_argument("output", help="the .npz to write (atomically)")
    args = parser.parse_args(argv)

    state_dict = _load_torch_state_dict(args.input)
    digest = _sha256(args.input)
    if not digest.startswith(inception.FID_WEIGHTS_SHA256_PREFIX):
        print(f"warning: {args.input} has SHA-256 {digest[:16]}..., not the release file's "
              f"{inception.FID_WEIGHTS_SHA256_PREFIX}...; converting it anyway.", file=sys.stderr)
    params = inception.convert_state_dict(state_dict)
    inception.check_params(params)  # the same variables and shapes as InceptionV3().init
    inception.save_params(args.output, params)
    count = sum(int(np.size(v)) for v in jax.tree.leaves(params))
    print(f"wrote {os.path.abspath(args.output)}: {count:,} parameters "
          f"(from {len(state_dict)} tensors in {args.input})")


if __name__ == "__main__":
    main()
