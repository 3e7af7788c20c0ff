"""Latent diffusion's first part: a KL autoencoder of `shapes` at 64x64 with f = 4, c = 4
(a 64x64x3 image is a 16x16x4 latent), L1 reconstruction as an NLL with a learned log-variance
+ 1e-6 KL, summed over pixels (CompVis/latent-diffusion's AutoencoderKL and its loss, without
LPIPS). At the end of training the scale factor 1 / std of sampled training latents goes into
the final checkpoint. Then configs/shapes64_ldm.py trains text-to-image on its latents:

    python train.py --config configs/shapes64_ae.py --workdir runs/shapes64_ae
    python -m t2i_jax.evaluation.reconstruct --workdir runs/shapes64_ae
    python train.py --config configs/shapes64_ldm.py --workdir runs/shapes64_ldm

f = 2 (32x32x4 latents): configs/shapes64_ae_f2.py.
The patch-GAN: --config.train.disc_weight=0.5 --config.train.disc_start=1000.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import autoencoder  # noqa: E402
import shapes  # noqa: E402


def get_config():
    config = shapes.get_config()
    config.data.image_size = 64
    return autoencoder.make(
        config, ae=dict(factor=4, latent_channels=4, channels=16, channel_mult=(1, 2, 4),
                        num_res_blocks=1, num_groups=8),                # widths at 64, 32, 16
        discriminator=dict(channels=32, num_layers=2),
        batch_size=16, num_steps=1200, scale_images=2048, every=400)
