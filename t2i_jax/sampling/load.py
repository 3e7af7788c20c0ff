"""A trained model from a training workdir (its family, stored config and parameters), or the
pretrained models of a diffusers pipeline folder (model_index.json: families/stable_diffusion.py).

    trained = load_trained(workdir)                  # newest checkpoint, EMA parameters
    trained = load_trained(workdir, step=2000, params="raw")

The family is rebuilt from the config stored WITH the checkpoint (not from a config file that
may have changed since). Only the chosen parameters are read from disk (never the optimizer
state), placed replicated on every device of `mesh`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import ml_collections

from t2i_jax import sharding as mesh_lib
from t2i_jax.checkpoint import Checkpointer
from t2i_jax.errors import UsageError
from t2i_jax.families.base import Family
from t2i_jax.families.frozen import restore_params

PARAM_KINDS = ("ema", "raw")


class NoCheckpointError(FileNotFoundError):
    """No checkpoint where the command line points: it cannot run (exit code 2)."""
    exit_code = 2


@dataclasses.dataclass
class Trained:
    family: Family
    params: Any          # the chosen parameters (EMA or raw), replicated over the mesh
    step: int            # the checkpoint's training step
    kind: str            # "ema" or "raw"
    workdir: str

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.family.config


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def load_trained(workdir: str, *, step: Optional[int] = None, params: str = "ema",
                 mesh=None, frozen_paths: Optional[dict] = None, merge: bool = True,
                 lora: Optional[str] = None, lora_scale: Optional[float] = None) -> Trained:
    """Restores a checkpoint of `workdir` (the newest restorable one unless `step`);
    merge: the parameters sampling runs (`family.sampling_params`: LoRA's factors merged into
    its base), else the checkpoint's as stored; lora: a LoRA file merged into a diffusers
    folder's UNet (its alpha / rank times lora_scale), recorded in the job's identity;
    frozen_paths {recorded workdir: new one}: its frozen models that moved (sample.py
    --frozen), checked against their recorded content hashes."""
    if params not in PARAM_KINDS:
        raise ValueError(f"params must be one of {PARAM_KINDS}, got {params!r}.")
    from t2i_jax.models.pretrained.pipeline import is_pipeline_folder
    if is_pipeline_folder(workdir):  # a diffusers pipeline folder: its pretrained models
        from t2i_jax.families.stable_diffusion import StableDiffusion
        if step is not None:
            raise UsageError(f"--step {step}: {workdir} is a diffusers pipeline folder, which has "
                             "no training steps; leave --step out.")
        family = StableDiffusion.from_folder(workdir, mesh=mesh)
        params = family.folder.unet[1]
        if lora:
            params = family.with_lora_file(lora, 1.0 if lora_scale is None else lora_scale)
        return Trained(family, params, 0, "pretrained", family.folder.directory)
    if lora:
        raise UsageError(f"--lora merges a LoRA file into a diffusers folder's UNet, and {workdir} "
                         "is a training workdir (a LoRA workdir's own factors are merged "
                         "already): pass the folder as --workdir.")
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory) and all(os.path.isdir(os.path.join(workdir, sub))
                                             for sub in ("unet", "vae", "text_encoder")):
        raise NoCheckpointError(
            f"{workdir} has no model_index.json: it is a diffusers pipeline folder without its "
            "index (unet/, vae/, text_encoder/ are there); copy model_index.json from the "
            "publisher's files, then pass the folder again.")
    if not os.path.isdir(directory) and os.path.isfile(os.path.join(workdir, "config.json")):
        raise NoCheckpointError(
            f"{workdir} holds a pretrained model in its publisher's layout (config.json), not a "
            "training workdir: a model's config reads it (config.model.text_encoder.path, for "
            "a T5 or CLIP text encoder); pass the --workdir of a training run.")
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
        field = "ema_params" if params == "ema" else "params"
        family, restored = restore_params(ckpt, field, mesh_lib.replicated(mesh), step=step,
                                          frozen_paths=frozen_paths)
    finally:
        ckpt.close()
    stored = restored.state[field]
    return Trained(family, family.sampling_params(stored) if merge else stored,
                   int(restored.step), params, os.path.abspath(workdir))


def require_generator(trained: Trained) -> Trained:
    """The trained model itself, or ValueError if its family draws no images (a guide)."""
    if not trained.family.generates:
        hint = trained.family.not_generator_hint(trained.workdir)
        raise UsageError(f"{trained.workdir} holds a {trained.family.name} model, which does not "
                         "generate images: pass the --workdir of a diffusion model." + hint)
    return trained
