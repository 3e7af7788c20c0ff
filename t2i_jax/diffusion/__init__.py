"""The math of diffusion models as pure JAX functions: no networks live here.

Modules:
  schedules  beta schedules -> Schedule (a pytree of float32 arrays computed in float64)
  forward    q_sample, q_posterior, conversions between eps, x0 and v
  losses     prediction targets and loss weightings (uniform, min-SNR-gamma)
  guidance   classifier-free guidance, classifier/similarity gradient guidance, thresholding
  noise      per-sample random numbers (fold_in by global sample index)
  samplers   DDPM, DDIM, DPM-Solver++(2M) step functions and one lax.scan driver
  analytic   exact eps for Gaussian-mixture data (to test samplers against exact scores)
"""

from t2i_jax.diffusion import analytic, forward, guidance, losses, noise, samplers, schedules
from t2i_jax.diffusion.schedules import Schedule, make_schedule

__all__ = [
    "analytic", "forward", "guidance", "losses", "noise", "samplers", "schedules",
    "Schedule", "make_schedule",
]
