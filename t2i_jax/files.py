"""Atomic file writes: a reader (or a rerun after a kill) never sees half a file.

The content goes to a temporary file in the same directory (named .tmp-*, never matched as a
result), which is then renamed over the target; os.replace is atomic on POSIX file systems.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator, Mapping

import numpy as np


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", **kwargs) -> Iterator[Any]:
    """Yields a file object; `path` appears, complete, only if the block finishes without error."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results get the usual mode
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str, rows) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def flatten_tree(tree: Mapping, prefix: str = "") -> dict:
    """{"a": {"b": x}} -> {"a/b": x} (leaves as they are)."""
    flat = {}
    for key, value in tree.items():
        if not isinstance(key, str) or "/" in key or not key:
            raise ValueError(f"names must be non-empty strings without '/', got {key!r}")
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_tree_npz(path: str, tree: Mapping) -> None:
    """Writes a nested dict of arrays as an uncompressed .npz with "/"-joined keys
    ("params/Mixed_5b/branch1x1/kernel"), atomically."""
    flat = {k: np.asarray(v) for k, v in flatten_tree(tree).items()}
    with atomic_open(path, "wb") as f:
        np.savez(f, **flat)


def load_tree_npz(path: str) -> dict:
    """Reads a .npz written by save_tree_npz back into the nested dict of NumPy arrays."""
    tree: dict = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            node = tree
            *parents, leaf = key.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = archive[key]
    return tree
