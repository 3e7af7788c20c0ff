"""Improved DDPM on 16x16 shapes: configs/shapes16.py with a learned variance (6 output
channels: eps, then v) trained by L_hybrid (Nichol & Dhariwal 2021). Also the model RePaint
inpaints with in `reproduce inpaint` (any trained model can):

    python train.py --config configs/shapes_learned_sigma.py --workdir runs/shapes_learned_sigma
    python sample.py --workdir runs/shapes_learned_sigma --inpaint image.png --mask_box 8,0,16,16 \\
        --prompt "a large red circle" --outdir out/repaint
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import shapes16  # noqa: E402


def get_config():
    config = shapes16.get_config()
    config.diffusion.learn_sigma = True
    config.diffusion.lambda_vlb = 0.001
    config.model.unet.out_channels = 6   # eps, then v (IDDPM eq. 15)
    config.train.num_steps = 3000
    config.sample.sampler = "ddpm"
    config.sample.num_steps = 50
    config.sample.ddpm_variance = "learned"
    return config
