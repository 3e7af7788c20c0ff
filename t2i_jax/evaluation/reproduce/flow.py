"""`reproduce flow`: rectified flow's claim of straighter paths and fewer steps (Liu et al. 2023;
SD3, Esser et al. 2024), the guidance methods after CFG on the flow model, and the UNet against
the DiT (Peebles & Xie 2023) at matched parameters.

    python -m t2i_jax.evaluation.reproduce flow --workdir runs/digits_flow --vp runs/digits \\
        [--dit runs/digits_dit]

1. The VP-eps model (--vp) against the flow model (--workdir), trained with the same network,
   data, steps and batch: FD and alignment against the model calls (NFE 5, 10, 20, 50) for
   DDIM (= Euler: on the same steps the two are one update, for either process), DPM-Solver++(2M)
   and Heun (2N - 1 calls for N steps: 5, 9, 19, 49).
2. CFG, guidance rescale (Lin et al. 2023), a guidance interval (Kynkäänniemi et al. 2024) and
   APG (Sadat et al. 2024) on the flow model over their parameters: alignment, FD, precision,
   recall and saturation (the fraction of pixel values at 255).
3. With --dit: the UNet against the DiT: parameters, training images/s (the median of the
   run's logged rates) and quality at the config's sampler, 50 steps, w = 3.
4. --parts shapes, on a shapes model (configs/shapes_dit_flow.py): "a large COLOUR SHAPE" for
   every colour-shape pair, read as its colour and shape; the 3 held-out pairs apart.

    python -m t2i_jax.evaluation.reproduce flow --workdir runs/shapes_dit_flow --parts shapes
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from t2i_jax.evaluation.reproduce import common, flow_guidance
from t2i_jax.evaluation.reproduce.flow_guidance import saturation, score
from t2i_jax.evaluation.scorer import Scorer, evaluator_cache

NFES = (5, 10, 20, 50)
# (label, sampler, Heun's variables): DDIM and Euler are one update on the same steps
# (tests/test_flow.py); Heun runs in the model's own variables (a VP model's: k-diffusion's sigma)
# and, on a VP model, in the flow path's too (on a flow model that is the same row)
NFE_SAMPLERS = (("DDIM = Euler", "ddim", None), ("DPM-Solver++(2M)", "dpmpp_2m", None),
                ("Heun", "heun", None), ("Heun, flow variables", "heun", "flow"))
GUIDANCE_W = 3.0

PARTS = ("nfe", "guidance", "backbone", "shapes")

SUMMARY = ("rectified flow against VP at matched compute (FD, alignment by NFE), guidance after "
           "CFG (rescale, interval, APG), UNet against DiT")


def add_arguments(p) -> None:
    common.add_arguments(p, workdir_help="training workdir of the flow model (configs/digits_flow.py)")
    p.add_argument("--vp", help="training workdir of the VP model it is matched with "
                                "(configs/digits.py): the nfe and backbone tables")
    p.add_argument("--dit", help="training workdir of a DiT model (configs/digits_dit.py): adds "
                                 "the UNet-against-DiT table")
    p.add_argument("--parts", default="nfe,guidance,backbone",
                   help="which tables: nfe, guidance, backbone, shapes (comma-separated; "
                        "shapes: a shapes model's colour-shape pairs, e.g. "
                        "configs/shapes_dit_flow.py's)")


def check_arguments(p, a) -> None:
    common.check_arguments(p, a)
    parts = set(a.parts.split(","))
    if not parts or parts - set(PARTS):
        p.error(f"--parts takes {', '.join(PARTS)}, got {a.parts!r}.")
    if parts & {"nfe", "backbone"} and not a.vp:
        p.error("the nfe and backbone tables compare with a VP model: pass --vp DIR "
                "(configs/digits.py's workdir), or --parts guidance / shapes.")
    for flag in ("vp", "dit"):
        d = getattr(a, flag)
        if d and not os.path.isdir(d):
            p.error(f"--{flag} {d}: no such directory (a training workdir).")


def steps_for(sampler: str, nfe: int) -> int:
    """The steps whose model calls come closest to nfe without passing it (Heun: 2N - 1)."""
    return (nfe + 1) // 2 if sampler == "heun" else nfe


def calls(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler == "heun" else steps


def nfe_table(models: dict, out: str, prompts, scorer, *, num_per_prompt, seed, batch_size,
              progress) -> list:
    """rows of (model, method, steps, nfe, fd, alignment, ...) for each model and sampler."""
    from t2i_jax.sampling.generate import SampleOptions
    table = []
    for name, trained in models.items():
        base = SampleOptions.from_config(trained.config.sample)
        flow = trained.config.diffusion.get("process", "vp") == "flow"
        for label, sampler, ode in NFE_SAMPLERS:
            if ode == "flow" and flow:
                continue  # the model's own variables: the row above
            for nfe in NFES:
                n = steps_for(sampler, nfe)
                options = dataclasses.replace(base, sampler=sampler, num_steps=n, eta=0.0,
                                              ode_variables=ode)
                x, rows, stats = common.sample_job(
                    trained, os.path.join(out, "samples", f"{name}_{sampler}{ode or ''}_{n}"),
                    prompts,
                    num_per_prompt=num_per_prompt, guidance=(GUIDANCE_W,), seed=seed,
                    options=options, batch_size=batch_size, progress=progress)
                table.append(dict(model=name, method=label, steps=n, target=nfe,
                                  nfe=calls(sampler, n),
                                  **score(scorer, x, rows), seconds=stats.get("seconds")))
    return table


def backbone_table(models: dict, out: str, prompts, scorer, *, num_per_prompt, seed,
                   batch_size, progress) -> list:
    """rows of (model, backbone, parameters, train images/s, quality at 50 steps, w = 3)."""
    import jax

    from t2i_jax.sampling.generate import SampleOptions
    from t2i_jax.training.writers import read_metrics
    table = []
    for name, trained in models.items():
        options = dataclasses.replace(SampleOptions.from_config(trained.config.sample),
                                      num_steps=50)
        x, rows, _ = common.sample_job(
            trained, os.path.join(out, "samples", f"{name}_backbone"), prompts,
            num_per_prompt=num_per_prompt, guidance=(GUIDANCE_W,), seed=seed, options=options,
            batch_size=batch_size, progress=progress)
        rates = [r["images_per_s"] for r in read_metrics(trained.workdir) if "images_per_s" in r]
        table.append(dict(model=name, backbone=trained.config.model.get("backbone", "unet"),
                          process=trained.config.diffusion.get("process", "vp"),
                          sampler=options.sampler,
                          parameters=int(sum(np.size(p) for p in jax.tree_util.tree_leaves(
                              trained.params))),
                          train_images_per_s=float(np.median(rates)) if rates else None,
                          **score(scorer, x, rows)))
    return table


def shapes_table(trained, out: str, scorer, *, num_per_prompt, seed, batch_size,
                 progress) -> list:
    """One row per colour-shape pair, "a large COLOUR SHAPE" (12 seen in training, 3 held out):
    the fraction of images the shapes evaluator reads as exactly that colour and shape (sizes
    ignored), and as that colour, and as that shape, among the objects it finds."""
    from t2i_jax.data import shapes
    from t2i_jax.sampling.generate import SampleOptions
    prompts = [f"a large {c} {s}" for c in shapes.COLOURS for s in shapes.SHAPES]
    options = dataclasses.replace(SampleOptions.from_config(trained.config.sample), num_steps=50)
    x, rows, _ = common.sample_job(trained, os.path.join(out, "samples", "shapes_pairs"), prompts,
                                   num_per_prompt=num_per_prompt, guidance=(GUIDANCE_W,),
                                   seed=seed, options=options, batch_size=batch_size,
                                   progress=progress)
    pred = scorer.ev.predict(x)                                   # bool [N, 30]
    table = []
    for p in prompts:
        colour, shape = p.split()[2:4]
        c, s = shapes.COLOURS.index(colour), shapes.SHAPES.index(shape)
        sel = [i for i, r in enumerate(rows) if r["prompt"] == p]
        found = [{(int(j) // 6, int(j) // 2 % 3) for j in np.flatnonzero(pred[i])} for i in sel]
        table.append(dict(prompt=p, held_out=shapes.is_held_out(c, s), n=len(sel),
                          pair=float(np.mean([f == {(c, s)} for f in found])),
                          colour=float(np.mean([{k[0] for k in f} == {c} for f in found])),
                          shape=float(np.mean([{k[1] for k in f} == {s} for f in found]))))
    return table


def shapes_markdown(table) -> str:
    md = (f"\nShapes, one object a prompt (Euler 50 steps, w = {GUIDANCE_W:g}): read as exactly "
          "its colour and shape:\n\n")
    md += common.markdown_table(["pairs", "colour + shape", "colour", "shape"], [
        [name] + [float(np.mean([r[k] for r in table if r["held_out"] == held]))
                  for k in ("pair", "colour", "shape")]
        for name, held in (("seen (12)", False), ("held out (3)", True))])
    md += "\n" + common.markdown_table(["prompt", "held out", "colour + shape", "colour", "shape"],
                                       [[r["prompt"], r["held_out"], r["pair"], r["colour"],
                                         r["shape"]] for r in table])
    return md


def reproduce_flow(flow_trained, vp_trained, out: str, *, dit_trained=None, num_per_prompt: int,
                   seed: int, batch_size: int, parts=("nfe", "guidance", "backbone"),
                   progress=True, cache_dir: Optional[str] = None) -> dict:
    cfg = flow_trained.config
    prompts = common.default_prompts(cfg)
    scorer = Scorer(cfg, cache_dir or evaluator_cache(flow_trained.workdir, out, cfg.data))
    kw = dict(num_per_prompt=num_per_prompt, seed=seed, batch_size=batch_size, progress=progress)
    from t2i_jax import data as data_lib
    from t2i_jax import images
    n = len(prompts) * num_per_prompt
    real = data_lib.load_split(cfg.data, "train", limit=n)["image"]
    results = dict(experiment="flow", prompts=prompts, num_per_prompt=num_per_prompt, seed=seed,
                   evaluator_accuracy=scorer.ev.accuracy, real_floor=scorer.real_floor(n),
                   real_saturation=saturation(images.to_uint8(real)))
    md = ""
    if "nfe" in parts and vp_trained is not None:
        results["nfe"] = nfe_table({"vp": vp_trained, "flow": flow_trained}, out, prompts,
                                   scorer, **kw)
        md += nfe_markdown(results["nfe"])
    if "guidance" in parts:
        results["guidance"] = flow_guidance.guidance_table(flow_trained, out, prompts, scorer, **kw)
        md += flow_guidance.markdown(results["guidance"])
    if "shapes" in parts:
        results["shapes"] = shapes_table(flow_trained, out, scorer, **kw)
        md += shapes_markdown(results["shapes"])
    if "backbone" in parts and dit_trained is not None and vp_trained is not None:
        results["backbone"] = backbone_table({"unet": vp_trained, "dit": dit_trained}, out,
                                             prompts, scorer, **kw)
        md += backbone_markdown(results["backbone"])
    floor = results["real_floor"]
    md += (f"\nreal (train): {floor['repeats']} random subsets of n = {floor['n']} training "
           f"images: FD {common.fmt(floor['fd'])} (sd {common.fmt(floor['fd_sd'])}), precision "
           f"{common.fmt(floor['precision'])}, recall {common.fmt(floor['recall'])}, saturation "
           f"{common.fmt(results['real_saturation'])}\n")
    common.write_results(out, results, md)
    if "nfe" in results:
        _plot_nfe(results["nfe"], floor, os.path.join(out, "plot.png"))
    return results


def nfe_markdown(table) -> str:
    md = ""
    keys = sorted({(r["model"], r["method"]) for r in table},
                  key=lambda k: (k[0] != "vp", [m for m, _, _ in NFE_SAMPLERS].index(k[1])))
    for metric in ("fd", "alignment"):
        md += f"\n{metric} by model calls (NFE; Heun's 2N - 1: 5, 9, 19, 49), w = {GUIDANCE_W:g}:\n\n"
        rows = [[model, method] + [next((r[metric] for r in table if r["model"] == model and
                                         r["method"] == method and r["target"] == n), None)
                                   for n in NFES] for model, method in keys]
        md += common.markdown_table(["model", "method"] + [f"NFE {n}" for n in NFES], rows)
    return md


def backbone_markdown(table) -> str:
    keys = ["parameters", "train_images_per_s", "fd", "alignment", "precision", "recall"]
    return ("\nUNet against DiT (50 steps, w = 3):\n\n"
            + common.markdown_table(["model", "backbone", "process"] + keys,
                                    [[r["model"], r["backbone"], r["process"]]
                                     + [r[k] for k in keys] for r in table]))


def _plot_nfe(table, floor, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for model, style in (("vp", "--"), ("flow", "-")):
        for method, _, _ in NFE_SAMPLERS:
            rs = [r for r in table if r["model"] == model and r["method"] == method]
            if not rs:
                continue
            a.plot([r["nfe"] for r in rs], [r["fd"] for r in rs], "o" + style,
                   label=f"{model}: {method}")
            b.plot([r["nfe"] for r in rs], [r["alignment"] for r in rs], "o" + style,
                   label=f"{model}: {method}")
    a.axhline(floor["fd"], ls=":", c="gray", label="real data (same n)")
    for ax, name in ((a, "FD (classifier features)"), (b, "alignment")):
        ax.set_xscale("log")
        ax.set_xlabel("model calls (NFE)")
        ax.set_ylabel(name)
    a.set_yscale("log")
    a.legend(fontsize=7)
    fig.tight_layout()
    common.save_fig(fig, path)


def run(a) -> int:
    def reproduce(a):
        from t2i_jax.sampling.load import load_trained, require_generator
        load = lambda d: require_generator(load_trained(d))  # noqa: E731
        flow_trained = load(a.workdir)
        if flow_trained.config.diffusion.get("process", "vp") != "flow":
            raise ValueError(f"--workdir {a.workdir} is not a flow-matching model "
                             "(diffusion.process='flow'): pass configs/digits_flow.py's workdir.")
        reproduce_flow(flow_trained, load(a.vp) if a.vp else None, a.out,
                       dit_trained=load(a.dit) if a.dit else None,
                       num_per_prompt=a.num_per_prompt, seed=a.seed, batch_size=a.batch_size,
                       parts=tuple(a.parts.split(",")), progress=not a.no_progress)
    return common.run_locked(a, reproduce)
