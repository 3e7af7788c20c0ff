"""q_sample, q_posterior and the eps / x0 / v conversions against closed forms and Bayes' rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax.diffusion import forward, make_schedule

SCHEDULE = make_schedule("linear", 1000)


def test_q_sample_moments_match_closed_form():
    n = 200_000
    x0 = jnp.array([1.5, -0.7, 0.3])
    t = jnp.array([0, 400, 999], jnp.int32)
    noise = jax.random.normal(jax.random.key(0), (n, 3))
    x_t = jax.vmap(lambda e: forward.q_sample(SCHEDULE, x0[:, None], t, e[:, None]))(noise)[..., 0]
    ab = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[np.asarray(t)]
    mean, var = np.sqrt(ab) * np.asarray(x0), 1 - ab
    got = np.asarray(x_t, np.float64)
    np.testing.assert_array_less(np.abs(got.mean(0) - mean), 4 * np.sqrt(var / n))
    np.testing.assert_array_less(np.abs(got.var(0) - var), 4 * var * np.sqrt(2 / n))


@pytest.mark.parametrize("shape", [(4,), (4, 3), (4, 8, 8, 3), (4, 2, 5, 5, 1)])
def test_q_sample_any_image_shape_is_the_formula(shape):
    k1, k2 = jax.random.split(jax.random.key(1))
    x0, noise = jax.random.normal(k1, shape), jax.random.normal(k2, shape)
    t = jnp.array([0, 10, 500, 999], jnp.int32)
    got = np.asarray(forward.q_sample(SCHEDULE, x0, t, noise), np.float64)
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[np.asarray(t)]
    ab = ab.reshape((4,) + (1,) * (len(shape) - 1))
    want = np.sqrt(ab) * np.asarray(x0, np.float64) + np.sqrt(1 - ab) * np.asarray(noise, np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [1, 2, 50, 500, 999])
def test_q_posterior_is_bayes_rule(t):
    """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0), normalised on a fine grid."""
    x0, x_t = 0.8, -0.4
    betas = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1 - betas)
    grid = np.linspace(-6, 6, 400_001)
    log_p = (-(x_t - np.sqrt(1 - betas[t]) * grid) ** 2 / (2 * betas[t])
             - (grid - np.sqrt(ab[t - 1]) * x0) ** 2 / (2 * (1 - ab[t - 1])))
    p = np.exp(log_p - log_p.max())
    p /= p.sum()
    mean = (grid * p).sum()
    var = ((grid - mean) ** 2 * p).sum()
    m, v, log_v = forward.q_posterior(SCHEDULE, jnp.full((1, 1), x0), jnp.full((1, 1), x_t),
                                      jnp.array([t], jnp.int32))
    assert float(m[0, 0]) == pytest.approx(mean, rel=1e-5, abs=1e-6)
    assert float(v[0, 0]) == pytest.approx(var, rel=1e-4)
    assert float(log_v[0, 0]) == pytest.approx(np.log(var), abs=1e-4)


def test_q_posterior_at_t0_is_the_data():
    x0 = jnp.array([[0.3, -1.2]])
    m, v, log_v = forward.q_posterior(SCHEDULE, x0, x0 * 0.99, jnp.array([0], jnp.int32))
    np.testing.assert_allclose(np.asarray(m), np.asarray(x0), rtol=1e-6)
    assert float(v[0, 0]) == 0.0
    assert float(log_v[0, 0]) == pytest.approx(float(SCHEDULE.posterior_log_variance_clipped[1]))


@pytest.mark.parametrize("alpha_bar", [0.9999, 0.5, 1e-4])
def test_conversions_round_trip(alpha_bar):
    k1, k2 = jax.random.split(jax.random.key(2))
    x0, eps = jax.random.normal(k1, (8, 4)), jax.random.normal(k2, (8, 4))
    ab = jnp.float32(alpha_bar)
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps
    v = forward.v_from_x0_eps(x0, eps, ab)
    tol = dict(rtol=1e-4, atol=2e-4)
    for prediction, out in [("eps", eps), ("x0", x0), ("v", v)]:
        got_eps, got_x0 = forward.eps_and_x0(out, x_t, ab, prediction)
        if not (prediction == "eps" and alpha_bar < 1e-3) and not (prediction == "x0" and alpha_bar > 0.999):
            np.testing.assert_allclose(np.asarray(got_x0), np.asarray(x0), **tol, err_msg=prediction)
            np.testing.assert_allclose(np.asarray(got_eps), np.asarray(eps), **tol, err_msg=prediction)
        np.testing.assert_allclose(np.asarray(forward.prediction_target(x0, eps, ab, prediction)),
                                   np.asarray(out))


def test_v_conversions_are_finite_at_zero_snr():
    x_t, v = jnp.array([[0.3, -2.0]]), jnp.array([[-0.5, 0.1]])
    eps, x0 = forward.eps_and_x0(v, x_t, jnp.float32(0.0), "v")
    np.testing.assert_array_equal(np.asarray(eps), np.asarray(x_t))  # pure noise: eps = x_t
    np.testing.assert_array_equal(np.asarray(x0), -np.asarray(v))


def test_bad_shapes_are_named():
    x0 = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[4\]"):
        forward.q_sample(SCHEDULE, x0, jnp.zeros((3,), jnp.int32), x0)
    with pytest.raises(ValueError, match="integer"):
        forward.q_sample(SCHEDULE, x0, jnp.zeros((4,)), x0)
    with pytest.raises(ValueError, match="noise has shape"):
        forward.q_sample(SCHEDULE, x0, jnp.zeros((4,), jnp.int32), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="unknown prediction type 'score'"):
        forward.eps_and_x0(x0, x0, 0.5, "score")
