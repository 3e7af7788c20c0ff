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

import os
import sys
import zipfile
from typing import Callable

import numpy as np

from t2i_jax.errors import ArgumentParser
from t2i_jax.evaluation.frechet import Stats, feature_stats, frechet_distance, frechet_distance_of


def load_set(path: str, guidance=None):
    """uint8 images [N, H, W, C] or Stats, from a sampling job dir or an .npz. A job dir with
    several guidance weights needs `guidance` (the w whose images to take)."""
    if os.path.isdir(path):
        from t2i_jax.sampling.outdir import load_images
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


def check_set(item, name: str):
    """item (uint8 images or Stats) if it can be scored; ValueError naming the set otherwise."""
    if isinstance(item, Stats):
        mu, sigma = np.asarray(item.mu), np.asarray(item.sigma)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{name}: mu must be [D] and sigma [D, D], got {mu.shape} and "
                             f"{sigma.shape}.")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"{name}: its statistics contain NaN or infinity; recompute them "
                             "from finite images (--save_stats).")
        return item
    x = np.asarray(item)
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(f"{name}: images must be uint8 [N, H, W, C], got {x.dtype} {x.shape}.")
    if len(x) < 2:
        raise ValueError(f"{name} holds {len(x)} image(s); a Fréchet distance needs at least 2 "
                         "per set (a covariance), and is only meaningful with thousands.")
    return x


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m t2i_jax.evaluation.fid",
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
    if a.batch_size < 1:
        p.error(f"--batch_size must be >= 1, got {a.batch_size}.")
    if a.guidance is not None and not np.isfinite(a.guidance):
        p.error(f"--guidance must be a finite number, got {a.guidance}.")
    from t2i_jax.errors import Boundary
    return Boundary("fid").run(_fid, a)


def _fid(a) -> int:
    if a.save_stats:  # refused before the work, not after it
        from t2i_jax import files
        if os.path.isdir(a.save_stats):
            raise ValueError(f"--save_stats {a.save_stats} is a directory; pass a file name "
                             "such as stats.npz.")
        files.check_writable_dir(os.path.dirname(os.path.abspath(a.save_stats)), "--save_stats's directory")
    sets = [check_set(load_set(path, a.guidance), f"set {name} ({path})")
            for name, path in (("A", a.set_a), ("B", a.set_b))]
    feature_fn = None
    if not all(isinstance(x, Stats) for x in sets):
        from t2i_jax.evaluation import inception
        feature_fn = inception.make_feature_fn(inception.load_params(a.inception))
    sa, sb = (features_or_stats(feature_fn, x, a.batch_size) for x in sets)
    dims = [x.mu.shape[0] if isinstance(x, Stats) else x.shape[1] for x in (sa, sb)]
    if dims[0] != dims[1]:
        raise ValueError(f"set A's features are {dims[0]}-d and set B's are {dims[1]}-d: compute "
                         "both with the same network (the FID InceptionV3's pool features are "
                         "2048-d).")
    if a.save_stats:
        from t2i_jax import files, images
        st = sa if isinstance(sa, Stats) else feature_stats(sa)
        with files.atomic_open(a.save_stats, "wb") as f:  # with how its images became uint8
            np.savez(f, mu=st.mu, sigma=st.sigma, uint8_conversion=images.UINT8_CONVERSION)
    d = distance(sa, sb)
    if not np.isfinite(d):
        raise ValueError(f"the distance is {d}: the features of a set are not finite (damaged "
                         "images or weights); nothing to report.")
    print(f"FID {d:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
