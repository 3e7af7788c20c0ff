"""Fine-tuning a Stable Diffusion folder (families/stable_diffusion.py, configs/sd_finetune.py):
one step's loss and gradient against diffusers' train_text_to_image.py step on the same tiny
pipeline, batch, noises and timesteps (tests/fixtures/sd/finetune_step.npz, made with torch by
make_finetune_step.py); learning rate 0 and LoRA at B = 0 sample the base folder bit for bit;
a LoRA checkpoint holds the factors alone."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax import families
from t2i_jax.diffusion import forward, losses
from t2i_jax.models.weights import to_flax_layout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_families  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sd")
STEP = os.path.join(FIXTURES, "finetune_step.npz")


def nhwc(a):
    return np.transpose(np.asarray(a), (0, 2, 3, 1))


def sd_family(version="sd1", **train):
    config = tiny_families.get_config("sd_finetune")
    config.model.pretrained = os.path.join(FIXTURES, f"tiny_{version}")
    config.model.dtype = "float32"
    config.train.update(train)
    return families.build(config)


@pytest.fixture(scope="module")
def step_fixture():
    return np.load(STEP)


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_one_step_loss_and_gradient_equal_diffusers_training_step(step_fixture, version):
    ref = {k[len(version) + 1:]: step_fixture[k] for k in step_fixture.files
           if k.startswith(version + ".")}
    family = sd_family(version)
    assert family.prediction == {"epsilon": "eps", "v_prediction": "v"}[str(ref["prediction_type"])]
    hp = family.hparams()
    # the frozen VAE's posterior and the scaled latents
    mean, logvar = family.posterior_moments(hp["vae"], jnp.asarray(nhwc(ref["pixel_values"])))
    np.testing.assert_allclose(mean, nhwc(ref["latent_mean"]), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(logvar, nhwc(ref["latent_logvar"]), atol=2e-5, rtol=1e-5)
    z0 = family.latents(mean, logvar, jnp.asarray(nhwc(ref["posterior_noise"])))
    np.testing.assert_allclose(z0, nhwc(ref["latents"]), atol=2e-5, rtol=1e-5)
    # the caption's tokens and CLIP features ("" is the null row: the encoding of "")
    prompts = [str(p) for p in ref["prompts"]]
    cond = family.conditioning.of_prompts(prompts)
    np.testing.assert_array_equal(np.asarray(cond.tokens), ref["input_ids"])
    cond = family.with_text_features(hp["text_encoder"], cond)
    np.testing.assert_allclose(cond.features, ref["encoder_hidden_states"], atol=2e-5, rtol=1e-5)
    t = jnp.asarray(ref["timesteps"], jnp.int32)
    noise = jnp.asarray(nhwc(ref["noise"]))
    z0 = jnp.asarray(nhwc(ref["latents"]))
    x_t = forward.q_sample(family.schedule, z0, t, noise)
    np.testing.assert_allclose(x_t, nhwc(ref["noisy_latents"]), atol=2e-5, rtol=1e-5)
    feats = cond.replace(features=jnp.asarray(ref["encoder_hidden_states"]))

    def loss(params, weighting):
        out = family.apply_model(params, x_t, t, feats, None, hp)
        per = losses.per_example_loss(family.schedule, out, z0, t, noise,
                                      prediction=family.prediction, weighting=weighting,
                                      min_snr_gamma=float(ref["snr_gamma"]))
        return jnp.mean(per)

    params = family.pretrained_params()
    value, grads = jax.value_and_grad(loss)(params, "uniform")
    np.testing.assert_allclose(value, ref["loss"], rtol=2e-5)
    value_snr, grads_snr = jax.value_and_grad(loss)(params, "min_snr")
    np.testing.assert_allclose(value_snr, ref["loss_min_snr"], rtol=2e-5)
    flat = {"/".join(str(k.key) for k in path[1:]): g for path, g in
            jax.tree_util.tree_flatten_with_path(grads)[0]}
    flat_snr = {"/".join(str(k.key) for k in path[1:]): g for path, g in
                jax.tree_util.tree_flatten_with_path(grads_snr)[0]}
    pmap = family.unet_param_map
    assert len(pmap) == len(flat) == sum(k.startswith(f"{version}.grad.") for k in step_fixture.files)
    subset = set(str(n) for n in step_fixture["meta.subset"])
    worst = 0.0
    for path, (names, _, transform) in pmap.items():
        want = to_flax_layout(step_fixture[f"{version}.grad.{names[0]}"], transform)
        scale = np.abs(want).max() + 1e-12
        worst = max(worst, float(np.abs(np.asarray(flat[path]) - want).max() / scale))
        if names[0] in subset:
            want = to_flax_layout(step_fixture[f"{version}.grad_min_snr.{names[0]}"], transform)
            np.testing.assert_allclose(flat_snr[path], want, atol=1e-4 * np.abs(want).max() + 1e-9)
    assert worst < 1e-4, worst


@pytest.mark.slow
def test_remat_and_bf16_keep_the_gradient(step_fixture):
    """Rematerialised blocks give the same gradient; bf16 compute (float32 master weights)
    stays within bf16's precision of it."""
    ref = {k[4:]: step_fixture[k] for k in step_fixture.files if k.startswith("sd1.")}
    t = jnp.asarray(ref["timesteps"], jnp.int32)
    z0, noise = jnp.asarray(nhwc(ref["latents"])), jnp.asarray(nhwc(ref["noise"]))
    feats = jnp.asarray(ref["encoder_hidden_states"])
    grads = {}
    for dtype, remat in (("float32", False), ("float32", True), ("bfloat16", True)):
        family = sd_family("sd1")
        family.compute_dtype, family.remat = dtype, remat
        x_t = forward.q_sample(family.schedule, z0, t, noise)

        def loss(params):
            out = family.training_unet.apply(params, x_t, t, feats)
            return jnp.mean(losses.per_example_loss(family.schedule, out, z0, t, noise,
                                                    prediction="eps"))
        params = family.pretrained_params()
        grads[dtype, remat] = jax.grad(loss)(params)
        assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(grads[dtype, remat]))
    a, b, c = (jax.tree_util.tree_leaves(g) for g in grads.values())
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5)
    num = sum(float(jnp.sum((x - z) ** 2)) for x, z in zip(a, c))
    den = sum(float(jnp.sum(x ** 2)) for x in a)
    assert np.sqrt(num / den) < 0.05   # bf16 has 8 bits of mantissa


# ---------------------------------------------------------------------------------------------
# Fine-tuned workdirs: learning rate 0 and LoRA at B = 0 sample the base; LoRA checkpoints; export

def _sample(workdir, out, *extra):
    import sample as sample_cli
    argv = ["--workdir", str(workdir), "--outdir", str(out), "--prompt", "seven",
            "--prompt", "a handwritten digit three", "--num_per_prompt", "1", "--steps", "4",
            "--no_progress", *extra]
    assert sample_cli.run(argv) == 0
    from PIL import Image
    return np.stack([np.asarray(Image.open(os.path.join(out, "images", f"{i:06d}.png")))
                     for i in range(2)])


@pytest.fixture(scope="module")
def zero_lr_runs(data_dir, tmp_path_factory):
    """A full fine-tune and a LoRA run of 2 steps at learning rate 0 (no warm-up), each with its
    progress grid at the end."""
    from runs import run, tiny
    root = tmp_path_factory.mktemp("zero_lr")
    for name in ("sd_finetune", "sd_lora"):
        run(tiny(data_dir, name, train__learning_rate=0.0, train__warmup_steps=0,
                 train__num_steps=2, train__sample_every=2), root / name)
    return root


@pytest.mark.slow
def test_learning_rate_0_and_lora_at_b_0_sample_the_base_folder_bit_for_bit(zero_lr_runs, tmp_path):
    base = _sample(tiny_families.SD_FOLDER, tmp_path / "base")
    for name in ("sd_finetune", "sd_lora"):
        got = _sample(zero_lr_runs / name, tmp_path / name)
        np.testing.assert_array_equal(got, base)
    # the training grids (LoRA's drawn from its factors merged into the folder's UNet) agree
    grid = lambda name: (zero_lr_runs / name / "samples" / "step_0000002.png").read_bytes()  # noqa: E731
    assert grid("sd_lora") == grid("sd_finetune")


@pytest.mark.slow
def test_a_lora_checkpoint_holds_only_the_factors_and_the_base_is_read_from_the_folder(
        zero_lr_runs):
    from t2i_jax.checkpoint import Checkpointer
    from t2i_jax.sampling.load import load_trained
    trained = load_trained(str(zero_lr_runs / "sd_lora"), merge=False)
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(trained.params)[0]]
    assert paths and all(p.endswith(("['lora_a']", "['lora_b']")) for p in paths)
    # the attention projections of every transformer: q, k, v, out of attn1 and attn2
    n_attn = sum(1 for k in trained.family.unet_param_map if k.endswith("attn1/to_q/kernel"))
    assert len(paths) == 2 * 4 * 2 * n_attn
    lora_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(trained.params))
    unet_bytes = sum(np.asarray(a).nbytes for a in
                     jax.tree_util.tree_leaves(trained.family.folder.unet[1]))
    assert lora_bytes < unet_bytes / 10
    # the stored state: the factors, their EMA and Adam moments; no copy of the base UNet
    ckpt = Checkpointer(str(zero_lr_runs / "sd_lora" / "checkpoints"), read_only=True)
    state_dir = os.path.join(ckpt.directory, "2", "state")
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(state_dir) for f in fs)
    assert stored < unet_bytes, (stored, unet_bytes)
    ckpt.close()


@pytest.mark.slow
def test_export_round_trips_the_base_and_samples_what_the_workdir_samples(
        zero_lr_runs, straight_runs, tmp_path):
    from safetensors.numpy import load_file
    from t2i_jax import export
    # learning rate 0: the exported unet holds the folder's tensors exactly, names and all
    out = tmp_path / "zero"
    export.export(str(zero_lr_runs / "sd_finetune"), str(out))
    got = load_file(str(out / "unet" / export.UNET_WEIGHTS))
    want = load_file(os.path.join(tiny_families.SD_FOLDER, "unet", export.UNET_WEIGHTS))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    # a trained workdir (full and LoRA merged): sample.py on the export equals it on the workdir
    for name, extra in (("sd_finetune", ()), ("sd_lora", ("--full",))):
        _, wd = straight_runs[name]
        folder = tmp_path / f"{name}_export"
        export.export(str(wd), str(folder), full=True)
        np.testing.assert_array_equal(_sample(folder, tmp_path / f"{name}_a"),
                                      _sample(wd, tmp_path / f"{name}_b"))
    # a LoRA workdir's own file: the base folder with sample.py --lora samples the workdir
    _, wd = straight_runs["sd_lora"]
    out = export.export(str(wd), str(tmp_path / "lora_file"))
    np.testing.assert_array_equal(
        _sample(tiny_families.SD_FOLDER, tmp_path / "lora_a", "--lora",
                os.path.join(out, "pytorch_lora_weights.safetensors")),
        _sample(wd, tmp_path / "lora_b"))


@pytest.mark.parametrize("case", ["full", "lora"])
def test_diffusers_samples_an_exported_folder_and_lora_file_as_sample_py_does(tmp_path, case):
    """tests/fixtures/sd/finetuned: a fine-tuned UNet and a LoRA file (rank 2, alpha 3) as
    t2i_jax.export wrote them; export_oracle.npz: diffusers' StableDiffusionPipeline on the
    folder (and `load_lora_weights` of the file) from the same x_T (make_export_fixtures.py)."""
    import shutil
    oracle = np.load(os.path.join(FIXTURES, "finetuned", "export_oracle.npz"))
    folder, extra = tiny_families.SD_FOLDER, []
    if case == "full":  # the exported folder: the base with the fine-tuned unet weights
        folder = tmp_path / "exported"
        shutil.copytree(tiny_families.SD_FOLDER, folder)
        shutil.copy(os.path.join(FIXTURES, "finetuned", "unet_diffusion_pytorch_model.safetensors"),
                    folder / "unet" / "diffusion_pytorch_model.safetensors")
    else:
        extra = ["--lora", os.path.join(FIXTURES, "finetuned", "pytorch_lora_weights.safetensors")]
    noise = tmp_path / "noise.npy"
    np.save(noise, nhwc(oracle[f"{case}.noise"]).astype(np.float32))
    assert [str(p) for p in oracle[f"{case}.prompts"]] == ["seven", "a handwritten digit three"]
    got = _sample(folder, tmp_path / "out", "--guidance",
                  str(float(oracle[f"{case}.guidance_scale"]) - 1.0), "--sampler", "pndm",
                  "--steps", str(int(oracle[f"{case}.num_inference_steps"])),
                  "--init_noise", str(noise), *extra).astype(np.float64)
    want = oracle[f"{case}.images"] * 255.0
    diff = np.abs(got - want)
    assert diff.max() <= 2.0, diff.max()
    base = oracle["base.images"] * 255.0
    if case == "full":  # the fine-tune is visible: far from the base's images
        assert np.abs(want - base).max() > 50
    if case == "lora":
        import json
        row = json.loads(open(tmp_path / "out" / "samples.jsonl").readline())
        assert row["decoder"]["lora"]["rank"] == 2 and row["decoder"]["lora"]["alpha"] == 3.0


@pytest.mark.slow
def test_fsdp_splits_the_unet_and_trains_what_the_replicated_run_trains(
        data_dir, straight_runs, tmp_path, monkeypatch):
    from runs import assert_trees_close, run, tiny
    from t2i_jax import sharding as mesh_lib
    monkeypatch.setattr(mesh_lib, "MIN_SHARDED_SIZE", 256)   # the tiny UNet's kernels split too
    state4, _ = straight_runs["sd_finetune"]
    split = run(tiny(data_dir, "sd_finetune", train__fsdp=2), tmp_path / "fsdp2")
    kernel = split.params["params"]["conv_in"]["kernel"]                  # [3, 3, 4, 8]
    assert "fsdp" in str(kernel.sharding.spec), kernel.sharding
    assert "fsdp" in str(split.opt_state[1][0].mu["params"]["conv_in"]["kernel"].sharding.spec)
    assert_trees_close(split.params, state4.params, atol=2e-6)


@pytest.mark.slow
def test_the_text_and_latent_caches_change_the_cost_not_the_training(data_dir, straight_runs,
                                                                     tmp_path):
    """With both caches the step reads the CLIP features and the VAE posterior's moments from
    the batch instead of computing them, and draws z with the same key: the same run."""
    from runs import assert_trees_close, run, tiny
    state4, _ = straight_runs["sd_finetune"]
    cached = run(tiny(data_dir, "sd_finetune", train__text_cache=True, train__latent_cache=True,
                      train__text_cache_dir=str(tmp_path / "cache"),
                      train__latent_cache_dir=str(tmp_path / "cache")), tmp_path / "cached")
    assert_trees_close(cached.params, state4.params, atol=2e-5)
    assert os.listdir(tmp_path / "cache" / "latents") and os.listdir(tmp_path / "cache" / "text_features")
