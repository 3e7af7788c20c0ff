"""Preparing TFDS data sets as array_record files (no TensorFlow) once per data_dir: the embedded
ones (digits, shapes) with their builders, your own images through user_data.py.

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
USAGE = """Prepare the data set of a config once, ahead of training (training prepares on first use
too); for imagefolder and webdataset sources, decode with a local pool of N processes, and split
the work between P processes or hosts sharing data_dir (t2i_jax/data/user_data.py):

    python -m t2i_jax.data.prepare --config configs/X.py [--config.data.path=DIR] [--workers N]
        [--process_index p --process_count P] [--noprogress]
"""


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


def _quiet_tfds_logs():
    # TFDS logs through absl at INFO/WARNING ("OpenCV is not installed..." when decoding with PIL).
    logging.getLogger("absl").setLevel(logging.ERROR)


def prepared_builder(builder_cls: Type, data_dir: Optional[str] = None,
                     make: Optional[Callable] = None):
    """Returns an instance of `builder_cls` whose files exist in data_dir, preparing them first
    if needed (once: idempotent and safe against concurrent or interrupted preparations).
    make(builder): writes the files, called under the lock where they are not prepared (default:
    the builder's own quiet download_and_prepare; user_data passes its staged preparation)."""
    import tensorflow_datasets as tfds

    _quiet_tfds_logs()
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


# ---------------------------------------------------------------------------------------------
# The command


def _unknown_override(argv: list, config) -> str:
    """The message for the first --config.X override whose key the config lacks."""
    for a in argv:
        if not a.startswith("--config."):
            continue
        node, seen = config, "config"
        for part in a[len("--config."):].split("=", 1)[0].split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                return (f"unknown config key {seen}.{part} (in {a}); {seen} has: "
                        f"{', '.join(sorted(keys)) or 'no fields'}.")
            node, seen = node[part], f"{seen}.{part}"
    return "an override names a key the config does not have."


def parse(argv: list):
    """(config, workers, process_index, process_count, progress) from the command line;
    UsageError (one line) where it is wrong."""
    from absl import flags
    from ml_collections import config_flags
    from t2i_jax.config_utils import load_config
    from t2i_jax.errors import UsageError
    fv = flags.FlagValues()
    flags.DEFINE_integer("workers", 1, "local processes decoding images (imagefolder, webdataset)",
                         flag_values=fv)
    flags.DEFINE_integer("process_index", 0, "this process's share of the work (of "
                         "--process_count); process 0 writes the data set", flag_values=fv)
    flags.DEFINE_integer("process_count", 1, "processes (or hosts, on a shared file system) that "
                         "split the work", flag_values=fv)
    flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)
    if any(a in ("-h", "--help", "--helpfull", "-help") for a in argv):
        print(USAGE + "\nflags:\n  --config: experiment config file; override fields with "
              "--config.data.path=...\n" + fv.get_help())
        raise SystemExit(0)
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv and argv.index("--config") + 1 < len(argv):
        path = argv[argv.index("--config") + 1]
    if not path:
        raise UsageError("--config is required: the experiment config whose data to prepare "
                         "(e.g. --config configs/sd_finetune.py --config.data.path=DIR).")
    if not os.path.isfile(path):
        raise UsageError(f"no config file {path}; pass --config configs/NAME.py.")
    try:
        holder = config_flags.DEFINE_config_file(
            "config", path, "experiment config file", flag_values=fv, lock_config=True,
            sys_argv=["prepare"] + list(argv))
        rest = fv(["prepare"] + list(argv))
        config = holder.value
    except flags.Error as e:
        raise UsageError(f"{str(e).splitlines()[0]} (see --help).") from None
    except (AttributeError, KeyError):
        raise UsageError(_unknown_override(argv, load_config(path))) from None
    except (IOError, SyntaxError, ImportError) as e:
        raise UsageError(f"cannot load the config file {path}: {str(e).splitlines()[-1]}") from None
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments {rest[1:]}; options look like --workers=4.")
    if fv["workers"].value < 1:
        raise UsageError(f"--workers must be >= 1, got {fv['workers'].value}.")
    return (config, fv["workers"].value, fv["process_index"].value, fv["process_count"].value,
            fv["progress"].value)


def main(argv: list) -> int:
    config, workers, process_index, process_count, progress = parse(argv)
    _quiet_tfds_logs()
    from t2i_jax.data import catalog, pipeline, user_data
    s = pipeline.settings(config.data)
    if s.spec.user:
        p = user_data.prepare(s, workers=workers, process_index=process_index,
                              process_count=process_count, progress=progress)
        if p is not None:
            kept = p.summary["splits"] if p.summary else {}
            print(f"[t2i_jax] {p.name} is ready in {p.data_dir} ({kept.get('train', '?')} train + "
                  f"{kept.get('test', '?')} test records)", flush=True)
        return 0
    sizes = {split: len(catalog.open_split(s.spec, split, s.data_dir, s.image_size))
             for split in s.spec.splits}
    print(f"[t2i_jax] {s.name} is ready in {default_data_dir(s.data_dir)} ("
          + ", ".join(f"{n} {k}" for k, n in sizes.items()) + " records)", flush=True)
    return 0


def run(argv=None) -> int:
    """main() behind the error boundary: one line per mistake, the exit code returned."""
    from t2i_jax.errors import Boundary
    return Boundary("t2i_jax.data.prepare").run(main, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(run())
