"""The run store: one HDF5 file per run, and an in-memory twin with the same interface.

Layout (format version 1, the contract documented in ``docs/file-format.md``)::

    /                  attrs: format="landscape", format_version, library_version,
                              torch_version, created, config (JSON)
    /metrics/<name>/   attrs: kind="metric", fields (JSON), class, params (JSON), schedule
        <field>        (N, *shape) chunked, resizable
        step           int64 (N,)   the commit log, written last
    /findings/         a table with the same commit protocol (one row per finding)
    /checkpoints/      a table: which checkpoint produced which step
    /surfaces/<name>/  x, [y], one (ny, nx) or (nx,) grid per field, ``done`` mask,
                       attrs (JSON), optional arrays (directions, trajectory)

Durability: rows are buffered in memory and written on an interval, on ``flush()``, on
``close()`` and when an exception leaves the ``with`` block. Every table writes its
fields before its ``step`` column, so a reader (or a file whose writer was killed)
only ever sees whole rows: ``len(step)`` is the number of committed rows. The writer
works in SWMR mode, so a second process can read while it appends, and a file cut short
by SIGKILL still opens; reopening such a file to resume rewrites it once without the
stale writer flag.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import h5py
import numpy as np

from landscape._errors import RunFileError, StepOrderError
from landscape._version import __version__
from landscape.findings import Finding

FORMAT = "landscape"
FORMAT_VERSION = 1

METRICS_GROUP = "metrics"
FINDINGS_TABLE = "findings"
CHECKPOINTS_TABLE = "checkpoints"
SURFACES_GROUP = "surfaces"

# HDF5 file locks are off for every handle (they must agree within one process): a live
# reader must never block the writer, which briefly reopens the file to add a metric or a
# surface. Concurrent writers are still refused through the SWMR superblock flags and the
# writer_pid/writer_host attributes.
LOCKING = False


# --------------------------------------------------------------------------- field specs


@dataclass(frozen=True)
class FieldSpec:
    """Shape of one row of a field (``()`` for a scalar) and its numpy dtype string."""

    shape: tuple[int, ...] = ()
    dtype: str = "float64"

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, obj: Mapping) -> FieldSpec:
        return cls(tuple(int(s) for s in obj["shape"]), str(obj["dtype"]))

    @property
    def is_string(self) -> bool:
        return np.dtype(self.dtype).kind == "S"


FieldsLike = Mapping[str, Union[FieldSpec, tuple, str, None]]


def normalize_fields(fields: FieldsLike) -> dict[str, FieldSpec]:
    """Accept ``{name: FieldSpec | shape-tuple | dtype-string | None}`` and return FieldSpecs."""
    out: dict[str, FieldSpec] = {}
    for name, spec in fields.items():
        if not isinstance(name, str) or not name or "/" in name or name == "step":
            raise ValueError(f"invalid field name {name!r} (non-empty, no '/', not 'step')")
        if spec is None:
            spec = FieldSpec()
        elif isinstance(spec, str):
            spec = FieldSpec((), spec)
        elif isinstance(spec, tuple):
            spec = FieldSpec(tuple(int(s) for s in spec))
        elif not isinstance(spec, FieldSpec):
            raise ValueError(f"field {name!r}: expected a FieldSpec, shape tuple or dtype string")
        np.dtype(spec.dtype)  # validates
        out[name] = spec
    if not out:
        raise ValueError("a table needs at least one field")
    return out


FINDING_FIELDS = normalize_fields(
    {
        "rule": "S64",
        "severity": "S16",
        "metric": "S128",
        "value": "float64",
        "threshold": "float64",
        "message": "S512",
        "hint": "S512",
    }
)
CHECKPOINT_FIELDS = normalize_fields({"path": "S1024"})


def _encode(value: Any, spec: FieldSpec) -> np.ndarray:
    if spec.is_string:
        width = np.dtype(spec.dtype).itemsize
        raw = str(value).encode("utf-8")
        if len(raw) > width:
            raw = raw[: width - 3].decode("utf-8", "ignore").encode("utf-8") + b"..."
        return np.asarray(raw, dtype=spec.dtype)
    if hasattr(value, "detach"):  # torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=spec.dtype)
    if arr.shape != spec.shape:
        if arr.size == math.prod(spec.shape):
            arr = arr.reshape(spec.shape)
        else:
            raise ValueError(f"value of shape {arr.shape} does not fit field shape {spec.shape}")
    return arr


def _decode_strings(arr: np.ndarray) -> list[str]:
    return [b.decode("utf-8", "replace") for b in arr.tolist()]


# --------------------------------------------------------------------------- surfaces


@dataclass
class SurfaceData:
    """A stored 1-D or 2-D surface.

    Grids are ``(nx,)`` or ``(ny, nx)`` with ``Z[j, i] = f(x_i, y_j)`` (METRICS.md §3.3).
    """

    name: str
    x: np.ndarray
    y: np.ndarray | None
    values: dict[str, np.ndarray]
    done: np.ndarray
    attrs: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        return 1 if self.y is None else 2

    @property
    def shape(self) -> tuple[int, ...]:
        return self.done.shape

    @property
    def complete(self) -> bool:
        return bool(self.done.all())


# --------------------------------------------------------------------------- backends


class _Backend:
    """Storage of tables and surfaces; the HDF5 file and the in-memory twin implement it."""

    def root_attrs(self) -> dict: ...
    def table_paths(self) -> list[str]: ...
    def create_table(self, path: str, fields: dict[str, FieldSpec], attrs: dict) -> None: ...
    def table_attrs(self, path: str) -> dict: ...
    def table_fields(self, path: str) -> dict[str, FieldSpec]: ...
    def steps(self, path: str) -> np.ndarray: ...
    def column(self, path: str, name: str, n: int) -> np.ndarray: ...
    def append_rows(self, path: str, steps: np.ndarray, cols: dict[str, np.ndarray]) -> None: ...
    def truncate(self, path: str, n: int) -> None: ...
    def surface_names(self) -> list[str]: ...
    def create_surface(self, data: SurfaceData) -> None: ...
    def read_surface(self, name: str) -> SurfaceData: ...
    def write_surface(self, name: str, points: list[tuple[tuple, dict[str, float]]]) -> None: ...
    def flush(self) -> None: ...
    def refresh(self) -> None: ...
    def close(self) -> None: ...
    @property
    def description(self) -> str: ...


class _MemoryBackend(_Backend):
    def __init__(self, attrs: dict) -> None:
        self._attrs = dict(attrs)
        self._tables: dict[str, dict] = {}
        self._surfaces: dict[str, SurfaceData] = {}

    description = "<memory>"

    def root_attrs(self) -> dict:
        return dict(self._attrs)

    def table_paths(self) -> list[str]:
        return list(self._tables)

    def create_table(self, path, fields, attrs):
        self._tables[path] = {
            "fields": dict(fields),
            "attrs": dict(attrs),
            "step": np.zeros((0,), np.int64),
            "cols": {n: np.zeros((0, *s.shape), s.dtype) for n, s in fields.items()},
        }

    def table_attrs(self, path):
        return dict(self._tables[path]["attrs"])

    def table_fields(self, path):
        return dict(self._tables[path]["fields"])

    def steps(self, path):
        return self._tables[path]["step"].copy()

    def column(self, path, name, n):
        return self._tables[path]["cols"][name][:n].copy()

    def append_rows(self, path, steps, cols):
        t = self._tables[path]
        for name, arr in cols.items():
            t["cols"][name] = np.concatenate([t["cols"][name], arr])
        t["step"] = np.concatenate([t["step"], steps])

    def truncate(self, path, n):
        t = self._tables[path]
        t["step"] = t["step"][:n]
        for name in t["cols"]:
            t["cols"][name] = t["cols"][name][:n]

    def surface_names(self):
        return list(self._surfaces)

    def create_surface(self, data):
        self._surfaces[data.name] = data

    def read_surface(self, name):
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

    def write_surface(self, name, points):
        s = self._surfaces[name]
        for index, values in points:
            for k, v in values.items():
                s.values[k][index] = v
            s.done[index] = True

    def flush(self):
        pass

    def refresh(self):
        pass

    def close(self):
        pass


def _chunk_rows(spec: FieldSpec) -> int:
    row_bytes = max(1, math.prod(spec.shape) * np.dtype(spec.dtype).itemsize)
    return int(max(1, min(1024, (64 * 1024) // row_bytes)))


class _H5Backend(_Backend):
    """Tables and surfaces in an HDF5 file opened with libver='latest' (SWMR-capable)."""

    def __init__(self, file: h5py.File, writable: bool) -> None:
        self.file = file
        self.path = Path(file.filename)
        self.writable = writable

    @property
    def description(self) -> str:
        return str(self.path)

    # structure changes are not allowed in SWMR mode: leave it, change, re-enter
    @contextlib.contextmanager
    def structural(self) -> Iterator[None]:
        if not self.writable:
            raise RunFileError(f"{self.path}: opened read-only")
        was_swmr = self.file.swmr_mode
        if was_swmr:
            self.file.flush()
            self.file.close()
            try:
                self.file = h5py.File(self.path, "r+", libver="latest", locking=LOCKING)
            except OSError as err:
                raise RunFileError(
                    f"{self.path}: cannot reopen the run to add a group ({_h5_reason(err)})"
                ) from None
        try:
            yield
        finally:
            self.file.flush()
            # In one process a reader's open handle shares HDF5's file object, which then
            # stays in SWMR mode across the reopen: only switch it on when it is off.
            if was_swmr and not self.file.swmr_mode:
                self.file.swmr_mode = True

    def root_attrs(self):
        return {k: _attr_value(v) for k, v in self.file.attrs.items()}

    def table_paths(self):
        paths = []
        for top in (FINDINGS_TABLE, CHECKPOINTS_TABLE):
            if top in self.file:
                paths.append(top)
        if METRICS_GROUP in self.file:
            paths.extend(f"{METRICS_GROUP}/{name}" for name in self.file[METRICS_GROUP])
        return paths

    def create_table(self, path, fields, attrs):
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

    def table_attrs(self, path):
        return {k: _attr_value(v) for k, v in self.file[path].attrs.items()}

    def table_fields(self, path):
        raw = json.loads(_attr_value(self.file[path].attrs["fields"]))
        return {n: FieldSpec.from_json(s) for n, s in raw.items()}

    def steps(self, path):
        return np.asarray(self.file[path]["step"][:], dtype=np.int64)

    def column(self, path, name, n):
        return np.asarray(self.file[path][name][:n])

    def append_rows(self, path, steps, cols):
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
        g = self.file[path]
        for name in g:
            if g[name].shape[0] > n:
                g[name].resize(n, axis=0)

    def surface_names(self):
        return list(self.file[SURFACES_GROUP]) if SURFACES_GROUP in self.file else []

    def create_surface(self, data):
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

    def write_surface(self, name, points):
        # One read-modify-write of the covering span per grid row and field (an HDF5 element
        # write costs ~0.3 ms; a span of a row costs about the same as one element), the
        # values before "done", so a point read back as done has its values.
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
        self.file.flush()

    def refresh(self):
        def visit(_name, obj):
            if isinstance(obj, h5py.Dataset):
                obj.refresh()

        self.file.visititems(visit)

    def close(self):
        with contextlib.suppress(Exception):
            self.file.close()


def _attr_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


# --------------------------------------------------------------------------- opening files


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _check_not_truncated(path: Path) -> None:
    """Refuse a file shorter than the end-of-file address its superblock records.

    SWMR readers do not check this themselves (reads past the end return zeros), so a
    file cut short by a copy or a full disk would otherwise read as silent zeros. Only
    superblock versions 2 and 3 (what ``libver='latest'`` writes) are checked; their
    end-of-file address sits at byte 28 (HDF5 File Format Specification, section II.A).
    """
    with open(path, "rb") as fh:
        head = fh.read(36)
    if len(head) < 36 or head[:8] != _HDF5_SIGNATURE or head[8] not in (2, 3):
        return
    width = head[9]
    if width != 8:
        return
    eof = int.from_bytes(head[28:36], "little")
    size = path.stat().st_size
    if size < eof:
        raise RunFileError(f"{path}: truncated file ({size} of {eof} bytes)")


def _open_for_reading(path: Path) -> h5py.File:
    if not path.exists():
        raise RunFileError(f"{path}: no such file")
    if path.is_dir():
        raise RunFileError(f"{path}: is a directory, expected a run file (.h5)")
    _check_not_truncated(path)
    try:
        f = h5py.File(path, "r", libver="latest", swmr=True, locking=LOCKING)
    except OSError as err:
        raise RunFileError(f"{path}: not a readable HDF5 file ({_h5_reason(err)})") from None
    try:
        _check_format(f, path)
    except BaseException:
        f.close()
        raise
    return f


def _h5_reason(err: OSError) -> str:
    text = str(err)
    if "(" in text and text.endswith(")"):
        text = text[text.index("(") + 1 : -1]
    return text or "unknown error"


def _check_format(f: h5py.File, path: Path) -> None:
    fmt = _attr_value(f.attrs.get("format", None))
    if fmt != FORMAT:
        raise RunFileError(f"{path}: an HDF5 file, but not a landscape run (no format='landscape')")
    version = int(_attr_value(f.attrs.get("format_version", -1)))
    if version > FORMAT_VERSION:
        raise RunFileError(
            f"{path}: format version {version} is newer than this library reads "
            f"({FORMAT_VERSION}); upgrade landscape-for-pytorch"
        )
    if version < 1:
        raise RunFileError(f"{path}: invalid format version {version}")


def _root_attrs(config: Mapping | None) -> dict:
    import torch  # local: the store itself does not need torch

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "torch_version": str(torch.__version__),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": json.dumps(dict(config or {}), default=str),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover_crashed(path: Path) -> None:
    """Rewrite a file whose writer died in SWMR mode, so that it can be opened for writing.

    HDF5 leaves a "file open for SWMR write" flag in the superblock when the writer is
    killed; reading still works (SWMR read ignores it), so copy everything into a fresh
    file beside it and replace the original atomically.
    """
    src = h5py.File(path, "r", libver="latest", swmr=True, locking=LOCKING)
    try:
        _check_format(src, path)
        owner_pid = int(_attr_value(src.attrs.get("writer_pid", -1)))
        owner_host = _attr_value(src.attrs.get("writer_host", ""))
        if owner_pid > 0 and owner_host == socket.gethostname() and owner_pid != os.getpid():
            if _pid_alive(owner_pid):
                raise RunFileError(f"{path}: is being written by another process (pid {owner_pid})")
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".recover", dir=path.parent)
        os.close(fd)
        with h5py.File(tmp, "w", libver="latest", locking=LOCKING) as dst:
            for key, value in src.attrs.items():
                dst.attrs[key] = value
            for key in src:
                src.copy(src[key], dst, name=key)
    finally:
        src.close()
    os.replace(tmp, path)


def _open_for_writing(path: Path) -> h5py.File:
    _check_not_truncated(path)
    try:
        f = h5py.File(path, "r+", libver="latest", locking=LOCKING)
    except OSError as err:
        if "already open for write" not in str(err):
            raise RunFileError(f"{path}: not a writable HDF5 file ({_h5_reason(err)})") from None
        _recover_crashed(path)
        f = h5py.File(path, "r+", libver="latest", locking=LOCKING)
    try:
        _check_format(f, path)
    except BaseException:
        f.close()
        raise
    return f


# --------------------------------------------------------------------------- writer


@dataclass
class _Pending:
    steps: list[int] = field(default_factory=list)
    cols: dict[str, list[np.ndarray]] = field(default_factory=dict)


class RunWriter:
    """Append-only writer of a run, to an HDF5 file or (``path=None``) to memory.

    ``mode``: ``"a"`` creates the file or resumes an existing run after its last committed
    step; ``"w"`` starts a new file (overwriting); ``"x"`` fails if the file exists.
    ``truncate_from``: on resume, drop every committed row with ``step >= truncate_from``
    (restarting from a checkpoint). Rows are buffered and written every ``flush_every``
    rows or ``flush_seconds`` seconds, on :meth:`flush`, and on :meth:`close`.
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
    ) -> None:
        if mode not in ("a", "w", "x"):
            raise ValueError(f"mode must be 'a', 'w' or 'x', got {mode!r}")
        if flush_every < 1:
            raise ValueError("flush_every must be >= 1")
        self.flush_every = int(flush_every)
        self.flush_seconds = float(flush_seconds)
        self._pending: dict[str, _Pending] = {}
        self._pending_points: dict[str, list[tuple[tuple, dict[str, float]]]] = {}
        self._known_surfaces: set[str] = set()
        self._n_pending = 0
        self._last_flush = time.monotonic()
        self._closed = False
        self.path = None if path is None else Path(path)

        if self.path is None:
            self._backend: _Backend = _MemoryBackend(_root_attrs(config))
            self._init_tables()
        else:
            self._backend = self._open_file(mode, config)
        self._fields = {p: self._backend.table_fields(p) for p in self._backend.table_paths()}
        self._last = {p: _last_or_none(self._backend.steps(p)) for p in self._fields}
        if truncate_from is not None:
            self._truncate(int(truncate_from))

    @classmethod
    def memory(cls, config: Mapping | None = None, **kwargs: Any) -> RunWriter:
        """The in-memory twin: same interface, nothing on disk."""
        return cls(None, config=config, **kwargs)

    # -- opening

    def _open_file(self, mode: str, config: Mapping | None) -> _H5Backend:
        path = self.path
        assert path is not None
        if path.is_dir():
            raise RunFileError(f"{path}: is a directory, expected a run file (.h5)")
        if path.exists() and mode == "x":
            raise RunFileError(f"{path}: already exists")
        if path.exists() and mode == "a":
            backend = _H5Backend(_open_for_writing(path), writable=True)
            self._backend = backend
            self._mark_owner(backend)
            self._trim_partial_rows(backend)
            backend.flush()
            backend.file.swmr_mode = True
            return backend
        if not path.parent.exists():
            raise RunFileError(f"{path}: directory {path.parent} does not exist")
        try:
            f = h5py.File(path, "w", libver="latest", locking=LOCKING)
        except OSError as err:
            raise RunFileError(f"{path}: cannot create ({_h5_reason(err)})") from None
        for key, value in _root_attrs(config).items():
            f.attrs[key] = value
        backend = _H5Backend(f, writable=True)
        self._backend = backend
        self._mark_owner(backend)
        self._init_tables()
        backend.flush()
        backend.file.swmr_mode = True
        return backend

    @staticmethod
    def _mark_owner(backend: _H5Backend) -> None:
        backend.file.attrs["writer_pid"] = os.getpid()
        backend.file.attrs["writer_host"] = socket.gethostname()

    @staticmethod
    def _trim_partial_rows(backend: _H5Backend) -> None:
        for p in backend.table_paths():
            backend.truncate(p, backend.file[p]["step"].shape[0])

    def _init_tables(self) -> None:
        self._backend.create_table(FINDINGS_TABLE, FINDING_FIELDS, {"kind": "findings"})
        self._backend.create_table(CHECKPOINTS_TABLE, CHECKPOINT_FIELDS, {"kind": "checkpoints"})

    def _truncate(self, first_dropped: int) -> None:
        for p in self._fields:
            steps = self._backend.steps(p)
            n = int(np.searchsorted(steps, first_dropped, side="left"))
            self._backend.truncate(p, n)
            self._last[p] = _last_or_none(steps[:n])
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
    ) -> None:
        """Declare metric ``name`` with its fields; idempotent when the fields match."""
        self._check_open()
        if not name or "/" in name:
            raise ValueError(f"invalid metric name {name!r}")
        specs = normalize_fields(fields)
        path = f"{METRICS_GROUP}/{name}"
        if path in self._fields:
            if self._fields[path] != specs:
                raise RunFileError(
                    f"metric {name!r} is already in the run with fields "
                    f"{_describe(self._fields[path])}, not {_describe(specs)}"
                )
            return
        attrs = {
            "kind": "metric",
            "class": cls,
            "params": json.dumps(dict(params or {}), default=str),
            "schedule": schedule,
        }
        self._flush_pending()
        self._backend.create_table(path, specs, attrs)
        self._fields[path] = specs
        self._last[path] = None

    # -- appending

    def append(self, name: str, step: int, values: Mapping[str, Any]) -> None:
        """Append one row of metric ``name`` at ``step`` (strictly after its last step)."""
        path = f"{METRICS_GROUP}/{name}"
        if path not in self._fields:
            raise KeyError(f"metric {name!r} was not declared")
        self._add_row(path, int(step), values, strict=True)

    def add_finding(self, finding: Finding) -> None:
        """Append a finding to ``/findings`` (steps non-decreasing)."""
        self._add_row(FINDINGS_TABLE, int(finding.step), finding.as_dict(), strict=False)

    def record_checkpoint(self, step: int, source: str) -> None:
        """Record that ``step`` was computed from checkpoint ``source``."""
        self._add_row(CHECKPOINTS_TABLE, int(step), {"path": source}, strict=True)

    def last_step(self, name: str) -> int | None:
        """Last step appended to metric ``name`` (committed or buffered), or None."""
        return self._last.get(f"{METRICS_GROUP}/{name}")

    def _add_row(self, path: str, step: int, values: Mapping[str, Any], strict: bool) -> None:
        self._check_open()
        specs = self._fields[path]
        last = self._last[path]
        if last is not None and (step <= last if strict else step < last):
            raise StepOrderError(
                f"{path}: step {step} does not come after the last step {last} "
                f"(to restart from a checkpoint, reopen with truncate_from={step})"
            )
        missing = [n for n in specs if n not in values and n != "step"]
        extra = [n for n in values if n not in specs and n != "step"]
        if missing or extra:
            raise ValueError(
                f"{path}: row fields do not match the declaration"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown {', '.join(extra)}" if extra else "")
            )
        row = {n: _encode(values[n], spec) for n, spec in specs.items()}
        pending = self._pending.setdefault(path, _Pending(cols={n: [] for n in specs}))
        pending.steps.append(step)
        for n, arr in row.items():
            pending.cols[n].append(arr)
        self._last[path] = step
        self._n_pending += 1
        self._flush_if_due()

    def _flush_if_due(self) -> None:
        """Flush after ``flush_every`` buffered rows and points or ``flush_seconds``."""
        if (
            self._n_pending >= self.flush_every
            or time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()

    def _flush_pending(self) -> None:
        for path, pending in self._pending.items():
            if not pending.steps:
                continue
            cols = {n: np.stack(v) for n, v in pending.cols.items()}
            self._backend.append_rows(path, np.asarray(pending.steps, np.int64), cols)
        self._pending.clear()
        for name, points in self._pending_points.items():
            self._backend.write_surface(name, points)
        self._pending_points.clear()
        self._n_pending = 0

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

        Resuming requires the same grid and fields; the returned ``done`` mask tells which
        points are already computed.
        """
        self._check_open()
        if not name or "/" in name:
            raise ValueError(f"invalid surface name {name!r}")
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
                raise RunFileError(
                    f"surface {name!r} already exists in the run with a different grid or fields; "
                    "choose another name"
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
        self._backend.create_surface(data)
        self._backend.flush()
        return self._backend.read_surface(name)

    def write_surface(
        self, name: str, index: int | tuple[int, ...], values: Mapping[str, float]
    ) -> None:
        """Store the values at one grid point (``index`` = i for 1-D, (j, i) for 2-D).

        Buffered like rows: written on the next flush (``flush_every`` rows and points,
        ``flush_seconds``, :meth:`flush`, :meth:`close`), each row's points in one write;
        a point not yet written when the process dies is recomputed on resume."""
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
        """Write buffered rows and make them visible to readers."""
        self._check_open()
        self._flush_pending()
        self._backend.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._flush_pending()
            self._backend.flush()
        finally:
            if isinstance(self._backend, _H5Backend):
                self._backend.close()
            self._closed = True

    def run(self) -> Run:
        """A read-only :class:`Run` view of what was written so far (flushes first)."""
        if self._closed:
            if self.path is None:
                return Run(self._backend)
            return Run.open(self.path)
        self.flush()
        return Run(self._backend)

    def _check_open(self) -> None:
        if self._closed:
            raise RunFileError(f"{self.description}: the run writer is closed")

    @property
    def description(self) -> str:
        return self._backend.description

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a writer dropped without close() still saves its rows
        with contextlib.suppress(Exception):
            self.close()


def _last_or_none(steps: np.ndarray) -> int | None:
    return int(steps[-1]) if len(steps) else None


def _describe(specs: Mapping[str, FieldSpec]) -> str:
    return ", ".join(f"{n}{list(s.shape) if s.shape else ''}:{s.dtype}" for n, s in specs.items())


# --------------------------------------------------------------------------- reader


class Run:
    """Read-only view of a run (an HDF5 file or an in-memory writer's data).

    Every consumer (plots, reports, ``landscape check``, ``landscape info``) reads through
    this class. Only committed rows are visible. For a file being written, call
    :meth:`refresh` to see rows committed since opening.
    """

    def __init__(self, backend: _Backend) -> None:
        self._backend = backend

    @classmethod
    def open(cls, path: str | os.PathLike) -> Run:
        """Open a run file for reading; any problem is a one-line :class:`RunFileError`."""
        p = Path(path)
        return cls(_H5Backend(_open_for_reading(p), writable=False))

    # -- file-level

    @property
    def source(self) -> str:
        return self._backend.description

    @property
    def attrs(self) -> dict:
        attrs = self._backend.root_attrs()
        attrs.pop("writer_pid", None)
        attrs.pop("writer_host", None)
        return attrs

    @property
    def format_version(self) -> int:
        return int(self.attrs["format_version"])

    @property
    def config(self) -> dict:
        return json.loads(self.attrs.get("config", "{}") or "{}")

    # -- metrics

    def metrics(self) -> list[str]:
        prefix = METRICS_GROUP + "/"
        return sorted(p[len(prefix) :] for p in self._backend.table_paths() if p.startswith(prefix))

    def _metric_path(self, name: str) -> str:
        path = f"{METRICS_GROUP}/{name}"
        if path not in self._backend.table_paths():
            known = ", ".join(self.metrics()) or "none"
            raise KeyError(f"no metric {name!r} in {self.source} (metrics: {known})")
        return path

    def fields(self, metric: str) -> dict[str, FieldSpec]:
        return self._backend.table_fields(self._metric_path(metric))

    def metric_attrs(self, metric: str) -> dict:
        attrs = self._backend.table_attrs(self._metric_path(metric))
        attrs.pop("fields", None)
        if "params" in attrs:
            attrs["params"] = json.loads(attrs["params"] or "{}")
        return attrs

    def steps(self, metric: str) -> np.ndarray:
        return self._backend.steps(self._metric_path(metric))

    def series(self, metric: str, field_name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one field over the committed rows."""
        path = self._metric_path(metric)
        specs = self._backend.table_fields(path)
        if field_name not in specs:
            raise KeyError(
                f"metric {metric!r} has no field {field_name!r} (fields: {', '.join(specs)})"
            )
        steps = self._backend.steps(path)
        values = self._backend.column(path, field_name, len(steps))
        return steps, values

    def all_series(self) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
        """Every scalar-or-array field: ``(metric, field, steps, values)``."""
        for metric in self.metrics():
            for name in self.fields(metric):
                steps, values = self.series(metric, name)
                yield metric, name, steps, values

    # -- tables

    def findings(self) -> list[Finding]:
        steps = self._backend.steps(FINDINGS_TABLE)
        n = len(steps)
        col = {name: self._backend.column(FINDINGS_TABLE, name, n) for name in FINDING_FIELDS}
        strings = {k: _decode_strings(v) for k, v in col.items() if FINDING_FIELDS[k].is_string}
        return [
            Finding(
                step=int(steps[i]),
                rule=strings["rule"][i],
                severity=strings["severity"][i],
                metric=strings["metric"][i],
                value=float(col["value"][i]),
                threshold=float(col["threshold"][i]),
                message=strings["message"][i],
                hint=strings["hint"][i],
            )
            for i in range(n)
        ]

    def checkpoints(self) -> list[tuple[int, str]]:
        steps = self._backend.steps(CHECKPOINTS_TABLE)
        paths = _decode_strings(self._backend.column(CHECKPOINTS_TABLE, "path", len(steps)))
        return [(int(s), p) for s, p in zip(steps, paths)]

    # -- surfaces

    def surfaces(self) -> list[str]:
        return sorted(self._backend.surface_names())

    def surface(self, name: str) -> SurfaceData:
        if name not in self._backend.surface_names():
            known = ", ".join(self.surfaces()) or "none"
            raise KeyError(f"no surface {name!r} in {self.source} (surfaces: {known})")
        return self._backend.read_surface(name)

    # -- lifecycle

    def refresh(self) -> None:
        """See rows a live writer committed since this reader opened (SWMR)."""
        self._backend.refresh()

    def close(self) -> None:
        if isinstance(self._backend, _H5Backend) and not self._backend.writable:
            self._backend.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def summary(self) -> dict:
        """What the run holds, as plain data (used by ``landscape info``)."""
        metrics = {}
        for m in self.metrics():
            steps = self.steps(m)
            metrics[m] = {
                "fields": {n: s.to_json() for n, s in self.fields(m).items()},
                "rows": len(steps),
                "first_step": int(steps[0]) if len(steps) else None,
                "last_step": int(steps[-1]) if len(steps) else None,
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
            }
        attrs = self.attrs
        return {
            "source": self.source,
            "format_version": self.format_version,
            "library_version": attrs.get("library_version"),
            "torch_version": attrs.get("torch_version"),
            "created": attrs.get("created"),
            "config": self.config,
            "metrics": metrics,
            "findings": len(self._backend.steps(FINDINGS_TABLE)),
            "checkpoints": len(self._backend.steps(CHECKPOINTS_TABLE)),
            "surfaces": surfaces,
        }
