"""Other processes: a writer killed mid-run, a reader following a live writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

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
    # the crashed file can be resumed for writing and keeps its rows
    with RunWriter(path) as w:
        assert w.last_step("m") == n - 1
        w.append("m", n, {"v": 2.0 * n, "vec": [n] * 4})
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
