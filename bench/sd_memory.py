"""Per-device memory of fine-tuning Stable Diffusion 1.5 at 512x512 on 1, 8 and 64 devices (fsdp).

    python bench/sd_memory.py [--size 64] [--batches 1 2] [--devices 1 8 64]

Counts, from the ported configs (nothing is downloaded, nothing is allocated: jax.eval_shape):
  params + EMA + Adam  the TrainState of configs/sd_finetune.py's optimizer (clip, AdamW: mu, nu)
                       over the UNet2DConditionConfig defaults (SD 1.5's; float32 master weights);
  gradients            float32, one per parameter;
  frozen VAE + CLIP    SD's AutoencoderKL (128, 256, 512, 512; 2 layers per block; 4 latent
                       channels) and CLIP ViT-L/14's text tower, float32: the step's hparams;
each per device with fsdp = the device count, every leaf laid out by t2i_jax/sharding.py's
leaf_sharding (split along its largest evenly divisible axis; leaves under 2**14 elements
replicated), evaluated on an AbstractMesh of (1, fsdp).

Activations of the UNet's MSE loss and gradient (bfloat16 compute, float32 parameters) at
--size x --size x 4 latents with 77 x 768 context, for each of --batches (two batch sizes
separate the per-example slope from what does not grow with the batch):
  A. XLA's memory analysis (temp_size_in_bytes) of the whole compiled loss and gradient on this
     CPU, remat off and on. XLA's CPU pipeline drops jax.checkpoint's optimization barriers and
     CSEs the recomputation away, so "remat on" measures about what "off" does (a small chain
     of remat'd blocks shows it: dots lowered vs compiled, temp); A is the no-remat figure.
  B. What the forward saves for the backward, exactly, from JAX's own accounting
     (jax._src.ad_checkpoint.saved_residuals; the parameters themselves left out): with remat,
     the blocks' inputs and outputs (skips included); without, every residual.
  C. Each UNet block alone (its inputs captured from the UNet with flax's intercept_methods):
     XLA's temp of its forward + backward (jax.vjp to its parameters, input, skips and time
     embedding), no remat inside: what is live while a rematerialised block is recomputed and
     differentiated.
  With remat, activations = B(remat on) + max over blocks of C (an upper bound: the residuals
  of the blocks already differentiated are freed by then).
The frozen VAE encoder's forward at 8 * size (the step's, without a latent cache) and CLIP's
forward (without a text cache) are measured alike (A); they run before the UNet and their
buffers are reused, so they are shown apart, not added.
Prints the per-device table, the measurements, notes, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from t2i_jax.xla_flags import apply_tuned_flags  # noqa: E402

apply_tuned_flags()

GiB = 2 ** 30
CONTEXT = (77, 768)   # CLIP ViT-L/14's tokens [L, D]: what SD 1.5's cross-attention reads
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
           norm_num_groups=32, sample_size=512)
CLIP_L_TEXT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, vocab_size=49408, max_position_embeddings=77,
                   hidden_act="quick_gelu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--size", type=int, default=64, help="latent size measured (64: 512 px)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2],
                   help="batch sizes measured (two or more separate the per-example part)")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--per_device_batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--skip_whole", action="store_true",
                   help="skip A for the UNet (4 compiles of the whole loss and gradient)")
    return p.parse_args(argv)


# --- what is stored --------------------------------------------------------------------------

def unet_config(**kw):
    from t2i_jax.models.unet2d_condition import UNet2DConditionConfig
    return UNet2DConditionConfig(sample_size=64, **kw)   # every other default is SD 1.5's


def abstract_models():
    """(unet, unet_params, vae, vae_params, clip, clip_params): shapes only (jax.eval_shape)."""
    import jax
    import jax.numpy as jnp
    from t2i_jax.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
    from t2i_jax.models.hf_clip import CLIPTextConfig, CLIPTextTransformer
    from t2i_jax.models.unet2d_condition import UNet2DConditionModel

    key = jax.random.key(0)
    unet = UNet2DConditionModel(unet_config())
    unet_p = jax.eval_shape(unet.init, key, jnp.zeros((1, 64, 64, 4)), jnp.zeros((1,), jnp.int32),
                            jnp.zeros((1,) + CONTEXT))
    vae = AutoencoderKL(AutoencoderKLConfig(**VAE))
    vae_p = jax.eval_shape(vae.init, key, jnp.zeros((1, 64, 64, 3)))
    clip = CLIPTextTransformer(CLIPTextConfig(**CLIP_L_TEXT))
    clip_p = jax.eval_shape(clip.init, key, jnp.zeros((1, 77), jnp.int32),
                            jnp.ones((1, 77), bool))
    return unet, unet_p, vae, vae_p, clip, clip_p


def count(tree) -> int:
    import jax
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def nbytes(tree) -> int:
    import jax
    import numpy as np
    return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def per_device_bytes(tree, fsdp: int) -> int:
    """Bytes one device holds of `tree` laid out by sharding.leaf_sharding on a (1, fsdp) mesh."""
    import jax
    import numpy as np
    from jax.sharding import AbstractMesh, AxisType
    from t2i_jax.sharding import leaf_sharding
    mesh = AbstractMesh((1, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shard = leaf_sharding(x.shape, mesh).shard_shape(x.shape)
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def abstract_train_state(unet_params):
    """The TrainState of configs/sd_finetune.py's optimizer over the UNet (float32), shapes."""
    import jax
    sys.path.insert(0, os.path.join(HERE, "..", "configs"))
    import sd_finetune
    from t2i_jax.training.state import OptimConfig, init_state, make_optimizer
    tx = make_optimizer(OptimConfig.from_config(sd_finetune.get_config().train))
    return jax.eval_shape(lambda p: init_state(p, tx, jax.random.key(0)), unet_params)


# --- what the step computes ------------------------------------------------------------------

def compiled_temp(fn, *abstract_args) -> dict:
    """{temp bytes, compile s, convolutions lowered / compiled} of jax.jit(fn) for these shapes
    (nothing allocated)."""
    import jax
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*abstract_args)
    compiled = lowered.compile()
    return dict(temp=int(compiled.memory_analysis().temp_size_in_bytes),
                compile_s=time.perf_counter() - t0,
                convs_lowered=lowered.as_text().count("stablehlo.convolution"),
                convs_compiled=compiled.as_text().count(" convolution("))


def unet_inputs(batch: int, size: int):
    import jax
    import jax.numpy as jnp
    z = jax.ShapeDtypeStruct((batch, size, size, 4), jnp.float32)                 # [B, h, w, 4]
    return (z, jax.ShapeDtypeStruct((batch,), jnp.int32),
            jax.ShapeDtypeStruct((batch,) + CONTEXT, jnp.float32), z)


def unet_loss(remat: bool):
    """loss(params, z_t, t, context, target): the UNet's MSE, bf16 compute, f32 params."""
    import jax.numpy as jnp
    from t2i_jax.models.unet2d_condition import UNet2DConditionModel
    unet = UNet2DConditionModel(unet_config(dtype="bfloat16", remat=remat))

    def loss(params, z_t, t, context, target):
        eps_hat = unet.apply(params, z_t, t, context)                            # [B, h, w, 4]
        return jnp.mean(jnp.square(eps_hat - target))
    return loss


def whole_temp(unet_params, batch: int, size: int, remat: bool) -> dict:
    """A: XLA's temp of the whole UNet loss and gradient."""
    import jax
    return compiled_temp(jax.value_and_grad(unet_loss(remat)), unet_params,
                         *unet_inputs(batch, size))


def saved_bytes(unet_params, batch: int, size: int, remat: bool) -> int:
    """B: bytes the forward saves for the backward (JAX's residuals; the parameters left out)."""
    from jax._src.ad_checkpoint import saved_residuals   # what print_saved_residuals prints
    res = saved_residuals(unet_loss(remat), unet_params, *unet_inputs(batch, size))
    return sum(aval.size * aval.dtype.itemsize for aval, src in res if "argument" not in src)


def block_temps(unet_params, batch: int, size: int) -> dict:
    """C: {block name: XLA's temp of its forward + backward alone} (no remat inside)."""
    import flax.linen as nn
    import jax
    from t2i_jax.models.unet2d_condition import UNet2DConditionModel, _UNetBlock
    unet = UNet2DConditionModel(unet_config(dtype="bfloat16"))
    calls = {}

    def capture(next_fun, args, kwargs, context):
        if isinstance(context.module, _UNetBlock) and context.method_name == "__call__":
            m = context.module
            x, emb, ctx, skips, out_size = args
            calls[m.name] = (m.block, m.kind, jax.tree_util.tree_map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (x, emb, ctx, tuple(skips))),
                out_size)
        return next_fun(*args, **kwargs)

    def forward(p, z, t, c, _):
        with nn.intercept_methods(capture):
            return unet.apply(p, z, t, c)
    jax.eval_shape(forward, unet_params, *unet_inputs(batch, size))

    out = {}
    for name, (blk, kind, (x, emb, ctx, skips), out_size) in calls.items():
        module = _UNetBlock(unet.cfg, blk, kind)

        def f(p, x, emb, ctx, skips, module=module, out_size=out_size):
            return module.apply({"params": p}, x, emb, ctx, skips, out_size)

        def fwd_bwd(p, x, emb, ctx, skips, g, module=module, out_size=out_size):
            y, pull = jax.vjp(lambda p, x, emb, skips: module.apply(
                {"params": p}, x, emb, ctx, skips, out_size), p, x, emb, skips)
            return pull(g)

        p = unet_params["params"][name]
        g = jax.eval_shape(f, p, x, emb, ctx, skips)
        out[name] = compiled_temp(fwd_bwd, p, x, emb, ctx, skips, g)
    return out


def cpu_remat_check() -> dict:
    """What this backend's XLA does with jax.checkpoint: a chain of 8 rematerialised blocks of
    4 Dense(1024) + tanh on [4096, 1024] (16 MiB per activation), gradient compiled with remat
    on and off: dots lowered / compiled, optimization barriers left, temp bytes."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Blk(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(4):
                x = jnp.tanh(nn.Dense(1024)(x))
            return x

    class Chain(nn.Module):
        remat: bool

        @nn.compact
        def __call__(self, x):
            for _ in range(8):
                x = (nn.remat(Blk) if self.remat else Blk)()(x)
            return x

    x = jax.ShapeDtypeStruct((4096, 1024), jnp.float32)
    out = {}
    for remat in (False, True):
        net = Chain(remat)
        p = jax.eval_shape(net.init, jax.random.key(0), x)
        lowered = jax.jit(lambda p, x: jax.grad(lambda p: jnp.sum(net.apply(p, x)))(p)).lower(p, x)
        compiled = lowered.compile()
        text = compiled.as_text()
        out[remat] = dict(dots_lowered=lowered.as_text().count("stablehlo.dot_general"),
                          dots_compiled=text.count(" dot("),
                          barriers_lowered=lowered.as_text().count("optimization_barrier"),
                          barriers_compiled=text.count("opt-barrier"),
                          temp=int(compiled.memory_analysis().temp_size_in_bytes))
    return out


def fit(points: dict) -> tuple:
    """(intercept, slope) of bytes against batch size (least squares; one point: (0, y / b))."""
    import numpy as np
    b = np.asarray(sorted(points), np.float64)
    y = np.asarray([points[k] for k in sorted(points)], np.float64)
    if len(b) == 1:
        return 0.0, float(y[0] / b[0])
    slope, intercept = np.polyfit(b, y, 1)
    return float(intercept), float(slope)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None):
    a = parse_args(argv)
    import jax
    import jax.numpy as jnp
    t_start = time.perf_counter()
    unet, unet_p, vae, vae_p, clip, clip_p = abstract_models()
    n_unet, n_vae, n_clip = count(unet_p), count(vae_p), count(clip_p)
    n_vae_enc = count(vae_p["params"]["encoder"]) + count(vae_p["params"].get("quant_conv", {}))
    state = abstract_train_state(unet_p)
    log(f"parameters: UNet {n_unet:,}; VAE {n_vae:,} (encoder + quant_conv {n_vae_enc:,}); "
        f"CLIP ViT-L/14 text {n_clip:,}")

    check = cpu_remat_check()
    log(f"remat check (8 remat'd MLP blocks): {check}")
    whole, saved, blocks = {}, {}, {}
    for b in a.batches:
        for remat in (False, True):
            saved[(remat, b)] = saved_bytes(unet_p, b, a.size, remat)
            log(f"B saved residuals, remat={remat}, batch {b}: {saved[(remat, b)] / GiB:.3f} GiB")
        blocks[b] = block_temps(unet_p, b, a.size)
        worst = max(blocks[b], key=lambda k: blocks[b][k]["temp"])
        log(f"C blocks alone, batch {b}: the largest is {worst}, "
            f"{blocks[b][worst]['temp'] / GiB:.3f} GiB (" + ", ".join(
                f"{k} {v['temp'] / GiB:.2f}" for k, v in blocks[b].items()) + ")")
        if not a.skip_whole:
            for remat in (False, True):
                whole[(remat, b)] = whole_temp(unet_p, b, a.size, remat)
                w = whole[(remat, b)]
                log(f"A whole UNet loss+grad, remat={remat}, batch {b}: temp "
                    f"{w['temp'] / GiB:.3f} GiB, convolutions lowered {w['convs_lowered']} / "
                    f"compiled {w['convs_compiled']} ({w['compile_s']:.0f} s)")
    px = 8 * a.size
    vae_m = compiled_temp(lambda p, x: vae.apply(p, x, method="encode"), vae_p,
                          jax.ShapeDtypeStruct((1, px, px, 3), jnp.float32))
    clip_m = compiled_temp(lambda p, ids, m: clip.apply(p, ids, m), clip_p,
                           jax.ShapeDtypeStruct((1, 77), jnp.int32),
                           jax.ShapeDtypeStruct((1, 77), bool))
    log(f"VAE encode 1x{px}x{px}: temp {vae_m['temp'] / GiB:.3f} GiB; CLIP text 1x77: "
        f"{clip_m['temp'] / GiB:.4f} GiB")

    # remat: the saved block boundaries plus the largest block's working set, per batch size
    worst_block = {b: max(v["temp"] for v in blocks[b].values()) for b in a.batches}
    remat_fixed, remat_slope = fit({b: saved[(True, b)] + worst_block[b] for b in a.batches})
    fits = dict(
        saved_remat=fit({b: saved[(True, b)] for b in a.batches}),
        saved_no_remat=fit({b: saved[(False, b)] for b in a.batches}),
        worst_block=fit(worst_block), remat_estimate=(remat_fixed, remat_slope))
    if whole:
        for r in (False, True):
            fits[f"whole_xla_remat_{r}"] = fit({b: whole[(r, b)]["temp"] for b in a.batches})

    rows = []
    for n in a.devices:
        opt = per_device_bytes((state.params, state.ema_params, state.opt_state), n)
        grads = per_device_bytes(state.params, n)
        frozen = per_device_bytes((vae_p, clip_p), n)
        row = dict(devices=n, fsdp=n, state_gib=opt / GiB, grads_gib=grads / GiB,
                   frozen_gib=frozen / GiB, act_per_example_gib=remat_slope / GiB,
                   act_fixed_gib=remat_fixed / GiB)
        for b in a.per_device_batches:
            row[f"total_b{b}_gib"] = (opt + grads + frozen + remat_fixed + b * remat_slope) / GiB
        rows.append(row)

    scale = (64 / a.size) ** 2
    print(f"# SD 1.5 fine-tuning, per device, fsdp = devices; jax {jax.__version__}, XLA "
          f"memory analysis on {jax.devices()[0].platform}; activations measured at "
          f"{a.size}x{a.size}x4 latents" + ("" if a.size == 64 else
          f" (x{scale:g} at 64x64 for convs, x{scale ** 2:g} for self-attention scores)"))
    print(f"# UNet {n_unet:,} params (float32 master weights), VAE {n_vae:,}, CLIP ViT-L/14 "
          f"text {n_clip:,} (frozen, float32); GiB = 2**30 bytes")
    cols = (["devices (fsdp)", "params+EMA+Adam GiB", "gradients GiB", "frozen VAE+CLIP GiB",
             "activations/example, remat GiB (x batch)", "batch-independent temp GiB"]
            + [f"total, batch {b}/device GiB" for b in a.per_device_batches])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        vals = [str(r["devices"]), f"{r['state_gib']:.2f}", f"{r['grads_gib']:.2f}",
                f"{r['frozen_gib']:.3f}", f"{r['act_per_example_gib']:.2f}",
                f"{r['act_fixed_gib']:.2f}"] + [f"{r[f'total_b{b}_gib']:.2f}"
                                                 for b in a.per_device_batches]
        print("| " + " | ".join(vals) + " |")
    print()
    bs = a.batches
    print("| activations (GiB) | " + " | ".join(f"batch {b}" for b in bs)
          + " | per example (slope) | batch-independent (intercept) |")
    print("|---|" + "---|" * (len(bs) + 2))

    def line(label, values, key):
        icpt, slope = fits[key]
        print(f"| {label} | " + " | ".join(f"{v / GiB:.3f}" for v in values)
              + f" | {slope / GiB:.3f} | {icpt / GiB:.3f} |")
    if whole:
        line("A. XLA temp, whole UNet loss+grad, remat off",
             [whole[(False, b)]["temp"] for b in bs], "whole_xla_remat_False")
        line("A. same, remat on (CPU XLA undoes it: see notes)",
             [whole[(True, b)]["temp"] for b in bs], "whole_xla_remat_True")
    line("B. saved for the backward, remat off", [saved[(False, b)] for b in bs], "saved_no_remat")
    line("B. saved for the backward, remat on", [saved[(True, b)] for b in bs], "saved_remat")
    worst = {b: max(blocks[b], key=lambda k: blocks[b][k]["temp"]) for b in bs}
    line("C. largest block's forward+backward alone (" + "/".join(sorted(set(worst.values())))
         + ")", [worst_block[b] for b in bs], "worst_block")
    line("remat on: B + C (the table's)", [saved[(True, b)] + worst_block[b] for b in bs],
         "remat_estimate")
    print(f"| VAE encode 1x{px}x{px}x3 (f32 forward) | {vae_m['temp'] / GiB:.3f} | | | |")
    print(f"| CLIP text 1x77 (f32 forward) | {clip_m['temp'] / GiB:.4f} | | | |")
    if whole:
        print("\nconvolutions in the whole loss+grad, lowered -> compiled: " + "; ".join(
            f"remat {'on' if r else 'off'} batch {b}: {w['convs_lowered']} -> "
            f"{w['convs_compiled']} ({w['compile_s']:.0f} s to compile)"
            for (r, b), w in sorted(whole.items())))
    off, on = check[False], check[True]
    print(f"remat on this backend (a chain of 8 remat'd blocks of 4 Dense(1024) + tanh, 16 MiB "
          f"per activation): dots lowered -> compiled: remat off {off['dots_lowered']} -> "
          f"{off['dots_compiled']}, on {on['dots_lowered']} -> {on['dots_compiled']}; "
          f"optimization barriers lowered -> compiled {on['barriers_lowered']} -> "
          f"{on['barriers_compiled']}; temp MiB off {off['temp'] / 2 ** 20:.0f}, on "
          f"{on['temp'] / 2 ** 20:.0f}")
    print("C per block (GiB, batch " + str(bs[0]) + "): " + ", ".join(
        f"{k} {v['temp'] / GiB:.2f}" for k, v in blocks[bs[0]].items()))
    print()
    print(NOTES.format(bytes_per_param=per_device_bytes(
        (state.params, state.ema_params, state.opt_state), 1) / n_unet,
        bf16_weights=2 * n_unet / GiB))
    print(json.dumps(dict(
        params=dict(unet=n_unet, vae=n_vae, vae_encoder=n_vae_enc, clip_text=n_clip),
        size=a.size, rows=rows,
        whole={f"remat={r},batch={b}": w for (r, b), w in whole.items()},
        saved={f"remat={r},batch={b}": v for (r, b), v in saved.items()},
        blocks={str(b): {k: v["temp"] for k, v in blocks[b].items()} for b in bs},
        fits={k: dict(intercept=i, slope=s) for k, (i, s) in fits.items()},
        vae_encode_temp=vae_m["temp"], clip_text_temp=clip_m["temp"], jax=jax.__version__,
        xla_flags=os.environ.get("XLA_FLAGS", ""), wall_s=time.perf_counter() - t_start)))


NOTES = """\
Notes:
- params+EMA+Adam: float32 params, EMA, AdamW's mu and nu ({bytes_per_param:.1f} bytes per UNet
  parameter with the clip / count scalars); gradients: float32, reduce-scattered to the
  parameters' layout under fsdp (a layer's full gradient exists only briefly).
- total = params+EMA+Adam + gradients + frozen + batch-independent temp + batch x activations.
  Not in it: with fsdp each layer's parameters are all-gathered for its forward (and again for
  a rematerialised block's backward), transient full copies of the layers in flight (XLA's
  scheduler decides how many: the whole UNet in bfloat16 is {bf16_weights:.2f} GiB); the data
  batch, the VAE / CLIP forwards (before the UNet, buffers reused), XLA's and the runtime's own.
- Activations: XLA's CPU buffer assignment; a GPU's fusions and scheduler differ, so read them
  as the size of the problem, not a GPU's exact peak. On CPU XLA drops jax.checkpoint's
  optimization barriers and CSE folds the recomputation back into the forward (the remat
  check above: as many dots compiled with remat as without), so A with remat is no lower
  than without; remat's memory is therefore B(remat on) + C, not A.
  Conv / norm / MLP activations scale with batch x latent pixels. The port's default attention
  (layers.attention impl="einsum") materialises the scores: float32 logits and their exp,
  [B, heads, h*w, h*w] (8 heads at the top level: 8 * 4096^2 * 4 bytes = 0.5 GiB per tensor per
  example at 64x64), so self-attention memory grows with (h*w)^2 and dominates C (the top-level
  blocks, 2 or 3 transformers at 64x64); impl="dot_product" (cuDNN's fused kernel on GPU) keeps
  no scores. Without remat, every top-level attention's scores are saved for the backward (B).
- batch-independent temp: the bfloat16 copies of the weights the forward saves (without remat)
  or a block's (with), and gradient layout temporaries; from the fit over two batch sizes.
- The frozen VAE counts its decoder too (the step reads only the encoder: see the parameter
  line); a latent cache drops the VAE from the step (its parameters and its encoder's
  activations), a text cache drops CLIP."""


if __name__ == "__main__":
    main()
