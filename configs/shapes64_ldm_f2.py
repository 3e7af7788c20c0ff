"""configs/shapes64_ldm.py on the f = 2 autoencoder (configs/shapes64_ae_f2.py): 32x32x4
latents, one more UNet level so the attention still runs at 4x4 (for `reproduce latent`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import shapes64_ldm  # noqa: E402


def get_config():
    config = shapes64_ldm.get_config()
    config.model.autoencoder = "runs/shapes64_ae_f2"
    u = config.model.unet
    u.channel_mult = (1, 2, 2, 2)             # 32, 16, 8, 4
    u.attention_levels = (3,)
    return config
