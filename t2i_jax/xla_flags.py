"""XLA options the entry points apply on CPU, and only where the user has not set XLA_FLAGS.

XLA's CPU backend hands convolutions to YNNPACK by default, whose weight-gradient convolutions
are slow; excluding individual convolutions from YNN fusion speeds up UNet training on CPU
(measured in bench/train_step.py). Nothing here touches model code, so GPU/TPU runs are unchanged.
Call `apply_tuned_flags()` before jax creates its backends (first use of a device).
"""

from __future__ import annotations

import os
import sys

TUNED_CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)


def apply_tuned_flags(verbose: bool = True) -> str | None:
    """Sets XLA_FLAGS to the tuned CPU options unless it is already set; returns what was set."""
    if "XLA_FLAGS" in os.environ:
        return None
    flags = " ".join(TUNED_CPU_FLAGS)
    os.environ["XLA_FLAGS"] = flags
    if verbose:
        print(f"[t2i_jax] XLA_FLAGS was unset; using {flags} (set XLA_FLAGS yourself to override).",
              file=sys.stderr)
    return flags
