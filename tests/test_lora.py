"""models/lora.py: LoRA (Hu et al. 2021) on the ported UNet, against closed forms and against
diffusers + peft (tests/fixtures/sd/make_lora_fixtures.py; README there): lora_diffusers.safetensors
is diffusers' own `save_lora_weights` of a rank-2, alpha-3 adapter of tiny_sd1's UNet (the factors
live only there; read raw here with safetensors.numpy, never with the code under test), and
lora_unet.npz the UNet outputs diffusers computed with it loaded by `pipe.load_lora_weights`.

Tolerance against diffusers: max |ours - diffusers| <= 1e-5 x max |diffusers| (the ports' own,
tests/test_sd_ports.py). Measured: 9e-7 of scale with the LoRA (8e-7 without); diffusers' own
float32 output is 7e-7 of scale from its float64 run, and ours as far, so both are at float32
rounding. The LoRA moves the output by 1.11 against its scale of 1.23: scale 1 for alpha / r = 1.5
is 0.42 of scale off, and leaving out any one of the 100 layers at least 3e-3 of scale.
"""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import flax.linen as nn
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from t2i_jax.models import lora, lora_files
from t2i_jax.models import unet2d_condition as unet_lib

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "sd")
DIFFUSERS_FILE = os.path.join(FIXTURES, "lora_diffusers.safetensors")
TOL = 1e-5
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def unet():
    """(cfg, params, param map, jitted apply) of tiny_sd1's UNet."""
    cfg, params = unet_lib.load(os.path.join(FIXTURES, "tiny_sd1", "unet"))
    return cfg, params, unet_lib.param_map(cfg), jax.jit(unet_lib.UNet2DConditionModel(cfg).apply)


@pytest.fixture(scope="module")
def oracle():
    with np.load(os.path.join(FIXTURES, "lora_unet.npz")) as z:
        return {k: z[k] for k in z.files}


def _flax_of(pmap):
    """diffusers module name -> Flax module path, of every kernel."""
    return {names[0][:-len(".weight")]: path[:-len("/kernel")]
            for path, (names, _, _) in pmap.items() if path.endswith("/kernel")}


def _raw(pmap):
    """{diffusers module: (A [r, in], B [out, r])} of diffusers' file, and the same as factors."""
    tensors = load_file(DIFFUSERS_FILE)
    torch_layout = {k[len("unet."):-len(".lora_A.weight")]:
                    (a, tensors[k.replace("lora_A", "lora_B")])
                    for k, a in tensors.items() if k.endswith(".lora_A.weight")}
    flax_of, flat = _flax_of(pmap), {}
    for name, (a, b) in torch_layout.items():
        flat[f"{flax_of[name]}/lora_a"], flat[f"{flax_of[name]}/lora_b"] = a.T, b.T
    return torch_layout, {"params": traverse_util.unflatten_dict(flat, sep="/")}


def _nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


def _run(apply, params, oracle):
    return np.asarray(apply(params, _nhwc(oracle["unet.sample"]),
                            oracle["unet.timestep"].astype(np.int32),
                            oracle["unet.encoder_hidden_states"]))          # [B, H, W, 4]


def _close(got, want, what):
    want = _nhwc(want)
    err, scale = float(np.abs(np.asarray(got, np.float64) - want).max()), float(np.abs(want).max())
    assert err <= TOL * scale, f"{what}: max |ours - diffusers| {err:.3g} > {TOL} x {scale:.3g}"


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _assert_trees_equal(a, b):
    fa, fb = traverse_util.flatten_dict(a, sep="/"), traverse_util.flatten_dict(b, sep="/")
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert _bits_equal(fa[k], fb[k]), k


def _random_b(factors, seed=1):
    """The factors with B ~ N(0, 0.5^2) (A as given), float32."""
    flat = traverse_util.flatten_dict(factors, sep="/")
    rng = np.random.default_rng(seed)
    return traverse_util.unflatten_dict(
        {k: (0.5 * rng.standard_normal(v.shape)).astype(np.float32) if k.endswith("lora_b")
         else np.asarray(v) for k, v in flat.items()}, sep="/")


# ---- config and targets ----

def test_config_from_config():
    assert lora.LoraConfig.from_config(None) is None
    assert lora.LoraConfig.from_config({"rank": 0, "alpha": 0.0}) is None   # full fine-tuning
    cfg = lora.LoraConfig.from_config(ml_collections.ConfigDict(
        dict(rank=4, alpha=0.0, targets=("to_q", "to_k", "to_v", "to_out.0"))))
    assert cfg == lora.LoraConfig() and cfg.alpha == 4.0 and cfg.scale == 1.0
    cfg = lora.LoraConfig.from_config({"rank": 8, "alpha": 4, "targets": "to_q, to_out_0"})
    assert (cfg.scale, cfg.targets) == (0.5, ("to_q", "to_out_0"))
    with pytest.raises(ValueError, match="unknown key.*dropout; it takes rank, alpha, targets"):
        lora.LoraConfig.from_config({"rank": 4, "dropout": 0.1})
    for bad in (dict(rank=-1), dict(rank=2.5), dict(alpha=-1.0), dict(targets=()),
                dict(targets="to_q")):
        with pytest.raises(ValueError, match="LoRA"):
            lora.LoraConfig(**bad)


def test_targets_of(unet):
    _, params, pmap, _ = unet
    paths = lora.targets_of(params, lora.LoraConfig(), pmap)
    # 11 transformer blocks x 2 attentions x 4 projections, every one a 2-D kernel
    assert len(paths) == 88 and all(p.rsplit("/", 1)[1] in ("to_q", "to_k", "to_v", "to_out_0")
                                    for p in paths)
    # the Flax form and a longer suffix name the same layers
    assert lora.targets_of(params, lora.LoraConfig(targets=("to_out_0",)), pmap) == \
        lora.targets_of(params, lora.LoraConfig(targets=("to_out.0",)), pmap)
    assert len(lora.targets_of(params, lora.LoraConfig(targets=("attn2.to_k",)), pmap)) == 11
    assert lora.targets_of(params, lora.LoraConfig(targets=("time_embedding.linear_1",)), pmap) == \
        ["time_embedding_linear_1"]


def test_targets_matching_nothing_or_only_convs_are_refused(unet):
    _, params, pmap, _ = unet
    with pytest.raises(ValueError) as e:
        lora.targets_of(params, lora.LoraConfig(targets=("to_q", "to_qq")), pmap)
    msg = str(e.value)
    assert "\n" not in msg and "'to_qq' matches no layer" in msg
    assert "to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2, time_emb_proj, " \
        "time_embedding.linear_1" in msg
    with pytest.raises(ValueError, match="'proj_in' matches only convolution.*1x1 convs"):
        lora.targets_of(params, lora.LoraConfig(targets=("proj_in",)), pmap)
    # SD 2.x's proj_in / proj_out are Linear layers
    cfg2, params2 = unet_lib.load(os.path.join(FIXTURES, "tiny_sd2", "unet"))
    assert len(lora.targets_of(params2, lora.LoraConfig(targets=("proj_in", "proj_out")),
                               unet_lib.param_map(cfg2))) == 22


# ---- init and merge ----

def test_init_factors(unet):
    _, params, pmap, _ = unet
    cfg = lora.LoraConfig(rank=3)
    factors = lora.init_factors(jax.random.PRNGKey(0), params, cfg, pmap)
    flat = traverse_util.flatten_dict(factors["params"], sep="/")
    assert len(flat) == 2 * 88
    q = "down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k"   # cross-attention: in 32
    a, b = flat[f"{q}/lora_a"], flat[f"{q}/lora_b"]
    assert (a.shape, b.shape, a.dtype, b.dtype) == ((32, 3), (3, 16), jnp.float32, jnp.float32)
    assert not np.any(b) and 0 < np.abs(a).max() <= 1 / np.sqrt(32)
    every_a = np.concatenate([np.ravel(v) * np.sqrt(v.shape[0]) for k, v in flat.items()
                              if k.endswith("lora_a")])    # U(-1, 1) after scaling by sqrt(in)
    assert abs(every_a.mean()) < 0.05 and abs(every_a.var() - 1 / 3) < 0.03
    # deterministic; a layer's draw does not depend on which other layers are targeted
    again = lora.init_factors(jax.random.PRNGKey(0), params, lora.LoraConfig(rank=3, targets=(
        "attn2.to_k",)), pmap)
    assert _bits_equal(again["params"]["down_blocks_1"]["attentions_0"]["transformer_blocks_0"][
        "attn2"]["to_k"]["lora_a"], a)
    shapes = jax.eval_shape(lambda k: lora.init_factors(k, params, cfg, pmap),
                            jax.random.PRNGKey(0))     # traceable: a training init may jit it
    assert jax.tree_util.tree_map(lambda x: x.shape, shapes) == \
        jax.tree_util.tree_map(lambda x: x.shape, factors)
    other = lora.init_factors(jax.random.PRNGKey(1), params, cfg, pmap)
    assert not np.array_equal(
        traverse_util.flatten_dict(other["params"], sep="/")[f"{q}/lora_a"], a)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_with_b_zero_is_bit_identical(unet, dtype):
    _, params, pmap, _ = unet
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype), params)
    cfg = lora.LoraConfig(rank=4, alpha=7.0, targets=("to_q", "to_k", "to_v", "to_out.0",
                                                      "ff.net.0.proj", "ff.net.2", "time_emb_proj"))
    factors = lora.init_factors(jax.random.PRNGKey(0), params, cfg, pmap)
    _assert_trees_equal(jax.jit(lora.merge)(params, factors, cfg.scale), params)
    if dtype == "float32":   # eagerly too (op by op: slower, so once)
        _assert_trees_equal(lora.merge(params, factors, cfg.scale), params)


def test_merge_is_the_formula(unet):
    _, params, pmap, _ = unet
    cfg = lora.LoraConfig(rank=2, alpha=3.0, targets=("to_out.0", "ff.net.0.proj"))
    factors = _random_b(lora.init_factors(jax.random.PRNGKey(0), params, cfg, pmap))
    merged = lora.merge(params, factors, cfg.scale)
    jitted = jax.jit(lora.merge)(params, factors, cfg.scale)   # scale traced
    base, out, out_jit = (traverse_util.flatten_dict(t["params"], sep="/")
                          for t in (params, merged, jitted))
    pairs = {k.rsplit("/", 1)[0] for k in traverse_util.flatten_dict(factors["params"], sep="/")}
    assert len(pairs) == 33   # to_out.0 of attn1 and attn2, ff.net.0.proj: x 11 blocks
    for k, w in base.items():
        m = k.rsplit("/", 1)[0]
        if m in pairs and k.endswith("/kernel"):
            f = factors["params"]
            for part in m.split("/"):
                f = f[part]
            want = np.float64(w) + 1.5 * np.float64(f["lora_a"]) @ np.float64(f["lora_b"])
            np.testing.assert_allclose(out[k], want, rtol=1e-6, atol=1e-6, err_msg=k)
            np.testing.assert_allclose(out_jit[k], out[k], rtol=1e-6, atol=1e-7, err_msg=k)
            assert out[k].dtype == w.dtype
        else:
            assert _bits_equal(out[k], w), k


def test_unet_merged_equals_adapter_applied_on_the_fly(unet, oracle):
    """UNet(W + s A B) against the base UNet whose targeted Dense layers return
    x W + b + s (x A) B (Hu et al. 2021, eq. 3: the unmerged form, as PEFT computes it)."""
    cfg_u, params, pmap, apply = unet
    cfg = lora.LoraConfig(rank=2, alpha=3.0, targets=("to_v", "ff.net.2"))
    factors = _random_b(lora.init_factors(jax.random.PRNGKey(2), params, cfg, pmap))
    flat = traverse_util.flatten_dict(factors["params"], sep="/")
    seen = []

    def adapter(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        path = "/".join(context.module.path)
        if isinstance(context.module, nn.Dense) and f"{path}/lora_a" in flat:
            seen.append(path)
            x = args[0]
            y = y + cfg.scale * (x @ flat[f"{path}/lora_a"]) @ flat[f"{path}/lora_b"]
        return y

    model = unet_lib.UNet2DConditionModel(cfg_u)
    inputs = (_nhwc(oracle["unet.sample"]), oracle["unet.timestep"].astype(np.int32),
              oracle["unet.encoder_hidden_states"])
    def unmerged(p, *x):
        with nn.intercept_methods(adapter):
            return model.apply(p, *x)

    on_the_fly = np.asarray(jax.jit(unmerged)(params, *inputs))
    assert len(set(seen)) == 33
    merged = np.asarray(apply(lora.merge(params, factors, cfg.scale), *inputs))
    base = np.asarray(apply(params, *inputs))
    assert np.abs(merged - base).max() > 0.05 * np.abs(base).max()   # the adapter matters
    np.testing.assert_allclose(merged, on_the_fly, rtol=0, atol=1e-5 * np.abs(base).max())


# ---- against diffusers ----

def test_unet_with_lora_matches_diffusers(unet, oracle):
    _, params, pmap, apply = unet
    _, factors = _raw(pmap)
    scale = float(oracle["meta.alpha"]) / int(oracle["meta.rank"])      # 3 / 2
    _close(_run(apply, params, oracle), oracle["unet.out_base"], "base UNet")
    _close(_run(apply, lora.merge(params, factors, scale), oracle), oracle["unet.out"],
           "UNet with diffusers' LoRA")


def test_load_reads_diffusers_file(unet):
    cfg_u, _, pmap, _ = unet
    _, want = _raw(pmap)
    factors, cfg = lora_files.load(DIFFUSERS_FILE, cfg_u, pmap)
    _assert_trees_equal(factors, want)
    assert cfg == lora.LoraConfig(rank=2, alpha=3.0, targets=(
        "ff.net.2", "time_embedding.linear_1", "to_k", "to_out.0", "to_q", "to_v"))


def test_save_writes_diffusers_layout(unet, tmp_path):
    """Our save of diffusers' factors: the same tensors, bit for bit, and the adapter metadata's
    values that diffusers' file has (make_lora_fixtures.py also loads our file into diffusers)."""
    cfg_u, _, pmap, _ = unet
    _, factors = _raw(pmap)
    cfg = lora.LoraConfig(rank=2, alpha=3, targets=("to_q", "to_k", "to_v", "to_out_0", "ff.net.2",
                                                    "time_embedding.linear_1"))
    path = lora_files.save(str(tmp_path), factors, cfg, pmap)
    assert path == str(tmp_path / "pytorch_lora_weights.safetensors")
    ours, theirs = load_file(path), load_file(DIFFUSERS_FILE)
    assert sorted(ours) == sorted(theirs)
    assert all(_bits_equal(ours[k], theirs[k]) for k in ours)
    with safe_open(path, "numpy") as f, safe_open(DIFFUSERS_FILE, "numpy") as g:
        mine, diffusers = f.metadata(), g.metadata()
    assert sorted(mine) == sorted(diffusers) == ["format", "lora_adapter_metadata"]
    assert mine["format"] == diffusers["format"] == "pt"
    mine, diffusers = (json.loads(m["lora_adapter_metadata"]) for m in (mine, diffusers))
    assert mine["unet.target_modules"] == ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2",
                                           "time_embedding.linear_1"]
    for k, v in mine.items():
        assert k in diffusers and (sorted(v) == sorted(diffusers[k]) if k.endswith("target_modules")
                                   else v == diffusers[k]), k
    assert (mine["unet.r"], mine["unet.lora_alpha"]) == (2, 3)


@pytest.mark.parametrize("rank,alpha,targets,where", [
    (4, None, lora.DEFAULT_TARGETS, "directory"),
    (3, 5.5, ("to_out_0", "ff.net.0.proj", "attn2.to_k", "time_emb_proj"), "file")])
def test_save_load_round_trip(unet, tmp_path, rank, alpha, targets, where):
    """Bit for bit, alpha != rank included; a Flax-form target comes back in diffusers' form."""
    cfg_u, params, pmap, _ = unet
    cfg = lora.LoraConfig(rank=rank, alpha=alpha, targets=targets)
    factors = _random_b(lora.init_factors(jax.random.PRNGKey(3), params, cfg, pmap))
    path = str(tmp_path / "a.safetensors") if where == "file" else str(tmp_path)
    written = lora_files.save(path, factors, cfg, pmap)
    got, got_cfg = lora_files.load(path, cfg_u)           # the param map from the UNet's config
    _assert_trees_equal(got, factors)
    assert got_cfg == lora.LoraConfig(rank=rank, alpha=alpha, targets=tuple(
        t.replace("to_out_0", "to_out.0") for t in targets))
    assert written == (path if where == "file" else str(tmp_path / lora_files.WEIGHT_NAME))


def test_older_layouts_read_to_the_same_factors(unet, oracle, tmp_path):
    """kohya / A1111 (alpha tensors), diffusers' lora.down / lora.up names, and the old attention
    processor layout (attention factors only, no alpha: scale 1, which diffusers' own reading of
    such a file confirms: unet.out_old)."""
    cfg_u, params, pmap, apply = unet
    raw, factors = _raw(pmap)
    want_cfg = lora_files.load(DIFFUSERS_FILE, cfg_u, pmap)[1]
    kohya, new, old = {}, {}, {}
    for name, (a, b) in raw.items():
        stem = "lora_unet_" + name.replace(".", "_")
        kohya.update({f"{stem}.lora_down.weight": a.astype(np.float16),
                      f"{stem}.lora_up.weight": b.astype(np.float16),
                      f"{stem}.alpha": np.array(3.0, np.float16)})
        new.update({f"unet.{name}.lora.down.weight": a, f"unet.{name}.lora.up.weight": b})
        attn, _, proj = name.rpartition(".to_")
        if f"to_{proj}" in ATTENTION:
            p = "to_out" if proj == "out.0" else f"to_{proj}"
            old.update({f"{attn}.processor.{p}_lora.down.weight": a,
                        f"{attn}.processor.{p}_lora.up.weight": b})
    for layout, tensors in (("kohya", kohya), ("new", new), ("old", old)):
        save_file(tensors, str(tmp_path / f"{layout}.safetensors"))
    got, cfg = lora_files.load(str(tmp_path / "kohya.safetensors"), cfg_u, pmap)
    f16 = jax.tree_util.tree_map(lambda x: x.astype(np.float16).astype(np.float32), factors)
    _assert_trees_equal(got, f16)
    assert (cfg.rank, cfg.alpha) == (2, 3.0) and set(cfg.targets) == set(want_cfg.targets)
    got, cfg = lora_files.load(str(tmp_path / "new.safetensors"), cfg_u, pmap)
    _assert_trees_equal(got, factors)
    assert (cfg.rank, cfg.alpha, set(cfg.targets)) == (2, 2.0, set(want_cfg.targets))
    got, cfg = lora_files.load(str(tmp_path / "old.safetensors"), cfg_u, pmap)
    keep = {k: v for k, v in traverse_util.flatten_dict(factors, sep="/").items()
            if k.split("/")[-2] in ("to_q", "to_k", "to_v", "to_out_0")}
    _assert_trees_equal(got, traverse_util.unflatten_dict(keep, sep="/"))
    assert cfg == lora.LoraConfig(rank=2, alpha=2.0, targets=ATTENTION)
    _close(_run(apply, lora.merge(params, got, cfg.scale), oracle), oracle["unet.out_old"],
           "UNet with the old-layout LoRA")


# ---- files it refuses ----

def _unet_pair(name, r=2, d_in=8, d_out=8, prefix="unet."):
    return {f"{prefix}{name}.lora_A.weight": np.zeros((r, d_in), np.float32),
            f"{prefix}{name}.lora_B.weight": np.zeros((d_out, r), np.float32)}


Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"


@pytest.mark.parametrize("tensors,match", [
    (None, "is not a readable safetensors file"),
    ("absent", "does not exist"),
    ({"conv_in.weight": np.zeros((8, 4, 3, 3), np.float32)}, "holds no UNet LoRA keys"),
    (_unet_pair("text_encoder.x", prefix=""), r"holds no UNet LoRA keys \(2 text-encoder"),
    (_unet_pair("down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q"),
     "names no Linear layer of this UNet"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((2, 8, 1, 1)),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": np.zeros((8, 2, 1, 1))},
     "names the convolution down_blocks.0.attentions.0.proj_in"),
    (_unet_pair(Q, d_in=16), r"has down / A .* \(2, 16\).*needs \[r, 8\]"),
    ({**_unet_pair(Q), **_unet_pair(K, r=4)}, "inconsistent ranks: .*attn1.to_q 2, .*to_k 4"),
    ({f"unet.{Q}.lora_A.weight": np.zeros((2, 8), np.float32)}, "has no up / B matrix"),
    ({**_unet_pair(Q), f"unet.{Q}.lora_magnitude_vector": np.zeros(8, np.float32)},
     "not a UNet LoRA tensor in a layout read here .*DoRA"),
    ({**_unet_pair(Q), **_unet_pair("text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                                    prefix="")},
     "2 text-encoder LoRA keys .*not supported.*skip_text_encoder=True"),
])
def test_bad_files_are_refused_naming_the_file(unet, tmp_path, tensors, match):
    cfg_u, _, pmap, _ = unet
    path = tmp_path / "bad.safetensors"
    if tensors is None:
        path.write_bytes(b"not a safetensors file")
    elif tensors != "absent":
        save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(path))
    with pytest.raises(ValueError, match=match) as e:
        lora_files.load(str(path), cfg_u, pmap)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_text_encoder_keys_skipped_on_request(unet, tmp_path):
    cfg_u, _, pmap, _ = unet
    path = str(tmp_path / "both.safetensors")
    save_file({**_unet_pair(Q), "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down"
               ".weight": np.zeros((2, 32), np.float32)}, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        factors, cfg = lora_files.load(path, cfg_u, pmap, skip_text_encoder=True)
    assert any("1 text-encoder LoRA keys skipped" in str(w.message) for w in caught)
    assert cfg.targets == ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",)
    assert lora.targets_of(unet[1], cfg, pmap) == [
        "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q"]


def test_metadata_alpha_that_lora_cannot_represent_is_refused(unet, tmp_path):
    cfg_u, _, pmap, _ = unet
    path = str(tmp_path / "rs.safetensors")
    save_file(_unet_pair(Q), path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(
        {"unet.r": 2, "unet.lora_alpha": 4, "unet.use_rslora": True})})
    with pytest.raises(ValueError, match="sets use_rslora, which is not supported"):
        lora_files.load(path, cfg_u, pmap)
