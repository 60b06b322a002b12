"""Warnings point at the user's code; findings print readably; a NaN loss is one error and
the metrics that cannot run after it say why in one message."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape as ls
from landscape import InstabilityWarning
from landscape.alarms import LogitGrowth
from landscape.findings import Finding, Findings, dedupe


def _step_once(mon, model, x, y, step, opt, loss=None):
    loss = F.cross_entropy(model(x), y) if loss is None else loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def test_instability_warning_points_at_the_line_that_called_step():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ls.Monitor(model, F.cross_entropy, metrics=[ls.metrics.create("logits", schedule=1)],
                        alarms=[LogitGrowth(max_abs=0.0, max_abs_severity="warning")]) as mon:
            loss = _step_once(mon, model, x, y, 0, opt)
            mon.step(0, batch=(x, y), loss=loss); line = _line()  # noqa: E702
    (w,) = [w for w in caught if issubclass(w.category, InstabilityWarning)]
    assert w.filename == __file__ and w.lineno == line


def test_info_findings_are_logged_not_raised_as_instability_warnings(caplog):
    """alarms.md: only warning and error findings are InstabilityWarnings worth stopping for;
    an info one (a classifier growing confident) printed as one on healthy runs."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", InstabilityWarning)  # -W error::InstabilityWarning
        with caplog.at_level("INFO", logger="landscape"), ls.Monitor(
                model, F.cross_entropy, metrics=[ls.metrics.create("logits", schedule=1)],
                alarms=[LogitGrowth(max_abs=0.0)], on_finding=found.append) as mon:
            loss = _step_once(mon, model, x, y, 0, opt)
            raised = mon.step(0, batch=(x, y), loss=loss)
    assert [f.severity for f in raised] == ["info"] and found == raised == list(mon.findings)
    assert [f.rule for f in mon.run().findings()] == ["logit_growth"]
    assert any("[info] logit_growth" in r.getMessage() for r in caplog.records)


def _line():
    import inspect

    return inspect.currentframe().f_back.f_lineno


def test_under_lightning_the_warning_points_at_the_fit_call():
    pl = pytest.importorskip("lightning.pytorch", reason="install the 'lightning' extra")
    from landscape.integrations import LandscapeCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 3)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    cb = LandscapeCallback(None, metrics=[ls.metrics.create("logits", schedule=1)],
                           alarms=[LogitGrowth(max_abs=0.0, max_abs_severity="warning")],
                           mirrors=None)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=8)); line = _line()  # noqa: E702
    (w,) = [w for w in caught if issubclass(w.category, InstabilityWarning)]
    assert w.filename == __file__ and w.lineno == line


class _Solver(ls.metrics.Metric):
    """Fails as an iterative solver does on NaN parameters (a cryptic message)."""

    FIELDS = ("value",)
    default_schedule = ls.every(1)

    def __init__(self, name):
        super().__init__()
        self.name = name

    def compute(self, ctx):
        if not all(torch.isfinite(p).all() for p in ctx.parameters):
            raise ValueError("init must be a non-zero vector")
        return {"value": 1.0}


def test_a_nan_loss_is_one_error_and_later_metrics_say_why_once(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    metrics = ["loss", "grad_norm", "nonfinite", _Solver("solver_a"), _Solver("solver_b"),
               ls.metrics.create("top_eigenvalues", k=2, schedule=1)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5", optimizer=opt,
                        metrics=metrics, probe=(x, y)) as mon:
            for step in range(4):
                loss = F.cross_entropy(model(x), y)
                if step == 2:
                    loss = loss * float("nan")
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(step, batch=(x, y), loss=loss)
    found = ls.check(tmp_path / "run.h5")
    errors = [(f.step, f.rule) for f in found if f.severity == "error"]
    assert errors == [(2, "nonfinite")]
    with ls.Run.open(tmp_path / "run.h5") as run:
        failed = [f for f in run.findings() if f.rule == "metric_failed"]
        assert [(f.step, f.rule) for f in run.findings() if f.rule == "nonfinite"] == [
            (2, "nonfinite")]
    assert len(failed) == 1
    assert "non-finite parameters at step 2" in failed[0].message
    assert "'solver_a'" in failed[0].message
    runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
               and "landscape" in str(w.message)]
    assert len(runtime) == 1 and "init must be" not in runtime[0]


def test_findings_print_readably():
    a = Finding(3, "loss_spike", "warning", "loss", 9.5, 4.0, "loss jumped", "lower the lr")
    b = Finding(3, "nonfinite", "error", "loss", 1.0, 1.0, "training loss is nan")
    assert str(a) == a.describe() + "\n    hint: lower the lr"
    assert "Finding(" not in str(Findings([a, b]))
    assert str(Findings([a, b])).splitlines() == [
        a.describe(), b.describe(), "2 findings (1 error, 1 warning)"]
    assert str(Findings()) == "no findings" and Findings([a]) == [a]


def test_dedupe_keeps_one_finding_per_step_and_rule():
    by_flag = Finding(5, "nonfinite", "error", "nonfinite/loss", 1.0, 1.0, "flagged")
    by_value = Finding(5, "nonfinite", "error", "loss/value", 1.0, 1.0, "loss is nan")
    later = Finding(6, "nonfinite", "error", "nonfinite/loss", 1.0, 1.0, "flagged")
    assert dedupe([by_flag, by_value, later]) == [by_value, later]
    assert dedupe([by_value, by_flag]) == [by_value]


def test_check_and_run_findings_return_printable_lists(tmp_path):
    with ls.RunWriter(tmp_path / "run.h5", mode="w") as writer:
        writer.declare("loss", {"value": ()})
        for step, value in enumerate([1.0, 0.9, float("nan")]):
            writer.append("loss", step, {"value": value})
    found = ls.check(tmp_path / "run.h5")
    assert isinstance(found, Findings) and "step 2: [error] nonfinite" in str(found)
