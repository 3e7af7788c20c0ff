"""Base configuration: every experiment config starts from this one and overrides fields.

Read once and turned into typed dataclasses where it enters the library
(`ModelConfig.from_config(config.model)`); nothing reads it as a global.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict(dict(image_size=32, channels=3))

    config.model = ml_collections.ConfigDict(dict(
        unet=dict(
            out_channels=3, channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
            attention_levels=(1, 2), mid_attention=True, num_heads=8, head_dim=None,
            num_groups=32, dropout=0.0, num_classes=None, attention_impl="einsum",
            dtype="float32", remat=False),
        text=dict(max_length=16, width=128, num_layers=2, num_heads=4, mlp_ratio=4,
                  attention_impl="einsum", dtype="float32"),
        null="empty_prompt",      # or "learned": see t2i_jax/conditioning.py
        pooled_text=True,
    ))

    config.diffusion = ml_collections.ConfigDict(dict(
        schedule="linear", num_timesteps=1000, zero_terminal_snr=False, prediction="eps"))

    config.train = ml_collections.ConfigDict(dict(
        batch_size=16, learning_rate=1e-4, weight_decay=0.0, p_uncond=0.1))

    config.sample = ml_collections.ConfigDict(dict(
        sampler="ddim", num_steps=50, guidance_weight=3.0))
    return config
