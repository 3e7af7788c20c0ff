"""Atomic file writes (a reader, or a rerun after a kill, never sees half a file) and exclusive
locks on a directory (two writers never share one).

The content goes to a temporary file in the same directory (named .tmp-*, never matched as a
result), which is then renamed over the target; os.replace is atomic on POSIX file systems.
A lock is an fcntl.flock on DIR/.lock, held for as long as the process keeps it open (the kernel
releases it when the process dies, even by kill -9); the file records the holder's pid and host
so that the refusal can name it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
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
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno and not e.filename:  # a failed write: name the file
            raise OSError(e.errno, e.strerror, path) from e
        raise


def check_writable_dir(path: str, flag: str) -> str:
    """ValueError naming `flag` if directory `path` is a file or could not be written (or, when
    missing, created); creates nothing. Returns the absolute path."""
    if not path:
        raise ValueError(f"{flag} is empty; pass a directory.")
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a directory; pass a directory (it is "
                         "created if missing).")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag} {path} cannot be created: {existing} is a file; pass another "
                         "directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created in {existing}"
        raise ValueError(f"{flag} {path} {what} (permission denied or a read-only file system); "
                         "pass a directory you can write to.")
    return path


def check_output_dir(path: str, flag: str) -> str:
    """The absolute path of an output directory; ValueError if it is empty, a file, or inside a
    training workdir's checkpoints/ (where pruning old steps would delete it). Creates nothing."""
    if not path:
        raise ValueError(f"{flag} is empty; pass a directory for the results.")
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file; pass a directory.")
    head = path
    while head != os.path.dirname(head):
        if os.path.basename(head) in ("checkpoints", "checkpoints.damaged") and _is_training_dir(head):
            raise ValueError(f"{flag} {path} is inside {head}, a training run's checkpoint "
                             "directory, where pruning old steps would delete it; pass a "
                             "directory outside it.")
        head = os.path.dirname(head)
    return path


def _is_training_dir(checkpoints: str) -> bool:
    """A workdir's checkpoints/: it holds step directories, or its parent the run's metrics."""
    parent = os.path.dirname(checkpoints)
    if os.path.exists(os.path.join(parent, "metrics.jsonl")) or os.path.exists(
            os.path.join(parent, ".lock")):
        return True
    try:
        return any(n.isdigit() for n in os.listdir(checkpoints))
    except OSError:
        return False


class LockedError(ValueError):
    """Another process holds the lock."""


class ExclusiveLock:
    """An exclusive lock on DIR/.lock for a block (`what` names the work in the refusal):

        with ExclusiveLock(workdir, "training", hint="wait for it, or pass another --workdir"):
            ...
    """

    def __init__(self, directory: str, what: str, hint: str, enabled: bool = True):
        self.directory, self.what, self.hint, self.enabled = directory, what, hint, enabled
        self.path = os.path.join(directory, ".lock")
        self.fd = None

    def __enter__(self):
        if not self.enabled:
            return self
        import fcntl
        self.made = [p for p in (self.directory, self.path) if not os.path.exists(p)]
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockedError(f"another process{holder} is {self.what} in {self.directory} "
                              f"(it holds {self.path}); {self.hint}.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, kind, value, tb):
        if self.fd is None:
            return False
        if kind is not None and not isinstance(value, KeyboardInterrupt):
            # a refusal inside the block leaves nothing behind that this lock made: its lock
            # file, and its directory if nothing else was written there
            for path in reversed(self.made):
                try:
                    os.remove(path) if path == self.path else os.rmdir(path)
                except OSError:
                    pass
        os.close(self.fd)  # releases the lock
        self.fd = None
        return False


def _read_holder(fd: int) -> str:
    try:
        pid, host = os.pread(fd, 200, 0).decode().split()[:2]
        return f" (pid {int(pid)} on {host})"
    except (OSError, ValueError):
        return ""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def write_jsonl(path: str, rows) -> None:
    """One JSON object a line; NaN or infinity refuse (ValueError): they are not JSON."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n"
                             for r in rows))


def read_json(path: str) -> Any:
    """The JSON file's value; ValueError naming the file when it is not valid JSON."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}).") from None


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
