"""The run writer: validated, buffered appends of rows, findings and surface points.

Rows are buffered in memory and written every ``flush_every`` rows and points or
``flush_seconds`` seconds, on :meth:`RunWriter.flush`, on :meth:`RunWriter.close`, when
an exception leaves the ``with`` block and when the interpreter exits with the writer
still open; each table's fields go before its ``step`` column, so a reader only ever sees
whole rows (``docs/file-format.md``). Inside :meth:`RunWriter.one_step` the automatic
flushes wait for the end of the block, so a step's rows reach the file together.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import shutil
import socket
import sys
import time
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from landscape._checks import run_path
from landscape._errors import RunFileError, StepOrderError
from landscape.findings import Finding, user_stacklevel
from landscape.store.backends import Backend, H5Backend, MemoryBackend
from landscape.store.format import (
    CHECKPOINT_FIELDS,
    CHECKPOINTS_TABLE,
    DISK_MARGIN,
    FINDING_FIELDS,
    FINDINGS_TABLE,
    LOCKING,
    METRICS_GROUP,
    FieldsLike,
    FieldSpec,
    SurfaceData,
    _attr_value,
    _describe,
    _encode,
    _finding_row,
    _h5_reason,
    _root_attrs,
    normalize_fields,
    plain_name,
    resumed_after,
    step_value,
)
from landscape.store.reader import Run, written_by_training
from landscape.store.recovery import (
    WRITING,
    holds_nothing,
    open_flags,
    open_for_reading_here,
    open_for_writing,
    read_here_message,
    refuse_to_replace_with_a_run,
    writers_excluded,
)
from landscape.store.writer_status import stopped_how

__all__ = ["RunWriter", "close_writers"]


@dataclass
class _Pending:
    steps: list[int] = field(default_factory=list)
    cols: dict[str, list[np.ndarray]] = field(default_factory=dict)


ENDED_UNCLOSED = "its writer ended without closing the file (killed or crashed)"
"""The ``closed_how`` a post-hoc session records for a training writer it found killed."""


def _left_open(path: Path) -> bool:
    """Whether the file's writer left it open (killed): its consistency flags are set."""
    try:
        return bool(open_flags(path))
    except OSError:
        return False


def _last_or_none(steps: np.ndarray) -> int | None:
    return int(steps[-1]) if len(steps) else None


_OPEN: weakref.WeakSet[RunWriter] = weakref.WeakSet()  # file writers not closed yet
_EVENT_TABLES = frozenset({FINDINGS_TABLE, CHECKPOINTS_TABLE, f"{METRICS_GROUP}/probe"})
"""Tables whose rows are events a step's rollback keeps (:meth:`RunWriter.one_step`)."""
_STRUCTURE_BYTES = 64 * 2**10  # room a new table or field takes (its datasets' first chunks)


@atexit.register
def _close_at_exit() -> None:
    """Close the writers left open at interpreter exit (no ``close()``, an uncaught error).

    The uncaught error is recorded as why the run stopped. In an interactive session
    ``sys.last_value`` is the last error any input showed, a typo after training as much as
    training's crash: the run is recorded as stopped, with that error named as shown, not
    as what ended the program.

    ``__del__`` cannot: at shutdown h5py can no longer import what it needs. Registered
    after h5py's own exit handler, this one runs before it.
    """
    uncaught = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    how = None
    if uncaught is not None and _interactive_session():
        # the last error any input showed (a typo after training, or training's own crash,
        # also a script's under python -i): which one ended training is unknown
        message = f"{type(uncaught).__name__}: {uncaught}".rstrip(": ")
        how = ("the interactive session ended with the run still open, after an error it "
               f"showed ({message}); close the monitor, or use its with block, to record how "
               "training ended")[:500]
    elif isinstance(uncaught, KeyboardInterrupt):
        how = stopped_how(uncaught)  # Ctrl-C, whose message is empty
    elif uncaught is not None:
        message = str(uncaught)
        how = (f"the program ended on an uncaught {type(uncaught).__name__}"
               + (f": {message}" if message else ""))[:500]
    for writer in list(_OPEN):
        with contextlib.suppress(Exception):
            writer.close(how=how)


def _interactive_session() -> bool:
    """Python's prompt (also ``python -i``), IPython or Jupyter: an error shown ends nothing."""
    if hasattr(sys, "ps1") or sys.flags.interactive:
        return True
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    return get_ipython is not None and get_ipython() is not None


def close_writers(path: str | os.PathLike | None = None) -> int:
    """Close the run files this process still writes: all of them, or those at ``path``.

    For a writer no variable holds any more (a notebook cell run again whose first monitor
    an error's traceback keeps alive): a new writer of its file is refused until it closes.

    Args:
        path: the run file (None: every open writer).

    Returns:
        How many writers were closed.
    """
    want = None if path is None else str(Path(path).resolve())
    closed = 0
    for writer in list(_OPEN):
        if writer.path is not None and (want is None or str(writer.path.resolve()) == want):
            writer.close()
            closed += 1
    return closed


def unflushed_rows(path: str | os.PathLike) -> int:
    """The rows this process's open writers of ``path`` hold and have not written yet."""
    want = str(Path(path).resolve())
    return sum(w._n_pending for w in list(_OPEN)
               if w.path is not None and str(w.path.resolve()) == want)


SURFACE_ELSEWHERE = (
    "choose another name (on the command line --name) or another run file, or delete the "
    "stored surface and its points (RunWriter.remove_surface; on the command line "
    "--replace)"
)
"""What a refusal to resume a surface of that name offers instead (the store and the grid)."""


class RunWriter:
    """Append-only writer of a run, to an HDF5 file or (``path=None``) to memory.

    Args:
        path: the run file, or None for the in-memory twin.
        mode: ``"a"`` creates the file or resumes an existing run after its last
            committed step; ``"w"`` starts a new file (overwriting); ``"x"`` fails if the
            file exists.
        config: JSON-able run configuration stored in the root ``config`` attribute of a
            new run.
        truncate_from: on resume, drop every committed row with ``step >= truncate_from``
            (restarting from a checkpoint).
        flush_every: write the buffer after this many rows and surface points.
        flush_seconds: write the buffer when this long has passed since the last write.
        on_disk_full: what a write does when the disk holding the file lacks room for it
            and :data:`DISK_MARGIN` besides: ``"raise"`` a :class:`RunFileError`, or
            ``"stop"`` writing (one ``RuntimeWarning``; later rows are dropped, those
            written stay readable). HDF5 itself crashed the process on a full disk; the
            monitor stops, so that training goes on.
        posthoc: this session adds results computed after training (``landscape surface``,
            ``landscape analyze``) to the run. In a run a training session wrote (root
            ``trained``), the record of how training ended (``closed_how``:
            :mod:`~landscape.store.writer_status`) is training's: such a session neither
            clears it nor writes its own. In a run no training wrote, it is the run's
            writer as any other.

    Raises:
        ValueError: an unknown ``mode`` or ``flush_every < 1``.
        RunFileError: the file cannot be created, resumed, or is being written by another
            live process.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        mode: str = "a",
        config: Mapping | None = None,
        truncate_from: int | None = None,
        flush_every: int = 256,
        flush_seconds: float = 2.0,
        on_disk_full: str = "raise",
        posthoc: bool = False,
    ) -> None:
        run_path(path)
        if mode not in ("a", "w", "x"):
            raise ValueError(f"mode must be 'a', 'w' or 'x', got {mode!r}")
        if on_disk_full not in ("raise", "stop"):
            raise ValueError(f"on_disk_full must be 'raise' or 'stop', got {on_disk_full!r}")
        self.on_disk_full = on_disk_full
        self._full = False  # "stop": the disk filled up, nothing more is written
        if flush_every < 1:
            raise ValueError("flush_every must be >= 1")
        self.flush_every = int(flush_every)
        self.flush_seconds = float(flush_seconds)
        self._pending: dict[str, _Pending] = {}
        self._pending_points: dict[str, list[tuple[tuple, dict[str, float]]]] = {}
        self._known_surfaces: set[str] = set()
        self._scalars: dict[str, list[bool]] = {}
        self._n_pending = 0
        self._last_flush = time.monotonic()
        self._closed = False
        self._holding = 0  # nesting depth of one_step(): automatic flushes wait
        # how often each table's buffered rows were written, and its last step in the file
        # then (one_step's rollback keeps what reached the file)
        self._writes: dict[str, int] = {}
        self._last_flushed: dict[str, int | None] = {}
        self._flushing = False  # inside _flush_pending (a signal handler's flush waits)
        self._appending: tuple[str, int] | None = None  # the table and its rows before
        self._complete = False  # the one_step block's rows are the whole step
        self._urgent = False  # an error finding waits for the end of its step, no longer
        self._posthoc = posthoc
        self._training_run = False  # (posthoc) a training session wrote the run
        self._wrote = False  # this session wrote rows or points
        self._resumed = False  # this session reopened a run that held rows
        self.refused = False  # a step of this session was refused (StepOrderError)
        self._how_before: str | None = None  # (resumed) the run's closed_how when reopened
        self.path = None if path is None else Path(path)

        if self.path is None:
            self._backend: Backend = MemoryBackend(_root_attrs(config))
            self._init_tables()
        else:
            self._backend = self._open_file(mode, config)
            WRITING.add(str(self.path.resolve()))
            _OPEN.add(self)
        self._fields = {p: self._backend.table_fields(p) for p in self._backend.table_paths()}
        # each table's last step, read alone (not the whole column of a long run)
        self._last = {p: _last_or_none(self._backend.steps(p, start=max(
            0, self._backend.rows(p) - 1))) for p in self._fields}
        #: the first step whose rows ``truncate_from`` dropped (None: none dropped)
        self.dropped_from: int | None = None
        if truncate_from is not None:
            self._truncate(int(truncate_from))

    @classmethod
    def memory(cls, config: Mapping | None = None, **kwargs: Any) -> RunWriter:
        """The in-memory twin: same interface, nothing on disk.

        Args:
            config: JSON-able run configuration.
            **kwargs: ``flush_every``, ``flush_seconds`` as for :class:`RunWriter`.

        Returns:
            A writer whose :meth:`run` reads the rows from memory.
        """
        return cls(None, config=config, **kwargs)

    # -- opening

    def _open_file(self, mode: str, config: Mapping | None) -> H5Backend:
        """Open or create the run file, recorded as its writer once in SWMR mode.

        Under :func:`~landscape.store.recovery.writers_excluded`: another process that
        opens it at the same moment finds it written by this one (and is refused).
        """
        assert self.path is not None
        with writers_excluded(self.path):
            return self._open_file_excluded(mode, config)

    def _open_file_excluded(self, mode: str, config: Mapping | None) -> H5Backend:
        path = self.path
        assert path is not None
        if path.is_dir():
            raise RunFileError(f"{path}: is a directory, expected a run file (.h5)")
        if path.exists() and mode == "x":
            raise RunFileError(f"{path}: already exists")
        if str(path.resolve()) in WRITING:
            gc.collect()  # a writer dropped without close() (a cell run again) closes now
        if str(path.resolve()) in WRITING:
            raise RunFileError(
                f"{path}: is already open for writing in this process (a Monitor or "
                "RunWriter not closed yet, e.g. from a notebook cell run before): close() it "
                "first (landscape.store.close_writers(path) when you no longer hold it), or "
                "write to another path")
        # a file a writer left before its first flush holds nothing: started anew
        if path.exists() and mode == "a" and not holds_nothing(path):
            ended = self._posthoc and _left_open(path)  # (open_for_writing repairs it)
            backend = H5Backend(open_for_writing(path), writable=True)
            self._backend = backend
            _warn_other_model(path, backend.file.attrs.get("config"), config)
            self._resumed = True
            self._mark_owner(backend, ended)
            self._trim_partial_rows(backend)
            self._note_resume(backend, None)
            backend.flush()
            if not backend.file.swmr_mode:  # a reader of this process keeps the file open
                backend.file.swmr_mode = True
            return backend
        if not path.parent.exists():
            raise RunFileError(f"{path}: directory {path.parent} does not exist")
        refuse_to_replace_with_a_run(path)
        try:
            f = h5py.File(path, "w", libver="latest", locking=LOCKING)
        except OSError as err:
            if open_for_reading_here(err):
                raise RunFileError(read_here_message(path)) from None
            raise RunFileError(f"{path}: cannot create ({_h5_reason(err)})") from None
        for key, value in _root_attrs(config).items():
            f.attrs[key] = value
        backend = H5Backend(f, writable=True)
        self._backend = backend
        self._mark_owner(backend)
        self._init_tables()
        backend.flush()
        if not backend.file.swmr_mode:  # a reader of this process keeps the file open
            backend.file.swmr_mode = True
        return backend

    def _mark_owner(self, backend: H5Backend, ended: bool = False) -> None:
        """Record this process as the writer, and what its session means for the state.

        A training session's writer marks the run ``trained`` and clears the previous
        session's stop (a resume). A post-hoc session's (``posthoc``) leaves how training
        ended to training: on a run a training session wrote it never clears that record,
        and when the last writer was killed (``ended``: the file was left open) and was
        no post-hoc session of its own, it records that training's writer ended unclosed,
        which the repair of the file would otherwise hide. On a run only post-hoc tools
        wrote, its own stop or finish is recorded at :meth:`close`.
        """
        attrs = backend.file.attrs
        attrs["writer_pid"] = os.getpid()
        attrs["writer_host"] = socket.gethostname()
        if not self._posthoc:
            attrs["trained"] = True
            if "closed_how" in attrs:
                self._how_before = str(attrs["closed_how"])
            for name in ("closed_how", "posthoc_writing"):  # a resume: stopped no more
                if name in attrs:
                    del attrs[name]
            return
        self._training_run = written_by_training(attrs, backend)
        if "trained" not in attrs:  # a run of this version says which it is
            attrs["trained"] = self._training_run
        if (self._training_run and ended and "closed_how" not in attrs
                and not attrs.get("posthoc_writing", False)):
            attrs["closed_how"] = ENDED_UNCLOSED
        if self._training_run:  # a kill of this session is not training's
            attrs["posthoc_writing"] = True
        elif "posthoc_writing" in attrs:
            del attrs["posthoc_writing"]

    @staticmethod
    def _note_resume(backend: Backend, dropped_from: int | None) -> None:
        """Record where a resumed session's rows begin (the root ``resumed_after``).

        ``resumed_after`` lists, in order, the last step of any metric table when a writer
        reopened the run: the rows after each belong to a later session, whose sentinels,
        secants and every-n-th-call rhythms started over (the plots read a NaN there as
        "not measured yet", not as a blow-up). A truncation (``dropped_from``) drops the
        entries past it and notes the new last step instead.
        """
        attrs = backend.root_attrs()
        noted = resumed_after(attrs)
        if dropped_from is not None:
            if "resumed_after" not in attrs:
                return  # a file written in one session: nothing to amend
            noted = [b for b in noted if b < dropped_from]
        last = backend.last_metric_step()
        if last is not None and last not in noted:
            noted.append(last)
        text = json.dumps(sorted(noted))
        if text != attrs.get("resumed_after", "[]"):
            backend.set_root_attrs({"resumed_after": text})

    @staticmethod
    def _trim_partial_rows(backend: H5Backend) -> None:
        for p in backend.table_paths():
            backend.truncate(p, backend.file[p]["step"].shape[0])

    def _init_tables(self) -> None:
        self._backend.create_table(FINDINGS_TABLE, FINDING_FIELDS, {"kind": "findings"})
        self._backend.create_table(CHECKPOINTS_TABLE, CHECKPOINT_FIELDS, {"kind": "checkpoints"})

    def _truncate(self, first_dropped: int) -> None:
        for p in self._fields:
            steps = self._backend.steps(p)
            n = int(np.searchsorted(steps, first_dropped, side="left"))
            if n < len(steps):
                first = int(steps[n])
                self.dropped_from = first if self.dropped_from is None else min(
                    self.dropped_from, first)
            self._backend.truncate(p, n)
            self._last[p] = self._last_flushed[p] = _last_or_none(steps[:n])
        if self.path is not None:
            self._note_resume(self._backend, first_dropped)
        self._backend.flush()

    # -- declaring

    def declare(
        self,
        name: str,
        fields: FieldsLike,
        *,
        cls: str = "",
        params: Mapping | None = None,
        schedule: str = "",
        context: Sequence[str] = (),
    ) -> None:
        """Declare metric ``name`` with its fields; idempotent when the fields match.

        Declared again with a string field wider than stored, the field is widened (its
        rows kept); asked narrower, it stays as wide as stored.

        Args:
            name: the metric name (the group ``/metrics/<name>``).
            fields: its fields, as :func:`~landscape.store.normalize_fields` accepts.
            cls: the class that computes it, recorded in the group's attributes.
            params: its settings (JSON-able), recorded in the group's attributes.
            schedule: its schedule, recorded in the group's attributes.
            context: the fields that record a row's conditions, not a measurement (the
                ``context`` attribute; plots leave them out by default).

        Raises:
            ValueError: an invalid name or fields, or a ``context`` field not among them.
            RunFileError: the run already has the metric with other fields, or the writer
                is closed.
        """
        self._check_open()
        specs = self.check_declaration(name, fields, context)
        path = f"{METRICS_GROUP}/{name}"
        if path in self._fields:
            stored = self._fields[path]
            added = {n: spec for n, spec in specs.items() if n not in stored}
            wider = _wider_strings(stored, specs)
            if added and _can_add(stored, specs, added):  # a field a newer version records
                self._flush_pending()
                if self._room_for(_STRUCTURE_BYTES):
                    self._backend.add_fields(path, added)
                    new_context = [n for n in context if n in added]
                    if new_context:  # (a context field added: the plots leave it out)
                        try:
                            was = list(json.loads(str(
                                self._backend.table_attrs(path).get("context", "[]"))))
                        except ValueError:
                            was = []
                        self._backend.set_table_attrs(
                            path, {"context": json.dumps([*was, *new_context])})
                self._fields[path] = {**stored, **added}
                self._scalars.pop(path, None)
            elif wider is not None:  # strings as wide or wider: the rows kept, widened
                if wider:
                    self._flush_pending()
                    rows = self._backend.rows(path)  # the column is written anew
                    size = sum(rows * np.dtype(spec.dtype).itemsize for spec in wider.values())
                    if self._room_for(_STRUCTURE_BYTES + size):
                        self._backend.widen_strings(path, wider)
                    self._fields[path] = {**stored, **wider}
                    self._scalars.pop(path, None)
            if schedule:
                self._note_schedule(path, schedule)
            return
        attrs = {
            "kind": "metric",
            "class": cls,
            "params": json.dumps(dict(params or {}), default=str),
            "schedule": schedule,
        }
        if context:
            attrs["context"] = json.dumps(list(context))
        if not self._holding:  # inside one_step() the step's rows stay together
            self._flush_pending()
        if self._room_for(_STRUCTURE_BYTES):  # on a full disk ("stop") known, not written
            self._backend.create_table(path, specs, attrs)
        self._fields[path] = specs
        self._last[path] = None

    def check_declaration(self, name: str, fields: FieldsLike,
                          context: Sequence[str] = ()) -> dict[str, FieldSpec]:
        """Check what :meth:`declare` would refuse, changing nothing; the fields' specs.

        A resumed monitor checks every metric before ``truncate_from`` drops rows: a
        metric refused after the drop had cost the run its rows for nothing.

        Raises:
            ValueError: an invalid name or fields, or a ``context`` field not among them.
            RunFileError: the run already has the metric with other fields.
        """
        if not plain_name(name):
            raise ValueError(f"invalid metric name {name!r} (non-empty, no '/', not '.' or "
                             "'..')")
        specs = normalize_fields(fields)
        unknown = [c for c in context if c not in specs]
        if unknown:
            raise ValueError(f"context: {', '.join(map(repr, unknown))} not among the fields")
        stored = self._fields.get(f"{METRICS_GROUP}/{name}")
        if stored is not None and stored != specs:
            added = {n: spec for n, spec in specs.items() if n not in stored}
            if not (added and _can_add(stored, specs, added)) \
                    and _wider_strings(stored, specs) is None:
                raise RunFileError(
                    f"metric {name!r} is already in the run with fields "
                    f"{_describe(stored)}, not {_describe(specs)} (other settings than the "
                    "run was recorded with, such as k; write to another file, or start this "
                    "one over: mode='w', on the command line --overwrite)"
                )
        return specs

    def truncate_from(self, step: int) -> None:
        """Drop every committed row with ``step`` or later (``RunWriter(truncate_from=)``).

        Sets :attr:`dropped_from`. For a caller that checks its declarations first
        (:meth:`check_declaration`), so that a refused resume drops nothing.
        """
        self._check_open()
        self._flush_pending()
        self._truncate(int(step))

    def _note_schedule(self, path: str, schedule: str) -> None:
        """Add a resumed metric's new schedule to its table's ``schedule`` attribute.

        A run resumed with another schedule for a metric recorded its later rows on that
        schedule while the table still named the first: the attribute now reads
        ``"every(5); every(2) after step 19"`` (19: the table's last row before it), and
        ``schedules`` holds the same as JSON, ``[["every(5)", null], ["every(2)", 19]]``,
        which is what is compared (a schedule's own text may hold anything). A table
        without rows takes the new schedule alone.
        """
        if path not in self._backend.table_paths():  # a full disk kept it from the file
            return
        attrs = self._backend.table_attrs(path)
        try:
            history = json.loads(str(attrs["schedules"]))
        except (KeyError, ValueError):
            history = [[str(attrs.get("schedule", "")), None]]
        if history and history[-1][0] == schedule:
            return
        last = self._last.get(path)
        history = [[schedule, None]] if last is None or not history[0][0] else \
            [*history, [schedule, last]]
        text = "; ".join(s if at is None else f"{s} after step {at}" for s, at in history)
        if not self._holding:
            self._flush_pending()
        if self._room_for(_STRUCTURE_BYTES):
            self._backend.set_table_attrs(path, {"schedules": json.dumps(history),
                                                 "schedule": text})

    # -- appending

    def append(self, name: str, step: int, values: Mapping[str, Any]) -> None:
        """Append one row of metric ``name`` at ``step`` (strictly after its last step).

        Args:
            name: a declared metric.
            step: the row's step.
            values: one value per declared field (numbers, arrays or tensors).

        Raises:
            KeyError: the metric was not declared.
            StepOrderError: ``step`` does not come after the metric's last step.
            ValueError: the fields do not match the declaration, or a value its shape.
        """
        path = f"{METRICS_GROUP}/{name}"
        if path not in self._fields:
            raise KeyError(f"metric {name!r} was not declared")
        if not isinstance(values, Mapping):
            raise TypeError(f"values: expected a mapping {{field: value}}, got "
                            f"{type(values).__name__}")
        self._add_row(path, step_value(step), values, strict=True)

    def add_finding(self, finding: Finding) -> None:
        """Append a finding to ``/findings`` (steps non-decreasing), its ``extra`` as JSON.

        An error-severity finding is written to the file right away (at the end of the
        step inside :meth:`one_step`): the process may be about to die of what it reports.

        Args:
            finding: the finding.

        Raises:
            StepOrderError: its step comes before the last finding's.
        """
        if finding.severity == "error":  # the run may be about to die: on disk at once
            self._urgent = True
        row = _finding_row(finding, self._fields[FINDINGS_TABLE])
        self._add_row(FINDINGS_TABLE, int(finding.step), row, strict=False)

    def flush_soon(self) -> None:
        """Flush at the end of the step being written (at once outside :meth:`one_step`).

        For rows worth having on disk before the next automatic flush, as an error
        finding is: the first failure of a metric.
        """
        self._urgent = True
        if not self._holding and not self._closed:
            self._flush_if_due()

    def record_checkpoint(self, step: int, source: str) -> None:
        """Record that ``step`` was computed from checkpoint ``source``.

        Args:
            step: the step (after the last recorded one).
            source: the checkpoint's path or name.
        """
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"source: expected the checkpoint's path or name, got "
                            f"{type(source).__name__} {source!r}")
        self._add_row(CHECKPOINTS_TABLE, step_value(step), {"path": os.fspath(source)},
                      strict=True)

    def last_step(self, name: str) -> int | None:
        """Last step appended to metric ``name`` (committed or buffered), or None.

        Args:
            name: the metric.

        Returns:
            The step, or None when the metric has no rows or is not declared.
        """
        return self._last.get(f"{METRICS_GROUP}/{name}")

    def declared(self, name: str) -> bool:
        """Whether metric ``name`` has a table: declared here, or in the file resumed.

        Args:
            name: the metric.
        """
        return f"{METRICS_GROUP}/{name}" in self._fields

    def last_recorded_step(self) -> int | None:
        """The last step of any table: every metric's, the findings', the checkpoints'.

        Returns:
            The step, or None when nothing has a row.
        """
        steps = [s for s in self._last.values() if s is not None]
        return max(steps) if steps else None

    def _add_row(self, path: str, step: int, values: Mapping[str, Any], strict: bool) -> None:
        self._check_open()
        specs = self._fields[path]
        last = self._last[path]
        if last is not None and (step <= last if strict else step < last):
            self.refused = True
            raise StepOrderError(
                f"{path}: step {step} does not come after the last step {last} "
                f"(to restart from a checkpoint, reopen with truncate_from={step})"
            )
        if values.keys() != specs.keys():  # a set comparison; the slow check names the fields
            missing = [n for n in specs if n not in values and n != "step"]
            extra = [n for n in values if n not in specs and n != "step"]
            if missing or extra:
                raise ValueError(
                    f"{path}: row fields do not match the declaration"
                    + (f"; missing {', '.join(missing)}" if missing else "")
                    + (f"; unknown {', '.join(extra)}" if extra else "")
                )
        scalars = self._scalars.get(path)
        if scalars is None:  # per field: a float scalar, whose float values skip _encode
            scalars = self._scalars[path] = [
                spec.shape == () and np.dtype(spec.dtype).kind == "f" for spec in specs.values()
            ]
        try:
            row = [
                np.asarray(v, dtype=spec.dtype) if fast and type(v) is float
                else _encode(v, spec, n)
                for (n, spec), fast in zip(specs.items(), scalars)
                for v in (values[n],)
            ]
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        pending = self._pending.get(path)
        if pending is None:
            pending = self._pending[path] = _Pending(cols={n: [] for n in specs})
        pending.steps.append(step)
        for col, arr in zip(pending.cols.values(), row):
            col.append(arr)
        self._last[path] = step
        self._n_pending += 1
        if not self._holding:
            self._flush_if_due()

    @contextlib.contextmanager
    def one_step(self) -> Iterator[None]:
        """Group the rows appended inside the block: an automatic flush waits for its end.

        The monitor appends a step's rows inside it, so a process killed between two
        automatic flushes leaves whole steps in the file, never the first rows of one. An
        exception that leaves the outermost block before :meth:`step_complete` (a second
        Ctrl-C, a ``KeyboardInterrupt`` raised in the loss function while a metric runs, a
        metric's error under ``strict=True``) drops the metric rows appended inside it,
        so no metric holds half a step (the rest was never measured). Events stay: the
        findings, the checkpoints and the probe's row (the monitor keeps its finding and
        its probe). After an explicit :meth:`flush` inside the block the rows it wrote
        stay, and those appended after it go. Surface points are not rows: they are kept.
        """
        outermost = not self._holding
        if outermost:
            self._complete = False
            mark = (dict(self._writes),
                    {path: len(p.steps) for path, p in self._pending.items()}, dict(self._last))
        self._holding += 1
        try:
            yield
        except BaseException:
            if outermost and not self._closed and not self._complete:
                self._drop_step(*mark)
            raise
        finally:
            self._holding -= 1
            if not self._holding and not self._closed:
                self._flush_if_due()

    def step_complete(self) -> None:
        """Mark the rows of the :meth:`one_step` block as the whole step.

        An exception after it (a callback that raises to stop training at a finding)
        leaves them to be written.
        """
        self._complete = True

    def _drop_step(self, writes: Mapping[str, int], kept: Mapping[str, int],
                   last: Mapping[str, int | None]) -> None:
        """Forget the metric rows buffered after ``kept`` rows per table (:meth:`one_step`).

        ``last`` steps again. A table written inside the step (a flush, also one that an
        exception cut short after some tables) keeps what reached the file, and every row
        buffered since (all the step's) goes; its last step is the file's.
        """
        for path, p in self._pending.items():
            if path in _EVENT_TABLES:
                continue
            n = kept.get(path, 0) if self._writes.get(path, 0) == writes.get(path, 0) else 0
            self._n_pending -= len(p.steps) - n
            del p.steps[n:]
            for col in p.cols.values():
                del col[n:]
        for path in self._last:
            if path not in _EVENT_TABLES:
                written = self._writes.get(path, 0) != writes.get(path, 0)
                self._last[path] = self._last_flushed.get(path) if written else last.get(path)

    def _flush_if_due(self) -> None:
        """Flush after an error finding, ``flush_every`` rows and points or ``flush_seconds``."""
        if (
            self._urgent
            or self._n_pending >= self.flush_every
            or time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()

    def _flush_pending(self) -> None:
        if self._flushing:  # a signal handler's flush inside this one: this one writes
            return
        self._flushing = True
        try:
            self._write_pending()
        finally:
            self._flushing = False

    def _write_pending(self) -> None:
        tables = {path: (np.asarray(p.steps, np.int64), {n: np.stack(v) for n, v in p.cols.items()})
                  for path, p in self._pending.items() if p.steps}
        size = sum(steps.nbytes + sum(c.nbytes for c in cols.values())
                   for steps, cols in tables.values())
        size += 64 * sum(len(points) for points in self._pending_points.values())
        room = bool(tables or self._pending_points) and self._room_for(size)
        self._wrote = self._wrote or room
        for path, (steps, cols) in tables.items():
            if room:
                self._append_whole(path, steps, cols)
            # written (or dropped on a full disk, "stop"): an exception at a later table (a
            # second Ctrl-C, an I/O error) leaves the rest buffered, and the flush of close()
            # must not write this table's rows a second time (its steps would repeat: a
            # damaged file); a step's rollback sees the table as written
            self._writes[path] = self._writes.get(path, 0) + 1
            self._last_flushed[path] = int(steps[-1])
            self._n_pending -= len(self._pending.pop(path).steps)
        if room:
            for name, points in self._pending_points.items():
                self._backend.write_surface(name, points)
        self._pending.clear()
        self._pending_points.clear()
        self._n_pending = 0

    def _append_whole(self, path: str, steps: np.ndarray, cols: dict[str, np.ndarray]) -> None:
        """Append rows to one table; interrupted half-way, the table keeps its rows before.

        The backend writes the ``step`` column last, so rows count once it is written;
        between its resize and its values an exception would leave steps of 0 at the end.
        """
        before = self._backend.rows(path)
        self._appending = (path, before)
        try:
            self._backend.append_rows(path, steps, cols)
        except BaseException:
            self._cut_back()
            raise
        finally:
            self._appending = None

    def _cut_back(self) -> None:
        """Cut the table being appended back to its rows before (see :meth:`close`)."""
        if self._appending is not None:
            with contextlib.suppress(Exception):
                self._backend.truncate(*self._appending)
            self._appending = None

    def _room_for(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit on the file's disk with :data:`DISK_MARGIN` to spare.

        On ``"stop"`` the first shortage warns and stops every later write.

        Raises:
            RunFileError: the disk is short, with ``on_disk_full="raise"``.
        """
        if self._full:
            return False
        if self.path is None:
            return True
        try:  # the disk of the file itself, also when the path is a link to another
            free = shutil.disk_usage(self.path.resolve().parent).free
        except OSError:  # cannot tell: HDF5 says so if it fails
            return True
        if free >= DISK_MARGIN + 4 * nbytes:
            return True
        message = (f"{self.path}: {free / 2**20:.1f} MiB free on its disk, too little to write "
                   f"more ({DISK_MARGIN / 2**20:.0f} MiB must stay free after a write)")
        if self.on_disk_full == "raise":
            raise RunFileError(message)
        self._full = True
        warnings.warn(f"landscape: {message}: nothing more is written to it (training goes "
                      "on); what was written stays readable", RuntimeWarning,
                      stacklevel=user_stacklevel())
        return False

    # -- surfaces

    def create_surface(
        self,
        name: str,
        x: Sequence[float],
        y: Sequence[float] | None = None,
        *,
        fields: Sequence[str] = ("loss",),
        attrs: Mapping | None = None,
        arrays: Mapping[str, np.ndarray] | None = None,
    ) -> SurfaceData:
        """Create ``/surfaces/<name>`` (all points not yet computed) or resume it.

        Args:
            name: the surface's name.
            x: the grid along the first direction.
            y: the grid along the second direction (None for a 1-D surface).
            fields: the value grids to store.
            attrs: JSON-able attributes (directions, normalization, seed, ...).
            arrays: extra arrays (direction vectors, projected trajectory, ...).

        Returns:
            The stored surface; resuming, its ``done`` mask tells which points are
            already computed.

        Raises:
            RunFileError: an invalid name, or the surface exists with another grid or other
                fields.
        """
        self._check_open()
        if not plain_name(name):
            raise RunFileError(f"invalid surface name {name!r}: a non-empty name without '/'")
        xs = np.asarray(x, dtype=np.float64)
        ys = None if y is None else np.asarray(y, dtype=np.float64)
        shape = (len(xs),) if ys is None else (len(ys), len(xs))
        if name in self._backend.surface_names():
            existing = self._backend.read_surface(name)
            same = (
                existing.x.shape == xs.shape
                and np.allclose(existing.x, xs)
                and (existing.y is None) == (ys is None)
                and (ys is None or (existing.y.shape == ys.shape and np.allclose(existing.y, ys)))
                and list(existing.values) == list(fields)
            )
            if not same:
                def grid(x: np.ndarray, y: np.ndarray | None, names: Sequence[str]) -> str:
                    axes = [f"{len(c)} x on [{c[0]:.4g}, {c[-1]:.4g}]" if i == 0 else
                            f"{len(c)} y on [{c[0]:.4g}, {c[-1]:.4g}]"
                            for i, c in enumerate((x, y)) if c is not None and len(c)]
                    return f"{' by '.join(axes)}, of {', '.join(names)}"

                raise RunFileError(
                    f"surface {name!r} already exists in the run with a different grid or "
                    f"fields ({grid(existing.x, existing.y, list(existing.values))} stored; "
                    f"{grid(xs, ys, list(fields))} asked); {SURFACE_ELSEWHERE}"
                )
            return existing
        data = SurfaceData(
            name=name,
            x=xs,
            y=ys,
            values={f: np.full(shape, np.nan) for f in fields},
            done=np.zeros(shape, dtype=bool),
            attrs=dict(attrs or {}),
            arrays={k: np.asarray(v) for k, v in (arrays or {}).items()},
        )
        self._flush_pending()
        if not self._room_for(_STRUCTURE_BYTES + 16 * data.done.size):
            raise RunFileError(f"{self.path}: the disk is full; no room for surface {name!r}")
        self._backend.create_surface(data)
        self._backend.flush()
        return self._backend.read_surface(name)

    def remove_surface(self, name: str) -> bool:
        """Remove surface ``name`` and its points (to compute it again from scratch).

        Args:
            name: the surface's name.

        Returns:
            Whether the run held it.
        """
        self._check_open()
        self._flush_pending()  # its buffered points too, before the group goes
        self._known_surfaces.discard(name)
        if name not in self._backend.surface_names():
            return False
        self._backend.delete_surface(name)
        self._backend.flush()
        return True

    def write_surface(
        self, name: str, index: int | tuple[int, ...], values: Mapping[str, float]
    ) -> None:
        """Store the values at one grid point.

        Buffered like rows: written on the next flush (``flush_every`` rows and points,
        ``flush_seconds``, :meth:`flush`, :meth:`close`), each row's points in one write;
        a point not yet written when the process dies is recomputed on resume.

        Args:
            name: a created surface.
            index: ``i`` for a 1-D surface, ``(j, i)`` for a 2-D one.
            values: field values at the point; a field left out stays NaN.

        Raises:
            KeyError: no surface ``name``.
        """
        self._check_open()
        idx = tuple(int(i) for i in index) if isinstance(index, tuple) else (int(index),)
        if name not in self._known_surfaces:
            if name not in self._backend.surface_names():
                raise KeyError(f"no surface {name!r} (create_surface first)")
            self._known_surfaces.add(name)
        self._pending_points.setdefault(name, []).append(
            (idx, {k: float(v) for k, v in values.items()})
        )
        self._n_pending += 1
        self._flush_if_due()

    # -- lifecycle

    def flush(self) -> None:
        """Write buffered rows and make them visible to readers.

        Raises:
            RunFileError: the writer is closed.
        """
        self._check_open()
        self._flush_pending()
        if not self._full:
            self._backend.flush()
        self._last_flush = time.monotonic()
        self._urgent = False

    def close(self, how: str | None = None) -> None:
        """Write buffered rows and close the file; closing twice is harmless.

        Args:
            how: why the run stopped when it did not finish (an exception, a signal): kept
                in the root ``closed_how`` attribute, which tells a run that stopped from
                one that finished (:mod:`~landscape.store.writer_status`); None: finished.
        """
        if self._closed:
            return
        try:
            if self._flushing:  # a signal handler closes the file inside a flush (SIGTERM,
                # then the process ends): the table half appended goes back, the rest is
                # written now, as the interrupted flush would have done
                self._cut_back()
                self._flushing = False
            if getattr(self._backend, "lost", None) is None:  # (else the error said why)
                self._flush_pending()
                if not self._full:
                    self._backend.flush()
                    if self.path is not None:
                        with contextlib.suppress(Exception):  # the rows are out: kept
                            self._record_how(how)
        finally:
            if isinstance(self._backend, H5Backend):
                self._backend.close()
                if self.path is not None:
                    WRITING.discard(str(self.path.resolve()))
            self._closed = True
            _OPEN.discard(self)

    def _record_how(self, how: str | None) -> None:
        """At a clean close: how this session ended, where it is the run's to say."""
        attrs = self._backend.root_attrs()
        if self._posthoc:
            drop = ["posthoc_writing"] if "posthoc_writing" in attrs else []
            if not self._training_run:  # the run's own writer: its stop, or a finish
                if how is not None:
                    self._backend.set_root_attrs({"closed_how": str(how)[:500]})
                elif self._wrote and "closed_how" in attrs:  # resumed to its end
                    drop.append("closed_how")
            if drop:
                self._backend.del_root_attrs(drop)
        elif (how is not None and self.refused and self._resumed and not self._wrote
              and self.dropped_from is None):
            # a resume refused at its first step (StepOrderError: a notebook cell run again)
            # changed nothing: the run reads as before it, finished or stopped; any other
            # error before the first row (out of memory) is the session's stop, recorded
            if self._how_before is not None:
                self._backend.set_root_attrs({"closed_how": self._how_before})
        elif how is not None:
            self._backend.set_root_attrs({"closed_how": str(how)[:500]})

    def run(self) -> Run:
        """A read-only :class:`Run` view of what was written so far (flushes first).

        Returns:
            The run; for a closed file writer, the file opened anew.
        """
        if self._closed:
            if self.path is None:
                return Run(self._backend)
            return Run.open(self.path)
        self.flush()
        return Run(self._backend)

    def save_blob(self, name: str, data: bytes) -> None:
        """Store bytes a resumed run needs back (``/state/<name>``), replacing earlier ones.

        Args:
            name: the blob's name.
            data: its bytes.
        """
        self._check_open()  # buffered rows stay buffered: a step's rows go out together
        if self._room_for(len(data)):
            self._backend.write_blob(name, data)

    def load_blob(self, name: str) -> bytes | None:
        """The bytes :meth:`save_blob` stored under ``name`` (None: none).

        Args:
            name: the blob's name.

        Returns:
            The bytes, or None.
        """
        self._check_open()
        return self._backend.read_blob(name)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RunFileError(f"{self.description}: the run writer is closed")

    @property
    def description(self) -> str:
        """What the run is written to: the file path or ``<memory>``."""
        return self._backend.description

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a writer dropped without close() still saves its rows
        # (at interpreter exit h5py cannot run here any more: _close_at_exit does it)
        with contextlib.suppress(Exception):
            self.close()


def _wider_strings(stored: Mapping[str, FieldSpec], specs: Mapping[str, FieldSpec]
                   ) -> dict[str, FieldSpec] | None:
    """The string fields ``specs`` asks wider than ``stored``; None unless that is all.

    The same fields, equal but for the width of ``S`` fields: those asked wider are
    returned (to be widened, their rows kept), those asked as wide or narrower are kept as
    stored (their values fit). A monitor's ``unmeasured`` names outgrew the width of an
    earlier session on resume, and were cut ("a_rather_long...").
    """
    if set(stored) != set(specs) or stored == specs:
        return None
    wider: dict[str, FieldSpec] = {}
    for name, spec in specs.items():
        old = stored[name]
        if spec == old:
            continue
        if not (spec.is_string and old.is_string and spec.shape == old.shape):
            return None
        if np.dtype(spec.dtype).itemsize > np.dtype(old.dtype).itemsize:
            wider[name] = spec
    return wider


def _can_add(stored: Mapping[str, Any], specs: Mapping[str, Any],
             added: Mapping[str, Any]) -> bool:
    """Whether a table takes ``added``: every stored field kept as is, new ones float.

    Their rows written before are NaN, "not measured" (a metric that gained a field in a
    newer version, resuming a run file written by an older one).
    """
    kept = all(specs.get(n) == spec for n, spec in stored.items())
    return kept and all(np.dtype(spec.dtype).kind == "f" for spec in added.values())


def _warn_other_model(path: Path, stored: Any, config: Mapping | None) -> None:
    """Warn once when a run of another model is appended to ``path``.

    Compares the ``model`` class name and the trainable-parameter count ``n_parameters``
    the monitor stores in the run's configuration, where both the file and the new run
    have them; and its ``output_fn`` (which tensor of the output the logit metrics read),
    warned about on its own. A warning, not an error: a legitimate resume may change either (layers
    unfrozen in a second stage, ``torch.compile`` switched on), and a run that refused to
    start would stop training (under DDP, on rank 0 only).
    """
    try:
        old = json.loads(str(_attr_value(stored)))
    except (TypeError, ValueError, AttributeError):
        return
    if not isinstance(old, dict):
        return
    new = dict(config or {})
    if "output_fn" in old and "output_fn" in new and old["output_fn"] != new["output_fn"]:
        warnings.warn(
            f"landscape: {path} was recorded with output_fn={old['output_fn']} and this run "
            f"is appended with output_fn={new['output_fn']}: the logit metrics (sentinels, "
            "logits, taylor_radius) read another tensor of the model's output from here "
            "on; pass the same output_fn= as the run before", RuntimeWarning,
            stacklevel=user_stacklevel())
    keys = [k for k in ("model", "n_parameters") if k in old and k in new]
    if all(old[k] == new[k] for k in keys):
        return
    warnings.warn(
        f"landscape: {path} holds a run of {old.get('model')} with "
        f"{old.get('n_parameters')} trainable parameters and this run ({new.get('model')}, "
        f"{new.get('n_parameters')}) is appended to it; pass mode='w' (the command line: "
        "--overwrite) to start the file over, or another path, if it is not the same run",
        RuntimeWarning, stacklevel=user_stacklevel(),
    )
