"""A GLIDE-like 64x64 text-conditional base model for COCO captions (Nichol et al. 2022, scaled
down): ADM UNet with self- and cross-attention at 32, 16 and 8, 64-wide heads, and a byte-level
transformer text encoder trained jointly. Needs the TFDS catalog data set `coco_captions`
prepared in data_dir once (network), see t2i_jax/data/catalog.py. Sized for accelerators."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import base  # noqa: E402


def get_config():
    config = base.get_config()
    config.data.name = "coco_captions"
    config.data.image_size = 64
    config.data.channels = 3
    config.data.random_flip = True
    u = config.model.unet
    u.channels = 192
    u.channel_mult = (1, 2, 3, 4)
    u.num_res_blocks = 3
    u.attention_levels = (1, 2, 3)    # 32x32, 16x16, 8x8
    u.mid_attention = True
    u.num_heads = None
    u.head_dim = 64
    u.dropout = 0.1
    u.dtype = "bfloat16"
    t = config.model.text
    t.max_length = 128                # bytes: COCO captions are ~50 characters
    t.width = 512
    t.num_layers = 8
    t.num_heads = 8
    t.dtype = "bfloat16"
    tr = config.train
    tr.batch_size = 256
    tr.num_steps = 500_000
    tr.learning_rate = 1e-4
    tr.warmup_steps = 10_000
    tr.p_uncond = 0.2                 # GLIDE: 20% empty captions
    tr.checkpoint_every = 5000
    tr.sample_every = 5000
    tr.fsdp = 1
    config.sample.guidance_weight = 2.0   # GLIDE's scale 3 = 1 + w
    return config
