"""The run store: round trips, ordering, resume, durability, live reading, bad files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from landscape import RunFileError, StepOrderError
from landscape.findings import Finding
from landscape.store import FORMAT_VERSION, Run, RunWriter

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["hdf5", "memory"])
def writer_factory(request, tmp_path):
    def make(**kwargs):
        if request.param == "memory":
            return RunWriter.memory(**kwargs)
        return RunWriter(tmp_path / "run.h5", **kwargs)

    return make


def test_round_trip_of_metrics_findings_checkpoints_and_surfaces(writer_factory):
    w = writer_factory(config={"lr": 0.1, "note": "x"})
    w.declare(
        "loss", {"value": None, "hist": (3,)}, cls="Loss", params={"k": 2}, schedule="every(1)"
    )
    for step in range(0, 20, 2):
        w.append("loss", step, {"value": step / 2, "hist": np.arange(3) * step})
    w.add_finding(
        Finding(4, "loss_spike", "warning", "loss/value", 9.0, 3.0, "loss jumped", "lower lr")
    )
    w.add_finding(Finding(4, "nonfinite", "error", "loss/value", float("nan"), 0.0, "nan loss"))
    w.record_checkpoint(10, "ckpt/epoch10.pt")
    w.create_surface("plane", [-1, 0, 1], [-1, 1], fields=("loss", "accuracy"), attrs={"seed": 3})
    w.write_surface("plane", (1, 2), {"loss": 0.25, "accuracy": 0.75})
    run = w.run()
    steps, values = run.series("loss", "value")
    np.testing.assert_array_equal(steps, np.arange(0, 20, 2))
    np.testing.assert_allclose(values, steps / 2)
    _, hist = run.series("loss", "hist")
    assert hist.shape == (10, 3)
    np.testing.assert_allclose(hist[3], [0, 6, 12])
    assert run.config == {"lr": 0.1, "note": "x"}
    assert run.metric_attrs("loss")["params"] == {"k": 2}
    assert run.metric_attrs("loss")["schedule"] == "every(1)"
    findings = run.findings()
    assert [f.rule for f in findings] == ["loss_spike", "nonfinite"]
    assert findings[0].hint == "lower lr" and np.isnan(findings[1].value)
    assert run.checkpoints() == [(10, "ckpt/epoch10.pt")]
    surf = run.surface("plane")
    assert surf.shape == (2, 3) and surf.done.sum() == 1 and surf.done[1, 2]
    assert surf.values["loss"][1, 2] == 0.25 and np.isnan(surf.values["loss"][0, 0])
    assert surf.attrs == {"seed": 3}
    assert run.format_version == FORMAT_VERSION
    w.close()


def test_steps_must_increase_per_metric(writer_factory):
    w = writer_factory()
    w.declare("a", {"v": None})
    w.declare("b", {"v": None})
    w.append("a", 3, {"v": 1.0})
    w.append("b", 3, {"v": 1.0})  # other metrics keep their own order
    with pytest.raises(StepOrderError, match="step 3 does not come after the last step 3"):
        w.append("a", 3, {"v": 1.0})
    with pytest.raises(StepOrderError):
        w.append("a", 1, {"v": 1.0})
    w.close()


def test_rows_must_match_the_declaration(writer_factory):
    w = writer_factory()
    w.declare("a", {"v": None, "w": (2,)})
    with pytest.raises(ValueError, match="missing w"):
        w.append("a", 0, {"v": 1.0})
    with pytest.raises(ValueError, match="unknown z"):
        w.append("a", 0, {"v": 1.0, "w": [1, 2], "z": 3})
    with pytest.raises(ValueError, match="does not fit"):
        w.append("a", 0, {"v": 1.0, "w": [1, 2, 3]})
    with pytest.raises(KeyError, match="not declared"):
        w.append("nope", 0, {"v": 1.0})
    w.declare("a", {"v": None, "w": (2,)})  # same declaration: fine
    with pytest.raises(RunFileError, match="already in the run"):
        w.declare("a", {"v": None})
    w.close()


def test_long_strings_are_cut_not_rejected(writer_factory):
    w = writer_factory()
    w.add_finding(Finding(0, "r", "info", "m", 1.0, 1.0, "é" * 600))
    msg = w.run().findings()[0].message
    assert msg.endswith("...") and len(msg.encode()) <= 512
    w.close()


def test_buffered_rows_are_written_on_close_and_on_exception(tmp_path):
    path = tmp_path / "run.h5"
    with pytest.raises(RuntimeError):
        with RunWriter(path, flush_every=10_000, flush_seconds=1e9) as w:
            w.declare("a", {"v": None})
            for i in range(7):
                w.append("a", i, {"v": float(i)})
            raise RuntimeError("training crashed")
    with Run.open(path) as run:
        assert list(run.steps("a")) == list(range(7))


def test_resume_appends_after_the_last_committed_step(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.declare("a", {"v": None})
        for i in range(5):
            w.append("a", i, {"v": float(i)})
    with RunWriter(path) as w:
        assert w.last_step("a") == 4
        with pytest.raises(StepOrderError, match="truncate_from=2"):
            w.append("a", 2, {"v": 0.0})
        w.declare("a", {"v": None})
        w.append("a", 5, {"v": 5.0})
    with Run.open(path) as run:
        assert list(run.steps("a")) == [0, 1, 2, 3, 4, 5]


def test_truncate_from_restarts_at_a_checkpoint(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.declare("a", {"v": None})
        for i in range(10):
            w.append("a", i, {"v": float(i)})
            w.add_finding(Finding(i, "r", "info", "a/v", float(i), 0.0, "m"))
    with RunWriter(path, truncate_from=6) as w:
        assert w.last_step("a") == 5
        w.append("a", 6, {"v": 60.0})
    with Run.open(path) as run:
        steps, values = run.series("a", "v")
        assert list(steps) == [0, 1, 2, 3, 4, 5, 6] and values[-1] == 60.0
        assert [f.step for f in run.findings()] == [0, 1, 2, 3, 4, 5]


def test_mode_w_overwrites_and_mode_x_refuses(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.declare("a", {"v": None})
        w.append("a", 0, {"v": 1.0})
    with pytest.raises(RunFileError, match="already exists"):
        RunWriter(path, mode="x")
    with RunWriter(path, mode="w") as w:
        assert w.run().metrics() == []


def test_surface_resume_keeps_computed_points_and_rejects_a_different_grid(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.create_surface("line", np.linspace(-1, 1, 5))
        w.write_surface("line", 0, {"loss": 1.0})
        w.write_surface("line", 3, {"loss": float("nan")})  # a diverged point is still "done"
    with RunWriter(path) as w:
        surf = w.create_surface("line", np.linspace(-1, 1, 5))
        assert list(surf.done) == [True, False, False, True, False]
        with pytest.raises(RunFileError, match="different grid"):
            w.create_surface("line", np.linspace(-1, 1, 7))


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


# --------------------------------------------------------------------------- processes

WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from landscape.store import RunWriter
    path, n, sleep = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    flush_every = int(sys.argv[4])
    ready = Path(path + ".ready")
    w = RunWriter(path, mode="w", flush_every=flush_every, flush_seconds=1e9)
    w.declare("m", {"v": None, "vec": (4,)})
    w.flush()
    print("declared", flush=True)
    while len(sys.argv) > 5 and not ready.exists():
        time.sleep(0.01)
    for step in range(n):
        w.append("m", step, {"v": 2.0 * step, "vec": [step] * 4})
        if (step + 1) % flush_every == 0:
            print("committed", step, flush=True)
        time.sleep(sleep)
    w.close()
    print("closed", flush=True)
    """
)


def _spawn_writer(tmp_path, *args):
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _check_rows(run: Run) -> int:
    steps, values = run.series("m", "v")
    _, vec = run.series("m", "vec")
    np.testing.assert_array_equal(steps, np.arange(len(steps)))
    np.testing.assert_array_equal(values, 2.0 * steps)
    np.testing.assert_array_equal(vec, np.repeat(steps[:, None], 4, axis=1))
    return len(steps)


def test_sigkill_mid_run_keeps_every_committed_row_and_can_resume(tmp_path):
    path = tmp_path / "run.h5"
    proc = _spawn_writer(tmp_path, path, 1_000_000, 0.0, 5)
    last_committed = -1
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("committed"):
            last_committed = int(line.split()[1])
            if last_committed >= 300:
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Run.open(path) as run:
        n = _check_rows(run)
    assert n >= last_committed + 1
    # the crashed file can be resumed for writing and keeps its rows
    with RunWriter(path) as w:
        assert w.last_step("m") == n - 1
        w.append("m", n, {"v": 2.0 * n, "vec": [n] * 4})
    with Run.open(path) as run:
        assert _check_rows(run) == n + 1


def test_a_second_process_reads_rows_while_the_writer_appends(tmp_path):
    path = tmp_path / "run.h5"
    total = 150
    proc = _spawn_writer(tmp_path, path, total, 0.01, 5, "wait")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "declared"
    run = Run.open(path)
    (tmp_path / "run.h5.ready").touch()
    seen = []
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        run.refresh()
        seen.append(_check_rows(run))
        time.sleep(0.02)
    proc.wait()
    run.refresh()
    seen.append(_check_rows(run))
    run.close()
    assert seen == sorted(seen), "committed rows never disappear"
    assert any(0 < n < total for n in seen), f"no partial view observed: {seen[:5]}...{seen[-5:]}"
    assert seen[-1] == total


def test_an_open_reader_never_blocks_the_writer_adding_groups(tmp_path):
    path = tmp_path / "run.h5"
    writer = RunWriter(path)
    writer.declare("a", {"v": None})
    writer.append("a", 0, {"v": 1.0})
    writer.flush()
    reader = Run.open(path)
    writer.declare("b", {"v": None})  # a structural change while the reader is open
    writer.append("b", 0, {"v": 2.0})
    writer.create_surface("s", np.linspace(-1, 1, 3))
    writer.flush()
    reader.refresh()
    assert reader.metrics() == ["a", "b"]
    assert Run.open(path).surfaces() == ["s"]
    writer.close()
    reader.close()


@pytest.mark.parametrize("backend", ["hdf5", "memory"])
def test_surface_points_are_buffered_and_written_row_by_row(tmp_path, backend):
    w = RunWriter(tmp_path / "run.h5", flush_seconds=3600) if backend == "hdf5" \
        else RunWriter.memory(flush_seconds=3600)
    w.create_surface("plane", np.arange(6.0), np.arange(3.0), fields=("loss", "accuracy"))
    points = {(0, 1): 1.5, (0, 4): 4.5, (2, 0): 20.0, (2, 5): 25.0, (1, 3): 13.0}
    for (j, i), v in points.items():
        w.write_surface("plane", (j, i), {"loss": v, "accuracy": v / 100})
    w.write_surface("plane", (1, 0), {"loss": 10.0})  # a field left out stays NaN
    if backend == "hdf5":  # nothing reaches the file before a flush
        assert not Run.open(tmp_path / "run.h5").surface("plane").done.any()
    surf = w.run().surface("plane")  # run() flushes
    assert surf.done.sum() == 6
    for (j, i), v in points.items():
        assert surf.done[j, i] and surf.values["loss"][j, i] == v
        assert surf.values["accuracy"][j, i] == pytest.approx(v / 100)
    # the points between written ones in a row's span are untouched
    assert not surf.done[0, 2] and np.isnan(surf.values["loss"][0, 2])
    assert surf.done[1, 0] and np.isnan(surf.values["accuracy"][1, 0])
    with pytest.raises(KeyError, match="create_surface"):
        w.write_surface("nope", 0, {"loss": 1.0})
    w.close()
