"""Fine-tune a Stable Diffusion 1.x / 2.x folder (diffusers layout) on your own captioned images:
the folder's UNet trained on its frozen VAE's latents and CLIP text features, with the folder's
scheduler (betas, eps or v), by the one training loop (sharded, fsdp, exact resume).

    python -m t2i_jax.data.prepare --config configs/sd_finetune.py \\
        --config.data.path=DATA --config.model.pretrained=SD_FOLDER
    python train.py --config configs/sd_finetune.py --workdir runs/sd_ft \\
        --config.data.path=DATA --config.model.pretrained=SD_FOLDER
    python sample.py --workdir runs/sd_ft --prompt "a photo of ..."
    python -m t2i_jax.export --workdir runs/sd_ft --out runs/sd_ft_diffusers

LoRA: --config.train.lora.rank=4 (alpha defaults to the rank; targets the attention projections).
Data: data.name "imagefolder" (images + metadata.jsonl/csv with file_name and text) or
"webdataset" (.tar shards, KEY.jpg + KEY.txt or KEY.json); see README, "Your own data".
"""

import os
import sys

from ml_collections import config_dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import base  # noqa: E402


def get_config():
    config = base.get_config()
    config.family = "stable_diffusion"
    d = config.data
    d.name = "imagefolder"
    d.image_size = 512
    d.channels = 3
    d.resize = "bicubic"
    config.model = config_dict.ConfigDict(dict(
        pretrained=config_dict.placeholder(str),   # the diffusers folder (model_index.json)
        dtype="bfloat16",                          # the UNet's compute; master weights float32
        remat=True))                               # blocks recomputed in the backward pass
    del config["diffusion"]                        # the folder's scheduler_config.json decides
    tr = config.train
    tr.batch_size = 8
    tr.num_steps = 2000
    tr.learning_rate = 1e-5
    tr.warmup_steps = 100
    tr.grad_clip = 1.0
    tr.weight_decay = 1e-2
    tr.p_uncond = 0.1                 # CFG dropout to the encoding of "" (SD's own 10%)
    tr.loss_weighting = "uniform"     # or "min_snr" (Hang et al. 2023, gamma min_snr_gamma)
    tr.ema_decay = 0.9999
    tr.checkpoint_every = 500
    tr.sample_every = 500
    tr.samples_per_prompt = 2
    tr.text_cache = False             # CLIP features of every caption, once
    tr.latent_cache = False           # VAE posterior moments of every image, once
    tr.latent_cache_dir = config_dict.placeholder(str)
    tr.lora = config_dict.ConfigDict(dict(rank=0, alpha=0.0,   # rank 0: full fine-tuning
                                          targets=("to_q", "to_k", "to_v", "to_out.0")))
    s = config.sample
    s.sampler = config_dict.placeholder(str)       # None: the folder scheduler's class
    s.num_steps = 50
    s.guidance_weight = 6.5                        # diffusers' guidance_scale 7.5
    s.thresholding = "none"
    return config
