"""Speed of a config's model: parameters, FLOPs, compile time, training step, guided sampling step.

    python bench/train_step.py --config configs/peer_small.py --batch_size 16

Measures, for the Denoiser that the config describes:
  params           parameter count;
  flops_per_image  forward FLOPs of one image, from XLA's cost analysis of the compiled forward;
  compile_s        lowering + compiling the training step;
  step_s           steady-state seconds per training step (q_sample, forward, eps loss, backward,
                   AdamW), median of --steps after --warmup, and images/s;
  sample_step_s    one classifier-free-guided DDIM step for --sample_batch images (one model call
                   on twice as many rows), from a --sample_steps-step run;
and the achieved GFLOP/s of the training step next to this machine's float32 matmul rate.
By default the UNet sees fixed random text features (as the PyTorch reference does);
--text_encoder includes the byte-level text encoder in every step.
Unless XLA_FLAGS is set, the tuned CPU flags of t2i_jax/xla_flags.py are applied (said on stderr);
--default_xla_flags measures XLA's defaults. A table first, then one JSON line.
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
    p.add_argument("--config", required=True, help="config file, e.g. configs/peer_small.py")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--sample_batch", type=int, default=16, help="images per guided sampling step")
    p.add_argument("--sample_steps", type=int, default=5, help="steps of the timed sampling run")
    p.add_argument("--text_encoder", action="store_true", help="run the text encoder in each step")
    p.add_argument("--dtype", default=None, help="override the model's computation dtype")
    p.add_argument("--attention_impl", default=None, choices=("einsum", "dot_product"))
    p.add_argument("--remat", action="store_true", help="rematerialise the UNet's blocks")
    p.add_argument("--default_xla_flags", action="store_true", help="do not apply the tuned CPU flags")
    p.add_argument("--skip_sample", action="store_true")
    args = p.parse_args(argv)
    for name in ("batch_size", "steps", "sample_batch", "sample_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def main(argv=None):
    args = parse_args(argv)
    from t2i_jax.xla_flags import apply_tuned_flags
    if not args.default_xla_flags:
        apply_tuned_flags()

    import jax
    import jax.numpy as jnp
    import optax

    from t2i_jax import conditioning
    from t2i_jax.config_utils import load_config
    from t2i_jax.diffusion import forward, losses, make_schedule, samplers
    from t2i_jax.models.denoiser import Denoiser, Encoded, ModelConfig, denoise_fn
    from t2i_jax.models.unet import count_params

    config = load_config(args.config)
    if args.dtype:
        config.model.unet.dtype = config.model.text.dtype = args.dtype
    if args.attention_impl:
        config.model.unet.attention_impl = config.model.text.attention_impl = args.attention_impl
    if args.remat:
        config.model.unet.remat = True
    mcfg = ModelConfig.from_config(config.model)
    model = Denoiser(mcfg)
    B, S, C = args.batch_size, config.data.image_size, config.data.channels
    L, D = mcfg.text.max_length, mcfg.text.width
    schedule = make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    key = jax.random.key(config.seed)
    k_x, k_ctx, k_tok, k_init = jax.random.split(key, 4)
    x0 = jax.random.uniform(k_x, (B, S, S, C), minval=-1.0, maxval=1.0)
    t0 = jnp.zeros((B,), jnp.int32)

    if args.text_encoder:
        ids = jax.random.randint(k_tok, (B, L), 3, 259).at[:, 0].set(1)
        cond = conditioning.Condition(tokens=ids, mask=jnp.ones((B, L), bool), is_null=jnp.zeros((B,), bool))
        init_fn = lambda k: model.init(k, x0, t0, cond)
        model_fn = lambda p, x, t: model.apply(p, x, t, cond)
    else:
        cond = Encoded(context=jax.random.normal(k_ctx, (B, L, D)), context_mask=jnp.ones((B, L), bool))
        init_fn = lambda k: model.init(k, x0, t0, cond, method=Denoiser.denoise)
        model_fn = lambda p, x, t: model.apply(p, x, t, cond, method=Denoiser.denoise)

    start = time.perf_counter()
    params = jax.jit(init_fn)(k_init)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - start
    n_params = count_params(params)

    tx = optax.adamw(config.train.learning_rate, weight_decay=config.train.weight_decay)
    opt_state = tx.init(params)

    def train_step(params, opt_state, step):
        k = jax.random.fold_in(key, step)
        k_t, k_n = jax.random.split(k)
        t = jax.random.randint(k_t, (B,), 0, schedule.num_timesteps)
        noise = jax.random.normal(k_n, x0.shape)
        x_t = forward.q_sample(schedule, x0, t, noise)

        def loss_fn(p):
            return jnp.mean(losses.per_example_loss(schedule, model_fn(p, x_t, t), x0, t, noise))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step_jit = jax.jit(train_step, donate_argnums=(0, 1))
    start = time.perf_counter()
    compiled = step_jit.lower(params, opt_state, 0).compile()
    compile_s = time.perf_counter() - start
    train_flops = _flops(compiled)

    fwd = jax.jit(lambda p, x, t: model_fn(p, x, t)).lower(params, x0, t0).compile()
    flops_per_image = _flops(fwd) / B

    for i in range(args.warmup):
        params, opt_state, loss = compiled(params, opt_state, i)
        jax.block_until_ready(loss)
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, args.warmup + i)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)

    a = jax.random.normal(key, (2048, 2048))
    mm = jax.jit(lambda a: a @ a)
    jax.block_until_ready(mm(a))
    mm_times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(mm(a))
        mm_times.append(time.perf_counter() - start)
    matmul_gflops = 2 * 2048 ** 3 / min(mm_times) / 1e9

    sample_step_s = float("nan")
    if not args.skip_sample:
        n = args.sample_batch
        enc = Encoded(context=jax.random.normal(k_ctx, (n, L, D)), context_mask=jnp.ones((n, L), bool))
        null = Encoded(context=jnp.zeros((1, L, D)), context_mask=jnp.ones((1, L), bool))
        if args.text_encoder:
            enc = model.apply(params, conditioning.text_condition(["a prompt"] * n, L), method=Denoiser.encode)
            null = model.apply(params, conditioning.null_condition(1, max_length=L), method=Denoiser.encode)
        fn = denoise_fn(model, params)

        @jax.jit
        def run(x_T, w):
            return samplers.sample(fn, schedule, x_T, cond=enc, null_cond=null, guidance_weight=w,
                                   sampler="ddim", num_steps=args.sample_steps)

        x_T = samplers.initial_noise(key, (n, S, S, C))
        jax.block_until_ready(run(x_T, 6.5))
        s_times = []
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(run(x_T, 6.5))
            s_times.append(time.perf_counter() - start)
        sample_step_s = min(s_times) / args.sample_steps

    result = dict(
        config=args.config, batch_size=B, text_encoder=args.text_encoder, dtype=mcfg.unet.dtype,
        attention_impl=mcfg.unet.attention_impl, remat=mcfg.unet.remat,
        xla_flags=os.environ.get("XLA_FLAGS", ""), jax=jax.__version__, device=str(jax.devices()[0]),
        params=n_params, flops_per_image=flops_per_image, train_flops_per_step=train_flops,
        init_s=init_s, compile_s=compile_s, step_s=step_s, images_per_s=B / step_s,
        achieved_gflops=train_flops / step_s / 1e9, matmul_gflops=matmul_gflops,
        sample_step_s=sample_step_s, loss=float(loss))
    rows = [
        ("parameters", f"{n_params:,}"),
        ("forward GFLOP / image", f"{flops_per_image / 1e9:.3f}"),
        ("train step GFLOP", f"{train_flops / 1e9:.2f}"),
        ("init (compile + run) s", f"{init_s:.1f}"),
        ("train step compile s", f"{compile_s:.1f}"),
        (f"train step s (batch {B})", f"{step_s:.3f}"),
        ("images / s", f"{B / step_s:.2f}"),
        ("achieved GFLOP/s", f"{train_flops / step_s / 1e9:.1f}"),
        ("float32 matmul GFLOP/s", f"{matmul_gflops:.1f}"),
        (f"guided sampling step s ({args.sample_batch} images)", f"{sample_step_s:.3f}"),
    ]
    print(f"# {args.config}  jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{os.cpu_count()} cores, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:>14}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
