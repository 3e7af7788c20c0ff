"""The contrastive family: a CLIP trained here (Radford et al. 2021), whose image tower reads
noisy images (x_t, t) as Semantic Diffusion Guidance fine-tunes CLIP for (Liu et al. 2023).

Per step, each image is noised to its own t ~ U{0..T-1} with q_sample, except a fraction
`train.clean_fraction` of the batch, which is given clean (x_0, t = 0): one model then serves
noisy guidance (SDG's f = cos(E_img(x_t, t), E_text(y))) and clean scoring (CLIP score,
reranking). The loss is CLIP's symmetric InfoNCE with a learned temperature, with one change
for small data sets: examples with the same caption are all positives of each other (their
target mass is split evenly), since with 10 digit captions most batches hold duplicates that
plain InfoNCE would push apart.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from t2i_jax.conditioning import Conditioning
from t2i_jax.diffusion import forward
from t2i_jax.diffusion.schedules import Schedule
from t2i_jax.families.base import Family, image_shape, quarter_means
from t2i_jax.families.diffusion import schedule_of
from t2i_jax.models.classifier import SimilarityConfig, TwoTowerSimilarity
from t2i_jax.models.text import TextConfig
from t2i_jax.models.unet import UNetConfig

_T, _NOISE, _CLEAN, _DROPOUT = 0, 1, 2, 3
MAX_LOGIT_SCALE = 100.0  # CLIP clips exp(log_temperature) at 100


def similarity_config(config) -> SimilarityConfig:
    m = config.model
    image = dict(m.image)
    image.setdefault("out_channels", config.data.channels)
    return SimilarityConfig(image=UNetConfig(**image), text=TextConfig(**dict(m.text)),
                            embed_dim=int(m.embed_dim))


def info_nce(logits: jax.Array, same: jax.Array) -> jax.Array:
    """Returns the per-example symmetric InfoNCE [B] of image-to-text logits [B, B], with the
    targets of row i spread evenly over the columns j whose caption equals i's (same [B, B])."""
    target = same / jnp.sum(same, axis=1, keepdims=True)                      # rows sum to 1
    i2t = -jnp.sum(target * jax.nn.log_softmax(logits, axis=1), axis=1)
    t2i = -jnp.sum(target.T * jax.nn.log_softmax(logits, axis=0), axis=0)  # same is symmetric
    return 0.5 * (i2t + t2i)


@dataclasses.dataclass
class Contrastive(Family):
    model: TwoTowerSimilarity = None
    schedule: Schedule = None
    clean_fraction: float = 0.25

    name = "contrastive"
    guide_flag = "--clip"
    batch_keys = ("image", "tokens", "mask")

    @classmethod
    def from_config(cls, config) -> "Contrastive":
        cfg = similarity_config(config)
        frac = float(config.train.get("clean_fraction", 0.25))
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"train.clean_fraction must be in [0, 1], got {frac}.")
        return cls(config=config, conditioning=Conditioning(
                       "text", max_length=cfg.text.max_length, dataset=config.data.name),
                   image_shape=image_shape(config), model=TwoTowerSimilarity(cfg),
                   schedule=schedule_of(config), clean_fraction=frac)

    def init_params(self, key: jax.Array):
        x = jnp.zeros((1,) + self.image_shape, jnp.float32)
        ids = jnp.zeros((1, self.max_length), jnp.int32)
        return self.model.init({"params": key, "dropout": key}, x, jnp.zeros((1,), jnp.int32),
                               ids, jnp.ones((1, self.max_length), bool))

    def hparams(self) -> dict:
        return dict(clean_fraction=jnp.asarray(self.clean_fraction, jnp.float32))

    def loss(self, params, batch: dict, key: jax.Array, hp: dict):
        x0, ids, mask = batch["image"], batch["tokens"], batch["mask"]
        n, T = x0.shape[0], self.schedule.num_timesteps
        t = jax.random.randint(jax.random.fold_in(key, _T), (n,), 0, T)
        clean = jax.random.bernoulli(jax.random.fold_in(key, _CLEAN), hp["clean_fraction"], (n,))
        t = jnp.where(clean, 0, t)
        noise = jax.random.normal(jax.random.fold_in(key, _NOISE), x0.shape, x0.dtype)
        x_t = jnp.where(clean[:, None, None, None], x0, forward.q_sample(self.schedule, x0, t, noise))
        z_img = self.model.apply(params, x_t, t, False, method=TwoTowerSimilarity.embed_image,
                                 rngs={"dropout": jax.random.fold_in(key, _DROPOUT)})  # [B, E]
        z_txt = self.model.apply(params, ids, mask, method=TwoTowerSimilarity.embed_text)  # [B, E]
        scale = jnp.minimum(jnp.exp(params["params"]["log_temperature"]), MAX_LOGIT_SCALE)
        logits = scale * z_img @ z_txt.T                                              # [B, B]
        same = jnp.all((ids[:, None] == ids[None]) | ~(mask[:, None] & mask[None]), axis=-1) & \
            jnp.all(mask[:, None] == mask[None], axis=-1)                             # [B, B]
        per_example = info_nce(logits, same.astype(jnp.float32))
        # Retrieval accuracy: the text the image is closest to has the image's own caption.
        correct = jnp.take_along_axis(same, jnp.argmax(logits, axis=1)[:, None], 1)[:, 0]
        correct = correct.astype(jnp.float32)
        n_clean = jnp.sum(clean.astype(jnp.float32))
        return per_example, dict(accuracy=jnp.mean(correct), logit_scale=scale,
                                 clean_fraction=n_clean / n,
                                 accuracy_clean=jnp.sum(correct * clean) / n_clean,
                                 # the noised examples only: a clean one (t = 0) is in no quarter
                                 **quarter_means(correct, jnp.where(clean, -1, t), T, "accuracy"))

    def embed_image(self, params, x_t, t):
        """The L2-normalised image embedding [B, E] of x_t at t (t = 0: a clean image)."""
        return self.model.apply(params, x_t, t, method=TwoTowerSimilarity.embed_image)

    def embed_text(self, params, ids, mask):
        return self.model.apply(params, ids, mask, method=TwoTowerSimilarity.embed_text)
