"""What the lax.scan sampler costs on top of the model calls it makes.

For a cheap denoise_fn (elementwise) and a small convolutional one, and for each sampler with
and without classifier-free guidance, prints seconds per step of `samplers.sample` next to the
same number of bare denoise_fn calls (a lax.scan that feeds each output back in, on the same
batch: B rows, or 2B with guidance), and the overhead. Run by hand:

    python bench/sampler_overhead.py [--batch 16] [--size 32] [--steps 50] [--repeats 7]

The last line is the table as JSON. Target: under 3% overhead for the convolutional function.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from t2i_jax.diffusion import make_schedule, samplers  # noqa: E402


def cheap_denoise(x, t, cond):
    """An elementwise stand-in: a few flops per pixel."""
    scale = (t.astype(x.dtype) / 1000.0 + cond.astype(x.dtype) * 0.01)[:, None, None, None]
    return jnp.tanh(x) * scale


def make_conv_denoise(channels: int = 64, seed: int = 0):
    """A small convolutional net: 3x3 convs 3 -> C -> C -> 3 with SiLU, time and label as biases."""
    k = jax.random.split(jax.random.key(seed), 4)
    w1 = jax.random.normal(k[0], (3, 3, 3, channels)) * 0.2
    w2 = jax.random.normal(k[1], (3, 3, channels, channels)) * (1 / (3 * channels ** 0.5))
    w3 = jax.random.normal(k[2], (3, 3, channels, 3)) * (1 / (3 * channels ** 0.5))
    emb = jax.random.normal(k[3], (2, channels)) * 0.1
    conv = lambda h, w: jax.lax.conv_general_dilated(
        h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def denoise(x, t, cond):
        bias = (t.astype(x.dtype)[:, None] / 1000.0 * emb[0] + cond.astype(x.dtype)[:, None] * emb[1])
        h = jax.nn.silu(conv(x, w1) + bias[:, None, None, :])
        h = jax.nn.silu(conv(h, w2))
        return conv(h, w3)

    return denoise


def _time_pair(fn_a, args_a, fn_b, args_b, repeats: int):
    """Returns the fastest of `repeats` runs of each, alternating a and b so that both see the
    same machine load (the minimum estimates the cost; the median mostly measures noise)."""
    jax.block_until_ready(fn_a(*args_a))  # compile and warm up
    jax.block_until_ready(fn_b(*args_b))
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, args, times in ((fn_a, args_a, times_a), (fn_b, args_b, times_b)):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - start)
    return min(times_a), min(times_b)


def measure(denoise, schedule, batch, size, steps, sampler, guided, repeats):
    x_T = samplers.initial_noise(jax.random.key(0), (batch, size, size, 3))
    cond = jnp.arange(batch, dtype=jnp.int32) % 10
    null = jnp.full((1,), -1, jnp.int32)
    rng = jax.random.key(1)
    kw = dict(sampler=sampler, num_steps=steps, eta=1.0 if sampler == "ddim" else 0.0)

    @jax.jit
    def run_sampler(x_T, cond, w, rng):
        if guided:
            return samplers.sample(denoise, schedule, x_T, cond=cond, null_cond=null,
                                   guidance_weight=w, rng=rng, **kw)
        return samplers.sample(denoise, schedule, x_T, cond=cond, rng=rng, **kw)

    rows = 2 * batch if guided else batch
    ts = jnp.asarray(samplers.timesteps(schedule, steps))

    @jax.jit
    def run_bare(x, cond):
        def body(x, t):
            return denoise(x, jnp.full((rows,), t, jnp.int32), cond).astype(x.dtype), None
        return jax.lax.scan(body, x, ts)[0]

    bare_x = jnp.concatenate([x_T, x_T]) if guided else x_T
    bare_cond = jnp.concatenate([cond, jnp.broadcast_to(null, cond.shape)]) if guided else cond
    t_sampler, t_bare = _time_pair(run_sampler, (x_T, cond, jnp.float32(3.0), rng),
                                   run_bare, (bare_x, bare_cond), repeats)
    return t_sampler / steps, t_bare / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16, help="images per sampling batch (B)")
    p.add_argument("--size", type=int, default=32, help="image height and width")
    p.add_argument("--steps", type=int, default=50, help="sampler steps per run")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per cell (the fastest counts)")
    p.add_argument("--channels", type=int, default=64, help="width of the conv net")
    args = p.parse_args(argv)
    if min(args.batch, args.size, args.steps, args.repeats, args.channels) < 1:
        p.error("--batch, --size, --steps, --repeats and --channels must be positive")

    schedule = make_schedule("linear", 1000)
    functions = {"cheap": cheap_denoise, "conv": make_conv_denoise(args.channels)}
    print(f"# jax {jax.__version__} on {jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores); B={args.batch}, {args.size}x{args.size}x3, {args.steps} steps, "
          f"fastest of {args.repeats}")
    header = (f"{'denoise_fn':<10} {'sampler':<9} {'guidance':<9} {'sampler s/step':>15} "
              f"{'bare s/step':>12} {'overhead':>9}")
    print(header)
    print("-" * len(header))
    results = []
    for fname, fn in functions.items():
        for sampler in samplers.SAMPLERS:
            for guided in (False, True):
                t_s, t_b = measure(fn, schedule, args.batch, args.size, args.steps, sampler, guided,
                                   args.repeats)
                overhead = t_s / t_b - 1.0
                results.append(dict(denoise_fn=fname, sampler=sampler, guidance=guided,
                                    sampler_s_per_step=t_s, bare_s_per_step=t_b, overhead=overhead))
                print(f"{fname:<10} {sampler:<9} {('on (2B)' if guided else 'off'):<9} "
                      f"{t_s:>15.6f} {t_b:>12.6f} {overhead:>8.1%}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
