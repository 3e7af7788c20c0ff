"""Evaluation: the Fréchet distance against scipy and closed forms, precision/recall on sets whose
answer is known, and the data-set classifier (accuracy, alignment read from prompts)."""

import shutil

import numpy as np
import pytest
import scipy.linalg

from t2i_jax.config_utils import load_config
from t2i_jax.evaluation import evaluator as ev_lib
from t2i_jax.evaluation.frechet import (Stats, feature_stats, frechet_distance,
                                        frechet_distance_of, sqrtm_psd)
from t2i_jax.evaluation.precision_recall import precision_recall


def random_psd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d


def scipy_frechet(mu1, s1, mu2, s2):
    """pytorch-fid's formula: the general sqrtm of S1 S2 (scipy), its real part."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_sqrtm_agrees_with_scipy():
    rng = np.random.default_rng(0)
    for d, rank in ((5, None), (32, None), (16, 8)):  # full rank and singular
        a = random_psd(rng, d, rank)
        r = sqrtm_psd(a)
        np.testing.assert_allclose(r @ r, a, atol=1e-10)
        np.testing.assert_allclose(r, scipy.linalg.sqrtm(a).real, atol=1e-6)


def test_frechet_distance_agrees_with_scipy_and_is_zero_for_the_same_set():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 24)) @ rng.normal(size=(24, 24))
    y = rng.normal(size=(300, 24)) * 1.5 + 0.3
    sx, sy = feature_stats(x), feature_stats(y)
    np.testing.assert_allclose(frechet_distance(sx, sy),
                               scipy_frechet(sx.mu, sx.sigma, sy.mu, sy.sigma), rtol=1e-7)
    assert frechet_distance_of(x, x) == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(frechet_distance(sx, sy), frechet_distance(sy, sx), rtol=1e-9)


def test_few_sample_path_equals_the_covariance_path():
    """frechet_distance_of with N < D (sample-space trace) equals the D x D computation."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(20, 64)) @ rng.normal(size=(64, 64)) * 0.3
    y = rng.normal(size=(35, 64)) + 0.5
    fast = frechet_distance_of(x, y)
    np.testing.assert_allclose(fast, frechet_distance(feature_stats(x), feature_stats(y)), rtol=1e-7)
    np.testing.assert_allclose(fast, scipy_frechet(x.mean(0), np.cov(x, rowvar=False),
                                                   y.mean(0), np.cov(y, rowvar=False)), rtol=1e-6)
    assert frechet_distance_of(x, x) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    # 1-D: d^2 = (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(Stats(np.array([1.0]), np.array([[4.0]]), 2),
                            Stats(np.array([-2.0]), np.array([[9.0]]), 2)) == pytest.approx(9 + 1)
    # Commuting (diagonal) covariances: sum (sqrt(a_i) - sqrt(b_i))^2 + |mu1 - mu2|^2.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(Stats(mu1, np.diag(a), 2), Stats(mu2, np.diag(b), 2)) == pytest.approx(want)
    # Rotated (non-commuting) covariances: the distance is rotation invariant.
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rot = frechet_distance(Stats(q @ mu1, q @ np.diag(a) @ q.T, 2), Stats(q @ mu2, q @ np.diag(b) @ q.T, 2))
    assert rot == pytest.approx(want)
    # Samples of the two Gaussians: the estimate approaches the closed form.
    x = rng.normal(size=(200_000, 3)) * np.sqrt(a) + mu1
    y = rng.normal(size=(200_000, 3)) * np.sqrt(b) + mu2
    assert frechet_distance_of(x, y) == pytest.approx(want, rel=0.01)


def test_precision_recall_on_known_sets():
    rng = np.random.default_rng(3)
    blob = lambda c, n: rng.normal(size=(n, 2)) * 0.1 + c  # noqa: E731
    real = np.concatenate([blob(0.0, 300), blob(5.0, 300)])
    same = real + 1e-9
    assert precision_recall(real, same) == pytest.approx((1.0, 1.0))
    far = blob(50.0, 300)
    assert precision_recall(real, far) == pytest.approx((0.0, 0.0))
    # Mode dropping: a model that only draws the first mode is precise but covers half the data.
    p, r = precision_recall(real, blob(0.0, 300))
    assert p > 0.95 and abs(r - 0.5) < 0.05
    p, r = precision_recall(real, np.concatenate([blob(0.0, 150), blob(5.0, 150)]))
    assert p > 0.95 and r > 0.95
    # Hand-computed, k = 1 on a line: real {0, 1, 3} has radii {1, 1, 2}; fake {0.5, 10}.
    p, r = precision_recall(np.array([[0.0], [1.0], [3.0]]), np.array([[0.5], [10.0], [9.0]]), k=1)
    assert p == pytest.approx(1 / 3)   # 0.5 inside; 10 and 9 outside every real ball
    # Fake radii: 0.5's nearest other fake is 9 (radius 8.5), so its ball holds every real
    # point: recall 1. (One outlier inflates the manifold: why the paper uses k = 3.)
    assert r == pytest.approx(1.0)


def test_prompt_targets():
    for d in range(10):
        from t2i_jax.data import digits
        for caption in digits.captions(d):
            assert ev_lib.target_of("digits", caption) == d
    assert ev_lib.target_of("digits", "a cat") is None and ev_lib.target_of("digits", "") is None
    # (colour, shape, size): red 0, blue 2; circle 0, square 1, triangle 2; small 0, large 1
    assert ev_lib.target_of("shapes", "a small red circle above a large blue square") == frozenset(
        {(0, 0, 0), (2, 1, 1)})
    assert ev_lib.target_of("shapes", "a large green triangle") == frozenset({(1, 2, 1)})
    short = ev_lib.target_of("shapes", "a red circle above a blue square")
    assert short == frozenset({(0, 0, None), (2, 1, None)})
    match = ev_lib.objects_match
    assert match(frozenset({(0, 0, 1), (2, 1, 0)}), short)            # sizes not asked for
    assert not match(frozenset({(0, 0, 1)}), short)                   # an object missing
    assert not match(frozenset({(0, 0, 1), (2, 1, 0), (1, 2, 0)}), short)   # one too many
    sized = ev_lib.target_of("shapes", "a small red circle left of a large blue square")
    assert match(frozenset({(0, 0, 0), (2, 1, 1)}), sized)
    assert not match(frozenset({(0, 0, 1), (2, 1, 1)}), sized)        # the wrong size
    assert ev_lib.is_held_out_prompt("a large red triangle")
    assert ev_lib.is_held_out_prompt("a blue circle below a green square")
    assert not ev_lib.is_held_out_prompt("a red circle left of a blue square")


def test_shapes_alignment_scores_sets_of_pairs(data_dir):
    """The alignment logic on the real attributes: a perfect predictor aligns with every caption
    phrasing, and not with captions of other scenes."""
    cfg = load_config("configs/shapes.py")
    cfg.data.data_dir = data_dir
    from t2i_jax import data as data_lib
    split = data_lib.load_split(cfg.data, "heldout", max_examples=None)
    truth = ev_lib._targets("shapes", split) > 0.5

    class Perfect(ev_lib.Evaluator):
        def predict(self, images):
            return truth[: len(images)]

    ev = Perfect("shapes", {}, 1.0)
    for style in range(3):
        prompts = [c[style] for c in split["captions"]]
        assert ev.aligned(split["image"], prompts).mean() == 1.0
    shuffled = [split["captions"][(i + 1) % len(truth)][0] for i in range(len(truth))]
    assert ev.aligned(split["image"], shuffled).mean() < 0.3
    assert all(ev_lib.is_held_out_prompt(c[0]) for c in split["captions"])


@pytest.fixture
def digits_ev(digits_evaluator):
    return digits_evaluator


def test_digits_evaluator_reads_real_digits_and_their_prompts(data_dir, digits_ev, tmp_path):
    cfg = load_config("configs/digits.py")
    cfg.data.data_dir = data_dir
    ev = digits_ev
    assert ev.accuracy > 0.93  # held-out test split
    from t2i_jax import data as data_lib
    test = data_lib.load_split(cfg.data, "test")
    aligned = ev.aligned(test["image"], [c[3] for c in test["captions"]])  # Chinese phrasing
    assert aligned.mean() == pytest.approx(ev.accuracy)
    wrong = ev.aligned(test["image"], [str((y + 1) % 10) for y in test["label"]])
    assert wrong.mean() < 0.05
    assert np.isnan(ev.aligned(test["image"][:2], ["", "a cat"])).all()
    # Cached: the saved evaluator gives the same features.
    ev_lib.save_evaluator(ev_lib.cache_path(str(tmp_path), cfg.data), ev)
    again = ev_lib.load_or_train(cfg.data, str(tmp_path))
    np.testing.assert_array_equal(again.features(test["image"][:8]), ev.features(test["image"][:8]))
    assert again.accuracy == ev.accuracy


def test_cfg_reproduction_tables_the_metrics_of_its_own_samples(data_dir, digits_ev, tiny_workdir,
                                                                tmp_path):
    """reproduce cfg on a tiny model: one compilation for the sweep, one row per w whose numbers
    are the metrics of exactly that w's images, the real-data floor, a table and a plot."""
    from t2i_jax.evaluation.frechet import frechet_distance_of
    from t2i_jax.evaluation.reproduce.cfg import reproduce_cfg
    from t2i_jax.evaluation.scorer import Scorer, evaluator_dir
    from t2i_jax.sampling import outdir as out_lib
    from t2i_jax.sampling.load import load_trained
    cfg = load_config("tests/tiny_config.py")
    cfg.data.data_dir = data_dir
    wd = str(tmp_path / "wd")  # a copy: the shared workdir stays as it is
    shutil.copytree(tiny_workdir, wd)
    ev_lib.save_evaluator(ev_lib.cache_path(evaluator_dir(wd), cfg.data), digits_ev)
    out = str(tmp_path / "cfg")
    scorer = Scorer(cfg, evaluator_dir(wd))  # reads the cached evaluator
    res = reproduce_cfg(load_trained(wd), out, num_per_prompt=2, seed=0, batch_size=8,
                        steps=3, weights=(0.0, 2.0), progress=False, scorer=scorer)
    assert res["compilations"] == 1 and [r["w"] for r in res["rows"]] == [0.0, 2.0]
    x, rows = out_lib.load_images(f"{out}/samples")
    for row in res["rows"]:
        sel = [i for i, r in enumerate(rows) if r["guidance"] == row["w"]]
        assert row["n"] == len(sel) == 20
        prompts = [rows[i]["prompt"] for i in sel]
        assert row["alignment"] == pytest.approx(np.nanmean(digits_ev.aligned(x[sel], prompts)))
        assert row["fd"] == pytest.approx(frechet_distance_of(scorer.real, digits_ev.features(x[sel])))
    assert res["real_floor"]["n"] == 20 and res["real_floor"]["fd_sd"] > 0
    table = open(f"{out}/table.md", encoding="utf-8").read()
    assert table.count("\n| ") == 3 and "| real (train) |" in table   # 2 weights + the floor
    with open(f"{out}/plot.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
