"""Stable Diffusion 1.x / 2.x from a diffusers pipeline folder as a sampling stage: the latent
diffusion family's stage (text encoder, UNet on latents, then the VAE's decoder) with the
folder's pretrained models (models/pretrained/pipeline.py) in place of trained ones.

    family = StableDiffusion.from_folder("/data/stable-diffusion-v1-5")   # sampling/load.py wraps it

The chain is the folder's: betas, prediction and the steps each sampler visits come from
scheduler/scheduler_config.json (diffusion/diffusers_scheduler.py), its `_class_name` the
default sampler. The condition is the prompt through the folder's CLIP text encoder run without
a padding mask (as StableDiffusionPipeline runs it), every position of the 77 attended to; the
null is the empty prompt's encoding, padded like a prompt. Images are decoded from z0 /
scaling_factor + shift_factor (vae/config.json). diffusers' guidance_scale g is w = g - 1 here.
The job records the folder's path and content hash (`decoder_record`), so a rerun of a job
against other weights is refused. Nothing trains here: fine-tuning is a later family.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from t2i_jax.conditioning import Condition, Conditioning
from t2i_jax.diffusion.diffusers_scheduler import CLASS_OF_SAMPLER
from t2i_jax.families.diffusion import Diffusion, LossConfig
from t2i_jax.families.frozen_text import FrozenText, TextEncoderConfig
from t2i_jax.families.latent import LatentDiffusion

DEFAULT_GUIDANCE_SCALE = 7.5   # StableDiffusionPipeline's guidance_scale (w = 6.5 here)
DEFAULT_STEPS = 50             # and its num_inference_steps


@dataclasses.dataclass
class StableDiffusion(Diffusion):
    folder: Any = None        # models.pretrained.pipeline.PipelineFolder

    name = "stable_diffusion"
    latent = True
    not_pixels = LatentDiffusion.not_pixels

    @classmethod
    def from_folder(cls, directory: str, mesh=None, dtype: str = "float32") -> "StableDiffusion":
        from t2i_jax.models.pretrained import pipeline
        folder = pipeline.load(directory, mesh=mesh, dtype=dtype)
        text = folder.text
        feats, _ = text.encode([""])
        frozen = FrozenText(TextEncoderConfig(kind="clip", path=text.directory,
                                              max_length=text.max_length, dtype=dtype),
                            text, feats.tokens, feats.pooled)
        size, sched = folder.image_size, folder.scheduler
        config = ml_collections.ConfigDict(dict(
            family=cls.name,
            data=dict(name="diffusers:" + os.path.basename(folder.directory), image_size=size,
                      channels=int(folder.vae[0].out_channels)),
            sample=dict(sampler=sched.default_sampler, num_steps=DEFAULT_STEPS, eta=0.0,
                        thresholding="none", spacing=sched.spacing(sched.default_sampler),
                        ddpm_variance="posterior",
                        guidance_weight=DEFAULT_GUIDANCE_SCALE - 1.0)))
        u = folder.unet[0]
        f = folder.vae_scale_factor
        return cls(config=config,
                   conditioning=Conditioning("text", tokenizer=text.tokenizer,
                                             dataset=config.data.name),
                   image_shape=(size // f, size // f, int(u.in_channels)), model=None,
                   schedule=sched.schedule(),
                   loss_cfg=LossConfig(prediction=sched.prediction, p_uncond=0.0),
                   frozen_text=frozen, folder=folder)

    @property
    def inpaint(self) -> bool:
        return False  # diffusers' 9-channel inpainting UNet is not read (in_channels refused)

    # --- sampling ------------------------------------------------------------------------
    @property
    def unet(self):
        from t2i_jax.models.unet2d_condition import UNet2DConditionModel
        return UNet2DConditionModel(self.folder.unet[0])

    @property
    def vae(self):
        from t2i_jax.models.autoencoder_kl import AutoencoderKL
        return AutoencoderKL(self.folder.vae[0])

    @property
    def output_shape(self) -> tuple:
        return (self.folder.image_size, self.folder.image_size, int(self.folder.vae[0].out_channels))

    def sampling_inputs(self):
        return {"text_encoder": self.frozen_text.params, "vae": self.folder.vae[1]}

    def encode(self, params, cond, inputs=None):
        """Condition(features=the prompt's CLIP token features [B, 77, D]): what the UNet's
        cross-attention reads, every position (padding included)."""
        return Condition(features=self.with_text_features(inputs["text_encoder"], cond).features)

    def denoise_fn(self, params):
        unet = self.unet
        return lambda x_t, t, enc: unet.apply(params, x_t, t, enc.features)

    def spacing_of(self, sampler: str):
        return self.folder.scheduler.spacing(sampler) if sampler in CLASS_OF_SAMPLER else None

    def chain_steps(self, options):
        """The steps diffusers' scheduler class of options.sampler visits (its spacing, offset and
        final alpha from the folder's scheduler_config.json)."""
        if options.sampler not in CLASS_OF_SAMPLER:
            raise ValueError(f"--sampler {options.sampler} has no diffusers scheduler to follow; "
                             f"choose one of {sorted(CLASS_OF_SAMPLER)}.")
        return self.folder.scheduler.steps(options.sampler, options.num_steps, self.schedule)

    def to_output(self, inputs, x0: jax.Array) -> jax.Array:
        cfg = self.folder.vae[0]
        z = x0 / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return self.vae.apply(inputs["vae"], z, method="decode")

    def encode_image(self, inputs, images: jax.Array) -> jax.Array:
        """(mean - shift_factor) * scaling_factor of the VAE's posterior: diffusers' img2img with
        the posterior's mean (its default draws a sample, whose std is ~1e-3 of the mean's scale)."""
        cfg = self.folder.vae[0]
        mean, _ = self.vae.apply(inputs["vae"], images, method="encode")
        return (mean - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def decoder_record(self) -> dict:
        ident = self.folder.identity()
        cfg = self.folder.vae[0]
        return dict(workdir=ident["workdir"], kind="diffusers", sha256=ident["sha256"],
                    scale_factor=float(cfg.scaling_factor),
                    **({"shift_factor": float(cfg.shift_factor)} if cfg.shift_factor else {}))

    def frozen_identity(self) -> dict:
        return {"pipeline": self.folder.identity()}

    # --- nothing trains here -----------------------------------------------------------
    def init_params(self, key):
        raise ValueError("a diffusers pipeline folder is sampled, not trained, by this family.")

    def loss(self, params, batch, key, hp):
        raise ValueError("a diffusers pipeline folder is sampled, not trained, by this family.")

    def grid_prompts(self) -> list:
        return ["a photograph of an astronaut riding a horse"]

    def next_command(self, workdir: str) -> str:
        return f"python sample.py --workdir {workdir} --prompt 'a photograph of an astronaut'"
