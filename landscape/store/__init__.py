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

The package's modules, one concern each:

* :mod:`~landscape.store.format`: the constants of the format, field specs, and how
  values, findings and root attributes are encoded;
* :mod:`~landscape.store.backends`: the storage interface and its HDF5 and memory
  implementations;
* :mod:`~landscape.store.recovery`: opening files safely, and rewriting a file whose
  writer was killed so that it can be resumed;
* :mod:`~landscape.store.writer`: :class:`RunWriter`, validated and buffered appends;
* :mod:`~landscape.store.reader`: :class:`Run`, the read-only view every consumer uses.
* :mod:`~landscape.store.writer_status`: whether a file's writer closed it, still writes
  it, or ended without closing it.
"""

from landscape.store.format import (
    CHECKPOINT_FIELDS,
    CHECKPOINTS_TABLE,
    FINDING_FIELDS,
    FINDINGS_TABLE,
    FORMAT,
    FORMAT_VERSION,
    LOCKING,
    METRICS_GROUP,
    SURFACES_GROUP,
    FieldsLike,
    FieldSpec,
    SurfaceData,
    normalize_fields,
)
from landscape.store.reader import Run
from landscape.store.recovery import is_hdf5, refuse_to_overwrite_hdf5
from landscape.store.writer import RunWriter, close_writers

__all__ = [
    "Run", "RunWriter", "SurfaceData", "close_writers", "is_hdf5",
    "refuse_to_overwrite_hdf5", "FieldSpec", "FieldsLike",
    "normalize_fields",
    "FORMAT", "FORMAT_VERSION", "METRICS_GROUP", "FINDINGS_TABLE", "CHECKPOINTS_TABLE",
    "SURFACES_GROUP", "LOCKING", "FINDING_FIELDS", "CHECKPOINT_FIELDS",
]
