"""The super-resolution family: a text-conditioned diffusion model of the image at its stage's
size given a low-resolution version of it, with noise-conditioning augmentation (Ho et al. 2021,
Cascaded Diffusion Models; Saharia et al. 2022, Imagen sec. 2.5).

Per step (inside the jitted step, from the training image x0 [B, H, W, C] alone):
  z   = downsample(x0) to sr.low_res_size: the box (area) filter, the resize the base stage's
        images match (the embedded data sets are anti-aliased renders, i.e. box-filtered);
  s   ~ U[0, sr.max_train_level) per example (sr.train_levels = "example"; "batch" draws one
        level for the whole batch, imagen-pytorch's default), z_s = augmentation.noise_augment;
  the model sees [x_t, upsample(z_s)] on the channel axis, s through an embedding added to the
  time embedding, and the text (dropped with probability p_uncond, the image never: CFG drops
  the text, not the image); the loss is the diffusion family's.
Sampling (sampling_condition): the previous stage's output, corrupted to the stage's fixed level
(config.sample.aug_level, default 0.2) with per-image noise, level 0 giving the clean image.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax import images
from t2i_jax.conditioning import Condition
from t2i_jax.diffusion import augmentation, noise
from t2i_jax.families.diffusion import Diffusion

_LEVEL, _AUG_NOISE, _CROP = 4, 5, 6  # streams of the step's key (the diffusion family: 0..3)
AUG_NOISE_STREAM = 19      # sampling: per-image augmentation noise from fold_in(rng, 19)
TRAIN_LEVELS = ("example", "batch")


@dataclasses.dataclass(frozen=True)
class SRConfig:
    low_res_size: int = 16
    max_train_level: float = 0.999  # levels drawn from U[0, max); 0: no augmentation (ablation)
    train_levels: str = "example"   # one level per example, or one per batch
    train_crop: int = 0             # train on random crops of this size (0: the whole image)

    @classmethod
    def from_config(cls, config) -> "SRConfig":
        sr = config.get("sr", None)
        if sr is None:
            raise ValueError("a super_resolution config needs an `sr` section (sr.low_res_size, "
                             "sr.max_train_level, sr.train_levels): see configs/shapes_sr64.py.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(sr) - names)
        if unknown:
            raise ValueError(f"unknown sr settings {unknown}; the super_resolution family reads "
                             f"{sorted(names)}.")
        return cls(**dict(sr))


@dataclasses.dataclass
class SuperResolution(Diffusion):
    sr: SRConfig = None

    name = "super_resolution"
    stage_input = "image"   # its low-resolution input: the stage before it, or --low_res

    @classmethod
    def from_config(cls, config) -> "SuperResolution":
        sr = SRConfig.from_config(config)
        size = config.data.image_size
        if not (isinstance(sr.low_res_size, int) and 1 <= sr.low_res_size < size
                and size % sr.low_res_size == 0):
            raise ValueError(f"sr.low_res_size={sr.low_res_size} must be smaller than "
                             f"data.image_size={size} and divide it (a box downsample).")
        if not 0.0 <= float(sr.max_train_level) < 1.0:
            raise ValueError(f"sr.max_train_level must be in [0, 1), got {sr.max_train_level}.")
        factor = size // sr.low_res_size
        if sr.train_crop and not (sr.train_crop <= size and sr.train_crop % factor == 0
                                  and sr.train_crop >= factor):
            raise ValueError(f"sr.train_crop={sr.train_crop} must be at most data.image_size="
                             f"{size} and a multiple of the upsampling factor {factor} (0: no "
                             "crops).")
        if sr.train_levels not in TRAIN_LEVELS:
            raise ValueError(f"sr.train_levels must be one of {TRAIN_LEVELS}, got "
                             f"{sr.train_levels!r}.")
        if "aug_level" in config.sample:
            augmentation.check_level(config.sample.aug_level, "sample.aug_level")
        base = Diffusion.from_config(config)
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(Diffusion)},
                   sr=sr)

    @property
    def factor(self) -> int:
        """The upsampling factor: data.image_size / sr.low_res_size."""
        return self.image_shape[0] // self.sr.low_res_size

    @property
    def low_res_shape(self) -> tuple:
        """(h, w, C) of the stage's input: the previous stage's output."""
        return (self.sr.low_res_size, self.sr.low_res_size, self.image_shape[-1])

    def default_aug_level(self) -> float:
        return float(self.config.sample.get("aug_level", 0.2))

    def stage_fields(self, given, level=None) -> dict:
        """The previous stage's uint8 images (or given --low_res ones) and their level."""
        return {"low_res": images.to_float(given),
                "aug_level": np.full((len(given),), level, np.float32)}

    def init_params(self, key: jax.Array):
        x = jnp.zeros((1,) + self.image_shape, jnp.float32)
        cond = self.null().replace(low_res=jnp.zeros((1,) + self.low_res_shape, jnp.float32),
                                   aug_level=jnp.zeros((1,), jnp.float32))
        return self.model.init({"params": key, "dropout": key}, x, jnp.zeros((1,), jnp.int32), cond)

    def loss(self, params, batch: dict, key: jax.Array, hp: dict):
        if self.sr.train_crop and self.sr.train_crop < self.image_shape[0]:
            batch = dict(batch, image=self._crop(batch["image"], jax.random.fold_in(key, _CROP)))
        return super().loss(params, batch, key, hp)

    def _crop(self, x0: jax.Array, key: jax.Array) -> jax.Array:
        """Random crops [B, c, c, C] of x0 at offsets that are multiples of the upsampling factor,
        so the box downsample of a crop is exactly the crop of the downsampled image (Imagen
        trains its SR stages on crops; the network is convolutional with attention)."""
        c, size, factor = self.sr.train_crop, self.image_shape[0], self.factor
        offsets = jax.random.randint(key, (x0.shape[0], 2), 0, (size - c) // factor + 1) * factor
        return jax.vmap(lambda im, o: jax.lax.dynamic_slice(
            im, (o[0], o[1], 0), (c, c, im.shape[-1])))(x0, offsets)

    def training_condition(self, batch: dict, key: jax.Array, hp: dict) -> Condition:
        x0 = batch["image"]                                                # [B, H, W, C]
        z = augmentation.downsample(x0, x0.shape[1] // self.factor)        # [B, h, w, C]
        n = x0.shape[0]
        shape = (n,) if self.sr.train_levels == "example" else ()
        level = jax.random.uniform(jax.random.fold_in(key, _LEVEL), shape, jnp.float32,
                                   0.0, self.sr.max_train_level)
        level = jnp.broadcast_to(level, (n,))                              # [B]
        eps = jax.random.normal(jax.random.fold_in(key, _AUG_NOISE), z.shape, z.dtype)
        z_s = augmentation.noise_augment(z, level, eps)
        return self.conditioning.of_batch(batch).replace(low_res=z_s, aug_level=level)

    def sampling_condition(self, cond: Condition, rng: jax.Array, sample_ids) -> Condition:
        if cond.low_res is None or cond.aug_level is None:
            raise ValueError("a super-resolution stage needs its low-resolution input: the "
                             "Condition's low_res [B, h, w, C] and aug_level [B].")
        if tuple(cond.low_res.shape[1:]) != self.low_res_shape:
            raise ValueError(f"this SR stage takes {self.low_res_shape} inputs, got "
                             f"{tuple(cond.low_res.shape[1:])}.")
        eps = noise.initial_noise(jax.random.fold_in(rng, AUG_NOISE_STREAM), cond.low_res.shape,
                                  sample_ids)
        return cond.replace(low_res=augmentation.noise_augment(cond.low_res, cond.aug_level, eps))

    def grid_condition(self, prompts, n: int) -> Condition:
        """The first test images' captions and box-downsampled images, n rows each."""
        cond = super().grid_condition(prompts, n)
        low = jnp.repeat(augmentation.downsample(jnp.asarray(self.grid_examples()["image"]),
                                                 self.sr.low_res_size), n, axis=0)
        return cond.replace(low_res=low, aug_level=jnp.full((low.shape[0],),
                                                            self.default_aug_level(), jnp.float32))

    def grid_prompts(self) -> list:
        return list(self.grid_examples()["caption"])

    def next_command(self, workdir: str) -> str:
        import shlex
        return ("python sample.py --workdir BASE_WORKDIR --sr " + shlex.quote(workdir)
                + " --prompt '...' --outdir OUT   (or --workdir " + shlex.quote(workdir)
                + " --low_res IMAGES --prompt '...' --outdir OUT)")

