"""Stable Diffusion 1.x / 2.x from a diffusers pipeline folder as a sampling stage: the latent
diffusion family's stage (text encoder, UNet on latents, then the VAE's decoder) with the
folder's pretrained models (models/pretrained/pipeline.py) in place of trained ones.

    family = StableDiffusion.from_folder("/data/stable-diffusion-v1-5")   # sampling/load.py wraps it

The chain is the folder's: betas, prediction and the steps each sampler visits come from
scheduler/scheduler_config.json (diffusion/diffusers_scheduler.py), its `_class_name` the
default sampler. The condition is the prompt through the folder's CLIP text encoder run without
a padding mask (as StableDiffusionPipeline runs it), every position of the 77 attended to; the
null is the empty prompt's encoding, padded like a prompt. Images are decoded from z0 /
scaling_factor + shift_factor (vae/config.json). diffusers' guidance_scale g is w = g - 1 here.
The job records the folder's path and content hash (`decoder_record`), so a rerun of a job
against other weights is refused.

Fine-tuning (`config.family = "stable_diffusion"`, `config.model.pretrained = FOLDER`:
configs/sd_finetune.py) trains the folder's UNet with the one training loop. The VAE and the
text encoder are frozen: their parameters are hparams (placed once, passed to every step), never
in the TrainState or the optimizer. Per step, as diffusers' train_text_to_image.py:
  z0 = (z - shift_factor) * scaling_factor, z ~ q(z | x) of the VAE (or of the latent cache's
       stored posterior moments: train.latent_cache), held fixed;
  t ~ U{0..T-1} on the scheduler config's betas, z_t = q_sample(z0, t, eps), the target its
  prediction_type's (eps, or v for 2.x-v), the text the CLIP features of the caption (or of the
  text cache: train.text_cache), a row dropped to the null (the encoding of "") with
  probability train.p_uncond; loss = MSE (train.loss_weighting="min_snr": Hang et al.'s weights).
The UNet computes in model.dtype (bfloat16) with float32 master weights, blocks rematerialised
(model.remat), its parameters split over the fsdp axis like the project's own models.
LoRA (`train.lora.rank > 0`, models/lora.py): the trained parameters are the low-rank factors
alone; the folder's UNet is a frozen hparam and W + (alpha / r) A B is formed inside the step,
so a checkpoint holds megabytes. Sampling merges the factors into the weights once at load
(`sampling_params`): the chain then runs the base model's program at the base model's cost.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from t2i_jax.conditioning import Condition, Conditioning
from t2i_jax.diffusion.diffusers_scheduler import CLASS_OF_SAMPLER
from t2i_jax.errors import UsageError
from t2i_jax.families.diffusion import Diffusion, LossConfig
from t2i_jax.families.frozen_text import FrozenText, TextEncoderConfig
from t2i_jax.families.latent import LatentDiffusion
from t2i_jax.models import lora as lora_lib

_POSTERIOR = 8   # stream of the step's key: z ~ q(z | x) (as the latent diffusion family)
FLAG = "config.model.pretrained"
DEFAULT_GUIDANCE_SCALE = 7.5   # StableDiffusionPipeline's guidance_scale (w = 6.5 here)
DEFAULT_STEPS = 50             # and its num_inference_steps


@dataclasses.dataclass
class StableDiffusion(Diffusion):
    folder: Any = None        # models.pretrained.pipeline.PipelineFolder
    lora: Any = None          # models.lora.LoraConfig when train.lora.rank > 0, else None
    compute_dtype: str = "float32"   # the UNet's computation dtype in the training step
    remat: bool = False

    name = "stable_diffusion"
    diffusers_export = True
    batch_keys = Diffusion.batch_keys + ("latent_mean", "latent_logvar")
    latent = True
    not_pixels = LatentDiffusion.not_pixels

    @classmethod
    def from_folder(cls, directory: str, mesh=None, dtype: str = "float32") -> "StableDiffusion":
        from t2i_jax.models.pretrained import pipeline
        return cls.from_folder_loaded(pipeline.load(directory, mesh=mesh, dtype=dtype), dtype)

    @classmethod
    def from_folder_loaded(cls, folder, dtype: str = "float32") -> "StableDiffusion":
        text = folder.text
        feats, _ = text.encode([""])
        frozen = FrozenText(TextEncoderConfig(kind="clip", path=text.directory,
                                              max_length=text.max_length, dtype=dtype),
                            text, feats.tokens, feats.pooled)
        size, sched = folder.image_size, folder.scheduler
        config = ml_collections.ConfigDict(dict(
            family=cls.name,
            data=dict(name="diffusers:" + os.path.basename(folder.directory), image_size=size,
                      channels=int(folder.vae[0].out_channels)),
            sample=dict(sampler=sched.default_sampler, num_steps=DEFAULT_STEPS, eta=0.0,
                        thresholding="none", spacing=sched.spacing(sched.default_sampler),
                        ddpm_variance="posterior",
                        guidance_weight=DEFAULT_GUIDANCE_SCALE - 1.0)))
        u = folder.unet[0]
        f = folder.vae_scale_factor
        return cls(config=config,
                   conditioning=Conditioning("text", tokenizer=text.tokenizer,
                                             dataset=config.data.name),
                   image_shape=(size // f, size // f, int(u.in_channels)), model=None,
                   schedule=sched.schedule(),
                   loss_cfg=LossConfig(prediction=sched.prediction, p_uncond=0.0),
                   frozen_text=frozen, folder=folder)

    @property
    def inpaint(self) -> bool:
        return False  # diffusers' 9-channel inpainting UNet is not read (in_channels refused)

    # --- sampling ------------------------------------------------------------------------
    @property
    def unet(self):
        from t2i_jax.models.unet2d_condition import UNet2DConditionModel
        return UNet2DConditionModel(self.folder.unet[0])

    @property
    def vae(self):
        from t2i_jax.models.autoencoder_kl import AutoencoderKL
        return AutoencoderKL(self.folder.vae[0])

    @property
    def output_shape(self) -> tuple:
        return (self.folder.image_size, self.folder.image_size, int(self.folder.vae[0].out_channels))

    def sampling_inputs(self):
        return {"text_encoder": self.frozen_text.params, "vae": self.folder.vae[1]}

    def encode(self, params, cond, inputs=None):
        """Condition(features=the prompt's CLIP token features [B, 77, D]): what the UNet's
        cross-attention reads, every position (padding included)."""
        return Condition(features=self.with_text_features(inputs["text_encoder"], cond).features)

    def denoise_fn(self, params):
        unet = self.unet
        return lambda x_t, t, enc: unet.apply(params, x_t, t, enc.features)

    def spacing_of(self, sampler: str):
        return self.folder.scheduler.spacing(sampler) if sampler in CLASS_OF_SAMPLER else None

    def chain_steps(self, options):
        """The steps diffusers' scheduler class of options.sampler visits (its spacing, offset and
        final alpha from the folder's scheduler_config.json)."""
        if options.sampler not in CLASS_OF_SAMPLER:
            raise ValueError(f"--sampler {options.sampler} has no diffusers scheduler to follow; "
                             f"choose one of {sorted(CLASS_OF_SAMPLER)}.")
        return self.folder.scheduler.steps(options.sampler, options.num_steps, self.schedule)

    def to_output(self, inputs, x0: jax.Array) -> jax.Array:
        cfg = self.folder.vae[0]
        z = x0 / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return self.vae.apply(inputs["vae"], z, method="decode")

    def encode_image(self, inputs, images: jax.Array) -> jax.Array:
        """(mean - shift_factor) * scaling_factor of the VAE's posterior: diffusers' img2img with
        the posterior's mean (its default draws a sample, whose std is ~1e-3 of the mean's scale)."""
        cfg = self.folder.vae[0]
        mean, _ = self.vae.apply(inputs["vae"], images, method="encode")
        return (mean - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def decoder_record(self) -> dict:
        ident = self.folder.identity()
        cfg = self.folder.vae[0]
        return dict(workdir=ident["workdir"], kind="diffusers", sha256=ident["sha256"],
                    scale_factor=float(cfg.scaling_factor),
                    **({"shift_factor": float(cfg.shift_factor)} if cfg.shift_factor else {}),
                    **({"lora": self.lora_file} if getattr(self, "lora_file", None) else {}))

    def frozen_identity(self) -> dict:
        return {"pipeline": self.folder.identity()}

    # --- fine-tuning -------------------------------------------------------------------
    @classmethod
    def from_config(cls, config) -> "StableDiffusion":
        """The family of a fine-tuning config (config.model.pretrained: a diffusers folder), or
        of a fine-tuned workdir's stored config (the folder it recorded, checked by hash)."""
        from t2i_jax.models.pretrained import pipeline
        m, tr = config.model, config.train
        directory = _pretrained_dir(config)
        folder = pipeline.load(directory, param_dtype="float32")
        rec = (config.get("frozen", None) or {}).get("pipeline", None) or {}
        if rec.get("sha256") and rec["sha256"] != folder.identity()["sha256"]:
            raise ValueError(
                f"{FLAG}={folder.directory} is not the folder this model was fine-tuned from "
                f"(sha256 {folder.identity()['sha256'][:12]}, recorded {rec['sha256'][:12]}): "
                "its weights would be read against another base. Restore that folder, or point "
                "sample.py --frozen RECORDED=DIR at a copy of it.")
        base = cls.from_folder_loaded(folder)
        f = folder.vae_scale_factor
        size, channels = int(config.data.image_size), int(config.data.channels)
        halvings = 2 ** (len(folder.unet[0].block_out_channels) - 1)
        if channels != int(folder.vae[0].in_channels):
            raise ValueError(f"data.channels={channels}, but the folder's VAE reads "
                             f"{folder.vae[0].in_channels}-channel images: set "
                             f"--config.data.channels={folder.vae[0].in_channels}.")
        if size % (f * halvings):
            raise ValueError(f"data.image_size={size} must be a multiple of {f * halvings} (the "
                             f"VAE's factor {f} times the UNet's {halvings}x downsampling).")
        if not 0.0 <= tr.p_uncond <= 1.0:
            raise ValueError(f"train.p_uncond must be in [0, 1], got {tr.p_uncond}.")
        lora = lora_config(tr.get("lora", None))
        if lora is not None:  # refused now, naming the targets, if they match no layer
            try:
                lora_lib.targets_of(folder.unet[1], lora, base.unet_param_map)
            except ValueError as e:
                raise UsageError(f"config.train.lora.targets: {e}") from None
        sample = dict(base.config.sample)
        for k, v in dict(config.get("sample", {})).items():
            if v is not None and k != "spacing":
                sample[k] = v
        if sample["sampler"] in CLASS_OF_SAMPLER:
            sample["spacing"] = folder.scheduler.spacing(sample["sampler"])
        cfg = ml_collections.ConfigDict(config.to_dict())
        cfg.sample = ml_collections.ConfigDict(sample)
        loss_cfg = LossConfig(prediction=folder.scheduler.prediction,
                              weighting=tr.get("loss_weighting", "uniform"),
                              min_snr_gamma=float(tr.get("min_snr_gamma", 5.0)),
                              p_uncond=float(tr.p_uncond))
        return dataclasses.replace(
            base, config=cfg, image_shape=(size // f, size // f, int(folder.unet[0].in_channels)),
            conditioning=Conditioning("text", tokenizer=folder.text.tokenizer,
                                      dataset=config.data.name),
            loss_cfg=loss_cfg, lora=lora, compute_dtype=str(m.get("dtype", "float32")),
            remat=bool(m.get("remat", False)))

    @property
    def unet_param_map(self):
        from t2i_jax.models.unet2d_condition import param_map
        return param_map(self.folder.unet[0])

    @property
    def training_unet(self):
        from t2i_jax.models.unet2d_condition import UNet2DConditionModel
        return UNet2DConditionModel(dataclasses.replace(
            self.folder.unet[0], dtype=self.compute_dtype, remat=self.remat))

    def init_params(self, key):
        """The trained parameters' initial values: the folder's UNet (float32 master weights),
        or LoRA's factors (A random, B = 0: the base model exactly)."""
        if self.lora is not None:
            return lora_lib.init_factors(key, self.folder.unet[1], self.lora, self.unet_param_map)
        return self.pretrained_params()

    def pretrained_params(self):
        """The initial parameters read from the folder (the loop places them rather than compile
        them into its init program), or None where init_params draws them (LoRA)."""
        if self.lora is not None:
            return None
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), self.folder.unet[1])

    @property
    def latent_cached(self) -> bool:
        return bool(self.config.train.get("latent_cache", False))

    def hparams(self) -> dict:
        hp = super().hparams()
        if not self.latent_cached:
            hp["vae"] = self.folder.vae[1]
        if self.lora is not None:
            hp["unet"] = self.folder.unet[1]
        return hp

    def unet_params(self, params, base):
        """The UNet's parameters from the trained ones (LoRA: W + (alpha / r) A B)."""
        if self.lora is None:
            return params
        return lora_lib.merge(base, params, self.lora.scale)

    def sampling_params(self, params):
        """What the sampling chain reads from a checkpoint's parameters: LoRA's factors merged
        into the folder's weights once (one matmul per adapted layer, then the base model's cost
        per step); a full fine-tune's as they are."""
        if self.lora is None:
            return params
        return self.merged(params, self.lora.scale)

    def merged(self, factors, scale: float):
        """The folder's UNet with LoRA factors merged in at `scale` (one program per family:
        every training grid and load reuses it, the scale traced)."""
        merge = self.program("lora_merge", lambda: jax.jit(lora_lib.merge))
        return merge(self.folder.unet[1], factors, jnp.float32(scale))

    def with_lora_file(self, path: str, scale: float = 1.0):
        """The folder's UNet parameters with a LoRA file merged in (sample.py --lora): its
        alpha / rank times `scale`; the file's path, hash and scale join decoder_record, so the
        job's identity (and every samples.jsonl row) names it."""
        import hashlib
        from t2i_jax.models import lora_files
        factors, cfg = lora_files.load(path, self.folder.unet[0], self.unet_param_map)
        with open(path, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        self.lora_file = dict(file=os.path.abspath(path), sha256=sha, rank=cfg.rank,
                              alpha=float(cfg.alpha if cfg.alpha is not None else cfg.rank),
                              scale=float(scale))
        return self.merged(factors, cfg.scale * scale)

    def posterior_moments(self, vae_params, images):
        """(mean, logvar) [B, h, w, c] of the VAE's q(z | x) for images [B, H, W, 3] in [-1, 1]."""
        return self.vae.apply(vae_params, images, method="encode")

    def latents(self, mean, logvar, posterior_noise):
        """z0 = (z - shift) * scaling_factor, z = mean + exp(logvar / 2) * noise: diffusers'
        latent_dist.sample() * vae.config.scaling_factor, held fixed."""
        cfg = self.folder.vae[0]
        z = mean + jnp.exp(0.5 * logvar) * posterior_noise
        return jax.lax.stop_gradient((z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor)

    def diffusion_data(self, batch: dict, key: jax.Array, hp: dict) -> jax.Array:
        if "latent_mean" in batch:  # the latent cache's moments of this example
            mean, logvar = batch["latent_mean"], batch["latent_logvar"]
        else:
            mean, logvar = self.posterior_moments(hp["vae"], batch["image"])
        noise = jax.random.normal(jax.random.fold_in(key, _POSTERIOR), mean.shape, mean.dtype)
        return self.latents(mean, logvar, noise)                       # [B, h, w, c]

    def apply_model(self, params, x_t, t, cond: Condition, dropout_key, hp: dict):
        return self.training_unet.apply(self.unet_params(params, hp.get("unet")), x_t, t,
                                        cond.features)

    def latent_cache(self):
        """The cache of the training split's posterior moments (train.latent_cache), built on
        first use; None when the step encodes the images itself."""
        if not self.latent_cached:
            return None
        from t2i_jax.families.latent_cache import open_latent_cache
        return open_latent_cache(self, self.config.data,
                                 self.config.train.get("latent_cache_dir", None))

    def grid_prompts(self) -> list:
        if self.folder is not None and not self.config.data.name.startswith("diffusers:"):
            return Diffusion.grid_prompts(self)  # a fine-tune: its data's (or train.grid_prompts)
        return ["a photograph of an astronaut riding a horse"]

    def next_command(self, workdir: str) -> str:
        import shlex
        return (f"python sample.py --workdir {shlex.quote(workdir)} --prompt "
                f"{shlex.quote(self.grid_prompts()[0])}")


def lora_config(section):
    """models.lora.LoraConfig of train.lora, or None for full fine-tuning (rank 0 or no section);
    alpha 0 (or absent) means alpha = rank (scale 1)."""
    section = dict(section or {})
    if int(section.get("rank", 0) or 0) == 0:
        return None
    if not section.get("alpha"):
        section.pop("alpha", None)
    if "targets" in section:
        section["targets"] = tuple(section["targets"])
    return lora_lib.LoraConfig.from_config(section)


def _pretrained_dir(config) -> str:
    """The folder of config.model.pretrained; a stored model's recorded one where it still
    exists (a sampler run from another directory), checked by its hash all the same."""
    from t2i_jax.models.pretrained.pipeline import is_pipeline_folder
    rec = (config.get("frozen", None) or {}).get("pipeline", None) or {}
    if rec.get("workdir") and os.path.isdir(rec["workdir"]):
        return rec["workdir"]
    path = config.model.get("pretrained", None)
    if rec.get("workdir") and not (path and os.path.isdir(os.path.expanduser(path))):
        from t2i_jax.families.frozen import moved_message
        raise UsageError(moved_message("pipeline folder", rec))
    if not path:
        raise UsageError(f"{FLAG} is not set: name a diffusers Stable Diffusion folder "
                         f"(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), "
                         f"--{FLAG}=DIR.")
    path = os.path.abspath(os.path.expanduser(path))
    if not is_pipeline_folder(path):
        what = "does not exist" if not os.path.exists(path) else "has no model_index.json"
        raise UsageError(f"{FLAG}={path} {what}: it must name a diffusers Stable Diffusion "
                         "folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
                         "scheduler/).")
    return path
