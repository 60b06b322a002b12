"""Smoke tests of the scripts in examples/: each runs in its reduced form (``--small``) and
must write its files and print numbers that show the effect it demonstrates.

The scripts are loaded from their paths and their ``main(argv)`` called in this process
(one interpreter start-up for all of them); ``posthoc_cli.py`` runs its ``landscape``
commands in-process too (``--in-process``), the subprocess path being the same click
commands that tests/cli covers.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from landscape.store import Run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.slow


def run_example(name: str, tmp_path: Path, *extra: str) -> dict:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / name
    summary = module.main(["--small", "--out", str(out), *extra])
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for f in summary.get("files", []):
        assert Path(f).is_file() and Path(f).stat().st_size > 0, f
    return summary


def test_edge_of_stability(tmp_path, capsys):
    s = run_example("edge_of_stability", tmp_path)
    names = {Path(f).name for f in s["files"]}
    assert {"run.h5", "sharpness.png", "edge_of_stability.png"} <= names
    # progressive sharpening from well below 2/lr up to it, and the alarm says so
    assert s["sharpness_initial"] < 0.5 * s["threshold"]
    assert s["sharpness_max"] >= s["threshold"]
    assert s["eos_first_step"] is not None
    assert s["eos_first_severity"] == "info"  # hovering at the edge is healthy: no warning
    # past the edge and back below it (the sharpness does not run away): self-stabilisation
    low, high = s["ratio_second_half_range"]
    assert low < 1.0 < high and s["ratio_second_half_median"] < 2.0
    assert s["loss_final"] < s["loss_initial"]
    assert "edge_of_stability" in capsys.readouterr().out


def test_early_warning_gpt(tmp_path, capsys):
    s = run_example("early_warning_gpt", tmp_path)
    names = {Path(f).name for f in s["files"]}
    assert {"run.h5", "loss.png", "sentinels.png", "warning.png"} <= names
    with Run.open(next(f for f in s["files"] if f.endswith("run.h5"))) as run:
        assert "sharpness" not in run.metrics() and "sentinels" in run.metrics()  # default
        _, loss = run.series("loss", "value")
        warned = sorted(f.step for f in run.findings() if f.severity in ("warning", "error"))
    start = s["ramp_step"]
    base = float(np.median(loss[start - 50:start]))
    assert base == pytest.approx(s["baseline_loss"]) and base < 0.5  # learned the language
    onset = next(t for t in range(start, len(loss) - 2) if (loss[t:t + 3] >= 1.25 * base).all())
    explosion = next(t for t in range(start, len(loss)) if not loss[t] < 10 * base)
    assert (s["onset_step"], s["explosion_step"]) == (onset, explosion)
    # the default monitor warned after the ramp began and before the loss moved; not before
    assert s["warnings_before_ramp"] == [] and warned[0] >= start
    assert warned[0] == s["first_warning_step"] < onset <= explosion
    assert s["lead_to_onset"] == onset - warned[0] > 0
    assert s["lead_to_explosion"] == explosion - warned[0]
    assert s["table"][0]["rule"] == s["first_warning_rule"] == "taylor_forecast"
    for row in s["table"]:
        if row["lead"] is not None:
            assert row["lead"] == explosion - row["first_step"] >= 0
    out = capsys.readouterr().out
    assert s["lead_line"] in out and "steps of warning before the loss moved" in out


def test_posthoc_cli(tmp_path, capsys):
    s = run_example("posthoc_cli", tmp_path, "--in-process")
    out = capsys.readouterr().out
    for command in ("analyze", "surface", "plot", "report", "check"):
        assert f"$ landscape {command}" in out
    steps = s["steps"]
    assert len(steps) == len(s["checkpoints"]) >= 3 and steps == sorted(steps)
    assert all(math.isfinite(v) and v > 0 for v in s["lambda_max"])
    assert "trajectory" in s["surfaces"]
    assert s["check_exit_status"] in (0, 1)
    report = Path(s["report"]).read_text()
    assert report.count("<img") >= 4
    assert {Path(p).name for p in s["plots"]} >= {"top_eigenvalues.png", "sharpness.png",
                                                   "collapse.png"}


def test_posthoc_huggingface(tmp_path, capsys):
    s = run_example("posthoc_huggingface", tmp_path, "--in-process")
    out = capsys.readouterr().out
    for command in ("analyze", "surface", "report"):
        assert f"$ landscape {command}" in out
    assert s["steps"] == [2, 4]  # the Trainer's checkpoint-N folders
    assert all(math.isfinite(v) and v > 0 for v in s["lambda_max"])
    assert s["threshold"] == pytest.approx([76.0, 76.0])  # (2 + 2 * 0.9) / 0.05, optimizer.pt
    assert s["surfaces"]


def test_posthoc_lightning(tmp_path, capsys):
    s = run_example("posthoc_lightning", tmp_path, "--in-process")
    assert "$ landscape analyze" in capsys.readouterr().out
    assert s["steps"] == [2, 4]  # global_step of each .ckpt
    assert all(math.isfinite(v) and v > 0 for v in s["lambda_max"])
    assert s["threshold"] == pytest.approx([76.0, 76.0])  # the .ckpt's optimizer_states
    assert s["surfaces"]


def test_neural_collapse(tmp_path, capsys):
    s = run_example("neural_collapse", tmp_path)
    assert Path(s["files"][-1]).name == "neural_collapse.png"
    tpt = s["terminal_phase_epoch"]
    assert tpt is not None and tpt < s["epochs"]  # reaches zero training error
    assert s["final_train_error"] == 0.0
    first, last = s["first"], s["last"]
    assert last["nc1"] < 0.2 * first["nc1"]  # within-class variability collapses
    assert last["vci"] < 0.5 * first["vci"]
    assert last["nc4"] == 0.0  # the classifier is the nearest-class-centre rule
    assert last["nc2_etf"] < first["nc2_etf"]
    assert "terminal phase" in capsys.readouterr().out
