"""ADM's noisy classifier on the embedded digits: p(digit | x_t, t), trained on q_sample draws
of the digits with the schedule of configs/digits_uncond.py (cosine, T = 1000), so that it can
guide that model (sample.py --classifier). The network is the UNet's encoder half with ADM's
attention pooling."""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import digits  # noqa: E402


def get_config():
    config = digits.get_config()
    config.family = "noisy_classifier"
    config.model = ml_collections.ConfigDict(dict(
        encoder=dict(out_channels=1, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                     attention_levels=(), mid_attention=True, num_heads=4, num_groups=8,
                     dropout=0.1)))
    tr = config.train  # digits.py's schedule (3000 steps, lr 1e-3, cosine, EMA 0.999) otherwise
    tr.batch_size = 64
    tr.weight_decay = 0.05
    tr.p_uncond = 0.0
    tr.sample_every = 0
    # sample.py --classifier's default scale: the best of the sweep in docs/results.md
    config.guide = ml_collections.ConfigDict(dict(classifier_scale=3.0))
    return config
