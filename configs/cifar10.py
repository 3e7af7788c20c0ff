"""Class-conditional CIFAR-10 with classifier-free guidance, the setting of Ho & Salimans (2022)
(there: ImageNet 64x64 with p_uncond 0.1 or 0.2; the same recipe at 32x32 here). The condition is
the class label; the null condition is the extra label 10. Needs the TFDS catalog data set
`cifar10` prepared in data_dir once (network), see t2i_jax/data/catalog.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import base  # noqa: E402


def get_config():
    config = base.get_config()
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.channels = 3
    config.data.random_flip = True
    u = config.model.unet
    u.channels = 128
    u.channel_mult = (1, 2, 2, 2)
    u.num_res_blocks = 2
    u.attention_levels = (1,)         # 16x16, as DDPM's CIFAR-10 model
    u.mid_attention = True
    u.num_heads = 4
    u.dropout = 0.1
    u.num_classes = 10
    config.model.text = None
    config.model.pooled_text = False
    tr = config.train
    tr.batch_size = 128
    tr.num_steps = 400_000
    tr.learning_rate = 2e-4
    tr.warmup_steps = 5000
    tr.grad_clip = 1.0
    tr.p_uncond = 0.1
    tr.ema_decay = 0.9999
    tr.checkpoint_every = 10_000
    tr.sample_every = 10_000
    config.sample.guidance_weight = 1.0
    return config
