"""From conditions to images with a diffusion family: encode once, then samplers.sample.

`make_generate_fn` returns ONE jitted function of (params, cond, rng, guidance_weight,
sample_ids, guide parameters, rows and scales, and CFG's combination rule); new prompts, seeds,
guidance weights, guide scales and the rule's values reuse its compilation. The chain's
denoiser is composed here from diffusion/guidance.py's guides (CFG with diffusion/cfg.py's rule,
the gradient guides, thresholding); samplers.chain only runs it. Sample i's noise
comes from its global index sample_ids[i] (t2i_jax/diffusion/noise.py), so an image does not
depend on the batch it was drawn in or on the number of devices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.conditioning import Condition, keep_undropped
from t2i_jax.diffusion import guidance, inpainting, noise, samplers
from t2i_jax.sampling import guides as guides_lib


def _number(value) -> float:
    """value as a float, NaN where it is none (so every range check refuses it)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    sampler: str = "ddim"
    num_steps: int = 50
    eta: float = 0.0
    thresholding: Optional[str] = "static"   # "static" (clip x0_hat), "dynamic" (Imagen), None / "none"
    spacing: str = "trailing"
    ddpm_variance: str = "posterior"  # "posterior" (beta~), "beta" (DDIM paper's sigma-hat) or
                                      # "learned" (IDDPM; also DDIM's sigma at eta > 0)
    percentile: float = 0.995         # dynamic thresholding's p (Imagen sec. 2.3)
    inpaint: Optional[str] = None     # "repaint" (any model) or "glide" (a mask model); None: no
    repaint_jumps: int = 0            # RePaint's resampling: extra passes over each segment
    repaint_jump_length: int = 10     # and the segment's length in steps
    strength: Optional[float] = None  # img2img / SDEdit: start from the image noised to the
                                      # chain's step S - int(S * strength) (diffusers' rule)
    ode_variables: Optional[str] = None  # Heun's variables, "sigma" or "flow" (samplers.chain's
                                         # ode); None: the model's own

    @classmethod
    def from_config(cls, sample) -> "SampleOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in dict(sample).items() if k in names}
        if "dynamic_percentile" in sample:
            values["percentile"] = float(sample["dynamic_percentile"])
        return cls(**values)

    def __post_init__(self):
        if self.thresholding in ("none", ""):
            object.__setattr__(self, "thresholding", None)
        if self.thresholding not in (None, "static", "dynamic"):
            raise ValueError(f"unknown thresholding {self.thresholding!r}; choose static, dynamic "
                             "or none.")
        if not 0.0 < _number(self.percentile) <= 1.0:
            raise ValueError(f"the dynamic-thresholding percentile must be in (0, 1] (Imagen: "
                             f"0.995), got {self.percentile}.")
        if self.ddpm_variance not in samplers.DDPM_VARIANCES:
            raise ValueError(f"unknown ddpm_variance {self.ddpm_variance!r}; choose one of "
                             f"{samplers.DDPM_VARIANCES}.")
        if self.sampler not in samplers.SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of "
                             f"{sorted(samplers.SAMPLERS)}.")
        if self.ode_variables not in (None,) + samplers.ODES:
            raise ValueError(f"unknown ode_variables {self.ode_variables!r} (Heun's variables); "
                             f"choose one of {samplers.ODES}, or None for the model's own.")
        if self.ode_variables is not None and self.sampler != "heun":
            raise ValueError(f"--ode_variables chooses the variables Heun's steps solve the ODE "
                             f"in; sampler {self.sampler!r} does not read it: pass --sampler heun, "
                             "or leave --ode_variables out.")
        if not 0.0 <= _number(self.eta) <= 1.0:  # NaN fails too
            raise ValueError(f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: as much "
                             f"noise as DDPM), got {self.eta}.")
        if self.inpaint not in (None,) + inpainting.METHODS:
            raise ValueError(f"unknown inpainting method {self.inpaint!r}; choose one of "
                             f"{inpainting.METHODS}.")
        for name in ("repaint_jumps", "repaint_jump_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (
                    1 if name == "repaint_jump_length" else 0):
                raise ValueError(f"--{name} must be an integer >= "
                                 f"{1 if name == 'repaint_jump_length' else 0}, got {v!r}.")
        if self.repaint_jumps and self.inpaint != "repaint":
            raise ValueError("--repaint_jumps is RePaint's: it needs --inpaint with a model that "
                             "is not mask-conditioned.")
        if self.repaint_jumps and self.sampler in samplers.SAMPLERS \
                and not samplers.SAMPLERS[self.sampler].stochastic:
            raise ValueError(f"RePaint's jumps re-noise the chain, which the multistep sampler "
                             f"{self.sampler!r} cannot resume from; use --sampler ddpm or ddim, "
                             "or --repaint_jumps 0.")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, (int, np.integer)) \
                or self.num_steps < 1:
            raise ValueError(f"the number of sampling steps must be an integer >= 1, got "
                             f"{self.num_steps!r}.")
        if self.strength is not None:
            strength = _number(self.strength)
            if not 0.0 < strength <= 1.0:
                raise ValueError(f"--strength must be in (0, 1] (1: from pure noise, as "
                                 f"text-to-image), got {self.strength}.")
            if int(self.num_steps * strength) < 1:
                raise ValueError(f"--strength {strength:g} of --steps {self.num_steps} runs "
                                 f"int({self.num_steps} x {strength:g}) = 0 steps of the chain "
                                 "(diffusers' rule): raise --steps or --strength.")
            if self.sampler in ("pndm", "heun"):
                raise ValueError("img2img starts the chain part-way, which the paired calls of "
                                 "PLMS's warm-up and of Heun's steps do not allow: pass "
                                 "--sampler ddim, dpmpp_2m or euler.")
            if self.inpaint is not None:
                raise ValueError("--init_image (img2img) and --inpaint do not combine: inpainting "
                                 "keeps the known region, img2img redraws the whole image.")
        if self.repaint_jumps and self.num_steps <= self.repaint_jump_length:
            raise ValueError(f"RePaint jumps back --repaint_jump_length {self.repaint_jump_length} "
                             f"steps before the chain's end, and a chain of {self.num_steps} steps "
                             "has no such point: the jumps would do nothing. Use more --steps, a "
                             "shorter --repaint_jump_length, or --repaint_jumps 0.")


def make_generate_fn(family, options: SampleOptions, guided: bool = True,
                     guides: Sequence = ()) -> Callable:
    """Returns generate(params, cond [B], rng, guidance_weight, sample_ids [B], guide_params=(),
    guide_rows=(), guide_scales=(), x_T=None, rule=None) -> x0 [B, H, W, C] in [-1, 1]
    (clipped; NaN where the chain produced a non-finite value) for a diffusion family
    (families/diffusion.py); a latent model's x0 is decoded to pixels ([B] + family.output_shape).

    guided: each step evaluates the model on the condition and on the family's null condition
    and combines eps~ = (1 + w) eps(x, y) - w eps(x, null), w = guidance_weight ([] or [B]);
    unguided (or a model without a condition to drop), one evaluation on the condition alone
    (guidance_weight and rule are ignored: w = 0), half the work.
    rule: how the guided program combines the two rows (diffusion/cfg.py's Rule: guidance
    rescale, a guidance interval, APG), None for CFG's; an argument like the weight: its values
    are traced (a sweep over them is one compilation), which methods are on (its None fields)
    picks the program.
    x_T: the chain's start [B] + image_shape in place of each sample's seeded noise (the unit
    noise a diffusers pipeline takes as `latents`; the chain scales it as its scheduler does).
    guides: sampling/guides.py Guides; their parameters, per-image rows [B, ...] and scales [G]
    are arguments (traced: new scales or guide checkpoints of the same shapes reuse the program).
    """
    if not (family.generates or family.output_kind == "embedding"):
        raise ValueError(f"a {family.name} model does not generate images; pass the --workdir "
                         "of a diffusion model.")
    guided = guided and family.conditioning.guidable
    steps = family.chain_steps(options)  # the (t, s) it visits: fails here, not in jit
    if options.strength is not None:  # img2img: the chain's last int(S * strength) steps
        steps = samplers.truncated(steps, int(options.num_steps * options.strength))
    family.check_options(options)  # a latent model refuses pixel thresholding
    null = family.null() if guided else None
    total = guides_lib.guide_fn(guides) if guides else None

    def generate(params, inputs, cond: Condition, rng, guidance_weight, sample_ids,
                 guide_params=(), guide_rows=(), guide_scales=(), x_T=None, rule=None):
        cond = family.sampling_condition(cond, rng, sample_ids)  # an SR stage augments its input
        negative, init_image = cond.negative, cond.init_image  # read here, not by the encoder
        cond = cond.replace(negative=None, init_image=None)
        enc = family.encode(params, cond, inputs)
        # The null row drops the text (or label), never an SR stage's low-resolution image; with
        # negative prompts, each row's negative prompt stands in for the null.
        null_enc = None if null is None else keep_undropped(
            family.encode(params, null if negative is None else negative, inputs), enc)
        shape = (cond.batch_size,) + tuple(family.image_shape)  # the chain's x_t
        if x_T is None:  # sample i's own noise; given (--init_noise): the rows of a file
            x_T = noise.initial_noise(rng, shape, sample_ids)
        if init_image is not None:  # img2img (SDEdit): q(x_t0 | x0 = the encoded image)
            # t0 may be fractional (Euler on linspace): Schedule.at reads between timesteps
            t0 = jnp.full((cond.batch_size,), steps.t[0], steps.t.dtype)
            at = lambda name: family.schedule.at(name, t0, x_T.ndim)  # noqa: E731
            x_T = (at("sqrt_alphas_cumprod") * family.encode_image(inputs, init_image)
                   + at("sqrt_one_minus_alphas_cumprod") * x_T)
        # The chain's denoiser: the network with CFG (and the rule's methods after it), then the
        # gradient guides, then thresholding.
        rule = None if null is None else rule
        if rule is not None and rule.stateful and options.inpaint is not None:
            raise ValueError("APG carries its momentum along one samplers.chain; inpainting "
                             f"({options.inpaint}) does not thread it: leave APG out.")
        denoiser = guidance.model_denoiser(
            family.denoise_fn(params), family.schedule, family.prediction, enc, null_enc,
            0.0 if null is None else guidance_weight, learn_sigma=family.learn_sigma, rule=rule)
        if total is not None:
            # clip_image's x'_t: the reference's own fixed noise, per image (any batch, any device)
            noise_ref = noise.initial_noise(
                jax.random.fold_in(rng, guides_lib.REFERENCE_NOISE_STREAM), shape, sample_ids)
            scales = jnp.asarray(guide_scales, jnp.float32)
            denoiser = guidance.gradient_guided(
                denoiser, family.schedule,
                lambda x, t, _: total(guide_params, guide_rows, scales, noise_ref, x, t))
        threshold = options.thresholding
        if threshold == "dynamic" and options.percentile != 0.995:
            threshold = functools.partial(guidance.dynamic_threshold, percentile=options.percentile)
        denoiser = guidance.thresholded(denoiser, family.schedule, threshold)
        chain_args = dict(sampler=options.sampler, num_steps=options.num_steps, eta=options.eta,
                          rng=rng, prediction=family.prediction, spacing=options.spacing,
                          ddpm_variance=options.ddpm_variance, sample_ids=sample_ids, steps=steps,
                          ode=options.ode_variables)
        if options.inpaint == "glide":  # the known pixels overwrite x0_hat at every step
            denoiser = inpainting.known_region(denoiser, family.schedule, cond.known,
                                               cond.known_mask)
        if options.inpaint == "repaint":
            known, known_mask = cond.known, cond.known_mask
            if family.latent:  # RePaint in latent space: the encoded image, the mask min-pooled
                known = family.encode_image(inputs, known)
                known_mask = inpainting.latent_mask(
                    known_mask, known_mask.shape[1] // family.image_shape[0])
            x0 = inpainting.repaint_chain(denoiser, family.schedule, x_T, known,
                                          known_mask, jumps=options.repaint_jumps,
                                          jump_length=options.repaint_jump_length, **chain_args)
        else:
            x0 = samplers.chain(denoiser, family.schedule, x_T, **chain_args)
        x0 = family.to_output(inputs, x0)  # a latent model decodes to pixels
        # Clipping would turn +-inf into a valid-looking white or black pixel: NaN marks every
        # non-finite value, so callers can refuse the image (clip keeps NaN).
        return jnp.clip(jnp.where(jnp.isfinite(x0), x0, jnp.nan), -1.0, 1.0)

    return _with_inputs(jax.jit(generate), family.sampling_inputs())


def _with_inputs(jitted: Callable, inputs) -> Callable:
    """generate(params, cond, ...) -> jitted(params, inputs, cond, ...): the family's frozen
    inputs (a latent model's autoencoder, a frozen text encoder) are an argument of the program,
    not constants in it, placed once per mesh, laid out like parameters (replicated, or split
    over "fsdp" with fsdp > 1) on the devices the parameters are on."""
    from jax.sharding import NamedSharding

    from t2i_jax import sharding as mesh_lib
    placed = {}

    def generate(params, *args, **kwargs):
        if not jax.tree_util.tree_leaves(inputs):
            return jitted(params, inputs, *args, **kwargs)
        sharding = getattr(jax.tree_util.tree_leaves(params)[0], "sharding", None)
        key = (sharding.mesh, "mesh") if isinstance(sharding, NamedSharding) else sharding
        if key not in placed:
            placed.clear()  # one placement at a time: a new mesh replaces the old one
            if isinstance(sharding, NamedSharding):
                placed[key] = jax.tree_util.tree_map(
                    mesh_lib.put, inputs, mesh_lib.state_shardings(inputs, sharding.mesh))
            else:
                placed[key] = jax.device_put(inputs, sharding)
        return jitted(params, placed[key], *args, **kwargs)

    generate.jitted = jitted
    generate._cache_size = jitted._cache_size  # compilations so far (the job's stats read it)
    return generate


def shared_generate_fn(family, options: SampleOptions, guided: bool = True,
                       guides: Sequence = ()) -> Callable:
    """make_generate_fn's function, made once per (options, guided, each guide's kind and family)
    and kept with the family (Family.program): jobs that differ only in prompts, seeds, guidance
    weights, guide scales, reference images or checkpoints of the same model (a sweep) share
    one compilation."""
    key = ("generate", options, bool(guided), tuple((g.kind, id(g.trained.family)) for g in guides))
    return family.program(key, lambda: _Held(make_generate_fn(family, options, guided, guides),
                                              tuple(g.trained.family for g in guides))).fn


@dataclasses.dataclass(frozen=True)
class _Held:
    """A generate function with the guide families whose ids its key holds (kept alive)."""
    fn: Callable
    guide_families: tuple
