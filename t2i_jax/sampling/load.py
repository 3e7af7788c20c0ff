"""A trained model from a training workdir: its stored config and a checkpoint's parameters.

    trained = load_trained(workdir)                  # newest checkpoint, EMA parameters
    trained = load_trained(workdir, step=2000, params="raw")

The model is rebuilt from the config stored WITH the checkpoint (not from a config file that may
have changed since), and the parameters are placed replicated on every device of `mesh`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import ml_collections

from t2i_jax.training import mesh as mesh_lib
from t2i_jax.training.checkpoint import Checkpointer
from t2i_jax.training.loop import Experiment

PARAM_KINDS = ("ema", "raw")


class NoCheckpointError(FileNotFoundError):
    pass


@dataclasses.dataclass
class Trained:
    experiment: Experiment
    params: Any          # the chosen parameters (EMA or raw), replicated over the mesh
    step: int            # the checkpoint's training step
    kind: str            # "ema" or "raw"
    workdir: str

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.experiment.config


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def load_trained(workdir: str, *, step: Optional[int] = None, params: str = "ema",
                 mesh=None) -> Trained:
    """Restores a checkpoint of `workdir` (the newest restorable one unless `step`)."""
    if params not in PARAM_KINDS:
        raise ValueError(f"params must be one of {PARAM_KINDS}, got {params!r}.")
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise NoCheckpointError(
            f"no checkpoint in {workdir}: {directory} does not exist. Train one first, e.g. "
            f"`python train.py --config configs/digits.py --workdir {workdir}`, or pass the "
            "--workdir of a training run.")
    ckpt = Checkpointer(directory, keep=0, read_only=True)  # a reader changes nothing
    try:
        steps = ckpt.steps()
        if not steps:
            raise NoCheckpointError(
                f"no checkpoint in {directory} (no finished step; a run killed before its first "
                "save leaves none). Train longer or pass another --workdir.")
        if step is not None and step not in steps:
            raise NoCheckpointError(f"no checkpoint of step {step} in {directory}; it has {steps}.")
        mesh = mesh if mesh is not None else mesh_lib.make_mesh(1)
        rep = mesh_lib.replicated(mesh)
        built = {}

        def abstract_for(stored: dict):
            # The model comes from the config stored with the checkpoint being read (a damaged
            # newest one falls back to the previous step's config, too).
            exp = built["exp"] = Experiment.from_config(ml_collections.ConfigDict(stored))
            shapes = jax.eval_shape(exp.create_state, jax.random.key(0))
            return jax.tree_util.tree_map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), shapes)

        restored = ckpt.restore(abstract_for, step=step)
    finally:
        ckpt.close()
    state = restored.state
    chosen = state.ema_params if params == "ema" else state.params
    return Trained(built["exp"], chosen, int(restored.step), params, os.path.abspath(workdir))
