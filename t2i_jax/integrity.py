"""A record of a finished checkpoint's files (size and CRC-32 each), checked before restoring.

Orbax reads whatever bytes it finds: a zarr chunk that lost its tail fails deep inside
tensorstore (with thousands of lines of background tracebacks), and a flipped bit in an
uncompressed chunk is read as a wrong number without any error. The record turns both into one
exact line ("state/d/ab12...: 1000 bytes, 17792000 were written") before orbax is called.

    write(step_dir)            # after orbax finished the step (process 0)
    problem = verify(step_dir)  # None if every recorded file is intact (or there is no record)

Steps saved before the record existed have none: they are restored without the check.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Optional

from t2i_jax import files

RECORD = "t2i_integrity.json"
_CHUNK = 1 << 22


class DamagedError(ValueError):
    pass


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: str) -> list:
    out = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != RECORD and not name.startswith(".tmp-"):
                out.append(rel)
    return sorted(out)


def write(step_dir: str) -> None:
    """Records every file under step_dir (relative path -> [size, crc32]), atomically."""
    record = {rel: [os.path.getsize(os.path.join(step_dir, rel)), _crc32(os.path.join(step_dir, rel))]
              for rel in _files(step_dir)}
    files.write_json(os.path.join(step_dir, RECORD), {"version": 1, "files": record})


def verify(step_dir: str) -> Optional[str]:
    """None if every recorded file exists with its size and CRC (or nothing is recorded); else
    the first problem, as a short phrase."""
    path = os.path.join(step_dir, RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its integrity record {RECORD} is unreadable ({type(e).__name__})"
    for rel, (size, crc) in sorted(record.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.exists(full):
            return f"{rel} is missing"
        have = os.path.getsize(full)
        if have != size:
            return f"{rel} has {have} bytes, {size} were written"
        if _crc32(full) != crc:
            return f"{rel} is damaged (its CRC-32 differs from the one recorded at save)"
    return None
