"""Scores generated images with the evaluator classifier of an embedded data set, and where a
workdir's evaluator is cached. Shared by the reproductions (evaluation/reproduce/) and by
`python -m t2i_jax.evaluation.reconstruct`, which import it; it imports neither.

FD is the Fréchet distance of the evaluator classifier's 128-d penultimate features
(t2i_jax/evaluation/evaluator.py) between the generated images and the data set's held-out
real images; precision/recall (k = 3) use the same features.
"""

from __future__ import annotations

import os

import numpy as np

from t2i_jax import files


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


def attribute_rates(ev, images, prompts) -> dict:
    """Of the objects the prompts name: the fraction whose colour (shape) the evaluator finds on
    an object of the image, and whose colour-shape pair it finds."""
    from t2i_jax.evaluation import evaluator as ev_lib
    pred = ev.predict(images)
    colour = shape = pair = total = 0
    for i, p in enumerate(prompts):
        target = ev_lib.shape_objects(p)
        if not target:
            continue
        got = {(int(j) // 6, int(j) // 2 % 3) for j in np.flatnonzero(pred[i])}
        for c, s, _ in target:
            total += 1
            colour += any(g[0] == c for g in got)
            shape += any(g[1] == s for g in got)
            pair += (c, s) in got
    return dict(colour_rate=colour / total, shape_rate=shape / total,
                pair_rate=pair / total) if total else {}
