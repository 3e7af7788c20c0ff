"""Sampling images from a trained Denoiser: prompts in, images out (see generate.py)."""

from t2i_jax.sampling.generate import SampleOptions, make_generate_fn  # noqa: F401
