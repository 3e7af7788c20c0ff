"""Inpainting (t2i_jax/diffusion/inpainting.py, sampling/inpaint.py, sample.py --inpaint): GLIDE's
known region is exact; RePaint's steps see it at the step's noise and its output pastes it
exactly (Alg. 1's last line); RePaint's transition
order, RePaint without known pixels is the plain chain, the training masks, device and batch
invariance, refusals before anything is written, and records that make a job resumable."""

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sample as sample_cli
from runs import assert_refused, tiny
from t2i_jax import files, images
from t2i_jax.diffusion import (analytic, forward, guidance, inpainting, make_schedule, noise,
                               samplers)
from t2i_jax.sampling import job as job_lib
from t2i_jax.sampling import outdir as out_lib
from t2i_jax.sampling.plan import Inpaint, Plan
from t2i_jax.sampling.inpaint import load_inpaint, parse_box
from t2i_jax.sampling.load import load_trained
from t2i_jax.sampling.stages import stage_options

H = W = 16
BOX = (8, 0, 16, 16)  # the right half is regenerated, the left half known
LINEAR = make_schedule("linear", 1000)


# --- helpers -------------------------------------------------------------------------------

def _digit_png(data_dir, path, index=0):
    """A test digit (uint8 [16, 16, 1]) written as a grey PNG at `path`; returns the pixels."""
    from t2i_jax import data as data_lib
    d = data_lib.load_split(tiny(data_dir).data, "test", limit=index + 1)
    x = images.to_uint8(d["image"][index])
    images.save_png(str(path), x)
    return x


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _known_bool(mask):
    return np.asarray(mask)[..., 0] > 0.5  # [H, W]


def _job(trained, path, outdir, *, options, box=BOX, guidance_weights=(0.0,), num=3, batch=7,
         devices=None, method, seed=0):
    known, mask, record = load_inpaint(str(path), trained.family.image_shape, box=box,
                                       method=method, jumps=options.repaint_jumps,
                                       jump_length=options.repaint_jump_length)
    plan = Plan.create(trained, ["seven"], num_per_prompt=num, guidance=guidance_weights,
                       seed=seed, options=options, inpaint=Inpaint.create(
                       known, mask, record, trained.family.image_shape, 1))
    res = job_lib.run_job(plan, str(outdir), batch_size=batch, devices=devices, progress=False)
    x, rows = out_lib.load_images(str(outdir))
    return x, rows, mask, res


def _zero_eps(schedule):
    """A denoiser whose eps_hat is 0, so x0_hat = x_t / sqrt(abar_t) exactly."""
    def den(x, t):
        ab = schedule.at("alphas_cumprod", t, x.ndim)
        return jnp.zeros_like(x), x / jnp.sqrt(ab)
    return den


def _mixture_denoiser(mixture, schedule):
    eps = analytic.eps_fn(mixture, schedule)
    return guidance.model_denoiser(lambda x, t, c: eps(x, t, None), schedule, "eps")


# --- session models ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def glide(tiny_inpaint):
    return load_trained(tiny_inpaint)


@pytest.fixture(scope="module")
def base(tiny_workdir):
    return load_trained(tiny_workdir)


@pytest.fixture(scope="module")
def digit(data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("inpaint_input") / "digit.png"
    return str(path), _digit_png(data_dir, path)


@pytest.fixture(scope="module")
def glide_job(glide, digit, tmp_path_factory):
    """GLIDE's model on the digit, right half regenerated, w in (0, 2), 3 images each, 4 ddpm
    steps with the learned variance, on 8 devices with batch 7: (images, rows, mask)."""
    options = stage_options(glide, steps=4, inpaint="glide")
    assert (options.sampler, options.ddpm_variance) == ("ddpm", "learned")
    x, rows, mask, _ = _job(glide, digit[0], tmp_path_factory.mktemp("glide8") / "out",
                            options=options, guidance_weights=(0.0, 2.0), method="glide")
    return x, rows, mask


REPAINT = dict(sampler="ddpm", steps=4, inpaint="repaint", repaint_jumps=1, repaint_jump_length=2)


# --- 1. GLIDE: the known region is exact ---------------------------------------------------

def test_glide_known_region_is_exact_and_the_unknown_region_is_regenerated_with_cfg(
        glide_job, digit):
    """GLIDE: known pixels are the input's exactly (w = 0, 2); the rest is new, CFG moves it."""
    x, rows, mask = glide_job
    _, ref = digit
    keep = _known_bool(mask)
    assert keep[:, :8].all() and not keep[:, 8:].any()
    assert [r["guidance"] for r in rows] == [0.0] * 3 + [2.0] * 3
    assert x.shape == (6, H, W, 1)
    for i in range(6):
        np.testing.assert_array_equal(x[i][keep], ref[keep], err_msg=f"image {i}")
        # regenerated: far from the input's right half (mean over 128 pixels, in grey levels)
        assert np.abs(x[i][~keep].astype(int) - ref[~keep].astype(int)).mean() > 8, i
    # The same noise (sample ids 0..2 for both w) with w = 2 regenerates another right half.
    assert [r["sample_id"] for r in rows] == [0, 1, 2] * 2
    for k in range(3):
        assert np.abs(x[k][~keep].astype(int) - x[3 + k][~keep].astype(int)).max() > 8, k


# --- 1b. guides and CFG with both methods ------------------------------------------------

@pytest.mark.default_xla  # two different programs compared bit for bit (tests/conftest.py)
@pytest.mark.parametrize("method", ["glide", "repaint"])
def test_guides_and_cfg_work_with_both_methods(method, glide, base, digit, straight_runs):
    """With inpainting on: a classifier guide at scale 0 gives the unguided images bit for bit,
    the guide and the CFG weight each move the regenerated half, and the known half comes out
    as the input exactly (GLIDE's overwrite; RePaint's final paste) whatever they do."""
    from t2i_jax.sampling import guides as guides_lib
    from t2i_jax.sampling.generate import make_generate_fn
    model = glide if method == "glide" else base
    guide = guides_lib.Guide("classifier", load_trained(str(straight_runs["noisy_classifier"][1])),
                             1.0)
    options = stage_options(model, sampler="ddpm", steps=4, inpaint=method,
                            **({"repaint_jumps": 1, "repaint_jump_length": 2}
                               if method == "repaint" else {}))
    prompts, ids = ["7", "3", "7"], jnp.arange(3)
    known = np.broadcast_to(digit[1].astype(np.float32) / 127.5 - 1.0, (3, H, W, 1))
    mask = np.broadcast_to(inpainting.box_mask(H, W, BOX), (3, H, W, 1))
    cond = model.family.conditioning.of_prompts(prompts).replace(
        known=jnp.asarray(known), known_mask=jnp.asarray(mask))
    rows = (jax.tree_util.tree_map(jnp.asarray, guide.rows(prompts)),)
    plain = make_generate_fn(model.family, options, guided=True)
    guided = make_generate_fn(model.family, options, guided=True, guides=[guide])

    def run(w, scale):
        return np.asarray(guided(model.params, cond, jax.random.key(0), w, ids,
                                 (guide.trained.params,), rows, jnp.asarray([scale], jnp.float32)))

    x_plain = np.asarray(plain(model.params, cond, jax.random.key(0), 2.0, ids))
    np.testing.assert_array_equal(run(2.0, 0.0), x_plain)
    keep = np.broadcast_to(mask > 0.5, known.shape)
    for w, scale in ((2.0, 0.0), (2.0, 5.0), (0.0, 0.0), (0.0, 5.0)):
        x = run(w, scale)
        np.testing.assert_array_equal(images.to_uint8(x)[keep], images.to_uint8(known)[keep])
        if (w, scale) != (2.0, 0.0):  # each of guide and CFG moves the regenerated half
            assert np.abs(x - x_plain)[~keep].max() > 1e-3, (w, scale)


# --- 2. RePaint: the known region is the input up to the last step's noise, then pasted ----

def test_repaint_known_region_is_the_last_steps_q_sample_over_sqrt_abar():
    """RePaint with eps_hat = 0: before Alg. 1's final paste, the known region is
    q_sample(known, t_last, n) / sqrt(abar) exactly; after it, the input exactly, with the
    unknown region unchanged."""
    batch, n_steps, jumps, length = 3, 6, 2, 2
    rng, ids = jax.random.key(3), jnp.asarray([4, 0, 9])
    known = jax.random.uniform(jax.random.key(1), (batch, 8, 8, 1), minval=-1.0, maxval=1.0)
    mask = jnp.asarray(inpainting.box_mask(8, 8, (2, 1, 6, 7)))[None]  # [1, 8, 8, 1]
    x_T = noise.initial_noise(rng, known.shape, ids)
    run = jax.jit(lambda xt, kn, paste: inpainting.repaint_chain(
        _zero_eps(LINEAR), LINEAR, xt, kn, mask, rng=rng, sampler="ddpm", num_steps=n_steps,
        sample_ids=ids, jumps=jumps, jump_length=length, paste_known=paste),
        static_argnums=2)
    out, pasted = run(x_T, known, False), np.asarray(run(x_T, known, True))
    kind, step = inpainting.repaint_transitions(n_steps, jumps, length)
    assert (kind[-1], step[-1]) == (0, n_steps - 1)
    t_last = int(samplers.timesteps(LINEAR, n_steps)[-1])
    n = noise.batch_normal(noise.per_sample_keys(rng, ids, noise.KNOWN_NOISE), known.shape[1:],
                           step=len(kind) - 1)
    ab = float(LINEAR.alphas_cumprod[t_last])
    want = (forward.q_sample(LINEAR, known, jnp.full((batch,), t_last), n)) / np.sqrt(ab)
    keep = np.broadcast_to(np.asarray(mask) > 0.5, known.shape)
    out, want, known = np.asarray(out), np.asarray(want), np.asarray(known)
    np.testing.assert_allclose(out[keep], want[keep], rtol=0, atol=1e-5)
    # the derived bound: |out - known| <= 6 sqrt(1 - abar) / sqrt(abar) on the known region
    assert np.abs(out - known)[keep].max() <= 6 * np.sqrt((1 - ab) / ab)
    # the unknown region grows with x0_hat = x_t / sqrt(abar): nowhere near the known image
    assert np.abs(out - known)[~keep].mean() > 5.0
    # Alg. 1's last line: the known pixels exactly, the unknown ones the chain's
    np.testing.assert_array_equal(pasted[keep], known[keep])
    np.testing.assert_array_equal(pasted[~keep], out[~keep])


def test_repaint_ending_at_t0_keeps_the_known_region_within_the_noise_of_t0():
    """RePaint ending at t = 0 (linear, leading): before the final paste, the known region is
    within 0.06 of the input (the model saw it at the noise of t = 0)."""
    d = 8 * 8
    checker = np.where((np.arange(d) % 2) == 0, 0.6, -0.6)
    mixture = analytic.GaussianMixture.create([0.5, 0.5], [np.full(d, -0.6), checker], 0.01)
    batch = 4
    known = jnp.full((batch, 8, 8, 1), 0.9, jnp.float32)  # outside the mixture
    mask = jnp.asarray(inpainting.box_mask(8, 8, (0, 4, 8, 8)))  # [8, 8, 1]: the lower half
    rng = jax.random.key(0)
    x_T = noise.initial_noise(rng, known.shape)
    assert int(samplers.timesteps(LINEAR, 5, "leading")[-1]) == 0
    out = jax.jit(lambda xt: inpainting.repaint_chain(
        _mixture_denoiser(mixture, LINEAR), LINEAR, xt, known, mask, rng=rng, sampler="ddpm",
        num_steps=5, spacing="leading", jumps=2, jump_length=2, paste_known=False))(x_T)
    out = np.asarray(out)
    keep = np.broadcast_to(np.asarray(mask) > 0.5, out.shape)
    ab0 = float(LINEAR.alphas_cumprod[0])
    bound = 6 * np.sqrt((1 - ab0) / ab0)
    assert 0.05 < bound < 0.07
    assert np.abs(out - 0.9)[keep].max() <= bound
    # The unknown half is the mixture's (pixels near -0.6 or +-0.6: 0.3 or 1.5 from 0.9).
    assert np.abs(out - 0.9)[~keep].mean() > 0.5


# --- 3. RePaint's order of transitions -----------------------------------------------------

@pytest.mark.parametrize("n,jumps,length", [(6, 0, 3), (1, 3, 1), (7, 2, 3), (6, 2, 3),
                                            (10, 1, 1), (5, 3, 8), (9, 4, 2)])
def test_repaint_transitions_visit_the_chain_as_resampling_requires(n, jumps, length):
    """repaint_transitions: N + J L P model calls, each forward run of L undone next, N - 1 last."""
    kind, step = inpainting.repaint_transitions(n, jumps, length)
    assert kind.dtype == step.dtype == np.int32
    points = (n - 1) // length if jumps else 0
    assert int((kind == 0).sum()) == n + jumps * length * points  # model calls
    assert int((kind == 1).sum()) == jumps * length * points
    if jumps == 0:
        np.testing.assert_array_equal(step, np.arange(n))
        assert not kind.any()
    # Walk the chain: `done` completed reverse steps; a reverse step k needs done == k, a forward
    # step k (ts[k+1] -> ts[k]) needs done == k + 1.
    done, i, jump_at = 0, 0, []
    while i < len(kind):
        if kind[i] == 1:
            run = slice(i, i + length)
            assert (kind[run] == 1).all() and (kind[i + length:i + 2 * length] == 0).all()
            np.testing.assert_array_equal(step[run], np.arange(done - 1, done - 1 - length, -1))
            np.testing.assert_array_equal(step[i + length:i + 2 * length],
                                          np.arange(done - length, done))
            jump_at.append(done)
            i += 2 * length  # back up L steps and down again: done unchanged
            continue
        assert step[i] == done, (i, step[i], done)
        done += 1
        i += 1
    assert done == n and (kind[-1], step[-1]) == (0, n - 1)
    # jump points: as andreas128/RePaint's get_schedule_jump, with r = n - done steps left:
    # wherever (r - 1) % L == 0, from done >= L on; the last one leaves one step (x_1 -> x_0)
    expect = [d for d in range(length, n) if (n - d - 1) % length == 0 for _ in range(jumps)]
    assert jump_at == expect
    assert len(set(jump_at)) == points and (not jump_at or jump_at[-1] == n - 1)
    with pytest.raises(ValueError, match="--repaint_jumps must be >= 0"):
        inpainting.repaint_transitions(n, -1, length)
    with pytest.raises(ValueError, match="--repaint_jump_length >= 1"):
        inpainting.repaint_transitions(n, jumps, 0)


def _reference_schedule(t_T, jump_length, jump_n_sample):
    """andreas128/RePaint's guided_diffusion/scheduler.py get_schedule_jump (n_sample = 1, no
    start resampling), as published: the states visited, t_T - 1 down to -1 (the data)."""
    jumps = {j: jump_n_sample - 1 for j in range(0, t_T - jump_length, jump_length)}
    t, ts = t_T, []
    while t >= 1:
        t = t - 1
        ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] = jumps[t] - 1
            for _ in range(jump_length):
                t = t + 1
                ts.append(t)
    ts.append(-1)
    return ts


@pytest.mark.parametrize("n,jumps,length", [(250, 9, 10), (50, 4, 5), (12, 2, 5), (7, 1, 1),
                                            (10, 3, 3), (6, 2, 3)])
def test_repaint_transitions_equal_the_reference_schedule(n, jumps, length):
    """The transitions are the reference code's: state t there is our visited index n - 1 - t."""
    ref = _reference_schedule(n, length, jumps + 1)
    kind, step = inpainting.repaint_transitions(n, jumps, length)
    want_kind, want_step = [], []
    for last, cur in zip(ref[:-1], ref[1:]):
        if cur < last:   # reverse: our step k = n - 1 - last (ts[k] -> ts[k + 1])
            want_kind.append(0)
            want_step.append(n - 1 - last)
        else:            # forward: ts[k + 1] -> ts[k], ts[k + 1] being state `last`
            want_kind.append(1)
            want_step.append(n - 2 - last)
    np.testing.assert_array_equal(kind, want_kind)
    np.testing.assert_array_equal(step, want_step)


def test_repaint_runs_a_bfloat16_chain_with_jumps():
    """A bf16 chain stays bf16 through the replacement (q_sample's float32 coefficients) and the
    jumps (both branches of lax.cond agree), and is close to the float32 chain."""
    known = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1), minval=-1.0, maxval=1.0)
    mask = jnp.asarray(inpainting.box_mask(8, 8, (4, 0, 8, 8)))
    x_T = noise.initial_noise(jax.random.key(0), known.shape)
    run = lambda x: inpainting.repaint_chain(  # noqa: E731
        _zero_eps(LINEAR), LINEAR, x, known, mask, rng=jax.random.key(2), sampler="ddim",
        eta=1.0, num_steps=6, jumps=2, jump_length=2)
    low, full = jax.jit(run)(x_T.astype(jnp.bfloat16)), jax.jit(run)(x_T)
    assert low.dtype == jnp.bfloat16 and full.dtype == jnp.float32
    assert np.isfinite(np.asarray(low, np.float32)).all()
    np.testing.assert_allclose(np.asarray(low, np.float32), np.asarray(full), rtol=0.1, atol=0.1)


# --- 4. RePaint with nothing known is the plain chain --------------------------------------

@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.6), ("dpmpp_2m", 0.0)])
def test_repaint_without_known_pixels_and_jumps_is_samplers_chain(sampler, eta):
    """RePaint with nothing known and no jumps equals samplers.chain (same rng, ids and noise)."""
    mixture = analytic.GaussianMixture.create(
        [0.5, 0.5], [[-1.0, 0.5, 0.0], [1.0, -0.5, 0.5]], [[0.3, 0.5, 0.4], [0.6, 0.2, 0.4]])
    schedule = make_schedule("cosine", 200)
    den = _mixture_denoiser(mixture, schedule)
    rng, ids = jax.random.key(11), jnp.asarray([7, 1, 3, 12])
    x_T = noise.initial_noise(rng, (4, 3), ids)
    known = jnp.full((4, 3), 0.7)
    args = dict(sampler=sampler, num_steps=12, eta=eta, rng=rng, sample_ids=ids)
    plain = jax.jit(lambda x: samplers.chain(den, schedule, x, **args))(x_T)
    repaint = jax.jit(lambda x, m: inpainting.repaint_chain(den, schedule, x, known, m, jumps=0,
                                                            **args))
    out = repaint(x_T, jnp.zeros((4, 1)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain), rtol=0, atol=1e-6)
    # ... and the mask matters: with every pixel known, the output is not the plain chain's.
    assert np.abs(np.asarray(repaint(x_T, jnp.ones((4, 1)))) - np.asarray(plain)).max() > 0.05


# --- 5. the training masks -----------------------------------------------------------------

def _is_box(unknown):
    ys, xs = np.nonzero(unknown)
    if not len(ys):
        return False, (0, 0)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    return bool(unknown[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()), (h, w)


def test_random_masks_are_boxes_or_strokes_that_keep_and_regenerate_something():
    """random_masks: binary, deterministic per key, half exact boxes, each keeps and regenerates."""
    n = 256
    masks = jax.jit(inpainting.random_masks, static_argnums=(1, 2, 3))
    m = np.asarray(masks(jax.random.key(5), n, H, W))
    assert m.shape == (n, H, W, 1) and m.dtype == np.float32
    assert set(np.unique(m)) == {0.0, 1.0}
    np.testing.assert_array_equal(m, np.asarray(masks(jax.random.key(5), n, H, W)))
    assert (m != np.asarray(masks(jax.random.key(6), n, H, W))).any()
    unknown = m[..., 0] == 0
    frac = unknown.mean(axis=(1, 2))
    assert (frac > 0).all() and (frac < 1).all()
    assert 0.1 <= frac.mean() <= 0.6
    kinds = [_is_box(u) for u in unknown]
    boxes = [hw for is_box, hw in kinds if is_box]
    assert 80 <= len(boxes) <= 176  # Bernoulli(1/2) of 256: 128 +- 6 sd
    assert all(H // 4 <= h <= 3 * H // 4 and W // 4 <= w <= 3 * W // 4 for h, w in boxes)
    box_frac = np.asarray([f for f, (b, _) in zip(frac, kinds) if b])
    assert box_frac.min() >= 1 / 16 and box_frac.max() <= 9 / 16
    assert 0.2 <= box_frac.mean() <= 0.3  # E[h] E[w] / (H W) = 8 * 8 / 256
    # both kinds appear in one draw, boxes reach the image's borders
    assert len(boxes) < n
    assert any(u[0].any() for u, (b, _) in zip(unknown, kinds) if b)
    assert any(u[:, -1].any() for u, (b, _) in zip(unknown, kinds) if b)


def test_box_mask_and_parse_box():
    """box_mask zeroes exactly the box (x1, y1 exclusive) or refuses it; parse_box reads 4 ints."""
    m = inpainting.box_mask(4, 6, (1, 2, 4, 3))
    want = np.ones((4, 6, 1), np.float32)
    want[2, 1:4] = 0.0
    np.testing.assert_array_equal(m, want)
    for bad in [(0, 0, 7, 4), (2, 0, 2, 4), (0, 3, 6, 2), (-1, 0, 3, 3)]:
        with pytest.raises(ValueError, match="is not a box inside the 6x4 image"):
            inpainting.box_mask(4, 6, bad)
    assert parse_box("8,0,16,16") == (8, 0, 16, 16)
    for bad in ("1,2,3", "a,b,c,d", "1,2,3,4,5"):
        with pytest.raises(ValueError, match="takes four integers"):
            parse_box(bad)


# --- 6. devices and batch sizes ------------------------------------------------------------

def test_glide_inpainting_is_the_same_on_1_device_with_batch_1(glide, glide_job, digit, tmp_path):
    """GLIDE's job writes the same PNGs on 1 device with batch 1 as on 8 devices with batch 7."""
    x8, rows8, _ = glide_job
    options = stage_options(glide, steps=4, inpaint="glide")
    x1, rows1, _, _ = _job(glide, digit[0], tmp_path / "one", options=options,
                           guidance_weights=(0.0, 2.0), batch=1, devices=jax.devices()[:1],
                           method="glide")
    np.testing.assert_array_equal(x1, x8)
    assert rows1 == rows8


def test_repaint_with_jumps_is_the_same_on_8_devices_and_1(base, digit, tmp_path):
    """RePaint with jumps writes the same PNGs on 8 devices (batch 7) and 1 device (batch 1)."""
    options = stage_options(base, **REPAINT)
    out = {}
    for name, devices, batch in (("8dev_b7", None, 7), ("1dev_b1", jax.devices()[:1], 1)):
        out[name] = _job(base, digit[0], tmp_path / name, options=options, batch=batch,
                         devices=devices, guidance_weights=(2.0,), method="repaint")
    (x8, rows8, mask, _), (x1, rows1, _, _) = out["8dev_b7"], out["1dev_b1"]
    np.testing.assert_array_equal(x1, x8)
    assert rows1 == rows8 and len(rows8) == 3
    assert rows8[0]["inpaint"]["method"] == "repaint"
    # Different sample ids regenerate different right halves.
    keep = _known_bool(mask)
    assert np.abs(x8[0][~keep].astype(int) - x8[1][~keep].astype(int)).max() > 8


# --- 7. refusals before anything is written -----------------------------------------------

_refused = assert_refused


CASES = {
    "mask_size": ("glide", ["--mask", "{mask8}"], r"the mask must have the image's size"),
    "mask_black": ("glide", ["--mask", "{black}"], r"the mask has no known pixel"),
    "mask_white": ("base", ["--mask", "{white}"], r"the mask has no pixel to regenerate"),
    "box_all": ("base", ["--mask_box", "0,0,16,16"], r"the mask has no known pixel"),
    "box_outside": ("base", ["--mask_box", "0,0,17,16"], r"is not a box inside the 16x16 image"),
    "box_format": ("base", ["--mask_box", "1,2,3"], r"--mask_box takes four integers"),
    "not_an_image": ("base", ["--mask_box", "8,0,16,16", "--inpaint", "{text}"],
                     r"--inpaint .*notes.png is not an image Pillow can read"),
    "image_size": ("base", ["--mask_box", "8,0,16,16", "--inpaint", "{mask8}"],
                   r"is 8x8 \(width x height\), but the model makes 16x16 images"),
    "learned_on_fixed": ("base", ["--mask_box", "8,0,16,16", "--sampler", "ddpm",
                                  "--ddpm_variance", "learned"],
                         r"--ddpm_variance learned needs a model trained with a learned variance"),
    "glide_without_inpaint": ("glide", None, r"GLIDE's mask-conditioned inpainting model.*needs "
                                             r"an image and a mask"),
    "mask_without_inpaint": ("base", ["--mask", "{white}", "--no_inpaint"],
                             r"--mask needs --inpaint IMAGE"),
    "jumps_with_glide": ("glide", ["--mask_box", "8,0,16,16", "--repaint_jumps", "2"],
                         r"--repaint_jumps / --repaint_jump_length are RePaint's"),
    "jump_length_with_glide": ("glide", ["--mask_box", "8,0,16,16", "--repaint_jump_length", "5"],
                               r"--repaint_jumps / --repaint_jump_length are RePaint's"),
    "jumps_without_room": ("base", ["--mask_box", "8,0,16,16", "--sampler", "ddpm",
                                    "--repaint_jumps", "2", "--repaint_jump_length", "2"],
                           r"a chain of 2 steps has no such point"),
    "no_region": ("base", [], r"--inpaint needs the region to regenerate"),
    "jumps_with_multistep": ("base", ["--mask_box", "8,0,16,16", "--sampler", "dpmpp_2m",
                                      "--repaint_jumps", "2"],
                             r"the multistep sampler 'dpmpp_2m' cannot resume"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_inpainting_input_is_refused_before_anything_is_written(
        case, tiny_workdir, tiny_inpaint, digit, tmp_path, capfd, request):
    """Each bad inpainting input is refused with its reason before OUTDIR is created."""
    model, extra, want = CASES[case]
    paths = {"mask8": tmp_path / "mask8.png", "black": tmp_path / "black.png",
             "white": tmp_path / "white.png", "text": tmp_path / "notes.png"}
    images.save_png(str(paths["mask8"]), np.full((8, 8, 1), 255, np.uint8))
    images.save_png(str(paths["black"]), np.zeros((H, W, 1), np.uint8))
    images.save_png(str(paths["white"]), np.full((H, W, 1), 255, np.uint8))
    paths["text"].write_text("not an image")
    workdir = {"glide": tiny_inpaint, "base": tiny_workdir}.get(model) or request.getfixturevalue(
        "tiny_latent")
    args = ["--workdir", workdir, "--prompt", "seven",
            "--steps", "2", "--num_per_prompt", "1"]
    if extra is not None:
        extra = [a.format(**{k: str(v) for k, v in paths.items()}) for a in extra]
        if "--no_inpaint" in extra:
            extra.remove("--no_inpaint")
        elif "--inpaint" not in extra:
            extra = ["--inpaint", digit[0]] + extra
        args += extra
    _refused(args, tmp_path / "out", capfd, want)


# --- 8. records, resuming, and another mask in the same OUTDIR -----------------------------

def _pix(path):
    """The sha256 of the pixels the model sees: the grey PNG's levels in [-1, 1], decoded here."""
    from t2i_jax.user_images import pixels_sha256
    return pixels_sha256(images.load_png(path).astype(np.float32) / 127.5 - 1.0)


def _mtimes(outdir):
    d = os.path.join(outdir, "images")
    return {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in sorted(os.listdir(d))}


def test_repaint_records_resume_and_refuse_another_box(tiny_workdir, digit, tmp_path, capfd):
    """RePaint records (method, jumps, sha256, box); a rerun resumes; another box is another job."""
    path, _ = digit
    out = tmp_path / "out"
    cmd = ["--workdir", tiny_workdir, "--prompt", "seven", "--num_per_prompt", "2", "--steps", "4",
           "--sampler", "ddpm", "--inpaint", path, "--repaint_jumps", "1",
           "--repaint_jump_length", "2", "--outdir", str(out), "--no_progress"]
    assert sample_cli.run(cmd + ["--mask_box", "8,0,16,16"]) == 0
    rows = files.read_jsonl(str(out / out_lib.SAMPLES_FILE))
    assert len(rows) == 2
    for r in rows:
        assert r["inpaint"] == {"method": "repaint", "image": os.path.abspath(path),
                                "image_sha256": _sha(path), "image_pixels_sha256": _pix(path),
                                "mask_box": [8, 0, 16, 16],
                                "known_fraction": 0.5, "jumps": 1, "jump_length": 2}
    before = _mtimes(str(out))
    capfd.readouterr()
    assert sample_cli.run(cmd + ["--mask_box", "8,0,16,16"]) == 0
    assert "(0 generated now, 1 shard(s) were already done)" in capfd.readouterr().err
    assert _mtimes(str(out)) == before
    assert sample_cli.run(cmd + ["--mask_box", "0,0,8,16"]) != 0
    err = capfd.readouterr().err
    assert "holds another sampling job" in err and "inpaint" in err, err
    assert _mtimes(str(out)) == before
    assert files.read_jsonl(str(out / out_lib.SAMPLES_FILE)) == rows


def test_glide_records_resume_and_refuse_a_changed_mask_file(tiny_inpaint, digit, tmp_path, capfd):
    """GLIDE records (image, mask sha256); a rerun resumes; a changed mask file is another job."""
    path, ref = digit
    mask_path = tmp_path / "mask.png"
    m = np.full((H, W, 1), 255, np.uint8)
    m[4:12, 4:12] = 0  # regenerate the centre
    images.save_png(str(mask_path), m)
    out = tmp_path / "out"
    cmd = ["--workdir", tiny_inpaint, "--prompt", "seven", "--num_per_prompt", "2", "--steps", "3",
           "--guidance", "1", "--inpaint", path, "--mask", str(mask_path), "--outdir", str(out),
           "--no_progress"]
    assert sample_cli.run(cmd) == 0
    x, rows = out_lib.load_images(str(out))
    for r in rows:
        assert r["inpaint"] == {"method": "glide", "image": os.path.abspath(path),
                                "image_sha256": _sha(path), "image_pixels_sha256": _pix(path),
                                "mask": os.path.abspath(str(mask_path)),
                                "mask_sha256": _sha(str(mask_path)),
                                "mask_pixels_sha256": _pix(str(mask_path)),
                                "known_fraction": 0.75}
        assert r["ddpm_variance"] == "learned" and r["sampler"] == "ddpm"
    keep = m[..., 0] == 255
    for im in x:
        np.testing.assert_array_equal(im[keep], ref[keep])
        assert np.abs(im[~keep].astype(int) - ref[~keep].astype(int)).mean() > 8
    before = _mtimes(str(out))
    capfd.readouterr()
    assert sample_cli.run(cmd) == 0
    assert "(0 generated now, 1 shard(s) were already done)" in capfd.readouterr().err
    assert _mtimes(str(out)) == before
    m[4:12, 4:12] = 255
    m[0:4] = 0
    images.save_png(str(mask_path), m)  # the same path, another mask
    assert sample_cli.run(cmd) != 0
    err = capfd.readouterr().err
    assert "holds another sampling job" in err and "mask_sha256" in err, err
    assert _mtimes(str(out)) == before
