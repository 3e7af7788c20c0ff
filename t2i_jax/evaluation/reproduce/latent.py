"""`reproduce latent`: latent diffusion (Rombach et al. 2022) at 64x64 on `shapes`, against
Imagen's way to the same size (a 16x16 base + a 16 -> 64 SR stage), the autoencoder's factor f,
and the scale factor.

    python -m t2i_jax.evaluation.reproduce latent --workdir runs/shapes64_ldm \
        --f4_short runs/shapes64_ldm_f4_800 --f2 runs/shapes64_ldm_f2_800 \
        --noscale runs/shapes64_ldm_noscale_800 --base runs/shapes16 --sr runs/shapes_sr64

  1. models   each model's training images/s (the median of its metrics.jsonl), sampling
              images/s, FD and alignment of --num_per_prompt images of each fixed prompt: the
              latent model (--workdir), the cascade, and three latent models trained alike
              (same steps and schedule) but for f (--f4_short vs --f2) or the scale factor
              (--f4_short vs --noscale);
  2. f        each autoencoder's reconstructions of the test split (PSNR, SSIM, rFD:
              evaluation/reconstruct.py) beside its latent model's sample quality;
  3. scale    LDM's reason for the scale factor: the latents' std s, and so the SNR the chain
              sees, abar s^2 / (1 - abar) instead of abar / (1 - abar), with the steps at which it
              crosses 1, beside the sample quality with and without it.
Alignment is read twice: by the 64x64 evaluator, and by the 16x16 one on the box-downsampled
images (the 64x64 one is the weaker classifier: its own accuracy is in the table); colour and
shape are also counted apart (of the objects a prompt names, the fraction whose colour, or
shape, the evaluator finds). Real test images give each reading's ceiling.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Optional

import numpy as np

from t2i_jax import images
from t2i_jax.evaluation import reconstruct
from t2i_jax.evaluation.reproduce import common
from t2i_jax.evaluation.reproduce.common import fmt, markdown_table
from t2i_jax.evaluation.scorer import Scorer, attribute_rates, evaluator_cache

# its line in reproduce --help
SUMMARY = "Rombach et al. (2022): a latent model at 64x64 vs the cascade, f = 2 vs 4, scaling"


def add_arguments(p) -> None:
    common.add_arguments(p, steps="sampling steps of the latent models and the cascade's base "
                                  "(config's sampler)")
    p.add_argument("--f4_short", help="a latent model trained as --f2 and --noscale are (the "
                                      "f = 4 reference of equal training)")
    p.add_argument("--f2", help="the latent model on an f = 2 autoencoder")
    p.add_argument("--noscale", help="the latent model trained with latent.scale_by_std=False")
    p.add_argument("--base", help="the cascade's 16x16 base workdir")
    p.add_argument("--sr", help="the cascade's SR stage, after --base")


def check_arguments(p, a) -> None:
    common.check_arguments(p, a)


@dataclasses.dataclass
class Models:
    latent: object
    f4_short: Optional[object]
    f2: Optional[object]
    noscale: Optional[object]
    base: Optional[object]
    sr: Optional[object]


def load_models(a) -> Models:
    from t2i_jax.sampling import stages as stages_lib
    from t2i_jax.sampling.load import load_trained, require_generator

    def latent(workdir, flag):
        if not workdir:
            return None
        t = require_generator(load_trained(workdir))
        if not t.family.latent:
            raise ValueError(f"{flag} {workdir} holds a {t.family.name} model, not a latent one.")
        return t

    main = latent(a.workdir, "--workdir")
    models = Models(main, latent(a.f4_short, "--f4_short"), latent(a.f2, "--f2"),
                    latent(a.noscale, "--noscale"), None, None)
    for m, flag in ((models.f4_short, "--f4_short"), (models.f2, "--f2"),
                    (models.noscale, "--noscale")):
        if m is not None and stages_lib.image_shape(m) != stages_lib.image_shape(main):
            raise ValueError(f"{flag} {m.workdir} makes {stages_lib.image_shape(m)} images, "
                             f"--workdir {stages_lib.image_shape(main)}.")
    if bool(a.base) != bool(a.sr):
        raise ValueError("the cascade needs both --base (16x16 base) and --sr (its SR stage).")
    if a.base:
        models.base = require_generator(load_trained(a.base))
        models.sr = load_trained(a.sr)
        stages_lib.check_follows(models.base, models.sr)
        if stages_lib.image_shape(models.sr) != stages_lib.image_shape(main):
            raise ValueError(f"--sr {a.sr} makes {stages_lib.image_shape(models.sr)} images, the "
                             f"latent model {stages_lib.image_shape(main)}.")
    return models


def train_rate(workdir: str) -> Optional[float]:
    """The median training images/s of a workdir's log (the first row, with compilation, out)."""
    from t2i_jax.training.writers import read_metrics
    rows = [r["images_per_s"] for r in read_metrics(workdir) if "images_per_s" in r][1:]
    return float(statistics.median(rows)) if rows else None


class Reader:
    """Scores at 64x64 and (box-downsampled) at 16x16, with attribute rates split by held-out."""

    def __init__(self, config, cache_dir: str):
        import copy
        self.s64 = Scorer(config, cache_dir)
        c16 = copy.deepcopy(config)
        c16.data.image_size = 16
        self.s16 = Scorer(c16, cache_dir)

    def score(self, x_uint8, prompts) -> dict:
        from t2i_jax.diffusion import augmentation
        from t2i_jax.evaluation import evaluator as ev_lib
        low = images.to_uint8(np.asarray(augmentation.downsample(
            x_uint8.astype(np.float32) / 127.5 - 1.0, 16)))
        out = self.s64.score(x_uint8, prompts)
        r16 = self.s16.score(low, prompts)
        out.update({f"{k}_16": r16[k] for k in ("alignment", "alignment_heldout", "alignment_seen")})
        held = np.array([ev_lib.is_held_out_prompt(p) for p in prompts])
        for tag, sel in (("seen", ~held), ("heldout", held)):
            if sel.any():
                ps = [p for p, h in zip(prompts, sel) if h]
                for k, v in attribute_rates(self.s16.ev, low[sel], ps).items():
                    out[f"{k}_16_{tag}"] = v
        return out


def _real_rows(reader, config, n: int, index: int = 1) -> dict:
    """Real images of split `index` (1: test; 2: shapes' held-out pairs) with their captions:
    what each reading scores for real data."""
    from t2i_jax import data as data_lib
    split = data_lib.get_spec(config.data.name).splits[index]
    d = data_lib.load_split(config.data, split, limit=n)
    return reader.score(images.to_uint8(d["image"]), list(d["caption"]))


def reproduce_latent(models: Models, out: str, *, num_per_prompt: int, seed: int,
                     batch_size: int, steps: int, progress: bool = True) -> dict:
    from t2i_jax import data as data_lib
    from t2i_jax.sampling import stages as stages_lib
    main = models.latent
    cfg = main.config
    cache = evaluator_cache(main.workdir, out, cfg.data)
    reader = Reader(cfg, cache)
    prompts = common.default_prompts(cfg)
    samples = os.path.join(out, "samples")
    job_kw = dict(seed=seed, batch_size=batch_size, progress=progress)
    w = float(cfg.sample.guidance_weight)
    rows = []
    entries = [(f"LDM f=4, {main.step} steps", "f4", main)]
    for label, tag, m in (("LDM f=4", "f4_short", models.f4_short), ("LDM f=2", "f2", models.f2),
                          ("LDM f=4, no scale factor", "noscale", models.noscale)):
        if m is not None:
            entries.append((f"{label}, {m.step} steps", tag, m))
    recon = {}
    for label, tag, trained in entries:
        fam = trained.family
        options = stages_lib.stage_options(trained, steps=steps)
        x, rws, stats = common.sample_job(trained, os.path.join(samples, tag), prompts,
                                          num_per_prompt=num_per_prompt, guidance=(w,),
                                          options=options, **job_kw)
        ae = fam.autoencoder
        if ae.workdir not in recon:
            # with the reader's evaluator, so every autoencoder's rFD is in the same features
            recon[ae.workdir] = reconstruct.evaluate(
                ae, os.path.join(out, "reconstruct", f"f{fam.ae.ae_config.factor}"),
                evaluator_dir=cache)
        rows.append(dict(model=label, workdir=trained.workdir, checkpoint_step=trained.step,
                         x_t=list(fam.image_shape), factor=fam.ae.ae_config.factor,
                         scale_factor=fam.scale_factor, train_images_per_s=train_rate(trained.workdir),
                         images_per_s=stats.get("images_per_s"), steps=options.num_steps,
                         **reader.score(x, [r["prompt"] for r in rws])))
    if models.base is not None:
        st = stages_lib.Stage(models.sr, stages_lib.stage_options(models.sr, flag="--sr_steps"),
                              float(models.sr.config.sample.guidance_weight),
                              float(models.sr.family.default_aug_level()))
        base_opts = stages_lib.stage_options(models.base, steps=steps)
        cdir = os.path.join(samples, "cascade")
        x, rws, stats = common.sample_job(
            models.base, cdir, prompts, num_per_prompt=num_per_prompt,
            guidance=(float(models.base.config.sample.guidance_weight),), options=base_opts,
            stages=(st,), **job_kw)
        rates = [train_rate(models.base.workdir), train_rate(models.sr.workdir)]
        rows.append(dict(model="cascade 16 -> 64 (base + SR)", workdir=cdir,
                         checkpoint_step=[models.base.step, models.sr.step],
                         x_t=[list(models.base.family.image_shape), list(models.sr.family.image_shape)],
                         factor=None, scale_factor=None,
                         train_images_per_s=(1.0 / sum(1.0 / r for r in rates)
                                             if all(rates) else None),
                         train_images_per_s_stages=rates,
                         images_per_s=stats.get("images_per_s"),
                         steps=[base_opts.num_steps, st.options.num_steps],
                         **reader.score(x, [r["prompt"] for r in rws])))
    n = len(prompts) * num_per_prompt
    real = dict(model="real test images", **_real_rows(reader, cfg, n))
    splits = data_lib.get_spec(cfg.data.name).splits
    real_heldout = (dict(model=f"real {splits[2]} images (held-out pairs)",
                         **_real_rows(reader, cfg, n, 2)) if len(splits) > 2 else None)
    scale = _scale_section(main, models.noscale)
    res = dict(experiment="latent", prompts=prompts, num_per_prompt=num_per_prompt, seed=seed,
               guidance=w, steps=steps, rows=rows, real=real, real_heldout=real_heldout,
               reconstruction=list(recon.values()), scale=scale,
               evaluator_accuracy={"64": reader.s64.ev.accuracy, "16": reader.s16.ev.accuracy})
    return res


def _scale_section(main, noscale) -> dict:
    """The SNR the chain sees: abar s^2 / (1 - abar) for latents of std s."""
    fam = main.family
    abar = np.asarray(fam.schedule.alphas_cumprod, np.float64)
    stats = fam.autoencoder.statistics or {}
    s = float(stats.get("latent_std", float("nan")))

    def crossing(std):
        snr = abar * std ** 2 / (1 - abar)
        below = np.flatnonzero(snr < 1.0)
        return int(below[0]) if below.size else None

    return dict(latent_std=s, scale_factor=stats.get("scale_factor"),
                snr_ratio=s ** 2, t_snr_below_1_scaled=crossing(1.0),
                t_snr_below_1_unscaled=crossing(s), num_timesteps=int(len(abar)),
                noscale_workdir=None if noscale is None else noscale.workdir)


def markdown(res: dict) -> str:
    head = ["model", "x_t", "train img/s", "sample img/s", "FD", "align 64 (seen / held-out)",
            "align 16 (seen / held-out)", "colour 16 (seen / held-out)",
            "shape 16 (seen / held-out)"]

    def line(r):
        xt = r.get("x_t")
        xt = " + ".join("x".join(map(str, v)) for v in xt) if xt and isinstance(xt[0], list) \
            else ("x".join(map(str, xt)) if xt else "")
        return [r["model"], xt, fmt(r.get("train_images_per_s"), 1), fmt(r.get("images_per_s"), 2),
                fmt(r.get("fd"), 0),
                f"{fmt(r.get('alignment_seen'))} / {fmt(r.get('alignment_heldout'))}",
                f"{fmt(r.get('alignment_seen_16'))} / {fmt(r.get('alignment_heldout_16'))}",
                f"{fmt(r.get('colour_rate_16_seen'))} / {fmt(r.get('colour_rate_16_heldout'))}",
                f"{fmt(r.get('shape_rate_16_seen'))} / {fmt(r.get('shape_rate_16_heldout'))}"]
    reals = [line(res["real"])] + ([line(res["real_heldout"])] if res.get("real_heldout") else [])
    md = [markdown_table(head, [line(r) for r in res["rows"]] + reals)]
    md.append(f"\n{len(res['prompts'])} prompts x {res['num_per_prompt']} images, w = "
              f"{res['guidance']}, {res['steps']} DDIM steps (the cascade's SR: its config's). "
              f"Evaluator accuracy on its own held-out images: 64x64 "
              f"{res['evaluator_accuracy']['64']:.2f}, 16x16 {res['evaluator_accuracy']['16']:.2f}.\n")
    rhead = ["autoencoder", "f", "latent", "PSNR dB", "SSIM", "rFD", "scale factor",
             "test latents std (scaled)"]
    md.append(markdown_table(rhead, [[
        r["workdir"], str(r["factor"]), "x".join(map(str, r["latent_shape"])), fmt(r["psnr"], 2),
        fmt(r["ssim"], 4), fmt(r["rfd"], 1),
        fmt(r["latents"]["stored"].get("scale_factor"), 4),
        f"{fmt(r['latents']['test_std'], 3)} ({fmt(r['latents']['test_scaled_std'], 3)})"]
        for r in res["reconstruction"]]))
    s = res["scale"]
    md.append(f"\nScale factor: the f=4 latents have std {s['latent_std']:.3f}, so unscaled the "
              f"chain's SNR at every t is {s['snr_ratio']:.3f} of the schedule's; it falls below 1 "
              f"at t = {s['t_snr_below_1_unscaled']} of {s['num_timesteps']} instead of t = "
              f"{s['t_snr_below_1_scaled']}.\n")
    return "\n".join(md)


def run(a) -> int:
    return common.run_reproduction(a, load_models, lambda models, a: reproduce_latent(
        models, a.out, num_per_prompt=a.num_per_prompt, seed=a.seed, batch_size=a.batch_size,
        steps=a.steps, progress=not a.no_progress), markdown)
