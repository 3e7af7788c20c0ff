"""diffusers' scheduler_config.json read as the project's chain, against diffusers' own sampling
loops (tests/fixtures/sd/scheduler_chains.npz, made by make_scheduler_chains.py with torch +
diffusers in a separate virtualenv): the same timesteps, and the same output of a toy model's
chain, for DDIM, DPM-Solver++(2M) and Euler on SD 1.5's and SD 2.1-v's configs, every spacing,
set_alpha_to_one both ways, zero-terminal-SNR rescaling and the three beta schedules."""

import json
import re
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax.diffusion import guidance, samplers
from t2i_jax.diffusion.diffusers_scheduler import DiffusersScheduler

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "sd", "scheduler_chains.npz")
CHAINS = dict(np.load(FIXTURE))
CASES = [f"case{i}" for i in range(int(CHAINS["meta.count"]))]


def _toy(x, t, cond):
    """The fixture's model: tanh(0.5 x) (0.5 + t / 2000), read as the config's prediction."""
    del cond
    t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.tanh(0.5 * x) * (0.5 + t / 2000.0)


@pytest.mark.parametrize("case", CASES)
def test_the_chain_equals_diffusers_loop(case):
    config = json.loads(str(CHAINS[f"{case}.config"]))
    sampler, num_steps = str(CHAINS[f"{case}.sampler"]), int(CHAINS[f"{case}.steps"])
    sched = DiffusersScheduler.from_config(config)
    schedule = sched.schedule()
    steps = sched.steps(sampler, num_steps, schedule)
    np.testing.assert_array_equal(np.asarray(steps.t, np.float64), CHAINS[f"{case}.timesteps"])
    denoiser = guidance.model_denoiser(_toy, schedule, sched.prediction)
    x_T = jnp.asarray(CHAINS[f"{case}.x_T"])
    got = jax.jit(lambda x: samplers.chain(denoiser, schedule, x, sampler=sampler,
                                           prediction=sched.prediction, steps=steps))(x_T)
    want = CHAINS[f"{case}.out"]
    # Both sides compute in float32 (diffusers from float32 betas, here from float64-derived
    # tables): their rounding differs by ~1e-6 relative per step; Euler on cosine betas starts
    # at sigma 2e4, whose x / sqrt(abar) carries that rounding times 1e4.
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-4 * scale)


def _config(**overrides):
    base = json.loads(str(CHAINS["case0.config"]))  # SD 1.5's PNDMScheduler
    return dict(base, **overrides)


def test_the_folder_names_its_sampler():
    assert DiffusersScheduler.from_config(_config()).default_sampler == "pndm"
    assert DiffusersScheduler.from_config(_config(_class_name="DDIMScheduler")).default_sampler == "ddim"
    assert DiffusersScheduler.from_config(
        _config(_class_name="EulerAncestralDiscreteScheduler")).default_sampler == "euler_a"


@pytest.mark.parametrize("overrides,words", [
    (dict(_class_name="LMSDiscreteScheduler"), "_class_name='LMSDiscreteScheduler' is a scheduler"),
    (dict(_class_name="DDIMScheduler", clip_sample=True), "clip_sample=True is not followed"),
    (dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++"),
     "algorithm_type='sde-dpmsolver++'"),
    (dict(_class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True), "use_karras_sigmas=True"),
    (dict(_class_name="EulerDiscreteScheduler", timestep_type="continuous"), "timestep_type='continuous'"),
    (dict(prediction_type="flow"), "prediction_type='flow'"),
    (dict(_class_name="DDPMScheduler", variance_type="fixed_large"),
     "variance_type='fixed_large' is not followed"),
    (dict(beta_schedule="exp"), "beta_schedule='exp'"),
    (dict(shift_terminal=0.5), "shift_terminal=0.5 is a field this project does not know"),
])
def test_a_field_the_chain_cannot_follow_is_refused_by_name(overrides, words):
    with pytest.raises(ValueError, match=re.escape("scheduler_config.json: " + words)):
        DiffusersScheduler.from_config(_config(**overrides))


def test_a_switch_that_is_off_is_not_refused_and_another_samplers_fields_are_ignored():
    # diffusers' from_config ignores fields of other classes: a DDIM run reads no solver_order
    sched = DiffusersScheduler.from_config(_config(_class_name="DDIMScheduler", solver_order=3,
                                                   some_future_switch=False))
    sched.steps("ddim", 10)
    with pytest.raises(ValueError, match="solver_order=3"):
        sched.steps("dpmpp_2m", 10)


def test_pndm_with_its_runge_kutta_warm_up_or_a_v_model_is_refused():
    with pytest.raises(ValueError, match="skip_prk_steps=False"):
        DiffusersScheduler.from_config(_config(skip_prk_steps=False))
    with pytest.raises(ValueError, match="prediction_type='v_prediction' is not followed by pndm"):
        DiffusersScheduler.from_config(_config(prediction_type="v_prediction"))
    v_ddim = DiffusersScheduler.from_config(_config(_class_name="DDIMScheduler",
                                                    prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="is not followed by pndm"):
        v_ddim.steps("pndm", 10)


def test_set_alpha_to_one_false_ends_the_chain_at_alphas_cumprod_0():
    sched = DiffusersScheduler.from_config(_config(_class_name="DDIMScheduler"))
    schedule = sched.schedule()
    steps = sched.steps("ddim", 10, schedule)
    assert steps.s[-1] == -1 and steps.final_alpha_bar == pytest.approx(
        float(schedule.alphas_cumprod[0]))
    one = DiffusersScheduler.from_config(_config(_class_name="DDIMScheduler", set_alpha_to_one=True))
    assert one.steps("ddim", 10).final_alpha_bar == 1.0
