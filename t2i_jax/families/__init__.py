"""Families: the trainable kinds of model, picked by `config.family` (default "diffusion").

    family = families.build(config)

diffusion         a Denoiser (text-, class- or un-conditional) with the DDPM loss and CFG dropout
noisy_classifier  ADM's classifier of noisy images, p(y | x_t, t)
contrastive       a CLIP whose image tower reads (x_t, t), for SDG guidance and clean scoring
super_resolution  a diffusion model conditioned on a low-resolution image (with noise-
                  conditioning augmentation) and text: a cascade's SR stage (Imagen, CDM)
autoencoder       latent diffusion's KL autoencoder (L1 NLL + KL, optional patch-GAN), with the
                  scale factor of its latents stored in its final checkpoint
latent_diffusion  the diffusion family on a frozen autoencoder's scaled latents (LDM / SD)
prior             unCLIP's prior: diffusion over a frozen CLIP's image embeddings given text (x0)
decoder           unCLIP's decoder: the diffusion family conditioned on a CLIP image embedding
stable_diffusion  a diffusers Stable Diffusion folder's UNet fine-tuned (full or LoRA) on its
                  frozen VAE's latents and CLIP text features (config.model.pretrained)
"""

from __future__ import annotations

from t2i_jax.families.autoencoder import AutoencoderFamily
from t2i_jax.families.base import Family
from t2i_jax.families.contrastive import Contrastive
from t2i_jax.families.decoder import Decoder
from t2i_jax.families.diffusion import Diffusion
from t2i_jax.families.latent import LatentDiffusion
from t2i_jax.families.noisy_classifier import NoisyClassifierFamily
from t2i_jax.families.prior import Prior
from t2i_jax.families.stable_diffusion import StableDiffusion
from t2i_jax.families.super_resolution import SuperResolution

FAMILIES = {"diffusion": Diffusion, "noisy_classifier": NoisyClassifierFamily,
            "contrastive": Contrastive, "super_resolution": SuperResolution,
            "autoencoder": AutoencoderFamily, "latent_diffusion": LatentDiffusion,
            "prior": Prior, "decoder": Decoder, "stable_diffusion": StableDiffusion}


def name_of(config) -> str:
    """The family of a config; configs (and checkpoints) from before families were diffusion."""
    return config.get("family", "diffusion") if hasattr(config, "get") else "diffusion"


def build(config) -> Family:
    name = name_of(config)
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r} (config.family); choose one of "
                         f"{sorted(FAMILIES)}.")
    return FAMILIES[name].from_config(config)


__all__ = ["FAMILIES", "Family", "Diffusion", "NoisyClassifierFamily", "Contrastive", "SuperResolution",
           "AutoencoderFamily", "LatentDiffusion", "Prior", "Decoder", "build", "name_of"]
