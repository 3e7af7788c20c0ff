"""Loading experiment configs: Python files whose get_config() returns a ConfigDict."""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def load_config(path: str) -> ml_collections.ConfigDict:
    """Returns get_config() of the config file at `path` (e.g. configs/peer_small.py)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path!r}; configs live in configs/, e.g. "
                                "configs/peer_small.py.")
    spec = importlib.util.spec_from_file_location(f"t2i_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config() function returning a ConfigDict.")
    return module.get_config()
