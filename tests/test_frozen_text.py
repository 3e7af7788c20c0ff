"""Frozen pretrained text encoders as a diffusion model's condition (families/frozen_text.py) and
the publisher-layout loader (models/pretrained): sharded loading, the refusals, the encoder
kept out of training, the cache against the in-step encoding, the null, the padding mask,
sampling invariances, and the command line. The ports' numerics are tests/test_t5.py's and
tests/test_hf_clip.py's."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax import checkpoint as ckpt_lib, data as data_lib, families, sharding as mesh_lib
from t2i_jax.models import pretrained, tiny_pretrained, weights
from t2i_jax.models.pretrained import cli as pretrained_cli
from t2i_jax.training.writers import read_metrics

from runs import ROOT, assert_trees_equal, run, tiny  # noqa: E402


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


# --- loading -----------------------------------------------------------------------------

@pytest.mark.slow
def test_sharded_loading_puts_one_eighth_of_each_large_tensor_on_each_device(tmp_path):
    d = tiny_pretrained.write_tiny_t5(str(tmp_path / "t5"), shards=3, d_model=64, d_ff=256, d_kv=16)
    mesh = mesh_lib.make_mesh(8)
    enc = pretrained.load(d, mesh=mesh)        # from three shards and their index
    whole = pretrained.load(d).params          # host numpy, whole
    large = 0
    for (path, a), (_, b) in zip(_leaves(enc.params), _leaves(whole), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))
        pieces = [s.data.shape for s in a.addressable_shards]
        assert len(pieces) == 8
        if a.size >= mesh_lib.MIN_SHARDED_SIZE:
            large += 1
            assert all(int(np.prod(p)) * 8 == a.size for p in pieces), (path, pieces)
        else:
            assert all(p == a.shape for p in pieces)
    assert large >= 5  # the embedding and every feed-forward matrix of both layers
    ids = jnp.asarray(enc.tokenizer(["a red circle", "a blue square"]).ids)
    mask = ids != 0
    np.testing.assert_allclose(enc.module.apply(enc.params, ids, mask).tokens,
                               enc.module.apply(whole, ids, mask).tokens, rtol=1e-5, atol=1e-5)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_bad_directories_are_refused_naming_the_problem(tiny_t5, tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        pretrained.load(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        pretrained.load(str(tmp_path / "empty"))

    d = _copy(tiny_t5, tmp_path / "bert")
    cfg = json.load(open(os.path.join(d, "config.json")))
    json.dump(dict(cfg, model_type="bert", architectures=["BertModel"]),
              open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match="type 'bert'.*reads text encoders of type 't5'"):
        pretrained.load(d)
    with pytest.raises(ValueError, match="holds a t5 model.*not a clip"):
        pretrained.load(tiny_t5, kind="clip")

    d = _copy(tiny_t5, tmp_path / "truncated")
    path = os.path.join(d, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file.*"
                                         "truncated or damaged"):
        pretrained.load(d)

    d = _copy(tiny_t5, tmp_path / "misshapen")
    json.dump(dict(cfg, d_ff=48), open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"'encoder.block.0.layer.1.DenseReluDense.wi_0.weight' "
                                         r"has shape \(64, 32\), the config says \(48, 32\)"):
        pretrained.load(d)

    d = _copy(tiny_t5, tmp_path / "misnamed")
    from safetensors.numpy import load_file, save_file
    tensors = load_file(os.path.join(d, "model.safetensors"))
    tensors["encoder.final_norm.weight"] = tensors.pop("encoder.final_layer_norm.weight")
    save_file(tensors, os.path.join(d, "model.safetensors"))
    with pytest.raises(ValueError, match="missing tensor 'encoder.final_layer_norm.weight'"):
        pretrained.load(d)

    d = _copy(tiny_t5, tmp_path / "small_vocab")
    json.dump(dict(cfg, vocab_size=40), open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match="vocab"):
        pretrained.load(d)

    d = tiny_pretrained.write_tiny_t5(str(tmp_path / "shards"), shards=2)
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    with pytest.raises(ValueError, match="lists shards that are not in"):
        pretrained.load(d)

    d = _copy(tiny_t5, tmp_path / "relu6")
    json.dump(dict(cfg, feed_forward_proj="gated-silu"), open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match="feed_forward_proj"):
        pretrained.load(d)


@pytest.mark.slow
def test_encode_command_writes_the_ports_features_and_make_tiny_keeps_a_model(tiny_t5, tmp_path,
                                                                             capsys):
    out = tmp_path / "f.npz"
    texts = ["a small red circle", "数字 ✨", ""]
    assert pretrained_cli.run(["encode", tiny_t5, "--out", str(out), "--max_length", "12"]
                              + [a for t in texts for a in ("--text", t)]) == 0
    got = np.load(out)
    enc = pretrained.load(tiny_t5, max_length=12)
    toks = enc.tokenizer(texts)
    want = enc.module.apply(enc.params, jnp.asarray(toks.ids), jnp.asarray(toks.mask))
    assert got["tokens"].shape == (3, 12, 32) and got["pooled"].shape == (3, 32)
    np.testing.assert_array_equal(got["mask"], toks.mask)
    np.testing.assert_allclose(got["tokens"], want.tokens, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["pooled"], want.pooled, rtol=1e-6, atol=1e-6)
    # pooled is the masked mean of the token features (Imagen pools T5 by the mean)
    m = toks.mask[..., None]
    np.testing.assert_allclose(got["pooled"], (got["tokens"] * m).sum(1) / m.sum(1), rtol=1e-5,
                               atol=1e-6)
    capsys.readouterr()
    assert pretrained_cli.run(["make-tiny", tiny_t5]) == 2
    assert "already holds a model" in capsys.readouterr().err
    assert pretrained_cli.run(["make-tiny", str(tmp_path / "c"), "--kind", "clip", "--size",
                               "base"]) == 2
    assert "--size base is available for --kind t5 only" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    # The command line itself, once: prog, subcommand and exit code as a user sees them.
    done = subprocess.run([sys.executable, "-m", "t2i_jax.models.pretrained", "encode",
                           str(tmp_path / "nowhere"), "--text", "a", "--out", str(tmp_path / "x.npz")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "is not a directory" in done.stderr
    assert not (tmp_path / "x.npz").exists()


# --- training ------------------------------------------------------------------------------

def test_the_frozen_encoder_is_not_trained_and_not_in_the_state(data_dir, straight_runs, tiny_t5):
    state4, wd4 = straight_runs["frozen_t5"]
    cfg = tiny(data_dir, "frozen_t5")
    fam = families.build(cfg)
    on_disk = pretrained.load(tiny_t5).params
    # Bit-identical to the files after training: the step never gets to change them ...
    assert_trees_equal(fam.frozen_text.params, on_disk)
    # ... no gradient reaches them ...
    hp = fam.hparams()
    batch = next(data_lib.make_train_iterator(cfg.data, seed=0, global_batch_size=4,
                                              tokenizer=fam.tokenizer))
    key = jax.random.key(3)

    def loss_of_encoder(te):
        return jnp.mean(fam.loss(state4.params, batch, key, dict(hp, text_encoder=te))[0])

    grads = jax.grad(loss_of_encoder)(jax.tree_util.tree_map(jnp.asarray, hp["text_encoder"]))
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(grads))
    # ... and they are not in the trained parameters, the EMA, the optimizer state or the
    # checkpoint: those hold the Denoiser's own parameters alone.
    own = jax.eval_shape(fam.init_params, jax.random.key(0))
    assert jax.tree_util.tree_structure(state4.params) == jax.tree_util.tree_structure(own)
    for part in ("params", "ema_params", "opt_state"):
        names = [jax.tree_util.keystr(p) for p, _ in _leaves(getattr(state4, part))]
        assert not any("block" in n or "relative_attention" in n for n in names)
    n_state = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(state4.params))
    n_own = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(own))
    assert n_state == n_own
    # The checkpoint records the encoder's kind, directory and content hash.
    stored = ckpt_lib.Checkpointer(str(wd4 / "checkpoints"), read_only=True)
    try:
        recorded = stored.stored_config(4)["frozen"]["text_encoder"]
    finally:
        stored.close()
    assert recorded["kind"] == "t5" and recorded["workdir"] == os.path.abspath(tiny_t5)
    assert recorded["sha256"] == weights.content_sha256(tiny_t5)


def test_the_cache_and_the_in_step_encoding_give_the_same_loss(data_dir, straight_runs, tiny_t5,
                                                               tmp_path):
    _, wd4 = straight_runs["frozen_t5"]
    cfg = tiny(data_dir, "frozen_t5", train__text_cache=True,
               train__text_cache_dir=str(tmp_path / "cache"))
    fam = families.build(cfg)
    cache = fam.text_cache()
    captions = data_lib.all_captions(cfg.data)
    assert len(cache) == len(set(captions) | {""})
    # Every cached caption's features are the encoder's (spot check, one program per size).
    enc = fam.frozen_text.encoder
    some = captions[:5]
    feats, toks = enc.encode(some)
    rows = [cache.row[c] for c in some]
    np.testing.assert_allclose(cache.tokens[rows], feats.tokens, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cache.mask[rows], toks.mask)
    L, D = feats.tokens.shape[1:]
    assert cache.bytes_per_example == L * D * 4 + feats.pooled.shape[-1] * 4 + L
    # The same 4 steps trained from the cache log the same losses as the in-step encoding.
    wd = tmp_path / "cached"
    run(cfg, wd)
    cached = read_metrics(wd)
    straight = read_metrics(wd4)
    assert [r["step"] for r in cached] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in cached], [r["loss"] for r in straight],
                               rtol=2e-5)
    mtime = os.path.getmtime(os.path.join(cache.path, "tokens.npy"))
    assert fam.text_cache().path == cache.path  # built once, then reused
    assert os.path.getmtime(os.path.join(cache.path, "tokens.npy")) == mtime


def test_the_null_is_the_empty_prompts_encoding_and_padding_never_reaches_the_model(
        data_dir, straight_runs, tiny_t5):
    state4, _ = straight_runs["frozen_t5"]
    cfg = tiny(data_dir, "frozen_t5", train__p_uncond=1.0)
    fam = families.build(cfg)
    feats, toks = pretrained.load(tiny_t5, max_length=32).encode([""])
    null = fam.null()
    np.testing.assert_array_equal(null.features, feats.tokens)
    np.testing.assert_array_equal(null.pooled, feats.pooled)
    np.testing.assert_array_equal(null.mask, toks.mask)
    # Training dropout puts exactly these arrays in the dropped rows (p_uncond = 1: all rows).
    batch = next(data_lib.make_train_iterator(cfg.data, seed=0, global_batch_size=4,
                                              tokenizer=fam.tokenizer))
    hp = fam.hparams()
    cond = fam.drop(fam.training_condition(batch, jax.random.key(0), hp), jax.random.key(1), hp)
    np.testing.assert_array_equal(cond.features, np.repeat(feats.tokens, 4, 0))
    # The padding mask reaches cross-attention: features at padded positions change nothing.
    cond = fam.training_condition(batch, jax.random.key(0), hp)
    pad = ~np.asarray(cond.mask)
    assert pad.any() and (~pad).any()
    noisy = cond.replace(features=jnp.where(pad[..., None], 100.0, cond.features))
    x = jax.random.normal(jax.random.key(2), batch["image"].shape)
    t = jnp.asarray([10, 200, 500, 900])
    a = fam.model.apply(state4.params, x, t, cond)
    b = fam.model.apply(state4.params, x, t, noisy)
    np.testing.assert_array_equal(a, b)
    # ... while the real tokens' features do (a random change: a constant shift the LayerNorm
    # on the features would remove)
    shift = jax.random.normal(jax.random.key(4), cond.features.shape)
    assert not np.allclose(a, fam.model.apply(state4.params, x, t, cond.replace(
        features=jnp.where(pad[..., None], cond.features, cond.features + shift))), atol=1e-4)


@pytest.mark.slow
def test_a_checkpoint_refuses_another_encoder(data_dir, tiny_t5, tmp_path, capsys):
    t5_dir = _copy(tiny_t5, tmp_path / "t5")
    cfg = tiny(data_dir, "frozen_t5", train__num_steps=2)
    cfg.model.text_encoder.path = t5_dir
    wd = tmp_path / "run"
    run(cfg, wd)
    # Another encoder directory: refused on resume (the recorded model differs) ...
    other = tiny_pretrained.write_tiny_t5(str(tmp_path / "other"), seed=1)
    cfg_other = tiny(data_dir, "frozen_t5", train__num_steps=4)
    cfg_other.model.text_encoder.path = other
    with pytest.raises(ValueError, match="text_encoder"):
        run(cfg_other, wd)
    # ... and the same directory with other weights: refused on resume and by sampling.
    tiny_pretrained.write_tiny_t5(t5_dir, seed=1)
    before = sorted(os.listdir(wd / "checkpoints"))
    cfg.train.num_steps = 4
    with pytest.raises(ValueError, match="different model.*frozen.text_encoder.sha256"):
        run(cfg, wd)
    assert sorted(os.listdir(wd / "checkpoints")) == before  # nothing written
    import sample as sample_cli
    out = tmp_path / "samples"
    assert sample_cli.run(["--workdir", str(wd), "--prompt", "a red circle", "--outdir", str(out)]) != 0
    assert "not the one this model was trained with" in capsys.readouterr().err
    assert not out.exists()  # a refusal makes no outdir (the details went to the temp dir)


# --- sampling ------------------------------------------------------------------------------

def test_sampling_with_a_frozen_t5_is_the_same_on_1_and_8_devices_and_any_batch(
        straight_runs, tmp_path):
    from t2i_jax.sampling import job as job_lib
    from t2i_jax.sampling import outdir as out_lib
    from t2i_jax.sampling.plan import Plan
    from t2i_jax.sampling.generate import SampleOptions
    from t2i_jax.sampling.load import load_trained
    _, wd4 = straight_runs["frozen_t5"]
    trained = load_trained(str(wd4))
    assert trained.family.frozen_text is not None
    spec = Plan.create(trained, ["a large red circle", "一个小的绿色三角形", ""], num_per_prompt=2,
                       guidance=(2.0,), seed=5, options=SampleOptions("ddim", 3))
    got = {}
    for name, devices, batch in (("8dev_b1", None, 1), ("1dev_b7", jax.devices()[:1], 7)):
        job_lib.run_job(spec, str(tmp_path / name), batch_size=batch, devices=devices,
                        progress=False)
        got[name] = out_lib.load_images(str(tmp_path / name))
    np.testing.assert_array_equal(got["8dev_b1"][0], got["1dev_b7"][0])
    assert got["8dev_b1"][1] == got["1dev_b7"][1]


@pytest.mark.slow
def test_a_frozen_clip_conditions_a_model_and_its_image_tower_encodes_from_the_command_line(
        data_dir, tmp_path, capsys):
    import ml_collections
    from PIL import Image
    d = tiny_pretrained.write_tiny_clip(str(tmp_path / "clip"))
    cfg = tiny(data_dir, "frozen_t5", train__num_steps=2)
    cfg.model.text_encoder = ml_collections.ConfigDict(dict(kind="clip", path=d, max_length=16,
                                                           dtype="float32"))
    fam = families.build(cfg)
    enc = pretrained.load(d, max_length=16)
    feats, toks = enc.encode([""])
    null = fam.null()
    np.testing.assert_array_equal(null.features, feats.tokens)  # [1, 16, 32]
    np.testing.assert_array_equal(null.pooled, feats.pooled)    # [1, 16]: the projected EOS
    assert null.pooled.shape == (1, 16) and null.features.shape == (1, 16, 32)
    assert list(np.asarray(toks.ids[0, :2])) == [enc.tokenizer.bos_id, enc.tokenizer.eos_id]
    wd = tmp_path / "run"
    state = run(cfg, wd)
    assert int(state.step) == 2
    stored = ckpt_lib.Checkpointer(str(wd / "checkpoints"), read_only=True)
    try:
        assert stored.stored_config(2)["frozen"]["text_encoder"]["kind"] == "clip"
    finally:
        stored.close()
    # The image tower, from the command line: the embeddings of two PNGs.
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(paths[-1])
    out = tmp_path / "img.npz"
    assert pretrained_cli.run(["encode", d, "--image", paths[0], "--image", paths[1], "--out",
                               str(out)]) == 0
    images = np.stack([np.asarray(Image.open(p), np.float32) / 127.5 - 1 for p in paths])
    want = pretrained.load_image_encoder(d).encode(images)
    got = np.load(out)
    assert got["image_embeds"].shape == (2, 16)
    np.testing.assert_allclose(got["image_embeds"], want.image_embeds, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got["image_embeds"][0], got["image_embeds"][1])
    capsys.readouterr()
    assert pretrained_cli.run(["encode", d, "--image", str(wd / "metrics.jsonl"), "--out",
                               str(tmp_path / "x.npz")]) == 2
    assert "is not an image Pillow can read" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()
