"""The diffusion family: a Denoiser trained with the eps (or x0 / v) loss of DDPM on q_sample
draws, with classifier-free guidance's condition dropout (Ho et al. 2020; Ho & Salimans 2022).

Its condition is text, a class label or nothing (`config.model`: text=None and
model.<backbone>.num_classes=None make an unconditional model, as ADM and SDG guide). Text goes through the
byte-level encoder trained with the UNet (GLIDE), or a frozen pretrained T5 or CLIP
(`config.model.text_encoder`, families/frozen_text.py: Imagen, Stable Diffusion).

Per step (key = fold_in(root, step), each purpose its own stream):
  t ~ U{0..T-1}, noise ~ N(0, I), x_t = q_sample(x0, t, noise), cond -> null with probability
  p_uncond, loss = weighted MSE of the model's output against the target.
Options:
  diffusion.learn_sigma: the model also outputs v (2C channels) and the variance
    exp(frac log beta_t + (1 - frac) log beta~_t), frac = (v + 1) / 2, trained by Improved DDPM's
    L_hybrid = L_simple + lambda L_vlb (diffusion.lambda_vlb = 0.001; diffusion/vlb.py).
  model.inpaint: GLIDE's inpainting model, input [x_t, x0 * mask, mask] with a random box or
    free-form mask per example (diffusion/inpainting.py); CFG drops the text, never the mask.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from t2i_jax import conditioning
from t2i_jax.conditioning import Condition, Conditioning
from t2i_jax.diffusion import flow, forward, inpainting, losses, make_schedule, samplers, vlb
from t2i_jax.diffusion.schedules import Schedule
from t2i_jax.families.base import (PIXEL_THRESHOLDS, Family, image_shape, quarter_means,
                                   thresholding_refusal)
from t2i_jax.families.frozen_text import FrozenText, TextEncoderConfig
from t2i_jax.models.denoiser import Denoiser, Encoded, ModelConfig

GRID_IMAGES = 8  # test images a conditioned family's progress grid shows

# Streams of the per-step key: never reused for two purposes.
_T, _NOISE, _DROP, _DROPOUT, _MASK = 0, 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class LossConfig:
    prediction: str = "eps"
    weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    p_uncond: float = 0.1
    learn_sigma: bool = False   # IDDPM's learned variance, trained with L_hybrid
    lambda_vlb: float = vlb.LAMBDA_VLB


PROCESSES = ("vp", "flow")


def schedule_of(config) -> Schedule:
    """The diffusion schedule of `config.diffusion` (shared with the guides trained for it):
    the flow path's (diffusion.process="flow"), or a VP beta schedule."""
    d = config.diffusion
    if d.get("process", "vp") == "flow":
        return make_schedule("flow", d.num_timesteps)
    return make_schedule(d.schedule, d.num_timesteps, zero_terminal_snr=d.zero_terminal_snr)


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """Flow matching's training time (diffusion/flow.py): sampling, logit-normal's mean and
    std, and the time shift (training and sampling)."""
    time: str = "logit_normal"
    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0

    @classmethod
    def from_config(cls, d) -> "FlowConfig | None":
        process = d.get("process", "vp")
        if process not in PROCESSES:
            raise ValueError(f"unknown diffusion.process {process!r}; choose one of {PROCESSES}.")
        shift = float(d.get("shift", 1.0))
        if process != "flow":
            if shift != 1.0:
                raise ValueError(f"diffusion.shift={shift:g} is flow matching's time shift: set "
                                 "diffusion.process='flow', or leave the shift at 1.")
            return None
        cfg = cls(d.get("flow_time", "logit_normal"), float(d.get("flow_logit_mean", 0.0)),
                  float(d.get("flow_logit_std", 1.0)), shift)
        if cfg.time not in flow.TIME_SAMPLINGS:
            raise ValueError(f"unknown diffusion.flow_time {cfg.time!r}; choose one of "
                             f"{flow.TIME_SAMPLINGS}.")
        if not (cfg.std > 0 and cfg.shift > 0):
            raise ValueError(f"diffusion.flow_logit_std ({cfg.std:g}) and diffusion.shift "
                             f"({cfg.shift:g}) must be > 0.")
        if d.get("learn_sigma", False):
            raise ValueError("diffusion.learn_sigma is IDDPM's variance of a VP chain; a flow "
                             "model's sampler is an ODE: drop one of the two.")
        if d.get("prediction", "eps") not in ("eps", "flow", "x0"):
            raise ValueError(f"diffusion.prediction={d.prediction!r} is a VP model's target; flow "
                             "matching predicts u = eps - x0 (leave diffusion.prediction unset) "
                             "or x0 itself (diffusion.prediction='x0', JiT).")
        return cfg


def conditioning_of(model_cfg: ModelConfig, data_cfg, tokenizer=None) -> Conditioning:
    """What a Denoiser of `model_cfg` is conditioned on: the one place that decides it
    (tokenizer: a frozen text encoder's; None: the trained encoder's bytes)."""
    from t2i_jax import data as data_lib
    if model_cfg.text_conditioned:
        if tokenizer is not None:
            return Conditioning("text", tokenizer=tokenizer, dataset=data_cfg.name)
        return Conditioning("text", max_length=model_cfg.text.max_length, dataset=data_cfg.name)
    if model_cfg.num_classes is not None:
        names = tuple(data_lib.class_names(data_cfg) or ())
        if names and len(names) != model_cfg.num_classes:
            raise ValueError(f"model.{model_cfg.backbone}.num_classes={model_cfg.num_classes} but "
                             f"{data_cfg.name} has {len(names)} classes.")
        return Conditioning("label", class_names=names, dataset=data_cfg.name)
    return Conditioning("none", dataset=data_cfg.name)


@dataclasses.dataclass
class Diffusion(Family):
    model: Denoiser = None
    schedule: Schedule = None
    loss_cfg: LossConfig = None
    frozen_text: FrozenText = None  # a frozen pretrained text encoder (None: trained or none)
    flow_cfg: FlowConfig = None     # flow matching's (diffusion.process="flow"); None: VP

    name = "diffusion"
    generates = True

    @classmethod
    def from_config(cls, config, shape=None) -> "Diffusion":
        """shape: the (H, W, C) the chain runs on (default the data's; a latent model's latent)."""
        shape = tuple(shape or image_shape(config))
        model_cfg = ModelConfig.from_config(config.model)
        frozen_text = load_frozen_text(config)
        if frozen_text is not None:
            model_cfg = dataclasses.replace(model_cfg, text=None,
                                            frozen_text_width=frozen_text.width)
        model = Denoiser(model_cfg)
        d, t = config.diffusion, config.train
        if not 0.0 <= t.p_uncond <= 1.0:
            raise ValueError(f"train.p_uncond must be in [0, 1], got {t.p_uncond}.")
        learn_sigma = bool(d.get("learn_sigma", False))
        lambda_vlb = float(d.get("lambda_vlb", vlb.LAMBDA_VLB))
        if learn_sigma and not lambda_vlb > 0:
            raise ValueError(f"diffusion.lambda_vlb must be > 0 with learn_sigma (IDDPM: 0.001), "
                             f"got {lambda_vlb}: without L_vlb nothing trains the variance.")
        if learn_sigma and d.prediction == "eps" and d.get("zero_terminal_snr", False):
            raise ValueError("diffusion.learn_sigma's L_vlb needs x0_hat at every t, and with "
                             "diffusion.zero_terminal_snr an eps model's x0_hat at t = T-1 is "
                             "eps / sqrt(alpha_bar) = inf: use diffusion.prediction='v' (or 'x0'), "
                             "or drop zero_terminal_snr.")
        flow_cfg = FlowConfig.from_config(d)
        if flow_cfg is not None and t.loss_weighting != "uniform":
            raise ValueError(f"train.loss_weighting={t.loss_weighting!r} weighs a VP model's "
                             "timesteps by SNR; flow matching's time density is diffusion."
                             "flow_time: use loss_weighting='uniform'.")
        flow_prediction = "flow_x0" if d.prediction == "x0" else "flow"
        loss_cfg = LossConfig(prediction=flow_prediction if flow_cfg else d.prediction,
                              weighting=t.loss_weighting,
                              min_snr_gamma=t.min_snr_gamma, p_uncond=t.p_uncond,
                              learn_sigma=learn_sigma, lambda_vlb=lambda_vlb)
        want = shape[-1] * (2 if learn_sigma else 1)
        if model.cfg.out_channels != want:
            what = ("data.channels" if shape == image_shape(config) else
                    "the autoencoder's latent channels")
            raise ValueError(f"model.{model.cfg.backbone}.out_channels={model.cfg.out_channels} must equal "
                             + (f"2 x {what} = {want} with diffusion.learn_sigma (the "
                                "prediction, then the variance output v)" if learn_sigma else
                                f"{what}={shape[-1]}") + ".")
        if (learn_sigma or getattr(model.cfg, "inpaint", False)) and cls.not_pixels is not None:
            what = "diffusion.learn_sigma" if learn_sigma else "model.inpaint"
            raise ValueError(f"{what} is for pixel models, and this is {cls.not_pixels[0]}: "
                             "its x0 has no 8-bit decoder likelihood and no pixels to mask.")
        tokenizer = None if frozen_text is None else frozen_text.tokenizer
        return cls(config=config, conditioning=conditioning_of(model.cfg, config.data, tokenizer),
                   image_shape=shape, model=model, schedule=schedule_of(config),
                   loss_cfg=loss_cfg, frozen_text=frozen_text, flow_cfg=flow_cfg)

    @property
    def prediction(self) -> str:
        return self.loss_cfg.prediction

    @property
    def learn_sigma(self) -> bool:
        return self.loss_cfg.learn_sigma

    @property
    def inpaint(self) -> bool:
        """Whether the model is GLIDE's mask-conditioned inpainting model."""
        return bool(getattr(self.model.cfg, "inpaint", False))

    def null(self) -> Condition:
        """The null Condition (one row); with a frozen text encoder, with the empty prompt's
        features, computed once: training dropout and sampling use these same arrays."""
        null = self.conditioning.null(1)
        if self.inpaint:  # its known image and mask are never dropped: zeros stand in for them
            h, w, c = self.image_shape
            null = null.replace(known=jnp.zeros((1, h, w, c), jnp.float32),
                                known_mask=jnp.zeros((1, h, w, 1), jnp.float32))
        if self.frozen_text is None:
            return null
        return null.replace(features=jnp.asarray(self.frozen_text.null_tokens),
                            pooled=jnp.asarray(self.frozen_text.null_pooled))

    def with_text_features(self, params, cond: Condition) -> Condition:
        """cond with a frozen text encoder's features (computed from its tokens, unless a cache
        gave them already); unchanged for a model without one. params: the encoder's."""
        if self.frozen_text is None or cond.features is not None or cond.tokens is None:
            return cond
        tokens, pooled = self.frozen_text.features(params, cond.tokens, cond.mask)
        # null rows (an empty prompt at sampling) get the null's own arrays: one null everywhere
        null = self.null()
        is_null = cond.is_null.reshape(-1, 1, 1)
        return cond.replace(features=jnp.where(is_null, null.features, tokens),
                            pooled=jnp.where(is_null[:, 0], null.pooled, pooled))

    @property
    def text_in_step(self) -> bool:
        """Whether the train step runs the frozen text encoder (no cache of its features)."""
        return self.frozen_text is not None and not self.config.train.get("text_cache", False)

    def frozen_identity(self) -> dict:
        return {} if self.frozen_text is None else {"text_encoder": self.frozen_text.identity()}

    def text_cache(self):
        """The cache of the training captions' frozen-encoder features (train.text_cache), built
        on first use; None when the step encodes them itself."""
        if self.frozen_text is None or not self.config.train.get("text_cache", False):
            return None
        return self.frozen_text.open_cache(self.config.data,
                                           self.config.train.get("text_cache_dir", None))

    def init_params(self, key: jax.Array):
        x = jnp.zeros((1,) + self.image_shape, jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        return self.model.init({"params": key, "dropout": key}, x, t, self.null())

    def hparams(self) -> dict:
        hp = dict(p_uncond=jnp.asarray(self.loss_cfg.p_uncond, jnp.float32))
        if self.text_in_step:
            hp["text_encoder"] = self.frozen_text.params
        return hp

    def loss(self, params, batch: dict, key: jax.Array, hp: dict):
        x0 = self.diffusion_data(batch, key, hp)                   # [B, H, W, C]
        n, T = x0.shape[0], self.schedule.num_timesteps
        noise = jax.random.normal(jax.random.fold_in(key, _NOISE), x0.shape, x0.dtype)
        cond = self.training_condition(batch, key, hp)
        cond = self.drop(cond, jax.random.fold_in(key, _DROP), hp)
        if self.flow_cfg is not None:
            return self.flow_loss(params, x0, noise, cond, key, hp)
        t = jax.random.randint(jax.random.fold_in(key, _T), (n,), 0, T)
        x_t = forward.q_sample(self.schedule, x0, t, noise)
        out = self.apply_model(params, x_t, t, cond, jax.random.fold_in(key, _DROPOUT), hp)
        c = self.loss_cfg
        mean_out, v = vlb.split_output(out, c.learn_sigma)  # v: the learned variance's output
        per_example = losses.per_example_loss(self.schedule, mean_out, x0, t, noise,
                                              prediction=c.prediction, weighting=c.weighting,
                                              min_snr_gamma=c.min_snr_gamma)  # [B]
        extra = {}
        if c.learn_sigma:  # L_hybrid = L_simple + lambda T L_t (the mean behind a stop-gradient)
            vb = vlb.hybrid_vlb_term(self.schedule, x0, x_t, t, mean_out, v, c.prediction,
                                     c.lambda_vlb)  # [B]
            extra = dict(mse=jnp.mean(per_example), vb=jnp.mean(vb))
            per_example = per_example + vb
        metrics = quarter_means(per_example, t, T, "loss")
        metrics.update(extra)
        return per_example, self.condition_metrics(metrics, cond)

    def flow_loss(self, params, x0, noise, cond: Condition, key: jax.Array, hp: dict):
        """Flow matching's loss: |u_hat(x_tau, t) - (eps - x0)|^2 at tau ~ the config's time
        density, x_tau = (1 - tau) x0 + tau eps, t = tau T - 1 (diffusion/flow.py)."""
        f, T = self.flow_cfg, self.schedule.num_timesteps
        tau = flow.sample_time(jax.random.fold_in(key, _T), x0.shape[0], f.time, f.mean, f.std,
                               f.shift)  # [B]
        x_tau = flow.interpolate(x0, noise, tau)
        out = self.apply_model(params, x_tau, flow.model_time(tau, T), cond,
                               jax.random.fold_in(key, _DROPOUT), hp)
        per_example = flow.per_example_loss(out, x0, noise, tau, self.loss_cfg.prediction)  # [B]
        quarter = jnp.minimum(jnp.floor(tau * T), T - 1).astype(jnp.int32)
        return per_example, self.condition_metrics(quarter_means(per_example, quarter, T, "loss"),
                                                   cond)

    def condition_metrics(self, metrics: dict, cond: Condition) -> dict:
        """metrics with the fraction of rows CFG's dropout (and unCLIP's) made null."""
        if self.conditioning.guidable:
            metrics["null_fraction"] = jnp.mean(cond.is_null.astype(jnp.float32))
        if cond.embedding is not None:  # an unCLIP decoder's embedding, dropped on its own
            metrics["embedding_null_fraction"] = jnp.mean(
                jnp.all(cond.embedding == 0, axis=-1).astype(jnp.float32))
        return metrics

    def diffusion_data(self, batch: dict, key: jax.Array, hp: dict) -> jax.Array:
        """The x0 the chain is trained on: the batch's images (a latent model's latents)."""
        return batch["image"]

    def training_condition(self, batch: dict, key: jax.Array, hp: dict) -> Condition:
        """The Condition of a training batch, before dropout (key: the step's key); a frozen
        text encoder's features come from the cache (in the batch) or are computed here."""
        cond = self.with_text_features(hp.get("text_encoder"), self.conditioning.of_batch(batch))
        if self.inpaint:  # GLIDE: random regions erased, the rest given with the mask
            x0 = batch["image"]
            n, h, w = x0.shape[:3]
            mask = inpainting.random_masks(jax.random.fold_in(key, _MASK), n, h, w)
            cond = cond.replace(known=x0, known_mask=mask)
        return cond

    def drop(self, cond: Condition, key: jax.Array, hp: dict) -> Condition:
        """Classifier-free guidance's dropout: each row to the null with probability p_uncond
        (the null keeps what CFG never drops: an SR stage's low-resolution image)."""
        return conditioning.drop_condition(cond, conditioning.keep_undropped(self.null(), cond),
                                           key, hp["p_uncond"])

    def apply_model(self, params, x_t, t, cond: Condition, dropout_key, hp: dict):
        """The network's output for a training batch (dropout on)."""
        return self.model.apply(params, x_t, t, cond, deterministic=False,
                                rngs={"dropout": dropout_key})

    # --- what sampling needs ----------------------------------------------------------
    @property
    def output_shape(self) -> tuple:
        """The (H, W, C) of the images sampling writes (the chain's, unless decoded)."""
        return tuple(self.image_shape)

    def sampling_inputs(self):
        """Frozen parameters the sampling function reads besides the model's (a latent
        model's autoencoder, a frozen text encoder), passed to it as arguments, never baked in
        as constants."""
        return {} if self.frozen_text is None else {"text_encoder": self.frozen_text.params}

    def to_output(self, inputs, x0: jax.Array) -> jax.Array:
        """The chain's x0 -> the output images (the identity; a latent model decodes)."""
        return x0

    def decoder_record(self) -> dict:
        """What a sampling record says decoded the chain's output ({}: nothing did)."""
        return {}

    def encode_image(self, inputs, images: jax.Array) -> jax.Array:
        """The chain's x0 of images [B] + output_shape in [-1, 1] (img2img's start): the images
        themselves (a latent model: its encoder's posterior mean, scaled)."""
        return images

    @classmethod
    def refuse_pixel_thresholding(cls, thresholding, flag: str) -> None:
        if cls.not_pixels is not None and thresholding in PIXEL_THRESHOLDS:
            raise ValueError(thresholding_refusal(thresholding, flag, *cls.not_pixels))

    def check_options(self, options, flag: str = "--thresholding") -> None:
        """Refuses sampling options that make no sense for this model (ValueError)."""
        self.refuse_pixel_thresholding(options.thresholding, flag)
        if options.ddpm_variance == "learned" and not self.learn_sigma:
            raise ValueError("--ddpm_variance learned needs a model trained with a learned variance "
                             "(diffusion.learn_sigma=True, IDDPM's L_hybrid); this model's variance "
                             "is fixed: use --ddpm_variance posterior (beta~) or beta.")
        method = getattr(options, "inpaint", None)
        if method is not None and self.not_pixels is not None and not self.latent:
            raise ValueError(f"inpainting keeps and regenerates pixels, and this is "
                             f"{self.not_pixels[0]}: its x_t is not an image to paste the known "
                             "pixels into. Inpaint with a pixel model (any text-to-image "
                             "workdir: RePaint; configs/shapes_inpaint.py: GLIDE's).")
        if self.inpaint and method != "glide":
            raise ValueError("this is GLIDE's mask-conditioned inpainting model (model.inpaint): "
                             "it needs an image and a mask, --inpaint IMAGE with --mask MASK.png or "
                             "--mask_box x0,y0,x1,y1.")
        if method == "glide" and not self.inpaint:
            raise ValueError("inpaint method 'glide' needs a mask-conditioned model "
                             "(model.inpaint=True); any other model inpaints with 'repaint'.")

    def chain_steps(self, options):
        """The samplers.Steps of a chain with these options (ValueError for one that cannot run:
        a step count outside 1..T, an eps model started at zero SNR)."""
        return samplers.steps_of(self.schedule, options.num_steps, options.spacing,
                                 self.prediction, options.sampler,
                                 1.0 if self.flow_cfg is None else self.flow_cfg.shift)

    def sampling_condition(self, cond: Condition, rng: jax.Array, sample_ids) -> Condition:
        """The Condition the chain sees, from the one a sampling job built (a stage with a
        low-resolution input augments it here); the identity for a base model."""
        return cond

    def grid_condition(self, prompts, n: int) -> Condition:
        """The progress grid's Condition: n rows per prompt (an inpainting model: the first test
        images, their right half to regenerate)."""
        cond = self.conditioning.of_prompts([p for p in prompts for _ in range(n)])
        if self.inpaint:
            h, w, _ = self.image_shape
            known = jnp.repeat(jnp.asarray(self.grid_examples()["image"][:len(prompts)]), n, axis=0)
            mask = inpainting.box_mask(h, w, (w // 2, 0, w, h))
            cond = cond.replace(known=known, known_mask=jnp.broadcast_to(
                jnp.asarray(mask), known.shape[:3] + (1,)))
        return cond

    def encode(self, params, cond: Condition, inputs=None) -> Encoded:
        """The condition through the text encoder: once per sampling run, not per step
        (inputs: the sampling_inputs, for a family whose encoder is frozen)."""
        if self.frozen_text is not None:
            cond = self.with_text_features(inputs["text_encoder"], cond)
        return self.model.apply(params, cond, method=Denoiser.encode)

    def denoise_fn(self, params):
        """(x_t, t, enc: Encoded) -> the model's output, the form samplers.sample calls."""
        return lambda x_t, t, enc: self.model.apply(params, x_t, t, enc, method=Denoiser.denoise)

    def grid_examples(self) -> dict:
        """The first GRID_IMAGES test examples (data.load_split), loaded once: the grids of
        families conditioned on an image (an SR stage's low-res input, a decoder's embedding)."""
        if not hasattr(self, "_grid_cache"):
            from t2i_jax import data as data_lib
            split = data_lib.get_spec(self.config.data.name).splits[1]
            self._grid_cache = data_lib.load_split(self.config.data, split, limit=GRID_IMAGES)
        return self._grid_cache

    def grid_prompts(self) -> list:
        """The data set's fixed prompts for progress grids: captions, class names, or one
        empty prompt for an unconditional model."""
        from t2i_jax import data as data_lib
        kind = self.conditioning.kind
        if self.inpaint:
            return list(self.grid_examples()["caption"])
        if kind == "text":
            override = self.config.get("train", {}).get("grid_prompts")  # config.train.grid_prompts
            return list(override) if override else list(data_lib.sample_prompts(self.config.data))
        if kind == "label":
            return list(self.conditioning.class_names)
        return [""] * 4  # unconditional: 4 rows of different draws

    def next_command(self, workdir: str) -> str:
        import os
        import shlex
        prompt = self.grid_prompts()[0]
        return (f"python sample.py --workdir {shlex.quote(workdir)} --prompt {shlex.quote(prompt)}"
                f" --outdir {shlex.quote(os.path.join(workdir, 'samples_out'))}")



def load_frozen_text(config):
    """The frozen text encoder of config.model.text_encoder (None for "trained"); a stored
    model refuses another encoder than the one it was trained with."""
    from t2i_jax.families.frozen import check_recorded, moved_message, recorded
    cfg = TextEncoderConfig.from_config(config.model)
    if not cfg.frozen:
        return None
    # A stored model's encoder: the absolute directory it recorded, where it still exists (a
    # sampler run from another directory than training, with a relative path in the config).
    rec = recorded(config, "text_encoder")
    if rec.get("workdir") and os.path.isdir(rec["workdir"]):
        cfg = dataclasses.replace(cfg, path=rec["workdir"])
    elif rec.get("workdir") and not os.path.isdir(os.path.expanduser(cfg.path or "")):
        raise ValueError(moved_message("text encoder", rec))
    frozen = FrozenText.load(cfg, fsdp=int(config.train.get("fsdp", 1) or 1))
    check_recorded(config, "text_encoder", frozen, "its conditioning would read other text "
                   "features than it learned")
    return frozen
