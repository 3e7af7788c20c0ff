"""FID between two image sets with the FID InceptionV3 (weights from a local file).

    python -m t2i_jax.evaluation.fid --inception inception_fid.npz OUT/samples.npz ref.npz
    python -m t2i_jax.evaluation.fid --inception inception_fid.npz OUT ref_stats.npz

Each set is one of: a finished sampling job directory (sample.py's OUTDIR; with several w,
--guidance W picks one), an .npz of uint8
images in arr_0 (ADM's reference batches, sample.py --npz), or an .npz of precomputed
statistics with `mu` and `sigma` (as ADM's reference batches and pytorch-fid's --save-stats
carry). Getting the weights offline: see t2i_jax/evaluation/inception.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from typing import Callable

import numpy as np

from t2i_jax.evaluation.frechet import Stats, feature_stats, frechet_distance, frechet_distance_of


def load_set(path: str, guidance=None):
    """uint8 images [N, H, W, C] or Stats, from a sampling job dir or an .npz. A job dir with
    several guidance weights needs `guidance` (the w whose images to take)."""
    if os.path.isdir(path):
        from t2i_jax.sampling.job import load_images
        rows = None
        job_file = os.path.join(path, "samples.jsonl")
        if os.path.exists(job_file):
            from t2i_jax import files
            rows = files.read_jsonl(job_file)
            weights = sorted({r["guidance"] for r in rows})
            if guidance is None and len(weights) > 1:
                raise ValueError(f"{path} holds images of several guidance weights {weights}; "
                                 "pass --guidance W to score one of them.")
            if guidance is not None:
                rows = [r for r in rows if r["guidance"] == guidance]
                if not rows:
                    raise ValueError(f"{path} has no images with guidance {guidance}; it has "
                                     f"{weights}.")
        return load_images(path, rows)[0]
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable .npz ({type(e).__name__}: {e}).") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a .npy array; pass an .npz with arr_0 (uint8 images) or "
                         "mu and sigma.")
    with z:
        if "mu" in z.files and "sigma" in z.files:
            return Stats(z["mu"], z["sigma"], -1)
        if "arr_0" in z.files:
            return z["arr_0"]
        raise ValueError(f"{path} has neither arr_0 (images) nor mu/sigma (statistics); it has "
                         f"{z.files}.")


def image_features(feature_fn: Callable, images_uint8: np.ndarray, batch: int = 50) -> np.ndarray:
    """feature_fn over [-1, 1] float batches of uint8 images -> [N, D] float64."""
    x = np.asarray(images_uint8)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {x.dtype} {x.shape}.")
    out = [np.asarray(feature_fn(x[s:s + batch].astype(np.float32) / 127.5 - 1.0), np.float64)
           for s in range(0, len(x), batch)]
    return np.concatenate(out)


def features_or_stats(feature_fn: Callable, item, batch: int = 50):
    return item if isinstance(item, Stats) else image_features(feature_fn, item, batch)


def distance(a, b) -> float:
    """Fréchet distance of two feature sets [N, D] or Stats (features allow the few-sample path)."""
    if isinstance(a, Stats) or isinstance(b, Stats):
        as_stats = lambda v: v if isinstance(v, Stats) else feature_stats(v)  # noqa: E731
        return frechet_distance(as_stats(a), as_stats(b))
    return frechet_distance_of(a, b)


def fid(feature_fn: Callable, a, b, batch: int = 50) -> float:
    """FID between two sets (images uint8 [N, H, W, C] or Stats)."""
    return distance(features_or_stats(feature_fn, a, batch), features_or_stats(feature_fn, b, batch))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m t2i_jax.evaluation.fid",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--inception", required=True,
                   help="converted FID InceptionV3 weights (.npz; see t2i_jax/evaluation/inception.py)")
    p.add_argument("set_a")
    p.add_argument("set_b")
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--guidance", type=float,
                   help="for a sampling job with several w: score the images of this w")
    p.add_argument("--save_stats", help="also write set_a's mu/sigma to this .npz")
    a = p.parse_args(argv)
    try:
        from t2i_jax.evaluation import inception
        feature_fn = inception.make_feature_fn(inception.load_params(a.inception))
        sa = features_or_stats(feature_fn, load_set(a.set_a, a.guidance), a.batch_size)
        sb = features_or_stats(feature_fn, load_set(a.set_b, a.guidance), a.batch_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"fid: error: {e}", file=sys.stderr)
        return 1
    if a.save_stats:
        from t2i_jax import files
        st = sa if isinstance(sa, Stats) else feature_stats(sa)
        with files.atomic_open(a.save_stats, "wb") as f:
            np.savez(f, mu=st.mu, sigma=st.sigma)
    print(f"FID {distance(sa, sb):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
