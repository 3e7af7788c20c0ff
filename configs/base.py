"""Base configuration: every experiment config starts from this one and overrides fields.

Read once and turned into typed dataclasses where it enters the library
(`ModelConfig.from_config(config.model)`); nothing reads it as a global.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0
    # t2i_jax/families: "diffusion" (this file's model), "noisy_classifier" (ADM's guide) or
    # "contrastive" (a CLIP for SDG guidance and scoring); one training loop trains each.
    config.family = "diffusion"

    # t2i_jax/data: embedded "digits" / "shapes", a TFDS catalog name (needs a network once), or
    # your own images: "imagefolder" / "webdataset" read from `path`, prepared once into data_dir
    # (python -m t2i_jax.data.prepare --config ... --config.data.path=DIR; data/user_data.py)
    config.data = ml_collections.ConfigDict(dict(
        name="shapes", image_size=32, channels=3,
        data_dir=config_dict.placeholder(str),  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
        random_flip=False,
        caption="random",
        # imagefolder: a folder of images + metadata.jsonl/csv (file_name, caption column);
        # webdataset: a folder of .tar shards, one .tar, DIR/part-{00000..00099}.tar or a glob
        path=config_dict.placeholder(str),
        caption_key=config_dict.placeholder(str),     # None: "text" / webdataset's json "caption"
        min_image_size=config_dict.placeholder(int),  # smaller images are skipped; None: image_size
        max_bad_fraction=0.05,    # more bad records (undecodable, uncaptioned, small): refused
        test_fraction=0.05))      # held out by a hash of the key (grids' prompts come from them)

    config.model = ml_collections.ConfigDict(dict(
        unet=dict(
            out_channels=3, channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
            attention_levels=(1, 2), mid_attention=True, num_heads=8, head_dim=None,
            num_groups=32, dropout=0.0, num_classes=None, attention_impl="einsum",
            dtype="float32", remat=False),
        # "unet" (above) or "dit": a Diffusion Transformer with adaLN-Zero blocks and
        # cross-attention to the text (Peebles & Xie 2023; PixArt-alpha; models/dit.py)
        backbone="unet",
        dit=dict(
            out_channels=3, patch_size=2, width=384, depth=12, num_heads=6, mlp_ratio=4.0,
            num_classes=None, freq_dim=256, dropout=0.0, attention_impl="einsum",
            dtype="float32", remat=False, scan=True, conv_stem=0, conv_head=0),
        text=dict(max_length=16, width=128, num_layers=2, num_heads=4, mlp_ratio=4,
                  attention_impl="einsum", dtype="float32"),
        null="empty_prompt",      # or "learned": see t2i_jax/conditioning/
        pooled_text=True,
        # "trained": the byte encoder above, trained with the UNet (GLIDE); "t5" / "clip": a
        # frozen pretrained encoder read from `path`, a local directory in the Hugging Face
        # layout (replaces `text`; t2i_jax/families/frozen_text.py)
        text_encoder=dict(kind="trained", path=config_dict.placeholder(str),
                          max_length=config_dict.placeholder(int), dtype="float32"),
        # GLIDE's inpainting model: input [x_t, image * mask, mask], trained on random boxes
        # and free-form masks; sampled with sample.py --inpaint (t2i_jax/diffusion/inpainting.py)
        inpaint=False,
    ))

    config.diffusion = ml_collections.ConfigDict(dict(
        # "vp": DDPM's process on `schedule`, predicting `prediction`; "flow": flow matching's
        # linear path x = (1 - tau) x0 + tau eps, predicting u = eps - x0 (or x0 itself with
        # prediction="x0", JiT's x-prediction with the velocity's loss), tau drawn by
        # `flow_time` ("logit_normal" (SD3): sigmoid(N(flow_logit_mean, flow_logit_std)), or
        # "uniform") and shifted by `shift` in training and sampling (SD3's resolution shift;
        # t2i_jax/diffusion/flow.py); schedule and zero_terminal_snr are then unused
        process="vp", flow_time="logit_normal", flow_logit_mean=0.0, flow_logit_std=1.0,
        shift=1.0,
        schedule="linear", num_timesteps=1000, zero_terminal_snr=False, prediction="eps",
        # Improved DDPM's learned variance (2C output channels: set model.unet.out_channels), trained
        # with L_hybrid = L_simple + lambda_vlb L_vlb (t2i_jax/diffusion/vlb.py)
        learn_sigma=False, lambda_vlb=0.001))

    config.train = ml_collections.ConfigDict(dict(
        batch_size=16,            # global: divided over all devices (and hosts)
        num_steps=10_000,
        # optax AdamW with linear warm-up, then "constant" or "cosine" decay to end_lr_factor * lr
        learning_rate=1e-4, warmup_steps=500, lr_schedule="constant", end_lr_factor=0.0,
        weight_decay=0.0, adam_b1=0.9, adam_b2=0.999, grad_clip=1.0,
        p_uncond=0.1,             # CFG condition dropout (Ho & Salimans 2022)
        loss_weighting="uniform", min_snr_gamma=5.0,
        ema_decay=0.9999, ema_warmup=True,   # decay_t = min(decay, (1 + t) / (10 + t))
        fsdp=1,                   # devices per parameter shard ("fsdp" mesh axis); 1: replicate
        checkpoint_every=1000,
        keep_checkpoints=3,       # the newest k checkpoints are kept; 0 keeps every one
        log_every=50,             # metrics.jsonl / TensorBoard / progress bar
        sample_every=1000,        # PNG grid from the EMA parameters, and at the end (0: none)
        samples_per_prompt=8,
        # the grids' prompts, e.g. --config.train.grid_prompts="('a red car', 'a cat')";
        # None: the data's sample_prompts
        grid_prompts=config_dict.placeholder(tuple),
        # a frozen text encoder's features of every training caption, computed once (Imagen)
        text_cache=False, text_cache_dir=config_dict.placeholder(str)))

    config.sample = ml_collections.ConfigDict(dict(
        sampler="ddim", num_steps=50, guidance_weight=3.0, eta=0.0,
        # x0_hat clipped to [-1, 1] each step (DDPM/ADM's clip_denoised), "dynamic" (Imagen) or
        # "none". Pixel models need it: a trailing-spaced chain starts at abar_T ~ 1e-8, where
        # x0_hat = (x - sqrt(1 - abar) eps_hat) / sqrt(abar) magnifies eps_hat's error ~1e4 times.
        thresholding="static",
        dynamic_percentile=0.995))  # Imagen's p: s = max(1, quantile(|x0_hat|, p)) per image
    return config
