"""XLA options the entry points apply on CPU only, and only where the user has not set XLA_FLAGS.

XLA's CPU backend hands convolutions to YNNPACK by default, whose weight-gradient convolutions
are slow; excluding individual convolutions from YNN fusion speeds up UNet training on CPU
(measured in bench/train_step.py). Nothing here touches model code, so GPU/TPU runs are unchanged.
Call `apply_tuned_flags()` before jax creates its backends (first use of a device).
"""

from __future__ import annotations

import importlib.util
import os
import sys

TUNED_CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
# jax's accelerator plugins: where one is installed, the backend may be a GPU or TPU.
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                       "jax_rocm7_plugin", "libtpu", "jax_plugins.xla_cuda12",
                       "jax_plugins.xla_cuda13")


def backend_is_cpu() -> bool:
    """Whether jax will run on the CPU, decided before it starts: JAX_PLATFORMS names only cpu,
    or no accelerator plugin is installed."""
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms == ["cpu"]
    for name in ACCELERATOR_PLUGINS:
        try:
            if importlib.util.find_spec(name) is not None:
                return False
        except (ImportError, ValueError):  # a parent package is missing
            continue
    return True


def apply_tuned_flags(verbose: bool = True) -> str | None:
    """Sets XLA_FLAGS to the tuned CPU options unless it is already set or the backend may be an
    accelerator (GPU and TPU runs get no CPU flags); returns what was set."""
    if "XLA_FLAGS" in os.environ or not backend_is_cpu():
        return None
    flags = " ".join(TUNED_CPU_FLAGS)
    os.environ["XLA_FLAGS"] = flags
    if verbose:
        print(f"[t2i_jax] XLA_FLAGS was unset; using {flags} (set XLA_FLAGS yourself to override).",
              file=sys.stderr)
    return flags
