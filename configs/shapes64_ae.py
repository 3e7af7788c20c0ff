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

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import shapes  # noqa: E402


def get_config():
    config = shapes.get_config()
    config.family = "autoencoder"
    config.data.image_size = 64
    config.model = ml_collections.ConfigDict(dict(
        ae=dict(factor=4, latent_channels=4, channels=16, channel_mult=(1, 2, 4),  # 64, 32, 16
                num_res_blocks=1, num_groups=8),
        discriminator=dict(channels=32, num_layers=2)))   # used when train.disc_weight > 0
    tr = config.train
    tr.batch_size = 16
    tr.num_steps = 1200
    tr.learning_rate = 1e-3
    tr.warmup_steps = 100
    tr.lr_schedule = "cosine"
    tr.end_lr_factor = 0.1
    tr.grad_clip = 0.0            # the loss is a sum over 12288 pixels: Adam normalises it
    tr.ema_decay = 0.999
    tr.kl_weight = 1e-6           # LDM's kl_weight
    tr.logvar_init = 0.0
    tr.disc_weight = 0.0          # LDM: 0.5, from disc_start
    tr.disc_start = 0
    tr.scale_images = 2048        # training images of the scale-factor pass
    tr.checkpoint_every = 400
    tr.sample_every = 400
    return config
