"""What the unCLIP configs share (Ramesh et al. 2022): a prior from a caption to a frozen CLIP's
image embedding, and a decoder from that embedding (and the caption) to an image.

    prior(base):   family "prior"; model = {clip: the CLIP's workdir, prior: the transformer}
    decoder(base): family "decoder"; base's UNet and text encoder, model.clip, both dropouts

Both name their CLIP by `config.model.clip` (override with --config.model.clip=DIR); a prior
and a decoder sampled together must share it (sample.py refuses otherwise)."""

import ml_collections


def prior(config, clip: str, *, width=128, num_layers=4, num_heads=4, num_steps=3000):
    config.family = "prior"
    config.model = ml_collections.ConfigDict(dict(
        clip=clip,
        prior=dict(width=width, num_layers=num_layers, num_heads=num_heads, mlp_ratio=4,
                   causal=True, dropout=0.0)))
    config.diffusion.schedule = "cosine"      # unCLIP's prior: cosine, T = 1000, x0 target
    config.diffusion.num_timesteps = 1000
    config.diffusion.prediction = "x0"
    tr = config.train
    tr.batch_size = 64
    tr.num_steps = num_steps
    tr.learning_rate = 3e-4
    tr.warmup_steps = 200
    tr.lr_schedule = "cosine"
    tr.end_lr_factor = 0.1
    tr.weight_decay = 0.0
    tr.p_uncond = 0.1                         # text dropout for classifier-free guidance
    tr.ema_decay = 0.999
    tr.checkpoint_every = 1000
    tr.sample_every = 0                       # it draws embeddings, not images
    s = config.sample
    s.sampler = "ddim"
    s.num_steps = 64                          # unCLIP samples its prior with 64 strided steps
    s.eta = 0.0
    s.thresholding = "none"                   # x0 is an embedding, not pixels
    s.guidance_weight = 1.0
    s.prior_candidates = 2                    # keep the one closest to the text embedding
    return config


def decoder(config, clip: str, *, embedding_tokens=4):
    config.family = "decoder"
    config.model.clip = clip
    config.model.embedding_tokens = embedding_tokens
    config.train.p_image = 0.1                # the CLIP embedding set to zero 10% of the time
    config.train.p_text = 0.5                 # the caption dropped 50% of the time
    return config
