"""From conditions to images with a trained Denoiser: encode once, then samplers.sample.

`make_generate_fn` returns ONE jitted function of (params, cond, rng, guidance_weight,
sample_ids); new prompts, seeds and guidance weights reuse its compilation. Sample i's noise
comes from its global index sample_ids[i] (t2i_jax/diffusion/noise.py), so an image does not
depend on the batch it was drawn in or on the number of devices.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.conditioning import Condition
from t2i_jax.diffusion import noise, samplers
from t2i_jax.diffusion.schedules import Schedule
from t2i_jax.models.denoiser import Denoiser, denoise_fn


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    sampler: str = "ddim"
    num_steps: int = 50
    eta: float = 0.0
    thresholding: Optional[str] = "static"   # "static" (clip x0_hat), "dynamic" (Imagen), None / "none"
    spacing: str = "trailing"
    ddpm_variance: str = "posterior"  # ddpm only: "posterior" (beta~) or "beta" (DDIM paper's sigma-hat)

    @classmethod
    def from_config(cls, sample) -> "SampleOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(sample).items() if k in names})

    def __post_init__(self):
        if self.thresholding in ("none", ""):
            object.__setattr__(self, "thresholding", None)
        if self.thresholding not in (None, "static", "dynamic"):
            raise ValueError(f"unknown thresholding {self.thresholding!r}; choose static, dynamic "
                             "or none.")
        if self.ddpm_variance not in samplers.DDPM_VARIANCES:
            raise ValueError(f"unknown ddpm_variance {self.ddpm_variance!r}; choose one of "
                             f"{samplers.DDPM_VARIANCES}.")
        if self.sampler not in samplers.SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of "
                             f"{sorted(samplers.SAMPLERS)}.")
        try:
            eta = float(self.eta)
        except (TypeError, ValueError):
            eta = float("nan")
        if not 0.0 <= eta <= 1.0:  # NaN fails too
            raise ValueError(f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: as much "
                             f"noise as DDPM), got {self.eta}.")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, (int, np.integer)) \
                or self.num_steps < 1:
            raise ValueError(f"the number of sampling steps must be an integer >= 1, got "
                             f"{self.num_steps!r}.")


def make_generate_fn(model: Denoiser, schedule: Schedule, image_shape: tuple,
                     null: Optional[Condition], options: SampleOptions,
                     prediction: str = "eps") -> Callable:
    """Returns generate(params, cond [B], rng, guidance_weight, sample_ids [B]) -> x0 [B, H, W, C]
    in [-1, 1] (clipped; NaN where the chain produced a non-finite value). null is the model's null condition (batch 1); guidance_weight ([] or
    [B]) is the w of eps~ = (1 + w) eps(x, y) - w eps(x, null). With null=None the model is
    evaluated once per step on the condition alone (guidance_weight is ignored: w = 0), half the
    work of a guided step."""
    samplers.check_chain(schedule, options.num_steps, options.spacing, prediction)  # fails here, not in jit

    def generate(params, cond: Condition, rng, guidance_weight, sample_ids):
        enc = model.apply(params, cond, method=Denoiser.encode)
        null_enc = None if null is None else model.apply(params, null, method=Denoiser.encode)
        x_T = noise.initial_noise(rng, (cond.batch_size,) + tuple(image_shape), sample_ids)
        x0 = samplers.sample(
            denoise_fn(model, params), schedule, x_T, cond=enc, null_cond=null_enc,
            guidance_weight=0.0 if null is None else guidance_weight, sampler=options.sampler,
            num_steps=options.num_steps, eta=options.eta, rng=rng,
            thresholding=options.thresholding, prediction=prediction, spacing=options.spacing,
            ddpm_variance=options.ddpm_variance, sample_ids=sample_ids)
        # Clipping would turn +-inf into a valid-looking white or black pixel: NaN marks every
        # non-finite value, so callers can refuse the image (clip keeps NaN).
        return jnp.clip(jnp.where(jnp.isfinite(x0), x0, jnp.nan), -1.0, 1.0)

    return jax.jit(generate)
