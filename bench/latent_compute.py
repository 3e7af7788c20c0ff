"""What latent diffusion saves: a latent model's training and sampling step against a pixel model
of the same final resolution, measured in one run.

    python bench/latent_compute.py --config configs/shapes64_ldm.py

Three models, each through its family's real training step (families/, training/step.py: the
loss, gradients, AdamW, EMA) and its real sampling function (sampling/generate.py):
  latent         the config's latent model: each batch encoded by the frozen autoencoder inside
                 the step (a posterior sample, scaled), the UNet on [H/f, W/f, c];
  latent cached  the same step fed precomputed latents (what a cache of latents would cost:
                 the encoder's share of the step is the difference);
  pixel          the same UNet (widths, levels, attention levels) as a pixel diffusion model of
                 the data's size, [H, W, C].
Each training step's FLOPs come from XLA's cost analysis of the compiled step. Sampling: a
guided DDIM chain at --sample_batch images, timed at n1 and n2 steps; the per-step
time is (t(n2) - t(n1)) / (n2 - n1), and what remains (for the latent model, mostly decoding) is
the fixed cost. Medians of --steps timed training steps after --warmup. A table, then JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/shapes64_ldm.py")
    p.add_argument("--autoencoder", help="default: the config's model.autoencoder")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--sample_batch", type=int, default=16)
    p.add_argument("--sample_steps", type=int, nargs=2, default=(5, 15), metavar=("N1", "N2"))
    p.add_argument("--skip_pixel_sampling", action="store_true")
    args = p.parse_args(argv)
    if min(args.batch_size, args.steps, args.sample_batch) < 1 or args.warmup < 0:
        p.error("--batch_size, --steps and --sample_batch must be >= 1, --warmup >= 0.")
    if not 1 <= args.sample_steps[0] < args.sample_steps[1]:
        p.error("--sample_steps N1 N2 needs 1 <= N1 < N2.")
    return args


def _time(fn, n):
    import jax
    out = []
    for _ in range(n):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def train_step_s(family, config, batch, args) -> float:
    import jax

    from t2i_jax import sharding as mesh_lib
    from t2i_jax.training.loop import create_state
    from t2i_jax.training.state import OptimConfig, make_optimizer
    from t2i_jax.training.step import make_train_step
    optim = OptimConfig.from_config(config.train)
    tx = make_optimizer(optim)
    state = jax.jit(lambda k: create_state(family, tx, k))(jax.random.key(0))
    hp = mesh_lib.put(family.hparams(), mesh_lib.replicated(mesh_lib.make_mesh(1)))
    step = jax.jit(make_train_step(family, optim, tx), donate_argnums=0)
    cost = step.lower(state, batch, hp).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    holder = {"s": state, "gflop": float(cost.get("flops", float("nan"))) / 1e9}

    def one():
        holder["s"], m = step(holder["s"], batch, hp)
        return m["loss"]

    for _ in range(args.warmup):
        jax.block_until_ready(one())
    return _time(one, args.steps), holder["gflop"]


def sample_times(family, params, args) -> tuple:
    import jax
    import jax.numpy as jnp

    from t2i_jax.sampling.generate import SampleOptions, make_generate_fn
    cond = family.conditioning.of_prompts(["a large red circle"] * args.sample_batch)
    ids = jnp.arange(args.sample_batch)
    out = []
    for n in args.sample_steps:
        gen = make_generate_fn(family, SampleOptions("ddim", n, thresholding=None))
        fn = lambda: gen(params, cond, jax.random.key(1), 3.0, ids)  # noqa: E731
        jax.block_until_ready(fn())
        out.append(_time(fn, 3))
    (n1, n2), (t1, t2) = args.sample_steps, out
    per_step = (t2 - t1) / (n2 - n1)
    return per_step, t1 - n1 * per_step


def main(argv=None) -> int:
    args = parse_args(argv)
    from t2i_jax.xla_flags import apply_tuned_flags
    apply_tuned_flags()
    import jax
    import jax.numpy as jnp

    from t2i_jax import data as data_lib, families
    from t2i_jax.config_utils import load_config
    config = load_config(args.config)
    if args.autoencoder:
        config.model.autoencoder = args.autoencoder
    config.train.batch_size = args.batch_size
    latent = families.build(config)
    if not getattr(latent, "latent", False):
        raise SystemExit(f"{args.config} is not a latent model (config.family="
                         f"{config.family!r}).")
    split = data_lib.get_spec(config.data.name).splits[0]
    data = data_lib.load_split(config.data, split, max_examples=None, limit=args.batch_size)
    tokens = latent.conditioning.of_prompts(data["caption"])
    batch = {"image": jnp.asarray(data["image"]), "tokens": tokens.tokens, "mask": tokens.mask}

    # The cached variant: the same family reading precomputed (scaled, sampled) latents.
    z = latent.diffusion_data(batch, jax.random.key(3), latent.hparams())

    @dataclasses.dataclass
    class Cached(type(latent)):
        def diffusion_data(self, batch, key, hp):
            return batch["latent"]
    cached = Cached(**{f.name: getattr(latent, f.name) for f in dataclasses.fields(latent)})
    cached_batch = dict(batch, latent=z)

    pixel_cfg = load_config(args.config)
    pixel_cfg.family = "diffusion"
    pixel_cfg.model.unet.out_channels = config.data.channels
    del pixel_cfg.model["autoencoder"]
    pixel_cfg.sample.thresholding = "static"
    pixel = families.build(pixel_cfg)

    rows = {}
    for name, fam, b in (("latent", latent, batch), ("latent cached", cached, cached_batch),
                         ("pixel", pixel, batch)):
        seconds, gflop = train_step_s(fam, config, b, args)
        rows[name] = dict(chain_shape=list(fam.image_shape), train_step_s=seconds,
                          train_step_gflop=gflop)
        print(f"[bench] {name}: train step {rows[name]['train_step_s']:.3f} s", file=sys.stderr)
    for name, fam in (("latent", latent), ("pixel", pixel)):
        if name == "pixel" and args.skip_pixel_sampling:
            continue
        params = jax.jit(fam.init_params)(jax.random.key(0))
        per_step, fixed = sample_times(fam, params, args)
        rows[name].update(sample_step_s=per_step, sample_fixed_s=fixed)
        print(f"[bench] {name}: sampling step {per_step:.4f} s, fixed {fixed:.3f} s", file=sys.stderr)
    B, S = args.batch_size, args.sample_batch
    lat, pix, cac = rows["latent"], rows["pixel"], rows["latent cached"]
    print(f"\n{args.config}, train batch {B}, sampling batch {S} (guided DDIM), "
          f"{jax.devices()[0].device_kind} x{len(jax.devices())}\n")
    print("| model | x_t | train step GFLOP | train step s | train img/s | sampling step s | "
          "fixed s (decode) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        ss = r.get("sample_step_s")
        print(f"| {name} | {'x'.join(map(str, r['chain_shape']))} | {r['train_step_gflop']:.1f} | "
              f"{r['train_step_s']:.3f} | "
              f"{B / r['train_step_s']:.1f} | {'' if ss is None else f'{ss:.4f}'} | "
              f"{'' if ss is None else format(r['sample_fixed_s'], '.3f')} |")
    ratio = dict(train_pixel_over_latent=pix["train_step_s"] / lat["train_step_s"],
                 train_flops_pixel_over_latent=pix["train_step_gflop"] / lat["train_step_gflop"],
                 encoder_share_of_latent_step=1 - cac["train_step_s"] / lat["train_step_s"],
                 encoder_share_of_latent_flops=1 - cac["train_step_gflop"] / lat["train_step_gflop"])
    if "sample_step_s" in pix:
        ratio["sampling_step_pixel_over_latent"] = pix["sample_step_s"] / lat["sample_step_s"]
    print("\n" + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items()))
    print(json.dumps(dict(config=args.config, batch_size=B, sample_batch=S, rows=rows, **ratio,
                          device=str(jax.devices()[0]), jax=jax.__version__)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
