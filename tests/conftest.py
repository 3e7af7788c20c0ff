"""Test setup: 8 simulated CPU devices, so every multi-device path runs on one machine, and XLA's
CPU backend at optimisation level 0 (faster compiles for a compile-bound suite).

The flags must be set before jax is imported anywhere, which is why they live here.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
# The suite is compile-bound (hundreds of small programs, each run a few times): XLA's CPU
# backend at optimisation level 0 compiles them about twice as fast (measured: two UNet tests
# 63 s -> 33 s), and with its older (non-MLIR) fusion emitters faster again (the tiny train
# step: 19-20 s -> 12 s to compile on 2 cores). Every
# comparison in the suite is between programs compiled the same way, and train.py / sample.py
# subprocesses inherit XLA_FLAGS. T2I_TEST_XLA_OPT=1 keeps XLA's defaults.
_OPT = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if os.environ.get("T2I_TEST_XLA_OPT") != "1" and "xla_backend_optimization_level" not in \
        os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ["XLA_FLAGS"] + " " + _OPT).strip()

import shutil  # noqa: E402
import tempfile  # noqa: E402

# Caches of frozen text encoders' features and of weight-file hashes: never the user's ~/.cache.
os.environ.setdefault("T2I_JAX_CACHE", os.path.join(tempfile.gettempdir(), "t2i_jax_test_cache"))

import jax  # noqa: E402  (after the flag)

# Many tests build the same small programs (a train step, a sampler) in separate calls; a
# persistent compilation cache lets every call after the first skip XLA's compile.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "t2i_jax_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

assert jax.device_count() == 8, (
    f"tests expect 8 simulated devices, got {jax.device_count()}: jax was imported before "
    "tests/conftest.py could set XLA_FLAGS")


import pytest  # noqa: E402


# Session fixtures that train a model (tens of seconds each on 2 cores): a test that reads one is
# in the slow tier. The quick tier (-m "not slow") runs the rest, for the edit-test loop.
TRAINED_FIXTURES = {"tiny_workdir", "tiny_run", "straight_runs", "digits_evaluator", "tiny_inpaint",
                    "cascade", "tiny_autoencoder", "tiny_latent", "tiny_clip", "tiny_unclip"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: trains a model or runs for tens of seconds; the quick tier (-m 'not "
        "slow') leaves it out, CI runs everything.")
    config.addinivalue_line(
        "markers", "default_xla: the test compares two different programs bit for bit or at "
        "float32 rounding, which XLA promises only at its default optimisation level: under the "
        "suite's level 0 it runs in a subprocess at the default level (the same fixtures).")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """A default_xla test, when this process compiles at level 0: the same test node run by a
    pytest subprocess with XLA's default flags, reusing the session's shared fixtures."""
    if pyfuncitem.get_closest_marker("default_xla") is None or _OPT not in os.environ["XLA_FLAGS"]:
        return None
    import re
    import subprocess
    import sys
    root = _shared_root(pyfuncitem._request.getfixturevalue("tmp_path_factory"))
    env = dict(os.environ, T2I_TEST_XLA_OPT="1", PYTEST_XDIST_WORKER="default_xla",
               XLA_FLAGS=os.environ["XLA_FLAGS"].replace(_OPT, "").strip())
    base = root / ("default_xla_" + re.sub(r"[^A-Za-z0-9_]", "_", pyfuncitem.name))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                           f"--basetemp={base}", pyfuncitem.nodeid], env=env,
                          cwd=str(pyfuncitem.config.rootpath), capture_output=True, text=True)
    assert done.returncode == 0, ("at XLA's default optimisation level:\n"
                                  + (done.stdout + done.stderr)[-6000:])
    return True


def _shared_root(tmp_path_factory):
    """A directory all xdist workers share (their basetemps have one parent)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def _made_once(tmp_path_factory, name, make):
    """The shared directory `name`, made by make(path) once for all workers: the first takes the
    lock and makes it, the others wait and reuse it (a NAME.done file says it was finished)."""
    from t2i_jax.data.prepare import file_lock
    root = _shared_root(tmp_path_factory)
    path, done = root / name, root / f"{name}.done"
    with file_lock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            make(path)
            done.write_text("")
    return path


def _trained_40(data_dir, tmp_path_factory, family, name) -> str:
    """The tiny `family` (tests/tiny_families.py; None: tests/tiny_config.py) trained 40 steps
    to its end into the shared directory `name`, once for all workers; read-only."""
    from runs import run, tiny

    def make(wd):
        run(tiny(data_dir, family, train__num_steps=40, train__checkpoint_every=40), wd)
    return str(_made_once(tmp_path_factory, name, make))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The embedded data sets (digits, shapes), prepared once for all tests.

    One directory for all xdist workers: the preparation lock makes the first worker prepare and
    the others reuse it.
    """
    from t2i_jax.data import digits, shapes
    d = str(_shared_root(tmp_path_factory) / "t2i_data")
    digits.builder(d)
    shapes.builder(d)
    return d


@pytest.fixture(scope="session")
def tiny_workdir(data_dir, tmp_path_factory):
    """A tiny digits model (tests/tiny_config.py) trained 40 steps, to sample from: its outputs
    are no longer the zero-initialised ones. Trained once for all workers; read-only."""
    return _trained_40(data_dir, tmp_path_factory, None, "tiny_trained")


@pytest.fixture(scope="session")
def tiny_run(data_dir, tmp_path_factory):
    """(final state, workdir) of the tiny config trained 4 steps in one run on 8 devices, with
    checkpoints 2 and 4: the reference resumed and repaired runs must reproduce. Trained once for
    all workers (the others read the state from its checkpoint 4, bit for bit the same).
    Read-only: copy the workdir before changing it."""
    import jax
    from runs import run, tiny
    from t2i_jax import checkpoint as ckpt_lib, sharding as mesh_lib
    from t2i_jax.training import loop
    wd = _made_once(tmp_path_factory, "tiny_run", lambda p: run(tiny(data_dir), p))
    run_ = loop.Run.from_config(tiny(data_dir))
    rep = mesh_lib.replicated(mesh_lib.make_mesh(1))
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                                      jax.eval_shape(run_.create_state, jax.random.key(0)))
    ck = ckpt_lib.Checkpointer(str(wd / "checkpoints"), read_only=True)
    try:
        return ck.restore(abstract, step=4).state, wd
    finally:
        ck.close()


@pytest.fixture(scope="session")
def digits_evaluator(data_dir, tmp_path_factory):
    """The digits evaluator classifier, trained briefly (300 steps) once for all workers."""
    from t2i_jax.config_utils import load_config
    from t2i_jax.evaluation import evaluator as ev_lib
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                                   "digits.py"))
    cfg.data.data_dir = data_dir

    def make(d):
        ev_lib.save_evaluator(ev_lib.cache_path(str(d), cfg.data),
                              ev_lib.train_evaluator(cfg.data, steps=300))
    return ev_lib.load_or_train(cfg.data, str(_made_once(tmp_path_factory, "digits_evaluator", make)))


@pytest.fixture(scope="session")
def tiny_inpaint(data_dir, tmp_path_factory):
    """The tiny digits model with a learned variance and GLIDE's mask-conditioned input
    (tests/tiny_families.py "learned_sigma_inpaint") trained 40 steps, once for all workers;
    read-only."""
    return _trained_40(data_dir, tmp_path_factory, "learned_sigma_inpaint", "tiny_inpaint")


@pytest.fixture(scope="session")
def cascade(data_dir, tmp_path_factory):
    """(base workdir, SR workdir): the tiny 8x8 digits model and the tiny 8 -> 16 SR stage
    (tests/tiny_families.py), each trained 40 steps once for all workers; read-only."""
    return tuple(_trained_40(data_dir, tmp_path_factory, name, f"cascade_{name}")
                 for name in ("base8", "super_resolution"))


@pytest.fixture(scope="session")
def tiny_autoencoder(data_dir, tmp_path_factory):
    """The tiny digits autoencoder (tests/tiny_families.py, with its patch-GAN) trained 40 steps
    to its end, so its checkpoint stores the scale factor, once for all workers; read-only.
    $T2I_TEST_AUTOENCODER names it: the tiny latent model's config reads it."""
    wd = _trained_40(data_dir, tmp_path_factory, "autoencoder", "tiny_autoencoder")
    os.environ["T2I_TEST_AUTOENCODER"] = wd
    return wd


@pytest.fixture(scope="session")
def tiny_latent(data_dir, tmp_path_factory, tiny_autoencoder):
    """The tiny latent model on tiny_autoencoder, trained 40 steps once; read-only."""
    return _trained_40(data_dir, tmp_path_factory, "latent_diffusion", "tiny_latent")


@pytest.fixture(scope="session")
def tiny_clip(data_dir, tmp_path_factory):
    """The tiny digits CLIP (tests/tiny_families.py "contrastive") trained 40 steps once for all
    workers; read-only. $T2I_TEST_CLIP names it: the tiny prior's and decoder's configs read it."""
    wd = _trained_40(data_dir, tmp_path_factory, "contrastive", "tiny_clip")
    os.environ["T2I_TEST_CLIP"] = wd
    return wd


@pytest.fixture(scope="session")
def tiny_unclip(data_dir, tmp_path_factory, tiny_clip):
    """(prior workdir, decoder workdir) on tiny_clip, each trained 40 steps once; read-only."""
    return tuple(_trained_40(data_dir, tmp_path_factory, name, f"tiny_{name}")
                 for name in ("prior", "decoder"))


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    """A tiny random T5 v1.1 encoder written in the publisher's layout (config.json,
    model.safetensors, spiece.model: models/tiny_pretrained.write_tiny_t5) once for all workers;
    read-only.
    $T2I_TEST_T5 names it: the tiny "frozen_t5" config reads it."""
    from t2i_jax.models import tiny_pretrained
    d = str(_made_once(tmp_path_factory, "tiny_t5", lambda p: tiny_pretrained.write_tiny_t5(str(p))))
    os.environ["T2I_TEST_T5"] = d
    return d


@pytest.fixture(scope="session")
def tiny_webdataset_source(tmp_path_factory):
    """A user's data for the shared family tests: 48 captioned images in 3 webdataset shards
    (tests/user_data_fixtures.py), its brace pattern in $T2I_TEST_WEBDATASET."""
    from user_data_fixtures import records, write_webdataset
    made = {}

    def make(p):
        made["path"] = write_webdataset(p / "shards", records(48), shards=3)
        (p / "pattern.txt").write_text(made["path"])
    d = _made_once(tmp_path_factory, "tiny_webdataset_source", make)
    os.environ["T2I_TEST_WEBDATASET"] = (d / "pattern.txt").read_text()
    return os.environ["T2I_TEST_WEBDATASET"]


# The frozen models (or the data) a tiny family's config reads (through the variable its
# fixture sets).
FROZEN_OF = {"latent_diffusion": "tiny_autoencoder", "prior": "tiny_clip", "decoder": "tiny_clip",
             "frozen_t5": "tiny_t5", "webdataset": "tiny_webdataset_source"}


@pytest.fixture(scope="session")
def straight_runs(data_dir, tmp_path_factory, request):
    """{family or option: (state after 4 steps on 8 devices, workdir with checkpoints 2 and 4)},
    each family trained on first use, once for all workers: the two workers train different
    families at once instead of one waiting for all of them."""
    from runs import restore_step, run, tiny

    class Runs(dict):
        def __missing__(self, name):
            if name == "diffusion":
                self[name] = request.getfixturevalue("tiny_run")
                return self[name]
            if name in FROZEN_OF:
                request.getfixturevalue(FROZEN_OF[name])
            wd = _made_once(tmp_path_factory, f"straight_{name}",
                            lambda p: run(tiny(data_dir, name), p))
            self[name] = (restore_step(tiny(data_dir, name), wd, 4), wd)
            return self[name]
    return Runs()
