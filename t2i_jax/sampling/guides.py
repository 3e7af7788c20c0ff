"""Gradient guides: trained models whose gradient steers the sampling chain of a diffusion model.

Every guide g gives a differentiable f_g(x_t, t) per image, and the chain uses the general form
(Dhariwal & Nichol 2021, eq. 14; Liu et al. 2023, eq. 5):

    eps~ = eps - sqrt(1 - abar_t) * grad_x sum_g scale_g f_g(x_t, t)

applied after classifier-free guidance, with the ORIGINAL timestep t of every (respaced) step.
  classifier  f = log p(y | x_t, t) of ADM's noisy classifier, y the prompt's class
  clip_text   f = cos(E_img(x_t, t), E_text(prompt)) (SDG's language guidance); an empty prompt
              has no text term
  clip_image  f = cos(E_img(x_t, t), E_img(x'_t, t)), x'_t = q_sample(x', t, n') of a reference
              image x' with its own fixed noise n' (SDG's image-content guidance)
The scales are traced values of the one generate program: a sweep over them compiles once.
Each guide is checked against the model it serves before anything runs (data set, image size,
channels, diffusion schedule) and is recorded with its checkpoint step in the job.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax import user_images
from t2i_jax.diffusion import forward
from t2i_jax.errors import UsageError
from t2i_jax.sampling.load import Trained, load_trained

KINDS = ("classifier", "clip_text", "clip_image")
WANTS = {"--classifier": "noisy_classifier", "--clip": "contrastive"}  # for the refusal's words
# For a guide whose stored config has no `guide` section (trained before it existed): the best
# scales of the digits sweeps (docs/results.md), as configs/digits_classifier.py and
# digits_clip.py set them.
DEFAULT_SCALES = {"classifier": 3.0, "clip_text": 30.0, "clip_image": 100.0}
SCALE_FLAGS = {"classifier": "--classifier_scale", "clip_text": "--clip_scale",
               "clip_image": "--image_scale"}
# Larger scales make the guide's gradient dwarf the model's prediction: every pixel saturates to
# black or white (100 times the largest default).
MAX_SCALE = 1e4
REFERENCE_NOISE_STREAM = 13  # x'_t's fixed noise n' = normal(fold_in(key(seed), 13))


def check_scale(name: str, scale) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0 turns the guide off), got {scale}.")
    if value > MAX_SCALE:
        raise ValueError(f"{name} {value:g} is above {MAX_SCALE:g}: the guide's gradient would "
                         "dwarf the model's prediction and push every pixel to black or white. "
                         "The defaults are " + ", ".join(f"{v:g} ({SCALE_FLAGS[k]})" for k, v in
                                                         DEFAULT_SCALES.items()) + ".")
    return value


def default_scale(trained: Trained, kind: str) -> float:
    """The guide's default scale: its config's `guide.<kind>_scale`, else DEFAULT_SCALES."""
    guide = trained.config.get("guide", None)
    if guide is not None and f"{kind}_scale" in guide:
        return float(guide[f"{kind}_scale"])
    return DEFAULT_SCALES[kind]


def check_matches(guide: Trained, model: Trained, flag: str) -> None:
    """Refuses a guide trained for other images or another diffusion schedule than the model's."""
    g, m = guide.config, model.config
    diffs = []
    for key in ("name", "image_size", "channels"):
        if g.data[key] != m.data[key]:
            diffs.append(f"data.{key}: {g.data[key]!r} (guide) vs {m.data[key]!r} (model)")
    if not diffs and tuple(guide.family.image_shape) != tuple(model.family.image_shape):
        # a latent model's x_t is a latent [H/f, W/f, c], not the pixels of its data set
        diffs.append(f"the guide reads x_t of shape {tuple(guide.family.image_shape)}, the "
                     f"model's x_t is {tuple(model.family.image_shape)}"
                     + (" (a latent: guides of a latent model are trained on its latents)"
                        if model.family.latent else ""))
    for key, default in (("process", "vp"), ("schedule", None), ("num_timesteps", None),
                         ("zero_terminal_snr", None)):
        if g.diffusion.get(key, default) != m.diffusion.get(key, default):
            diffs.append(f"diffusion.{key}: {g.diffusion.get(key, default)!r} (guide) vs "
                         f"{m.diffusion.get(key, default)!r} (model)")
    if diffs:
        raise ValueError(f"{flag} {guide.workdir} was trained for another model than "
                         f"{model.workdir}: " + "; ".join(diffs) + ". Train the guide with the "
                         "model's data set, image size, channels and diffusion schedule.")


def load_guide_model(workdir: str, flag: str, model: Trained, mesh=None,
                     frozen_paths=None) -> Trained:
    """The guide's EMA parameters, refused if it is the wrong family or made for other data."""
    trained = load_trained(workdir, mesh=mesh, frozen_paths=frozen_paths)
    if trained.family.guide_flag != flag:
        other = trained.family.guide_flag
        raise UsageError(f"{flag} {workdir} holds a {trained.family.name} model, not a "
                         f"{WANTS[flag]}" + (f"; pass it as {other}" if other else "") + ".")
    check_matches(trained, model, flag)
    return trained


@dataclasses.dataclass
class Guide:
    """One guide of a job: its kind, trained model, scale and what the job records of it."""
    kind: str
    trained: Trained
    scale: float
    image: Optional[str] = None       # clip_image: the reference image's path
    reference: Optional[np.ndarray] = None  # clip_image: x' [H, W, C] in [-1, 1]

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown guide kind {self.kind!r}; choose one of {KINDS}.")
        self.scale = check_scale(f"the {self.kind} guide's scale", self.scale)

    def record(self) -> dict:
        d = dict(kind=self.kind, workdir=self.trained.workdir, step=self.trained.step,
                 scale=self.scale)
        if self.image is not None:
            d["image"] = os.path.abspath(self.image)
            d["image_sha256"] = user_images.file_sha256(self.image)
            d["image_pixels_sha256"] = user_images.pixels_sha256(self.reference)  # as resized
        return d

    def rows(self, prompts: Sequence[str]) -> Any:
        """The per-prompt data the guide reads [P, ...] (host arrays), computed once."""
        fam = self.trained.family
        if self.kind == "classifier":
            return np.asarray(fam.conditioning.label_of(prompts))
        if self.kind == "clip_text":
            return text_rows(self.trained, prompts)
        x = np.broadcast_to(self.reference, (len(prompts),) + self.reference.shape)
        return dict(x_ref=np.ascontiguousarray(x))

    def f(self, params, rows, x_t, t, noise_ref):
        """f_g(x_t, t) [B] with the rows of this call's images."""
        fam = self.trained.family
        if self.kind == "classifier":
            return fam.log_prob_fn(params)(x_t, t, rows)
        z = fam.embed_image(params, x_t, t)                                 # [B, E]
        if self.kind == "clip_text":
            return jnp.sum(z * rows["z_text"], -1) * rows["has_text"]
        x_ref_t = forward.q_sample(fam.schedule, rows["x_ref"], t, noise_ref)
        z_ref = jax.lax.stop_gradient(fam.embed_image(params, x_ref_t, t))
        return jnp.sum(z * z_ref, -1)


def text_rows(clip: Trained, prompts: Sequence[str]) -> dict:
    """z_text [P, E] (the CLIP's text embedding of each prompt) and has_text [P] (0: empty)."""
    from t2i_jax.conditioning import tokenizers
    fam = clip.family
    toks = tokenizers.tokenize([p or "" for p in prompts], fam.max_length, warn=False)
    z = np.asarray(fam.program("embed_text", lambda: jax.jit(fam.embed_text))(
        clip.params, toks.ids, toks.mask))
    return dict(z_text=z, has_text=np.asarray([bool(p) for p in prompts], np.float32))


def clip_score_fn(family):
    """score(params, x0 [B, ...], text_rows) -> cos(E_img(x0, 0), E_text) [B] from the clean
    towers (NaN for an empty prompt): the CLIP score of generated images, and reranking's."""
    def make():
        @jax.jit
        def score(params, x0, rows):
            z = family.embed_image(params, x0, jnp.zeros((x0.shape[0],), jnp.int32))
            cos = jnp.sum(z * rows["z_text"], -1)
            return jnp.where(rows["has_text"] > 0, cos, jnp.nan)
        return score
    return family.program("clip_score", make)


def load_reference(path: str, model: Trained) -> np.ndarray:
    """The reference image (read as a viewer shows it: user_images.read) resized to the model's
    size and channels, in [-1, 1]."""
    from t2i_jax.data.pipeline import process_image
    size, channels = model.config.data.image_size, model.config.data.channels
    return process_image(user_images.read(path, channels, "--guide_image").uint8, size, channels)


def guide_fn(guides: Sequence[Guide]):
    """f(guide_params, rows, scales [G], noise_ref, x_t, t) = sum_g scales[g] f_g: [B]."""
    def total(guide_params, rows, scales, noise_ref, x_t, t):
        out = 0.0
        for g, (guide, p, r) in enumerate(zip(guides, guide_params, rows)):
            out = out + scales[g] * guide.f(p, r, x_t, t, noise_ref)
        return out
    return total
