"""Where progress goes: metrics as JSON lines (DIR/metrics.jsonl) and TensorBoard (DIR/tensorboard).

Only process 0 writes. On resume, lines for steps after the restored checkpoint (written by the
run that died) are dropped first, so the file never holds a step twice. Files are opened at the
first write, so a rerun that has nothing to train leaves no empty TensorBoard event file.
A failed write (a full disk) raises OSError naming the file.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np


class MetricWriter:
    def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True):
        self.enabled, self.tensorboard = enabled, tensorboard
        self.workdir, self.resume_step = workdir, resume_step
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = self._tb = None
        if enabled:
            _truncate_after(self.path, resume_step)

    def _open(self):
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
            if self.tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"),
                                         purge_step=self.resume_step + 1)

    def scalars(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self._open()
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else None
            if self._tb is not None and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        try:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.path) from e

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.enabled:
            self._open()
            if self._tb is not None:
                self._tb.add_image(name, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
                if self._tb is not None:
                    self._tb.close()
            except OSError:
                pass  # closing after a failed write must not hide that error
            self._file = self._tb = None


def _truncate_after(path: str, step: int) -> None:
    """Drops the rows after `step` (and a torn last line); rewrites the file only if any go."""
    if not os.path.exists(path):
        return
    kept, dropped = [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
                    continue
            except (ValueError, KeyError):
                pass  # a torn last line of a killed run
            dropped = True
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict]:
    """The rows of DIR/metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
