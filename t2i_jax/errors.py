"""The boundary of every command (train.py, sample.py, fid, reproduce): one clear line per fault.

    return Boundary("sample.py").run(main, argv)

A command's `main` raises; the boundary prints ONE line that says what is wrong and what to do,
and returns the exit code:
  - the library's own errors (ValueError and the exceptions defined in t2i_jax) carry a message
    written for the user: it is printed as it is;
  - OSError (a full disk, no permission): the path, the cause and how to resume;
  - Ctrl-C / a second SIGTERM (KeyboardInterrupt, `Interrupted`): what was kept, 128 + signal;
  - anything else is a bug: its type and first line.
Where the cause has more detail than a line (a traceback, a storage library's long spec), it goes
to a log file (`t2i_errors.log` in the directory the command names with `log_in`, else the
temporary directory) and the line says where. Exceptions that background threads of the storage
libraries raise after a failed read or write (tensorstore's callbacks into a closed asyncio loop:
thousands of tracebacks) go to the same log, not to the terminal. T2I_DEBUG=1 re-raises
everything, traceback included.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import traceback
from typing import Callable, Optional

LOG_NAME = "t2i_errors.log"
DEBUG_ENV = "T2I_DEBUG"
_MAX_BACKGROUND = 200  # background errors kept for the log (the rest are counted)
STORAGE_LIBRARIES = ("orbax", "tensorstore")  # whose background errors go to the log


class UsageError(ValueError):
    """A command line that cannot run (an unknown option or config key): exit code 2."""
    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one line for a mistake ("prog: error: ... (see --help)"), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class Interrupted(KeyboardInterrupt):
    """A stop the user asked for (Ctrl-C, a second SIGTERM) that leaves no time to save."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.message = signum, message


_OS_CODE = re.compile(r"os_error_code='?(\d+)")  # how tensorstore reports the OS error


def short_cause(e: BaseException, limit: int = 200) -> str:
    """One short line for an exception: an OS error's name and errno where one is inside (as in
    tensorstore's "[os_error_code='28']"), without a storage library's JSON spec."""
    if isinstance(e, OSError) and e.errno:
        return f"{e.strerror or os.strerror(e.errno)} (errno {e.errno})" + (
            f": {e.filename}" if getattr(e, "filename", None) else "")
    text = str(e).strip() or type(e).__name__
    code = _OS_CODE.search(text)
    if code:
        return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})"
    text = re.split(r"\s*See full TensorStore details", text)[0]
    text = text.splitlines()[0] if text else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def os_errno(e: BaseException) -> Optional[int]:
    """The OS error number behind an exception (or one it was raised from), if there is one."""
    while e is not None:
        if isinstance(e, OSError) and e.errno:
            return e.errno
        m = _OS_CODE.search(str(e))
        if m:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def os_advice(code: Optional[int]) -> str:
    """What a user does about an OS error number."""
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG):
        return "free some space (or raise the quota)"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make it writable, or pass another directory"
    return "fix the cause"


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_ENTRY_POINTS = tuple(os.path.join(os.path.dirname(_PACKAGE), f) for f in ("train.py", "sample.py"))


def _is_ours(e: BaseException) -> bool:
    """A message written for the user: a ValueError, one of t2i_jax's exceptions, or an OSError
    with a message only (FileNotFoundError("no checkpoint in ...")), raised by t2i_jax's own
    code. A ValueError from inside jax or orbax is a fault to report, not a usage message."""
    kind = (isinstance(e, ValueError) or type(e).__module__.startswith("t2i_jax")
            or (isinstance(e, OSError) and not e.errno))
    frames = traceback.extract_tb(e.__traceback__) if e.__traceback__ is not None else []
    where = os.path.abspath(frames[-1].filename) if frames else None
    return kind and (where is None or where.startswith(_PACKAGE + os.sep)
                     or where in _ENTRY_POINTS)


class Boundary:
    """Runs a command's main under the rules above; `log_in(dir)` says where details go."""

    def __init__(self, prog: str, interrupted: Optional[str] = None):
        self.prog, self.interrupted = prog, interrupted
        self.log_dir: Optional[str] = None
        self.background: list[str] = []
        self.background_count = 0
        self.log_path: Optional[str] = None

    def log_in(self, directory: Optional[str]) -> None:
        self.log_dir = directory

    def exit(self, main: Callable[..., Optional[int]], *args) -> None:
        """As a program: run, then exit with its code. Background errors that arrive after main
        (at interpreter shutdown) still go to the log."""
        code = self.run(main, *args, keep_capturing=True)
        sys.exit(code)

    def run(self, main: Callable[..., Optional[int]], *args, keep_capturing: bool = False) -> int:
        """Calls main(*args); returns its exit code (0 for None) or the code of the fault."""
        restore = self._capture_background()
        previous_term = self._stop_on_sigterm()
        try:
            return int(main(*args) or 0)
        except KeyboardInterrupt as e:
            if os.environ.get(DEBUG_ENV):
                raise
            signum = getattr(e, "signum", signal.SIGINT)
            message = getattr(e, "message", None) or self.interrupted or "interrupted (Ctrl-C)"
            print(f"{self.prog}: {message}", file=sys.stderr)
            return 128 + int(signum)
        except Exception as e:  # noqa: BLE001: the boundary
            if os.environ.get(DEBUG_ENV):
                raise
            print(f"{self.prog}: error: {self.describe(e)}", file=sys.stderr)
            return int(getattr(e, "exit_code", 1))
        finally:
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
            if keep_capturing:
                import atexit
                atexit.register(self._flush_late, self.background_count)
            else:
                restore()
            if self.background_count:
                path = self.write_log(f"{self.background_count} background error(s) of library "
                                      "threads and callbacks:\n" + "\n".join(self.background))
                if path:
                    print(f"[t2i_jax] {self.background_count} background error(s) of library "
                          f"threads and callbacks were written to {path}", file=sys.stderr)

    def _stop_on_sigterm(self):
        """SIGTERM (where nothing else handles it: train.py's loop saves first) stops the command
        with one line, as Ctrl-C does, instead of a silent exit 143. Returns the handler to put
        back (None: left alone)."""
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return None

        def term(signum, frame):
            raise Interrupted(signum, "SIGTERM: " + (self.interrupted or "stopped"))
        return signal.signal(signal.SIGTERM, term)

    def _flush_late(self, seen: int) -> None:
        if self.background_count > seen:
            self.write_log(f"{self.background_count - seen} background error(s) at exit:\n"
                           + "\n".join(self.background[seen:]))

    def describe(self, e: BaseException) -> str:
        """The line for an exception; writes its traceback to the log where the line is short of
        the whole story (anything but a plain usage error)."""
        detailed = e.__cause__ is not None
        if _is_ours(e) and not detailed:
            return str(e)
        if _is_ours(e):
            line = str(e)
        elif isinstance(e, OSError):
            code = os_errno(e)
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            line = (f"{e.strerror or short_cause(e)}{where}; {os_advice(code)}, then rerun the "
                    "same command")
        else:
            line = f"unexpected {type(e).__name__}: {short_cause(e)} (a bug: please report it)"
        path = self.write_log("".join(traceback.format_exception(e)))
        return line + (f" (details: {path})" if path else "")

    def write_log(self, text: str) -> Optional[str]:
        """Appends `text` to the log; returns its path (None if no directory could take it)."""
        if self.log_path is None:
            # the command's directory only where it exists: a refusal creates no directory
            candidates = [d for d in (self.log_dir, tempfile.gettempdir())
                          if d and os.path.isdir(d)]
            for d in candidates:
                path = os.path.join(os.path.abspath(d), LOG_NAME) if d == self.log_dir else \
                    os.path.join(d, f"t2i_jax-{os.getpid()}-{LOG_NAME}")
                if _append(path, self.prog, text):
                    self.log_path = path
                    return path
            return None
        return self.log_path if _append(self.log_path, self.prog, text) else None

    def _capture_background(self) -> Callable[[], None]:
        """Routes to self.background: unraisable exceptions, exceptions that end a thread,
        asyncio's "exception was never retrieved", and what orbax's background threads log
        through absl when a write fails."""
        previous_hook = sys.unraisablehook
        asyncio_log, absl_log = logging.getLogger("asyncio"), logging.getLogger("absl")
        propagate = asyncio_log.propagate

        def keep(text: str) -> None:
            self.background_count += 1
            if len(self.background) < _MAX_BACKGROUND:
                self.background.append(text)

        def hook(u):
            keep("".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback))
                 + (f"(in {u.object!r})" if u.object is not None else ""))

        class Handler(logging.Handler):
            def emit(self, record):
                keep(self.format(record))

        main_thread = threading.main_thread().ident

        class StorageErrors(logging.Filter):
            # absl reports its own file as the caller of a thread's logging.exception, so the
            # thread tells: our code logs nothing from threads, orbax's I/O threads do.
            def filter(self, record):
                if record.levelno >= logging.ERROR and (record.thread != main_thread or any(
                        f"{os.sep}{lib}{os.sep}" in record.pathname for lib in STORAGE_LIBRARIES)):
                    keep(logging.Formatter().format(record))
                    return False
                return True

        def thread_hook(a):  # a writer thread's failure (tensorboardX on a full disk, ...)
            keep(f"in thread {a.thread.name if a.thread else '?'}:\n" + "".join(
                traceback.format_exception(a.exc_type, a.exc_value, a.exc_traceback)))

        handler, storage = Handler(), StorageErrors()
        previous_thread_hook = threading.excepthook
        sys.unraisablehook, threading.excepthook = hook, thread_hook
        asyncio_log.addHandler(handler)
        asyncio_log.propagate = False
        absl_log.addFilter(storage)

        def restore():
            sys.unraisablehook, threading.excepthook = previous_hook, previous_thread_hook
            asyncio_log.removeHandler(handler)
            asyncio_log.propagate = propagate
            absl_log.removeFilter(storage)
        return restore


def _append(path: str, prog: str, text: str) -> bool:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            stamp = datetime.datetime.now().isoformat(timespec="seconds")
            f.write(f"--- {stamp} {prog} (pid {os.getpid()})\n{text.rstrip()}\n")
        return True
    except OSError:
        return False
