"""Loss targets and weightings: min-SNR-gamma is the same loss in every parameterisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax.diffusion import forward, losses, make_schedule
from t2i_jax.diffusion.forward import q_sample


SCHEDULE = make_schedule("cosine", 1000)


def _batch(schedule, seed=0, t=None):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    x0 = jax.random.uniform(k1, (6, 4, 4, 3), minval=-1, maxval=1)
    noise = jax.random.normal(k2, x0.shape)
    if t is None:
        t = jnp.array([0, 3, 100, 500, 900, 999], jnp.int32)
    x0_hat = x0 + 0.1 * jax.random.normal(k3, x0.shape)  # an imperfect model's x0 guess
    return x0, noise, t, x0_hat


def test_uniform_eps_loss_is_mse_of_noise():
    x0, noise, t, _ = _batch(SCHEDULE)
    out = noise + 0.5
    got = losses.per_example_loss(SCHEDULE, out, x0, t, noise)
    np.testing.assert_allclose(np.asarray(got), 0.25, rtol=1e-6)
    zero = losses.per_example_loss(SCHEDULE, noise, x0, t, noise, prediction="eps")
    np.testing.assert_array_equal(np.asarray(zero), 0.0)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_is_the_same_x0_loss_for_every_target(gamma):
    """Hang et al. 2023: loss = min(SNR, gamma) |x0_hat - x0|^2, whatever the model predicts."""
    x0, noise, t, x0_hat = _batch(SCHEDULE)
    x_t = q_sample(SCHEDULE, x0, t, noise)
    ab = SCHEDULE.at("alphas_cumprod", t, 4)
    eps_hat = forward.eps_from_x0(x_t, x0_hat, ab)
    outputs = {"eps": eps_hat, "x0": x0_hat, "v": forward.v_from_x0_eps(x0_hat, eps_hat, ab)}
    ab64 = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[np.asarray(t)]
    snr = ab64 / (1 - ab64)
    x0_mse = np.mean((np.asarray(x0_hat, np.float64) - np.asarray(x0, np.float64)) ** 2, axis=(1, 2, 3))
    want = np.minimum(snr, gamma) * x0_mse
    for prediction, out in outputs.items():
        got = losses.per_example_loss(SCHEDULE, out, x0, t, noise, prediction=prediction,
                                      weighting="min_snr", min_snr_gamma=gamma)
        # eps targets at t = 999 (SNR ~ 1e-9) amplify float32 rounding of x_t; compare where
        # the three parameterisations are numerically well posed, and all of them everywhere finite.
        assert np.all(np.isfinite(np.asarray(got)))
        np.testing.assert_allclose(np.asarray(got)[:5], want[:5], rtol=2e-3, err_msg=prediction)


def test_min_snr_weights_closed_form_and_finite_at_zero_terminal_snr():
    s = make_schedule("cosine", 1000, zero_terminal_snr=True)
    t = jnp.array([0, 500, 999], jnp.int32)
    snr = losses.snr(s, t)
    assert float(snr[-1]) == 0.0
    w = {p: np.asarray(losses.loss_weight(snr, p, "min_snr", 5.0)) for p in ("eps", "x0", "v")}
    snr64 = np.asarray(snr, np.float64)
    np.testing.assert_allclose(w["x0"], np.minimum(snr64, 5.0), rtol=1e-6)
    np.testing.assert_allclose(w["v"], np.minimum(snr64, 5.0) / (snr64 + 1), rtol=1e-6)
    np.testing.assert_allclose(w["eps"][:2], np.minimum(snr64[:2], 5.0) / snr64[:2], rtol=1e-6)
    assert w["eps"][-1] == 1.0 and w["x0"][-1] == 0.0 and w["v"][-1] == 0.0
    # zero_snr_weight trains t = T-1 too (as diffusers' scripts do); other timesteps keep theirs.
    for p in ("eps", "x0", "v"):
        w1 = np.asarray(losses.loss_weight(snr, p, "min_snr", 5.0, zero_snr_weight=1.0))
        assert w1[-1] == 1.0 and np.array_equal(w1[:2], w[p][:2])
    # And the whole loss is finite there, for each target, with gradients.
    x0, noise, _, _ = _batch(s)
    t6 = jnp.full((6,), 999, jnp.int32)
    for p in ("eps", "x0", "v"):
        f = lambda out: jnp.sum(losses.per_example_loss(s, out, x0, t6, noise, prediction=p,
                                                        weighting="min_snr"))
        value, grad = jax.value_and_grad(f)(jnp.zeros_like(x0))
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad))), p


def test_uniform_weights_are_one_and_bad_names_raise():
    snr = jnp.array([0.0, 1.0, 1e4])
    np.testing.assert_array_equal(np.asarray(losses.loss_weight(snr, "v", "uniform")), 1.0)
    with pytest.raises(ValueError, match="unknown loss weighting 'p2'"):
        losses.loss_weight(snr, "eps", "p2")
    with pytest.raises(ValueError, match="unknown prediction type"):
        losses.loss_weight(snr, "mu", "uniform")
    x0, noise, t, _ = _batch(SCHEDULE)
    with pytest.raises(ValueError, match="same shape"):
        losses.per_example_loss(SCHEDULE, x0[:, :2], x0, t, noise)
