"""Exact denoisers for Gaussian-mixture data: the optimal eps(x_t, t, y) in closed form.

If x_0 ~ sum_k pi_k N(mu_k, diag(var_k)), then x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps has
p(x_t) = sum_k pi_k N(sqrt(abar) mu_k, diag(abar var_k + 1 - abar)), and the minimiser of the
eps-prediction loss is eps*(x_t, t) = -sqrt(1 - abar) grad log p(x_t) (Tweedie; Song et al. 2021).
Components carry class labels, so the conditional eps*(x_t, t, y), the unconditional one
(label NULL_LABEL) and the exact noisy classifier log p(y | x_t) are all available. A sampler fed
these functions must reproduce the mixture: that is how the samplers are tested.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from t2i_jax.diffusion.schedules import Schedule

NULL_LABEL = -1  # the null condition: no class, the whole mixture


@struct.dataclass
class GaussianMixture:
    """A mixture of diagonal Gaussians: weights [K] (sum 1), means [K, D], variances [K, D],
    labels int [K] (the class each component belongs to)."""
    weights: jax.Array
    means: jax.Array
    variances: jax.Array
    labels: jax.Array

    @classmethod
    def create(cls, weights, means, variances, labels=None) -> "GaussianMixture":
        weights = np.asarray(weights, np.float64)
        means = np.atleast_2d(np.asarray(means, np.float64))
        variances = np.broadcast_to(np.asarray(variances, np.float64), means.shape)
        if weights.shape != (means.shape[0],) or not np.isclose(weights.sum(), 1.0):
            raise ValueError("weights must have shape [K] and sum to 1.")
        labels = np.arange(means.shape[0]) if labels is None else np.asarray(labels)
        f32 = lambda a: jnp.asarray(a, jnp.float32)
        return cls(f32(weights / weights.sum()), f32(means), f32(variances), jnp.asarray(labels, jnp.int32))

    def sample(self, key: jax.Array, n: int, alpha_bar=1.0, label=None):
        """Returns (x [n, D], component index [n]) drawn from the marginal at abar (1: the data),
        restricted to the components of class `label` if it is given."""
        k_comp, k_x = jax.random.split(key)
        logits = jnp.log(self.weights)
        if label is not None:
            logits = jnp.where(self.labels == label, logits, -jnp.inf)
        comp = jax.random.categorical(k_comp, logits, shape=(n,))
        mean = jnp.sqrt(alpha_bar) * self.means[comp]
        var = alpha_bar * self.variances[comp] + (1.0 - alpha_bar)
        return mean + jnp.sqrt(var) * jax.random.normal(k_x, mean.shape), comp

    def component_log_joint(self, x_t: jax.Array, alpha_bar, one_minus_alpha_bar):
        """Returns log pi_k + log N(x_t; sqrt(abar) mu_k, abar var_k + 1 - abar) [B, K] for x_t [B, D]."""
        ab, om = alpha_bar[:, None, None], one_minus_alpha_bar[:, None, None]
        var = ab * self.variances[None] + om  # [B, K, D]
        diff = x_t[:, None, :] - jnp.sqrt(ab) * self.means[None]
        log_n = -0.5 * jnp.sum(diff * diff / var + jnp.log(2 * jnp.pi * var), axis=-1)
        return jnp.log(self.weights)[None] + log_n, diff, var

    def denoise(self, x_t, alpha_bar, one_minus_alpha_bar, label=None):
        """Returns (grad_x log p(x_t | y), E[x_0 | x_t, y]), each [B, D]; y = label [B], or None or
        NULL_LABEL for the unconditional mixture. Both are finite for every abar in [0, 1]."""
        log_joint, diff, var = self.component_log_joint(x_t, alpha_bar, one_minus_alpha_bar)
        if label is not None:
            keep = (label[:, None] == NULL_LABEL) | (self.labels[None] == label[:, None])  # [B, K]
            log_joint = jnp.where(keep, log_joint, -jnp.inf)
        resp = jax.nn.softmax(log_joint, axis=-1)[..., None]  # [B, K, 1]
        score = jnp.sum(resp * (-diff / var), axis=1)
        # E[x0 | x_t, k] = mu_k + sqrt(abar) var_k / (abar var_k + 1 - abar) (x_t - sqrt(abar) mu_k)
        gain = jnp.sqrt(alpha_bar)[:, None, None] * self.variances[None] / var
        x0_mean = jnp.sum(resp * (self.means[None] + gain * diff), axis=1)
        return score, x0_mean

    def posterior_variance(self, x_t, alpha_bar, one_minus_alpha_bar, label=None):
        """Returns Var[x_0 | x_t, y] per dimension [B, D] (y as in `denoise`): with the
        responsibilities r_k, sum_k r_k (v_k + m_k^2) - (sum_k r_k m_k)^2, where m_k and
        v_k = var_k (1 - abar) / (abar var_k + 1 - abar) are component k's posterior mean and
        variance (the law of total variance)."""
        log_joint, diff, var = self.component_log_joint(x_t, alpha_bar, one_minus_alpha_bar)
        if label is not None:
            keep = (label[:, None] == NULL_LABEL) | (self.labels[None] == label[:, None])  # [B, K]
            log_joint = jnp.where(keep, log_joint, -jnp.inf)
        resp = jax.nn.softmax(log_joint, axis=-1)[..., None]  # [B, K, 1]
        gain = jnp.sqrt(alpha_bar)[:, None, None] * self.variances[None] / var
        m = self.means[None] + gain * diff  # [B, K, D]
        v_k = self.variances[None] * one_minus_alpha_bar[:, None, None] / var
        mean = jnp.sum(resp * m, axis=1, keepdims=True)
        # the spread of the component means about their average: no cancellation of large squares
        return jnp.sum(resp * (v_k + jnp.square(m - mean)), axis=1)

    def class_log_prob(self, x_t, alpha_bar, one_minus_alpha_bar, label):
        """Returns the exact noisy classifier log p(y = label | x_t) [B]."""
        log_joint, _, _ = self.component_log_joint(x_t, alpha_bar, one_minus_alpha_bar)
        mine = jnp.where(self.labels[None] == label[:, None], log_joint, -jnp.inf)
        return jax.nn.logsumexp(mine, axis=-1) - jax.nn.logsumexp(log_joint, axis=-1)


def _flat_alpha(schedule: Schedule, x_t, t):
    """x_t flattened [B, D], abar [B] and 1 - abar [B] at t (fractional t: Schedule.at)."""
    flat = x_t.reshape(x_t.shape[0], -1)
    return (flat, schedule.at("alphas_cumprod", t, 1),
            jnp.square(schedule.at("sqrt_one_minus_alphas_cumprod", t, 1)))


def flow_fn(mixture: GaussianMixture, schedule: Schedule):
    """Returns denoise_fn(x_tau [B, ...], t [B], label) -> the exact flow-matching velocity
    u* = E[eps - x0 | x_tau] at the flow path's point x_tau = (1 - tau) x0 + tau eps, the
    x_t / n of the VP variables (forward.model_input): finite for every tau in [0, 1]."""
    def denoise(x_tau, t, label):
        flat, ab, om = _flat_alpha(schedule, x_tau, t)
        x_t = flat * (jnp.sqrt(ab) + jnp.sqrt(om))[:, None]  # back to the VP variables
        score, x0_mean = mixture.denoise(x_t, ab, om, label)
        eps = -jnp.sqrt(om)[:, None] * score
        return (eps - x0_mean).reshape(x_tau.shape)
    return denoise


def eps_fn(mixture: GaussianMixture, schedule: Schedule):
    """Returns denoise_fn(x_t [B, ...], t [B], label [B] or None) -> the exact eps* [B, ...]."""
    def denoise(x_t, t, label):
        flat, ab, om = _flat_alpha(schedule, x_t, t)
        score, _ = mixture.denoise(flat, ab, om, label)
        return (-jnp.sqrt(om)[:, None] * score).reshape(x_t.shape)
    return denoise


def v_fn(mixture: GaussianMixture, schedule: Schedule):
    """Returns denoise_fn -> the exact v* = sqrt(abar) eps* - sqrt(1 - abar) E[x0 | x_t], finite
    at abar = 0 (zero terminal SNR), where it is -E[x0 | y]."""
    def denoise(x_t, t, label):
        flat, ab, om = _flat_alpha(schedule, x_t, t)
        score, x0_mean = mixture.denoise(flat, ab, om, label)
        eps = -jnp.sqrt(om)[:, None] * score
        return (jnp.sqrt(ab)[:, None] * eps - jnp.sqrt(om)[:, None] * x0_mean).reshape(x_t.shape)
    return denoise


def x0_fn(mixture: GaussianMixture, schedule: Schedule):
    """Returns denoise_fn -> the exact x0* = E[x0 | x_t, y] (the posterior mean, Tweedie)."""
    def denoise(x_t, t, label):
        flat, ab, om = _flat_alpha(schedule, x_t, t)
        return mixture.denoise(flat, ab, om, label)[1].reshape(x_t.shape)
    return denoise


def classifier_fn(mixture: GaussianMixture, schedule: Schedule):
    """Returns guidance_fn(x_t, t, label) -> the exact log p(label | x_t) [B]."""
    def log_prob(x_t, t, label):
        flat, ab, om = _flat_alpha(schedule, x_t, t)
        return mixture.class_log_prob(flat, ab, om, label)
    return log_prob
