"""The variational bound and Improved DDPM's learned variance (diffusion/vlb.py), against
independent float64 computations: numerical integrals of the KL and of the decoder's bins, the
exact negative log-likelihood of Gaussian data (the bound is tight for the exact reverse model),
the papers' formulas written out, and sampling a Gaussian mixture with the exact learned variance.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.polynomial.hermite_e import hermegauss
from scipy import integrate, stats

import reference as ref
from t2i_jax.diffusion import analytic, forward, make_schedule, samplers, schedules, vlb

LN2 = math.log(2.0)
HALF = 1.0 / 255.0  # half the width of an 8-bit bin on [-1, 1]
LEVELS = np.linspace(-1.0, 1.0, 256).astype(np.float32)


def _f64(a):
    return np.asarray(a, np.float64)


# ---------------------------------------------------------------------------------------------
# normal_kl


@pytest.mark.parametrize("m1,lv1,m2,lv2", [
    (0.0, 0.0, 1.0, 0.0), (0.3, -1.2, -0.4, 0.5), (2.0, 1.0, -1.0, -0.7),
    (-0.5, -3.0, -0.45, -2.9), (1.5, 0.8, 1.5, -1.5)])
def test_normal_kl_equals_the_integral_of_p_log_p_over_q(m1, lv1, m2, lv2):
    """normal_kl(m1, lv1, m2, lv2) = int p log(p / q) dx, integrated numerically in float64."""
    s1, s2 = math.exp(0.5 * lv1), math.exp(0.5 * lv2)
    f = lambda x: stats.norm.pdf(x, m1, s1) * (stats.norm.logpdf(x, m1, s1) - stats.norm.logpdf(x, m2, s2))
    want, _ = integrate.quad(f, -np.inf, np.inf, epsabs=0, epsrel=1e-12, limit=200)
    got = float(vlb.normal_kl(jnp.float32(m1), jnp.float32(lv1), jnp.float32(m2), jnp.float32(lv2)))
    assert want > 1e-3
    assert got == pytest.approx(want, rel=1e-5)


def test_normal_kl_of_equal_gaussians_is_zero():
    """KL(p || p) = 0 for every mean and log-variance (elementwise on arrays)."""
    m = jnp.array([-3.0, 0.0, 0.7, 5.0])
    lv = jnp.array([-4.0, 0.0, 1.3, -0.2])
    np.testing.assert_allclose(np.asarray(vlb.normal_kl(m, lv, m, lv)), 0.0, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The discretised Gaussian decoder


def _log_bin_prob_quad(x0, mean, log_scale):
    """log of the integral of N(mean, exp(log_scale)^2) over x0's bin, by quadrature in float64.

    In standard units u, log int_lo^hi phi(u) du = -c^2 / 2 - log sqrt(2 pi) + log int_lo^hi
    exp(-(u^2 - c^2) / 2) du, with c the point of [lo, hi] nearest 0: the integrand is <= 1 and
    the far tails do not underflow. A bin straddling 0 is split there, so quad sees the peak."""
    x0, mean, s = float(x0), float(mean), math.exp(float(log_scale))
    lo = -np.inf if x0 < -1 + 1e-6 else (x0 - mean - HALF) / s
    hi = np.inf if x0 > 1 - 1e-6 else (x0 - mean + HALF) / s
    c = 0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))
    g = lambda u: math.exp(-0.5 * (u * u - c * c))
    pieces = [(lo, 0.0), (0.0, hi)] if lo < 0 < hi else [(lo, hi)]
    total = sum(integrate.quad(g, a, b, epsabs=0, epsrel=1e-12, limit=200)[0] for a, b in pieces)
    return -0.5 * c * c - 0.5 * math.log(2 * math.pi) + math.log(total)


def _log_bin_prob_cdf(x0, mean, log_scale):
    """The same from the normal's log-CDF / log-SF in float64, vectorised, with no difference of
    two numbers near 1 (checked against the quadrature above)."""
    x0, mean, s = np.broadcast_arrays(_f64(x0), _f64(mean), np.exp(_f64(log_scale)))
    lo, hi = (x0 - mean - HALF) / s, (x0 - mean + HALF) / s
    right = lo > 0
    big = np.where(right, stats.norm.logsf(lo), stats.norm.logcdf(hi))
    small = np.where(right, stats.norm.logsf(hi), stats.norm.logcdf(lo))
    mid = big + np.log1p(-np.exp(small - big))
    return np.where(x0 < -1 + 1e-6, stats.norm.logcdf(hi),
                    np.where(x0 > 1 - 1e-6, stats.norm.logsf(lo), mid))


def _level(k):
    return float(LEVELS[k])


# (x0, mean, scale): each bin with a mean at its centre, off-centre, scales far below and above
# the bin width (2/255 = 0.0078), both edge bins (reaching to -inf / +inf), and far tails.
DECODER_CASES = [
    (_level(100), _level(100), 0.01),                  # mean at the bin centre
    (_level(100), _level(100), 1e-5),                  # scale << bin: probability 1
    (_level(100), _level(100) + 0.3 * HALF, 1e-3),     # scale << bin, off centre
    (_level(100), _level(100) + 1.5 * HALF, 1e-3),     # mean in the next bin: a tail of this one
    (_level(30), 0.4, 2.0),                            # scale >> bin
    (_level(200), -0.3, 30.0),                         # scale >>> bin
    (-1.0, -0.9, 0.2), (-1.0, -1.4, 0.05),             # first bin (-inf, -1 + 1/255]
    (1.0, 0.95, 0.1), (1.0, 1.3, 0.5),                 # last bin [1 - 1/255, inf)
    (-1.0, 0.5, 0.05), (1.0, -0.2, 0.1),               # edge bins in the far tail (~ -450, -70)
    (_level(200), _level(200) - HALF - 0.5, 0.05),     # far right tail: log P ~ -53
    (_level(60), _level(60) + HALF + 0.6, 0.06),       # far left tail: log P ~ -53
    (_level(128), _level(128) + 0.25, 0.02),           # farther: log P ~ -78
]


@pytest.mark.parametrize("x0,mean,scale", DECODER_CASES)
def test_discretized_log_likelihood_equals_the_integral_over_the_bin(x0, mean, scale):
    """log P(x0) = log of N(mean, scale^2) integrated over x0's bin (quad, float64)."""
    x0, mean, log_scale = np.float32(x0), np.float32(mean), np.float32(math.log(scale))
    want = _log_bin_prob_quad(x0, mean, log_scale)
    assert float(_log_bin_prob_cdf(x0, mean, log_scale)) == pytest.approx(want, rel=1e-9, abs=1e-12)
    got = float(vlb.discretized_gaussian_log_likelihood(jnp.float32(x0), jnp.float32(mean),
                                                        jnp.float32(log_scale)))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mean,scale", [(0.0, 0.5), (0.37, 0.003), (-0.99, 0.05), (1.2, 0.8),
                                        (0.2, 5.0), (-3.0, 0.5)])
def test_discretized_likelihood_sums_to_one_over_the_levels(mean, scale):
    """sum over the 256 levels of P(x0) = 1: the bins tile the real line."""
    ll = vlb.discretized_gaussian_log_likelihood(jnp.asarray(LEVELS), jnp.full(256, mean, jnp.float32),
                                                 jnp.full(256, math.log(scale), jnp.float32))
    assert float(np.sum(np.exp(_f64(ll)))) == pytest.approx(1.0, abs=1e-5)


def _dll_dlog_scale(x0, mean, log_scale):
    """d log P(x0) / d log_scale in float64: -(hi phi(hi) - lo phi(lo)) / P, with u phi(u) = 0 at
    an infinite edge."""
    x0, mean, s = np.broadcast_arrays(_f64(x0), _f64(mean), np.exp(_f64(log_scale)))
    lo, hi = (x0 - mean - HALF) / s, (x0 - mean + HALF) / s
    lo = np.where(x0 < -1 + 1e-6, -np.inf, lo)
    hi = np.where(x0 > 1 - 1e-6, np.inf, hi)
    ll = _log_bin_prob_cdf(x0, mean, np.log(s))
    finite = lambda u: np.where(np.isfinite(u), u, 0.0)  # u phi(u) -> 0 at an infinite edge
    with np.errstate(over="ignore", invalid="ignore"):  # inf / nan only where it is not compared
        term = lambda u: finite(u) * np.exp(stats.norm.logpdf(finite(u)) - ll)
        return -(term(hi) - term(lo))


def test_discretized_likelihood_gradient_is_finite_and_right():
    """d log P / d log_scale has no NaN or inf for means far outside [-1, 1] and tiny or huge
    scales, and equals the float64 derivative wherever that is moderate."""
    x0 = LEVELS[[0, 1, 60, 127, 128, 200, 254, 255]]
    mean = np.array([-60.0, -3.0, -1.0, 0.0, 0.5, 1.0, 3.0, 60.0], np.float32)
    log_scale = np.log(np.array([1e-6, 1e-3, 0.05, 1.0, 30.0], np.float32))
    X, M, L = (a.ravel() for a in np.meshgrid(x0, mean, log_scale, indexing="ij"))
    f = lambda ls: jnp.sum(vlb.discretized_gaussian_log_likelihood(jnp.asarray(X), jnp.asarray(M), ls))
    value = vlb.discretized_gaussian_log_likelihood(jnp.asarray(X), jnp.asarray(M), jnp.asarray(L))
    grad = np.asarray(jax.grad(f)(jnp.asarray(L)))
    assert np.all(np.isfinite(np.asarray(value))) and np.all(np.isfinite(grad))
    want = _dll_dlog_scale(X, M, L)
    moderate = np.abs(want) < 1e3
    assert moderate.sum() > 100
    np.testing.assert_allclose(grad[moderate], want[moderate], rtol=2e-3, atol=2e-4)


# ---------------------------------------------------------------------------------------------
# The bound is exact for Gaussian data under the exact reverse model

MU, S2 = 0.3, 0.3  # the data: N(MU, S2) per dimension
GH_NODES = 5        # Gauss-Hermite nodes: exact for the polynomials of degree <= 9 in x_t


def _exact_bound_bpd(schedule, x0_values):
    """E_q[L_0 + sum_t L_t] + KL(q(x_T | x0) || q(x_T)) in bits/dim for each x0, with the exact
    reverse model p(x_{t-1} | x_t) = q(x_{t-1} | x_t) of N(MU, S2) data: mean coef1 E[x0 | x_t] +
    coef2 x_t, variance beta~_t + coef1^2 Var[x0 | x_t]. Every term is quadratic in x_t, so the
    Gauss-Hermite average over x_t ~ q(x_t | x0) is its exact expectation."""
    T = schedule.num_timesteps
    z, w = hermegauss(GH_NODES)
    w = w / w.sum()
    x0v = np.asarray(x0_values, np.float64)
    n = x0v.size
    ab = _f64(schedule.alphas_cumprod)
    om = np.square(_f64(schedule.sqrt_one_minus_alphas_cumprod))
    # rows: (x0 value, t, node) flattened; every row has one dimension
    X0, TT, Z = (a.ravel() for a in np.meshgrid(x0v, np.arange(T), z, indexing="ij"))
    x_t = np.sqrt(ab[TT]) * X0 + np.sqrt(om[TT]) * Z
    mixture = analytic.GaussianMixture.create([1.0], [[MU]], [[S2]])
    _, x0_hat = mixture.denoise(jnp.asarray(x_t[:, None], jnp.float32), jnp.asarray(ab[TT], jnp.float32),
                                jnp.asarray(om[TT], jnp.float32))
    post_var_x0 = S2 * om[TT] / (ab[TT] * S2 + om[TT])  # Var[x0 | x_t]
    coef1 = _f64(schedule.posterior_mean_coef1)[TT]
    model_var = _f64(schedule.posterior_variance)[TT] + coef1 ** 2 * post_var_x0
    terms = vlb.vb_terms_bpd(schedule, jnp.asarray(X0[:, None], jnp.float32),
                             jnp.asarray(x_t[:, None], jnp.float32), jnp.asarray(TT, jnp.int32), x0_hat,
                             jnp.asarray(np.log(model_var)[:, None], jnp.float32), discrete=False)
    expected_terms = (_f64(terms).reshape(n, T, GH_NODES) * w).sum(-1)  # [n, T]
    abT = ab[-1]
    prior = vlb.normal_kl(jnp.asarray(np.sqrt(abT) * x0v, jnp.float32), jnp.float32(np.log(om[-1])),
                          jnp.float32(np.sqrt(abT) * MU), jnp.float32(np.log(abT * S2 + om[-1])))
    return expected_terms.sum(-1) + _f64(prior) / LN2, expected_terms


SCHEDULES_50 = {
    "linear": lambda: make_schedule("linear", 50),
    "cosine": lambda: make_schedule("cosine", 50),
    # abar_T = 0.99^50 = 0.6: the prior term is large, so it is checked too
    "constant": lambda: schedules.schedule_from_betas(np.full(50, 0.01)),
}


@pytest.mark.parametrize("kind", list(SCHEDULES_50))
def test_the_bound_is_the_exact_nll_for_gaussian_data(kind):
    """For N(mu, s^2) data and the exact reverse model, L_0 + sum_t E[L_t] + L_T = -log p(x0)."""
    schedule = SCHEDULES_50[kind]()
    x0 = np.array([-1.1, 0.0, MU, 0.9, 2.0])
    bound, terms = _exact_bound_bpd(schedule, x0)
    nll = 0.5 * (np.log(2 * np.pi * S2) + (x0 - MU) ** 2 / S2) / LN2
    np.testing.assert_allclose(bound, nll, rtol=1e-5)  # measured: < 1e-6
    # the check has teeth: the KL terms and the decoder are each far from the total
    assert np.all(terms[:, 1:].sum(-1) > 1.0) and np.all(terms[:, 0] < -1.0)


def test_prior_bpd_is_the_kl_to_the_standard_normal():
    """prior_bpd = KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)), mean over dims, in bits."""
    schedule = schedules.schedule_from_betas(np.full(50, 0.01))  # abar_T = 0.6: KL far from 0
    x0 = np.array([[[-1.0, 0.2], [0.7, 1.0]], [[0.0, 0.0], [0.5, -0.5]]], np.float32)
    ab = float(np.prod(1 - np.full(50, 0.01)))
    per = 0.5 * (-1.0 - np.log(1 - ab) + (1 - ab) + ab * _f64(x0) ** 2)
    want = per.reshape(2, -1).mean(1) / LN2
    np.testing.assert_allclose(_f64(vlb.prior_bpd(schedule, jnp.asarray(x0))), want, rtol=1e-5)
    # and for a standard schedule, whose prior term is ~1e-5 bits: agree in absolute terms
    linear = make_schedule("linear", 1000)
    ab = ref.linear_alphas_cumprod(1000)[-1]
    per = 0.5 * (-1.0 - np.log1p(-ab) + (1 - ab) + ab * _f64(x0) ** 2)
    np.testing.assert_allclose(_f64(vlb.prior_bpd(linear, jnp.asarray(x0))),
                               per.reshape(2, -1).mean(1) / LN2, atol=2e-7)


# ---------------------------------------------------------------------------------------------
# The hybrid objective's VLB term

T_HYBRID = 100
HYBRID_T = np.array([0, 0, 1, 2, 17, 50, 98, 99], np.int32)


def _hybrid_inputs(prediction):
    schedule = make_schedule("linear", T_HYBRID)
    k = jax.random.split(jax.random.key(7), 4)
    shape = (HYBRID_T.size, 3, 3, 2)
    x0 = LEVELS[np.asarray(jax.random.randint(k[0], shape, 0, 256))]
    t = jnp.asarray(HYBRID_T)
    x_t = forward.q_sample(schedule, jnp.asarray(x0), t, jax.random.normal(k[1], shape))
    mean_output = 0.8 * jax.random.normal(k[2], shape)
    if prediction == "x0":  # keep the model's x0 near the data, so that L_0 is moderate
        mean_output = jnp.asarray(x0) + 0.05 * mean_output
    v = jax.random.uniform(k[3], shape, minval=-1.2, maxval=1.2)
    return schedule, x0, t, x_t, mean_output, v


def _hybrid_reference(schedule, x0, t, x_t, mean_output, v, prediction):
    """lambda T L_t in float64 from the papers: x0_hat from the prediction, IDDPM eq. 15's log
    variance, DDPM eq. 7's posterior, the Gaussian KL (t > 0) or discretised decoder (t = 0).
    Also returns d/dv of it per element (analytic)."""
    nd = x_t.ndim
    at = lambda name: _f64(getattr(schedule, name))[np.asarray(t)].reshape((-1,) + (1,) * (nd - 1))
    ab, xt, out, x0 = at("alphas_cumprod"), _f64(x_t), _f64(mean_output), _f64(x0)
    x0_hat = {"eps": (xt - np.sqrt(1 - ab) * out) / np.sqrt(ab), "x0": out,
              "v": np.sqrt(ab) * xt - np.sqrt(1 - ab) * out}[prediction]
    log_beta, log_bt = np.log(at("betas")), at("posterior_log_variance_clipped")
    frac = (_f64(v) + 1) / 2
    lv = frac * log_beta + (1 - frac) * log_bt
    dlv_dv = 0.5 * (log_beta - log_bt)
    c1, c2 = at("posterior_mean_coef1"), at("posterior_mean_coef2")
    true_mean, model_mean = c1 * x0 + c2 * xt, c1 * x0_hat + c2 * xt
    d2 = (true_mean - model_mean) ** 2
    kl = 0.5 * (-1 + lv - log_bt + np.exp(log_bt - lv) + d2 * np.exp(-lv))
    dkl = 0.5 * (1 - np.exp(log_bt - lv) - d2 * np.exp(-lv)) * dlv_dv
    nll = -_log_bin_prob_cdf(x0, model_mean, 0.5 * lv)
    dnll = -_dll_dlog_scale(x0, model_mean, 0.5 * lv) * 0.5 * dlv_dv
    first = (np.asarray(t) == 0).reshape((-1,) + (1,) * (nd - 1))
    per_elem, grad = np.where(first, nll, kl), np.where(first, dnll, dkl)
    n = x0[0].size
    scale = vlb.LAMBDA_VLB * schedule.num_timesteps / LN2
    return scale * per_elem.reshape(len(x0), -1).mean(1), scale * grad / n


@pytest.mark.slow
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_hybrid_vlb_term_is_lambda_t_l_t_and_trains_only_the_variance(prediction):
    """hybrid_vlb_term = 0.001 T L_t (bits/dim, recomputed in float64) for every prediction; its
    gradient is exactly 0 w.r.t. the mean output and the analytic one w.r.t. v."""
    schedule, x0, t, x_t, mean_output, v = _hybrid_inputs(prediction)
    fn = lambda m, vv: vlb.hybrid_vlb_term(schedule, jnp.asarray(x0), x_t, t, m, vv, prediction)
    got = _f64(fn(mean_output, v))
    want, want_grad_v = _hybrid_reference(schedule, x0, t, x_t, mean_output, v, prediction)
    # atol: float32's normal_kl of two nearly equal Gaussians (large t) is off by ~1e-7 nats
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=5e-8)
    assert np.sum(np.abs(want) > 1e-4) >= 4
    # the same through the library's own pieces
    _, x0_hat = forward.eps_and_x0(mean_output, x_t, schedule.at("alphas_cumprod", t, 4), prediction)
    again = vlb.LAMBDA_VLB * T_HYBRID * vlb.vb_terms_bpd(
        schedule, jnp.asarray(x0), x_t, t, x0_hat, vlb.model_log_variance(schedule, v, t))
    np.testing.assert_allclose(got, _f64(again), rtol=1e-6, atol=1e-9)
    g_mean, g_v = jax.grad(lambda m, vv: jnp.sum(fn(m, vv)), argnums=(0, 1))(mean_output, v)
    assert np.all(np.asarray(g_mean) == 0.0)
    assert np.all(np.any(np.asarray(g_v).reshape(HYBRID_T.size, -1) != 0, axis=1))  # every example
    np.testing.assert_allclose(_f64(g_v), want_grad_v, rtol=2e-3, atol=1e-6 * np.abs(want_grad_v).max())


# ---------------------------------------------------------------------------------------------
# The learned variance's interpolation


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_model_log_variance_spans_beta_tilde_to_beta(kind):
    """v = 1: log beta_t; v = -1: log beta~_t (beta~_1 at t = 0); v = 0: their midpoint in log
    space; linear in v in between (IDDPM eq. 15), all from the schedule's float64 formulas."""
    T = 200
    schedule = make_schedule(kind, T)
    abar = (ref.linear_alphas_cumprod if kind == "linear" else ref.cosine_alphas_cumprod)(T)
    abar_prev = np.append(1.0, abar[:-1])
    beta = 1 - abar / abar_prev
    beta_tilde = beta * (1 - abar_prev) / (1 - abar)
    beta_tilde[0] = beta_tilde[1]
    t = jnp.arange(T, dtype=jnp.int32)
    at = lambda v: _f64(vlb.model_log_variance(schedule, jnp.full((T, 2), v, jnp.float32), t))
    np.testing.assert_allclose(at(1.0), np.log(beta)[:, None] * np.ones(2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(at(-1.0), np.log(beta_tilde)[:, None] * np.ones(2), rtol=1e-5, atol=1e-5)
    mid = 0.5 * (np.log(beta) + np.log(beta_tilde))
    np.testing.assert_allclose(at(0.0), mid[:, None] * np.ones(2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(at(0.5), (0.75 * np.log(beta) + 0.25 * np.log(beta_tilde))[:, None]
                               * np.ones(2), rtol=1e-5, atol=1e-5)
    lb, lbt = jnp.array([-2.0, -7.0]), jnp.array([-3.0, -9.0])
    np.testing.assert_allclose(_f64(vlb.learned_log_variance(jnp.array([-3.0, 2.0]), lb, lbt)),
                               [-1.0 * -2.0 + 2.0 * -3.0, 1.5 * -7.0 - 0.5 * -9.0], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Sampling with the learned variance on a respaced chain

T_SAMPLE, STEPS, N = 1000, 25, 20000
Z = 4.0  # tolerance in standard errors
MIXTURE = analytic.GaussianMixture.create(
    weights=[0.35, 0.65], means=[[-1.5, 0.5], [1.2, -0.5]], variances=[[0.6, 0.8], [0.8, 0.5]])


def _mixture_moments(mixture):
    w, mu, s2 = (_f64(a) for a in (mixture.weights, mixture.means, mixture.variances))
    mean = w @ mu
    d = mu - mean
    return mean, w @ (s2 + d ** 2), w @ (d ** 4 + 6 * d ** 2 * s2 + 3 * s2 ** 2)


def _moment_matched_v_fn(mixture, schedule, abar, ts):
    """denoise_fn(x_t, t, cond) -> [eps*, v] whose learned variance on the respaced step from t
    is Var[x_s | x_t] of the data: beta~_ts + coef_x0^2 Var[x0 | x_t] (per dimension), with the
    respaced beta_ts = 1 - abar_t / abar_s from float64 alphas_cumprod (the model knows the
    chain: its tables are indexed by the visited t). abar: float64 alphas_cumprod [T]."""
    T = schedule.num_timesteps
    s = np.append(ts[1:], -1)
    last = s < 0
    ab_t, ab_s = abar[ts], np.where(last, 1.0, abar[np.maximum(s, 0)])
    beta = 1 - ab_t / ab_s
    beta_tilde = np.where(last, 1.0, beta * (1 - ab_s) / (1 - ab_t))  # unused on the last step

    def table(values):
        full = np.ones(T)
        full[ts] = values
        return jnp.asarray(full, jnp.float32)

    log_b, log_bt = table(np.log(beta)), table(np.log(beta_tilde))
    bt, coef = table(beta_tilde), table(beta * np.sqrt(ab_s) / (1 - ab_t))
    eps = analytic.eps_fn(mixture, schedule)

    def denoise_fn(x_t, t, cond):
        ab = schedule.alphas_cumprod[t]
        om = jnp.square(schedule.sqrt_one_minus_alphas_cumprod[t])
        var = bt[t][:, None] + coef[t][:, None] ** 2 * mixture.posterior_variance(x_t, ab, om)
        frac = (jnp.log(var) - log_bt[t][:, None]) / (log_b[t][:, None] - log_bt[t][:, None])
        return jnp.concatenate([eps(x_t, t, cond), 2 * frac - 1], axis=-1)
    return denoise_fn


def test_mixture_posterior_variance_by_monte_carlo():
    """GaussianMixture.posterior_variance = Var[x0 | x_t], estimated from joint draws binned on
    x_t (1-D mixture: a few narrow bins of x_t)."""
    mix = analytic.GaussianMixture.create([0.4, 0.6], [[-1.0], [1.5]], [[0.2], [0.6]])
    ab = 0.5
    k1, k2 = jax.random.split(jax.random.key(3))
    x0, _ = mix.sample(k1, 2_000_000)
    x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * jax.random.normal(k2, x0.shape)
    x0, x_t = _f64(x0)[:, 0], _f64(x_t)[:, 0]
    centres = np.array([-1.2, 0.0, 0.4, 1.5])
    got = _f64(mix.posterior_variance(jnp.asarray(centres[:, None], jnp.float32),
                                      jnp.full(4, ab), jnp.full(4, 1 - ab)))[:, 0]
    for c, g in zip(centres, got):
        sel = x0[np.abs(x_t - c) < 0.01]
        assert sel.size > 4000
        # the bin's width adds ~ (gain^2 width^2 / 3) to the variance: far below the tolerance
        assert g == pytest.approx(sel.var(), rel=0.06), (c, sel.size)


def test_learned_variance_sampler_reproduces_the_mixture_on_a_respaced_chain():
    """25 respaced DDPM steps with the exact eps and the moment-matched learned variance give
    the mixture's mean and variance (within 4 s.e. of 20000 draws); the fixed beta~_ts, with
    the same eps, loses much of the variance (IDDPM sec. 4)."""
    schedule = make_schedule("linear", T_SAMPLE)
    # "linspace" ends at t = 0, where the final x0_hat = E[x0 | x_0] has a negligible deficit of
    # variance (E Var[x0 | x_0] ~ 1e-4); "trailing" ends at t = 39, where it would be ~1e-2.
    spacing = "linspace"
    ts = samplers.timesteps(schedule, STEPS, spacing)
    x_T, _ = MIXTURE.sample(jax.random.key(0), N, schedule.alphas_cumprod[-1])
    run = lambda fn, **kw: _f64(jax.jit(lambda x: samplers.sample(
        fn, schedule, x, sampler="ddpm", num_steps=STEPS, spacing=spacing, rng=jax.random.key(100),
        thresholding=None, **kw))(x_T))
    model = _moment_matched_v_fn(MIXTURE, schedule, ref.linear_alphas_cumprod(T_SAMPLE), ts)
    learned = run(model, ddpm_variance="learned", learn_sigma=True)
    fixed = run(analytic.eps_fn(MIXTURE, schedule), ddpm_variance="posterior")
    mean, var, m4 = _mixture_moments(MIXTURE)
    se_mean, se_var = np.sqrt(var / N), np.sqrt((m4 - var ** 2) / N)
    z_mean = (learned.mean(0) - mean) / se_mean
    z_var = (learned.var(0) - var) / se_var
    assert np.all(np.abs(z_mean) < Z), z_mean
    assert np.all(np.abs(z_var) < Z), z_var
    # component weights: E[p(k | x0)] = pi_k under the data
    lp = MIXTURE.class_log_prob(jnp.asarray(learned, jnp.float32), jnp.ones(N), jnp.zeros(N),
                                jnp.zeros(N, jnp.int32))
    r = np.exp(_f64(lp))
    assert abs(r.mean() - 0.35) < Z * r.std() / np.sqrt(N)
    # beta~_ts: too little variance, by many standard errors (measured: ~ -15 to -23 s.e.)
    z_fixed = (fixed.var(0) - var) / se_var
    assert np.all(z_fixed < -10), z_fixed
    assert np.all(np.abs(z_fixed) > np.abs(z_var) + 8), (z_fixed, z_var)


def test_learned_variance_needs_a_variance_output():
    """ddpm_variance="learned" with a fixed-variance model (C channels, learn_sigma=False) is
    refused with a ValueError that names the learned variance."""
    schedule = make_schedule("linear", 100)
    with pytest.raises(ValueError, match="learned"):
        samplers.sample(analytic.eps_fn(MIXTURE, schedule), schedule, jnp.zeros((4, 2)),
                        sampler="ddpm", num_steps=10, ddpm_variance="learned",
                        rng=jax.random.key(0))
