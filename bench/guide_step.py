"""Seconds per sampling step with each guide, against classifier-free guidance alone.

    python bench/guide_step.py [--sizes digits,shapes] [--batch 32] [--steps 20] [--repeats 3]

A gradient guide adds, per step, a forward and a backward pass through the guide's network at
x_t (eps~ = eps - sqrt(1 - abar_t) * s * grad_x f(x_t, t)); CLIP image guidance adds a second
forward pass of the image tower for the noised reference. Rows, per size (the same generate
function sample.py runs, one warm-up call excluded):
  unguided        w = 0: one model row per image per step
  CFG             w = 2: conditional + null rows
  CFG + classifier / + CLIP text / + CLIP text + image / + all three
Sizes: digits (configs/digits.py with digits_classifier.py and digits_clip.py: 16x16x1) and
shapes (configs/shapes.py with shapes_clip.py, and digits_classifier.py's network at shapes'
32x32x3: shapes has no classes). Weights are each config's random initialisation (speed does not
depend on them). Prints a markdown table; the last line is the table as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from t2i_jax.xla_flags import apply_tuned_flags  # noqa: E402

apply_tuned_flags()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SIZES = {"digits": ("digits.py", "digits_classifier.py", "digits_clip.py"),
         "shapes": ("shapes.py", "digits_classifier.py", "shapes_clip.py")}
GUIDE_SETS = (("unguided", False, ()), ("CFG", True, ()),
              ("CFG + classifier", True, ("classifier",)),
              ("CFG + CLIP text", True, ("clip_text",)),
              ("CFG + CLIP text + image", True, ("clip_text", "clip_image")),
              ("CFG + all three", True, ("classifier", "clip_text", "clip_image")))


def _trained(path, like=None):
    from t2i_jax import families
    from t2i_jax.config_utils import load_config
    from t2i_jax.sampling.load import Trained
    cfg = load_config(os.path.join(ROOT, "configs", path))
    if like is not None:  # the guide's network at the model's image size and channels
        cfg.data.image_size = like.data.image_size
        cfg.data.channels = like.data.channels
        for tower in ("image", "unet"):
            if tower in cfg.model and "out_channels" in cfg.model[tower]:
                cfg.model[tower].out_channels = like.data.channels
    fam = families.build(cfg)
    return Trained(fam, fam.init_params(jax.random.key(0)), 0, "ema", path)


def bench_size(size, batch, steps, repeats, w=2.0):
    from t2i_jax.sampling import guides as guides_lib
    from t2i_jax.sampling.generate import SampleOptions, make_generate_fn
    model_cfg, cls_cfg, clip_cfg = SIZES[size]
    model = _trained(model_cfg)
    classifier = _trained(cls_cfg, like=model.config)
    clip = _trained(clip_cfg, like=model.config)
    fam = model.family
    options = SampleOptions.from_config(fam.config.sample)
    options = SampleOptions(options.sampler, steps, options.eta, options.thresholding,
                            options.spacing)
    prompts = [fam.grid_prompts()[i % len(fam.grid_prompts())] for i in range(batch)]
    cond = fam.conditioning.of_prompts(prompts)
    labels = np.arange(batch) % len(classifier.family.conditioning.class_names)
    ref = np.zeros(fam.image_shape, np.float32)
    rows = []
    for name, guided, kinds in GUIDE_SETS:
        guides = []
        for k in kinds:
            g = classifier if k == "classifier" else clip
            guides.append(guides_lib.Guide(k, g, 1.0, None, ref if k == "clip_image" else None))
        gen = make_generate_fn(fam, options, guided, guides)
        g_rows = tuple(jnp.asarray(labels) if g.kind == "classifier"
                       else jax.tree_util.tree_map(jnp.asarray, g.rows(prompts)) for g in guides)
        args = (tuple(g.trained.params for g in guides), g_rows,
                jnp.ones((len(guides),), jnp.float32))
        call = lambda r: gen(model.params, cond, jax.random.key(r), w, jnp.arange(batch), *args)  # noqa: E731
        t0 = time.perf_counter()
        jax.block_until_ready(call(0))
        first = time.perf_counter() - t0
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(call(r + 1))
            times.append(time.perf_counter() - t0)
        best = min(times)
        rows.append(dict(size=size, image=list(fam.image_shape), guides=name, batch=batch,
                         steps=steps, seconds_per_step=best / steps, first_call_s=first))
        print(f"{size} {name}: {best / steps * 1e3:.1f} ms/step (first call {first:.1f} s)",
              file=sys.stderr, flush=True)
    base = next(r["seconds_per_step"] for r in rows if r["guides"] == "CFG")
    for r in rows:
        r["vs_cfg"] = r["seconds_per_step"] / base
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="digits,shapes")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    sizes = a.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        p.error(f"unknown sizes {unknown}; choose from {sorted(SIZES)}.")
    rows = [r for s in sizes for r in bench_size(s, a.batch, a.steps, a.repeats)]
    print(f"\nbatch {a.batch}, {a.steps} DDIM steps, on {jax.devices()[0].device_kind} "
          f"x{jax.device_count()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, jax {jax.__version__}\n")
    print("| size | guides | ms / step | vs CFG alone |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} {'x'.join(map(str, r['image']))} | {r['guides']} | "
              f"{r['seconds_per_step'] * 1e3:.1f} | {r['vs_cfg']:.2f}x |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
