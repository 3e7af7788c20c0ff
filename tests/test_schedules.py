"""Schedules against the published formulas, computed independently in float64."""

import math

import jax
import numpy as np
import pytest

import reference as ref
from t2i_jax.diffusion import make_schedule, schedules


def _f32(a):
    return np.asarray(a, np.float32)


@pytest.mark.parametrize("T", [1000, 4000, 250])
def test_linear_is_ddpm_scaled_like_improved_ddpm(T):
    s = make_schedule("linear", T)
    betas = np.asarray(s.betas, np.float64)
    assert betas[0] == pytest.approx(1e-4 * 1000 / T, rel=1e-6)
    assert betas[-1] == pytest.approx(0.02 * 1000 / T, rel=1e-6)
    np.testing.assert_array_equal(np.asarray(s.alphas_cumprod), _f32(ref.linear_alphas_cumprod(T)))


@pytest.mark.parametrize("T", [1000, 100])
def test_cosine_matches_improved_ddpm_eq17(T):
    s = make_schedule("cosine", T)
    want = ref.cosine_alphas_cumprod(T)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod, np.float64), want, rtol=2e-7, atol=1e-12)
    assert np.max(np.asarray(s.betas)) == pytest.approx(0.999, rel=1e-6)  # clipped at the end
    # Away from the clip, abar_t = f(t+1) / f(0) exactly.
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in [0, T // 2, int(0.9 * T)]:
        assert float(s.alphas_cumprod[t]) == pytest.approx(f((t + 1) / T) / f(0), rel=1e-6)


def test_sigmoid_matches_chen_2023_algorithm_1():
    T = 1000
    s = make_schedule("sigmoid", T, start=-3.0, end=3.0, tau=0.7)
    sig = lambda z: 1 / (1 + math.exp(-z))
    g = lambda u: (sig(3 / 0.7) - sig((u * 6 - 3) / 0.7)) / (sig(3 / 0.7) - sig(-3 / 0.7))
    for t in [0, 10, 500, 900]:
        assert float(s.alphas_cumprod[t]) == pytest.approx(g((t + 1) / T), rel=1e-6)
    assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
def test_derived_fields_are_float64_formulas_rounded_once(kind):
    T = 300
    s = make_schedule(kind, T)
    betas = np.asarray(s.betas, np.float64)
    # Recompute from the float64 betas the schedule was built from: rebuild them exactly.
    b64 = {"linear": lambda: schedules.linear_betas(T),
           "cosine": lambda: schedules.betas_for_alpha_bar(T, schedules.cosine_alpha_bar),
           "sigmoid": lambda: schedules.betas_for_alpha_bar(T, schedules.sigmoid_alpha_bar)}[kind]()
    np.testing.assert_array_equal(betas, _f32(b64))
    ab = np.cumprod(1 - b64)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = b64 * (1 - ab_prev) / (1 - ab)
    want = {
        "alphas_cumprod": ab, "alphas_cumprod_prev": ab_prev,
        "sqrt_alphas_cumprod": np.sqrt(ab), "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ab),
        "log_snr": np.log(ab / (1 - ab)), "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
        "posterior_mean_coef1": b64 * np.sqrt(ab_prev) / (1 - ab),
        "posterior_mean_coef2": (1 - ab_prev) * np.sqrt(1 - b64) / (1 - ab),
    }
    for name, value in want.items():
        got = getattr(s, name)
        assert got.dtype == np.float32 and got.shape == (T,), name
        # Rounded once from float64: bit-equal to float32(value) up to one ulp of libm differences.
        np.testing.assert_allclose(np.asarray(got, np.float64), value, rtol=1.2e-7, err_msg=name)
    # 1 - abar near t = 0 is exact here, where float32 arithmetic (1 - float32(abar)) is not.
    naive = 1 - np.float32(ab[0])
    assert abs(float(s.sqrt_one_minus_alphas_cumprod[0]) ** 2 / (1 - ab[0]) - 1) < 1e-6
    assert abs(naive / (1 - ab[0]) - 1) > 1e-5


def test_schedule_is_a_pytree_usable_under_jit():
    s = make_schedule("cosine", 50)
    leaves = jax.tree_util.tree_leaves(s)
    assert len(leaves) == 10 and all(leaf.dtype == np.float32 for leaf in leaves)
    doubled = jax.jit(lambda sch: sch.betas * 2)(s)
    np.testing.assert_array_equal(np.asarray(doubled), np.asarray(s.betas) * 2)


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
def test_zero_terminal_snr_rescale_lin_et_al(kind):
    T = 1000
    base = make_schedule(kind, T)
    s = make_schedule(kind, T, zero_terminal_snr=True)
    assert s.zero_terminal_snr and not base.zero_terminal_snr
    assert float(s.alphas_cumprod[-1]) == 0.0 and float(s.betas[-1]) == 1.0
    assert float(s.log_snr[-1]) == -np.inf and np.all(np.isfinite(np.asarray(s.log_snr[:-1])))
    # Lin et al. Alg. 1: sqrt(abar) is shifted and scaled so the first stays, the last is 0.
    old = np.sqrt(np.cumprod(1 - np.asarray(base.betas, np.float64)))
    want = (old - old[-1]) * old[0] / (old[0] - old[-1])
    np.testing.assert_allclose(np.asarray(s.sqrt_alphas_cumprod, np.float64), want, rtol=2e-5, atol=1e-7)
    assert np.isfinite(np.asarray(s.posterior_mean_coef1)).all()
    assert np.isfinite(np.asarray(s.posterior_mean_coef2)).all()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown schedule kind 'quadratic'.*linear"):
        make_schedule("quadratic", 1000)
    with pytest.raises(ValueError, match="positive int"):
        make_schedule("cosine", 0)
    with pytest.raises(ValueError, match="T > 20"):
        make_schedule("linear", 20)
    with pytest.raises(ValueError, match="takes no options"):
        make_schedule("linear", 1000, offset=0.1)
