"""`python -m t2i_jax.data.prepare --config ...`: the data set of a config prepared once, ahead of
training (training prepares on first use too). The preparation itself is builders.py (the
embedded sets) and user_data.py (imagefolder and webdataset); this module is the command, and
keeps the names older code imports from it.
"""

from __future__ import annotations

import os
import sys

from t2i_jax.data.builders import (EMBEDDED_DIR_ENV, quiet_tfds_logs,  # noqa: F401 (kept)
                                   default_data_dir, file_lock, prepared_builder)

USAGE = """Prepare the data set of a config once, ahead of training (training prepares on first use
too); for imagefolder and webdataset sources, decode with a local pool of N processes, and split
the work between P processes or hosts sharing data_dir (t2i_jax/data/user_data.py):

    python -m t2i_jax.data.prepare --config configs/X.py [--config.data.path=DIR] [--workers N]
        [--process_index p --process_count P] [--noprogress]
"""


# ---------------------------------------------------------------------------------------------
# The command


def parse(argv: list):
    """(config, workers, process_index, process_count, progress) from the command line;
    UsageError (one line) where it is wrong."""
    from absl import flags
    from t2i_jax.config_utils import config_from_flags
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
    config, rest = config_from_flags(fv, argv, path, "prepare")
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments {rest[1:]}; options look like --workers=4.")
    if fv["workers"].value < 1:
        raise UsageError(f"--workers must be >= 1, got {fv['workers'].value}.")
    return (config, fv["workers"].value, fv["process_index"].value, fv["process_count"].value,
            fv["progress"].value)


def main(argv: list) -> int:
    config, workers, process_index, process_count, progress = parse(argv)
    quiet_tfds_logs()
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
