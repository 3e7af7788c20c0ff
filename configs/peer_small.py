"""The reference shape of ../shared/peer (diffusers' UNet2DConditionModel, small): 32x32x3 images,
channels (64, 128, 128), 2 residual blocks per level, self- and cross-attention with 8 heads at
the two lower resolutions and in the middle, text tokens of width 128 and length 16."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import base  # noqa: E402


def get_config():
    config = base.get_config()
    config.data.image_size = 32
    config.model.unet.channels = 64
    config.model.unet.channel_mult = (1, 2, 2)
    config.model.unet.num_res_blocks = 2
    config.model.unet.attention_levels = (1, 2)
    config.model.unet.mid_attention = True
    config.model.unet.num_heads = 8
    config.model.text.width = 128
    config.model.text.max_length = 16
    return config
