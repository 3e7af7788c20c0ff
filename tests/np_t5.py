"""An independent NumPy forward of the T5 encoder, for tests of t2i_jax/models/t5.py.

Written from Raffel et al. 2020 and transformers' modeling_t5.py (T5LayerNorm, T5Attention,
T5DenseActDense / T5DenseGatedActDense, T5Stack), reading the publisher's tensors by their own
names. Nothing is shared with the Flax port: float64 throughout, except the relative position
buckets, which follow torch's float32 arithmetic (`.float()` log, `.to(torch.long)`).
"""

from __future__ import annotations

import math

import numpy as np


def bucket(rp, num_buckets, max_distance):
    """transformers T5Attention._relative_position_bucket(rp, bidirectional=True, ...)."""
    rp = np.asarray(rp, np.int64)
    num_buckets //= 2
    out = (rp > 0).astype(np.int64) * num_buckets
    n = np.abs(rp)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) on the small branch, unused
        val = (np.log(n.astype(np.float32) / np.float32(max_exact))
               / np.float32(math.log(max_distance / max_exact))
               * np.float32(num_buckets - max_exact))
    val = np.where(is_small, 0, val)  # keep -inf out of the integer cast
    if_large = max_exact + np.trunc(val).astype(np.int64)
    if_large = np.minimum(if_large, num_buckets - 1)
    return out + np.where(is_small, n, if_large)


def _rms_norm(x, w, eps):
    var = np.mean(x * x, axis=-1, keepdims=True)
    return w * (x / np.sqrt(var + eps))


def _gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def encode(tensors: dict, hf_config: dict, ids, mask=None) -> np.ndarray:
    """Returns the encoder's last hidden state [B, L, D] (float64) for ids [B, L] (mask [B, L],
    1 where attended; default all ones), as T5EncoderModel(...).last_hidden_state."""
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    c = hf_config
    ids = np.asarray(ids)
    b, l = ids.shape
    mask = np.ones((b, l)) if mask is None else np.asarray(mask, np.float64)
    h, dk, eps = c["num_heads"], c["d_kv"], c.get("layer_norm_epsilon", 1e-6)
    gated = c.get("feed_forward_proj", "relu").startswith("gated")
    emb = t["shared.weight"] if "shared.weight" in t else t["encoder.embed_tokens.weight"]
    x = emb[ids]  # [B, L, D]

    rel = np.arange(l)[None, :] - np.arange(l)[:, None]  # memory - query
    table = t["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    bias = table[bucket(rel, c.get("relative_attention_num_buckets", 32),
                        c.get("relative_attention_max_distance", 128))]  # [L, L, H]
    bias = bias.transpose(2, 0, 1)[None]  # [1, H, L, L]
    bias = bias + (1.0 - mask)[:, None, None, :] * np.finfo(np.float64).min  # extended mask

    for i in range(c["num_layers"]):
        p = f"encoder.block.{i}.layer."
        y = _rms_norm(x, t[p + "0.layer_norm.weight"], eps)
        q, k, v = (y @ t[p + f"0.SelfAttention.{n}.weight"].T for n in "qkv")
        q, k, v = (a.reshape(b, l, h, dk).transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, H, L, dk]
        scores = q @ k.transpose(0, 1, 3, 2) + bias  # unscaled
        scores = scores - scores.max(-1, keepdims=True)
        w = np.exp(scores)
        w = w / w.sum(-1, keepdims=True)
        a = (w @ v).transpose(0, 2, 1, 3).reshape(b, l, h * dk)
        x = x + a @ t[p + "0.SelfAttention.o.weight"].T

        y = _rms_norm(x, t[p + "1.layer_norm.weight"], eps)
        if gated:
            gate = _gelu_new(y @ t[p + "1.DenseReluDense.wi_0.weight"].T)
            y = gate * (y @ t[p + "1.DenseReluDense.wi_1.weight"].T)
        else:
            y = np.maximum(y @ t[p + "1.DenseReluDense.wi.weight"].T, 0.0)
        x = x + y @ t[p + "1.DenseReluDense.wo.weight"].T
    return _rms_norm(x, t["encoder.final_layer_norm.weight"], eps)
