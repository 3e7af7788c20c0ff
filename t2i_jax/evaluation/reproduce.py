"""Reproductions of the papers' tables on a trained embedded-data model, one command each.

    python -m t2i_jax.evaluation.reproduce cfg --workdir runs/digits
    python -m t2i_jax.evaluation.reproduce ddim --workdir runs/digits
    python -m t2i_jax.evaluation.reproduce checkpoints --workdir runs/digits
    python -m t2i_jax.evaluation.reproduce classifier --workdir runs/digits_uncond \
        --classifier runs/digits_classifier
    python -m t2i_jax.evaluation.reproduce sdg --workdir runs/digits_uncond --clip runs/digits_clip
    python -m t2i_jax.evaluation.reproduce cascade --workdir runs/shapes16 --sr runs/shapes_sr64 \
        --sr_noaug runs/shapes_sr64_noaug
    python -m t2i_jax.evaluation.reproduce latent --workdir runs/shapes64_ldm \
        --f4_short runs/shapes64_ldm_f4_800 --f2 runs/shapes64_ldm_f2_800 \
        --noscale runs/shapes64_ldm_noscale_800 --base runs/shapes16 --sr runs/shapes_sr64

  cfg          Ho & Salimans (2022), fig. 4 / table 1: guidance weight w in {0, 0.5, 1, 2, 3, 5}
               (one sampling job, one compilation) -> FD, alignment, precision, recall; plot of
               FD against alignment as w grows.
  ddim         Song et al. (2021), table 1: DDIM eta = 0, DDIM eta = 1 and DDPM with
               sigma-hat (variance beta, ddpm_variance="beta") at 10, 20, 50, 100, 1000 steps,
               and DPM-Solver++(2M) (Lu et al. 2022) at 10 and 20 -> FD and alignment.
  checkpoints  the same metrics for every checkpoint in the workdir, at w = 0 unless --guidance
               (is the model converged? at w = 0 its FD should reach the real-data floor).
  classifier   Dhariwal & Nichol (2021): classifier guidance of an unconditional model over the
               scale -> FD, alignment, precision, recall, and the trade-off plot.
  sdg          Liu et al. (2023): SDG text, image and text + image guidance over their scales,
               and CLIP reranking over N (t2i_jax/evaluation/reproduce_guides.py).
  cascade      Ho et al. (2021) / Imagen: a base + SR cascade over the SR's augmentation level
               (and an SR trained without it), static vs dynamic thresholding, the SR on real
               images (PSNR/SSIM), consistency, detail, speed (reproduce_cascade.py).
  latent       Rombach et al. (2022): a latent model at 64x64 against the cascade, the
               autoencoder's f = 2 vs 4 (reconstructions and samples), with and without the
               scale factor; training and sampling images/s (reproduce_latent.py).
  unclip       Ramesh et al. (2022): the prior's embeddings against the true ones, the decoder
               on the prior's z_i vs the text embedding vs text alone, the prior's candidates
               K = 1, 2, 4, guidance of prior and decoder, variations and interpolations
               (reproduce_unclip.py; --workdir DECODER --prior PRIOR).

FD is the Fréchet distance of the evaluator classifier's 128-d penultimate features
(t2i_jax/evaluation/evaluator.py) between the generated images and the data set's held-out
real images; precision/recall (k = 3) use the same features. The row "real (train)" scores as
many real training digits (5 random subsets): a reference for what real data scores at this n,
not a bound (the evaluator was trained on those images, which shifts their features).

Everything goes to WORKDIR/reproduce/<name>/ (or --out): results.json (raw numbers), table.md,
plot.png, and the sampling jobs under samples/ (resumable: rerun the command after an
interruption). The evaluator is cached in WORKDIR/reproduce/, shared by the reproductions of a
workdir; where the workdir is read-only, in --out (decided before any sampling).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Optional

import numpy as np

from t2i_jax import files
from t2i_jax.errors import ArgumentParser

CFG_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0)
DDIM_STEPS = (10, 20, 50, 100, 1000)
DPM_STEPS = (10, 20)
# (label, sampler, eta, ddpm_variance)
DDIM_METHODS = (("DDIM eta=0", "ddim", 0.0, "posterior"), ("DDIM eta=1", "ddim", 1.0, "posterior"),
                ("DDPM (sigma-hat)", "ddpm", 0.0, "beta"))


def default_prompts(config) -> list:
    from t2i_jax import data as data_lib
    return list(data_lib.sample_prompts(config.data))


def evaluator_dir(workdir: str) -> str:
    """Where the evaluator classifier is cached: shared by the reproductions of one workdir."""
    return os.path.join(os.path.abspath(workdir), "reproduce")


def evaluator_cache(workdir: str, out: str, data_config) -> str:
    """The directory to read the evaluator from or train it into: WORKDIR/reproduce if it holds
    one or can be written, else `out` (a read-only workdir). Decided before any work."""
    from t2i_jax.evaluation import evaluator as ev_lib
    shared = evaluator_dir(workdir)
    for d in (shared, out):
        if os.path.exists(ev_lib.cache_path(d, data_config)):
            return d
    try:
        files.check_writable_dir(shared, "the evaluator cache")
        return shared
    except ValueError:
        return out


class Scorer:
    """Scores finished sampling jobs against the data set's held-out real images."""

    def __init__(self, config, cache_dir: str):
        from t2i_jax.evaluation import evaluator as ev_lib
        self.ev = ev_lib.load_or_train(config.data, cache_dir)
        (x_train, _), (x_eval, _) = ev_lib.evaluator_data(config.data)
        self.real = self.ev.features(x_eval)
        self.real_train = self.ev.features(x_train)

    def score(self, images: np.ndarray, prompts: list) -> dict:
        from t2i_jax.evaluation import evaluator as ev_lib
        from t2i_jax.evaluation.frechet import frechet_distance_of
        from t2i_jax.evaluation.precision_recall import precision_recall
        feats, logits = self.ev.apply(images)
        pr = precision_recall(self.real, feats)
        aligned = self.ev.aligned(images, prompts, logits=logits)
        out = dict(n=int(len(images)), fd=frechet_distance_of(self.real, feats),
                   alignment=float(np.nanmean(aligned)), precision=pr.precision, recall=pr.recall)
        if self.ev.kind == "shapes":
            held = np.array([ev_lib.is_held_out_prompt(p) for p in prompts])
            out["alignment_heldout"] = float(np.nanmean(aligned[held])) if held.any() else None
            out["alignment_seen"] = float(np.nanmean(aligned[~held])) if (~held).any() else None
        return out

    def real_floor(self, n: int, repeats: int = 5) -> dict:
        """The same metrics for n real training images (no generator), averaged over `repeats`
        random subsets: a reference for real data at this n (not a bound: the evaluator was
        trained on them); fd_sd is the subsets' spread, a guide to how far apart rows must be."""
        from t2i_jax.evaluation.frechet import frechet_distance_of
        from t2i_jax.evaluation.precision_recall import precision_recall
        rows = []
        for seed in range(repeats):
            rng = np.random.default_rng(seed)
            f = self.real_train[rng.choice(len(self.real_train), min(n, len(self.real_train)), False)]
            pr = precision_recall(self.real, f)
            rows.append((frechet_distance_of(self.real, f), pr.precision, pr.recall))
        r = np.asarray(rows)
        return dict(n=int(min(n, len(self.real_train))), fd=float(r[:, 0].mean()),
                    fd_sd=float(r[:, 0].std(ddof=1)), alignment=None,
                    precision=float(r[:, 1].mean()), recall=float(r[:, 2].mean()), repeats=repeats)


def _run(trained, outdir, prompts, *, num_per_prompt, guidance, seed, options, batch_size,
         progress, guides=(), rerank=1, reranker=None):
    from t2i_jax.sampling import job as job_lib
    spec = job_lib.JobSpec.create(trained, prompts, num_per_prompt=num_per_prompt,
                                  guidance=guidance, seed=seed, options=options, guides=guides,
                                  rerank=rerank, reranker=reranker)
    result = job_lib.run_job(trained, spec, outdir, batch_size=batch_size, progress=progress,
                             guides=guides, reranker=reranker)
    job_lib.print_summary(result)
    x, rows = job_lib.load_images(outdir)
    stats_path = os.path.join(outdir, job_lib.STATS_FILE)
    stats = files.read_json(stats_path) if os.path.exists(stats_path) else {}
    return x, rows, stats  # the speed of the run that generated the images, not of a rerun


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def reproduce_cfg(trained, out: str, *, num_per_prompt: int, seed: int, batch_size: int,
                  steps: int, weights=CFG_WEIGHTS, progress=True, scorer=None,
                  cache_dir: Optional[str] = None) -> dict:
    """scorer: a Scorer to reuse (default: one for the evaluator cached in cache_dir, by default
    evaluator_cache(...)); it is made before any sampling, so an evaluator that cannot be
    trained or stored fails first."""
    from t2i_jax.sampling.generate import SampleOptions
    cfg = trained.config
    prompts = default_prompts(cfg)
    options = dataclasses.replace(SampleOptions.from_config(cfg.sample), num_steps=steps)
    scorer = scorer or Scorer(cfg, cache_dir or evaluator_cache(trained.workdir, out, cfg.data))
    x, rows, stats = _run(trained, os.path.join(out, "samples"), prompts,
                           num_per_prompt=num_per_prompt, guidance=weights, seed=seed,
                           options=options, batch_size=batch_size, progress=progress)
    table = []
    for w in weights:
        sel = [i for i, r in enumerate(rows) if r["guidance"] == w]
        table.append(dict(w=w, **scorer.score(x[sel], [rows[i]["prompt"] for i in sel])))
    floor = scorer.real_floor(len(prompts) * num_per_prompt)
    results = dict(experiment="cfg", checkpoint_step=trained.step, params=trained.kind,
                   sampler=options.sampler, steps=steps, seed=seed, prompts=prompts,
                   num_per_prompt=num_per_prompt, evaluator_accuracy=scorer.ev.accuracy,
                   compilations=stats.get("compilations"), rows=table, real_floor=floor,
                   images_per_s=stats.get("images_per_s"))
    keys = ["fd", "alignment", "precision", "recall"] + (
        ["alignment_heldout", "alignment_seen"] if scorer.ev.kind == "shapes" else [])
    md = markdown_table(["w"] + keys, [[f"{r['w']:g}"] + [r[k] for k in keys] for r in table]
                        + [["real (train)"] + [floor.get(k) for k in keys]])
    md += (f"\nreal (train): {floor['repeats']} random subsets of n = {floor['n']} training images; "
           f"FD sd {_fmt(floor['fd_sd'])}\n")
    _write(out, results, md)
    _plot_cfg(table, floor, os.path.join(out, "plot.png"))
    return results


def reproduce_ddim(trained, out: str, *, num_per_prompt: int, seed: int, batch_size: int,
                   guidance: float, steps_list=DDIM_STEPS, dpm_steps=DPM_STEPS,
                   progress=True, cache_dir: Optional[str] = None) -> dict:
    from t2i_jax.sampling.generate import SampleOptions
    cfg = trained.config
    prompts = default_prompts(cfg)
    base = SampleOptions.from_config(cfg.sample)
    thresholding = base.thresholding
    scorer = Scorer(cfg, cache_dir or evaluator_cache(trained.workdir, out, cfg.data))
    runs = [(label, sampler, eta, var, n) for label, sampler, eta, var in DDIM_METHODS
            for n in steps_list]
    runs += [("DPM-Solver++(2M)", "dpmpp_2m", 0.0, "posterior", n) for n in dpm_steps]
    table = []
    for label, sampler, eta, var, n in runs:
        options = SampleOptions(sampler, n, eta, thresholding, base.spacing, var)
        name = f"{sampler}_eta{eta:g}_{var}_{n}"
        x, rows, stats = _run(trained, os.path.join(out, "samples", name), prompts,
                               num_per_prompt=num_per_prompt, guidance=(guidance,), seed=seed,
                               options=options, batch_size=batch_size, progress=progress)
        table.append(dict(method=label, steps=n, **scorer.score(x, [r["prompt"] for r in rows]),
                          images_per_s=stats.get("images_per_s"),
                          seconds=stats.get("seconds")))
    floor = scorer.real_floor(len(prompts) * num_per_prompt)
    results = dict(experiment="ddim", checkpoint_step=trained.step, params=trained.kind,
                   guidance=guidance, seed=seed, prompts=prompts, num_per_prompt=num_per_prompt,
                   thresholding=thresholding or "none", evaluator_accuracy=scorer.ev.accuracy,
                   rows=table, real_floor=floor)
    methods = [m[0] for m in DDIM_METHODS] + ["DPM-Solver++(2M)"]
    all_steps = sorted({r["steps"] for r in table})
    md = ""
    for metric in ("fd", "alignment"):
        md += f"\n{metric}:\n\n" + markdown_table(
            ["method"] + [f"{s} steps" for s in all_steps],
            [[m] + [next((r[metric] for r in table if r["method"] == m and r["steps"] == s), None)
                    for s in all_steps] for m in methods])
    md += (f"\nreal (train) floor: fd {_fmt(floor['fd'])} (sd {_fmt(floor['fd_sd'])} over "
           f"{floor['repeats']} subsets of n = {floor['n']})\n")
    _write(out, results, md)
    _plot_ddim(table, methods, floor, os.path.join(out, "plot.png"))
    return results


def reproduce_checkpoints(workdir: str, out: str, *, num_per_prompt: int, seed: int,
                          batch_size: int, guidance: float = 0.0, progress=True,
                          cache_dir: Optional[str] = None) -> dict:
    """The metrics of every checkpoint at guidance w (default 0: the model's own conditional
    distribution, whose FD reaches the real-data floor when the model fits the data). A damaged
    checkpoint is skipped and listed under "skipped"."""
    from t2i_jax.sampling.generate import SampleOptions
    from t2i_jax.sampling.load import (NoCheckpointError, checkpoint_dir, load_trained,
                                       require_generator)
    from t2i_jax.checkpoint import CheckpointDamagedError, Checkpointer
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise NoCheckpointError(f"no checkpoint in {workdir}: {checkpoint_dir(workdir)} does not "
                                "exist; pass the --workdir of a training run.")
    ck = Checkpointer(checkpoint_dir(workdir), keep=0, read_only=True)
    steps = ck.steps()
    ck.close()
    if not steps:
        raise NoCheckpointError(f"no finished checkpoint in {checkpoint_dir(workdir)}.")
    table, scorer, skipped, n = [], None, [], 0
    for s in steps:
        try:
            trained = load_trained(workdir, step=s)
        except CheckpointDamagedError:
            print(f"[t2i_jax] checkpoint {s} is damaged (see above): skipped.", file=sys.stderr)
            skipped.append(s)
            continue
        cfg = require_generator(trained).config
        scorer = scorer or Scorer(cfg, cache_dir or evaluator_cache(workdir, out, cfg.data))
        w = float(guidance)
        x, rows, _ = _run(trained, os.path.join(out, "samples", f"step_{s}"), default_prompts(cfg),
                          num_per_prompt=num_per_prompt, guidance=(w,), seed=seed,
                          options=SampleOptions.from_config(cfg.sample), batch_size=batch_size,
                          progress=progress)
        n = len(x)
        table.append(dict(step=s, w=w, **scorer.score(x, [r["prompt"] for r in rows])))
    if not table:
        raise CheckpointDamagedError(f"every checkpoint of {workdir} ({steps}) is damaged; "
                                     "nothing to score.")
    floor = scorer.real_floor(n)
    results = dict(experiment="checkpoints", workdir=os.path.abspath(workdir), guidance=guidance,
                   rows=table, real_floor=floor, skipped=skipped)
    keys = ["fd", "alignment", "precision", "recall"]
    md = markdown_table(["step"] + keys, [[r["step"]] + [r[k] for k in keys] for r in table]
                        + [["real (train)"] + [floor.get(k) for k in keys]])
    md += (f"\nw = {guidance:g}; real (train): {floor['repeats']} random subsets of n = "
           f"{floor['n']} training images; FD sd {_fmt(floor['fd_sd'])}\n")
    if skipped:
        md += f"\nskipped (damaged): {', '.join(map(str, skipped))}\n"
    _write(out, results, md)
    return results


def _finite_or_none(x):
    """NaN / infinity -> None (JSON has no NaN), numpy scalars -> Python ones, recursively."""
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


def run_reproduction(a, load, compute, markdown) -> int:
    """A reproduction command: load(a) -> models, loaded and checked before OUT is locked or
    written; then, under OUT's lock, compute(models, a) -> results and markdown(results), written
    to OUT/results.json and OUT/table.md, and printed."""
    from t2i_jax.xla_flags import apply_tuned_flags
    apply_tuned_flags()
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    models = load(a)
    with files.ExclusiveLock(a.out, "writing a reproduction", "wait for it, or pass another --out"):
        res = compute(models, a)
        md = markdown(res)
        _write(a.out, res, md + "\n")
    print(md)
    print(f"[t2i_jax] wrote {a.out}/table.md and results.json", file=sys.stderr)
    return 0


def _write(out: str, results: dict, md: str) -> None:
    files.write_json(os.path.join(out, "results.json"), _finite_or_none(results))
    files.write_text(os.path.join(out, "table.md"), md)


def _plot_cfg(table, floor, path):
    _plot_tradeoff(table, "w", "guidance weight w", floor, "CFG trade-off as w grows", path)


def _plot_tradeoff(table, key, name, floor, title, path):
    """FD against alignment as rows[key] grows, and precision / recall against it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    fd = [r["fd"] for r in table]
    al = [r["alignment"] for r in table]
    a.plot(al, fd, "o-")
    for r in table:
        a.annotate(f"{key}={r[key]:g}", (r["alignment"], r["fd"]), textcoords="offset points",
                   xytext=(4, 4))
    a.axhline(floor["fd"], ls=":", c="gray", label="real data (same n)")
    a.margins(x=0.12, y=0.08)
    a.set_xlabel("alignment (fraction of images the classifier reads as the prompt)")
    a.set_ylabel("FD (classifier features)")
    a.set_title(title)
    a.legend()
    ws = [r[key] for r in table]
    b.plot(ws, [r["precision"] for r in table], "o-", label="precision")
    b.plot(ws, [r["recall"] for r in table], "s-", label="recall")
    b.set_xlabel(name)
    b.set_ylim(0, 1.02)
    b.legend()
    fig.tight_layout()
    _save_fig(fig, path)


def _plot_ddim(table, methods, floor, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for m in methods:
        rs = [r for r in table if r["method"] == m]
        a.plot([r["steps"] for r in rs], [r["fd"] for r in rs], "o-", label=m)
        b.plot([r["steps"] for r in rs], [r["alignment"] for r in rs], "o-", label=m)
    a.axhline(floor["fd"], ls=":", c="gray", label="real data (same n)")
    for ax, name in ((a, "FD (classifier features)"), (b, "alignment")):
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(name)
    a.set_yscale("log")
    a.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig, path):
    import matplotlib.pyplot as plt
    with files.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m t2i_jax.evaluation.reproduce",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=("cfg", "ddim", "checkpoints", "classifier", "sdg",
                                          "cascade", "latent", "unclip"))
    p.add_argument("--workdir", required=True, help="training workdir of a digits/shapes model")
    p.add_argument("--out", help="default: WORKDIR/reproduce/EXPERIMENT")
    p.add_argument("--num_per_prompt", type=int, default=50, help="images per prompt per row")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="ddim and checkpoints: the w of every row (default 0: the conditional "
                        "model unguided, as the DDIM paper's table had no guidance)")
    p.add_argument("--steps", type=int, default=50,
                   help="cfg, classifier, sdg, cascade (its base): sampling steps (config's "
                        "sampler)")
    p.add_argument("--classifier", help="classifier: the noisy_classifier workdir that guides")
    p.add_argument("--clip", help="sdg: the contrastive (CLIP) workdir that guides")
    p.add_argument("--sr", help="cascade: the super_resolution workdir after the --workdir base; "
                                "latent: the cascade's SR stage, after --base")
    p.add_argument("--base", help="latent: the cascade's 16x16 base workdir")
    p.add_argument("--prior", help="unclip: the prior workdir (--workdir: the decoder)")
    p.add_argument("--f4_short", help="latent: a latent model trained as --f2 and --noscale "
                                      "are (the f = 4 reference of equal training)")
    p.add_argument("--f2", help="latent: the latent model on an f = 2 autoencoder")
    p.add_argument("--noscale", help="latent: the latent model trained with "
                                     "latent.scale_by_std=False")
    p.add_argument("--sr_noaug", help="cascade: the same SR trained with sr.max_train_level=0")
    p.add_argument("--sr_steps", type=int, help="cascade: the SR's sampling steps (default: its "
                                                "config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    if a.num_per_prompt < 1 or a.batch_size < 1 or a.steps < 1:
        p.error("--num_per_prompt, --batch_size and --steps must be >= 1.")
    if not 0 <= a.seed < 2 ** 32:
        p.error(f"--seed must be in [0, 2^32) (JAX keys hold 32 bits), got {a.seed}.")
    if not math.isfinite(a.guidance):
        p.error(f"--guidance must be a finite number, got {a.guidance}.")
    if a.sr_steps is not None and a.sr_steps < 1:
        p.error(f"--sr_steps must be >= 1, got {a.sr_steps}.")
    for flag in ("base", "f4_short", "f2", "noscale"):
        if a.experiment != "latent" and getattr(a, flag) is not None:
            p.error(f"--{flag} is for reproduce latent, not {a.experiment}.")
    needs = dict(classifier="classifier", sdg="clip", cascade="sr")
    for exp, flag in needs.items():
        if exp == "cascade" and a.experiment == "latent":
            continue  # --sr is optional there (with --base)
        if a.experiment == exp and not getattr(a, flag):
            what = "super-resolution model" if exp == "cascade" else "guide"
            p.error(f"reproduce {exp} needs --{flag} DIR (the {what}'s training workdir).")
        if a.experiment != exp and getattr(a, flag):
            p.error(f"--{flag} is for reproduce {exp}, not {a.experiment}.")
    if a.experiment == "unclip" and not a.prior:
        p.error("reproduce unclip needs --prior DIR (the prior's workdir; --workdir is the decoder).")
    if a.experiment != "unclip" and a.prior:
        p.error(f"--prior is for reproduce unclip, not {a.experiment}.")
    for flag in ("sr_noaug", "sr_steps"):
        if a.experiment != "cascade" and getattr(a, flag) is not None:
            p.error(f"--{flag} is for reproduce cascade, not {a.experiment}.")
    a.out = a.out or os.path.join(a.workdir, "reproduce", a.experiment)
    try:
        a.out = files.check_writable_dir(files.check_output_dir(a.out, "--out"), "--out")
    except ValueError as e:
        p.error(str(e))
    from t2i_jax.errors import Boundary
    boundary = Boundary("reproduce", interrupted=(
        f"interrupted: the finished sampling shards under {a.out} are kept; rerun the same "
        "command to go on."))
    boundary.log_in(a.out)
    if a.experiment == "cascade":  # its models are checked before OUT is locked or written
        from t2i_jax.evaluation import reproduce_cascade
        return boundary.run(reproduce_cascade.run, a)
    if a.experiment == "latent":
        from t2i_jax.evaluation import reproduce_latent
        return boundary.run(reproduce_latent.run, a)
    if a.experiment == "unclip":
        from t2i_jax.evaluation import reproduce_unclip
        return boundary.run(reproduce_unclip.run, a)
    return boundary.run(_reproduce, a)


def _reproduce(a) -> int:
    with files.ExclusiveLock(a.out, "writing a reproduction", "wait for it, or pass another --out"):
        return _reproduce_locked(a)


def _reproduce_locked(a) -> int:
    from t2i_jax.xla_flags import apply_tuned_flags
    apply_tuned_flags()
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    from t2i_jax.sampling.load import load_trained, require_generator
    out, progress = a.out, not a.no_progress
    common = dict(num_per_prompt=a.num_per_prompt, seed=a.seed, batch_size=a.batch_size,
                  progress=progress)
    if a.experiment == "checkpoints":
        reproduce_checkpoints(a.workdir, out, guidance=a.guidance, **common)
    else:
        trained = require_generator(load_trained(a.workdir))
        if a.experiment in ("classifier", "sdg"):
            from t2i_jax.evaluation import reproduce_guides as rg
            if a.experiment == "classifier":
                rg.reproduce_classifier(trained, a.classifier, out, steps=a.steps, **common)
            else:
                rg.reproduce_sdg(trained, a.clip, out, steps=a.steps, **common)
        elif a.experiment == "cfg":
            reproduce_cfg(trained, out, steps=a.steps, **common)
        else:
            reproduce_ddim(trained, out, guidance=a.guidance, **common)
    print(open(os.path.join(out, "table.md"), encoding="utf-8").read())
    print(f"[t2i_jax] wrote {out}/table.md, plot.png, results.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
