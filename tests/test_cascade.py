"""Cascades (Imagen, CDM): noise-conditioning augmentation exactly, the SR family's conditioning
path, a cascade as one sampling job (the base stage equals the base alone; 1 vs 8 devices and
batch 1 vs 7; a job killed in its second stage resumes without redoing the first), and the
refusals of stages that do not fit together, before anything is written."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sample as sample_cli
from t2i_jax import families, files, images
from t2i_jax.conditioning import drop_condition, keep_undropped
from t2i_jax.diffusion import augmentation
from t2i_jax.sampling import job as job_lib
from t2i_jax.sampling import outdir as out_lib
from t2i_jax.sampling.plan import Plan
from t2i_jax.sampling import stages as stages_lib
from t2i_jax.sampling.generate import SampleOptions
from t2i_jax.sampling.load import Trained, load_trained

from runs import assert_refused, tiny  # noqa: E402

OPTIONS = SampleOptions("ddim", 3)
SR_OPTIONS = SampleOptions("ddim", 2)
PROMPTS = ["seven", "数字三"]


def _alpha_bar_closed_form(s):
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return f(s) / f(0.0)


def test_noise_augmentation_is_the_forward_process_at_its_level():
    """z_s = sqrt(abar(s)) z + sqrt(1 - abar(s)) n: its moments over many draws, abar the
    continuous cosine schedule, level 0 the clean image bit for bit, level -> 1 pure noise."""
    levels = np.asarray([0.0, 0.1, 0.3, 0.5, 0.9], np.float32)
    np.testing.assert_allclose(augmentation.alpha_bar(levels),
                               [_alpha_bar_closed_form(float(s)) for s in levels], rtol=1e-5)
    assert float(augmentation.alpha_bar(jnp.zeros(()))) == 1.0
    assert float(augmentation.alpha_bar(jnp.asarray(0.9999))) < 1e-6
    z = jax.random.uniform(jax.random.key(0), (1, 4, 4, 3), minval=-1, maxval=1)
    n = 20_000
    for s in levels:
        noise = jax.random.normal(jax.random.key(int(s * 100) + 1), (n, 4, 4, 3))
        zs = augmentation.noise_augment(jnp.broadcast_to(z, noise.shape), jnp.full((n,), s), noise)
        abar = _alpha_bar_closed_form(float(s))
        # mean sqrt(abar) z and variance 1 - abar per pixel, within 5 standard errors
        se_mean = math.sqrt(max(1 - abar, 1e-12) / n)
        np.testing.assert_allclose(zs.mean(0), math.sqrt(abar) * z[0], atol=5 * se_mean + 1e-6)
        np.testing.assert_allclose(zs.var(0), 1 - abar, atol=5 * (1 - abar) * math.sqrt(2 / n) + 1e-6)
    clean = augmentation.noise_augment(z, jnp.zeros((1,)), jnp.ones_like(z))
    np.testing.assert_array_equal(clean, z)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        augmentation.check_level(1.0)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        augmentation.check_level(-0.1)


def test_the_sr_family_sees_the_box_downsampled_image_and_cfg_keeps_it(data_dir):
    """Training: the low-res input is the box downsample of the (cropped) training image, made in
    the step; at max level 0 exactly that, and a crop's input is the crop of the downsample.
    Dropout replaces the text by the null, never the image. Sampling at level 0 hands the model
    the clean input."""
    cfg = tiny(data_dir, "super_resolution")
    cfg.sr.max_train_level = 0.0
    fam = families.build(cfg)
    x0 = jax.random.uniform(jax.random.key(1), (4, 16, 16, 1), minval=-1, maxval=1)
    box = x0.reshape(4, 8, 2, 8, 2, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(augmentation.downsample(x0, 8), box, atol=1e-7)
    batch = dict(image=x0, tokens=jnp.ones((4, 32), jnp.int32), mask=jnp.ones((4, 32), bool))
    cond = fam.training_condition(batch, jax.random.key(2), {})
    np.testing.assert_array_equal(cond.aug_level, np.zeros(4))
    np.testing.assert_array_equal(cond.low_res, augmentation.downsample(x0, 8))
    crops = fam._crop(x0, jax.random.key(3))                           # [4, 8, 8, 1]
    assert crops.shape == (4, 8, 8, 1)
    low = augmentation.downsample(x0, 8)
    for b in range(4):  # each crop sits at an even offset: its 4x4 input is a crop of `low`
        hits = [(i, j) for i in range(0, 9, 2) for j in range(0, 9, 2)
                if np.array_equal(np.asarray(crops[b]), np.asarray(x0[b, i:i + 8, j:j + 8]))]
        assert hits, "a crop at an odd offset"
        i, j = hits[0]
        np.testing.assert_allclose(augmentation.downsample(crops[b:b + 1], 4)[0],
                                   low[b, i // 2:i // 2 + 4, j // 2:j // 2 + 4], atol=1e-7)
    dropped = drop_condition(cond, keep_undropped(fam.null(), cond), jax.random.key(4), 1.0)
    assert bool(dropped.is_null.all())
    np.testing.assert_array_equal(dropped.tokens, jnp.broadcast_to(fam.null().tokens, (4, 32)))
    np.testing.assert_array_equal(dropped.low_res, cond.low_res)
    # Sampling: level 0 is the clean input, level 0.5 is not.
    cond0 = cond.replace(aug_level=jnp.zeros((4,)))
    ids = jnp.arange(4)
    np.testing.assert_array_equal(fam.sampling_condition(cond0, jax.random.key(5), ids).low_res,
                                  cond.low_res)
    half = fam.sampling_condition(cond0.replace(aug_level=jnp.full((4,), 0.5)),
                                  jax.random.key(5), ids)
    assert float(jnp.abs(half.low_res - cond.low_res).mean()) > 0.1


def test_a_trained_sr_model_reads_its_augmentation_level(cascade):
    """The level reaches the network: the same x_t, t, text and input give other outputs at
    other levels (the level's embedding was trained), and the input image matters too."""
    sr = load_trained(cascade[1])
    fam = sr.family
    cond = fam.conditioning.of_prompts(["seven"] * 2)
    low = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1), minval=-1, maxval=1)
    x_t = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
    t = jnp.asarray([500, 500])
    denoise = fam.denoise_fn(sr.params)

    def out(level, z=low):
        c = cond.replace(low_res=z, aug_level=jnp.full((2,), level, jnp.float32))
        return denoise(x_t, t, fam.encode(sr.params, c))
    base = out(0.0)
    for level in (0.3, 0.9):
        assert float(jnp.abs(out(level) - base).mean()) > 1e-3, level
    assert float(jnp.abs(out(0.0, -low) - base).mean()) > 1e-3


def _stages(sr: Trained, guidance=1.0, level=0.2):
    return [stages_lib.Stage(sr, SR_OPTIONS, guidance, level)]


def _cascade_spec(base, sr, **kw):
    return Plan.create(base, PROMPTS, num_per_prompt=3, guidance=(2.0,), seed=3,
                       options=OPTIONS, shard_size=2, stages=_stages(sr), **kw)


def test_the_base_stage_of_a_cascade_is_the_base_alone_and_devices_and_batches_do_not_matter(
        cascade, tmp_path):
    base, sr = (load_trained(w) for w in cascade)
    spec = _cascade_spec(base, sr)
    outs = {}
    for name, devices, batch in (("8dev_b7", None, 7), ("1dev_b1", jax.devices()[:1], 1)):
        res = job_lib.run_job(spec, str(tmp_path / name), batch_size=batch,
                              devices=devices, progress=False)
        assert res.num_images == 6
        outs[name] = out_lib.load_images(str(tmp_path / name))
    (x8, rows8), (x1, rows1) = outs["8dev_b7"], outs["1dev_b1"]
    assert x8.shape == (6, 16, 16, 1)
    np.testing.assert_array_equal(x8, x1)
    assert rows8 == rows1
    # Every stage's options and checkpoint are in the records; stage 0's images are kept.
    st = rows8[0]["stages"][0]
    assert (st["workdir"], st["checkpoint_step"], st["aug_level"], st["guidance"], st["steps"]) == (
        sr.workdir, sr.step, 0.2, 1.0, 2)
    assert rows8[0]["checkpoint_step"] == base.step
    stage0 = tmp_path / "8dev_b7" / "stages" / "0"
    assert rows8[4]["stage_files"] == ["stages/0/images/000004.png"]
    # The base alone, same seed and options: exactly the cascade's stage 0.
    alone = Plan.create(base, PROMPTS, num_per_prompt=3, guidance=(2.0,), seed=3,
                        options=OPTIONS, shard_size=2)
    job_lib.run_job(alone, str(tmp_path / "alone"), batch_size=7, progress=False)
    x_alone, _ = out_lib.load_images(str(tmp_path / "alone"))
    x_stage0, _ = out_lib.load_images(str(stage0))
    assert x_stage0.shape == (6, 8, 8, 1)
    np.testing.assert_array_equal(x_stage0, x_alone)


def test_a_cascade_killed_in_its_second_stage_resumes_without_redoing_the_first(
        cascade, tmp_path, monkeypatch):
    base, sr = (load_trained(w) for w in cascade)
    spec = _cascade_spec(base, sr)
    ref = tmp_path / "straight"
    job_lib.run_job(spec, str(ref), batch_size=2, progress=False)
    # Killed (any exception mid-loop leaves the files as a kill does) after 3 final PNGs.
    out = tmp_path / "killed"
    save = images.save_png
    written = []

    def dying(path, image):
        if os.sep + "stages" + os.sep not in path and path.endswith(".png") and "images" in path:
            if len(written) == 3:
                raise KeyboardInterrupt
            written.append(path)
        save(path, image)
    monkeypatch.setattr(images, "save_png", dying)
    with pytest.raises(KeyboardInterrupt):
        job_lib.run_job(spec, str(out), batch_size=2, progress=False)
    monkeypatch.setattr(images, "save_png", save)
    assert len(os.listdir(out / "stages" / "0" / "shards")) == 3   # stage 0 finished
    assert not out_lib.is_complete(str(out))
    res = job_lib.run_job(spec, str(out), batch_size=2, progress=False)
    stats = files.read_json(str(out / out_lib.STATS_FILE))
    assert [s["generated"] for s in stats["stages"]] == [0, 4]  # shard 0 of stage 1 was done
    assert res.generated == 4
    np.testing.assert_array_equal(out_lib.load_images(str(out))[0],
                                  out_lib.load_images(str(ref))[0])


def test_low_res_super_resolves_given_images(cascade, tmp_path):
    """--low_res: the SR as the only stage on given images (a directory of PNGs, one prompt for
    all); the result is the cascade's second stage when the inputs are its first stage's PNGs
    and the noise is the same (same sample ids, stage key)."""
    base, sr = cascade
    src = tmp_path / "small"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        images.save_png(str(src / f"{i}.png"), rng.integers(0, 256, (8, 8, 1), np.uint8))
    out = tmp_path / "sr"
    assert sample_cli.run(["--workdir", sr, "--low_res", str(src), "--prompt", "seven",
                           "--num_per_prompt", "2", "--steps", "2", "--aug_level", "0",
                           "--outdir", str(out), "--no_progress"]) == 0
    x, rows = out_lib.load_images(str(out))
    assert x.shape == (6, 16, 16, 1)
    assert [r["low_res_index"] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert all(r["aug_level"] == 0.0 and r["low_res"] == str(src) for r in rows)
    # At level 0 the SR sees its inputs clean: other inputs, other outputs.
    assert np.abs(x[0].astype(int) - x[2].astype(int)).mean() > 1


@pytest.mark.parametrize("case", ["base_as_sr", "sr_as_workdir", "level", "low_res_size",
                                  "size_mismatch", "low_res_on_base", "count"])
def test_stages_that_do_not_fit_are_refused_before_anything_is_written(
        cascade, tiny_workdir, tmp_path, capfd, case):
    base, sr = cascade
    out = tmp_path / "out"
    big = tmp_path / "big"
    big.mkdir()
    images.save_png(str(big / "a.png"), np.zeros((16, 16, 1), np.uint8))
    args, want = {
        "base_as_sr": (["--workdir", base, "--sr", base], "not a super_resolution one"),
        "sr_as_workdir": (["--workdir", sr], "is a super-resolution model: it needs inputs"),
        "level": (["--workdir", base, "--sr", sr, "--sr_aug_level", "1"], r"in \[0, 1\)"),
        "low_res_size": (["--workdir", sr, "--low_res", str(big)], "is 16x16x1, but the model "
                         "takes 8x8x1"),
        "size_mismatch": (["--workdir", tiny_workdir, "--sr", sr], "takes 8x8 inputs, but the stage "
                          "before it"),
        "low_res_on_base": (["--workdir", base, "--low_res", str(big)], "needs a super-resolution"),
        "count": (["--workdir", base, "--sr", sr, "--sr_steps", "2", "--sr_steps", "3"],
                  "given 2 times for 1 --sr"),
    }[case]
    assert_refused(args + ["--prompt", "seven"], out, capfd, want)


def test_check_follows_names_a_channel_or_data_set_mismatch(data_dir, cascade):
    base = load_trained(cascade[0])

    def fake(**changes):
        cfg = tiny(data_dir, "super_resolution")
        for key, value in changes.items():
            section, name = key.split("__")
            cfg[section][name] = value
        if cfg.data.channels == 3:
            cfg.model.unet.out_channels = 3
        return Trained(families.build(cfg), None, 0, "ema", "/fake/sr")
    stages_lib.check_follows(base, fake())  # the real pair fits
    with pytest.raises(ValueError, match="takes 3-channel images, but .* makes 1-channel"):
        stages_lib.check_follows(base, fake(data__channels=3))
    with pytest.raises(ValueError, match="trained on 'shapes', the stage before it .* on 'digits'"):
        stages_lib.check_follows(base, fake(data__name="shapes"))
    with pytest.raises(ValueError, match="takes 4x4 inputs, but the stage before it .* makes 8x8"):
        stages_lib.check_follows(base, fake(sr__low_res_size=4))


@pytest.mark.parametrize("base, sr", [("shapes16.py", "shapes_sr64.py"), ("digits.py", "digits_sr32.py")])
def test_the_shipped_cascade_configs_fit_together(base, sr):
    """configs/shapes16 -> shapes_sr64 and digits -> digits_sr32 form valid cascades (input size,
    channels, data set), with a sampling level in [0, 1) and v-prediction for the SR."""
    from t2i_jax.config_utils import load_config
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    b, s = (load_config(os.path.join(root, name)) for name in (base, sr))
    fb, fs = families.build(b), families.build(s)
    stages_lib.check_follows(Trained(fb, None, 0, "ema", base), Trained(fs, None, 0, "ema", sr))
    assert fs.name == "super_resolution" and fs.prediction == "v"
    assert 0 <= fs.default_aug_level() < 1
    assert fs.image_shape[0] == 4 * fs.low_res_shape[0] if sr == "shapes_sr64.py" else \
        fs.image_shape[0] == 2 * fs.low_res_shape[0]
