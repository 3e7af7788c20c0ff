"""A super-resolution stage for digits, 16x16 -> 32x32 (after configs/digits.py): text-
conditioned, noise-conditioning augmentation as configs/shapes_sr64.py describes.

    python train.py --config configs/digits_sr32.py --workdir runs/digits_sr32
    python sample.py --workdir runs/digits --sr runs/digits_sr32 --prompt 7 --outdir out/digits32
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import digits  # noqa: E402


def get_config():
    config = digits.get_config()
    config.family = "super_resolution"
    config.data.image_size = 32
    config.sr = ml_collections.ConfigDict(dict(
        low_res_size=16, max_train_level=0.999, train_levels="example", train_crop=16))
    config.diffusion.prediction = "v"  # as configs/shapes_sr64.py explains
    u = config.model.unet
    u.channels = 32
    u.channel_mult = (1, 2, 2)     # 32, 16, 8
    u.num_res_blocks = 1
    u.attention_levels = ()
    tr = config.train
    tr.batch_size = 32
    tr.num_steps = 3000
    tr.learning_rate = 1e-3
    tr.warmup_steps = 100
    tr.checkpoint_every = 500
    tr.sample_every = 1000
    tr.samples_per_prompt = 4
    s = config.sample
    s.num_steps = 20
    s.guidance_weight = 1.0
    s.aug_level = 0.2
    return config
