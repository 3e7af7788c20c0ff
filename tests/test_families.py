"""What every family must do, tested once and parametrised over the families (not one copy
each): resume bit-exactly (data order included), resume on another device count, save and stop
on SIGTERM, and stop on a non-finite step before any checkpoint holds it, even though the loop
reads the metrics only at log steps, and resume bit-exactly after `kill -9` of train.py. Plus the
parts of each family's loss that have a closed form."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax import checkpoint as ckpt_lib, families
from t2i_jax.families.contrastive import info_nce
from t2i_jax.training import loop
from t2i_jax.training.writers import read_metrics

from runs import (ROOT, TESTS, assert_trees_close, assert_trees_equal,  # noqa: E402
                  restore_step as _restore, run, tiny)

FAMILIES = ("diffusion", "noisy_classifier", "contrastive", "super_resolution", "autoencoder",
            "latent_diffusion", "prior", "decoder")
# Options of a family that change what its loop carries (a frozen text encoder in the step's
# inputs; a learned variance's L_hybrid with GLIDE's random masks): the shared tests hold for
# them too.
# A Stable Diffusion folder fine-tuned in full (bf16 compute, remat, the VAE and CLIP frozen in
# the step) and with LoRA (the factors alone in the state, the folder's UNet a frozen input).
# "webdataset": the tiny diffusion model reading a user's webdataset shards, so that the data
# iterator's exact resume (kill -9 included) is shown for a user source too.
# "dit": the diffusion family on the DiT backbone (its blocks scanned) in place of the UNet,
# trained with flow matching (diffusion.process="flow").
SHARED = FAMILIES + ("frozen_t5", "learned_sigma_inpaint", "sd_finetune", "sd_lora", "webdataset",
                     "dit")


def _from_step_2(wd4, tmp_path, name):
    """A copy of the straight workdir with checkpoint 4 removed: a run stopped after step 2."""
    wd = tmp_path / name
    shutil.copytree(wd4, wd)
    shutil.rmtree(wd / "checkpoints" / "4")
    return wd


timeless = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731


@pytest.mark.parametrize("name", SHARED)
def test_every_family_resumes_exactly_and_on_another_device_count(data_dir, straight_runs,
                                                                 tmp_path, name):
    state4, wd4 = straight_runs[name]
    wd = _from_step_2(wd4, tmp_path, "eight")
    resumed = run(tiny(data_dir, name), wd)
    for part in ("params", "ema_params", "opt_state"):
        assert_trees_equal(getattr(state4, part), getattr(resumed, part))
    assert timeless(read_metrics(wd)) == timeless(read_metrics(wd4))
    assert [r["step"] for r in read_metrics(wd)] == [1, 2, 3, 4]
    # The 8-device checkpoint resumes on 1 device (arrays laid out for the new mesh).
    one = run(tiny(data_dir, name), _from_step_2(wd4, tmp_path, "one"), devices=jax.devices()[:1])
    assert_trees_close(one.params, state4.params, atol=2e-5)


@pytest.mark.parametrize("name", SHARED)
def test_every_family_resumes_exactly_after_kill_9(data_dir, straight_runs, tmp_path, name):
    """train.py killed with SIGKILL once checkpoint 2 exists (mid-run, maybe mid-save): the rerun
    resumes from the newest complete checkpoint and ends bit-identical to the straight run."""
    state4, _ = straight_runs[name]
    config = tmp_path / "config.py"
    config.write_text(f"import sys\nsys.path.insert(0, {TESTS!r})\nimport tiny_families\n\n\n"
                      f"def get_config():\n    return tiny_families.get_config({name!r})\n")
    wd = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={config}",
           f"--workdir={wd}", f"--config.data.data_dir={data_dir}",
           "--config.train.num_steps=100000", "--progress=false"]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
    log = tmp_path / "train.log"  # a file, not a pipe nobody reads: a chatty child never blocks
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not (wd / "checkpoints" / "2").is_dir():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint after 240 s: " + log.read_text()[-3000:]
            time.sleep(0.01)
    finally:  # killed however the wait ends: a failed wait leaves no 100000-step run behind
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = ckpt_lib.Checkpointer(str(wd / "checkpoints")).latest_step()
    assert saved >= 2 and saved % 2 == 0
    total = max(4, saved + 2)  # the constant learning rate does not depend on num_steps
    resumed = run(tiny(data_dir, name, train__num_steps=total), wd)
    reference = state4 if total == 4 else \
        run(tiny(data_dir, name, train__num_steps=total), tmp_path / "straight")
    assert int(resumed.step) == total
    for part in ("params", "ema_params", "opt_state"):
        assert_trees_equal(getattr(reference, part), getattr(resumed, part))


@pytest.mark.parametrize("name", SHARED)
def test_every_family_saves_on_sigterm_and_stops_before_saving_a_non_finite_step(
        data_dir, straight_runs, tmp_path, monkeypatch, name):
    _, wd4 = straight_runs[name]
    # SIGTERM once step 3 is logged: the run saves the step it reached and returns it.
    wd = tmp_path / "term"
    fired = threading.Event()

    def send():
        deadline = time.time() + 120
        while time.time() < deadline and not fired.is_set():
            try:
                logged = [r["step"] for r in read_metrics(wd)]
            except (OSError, ValueError):  # not written yet, or a row half written
                logged = []
            if any(s >= 3 for s in logged):
                fired.set()
                os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)

    threading.Thread(target=send, daemon=True).start()
    stopped = run(tiny(data_dir, name, train__num_steps=200), wd)
    assert fired.is_set()
    s = int(stopped.step)
    assert 3 <= s < 200 and ckpt_lib.Checkpointer(str(wd / "checkpoints")).latest_step() == s
    assert_trees_equal(_restore(tiny(data_dir, name), wd, s).params, stopped.params)

    # A NaN image in the third batch: metrics are read only every 100 steps, yet the guard stops
    # the run at the save of step 4, names step 3, and checkpoint 4 is never written.
    from t2i_jax import data as data_lib
    make = data_lib.make_train_iterator

    def poisoned(*a, **kw):
        inner = make(*a, **kw)

        class It:
            def __next__(self):
                batch = next(inner)
                if inner.step == 3:  # the batch of step 3 (1-based)
                    batch = dict(batch, image=np.full_like(batch["image"], np.nan))
                return batch

            def __getattr__(self, k):
                return getattr(inner, k)
        return It()

    monkeypatch.setattr(data_lib, "make_train_iterator", poisoned)
    wd = _from_step_2(wd4, tmp_path, "nan")
    with pytest.raises(loop.NonFiniteLossError, match=r"diverged at step 3 \(loss nan.*checkpoint \(2\) is intact"):
        run(tiny(data_dir, name, train__num_steps=6, train__log_every=100), wd)
    assert ckpt_lib.Checkpointer(str(wd / "checkpoints")).steps() == [2]


def test_info_nce_is_the_clip_loss_and_shares_the_target_over_equal_captions():
    logits = jax.random.normal(jax.random.key(0), (5, 5)) * 3
    eye = jnp.eye(5)
    want = 0.5 * (-jnp.diag(jax.nn.log_softmax(logits, 1)) - jnp.diag(jax.nn.log_softmax(logits, 0)))
    np.testing.assert_allclose(info_nce(logits, eye), want, rtol=1e-6)  # CLIP's loss, per example
    same = eye.at[0, 1].set(1).at[1, 0].set(1)  # examples 0 and 1 have one caption
    t = np.asarray(same / same.sum(1, keepdims=True))
    i2t = -(t * np.asarray(jax.nn.log_softmax(logits, 1))).sum(1)
    t2i = -(t.T * np.asarray(jax.nn.log_softmax(logits, 0))).sum(0)
    np.testing.assert_allclose(info_nce(logits, same), 0.5 * (i2t + t2i), rtol=1e-6)


def test_the_config_picks_the_family_and_unknown_ones_are_refused(data_dir, tiny_autoencoder,
                                                                 tiny_clip):
    for name in FAMILIES:
        assert families.build(tiny(data_dir, name)).name == name
    assert families.build(tiny(data_dir, "uncond")).conditioning.kind == "none"
    cfg = tiny(data_dir)
    cfg.family = "gan"
    with pytest.raises(ValueError, match="unknown family 'gan'.*contrastive.*diffusion"):
        families.build(cfg)
