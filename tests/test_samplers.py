"""Sampler units: timesteps, one step of each method against the papers, thresholding, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from t2i_jax.diffusion import analytic, forward, make_schedule, samplers

SCHEDULE = make_schedule("linear", 1000)
MIXTURE = analytic.GaussianMixture.create([0.5, 0.5], [[-1.0, 0.5], [1.0, -0.5]], [[0.3, 0.5], [0.6, 0.2]])
EPS = analytic.eps_fn(MIXTURE, SCHEDULE)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 7, 50, 999, 1000])
def test_timesteps_are_decreasing_unique_and_in_range(spacing, num_steps):
    ts = samplers.timesteps(SCHEDULE, num_steps, spacing)
    assert ts.dtype == np.int32 and ts.shape == (num_steps,)
    assert np.all(np.diff(ts) < 0) and ts[0] <= 999 and ts[-1] >= 0
    if num_steps == 1000:
        np.testing.assert_array_equal(ts, np.arange(999, -1, -1))
    if spacing == "trailing":
        assert ts[0] == 999


def test_timesteps_formulas():
    np.testing.assert_array_equal(samplers.timesteps(1000, 10, "trailing"), np.arange(999, 0, -100))
    np.testing.assert_array_equal(samplers.timesteps(1000, 10, "leading"), np.arange(900, -1, -100))
    np.testing.assert_array_equal(samplers.timesteps(10, 4, "linspace"), [9, 6, 3, 0])
    np.testing.assert_array_equal(samplers.timesteps(1000, 3, "trailing"), [999, 666, 332])


def test_full_spacing_step_coefficients_are_the_schedules_posterior():
    c = samplers.step_coefficients(SCHEDULE, jnp.asarray(samplers.timesteps(SCHEDULE, 1000)))
    ts = np.arange(999, -1, -1)
    np.testing.assert_array_equal(np.asarray(c.beta_ts)[:-1], np.asarray(SCHEDULE.betas)[ts][:-1])
    # DDPM's coefficients in the step equal the schedule's posterior coefficients.
    coef1 = c.beta_ts * jnp.sqrt(c.alpha_bar_s) / c.one_minus_alpha_bar_t
    coef2 = c.one_minus_alpha_bar_s * jnp.sqrt(c.alpha_bar_t / c.alpha_bar_s) / c.one_minus_alpha_bar_t
    np.testing.assert_allclose(np.asarray(coef1), np.asarray(SCHEDULE.posterior_mean_coef1)[ts], rtol=3e-6)
    np.testing.assert_allclose(np.asarray(coef2), np.asarray(SCHEDULE.posterior_mean_coef2)[ts], rtol=3e-6)
    assert bool(c.is_last[-1]) and float(c.alpha_bar_s[-1]) == 1.0 and bool(c.is_first[0])


@pytest.mark.parametrize("kind,num_steps", [("cosine", 500), ("linear", 333), ("cosine", 7)])
def test_respaced_betas_are_float64_accurate(kind, num_steps):
    """beta_ts = 1 - abar_t / abar_s over a stride: float32 division loses up to 4e-4 of it at
    short strides near t = 0; the log1p / expm1 window sum keeps float32 precision."""
    schedule = make_schedule(kind, 1000)
    ts = samplers.timesteps(schedule, num_steps)
    c = samplers.step_coefficients(schedule, jnp.asarray(ts))
    abar = (ref.cosine_alphas_cumprod if kind == "cosine" else ref.linear_alphas_cumprod)(1000)
    s = np.append(ts[1:], -1)
    want = 1 - abar[ts] / np.where(s >= 0, abar[np.maximum(s, 0)], 1.0)
    np.testing.assert_allclose(np.asarray(c.beta_ts, np.float64), want, rtol=2e-6)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_bfloat16_chain_keeps_its_dtype_and_agrees_with_float32(sampler):
    x_T, _ = MIXTURE.sample(jax.random.key(4), 512, SCHEDULE.alphas_cumprod[-1])
    run = jax.jit(lambda x: samplers.sample(EPS, SCHEDULE, x, sampler=sampler, num_steps=20,
                                            rng=jax.random.key(0)))
    low = run(x_T.astype(jnp.bfloat16))
    assert low.dtype == jnp.bfloat16
    full = np.asarray(run(x_T), np.float64)
    # bfloat16 keeps 8 bits: the chains agree to a few of its ulps on average.
    assert np.mean(np.abs(np.asarray(low, np.float64) - full)) < 0.02  # measured: 0.003-0.004


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_eps_x0_and_v_models_give_the_same_chain(sampler):
    """The same exact denoiser, parameterised three ways, must produce the same samples."""
    x_T, _ = MIXTURE.sample(jax.random.key(5), 256, SCHEDULE.alphas_cumprod[-1])
    outs = {}
    for prediction, make in [("eps", analytic.eps_fn), ("x0", analytic.x0_fn), ("v", analytic.v_fn)]:
        outs[prediction] = np.asarray(jax.jit(lambda x: samplers.sample(
            make(MIXTURE, SCHEDULE), SCHEDULE, x, sampler=sampler, num_steps=25,
            prediction=prediction, rng=jax.random.key(1)))(x_T))
    np.testing.assert_allclose(outs["x0"], outs["eps"], atol=1e-4)
    np.testing.assert_allclose(outs["v"], outs["eps"], atol=1e-4)


def _one_step(sampler, t, s, x, eps, noise, **opts):
    ts = jnp.array([t, s] if s >= 0 else [t], jnp.int32)
    c = jax.tree_util.tree_map(lambda a: a[0], samplers.step_coefficients(SCHEDULE, ts))
    spec = samplers.SAMPLERS[sampler]
    ab = c.alpha_bar_t
    x0 = forward.x0_from_eps(x, eps, ab)
    o = samplers.Options(eta=jnp.float32(opts.get("eta", 0.0)),
                         ddpm_variance=opts.get("ddpm_variance", "posterior"))
    out, _ = spec.step(x, eps, x0, c, noise, spec.init_state(x), o)
    return np.asarray(out, np.float64)


@pytest.mark.parametrize("t,s", [(999, 979), (500, 499), (120, 60), (40, -1)])
@pytest.mark.parametrize("sampler,opts", [("ddpm", {}), ("ddpm", {"ddpm_variance": "beta"}),
                                          ("ddim", {"eta": 0.0}), ("ddim", {"eta": 0.7})])
def test_one_step_equals_the_papers_update(sampler, opts, t, s):
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x, eps, noise = (jax.random.normal(k, (16, 3)) for k in (k1, k2, k3))
    got = _one_step(sampler, t, s, x, eps, noise, **opts)
    abar = ref.linear_alphas_cumprod(1000)
    steps = [t, s] if s >= 0 else [t]
    eps64 = np.asarray(eps, np.float64)
    # The reference run of one step (plus a dummy tail when s >= 0, which it never reaches).
    x64 = np.asarray(x, np.float64)
    want = ref.run(sampler, abar, np.array(steps), x64, lambda xx, a: eps64,
                   noises=[np.asarray(noise, np.float64)] * 2, eta=opts.get("eta", 0.0),
                   ddpm_variance=opts.get("ddpm_variance", "posterior")) if s < 0 else None
    if s >= 0:  # a single step t -> s of the reference, written out
        a_t, a_s = abar[t], abar[s]
        if sampler == "ddpm":
            alpha, beta = a_t / a_s, 1 - a_t / a_s
            var = beta * (1 - a_s) / (1 - a_t) if opts.get("ddpm_variance", "posterior") == "posterior" else beta
            want = (x64 - beta / math.sqrt(1 - a_t) * eps64) / math.sqrt(alpha) + math.sqrt(var) * np.asarray(noise)
        else:
            eta = opts["eta"]
            sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
            x0 = (x64 - math.sqrt(1 - a_t) * eps64) / math.sqrt(a_t)
            want = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - sigma ** 2) * eps64 + sigma * np.asarray(noise)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_identity_thresholding_changes_nothing_and_clipping_bounds_the_output():
    x_T, _ = MIXTURE.sample(jax.random.key(2), 256, SCHEDULE.alphas_cumprod[-1])
    run = lambda th: np.asarray(jax.jit(lambda x: samplers.sample(
        EPS, SCHEDULE, x * 2.0, num_steps=20, thresholding=th))(x_T))
    plain = run(None)
    np.testing.assert_allclose(run(lambda x0: x0), plain, atol=2e-4)
    assert np.abs(plain).max() > 1.5  # the data leave [-1, 1] ...
    for name in ("static", "dynamic"):
        clipped = run(name)
        assert np.abs(clipped).max() <= 1.0 + 1e-6  # ... thresholded samples do not
        assert np.mean(np.abs(clipped - plain)) > 0.05


def _call(**overrides):
    kw = dict(cond=jnp.zeros((4,), jnp.int32), null_cond=jnp.full((1,), -1, jnp.int32),
              guidance_weight=1.0, num_steps=10)
    kw.update(overrides)
    x_T = kw.pop("x_T", jnp.zeros((4, 2)))
    schedule = kw.pop("schedule", SCHEDULE)
    return samplers.sample(EPS, schedule, x_T, **kw)


@pytest.mark.parametrize("overrides,message", [
    (dict(sampler="lms"), r"unknown sampler 'lms'; choose one of \('ddpm', 'ddim', 'dpmpp_2m', 'euler', 'euler_a', 'heun', 'pndm'\)"),
    (dict(num_steps=0), r"num_steps must be an int in 1..T = 1..1000, got 0"),
    (dict(num_steps=1001), r"num_steps must be an int in 1..T = 1..1000, got 1001"),
    (dict(eta=-0.5, rng=jax.random.key(0)), r"eta must be >= 0"),
    (dict(cond=jnp.zeros((3,), jnp.int32)), r"cond has shape \(3,\).*leading batch axis of size 4"),
    (dict(cond={"tokens": jnp.zeros((4, 7)), "mask": jnp.zeros((2, 7))},
          null_cond={"tokens": jnp.zeros((1, 7)), "mask": jnp.zeros((1, 7))}),
     r"cond\['mask'\] has shape \(2, 7\)"),
    (dict(null_cond=jnp.zeros((2,), jnp.int32)), r"null_cond has shape \(2,\).*size 4 .*or 1"),
    (dict(null_cond=None), r"guidance_weight needs null_cond"),
    (dict(null_cond=(jnp.zeros((1,)),)), r"same pytree structure"),
    (dict(sampler="ddpm"), r"sampler 'ddpm' draws noise: pass rng"),
    (dict(eta=0.5), r"sampler 'ddim' with eta != 0 draws noise"),
    (dict(spacing="uniform"), r"unknown timestep spacing 'uniform'"),
    (dict(x_T=jnp.zeros(())), r"x_T must have a leading batch axis"),
    (dict(sample_ids=jnp.arange(3)), r"sample_ids must have shape \[B\] = \[4\]"),
    (dict(ddpm_variance="fixedlarge"), r"unknown ddpm_variance 'fixedlarge'"),
    (dict(prediction="score"), r"unknown prediction type 'score'"),
    (dict(schedule=make_schedule("cosine", 1000, zero_terminal_snr=True)),
     r"zero terminal SNR.*prediction='v'"),
])
def test_bad_input_gets_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        _call(**overrides)


def test_errors_also_raise_under_jit_and_traced_weights_need_null_cond():
    with pytest.raises(ValueError, match="guidance_weight needs null_cond"):
        jax.jit(lambda w: _call(null_cond=None, guidance_weight=w))(0.0)
    # w = 0 without null_cond is plain conditional sampling: no error.
    out = _call(null_cond=None, guidance_weight=0.0, cond=jnp.zeros((4,), jnp.int32))
    assert out.shape == (4, 2)
