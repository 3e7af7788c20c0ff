"""Training: device-count invariance, FSDP, CFG
dropout, EMA and learning-rate closed forms, checkpoints as orbax sees them. Faults (damaged
checkpoints, SIGTERM, the NaN guard, bad input) are in test_faults.py."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t2i_jax import checkpoint as ckpt_lib
from t2i_jax.training import loop, state as state_lib
from t2i_jax.training.step import make_train_step
from t2i_jax.training.writers import read_metrics

from runs import assert_trees_close, assert_trees_equal, run, tiny  # noqa: E402


@pytest.fixture
def straight(tiny_run):
    """4 steps in one run on 8 devices (checkpoints 2 and 4): what resumed runs must reproduce."""
    return tiny_run


def test_one_and_eight_devices_give_the_same_losses(data_dir, straight, tmp_path):
    state8, wd8 = straight
    one = jax.devices()[:1]
    state1 = run(tiny(data_dir), tmp_path / "one", devices=one)
    np.testing.assert_allclose([r["loss"] for r in read_metrics(tmp_path / "one")],
                               [r["loss"] for r in read_metrics(wd8)], rtol=1e-5)
    assert_trees_close(state1.params, state8.params, atol=2e-5)
    # Resuming on another device count, exact resume and resume after kill -9 are tested for
    # every family in tests/test_families.py.


def test_fsdp_shards_parameters_and_trains_the_same(data_dir, straight, tmp_path):
    state8, wd8 = straight
    sharded = run(tiny(data_dir, train__fsdp=4), tmp_path)
    specs = [x.sharding.spec for x in jax.tree_util.tree_leaves(sharded.params)]
    assert any("fsdp" in s for s in specs)
    big = max(jax.tree_util.tree_leaves(sharded.params), key=lambda x: x.size)
    assert len({str(s.index) for s in big.addressable_shards}) == 4  # four distinct pieces
    np.testing.assert_allclose([r["loss"] for r in read_metrics(tmp_path)],
                               [r["loss"] for r in read_metrics(wd8)], rtol=1e-5)
    assert_trees_close(sharded.params, state8.params, atol=2e-5)


@pytest.mark.slow
def test_cfg_dropout_rate_matches_p_uncond(data_dir, tmp_path):
    p, steps, batch = 0.25, 120, 8
    run(tiny(data_dir, train__p_uncond=p, train__num_steps=steps, train__checkpoint_every=10**6), tmp_path)
    frac = np.mean([r["null_fraction"] for r in read_metrics(tmp_path)])
    se = np.sqrt(p * (1 - p) / (steps * batch))
    assert abs(frac - p) < 4 * se, (frac, se)


def _step_setup(data_dir, p_uncond):
    run_ = loop.Run.from_config(tiny(data_dir, train__p_uncond=p_uncond))
    exp = run_.family
    st = jax.jit(run_.create_state)(jax.random.key(0))
    # Give the zero-initialised output layers weights, so the output depends on the condition.
    st = st.replace(params=jax.tree_util.tree_map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), st.params))
    jitted = jax.jit(make_train_step(exp, run_.optim, run_.tx))
    hp = exp.hparams()
    step = lambda state, b: jitted(state, b, hp)  # noqa: E731: p_uncond is traced: one program
    from t2i_jax.conditioning.tokenizers import tokenize
    images = jax.random.uniform(jax.random.key(1), (4, 16, 16, 1), minval=-1, maxval=1)

    def batch(prompts):
        tok = tokenize(prompts, exp.max_length)
        return dict(image=images, tokens=jnp.asarray(tok.ids), mask=jnp.asarray(tok.mask),
                    label=jnp.zeros((4,), jnp.int32))
    return exp, st, step, batch


@pytest.mark.slow
def test_dropped_rows_get_the_null_that_sampling_uses(data_dir):
    exp, st, step, batch = _step_setup(data_dir, 1.0)
    a = step(st, batch(["0", "1", "2", "3"]))[1]["loss"]
    b = step(st, batch(["seven", "数字八", "nine", ""]))[1]["loss"]
    assert float(a) == float(b)  # every row replaced: the prompts cannot matter
    assert float(step(st, batch([""] * 4))[1]["loss"]) == float(a)  # the null IS the empty prompt
    exp0, st0, step0, batch0 = _step_setup(data_dir, 0.0)
    assert float(step0(st0, batch(["0", "1", "2", "3"]))[1]["loss"]) != float(
        step0(st0, batch(["seven", "数字八", "nine", "6"]))[1]["loss"])
    # Sampling guides with the same null: with cond = null, eps~ = eps(null) for every w.
    from t2i_jax.sampling.generate import SampleOptions, make_generate_fn
    params = st.params
    gen = make_generate_fn(exp, SampleOptions(num_steps=3))
    cond = exp.conditioning.of_prompts([""] * 2)
    ids = jnp.arange(2)
    x0 = gen(params, cond, jax.random.key(0), 0.0, ids)
    x5 = gen(params, cond, jax.random.key(0), 5.0, ids)
    np.testing.assert_allclose(x0, x5, atol=1e-5)
    assert not np.allclose(x0, gen(params, exp.conditioning.of_prompts(["3", "7"]), jax.random.key(0), 5.0, ids),
                           atol=1e-3)


def test_step_metrics_split_the_loss_by_quarter_of_t(data_dir):
    exp, st, step, batch = _step_setup(data_dir, 0.1)
    m = jax.device_get(step(st, batch(["0", "1", "2", "3"]))[1])
    qs = [m[f"loss_q{q}"] for q in range(4)]
    # The loss is the count-weighted mean of the quarters that have examples.
    key = jax.random.fold_in(st.key(), 0)
    t = np.asarray(jax.random.randint(jax.random.fold_in(key, 0), (4,), 0, exp.schedule.num_timesteps))
    counts = np.bincount(t * 4 // exp.schedule.num_timesteps, minlength=4)
    total = sum(c * q for c, q in zip(counts, qs) if c)
    np.testing.assert_allclose(total / 4, m["loss"], rtol=1e-5)
    assert all(np.isnan(q) == (c == 0) for c, q in zip(counts, qs))
    assert m["lr"] == pytest.approx(0.0)  # linear warm-up starts at 0


def test_learning_rate_and_ema_closed_forms():
    cfg = state_lib.OptimConfig(learning_rate=1e-3, warmup_steps=10, lr_schedule="cosine",
                                num_steps=110, end_lr_factor=0.1, ema_decay=0.99)
    lr = state_lib.learning_rate_fn(cfg)
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(60)) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + np.cos(np.pi * 0.5)), rel=1e-5)
    assert float(lr(110)) == pytest.approx(1e-4)
    # EMA warm-up: decay_t = min(decay, (1 + t) / (10 + t)); the EMA of a constant is the constant.
    np.testing.assert_allclose([float(state_lib.ema_decay(cfg, t)) for t in (0, 8, 1000)],
                               [0.1, 0.5, 0.99], rtol=1e-6)
    ema, target = jnp.zeros(3), jnp.array([1.0, -2.0, 3.0])
    expect = np.zeros(3)
    for t in range(30):
        d = float(state_lib.ema_decay(cfg, t))
        ema = state_lib.ema_update(ema, target, state_lib.ema_decay(cfg, t))
        expect = d * expect + (1 - d) * np.asarray(target)
    np.testing.assert_allclose(ema, expect, rtol=1e-6)
    with pytest.raises(ValueError, match="lr_schedule"):
        state_lib.OptimConfig(lr_schedule="linear")


@pytest.mark.slow
def test_end_to_end_per_embedded_data_set_and_orbax_alone_reads_it(data_dir, tmp_path):
    for name, size, channels in (("digits", 16, 1), ("shapes", 32, 3)):
        wd = tmp_path / name
        cfg = tiny(data_dir, train__num_steps=2, train__sample_every=2, train__samples_per_prompt=2)
        cfg.data.name, cfg.data.image_size, cfg.data.channels = name, size, channels
        cfg.model.unet.out_channels = channels
        cfg.model.text.max_length = 64
        state = run(cfg, wd)
        from PIL import Image
        from t2i_jax import data
        grid = np.asarray(Image.open(wd / "samples" / "step_0000002.png"))
        rows, scale = len(data.sample_prompts(cfg.data)), max(1, 64 // size)
        width = 2 * (size * scale + 2) + 2  # the images, after a margin labelling each row
        assert grid.shape[0] == rows * (size * scale + 2) + 2 and grid.shape[1] > width
        assert grid[:, -width:].std() > 10  # not blank
        # The README's few lines: orbax alone, no t2i_jax.
        mgr = ocp.CheckpointManager(str(wd / "checkpoints"))
        ckpt = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
        assert_trees_equal(ckpt.state["ema_params"], state.ema_params)
        assert ckpt.config["data"]["name"] == name and int(ckpt.state["step"]) == 2


@pytest.mark.slow
def test_another_models_workdir_is_refused(data_dir, tmp_path):
    run(tiny(data_dir, train__num_steps=2), tmp_path)
    cfg = tiny(data_dir)
    cfg.model.unet.channels = 24
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match=r"model\.unet\.channels: 16 -> 24"):
        run(cfg, tmp_path)
    assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).steps() == [2]  # untouched


def test_keep_checkpoints_keeps_the_newest_k_and_0_keeps_all(tmp_path):
    """train.keep_checkpoints = k: the newest k steps stay after every save (the final one
    among them); 0 keeps every step; a reader deletes nothing, whatever it is given."""
    import dataclasses

    @dataclasses.dataclass
    class S:
        params: dict
        step: int

    config = {"model": {"x": 1}}
    for keep, want in ((2, [6, 8]), (1, [8]), (0, [2, 4, 6, 8])):
        ck = ckpt_lib.Checkpointer(str(tmp_path / str(keep)), keep=keep)
        for step in (2, 4, 6, 8):
            ck.save(step, S({"w": np.full((3,), step, np.float32)}, step), None, config)
        assert ck.steps() == want, keep
        ck.close()
    reader = ckpt_lib.Checkpointer(str(tmp_path / "0"), keep=1, read_only=True)
    assert reader.steps() == [2, 4, 6, 8]
    reader.close()
    assert sorted(int(p.name) for p in (tmp_path / "0").iterdir() if p.name.isdigit()) == [2, 4, 6, 8]
