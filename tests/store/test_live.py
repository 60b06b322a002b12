"""Other processes: a writer killed mid-run, a reader following a live writer."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from landscape import RunFileError
from landscape.store import Run, RunWriter

REPO = Path(__file__).resolve().parents[2]


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


@pytest.fixture
def spawn_writer(tmp_path):
    """Start the writer script; every writer still running is killed when the test ends
    (one waiting for its reader would otherwise outlive a failed test)."""
    procs = []

    def spawn(*args):
        script = tmp_path / "writer.py"
        script.write_text(WRITER_SCRIPT)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(
            [sys.executable, str(script), *map(str, args)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _check_rows(run: Run) -> int:
    steps, values = run.series("m", "v")
    _, vec = run.series("m", "vec")
    np.testing.assert_array_equal(steps, np.arange(len(steps)))
    np.testing.assert_array_equal(values, 2.0 * steps)
    np.testing.assert_array_equal(vec, np.repeat(steps[:, None], 4, axis=1))
    return len(steps)


def test_sigkill_mid_run_keeps_every_committed_row_and_can_resume(tmp_path, spawn_writer):
    path = tmp_path / "run.h5"
    proc = spawn_writer(path, 1_000_000, 0.0, 5)
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
    # the crashed file can be resumed for writing and keeps its rows, and its permissions
    # (the recovered copy replaced it as mkstemp made it: 0600, unreadable to the others)
    path.chmod(0o644)
    with RunWriter(path) as w:
        assert w.last_step("m") == n - 1
        w.append("m", n, {"v": 2.0 * n, "vec": [n] * 4})
    assert path.stat().st_mode & 0o777 == 0o644
    with Run.open(path) as run:
        assert _check_rows(run) == n + 1


def test_a_second_process_reads_rows_while_the_writer_appends(tmp_path, spawn_writer):
    path = tmp_path / "run.h5"
    total = 150
    proc = spawn_writer(path, total, 0.01, 5, "wait")
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


def test_a_run_resumed_while_this_process_still_reads_it(tmp_path):
    """A notebook keeps ``run = mon.run()`` for its plots, closes the monitor, and later
    resumes the file: h5py said "Unable to start swmr writing (file already in SWMR
    writing mode)", since the reader keeps the closed writer's file open (interactive
    audit)."""
    path = tmp_path / "run.h5"
    writer = RunWriter(path)
    writer.declare("a", {"v": None})
    writer.append("a", 0, {"v": 1.0})
    writer.flush()
    reader = Run.open(path)  # opened while the writer is open, as mon.run() opens it
    writer.close()
    resumed = RunWriter(path)
    resumed.append("a", 1, {"v": 2.0})
    resumed.close()
    reader.refresh()
    assert reader.steps("a").tolist() == [0, 1]
    reader.close()


KILLED_IN_STRUCTURAL_CHANGE = textwrap.dedent(
    """
    import os, signal, sys
    from landscape.store import RunWriter
    path, mode = sys.argv[1], sys.argv[2]
    w = RunWriter(path, mode=mode, flush_every=1)
    if mode == "w":
        w.declare("m", {"v": None, "vec": (4,)})
        for step in range(40):
            w.append("m", step, {"v": 2.0 * step, "vec": [step] * 4})
        w.flush()
    with w._backend.structural():  # out of SWMR mode, as when a metric is declared
        w._backend.file.create_group("half_made")
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_writer_killed_out_of_swmr_mode_leaves_a_file_that_reads_and_resumes(tmp_path):
    # killed inside a structural change (declaring a metric; the first failure of a metric
    # declares /metrics/unmeasured), HDF5 leaves its plain "open for write" flag, which no
    # open accepts: every command said "not a readable HDF5 file" and resuming raised
    # OSError although every committed row was intact
    path = tmp_path / "run.h5"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_IN_STRUCTURAL_CHANGE)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script), str(path), "w"], env=env)
    assert done.returncode == -signal.SIGKILL
    with Run.open(path) as run:
        assert _check_rows(run) == 40
    assert not list(tmp_path.glob("*.recover"))  # the reader's copy is gone
    from click.testing import CliRunner
    from landscape_cli.main import cli

    result = CliRunner().invoke(cli, ["check", str(path), "-q"])
    assert result.exit_code == 0 and result.stdout.startswith(f"{path}: 0 findings")
    assert "ended without closing it (killed or crashed)" in result.stderr  # said, on stderr
    # a writer resumes it (and is killed out of SWMR mode again: still fine)
    done = subprocess.run([sys.executable, str(script), str(path), "a"], env=env)
    assert done.returncode == -signal.SIGKILL
    path.chmod(0o640)
    with RunWriter(path) as w:
        assert w.last_step("m") == 39
        w.append("m", 40, {"v": 80.0, "vec": [40] * 4})
    assert path.stat().st_mode & 0o777 == 0o640  # the flag-cleared copy keeps them too
    with Run.open(path) as run:
        assert _check_rows(run) == 41


def test_a_writer_killed_before_its_first_flush_leaves_nothing_in_the_way(tmp_path):
    # HDF5 writes the superblock at creation and the rest at the first flush: a kill in
    # between left 48 bytes that every later run refused ("truncated file (48 of 2048")
    path = tmp_path / "run.h5"
    import h5py

    f = h5py.File(path, "w", libver="latest")
    f.flush()
    head = path.read_bytes()[:48]
    f.close()
    path.write_bytes(head)
    with pytest.raises(Exception, match="holds no run yet"):
        Run.open(path)
    with RunWriter(path) as w:
        w.declare("m", {"v": None, "vec": (4,)})
        w.append("m", 0, {"v": 0.0, "vec": [0] * 4})
    with Run.open(path) as run:
        assert _check_rows(run) == 1


def test_lookup3_is_hdf5s_superblock_checksum(tmp_path):
    from landscape.store.recovery import clear_open_flags, lookup3

    assert lookup3(b"") == 0xDEADBEEF
    assert lookup3(b"Four score and seven years ago") == 0x17770551
    assert lookup3(b"Four score and seven years ago", 1) == 0xCD628161
    with RunWriter(tmp_path / "run.h5") as w:  # a superblock HDF5 wrote and checksummed
        w.declare("m", {"v": None})
        block = (tmp_path / "run.h5").read_bytes()[:48]
        assert int.from_bytes(block[44:48], "little") == lookup3(block[:44])
        assert block[11] != 0  # open for writing
    assert clear_open_flags(tmp_path / "run.h5") is False  # closed cleanly: flags are 0


def test_a_recovery_copy_left_by_a_killed_process_is_removed_by_the_next_recovery(tmp_path):
    # a process killed while it recovered a run (SIGKILL, out of memory) left its copy,
    # named at random, beside the run for good; copies now carry the host and pid, and
    # the next recovery on the host removes those of processes that are gone
    import socket

    path = tmp_path / "run.h5"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_IN_STRUCTURAL_CHANGE)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert subprocess.run([sys.executable, str(script), str(path), "w"],
                          env=env).returncode == -signal.SIGKILL
    leave_copy = ("import sys, tempfile; from pathlib import Path; "
                  "from landscape.store.recovery import _copy_prefix; "
                  "p = Path(sys.argv[1]); "
                  "print(tempfile.mkstemp(prefix=_copy_prefix(p), suffix='.recover', "
                  "dir=p.parent)[1])")
    out = subprocess.run([sys.executable, "-c", leave_copy, str(path)], env=env,
                         capture_output=True, text=True, check=True)
    stale = Path(out.stdout.strip())  # its process has exited
    host = socket.gethostname().replace(".", "_")
    live = tmp_path / f"run.h5.{host}.{os.getpid()}.inprogress.recover"  # this process
    other = tmp_path / "run.h5.elsewhere.12.x.recover"  # another host's
    for f in (live, other):
        f.write_bytes(b"")
    assert stale.exists() and stale.name.startswith(f"run.h5.{host}.")
    with Run.open(path) as run:  # a reader recovers through a copy
        assert _check_rows(run) == 40
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(tmp_path.glob("*.recover")) == sorted([live, other])


def test_a_step_declaring_a_table_keeps_its_rows_together(tmp_path):
    """A metric's first failure declares /metrics/unmeasured mid-step: that flushed the
    step's rows so far, and a kill during the declaration left half a step on disk."""
    from landscape.findings import Finding

    path = tmp_path / "run.h5"
    writer = RunWriter(path, flush_every=10_000, flush_seconds=1e9)
    writer.declare("loss", {"value": None})
    with writer.one_step():
        writer.append("loss", 0, {"value": 1.0})
        writer.declare("unmeasured", {"metric": None})
        with pytest.warns(RuntimeWarning, match="1 row.* not written to the file yet"), \
                Run.open(path) as run:  # another reader, mid-step (this process: said)
            assert run.steps("loss").tolist() == []
    writer.flush()
    with Run.open(path) as run:
        assert run.steps("loss").tolist() == [0]
    # an error finding is on disk at the end of its step; a warning waits for the flush
    for step, severity, on_disk in ((1, "warning", 0), (2, "error", 2)):
        with writer.one_step():
            writer.append("loss", step, {"value": float("nan")})
            writer.add_finding(Finding(step=step, rule="nonfinite", metric="loss/value",
                                       severity=severity, value=float("nan"), threshold=0.0,
                                       message="training loss is nan"))
        with pytest.warns(RuntimeWarning) if on_disk == 0 else contextlib.nullcontext(), \
                Run.open(path) as run:
            assert len(run.findings()) == on_disk
            assert run.steps("loss").tolist() == ([0] if on_disk == 0 else [0, 1, 2])
    writer.close()


def test_a_reader_of_a_run_started_over_is_told_to_open_it_again(tmp_path):
    """A reader refreshing a file that a writer with mode='w' restarted hung in HDF5."""
    path = tmp_path / "run.h5"
    with RunWriter(path, mode="w") as w:
        w.declare("m", {"v": None, "vec": (4,)})
        for step in range(200):
            w.append("m", step, {"v": 2.0 * step, "vec": [step] * 4})
    reader = Run.open(path)
    reader.refresh()  # nothing changed: fine
    restart = ("from landscape.store import RunWriter\n"
               f"with RunWriter({str(path)!r}, mode='w') as w:\n"
               "    w.declare('m', {'v': None, 'vec': (4,)})\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", restart], env=env, check=True)  # smaller now
    with pytest.raises(RunFileError, match="replaced or started over since it was opened"):
        reader.refresh()
    reader.close()
    with Run.open(path) as again:
        assert again.steps("m").tolist() == []


def test_negative_steps_the_writer_takes_are_read_back():
    """The open-time check refused a run whose first step was -1, which the writer took."""
    w = RunWriter.memory()
    w.declare("m", {"v": None})
    for step in (-1, 0, 3):
        w.append("m", step, {"v": 1.0})
    assert w.run().steps("m").tolist() == [-1, 0, 3]


def test_negative_steps_in_a_file_open(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, mode="w") as w:
        w.declare("m", {"v": None})
        for step in (-1, 0):
            w.append("m", step, {"v": 1.0})
    with Run.open(path) as run:
        assert run.steps("m").tolist() == [-1, 0]


def test_a_reader_refreshes_after_the_working_directory_changes(tmp_path, monkeypatch):
    """The identity was taken from the relative name the file was opened with."""
    path = tmp_path / "rel.h5"
    with RunWriter(path, mode="w") as w:
        w.declare("m", {"v": None})
        w.append("m", 0, {"v": 1.0})
    monkeypatch.chdir(tmp_path)
    reader = Run.open("rel.h5")
    monkeypatch.chdir("/")
    reader.refresh()
    assert reader.steps("m").tolist() == [0]
    reader.close()


def test_a_second_reader_that_hdf5_gives_a_stale_view_says_so(tmp_path):
    """A Run left open in a notebook, a CLI command writing a surface into the file, and a
    fresh Run.open: HDF5 shares the first reader's file, and the new reader saw no surface
    and no new rows, without a word."""
    import warnings

    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.declare("loss", {"value": None})
        w.append("loss", 0, {"value": 1.0})
    first = Run.open(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        Run.open(path).close()  # the same file, unchanged: nothing to say
    code = textwrap.dedent(f"""
        from landscape.store import RunWriter
        with RunWriter({str(path)!r}) as w:
            w.declare("extra", {{"value": None}})
            w.append("extra", 0, {{"value": 2.0}})
    """)
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    with pytest.warns(RuntimeWarning, match="another Run of this file is open in this process.*"
                                            "may be missing"):
        stale = Run.open(path)
    assert stale.metrics() == ["loss"]  # what HDF5 shows it (the warning is why)
    stale.close()
    first.refresh()  # rows only: the new group stays unseen, so the warning stays
    assert first.metrics() == ["loss"]
    with pytest.warns(RuntimeWarning, match="may be missing"):
        Run.open(path).close()
    first.close()
    with warnings.catch_warnings():  # the last Run of the file closed: read afresh, quietly
        warnings.simplefilter("error", RuntimeWarning)
        with Run.open(path) as fresh:
            assert fresh.metrics() == ["extra", "loss"]


def test_overwrite_refuses_a_run_file_that_a_live_process_writes(tmp_path, spawn_writer):
    """``mode="w"`` (the CLI's --overwrite) truncated a file held open for SWMR writing: a
    plain read-only open fails on it, and that was taken for a damaged file."""
    path = tmp_path / "run.h5"
    proc = spawn_writer(path, 20, 0.01, 5, "wait")
    assert proc.stdout is not None and proc.stdout.readline().strip() == "declared"
    size = path.stat().st_size
    with pytest.raises(RunFileError, match=r"being written by another process \(pid"):
        RunWriter(path, mode="w")
    assert path.stat().st_size == size
    (tmp_path / "run.h5.ready").touch()
    proc.wait()
    with Run.open(path) as run:
        assert _check_rows(run) == 20  # the writer finished undisturbed
    with RunWriter(path, mode="w") as w:  # its writer gone: replaced
        w.declare("m", {"v": None})
    with Run.open(path) as run:
        assert run.rows("m") == 0


def _killed_writer(path: Path, rows: int) -> Path:
    """``path`` as a writer killed after ``rows`` rows and a flush leaves it: marked open for
    SWMR writing, its recorded writer gone."""
    script = textwrap.dedent("""
        import os, signal, sys
        from landscape.store import RunWriter
        w = RunWriter(sys.argv[1], mode="w")
        w.declare("m", {"v": None})
        for i in range(int(sys.argv[2])):
            w.append("m", i, {"v": float(i)})
        w.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    subprocess.run([sys.executable, "-c", script, str(path), str(rows)],
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    return path


def test_overwrite_refuses_a_live_writer_out_of_swmr_mode_and_replaces_a_killed_damaged_one(
        tmp_path, monkeypatch):
    """A writer declaring a table mid-run holds the plain open-for-write mark: its file was
    replaced (a race of milliseconds). A killed writer's file with a damaged header made
    --overwrite hang in SWMR retries (its way out)."""
    from landscape.store import recovery

    # the writer below stops inside its structural change, holding the directory's lock:
    # the open waits this long, then checks the file unlocked, as it did before the lock
    monkeypatch.setattr(recovery, "WRITERS_WAIT", 0.2)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    live = tmp_path / "live.h5"
    writer = textwrap.dedent("""
        import os, sys, time
        from landscape.store import RunWriter
        w = RunWriter(sys.argv[1], mode="w")
        w.declare("m", {"v": None})
        for i in range(20):
            w.append("m", i, {"v": float(i)})
        w.flush()
        with w._backend.structural():  # what a declare mid-run does
            print("structural", flush=True)
            while not os.path.exists(sys.argv[1] + ".ready"):
                time.sleep(0.02)
        w.close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer, str(live)], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "structural"
        size = live.stat().st_size
        with pytest.raises(RunFileError, match=r"being written by another process"):
            RunWriter(live, mode="w")
        assert live.stat().st_size == size
    finally:
        (tmp_path / "live.h5.ready").touch()
        proc.wait(timeout=60)
    killed = _killed_writer(tmp_path / "killed.h5", rows=50)
    data = bytearray(killed.read_bytes())
    header = data.index(b"OHDR")
    data[header + 8:header + 24] = bytes(16)  # the root's object header, checksum broken
    killed.write_bytes(bytes(data))
    start = time.monotonic()
    with RunWriter(killed, mode="w") as w:  # damaged, its writer gone: replaced at once
        w.declare("m", {"v": None})
    assert time.monotonic() - start < 20
    with Run.open(killed) as run:
        assert run.rows("m") == 0


def test_overwrite_refuses_a_marked_file_it_has_no_room_to_check(tmp_path, monkeypatch):
    """With no room for the copy its writer is read from, the file was taken for damaged
    and replaced under a live writer."""
    import shutil

    from landscape.store import recovery

    path = _killed_writer(tmp_path / "run.h5", rows=0)  # its marks, as a live one holds them
    size = path.stat().st_size

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recovery.shutil, "copyfile", full)
    with pytest.raises(RunFileError, match="no room to read who writes it"):
        RunWriter(path, mode="w")
    assert path.stat().st_size == size
    monkeypatch.setattr(recovery.shutil, "copyfile", shutil.copyfile)


def test_a_check_that_catches_a_live_writer_mid_change_looks_again(tmp_path, monkeypatch):
    """A reader opening while a resume shrank the tables (truncate_from), or sharing an
    HDF5 view another handle refreshed in part, read the live file as damaged (resume
    audit: 49 of 1,424 opens during 35 resumes). While the writer runs, a failed check
    waits, refreshes and looks again; a file nobody writes is refused at once."""
    from landscape.store import recovery

    path = tmp_path / "run.h5"
    writer = RunWriter(path)
    writer.declare("a", {"v": None})
    writer.append("a", 0, {"v": 1.0})
    writer.flush()
    real, calls = recovery.check_tables, []

    def half_done_once(f, p):
        calls.append(p)
        if len(calls) == 1:
            raise RunFileError(f"{p}: damaged run file: table 'metrics/a' (its steps do not "
                               "increase)")
        real(f, p)

    monkeypatch.setattr(recovery, "check_tables", half_done_once)
    with Run.open(path) as run:  # the writer is live (this process): looked at again
        assert list(run.steps("a")) == [0]
    assert len(calls) == 2
    writer.close()
    calls.clear()
    with pytest.raises(RunFileError, match="damaged run file"):
        Run.open(path)  # no writer: the damage is the file's
    assert len(calls) == 1


def test_truncation_shrinks_the_step_column_first_out_of_swmr_mode(tmp_path, monkeypatch):
    """A resume's truncate_from shrank each table's datasets in name order in SWMR mode,
    which HDF5 does not promise to show readers consistently; ``step`` commits the rows."""
    import h5py

    path = tmp_path / "run.h5"
    with RunWriter(path) as writer:
        writer.declare("m", {"a": None, "z": None})
        for step in range(10):
            writer.append("m", step, {"a": 1.0, "z": 2.0})
    resized = []
    real = h5py.Dataset.resize

    def spy(ds, size, axis=None):
        resized.append((ds.name, ds.file.swmr_mode))
        return real(ds, size, axis)

    monkeypatch.setattr(h5py.Dataset, "resize", spy)
    with RunWriter(path, truncate_from=4) as writer:
        shrunk = [(name, swmr) for name, swmr in resized if name.startswith("/metrics/m/")]
        assert [name for name, _ in shrunk] == ["/metrics/m/step", "/metrics/m/a",
                                               "/metrics/m/z"]
        assert not any(swmr for _, swmr in shrunk)
    monkeypatch.undo()
    assert list(Run.open(path).steps("m")) == [0, 1, 2, 3]


def test_a_refresh_reads_each_tables_steps_before_its_fields(tmp_path, monkeypatch):
    """The writer extends the fields, then ``step``: a reader that refreshed in name order
    saw a field named before ``step`` (``norm``, ``loss``, ``lr``) lag behind the steps
    it had just refreshed, and read more steps than values (a live ``run.series``)."""
    import h5py

    path = tmp_path / "run.h5"
    with RunWriter(path) as writer:
        writer.declare("m", {"a": None, "z": None})
        writer.append("m", 0, {"a": 1.0, "z": 2.0})
    refreshed = []
    real = h5py.Dataset.refresh

    def spy(ds):
        refreshed.append(ds.name)
        return real(ds)

    with Run.open(path) as run:
        monkeypatch.setattr(h5py.Dataset, "refresh", spy)
        run.refresh()
    table = [name for name in refreshed if name.startswith("/metrics/m/")]
    assert table[0] == "/metrics/m/step" and sorted(table[1:]) == ["/metrics/m/a",
                                                                   "/metrics/m/z"]


def test_an_exception_leaving_a_step_drops_the_rows_it_appended(tmp_path):
    """A second Ctrl-C inside a step left the rows appended so far in the buffer, which
    closing the writer wrote: half a step in the file, the rest never recorded (a resumed
    run starts after it)."""
    path = tmp_path / "run.h5"
    writer = RunWriter(path, flush_every=10_000, flush_seconds=1e9)
    writer.declare("a", {"v": None})
    writer.declare("b", {"v": None})
    with writer.one_step():
        writer.append("a", 0, {"v": 0.0})
        writer.append("b", 0, {"v": 0.0})
    with pytest.raises(KeyboardInterrupt), writer.one_step():
        writer.append("a", 1, {"v": 1.0})
        writer.declare("c", {"v": None})
        writer.append("c", 1, {"v": 1.0})
        raise KeyboardInterrupt
    assert writer.last_step("a") == 0 and writer.last_step("c") is None
    with writer.one_step():  # the step again, whole
        for name in "abc":
            writer.append(name, 1, {"v": 2.0})
    # a callback that raises to stop training after the step's rows are whole keeps them
    with pytest.raises(RuntimeError), writer.one_step():
        writer.append("a", 2, {"v": 3.0})
        writer.step_complete()
        raise RuntimeError("stop")
    # a flush inside the step wrote its rows so far; those after it go; findings stay
    from landscape.findings import Finding

    with pytest.raises(KeyboardInterrupt), writer.one_step():
        writer.append("a", 3, {"v": 4.0})
        writer.flush()
        writer.append("b", 3, {"v": 4.0})
        writer.add_finding(Finding(step=3, rule="metric_failed", metric="b", severity="info",
                                   value=float("nan"), threshold=float("nan"), message="m"))
        raise KeyboardInterrupt
    assert writer.last_step("b") == 1
    writer.close()
    with Run.open(path) as run:
        assert [run.steps(name).tolist() for name in "abc"] == [[0, 1, 2, 3], [0, 1], [1]]
        assert run.series("a", "v")[1].tolist() == [0.0, 2.0, 3.0, 4.0]
        assert [(f.step, f.rule) for f in run.findings()] == [(3, "metric_failed")]


HOLDER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from landscape.store.recovery import writers_excluded
    path = Path(sys.argv[1])
    with writers_excluded(path):  # as a writer opening or recovering it does
        Path(sys.argv[1] + ".holding").touch()
        time.sleep(1.0)
        Path(sys.argv[1] + ".released").touch()
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_writer_waits_for_another_process_opening_a_run_in_its_directory(tmp_path):
    """Two processes resuming one crashed file at once both recovered it, and the second
    replaced it under the first, whose rows were lost without a word; two creating one new
    file both truncated it. Opening for writing is now one process at a time: the second
    finds the first recorded as the file's writer, and is refused (crash review)."""
    path = tmp_path / "run.h5"
    (tmp_path / "holder.py").write_text(HOLDER_SCRIPT)
    holder = subprocess.Popen([sys.executable, str(tmp_path / "holder.py"), str(path)],
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 300  # a guard against hanging, not a timing assertion
        while not Path(f"{path}.holding").exists() and holder.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        assert holder.poll() is None
        with RunWriter(path, mode="w"):
            # the open waited until the other process left its block
            assert Path(f"{path}.released").exists()
    finally:
        holder.wait(timeout=300)


def test_two_writers_resuming_one_crashed_run_at_once_one_is_refused(tmp_path):
    """Started together on a run whose writer was killed: one resumes, the other is refused
    in one line, and no row of either is lost to the other's recovery."""
    path = _killed_writer(tmp_path / "run.h5", rows=20)
    script = tmp_path / "resume.py"
    script.write_text(textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from landscape import RunFileError
        from landscape.store import RunWriter
        path, go, first = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
        while not go.exists():
            time.sleep(0.001)
        try:
            w = RunWriter(path)
        except RunFileError as err:
            print("refused", err, flush=True)
            sys.exit(0)
        for step in range(first, first + 50):
            w.append("m", step, {"v": 2.0 * step})
            w.flush()
        w.close()
        print("wrote", first, flush=True)
        """))
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(script), str(path), str(go), str(first)],
                              stdout=subprocess.PIPE, text=True, env=env)
             for first in (1000, 5000)]
    time.sleep(2.0)  # both imported and waiting (not a timing assertion: either order works)
    go.touch()
    said = sorted(p.communicate(timeout=300)[0].split()[0] for p in procs)
    assert said == ["refused", "wrote"], said
    with Run.open(path) as run:
        steps = run.steps("m")
        first = 1000 if 1000 in steps else 5000
        assert list(steps[-50:]) == list(range(first, first + 50))
        assert np.all(np.diff(steps) > 0)


def test_a_crashed_run_on_a_disk_without_room_for_its_copy_is_refused_in_one_line(
        tmp_path, monkeypatch):
    """Resuming a killed run on a nearly full disk raised HDF5's raw 'Unable to create
    file' from inside the recovery's copy (crash review)."""
    import shutil as shutil_module

    from landscape.store import recovery

    path = _killed_writer(tmp_path / "run.h5", rows=6)
    size = path.stat().st_size
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(recovery.shutil, "disk_usage", lambda p: usage._replace(free=size))
    with pytest.raises(RunFileError, match=r"its writer was killed, and reopening it takes a "
                                           r"copy of it beside it .* MiB are free"):
        RunWriter(path)
    assert not list(tmp_path.glob("*.recover"))
    monkeypatch.undo()
    with RunWriter(path) as w:  # with room, it resumes
        assert w.last_step("m") == 5


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_threads_opening_runs_in_one_directory_take_turns(tmp_path):
    """Re-entrancy was counted per process: a second thread went on without the lock, and
    the first thread's exit left it a KeyError (own-diff review)."""
    import threading

    from landscape.store.recovery import writers_excluded

    order: list[str] = []
    inside = threading.Event()

    def first():
        with writers_excluded(tmp_path / "a.h5"):
            order.append("first in")
            inside.set()
            time.sleep(0.3)  # (an ordering, not a timing assertion)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(timeout=300)
    with writers_excluded(tmp_path / "b.h5"):
        order.append("second in")
    thread.join(timeout=300)
    assert order == ["first in", "first out", "second in"]
    errors = []

    def open_runs(i):
        try:
            for j in range(10):
                with RunWriter(tmp_path / f"r{i}_{j}.h5", mode="w") as w:
                    w.declare("m", {"v": None})
        except Exception as err:  # collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=open_runs, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []


SIGTERM_IN_FLUSH = textwrap.dedent(
    """
    import os, signal, sys
    import h5py
    from landscape._interrupts import InterruptGuard
    from landscape.store import RunWriter
    path, where = sys.argv[1], sys.argv[2]
    w = RunWriter(path, mode="w", flush_every=10**6, flush_seconds=1e9)
    for name in "abc":
        w.declare(name, {"v": None})
    for step in range(6):
        for name in "abc":
            w.append(name, step, {"v": float(step)})
        if step == 2:
            w.flush()
    guard = InterruptGuard(w.flush, w.close).install()  # as a monitor installs it
    resize = h5py.Dataset.resize

    def resized(self, *args, **kwargs):  # SIGTERM right after a step column's resize
        resize(self, *args, **kwargs)
        if self.name == where:
            h5py.Dataset.resize = resize
            os.kill(os.getpid(), signal.SIGTERM)

    h5py.Dataset.resize = resized
    w.flush()  # a checkpoint callback's flush, a monitor's close()
    print("not ended by the signal")
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_in_the_middle_of_a_flush_leaves_every_row_once(tmp_path):
    """A job scheduler's SIGTERM while a flush appended a table: the interrupt guard's
    close() closed the file under it and the process ended, leaving that table with steps
    of 0 and the next tables without their rows: a file no reader opens (review)."""
    path = tmp_path / "run.h5"
    (tmp_path / "term.py").write_text(SIGTERM_IN_FLUSH)
    done = subprocess.run([sys.executable, str(tmp_path / "term.py"), str(path),
                           "/metrics/b/step"], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGTERM, done.stdout + done.stderr
    with Run.open(path) as run:
        for name in "abc":
            assert list(run.steps(name)) == list(range(6)), name
            np.testing.assert_array_equal(run.series(name, "v")[1], np.arange(6.0))


def test_a_crashed_run_resumed_through_a_link_is_recovered_where_the_link_points(tmp_path):
    """The recovery copy replaced the link itself with a regular file in the link's
    directory, and the crashed file it pointed to stayed as it was (review)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "links").mkdir()
    target = _killed_writer(tmp_path / "real" / "run.h5", rows=8)
    link = tmp_path / "links" / "run.h5"
    link.symlink_to(target)
    with RunWriter(link) as w:
        assert w.last_step("m") == 7
        w.append("m", 8, {"v": 8.0})
    assert link.is_symlink() and os.path.realpath(link) == str(target.resolve())
    with Run.open(target) as run:
        assert list(run.steps("m")) == list(range(9))
    assert not list((tmp_path / "links").glob("*.recover"))


def test_the_writer_status_of_each_state_and_the_second_look(tmp_path, monkeypatch):
    """The states a reader tells from the superblock's flags and the recorded writer; a
    live writer's file that reads as closed is looked at again (a structural change
    closes and reopens it within milliseconds: a live run passed a --require-finished
    gate in that window)."""
    from landscape.store import writer_status as ws

    path = tmp_path / "run.h5"
    path.write_bytes(b"")
    here, alive = socket.gethostname(), os.getppid()  # a process that runs, not this one
    monkeypatch.setattr(ws, "REOPEN_WAIT", 0.0)

    def status(flags, *args):
        looks = iter(flags)
        monkeypatch.setattr(ws, "open_flags", lambda _p: next(looks))
        return ws.writer_status(path, *args)

    assert status([0, 5], alive, here).state == "writing"  # closed for a moment only
    assert status([0, 0], alive, here).state == "closed"  # closed, the process lives on
    assert status([0], 99_999_999, here).state == "closed"  # its writer is gone: no wait
    stopped = status([0], 99_999_999, here, "stopped by SIGTERM")
    assert stopped.state == "stopped" and not stopped.finished
    assert "which stopped before the end (stopped by SIGTERM)" in stopped.describe()
    assert status([5], 99_999_999, here).state == "ended"
    elsewhere = status([5], alive, "another-host")
    assert elsewhere.state == "open" and "another host" in elsewhere.describe()
    unrecorded = status([5])
    assert unrecorded.state == "open" and "not recorded" in unrecorded.describe()
    assert status([None], alive, here).state == "unknown"


def _posthoc_surface(path: Path, name: str = "s") -> None:
    """A post-hoc tool's session: a small surface added to the run, closed cleanly."""
    with RunWriter(path, posthoc=True) as w:
        w.create_surface(name, np.linspace(-1, 1, 3))
        for i in range(3):
            w.write_surface(name, i, {"loss": float(i)})


def test_a_post_hoc_session_keeps_how_training_ended_killed_stopped_or_old(tmp_path):
    """The repair a post-hoc writer makes of a killed training run's file, its reopening
    of a stopped run written before the ``trained`` attribute, read as finished (review)."""
    from landscape.store.writer import ENDED_UNCLOSED

    killed = _killed_writer(tmp_path / "killed.h5", rows=5)
    with Run.open(killed) as run:
        assert run.writer_status().state == "ended"
    _posthoc_surface(killed)
    with Run.open(killed) as run:
        status = run.writer_status()
        assert run.surface("s").complete and run.rows("m") == 5
    assert (status.state, status.reason) == ("stopped", ENDED_UNCLOSED)

    old = tmp_path / "old.h5"  # a training run of a version before `trained`
    with RunWriter(old, mode="w") as w:
        w.declare("m", {"v": None})
        w.append("m", 0, {"v": 1.0})
        w.close(how="stopped on RuntimeError: boom")
    import h5py

    with h5py.File(old, "a") as f:
        del f.attrs["trained"]
    _posthoc_surface(old)
    with Run.open(old) as run:
        assert run.writer_status().reason == "stopped on RuntimeError: boom"


def _killed_posthoc_session(path: Path) -> None:
    """A post-hoc session (a surface) killed with SIGKILL after its first point."""
    script = textwrap.dedent("""
        import os, signal, sys
        import numpy as np
        from landscape.store import RunWriter
        w = RunWriter(sys.argv[1], posthoc=True)
        w.create_surface("s", np.linspace(-1, 1, 3))
        w.write_surface("s", 0, {"loss": 1.0})
        w.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    subprocess.run([sys.executable, "-c", script, str(path)],
                   env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_killed_post_hoc_session_is_not_blamed_on_training(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, mode="w") as w:  # training, finished
        w.declare("m", {"v": None})
        w.append("m", 0, {"v": 1.0})
    _killed_posthoc_session(path)
    _posthoc_surface(path, "t")  # the next post-hoc session repairs the file
    with Run.open(path) as run:
        assert run.writer_status().state == "closed"
        assert "posthoc_writing" not in run.attrs


def test_a_post_hoc_session_killed_after_training_leaves_trainings_state(tmp_path):
    """``check --require-finished`` failed a finished training run once a surface added to
    it was killed: the flags the kill left read as training's writer ended (review)."""
    for how in (None, "stopped by SIGTERM"):
        path = tmp_path / f"run-{how is None}.h5"
        with RunWriter(path, mode="w") as w:
            w.declare("m", {"v": None})
            w.append("m", 0, {"v": 1.0})
            if how:
                w.close(how=how)
        _killed_posthoc_session(path)
        with Run.open(path) as run:
            status = run.writer_status()
        assert status.state == ("closed" if how is None else "stopped")
        assert "post-hoc session (surface, analyze) was killed" in status.describe()
    only = tmp_path / "only.h5"  # a run of its own: the killed session is the run's writer
    _killed_posthoc_session(only)
    with Run.open(only) as run:
        assert run.writer_status().state == "ended"


def test_a_context_field_a_newer_version_adds_is_recorded_as_context(tmp_path):
    """grad_norm gained ``samples`` (a context field): a resumed older file got the column
    but not its ``context`` entry, so the plots drew it as a measurement (review)."""
    path = tmp_path / "run.h5"
    with RunWriter(path, mode="w") as w:
        w.declare("grad_norm", {"value": None})
        w.append("grad_norm", 0, {"value": 1.0})
    with RunWriter(path) as w:
        w.declare("grad_norm", {"value": None, "samples": None}, context=["samples"])
        w.append("grad_norm", 1, {"value": 1.0, "samples": 64.0})
    from landscape.plotting.timelines import default_fields

    with Run.open(path) as run:
        assert run.metric_attrs("grad_norm")["context"] == ["samples"]
        assert default_fields(run, "grad_norm") == ["value"]
