"""What the reproductions share: their common flags, sampling jobs, tables, plots, and the two
ways a reproduction command runs under OUT's lock. Imported by every experiment module; imports
none of them (the scoring itself is t2i_jax/evaluation/scorer.py)."""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import numpy as np

from t2i_jax import files, images

LOCK_WHAT, LOCK_ADVICE = "writing a reproduction", "wait for it, or pass another --out"


# --- flags ---------------------------------------------------------------------------------------

def add_arguments(p, *, workdir_help: str = "training workdir of a digits/shapes model",
                  num_per_prompt: bool = True, steps=None, guidance=None) -> None:
    """The flags most reproductions take: --workdir, --out, --seed, --batch_size, --no_progress;
    --num_per_prompt unless num_per_prompt=False; --steps (default 50) and --guidance (default
    0) where `steps` / `guidance` is their help text."""
    p.add_argument("--workdir", required=True, help=workdir_help)
    p.add_argument("--out", help="default: WORKDIR/reproduce/EXPERIMENT")
    if num_per_prompt:
        p.add_argument("--num_per_prompt", type=int, default=50, help="images per prompt per row")
    if guidance is not None:
        p.add_argument("--guidance", type=float, default=0.0, help=guidance)
    if steps is not None:
        p.add_argument("--steps", type=int, default=50, help=steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--no_progress", action="store_true")


def check_arguments(p, a) -> None:
    """Refuses (p.error) the values of add_arguments' flags that cannot run."""
    counts = [f"--{k}" for k in ("num_per_prompt", "batch_size", "steps") if hasattr(a, k)]
    if any(getattr(a, k[2:]) < 1 for k in counts):
        p.error(f"{', '.join(counts[:-1])} and {counts[-1]} must be >= 1." if len(counts) > 1
                else f"{counts[0]} must be >= 1.")
    if not 0 <= a.seed < 2 ** 32:
        p.error(f"--seed must be in [0, 2^32) (JAX keys hold 32 bits), got {a.seed}.")
    if hasattr(a, "guidance") and not math.isfinite(a.guidance):
        p.error(f"--guidance must be a finite number, got {a.guidance}.")


def check_limit(p, a) -> None:
    if a.limit < 1:
        p.error(f"--limit must be >= 1, got {a.limit}.")


def require(p, a, flag: str, experiment: str, what: str) -> None:
    """Refuses a missing --flag DIR that `experiment` needs (what: whose training workdir)."""
    if not getattr(a, flag):
        p.error(f"reproduce {experiment} needs --{flag} DIR (the {what}'s training workdir).")


# --- sampling ------------------------------------------------------------------------------------

def default_prompts(config) -> list:
    from t2i_jax import data as data_lib
    return list(data_lib.sample_prompts(config.data))


def config_options(cfg, steps: int):
    """The config's SampleOptions with `steps` sampling steps."""
    from t2i_jax.sampling.generate import SampleOptions
    return dataclasses.replace(SampleOptions.from_config(cfg.sample), num_steps=steps)


def sample_job(trained, outdir, prompts, *, num_per_prompt, guidance, seed, options, batch_size,
               progress, **plan_kw):
    """Runs (or resumes) one sampling job into outdir (plan_kw: the rest of its sampling/plan.py
    Plan: guides, stages, given inputs, ...): (uint8 images, records, the stats of the run that
    generated the images, not of a rerun)."""
    from t2i_jax.sampling import job as job_lib
    from t2i_jax.sampling import outdir as out_lib
    from t2i_jax.sampling.plan import Plan
    plan = Plan.create(trained, prompts, num_per_prompt=num_per_prompt, guidance=guidance,
                       seed=seed, options=options, **plan_kw)
    result = job_lib.run_job(plan, outdir, batch_size=batch_size, progress=progress)
    job_lib.print_summary(result)
    x, rows = out_lib.load_images(outdir)
    stats_path = os.path.join(outdir, out_lib.STATS_FILE)
    stats = files.read_json(stats_path) if os.path.exists(stats_path) else {}
    return x, rows, stats


def unguided_job(trained, out, name, prompts, **kw):
    """sample_job at w = 0 under OUT/samples/NAME (the guide sweeps'): (uint8 images, records,
    the sampling programs the run that generated them compiled)."""
    x, rows, stats = sample_job(trained, os.path.join(out, "samples", name), prompts,
                                guidance=(0.0,), **kw)
    return x, rows, int(stats.get("compilations") or 0)


# --- tables and plots ----------------------------------------------------------------------------

def fmt(v, digits=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def finite_or_none(x):
    """NaN / infinity -> None (JSON has no NaN), numpy scalars -> Python ones, recursively."""
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x


def write_results(out: str, results: dict, md: str) -> None:
    """OUT/results.json (NaN as null; with how the scored images became uint8) and OUT/table.md."""
    if isinstance(results, dict):
        results = dict(results, uint8_conversion=images.UINT8_CONVERSION)
    files.write_json(os.path.join(out, "results.json"), finite_or_none(results))
    files.write_text(os.path.join(out, "table.md"), md)


def save_fig(fig, path):
    import matplotlib.pyplot as plt
    with files.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def plot_tradeoff(table, key, name, floor, title, path):
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
    save_fig(fig, path)


# --- running a command ---------------------------------------------------------------------------

def tuned_quiet_jax() -> None:
    """The tuned XLA flags (before jax starts a backend), absl's logging at WARNING."""
    from t2i_jax.xla_flags import apply_tuned_flags
    apply_tuned_flags()
    from absl import logging
    logging.set_verbosity(logging.WARNING)


def run_locked(a, reproduce) -> int:
    """A sweep that loads its models under OUT's lock: reproduce(a) writes OUT/table.md,
    results.json and plot.png; the table is printed."""
    with files.ExclusiveLock(a.out, LOCK_WHAT, LOCK_ADVICE):
        tuned_quiet_jax()
        reproduce(a)
        print(open(os.path.join(a.out, "table.md"), encoding="utf-8").read())
        print(f"[t2i_jax] wrote {a.out}/table.md, plot.png, results.json", file=sys.stderr)
    return 0


def run_reproduction(a, load, compute, markdown) -> int:
    """A reproduction command: load(a) -> models, loaded and checked before OUT is locked or
    written; then, under OUT's lock, compute(models, a) -> results and markdown(results), written
    to OUT/results.json and OUT/table.md, and printed."""
    tuned_quiet_jax()
    models = load(a)
    with files.ExclusiveLock(a.out, LOCK_WHAT, LOCK_ADVICE):
        res = compute(models, a)
        md = markdown(res)
        write_results(a.out, res, md + "\n")
    print(md)
    print(f"[t2i_jax] wrote {a.out}/table.md and results.json", file=sys.stderr)
    return 0
