"""Stages: a pipeline of trained models at sampling time (a cascade: base -> SR -> SR).

A stage is one trained model with its sampling options. Stage 0 draws from noise given the
prompts (a base model), or super-resolves given low-resolution images (`--low_res`); each later
stage is a super-resolution model (families/super_resolution.py) whose input is the previous
stage's output, read back from its PNGs (so a resumed job and a fresh one see the same uint8
inputs). Stage k's randomness is fold_in(rng, k) for k >= 1; stage 0 keeps the job's key
itself, so the base stage of a cascade gives exactly the images the base model gives alone
(and jobs from before stages existed keep their images).

Every stage is checked against the one before it before anything runs: an SR stage's input
size must be the previous stage's output size, its channels and data set the same.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os

import jax
import numpy as np

from t2i_jax.sampling.generate import SampleOptions
from t2i_jax.sampling.load import Trained

def stage_rng(rng: jax.Array, k: int) -> jax.Array:
    """Stage k's key: the job's key for stage 0, fold_in(rng, k) after it."""
    return rng if k == 0 else jax.random.fold_in(rng, k)


def is_sr(trained: Trained) -> bool:
    """Whether the model takes images from the stage before it (a super-resolution stage)."""
    return trained.family.stage_input == "image"


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage after stage 0 (super-resolution, or a decoder after a prior): its model and its
    own sampling options, guidance weight and augmentation level (an SR stage's)."""
    trained: Trained
    options: SampleOptions
    guidance: float
    aug_level: float
    flags: tuple = ("--guidance", "--thresholding")  # the flags that set its weight, thresholding

    def record(self, k: int) -> dict:
        o = self.options
        out = {"stage": k, "workdir": self.trained.workdir, "checkpoint_step": self.trained.step,
               "params": self.trained.kind, "sampler": o.sampler, "steps": o.num_steps,
               "eta": o.eta, "thresholding": o.thresholding or "none",
               "ddpm_variance": o.ddpm_variance, "spacing": o.spacing,
               "guidance": self.guidance, "aug_level": self.aug_level}
        if o.thresholding == "dynamic":
            out["percentile"] = o.percentile
        if o.ode_variables is not None:
            out["ode_variables"] = o.ode_variables
        decoder = self.trained.family.decoder_record()
        if decoder:
            out["decoder"] = decoder
        return out


def image_shape(trained: Trained) -> tuple:
    """The (H, W, C) of the images a stage writes (a latent model's decoded ones)."""
    return tuple(trained.family.output_shape)


def check_follows(prev: Trained, stage: Trained, flag: str = "--sr") -> None:
    """Refuses an SR stage that cannot take the previous stage's images (ValueError naming it)."""
    if prev.family.output_kind == "embedding":
        raise ValueError(f"{flag} {stage.workdir} cannot follow {prev.workdir}: that is a "
                         f"{prev.family.name}, which writes CLIP embeddings, not images; a decoder "
                         "comes between them (sample.py --workdir DECODER --prior PRIOR --sr SR).")
    if not is_sr(stage):
        raise ValueError(
            f"{flag} {stage.workdir} holds a {stage.family.name} model, not a super_resolution "
            "one: a cascade's later stages are SR models (train one with e.g. configs/"
            "shapes_sr64.py). A base model goes in --workdir.")
    want = stage.family.low_res_shape
    have = image_shape(prev)
    if want[:2] != have[:2]:
        raise ValueError(
            f"{flag} {stage.workdir} takes {want[0]}x{want[1]} inputs, but the stage before it "
            f"({prev.workdir}) makes {have[0]}x{have[1]} images: chain SR stages whose "
            "sr.low_res_size is the previous stage's data.image_size.")
    if want[2] != have[2]:
        raise ValueError(
            f"{flag} {stage.workdir} takes {want[2]}-channel images, but {prev.workdir} makes "
            f"{have[2]}-channel ones: the stages must share data.channels.")
    a, b = prev.config.data.name, stage.config.data.name
    if a != b:
        raise ValueError(f"{flag} {stage.workdir} was trained on {b!r}, the stage before it "
                         f"({prev.workdir}) on {a!r}: a cascade's stages share one data set.")


def check_prior_decoder(prior: Trained, decoder: Trained, flag: str = "--prior") -> None:
    """Refuses a prior and a decoder that do not share one CLIP embedding space."""
    if prior.family.output_kind != "embedding":
        raise ValueError(f"{flag} {prior.workdir} holds a {prior.family.name} model, not an unCLIP "
                         "prior (train one with configs/digits_prior.py).")
    if decoder.family.stage_input != "embedding":
        raise ValueError(f"{flag} needs an unCLIP decoder in --workdir; {decoder.workdir} holds a "
                         f"{decoder.family.name} model (train one with configs/digits_decoder.py).")
    a, b = prior.family.clip.identity(), decoder.family.clip.identity()
    if (a["sha256"], a["step"]) != (b["sha256"], b["step"]):
        raise ValueError(
            f"the prior {prior.workdir} and the decoder {decoder.workdir} were built on different "
            f"CLIPs ({a['workdir']} step {a['step']}, sha256 {a['sha256'][:12]} vs {b['workdir']} "
            f"step {b['step']}, sha256 {b['sha256'][:12]}): the prior's embeddings would be read "
            "in another embedding space. Train both on one CLIP (config.model.clip).")


def stage_options(trained: Trained, *, sampler=None, steps=None, eta=None, thresholding=None,
                  ddpm_variance=None, flag: str = "--steps", inpaint=None, repaint_jumps: int = 0,
                  repaint_jump_length: int = 10, strength=None,
                  ode_variables=None) -> SampleOptions:
    """A stage's options: the given ones, else its own config's (config.sample); ValueError
    naming `flag` for a step count outside 1..T."""
    cfg = trained.config
    base = SampleOptions.from_config(cfg.sample)
    T = trained.family.schedule.num_timesteps
    n = steps if steps is not None else base.num_steps
    if not 1 <= n <= T:
        raise ValueError(f"{flag} {n} is outside 1..{T}: {trained.workdir} was trained with "
                         f"T = {T} timesteps, and a sampler visits at most all of them.")
    sampler = sampler or base.sampler
    options = SampleOptions(
        sampler=sampler, num_steps=n, eta=base.eta if eta is None else eta,
        thresholding=thresholding or base.thresholding or "none",
        spacing=trained.family.spacing_of(sampler) or base.spacing,
        ddpm_variance=ddpm_variance or base.ddpm_variance, percentile=base.percentile,
        inpaint=inpaint, repaint_jumps=repaint_jumps, repaint_jump_length=repaint_jump_length,
        strength=strength, ode_variables=ode_variables)
    trained.family.check_options(options, flag.replace("steps", "thresholding"))
    return options


def load_low_res(path: str, shape: tuple, flag: str = "--low_res") -> tuple:
    """(uint8 [N, h, w, C], its record) of `--low_res` images (a file, or a directory's *.png in
    name order; each read as a viewer shows it, at the model's channels: user_images.read) or
    an npz (arr_0 [N, h, w, C] uint8, the layout sample.py --npz writes), refused unless every
    image is `shape` (h, w, C). The record's sha256 is of the decoded pixels."""
    from t2i_jax import user_images
    if not os.path.exists(path):
        raise ValueError(f"{flag} {path} does not exist.")
    c = int(shape[-1])
    if os.path.isdir(path):
        names = sorted(glob.glob(os.path.join(path, "*.png")))
        if not names:
            raise ValueError(f"{flag} {path} holds no .png files.")
        arrays = [user_images.read(name, c, flag).uint8 for name in names]
    elif path.endswith(".npz"):
        try:
            with np.load(path) as z:
                if "arr_0" not in z:
                    raise ValueError(f"{flag} {path} has no arr_0 (uint8 [N, h, w, C]).")
                arrays = list(np.asarray(z["arr_0"]))
        except (OSError, EOFError) as e:
            raise ValueError(f"{flag} {path} is not a readable npz ({e}).") from None
    else:
        arrays = [user_images.read(path, c, flag).uint8]
    h, w, c = shape
    out = []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if a.ndim == 2:
            a = a[..., None]
        if a.dtype != np.uint8:
            raise ValueError(f"{flag} image {i} of {path} is {a.dtype}, not uint8.")
        if a.shape[-1] == 3 and c == 1 and np.array_equal(a[..., :1].repeat(3, -1), a):
            a = a[..., :1]  # grey saved as RGB (npz files of grey images are)
        if a.shape[-1] == 4:
            a = a[..., :3]
        if a.shape != (h, w, c):
            raise ValueError(f"{flag} image {i} of {path} is {a.shape[0]}x{a.shape[1]}x"
                             f"{a.shape[2]}, but the model takes {h}x{w}x{c} images"
                             + (" (its sr.low_res_size and data.channels)." if flag == "--low_res"
                                else " (its data.image_size and data.channels)."))
        out.append(a)
    x = np.stack(out)
    digest = hashlib.sha256(x.tobytes()).hexdigest()
    return x, {"path": os.path.abspath(path), "num_images": int(len(x)), "sha256": digest}
