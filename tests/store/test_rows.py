"""The run store's tables: round trips, step order, declarations, strings."""

from __future__ import annotations

import numpy as np
import pytest

from landscape import RunFileError, StepOrderError
from landscape.findings import Finding
from landscape.store import FORMAT_VERSION, RunWriter


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
    with pytest.raises(RunFileError, match=r"already in the run.*--overwrite"):
        w.declare("a", {"v": None})
    w.close()


def test_long_strings_are_cut_not_rejected(writer_factory):
    w = writer_factory()
    w.add_finding(Finding(0, "r", "info", "m", 1.0, 1.0, "é" * 600))
    msg = w.run().findings()[0].message
    assert msg.endswith("...") and len(msg.encode()) <= 512
    w.close()


def test_a_string_field_reads_back_as_text(writer_factory):
    """Run.series returned a string field as raw bytes (b'flaky'); the findings and
    checkpoints readers already decoded theirs."""
    w = writer_factory()
    w.declare("notes", {"text": "S16", "v": None})
    w.append("notes", 0, {"text": "flaky,sharpness", "v": 1.0})
    w.append("notes", 1, {"text": "é", "v": 2.0})
    steps, text = w.run().series("notes", "text")
    assert list(steps) == [0, 1] and list(text) == ["flaky,sharpness", "é"]
    assert all(type(t) is str for t in text)
    assert w.run().series("notes", "v")[1].dtype == np.float64
    w.close()


def test_the_last_row_and_new_findings_are_read_without_the_rest(writer_factory):
    """watch read every committed row of every column at each look (367 ms a look at 1M
    steps, growing with the run) to print the last value."""
    w = writer_factory()
    w.declare("m", {"v": None, "vec": (2,), "note": "S8"})
    for step in range(5):
        w.append("m", step * 10, {"v": float(step), "vec": [step, -step], "note": f"n{step}"})
        w.add_finding(Finding(step * 10, "r", "info", "m", 1.0, 1.0, f"f{step}"))
    run = w.run()
    assert run.rows("m") == 5 and run.finding_count() == 5
    step, row = run.last_row("m")
    assert step == 40 and row["v"] == 4.0 and list(row["vec"]) == [4, -4] and row["note"] == "n4"
    assert [f.message for f in run.findings(start=3)] == ["f3", "f4"]
    assert run.findings(start=5) == []
    w.declare("empty", {"v": None})
    with pytest.raises(ValueError, match="no row yet"):
        w.run().last_row("empty")
    w.close()


def test_the_summary_reads_each_metrics_first_and_last_step_only(writer_factory, monkeypatch):
    """``info`` read every metric's whole step column for its first and last step (0.5 s
    at 1M steps)."""
    w = writer_factory()
    w.declare("m", {"v": None})
    w.declare("empty", {"v": None})
    for step in range(3, 300, 3):
        w.append("m", step, {"v": 1.0})
    w.add_finding(Finding(9, "r", "info", "m", 1.0, 1.0, "f"))
    w.record_checkpoint(12, "c.pt")
    run = w.run()
    backend = run._backend
    read = []
    steps = backend.steps

    def counted(*args, **kwargs):
        out = steps(*args, **kwargs)
        read.append(len(out))
        return out

    monkeypatch.setattr(backend, "steps", counted)
    summary = run.summary()
    assert summary["metrics"]["m"]["rows"] == 99
    assert (summary["metrics"]["m"]["first_step"], summary["metrics"]["m"]["last_step"]) == (3, 297)
    assert summary["metrics"]["empty"] == {**summary["metrics"]["empty"], "rows": 0,
                                           "first_step": None, "last_step": None}
    assert (summary["findings"], summary["checkpoints"]) == (1, 1)
    assert read and max(read) == 1
    w.close()


def test_a_writer_opening_a_long_run_reads_each_tables_last_step_only(tmp_path, monkeypatch):
    """A resume read every table's whole step column for its last step (O(rows))."""
    from landscape.store.backends import H5Backend

    with RunWriter(tmp_path / "run.h5") as w:
        w.declare("m", {"v": None})
        for step in range(500):
            w.append("m", step, {"v": 1.0})
    read = []
    steps = H5Backend.steps

    def counted(self, *args, **kwargs):
        out = steps(self, *args, **kwargs)
        read.append(len(out))
        return out

    monkeypatch.setattr(H5Backend, "steps", counted)
    with RunWriter(tmp_path / "run.h5") as w:
        assert w.last_step("m") == 499
    assert read and max(read) == 1


def test_a_closed_writer_and_bad_settings_are_one_clear_error(tmp_path):
    """Untested until the coverage audit: writing after close() and bad constructor values."""
    w = RunWriter.memory()
    w.declare("a", {"v": None})
    w.close()
    for late in (lambda: w.append("a", 0, {"v": 1.0}), lambda: w.create_surface("s", [0.0]),
                 w.flush):
        with pytest.raises(RunFileError, match="the run writer is closed"):
            late()
    with pytest.raises(RunFileError, match="is a directory, expected a run file"):
        RunWriter(tmp_path)
    for kwargs, match in (({"mode": "z"}, "mode must be 'a', 'w' or 'x'"),
                          ({"flush_every": 0}, "flush_every must be >= 1"),
                          ({"on_disk_full": "explode"}, "on_disk_full must be 'raise' or")):
        with pytest.raises(ValueError, match=match):
            RunWriter(tmp_path / "x.h5", **kwargs)
    assert not (tmp_path / "x.h5").exists()


def test_a_long_run_reads_back_every_row_and_the_memory_store_grows_by_doubling(
        writer_factory, monkeypatch):
    """Thousands of flushes, a field declared later, rows read while written.

    The memory store writes into arrays with room to spare and doubles the room when it
    runs out: a run of n flushes reallocates O(log n) times, not n times (copying the
    whole run at every flush made each flush slower as the run grew).
    """
    from landscape.store import backends

    grown = []
    with_room = backends._with_room
    monkeypatch.setattr(backends, "_with_room",
                        lambda *a: grown.append(a[2]) or with_room(*a))
    w = writer_factory(flush_every=1)
    w.declare("loss", {"value": None, "hist": (2,)})
    for step in range(3000):
        if step == 1000:
            w.declare("loss", {"value": None, "hist": (2,), "extra": None})  # a new field
        row = {"value": float(step), "hist": np.array([step, -step])}
        w.append("loss", step, row if step < 1000 else {**row, "extra": step / 4})
        if step in (10, 999, 2500):  # a reader in the middle of the run
            steps, values = w.run().series("loss", "value")
            np.testing.assert_array_equal(steps, np.arange(step + 1))
            np.testing.assert_array_equal(values, np.arange(step + 1, dtype=float))
    run = w.run()
    steps, hist = run.series("loss", "hist")
    np.testing.assert_array_equal(steps, np.arange(3000))
    np.testing.assert_array_equal(hist[:, 1], -np.arange(3000))
    _, extra = run.series("loss", "extra")
    assert np.isnan(extra[:1000]).all()
    np.testing.assert_array_equal(extra[1000:], np.arange(1000, 3000) / 4)
    if grown:  # the memory store: 256, 512, ..., 4096 rows of room (each column once)
        assert sorted(set(grown)) == [256, 512, 1024, 2048, 4096]
        assert len(grown) <= 5 * 4  # step, value, hist and (later) extra
