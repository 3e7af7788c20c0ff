"""Train a text-to-image diffusion model (or resume one): the project's main job.

    python train.py --config configs/digits.py --workdir runs/digits
    python train.py --config configs/digits.py --workdir runs/digits \\
        --config.train.num_steps=2000 --config.train.checkpoint_every=500 --config.seed=1

Checkpoints go to WORKDIR/checkpoints (orbax), metrics to WORKDIR/metrics.jsonl and
WORKDIR/tensorboard, sample grids to WORKDIR/samples. Rerunning the same command resumes from
the newest checkpoint; SIGTERM / Ctrl-C saves one and exits. On a multi-host TPU/GPU cluster,
run the same command on every host with --multihost.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from t2i_jax.xla_flags import apply_tuned_flags  # noqa: E402  (before jax starts its backends)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digits.py"),
    "experiment config file; override fields with --config.train.batch_size=...", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and samples", required=True)
flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first (one process per host)")
flags.DEFINE_bool("progress", True, "show a progress bar")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options look like --workdir=DIR.")
    apply_tuned_flags()
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    import jax
    if FLAGS.multihost:
        jax.distributed.initialize()
    from t2i_jax.training.checkpoint import IncompatibleCheckpointError
    from t2i_jax.training.loop import NonFiniteLossError, train
    try:
        train(_CONFIG.value, FLAGS.workdir, progress=FLAGS.progress)
    except (ValueError, FileNotFoundError, IncompatibleCheckpointError, NonFiniteLossError) as e:
        if os.environ.get("T2I_DEBUG"):
            raise
        sys.exit(f"train.py: error: {e}\n(set T2I_DEBUG=1 for the traceback)")


if __name__ == "__main__":
    try:
        app.run(main)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a key that does not exist
        if os.environ.get("T2I_DEBUG") or "Did you mean" not in str(e) and "--config" not in str(e):
            raise
        msg = str(e.args[0] if e.args else e).strip("'\"").replace("\\n", " ").replace("\n", " ")
        sys.exit(f"train.py: error: unknown config key in an override: {msg}")
