"""Configs: they load, build typed model configs, and peer_small has the reference's shape."""

import os

import jax
import jax.numpy as jnp
import pytest

from t2i_jax.config_utils import load_config
from t2i_jax.models.denoiser import Denoiser, Encoded, ModelConfig
from t2i_jax.models.unet import count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_PARAMS = 10_068_867  # diffusers' UNet2DConditionModel of this shape (../shared/peer/README.md)


def test_peer_small_has_the_reference_shape():
    config = load_config(os.path.join(ROOT, "configs", "peer_small.py"))
    cfg = ModelConfig.from_config(config.model)
    assert tuple(cfg.unet.channels * m for m in cfg.unet.channel_mult) == (64, 128, 128)
    assert cfg.unet.num_res_blocks == 2 and cfg.unet.attention_levels == (1, 2) and cfg.unet.mid_attention
    assert cfg.unet.num_heads == 8 and cfg.text.width == 128 and cfg.text.max_length == 16
    model = Denoiser(cfg)
    s = config.data.image_size
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1,), jnp.int32),
        Encoded(context=jnp.zeros((1, 16, 128)), context_mask=jnp.ones((1, 16), bool)),
        method=Denoiser.denoise))
    n = count_params(shapes)
    # Same blocks as the reference; FiLM (2x the time projection) and GEGLU widths differ slightly.
    assert abs(n / PEER_PARAMS - 1) < 0.06, n


def test_missing_or_bad_config_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config file at 'configs/nope.py'"):
        load_config("configs/nope.py")
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ValueError, match="no get_config"):
        load_config(str(bad))


def test_tuned_cpu_flags_apply_only_when_the_backend_is_the_cpu(monkeypatch):
    import importlib.util
    from t2i_jax import xla_flags
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert xla_flags.apply_tuned_flags(verbose=False) is None and "XLA_FLAGS" not in os.environ
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert xla_flags.backend_is_cpu()
    monkeypatch.delenv("JAX_PLATFORMS")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" else real(name, *a))
    assert not xla_flags.backend_is_cpu()  # a TPU plugin is installed: no CPU flags
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in xla_flags.ACCELERATOR_PLUGINS else real(name, *a))
    assert xla_flags.apply_tuned_flags(verbose=False) == " ".join(xla_flags.TUNED_CPU_FLAGS)
