"""`reproduce sdg`: Liu et al. (2023), Semantic Diffusion Guidance with the CLIP trained here:
text guidance over its scale (alignment, FD, precision, recall, CLIP score); image guidance over
its scale, with an empty prompt, from one real test image of each class (read as the
reference's class, and the mean pixel distance to the reference against the data's
nearest-neighbour distance: not copies); text and image together (prompt d, a reference of d);
and CLIP reranking at w = 0 over the number of candidates N.

    python -m t2i_jax.evaluation.reproduce sdg --workdir runs/digits_uncond --clip runs/digits_clip

Each row is its own sampling job under OUT/samples/ (resumable); the jobs of a sweep differ only
in their scales, which are arguments of the one compiled sampling program (results.json records
how many programs the sweep compiled: 1 per shape of call).
"""

from __future__ import annotations

import os

import numpy as np

from t2i_jax import images
from t2i_jax.evaluation.reproduce import common
from t2i_jax.evaluation.scorer import Scorer, evaluator_cache

SDG_TEXT_SCALES = (0.0, 10.0, 30.0, 100.0)
SDG_IMAGE_SCALES = (0.0, 30.0, 100.0, 300.0)
RERANK_N = (1, 2, 4)

# its line in reproduce --help
SUMMARY = "Liu et al. (2023): SDG text, image and text + image guidance; CLIP reranking over N"


def add_arguments(p) -> None:
    common.add_arguments(p, steps="sampling steps (config's sampler)")
    p.add_argument("--clip", help="the contrastive (CLIP) workdir that guides")


def check_arguments(p, a) -> None:
    common.check_arguments(p, a)
    common.require(p, a, "clip", "sdg", "guide")


def references(cfg, out: str) -> list:
    """[(class name, PNG path)]: the first test-split image of each class, written to
    OUT/references/ (SDG's image guidance reads a real image the model never trained on)."""
    from t2i_jax import data as data_lib
    names = data_lib.class_names(cfg.data)
    if names is None:
        raise ValueError(f"reproduce sdg's image rows pick one reference per class; the data set "
                         f"{cfg.data.name!r} has no classes (use digits).")
    split = data_lib.load_split(cfg.data, "test")
    refs = []
    for k, name in enumerate(names):
        where = np.flatnonzero(split["label"] == k)
        if not where.size:
            raise ValueError(f"the test split of {cfg.data.name!r} has no image of class {name!r}.")
        path = os.path.join(out, "references", f"{k}.png")
        if not os.path.exists(path):
            images.save_png(path, images.to_uint8(split["image"][where[0]]))
        refs.append((name, path))
    return refs


def mean_nn_distance(cfg) -> float:
    """The data's mean nearest-neighbour distance: per test image, the RMS pixel distance (in
    [-1, 1]) to its nearest training image, averaged. A sample closer than this to its reference
    is nearer to it than real images are to each other: a copy."""
    from t2i_jax import data as data_lib
    test = data_lib.load_split(cfg.data, "test")["image"]
    test = test.reshape(len(test), -1)
    train = data_lib.load_split(cfg.data, "train")["image"].reshape(-1, test.shape[1])
    d = []
    for i in range(0, len(test), 128):
        d2 = ((test[i:i + 128, None] - train[None]) ** 2).mean(-1)
        d.append(np.sqrt(d2.min(1)))
    return float(np.concatenate(d).mean())


def _rms_to(x_uint8, ref_path) -> float:
    x = x_uint8.astype(np.float32) / 127.5 - 1.0
    r = images.load_png(ref_path).astype(np.float32) / 127.5 - 1.0
    return float(np.sqrt(((x.reshape(len(x), -1) - r.reshape(1, -1)) ** 2).mean(-1)).mean())


def reproduce_sdg(trained, clip_dir: str, out: str, *, num_per_prompt: int, seed: int,
                  batch_size: int, steps: int, text_scales=SDG_TEXT_SCALES,
                  image_scales=SDG_IMAGE_SCALES, rerank_n=RERANK_N, progress=True, scorer=None,
                  cache_dir=None) -> dict:
    from t2i_jax.evaluation.guides import clip_scores
    from t2i_jax.sampling import guides as guides_lib
    cfg = trained.config
    clip = guides_lib.load_guide_model(clip_dir, "--clip", trained)
    prompts = common.default_prompts(cfg)
    options = common.config_options(cfg, steps)
    scorer = scorer or Scorer(cfg, cache_dir or evaluator_cache(trained.workdir, out, cfg.data))
    refs = references(cfg, out)
    nn = mean_nn_distance(cfg)
    text_default = guides_lib.default_scale(clip, "clip_text")
    image_default = guides_lib.default_scale(clip, "clip_image")
    job_kw = dict(num_per_prompt=num_per_prompt, seed=seed, options=options,
                  batch_size=batch_size, progress=progress)

    def score(x, prompts_of):
        r = scorer.score(x, prompts_of)
        cs = clip_scores(clip, x, prompts_of)
        r["clip_score"] = float(np.nanmean(cs)) if np.isfinite(cs).any() else None
        return r

    def guides_of(text_scale, image_scale=None, ref=None):
        g = [guides_lib.Guide("clip_text", clip, float(text_scale))]
        if image_scale is not None:
            g.append(guides_lib.Guide("clip_image", clip, float(image_scale), ref,
                                      guides_lib.load_reference(ref, trained)))
        return g

    text_rows, programs = [], dict(text=0, image=0, text_and_image=0, rerank=0)
    for s in text_scales:
        x, rows, compiled = common.unguided_job(trained, out, f"text_{s:g}", prompts,
                                                guides=guides_of(s), **job_kw)
        programs["text"] += compiled
        text_rows.append(dict(scale=float(s), **score(x, [r["prompt"] for r in rows])))

    image_rows = []
    for s in image_scales:
        if s == 0:  # unguided, whatever the reference: one job of as many images, all distinct
            x, _, compiled = common.unguided_job(
                trained, out, "image_0", [""], guides=guides_of(0.0, 0.0, refs[0][1]),
                **dict(job_kw, num_per_prompt=num_per_prompt * len(refs)))
            programs["image"] += compiled
            runs = [(name, ref, x) for name, ref in refs]
        else:
            runs = []
            for name, ref in refs:
                x, _, compiled = common.unguided_job(
                    trained, out, f"image_{s:g}/ref_{name}", [""], guides=guides_of(0.0, s, ref),
                    **job_kw)
                programs["image"] += compiled
                runs.append((name, ref, x))
        reads = [float(np.nanmean(scorer.ev.aligned(x, [name] * len(x)))) for name, _, x in runs]
        dist = [_rms_to(x, ref) for _, ref, x in runs]
        pooled = runs[0][2] if s == 0 else np.concatenate([x for _, _, x in runs])
        r = scorer.score(pooled, [refs[i % len(refs)][0] for i in range(len(pooled))])  # FD, P, R
        image_rows.append(dict(scale=float(s), read_as_reference=float(np.mean(reads)),
                               read_by_class=reads, rms_to_reference=float(np.mean(dist)),
                               fd=r["fd"], precision=r["precision"], recall=r["recall"]))

    both_rows = []
    xs, names = [], []
    for name, ref in refs:
        x, _, compiled = common.unguided_job(
            trained, out, f"text+image/ref_{name}", [name],
            guides=guides_of(text_default, image_default, ref), **job_kw)
        programs["text_and_image"] += compiled
        xs.append(x)
        names += [name] * len(x)
    both_rows.append(dict(text_scale=text_default, image_scale=image_default,
                          **score(np.concatenate(xs), names)))

    rerank_rows = []
    for n in rerank_n:
        x, rows, compiled = common.unguided_job(trained, out, f"rerank_{n}", prompts, rerank=n,
                                                reranker=clip if n > 1 else None, **job_kw)
        programs["rerank"] += compiled
        rerank_rows.append(dict(candidates=int(n), **score(x, [r["prompt"] for r in rows])))

    floor = scorer.real_floor(len(prompts) * num_per_prompt)
    results = dict(experiment="sdg", checkpoint_step=trained.step,
                   clip=dict(workdir=clip.workdir, step=clip.step), sampler=options.sampler,
                   steps=steps, seed=seed, prompts=prompts, num_per_prompt=num_per_prompt,
                   default_scales=dict(clip_text=text_default, clip_image=image_default),
                   references=[dict(name=n, path=p) for n, p in refs],
                   data_mean_nn_distance=nn, evaluator_accuracy=scorer.ev.accuracy,
                   compilations=programs, text=text_rows, image=image_rows,
                   text_and_image=both_rows, rerank=rerank_rows, real_floor=floor)
    keys = ["alignment", "clip_score", "fd", "precision", "recall"]
    tag = lambda s, d: f"{s:g}" + (" (default)" if s == d else "")  # noqa: E731
    md = "text guidance, f = cos(E_img(x_t, t), E_text(prompt)):\n\n" + common.markdown_table(
        ["text scale"] + keys, [[tag(r["scale"], text_default)] + [r[k] for k in keys]
                                for r in text_rows]
        + [["real (train)"] + [floor.get(k) for k in keys]])
    md += ("\nimage guidance, f = cos(E_img(x_t, t), E_img(x'_t, t)), empty prompt, one test "
           "image per class as x':\n\n" + common.markdown_table(
               ["image scale", "read as the reference's class", "RMS to reference", "fd",
                "precision", "recall"],
               [[tag(r["scale"], image_default), r["read_as_reference"], r["rms_to_reference"],
                 r["fd"], r["precision"], r["recall"]] for r in image_rows]))
    md += (f"\ndata mean nearest-neighbour RMS distance (test -> train): {common.fmt(nn)}: "
           "samples farther than this from their reference are not copies of it.\n")
    md += "\ntext + image (prompt d, reference of d), default scales:\n\n" + common.markdown_table(
        ["text scale", "image scale"] + keys,
        [[f"{r['text_scale']:g}", f"{r['image_scale']:g}"] + [r[k] for k in keys]
         for r in both_rows])
    md += ("\nCLIP reranking at w = 0 (best of N candidates by clean CLIP score):\n\n"
           + common.markdown_table(["N"] + keys, [[r["candidates"]] + [r[k] for k in keys]
                                                  for r in rerank_rows]))
    md += (f"\nunconditional model {trained.workdir} step {trained.step}, CLIP {clip.workdir} step "
           f"{clip.step}; {options.sampler} {steps} steps, {num_per_prompt} images per prompt or "
           f"reference; sampling programs this invocation compiled, per sweep: {programs} (0: "
           "reused from an earlier sweep, or every job was already done).\n")
    common.write_results(out, results, md)
    _plot_sdg(text_rows, image_rows, rerank_rows, nn, os.path.join(out, "plot.png"))
    return results


def _plot_sdg(text_rows, image_rows, rerank_rows, nn, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    sym = lambda v: [max(s, 1.0) for s in v]  # noqa: E731  scale 0 drawn at 1 on the log axis
    a.plot(sym([r["scale"] for r in text_rows]), [r["alignment"] for r in text_rows], "o-",
           label="alignment")
    a.plot(sym([r["scale"] for r in text_rows]), [r["recall"] for r in text_rows], "s-",
           label="recall")
    a.set_xscale("log")
    a.set_xlabel("text scale (0 drawn at 1)")
    a.set_title("SDG text guidance")
    a.set_ylim(0, 1.02)
    a.legend()
    s = sym([r["scale"] for r in image_rows])
    b.plot(s, [r["read_as_reference"] for r in image_rows], "o-", label="read as reference's class")
    b.set_xscale("log")
    b.set_ylim(0, 1.02)
    b.set_xlabel("image scale (0 drawn at 1), empty prompt")
    b2 = b.twinx()
    b2.plot(s, [r["rms_to_reference"] for r in image_rows], "s--", c="C3", label="RMS to reference")
    b2.axhline(nn, ls=":", c="gray", label="data NN distance")
    b2.set_ylabel("RMS pixel distance")
    b.set_title("SDG image guidance")
    b.legend(loc="upper left", fontsize=8)
    b2.legend(loc="lower right", fontsize=8)
    n = [r["candidates"] for r in rerank_rows]
    c.plot(n, [r["alignment"] for r in rerank_rows], "o-", label="alignment")
    c.plot(n, [r["clip_score"] for r in rerank_rows], "s-", label="CLIP score")
    c.set_xscale("log", base=2)
    c.set_xlabel("candidates N (w = 0)")
    c.set_title("CLIP reranking")
    c.legend()
    fig.tight_layout()
    common.save_fig(fig, path)


def run(a) -> int:
    def reproduce(a):
        from t2i_jax.sampling.load import load_trained, require_generator
        reproduce_sdg(require_generator(load_trained(a.workdir)), a.clip, a.out,
                      num_per_prompt=a.num_per_prompt, seed=a.seed, batch_size=a.batch_size,
                      steps=a.steps, progress=not a.no_progress)
    return common.run_locked(a, reproduce)
