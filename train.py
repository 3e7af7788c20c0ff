"""Train a text-to-image diffusion model (or resume one): the project's main job.

    python train.py --config configs/digits.py --workdir runs/digits
    python train.py --config configs/digits.py --workdir runs/digits \\
        --config.train.num_steps=2000 --config.train.checkpoint_every=500 --config.seed=1

Checkpoints go to WORKDIR/checkpoints (orbax), metrics to WORKDIR/metrics.jsonl and
WORKDIR/tensorboard, sample grids to WORKDIR/samples. Rerunning the same command resumes from
the newest checkpoint; SIGTERM / Ctrl-C saves one and exits. On a multi-host TPU/GPU cluster,
run the same command on every host with --multihost (jax detects TPU pods and SLURM), or with
--coordinator_address HOST:PORT --num_processes N --process_id I; on one machine,
`python -m t2i_jax.launch --num_processes 2 --devices_per_process 4 -- train.py ARGS` runs such
a job as N local processes (README, Multi-host). A mistake gets one line on stderr (exit 2
for a command line that cannot run: an unknown option or config key, a bad value, an unusable
workdir; 1 when the run fails); details of unexpected faults go to WORKDIR/t2i_errors.log, and
T2I_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from t2i_jax.errors import Boundary, UsageError  # noqa: E402  (imports no jax)

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digits.py")


def _config_path(argv: list) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return DEFAULT_CONFIG


def parse(argv: list):
    """(config, workdir, process group, progress) from the command line; UsageError if it is
    wrong."""
    from absl import flags
    from t2i_jax import distributed
    from t2i_jax.config_utils import config_from_flags
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and samples",
                        flag_values=fv)
    help_ = distributed.FLAG_HELP
    flags.DEFINE_bool("multihost", False, help_["multihost"], flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, help_["coordinator_address"], flag_values=fv)
    flags.DEFINE_integer("num_processes", None, help_["num_processes"], flag_values=fv)
    flags.DEFINE_integer("process_id", None, help_["process_id"], flag_values=fv)
    flags.DEFINE_float("initialization_timeout", distributed.DEFAULT_TIMEOUT,
                       help_["initialization_timeout"], flag_values=fv)
    flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)
    if any(a in ("-h", "--help", "--helpfull", "-help") for a in argv):
        print(__doc__ + "\nflags:\n  --config: experiment config file (default configs/digits.py); "
              "override fields with --config.train.batch_size=...\n" + fv.get_help())
        raise SystemExit(0)
    path = _config_path(argv)
    if not os.path.isfile(path):
        raise UsageError(f"no config file {path}; pass --config configs/NAME.py (configs/ has "
                         f"{', '.join(sorted(f for f in os.listdir(os.path.dirname(DEFAULT_CONFIG)) if f.endswith('.py') and f != 'base.py'))}).")
    config, rest = config_from_flags(fv, argv, path, "train.py")
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments {rest[1:]}; options look like --workdir=DIR.")
    if not fv["workdir"].value:
        raise UsageError("--workdir is required: the directory for checkpoints, metrics and "
                         "samples (e.g. --workdir runs/digits).")
    group = distributed.ProcessGroup.from_flags(
        fv["coordinator_address"].value, fv["num_processes"].value, fv["process_id"].value,
        fv["multihost"].value, fv["initialization_timeout"].value)
    return config, fv["workdir"].value, group, fv["progress"].value


def main(argv: list, boundary: Boundary) -> int:
    config, workdir, group, progress = parse(argv)
    # Refusals that need no jax, before the backends start and before anything is written (the
    # library checks the same again for callers of loop.train).
    from t2i_jax import files
    from t2i_jax.config_utils import check_train_config
    try:
        check_train_config(config)
        workdir = files.check_writable_dir(workdir, "--workdir")
    except ValueError as e:
        raise UsageError(str(e)) from None
    boundary.log_in(workdir)
    from t2i_jax.xla_flags import apply_tuned_flags
    apply_tuned_flags()
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from t2i_jax import distributed
    distributed.join(group)  # every process of a multi-host job, before any device is used
    # A process given another config (or workdir) would train something else, or deadlock.
    distributed.check_same("config or --workdir", {"config": config.to_dict(), "workdir": workdir})
    from t2i_jax.training.loop import train
    train(config, workdir, progress=progress)
    return 0


INTERRUPTED = ("interrupted before training began (Ctrl-C); the checkpoints on disk are as they "
               "were: rerun the same command to resume.")


def run(argv=None) -> int:
    """main() behind the error boundary: one line per mistake, the exit code returned (--help
    exits through SystemExit)."""
    boundary = Boundary("train.py", interrupted=INTERRUPTED)
    return boundary.run(main, sys.argv[1:] if argv is None else argv, boundary)


if __name__ == "__main__":
    boundary = Boundary("train.py", interrupted=INTERRUPTED)
    boundary.exit(main, sys.argv[1:], boundary)
