"""The DiT backbone (models/dit.py): adaLN-Zero's identity blocks, patchify, the parameter count in
closed form, scan = remat = unrolled, text through cross-attention under the padding mask, the
Denoiser's choice of backbone, and FSDP never splitting the scanned layer axis (8 CPU devices)."""

import copy
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax import checkpoint, conditioning, sharding
from t2i_jax.config_utils import load_config
from t2i_jax.models import dit as dit_lib
from t2i_jax.models.denoiser import Denoiser, Encoded, ModelConfig
from t2i_jax.models.dit import DiT, DiTConfig
from t2i_jax.models.text import TextConfig
from t2i_jax.models.unet import count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = DiTConfig(out_channels=2, patch_size=2, width=32, depth=3, num_heads=2, freq_dim=16)
B, S, C, L, DC = 3, 8, 2, 5, 12   # batch, image side, channels, text tokens, text width


def _inputs(seed=0, batch=B):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (batch, S, S, C))
    t = jnp.array([3, 500, 999, 41, 7, 250][:batch], jnp.int32)
    context = jax.random.normal(k[1], (batch, L, DC))
    mask = jnp.arange(L)[None, :] < jnp.array([2, 5, 3, 4, 1, 5][:batch])[:, None]  # [B, L]
    pooled = jax.random.normal(k[2], (batch, DC))
    return x, t, context, mask, pooled


def _init(cfg, *args, **kw):
    return jax.jit(lambda k: DiT(cfg).init(k, *args, **kw))(jax.random.key(1))


@jax.jit
def _randomize(params):
    """Every weight matrix perturbed: the zero-initialised adaLN, cross-attention output and
    final layer included, so that every path reaches the output."""
    return jax.tree_util.tree_map(
        lambda a: a + 0.1 * jax.random.normal(jax.random.key(a.size), a.shape) if a.ndim > 1 else a,
        params)


_APPLY = {}


def _apply(cfg):
    if cfg not in _APPLY:
        _APPLY[cfg] = jax.jit(DiT(cfg).apply, static_argnames=("deterministic",))
    return _APPLY[cfg]


# --- (a) adaLN-Zero ---------------------------------------------------------------------------

def _np_timestep_embedding(t, dim):
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    args = np.asarray(t, np.float64)[:, None] * freqs[None]
    return np.concatenate([np.cos(args), np.sin(args)], axis=1)


def _mae_pos_embed(dim, grid):
    """MAE's get_2d_sincos_pos_embed, line for line (DiT uses it): meshgrid(w, h), the first half
    from grid[0] (the column), the second from grid[1] (the row)."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64)))
    return np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], axis=1)


def _np_patches(x, p):
    """Patches by slicing: token i * (W/p) + j is the (i, j) patch flattened (row, col, channel)."""
    b, h, w, c = x.shape
    return np.stack([x[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(b, -1)
                     for i in range(h // p) for j in range(w // p)], axis=1)


def _np_unpatches(tokens, p, h, w):
    b = tokens.shape[0]
    out = np.zeros((b, h, w, tokens.shape[-1] // (p * p)))
    for n in range(tokens.shape[1]):
        i, j = divmod(n, w // p)
        out[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :] = tokens[:, n].reshape(b, p, p, -1)
    return out


def _np_conv3x3(x, d):
    """A 3x3 'SAME' convolution of x [B, H, W, Ci] by flax's kernel [3, 3, Ci, Co], zero padded."""
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    return sum(pad[:, i:i + h, j:j + w] @ d["kernel"][i, j] for i in range(3) for j in range(3)) \
        + d["bias"]


@pytest.mark.parametrize("convs", [False, True], ids=["dit", "conv_stem_and_head"])
def test_adaln_zero_blocks_are_the_identity_so_the_output_is_the_final_layer_of_the_embedding(convs):
    x, t, context, mask, pooled = _inputs()
    cfg = dataclasses.replace(CFG, conv_stem=5, conv_head=3) if convs else CFG
    params = _init(cfg, x, t, context, mask, pooled)
    final = params["params"]["final_layer"]
    rnd = lambda k, a: 0.3 * jax.random.normal(jax.random.key(k), a.shape)
    final = jax.tree_util.tree_map(lambda a: a + rnd(a.size + 7, a), final)
    params = {"params": dict(params["params"], final_layer=final)}
    out = np.asarray(_apply(cfg)(params, x, t, context, mask, pooled), np.float64)

    P = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["params"])
    silu = lambda z: z / (1 + np.exp(-z))
    dense = lambda z, d: z @ d["kernel"] + d["bias"]
    # c = MLP(emb(t)) + W pooled, computed here from the paper's equations
    c = dense(silu(dense(_np_timestep_embedding(t, CFG.freq_dim), P["t_embed"]["Dense_0"])),
              P["t_embed"]["Dense_1"]) + dense(np.asarray(pooled, np.float64), P["pooled_proj"])
    p = CFG.patch_size
    image = np.asarray(x, np.float64)
    if convs:  # the stem: conv, SiLU, before patchify
        image = silu(_np_conv3x3(image, P["conv_stem"]))
    h = dense(_np_patches(image, p), P["patch_embed"])
    h = h + _mae_pos_embed(CFG.width, S // p)                                   # [B, N, D]
    shift, scale = np.split(dense(silu(c), P["final_layer"]["adaLN"])[:, None], 2, axis=-1)
    norm = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
    want = _np_unpatches(dense(norm * (1 + scale) + shift, P["final_layer"]["linear"]), p, S, S)
    if convs:  # the head: a conv after unpatchify
        want = _np_conv3x3(want, P["conv_head"])
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    # the blocks are not idle: with their adaLN (the gates) away from zero, the output moves
    stack = params["params"][dit_lib.STACK]
    moved = dict(stack, adaLN=jax.tree_util.tree_map(lambda a: a + rnd(a.size, a), stack["adaLN"]))
    moved = {"params": dict(params["params"], **{dit_lib.STACK: moved})}
    assert np.abs(np.asarray(_apply(cfg)(moved, x, t, context, mask, pooled)) - out).max() > 1e-3


def test_eps_hat_is_exactly_zero_at_init_and_the_block_layers_differ():
    x, t, context, mask, pooled = _inputs()
    params = _init(CFG, x, t, context, mask, pooled)
    assert np.all(np.asarray(_apply(CFG)(params, x, t, context, mask, pooled)) == 0.0)
    convs = dataclasses.replace(CFG, conv_stem=4, conv_head=3)  # the head reads the zero Dense
    conv_params = _init(convs, x, t, context, mask, pooled)
    assert np.all(np.asarray(_apply(convs)(conv_params, x, t, context, mask, pooled)) == 0.0)
    assert np.abs(np.asarray(_apply(convs)(_randomize(conv_params), x, t, context, mask,
                                           pooled))).max() > 1e-2
    q = np.asarray(params["params"][dit_lib.STACK]["self_attn"]["to_q"]["kernel"])  # [depth, D, H, D/H]
    assert q.shape == (CFG.depth, CFG.width, 2, 16) and not np.allclose(q[0], q[1])


# --- (b) patchify ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,p", [((2, 8, 8, 3), 2), ((1, 12, 8, 2), 4), ((2, 6, 10, 1), 1)])
def test_patchify_is_row_major_and_unpatchify_inverts_it(shape, p):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    tokens = np.asarray(dit_lib.patchify(jnp.asarray(x), p))
    np.testing.assert_array_equal(tokens, _np_patches(x, p))
    np.testing.assert_array_equal(np.asarray(dit_lib.unpatchify(jnp.asarray(tokens), p, *shape[1:3])), x)
    # the position embedding follows the same order: MAE's on a square grid
    if shape[1] == shape[2]:
        np.testing.assert_allclose(dit_lib.pos_embed_2d(16, shape[1] // p, shape[2] // p),
                                   _mae_pos_embed(16, shape[1] // p), rtol=1e-6, atol=1e-6)


# --- (c) parameter count -------------------------------------------------------------------------

def _closed_form(cfg, c_in, context_width=None, pooled=None, embedding=None, aug=False):
    """Parameters of the DiT, Dense by Dense (kernel + bias), from the paper's layers."""
    D, M, p, F = cfg.width, cfg.mlp_width, cfg.patch_size, cfg.freq_dim
    dense = lambda i, o: i * o + o
    stem, head = cfg.conv_stem, cfg.out_channels
    n = dense(9 * c_in, stem) if stem else 0                  # 3x3 conv stem
    if cfg.conv_head:                                         # a 3x3 conv after unpatchify
        n += dense(9 * cfg.conv_head, head)
        head = cfg.conv_head                                  # what the final Dense emits
    n += dense(p * p * (stem or c_in), D)                     # patch embedding
    n += dense(F, D) + dense(D, D)                            # t MLP
    n += (dense(F, D) + dense(D, D)) if aug else 0            # augmentation level MLP
    n += dense(pooled, D) if pooled else 0
    n += dense(embedding, D) if embedding else 0
    n += (cfg.num_classes + 1) * D if cfg.num_classes else 0  # label table, null row
    block = dense(D, 6 * D)                                   # adaLN-Zero
    block += 4 * dense(D, D)                                  # self-attention q, k, v, out
    if context_width:
        block += 2 * dense(D, D) + 2 * dense(context_width, D) + 2 * D  # cross q, out; k, v; LN'
    block += dense(D, M) + dense(M, D)                        # MLP
    final = dense(D, 2 * D) + dense(D, p * p * head)
    return n + cfg.depth * block + final


def test_parameter_count_is_the_closed_form():
    x, t, context, mask, pooled = _inputs()
    text = jax.eval_shape(lambda: DiT(CFG).init(jax.random.key(0), x, t, context, mask, pooled))
    assert count_params(text) == _closed_form(CFG, C, context_width=DC, pooled=DC)
    # class-conditional SR inpainting model with an image embedding: every other input
    cfg = dataclasses.replace(CFG, num_classes=10, mlp_ratio=3.0, depth=2, conv_stem=5,
                              conv_head=3)
    low_res, emb = jnp.zeros((B, S // 2, S // 2, C)), jnp.zeros((B, 7))
    other = jax.eval_shape(lambda: DiT(cfg).init(
        jax.random.key(0), x, t, label=jnp.zeros((B,), jnp.int32), low_res=low_res,
        aug_level=jnp.zeros((B,)), embedding=emb, known=x, known_mask=x[..., :1]))
    assert count_params(other) == _closed_form(cfg, C + C + C + 1, embedding=7, aug=True)


def test_digits_dit_matches_the_digits_unet_in_parameters():
    counts = {}
    for name in ("digits", "digits_dit"):
        mcfg = ModelConfig.from_config(load_config(os.path.join(ROOT, "configs", f"{name}.py")).model)
        enc = Encoded(context=jnp.zeros((1, mcfg.text.max_length, mcfg.text.width)),
                      context_mask=jnp.ones((1, mcfg.text.max_length), bool),
                      pooled=jnp.zeros((1, mcfg.text.width)))
        shapes = jax.eval_shape(lambda: Denoiser(mcfg).init(
            jax.random.key(0), jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,), jnp.int32), enc,
            method=Denoiser.denoise))
        counts[name] = count_params(shapes)
    assert abs(counts["digits_dit"] / counts["digits"] - 1) < 0.02, counts


# --- (d) scan, remat, unrolled -------------------------------------------------------------------

def _unstack(params, depth):
    p = dict(params["params"])
    stack = p.pop(dit_lib.STACK)
    p.update({f"block_{i}": jax.tree_util.tree_map(lambda a: a[i], stack) for i in range(depth)})
    return {"params": p}


def test_remat_and_an_unrolled_loop_equal_the_scanned_blocks():
    x, t, context, mask, pooled = _inputs()
    params = _randomize(_init(CFG, x, t, context, mask, pooled))

    def value_and_grad(cfg, p):
        loss = lambda p: jnp.sum(DiT(cfg).apply(p, x, t, context, mask, pooled) ** 2)
        return jax.jit(jax.value_and_grad(loss))(p)

    loss, grads = value_and_grad(CFG, params)
    # float32 rounding of another program (the keys' biases have a gradient of exactly 0 in
    # exact arithmetic, softmax being blind to a logit added to every key: rounding noise here)
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree_util.tree_leaves(grads))
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                    atol=1e-6 * scale)
    remat_loss, remat_grads = value_and_grad(dataclasses.replace(CFG, remat=True), params)
    close(remat_loss, loss)
    jax.tree_util.tree_map(close, remat_grads, grads)
    unrolled_loss, unrolled_grads = value_and_grad(dataclasses.replace(CFG, scan=False),
                                                   _unstack(params, CFG.depth))
    close(unrolled_loss, loss)
    jax.tree_util.tree_map(close, unrolled_grads, _unstack(grads, CFG.depth))


# --- (e) text ------------------------------------------------------------------------------------

def test_the_text_changes_the_output_and_masked_padding_does_not():
    x, t, context, mask, pooled = _inputs()
    params = _randomize(_init(CFG, x, t, context, mask, pooled))
    f = _apply(CFG)
    base = np.asarray(f(params, x, t, context, mask, pooled))
    junk = 100.0 * jax.random.normal(jax.random.key(9), context.shape)
    padded = jnp.where(mask[..., None], context, junk)
    np.testing.assert_array_equal(np.asarray(f(params, x, t, padded, mask, pooled)), base)
    # more padding tokens (another length): the same numbers up to float32 rounding
    longer = jnp.concatenate([context, junk[:, :3]], axis=1)
    long_mask = jnp.concatenate([mask, jnp.zeros((B, 3), bool)], axis=1)
    np.testing.assert_allclose(np.asarray(f(params, x, t, longer, long_mask, pooled)), base,
                               rtol=1e-5, atol=1e-5)
    # ... while one token inside the mask moves every image (token 0 is in every row's mask)
    changed = np.asarray(f(params, x, t, context.at[:, 0].add(1.0), mask, pooled))
    assert np.all(np.abs(changed - base).reshape(B, -1).max(axis=1) > 1e-4)
    # and a fractional t (flow matching's) is not rounded to an integer step: it moves the output
    frac = np.asarray(f(params, x, t.astype(jnp.float32) + 0.5, context, mask, pooled))
    assert np.all(np.isfinite(frac)) and np.abs(frac - base).max() > 0


def test_bfloat16_compute_agrees_with_float32():
    x, t, context, mask, pooled = _inputs()
    params = _randomize(_init(CFG, x, t, context, mask, pooled))
    full = np.asarray(_apply(CFG)(params, x, t, context, mask, pooled))
    low_cfg = dataclasses.replace(CFG, dtype="bfloat16")
    low = np.asarray(_apply(low_cfg)(params, x, t, context, mask, pooled))
    assert low.dtype == np.float32
    rel = np.linalg.norm(low - full) / np.linalg.norm(full)
    assert rel < 0.03, rel  # bf16 keeps 8 bits (0.4% per op); a few blocks compound them


# --- the Denoiser's choice -----------------------------------------------------------------------

TEXT = TextConfig(max_length=8, width=DC, num_layers=1, num_heads=2)


def test_the_denoiser_builds_the_configured_backbone_and_refuses_unknown_ones():
    cfg = ModelConfig(backbone="dit", dit=dataclasses.replace(CFG, out_channels=C), text=TEXT)
    assert cfg.out_channels == C and cfg.num_classes is None
    assert cfg.size_multiple == 2 and cfg.embedding_width == CFG.width
    model = Denoiser(cfg)
    x, t, _, _, _ = _inputs()
    cond = conditioning.text_condition(["a 1", "", "seven"], TEXT.max_length)
    params = jax.jit(model.init)(jax.random.key(0), x, t, cond)
    assert set(params["params"]) == {"dit", "text_encoder"}
    out = jax.jit(model.apply)(params, x, t, cond)
    assert out.shape == x.shape and np.all(np.asarray(out) == 0.0)
    with pytest.raises(ValueError, match=r"unknown model.backbone 'vit'.*'unet', 'dit'"):
        ModelConfig(backbone="vit")
    with pytest.raises(ValueError, match=r"not both.*dit.num_classes=None"):
        ModelConfig(backbone="dit", dit=dataclasses.replace(CFG, num_classes=10), text=TEXT)
    with pytest.raises(ValueError, match="does not split into 3 heads"):
        DiTConfig(width=32, num_heads=3)
    with pytest.raises(ValueError, match="divisible by dit.patch_size=2"):
        DiT(CFG).init(jax.random.key(0), x[:, :7, :7], t)
    # a config written before the backbone existed (no backbone, no dit) is the UNet it was
    old = load_config(os.path.join(ROOT, "configs", "digits.py")).model.to_dict()
    del old["backbone"], old["dit"]
    unet_cfg = ModelConfig.from_config(old)
    assert unet_cfg.backbone == "unet" and unet_cfg.out_channels == 1 and unet_cfg.size_multiple == 4
    # a DiT checkpoint written before the convolutions existed is the DiT without them
    current = load_config(os.path.join(ROOT, "configs", "digits_dit.py")).to_dict()
    stored = copy.deepcopy(current)
    del stored["model"]["dit"]["conv_stem"], stored["model"]["dit"]["conv_head"]
    assert checkpoint.config_differences(stored, current) == []
    current["model"]["dit"]["conv_head"] = 8
    assert checkpoint.config_differences(stored, current) == ["model.dit.conv_head: None -> 8"]


def test_a_class_conditional_dit_reads_the_label_and_its_null_row():
    cfg = dataclasses.replace(CFG, num_classes=10)
    x, t, _, _, _ = _inputs()
    labels = jnp.array([1, 2, 3])
    params = _randomize(_init(cfg, x, t, label=labels))
    f = _apply(cfg)
    out = np.asarray(f(params, x, t, label=labels))
    other = np.asarray(f(params, x, t, label=labels.at[0].set(5)))
    assert np.abs(out[0] - other[0]).max() > 1e-5 and np.array_equal(out[1:], other[1:])
    null = np.asarray(f(params, x, t, label=jnp.full((3,), 10)))
    assert np.abs(null - out).max() > 1e-5
    with pytest.raises(ValueError, match="class-conditional"):
        f(params, x, t)


# --- FSDP ----------------------------------------------------------------------------------------

def test_fsdp_splits_the_scanned_stack_on_a_weight_axis_and_computes_the_same():
    assert dit_lib.STACK.endswith(sharding.STACK_SUFFIX)
    mesh = sharding.make_mesh(fsdp=8)
    # deep and narrow: depth 64 is the largest dimension of the stacked q kernel [64, 32, 2, 16]
    deep = dataclasses.replace(CFG, depth=64, width=32)
    x, t, context, mask, pooled = _inputs()
    abstract = jax.eval_shape(lambda: DiT(deep).init(jax.random.key(0), x, t, context, mask, pooled))
    paths = jax.tree_util.tree_flatten_with_path(abstract)[0]
    specs = jax.tree_util.tree_leaves(sharding.state_shardings(abstract, mesh))
    big = [(a.shape, s.spec) for (path, a), s in zip(paths, specs, strict=True)
           if sharding.is_stacked(path) and a.size >= sharding.MIN_SHARDED_SIZE]
    assert big and all("fsdp" in spec and spec[0] is None for _, spec in big), big
    # the rule without the stack's exception would have split the layer axis of some of them
    assert any(sharding.leaf_sharding(shape, mesh).spec[0] == "fsdp" for shape, _ in big)

    # a forward + backward with the state split over 8 devices equals the one-device numbers
    cfg = dataclasses.replace(CFG, width=64, depth=2, num_heads=2)
    x, t, context, mask, pooled = _inputs(batch=8 // 2)
    x, t, context, mask, pooled = (jnp.concatenate([a, a]) for a in (x, t, context, mask, pooled))
    params = _randomize(_init(cfg, x, t, context, mask, pooled))
    loss = lambda p, *a: jnp.mean(DiT(cfg).apply(p, *a) ** 2)
    want_loss, want_grads = jax.jit(jax.value_and_grad(loss))(params, x, t, context, mask, pooled)
    shardings = sharding.state_shardings(params, mesh)
    assert any("fsdp" in s.spec for s in jax.tree_util.tree_leaves(shardings))
    placed = jax.device_put(params, shardings)
    batch = [jax.device_put(a, sharding.batch_sharding(mesh)) for a in (x, t, context, mask, pooled)]
    got_loss, got_grads = jax.jit(jax.value_and_grad(loss))(placed, *batch)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6), got_grads, want_grads)


def test_the_dit_family_trains_the_same_with_its_state_split_over_fsdp(data_dir, straight_runs,
                                                                       tmp_path):
    """The tiny "dit" family (tests/tiny_families.py) trained 4 steps with fsdp=4: the scanned
    stack split on a weight axis, the same losses and parameters as the replicated run."""
    from runs import assert_trees_close, run, tiny
    from t2i_jax.training.writers import read_metrics
    state, wd = straight_runs["dit"]
    sharded = run(tiny(data_dir, "dit", train__fsdp=4), tmp_path)
    stack = sharded.params["params"]["dit"][dit_lib.STACK]
    specs = [a.sharding.spec for a in jax.tree_util.tree_leaves(stack)]
    assert any("fsdp" in s for s in specs) and all(len(s) == 0 or s[0] is None for s in specs)
    np.testing.assert_allclose([r["loss"] for r in read_metrics(tmp_path)],
                               [r["loss"] for r in read_metrics(wd)], rtol=1e-5)
    assert_trees_close(sharded.params, state.params, atol=2e-5)



def test_dit_flow_samples_do_not_depend_on_devices_or_batch_size(straight_runs, tmp_path):
    """The tiny DiT trained by flow matching (straight_runs' "dit"), sampled with Heun and with
    Euler under APG's momentum: 8 devices at batch 1, 1 device at batch 7 and 8 at 7 write the
    same images; and each sample's image is its own (so the jobs are not trivially equal)."""
    from t2i_jax.diffusion import cfg
    from t2i_jax.sampling import job as job_lib
    from t2i_jax.sampling import outdir as out_lib
    from t2i_jax.sampling.generate import SampleOptions
    from t2i_jax.sampling.load import load_trained
    from t2i_jax.sampling.plan import Plan
    _, wd = straight_runs["dit"]
    trained = load_trained(str(wd))
    for sampler, rule in (("heun", None), ("euler", cfg.Rule(apg=cfg.APG(0.0, 2.0, -0.5)))):
        plan = Plan.create(trained, ["seven", "数字三"], num_per_prompt=3, guidance=(4.0,),
                           seed=5, options=SampleOptions(sampler, 3, thresholding=None),
                           shard_size=5, guidance_rule=rule)
        runs = {}
        for name, devices, batch in (("8dev_b1", None, 1), ("1dev_b7", jax.devices()[:1], 7),
                                     ("8dev_b7", None, 7)):
            out = str(tmp_path / f"{sampler}_{name}")
            job_lib.run_job(plan, out, batch_size=batch, devices=devices, progress=False)
            runs[name] = out_lib.load_images(out)[0]
        for name, x in runs.items():
            np.testing.assert_array_equal(x, runs["8dev_b1"], err_msg=f"{sampler} {name}")
        x = runs["8dev_b1"].astype(int)  # each sample its own noise: the images differ
        assert min(np.abs(x[i] - x[j]).max() for i in range(6) for j in range(i)) > 8
