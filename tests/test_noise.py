"""The per-sample normal generator: the right law, independent streams, index-only dependence."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax.diffusion import noise


def _normal_cdf(x):
    return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def test_normal_has_the_standard_normal_law():
    z = np.asarray(noise.normal(jax.random.key(0), (400, 500)), np.float64).ravel()
    n = z.size
    assert abs(z.mean()) < 4 / math.sqrt(n)
    assert abs(z.var() - 1) < 4 * math.sqrt(2 / n)
    assert abs(np.mean(z ** 3)) < 4 * math.sqrt(15 / n)
    assert abs(np.mean(z ** 4) - 3) < 4 * math.sqrt(96 / n)
    # Kolmogorov-Smirnov distance against Phi: 1.95 / sqrt(n) is the 0.1% critical value.
    zs = np.sort(z[:20000])
    cdf = _normal_cdf(zs)
    ks = max(np.max(np.arange(1, zs.size + 1) / zs.size - cdf), np.max(cdf - np.arange(zs.size) / zs.size))
    assert ks < 1.95 / math.sqrt(zs.size)
    assert np.all(np.isfinite(z))


def test_streams_are_uncorrelated_and_distinct():
    keys = noise.per_sample_keys(jax.random.key(1), jnp.arange(64), noise.STEP_NOISE)
    a = np.asarray(noise.batch_normal(keys, (1000,), step=0), np.float64)
    b = np.asarray(noise.batch_normal(keys, (1000,), step=1), np.float64)
    corr = np.corrcoef(np.concatenate([a, b]))  # 128 streams
    off = corr[~np.eye(128, dtype=bool)]
    assert np.max(np.abs(off)) < 5 / math.sqrt(1000)
    # Neighbouring elements of one stream are uncorrelated too (two words per hash).
    assert abs(np.corrcoef(a[:, 0::2].ravel(), a[:, 1::2].ravel())[0, 1]) < 4 / math.sqrt(32000)


@pytest.mark.parametrize("shape", [(3,), (5, 7), (2, 3, 3)])
def test_odd_sizes_and_dtypes(shape):
    z = noise.normal(jax.random.key(2), shape, jnp.bfloat16)
    assert z.shape == shape and z.dtype == jnp.bfloat16
    # A sample's draw is a prefix-stable function of its key: the same key gives the same numbers.
    np.testing.assert_array_equal(np.asarray(noise.normal(jax.random.key(2), shape)),
                                  np.asarray(noise.normal(jax.random.key(2), shape)))


def test_initial_noise_depends_on_the_index_not_the_batch():
    full = noise.initial_noise(jax.random.key(5), (8, 4, 4, 3))
    part = noise.initial_noise(jax.random.key(5), (3, 4, 4, 3), sample_ids=jnp.array([2, 6, 7]))
    np.testing.assert_array_equal(np.asarray(part), np.asarray(full[jnp.array([2, 6, 7])]))
    with pytest.raises(ValueError, match=r"sample_ids must have shape \[B\] = \[3\]"):
        noise.initial_noise(jax.random.key(5), (3, 4), sample_ids=jnp.arange(4))


def test_any_key_implementation_works():
    z = noise.normal(jax.random.key(0, impl="rbg"), (10000,))
    assert abs(float(jnp.mean(z))) < 0.04 and abs(float(jnp.var(z)) - 1) < 0.06


def test_draws_do_not_depend_on_the_threefry_partitionable_flag():
    key = jax.random.fold_in(jax.random.key(3), 9)
    with jax.threefry_partitionable(True):
        a = np.asarray(noise.normal(key, (257,)))
    with jax.threefry_partitionable(False):
        b = np.asarray(noise.normal(key, (257,)))
    np.testing.assert_array_equal(a, b)


def test_the_uniform_grid_is_symmetric():
    """u = 2 m - (1 - 2^-23) over all 2^23 mantissas m: symmetric about 0, never +-1."""
    m = np.arange(2 ** 23, dtype=np.float64) * 2.0 ** -23
    u = (np.float32(2.0) * m.astype(np.float32) - noise._HALF_BIN).astype(np.float64)
    assert u.min() == -(1 - 2.0 ** -23) and u.max() == 1 - 2.0 ** -23
    np.testing.assert_array_equal(u, -u[::-1])
