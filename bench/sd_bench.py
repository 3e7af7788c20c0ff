"""Stable Diffusion 1.5 at full size on this machine: the Flax ports against diffusers (torch).

    python bench/sd_bench.py --make                      # once: random SD 1.5 unet/ + vae/ folders
    python bench/sd_bench.py --jax --torch [--sizes 32 64] [--repeats 3] \\
        [--folder /tmp/sd15_random] [--torch_python /tmp/oracle/venv/bin/python]
    python bench/sd_bench.py                             # the table again, from the saved results

Weights are random (speed does not depend on them; nothing is downloaded). --make runs
bench/sd_bench_torch.py with --torch_python: diffusers builds UNet2DConditionModel and
AutoencoderKL with SD 1.5's configs (seeded) and save_pretrained's them, float32 safetensors, to
FOLDER/unet and FOLDER/vae (3.4 GB + 0.3 GB). --jax (this interpreter; torch is never imported
here) reads them with unet2d_condition.load / autoencoder_kl.load, each first in a fresh process
for its time and memory (VmHWM after the imports and after `load`, VmRSS after it and after
jax.device_put), then
jits and times: one UNet evaluation on batch 2 (a CFG pair) at each --sizes latent; alone, the
UNet's largest attention (size*size positions, 8 heads of 40: layers.attention with --attention
against torch's scaled_dot_product_attention, which diffusers calls); one VAE decode of a 64x64
latent to 512x512. Compilation (lower + compile) is timed apart, then one first call and
--repeats timed calls (jax.block_until_ready). --torch does the same with
diffusers under torch.inference_mode(), float32, torch.set_num_threads(--threads, default all
CPUs, which is what XLA's CPU client uses). Both write FOLDER/results/{jax,torch}.json and their
outputs, so the sides can run apart.

Prints the machine, then a markdown table per measurement: JAX min / median seconds, torch min /
median, the ratios JAX/torch, and the largest |JAX - torch| of the outputs relative to the
largest |torch| (the same model was timed); then the loads' seconds and peak RSS; the last line
is everything as JSON. Other processes share the CPUs: the load averages before and after each
side are printed, and the min of the repeats is the figure least disturbed by them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from t2i_jax.xla_flags import apply_tuned_flags  # noqa: E402

apply_tuned_flags()

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def peak_rss_gib(field: str = "VmHWM") -> float:
    """VmHWM of this process (the most resident memory it has had; VmRSS: now), GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def inputs(size: int, batch: int = 2):
    """The benchmark's inputs, NHWC numpy (seeded; sd_bench_torch.py makes the same ones)."""
    rng = np.random.RandomState(0)
    sample = rng.standard_normal((batch, size, size, 4)).astype(np.float32)    # [B, h, w, 4]
    context = rng.standard_normal((batch, 77, 768)).astype(np.float32)         # [B, 77, 768]
    return sample, np.full((batch,), 500, np.int32), context


# SD 1.5's UNet attends over all h*w latent positions with 8 heads of 320 / 8 = 40 channels in
# down_blocks[0] (2 transformers) and up_blocks[3] (3): the largest attention of a step.
ATTENTION_ROW = "self-attention, top level (5 per UNet step)"


def attention_inputs(size: int, batch: int = 2):
    """q, k, v [B, size*size, 8, 40] numpy (sd_bench_torch.py makes the same ones)."""
    rng = np.random.RandomState(1)
    return tuple(rng.standard_normal((batch, size * size, 8, 40)).astype(np.float32)
                 for _ in range(3))


def _port(name: str):
    from t2i_jax.models import autoencoder_kl, unet2d_condition
    return unet2d_condition if name == "unet" else autoencoder_kl


def load_only(folder: str, name: str) -> None:
    """Prints {load_s, put_s, rss_before_gib, peak_rss_gib, rss_load_gib, rss_put_gib} in this
    process. The peak of `load` counts the memory-mapped file's pages too (released when it
    returns: rss_load); device_put copies, relaying out the lazily transposed kernels (put_s)."""
    import jax
    port = _port(name)
    jax.devices()
    before = peak_rss_gib()
    t0 = time.perf_counter()
    _, params = port.load(os.path.join(folder, name))
    load_s = time.perf_counter() - t0
    peak, now = peak_rss_gib(), peak_rss_gib("VmRSS")
    t0 = time.perf_counter()
    params = jax.block_until_ready(jax.device_put(params))
    put_s = time.perf_counter() - t0
    print(json.dumps(dict(load_s=load_s, put_s=put_s, rss_before_gib=before, peak_rss_gib=peak,
                          rss_load_gib=now, rss_put_gib=peak_rss_gib("VmRSS"))))


def timed(fn, args, repeats: int):
    """(compile s, first-call s, [s of each later call], output) of jax.jit(fn) on args."""
    import jax
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, first, times, np.asarray(out)


def run_jax(a) -> None:
    import jax
    from t2i_jax.models import autoencoder_kl, unet2d_condition
    from t2i_jax.models.layers import attention
    res = dict(jax=jax.__version__, backend=jax.devices()[0].platform,
               xla_flags=os.environ.get("XLA_FLAGS", ""), attention=a.attention,
               loadavg_before=os.getloadavg(), rows=[], loads={})
    out_dir = os.path.join(a.folder, "results")
    os.makedirs(out_dir, exist_ok=True)
    for name in ("unet", "vae"):
        p = subprocess.run([sys.executable, __file__, "--load_only", name, "--folder", a.folder],
                           capture_output=True, text=True, check=True)
        res["loads"][name] = json.loads(p.stdout.strip().splitlines()[-1])
        print(name, "load", res["loads"][name], file=sys.stderr, flush=True)

    cfg, params = unet2d_condition.load(os.path.join(a.folder, "unet"))
    cfg = dataclasses.replace(cfg, attention_impl=a.attention)
    params = jax.device_put(params)
    unet = unet2d_condition.UNet2DConditionModel(cfg)
    for size in a.sizes:
        args = (params,) + tuple(jax.device_put(x) for x in inputs(size))
        compile_s, first, times, out = timed(unet.apply, args, a.repeats)
        assert out.shape == (2, size, size, 4), out.shape
        np.save(os.path.join(out_dir, f"jax_unet_{size}.npy"), out)
        res["rows"].append(dict(what="UNet step (CFG pair)", shape=f"2x{size}x{size}x4",
                                compile_s=compile_s, first_s=first, times=times))
        print(res["rows"][-1], file=sys.stderr, flush=True)
    del params, args
    for size in a.sizes:  # the attention at the top level (5 of them per step), alone
        q, k, v = (jax.device_put(x) for x in attention_inputs(size))
        attend = functools.partial(attention, mask=None, impl=a.attention)
        compile_s, first, times, out = timed(attend, (q, k, v), a.repeats)
        res["rows"].append(dict(what=ATTENTION_ROW, shape="x".join(map(str, q.shape)),
                                compile_s=compile_s, first_s=first, times=times))
        print(res["rows"][-1], file=sys.stderr, flush=True)

    cfg, params = autoencoder_kl.load(os.path.join(a.folder, "vae"))
    params = jax.device_put(params)
    decode = functools.partial(autoencoder_kl.AutoencoderKL(cfg).apply, method="decode")
    z = jax.device_put(inputs(64, batch=1)[0])                                  # [1, 64, 64, 4]
    compile_s, first, times, out = timed(decode, (params, z), a.repeats)
    assert out.shape == (1, 512, 512, 3), out.shape
    np.save(os.path.join(out_dir, "jax_vae.npy"), out)
    res["rows"].append(dict(what="VAE decode", shape="1x64x64x4 -> 512x512",
                            compile_s=compile_s, first_s=first, times=times))
    print(res["rows"][-1], file=sys.stderr, flush=True)
    res["loadavg_after"] = os.getloadavg()
    with open(os.path.join(out_dir, "jax.json"), "w") as f:
        json.dump(res, f, indent=1)


def run_torch(a, *what: str) -> None:
    """Runs sd_bench_torch.py with the torch interpreter (this process never imports torch)."""
    cmd = [a.torch_python, os.path.join(HERE, "sd_bench_torch.py"), *what, "--folder", a.folder,
           "--sizes", *map(str, a.sizes), "--repeats", str(a.repeats), "--threads", str(a.threads)]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def _read(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _diff(out_dir: str, row: dict) -> str:
    """max |JAX - torch| / max |torch| of the row's saved outputs, or '' where one is missing."""
    if row["what"] == ATTENTION_ROW:
        return ""
    stem = "vae" if row["what"].startswith("VAE") else "unet_" + row["shape"].split("x")[1]
    paths = [os.path.join(out_dir, f"{side}_{stem}.npy") for side in ("jax", "torch")]
    if not all(os.path.isfile(p) for p in paths):
        return ""
    x, y = (np.load(p).astype(np.float64) for p in paths)
    return f"{np.max(np.abs(x - y)) / np.max(np.abs(y)):.1e}"


def print_table(folder: str) -> None:
    out_dir = os.path.join(folder, "results")
    jx, th = _read(os.path.join(out_dir, "jax.json")), _read(os.path.join(out_dir, "torch.json"))
    if not (jx or th):
        sys.exit(f"no results in {out_dir}: run with --jax and/or --torch first.")
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 2**20
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{mem:.1f} GiB RAM; weights: {folder} (random, float32)")
    if jx:
        print(f"JAX {jx['jax']} on {jx['backend']}, XLA_FLAGS={jx['xla_flags']!r}, attention_impl="
              f"{jx['attention']}; load averages before {jx['loadavg_before']}, after "
              f"{jx['loadavg_after']}")
    if th:
        print(f"torch {th['torch']}, {th['threads']} threads, inference_mode; load averages before "
              f"{th['loadavg_before']}, after {th['loadavg_after']}")
    print("Other jobs share these CPUs: min is the figure they disturb least; ratio = JAX/torch.")
    keys = {(r["what"], r["shape"]): r for r in (jx or th)["rows"]}
    for r in (th or {}).get("rows", []):
        keys.setdefault((r["what"], r["shape"]), r)
    find = lambda side, k: next((r for r in (side or {}).get("rows", [])  # noqa: E731
                                 if (r["what"], r["shape"]) == k), None)
    f = lambda x: "" if x is None else f"{x:.2f}"  # noqa: E731
    rows = []
    for k in keys:
        j, t = find(jx, k), find(th, k)
        jmin, jmed = (min(j["times"]), statistics.median(j["times"])) if j else (None, None)
        tmin, tmed = (min(t["times"]), statistics.median(t["times"])) if t else (None, None)
        rows.append(dict(what=k[0], shape=k[1], n=len((j or t)["times"]),
                         jax_compile_s=j and j["compile_s"], jax_first_s=j and j["first_s"],
                         jax_min_s=jmin, jax_median_s=jmed, torch_first_s=t and t["first_s"],
                         torch_min_s=tmin, torch_median_s=tmed,
                         ratio_min=jmin / tmin if j and t else None,
                         ratio_median=jmed / tmed if j and t else None,
                         rel_diff=_diff(out_dir, k and {"what": k[0], "shape": k[1]})))
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(v if isinstance(v, str) else str(v) if isinstance(v, int) else f(v)
                                for v in r.values()) + " |")
    print()
    loads = []
    for name in ("unet", "vae"):
        jl, tl = (jx or {}).get("loads", {}).get(name), (th or {}).get("loads", {}).get(name)
        loads.append(dict(load=name, jax_load_s=jl and jl["load_s"],
                          jax_rss_before_GiB=jl and jl["rss_before_gib"],
                          jax_peak_rss_GiB=jl and jl["peak_rss_gib"],
                          jax_rss_after_load_GiB=jl and jl.get("rss_load_gib"),
                          jax_device_put_s=jl and jl["put_s"],
                          jax_rss_after_put_GiB=jl and jl.get("rss_put_gib"),
                          torch_from_pretrained_s=tl and tl["load_s"],
                          torch_rss_before_GiB=tl and tl["rss_before_gib"],
                          torch_peak_rss_GiB=tl and tl["peak_rss_gib"],
                          torch_touch_s=tl and tl.get("touch_s"),
                          torch_peak_rss_touched_GiB=tl and tl.get("peak_rss_touched_gib")))
    cols = list(loads[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in loads:
        print("| " + " | ".join(v if isinstance(v, str) else f(v) for v in r.values()) + " |")
    print("(a fresh process each: rss_before after its imports; peak RSS = VmHWM after loading, "
          "the memory-mapped file's pages included; rss_after_load / _put = VmRSS then (after "
          "device_put the host copies are dropped). torch's from_pretrained leaves the weights "
          "on the memory-mapped file: 'touched' is after reading every parameter once)")
    facts = lambda side: side and {k: v for k, v in side.items()  # noqa: E731
                                   if k not in ("rows", "loads")}
    print(json.dumps(dict(rows=rows, loads=loads, jax=facts(jx), torch=facts(th))))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--folder", default="/tmp/sd15_random", help="holds unet/, vae/, results/")
    p.add_argument("--make", action="store_true", help="write random SD 1.5 unet/ and vae/ (torch)")
    p.add_argument("--jax", action="store_true", help="time the Flax ports")
    p.add_argument("--torch", action="store_true", help="time diffusers (with --torch_python)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="UNet latent sizes")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch's threads")
    p.add_argument("--attention", default="einsum", choices=("einsum", "dot_product"),
                   help="the UNet's attention_impl (its config default: einsum)")
    p.add_argument("--torch_python", default="/tmp/oracle/venv/bin/python",
                   help="an interpreter with torch and diffusers")
    p.add_argument("--load_only", choices=("unet", "vae"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.load_only:
        return load_only(a.folder, a.load_only)
    if a.make:
        run_torch(a, "--make")
    if a.torch:
        run_torch(a, "--time")
    if a.jax:
        run_jax(a)
    print_table(a.folder)


if __name__ == "__main__":
    main()
