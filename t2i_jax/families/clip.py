"""The frozen CLIP of unCLIP (Ramesh et al. 2022): the embedding space its prior and decoder
share, loaded from a trained contrastive workdir (families/contrastive.py) named by
`config.model.clip`, as latent diffusion names its autoencoder (families/frozen.py).

The embeddings are that CLIP's CLEAN towers: the image tower at t = 0 on the clean image, the
text tower on the caption, both L2-normalised [E]. They are computed inside the jitted step from
the frozen parameters (passed through hparams), under stop_gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t2i_jax.families.frozen import Frozen, check_recorded, check_same_data, load_frozen, resolve
from t2i_jax.models.classifier import TwoTowerSimilarity

FLAG = "config.model.clip"


def load_clip(config) -> Frozen:
    """The CLIP of config.model.clip (or the one a stored model recorded), checked to be of the
    same data and image size, and to be the CLIP a stored model was trained with."""
    path, step = resolve(config, "clip", FLAG)
    frozen = load_frozen(path, "contrastive", flag=FLAG, step=step)
    check_same_data(config, frozen, FLAG, "CLIP",
                    "Point config.model.clip at a CLIP of this model's data set and image size "
                    "(e.g. configs/digits_clip.py's).")
    check_recorded(config, "clip", frozen,
                   "its embedding space is another one, which this model never saw")
    return frozen


def embed_dim(frozen: Frozen) -> int:
    return int(frozen.family.model.cfg.embed_dim)


def image_embedding(frozen: Frozen, params, x: jax.Array) -> jax.Array:
    """The clean image embedding [B, E] (unit norm) of images x [B, H, W, C] in [-1, 1]."""
    t = jnp.zeros((x.shape[0],), jnp.int32)
    z = frozen.family.model.apply(params, x, t, method=TwoTowerSimilarity.embed_image)
    return jax.lax.stop_gradient(z)


def text_encoding(frozen: Frozen, params, ids, mask):
    """(token features [B, L, D], mask [B, L], text embedding [B, E] of unit norm) of a caption."""
    feats, z = frozen.family.model.apply(params, ids, mask, method=TwoTowerSimilarity.encode_text)
    return (jax.lax.stop_gradient(feats.tokens), feats.mask, jax.lax.stop_gradient(z))

