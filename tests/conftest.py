"""Test setup: 8 simulated CPU devices, so every multi-device path runs on one machine.

The flag must be set before jax is imported anywhere, which is why it lives here.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import tempfile  # noqa: E402

import jax  # noqa: E402  (after the flag)

# Many tests build the same small programs (a train step, a sampler) in separate calls; a
# persistent compilation cache lets every call after the first skip XLA's compile.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "t2i_jax_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

assert jax.device_count() == 8, (
    f"tests expect 8 simulated devices, got {jax.device_count()}: jax was imported before "
    "tests/conftest.py could set XLA_FLAGS")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The embedded data sets (digits, shapes), prepared once for all tests.

    One directory for all xdist workers (their basetemps share a parent): the preparation lock
    makes the first worker prepare and the others reuse it.
    """
    from t2i_jax.data import digits, shapes
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    d = str(root / "t2i_data")
    digits.builder(d)
    shapes.builder(d)
    return d


@pytest.fixture(scope="session")
def tiny_workdir(data_dir, tmp_path_factory):
    """A tiny digits model (tests/tiny_config.py) trained 40 steps, to sample from: its outputs
    are no longer the zero-initialised ones. Read-only for the tests that share it."""
    from t2i_jax.config_utils import load_config
    from t2i_jax.training import loop
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_config.py"))
    cfg.data.data_dir = data_dir
    cfg.train.num_steps = 40
    cfg.train.checkpoint_every = 40
    wd = tmp_path_factory.mktemp("tiny_trained")
    loop.train(cfg, str(wd), progress=False)
    return str(wd)


@pytest.fixture(scope="session")
def tiny_run(data_dir, tmp_path_factory):
    """(final state, workdir) of the tiny config trained 4 steps in one run on 8 devices, with
    checkpoints 2 and 4: the reference resumed and repaired runs must reproduce. Read-only: copy
    the workdir before changing it."""
    from runs import run, tiny
    wd = tmp_path_factory.mktemp("tiny_run")
    return run(tiny(data_dir), wd), wd


@pytest.fixture(scope="session")
def digits_evaluator(data_dir):
    """The digits evaluator classifier, trained briefly (300 steps) once for all tests."""
    from t2i_jax.config_utils import load_config
    from t2i_jax.evaluation import evaluator as ev_lib
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                                   "digits.py"))
    cfg.data.data_dir = data_dir
    return ev_lib.train_evaluator(cfg.data, steps=300)
