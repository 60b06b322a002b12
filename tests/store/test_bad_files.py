"""Files that are not whole landscape runs give one clear error."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from landscape import RunFileError
from landscape.store import FORMAT_VERSION, Run, RunWriter, close_writers


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


def _good_run(path):
    with RunWriter(path, config={"model": "M", "n_parameters": 3}) as w:
        w.declare("a", {"v": None})
        for i in range(20):
            w.append("a", i, {"v": float(i)})


@pytest.mark.timeout(120)  # before the fix these hung in HDF5's SWMR retry loop for ever
@pytest.mark.parametrize("where", ["superblock", "object header"])
def test_a_damaged_file_is_refused_in_one_line_not_a_hang(tmp_path, where):
    """One flipped byte of metadata: SWMR reads retried the failed checksum for tens of
    minutes (every reading command hung, and SIGTERM could not stop ``analyze``)."""
    from click.testing import CliRunner
    from landscape_cli.main import cli

    path = tmp_path / "run.h5"
    _good_run(path)
    data = bytearray(path.read_bytes())
    if where == "superblock":
        data[20] ^= 0xFF
    else:
        data[200:264] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(RunFileError, match="not a readable HDF5 file") as info:
        Run.open(path)
    assert "\n" not in str(info.value)
    with pytest.raises(RunFileError, match="not a readable HDF5 file"):
        RunWriter(path, mode="a")
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 2 and "not a readable HDF5 file" in result.output  # input error
    assert "Traceback" not in result.output


@pytest.mark.timeout(120)  # before the fix this hung in HDF5's SWMR retry loop (20+ min)
def test_a_damaged_chunk_index_is_refused_in_one_line_not_a_hang(tmp_path):
    """Eight bytes changed in a block of a dataset's chunk index (the unused chunk
    addresses, 0xff, under a checksum): the open read headers and attributes only, so it
    passed, and the first read of the data retried in SWMR mode for 20 minutes, past
    Ctrl-C (store review)."""
    import re

    path = tmp_path / "run.h5"
    with RunWriter(path, mode="w") as w:
        w.declare("probe", {"samples": ()})
        w.declare("loss", {"value": ()})
        w.append("probe", 0, {"samples": 32.0})
        for s in range(3000):
            w.append("loss", s, {"value": 1.0 / (s + 1)})
    data = path.read_bytes()
    spans = [m.start() for m in re.finditer(rb"\xff{64,}", data[48:])]
    assert spans  # the index blocks' unused addresses
    for i, start in enumerate(spans):
        bad = bytearray(data)
        bad[48 + start + 16:48 + start + 24] = bytes(range(1, 9))
        damaged = tmp_path / f"bad{i}.h5"
        damaged.write_bytes(bytes(bad))
        with pytest.raises(RunFileError, match="not a readable HDF5 file"):
            run = Run.open(damaged)
            for metric in run.metrics():  # (reached only if the open let it through)
                for field in run.fields(metric):
                    run.series(metric, field)


def test_an_undecodable_superblock_is_refused_in_one_line(tmp_path):
    """The HDF5 signature and zeros: h5py raises RuntimeError, not OSError."""
    path = tmp_path / "run.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(RunFileError, match="not a readable HDF5 file"):
        Run.open(path)


@pytest.mark.parametrize("mode", ["a", "w"])
def test_a_file_this_process_still_writes_is_refused_in_one_line(tmp_path, mode):
    """A notebook cell run twice: h5py said 'Unable to start swmr writing' (mode a)."""
    path = tmp_path / "run.h5"
    first = RunWriter(path, mode="w")
    with pytest.raises(RunFileError, match="already open for writing in this process"):
        RunWriter(path, mode=mode)
    first.close()
    RunWriter(path, mode=mode).close()  # once closed, it opens
    held = [RunWriter(path)]  # one the user no longer reaches, kept alive elsewhere
    assert close_writers(path) == 1 and held[0].closed
    RunWriter(path, mode=mode).close()


def test_a_writer_dropped_without_close_does_not_block_its_file(tmp_path):
    path = tmp_path / "run.h5"
    first = RunWriter(path, mode="w")
    first.declare("loss", {"value": ()})
    cycle = [first]
    cycle.append(cycle)  # only the garbage collector frees it
    del first, cycle
    with RunWriter(path) as again:  # appends to the first one's file
        assert "loss" in again.run().metrics()


def test_mode_w_replaces_a_run_file_but_never_another_file(tmp_path):
    """--overwrite (mode='w') replaced whatever -o named: the checkpoint being analyzed
    (-o c1.pt), a report, source code, another program's HDF5 file."""
    import h5py
    import torch

    from landscape.store import RunWriter

    ckpt = tmp_path / "c1.pt"
    torch.save({"w": torch.zeros(3)}, ckpt)
    code = tmp_path / "mypkg.py"
    code.write_text("def net(): ...\n")
    foreign = tmp_path / "weights.h5"
    with h5py.File(foreign, "w") as f:
        f["w"] = [1.0, 2.0]
    for path, fragment in ((ckpt, "is not a landscape run file"),
                           (code, "is not a landscape run file"),
                           (foreign, "but not a landscape run")):
        before = path.read_bytes()
        with pytest.raises(RunFileError, match=fragment):
            RunWriter(path, mode="w")
        assert path.read_bytes() == before
    run = tmp_path / "run.h5"
    with RunWriter(run) as w:
        w.declare("loss", {"value": None})
        w.append("loss", 3, {"value": 1.0})
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(run.read_bytes()[:600])  # an HDF5 file that no longer reads
    empty = tmp_path / "empty.h5"
    empty.touch()
    for path in (run, damaged, empty):
        with RunWriter(path, mode="w") as w:
            w.declare("loss", {"value": None})
            w.append("loss", 0, {"value": 1.0})
        assert list(w.run().steps("loss")) == [0]


def test_a_surface_without_its_grids_is_a_damaged_file(tmp_path):
    """info and report gave a KeyError traceback; check passed it."""
    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.create_surface("random", np.linspace(-1, 1, 3), np.linspace(-1, 1, 3))
        w.write_surface("random", (0, 0), {"loss": 1.0})
    with h5py.File(path, "a") as f:
        del f["surfaces/random/loss"]
    with pytest.raises(RunFileError, match="damaged run file: surface 'random' \\(no 'loss'"):
        Run.open(path)
    for what, fragment in (("y", "without its 'y' grid"), ("attrs", "no attrs attribute")):
        with RunWriter(path, mode="w") as w:
            w.create_surface("random", np.linspace(-1, 1, 3), np.linspace(-1, 1, 3))
        with h5py.File(path, "a") as f:
            if what == "y":
                del f["surfaces/random/y"]
            else:
                del f["surfaces/random"].attrs["attrs"]
        with pytest.raises(RunFileError, match=fragment):
            Run.open(path)


def test_hdf5_errors_give_the_systems_words():
    """'cannot create (unable to open file: name = ..., errno = 1, error message = ...,
    flags = 13, o_flags = 242)' leaked h5py's internals into a one-line error."""
    from landscape.store.format import _h5_reason

    raw = OSError("Unable to create file (unable to open file: name = '../ro/new.h5', "
                  "errno = 1, error message = 'Operation not permitted', flags = 13, "
                  "o_flags = 242)")
    assert _h5_reason(raw) == "Operation not permitted"
    assert _h5_reason(OSError("Unable to open file (file signature not found)")) == (
        "file signature not found")


def _column_shorter_than_its_steps(f):
    f["metrics/loss/value"].resize(1, axis=0)


def _surface_as_a_dataset(f):
    del f["surfaces/s"]
    f["surfaces"].create_dataset("s", data=np.zeros(3))


@pytest.mark.parametrize(("damage", "match"), [
    (lambda f: f.attrs.__setitem__("format_version", "x"), "invalid format version 'x'"),
    (lambda f: f.attrs.__setitem__("format_version", 0), "invalid format version 0"),
    # read as version -1, an internal default; and 1.5 passed as version 1
    (lambda f: f.attrs.__delitem__("format_version"), "it has no format_version attribute"),
    (lambda f: f.attrs.__setitem__("format_version", 1.5), "invalid format version 1.5"),
    (lambda f: f["metrics/loss"].attrs.__delitem__("fields"),
     "table 'metrics/loss' (no fields attribute)"),
    (_column_shorter_than_its_steps,
     "table 'metrics/loss' (field 'value' has fewer rows than its steps)"),
    (_surface_as_a_dataset, "surface 's' (not a group)"),
])
def test_a_damaged_version_table_or_surface_is_a_run_file_error(tmp_path, damage, match):
    """Untested until the coverage audit; each was a one-line RunFileError already."""
    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.declare("loss", {"value": None})
        for s in range(4):
            w.append("loss", s, {"value": float(s)})
        w.create_surface("s", np.linspace(-1, 1, 3))
        w.write_surface("s", 0, {"loss": 1.0})
    with h5py.File(path, "a") as f:
        damage(f)
    with pytest.raises(RunFileError, match=match.replace("(", r"\(").replace(")", r"\)")):
        with Run.open(path) as run:
            run.series("loss", "value")
            run.surface("s")


@pytest.mark.parametrize("name", [".", ".."])
def test_a_metric_or_field_named_dot_is_refused_before_it_breaks_the_file(tmp_path, name):
    """A metric named '.' wrote its datasets into /metrics itself, after which every reader
    refused the whole file, its loss rows included (store review)."""
    import torch

    import landscape as ls

    with RunWriter(tmp_path / "run.h5", mode="w") as w:
        w.declare("loss", {"value": ()})
        w.append("loss", 0, {"value": 1.0})
        with pytest.raises(ValueError, match="invalid metric name"):
            w.declare(name, {"value": ()})
        with pytest.raises(ValueError, match="invalid field name"):
            w.declare("other", {name: ()})
    assert Run.open(tmp_path / "run.h5").series("loss", "value")[1].tolist() == [1.0]

    class Dot(ls.metrics.Metric):
        FIELDS = ("value",)

        def compute(self, ctx):
            return {"value": 1.0}

    Dot.name = name
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"not '\.' or '\.\.'"):
        ls.Monitor(model, torch.nn.functional.mse_loss, tmp_path / "m.h5",
                   metrics=[Dot()]).start()
