"""Several JAX processes for real: 2 processes x 4 CPU devices, started by python -m t2i_jax.launch
(jax.distributed over localhost, gloo collectives), against 1 process x 8 devices.

Training equals the single-process run (losses, parameters, the progress grid) for the diffusion
family and the CLIP (whose in-batch negatives span both processes); checkpoints move between 1
and 2 processes both ways; SIGTERM to one process makes both save the same step and exit 0;
kill -9 of one process and a rerun of both ends where the straight run ends; a NaN stops both.
Each process reads a disjoint slice of every global batch. A sampling job on 2 processes writes
the same files as on 1, and completes after one process is killed mid-job. Bad process groups
are refused in one line, within the timeout given.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from conftest import _made_once
from runs import ROOT, TESTS, assert_trees_close, run, tiny
from t2i_jax import checkpoint as ckpt_lib, images, sharding as mesh_lib
from t2i_jax.sampling import outdir as out_lib
from t2i_jax.training import loop
from t2i_jax.training.writers import MetricWriter, read_metrics

TRAIN, SAMPLE = os.path.join(ROOT, "train.py"), os.path.join(ROOT, "sample.py")


def _env():
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


class Launched:
    """python -m t2i_jax.launch --num_processes 2 --devices_per_process 4 -- ARGS, its output
    collected as it comes."""

    def __init__(self, args, processes=2, devices=4, grace=2):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "t2i_jax.launch", f"--num_processes={processes}",
             f"--devices_per_process={devices}", f"--grace={grace}", "--", *map(str, args)],
            env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.decode("utf-8", "replace"))

    @property
    def text(self):
        return "".join(self.lines)

    def pid(self, i):
        deadline = time.time() + 60
        while time.time() < deadline:
            m = re.search(rf"process {i} of \d+: pid (\d+)", self.text)
            if m:
                return int(m.group(1))
            time.sleep(0.01)
        raise AssertionError(self.text)

    def wait(self, timeout=300):
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"no exit in {timeout} s:\n{self.text[-4000:]}")
        self.reader.join(10)
        return code


def _config_file(directory, name):
    path = directory / f"{name}_config_{os.getpid()}.py"
    path.write_text(f"import sys\nsys.path.insert(0, {TESTS!r})\nimport tiny_families\n\n\n"
                    f"def get_config():\n    return tiny_families.get_config({name!r})\n")
    return path


def _train_args(data_dir, config, wd, *extra):
    return [TRAIN, f"--config={config}", f"--workdir={wd}", f"--config.data.data_dir={data_dir}",
            "--progress=false", *extra]


def _restore(cfg, wd, step):
    """The TrainState of checkpoint `step`, laid out replicated on this process's 8 devices
    (a checkpoint written by 2 processes names devices this process does not have)."""
    r = loop.Run.from_config(cfg)
    rep = mesh_lib.replicated(mesh_lib.make_mesh(1))
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                                      jax.eval_shape(r.create_state, jax.random.key(0)))
    ck = ckpt_lib.Checkpointer(str(wd / "checkpoints"), read_only=True)
    try:
        return ck.restore(abstract, step=step).state
    finally:
        ck.close()


def _losses(wd):
    return [(r["step"], r["loss"]) for r in read_metrics(wd)]


def _wait_until(cond, job, seconds=240):
    deadline = time.time() + seconds
    while not cond():
        assert job.proc.poll() is None, job.text[-4000:]
        assert time.time() < deadline, job.text[-4000:]
        time.sleep(0.02)


def _latest(wd):
    d = wd / "checkpoints"
    steps = [int(n) for n in os.listdir(d) if n.isdigit()] if d.is_dir() else []
    return max(steps, default=None)


@pytest.fixture(scope="session")
def mp_runs(data_dir, tmp_path_factory):
    """name -> workdir of the tiny family trained 4 steps on 2 processes x 4 devices (checkpoints
    2 and 4; the diffusion run also writes its progress grid at step 4). Made once for all workers."""
    def make(name):
        def train(wd):
            job = Launched(_train_args(data_dir, _config_file(wd.parent, name), wd,
                                       *(["--config.train.sample_every=4"] if name == "diffusion" else [])))
            assert job.wait() == 0, job.text[-4000:]
        return _made_once(tmp_path_factory, f"mp_{name}", train)
    return make


@pytest.mark.parametrize("name", ("diffusion", "contrastive"))
def test_two_processes_train_as_one_process_with_all_the_devices(data_dir, straight_runs, mp_runs,
                                                                 tmp_path, name):
    state8, wd8 = straight_runs[name]
    wd2 = mp_runs(name)
    (s2, l2), (s8, l8) = zip(*_losses(wd2)), zip(*_losses(wd8))
    assert s2 == s8 == (1, 2, 3, 4)
    np.testing.assert_allclose(l2, l8, rtol=1e-5)
    state2 = _restore(tiny(data_dir, name), wd2, 4)
    for part in ("params", "ema_params"):
        assert_trees_close(getattr(state2, part), getattr(state8, part), atol=2e-5)
    if name == "diffusion":  # the progress grid: sampled by both processes, written by process 0
        family = loop.Run.from_config(tiny(data_dir, train__sample_every=4)).family
        grid = loop._GridSampler(family, str(tmp_path), MetricWriter(str(tmp_path), enabled=False),
                                 mesh_lib.make_mesh(1))
        mine = images.load_png(grid(state8, 4)).astype(int)
        theirs = images.load_png(str(wd2 / "samples" / "step_0000004.png")).astype(int)
        assert mine.shape == theirs.shape and mine.std() > 10
        assert np.abs(mine - theirs).max() <= 1


def test_a_checkpoint_of_two_processes_resumes_on_one(data_dir, straight_runs, mp_runs, tmp_path):
    state8, wd8 = straight_runs["diffusion"]
    wd = tmp_path / "wd"
    shutil.copytree(mp_runs("diffusion"), wd)
    shutil.rmtree(wd / "checkpoints" / "4")
    resumed = run(tiny(data_dir), wd)  # 1 process, 8 devices, from the 2-process checkpoint 2
    assert_trees_close(resumed.params, state8.params, atol=2e-5)
    np.testing.assert_allclose([l for _, l in _losses(wd)], [l for _, l in _losses(wd8)], rtol=1e-5)


def test_one_process_checkpoint_resumes_on_two_and_survives_kill_9_and_sigterm_of_one(
        data_dir, straight_runs, tmp_path):
    _, wd8 = straight_runs["diffusion"]
    wd = tmp_path / "wd"
    shutil.copytree(wd8, wd)
    shutil.rmtree(wd / "checkpoints" / "4")  # a 1-process run stopped after step 2
    _keep_metrics(wd, 2)
    # The constant learning rate does not depend on num_steps: a run stopped at step s equals
    # a straight run of s steps.
    args = _train_args(data_dir, _config_file(tmp_path, "diffusion"), wd,
                       "--config.train.num_steps=100000")

    # Resumed on 2 processes; kill -9 of process 1 once checkpoint 4 is complete: the launcher
    # stops process 0 too (it cannot go on alone).
    job = Launched(args)
    _wait_until(lambda: (_latest(wd) or 0) >= 4, job)
    os.kill(job.pid(1), signal.SIGKILL)
    assert job.wait() != 0
    assert "process 1 was killed by SIGKILL" in job.text
    killed_at = _latest(wd)
    # Rows the killed run logged past its checkpoint (the rerun drops them when it starts) must
    # not be taken for the rerun's progress below.
    _keep_metrics(wd, killed_at)

    # Both rerun, resuming from the newest complete checkpoint; SIGTERM to process 1 alone once
    # two more steps are logged: both save the same step and exit 0.
    job = Launched(args)
    _wait_until(lambda: max((s for s, _ in _safe_losses(wd)), default=0) >= killed_at + 2, job)
    os.kill(job.pid(1), signal.SIGTERM)
    assert job.wait() == 0, job.text[-4000:]
    stops = re.findall(r"^(\[process 1\] )?\[t2i_jax\] stopped by (.+?) at step (\d+); checkpoint",
                       job.text, re.M)
    assert sorted((p, by) for p, by, _ in stops) == [("", "a signal to another process"),
                                                      ("[process 1] ", "SIGTERM")], job.text
    (total,) = {int(s) for _, _, s in stops}
    assert total > killed_at and _latest(wd) == total

    straight = run(tiny(data_dir, train__num_steps=total), tmp_path / "straight")  # 1 x 8, no stops
    final = _restore(tiny(data_dir), wd, total)
    for part in ("params", "ema_params", "opt_state"):
        assert_trees_close(getattr(final, part), getattr(straight, part), atol=2e-5)
    (s, l), (s_ref, l_ref) = zip(*_losses(wd)), zip(*_losses(tmp_path / "straight"))
    assert s == s_ref == tuple(range(1, total + 1))
    np.testing.assert_allclose(l, l_ref, rtol=1e-5)


def _keep_metrics(wd, last):
    """metrics.jsonl cut after step `last`, as a run stopped there leaves it (a row cut by a kill
    is dropped too)."""
    rows = []
    for line in (wd / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row["step"] <= last:
            rows.append(line + "\n")
    (wd / "metrics.jsonl").write_text("".join(rows))


def _safe_losses(wd):
    try:
        return _losses(wd)
    except (OSError, ValueError):  # a row half written
        return []


def test_a_non_finite_step_stops_every_process_before_it_is_saved(data_dir, straight_runs, tmp_path):
    _, wd8 = straight_runs["diffusion"]
    wd = tmp_path / "wd"
    shutil.copytree(wd8, wd)
    shutil.rmtree(wd / "checkpoints" / "4")
    # From checkpoint 2 with an absurd learning rate: the parameters overflow within two steps.
    # Metrics are read only every 100 steps, yet both processes stop at the save of step 4,
    # naming the same first non-finite step, and checkpoint 4 is never written.
    job = Launched(_train_args(data_dir, _config_file(tmp_path, "diffusion"), wd,
                               "--config.train.learning_rate=1e30", "--config.train.warmup_steps=0",
                               "--config.train.num_steps=6", "--config.train.log_every=100"))
    assert job.wait() == 1
    bad = re.findall(r"^(?:\[process 1\] )?train.py: error: training diverged at step (\d+) .*"
                     r"the last good checkpoint \(2\) is intact", job.text, re.M)
    assert len(bad) == 2 and bad[0] == bad[1] and int(bad[0]) in (3, 4), job.text
    assert ckpt_lib.Checkpointer(str(wd / "checkpoints"), read_only=True).steps() == [2]


def test_each_process_reads_a_disjoint_slice_of_every_global_batch(data_dir, tmp_path):
    from t2i_jax import data as data_lib
    cfg = tiny(data_dir)
    B = 64
    single = data_lib.make_train_iterator(cfg.data, seed=cfg.seed, global_batch_size=B,
                                          max_length=32, process_index=0, process_count=1)
    n = len(data_lib.load_split(cfg.data, "train", max_examples=None)["index"])
    steps = n // B + 2  # an epoch and into the next
    job = Launched([os.path.join(TESTS, "mp_data_probe.py"), tmp_path, data_dir, B, steps])
    assert job.wait() == 0, job.text[-4000:]
    p0, p1 = (json.loads((tmp_path / f"process_{i}.json").read_text()) for i in (0, 1))
    assert (p0["count"], p0["devices"], p1["process"]) == (2, 8, 1)
    for step in range(steps):
        a, b = p0["local"][step], p1["local"][step]
        assert len(a) == len(b) == B // 2 and not set(a) & set(b)
        want = [int(i) for i in next(single)["index"]]
        assert a + b == want  # process 0's half, then process 1's: the 1-process batch
        assert p0["assembled"][step] == p1["assembled"][step] == want
    epoch = [i for s in range(n // B) for i in p0["local"][s] + p1["local"][s]]
    assert len(set(epoch)) == len(epoch) == n // B * B  # no record twice within the epoch


def _free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_bad_process_groups_are_refused_in_one_line_within_the_timeout(data_dir, tmp_path):
    config = _config_file(tmp_path, "diffusion")
    base = _train_args(data_dir, config, tmp_path / "wd")
    one = lambda *extra: subprocess.run([sys.executable, *map(str, base), *extra], env=_env(),  # noqa: E731
                                        capture_output=True, text=True, timeout=120)
    # A process id out of range: refused before jax starts.
    r = one("--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=2")
    assert r.returncode == 2 and "--process_id 2 is out of range for --num_processes 2" in r.stderr
    r = one("--num_processes=2", "--process_id=0")
    assert r.returncode == 2 and "without --coordinator_address" in r.stderr
    r = one("--multihost")  # no cluster here for jax to detect
    assert r.returncode == 2 and "could not join the process group" in r.stderr
    # A coordinator that never comes up: one line after the 3 s timeout, not a hang.
    t0 = time.time()
    r = one(f"--coordinator_address=localhost:{_free_port()}", "--num_processes=2",
            "--process_id=1", "--initialization_timeout=3")
    assert r.returncode == 1 and time.time() - t0 < 60
    assert "did not come up within 3 s" in r.stderr and "Check failure" not in r.stderr
    # Different configs on the two processes: both refuse, naming the difference.
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *map(str, base), f"--config.seed={i}",
                               f"--coordinator_address=localhost:{port}", "--num_processes=2",
                               f"--process_id={i}", "--initialization_timeout=60"],
                              env=dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=4"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    outs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    assert "process 1 was given another config or --workdir than process 0" in outs[1]
    assert "config.seed: 0 -> 1" in outs[1] and "process(es) [1]" in outs[0]
    assert not (tmp_path / "wd" / "checkpoints").exists()
    # A global batch that does not divide over the 8 devices of the 2 processes.
    job = Launched(base + ["--config.train.batch_size=12"])
    assert job.wait() == 2  # the command line cannot run
    assert "global batch size 12 does not divide over 8 devices" in job.text
    assert len(re.findall(r"train.py: error:", job.text)) == 2
    # The launcher's own usage errors.
    r = subprocess.run([sys.executable, "-m", "t2i_jax.launch", "--num_processes=2"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no command: put it after --" in r.stderr
    r = subprocess.run([sys.executable, "-m", "t2i_jax.launch", "--num_processes=2", "--",
                        TRAIN, "--process_id=1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "the launcher passes the process-group flags" in r.stderr


def test_a_sampling_job_on_two_processes_survives_a_kill_and_writes_what_one_writes(
        tiny_workdir, tmp_path):
    prompts = ["seven", "数字三", "two", "nine"]
    args = [SAMPLE, f"--workdir={tiny_workdir}", *[f"--prompt={p}" for p in prompts],
            "--num_per_prompt=8", "--guidance", "0", "2", "--steps=3", "--seed=4",
            "--batch_size=8", "--shard_size=4", "--no_progress"]
    import sample as sample_cli
    assert sample_cli.run(args[1:] + [f"--outdir={tmp_path / 'one'}"]) == 0  # 1 process x 8
    ref, ref_rows = out_lib.load_images(str(tmp_path / "one"))

    # On 2 processes, process 1 killed once 4 of the 16 shards are done; the rerun of both
    # completes the job.
    out = tmp_path / "two"
    job = Launched(args + [f"--outdir={out}"])
    _wait_until(lambda: (out / "shards").is_dir() and len(os.listdir(out / "shards")) >= 4, job)
    os.kill(job.pid(1), signal.SIGKILL)
    assert job.wait() != 0
    assert not out_lib.is_complete(str(out)) and len(os.listdir(out / "shards")) < 16
    job = Launched(args + [f"--outdir={out}"])
    assert job.wait() == 0, job.text[-4000:]
    assert "[process 1]" not in job.text  # process 1 writes nothing and reports nothing
    x, rows = out_lib.load_images(str(out))
    assert [r["index"] for r in rows] == list(range(64))  # every index exactly once
    assert sorted(os.listdir(out / "images")) == [f"{i:06d}.png" for i in range(64)]
    assert rows == ref_rows  # the same records as on 1 process
    # The same images up to float rounding (the processes' CPU kernels are other programs than
    # one process's: seen, 1 of 16384 values one level off): at most one level, rarely.
    diff = np.abs(x.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_a_crashed_process_s_stack_trace_stays_off_the_terminal(tmp_path):
    """A survivor that aborts when its peer dies (a C++ CHECK failure's glog trace, then Python's
    faulthandler dump) reaches the terminal as its lines before the crash plus one line naming
    the log that holds the trace."""
    script = tmp_path / "crash.py"
    script.write_text(
        "import faulthandler, os, sys\n"
        "faulthandler.enable()\n"
        "i = int(next(a for a in sys.argv if a.startswith('--process_id')).split('=')[1])\n"
        "print(f'step 1 of process {i}', flush=True)\n"
        "if i == 1:\n"
        "    sys.stderr.write('F1207 05:00:00.000000 77 client.cc:42] Terminating process because "
        "the coordination service has stopped\\n*** Check failure stack trace: ***\\n'\n"
        "                     + ''.join(f'    @     0x7f00000{k:05x}  absl::Frame{k}()\\n' "
        "for k in range(12)))\n"
        "    sys.stderr.flush()\n"
        "    os.abort()\n")
    from t2i_jax import launch
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as o, open(err, "wb") as e:
        code = launch.launch([str(script)], 2, 1, grace=1, stdout=o, stderr=e)
    text = out.read_text() + err.read_text()
    assert code == 128 + signal.SIGABRT
    assert "step 1 of process 0" in text and "[process 1] step 1 of process 1" in text
    assert "Terminating process because the coordination service has stopped" in text
    assert not re.search(r"@\s+0x|Check failure stack trace|Fatal Python error|Current thread",
                         text), text
    m = re.search(r"process 1 crashed; its stack trace \((\d+) lines\) was written to (\S+)\.",
                  text)
    assert m and int(m.group(1)) >= 13, text
    assert "Fatal Python error" in open(m.group(2)).read()
    assert len(text.splitlines()) <= 8, text


def test_gloo_notices_are_dropped_even_when_their_threads_interleave():
    """gloo prints "[Gloo] Rank r is connected to n peer ranks. Expected number of connected
    peer ranks is : n" in pieces from several threads, so a count can land on a line of its own
    (seen once in a cold suite run as "[process 1] 7"): the launcher drops those too, and
    nothing else."""
    import io
    from t2i_jax import launch
    notice = b"[Gloo] Rank 1 is connected to 7 peer ranks. Expected number of connected peer ranks is : "
    stream = io.BufferedReader(io.BytesIO(
        notice + notice + b"7\n" + b"7\n" + b"real output 7\n"))
    out = io.BytesIO()
    launch._pump(stream, out, b"[process 1] ")
    assert out.getvalue() == b"[process 1] real output 7\n"
