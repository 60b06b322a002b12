"""SIGINT and SIGTERM during `landscape analyze`: a valid file with every finished checkpoint,
one line on stderr, exit 130/143, and the same command continues where it stopped.

A real signal to a child process running the CLI, sent once the first checkpoint's rows are
committed (the model sleeps in its forward while LANDSCAPE_TEST_SLOW is set, so the other
checkpoints are still to come).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from landscape_cli.main import cli

import landscape as ls
from landscape.store import RunWriter

SLOW_FACTORIES = textwrap.dedent("""
    import os, time
    import torch
    from torch import nn

    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

        def forward(self, x):
            if os.environ.get("LANDSCAPE_TEST_SLOW"):
                time.sleep(0.05)
            return self.net(x)

    def model():
        torch.manual_seed(0)
        return Slow()

    def data():
        g = torch.Generator().manual_seed(1)
        return torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
""")

ROOT = Path(__file__).resolve().parents[2]


def _checkpoints(root: Path, n: int = 5) -> list[Path]:
    (root / "slow.py").write_text(SLOW_FACTORIES)
    paths = []
    for step in range(1, n + 1):
        torch.manual_seed(step)
        net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
        state = {f"net.{k}": v for k, v in net.state_dict().items()}
        paths.append(root / f"ckpt-{step * 10}.pt")
        torch.save(state, paths[-1])
    return paths


def _committed(out: Path) -> int:
    try:
        with ls.Run.open(out) as run:
            return len(run.checkpoints())
    except Exception:  # not created yet, or being created
        return 0


def _signal_when(args: list[str], ready, sig: int, times: int = 1,
                 gap: float = 0.0) -> tuple[int, str]:
    """Run the CLI with ``args`` in a child process, send ``sig`` once ``ready()`` holds
    (``times`` times, ``gap`` seconds apart: a Ctrl-C pressed again and again).

    Returns:
        The child's exit status and its stderr.
    """
    env = {**os.environ, "LANDSCAPE_TEST_SLOW": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "landscape_cli.main", *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300  # a guard against hanging, not a timing assertion
        while not ready() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.poll() is None, child.communicate()
        for i in range(times):
            if i:
                time.sleep(gap)
            if child.poll() is None:
                child.send_signal(sig)
        _, stderr = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
    return child.returncode, stderr


@pytest.mark.parametrize(("sig", "status", "name"), [(signal.SIGINT, 130, "SIGINT"),
                                                     (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_leaves_every_finished_checkpoint_and_a_rerun_continues(tmp_path, sig, status,
                                                                          name):
    paths = _checkpoints(tmp_path)
    out = tmp_path / "run.h5"
    args = ["analyze", *map(str, paths), "--model", f"{tmp_path / 'slow.py'}:model", "--data",
            f"{tmp_path / 'slow.py'}:data", "-m", "top_eigenvalues", "-m", "sharpness",
            "--lr", "0.1", "-o", str(out), "-q"]
    returncode, stderr = _signal_when(args, lambda: _committed(out) >= 1, sig)
    assert returncode == status, stderr
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith(f"Error: interrupted ({name}): ")
    assert lines[-1].endswith("; to continue, run the same command again")
    with ls.Run.open(out) as run:  # a valid file: every finished checkpoint, nothing else
        # which signal, as a monitored script records it (SIGTERM read "Ctrl-C": review)
        assert run.writer_status().reason == (
            "stopped by SIGTERM" if name == "SIGTERM" else "stopped by Ctrl-C (KeyboardInterrupt)")
        done = [s for s, _ in run.checkpoints()]
        assert 1 <= len(done) < len(paths)
        assert done == [10 * (i + 1) for i in range(len(done))]
        for metric in ("top_eigenvalues", "sharpness"):
            assert list(run.steps(metric)) == done
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert "already recorded, skipped" in again.stderr
    with ls.Run.open(out) as run:
        assert [s for s, _ in run.checkpoints()] == [10, 20, 30, 40, 50]
        assert list(run.steps("top_eigenvalues")) == [10, 20, 30, 40, 50]


def test_rows_of_a_checkpoint_a_killed_process_left_unfinished_are_recomputed(tmp_path):
    paths = _checkpoints(tmp_path, 3)
    out = tmp_path / "run.h5"
    args = ["analyze", *map(str, paths), "--model", f"{tmp_path / 'slow.py'}:model", "--data",
            f"{tmp_path / 'slow.py'}:data", "-m", "top_eigenvalues", "-m", "sharpness", "-o",
            str(out), "-q"]
    first = CliRunner().invoke(cli, [*args[:2], *args[4:]])  # step 10 only
    assert first.exit_code == 0, first.output
    with ls.Run.open(out) as run:  # step 10's row, with other eigenvalues
        row = {f: run.series("top_eigenvalues", f)[1][-1] for f in run.fields("top_eigenvalues")}
    row["eigenvalues"] = [9.0, 8.0, 7.0]
    with RunWriter(out, mode="a") as writer:  # as a SIGKILL mid-checkpoint leaves it
        writer.append("top_eigenvalues", 20, row)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    with ls.Run.open(out) as run:
        assert list(run.steps("sharpness")) == [10, 20, 30]
        assert list(run.steps("top_eigenvalues")) == [10, 20, 30]
        assert run.series("top_eigenvalues", "eigenvalues")[1][1][0] != 9.0


def _points(out: Path, name: str) -> int:
    try:
        with ls.Run.open(out) as run:
            return int(run.surface(name).done.sum())
    except Exception:  # not created yet, or being created
        return 0


def test_a_signal_during_surface_leaves_its_points_and_a_rerun_continues(tmp_path):
    """`landscape surface` said click's 'Aborted!' with status 1 (SIGTERM killed it)."""
    paths = _checkpoints(tmp_path, n=1)
    out = tmp_path / "surface.h5"
    args = ["surface", str(paths[0]), "--model", f"{tmp_path / 'slow.py'}:model", "--data",
            f"{tmp_path / 'slow.py'}:data", "--dims", "1", "--steps", "201", "-o", str(out),
            "-q"]
    # 201 points of 50 ms each: the signal comes after the first point, long before the
    # last, however loaded the machine (41 points were done before it on a busy CI run)
    returncode, stderr = _signal_when(args, lambda: _points(out, "random-line") >= 1,
                                      signal.SIGTERM)
    assert returncode == 143, stderr
    assert "Traceback" not in stderr
    last = [ln for ln in stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("Error: interrupted (SIGTERM): ") and "of 201 points" in last
    assert 1 <= _points(out, "random-line") < 201
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert _points(out, "random-line") == 201


def test_ctrl_c_pressed_again_and_again_still_says_what_was_stored(tmp_path):
    """Three SIGINTs 10-30 ms apart: the second interrupted the handling of the first (the
    line said only 'interrupted (SIGINT)', without the points stored and how to go on), or
    an exit handler of torch's printed a traceback (surfaces review)."""
    paths = _checkpoints(tmp_path, n=1)
    for gap in (0.01, 0.03):
        out = tmp_path / f"surface-{gap}.h5"
        args = ["surface", str(paths[0]), "--model", f"{tmp_path / 'slow.py'}:model",
                "--data", f"{tmp_path / 'slow.py'}:data", "--dims", "1", "--steps", "201",
                "-o", str(out), "-q"]
        returncode, stderr = _signal_when(args, lambda out=out: _points(out, "random-line") >= 1,
                                          signal.SIGINT, times=3, gap=gap)
        assert returncode == 130, stderr
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: interrupted (SIGINT): ") \
            and "of 201 points" in lines[0], stderr


def test_after_an_interrupted_overwrite_the_message_says_to_drop_it(tmp_path, monkeypatch):
    """'Run the same command again' with --overwrite started the file over: the work lost."""
    import landscape_cli.commands.analyze as analyze_command

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    paths = _checkpoints(tmp_path, n=1)
    monkeypatch.setattr(analyze_command, "analyze", interrupted)
    args = ["analyze", str(paths[0]), "--model", f"{tmp_path / 'slow.py'}:model", "--data",
            f"{tmp_path / 'slow.py'}:data", "-o", str(tmp_path / "run.h5")]
    for extra, advice in (([], "; to continue, run the same command again"),
                          (["--overwrite"], "; to continue, run the same command again "
                                            "without --overwrite (with it, it starts over)")):
        result = CliRunner().invoke(cli, [*args, *extra])
        assert result.exit_code == 130
        assert result.stderr.strip().splitlines()[-1].endswith(advice)


def test_a_ctrl_c_while_the_command_loads_is_one_line(monkeypatch, capsys):
    """The console script imports torch first (about a second): an interrupt there printed
    a traceback from inside the import."""
    from landscape_cli import entry

    class Interrupted:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "landscape_cli.main":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "landscape_cli.main")
    monkeypatch.setattr(sys, "meta_path", [Interrupted, *sys.meta_path])
    with pytest.raises(SystemExit) as ended:
        entry.main()
    assert ended.value.code == 130
    assert capsys.readouterr().err == "Error: interrupted (SIGINT)\n"


ENDLESS = textwrap.dedent("""
    import pathlib, time
    import torch

    def data():  # an endless iterator (itertools.cycle of a loader), slow to read
        g = torch.Generator().manual_seed(1)
        while True:
            pathlib.Path(__file__).with_name("reading").touch()
            time.sleep(0.05)
            yield torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
""")


def test_a_signal_while_the_data_load_ends_the_command_in_one_line(tmp_path):
    """The signal handlers were installed only once the computation began: a data factory
    that read forever (filling the memory) could not be stopped by a SIGINT a job runner
    sends to a process started with SIGINT ignored."""
    paths = _checkpoints(tmp_path, n=1)
    (tmp_path / "endless.py").write_text(ENDLESS)
    args = ["analyze", str(paths[0]), "--model", f"{tmp_path / 'slow.py'}:model", "--data",
            f"{tmp_path / 'endless.py'}:data", "-o", str(tmp_path / "run.h5"), "-q"]
    for sig, status, name in ((signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")):
        (tmp_path / "reading").unlink(missing_ok=True)
        returncode, stderr = _signal_when(args, (tmp_path / "reading").exists, sig)
        assert returncode == status, stderr
        assert "Traceback" not in stderr
        assert [ln for ln in stderr.splitlines() if ln.strip()][-1] == \
            f"Error: interrupted ({name})"


BLOCKING_REPORT = textwrap.dedent("""
    import pathlib, sys, time
    import landscape.report
    from landscape_cli.main import cli

    def render_report(run, **kwargs):  # a report that takes long: it waits for the signal
        pathlib.Path(sys.argv[1]).touch()
        time.sleep(300)

    landscape.report.render_report = render_report
    cli(sys.argv[2:], prog_name="landscape")
""")


def test_sigterm_ends_any_command_in_one_line(tmp_path, run_file):
    """Only analyze and surface turned SIGTERM into an exception: report, plot, check, info
    and watch were killed silently (exit 143, nothing said, a report half-written)."""
    run = run_file
    (tmp_path / "blocking.py").write_text(BLOCKING_REPORT)
    ready = tmp_path / "rendering"
    child = subprocess.Popen(
        [sys.executable, str(tmp_path / "blocking.py"), str(ready), "report", str(run), "-o",
         str(tmp_path / "report.html"), "-q"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300  # a guard against hanging, not a timing assertion
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.poll() is None, child.communicate()
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 143
    assert stderr.strip() == "Error: interrupted (SIGTERM)"
    assert not (tmp_path / "report.html").exists()


def test_sigterm_stops_watch_as_ctrl_c_does(tmp_path):
    """`watch` runs until stopped: a service manager's SIGTERM is its way of stopping."""
    missing = tmp_path / "run.h5"  # watch waits for it to appear
    child = subprocess.Popen(
        [sys.executable, "-m", "landscape_cli.main", "watch", str(missing), "--interval",
         "0.05"], env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE,
        text=True)
    try:
        line = child.stderr.readline()  # said once it waits: the handlers are installed
        assert "waiting" in line, line
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, stderr
    assert stderr.strip() == "stopped"


def test_an_interrupted_command_run_in_process_gives_the_handlers_back(run_file, monkeypatch):
    """A program (or a test) that runs the command line in its own process keeps its
    Ctrl-C: the handlers installed for the command are the caller's again afterwards."""
    import landscape_cli.commands.info as info_command

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises at once; not reached
        raise AssertionError("the signal did not arrive")

    monkeypatch.setattr(info_command.Run, "open", interrupted)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    result = CliRunner().invoke(cli, ["info", str(run_file)])
    assert result.exit_code == 130, result.output
    assert "interrupted (SIGINT)" in result.stderr
    assert {s: signal.getsignal(s) for s in before} == before
