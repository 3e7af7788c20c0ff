"""The diffusion family's Improved DDPM options, recomputed by hand: L_hybrid with the learned
variance (the VLB term through a stop-gradient on the mean), GLIDE's mask-conditioned input, the
config checks, and the bits/dim evaluation against its definition."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax import families
from t2i_jax.diffusion import forward, inpainting, vlb

from runs import tiny  # noqa: E402


def _batch(fam, data_dir, n=8):
    from t2i_jax import data as data_lib
    from t2i_jax.conditioning import tokenizers
    cfg = fam.config
    cfg.data.data_dir = data_dir
    d = data_lib.load_split(cfg.data, "train", limit=n)
    tk = tokenizers.tokenize(d["caption"], cfg.model.text.max_length)
    return dict(image=jnp.asarray(d["image"]), tokens=jnp.asarray(tk.ids),
                mask=jnp.asarray(tk.mask))


def _perturbed(params, scale=0.05):
    leaves, tdef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return jax.tree_util.tree_unflatten(tdef, [p + scale * jax.random.normal(k, p.shape)
                                              for p, k in zip(leaves, keys)])


@pytest.mark.slow
def test_the_hybrid_loss_is_l_simple_plus_lambda_t_l_vlb_with_the_mask_as_input(data_dir):
    """Per example: t, noise, GLIDE's random mask and CFG's dropout from the step's streams; the
    network sees [x_t, x0 * mask, mask]; loss = mean (eps - eps_hat)^2 + 0.001 T L_t(bits/dim),
    L_t from the posterior of the stop-gradient x0_hat and the learned variance."""
    fam = families.build(tiny(data_dir, "learned_sigma_inpaint"))
    assert fam.learn_sigma and fam.inpaint and fam.model.cfg.unet.out_channels == 2
    params = _perturbed(fam.init_params(jax.random.key(1)))
    batch = _batch(fam, data_dir)
    key, hp = jax.random.key(3), fam.hparams()
    per_example, metrics = fam.loss(params, batch, key, hp)
    x0, n, T = batch["image"], 8, fam.schedule.num_timesteps
    t = jax.random.randint(jax.random.fold_in(key, 0), (n,), 0, T)
    noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
    x_t = forward.q_sample(fam.schedule, x0, t, noise)
    mask = inpainting.random_masks(jax.random.fold_in(key, 4), n, 16, 16)
    drop = jax.random.bernoulli(jax.random.fold_in(key, 2), fam.loss_cfg.p_uncond, (n,))
    cond = fam.conditioning.of_batch(batch).replace(known=x0, known_mask=mask)
    null = fam.null()
    cond = cond.replace(tokens=jnp.where(drop[:, None], null.tokens, cond.tokens),
                        mask=jnp.where(drop[:, None], null.mask, cond.mask),
                        is_null=drop)
    out = fam.model.apply(params, x_t, t, cond, deterministic=True)          # [B, H, W, 2]
    eps_hat, v = out[..., :1], out[..., 1:]
    mse = jnp.mean((eps_hat - noise) ** 2, axis=(1, 2, 3))
    x0_hat = forward.x0_from_eps(x_t, eps_hat, fam.schedule.at("alphas_cumprod", t, 4))
    log_var = vlb.model_log_variance(fam.schedule, v, t)
    vb = vlb.vb_terms_bpd(fam.schedule, x0, x_t, t, x0_hat, log_var)
    np.testing.assert_allclose(per_example, mse + 0.001 * T * vb, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["vb"], jnp.mean(0.001 * T * vb), rtol=2e-5)
    # The known image enters the network: another image under the same mask changes the output.
    other = fam.model.apply(params, x_t, t, cond.replace(known=-x0), deterministic=True)
    assert float(jnp.max(jnp.abs(other - out))) > 1e-4


@pytest.mark.slow
def test_the_vlb_term_trains_the_variance_channels_only(data_dir):
    """d L_vlb / d(final conv) is exactly 0 on the C mean channels and not on the C variance
    channels; d L_simple is 0 on the variance channels (the two outputs are trained apart)."""
    fam = families.build(tiny(data_dir, "learned_sigma_inpaint"))
    params = _perturbed(fam.init_params(jax.random.key(1)))
    batch = _batch(fam, data_dir)
    key, hp = jax.random.key(5), fam.hparams()

    def part(name):
        def f(p):
            _, m = fam.loss(p, batch, key, hp)
            return m[name]
        return jax.grad(f)(params)["params"]["unet"]["conv_out"]

    g_vb, g_mse = part("vb"), part("mse")
    assert np.all(np.asarray(g_vb["kernel"][..., :1]) == 0) and np.all(np.asarray(g_vb["bias"][:1]) == 0)
    assert np.abs(np.asarray(g_vb["kernel"][..., 1:])).max() > 0
    assert np.all(np.asarray(g_mse["kernel"][..., 1:]) == 0)
    assert np.abs(np.asarray(g_mse["kernel"][..., :1])).max() > 0


def test_learned_variance_configs_are_checked(data_dir):
    """2C output channels are required, lambda_vlb > 0, and a latent model refuses both options."""
    cfg = tiny(data_dir, "learned_sigma_inpaint")
    cfg.model.unet.out_channels = 1
    with pytest.raises(ValueError, match=r"out_channels=1 must equal 2 x data.channels = 2"):
        families.build(cfg)
    cfg = tiny(data_dir, "learned_sigma_inpaint")
    cfg.diffusion.lambda_vlb = 0.0
    with pytest.raises(ValueError, match="lambda_vlb must be > 0"):
        families.build(cfg)


def test_bits_per_dim_sum_every_term_of_the_bound(data_dir, tiny_inpaint):
    """nll.evaluate = mean over images of L_0 + sum_t L_t + L_T, each term recomputed here from
    its documented noise (fold_in(fold_in(key(seed), 23), 0) folded with the image index, then t),
    the same with batches of 1 and 3; beta and beta~ give different bounds; an inpainting or
    fixed-variance model asked for the learned variance is refused."""
    from t2i_jax import data as data_lib
    from t2i_jax.diffusion import noise as noise_lib
    from t2i_jax.evaluation import nll
    from t2i_jax.sampling.load import Trained, load_trained
    fam = families.build(tiny(data_dir, None, diffusion__num_timesteps=50))  # a short bound
    trained = Trained(fam, _perturbed(fam.init_params(jax.random.key(1))), 0, "ema", "tiny")
    sch = fam.schedule
    res = nll.evaluate(trained, limit=3, batch_size=3)
    assert nll.evaluate(trained, limit=3, batch_size=1)["bits_per_dim"] == pytest.approx(
        res["bits_per_dim"], rel=1e-6)
    assert res["variance"] == "posterior" and res["conditional"]
    d = data_lib.load_split(fam.config.data, "test", limit=3)
    x0 = jnp.asarray(d["image"])
    enc = fam.encode(trained.params, fam.conditioning.of_prompts(d["caption"]))
    keys = noise_lib.per_sample_keys(jax.random.fold_in(jax.random.key(0), 23), jnp.arange(3), 0)

    @functools.partial(jax.jit, static_argnums=1)
    def term(t, clip=True):
        tb = jnp.full((3,), t, jnp.int32)
        eps = noise_lib.batch_normal(keys, x0.shape[1:], step=t)
        x_t = forward.q_sample(sch, x0, tb, eps)
        out = fam.model.apply(trained.params, x_t, tb, enc, method=type(fam.model).denoise)
        x0_hat = forward.x0_from_eps(x_t, out, sch.at("alphas_cumprod", tb, 4))
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0) if clip else x0_hat  # image_nll.py's default
        return vlb.vb_terms_bpd(sch, x0, x_t, tb, x0_hat,
                                sch.at("posterior_log_variance_clipped", tb, 4))

    total = sum(np.asarray(term(t)) for t in range(sch.num_timesteps))
    prior = np.asarray(vlb.prior_bpd(sch, x0))
    np.testing.assert_allclose(res["bits_per_dim"], np.mean(total + prior), rtol=1e-4)
    np.testing.assert_allclose(res["decoder_bpd"], np.mean(np.asarray(term(0))), rtol=1e-5)
    raw = nll.evaluate(trained, limit=3, batch_size=3, clip_denoised=False)
    total = sum(np.asarray(term(t, False)) for t in range(sch.num_timesteps))
    np.testing.assert_allclose(raw["bits_per_dim"], np.mean(total + prior), rtol=1e-4)
    beta = nll.evaluate(trained, limit=3, variance="beta")["bits_per_dim"]
    assert abs(beta - res["bits_per_dim"]) > 1e-3
    with pytest.raises(ValueError, match="learned variance"):
        nll.evaluate(trained, limit=3, variance="learned")
    with pytest.raises(ValueError, match="inpainting"):
        nll.evaluate(load_trained(tiny_inpaint), limit=2)


def test_ddim_with_the_learned_variance_at_eta_1_and_its_cap():
    """DDIM's eta > 0 path with a learned variance: v = -1 (sigma^2 = beta~_ts of the respaced
    chain) at eta = 1 is the DDPM step with beta~ exactly (same z); v = +1 (beta_ts) is capped at
    1 - abar_s where a 10-step chain's beta_ts exceeds it, so x_s's noise never exceeds it."""
    from t2i_jax.diffusion import make_schedule, samplers
    sch = make_schedule("linear", 1000)
    ts = jnp.asarray(samplers.timesteps(sch, 10))
    coeffs = samplers.step_coefficients(sch, ts)
    shape = (2, 4, 4, 1)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x_t, eps, z = (jax.random.normal(k, shape) for k in (k1, k2, k3))
    capped = 0
    for k in range(len(ts) - 1):
        c = jax.tree_util.tree_map(lambda a: a[k], coeffs)
        x0 = forward.x0_from_eps(x_t, eps, c.alpha_bar_t)
        ddim = lambda v, eta: samplers.ddim_step(  # noqa: E731
            x_t, eps, x0, c, z, (), samplers.Options(jnp.asarray(eta), "learned"), v)[0]
        ddpm, _ = samplers.ddpm_step(x_t, eps, x0, c, z, (), samplers.Options(0.0, "posterior"))
        np.testing.assert_allclose(ddim(-jnp.ones(shape), 1.0), ddpm, rtol=2e-5, atol=2e-5)
        # v = +1: sigma^2 = min(beta_ts, 1 - abar_s); the noise part is sigma z exactly
        x_s = ddim(jnp.ones(shape), 1.0)
        no_noise = samplers.ddim_step(x_t, eps, x0, c, None, (),
                                      samplers.Options(jnp.asarray(1.0), "learned"),
                                      jnp.ones(shape))[0]
        want = min(float(c.beta_ts), float(c.one_minus_alpha_bar_s))
        capped += float(c.beta_ts) > float(c.one_minus_alpha_bar_s)
        np.testing.assert_allclose(x_s - no_noise, np.sqrt(want) * z, rtol=1e-4, atol=1e-5)
    assert capped >= 1  # the cap was exercised
