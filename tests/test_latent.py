"""Latent diffusion: the autoencoder's loss against LDM's definitions, its scale factor against a
direct computation, the latent model's frozen autoencoder, sampling that decodes (the same
images on 1 and 8 devices and any batch size), and the refusals of bad input."""

import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sample as sample_cli
from t2i_jax import data as data_lib, families
from t2i_jax.diffusion import noise
from t2i_jax.families import autoencoder as ae_lib
from t2i_jax.families.frozen import load_frozen
from t2i_jax.models.autoencoder import Posterior
from t2i_jax.sampling import job as job_lib
from t2i_jax.sampling import outdir as out_lib
from t2i_jax.sampling.plan import Plan
from t2i_jax.sampling.generate import SampleOptions
from t2i_jax.sampling.load import load_trained
from t2i_jax.training import loop

from runs import run, tiny  # noqa: E402

OPTIONS = SampleOptions("ddim", 3, thresholding=None)


def _batch(data_dir, n=4):
    cfg = tiny(data_dir, "autoencoder")
    return data_lib.load_split(cfg.data, "train", limit=n)["image"]


def test_kl_is_the_closed_form_and_matches_numerical_integration():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(2, 1, 1, 3)).astype(np.float32)
    logvar = rng.normal(size=(2, 1, 1, 3)).astype(np.float32)
    kl = np.asarray(Posterior(jnp.asarray(mean), jnp.asarray(logvar)).kl())
    z = np.linspace(-12, 12, 200001)
    want = np.zeros(2)
    for b in range(2):
        for c in range(3):
            m, s2 = float(mean[b, 0, 0, c]), float(np.exp(logvar[b, 0, 0, c]))
            q = np.exp(-(z - m) ** 2 / (2 * s2)) / np.sqrt(2 * np.pi * s2)
            log_ratio = -(z - m) ** 2 / (2 * s2) - 0.5 * np.log(s2) + z ** 2 / 2
            want[b] += np.trapezoid(q * log_ratio, z)
    np.testing.assert_allclose(kl, want, rtol=1e-4)


@pytest.mark.slow
def test_the_autoencoder_loss_is_ldms_sum_over_pixels(data_dir):
    """Without the GAN: per example, sum |x - D(z)| / e^s + s over pixels + w * KL, z ~ q(z | x)
    from the step's stream 0."""
    cfg = tiny(data_dir, "autoencoder", train__disc_weight=0.0)
    fam = families.build(cfg)
    params = fam.init_params(jax.random.key(1))
    params["params"]["logvar"] = jnp.float32(0.3)
    x = jnp.asarray(_batch(data_dir))
    key = jax.random.key(5)
    per, metrics = fam.loss(params, {"image": x}, key, dict(fam.hparams(), step=0))
    post = fam.encode(params, x)
    z = post.sample(jax.random.fold_in(key, 0))
    rec = np.abs(np.asarray(x) - np.asarray(fam.decode(params, z)))
    nll = (rec / np.exp(0.3) + 0.3).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(per), nll + 1e-6 * np.asarray(post.kl()), rtol=1e-5)
    assert per.shape == (4,) and "d_loss" not in metrics


@pytest.mark.slow
def test_the_adaptive_gan_weight_and_each_player_gets_only_its_own_gradient(data_dir):
    cfg = tiny(data_dir, "autoencoder")  # disc_weight 0.5 from step 2
    fam = families.build(cfg)
    params = fam.init_params(jax.random.key(2))
    x = jnp.asarray(_batch(data_dir))
    key = jax.random.key(3)
    hp = dict(fam.hparams(), step=jnp.int32(5))
    per, metrics = fam.loss(params, {"image": x}, key, hp)
    p = params["params"]
    z = fam.encode(params, x).sample(jax.random.fold_in(key, 0))

    # Direct: the gradients at the decoder's last kernel of the mean NLL and of g, through the
    # whole decoder with z fixed (not the family's shortcut through the last conv alone).
    def through(k):
        q = jax.tree_util.tree_map(lambda a: a, params)
        q["params"]["autoencoder"]["conv_out"]["kernel"] = k
        return fam.decode(q, z)

    kernel = p["autoencoder"]["conv_out"]["kernel"]
    disc = lambda img: fam.discriminator.apply({"params": p["discriminator"]}, img)  # noqa: E731
    g_nll = jax.grad(lambda k: jnp.mean(jnp.sum(jnp.abs(x - through(k)) / jnp.exp(p["logvar"])
                                                + p["logvar"], axis=(1, 2, 3))))(kernel)
    g_g = jax.grad(lambda k: -jnp.mean(disc(through(k))))(kernel)
    want = 0.5 * min(np.linalg.norm(g_nll) / (np.linalg.norm(g_g) + 1e-4), 1e4)
    np.testing.assert_allclose(float(metrics["d_weight"]), want, rtol=1e-4)
    assert float(metrics["disc_factor"]) == 1.0
    # Before disc_start the adversarial terms are off.
    _, m0 = fam.loss(params, {"image": x}, key, dict(hp, step=jnp.int32(1)))
    assert float(m0["disc_factor"]) == 0.0

    # The discriminator's gradient is the hinge loss's alone, with x_hat fixed.
    grads = jax.grad(lambda q: jnp.mean(fam.loss(q, {"image": x}, key, hp)[0]))(params)
    x_hat = fam.decode(params, z)
    hinge = lambda dp: jnp.mean(ae_lib.hinge_d_loss(  # noqa: E731
        fam.discriminator.apply({"params": dp}, x), fam.discriminator.apply({"params": dp}, x_hat)))
    want_d = jax.grad(hinge)(p["discriminator"])
    for a, b in zip(jax.tree_util.tree_leaves(grads["params"]["discriminator"]),
                    jax.tree_util.tree_leaves(want_d)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_the_scale_factor_is_one_over_the_std_of_sampled_training_posteriors(data_dir,
                                                                             tiny_autoencoder):
    frozen = load_frozen(tiny_autoencoder, "autoencoder", flag="test")
    stats = frozen.statistics
    fam, params = frozen.family, frozen.params
    images = data_lib.load_split(fam.config.data, "train", limit=fam.loss_cfg.scale_images)["image"]
    # Direct: every image at once, z = mean + std * eps with image i's noise by its index.
    post = fam.encode(params, jnp.asarray(images))
    key = jax.random.fold_in(jax.random.key(fam.config.seed), ae_lib.SCALE_STREAM)
    eps = noise.initial_noise(key, post.mean.shape, jnp.arange(len(images)))
    z = np.asarray(post.mean + post.std * eps, np.float64)
    np.testing.assert_allclose(stats["scale_factor"], 1.0 / z.std(ddof=1), rtol=1e-5)
    assert stats["num_images"] == len(images) == 64
    # Sampled, not the means: the posterior's own spread is in it.
    mean_only = 1.0 / np.asarray(post.mean, np.float64).std(ddof=1)
    assert abs(stats["scale_factor"] - mean_only) / mean_only > 0.01
    # The scaled latents of the test split have unit spread.
    test = data_lib.load_split(fam.config.data, "test")["image"]
    zt, _ = ae_lib.sample_latents(fam, params, test, jax.random.key(9))
    assert 0.85 < (zt * stats["scale_factor"]).std() < 1.15


def _file_hashes(path):
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                out[os.path.relpath(os.path.join(root, n), path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_the_frozen_autoencoder_stays_frozen_and_out_of_the_train_state(data_dir, tiny_autoencoder,
                                                                         tmp_path):
    before = _file_hashes(tiny_autoencoder)
    frozen = load_frozen(tiny_autoencoder, "autoencoder", flag="test")
    cfg = tiny(data_dir, "latent_diffusion")
    state = run(cfg, tmp_path / "ldm")
    assert _file_hashes(tiny_autoencoder) == before
    fam = families.build(cfg)
    after = fam.autoencoder.params
    for a, b in zip(jax.tree_util.tree_leaves(frozen.params), jax.tree_util.tree_leaves(after),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    # The state holds the denoiser alone: params, EMA and Adam moments have its leaves only.
    denoiser = jax.eval_shape(fam.init_params, jax.random.key(0))
    shapes = lambda t: [x.shape for x in jax.tree_util.tree_leaves(t)]  # noqa: E731
    assert shapes(state.params) == shapes(denoiser) == shapes(state.ema_params)
    run_ = loop.Run.from_config(cfg)
    assert shapes(state.opt_state) == shapes(jax.eval_shape(run_.tx.init, denoiser))
    n_ae = sum(np.size(x) for x in jax.tree_util.tree_leaves(frozen.params))
    assert n_ae > 0 and sum(np.size(x) for x in jax.tree_util.tree_leaves(state.params)) == \
        sum(np.prod(s) for s in shapes(denoiser))
    # The checkpoint records which autoencoder (checkpoint and hash) the model goes with.
    ident = load_trained(str(tmp_path / "ldm")).config.frozen.autoencoder
    assert ident.sha256 == frozen.identity()["sha256"] and ident.step == frozen.step


def test_a_latent_model_samples_decoded_pixels_alike_on_1_and_8_devices_and_any_batch(
        tiny_latent, tmp_path):
    trained = load_trained(tiny_latent)
    assert trained.family.image_shape == (8, 8, 2) and trained.family.output_shape == (16, 16, 1)
    spec = Plan.create(trained, ["seven", "three"], num_per_prompt=3,
                       guidance=(0.0, 3.0), seed=1, options=OPTIONS, shard_size=5)
    got = {}
    for name, devices, batch in (("8dev_b1", None, 1), ("1dev_b7", jax.devices()[:1], 7)):
        job_lib.run_job(spec, str(tmp_path / name), batch_size=batch, devices=devices,
                        progress=False)
        got[name] = out_lib.load_images(str(tmp_path / name))
    # A rerun in the same directory is the same job (its identity, decoder included, reads back
    # from job.json as written): it finds every shard done.
    again = job_lib.run_job(spec, str(tmp_path / "1dev_b7"), batch_size=7,
                            devices=jax.devices()[:1], progress=False)
    assert again.generated == 0
    (x8, rows), (x1, _) = got["8dev_b1"], got["1dev_b7"]
    assert x8.shape == (12, 16, 16, 1)
    np.testing.assert_array_equal(x8, x1)
    assert rows[0]["decoder"]["sha256"] == trained.family.autoencoder.identity()["sha256"]
    assert rows[0]["decoder"]["scale_factor"] == trained.family.scale_factor
    # The pixels are the decoder's, of x0 / scale_factor: the chain's own latents decoded by
    # hand give the same images.
    import copy
    from t2i_jax.sampling.generate import make_generate_fn
    fam = trained.family
    bare = copy.copy(fam)
    bare.to_output = lambda inputs, z: z / 100.0  # the latents themselves (inside the final clip)
    cond = fam.conditioning.of_prompts(["seven", "three"])
    args = (cond, jax.random.key(4), 2.0, jnp.arange(2))
    x = make_generate_fn(fam, OPTIONS)(trained.params, *args)
    z = 100.0 * make_generate_fn(bare, OPTIONS)(trained.params, *args)
    assert float(jnp.abs(z).max()) < 100.0  # not clipped
    want = jnp.clip(fam.ae.decode(fam.autoencoder.params, z / fam.scale_factor), -1, 1)
    np.testing.assert_allclose(np.asarray(x), np.asarray(want), atol=1e-4)
    assert x.shape == (2, 16, 16, 1)


def test_latent_refusals_name_the_problem_before_anything_is_written(data_dir, tiny_autoencoder,
                                                                     tiny_latent, tmp_path,
                                                                     capsys):
    def refused(cfg, match):
        wd = tmp_path / "never"
        with pytest.raises(ValueError, match=match):
            loop.train(cfg, str(wd), progress=False)
        assert not wd.exists()

    # An autoencoder of another image size, or of another data set.
    other = tmp_path / "ae8"
    run(tiny(data_dir, "autoencoder", train__num_steps=2, data__image_size=8), other)
    cfg = tiny(data_dir, "latent_diffusion")
    cfg.model.autoencoder = str(other)
    refused(cfg, r"trained on other images: data.image_size: 8 \(autoencoder\) vs 16")
    cfg = tiny(data_dir, "latent_diffusion")
    cfg.data.name = "shapes"
    cfg.data.channels = 3
    refused(cfg, r"data.name: 'digits' \(autoencoder\) vs 'shapes'")
    # A denoiser that does not fit the latents: channels, and a size the UNet cannot halve.
    refused(_with(tiny(data_dir, "latent_diffusion"), out_channels=1),
            r"out_channels=1, but the autoencoder .* latents of 2 channels \(\[8, 8, 2\]\)")
    refused(_with(tiny(data_dir, "latent_diffusion"), channel_mult=(1, 1, 1, 1, 1)),
            r"halves its input 4 times .* 8x8 latents")
    # Not an autoencoder; no autoencoder; static thresholding in the config.
    cfg = tiny(data_dir, "latent_diffusion")
    cfg.model.autoencoder = tiny_latent
    refused(cfg, "holds a latent_diffusion model, not an autoencoder")
    cfg.model.autoencoder = str(tmp_path / "missing")
    refused(cfg, "has no checkpoints")
    refused(_sample(tiny(data_dir, "latent_diffusion"), "static"),
            r"config.sample.thresholding static is refused for a latent model")

    # sample.py: an autoencoder as the model, static or dynamic thresholding on latents.
    out = tmp_path / "out"
    for argv, message in ((["--workdir", tiny_autoencoder], "holds a autoencoder model, which "
                           "does not generate images"),
                          (["--workdir", tiny_latent, "--thresholding", "static"],
                           "--thresholding static is refused for a latent model"),
                          (["--workdir", tiny_latent, "--thresholding", "dynamic"],
                           "(dynamic: rescales it into [-1, 1])")):
        assert sample_cli.run(argv + ["--prompt", "7", "--outdir", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_a_pixel_guide_is_refused_for_a_latent_model(data_dir, tiny_latent):
    """A gradient guide reads x_t: a classifier of 16x16 pixels cannot guide 8x8x2 latents,
    although the data set, image size and channels of the two configs agree."""
    from t2i_jax.sampling.guides import check_matches
    from t2i_jax.sampling.load import Trained
    model = load_trained(tiny_latent)
    guide_cfg = tiny(data_dir, "noisy_classifier")
    guide_cfg.diffusion = model.config.diffusion
    guide = Trained(families.build(guide_cfg), None, 0, "ema", "/guide")
    with pytest.raises(ValueError, match=r"the guide reads x_t of shape \(16, 16, 1\), the "
                                         r"model's x_t is \(8, 8, 2\) \(a latent"):
        check_matches(guide, model, "--classifier")


def _with(cfg, **unet):
    for k, v in unet.items():
        cfg.model.unet[k] = v
    return cfg


def _sample(cfg, thresholding):
    cfg.sample.thresholding = thresholding
    return cfg


def test_a_retrained_autoencoder_is_refused_by_its_latent_model(data_dir, tiny_autoencoder,
                                                                tmp_path):
    ae = tmp_path / "ae"
    shutil.copytree(tiny_autoencoder, ae)
    cfg = tiny(data_dir, "latent_diffusion", train__num_steps=2)
    cfg.model.autoencoder = str(ae)
    run(cfg, tmp_path / "ldm")
    run(tiny(data_dir, "autoencoder", train__num_steps=42, train__checkpoint_every=40), ae)
    # Sampling reads the autoencoder's recorded step 40 while it is still in its checkpoints/
    # (not the newest, 42); once it is gone, the latent model refuses the retrained one.
    trained = load_trained(str(tmp_path / "ldm"))
    assert trained.family.autoencoder.step == 40
    shutil.rmtree(ae / "checkpoints" / "40")
    with pytest.raises(ValueError, match=r"is not the one this model was trained with .*its "
                                         r"checkpoint 40 is no longer in"):
        load_trained(str(tmp_path / "ldm"))
    # Resuming its training on the retrained autoencoder is refused too.
    cfg.train.num_steps = 4
    with pytest.raises(ValueError, match=r"different model.*frozen.autoencoder"):
        run(cfg, tmp_path / "ldm")


def test_reconstruct_reports_the_test_splits_psnr_ssim_and_latents(tiny_autoencoder, digits_evaluator,
                                                                   tmp_path_factory, tmp_path, capsys):
    from conftest import _shared_root
    from t2i_jax.evaluation import image_metrics, reconstruct
    from t2i_jax.images import UINT8_CONVERSION, to_uint8
    ev_dir = str(_shared_root(tmp_path_factory) / "digits_evaluator")
    assert reconstruct.main(["--workdir", tiny_autoencoder, "--out", str(tmp_path / "r"),
                             "--evaluator_dir", ev_dir]) == 0
    res = json.loads((tmp_path / "r" / "reconstruct.json").read_text())
    assert "PSNR" in capsys.readouterr().out
    # Direct: the test split's 8-bit originals, the posterior means decoded, PSNR/SSIM on [0, 1].
    frozen = load_frozen(tiny_autoencoder, "autoencoder", flag="test")
    fam = frozen.family
    x = to_uint8(data_lib.load_split(fam.config.data, "test")["image"])
    rec = to_uint8(np.clip(np.asarray(fam.reconstruct(
        frozen.params, jnp.asarray(x.astype(np.float32) / 127.5 - 1.0))), -1, 1))
    # reconstruct.py's program (posterior_latents and decode, jitted, batches of 256) is another
    # XLA program than fam.reconstruct here: float32 rounds differently in the last bits, and a
    # pixel that close to a .5 boundary of the uint8 rounding lands one grey level apart (seen
    # on another CPU: the SSIM 1.07e-6 off). So the pixels agree to one level on a few of them
    # (a float difference of 1e-4 in [-1, 1], tests/test_samplers_invariance.py's bound, is
    # 0.013 levels: about 1.3% of pixels at most), and the metrics are recomputed from
    # reconstruct.reconstruct's own pixels: the same program and the same float64 NumPy
    # reductions, so equal to the last bit.
    lib = reconstruct.reconstruct(frozen, x.astype(np.float32) / 127.5 - 1.0)
    diff = np.abs(lib.astype(int) - rec.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.013, (diff.max(), (diff > 0).mean())
    a, b = x / 255.0, lib / 255.0
    assert res["n"] == len(x)
    assert res["psnr"] == image_metrics.psnr(a, b).mean()
    assert res["ssim"] == image_metrics.ssim(a, b).mean()
    assert res["uint8_conversion"] == UINT8_CONVERSION
    assert res["latents"]["stored"]["scale_factor"] == frozen.statistics["scale_factor"]
    assert res["latent_shape"] == [8, 8, 2] and res["rfd"] >= 0
    assert (tmp_path / "r" / "grid.png").exists()
    # Not an autoencoder: refused with the family named.
    with pytest.raises(SystemExit):
        reconstruct.main(["--workdir", os.environ["T2I_TEST_AUTOENCODER"] + "/missing"])


@pytest.mark.parametrize("ae, ldm", [("shapes64_ae", "shapes64_ldm"),
                                     ("shapes64_ae_f2", "shapes64_ldm_f2")])
def test_the_shipped_latent_configs_fit_together(data_dir, ae, ldm):
    from t2i_jax.config_utils import load_config
    from t2i_jax.families.frozen import Frozen
    from t2i_jax.families.latent import check_autoencoder
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
    ae_cfg, ldm_cfg = (load_config(os.path.join(root, f"{n}.py")) for n in (ae, ldm))
    ae_fam = families.build(ae_cfg)
    assert os.path.basename(ldm_cfg.model.autoencoder) == ae
    check_autoencoder(ldm_cfg, Frozen(ae_fam, None, 0, None, ae))  # raises on a mismatch
    f = 4 if ae == "shapes64_ae" else 2
    assert ae_fam.latent_shape == (64 // f, 64 // f, 4)
    assert ldm_cfg.sample.thresholding == "none"
    digits = families.build(load_config(os.path.join(root, "digits_ae.py")))
    assert digits.latent_shape == (8, 8, 2)
