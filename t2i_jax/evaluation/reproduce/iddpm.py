"""`reproduce iddpm`: Improved DDPM's claims (Nichol & Dhariwal 2021) on an embedded data set.

    python -m t2i_jax.evaluation.reproduce iddpm --workdir runs/digits_learned_sigma \
        --fixed runs/digits

  1. sampling  the L_hybrid model (--workdir, diffusion.learn_sigma) sampled by DDPM on a respaced
               chain of 25, 50, 100 and 1000 steps with its learned sigma, fixed beta~
               (posterior) and fixed beta; beside it the L_simple model (--fixed, optional) with
               beta~ and beta -> FD and alignment (the paper's sec. 3.1 / fig. 8: a learned
               sigma keeps few-step sampling good, fixed choices fall apart below ~100 steps);
  2. bits/dim  the test split's variational bound summed over all T terms (evaluation/nll.py):
               L_hybrid with its learned sigma against L_simple with beta~ and beta (table 1;
               --limit test images, the same ones for every row).
Every sampling run is a resumable job under OUT/samples/.
"""

from __future__ import annotations

import dataclasses
import os

from t2i_jax.evaluation.reproduce import common
from t2i_jax.evaluation.reproduce.common import fmt, markdown_table
from t2i_jax.evaluation.scorer import Scorer, evaluator_cache

STEPS = (25, 50, 100, 1000)
VARIANCES = ("learned", "posterior", "beta")
LABELS = {"learned": "learned sigma", "posterior": "fixed beta~", "beta": "fixed beta"}

# its line in reproduce --help
SUMMARY = "Nichol & Dhariwal (2021): learned sigma vs fixed over the steps; bits/dim"


def add_arguments(p) -> None:
    common.add_arguments(p, workdir_help="the L_hybrid model (trained with diffusion.learn_sigma)",
                         guidance="the w of every sampling row (default 0)")
    p.add_argument("--fixed", help="the L_simple (fixed-variance) model trained alike")
    p.add_argument("--limit", type=int, default=128, help="test images for bits/dim (default 128)")


def check_arguments(p, a) -> None:
    common.check_arguments(p, a)
    common.check_limit(p, a)


def load_models(a):
    from t2i_jax.sampling.load import load_trained, require_generator
    hybrid = require_generator(load_trained(a.workdir))
    if not hybrid.family.learn_sigma:
        raise ValueError(f"reproduce iddpm's --workdir must hold a model trained with a learned "
                         f"variance (diffusion.learn_sigma, e.g. configs/digits_learned_sigma.py); "
                         f"{a.workdir}'s variance is fixed.")
    fixed = None
    if a.fixed:
        fixed = require_generator(load_trained(a.fixed))
        if fixed.family.learn_sigma:
            raise ValueError(f"--fixed {a.fixed} learned its variance: pass the L_simple model "
                             "trained alike without diffusion.learn_sigma (e.g. configs/digits.py).")
        if fixed.config.data.name != hybrid.config.data.name:
            raise ValueError(f"--fixed {a.fixed} was trained on {fixed.config.data.name!r}, "
                             f"--workdir on {hybrid.config.data.name!r}: compare models of one "
                             "data set.")
    from t2i_jax.evaluation import nll
    for t in (hybrid, fixed):
        if t is not None:
            nll.make_terms_fn(t.family, "posterior")  # its refusals, before any work
    return hybrid, fixed


def reproduce_iddpm(hybrid, fixed, out, *, num_per_prompt, seed, batch_size, guidance,
                    limit, steps_list=STEPS, progress=True) -> dict:
    from t2i_jax.evaluation import nll
    from t2i_jax.sampling.generate import SampleOptions
    cfg = hybrid.config
    prompts = common.default_prompts(cfg)
    scorer = Scorer(cfg, evaluator_cache(hybrid.workdir, out, cfg.data))
    models = [("L_hybrid", hybrid, VARIANCES)] + (
        [("L_simple", fixed, VARIANCES[1:])] if fixed is not None else [])
    table = []
    for objective, trained, variances in models:
        base = SampleOptions.from_config(trained.config.sample)
        for var in variances:
            for n in steps_list:
                options = dataclasses.replace(base, sampler="ddpm", num_steps=n, eta=0.0,
                                              ddpm_variance=var)
                name = f"{objective}_{var}_{n}"
                x, rows, stats = common.sample_job(
                    trained, os.path.join(out, "samples", name), prompts,
                    num_per_prompt=num_per_prompt, guidance=(guidance,), seed=seed,
                    options=options, batch_size=batch_size, progress=progress)
                table.append(dict(objective=objective, variance=var, steps=n,
                                  **scorer.score(x, [r["prompt"] for r in rows]),
                                  images_per_s=stats.get("images_per_s")))
    floor = scorer.real_floor(len(prompts) * num_per_prompt)
    bpd = []
    for objective, trained, variances in models:
        for var in variances if objective == "L_simple" else ("learned",):
            res = nll.evaluate(trained, limit=limit, batch_size=batch_size, seed=seed,
                               variance=var)
            bpd.append(dict(objective=objective, variance=var, **{
                k: res[k] for k in ("bits_per_dim", "stderr", "decoder_bpd", "kl_terms_bpd",
                                    "prior_bpd", "num_examples", "num_timesteps",
                                    "checkpoint_step", "mean_term_by_quarter",
                                    "clip_denoised")}))
    return dict(experiment="iddpm", workdir=hybrid.workdir, checkpoint_step=hybrid.step,
                fixed=fixed.workdir if fixed is not None else None,
                fixed_step=fixed.step if fixed is not None else None, guidance=guidance,
                seed=seed, prompts=prompts, num_per_prompt=num_per_prompt,
                thresholding=SampleOptions.from_config(cfg.sample).thresholding or "none",
                evaluator_accuracy=scorer.ev.accuracy, rows=table, real_floor=floor,
                bits_per_dim=bpd)


def markdown(res: dict) -> str:
    steps = sorted({r["steps"] for r in res["rows"]})
    methods = []
    for r in res["rows"]:
        if (r["objective"], r["variance"]) not in methods:
            methods.append((r["objective"], r["variance"]))
    md = [f"DDPM sampling on a respaced chain (guidance w = {res['guidance']:g}, "
          f"{res['num_per_prompt']} images per prompt, thresholding {res['thresholding']}):\n"]
    for metric, digits in (("fd", 1), ("alignment", 3)):
        md.append(f"\n{metric}:\n")
        md.append(markdown_table(
            ["model", "sigma"] + [f"{s} steps" for s in steps],
            [[o, LABELS[v]] + [fmt(next((r[metric] for r in res["rows"] if r["objective"] == o
                                          and r["variance"] == v and r["steps"] == s), None),
                                    digits) for s in steps] for o, v in methods]))
    f = res["real_floor"]
    md.append(f"\nreal (train) floor: FD {fmt(f['fd'], 1)} (sd {fmt(f['fd_sd'], 1)} over "
              f"{f['repeats']} subsets of n = {f['n']})\n")
    clip = {b.get("clip_denoised") for b in res["bits_per_dim"]}
    md.append("\nbits/dim of the test split (the VLB over all T terms; mean +- standard error "
              "over examples; x0_hat " + ("clipped to [-1, 1]" if clip == {True} else
                                         "unclipped" if clip == {False} else "clipping as "
                                         "evaluation/nll.py did then") + "):\n")
    md.append(markdown_table(
        ["model", "sigma", "bits/dim", "decoder L_0", "KL terms", "prior L_T", "images", "T"],
        [[b["objective"], LABELS[b["variance"]], f"{b['bits_per_dim']:.4f} +- {b['stderr']:.4f}",
          fmt(b["decoder_bpd"], 4), fmt(b["kl_terms_bpd"], 4), f"{b['prior_bpd']:.1e}",
          str(b["num_examples"]), str(b["num_timesteps"])] for b in res["bits_per_dim"]]))
    return "".join(md)


def run(a) -> int:
    return common.run_reproduction(a, load_models, lambda models, a: reproduce_iddpm(
        *models, a.out, num_per_prompt=a.num_per_prompt, seed=a.seed, batch_size=a.batch_size,
        guidance=a.guidance, limit=a.limit, progress=not a.no_progress), markdown)
