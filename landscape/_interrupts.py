"""Ctrl-C and SIGTERM during a monitored run: the run file keeps every completed row.

:class:`InterruptGuard` is installed by :meth:`landscape.Monitor.start` (in the main thread
only; signal handlers cannot be set elsewhere) and removed by :meth:`~landscape.Monitor.close`.
On SIGINT or SIGTERM it flushes the run file and then does what would have happened
without it:

* a signal that arrives while the monitor is inside ``step`` (computing and appending a
  step's rows) is held until the step ends, so no row is left half-written; a second
  SIGINT while one is held acts at once (press Ctrl-C twice to stop without waiting);
* a previous Python handler (Python's own ``KeyboardInterrupt`` for SIGINT, Lightning's
  SIGTERM handler, your own) is called after the flush;
* a signal whose previous action was the default one (SIGTERM usually) closes the run file
  and re-raises the signal with the default action, so the process ends as it would have
  (killed by SIGTERM, exit status 143 in a shell); an ignored signal stays ignored.

The rows reach the file through the store's ordinary flush; a process killed by SIGKILL
keeps only the rows already flushed, which the store's crash recovery reads back
(``docs/file-format.md``). Python's ``signal`` module documentation describes when handlers
run: between bytecode instructions of the main thread.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["InterruptGuard"]

try:  # CPython: the handler as set, without signal.getsignal's enum lookup (~10 us a call)
    from _signal import getsignal as _getsignal_raw
except ImportError:  # pragma: no cover - other interpreters
    _getsignal_raw = signal.getsignal

_INSTALLED: list[InterruptGuard] = []  # guards with handlers installed, oldest first

SIGNALS: tuple[int, ...] = tuple(
    s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s
)


class InterruptGuard:
    """Flush (and, for a default-action signal, close) a run file on SIGINT/SIGTERM.

    Args:
        flush: called on a signal before the previous handler runs.
        close: called before a signal with the default action ends the process.
    """

    def __init__(self, flush: Callable[[], None], close: Callable[[], None]) -> None:
        self._flush = flush
        self._close = close
        #: the signal whose default action ends the process, set before ``close`` runs
        self.stopped_by: str | None = None
        self._previous: dict[int, Any] = {}
        self._depth = 0
        self._held: tuple[int, Any] | None = None
        self._acting = False  # inside _act: a handler chain that loops back stops here

    def install(self) -> InterruptGuard:
        """Install the handlers (a no-op outside the main thread).

        Returns:
            The guard.
        """
        if self._previous or threading.current_thread() is not threading.main_thread():
            return self
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
            except (ValueError, OSError):  # pragma: no cover - embedded interpreters
                self._previous.pop(sig, None)
        if self._previous:
            _INSTALLED.append(self)
        return self

    def ensure(self) -> None:
        """Put the handlers back where something replaced them since :meth:`install`.

        Jupyter's kernel sets SIGINT's handler before every cell and puts its own back
        after it, which drops one installed in an earlier cell: the monitor calls this at
        every step. The replacing handler becomes the one called after the flush.
        """
        if not self._previous or threading.current_thread() is not threading.main_thread():
            return
        guards = [g._handle for g in _INSTALLED]
        for sig in list(self._previous):
            with contextlib.suppress(ValueError, OSError, TypeError):
                current = _getsignal_raw(sig)
                # another monitor's handler, installed after ours, calls ours after its
                # flush: taking it as our previous one would make the two call each other
                if current != self._handle and current not in guards:
                    self._previous[sig] = signal.getsignal(sig)  # SIG_DFL as the enum
                    signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Restore the previous handlers where ours is still the installed one.

        Where a guard installed after this one chains to ours (two monitors closed in the
        order they were opened), that guard chains to our previous handler instead, so
        neither a closed monitor's handler nor a lost user handler stays in the chain.
        """
        previous, self._previous = self._previous, {}
        if self in _INSTALLED:
            _INSTALLED.remove(self)
        for sig, prev in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                if signal.getsignal(sig) == self._handle:
                    signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
                    continue
            for later in _INSTALLED:
                if later._previous.get(sig) == self._handle:
                    later._previous[sig] = prev

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold signals until the block ends (a monitor step), then act on them."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._held is not None:
                held, self._held = self._held, None
                self._act(*held)

    def _handle(self, signum: int, frame: Any) -> None:
        if self._depth > 0 and self._held is None:
            self._held = (signum, frame)
            return
        self._held = None
        self._act(signum, frame)

    def _act(self, signum: int, frame: Any) -> None:
        if self._acting:  # a chain of handlers that came back here: act as the default
            prev = signal.SIG_DFL
        else:
            prev = self._previous.get(signum, signal.SIG_DFL)
        self._acting = True
        try:
            self._act_after(prev, signum, frame)
        finally:
            self._acting = False

    def _act_after(self, prev: Any, signum: int, frame: Any) -> None:
        with contextlib.suppress(Exception):
            self._flush()
        if prev is signal.SIG_IGN:
            return
        if callable(prev):
            prev(signum, frame)
            return
        # the default action (SIG_DFL, or None for a handler not set from Python)
        if signum == getattr(signal, "SIGINT", None):
            raise KeyboardInterrupt
        self.stopped_by = signal.Signals(signum).name  # what the close records
        with contextlib.suppress(Exception):
            self._close()
        self.uninstall()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
