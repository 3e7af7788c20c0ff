"""An unconditional diffusion model of the embedded digits: the model ADM's classifier guidance
and SDG's CLIP guidance steer (configs/digits_classifier.py, configs/digits_clip.py). The same
UNet and schedule as configs/digits.py, with no text encoder and no class labels."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import digits  # noqa: E402


def get_config():
    config = digits.get_config()
    config.model.text = None          # no condition: text None and unet.num_classes None
    config.train.p_uncond = 0.0       # nothing to drop
    config.sample.guidance_weight = 0.0  # no classifier-free guidance without a condition
    return config
