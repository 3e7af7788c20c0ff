"""A cascade's base stage (Imagen, CDM): text-to-image on `shapes` rendered natively at 16x16.
Followed by configs/shapes_sr64.py (16 -> 64):

    python sample.py --workdir runs/shapes16 --sr runs/shapes_sr64 --prompt "a large red circle" \
        --outdir out/cascade
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import shapes  # noqa: E402


def get_config():
    config = shapes.get_config()
    config.data.image_size = 16
    u = config.model.unet
    u.channels = 32
    u.channel_mult = (1, 2, 2)
    u.num_res_blocks = 1
    u.attention_levels = (2,)     # 4x4 (and the middle block): cross-attention on the caption
    tr = config.train
    tr.batch_size = 32
    tr.num_steps = 3200
    tr.learning_rate = 1e-3
    tr.warmup_steps = 200
    tr.checkpoint_every = 1000
    tr.sample_every = 1000
    config.sample.guidance_weight = 3.0
    return config
