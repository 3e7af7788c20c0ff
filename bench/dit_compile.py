"""Compile time of the DiT's training step against depth: blocks run by nn.scan vs an unrolled loop.

    python bench/dit_compile.py --depths 2 4 8 16

For each depth, the program of one training step (eps loss of the DiT's output on a fixed batch,
its gradient, an AdamW update) is lowered and compiled from abstract shapes, with the blocks as
one nn.scan over the depth (models/dit.py, cfg.scan=True) and as a Python loop of `depth` blocks
(cfg.scan=False). The scanned program holds ONE block whatever the depth, so its compile time
stays flat; the unrolled one holds `depth` copies. Also printed: the size of each lowered
program (StableHLO characters), and with --run, the seconds of one step. Unless XLA_FLAGS is
set, the tuned CPU flags of t2i_jax/xla_flags.py are applied. A table first, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--num_heads", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--image_size", type=int, default=16)
    p.add_argument("--patch_size", type=int, default=2)
    p.add_argument("--text_length", type=int, default=32, help="context tokens (0: no text)")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--run", action="store_true", help="also time one step of each program")
    p.add_argument("--default_xla_flags", action="store_true", help="do not apply the tuned CPU flags")
    args = p.parse_args(argv)
    if min(args.depths) < 1:
        p.error("--depths must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    from t2i_jax.xla_flags import apply_tuned_flags
    if not args.default_xla_flags:
        apply_tuned_flags()

    import jax
    import jax.numpy as jnp
    import optax

    from t2i_jax.models.dit import DiT, DiTConfig

    B, S, L = args.batch_size, args.image_size, args.text_length
    x0 = jax.ShapeDtypeStruct((B, S, S, 1), jnp.float32)
    t = jax.ShapeDtypeStruct((B,), jnp.int32)
    context = jax.ShapeDtypeStruct((B, L, 64), jnp.float32) if L else None
    mask = jax.ShapeDtypeStruct((B, L), jnp.bool_) if L else None
    tx = optax.adamw(1e-4)

    def measure(depth: int, scan: bool) -> dict:
        cfg = DiTConfig(out_channels=1, patch_size=args.patch_size, width=args.width, depth=depth,
                        num_heads=args.num_heads, remat=args.remat, scan=scan)
        model = DiT(cfg)
        params = jax.eval_shape(model.init, jax.random.key(0), x0, t, context, mask)
        opt_state = jax.eval_shape(tx.init, params)

        def train_step(params, opt_state, x0, t, context, mask):
            noise = jnp.sin(x0 * 3.0)  # a fixed target: the program, not the data, is measured
            loss_fn = lambda p: jnp.mean((model.apply(p, x0 + noise, t, context, mask) - noise) ** 2)
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        start = time.perf_counter()
        step = jax.jit(train_step, donate_argnums=(0, 1))
        lowered = step.lower(params, opt_state, x0, t, context, mask)
        lower_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        row = dict(depth=depth, scan=scan, lower_s=lower_s, compile_s=compile_s,
                   hlo_chars=len(lowered.as_text()))
        if args.run:
            real = lambda a: None if a is None else (
                jnp.ones(a.shape, a.dtype) if a.dtype == jnp.bool_ else
                jnp.asarray(jax.random.normal(jax.random.key(1), a.shape), a.dtype)
                if jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros(a.shape, a.dtype))
            p = model.init(jax.random.key(0), real(x0), real(t), real(context), real(mask))
            s, times = tx.init(p), []
            for _ in range(3):
                begin = time.perf_counter()
                p, s, loss = compiled(p, s, real(x0), real(t), real(context), real(mask))
                jax.block_until_ready(loss)
                times.append(time.perf_counter() - begin)
            row["step_s"] = statistics.median(times[1:])
        return row

    measure(1, True)  # warm-up: the first compile also pays for jax's and XLA's own start
    rows = [measure(d, scan) for d in args.depths for scan in (True, False)]
    print(f"# DiT width {args.width}, {args.num_heads} heads, patch {args.patch_size}, "
          f"{B} x {S}x{S}x1, {L} text tokens, remat={args.remat}; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, {os.cpu_count()} cores")
    head = ["depth", "scan lower s", "scan compile s", "unrolled lower s", "unrolled compile s",
            "scan HLO kchars", "unrolled HLO kchars"]
    head += ["scan step s", "unrolled step s"] if args.run else []
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for d in args.depths:
        s, u = (next(r for r in rows if r["depth"] == d and r["scan"] == k) for k in (True, False))
        cells = [str(d), f"{s['lower_s']:.2f}", f"{s['compile_s']:.2f}", f"{u['lower_s']:.2f}",
                 f"{u['compile_s']:.2f}", f"{s['hlo_chars'] / 1e3:.0f}", f"{u['hlo_chars'] / 1e3:.0f}"]
        if args.run:
            cells += [f"{s['step_s']:.3f}", f"{u['step_s']:.3f}"]
        print(" | ".join(cells))
    print(json.dumps(dict(width=args.width, num_heads=args.num_heads, batch_size=B, image_size=S,
                          patch_size=args.patch_size, text_length=L, remat=args.remat,
                          xla_flags=os.environ.get("XLA_FLAGS", ""), jax=jax.__version__, rows=rows)))


if __name__ == "__main__":
    main()
