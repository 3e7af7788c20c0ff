"""Sampling does not depend on devices, batch size or recompilation: invariance tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from t2i_jax.diffusion import analytic, make_schedule, samplers

SCHEDULE = make_schedule("cosine", 200)
MIXTURE = analytic.GaussianMixture.create(
    [0.5, 0.5], [[-1.0, 0.5, 0.0], [1.0, -0.5, 0.5]], [[0.3, 0.5, 0.4], [0.6, 0.2, 0.4]])
EPS = analytic.eps_fn(MIXTURE, SCHEDULE)
NULL = jnp.full((1,), analytic.NULL_LABEL, jnp.int32)
# Programs compiled for different shapes or shardings round differently in the last bits (XLA
# vectorises loops differently); the chain amplifies that a little. 1e-4 is 1/80 of one 8-bit
# grey level of a [-1, 1] image: the same picture. A real difference in randomness moves ~1.
ATOL = 1e-4


def _image_eps(x, t, label):
    """The mixture's exact eps on images [B, 4, 4, 3]: each row of 3 is a sample of the mixture."""
    rows = x.reshape(x.shape[0], -1, 3)  # [B, 16, 3]
    eps = jax.vmap(lambda r: EPS(r, t, label), in_axes=1, out_axes=1)(rows)
    return eps.reshape(x.shape)


def _guided(sampler, **kw):
    def run(x_T, labels, w, rng, ids=None):
        return samplers.sample(_image_eps, SCHEDULE, x_T, cond=labels, null_cond=NULL,
                               guidance_weight=w, sampler=sampler, num_steps=25, rng=rng,
                               sample_ids=ids, **kw)
    return jax.jit(run)


def _inputs(batch=8):
    x_T = samplers.initial_noise(jax.random.key(0), (batch, 4, 4, 3))
    labels = jnp.arange(batch, dtype=jnp.int32) % 2
    return x_T, labels


@pytest.mark.slow
@pytest.mark.parametrize("sampler,kw", [("ddpm", {}), ("ddim", {"eta": 0.5}), ("dpmpp_2m", {})])
@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_eight_devices_equal_one(sampler, kw, axis_type):
    x_T, labels = _inputs(16)
    run = _guided(sampler, **kw)
    one = run(x_T, labels, 2.0, jax.random.key(7))
    types = (jax.sharding.AxisType.Explicit if axis_type == "explicit" else jax.sharding.AxisType.Auto,)
    mesh = jax.make_mesh((8,), ("data",), axis_types=types)
    sharding = NamedSharding(mesh, P("data"))
    with jax.set_mesh(mesh):
        eight = run(jax.device_put(x_T, sharding), jax.device_put(labels, sharding), 2.0,
                    jax.random.key(7))
    assert len(eight.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(eight), np.asarray(one), rtol=0, atol=ATOL)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_batch_of_one_equals_batch_of_eight(sampler):
    x_T, labels = _inputs(8)
    run = _guided(sampler, eta=1.0)
    full = run(x_T, labels, 1.5, jax.random.key(3), jnp.arange(8))
    for i in (0, 5, 7):
        single = run(x_T[i:i + 1], labels[i:i + 1], 1.5, jax.random.key(3), jnp.array([i]))
        np.testing.assert_allclose(np.asarray(single[0]), np.asarray(full[i]), rtol=0, atol=ATOL)
    # A different per-sample id gives a different draw: the ids are what the noise depends on.
    other = run(x_T[:1], labels[:1], 1.5, jax.random.key(3), jnp.array([1]))
    assert np.max(np.abs(np.asarray(other[0] - full[0]))) > 1e-2


def test_guidance_weight_seed_and_eta_do_not_retrace():
    traces = []

    def counted_eps(x, t, label):
        traces.append(x.shape)
        return _image_eps(x, t, label)

    @jax.jit
    def run(x_T, labels, w, eta, rng):
        return samplers.sample(counted_eps, SCHEDULE, x_T, cond=labels, null_cond=NULL,
                               guidance_weight=w, eta=eta, sampler="ddim", num_steps=10, rng=rng)

    x_T, labels = _inputs(4)
    outs = [run(x_T, labels, w, eta, jax.random.key(seed))
            for w, eta, seed in [(0.0, 0.0, 0), (3.0, 0.0, 0), (3.0, 1.0, 1), (7.5, 0.3, 2)]]
    # One trace, and in it ONE model call per step on the 2B conditional + null rows.
    assert traces == [(8, 4, 4, 3)]
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])


def test_sweep_over_guidance_weights_in_one_compile():
    traces = []

    def counted_eps(x, t, label):
        traces.append(x.shape)
        return _image_eps(x, t, label)

    def run(w, x_T, labels):
        return samplers.sample(counted_eps, SCHEDULE, x_T, cond=labels, null_cond=NULL,
                               guidance_weight=w, num_steps=10)

    x_T, labels = _inputs(4)
    weights = jnp.array([0.0, 1.0, 4.0])
    swept = jax.jit(jax.vmap(run, in_axes=(0, None, None)))(weights, x_T, labels)
    assert len(traces) == 1
    single = jax.jit(run)
    for i, w in enumerate(weights):
        np.testing.assert_allclose(np.asarray(swept[i]), np.asarray(single(w, x_T, labels)),
                                   rtol=0, atol=ATOL)
    # A per-sample weight [B] does the same sweep inside one batch.
    per_sample = single(jnp.array([0.0, 1.0, 4.0, 4.0]), x_T, labels)
    np.testing.assert_allclose(np.asarray(per_sample[1]), np.asarray(swept[1, 1]), atol=ATOL)
