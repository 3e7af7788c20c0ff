"""The networks: behaviour that must hold for any weights, on tiny configurations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from t2i_jax import conditioning
from t2i_jax.conditioning import tokenizers
from t2i_jax.models import classifier, denoiser, text
from t2i_jax.models.unet import UNetConfig

UNET = UNetConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                  num_heads=2, num_groups=8)
TEXT = text.TextConfig(max_length=12, width=32, num_layers=1, num_heads=2)
PROMPTS = ["a red circle", "数字七", "", "a small blue square above a green triangle"]


def _model(null="empty_prompt", **unet_overrides):
    cfg = denoiser.ModelConfig(unet=dataclasses.replace(UNET, **unet_overrides), text=TEXT, null=null)
    return denoiser.Denoiser(cfg)


def _inputs(batch=4, seed=0):
    x = jax.random.normal(jax.random.key(seed), (batch, 8, 8, 3))
    t = jnp.arange(batch, dtype=jnp.int32) * 97 % 1000
    with pytest.warns(UserWarning, match="truncated"):
        cond = conditioning.text_condition((PROMPTS * 4)[:batch], TEXT.max_length)
    return x, t, cond


def _init(model, x, t, cond):
    return jax.jit(model.init)(jax.random.key(1), x, t, cond)


@jax.jit
def _randomize_output(params):
    """Init leaves eps_hat at exactly 0 (zero-initialised output layers); perturb every weight
    matrix so that each path through the network, the text's included, reaches the output."""
    return jax.tree_util.tree_map(
        lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape) if a.ndim > 1 else a, params)


_APPLY = {}


def _apply(model):
    """One jitted apply per model configuration (jax.jit(model.apply) anew would recompile)."""
    if model.cfg not in _APPLY:
        _APPLY[model.cfg] = jax.jit(model.apply, static_argnames=("method",))
    return _APPLY[model.cfg]


@pytest.fixture(scope="module")
def setup():
    model = _model()
    x, t, cond = _inputs()
    params = _init(model, x, t, cond)
    return model, params, x, t, cond


@pytest.mark.slow
def test_eps_hat_is_exactly_zero_at_init(setup):
    model, params, x, t, cond = setup
    out = _apply(model)(params, x, t, cond)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert np.all(np.asarray(out) == 0.0)


def test_tokens_under_the_padding_mask_do_not_matter(setup):
    model, params, x, t, cond = setup
    params = _randomize_output(params)
    base = np.asarray(_apply(model)(params, x, t, cond))
    assert np.abs(base).max() > 1e-3
    junk = jax.random.randint(jax.random.key(3), cond.tokens.shape, 3, tokenizers.VOCAB_SIZE)
    changed = cond.replace(tokens=jnp.where(cond.mask, cond.tokens, junk))
    np.testing.assert_array_equal(np.asarray(_apply(model)(params, x, t, changed)), base)
    # ... while a token inside the mask does change it.
    inside = cond.replace(tokens=cond.tokens.at[:, 1].set(200))
    assert np.abs(np.asarray(_apply(model)(params, x, t, inside)) - base).max() > 1e-5


@pytest.mark.slow
def test_null_condition_modes(setup):
    model, params, x, t, _ = setup
    empty = conditioning.text_condition([""] * 4, TEXT.max_length)
    null = conditioning.null_condition(4, max_length=TEXT.max_length)
    # empty_prompt: the null IS the empty prompt.
    params = _randomize_output(params)
    np.testing.assert_array_equal(np.asarray(_apply(model)(params, x, t, null)),
                                  np.asarray(_apply(model)(params, x, t, empty)))
    # learned: the null has its own features, whatever tokens it carries; a real prompt differs.
    model = _model("learned")
    params = _randomize_output(_init(model, x, t, null))
    out_null = np.asarray(_apply(model)(params, x, t, null))
    other_tokens = null.replace(tokens=conditioning.text_condition(["zzz"] * 4, TEXT.max_length).tokens)
    np.testing.assert_array_equal(np.asarray(_apply(model)(params, x, t, other_tokens)), out_null)
    assert np.abs(np.asarray(_apply(model)(params, x, t, empty)) - out_null).max() > 1e-5


def test_condition_dropout_rate_and_values():
    n = 4000
    cond = conditioning.class_condition(jnp.arange(n) % 7)
    null = conditioning.null_condition(1, num_classes=7)
    dropped = conditioning.drop_condition(cond, null, jax.random.key(0), 0.1)
    is_null = np.asarray(dropped.is_null)
    assert abs(is_null.mean() - 0.1) < 4 * np.sqrt(0.1 * 0.9 / n)
    np.testing.assert_array_equal(np.asarray(dropped.label)[is_null], 7)
    np.testing.assert_array_equal(np.asarray(dropped.label)[~is_null], np.asarray(cond.label)[~is_null])
    none = conditioning.drop_condition(cond, null, jax.random.key(0), 0.0)
    assert not np.asarray(none.is_null).any()
    text_cond = conditioning.text_condition(["a", "b"], 8)
    all_null = conditioning.drop_condition(text_cond, conditioning.null_condition(1, max_length=8),
                                           jax.random.key(1), 1.0)
    np.testing.assert_array_equal(np.asarray(all_null.tokens),
                                  np.asarray(conditioning.null_condition(2, max_length=8).tokens))


def test_bfloat16_forward_agrees_with_float32(setup):
    model, params, x, t, cond = setup
    params = _randomize_output(params)
    full = np.asarray(_apply(model)(params, x, t, cond))
    low_model = _model(dtype="bfloat16")
    low = np.asarray(_apply(low_model)(params, x, t, cond))
    assert low.dtype == np.float32
    rel = np.linalg.norm(low - full) / np.linalg.norm(full)
    assert rel < 0.03, rel  # bf16 keeps 8 bits (0.4% per op); the net compounds a few of them


def test_jit_traces_once_across_new_values(setup):
    model, params, x, t, cond = setup
    traces = []

    @jax.jit
    def f(params, x, t, cond):
        traces.append(1)
        return _apply(model)(params, x, t, cond)

    for seed in range(3):
        x2, t2, _ = _inputs(seed=seed)
        f(params, x2, (t2 + seed) % 1000, cond)
    f(_randomize_output(params), x, t, cond)
    assert len(traces) == 1


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_params_and_outputs(setup):
    model, params_one, _, _, _ = setup  # initialised on one device from key(1); batch size 4
    x, t, cond = _inputs(batch=8)
    # Models are written for GSPMD-propagated (Auto) mesh axes, as the training step uses them.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        xs, ts, cs = shard(x), shard(t), jax.tree_util.tree_map(shard, cond)
        params_eight = jax.jit(model.init)(jax.random.key(1), xs, ts, cs)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                               params_one, params_eight)
        p = _randomize_output(params_one)
        out_eight = _apply(model)(p, xs, ts, cs)
    assert len(out_eight.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out_eight), np.asarray(_apply(model)(p, x, t, cond)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_gradients_are_finite_and_reach_every_parameter(setup):
    model, params, x, t, cond = setup
    noise = jax.random.normal(jax.random.key(5), x.shape)

    def loss(p):
        return jnp.mean((_apply(model)(p, x, t, cond) - noise) ** 2)

    grad_fn = jax.jit(jax.grad(loss))
    grads = grad_fn(params)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
    # At init only the output conv has a gradient (everything behind it meets its zero kernel),
    # then the zero-initialised residual outputs; after a few optimiser steps, every parameter.
    opt = optax.adam(1e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return params, state, jax.grad(loss)(params)

    for _ in range(3):
        params, state, grads = step(params, state, grads)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
    dead = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(grads)
            if not np.any(np.asarray(g) != 0)]
    assert not dead, dead


@pytest.mark.slow
@pytest.mark.default_xla  # two different programs compared at float32 rounding (conftest.py)
def test_remat_gives_the_same_output_and_gradients(setup):
    model, params, x, t, cond = setup
    params = _randomize_output(params)
    remat_model = _model(remat=True)
    f = lambda m: jax.jit(jax.grad(lambda p: jnp.sum(m.apply(p, x, t, cond) ** 2)))(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                                   rtol=1e-4, atol=1e-6),
                           f(model), f(remat_model))


def test_attention_implementations_agree(setup):
    model, params, x, t, cond = setup
    params = _randomize_output(params)
    other = _model(attention_impl="dot_product")
    np.testing.assert_allclose(np.asarray(_apply(other)(params, x, t, cond)),
                               np.asarray(_apply(model)(params, x, t, cond)), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_class_conditional_unet_uses_the_label_and_its_null():
    cfg = denoiser.ModelConfig(unet=dataclasses.replace(UNET, num_classes=10), text=None)
    model = denoiser.Denoiser(cfg)
    x, t, _ = _inputs()
    cond = conditioning.class_condition([1, 2, 3, 4])
    params = _randomize_output(jax.jit(model.init)(jax.random.key(0), x, t, cond))
    out = np.asarray(_apply(model)(params, x, t, cond))
    other = np.asarray(_apply(model)(params, x, t, conditioning.class_condition([5, 2, 3, 4])))
    assert np.abs(out[0] - other[0]).max() > 1e-6 and np.array_equal(out[1:], other[1:])
    null = conditioning.null_condition(4, num_classes=10)
    assert np.abs(np.asarray(_apply(model)(params, x, t, null)) - out).max() > 1e-6


@pytest.mark.slow
def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="do not split into 3 heads"):
        UNetConfig(channels=16, num_heads=3, num_groups=8)
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(channel_mult=(1, 2), attention_levels=(2,))
    with pytest.raises(ValueError, match="unknown attention_impl"):
        UNetConfig(attention_impl="flash")
    with pytest.raises(ValueError, match="unknown null condition"):
        denoiser.ModelConfig(null="zeros")
    with pytest.raises(ValueError, match="not both"):
        denoiser.ModelConfig(unet=UNetConfig(num_classes=10))
    model = _model()
    x, t, cond = _inputs()
    with pytest.raises(ValueError, match="divisible by 2"):
        model.init(jax.random.key(0), x[:, :7, :7], t, cond)


# --- tokenizer -------------------------------------------------------------------------------

def test_tokenizer_round_trips_utf8_including_chinese():
    prompts = ["a handwritten digit seven", "数字七", "Ünïcödé ✓ emoji 🙂", ""]
    tokens = tokenizers.tokenize(prompts, 64)
    assert tokens.ids.dtype == np.int32 and not tokens.truncated.any()
    assert tokenizers.detokenize(tokens.ids) == prompts
    assert tokens.ids[3, :3].tolist() == [tokenizers.BOS, tokenizers.EOS, tokenizers.PAD]
    np.testing.assert_array_equal(tokens.mask, tokens.ids != tokenizers.PAD)
    assert (tokens.ids[1, 0] == tokenizers.BOS
            and tokens.ids[1, 1 + len("数字七".encode())] == tokenizers.EOS)


def test_truncation_is_reported_and_cuts_on_a_character():
    with pytest.warns(UserWarning, match="1 prompt.*truncated"):
        tokens = tokenizers.tokenize(["数字七八九", "ok"], 9)  # room for 7 bytes: two 3-byte characters
    assert tokens.truncated.tolist() == [True, False]
    assert tokenizers.detokenize(tokens.ids) == ["数字", "ok"]
    with pytest.raises(TypeError, match="list of prompts"):
        tokenizers.tokenize("a prompt", 8)
    with pytest.raises(ValueError, match="room for BOS and EOS"):
        tokenizers.tokenize(["a"], 1)


# --- classifier and similarity ---------------------------------------------------------------

@pytest.mark.slow
def test_noisy_classifier_learns_a_separable_task():
    cfg = classifier.ClassifierConfig(encoder=UNetConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                                         attention_levels=(), mid_attention=False,
                                                         num_groups=8), num_classes=2)
    model = classifier.NoisyClassifier(cfg)
    labels = jnp.arange(32) % 2
    x = (labels[:, None, None, None] * 2 - 1) * 0.5 + 0.5 * jax.random.normal(jax.random.key(0), (32, 8, 8, 3))
    t = jnp.full((32,), 10, jnp.int32)
    params = model.init(jax.random.key(1), x, t)
    opt = optax.adam(3e-3)
    state = opt.init(params)
    loss_fn = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_apply(model)(p, x, t), labels))

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    first = float(loss_fn(params))
    for _ in range(25):
        params, state, loss = step(params, state)
    log_p = classifier.log_prob_fn(model, params)(x, t, labels)
    assert float(loss) < 0.2 * first
    assert float(jnp.mean(jnp.exp(log_p))) > 0.9
    grad = jax.grad(lambda xx: jnp.sum(classifier.log_prob_fn(model, params)(xx, t, labels)))(x)
    assert np.all(np.isfinite(np.asarray(grad))) and np.abs(np.asarray(grad)).max() > 0


@pytest.mark.slow
def test_two_tower_similarity_is_the_cosine_of_its_embeddings():
    cfg = classifier.SimilarityConfig(
        image=UNetConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(),
                         mid_attention=False, num_groups=8), text=TEXT, embed_dim=24)
    model = classifier.TwoTowerSimilarity(cfg)
    x, t, cond = _inputs()
    params = model.init(jax.random.key(0), x, t, cond.tokens, cond.mask)
    sim = np.asarray(_apply(model)(params, x, t, cond.tokens, cond.mask))
    zi = np.asarray(_apply(model)(params, x, t, method=model.embed_image), np.float64)
    zt = np.asarray(_apply(model)(params, cond.tokens, cond.mask, method=model.embed_text), np.float64)
    np.testing.assert_allclose(np.linalg.norm(zi, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(sim, np.sum(zi * zt, axis=1), rtol=1e-5, atol=1e-6)
    logits = np.asarray(_apply(model)(params, x, t, cond.tokens, cond.mask, method=model.contrastive_logits))
    np.testing.assert_allclose(np.diag(logits) / 10.0, sim, rtol=1e-5, atol=1e-6)
    guided = classifier.similarity_fn(model, params)(x, t, (cond.tokens, cond.mask))
    np.testing.assert_allclose(np.asarray(guided), sim, rtol=1e-5, atol=1e-6)
