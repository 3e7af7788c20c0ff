"""Encoding throughput of the pretrained text-encoder ports at their published base sizes, and
the memory a cache of their features takes per example.

    python bench/text_encoders.py [--batch 32] [--repeats 3] [--models t5-base,clip-b32]
    python bench/text_encoders.py --train_config configs/shapes_t5_tiny.py [--encoder DIR] \
        [--steps 5]      # the train step with the encoder in the step vs from the cache

Weights are random (speed does not depend on them; nothing is downloaded): the Flax modules
are built from the publishers' config.json values of google/t5-v1_1-base (L = 128 tokens, as
Imagen) and openai/clip-vit-base-patch32's text tower (L = 77), jitted once, then timed
(compilation excluded). The cache stores float32 token features [L, D], the pooled vector [P]
and the mask [L] per caption (families/frozen_text.py); the table also gives T5-XXL's.
With --train_config: seconds per train step of that config (its encoder, or --encoder DIR,
e.g. `python -m t2i_jax.models.pretrained make-tiny runs/t5_base --size base`) with the text
features computed in the step and read from the cache, and the seconds the cache took to build.
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

T5_BASE = dict(model_type="t5", vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
               num_heads=12, relative_attention_num_buckets=32,
               relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
               layer_norm_epsilon=1e-6)
T5_XXL = dict(T5_BASE, d_model=4096, d_ff=10240, num_layers=24, num_heads=64)
CLIP_B32 = dict(model_type="clip", projection_dim=512,
                text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                                 num_hidden_layers=12, num_attention_heads=8,
                                 max_position_embeddings=77, hidden_act="quick_gelu",
                                 layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407,
                                 pad_token_id=1),
                vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12, image_size=224, patch_size=32))


def build(name: str):
    """(module, L, parameter count) of a published configuration."""
    if name.startswith("t5"):
        from t2i_jax.models import t5
        cfg = t5.T5Config.from_hf(T5_BASE if name == "t5-base" else T5_XXL)
        return t5.T5Encoder(cfg), 128, cfg
    from t2i_jax.models import hf_clip
    cfg = hf_clip.text_config_from_hf(CLIP_B32)
    return hf_clip.CLIPTextTransformer(cfg), 77, cfg


def train_steps(config_path: str, encoder, steps: int, cache_dir) -> list:
    """[{mode, s_per_step, ...}] for the train step with the text encoder in the step and with
    its features read from the cache (the same batches, the same parameters)."""
    from t2i_jax import data as data_lib, sharding as mesh_lib
    from t2i_jax.config_utils import load_config
    from t2i_jax.training import loop
    from t2i_jax.training.step import make_train_step
    rows = []
    for cached in (False, True):
        config = load_config(config_path)
        if encoder:
            config.model.text_encoder.path = encoder
        config.train.text_cache = cached
        config.train.text_cache_dir = cache_dir
        run = loop.Run.from_config(config)
        fam = run.family
        t0 = time.perf_counter()
        cache = fam.text_cache()
        built = time.perf_counter() - t0
        it = data_lib.make_train_iterator(config.data, seed=0,
                                          global_batch_size=config.train.batch_size,
                                          tokenizer=fam.tokenizer, text_cache=cache)
        mesh = mesh_lib.make_mesh(1)
        state = jax.jit(run.create_state)(jax.random.key(0))
        hp = mesh_lib.put(fam.hparams(), mesh_lib.replicated(mesh))
        step = jax.jit(make_train_step(fam, run.optim, run.tx), donate_argnums=0)
        batches = [{k: v for k, v in next(it).items() if k in fam.batch_keys}
                   for _ in range(steps + 2)]
        for b in batches[:2]:  # compile (the second call sees the donated, committed state)
            state, m = step(state, b, hp)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for b in batches[2:]:
            state, m = step(state, b, hp)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t0) / steps
        rows.append(dict(mode="cache" if cached else "in the step", encoder=fam.frozen_text.workdir,
                         batch=config.train.batch_size, L=fam.tokenizer.max_length,
                         s_per_step=round(dt, 3),
                         images_per_s=round(config.train.batch_size / dt, 1),
                         cache_build_s=round(built, 1) if cached else None,
                         cache_captions=len(cache) if cached else None))
    return rows


def print_table(rows) -> None:
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join("" if r[k] is None else str(r[k]) for k in keys) + " |")
    print(json.dumps(rows))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="t5-base,clip-b32")
    p.add_argument("--train_config", help="time this config's train step, in-step vs cache")
    p.add_argument("--encoder", help="with --train_config: the encoder directory to use")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--cache_dir", default=None, help="with --train_config: where the cache goes")
    a = p.parse_args()
    if a.train_config:
        print_table(train_steps(a.train_config, a.encoder, a.steps, a.cache_dir))
        return
    rows = []
    for name in a.models.split(","):
        module, L, cfg = build(name)
        ids = jnp.ones((a.batch, L), jnp.int32)
        mask = jnp.arange(L)[None].repeat(a.batch, 0) < 20  # ~20 real tokens, the rest padding
        params = jax.jit(module.init)(jax.random.key(0), ids, mask)
        n = sum(x.size for x in jax.tree_util.tree_leaves(params))
        fn = jax.jit(module.apply)
        out = fn(params, ids, mask)
        jax.block_until_ready(out)
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, ids, mask))
            times.append(time.perf_counter() - t0)
        best = min(times)
        D, P = out.tokens.shape[-1], out.pooled.shape[-1]
        rows.append(dict(model=name, params_M=round(n / 1e6, 1), L=L, D=D, batch=a.batch,
                         s_per_batch=round(best, 3), prompts_per_s=round(a.batch / best, 1),
                         cache_KiB_per_example=round((L * D * 4 + P * 4 + L) / 1024, 1)))
        del params
    # T5-XXL's cache per example (not run: 4.7B parameters do not fit this benchmark's machine)
    rows.append(dict(model="t5-xxl (cache only)", params_M=4762.3, L=128, D=4096, batch=None,
                     s_per_batch=None, prompts_per_s=None,
                     cache_KiB_per_example=round((128 * 4096 * 4 + 4096 * 4 + 128) / 1024, 1)))
    print_table(rows)


if __name__ == "__main__":
    main()
