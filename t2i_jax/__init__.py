"""t2i_jax: text-to-image diffusion models in JAX/Flax (DDPM/DDIM family with guidance)."""

__version__ = "0.1.0"
