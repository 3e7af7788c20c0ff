"""Issue 29's defects (a probe of cascades, latent models, unCLIP, inpainting, guides, frozen
encoders and the launcher), each a test that failed before its fix: an input read as its user
sees it, one line per mistake with the exit-code rule (2: the command line cannot run; 1: the
run failed), and no bad value turned into silent garbage. The launcher's crash filter is in
tests/test_multiprocess.py, the image reader's modes in tests/test_user_images.py."""

import json
import os
import shutil
import types

import ml_collections
import numpy as np
import pytest
from PIL import Image

import sample as sample_cli
import train as train_cli
from runs import TESTS
from t2i_jax import user_images
from t2i_jax.models.pretrained import cli as pretrained_cli
from t2i_jax.sampling import guides as guides_lib, stages as stages_lib
from t2i_jax.sampling.inpaint import load_inpaint

MAX_LINE = 500  # characters (temporary paths included): a line a person reads, not a dump


def cli(capfd, fn, argv):
    """(exit code, non-empty stderr lines) of an in-process command (argparse's exit too)."""
    capfd.readouterr()
    try:
        code = fn(argv)
    except SystemExit as e:
        code = e.code
    return code, [line for line in capfd.readouterr().err.splitlines() if line.strip()]


def one_line(lines, want):
    """A refusal as a user sees it: one line, short, the key words, no traceback, no "bug"."""
    assert len(lines) == 1 and want in lines[0] and len(lines[0]) <= MAX_LINE, lines
    assert "Traceback" not in lines[0] and "a bug" not in lines[0], lines


# --- 1, 2: every image a user hands in, read as a viewer shows it ---------------------------

def test_1_2_sixteen_bit_and_palette_inputs_reach_the_model_as_they_look(tmp_path):
    u16 = np.random.default_rng(0).integers(0, 65536, (8, 8), dtype=np.uint16)
    Image.fromarray(u16).save(tmp_path / "g16.png")
    want = (u16 / 65535.0 * 2 - 1).astype(np.float32)[..., None]
    # --inpaint: the known image is the scaled 16-bit levels (it was all white: clipped to 255)
    x, known, record = load_inpaint(str(tmp_path / "g16.png"), (8, 8, 1), box=(0, 0, 4, 4))
    np.testing.assert_allclose(x, want, atol=1e-6)
    assert record["image_pixels_sha256"] == user_images.pixels_sha256(x)
    # --low_res / --variations (refused before): the same levels, as 8-bit
    low, rec = stages_lib.load_low_res(str(tmp_path / "g16.png"), (8, 8, 1))
    np.testing.assert_array_equal(low[0], np.round((want + 1) * 127.5).astype(np.uint8))
    # --guide_image: the reference at the model's size and channels
    model = types.SimpleNamespace(config=ml_collections.ConfigDict(
        dict(data=dict(image_size=8, channels=1))))
    np.testing.assert_allclose(guides_lib.load_reference(str(tmp_path / "g16.png"), model),
                               want, atol=1 / 127.5)
    # a palette PNG whose index 0 shows white and index 1 black: read as its colours
    idx = (np.arange(64).reshape(8, 8) % 2).astype(np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    im.save(tmp_path / "p.png")
    low, _ = stages_lib.load_low_res(str(tmp_path / "p.png"), (8, 8, 1))
    np.testing.assert_array_equal(low[0, ..., 0], np.where(idx == 0, 255, 0))


# --- 3, 4, 9, 10: the pretrained encoders' command line ----------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_3_encode_refuses_features_that_are_not_finite(tiny_t5, tmp_path, capfd):
    from safetensors.numpy import load_file, save_file
    d = _copy(tiny_t5, tmp_path / "nan")
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    name = sorted(k for k in tensors if "layer.1" in k)[0]
    tensors[name] = np.full_like(tensors[name], np.nan)
    save_file(tensors, path, metadata={"format": "pt"})
    out = tmp_path / "f.npz"
    code, err = cli(capfd, pretrained_cli.run, ["encode", d, "--text", "a red circle",
                                                "--out", str(out)])
    assert code == 1
    one_line(err, "are not finite: its weights hold NaN or Inf")
    assert not out.exists()


def test_4_pretrained_cli_mistakes_get_one_line_and_the_exit_code_rule(tiny_t5, tmp_path, capfd):
    d = _copy(tiny_t5, tmp_path / "damaged")
    with open(os.path.join(d, "spiece.model"), "r+b") as f:
        f.seek(20)
        f.write(b"\xff" * 64)
    out = str(tmp_path / "f.npz")
    code, err = cli(capfd, pretrained_cli.run, ["encode", d, "--text", "a", "--out", out])
    assert code == 1
    one_line(err, "spiece.model is not a readable SentencePiece model")
    bad_text = b"caf\xe9".decode("utf-8", "surrogateescape")  # a Latin-1 shell's argv
    code, err = cli(capfd, pretrained_cli.run, ["encode", tiny_t5, "--text", bad_text, "--out", out])
    assert code == 2
    one_line(err, "--text number 1 is not valid UTF-8")
    (tmp_path / "file").write_text("")
    code, err = cli(capfd, pretrained_cli.run, ["encode", tiny_t5, "--text", "a", "--out",
                                                str(tmp_path / "file" / "x.npz")])
    assert code == 2
    one_line(err, "is a file")
    code, err = cli(capfd, pretrained_cli.run, ["make-tiny", str(tmp_path / "file")])
    assert code == 2
    one_line(err, "is a file, not a directory")
    assert not os.path.exists(out)


def test_4_training_with_a_damaged_tokenizer_names_the_file_not_a_bug(data_dir, tiny_t5,
                                                                     tmp_path, capfd, monkeypatch):
    d = _copy(tiny_t5, tmp_path / "t5")
    with open(os.path.join(d, "spiece.model"), "wb") as f:
        f.write(b"\x00garbage")
    monkeypatch.setenv("T2I_TEST_T5", d)
    config = tmp_path / "config.py"
    config.write_text(f"import sys\nsys.path.insert(0, {TESTS!r})\nimport tiny_families\n\n\n"
                      "def get_config():\n    return tiny_families.get_config('frozen_t5')\n")
    wd = tmp_path / "wd"
    code, err = cli(capfd, train_cli.run, [f"--config={config}", f"--workdir={wd}",
                                           f"--config.data.data_dir={data_dir}", "--progress=false"])
    assert code == 1
    one_line(err, "spiece.model is not a readable SentencePiece model")
    assert not (wd / "checkpoints").exists()


def test_9_encode_says_one_line_for_a_long_text_and_for_a_config_that_does_not_fit(
        tiny_t5, tmp_path, capfd):
    out = tmp_path / "f.npz"
    code, err = cli(capfd, pretrained_cli.run, ["encode", tiny_t5, "--text", "red " * 2500,
                                                "--max_length", "12", "--out", str(out)])
    assert code == 0 and out.exists()
    cut = [line for line in err if "truncated" in line]
    assert len(cut) == 1 and len(cut[0]) <= MAX_LINE, err
    assert "10000 characters" in cut[0] and "raise --max_length (now 12)" in cut[0], cut
    d = _copy(tiny_t5, tmp_path / "wide")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["d_ff"] = cfg["d_ff"] * 2  # every feed-forward tensor now has the wrong shape
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    code, err = cli(capfd, pretrained_cli.run, ["encode", d, "--text", "a", "--out",
                                                str(tmp_path / "g.npz")])
    assert code == 1
    one_line(err, "do not fit its config.json")
    assert " more (is config.json the one published with these weights?)" in err[0], err


def test_10_encode_out_names_the_file_it_writes_and_refuses_a_directory(tiny_t5, tmp_path, capfd):
    capfd.readouterr()
    assert pretrained_cli.run(["encode", tiny_t5, "--text", "a", "--out",
                               str(tmp_path / "feat")]) == 0
    said = capfd.readouterr().out
    assert said.rstrip().endswith(str(tmp_path / "feat.npz")) and (tmp_path / "feat.npz").exists()
    (tmp_path / "dir").mkdir()
    code, err = cli(capfd, pretrained_cli.run, ["encode", tiny_t5, "--text", "a", "--out",
                                                str(tmp_path / "dir")])
    assert code == 2
    one_line(err, "is a directory")
    assert not (tmp_path / "dir.npz").exists()


# --- 5: non-finite and saturated outputs, attributed -------------------------------------------

def test_5_a_guide_scale_that_saturates_every_pixel_is_refused():
    for kind, flag in guides_lib.SCALE_FLAGS.items():
        with pytest.raises(ValueError, match=r"3e\+38 is above 10000: .* black or white"):
            guides_lib.check_scale(flag, 3e38)
        assert guides_lib.check_scale(flag, guides_lib.DEFAULT_SCALES[kind]) == \
            guides_lib.DEFAULT_SCALES[kind]


def test_5_non_finite_images_of_an_sr_stage_name_that_stage_and_its_flags(cascade, tmp_path,
                                                                          capfd):
    base, sr = cascade
    out = tmp_path / "o"
    code, err = cli(capfd, sample_cli.run, [
        "--workdir", base, "--sr", sr, "--prompt", "seven", "--num_per_prompt", "2",
        "--steps", "2", "--sr_steps", "2", "--sr_guidance", "3e38", "--sr_thresholding", "none",
        "--outdir", str(out), "--no_progress"])
    assert code == 1
    line = err[-1]
    assert f"2 of 2 images of stage 1 (super_resolution, {sr}) came out NaN or infinite" in line
    assert "Lower --sr_guidance (now 3e+38); use --sr_thresholding static or dynamic" in line
    assert "--guidance (now" not in line and "--thresholding static" not in line.replace(
        "--sr_thresholding static", "")


# --- 7: a damaged intermediate file -------------------------------------------------------------

def test_7_a_damaged_intermediate_png_is_generated_again_not_a_block(cascade, tmp_path, capfd):
    base, sr = cascade
    out = tmp_path / "o"
    argv = ["--workdir", base, "--sr", sr, "--prompt", "seven", "--num_per_prompt", "2",
            "--steps", "2", "--sr_steps", "2", "--shard_size", "1", "--outdir", str(out),
            "--no_progress"]
    assert sample_cli.run(argv) == 0
    first = out / "stages" / "0" / "images"
    png = sorted(first.iterdir())[0]
    whole = png.read_bytes()
    finals = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    png.write_bytes(whole[:len(whole) // 2])   # truncated (a disk that filled, a bad copy)
    code, err = cli(capfd, sample_cli.run, argv)
    assert code == 0, err
    assert any(f"1 damaged output file(s) of stage 0 (e.g. {png})" in line for line in err), err
    assert png.read_bytes() == whole           # generated again, bit for bit
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == finals


# --- 6: frozen models that moved or trained on ---------------------------------------------------

def test_6_a_moved_frozen_model_is_named_with_the_flag_that_recovers_it(tmp_path):
    import ml_collections as mlc
    from t2i_jax.families import frozen
    gone = str(tmp_path / "was_here")
    config = mlc.ConfigDict(dict(model=dict(autoencoder="relative/ae"),
                                 frozen=dict(autoencoder=dict(workdir=gone, step=40, sha256="ab"))))
    with pytest.raises(ValueError, match=f"pass --frozen {gone}=NEW_DIR to sample.py"):
        frozen.resolve(config, "autoencoder", "config.model.autoencoder")
    moved = frozen.redirect(config.to_dict(), {gone: str(tmp_path / "now")})
    assert moved["frozen"]["autoencoder"] == dict(workdir=str(tmp_path / "now"), step=40,
                                                  sha256="ab")
    assert moved["model"] == config.to_dict()["model"]


def test_6_sampling_reads_a_moved_autoencoder_and_its_recorded_step_after_it_trained_on(
        data_dir, tiny_autoencoder, tiny_latent, tmp_path, capfd):
    from runs import run, tiny
    ae = tmp_path / "ae_elsewhere"
    shutil.copytree(tiny_autoencoder, ae)
    run(tiny(data_dir, "autoencoder", train__num_steps=42, train__checkpoint_every=40), ae)
    args = ["--workdir", tiny_latent, "--prompt", "seven", "--num_per_prompt", "2", "--steps",
            "2", "--no_progress"]
    assert sample_cli.run(args + ["--outdir", str(tmp_path / "here")]) == 0
    code, err = cli(capfd, sample_cli.run, args + [
        "--frozen", f"{tiny_autoencoder}={ae}", "--outdir", str(tmp_path / "moved")])
    assert code == 0, err  # checkpoint 40 of the copy, although it trained on to 42
    for name in ("000000.png", "000001.png"):
        assert (tmp_path / "here" / "images" / name).read_bytes() == \
            (tmp_path / "moved" / "images" / name).read_bytes()
    record = json.loads((tmp_path / "moved" / "job.json").read_text())
    assert str(ae) in json.dumps(record) and tiny_autoencoder not in json.dumps(record)


# --- 11: absurd sizes ----------------------------------------------------------------------------

def test_11_a_job_of_a_billion_images_is_planned_in_constant_memory(tiny_workdir, tmp_path):
    import itertools
    import tracemalloc
    from t2i_jax.sampling import job, outdir as out_lib, planner
    from t2i_jax.sampling.request import Request
    request = Request(workdir=tiny_workdir, outdir=str(tmp_path / "o"), prompts=["seven"],
                      num_per_prompt=10**9, steps=1)
    request.check()
    plan = planner.build(request)
    spec = plan.spec
    assert spec.num_images == 10**9
    (tmp_path / "o" / "shards").mkdir(parents=True)
    tracemalloc.start()
    try:
        done = out_lib.finished_shards(spec, str(tmp_path / "o"))
        first = list(itertools.islice(job.todo_batches(spec, done, 64), 3))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert done == set() and [b[0] for b in first] == [0, 64, 128]
    assert peak < 2**20, peak  # an index of every image was 8 GB


# --- 12: the minor ones --------------------------------------------------------------------------

def test_12_a_negative_mask_box_reaches_the_box_check_not_argparse(tmp_path):
    from t2i_jax.diffusion import inpainting
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    args = sample_cli.parse_args(["--workdir", "w", "--outdir", "o", "--prompt", "a",
                                  "--inpaint", str(tmp_path / "x.png"), "--mask_box", "-1,0,4,4"])
    assert args.request.mask_box == (-1, 0, 4, 4)
    with pytest.raises(ValueError, match="--mask_box -1,0,4,4 is not a box inside the 8x8 image"):
        inpainting.box_mask(8, 8, args.request.mask_box)


def test_12_a_grey_128_mask_is_not_called_all_white(tmp_path):
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(ValueError, match="every level is 128 or more, which counts as white") as e:
        load_inpaint(str(tmp_path / "x.png"), (8, 8, 1), mask=str(tmp_path / "m.png"))
    assert "all white" not in str(e.value)


def test_12_a_non_utf8_prompt_is_refused_in_one_line(capfd):
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")
    code, err = cli(capfd, sample_cli.run, ["--workdir", "w", "--outdir", "o", "--prompt", bad])
    assert code == 2
    one_line(err, "--prompt number 1 is not valid UTF-8")


def test_12_sigterm_stops_a_command_with_one_line_and_exit_143(capfd):
    import signal
    import time
    from t2i_jax.errors import Boundary

    def main():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0
    boundary = Boundary("sample.py", interrupted="the finished shards in OUT are kept; rerun "
                        "the same command to finish the job.")
    code, err = cli(capfd, lambda argv: boundary.run(main), [])
    assert code == 128 + signal.SIGTERM
    one_line(err, "sample.py: SIGTERM: the finished shards in OUT are kept")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


def test_12_refusals_leave_nothing_behind(tmp_path):
    from t2i_jax import files
    from t2i_jax.errors import Boundary
    out = tmp_path / "out"
    with pytest.raises(ValueError):
        with files.ExclusiveLock(str(out), "reproducing", "wait"):
            raise ValueError("a model that does not fit")
    assert not out.exists()  # the lock made the directory and its .lock: both gone

    def main():
        raise RuntimeError("boom")
    b = Boundary("x")
    b.log_in(str(tmp_path / "never"))
    assert b.run(main) == 1
    assert not (tmp_path / "never").exists()  # the log went to the temporary directory


def test_12_a_pretrained_directory_is_not_taken_for_a_workdir_to_train(tiny_t5, capfd):
    from t2i_jax.sampling.load import load_trained
    with pytest.raises(Exception, match="holds a pretrained model in its publisher's layout") as e:
        load_trained(tiny_t5)
    assert "train.py" not in str(e.value)


def test_12_make_tiny_writes_its_weights_with_the_usual_mode(tmp_path):
    assert pretrained_cli.run(["make-tiny", str(tmp_path / "t5")]) == 0
    umask = os.umask(0)
    os.umask(umask)
    mode = os.stat(tmp_path / "t5" / "model.safetensors").st_mode & 0o777
    assert mode == 0o666 & ~umask, oct(mode)


# --- grids a person can read ---------------------------------------------------------------------

def test_grid_rows_are_labelled_with_what_they_asked_cjk_and_emoji_never_blank():
    from t2i_jax import images, labels
    x = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    plain = images.make_grid(x, rows=3, scale=4)
    texts = ['"a large red circle"', '"数字三 🙂"', "w=3 " + "very long " * 40]
    grid = images.make_grid(x, rows=3, scale=4, labels=texts)
    margin = grid.shape[1] - plain.shape[1]
    assert grid.shape[0] == plain.shape[0] and 0 < margin <= labels.MAX_MARGIN + 8
    np.testing.assert_array_equal(grid[:, margin:], plain)  # the images are untouched
    h = 8 * 4
    for r in range(3):  # every row's margin has ink: a CJK or emoji label is never blank
        band = grid[2 + r * (h + 2):2 + r * (h + 2) + h, :margin]
        assert (band < 128).sum() > 20, r
    for ch in "数🙂":  # drawn with a font that has them, else Last Resort's block box
        assert labels.font_for(ch) != labels.font_paths()[0]
    assert labels.font_for("a") == labels.font_paths()[0]
    cut = labels.draw_text(texts[2], 16, labels.MAX_MARGIN)
    assert cut.shape[1] <= labels.MAX_MARGIN
    with pytest.raises(ValueError, match="2 labels for 3 rows"):
        images.make_grid(x, rows=3, labels=texts[:2])
