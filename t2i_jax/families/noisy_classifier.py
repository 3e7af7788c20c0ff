"""The noisy-classifier family: ADM's classifier p(y | x_t, t), trained on q_sample draws with
cross-entropy on the data set's labels (Dhariwal & Nichol 2021, sec. 4; guided-diffusion's
classifier_train.py is the diffusion loop with another loss, as here).

The network is the UNet's encoder half with attention pooling (models/classifier.py). Its
diffusion schedule (`config.diffusion`) must be the one of the models it guides: sample.py
checks that before anything runs.

Per step: t ~ U{0..T-1}, noise ~ N(0, I), x_t = q_sample(x0, t, noise), loss = CE(logits, y).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from t2i_jax.diffusion import forward
from t2i_jax.diffusion.schedules import Schedule
from t2i_jax.families.base import Family, image_shape, quarter_means
from t2i_jax.families.diffusion import schedule_of
from t2i_jax.conditioning import Conditioning
from t2i_jax.models.classifier import ClassifierConfig, NoisyClassifier
from t2i_jax.models.unet import UNetConfig

_T, _NOISE, _DROPOUT = 0, 1, 3


def classifier_config(config, names) -> ClassifierConfig:
    """The network of `config.model.encoder` over the data set's classes `names`."""
    if not names:
        raise ValueError(f"a noisy classifier needs class labels; the data set "
                         f"{config.data.name} has none. Use one that has them (digits).")
    enc = dict(config.model.encoder)
    enc.setdefault("out_channels", config.data.channels)
    return ClassifierConfig(encoder=UNetConfig(**enc), num_classes=len(names))


@dataclasses.dataclass
class NoisyClassifierFamily(Family):
    model: NoisyClassifier = None
    schedule: Schedule = None

    name = "noisy_classifier"
    guide_flag = "--classifier"
    batch_keys = ("image", "label")

    @classmethod
    def from_config(cls, config) -> "NoisyClassifierFamily":
        from t2i_jax import data as data_lib
        names = tuple(data_lib.class_names(config.data) or ())
        cfg = classifier_config(config, names)
        return cls(config=config, conditioning=Conditioning("label", class_names=names,
                                                            dataset=config.data.name),
                   image_shape=image_shape(config), model=NoisyClassifier(cfg),
                   schedule=schedule_of(config))

    def init_params(self, key: jax.Array):
        x = jnp.zeros((1,) + self.image_shape, jnp.float32)
        return self.model.init({"params": key, "dropout": key}, x, jnp.zeros((1,), jnp.int32))

    def logits(self, params, x_t, t, deterministic: bool = True, rngs=None):
        return self.model.apply(params, x_t, t, deterministic, rngs=rngs)  # [B, K]

    def loss(self, params, batch: dict, key: jax.Array, hp: dict):
        x0, y = batch["image"], batch["label"]
        n, T = x0.shape[0], self.schedule.num_timesteps
        t = jax.random.randint(jax.random.fold_in(key, _T), (n,), 0, T)
        noise = jax.random.normal(jax.random.fold_in(key, _NOISE), x0.shape, x0.dtype)
        x_t = forward.q_sample(self.schedule, x0, t, noise)
        logits = self.logits(params, x_t, t, deterministic=False,
                             rngs={"dropout": jax.random.fold_in(key, _DROPOUT)})
        log_p = jax.nn.log_softmax(logits)
        per_example = -jnp.take_along_axis(log_p, y[:, None], axis=-1)[:, 0]  # [B]
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return per_example, dict(accuracy=jnp.mean(correct),
                                 **quarter_means(correct, t, T, "accuracy"))

    def log_prob_fn(self, params):
        """guidance f(x_t, t, label [B]) -> log p(label | x_t) [B] (ADM's classifier guidance)."""
        def log_prob(x_t, t, label):
            log_p = jax.nn.log_softmax(self.logits(params, x_t, t))
            return jnp.take_along_axis(log_p, label[:, None], axis=-1)[:, 0]
        return log_prob
