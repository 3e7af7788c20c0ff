"""Independent float64 NumPy references written from the papers' equations, in their own form.

They share no code with t2i_jax: schedules from the published formulas, the sampler updates
as the papers print them (DDPM Alg. 2 in eps form, DDIM eq. 12, DPM-Solver++ Alg. 2 in lambda).
"""

import math

import numpy as np


def linear_alphas_cumprod(T):
    """DDPM: beta from 1e-4 to 0.02 at T = 1000, scaled by 1000 / T (Improved DDPM)."""
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    return np.cumprod(1 - betas)


def cosine_alphas_cumprod(T, s=0.008, max_beta=0.999):
    """Improved DDPM eq. 17: abar(t) = f(t) / f(0), f(t) = cos((t / T + s) / (1 + s) pi / 2)^2."""
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = [min(1 - f(t + 1) / f(t), max_beta) for t in range(T)]
    return np.cumprod(1 - np.array(betas))


def gaussian_eps(x, abar, mean, var):
    """Exact eps* for data N(mean, diag(var)): sqrt(1 - abar) (x - sqrt(abar) mean) / (abar var + 1 - abar)."""
    return math.sqrt(1 - abar) * (x - math.sqrt(abar) * mean) / (abar * var + 1 - abar)


def run_plms(abar_all, ts, x_T, eps_fn):
    """PLMS (PNDM eq. 12 with the DDIM transfer, diffusers' step_plms) over visited timesteps
    ts, each step to the next, the last to the data; the first step redone with the average of
    its eps and the eps at its end; float64."""
    def transfer(x, a_t, a_s, e):
        return math.sqrt(a_s) * (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t) + math.sqrt(1 - a_s) * e
    abar = lambda k: 1.0 if k >= len(ts) else abar_all[ts[k]]  # noqa: E731
    x = np.asarray(x_T, np.float64)
    e0 = eps_fn(x, abar(0))
    history = [e0]
    x1 = transfer(x, abar(0), abar(1), e0)
    if len(ts) == 1:
        return x1
    e1 = eps_fn(x1, abar(1))
    x = transfer(x, abar(0), abar(1), 0.5 * (e0 + e1))
    coefs = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12],
             4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    for k in range(1, len(ts)):
        history = ([eps_fn(x, abar(k))] + history)[:4]
        e = sum(c * h for c, h in zip(coefs[len(history)], history))
        x = transfer(x, abar(k), abar(k + 1), e)
    return x


def run(sampler, abar_all, ts, x_T, eps_fn, noises=None, eta=0.0, ddpm_variance="posterior"):
    """Runs a sampler over visited timesteps ts (decreasing), ending at the data; float64."""
    if sampler == "pndm":
        return run_plms(abar_all, ts, x_T, eps_fn)
    x = np.asarray(x_T, np.float64)
    prev_x0, prev_lam = None, None
    for k, t in enumerate(ts):
        last = k == len(ts) - 1
        a_t = abar_all[t]
        a_s = 1.0 if last else abar_all[ts[k + 1]]
        eps = eps_fn(x, a_t)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if sampler == "ddpm":  # DDPM Alg. 2 with the respaced alpha_t = abar_t / abar_s
            alpha = a_t / a_s
            beta = 1 - alpha
            mean = (x - beta / math.sqrt(1 - a_t) * eps) / math.sqrt(alpha)
            var = beta * (1 - a_s) / (1 - a_t) if ddpm_variance == "posterior" else beta
            x = mean + (0.0 if last else math.sqrt(var)) * noises[k]
        elif sampler == "ddim":  # DDIM eq. 12 with sigma from eq. 16
            sigma = eta * math.sqrt((1 - a_s) / (1 - a_t)) * math.sqrt(1 - a_t / a_s)
            x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - sigma ** 2) * eps
            if sigma > 0:
                x = x + sigma * noises[k]
        elif sampler == "dpmpp_2m":  # DPM-Solver++(2M), Lu et al. 2022 Alg. 2
            alpha_t, sigma_t = math.sqrt(a_t), math.sqrt(1 - a_t)
            lam_t = math.log(alpha_t / sigma_t)
            if last:
                x = x0  # to the data: lambda = +inf, the first-order update returns x0
            else:
                alpha_s, sigma_s = math.sqrt(a_s), math.sqrt(1 - a_s)
                lam_s = math.log(alpha_s / sigma_s)
                h = lam_s - lam_t
                if prev_x0 is None:
                    d = x0
                else:
                    r = (lam_t - prev_lam) / h
                    d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev_x0
                x = sigma_s / sigma_t * x - alpha_s * (math.exp(-h) - 1) * d
            prev_x0, prev_lam = x0, lam_t
        elif sampler in ("euler", "euler_a"):  # k-diffusion's sample_euler(_ancestral), in its
            # own variables: x_sigma = x / sqrt(abar), sigma = sqrt((1 - abar) / abar)
            sig_t = math.sqrt((1 - a_t) / a_t)
            sig_s = math.sqrt((1 - a_s) / a_s)
            xs = x / math.sqrt(a_t)
            d = (xs - x0) / sig_t                       # to_d(x, sigma, denoised)
            if sampler == "euler":
                xs = xs + d * (sig_s - sig_t)
            else:                                      # get_ancestral_step(sigma, sigma_next)
                up = min(sig_s, math.sqrt(sig_s ** 2 * (sig_t ** 2 - sig_s ** 2) / sig_t ** 2))
                down = math.sqrt(sig_s ** 2 - up ** 2)
                xs = xs + d * (down - sig_t) + (up * noises[k] if up > 0 else 0.0)
            x = xs * math.sqrt(a_s)
        else:
            raise ValueError(sampler)
    return x


def gaussian_chain_moments(sampler, abar_all, ts, mean, var, m_T, v_T, eta=0.0,
                           ddpm_variance="posterior"):
    """Returns the exact (mean, variance) of a sampler's output for N(mean, var) data, started
    from x_T ~ N(m_T, v_T): every update is affine in x plus Gaussian noise, so the moments
    propagate exactly. Works for ddpm and ddim (single-step updates)."""
    m, v = float(m_T), float(v_T)
    for k, t in enumerate(ts):
        last = k == len(ts) - 1
        a_t = abar_all[t]
        a_s = 1.0 if last else abar_all[ts[k + 1]]
        # eps = c1 x + c0 and x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t): affine in x
        c1 = math.sqrt(1 - a_t) / (a_t * var + 1 - a_t)
        c0 = -c1 * math.sqrt(a_t) * mean
        g1, g0 = (1 - math.sqrt(1 - a_t) * c1) / math.sqrt(a_t), -math.sqrt(1 - a_t) * c0 / math.sqrt(a_t)
        if sampler == "ddpm":
            alpha, beta = a_t / a_s, 1 - a_t / a_s
            p1 = (1 - beta / math.sqrt(1 - a_t) * c1) / math.sqrt(alpha)
            p0 = -beta / math.sqrt(1 - a_t) * c0 / math.sqrt(alpha)
            noise_var = 0.0 if last else (beta * (1 - a_s) / (1 - a_t) if ddpm_variance == "posterior" else beta)
        elif sampler == "euler_a":  # x_s = sqrt(a_s) (x / sqrt(a_t) + (down - sig_t) eps + up z)
            sig_t, sig_s = math.sqrt((1 - a_t) / a_t), math.sqrt((1 - a_s) / a_s)
            up = math.sqrt(sig_s ** 2 * (sig_t ** 2 - sig_s ** 2) / sig_t ** 2)
            down = math.sqrt(sig_s ** 2 - up ** 2)
            p1 = math.sqrt(a_s) * (1 / math.sqrt(a_t) + (down - sig_t) * c1)
            p0 = math.sqrt(a_s) * (down - sig_t) * c0
            noise_var = a_s * up ** 2
        else:
            sigma2 = eta ** 2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
            d = math.sqrt(1 - a_s - sigma2)
            p1, p0 = math.sqrt(a_s) * g1 + d * c1, math.sqrt(a_s) * g0 + d * c0
            noise_var = sigma2
        m, v = p1 * m + p0, p1 * p1 * v + noise_var
    return m, v
