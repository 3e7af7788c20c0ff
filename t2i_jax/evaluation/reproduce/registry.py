"""The reproductions by name: EXPERIMENTS = {name: module}, in the order `--help` lists them.
Each module has SUMMARY (its line in --help), add_arguments(p), check_arguments(p, a) and
run(a) -> exit code."""

from __future__ import annotations

from t2i_jax.evaluation.reproduce import (cascade, cfg, checkpoints, classifier, ddim, flow,
                                          iddpm, inpaint, latent, sdg, unclip)

EXPERIMENTS = {
    "cfg": cfg,
    "ddim": ddim,
    "checkpoints": checkpoints,
    "classifier": classifier,
    "sdg": sdg,
    "cascade": cascade,
    "latent": latent,
    "unclip": unclip,
    "iddpm": iddpm,
    "inpaint": inpaint,
    "flow": flow,
}
