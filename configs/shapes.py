"""Text-to-image on the embedded procedural `shapes` data set: 32x32 RGB images of one or two
coloured shapes with compositional captions ("a small red circle above a blue square"). Some
attribute combinations are held out of training to test compositional generalisation."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import base  # noqa: E402


def get_config():
    config = base.get_config()
    config.data.name = "shapes"
    config.data.image_size = 32
    config.data.channels = 3
    u = config.model.unet
    u.channels = 32
    u.channel_mult = (1, 2, 2)
    u.num_res_blocks = 1
    u.attention_levels = (2,)
    u.mid_attention = True
    u.num_heads = 4
    u.num_groups = 8
    t = config.model.text
    t.max_length = 64        # "a small red circle above a large blue square" is 44 bytes
    t.width = 128
    t.num_layers = 2
    config.diffusion.schedule = "cosine"
    tr = config.train
    tr.batch_size = 32
    tr.num_steps = 20_000
    tr.learning_rate = 5e-4
    tr.warmup_steps = 500
    tr.lr_schedule = "cosine"
    tr.end_lr_factor = 0.1
    tr.ema_decay = 0.999
    tr.checkpoint_every = 2000
    tr.sample_every = 2000
    config.sample.guidance_weight = 3.0
    return config
