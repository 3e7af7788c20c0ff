"""A cascade's reproduction (Ho et al. 2021, Cascaded Diffusion Models; Saharia et al. 2022,
Imagen): `python -m t2i_jax.evaluation.reproduce cascade --workdir BASE --sr SR
[--sr_noaug SR_NOAUG]`, a base model at 16x16 and a super-resolution model 16 -> 64.

  augmentation  one base job at 16x16 (its config's options and guidance weight), then the SR
                stage on those base images (given as low_res inputs, one per image, so stage 1
                is not resampled per level) at noise-conditioning augmentation levels
                s in {0, 0.1, 0.2, 0.3, 0.5} -> FD and alignment (seen and held-out pairs) with
                the evaluator trained at 64; the real-data floor at 64; bicubic upsampling of
                the base images as a row without an SR model.
  no-aug        (--sr_noaug) the same sweep for an SR trained without augmentation
                (sr.max_train_level = 0): CDM's central ablation.
  thresholding  the base at w in {1, 3, 5, 8}, static vs dynamic thresholding (Imagen sec. 2.3)
                -> saturation (fraction of pixel values at 255), alignment and FD at 16.
  real inputs   the SR alone on real test / heldout images box-downsampled to 16, at level 0
                and the sampling default -> PSNR and SSIM against the real 64x64 images, beside
                bicubic and bilinear upsampling.
  consistency   at the default level: PSNR of downsample(SR output) against its 16x16 input, and
                the high-frequency energy fraction (detail) of SR outputs, bicubic upsamplings
                and real images.
  speed         images/s of the base and SR stages (each job's steady state) and of the cascade.

There is no single 64x64 model to compare against (none was trained): "cascade vs single
model" is left to the caller. Every sampling is a job directory under OUT/samples/ (resumable).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional

import numpy as np

from t2i_jax import files, images
from t2i_jax.evaluation.reproduce import common
from t2i_jax.evaluation.reproduce.common import fmt, markdown_table
from t2i_jax.evaluation.scorer import Scorer, evaluator_cache, evaluator_dir

AUG_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.5)
THRESHOLD_WEIGHTS = (1.0, 3.0, 5.0, 8.0)
THRESHOLDINGS = ("static", "dynamic")

# its line in reproduce --help
SUMMARY = "Ho et al. (2021) / Imagen: base + SR, augmentation level, thresholding, SR alone"


def add_arguments(p) -> None:
    common.add_arguments(p, workdir_help="the 16x16 base model's training workdir",
                         steps="the base's sampling steps (config's sampler)")
    p.add_argument("--sr", help="the super_resolution workdir after the --workdir base")
    p.add_argument("--sr_noaug", help="the same SR trained with sr.max_train_level=0")
    p.add_argument("--sr_steps", type=int, help="the SR's sampling steps (default: its config's)")


def check_arguments(p, a) -> None:
    common.check_arguments(p, a)
    if a.sr_steps is not None and a.sr_steps < 1:
        p.error(f"--sr_steps must be >= 1, got {a.sr_steps}.")
    common.require(p, a, "sr", "cascade", "super-resolution model")


@dataclasses.dataclass(frozen=True)
class Models:
    """The checked models and options of a cascade reproduction (made before anything runs)."""
    base: object               # sampling.load.Trained
    sr: object
    sr_noaug: Optional[object]
    base_options: object       # SampleOptions
    sr_options: object
    noaug_options: Optional[object]
    threshold_options: dict    # "static" / "dynamic" -> SampleOptions


def load_models(workdir: str, sr_dir: str, noaug_dir: Optional[str], *, steps: int,
                sr_steps: Optional[int]) -> Models:
    """Loads and checks every model, and builds every option set, before anything is written:
    ValueError for a base that is not a base model, an --sr / --sr_noaug that is not an SR
    model taking the base's images (stages.check_follows), or steps outside 1..T."""
    from t2i_jax.sampling import stages as stages_lib
    from t2i_jax.sampling.load import load_trained, require_generator
    base = require_generator(load_trained(workdir))
    if stages_lib.is_sr(base):
        raise ValueError(f"--workdir {base.workdir} holds a super_resolution model; reproduce "
                         "cascade takes the base (text-to-image) model in --workdir and the SR "
                         "model in --sr.")
    sr = load_trained(sr_dir)
    stages_lib.check_follows(base, sr, "--sr")
    noaug = None
    if noaug_dir:
        noaug = load_trained(noaug_dir)
        stages_lib.check_follows(base, noaug, "--sr_noaug")
        if stages_lib.image_shape(noaug) != stages_lib.image_shape(sr):
            raise ValueError(f"--sr_noaug {noaug.workdir} makes {stages_lib.image_shape(noaug)} "
                             f"images, --sr {sr.workdir} {stages_lib.image_shape(sr)}: the "
                             "ablation must be the same stage trained without augmentation.")
    opts = lambda t, **kw: stages_lib.stage_options(t, **kw)  # noqa: E731
    return Models(base, sr, noaug, opts(base, steps=steps), opts(sr, steps=sr_steps),
                  opts(noaug, steps=sr_steps) if noaug is not None else None,
                  {th: opts(base, steps=steps, thresholding=th) for th in THRESHOLDINGS})


def _max_train_level(trained) -> float:
    return float(trained.family.sr.max_train_level)


def _sr_guidance(trained) -> float:
    if not trained.family.conditioning.guidable:
        return 0.0
    return float(trained.config.sample.guidance_weight)


def _run_sr(trained, outdir: str, prompts: list, low_res: np.ndarray, record: dict, *,
            level: float, options, seed: int, batch_size: int, progress: bool):
    """One SR job of given inputs (one prompt slot per input image, as sample.py --low_res):
    (uint8 [N, H, W, C], records, stats of the run that generated the images)."""
    from t2i_jax.sampling.plan import Given
    return common.sample_job(trained, outdir, prompts, num_per_prompt=1,
                             guidance=(_sr_guidance(trained),), seed=seed, options=options,
                             batch_size=batch_size, progress=progress, aug_level=level,
                             given=Given(low_res, record))


def _real_inputs(sr_cfg, split: str, n: int, out: str, low_res_shape: tuple):
    """The first n images of a split at the SR's size (uint8), their captions, and their box
    downsamples to the SR's input size, written to OUT/inputs/SPLIT.npz and read back with
    stages.load_low_res (the same path as sample.py --low_res): (x64 uint8, captions, x16,
    record)."""
    from t2i_jax import data as data_lib
    from t2i_jax.diffusion import augmentation
    from t2i_jax.sampling import stages as stages_lib
    d = data_lib.load_split(sr_cfg.data, split)
    x = d["image"][:n]
    caps = list(d["caption"][:n])
    low = images.to_uint8(np.asarray(augmentation.downsample(x, low_res_shape[0])))
    path = os.path.join(out, "inputs", f"{split}_{low_res_shape[0]}px.npz")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with files.atomic_open(path, "wb") as f:
            np.savez(f, arr_0=low)
    low_read, record = stages_lib.load_low_res(path, low_res_shape)
    if not np.array_equal(low_read, low):
        raise ValueError(f"{path} does not hold the downsampled {split} images (it was written "
                         "by another run); delete it and rerun.")
    return images.to_uint8(x), caps, low, record


def _unit(x_uint8) -> np.ndarray:
    return np.asarray(x_uint8, np.float64) / 255.0


def _resize(x_uint8: np.ndarray, size: int, method: str) -> np.ndarray:
    """uint8 images resized to size x size by jax.image.resize (in [-1, 1], clipped), uint8."""
    import jax
    z = images.to_float(x_uint8)
    y = jax.image.resize(z, (len(z), size, size, z.shape[-1]), method=method)
    return images.to_uint8(np.clip(np.asarray(y), -1.0, 1.0))


def saturation(x_uint8: np.ndarray) -> float:
    """The fraction of pixel values clipped at the top (255). Only the top: the shapes palette's
    largest channel value is 235, so real data has none at 255, while its background is 0, so
    values at 0 are mostly real background and say nothing about clipping."""
    return float((np.asarray(x_uint8) == 255).mean())


def high_frequency_fraction(x_uint8: np.ndarray, low_size: int) -> np.ndarray:
    """float [N]: mean (x - upsample_bilinear(downsample_box(x)))^2 over pixels, divided by the
    variance of x (per image, x in [0, 1]); NaN for a constant image. The energy above what the
    low-resolution image holds: the detail a super-resolution stage adds."""
    import jax.numpy as jnp
    from t2i_jax.diffusion import augmentation
    x = _unit(x_uint8).astype(np.float32)
    size = x.shape[1]
    low = augmentation.upsample(augmentation.downsample(jnp.asarray(x), low_size), size)
    resid = ((x - np.asarray(low, np.float64)) ** 2).reshape(len(x), -1).mean(-1)
    var = x.reshape(len(x), -1).astype(np.float64).var(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 0, resid / np.where(var > 0, var, 1.0), np.nan)


def consistency_psnr(x_uint8: np.ndarray, low_uint8: np.ndarray) -> np.ndarray:
    """float [N]: PSNR of downsample_box(x) against the low-resolution input (both in [0, 1])."""
    from t2i_jax.diffusion import augmentation
    from t2i_jax.evaluation.image_metrics import psnr
    down = np.asarray(augmentation.downsample(_unit(x_uint8).astype(np.float32),
                                              low_uint8.shape[1]), np.float64)
    return psnr(down, _unit(low_uint8))


def _nanmean(v) -> Optional[float]:
    v = np.asarray(v, np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


def _rate(stats: dict) -> Optional[float]:
    r = stats.get("images_per_s")
    return float(r) if r else None


def reproduce_cascade(models: Models, out: str, *, num_per_prompt: int, seed: int,
                      batch_size: int, levels=AUG_LEVELS, weights=THRESHOLD_WEIGHTS,
                      progress=True, cache_dirs: Optional[tuple] = None) -> dict:
    """cache_dirs: (evaluator cache at the base's size, at the SR's size); default
    scorer.evaluator_cache of the base's workdir (or of the SR's, where it holds one)."""
    from t2i_jax.evaluation import evaluator as ev_lib
    from t2i_jax.diffusion import augmentation
    from t2i_jax.evaluation.image_metrics import psnr, ssim
    from t2i_jax.sampling import stages as stages_lib
    base, sr, noaug = models.base, models.sr, models.sr_noaug
    bcfg, scfg = base.config, sr.config
    low_shape = tuple(sr.family.low_res_shape)
    size = stages_lib.image_shape(sr)[0]
    default_level = float(sr.family.default_aug_level())
    levels = sorted({float(s) for s in levels} | {default_level})
    for s in levels:
        augmentation.check_level(s, "an augmentation level")
    if cache_dirs is None:
        sr_shared = evaluator_dir(sr.workdir)
        cache_dirs = (evaluator_cache(base.workdir, out, bcfg.data),
                      sr_shared if os.path.exists(ev_lib.cache_path(sr_shared, scfg.data))
                      else evaluator_cache(base.workdir, out, scfg.data))
    # Both evaluators first: one that cannot be trained or stored fails before any sampling.
    scorer16 = Scorer(bcfg, cache_dirs[0])
    scorer64 = Scorer(scfg, cache_dirs[1])
    prompts = common.default_prompts(bcfg)
    n = len(prompts) * num_per_prompt
    w_base = float(bcfg.sample.guidance_weight)
    samples = os.path.join(out, "samples")
    job_kw = dict(seed=seed, batch_size=batch_size, progress=progress)

    # 1. the base once, then each SR at each level on the base's images.
    base_dir = os.path.join(samples, "base")
    xb, rows_b, stats_b = common.sample_job(base, base_dir, prompts,
                                            num_per_prompt=num_per_prompt, guidance=(w_base,),
                                            options=models.base_options, **job_kw)
    base_prompts = [r["prompt"] for r in rows_b]
    low, record = stages_lib.load_low_res(os.path.join(base_dir, "images"), low_shape)
    base_row = dict(stage="base 16x16", **scorer16.score(xb, base_prompts),
                    images_per_s=_rate(stats_b), seconds=stats_b.get("seconds"))
    bicubic_b = _resize(low, size, "bicubic")
    bicubic_row = dict(model="bicubic (no SR)", level=None,
                       **scorer64.score(bicubic_b, base_prompts))
    sweeps, outputs = {}, {}
    sr_models = [("aug", sr, models.sr_options)] + (
        [("noaug", noaug, models.noaug_options)] if noaug is not None else [])
    for tag, model, options in sr_models:
        rows = []
        for s in levels:
            x, _, stats = _run_sr(model, os.path.join(samples, f"sr_{tag}", f"level_{s:g}"),
                                  base_prompts, low, record, level=s, options=options, **job_kw)
            outputs[(tag, s)] = x
            r1 = _rate(stats)
            r0 = base_row["images_per_s"]
            rows.append(dict(level=s, **scorer64.score(x, base_prompts), images_per_s=r1,
                             seconds=stats.get("seconds"),
                             cascade_images_per_s=(1.0 / (1.0 / r0 + 1.0 / r1)
                                                   if r0 and r1 else None)))
        sweeps[tag] = dict(workdir=model.workdir, checkpoint_step=model.step,
                           max_train_level=_max_train_level(model), sampler=options.sampler,
                           steps=options.num_steps, guidance=_sr_guidance(model), rows=rows)
    floor64 = scorer64.real_floor(n)

    # 3. the base's thresholding at several w.
    from t2i_jax import data as data_lib
    real16 = images.to_uint8(data_lib.load_split(bcfg.data, "test")["image"])
    thresh = {}
    for th in THRESHOLDINGS:
        x, rows, _ = common.sample_job(base, os.path.join(samples, f"thresholding_{th}"),
                                       prompts, num_per_prompt=num_per_prompt,
                                       guidance=tuple(weights),
                                       options=models.threshold_options[th], **job_kw)
        table = []
        for w in weights:
            sel = [i for i, r in enumerate(rows) if r["guidance"] == w]
            table.append(dict(w=float(w), saturation=saturation(x[sel]),
                              **scorer16.score(x[sel], [rows[i]["prompt"] for i in sel])))
        thresh[th] = table
    floor16 = scorer16.real_floor(n)

    # 4. the SR alone on real images (test; heldout, whose colour-shape pairs training never saw).
    splits = ("test", "heldout") if bcfg.data.name == "shapes" else ("test",)
    real_rows, real64_test = [], None
    for split in splits:
        x64, caps, low_r, record_r = _real_inputs(scfg, split, n, out, low_shape)
        if split == "test":
            real64_test, real_caps_test = x64, caps
        target = _unit(x64)
        metric = lambda y: dict(psnr=_nanmean(psnr(_unit(y), target)),  # noqa: E731
                                ssim=_nanmean(ssim(_unit(y), target)))
        for method in ("bicubic", "bilinear"):
            real_rows.append(dict(split=split, n=len(x64), method=method, level=None,
                                  **metric(_resize(low_r, size, method))))
        for tag, model, options in sr_models:
            for s in sorted({0.0, default_level}):
                y, _, _ = _run_sr(model, os.path.join(samples, f"real_{tag}", split,
                                                      f"level_{s:g}"),
                                  caps, low_r, record_r, level=s, options=options, **job_kw)
                real_rows.append(dict(split=split, n=len(x64), method=f"SR ({tag})", level=s,
                                      **metric(y)))

    # The evaluator's own reading of real 64x64 images with their captions: the best a model
    # can score (the 64px evaluator is the weaker one).
    real_row64 = scorer64.score(real64_test, real_caps_test)

    # 5. does the SR respect its input, and does it add detail? (at the default level)
    low_size = low_shape[0]
    detail = []
    for tag, _, _ in sr_models:
        y = outputs[(tag, default_level)]
        detail.append(dict(images=f"SR ({tag}) of the base images", level=default_level,
                           consistency_psnr=_nanmean(consistency_psnr(y, low)),
                           high_frequency=_nanmean(high_frequency_fraction(y, low_size))))
    detail.append(dict(images="bicubic of the base images", level=None,
                       consistency_psnr=_nanmean(consistency_psnr(bicubic_b, low)),
                       high_frequency=_nanmean(high_frequency_fraction(bicubic_b, low_size))))
    detail.append(dict(images=f"real {size}x{size} test images", level=None,
                       consistency_psnr=None,
                       high_frequency=_nanmean(high_frequency_fraction(real64_test, low_size))))

    # 6. speed, at the default level.
    r0 = base_row["images_per_s"]
    speed = [dict(stage="base", workdir=base.workdir, images_per_s=r0)]
    for tag, _, _ in sr_models:
        r1 = next(r["images_per_s"] for r in sweeps[tag]["rows"] if r["level"] == default_level)
        speed.append(dict(stage=f"SR ({tag}) at s = {default_level:g}",
                          workdir=sweeps[tag]["workdir"], images_per_s=r1))
        speed.append(dict(stage=f"cascade base + SR ({tag})", workdir=None,
                          images_per_s=(1.0 / (1.0 / r0 + 1.0 / r1)) if r0 and r1 else None))

    results = dict(
        experiment="cascade", seed=seed, prompts=prompts, num_per_prompt=num_per_prompt,
        base=dict(workdir=base.workdir, checkpoint_step=base.step, params=base.kind,
                  sampler=models.base_options.sampler, steps=models.base_options.num_steps,
                  thresholding=models.base_options.thresholding or "none", guidance=w_base),
        levels=levels, default_level=default_level,
        evaluator_accuracy={str(bcfg.data.image_size): scorer16.ev.accuracy,
                            str(size): scorer64.ev.accuracy},
        base_row=base_row, bicubic_row=bicubic_row, real_row64=real_row64, sweeps=sweeps,
        real_floor=floor64,
        real_floor_16=floor16, thresholding=thresh,
        real_saturation_16=saturation(real16), real_inputs=real_rows, consistency=detail,
        speed=speed, single_model=None,
        single_model_note=("no single 64x64 model was trained: cascade vs single model is left "
                           "to the caller"))
    md = _markdown(results, scorer64.ev.kind == "shapes")
    common.write_results(out, results, md)
    _plot_levels(sweeps, floor64, bicubic_row, os.path.join(out, "plot_augmentation.png"))
    _plot_thresholding(thresh, results["real_saturation_16"],
                       os.path.join(out, "plot_thresholding.png"))
    return results


def _markdown(res: dict, shapes: bool) -> str:
    b = res["base"]
    keys = ["fd", "alignment"] + (["alignment_seen", "alignment_heldout"] if shapes else [])
    md = (f"cascade: base {b['workdir']} step {b['checkpoint_step']} ({b['sampler']} "
          f"{b['steps']} steps, w = {b['guidance']:g}, thresholding {b['thresholding']}); "
          f"{len(res['prompts'])} prompts x {res['num_per_prompt']} images; seed {res['seed']}; "
          "evaluator accuracy "
          + ", ".join(f"{k}px {fmt(v)}" for k, v in res["evaluator_accuracy"].items()) + "\n")
    for tag, sw in res["sweeps"].items():
        md += (f"SR ({tag}): {sw['workdir']} step {sw['checkpoint_step']}, trained with "
               f"s ~ U[0, {sw['max_train_level']:g}), {sw['sampler']} {sw['steps']} steps, "
               f"w = {sw['guidance']:g}\n")
    md += "\n## 1-2. Augmentation level at 64x64 (the SR on the base's images)\n\n"
    rows = [[f"SR ({tag})", f"{r['level']:g}" + (" (default)" if r["level"] ==
                                                 res["default_level"] else "")]
            + [r.get(k) for k in keys] for tag, sw in res["sweeps"].items() for r in sw["rows"]]
    rows.append(["bicubic (no SR)", "-"] + [res["bicubic_row"].get(k) for k in keys])
    f = res["real_floor"]
    rows.append(["real (train)", "-"] + [f.get(k) for k in keys])
    rows.append(["real test images, their captions", "-"]
                + [res["real_row64"].get(k) for k in keys])
    md += markdown_table(["model", "level s"] + keys, rows)
    br = res["base_row"]
    md += ("\nbase images at 16x16 (16px evaluator): "
           + ", ".join(f"{k} {fmt(br.get(k))}" for k in keys)
           + f". real (train) at 64: {f['repeats']} random subsets of n = {f['n']} training "
           f"images; FD sd {fmt(f['fd_sd'])}.\n")
    if "noaug" in res["sweeps"] and res["sweeps"]["noaug"]["max_train_level"] > 0:
        md += ("\nwarning: the --sr_noaug model was trained WITH augmentation (max_train_level "
               f"{res['sweeps']['noaug']['max_train_level']:g}): this is not the ablation.\n")
    md += "\n## 3. Thresholding of the base (16x16)\n\n"
    md += markdown_table(
        ["thresholding", "w", "saturation"] + keys,
        [[th, f"{r['w']:g}", r["saturation"]] + [r.get(k) for k in keys]
         for th, table in res["thresholding"].items() for r in table]
        + [["real", "-", res["real_saturation_16"]] + [res["real_floor_16"].get(k) for k in keys]])
    md += ("\nsaturation: the fraction of pixel values at 255 (clipped at the top; the palette's "
           "largest value is 235, so real shapes have none). Values at 0 are not counted: the "
           "background is 0.\n")
    md += "\n## 4. The SR alone on real images (box-downsampled to 16, against the real 64x64)\n\n"
    md += markdown_table(["split", "n", "method", "level s", "PSNR (dB)", "SSIM"],
                         [[r["split"], r["n"], r["method"],
                           "-" if r["level"] is None else f"{r['level']:g}", r["psnr"], r["ssim"]]
                          for r in res["real_inputs"]])
    md += ("\nimages as uint8 / 255; SSIM: Gaussian 11x11 window, sigma 1.5, valid positions "
           "(t2i_jax/evaluation/image_metrics.py). heldout: scenes with colour-shape pairs the "
           "models never trained on.\n")
    md += f"\n## 5. Consistency with the input, and detail (level {res['default_level']:g})\n\n"
    md += markdown_table(["images", "PSNR(downsample(x), input) (dB)", "high-frequency fraction"],
                         [[r["images"], r["consistency_psnr"], r["high_frequency"]]
                          for r in res["consistency"]])
    md += ("\nhigh-frequency fraction: mean (x - bilinear_up(box_down(x)))^2 / var(x) per image, "
           "averaged.\n")
    md += "\n## 6. Speed (steady state, after each job's first call)\n\n"
    md += markdown_table(["stage", "images/s"], [[r["stage"], r["images_per_s"]]
                                                  for r in res["speed"]])
    md += ("\ncascade: 1 / (1/r_base + 1/r_SR). \"-\": the job was already done before this run "
           "or ran in a single call (no steady-state rate; lower --batch_size).\n")
    md += ("\n## 7. Cascade vs a single 64x64 model\n\nnone was trained: no single-model row "
           "(left to the caller).\n")
    return md


def _plot_levels(sweeps, floor, bicubic_row, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for k, (tag, sw) in enumerate(sweeps.items()):
        s = [r["level"] for r in sw["rows"]]
        label = "SR with augmentation" if tag == "aug" else "SR without augmentation"
        a.plot(s, [r["fd"] for r in sw["rows"]], "o-", c=f"C{k}", label=label)
        b.plot(s, [r["alignment"] for r in sw["rows"]], "o-", c=f"C{k}", label=f"{label}")
        seen = [r.get("alignment_seen") for r in sw["rows"]]
        held = [r.get("alignment_heldout") for r in sw["rows"]]
        if any(v is not None for v in held):
            b.plot(s, [np.nan if v is None else v for v in seen], "s:", c=f"C{k}", alpha=0.7,
                   label=f"{tag}: seen pairs")
            b.plot(s, [np.nan if v is None else v for v in held], "^--", c=f"C{k}", alpha=0.7,
                   label=f"{tag}: held-out pairs")
    a.axhline(floor["fd"], ls="--", c="gray", label="real data (same n)")
    a.axhline(bicubic_row["fd"], ls=":", c="black", label="bicubic (no SR)")
    a.set_xlabel("augmentation level s at sampling")
    a.set_ylabel("FD at 64 (classifier features)")
    a.set_title("CDM: noise-conditioning augmentation")
    a.legend(fontsize=8)
    b.set_xlabel("augmentation level s at sampling")
    b.set_ylabel("alignment")
    b.set_ylim(0, 1.02)
    b.legend(fontsize=7)
    fig.tight_layout()
    common.save_fig(fig, path)


def _plot_thresholding(thresh, real_saturation, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for k, (th, table) in enumerate(thresh.items()):
        w = [r["w"] for r in table]
        a.plot(w, [r["saturation"] for r in table], "o-", c=f"C{k}", label=th)
        b.plot(w, [r["alignment"] for r in table], "o-", c=f"C{k}", label=th)
    a.axhline(real_saturation, ls="--", c="gray", label="real data")
    a.set_xlabel("guidance weight w")
    a.set_ylabel("fraction of pixel values at 255")
    a.set_title("Imagen: static vs dynamic thresholding")
    a.legend()
    b.set_xlabel("guidance weight w")
    b.set_ylabel("alignment")
    b.set_ylim(0, 1.02)
    b.legend()
    fig.tight_layout()
    common.save_fig(fig, path)


def run(a) -> int:
    """The command (behind reproduce's error boundary): the models are loaded and checked
    before OUT is locked or written, then the reproduction runs under the lock."""
    common.tuned_quiet_jax()
    models = load_models(a.workdir, a.sr, a.sr_noaug, steps=a.steps, sr_steps=a.sr_steps)
    if models.sr_noaug is not None and _max_train_level(models.sr_noaug) > 0:
        print(f"[t2i_jax] warning: --sr_noaug {models.sr_noaug.workdir} was trained with "
              f"augmentation (sr.max_train_level = {_max_train_level(models.sr_noaug):g}); the "
              "ablation needs sr.max_train_level=0.", file=sys.stderr)
    with files.ExclusiveLock(a.out, common.LOCK_WHAT, common.LOCK_ADVICE):
        reproduce_cascade(models, a.out, num_per_prompt=a.num_per_prompt, seed=a.seed,
                          batch_size=a.batch_size, progress=not a.no_progress)
    print(open(os.path.join(a.out, "table.md"), encoding="utf-8").read())
    print(f"[t2i_jax] wrote {a.out}/table.md, plot_augmentation.png, plot_thresholding.png, "
          "results.json", file=sys.stderr)
    return 0
