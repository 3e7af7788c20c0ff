"""Checkpoints with orbax-checkpoint: DIR/checkpoints/<step>/{state, data, config}.

  state   the TrainState (params, ema_params, opt_state, step, rng key data) as orbax arrays;
  data    the input iterator's state (JSON), so a resumed run sees exactly the batches it would
          have seen;
  config  the whole experiment config (JSON): a resume under a different model is refused.

Orbax writes a step into a temporary directory and renames it when complete, so a job killed
mid-save leaves no step that looks finished. A finished step that fails to restore (a file lost
or damaged later) is reported and the previous one is used instead. Restoring lays the arrays
out for the current mesh, so a run can resume on a different number of devices.

Reading a checkpoint needs orbax alone:

    import orbax.checkpoint as ocp
    mgr = ocp.CheckpointManager("DIR/checkpoints")
    ckpt = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
    ema_params = ckpt.state["ema_params"]
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

# Parts of the config that fix the parameters' meaning: a resume must match them exactly.
MODEL_KEYS = ("model", "diffusion", "data.image_size", "data.channels")


class IncompatibleCheckpointError(ValueError):
    pass


def _normalise(x):
    return json.loads(json.dumps(x, default=list))  # tuples -> lists, as the stored JSON has them


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part, None) if isinstance(d, dict) else None
    return d


def config_differences(stored: dict, current: dict) -> list[str]:
    """The MODEL_KEYS leaves whose values differ, as 'key: stored -> current' lines."""
    out = []

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{prefix}.{k}")
        elif a != b:
            out.append(f"{prefix}: {a!r} -> {b!r}")

    for key in MODEL_KEYS:
        walk(_normalise(_get(stored, key)), _normalise(_get(current, key)), key)
    return out


class Checkpointer:
    """Saves and restores training checkpoints under `directory` (keeps the last `keep`)."""

    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, data_state: Optional[dict], config: dict) -> None:
        if step in self.manager.all_steps():
            return  # already saved (e.g. the final step was also a periodic one)
        items = dict(state=ocp.args.StandardSave(_as_tree(state)),
                     config=ocp.args.JsonSave(_normalise(config)))
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(_normalise(data_state))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def stored_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def check_compatible(self, step: int, config: dict) -> None:
        diffs = config_differences(self.stored_config(step), config)
        if diffs:
            raise IncompatibleCheckpointError(
                f"{self.directory} holds checkpoints of a different model (step {step}); its "
                "config differs in:\n  " + "\n  ".join(diffs) + "\nUse a new --workdir for this "
                "config, or the config the checkpoints were made with.")

    def restore(self, abstract_state: Any, config: dict, step: Optional[int] = None):
        """Returns (step, state, data_state) from the newest restorable checkpoint (or `step`),
        with arrays laid out as abstract_state's shardings say; None if there is none.

        Raises IncompatibleCheckpointError if the stored model config differs from `config`.
        """
        candidates = [step] if step is not None else self.steps()[::-1]
        for s in candidates:
            self.check_compatible(s, config)
            try:
                items = dict(state=ocp.args.StandardRestore(_as_tree(abstract_state)))
                if "data" in self._item_names(s):
                    items["data"] = ocp.args.JsonRestore()
                restored = self.manager.restore(s, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001: any unreadable checkpoint falls back
                print(f"[t2i_jax] checkpoint {s} in {self.directory} cannot be restored "
                      f"({type(e).__name__}: {str(e)[:300]}); trying an older one.", file=sys.stderr)
                continue
            state = _from_tree(abstract_state, restored.state)
            return s, state, restored.get("data") if "data" in items else None
        if candidates:
            raise RuntimeError(f"none of the checkpoints {candidates} in {self.directory} could be "
                               "restored (see the messages above); move the directory away to "
                               "start afresh.")
        return None

    def _item_names(self, step: int) -> set:
        return {p for p in os.listdir(os.path.join(self.directory, str(step)))}

    def close(self) -> None:
        self.manager.close()


def _as_tree(state) -> dict:
    """The TrainState as a plain dict (the layout a user sees when restoring with orbax alone)."""
    return dict(step=state.step, params=state.params, ema_params=state.ema_params,
                opt_state=state.opt_state, rng=state.rng)


def _from_tree(template, tree: dict):
    opt_state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template.opt_state),
                                             jax.tree_util.tree_leaves(tree["opt_state"]))
    return template.replace(step=tree["step"], params=tree["params"],
                            ema_params=tree["ema_params"], opt_state=opt_state, rng=tree["rng"])
