"""`reproduce flow`'s guidance table: CFG and the methods after it on one model, over their
parameters, each row one sampling job (a sweep over a method's values shares one program):

  CFG       w in CFG_WEIGHTS (Ho & Salimans 2022)
  rescale   phi in RESCALE_PHIS at w = HIGH_W (Lin et al. 2023, sec. 3.4: rescaling the guided
            prediction's std to the conditional one's fixes overexposure at high w)
  interval  [lo, hi] of the chain's time at w = HIGH_W (Kynkaanniemi et al. 2024: guidance in the
            middle of the chain keeps diversity that guidance near noise removes)
  APG       eta in APG_ETAS, and a norm threshold and momentum, at w = HIGH_W (Sadat et al.
            2024: dropping the update's part parallel to x0(y) removes oversaturation)

Columns: alignment, FD, precision, recall and saturation (cascade.saturation: the fraction of
pixel values clipped at the top, 255; the black background makes values at 0 say nothing), with
the real data's saturation beside them.
"""

from __future__ import annotations

import dataclasses
import os

from t2i_jax.evaluation.reproduce import common
from t2i_jax.evaluation.reproduce.cascade import saturation

CFG_WEIGHTS = (0.0, 3.0, 10.0)
HIGH_W = 10.0
RESCALE_PHIS = (0.7, 1.0)
INTERVALS = ((0.2, 0.8), (0.0, 0.5))
# (eta, norm threshold r, momentum beta)
APG_SETTINGS = ((0.0, 0.0, 0.0), (0.0, 2.5, -0.5))
KEYS = ["alignment", "fd", "precision", "recall", "saturation"]


def score(scorer, x, rows) -> dict:
    """The scorer's metrics of uint8 images x with their records, and their saturation."""
    return dict(**scorer.score(x, [r["prompt"] for r in rows]), saturation=saturation(x))


def settings():
    """(method, value label, w, guidance Rule or None) of every row."""
    from t2i_jax.diffusion import cfg
    rows = [("CFG", f"w={w:g}", w, None) for w in CFG_WEIGHTS]
    rows += [("rescale", f"phi={phi:g}", HIGH_W, cfg.Rule(rescale=phi)) for phi in RESCALE_PHIS]
    rows += [("interval", f"[{lo:g}, {hi:g}]", HIGH_W, cfg.Rule(interval=(lo, hi)))
             for lo, hi in INTERVALS]
    rows += [("APG", f"eta={e:g} r={r:g} beta={b:g}", HIGH_W, cfg.Rule(apg=cfg.APG(e, r, b)))
             for e, r, b in APG_SETTINGS]
    return rows


def guidance_table(trained, out: str, prompts, scorer, *, num_per_prompt, seed, batch_size,
                   progress) -> list:
    from t2i_jax.sampling.generate import SampleOptions
    options = dataclasses.replace(SampleOptions.from_config(trained.config.sample), num_steps=50)
    table = []
    for i, (method, label, w, rule) in enumerate(settings()):
        x, rows, stats = common.sample_job(
            trained, os.path.join(out, "samples", f"guidance_{i:02d}"), prompts,
            num_per_prompt=num_per_prompt, guidance=(w,), seed=seed, options=options,
            batch_size=batch_size, progress=progress, guidance_rule=rule)
        table.append(dict(method=method, setting=label, w=w, sampler=options.sampler,
                          **score(scorer, x, rows), compilations=stats.get("compilations")))
    return table


def markdown(table) -> str:
    return (f"\nGuidance after CFG on the flow model (Euler 50 steps; the methods at w = "
            f"{HIGH_W:g}):\n\n"
            + common.markdown_table(["method", "setting"] + KEYS,
                                    [[r["method"], r["setting"]] + [r[k] for k in KEYS]
                                     for r in table]))
