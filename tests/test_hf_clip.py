"""The CLIP port (t2i_jax/models/hf_clip.py) against an independent NumPy forward and BPE
(tests/np_clip.py), the `tokenizers` package's own output, and the publisher's real layout
(transformers' modeling_clip.py names; openai/clip-vit-base-patch32's and Stable Diffusion 1.x's
published configs)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_clip
from t2i_jax.conditioning import CLIPTokenizer
from t2i_jax.models import hf_clip, hf_clip_vision, tiny_pretrained
from t2i_jax.models.weights import flax_shape, params_from_tensors

TEXTS = ["a small red circle above a large blue square",      # the shapes vocabulary: whole words
         "A  Large\tGREEN triangle!!",                         # case, whitespace runs, punctuation
         "it's a purple square's corner, 3 shapes",            # contractions, digits
         "一个红色的圆在蓝色的正方形上面",                          # Chinese seen in training
         "紫色的星星",                                           # Chinese never seen: byte fallback
         "a 🔴 red circle ✨🎨 and a 🦄",                        # emoji, seen and unseen
         "café naïve",                                          # Latin-1 letters
         " ".join(["a small red circle above a large blue square"] * 6)]  # far past 16 tokens
L = 16  # the tiny text tower's max_position_embeddings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, config.json dict, tensors): a tiny CLIPModel written by write_tiny."""
    from safetensors.numpy import load_file
    d = str(tmp_path_factory.mktemp("clip_tiny"))
    tiny_pretrained.write_tiny_clip(d)
    with open(os.path.join(d, "config.json")) as f:
        hf = json.load(f)
    return d, hf, load_file(os.path.join(d, "model.safetensors"))


@pytest.fixture(scope="module")
def slow_dir(tiny, tmp_path_factory):
    """The same tokenizer as vocab.json + merges.txt only (no tokenizer.json)."""
    d = str(tmp_path_factory.mktemp("clip_slow"))
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny[0], name), d)
    return d


@pytest.fixture(scope="module")
def jitted():
    """One jitted apply per (module); each is compiled once per input shape."""
    cache = {}

    def get(module):
        if module not in cache:
            cache[module] = jax.jit(module.apply)
        return cache[module]
    return get


def _text(tiny, jitted, ids, mask, text_config=None, **module_kwargs):
    """(port TextFeatures as numpy, the tower's config dict, its CLIPTextConfig)."""
    hf = tiny_pretrained.clip_hf_config(text_config=text_config or {})
    cfg = hf_clip.text_config_from_hf(hf)
    params = params_from_tensors(hf_clip.text_param_map(cfg), tiny[2])
    out = jitted(hf_clip.CLIPTextTransformer(cfg, **module_kwargs))(params, ids, mask)
    return jax.tree_util.tree_map(np.asarray, out), hf["text_config"], cfg


def _close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


# ---- text tower ----

@pytest.mark.parametrize("length", [L, 7])
def test_text_matches_numpy_reference(tiny, jitted, length):
    tok = CLIPTokenizer.from_dir(tiny[0], length)
    toks = tok(["blue", "a red circle"] + TEXTS[:3] + TEXTS[5:], warn=False)  # 3 to past `length` tokens
    feats, tcfg, cfg = _text(tiny, jitted, toks.ids, toks.mask)
    ref = np_clip.text_forward(tiny[2], tcfg, toks.ids, toks.mask)
    assert feats.tokens.shape == (len(toks.ids), length, 32) and feats.pooled.shape == (len(toks.ids), 16)
    _close(feats.tokens, ref["last_hidden_state"])
    # pooled: the final-normed state at the FIRST EOS (pad is EOS too), through text_projection
    first_eos = np.argmax(toks.ids == cfg.eos_token_id, axis=1)
    np.testing.assert_array_equal(ref["eos"], first_eos)
    assert len(set(first_eos.tolist())) > 2  # the rows pool at different positions
    proj = tiny[2]["text_projection.weight"].astype(np.float64)
    _close(feats.pooled, ref["last_hidden_state"][np.arange(len(first_eos)), first_eos] @ proj.T)
    _close(feats.pooled, ref["text_embeds"])
    np.testing.assert_array_equal(feats.mask, toks.mask)


def test_legacy_eos_token_id_2_pools_at_argmax(tiny, jitted):
    # Old configs say eos_token_id 2: transformers then pools at argmax(ids), not at id 2.
    ids = np.array([[635, 10, 2, 20, 636, 636, 636, 636], [635, 2, 300, 2, 40, 636, 636, 636]], np.int32)
    mask = np.ones_like(ids, bool)
    feats, tcfg, _ = _text(tiny, jitted, ids, mask, {"eos_token_id": 2, "bos_token_id": 0})
    ref = np_clip.text_forward(tiny[2], tcfg, ids, mask)
    np.testing.assert_array_equal(ref["eos"], [4, 5])
    _close(feats.pooled, ref["text_embeds"])
    at_id_2 = ref["last_hidden_state"][[0, 1], [2, 1]] @ tiny[2]["text_projection.weight"].T
    assert np.abs(feats.pooled - at_id_2).max() > 1e-2
    # and the current rule with the real EOS id pools at the first 636: a different vector here
    new, _, _ = _text(tiny, jitted, ids, mask)
    _close(new.pooled, np_clip.text_forward(tiny[2], dict(tcfg, eos_token_id=636), ids, mask)["text_embeds"])


def test_causal_mask(tiny, jitted):
    toks = CLIPTokenizer.from_dir(tiny[0], L)(TEXTS[:1])
    ids, mask = toks.ids, np.ones_like(toks.mask)
    changed = ids.copy()
    j = 5
    changed[0, j] = 100 if ids[0, j] != 100 else 101
    a, _, _ = _text(tiny, jitted, ids, mask)
    b, _, _ = _text(tiny, jitted, changed, mask)
    np.testing.assert_array_equal(a.tokens[0, :j], b.tokens[0, :j])  # the past: bit for bit
    assert (np.abs(a.tokens[0, j:] - b.tokens[0, j:]).max(-1) > 1e-4).all()  # every later position moves
    assert np.abs(a.pooled - b.pooled).max() > 1e-4  # EOS (position 10) sees the change


def test_padding(tiny, jitted):
    toks = CLIPTokenizer.from_dir(tiny[0], L)([TEXTS[1], "a red circle"])
    eos = toks.mask.sum(1) - 1  # mask is True up to and including the first EOS
    np.testing.assert_array_equal(toks.ids[np.arange(2), eos], 636)
    a, tcfg, _ = _text(tiny, jitted, toks.ids, toks.mask)
    other = np.where(toks.mask, toks.ids, 7)  # other padding ids
    b, _, _ = _text(tiny, jitted, other, toks.mask)
    for i in range(2):
        np.testing.assert_array_equal(a.tokens[i, :eos[i] + 1], b.tokens[i, :eos[i] + 1])
    np.testing.assert_array_equal(a.pooled, b.pooled)
    # Without the padding mask (diffusers' Stable Diffusion call): the same up to EOS, and past
    # it the padding attends to itself.
    c, _, _ = _text(tiny, jitted, toks.ids, toks.mask, mask_padding=False)
    ref = np_clip.text_forward(tiny[2], tcfg, toks.ids, None)
    _close(c.tokens, ref["last_hidden_state"])
    for i in range(2):
        _close(c.tokens[i, :eos[i] + 1], a.tokens[i, :eos[i] + 1], 1e-5)
        assert np.abs(c.tokens[i, eos[i] + 1:] - a.tokens[i, eos[i] + 1:]).max() > 1e-3
    _close(c.pooled, a.pooled, 1e-5)


def test_gelu_variant(tiny, jitted):
    toks = CLIPTokenizer.from_dir(tiny[0], L)(TEXTS[:3], warn=False)
    g, tcfg, cfg = _text(tiny, jitted, toks.ids, toks.mask, {"hidden_act": "gelu"})
    assert cfg.hidden_act == "gelu"
    ref = np_clip.text_forward(tiny[2], tcfg, toks.ids, toks.mask)
    _close(g.tokens, ref["last_hidden_state"])
    _close(g.pooled, ref["text_embeds"])
    q, _, _ = _text(tiny, jitted, toks.ids, toks.mask)
    assert np.abs(g.tokens - q.tokens).max() > 1e-3  # the activation is really switched


def test_penultimate_layer(tiny, jitted):
    toks = CLIPTokenizer.from_dir(tiny[0], L)(TEXTS[:2])
    a, tcfg, _ = _text(tiny, jitted, toks.ids, toks.mask, layer=-2)
    b, _, _ = _text(tiny, jitted, toks.ids, toks.mask, layer=-2, layer_norm_tokens=False)
    ref = np_clip.text_forward(tiny[2], tcfg, toks.ids, toks.mask)
    _close(a.tokens, ref["final_layer_norm"](ref["hidden_states"][-2]))  # SD 2.x style
    _close(b.tokens, ref["hidden_states"][-2])                           # SDXL style
    _close(a.pooled, ref["text_embeds"])  # pooled stays the last layer's
    with pytest.raises(ValueError, match="layer -4"):
        _text(tiny, jitted, toks.ids, toks.mask, layer=-4)
    with pytest.raises(ValueError, match="max_position_embeddings 16"):
        _text(tiny, jitted, np.zeros((1, 17), np.int32), np.ones((1, 17), bool))


# ---- vision tower ----

def test_vision_matches_numpy_reference(tiny, jitted):
    hf = tiny[1]
    cfg = hf_clip.vision_config_from_hf(hf)
    assert (cfg.image_size, cfg.patch_size, cfg.num_positions, cfg.projection_dim) == (24, 8, 10, 16)
    images = np.random.default_rng(1).uniform(-1, 1, (2, 24, 24, 3)).astype(np.float32)
    pixels = np.asarray(hf_clip_vision.preprocess(images, 24))
    apply = jitted(hf_clip_vision.CLIPVisionTransformer(cfg))
    pmap = hf_clip.vision_param_map(cfg)
    outs = []
    # the checkpoint, then with the class token, the position table (rows permuted) and
    # pre_layrnorm changed: each must reach the output as the reference says
    changes = [{}, {"vision_model.embeddings.class_embedding": lambda a: a[::-1]},
               {"vision_model.embeddings.position_embedding.weight": lambda a: a[[0, 3, 6, 9, 2, 5, 8, 1, 4, 7]]},
               {"vision_model.pre_layrnorm.weight": lambda a: a * 2.0}]
    for change in changes:
        tensors = {k: (change[k](v) if k in change else v) for k, v in tiny[2].items()}
        out = jax.tree_util.tree_map(np.asarray, apply(params_from_tensors(pmap, tensors), pixels))
        ref = np_clip.vision_forward(tensors, hf["vision_config"], pixels)
        assert out.last_hidden_state.shape == (2, 10, 48) and out.image_embeds.shape == (2, 16)
        _close(out.last_hidden_state, ref["last_hidden_state"])
        _close(out.pooled, ref["pooled"])
        _close(out.image_embeds, ref["image_embeds"])
        outs.append(out.image_embeds)
    for changed in outs[1:]:
        assert np.abs(changed - outs[0]).max() > 1e-3
    with pytest.raises(ValueError, match=r"\[B, 24, 24, 3\]"):
        hf_clip_vision.CLIPVisionTransformer(cfg).apply(params_from_tensors(pmap, tiny[2]), pixels[:, :16])


def test_preprocess(tiny):
    mean, std = np.array(hf_clip_vision.OPENAI_CLIP_MEAN), np.array(hf_clip_vision.OPENAI_CLIP_STD)
    # a constant colour survives any resize: exactly CLIP's normalisation per channel
    colour = np.array([-1.0, 0.2, 1.0])
    out = np.asarray(hf_clip_vision.preprocess(np.broadcast_to(colour, (2, 30, 45, 3)), 24))
    assert out.shape == (2, 24, 24, 3)
    _close(out, np.broadcast_to(((colour + 1) / 2 - mean) / std, out.shape), 1e-5)
    # the centre crop: a 24 x 48 image white in its middle 24 columns, black outside
    img = -np.ones((1, 24, 48, 3))
    img[:, :, 12:36] = 1.0
    out = np.asarray(hf_clip_vision.preprocess(img, 24))
    _close(out, np.broadcast_to((1 - mean) / std, out.shape), 1e-5)
    # the processor's file supplies size and statistics
    with open(os.path.join(tiny[0], "preprocessor_config.json")) as f:
        proc = json.load(f)
    proc = dict(proc, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 1.0])
    out = np.asarray(hf_clip_vision.preprocess(np.zeros((1, 24, 24, 3)), 224, processor_config=proc))
    assert out.shape == (1, 24, 24, 3)
    _close(out[0, 0, 0], [0.0, 0.0, 0.0])


# ---- tokenizer ----

def _vocab_merges(directory):
    with open(os.path.join(directory, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(directory, "merges.txt"), encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().splitlines()[1:] if line]
    return vocab, merges


def test_tokenizer_matches_tokenizers_package_and_reference_bpe(tiny, slow_dir):
    from tokenizers import Tokenizer
    package = Tokenizer.from_file(os.path.join(tiny[0], "tokenizer.json"))  # adds BOS/EOS itself
    vocab, merges = _vocab_merges(slow_dir)
    fast = CLIPTokenizer.from_dir(tiny[0], L, tiny[1]["text_config"]["vocab_size"])
    slow = CLIPTokenizer.from_dir(slow_dir, L)
    a, b = fast(TEXTS, warn=False), slow(TEXTS, warn=False)
    for t in (a, b):
        assert t.ids.dtype == np.int32 and t.ids.shape == (len(TEXTS), L)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.mask, b.mask)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert (bos, eos) == (len(vocab) - 2, len(vocab) - 1) == (fast.bos_id, fast.eos_id)
    for i, text in enumerate(TEXTS):
        full = package.encode(text).ids
        body = np_clip.bpe_encode(text, vocab, merges)
        assert full == [bos] + body + [eos]  # the package, the reference BPE
        assert full.count(bos) == 1 and full.count(eos) == 1
        row = ([bos] + body[:L - 2] + [eos])
        np.testing.assert_array_equal(a.ids[i, :len(row)], row)
        np.testing.assert_array_equal(a.ids[i, len(row):], eos)  # openai pads with <|endoftext|>
        np.testing.assert_array_equal(a.mask[i], np.arange(L) < len(row))
        assert a.truncated[i] == (len(body) > L - 2)
    assert a.truncated[-1] and not a.truncated[0]
    # whole words of the training captions are single tokens with the end-of-word suffix
    assert [package.id_to_token(t) for t in a.ids[0, 1:4]] == ["a</w>", "small</w>", "red</w>"]
    # unseen characters fall back to bytes (never <|endoftext|> as unk): 3 UTF-8 bytes each
    assert eos not in a.ids[4, 1:a.mask[4].sum() - 1] and a.mask[4].sum() - 2 > 5
    assert fast.decode(a.ids) == slow.decode(b.ids)
    # NFC (a decomposed é), and a prompt holding <|endoftext|> itself: the mask ends at the first
    text = "a cafe\u0301 <|endoftext|> red circle"
    full = package.encode(text).ids
    assert full == [bos] + np_clip.bpe_encode(text, vocab, merges) + [eos]
    head = [bos] + np_clip.bpe_encode("a café", vocab, merges)  # composed, as NFC makes it
    assert full[:len(head) + 1] == head + [eos]
    for t in (fast, slow):
        out = t([text])
        np.testing.assert_array_equal(out.ids[0, :len(full)], full)
        np.testing.assert_array_equal(out.mask[0], np.arange(L) <= len(head))
    wide = CLIPTokenizer.from_dir(tiny[0], 64)  # nothing cut: decode inverts up to normalisation
    assert wide.decode(wide(TEXTS[:7]).ids) == ["a small red circle above a large blue square",
                                      "a large green triangle !!", "it 's a purple square 's corner , 3 shapes",
                                      TEXTS[3], TEXTS[4], "a 🔴 red circle ✨🎨 and a 🦄", "café naïve"]


def test_tokenizer_truncation_keeps_eos_and_warns(tiny):
    tok = CLIPTokenizer.from_dir(tiny[0], 8)
    with pytest.warns(UserWarning, match=r"2 prompt\(s\) longer than 6 CLIP tokens were truncated"):
        out = tok([TEXTS[-1], "a red circle", TEXTS[0]])
    assert out.truncated.tolist() == [True, False, True]
    np.testing.assert_array_equal(out.ids[[0, 2], -1], tok.eos_id)
    np.testing.assert_array_equal(out.ids[:, 0], tok.bos_id)
    assert out.mask[0].all() and out.mask[1].sum() == 5
    np.testing.assert_array_equal(out.ids[0], out.ids[2])  # the same first 6 tokens


def test_tokenizer_pad_token_from_special_tokens_map(tiny, slow_dir, tmp_path):
    for name in os.listdir(slow_dir):
        shutil.copy(os.path.join(slow_dir, name), tmp_path)
    with open(tmp_path / "special_tokens_map.json", "w") as f:
        json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "pad_token": {"content": "!"}}, f)  # SD 2.x pads with "!"
    tok = CLIPTokenizer.from_dir(str(tmp_path), L)
    out = tok(["a red circle"])
    assert tok.pad_id == _vocab_merges(slow_dir)[0]["!"] == 0
    np.testing.assert_array_equal(out.ids[0, 5:], 0)
    assert out.ids[0, 4] == tok.eos_id and out.mask[0].sum() == 5


# ---- errors ----

def test_config_errors_name_the_field(tiny):
    for read in (hf_clip.text_config_from_hf, hf_clip.vision_config_from_hf, hf_clip.configs_from_hf):
        with pytest.raises(ValueError, match=r"model_type is 'bert'.*'clip'.*'clip_text_model'"):
            read({"model_type": "bert", "hidden_size": 768})
    with pytest.raises(ValueError, match=r"hidden_act 'relu'.*'quick_gelu'.*'gelu'"):
        hf_clip.text_config_from_hf(tiny_pretrained.clip_hf_config(text_config={"hidden_act": "relu"}))
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        hf_clip.vision_config_from_hf(tiny_pretrained.clip_hf_config(vision_config={"hidden_act": "relu"}))
    with pytest.raises(ValueError, match="no CLIP vision tower"):
        hf_clip.vision_config_from_hf(tiny[1]["text_config"])


def test_tokenizer_errors(tiny, tmp_path):
    v = tiny[1]["text_config"]["vocab_size"]
    with pytest.raises(ValueError, match=rf"tokenizer\.json has {v} tokens, more than the model's vocab_size {v - 1}"):
        CLIPTokenizer.from_dir(tiny[0], L, v - 1)
    with pytest.raises(ValueError, match=r"no CLIP tokenizer: it needs tokenizer\.json, or vocab\.json and merges\.txt"):
        CLIPTokenizer.from_dir(str(tmp_path), L, v)
    with pytest.raises(TypeError):
        CLIPTokenizer.from_dir(tiny[0], L)("a single string")


# ---- configs and the publisher's real layout ----

def test_config_parsing():
    # CLIPModel with a sparse text_config: transformers' defaults; CLIP-L's *_config_dict wins
    cfg = hf_clip.text_config_from_hf({"model_type": "clip", "text_config": {"eos_token_id": 2}})
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
            cfg.num_attention_heads, cfg.max_position_embeddings, cfg.hidden_act, cfg.layer_norm_eps,
            cfg.bos_token_id, cfg.eos_token_id, cfg.projection_dim) == (
        49408, 512, 2048, 12, 8, 77, "quick_gelu", 1e-5, 49406, 2, 512)
    cfg = hf_clip.text_config_from_hf({"model_type": "clip", "projection_dim": 768,
                                       "text_config": {"hidden_size": 512, "bos_token_id": 0},
                                       "text_config_dict": {"hidden_size": 768}})
    assert (cfg.hidden_size, cfg.bos_token_id, cfg.projection_dim) == (768, 0, 768)
    vis = hf_clip.vision_config_from_hf({"model_type": "clip", "vision_config": None})
    assert (vis.hidden_size, vis.image_size, vis.patch_size, vis.num_positions) == (768, 224, 32, 50)
    # Stable Diffusion's text_encoder carries projection_dim without weights for it
    sd = _SD1_TEXT_ENCODER
    assert hf_clip.text_config_from_hf(sd).projection_dim is None
    sdxl2 = dict(sd, architectures=["CLIPTextModelWithProjection"], projection_dim=1280)
    assert hf_clip.text_config_from_hf(sdxl2).projection_dim == 1280
    assert hf_clip.configs_from_hf(sd)[1] is None
    v = hf_clip.vision_config_from_hf({"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"]})
    assert v.projection_dim is None


# openai/clip-vit-base-patch32's config.json as published (the fields the port reads; transformers
# 4.x dumps every field; eos 2 / bos 0 / pad 1 predate PR #24773)
_VIT_B32 = {
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 512,
    "logit_scale_init_value": 2.6592, "initializer_factor": 1.0, "text_config_dict": None,
    "vision_config_dict": None,
    "text_config": {"model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 512,
                    "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
                    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
                    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "projection_dim": 512},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 768, "intermediate_size": 3072,
                      "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 224,
                      "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
                      "projection_dim": 512},
}
# CompVis/stable-diffusion-v1-4 text_encoder/config.json (openai/clip-vit-large-patch14's text tower)
_SD1_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "projection_dim": 768,
    "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
}


def _hf_names(tower: str, layers: int, d: int, ff: int) -> dict:
    """{name: shape} of one tower's encoder layers, spelled out from modeling_clip.py's modules:
    CLIPEncoder.layers[i] = CLIPEncoderLayer(self_attn: CLIPAttention(k, v, q, out_proj Linear),
    layer_norm1, mlp: CLIPMLP(fc1, fc2), layer_norm2)."""
    out = {}
    for i in range(layers):
        p = f"{tower}.encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            out[p + f"self_attn.{proj}.weight"], out[p + f"self_attn.{proj}.bias"] = (d, d), (d,)
        for ln in ("layer_norm1", "layer_norm2"):
            out[p + f"{ln}.weight"], out[p + f"{ln}.bias"] = (d,), (d,)
        out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = (ff, d), (ff,)
        out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = (d, ff), (d,)
    return out


def _publisher(pmap) -> dict:
    """{the published name: shape}; a text_model. name may also be read without its prefix
    (transformers v5's CLIPTextModel), and nothing else."""
    for names, _, _ in pmap.values():
        assert names[1:] in ((), (names[0][len("text_model."):],)), names
        assert len(names) == 1 or names[0].startswith("text_model.")
    return {names[0]: tuple(shape) for names, shape, _ in pmap.values()}


def _check_covers_module(module, pmap, *args):
    """The map's Flax paths are exactly the module's parameters, shapes after the transform."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
    flat = {"/".join(k.key for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    assert flat == {path: flax_shape(shape, t) for path, (_, shape, t) in pmap.items()}


def test_vit_b32_layout():
    text, vision = hf_clip.configs_from_hf(_VIT_B32)
    assert text.eos_token_id == 2 and text.projection_dim == 512 and vision.projection_dim == 512
    t, v = _publisher(hf_clip.text_param_map(text)), _publisher(hf_clip.vision_param_map(vision))
    expected_t = {"text_model.embeddings.token_embedding.weight": (49408, 512),
                  "text_model.embeddings.position_embedding.weight": (77, 512),
                  "text_model.final_layer_norm.weight": (512,), "text_model.final_layer_norm.bias": (512,),
                  "text_projection.weight": (512, 512), **_hf_names("text_model", 12, 512, 2048)}
    expected_v = {"vision_model.embeddings.class_embedding": (768,),
                  "vision_model.embeddings.patch_embedding.weight": (768, 3, 32, 32),
                  "vision_model.embeddings.position_embedding.weight": (50, 768),
                  "vision_model.pre_layrnorm.weight": (768,), "vision_model.pre_layrnorm.bias": (768,),
                  "vision_model.post_layernorm.weight": (768,), "vision_model.post_layernorm.bias": (768,),
                  "visual_projection.weight": (512, 768), **_hf_names("vision_model", 12, 768, 3072)}
    assert t == expected_t and v == expected_v
    # 2 embeddings + 12 layers x 16 tensors + final LN (2) = 196, + text_projection;
    # 3 embeddings + pre LN (2) + 12 x 16 + post LN (2) = 199, + visual_projection
    assert (len(t), len(v)) == (197, 200)
    # ViT-B/32 has 151,277,313 parameters: these and logit_scale
    assert sum(int(np.prod(s)) for s in {**t, **v}.values()) + 1 == 151_277_313
    _check_covers_module(hf_clip.CLIPTextTransformer(text), hf_clip.text_param_map(text),
                         jnp.zeros((1, 77), jnp.int32), jnp.ones((1, 77), bool))
    _check_covers_module(hf_clip_vision.CLIPVisionTransformer(vision), hf_clip.vision_param_map(vision),
                         jnp.zeros((1, 224, 224, 3)))


def test_stable_diffusion_1_text_encoder_layout():
    cfg = hf_clip.text_config_from_hf(_SD1_TEXT_ENCODER)
    names = _publisher(hf_clip.text_param_map(cfg))
    assert names == {"text_model.embeddings.token_embedding.weight": (49408, 768),
                     "text_model.embeddings.position_embedding.weight": (77, 768),
                     "text_model.final_layer_norm.weight": (768,), "text_model.final_layer_norm.bias": (768,),
                     **_hf_names("text_model", 12, 768, 3072)}
    assert len(names) == 196 and "text_projection.weight" not in names
    assert sum(int(np.prod(s)) for s in names.values()) == 123_060_480  # CLIP ViT-L/14's text tower


def test_tiny_directory_is_the_publisher_layout(tiny):
    d, hf, tensors = tiny
    text, vision = hf_clip.configs_from_hf(hf)
    wanted = {**_publisher(hf_clip.text_param_map(text)), **_publisher(hf_clip.vision_param_map(vision))}
    # the checkpoint's extra (CLIPModel's logit_scale, which the port does not read) is there too
    assert {k: tuple(a.shape) for k, a in tensors.items() if k != "logit_scale"} == wanted
    assert tensors["logit_scale"].size == 1
    assert all(a.dtype == np.float32 for a in tensors.values())
    assert sorted(os.listdir(d)) == sorted(["config.json", "model.safetensors", "tokenizer.json", "vocab.json",
                                            "merges.txt", "special_tokens_map.json", "tokenizer_config.json",
                                            "preprocessor_config.json"])
    # O(1) activations with norm weights near 1: the tiny model is a meaningful test subject
    assert 0.5 < np.abs(tensors["text_model.final_layer_norm.weight"]).mean() < 1.5
    assert tiny_pretrained.clip_tensors(hf, seed=0).keys() == tensors.keys()
    assert not np.array_equal(tiny_pretrained.clip_tensors(hf, seed=1)["visual_projection.weight"],
                              tensors["visual_projection.weight"])
