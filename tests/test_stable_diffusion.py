"""Stable Diffusion from a diffusers pipeline folder, against diffusers itself: `sample.py
--workdir FOLDER --init_noise X.npy` writes the images StableDiffusionPipeline returned for the
same x_T, prompts and guidance_scale 7.5 (within 2 grey levels), for DDIM, DPM-Solver++(2M) and
Euler, negative prompts and img2img at strength 0.6, on tiny random pipelines in SD 1.x's and SD
2.x's shapes (tests/fixtures/sd: written by diffusers' save_pretrained; the outputs by its own
pipelines, make_fixtures.py). Then the job's invariances and the folder's refusals."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import sample as sample_cli

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "sd")
PIPE = dict(np.load(os.path.join(HERE, "pipelines.npz")))
SAMPLER = {"DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpmpp_2m",
           "EulerDiscreteScheduler": "euler", "PNDMScheduler": "pndm"}


def _folder(v):
    return os.path.join(HERE, f"tiny_{v}")


def _images(out, n):
    return np.stack([np.asarray(Image.open(os.path.join(out, "images", f"{i:06d}.png")))
                     for i in range(n)]).astype(np.float64)


def _run(tmp_path, folder, cases, extra=(), name="out"):
    """One sample.py job over the cases' prompts (rows in order; each case's negative prompt
    per prompt), each chain started from the case's own x_T; returns (images, diffusers')."""
    prompts, negatives, noise, want = [], [], [], []
    for case in cases:
        for k, p in enumerate(PIPE[f"{case}.prompts"]):
            prompts.append(str(p))
            negatives.append(str(PIPE[f"{case}.negative_prompt"]))
            noise.append(np.transpose(PIPE[f"{case}.noise"][k], (1, 2, 0)))   # NCHW -> HWC
            want.append(PIPE[f"{case}.images"][k] * 255.0)
    first = cases[0]
    assert all(str(PIPE[f"{c}.scheduler"]) == str(PIPE[f"{first}.scheduler"]) for c in cases)
    path = tmp_path / f"{name}_noise.npy"
    np.save(path, np.stack(noise).astype(np.float32))
    out = str(tmp_path / name)
    argv = ["--workdir", folder, "--outdir", out, "--num_per_prompt", "1",
            "--guidance", str(float(PIPE[f"{first}.guidance_scale"]) - 1.0),  # w = g - 1
            "--sampler", SAMPLER[str(PIPE[f"{first}.scheduler"])],
            "--steps", str(int(PIPE[f"{first}.num_inference_steps"])),
            "--init_noise", str(path), "--no_progress"]
    for p in prompts:
        argv += ["--prompt", p]
    if any(negatives):
        for n in negatives:
            argv += ["--negative_prompt", n]
    assert sample_cli.run(argv + list(extra)) == 0
    return _images(out, len(prompts)), np.stack(want), out


def _assert_within_two_levels(got, want):
    diff = np.abs(got - want)
    print(f"[max {diff.max():.3f} grey levels, mean {diff.mean():.3f}]")
    assert diff.max() <= 2.0, f"max {diff.max():.2f} grey levels from diffusers' pipeline"


@pytest.mark.slow
@pytest.mark.parametrize("v,cases", [
    ("sd1", ["sd1_ddim", "sd1_ddim_negative"]),   # a negative prompt in the second pair of rows
    ("sd1", ["sd1_dpmpp_2m"]),
    ("sd1", ["sd1_euler"]),                        # SD 1.5's config: linspace, t = 799.2, ...
    ("sd1", ["sd1_pndm"]),                         # the folder's own PLMS
    ("sd2", ["sd2_ddim"]),                         # v-prediction, fp16 files, linear proj_in
    ("sd2", ["sd2_dpmpp_2m"]),
    ("sd2", ["sd2_euler"]),
])
def test_sample_py_writes_diffusers_images(tmp_path, v, cases):
    got, want, out = _run(tmp_path, _folder(v), cases)
    _assert_within_two_levels(got, want)
    job = json.load(open(os.path.join(out, "job.json")))
    assert job["decoder"]["kind"] == "diffusers" and len(job["decoder"]["sha256"]) == 64
    assert job["init_noise"]["shape"] == [len(got), 8, 8, 4]


@pytest.mark.slow
@pytest.mark.parametrize("v", ["sd1", "sd2"])
def test_img2img_at_strength_0_6_equals_diffusers(tmp_path, v):
    case = f"{v}_img2img"
    init = os.path.join(HERE, "init.png")
    np.testing.assert_array_equal(np.asarray(Image.open(init).convert("RGB")),
                                  PIPE[f"{case}.init_image"])
    got, want, out = _run(tmp_path, _folder(v), [case], extra=[
        "--init_image", init, "--strength", str(float(PIPE[f"{case}.strength"]))])
    _assert_within_two_levels(got, want)
    assert json.load(open(os.path.join(out, "job.json")))["img2img"]["strength"] == 0.6


@pytest.mark.slow
def test_euler_on_leading_spacing_of_an_edited_folder_and_its_new_identity(tmp_path):
    """Euler with the folder's own "leading" spacing (integer timesteps, x_T at sqrt(1 +
    sigma^2)); the edited folder is another model: a job made with the original is refused."""
    folder = tmp_path / "sd1_leading"
    shutil.copytree(_folder("sd1"), folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.load(open(path))
    config["timestep_spacing"] = "leading"
    json.dump(config, open(path, "w"))
    got, want, out = _run(tmp_path, str(folder), ["sd1_euler_leading"])
    _assert_within_two_levels(got, want)
    # the same outdir with the original folder: another content hash, refused before writing
    noise = str(tmp_path / "out_noise.npy")
    before = sorted(os.listdir(os.path.join(out, "images")))
    code = sample_cli.run(["--workdir", _folder("sd1"), "--outdir", out, "--num_per_prompt", "1",
                           "--guidance", "6.5", "--sampler", "euler", "--steps", "6",
                           "--init_noise", noise, "--no_progress"]
                          + sum((["--prompt", str(p)] for p in PIPE["sd1_euler_leading.prompts"]), []))
    assert code != 0
    assert sorted(os.listdir(os.path.join(out, "images"))) == before


def test_weights_are_read_in_the_files_dtype_and_computed_in_float32():
    """An fp16 folder (tiny_sd2's .fp16. files) is held in fp16 (half the memory), fp32 in fp32;
    either is computed in float32 (its pipeline equality: test_sample_py_writes_diffusers_images)."""
    import jax
    from t2i_jax.models.pretrained import pipeline
    for v, want in (("sd1", np.float32), ("sd2", np.float16)):
        folder = pipeline.load(_folder(v))
        for tree in (folder.unet[1], folder.vae[1]):
            assert {np.dtype(a.dtype) for a in jax.tree_util.tree_leaves(tree)} == {np.dtype(want)}
        assert folder.unet[0].dtype == "float32"


# --- bad input: one line naming the file and the field, nothing written --------------------

def _edit(tmp_path, edit):
    folder = tmp_path / "folder"
    shutil.copytree(_folder("sd1"), folder)
    edit(folder)
    return str(folder)


def _json_edit(rel, **changes):
    def edit(folder):
        path = folder / rel
        config = json.load(open(path))
        config.update(changes)
        json.dump(config, open(path, "w"))
    return edit


def _tensors_edit(change):
    def edit(folder):
        from safetensors.numpy import load_file, save_file
        path = str(folder / "unet" / "diffusion_pytorch_model.safetensors")
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)
    return edit


def _remove(rel):
    def edit(folder):
        target = folder / rel
        shutil.rmtree(target) if target.is_dir() else os.remove(target)
    return edit


def _bin_only(folder):
    os.remove(folder / "vae" / "diffusion_pytorch_model.safetensors")
    (folder / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"torch pickle")


BAD_FOLDERS = [
    (_remove("model_index.json"), "has no model_index.json: it is a diffusers pipeline folder without"),
    (_remove("vae"), "has no vae/ subfolder, which model_index.json lists"),
    (_remove("unet/diffusion_pytorch_model.safetensors"), "unet has no weights"),
    (_tensors_edit(lambda t: t.pop("conv_in.weight")), "missing tensor 'conv_in.weight'"),
    (_tensors_edit(lambda t: t.update({"conv_in.bias": np.zeros(7, np.float32)})),
     "tensor 'conv_in.bias' has shape (7,)"),
    (_json_edit("unet/config.json", addition_embed_type="text_time"), "addition_embed_type"),
    (_json_edit("unet/config.json", class_embed_type="timestep"), "class_embed_type"),
    (_json_edit("scheduler/scheduler_config.json", _class_name="LMSDiscreteScheduler"),
     "scheduler_config.json: _class_name='LMSDiscreteScheduler'"),
    (_json_edit("scheduler/scheduler_config.json", _class_name="DPMSolverMultistepScheduler",
                use_karras_sigmas=True), "use_karras_sigmas=True"),
    (_bin_only, "holds only PyTorch pickles ['diffusion_pytorch_model.bin']"),
    (_json_edit("model_index.json", _class_name="StableDiffusionXLPipeline"),
     "_class_name='StableDiffusionXLPipeline' is a pipeline this project does not read"),
]


@pytest.mark.parametrize("edit,words", BAD_FOLDERS)
def test_a_bad_folder_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys, edit, words):
    folder = _edit(tmp_path, edit)
    out = tmp_path / "out"
    code = sample_cli.run(["--workdir", folder, "--outdir", str(out), "--prompt", "a red circle",
                           "--no_progress"])
    err = capsys.readouterr().err
    assert code in (1, 2) and words in err, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("argv,words", [
    (["--strength", "0"], "--strength must be in (0, 1]"),
    (["--strength", "1.5"], "--strength must be in (0, 1]"),
    (["--strength", "0.5"], "--strength is img2img's: it needs --init_image IMAGE"),
])
def test_bad_strength_is_refused_by_the_flags(tmp_path, capsys, argv, words):
    init = [] if "--init_image" in words else ["--init_image", os.path.join(HERE, "init.png")]
    if argv == ["--strength", "0.5"]:
        init = []
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        sample_cli.run(["--workdir", _folder("sd1"), "--outdir", str(out), "--prompt", "a",
                        *init, *argv])
    assert e.value.code == 2 and words in capsys.readouterr().err
    assert not out.exists()


def test_init_noise_of_the_wrong_shape_is_refused_naming_both_shapes(tmp_path, capsys):
    path = tmp_path / "noise.npy"
    np.save(path, np.zeros((2, 16, 16, 4), np.float32))   # pixel-sized, not 8x8 latents
    out = tmp_path / "out"
    code = sample_cli.run(["--workdir", _folder("sd1"), "--outdir", str(out), "--prompt", "a",
                           "--num_per_prompt", "3", "--init_noise", str(path), "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and "has shape [2, 16, 16, 4], but this job starts 3 chains" in err, err
    assert "[3, 8, 8, 4]" in err and not out.exists()


@pytest.mark.parametrize("v", ["sd1", "sd2"])
def test_the_folder_s_tokenizer_and_text_encoder_equal_transformers(v):
    """The tokenizer (vocab.json + merges.txt for sd1, tokenizer.json with pad "!" for sd2; one
    prompt truncated at 77) gives transformers' ids, and the CLIP text encoder run without a
    padding mask, as StableDiffusionPipeline runs it, gives its last_hidden_state and pooled
    output at float32 precision (tensors saved by transformers v5, without text_model.)."""
    from t2i_jax.models import pretrained
    mods = dict(np.load(os.path.join(HERE, "modules.npz")))
    enc = pretrained.load(os.path.join(_folder(v), "text_encoder"), kind="clip",
                          tokenizer_dir=os.path.join(_folder(v), "tokenizer"), mask_padding=False)
    feats, toks = enc.encode([str(p) for p in mods[f"{v}.text.prompts"]], warn=False)
    np.testing.assert_array_equal(toks.ids, mods[f"{v}.text.input_ids"])
    assert toks.truncated[1] and not toks.truncated[0]
    for got, key in ((feats.tokens, "last_hidden_state"), (feats.pooled, "pooler_output")):
        want = mods[f"{v}.text.{key}"]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


# --- inpainting: RePaint in latent space ----------------------------------------------------

def test_latent_mask_is_the_min_pool_of_the_pixel_mask():
    from t2i_jax.diffusion.inpainting import latent_mask
    rng = np.random.default_rng(0)
    mask = (rng.random((2, 16, 24, 1)) > 0.1).astype(np.float32)
    got = np.asarray(latent_mask(mask, 8))
    want = np.array([[[[mask[b, 8 * i:8 * i + 8, 8 * j:8 * j + 8].min()] for j in range(3)]
                      for i in range(2)] for b in range(2)])
    np.testing.assert_array_equal(got, want)


def test_repaint_in_latent_space_keeps_the_encoded_known_latents_and_runs_from_sample_py(tmp_path):
    """The chain runs on latents: the image's encoded latents (VAE posterior mean x
    scaling_factor) where every pixel of a latent cell is known, the model's elsewhere; the last
    x0 holds exactly the known latents there (RePaint's final paste). Read before the decoder."""
    import jax
    import jax.numpy as jnp
    from t2i_jax.diffusion.inpainting import box_mask
    from t2i_jax.sampling.generate import SampleOptions, make_generate_fn
    from t2i_jax.sampling.load import load_trained
    trained = load_trained(_folder("sd1"))
    fam = trained.family
    image = np.asarray(Image.open(os.path.join(HERE, "init.png")).convert("RGB"),
                       np.float32) / 127.5 - 1.0
    mask = box_mask(64, 64, (0, 0, 36, 20))[None].astype(np.float32)       # [1, 64, 64, 1]
    cond = fam.conditioning.of_prompts(["a red circle"]).replace(
        known=jnp.asarray(image[None]), known_mask=jnp.asarray(mask))
    opts = SampleOptions("ddim", 6, thresholding=None, inpaint="repaint")
    latents = dataclasses.replace(fam)            # the same family, its decoder left out
    latents.to_output = lambda inputs, x0: x0
    x0 = make_generate_fn(latents, opts)(trained.params, cond, jax.random.key(0),
                                         jnp.asarray([6.5]), jnp.arange(1))
    known = np.asarray(jax.jit(fam.encode_image)(fam.sampling_inputs(), image[None]))
    cells = np.asarray(mask).reshape(1, 8, 8, 8, 8, 1).min(axis=(2, 4))[..., 0] > 0   # [1, 8, 8]
    assert 0 < cells.sum() < 64
    np.testing.assert_array_equal(np.asarray(x0)[cells], known[cells])
    assert np.abs(np.asarray(x0)[~cells] - known[~cells]).mean() > 0.1
    out = tmp_path / "paint"
    assert sample_cli.run(["--workdir", _folder("sd1"), "--outdir", str(out), "--prompt", "a",
                           "--num_per_prompt", "1", "--steps", "4", "--sampler", "ddim",
                           "--inpaint", os.path.join(HERE, "init.png"), "--mask_box",
                           "0,0,36,20", "--no_progress"]) == 0
    assert json.load(open(out / "job.json"))["inpaint"]["method"] == "repaint"


@pytest.mark.slow
def test_a_folder_job_is_the_same_on_1_and_8_devices_any_batch_and_resumed(tmp_path):
    """The folder as a stage keeps the job's guarantees: a CFG sweep (w = 0, 6.5) and a
    negative prompt in one compilation, the same PNGs on 8 devices with batch 1 and on 1 device
    with batch 7 up to float32 rounding (XLA's CPU reductions over a short last axis sum in
    another order for another batch: a row sum of 32 values moves by ~3e-6 between batch 1 and
    7, which the ports' LayerNorms and softmaxes carry to at most 1 grey level of a few pixels),
    and a job whose last shard was lost finishes to the same bytes."""
    import jax
    from t2i_jax.sampling import job as job_lib
    from t2i_jax.sampling import outdir as out_lib
    from t2i_jax.sampling import planner
    from t2i_jax.sampling.request import Request
    request = Request(workdir=_folder("sd2"), outdir=str(tmp_path / "unused"),
                      prompts=["a red circle", "a yellow triangle"], num_per_prompt=3,
                      guidance=[0, 6.5], steps=4, sampler="dpmpp_2m", shard_size=5,
                      negative_prompt=["a green square"])
    request.check()
    plan = planner.build(request)
    runs, compiled = {}, []
    for name, devices, batch in (("8dev_b1", None, 1), ("1dev_b7", jax.devices()[:1], 7)):
        res = job_lib.run_job(plan, str(tmp_path / name), batch_size=batch, devices=devices,
                              progress=False)
        compiled.append(res.compilations)
        runs[name] = out_lib.load_images(str(tmp_path / name))
    assert compiled == [1, 1]
    (a, rows), (b, _) = runs["8dev_b1"], runs["1dev_b7"]
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
    assert rows[0]["negative_prompt"] == "a green square" and len(rows) == 12
    assert np.abs(a[:6].astype(int) - a[6:].astype(int)).max() > 8    # w changes the images
    out = str(tmp_path / "8dev_b1")
    os.remove(os.path.join(out, out_lib.shard_file(2)))                # the last shard lost
    os.remove(os.path.join(out, "images", "000011.png"))
    res = job_lib.run_job(plan, out, batch_size=4, progress=False)
    assert res.generated == 2
    np.testing.assert_array_equal(out_lib.load_images(out)[0], a)


def test_a_folder_read_onto_a_mesh_is_split_over_fsdp_and_computes_the_same(monkeypatch):
    """pipeline.load(mesh=) reads each tensor one slice per device (weights.load_params): with
    fsdp = 4 the large UNet tensors are split over "fsdp" (the tiny UNet's too, with the size
    below which tensors stay whole lowered), and the UNet gives what the host copy gives."""
    import jax
    from t2i_jax import sharding as mesh_lib
    monkeypatch.setattr(mesh_lib, "MIN_SHARDED_SIZE", 256)
    from t2i_jax.models.pretrained import pipeline
    from t2i_jax.models.unet2d_condition import UNet2DConditionModel
    host = pipeline.load(_folder("sd1"))
    mesh = mesh_lib.make_mesh(4)
    placed = pipeline.load(_folder("sd1"), mesh=mesh)
    leaves = jax.tree_util.tree_leaves(placed.unet[1])
    split = [a for a in leaves if "fsdp" in str(a.sharding.spec)]
    assert split and all(len(a.addressable_shards) == 8 for a in leaves)
    big = max(split, key=lambda a: a.size)
    assert big.addressable_shards[0].data.size * 4 == big.size   # a quarter on each device
    mods = dict(np.load(os.path.join(HERE, "modules.npz")))
    x = np.transpose(mods["sd1.unet.sample"], (0, 2, 3, 1))
    t, ctx = mods["sd1.unet.timestep"], mods["sd1.unet.encoder_hidden_states"]
    unet = UNet2DConditionModel(host.unet[0])
    with jax.set_mesh(mesh):
        got = np.asarray(jax.jit(unet.apply)(placed.unet[1], x, t, ctx))
    want = np.asarray(jax.jit(unet.apply)(host.unet[1], x, t, ctx))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
