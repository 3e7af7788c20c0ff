"""The digits recipe (configs/digits.py) trained with flow matching instead of VP diffusion:
x_tau = (1 - tau) x0 + tau eps, the UNet predicting u = eps - x0, tau ~ logit-normal(0, 1)
(SD3), sampled with rectified flow's Euler (t2i_jax/diffusion/flow.py). Same network, data,
steps, batch and optimiser as digits.py: the two are matched in training compute."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import digits  # noqa: E402


def get_config():
    config = digits.get_config()
    config.diffusion.process = "flow"
    config.diffusion.flow_time = "logit_normal"
    config.diffusion.shift = 1.0
    config.sample.sampler = "euler"
    config.sample.num_steps = 50
    config.sample.guidance_weight = 3.0
    return config
