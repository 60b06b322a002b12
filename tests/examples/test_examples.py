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

import pytest

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
    assert 0.5 < s["ratio_second_half_median"] < 2.0
    assert s["loss_final"] < s["loss_initial"]
    assert "edge_of_stability" in capsys.readouterr().out


def test_early_warning_gpt(tmp_path, capsys):
    s = run_example("early_warning_gpt", tmp_path)
    names = {Path(f).name for f in s["files"]}
    assert {"run.h5", "loss.png", "taylor_radius.png", "spectral_alignment.png",
            "warnings.png"} <= names
    assert s["pre_spike_loss"] < 0.5  # the model learned the language before the spike
    blowup, spike = s["blowup_step"], s["spike_step"]
    assert blowup is not None and blowup > spike
    table = {row["rule"]: row for row in s["table"]}
    # the Taylor ratio warns before the loss reaches 10x its pre-spike level
    assert table["taylor_ratio"]["first_step"] is not None
    assert table["taylor_ratio"]["lead"] is not None and table["taylor_ratio"]["lead"] >= 1
    for row in s["table"]:
        if row["lead"] is not None:
            assert row["lead"] == blowup - row["first_step"] >= 0
    assert "lead (steps)" in capsys.readouterr().out


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
