"""Guidance after CFG (diffusion/cfg.py): guidance rescale (Lin et al. 2023), a guidance interval
(Kynkaanniemi et al. 2024) and APG (Sadat et al. 2024) against NumPy transcriptions of the
papers' equations, each equal to plain CFG at its no-op values (at the denoiser, through
samplers.sample and through make_generate_fn), sweeps over their values under one compilation,
APG's momentum carried per example, and sample.py's flags through to job.json and every record.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax.diffusion import cfg, guidance, make_schedule, samplers

KEY = jax.random.key(0)
SHAPE = (4, 4, 4, 2)  # [B, H, W, C]
SCHEDULE = make_schedule("cosine", 100)
FLOW = make_schedule("flow", 100)


def net(x, t, c):
    """A toy network (x_t [N, ...], t [N], cond [N, 2]) -> output [N, ...]: nonlinear in x, the
    condition and t, elementwise (so no row reads another)."""
    scale = 1.0 + 0.002 * t.astype(jnp.float32)[:, None, None, None]
    return jnp.tanh(0.7 * x + c[:, None, None, :]) * scale - 0.1 * x


def _inputs(batch=4, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, (batch,) + SHAPE[1:])
    cond = jax.random.normal(k2, (batch, 2)) * 1.5
    return x, cond, jnp.zeros((1, 2))


def _denoiser(prediction, w, rule=None, schedule=SCHEDULE, seed=0, batch=4):
    x, cond, null = _inputs(batch, seed)
    return guidance.model_denoiser(net, schedule, prediction, cond, null, w, rule=rule), x, cond


def _np_rows(x, cond, t):
    """The toy network's conditional and null outputs in float64 (NumPy)."""
    x, cond = np.asarray(x, np.float64), np.asarray(cond, np.float64)
    scale = 1.0 + 0.002 * np.asarray(t, np.float64)[:, None, None, None]
    out = lambda c: np.tanh(0.7 * x + c[:, None, None, :]) * scale - 0.1 * x  # noqa: E731
    return out(cond), out(np.zeros_like(cond))


def _np_eps_x0(out, x, abar, prediction):
    """(eps, x0) of an output (DDPM eq. 4 read backwards; v: Salimans & Ho 2022)."""
    x = np.asarray(x, np.float64)
    a, b = np.sqrt(abar), np.sqrt(1.0 - abar)
    if prediction == "eps":
        return out, (x - b * out) / a
    if prediction == "x0":
        return (x - a * out) / b, out
    return a * out + b * x, a * x - b * out  # v


def _abar(t, schedule=SCHEDULE):
    return np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(t)][:, None, None, None]


def _equal(a, b):
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# ---- NumPy transcriptions of the papers -------------------------------------------------------

def np_rescale(x_pos, x_neg, s, phi):
    """Lin et al. 2023, sec. 3.4: eq. 15 (CFG at scale s), eq. 16, eq. 17, with torch's unbiased
    std as diffusers' rescale_noise_cfg takes it."""
    axes = tuple(range(1, x_pos.ndim))
    x_cfg = x_neg + s * (x_pos - x_neg)                                         # eq. 15
    sigma_pos = x_pos.std(axis=axes, ddof=1, keepdims=True)
    sigma_cfg = x_cfg.std(axis=axes, ddof=1, keepdims=True)
    x_rescaled = x_cfg * (sigma_pos / sigma_cfg)                                # eq. 16
    return phi * x_rescaled + (1.0 - phi) * x_cfg                               # eq. 17


class MomentumBuffer:
    """Sadat et al. 2024, Alg. 1."""

    def __init__(self, momentum):
        self.momentum = momentum
        self.running_average = 0.0

    def update(self, update_value):
        new_average = self.momentum * self.running_average
        self.running_average = update_value + new_average


def np_project(v0, v1):
    axes = tuple(range(1, v0.ndim))
    v1 = v1 / np.maximum(np.sqrt(np.sum(v1 * v1, axis=axes, keepdims=True)), 1e-12)
    v0_parallel = np.sum(v0 * v1, axis=axes, keepdims=True) * v1
    return v0_parallel, v0 - v0_parallel


def np_apg(pred_cond, pred_uncond, guidance_scale, momentum_buffer, eta, norm_threshold):
    """Sadat et al. 2024, Alg. 1 (normalized_guidance), on the denoised predictions."""
    diff = pred_cond - pred_uncond
    if momentum_buffer is not None:
        momentum_buffer.update(diff)
        diff = momentum_buffer.running_average
    if norm_threshold > 0:
        diff_norm = np.sqrt(np.sum(diff * diff, axis=tuple(range(1, diff.ndim)), keepdims=True))
        diff = diff * np.minimum(1.0, norm_threshold / diff_norm)
    diff_parallel, diff_orthogonal = np_project(diff, pred_cond)
    normalized_update = diff_orthogonal + eta * diff_parallel
    return pred_cond + (guidance_scale - 1.0) * normalized_update


# ---- against the papers ----------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_rescale_is_lin_et_al_eqs_15_to_17_on_the_models_prediction(prediction):
    w, phi, t = 4.0, 0.7, jnp.asarray([3, 30, 60, 97])
    den, x, cond = _denoiser(prediction, w, cfg.Rule(rescale=phi))
    eps, x0 = den(x, t)
    pos, neg = _np_rows(x, cond, t)
    want = _np_eps_x0(np_rescale(pos, neg, 1.0 + w, phi), x, _abar(t), prediction)
    np.testing.assert_allclose(eps, want[0], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(x0, want[1], rtol=1e-5, atol=2e-5)
    # the rule alone, and one phi per example (a row at phi = 0 is CFG's output exactly)
    c, n = (jnp.asarray(a, jnp.float32) for a in (pos, neg))
    got = cfg.rescale(cfg.cfg_combine(c, n, w), c, jnp.asarray([0.0, 0.3, 0.7, 1.0]))
    for i, p in enumerate([0.0, 0.3, 0.7, 1.0]):
        np.testing.assert_allclose(got[i], np_rescale(pos, neg, 1.0 + w, p)[i], rtol=1e-5,
                                   atol=2e-5)
    np.testing.assert_array_equal(got[0], cfg.cfg_combine(c, n, w)[0])


@pytest.mark.parametrize("schedule, offset", [(SCHEDULE, 0.0), (FLOW, 1.0)])
def test_the_interval_guides_inside_lo_hi_and_gives_the_conditional_output_outside(schedule,
                                                                                  offset):
    """time = t / T (VP) or (t + 1) / T (flow, its tau); [0.25, 0.7] holds t = 30 and 60 only."""
    t = jnp.asarray([5, 30, 60, 95])
    inside = np.array([False, True, True, False])
    assert np.array_equal((0.25 <= (np.asarray(t) + offset) / 100) & ((np.asarray(t) + offset)
                                                                       / 100 <= 0.7), inside)
    prediction = "flow" if schedule is FLOW else "eps"
    den, x, cond = _denoiser(prediction, 3.0, cfg.Rule(interval=(0.25, 0.7)), schedule)
    got = den(x, t)
    guided = _denoiser(prediction, 3.0, None, schedule)[0](x, t)
    conditional = guidance.model_denoiser(net, schedule, prediction, cond)(x, t)  # no null row
    for g, want_in, want_out in zip(got, guided, conditional):
        np.testing.assert_array_equal(np.asarray(g)[inside], np.asarray(want_in)[inside])
        np.testing.assert_array_equal(np.asarray(g)[~inside], np.asarray(want_out)[~inside])
    # the paper's own bounds: sigma = sqrt((1 - abar) / abar) in (lo, hi]
    abar = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(t)]
    sigma = np.sqrt((1.0 - abar) / abar)
    lo, hi = float(np.sort(sigma)[0] + 1e-3), float(np.sort(sigma)[2] + 1e-3)
    on = (sigma > lo) & (sigma <= hi)
    assert on.sum() == 2
    got = _denoiser(prediction, 3.0, cfg.Rule(sigma_interval=(lo, hi)), schedule)[0](x, t)
    for g, want_in, want_out in zip(got, guided, conditional):
        np.testing.assert_array_equal(np.asarray(g)[on], np.asarray(want_in)[on])
        np.testing.assert_array_equal(np.asarray(g)[~on], np.asarray(want_out)[~on])


def test_apg_is_sadat_et_al_algorithm_1_with_its_momentum_carried_over_steps():
    rng = np.random.default_rng(0)
    B, steps, w = 4, 5, 6.0
    eta, r, beta = 0.3, 9.0, -0.5
    buf = MomentumBuffer(beta)
    running = jnp.zeros(SHAPE)
    for k in range(steps):
        c, n = rng.normal(size=(2,) + SHAPE) * np.array([1.0, 2.0, 3.0, 4.0])[:, None, None, None]
        want = np_apg(c, n, 1.0 + w, buf, eta, r)
        got, running = cfg.apg(jnp.asarray(c, jnp.float32), jnp.asarray(n, jnp.float32), w,
                               running, cfg.APG(eta, r, beta))
        np.testing.assert_allclose(running, buf.running_average, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    norms = np.sqrt(np.sum(np.asarray(buf.running_average) ** 2, axis=(1, 2, 3)))
    assert np.any(norms > r) and np.any(norms < r)  # the threshold bit on some examples only
    # no momentum buffer, no threshold, the default eta (0: the orthogonal part alone)
    c, n = rng.normal(size=(2,) + SHAPE)
    got, _ = cfg.apg(jnp.asarray(c, jnp.float32), jnp.asarray(n, jnp.float32), w,
                     jnp.zeros(SHAPE), cfg.APG())
    np.testing.assert_allclose(got, np_apg(c, n, 1.0 + w, None, 0.0, 0.0), rtol=1e-5, atol=1e-4)


def test_apg_in_the_denoiser_acts_on_x0_hat_and_recomputes_eps_hat_over_several_steps():
    w, apg = 3.0, cfg.APG(0.5, 4.0, -0.6)
    den, x, cond = _denoiser("eps", w, cfg.Rule(apg=apg))
    assert isinstance(den, guidance.Stateful)
    with pytest.raises(TypeError, match="carries state"):
        den(x, jnp.full((4,), 10))
    state, buf = guidance.initial_state(den, x), MomentumBuffer(apg.momentum)
    for k, t_value in enumerate([90, 60, 30]):
        t = jnp.full((4,), t_value)
        x_k = x * (1.0 - 0.2 * k)
        (eps, x0), state = guidance.call(den, x_k, t, state)
        pos, neg = _np_rows(x_k, cond, t)
        abar = _abar(t)
        x0_c, x0_n = (_np_eps_x0(o, x_k, abar, "eps")[1] for o in (pos, neg))
        x0_g = np_apg(x0_c, x0_n, 1.0 + w, buf, apg.eta, apg.norm_threshold)
        eps_g = (np.asarray(x_k, np.float64) - np.sqrt(abar) * x0_g) / np.sqrt(1.0 - abar)
        np.testing.assert_allclose(state, buf.running_average, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(x0, x0_g, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(eps, eps_g, rtol=1e-4, atol=1e-4)


def test_apg_with_momentum_through_a_whole_chain_equals_a_numpy_ddim_chain():
    """samplers.sample (DDIM eta 0, 4 steps) with APG's momentum carried in its scan, against the
    same chain written in NumPy from Alg. 1 and DDIM eq. 12."""
    w, apg = 2.0, cfg.APG(0.2, 6.0, -0.5)
    x_T, cond, null = _inputs()
    got = jax.jit(lambda x: samplers.sample(net, SCHEDULE, x, cond=cond, null_cond=null,
                                            guidance_weight=w, num_steps=4, prediction="v",
                                            guidance_rule=cfg.Rule(apg=apg)))(x_T)
    steps = samplers.steps_of(SCHEDULE, 4, "trailing", "v", "ddim")
    abars = np.asarray(SCHEDULE.alphas_cumprod, np.float64)
    x, buf = np.asarray(x_T, np.float64), MomentumBuffer(apg.momentum)
    for t, s in zip(steps.t, steps.s):
        tb = np.full((4,), t)
        pos, neg = _np_rows(x, cond, tb)
        a = abars[t]
        x0_c, x0_n = (_np_eps_x0(o, x, a, "v")[1] for o in (pos, neg))
        x0 = np_apg(x0_c, x0_n, 1.0 + w, buf, apg.eta, apg.norm_threshold)
        eps = (x - np.sqrt(a) * x0) / np.sqrt(1.0 - a)
        a_s = 1.0 if s < 0 else abars[s]
        x = np.sqrt(a_s) * x0 + np.sqrt(1.0 - a_s) * eps                        # DDIM, eta 0
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)
    plain = jax.jit(lambda x: samplers.sample(net, SCHEDULE, x, cond=cond, null_cond=null,
                                              guidance_weight=w, num_steps=4, prediction="v",
                                              guidance_rule=cfg.Rule(apg=apg._replace(
                                                  momentum=0.0))))(x_T)
    assert np.abs(np.asarray(plain) - np.asarray(got)).max() > 1e-3  # the momentum matters


# ---- each at its no-op values is plain CFG ---------------------------------------------------

NO_OPS = {"rescale 0": cfg.Rule(rescale=0.0), "interval [0, 1]": cfg.Rule(interval=(0.0, 1.0)),
          "both": cfg.Rule(rescale=0.0, interval=(0.0, 1.0))}


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_each_method_at_its_no_op_values_is_plain_cfg_at_the_denoiser(prediction):
    """Bit for bit: phi x_r + (1 - phi) x at phi = 0 is 0 + x, and an interval holding every t
    selects the guided value itself. APG at eta 1, r 0, beta 0 is CFG on x0_hat: bit for bit for
    an x0 model (the same operations), to float32 rounding otherwise (CFG combines eps or v
    linearly, then converts; APG converts both rows, combines, and converts back)."""
    schedule = FLOW if prediction == "flow" else SCHEDULE
    t = jnp.asarray([0, 33, 66, 99])
    plain, x, _ = _denoiser(prediction, jnp.asarray([0.0, 1.0, 3.0, 7.5]), None, schedule)
    want = plain(x, t)
    for name, rule in NO_OPS.items():
        _equal(_denoiser(prediction, jnp.asarray([0.0, 1.0, 3.0, 7.5]), rule, schedule)[0](x, t),
               want)
    den = _denoiser(prediction, jnp.asarray([0.0, 1.0, 3.0, 7.5]),
                    cfg.Rule(apg=cfg.APG(1.0, 0.0, 0.0)), schedule)[0]
    got, _ = den.step(x, t, den.init_state(x))
    if prediction == "x0":
        _equal(got, want)
    else:
        for g, v in zip(got, want):
            np.testing.assert_allclose(g, v, rtol=1e-5, atol=1e-5 * float(jnp.abs(v).max()))


@pytest.mark.default_xla  # two different programs compared bit for bit (tests/conftest.py)
def test_each_method_at_its_no_op_values_is_plain_cfg_through_a_whole_chain():
    x_T, cond, null = _inputs()
    run = lambda rule, sampler: jax.jit(lambda x, rule: samplers.sample(  # noqa: E731
        net, SCHEDULE, x, cond=cond, null_cond=null, guidance_weight=jnp.asarray(
            [0.0, 1.0, 3.0, 7.5]), num_steps=5, sampler=sampler, prediction="v",
        thresholding="static", guidance_rule=rule))(x_T, rule)
    for sampler in ("ddim", "dpmpp_2m"):
        want = np.asarray(run(None, sampler))
        for name, rule in NO_OPS.items():
            np.testing.assert_array_equal(np.asarray(run(rule, sampler)), want,
                                          err_msg=f"{name}, {sampler}")
        np.testing.assert_allclose(run(cfg.Rule(apg=cfg.APG(1.0, 0.0, 0.0)), sampler), want,
                                   rtol=1e-5, atol=1e-5)


def test_a_sweep_over_every_value_is_one_compilation_and_the_methods_compose():
    """phi, the interval bounds (chain time and sigma) and APG's eta, r and beta are traced: one
    program for all of them; which methods are on (the rule's None fields) picks the program.
    APG composes with rescale, the interval, gradient guidance and thresholding."""
    x_T, cond, null = _inputs()
    log_p = lambda x, t, c: -0.5 * jnp.sum(jnp.square(x - 0.3), axis=(1, 2, 3))  # noqa: E731

    @jax.jit
    def run(x, rule):
        return samplers.sample(net, SCHEDULE, x, cond=cond, null_cond=null, guidance_weight=3.0,
                               num_steps=4, prediction="eps", thresholding="dynamic",
                               guidance_fn=log_p, classifier_scale=0.5, guidance_rule=rule)

    outs = [run(x_T, cfg.Rule(phi, (lo, hi), (0.01, shi), cfg.APG(eta, r, beta)))
            for phi, lo, hi, shi, eta, r, beta in ((0.0, 0.0, 1.0, 1e3, 1.0, 0.0, 0.0),
                                                   (0.7, 0.2, 0.9, 50.0, 0.0, 5.0, -0.5),
                                                   (0.3, 0.5, 0.6, 10.0, 0.5, 1.0, -0.9))]
    assert run._cache_size() == 1
    assert all(np.all(np.isfinite(o)) for o in outs)
    assert min(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
               ((outs[0], outs[1]), (outs[1], outs[2]))) > 1e-3
    run(x_T, cfg.Rule(rescale=0.5))      # another set of methods: another program
    run(x_T, cfg.Rule(rescale=0.9))
    assert run._cache_size() == 2


def test_apg_momentum_is_per_example_so_a_sample_does_not_depend_on_its_batch():
    x_T, cond, null = _inputs(batch=7, seed=3)
    rule = cfg.Rule(rescale=0.5, interval=(0.1, 0.9), apg=cfg.APG(0.0, 3.0, -0.5))

    @jax.jit
    def run(x, c):
        return samplers.sample(net, SCHEDULE, x, cond=c, null_cond=null,
                               guidance_weight=4.0, num_steps=6, prediction="eps",
                               guidance_rule=rule)
    batch = np.asarray(run(x_T, cond))
    for i in range(7):
        np.testing.assert_allclose(np.asarray(run(x_T[i:i + 1], cond[i:i + 1]))[0], batch[i],
                                   rtol=1e-6, atol=1e-6)


def test_bad_rules_are_refused_with_the_flag_named():
    for rule, words in ((cfg.Rule(rescale=1.5), "--guidance_rescale phi must be in [0, 1]"),
                        (cfg.Rule(rescale=float("nan")), "--guidance_rescale"),
                        (cfg.Rule(interval=(0.6, 0.2)), "--guidance_interval takes LO HI"),
                        (cfg.Rule(interval=(0.0, 1.2)), "--guidance_interval takes LO HI"),
                        (cfg.Rule(sigma_interval=(0.3, float("inf"))),
                         "--guidance_interval_sigma takes LO HI"),
                        (cfg.Rule(apg=cfg.APG(eta=float("nan"))), "--apg_eta must be a finite"),
                        (cfg.Rule(apg=cfg.APG(norm_threshold=-1.0)),
                         "--apg_norm_threshold must be >= 0")):
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            rule.check()
    cfg.Rule(0.7, (0.1, 0.9), (0.28, 5.42), cfg.APG(0.0, 15.0, -0.5)).check()
    x_T, cond, _ = _inputs()
    with pytest.raises(ValueError, match="guidance_rule combines the conditional and null rows"):
        samplers.sample(net, SCHEDULE, x_T, cond=cond, guidance_rule=cfg.Rule(rescale=0.7))


# ---- sample.py, the plan and the job ---------------------------------------------------------

@pytest.mark.parametrize("extra, words", [
    (["--guidance_rescale", "1.5"], "--guidance_rescale must be in [0, 1]"),
    (["--guidance_rescale", "nan"], "--guidance_rescale must be in [0, 1]"),
    (["--guidance_interval", "0.8", "0.2"], "--guidance_interval takes LO HI with 0 <= LO < HI"),
    (["--guidance_interval", "0", "2"], "--guidance_interval takes LO HI"),
    (["--guidance_interval_sigma", "1", "inf"], "--guidance_interval_sigma takes LO HI"),
    (["--apg_eta", "1"], "--apg_eta is adaptive projected guidance's: it needs --apg"),
    (["--apg", "--apg_momentum", "inf"], "--apg_momentum must be a finite number"),
    (["--apg", "--apg_norm_threshold", "-1"], "--apg_norm_threshold must be >= 0"),
    (["--apg", "--prior", "P"], "--apg act on stage 0's classifier-free guidance; with --prior"),
    (["--sampler", "ddim", "--ode_variables", "flow"], "--sampler ddim does not read it"),
])
def test_sample_py_refuses_bad_guidance_rule_flags_before_anything_is_written(tmp_path, capfd,
                                                                             extra, words):
    import sample as sample_cli
    from test_faults import cli
    out = tmp_path / "o"
    code, err = cli(capfd, sample_cli.run, ["--workdir", "W", "--prompt", "3", "--outdir",
                                            str(out), *extra])
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not out.exists()


@pytest.fixture(scope="module")
def untrained(data_dir):
    """The tiny text model's and the unconditional one's families with no parameters: enough for
    a Plan (its checks and its identity), which reads no weights."""
    from runs import tiny
    from t2i_jax import families
    from t2i_jax.sampling.load import Trained
    return (Trained(families.build(tiny(data_dir)), None, 40, "ema", "/runs/text"),
            Trained(families.build(tiny(data_dir, "uncond")), None, 40, "ema", "/runs/uncond"))


def test_the_plan_turns_no_op_values_off_keeps_old_identities_and_refuses_a_rule_with_no_cfg(
        untrained):
    from t2i_jax.sampling.generate import SampleOptions
    from t2i_jax.sampling.plan import Plan
    text, uncond = untrained
    make = lambda trained=text, guidance=(3.0,), **kw: Plan.create(  # noqa: E731
        trained, ["3"], num_per_prompt=2, guidance=guidance, seed=0,
        options=SampleOptions("ddim", 3), **kw)
    plain = make()
    for rule in NO_OPS.values():  # the same job as plain CFG: its identity and its program
        plan = make(guidance_rule=rule)
        assert plan.guidance_rule is None and plan.spec == plain.spec
        assert plan.spec.to_json() == plain.spec.to_json()
    rule = cfg.Rule(0.7, (0.2, 0.9), None, cfg.APG(0.0, 15.0, -0.5))
    spec = make(guidance_rule=rule).spec
    want = {"guidance_rescale": 0.7, "guidance_interval": [0.2, 0.9],
            "apg": {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5}}
    assert {k: v for k, v in spec.to_json().items() if k not in plain.spec.to_json()} == want
    assert {k: spec.record(1)[k] for k in want} == want
    assert json.loads(json.dumps(spec.to_json())) == spec.to_json()  # job.json reads back equal
    with pytest.raises(ValueError, match="every guidance weight is 0"):
        make(guidance=(0.0,), guidance_rule=rule)
    make(guidance=(0.0, 2.0), guidance_rule=rule)  # a sweep with w = 0 among others is fine
    with pytest.raises(ValueError, match="--guidance_rescale / --apg act on classifier-free "
                                         "guidance, which /runs/uncond does not have"):
        make(uncond, guidance=(0.0,), guidance_rule=cfg.Rule(rescale=0.5, apg=cfg.APG()))
    with pytest.raises(ValueError, match="--guidance_interval takes LO HI"):
        make(guidance_rule=cfg.Rule(interval=(0.9, 0.1)))


@pytest.mark.default_xla  # two different programs compared bit for bit (tests/conftest.py)
def test_make_generate_fn_no_op_rules_are_plain_cfg_and_a_sweep_is_one_program(tiny_workdir):
    from t2i_jax.sampling.generate import SampleOptions, make_generate_fn
    from t2i_jax.sampling.load import load_trained
    model = load_trained(tiny_workdir)
    gen = make_generate_fn(model.family, SampleOptions("ddim", 3))
    cond = model.family.conditioning.of_prompts(["3", "7", "1"])
    w, ids = jnp.asarray([0.0, 2.0, 4.0]), jnp.arange(3)
    call = lambda **kw: np.asarray(gen(model.params, cond, KEY, w, ids, **kw))  # noqa: E731
    want = call()
    for name, rule in NO_OPS.items():
        np.testing.assert_array_equal(call(rule=rule), want, err_msg=name)
    np.testing.assert_allclose(call(rule=cfg.Rule(apg=cfg.APG(1.0, 0.0, 0.0))), want, atol=1e-5)
    before = gen._cache_size()
    outs = [call(rule=cfg.Rule(phi, (lo, 1.0), None, cfg.APG(eta, r, beta)))
            for phi, lo, eta, r, beta in ((0.7, 0.0, 0.0, 2.0, -0.5), (0.2, 0.3, 1.0, 0.0, 0.0),
                                          (1.0, 0.6, 0.5, 8.0, -0.9))]
    assert gen._cache_size() == before + 1  # three settings, one compilation
    assert np.abs(outs[0] - want).max() > 1e-3 and np.abs(outs[0] - outs[2]).max() > 1e-3


def test_sample_py_records_the_rule_refuses_a_resume_with_other_values_and_sweeps_share_a_program(
        tiny_workdir, tmp_path, capsys):
    import sample as sample_cli
    from t2i_jax import files
    from t2i_jax.sampling import job as job_lib
    from t2i_jax.sampling import outdir as out_lib
    from t2i_jax.sampling.generate import SampleOptions
    from t2i_jax.sampling.load import load_trained
    from t2i_jax.sampling.plan import Plan
    out = tmp_path / "out"
    args = ["--workdir", tiny_workdir, "--prompt", "3", "--prompt", "7", "--num_per_prompt", "2",
            "--guidance", "0", "3", "--steps", "3", "--seed", "1", "--no_progress",
            "--guidance_rescale", "0.7", "--guidance_interval", "0.1", "0.9", "--apg",
            "--apg_momentum", "-0.5", "--apg_norm_threshold", "5"]
    assert sample_cli.run(args + ["--outdir", str(out)]) == 0
    assert "guidance after CFG" in capsys.readouterr().err
    want = {"guidance_rescale": 0.7, "guidance_interval": [0.1, 0.9],
            "apg": {"eta": 0.0, "norm_threshold": 5.0, "momentum": -0.5}}
    job = json.loads((out / "job.json").read_text())
    assert {k: job[k] for k in want} == want and "guidance_interval_sigma" not in job
    rows = files.read_jsonl(str(out / "samples.jsonl"))
    assert len(rows) == 8 and all({k: r[k] for k in want} == want for r in rows)
    for extra, diff in ((["--guidance_rescale", "0.5"], "guidance_rescale: 0.7 -> 0.5"),
                        (["--apg_momentum", "-0.4"], "apg: {"),
                        (["--guidance_interval", "0.1", "0.8"], "guidance_interval: [0.1, 0.9]")):
        changed = list(args)
        i = changed.index(extra[0])
        changed[i + 1:i + len(extra)] = extra[1:]
        assert sample_cli.run(changed + ["--outdir", str(out)]) == 1
        err = capsys.readouterr().err
        assert "holds another sampling job" in err and diff in err, err
    assert sample_cli.run(args + ["--outdir", str(out)]) == 0  # the same job: nothing to do
    assert "0 generated now" in capsys.readouterr().err
    # no guidance to act on (every w = 0): refused like --guidance for an unconditional model
    changed = list(args)
    changed[changed.index("--guidance") + 1:changed.index("--guidance") + 3] = ["0"]
    assert sample_cli.run(changed + ["--outdir", str(tmp_path / "w0")]) == 1
    assert "every guidance weight is 0" in capsys.readouterr().err
    assert not (tmp_path / "w0").exists()
    # APG's momentum is per example: 8 devices with batch 1 and 1 device with batch 7 write the
    # same images; a sweep over the rule's values is one program.
    model = load_trained(tiny_workdir)
    plans = [Plan.create(model, ["3", "7"], num_per_prompt=3, guidance=(0.0, 3.0), seed=2,
                         options=SampleOptions("ddim", 3),
                         guidance_rule=cfg.Rule(phi, (0.1, 0.9), None, cfg.APG(0.0, 4.0, beta)))
             for phi, beta in ((0.7, -0.5), (0.3, -0.8))]
    a = job_lib.run_job(plans[0], str(tmp_path / "b1"), batch_size=1, progress=False)
    b = job_lib.run_job(plans[0], str(tmp_path / "b7"), batch_size=7, progress=False,
                        devices=jax.devices()[:1])
    c = job_lib.run_job(plans[1], str(tmp_path / "other"), batch_size=1, progress=False)
    assert (a.compilations, c.compilations) == (1, 0)
    xa, ra = out_lib.load_images(str(tmp_path / "b1"))
    xb, rb = out_lib.load_images(str(tmp_path / "b7"))
    np.testing.assert_array_equal(xa, xb)
    assert ra == rb
    xc, _ = out_lib.load_images(str(tmp_path / "other"))
    assert np.abs(xa[6:].astype(int) - xc[6:].astype(int)).max() > 0  # the values do matter
