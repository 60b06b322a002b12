"""Whether a run file's writer closed it, still writes it, or ended without closing it.

A gate that runs after training (``landscape check``) must tell a finished run from one
that stopped half-way, or one still being written: the rows alone look alike. Three
records tell them apart. HDF5 sets the superblock's file consistency flags when a writer
opens the file and clears them when it closes it (the HDF5 File Format Specification,
section II.A), so a set flag means "not closed"; the writer records its process id and
host in the file's ``writer_pid`` and ``writer_host`` attributes (docs/file-format.md), so
a reader on the same host can ask whether that process still runs (on another host it
cannot: the state is then ``open``); and a writer closed because training stopped (an
exception, Ctrl-C, SIGTERM, an uncaught error at exit) records why in ``closed_how``.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from landscape.store.recovery import WRITING, open_flags, pid_alive, running_here

__all__ = ["WriterStatus", "stopped_how", "writer_status"]

STATES = ("closed", "stopped", "writing", "ended", "open", "unknown")
"""``closed``: its writer closed the file when training finished; ``stopped``: it closed
the file because training stopped (``reason``: an exception, Ctrl-C, SIGTERM);
``writing``: the writer, a process on this host, still runs; ``ended``: the writer's
process ended without closing the file (killed: SIGKILL, out of memory, a crash of the
interpreter); ``open``: not closed, and written from another host (whether its writer
runs cannot be told from here); ``unknown``: a file whose superblock this library does
not read (one rewritten by other tools, such as ``h5repack``)."""


@dataclass(frozen=True)
class WriterStatus:
    """What became of a run file's writer (:data:`STATES`), and which process it was."""

    state: str
    pid: int | None = None
    host: str | None = None
    reason: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the writer closed the file when training finished."""
        return self.state == "closed"

    def describe(self) -> str:
        """One line, as ``landscape info`` and ``landscape check`` print it after "RUN is"."""
        who = f"pid {self.pid} on {self.host}" if self.pid is not None else "its writer"
        return {
            "closed": ("closed by its writer" if self.reason is None
                       else f"closed by its writer ({self.reason})"),
            "stopped": f"closed by its writer, which stopped before the end ({self.reason})",
            "writing": f"being written ({who})",
            "ended": f"not closed: its writer ({who}) ended without closing it (killed or "
                     "crashed)",
            "open": (f"not closed: open for writing on another host ({who}; whether it "
                     "still runs cannot be told from here)" if self.host is not None else
                     "not closed, and its writer is not recorded (whether it still runs "
                     "cannot be told)"),
            "unknown": "in an unknown state (whether its writer closed it cannot be told)",
        }[self.state]

    def to_json(self) -> dict[str, Any]:
        """``{"state", "pid", "host", "reason"}``."""
        return {"state": self.state, "pid": self.pid, "host": self.host,
                "reason": self.reason}


REOPEN_WAIT = 0.2
"""Seconds between two looks at the flags of a file whose writer still runs and that reads
as closed: a structural change closes and reopens it within milliseconds."""


def _flags(path: Path) -> int | None:
    try:
        return open_flags(path)
    except OSError:
        return None


def writer_status(path: str | os.PathLike, pid: Any = None, host: Any = None,
                  closed_how: Any = None, posthoc: bool = False) -> WriterStatus:
    """The state of ``path``'s writer.

    Args:
        path: the run file.
        pid: its ``writer_pid`` attribute (None: not recorded).
        host: its ``writer_host`` attribute.
        closed_how: its ``closed_how`` attribute: why training stopped (None: finished).
        posthoc: its ``posthoc_writing`` attribute: the recorded writer is a post-hoc
            session (a surface, an analysis) of a run whose training had ended. Killed,
            it reads as training ended (``closed`` or ``stopped``), with a ``reason``
            that says the post-hoc session was killed and its results may be partial.

    Returns:
        The status. A process id reused since the writer died reads as ``writing``, as
        it does for the refusal to resume a file another process writes.
    """
    path = Path(path)
    pid = int(pid) if pid is not None and int(pid) > 0 else None
    host = None if host is None else str(host)
    flags = _flags(path)
    if flags is None:
        return WriterStatus("unknown", pid, host)
    if flags == 0 and running_here(pid, host):
        # a live writer closes the file for a moment to add a table or a surface (out of
        # SWMR mode and back, milliseconds): look again before calling it closed
        time.sleep(REOPEN_WAIT)
        flags = _flags(path)
    if flags == 0:
        if closed_how:
            return WriterStatus("stopped", pid, host, str(closed_how))
        return WriterStatus("closed", pid, host)
    if str(path.resolve()) in WRITING:  # this process writes it
        return WriterStatus("writing", os.getpid(), socket.gethostname())
    if pid is None or host is None:
        return WriterStatus("open", pid, host)
    if host != socket.gethostname():
        return WriterStatus("open", pid, host)
    if pid_alive(pid):
        return WriterStatus("writing", pid, host)
    if posthoc:  # a surface or analysis killed after training: training's state stands
        killed = "a post-hoc session (surface, analyze) was killed: its results may be partial"
        return (WriterStatus("stopped", pid, host, f"{closed_how}; then {killed}")
                if closed_how else WriterStatus("closed", pid, host, killed))
    return WriterStatus("ended", pid, host)


def stopped_how(err: BaseException | None) -> str | None:
    """Why a run stopped, for the run file's ``closed_how``; None when it finished.

    Args:
        err: what ended the monitored block (None: it ended normally).

    Returns:
        The exception's own ``stopped_how`` string when it has one (the command line's
        SIGTERM, raised as a ``KeyboardInterrupt``: "stopped by SIGTERM"),
        ``"stopped by Ctrl-C"`` for a ``KeyboardInterrupt``, else the exception in one
        line; None without one.
    """
    if err is None:
        return None
    said = getattr(err, "stopped_how", None)  # an exception that says (the CLI's SIGTERM)
    if isinstance(said, str):
        return said
    if isinstance(err, KeyboardInterrupt):
        return "stopped by Ctrl-C (KeyboardInterrupt)"
    if isinstance(err, SystemExit) and err.code in (None, 0):
        return None  # sys.exit(0) inside the block: a normal end
    return f"stopped on {type(err).__name__}: {err}"[:500]
