"""Helpers for tests that train the tiny digits model (tests/tiny_config.py): configs with
overrides, in-process runs, and comparisons of parameter trees."""

import os

import jax
import numpy as np

from t2i_jax.config_utils import load_config
from t2i_jax.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
TINY = os.path.join(TESTS, "tiny_config.py")
TINY_FAMILIES = os.path.join(ROOT, "tests", "tiny_families.py")


def tiny(data_dir, family=None, **overrides):
    """The tiny config (of `family`: tests/tiny_families.py); overrides as section__name=value
    (train__num_steps=8)."""
    if family is None:
        cfg = load_config(TINY)
    else:
        import importlib.util
        spec = importlib.util.spec_from_file_location("tiny_families", TINY_FAMILIES)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cfg = module.get_config(family)
    cfg.data.data_dir = data_dir
    for key, value in overrides.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def run(cfg, workdir, devices=None):
    return loop.train(cfg, str(workdir), devices=devices, progress=False)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def assert_trees_equal(a, b):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def assert_trees_close(a, b, atol):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=atol)


def restore_step(cfg, wd, step):
    """The TrainState of checkpoint `step` of workdir `wd` (a read-only restore)."""
    from t2i_jax import checkpoint as ckpt_lib
    r = loop.Run.from_config(cfg)
    ck = ckpt_lib.Checkpointer(str(wd / "checkpoints"), read_only=True)
    try:
        return ck.restore(jax.eval_shape(r.create_state, jax.random.key(0)), step=step).state
    finally:
        ck.close()


def assert_refused(args, out, capfd, want):
    """sample.py with `args` (and --outdir out) exits non-zero, its stderr matches the regex
    `want`, and `out` was never created: a refusal before anything is written."""
    import re
    import sample as sample_cli
    capfd.readouterr()
    try:
        code = sample_cli.run(args + ["--outdir", str(out), "--no_progress"])
    except SystemExit as e:  # argparse's refusals
        code = e.code
    assert code != 0
    err = capfd.readouterr().err.replace("\n", " ")
    assert re.search(want, err), err
    assert not out.exists()
