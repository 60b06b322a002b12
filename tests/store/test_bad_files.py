"""Files that are not whole landscape runs give one clear error."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from landscape import RunFileError
from landscape.store import FORMAT_VERSION, Run, RunWriter


@pytest.mark.parametrize(
    "content, match",
    [
        (b"this is not hdf5" * 64, "not a readable HDF5 file"),
        (b"", "not a readable HDF5 file"),
    ],
)
def test_garbage_files_give_one_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.h5"
    path.write_bytes(content)
    with pytest.raises(RunFileError, match=match) as info:
        Run.open(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_file_gives_one_clear_error(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.declare("a", {"v": None, "big": (256,)})
        for i in range(200):
            w.append("a", i, {"v": float(i), "big": np.full(256, i)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(RunFileError) as info:
        run = Run.open(path)
        run.series("a", "big")  # some truncations only show when the data is read
    assert str(path) in str(info.value)


def test_foreign_and_future_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(RunFileError, match="not a landscape run"):
        Run.open(foreign)
    future = tmp_path / "future.h5"
    with RunWriter(future):
        pass
    with h5py.File(future, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(RunFileError, match="newer than this library"):
        Run.open(future)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(RunFileError, match="no such file"):
        Run.open(tmp_path / "missing.h5")
    with pytest.raises(RunFileError, match="is a directory"):
        Run.open(tmp_path)
    with pytest.raises(RunFileError, match="does not exist"):
        RunWriter(tmp_path / "nodir" / "run.h5")
