"""A sampling plan: the stages of one job with everything each is given, checked whole.

    plan = Plan.create(trained, ["seven"], num_per_prompt=16, guidance=(3.0,), seed=0,
                       options=SampleOptions("ddim", 50))
    result = job.run_job(plan, "OUT", batch_size=64)

Stage 0 is `trained` (its options, a sweep of guidance weights, its guides, reranking or prior
candidates, inpainting); `stages` follow it, each taking the one before it's outputs (a
cascade's SR stages, a decoder after a prior). What a stage takes from the stage before it is
its family's `stage_input` ("image", "embedding"); stage 0 with a stage_input is `given` it:
low-resolution images for an SR model, CLIP embeddings for a decoder. Every object here holds
its arrays and the record the job keeps of them together, and `plan.spec` (the job's identity,
sampling/spec.py) is derived from them, so the two cannot disagree.

`sampling/request.py` builds a plan from what a user asks (sample.py's flags); reproductions
and tests build one directly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import numpy as np

from t2i_jax.diffusion import cfg
from t2i_jax.errors import UsageError
from t2i_jax.sampling.best_of import PRIOR_STREAM, RERANK_STREAM, BestOf
from t2i_jax.sampling.generate import SampleOptions
from t2i_jax.sampling.guides import clip_score_fn, text_rows
from t2i_jax.sampling.load import Trained
from t2i_jax.sampling.spec import JobSpec, freeze


@dataclasses.dataclass(frozen=True)
class Given:
    """Stage 0's input in place of a stage before it, with the record the job keeps of it:
    uint8 low-resolution images [P, h, w, C] (record: path, num_images, sha256) or CLIP image
    embeddings [P, E] / [P, N, E] (record: source, rows; sampling/unclip.py)."""
    array: np.ndarray
    record: dict
    per_image: bool = False  # [P, N, ...]: one per image (an interpolation's frames)

    def rows(self, index: np.ndarray, p: np.ndarray, k: np.ndarray) -> np.ndarray:
        """The inputs of one call's rows (prompt row p, image k of it)."""
        return self.array[p, k] if self.per_image else self.array[p]


@dataclasses.dataclass(frozen=True)
class Inpaint:
    """Stage 0's inpainting input: the known image float32 [P, H, W, C] in [-1, 1] and mask
    [P, H, W, 1] (1 = known), one per prompt row, with sampling/inpaint.py's record."""
    image: np.ndarray
    mask: np.ndarray
    record: dict

    @classmethod
    def create(cls, image, mask, record: dict, shape: Sequence[int], num_prompts: int):
        """One image and mask for every row ([H, W, C], [H, W, 1]) or one per prompt row."""
        image_shape, mask_shape = tuple(shape), tuple(shape[:2]) + (1,)
        per_prompt = np.ndim(image) == len(image_shape) + 1
        lead = (num_prompts,) if per_prompt else ()
        if tuple(np.shape(image)) != lead + image_shape or tuple(np.shape(mask)) != lead + mask_shape:
            raise ValueError(f"the image to inpaint {np.shape(image)} and its mask "
                             f"{np.shape(mask)} must be the model's {image_shape} and "
                             f"{mask_shape}, or one per prompt ([P, ...], P = {num_prompts}).")
        image, mask = (np.broadcast_to(np.asarray(a, np.float32), (num_prompts,) + s)
                       for a, s in ((image, image_shape), (mask, mask_shape)))
        return cls(image, mask, dict(record))


@dataclasses.dataclass(frozen=True)
class InitNoise:
    """x_T of every image of the job, in index order: float32 [N] + the chain's shape (latents
    for a latent model), with its record (path, sha256 of the array, shape)."""
    array: np.ndarray
    record: dict

    @classmethod
    def read(cls, path: str, flag: str = "--init_noise") -> "InitNoise":
        import hashlib
        import os
        try:
            a = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{flag} {path} is not a readable .npy array ({e}).") from None
        if not isinstance(a, np.ndarray) or not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{flag} {path} holds {getattr(a, 'dtype', type(a).__name__)}, not a "
                             "float array [N, H, W, C].")
        a = np.ascontiguousarray(a, np.float32)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{flag} {path} holds NaN or Inf.")
        return cls(a, {"path": os.path.abspath(path), "shape": list(a.shape),
                       "sha256": hashlib.sha256(a.tobytes()).hexdigest()})


@dataclasses.dataclass(frozen=True)
class InitImage:
    """img2img's start: float32 [P, H, W, C] in [-1, 1] (one image for every prompt row, or one
    per row) with its record (user_images': path, sha256, pixels_sha256; and the strength)."""
    image: np.ndarray
    record: dict


@dataclasses.dataclass(frozen=True)
class Plan:
    """One sampling job: stage 0 (`first`) with its options and inputs, then `stages`."""
    first: Trained
    prompts: tuple
    num_per_prompt: int
    guidance: tuple
    seed: int
    options: SampleOptions
    shard_size: int = 256
    guides: tuple = ()                  # sampling/guides.py Guides of stage 0
    rerank: int = 1                     # CLIP reranking: candidates per image
    reranker: Optional[Trained] = None  # the CLIP that scores them
    stages: tuple = ()                  # sampling/stages.py Stages after stage 0
    given: Optional[Given] = None       # stage 0's stage_input
    aug_level: Optional[float] = None   # stage 0's augmentation level (an SR model's)
    inpaint: Optional[Inpaint] = None
    candidates: int = 1                 # a prior stage 0's candidates per image
    shared_noise: bool = False          # one noise per prompt row (an interpolation)
    flags: tuple = ("--guidance", "--thresholding")  # the flags of stage 0's weight, thresholding
    negative: tuple = ()                # stage 0's negative prompt per prompt row (() : none)
    init_noise: Optional[InitNoise] = None  # x_T of every image (--init_noise)
    init_image: Optional[InitImage] = None  # img2img's start (--init_image, options.strength)
    guidance_rule: Optional[cfg.Rule] = None  # stage 0's CFG rule: rescale, interval, APG

    @classmethod
    def create(cls, trained: Trained, prompts: Sequence[str], *, num_per_prompt: int,
               guidance: Sequence[float], seed: int, options: SampleOptions, **kw) -> "Plan":
        """The plan, refused (ValueError naming the problem and the fix) unless it is whole. A
        guidance_rule's methods at their no-op values (phi = 0, the interval [0, 1]) are off:
        such a plan is plain CFG's job, with its identity and its program."""
        kw["guidance_rule"] = simplified(kw.get("guidance_rule"))
        plan = cls(trained, tuple(prompts), num_per_prompt, tuple(float(w) for w in guidance),
                   seed, options, **kw)
        plan.check()
        return plan

    def check(self) -> None:
        first, fam, n_prompts = self.first, self.first.family, len(self.prompts)
        if not self.prompts:
            raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts_file FILE.")
        if self.num_per_prompt < 1:
            raise ValueError(f"num_per_prompt must be >= 1, got {self.num_per_prompt}.")
        if not self.guidance:
            raise ValueError("no guidance weight given.")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}.")
        for name, flag in (("rerank", "--rerank"), ("candidates", "--prior_candidates")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{flag} must be an integer >= 1 (candidates per image; 1: no "
                                 f"selection), got {v!r}.")
        if self.rerank > 1 and self.reranker is None:
            raise ValueError("--rerank needs --clip DIR: the CLIP that scores the candidates.")
        if any(w != 0.0 for w in self.guidance) and not fam.conditioning.guidable:
            raise ValueError(f"this model is unconditional: there is no condition for "
                             f"classifier-free guidance to drop, so the guidance weight must be 0 "
                             f"(got {[w for w in self.guidance if w]}). Pass --guidance 0.")
        self._check_rule()
        last = self.stages[-1].trained if self.stages else first
        if last.family.output_kind != "image":
            raise ValueError(f"{last.workdir} holds a {last.family.name}, which writes CLIP "
                             "embeddings, not images: a decoder stage must follow it (sample.py "
                             "--workdir DECODER --prior PRIOR).")
        if self.candidates > 1 and fam.output_kind != "embedding":
            raise ValueError("prior candidates (--prior_candidates > 1) need a prior as stage 0.")
        if fam.stage_input == "image" and (self.given is None or self.aug_level is None):
            raise ValueError(f"{first.workdir} is a super-resolution model: it needs low-resolution "
                             "inputs (--low_res FILE_OR_DIR) and an augmentation level, or put a "
                             "base model in --workdir and this one in --sr.")
        if fam.stage_input == "embedding" and self.given is None:
            raise ValueError(f"{first.workdir} is an unCLIP decoder: each image needs a CLIP "
                             "image embedding (a prior stage before it, or given embeddings).")
        if fam.stage_input is None and self.given is not None:
            raise ValueError(f"inputs were given to {first.workdir}, a {fam.name} model, which "
                             "takes none (an SR model takes low-resolution images, a decoder "
                             "CLIP embeddings).")
        if self.given is not None:
            want = (n_prompts, self.num_per_prompt) if self.given.per_image else (n_prompts,)
            if tuple(self.given.array.shape[:len(want)]) != want:
                raise ValueError(f"{self.given.array.shape[0]} given inputs (shape "
                                 f"{self.given.array.shape}) for {n_prompts} prompts x "
                                 f"{self.num_per_prompt} images: give one per prompt.")
            rows = self.given.record.get("rows")
            if rows is not None and len(rows) not in (0, n_prompts):
                raise ValueError(f"{len(rows)} embedding rows for {n_prompts} prompts.")
        method = None if self.inpaint is None else self.inpaint.record["method"]
        if method != self.options.inpaint:
            raise ValueError("the inpainting record and the options' method disagree "
                             "(sampling/inpaint.py's record with SampleOptions.inpaint).")
        if self.inpaint is not None and self.inpaint.image.shape[0] != n_prompts:
            raise ValueError(f"{self.inpaint.image.shape[0]} images to inpaint for {n_prompts} "
                             "prompts.")
        if self.negative and len(self.negative) != n_prompts:
            raise ValueError(f"{len(self.negative)} negative prompts for {n_prompts} prompts: give "
                             "one for all, or one per prompt.")
        if self.init_noise is not None:
            want = (len(self.guidance) * n_prompts * self.num_per_prompt,) + tuple(fam.image_shape)
            got = tuple(self.init_noise.array.shape)
            if got != want:
                raise UsageError(
                    f"--init_noise {self.init_noise.record['path']} has shape {list(got)}, but "
                    f"this job starts {want[0]} chains ({len(self.guidance)} guidance weight(s) x "
                    f"{n_prompts} prompt(s) x {self.num_per_prompt}) of shape {list(want[1:])}"
                    + (" (latents of the model's decoder)" if fam.latent else "")
                    + f": give an array of shape {list(want)}, in index order.")
            if self.rerank > 1 or self.candidates > 1:
                raise ValueError("--init_noise fixes each image's x_T: candidates (--rerank, "
                                 "--prior_candidates) would all start from it.")
        if (self.init_image is None) != (self.options.strength is None):
            raise ValueError("img2img needs both the image and options.strength.")
        if self.init_image is not None:
            want = tuple(fam.output_shape)
            got = tuple(self.init_image.image.shape)
            if got[1:] != want or got[0] not in (1, n_prompts):
                raise UsageError(f"--init_image {self.init_image.record.get('path')} is "
                                 f"{got[1]}x{got[2]}x{got[3]}, but {first.workdir} draws "
                                 f"{want[0]}x{want[1]}x{want[2]} images: resize it to its size.")
            if fam.stage_input is not None:
                raise ValueError(f"--init_image (img2img) needs a model that draws from noise; "
                                 f"{first.workdir} takes inputs from a stage before it.")

    def _check_rule(self) -> None:
        """Refuses a guidance rule with no classifier-free guidance to act on, or bad values."""
        rule, fam = self.guidance_rule, self.first.family
        if rule is None:
            return
        rule.check()
        flags = " / ".join(rule_flags(rule))
        if not fam.conditioning.guidable:
            raise ValueError(f"{flags} act on classifier-free guidance, which {self.first.workdir} "
                             "does not have (an unconditional model: no null condition): leave "
                             "them out.")
        if all(w == 0.0 for w in self.guidance):
            raise ValueError(f"{flags} act on classifier-free guidance, but every guidance weight "
                             f"is 0 ({self.flags[0]} 0: conditional sampling, nothing to combine):"
                             f" pass {self.flags[0]} W with W != 0, or leave them out.")
        if rule.apg is not None and self.options.inpaint is not None:
            raise ValueError("--apg carries its momentum along one chain, which inpainting "
                             "(GLIDE's known region, RePaint's chain) does not thread yet: leave "
                             "--apg out with --inpaint.")

    @functools.cached_property
    def spec(self) -> JobSpec:
        """The job's identity (OUTDIR/job.json) and its records."""
        t, o, fam = self.first, self.options, self.first.family
        given = self.given.record if self.given is not None else None
        embedding = ({"source": "prior"} if fam.output_kind == "embedding"
                     else given if fam.stage_input == "embedding" else None)
        low_res = given if fam.stage_input == "image" else None
        return JobSpec(
            prompts=self.prompts, num_per_prompt=int(self.num_per_prompt),
            guidance=self.guidance, seed=int(self.seed), sampler=o.sampler,
            num_steps=int(o.num_steps), eta=float(o.eta), thresholding=o.thresholding,
            spacing=o.spacing, ddpm_variance=o.ddpm_variance, ode_variables=o.ode_variables,
            params=t.kind,
            checkpoint_step=t.step, workdir=t.workdir, shard_size=int(self.shard_size),
            guides=tuple(g.record() for g in self.guides), rerank=int(self.rerank),
            reranker=(self.reranker.workdir, self.reranker.step) if self.rerank > 1 else (),
            stages=tuple(st.record(k + 1) for k, st in enumerate(self.stages)),
            aug_level=None if self.aug_level is None else float(self.aug_level),
            low_res=tuple(low_res.items()) if low_res is not None else (),
            percentile=float(o.percentile) if o.thresholding == "dynamic" else None,
            decoder=tuple(fam.decoder_record().items()),
            embedding=freeze(embedding) if embedding else (), candidates=int(self.candidates),
            shared_noise=bool(self.shared_noise),
            inpaint=freeze(self.inpaint.record) if self.inpaint is not None else (),
            negative_prompts=tuple(self.negative),
            init_noise=freeze(self.init_noise.record) if self.init_noise is not None else (),
            img2img=freeze(dict(self.init_image.record, strength=float(o.strength)))
            if self.init_image is not None else (), **rule_fields(self.guidance_rule))

    @functools.cached_property
    def prompt_tokens(self):
        """Stage 0's Tokens of the prompts (ids, mask, truncated), or None for a model that reads
        no text: every prompt is tokenized once, for the conditions and the truncation report."""
        tokenizer = self.first.family.tokenizer
        return None if tokenizer is None else tokenizer(list(self.prompts), warn=False)

    @functools.cached_property
    def conditions(self) -> list:
        """Each stage's Condition rows [P] of the prompts (an empty prompt: the null row); stage
        0's with its negative prompts and img2img image."""
        conds = [m.family.conditioning.of_prompts(
            self.prompts, tokens=self.prompt_tokens if k == 0 else None,
            negative=list(self.negative) if k == 0 and self.negative else None)
            for k, m in enumerate(self.models)]
        if self.init_image is not None:
            image = np.broadcast_to(self.init_image.image,
                                    (len(self.prompts),) + self.init_image.image.shape[1:])
            conds[0] = conds[0].replace(init_image=np.ascontiguousarray(image))
        return conds

    @property
    def models(self) -> list:
        return [self.first] + [st.trained for st in self.stages]

    def stage_runs(self, place) -> list:
        """Every stage as the runner sees it (StageRun), stage 0 with what it alone has;
        place(tree): parameters onto the job's devices."""
        first = StageRun(self.first, self.options, self.guidance, self.aug_level, self.given,
                         self.inpaint, self.guides, self.best_of(place), self.flags,
                         self.init_noise, self.guidance_rule)
        return [first] + [StageRun(st.trained, st.options, (st.guidance,), st.aug_level,
                                   flags=st.flags) for st in self.stages]

    def best_of(self, place) -> Optional[BestOf]:
        """Stage 0's selection among candidates: a prior's, or CLIP reranking (or none)."""
        fam = self.first.family
        if self.candidates > 1:
            return BestOf(self.candidates, PRIOR_STREAM,
                          lambda cond, rows_of: fam.candidate_score(cond),
                          ("prior_candidate", "prior_score"))
        if self.rerank > 1:
            score, params = clip_score_fn(self.reranker.family), place(self.reranker.params)
            rows = text_rows(self.reranker, self.prompts)                     # [P, ...] each
            return BestOf(self.rerank, RERANK_STREAM,
                          lambda cond, rows_of: lambda x: score(params, x, rows_of(rows)),
                          ("rerank_score", "rerank_candidate"), finite_only=True)
        return None


@dataclasses.dataclass(frozen=True)
class StageRun:
    """One stage of a running job: its model, options and weights ([G] of the sweep, or one),
    augmentation level, and stage 0's given input, inpainting, guides and selection."""
    trained: Trained
    options: SampleOptions
    guidance: tuple
    aug_level: Optional[float] = None
    given: Optional[Given] = None
    inpaint: Optional[Inpaint] = None
    guides: tuple = ()
    best_of: Optional[BestOf] = None
    flags: tuple = ("--guidance", "--thresholding")  # what sets its weight and thresholding
    init_noise: Optional[InitNoise] = None
    guidance_rule: Optional[cfg.Rule] = None  # how its guided program combines the two rows

    @property
    def family(self):
        return self.trained.family

    def rule_args(self) -> Optional[cfg.Rule]:
        """The guidance rule as the program's traced argument (float32 values), or None."""
        if self.guidance_rule is None or not self.guided:
            return None
        return jax.tree_util.tree_map(np.float32, self.guidance_rule)

    @property
    def guided(self) -> bool:
        return any(w != 0.0 for w in self.guidance) and self.family.conditioning.guidable

    def weights(self, g: np.ndarray) -> np.ndarray:
        """float32 [B]: the guidance weight of each row (its slot g of the sweep)."""
        w = np.asarray(self.guidance, np.float32)
        return w[g] if len(w) > 1 else np.full(np.shape(g), w[0], np.float32)


def simplified(rule: Optional[cfg.Rule]) -> Optional[cfg.Rule]:
    """The rule with its methods at their no-op values off (phi = 0; an interval [0, 1] of the
    chain's time), its values Python floats; None when only CFG is left. APG stays on: even at
    eta = 1 it equals CFG only up to float rounding."""
    if rule is None:
        return None
    try:
        pair = lambda b: None if b is None else tuple(float(v) for v in b)  # noqa: E731
        rescale = None if rule.rescale is None or float(rule.rescale) == 0.0 \
            else float(rule.rescale)
        interval = pair(rule.interval)
        apg = None if rule.apg is None else cfg.APG(*(float(v) for v in rule.apg))
    except (TypeError, ValueError):
        raise ValueError(f"a plan's guidance rule takes one number per value (a sweep over them "
                         f"is one job each, sharing one program), got {rule}.") from None
    rule = cfg.Rule(rescale, None if interval == (0.0, 1.0) else interval,
                    pair(rule.sigma_interval), apg)
    return None if rule == cfg.Rule() else rule


def rule_flags(rule: cfg.Rule) -> list:
    """The sample.py flags that set the rule's methods."""
    return [flag for flag, v in (("--guidance_rescale", rule.rescale),
                                 ("--guidance_interval", rule.interval),
                                 ("--guidance_interval_sigma", rule.sigma_interval),
                                 ("--apg", rule.apg)) if v is not None]


def rule_fields(rule: Optional[cfg.Rule]) -> dict:
    """The JobSpec fields of a (simplified) guidance rule: none for plain CFG."""
    if rule is None:
        return {}
    out = {}
    if rule.rescale is not None:
        out["guidance_rescale"] = rule.rescale
    for field, name in (("guidance_interval", "interval"),
                        ("guidance_interval_sigma", "sigma_interval")):
        if getattr(rule, name) is not None:
            out[field] = tuple(getattr(rule, name))
    if rule.apg is not None:
        out["apg"] = freeze(rule.apg._asdict())
    return out
