"""Mirrors to TensorBoard, W&B (offline) and MLflow (local file store), read back with each
tool's own reader; the monitor's mirror contract (order, failures) without any of them."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape as ls
from landscape.alarms import LogitGrowth
from landscape.integrations.mirrors import (
    MLflowMirror,
    TensorBoardMirror,
    WandbMirror,
    report_to_mirrors,
    scalars,
)
from tests import models
from tests.integrations import _readers


def _loop(path, mirrors, steps=5):
    """A monitored linear classifier: loss, grad_norm every step, logits every step (one
    logit_growth finding at step 0), top-2 Hessian eigenvalues every 2 steps."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    metrics = [ls.metrics.Loss(), ls.metrics.GradNorm(), ls.metrics.create("logits", schedule=1),
               ls.metrics.create("top_eigenvalues", k=2, schedule=2)]
    with ls.Monitor(model, F.cross_entropy, path, optimizer=opt, metrics=metrics,
                    probe=(x, y), alarms=[LogitGrowth(max_abs=0.0)], warn=False,
                    mirrors=mirrors) as mon:
        models.full_batch_steps(mon, model, opt, x, y, steps)
    return ls.Run.open(path)


def test_scalars_flattens_small_vectors_and_skips_the_rest():
    row = {"value": 1.5, "eigenvalues": np.array([3.0, 2.0]), "nodes": np.zeros((4, 5)),
           "name": "x", "t": torch.tensor(2.0), "big": np.arange(40.0)}
    assert scalars("m", row) == {"landscape/m/value": 1.5, "landscape/m/eigenvalues/0": 3.0,
                                 "landscape/m/eigenvalues/1": 2.0, "landscape/m/t": 2.0}


def test_scalars_names_components_by_their_layer_where_given():
    row = {"minority": np.array([0.1, 0.2]), "eigenvalues": np.array([3.0, 2.0])}
    out = scalars("m", row, components={"minority": ["fc1", "fc2"], "eigenvalues": ["a"]})
    assert out == {"landscape/m/minority/fc1": 0.1, "landscape/m/minority/fc2": 0.2,
                   "landscape/m/eigenvalues/0": 3.0, "landscape/m/eigenvalues/1": 2.0}


def test_the_monitor_names_per_layer_series_in_mirrors_by_their_layers(tmp_path):
    """spectral_alignment's fields hold one value per layer: the series carry the module
    names the plots use, not indices; a duck-typed mirror without ``declare`` still works."""

    class Kept(ls.integrations.mirrors.Mirror):
        def __init__(self):
            super().__init__()
            self.scalars = {}

        def write_scalars(self, step, values):
            self.scalars.update(values)

        def write_finding(self, finding, count):
            pass

    kept, plain = Kept(), _Recorder()
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 8), act=nn.Tanh(), head=nn.Linear(8, 3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5", optimizer=opt,
                    metrics=[ls.metrics.create("spectral_alignment", schedule=1)],
                    probe=(x, y), warn=False, mirrors=[kept, plain]) as mon:
        models.full_batch_steps(mon, model, opt, x, y, 2)
    names = {k for k in kept.scalars if k.startswith("landscape/spectral_alignment/minority/")}
    assert names == {"landscape/spectral_alignment/minority/fc1",
                     "landscape/spectral_alignment/minority/head"}
    assert ("row", "spectral_alignment", 1) in plain.calls


class _Recorder:
    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def on_row(self, name, step, row):
        self.calls.append(("row", name, step))
        if self.fail_on == "row":
            raise OSError("disk full")

    def on_finding(self, finding):
        self.calls.append(("finding", finding.rule, finding.step))

    def close(self):
        self.calls.append(("close",))


def test_the_monitor_calls_mirrors_after_each_row_and_finding_and_closes_them_once(tmp_path):
    rec = _Recorder()
    run = _loop(tmp_path / "run.h5", [rec], steps=3)
    run.close()
    assert rec.calls[:5] == [("row", "loss", 0), ("row", "grad_norm", 0), ("row", "logits", 0),
                             ("row", "top_eigenvalues", 0), ("finding", "logit_growth", 0)]
    assert rec.calls.count(("close",)) == 1 and rec.calls[-1] == ("close",)
    assert sum(c[0] == "row" for c in rec.calls) == 3 * 3 + 2


def test_a_failing_mirror_warns_once_and_training_goes_on(tmp_path):
    bad, good = _Recorder(fail_on="row"), _Recorder()
    with pytest.warns(RuntimeWarning, match="mirror _Recorder failed in on_row") as record:
        run = _loop(tmp_path / "run.h5", [bad, good], steps=4)
    assert len([w for w in record if "mirror" in str(w.message)]) == 1
    assert bad.calls == [("row", "loss", 0)]  # switched off after its failure
    with run:
        assert run.steps("loss").tolist() == [0, 1, 2, 3]
    assert sum(c[0] == "row" for c in good.calls) == 4 * 3 + 2


def test_tensorboard_mirror_writes_every_scalar_and_the_findings(tmp_path):
    pytest.importorskip("tensorboard", reason="install the 'tensorboard' extra")
    logdir = tmp_path / "tb"
    with _loop(tmp_path / "run.h5", [TensorBoardMirror(str(logdir))]) as run:
        tb = _readers.tensorboard_scalars(logdir)
        steps, loss = run.series("loss", "value")
        # the rows' context (the batch's size, loss/samples) is in the run, not mirrored
        assert "landscape/loss/samples" not in tb and "samples" in run.fields("loss")
        assert [s for s, _ in tb["landscape/loss/value"]] == steps.tolist()
        assert [v for _, v in tb["landscape/loss/value"]] == pytest.approx(loss.tolist(),
                                                                           rel=1e-6)
        _eig_steps, eig = run.series("top_eigenvalues", "eigenvalues")
        assert [s for s, _ in tb["landscape/top_eigenvalues/eigenvalues/1"]] == [0, 2, 4]
        assert [v for _, v in tb["landscape/top_eigenvalues/eigenvalues/0"]] == pytest.approx(
            eig[:, 0].tolist(), rel=1e-5)
        assert tb["landscape/findings/count"] == [(0, 1.0)]
        (text,) = _readers.tensorboard_texts(logdir, "landscape/findings")
        assert text[0] == 0 and "logit_growth" in text[1] and "hint:" in text[1]


def test_tensorboard_mirror_on_a_summary_writer_keeps_it_open(tmp_path):
    pytest.importorskip("tensorboard", reason="install the 'tensorboard' extra")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    _loop(tmp_path / "run.h5", [TensorBoardMirror(writer)], steps=2).close()
    writer.add_scalar("mine", 1.0, 7)  # still open: the mirror only flushed it
    writer.close()
    tb = _readers.tensorboard_scalars(tmp_path / "tb")
    assert tb["mine"] == [(7, 1.0)] and len(tb["landscape/grad_norm/value"]) == 2


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="install the 'wandb' extra")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    return wandb


def test_wandb_mirror_logs_rows_with_their_step_to_the_active_offline_run(tmp_path,
                                                                         wandb_offline):
    run = wandb_offline.init(mode="offline", dir=str(tmp_path), project="landscape-test")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _loop(tmp_path / "run.h5", [WandbMirror(run)]) as recorded:
                steps, loss = recorded.series("loss", "value")
                _, eig = recorded.series("top_eigenvalues", "eigenvalues")
    finally:
        run.finish()
    # a mirror that raised was switched off with a warning: say why, if it happened
    assert not [str(w.message) for w in caught if "mirror" in str(w.message).lower()]
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    # wandb's service process writes the offline file; give every row time to land on disk
    rows = _readers.wandb_history(
        run_dir, until=lambda rows: len(_readers.wandb_series(rows, "landscape/loss/value"))
        >= len(steps) and any("landscape/findings/count" in r for r in rows))
    got = _readers.wandb_series(rows, "landscape/loss/value")
    assert [s for s, _ in got] == steps.tolist()
    assert [v for _, v in got] == pytest.approx(loss.tolist(), rel=1e-6)
    assert [v for _, v in _readers.wandb_series(rows, "landscape/top_eigenvalues/eigenvalues/0")
            ] == pytest.approx(eig[:, 0].tolist(), rel=1e-5)
    (finding,) = _readers.wandb_series(rows, "landscape/finding")
    assert finding[0] == 0 and "logit_growth" in finding[1]
    assert _readers.wandb_series(rows, "landscape/findings/count") == [(0, 1)]


def test_wandb_mirror_without_a_run_warns_once_and_does_not_stop_training(tmp_path,
                                                                          wandb_offline):
    assert wandb_offline.run is None
    with pytest.warns(RuntimeWarning, match="no active W&B run"):
        _loop(tmp_path / "run.h5", [WandbMirror()], steps=2).close()


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="install the 'mlflow' extra")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the local file store, for tests
    uri = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    yield mlflow, uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


def test_mlflow_mirror_logs_metrics_and_finding_tags_to_the_active_run(tmp_path, mlflow_store):
    mlflow, uri = mlflow_store
    from mlflow.tracking import MlflowClient

    with mlflow.start_run() as active:
        with _loop(tmp_path / "run.h5", [MLflowMirror()]) as recorded:
            steps, loss = recorded.series("loss", "value")
    client = MlflowClient(uri)
    history = client.get_metric_history(active.info.run_id, "landscape/loss/value")
    assert [m.step for m in history] == steps.tolist()
    assert [m.value for m in history] == pytest.approx(loss.tolist(), rel=1e-6)
    eig = client.get_metric_history(active.info.run_id, "landscape/top_eigenvalues/eigenvalues/1")
    assert [m.step for m in eig] == [0, 2, 4] and all(math.isfinite(m.value) for m in eig)
    tags = client.get_run(active.info.run_id).data.tags
    assert "logit_growth" in tags["landscape.finding.0001"]
    count = client.get_metric_history(active.info.run_id, "landscape/findings/count")
    assert [(m.step, m.value) for m in count] == [(0, 1.0)]


def test_mlflow_mirror_with_an_explicit_run_id_needs_no_active_run(tmp_path, mlflow_store):
    _, uri = mlflow_store
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("explicit")).info.run_id
    _loop(tmp_path / "run.h5", [MLflowMirror(run_id, tracking_uri=uri)], steps=2).close()
    assert len(client.get_metric_history(run_id, "landscape/grad_norm/value")) == 2


def test_report_to_maps_entries_to_mirrors(tmp_path):
    class Args:
        output_dir = str(tmp_path)

    assert report_to_mirrors(None) == [] and report_to_mirrors([]) == []
    mirrors = report_to_mirrors(["wandb", "mlflow", "comet_ml", "wandb"], Args())
    assert [type(m).__name__ for m in mirrors] == ["WandbMirror", "MLflowMirror"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("tensorboard")
    (tb,) = report_to_mirrors("tensorboard", Args())
    tb.close()
    assert tb.writer.log_dir == str(tmp_path / "runs" / "landscape")
