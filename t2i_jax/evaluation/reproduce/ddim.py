"""`reproduce ddim`: Song et al. (2021), table 1: DDIM eta = 0, DDIM eta = 1 and DDPM with
sigma-hat (variance beta, ddpm_variance="beta") at 10, 20, 50, 100, 1000 steps, and
DPM-Solver++(2M) (Lu et al. 2022) at 10 and 20 -> FD and alignment.

    python -m t2i_jax.evaluation.reproduce ddim --workdir runs/digits
"""

from __future__ import annotations

import os
from typing import Optional

from t2i_jax.evaluation.reproduce import common
from t2i_jax.evaluation.scorer import Scorer, evaluator_cache

DDIM_STEPS = (10, 20, 50, 100, 1000)
DPM_STEPS = (10, 20)
# (label, sampler, eta, ddpm_variance)
DDIM_METHODS = (("DDIM eta=0", "ddim", 0.0, "posterior"), ("DDIM eta=1", "ddim", 1.0, "posterior"),
                ("DDPM (sigma-hat)", "ddpm", 0.0, "beta"))

# its line in reproduce --help
SUMMARY = "Song et al. (2021), table 1: DDIM eta 0 / 1, DDPM and DPM-Solver++(2M) over the steps"


def add_arguments(p) -> None:
    common.add_arguments(p, guidance="the w of every row (default 0: the conditional model "
                                     "unguided, as the DDIM paper's table had no guidance)")


def check_arguments(p, a) -> None:
    common.check_arguments(p, a)


def reproduce_ddim(trained, out: str, *, num_per_prompt: int, seed: int, batch_size: int,
                   guidance: float, steps_list=DDIM_STEPS, dpm_steps=DPM_STEPS,
                   progress=True, cache_dir: Optional[str] = None) -> dict:
    from t2i_jax.sampling.generate import SampleOptions
    cfg = trained.config
    prompts = common.default_prompts(cfg)
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
        x, rows, stats = common.sample_job(trained, os.path.join(out, "samples", name), prompts,
                                           num_per_prompt=num_per_prompt, guidance=(guidance,),
                                           seed=seed, options=options, batch_size=batch_size,
                                           progress=progress)
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
        md += f"\n{metric}:\n\n" + common.markdown_table(
            ["method"] + [f"{s} steps" for s in all_steps],
            [[m] + [next((r[metric] for r in table if r["method"] == m and r["steps"] == s), None)
                    for s in all_steps] for m in methods])
    md += (f"\nreal (train) floor: fd {common.fmt(floor['fd'])} (sd {common.fmt(floor['fd_sd'])} "
           f"over {floor['repeats']} subsets of n = {floor['n']})\n")
    common.write_results(out, results, md)
    _plot_ddim(table, methods, floor, os.path.join(out, "plot.png"))
    return results


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
    common.save_fig(fig, path)


def run(a) -> int:
    def reproduce(a):
        from t2i_jax.sampling.load import load_trained, require_generator
        reproduce_ddim(require_generator(load_trained(a.workdir)), a.out,
                       num_per_prompt=a.num_per_prompt, seed=a.seed, batch_size=a.batch_size,
                       guidance=a.guidance, progress=not a.no_progress)
    return common.run_locked(a, reproduce)
