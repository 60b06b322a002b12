"""``landscape --version``, ``info`` and ``demo`` through click's CliRunner (the demo's pure
helpers: tests/test_demo.py)."""

from __future__ import annotations

import collections
import json
import re
import shutil
from pathlib import Path

import numpy as np
from landscape_cli.main import cli

from landscape import __version__
from landscape.demo import run_demo
from landscape.findings import Finding
from landscape.store import Run, RunWriter
from tests.cli._results import one_line_error


def test_version(runner):
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_info_lists_metrics_fields_steps_findings_and_surfaces(runner, tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, config={"lr": 0.5}) as w:
        w.declare("hessian", {"top": (5,), "trace": None}, schedule="every(10)")
        for step in (10, 20, 30):
            w.append("hessian", step, {"top": np.arange(5.0), "trace": 1.0})
        w.add_finding(Finding(20, "edge_of_stability", "warning", "hessian/top", 3.0, 2.0, "m"))
        w.create_surface("plane", np.linspace(-1, 1, 4), np.linspace(-1, 1, 3))
        w.write_surface("plane", (0, 0), {"loss": 1.0})
        w.create_surface("line", np.linspace(-1, 1, 5))
        w.declare("loss", {"value": None})
        w.append("loss", 30, {"value": 0.5})
        w.declare("unmeasured", {"metrics": "S16"},  # the monitor's own table
                  cls="landscape.monitor.Monitor")
        w.append("unmeasured", 10, {"metrics": "hessian"})
        w.declare("probe", {"value": None})  # a user's table of that name is a metric
        w.append("probe", 10, {"value": 1.0})
    result = runner.invoke(cli, ["info", str(path)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "format version 1" in out
    # the monitor's records are no metrics, listed last (they counted as metrics)
    assert "metrics: 3 (and the monitor's own unmeasured)" in out
    assert out.index("unmeasured: 1 row") > out.index("loss: 1 row")
    assert "hessian: 3 rows, steps 10..30, schedule every(10)" in out
    assert "loss: 1 row, steps 30..30" in out  # (was "1 rows")
    assert "top float64[5]" in out and "trace float64" in out
    assert "findings stored: 1 (raised while the run was written" in out
    assert "plane: 4x3 grid, 1/12 points computed" in out  # x by y: `surface` said 4x3
    assert "line: line of 5 points, 0/5 points computed" in out  # (was "5 grid")
    assert '"lr": 0.5' in out

    as_json = runner.invoke(cli, ["info", str(path), "--json"])
    data = json.loads(as_json.output)
    assert data["metrics"]["hessian"]["last_step"] == 30
    assert data["surfaces"]["plane"]["computed"] == 1


def test_a_reader_that_closes_the_pipe_early_gets_no_error_line(tmp_path):
    """``landscape info run.h5 | head -1``: the closed pipe is not reported as an error."""
    import os
    import subprocess
    import sys

    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.declare("loss", {"value": None})
        w.append("loss", 0, {"value": 1.0})
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-m", "landscape_cli.main", "info", str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(root)})
    child.stdout.close()  # the reader is gone before the command prints its first line
    stderr = child.stderr.read().decode()
    child.wait(timeout=300)
    assert child.returncode != 0  # the output did not reach its reader
    assert "Error" not in stderr and "Traceback" not in stderr, stderr


def test_info_bad_inputs_give_one_line(runner, tmp_path):
    one_line_error(runner.invoke(cli, ["info", str(tmp_path / "missing.h5")]), "no such file")
    one_line_error(runner.invoke(cli, ["info", str(tmp_path)]), "is a directory")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"garbage" * 100)
    one_line_error(runner.invoke(cli, ["info", str(bad)]), "not a readable HDF5 file", str(bad))


LEAD = re.compile(r"^first warning at step (\d+) \((\w+)\), loss 1\.25x baseline at step "
                  r"(\d+), (?:10x|non-finite) at step (\d+): (\d+) steps of warning before "
                  r"the loss moved, (\d+) before it exploded$", re.M)


def test_demo_without_an_explosion_prints_no_lead_before_it(runner, tmp_path):
    """A spike the model survives (x20: the loss peaks at 1.9x): the lead table read "after it"
    for every rule, an explosion that never came, while the closing line said the loss never
    reached 10x."""
    result = runner.invoke(cli, ["demo", "--out", str(tmp_path / "out"), "--spike-factor", "20",
                                 "--surface-steps", "0", "-q"])
    assert result.exit_code == 0, result.output
    assert "10x never" in result.output
    assert "warning lead before the loss reached" not in result.output
    assert "after it" not in result.output
    # a jump, not a ramp (review): the baseline line said "before the ramp"
    assert "before the jump" in result.output and "before the ramp" not in result.output


def test_demo_warns_before_the_loss_moves(runner, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(cli, ["demo", "--out", str(out), "--surface-steps", "5", "-q"])
    assert result.exit_code == 0, result.output
    with Run.open(out / "run.h5") as run:
        steps, loss = run.series("loss", "value")
        assert list(steps) == list(range(220))
        assert run.config["demo"] is True and run.config["ramp_step"] == 150
        assert "sentinels" in run.metrics() and "sharpness" not in run.metrics()  # default
        findings = run.findings()
        assert run.surface("pre_ramp_plane").values["loss"].shape == (5, 5)
    assert np.isfinite(loss[:150]).all()
    assert loss[149] < 0.5 * loss[0]  # it learned before the ramp
    warned = sorted(f.step for f in findings if f.severity in ("warning", "error"))
    assert warned and warned[0] >= 150  # nothing at warning level before the ramp
    # the onset, computed here from the recorded loss (the suite's definitions)
    base = float(np.median(loss[100:150]))
    onset = next(s for s in range(150, 218) if (loss[s:s + 3] >= 1.25 * base).all())
    explosion = next(s for s in range(150, 220) if not loss[s] < 10 * base)
    assert warned[0] < onset <= explosion  # the default monitor warned before the loss moved
    m = LEAD.search(result.output)
    assert m, result.output
    first, rule, on, ex, lead, lead_x = m.groups()
    assert (int(first), int(on), int(ex)) == (warned[0], onset, explosion)
    assert int(lead) == onset - warned[0] > 0 and int(lead_x) == explosion - warned[0]
    assert rule == "taylor_forecast"
    # docs/getting-started.md shows this output: every line it quotes is printed as shown
    doc = (Path(__file__).resolve().parents[2] / "docs" / "getting-started.md").read_text()
    block = "trained 220 steps" + doc.split("```\ntrained 220 steps", 1)[1].split("```", 1)[0]
    quoted = [ln for ln in block.splitlines() if ln.strip() and ln.strip() != "..."]
    printed = result.output.splitlines()
    # what follows the explosion is chaotic: the same torch wheel gives a final loss of
    # 96.6 on one machine, 102.2 on another and 88.5 on a third (an AVX2 one, where the
    # gradient norm never warns after it: one finding fewer, no "after it" row); every
    # line before it is the same on all three
    chaotic = [(re.compile(r"final loss \S+$"), "final loss ..."),
               (re.compile(r"^findings \(\d+\):$"), "findings (...):")]
    quoted = [ln for ln in quoted if not ln.endswith(" after it")]
    for pattern, same in chaotic:
        quoted = [pattern.sub(same, ln) for ln in quoted]
        printed = [pattern.sub(same, ln) for ln in printed]
    assert len(quoted) > 8 and all(ln in printed for ln in quoted), [
        ln for ln in quoted if ln not in printed]
    assert "no warning before the ramp" in result.output
    assert f"  {rule:<20} {lead_x}" in result.output  # the lead table agrees
    for name in ("loss.png", "warning.png", "surface.png", "report.html"):
        assert (out / name).stat().st_size > 1000, name
    assert "findings (" in result.output and "report.html" in result.output


def test_demo_spike_factor_is_an_abrupt_jump(tmp_path):
    result = run_demo(tmp_path, steps=160, spike_step=150, spike_factor=40.0, surface_steps=0,
                      progress=False)
    assert (result.ramp_step, result.ramp_steps, result.ramp_factor) == (150, 1, 40.0)
    assert result.spike_step == 150
    warned = [f for f in result.findings if f.severity in ("warning", "error")]
    assert min(f.step for f in warned) == 150  # caught at the first affected step
    assert result.warning is not None and not result.warning.early


def test_demo_rejects_a_ramp_after_the_end(runner, tmp_path):
    for option in ("--ramp-step", "--spike-step"):
        result = runner.invoke(cli, ["demo", "--out", str(tmp_path), "--steps", "30",
                                     option, "40"])
        assert result.exit_code == 2
        assert "--ramp-step" in result.output and "Traceback" not in result.output


def test_demo_options_that_contradict_or_destroy_are_refused(runner, tmp_path):
    """demo --out DIR replaced a run.h5 of the user's there; --out '' wrote into the current
    directory; --ramp-factor nan ran (a NaN learning rate); --spike-factor beside
    --ramp-factor used one of them silently; and -q printed the monitor's probe note."""
    mine = tmp_path / "exp"
    mine.mkdir()
    with RunWriter(mine / "run.h5") as w:
        w.declare("loss", {"value": None})
        w.append("loss", 0, {"value": 1.0})
    before = (mine / "run.h5").read_bytes()
    one_line_error(runner.invoke(cli, ["demo", "--out", str(mine), "-q", "--steps", "20"]),
                    "is not the run file of an earlier demo")
    assert (mine / "run.h5").read_bytes() == before
    empty = runner.invoke(cli, ["demo", "--out", "", "-q", "--steps", "20"])
    assert empty.exit_code == 2 and "give a directory" in empty.output
    for args in (["--ramp-factor", "nan"], ["--spike-factor", "inf"],
                 # the rate times 1e40 overflowed float32 inside SGD: a traceback
                 ["--spike-factor", "1e40"], ["--ramp-factor", "1e300"],
                 ["--spike-factor", "5", "--ramp-factor", "10"],
                 ["--spike-factor", "5", "--ramp-steps", "7"]):
        result = runner.invoke(cli, ["demo", "--out", str(tmp_path / "d"), "-q", *args])
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
    short = runner.invoke(cli, ["demo", "--out", str(tmp_path / "d"), "-q", "--steps", "30",
                                "--ramp-step", "20", "--surface-steps", "0"])
    assert short.exit_code == 0, short.output
    assert "ramped from step 20, 10 of its 60 steps (to x3.16 of x1000)" in short.output
    assert "probe" not in short.stderr
    again = runner.invoke(cli, ["demo", "--out", str(tmp_path / "d"), "-q", "--steps", "20",
                                "--surface-steps", "0"])
    assert again.exit_code == 0, again.output  # an earlier demo's run is replaced


def test_a_short_demo_says_how_many_steps_its_baseline_is_the_median_of(runner, tmp_path):
    # the line said "the 50 steps before the ramp" when only 9 (or 1) preceded it
    for steps, start, window in ((30, 9, "the 9 steps"), (20, 1, "the step")):
        result = runner.invoke(cli, ["demo", "--out", str(tmp_path / str(start)), "--steps",
                                     str(steps), "--ramp-step", str(start), "--ramp-steps",
                                     "5", "--surface-steps", "0", "-q"])
        assert result.exit_code == 0, result.output
        assert f"(median of {window} before the ramp)" in result.output


def test_a_surface_source_of_the_users_own_form_is_shown_not_a_traceback(runner, tmp_path):
    """Review: info assumed `landscape surface`'s dict: a string source was a traceback, a
    string of checkpoints came out one letter at a time."""
    from landscape.store import RunWriter
    from landscape.store.reader import surface_source

    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.create_surface("a", np.linspace(-1, 1, 3), attrs={"source": "cifar10 resnet, seed 3"})
        w.create_surface("b", np.linspace(-1, 1, 3), attrs={"source": {"checkpoints": "f.pt"}})
        w.create_surface("c", np.linspace(-1, 1, 3))
    result = runner.invoke(cli, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "      from cifar10 resnet, seed 3" in result.output
    assert "      from f.pt\n" in result.output
    assert result.output.count("      from ") == 2
    assert surface_source({"checkpoints": ["a.pt", "b.pt"], "model": "f.py:m"}) == \
        "a.pt, b.pt (model f.py:m)"


def test_demo_on_a_disk_too_full_says_so(runner, tmp_path, monkeypatch):
    """It said "no metric 'loss' in run.h5 (metrics: none)": the monitor had stopped
    writing for the disk, and the demo went on to read an empty run."""
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(2**30, 2**30, 2**18))
    result = runner.invoke(cli, ["demo", "--out", str(tmp_path / "d"), "-q", "--steps", "20",
                                 "--surface-steps", "0"])
    one_line_error(result, "MiB free on its disk, too little to write more")
