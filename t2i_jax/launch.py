"""Run a multi-process (multi-host) job as N local processes: for tests, and to try a multi-host
config on one machine.

    python -m t2i_jax.launch --num_processes 2 --devices_per_process 4 -- \\
        train.py --config configs/digits.py --workdir runs/digits_mp

Starts N copies of the command, each with --coordinator_address localhost:PORT (a free port)
--num_processes N --process_id I appended, and each with DEVICES simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count, JAX_PLATFORMS=cpu), so the job sees
N x DEVICES devices over N processes that talk through jax's distributed runtime and CPU
collectives (gloo) over localhost: the code path of a real cluster, not a simulation of it.

Process 0's output is shown as it is; the others' lines get a "[process I]" prefix (gloo's
connection notices are dropped). SIGTERM and SIGINT (Ctrl-C) are forwarded once to every process
(train.py then saves one consistent checkpoint and every process exits 0). When a process fails
or is killed, the others cannot go on without it: they get --grace seconds to exit by
themselves, then SIGKILL. The exit code is 0 if every process exited 0, else the first failure's
(128 + N for signal N).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

from t2i_jax.distributed import DEFAULT_TIMEOUT, ProcessGroup
from t2i_jax.xla_flags import TUNED_CPU_FLAGS

PREFIX = "[t2i_jax.launch]"
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def child_env(devices: int, env: Optional[dict] = None) -> dict:
    """The environment of one process: `devices` CPU devices; the user's XLA_FLAGS otherwise
    kept (the tuned CPU flags where none were set)."""
    env = dict(os.environ if env is None else env)
    flags = env.get("XLA_FLAGS")
    kept = [f for f in (flags.split() if flags is not None else list(TUNED_CPU_FLAGS))
            if not f.startswith(_DEVICE_FLAG)]
    env["XLA_FLAGS"] = " ".join(kept + [f"{_DEVICE_FLAG}={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def command_of(argv: list) -> list:
    """A .py script runs under this Python; anything else is a program."""
    return [sys.executable] + argv if argv[0].endswith(".py") else list(argv)


def _die_with_parent() -> None:
    """In the child: SIGKILL when the launcher dies (even by kill -9), so no process is orphaned."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# Where a crash report starts (a C++ CHECK failure or fatal signal, Python's faulthandler): from
# there on the process's output is a stack trace, which goes to a log file, not the terminal.
_CRASH = re.compile(rb"^(\*\*\* (Check failure stack trace|SIG[A-Z]+ received)|Fatal Python error"
                    rb"|PC: @ |\s*@\s+0x[0-9a-fA-F]+|(Current thread|Thread) 0x[0-9a-fA-F]+)")


class _CrashFilter:
    """Passes a child's lines until its crash report starts; keeps the report in a log file and
    says so in one line when the stream ends."""

    def __init__(self, name: str):
        self.name, self.kept, self.path = name, [], None

    def passes(self, segment: bytes) -> bool:
        if not self.kept and not _CRASH.match(segment):
            return True
        self.kept.append(segment)
        return False

    def close(self) -> Optional[bytes]:
        if not self.kept:
            return None
        import tempfile
        self.path = os.path.join(tempfile.gettempdir(), f"t2i_jax-launch-{os.getpid()}.log")
        try:
            with open(self.path, "ab") as f:
                f.write(f"--- {self.name}\n".encode() + b"".join(self.kept))
            where = f"written to {self.path}"
        except OSError:
            where = "not kept (the temporary directory is not writable)"
        return (f"{PREFIX} {self.name} crashed; its stack trace ({len(self.kept)} lines) was "
                f"{where}.\n").encode()


def _pump(stream, out, prefix: bytes, crash: Optional[_CrashFilter] = None) -> None:
    """Copies a child's output to `out` segment by segment (a progress bar's \\r updates pass at
    once), prefixing lines of processes > 0, dropping gloo's connection notices, and (`crash`)
    keeping a crash report's stack trace off the terminal."""
    crash = crash or _CrashFilter("the process")
    buf, fresh, gloo = b"", True, False
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            break
        buf += chunk
        while True:
            cut = min((i for i in (buf.find(b"\n"), buf.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            segment, buf = buf[:cut + 1], buf[cut + 1:]
            if b"[Gloo]" in segment or b"peer ranks" in segment:
                gloo = True
                continue
            # gloo writes each notice in pieces from several threads at once, so the count
            # that ends one ("... peer ranks is : 7") can arrive on a line of its own
            if gloo and segment.strip().isdigit():
                continue
            if not crash.passes(segment):
                continue
            out.write((prefix if fresh and prefix else b"") + segment)
            out.flush()
            fresh = segment.endswith(b"\n")
    if buf and crash.passes(buf):
        out.write((prefix if fresh and prefix else b"") + buf)
        out.flush()
        fresh = buf.endswith(b"\n")
    line = crash.close()
    if line:
        out.write((b"" if fresh else b"\n") + line)
        out.flush()


def code_of(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def launch(argv: list, num_processes: int, devices_per_process: int, *, port: int = 0,
           grace: float = 10.0, timeout: int = DEFAULT_TIMEOUT, stdout=None, stderr=None) -> int:
    """Runs the job; returns its exit code (see the module doc)."""
    port = port or free_port()
    out = stdout or sys.stdout.buffer
    err = stderr or sys.stderr.buffer
    env = child_env(devices_per_process)
    procs, pumps = [], []
    for i in range(num_processes):
        group = ProcessGroup(f"localhost:{port}", num_processes, i, timeout=timeout)
        p = subprocess.Popen(command_of(argv) + group.argv(), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True,
                             preexec_fn=_die_with_parent)
        procs.append(p)
    # The output threads start after every fork: preexec_fn is unsafe once threads run.
    for i, p in enumerate(procs):
        prefix = f"[process {i}] ".encode() if i else b""
        for stream, sink in ((p.stdout, out), (p.stderr, err)):
            t = threading.Thread(target=_pump, args=(stream, sink, prefix,
                                                     _CrashFilter(f"process {i}")), daemon=True)
            t.start()
            pumps.append(t)
        err.write(f"{PREFIX} process {i} of {num_processes}: pid {p.pid}, "
                  f"{devices_per_process} CPU device(s)\n".encode())
        err.flush()

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    first_failure, deadline = None, None
    try:
        while True:
            codes = [p.poll() for p in procs]  # every one polled (any() would stop early)
            if all(c is not None for c in codes):
                break
            for i, p in enumerate(procs):
                if codes[i] not in (None, 0) and first_failure is None:
                    first_failure = (i, p.returncode)
                    deadline = time.monotonic() + grace
                    if None in codes:
                        err.write(f"{PREFIX} process {i} {describe(p.returncode)}; the others "
                                  f"cannot go on without it: they are stopped in {grace:g} s "
                                  "unless they exit first.\n".encode())
                        err.flush()
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for t in pumps:
            t.join(timeout=5)
    if first_failure is None:
        failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
        first_failure = failed[0] if failed else None
    return 0 if first_failure is None else code_of(first_failure[1])


def parse(argv: list):
    cut = argv.index("--") if "--" in argv else len(argv)
    from t2i_jax.errors import ArgumentParser
    p = ArgumentParser(prog="python -m t2i_jax.launch", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       usage="%(prog)s --num_processes N --devices_per_process D -- "
                             "SCRIPT.py ARGS...")
    p.add_argument("--num_processes", type=int, required=True, metavar="N")
    p.add_argument("--devices_per_process", type=int, default=1, metavar="D",
                   help="simulated CPU devices per process (default 1)")
    p.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    p.add_argument("--grace", type=float, default=10.0, metavar="S",
                   help="seconds the others get to exit after one process fails (default 10)")
    p.add_argument("--initialization_timeout", type=int, default=DEFAULT_TIMEOUT, metavar="S",
                   help="passed to every process: seconds for all to join")
    args = p.parse_args(argv[:cut])
    command = argv[cut + 1:]
    if not command:
        p.error("no command: put it after --, e.g. -- train.py --config configs/digits.py "
                "--workdir runs/mp")
    if args.num_processes < 1 or args.devices_per_process < 1:
        p.error("--num_processes and --devices_per_process must be >= 1.")
    if args.grace < 0:
        p.error("--grace must be >= 0.")
    if not 0 <= args.port < 65536:
        p.error(f"--port must be a port number, got {args.port}.")
    taken = [a for a in command if a.split("=")[0] in ("--coordinator_address", "--num_processes",
                                                         "--process_id", "--multihost")]
    if taken:
        p.error(f"the command already has {taken[0].split('=')[0]}: the launcher passes the "
                "process-group flags itself.")
    if command[0].endswith(".py") and not os.path.isfile(command[0]):
        p.error(f"no script {command[0]}.")
    return args, command


def main(argv: Optional[list] = None) -> int:
    args, command = parse(sys.argv[1:] if argv is None else argv)
    return launch(command, args.num_processes, args.devices_per_process, port=args.port,
                  grace=args.grace, timeout=args.initialization_timeout)


if __name__ == "__main__":
    sys.exit(main())
