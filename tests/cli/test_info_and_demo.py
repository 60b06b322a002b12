"""``landscape --version``, ``info`` and ``demo`` through click's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from landscape_cli.main import cli

from landscape import __version__
from landscape.findings import Finding
from landscape.store import Run, RunWriter


@pytest.fixture
def runner():
    return CliRunner()


def _one_line_error(result, *fragments):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for f in fragments:
        assert f in lines[0]
    assert "Traceback" not in result.output


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
    result = runner.invoke(cli, ["info", str(path)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "format version 1" in out
    assert "hessian: 3 rows, steps 10..30, schedule every(10)" in out
    assert "top float64[5]" in out and "trace float64" in out
    assert "findings: 1" in out
    assert "plane: 3x4 grid, 1/12 points computed" in out
    assert '"lr": 0.5' in out

    as_json = runner.invoke(cli, ["info", str(path), "--json"])
    data = json.loads(as_json.output)
    assert data["metrics"]["hessian"]["last_step"] == 30
    assert data["surfaces"]["plane"]["computed"] == 1


def test_info_bad_inputs_give_one_line(runner, tmp_path):
    _one_line_error(runner.invoke(cli, ["info", str(tmp_path / "missing.h5")]), "no such file")
    _one_line_error(runner.invoke(cli, ["info", str(tmp_path)]), "is a directory")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"garbage" * 100)
    _one_line_error(runner.invoke(cli, ["info", str(bad)]), "not a readable HDF5 file", str(bad))


def test_demo_writes_run_pictures_report_and_prints_findings(runner, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(cli, ["demo", "--out", str(out), "--steps", "60",
                                 "--surface-steps", "5"])  # the default path
    assert result.exit_code == 0, result.output
    with Run.open(out / "run.h5") as run:
        steps, loss = run.series("loss", "value")
        assert list(steps) == list(range(60))
        assert np.isfinite(loss[:30]).all()
        assert loss[30] < loss[0]
        assert run.config["demo"] is True
        assert run.config["spike_step"] == 36
        warnings = [f for f in run.findings() if f.severity in ("warning", "error")]
        assert warnings and min(f.step for f in warnings) >= 36  # nothing before the spike
        assert run.surface("pre_spike_plane").values["loss"].shape == (5, 5)
    for name in ("loss.png", "sharpness.png", "surface.png", "report.html"):
        assert (out / name).stat().st_size > 1000, name
    assert "findings (" in result.output and "report.html" in result.output
    # the alarms warn before the loss blows up (3x its pre-spike level)
    out_lines = result.output.splitlines()
    assert any(line.startswith("the loss blew up") for line in out_lines), result.output
    start = out_lines.index("warning lead before the blow-up (steps):")
    leads = [line.split()[-1] for line in out_lines[start + 1:] if line.startswith("  ")]
    assert any(lead.isdigit() and int(lead) > 0 for lead in leads), result.output


def test_demo_rejects_a_spike_after_the_end(runner, tmp_path):
    result = runner.invoke(cli, ["demo", "--out", str(tmp_path), "--steps", "30",
                                 "--spike-step", "40"])
    assert result.exit_code == 2
    assert "--spike-step" in result.output and "Traceback" not in result.output
