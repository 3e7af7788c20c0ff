"""How good a trained guide is, on a held-out split: a noisy classifier's accuracy, a CLIP's
zero-shot accuracy, each on clean images and by quarter of t.

    python -m t2i_jax.evaluation.guides --workdir runs/digits_classifier
    python -m t2i_jax.evaluation.guides --workdir runs/digits_clip
    python -m t2i_jax.evaluation.guides --workdir runs/digits_clip --job out/samples   # CLIP score

Noisy images: each test image is noised to x_t = q_sample(x0, t, noise) at a t drawn uniformly
in each quarter of [0, T) (fixed keys: the numbers are reproducible). Clean: x0 itself, t = 0.
A CLIP's zero-shot classifier is the text embedding of each class's captions, averaged over the
data set's phrasings of it ("7", "seven", "a handwritten digit seven", "数字七", ...: CLIP's
prompt ensembling), and each phrasing alone. A CLIP of `shapes` (no classes) is scored by
attribute retrieval instead: for each shape of each image, its full caption with that shape's
colour (shape) set to each of the 5 colours (3 shapes) in turn; the accuracy is the fraction of
these candidate sets in which the true caption is the closest (chance 0.2 and 0.33). Writes
WORKDIR/eval/guide.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax import files
from t2i_jax.diffusion import forward

CHUNK = 256


def _noisy_sets(family, x0: np.ndarray, seed: int):
    """[(name, x_t [N, ...], t [N])]: clean, then one set per quarter of [0, T)."""
    T = family.schedule.num_timesteps
    n = x0.shape[0]
    out = [("clean (t = 0)", jnp.asarray(x0), jnp.zeros((n,), jnp.int32))]
    key = jax.random.fold_in(jax.random.key(seed), 5)
    for q in range(4):
        kq = jax.random.fold_in(key, q)
        t = jax.random.randint(jax.random.fold_in(kq, 0), (n,), q * T // 4, (q + 1) * T // 4)
        noise = jax.random.normal(jax.random.fold_in(kq, 1), x0.shape)
        out.append((f"t in [{q * T // 4}, {(q + 1) * T // 4})",
                    forward.q_sample(family.schedule, jnp.asarray(x0), t, noise), t))
    return out


def _chunked(fn, x, t) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i:i + CHUNK], t[i:i + CHUNK]))
                           for i in range(0, x.shape[0], CHUNK)])


def classifier_accuracy(family, params, split: dict, seed: int = 0) -> list:
    """[{set, accuracy}] of a noisy classifier on the split's images and labels."""
    logits = jax.jit(lambda x, t: family.logits(params, x, t))
    rows = []
    for name, x_t, t in _noisy_sets(family, split["image"], seed):
        pred = _chunked(lambda a, b: jnp.argmax(logits(a, b), -1), x_t, t)
        rows.append(dict(set=name, accuracy=float(np.mean(pred == split["label"]))))
    return rows


def class_phrasings(split: dict, num_classes: int) -> list:
    """Per class, the distinct captions the split gives its images, in the data set's order."""
    out = [[] for _ in range(num_classes)]
    for label, caps in zip(split["label"], split["captions"]):
        for c in caps:
            if c not in out[int(label)]:
                out[int(label)].append(c)
    missing = [k for k, p in enumerate(out) if not p]
    if missing:
        raise ValueError(f"classes {missing} have no image in the split: zero-shot accuracy needs "
                         "every class.")
    return out


def clip_zero_shot(family, params, split: dict, class_names, seed: int = 0) -> list:
    """[{set, accuracy (ensemble of phrasings), accuracy per phrasing}] of a CLIP."""
    from t2i_jax.conditioning import tokenizers
    phrasings = class_phrasings(split, len(class_names))
    n_phr = min(len(p) for p in phrasings)

    def text_embeddings(prompts):
        toks = tokenizers.tokenize(prompts, family.max_length, warn=False)
        return family.embed_text(params, jnp.asarray(toks.ids), jnp.asarray(toks.mask))

    per_phrasing = [text_embeddings([p[j] for p in phrasings]) for j in range(n_phr)]  # [K, E]
    ensemble = jnp.mean(jnp.stack(per_phrasing), 0)
    ensemble = ensemble / jnp.linalg.norm(ensemble, axis=-1, keepdims=True)
    embed = jax.jit(lambda x, t: family.embed_image(params, x, t))
    rows = []
    for name, x_t, t in _noisy_sets(family, split["image"], seed):
        z = jnp.asarray(_chunked(embed, x_t, t))                                   # [N, E]
        acc = lambda e: float(np.mean(np.argmax(np.asarray(z @ e.T), -1) == split["label"]))  # noqa: E731
        rows.append(dict(set=name, accuracy=acc(ensemble),
                         by_phrasing={phrasings[0][j]: acc(e) for j, e in enumerate(per_phrasing)}))
    return rows


RETRIEVED = ("colour", "shape")  # shapes' attributes whose retrieval accuracy is reported


def attribute_candidates(split: dict) -> dict:
    """For shapes: {attribute: (image index [G], candidate captions [G][V], true value [G])}, one
    group per shape of each image, the candidates being the image's full caption with that
    shape's attribute set to each of its V values."""
    from t2i_jax.data import shapes
    values = dict(colour=shapes.COLOURS, shape=shapes.SHAPES)
    out = {a: ([], [], []) for a in RETRIEVED}
    for i in range(len(split["num_shapes"])):
        attrs = dict(num_shapes=int(split["num_shapes"][i]), relation=int(split["relation"][i]),
                     **{k: [int(v) for v in split[k][i]] for k in ("colour", "shape", "size")})
        for k in range(attrs["num_shapes"]):
            for a in RETRIEVED:
                caps = []
                for v in range(len(values[a])):
                    changed = dict(attrs, **{a: list(attrs[a])})
                    changed[a][k] = v
                    caps.append(shapes.captions(changed)[0])
                out[a][0].append(i)
                out[a][1].append(caps)
                out[a][2].append(attrs[a][k])
    return {a: (np.asarray(i), c, np.asarray(v)) for a, (i, c, v) in out.items()}


def clip_attribute_retrieval(family, params, split: dict, seed: int = 0) -> list:
    """[{set, accuracy (mean of the attributes'), colour_accuracy, shape_accuracy}] of a shapes
    CLIP, clean and by quarter of t (attribute_candidates)."""
    from t2i_jax.conditioning import tokenizers
    groups = attribute_candidates(split)
    unique = sorted({c for _, caps, _ in groups.values() for cs in caps for c in cs})
    where = {c: j for j, c in enumerate(unique)}
    toks = tokenizers.tokenize(unique, family.max_length, warn=False)
    z_txt = np.concatenate([np.asarray(family.embed_text(params, jnp.asarray(toks.ids[i:i + CHUNK]),
                                                         jnp.asarray(toks.mask[i:i + CHUNK])))
                            for i in range(0, len(unique), CHUNK)])             # [U, E]
    embed = jax.jit(lambda x, t: family.embed_image(params, x, t))
    rows = []
    for name, x_t, t in _noisy_sets(family, split["image"], seed):
        sims = _chunked(embed, x_t, t) @ z_txt.T                                   # [N, U]
        row = dict(set=name)
        for a, (image, caps, true) in groups.items():
            cand = np.asarray([[where[c] for c in cs] for cs in caps])             # [G, V]
            pick = np.argmax(np.take_along_axis(sims[image], cand, axis=1), axis=1)
            row[f"{a}_accuracy"] = float(np.mean(pick == true))
        row["accuracy"] = float(np.mean([row[f"{a}_accuracy"] for a in RETRIEVED]))
        rows.append(row)
    return rows


def clip_scores(clip, x_uint8: np.ndarray, prompts) -> np.ndarray:
    """cos(E_img(x0, 0), E_text(prompt)) [N] of uint8 images [N, H, W, C] and their prompts, from
    a CLIP's clean towers (Trained); NaN where the prompt is empty."""
    from t2i_jax.sampling import guides as guides_lib
    rows = guides_lib.text_rows(clip, prompts)
    score = guides_lib.clip_score_fn(clip.family)
    x = x_uint8.astype(np.float32) / 127.5 - 1.0
    return np.concatenate([np.asarray(score(clip.params, x[i:i + CHUNK],
                                            {k: v[i:i + CHUNK] for k, v in rows.items()}))
                           for i in range(0, len(x), CHUNK)])


def clip_score(clip_workdir: str, job_dir: str) -> dict:
    """The CLIP score of a finished sampling job: the mean cos(E_img(x0, 0), E_text(prompt)) of
    its images (clean towers of the in-project CLIP), over the images whose prompt is not empty."""
    from t2i_jax.sampling import outdir as out_lib
    from t2i_jax.sampling.load import load_trained
    clip = load_trained(clip_workdir)
    if clip.family.guide_flag != "--clip":
        raise ValueError(f"{clip_workdir} holds a {clip.family.name} model; the CLIP score needs "
                         "a contrastive workdir.")
    x, rows = out_lib.load_images(job_dir)
    s = clip_scores(clip, x, [r["prompt"] for r in rows])
    s = s[np.isfinite(s)]
    return dict(job=os.path.abspath(job_dir), clip=os.path.abspath(clip_workdir),
                clip_step=clip.step, n=int(s.size), clip_score=float(s.mean()) if s.size else None)


def evaluate(workdir: str, split: str = "test", seed: int = 0, out: Optional[str] = None) -> dict:
    from t2i_jax import data as data_lib
    from t2i_jax.sampling.load import load_trained
    trained = load_trained(workdir)
    family = trained.family
    if family.guide_flag is None:
        raise ValueError(f"{workdir} holds a {family.name} model; this evaluates guides (a "
                         "noisy_classifier or contrastive workdir).")
    data = data_lib.load_split(family.config.data, split)
    names = family.conditioning.class_names or data_lib.class_names(family.config.data)
    if family.guide_flag == "--classifier":
        rows = classifier_accuracy(family, trained.params, data, seed)
    elif names is None and family.config.data.name == "shapes":
        rows = clip_attribute_retrieval(family, trained.params, data, seed)
    elif names is None:
        raise ValueError(f"{workdir}: the data set {family.config.data.name!r} has neither class "
                         "names (zero-shot accuracy) nor shapes' attributes (retrieval accuracy); "
                         "there is no accuracy to report.")
    else:
        rows = clip_zero_shot(family, trained.params, data, names, seed)
    result = dict(workdir=os.path.abspath(workdir), family=family.name, step=trained.step,
                  split=split, num_images=int(data["image"].shape[0]), seed=seed, rows=rows)
    path = out or os.path.join(workdir, "eval", "guide.json")
    files.write_json(path, result)
    return result


def table(result: dict) -> str:
    if "colour_accuracy" in result["rows"][0]:
        cols = [f"{a}_accuracy" for a in RETRIEVED]
        head = [f"{a} retrieval" for a in RETRIEVED]
    else:
        cols = ["accuracy"]
        head = ["accuracy" if result["family"] == "noisy_classifier" else "zero-shot accuracy"]
    lines = ["| images | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += ["| " + " | ".join([r["set"]] + [f"{r[c]:.3f}" for c in cols]) + " |"
              for r in result["rows"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    from t2i_jax.errors import ArgumentParser
    p = ArgumentParser(prog="python -m t2i_jax.evaluation.guides", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a noisy_classifier or contrastive run")
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="the JSON file (default WORKDIR/eval/guide.json)")
    p.add_argument("--job", action="append", default=[], metavar="OUTDIR",
                   help="print the CLIP score of this finished sample.py job instead (repeatable; "
                        "--workdir is then the CLIP)")
    a = p.parse_args(argv)
    if a.seed < 0:
        p.error(f"--seed must be >= 0, got {a.seed}.")
    if a.job:
        for job in a.job:
            r = clip_score(a.workdir, job)
            print(f"{job}: CLIP score {r['clip_score']:.4f} over {r['n']} images")
        return 0
    result = evaluate(a.workdir, a.split, a.seed, a.out)
    print(f"{result['family']} {a.workdir} step {result['step']}, {result['num_images']} "
          f"{a.split} images:\n" + table(result))
    print(json.dumps(result["rows"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    from t2i_jax.errors import Boundary
    Boundary("guides").exit(main, sys.argv[1:])
