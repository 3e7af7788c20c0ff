"""Sampling throughput (images/s) of a config's model: the generate function sample.py runs.

    python bench/sample_throughput.py --config configs/digits.py [--steps 50] [--guidance 2]
        [--batch_sizes 10,25,50,100] [--workdir runs/digits] [--repeats 3]

For each batch size: seconds per batch and images/s, guided (two model rows per image per step)
and unguided (w = 0, one row), compilation excluded (one warm-up call first). Without --workdir
the parameters are the config's random initialisation (speed does not depend on the weights).
Prints a markdown table; the last line is the table as JSON.
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/digits.py")
    p.add_argument("--workdir", help="take the config and EMA parameters of this training run")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--batch_sizes", default="10,25,50,100")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    from t2i_jax.config_utils import load_config
    from t2i_jax.sampling.generate import SampleOptions, make_generate_fn
    from t2i_jax import families
    if a.workdir:
        from t2i_jax.sampling.load import load_trained
        trained = load_trained(a.workdir)
        exp, params = trained.family, trained.params
    else:
        exp = families.build(load_config(a.config))
        params = exp.init_params(jax.random.key(0))
    cfg = exp.config
    options = SampleOptions.from_config(cfg.sample)
    options = SampleOptions(a.sampler, a.steps, options.eta, options.thresholding, options.spacing)
    prompts = exp.grid_prompts()
    rows = []
    for guided in (True, False):
        gen = make_generate_fn(exp, options, guided)
        for b in (int(s) for s in a.batch_sizes.split(",")):
            cond = exp.conditioning.of_prompts([prompts[i % len(prompts)] for i in range(b)])
            ids = jnp.arange(b)
            rng = jax.random.key(0)
            t0 = time.perf_counter()
            jax.block_until_ready(gen(params, cond, rng, a.guidance, ids))
            compile_s = time.perf_counter() - t0
            times = []
            for r in range(a.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(gen(params, cond, jax.random.key(r + 1), a.guidance, ids))
                times.append(time.perf_counter() - t0)
            best = min(times)
            rows.append(dict(guided=guided, batch=b, seconds=best, images_per_s=b / best,
                             first_call_s=compile_s))
            print(f"guided={guided} batch={b}: {best:.3f} s/batch, {b / best:.2f} img/s "
                  f"(first call {compile_s:.1f} s)", file=sys.stderr, flush=True)
    print(f"\n{a.sampler} {a.steps} steps, w = {a.guidance} (guided rows) on "
          f"{jax.devices()[0].device_kind} x{jax.device_count()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, jax {jax.__version__}\n")
    print("| guidance | batch | s / batch | images / s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {'w = %g' % a.guidance if r['guided'] else 'none (w = 0)'} | {r['batch']} | "
              f"{r['seconds']:.3f} | {r['images_per_s']:.2f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
