"""The project's readers against the PUBLISHED Stable Diffusion folders: SD 1.4, SD 1.5, SD 2.1-base
and SD 2.1 (768, v-prediction). tests/fixtures/sd/layouts/<model>/ holds each folder's config files,
verbatim from the publishers' Hugging Face repositories (README.md there gives repo, commit and
blob of each), and tensors.json per network: every tensor name and shape of the published
checkpoint, as diffusers / transformers build the network from that config (make_layouts.py, on
torch's meta device). Nothing is downloaded and torch is not imported here.

Each param_map must name exactly the published tensors with exactly their shapes: a tensor the
map expects that the checkpoint lacks, one the checkpoint has that the map leaves unread, or a
shape off by one channel fails. resaved.json is the same config as today's diffusers /
transformers write it on save (every field filled in); it must read to the same config.
"""

import json
import os

import numpy as np
import pytest

from t2i_jax.diffusion.diffusers_scheduler import SAMPLER_OF_CLASS, DiffusersScheduler
from t2i_jax.models import autoencoder_kl as vae_lib
from t2i_jax.models import hf_clip
from t2i_jax.models import unet2d_condition as unet_lib

LAYOUTS = os.path.join(os.path.dirname(__file__), "fixtures", "sd", "layouts")
MODELS = ("sd14", "sd15", "sd21_base", "sd21")
SD2 = ("sd21_base", "sd21")
CONFIG_FILES = ("published", "resaved")
# Tensors a published checkpoint holds that no parameter reads: transformers <= 4.30 saved CLIP's
# position_ids buffer (hf_clip's docstring: old *.embeddings.position_ids buffers are ignored).
IGNORED = {"text_model.embeddings.position_ids": [1, 77]}
_OLD_VAE_ATTENTION = (".query.", ".key.", ".value.", ".proj_attn.")


def _json(model, component, name):
    with open(os.path.join(LAYOUTS, model, component, name)) as f:
        return json.load(f)


def _config(model, component, which="published"):
    if which == "resaved":
        return _json(model, component, "resaved.json")
    return _json(model, component, "scheduler_config.json" if component == "scheduler" else
                 "config.json")


def _expected(pmap, pick=0):
    """{publisher name: shape} the map reads, taking each entry's names[pick] (0: canonical)."""
    out = {}
    for path, (names, shape, _) in pmap.items():
        assert names[pick] not in out, f"{names[pick]} is read by two Flax paths ({path})"
        out[names[pick]] = list(shape)
    return out


def _assert_same(expected, published, what):
    missing = sorted(set(expected) - set(published))
    unread = sorted(set(published) - set(expected))
    misshaped = sorted(f"{k}: map {expected[k]}, checkpoint {published[k]}"
                       for k in set(expected) & set(published) if expected[k] != published[k])
    assert not (missing or unread or misshaped), (
        f"{what}: {len(missing)} expected but not published {missing[:5]}; {len(unread)} "
        f"published but not read {unread[:5]}; {len(misshaped)} misshaped {misshaped[:5]}")


# ---- the networks' tensors ----

@pytest.mark.parametrize("model", MODELS)
def test_unet_map_is_the_published_checkpoint(model):
    cfg = unet_lib.UNet2DConditionConfig.from_diffusers(_config(model, "unet"))
    published = _json(model, "unet", "tensors.json")
    assert len(published) == 686
    _assert_same(_expected(unet_lib.param_map(cfg)), published, f"{model} unet")


@pytest.mark.parametrize("model", MODELS)
def test_vae_map_is_the_published_checkpoint(model):
    """The published VAEs name the mid-block attention's projections query/key/value/proj_attn
    (diffusers before 0.15); the map lists to_q/... first and those after."""
    cfg = vae_lib.AutoencoderKLConfig.from_diffusers(_config(model, "vae"))
    published = _json(model, "vae", "tensors.json")
    old = [k for k in published if any(s in k for s in _OLD_VAE_ATTENTION)]
    assert len(old) == 16, old  # 4 projections x (weight, bias) x (encoder, decoder)
    pmap = vae_lib.param_map(cfg)
    _assert_same(_expected(pmap, pick=-1), published, f"{model} vae (old attention names)")
    # the same map with the current names: only the 16 attention tensors differ
    renamed = {k: v for k, v in published.items() if k not in old}
    for k in old:
        for o, n in zip(_OLD_VAE_ATTENTION, (".to_q.", ".to_k.", ".to_v.", ".to_out.0.")):
            if o in k:
                renamed[k.replace(o, n)] = published[k]
    _assert_same(_expected(pmap), renamed, f"{model} vae (to_q names)")


@pytest.mark.parametrize("model", MODELS)
def test_text_encoder_map_is_the_published_checkpoint(model):
    cfg = hf_clip.text_config_from_hf(_config(model, "text_encoder"))
    published = _json(model, "text_encoder", "tensors.json")
    for name, shape in IGNORED.items():
        assert published.pop(name) == shape, name
    assert all(k.startswith("text_model.") for k in published)
    assert len(published) == 4 + 16 * cfg.num_hidden_layers
    pmap = hf_clip.text_param_map(cfg)
    _assert_same(_expected(pmap), published, f"{model} text_encoder")
    # transformers v5 saves the same tensors without the prefix: the map's second names
    unprefixed = {k[len("text_model."):]: v for k, v in published.items()}
    _assert_same(_expected(pmap, pick=1), unprefixed, f"{model} text_encoder (v5 names)")


# ---- what the configs say ----

@pytest.mark.parametrize("which", CONFIG_FILES)
@pytest.mark.parametrize("model", MODELS)
def test_unet_config(model, which):
    """attention_head_dim is the head COUNT: 8 in every SD 1.x block (heads of 40, 80, 160
    channels); SD 2.x's [5, 10, 20, 20] gives heads of 64 channels everywhere."""
    cfg = unet_lib.UNet2DConditionConfig.from_diffusers(_config(model, "unet", which))
    assert cfg == unet_lib.UNet2DConditionConfig.from_diffusers(_config(model, "unet"))
    sd2 = model in SD2
    heads = (5, 10, 20, 20) if sd2 else (8, 8, 8, 8)
    assert cfg.block_out_channels == (320, 640, 1280, 1280)
    assert cfg.num_attention_heads == heads
    head_size = [c // h for c, h in zip(cfg.block_out_channels, heads)]
    assert head_size == ([64] * 4 if sd2 else [40, 80, 160, 160])
    assert [b.heads for b in unet_lib.up_blocks(cfg)] == list(heads[::-1])
    assert cfg.cross_attention_dim == ((1024,) if sd2 else (768,)) * 4
    assert cfg.use_linear_projection is sd2
    assert cfg.upcast_attention is (model == "sd21")  # the 768-v model only
    assert cfg.sample_size == (96 if model == "sd21" else 64)
    assert cfg.layers_per_block == (2,) * 4 and cfg.in_channels == cfg.out_channels == 4


@pytest.mark.parametrize("which", CONFIG_FILES)
@pytest.mark.parametrize("model", MODELS)
def test_vae_config(model, which):
    cfg = vae_lib.AutoencoderKLConfig.from_diffusers(_config(model, "vae", which))
    assert cfg == vae_lib.AutoencoderKLConfig.from_diffusers(_config(model, "vae"))
    assert cfg.block_out_channels == (128, 256, 512, 512) and cfg.layers_per_block == 2
    assert cfg.latent_channels == 4 and cfg.shift_factor is None
    # SD 1.5's and 2.x's published files have no scaling_factor: diffusers' default applies
    assert cfg.scaling_factor == 0.18215
    assert cfg.use_quant_conv and cfg.use_post_quant_conv and cfg.mid_block_add_attention


@pytest.mark.parametrize("which", CONFIG_FILES)
@pytest.mark.parametrize("model", MODELS)
def test_text_encoder_config(model, which):
    """SD 1.x: OpenAI's CLIP ViT-L/14 text tower (quick_gelu, 12 x 768); SD 2.x: OpenCLIP
    ViT-H/14's, its last layer dropped (exact gelu, 23 x 1024). Both CLIPTextModel: no
    text_projection weights although the config has a projection_dim."""
    cfg = hf_clip.text_config_from_hf(_config(model, "text_encoder", which))
    assert cfg == hf_clip.text_config_from_hf(_config(model, "text_encoder"))
    sd2 = model in SD2
    assert cfg.hidden_act == ("gelu" if sd2 else "quick_gelu")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.intermediate_size) == ((23, 1024, 16, 4096) if sd2 else (12, 768, 12, 3072))
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (49408, 77)
    assert cfg.projection_dim is None
    assert cfg.eos_token_id == 2  # pre-#24773 configs: the pooler takes argmax(ids)


@pytest.mark.parametrize("which", CONFIG_FILES)
@pytest.mark.parametrize("model", MODELS)
def test_scheduler_config(model, which):
    """Read without refusal; SD 2.1 (768) is DDIM with v-prediction, the others PNDM with eps;
    50 steps of DDIM, DPM-Solver++(2M), Euler and the folder's own sampler can be made. DDIM's
    are 981, 961, ..., 1 ("leading" spacing, steps_offset 1) on every file."""
    config = _config(model, "scheduler", which)
    sched = DiffusersScheduler.from_config(config)
    assert sched.class_name == ("DDIMScheduler" if model == "sd21" else "PNDMScheduler")
    assert sched.default_sampler == SAMPLER_OF_CLASS[sched.class_name]
    assert sched.prediction == ("v" if model == "sd21" else "eps")
    assert sched.num_train_timesteps == 1000
    # scaled_linear: sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012)
    betas = sched.betas()
    np.testing.assert_allclose(betas[[0, -1]], [0.00085, 0.012], rtol=1e-12)
    for sampler in ("ddim", "dpmpp_2m", "euler"):
        assert len(sched.steps(sampler, 50).t) == 50, sampler
    leading = np.arange(981, 0, -20)
    np.testing.assert_array_equal(sched.steps("ddim", 50).t, leading)
    steps = sched.steps(sched.default_sampler, 50)
    if sched.default_sampler == "pndm":  # diffusers' PLMS: t[1] visited twice (its warm-up)
        np.testing.assert_array_equal(steps.t, np.concatenate([leading[:2], leading[1:]]))
