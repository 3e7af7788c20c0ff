"""A CLIP of the embedded digits and their captions, whose image tower reads noisy images
(x_t, t) with the schedule of configs/digits_uncond.py: SDG's text and image guidance
(sample.py --clip) and clean scoring (CLIP score, reranking) from one model.

A quarter of every batch is clean (t = 0, train.clean_fraction): enough that clean zero-shot
accuracy is as good as a clean-only CLIP's, while three quarters of the batch still cover the
noise levels guidance needs (see the note of issue 11)."""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import digits  # noqa: E402


def get_config():
    config = digits.get_config()
    config.family = "contrastive"
    text = dict(config.model.text)
    config.model = ml_collections.ConfigDict(dict(
        image=dict(out_channels=1, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                   attention_levels=(), mid_attention=True, num_heads=4, num_groups=8,
                   dropout=0.0),
        text=text,
        embed_dim=64))
    tr = config.train  # digits.py's schedule (3000 steps, lr 1e-3, cosine, EMA 0.999) otherwise
    tr.batch_size = 64
    tr.p_uncond = 0.0
    tr.clean_fraction = 0.25
    tr.sample_every = 0
    # sample.py --clip's default scales: the best of the sweeps in docs/results.md
    config.guide = ml_collections.ConfigDict(dict(clip_text_scale=30.0, clip_image_scale=100.0))
    return config
