"""Gradient guides in the sampling chain (sampling/guides.py): scale 0 is the unguided chain,
images do not depend on the device count or the batch size with every guide on, a sweep over
scales is one program, and a guide that does not fit the model is refused before anything is
written. Tiny models trained a few steps: what is tested is the mechanism, not a trained guide's
quality (docs/results.md has that)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax import families
from t2i_jax.sampling import guides as guides_lib, job as job_lib
from t2i_jax.sampling import outdir as out_lib
from t2i_jax.sampling.plan import Plan
from t2i_jax.sampling.generate import SampleOptions, make_generate_fn
from t2i_jax.sampling.load import Trained, load_trained

from runs import tiny  # noqa: E402

OPTIONS = SampleOptions("ddim", 3, eta=0.5)


@pytest.fixture(scope="module")
def models(tiny_workdir, straight_runs):
    """The tiny text model (40 steps) and the tiny classifier and CLIP (4 steps) of the shared
    session runs: restored, not initialised again (no extra compilations)."""
    model = load_trained(tiny_workdir)
    classifier = load_trained(str(straight_runs["noisy_classifier"][1]))
    clip = load_trained(str(straight_runs["contrastive"][1]))
    ref = np.linspace(-1, 1, 16 * 16, dtype=np.float32).reshape(16, 16, 1)
    guides = [guides_lib.Guide("classifier", classifier, 1.0),
              guides_lib.Guide("clip_text", clip, 30.0),
              guides_lib.Guide("clip_image", clip, 30.0, reference=ref)]
    return model, guides


def _call(generate, model, guides, prompts, scales, ids):
    cond = model.family.conditioning.of_prompts(prompts)
    rows = tuple(jax.tree_util.tree_map(jnp.asarray, g.rows(prompts)) for g in guides)
    return np.asarray(generate(model.params, cond, jax.random.key(0), 0.0, jnp.asarray(ids),
                               tuple(g.trained.params for g in guides), rows,
                               jnp.asarray(scales, jnp.float32)))


@pytest.mark.default_xla  # two different programs compared bit for bit (tests/conftest.py)
def test_guides_at_scale_0_give_the_unguided_images_and_a_sweep_is_one_program(models):
    model, guides = models
    prompts = ["3", "7", "3"]
    plain = make_generate_fn(model.family, OPTIONS, guided=False)
    x_plain = np.asarray(plain(model.params, model.family.conditioning.of_prompts(prompts),
                               jax.random.key(0), 0.0, jnp.arange(3)))
    guided = make_generate_fn(model.family, OPTIONS, guided=False, guides=guides)
    np.testing.assert_array_equal(_call(guided, model, guides, prompts, [0, 0, 0], range(3)),
                                  x_plain)
    x_on = _call(guided, model, guides, prompts, [1.0, 30.0, 30.0], range(3))
    assert np.abs(x_on - x_plain).max() > 1e-3  # the guides do move the chain
    for scales in ([2.0, 0.0, 0.0], [0.0, 60.0, 0.0], [0.0, 0.0, 60.0]):
        x = _call(guided, model, guides, prompts, scales, range(3))
        assert np.abs(x - x_plain).max() > 1e-4, scales  # each guide alone does too
    assert guided._cache_size() == 1  # 5 scale settings, one compilation


def test_the_guidance_term_is_minus_sqrt_one_minus_abar_times_the_gradient(models):
    """One step at t: eps~ - eps = -sqrt(1 - abar_t) * s * grad_x log p(y | x_t) (ADM eq. 14)."""
    model, guides = models
    classifier = guides[0]
    fam = classifier.trained.family
    x = jax.random.normal(jax.random.key(9), (2, 16, 16, 1))
    t = jnp.asarray([500, 500])
    y = jnp.asarray([3, 7])
    total = guides_lib.guide_fn([classifier])
    g = jax.jit(jax.grad(lambda v: jnp.sum(total((classifier.trained.params,), (y,),
                                                 jnp.asarray([2.5]), None, v, t))))(x)
    log_p = fam.log_prob_fn(classifier.trained.params)
    want = jax.jit(jax.grad(lambda v: jnp.sum(log_p(v, t, y))))(x) * 2.5
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(want).max()) > 0


def test_guided_images_do_not_depend_on_devices_or_batch_size(models, tmp_path):
    model, guides = models
    spec = Plan.create(model, ["3", "7"], num_per_prompt=4, guidance=(0.0,), seed=0,
                       options=OPTIONS, guides=guides)
    a = job_lib.run_job(spec, str(tmp_path / "eight"), batch_size=8, progress=False)
    b = job_lib.run_job(spec, str(tmp_path / "one"), batch_size=7, progress=False,
                        devices=jax.devices()[:1])
    assert a.num_images == b.num_images == 8
    xa, rows = out_lib.load_images(str(tmp_path / "eight"))
    xb, _ = out_lib.load_images(str(tmp_path / "one"))
    # The two jobs run other XLA programs (per-device batches of 1 on 8 devices, 7 and 1 on one):
    # the model's and the guides' convolutions and matmuls are tiled and vectorised by batch
    # shape and CPU, so float32 rounds differently in the last bits (no image reads another's:
    # each guide gradient is of its own f_g). tests/test_samplers_invariance.py bounds such
    # differences at 1e-4 in [-1, 1], 127.5 * 1e-4 = 0.013 grey levels: a value's uint8
    # rounding flips only when a .5 boundary lies that close, by one level, on about 1.3% of
    # values at most (seen on another CPU: 1 of 2048). A wrong noise id, prompt or guide row
    # moves whole images by many levels.
    diff = np.abs(xa.astype(int) - xb.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.013, (diff.max(), (diff > 0).mean())
    assert rows[0]["guides"] == [g.record() for g in guides]
    # Another guide scale in the same outdir is another job: refused, nothing overwritten.
    other = [guides_lib.Guide(g.kind, g.trained, g.scale * 2, g.image, g.reference) for g in guides]
    spec2 = Plan.create(model, ["3", "7"], num_per_prompt=4, guidance=(0.0,), seed=0,
                        options=OPTIONS, guides=other)
    with pytest.raises(out_lib.JobMismatchError, match="guides"):
        job_lib.run_job(spec2, str(tmp_path / "eight"), progress=False)


def test_a_guide_for_another_model_and_bad_prompts_are_refused(data_dir, models):
    model, guides = models
    classifier = guides[0].trained
    for key, value, words in (("data.image_size", 32, "data.image_size: 32 (guide) vs 16"),
                              ("data.channels", 3, "data.channels: 3 (guide) vs 1"),
                              ("data.name", "shapes", "data.name: 'shapes' (guide)"),
                              ("diffusion.schedule", "linear", "diffusion.schedule: 'linear'")):
        fam = families.build(tiny(data_dir, "noisy_classifier"))
        section, name = key.split(".")
        fam.config = fam.config.copy_and_resolve_references()
        fam.config[section][name] = value  # what the stored config of such a guide would say
        other = Trained(fam, classifier.params, 0, "ema", "/runs/other")
        with pytest.raises(ValueError, match=re.escape(words)):
            guides_lib.check_matches(other, model, "--classifier")
    with pytest.raises(ValueError, match=r"\['seven'\] are not class names.*'0', '1'"):
        guides[0].rows(["3", "seven"])
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number >= 0"):
            guides_lib.Guide("clip_text", guides[1].trained, bad)  # the library refuses it too


@pytest.mark.parametrize("extra, words", [
    (["--rerank", "0", "--clip", "X"], "--rerank must be >= 1"),
    (["--image_scale", "3"], "--image_scale needs --clip DIR"),
    (["--guide_image", "x.png"], "--guide_image needs --clip DIR"),
    (["--rerank", "4"], "--rerank needs --clip DIR"),
    (["--classifier", "X", "--classifier_scale", "-1"], "--classifier_scale must be a finite number >= 0"),
    (["--clip", "X", "--clip_scale", "nan"], "--clip_scale must be a finite number >= 0"),
    (["--clip_scale", "2"], "--clip_scale needs --clip DIR"),
])
def test_sample_py_refuses_bad_guide_options_before_anything_is_written(tmp_path, capfd, extra,
                                                                       words):
    import sample as sample_cli
    from test_faults import cli
    out = tmp_path / "o"
    code, err = cli(capfd, sample_cli.run, ["--workdir", "W", "--prompt", "3", "--outdir",
                                            str(out), *extra])
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_sample_py_refuses_a_guide_of_the_wrong_family_or_an_unreadable_image(
        tiny_workdir, straight_runs, tmp_path, capfd):
    import sample as sample_cli
    from test_faults import cli
    clip_wd = str(straight_runs["contrastive"][1])
    classifier_wd = str(straight_runs["noisy_classifier"][1])
    bad_image = tmp_path / "not_an_image.png"
    bad_image.write_text("no pixels here")
    out = tmp_path / "o"
    base = ["--workdir", tiny_workdir, "--prompt", "3", "--num_per_prompt", "2", "--outdir",
            str(out), "--no_progress"]
    for extra, want, words in (  # 2: the command line cannot run; 1: the run failed
            (["--classifier", clip_wd], 2, ["holds a contrastive model, not a noisy_classifier",
                                            "pass it as --clip"]),
            (["--clip", classifier_wd], 2, ["holds a noisy_classifier model, not a contrastive",
                                            "pass it as --classifier"]),
            (["--clip", clip_wd, "--guide_image", str(bad_image)], 2,
             ["--guide_image", "is not an image Pillow can read"]),
            (["--clip", clip_wd, "--guide_image", str(tmp_path / "missing.png")], 2,
             ["--guide_image", "does not exist"]),
            # a prompt that is not a class name: the classifier has nothing to guide toward
            (["--classifier", classifier_wd, "--prompt", "seven"], 1,
             ["['seven'] are not class names", "'0', '1', '2'"])):
        code, err = cli(capfd, sample_cli.run, base + extra)
        assert code == want and all(w in err[-1] for w in words), (extra, err)
        assert not (out / "job.json").exists()
    # A guide's workdir where the model to sample from belongs, in sample.py and in reproduce.
    from t2i_jax.evaluation.reproduce.cli import main as reproduce_main
    code, err = cli(capfd, sample_cli.run, ["--workdir", classifier_wd] + base[2:])
    assert code == 2 and "holds a noisy_classifier model, which does not generate" in err[-1], err
    assert not (out / "job.json").exists()
    rep = tmp_path / "rep"
    code, err = cli(capfd, reproduce_main, ["sdg", "--workdir", classifier_wd, "--clip", clip_wd,
                                             "--out", str(rep), "--no_progress"])
    assert code == 2 and "holds a noisy_classifier model, which does not generate" in err[-1], err
    assert not (rep / "samples").exists() and not (rep / "references").exists()


def test_the_guide_reproductions_sweep_one_program_each_and_score_their_own_images(
        models, digits_evaluator, tmp_path):
    """reproduce classifier / sdg on the tiny models: each sweep is one compiled program, the
    image rows' references are real test images, scale 0 is the same images whatever the
    reference, and reranking never lowers an image's CLIP score (candidate 0 is the unreranked
    image, so the best of N is at least it)."""
    from t2i_jax import data as data_lib, images
    from t2i_jax.evaluation import evaluator as ev_lib
    from t2i_jax.evaluation.reproduce.classifier import reproduce_classifier
    from t2i_jax.evaluation.reproduce.sdg import reproduce_sdg
    from t2i_jax.evaluation.scorer import Scorer
    from t2i_jax.evaluation.guides import clip_scores
    model, guides = models
    cfg = model.config
    ev_lib.save_evaluator(ev_lib.cache_path(str(tmp_path / "ev"), cfg.data), digits_evaluator)
    scorer = Scorer(cfg, str(tmp_path / "ev"))
    common = dict(num_per_prompt=1, seed=0, batch_size=10, steps=3, progress=False, scorer=scorer)
    res = reproduce_classifier(model, guides[0].trained.workdir, str(tmp_path / "cls"),
                               scales=(0.0, 5.0), **common)
    assert res["compilations"] == 1 and [r["scale"] for r in res["rows"]] == [0.0, 5.0]
    x, rows = out_lib.load_images(str(tmp_path / "cls" / "samples" / "scale_5"))
    assert [r["prompt"] for r in rows] == [str(d) for d in range(10)]
    assert res["rows"][1]["alignment"] == pytest.approx(
        np.nanmean(digits_evaluator.aligned(x, [r["prompt"] for r in rows])))

    out = tmp_path / "sdg"
    res = reproduce_sdg(model, guides[1].trained.workdir, str(out), text_scales=(0.0, 30.0),
                        image_scales=(0.0, 30.0), rerank_n=(1, 2), **common)
    # One program per guide set and shape of call: the image sweep calls with 10 rows (scale 0's
    # one job for every reference) and 1 row (each reference's job); text + image (the same
    # guides) compiles nothing new.
    assert res["compilations"] == {"text": 1, "image": 2, "text_and_image": 0, "rerank": 1}
    test = data_lib.load_split(cfg.data, "test")
    for k, ref in enumerate(res["references"]):
        first = test["image"][np.flatnonzero(test["label"] == k)[0]]
        np.testing.assert_array_equal(images.load_png(ref["path"]), images.to_uint8(first))
    unguided = res["image"][0]["read_by_class"]  # one set of images read against each class
    x0, _ = out_lib.load_images(str(out / "samples" / "image_0"))
    want = [float(np.mean(digits_evaluator.predict(x0) == k)) for k in range(10)]
    assert unguided == pytest.approx(want)
    one = out_lib.load_images(str(out / "samples" / "rerank_1"))
    two = out_lib.load_images(str(out / "samples" / "rerank_2"))
    s1, s2 = (clip_scores(guides[1].trained, x, [r["prompt"] for r in rows])
              for x, rows in (one, two))
    assert np.all(s2 >= s1 - 1e-6) and {r["rerank_candidate"] for r in two[1]} <= {0, 1}
    for r, a, b in zip(two[1], s1, s2):
        if r["rerank_candidate"] == 0:  # kept the unreranked image
            assert b == pytest.approx(a, abs=1e-6)
    assert (out / "table.md").read_text().count("\n| ") >= 4 + 2 + 1 + 2


def test_shapes_attribute_retrieval_candidates_hold_the_true_caption_once(data_dir):
    """Each candidate set of the shapes CLIP's retrieval accuracy changes one attribute of one
    shape: its V captions are distinct, the true one (the image's own full caption) sits at the
    true value's position, and there is one set per shape per attribute."""
    from t2i_jax import data as data_lib
    from t2i_jax.config_utils import load_config
    from t2i_jax.data import shapes
    from t2i_jax.evaluation.guides import attribute_candidates
    cfg = load_config("configs/shapes_clip.py")
    cfg.data.data_dir = data_dir
    split = data_lib.load_split(cfg.data, "test")
    groups = attribute_candidates(split)
    for attr, values in (("colour", shapes.COLOURS), ("shape", shapes.SHAPES)):
        image, caps, true = groups[attr]
        assert len(image) == int(split["num_shapes"].sum())
        for i, cs, v in zip(image, caps, true):
            assert len(set(cs)) == len(cs) == len(values)
            assert cs[v] == split["captions"][i][0]  # the "full" caption style
