"""Checkpoints with orbax-checkpoint: DIR/checkpoints/<step>/{state, data, config}.

  state   the TrainState (params, ema_params, opt_state, step, rng key data) as orbax arrays;
  data    the input iterator's state (JSON), so a resumed run sees exactly the batches it would
          have seen;
  config  the whole experiment config (JSON): a resume under a different model is refused;
  statistics  (the final step of a family that computes them, JSON) what the family derived from
          its trained parameters, e.g. an autoencoder's scale factor (families/autoencoder.py).

Orbax writes a step into a temporary directory and renames it when complete, so a job killed
mid-save leaves no step that looks finished. After the rename, `t2i_integrity.json` in the step
records every file's size and CRC-32 (integrity.py): a restore checks them first, so a file
truncated, zeroed or flipped later is found before orbax reads a byte of it.

A step that fails to restore (damaged, or its config unreadable) is reported in one line and the
previous one is used instead. When training then saves again, every step that failed is moved
to DIR/checkpoints.damaged/<step> (never deleted) and reported, so the retrained step replaces it
and nothing reads the damaged one again. A save that fails (a full disk) removes its partial
directory and raises CheckpointSaveError, naming the step, the cause and how to resume.
Restoring lays the arrays out for the current mesh, so a run can resume on another number of
devices.

Reading a checkpoint needs orbax alone:

    import orbax.checkpoint as ocp
    mgr = ocp.CheckpointManager("DIR/checkpoints")
    ckpt = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
    ema_params = ckpt.state["ema_params"]
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import LatestN

from t2i_jax.config_utils import tree_differences
from t2i_jax.errors import os_advice, os_errno, short_cause
from t2i_jax import distributed, integrity

# Parts of the config that fix the parameters' meaning: a resume must match them exactly.
MODEL_KEYS = ("family", "model", "diffusion", "data.image_size", "data.channels", "sr.low_res_size",
              "frozen")
DEFAULTS = {"family": "diffusion"}  # configs written before the key existed


class IncompatibleCheckpointError(ValueError):
    pass


class CheckpointDamagedError(RuntimeError):
    """No candidate step could be restored."""


class CheckpointReadError(RuntimeError):
    """A restore failed for a reason other than damage (memory, permissions): no fallback."""


class CheckpointSaveError(OSError):
    """A save failed (its partial directory is removed); str() is the whole message."""

    def __init__(self, message: str, code: Optional[int]):
        super().__init__(message)
        self.errno = code


class Restored(NamedTuple):
    step: int
    state: Any
    data_state: Optional[dict]
    config: dict
    statistics: Optional[dict] = None


def _normalise(x):
    return json.loads(json.dumps(x, default=list))  # tuples -> lists, as the stored JSON has them


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part, None) if isinstance(d, dict) else None
    return d


# Model options added after checkpoints existed, at the value those checkpoints meant: a
# section holding one at this value compares equal to one written before the option existed.
LATER_OPTIONS = {"model": {"inpaint": False, "backbone": "unet"},
                 "diffusion": {"learn_sigma": False, "lambda_vlb": 0.001, "process": "vp",
                               "flow_time": "logit_normal", "flow_logit_mean": 0.0,
                               "flow_logit_std": 1.0, "shift": 1.0},
                 "model.dit": {"conv_stem": 0, "conv_head": 0}}


def _section(config: dict, key: str):
    """config[key], without the options of LATER_OPTIONS at their old meaning, and (model) without
    a text_encoder section of kind "trained" (the jointly trained encoder, as before it existed)
    or the options of the backbone it does not use (model.backbone: "unet" or "dit")."""
    section = _get(config, key) if isinstance(config, dict) else None
    if not isinstance(section, dict):
        return section
    defaults = dict(LATER_OPTIONS.get(key, {}))
    if key == "model" and (section.get("text_encoder") or {}).get("kind") == "trained":
        defaults["text_encoder"] = section["text_encoder"]
    if key == "model" and section.get("backbone", "unet") == "unet" and "dit" in section:
        defaults["dit"] = section["dit"]  # a UNet model's unused DiT options (and the reverse)
    if key == "model" and section.get("backbone") == "dit" and "unet" in section:
        defaults["unet"] = section["unet"]
    out = {k: v for k, v in section.items() if not (k in defaults and v == defaults[k])}
    for name, value in out.items():  # a subsection's later options (model.dit)
        later = LATER_OPTIONS.get(f"{key}.{name}")
        if later and isinstance(value, dict):
            out[name] = {k: v for k, v in value.items() if not (k in later and v == later[k])}
    return out


def config_differences(stored: dict, current: dict) -> list[str]:
    """The MODEL_KEYS leaves whose values differ, as 'key: stored -> current' lines."""
    out = []
    for key in MODEL_KEYS:
        a, b = _section(stored, key), _section(current, key)
        a, b = (DEFAULTS.get(key) if a is None else a), (DEFAULTS.get(key) if b is None else b)
        out += tree_differences(_normalise(a), _normalise(b), key)
    return out


# Failures that say nothing about the checkpoint's bytes: falling back to an older step (and
# later moving this one aside) would be wrong. Everything else (a damaged file, unreadable JSON,
# a tensorstore read or decode error, a tree that no longer fits) is damage.
_NOT_DAMAGE_ERRNOS = {errno.ENOMEM, errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE,
                      errno.EAGAIN}
_NOT_DAMAGE_WORDS = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "Permission denied",
                     "out of memory", "Out of memory")


def is_damage(e: BaseException) -> bool:
    """Whether a restore failure means the checkpoint is damaged (so an older step is used)."""
    if isinstance(e, integrity.DamagedError):
        return True
    chain = []
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(x, MemoryError) for x in chain) or os_errno(chain[0]) in _NOT_DAMAGE_ERRNOS:
        return False
    return not any(w in str(x) for x in chain for w in _NOT_DAMAGE_WORDS)


def _report(message: str) -> None:
    print(f"[t2i_jax] {message}", file=sys.stderr)


class Checkpointer:
    """Saves and restores training checkpoints under `directory`, keeping the last `keep`
    (0 keeps all); read_only for readers (sampling, evaluation): nothing is created, deleted or
    moved. `report` gets the one-line notices (fallbacks, moved steps)."""

    def __init__(self, directory: str, keep: int = 3, report: Callable[[str], None] = _report,
                 read_only: bool = False):
        if keep < 0:
            raise ValueError(f"train.keep_checkpoints must be >= 0 (0 keeps every checkpoint), "
                             f"got {keep}.")
        self.directory = os.path.abspath(directory)
        self.report = report
        self.unrestorable: dict[int, str] = {}   # step -> why, found by restore()
        self.saved: set = set()                  # steps this object wrote
        self.failed: set = set()                 # steps whose save failed (partials removed)
        self.manager = ocp.CheckpointManager(
            self.directory,
            # A reader keeps every step and creates nothing (orbax's own read_only option
            # prints two warnings per manager).
            # A writer removes the partial step directories that killed saves leave behind.
            # Retention: the newest `keep` steps (orbax's LatestN; n=None preserves every step,
            # what keep=0 and a reader mean). The final step is pruned like any other: it is
            # always among the newest. (orbax deprecates max_to_keep for this policy.)
            options=ocp.CheckpointManagerOptions(preservation_policy=LatestN(
                                                     n=None if read_only else keep or None),
                                                 create=not read_only,
                                                 cleanup_tmp_directories=not read_only,
                                                 enable_async_checkpointing=False))
        self.read_only = read_only

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        steps = self.steps()
        return steps[-1] if steps else None

    def latest_good(self) -> Optional[int]:
        """The newest step on disk that did not fail to restore: what a rerun resumes from."""
        steps = [s for s in self.steps() if s not in self.unrestorable]
        return steps[-1] if steps else None

    @property
    def damaged_directory(self) -> str:
        return self.directory + ".damaged"

    def save(self, step: int, state: Any, data_state: Optional[dict], config: dict,
             statistics: Optional[dict] = None) -> None:
        if self.read_only:
            raise ValueError(f"this Checkpointer of {self.directory} is read-only.")
        if step in self.saved:
            return  # already saved (e.g. the final step was also a periodic one)
        self._move_aside_unrestorable()
        if step in self.manager.all_steps():  # on disk, not written by this run: stale
            self._move_aside(step, "it was not written by this run")
        items = dict(state=ocp.args.StandardSave(_host_tree(state)),
                     config=ocp.args.JsonSave(_normalise(config)))
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(_normalise(data_state))
        if statistics is not None:
            items["statistics"] = ocp.args.JsonSave(_normalise(statistics))
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001: a full disk, a lost mount, ... (re-raised)
            self.failed.add(step)
            self._remove_partial(step)
            self.manager.reload()
            code = os_errno(e)
            if step in self.manager.all_steps():  # renamed into place, then pruning etc. failed
                self._record(step)
                raise CheckpointSaveError(
                    f"checkpoint {step} was saved in {self.directory}, but orbax failed after "
                    f"it ({short_cause(e)}); {os_advice(code)}, then rerun the same command (it "
                    f"resumes from step {step}).", code) from e
            latest = self.latest_good()
            resume = (f"it resumes from step {latest}" if latest is not None else
                      "there is no checkpoint yet, so it starts again")
            raise CheckpointSaveError(
                f"could not save checkpoint {step} in {self.directory}: {short_cause(e)}; "
                f"{os_advice(code)}, then rerun the same command ({resume}).", code) from e
        self._record(step)

    def _record(self, step: int) -> None:
        """The step is complete: remember it and write its integrity record (process 0)."""
        self.saved.add(step)
        if distributed.is_lead():
            try:
                integrity.write(os.path.join(self.directory, str(step)))
            except OSError as e:  # the step itself is complete: it is kept, unverified
                raise CheckpointSaveError(
                    f"checkpoint {step} in {self.directory} was saved, but its integrity record "
                    f"could not be written ({short_cause(e)}); {os_advice(e.errno)}, then rerun "
                    f"the same command (it resumes from step {step}).", e.errno) from e

    def _remove_partial(self, step: int, settle: float = 1.0, seconds: float = 15.0) -> None:
        """Deletes what a failed save of `step` left, to give the space back. Writes already in
        flight (tensorstore's, orbax's metadata thread) may recreate the directory after the
        error: it must stay gone for `settle` seconds (at most `seconds` in all)."""
        try:
            self.manager.wait_until_finished()
        except Exception:  # noqa: BLE001: the same failure, reported by the caller
            pass
        pattern = os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")
        start = gone_since = time.monotonic()
        while time.monotonic() - start < seconds:
            partial = glob.glob(pattern)
            for path in partial:
                shutil.rmtree(path, ignore_errors=True)
            now = time.monotonic()
            if partial:
                gone_since = now
            elif now - gone_since >= settle:
                return
            time.sleep(0.02)

    def _move_aside_unrestorable(self) -> None:
        """Steps that failed to restore are superseded once this run saves: moved, reported."""
        for step in sorted(self.unrestorable):
            if step in self.manager.all_steps():
                self._move_aside(step, f"it cannot be restored: {self.unrestorable[step]}")
        self.unrestorable.clear()

    def _move_aside(self, step: int, why: str) -> None:
        if distributed.is_lead():
            os.makedirs(self.damaged_directory, exist_ok=True)
            target = os.path.join(self.damaged_directory, str(step))
            n = 1
            while os.path.exists(target):
                target = os.path.join(self.damaged_directory, f"{step}.{n}")
                n += 1
            os.replace(os.path.join(self.directory, str(step)), target)
            self.report(f"checkpoint {step} moved to {target} ({why}); this run writes it anew.")
        distributed.barrier(f"t2i_jax checkpoint {step} moved")  # the others wait for the move
        self.manager.reload()

    def stored_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def restore(self, abstract_state: Union[Any, Callable[[dict], Any]],
                check: Optional[Callable[[int, dict], None]] = None,
                step: Optional[int] = None, only: Optional[tuple] = None) -> Optional[Restored]:
        """The newest restorable checkpoint (or `step`), with arrays laid out as the abstract
        state's shardings say; None if there is no checkpoint.

        abstract_state: the state's ShapeDtypeStructs, or a function of the stored config that
        returns them (a sampler rebuilds its model from the stored config). check(step, stored config)
        may raise IncompatibleCheckpointError, which is never taken for damage. Damaged steps
        are reported and skipped; CheckpointDamagedError if none is left.
        only: names of TrainState fields to read (e.g. ("ema_params",) for sampling: the Adam
        moments are never read); the state is then a dict of those fields.
        """
        candidates = [step] if step is not None else self.steps()[::-1]
        for s in candidates:
            try:
                problem = integrity.verify(os.path.join(self.directory, str(s)))
                if problem:
                    raise integrity.DamagedError(problem)
                config = self.stored_config(s)
                if check is not None:
                    check(s, config)
                abstract = abstract_state(config) if callable(abstract_state) else abstract_state
                if only is None:
                    items = dict(state=ocp.args.StandardRestore(_as_tree(abstract)))
                else:
                    tree = abstract if isinstance(abstract, dict) else _as_tree(abstract)
                    part = {k: tree[k] for k in only}
                    items = dict(state=ocp.args.PyTreeRestore(
                        item=part, restore_args=ocp.checkpoint_utils.construct_restore_args(part),
                        partial_restore=True))
                for extra in ("data", "statistics"):
                    if os.path.isdir(os.path.join(self.directory, str(s), extra)):
                        items[extra] = ocp.args.JsonRestore()
                restored = self.manager.restore(s, args=ocp.args.Composite(**items))
            except IncompatibleCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001: damage falls back, anything else stops
                if not is_damage(e):
                    raise CheckpointReadError(
                        f"checkpoint {s} in {self.directory} could not be read, and not because "
                        f"it is damaged ({short_cause(e)}); nothing was changed: "
                        f"{os_advice(os_errno(e))}, then rerun the same command.") from e
                why = short_cause(e)
                self.unrestorable[s] = why
                older = [c for c in candidates if c < s]
                self.report(f"checkpoint {s} in {self.directory} cannot be restored ({why})"
                            + (f"; trying {older[0]}." if older else "."))
                continue
            state = (_from_tree(abstract, restored.state) if only is None
                     else {k: restored.state[k] for k in only})
            return Restored(s, state, restored.get("data") if "data" in items else None, config,
                            restored.get("statistics") if "statistics" in items else None)
        if step is not None:
            others = [c for c in self.steps() if c != step]
            raise CheckpointDamagedError(
                f"checkpoint {step} in {self.directory} cannot be restored "
                f"({self.unrestorable[step]})" + (f"; the others are {others}." if others else "."))
        if candidates:
            raise CheckpointDamagedError(
                f"no checkpoint in {self.directory} can be restored ({', '.join(map(str, candidates))}"
                " are damaged: see the lines above). To train afresh and keep them for inspection: "
                f"mv {self.directory} {self.damaged_directory}-all, then rerun.")
        return None

    def close(self) -> None:
        try:
            self.manager.close()
        except Exception:  # noqa: BLE001: closing after a failed save must not hide its error
            pass
        # Every writer thread has now stopped: what a failed save left is removed for good.
        for step in self.failed:
            for path in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
                shutil.rmtree(path, ignore_errors=True)


def check_compatible(directory: str, step: int, stored: dict, config: dict) -> None:
    """Raises IncompatibleCheckpointError if the stored model config differs from `config`."""
    diffs = config_differences(stored, config)
    if diffs:
        raise IncompatibleCheckpointError(
            f"{directory} holds checkpoints of a different model (step {step}): "
            + "; ".join(diffs) + ". Use a new --workdir for this config, or the config the "
            "checkpoints were made with.")


def _as_tree(state) -> dict:
    """The TrainState as a plain dict of its fields (params, ema_params, opt_state, step, rng:
    the layout a user sees when restoring with orbax alone)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def _host_tree(state) -> dict:
    """_as_tree with every array this process holds whole (all of it on its devices, or a full
    replica) copied to the host first: orbax then writes NumPy arrays, from process 0 alone,
    instead of slicing each replicated jax.Array into per-device pieces (which compiles hundreds
    of small programs on many devices). Arrays split over several processes (FSDP) stay
    jax.Arrays: each process writes its own shards."""
    tree = _as_tree(state)
    whole = lambda x: isinstance(x, jax.Array) and (  # noqa: E731
        x.is_fully_addressable or x.is_fully_replicated)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    host = jax.device_get([x if x.is_fully_addressable else x.addressable_data(0)
                           for x in leaves if whole(x)])
    it = iter(host)
    return jax.tree_util.tree_unflatten(
        treedef, [np.asarray(next(it)) if whole(x) else x for x in leaves])


def _from_tree(template, tree: dict):
    """The TrainState of `template`'s structure from the restored dict (orbax returns optax's
    NamedTuples as plain containers: the leaves are put back into the template's structure)."""
    return template.replace(**{
        k: jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(getattr(template, k)),
                                        jax.tree_util.tree_leaves(tree[k]))
        for k in _as_tree(template)})
