"""T5 encoder port (t2i_jax/models/t5.py) against an independent NumPy forward (tests/np_t5.py),
the publisher's bucket arithmetic, the SentencePiece package, and the real checkpoints' layout."""

import functools
import io
import json
import os
import warnings

import jax
import numpy as np
import pytest
import sentencepiece as spm

import np_t5
from t2i_jax.conditioning import T5Tokenizer
from t2i_jax.models import t5, tiny_pretrained, weights


@functools.lru_cache(maxsize=None)
def _apply(cfg: t5.T5Config):
    return jax.jit(t5.T5Encoder(cfg).apply)


def _setup(**overrides):
    hf = tiny_pretrained.t5_hf_config(**overrides)
    tensors = tiny_pretrained.t5_tensors(hf, seed=1)
    cfg = t5.T5Config.from_hf(hf)
    return hf, tensors, cfg, weights.params_from_tensors(t5.param_map(cfg), tensors)


def _check_against_reference(length, **overrides):
    """Rows of lengths (L, L//2 + 1, 1) padded to L with junk ids: the port at the unpadded
    positions equals the reference on each unpadded row alone; the junk changes nothing."""
    hf, tensors, cfg, params = _setup(**overrides)
    rng = np.random.default_rng(length)
    lengths = sorted({length, length // 2 + 1, 1}, reverse=True)
    ids = rng.integers(3, hf["vocab_size"], (len(lengths), length)).astype(np.int32)
    mask = np.arange(length)[None, :] < np.array(lengths)[:, None]
    feats = _apply(cfg)(params, ids, mask)
    tokens, pooled = np.asarray(feats.tokens), np.asarray(feats.pooled)
    assert tokens.shape == (len(lengths), length, hf["d_model"]) and tokens.dtype == np.float32
    for i, n in enumerate(lengths):
        ref = np_t5.encode(tensors, hf, ids[i:i + 1, :n])[0]  # [n, D]
        scale = max(1.0, np.abs(ref).max())
        np.testing.assert_allclose(tokens[i, :n], ref, rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(pooled[i], ref.mean(0), rtol=0, atol=1e-5 * scale)
    junk = np.where(mask, ids, rng.integers(0, hf["vocab_size"], ids.shape)).astype(np.int32)
    again = np.asarray(_apply(cfg)(params, junk, mask).tokens)
    np.testing.assert_array_equal(again[mask], tokens[mask])
    return tokens, mask


@pytest.mark.parametrize("length", [1, 5, 16, 40])  # 40 > max_distance 20: far buckets
def test_gated_gelu_matches_numpy_reference(length):
    _check_against_reference(length)


def test_relu_variant_matches_numpy_reference():
    hf, _, cfg, params = _setup(feed_forward_proj="relu")
    assert not cfg.gated and "block_0/wi/kernel" in t5.param_map(cfg)
    assert "wi_0" not in params["params"]["block_0"]
    _check_against_reference(16, feed_forward_proj="relu")


def test_bfloat16_compute_stays_close_to_float32():
    hf, tensors, cfg, params = _setup()
    ids = np.random.default_rng(0).integers(3, 80, (2, 12)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    f32 = np.asarray(_apply(cfg)(params, ids, mask).tokens)
    bf16 = _apply(t5.T5Config.from_hf(hf, dtype="bfloat16"))(params, ids, mask).tokens
    assert bf16.dtype == np.float32
    err = np.abs(np.asarray(bf16) - f32).max() / np.abs(f32).max()
    assert 0 < err < 5e-2, err  # bf16 matmuls: different, but only by rounding


EDGE_CASES = [  # (num_buckets, max_distance, {relative position: bucket by hand})
    # 32 buckets: 16 per direction, 8 exact; log-spaced: 8 + int(log(d/8)/log(16)*8).
    # d = 16, 32, 64 land exactly on 2, 4, 6: float32 truncation must not drop them by one.
    (32, 128, {0: 0, 1: 17, -1: 1, 7: 23, -7: 7, 8: 24, -8: 8, 15: 25, 16: 26, -16: 10, 32: 28,
               64: 30, -64: 14, 127: 31, -127: 15, 128: 31, -128: 15, 5000: 31, -5000: 15}),
    # the tiny model: 4 per direction, 2 exact; d in 2..6 -> 2 + 0, d >= 7 -> 2 + 1 (capped at 3)
    (8, 20, {0: 0, 1: 5, -1: 1, 2: 6, -2: 2, 6: 6, 7: 7, -7: 3, 19: 7, -19: 3, 20: 7, -20: 3, 900: 7}),
]


@pytest.mark.parametrize("num_buckets, max_distance, hand", EDGE_CASES)
def test_relative_position_bucket_edges(num_buckets, max_distance, hand):
    max_exact = num_buckets // 4
    edges = [0, 1, max_exact - 1, max_exact, max_exact + 1, max_distance - 1, max_distance,
             max_distance + 1, 10 * max_distance]
    rp = np.array(sorted({s * e for e in edges for s in (1, -1)}))
    np.testing.assert_array_equal(t5.relative_position_bucket(rp, num_buckets, max_distance),
                                  np_t5.bucket(rp, num_buckets, max_distance))
    keys = np.array(list(hand))
    np.testing.assert_array_equal(t5.relative_position_bucket(keys, num_buckets, max_distance),
                                  np.array(list(hand.values())))
    sweep = np.arange(-3 * max_distance, 3 * max_distance + 1)
    got = t5.relative_position_bucket(sweep, num_buckets, max_distance)
    np.testing.assert_array_equal(got, np_t5.bucket(sweep, num_buckets, max_distance))
    assert got.min() == 0 and got.max() == num_buckets - 1


def test_relative_attention_table_lives_in_block_0_and_is_shared_by_every_block():
    hf, tensors, cfg, params = _setup(num_layers=3)
    names = [n for names, _, _ in t5.param_map(cfg).values() for n in names]
    assert [n for n in names if "relative_attention" in n] == [
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    ids = np.random.default_rng(2).integers(3, 80, (1, 9)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    model = t5.T5Encoder(cfg)

    def blocks(tensors):
        p = weights.params_from_tensors(t5.param_map(cfg), tensors)
        _, state = model.apply(p, ids, mask, capture_intermediates=True, mutable=["intermediates"])
        return [np.asarray(state["intermediates"][f"block_{i}"]["__call__"][0]) for i in range(3)]

    table = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    moved = dict(tensors, **{table: tensors[table][::-1].copy()})
    for before, after in zip(blocks(tensors), blocks(moved)):
        assert np.abs(before - after).max() > 1e-3
    # With block 0's attention output zeroed, block 0 cannot see the table; blocks 1 and 2 still
    # do: the bias reaches them directly, not only through block 0's output.
    mute = dict(tensors, **{"encoder.block.0.layer.0.SelfAttention.o.weight":
                            np.zeros_like(tensors["encoder.block.0.layer.0.SelfAttention.o.weight"])})
    before, after = blocks(mute), blocks(dict(mute, **{table: moved[table]}))
    np.testing.assert_array_equal(before[0], after[0])
    assert np.abs(before[1] - after[1]).max() > 1e-3 and np.abs(before[2] - after[2]).max() > 1e-3


# ---- tokenizer ----

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_pretrained.write_tiny_t5(str(tmp_path_factory.mktemp("tiny_t5")), shards=2)


@pytest.fixture(scope="module")
def sp(tiny_dir):
    return spm.SentencePieceProcessor(model_file=os.path.join(tiny_dir, "spiece.model"))


TEXTS = ["a small red circle above a large blue square", "一个红色的圆在蓝色的正方形上面",
         "a 🔴 circle ✨ 🟦", "Ünïcödé  and   spaces", "zebra ☃ 日本語 (unseen characters)"]


def test_tokenizer_equals_sentencepiece_plus_eos(tiny_dir, sp):
    tok = T5Tokenizer.from_dir(tiny_dir, max_length=64, vocab_size=128)
    assert (tok.name, tok.max_length, tok.vocab_size) == ("t5", 64, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is cut: no warning
        out = tok(TEXTS)
    assert out.ids.dtype == np.int32 and out.ids.shape == (len(TEXTS), 64)
    assert not out.truncated.any()
    for row, mask, text in zip(out.ids, out.mask, TEXTS):
        want = sp.encode(text) + [1]
        assert len(want) > 3 and 0 not in want[:-1]
        np.testing.assert_array_equal(row, want + [0] * (64 - len(want)))
        np.testing.assert_array_equal(mask, np.arange(64) < len(want))
    assert tok.decode(out.ids)[0] == TEXTS[0]
    assert tok.decode(out.ids)[1] == TEXTS[1]


def test_tokenizer_truncates_keeping_eos_last_and_warns(tiny_dir, sp):
    tok = T5Tokenizer.from_dir(tiny_dir, max_length=16, vocab_size=128)
    long = " ".join(TEXTS) * 40
    pieces = sp.encode(long)
    assert len(pieces) > 1000
    fits = sp.decode(pieces[:15])  # exactly max_length - 1 pieces: fits whole with its EOS
    assert len(sp.encode(fits)) == 15
    over = sp.decode(sp.encode(fits + " a")[:16])
    assert len(sp.encode(over)) == 16
    with pytest.warns(UserWarning, match=r"2 prompt\(s\) longer than 16 T5 tokens were truncated"):
        out = tok([long, fits, "", over])
    np.testing.assert_array_equal(out.truncated, [True, False, False, True])
    np.testing.assert_array_equal(out.ids[0], pieces[:15] + [1])
    np.testing.assert_array_equal(out.ids[1], sp.encode(fits) + [1])
    np.testing.assert_array_equal(out.ids[2], [1] + [0] * 15)  # the empty prompt: EOS alone
    np.testing.assert_array_equal(out.mask[2], [True] + [False] * 15)
    np.testing.assert_array_equal(out.ids[3], sp.encode(over)[:15] + [1])
    assert out.mask[[0, 1, 3]].all()


def test_train_tiny_spiece_writes_one_deterministic_file(tmp_path, tiny_dir):
    prefix = tiny_pretrained.train_tiny_spiece(str(tmp_path / "prefix"))
    into_dir = tiny_pretrained.train_tiny_spiece(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["prefix.model", "spiece.model"]
    assert prefix == str(tmp_path / "prefix.model") and into_dir == str(tmp_path / "spiece.model")
    with open(prefix, "rb") as a, open(os.path.join(tiny_dir, "spiece.model"), "rb") as b:
        assert a.read() == b.read()
    sp = spm.SentencePieceProcessor(model_file=prefix)
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert sp.unk_id() not in sp.encode("一个红色的圆 🔴 a large purple triangle")  # all covered


def test_the_tiny_word_list_is_the_shapes_captions_vocabulary():
    """models/tiny_pretrained keeps its own copy of data/shapes.py's words (models/ imports no
    data module); the tiny tokenizers, and the frozen_t5 config that trains on shapes, need them
    to match, in order. Both tokenizers are trained on every word of the captions."""
    from t2i_jax.data import shapes
    groups = (shapes.SIZES, shapes.COLOURS, shapes.SHAPES, shapes.RELATIONS)
    assert (tiny_pretrained.SIZES, tiny_pretrained.COLOURS, tiny_pretrained.SHAPES,
            tiny_pretrained.RELATIONS) == groups
    assert list(tiny_pretrained.PROMPTS) == shapes.sample_prompts()
    vocabulary = {"a"} | {w for group in groups for phrase in group for w in phrase.split()}
    for sentences in (tiny_pretrained.t5_sentences(), tiny_pretrained.clip_sentences()):
        assert vocabulary <= {w for s in sentences for w in s.split()}


def test_tokenizer_errors(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match=r"80 pieces.*vocab_size 64|vocab_size 64.*80"):
        T5Tokenizer.from_dir(tiny_dir, max_length=8, vocab_size=64)
    with pytest.raises(ValueError, match="tokenizer does not match the model's vocabulary"):
        T5Tokenizer.from_dir(tiny_dir, max_length=8, vocab_size=64)
    with pytest.raises(ValueError, match=r"spiece\.model"):
        T5Tokenizer.from_dir(str(tmp_path), max_length=8, vocab_size=128)
    # SentencePiece's own default ids (unk 0, bos 1, eos 2, no pad) are not T5's
    path = str(tmp_path / "other.model")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 3), model_writer=buf, vocab_size=80,
                                   hard_vocab_limit=False, character_coverage=1.0, minloglevel=2)
    sp_other = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    with pytest.raises(ValueError, match="pad_id -1 and eos_id 2"):
        T5Tokenizer(sp_other, 8, 128, path)
    with pytest.raises(TypeError, match="list of prompts"):
        T5Tokenizer.from_dir(tiny_dir, 8, 128)("a red circle")


# ---- config ----

T5_V1_1_BASE = {  # google/t5-v1_1-base config.json (flan-t5-base has the same architecture fields)
    "architectures": ["T5ForConditionalGeneration"], "d_ff": 2048, "d_kv": 64, "d_model": 768,
    "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
    "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_decoder_layers": 12,
    "num_heads": 12, "num_layers": 12, "output_past": True, "pad_token_id": 0,
    "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True, "vocab_size": 32128}
FLAN_T5_BASE = dict(T5_V1_1_BASE, n_positions=512, transformers_version="4.23.1")
T5_BASE = {  # original T5 (t5-base): no feed_forward_proj, no max_distance: transformers' defaults
    "architectures": ["T5ForConditionalGeneration"], "d_ff": 3072, "d_kv": 64, "d_model": 768,
    "model_type": "t5", "n_positions": 512, "num_heads": 12, "num_layers": 12,
    "relative_attention_num_buckets": 32, "vocab_size": 32128}


def test_config_from_hf_and_its_errors():
    cfg = t5.T5Config.from_hf(T5_V1_1_BASE)
    assert cfg == t5.T5Config(32128, 768, 64, 2048, 12, 12, 32, 128, 1e-6, "gated-gelu", "float32")
    assert t5.T5Config.from_hf(FLAN_T5_BASE) == cfg
    old = t5.T5Config.from_hf(T5_BASE)
    assert (old.feed_forward_proj, old.relative_attention_max_distance, old.d_ff) == ("relu", 128, 3072)
    with pytest.raises(ValueError, match=r"model_type 'bert'.*T5 v1\.1 / Flan-T5 / t5"):
        t5.T5Config.from_hf(dict(T5_V1_1_BASE, model_type="bert"))
    with pytest.raises(ValueError, match=r"feed_forward_proj 'gated-silu'.*gated-gelu.*relu"):
        t5.T5Config.from_hf(dict(T5_V1_1_BASE, feed_forward_proj="gated-silu"))
    partial = {k: v for k, v in T5_V1_1_BASE.items() if k not in ("d_kv", "num_heads")}
    with pytest.raises(ValueError, match=r"\['d_kv', 'num_heads'\]"):
        t5.T5Config.from_hf(partial)


# ---- the real layout ----

def _encoder_tensor_names(num_layers, gated):
    """The encoder tensors of a T5ForConditionalGeneration / T5EncoderModel checkpoint."""
    ff = ["wi_0", "wi_1", "wo"] if gated else ["wi", "wo"]
    names = {"shared.weight": None, "encoder.final_layer_norm.weight": None,
             "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": None}
    for i in range(num_layers):
        for n in ("q", "k", "v", "o"):
            names[f"encoder.block.{i}.layer.0.SelfAttention.{n}.weight"] = None
        names[f"encoder.block.{i}.layer.0.layer_norm.weight"] = None
        names[f"encoder.block.{i}.layer.1.layer_norm.weight"] = None
        for n in ff:
            names[f"encoder.block.{i}.layer.1.DenseReluDense.{n}.weight"] = None
    return set(names)


@pytest.mark.parametrize("hf", [T5_V1_1_BASE, FLAN_T5_BASE], ids=["t5-v1_1-base", "flan-t5-base"])
def test_param_map_has_the_published_names_and_shapes(hf):
    pmap = t5.param_map(t5.T5Config.from_hf(hf))
    shapes = {names[0]: shape for names, shape, _ in pmap.values()}
    assert len(shapes) == len(pmap) == 12 * 9 + 3 == 111
    assert set(shapes) == _encoder_tensor_names(12, gated=True)
    assert shapes["shared.weight"] == (32128, 768)
    assert shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == (32, 12)
    assert shapes["encoder.block.11.layer.1.DenseReluDense.wi_1.weight"] == (2048, 768)
    assert shapes["encoder.block.5.layer.1.DenseReluDense.wo.weight"] == (768, 2048)
    assert shapes["encoder.block.3.layer.0.SelfAttention.q.weight"] == (768, 768)
    assert shapes["encoder.block.3.layer.0.SelfAttention.o.weight"] == (768, 768)
    assert shapes["encoder.final_layer_norm.weight"] == (768,)
    assert pmap["shared/embedding"][0] == ("shared.weight", "encoder.embed_tokens.weight")
    transforms = {names[0]: tr for names, _, tr in pmap.values()}
    assert transforms["encoder.block.0.layer.0.SelfAttention.k.weight"] == "transpose"
    assert transforms["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == "none"
    old = {n[0] for n, _, _ in t5.param_map(t5.T5Config.from_hf(T5_BASE)).values()}
    assert old == _encoder_tensor_names(12, gated=False) and len(old) == 12 * 8 + 3


def test_t5_v1_1_xxl_encoder_parameter_count():
    hf = dict(T5_V1_1_BASE, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24)
    n = sum(int(np.prod(shape)) for _, shape, _ in t5.param_map(t5.T5Config.from_hf(hf)).values())
    d, ff = 4096, 10240
    by_hand = 32128 * d + 24 * (4 * d * d + 3 * d * ff + 2 * d) + 32 * 64 + d
    assert n == by_hand == 4_762_310_656
    # A published float32 t5-v1_1-xxl encoder (pytorch_model.bin.index.json, e.g. the
    # text_encoder/t5-v1_1-xxl of Fudan-FUXI/HawkT2V_1.0_3B) says total_size 19575627776: these
    # tensors plus the tied copy encoder.embed_tokens.weight, 4 bytes each.
    assert 4 * (n + 32128 * d) == 19_575_627_776


# ---- the tiny publisher directory, end to end ----

def test_write_tiny_directory_loads_and_encodes_as_the_reference(tiny_dir):
    from safetensors.numpy import load_file
    with open(os.path.join(tiny_dir, "config.json")) as f:
        hf = json.load(f)
    assert hf["architectures"] == ["T5EncoderModel"] and hf["feed_forward_proj"] == "gated-gelu"
    with open(os.path.join(tiny_dir, "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    assert len(files) == 2
    tensors = {}
    for file in files:
        tensors.update(load_file(os.path.join(tiny_dir, file)))
    assert set(tensors) == _encoder_tensor_names(hf["num_layers"], gated=True)
    norms = [a for k, a in tensors.items() if "layer_norm" in k]
    assert 0.7 < np.mean(norms) < 1.3
    cfg = t5.T5Config.from_hf(hf)
    params = weights.params_from_tensors(t5.param_map(cfg), tensors)
    tok = T5Tokenizer.from_dir(tiny_dir, max_length=16, vocab_size=cfg.vocab_size)
    prompts = ["a large red circle", "一个小的绿色三角形"]
    tokens = tok(prompts)
    feats = _apply(cfg)(params, tokens.ids, tokens.mask)
    for i in range(len(prompts)):
        n = int(tokens.mask[i].sum())
        ref = np_t5.encode(tensors, hf, tokens.ids[i:i + 1, :n])[0]
        assert 0.3 < np.abs(ref).std() < 3.0  # activations are O(1)
        np.testing.assert_allclose(np.asarray(feats.tokens[i, :n]), ref, rtol=0,
                                   atol=1e-5 * np.abs(ref).max())
    # Renaming the embedding to its tied copy's name still loads; a missing tensor is named.
    tied = dict(tensors)
    tied["encoder.embed_tokens.weight"] = tied.pop("shared.weight")
    weights.params_from_tensors(t5.param_map(cfg), tied)
    del tied["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    with pytest.raises(ValueError, match=r"encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_1\.weight"):
        weights.params_from_tensors(t5.param_map(cfg), tied)
