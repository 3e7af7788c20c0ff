"""Tiny configs of every family on the embedded digits (seconds per run), for the tests that
every family must pass (tests/test_families.py) and the guide tests (tests/test_guides.py).

    get_config("diffusion" | "uncond" | "noisy_classifier" | "contrastive" | "super_resolution"
               | "base8" | "autoencoder" | "latent_diffusion" | "prior" | "decoder"
               | "frozen_t5" | "learned_sigma_inpaint" | "flow" | "dit")

"base8" is the tiny diffusion model on the 8x8 digits (the scans' own size), the base of the
tiny cascade: "super_resolution" takes its 8x8 images to 16x16.

"autoencoder" (16x16x1 -> 8x8x2, with the patch-GAN from step 2, so the shared tests cover it)
and "latent_diffusion" on a trained tiny autoencoder, whose workdir is $T2I_TEST_AUTOENCODER
(tests/conftest.py's tiny_autoencoder fixture sets it; subprocesses inherit it).

"prior" and "decoder" (unCLIP) read the frozen tiny CLIP of $T2I_TEST_CLIP (the tiny_clip
fixture: "contrastive" trained 40 steps).

"frozen_t5" is the tiny diffusion model on shapes (32x32 RGB) conditioned on the frozen tiny
random T5 of $T2I_TEST_T5 (the tiny_t5 fixture, written in the publisher's layout), encoded in
the step.

"learned_sigma_inpaint" is the tiny diffusion model with IDDPM's learned variance (L_hybrid, 2C
output channels) and GLIDE's mask-conditioned input (random boxes and strokes), both at once.

"dit" is the tiny diffusion model with a DiT backbone (models/dit.py: 2 scanned blocks of width
64, cross-attention to the text, a conv stem and head) in place of the UNet; wide enough that
fsdp splits its stack. It trains with flow matching (diffusion/flow.py, shift 2), so the shared
tests cover all of these. (It predicts u: after a few steps an x0-predicting model's samples
are nearly its mean image, which would make the device-invariance test trivially true.)
"flow" is the tiny UNet model with flow matching alone.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny_config  # noqa: E402

ENCODER = dict(out_channels=1, channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attention_levels=(), mid_attention=False, num_heads=2, num_groups=4, dropout=0.0)


SD_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sd", "tiny_sd1")


def sd_config():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
    import sd_finetune
    return sd_finetune.get_config()


def get_config(name="diffusion"):
    config = tiny_config.get_config()
    if name == "uncond":
        config.model.text = None
        config.train.p_uncond = 0.0
        config.sample.guidance_weight = 0.0
    elif name == "noisy_classifier":
        config.family = name
        config.model = ml_collections.ConfigDict(dict(encoder=dict(ENCODER)))
    elif name == "contrastive":
        config.family = name
        config.model = ml_collections.ConfigDict(dict(
            image=dict(ENCODER), embed_dim=16,
            text=dict(max_length=32, width=16, num_layers=1, num_heads=2, mlp_ratio=2,
                      attention_impl="einsum", dtype="float32")))
        config.train.clean_fraction = 0.25
    elif name == "super_resolution":
        config.family = name
        config.sr = ml_collections.ConfigDict(dict(
            low_res_size=8, max_train_level=0.999, train_levels="example", train_crop=8))
        config.sample.aug_level = 0.2
        config.sample.guidance_weight = 1.0
    elif name == "base8":
        config.data.image_size = 8
    elif name == "autoencoder":
        config.family = name
        config.model = ml_collections.ConfigDict(dict(
            ae=dict(factor=2, latent_channels=2, channels=8, channel_mult=(1, 2),
                    num_res_blocks=1, num_groups=4),
            discriminator=dict(channels=8, num_layers=1)))
        tr = config.train
        tr.grad_clip = 0.0
        tr.kl_weight = 1e-6
        tr.logvar_init = 0.0
        tr.disc_weight = 0.5
        tr.disc_start = 2
        tr.scale_images = 64
    elif name == "latent_diffusion":
        config.family = name
        config.model.autoencoder = os.environ.get("T2I_TEST_AUTOENCODER", "")
        config.model.unet.out_channels = 2
        config.latent = ml_collections.ConfigDict(dict(scale_by_std=True))
        config.sample.thresholding = "none"
        config.diffusion.prediction = "v"  # as configs/shapes64_ldm.py: x0_hat unclipped
    elif name == "frozen_t5":
        config.data.name = "shapes"        # the captions the tiny T5's SentencePiece model knows
        config.data.image_size = 32
        config.data.channels = 3
        config.model.unet.out_channels = 3
        config.model.text = None
        config.model.text_encoder = ml_collections.ConfigDict(dict(
            kind="t5", path=os.environ.get("T2I_TEST_T5", ""), max_length=32, dtype="float32"))
    elif name == "prior":
        config.family = name
        config.model = ml_collections.ConfigDict(dict(
            clip=os.environ.get("T2I_TEST_CLIP", ""),
            prior=dict(width=16, num_layers=2, num_heads=2, mlp_ratio=2, causal=True)))
        config.diffusion.prediction = "x0"
        config.sample.thresholding = "none"
        config.sample.guidance_weight = 1.0
        config.sample.prior_candidates = 2
    elif name == "decoder":
        config.family = name
        config.model.clip = os.environ.get("T2I_TEST_CLIP", "")
        config.model.embedding_tokens = 2
        config.train.p_text = 0.5
        config.train.p_image = 0.1
        config.sample.guidance_weight = 1.0
    elif name == "flow":
        # flow matching (diffusion/flow.py): logit-normal time, shifted, Euler's sampler
        config.diffusion.process = "flow"
        config.diffusion.shift = 2.0
        config.sample.sampler = "euler"
        config.sample.thresholding = "none"
    elif name == "learned_sigma_inpaint":
        # IDDPM's learned variance (L_hybrid) and GLIDE's mask-conditioned input, together
        config.diffusion.learn_sigma = True
        config.model.unet.out_channels = 2 * config.data.channels
        config.model.inpaint = True
        config.sample.sampler = "ddpm"
        config.sample.ddpm_variance = "learned"
    elif name == "dit":
        config.model.backbone = "dit"
        config.model.dit.update(dict(out_channels=1, patch_size=2, width=64, depth=2,
                                     num_heads=2, freq_dim=32, conv_stem=4, conv_head=4))
        # and flow matching's process: the shared tests cover every new path in one entry
        config.diffusion.process = "flow"
        config.diffusion.shift = 2.0
        config.sample.sampler = "euler"
    elif name in ("sd_finetune", "sd_lora"):
        # the tiny SD 1.x folder (tests/fixtures/sd) fine-tuned on the digits as 64x64 RGB:
        # full (bf16 compute, remat, the VAE and CLIP frozen in the step) or LoRA (rank 2)
        sd = sd_config()
        for key in ("data", "model", "sample"):
            sd[key].update(config[key].to_dict() if key == "data" else {})
        sd.data.update(dict(name="digits", image_size=64, channels=3, data_dir=None))
        sd.model.pretrained = SD_FOLDER
        sd.train.update({k: config.train[k] for k in (
            "batch_size", "num_steps", "learning_rate", "warmup_steps", "lr_schedule",
            "checkpoint_every", "log_every", "sample_every", "samples_per_prompt")})
        sd.sample.num_steps = 3
        # float32 and no remat: the shared tests' properties do not depend on them, and they
        # cost compile time here (test_sd_finetune.py checks bf16 and remat's gradients)
        sd.model.dtype = "float32"
        sd.model.remat = False
        if name == "sd_lora":
            sd.train.lora.rank = 2
            sd.train.lora.alpha = 3.0
        return sd
    elif name == "webdataset":
        # the tiny diffusion model on a user's webdataset shards ($T2I_TEST_WEBDATASET, the
        # tiny_webdataset_source fixture): the data iterator's guarantees for a user source
        config.data.name = "webdataset"
        config.data.path = os.environ.get("T2I_TEST_WEBDATASET", "")
    elif name != "diffusion":
        raise ValueError(name)
    return config
