"""A sampling job's identity: everything that determines its images, and each image's record.

The job's images are numbered by a global index (w outer, then prompt, then the image of that
prompt): index = (g * P + p) * N + k for weight g, prompt p, image k. Image k of prompt p draws
its noise from sample id p * N + k (t2i_jax/diffusion/noise.py), the same for every w, so a
sweep over w compares the same starting noise (common random numbers); with shared_noise every
image of a prompt row starts from one noise (an interpolation's frames).

The JobSpec is written to OUTDIR/job.json (sampling/outdir.py) and compared on every rerun: a
field that is at its empty value is left out of the JSON, so jobs from before the field existed
keep their identity and resume.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from t2i_jax.sampling import outdir as out_lib
from t2i_jax.sampling import unclip
from t2i_jax.sampling.generate import SampleOptions


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """Everything that determines a job's images (batch size and devices do not)."""
    prompts: tuple
    num_per_prompt: int
    guidance: tuple
    seed: int
    sampler: str
    num_steps: int
    eta: float
    thresholding: Optional[str]
    spacing: str
    ddpm_variance: str
    params: str
    checkpoint_step: int
    workdir: str
    shard_size: int = 256
    guides: tuple = ()     # each guide's record (kind, workdir, step, scale[, image, image_sha256])
    rerank: int = 1        # candidates per image, the one closest to the prompt kept (CLIP)
    reranker: tuple = ()   # (CLIP workdir, step) that scores them
    stages: tuple = ()     # the stages after stage 0, each its record (stages.Stage.record)
    aug_level: Optional[float] = None  # stage 0's augmentation level when it is an SR model
    low_res: tuple = ()    # stage 0's given inputs: (("path", ..), ("num_images", ..), ("sha256", ..))
    percentile: Optional[float] = None  # dynamic thresholding's p (set when it is dynamic)
    decoder: tuple = ()    # a latent model's autoencoder: (("workdir", ..), ("checkpoint_step", ..),
                           # ("sha256", ..), ("scale_factor", ..))
    embedding: tuple = ()  # where an unCLIP decoder's embeddings come from: (("source", ..),
                           # ("rows", (per-prompt items, ...))) (sampling/unclip.py)
    candidates: int = 1    # a prior stage 0's samples per image, the closest to the text kept
    shared_noise: bool = False  # every image of a prompt row starts from one noise (slerps)
    inpaint: tuple = ()    # stage 0's inpainting: the items of sampling/inpaint.py's record
    negative_prompts: tuple = ()  # stage 0's negative prompt per prompt row
    init_noise: tuple = ()  # the given x_T's record: (("path", ..), ("shape", ..), ("sha256", ..))
    img2img: tuple = ()     # the image's record (path, sha256, pixels_sha256) and the strength
    # stage 0's CFG rule (diffusion/cfg.py), each at its "off" value when not used
    guidance_rescale: float = 0.0       # phi (Lin et al. 2023)
    guidance_interval: tuple = ()       # (lo, hi) of the chain's time (Kynkaanniemi et al. 2024)
    guidance_interval_sigma: tuple = ()  # (lo, hi] of sigma
    apg: tuple = ()         # APG's (eta, norm_threshold, momentum) as frozen items (Sadat et al.)
    ode_variables: Optional[str] = None  # Heun's variables when given ("sigma" or "flow")

    @property
    def options(self) -> SampleOptions:
        paint = dict(thaw(self.inpaint)) if self.inpaint else {}
        return SampleOptions(self.sampler, self.num_steps, self.eta, self.thresholding,
                             self.spacing, self.ddpm_variance,
                             0.995 if self.percentile is None else self.percentile,
                             inpaint=paint.get("method"), repaint_jumps=paint.get("jumps", 0),
                             repaint_jump_length=paint.get("jump_length", 10),
                             strength=thaw(self.img2img)["strength"] if self.img2img else None,
                             ode_variables=self.ode_variables)

    @property
    def num_stages(self) -> int:
        return 1 + len(self.stages)

    @property
    def num_images(self) -> int:
        return len(self.guidance) * len(self.prompts) * self.num_per_prompt

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_images / self.shard_size)

    def shard_bounds(self, s: int) -> tuple:
        """[first, last) image index of shard s."""
        return s * self.shard_size, min((s + 1) * self.shard_size, self.num_images)

    def decompose(self, index: np.ndarray):
        """(guidance slot g, prompt p, image k, noise sample id) of global indices."""
        index = np.asarray(index)
        n, p = self.num_per_prompt, len(self.prompts)
        k = index % n
        pi = (index // n) % p
        g = index // (n * p)
        return g, pi, k, pi * n + (0 if self.shared_noise else k)

    def record(self, index: int) -> dict:
        g, p, k, sid = (int(v) for v in self.decompose(index))
        return {"index": int(index), "file": out_lib.image_file(index), "prompt": self.prompts[p],
                "prompt_index": p, "sample": k, "sample_id": sid, "seed": self.seed,
                "guidance": self.guidance[g], "sampler": self.sampler, "steps": self.num_steps,
                "eta": self.eta, "thresholding": self.thresholding or "none",
                "ddpm_variance": self.ddpm_variance,
                **({"percentile": self.percentile} if self.percentile is not None else {}),
                **({"ode_variables": self.ode_variables} if self.ode_variables is not None
                   else {}),
                "checkpoint_step": self.checkpoint_step, "params": self.params,
                **({"guides": [dict(g) for g in self.guides]} if self.guides else {}),
                **({"rerank": self.rerank} if self.rerank > 1 else {}),
                **({"aug_level": self.aug_level} if self.aug_level is not None else {}),
                **({"low_res": dict(self.low_res)["path"], "low_res_index": p}
                   if self.low_res else {}),
                **({"decoder": dict(self.decoder)} if self.decoder else {}),
                **({"embedding": self.embedding_record(p, k, index)} if self.embedding else {}),
                **({"prior_candidates": self.candidates} if self.candidates > 1 else {}),
                **({"shared_noise": True} if self.shared_noise else {}),
                **({"inpaint": dict(thaw(self.inpaint))} if self.inpaint else {}),
                **({"negative_prompt": self.negative_prompts[p]} if self.negative_prompts else {}),
                **({"init_noise": dict(thaw(self.init_noise), row=int(index))}
                   if self.init_noise else {}),
                **({"img2img": dict(thaw(self.img2img))} if self.img2img else {}),
                **self.rule_record(),
                **({"stages": [dict(st) for st in self.stages],
                    "stage_files": [out_lib.stage_dir(k, self.num_stages) + "/" + (
                        out_lib.embedding_file(index) if k == 0 and self.prior_first else
                        out_lib.image_file(index)) for k in range(self.num_stages - 1)]}
                   if self.stages else {})}

    def rule_record(self) -> dict:
        """The CFG rule's items of job.json and of every image's record ({} for plain CFG)."""
        out = {}
        if self.guidance_rescale:
            out["guidance_rescale"] = self.guidance_rescale
        for key in ("guidance_interval", "guidance_interval_sigma"):
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        if self.apg:
            out["apg"] = thaw(self.apg)
        return out

    def stage_record_fn(self, k: int, kind: str = "image"):
        """Stage k's per-image records: the job's, marked with the stage for the earlier stages
        (a stage that writes embeddings names its .npy files)."""
        if k == self.num_stages - 1:
            return self.record
        if kind == "embedding":
            return lambda i: dict(self.record(i), stage=k, file=out_lib.embedding_file(i))
        return lambda i: dict(self.record(i), stage=k)

    @property
    def prior_first(self) -> bool:
        """Whether stage 0 is an unCLIP prior (its outputs are embeddings)."""
        return bool(self.embedding) and dict(thaw(self.embedding))["source"] == "prior"

    def embedding_record(self, p: int, k: int, index: int) -> dict:
        """Where image (prompt p, sample k)'s embedding came from (sampling/unclip.py); from a
        prior: stage 0 (the job's workdir, checkpoint, guidance) and its file."""
        out = unclip.embedding_record(thaw(self.embedding), p, k, self.num_per_prompt)
        if self.prior_first:
            g = int(self.decompose(index)[0])
            out.update(stage=0, workdir=self.workdir, checkpoint_step=self.checkpoint_step,
                       guidance=self.guidance[g], candidates=self.candidates,
                       file=out_lib.stage_dir(0, self.num_stages) + "/"
                       + out_lib.embedding_file(index))
        return out

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["prompts"], d["guidance"] = list(self.prompts), list(self.guidance)
        # Jobs without guides keep the identity they had before guides existed.
        if self.guides:
            d["guides"] = [dict(g) for g in self.guides]
        else:
            del d["guides"]
        if self.rerank == 1:
            del d["rerank"], d["reranker"]
        else:
            d["reranker"] = list(self.reranker)
        # Jobs without stages, levels or given inputs keep the identity they had before.
        for key, empty in (("stages", ()), ("aug_level", None), ("low_res", ()),
                           ("percentile", None), ("decoder", ()), ("embedding", ()),
                           ("candidates", 1), ("shared_noise", False), ("inpaint", ()),
                           ("negative_prompts", ()), ("init_noise", ()), ("img2img", ()),
                           ("guidance_rescale", 0.0), ("guidance_interval", ()),
                           ("guidance_interval_sigma", ()), ("apg", ()),
                           ("ode_variables", None)):
            if getattr(self, key) == empty:
                del d[key]
        d.update(self.rule_record())
        if self.stages:
            d["stages"] = [dict(st) for st in self.stages]
        if self.low_res:
            d["low_res"] = dict(self.low_res)
        if self.decoder:  # as JSON reads it back, so a rerun recognises its own job
            d["decoder"] = dict(self.decoder)
        if self.embedding:
            d["embedding"] = thaw(self.embedding)
        if self.negative_prompts:
            d["negative_prompts"] = list(self.negative_prompts)
        for key in ("init_noise", "img2img"):
            if getattr(self, key):
                d[key] = thaw(getattr(self, key))
        if self.inpaint:
            d["inpaint"] = thaw(self.inpaint)
        return d


def freeze(obj):
    """dicts and lists -> nested tuples of items (a frozen, comparable JobSpec field)."""
    if isinstance(obj, dict):
        return ("__dict__",) + tuple((k, freeze(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return ("__list__",) + tuple(freeze(v) for v in obj)
    return obj


def thaw(obj):
    if isinstance(obj, tuple) and obj and obj[0] == "__dict__":
        return {k: thaw(v) for k, v in obj[1:]}
    if isinstance(obj, tuple) and obj and obj[0] == "__list__":
        return [thaw(v) for v in obj[1:]]
    return obj
