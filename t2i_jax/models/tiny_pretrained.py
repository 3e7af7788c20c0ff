"""Tiny random T5 and CLIP models written in their publishers' layouts (config.json, safetensors
weights, tokenizer files), for the tests and `python -m t2i_jax.models.pretrained make-tiny`.

Their tokenizers are trained on sentences of a small fixed word list (the vocabulary of the
`shapes` captions, plus a few Chinese, emoji and European lines), so a tiny frozen-encoder
config trains on the shapes data set without unknown words; the list lives here so that models/
needs no data module (tests/test_t5.py checks that it still matches data/shapes.py).
"""

from __future__ import annotations

import io
import json
import os
from typing import Optional, Sequence

import numpy as np

from t2i_jax.conditioning.clip_tokenizer import (BOS_TOKEN, EOS_TOKEN, byte_chars, clip_bpe,
                                                 clip_pipeline)
from t2i_jax.conditioning.tokenizers import T5_EOS_ID, T5_PAD_ID, T5_UNK_ID
from t2i_jax.models import hf_clip, t5
from t2i_jax.models.hf_clip_vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from t2i_jax.models.weights import write_safetensors

# The shapes captions' words (data/shapes.py: SIZES, COLOURS, SHAPES, RELATIONS) and its fixed
# sample prompts, in its order: the tokenizers trained on them are the same as when they were
# read from data/shapes.py.
SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("above", "below", "left of", "right of")
PROMPTS = ("a large red circle", "a small blue square", "a large green triangle",
           "a yellow circle above a purple square", "a small green square left of a large red circle",
           "a large purple triangle right of a small blue square",
           "a large red triangle", "a blue circle below a green square")

# t5-v1_1-base's shapes (with the tiny vocabulary): for timing an encoder of the real size
T5_BASE_SHAPES = dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128)


# ---- T5: spiece.model, config.json, model.safetensors ----

_T5_MULTILINGUAL = ("一个红色的圆在蓝色的正方形上面", "一个小的绿色三角形",
                    "a 🔴 red circle above a 🟦 blue square ✨",
                    "un grand cercle rouge à gauche d'un carré bleu",
                    "ein kleines gelbes Dreieck über einem lila Kreis")


def t5_sentences() -> list:
    """The tiny SentencePiece model's training text: the prompts, each size-colour-shape phrase
    and one relation of it, and the multilingual lines."""
    out = list(PROMPTS)
    for i, (size, colour, shape) in enumerate(
            (s, c, h) for s in SIZES for c in COLOURS for h in SHAPES):
        other = COLOURS[(i + 2) % len(COLOURS)], SHAPES[(i + 1) % len(SHAPES)]
        out.append(f"a {size} {colour} {shape}")
        out.append(f"a {colour} {shape} {RELATIONS[i % len(RELATIONS)]} a {other[0]} {other[1]}")
    return out + list(_T5_MULTILINGUAL)


def train_tiny_spiece(path: str, sentences: Optional[Sequence[str]] = None, vocab_size: int = 96) -> str:
    """Trains a SentencePiece unigram model with T5's special ids (pad 0, </s> 1, unk 2, no BOS)
    on `sentences` (default: t5_sentences(): the shapes captions plus a few Chinese, emoji and
    European lines)
    and writes it: an existing directory (or a path ending in a separator) gets `spiece.model`,
    a path ending in ".model" is the file, anything else is a prefix (SentencePiece's
    model_prefix: `path + ".model"`). Returns the file written; no other file is left behind."""
    import sentencepiece as spm
    if os.path.isdir(path) or path.endswith(os.sep):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, "spiece.model")
    elif not path.endswith(".model"):
        path += ".model"
    sentences = list(t5_sentences() if sentences is None else sentences)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
        pad_id=T5_PAD_ID, eos_id=T5_EOS_ID, unk_id=T5_UNK_ID, bos_id=-1, minloglevel=2)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def t5_hf_config(**overrides) -> dict:
    """A publisher `config.json` dict of a tiny T5 v1.1 encoder (vocab_size 128 fits
    train_tiny_spiece's model, as 32128 fits T5's 32000 pieces)."""
    cfg = {
        "architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": 128,
        "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
        "relative_attention_num_buckets": 8, "relative_attention_max_distance": 20,
        "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
        "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0, "initializer_factor": 1.0,
        "is_encoder_decoder": True, "tie_word_embeddings": False, "use_cache": False,
        "pad_token_id": T5_PAD_ID, "eos_token_id": T5_EOS_ID, "decoder_start_token_id": T5_PAD_ID,
        "torch_dtype": "float32", "transformers_version": "4.40.0",
    }
    cfg.update(overrides)
    if "feed_forward_proj" in overrides:  # keep the derived fields consistent, as transformers does
        gated = cfg["feed_forward_proj"].startswith("gated-")
        cfg["is_gated_act"] = gated
        cfg["dense_act_fn"] = "gelu_new" if cfg["feed_forward_proj"] == "gated-gelu" else \
            cfg["feed_forward_proj"].split("-")[-1]
    return cfg


def t5_tensors(hf_config: dict, seed: int = 0) -> dict:
    """Random publisher tensors (name -> float32 array) for the encoder of `hf_config`, scaled
    as transformers initialises T5 so activations are O(1); norm weights near 1 and a unit-scale
    relative attention table (so position matters)."""
    cfg = t5.T5Config.from_hf(hf_config)
    rng = np.random.default_rng(seed)
    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    std = {"q": (d * cfg.d_kv) ** -0.5, "k": d ** -0.5, "v": d ** -0.5, "o": inner ** -0.5,
           "wi": d ** -0.5, "wi_0": d ** -0.5, "wi_1": d ** -0.5, "wo": cfg.d_ff ** -0.5}
    out = {}
    for names, shape, _ in t5.param_map(cfg).values():
        name = names[0]
        if name.endswith("layer_norm.weight"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            key = name.split(".")[-2]
            a = std.get(key, 1.0) * rng.standard_normal(shape)  # shared, relative_attention_bias: 1
        out[name] = a.astype(np.float32)
    return out


def write_tiny_t5(directory: str, seed: int = 0, shards: int = 1, **overrides) -> str:
    """Writes a complete tiny publisher-layout T5 directory (config.json, safetensors weights,
    spiece.model) and returns its path."""
    os.makedirs(directory, exist_ok=True)
    train_tiny_spiece(directory)
    hf_config = t5_hf_config(**overrides)
    write_safetensors(directory, t5_tensors(hf_config, seed), shards=shards)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    return directory


# ---- CLIP: tokenizer.json (+ vocab.json, merges.txt), config.json, model.safetensors ----

_CLIP_MULTILINGUAL = ("一个红色的圆在蓝色的正方形上面", "一个小的绿色三角形",
                      "a 🔴 red circle above a 🟦 blue square ✨",
                      "it's a big purple triangle, isn't it? 3 shapes!")


def clip_sentences() -> list:
    """The tiny BPE's training text: the prompts, each size-colour-shape phrase, one relation
    between two of them per phrase, and the multilingual lines."""
    phrases = [f"a {s} {c} {h}" for s in SIZES for c in COLOURS for h in SHAPES]
    out = list(PROMPTS) + phrases
    for i, p in enumerate(phrases):
        out.append(f"{p} {RELATIONS[i % len(RELATIONS)]} {phrases[(7 * i + 3) % len(phrases)]}")
    return out + list(_CLIP_MULTILINGUAL)


def tiny_bpe(sentences: Optional[Sequence[str]] = None, vocab_size: int = 1000):
    """Returns a CLIP-style `tokenizers.Tokenizer` trained on `sentences` (default:
    clip_sentences(): the shapes captions and a few Chinese and emoji lines) in CLIP's
    vocabulary layout: the 256 byte characters, the same with "</w>", one token per merge, then
    <|startoftext|>, <|endoftext|> (so EOS is the largest id, as in CLIP), and a post-processor
    adding them, as the publisher's tokenizer.json has. Every byte is encodable."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors, trainers
    trainer_tok = clip_pipeline(Tokenizer(models.BPE(
        unk_token=EOS_TOKEN, continuing_subword_prefix="", end_of_word_suffix="</w>")))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS_TOKEN, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix="</w>", show_progress=False)
    trainer_tok.train_from_iterator(list(clip_sentences() if sentences is None else sentences), trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(trainer_tok.to_str())["model"]["merges"]]
    chars = list(byte_chars().values())
    tokens = chars + [c + "</w>" for c in chars]
    vocab = dict.fromkeys(tokens + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN])
    vocab = {t: i for i, t in enumerate(vocab)}  # in order, each token once
    tok = clip_bpe(vocab, merges)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS_TOKEN, EOS_TOKEN)])
    tok.post_processor = processors.RobertaProcessing(  # (sep, cls, ...)
        (EOS_TOKEN, vocab[EOS_TOKEN]), (BOS_TOKEN, vocab[BOS_TOKEN]), trim_offsets=False,
        add_prefix_space=False)
    return tok


def train_tiny_bpe(directory: str, sentences: Optional[Sequence[str]] = None, vocab_size: int = 1000):
    """Writes tiny_bpe's tokenizer in both publisher forms to `directory`: tokenizer.json, and
    vocab.json + merges.txt, with special_tokens_map.json / tokenizer_config.json (pad
    <|endoftext|>, as openai's); returns the tokenizers.Tokenizer."""
    os.makedirs(directory, exist_ok=True)
    tok = tiny_bpe(sentences, vocab_size)
    tok.save(os.path.join(directory, "tokenizer.json"))
    model = json.loads(tok.to_str())["model"]
    vocab = {t: i for t, i in sorted(model["vocab"].items(), key=lambda kv: kv[1])}
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(" ".join(m.split(" ") if isinstance(m, str) else m) + "\n" for m in model["merges"])
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(specials, f, indent=2)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(specials, tokenizer_class="CLIPTokenizer", model_max_length=77,
                       do_lower_case=True), f, indent=2)
    return tok


def clip_hf_config(**overrides) -> dict:
    """A publisher CLIPModel `config.json` dict with tiny towers (text 32 wide, 16 positions,
    the vocabulary of tiny_bpe with its real BOS/EOS ids; vision 48 wide, 24 x 24 images in
    8 x 8 patches; projection 16). `text_config` / `vision_config` overrides update the tower
    dicts; other keys replace top-level ones."""
    tok = tiny_bpe()
    text = {"model_type": "clip_text_model", "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 16, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, "bos_token_id": tok.token_to_id(BOS_TOKEN),
            "eos_token_id": tok.token_to_id(EOS_TOKEN), "pad_token_id": 1, "projection_dim": 16}
    vision = {"model_type": "clip_vision_model", "hidden_size": 48, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_channels": 3, "image_size": 24,
              "patch_size": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 16}
    cfg = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 16,
           "logit_scale_init_value": 2.6592, "initializer_factor": 1.0, "text_config": text,
           "vision_config": vision, "torch_dtype": "float32", "transformers_version": "4.44.0"}
    for key, value in overrides.items():
        if key in ("text_config", "vision_config") and isinstance(value, dict):
            cfg[key] = dict(cfg[key], **value)
        else:
            cfg[key] = value
    return cfg


def clip_tensors(hf_config: dict, seed: int = 0) -> dict:
    """Random publisher tensors (name -> float32) for the towers of `hf_config`, scaled so that
    activations are O(1): Linear weights ~ N(0, 1/in), norm weights near 1, small biases,
    embeddings N(0, 0.5^2); a CLIPModel also gets `logit_scale`, which the port does not read."""
    rng = np.random.default_rng(seed)
    out = {}
    for cfg in hf_clip.configs_from_hf(hf_config):
        if cfg is None:
            continue
        for names, shape, _ in hf_clip.param_map(cfg).values():
            name, z = names[0], rng.standard_normal(shape)
            if "norm" in name and name.endswith(".weight"):
                a = 1.0 + 0.1 * z
            elif name.endswith(".bias"):
                a = 0.1 * z
            elif "embedding" in name and len(shape) < 4:
                a = 0.5 * z
            else:  # Linear [out, in], conv [O, I, p, p]
                a = z / np.sqrt(np.prod(shape[1:]))
            out[name] = a.astype(np.float32)
    if hf_config.get("model_type") == "clip":
        out["logit_scale"] = np.asarray(hf_config.get("logit_scale_init_value", 2.6592), np.float32)
    return out


def write_tiny_clip(directory: str, seed: int = 0, shards: int = 1, **overrides) -> str:
    """Writes a complete tiny publisher-layout CLIP directory (config.json, safetensors weights,
    tokenizer.json + vocab.json + merges.txt, preprocessor_config.json) and returns its path."""
    os.makedirs(directory, exist_ok=True)
    train_tiny_bpe(directory)
    hf_config = clip_hf_config(**overrides)
    write_safetensors(directory, clip_tensors(hf_config, seed), shards=shards)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    _, vision = hf_clip.configs_from_hf(hf_config)
    if vision is not None:
        s = vision.image_size
        with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
            json.dump({"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                       "size": {"shortest_edge": s}, "do_center_crop": True,
                       "crop_size": {"height": s, "width": s}, "do_rescale": True,
                       "rescale_factor": 1 / 255, "do_normalize": True, "resample": 3,
                       "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)},
                      f, indent=2)
    return directory


# kind -> writer(directory, seed=0, shards=1, **config.json overrides) -> directory
WRITERS = {"t5": write_tiny_t5, "clip": write_tiny_clip}
