"""The latent diffusion family (Rombach et al. 2022): the diffusion family run on the latents of
a frozen autoencoder (families/autoencoder.py) trained on the same data, at the same size.

config.model.autoencoder names the autoencoder's workdir; its EMA parameters are loaded frozen
(families/frozen.py: never trained, never averaged, not in the optimizer state or this model's
checkpoints, which record its identity instead). Per step, inside the jitted step:
  z0 = scale_factor * z, z ~ q(z | x0) (a posterior sample, as LDM's encode_first_stage +
       get_first_stage_encoding), held fixed (no gradient reaches the autoencoder);
  then the diffusion family's loss on z0: text conditioning, CFG dropout, any prediction.
scale_factor is the one the autoencoder's final checkpoint stores (1 / std of sampled training
latents: LDM's scale_by_std), or 1 with latent.scale_by_std=False (the ablation).
Sampling runs the chain on [H/f, W/f, c] and decodes x0 / scale_factor to pixels. Thresholding
x0_hat to [-1, 1] (static, or dynamic's rescaling into it) assumes pixels: refused here.
"""

from __future__ import annotations

import dataclasses

import jax

from t2i_jax.families.base import image_shape
from t2i_jax.families.diffusion import Diffusion
from t2i_jax.families.frozen import (Frozen, check_recorded, check_same_data, load_frozen,
                                     resolve)
from t2i_jax.models.denoiser import ModelConfig

_POSTERIOR = 8   # stream of the step's key: z ~ q(z | x0) (the diffusion family: 0..3)
FLAG = "config.model.autoencoder"


@dataclasses.dataclass(frozen=True)
class LatentConfig:
    scale_by_std: bool = True    # False: z is not rescaled (LDM's reason for it, shown)

    @classmethod
    def from_config(cls, config) -> "LatentConfig":
        section = dict(config.get("latent", None) or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - names)
        if unknown:
            raise ValueError(f"unknown latent settings {unknown}; the latent_diffusion family reads "
                             f"{sorted(names)}.")
        return cls(**section)


@dataclasses.dataclass
class LatentDiffusion(Diffusion):
    autoencoder: Frozen = None
    scale_factor: float = 1.0
    latent_cfg: LatentConfig = None

    name = "latent_diffusion"
    latent = True
    not_pixels = ("a latent model", "here x0_hat is a scaled latent (std ~1, unbounded), which "
                  "clipping would distort before the decoder sees it")

    @classmethod
    def from_config(cls, config) -> "LatentDiffusion":
        latent_cfg = LatentConfig.from_config(config)
        cls.refuse_pixel_thresholding(config.sample.get("thresholding", None),
                                      "config.sample.thresholding")
        path, step = resolve(config, "autoencoder", FLAG)
        frozen = load_frozen(path, "autoencoder", flag=FLAG, step=step)
        check_autoencoder(config, frozen)
        # a stored model: its autoencoder must be the one it was trained with
        check_recorded(config, "autoencoder", frozen, "its latents would decode wrongly")
        if latent_cfg.scale_by_std:
            stats = frozen.statistics or {}
            if "scale_factor" not in stats:
                raise ValueError(
                    f"{FLAG}={frozen.workdir}: its checkpoint {frozen.step} stores no scale factor "
                    "(it is computed when training reaches train.num_steps): finish training the "
                    f"autoencoder (rerun its train.py command), or pass "
                    "--config.latent.scale_by_std=False to train on unscaled latents.")
            scale = float(stats["scale_factor"])
        else:
            scale = 1.0
        shape = frozen.family.latent_shape
        base = Diffusion.from_config(config, shape=shape)
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(Diffusion)},
                   autoencoder=frozen, scale_factor=scale, latent_cfg=latent_cfg)

    @property
    def ae(self):
        """The autoencoder's family (encode, decode)."""
        return self.autoencoder.family

    def frozen_identity(self) -> dict:
        return dict(super().frozen_identity(), autoencoder=self.autoencoder.identity())

    def hparams(self) -> dict:
        return dict(super().hparams(), autoencoder=self.autoencoder.params)

    def diffusion_data(self, batch: dict, key: jax.Array, hp: dict) -> jax.Array:
        post = self.ae.encode(hp["autoencoder"], batch["image"])
        z = post.sample(jax.random.fold_in(key, _POSTERIOR))
        return jax.lax.stop_gradient(z * self.scale_factor)                # [B, h, w, c]

    # --- sampling ------------------------------------------------------------------------
    @property
    def output_shape(self) -> tuple:
        return image_shape(self.config)

    def sampling_inputs(self):
        return dict(super().sampling_inputs(), autoencoder=self.autoencoder.params)

    def to_output(self, inputs, x0: jax.Array) -> jax.Array:
        return self.ae.decode(inputs["autoencoder"], x0 / self.scale_factor)

    def encode_image(self, inputs, images: jax.Array) -> jax.Array:
        return self.ae.encode(inputs["autoencoder"], images).mean * self.scale_factor

    def decoder_record(self) -> dict:
        ident = self.autoencoder.identity()
        return dict(workdir=ident["workdir"], checkpoint_step=ident["step"],
                    sha256=ident["sha256"], scale_factor=self.scale_factor)


def check_autoencoder(config, frozen: Frozen) -> None:
    """Refuses an autoencoder of other data, and a denoiser that does not fit its latents."""
    check_same_data(config, frozen, FLAG, "autoencoder",
                    "Train the autoencoder on this model's data set and image size (or point "
                    "config.model.autoencoder at one that was).")
    h, w, c = frozen.family.latent_shape
    model = ModelConfig.from_config(config.model)
    net = f"model.{model.backbone}"  # the backbone's section: model.unet or model.dit
    if model.out_channels != c:
        raise ValueError(f"{net}.out_channels={model.out_channels}, but the autoencoder in "
                         f"{frozen.workdir} makes latents of {c} channels ([{h}, {w}, {c}]): set "
                         f"--config.{net}.out_channels={c}.")
    if h % model.size_multiple or w % model.size_multiple:
        if model.backbone == "dit":
            p = model.dit.patch_size
            what, fix = (f"the DiT cuts its input into {p}x{p} patches (model.dit.patch_size="
                         f"{p})", "a patch size that divides them")
        else:
            halvings = len(model.unet.channel_mult) - 1
            what, fix = (f"the UNet halves its input {halvings} times (model.unet.channel_mult="
                         f"{model.unet.channel_mult})", "fewer levels")
        raise ValueError(f"{what}, but the autoencoder in {frozen.workdir} makes {h}x{w} latents "
                         f"(f={frozen.family.ae_config.factor}): use {fix} or an autoencoder "
                         "with a smaller factor.")
