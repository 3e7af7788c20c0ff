"""`reproduce unclip`: DALL-E 2's claims (Ramesh et al. 2022) on the embedded data sets.

    python -m t2i_jax.evaluation.reproduce unclip --workdir runs/digits_decoder \
        --prior runs/digits_prior

  1. prior        the cosine of the prior's sampled z_i to the true CLIP image embeddings of the
                  test images with that caption, beside the caption's text embedding's own
                  cosine to them, a random (other) caption's sampled z_i, and the true
                  embeddings' cosine to each other (the ceiling);
  2. conditioning the decoder on the prior's z_i, on the text embedding in z_i's place, and on the
                  text alone (the null embedding): alignment, FD, colour and shape rates (shapes,
                  held-out pairs apart) (sec. 5.1 / fig. 7's comparison);
  3. candidates   the prior's K = 1, 2, 4 candidates per caption against alignment and the kept
                  z_i's cosine to the text embedding and to the true image embeddings;
  4. guidance     the prior's and the decoder's guidance weights, one swept at a time;
  5. variations   of real test images: the fraction read as the original's digit (colour and
                  shape), and pixel distances to the original and between variations, beside
                  the data set's nearest-neighbour distance;
  6. interpolations between test images of different captions: the fraction of rows whose
                  evaluator reading changes exactly once along the row; the grid.
Every sampling run is a resumable job under OUT/samples/.
"""

from __future__ import annotations

import os

import numpy as np

from t2i_jax import images
from t2i_jax.evaluation.reproduce import common
from t2i_jax.evaluation.reproduce.common import fmt, markdown_table
from t2i_jax.evaluation.scorer import Scorer, attribute_rates, evaluator_cache

PRIOR_WEIGHTS = (0.0, 1.0, 3.0)
DECODER_WEIGHTS = (0.0, 1.0, 2.0, 4.0)
CANDIDATES = (1, 2, 4)


# its line in reproduce --help
SUMMARY = "Ramesh et al. (2022): prior, decoder's conditioning, candidates, variations"


def add_arguments(p) -> None:
    common.add_arguments(p, workdir_help="the decoder's training workdir",
                         steps="the decoder's sampling steps")
    p.add_argument("--prior", help="the prior's training workdir")


def check_arguments(p, a) -> None:
    common.check_arguments(p, a)
    if not a.prior:
        p.error("reproduce unclip needs --prior DIR (the prior's workdir; --workdir is the "
                "decoder).")


def load_models(a):
    from t2i_jax.sampling import stages as stages_lib
    from t2i_jax.sampling.load import load_trained
    decoder, prior = load_trained(a.workdir), load_trained(a.prior)
    stages_lib.check_prior_decoder(prior, decoder, flag="--prior")
    return prior, decoder


def _matching(kind: str, prompt: str, labels, captions) -> np.ndarray:
    """bool [N]: the test images "with that caption": digits of the prompt's digit; shapes whose
    caption names the same colour-shape pairs."""
    from t2i_jax.evaluation import evaluator as ev_lib
    if kind == "digits":
        return np.asarray(labels) == ev_lib.target_of("digits", prompt)
    want = ev_lib.shape_pairs(prompt)
    return np.asarray([ev_lib.shape_pairs(c) == want for c in captions])


class Context:
    def __init__(self, prior, decoder, out, *, num_per_prompt, seed, batch_size, steps, progress):
        from t2i_jax import data as data_lib
        from t2i_jax.evaluation import evaluator as ev_lib
        self.prior, self.decoder, self.out = prior, decoder, out
        self.n, self.seed, self.batch, self.steps, self.progress = (
            num_per_prompt, seed, batch_size, steps, progress)
        cfg = decoder.config
        self.kind = ev_lib.kind_of(cfg.data)
        self.scorer = Scorer(cfg, evaluator_cache(decoder.workdir, out, cfg.data))
        self.prompts = common.default_prompts(cfg)
        split = data_lib.get_spec(cfg.data.name).splits[1]
        self.test = data_lib.load_split(cfg.data, split)
        self.test_z = decoder.family.embed_images(self.test["image"])            # [N, E]
        self.text_z = np.asarray(_text_embeddings(prior, self.prompts))         # [P, E]
        self.matches = [_matching(self.kind, p, self.test["label"], self.test["caption"])
                        for p in self.prompts]                                  # [P] x bool [N]

    def job(self, tag, *, k=None, w_prior=None, w_dec=None, source="prior"):
        """(uint8 images, records, the prior's embeddings or None) of one job over the prompts."""
        from t2i_jax.sampling import outdir as out_lib
        from t2i_jax.sampling import stages as stages_lib
        from t2i_jax.sampling.plan import Given
        dec, prior = self.decoder, self.prior
        job = dict(num_per_prompt=self.n, seed=self.seed, batch_size=self.batch,
                   progress=self.progress)
        d_opts = stages_lib.stage_options(dec, steps=self.steps)
        w_dec = float(dec.config.sample.guidance_weight) if w_dec is None else w_dec
        outdir = os.path.join(self.out, "samples", tag)
        if source == "prior":
            p_opts = stages_lib.stage_options(prior)
            w_prior = float(prior.config.sample.guidance_weight) if w_prior is None else w_prior
            k = prior.family.default_candidates() if k is None else k
            st = stages_lib.Stage(dec, d_opts, w_dec, None)
            x, rows, _ = common.sample_job(prior, outdir, self.prompts, guidance=(w_prior,),
                                           options=p_opts, stages=(st,), candidates=k, **job)
            z = out_lib.read_outputs(os.path.join(outdir, "stages", "0"), "embedding",
                                     np.arange(len(rows)))
            return x, rows, z
        e = dec.family.embed_dim
        z = (self.text_z if source == "text_embedding" else
             np.zeros((len(self.prompts), e), np.float32))
        x, rows, _ = common.sample_job(dec, outdir, self.prompts, guidance=(w_dec,),
                                       options=d_opts, given=Given(z, {"source": source}), **job)
        return x, rows, None

    def score(self, x, prompts) -> dict:
        """The scorer's FD and alignment of images x with their prompts (shapes: colour and
        shape rates too, seen and held-out pairs apart)."""
        from t2i_jax.evaluation import evaluator as ev_lib
        out = self.scorer.score(x, prompts)
        if self.kind == "shapes":
            held = np.array([ev_lib.is_held_out_prompt(p) for p in prompts])
            for tag, sel in (("seen", ~held), ("heldout", held)):
                if sel.any():
                    ps = [p for p, h in zip(prompts, sel) if h]
                    for k, v in attribute_rates(self.scorer.ev, x[sel], ps).items():
                        out[f"{k}_{tag}"] = v
        return out

    def cosines(self, z) -> dict:
        """z [P * n, E] in prompt order: the mean cosine of each to the true image embeddings
        of its caption's test images, and to its caption's text embedding."""
        z = z.reshape(len(self.prompts), self.n, -1)
        true, text = [], []
        for p, m in enumerate(self.matches):
            if m.any():
                true.append(float(np.mean(z[p] @ self.test_z[m].T)))
            text.append(float(np.mean(z[p] @ self.text_z[p])))
        return dict(cos_true=float(np.mean(true)) if true else None,
                    cos_text=float(np.mean(text)))


def _prompts(rows) -> list:
    return [r["prompt"] for r in rows]


def _text_embeddings(prior, prompts):
    return prior.family.caption_embedding(prior.family.conditioning.of_prompts(prompts))


def prior_section(ctx: Context, z) -> list:
    """Cosine similarities to the true image embeddings of each prompt's test images."""
    P, n = len(ctx.prompts), ctx.n
    z = z.reshape(P, n, -1)
    rows = {"sampled z_i (its caption)": [], "text embedding z_t (its caption)": [],
            "sampled z_i of another caption": [], "true z_i of other test images, same caption": [],
            "sampled z_i of the same caption, to each other": []}
    for p, m in enumerate(ctx.matches):
        if not m.any():
            continue
        true = ctx.test_z[m]
        rows["sampled z_i (its caption)"].append(np.mean(z[p] @ true.T))
        rows["text embedding z_t (its caption)"].append(np.mean(true @ ctx.text_z[p]))
        other = (p + 1) % P  # a random caption: the next prompt (a different one)
        rows["sampled z_i of another caption"].append(np.mean(z[other] @ true.T))
        for key, e in (("true z_i of other test images, same caption", true),
                       ("sampled z_i of the same caption, to each other", z[p])):
            g = e @ e.T
            rows[key].append((g.sum() - np.trace(g)) / max(g.size - len(g), 1))
    return [dict(embedding=k, cosine=float(np.mean(v)) if v else None, prompts=len(v))
            for k, v in rows.items()]


def variations_section(ctx: Context, num_images: int, per_image: int) -> dict:
    """Variations of the first test images: read as the original (its caption), and pixel
    distances (RMS in [0, 1] units) to the original, between variations, and the original's
    nearest training image (the data set's nearest-neighbour distance)."""
    from t2i_jax import data as data_lib
    from t2i_jax.sampling import stages as stages_lib
    from t2i_jax.sampling.plan import Given
    dec = ctx.decoder
    x0 = images.to_uint8(ctx.test["image"][:num_images])
    captions = list(ctx.test["caption"][:num_images])
    z = dec.family.embed_images(images.to_float(x0))
    opts = stages_lib.stage_options(dec, steps=ctx.steps, eta=1.0)
    outdir = os.path.join(ctx.out, "samples", "variations")
    x, _, _ = common.sample_job(
        dec, outdir, [""] * num_images, num_per_prompt=per_image,
        guidance=(float(dec.config.sample.guidance_weight),), seed=ctx.seed, options=opts,
        batch_size=ctx.batch, progress=ctx.progress,
        given=Given(z, {"source": "image", "rows": [{"test_index": i} for i in range(num_images)]}))
    x = x.reshape((num_images, per_image) + x.shape[1:])
    read = ctx.scorer.ev.aligned(x.reshape((-1,) + x.shape[2:]),
                                 [c for c in captions for _ in range(per_image)])
    f = lambda a: a.astype(np.float64).reshape(a.shape[0], -1) / 255.0  # noqa: E731
    rms = lambda a, b: np.sqrt(np.mean((a - b) ** 2, axis=-1))  # noqa: E731
    split = data_lib.get_spec(dec.config.data.name).splits[0]
    train = f(images.to_uint8(data_lib.load_split(dec.config.data, split)["image"]))
    to_orig, between, nn = [], [], []
    for i in range(num_images):
        o, v = f(x0[i:i + 1]), f(x[i])
        to_orig.extend(rms(v, o))
        between.extend(rms(v[a:a + 1], v[b:b + 1])[0] for a in range(per_image)
                       for b in range(a + 1, per_image))
        nn.append(float(np.min(rms(train, o))))
    grid_rows = []
    for i in range(min(8, num_images)):  # the original, then its variations
        grid_rows.extend([x0[i]] + list(x[i]))
    grid = os.path.join(ctx.out, "variations.png")
    images.save_png(grid, images.make_grid(
        np.stack(grid_rows), rows=min(8, num_images), scale=max(1, 64 // x.shape[2]),
        labels=[f"image {i}, then {per_image} variations" for i in range(min(8, num_images))]))
    return dict(num_images=num_images, per_image=per_image, read_as_original=float(np.nanmean(read)),
                rms_to_original=float(np.mean(to_orig)), rms_between=float(np.mean(between)),
                rms_nearest_training_image=float(np.mean(nn)), eta=1.0, outdir=outdir, grid=grid)


def interpolations_section(ctx: Context, num_pairs: int, frames: int) -> dict:
    """Slerps between pairs of test images with different captions, DDIM eta = 0, one noise a
    row: how often the evaluator's reading changes exactly once along the row."""
    from t2i_jax.evaluation import evaluator as ev_lib
    from t2i_jax.sampling import stages as stages_lib
    from t2i_jax.sampling import unclip
    from t2i_jax.sampling.plan import Given
    dec = ctx.decoder
    labels = np.asarray(ctx.test["label"])
    key = (labels if ctx.kind == "digits" else
           np.asarray([hash(ev_lib.shape_pairs(c)) for c in ctx.test["caption"]]))
    pairs, i = [], 0
    while len(pairs) < num_pairs and i + 1 < len(labels):
        j = i + 1
        while j < len(labels) and key[j] == key[i]:
            j += 1
        if j < len(labels):
            pairs.append((i, j))
        i = j + 1
    x_ends = images.to_uint8(ctx.test["image"][np.asarray(pairs).reshape(-1)])
    z = dec.family.embed_images(images.to_float(x_ends)).reshape(len(pairs), 2, -1)
    t = np.linspace(0.0, 1.0, frames)
    zs = np.stack([unclip.slerp(a, b, t) for a, b in z])
    opts = stages_lib.stage_options(dec, sampler="ddim", steps=ctx.steps, eta=0.0)
    outdir = os.path.join(ctx.out, "samples", "interpolations")
    rows = [{"a_test_index": a, "b_test_index": b} for a, b in pairs]
    x, _, _ = common.sample_job(
        dec, outdir, [""] * len(pairs), num_per_prompt=frames,
        guidance=(float(dec.config.sample.guidance_weight),), seed=ctx.seed, options=opts,
        batch_size=ctx.batch, progress=ctx.progress, shared_noise=True,
        given=Given(zs, {"source": "slerp", "rows": rows}, per_image=True))
    pred = ctx.scorer.ev.predict(x)
    if ctx.kind == "shapes":
        pred = [frozenset((int(j) // 6, int(j) // 2 % 3) for j in np.flatnonzero(r)) for r in pred]
    else:
        pred = [int(v) for v in pred]
    once = ends = 0
    changes = []
    for r in range(len(pairs)):
        row = pred[r * frames:(r + 1) * frames]
        c = sum(row[f] != row[f + 1] for f in range(frames - 1))
        changes.append(c)
        once += c == 1
        ends += row[0] != row[-1]
    # The grid: the two real ends around each row of frames.
    grid_rows = []
    for r, (a, b) in enumerate(pairs[:8]):
        grid_rows.extend([x_ends[2 * r]] + list(x[r * frames:(r + 1) * frames]) + [x_ends[2 * r + 1]])
    grid = images.make_grid(np.stack(grid_rows), rows=min(8, len(pairs)),
                            scale=max(1, 64 // x.shape[1]),
                            labels=[f"pair {r}: image A, {frames} frames, image B"
                                    for r in range(min(8, len(pairs)))])
    gpath = os.path.join(ctx.out, "interpolations.png")
    images.save_png(gpath, grid)
    return dict(pairs=len(pairs), frames=frames, changes_once=once / len(pairs),
                ends_differ=ends / len(pairs), mean_changes=float(np.mean(changes)),
                changes=[int(c) for c in changes], grid=gpath)


def reproduce_unclip(prior, decoder, out, *, num_per_prompt, seed, batch_size, steps,
                     progress=True, num_variations=20, num_pairs=20, frames=8) -> dict:
    ctx = Context(prior, decoder, out, num_per_prompt=num_per_prompt, seed=seed,
                  batch_size=batch_size, steps=steps, progress=progress)
    k0 = prior.family.default_candidates()
    w_p0 = float(prior.config.sample.guidance_weight)
    w_d0 = float(decoder.config.sample.guidance_weight)
    cache = {}

    def prior_job(k=k0, w_prior=w_p0, w_dec=w_d0):
        key = (k, w_prior, w_dec)
        if key not in cache:
            cache[key] = ctx.job(f"prior_k{k}_wp{w_prior:g}_wd{w_dec:g}", k=k, w_prior=w_prior,
                                 w_dec=w_dec)
        return cache[key]

    x, rows, z = prior_job()
    prior_rows = prior_section(ctx, z)
    cond_rows = [dict(condition=f"prior's sampled z_i (K = {k0})",
                      **ctx.score(x, _prompts(rows)), **ctx.cosines(z))]
    for source, label in (("text_embedding", "text embedding z_t in z_i's place"),
                          ("none", "text alone (null z_i)")):
        xs, rs, _ = ctx.job(f"{source}_wd{w_d0:g}", source=source)
        cond_rows.append(dict(condition=label, **ctx.score(xs, _prompts(rs))))
    cand_rows = []
    for k in CANDIDATES:
        xk, rk, zk = prior_job(k=k)
        cand_rows.append(dict(candidates=k, **ctx.score(xk, _prompts(rk)), **ctx.cosines(zk)))
    guide_rows = []
    for w in PRIOR_WEIGHTS:
        xw, rw, zw = prior_job(w_prior=w)
        guide_rows.append(dict(prior_guidance=w, decoder_guidance=w_d0,
                               **ctx.score(xw, _prompts(rw)), **ctx.cosines(zw)))
    for w in DECODER_WEIGHTS:
        if w == w_d0:
            continue
        xw, rw, zw = prior_job(w_dec=w)
        guide_rows.append(dict(prior_guidance=w_p0, decoder_guidance=w,
                               **ctx.score(xw, _prompts(rw)), **ctx.cosines(zw)))
    real = dict(condition="real test images", **ctx.score(
        images.to_uint8(ctx.test["image"][:len(x)]), list(ctx.test["caption"][:len(x)])))
    return dict(experiment="unclip", prior=prior.workdir, prior_step=prior.step,
                decoder=decoder.workdir, decoder_step=decoder.step,
                clip=decoder.family.clip.workdir, prompts=ctx.prompts,
                num_per_prompt=num_per_prompt, seed=seed, steps=steps,
                prior_steps=int(prior.config.sample.num_steps), prior_candidates=k0,
                prior_guidance=w_p0, decoder_guidance=w_d0, kind=ctx.kind,
                prior_cosines=prior_rows, conditioning=cond_rows, real=real,
                candidates=cand_rows, guidance=guide_rows,
                variations=variations_section(ctx, num_variations, 7),
                interpolations=interpolations_section(ctx, num_pairs, frames),
                evaluator_accuracy=ctx.scorer.ev.accuracy)


def markdown(res: dict) -> str:
    shapes = res["kind"] == "shapes"
    md = [f"Prior {res['prior']} (step {res['prior_step']}), decoder {res['decoder']} (step "
          f"{res['decoder_step']}), CLIP {res['clip']}; {len(res['prompts'])} prompts x "
          f"{res['num_per_prompt']} images; prior {res['prior_steps']} DDIM steps, K = "
          f"{res['prior_candidates']}, w = {res['prior_guidance']:g}; decoder {res['steps']} "
          f"steps, w = {res['decoder_guidance']:g}. Evaluator accuracy {res['evaluator_accuracy']:.3f}.\n",
          "**The prior**: mean cosine to the true CLIP image embeddings of the test images with "
          "that caption.\n",
          markdown_table(["embedding", "cosine", "prompts"],
                         [[r["embedding"], fmt(r["cosine"]), str(r["prompts"])]
                          for r in res["prior_cosines"]])]

    def quality(r):
        cells = [fmt(r.get("alignment")), fmt(r.get("fd"), 1)]
        if shapes:
            cells += [f"{fmt(r.get('alignment_seen'))} / {fmt(r.get('alignment_heldout'))}",
                      f"{fmt(r.get('colour_rate_seen'))} / {fmt(r.get('colour_rate_heldout'))}",
                      f"{fmt(r.get('shape_rate_seen'))} / {fmt(r.get('shape_rate_heldout'))}"]
        return cells
    qhead = ["alignment", "FD"] + (["align (seen / held-out)", "colour (seen / held-out)",
                                    "shape (seen / held-out)"] if shapes else [])
    md.append("\n**What the decoder is conditioned on** (the paper's comparison):\n")
    md.append(markdown_table(["condition"] + qhead + ["cos z_i to true", "cos z_i to z_t"],
                             [[r["condition"]] + quality(r) + [fmt(r.get("cos_true")),
                                                               fmt(r.get("cos_text"))]
                              for r in res["conditioning"] + [res["real"]]]))
    md.append("\n**The prior's candidates** (keep the one with the largest z_i . z_t):\n")
    md.append(markdown_table(["K"] + qhead + ["cos z_i to true", "cos z_i to z_t"],
                             [[str(r["candidates"])] + quality(r) + [fmt(r["cos_true"]),
                                                                     fmt(r["cos_text"])]
                              for r in res["candidates"]]))
    md.append("\n**Guidance weights** (one swept at a time):\n")
    md.append(markdown_table(["prior w", "decoder w"] + qhead + ["cos z_i to true"],
                             [[f"{r['prior_guidance']:g}", f"{r['decoder_guidance']:g}"]
                              + quality(r) + [fmt(r["cos_true"])] for r in res["guidance"]]))
    v = res["variations"]
    md.append(f"\n**Variations** of {v['num_images']} test images, {v['per_image']} each (DDIM "
              f"eta = 1): read as the original {fmt(v['read_as_original'])}; RMS pixel distance "
              f"(in [0, 1]) to the original {fmt(v['rms_to_original'])}, between variations "
              f"{fmt(v['rms_between'])}, the original's nearest training image "
              f"{fmt(v['rms_nearest_training_image'])}.\n")
    it = res["interpolations"]
    md.append(f"**Interpolations**: {it['pairs']} pairs of test images with different captions, "
              f"{it['frames']} frames (slerp, DDIM eta = 0, one noise a row): the reading changes "
              f"exactly once in {fmt(it['changes_once'])} of the rows (mean changes "
              f"{fmt(it['mean_changes'], 2)}; the ends read differently in "
              f"{fmt(it['ends_differ'])}).\n")
    return "\n".join(md)


def run(a) -> int:
    return common.run_reproduction(a, load_models, lambda models, a: reproduce_unclip(
        *models, a.out, num_per_prompt=a.num_per_prompt, seed=a.seed, batch_size=a.batch_size,
        steps=a.steps, progress=not a.no_progress), markdown)
