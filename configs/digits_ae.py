"""A KL autoencoder of the embedded digits at 16x16 grey, f = 2, c = 2 (16x16x1 -> 8x8x2), the
loss and scale factor of configs/shapes64_ae.py:

    python train.py --config configs/digits_ae.py --workdir runs/digits_ae
    python -m t2i_jax.evaluation.reconstruct --workdir runs/digits_ae
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import autoencoder  # noqa: E402
import digits  # noqa: E402


def get_config():
    return autoencoder.make(
        digits.get_config(), ae=dict(factor=2, latent_channels=2, channels=32, channel_mult=(1, 2),
                                     num_res_blocks=1, num_groups=8),
        discriminator=dict(channels=16, num_layers=1),
        batch_size=32, num_steps=1500, scale_images=1797, every=500)
