"""``landscape plot``, ``report``, ``check`` and ``watch`` through click's CliRunner.

Runs are built with :class:`RunWriter`; the live ``watch`` test drives a writer in a
second process (HDF5 refuses a second open of the same file in one process) and replaces
the command's sleep by a step of that writer, so nothing depends on the wall clock.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from landscape_cli.commands import watch as watch_cmd
from landscape_cli.main import cli
from matplotlib.figure import Figure

import landscape as ls
from landscape.findings import Finding
from landscape.store import RunWriter

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def runner():
    return CliRunner()


def _one_line_error(result, *fragments):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for f in fragments:
        assert f in lines[0], lines[0]
    assert "Traceback" not in result.output


def _usage_error(result, *fragments):
    """Click's usage error: exit 2, the usage line, then one ``Error:`` line."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Usage: "), result.stderr
    assert lines[-1].startswith("Error: ") and all(f in lines[-1] for f in fragments), lines
    assert "Traceback" not in result.output


def _write_run(path, *, nan_loss_at=None, findings=(), surface=False):
    """loss (100 steps), hessian eigenvalues (k=3, every 10), per-layer alignment (2 layers)."""
    with RunWriter(path, mode="w", config={"lr": 0.1, "note": "<b>&"}) as w:
        w.declare("loss", {"value": None}, schedule="every(1)")
        w.declare("hessian", {"eigenvalues": (3,), "n_matvec": None}, params={"k": 3})
        w.declare(
            "spectral_alignment", {"minority": (2,)}, params={"layers": ["fc1", "fc2"]}
        )
        for s in range(100):
            loss = np.nan if s == nan_loss_at else float(np.exp(-s / 40))
            w.append("loss", s, {"value": loss})
            if s % 10 == 0:
                w.append("hessian", s, {"eigenvalues": [3.0 + s, 2.0, 1.0], "n_matvec": 10})
                w.append("spectral_alignment", s, {"minority": [0.4, 0.3]})
        for f in findings:
            w.add_finding(f)
        if surface:
            w.create_surface("line", np.linspace(-1, 1, 5), attrs={"directions": "random"})
            w.create_surface("plane", np.linspace(-1, 1, 4), np.linspace(-1, 1, 3))
            for i in range(5):
                w.write_surface("line", i, {"loss": float(i)})
            w.write_surface("plane", (0, 0), {"loss": 1.0})
    return path


WARN = Finding(30, "loss_spike", "warning", "loss/value", 5.0, 3.0, "loss jumped", "lower lr")
ERR = Finding(60, "edge_of_stability", "error", "hessian/eigenvalues", 63.0, 40.0, "past 2/eta")


@pytest.fixture
def run_file(tmp_path):
    return _write_run(tmp_path / "run.h5", findings=(WARN, ERR))


@pytest.fixture
def empty_run(tmp_path):
    path = tmp_path / "empty.h5"
    RunWriter(path, mode="w").close()
    return path


def _bad_inputs(tmp_path):
    bad = tmp_path / "corrupt.h5"
    bad.write_bytes(b"not hdf5 at all" * 64)
    return [
        (str(tmp_path / "missing.h5"), "no such file"),
        (str(tmp_path), "is a directory"),
        (str(bad), "not a readable HDF5 file"),
    ]


def _damaged_run(run_file, tmp_path):
    """A copy of ``run_file`` whose structure is broken: no ``/findings`` table."""
    import shutil

    import h5py

    damaged = tmp_path / "damaged.h5"
    shutil.copy(run_file, damaged)
    with h5py.File(damaged, "a") as f:
        del f["findings"]
    return damaged


# --------------------------------------------------------------------------- plot


def test_plot_every_metric_into_a_directory(runner, run_file, tmp_path):
    out = tmp_path / "plots"
    result = runner.invoke(cli, ["plot", str(run_file), "-o", str(out), "--log"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["hessian.png", "loss.png", "spectral_alignment.png"]
    for p in out.iterdir():
        assert p.read_bytes().startswith(PNG)
        assert f"wrote {p}" in result.output


def test_plot_one_metric_to_a_file_and_formats(runner, run_file, tmp_path):
    svg = tmp_path / "loss.svg"
    result = runner.invoke(cli, ["plot", str(run_file), "-m", "loss", "-o", str(svg), "-q"])
    assert result.exit_code == 0, result.output
    assert result.output == ""
    assert svg.read_text().lstrip().startswith("<?xml")
    two = tmp_path / "two"
    result = runner.invoke(
        cli, ["plot", str(run_file), "-m", "loss", "-m", "hessian", "-o", str(two), "--format=pdf"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in two.iterdir()) == ["hessian.pdf", "loss.pdf"]
    assert (two / "loss.pdf").read_bytes().startswith(b"%PDF")


def test_plot_bad_inputs(runner, run_file, empty_run, tmp_path):
    for path, fragment in _bad_inputs(tmp_path):
        _one_line_error(runner.invoke(cli, ["plot", path, "-o", str(tmp_path / "x.png")]), fragment)
    plot = ["plot", str(run_file)]
    _one_line_error(
        runner.invoke(cli, [*plot, "-m", "nope", "-o", str(tmp_path / "x.png")]),
        "no metric 'nope'", "metrics: hessian, loss, spectral_alignment",
    )
    # several metrics and a file name: one image per metric next to it (no longer an error)
    several = runner.invoke(
        cli, [*plot, "-m", "loss", "-m", "hessian", "-o", str(tmp_path / "a.png"), "-q"]
    )
    assert several.exit_code == 0, several.output
    assert (tmp_path / "a-loss.png").is_file() and (tmp_path / "a-hessian.png").is_file()
    _one_line_error(
        runner.invoke(cli, [*plot, "-m", "loss", "-o", str(tmp_path / "a.bmpx")]),
        "cannot tell the image format",
    )
    _one_line_error(
        runner.invoke(cli, [*plot, "-m", "loss", "-o", str(tmp_path / "no" / "a.png")]),
        "does not exist",
    )
    _usage_error(runner.invoke(cli, [*plot, "--3d", "-o", "x.png"]), "--surface")
    _usage_error(runner.invoke(cli, [*plot, "-m", "loss", "--surface", "plane", "-o", "x.png"]),
                 "use either --metric or --surface, not both")
    _one_line_error(
        runner.invoke(cli, ["plot", str(empty_run), "-o", str(tmp_path / "e.png")]),
        "no metrics to plot",
    )
    _one_line_error(
        runner.invoke(cli, [*plot, "--surface", "nope", "-o", str(tmp_path / "s.png")]),
        "no surface 'nope'",
    )
    usage = runner.invoke(cli, ["plot", str(run_file)])  # click's usage error: exit 2
    assert usage.exit_code == 2 and "Error: Missing option '-o'" in usage.stderr
    assert "Traceback" not in usage.output


def test_plot_field_without_surface_is_refused(runner, run_file, tmp_path):
    out = tmp_path / "x.png"
    _usage_error(
        runner.invoke(cli, ["plot", str(run_file), "--field", "accuracy", "-o", str(out)]),
        "--field applies to surfaces only", "--surface",
    )
    assert not out.exists() and not list(tmp_path.glob("x-*.png"))


def _with_an_empty_metric(path):
    _write_run(path)
    with RunWriter(path) as w:
        w.declare("adaptive", {"scale": None})  # a monitor declares it up front, 0 rows
    return path


def test_plot_and_report_leave_out_metrics_without_rows(runner, tmp_path):
    run = _with_an_empty_metric(tmp_path / "a.h5")
    result = runner.invoke(cli, ["plot", str(run), "-o", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("p-*.png")) == [
        "p-hessian.png", "p-loss.png", "p-spectral_alignment.png"
    ]
    asked = runner.invoke(cli, ["plot", str(run), "-m", "adaptive", "-o", str(tmp_path / "e.png")])
    assert asked.exit_code == 0 and (tmp_path / "e.png").is_file()  # named: drawn anyway
    out = tmp_path / "r.html"
    result = runner.invoke(cli, ["report", str(run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 3 timelines, 0 surfaces" in result.output
    assert out.read_text().count("<img ") == 3 and "No rows yet: adaptive." in out.read_text()
    only = tmp_path / "only.h5"
    with RunWriter(only, mode="w") as w:
        w.declare("adaptive", {"scale": None})
    _one_line_error(runner.invoke(cli, ["plot", str(only), "-o", str(tmp_path / "o.png")]),
                    "no metrics to plot (no rows yet: adaptive)")


def _fake_surfaces(monkeypatch):
    """A stand-in for landscape.plotting.surfaces that records what it was asked to draw."""
    calls = []

    def make(kind):
        def draw(surface, field="loss", **kwargs):
            calls.append((kind, surface.name, surface.ndim))
            fig = Figure(figsize=(2, 2))
            fig.add_subplot().plot(surface.x, np.nan_to_num(next(iter(surface.values.values()))
                                                            .reshape(-1)[: len(surface.x)]))
            return fig

        return draw

    module = types.ModuleType("landscape.plotting.surfaces")
    module.curve, module.contour, module.surface3d = make("curve"), make("contour"), make("3d")
    monkeypatch.setattr("landscape.report._surface_plots", module)
    return calls


def test_plot_surface_uses_the_surface_plots(runner, tmp_path, monkeypatch):
    calls = _fake_surfaces(monkeypatch)
    run = _write_run(tmp_path / "s.h5", surface=True)
    plot = ["plot", str(run), "--surface"]
    assert runner.invoke(cli, [*plot, "line", "-o", str(tmp_path / "l.png")]).exit_code == 0
    assert runner.invoke(cli, [*plot, "plane", "-o", str(tmp_path / "p.png")]).exit_code == 0
    assert runner.invoke(cli, [*plot, "plane", "--3d", "-o", str(tmp_path / "q.png")]
                         ).exit_code == 0
    assert calls == [("curve", "line", 1), ("contour", "plane", 2), ("3d", "plane", 2)]
    for name in ("l.png", "p.png", "q.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)
    _one_line_error(  # named by its option, not the library's argument (three_d:)
        runner.invoke(cli, [*plot, "line", "--3d", "-o", str(tmp_path / "x.png")]),
        "--3d: surface 'line' is 1-D"
    )


def test_plot_surface_with_the_real_surface_plots(runner, tmp_path):
    path = tmp_path / "surf.h5"
    x, y = np.linspace(-1, 1, 7), np.linspace(-1, 1, 5)
    with RunWriter(path, mode="w") as w:
        w.create_surface("line", x, fields=("loss", "accuracy"), attrs={"directions": {}})
        w.create_surface("plane", x, y)
        for i, a in enumerate(x):
            w.write_surface("line", i, {"loss": a * a, "accuracy": 1 - a * a / 2})
            for j, b in enumerate(y):
                w.write_surface("plane", (j, i), {"loss": a * a + 2 * b * b})
    plot = ["plot", str(path), "--surface"]
    for args, name in (
        (["line"], "l.png"),
        (["line", "--field", "accuracy"], "a.png"),
        (["plane", "--log"], "p.png"),
        (["plane", "--3d"], "q.png"),
    ):
        result = runner.invoke(cli, [*plot, *args, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert (tmp_path / name).read_bytes().startswith(PNG)
    _one_line_error(
        runner.invoke(cli, [*plot, "plane", "--field", "acc", "-o", str(tmp_path / "x.png")]),
        "has no field 'acc'",
    )


def test_plot_a_whole_run_into_a_directory_includes_the_surfaces(runner, tmp_path, monkeypatch):
    calls = _fake_surfaces(monkeypatch)
    run = _write_run(tmp_path / "s.h5", surface=True)
    result = runner.invoke(cli, ["plot", str(run), "-o", str(tmp_path / "all"), "-q"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [
        "hessian.png", "loss.png", "spectral_alignment.png", "surface-line.png",
        "surface-plane.png",
    ]
    assert calls == [("curve", "line", 1), ("contour", "plane", 2)]
    # surfaces only: a file target gets the hint, a directory gets the surfaces
    only = tmp_path / "only.h5"
    with RunWriter(only, mode="w") as w:
        w.create_surface("line", np.linspace(-1, 1, 3))
    _one_line_error(runner.invoke(cli, ["plot", str(only), "-o", str(tmp_path / "o.png")]),
                    "no metrics to plot (its surfaces go into a directory")
    result = runner.invoke(cli, ["plot", str(only), "-o", str(tmp_path / "odir")])
    assert result.exit_code == 0 and (tmp_path / "odir" / "surface-line.png").exists()


# --------------------------------------------------------------------------- report


def test_report_writes_one_self_contained_file(runner, run_file, tmp_path):
    out = tmp_path / "r.html"
    result = runner.invoke(cli, ["report", str(run_file), "-o", str(out), "--title", "My <run>"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 3 timelines, 0 surfaces" in result.output
    text = out.read_text()
    assert "<title>My &lt;run&gt;</title>" in text
    assert text.count("<img ") == 3 and text.count('src="data:image/png;base64,') == 3
    assert "http://" not in text and "https://" not in text
    assert "loss jumped" in text and "past 2/eta" in text and "lower lr" in text
    assert "&lt;b&gt;&amp;" in text  # the config is escaped
    quiet = runner.invoke(cli, ["report", str(run_file), "-o", str(out), "-q"])
    assert quiet.exit_code == 0 and quiet.output == ""


def test_report_bad_inputs(runner, run_file, empty_run, tmp_path):
    for path, fragment in _bad_inputs(tmp_path):
        _one_line_error(runner.invoke(cli, ["report", path, "-o", str(tmp_path / "r.html")]),
                        fragment)
    _one_line_error(
        runner.invoke(cli, ["report", str(run_file), "-o", str(tmp_path / "no" / "r.html")]),
        "does not exist",
    )
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    _one_line_error(
        runner.invoke(cli, ["report", str(run_file), "-o", f"{a_file}/"]),
        "exists and is not a directory",
    )
    # an empty run still gives a (short) report
    out = tmp_path / "empty.html"
    result = runner.invoke(cli, ["report", str(empty_run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "The run holds no metrics." in out.read_text() and "No findings." in out.read_text()


@pytest.mark.parametrize("existing", [False, True])
def test_report_into_a_directory_writes_report_html(runner, run_file, tmp_path, existing):
    folder = tmp_path / "new" / "reports"
    if existing:
        folder.mkdir(parents=True)
        target = str(folder)  # an existing directory, no trailing slash
    else:
        target = f"{folder}/"  # a trailing slash: a directory, created like plot's
    result = runner.invoke(cli, ["report", str(run_file), "-o", target])
    assert result.exit_code == 0, result.output
    assert folder.is_dir() and (folder / "report.html").read_text().startswith("<!DOCTYPE")
    assert f"wrote {folder / 'report.html'}:" in result.output


def test_report_into_a_directory_of_a_missing_run_creates_nothing(runner, tmp_path):
    _one_line_error(
        runner.invoke(cli, ["report", str(tmp_path / "missing.h5"), "-o", f"{tmp_path}/d/"]),
        "no such file",
    )
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- check


def test_check_table_and_exit_status_follow_fail_on(runner, run_file):
    result = runner.invoke(cli, ["check", str(run_file), "--stored"])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["step", "severity", "rule", "metric", "value", "threshold",
                                "message"]
    assert lines[2].split()[:4] == ["30", "warning", "loss_spike", "loss/value"]
    assert "hint: lower lr" in lines[3]
    assert lines[4].split()[:3] == ["60", "error", "edge_of_stability"]
    assert "2 findings (1 error, 1 warning, 0 info); FAIL" in lines[-1]
    assert runner.invoke(cli, ["check", str(run_file), "--stored", "--fail-on", "error"]
                         ).exit_code == 1

    assert runner.invoke(cli, ["check", str(run_file), "--stored", "--fail-on", "info"]
                         ).exit_code == 1


def test_check_passes_below_the_threshold_and_on_a_clean_run(runner, tmp_path):
    only_warning = _write_run(tmp_path / "w.h5", findings=(WARN,))
    result = runner.invoke(cli, ["check", str(only_warning), "--fail-on", "error"])
    assert result.exit_code == 0, result.output
    assert "1 findings (0 error, 1 warning, 0 info); ok (fail on error or worse)" in result.output
    clean = _write_run(tmp_path / "clean.h5")
    result = runner.invoke(cli, ["check", str(clean)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"{clean}: 0 findings (0 error, 0 warning, 0 info); ok (fail on warning or worse)"
    ]


def test_check_json(runner, tmp_path):
    run = _write_run(
        tmp_path / "j.h5",
        findings=(Finding(5, "nonfinite", "error", "loss/value", float("nan"), 1.0, "nan loss"),),
    )
    result = runner.invoke(cli, ["check", str(run), "--json", "--stored"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["failed"] is True and data["fail_on"] == "warning"
    assert data["counts"] == {"info": 0, "warning": 0, "error": 1}
    assert data["findings"][0]["value"] == "nan" and data["findings"][0]["threshold"] == 1.0
    assert data["findings"][0]["extra"] == {}


def test_check_json_keeps_a_findings_extra(runner, tmp_path):
    """The run file keeps a rule's details; --json dropped them."""
    extra = {"layer": "blocks.0.qkv", "steps_to_limit": 3.5, "history": [1.0, float("inf")]}
    run = _write_run(tmp_path / "x.h5", findings=(
        Finding(5, "taylor_forecast", "warning", "sentinels/r_secant", 0.9, 1.0, "r rises",
                extra=extra),))
    result = runner.invoke(cli, ["check", str(run), "--json", "--stored"])
    assert json.loads(result.stdout)["findings"][0]["extra"] == {
        "layer": "blocks.0.qkv", "steps_to_limit": 3.5, "history": [1.0, "inf"]}


def test_check_recomputes_the_alarm_rules_and_deduplicates(runner, tmp_path):
    # a NaN loss at step 50 trips the nonfinite rule of landscape.alarms
    run = _write_run(tmp_path / "nan.h5", nan_loss_at=50)
    stored = runner.invoke(cli, ["check", str(run), "--stored", "--json"])
    assert json.loads(stored.stdout)["findings"] == []
    recomputed = json.loads(runner.invoke(cli, ["check", str(run), "--json"]).stdout)
    rules = [(f["step"], f["rule"], f["severity"]) for f in recomputed["findings"]]
    assert (50, "nonfinite", "error") in rules
    # the same finding stored online is listed once, with the stored message
    online = Finding(50, "nonfinite", "error", "loss/value", float("nan"), 1.0, "seen online")
    both = _write_run(tmp_path / "both.h5", nan_loss_at=50, findings=(online,))
    data = json.loads(runner.invoke(cli, ["check", str(both), "--json"]).stdout)
    at_50 = [f for f in data["findings"] if (f["step"], f["rule"]) == (50, "nonfinite")]
    assert len(at_50) == 1 and at_50[0]["message"] == "seen online"


def test_check_bad_inputs_and_empty_run(runner, empty_run, tmp_path):
    for path, fragment in _bad_inputs(tmp_path):
        _one_line_error(runner.invoke(cli, ["check", path]), fragment)
    # a run that recorded nothing passed the gate ("0 findings; ok", exit 0)
    result = runner.invoke(cli, ["check", str(empty_run)])
    _one_line_error(result, "no rows recorded, nothing to check")
    assert result.exit_code == 2
    bad_choice = runner.invoke(cli, ["check", str(empty_run), "--fail-on", "fatal"])
    assert bad_choice.exit_code == 2 and "Traceback" not in bad_choice.output


def test_check_input_errors_exit_2_and_findings_exit_1(runner, run_file, tmp_path):
    # `check run.h5 --fail-on error || ...` must tell a typo from an unstable run
    for path, fragment in _bad_inputs(tmp_path):
        result = runner.invoke(cli, ["check", path, "--fail-on", "error"])
        _one_line_error(result, fragment)
        assert result.exit_code == 2, (path, result.output)
        as_json = runner.invoke(cli, ["check", path, "--json"])
        assert as_json.exit_code == 2 and as_json.stdout == ""
    assert runner.invoke(cli, ["check", str(run_file), "--stored", "--fail-on", "error"]
                         ).exit_code == 1
    usage = runner.invoke(cli, ["check", str(run_file), "--fail-on", "fatal"])
    assert usage.exit_code == 2
    damaged = runner.invoke(cli, ["check", str(_damaged_run(run_file, tmp_path))])
    _one_line_error(damaged, "damaged run file: no 'findings' table")
    assert damaged.exit_code == 2
    text = runner.invoke(cli, ["check", "-h"]).output
    assert "Exit status:" in text and "1  a finding reaches --fail-on" in text
    assert "2  RUN cannot be checked" in text


# --------------------------------------------------------------------------- watch


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
    for path, fragment in _bad_inputs(tmp_path):
        _one_line_error(runner.invoke(cli, ["watch", path, "--once"]), fragment)
    _one_line_error(runner.invoke(cli, ["watch", str(run_file), "-m", "nope"]), "no metric 'nope'")
    result = runner.invoke(cli, ["watch", str(empty_run), "--once", "-q"])
    assert result.exit_code == 0 and result.stdout == "no rows yet\n"


def test_watch_timeout_stops_without_a_real_clock(runner, run_file, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(watch_cmd, "_clock", lambda: now[0])
    monkeypatch.setattr(watch_cmd, "_sleep", lambda s: now.__setitem__(0, now[0] + s))
    result = runner.invoke(cli, ["watch", str(run_file), "--interval", "2", "--timeout", "5"])
    assert result.exit_code == 0, result.output
    assert now[0] == 5.0  # slept 2 + 2 + 1
    assert result.stderr.strip() == "stopped"


def test_watch_timeout_must_be_finite(runner, run_file):
    result = runner.invoke(cli, ["watch", str(run_file), "--timeout", "nan"])
    assert result.exit_code == 2 and "--timeout" in result.stderr


def test_an_output_path_under_a_file_is_one_line(runner, run_file, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for args in (["report", str(run_file), "-o", str(afile / "x.html")],
                 ["plot", str(run_file), "-o", str(afile / "sub") + "/"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]


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
    notes = [ln for ln in result.stderr.splitlines() if ln.startswith(("note:", "stopped"))]
    assert len(notes) == 2 and notes[1] == "stopped"  # one note for two failed looks
    assert notes[0].startswith("note: cannot read the run now (") and "retrying" in notes[0]


_RULES_FILE = '''
from dataclasses import dataclass

from landscape.alarms import LossSpike, Rule, Trigger


@dataclass
class LossAbove(Rule):
    limit: float = 0.5
    metrics: tuple = ("loss",)
    name: str = "loss_above"

    def evaluate(self, metric, row):
        v = row.get("value")
        if v is None or not v > self.limit:
            return None
        return Trigger("warning", "value", v, self.limit, "loss above the limit", "look")


RULES = [LossAbove(), LossSpike(z=1e9)]  # the second replaces the built-in loss_spike
NOT_RULES = 42


@dataclass
class Broken(Rule):
    metrics: tuple = ("loss",)
    name: str = "broken"

    def evaluate(self, metric, row):
        return 1 / 0
'''


def test_check_rules_with_other_settings_replace_what_the_monitor_stored(runner, tmp_path):
    """--rules with a built-in rule of other settings gates on it: the monitor's stored info
    at the edge of stability no longer hides the warning that threshold=1.0 asks for."""
    rules = tmp_path / "eos_rules.py"
    rules.write_text("from landscape.alarms import EdgeOfStability\n"
                     "RULES = [EdgeOfStability(threshold=1.0)]\n")
    path = tmp_path / "eos.h5"
    with RunWriter(path, mode="w") as w:
        w.declare("sharpness", {"lambda_max": None, "threshold": None, "ratio": None})
        for step, ratio in enumerate([0.5, 1.1, 0.5, 0.5, 0.5]):
            w.append("sharpness", 10 * step, {"lambda_max": 40 * ratio, "threshold": 40.0,
                                              "ratio": ratio})
        for f in ls.check(w):  # what the monitor stored online: the default rule's info
            w.add_finding(f)
    plain = runner.invoke(cli, ["check", str(path), "--json"])
    assert plain.exit_code == 0, plain.output
    assert [(f["step"], f["severity"]) for f in json.loads(plain.stdout)["findings"]] == [
        (10, "info")]
    gated = runner.invoke(cli, ["check", str(path), "--json", "--rules", f"{rules}:RULES"])
    assert gated.exit_code == 1, gated.output
    assert [(f["step"], f["severity"]) for f in json.loads(gated.stdout)["findings"]] == [
        (10, "warning")]


def test_check_report_and_plot_evaluate_the_users_rules(runner, tmp_path):
    """A run recorded without a rule can be gated on it: --rules file.py:NAME (the command
    line never imported user code, so a custom rule could not gate a job)."""
    rules = tmp_path / "my_rules.py"
    rules.write_text(_RULES_FILE)
    run = _write_run(tmp_path / "r.h5", nan_loss_at=70)  # loss exp(-s/40) > 0.5 until 27
    plain = json.loads(runner.invoke(cli, ["check", str(run), "--json"]).stdout)
    assert not [f for f in plain["findings"] if f["rule"] == "loss_above"]
    result = runner.invoke(cli, ["check", str(run), "--json", "--rules", f"{rules}:RULES"])
    assert result.exit_code == 1, result.output
    found = json.loads(result.stdout)["findings"]
    assert [f["step"] for f in found if f["rule"] == "loss_above"] == [0]  # one episode
    assert any(f["rule"] == "nonfinite" for f in found)  # the built-in rules still run
    # the same rules through report and plot
    out = runner.invoke(cli, ["report", str(run), "-o", str(tmp_path / "r.html"),
                              "--rules", f"{rules}:RULES"])
    assert out.exit_code == 0, out.output
    assert "loss_above" in (tmp_path / "r.html").read_text()
    out = runner.invoke(cli, ["plot", str(run), "-m", "loss", "-o", str(tmp_path / "l.png"),
                              "--rules", f"{rules}:LossAbove"])  # a class: its defaults
    assert out.exit_code == 0, out.output
    # one line and exit 2 for a spec that names no rules, or a rule that raises (a gate
    # must not read a crash as a finding: the traceback exited 1)
    for spec, message in [(f"{rules}:NOT_RULES", "expected a Rule"),
                          (f"{rules}:MISSING", "has no attribute"),
                          (str(tmp_path / "nowhere.py:RULES"), "not found"),
                          (f"{rules}:Broken", "'broken' raised ZeroDivisionError on metric")]:
        bad = runner.invoke(cli, ["check", str(run), "--rules", spec])
        assert bad.exit_code == 2, bad.output
        assert message in bad.output and "Traceback" not in bad.output
    # with --stored no rule is evaluated: the gate passed (exit 0) on findings it never saw
    for args in (["check"], ["report", "-o", str(tmp_path / "s.html")],
                 ["plot", "-m", "loss", "-o", str(tmp_path / "s.png")]):
        stored = runner.invoke(cli, [*args, str(run), "--stored", "--rules", f"{rules}:RULES"])
        assert stored.exit_code == 2, stored.output
        assert "--rules needs --recompute" in stored.output
    with ls.Run.open(run) as opened, pytest.raises(ValueError, match="recompute=True"):
        ls.alarms.collect_findings(opened, recompute=False, rules=[])


@pytest.mark.parametrize("damage", ["no_findings", "no_step", "fields_not_json", "no_column",
                                    "steps_backwards"])
def test_every_read_command_names_a_damaged_run_in_one_line(runner, run_file, tmp_path,
                                                            damage):
    # info, report and watch raised KeyError/JSONDecodeError tracebacks; check said
    # "cannot be read" with h5py's text; the file is now checked as it is opened
    import shutil

    import h5py

    path = tmp_path / "damaged.h5"
    shutil.copy(run_file, path)
    with h5py.File(path, "a") as f:
        if damage == "no_findings":
            del f["findings"]
        elif damage == "no_step":
            del f["metrics/loss/step"]
        elif damage == "fields_not_json":
            f["metrics/loss"].attrs["fields"] = "{not json"
        elif damage == "steps_backwards":  # overwritten bytes: info showed "steps -1..99"
            f["metrics/loss/step"][10] = -1
        else:
            del f["metrics/loss/value"]
    for args in (["check"], ["info"], ["report", "-o", str(tmp_path / "r.html")],
                 ["plot", "-o", str(tmp_path / "plots")], ["watch", "--once"]):
        result = runner.invoke(cli, [*args, str(path)])
        _one_line_error(result, str(path), "damaged run file")
        assert result.exit_code == (2 if args == ["check"] else 1)


def test_ctrl_c_a_full_disk_and_a_misdeclared_rule_are_one_line(runner, run_file, tmp_path,
                                                                monkeypatch):
    # Ctrl-C outside a command's own handler was click's "Aborted!" and exit 1 (for check:
    # "a finding"); a full disk and a rule whose metrics is a string gave tracebacks
    from landscape.store import Run

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Run, "open", classmethod(interrupted))
        for args in (["check", str(run_file)], ["report", str(run_file), "-o",
                                                 str(tmp_path / "r.html")]):
            result = runner.invoke(cli, args)
            assert result.exit_code == 130, result.output
            assert result.stderr.strip() == "Error: interrupted (SIGINT)"
    if Path("/dev/full").exists():
        full = runner.invoke(cli, ["report", str(run_file), "-o", "/dev/full"])
        _one_line_error(full, "No space left on device")
    rules = tmp_path / "my_rules.py"
    rules.write_text(
        "from landscape.alarms import Rule\n"
        "class StrMetrics(Rule):\n"
        "    name = 'str_metrics'\n"
        "    metrics = 'loss'\n"
        "    def evaluate(self, step, row):\n"
        "        return None\n"
        "RULES = [StrMetrics()]\n"
    )
    for args in (["check", str(run_file)], ["report", str(run_file), "-o",
                                             str(tmp_path / "r2.html")]):
        result = runner.invoke(cli, [*args, "--rules", f"{rules}:RULES"])
        _one_line_error(result, "my_rules.py:RULES", "metrics")


def test_one_rules_module_given_twice_is_a_usage_error(runner, run_file, tmp_path):
    """report gave a traceback, check called the run file unreadable."""
    rules = tmp_path / "twice.py"
    rules.write_text("from landscape.alarms import LossSpike\n"
                     "RULES = [LossSpike(name='loss_high')]\n")
    for args in (["check", str(run_file)], ["report", str(run_file), "-o",
                                             str(tmp_path / "r.html")]):
        result = runner.invoke(cli, [*args, "--rules", f"{rules}:RULES", "--rules",
                                     f"{rules}:RULES"])
        assert result.exit_code == 2, result.output
        assert "--rules" in result.stderr and "two rules are named 'loss_high'" in result.stderr
        assert "Traceback" not in result.output and "cannot be read" not in result.output


def test_check_does_not_pass_a_run_whose_only_surface_has_no_point(runner, tmp_path):
    """A surface job killed before its first point: check said 'ok' (exit 0)."""
    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.create_surface("random", np.linspace(-1, 1, 5), np.linspace(-1, 1, 5))
    result = runner.invoke(cli, ["check", str(path)])
    assert result.exit_code == 2 and "no rows recorded" in result.stderr
    with RunWriter(path) as w:
        w.write_surface("random", (0, 0), {"loss": 1.0})
    assert runner.invoke(cli, ["check", str(path)]).exit_code == 0


def test_report_and_plot_never_write_over_a_run_file(runner, run_file, tmp_path):
    """`report run.h5 -o run.h5` replaced the run with HTML (exit 0): the data were lost."""
    import shutil

    copy = tmp_path / "copy.h5"
    shutil.copy(run_file, copy)
    before = run_file.read_bytes()
    for args in (["report", str(run_file), "-o", str(run_file)],
                 ["report", str(run_file), "-o", str(copy)],
                 ["plot", str(run_file), "-m", "loss", "-o", str(copy)],
                 ["plot", str(run_file), "-m", "loss", "-o", str(tmp_path / "x.png")]):
        if args[-1].endswith(".png"):  # a run file renamed to what a figure would be
            shutil.copy(run_file, args[-1])
        result = runner.invoke(cli, args)
        _one_line_error(result, "is an HDF5 file (a run file?); not overwritten")
    assert run_file.read_bytes() == before and copy.read_bytes() == before
    from landscape.plotting import surfaces

    with pytest.raises(ls.LandscapeError, match="not overwritten by the VTK file"):
        surfaces.export_vtk(_tiny_surface(), copy)


def test_the_report_never_writes_over_a_file_that_is_not_html(runner, run_file, tmp_path):
    """`report run.h5 -o ckpt-100.pt` (or -o mypkg.py) replaced the file with HTML."""
    code = tmp_path / "mypkg.py"
    code.write_text("def net():\n    ...\n")
    result = runner.invoke(cli, ["report", str(run_file), "-o", str(code)])
    _one_line_error(result, "exists and is not an HTML page", "-o")
    assert code.read_text() == "def net():\n    ...\n"
    earlier = tmp_path / "report.html"
    for _ in range(2):  # an earlier report is replaced, as asked
        again = runner.invoke(cli, ["report", str(run_file), "-o", str(earlier)])
        assert again.exit_code == 0, again.output


def _tiny_surface():
    from landscape.store import SurfaceData

    x = np.linspace(-1, 1, 3)
    return SurfaceData("s", x, None, {"loss": x**2}, np.ones(3, bool),
                       {"directions": {"kind": "random"}}, {})


def test_plot_writes_a_surface_as_vtk(runner, tmp_path):
    """The command line had no VTK export (loss-landscape's h52vtp)."""
    run = _write_run(tmp_path / "r.h5", surface=True)
    with ls.Run.open(run) as opened:
        name = opened.surfaces()[0]
    out = tmp_path / "s.vtk"
    result = runner.invoke(cli, ["plot", str(run), "--surface", name, "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith("# vtk DataFile") and "SCALARS computed int 1" in text
    _usage_error(runner.invoke(cli, ["plot", str(run), "-o", str(tmp_path / "t.vtk")]),
                 "a .vtk file holds a surface: add --surface NAME")


def test_plot_clips_and_levels_a_surface_on_the_command_line(runner, tmp_path):
    """The Python functions took vmax and levels; the command line had neither."""
    import torch.nn.functional as F

    from landscape.report import surface_figure
    from landscape.surface import plane
    from tests import models

    path = tmp_path / "p.h5"
    x, y = models.classification_data()
    surf = plane(models.mlp(), F.cross_entropy, (x, y), steps=5, span=3.0, writer=path,
                 progress=False)
    result = runner.invoke(cli, ["plot", str(path), "--surface", "plane", "--vmax", "2.0",
                                 "--levels", "7", "-o", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    fig = surface_figure(surf, vmax=2.0, levels=7)
    (contours,) = [c for c in fig.axes[0].get_children() if hasattr(c, "levels")]
    levels = np.asarray(contours.levels)
    assert len(levels) <= 9 and levels.max() <= 2.0 + 1e-9 < surf.values["loss"].max()
    _usage_error(runner.invoke(cli, ["plot", str(path), "--vmax", "1", "-o",
                                     str(tmp_path / "t.png")]), "--vmax applies to surfaces")
    for word in ("auto", "none", "NONE"):
        result = runner.invoke(cli, ["plot", str(path), "--surface", "plane", "--vmax", word,
                                     "-o", str(tmp_path / f"{word}.png")])
        assert result.exit_code == 0, result.output
    low = float(np.nanmin(surf.values["loss"]))  # a clip below every value: a blank image
    _one_line_error(runner.invoke(cli, ["plot", str(path), "--surface", "plane", "--vmax",
                                        f"{low - 0.01}", "-o", str(tmp_path / "b.png")]),
                    "is at or below the smallest loss")
    result = runner.invoke(cli, ["plot", str(path), "--surface", "plane", "--vmax", "some",
                                 "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "float|auto|none" in result.output
    line = _write_run(tmp_path / "r.h5", surface=True)  # a 1-D surface
    with ls.Run.open(line) as opened:
        name = opened.surfaces()[0]
    _one_line_error(runner.invoke(cli, ["plot", str(line), "--surface", name, "--levels", "5",
                                        "-o", str(tmp_path / "u.png")]), "--levels: surface")


def test_check_whose_output_cannot_be_written_exits_2_not_1(run_file, tmp_path):
    """`check run.h5 > /dev/full` and `check run.h5 | true` exited 1, which for check means
    a finding reached --fail-on: a gate read an output error as an unstable run."""
    import os
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [sys.executable, "-m", "landscape_cli.main", "check", str(run_file),
               "--fail-on", "error", "--json"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    child.stdout.close()  # the reader is gone before the first line
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=300) == 2 and "Traceback" not in stderr, stderr
    if Path("/dev/full").exists():
        with open("/dev/full", "w") as full:
            done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, env=env,
                                  timeout=300)
        assert done.returncode == 2
        assert done.stderr.decode().strip() == "Error: No space left on device"


def test_a_field_spanning_decades_is_drawn_on_a_log_axis_by_default(runner, tmp_path):
    """On a linear axis a ratio climbing from 0.02 to 3,500 was a flat line until its last
    rows: the early rise the alarms read could not be seen."""
    from landscape.plotting.timelines import timeline

    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.declare("ratio", {"r": None, "small": None, "signed": None})
        for step in range(40):
            w.append("ratio", step, {"r": 0.02 * 1.35 ** step, "small": 1.0 + 0.01 * step,
                                     "signed": float(step - 20) * 100})
    with ls.Run.open(path) as run:
        scales = [ax.get_yscale() for ax in timeline(run, "ratio", findings=[]).axes[:3]]
        assert scales == ["log", "linear", "linear"]
        assert {ax.get_yscale() for ax in timeline(run, "ratio", findings=[],
                                                   log=False).axes[:3]} == {"linear"}
        assert timeline(run, "ratio", findings=[], log=True).axes[2].get_yscale() == "symlog"
    for args in ([], ["--linear"], ["--log"]):
        result = runner.invoke(cli, ["plot", str(path), "-o", str(tmp_path / "f.png"), *args])
        assert result.exit_code == 0, result.output


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


def test_re_evaluating_the_rules_over_a_long_run_is_announced(runner, run_file, tmp_path,
                                                               monkeypatch):
    """check on a 1M-step run sat silent for 41 s; --stored answers at once."""
    import landscape_cli.options as options

    monkeypatch.setattr(options, "LONG_RUN_ROWS", 10)
    long = runner.invoke(cli, ["check", str(run_file)])
    assert "re-evaluating the alarm rules over" in long.stderr and "--stored" in long.stderr
    for args in (["--stored"], ["-q"], ["--json"]):
        quiet = runner.invoke(cli, ["check", str(run_file), *args])
        assert "re-evaluating" not in quiet.stderr, args
    report = runner.invoke(cli, ["report", str(run_file), "-o", str(tmp_path / "r.html")])
    assert "re-evaluating the alarm rules" in report.stderr


def test_sharpness_is_drawn_with_its_threshold_on_one_axis(tmp_path):
    """lambda_max and the stability threshold were on separate panels with their own
    scales: where they cross (the edge of stability) could not be seen."""
    from landscape.plotting.timelines import timeline

    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.declare("sharpness", {"lambda_max": None, "threshold": None, "ratio": None})
        for step in range(10):
            w.append("sharpness", step, {"lambda_max": 1.0 + step, "threshold": 8.0,
                                         "ratio": (1.0 + step) / 8.0})
    with ls.Run.open(path) as run:
        fig = timeline(run, "sharpness", findings=[])
    top = fig.axes[0]
    assert top.get_ylabel() == "lambda_max"
    lines = {line.get_label(): line for line in top.get_lines()}
    assert "threshold" in lines and list(lines["threshold"].get_ydata()) == [8.0] * 10
    # a learning rate changed between two rows: the threshold holds, then drops at once
    # (a sloped line read as a gradual change)
    assert lines["threshold"].get_drawstyle() == "steps-post"


def _with_damaged_contents(run_file, tmp_path, how):
    """A copy of ``run_file`` that is well formed but holds a value of the wrong kind."""
    import shutil

    import h5py

    path = tmp_path / f"{how}.h5"
    shutil.copy(run_file, path)
    with h5py.File(path, "a") as f:
        if how == "config":
            f.attrs["config"] = "{bad"
        elif how == "params":
            f["metrics/hessian"].attrs["params"] = "{bad"
        elif how == "severity":
            f["findings/severity"][0] = b"bogus"
        elif how == "dtype":
            fields = json.loads(f["metrics/loss"].attrs["fields"])
            fields["value"]["dtype"] = "bogus"
            f["metrics/loss"].attrs["fields"] = json.dumps(fields)
    return path


@pytest.mark.parametrize("how", ["config", "params", "severity", "dtype"])
def test_damaged_contents_are_one_line_naming_the_file_in_every_reading_command(
        runner, run_file, tmp_path, how):
    """info, report, plot and watch printed tracebacks (JSONDecodeError, a ValueError from
    the severity, a TypeError from the dtype); check gave one line."""
    path = _with_damaged_contents(run_file, tmp_path, how)
    commands = {"info": [], "report": ["-o", str(tmp_path / "r.html")],
                "plot": ["-o", str(tmp_path / "plots")], "watch": ["--once"], "check": []}
    failed = 0
    for command, extra in commands.items():
        result = runner.invoke(cli, [command, str(path), *extra])
        assert "Traceback" not in result.output and not (
            result.exception and not isinstance(result.exception, SystemExit)), (
            command, result.exception)
        if result.exit_code != 0 and not (command == "check" and result.exit_code == 1):
            _one_line_error(result, path.name)
            failed += 1
    assert failed >= 2  # what reads the damaged value refuses the file, naming it



@pytest.mark.parametrize("command", ["plot", "report", "analyze", "surface"])
def test_an_empty_output_name_is_refused(runner, run_file, command, tmp_path, monkeypatch):
    """plot and report wrote into the current directory for -o ''."""
    monkeypatch.chdir(tmp_path)  # where a regression would write
    result = runner.invoke(cli, [command, str(run_file), "-o", " "])
    assert result.exit_code == 2 and "an empty name would write" in result.output


def test_a_format_other_than_the_files_own_suffix_is_a_usage_error(runner, run_file, tmp_path):
    # --format svg -o w.png wrote a PNG without a word
    out = tmp_path / "w.png"
    _usage_error(runner.invoke(cli, ["plot", str(run_file), "-m", "loss", "--format", "svg",
                                     "-o", str(out)]), "--format svg", "-o w.svg")
    assert not out.exists()
    ok = runner.invoke(cli, ["plot", str(run_file), "-m", "loss", "--format", "svg", "-o",
                             str(tmp_path / "w.svg"), "-q"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "w.svg").read_bytes().lstrip().startswith((b"<?xml", b"<svg"))


def test_jpg_and_jpeg_are_one_format(runner, run_file, tmp_path):
    for fmt, name in (("jpg", "w.jpeg"), ("jpeg", "v.JPG")):
        ok = runner.invoke(cli, ["plot", str(run_file), "-m", "loss", "--format", fmt, "-o",
                                 str(tmp_path / name), "-q"])
        assert ok.exit_code == 0, ok.output
        assert (tmp_path / name).read_bytes()[:2] == b"\xff\xd8"  # a JPEG
