"""A CLIP of the embedded shapes and their compositional captions, whose image tower reads noisy
images (x_t, t) with the schedule of configs/shapes.py: SDG guidance of shapes models and clean
scoring. Colour and shape retrieval accuracy: `python -m t2i_jax.evaluation.guides --workdir W`.

As in digits_clip.py, a quarter of every batch is clean (train.clean_fraction = 0.25). The image
tower starts at 16 channels (32x32 RGB: four times digits' pixels) and the text tower is 64 wide,
so that 1600 steps of 64 train in the 10 minutes of a 2-core machine."""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import shapes  # noqa: E402


def get_config():
    config = shapes.get_config()
    config.family = "contrastive"
    text = dict(config.model.text, width=64)  # shapes.py's 128 costs a third more per step
    config.model = ml_collections.ConfigDict(dict(
        image=dict(out_channels=3, channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
                   attention_levels=(), mid_attention=True, num_heads=4, num_groups=8,
                   dropout=0.0),
        text=text,
        embed_dim=64))
    tr = config.train
    tr.batch_size = 64
    tr.num_steps = 1600
    tr.learning_rate = 1e-3
    tr.warmup_steps = 100
    tr.p_uncond = 0.0
    tr.clean_fraction = 0.25
    tr.checkpoint_every = 800
    tr.sample_every = 0
    config.guide = ml_collections.ConfigDict(dict(clip_text_scale=30.0, clip_image_scale=100.0))
    return config
