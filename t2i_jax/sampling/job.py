"""Batch sampling jobs: many prompts x many images x guidance weights, sharded, resumable.

    spec = JobSpec.create(trained, prompts, num_per_prompt=16, guidance=(3.0,), seed=0,
                          options=SampleOptions("ddim", 50))
    result = run_job(trained, spec, "OUT", batch_size=64)

The job's images are numbered by a global index (w outer, then prompt, then the image of that
prompt): index = (g * P + p) * N + k for weight g, prompt p, image k. Image k of prompt p draws
its noise from sample id p * N + k (t2i_jax/diffusion/noise.py), the same for every w, so a
sweep over w compares the same starting noise (common random numbers). No draw depends on the
batch size or the device count: calls are padded up to a multiple of the devices and every
image's noise comes from its own id. The images are bit-identical across batch sizes and device
counts on CPU (tested); elsewhere kernels may differ by batch shape, so expect equality up to
float rounding. A job with any w != 0 runs every image through the guided program (2 model rows
per image), one with only w = 0 through the unguided one: the w = 0 images of the two agree up
to rounding, not bit for bit.

Output directory:
  job.json            what the job is (prompts, seed, sampler, checkpoint, ...); a rerun with a
                      different job in the same directory is refused.
  images/IIIIII.png   one PNG per image (written atomically).
  shards/SSSSS.jsonl  the records of shard S (images [S * shard_size, (S + 1) * shard_size)),
                      written atomically AFTER its PNGs: a shard file means the shard is done.
  samples.jsonl       every record, in index order, written when all shards are done: its
                      presence means the job is complete.
  grid.png            rows = (w, prompt) pairs in index order (at most 64), the first
                      grid_columns images each.
  stats.json          speed of the last run that generated images (images/s, compilations).
  samples.npz         (optional) arr_0 uint8 [N, H, W, 3] and arr_1 int64 prompt indices, the
                      layout of ADM's reference batches (grey images repeated to RGB).

A killed job leaves finished shards and at most one unfinished shard (some PNGs, no shard file);
the rerun redoes that shard (same pixels: the images are deterministic) and goes on. Temporary
files are named .tmp-* and are never read as results.

On several processes (t2i_jax/distributed.py) only process 0 touches the output directory: it
takes the lock, checks job.json and finds the unfinished shards, and that list reaches every
process; each process computes its devices' rows of every call, the images are gathered to
process 0, which writes them with the same shard protocol. The other hosts need no access to
OUTDIR, and a rerun finishes the job whichever process died.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax import distributed, files, images
from t2i_jax import sharding as mesh_lib
from t2i_jax.conditioning import Condition
from t2i_jax.sampling import guides as guides_lib
from t2i_jax.sampling import stages as stages_lib
from t2i_jax.sampling.generate import SampleOptions, shared_generate_fn
from t2i_jax.sampling.load import Trained

JOB_FILE, SAMPLES_FILE, GRID_FILE, NPZ_FILE = "job.json", "samples.jsonl", "grid.png", "samples.npz"
STATS_FILE = "stats.json"  # speed of the last run that generated images
MAX_GRID_ROWS = 64
SEED_STREAM = 11  # the job's key: fold_in(key(seed), 11); training's grids use other streams
RERANK_STREAM = 17  # candidate c >= 1 of a reranked image: fold_in(fold_in(job key, 17), c)
PRIOR_STREAM = 19   # prior candidate c >= 1: fold_in(fold_in(stage key, 19), c)
EXTRA_KEYS = ("rerank_score", "rerank_candidate", "prior_candidate", "prior_score")  # computed


class JobMismatchError(ValueError):
    pass


class NonFiniteImagesError(ValueError):
    """Some images came out NaN or infinite: nothing was written for them."""


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
    stages: tuple = ()     # the SR stages after stage 0, each its record (stages.Stage.record)
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

    @classmethod
    def create(cls, trained: Trained, prompts: Sequence[str], *, num_per_prompt: int,
               guidance: Sequence[float], seed: int, options: SampleOptions,
               shard_size: int = 256, guides: Sequence = (), rerank: int = 1,
               reranker: Optional[Trained] = None, stages: Sequence = (),
               aug_level: Optional[float] = None,
               low_res: Optional[dict] = None, embedding: Optional[dict] = None,
               candidates: int = 1, shared_noise: bool = False,
               inpaint: Optional[dict] = None) -> "JobSpec":
        if not prompts:
            raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts_file FILE.")
        if num_per_prompt < 1:
            raise ValueError(f"num_per_prompt must be >= 1, got {num_per_prompt}.")
        if not guidance:
            raise ValueError("no guidance weight given.")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
        if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 1:
            raise ValueError(f"--rerank must be an integer >= 1 (candidates per image; 1: no "
                             f"reranking), got {rerank!r}.")
        if rerank > 1 and reranker is None:
            raise ValueError("--rerank needs --clip DIR: the CLIP that scores the candidates.")
        if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) \
                or candidates < 1:
            raise ValueError(f"--prior_candidates must be an integer >= 1, got {candidates!r}.")
        if embedding is not None and len(embedding.get("rows", ())) not in (0, len(prompts)):
            raise ValueError(f"{len(embedding['rows'])} embedding rows for {len(prompts)} prompts.")
        if (inpaint is not None) != (options.inpaint is not None) or (
                inpaint is not None and inpaint["method"] != options.inpaint):
            raise ValueError("the inpainting record and the options' method disagree "
                             "(sampling/inpaint.py's record with SampleOptions.inpaint).")
        if low_res is not None and low_res["num_images"] != len(prompts):
            raise ValueError(f"{low_res['num_images']} --low_res images for {len(prompts)} "
                             "prompts: give one prompt (for every image) or one per image.")
        return cls(tuple(prompts), int(num_per_prompt), tuple(float(w) for w in guidance),
                   int(seed), options.sampler, int(options.num_steps), float(options.eta),
                   options.thresholding, options.spacing, options.ddpm_variance, trained.kind, trained.step,
                   trained.workdir, int(shard_size),
                   tuple(g.record() for g in guides), int(rerank),
                   (reranker.workdir, reranker.step) if rerank > 1 else (),
                   tuple(st.record(k + 1) for k, st in enumerate(stages)),
                   None if aug_level is None else float(aug_level),
                   tuple(low_res.items()) if low_res is not None else (),
                   float(options.percentile) if options.thresholding == "dynamic" else None,
                   tuple(trained.family.decoder_record().items()),
                   _freeze(embedding) if embedding else (), int(candidates), bool(shared_noise),
                   _freeze(inpaint) if inpaint else ())

    @property
    def options(self) -> SampleOptions:
        paint = dict(_thaw(self.inpaint)) if self.inpaint else {}
        return SampleOptions(self.sampler, self.num_steps, self.eta, self.thresholding,
                             self.spacing, self.ddpm_variance,
                             0.995 if self.percentile is None else self.percentile,
                             inpaint=paint.get("method"), repaint_jumps=paint.get("jumps", 0),
                             repaint_jump_length=paint.get("jump_length", 10))

    @property
    def num_stages(self) -> int:
        return 1 + len(self.stages)

    @property
    def num_images(self) -> int:
        return len(self.guidance) * len(self.prompts) * self.num_per_prompt

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_images / self.shard_size)

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
        return {"index": int(index), "file": image_file(index), "prompt": self.prompts[p],
                "prompt_index": p, "sample": k, "sample_id": sid, "seed": self.seed,
                "guidance": self.guidance[g], "sampler": self.sampler, "steps": self.num_steps,
                "eta": self.eta, "thresholding": self.thresholding or "none",
                "ddpm_variance": self.ddpm_variance,
                **({"percentile": self.percentile} if self.percentile is not None else {}),
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
                **({"inpaint": dict(_thaw(self.inpaint))} if self.inpaint else {}),
                **({"stages": [dict(st) for st in self.stages],
                    "stage_files": [stage_dir(k, self.num_stages) + "/" + (
                        embedding_file(index) if k == 0 and self.prior_first else
                        image_file(index)) for k in range(self.num_stages - 1)]}
                   if self.stages else {})}

    @property
    def prior_first(self) -> bool:
        """Whether stage 0 is an unCLIP prior (its outputs are embeddings)."""
        return bool(self.embedding) and dict(_thaw(self.embedding))["source"] == "prior"

    def embedding_record(self, p: int, k: int, index: int) -> dict:
        """Where image (prompt p, sample k)'s embedding came from (sampling/unclip.py); from a
        prior: stage 0 (the job's workdir, checkpoint, guidance) and its file."""
        from t2i_jax.sampling import unclip
        out = unclip.embedding_record(_thaw(self.embedding), p, k, self.num_per_prompt)
        if self.prior_first:
            g = int(self.decompose(index)[0])
            out.update(stage=0, workdir=self.workdir, checkpoint_step=self.checkpoint_step,
                       guidance=self.guidance[g], candidates=self.candidates,
                       file=stage_dir(0, self.num_stages) + "/" + embedding_file(index))
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
                           ("candidates", 1), ("shared_noise", False), ("inpaint", ())):
            if getattr(self, key) == empty:
                del d[key]
        if self.stages:
            d["stages"] = [dict(st) for st in self.stages]
        if self.low_res:
            d["low_res"] = dict(self.low_res)
        if self.decoder:  # as JSON reads it back, so a rerun recognises its own job
            d["decoder"] = dict(self.decoder)
        if self.embedding:
            d["embedding"] = _thaw(self.embedding)
        if self.inpaint:
            d["inpaint"] = _thaw(self.inpaint)
        return d


def _freeze(obj):
    """dicts and lists -> nested tuples of items (a frozen, comparable JobSpec field)."""
    if isinstance(obj, dict):
        return ("__dict__",) + tuple((k, _freeze(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return ("__list__",) + tuple(_freeze(v) for v in obj)
    return obj


def _thaw(obj):
    if isinstance(obj, tuple) and obj and obj[0] == "__dict__":
        return {k: _thaw(v) for k, v in obj[1:]}
    if isinstance(obj, tuple) and obj and obj[0] == "__list__":
        return [_thaw(v) for v in obj[1:]]
    return obj


def image_file(index: int) -> str:
    return f"images/{index:06d}.png"


def embedding_file(index: int) -> str:
    """A prior stage's output: the embedding [E] of image `index`, float32 .npy."""
    return f"embeddings/{index:06d}.npy"


def output_kind(family) -> str:
    return getattr(family, "output_kind", "image")


def shard_file(shard: int) -> str:
    return f"shards/{shard:05d}.jsonl"


def stage_dir(k: int, num_stages: int) -> str:
    """Stage k's directory relative to OUTDIR: "." for the last stage, stages/k before it."""
    return "." if k == num_stages - 1 else f"stages/{k}"


@dataclasses.dataclass
class JobResult:
    outdir: str
    num_images: int
    generated: int           # images generated by this call (0 if everything was done)
    skipped_shards: int      # shards found finished
    seconds: float           # wall time of generation (compilation included)
    images_per_s: float      # generated / time after the first batch (steady state)
    compilations: int        # programs this job compiled (0: it reused an earlier job's)


def check_outdir(spec: JobSpec, outdir: str) -> None:
    """Writes job.json, or checks that the one there describes the same job."""
    path = os.path.join(outdir, JOB_FILE)
    want = spec.to_json()
    if os.path.exists(path):
        try:
            have = files.read_json(path)
        except (ValueError, OSError) as e:
            raise JobMismatchError(f"{path} is unreadable ({e}); delete {outdir} to start "
                                   "afresh, or use another --outdir.") from None
        diffs = [f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in sorted(set(have) | set(want))
                 if have.get(k) != want.get(k)]
        if diffs:
            hint = (f"\nTo finish that job, rerun its command with --step {have['checkpoint_step']}."
                    if have.get("checkpoint_step") != want["checkpoint_step"] else "")
            raise JobMismatchError(
                f"{outdir} holds another sampling job; it differs in:\n  " + "\n  ".join(diffs)
                + hint + "\nUse another --outdir, or delete this one to start afresh.")
    else:
        files.write_json(path, want)


def finished_shards(spec: JobSpec, outdir: str, record_fn=None) -> set:
    """Shards whose record file holds exactly this job's records (record_fn(i): a stage's, the
    final records by default) and whose PNGs all exist."""
    record_fn = record_fn or spec.record
    done = set()
    for s in range(spec.num_shards):
        path = os.path.join(outdir, shard_file(s))
        if not os.path.exists(path):
            continue
        try:
            rows = files.read_jsonl(path)
        except (ValueError, OSError):
            continue  # unreadable: redo it
        want = [record_fn(i) for i in
                range(s * spec.shard_size, min((s + 1) * spec.shard_size, spec.num_images))]
        stripped = [{k: v for k, v in r.items() if k not in EXTRA_KEYS} for r in rows]
        if stripped == want and all(
                os.path.exists(os.path.join(outdir, r["file"])) for r in rows):
            done.add(s)
    return done


def prompt_conditions(trained: Trained, prompts: Sequence[str]) -> Condition:
    """One Condition row per prompt; an empty prompt is the model's null condition (is_null)."""
    return trained.family.conditioning.of_prompts(prompts)


def _stage_record_fn(spec: JobSpec, k: int, kind: str = "image"):
    """Stage k's per-image records: the job's, marked with the stage for the earlier stages (a
    prior stage's files are its embeddings)."""
    if k == spec.num_stages - 1:
        return spec.record
    if kind == "embedding":
        return lambda i: dict(spec.record(i), stage=k, file=embedding_file(i))
    return lambda i: dict(spec.record(i), stage=k)


def run_job(trained: Trained, spec: JobSpec, outdir: str, *, batch_size: int = 64,
            devices: Optional[list] = None, progress: bool = True, npz: bool = False,
            grid_columns: int = 16, guides: Sequence = (),
            reranker: Optional[Trained] = None, stages: Sequence = (),
            low_res: Optional[np.ndarray] = None,
            embeddings: Optional[np.ndarray] = None,
            known: Optional[tuple] = None) -> JobResult:
    """Generates every image of `spec` not already in `outdir` and assembles the outputs.

    stages: the SR stages (sampling/stages.py Stage) after `trained` (stage 0), run one after
    the other over all the job's images, each from the previous stage's PNGs; the last stage's
    images are the job's (OUTDIR/images), stage k's before it go to OUTDIR/stages/k/.
    low_res: stage 0's given inputs (uint8 [P, h, w, C], one per prompt) when it is SR.
    embeddings: stage 0's given CLIP image embeddings when it is an unCLIP decoder: float32
    [P, E] (one per prompt row) or [P, N, E] (one per image: an interpolation's frames).
    A prior as stage 0 writes embeddings (OUTDIR/stages/0/embeddings/*.npy), `spec.candidates`
    per image with the one closest to its caption's text embedding kept; the next stage is a
    decoder that reads them.
    known: stage 0's inpainting input (image float32 [H, W, C] in [-1, 1], mask [H, W, 1] with
    1 = known), exactly when spec.inpaint (sampling/inpaint.py); every row inpaints it. Or one
    per prompt row ([P, H, W, C] and [P, H, W, 1]), which spec.inpaint's record must identify."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if grid_columns < 1:
        raise ValueError(f"grid_columns must be >= 1, got {grid_columns}.")
    family = trained.family
    outdir = os.path.abspath(outdir)
    lead = jax.process_index() == 0
    # Everything that can refuse the job happens before anything is written.
    conds = prompt_conditions(trained, spec.prompts)  # [P] rows
    guided = any(w != 0.0 for w in spec.guidance)
    if guided and not family.conditioning.guidable:
        raise ValueError(f"this model is unconditional: there is no condition for classifier-free "
                         f"guidance to drop, so the guidance weight must be 0 (got "
                         f"{[w for w in spec.guidance if w]}). Pass --guidance 0.")
    if [g.record() for g in guides] != list(spec.guides):
        raise ValueError("the guides passed to run_job are not the job's (JobSpec.create(guides=...)).")
    if [st.record(k + 1) for k, st in enumerate(stages)] != [dict(r) for r in spec.stages]:
        raise ValueError("the stages passed to run_job are not the job's (JobSpec.create(stages=...)).")
    if (known is not None) != bool(spec.inpaint):
        raise ValueError("pass known= (the image and mask to inpaint) exactly when the job "
                         "inpaints (JobSpec.create(inpaint=...)).")
    if known is not None:
        image_shape, mask_shape = tuple(family.image_shape), tuple(family.image_shape[:2]) + (1,)
        per_prompt = np.ndim(known[0]) == len(image_shape) + 1
        lead_dims = (len(spec.prompts),) if per_prompt else ()
        if (tuple(np.shape(known[0])) != lead_dims + image_shape
                or tuple(np.shape(known[1])) != lead_dims + mask_shape):
            raise ValueError(f"the image to inpaint {np.shape(known[0])} and its mask "
                             f"{np.shape(known[1])} must be the model's {image_shape} and "
                             f"{mask_shape}, or one per prompt ([P, ...], P = "
                             f"{len(spec.prompts)}).")
        known = tuple(np.broadcast_to(np.asarray(a, np.float32),
                                      (len(spec.prompts),) + s_)
                      for a, s_ in zip(known, (image_shape, mask_shape)))
    if (low_res is not None) != bool(spec.low_res):
        raise ValueError("pass low_res= (stage 0's inputs) exactly when the job has them.")
    if (spec.rerank > 1) != (reranker is not None):
        raise ValueError("pass reranker= (a CLIP) exactly when the job reranks (rerank > 1).")
    models = [trained] + [st.trained for st in stages]
    kinds = [output_kind(m.family) for m in models]
    if kinds[-1] != "image":
        raise ValueError(f"{models[-1].workdir} holds a {models[-1].family.name}, which writes CLIP "
                         "embeddings, not images: a decoder stage must follow it (sample.py "
                         "--workdir DECODER --prior PRIOR).")
    wants_embedding = getattr(family, "input_field", None) == "embedding"
    if wants_embedding != (embeddings is not None):
        raise ValueError("pass embeddings= (stage 0's CLIP image embeddings) exactly when stage 0 "
                         "is a decoder." if wants_embedding else
                         f"embeddings= given, but {trained.workdir} is not a decoder.")
    if embeddings is not None and (embeddings.shape[0] != len(spec.prompts) or (
            embeddings.ndim == 3 and embeddings.shape[1] != spec.num_per_prompt)):
        raise ValueError(f"embeddings of shape {embeddings.shape} for {len(spec.prompts)} prompts "
                         f"x {spec.num_per_prompt} images.")
    if spec.candidates > 1 and kinds[0] != "embedding":
        raise ValueError("prior candidates (spec.candidates > 1) need a prior as stage 0.")
    if stages_lib.is_sr(trained) and (low_res is None or spec.aug_level is None):
        raise ValueError(f"{trained.workdir} is a super-resolution model: it needs low-resolution "
                         "inputs (--low_res FILE_OR_DIR) and an augmentation level, or put a base "
                         "model in --workdir and this one in --sr.")
    generate = shared_generate_fn(family, spec.options, guided, guides)
    stage_generates = [shared_generate_fn(st.trained.family, st.options,
                                          st.guidance != 0.0 and st.trained.family.conditioning.guidable)
                       for st in stages]
    programs_before = [g._cache_size() for g in [generate] + stage_generates]
    stage_conds = [prompt_conditions(st.trained, spec.prompts) for st in stages]
    guide_rows = [g.rows(spec.prompts) for g in guides]  # [P, ...] each; may refuse a prompt
    guide_scales = np.asarray([g.scale for g in guides], np.float32)
    if reranker is not None:
        score = guides_lib.clip_score_fn(reranker.family)
        rerank_rows = guides_lib.text_rows(reranker, spec.prompts)
    num_stages = spec.num_stages
    dirs = [os.path.join(outdir, stage_dir(k, num_stages)) for k in range(num_stages)]

    def survey(k: int):
        """Process 0: (stage 0) the job's identity checked, leftovers removed; stage k's
        finished shards."""
        def fn() -> list:
            if k == 0:
                check_outdir(spec, outdir)
            for sub in ("images" if kinds[k] == "image" else "embeddings", "shards"):
                os.makedirs(os.path.join(dirs[k], sub), exist_ok=True)
            _remove_temporaries(dirs[k])
            return sorted(finished_shards(spec, dirs[k], _stage_record_fn(spec, k, kinds[k])))
        return fn

    total = spec.num_images
    bounds = lambda s: (s * spec.shard_size, min((s + 1) * spec.shard_size, total))  # noqa: E731
    with distributed.lead_holds(_OutdirLock(outdir, enabled=lead)):
        mesh = mesh_lib.make_mesh(1, devices)
        n_dev = mesh.devices.size
        row_sharding = mesh_lib.batch_sharding(mesh)
        put = lambda a: mesh_lib.put(a, row_sharding)  # noqa: E731
        rep = mesh_lib.replicated(mesh)
        params = [jax.device_put(m.params, rep) for m in models]  # this job's devices
        guide_params = tuple(jax.device_put(g.trained.params, rep) for g in guides)
        clip_params = jax.device_put(reranker.params, rep) if reranker is not None else None
        # Replicated on the job's mesh, as the rerank candidates' keys are: one program for both.
        rng = mesh_lib.put(jax.random.fold_in(jax.random.key(spec.seed), SEED_STREAM), rep)
        guidance = np.asarray(spec.guidance, np.float32)
        stage_stats, skipped = [], 0
        for k in range(num_stages):
            done = set(distributed.lead_decides(survey(k)))  # the same list on every process
            todo = [s for s in range(spec.num_shards) if s not in done]
            skipped += len(done)
            todo_idx = (np.concatenate([np.arange(*bounds(s)) for s in todo]) if todo
                        else np.zeros((0,), np.int64))
            left_in_shard = {s: bounds(s)[1] - bounds(s)[0] for s in todo}
            # Every call has this many rows (the last one padded): one compilation per stage.
            per_call = math.ceil(min(batch_size, max(len(todo_idx), 1)) / n_dev) * n_dev
            record_fn = _stage_record_fn(spec, k, kinds[k])
            k_rng = stages_lib.stage_rng(rng, k)
            if k == 0:
                gen, cond_rows, k_params = generate, conds, params[0]
            else:
                gen, cond_rows, k_params = stage_generates[k - 1], stage_conds[k - 1], params[k]
            k_family = models[k].family
            level = spec.aug_level if k == 0 else stages[k - 1].aug_level
            extras: dict = {}
            from tqdm import tqdm
            bar = tqdm(total=total, initial=total - len(todo_idx), unit="img",
                       desc="sample" if num_stages == 1 else f"stage {k}", dynamic_ncols=True,
                       disable=not (progress and lead))
            generated, t0, t_first, n_after_first = 0, time.perf_counter(), None, 0
            non_finite: list = []
            try:
                with jax.set_mesh(mesh):
                    for b0 in range(0, len(todo_idx), per_call):
                        idx = todo_idx[b0:b0 + per_call]
                        full = np.concatenate([idx, np.full(per_call - len(idx), idx[-1])])
                        g, p, _, sid = spec.decompose(full)
                        rows_of = lambda tree: jax.tree_util.tree_map(  # noqa: E731
                            lambda c: put(np.asarray(c)[p]), tree)
                        cond = rows_of(cond_rows)
                        if getattr(k_family, "input_field", None) == "embedding":
                            if k == 0:  # given: one per prompt row, or one per image
                                z = (embeddings[p] if embeddings.ndim == 2 else
                                     embeddings[p, spec.decompose(full)[2]])
                            else:  # the prior stage's .npy files, read by process 0 alone
                                z = distributed.broadcast_from_lead(
                                    _read_embeddings(dirs[k - 1], full) if lead else
                                    np.zeros((len(full),) + tuple(models[k - 1].family.output_shape),
                                             np.float32))
                            cond = cond.replace(embedding=put(np.asarray(z, np.float32)))
                        elif k > 0 or low_res is not None:
                            if k == 0:
                                inputs = low_res[p]
                            else:  # the previous stage's PNGs, read by process 0 alone
                                shape = (len(full),) + tuple(models[k - 1].family.output_shape)
                                inputs = distributed.broadcast_from_lead(
                                    _read_stage_images(dirs[k - 1], full) if lead
                                    else np.zeros(shape, np.uint8))
                            cond = cond.replace(
                                low_res=put(stages_lib.to_float(inputs)),
                                aug_level=put(np.full((len(full),), level, np.float32)))
                        if k == 0 and known is not None:  # its prompt row's image and mask
                            cond = cond.replace(known=put(np.ascontiguousarray(known[0][p])),
                                                known_mask=put(np.ascontiguousarray(known[1][p])))
                        if k == 0:
                            args = (put(guidance[g]), put(sid.astype(np.int32)), guide_params,
                                    tuple(rows_of(r) for r in guide_rows), guide_scales)
                        else:
                            w = np.full((len(full),), stages[k - 1].guidance, np.float32)
                            args = (put(w), put(sid.astype(np.int32)))
                        x = gen(k_params, cond, k_rng, *args)
                        if k == 0 and spec.candidates > 1:
                            x, won, best = _prior_candidates(gen, k_family, k_params, cond, k_rng,
                                                             args, x, spec.candidates)
                            won, best = distributed.to_host((won, best))
                            for i, c, sc in zip(idx, won[:len(idx)], best[:len(idx)]):
                                extras[int(i)] = dict(prior_candidate=int(c),
                                                      prior_score=float(sc))
                        if k == 0 and reranker is not None:
                            x, won, best = _rerank(gen, score, k_params, cond, k_rng, args, x,
                                                   clip_params, rows_of(rerank_rows), spec.rerank)
                            won, best = distributed.to_host((won, best))
                            for i, c, sc in zip(idx, won[:len(idx)], best[:len(idx)]):
                                extras[int(i)] = dict(
                                    rerank_score=float(sc) if np.isfinite(sc) else None,
                                    rerank_candidate=int(c))
                        x = distributed.to_host(x)[:len(idx)]  # every process: same decisions
                        finite = np.isfinite(x).reshape(len(idx), -1).all(axis=1)
                        non_finite.extend(int(i) for i in idx[~finite])
                        if kinds[k] == "image":
                            x = images.to_uint8(np.where(
                                finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0))
                        for i, im, ok in zip(idx, x, finite):
                            if not ok:
                                continue  # nothing is written for it: its shard stays unfinished
                            if lead and kinds[k] == "image":
                                images.save_png(os.path.join(dirs[k], image_file(int(i))), im)
                            elif lead:
                                _save_embedding(os.path.join(dirs[k], embedding_file(int(i))), im)
                            s = int(i) // spec.shard_size
                            left_in_shard[s] -= 1
                            if left_in_shard[s] == 0 and lead:
                                # The shard's record file after all its PNGs: it means "done".
                                files.write_jsonl(os.path.join(dirs[k], shard_file(s)),
                                                  [dict(record_fn(j), **extras.pop(j, {}))
                                                   for j in range(*bounds(s))])
                        generated += len(idx)
                        if t_first is None:
                            t_first = time.perf_counter()
                        else:
                            n_after_first += len(idx)
                        bar.update(len(idx))
            finally:
                bar.close()
            seconds = time.perf_counter() - t0
            steady = (time.perf_counter() - t_first) if t_first is not None else 0.0
            stage_stats.append(dict(
                stage=k, workdir=models[k].workdir, generated=generated, seconds=seconds,
                images_per_s=n_after_first / steady if n_after_first else None,
                compilations=gen._cache_size() - programs_before[k], rows_per_call=per_call))
            if non_finite:
                if lead:
                    files.write_json(os.path.join(outdir, STATS_FILE),
                                     _job_stats(stage_stats, n_dev))
                raise NonFiniteImagesError(_non_finite_message(spec, non_finite, dirs[k]))
            if lead and k < num_stages - 1 and kinds[k] == "image":
                assemble(spec, dirs[k], grid_columns=grid_columns,
                         scale=max(1, 64 // k_family.output_shape[0]))
        stats = _job_stats(stage_stats, n_dev)
        result = JobResult(outdir, total, stage_stats[-1]["generated"], skipped,
                           stats["seconds"], float("nan") if stats["images_per_s"] is None
                           else stats["images_per_s"], stats["compilations"])
        if lead and stats["generated"]:
            files.write_json(os.path.join(outdir, STATS_FILE), stats)
        if lead:  # every shard of the last stage was done or is now
            assemble(spec, outdir, npz=npz, grid_columns=grid_columns,
                     scale=max(1, 64 // models[-1].family.output_shape[0]))
    return result


def _job_stats(stage_stats: list, n_dev: int) -> dict:
    """stats.json: the totals of every stage's run; images/s is the last stage's, and for a
    cascade the whole chain's 1 / sum_k (1 / r_k) with each stage's own rows."""
    rates = [st["images_per_s"] for st in stage_stats]
    out = dict(generated=sum(st["generated"] for st in stage_stats),
               seconds=sum(st["seconds"] for st in stage_stats),
               images_per_s=rates[0] if len(rates) == 1 else
               (1.0 / sum(1.0 / r for r in rates)) if all(rates) else None,
               compilations=sum(st["compilations"] for st in stage_stats),
               rows_per_call=stage_stats[-1]["rows_per_call"], devices=n_dev,
               processes=jax.process_count())
    if len(stage_stats) > 1:
        out["stages"] = stage_stats
    return out


def _save_embedding(path: str, z: np.ndarray) -> None:
    with files.atomic_open(path, "wb") as f:
        np.save(f, np.asarray(z, np.float32))


def _read_embeddings(directory: str, index: np.ndarray) -> np.ndarray:
    """float32 [N, E]: a prior stage's embeddings of images `index`."""
    return np.stack([np.load(os.path.join(directory, embedding_file(int(i)))) for i in index])


def _prior_candidates(generate, family, params, cond, rng, args, z0, n: int):
    """Of n prior samples per image (candidate 0 is the one drawn with the stage's key), the one
    with the largest dot product with its caption's CLIP text embedding (unCLIP sec. 2.2):
    (embeddings [B, E], winning candidate [B], its dot product [B])."""
    from t2i_jax.families.prior import select_candidates
    text = text_embedding_fn(family)(cond)
    zs = [z0]
    for c in range(1, n):
        key = jax.random.fold_in(jax.random.fold_in(rng, PRIOR_STREAM), c)
        zs.append(generate(params, cond, mesh_lib.put(key, rng.sharding), *args))
    return select_candidates(jnp.stack(zs), text)


_TEXT_FNS: dict = {}


def text_embedding_fn(family):
    """cond -> the prior's CLIP text embedding [B, E], jitted once per family."""
    if id(family) not in _TEXT_FNS:
        fn = jax.jit(family.text_embedding)
        inputs = family.sampling_inputs()
        _TEXT_FNS.clear()
        _TEXT_FNS[id(family)] = (lambda cond: fn(inputs, cond), family)
    return _TEXT_FNS[id(family)][0]


def _read_stage_images(directory: str, index: np.ndarray) -> np.ndarray:
    """uint8 [N, h, w, C]: the PNGs of images `index` in a stage's directory."""
    return np.stack([images.load_png(os.path.join(directory, image_file(int(i)))) for i in index])


def _rerank(generate, score, params, cond, rng, args, x0, clip_params, text_rows, n: int):
    """Of n candidates per image (candidate 0 is the unreranked image), the one whose clean CLIP
    image embedding is closest to its prompt's text embedding (DALL-E's and CogView's reranking):
    (images [B, ...], winning candidate [B], its score [B]; NaN score: an empty prompt, kept 0)."""
    best_x, best = x0, score(clip_params, x0, text_rows)
    won = jnp.zeros(best.shape, jnp.int32)
    for c in range(1, n):
        key = jax.random.fold_in(jax.random.fold_in(rng, RERANK_STREAM), c)
        x = generate(params, cond, mesh_lib.put(key, rng.sharding), *args)
        sc = score(clip_params, x, text_rows)
        better = sc > best  # False for NaN: a non-finite candidate or no text never wins
        best_x = jnp.where(better[:, None, None, None], x, best_x)
        won, best = jnp.where(better, c, won), jnp.where(better, sc, best)
    return best_x, won, best


def _non_finite_message(spec: JobSpec, bad: list, outdir: str) -> str:
    g = sorted({spec.guidance[int(k)] for k in spec.decompose(np.asarray(bad))[0]})
    shown = ", ".join(map(str, bad[:10])) + (f", ... ({len(bad)} in all)" if len(bad) > 10 else "")
    return (f"{len(bad)} of {spec.num_images} images came out NaN or infinite (indices {shown}; "
            f"guidance {g}, sampler {spec.sampler}, eta {spec.eta:g}, thresholding "
            f"{spec.thresholding or 'none'}); nothing was written for them and {outdir} is not "
            "complete. Lower --guidance or use --thresholding static or dynamic, in another "
            "--outdir.")


class _OutdirLock(files.ExclusiveLock):
    """An exclusive lock on OUTDIR/.lock for the job's lifetime: two processes never write (or
    clean up after) the same job at once."""

    def __init__(self, outdir: str, enabled: bool = True):
        super().__init__(outdir, "writing a sampling job", "wait for it, or use another --outdir",
                         enabled=enabled)

    def __enter__(self):
        if self.enabled:
            files.check_output_dir(self.directory, "--outdir")
            for sub in ("images", "shards"):
                os.makedirs(os.path.join(self.directory, sub), exist_ok=True)
        return super().__enter__()


def _remove_temporaries(outdir: str) -> None:
    """Deletes the .tmp-* files that writes interrupted by a kill left (only under the lock)."""
    for sub in ("images", "embeddings", "shards", "."):
        d = os.path.join(outdir, sub)
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            path = os.path.join(d, name)
            if name.startswith(".tmp-") and os.path.isfile(path) and not os.path.islink(path):
                os.remove(path)


def is_complete(outdir: str) -> bool:
    return os.path.exists(os.path.join(outdir, SAMPLES_FILE))


def assemble(spec: JobSpec, outdir: str, *, npz: bool = False, grid_columns: int = 16,
             scale: int = 1) -> None:
    """samples.jsonl, grid.png and (optionally) samples.npz from the finished shards."""
    rows = []
    for s in range(spec.num_shards):
        rows.extend(files.read_jsonl(os.path.join(outdir, shard_file(s))))
    assert [r["index"] for r in rows] == list(range(spec.num_images)), "shards out of order"
    cols = min(spec.num_per_prompt, grid_columns)
    picked = [r for r in rows if r["sample"] < cols][:MAX_GRID_ROWS * cols]
    grid = images.make_grid(np.stack([images.load_png(os.path.join(outdir, r["file"]))
                                      for r in picked]), rows=len(picked) // cols, scale=scale)
    images.save_png(os.path.join(outdir, GRID_FILE), grid)
    if npz:
        x = np.stack([images.load_png(os.path.join(outdir, r["file"])) for r in rows])
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        labels = np.asarray([r["prompt_index"] for r in rows], np.int64)
        with files.atomic_open(os.path.join(outdir, NPZ_FILE), "wb") as f:
            np.savez(f, arr_0=x, arr_1=labels)
    files.write_jsonl(os.path.join(outdir, SAMPLES_FILE), rows)  # last: the job is complete


def load_images(outdir: str, rows: Optional[list] = None) -> tuple[np.ndarray, list]:
    """(uint8 [N, H, W, C], records) of a complete job, in index order."""
    if not is_complete(outdir):
        raise FileNotFoundError(f"{outdir} holds no complete sampling job ({SAMPLES_FILE} is "
                                "missing); rerun the sampling command to finish it.")
    rows = rows if rows is not None else files.read_jsonl(os.path.join(outdir, SAMPLES_FILE))
    return np.stack([images.load_png(os.path.join(outdir, r["file"])) for r in rows]), rows


def print_summary(result: JobResult, stream=None) -> None:
    stream = stream or sys.stderr
    print(f"[t2i_jax] {result.outdir}: {result.num_images} images ({result.generated} generated "
          f"now, {result.skipped_shards} shard(s) were already done) in {result.seconds:.1f} s"
          + (f"; {result.images_per_s:.2f} images/s after the first batch"
             if result.images_per_s == result.images_per_s else ""), file=stream)

