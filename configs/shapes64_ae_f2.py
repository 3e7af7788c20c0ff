"""configs/shapes64_ae.py with f = 2: 64x64x3 -> 32x32x4 latents (for `reproduce latent`'s
f = 2 vs f = 4; its latent model is configs/shapes64_ldm_f2.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import shapes64_ae  # noqa: E402


def get_config():
    config = shapes64_ae.get_config()
    config.model.ae.factor = 2
    config.model.ae.channel_mult = (1, 2)   # 64, 32
    return config
