"""Where a run's tables and surfaces live: the HDF5 file, or memory.

:class:`Backend` is the interface the writer and the reader use; :class:`H5Backend`
implements it on an HDF5 file (the layout of ``docs/file-format.md``) and
:class:`MemoryBackend` in memory, for runs that need no file (``RunWriter.memory()``).
A table is a set of columns sharing their first axis plus a ``step`` column; a backend
appends whole rows and stores what it is given: ordering and buffering are the writer's.
"""

from __future__ import annotations

import contextlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from landscape._errors import RunFileError
from landscape.store.format import (
    CHECKPOINTS_TABLE,
    FINDINGS_TABLE,
    LOCKING,
    METRICS_GROUP,
    STATE_GROUP,
    SURFACES_GROUP,
    FieldSpec,
    SurfaceData,
    _attr_value,
    _h5_reason,
)
from landscape.store.recovery import writers_excluded

__all__ = ["Backend", "H5Backend", "MemoryBackend"]

#: a surface point: its grid index (``(i,)`` or ``(j, i)``) and its field values
Point = tuple[tuple, dict[str, float]]


class Backend(ABC):
    """Storage of tables and surfaces; the HDF5 file and the in-memory twin implement it.

    Tables are named by their path (``"findings"``, ``"checkpoints"``,
    ``"metrics/<name>"``); surfaces by their name under ``/surfaces``.
    """

    @property
    @abstractmethod
    def description(self) -> str:
        """What the run is stored in, for messages: the file path or ``<memory>``."""

    @abstractmethod
    def root_attrs(self) -> dict:
        """The run's root attributes (format, versions, config, writer), decoded.

        Returns:
            A new dict of plain Python values.
        """

    def last_metric_step(self) -> int | None:
        """The last committed step of any metric table (None: no metric has a row)."""
        last = [int(self.steps(p, start=n - 1)[0]) for p in self.table_paths()
                if p.startswith(f"{METRICS_GROUP}/") and (n := self.rows(p))]
        return max(last) if last else None

    @abstractmethod
    def set_root_attrs(self, attrs: dict[str, str]) -> None:
        """Set root attributes of the run (one structural change).

        Args:
            attrs: attribute -> its new value.
        """

    @abstractmethod
    def del_root_attrs(self, names: list[str]) -> None:
        """Remove root attributes of the run (one structural change); absent ones are skipped.

        Args:
            names: the attributes to remove.
        """

    @abstractmethod
    def table_paths(self) -> list[str]:
        """The paths of every table: findings, checkpoints, then ``metrics/<name>``.

        Returns:
            The table paths.
        """

    @abstractmethod
    def add_fields(self, path: str, fields: dict[str, FieldSpec]) -> None:
        """Add float columns to a table, NaN on the rows it already has.

        Args:
            path: the table's path.
            fields: the new columns (floating-point dtypes).
        """

    @abstractmethod
    def widen_strings(self, path: str, fields: dict[str, FieldSpec]) -> None:
        """Give string columns a larger width, keeping their rows.

        Args:
            path: the table's path.
            fields: the columns and their new, wider ``S`` specs.
        """

    @abstractmethod
    def create_table(self, path: str, fields: dict[str, FieldSpec], attrs: dict) -> None:
        """Create an empty table.

        Args:
            path: the table's path.
            fields: its columns (``step`` is added).
            attrs: attributes stored with it (strings or numbers); ``fields`` is added.
        """

    @abstractmethod
    def set_table_attrs(self, path: str, attrs: dict[str, str]) -> None:
        """Set attributes of an existing table (one structural change).

        Args:
            path: the table's path.
            attrs: attribute -> its new value.
        """

    @abstractmethod
    def table_attrs(self, path: str) -> dict:
        """The attributes of a table, decoded.

        Args:
            path: the table's path.

        Returns:
            A new dict of its attributes.
        """

    @abstractmethod
    def table_fields(self, path: str) -> dict[str, FieldSpec]:
        """The columns of a table, ``step`` excluded.

        Args:
            path: the table's path.

        Returns:
            Field names mapped to their specs, in declaration order.
        """

    @abstractmethod
    def steps(self, path: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The committed steps of a table; their number is the number of committed rows.

        Args:
            path: the table's path.
            start: the first row to read (the rows before it are not read).
            stop: the row to stop before (None: the last committed row included).

        Returns:
            An int64 array, a copy.
        """

    @abstractmethod
    def rows(self, path: str) -> int:
        """The number of committed rows of a table, found without reading its steps."""

    @abstractmethod
    def column(self, path: str, name: str, n: int, start: int = 0) -> np.ndarray:
        """Rows ``start`` to ``n`` of one column.

        Args:
            path: the table's path.
            name: the field.
            n: the end row (the committed ones: ``len(steps(path))``).
            start: the first row to read.

        Returns:
            An ``(n - start, *shape)`` array, a copy.
        """

    @abstractmethod
    def append_rows(self, path: str, steps: np.ndarray, cols: dict[str, np.ndarray]) -> None:
        """Append rows: every field first, ``step`` last (the commit).

        Args:
            path: the table's path.
            steps: the rows' steps, int64 ``(k,)``.
            cols: every field's ``(k, *shape)`` values.
        """

    @abstractmethod
    def truncate(self, path: str, n: int) -> None:
        """Keep the first ``n`` rows of every column of a table (``step`` included).

        Args:
            path: the table's path.
            n: the rows to keep.
        """

    @abstractmethod
    def surface_names(self) -> list[str]:
        """The names of the stored surfaces.

        Returns:
            The names, in storage order.
        """

    @abstractmethod
    def create_surface(self, data: SurfaceData) -> None:
        """Store a new surface with its grid, values, ``done`` mask, attrs and arrays.

        Args:
            data: the surface; its ``name`` must be new.
        """

    @abstractmethod
    def read_surface(self, name: str) -> SurfaceData:
        """A stored surface.

        Args:
            name: the surface's name.

        Returns:
            A copy of the surface as stored now.
        """

    @abstractmethod
    def delete_surface(self, name: str) -> None:
        """Remove a stored surface, its grid, values and arrays.

        Args:
            name: the surface's name.
        """

    @abstractmethod
    def write_surface(self, name: str, points: list[Point]) -> None:
        """Store computed points of a surface and mark them done (values before ``done``).

        Args:
            name: the surface's name.
            points: ``(index, values)`` pairs; fields missing from ``values`` keep their
                stored value.
        """

    @abstractmethod
    def write_blob(self, name: str, data: bytes) -> None:
        """Store (or replace) the bytes ``/state/<name>``.

        Args:
            name: the blob's name.
            data: its bytes.
        """

    @abstractmethod
    def read_blob(self, name: str) -> bytes | None:
        """The bytes ``/state/<name>``, or None when there are none.

        Args:
            name: the blob's name.

        Returns:
            The bytes, or None.
        """

    @abstractmethod
    def flush(self) -> None:
        """Make everything written so far visible to readers."""

    @abstractmethod
    def refresh(self) -> None:
        """See what a live writer committed since this handle opened (SWMR readers)."""

    @abstractmethod
    def close(self) -> None:
        """Release the storage; closing twice is harmless."""


def _blank(rows: int, shape: tuple[int, ...], dtype: np.typing.DTypeLike) -> np.ndarray:
    """``rows`` rows not written yet: NaN for a float field, 0 for any other."""
    fill = np.nan if np.issubdtype(np.dtype(dtype), np.floating) else 0
    return np.full((rows, *shape), fill, dtype)


def _with_room(arr: np.ndarray, n: int, room: int) -> np.ndarray:
    """A copy of ``arr``'s first ``n`` rows in an array of ``room`` rows (blank after)."""
    out = _blank(room, arr.shape[1:], arr.dtype)
    out[:n] = arr[:n]
    return out


class MemoryBackend(Backend):
    """Tables and surfaces in numpy arrays, for runs that need no file.

    Args:
        attrs: the root attributes.
    """

    def __init__(self, attrs: dict) -> None:
        self._attrs = dict(attrs)
        self._tables: dict[str, dict] = {}
        self._surfaces: dict[str, SurfaceData] = {}
        self._blobs: dict[str, bytes] = {}

    @property
    def description(self) -> str:
        """Always ``<memory>``."""
        return "<memory>"

    def root_attrs(self) -> dict:
        """A copy of the root attributes."""
        return dict(self._attrs)

    def set_root_attrs(self, attrs):
        """Set some of the root attributes."""
        self._attrs.update(attrs)

    def del_root_attrs(self, names):
        """Remove some of the root attributes."""
        for name in names:
            self._attrs.pop(name, None)

    def table_paths(self) -> list[str]:
        """The tables in creation order."""
        return list(self._tables)

    def create_table(self, path, fields, attrs):
        """Create an empty table of zero-row arrays."""
        self._tables[path] = {
            "fields": dict(fields),
            "attrs": dict(attrs),
            "rows": 0,  # the arrays below hold room for more: rows [:rows] are the table's
            "step": np.zeros((0,), np.int64),
            "cols": {n: np.zeros((0, *s.shape), s.dtype) for n, s in fields.items()},
        }

    def set_table_attrs(self, path, attrs):
        """Set some of a table's attributes."""
        self._tables[path]["attrs"].update(attrs)

    def table_attrs(self, path):
        """A copy of a table's attributes."""
        return dict(self._tables[path]["attrs"])

    def table_fields(self, path):
        """A copy of a table's field specs."""
        return dict(self._tables[path]["fields"])

    def steps(self, path, start=0, stop=None):
        """A copy of a table's steps (rows ``start`` to ``stop``)."""
        t = self._tables[path]
        return t["step"][:t["rows"]][start:stop].copy()

    def rows(self, path):
        """The table's number of rows."""
        return self._tables[path]["rows"]

    def column(self, path, name, n, start=0):
        """A copy of rows ``start`` to ``n`` of a column."""
        t = self._tables[path]
        return t["cols"][name][:t["rows"]][start:n].copy()

    def add_fields(self, path, fields):
        """Blank columns (NaN for floats) as long as the table's room."""
        t = self._tables[path]
        room = len(t["step"])
        for name, spec in fields.items():
            t["fields"][name] = spec
            t["cols"][name] = _blank(room, spec.shape, spec.dtype)

    def widen_strings(self, path, fields):
        """The columns cast to their wider dtypes (the rows kept)."""
        t = self._tables[path]
        for name, spec in fields.items():
            t["fields"][name] = spec
            t["cols"][name] = t["cols"][name].astype(spec.dtype)

    def append_rows(self, path, steps, cols):
        """Write the rows into the arrays' room, doubling it when it runs out.

        Amortised O(rows appended): concatenating every flush onto the table would copy
        the whole run at every flush, a cost that grows with the run's length.
        """
        t = self._tables[path]
        n, k = t["rows"], len(steps)
        if n + k > len(t["step"]):
            room = max(n + k, 2 * len(t["step"]), 256)
            t["step"] = _with_room(t["step"], n, room)
            for name in t["cols"]:
                t["cols"][name] = _with_room(t["cols"][name], n, room)
        for name, arr in cols.items():
            t["cols"][name][n:n + k] = arr
        t["step"][n:n + k] = steps
        t["rows"] = n + k

    def truncate(self, path, n):
        """Keep the first ``n`` rows of every column."""
        t = self._tables[path]
        t["rows"] = min(n, t["rows"])

    def write_blob(self, name, data):
        """Keep a copy of the bytes."""
        self._blobs[name] = bytes(data)

    def read_blob(self, name):
        """The bytes kept under ``name``, or None."""
        return self._blobs.get(name)

    def surface_names(self):
        """The surfaces in creation order."""
        return list(self._surfaces)

    def create_surface(self, data):
        """Keep ``data`` itself (later points are written into its arrays)."""
        self._surfaces[data.name] = data

    def read_surface(self, name):
        """A deep copy of a surface."""
        s = self._surfaces[name]
        return SurfaceData(
            s.name,
            s.x.copy(),
            None if s.y is None else s.y.copy(),
            {k: v.copy() for k, v in s.values.items()},
            s.done.copy(),
            dict(s.attrs),
            {k: v.copy() for k, v in s.arrays.items()},
        )

    def delete_surface(self, name):
        """Forget the surface."""
        del self._surfaces[name]

    def write_surface(self, name, points):
        """Set the points' values and done flags."""
        s = self._surfaces[name]
        for index, values in points:
            for k, v in values.items():
                s.values[k][index] = v
            s.done[index] = True

    def flush(self):
        """Nothing to do: memory is always visible."""

    def refresh(self):
        """Nothing to do: memory is always current."""

    def close(self):
        """Nothing to do: the data stays readable."""


def _chunk_rows(spec: FieldSpec) -> int:
    row_bytes = max(1, math.prod(spec.shape) * np.dtype(spec.dtype).itemsize)
    return int(max(1, min(1024, (64 * 1024) // row_bytes)))


class H5Backend(Backend):
    """Tables and surfaces in an HDF5 file opened with libver='latest' (SWMR-capable).

    Args:
        file: the open file.
        writable: whether it was opened for writing (structural changes need it).
        path: the run file's path, when ``file`` is a copy of it (a file a killed writer
            left open, read through a copy: :mod:`landscape.store.recovery`).
    """

    def __init__(self, file: h5py.File, writable: bool, path: Path | None = None) -> None:
        self.file = file
        self.path = Path(file.filename) if path is None else Path(path)
        self.writable = writable
        #: why the file is closed under the writer (a reopen that failed), else None
        self.lost: str | None = None

    def _check_not_lost(self) -> None:
        if self.lost is not None:
            raise RunFileError(self.lost)

    @property
    def description(self) -> str:
        """The file's path."""
        return str(self.path)

    @contextlib.contextmanager
    def structural(self) -> Iterator[None]:
        """Leave SWMR mode for a structural change (a new group), then re-enter it.

        HDF5 allows no new objects in SWMR mode, so the file is closed and reopened
        without it around the change.

        Yields:
            Nothing; ``self.file`` is writable with structure changes inside the block.

        Raises:
            RunFileError: the file is read-only, or cannot be reopened.
        """
        if not self.writable:
            raise RunFileError(f"{self.path}: opened read-only")
        self._check_not_lost()
        was_swmr = self.file.swmr_mode
        # out of SWMR mode the file carries no "being written" flag: a process opening it
        # for writing now would take it (writers_excluded makes it wait)
        with writers_excluded(self.path) if was_swmr else contextlib.nullcontext():
            yield from self._structural(was_swmr)

    def _structural(self, was_swmr: bool) -> Iterator[None]:
        """:meth:`structural`'s body."""
        if was_swmr:
            self.file.flush()
            self.file.close()
            try:
                self.file = h5py.File(self.path, "r+", libver="latest", locking=LOCKING)
            except OSError as err:
                # every later write says so (a flush of the closed file raised h5py's "not
                # a file or file object", which hid this reason)
                self.lost = (f"{self.path}: cannot reopen the run to add a group "
                             f"({_h5_reason(err)})")
                raise RunFileError(self.lost) from None
        try:
            yield
        finally:
            self.file.flush()
            # In one process a reader's open handle shares HDF5's file object, which then
            # stays in SWMR mode across the reopen: only switch it on when it is off.
            if was_swmr and not self.file.swmr_mode:
                self.file.swmr_mode = True

    def root_attrs(self):
        """The file's root attributes, decoded."""
        return {k: _attr_value(v) for k, v in self.file.attrs.items()}

    def set_root_attrs(self, attrs):
        """Set some of the root attributes (outside SWMR mode, which allows no change)."""
        with self.structural() if self.file.swmr_mode else contextlib.nullcontext():
            for key, value in attrs.items():
                self.file.attrs[key] = value

    def del_root_attrs(self, names):
        """Remove some of the root attributes (outside SWMR mode, as :meth:`set_root_attrs`)."""
        present = [n for n in names if n in self.file.attrs]
        if not present:
            return
        with self.structural() if self.file.swmr_mode else contextlib.nullcontext():
            for name in present:
                del self.file.attrs[name]

    def table_paths(self):
        """Findings and checkpoints (when present), then the metric groups."""
        paths = []
        for top in (FINDINGS_TABLE, CHECKPOINTS_TABLE):
            if top in self.file:
                paths.append(top)
        if METRICS_GROUP in self.file:
            paths.extend(f"{METRICS_GROUP}/{name}" for name in self.file[METRICS_GROUP])
        return paths

    def create_table(self, path, fields, attrs):
        """Create the group and its chunked, resizable datasets."""
        with self.structural():
            g = self.file.require_group(path)
            for key, value in attrs.items():
                g.attrs[key] = value
            g.attrs["fields"] = json.dumps({n: s.to_json() for n, s in fields.items()})
            for name, spec in fields.items():
                g.create_dataset(
                    name,
                    shape=(0, *spec.shape),
                    maxshape=(None, *spec.shape),
                    chunks=(_chunk_rows(spec), *spec.shape),
                    dtype=spec.dtype,
                )
            g.create_dataset("step", shape=(0,), maxshape=(None,), chunks=(1024,), dtype="int64")

    def add_fields(self, path, fields):
        """Create the datasets (NaN on the existing rows), then extend ``fields``."""
        with self.structural():
            g = self.file[path]
            n = g["step"].shape[0]
            for name, spec in fields.items():
                g.create_dataset(
                    name,
                    data=np.full((n, *spec.shape), np.nan, spec.dtype),
                    maxshape=(None, *spec.shape),
                    chunks=(_chunk_rows(spec), *spec.shape),
                )
            stored = {**self.table_fields(path), **fields}
            g.attrs["fields"] = json.dumps({n: s.to_json() for n, s in stored.items()})

    def widen_strings(self, path, fields):
        """Each column rewritten at its wider width (HDF5 cannot widen one in place).

        Written whole under a temporary name first, then put in the old one's place: a
        process stopped while it writes leaves the old column as it was.
        """
        with self.structural():
            g = self.file[path]
            for name, spec in fields.items():
                rows = g[name][()]
                fresh = f"{name}.widened"
                if fresh in g:  # an earlier attempt's, stopped before its swap
                    del g[fresh]
                g.create_dataset(fresh, data=rows.astype(spec.dtype),
                                 maxshape=(None, *spec.shape),
                                 chunks=(_chunk_rows(spec), *spec.shape))
                del g[name]
                g.move(fresh, name)
            stored = {**self.table_fields(path), **fields}
            g.attrs["fields"] = json.dumps({n: s.to_json() for n, s in stored.items()})

    def set_table_attrs(self, path, attrs):
        """Set some of the group's attributes (outside SWMR mode, which allows no change)."""
        with self.structural():
            for key, value in attrs.items():
                self.file[path].attrs[key] = value

    def table_attrs(self, path):
        """The group's attributes, decoded."""
        return {k: _attr_value(v) for k, v in self.file[path].attrs.items()}

    def table_fields(self, path):
        """The specs in the group's ``fields`` attribute."""
        raw = json.loads(_attr_value(self.file[path].attrs["fields"]))
        return {n: FieldSpec.from_json(s) for n, s in raw.items()}

    def steps(self, path, start=0, stop=None):
        """The ``step`` dataset, rows ``start`` to ``stop``."""
        return np.asarray(self.file[path]["step"][start:stop], dtype=np.int64)

    def rows(self, path):
        """The length of the ``step`` dataset (its shape: nothing is read)."""
        self._check_not_lost()
        return int(self.file[path]["step"].shape[0])

    def column(self, path, name, n, start=0):
        """Rows ``start`` to ``n`` of the field's dataset."""
        return np.asarray(self.file[path][name][start:n])

    def append_rows(self, path, steps, cols):
        """Resize and write every field, then ``step``."""
        self._check_not_lost()
        g = self.file[path]
        n0 = g["step"].shape[0]
        n1 = n0 + len(steps)
        for name, arr in cols.items():
            ds = g[name]
            ds.resize(n1, axis=0)
            ds[n0:n1] = arr
        ds = g["step"]
        ds.resize(n1, axis=0)
        ds[n0:n1] = steps

    def truncate(self, path, n):
        """Shrink every dataset of the group longer than ``n`` rows, ``step`` first.

        Out of SWMR mode (:meth:`structural`): a reader opening the file meanwhile waits
        for the change instead of reading half-shrunk columns, which HDF5's SWMR does not
        promise to show consistently (a resume's ``truncate_from`` read as a damaged file:
        "its steps do not increase"). ``step`` commits the rows, so it goes first: a
        column longer than it is rows not committed yet, one shorter would be damage.
        """
        g = self.file[path]
        if not any(g[name].shape[0] > n for name in g):
            return
        with self.structural():
            g = self.file[path]
            for name in sorted(g, key=lambda name: name != "step"):
                if g[name].shape[0] > n:
                    g[name].resize(n, axis=0)

    def write_blob(self, name, data):
        """A uint8 dataset under ``/state`` (replaced when it exists)."""
        with self.structural():
            group = self.file.require_group(STATE_GROUP)
            if name in group:
                del group[name]
            group.create_dataset(name, data=np.frombuffer(bytes(data), dtype=np.uint8))

    def read_blob(self, name):
        """The dataset's bytes, or None."""
        path = f"{STATE_GROUP}/{name}"
        if path not in self.file:
            return None
        return np.asarray(self.file[path][()], dtype=np.uint8).tobytes()

    def surface_names(self):
        """The groups under ``/surfaces``."""
        return list(self.file[SURFACES_GROUP]) if SURFACES_GROUP in self.file else []

    def create_surface(self, data):
        """Create ``/surfaces/<name>`` with its datasets and ``arrays`` group."""
        with self.structural():
            g = self.file.require_group(SURFACES_GROUP).create_group(data.name)
            g.attrs["attrs"] = json.dumps(data.attrs)
            g.attrs["fields"] = json.dumps(list(data.values))
            g.create_dataset("x", data=data.x)
            if data.y is not None:
                g.create_dataset("y", data=data.y)
            for name, grid in data.values.items():
                g.create_dataset(name, data=grid)
            g.create_dataset("done", data=data.done.astype(np.uint8))
            if data.arrays:
                a = g.create_group("arrays")
                for name, arr in data.arrays.items():
                    a.create_dataset(name, data=arr)

    def read_surface(self, name):
        """Read every dataset of the surface."""
        g = self.file[SURFACES_GROUP][name]
        fields = json.loads(_attr_value(g.attrs["fields"]))
        arrays = {k: np.asarray(v[()]) for k, v in g["arrays"].items()} if "arrays" in g else {}
        return SurfaceData(
            name=name,
            x=np.asarray(g["x"][()]),
            y=np.asarray(g["y"][()]) if "y" in g else None,
            values={f: np.asarray(g[f][()]) for f in fields},
            done=np.asarray(g["done"][()]).astype(bool),
            attrs=json.loads(_attr_value(g.attrs["attrs"])),
            arrays=arrays,
        )

    def delete_surface(self, name):
        """Unlink ``/surfaces/<name>``.

        HDF5 does not give the space back: the file keeps its size (``h5repack`` copies it
        without the freed space), and a surface computed again after a reopen grows it.
        """
        with self.structural():
            del self.file[SURFACES_GROUP][name]

    def write_surface(self, name, points):
        """One read-modify-write of the covering span per grid row and field, ``done`` last.

        A span of a row costs about as much as one element (see ``docs/benchmarks.md``).
        """
        g = self.file[SURFACES_GROUP][name]
        rows: dict[tuple, list[tuple[int, dict[str, float]]]] = {}
        for index, values in points:
            rows.setdefault(tuple(index[:-1]), []).append((int(index[-1]), values))
        for name_ in [*json.loads(_attr_value(g.attrs["fields"])), "done"]:
            ds = g[name_]
            for lead, row in rows.items():
                given = [(i, 1.0 if name_ == "done" else values[name_])
                         for i, values in row if name_ == "done" or name_ in values]
                if not given:
                    continue
                lo, hi = min(i for i, _ in given), max(i for i, _ in given) + 1
                span = np.asarray(ds[(*lead, slice(lo, hi))])
                for i, value in given:
                    span[i - lo] = value
                ds[(*lead, slice(lo, hi))] = span

    def flush(self):
        """Flush the file (SWMR readers see the new rows after their refresh)."""
        self._check_not_lost()
        self.file.flush()

    def refresh(self):
        """Refresh every dataset of the file, each table's ``step`` column first.

        The writer extends a table's fields before its ``step`` column, which commits the
        rows: refreshed after it, every field holds at least the rows the steps commit
        (refreshed in name order, a field named before ``step`` lagged behind it, and a
        reader read more steps than values).
        """
        datasets: list[h5py.Dataset] = []

        def visit(_name, obj):
            if isinstance(obj, h5py.Dataset):
                datasets.append(obj)

        self.file.visititems(visit)
        for ds in sorted(datasets, key=lambda ds: ds.name.rsplit("/", 1)[-1] != "step"):
            ds.refresh()

    def close(self):
        """Close the file, ignoring errors."""
        with contextlib.suppress(Exception):
            self.file.close()
