"""`reproduce inpaint`: inpainting (GLIDE, Nichol et al. 2022 sec. 4; RePaint, Lugmayr et al.
2022) on the shapes test images with the right half regenerated.

    python -m t2i_jax.evaluation.reproduce inpaint --workdir runs/shapes_learned_sigma \
        --glide runs/shapes_inpaint

--limit images of the test split (pairs seen in training) and as many of the heldout split
(each has a colour-shape pair no training image has) keep their left half; the right half is
regenerated, with the image's own caption as the prompt, by
  - a baseline that fills it with the training split's mean image;
  - RePaint on --workdir (any text-conditional model; no mask in its training), without jumps
    (the known region replaced by q_sample of the image before each step) and with
    --repaint_jumps J of --repaint_jump_length L;
  - GLIDE's mask-conditioned model (--glide, model.inpaint), x0_hat's known pixels overwritten
    at each step;
and each is scored: the known region's PSNR against the input (GLIDE: exact; RePaint: the last
step's noise), FD of the completed images against the real held-out images, and whether the
completed image matches its caption by the evaluator (alignment: every named object's colour,
shape and size; and the fraction of named objects whose colour, or shape, is found), seen and
held-out pairs apart. The real images are the ceiling. OUT/grid.png: for a few images, the input,
the mask, and each method's completion.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from t2i_jax import images
from t2i_jax.evaluation.reproduce import common
from t2i_jax.evaluation.reproduce.common import fmt, markdown_table
from t2i_jax.evaluation.scorer import Scorer, attribute_rates, evaluator_cache

JUMPS, JUMP_LENGTH = 4, 5

# its line in reproduce --help
SUMMARY = "GLIDE / RePaint: the right half of shapes images regenerated, against a baseline"


def add_arguments(p) -> None:
    common.add_arguments(p, workdir_help="a pixel text-to-image model without model.inpaint "
                                         "(RePaint's)",
                         num_per_prompt=False, steps="sampling steps (config's sampler)")
    p.add_argument("--glide", help="GLIDE's mask-conditioned model (model.inpaint)")
    p.add_argument("--limit", type=int, default=100,
                   help="images of the test and of the heldout split each (default 100)")
    p.add_argument("--repaint_jumps", type=int, default=JUMPS,
                   help="RePaint's jumps of the second RePaint row (default 4)")
    p.add_argument("--repaint_jump_length", type=int, default=JUMP_LENGTH, help="(default 5)")


def check_arguments(p, a) -> None:
    common.check_arguments(p, a)
    if a.repaint_jumps < 1 or a.repaint_jump_length < 1:
        p.error("--repaint_jumps and --repaint_jump_length must be >= 1 (the row without "
                "jumps is always there).")
    common.check_limit(p, a)


def load_models(a):
    from t2i_jax.sampling.load import load_trained, require_generator
    base = require_generator(load_trained(a.workdir))
    fam = base.family
    if getattr(fam, "inpaint", False):
        raise ValueError(f"--workdir {a.workdir} is GLIDE's mask-conditioned model: pass it as "
                         "--glide, and a model without model.inpaint as --workdir (RePaint's).")
    if not getattr(fam, "generates", False) or getattr(fam, "not_pixels", None) is not None \
            or fam.name != "diffusion":
        raise ValueError(f"--workdir {a.workdir} holds a {fam.name} model; RePaint here needs a "
                         "pixel diffusion model.")
    glide = None
    if a.glide:
        glide = require_generator(load_trained(a.glide))
        if not glide.family.inpaint:
            raise ValueError(f"--glide {a.glide} is not mask-conditioned (model.inpaint); train "
                             "one with configs/shapes_inpaint.py.")
        for k in ("name", "image_size", "channels"):
            if glide.config.data[k] != base.config.data[k]:
                raise ValueError(f"--glide {a.glide} has data.{k} = {glide.config.data[k]!r}, "
                                 f"--workdir {base.config.data[k]!r}: compare models of one "
                                 "data set and size.")
    from t2i_jax.evaluation import evaluator as ev_lib
    if ev_lib.kind_of(base.config.data) != "shapes":
        raise ValueError("reproduce inpaint scores completed objects against their captions on "
                         f"the shapes data set; {a.workdir} was trained on "
                         f"{base.config.data.name!r}.")
    from t2i_jax.sampling.generate import SampleOptions
    SampleOptions(repaint_jumps=a.repaint_jumps, repaint_jump_length=a.repaint_jump_length,
                  inpaint="repaint", sampler="ddpm")  # their refusals, before any work
    return base, glide


def test_images(data_config, limit: int) -> dict:
    """`limit` test images (seen pairs) then `limit` heldout ones: image float32 [2n, H, W, C],
    caption, held (bool)."""
    from t2i_jax import data as data_lib
    parts = [data_lib.load_split(data_config, s, limit=limit) for s in ("test", "heldout")]
    return dict(image=np.concatenate([p["image"] for p in parts]),
                caption=[c for p in parts for c in p["caption"]],
                held=np.concatenate([np.full(len(p["image"]), s == "heldout")
                                     for p, s in zip(parts, ("test", "heldout"))]))


def right_half_mask(height: int, width: int) -> np.ndarray:
    from t2i_jax.diffusion import inpainting
    return inpainting.box_mask(height, width, (width // 2, 0, width, height))


def known_psnr(x: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> dict:
    """x, ref uint8 [N, H, W, C]; mask [H, W, 1] (1 = known): PSNR (dB, None where exact) over the
    known pixels, and the largest absolute error there (in 0..255)."""
    keep = np.broadcast_to(mask[None] > 0.5, x.shape)
    d = x.astype(np.float64)[keep] - ref.astype(np.float64)[keep]
    mse = float(np.mean(d ** 2))
    return dict(known_psnr=None if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse)),
                known_max_error=int(np.abs(d).max()), known_mse=mse)


def score(scorer, x, captions, held) -> dict:
    out = scorer.score(x, captions)
    aligned = scorer.ev.aligned(x, captions)
    for tag, sel in (("seen", ~held), ("heldout", held)):
        if sel.any():
            out[f"alignment_{tag}"] = float(np.nanmean(aligned[sel]))
            ps = [c for c, h in zip(captions, sel) if h]
            for k, v in attribute_rates(scorer.ev, x[sel], ps).items():
                out[f"{k}_{tag}"] = v
    return out


def _job(trained, out, tag, captions, known, mask, record, *, seed, batch_size, steps, options,
         progress):
    from t2i_jax.sampling import stages as stages_lib
    from t2i_jax.sampling.plan import Inpaint
    opts = stages_lib.stage_options(trained, steps=steps, **options)
    paint = Inpaint.create(known, np.broadcast_to(mask, known.shape[:3] + (1,)), record,
                           trained.family.image_shape, len(captions))
    x, rows, stats = common.sample_job(  # stats: the generating run's speed
        trained, os.path.join(out, "samples", tag), captions, num_per_prompt=1,
        guidance=(float(trained.config.sample.guidance_weight),), seed=seed, options=opts,
        batch_size=batch_size, progress=progress, inpaint=paint)
    assert [r["prompt"] for r in rows] == list(captions)
    return x, dict(sampler=opts.sampler, steps=opts.num_steps, ddpm_variance=opts.ddpm_variance,
                   guidance=float(trained.config.sample.guidance_weight),
                   images_per_s=(stats or {}).get("images_per_s"))


def reproduce_inpaint(base, glide, out, *, limit, seed, batch_size, steps, jumps=JUMPS,
                      jump_length=JUMP_LENGTH, progress=True) -> dict:
    from t2i_jax import data as data_lib
    cfg = base.config
    scorer = Scorer(cfg, evaluator_cache(base.workdir, out, cfg.data))
    data = test_images(cfg.data, limit)
    x_real, captions, held = data["image"], data["caption"], data["held"]
    h, w = x_real.shape[1:3]
    mask = right_half_mask(h, w)
    ref = images.to_uint8(x_real)
    digest = hashlib.sha256(ref.tobytes()).hexdigest()
    record = dict(image=f"{cfg.data.name} test[:{limit}] + heldout[:{limit}] at {h}x{w}",
                  image_sha256=digest, mask_box=[w // 2, 0, w, h], known_fraction=0.5)
    train = data_lib.load_split(cfg.data, "train")["image"]
    mean = train.mean(0)
    rows, finals = [], {}

    def add(method, x, **extra):
        finals[method] = x
        rows.append(dict(method=method, **known_psnr(x, ref, mask),
                         **score(scorer, x, captions, held), **extra))

    add("real images (ceiling)", ref)
    add("mean fill (baseline)", images.to_uint8(mask * x_real + (1 - mask) * mean))
    for j, L in ((0, jump_length), (jumps, jump_length)):
        tag = f"repaint_j{j}_l{L}"
        x, info = _job(base, out, tag, captions, x_real, mask,
                       dict(method="repaint", **record, jumps=j, jump_length=L), seed=seed,
                       batch_size=batch_size, steps=steps,
                       options=dict(inpaint="repaint", repaint_jumps=j, repaint_jump_length=L),
                       progress=progress)
        add(f"RePaint, {'no jumps' if j == 0 else f'{j} jumps of {L} steps'}", x,
            workdir=base.workdir, **info)
    if glide is not None:  # its config's sampler, and DDPM's (RePaint's) as well
        samplers = [None] + (["ddpm"] if glide.config.sample.sampler != "ddpm" else [])
        for sampler in samplers:
            x, info = _job(glide, out, "glide" + (f"_{sampler}" if sampler else ""), captions,
                           x_real, mask, dict(method="glide", **record), seed=seed,
                           batch_size=batch_size, steps=steps,
                           options=dict(inpaint="glide", sampler=sampler), progress=progress)
            add(f"GLIDE mask model, {info['sampler']}", x, workdir=glide.workdir, **info)
    grid = _grid(ref, mask, finals, held)
    gpath = os.path.join(out, "grid.png")
    images.save_png(gpath, grid)
    return dict(experiment="inpaint", workdir=base.workdir, checkpoint_step=base.step,
                glide=glide.workdir if glide is not None else None,
                glide_step=glide.step if glide is not None else None, limit=limit, seed=seed,
                images=record["image"], images_sha256=digest, mask_box=record["mask_box"],
                evaluator_accuracy=scorer.ev.accuracy, rows=rows, grid=gpath,
                grid_columns=["input"] + ["mask"] + [m for m in finals if "ceiling" not in m])


def _grid(ref, mask, finals, held, n=8):
    """Rows: n images (half seen, half held-out pairs); columns: the input, the input with the
    regenerated region greyed out, then each method's completion."""
    seen_idx, held_idx = np.flatnonzero(~held)[:n // 2], np.flatnonzero(held)[:n - n // 2]
    idx = np.concatenate([seen_idx, held_idx])
    shown = np.where(mask[None] > 0.5, ref[idx], 128).astype(np.uint8)
    cols = [ref[idx], shown] + [x[idx] for m, x in finals.items() if "ceiling" not in m]
    tiles = np.stack(cols, axis=1).reshape((-1,) + ref.shape[1:])
    labels = [f"{'held-out' if held[i] else 'seen'} test image {i}" for i in idx]
    return images.make_grid(tiles, rows=len(idx), scale=max(1, 64 // ref.shape[1]),
                            labels=labels)


def markdown(res: dict) -> str:

    def psnr(r):
        if r["known_max_error"] == 0:
            return "exact"
        return f"{r['known_psnr']:.1f} dB (max err {r['known_max_error']})"

    def pair(r, k):
        return f"{fmt(r.get(k + '_seen'))} / {fmt(r.get(k + '_heldout'))}"

    md = [f"{res['limit']} test images (seen pairs) and {res['limit']} heldout images (a pair no "
          f"training image has), right half regenerated (mask box {res['mask_box']}), each with "
          "its own caption:\n\n"]
    md.append(markdown_table(
        ["method", "known region PSNR", "FD", "alignment (seen / held-out)",
         "colour (seen / held-out)", "shape (seen / held-out)", "colour+shape (seen / held-out)",
         "sampler"],
        [[r["method"], psnr(r), fmt(r["fd"], 1), pair(r, "alignment"), pair(r, "colour_rate"),
          pair(r, "shape_rate"), pair(r, "pair_rate"),
          (f"{r['sampler']} {r['steps']} ({r['ddpm_variance']}), w = {r['guidance']:g}"
           if "sampler" in r else "-")] for r in res["rows"]]))
    md.append("\nalignment: the evaluator finds exactly the caption's objects (colour, shape and "
              "any size it names); colour / shape / colour+shape: of the objects the captions "
              "name, the fraction whose colour / shape / colour-shape pair it finds. The known "
              "region's PSNR is over the kept pixels of the 8-bit output against the input.\n")
    md.append(f"\nGrid (OUT/grid.png), columns: {', '.join(res['grid_columns'])}; rows: seen "
              "pairs, then held-out pairs.\n")
    return "".join(md)


def run(a) -> int:
    return common.run_reproduction(a, load_models, lambda models, a: reproduce_inpaint(
        *models, a.out, limit=a.limit, seed=a.seed, batch_size=a.batch_size, steps=a.steps,
        jumps=a.repaint_jumps, jump_length=a.repaint_jump_length,
        progress=not a.no_progress), markdown)
