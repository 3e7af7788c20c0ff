"""The latent cache of a fine-tuning run (train.latent_cache): the frozen VAE's posterior moments
(mean, logvar) [h, w, c] of every training record, computed once and read by record index.

The step still draws z = mean + exp(logvar / 2) eps from them with its own key, so a cached run
trains on the same distribution of latents as one that encodes in the step (not on one fixed
sample per image, which some scripts cache). The images are processed like training data, without
flips (data.random_flip is refused with the cache). The cache is keyed by the VAE's content hash
and every data setting that changes the images (data set, path, size, channels, resize, record
count, a user source's content hash), and written whole or not at all (a temporary directory renamed into place), so a killed
build is never mistaken for a cache and another VAE or image size never reads a stale one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from typing import Optional

import numpy as np

CACHE_VERSION = 1
BATCH = 16   # images encoded per call (one program: the last batch is padded)


def cache_path(family, data_config, cache_dir: Optional[str] = None) -> str:
    from t2i_jax import data as data_lib
    from t2i_jax.models import weights
    s = data_lib.settings(data_config)
    fields = {k: v for k, v in dataclasses.asdict(s).items()
              if k not in ("num_threads", "prefetch", "random_flip", "caption", "data_dir")}
    key = hashlib.sha256(json.dumps(dict(
        v=CACHE_VERSION, vae=weights.content_sha256(os.path.join(family.folder.directory, "vae")),
        data=fields, data_dir=data_lib.default_data_dir(s.data_dir),
        examples=data_lib.split_size(data_config), **data_lib.data_identity(data_config)),
        sort_keys=True, default=str).encode()).hexdigest()
    return os.path.join(weights.cache_root(cache_dir), "latents", f"{s.name}-{key[:16]}")


def open_latent_cache(family, data_config, cache_dir: Optional[str] = None) -> "LatentCache":
    """The cache of data_config's training split under family's VAE (built now if absent)."""
    path = cache_path(family, data_config, cache_dir)
    if not os.path.isfile(os.path.join(path, "meta.json")):
        _build(family, data_config, path)
    return LatentCache.open(path)


def _build(family, data_config, path: str) -> None:
    import jax
    from t2i_jax import data as data_lib
    n = data_lib.split_size(data_config)
    h, w, c = family.image_shape
    print(f"[t2i_jax] encoding the {n} training images of {data_config.name} with the frozen VAE "
          f"into {path} ({2 * n * h * w * c * 4 / 2 ** 30:.2f} GiB), once.", file=sys.stderr)
    tmp = f"{path}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    mean = np.lib.format.open_memmap(os.path.join(tmp, "mean.npy"), "w+", np.float32, (n, h, w, c))
    logvar = np.lib.format.open_memmap(os.path.join(tmp, "logvar.npy"), "w+", np.float32,
                                       (n, h, w, c))
    encode = jax.jit(family.posterior_moments)
    vae = family.folder.vae[1]
    for idx, images in data_lib.iter_images(data_config, batch_size=BATCH):
        pad = BATCH - len(idx)
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
        m, lv = jax.device_get(encode(vae, images))
        mean[idx], logvar[idx] = m[:len(idx)], lv[:len(idx)]
    mean.flush()
    logvar.flush()
    del mean, logvar
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(dict(version=CACHE_VERSION, examples=n, shape=[h, w, c],
                       vae=family.folder.directory), f)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)


class LatentCache:
    """Record index -> {latent_mean, latent_logvar} [h, w, c] (memory-mapped)."""

    def __init__(self, path: str, mean, logvar):
        self.path, self.mean, self.logvar = path, mean, logvar

    @classmethod
    def open(cls, path: str) -> "LatentCache":
        load = lambda name: np.load(os.path.join(path, name), mmap_mode="r")  # noqa: E731
        return cls(path, load("mean.npy"), load("logvar.npy"))

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    @property
    def bytes_per_example(self) -> int:
        return int(self.mean[0].nbytes + self.logvar[0].nbytes)

    def lookup(self, index: int) -> dict:
        return {"latent_mean": np.asarray(self.mean[index]),
                "latent_logvar": np.asarray(self.logvar[index])}
