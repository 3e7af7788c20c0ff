"""The device mesh of training and how arrays are laid out on it.

One Mesh over all devices (all hosts) with axes ("data", "fsdp"):
  - the batch is split over both axes (every device holds batch / device_count examples);
  - parameters, EMA and optimizer state are replicated over "data" and, with fsdp > 1, split over
    "fsdp" along the largest dimension that divides evenly (FSDP / ZeRO-3 style; XLA inserts the
    all-gathers and reduce-scatters), never the leading layer axis of a module run by nn.scan
    (STACK_SUFFIX).
The axes are Auto (GSPMD propagation), which is what the models are written for.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from t2i_jax.errors import UsageError

BATCH_AXES = ("data", "fsdp")


def make_mesh(fsdp: int = 1, devices: Optional[list] = None) -> Mesh:
    """Returns the ("data", "fsdp") mesh over `devices` (default: all devices of all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"train.fsdp={fsdp} must be >= 1 and divide the device count {n}; set "
                         f"--config.train.fsdp to a divisor of {n} (1 replicates the parameters).")
    grid = np.asarray(devices, dtype=object).reshape(n // fsdp, fsdp)
    return Mesh(grid, BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    n, hosts = mesh.devices.size, jax.process_count()
    if global_batch % n:
        raise UsageError(
            f"the global batch size {global_batch} does not divide over {n} devices: set "
            f"--config.train.batch_size to a multiple of {n} (e.g. {max(n, global_batch // n * n)}).")
    if global_batch % hosts:
        raise UsageError(f"the global batch size {global_batch} does not divide over {hosts} hosts.")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


MIN_SHARDED_SIZE = 2 ** 14  # smaller leaves stay replicated: splitting them costs more than it saves

# A module run by nn.scan (models/dit.py's "block_stack") stacks its layers' parameters on a
# leading [depth] axis. Each scan iteration reads one layer: split along a weight axis, it
# all-gathers that layer's slice (FSDP); split along the layer axis, the stack would be gathered
# whole before the loop or per iteration, and depth may well be the largest dimension of a small,
# deep model. Such modules are named "*_stack", and that axis is never the one split.
STACK_SUFFIX = "_stack"


def leaf_sharding(shape, mesh: Mesh, stacked: bool = False) -> NamedSharding:
    """Replicated, or with fsdp > 1 split over "fsdp" along the largest evenly divisible axis
    (leaves under MIN_SHARDED_SIZE elements stay replicated; `stacked`: not axis 0)."""
    k = mesh.shape["fsdp"]
    if k == 1 or not shape or int(np.prod(shape)) < MIN_SHARDED_SIZE:
        return replicated(mesh)
    candidates = [(d, i) for i, d in enumerate(shape) if d % k == 0 and d >= k
                  and not (stacked and i == 0)]
    if not candidates:
        return replicated(mesh)
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return NamedSharding(mesh, P(*spec))


def is_stacked(path) -> bool:
    """Whether a leaf's tree path runs through a scanned module's stack (leading [depth] axis)."""
    return any(str(getattr(p, "key", "")).endswith(STACK_SUFFIX) for p in path)


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """Sharding of every leaf of a (shape-only) state pytree: one rule for params, EMA, moments."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: leaf_sharding(x.shape, mesh, is_stacked(path)), abstract_state)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assembles this process's numpy batch into global arrays split over the mesh's devices."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def put(tree: Any, sharding: NamedSharding) -> Any:
    """device_put of host values (numpy, or small local arrays and PRNG keys that every process
    computed alike) onto `sharding`, which may span several processes: each process places its
    own devices' pieces (jax.device_put refuses a local jax.Array for a multi-process sharding)."""
    def leaf(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        is_key = isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        if isinstance(x, jax.Array) and not is_key and (
                not x.is_fully_addressable or sharding.is_fully_addressable):
            # a global array (a frozen encoder read onto another mesh), or any array within one
            # process: resharded device to device, never gathered on a host
            return jax.device_put(x, sharding)
        if is_key:
            data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(np.asarray(x), sharding)
    return jax.tree_util.tree_map(leaf, tree)
