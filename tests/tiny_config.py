"""A tiny text-to-image experiment on the embedded digits for training tests (seconds per run)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))

import digits  # noqa: E402


def get_config():
    config = digits.get_config()
    u = config.model.unet
    u.channels = 16
    u.channel_mult = (1, 2)
    u.num_res_blocks = 1
    u.attention_levels = ()
    u.mid_attention = True      # the cross-attention that reads the tokens
    u.num_heads = 2
    u.num_groups = 4
    t = config.model.text
    t.width = 32
    t.num_layers = 1
    t.num_heads = 2
    tr = config.train
    tr.batch_size = 8
    tr.num_steps = 4
    tr.learning_rate = 1e-3
    tr.warmup_steps = 2
    tr.lr_schedule = "constant"
    tr.checkpoint_every = 2
    tr.log_every = 1
    tr.sample_every = 0
    tr.samples_per_prompt = 1
    config.sample.num_steps = 3
    return config
