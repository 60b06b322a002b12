"""Format version 1 of the run file: its constants, field specs and value encoding.

Everything here is shared by both backends, the writer and the reader: the names of the
top-level groups, the fixed columns of ``/findings`` and ``/checkpoints``, how a row value
becomes a stored array and back, and the root attributes a new run starts with. The
layout itself is documented in ``docs/file-format.md``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import h5py
import numpy as np

from landscape._checks import shown
from landscape._errors import RunFileError
from landscape._version import __version__
from landscape.findings import Finding

__all__ = [
    "FORMAT", "FORMAT_VERSION", "METRICS_GROUP", "FINDINGS_TABLE", "CHECKPOINTS_TABLE",
    "SURFACES_GROUP", "LOCKING", "FieldSpec", "FieldsLike", "normalize_fields",
    "FINDING_FIELDS", "CHECKPOINT_FIELDS", "SurfaceData",
]

FORMAT = "landscape"
FORMAT_VERSION = 1

METRICS_GROUP = "metrics"
FINDINGS_TABLE = "findings"
CHECKPOINTS_TABLE = "checkpoints"
SURFACES_GROUP = "surfaces"
STATE_GROUP = "state"  # what a resumed monitor needs back (its default probe)
#: the tables the monitor writes itself under /metrics: which steps ran densely, the probe
#: it used, the metrics not measured at a step (no metric may take these names)
MONITOR_TABLES = ("adaptive", "probe", "unmeasured")

# HDF5 file locks are off for every handle (they must agree within one process): a live
# reader must never block the writer, which briefly reopens the file to add a metric or a
# surface. Concurrent writers are still refused through the SWMR superblock flags and the
# writer_pid/writer_host attributes.
LOCKING = False

DISK_MARGIN = 8 * 2**20
"""Bytes a writer leaves free on the run file's disk: HDF5's metadata and closing the file
need room, and a write that fills the disk crashed the process inside HDF5. A crashed run
is reopened through a copy of it, which needs the file's size and this margin free."""


# --------------------------------------------------------------------------- field specs


@dataclass(frozen=True)
class FieldSpec:
    """Shape of one row of a field (``()`` for a scalar) and its numpy dtype string."""

    shape: tuple[int, ...] = ()
    dtype: str = "float64"

    def to_json(self) -> dict:
        """The spec as stored in a table's ``fields`` attribute.

        Returns:
            ``{"shape": [...], "dtype": "..."}``.
        """
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, obj: Mapping) -> FieldSpec:
        """The spec stored by :meth:`to_json`.

        Args:
            obj: a mapping with ``shape`` and ``dtype``.

        Returns:
            The field spec.
        """
        return cls(tuple(int(s) for s in obj["shape"]), str(obj["dtype"]))

    @property
    def is_string(self) -> bool:
        """Whether the field holds fixed-width byte strings (dtype kind ``S``)."""
        return np.dtype(self.dtype).kind == "S"

    def __str__(self) -> str:
        """``float64`` for a scalar, ``float64[5]`` (``float64[2,3]``) for an array."""
        return f"{self.dtype}[{','.join(map(str, self.shape))}]" if self.shape else self.dtype


FieldsLike = Mapping[str, Union[FieldSpec, tuple, str, None]]


_STEP_RANGE = (-(2**63), 2**63 - 1)  # the int64 of the step datasets


def step_value(step: Any, what: str = "step") -> int:
    """``step`` as an int: an integer of any type, or a float with an integer value.

    Args:
        step: the value given.
        what: its name in the error.

    Raises:
        ValueError: a string, a bool, a fraction (``3.5``), NaN, or beyond the int64 the
            run file stores steps in.
    """
    import operator

    value: int | None = None
    if not isinstance(step, (bool, str, bytes)):
        try:
            value = operator.index(step)  # int, numpy integers, integer 0-d tensors
        except TypeError:
            try:
                number = float(step)  # a float of any kind, a one-element float tensor
            except (TypeError, ValueError, RuntimeError):
                number = math.nan
            if number.is_integer():
                value = int(number)
    if value is None:
        raise ValueError(f"{what} must be an integer (the optimizer step's index), got "
                         f"{shown(step, typed=True)}")
    if not _STEP_RANGE[0] <= value <= _STEP_RANGE[1]:
        raise ValueError(f"{what} {value} is beyond the 64-bit integers a run file stores")
    return value


def plain_name(name: object) -> bool:
    """Whether ``name`` can name a group or dataset of the run file on its own.

    A non-empty string without ``/``, and neither ``.`` nor ``..``: ``metrics/.`` is the
    ``/metrics`` group itself, whose datasets there made every reader refuse the file.
    """
    return isinstance(name, str) and bool(name) and "/" not in name and name not in (".", "..")


def normalize_fields(fields: FieldsLike) -> dict[str, FieldSpec]:
    """Accept ``{name: FieldSpec | shape-tuple | dtype-string | None}`` and return FieldSpecs.

    Args:
        fields: field names mapped to a :class:`FieldSpec`, a shape tuple (float64), a
            dtype string (scalar) or None (a float64 scalar).

    Returns:
        The same names mapped to :class:`FieldSpec`.

    Raises:
        ValueError: for an empty mapping, an invalid name (empty, with ``/``, or ``step``)
            or a spec of another type.
    """
    if not isinstance(fields, Mapping):
        raise TypeError(f"fields: expected a mapping {{name: spec}} (None for a float64 "
                        f"scalar), got {type(fields).__name__} {fields!r}")
    out: dict[str, FieldSpec] = {}
    for name, spec in fields.items():
        if not plain_name(name) or name == "step":
            raise ValueError(f"invalid field name {name!r} (non-empty, no '/', not 'step', "
                             "'.' or '..')")
        if spec is None:
            spec = FieldSpec()
        elif isinstance(spec, str):
            spec = FieldSpec((), spec)
        elif isinstance(spec, tuple):
            spec = FieldSpec(tuple(int(s) for s in spec))
        elif not isinstance(spec, FieldSpec):
            raise ValueError(f"field {name!r}: expected a FieldSpec, shape tuple or dtype string")
        if any(s < 0 for s in spec.shape):
            raise ValueError(f"field {name!r}: shape {spec.shape} has a negative size")
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
        "extra": "S1024",  # JSON; absent from files written before it was added
    }
)
CHECKPOINT_FIELDS = normalize_fields({"path": "S1024"})


def _describe(specs: Mapping[str, FieldSpec]) -> str:
    return ", ".join(f"{n}{list(s.shape) if s.shape else ''}:{s.dtype}" for n, s in specs.items())


# --------------------------------------------------------------------------- values


def as_numpy(value: Any) -> Any:
    """A torch tensor as a NumPy array on the host, any other value as it is.

    bfloat16, which NumPy lacks, becomes float32. Shared by the writer, the alarm rules and
    the mirrors, which all turn a metric's row into NumPy (without importing torch).
    """
    if not hasattr(value, "detach"):
        return value
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
        value = value.float()
    return value.numpy()


def _encode(value: Any, spec: FieldSpec, name: str = "value") -> np.ndarray:
    if spec.is_string:
        width = np.dtype(spec.dtype).itemsize
        # (a file name with bytes that are not UTF-8, as the OS gave them: kept, not refused)
        raw = str(value).encode("utf-8", "surrogateescape")
        if len(raw) > width:
            raw = raw[: width - 3].decode("utf-8", "ignore").encode("utf-8") + b"..."
        return np.asarray(raw, dtype=spec.dtype)
    try:
        raw = as_numpy(value)
    except Exception as err:  # a meta or nested tensor, a device whose copy fails
        raise ValueError(f"field {name!r}: {type(value).__name__} cannot be read as numbers "
                         f"({type(err).__name__}: {err})") from None
    if np.iscomplexobj(raw) and np.dtype(spec.dtype).kind != "c":
        raise ValueError(f"field {name!r}: a complex value {value!r} in a field of "
                         f"{spec.dtype} (its imaginary part would be dropped)")
    try:
        arr = np.asarray(raw, dtype=spec.dtype)
    except (TypeError, ValueError, OverflowError) as err:  # (10**400: no float64)
        raise ValueError(f"field {name!r}: {shown(value)} is not a number ({spec.dtype}): "
                         f"{err}") from None
    if arr.shape != spec.shape:
        if arr.size == math.prod(spec.shape):
            arr = arr.reshape(spec.shape)
        else:
            raise ValueError(f"field {name!r}: a value of shape {arr.shape} does not fit its "
                             f"shape {spec.shape}")
    return arr


def _decode_strings(arr: np.ndarray) -> list[str]:
    return [b.decode("utf-8", "replace") for b in arr.tolist()]


def _attr_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


# --------------------------------------------------------------------------- findings


def json_default(value: Any) -> Any:
    """``json.dumps``'s ``default=`` for a finding's ``extra``: arrays and tensors as lists."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if hasattr(value, "detach"):  # torch tensor
        return value.detach().cpu().tolist()
    return str(value)


def _encode_extra(extra: Mapping, width: int) -> str:
    """``extra`` as JSON of at most ``width`` bytes: the leading items that fit."""
    text = json.dumps(dict(extra), default=json_default)
    items = list(extra.items())
    while len(text.encode("utf-8")) > width and items:
        items.pop()
        text = json.dumps(dict(items), default=json_default)
    return text


def _finding_row(finding: Finding, specs: Mapping[str, FieldSpec]) -> dict[str, Any]:
    """The ``/findings`` row of ``finding`` for a table with fields ``specs``.

    A table created before the ``extra`` column existed gets a row without it.
    """
    row: dict[str, Any] = finding.as_dict()
    if "extra" in specs:
        row["extra"] = _encode_extra(finding.extra, np.dtype(specs["extra"].dtype).itemsize)
    return row


def _decode_extra(text: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# --------------------------------------------------------------------------- surfaces


@dataclass
class SurfaceData:
    """A stored 1-D or 2-D surface.

    Grids are ``(nx,)`` or ``(ny, nx)`` with ``Z[j, i] = f(x_i, y_j)``, the order
    ``matplotlib.pyplot.contour(x, y, Z)`` expects (``docs/file-format.md``, "Surfaces").
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
        """1 for a line, 2 for a plane."""
        return 1 if self.y is None else 2

    @property
    def shape(self) -> tuple[int, ...]:
        """The grid shape, ``(nx,)`` or ``(ny, nx)``."""
        return self.done.shape

    @property
    def complete(self) -> bool:
        """Whether every grid point has been computed."""
        return bool(self.done.all())


# --------------------------------------------------------------------------- root


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


def _check_format(f: h5py.File, path: Path) -> None:
    fmt = _attr_value(f.attrs.get("format", None))
    if fmt != FORMAT:
        raise RunFileError(f"{path}: an HDF5 file, but not a landscape run (no format='landscape')")
    if "format_version" not in f.attrs:
        raise RunFileError(f"{path}: damaged run file: it has no format_version attribute")
    raw = _attr_value(f.attrs["format_version"])
    try:
        version = operator.index(raw) if not isinstance(raw, str) else int(raw)
    except (TypeError, ValueError):  # a fraction (1.5) is no version either
        raise RunFileError(f"{path}: invalid format version {raw!r}") from None
    if version > FORMAT_VERSION:
        raise RunFileError(
            f"{path}: format version {version} is newer than this library reads "
            f"({FORMAT_VERSION}); upgrade landscape-for-pytorch"
        )
    if version < 1:
        raise RunFileError(f"{path}: invalid format version {version}")


def check_tables(f: h5py.File, path: Path) -> None:
    """Refuse a run file whose tables are damaged, in one line, before anything reads them.

    The ``findings`` and ``checkpoints`` tables must exist (every writer creates them), and
    every table must have a 1-D ``step`` dataset, a ``fields`` attribute that decodes to
    field specs, and a dataset per field holding at least as many rows as ``step`` (a
    crashed writer may leave them longer). Every surface must hold its grids
    (:func:`_check_surface`).

    Raises:
        RunFileError: the first damaged table, named.
    """
    for name in (FINDINGS_TABLE, CHECKPOINTS_TABLE):
        if name not in f:
            raise RunFileError(f"{path}: damaged run file: no {name!r} table")
    groups = [FINDINGS_TABLE, CHECKPOINTS_TABLE]
    if METRICS_GROUP in f:
        groups += [f"{METRICS_GROUP}/{name}" for name in f[METRICS_GROUP]]
    for name in groups:
        try:
            _check_table(f[name], strict=name.startswith(METRICS_GROUP))
        except (ValueError, TypeError) as err:  # json's JSONDecodeError is a ValueError
            raise RunFileError(f"{path}: damaged run file: table {name!r} ({err})") from None
    for name in f[SURFACES_GROUP] if SURFACES_GROUP in f else ():
        try:
            _check_surface(f[SURFACES_GROUP][name])
        except (ValueError, TypeError) as err:
            raise RunFileError(f"{path}: damaged run file: surface {name!r} ({err})") from None


def _check_surface(g: Any) -> None:
    """One surface's structure (:func:`check_tables`); ``ValueError`` says what is wrong.

    Its ``fields`` attribute lists its grids and its ``attrs`` attribute is JSON; ``x``,
    ``done`` and every field's grid must be there, of ``done``'s shape, and ``y`` for a
    2-D surface.
    """
    if not isinstance(g, h5py.Group):
        raise ValueError("not a group")
    try:
        fields = json.loads(_attr_value(g.attrs["fields"]))
    except (KeyError, ValueError):
        raise ValueError("no fields attribute, or not JSON") from None
    if not isinstance(fields, list):
        raise ValueError("its fields attribute is not a list")
    try:
        json.loads(_attr_value(g.attrs["attrs"]))
    except (KeyError, ValueError):
        raise ValueError("no attrs attribute, or not JSON") from None
    for name in ("x", "done", *fields):
        if not isinstance(g.get(name), h5py.Dataset):
            raise ValueError(f"no {name!r} grid")
    shape = g["done"].shape
    if len(shape) == 2 and not isinstance(g.get("y"), h5py.Dataset):
        raise ValueError("a 2-D surface without its 'y' grid")
    for name in fields:
        if g[name].shape != shape:
            raise ValueError(f"the {name!r} grid is {g[name].shape}, its done mask {shape}")


_CHECKED_STEPS = 65536  # rows of each table whose steps are checked at open


def _check_table(g: Any, strict: bool) -> None:
    """One table's structure (:func:`check_tables`); ``ValueError`` says what is wrong.

    Its last :data:`_CHECKED_STEPS` steps must increase: strictly (``strict``, a metric's:
    one row a step) or not (findings, checkpoints).
    """
    if not isinstance(g, h5py.Group):
        raise ValueError("not a group")
    steps = g.get("step")
    if not isinstance(steps, h5py.Dataset) or steps.ndim != 1:
        raise ValueError("no 1-D step dataset")
    # the last rows only, where a crash or a damaged write lands: every open reads them
    # (``landscape watch`` at each look), and whole columns of long runs cost 0.2 s more
    tail = np.asarray(steps[max(0, steps.shape[0] - _CHECKED_STEPS):])
    if (np.diff(tail) <= (0 if strict else -1)).any():
        raise ValueError("its steps do not increase")
    if "fields" not in g.attrs:
        raise ValueError("no fields attribute")
    try:
        fields = json.loads(_attr_value(g.attrs["fields"]))
    except ValueError:
        raise ValueError("its fields attribute is not JSON") from None
    if not isinstance(fields, dict):
        raise ValueError("its fields attribute is not a mapping")
    for field_name, spec in fields.items():
        try:
            FieldSpec.from_json(spec)
        except (KeyError, AttributeError) as err:
            raise ValueError(f"field {field_name!r} has an invalid spec ({err})") from None
        column = g.get(field_name)
        if not isinstance(column, h5py.Dataset) or column.ndim == 0:
            raise ValueError(f"no dataset for field {field_name!r}")
        if column.shape[0] < steps.shape[0]:
            raise ValueError(f"field {field_name!r} has fewer rows than its steps")


def _h5_reason(err: BaseException | None) -> str:
    """The reason in an HDF5 error's text: the system's words where it gives them.

    ``unable to open file: name = '...', errno = 1, error message = 'Operation not
    permitted', flags = 13, ...`` is ``Operation not permitted``.
    """
    text = str(err)
    system = re.search(r"error message = '([^']*)'", text)
    if system:
        return system.group(1)
    if "(" in text and text.endswith(")"):
        text = text[text.index("(") + 1 : -1]
    return text or "unknown error"


def component_names(config: Any, field: str, shape: tuple[int, ...]) -> list[str] | None:
    """The names of a vector field's components, when the metric's ``config()`` gives them.

    ``config["labels"][field]`` names the components of one field; otherwise
    ``config["layers"]`` (per-layer metrics: spectral alignment's modules, the sentinels'
    parameters) names those of every field with one value per layer (docs/monitor.md,
    "Writing your own metric"). The plots, the report and the dashboard mirrors read them.

    Args:
        config: the metric's stored configuration (anything else: no names).
        field: the field.
        shape: its per-row shape.

    Returns:
        One name per component, or None when the configuration names none of this shape.
    """
    if not isinstance(config, Mapping) or not shape:
        return None
    labels = config.get("labels")
    names = labels.get(field) if isinstance(labels, Mapping) else None
    if isinstance(names, (list, tuple)):  # one per component, in row-major order
        return [str(x) for x in names] if len(names) == math.prod(shape) else None
    layers = config.get("layers")
    if isinstance(layers, (list, tuple)) and tuple(shape) == (len(layers),):
        return [str(x) for x in layers]
    return None


def resumed_after(attrs: Mapping[str, Any]) -> list[int]:
    """The root ``resumed_after`` attribute of ``attrs``, decoded (docs/file-format.md).

    The last step of any metric table each time a writer reopened the run; ``[]`` for a
    run written in one session, or an attribute that is not a JSON list of integers.
    """
    try:
        return [int(b) for b in json.loads(str(attrs.get("resumed_after", "[]")))]
    except (TypeError, ValueError):
        return []
