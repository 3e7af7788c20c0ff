"""Loading experiment configs: Python files whose get_config() returns a ConfigDict."""

from __future__ import annotations

import importlib.util
import math
import os

import ml_collections

from t2i_jax.errors import UsageError


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


def non_finite_keys(config, prefix: str = "config") -> list:
    """Dotted names of the float fields of `config` that are NaN or infinite."""
    out = []
    for key, value in config.items():
        name = f"{prefix}.{key}"
        if isinstance(value, ml_collections.ConfigDict) or isinstance(value, dict):
            out += non_finite_keys(value, name)
        elif isinstance(value, float) and not math.isfinite(value):
            out.append(f"{name}={value}")
        elif isinstance(value, (tuple, list)):
            out += [f"{name}={value}" for v in value if isinstance(v, float) and not math.isfinite(v)][:1]
    return out


# Integer fields of config.train and the least value each may take (keep_checkpoints: 0 keeps all).
_TRAIN_MINIMA = dict(batch_size=1, num_steps=1, checkpoint_every=1, log_every=1, sample_every=0,
                     keep_checkpoints=0, samples_per_prompt=1, fsdp=1, warmup_steps=0)


def tree_differences(a, b, prefix: str = "") -> list:
    """'key: a -> b' for every leaf where two JSON trees (nested dicts) differ, keys dotted from
    `prefix`."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b))
                for d in tree_differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))]
    return [] if a == b else [f"{prefix or 'value'}: {a!r} -> {b!r}"]


def check_train_config(config) -> None:
    """Refuses, before anything runs, what a training run would trip over later (a NaN learning
    rate, checkpoint_every=0 dividing by zero after compiling): ValueError naming the field."""
    bad = non_finite_keys(config)
    if bad:
        raise UsageError(f"{bad[0]} is not a finite number; set it to one (e.g. "
                         f"--{bad[0].split('=')[0]}=...).")
    train = config.get("train", {})
    for key, least in _TRAIN_MINIMA.items():
        if key not in train:
            continue
        value = train[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            what = " (0 keeps every checkpoint)" if key == "keep_checkpoints" else (
                " (0: no grids)" if key == "sample_every" else "")
            raise UsageError(f"config.train.{key} must be an integer >= {least}{what}, got "
                             f"{value!r}; set --config.train.{key}=...")


def unknown_override(argv: list, config, path: str = "") -> str:
    """The message for the first --config.X override in argv whose key `config` lacks (path:
    the config file, named in the message)."""
    for a in argv:
        if not a.startswith("--config."):
            continue
        node, seen = config, "config"
        for part in a[len("--config."):].split("=", 1)[0].split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                return (f"unknown config key {seen}.{part} (in {a}); {seen} has: "
                        f"{', '.join(sorted(keys)) or 'no fields'}"
                        + (f" (see {path})." if path else "."))
            node, seen = node[part], f"{seen}.{part}"
    return "an override names a key the config does not have."


def config_from_flags(fv, argv: list, path: str, prog: str) -> tuple:
    """(config, the remaining argv) of a command line whose --config=PATH (and --config.x=...
    overrides) absl's FlagValues `fv` reads with ml_collections' config_flags; UsageError in one
    line for an unparsable flag, an override naming no key, or a config file that cannot load."""
    from absl import flags
    from ml_collections import config_flags
    try:
        # config_flags reads the overrides from sys_argv as soon as the flag is defined.
        holder = config_flags.DEFINE_config_file(
            "config", path, "experiment config file", flag_values=fv, lock_config=True,
            sys_argv=[prog] + list(argv))
        rest = fv([prog] + list(argv))
        return holder.value, rest
    except flags.Error as e:
        raise UsageError(f"{str(e).splitlines()[0]} (see --help).") from None
    except (AttributeError, KeyError):
        try:
            config = load_config(path)
        except Exception as e:  # noqa: BLE001: the config file itself is broken
            raise UsageError(f"cannot load the config file {path}: {type(e).__name__}: {e}") \
                from None
        raise UsageError(unknown_override(argv, config, path)) from None
    except (IOError, SyntaxError, ImportError) as e:
        raise UsageError(f"cannot load the config file {path}: {str(e).splitlines()[-1]}") from None

