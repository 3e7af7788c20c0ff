"""unCLIP (DALL-E 2): the prior's x0 objective on sqrt(E)-scaled CLIP embeddings and its inverse,
its attention mask, slerp, the candidate selection, the decoder's two dropouts at their rates,
text -> prior -> decoder as one resumable job whose images do not depend on devices or batch
size, variations and interpolations (their ends are variations with the same noise), and the
refusals of what does not fit, before anything is written."""

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sample as sample_cli
from t2i_jax import conditioning, families, files, images
from t2i_jax.diffusion import forward
from t2i_jax.families import clip as clip_lib
from t2i_jax.families.prior import from_prior_space, to_prior_space
from t2i_jax.models.prior import attention_mask
from t2i_jax.sampling import job as job_lib
from t2i_jax.sampling import outdir as out_lib
from t2i_jax.sampling.plan import Plan
from t2i_jax.sampling import stages as stages_lib
from t2i_jax.sampling import best_of, unclip
from t2i_jax.sampling.generate import SampleOptions
from t2i_jax.sampling.load import load_trained

from runs import assert_refused, run, tiny  # noqa: E402

PROMPTS = ["seven", "数字三"]


def _batch(fam, data_dir, n=8):
    from t2i_jax import data as data_lib
    from t2i_jax.conditioning import tokenizers
    cfg = fam.config
    cfg.data.data_dir = data_dir
    d = data_lib.load_split(cfg.data, "train", limit=n)
    tk = tokenizers.tokenize(d["caption"], fam.max_length)
    return dict(image=jnp.asarray(d["image"]), tokens=jnp.asarray(tk.ids),
                mask=jnp.asarray(tk.mask))


def test_the_prior_space_is_the_unit_sphere_scaled_by_sqrt_e_and_sampling_inverts_it():
    z = jax.random.normal(jax.random.key(0), (5, 64)) * 3.0
    x0 = to_prior_space(z)
    np.testing.assert_allclose(jnp.linalg.norm(x0, axis=-1), math.sqrt(64), rtol=1e-6)
    unit = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    np.testing.assert_allclose(x0 / math.sqrt(64), unit, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(from_prior_space(x0), unit, rtol=1e-6, atol=1e-7)
    # A sampled x0 off the sphere maps to the unit vector of its direction.
    np.testing.assert_allclose(from_prior_space(0.3 * x0), unit, rtol=1e-6, atol=1e-7)


def test_the_prior_loss_is_the_x0_mse_on_the_scaled_clip_image_embedding(data_dir, tiny_clip):
    """The family's per-example loss, recomputed by hand from its documented streams: t, noise,
    q_sample of sqrt(E) z_i / |z_i| (z_i the frozen CLIP's clean image embedding), the text
    dropout to the empty prompt, and the mean squared error of the model's output against x0."""
    fam = families.build(tiny(data_dir, "prior"))
    params = fam.init_params(jax.random.key(1))
    # A non-trivial network: perturb every parameter.
    leaves, tdef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree_util.tree_unflatten(tdef, [p + 0.05 * jax.random.normal(k, p.shape)
                                                 for p, k in zip(leaves, keys)])
    batch = _batch(fam, data_dir)
    key = jax.random.key(3)
    hp = fam.hparams()
    per_example, _ = fam.loss(params, batch, key, hp)
    clip = fam.clip
    z_i = clip.family.embed_image(clip.params, batch["image"], jnp.zeros((8,), jnp.int32))
    x0 = z_i / jnp.linalg.norm(z_i, axis=-1, keepdims=True) * math.sqrt(fam.embed_dim)
    T = fam.schedule.num_timesteps
    t = jax.random.randint(jax.random.fold_in(key, 0), (8,), 0, T)
    noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
    x_t = forward.q_sample(fam.schedule, x0, t, noise)
    drop = jax.random.bernoulli(jax.random.fold_in(key, 2), fam.loss_cfg.p_uncond, (8,))
    null = fam.null()
    ids = jnp.where(drop[:, None], null.tokens, batch["tokens"])
    mask = jnp.where(drop[:, None], null.mask, batch["mask"])
    feats, z_t = clip.family.model.apply(clip.params, ids, mask, method=type(clip.family.model).encode_text)
    out = fam.model.apply(params, x_t, t, feats.tokens, feats.mask, z_t)
    want = jnp.mean((out - x0) ** 2, axis=-1)
    np.testing.assert_allclose(per_example, want, rtol=2e-5, atol=1e-6)
    assert fam.prediction == "x0" and fam.image_shape == (fam.embed_dim,)


def test_the_prior_attention_is_causal_and_never_reads_padding():
    valid = jnp.asarray([[True, True, False], [True, False, False]])
    m = np.asarray(attention_mask(valid, causal=True))
    s = 3 + 4
    for b in range(2):
        for i in range(s):
            for j in range(s):
                key_ok = bool(valid[b, j]) if j < 3 else True
                assert m[b, i, j] == (key_ok and j <= i), (b, i, j)
    full = np.asarray(attention_mask(valid, causal=False))
    assert full[0, 0, 6] and not full[0, 0, 2]
    # The query (last position) sees every valid position under either mask.
    np.testing.assert_array_equal(m[:, -1], full[:, -1])


def test_slerp_has_its_ends_unit_norms_and_a_uniform_angle():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 16))
    a /= np.linalg.norm(a, axis=-1, keepdims=True)
    b /= np.linalg.norm(b, axis=-1, keepdims=True)
    t = np.linspace(0, 1, 7)
    for i in range(3):
        path = unclip.slerp(a[i], b[i], t)                     # [7, 16]
        np.testing.assert_allclose(path[0], a[i], atol=1e-6)
        np.testing.assert_allclose(path[-1], b[i], atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(path, axis=-1), 1.0, atol=1e-6)
        theta = np.arccos(np.clip(a[i] @ b[i], -1, 1))
        np.testing.assert_allclose(path @ a[i], np.cos(t * theta), atol=1e-6)
        np.testing.assert_allclose(path @ b[i], np.cos((1 - t) * theta), atol=1e-6)
    np.testing.assert_allclose(unclip.slerp(a[0], a[0], t), np.repeat(a[:1], 7, 0), atol=1e-6)


def test_candidate_selection_keeps_the_argmax_of_the_dot_product():
    cands = jax.random.normal(jax.random.key(0), (4, 9, 8))
    text = jax.random.normal(jax.random.key(1), (9, 8))
    drawn = iter(cands[1:])  # candidate c >= 1: the next one drawn
    best, index, score = best_of.best_of(lambda key: next(drawn),
                                         lambda z: jnp.einsum("be,be->b", z, text), cands[0], 4,
                                         jax.random.key(2), best_of.PRIOR_STREAM)
    c, t = np.asarray(cands), np.asarray(text)
    for b in range(9):
        dots = [float(c[k, b] @ t[b]) for k in range(4)]
        assert int(index[b]) == int(np.argmax(dots))
        np.testing.assert_allclose(score[b], max(dots), rtol=1e-5)
        np.testing.assert_array_equal(best[b], c[int(np.argmax(dots)), b])
    # A NaN score never wins: candidate 0 stays where every other candidate is NaN.
    nan = jnp.full((9, 8), jnp.nan)
    _, index, _ = best_of.best_of(lambda key: nan, lambda z: jnp.sum(z, -1), cands[0], 3,
                                  jax.random.key(2), best_of.PRIOR_STREAM)
    assert not np.asarray(index).any()


def test_the_decoders_dropouts_hit_their_rates_independently(data_dir, tiny_clip):
    fam = families.build(tiny(data_dir, "decoder"))
    n = 40_000
    e = fam.embed_dim
    cond = fam.conditioning.of_prompts(["seven"] * n).replace(
        embedding=jnp.ones((n, e)) / math.sqrt(e))
    dropped = fam.drop(cond, jax.random.key(0), fam.hparams())
    text_null = np.asarray(dropped.is_null)
    emb_null = np.asarray(jnp.all(dropped.embedding == 0, axis=-1))
    null = fam.null()
    np.testing.assert_array_equal(np.asarray(dropped.tokens)[text_null],
                                  np.broadcast_to(null.tokens, (int(text_null.sum()), null.tokens.shape[1])))
    assert not np.asarray(dropped.is_null)[~text_null].any()
    for frac, p in ((text_null.mean(), 0.5), (emb_null.mean(), 0.1),
                    ((text_null & emb_null).mean(), 0.05)):
        assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n), (frac, p)
    # The null of sampling drops both; of_prompts gives the null embedding until a job fills it.
    assert bool(null.is_null.all()) and float(jnp.abs(null.embedding).max()) == 0.0
    with pytest.raises(ValueError, match="unknown condition parts"):
        conditioning.drop_parts(cond, null, jax.random.key(0), {"image": 0.1})


def test_the_decoder_reads_the_embedding_through_both_paths(data_dir, tiny_unclip):
    """A trained decoder's output changes with the embedding; with the extra tokens or the
    time-embedding projection zeroed, it still does (each path alone carries it)."""
    _, dec = tiny_unclip
    tr = load_trained(dec)
    fam, params = tr.family, tr.params
    cond = fam.conditioning.of_prompts(["seven"] * 2)
    z = jax.random.normal(jax.random.key(0), (2, fam.embed_dim))
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    x = jax.random.normal(jax.random.key(1), (2,) + fam.image_shape)
    t = jnp.asarray([500, 500])

    def out(p, emb):
        enc = fam.encode(p, cond.replace(embedding=emb))
        return fam.denoise_fn(p)(x, t, enc)
    base = out(params, z)
    assert float(jnp.abs(out(params, z[::-1]) - base).max()) > 1e-4
    for path in (("embedding_tokens",), ("unet", "embedding_proj")):
        zeroed = jax.tree_util.tree_map(lambda a: a, params)
        node = zeroed["params"]
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = jax.tree_util.tree_map(jnp.zeros_like, node[path[-1]])
        assert float(jnp.abs(out(zeroed, z[::-1]) - out(zeroed, z)).max()) > 1e-5, path


def _prior_job(prior, decoder, k=2, w_prior=1.0):
    dec_stage = stages_lib.Stage(decoder, SampleOptions("ddim", 3), 1.0, None)
    spec = Plan.create(prior, PROMPTS, num_per_prompt=3, guidance=(w_prior,), seed=5,
                       options=SampleOptions("ddim", 3, thresholding="none"), shard_size=2,
                       stages=[dec_stage], candidates=k)
    return spec, [dec_stage]


def test_text_prior_decoder_is_one_job_whose_images_do_not_depend_on_devices_or_batch(
        tiny_unclip, tmp_path):
    prior, decoder = (load_trained(w) for w in tiny_unclip)
    spec, stages = _prior_job(prior, decoder)
    outs = {}
    for name, devices, batch in (("8dev_b7", None, 7), ("1dev_b1", jax.devices()[:1], 1)):
        job_lib.run_job(spec, str(tmp_path / name), batch_size=batch, devices=devices,
                        progress=False)
        outs[name] = out_lib.load_images(str(tmp_path / name))
    (x8, rows8), (x1, rows1) = outs["8dev_b7"], outs["1dev_b1"]
    assert x8.shape == (6, 16, 16, 1)
    np.testing.assert_array_equal(x8, x1)
    assert rows8 == rows1
    z8 = out_lib.read_outputs(str(tmp_path / "8dev_b7" / "stages" / "0"), "embedding", np.arange(6))
    z1 = out_lib.read_outputs(str(tmp_path / "1dev_b1" / "stages" / "0"), "embedding", np.arange(6))
    np.testing.assert_array_equal(z8, z1)
    np.testing.assert_allclose(np.linalg.norm(z8, axis=-1), 1.0, rtol=1e-5)
    r = rows8[4]["embedding"]
    assert (r["source"], r["workdir"], r["checkpoint_step"], r["candidates"], r["file"]) == (
        "prior", prior.workdir, prior.step, 2, "stages/0/embeddings/000004.npy")
    assert rows8[4]["stage_files"] == ["stages/0/embeddings/000004.npy"]
    # The kept candidate: the first job's (K = 1) embedding unless the second is closer to the
    # text; its recorded score is its dot product with the caption's CLIP text embedding.
    spec1, _ = _prior_job(prior, decoder, k=1)
    job_lib.run_job(spec1, str(tmp_path / "k1"), batch_size=7, progress=False)
    z_k1 = out_lib.read_outputs(str(tmp_path / "k1" / "stages" / "0"), "embedding", np.arange(6))
    stage0 = [row for s in range(3) for row in files.read_jsonl(
        str(tmp_path / "8dev_b7" / "stages" / "0" / out_lib.shard_file(s)))]
    text = np.asarray(prior.family.caption_embedding(
        prior.family.conditioning.of_prompts(PROMPTS)))
    for i, row in enumerate(stage0):
        t = text[i // 3]
        np.testing.assert_allclose(row["prior_score"], z8[i] @ t, rtol=1e-4, atol=1e-5)
        if row["prior_candidate"] == 0:
            np.testing.assert_array_equal(z8[i], z_k1[i])
        else:
            assert z8[i] @ t >= z_k1[i] @ t - 1e-6
    assert {row["prior_candidate"] for row in stage0} <= {0, 1}


def test_a_prior_job_killed_in_its_decoder_stage_resumes_exactly(tiny_unclip, tmp_path,
                                                                 monkeypatch):
    prior, decoder = (load_trained(w) for w in tiny_unclip)
    spec, stages = _prior_job(prior, decoder)
    ref = tmp_path / "straight"
    job_lib.run_job(spec, str(ref), batch_size=2, progress=False)
    out = tmp_path / "killed"
    save, written = images.save_png, []

    def dying(path, image):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(path)
        save(path, image)
    monkeypatch.setattr(images, "save_png", dying)
    with pytest.raises(KeyboardInterrupt):
        job_lib.run_job(spec, str(out), batch_size=2, progress=False)
    monkeypatch.setattr(images, "save_png", save)
    assert len(os.listdir(out / "stages" / "0" / "shards")) == 3   # the prior stage finished
    res = job_lib.run_job(spec, str(out), batch_size=2, progress=False)
    stats = files.read_json(str(out / out_lib.STATS_FILE))
    assert [s["generated"] for s in stats["stages"]] == [0, 4]
    assert res.generated == 4
    np.testing.assert_array_equal(out_lib.load_images(str(out))[0],
                                  out_lib.load_images(str(ref))[0])


def _test_images(data_dir, tmp_path, n=3):
    from t2i_jax import data as data_lib
    cfg = tiny(data_dir, "decoder")
    d = data_lib.load_split(cfg.data, "test", limit=n)
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        images.save_png(str(p), images.to_uint8(d["image"][i]))
        paths.append(str(p))
    return paths


def test_interpolation_ends_are_variations_with_the_rows_shared_noise(data_dir, tiny_unclip,
                                                                      tmp_path):
    """--interpolate A B: frame 0 is exactly A's DDIM eta = 0 variation with sample id 0 (the
    row's one noise) and frame K - 1 is B's; records say slerp, t and the two images; variations
    of one image differ from each other (stochastic sampling)."""
    _, dec = tiny_unclip
    a, b, c = _test_images(data_dir, tmp_path)
    common = ["--workdir", dec, "--steps", "3", "--no_progress"]
    assert sample_cli.run(common + ["--interpolate", a, b, "--interpolate", b, c, "--frames", "4",
                                    "--outdir", str(tmp_path / "int")]) == 0
    x, rows = out_lib.load_images(str(tmp_path / "int"))
    assert x.shape == (8, 16, 16, 1)
    assert [r["embedding"]["t"] for r in rows[:4]] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert {r["sample_id"] for r in rows[:4]} == {0} and {r["sample_id"] for r in rows[4:]} == {4}
    assert (rows[0]["embedding"]["a"], rows[0]["embedding"]["b"]) == (a, b)
    assert (rows[0]["eta"], rows[0]["sampler"]) == (0.0, "ddim")
    for img, idx in ((a, 0), (b, 3)):
        out = tmp_path / f"var{idx}"
        assert sample_cli.run(common + ["--variations", img, "--num_per_prompt", "1", "--eta", "0",
                                        "--outdir", str(out)]) == 0
        xv, rv = out_lib.load_images(str(out))
        np.testing.assert_array_equal(xv[0], x[idx])
        assert rv[0]["embedding"]["source"] == "image" and rv[0]["embedding"]["path"] == img
    # Stochastic variations (eta 1 by default) of one image differ from each other.
    assert sample_cli.run(common + ["--variations", a, "--num_per_prompt", "3",
                                    "--outdir", str(tmp_path / "var")]) == 0
    xv, rv = out_lib.load_images(str(tmp_path / "var"))
    assert rv[0]["eta"] == 1.0
    assert np.abs(xv[0].astype(int) - xv[1].astype(int)).mean() > 1


_refused = assert_refused


@pytest.mark.parametrize("case", ["not_an_image", "one_image", "frames_1", "prior_as_workdir",
                                  "decoder_alone", "prior_of_a_base", "two_sources"])
def test_unclip_inputs_that_do_not_fit_are_refused_before_anything_is_written(
        data_dir, tiny_unclip, tiny_workdir, tmp_path, capfd, case):
    prior, dec = tiny_unclip
    a, b = _test_images(data_dir, tmp_path, 2)
    (tmp_path / "notes.png").write_text("not an image")
    args, want = {
        "not_an_image": (["--workdir", dec, "--variations", str(tmp_path / "notes.png")],
                         "--variations .*notes.png is not an image Pillow can read"),
        "one_image": (["--workdir", dec, "--interpolate", a], "takes two images, A and B"),
        "frames_1": (["--workdir", dec, "--interpolate", a, b, "--frames", "1"],
                     "--frames must be >= 2"),
        "prior_as_workdir": (["--workdir", prior, "--prompt", "7"],
                             "holds an unCLIP prior.*pass the decoder as --workdir"),
        "decoder_alone": (["--workdir", dec, "--prompt", "7"], "needs a CLIP image embedding"),
        "prior_of_a_base": (["--workdir", tiny_workdir, "--prior", prior, "--prompt", "7"],
                            "needs an unCLIP decoder in --workdir"),
        "two_sources": (["--workdir", dec, "--prior", prior, "--variations", a],
                        "are different jobs"),
    }[case]
    _refused(args, tmp_path / "out", capfd, want)


def test_a_retrained_clip_is_refused_by_its_prior_and_a_prior_on_another_clip_by_the_decoder(
        data_dir, tiny_unclip, tiny_clip, tmp_path, capfd):
    _, dec = tiny_unclip
    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip, clip)
    for name in ("prior_a", "prior_b"):
        cfg = tiny(data_dir, "prior", train__num_steps=2)
        cfg.model.clip = str(clip)
        run(cfg, tmp_path / name)
        if name == "prior_a":
            assert load_trained(str(tmp_path / name)).family.clip.workdir == str(clip)
            # The CLIP retrained since: prior_a reads its recorded step 40 while it is still
            # in the CLIP's checkpoints/; once it is gone, prior_a's embedding space is gone.
            run(tiny(data_dir, "contrastive", train__num_steps=42, train__checkpoint_every=42),
                clip)
            assert load_trained(str(tmp_path / name)).family.clip.step == 40
            shutil.rmtree(clip / "checkpoints" / "40")
            with pytest.raises(ValueError, match="is not the one this model was trained with"):
                load_trained(str(tmp_path / name))
    # prior_b is on the retrained CLIP, the decoder on the original: different spaces.
    _refused(["--workdir", dec, "--prior", str(tmp_path / "prior_b"), "--prompt", "7"],
             tmp_path / "out", capfd, "built on different CLIPs")


def test_prior_thresholding_and_eps_prediction_are_refused(data_dir, tiny_clip):
    cfg = tiny(data_dir, "prior")
    cfg.sample.thresholding = "static"
    with pytest.raises(ValueError, match="refused for a prior"):
        families.build(cfg)
    cfg = tiny(data_dir, "prior")
    cfg.diffusion.prediction = "eps"
    with pytest.raises(ValueError, match="predicts the embedding itself"):
        families.build(cfg)
    fam = families.build(tiny(data_dir, "prior"))
    assert clip_lib.embed_dim(fam.clip) == fam.embed_dim == 16


@pytest.mark.parametrize("name", ["digits_prior", "digits_decoder", "shapes_prior",
                                  "shapes_decoder"])
def test_the_shipped_unclip_configs(name, data_dir, tiny_clip):
    """Each names its CLIP and the paper's settings; the digits ones build on a digits CLIP."""
    from t2i_jax.config_utils import load_config
    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   "configs", f"{name}.py"))
    data = name.split("_")[0]
    assert cfg.model.clip == f"runs/{data}_clip"
    if name.endswith("prior"):
        assert (cfg.family, cfg.diffusion.prediction, cfg.model.prior.causal,
                cfg.sample.prior_candidates, cfg.sample.thresholding) == ("prior", "x0", True, 2,
                                                                          "none")
    else:
        assert (cfg.family, cfg.train.p_image, cfg.train.p_text,
                cfg.model.embedding_tokens) == ("decoder", 0.1, 0.5, 4)
    if data == "digits":
        cfg.model.clip = tiny_clip
        cfg.data.data_dir = data_dir
        fam = families.build(cfg)
        shapes = jax.eval_shape(fam.init_params, jax.random.key(0))
        assert jax.tree_util.tree_leaves(shapes)
        assert fam.frozen_identity()["clip"]["workdir"] == tiny_clip
