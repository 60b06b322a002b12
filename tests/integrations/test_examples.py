"""Smoke tests of examples/lightning_callback.py and examples/huggingface_callback.py --small."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from landscape.store import Run

REPO = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_example", REPO / "examples" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lightning_example_small(tmp_path, capsys):
    pytest.importorskip("lightning.pytorch", reason="install the 'lightning' extra")
    path = _load("lightning_callback.py").main(["--small", "--out", str(tmp_path)])
    assert "steps recorded" in capsys.readouterr().out
    with Run.open(path) as run:
        assert run.steps("loss").tolist() == list(range(12))
        assert {"top_eigenvalues", "sharpness", "taylor_radius", "spectral_alignment"} <= set(
            run.metrics()
        )
        assert np.isfinite(run.series("sharpness", "lambda_max")[1]).all()
        assert np.isfinite(run.series("taylor_radius", "r")[1]).all()


def test_huggingface_example_small(tmp_path, capsys):
    pytest.importorskip("transformers", reason="install the 'transformers' extra")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    path = _load("huggingface_callback.py").main(["--small", "--out", str(tmp_path)])
    assert "steps recorded" in capsys.readouterr().out
    with Run.open(path) as run:
        assert run.steps("loss").tolist() == list(range(6))
        assert np.isfinite(run.series("top_eigenvalues", "eigenvalues")[1]).all()
        assert np.isfinite(run.series("logits", "max_abs")[1]).all()
        assert not [f for f in run.findings() if f.rule == "metric_failed"]


def test_tensorboard_dashboard_example_small(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="install the 'tensorboard' extra")
    from tests.integrations import _readers

    summary = _load("tensorboard_dashboard.py").main(["--small", "--out", str(tmp_path)])
    assert "tensorboard --logdir" in capsys.readouterr().out
    tb = _readers.tensorboard_scalars(summary["tensorboard"])
    with Run.open(tmp_path / "run.h5") as run:
        assert [s for s, _ in tb["landscape/loss/value"]] == run.steps("loss").tolist()
        assert len(run.steps("loss")) == 12
    assert "landscape/sharpness/lambda_max" in tb
    assert (tmp_path / "report.html").stat().st_size > 0
