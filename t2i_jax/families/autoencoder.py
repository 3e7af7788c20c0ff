"""The autoencoder family: latent diffusion's KL autoencoder (Rombach et al. 2022; CompVis/
latent-diffusion, ldm/modules/losses/contperceptual.py's LPIPSWithDiscriminator without LPIPS),
the first of latent diffusion's two trained parts.

Per step, with q(z | x) = N(mean, exp(logvar)) from the encoder and z ~ q (its own stream):
  nll  = sum over pixels of |x - D(z)| / exp(s) + s     (L1 as a Laplace-like NLL with one
         learned log-variance s, LDM's `logvar`, initialised to train.logvar_init)
  kl   = KL(q(z | x) || N(0, I)), summed over the latent
  loss = nll + train.kl_weight * kl                       (LDM: 1e-6)
per example: sums over pixels and latents, the mean over the batch, as LDM (its losses are
torch.sum(...) / batch); a mean over pixels would weigh the KL 12288 times more at 64x64x3.

With train.disc_weight > 0, LDM's patch-GAN hinge joins after train.disc_start steps:
  generator      + lambda * g,  g = -mean(D(x_hat)) (the discriminator's parameters held fixed)
  adaptive       lambda = disc_weight * ||grad_W nll|| / (||grad_W g|| + 1e-4), clipped to
                 [0, 1e4] and held fixed, W the decoder's last conv kernel
  discriminator  + 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))), x_hat held fixed
LDM alternates a generator and a discriminator optimizer on each batch; here both terms are one
loss whose gradients reach disjoint parameters (each term holds the other's part fixed), so one
AdamW step updates both (Adam is per parameter: the same as two optimizers with one schedule).

At the end of training the loop stores `final_statistics` with the checkpoint: the scale factor
1 / std(z), z sampled from the posteriors (not their means) of train.scale_images training
images (LDM's scale_by_std; 0.18215 for Stable Diffusion's VAE), and the latents' moments.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.conditioning import Conditioning
from t2i_jax.diffusion import noise
from t2i_jax.families.base import Family, image_shape
from t2i_jax.models.autoencoder import (Autoencoder, AutoencoderConfig, DiscriminatorConfig,
                                        PatchDiscriminator, Posterior, conv_out_apply, latent_shape)

_POSTERIOR = 0          # stream of the step's key: z ~ q(z | x)
SCALE_STREAM = 8        # the scale-factor pass: fold_in(key(seed), 8), per image by its index
SCALE_BATCH = 256
PREVIEW_IMAGES = 8


@dataclasses.dataclass(frozen=True)
class AELossConfig:
    kl_weight: float = 1e-6
    logvar_init: float = 0.0
    disc_weight: float = 0.0     # 0: no adversarial term (and no discriminator)
    disc_start: int = 0          # steps before the adversarial term joins
    scale_images: int = 2048     # training images of the scale-factor pass

    @classmethod
    def from_config(cls, train) -> "AELossConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in dict(train).items() if k in names})
        if cfg.kl_weight < 0 or cfg.disc_weight < 0 or cfg.disc_start < 0 or cfg.scale_images < 1:
            raise ValueError("train.kl_weight, train.disc_weight and train.disc_start must be "
                             ">= 0 and train.scale_images >= 1.")
        return cfg


def autoencoder_config(config) -> AutoencoderConfig:
    m = config.get("model", None)
    if m is None or "ae" not in m:
        raise ValueError("an autoencoder config needs model.ae (factor, latent_channels, channels, "
                         "channel_mult, num_res_blocks, num_groups): see configs/shapes64_ae.py.")
    ae = dict(m.ae)
    ae.setdefault("out_channels", config.data.channels)
    if ae["out_channels"] != config.data.channels:
        raise ValueError(f"model.ae.out_channels={ae['out_channels']} must equal data.channels="
                         f"{config.data.channels}.")
    return AutoencoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ae.items()})


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """LDM's hinge loss of the discriminator, per example [B] (logits [B, h, w])."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real), axis=(1, 2))
                  + jnp.mean(jax.nn.relu(1.0 + logits_fake), axis=(1, 2)))


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
    """LDM's calculate_adaptive_weight: ||grad nll|| / (||grad g|| + 1e-4), clipped to [0, 1e4],
    times disc_weight, with no gradient of its own."""
    w = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(g_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4) * disc_weight)


@dataclasses.dataclass
class AutoencoderFamily(Family):
    model: Autoencoder = None
    discriminator: PatchDiscriminator = None
    loss_cfg: AELossConfig = None

    name = "autoencoder"

    def not_generator_hint(self, workdir: str) -> str:
        return (" An autoencoder is half of a latent model: train one on it (configs/"
                "shapes64_ldm.py with --config.model.autoencoder=" + workdir + ") and sample "
                "that.")
    batch_keys = ("image",)

    @classmethod
    def from_config(cls, config) -> "AutoencoderFamily":
        ae = autoencoder_config(config)
        latent_shape(ae, config.data.image_size)  # refuses a size that f does not divide
        loss_cfg = AELossConfig.from_config(config.train)
        disc = None
        if loss_cfg.disc_weight > 0:
            d = dict(config.model.get("discriminator", {}))
            disc = PatchDiscriminator(DiscriminatorConfig(**d))
        return cls(config=config, conditioning=Conditioning("none", dataset=config.data.name),
                   image_shape=image_shape(config), model=Autoencoder(ae), discriminator=disc,
                   loss_cfg=loss_cfg)

    @property
    def ae_config(self) -> AutoencoderConfig:
        return self.model.cfg

    @property
    def latent_shape(self) -> tuple:
        return latent_shape(self.ae_config, self.image_shape[0])

    def init_params(self, key: jax.Array):
        x = jnp.zeros((1,) + self.image_shape, jnp.float32)
        k_ae, k_d = jax.random.split(key)
        params = {"autoencoder": self.model.init(k_ae, x, k_ae)["params"],
                  "logvar": jnp.full((), self.loss_cfg.logvar_init, jnp.float32)}
        if self.discriminator is not None:
            params["discriminator"] = self.discriminator.init(k_d, x)["params"]
        return {"params": params}

    # --- the parts, for the latent family, sampling and evaluation --------------------------
    def encode(self, params, x: jax.Array) -> Posterior:
        return self.model.apply({"params": params["params"]["autoencoder"]}, x,
                                method=Autoencoder.encode)

    def decode(self, params, z: jax.Array) -> jax.Array:
        return self.model.apply({"params": params["params"]["autoencoder"]}, z,
                                method=Autoencoder.decode)

    def reconstruct(self, params, x: jax.Array) -> jax.Array:
        """D(mean of q(z | x)): the deterministic reconstruction (previews, evaluation)."""
        return self.decode(params, self.encode(params, x).mean)

    # --- training ------------------------------------------------------------------------
    def hparams(self) -> dict:
        return dict(kl_weight=jnp.asarray(self.loss_cfg.kl_weight, jnp.float32))

    def loss(self, params, batch: dict, key: jax.Array, hp: dict):
        x = batch["image"]                                                   # [B, H, W, C]
        p = params["params"]
        post = self.encode(params, x)
        z = post.sample(jax.random.fold_in(key, _POSTERIOR))
        h = self.model.apply({"params": p["autoencoder"]}, z, method=Autoencoder.decode_features)
        conv = p["autoencoder"]["conv_out"]
        logvar = p["logvar"]

        def nll_of(x_hat):                                                   # [B]
            rec = jnp.abs(x - x_hat)
            return jnp.sum(rec / jnp.exp(logvar) + logvar, axis=(1, 2, 3))

        x_hat = conv_out_apply(self.ae_config, conv, h)
        nll, kl = nll_of(x_hat), post.kl()
        per_example = nll + hp["kl_weight"] * kl
        metrics = dict(nll=jnp.mean(nll), kl=jnp.mean(kl), logvar=logvar,
                       l1=jnp.mean(jnp.abs(x - x_hat)))
        if self.discriminator is not None:
            per_example, gan = self._adversarial(p, x, h, x_hat, conv, nll_of, per_example, hp)
            metrics.update(gan)
        return per_example, metrics

    def _adversarial(self, p, x, h, x_hat, conv, nll_of, per_example, hp):
        c = self.loss_cfg
        disc = lambda dp, img: self.discriminator.apply({"params": dp}, img)  # noqa: E731
        d_fixed = jax.lax.stop_gradient(p["discriminator"])
        g = -jnp.mean(disc(d_fixed, x_hat), axis=(1, 2))                    # [B]
        h_fixed = jax.lax.stop_gradient(h)
        at = lambda k: conv_out_apply(self.ae_config, dict(conv, kernel=k), h_fixed)  # noqa: E731
        nll_grad = jax.grad(lambda k: jnp.mean(nll_of(at(k))))(conv["kernel"])
        g_grad = jax.grad(lambda k: -jnp.mean(disc(d_fixed, at(k))))(conv["kernel"])
        weight = adaptive_weight(nll_grad, g_grad, c.disc_weight)
        factor = (hp["step"] >= c.disc_start).astype(jnp.float32)
        logits_real = disc(p["discriminator"], jax.lax.stop_gradient(x))
        logits_fake = disc(p["discriminator"], jax.lax.stop_gradient(x_hat))
        d_loss = hinge_d_loss(logits_real, logits_fake)
        per_example = per_example + factor * (weight * g + d_loss)
        return per_example, dict(g_loss=jnp.mean(g), d_loss=jnp.mean(d_loss), d_weight=weight,
                                 disc_factor=factor, logits_real=jnp.mean(logits_real),
                                 logits_fake=jnp.mean(logits_fake))

    # --- what the loop stores and previews -----------------------------------------------
    def final_statistics(self, params) -> dict:
        """The scale factor and the latents' moments from one pass over training images (JSON)."""
        from t2i_jax import data as data_lib
        split = data_lib.get_spec(self.config.data.name).splits[0]
        images = data_lib.load_split(self.config.data, split, max_examples=None,
                                     limit=self.loss_cfg.scale_images)["image"]
        return latent_statistics(self, params, images, jax.random.fold_in(
            jax.random.key(self.config.seed), SCALE_STREAM))

    preview_rows = 2

    def preview(self, params) -> jax.Array:
        """The progress grid's images [2N, H, W, C] in [-1, 1] (preview_rows rows): the first
        test images above their reconstructions."""
        x = jnp.asarray(self._preview_images())
        return jnp.concatenate([x, jnp.clip(self.reconstruct(params, x), -1, 1)])

    def _preview_images(self):
        if not hasattr(self, "_preview_cache"):
            from t2i_jax import data as data_lib
            split = data_lib.get_spec(self.config.data.name).splits[1]
            self._preview_cache = data_lib.load_split(self.config.data, split,
                                                      limit=PREVIEW_IMAGES)["image"]
        return self._preview_cache

    def next_command(self, workdir: str) -> str:
        import shlex
        return (f"python -m t2i_jax.evaluation.reconstruct --workdir {shlex.quote(workdir)}"
                "   (then train a latent model on it: python train.py --config "
                f"configs/shapes64_ldm.py --config.model.autoencoder={shlex.quote(workdir)} ...)")


def sample_latents(family: AutoencoderFamily, params, images: np.ndarray, key: jax.Array,
                   batch: int = SCALE_BATCH):
    """(z [N, h, w, c] sampled from each image's posterior, means [N, h, w, c]) as float64, image
    i's noise from fold_in by its index i (the same for any batch size)."""
    enc = jax.jit(lambda p, x, ids: posterior_latents(family, p, x, key, ids))
    zs, means = [], []
    for s in range(0, len(images), batch):
        x = jnp.asarray(images[s:s + batch])
        z, m = enc(params, x, jnp.arange(s, s + len(x), dtype=jnp.int32))
        zs.append(np.asarray(z, np.float64))
        means.append(np.asarray(m, np.float64))
    return np.concatenate(zs), np.concatenate(means)


def posterior_latents(family, params, x, key, ids):
    """(z sampled from q(z | x) with image i's noise from `key` by its id ids[i], the mean)."""
    post = family.encode(params, x)
    eps = noise.initial_noise(key, post.mean.shape, ids)
    return post.mean + post.std * eps, post.mean


def latent_statistics(family: AutoencoderFamily, params, images: np.ndarray, key: jax.Array) -> dict:
    """LDM's scale_by_std on `images`: scale_factor = 1 / std of the sampled latents (torch's
    unbiased std over every element), with the moments beside it (JSON-ready)."""
    z, means = sample_latents(family, params, images, key)
    std = float(np.std(z, ddof=1))
    return dict(scale_factor=1.0 / std, latent_std=std, latent_mean=float(np.mean(z)),
                posterior_mean_std=float(np.std(means, ddof=1)),
                channel_std=[float(v) for v in np.std(z, axis=(0, 1, 2), ddof=1)],
                channel_mean=[float(v) for v in np.mean(z, axis=(0, 1, 2))],
                num_images=int(len(images)), latent_shape=list(z.shape[1:]))
