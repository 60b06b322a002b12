"""``landscape watch`` through click's CliRunner.

The live test drives a writer in a second process (HDF5 refuses a second open of the same
file in one process) and replaces the command's sleep by a step of that writer, so nothing
depends on the wall clock.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from landscape_cli.commands import watch as watch_cmd
from landscape_cli.main import cli

import landscape as ls
from landscape.findings import Finding
from landscape.store import RunWriter
from tests.cli._results import one_line_error
from tests.cli._runs import bad_inputs


def test_watch_once_prints_the_latest_row_of_each_metric_and_the_findings(runner, run_file):
    result = runner.invoke(cli, ["watch", str(run_file), "--once"])
    assert result.exit_code == 0, result.output
    out = result.stdout.splitlines()
    assert out[0] == str(run_file)
    assert "hessian  step 90  (+10)  eigenvalues=[93, 2, 1]  n_matvec=10" in out
    assert "spectral_alignment  step 90  (+10)  minority=[0.4, 0.3]" in out
    assert any(line.startswith("loss  step 99  (+100)  value=0.08") for line in out)
    assert "finding step 30: [warning] loss_spike: loss jumped (value 5)" in out
    only = runner.invoke(cli, ["watch", str(run_file), "--once", "-m", "hessian", "-q"])
    assert only.stdout.splitlines() == [
        "hessian  step 90  (+10)  eigenvalues=[93, 2, 1]  n_matvec=10",
        "finding step 60: [error] edge_of_stability: past 2/eta (value 63)",
    ]


def test_watch_shows_the_latest_findings_of_a_long_run_first(runner, tmp_path):
    path = tmp_path / "long.h5"
    with RunWriter(path, mode="w") as w:
        w.declare("loss", {"value": None})
        for s in range(50):
            w.append("loss", s, {"value": 1.0})
            w.add_finding(Finding(s, "loss_spike", "warning", "loss/value", 5.0, 3.0, f"n{s}"))
    result = runner.invoke(cli, ["watch", str(path), "--once", "-q"])
    assert result.exit_code == 0, result.output
    out = result.stdout.splitlines()
    assert "(30 earlier findings not shown; `landscape check RUN --stored` lists them all)" in out
    shown = [line for line in out if line.startswith("finding ")]
    assert len(shown) == 20 and shown[0].startswith("finding step 30:")
    assert shown[-1].startswith("finding step 49:")


def test_watch_prints_a_string_field_as_text(runner, tmp_path):
    # the monitor's /metrics/unmeasured table names the metrics that failed at a step
    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.declare("unmeasured", {"metrics": "S16"})
        w.append("unmeasured", 3, {"metrics": "flaky"})
    result = runner.invoke(cli, ["watch", str(path), "--once", "-q"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "unmeasured  step 3  (+1)  metrics='flaky'\n"


def test_watch_bad_inputs_and_empty_run(runner, empty_run, run_file, tmp_path):
    for path, fragment in bad_inputs(tmp_path):
        one_line_error(runner.invoke(cli, ["watch", path, "--once"]), fragment)
    one_line_error(runner.invoke(cli, ["watch", str(run_file), "-m", "nope"]), "no metric 'nope'")
    result = runner.invoke(cli, ["watch", str(empty_run), "--once", "-q"])
    assert result.exit_code == 0 and result.stdout == "no rows yet\n"


def test_watch_timeout_stops_without_a_real_clock(runner, run_file, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(watch_cmd, "_clock", lambda: now[0])
    monkeypatch.setattr(watch_cmd, "_sleep", lambda s: now.__setitem__(0, now[0] + s))
    result = runner.invoke(cli, ["watch", str(run_file), "--interval", "2", "--timeout", "5"])
    assert result.exit_code == 0, result.output
    assert now[0] == 5.0  # slept 2 + 2 + 1
    # a run its writer closed: said once (not at every poll), as a plain watch waits on
    # (a review waited on a killed run without a word)
    assert result.stderr.strip().splitlines() == [
        f"note: {run_file} is closed by its writer; watching for a resume (--until-finished "
        "exits here)", "stopped"]


def test_watch_timeout_must_be_finite(runner, run_file):
    result = runner.invoke(cli, ["watch", str(run_file), "--timeout", "nan"])
    assert result.exit_code == 2 and "--timeout" in result.stderr


@pytest.mark.parametrize("interval", ["0", "0.005", "-1", "nan", "inf"])
def test_watch_interval_must_be_positive_and_finite(runner, run_file, interval):
    # (--timeout: before the check, --interval 0 busy-looped until stopped)
    result = runner.invoke(cli, ["watch", str(run_file), "--interval", interval,
                                 "--timeout", "0.5"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "--interval" in errors[0]


_WRITER = textwrap.dedent(
    """
    import sys
    from landscape.findings import Finding
    from landscape.store import RunWriter
    w = RunWriter(sys.argv[1], flush_every=1)  # resumes the file the test created
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "append":
            for s in range(int(cmd[2]), int(cmd[3])):
                w.append(cmd[1], s, {"value": s / 10})
        elif cmd[0] == "declare":
            w.declare(cmd[1], {"value": None})
        elif cmd[0] == "finding":
            w.add_finding(Finding(int(cmd[1]), "loss_spike", "warning", "loss/value", 9, 3, "up"))
        elif cmd[0] == "quit":
            break
        w.flush()
        print("ok", flush=True)
    w.close()
    """
)


def test_watch_follows_a_live_writer_in_another_process(runner, tmp_path, monkeypatch):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    path = tmp_path / "live.h5"
    with RunWriter(path, mode="w") as w:  # created here: the writer process needs no torch
        w.declare("loss", {"value": None})
        w.append("loss", 0, {"value": 1.0})
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    # each "sleep" of the watch lets the writer do one thing while the watch holds no file
    actions = iter(["append loss 1 5", "declare grad_norm", "append grad_norm 0 3",
                    "finding 7", "append loss 5 5"])

    def step_writer(_seconds):
        action = next(actions, None)
        if action is None:
            raise KeyboardInterrupt  # what Ctrl-C does
        proc.stdin.write(action + "\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ok", "the writer failed"

    monkeypatch.setattr(watch_cmd, "_sleep", step_writer)
    try:
        result = runner.invoke(cli, ["watch", str(path), "--interval", "0.1"])
    finally:
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"watching {path} (Ctrl-C to stop)",
        "loss  step 0  (+1)  value=1",
        "loss  step 4  (+4)  value=0.4",
        "new metric grad_norm",
        "grad_norm  step 2  (+3)  value=0.2",
        "finding step 7: [warning] loss_spike: up (value 9)",
    ]
    assert result.stderr.strip() == "stopped"


def test_watch_retries_while_the_file_cannot_be_read(runner, run_file, monkeypatch):
    good = run_file.read_bytes()

    def corrupt():
        run_file.write_bytes(b"half-written" * 50)

    def restore_and_append():
        run_file.write_bytes(good)
        with RunWriter(run_file) as w:  # the watch holds no file while it sleeps
            w.append("loss", 100, {"value": 0.5})

    def interrupt():
        raise KeyboardInterrupt

    actions = iter([corrupt, corrupt, restore_and_append, interrupt])
    monkeypatch.setattr(watch_cmd, "_sleep", lambda _s: next(actions)())
    result = runner.invoke(cli, ["watch", str(run_file), "-m", "loss"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "loss  step 100  (+1)  value=0.5"
    # the command's own lines (a warning that garbage collection emits meanwhile, e.g. for
    # another test's file, lands on the same stderr)
    notes = [ln for ln in result.stderr.splitlines() if ln.startswith(("note:", "stopped"))
             and "closed by its writer" not in ln]
    assert len(notes) == 2 and notes[1] == "stopped"  # one note for two failed looks
    assert notes[0].startswith("note: cannot read the run now (") and "retrying" in notes[0]


def test_watch_reads_only_what_it_prints(tmp_path, monkeypatch):
    """Each look read whole columns to print their last value: its cost grew with the run."""
    from landscape.store.backends import H5Backend

    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.declare("loss", {"value": None})
        for step in range(500):
            w.append("loss", step, {"value": 1.0})
    read = []
    real = H5Backend.column

    def counted(self, path_, name, n, start=0):
        read.append(n - start)
        return real(self, path_, name, n, start)

    monkeypatch.setattr(H5Backend, "column", counted)
    view = watch_cmd._View(())
    with ls.Run.open(path) as run:
        assert view.update(run, first=True)[0].startswith("loss  step 499  (+500)  value=1")
    assert max(read) <= 1



def test_a_run_started_over_is_said_and_its_new_rows_shown(tmp_path):
    """Untested until the coverage audit: a run rewritten (mode='w') between two looks,
    which read '7 rows dropped' for 10 rows replaced by 3."""
    path = tmp_path / "run.h5"

    def write(n):
        with RunWriter(path, mode="w") as w:
            w.declare("loss", {"value": None})
            for step in range(n):
                w.append("loss", step, {"value": float(step)})

    write(10)
    view = watch_cmd._View(())
    with ls.Run.open(path) as run:
        assert view.update(run, first=True) == ["loss  step 9  (+10)  value=9"]
    write(3)
    with ls.Run.open(path) as run:
        assert view.update(run, first=False) == [
            "loss: the run restarted (10 rows before, 3 now)", "loss  step 2  (+3)  value=2"]


def test_watch_waits_for_a_run_in_a_file_its_writer_has_only_created(runner, tmp_path,
                                                                      monkeypatch):
    """Started right after a writer created its file, watch exited at once: "holds no run
    yet" (it waited only for a file that did not exist)."""
    path = tmp_path / "run.h5"
    path.write_bytes(b"")  # created, nothing written yet

    def write_a_run():
        with RunWriter(path, mode="w") as w:
            w.declare("loss", {"value": None})
            w.append("loss", 0, {"value": 2.0})

    def interrupt():
        raise KeyboardInterrupt

    actions = iter([write_a_run, interrupt])
    monkeypatch.setattr(watch_cmd, "_sleep", lambda _s: next(actions)())
    result = runner.invoke(cli, ["watch", str(path), "--interval", "0.1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "loss  step 0  (+1)  value=2"
    # with --timeout it gives up in one line; --once does not wait
    path.write_bytes(b"")
    now = [0.0]
    monkeypatch.setattr(watch_cmd, "_clock", lambda: now[0])
    monkeypatch.setattr(watch_cmd, "_sleep", lambda s: now.__setitem__(0, now[0] + s))
    # (an empty file is no HDF5 file yet: that is the line)
    one_line_error(runner.invoke(cli, ["watch", str(path), "--timeout", "3"]),
                   "not a readable HDF5 file")
    assert now[0] >= 3.0
    one_line_error(runner.invoke(cli, ["watch", str(path), "--once"]), "not a readable HDF5")


def test_watch_until_finished_stops_when_the_writer_closes_or_ended(runner, tmp_path,
                                                                    monkeypatch):
    """watch kept polling a finished run until --timeout; a pipeline following a run had
    no way to end with it, nor to tell a run killed half-way from one that finished."""
    path = tmp_path / "run.h5"
    w = RunWriter(path, mode="w")
    w.declare("loss", {"value": None})
    w.append("loss", 0, {"value": 1.0})
    w.flush()
    looks = []

    def close_on_second_sleep(_seconds):
        looks.append(1)
        if len(looks) == 2:
            w.close()
        assert len(looks) < 5, "did not stop"

    monkeypatch.setattr(watch_cmd, "_sleep", close_on_second_sleep)
    result = runner.invoke(cli, ["watch", str(path), "--until-finished", "--interval", "1"])
    assert result.exit_code == 0, result.output
    assert len(looks) == 2 and f"{path} is closed by its writer" in result.stderr
    again = runner.invoke(cli, ["watch", str(path), "--until-finished", "-q"])
    assert again.exit_code == 0 and again.stderr == "", again.output  # at the first look

    killed = tmp_path / "killed.h5"
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from landscape.store import RunWriter
        w = RunWriter(sys.argv[1], mode="w")
        w.declare("loss", {"value": None})
        w.append("loss", 0, {"value": 1.0})
        w.flush()
        print("flushed", flush=True)
        time.sleep(60)
    """))
    proc = subprocess.Popen([sys.executable, str(script), str(killed)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "flushed\n"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    result = runner.invoke(cli, ["watch", str(killed), "--until-finished", "-q"])
    assert result.exit_code == 1, result.output
    assert "ended without closing it (killed or crashed)" in result.stderr


def test_until_finished_does_not_pass_a_run_still_written_when_the_timeout_runs_out(
        runner, tmp_path, monkeypatch):
    """--until-finished --timeout exited 0 when the time ran out on a live run: a CI step
    waiting for training could not tell a timeout from a finished run (review)."""
    path = tmp_path / "run.h5"
    w = RunWriter(path, mode="w")
    w.declare("loss", {"value": None})
    w.append("loss", 0, {"value": 1.0})
    w.flush()
    now = [0.0]
    monkeypatch.setattr(watch_cmd, "_clock", lambda: now[0])
    monkeypatch.setattr(watch_cmd, "_sleep", lambda s: now.__setitem__(0, now[0] + s))
    try:
        result = runner.invoke(cli, ["watch", str(path), "--until-finished", "--timeout", "5",
                                     "-q"])
        assert result.exit_code == watch_cmd.EXIT_TIMED_OUT == 124, result.output
        assert "not finished after 5s (--timeout) (it is being written" in result.stderr
        plain = runner.invoke(cli, ["watch", str(path), "--timeout", "5", "-q"])
        assert plain.exit_code == 0, plain.output  # a timeout alone is the way to stop
        never = runner.invoke(cli, ["watch", str(tmp_path / "never.h5"), "--until-finished",
                                    "--timeout", "5", "-q"])  # not even created in time
        assert never.exit_code == 124 and "no such file after waiting 5s" in never.output
    finally:
        w.close()
