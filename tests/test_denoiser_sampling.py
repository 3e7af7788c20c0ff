"""The Denoiser inside the sampler: the text is encoded once, outside the scan, and that changes
nothing in the samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax import conditioning
from t2i_jax.diffusion import make_schedule, samplers
from t2i_jax.models import denoiser, text
from t2i_jax.models.unet import UNetConfig

CFG = denoiser.ModelConfig(
    unet=UNetConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                    num_heads=2, num_groups=8),
    text=text.TextConfig(max_length=10, width=32, num_layers=1, num_heads=2))


@pytest.mark.slow
def test_text_is_encoded_once_and_samples_equal_the_per_step_model(monkeypatch):
    model = denoiser.Denoiser(CFG)
    schedule = make_schedule("linear", 1000)
    cond = conditioning.text_condition(["red", "blue", "数字", ""], 10)
    null = conditioning.null_condition(1, max_length=10)
    x_T = samplers.initial_noise(jax.random.key(0), (4, 8, 8, 3))
    params = jax.jit(model.init)(jax.random.key(1), x_T, jnp.zeros((4,), jnp.int32), cond)
    params = jax.tree_util.tree_map(  # give the zero-initialised output layers weights
        lambda a: a + 0.02 * jax.random.normal(jax.random.key(a.size), a.shape) if a.ndim > 1 else a, params)

    calls = []
    original = text.TextEncoder.__call__
    monkeypatch.setattr(text.TextEncoder, "__call__", lambda self, *a: calls.append(1) or original(self, *a))

    inside_sampler = []

    @jax.jit
    def encoded_once(params, x_T):
        enc = denoiser.encode(model, params, cond)
        null_enc = denoiser.encode(model, params, null)
        before = len(calls)
        out = samplers.sample(denoiser.denoise_fn(model, params), schedule, x_T, cond=enc,
                              null_cond=null_enc, guidance_weight=2.0, num_steps=6)
        inside_sampler.append(len(calls) - before)
        return out

    fast = encoded_once(params, x_T)
    assert len(calls) == 2 and inside_sampler == [0]  # prompts and null once; never in the loop

    @jax.jit
    def encoded_every_step(params, x_T):
        fn = lambda x, t, c: model.apply(params, x, t, c)  # Condition in, text encoder inside
        return samplers.sample(fn, schedule, x_T, cond=cond, null_cond=null, guidance_weight=2.0,
                               num_steps=6)

    slow = encoded_every_step(params, x_T)
    assert len(calls) > 2  # here the encoder sits in the scan body, run at every step
    scale = np.abs(np.asarray(slow)).max()
    assert scale > 1e-2
    # Two compilations of the same math: equal up to float32 rounding carried through the chain.
    np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), rtol=1e-4, atol=1e-5 * scale)
