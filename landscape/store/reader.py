"""The run reader: a read-only view of a run file or of an in-memory writer's data.

Only committed rows are visible (``docs/file-format.md``, "Commit protocol"). A metric is
found under its current name and under the name it had before a rename
(``docs/vocabulary.md``): a new name finds the group of an older file, and an old name
finds the group of a newer file with a ``DeprecationWarning`` naming the new one.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from landscape._errors import NoRowYet, NotInRun, RunFileError
from landscape._names import RENAMED_METRICS, metric_name_aliases
from landscape.findings import Finding, Findings
from landscape.store.backends import Backend, H5Backend
from landscape.store.format import (
    CHECKPOINTS_TABLE,
    FINDING_FIELDS,
    FINDINGS_TABLE,
    METRICS_GROUP,
    FieldSpec,
    SurfaceData,
    _decode_extra,
    _decode_strings,
    resumed_after,
)
from landscape.store.recovery import open_for_reading
from landscape.store.writer_status import WriterStatus, writer_status

__all__ = ["Run"]


def _held(backend: Backend) -> os.stat_result | None:
    """``fstat`` of the file a reader's HDF5 handle holds (None: memory, a writer's view)."""
    if not isinstance(backend, H5Backend) or backend.writable:
        return None
    try:
        return os.fstat(backend.file.id.get_vfd_handle())
    except (OSError, ValueError, RuntimeError, TypeError):  # a driver without one descriptor
        return None


def _identity(backend: Backend, where: str | None = None) -> tuple[int, int, int, str] | None:
    """Device, inode and size of the file a reader holds, and its absolute path ``where``.

    None for memory, a writer's view, a file read through a recovery copy (removed once
    open: nothing can replace it), or when another file (or none) is at ``where`` now.
    ``where`` defaults to the handle's file name made absolute: take it at open, since a
    later ``chdir`` changes what a relative name points at.
    """
    held = _held(backend)
    if held is None:
        return None
    if where is None:
        where = os.path.abspath(backend.file.filename)
    try:
        named = os.stat(where)
    except OSError:
        return None
    if (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
        return None
    return held.st_dev, held.st_ino, held.st_size, where


_FIRST_OPEN: dict[tuple[int, int], tuple[int, int]] = {}
"""Per file (device, inode) read afresh by :meth:`Run.open`: its size and modification time
then (``Run._warn_if_shared_and_stale``)."""


def surface_source(source: Any) -> str | None:
    """What a surface was computed from, in words (``None``: not recorded).

    ``source`` is the ``source`` attribute ``landscape surface`` writes: the checkpoints
    (the centre; both ends of an interpolation; a PCA plane's trajectory) and the model,
    data and loss as given. A user's own ``source`` of another form is shown as it is.
    """
    if source is None:
        return None
    if not isinstance(source, Mapping):
        return str(source)
    ckpts = source.get("checkpoints")
    ckpts = [str(c) for c in ckpts] if isinstance(ckpts, (list, tuple)) else \
        [] if ckpts is None else [str(ckpts)]
    given = ", ".join(f"{k} {source[k]}" for k in ("model", "data", "loss")
                      if source.get(k) is not None)
    text = ", ".join(ckpts)
    if given:
        text = f"{text} ({given})" if text else given
    return text or None


def _warn_if_rows_unflushed(path: Path) -> None:
    """Warn when this process still writes ``path`` and holds rows not written to it yet.

    A training that raised left its monitor (or callback) open: reading the file showed
    fewer rows than the monitor had, or none, without a word.
    """
    from landscape.store.writer import unflushed_rows

    pending = unflushed_rows(path)
    if pending:
        warnings.warn(
            f"{path}: this process still writes it (a monitor, callback or RunWriter not "
            f"closed) and holds {pending} row(s) or surface point(s) not written to the file "
            "yet, which this reader does not see: close it first (or read monitor.run(), "
            "which writes them)", RuntimeWarning, stacklevel=3)


def written_by_training(attrs: Mapping[str, Any], backend: Backend) -> bool:
    """Whether a training session wrote the run (its ``trained`` attribute).

    A run of a version before the attribute: one that holds metric tables and was not
    written by ``landscape analyze`` (whose config says ``analysis``).
    """
    if "trained" in attrs:
        return bool(attrs["trained"])
    try:
        config = json.loads(attrs.get("config", "{}") or "{}")
    except (TypeError, ValueError):
        config = {}
    analysis = isinstance(config, dict) and "analysis" in config
    return not analysis and any(p.startswith(f"{METRICS_GROUP}/")
                                for p in backend.table_paths())


class Run:
    """Read-only view of a run (an HDF5 file or an in-memory writer's data).

    Every consumer (plots, reports, ``landscape check``, ``landscape info``) reads through
    this class. Only committed rows are visible. For a file being written, call
    :meth:`refresh` to see rows committed since opening. ``name in run`` tells whether
    the run has metric ``name`` (under its old or new name, see :meth:`has_metric`).

    Args:
        backend: the storage to read.
    """

    def __init__(self, backend: Backend) -> None:
        if isinstance(backend, (str, os.PathLike)):  # failed later, reading, without a word
            raise TypeError(f"Run(...) takes a storage backend; open a run file with "
                            f"landscape.Run.open({os.fspath(backend)!r})")
        self._backend = backend
        self._identity = _identity(backend)

    @classmethod
    def open(cls, path: str | os.PathLike) -> Run:
        """Open a run file for reading.

        Args:
            path: the run file.

        Returns:
            The run.

        Raises:
            RunFileError: any problem with the file, in one line naming it.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a run file's path, got {type(path).__name__} "
                            f"{path!r}")
        p = Path(path)
        run = cls(H5Backend(open_for_reading(p), writable=False, path=p))
        run._warn_if_shared_and_stale()
        _warn_if_rows_unflushed(p)
        return run

    def _warn_if_shared_and_stale(self) -> None:
        """Warn when HDF5 gave this reader an older reader's view of a file changed since.

        A second read-only open of a file in one process shares the first one's HDF5 file:
        what another process wrote since the first open (metrics, surfaces, rows) is not
        seen, whatever the second open does. The file's size and modification time at the
        first open are kept (:data:`_FIRST_OPEN`) to tell a changed file from the same one.
        """
        assert isinstance(self._backend, H5Backend)
        file, held = self._backend.file, _held(self._backend)
        if held is None or file.id.get_intent() & h5py.h5f.ACC_RDWR:
            return  # a writer's handle in this process: its view is the current one
        key, now = (held.st_dev, held.st_ino), (held.st_size, held.st_mtime_ns)
        if h5py.h5f.get_obj_count(file.id, h5py.h5f.OBJ_FILE) == 1:
            _FIRST_OPEN[key] = now  # this open read the file afresh
            return
        if _FIRST_OPEN.get(key, now) != now:
            warnings.warn(
                f"{self.source}: another Run of this file is open in this process, and HDF5 "
                "shares it: this one sees the file's metrics and surfaces as they were when "
                "that one was opened (those another process added since may be missing); "
                "close the other Run first (with ls.Run.open(path) as run: ...)",
                RuntimeWarning, stacklevel=3)

    # -- file-level

    @property
    def source(self) -> str:
        """What the run is read from: the file path or ``<memory>``."""
        return self._backend.description

    @property
    def attrs(self) -> dict:
        """The root attributes, without the writer's pid and host."""
        attrs = self._backend.root_attrs()
        attrs.pop("writer_pid", None)
        attrs.pop("writer_host", None)
        return attrs

    def writer_status(self) -> WriterStatus | None:
        """Whether the run's writer closed the file, still writes it, or ended without it.

        :mod:`~landscape.store.writer_status` says how this is told; None for a run in
        memory. The flags are read from the file at each call, the attributes from this
        reader's view: a ``Run`` held open while another process resumes the file sees
        the old writer's (open it again).
        """
        path = getattr(self._backend, "path", None)
        if path is None:
            return None
        attrs = self._backend.root_attrs()
        return writer_status(path, attrs.get("writer_pid"), attrs.get("writer_host"),
                             attrs.get("closed_how"),
                             posthoc=bool(attrs.get("posthoc_writing", False)))

    @property
    def trained(self) -> bool:
        """Whether a training session (the monitor, a callback) wrote the run.

        The root attribute ``trained``; in a file of a version before it, whether the run
        holds metric tables and was not written by ``landscape analyze``.
        """
        return written_by_training(self._backend.root_attrs(), self._backend)

    def resumed_after(self) -> list[int]:
        """The steps after which a writer resumed the run (the root ``resumed_after``).

        The rows after each belong to a later session: its sentinels' secants and
        every-n-th-call rhythms start over there (docs/file-format.md).
        """
        return resumed_after(self.attrs)

    @property
    def format_version(self) -> int:
        """The file's format version."""
        return int(self.attrs["format_version"])

    def _json(self, text: Any, what: str) -> Any:
        """``text`` decoded from JSON; a :class:`RunFileError` naming the file if it is not."""
        try:
            return json.loads(text)
        except (TypeError, ValueError):
            raise RunFileError(f"{self.source}: damaged run file: {what} is not JSON") from None

    @property
    def config(self) -> dict:
        """The run's configuration (the root ``config`` attribute, decoded)."""
        return self._json(self.attrs.get("config", "{}") or "{}", "its config attribute")

    # -- metrics

    def metrics(self) -> list[str]:
        """The names of the metric groups, as stored, sorted.

        Returns:
            The metric names.
        """
        prefix = METRICS_GROUP + "/"
        return sorted(p[len(prefix) :] for p in self._backend.table_paths() if p.startswith(prefix))

    def _find_metric(self, name: str, stacklevel: int) -> str | None:
        """The path of metric ``name``, under its own or its other name, or None.

        ``stacklevel`` counts from this method to the user's call, for the warning.
        """
        paths = self._backend.table_paths()
        for alias in metric_name_aliases(name):
            path = f"{METRICS_GROUP}/{alias}"
            if path in paths:
                if alias != name and name in RENAMED_METRICS:
                    warnings.warn(
                        f"metric {name!r} was renamed {alias!r}; ask for {alias!r}",
                        DeprecationWarning,
                        stacklevel=stacklevel,
                    )
                return path
        return None

    def _metric_path(self, name: str) -> str:
        path = self._find_metric(name, stacklevel=4)
        if path is None:
            known = ", ".join(self.metrics()) or "none"
            raise NotInRun(f"no metric {name!r} in {self.source} (metrics: {known})")
        return path

    def has_metric(self, name: str) -> bool:
        """Whether the run has metric ``name``, also stored under its old or new name.

        Args:
            name: a metric name.

        Returns:
            True when the run has the metric.
        """
        return self._find_metric(name, stacklevel=3) is not None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find_metric(name, stacklevel=3) is not None

    def fields(self, metric: str) -> dict[str, FieldSpec]:
        """The fields of a metric.

        Args:
            metric: the metric name.

        Returns:
            Field names mapped to their specs.

        Raises:
            NotInRun: no such metric (a ``KeyError``).
        """
        return self._backend.table_fields(self._metric_path(metric))

    def metric_attrs(self, metric: str) -> dict:
        """What the run records about a metric: ``kind``, ``class``, ``params``, ``schedule``.

        ``context`` (a list; empty when the run records none) names the fields that record
        a row's conditions rather than a measurement.

        Args:
            metric: the metric name.

        Returns:
            The attributes, ``params`` decoded from JSON.

        Raises:
            NotInRun: no such metric (a ``KeyError``).
        """
        attrs = self._backend.table_attrs(self._metric_path(metric))
        attrs.pop("fields", None)
        if "params" in attrs:
            attrs["params"] = self._json(attrs["params"] or "{}", f"{metric}'s params")
        attrs["context"] = self._json(attrs.get("context") or "[]", f"{metric}'s context")
        return attrs

    def steps(self, metric: str) -> np.ndarray:
        """The committed steps of a metric.

        Args:
            metric: the metric name.

        Returns:
            An int64 array.

        Raises:
            NotInRun: no such metric (a ``KeyError``).
        """
        return self._backend.steps(self._metric_path(metric))

    def series(self, metric: str, field_name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one field over the committed rows.

        Args:
            metric: the metric name.
            field_name: one of its fields.

        Returns:
            The steps ``(N,)`` and the values ``(N, *shape)``; a string field's values as
            ``str`` (an object array), decoded from the file's UTF-8 bytes.

        Raises:
            NotInRun: no such metric or field (a ``KeyError``).
        """
        path = self._metric_path(metric)
        specs = self._backend.table_fields(path)
        if field_name not in specs:
            raise NotInRun(
                f"metric {metric!r} has no field {field_name!r} (fields: {', '.join(specs)})"
            )
        steps = self._backend.steps(path)
        values = self._backend.column(path, field_name, len(steps))
        if specs[field_name].is_string:
            values = np.array(_decode_strings(values.reshape(-1)), dtype=object).reshape(
                values.shape)
        return steps, values

    def rows(self, metric: str) -> int:
        """The number of committed rows of a metric, read without its steps (cheap).

        Raises:
            NotInRun: no such metric (a ``KeyError``).
        """
        return self._backend.rows(self._metric_path(metric))

    def last_row(self, metric: str) -> tuple[int, dict[str, Any]]:
        """The step and the values of a metric's last committed row, reading that row only.

        What ``landscape watch`` prints at each look: its cost does not grow with the run.

        Returns:
            ``(step, {field: value})``; a string field's value as ``str``.

        Raises:
            NotInRun: no such metric (a ``KeyError``).
            NoRowYet: the metric has no row (a ``ValueError``).
        """
        path = self._metric_path(metric)
        n = self._backend.rows(path)
        if not n:
            raise NoRowYet(f"metric {metric!r} has no row yet")
        step = int(self._backend.steps(path, start=n - 1)[0])
        row: dict[str, Any] = {}
        for name, spec in self._backend.table_fields(path).items():
            value = self._backend.column(path, name, n, start=n - 1)[0]
            row[name] = _decode_strings(np.asarray(value).reshape(-1))[0] \
                if spec.is_string else value
        return step, row

    def all_series(self) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
        """Every scalar-or-array field: ``(metric, field, steps, values)``.

        Yields:
            One tuple per field of every metric.
        """
        for metric in self.metrics():
            for name in self.fields(metric):
                steps, values = self.series(metric, name)
                yield metric, name, steps, values

    # -- tables

    def finding_count(self) -> int:
        """The number of committed findings, read without the findings themselves."""
        return self._backend.rows(FINDINGS_TABLE)

    def findings(self, start: int = 0) -> list[Finding]:
        """The committed findings, in the order they were raised (``print`` lists them).

        Args:
            start: the first to read (``watch`` reads only those added since it looked).

        Returns:
            The findings, ``extra`` included (``{}`` in files written before it was
            stored).
        """
        steps = self._backend.steps(FINDINGS_TABLE, start=start)
        end = start + len(steps)
        n = len(steps)
        stored = self._backend.table_fields(FINDINGS_TABLE)
        names = [name for name in FINDING_FIELDS if name in stored]
        col = {name: self._backend.column(FINDINGS_TABLE, name, end, start=start)
               for name in names}
        strings = {k: _decode_strings(v) for k, v in col.items() if FINDING_FIELDS[k].is_string}
        extras = strings.get("extra", [""] * n)
        try:
            return self._findings(steps, col, strings, extras)
        except (KeyError, TypeError, ValueError) as err:  # a severity no rule gives, text
            raise RunFileError(f"{self.source}: damaged run file: its findings do not "
                               f"read ({err})") from None

    @staticmethod
    def _findings(steps: np.ndarray, col: dict, strings: dict, extras: list) -> Findings:
        n = len(steps)
        return Findings([
            Finding(
                step=int(steps[i]),
                rule=strings["rule"][i],
                severity=strings["severity"][i],
                metric=strings["metric"][i],
                value=float(col["value"][i]),
                threshold=float(col["threshold"][i]),
                message=strings["message"][i],
                hint=strings["hint"][i],
                extra=_decode_extra(extras[i]),
            )
            for i in range(n)
        ])

    def checkpoints(self) -> list[tuple[int, str]]:
        """The recorded checkpoints.

        Returns:
            ``(step, checkpoint)`` pairs.
        """
        steps = self._backend.steps(CHECKPOINTS_TABLE)
        paths = _decode_strings(self._backend.column(CHECKPOINTS_TABLE, "path", len(steps)))
        return [(int(s), p) for s, p in zip(steps, paths)]

    def last_step(self) -> int | None:
        """The last step of any metric table (None: no metric has a row).

        The step up to which a reader saw the run: ``landscape check`` says it for a run
        still being written, or one whose writer ended without closing it.
        """
        return self._backend.last_metric_step()

    def recorded(self) -> bool:
        """Whether the run holds anything: a metric row, or a computed surface point.

        A job killed before its first flush recorded nothing: ``landscape check`` refuses
        to pass it, and the report says so.
        """
        return any(self.rows(m) for m in self.metrics()) or any(
            self.surface(s).done.any() for s in self.surfaces())

    # -- surfaces

    def surfaces(self) -> list[str]:
        """The names of the stored surfaces, sorted.

        Returns:
            The surface names.
        """
        return sorted(self._backend.surface_names())

    def surface(self, name: str) -> SurfaceData:
        """A stored surface.

        Args:
            name: the surface's name.

        Returns:
            The surface as stored now.

        Raises:
            NotInRun: no such surface (a ``KeyError``).
        """
        if name not in self._backend.surface_names():
            known = ", ".join(self.surfaces()) or "none"
            raise NotInRun(f"no surface {name!r} in {self.source} (surfaces: {known})")
        return self._backend.read_surface(name)

    # -- lifecycle

    def refresh(self) -> None:
        """See rows a live writer committed since this reader opened (SWMR).

        Raises:
            RunFileError: the file was replaced (a crash recovery) or started over (a writer
                with ``mode="w"``) since it was opened, or a table of it was rewritten (a
                resumed writer widening a column): open it again. HDF5 hung for minutes
                refreshing such a file.
        """
        if self._identity is not None:
            now = _identity(self._backend, self._identity[3])
            # another file at the path (replaced: None), or the one held shrank (started
            # over; one that has grown past its old size since cannot be told from a live run)
            if now is None or now[2] < self._identity[2]:
                raise RunFileError(f"{self.source}: was replaced or started over since it was "
                                   "opened (a writer with mode='w', or a crash recovery): "
                                   "open it again")
            self._identity = now
        try:
            self._backend.refresh()  # (rows only: groups added since stay unseen, so the
            # size at the first open stays what Run.open compares with)
        except (RuntimeError, OSError, KeyError, ValueError) as err:
            # a dataset rewritten since (a resumed writer widening a string column): the
            # objects this reader holds are gone, for good ("Can't deserialize object
            # header"); a fresh open reads the file as it is
            raise RunFileError(f"{self.source}: a table was rewritten since it was opened (a "
                               f"resumed writer widened a column): open it again ({err})"
                               ) from None

    def close(self) -> None:
        """Close a file opened by :meth:`open` (a writer's view stays the writer's)."""
        if isinstance(self._backend, H5Backend) and not self._backend.writable:
            held = _held(self._backend)
            if held is not None and h5py.h5f.get_obj_count(
                    self._backend.file.id, h5py.h5f.OBJ_FILE) == 1:
                _FIRST_OPEN.pop((held.st_dev, held.st_ino), None)  # the last Run of it
            self._backend.close()

    def __repr__(self) -> str:
        h5file = getattr(self._backend, "file", None)
        closed = h5file is not None and not h5file  # (an h5py file is falsy once closed)
        return f"Run({self.source!r}, {'closed' if closed else f'metrics={self.metrics()}'})"

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def summary(self) -> dict:
        """What the run holds, as plain data (used by ``landscape info``).

        Returns:
            Source, versions, config, and per metric and surface their size and settings.
        """
        metrics = {}
        for m in self.metrics():
            path = self._metric_path(m)
            rows = self._backend.rows(path)  # the first and last steps read, not the column
            first = self._backend.steps(path, stop=1) if rows else None
            last = self._backend.steps(path, start=rows - 1) if rows else None
            metrics[m] = {
                "fields": {n: s.to_json() for n, s in self.fields(m).items()},
                "rows": rows,
                "first_step": None if first is None else int(first[0]),
                "last_step": None if last is None else int(last[0]),
                **{k: v for k, v in self.metric_attrs(m).items() if k != "kind"},
            }
        surfaces = {}
        for s in self.surfaces():
            data = self.surface(s)
            surfaces[s] = {
                "shape": list(data.shape),
                "fields": list(data.values),
                "computed": int(data.done.sum()),
                "total": int(data.done.size),
                **({"source": data.attrs["source"]} if "source" in data.attrs else {}),
            }
        attrs = self.attrs
        status = self.writer_status()
        return {
            "source": self.source,
            "format_version": self.format_version,
            "library_version": attrs.get("library_version"),
            "torch_version": attrs.get("torch_version"),
            "created": attrs.get("created"),
            "config": self.config,
            "metrics": metrics,
            "findings": self._backend.rows(FINDINGS_TABLE),
            "checkpoints": self._backend.rows(CHECKPOINTS_TABLE),
            "surfaces": surfaces,
            "writer": None if status is None else status.to_json(),
        }
