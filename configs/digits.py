"""The default experiment: text-to-image on the embedded handwritten digits (scikit-learn's 1797
8x8 scans, upscaled to 16x16 grey), prompts in several phrasings ("7", "seven", "a handwritten
digit seven", "数字七"). Small enough to train to recognisable digits on 2 CPU cores in minutes."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import base  # noqa: E402


def get_config():
    config = base.get_config()
    config.data.name = "digits"
    config.data.image_size = 16
    config.data.channels = 1
    u = config.model.unet
    u.out_channels = 1
    u.channels = 32
    u.channel_mult = (1, 2, 2)
    u.num_res_blocks = 1
    u.attention_levels = ()
    u.mid_attention = True
    u.num_heads = 4
    u.num_groups = 8
    t = config.model.text
    t.max_length = 32        # "a handwritten digit seven" is 25 bytes + BOS/EOS
    t.width = 64
    t.num_layers = 2
    t.num_heads = 4
    config.diffusion.schedule = "cosine"
    tr = config.train
    tr.batch_size = 32
    tr.num_steps = 3000
    tr.learning_rate = 1e-3
    tr.warmup_steps = 200
    tr.lr_schedule = "cosine"
    tr.end_lr_factor = 0.1
    tr.ema_decay = 0.999
    tr.checkpoint_every = 1000
    tr.log_every = 50
    tr.sample_every = 1000
    tr.samples_per_prompt = 8
    config.sample.num_steps = 50
    config.sample.guidance_weight = 2.0
    return config
