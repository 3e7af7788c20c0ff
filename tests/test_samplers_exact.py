"""Samplers driven by the EXACT eps of Gaussian and Gaussian-mixture data.

With the optimal denoiser plugged in, the only errors left are the sampler's own: its
discretisation, and the sampling noise of N draws. Two kinds of test:
  * against an independent float64 reference (tests/reference.py) of the same chain: per sample
    for the deterministic samplers, and the chain's exact output moments for the stochastic ones;
  * against the data distribution itself, within 4 standard errors of the sample size.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from t2i_jax.diffusion import analytic, make_schedule, samplers

T = 1000
N = 4000
Z = 4.0  # tolerance in standard errors
COSINE = make_schedule("cosine", T)
LINEAR = make_schedule("linear", T)
MIXTURE = analytic.GaussianMixture.create(
    weights=[0.35, 0.65], means=[[-1.5, 0.5], [1.2, -0.5]], variances=[[0.6, 0.8], [0.8, 0.5]])


def _x_T(mixture, schedule, n, seed, label=None):
    """x_T drawn from the exact forward marginal at the first visited timestep (T-1)."""
    x, _ = mixture.sample(jax.random.key(seed), n, schedule.alphas_cumprod[-1], label=label)
    return x


def _run(schedule, denoise, x_T, sampler, num_steps, **kw):
    fn = jax.jit(lambda x, r: samplers.sample(denoise, schedule, x, sampler=sampler,
                                              num_steps=num_steps, rng=r, **kw))
    return np.asarray(fn(x_T, jax.random.key(11)), np.float64)


def _mixture_moments(mixture, label=None):
    """Exact mean, variance and 4th central moment per dimension of the mixture (or one class)."""
    w = np.asarray(mixture.weights, np.float64)
    if label is not None:
        w = np.where(np.asarray(mixture.labels) == label, w, 0.0)
        w = w / w.sum()
    mu, s2 = np.asarray(mixture.means, np.float64), np.asarray(mixture.variances, np.float64)
    mean = w @ mu
    d = mu - mean
    var = w @ (s2 + d ** 2)
    m4 = w @ (d ** 4 + 6 * d ** 2 * s2 + 3 * s2 ** 2)
    return mean, var, m4


def _class_prob(mixture, x, label):
    """p(label | x0) under the exact classifier at t = 0 (abar = 1), per sample [N]."""
    n = x.shape[0]
    lp = mixture.class_log_prob(jnp.asarray(x, jnp.float32), jnp.ones(n), jnp.zeros(n),
                                jnp.full((n,), label, jnp.int32))
    return np.exp(np.asarray(lp, np.float64))


def _assert_matches_data(x, mixture, label=None):
    n = x.shape[0]
    mean, var, m4 = _mixture_moments(mixture, label)
    z_mean = (x.mean(0) - mean) / np.sqrt(var / n)
    z_var = (x.var(0) - var) / np.sqrt((m4 - var ** 2) / n)
    assert np.all(np.abs(z_mean) < Z), f"mean off by {z_mean} standard errors"
    assert np.all(np.abs(z_var) < Z), f"variance off by {z_var} standard errors"


# Each sampler at the step counts of the claim; the cosine schedule is the one few-step
# samplers are used with. (DDIM's first-order bias at 50 steps is checked exactly below.)
DATA_CONFIGS = [
    ("ddpm", 1000, {}),
    ("ddim", 100, {"eta": 0.0}),
    ("ddim", 100, {"eta": 1.0}),
    ("dpmpp_2m", 20, {}),
]


@pytest.mark.slow
@pytest.mark.parametrize("sampler,num_steps,kw", DATA_CONFIGS)
def test_mixture_moments_and_weights(sampler, num_steps, kw):
    x = _run(COSINE, analytic.eps_fn(MIXTURE, COSINE), _x_T(MIXTURE, COSINE, N, 1), sampler,
             num_steps, **kw)
    _assert_matches_data(x, MIXTURE)
    # E[p(k | x0)] = pi_k exactly under the data, so the mean responsibility measures the weights.
    for k, pi in enumerate(np.asarray(MIXTURE.weights)):
        r = _class_prob(MIXTURE, x, k)
        z = (r.mean() - pi) / (r.std() / np.sqrt(N))
        assert abs(z) < Z, f"weight of component {k}: {r.mean():.4f} vs {pi:.4f} ({z:.1f} s.e.)"


@pytest.mark.parametrize("sampler,num_steps,kw", [("ddim", 100, {}), ("dpmpp_2m", 20, {})])
@pytest.mark.parametrize("label", [0, 1])
def test_conditional_sampling_with_w0_gives_the_class(sampler, num_steps, kw, label):
    x_T = _x_T(MIXTURE, COSINE, N, 2)
    cond = jnp.full((N,), label, jnp.int32)
    null = jnp.full((1,), analytic.NULL_LABEL, jnp.int32)
    x = _run(COSINE, analytic.eps_fn(MIXTURE, COSINE), x_T, sampler, num_steps, cond=cond,
             null_cond=null, guidance_weight=0.0, **kw)
    _assert_matches_data(x, MIXTURE, label)


def test_cfg_weight_pushes_class_mass_and_mean_away_from_the_other_class():
    """CFG samples p(x|y) p(y|x)^w (per noise level): as w grows, p(y|x) rises and the mean moves
    along mu_y - mu_other, beyond mu_y, and the spread shrinks (Ho & Salimans 2022, fig. 2)."""
    label, other = 0, 1
    x_T = _x_T(MIXTURE, COSINE, N, 3)
    cond = jnp.full((N,), label, jnp.int32)
    null = jnp.full((1,), analytic.NULL_LABEL, jnp.int32)
    direction = np.asarray(MIXTURE.means[label] - MIXTURE.means[other], np.float64)
    direction /= np.linalg.norm(direction)
    mass, along, spread = [], [], []
    for w in [0.0, 1.0, 3.0, 8.0]:
        x = _run(COSINE, analytic.eps_fn(MIXTURE, COSINE), x_T, "ddim", 100, cond=cond,
                 null_cond=null, guidance_weight=w)
        mass.append(_class_prob(MIXTURE, x, label).mean())
        proj = (x - np.asarray(MIXTURE.means[label])) @ direction
        along.append(proj.mean())
        spread.append(proj.std())
    assert np.all(np.diff(mass) > 0), mass
    assert np.all(np.diff(along) > 0), along
    assert along[0] == pytest.approx(0.0, abs=Z * spread[0] / np.sqrt(N))
    assert np.all(np.diff(spread) < 0), spread


def test_classifier_guidance_with_the_exact_classifier():
    """eps - sqrt(1-abar) gamma grad log p(y|x_t): class mass rises monotonically in gamma, and
    gamma = 1 is exact conditional sampling (Bayes: grad log p(x|y) = grad log p(x) + grad log p(y|x))."""
    label = 0
    x_T = _x_T(MIXTURE, COSINE, N, 4)
    cond = jnp.full((N,), label, jnp.int32)
    mass = []
    for gamma in [0.0, 0.5, 1.0, 2.0, 4.0]:
        # The model is unconditional (null label everywhere); only the classifier sees y.
        denoise = lambda x, t, c: analytic.eps_fn(MIXTURE, COSINE)(x, t, jnp.full_like(c, -1))
        x = _run(COSINE, denoise, x_T, "ddim", 100, cond=cond,
                 guidance_fn=analytic.classifier_fn(MIXTURE, COSINE), classifier_scale=gamma)
        mass.append(_class_prob(MIXTURE, x, label).mean())
        if gamma == 0.0:
            _assert_matches_data(x, MIXTURE)
        if gamma == 1.0:
            x_gamma1 = x
    assert np.all(np.diff(mass) > 0), mass
    # gamma = 1 gives class 0's distribution; its start x_T came from the unconditional marginal,
    # which at T-1 is N(0, I) to within abar_{T-1} ~ 1e-8: the same start.
    _assert_matches_data(x_gamma1, MIXTURE, label)


@pytest.mark.parametrize("sampler,num_steps", [("ddpm", 1000), ("ddim", 100), ("dpmpp_2m", 20)])
def test_zero_terminal_snr_with_v_prediction(sampler, num_steps):
    """With abar_{T-1} = 0 the marginal at T-1 is exactly N(0, I), and a v-model stays finite."""
    schedule = make_schedule("cosine", T, zero_terminal_snr=True)
    x_T = jax.random.normal(jax.random.key(5), (N, 2))
    x = _run(schedule, analytic.v_fn(MIXTURE, schedule), x_T, sampler, num_steps, prediction="v")
    assert np.all(np.isfinite(x))
    _assert_matches_data(x, MIXTURE)


# --- the same chains, exactly: Gaussian data, float64 reference -------------------------------

GAUSS_MEAN, GAUSS_VAR = np.array([0.5, -1.0, 0.0]), np.array([0.5, 1.0, 1.6])
GAUSS = analytic.GaussianMixture.create([1.0], [GAUSS_MEAN], [GAUSS_VAR])


@pytest.mark.parametrize("schedule,abar", [(LINEAR, ref.linear_alphas_cumprod(T)),
                                           (COSINE, ref.cosine_alphas_cumprod(T))])
@pytest.mark.parametrize("sampler,num_steps", [("ddim", 50), ("ddim", 1000), ("dpmpp_2m", 20),
                                               ("dpmpp_2m", 7), ("euler", 30), ("pndm", 20),
                                               ("pndm", 5)])
def test_deterministic_samplers_equal_float64_reference(schedule, abar, sampler, num_steps):
    x_T = np.asarray(jax.random.normal(jax.random.key(6), (64, 3)), np.float64) * 1.3
    got = _run(schedule, analytic.eps_fn(GAUSS, schedule), jnp.asarray(x_T, jnp.float32),
               sampler, num_steps)
    ts = np.asarray(samplers.timesteps(schedule, num_steps))
    want = ref.run(sampler, abar, ts, x_T, lambda x, a: ref.gaussian_eps(x, a, GAUSS_MEAN, GAUSS_VAR))
    # The first step multiplies the float32 rounding of eps (~6e-8) by sqrt(abar_s / abar_t):
    # 1.2 for the linear schedule, ~630 for the cosine one (abar_{T-1} = 2.4e-9) at 50 steps.
    # Any eps-parametrised float32 sampler has this floor; beyond it the chains agree.
    amplification = np.sqrt(abar[ts[1]] / abar[ts[0]])
    if sampler == "pndm":  # PLMS redoes its first step with eps read at that step's end, whose
        amplification = amplification ** 2  # x carries the amplified rounding: squared
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 + 1.2e-7 * amplification)


@pytest.mark.slow
@pytest.mark.parametrize("sampler,num_steps,kw", [
    ("ddpm", 1000, {"ddpm_variance": "posterior"}),
    ("ddpm", 1000, {"ddpm_variance": "beta"}),
    ("ddpm", 40, {"ddpm_variance": "posterior"}),
    ("ddim", 100, {"eta": 1.0}),
    ("ddim", 50, {"eta": 0.5}),
    ("euler_a", 50, {}),
])
def test_stochastic_samplers_match_exact_chain_moments(sampler, num_steps, kw):
    """Every update is affine plus Gaussian noise on Gaussian data, so the chain's output law is
    known exactly (in float64) and the sampler must hit it within the sampling error."""
    n = 20000
    abar = ref.linear_alphas_cumprod(T)
    x_T = _x_T(GAUSS, LINEAR, n, 7)
    x = _run(LINEAR, analytic.eps_fn(GAUSS, LINEAR), x_T, sampler, num_steps, **kw)
    ts = np.asarray(samplers.timesteps(LINEAR, num_steps))
    for d in range(3):
        m, v = ref.gaussian_chain_moments(
            sampler, abar, ts, GAUSS_MEAN[d], GAUSS_VAR[d], np.sqrt(abar[-1]) * GAUSS_MEAN[d],
            abar[-1] * GAUSS_VAR[d] + 1 - abar[-1], eta=kw.get("eta", 0.0),
            ddpm_variance=kw.get("ddpm_variance", "posterior"))
        assert abs(x[:, d].mean() - m) < Z * np.sqrt(v / n)
        assert abs(x[:, d].var() - v) < Z * v * np.sqrt(2 / n)


def test_ddim_eta1_is_ddpm_with_posterior_variance():
    """DDIM's sigma at eta = 1 is the posterior std, and its mean is the posterior mean: the two
    samplers are one chain, so with the same keys they give the same samples."""
    x_T = _x_T(MIXTURE, COSINE, 512, 8)
    eps = analytic.eps_fn(MIXTURE, COSINE)
    a = _run(COSINE, eps, x_T, "ddim", 30, eta=1.0)
    b = _run(COSINE, eps, x_T, "ddpm", 30)
    np.testing.assert_allclose(a, b, atol=1e-4)
