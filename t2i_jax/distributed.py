"""Several JAX processes (one per host) as one job: joining the group, agreeing, stopping together.

    group = ProcessGroup.from_flags(coordinator_address="host0:8476", num_processes=2,
                                    process_id=1)       # checked without jax
    join(group)                                         # jax.distributed.initialize, timed out

Every process runs the same program (SPMD): the same jitted steps in the same order, each on its
own devices, each reading its own slice of the data. What only one process may do (write metrics,
grids, a sampling job's files) is done by process 0, the lead; what all must decide alike (stop
at a signal, a job's unfinished images, whether the configs match) is decided here, once, for
all of them. On one process every helper is the plain local operation: no collective runs.

  check_same(what, value)  every process was given the same config / job: else each process is
                           refused with the differences (a different config would deadlock or
                           silently train something else);
  lead_decides(fn)         process 0 runs fn (reads the output directory, takes a lock); its
                           JSON result, or its error, reaches every process;
  StopVote                 a SIGTERM on any one process stops every process after the same step;
  to_host(x)               a global array's value on every process (gathered across processes).

Importing this module imports no jax (the command lines check their flags before jax starts).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from t2i_jax.errors import UsageError

DEFAULT_TIMEOUT = 300  # seconds for every process to join (jax's own default)
JOIN_EXIT_CODE = 1


@dataclass(frozen=True)
class ProcessGroup:
    """The process-group flags of train.py and sample.py. Inactive (one process) when neither
    --multihost nor --coordinator_address is given."""
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    auto: bool = False          # --multihost: jax detects the cluster (TPU pod, SLURM, ...)
    timeout: int = DEFAULT_TIMEOUT

    @property
    def active(self) -> bool:
        return self.auto or self.coordinator_address is not None

    @classmethod
    def from_flags(cls, coordinator_address=None, num_processes=None, process_id=None,
                   multihost=False, timeout=DEFAULT_TIMEOUT) -> "ProcessGroup":
        """The group, or UsageError naming the flag that is wrong and how to fix it."""
        given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
                 "--process_id": process_id}
        named = [k for k, v in given.items() if v is not None]
        if named and len(named) < 3 and not multihost:
            missing = [k for k in given if k not in named]
            raise UsageError(f"{', '.join(named)} without {' and '.join(missing)}: a process group "
                             "needs all three (--coordinator_address HOST:PORT of process 0, "
                             "--num_processes N, --process_id 0..N-1), or --multihost to let jax "
                             "detect the cluster (TPU pods, SLURM).")
        if num_processes is not None and num_processes < 1:
            raise UsageError(f"--num_processes must be >= 1, got {num_processes}.")
        if process_id is not None and num_processes is not None and \
                not 0 <= process_id < num_processes:
            raise UsageError(f"--process_id {process_id} is out of range for --num_processes "
                             f"{num_processes}: the ids are 0..{num_processes - 1} (0 is the "
                             "coordinator).")
        if process_id is not None and process_id < 0:
            raise UsageError(f"--process_id must be >= 0, got {process_id}.")
        if coordinator_address is not None:
            host, _, port = coordinator_address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise UsageError(f"--coordinator_address {coordinator_address!r} is not HOST:PORT "
                                 "(e.g. 10.0.0.1:8476, or localhost:8476 on one machine).")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise UsageError(f"--initialization_timeout must be > 0 seconds, got {timeout}.")
        return cls(coordinator_address, num_processes, process_id, bool(multihost), int(timeout))

    def argv(self) -> list:
        """The flags that make a command a member of this group (the launcher appends them)."""
        return [f"--coordinator_address={self.coordinator_address}",
                f"--num_processes={self.num_processes}", f"--process_id={self.process_id}",
                f"--initialization_timeout={self.timeout}"]


FLAG_HELP = {
    "multihost": "join a multi-host job that jax detects by itself (TPU pods, SLURM, the clusters "
                 "jax knows): run the same command on every host",
    "coordinator_address": "HOST:PORT of process 0, which serves the group (with --num_processes "
                           "and --process_id; python -m t2i_jax.launch passes all three)",
    "num_processes": "how many processes the job has",
    "process_id": "this process's id, 0..num_processes-1 (0 is the coordinator and writes the "
                  "outputs)",
    "initialization_timeout": f"seconds to wait for every process to join (default "
                              f"{DEFAULT_TIMEOUT}); past it the process exits with an error",
}


def add_arguments(parser) -> None:
    """The process-group flags on an argparse parser (sample.py)."""
    g = parser.add_argument_group("several processes (one per host; see README, Multi-host)")
    g.add_argument("--multihost", action="store_true", help=FLAG_HELP["multihost"])
    g.add_argument("--coordinator_address", metavar="HOST:PORT", help=FLAG_HELP["coordinator_address"])
    g.add_argument("--num_processes", type=int, metavar="N", help=FLAG_HELP["num_processes"])
    g.add_argument("--process_id", type=int, metavar="I", help=FLAG_HELP["process_id"])
    g.add_argument("--initialization_timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=FLAG_HELP["initialization_timeout"])


def from_args(args) -> ProcessGroup:
    return ProcessGroup.from_flags(args.coordinator_address, args.num_processes, args.process_id,
                                   args.multihost, args.initialization_timeout)


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
        return True
    except OSError:
        return False


def join(group: ProcessGroup) -> None:
    """jax.distributed.initialize for `group` (nothing for an inactive one), with CPU collectives
    (gloo) when the backend is the CPU. A process that cannot join within group.timeout seconds
    prints one line saying why and exits with code 1 (jax itself would abort the process with a
    C++ stack trace, or wait forever for a coordinator that never comes up)."""
    if not group.active:
        return
    import jax
    from t2i_jax.xla_flags import backend_is_cpu
    if backend_is_cpu():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # jax's preemption service catches SIGTERM in C++ from here on, where Python never sees it
    # (a SIGTERM before the training loop would be lost). StopVote is how the processes agree.
    jax.config.update("jax_enable_preemption_service", False)
    address = group.coordinator_address
    if address is not None and group.process_id == 0:
        _check_port_free(address)
    timer = threading.Timer(group.timeout, _give_up, args=(group,))
    timer.daemon = True
    timer.start()
    try:
        if address is not None and group.process_id != 0:
            while not _reachable(address):  # the coordinator is not up yet: wait for it
                time.sleep(0.25)
        # jax's own deadline comes after ours, so the line above is what the user sees.
        try:
            jax.distributed.initialize(address, group.num_processes, group.process_id,
                                       initialization_timeout=int(group.timeout) + 30)
        except (ValueError, RuntimeError) as e:  # --multihost outside a cluster jax knows
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(
                f"could not join the process group ({cause}); --multihost works where jax "
                "detects the cluster (TPU pods, SLURM, ...): elsewhere pass "
                "--coordinator_address HOST:PORT --num_processes N --process_id I, or on one "
                "machine use python -m t2i_jax.launch.") from None
    finally:
        timer.cancel()


def _check_port_free(address: str) -> None:
    port = int(address.rpartition(":")[2])
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("", port))
    except OSError as e:
        raise UsageError(f"--coordinator_address {address}: process 0 cannot serve on port {port} "
                         f"({e.strerror}); pick a free port (python -m t2i_jax.launch picks one)."
                         ) from None
    finally:
        s.close()


def _give_up(group: ProcessGroup) -> None:
    address = group.coordinator_address
    if address is not None and group.process_id != 0 and not _reachable(address):
        why = (f"the coordinator {address} did not come up within {group.timeout} s: start process "
               "0 with the same --coordinator_address (it serves there), check the host and port")
    elif address is not None:
        why = (f"not all {group.num_processes} processes joined the coordinator {address} within "
               f"{group.timeout} s: start every process with --num_processes "
               f"{group.num_processes} and its own --process_id 0..{group.num_processes - 1}")
    else:
        why = (f"jax.distributed.initialize did not finish within {group.timeout} s (--multihost: "
               "the cluster jax detected did not assemble)")
    print(f"[t2i_jax] error: {why}, or raise --initialization_timeout.", file=sys.stderr, flush=True)
    os._exit(JOIN_EXIT_CODE)


# ---------------------------------------------------------------------------------------------
# Agreement between processes (each a no-op on one process)


def process_count() -> int:
    import jax
    return jax.process_count()


def is_lead() -> bool:
    import jax
    return jax.process_index() == 0


def barrier(name: str) -> None:
    if process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _broadcast_text(text: str) -> str:
    """Process 0's `text`, on every process."""
    import numpy as np
    from jax.experimental import multihost_utils
    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
    padded = np.zeros((1 << max(n - 1, 1).bit_length(),), np.uint8)  # few distinct shapes
    if is_lead():
        padded[:n] = data
    out = np.asarray(multihost_utils.broadcast_one_to_all(padded))
    return out[:n].tobytes().decode("utf-8")


def broadcast_from_lead(x):
    """Process 0's numpy array x on every process (the others pass any array of the same shape
    and dtype); x itself on one process."""
    if process_count() == 1:
        return x
    import numpy as np
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.broadcast_one_to_all(x))


def _gather_flags(flag: bool) -> list:
    import numpy as np
    from jax.experimental import multihost_utils
    return [bool(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(flag)))]


def check_same(what: str, value: dict) -> None:
    """UsageError on every process unless every process holds the same `value` as process 0."""
    if process_count() == 1:
        return
    import jax
    mine = json.loads(json.dumps(value, sort_keys=True, default=str))
    lead = json.loads(_broadcast_text(json.dumps(mine, sort_keys=True)))
    from t2i_jax.config_utils import tree_differences
    diffs = tree_differences(lead, mine)
    bad = [i for i, b in enumerate(_gather_flags(bool(diffs))) if b]
    if not bad:
        return
    fix = "start every process with the same command line (only --process_id differs)."
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 6 else "")
        raise UsageError(f"process {jax.process_index()} was given another {what} than process 0 "
                         f"(process 0 -> this one: {shown}): {fix}")
    raise UsageError(f"process(es) {bad} were given another {what} than process 0 (their own "
                     f"error lists the differences): {fix}")


class LeadError(ValueError):
    """Process 0 refused (its message, as it printed it), seen by another process."""


def lead_decides(fn: Callable[[], Any]) -> Any:
    """fn() run by process 0 alone; its (JSON) result on every process. If fn raises an Exception
    on process 0, it raises there and every other process raises LeadError with the same message
    (UsageError stays UsageError), so all stop together instead of waiting for each other."""
    if process_count() == 1:
        return fn()
    result, error = None, None
    if is_lead():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001: re-raised below, after the others are told
            error = e
    payload = json.loads(_broadcast_text(json.dumps(
        {"error": None if error is None else [type(error).__name__, str(error)],
         "result": result})))
    if error is not None:
        raise error
    if payload["error"] is not None:
        kind, message = payload["error"]
        raise (UsageError if kind == "UsageError" else LeadError)(message)
    return payload["result"]


class StopVote:
    """Whether any process asked to stop, agreed by every process at the same step.

    One process: the local flag. Several: each call launches an all-reduce (max) of the flags
    without waiting for it and returns the result of the previous call's, which has long finished:
    no host sync per step, and every process reads the same vote after the same step (a signal
    stops the job one step after it arrives)."""

    def __init__(self, mesh):
        import jax
        import jax.numpy as jnp
        from t2i_jax import sharding as mesh_lib
        self.single = jax.process_count() == 1
        self._pending = None
        if not self.single:
            self._sharding = mesh_lib.batch_sharding(mesh)
            self._local = len(mesh.local_devices)
            self._any = jax.jit(jnp.max, out_shardings=mesh_lib.replicated(mesh))

    def __call__(self, local: bool) -> bool:
        if self.single:
            return bool(local)
        import jax
        import numpy as np
        flags = jax.make_array_from_process_local_data(
            self._sharding, np.full((self._local,), int(bool(local)), np.int32))
        previous, self._pending = self._pending, self._any(flags)
        return previous is not None and bool(to_host(previous))


def to_host(tree):
    """The values of a pytree of jax.Arrays as numpy, on every process: each leaf fetched where
    this process holds all of it (or a replica), gathered from every process otherwise."""
    import jax
    import numpy as np

    def leaf(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree_util.tree_map(leaf, tree)


@contextlib.contextmanager
def lead_holds(cm):
    """Enters the context manager `cm` (a lock) on process 0 alone, for the block; a refusal
    there (another job holds the lock) is raised on every process."""
    lead_decides(lambda: cm.__enter__() and None)
    try:
        yield cm
    finally:
        cm.__exit__(None, None, None)
