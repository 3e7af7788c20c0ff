"""`reproduce cfg`: Ho & Salimans (2022), fig. 4 / table 1: guidance weight w in {0, 0.5, 1, 2,
3, 5} (one sampling job, one compilation) -> FD, alignment, precision, recall; plot of FD against
alignment as w grows.

    python -m t2i_jax.evaluation.reproduce cfg --workdir runs/digits
"""

from __future__ import annotations

import os
from typing import Optional

from t2i_jax.evaluation.reproduce import common
from t2i_jax.evaluation.scorer import Scorer, evaluator_cache

CFG_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0)

# its line in reproduce --help
SUMMARY = "Ho & Salimans (2022): the guidance weight sweep -> FD, alignment, precision, recall"


def add_arguments(p) -> None:
    common.add_arguments(p, steps="sampling steps (config's sampler)")


def check_arguments(p, a) -> None:
    common.check_arguments(p, a)


def reproduce_cfg(trained, out: str, *, num_per_prompt: int, seed: int, batch_size: int,
                  steps: int, weights=CFG_WEIGHTS, progress=True, scorer=None,
                  cache_dir: Optional[str] = None) -> dict:
    """scorer: a Scorer to reuse (default: one for the evaluator cached in cache_dir, by default
    evaluator_cache(...)); it is made before any sampling, so an evaluator that cannot be
    trained or stored fails first."""
    cfg = trained.config
    prompts = common.default_prompts(cfg)
    options = common.config_options(cfg, steps)
    scorer = scorer or Scorer(cfg, cache_dir or evaluator_cache(trained.workdir, out, cfg.data))
    x, rows, stats = common.sample_job(trained, os.path.join(out, "samples"), prompts,
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
    md = common.markdown_table(["w"] + keys,
                               [[f"{r['w']:g}"] + [r[k] for k in keys] for r in table]
                               + [["real (train)"] + [floor.get(k) for k in keys]])
    md += (f"\nreal (train): {floor['repeats']} random subsets of n = {floor['n']} training images; "
           f"FD sd {common.fmt(floor['fd_sd'])}\n")
    common.write_results(out, results, md)
    common.plot_tradeoff(table, "w", "guidance weight w", floor, "CFG trade-off as w grows",
                         os.path.join(out, "plot.png"))
    return results


def run(a) -> int:
    def reproduce(a):
        from t2i_jax.sampling.load import load_trained, require_generator
        reproduce_cfg(require_generator(load_trained(a.workdir)), a.out,
                      num_per_prompt=a.num_per_prompt, seed=a.seed, batch_size=a.batch_size,
                      steps=a.steps, progress=not a.no_progress)
    return common.run_locked(a, reproduce)
