"""A cascade's super-resolution stage, 16x16 -> 64x64 on `shapes` (Imagen's SR stages, Ho et al.
2021's cascaded diffusion): text-conditioned, the 16x16 image (box-downsampled from the 64x64
training image inside the step) noise-augmented at a level s ~ U[0, 0.999) per example, resized
up and concatenated with x_t; s is embedded and added to the time embedding. CFG drops the text,
never the image. Sampling corrupts the base stage's output to sample.aug_level (Imagen: 0.1-0.3).

    python train.py --config configs/shapes_sr64.py --workdir runs/shapes_sr64
    python sample.py --workdir runs/shapes16 --sr runs/shapes_sr64 --prompt "a small blue square" \
        --outdir out/cascade

The ablation without augmentation: --config.sr.max_train_level=0.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import shapes  # noqa: E402


def get_config():
    config = shapes.get_config()
    config.family = "super_resolution"
    config.data.image_size = 64
    config.sr = ml_collections.ConfigDict(dict(
        low_res_size=16,          # the base stage's output size
        max_train_level=0.999,    # s ~ U[0, max): 0 trains without augmentation
        train_levels="example",   # one level per example ("batch": one per batch)
        train_crop=32))           # trained on random 32x32 crops (and their 8x8 inputs), as
                                  # Imagen's SR stages are; sampled on the whole 64x64 image
    # v-prediction (Salimans & Ho 2022): at high noise x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v
    # is the network's own output, not eps amplified by 1 / sqrt(abar). With eps (measured here,
    # 1500 steps) x0_hat at t = 900 was 5x worse than the bilinear upsample of the input, and
    # sampled images ignored it; the SR stage must read its input exactly where x_t is noise.
    config.diffusion.prediction = "v"
    u = config.model.unet
    u.channels = 32
    u.channel_mult = (1, 1, 2, 2)  # 64, 32, 16, 8
    u.num_res_blocks = 1
    u.attention_levels = (3,)      # cross-attention on the caption at 8x8
    u.num_heads = 4
    u.num_groups = 8
    tr = config.train
    tr.batch_size = 16
    tr.num_steps = 2500
    tr.learning_rate = 1e-3
    tr.warmup_steps = 100
    tr.checkpoint_every = 500
    tr.sample_every = 1000
    tr.samples_per_prompt = 4
    s = config.sample
    s.num_steps = 20
    s.guidance_weight = 1.0
    s.aug_level = 0.2              # Imagen's sampling level (0.1-0.3)
    return config
