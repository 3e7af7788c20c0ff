"""Fault injection: the ways a user can lose work or get silent garbage, and every mistake that
must get one clear line (issue 10's probe, case by case). Each test asserts the exit code, the
line a user sees (its key words), and that nothing was lost: checkpoints, finished shards and
records are intact, and a repaired run ends bit-identical to an uninterrupted one.

The commands run in-process where they can (train.run, sample.run, fid.main, reproduce.cli.main);
subprocesses only where the test is about the process: a second writer, SIGTERM, a full disk
(a tmpfs in a user namespace), a read-only directory, and stderr bounded to 20 lines."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sample as sample_cli
import train as train_cli
from runs import ROOT, TINY, assert_trees_equal, run, tiny
from t2i_jax import files, images
from t2i_jax.sampling import outdir as out_lib
from t2i_jax.sampling.load import load_trained
from t2i_jax import checkpoint as ckpt_lib
from t2i_jax import integrity
from t2i_jax.training import loop
from t2i_jax.training.writers import read_metrics

MAX_STDERR_LINES = 20


# ---------------------------------------------------------------------------------------------
# Helpers


def train_args(data_dir, workdir, *extra, config=TINY):
    return [f"--config={config}", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            "--progress=false", *extra]


def cli(capfd, fn, argv):
    """(exit code, non-empty stderr lines) of an in-process command (argparse's exit too)."""
    capfd.readouterr()
    try:
        code = fn(argv)
    except SystemExit as e:
        code = e.code
    return code, [line for line in capfd.readouterr().err.splitlines() if line.strip()]


def env():
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
                XLA_FLAGS=os.environ["XLA_FLAGS"])


def copy_run(tiny_run, tmp_path):
    """A private copy of the shared 4-step workdir (checkpoints 2 and 4)."""
    wd = tmp_path / "wd"
    shutil.copytree(tiny_run[1], wd)
    return wd


def largest_file(directory):
    found = [p for p in directory.rglob("*") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_size)


def steps_on_disk(workdir):
    return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


def assert_saved_equals(workdir, step, state):
    """Step `step` in workdir, read with orbax alone, holds exactly state's parameters and EMA."""
    import orbax.checkpoint as ocp
    mgr = ocp.CheckpointManager(str(workdir / "checkpoints"))
    saved = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    mgr.close()
    assert int(saved["step"]) == step
    assert_trees_equal(saved["params"], state.params)
    assert_trees_equal(saved["ema_params"], state.ema_params)


def user_namespace(*prefix):
    """A command prefix that runs in a new user namespace (unshare), or a skip where there is
    none: as root, a read-only directory or a small tmpfs needs one."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", *prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("needs user namespaces (unshare) for a read-only directory or a tmpfs")
    return ["unshare", *prefix]


def as_unprivileged():
    """A prefix under which a chmod 555 directory is really read-only (root ignores modes)."""
    return user_namespace("-U") if os.geteuid() == 0 else []


# ---------------------------------------------------------------------------------------------
# Lost work


def test_1_damaged_newest_checkpoint_is_moved_aside_and_trained_again(data_dir, tiny_run,
                                                                      tmp_path, capfd):
    state4, _ = tiny_run
    wd = copy_run(tiny_run, tmp_path)
    largest_file(wd / "checkpoints" / "4" / "state").write_bytes(b"\0" * 1000)  # truncated
    (wd / "checkpoints" / "6.orbax-checkpoint-tmp-1234").mkdir()  # and a save killed midway
    code, err = cli(capfd, train_cli.run, train_args(data_dir, wd))
    assert code == 0, err
    assert any("checkpoint 4" in l and "cannot be restored" in l and "bytes" in l for l in err), err
    assert any("checkpoint 4 moved to" in l for l in err), err
    assert len(err) <= MAX_STDERR_LINES, err
    assert not (wd / "checkpoints" / "6.orbax-checkpoint-tmp-1234").exists()  # cleaned up
    # The newest step on disk is the retrained one, equal to a straight run's; the damaged one
    # is kept aside, and sampling now reads step 4.
    assert steps_on_disk(wd) == [2, 4]
    assert os.listdir(wd / "checkpoints.damaged") == ["4"]
    assert_saved_equals(wd, 4, state4)
    assert load_trained(str(wd)).step == 4
    code, err = cli(capfd, train_cli.run, train_args(data_dir, wd))  # fixed for good
    assert code == 0 and not any("cannot be restored" in l for l in err), err


def test_1_damaged_checkpoint_without_integrity_record_prints_at_most_20_lines(data_dir, tiny_run,
                                                                              tmp_path):
    """The worst case for output: no record (a step saved before it existed), so orbax reads the
    damaged file, and tensorstore's background callbacks raise by the thousand."""
    state4, _ = tiny_run
    wd = copy_run(tiny_run, tmp_path)
    for record in wd.glob("checkpoints/*/" + integrity.RECORD):
        record.unlink()
    largest_file(wd / "checkpoints" / "4" / "state").write_bytes(b"\0" * 1000)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                          *train_args(data_dir, wd)], env=env(), capture_output=True, text=True,
                         timeout=300)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(lines) <= MAX_STDERR_LINES, out.stderr[-3000:]
    assert any("checkpoint 4" in l and "cannot be restored" in l for l in lines), lines
    assert_saved_equals(wd, 4, state4)
    for l in lines:  # the storage libraries' background tracebacks went to the log it names
        if "background error(s)" in l:
            assert "Traceback" in open(l.rsplit(" written to ", 1)[1], encoding="utf-8").read()


@pytest.mark.slow
def test_2_keep_checkpoints_0_keeps_every_one_and_negative_is_refused(data_dir, tmp_path, capfd):
    wd = tmp_path / "all"
    code, err = cli(capfd, train_cli.run, train_args(
        data_dir, wd, "--config.train.num_steps=8", "--config.train.keep_checkpoints=0"))
    assert code == 0, err
    assert steps_on_disk(wd) == [2, 4, 6, 8]
    # 14: the run ends by saying where its results are and what to run next.
    assert any(f"done: checkpoint {wd}/checkpoints/8" in l for l in err), err
    assert any(l.startswith("[t2i_jax] next: python sample.py --workdir") for l in err), err
    code, err = cli(capfd, train_cli.run, train_args(data_dir, tmp_path / "neg",
                                                      "--config.train.keep_checkpoints=-1"))
    assert code == 2 and len(err) == 1 and "keep_checkpoints must be an integer >= 0" in err[0]
    assert not (tmp_path / "neg").exists()


@pytest.mark.slow
def test_3_two_trainers_on_one_workdir_exactly_one_trains_and_sigterm_saves(data_dir, tmp_path,
                                                                            capfd):
    """A second train.py on a busy workdir is refused naming the holder; SIGTERM to the first
    saves one checkpoint and exits 0; every checkpoint and metrics row is the first run's."""
    wd, log = tmp_path / "wd", tmp_path / "first.log"
    with open(log, "w") as f:  # a file, not a pipe nobody reads while the test waits
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *train_args(
            data_dir, wd, "--config.train.num_steps=100000",
            "--config.train.checkpoint_every=100000", "--config.seed=0")], env=env(), stdout=f,
            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        metrics = wd / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline
            time.sleep(0.05)
        code, err = cli(capfd, train_cli.run, train_args(data_dir, wd, "--config.seed=1"))
        assert code == 1 and len(err) == 1, err
        assert f"(pid {proc.pid} " in err[0] and "is training in" in err[0], err
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    out = log.read_text()
    assert proc.returncode == 0, out
    line = [l for l in out.splitlines() if "stopped by SIGTERM at step" in l]
    assert line, out
    step = int(line[0].split("at step ")[1].split(";")[0])
    assert steps_on_disk(wd) == [step]
    assert json.loads((wd / "checkpoints" / str(step) / "config" / "metadata").read_text())[
        "seed"] == 0
    rows = [r["step"] for r in read_metrics(wd)]
    assert rows == list(range(1, len(rows) + 1)) and rows[-1] <= step  # one run's rows, once


def test_4_damaged_stored_config_falls_back_in_train_sample_and_reproduce(
        data_dir, tiny_run, digits_evaluator, tmp_path, capfd):
    """An empty checkpoints/4/config/metadata (no integrity record: orbax's JSON read fails):
    sample.py uses step 2 and says so, reproduce checkpoints skips 4, train.py retrains 4."""
    from t2i_jax.evaluation import evaluator as ev_lib
    from t2i_jax.evaluation.reproduce.cli import main as reproduce_main
    from t2i_jax.evaluation.scorer import evaluator_dir
    state4, _ = tiny_run
    wd = copy_run(tiny_run, tmp_path)
    for record in wd.glob("checkpoints/*/" + integrity.RECORD):
        record.unlink()
    (wd / "checkpoints" / "4" / "config" / "metadata").write_text("")
    out = tmp_path / "samples"
    code, err = cli(capfd, sample_cli.run, ["--workdir", str(wd), "--prompt", "7", "--num_per_prompt",
                                           "2", "--outdir", str(out), "--no_progress"])
    assert code == 0, err
    assert any("checkpoint 4" in l and "cannot be restored" in l and "trying 2" in l for l in err)
    assert {r["checkpoint_step"] for r in files.read_jsonl(str(out / "samples.jsonl"))} == {2}

    cache = evaluator_dir(str(wd))
    ev_lib.save_evaluator(ev_lib.cache_path(cache, tiny(data_dir).data), digits_evaluator)
    rep = tmp_path / "rep"
    code, err = cli(capfd, reproduce_main, ["checkpoints", "--workdir", str(wd), "--out", str(rep),
                                            "--num_per_prompt", "1", "--batch_size", "16",
                                            "--no_progress"])
    assert code == 0, err
    assert any("checkpoint 4 is damaged" in l and "skipped" in l for l in err), err
    results = files.read_json(str(rep / "results.json"))
    assert results["skipped"] == [4] and [r["step"] for r in results["rows"]] == [2]
    assert results["uint8_conversion"] == images.UINT8_CONVERSION

    code, err = cli(capfd, train_cli.run, train_args(data_dir, wd))
    assert code == 0 and any("checkpoint 4" in l and "cannot be restored" in l for l in err), err
    assert_saved_equals(wd, 4, state4)


@pytest.mark.slow
def test_5_nan_guard_sees_the_gradient_norm_before_garbage_is_saved(data_dir, tmp_path, capfd):
    """lr 1e10 without warm-up: the loss stays finite (2.8e22) while the gradient norm overflows
    at step 3. The guard stops there, before checkpoint 10 would store the garbage."""
    wd = tmp_path / "wd"
    code, err = cli(capfd, train_cli.run, train_args(
        data_dir, wd, "--config.train.learning_rate=1e10", "--config.train.warmup_steps=0",
        "--config.train.num_steps=30", "--config.train.checkpoint_every=10"))
    assert code == 1 and len(err) == 1, err
    step = int(err[0].split("diverged at step ")[1].split(" ")[0])
    assert step < 10 and "gradient norm inf" in err[0], err  # 3 on this CPU
    assert "there is no checkpoint yet" in err[0] and "None" not in err[0], err
    assert not os.listdir(wd / "checkpoints")


def test_5_nan_guard_stops_on_a_non_finite_loss_and_names_the_checkpoint_really_intact(
        data_dir, tiny_run, tmp_path, monkeypatch):
    """Resumed from 2 past a damaged 4, a NaN batch at step 3: the message names 2 (not the
    damaged 4), and nothing is saved or moved."""
    from t2i_jax import data as data_lib
    wd = copy_run(tiny_run, tmp_path)
    largest_file(wd / "checkpoints" / "4" / "state").write_bytes(b"\0" * 1000)
    real = data_lib.make_train_iterator

    class Poisoned:
        def __init__(self, it):
            self.it, self.n = it, 0

        def __next__(self):
            b = next(self.it)
            self.n += 1
            if self.n == 1:  # the batch of step 3
                b["image"] = np.full_like(b["image"], np.nan)
            return b

        def get_state(self):
            return self.it.get_state()

        def set_state(self, s):
            self.it.set_state(s)

    monkeypatch.setattr(data_lib, "make_train_iterator", lambda *a, **k: Poisoned(real(*a, **k)))
    with pytest.raises(loop.NonFiniteLossError, match="at step 3.*checkpoint \\(2\\) is intact"):
        run(tiny(data_dir), wd)
    assert steps_on_disk(wd) == [2, 4] and not (wd / "checkpoints.damaged").exists()


def test_5_the_guard_reads_loss_gradient_norm_and_parameters():
    """The device-side record keeps the FIRST non-finite step (the loop reads it only at log
    steps and before every save) and the message names what was not finite."""
    ok = dict(loss=0.5, grad_norm=1.0, params_finite=True, finite=True)
    for bad, word in ((dict(loss=float("nan")), "loss nan"), (dict(grad_norm=float("inf")),
                      "gradient norm inf"), (dict(params_finite=False), "parameters no longer")):
        watch = loop._fresh_watch()
        for step, m in ((6, ok), (7, {**ok, **bad, "finite": False}),
                        (8, dict(loss=float("inf"), grad_norm=float("nan"), params_finite=False,
                                 finite=False)), (9, ok)):
            watch = loop._watch(watch, jax.tree_util.tree_map(jnp.asarray, m), jnp.int32(step))
        w = jax.device_get(watch)
        assert not w["ok"] and int(w["step"]) == 7
        msg = loop._divergence(w["bad"], int(w["step"]), 6, 1e-3)
        assert "diverged at step 7" in msg and word in msg and "checkpoint (6) is intact" in msg


# ---------------------------------------------------------------------------------------------
# Silent garbage


def sample_args(workdir, outdir, *extra):
    return ["--workdir", str(workdir), "--prompt", "seven", "--num_per_prompt", "4",
            "--outdir", str(outdir), "--no_progress", *extra]


def test_6_non_finite_images_are_reported_and_not_written(tiny_workdir, tmp_path, capfd):
    out = tmp_path / "huge_w"
    code, err = cli(capfd, sample_cli.run, sample_args(tiny_workdir, out, "--guidance", "1e30",
                                                      "--thresholding", "none"))
    assert code == 1 and len(err) <= 2, err  # the job's opening line, then the error
    assert f"4 of 4 images of {tiny_workdir} came out NaN or infinite (indices 0, 1, 2, 3" \
        in err[-1], err
    # the options of the stage that made them, each with its flag
    assert "Lower --guidance (now 1e+30); use --thresholding static or dynamic" in err[-1], err
    assert not list((out / "images").iterdir()) and not list((out / "shards").iterdir())
    assert not (out / "samples.jsonl").exists()  # not mistaken for finished
    json.loads((out / "stats.json").read_text())  # valid JSON (no NaN)


@pytest.mark.parametrize("extra, message", [
    (["--eta", "nan"], "--eta must be a number in [0, 1]"),
    (["--eta", "-3"], "--eta must be a number in [0, 1]"),          # 8: refused before job.json
    (["--guidance", "inf"], "--guidance takes finite numbers"),
])
def test_6_8_non_finite_and_out_of_range_options_are_refused_before_anything_is_written(
        tiny_workdir, tmp_path, capfd, extra, message):
    out = tmp_path / "o"
    code, err = cli(capfd, sample_cli.run, sample_args(tiny_workdir, out, *extra))
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()
    code, err = cli(capfd, sample_cli.run, sample_args(tiny_workdir, out, "--steps", "2"))
    assert code == 0, err  # the corrected command is not refused for that outdir


def test_6_reproduce_refuses_a_nan_guidance_and_a_negative_seed(tiny_workdir, tmp_path, capfd):
    from t2i_jax.evaluation.reproduce.cli import main as reproduce_main
    for extra, message in ((["--guidance", "nan"], "--guidance must be a finite number"),
                           (["--seed", "-1"], "--seed must be in [0, 2^32)")):  # 13
        code, err = cli(capfd, reproduce_main, ["ddim", "--workdir", tiny_workdir, "--out",
                                                str(tmp_path / "r"), *extra])
        assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r").exists()


def test_7_an_empty_outdir_or_one_inside_checkpoints_is_refused(tiny_workdir, tmp_path, capfd):
    for outdir, message in (("", "--outdir is empty"),
                            (os.path.join(tiny_workdir, "checkpoints", "40", "samples"),
                             "inside " + os.path.join(tiny_workdir, "checkpoints"))):
        code, err = cli(capfd, sample_cli.run, sample_args(tiny_workdir, outdir))
        assert code == 2 and len(err) == 1 and message in err[0], err
    assert sorted(os.listdir(os.path.join(tiny_workdir, "checkpoints", "40"))) == sorted(
        ["_CHECKPOINT_METADATA", "commit_success.txt", "config", "data", "state", integrity.RECORD])
    assert not os.path.exists(os.path.join(os.getcwd(), out_lib.JOB_FILE))


def stats_file(path, mu, sigma):
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    return str(path)


def test_9_12_fid_refuses_nan_statistics_mismatched_sets_and_bad_options(tmp_path, capfd):
    from t2i_jax.evaluation import fid
    good = stats_file(tmp_path / "good.npz", np.zeros(4), np.eye(4))
    nan = stats_file(tmp_path / "nan.npz", [0, np.nan, 0, 0], np.eye(4))
    six = stats_file(tmp_path / "six.npz", np.zeros(6), np.eye(6))
    np.savez(tmp_path / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "none.npz", arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    w = ["--inception", str(tmp_path / "no_weights_needed.npz")]
    for sets, message in (([nan, good], "contain NaN"),                       # 9
                          ([six, good], "6-d and set B's are 4-d"),           # 12
                          ([str(tmp_path / "one.npz"), good], "holds 1 image"),
                          ([str(tmp_path / "none.npz"), good], "holds 0 image")):
        code, err = cli(capfd, fid.main, w + sets)
        assert code == 1 and len(err) == 1 and message in err[0], (sets, err)
    code, err = cli(capfd, fid.main, w + [good, good, "--batch_size", "0"])
    assert code == 2 and len(err) == 1 and "--batch_size must be >= 1" in err[0], err
    code, err = cli(capfd, fid.main, w + [good, good, "--save_stats", str(tmp_path)])
    assert code == 1 and len(err) == 1 and "is a directory" in err[0], err
    capfd.readouterr()
    assert fid.main(w + [good, good]) == 0 and "FID 0.0000" in capfd.readouterr().out


def test_only_damage_falls_back_to_an_older_step():
    """Memory, permissions and exhausted resources say nothing about a checkpoint's bytes: no
    fallback (and so no moving aside) for them."""
    import errno
    assert ckpt_lib.is_damage(integrity.DamagedError("x has 10 bytes, 20 were written"))
    assert ckpt_lib.is_damage(json.JSONDecodeError("Expecting value", "", 0))
    assert ckpt_lib.is_damage(Exception("Encountered error while reading array index"))
    assert not ckpt_lib.is_damage(MemoryError())
    assert not ckpt_lib.is_damage(PermissionError(errno.EACCES, "Permission denied", "f"))
    assert not ckpt_lib.is_damage(ValueError("RESOURCE_EXHAUSTED: out of memory"))
    wrapped = Exception("reading failed")
    wrapped.__cause__ = OSError(errno.ENOMEM, "Cannot allocate memory")
    assert not ckpt_lib.is_damage(wrapped)


def test_integrity_record_catches_a_flipped_bit_that_orbax_reads_silently(tiny_run, tmp_path):
    """A byte changed inside a stored array (same size): with the record the step is refused;
    without it orbax restores a different number and no error."""
    state4, _ = tiny_run
    wd = copy_run(tiny_run, tmp_path)
    step4 = wd / "checkpoints" / "4"
    target = largest_file(step4 / "state")
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))
    assert "CRC-32 differs" in integrity.verify(str(step4))
    abstract = jax.eval_shape(loop.Run.from_config(tiny(None)).create_state, jax.random.key(0))
    ck = ckpt_lib.Checkpointer(str(wd / "checkpoints"), read_only=True, report=lambda m: None)
    with pytest.raises(ckpt_lib.CheckpointDamagedError):
        ck.restore(abstract, step=4)
    (step4 / integrity.RECORD).unlink()
    try:
        restored = ck.restore(abstract, step=4).state
    except ckpt_lib.CheckpointDamagedError:
        return  # this chunk's codec noticed; the record is what makes detection certain
    finally:
        ck.close()
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(jax.device_get(restored)),
        jax.tree_util.tree_leaves(jax.device_get(state4))))


# ---------------------------------------------------------------------------------------------
# One clear line


@pytest.mark.parametrize("case, extra, code, words", [
    ("no --config, unknown key", ["--config.foo=1"], 2, ["unknown config key config.foo"]),
    ("unknown nested key", ["--config.train.foo=1"], 2, ["config.train.foo", "batch_size"]),
    ("missing config file", ["--config=configs/nope.py"], 2, ["no config file configs/nope.py"]),
    ("checkpoint_every=0", ["--config.train.checkpoint_every=0"], 2,
     ["checkpoint_every must be an integer >= 1"]),
    ("log_every=0", ["--config.train.log_every=0"], 2, ["log_every must be an integer >= 1"]),
    ("learning_rate=nan", ["--config.train.learning_rate=nan"], 2,
     ["config.train.learning_rate=nan is not a finite number"]),
    ("batch of 12 on 8 devices", ["--config.train.batch_size=12"], 2,
     ["does not divide over 8 devices", "multiple of 8"]),
    ("offline catalog data", ["--config=configs/cifar10.py", "--config.train.batch_size=8"], 1,
     ["'cifar10'", "is not prepared", "tfds build cifar10", "--config.data.data_dir=DIR"]),
    ("pretrained: not a diffusers folder", ["--config=configs/sd_finetune.py",
                                            "--config.model.pretrained=configs"], 2,
     ["config.model.pretrained=", "has no model_index.json", "diffusers Stable Diffusion folder"]),
    ("LoRA targets matching no layer", [
        "--config=configs/sd_finetune.py", "--config.model.pretrained=tests/fixtures/sd/tiny_sd1",
        "--config.train.lora.rank=2", "--config.train.lora.targets=('to_z',)"], 2,
     ["config.train.lora.targets", "'to_z' matches no layer", "to_q"]),
])
def test_10_train_mistakes_get_one_line_and_write_nothing(data_dir, tmp_path, capfd, case, extra,
                                                          code, words):
    wd = tmp_path / "wd"
    argv = [f"--workdir={wd}", "--progress=false", *extra]
    if case != "no --config, unknown key" and not any(a.startswith("--config=") for a in extra):
        argv.insert(0, f"--config={TINY}")
    if "catalog" in case:
        argv.append(f"--config.data.data_dir={tmp_path / 'empty'}")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        got, err = cli(capfd, train_cli.run, argv)
    finally:
        os.chdir(cwd)
    assert got == code and len(err) == 1, (case, err)
    assert all(w in err[0] for w in words), (case, err)
    assert not wd.exists(), case


def test_10_train_workdir_that_is_a_file_or_read_only(data_dir, tmp_path, capfd):
    f = tmp_path / "a_file"
    f.write_text("x")
    code, err = cli(capfd, train_cli.run, train_args(data_dir, f))
    assert code == 2 and len(err) == 1 and "is a file, not a directory" in err[0], err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    out = subprocess.run(as_unprivileged() + [sys.executable, os.path.join(ROOT, "train.py"),
                         *train_args(data_dir, ro / "run")], env=env(), capture_output=True,
                         text=True, timeout=120)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "cannot be created in" in lines[0] and "read-only" in lines[0], lines
    assert not (ro / "run").exists()


def test_10_a_second_sigterm_stops_at_once_with_one_line_and_the_rerun_is_exact(
        data_dir, tiny_run, tmp_path, capfd, monkeypatch):
    """The first SIGTERM arrives at step 3 (save, then stop), the second as that save begins:
    the run stops at once (exit 143) with one line; checkpoint 2 is intact and the rerun ends
    equal to a straight run."""
    state4, _ = tiny_run
    from t2i_jax.training import writers
    real_scalars, real_save = writers.MetricWriter.scalars, ckpt_lib.Checkpointer.save

    def scalars(self, step, metrics):
        real_scalars(self, step, metrics)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    def save(self, step, *args):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(self, step, *args)

    monkeypatch.setattr(writers.MetricWriter, "scalars", scalars)
    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)
    wd = tmp_path / "wd"
    code, err = cli(capfd, train_cli.run, train_args(data_dir, wd))
    assert code == 128 + signal.SIGTERM, err
    err = [l for l in err if not l.startswith("[t2i_jax] SIGTERM: saving")]
    assert len(err) == 1 and "stopped by a second SIGTERM without saving (at step 3)" in err[0]
    assert "the newest checkpoint, step 2, is intact" in err[0], err
    monkeypatch.undo()
    assert steps_on_disk(wd) == [2]
    code, err = cli(capfd, train_cli.run, train_args(data_dir, wd))
    assert code == 0, err
    assert_saved_equals(wd, 4, state4)


def test_10_ctrl_c_in_sample_py_is_one_line_and_the_rerun_finishes(tiny_workdir, tmp_path, capfd,
                                                                 monkeypatch):
    from t2i_jax import images
    real_save, calls = images.save_png, []

    def save_png(path, image):
        real_save(path, image)
        calls.append(path)
        if len(calls) == 6:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread

    monkeypatch.setattr(images, "save_png", save_png)
    out = tmp_path / "o"
    args = sample_args(tiny_workdir, out, "--shard_size", "2", "--batch_size", "8",
                       "--num_per_prompt", "12", "--steps", "2")
    code, err = cli(capfd, sample_cli.run, args)
    assert code == 130, err
    assert err[-1] == (f"sample.py: interrupted: the finished shards in {out} are kept; rerun "
                       "the same command to finish the job."), err
    assert len(err) <= 2, err  # the job's opening line, then this one
    monkeypatch.undo()
    kept = sorted(os.listdir(out / "shards"))
    assert 1 <= len(kept) <= 3 and not (out / "samples.jsonl").exists()
    code, err = cli(capfd, sample_cli.run, args)
    assert code == 0, err
    rows = files.read_jsonl(str(out / "samples.jsonl"))
    assert [r["index"] for r in rows] == list(range(12))


def test_11_a_full_disk_gets_one_line_keeps_the_last_checkpoint_and_resumes(data_dir, tiny_run,
                                                                          tmp_path):
    """A real ENOSPC: train.py on a tmpfs (a user namespace's own mount) of 1.5 checkpoints, so
    the first checkpoint fits and the second does not."""
    state4, wd4 = tiny_run
    ns = user_namespace("-Urm")
    mnt, saved = tmp_path / "mnt", tmp_path / "saved"
    mnt.mkdir()
    size = sum(p.stat().st_size for p in (wd4 / "checkpoints" / "2").rglob("*") if p.is_file())
    script = (f"mount -t tmpfs -o size={int(1.5 * size) // 1024 + 64}k tmpfs {mnt} && "
              f"{sys.executable} {os.path.join(ROOT, 'train.py')} "
              + " ".join(train_args(data_dir, mnt / "wd")) + f"; rc=$?; cp -a {mnt}/wd {saved}; "
              "exit $rc")
    out = subprocess.run(ns + ["sh", "-c", script], env=env(), capture_output=True, text=True,
                         timeout=300)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 1, out.stderr[-3000:]
    assert len(lines) <= MAX_STDERR_LINES, out.stderr[-3000:]
    line = next(l for l in lines if l.startswith("train.py: error:"))
    for words in ("could not save checkpoint 4", "No space left on device", "free some space",
                  "it resumes from step 2", "(details: "):
        assert words in line, line
    # Nothing lost: checkpoint 2 intact, no partial step 4; with space, the rerun is exact.
    assert sorted(os.listdir(saved / "checkpoints")) == ["2"]
    assert integrity.verify(str(saved / "checkpoints" / "2")) is None
    code = train_cli.run(train_args(data_dir, saved))
    assert code == 0
    assert_saved_equals(saved, 4, state4)


def test_13_reproduce_refuses_an_out_that_is_a_file_and_keeps_the_evaluator_off_a_read_only_workdir(
        tiny_workdir, tmp_path, capfd):
    from t2i_jax.evaluation.reproduce.cli import main as reproduce_main
    from t2i_jax.evaluation.scorer import evaluator_cache, evaluator_dir
    f = tmp_path / "f"
    f.write_text("x")
    code, err = cli(capfd, reproduce_main, ["cfg", "--workdir", tiny_workdir, "--out", str(f)])
    assert code == 2 and len(err) == 1 and "is a file" in err[0], err
    # Where would a read-only workdir's evaluator go? Decided before any sampling: to --out.
    ro = tmp_path / "ro"
    shutil.copytree(tiny_workdir, ro, ignore=shutil.ignore_patterns("reproduce"))
    ro.chmod(0o555)
    probe = ("import sys; from t2i_jax.evaluation.scorer import evaluator_cache; "
             "from runs import tiny; print(evaluator_cache(sys.argv[1], sys.argv[2], "
             "tiny(None).data))")
    got = subprocess.run(as_unprivileged() + [sys.executable, "-c", probe, str(ro), str(tmp_path / "out")],
                         env=dict(env(), PYTHONPATH=os.path.join(ROOT, "tests")), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == str(tmp_path / "out")
    ro.chmod(0o755)
    assert evaluator_cache(str(ro), str(tmp_path / "out"), tiny(None).data) == \
        evaluator_dir(str(ro))  # writable: the shared place


# ---------------------------------------------------------------------------------------------
# Misleading output


def test_14_preparing_data_says_nothing_about_downloads(tmp_path, capfd):
    from t2i_jax.data import digits
    digits.builder(str(tmp_path / "fresh"))
    out = capfd.readouterr()
    assert "Downloading" not in out.out + out.err and "downloaded" not in out.out + out.err
    assert "[t2i_jax] preparing the data set t2i_digits" in out.out


def test_14_a_no_op_rerun_writes_no_tensorboard_file(data_dir, tiny_run, tmp_path, capfd):
    wd = copy_run(tiny_run, tmp_path)
    before = sorted(os.listdir(wd / "tensorboard"))
    code, err = cli(capfd, train_cli.run, train_args(data_dir, wd))
    assert code == 0 and any("nothing to train" in l for l in err), err
    assert sorted(os.listdir(wd / "tensorboard")) == before
