"""A KL autoencoder of the embedded digits at 16x16 grey, f = 2, c = 2 (16x16x1 -> 8x8x2), the
loss and scale factor of configs/shapes64_ae.py:

    python train.py --config configs/digits_ae.py --workdir runs/digits_ae
    python -m t2i_jax.evaluation.reconstruct --workdir runs/digits_ae
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import digits  # noqa: E402


def get_config():
    config = digits.get_config()
    config.family = "autoencoder"
    config.model = ml_collections.ConfigDict(dict(
        ae=dict(factor=2, latent_channels=2, channels=32, channel_mult=(1, 2),
                num_res_blocks=1, num_groups=8),
        discriminator=dict(channels=16, num_layers=1)))
    tr = config.train
    tr.batch_size = 32
    tr.num_steps = 1500
    tr.learning_rate = 1e-3
    tr.warmup_steps = 100
    tr.lr_schedule = "cosine"
    tr.end_lr_factor = 0.1
    tr.grad_clip = 0.0
    tr.ema_decay = 0.999
    tr.kl_weight = 1e-6
    tr.logvar_init = 0.0
    tr.disc_weight = 0.0
    tr.disc_start = 0
    tr.scale_images = 1797
    tr.checkpoint_every = 500
    tr.sample_every = 500
    return config
