"""Metrics as exported classes: names, presets, and the deprecated old names."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import landscape as ls
from landscape.metrics import PRESETS, Metric, preset, resolve_metrics, snake_case
from landscape.metrics.base import _REGISTRY
from tests import models


def test_every_built_in_metric_is_exported_and_named_after_its_class():
    exported = {n for n in ls.metrics.__all__ if isinstance(getattr(ls.metrics, n), type)
                and issubclass(getattr(ls.metrics, n), Metric) and n != "Metric"}
    registered = {name: cls for name, cls in _REGISTRY.items()
                  if cls.__module__.startswith("landscape.")}  # tests register their own
    assert exported == {cls.__name__ for cls in registered.values()}
    assert set(registered) <= set(ls.metrics.available())
    for n in exported - {"NonFinite"}:  # "nonfinite" predates the rule; run files use it
        assert getattr(ls.metrics, n).name == snake_case(n)
    assert snake_case("TopEigenvalues") == "top_eigenvalues"


def test_the_natural_spelling_works():
    m = ls.metrics.Sharpness(schedule=ls.every(15))
    assert m.name == "sharpness" and str(m.schedule) == "every(15)"
    assert isinstance(ls.metrics.create("sharpness"), ls.metrics.Sharpness)
    assert ls.metrics.TopEigenvalues(k=5).config() == {"k": 5, "tol": 1e-3}
    assert ls.monitor.resolve_metrics is resolve_metrics  # the old import path


def test_presets_return_instances_of_the_classes_on_the_documented_schedules():
    assert PRESETS["cheap"] == dict.fromkeys(
        ["loss", "grad_norm", "nonfinite", "update", "sentinels"], "every(1)"
    ) | {"logits": "every(10)"}
    assert PRESETS["standard"]["top_eigenvalues"] == "every(500)"
    assert PRESETS["standard"]["taylor_radius"] == "every(10)"
    assert PRESETS["full"]["spectral_density"] == "every(500)"
    for name, table in PRESETS.items():
        metrics = preset(name)
        assert [m.name for m in metrics] == list(table)
        assert [str(m.schedule) for m in metrics] == list(table.values())
        assert all(type(m) is type(ls.metrics.create(m.name)) for m in metrics)
    # the class default applies where the preset does not say otherwise
    assert str(ls.metrics.Logits.default_schedule) == PRESETS["cheap"]["logits"]


@pytest.mark.parametrize(("make", "match"), [
    # each was built, then failed at every due step with a metric_failed finding
    (lambda: ls.metrics.HessianTrace(n_matvec=0), "n_matvec must be an integer >= 1"),
    (lambda: ls.metrics.HessianTrace(n_matvec=-3), "n_matvec must be an integer >= 1"),
    (lambda: ls.metrics.HessianTrace(method="bogus"), "method must be one of"),
    (lambda: ls.metrics.SpectralDensity(lanczos_steps=0), "lanczos_steps must be an integer"),
    (lambda: ls.metrics.SpectralDensity(n_probes=1.5), "n_probes must be an integer"),
    (lambda: ls.metrics.TopEigenvalues(k=0), "k must be an integer >= 1"),
    (lambda: ls.metrics.TopEigenvalues(tol=0), "tol must be a positive number"),
    (lambda: ls.metrics.Sharpness(tol="tight"), "tol must be a positive number"),
])
def test_curvature_metric_settings_are_checked_when_the_metric_is_built(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_old_metric_names_warn_and_give_the_renamed_metrics():
    with pytest.warns(DeprecationWarning, match="'top_eigenvalues'"):
        m = ls.metrics.create("hessian", k=2)
    assert isinstance(m, ls.metrics.TopEigenvalues) and m.k == 2
    with pytest.warns(DeprecationWarning, match="'taylor_radius'"):
        m = ls.metrics.create("taylor")
    assert m.name == "taylor_radius"
    with pytest.warns(DeprecationWarning, match="'top_eigenvalues'"):
        metrics = preset("standard", hessian="every(10)")
    assert {m.name: str(m.schedule) for m in metrics}["top_eigenvalues"] == "every(10)"
    assert "hessian" not in [m.name for m in metrics]
    with pytest.warns(DeprecationWarning, match="'taylor_radius'"):
        assert "taylor_radius" not in [m.name for m in preset("standard", taylor=None)]
    with pytest.warns(DeprecationWarning, match="'top_eigenvalues'"):
        with ls.Monitor(models.mlp(), F.cross_entropy, metrics=["hessian"], alarms=False) as mon:
            assert [m.name for m in mon.metrics] == ["top_eigenvalues"]


def test_old_class_names_warn():
    from landscape.metrics import curvature, representation, training

    for module, old, new in [
        (curvature, "HessianSpectrum", "TopEigenvalues"),
        (representation, "SpectralAlignmentMetric", "SpectralAlignment"),
        (training, "Taylor", "TaylorRadius"),
        (ls.metrics, "HessianSpectrum", "TopEigenvalues"),
    ]:
        with pytest.warns(DeprecationWarning, match=new):
            assert getattr(module, old) is getattr(ls.metrics, new)
    with pytest.raises(AttributeError):
        ls.metrics.NoSuchMetric  # noqa: B018


def test_errors_live_with_the_other_errors():
    from landscape._errors import MetricError, MissingInput
    from landscape.functional import MetricError as OldMetricError
    from landscape.metrics.context import MissingInput as OldMissingInput

    assert OldMetricError is MetricError and OldMissingInput is MissingInput
    assert ls.metrics.MissingInput is MissingInput
    assert issubclass(MissingInput, ls.LandscapeError) and issubclass(MetricError, ValueError)


def test_config_replaces_params_and_an_old_subclass_still_records_its_settings():
    class OldStyle(Metric):
        name = "test_old_style"
        FIELDS = ("value",)

        def params(self):
            return {"alpha": 2}

        def compute(self, ctx):
            return {"value": 1.0}

    with pytest.warns(DeprecationWarning, match=r"config\(\)"):
        assert OldStyle().config() == {"alpha": 2}
    with pytest.warns(DeprecationWarning, match=r"config\(\)"):
        assert ls.metrics.HessianTrace(n_matvec=5).params()["n_matvec"] == 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with ls.Monitor(models.mlp(), F.cross_entropy, metrics=[OldStyle()],
                        alarms=False) as mon:
            mon.step(0)
            run = mon.run()
    assert run.config["metrics"][0]["alpha"] == 2


@pytest.mark.parametrize("key", ["name", "schedule", "data"])
def test_a_config_key_the_monitor_records_itself_is_refused(tmp_path, key):
    class Clash(Metric):
        name = "test_clash"
        FIELDS = ("value",)

        def config(self):
            return {key: "mine"}

        def compute(self, ctx):
            return {"value": 1.0}

    mon = ls.Monitor(models.mlp(), F.cross_entropy, tmp_path / "run.h5", metrics=[Clash()])
    with pytest.raises(ValueError, match=rf"Clash.config\(\) uses the key '{key}'"):
        mon.start()

    class Same(Clash):  # the value the monitor records anyway: harmless
        def config(self):
            return {key: {"name": "test_clash", "schedule": str(self.schedule),
                          "data": self.data}[key]}

    with ls.Monitor(models.mlp(), F.cross_entropy, metrics=[Same()], alarms=False) as mon:
        mon.step(0)
    assert mon.run().config["metrics"][0]["name"] == "test_clash"


def test_step_context_parameters_and_the_deprecated_params():
    seen = {}

    class Peek(Metric):
        name = "test_peek"
        FIELDS = ("value",)

        def compute(self, ctx):
            seen["parameters"] = ctx.parameters
            with pytest.warns(DeprecationWarning, match="'parameters'"):
                seen["params"] = ctx.params
            return {"value": 0.0}

    model = models.mlp()
    with ls.Monitor(model, F.cross_entropy, metrics=[Peek()], alarms=False, strict=True) as mon:
        mon.step(0)
    assert len(seen["parameters"]) == len(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(seen["parameters"], seen["params"]))


def test_spectral_density_lanczos_steps_and_the_old_n_iter():
    m = ls.metrics.SpectralDensity(lanczos_steps=7, n_probes=3)
    assert m.fields()["nodes"] == (3, 7) and m.config()["lanczos_steps"] == 7
    with pytest.warns(DeprecationWarning, match="lanczos_steps"):
        assert ls.metrics.SpectralDensity(n_iter=5).lanczos_steps == 5


def _adam_bn_cnn(steps, dtype=torch.float32, frozen=False, **sharpness):
    """A BatchNorm CNN trained with Adam under a Sharpness metric every 5 steps.

    Returns the model, its optimizer, the probe and the run's ``sharpness`` series.
    """
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 1, 8, 8, dtype=dtype), torch.randint(0, 3, (64,))
    model.train()
    if frozen:
        model[1].eval()  # kept on its running statistics while the rest trains
    probe = (x[:16], y[:16])
    metric = ls.metrics.Sharpness(schedule=ls.every(5), **sharpness)
    with ls.Monitor(model, F.cross_entropy, None, optimizer=opt, metrics=[metric],
                    probe=probe, warn=False) as mon:
        for step in range(steps):
            i = torch.randint(0, 64, (16,))
            loss = F.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x[i], y[i]), loss=loss.detach())
        run = mon.run()
    return model, opt, probe, {f: run.series("sharpness", f)[1] for f in ("ratio", "lambda_max")}


def test_adam_sharpness_of_a_batchnorm_cnn_is_measured_on_batch_statistics():
    """Conv biases before a BatchNorm get no gradient in train mode, so Adam's preconditioner
    is ~eps there, while eval mode (running statistics) gives them curvature: the ratio was
    84-147 x the threshold on this healthy run. On batch statistics it is ~0.003."""
    ratio = _adam_bn_cnn(30)[3]["ratio"]
    measured = ratio[~np.isnan(ratio)]
    assert len(measured) == 4 and (measured > 0).all() and (measured < 0.1).all()


def test_adam_sharpness_keeps_a_frozen_batchnorm_on_its_running_statistics():
    """A BatchNorm kept in eval mode while the rest trains (fine-tuning): the optimizer
    descends its running statistics, and so does the measured Hessian."""
    from landscape.curvature import Hessian, preconditioned, top_eigenvalues

    # rows at 0, 5 (Adam's warm-up: NaN) and 10, the last step
    model, opt, probe, rows = _adam_bn_cnn(11, torch.float64, frozen=True, tol=1e-8)
    assert model[1].training is False and model[0].training is True
    want = top_eigenvalues(preconditioned(Hessian(model, F.cross_entropy, probe), opt), k=1,
                           tol=1e-10).values[0]
    assert rows["lambda_max"][-1] == pytest.approx(float(want), rel=1e-6)
