"""Frozen models a family reads but never trains (latent diffusion's autoencoder; later a CLIP,
a T5): the EMA parameters of a training workdir's newest checkpoint, as host arrays.

    frozen = load_frozen("runs/shapes64_ae", "autoencoder", flag="config.model.autoencoder")
    frozen.family, frozen.params, frozen.step, frozen.statistics, frozen.identity()

The parameters never enter the TrainState: the family hands them to the loss through
`hparams()` (placed on the devices once) and to sampling through `sampling_inputs()`. So they
are not trained, not averaged, not in the optimizer state and not in the family's checkpoints;
the checkpoints record `identity()` instead (config["frozen"], checked like the model config), so
a resume or a sampler meeting another autoencoder (retrained since, or another workdir) refuses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from t2i_jax.checkpoint import Checkpointer, IncompatibleCheckpointError


@dataclasses.dataclass
class Frozen:
    family: Any              # the frozen model's family, rebuilt from its stored config
    params: Any              # its EMA parameters, numpy
    step: int                # its checkpoint step
    statistics: Optional[dict]  # what its final checkpoint stores (an autoencoder's scale factor)
    workdir: str

    def identity(self) -> dict:
        if not hasattr(self, "_sha256"):
            self._sha256 = params_sha256(self.params)
        return dict(workdir=self.workdir, step=self.step, sha256=self._sha256)

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.family.config


REDIRECT_FLAG = "--frozen"  # sample.py's RECORDED=NEW_DIR: a frozen model that moved


def recorded(config, name: str) -> dict:
    """What a stored model recorded of its frozen model `name` (workdir, step, sha256), or {}."""
    return dict((config.get("frozen", None) or {}).get(name, None) or {})


def resolve(config, name: str, flag: str) -> tuple:
    """(workdir, step) of a frozen model: the absolute workdir a checkpoint recorded
    (config.frozen[name]) when it still exists (a sampler run from another directory), else the
    config's `flag` (config.model.<name>); the recorded step (None for a model being trained:
    the newest). A recorded workdir that is gone, with no config path standing in, is refused
    with the redirect flag that recovers it."""
    path = config.model.get(flag.rsplit(".", 1)[-1], None)
    rec = recorded(config, name)
    if rec.get("workdir") and os.path.isdir(rec["workdir"]):
        return rec["workdir"], rec.get("step")
    if rec.get("workdir") and not (isinstance(path, str) and path and os.path.isdir(
            os.path.expanduser(path))):
        raise ValueError(moved_message(name, rec))
    return path, rec.get("step")


def moved_message(name: str, rec: dict) -> str:
    return (f"this model was trained with the {name} in {rec['workdir']} (checkpoint "
            f"{rec.get('step')}), which is not there any more. If it moved, pass "
            f"{REDIRECT_FLAG} {rec['workdir']}=NEW_DIR to sample.py (its content is checked "
            f"against the recorded hash); otherwise restore it there.")


def redirect(stored: dict, mapping: dict) -> dict:
    """A stored config (a dict) with the recorded workdirs of its frozen models moved as
    `mapping` {recorded workdir: new workdir} says; the content hashes stay, so the model at
    the new place is still checked to be the one recorded."""
    if not mapping or not stored.get("frozen"):
        return stored
    norm = {os.path.abspath(os.path.expanduser(k)): os.path.abspath(os.path.expanduser(v))
            for k, v in mapping.items()}
    frozen = {}
    for name, rec in stored["frozen"].items():
        rec = dict(rec or {})
        where = rec.get("workdir")
        if where and os.path.abspath(where) in norm:
            rec["workdir"] = norm[os.path.abspath(where)]
        frozen[name] = rec
    return dict(stored, frozen=frozen)


def check_recorded(config, name: str, frozen: "Frozen", consequence: str) -> None:
    """Refuses a frozen model other than the one a stored model recorded (config.frozen[name]):
    `consequence` says what would go wrong."""
    rec = recorded(config, name)
    if not rec:
        return
    now = frozen.identity()
    if (rec.get("sha256"), rec.get("step")) != (now["sha256"], now["step"]):
        gone = (f" (its checkpoint {rec.get('step')} is no longer in "
                f"{os.path.join(frozen.workdir, 'checkpoints')}: keep_checkpoints pruned it)"
                if rec.get("step") != now["step"] else "")
        raise ValueError(
            f"the {name} in {frozen.workdir} (checkpoint {now['step']}, sha256 "
            f"{now['sha256'][:12]}) is not the one this model was trained with (checkpoint "
            f"{rec.get('step')}, sha256 {str(rec.get('sha256'))[:12]}, in "
            f"{rec.get('workdir')}){gone}: {consequence}. Restore that {name} (or point "
            f"{REDIRECT_FLAG} RECORDED=DIR at a copy of it), or retrain this model on this one.")


def check_same_data(config, frozen: "Frozen", flag: str, role: str, fix: str) -> None:
    """Refuses a frozen model trained on another data set, image size or channel count."""
    other = frozen.config
    diffs = [f"data.{k}: {other.data[k]!r} ({role}) vs {config.data[k]!r} (this model)"
             for k in ("name", "image_size", "channels") if other.data[k] != config.data[k]]
    if diffs:
        raise ValueError(f"{flag}={frozen.workdir} was trained on other images: "
                         + "; ".join(diffs) + ". " + fix)


def params_sha256(params) -> str:
    """A hash of every leaf's path, dtype, shape and bytes."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load_frozen(workdir, family_name: str, *, flag: str, step: Optional[int] = None) -> Frozen:
    """The EMA parameters of a `family_name` workdir: of checkpoint `step` where it still exists
    (the one a stored model recorded: it is used even after the workdir trained on), else of the
    newest restorable one; ValueError naming `flag` for a missing workdir, no checkpoint or
    another family."""
    if not workdir or not isinstance(workdir, str):
        raise ValueError(f"{flag} must name the workdir of a trained {family_name} model, got "
                         f"{workdir!r}.")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise ValueError(f"{flag}={workdir} has no checkpoints ({directory} does not exist): "
                         f"train the {family_name} first, or point {flag} at its workdir.")
    ckpt = Checkpointer(directory, keep=0, read_only=True)
    try:
        if not ckpt.steps():
            raise ValueError(f"{flag}={workdir} has no finished checkpoint yet: train the "
                             f"{family_name} first.")
        family, restored = restore_params(
            ckpt, "ema_params", jax.sharding.SingleDeviceSharding(jax.local_devices()[0]),
            step=step if step in ckpt.steps() else None, expect=family_name,
            label=f"{flag}={workdir}")
    finally:
        ckpt.close()
    params = jax.tree_util.tree_map(np.asarray, restored.state["ema_params"])
    return Frozen(family, params, int(restored.step), restored.statistics, workdir)


def restore_params(ckpt: Checkpointer, field: str, sharding, *, step: Optional[int] = None,
                   expect: Optional[str] = None, label: str = "",
                   frozen_paths: Optional[dict] = None):
    """(family, Restored) of the newest restorable step of an open reader (or `step`), reading
    the TrainState field `field` alone ("ema_params" or "params"), placed with `sharding`. The
    family is rebuilt from the config stored WITH the step being read (a damaged newest step
    falls back to the previous step's config, too). A config of another family than `expect`,
    or one the code refuses to build (a latent model whose autoencoder is missing or changed),
    is IncompatibleCheckpointError, never taken for damage of the step; `label` starts its
    message. frozen_paths {recorded workdir: new}: frozen models that moved (redirect)."""
    from t2i_jax import families
    built = {}

    def abstract_for(stored: dict):
        config = ml_collections.ConfigDict(redirect(stored, frozen_paths or {}))
        name = families.name_of(config)
        if expect is not None and name != expect:
            raise IncompatibleCheckpointError(
                f"{label} holds a {name} model, not a{'n' if expect[0] in 'aeiou' else ''} "
                f"{expect}.")
        try:
            family = built["family"] = families.build(config)
        except IncompatibleCheckpointError:
            raise
        except ValueError as e:
            raise IncompatibleCheckpointError(f"{label}: {e}" if label else str(e)) from e
        shapes = jax.eval_shape(family.init_params, jax.random.key(0))
        return {field: jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes)}

    restored = ckpt.restore(abstract_for, step=step, only=(field,))
    return built["family"], restored
