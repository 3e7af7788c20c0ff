"""What every autoencoder config shares (configs/shapes64_ae.py, configs/digits_ae.py): the
family, the model section, and LDM's loss settings with this project's optimizer defaults."""

import ml_collections


def make(config, *, ae: dict, discriminator: dict, batch_size: int, num_steps: int,
         scale_images: int, every: int):
    """Turns a data set's config into an autoencoder config (in place, and returns it)."""
    config.family = "autoencoder"
    config.model = ml_collections.ConfigDict(dict(ae=ae, discriminator=discriminator))
    tr = config.train
    tr.batch_size = batch_size
    tr.num_steps = num_steps
    tr.learning_rate = 1e-3
    tr.warmup_steps = 100
    tr.lr_schedule = "cosine"
    tr.end_lr_factor = 0.1
    tr.grad_clip = 0.0            # the loss is a sum over the image's values: Adam normalises it
    tr.ema_decay = 0.999
    tr.kl_weight = 1e-6           # LDM's kl_weight
    tr.logvar_init = 0.0
    tr.disc_weight = 0.0          # LDM: 0.5, from disc_start (the discriminator section is then used)
    tr.disc_start = 0
    tr.scale_images = scale_images  # training images of the scale-factor pass
    tr.checkpoint_every = every
    tr.sample_every = every
    return config
