"""Stable Diffusion fine-tuning steps on this machine: full / bf16+remat / caches / LoRA.

    python bench/sd_finetune_bench.py [--batch_size 8] [--steps 10] [--warmup 2] \\
        [--variants full_fp32 lora_r4 ...] [--folder SD_FOLDER --image_size 64]

Builds each variant as train.py would (families.build through training.loop.Run, the data
iterator of data.make_train_iterator with the family's text_cache() and latent_cache(), the
state placed from the folder's weights and make_train_step jitted with the loop's shardings and
donation, the frozen hparams placed once) on one device, then measures:
  step ms       median (and min) of --steps calls after --warmup (compile excluded;
                block_until_ready on the new state and the metrics), on batches read beforehand
                (the pipeline's threads do not share the CPUs with the step);
  images/s      batch_size / step;
  compile s     lower + compile of the step;
  data ms       median time of the grain iterator's next() for that variant, back to back after
                two warm-up batches (its prefetch threads running; nothing else running);
  batch MB      bytes the step receives per batch (family.batch_keys of the iterator's dict);
  frozen MB     bytes of the step's hparams (frozen VAE / CLIP / base UNet), placed once;
  GFLOP         XLA's cost analysis of the compiled step;
  XLA temp MB   the compiled step's temporaries (memory_analysis);
  ckpt bytes    params + EMA + opt_state of the TrainState (what a checkpoint holds, less the
                step counter and key).
The default folder is the tiny SD 1.x of tests/fixtures/sd on the embedded digits at 64x64 RGB
(tests/tiny_families.py: get_config("sd_finetune")); --folder trains another diffusers folder
on the same data at --image_size. The caches are built (timed, reported apart) in --cache_dir,
a temporary directory by default (removed at the end). Unless XLA_FLAGS is set, the tuned CPU
flags of t2i_jax/xla_flags.py are applied. A table, notes, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from t2i_jax.xla_flags import apply_tuned_flags  # noqa: E402

apply_tuned_flags()

# name -> (model.dtype, model.remat, train.text_cache, train.latent_cache, train.lora.rank)
VARIANTS = {
    "full_fp32": ("float32", False, False, False, 0),
    "full_bf16_remat": ("bfloat16", True, False, False, 0),
    "full_fp32_text_cache": ("float32", False, True, False, 0),
    "full_fp32_latent_cache": ("float32", False, False, True, 0),
    "full_fp32_both_caches": ("float32", False, True, True, 0),
    "lora_r4_fp32": ("float32", False, False, False, 4),
    "lora_r4_fp32_both_caches": ("float32", False, True, True, 4),
}

NOTES = """\
Notes:
- text_cache: the CLIP features [77, D] (and pooled) of every training caption are computed once;
  the step no longer runs the text encoder's forward, and the encoder's parameters leave the
  step's inputs (hparams["text_encoder"]); the batch gains text_features [B, 77, D] instead.
- latent_cache: the VAE posterior's (mean, logvar) [h, w, 4] of every training image are
  computed once; the step no longer runs the VAE encoder's forward, and the VAE's parameters
  leave the step's inputs (hparams["vae"]); it still draws z = mean + exp(logvar / 2) eps itself.
  The pipeline still decodes and resizes every image and the step still receives it (batch key
  "image", unread): the cache adds the moments' lookup to the data loader rather than replacing
  the image.
- LoRA: the trained parameters (and so EMA, Adam's moments, the checkpoint) are the low-rank
  factors alone; the folder's UNet becomes a frozen hparam merged (W + (alpha / r) A B) inside
  every step, so the step still runs the whole UNet forward and backward (to the activations).
- bfloat16 with remat is expected to be slower on CPU: there is no native bf16 matmul / conv
  path (converts around float32 kernels) and remat recomputes each block's forward in the
  backward pass. Both are for accelerators' memory and throughput, not for this machine.
- The machine is shared: load averages are printed; the median is over --steps calls."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--data_batches", type=int, default=10, help="timed next() calls")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--folder", default=None, help="a diffusers SD folder (default: the tiny one)")
    p.add_argument("--image_size", type=int, default=64, help="the data's size (with --folder)")
    p.add_argument("--cache_dir", default=None, help="where the caches go (default: a temp dir)")
    a = p.parse_args(argv)
    if min(a.batch_size, a.steps, a.data_batches) < 1 or a.warmup < 0:
        p.error("--batch_size, --steps, --data_batches must be >= 1 and --warmup >= 0")
    return a


def variant_config(name: str, a, cache_dir: str):
    """The tiny sd_finetune config (tests/tiny_families.py) set up as variant `name`."""
    import tiny_families
    dtype, remat, text_cache, latent_cache, rank = VARIANTS[name]
    config = tiny_families.get_config("sd_finetune")
    if a.folder:
        config.model.pretrained = os.path.abspath(a.folder)
        config.data.image_size = a.image_size
    config.model.dtype, config.model.remat = dtype, remat
    tr = config.train
    tr.batch_size = a.batch_size
    tr.num_steps = a.warmup + a.steps + 1
    tr.text_cache, tr.text_cache_dir = text_cache, cache_dir
    tr.latent_cache, tr.latent_cache_dir = latent_cache, cache_dir
    tr.lora.rank, tr.lora.alpha = rank, 0.0   # alpha 0: alpha = rank
    return config


def nbytes(tree) -> int:
    import jax
    import numpy as np
    return int(sum(np.asarray(x).nbytes if not hasattr(x, "nbytes") else x.nbytes
                   for x in jax.tree_util.tree_leaves(tree)))


def measure(name: str, a, cache_dir: str) -> dict:
    import jax
    import numpy as np

    from t2i_jax import data as data_lib
    from t2i_jax import sharding as mesh_lib
    from t2i_jax.config_utils import check_train_config
    from t2i_jax.training.loop import Run
    from t2i_jax.training.state import init_state
    from t2i_jax.training.step import make_train_step

    config = variant_config(name, a, cache_dir)
    check_train_config(config)
    t0 = time.perf_counter()
    run = Run.from_config(config)
    family = run.family
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    text_cache, latent_cache = family.text_cache(), family.latent_cache()
    cache_s = time.perf_counter() - t0   # 0 where both were built already by an earlier variant
    iterator = data_lib.make_train_iterator(
        config.data, seed=config.seed, global_batch_size=a.batch_size,
        tokenizer=family.tokenizer, text_cache=text_cache, latent_cache=latent_cache,
        process_index=0, process_count=1)

    # the loop's state: shardings from eval_shape, the folder's weights placed (never compiled in)
    mesh = mesh_lib.make_mesh(1, jax.devices()[:1])
    root = jax.random.key(config.seed)
    abstract = jax.eval_shape(run.create_state, root)
    shardings = mesh_lib.state_shardings(abstract, mesh)
    pretrained = family.pretrained_params()
    if pretrained is None:
        state = jax.jit(run.create_state, out_shardings=shardings)(root)
    else:
        params = jax.tree_util.tree_map(mesh_lib.put, pretrained, shardings.params)
        state = jax.jit(lambda p, k: init_state(p, run.tx, jax.random.split(k)[1]),
                        out_shardings=shardings)(params, root)
    ckpt = dict(params=nbytes(state.params), ema=nbytes(state.ema_params),
                opt_state=nbytes(state.opt_state))

    hp_host = family.hparams()
    hp_shardings = jax.tree_util.tree_map(lambda x: mesh_lib.leaf_sharding(np.shape(x), mesh),
                                          hp_host)
    hp = jax.tree_util.tree_map(mesh_lib.put, hp_host, hp_shardings)
    frozen = {k: nbytes(v) for k, v in hp.items() if nbytes(v) > 64}

    # data: next() back to back (after two warm-up batches: threads start, files open)
    local = []
    for _ in range(2):
        local.append(next(iterator))
    data_times = []
    for _ in range(max(a.data_batches, a.warmup + a.steps + 1 - 2)):
        t0 = time.perf_counter()
        local.append(next(iterator))
        data_times.append(time.perf_counter() - t0)
    data_times = data_times[:a.data_batches]
    # The class's batch_keys: Family declares batch_keys as a dataclass field, so an instance
    # carries Family's default and StableDiffusion's latent_mean / latent_logvar would be
    # filtered out (training/loop.py's next_batch reads family.batch_keys: KeyError 'vae').
    keys = type(family).batch_keys
    batches = [mesh_lib.global_batch({k: v for k, v in b.items() if k in keys}, mesh)
               for b in local[:a.warmup + a.steps + 1]]
    batch_keys = sorted(batches[0])
    batch_bytes = nbytes(batches[0])

    step_fn = jax.jit(make_train_step(family, run.optim, run.tx),
                      in_shardings=(shardings, mesh_lib.batch_sharding(mesh), hp_shardings),
                      out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, batches[0], hp).compile()
        compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        mem = compiled.memory_analysis()
        for i in range(a.warmup + 1):   # the first call (allocation) and the warm-up
            state, metrics = jax.block_until_ready(compiled(state, batches[i], hp))
        times = []
        for i in range(a.steps):
            b = batches[a.warmup + 1 + i]
            t0 = time.perf_counter()
            state, metrics = jax.block_until_ready(compiled(state, b, hp))
            times.append(time.perf_counter() - t0)
    metrics = jax.device_get(metrics)
    if not metrics["finite"]:
        raise FloatingPointError(f"{name}: the step's loss or gradient is not finite: {metrics}")
    step_s = statistics.median(times)
    return dict(variant=name, step_ms=1e3 * step_s, min_step_ms=1e3 * min(times),
                images_per_s=a.batch_size / step_s, compile_s=compile_s,
                data_ms=1e3 * statistics.median(data_times), batch_bytes=batch_bytes,
                batch_keys=batch_keys, frozen_bytes=sum(frozen.values()), frozen=frozen,
                gflop=float(cost.get("flops", float("nan"))) / 1e9,
                temp_bytes=int(mem.temp_size_in_bytes) if mem is not None else None,
                ckpt_bytes=sum(ckpt.values()), ckpt=ckpt, cache_build_s=cache_s,
                build_s=build_s, loss=float(metrics["loss"]),
                trained_params=int(sum(x.size for x in jax.tree_util.tree_leaves(state.params))))


def print_table(rows: list, a) -> None:
    cols = ["variant", "step ms (median)", "min", "images/s", "compile s", "data ms/batch",
            "batch MB", "frozen inputs MB", "GFLOP/step", "XLA temp MB", "trained params",
            "ckpt bytes (params+ema+opt)"]
    mb = lambda x: "" if x is None else f"{x / 2 ** 20:.2f}"  # noqa: E731
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | error: {r['error']} |" + " |" * (len(cols) - 2))
            continue
        print("| " + " | ".join([
            r["variant"], f"{r['step_ms']:.0f}", f"{r['min_step_ms']:.0f}",
            f"{r['images_per_s']:.1f}",
            f"{r['compile_s']:.1f}", f"{r['data_ms']:.2f}", mb(r["batch_bytes"]),
            mb(r["frozen_bytes"]), f"{r['gflop']:.2f}", mb(r["temp_bytes"]),
            f"{r['trained_params']:,}", f"{r['ckpt_bytes']:,}"]) + " |")


def main(argv=None):
    a = parse_args(argv)
    import jax
    cache_dir = a.cache_dir or tempfile.mkdtemp(prefix="sd_finetune_bench_")
    load_before = os.getloadavg()
    rows = []
    try:
        for name in a.variants:
            t0 = time.perf_counter()
            try:
                rows.append(measure(name, a, cache_dir))
            except Exception as e:  # one variant's failure is a row, not the end of the table
                rows.append(dict(variant=name, error=f"{type(e).__name__}: {e}"[:300]))
            rows[-1]["wall_s"] = time.perf_counter() - t0
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        if a.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 2 ** 20
    folder = a.folder or "tests/fixtures/sd/tiny_sd1 (tiny SD 1.x)"
    print(f"# SD fine-tuning step: {folder}, digits at {a.image_size if a.folder else 64}x"
          f"{a.image_size if a.folder else 64} RGB, batch {a.batch_size}, 1 device")
    print(f"# jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
          f"{mem:.1f} GiB RAM, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load averages "
          f"before {load_before}, after {os.getloadavg()}; step median of {a.steps} after "
          f"{a.warmup} warm-up; data median of {a.data_batches} next() calls")
    print_table(rows, a)
    print()
    for r in rows:
        if "error" not in r and r["cache_build_s"] > 0.05:
            print(f"({r['variant']}: its caches were built first in {r['cache_build_s']:.1f} s, "
                  "once; later variants reuse them)")
    print(NOTES)
    print(json.dumps(dict(rows=rows, batch_size=a.batch_size, jax=jax.__version__,
                          xla_flags=os.environ.get("XLA_FLAGS", ""), folder=folder)))


if __name__ == "__main__":
    main()
