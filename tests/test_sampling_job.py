"""Batch sampling jobs and sample.py: the same images on 1 or 8 devices and for any batch size,
a w sweep under one compilation, kill -9 then rerun completes with no duplicate or missing index,
the output files as documented, and clear errors for bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import sample as sample_cli
from t2i_jax import files, images
from t2i_jax.config_utils import load_config
from t2i_jax.sampling import job as job_lib
from t2i_jax.sampling import outdir as out_lib
from t2i_jax.sampling.plan import Plan
from t2i_jax.sampling.request import read_prompts_file
from t2i_jax.sampling.generate import SampleOptions
from t2i_jax.sampling.load import load_trained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny_config.py")
OPTIONS = SampleOptions("ddim", 3)  # the tiny config's sampling: programs shared with training tests


@pytest.fixture(scope="module")
def workdir(tiny_workdir):
    return tiny_workdir


@pytest.fixture(scope="module")
def trained(workdir):
    return load_trained(workdir)


def pngs(outdir):
    x, rows = out_lib.load_images(outdir)
    return x, rows


def test_same_images_on_1_and_8_devices_and_any_batch_size(trained, tmp_path):
    spec = Plan.create(trained, ["seven", "数字三"], num_per_prompt=3,
                       guidance=(0.0, 4.0), seed=5, options=OPTIONS, shard_size=5)
    runs, compiled = {}, []
    for name, devices, batch in (("8dev_b1", None, 1), ("1dev_b7", jax.devices()[:1], 7),
                                 ("8dev_b7", None, 7)):
        res = job_lib.run_job(spec, str(tmp_path / name), batch_size=batch,
                              devices=devices, progress=False)
        assert res.generated == spec.spec.num_images == 12
        compiled.append(res.compilations)
        runs[name] = pngs(str(tmp_path / name))
    # The sweep over w = 0 and 4 is ONE program per job (w is a traced per-image argument), and
    # the last job (8 rows a call on 8 devices, as the first) compiles nothing: it reuses it.
    assert compiled == [1, 1, 0]
    ref_x, ref_rows = runs["8dev_b1"]
    for name, (x, rows) in runs.items():
        np.testing.assert_array_equal(x, ref_x, err_msg=name)
        assert rows == ref_rows
    assert [r["index"] for r in ref_rows] == list(range(12))
    # index = (g * P + p) * N + k; the noise id p * N + k is shared across w.
    assert [(r["guidance"], r["prompt"], r["sample"]) for r in ref_rows[:4]] == [
        (0.0, "seven", 0), (0.0, "seven", 1), (0.0, "seven", 2), (0.0, "数字三", 0)]
    assert [r["sample_id"] for r in ref_rows] == list(range(6)) * 2
    # Guidance changes the images (so the sweep is not one w six times).
    assert np.abs(ref_x[:6].astype(int) - ref_x[6:].astype(int)).max() > 8


def test_empty_prompt_is_the_null_condition_so_guidance_cannot_change_it(trained, tmp_path):
    spec = Plan.create(trained, ["", "seven"], num_per_prompt=4, guidance=(0.0, 5.0),
                       seed=0, options=OPTIONS)
    job_lib.run_job(spec, str(tmp_path), batch_size=8, progress=False)
    x, rows = pngs(str(tmp_path))
    x = x.astype(int)
    empty_w0, seven_w0, empty_w5, seven_w5 = x[0:4], x[4:8], x[8:12], x[12:16]
    # eps~ = (1 + w) eps(null) - w eps(null) = eps(null): equal up to float rounding.
    assert np.abs(empty_w0 - empty_w5).max() <= 1
    assert np.abs(seven_w0 - seven_w5).max() > 8


def test_kill_9_then_rerun_completes_without_duplicates_or_gaps(workdir, trained, tmp_path):
    out = tmp_path / "killed"
    args = ["--workdir", workdir, "--prompt", "seven", "--prompt", "two", "--num_per_prompt", "60",
            "--guidance", "1", "--steps", "3", "--seed", "3", "--batch_size", "4",
            "--shard_size", "8", "--no_progress"]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), *args,
                             "--outdir", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    shards = out / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if shards.is_dir() and len([f for f in os.listdir(shards) if f.endswith(".jsonl")]) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / out_lib.SAMPLES_FILE).exists()  # killed mid-job: not mistaken as complete
    done_before = len(os.listdir(shards))
    assert 2 <= done_before < 15
    # A damaged shard file (cut mid-line) must be redone, not trusted.
    last = sorted(f for f in os.listdir(shards) if f.endswith(".jsonl"))[-1]
    text = (shards / last).read_text()
    (shards / last).write_text(text[: len(text) // 2])
    (out / "images" / ".tmp-abc.png").write_bytes(b"half a png")  # as a kill mid-write leaves

    assert sample_cli.run(args + ["--outdir", str(out), "--batch_size", "3"]) == 0
    x, rows = pngs(str(out))
    assert [r["index"] for r in rows] == list(range(120))
    assert len([f for f in os.listdir(out / "images") if f.endswith(".png")]) == 120
    assert not [f for f in os.listdir(out / "images") if f.startswith(".tmp")]
    # The same images as one uninterrupted run.
    assert sample_cli.run(args + ["--outdir", str(tmp_path / "straight")]) == 0
    x_ref, rows_ref = pngs(str(tmp_path / "straight"))
    np.testing.assert_array_equal(x, x_ref)
    assert rows == rows_ref


def test_cli_outputs_records_grid_and_npz(workdir, tmp_path, capsys):
    out = tmp_path / "out"
    long_prompt = "a handwritten digit seven " * 4
    assert sample_cli.run(["--workdir", workdir, "--prompt", "seven", "--prompt", "",
                           "--prompt", long_prompt, "--num_per_prompt", "3", "--guidance", "0,2",
                           "--steps", "3", "--seed", "0", "--outdir", str(out), "--npz",
                           "--no_progress"]) == 0
    err = capsys.readouterr().err
    assert "prompt 2 is empty: it means the null condition" in err
    assert "prompt 3 is longer than the model's 32 tokens" in err and "truncated to" in err
    rows = files.read_jsonl(str(out / "samples.jsonl"))
    assert len(rows) == 18
    cfg = load_config(TINY)
    for r in rows:
        assert os.path.exists(out / r["file"]) and not os.path.isabs(r["file"])
        assert r["steps"] == 3 and r["sampler"] == cfg.sample.sampler and r["checkpoint_step"] == 40
        assert r["seed"] == 0 and r["params"] == "ema"
    assert [r["prompt"] for r in rows[:9:3]] == ["seven", "", long_prompt]
    assert [r["guidance"] for r in rows[::9]] == [0.0, 2.0]
    x = np.stack([images.load_png(str(out / r["file"])) for r in rows])
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (18, 16, 16, 3)
        np.testing.assert_array_equal(z["arr_0"], np.repeat(x, 3, axis=-1))
        np.testing.assert_array_equal(z["arr_1"], [r["prompt_index"] for r in rows])
    # grid: 2 w x 3 prompts rows of 3 images, each 16 px magnified 4x with 2 px padding, after
    # a margin that labels each row with its w and prompt
    grid = images.load_png(str(out / "grid.png"))
    margin = grid.shape[1] - (3 * 66 + 2)
    assert grid.shape[0] == 6 * 66 + 2 and margin > 0
    np.testing.assert_array_equal(grid[:, margin:], images.make_grid(x, rows=6, scale=4))
    job = json.loads((out / "job.json").read_text())
    assert job["prompts"] == ["seven", "", long_prompt] and job["guidance"] == [0.0, 2.0]
    # A rerun of the finished job generates nothing; another job in the same outdir is refused.
    assert sample_cli.run(["--workdir", workdir, "--prompt", "seven", "--prompt", "",
                           "--prompt", long_prompt, "--num_per_prompt", "3", "--guidance", "0",
                           "2", "--steps", "3", "--outdir", str(out), "--no_progress"]) == 0
    assert "0 generated now" in capsys.readouterr().err
    assert sample_cli.run(["--workdir", workdir, "--prompt", "seven", "--num_per_prompt", "3",
                           "--steps", "3", "--seed", "1", "--outdir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "holds another sampling job" in err and "seed: 0 -> 1" in err


def test_cli_bad_input_gives_clear_errors(workdir, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert sample_cli.run(["--workdir", str(tmp_path / "nothing"), "--prompt", "7",
                           "--outdir", out]) == 2  # the command line cannot run
    assert "no checkpoint in" in capsys.readouterr().err

    bad = tmp_path / "prompts.txt"
    bad.write_bytes("seven\n数字三\nfo\xffo\n".encode("utf-8").replace(b"\xc3\xbf", b"\xff"))
    assert sample_cli.run(["--workdir", workdir, "--prompts_file", str(bad), "--outdir", out]) == 2
    err = capsys.readouterr().err
    assert "line 3: not valid UTF-8" in err

    assert sample_cli.run(["--workdir", workdir, "--prompt", "7", "--steps", "5000",
                           "--outdir", out]) == 2
    assert "--steps 5000 is outside 1..1000" in capsys.readouterr().err

    with pytest.raises(SystemExit) as e:
        sample_cli.run(["--workdir", workdir, "--prompt", "7", "--sampler", "lms", "--outdir", out])
    assert e.value.code == 2
    assert "invalid choice: 'lms'" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        sample_cli.run(["--workdir", workdir, "--outdir", out])
    assert "no prompts" in capsys.readouterr().err


def test_prompts_file_reads_utf8_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"\xef\xbb\xbfseven\r\n\n" + "数字三".encode() + b"\n  \n")
    assert read_prompts_file(str(f)) == ["seven", "数字三"]


def test_job_refusals_write_nothing_and_a_lock_keeps_two_writers_apart(trained, tmp_path):
    too_many = SampleOptions("ddim", 5000)
    spec = Plan.create(trained, ["seven"], num_per_prompt=1, guidance=(1.0,), seed=0,
                       options=too_many)
    with pytest.raises(ValueError, match="num_steps"):
        job_lib.run_job(spec, str(tmp_path / "a"), progress=False)
    assert not (tmp_path / "a").exists()  # refused before anything was written
    spec = Plan.create(trained, ["seven"], num_per_prompt=1, guidance=(1.0,), seed=0,
                       options=OPTIONS)
    with out_lib.OutdirLock(str(tmp_path / "b")):
        with pytest.raises(ValueError, match="another process .* is writing a sampling job"):
            job_lib.run_job(spec, str(tmp_path / "b"), progress=False)


def test_outputs_get_the_usual_file_mode_and_fid_picks_one_w(trained, tmp_path):
    from t2i_jax.evaluation import fid as fid_lib
    spec = Plan.create(trained, ["seven"], num_per_prompt=2, guidance=(0.0, 1.0),
                       seed=0, options=OPTIONS)
    job_lib.run_job(spec, str(tmp_path), batch_size=8, progress=False)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("images/000000.png", "samples.jsonl", "grid.png", "job.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name
    with pytest.raises(ValueError, match="several guidance weights"):
        fid_lib.load_set(str(tmp_path))
    x, _ = out_lib.load_images(str(tmp_path))
    np.testing.assert_array_equal(fid_lib.load_set(str(tmp_path), guidance=1.0), x[2:])


@pytest.mark.parametrize("extra, message", [
    (["--seed", "-1"], "--seed must be in [0, 2^32)"),
    (["--guidance", "nan"], "--guidance takes finite numbers"),
    (["--guidance", ","], "--guidance takes finite numbers"),
    (["--grid_columns", "0"], "must be >= 1"),
])
def test_cli_rejects_bad_numbers_before_loading_anything(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        sample_cli.run(["--workdir", str(tmp_path), "--prompt", "7", "--outdir",
                        str(tmp_path / "o")] + extra)
    assert e.value.code == 2 and message in capsys.readouterr().err
