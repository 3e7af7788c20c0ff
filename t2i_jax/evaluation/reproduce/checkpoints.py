"""`reproduce checkpoints`: the cfg metrics for every checkpoint in the workdir, at w = 0 unless
--guidance (is the model converged? at w = 0 its FD should reach the real-data floor).

    python -m t2i_jax.evaluation.reproduce checkpoints --workdir runs/digits
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from t2i_jax.evaluation.reproduce import common
from t2i_jax.evaluation.scorer import Scorer, evaluator_cache

# its line in reproduce --help
SUMMARY = "the cfg metrics of every checkpoint in the workdir (is the model converged?)"


def add_arguments(p) -> None:
    common.add_arguments(p, guidance="the w of every row (default 0: the model's own "
                                     "conditional distribution)")


def check_arguments(p, a) -> None:
    common.check_arguments(p, a)


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
        x, rows, _ = common.sample_job(trained, os.path.join(out, "samples", f"step_{s}"),
                                       common.default_prompts(cfg),
                                       num_per_prompt=num_per_prompt, guidance=(w,), seed=seed,
                                       options=SampleOptions.from_config(cfg.sample),
                                       batch_size=batch_size, progress=progress)
        n = len(x)
        table.append(dict(step=s, w=w, **scorer.score(x, [r["prompt"] for r in rows])))
    if not table:
        raise CheckpointDamagedError(f"every checkpoint of {workdir} ({steps}) is damaged; "
                                     "nothing to score.")
    floor = scorer.real_floor(n)
    results = dict(experiment="checkpoints", workdir=os.path.abspath(workdir), guidance=guidance,
                   rows=table, real_floor=floor, skipped=skipped)
    keys = ["fd", "alignment", "precision", "recall"]
    md = common.markdown_table(["step"] + keys,
                               [[r["step"]] + [r[k] for k in keys] for r in table]
                               + [["real (train)"] + [floor.get(k) for k in keys]])
    md += (f"\nw = {guidance:g}; real (train): {floor['repeats']} random subsets of n = "
           f"{floor['n']} training images; FD sd {common.fmt(floor['fd_sd'])}\n")
    if skipped:
        md += f"\nskipped (damaged): {', '.join(map(str, skipped))}\n"
    common.write_results(out, results, md)
    return results


def run(a) -> int:
    return common.run_locked(a, lambda a: reproduce_checkpoints(
        a.workdir, a.out, num_per_prompt=a.num_per_prompt, seed=a.seed, batch_size=a.batch_size,
        guidance=a.guidance, progress=not a.no_progress))
