"""Test setup: 8 simulated CPU devices, so every multi-device path runs on one machine.

The flag must be set before jax is imported anywhere, which is why it lives here.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402  (after the flag)

assert jax.device_count() == 8, (
    f"tests expect 8 simulated devices, got {jax.device_count()}: jax was imported before "
    "tests/conftest.py could set XLA_FLAGS")
