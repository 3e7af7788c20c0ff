"""Latent diffusion (Rombach et al. 2022) on `shapes` at 64x64: text-to-image in the 16x16x4
latent space of the frozen autoencoder of configs/shapes64_ae.py (f = 4), so the denoiser costs
what a 16x16 pixel model costs. Each batch is encoded inside the step (a posterior sample, times
the autoencoder's stored scale factor); sampling decodes to 64x64 pixels.

    python train.py --config configs/shapes64_ae.py --workdir runs/shapes64_ae
    python train.py --config configs/shapes64_ldm.py --workdir runs/shapes64_ldm
    python sample.py --workdir runs/shapes64_ldm --prompt "a large red circle" --outdir out/ldm

Another autoencoder: --config.model.autoencoder=DIR. Without the scale factor (the ablation):
--config.latent.scale_by_std=False.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import shapes  # noqa: E402


def get_config():
    config = shapes.get_config()
    config.family = "latent_diffusion"
    config.data.image_size = 64               # the pixels; the chain runs on 16x16x4 latents
    config.model.autoencoder = "runs/shapes64_ae"
    config.latent = ml_collections.ConfigDict(dict(scale_by_std=True))
    # v-prediction: with no clipping of x0_hat, eps-prediction's x0_hat = (x_t - sqrt(1 - abar)
    # eps_hat) / sqrt(abar) magnifies eps_hat's error 1 / sqrt(abar_T) ~ 1e4 times at the cosine
    # schedule's first step (SD 1.x avoids it with a schedule ending at abar_T = 0.0047; SD 2.x
    # predicts v). x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v_hat is the network's own output.
    config.diffusion.prediction = "v"
    u = config.model.unet
    u.out_channels = 4                        # the autoencoder's latent channels
    u.channels = 32
    u.channel_mult = (1, 2, 2)                # 16, 8, 4
    u.num_res_blocks = 1
    u.attention_levels = (2,)                 # cross-attention on the caption at 4x4 (+ middle)
    tr = config.train
    tr.batch_size = 32
    tr.num_steps = 2400
    tr.learning_rate = 1e-3
    tr.warmup_steps = 200
    tr.checkpoint_every = 800
    tr.sample_every = 800
    s = config.sample
    s.guidance_weight = 3.0
    s.thresholding = "none"                   # x0_hat is a latent: no pixel clipping
    return config
