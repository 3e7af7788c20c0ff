"""The Stable Diffusion ports (models/unet2d_condition.py, models/autoencoder_kl.py) against
diffusers itself: tests/fixtures/sd holds tiny SD 1.x- and 2.x-shaped diffusers folders (tiny_sd2's
weights only as the .fp16. variant) and modules.npz, the outputs diffusers computed from them in
float32 (tests/fixtures/sd/README.md). The folders are read here with the project's own reader.

Tolerance: max |port - diffusers| <= 1e-5 x max |diffusers output|, every output. Measured:
<= 8e-7 of scale for the UNets, <= 2.5e-6 for the VAE; diffusers' own float32 outputs differ from
its float64 run of the same weights by 0.5e-6 to 7e-6 (absolute; up to 2e-6 of scale), so both sides
are at float32 rounding. A real mistake is far above it: a GroupNorm eps of 1e-6 where diffusers
has 1e-5 (or the reverse) moves the outputs by 6e-5 to 2e-4 of their scale.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from t2i_jax.models import autoencoder_kl as vae_lib
from t2i_jax.models import unet2d_condition as unet_lib
from t2i_jax.models.weights import load_params, weight_files

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "sd")
VARIANTS = ("sd1", "sd2")
TOL = 1e-5  # of the output's max |value|; see the module docstring


def _nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


def _close(got, want, what):
    want = _nhwc(want)
    err, scale = float(np.abs(np.asarray(got, np.float64) - want).max()), float(np.abs(want).max())
    assert got.shape == want.shape, f"{what}: shape {got.shape}, diffusers {want.shape}"
    assert err <= TOL * scale, f"{what}: max |port - diffusers| {err:.3g} > {TOL} x {scale:.3g}"


@pytest.fixture(scope="module")
def oracle():
    return np.load(os.path.join(FIXTURES, "modules.npz"))


@pytest.fixture(scope="module")
def unets():
    """variant -> (cfg, params, jitted apply), loaded once."""
    out = {}
    for v in VARIANTS:
        cfg, params = unet_lib.load(os.path.join(FIXTURES, f"tiny_{v}", "unet"))
        out[v] = (cfg, params, jax.jit(unet_lib.UNet2DConditionModel(cfg).apply))
    return out


@pytest.fixture(scope="module")
def vaes():
    """variant -> (cfg, params, jitted encode, jitted decode), loaded once."""
    out = {}
    for v in VARIANTS:
        cfg, params = vae_lib.load(os.path.join(FIXTURES, f"tiny_{v}", "vae"))
        m = vae_lib.AutoencoderKL(cfg)
        out[v] = (cfg, params,
                  jax.jit(lambda p, x, m=m: m.apply(p, x, method=vae_lib.AutoencoderKL.encode)),
                  jax.jit(lambda p, z, m=m: m.apply(p, z, method=vae_lib.AutoencoderKL.decode)))
    return out


# ---- against diffusers ----

@pytest.mark.parametrize("v", VARIANTS)
def test_configs_read_as_published(v):
    """attention_head_dim is the head COUNT: per block for SD 2.x, reversed for the up path."""
    cfg, _ = unet_lib.load(os.path.join(FIXTURES, f"tiny_{v}", "unet"))
    if v == "sd1":
        assert cfg.num_attention_heads == (2, 2, 2) and not cfg.use_linear_projection
    else:
        assert cfg.num_attention_heads == (2, 4, 4) and cfg.use_linear_projection
        assert [b.heads for b in unet_lib.up_blocks(cfg)] == [4, 4, 2]
    vcfg = vae_lib.AutoencoderKLConfig.from_diffusers(
        unet_lib.read_config(os.path.join(FIXTURES, f"tiny_{v}", "vae")))
    assert (vcfg.scaling_factor, vcfg.shift_factor) == (0.18215, None)


@pytest.mark.parametrize("v", VARIANTS)
@pytest.mark.parametrize("kind", ["int", "float"])
def test_unet_matches_diffusers(unets, oracle, v, kind):
    cfg, params, apply = unets[v]
    key = "timestep" if kind == "int" else "timestep_float"
    t = oracle[f"{v}.unet.{key}"].astype(np.int32 if kind == "int" else np.float32)
    out = apply(params, _nhwc(oracle[f"{v}.unet.sample"]), t,
                oracle[f"{v}.unet.encoder_hidden_states"])  # [B, H, W, 4]
    _close(out, oracle[f"{v}.unet.out" + ("" if kind == "int" else "_float")], f"{v} unet {kind} t")


@pytest.mark.parametrize("v", VARIANTS)
def test_vae_encode_matches_diffusers(vaes, oracle, v):
    _, params, encode, _ = vaes[v]
    mean, logvar = encode(params, _nhwc(oracle[f"{v}.vae.image"]))
    _close(mean, oracle[f"{v}.vae.mean"], f"{v} vae mean")
    _close(logvar, oracle[f"{v}.vae.logvar"], f"{v} vae logvar")


@pytest.mark.parametrize("v", VARIANTS)
def test_vae_decode_matches_diffusers(vaes, oracle, v):
    _, params, _, decode = vaes[v]
    _close(decode(params, _nhwc(oracle[f"{v}.vae.latents"])), oracle[f"{v}.vae.decoded"],
           f"{v} vae decoded")


def test_unet_bfloat16_compute_tracks_float32(unets, oracle):
    """cfg.dtype bfloat16 (parameters left float32): the same network, to bf16 rounding."""
    import dataclasses
    cfg, params, apply = unets["sd2"]
    args = (_nhwc(oracle["sd2.unet.sample"]), oracle["sd2.unet.timestep"].astype(np.int32),
            oracle["sd2.unet.encoder_hidden_states"])
    ref = np.asarray(apply(params, *args))
    bf = unet_lib.UNet2DConditionModel(dataclasses.replace(cfg, dtype="bfloat16"))
    out = np.asarray(jax.jit(bf.apply)(params, *args))
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() <= 3e-2 * np.abs(ref).max()


@pytest.mark.parametrize("v", VARIANTS)
@pytest.mark.parametrize("part", ["unet", "vae"])
def test_param_map_reads_every_tensor(v, part):
    """The map names every tensor of diffusers' file (none left unread) and nothing else."""
    d = os.path.join(FIXTURES, f"tiny_{v}", part)
    lib = unet_lib if part == "unet" else vae_lib
    cls = unet_lib.UNet2DConditionConfig if part == "unet" else vae_lib.AutoencoderKLConfig
    pmap = lib.param_map(cls.from_diffusers(unet_lib.read_config(d)))
    in_file = set(weight_files(d))
    assert in_file == {next((n for n in names if n in in_file), names[0])
                       for names, _, _ in pmap.values()}


# ---- the publisher's names, shapes and files ----

def _rewrite(src: str, dst: str, edit) -> None:
    """dst: a copy of the diffusers folder src with its tensors passed through edit(dict)."""
    from safetensors.numpy import load_file, save_file
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    for path in sorted(set(weight_files(src).values())):
        tensors = edit(dict(load_file(path)))
        save_file(tensors, os.path.join(dst, os.path.basename(path)), metadata={"format": "pt"})


def _same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def test_vae_reads_old_attention_names(tmp_path):
    """Checkpoints converted before diffusers 0.14 name the mid-block attention query, key,
    value, proj_attn: the same parameters as to_q, to_k, to_v, to_out.0."""
    src = os.path.join(FIXTURES, "tiny_sd1", "vae")
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def rename(tensors):
        out = {}
        for name, a in tensors.items():
            for new, was in old.items():
                name = name.replace(f".attentions.0.{new}.", f".attentions.0.{was}.")
            out[name] = a
        return out

    _rewrite(src, str(tmp_path / "vae"), rename)
    names = set(weight_files(str(tmp_path / "vae")))
    assert "encoder.mid_block.attentions.0.query.weight" in names
    assert not any(".to_q." in n for n in names)
    _same_params(vae_lib.load(str(tmp_path / "vae"))[1], vae_lib.load(src)[1])


def test_misshapen_and_missing_tensors_are_named(tmp_path):
    src = os.path.join(FIXTURES, "tiny_sd1", "unet")

    def damage(tensors):
        tensors["conv_in.weight"] = tensors["conv_in.weight"][:, :3]     # 3 input channels, not 4
        del tensors["mid_block.attentions.0.proj_out.bias"]
        return tensors

    _rewrite(src, str(tmp_path / "unet"), damage)
    with pytest.raises(ValueError, match=r"'conv_in.weight' has shape \(8, 3, 3, 3\), the "
                       r"config says \(8, 4, 3, 3\).*mid_block.attentions.0.proj_out.bias"):
        unet_lib.load(str(tmp_path / "unet"))


def test_weight_files_variants_and_diffusers_shards(tmp_path):
    """One mechanism for every layout: the plain file is preferred to a variant; variant= picks
    one; a lone variant is read; diffusers' shards are read through their index."""
    from safetensors.numpy import load_file, save_file
    src = os.path.join(FIXTURES, "tiny_sd2", "vae")          # holds only the .fp16. variant
    cfg = vae_lib.AutoencoderKLConfig.from_diffusers(unet_lib.read_config(src))
    pmap = vae_lib.param_map(cfg)
    fp16 = load_file(os.path.join(src, "diffusion_pytorch_model.fp16.safetensors"))
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(os.path.join(src, "diffusion_pytorch_model.fp16.safetensors"), both)
    plain = {k: (a.astype(np.float32) * 2) for k, a in fp16.items()}  # a different copy
    save_file(plain, str(both / "diffusion_pytorch_model.safetensors"))
    read = lambda d, **kw: load_params(str(d), pmap, **kw)["params"]  # noqa: E731
    conv_in = lambda p: np.asarray(p["encoder"]["conv_in"]["bias"])  # noqa: E731
    np.testing.assert_array_equal(conv_in(read(both)), plain["encoder.conv_in.bias"])
    np.testing.assert_array_equal(conv_in(read(both, variant="fp16")),
                                  fp16["encoder.conv_in.bias"].astype(np.float32))
    np.testing.assert_array_equal(conv_in(read(src)),
                                  fp16["encoder.conv_in.bias"].astype(np.float32))
    os.remove(both / "diffusion_pytorch_model.safetensors")
    save_file(plain, str(both / "diffusion_pytorch_model.bf16.safetensors"))
    with pytest.raises(ValueError, match=r"variants \['bf16', 'fp16'\].*pass variant="):
        read(both)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names, weight_map = sorted(fp16), {}
    for s in range(2):
        file = f"diffusion_pytorch_model-0000{s + 1}-of-00002.safetensors"
        save_file({n: fp16[n] for n in names[s::2]}, str(sharded / file))
        weight_map.update({n: file for n in names[s::2]})
    with open(sharded / "diffusion_pytorch_model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    _same_params(read(sharded), read(src))
    os.remove(sharded / "diffusion_pytorch_model-00002-of-00002.safetensors")
    with pytest.raises(ValueError, match="lists shards that are not in"):
        read(sharded)


# ---- refusals ----

def _sd_config(v="sd1", part="unet"):
    return unet_lib.read_config(os.path.join(FIXTURES, f"tiny_{v}", part))


@pytest.mark.parametrize("field,value", [
    ("addition_embed_type", "text_time"),                  # SDXL
    ("transformer_layers_per_block", [1, 2, 10]),           # SDXL
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("resnet_time_scale_shift", "scale_shift"),
    ("only_cross_attention", True),
    ("time_cond_proj_dim", 256),                            # LCM
    ("act_fn", "gelu"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("down_block_types", ["CrossAttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"]),
])
def test_unet_refuses_unsupported_fields(field, value):
    config = _sd_config()
    config[field] = value
    with pytest.raises(ValueError, match=rf"UNet2DConditionModel config field {field}=.* is not "
                                         r"supported: the port implements"):
        unet_lib.UNet2DConditionConfig.from_diffusers(config)


def test_unet_refuses_an_sdxl_config_naming_addition_embed_type():
    config = dict(_sd_config(), addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816)
    with pytest.raises(ValueError, match=r"addition_embed_type='text_time' is not supported.*"
                                         r"SDXL's 'text_time'"):
        unet_lib.UNet2DConditionConfig.from_diffusers(config)


def test_unknown_fields_refused_metadata_ignored():
    config = dict(_sd_config(), _class_name="UNet2DConditionModel", _name_or_path="x")
    unet_lib.UNet2DConditionConfig.from_diffusers(config)  # "_" fields: metadata
    with pytest.raises(ValueError, match=r"fields \['new_knob'\] this port does not know"):
        unet_lib.UNet2DConditionConfig.from_diffusers(dict(config, new_knob=1))


def test_num_attention_heads_means_heads():
    """A config giving num_attention_heads (diffusers' intended name) is read as the head count."""
    config = dict(_sd_config("sd2"), num_attention_heads=[1, 2, 4], attention_head_dim=64)
    assert unet_lib.UNet2DConditionConfig.from_diffusers(config).num_attention_heads == (1, 2, 4)


@pytest.mark.parametrize("field,value", [
    ("latents_mean", [0.0] * 4),
    ("latents_std", [1.0] * 4),
    ("down_block_types", ["AttnDownEncoderBlock2D"] * 4),
    ("act_fn", "relu"),
])
def test_vae_refuses_unsupported_fields(field, value):
    config = dict(_sd_config("sd1", "vae"), **{field: value})
    with pytest.raises(ValueError, match=rf"AutoencoderKL config field {field}=.* is not "
                                         r"supported"):
        vae_lib.AutoencoderKLConfig.from_diffusers(config)
