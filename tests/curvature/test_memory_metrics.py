"""The monitor's curvature metrics within their memory budget (default ``"auto"``).

Small models fit the floor: the budget changes nothing (the same eigenvalues bit for bit,
training bitwise unchanged); the profile is measured once per data source; a budget that
nothing fits gives one ``metric_failed`` finding and NaN rows while training goes on.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import landscape as ls
from landscape.curvature import memory
from tests.models import classification_data, mlp

CURVATURE = ("top_eigenvalues", "sharpness", "hessian_trace", "spectral_density")


def _metrics(budget="auto"):
    kw = {} if budget == "auto" else {"memory_budget": budget}
    return [ls.metrics.TopEigenvalues(k=2, schedule=1, **kw),
            ls.metrics.Sharpness(schedule=1, **kw),
            ls.metrics.HessianTrace(n_matvec=8, schedule=1, **kw),
            ls.metrics.SpectralDensity(lanczos_steps=5, n_probes=2, schedule=1, **kw)]


def _train(path, metrics, steps=3, optimizer="sgd"):
    model = mlp(d_in=5, hidden=7, d_out=3, depth=2, seed=1)
    x, y = classification_data(n=16, d_in=5, n_classes=3, seed=2)
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    mon = None
    if metrics is not None:
        mon = ls.Monitor(model, F.cross_entropy, path=str(path), optimizer=opt,
                         metrics=metrics, probe=(x, y), alarms=False, warn=False)
        mon.__enter__()
    try:
        for step in range(steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if mon is not None:
                mon.step(step, batch=(x, y), loss=loss)
    finally:
        if mon is not None:
            mon.__exit__(None, None, None)
    return model


def test_metrics_check_their_budget():
    for cls in (ls.metrics.TopEigenvalues, ls.metrics.Sharpness, ls.metrics.HessianTrace,
                ls.metrics.SpectralDensity):
        assert cls().memory_budget == "auto"
        assert "memory_budget" not in cls().config()
        assert cls(memory_budget="2x step").config()["memory_budget"] == "2x step"
        assert cls(memory_budget=None).memory_budget is None
        with pytest.raises(ValueError, match="memory_budget"):
            cls(memory_budget="plenty")


def test_auto_budget_changes_nothing_on_a_small_model(tmp_path, monkeypatch):
    calls = []
    real = memory.profile_memory
    monkeypatch.setattr(memory, "profile_memory", lambda op, **kw: calls.append(1)
                        or real(op, **kw))
    plain = _train(tmp_path / "none.pt", None)
    auto = _train(tmp_path / "auto.h5", _metrics())
    free = _train(tmp_path / "free.h5", _metrics(None))
    for a, b, c in zip(plain.parameters(), auto.parameters(), free.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)  # training bitwise unchanged
    assert len(calls) == 1  # one profile for the probe, kept over steps and metrics
    with ls.Run.open(str(tmp_path / "auto.h5")) as ra, \
            ls.Run.open(str(tmp_path / "free.h5")) as rf:
        for metric in CURVATURE:
            steps, peaks = ra.series(metric, "peak_memory")
            assert list(steps) == [0, 1, 2] and (peaks >= 0).all(), metric
            assert not rf.findings()
        for metric, field in (("top_eigenvalues", "eigenvalues"), ("sharpness", "lambda_max"),
                              ("spectral_density", "nodes")):
            a, b = ra.series(metric, field)[1], rf.series(metric, field)[1]
            assert np.array_equal(a, b, equal_nan=True), metric
        a, b = ra.series("hessian_trace", "value")[1], rf.series("hessian_trace", "value")[1]
        assert np.allclose(a, b, rtol=1e-5)  # float32: batched or single products
        assert not ra.findings()


def test_preconditioned_sharpness_within_its_budget(tmp_path):
    _train(tmp_path / "adam.h5", [ls.metrics.Sharpness(schedule=1, adam_warmup=1)],
           steps=3, optimizer="adam")
    with ls.Run.open(str(tmp_path / "adam.h5")) as run:
        _, lam = run.series("sharpness", "lambda_max")
        _, peaks = run.series("sharpness", "peak_memory")
        assert np.isfinite(lam).all() and (peaks >= 0).all() and not run.findings()


def test_a_budget_nothing_fits_is_one_finding_and_training_goes_on(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = _train(tmp_path / "tight.h5", _metrics(64))
    plain = _train(tmp_path / "none.pt", None)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    with ls.Run.open(str(tmp_path / "tight.h5")) as run:
        found = [f for f in run.findings() if f.rule == "metric_failed"]
        assert sorted(f.metric for f in found) == sorted(CURVATURE)
        for f in found:
            assert "memory_budget:" in f.message and "\n" not in f.message
            assert "over the budget of 64 B" in f.message
        _, values = run.series("hessian_trace", "value")
        assert all(math.isnan(v) for v in values)
