"""CFG combination, gradient guidance and thresholding against their closed forms."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax.diffusion import analytic, guidance, make_schedule

KEY = jax.random.key(0)


def test_cfg_combine_is_the_papers_formula():
    c, n = jax.random.normal(KEY, (2, 3, 4, 4, 2))
    for w in [0.0, 1.0, 6.5, -1.0]:
        got = guidance.cfg_combine(c, n, w)
        np.testing.assert_allclose(np.asarray(got), np.asarray((1 + w) * c - w * n), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(guidance.cfg_combine(c, n, 0.0)), np.asarray(c))
    np.testing.assert_allclose(np.asarray(guidance.cfg_combine(c, n, -1.0)), np.asarray(n), atol=1e-6)
    w = jnp.array([0.0, 2.0, 5.0])  # one weight per example
    got = guidance.cfg_combine(c, n, w)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray((1 + w[i]) * c[i] - w[i] * n[i]),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"scalar or have shape \[B\] = \[3\]"):
        guidance.cfg_combine(c, n, jnp.ones(2))


def test_classifier_guidance_closed_form_gradient():
    x = jax.random.normal(KEY, (4, 5))
    eps = jnp.ones_like(x)
    target = jnp.arange(5.0)
    log_p = lambda x_t, t, y: -0.5 * jnp.sum((x_t - y) ** 2, axis=-1)  # grad = -(x - y)
    got = guidance.classifier_guidance(eps, x, jnp.zeros(4, jnp.int32), target, log_p, 2.0,
                                       jnp.float32(0.6))
    np.testing.assert_allclose(np.asarray(got), np.asarray(eps + 0.6 * 2.0 * (x - target)), rtol=1e-6)
    with pytest.raises(ValueError, match="one value per example"):
        guidance.classifier_guidance(eps, x, jnp.zeros(4, jnp.int32), target,
                                     lambda x_t, t, y: jnp.sum(x_t), 1.0, 1.0)


def test_classifier_guidance_turns_the_unconditional_eps_into_the_conditional_one():
    """Bayes: grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t), so guiding the exact
    unconditional eps with the exact classifier at gamma = 1 gives the exact conditional eps."""
    schedule = make_schedule("cosine", 1000)
    mixture = analytic.GaussianMixture.create([0.3, 0.7], [[-1.0, 0.5], [1.0, 0.0]], [[0.5, 0.3], [0.4, 0.9]])
    eps = analytic.eps_fn(mixture, schedule)
    x = jax.random.normal(KEY, (64, 2))
    for t_value in [10, 300, 700]:
        t = jnp.full((64,), t_value, jnp.int32)
        y = jnp.zeros((64,), jnp.int32)
        guided = guidance.classifier_guidance(
            eps(x, t, None), x, t, y, analytic.classifier_fn(mixture, schedule), 1.0,
            schedule.sqrt_one_minus_alphas_cumprod[t_value])
        np.testing.assert_allclose(np.asarray(guided), np.asarray(eps(x, t, y)), rtol=1e-4, atol=1e-5)


def test_dynamic_threshold_is_imagens_rule():
    x0 = jax.random.normal(KEY, (3, 8, 8, 3)) * jnp.array([0.3, 2.0, 5.0])[:, None, None, None]
    got = np.asarray(guidance.dynamic_threshold(x0, 0.9))
    flat = np.abs(np.asarray(x0).reshape(3, -1))
    for i in range(3):
        s = max(np.quantile(flat[i], 0.9), 1.0)
        np.testing.assert_allclose(got[i], np.clip(np.asarray(x0[i]), -s, s) / s, rtol=1e-6, atol=1e-7)
    # Example 0 lies inside [-1, 1]: untouched (s = 1). The others end inside [-1, 1], and a
    # fraction 1 - p of their pixels saturates at +-1.
    np.testing.assert_allclose(got[0], np.asarray(x0[0]), rtol=1e-6)
    assert np.abs(got).max() <= 1.0
    assert np.mean(np.abs(got[2]) == 1.0) == pytest.approx(0.1, abs=0.01)


def test_static_clip_and_resolution_of_names():
    x0 = jnp.array([[-3.0, 0.5, 2.0]])
    np.testing.assert_array_equal(np.asarray(guidance.static_clip(x0)), [[-1.0, 0.5, 1.0]])
    assert guidance.resolve_thresholding("static") is guidance.static_clip
    assert guidance.resolve_thresholding("dynamic") is guidance.dynamic_threshold
    custom = functools.partial(guidance.dynamic_threshold, percentile=0.99)
    assert guidance.resolve_thresholding(custom) is custom and guidance.resolve_thresholding(None) is None
    with pytest.raises(ValueError, match="unknown thresholding 'imagen'"):
        guidance.resolve_thresholding("imagen")
    with pytest.raises(ValueError, match="percentile must be in"):
        guidance.dynamic_threshold(x0, 99.5)
