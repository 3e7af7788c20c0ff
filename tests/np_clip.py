"""An independent NumPy forward of CLIP's text and vision towers and of CLIP's BPE, for tests of
t2i_jax/models/hf_clip.py.

Written from Radford et al. 2021 (CLIP), transformers' modeling_clip.py (CLIPTextTransformer,
CLIPVisionTransformer, CLIPEncoderLayer, CLIPAttention) and OpenAI's simple_tokenizer.py (the
byte table, the word pattern, greedy lowest-rank merges). Reads the publisher's tensors by their
Hugging Face names and the towers' config.json dicts directly. Nothing is shared with the Flax
port or the `tokenizers` package: float64 throughout, attention head by head, the patch
embedding as a sum over pixels, the BPE in plain Python.
"""

from __future__ import annotations

import math
import unicodedata

import numpy as np
import regex


def _layer_norm(x, t, name, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * t[name + ".weight"] + t[name + ".bias"]


def _linear(x, t, name, bias=True):
    y = x @ t[name + ".weight"].T  # torch Linear: weight [out, in]
    return y + t[name + ".bias"] if bias else y


def _act(name, x):
    if name == "quick_gelu":
        return x / (1.0 + np.exp(-1.702 * x))
    assert name == "gelu", name
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _encoder_layer(x, t, prefix, cfg, allowed):
    """One CLIPEncoderLayer; x [B, L, D]; allowed bool [B, L(query), L(key)] or None."""
    b, l, d = x.shape
    heads = cfg["num_attention_heads"]
    hd = d // heads
    eps = cfg.get("layer_norm_eps", 1e-5)
    h = _layer_norm(x, t, prefix + "layer_norm1", eps)
    q = _linear(h, t, prefix + "self_attn.q_proj")
    k = _linear(h, t, prefix + "self_attn.k_proj")
    v = _linear(h, t, prefix + "self_attn.v_proj")
    out = np.zeros_like(x)
    for n in range(heads):
        cols = slice(n * hd, (n + 1) * hd)
        scores = q[..., cols] @ k[..., cols].transpose(0, 2, 1) * hd ** -0.5  # [B, Lq, Lk]
        if allowed is not None:
            scores = np.where(allowed, scores, -np.inf)
        scores = scores - scores.max(-1, keepdims=True)
        w = np.exp(scores)
        w = w / w.sum(-1, keepdims=True)
        out[..., cols] = w @ v[..., cols]
    x = x + _linear(out, t, prefix + "self_attn.out_proj")
    h = _layer_norm(x, t, prefix + "layer_norm2", eps)
    h = _act(cfg.get("hidden_act", "quick_gelu"), _linear(h, t, prefix + "mlp.fc1"))
    return x + _linear(h, t, prefix + "mlp.fc2")


def text_forward(tensors, cfg: dict, ids, mask=None, project: bool = True) -> dict:
    """CLIP text tower: {"hidden_states": [embeddings, layer 1, ...] (un-normed),
    "last_hidden_state": final-layer-normed [B, L, D], "eos": index [B], "pooled": [B, D],
    "text_embeds": pooled @ text_projection^T [B, P] where project and the tensor exists}.

    cfg: the text tower's config.json dict (CLIPModel's text_config, or a clip_text_model's).
    mask None: causal only (as diffusers calls it); else keys outside mask are excluded too."""
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    ids = np.asarray(ids)
    b, l = ids.shape
    x = t["text_model.embeddings.token_embedding.weight"][ids] \
        + t["text_model.embeddings.position_embedding.weight"][:l][None]
    allowed = np.tril(np.ones((l, l), bool))[None].repeat(b, 0)
    if mask is not None:
        allowed = allowed & np.asarray(mask, bool)[:, None, :]
    hidden = [x]
    for i in range(cfg["num_hidden_layers"]):
        x = _encoder_layer(x, t, f"text_model.encoder.layers.{i}.", cfg, allowed)
        hidden.append(x)
    last = _layer_norm(x, t, "text_model.final_layer_norm", cfg.get("layer_norm_eps", 1e-5))
    eos_id = cfg.get("eos_token_id", 49407)
    if eos_id == 2:  # transformers' rule for configs older than PR #24773
        eos = ids.argmax(-1)
    else:
        eos = np.array([list(row).index(eos_id) if eos_id in row else 0 for row in ids.tolist()])
    pooled = last[np.arange(b), eos]
    out = {"hidden_states": hidden, "last_hidden_state": last, "eos": eos, "pooled": pooled,
           "final_layer_norm": lambda h: _layer_norm(h, t, "text_model.final_layer_norm",
                                                     cfg.get("layer_norm_eps", 1e-5))}
    if project and "text_projection.weight" in t:
        out["text_embeds"] = _linear(pooled, t, "text_projection", bias=False)
    return out


def vision_forward(tensors, cfg: dict, pixels, project: bool = True) -> dict:
    """CLIP vision tower on NHWC pixels [B, H, W, C]: {"last_hidden_state": [B, 1 + N, D],
    "pooled": post_layernorm(class token) [B, D], "image_embeds": [B, P] where projected}."""
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    pixels = np.asarray(pixels, np.float64)
    b, hgt, wid, c = pixels.shape
    p = cfg["patch_size"]
    gh, gw = hgt // p, wid // p
    weight = t["vision_model.embeddings.patch_embedding.weight"]  # [D, C, p, p]
    d = weight.shape[0]
    patches = np.zeros((b, gh * gw, d))
    for i in range(gh):  # torch flattens the [D, gh, gw] grid row by row
        for j in range(gw):
            window = pixels[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :]  # [B, p(y), p(x), C]
            patches[:, i * gw + j] = np.einsum("byxc,dcyx->bd", window, weight)
    cls = np.broadcast_to(t["vision_model.embeddings.class_embedding"], (b, 1, d))
    x = np.concatenate([cls, patches], 1) + t["vision_model.embeddings.position_embedding.weight"][None]
    eps = cfg.get("layer_norm_eps", 1e-5)
    x = _layer_norm(x, t, "vision_model.pre_layrnorm", eps)
    for i in range(cfg["num_hidden_layers"]):
        x = _encoder_layer(x, t, f"vision_model.encoder.layers.{i}.", cfg, None)
    pooled = _layer_norm(x[:, 0], t, "vision_model.post_layernorm", eps)
    out = {"last_hidden_state": x, "pooled": pooled}
    if project and "visual_projection.weight" in t:
        out["image_embeds"] = _linear(pooled, t, "visual_projection", bias=False)
    return out


# ---- CLIP's BPE, as OpenAI's simple_tokenizer.py (text cleaning as the fast tokenizer's) ----

def byte_table() -> dict:
    """byte -> unicode character of byte-level BPE (printable bytes map to themselves)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) \
        | set(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            out[byte] = chr(byte)
        else:
            out[byte] = chr(256 + extra)
            extra += 1
    return out


_WORDS = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def bpe_encode(text: str, vocab: dict, merges: list) -> list:
    """CLIP BPE ids of `text` (no BOS/EOS): NFC, whitespace runs -> one space, lowercase; CLIP's
    word pattern; each word's UTF-8 bytes as characters, "</w>" on the last; then merge the
    lowest-ranked adjacent pair (all its occurrences, left to right) until none is ranked."""
    ranks = {tuple(m): r for r, m in enumerate(merges)}
    table = byte_table()
    text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()
    ids = []
    for word in _WORDS.findall(text):
        if word in ("<|startoftext|>", "<|endoftext|>"):
            ids.append(vocab[word])
            continue
        parts = [table[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda pr: ranks.get(pr, math.inf))
            if pair not in ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids.extend(vocab[p] for p in parts)
    return ids
