"""Buffering, resume, restart from a checkpoint, write modes and surface resume."""

from __future__ import annotations

import numpy as np
import pytest

from landscape import RunFileError, StepOrderError
from landscape.findings import Finding
from landscape.store import Run, RunWriter


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


@pytest.mark.parametrize("memory", [False, True])
def test_a_resume_with_another_schedule_notes_it_in_the_table(tmp_path, memory):
    """The table kept naming the first schedule while the resumed rows followed another
    (`landscape info`: "schedule every(5)" over rows every 2 steps)."""
    path = tmp_path / "run.h5"
    first = RunWriter.memory() if memory else RunWriter(path)
    first.declare("a", {"v": None}, schedule="every(5)")
    first.declare("b", {"v": None}, schedule="every(1)")
    for i in range(0, 20, 5):
        first.append("a", i, {"v": float(i)})

    def resumed(writer, schedule):
        writer.declare("a", {"v": None}, schedule=schedule)
        writer.declare("b", {"v": None}, schedule="every(3)")  # no row yet: replaced
        return writer.run().metric_attrs("a")["schedule"], \
            writer.run().metric_attrs("b")["schedule"]

    if memory:  # one writer declares again (the backend's own attribute)
        assert resumed(first, "every(2)") == ("every(5); every(2) after step 15", "every(3)")
        return
    first.close()
    with RunWriter(path) as w:
        assert resumed(w, "every(5)") == ("every(5)", "every(3)")  # the same: unchanged
        assert resumed(w, "every(2)") == ("every(5); every(2) after step 15", "every(3)")
        w.append("a", 16, {"v": 1.0})
    with RunWriter(path) as w:
        w.declare("a", {"v": None}, schedule="every(2)")  # as the last resume: unchanged
        w.declare("a", {"v": None}, schedule="at(20, 30)")
    with Run.open(path) as run:
        assert run.metric_attrs("a")["schedule"] == \
            "every(5); every(2) after step 15; at(20, 30) after step 16"
        assert list(run.steps("a")) == [0, 5, 10, 15, 16]
    # a schedule whose own text reads like the history: compared as it is, once
    odd = "every(2) after step 3; warmup(10)"
    with RunWriter(path) as w:
        w.declare("a", {"v": None}, schedule=odd)
        w.declare("a", {"v": None}, schedule=odd)
    with RunWriter(path) as w:
        w.declare("a", {"v": None}, schedule=odd)
        assert w.run().metric_attrs("a")["schedule"].endswith(f"; {odd} after step 16")
        assert w.run().metric_attrs("a")["schedule"].count(odd) == 1


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
        with pytest.raises(RunFileError, match=r"different grid or fields \(5 x on \[-1, 1\], "
                                                r"of loss stored; 7 x on \[-1, 1\], of loss "
                                                r"asked\)"):
            w.create_surface("line", np.linspace(-1, 1, 7))
        # another span, the same count: the message said '5 points' twice (review)
        w.create_surface("plane", np.linspace(-1, 1, 5), np.linspace(-1, 1, 5))
        with pytest.raises(RunFileError, match=r"\(5 x on \[-1, 1\] by 5 y on \[-1, 1\], of loss "
                                                r"stored; 5 x on \[-2, 2\] by 5 y on \[-2, 2\]"):
            w.create_surface("plane", np.linspace(-2, 2, 5), np.linspace(-2, 2, 5))


def test_remove_surface_keeps_the_rest_of_the_run(writer_factory):
    w = writer_factory(flush_seconds=3600)
    w.declare("loss", {"value": None})
    w.append("loss", 0, {"value": 1.0})
    w.create_surface("line", np.linspace(-1, 1, 5))
    w.create_surface("other", np.linspace(-1, 1, 3))
    w.write_surface("line", 1, {"loss": 2.0})  # buffered, not yet written
    assert w.remove_surface("line") and not w.remove_surface("line")
    run = w.run()
    assert run.surfaces() == ["other"] and run.series("loss", "value")[1].tolist() == [1.0]
    # created again from scratch, with another grid if need be
    surf = w.create_surface("line", np.linspace(-2, 2, 7))
    assert not surf.done.any() and len(surf.x) == 7
    w.close()


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
        with pytest.warns(RuntimeWarning, match="6 row.* not written to the file yet"), \
                Run.open(tmp_path / "run.h5") as run:
            assert not run.surface("plane").done.any()
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


def test_one_step_holds_automatic_flushes_until_the_step_is_complete(tmp_path):
    with RunWriter(tmp_path / "run.h5", flush_every=2, flush_seconds=0.0) as w:
        for name in "abc":
            w.declare(name, {"v": None})
        with w.one_step():
            for name in "abc":  # due after the first two rows, held to the end
                w.append(name, 0, {"v": 0.0})
                assert all(len(w._backend.steps(f"metrics/{n}")) == 0 for n in "abc")
        assert [len(w._backend.steps(f"metrics/{n}")) for n in "abc"] == [1, 1, 1]
        w.append("a", 1, {"v": 1.0})  # outside the block: flushed as soon as due
        w.append("b", 1, {"v": 1.0})
        assert len(w._backend.steps("metrics/b")) == 2


def test_the_monitor_writes_whole_steps_when_a_flush_falls_due_mid_step(tmp_path):
    import torch
    import torch.nn.functional as F

    import landscape as ls

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5", optimizer=opt, warn=False,
                    flush_every=4) as mon:
        for step in range(5):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x, y), loss=loss)
            backend = mon.writer._backend
            last = {n: backend.steps(f"metrics/{n}")[-1:].tolist()
                    for n in ("loss", "grad_norm", "nonfinite", "update", "sentinels")}
            assert len({tuple(v) for v in last.values()}) == 1, last  # every table alike


@pytest.mark.parametrize("ending", ["return", "raise"])
def test_rows_of_a_writer_never_closed_are_saved_at_interpreter_exit(tmp_path, ending):
    import subprocess
    import sys

    path = tmp_path / "run.h5"
    script = f"""
from landscape.store import RunWriter
w = RunWriter({str(path)!r}, flush_every=10_000, flush_seconds=1e9)
w.declare("a", {{"v": None}})
for i in range(7):
    w.append("a", i, {{"v": float(i)}})
{'raise RuntimeError("training crashed")' if ending == 'raise' else ''}
"""
    subprocess.run([sys.executable, "-c", script], check=False, timeout=120, capture_output=True)
    with Run.open(path) as run:
        assert list(run.steps("a")) == list(range(7))


def _monitored(path, steps, **options):
    import torch
    import torch.nn.functional as F

    import landscape as ls

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with ls.Monitor(model, F.cross_entropy, path, optimizer=opt, warn=False,
                    metrics=["loss", "grad_norm"], **options) as mon:
        for step in steps:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x, y), loss=loss)


def test_a_resume_past_the_last_row_says_which_steps_were_never_written(tmp_path, recwarn):
    """A process killed between flushes loses its last rows; resuming from its checkpoint
    (truncate_from) then left a gap in every series without a word (distributed audit)."""
    path = tmp_path / "run.h5"
    _monitored(path, range(14))  # rows 0-13 reached the file; 14-19 died with the process
    with pytest.warns(RuntimeWarning, match="resuming at step 20 .*rows end at step 13: "
                                            "steps 14 to 19 were never written"):
        _monitored(path, range(20, 22), truncate_from=20)
    with Run.open(path) as run:
        assert list(run.steps("loss")) == [*range(14), 20, 21]
    # no gap: nothing to say; nor for a loop that calls the monitor every 5 steps
    recwarn.clear()
    _monitored(path, range(22, 24), truncate_from=22)
    _monitored(tmp_path / "sparse.h5", range(0, 15, 5))
    _monitored(tmp_path / "sparse.h5", range(15, 25, 5), truncate_from=15)
    assert not [w for w in recwarn if "never written" in str(w.message)]


def test_a_truncate_from_before_the_first_resumed_step_says_which_steps_lost_their_rows(
        tmp_path, recwarn):
    """A checkpoint saved after step 9 ({"step": 9}) resumed with truncate_from=9 and the
    loop at step 10: step 9's rows were dropped and never recorded again, without a word
    (resume audit)."""
    path = tmp_path / "run.h5"
    _monitored(path, range(12))
    with pytest.warns(RuntimeWarning, match="dropped the rows from step 9 on, and the run "
                                            "goes on at step 10: step 9 has no rows now"):
        _monitored(path, range(10, 12), truncate_from=9)
    with Run.open(path) as run:
        assert list(run.steps("loss")) == [*range(9), 10, 11]
    recwarn.clear()  # the first resumed step at truncate_from: nothing to say
    _monitored(path, range(11, 13), truncate_from=11)
    _monitored(tmp_path / "sparse.h5", range(0, 15, 5))  # a call every 5 steps
    _monitored(tmp_path / "sparse.h5", range(10, 20, 5), truncate_from=6)
    assert not [w for w in recwarn if "no rows now" in str(w.message)]


def test_an_analysis_resumed_after_an_unfinished_checkpoint_warns_of_no_gap(tmp_path, recwarn):
    """analyze resumes with truncate_from at its unfinished checkpoint; log-spaced
    checkpoints (10, 20, 40) made that look like lost rows (review)."""
    import torch
    import torch.nn.functional as F

    from landscape.analysis import analyze

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))

    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    model, paths = net(), []
    for step in (10, 20, 40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        paths.append(tmp_path / f"ckpt-{step}.pt")
        torch.save({"model": model.state_dict(), "step": step}, paths[-1])
    out = tmp_path / "run.h5"
    options = {"metrics": ["top_eigenvalues"], "k": 1, "progress": False}
    analyze(paths[:2], net, (x, y), F.cross_entropy, out, **options)
    with RunWriter(out, mode="a", posthoc=True) as w:  # analyze killed in the third: a row
        w.append("top_eigenvalues", 40, {"eigenvalues": [1.0], "n_matvec": 1.0,
                                         "peak_memory": 0.0})
    recwarn.clear()
    analyze(paths, net, (x, y), F.cross_entropy, out, **options)
    assert not [w for w in recwarn if "never written" in str(w.message)]
    with Run.open(out) as run:
        assert [s for s, _ in run.checkpoints()] == [10, 20, 40]


@pytest.mark.parametrize("mode", ["w", "a"])
def test_a_run_left_open_for_reading_is_named_when_a_writer_needs_the_file(tmp_path, mode):
    """A notebook's run = callback.run() left open made the next training fail with
    'cannot create (unable to truncate a file which is already open)' or 'not a writable
    HDF5 file (file is already open for read-only)', which read as a damaged file (review)."""
    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.declare("loss", {"value": None})
        w.append("loss", 0, {"value": 1.0})
    run = Run.open(path)
    with pytest.raises(RunFileError, match=r"is open for reading in this process .*run\.close\(\)"):
        RunWriter(path, mode=mode)
    run.close()
    with RunWriter(path, mode=mode) as w:  # closed: it opens
        if not w.declared("loss"):
            w.declare("loss", {"value": None})
        w.append("loss", 1, {"value": 2.0})


def test_a_string_field_declared_wider_is_widened_with_its_rows(writer_factory, tmp_path):
    """A resumed monitor's failed-metric names outgrew the S16 column of its first session
    and were cut ('a_rather_long...'), so the replay read a step's unmeasured loss as a NaN
    loss and check failed the run (store review)."""
    w = writer_factory()
    w.declare("names", {"metrics": "S4"})
    w.append("names", 0, {"metrics": "abcd"})
    w.declare("names", {"metrics": "S12"})  # wider: widened
    w.append("names", 1, {"metrics": "abcdefghijkl"})
    w.declare("names", {"metrics": "S8"})  # narrower than stored: kept as it is
    w.append("names", 2, {"metrics": "abcdefghijkl"})
    with pytest.raises(RunFileError, match="already in the run with fields"):
        w.declare("names", {"metrics": None})  # a string is no float
    run = w.run()
    assert run.series("names", "metrics")[1].tolist() == ["abcd", "abcdefghijkl", "abcdefghijkl"]


def _interrupting(original, table: str, *, after_steps_resized: bool = False):
    """``H5Backend.append_rows`` that raises KeyboardInterrupt once, at ``table``: before
    writing it, or once its ``step`` column is resized and not yet written (the worst
    moment of a second Ctrl-C)."""
    state = {"raised": False}

    def append_rows(self, path, steps, cols):
        if path.endswith(table) and not state["raised"]:
            state["raised"] = True
            if after_steps_resized:
                g = self.file[path]
                n = g["step"].shape[0] + len(steps)
                for name in (*cols, "step"):
                    g[name].resize(n, axis=0)
            raise KeyboardInterrupt
        return original(self, path, steps, cols)

    return append_rows


@pytest.mark.parametrize("after_steps_resized", [False, True])
def test_a_flush_interrupted_half_way_writes_each_row_once(tmp_path, monkeypatch,
                                                           after_steps_resized):
    """A second Ctrl-C during a flush: the tables written before it stayed buffered, and the
    flush of close() wrote their rows again; no reader would open the file ('its steps do
    not increase'). Its rows are now each written once."""
    from landscape.store.backends import H5Backend

    path = tmp_path / "run.h5"
    w = RunWriter(path, mode="w", flush_every=10_000, flush_seconds=1e9)
    w.declare("a", {"v": None})
    w.declare("b", {"v": None})
    for step in range(5):
        w.append("a", step, {"v": float(step)})
        w.append("b", step, {"v": float(step)})
    monkeypatch.setattr(H5Backend, "append_rows", _interrupting(
        H5Backend.append_rows, "b", after_steps_resized=after_steps_resized))
    with pytest.raises(KeyboardInterrupt):
        w.flush()
    w.append("a", 5, {"v": 5.0})  # the writer goes on where it was
    w.close()
    with Run.open(path) as run:
        assert list(run.steps("a")) == [0, 1, 2, 3, 4, 5]
        assert list(run.steps("b")) == [0, 1, 2, 3, 4]
        np.testing.assert_array_equal(run.series("b", "v")[1], np.arange(5.0))


def test_a_step_dropped_after_a_half_flush_inside_it_keeps_the_rows_that_reached_the_file(
        tmp_path, monkeypatch):
    """one_step()'s rollback set the tables' last steps back to before the step, also for a
    table whose rows of that step a flush inside it had written: the same step was then
    accepted again, twice in the file."""
    from landscape.store.backends import H5Backend

    path = tmp_path / "run.h5"
    w = RunWriter(path, mode="w", flush_every=10_000, flush_seconds=1e9)
    w.declare("a", {"v": None})
    w.declare("b", {"v": None})
    monkeypatch.setattr(H5Backend, "append_rows", _interrupting(H5Backend.append_rows, "b"))
    with pytest.raises(KeyboardInterrupt), w.one_step():
        w.append("a", 0, {"v": 0.0})
        w.append("b", 0, {"v": 0.0})
        w.flush()  # a writes step 0; the interrupt comes at b
    with pytest.raises(StepOrderError):
        w.append("a", 0, {"v": 1.0})
    w.append("b", 0, {"v": 2.0})  # b's row of the step never reached the file: dropped
    w.close()
    with Run.open(path) as run:
        assert list(run.steps("a")) == [0] and list(run.steps("b")) == [0]
        assert run.series("b", "v")[1][0] == 2.0


def _buffered_two_tables(path):
    """A writer of tables a and b holding steps 0..2 of each in its buffer."""
    w = RunWriter(path, mode="w", flush_every=10_000, flush_seconds=1e9)
    w.declare("a", {"v": None})
    w.declare("b", {"v": None})
    for step in range(3):
        w.append("a", step, {"v": 0.0})
        w.append("b", step, {"v": 0.0})
    return w


def test_rollback_after_a_caught_half_flush_inside_the_step_drops_the_steps_rows(
        tmp_path, monkeypatch):
    """A flush inside one_step() failed at its second table and the caller went on: the
    step's later rows of the first table were not dropped at the rollback and its last step
    went back, so the step was accepted twice (own-diff review)."""
    from landscape.store.backends import H5Backend

    path = tmp_path / "run.h5"
    w = _buffered_two_tables(path)
    monkeypatch.setattr(H5Backend, "append_rows", _interrupting(H5Backend.append_rows, "b"))
    with pytest.raises(RuntimeError), w.one_step():
        with pytest.raises(KeyboardInterrupt):
            w.flush()  # a: rows 0..2 written; b: still buffered
        w.append("a", 3, {"v": 3.0})
        w.append("b", 3, {"v": 3.0})
        raise RuntimeError("the step fails")
    w.append("a", 3, {"v": 30.0})  # the step again
    w.append("b", 3, {"v": 30.0})
    w.close()
    with Run.open(path) as run:
        for name in ("a", "b"):
            assert list(run.steps(name)) == [0, 1, 2, 3], name
            assert run.series(name, "v")[1][-1] == 30.0


@pytest.mark.parametrize("memory", [False, True])
def test_a_rollback_after_truncate_from_accepts_the_steps_truncate_dropped(tmp_path, memory):
    """After truncate_from(5), a step dropped at a rollback set the last step back to the
    one of the last flush, before the truncation (9): step 5 was refused (review)."""
    w = RunWriter.memory() if memory else RunWriter(tmp_path / "run.h5")
    w.declare("m", {"v": None})
    for step in range(10):
        w.append("m", step, {"v": float(step)})
    w.flush()
    w.truncate_from(5)
    assert w.dropped_from == 5 and w.last_step("m") == 4
    with pytest.raises(RuntimeError), w.one_step():
        w.append("m", 5, {"v": 0.0})
        raise RuntimeError("the step fails")
    assert w.last_step("m") == 4
    w.append("m", 5, {"v": 5.0})
    assert list(w.run().steps("m")) == [0, 1, 2, 3, 4, 5]
    w.close()


def test_a_flush_from_a_signal_handler_inside_a_flush_waits_for_it(tmp_path, monkeypatch):
    """The interrupt guard flushes from its signal handler: inside a flush already writing,
    the inner one wrote (and unbuffered) the table the outer one was appending, which then
    lost its rows or raised KeyError (own-diff review)."""
    from landscape.store.backends import H5Backend

    path = tmp_path / "run.h5"
    w = _buffered_two_tables(path)
    original = H5Backend.append_rows
    inner = {"done": False}

    def append_rows(self, table, steps, cols):
        if not inner["done"]:  # a signal arrives in the middle of the first table
            inner["done"] = True
            w.flush()
        return original(self, table, steps, cols)

    monkeypatch.setattr(H5Backend, "append_rows", append_rows)
    w.flush()
    w.close()
    with Run.open(path) as run:
        assert list(run.steps("a")) == list(run.steps("b")) == [0, 1, 2]


def test_each_resume_notes_where_its_rows_begin_and_a_truncation_amends_it(tmp_path):
    """The file did not say where a resumed session began, so the plots read the NaN of a
    secant or an every-10th-call field starting over there as a blow-up."""
    path = tmp_path / "run.h5"

    def resumed():
        with Run.open(path) as run:
            return run.resumed_after()

    with RunWriter(path, mode="w") as w:
        w.declare("m", {"v": None})
        for s in range(10):
            w.append("m", s, {"v": 1.0})
    assert resumed() == []  # one session
    with RunWriter(path) as w:
        for s in range(10, 20):
            w.append("m", s, {"v": 1.0})
    assert resumed() == [9]
    with RunWriter(path, truncate_from=15) as w:  # rows 15-19 dropped: resumed after 14
        w.append("m", 15, {"v": 1.0})
    assert resumed() == [9, 14]
    with RunWriter(path) as w:  # the monitor's way: declarations checked, then truncated
        w.truncate_from(5)  # every session after step 4 is gone
        w.append("m", 5, {"v": 1.0})
    assert resumed() == [4]
    with Run.open(path) as run:
        assert run.steps("m").tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("raised, reason", [
    ("ValueError('bad batch')", "the program ended on an uncaught ValueError: bad batch"),
    ("ValueError()", "the program ended on an uncaught ValueError"),
    ("KeyboardInterrupt()", "stopped by Ctrl-C (KeyboardInterrupt)")])
def test_a_writer_left_open_by_an_uncaught_error_records_it_at_exit(tmp_path, raised, reason):
    """A writer never closed (a loop that raised) is closed at exit with why; Ctrl-C under
    the Hugging Face Trainer read "uncaught KeyboardInterrupt: " (an empty message)."""
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "run.h5"
    code = ("from landscape.store import RunWriter\n"
            f"w = RunWriter({str(path)!r}, mode='w')\n"
            "w.declare('loss', {'value': None})\nw.append('loss', 0, {'value': 1.0})\n"
            f"raise {raised}\n")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert done.returncode != 0
    with Run.open(path) as run:
        status = run.writer_status()
    assert (status.state, status.reason) == ("stopped", reason), done.stderr[-2000:]


def test_an_error_shown_at_an_interactive_prompt_is_named_as_shown_not_as_the_end(tmp_path):
    """At Python's prompt (a notebook likewise) ``sys.last_value`` holds the last error any
    input showed: a typo after training read as "the program ended on an uncaught
    NameError". Which error ended training is unknown there (under ``python -i`` the
    script's own crash is one too): the run is stopped, the error named as shown, and the
    way to record a finish said; a session without an error is finished."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "run.h5"
    lines = ["from landscape.store import RunWriter",
             f"w = RunWriter({str(path)!r}, mode='w')",
             "w.declare('loss', {'value': None})", "w.append('loss', 0, {'value': 1.0})",
             "prnt('done')", ""]
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-i", "-q"], input="\n".join(lines),
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert "NameError" in done.stderr  # the typo was shown, then the session went on
    with Run.open(path) as run:
        status = run.writer_status()
    assert status.state == "stopped", done.stderr[-2000:]
    assert status.reason == (
        "the interactive session ended with the run still open, after an error it showed "
        "(NameError: name 'prnt' is not defined); close the monitor, or use its with block, "
        "to record how training ended")
    lines[4] = "print('done')"
    subprocess.run([sys.executable, "-i", "-q"], input="\n".join(lines), capture_output=True,
                   text=True, env={**os.environ, "PYTHONPATH": str(root)}, check=True)
    with Run.open(path) as run:
        assert run.writer_status().state == "closed"


@pytest.mark.parametrize("before", [None, "stopped on ValueError: bad batch"])
def test_a_resume_refused_at_its_first_step_leaves_the_run_as_it_was(tmp_path, before):
    """A cell run again wrote step 0 into a finished run: refused (StepOrderError), and the
    monitor's exit then recorded the refusal as how the run stopped, failing a finished run
    in ``check --require-finished``; a resume that changed no row changes no status."""
    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.declare("a", {"v": None})
        w.append("a", 0, {"v": 0.0})
        if before is not None:
            w.close(how=before)
    with pytest.raises(StepOrderError):
        with RunWriter(path) as w:
            try:
                w.append("a", 0, {"v": 1.0})
            except StepOrderError as err:
                w.close(how=f"stopped on StepOrderError: {err}")
                raise
    with Run.open(path) as run:
        status = run.writer_status()
    assert (status.state, status.reason) == (("closed", None) if before is None
                                             else ("stopped", before))
    with RunWriter(path):  # a resume that ends without an error: finished, as before
        pass
    with Run.open(path) as run:
        assert run.writer_status().state == "closed"
    with pytest.raises(MemoryError):  # another error before the first row: its stop
        with RunWriter(path) as w:
            try:
                raise MemoryError("out of memory")
            except MemoryError:
                w.close(how="stopped on MemoryError: out of memory")
                raise
    with Run.open(path) as run:
        status = run.writer_status()
    assert (status.state, status.reason) == ("stopped", "stopped on MemoryError: out of memory")
