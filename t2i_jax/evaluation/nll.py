"""Negative log-likelihood in bits per dimension: the variational bound summed over ALL T terms.

    python -m t2i_jax.evaluation.nll --workdir runs/digits_learned_sigma [--limit N]

  bits/dim = L_0 + sum_{t=1}^{T-1} L_t + L_T  (Improved DDPM's reported number; diffusion/vlb.py)

on the test split, each term from one draw of x_t ~ q(x_t | x0) (noise from the example's index
and t, so the number does not depend on the batch or device count), with the model's learned
variance, or for a fixed-variance model beta~ ("posterior") or beta (--variance). A text- or
label-conditional model's number is log p(x0 | its caption) (the test example's first caption;
--unconditional: the null condition). Writes WORKDIR/nll/nll_<variance>[_uncond].json (--out).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax import files
from t2i_jax.diffusion import forward, noise, vlb
from t2i_jax.errors import ArgumentParser

NLL_STREAM = 23  # x_t's noise: fold_in(fold_in(key(seed), 23), t) per example index
VARIANCES = ("learned", "posterior", "beta")


def default_variance(family) -> str:
    return "learned" if family.learn_sigma else "posterior"


def make_terms_fn(family, variance: str, clip_denoised: bool = True):
    """Returns terms(params, inputs, cond, x0 [B, ...], ids [B], rng) -> [T, B]: every L_t in
    bits/dim (t = 0: the decoder term), one scan over t, one model call per t. clip_denoised:
    x0_hat clipped to [-1, 1] before the posterior mean, as improved-diffusion's image_nll.py
    (calc_bpd_loop, clip_denoised=True) computes the numbers IDDPM reports; the bound holds
    either way."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}.")
    if variance == "learned" and not family.learn_sigma:
        raise ValueError("--variance learned needs a model trained with a learned variance "
                         "(diffusion.learn_sigma); this one's is fixed: use posterior or beta.")
    schedule, T = family.schedule, family.schedule.num_timesteps
    if family.schedule.zero_terminal_snr and family.prediction == "eps":
        raise ValueError("this is an eps model on a zero-terminal-SNR schedule: its "
                         "x0_hat at t = T-1 is eps / sqrt(alpha_bar) = inf, so the VLB term "
                         "L_{T-1} is undefined. Bits/dim need a v- or x0-prediction model there.")
    learn_sigma = family.learn_sigma

    @jax.jit
    def terms(params, inputs, cond, x0, ids, rng):
        enc = family.encode(params, cond, inputs)
        denoise = family.denoise_fn(params)
        keys = noise.per_sample_keys(rng, ids, 0)

        def one(_, t):
            tb = jnp.full((x0.shape[0],), t, jnp.int32)
            eps = noise.batch_normal(keys, x0.shape[1:], x0.dtype, step=t)
            x_t = forward.q_sample(schedule, x0, tb, eps)
            out = denoise(x_t, tb, enc)
            mean_out, v = vlb.split_output(out, learn_sigma)
            _, x0_hat = forward.eps_and_x0(mean_out.astype(jnp.float32), x_t,
                                           schedule.at("alphas_cumprod", tb, x0.ndim),
                                           family.prediction)
            if clip_denoised:
                x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
            if variance == "learned":
                log_var = vlb.model_log_variance(schedule, v.astype(jnp.float32), tb)
            else:
                log_var = vlb.fixed_log_variance(schedule, tb, x0.ndim, variance)
            return None, vlb.vb_terms_bpd(schedule, x0, x_t, tb, x0_hat, log_var)

        _, per_t = jax.lax.scan(one, None, jnp.arange(T))
        return per_t  # [T, B]
    return terms


def evaluate(trained, *, limit: Optional[int] = None, batch_size: int = 64, seed: int = 0,
             variance: Optional[str] = None, unconditional: bool = False,
             split: Optional[str] = None, clip_denoised: bool = True) -> dict:
    """Returns the bits/dim of the test split (mean and standard error over examples, and each
    part: decoder L_0, the KL terms, prior L_T; the mean L_t per quarter of the chain)."""
    from t2i_jax import data as data_lib
    family = trained.family
    if family.latent or family.not_pixels is not None:
        raise ValueError(f"{trained.workdir} is not a pixel diffusion model: bits/dim of the "
                         "8-bit discretised decoder apply to pixel models only.")
    if not family.generates:
        raise ValueError(f"{trained.workdir} holds a {family.name} model, not a diffusion model.")
    if family.inpaint or family.stage_input is not None:  # SR stages, decoders
        raise ValueError(f"{trained.workdir} holds a {family.name}"
                         + (" inpainting" if family.inpaint else "")
                         + " model: bits/dim are reported for text/label/unconditional pixel "
                         "diffusion models.")
    variance = variance or default_variance(family)
    terms_fn = make_terms_fn(family, variance, clip_denoised)
    split = split or data_lib.get_spec(trained.config.data.name).splits[1]
    data = data_lib.load_split(trained.config.data, split, limit=limit)
    x_all = np.asarray(data["image"], np.float32)
    vlb.check_num_bins(x_all)
    n = len(x_all)
    if n == 0:
        raise ValueError(f"split {split!r} is empty.")
    prompts = [""] * n if unconditional else list(
        data["caption"] if family.conditioning.kind == "text" else
        [family.conditioning.class_names[int(y)] for y in data["label"]]
        if family.conditioning.kind == "label" else [""] * n)
    inputs = family.sampling_inputs()
    rng = jax.random.fold_in(jax.random.key(seed), NLL_STREAM)
    prior_fn = jax.jit(lambda x: vlb.prior_bpd(family.schedule, x))
    per_t, prior = [], []
    b = max(1, min(batch_size, n))
    from tqdm import tqdm
    for start in tqdm(range(0, n, b), desc="nll", unit="batch", dynamic_ncols=True,
                      disable=not sys.stderr.isatty()):
        idx = np.arange(start, min(start + b, n))
        full = np.concatenate([idx, np.full(b - len(idx), idx[-1])])  # one program
        cond = family.conditioning.of_prompts([prompts[i] for i in full])
        x = jnp.asarray(x_all[full])
        out = np.asarray(terms_fn(trained.params, inputs, cond, x, jnp.asarray(full, jnp.int32),
                                  rng))
        per_t.append(out[:, :len(idx)])
        prior.append(np.asarray(prior_fn(x))[:len(idx)])
    per_t = np.concatenate(per_t, axis=1)                                     # [T, N]
    prior = np.concatenate(prior)                                             # [N]
    total = per_t.sum(0) + prior                                              # [N]
    T = per_t.shape[0]
    quarters = np.array_split(np.arange(T), 4)
    return dict(workdir=trained.workdir, checkpoint_step=trained.step, params=trained.kind,
                variance=variance, clip_denoised=bool(clip_denoised), conditional=not unconditional and family.conditioning.guidable,
                split=split, num_examples=int(n), num_timesteps=int(T), seed=seed,
                bits_per_dim=float(total.mean()),
                stderr=float(total.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
                decoder_bpd=float(per_t[0].mean()), kl_terms_bpd=float(per_t[1:].sum(0).mean()),
                prior_bpd=float(prior.mean()),
                mean_term_by_quarter=[float(per_t[q].mean()) for q in quarters])


def summary(res: dict) -> str:
    return (f"{res['workdir']} (step {res['checkpoint_step']}, {res['params']} parameters, "
            f"variance {res['variance']}, {'p(x | caption)' if res['conditional'] else 'p(x)'}"
            f"{'' if res['clip_denoised'] else ', x0_hat unclipped'}): "
            f"{res['bits_per_dim']:.4f} +- {res['stderr']:.4f} bits/dim on {res['num_examples']} "
            f"{res['split']} images, T = {res['num_timesteps']}\n"
            f"  decoder L_0 {res['decoder_bpd']:.4f}, KL terms {res['kl_terms_bpd']:.4f}, prior L_T "
            f"{res['prior_bpd']:.2e}")


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m t2i_jax.evaluation.nll", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a pixel diffusion model's training workdir")
    p.add_argument("--variance", choices=VARIANCES,
                   help="default: learned for a learn_sigma model, else posterior (beta~)")
    p.add_argument("--limit", type=int, help="the first N test images (default: all)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unconditional", action="store_true",
                   help="log p(x) through the null condition instead of log p(x | caption)")
    p.add_argument("--no_clip_denoised", action="store_true",
                   help="do not clip x0_hat to [-1, 1] in the posterior mean (IDDPM's reported "
                        "numbers clip it; the bound holds either way)")
    p.add_argument("--params", choices=("ema", "raw"), default="ema")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--out", help="default: WORKDIR/nll")
    a = p.parse_args(argv)
    if a.limit is not None and a.limit < 1:
        p.error(f"--limit must be >= 1, got {a.limit}.")
    if a.batch_size < 1:
        p.error(f"--batch_size must be >= 1, got {a.batch_size}.")
    from t2i_jax.xla_flags import apply_tuned_flags
    apply_tuned_flags()
    from t2i_jax.sampling.load import load_trained
    try:
        trained = load_trained(a.workdir, step=a.step, params=a.params)
        variance = a.variance or default_variance(trained.family)
        make_terms_fn(trained.family, variance)  # refusals before any work
        out = files.check_writable_dir(a.out or os.path.join(trained.workdir, "nll"), "--out")
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    try:
        res = evaluate(trained, limit=a.limit, batch_size=a.batch_size, seed=a.seed,
                       variance=variance, unconditional=a.unconditional,
                       clip_denoised=not a.no_clip_denoised)
    except ValueError as e:
        p.error(str(e))
    name = (f"nll_{variance}{'_uncond' if a.unconditional else ''}"
            f"{'_noclip' if a.no_clip_denoised else ''}.json")
    files.write_json(os.path.join(out, name), res)
    print(summary(res))
    print(f"[t2i_jax] wrote {os.path.join(out, name)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
