"""TFDS data sets prepared as array_record files (no TensorFlow) once per data_dir: the embedded
ones (digits, shapes) with their builders, your own images through user_data.py. The command
that prepares a config's data ahead of training is prepare.py.

TensorFlow is not needed because
  - the builders are `tfds.core.GeneratorBasedBuilder`s with `file_format="array_record"`
    (TFDS's own beam-free writer: examples are serialised by TFDS's numpy example serializer and
    written with array_record's Python writer);
  - images are handed to TFDS as PIL images, which its Image feature encodes to PNG with PIL
    (a numpy array would go through `tf.image.encode_png`);
  - the DatasetInfo is built directly (`tfds.core.DatasetInfo(builder=self, ...)`), not from
    package metadata files.
  - the builders set `code_path = None`: TFDS's default looks the class's file up through the
    `importlib_resources` backport, which TFDS only installs on Python < 3.9 (that path is only
    used for download checksums, which these builders have none of).
Reading: `tfds.data_source(name, data_dir=...)` or `builder.as_data_source()` (array_record
random access, decoding with PIL).

Half-written data: TFDS writes a version into `DIR/<name>/incomplete.XXXX_<version>/` and renames
it to `DIR/<name>/<version>/` only when every split and `dataset_info.json` are written; a
version directory without `dataset_info.json` is not "prepared" (`builder.is_prepared()`). A
process killed mid-way leaves only an `incomplete.*` directory, which the next preparation
removes. Concurrent preparations (several processes or hosts sharing a data_dir on one file
system) are serialised by an fcntl lock file `DIR/<name>.lock`; the loser of the race finds the
data prepared and reuses it.

The command (USAGE) prepares the data set of a config ahead of training.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import shutil
import sys
from typing import Callable, Optional, Type

EMBEDDED_DIR_ENV = "TFDS_DATA_DIR"


def default_data_dir(data_dir: Optional[str] = None) -> str:
    """data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (TFDS's own default)."""
    if data_dir:
        return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    env = os.environ.get(EMBEDDED_DIR_ENV)
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive advisory lock on `path` (created if missing) for the duration of the block."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def quiet_tfds_logs():
    # TFDS logs through absl at INFO/WARNING ("OpenCV is not installed..." when decoding with PIL).
    logging.getLogger("absl").setLevel(logging.ERROR)


def prepared_builder(builder_cls: Type, data_dir: Optional[str] = None,
                     make: Optional[Callable] = None):
    """Returns an instance of `builder_cls` whose files exist in data_dir, preparing them first
    if needed (once: idempotent and safe against concurrent or interrupted preparations).
    make(builder): writes the files, called under the lock where they are not prepared (default:
    the builder's own quiet download_and_prepare; user_data passes its staged preparation)."""
    import tensorflow_datasets as tfds

    quiet_tfds_logs()
    data_dir = default_data_dir(data_dir)
    builder = builder_cls(data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder
    with file_lock(os.path.join(data_dir, f"{builder.name}.lock")):
        builder = builder_cls(data_dir=data_dir, file_format="array_record")
        if builder.is_prepared():  # another process prepared it while we waited
            return builder
        root = os.path.join(data_dir, builder.name)
        if os.path.isdir(root):  # leftovers of an interrupted preparation (we hold the lock)
            for entry in os.listdir(root):
                path = os.path.join(root, entry)
                if entry.startswith("incomplete.") or (
                        entry == str(builder.version) and not builder.is_prepared()):
                    shutil.rmtree(path, ignore_errors=True)
        if make is not None:
            make(builder)
            return builder_cls(data_dir=data_dir, file_format="array_record")
        print(f"[t2i_jax] preparing the data set {builder.name} in {data_dir} (once)", flush=True)
        from tensorflow_datasets.core.utils import tqdm_utils
        shown = getattr(tqdm_utils, "_active", True)
        tfds.display_progress_bar(False)  # a few seconds of work: no progress bars in the logs
        try:
            # TFDS prints "Downloading and preparing dataset Unknown size ..." to stdout; these
            # builders download nothing, and the line above already says what happens.
            with contextlib.redirect_stdout(io.StringIO()):
                builder.download_and_prepare(
                    file_format="array_record",
                    download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        finally:
            tfds.display_progress_bar(shown)
    return builder_cls(data_dir=data_dir, file_format="array_record")
