"""Flow matching (diffusion/flow.py) and its samplers, against closed forms.

On a 1-D Gaussian mixture the exact flow velocity u*(x_tau, tau) = E[eps - x0 | x_tau] is known
(analytic.flow_fn), so a sampler's only errors are its discretisation and the draws': Euler
with many steps must reach the mixture's weights, means and variances; Heun reaches them with
fewer, and on a VP model (the cosine schedule, sigma_max = 3e4) Heun in the flow variables
does where Heun in k-diffusion's sigma cannot. The loss is checked against NumPy, the time
density by a KS test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from t2i_jax.diffusion import analytic, flow, forward, make_schedule, samplers

T = 1000
FLOW = make_schedule("flow", T)
# two well-separated components: each sample's component is its sign
MIXTURE = analytic.GaussianMixture.create([0.3, 0.7], [[-3.0], [3.0]], [[0.25], [0.5]])
N = 20000


def _x_T(n=N, seed=0):
    return samplers.initial_noise(jax.random.key(seed), (n, 1))


def _run(sampler, num_steps, schedule=FLOW, denoise=None, prediction="flow", x_T=None, **kw):
    denoise = denoise or analytic.flow_fn(MIXTURE, schedule)
    x_T = _x_T() if x_T is None else x_T
    fn = jax.jit(lambda x: samplers.sample(denoise, schedule, x, sampler=sampler,
                                           num_steps=num_steps, prediction=prediction, **kw))
    return np.asarray(fn(x_T), np.float64)[:, 0]


def _mixture_errors(x):
    """|estimate - truth| / standard error for the weight, means and variances of each side."""
    lo = x < 0
    n = len(x)
    w = lo.mean()
    out = [abs(w - 0.3) / np.sqrt(0.3 * 0.7 / n)]
    for side, mu, var in ((x[lo], -3.0, 0.25), (x[~lo], 3.0, 0.5)):
        m = len(side)
        out.append(abs(side.mean() - mu) / np.sqrt(var / m))
        out.append(abs(side.var() - var) / (var * np.sqrt(2.0 / m)))
    return np.array(out)


def test_flow_schedule_is_the_linear_path_seen_as_vp():
    tau = (np.arange(T) + 1.0) / T
    abar = (1 - tau) ** 2 / ((1 - tau) ** 2 + tau ** 2)
    np.testing.assert_allclose(np.asarray(FLOW.alphas_cumprod), abar, atol=1e-6)
    assert FLOW.zero_terminal_snr and FLOW.process == "flow"
    # between timesteps, the closed form; at whole ones, the table
    t = jnp.asarray([0.0, 123.0, 499.5, 998.25, 999.0])
    tau_t = (np.asarray(t) + 1) / T
    want = (1 - tau_t) ** 2 / ((1 - tau_t) ** 2 + tau_t ** 2)
    np.testing.assert_allclose(np.asarray(FLOW.at("alphas_cumprod", t, 1)), want, atol=1e-6)
    # the point the network reads is the path's: x_t / n = (1 - tau) x0 + tau eps
    x0, eps = np.float32(0.7), np.float32(-1.3)
    ab = FLOW.at("alphas_cumprod", t, 1)
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps
    # (read through float32 abar: at tau = 0.001, 1 - abar = 1e-6 holds ~6% rounding, so tau
    # itself is good to ~3e-5 there, as an eps model's x0_hat is near abar = 1)
    np.testing.assert_allclose(np.asarray(forward.model_input(x_t, ab, "flow")),
                               (1 - tau_t) * x0 + tau_t * eps, atol=5e-5)
    # and the prediction u = eps - x0 reads back as (eps, x0)
    e, x = forward.eps_and_x0(jnp.full_like(x_t, eps - x0), x_t, ab, "flow")
    np.testing.assert_allclose(np.asarray(e), eps, atol=2e-5)
    np.testing.assert_allclose(np.asarray(x), x0, atol=2e-5)


@pytest.mark.parametrize("mean,std,shift", [(0.0, 1.0, 1.0), (0.5, 0.7, 1.0), (0.0, 1.0, 3.0)])
def test_logit_normal_time_matches_its_distribution(mean, std, shift):
    tau = np.asarray(flow.sample_time(jax.random.key(3), 20000, "logit_normal", mean, std, shift),
                     np.float64)
    res = stats.kstest(tau, lambda u: flow.logit_normal_cdf(u, mean, std, shift))
    assert res.pvalue > 1e-3, res
    # and the KS test can tell: the unshifted CDF is refused for shifted draws
    if shift != 1.0:
        assert stats.kstest(tau, lambda u: flow.logit_normal_cdf(u, mean, std)).pvalue < 1e-6


def test_uniform_time_and_the_shift():
    tau = np.asarray(flow.sample_time(jax.random.key(4), 20000, "uniform"), np.float64)
    assert stats.kstest(tau, "uniform").pvalue > 1e-3
    assert tau.min() > 0 and tau.max() <= 1
    u = np.linspace(0, 1, 11)
    np.testing.assert_allclose(flow.shift_time(u, 3.0), 3 * u / (1 + 2 * u))
    assert flow.shift_time(0.0, 3.0) == 0.0 and flow.shift_time(1.0, 3.0) == 1.0
    assert flow.resolution_shift(512, 512, 256) == 2.0
    np.testing.assert_allclose(flow.time_grid(4, 3.0), flow.shift_time(np.array([1, .75, .5, .25]), 3.0))


def test_euler_is_rectified_flows_step_and_ddim():
    """x_{i+1} = x_i + (tau_{i+1} - tau_i) u(x_i, tau_i), written out, on a shifted grid."""
    u = analytic.flow_fn(MIXTURE, FLOW)
    x_T = _x_T(64)
    shift, n = 2.0, 12
    steps = samplers.steps_of(FLOW, n, shift=shift)
    tau = np.append(flow.time_grid(n, shift), 0.0)
    x = x_T
    for i in range(n):
        t = jnp.full((64,), tau[i] * T - 1, jnp.float32)
        x = x + (tau[i + 1] - tau[i]) * u(x, t, None)
    for sampler in ("euler", "ddim"):
        got = samplers.chain(
            lambda x_, t_: forward.eps_and_x0(
                u(forward.model_input(x_, FLOW.at("alphas_cumprod", t_, 2), "flow"), t_, None),
                x_, FLOW.at("alphas_cumprod", t_, 2), "flow"),
            FLOW, x_T, sampler=sampler, steps=steps, prediction="flow")
        np.testing.assert_allclose(np.asarray(got), np.asarray(x), atol=2e-5)
    # a model of x0 itself (JiT) that agrees with u, x0 = x_tau - tau u, takes the same steps
    def x0_model(x_, t_):
        ab = FLOW.at("alphas_cumprod", t_, 2)
        x_tau = forward.model_input(x_, ab, "flow_x0")
        tau_ = ((t_ + 1) / T).reshape(-1, 1)
        return forward.eps_and_x0(x_tau - tau_ * u(x_tau, t_, None), x_, ab, "flow_x0")
    got = samplers.chain(x0_model, FLOW, x_T, sampler="euler", steps=steps, prediction="flow_x0")
    np.testing.assert_allclose(np.asarray(got), np.asarray(x), atol=2e-5)


def test_heun_is_heuns_method_in_the_flow_time():
    u = analytic.flow_fn(MIXTURE, FLOW)
    x_T = _x_T(64, seed=1)
    n = 6
    tau = np.append(flow.time_grid(n), 0.0)
    vel = lambda x, s: u(x, jnp.full((64,), s * T - 1, jnp.float32), None)  # noqa: E731
    x = x_T
    for i in range(n):
        d = vel(x, tau[i])
        x_pred = x + (tau[i + 1] - tau[i]) * d
        if tau[i + 1] == 0:
            x = x_pred
        else:
            x = x + (tau[i + 1] - tau[i]) * 0.5 * (d + vel(x_pred, tau[i + 1]))
    got = _run("heun", n, x_T=x_T)
    np.testing.assert_allclose(got, np.asarray(x)[:, 0], atol=5e-5)


def test_heun_on_a_vp_model_is_k_diffusions_sigma_form():
    """On a VP model, Heun in y = x / sqrt(abar), sigma = sqrt((1 - abar) / abar), dy/dsigma = eps
    (DDPM's linear schedule: sigma_max = 157, as SD's; the cosine's 3e4 is no start for Heun in
    sigma: see the next test, in the flow variables)."""
    schedule = make_schedule("linear", T)
    eps_fn = analytic.eps_fn(MIXTURE, schedule)
    n, b = 5, 32
    x_T = _x_T(b, seed=2)
    ts = samplers.timesteps(schedule, n)
    ab = np.append(np.asarray(schedule.alphas_cumprod)[ts], 1.0)
    sig = np.sqrt((1 - ab) / ab)
    eps = lambda y, i: eps_fn(y * np.sqrt(ab[i]), jnp.full((b,), ts[i], jnp.int32), None)  # noqa
    y = x_T / np.sqrt(ab[0])
    for i in range(n):
        d = eps(y, i)
        y_pred = y + (sig[i + 1] - sig[i]) * d
        y = y_pred if i == n - 1 else y + (sig[i + 1] - sig[i]) * 0.5 * (d + eps(y_pred, i + 1))
    got = _run("heun", n, schedule=schedule, denoise=eps_fn, prediction="eps", x_T=x_T,
               thresholding=None)
    assert np.all(np.abs(got) < 6)
    np.testing.assert_allclose(got, np.asarray(y)[:, 0], rtol=1e-4, atol=1e-4)


def test_heun_on_a_vp_model_in_the_flow_variables_is_heuns_method_in_tau():
    """On a VP model with ode="flow", Heun in y = x / n, tau = sqrt(1 - abar) / n, n = sqrt(abar)
    + sqrt(1 - abar), dy/dtau = eps - x0 (the flow path's variables): the cosine schedule's
    sigma_max = 3e4 becomes tau = 0.9999, so 20 steps reach the mixture where the sigma form's
    corrector (its first step's error times sigma_max / 2) gives garbage even with exact eps."""
    schedule = make_schedule("cosine", T)
    eps_fn = analytic.eps_fn(MIXTURE, schedule)
    n, b = 5, 32
    x_T = _x_T(b, seed=3)
    ts = samplers.timesteps(schedule, n)
    ab = np.append(np.asarray(schedule.alphas_cumprod, np.float64)[ts], 1.0)
    norm = np.sqrt(ab) + np.sqrt(1 - ab)
    tau = np.sqrt(1 - ab) / norm
    assert tau[0] > 0.9999 and tau[-1] == 0

    def slope(y, i):  # eps_hat - x0_hat at x_t = n y
        x = y * norm[i]
        e = np.asarray(eps_fn(jnp.asarray(x, jnp.float32), jnp.full((b,), ts[i], jnp.int32), None),
                       np.float64)
        return e - (x - np.sqrt(1 - ab[i]) * e) / np.sqrt(ab[i])
    y = np.asarray(x_T, np.float64) / norm[0]
    for i in range(n):
        d = slope(y, i)
        y_pred = y + (tau[i + 1] - tau[i]) * d
        y = y_pred if i == n - 1 else y + (tau[i + 1] - tau[i]) * 0.5 * (d + slope(y_pred, i + 1))
    got = _run("heun", n, schedule=schedule, denoise=eps_fn, prediction="eps", x_T=x_T,
               ode="flow")
    assert np.all(np.abs(got) < 6)
    np.testing.assert_allclose(got, y[:, 0], rtol=1e-4, atol=1e-4)
    heun = _run("heun", 20, schedule=schedule, denoise=eps_fn, prediction="eps", ode="flow")
    assert np.all(_mixture_errors(heun) < 4.0), _mixture_errors(heun)
    sigma = _run("heun", 20, schedule=schedule, denoise=eps_fn, prediction="eps")  # the default
    assert np.max(_mixture_errors(sigma)) > 100, _mixture_errors(sigma)


def test_heun_in_the_flow_variables_starts_at_zero_snr_and_bad_odes_are_refused():
    """abar = 0 is sigma = inf (refused) but tau = 1 (a finite start): a v model on the cosine
    schedule with zero terminal SNR reaches the mixture with Heun in the flow variables."""
    zero = make_schedule("cosine", T, zero_terminal_snr=True)
    v_fn = analytic.v_fn(MIXTURE, zero)
    for ode in (None, "sigma"):
        with pytest.raises(ValueError, match="sigma form cannot start at zero SNR .* use "
                                             "--ode_variables flow"):
            samplers.sample(v_fn, zero, _x_T(4), sampler="heun", num_steps=5, prediction="v",
                            ode=ode)
    heun = _run("heun", 20, schedule=zero, denoise=v_fn, prediction="v", ode="flow")
    assert np.all(_mixture_errors(heun) < 4.0), _mixture_errors(heun)
    with pytest.raises(ValueError, match=r"unknown ode 'tau' \(Heun's variables\); choose one "
                                         r"of \('sigma', 'flow'\)"):
        samplers.sample(v_fn, zero, _x_T(4), sampler="heun", num_steps=5, prediction="v",
                        ode="tau")
    with pytest.raises(ValueError, match="sigma form cannot start at zero SNR"):  # a flow model
        samplers.sample(analytic.flow_fn(MIXTURE, FLOW), FLOW, _x_T(4), sampler="heun",
                        num_steps=5, prediction="flow", ode="sigma")


def test_ode_variables_is_in_the_jobs_identity_only_when_given(data_dir):
    """SampleOptions.ode_variables travels to job.json, every record and a later stage's record
    only when set (old jobs keep their identity), and is refused for a sampler other than heun."""
    from runs import tiny
    from t2i_jax import families
    from t2i_jax.sampling.generate import SampleOptions
    from t2i_jax.sampling.load import Trained
    from t2i_jax.sampling.plan import Plan
    from t2i_jax.sampling.stages import Stage
    trained = Trained(families.build(tiny(data_dir)), None, 40, "ema", "/runs/text")

    def make(**kw):
        return Plan.create(trained, ["3"], num_per_prompt=2, guidance=(0.0,), seed=0,
                           options=SampleOptions("heun", 3, **kw)).spec
    plain, flow_spec = make(), make(ode_variables="flow")
    assert "ode_variables" not in plain.to_json() and "ode_variables" not in plain.record(1)
    assert {k: v for k, v in flow_spec.to_json().items() if k not in plain.to_json()} == \
        {"ode_variables": "flow"}
    assert flow_spec.record(1)["ode_variables"] == "flow"
    assert flow_spec.options == SampleOptions("heun", 3, ode_variables="flow")
    assert make(ode_variables="sigma").to_json()["ode_variables"] == "sigma"
    stage = lambda o: Stage(trained, o, 1.0, None).record(1)  # noqa: E731
    assert stage(SampleOptions("heun", 3, ode_variables="flow"))["ode_variables"] == "flow"
    assert "ode_variables" not in stage(SampleOptions("heun", 3))
    with pytest.raises(ValueError, match="sampler 'ddim' does not read it: pass --sampler heun"):
        SampleOptions("ddim", 3, ode_variables="flow")
    with pytest.raises(ValueError, match="unknown ode_variables 'tau'"):
        SampleOptions("heun", 3, ode_variables="tau")


def test_euler_with_many_steps_reaches_the_mixture():
    errors = _mixture_errors(_run("euler", 1000))
    assert np.all(errors < 4.0), errors


def test_heun_reaches_the_mixture_with_fewer_steps():
    """Heun at 20 steps (39 calls) is within the draws' noise; Euler at 40 calls is not, and
    per sample Heun's 39 calls sit closer to the converged ODE solution than Euler's 40."""
    heun = _run("heun", 20)
    assert np.all(_mixture_errors(heun) < 4.0), _mixture_errors(heun)
    euler = _run("euler", 40)
    assert np.max(_mixture_errors(euler)) > 4.0, _mixture_errors(euler)
    reference = _run("heun", 400)
    err_heun, err_euler = np.abs(heun - reference).mean(), np.abs(euler - reference).mean()
    assert err_heun * 10 < err_euler, (err_heun, err_euler)


def test_flow_steps_refuse_what_they_cannot_run():
    with pytest.raises(ValueError, match="shift must be > 0"):
        samplers.steps_of(FLOW, 10, shift=0.0)
    with pytest.raises(ValueError, match="PLMS"):
        samplers.steps_of(FLOW, 10, sampler="pndm")
    with pytest.raises(ValueError, match="flow matching"):
        samplers.steps_of(make_schedule("cosine", T), 10, shift=3.0)
    with pytest.raises(ValueError, match="zero SNR"):
        zero = make_schedule("cosine", T, zero_terminal_snr=True)
        samplers.sample(analytic.v_fn(MIXTURE, zero), zero, _x_T(4), sampler="heun",
                        num_steps=5, prediction="v")


@pytest.mark.parametrize("prediction,mean", [("eps", 0.3), ("x0", -3.5)])
def test_the_familys_flow_loss_is_the_numpy_one(prediction, mean):
    """Diffusion.loss with diffusion.process="flow": tau = sigmoid(m + s z) shifted,
    x_tau = (1 - tau) x0 + tau eps, the network at t = tau T - 1, |u_hat - (eps - x0)|^2 with
    u_hat the output, or (JiT, prediction x0) (x_tau - output) / max(tau, 0.05); the mean -3.5
    puts some tau under JiT's clip."""
    import sys, os  # noqa: E401
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tiny_families
    from t2i_jax import families
    config = tiny_families.get_config("flow")
    config.model.text = None          # unconditional: the batch is its images
    config.train.p_uncond = 0.0
    config.diffusion.flow_logit_mean, config.diffusion.flow_logit_std = mean, 0.8
    config.diffusion.prediction = prediction  # "eps": unset, the velocity
    family = families.build(config)
    assert family.prediction == {"eps": "flow", "x0": "flow_x0"}[prediction]
    params = family.init_params(jax.random.key(0))
    params = jax.tree_util.tree_map(  # a model whose output is not 0 (its last conv is)
        lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
    x0 = jax.random.uniform(jax.random.key(2), (5, 16, 16, 1), minval=-1, maxval=1)
    key = jax.random.key(7)
    per_example, metrics = family.loss(params, {"image": x0}, key, family.hparams())
    # the same draws, the rest in NumPy (the streams are the family's: 0 time, 1 noise)
    z = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), (5,)), np.float64)
    tau = 1 / (1 + np.exp(-(mean + 0.8 * z)))
    tau = 2.0 * tau / (1 + tau)                                    # shift 2
    eps = np.asarray(jax.random.normal(jax.random.fold_in(key, 1), x0.shape), np.float64)
    x_np = np.asarray(x0, np.float64)
    x_tau = (1 - tau)[:, None, None, None] * x_np + tau[:, None, None, None] * eps
    out = np.asarray(family.model.apply(params, jnp.asarray(x_tau, jnp.float32),
                                        jnp.asarray(tau * T - 1, jnp.float32),
                                        family.conditioning.of_batch({"image": x0})),
                     np.float64)
    if prediction == "x0":
        assert 0 < np.sum(tau < 0.05) < 5, tau
        out = (x_tau - out) / np.maximum(tau, 0.05)[:, None, None, None]
    want = np.mean(np.square(out - (eps - x_np)).reshape(5, -1), axis=1)
    np.testing.assert_allclose(np.asarray(per_example), want, rtol=2e-5)
    assert set(metrics) >= {"loss_q0", "loss_q3"}


def test_flow_config_refusals():
    import sys, os  # noqa: E401
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tiny_families
    from t2i_jax import families
    for change, words in [(dict(learn_sigma=True), "learn_sigma"), (dict(prediction="v"), "u = eps - x0"),
                          (dict(flow_time="beta"), "flow_time"), (dict(shift=-1.0), "must be > 0")]:
        config = tiny_families.get_config("flow")
        config.diffusion.update(change)
        with pytest.raises(ValueError, match=words):
            families.build(config)
    config = tiny_families.get_config("flow")
    config.train.loss_weighting = "min_snr"
    with pytest.raises(ValueError, match="uniform"):
        families.build(config)
    config = tiny_families.get_config("diffusion")
    config.diffusion.shift = 3.0
    with pytest.raises(ValueError, match="process='flow'"):
        families.build(config)
