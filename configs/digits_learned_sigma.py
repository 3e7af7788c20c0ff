"""Improved DDPM on digits: configs/digits.py with a learned variance (2 output channels: eps and
v) trained by L_hybrid = L_simple + 0.001 L_vlb (Nichol & Dhariwal 2021, sec. 3.1). Sampled with
the learned variance by default (sample.ddpm_variance); `reproduce iddpm` compares it with fixed
beta~ and beta at 25-1000 DDPM steps, and its bits/dim with configs/digits.py's L_simple:

    python train.py --config configs/digits_learned_sigma.py --workdir runs/digits_learned_sigma
    python -m t2i_jax.evaluation.nll --workdir runs/digits_learned_sigma
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import digits  # noqa: E402


def get_config():
    config = digits.get_config()
    config.diffusion.learn_sigma = True
    config.diffusion.lambda_vlb = 0.001
    config.model.unet.out_channels = 2   # eps, then v (IDDPM eq. 15)
    config.sample.sampler = "ddpm"
    config.sample.num_steps = 50
    config.sample.ddpm_variance = "learned"
    return config
