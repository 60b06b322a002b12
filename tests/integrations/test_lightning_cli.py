"""LandscapeCallback configured through LightningCLI (a YAML config and command-line flags)."""

from __future__ import annotations

import inspect
import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from landscape import Monitor
from landscape.integrations import MONITOR_OPTIONS, MonitorOptions
from landscape.store import Run

pl = pytest.importorskip("lightning.pytorch", reason="install the 'lightning' extra")
pytest.importorskip("jsonargparse", reason="install the 'lightning' extra")
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from landscape.integrations import LandscapeCallback  # noqa: E402

# the Monitor arguments a callback sets itself (from the framework), not options passed on
_SET_BY_CALLBACK = {"self", "model", "loss_fn", "path", "optimizer", "metrics", "probe",
                    "closure", "config", "on_finding", "mirrors"}


def test_monitor_options_are_the_monitors_own_keywords_and_types():
    params = inspect.signature(Monitor.__init__).parameters
    assert MONITOR_OPTIONS == set(params) - _SET_BY_CALLBACK
    assert MonitorOptions.__optional_keys__ == MONITOR_OPTIONS  # none required
    monitor_types = typing.get_type_hints(Monitor.__init__)
    for name, hint in typing.get_type_hints(MonitorOptions).items():  # NotRequired dropped
        assert hint == monitor_types[name], name


class Net(pl.LightningModule):
    """A 3-class MLP with its own data: what a LightningCLI script trains."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 6, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        return DataLoader(TensorDataset(x, y), batch_size=16)


_TRAINER = ["--trainer.max_steps=5", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu",
            "--trainer.devices=1"]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when ``sys.argv`` holds arguments besides ``args=`` (pytest's)."""
    monkeypatch.setattr("sys.argv", ["train.py"])


def _fit(tmp_path, args: list[str]) -> LightningCLI:
    return LightningCLI(Net, args=["fit", *_TRAINER, f"--trainer.default_root_dir={tmp_path}",
                                   *args], save_config_callback=None)


def test_yaml_config_sets_callback_metrics_and_monitor_options(tmp_path):
    path = tmp_path / "runs" / "run.h5"
    config = tmp_path / "config.yaml"
    config.write_text(f"""\
trainer:
  callbacks:
    - class_path: landscape.integrations.LandscapeCallback
      init_args:
        path: {path}
        loss_fn: torch.nn.functional.cross_entropy
        metrics:
          - loss
          - grad_norm
          - class_path: landscape.metrics.Sharpness
            init_args: {{schedule: 2}}
        probe_size: 8
        warn: false
        stop_on: error
""")
    cli = _fit(tmp_path, [f"--config={config}"])
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, LandscapeCallback))
    assert callback.monitor_options == {"probe_size": 8, "warn": False}  # only what was set
    assert callback.stop_on == "error"
    with Run.open(path) as run:
        stored = run.config
        assert [m["name"] for m in stored["metrics"]] == ["loss", "grad_norm", "sharpness"]
        assert stored["probe"] == {"source": "first_batch", "size": 8}
        assert run.steps("loss").tolist() == [0, 1, 2, 3, 4]
        assert run.steps("sharpness").tolist() == [0, 2, 4]
        _, lam = run.series("sharpness", "lambda_max")
        assert np.isfinite(lam).all() and (lam > 0).all()  # through the YAML's loss_fn
        assert run.series("probe", "samples")[1].tolist() == [8.0]


def test_command_line_flags_add_the_callback_with_a_preset(tmp_path):
    path = tmp_path / "run.h5"
    _fit(tmp_path, ["--trainer.callbacks+=landscape.integrations.LandscapeCallback",
                    f"--trainer.callbacks.path={path}",
                    "--trainer.callbacks.metrics=cheap",
                    "--trainer.callbacks.probe_size=4",
                    "--trainer.callbacks.alarms=false"])
    with Run.open(path) as run:
        assert run.config["probe"]["size"] == 4
        assert "sentinels" in run.metrics() and run.steps("loss").tolist() == [0, 1, 2, 3, 4]


def test_an_unknown_option_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _fit(tmp_path, ["--trainer.callbacks+=landscape.integrations.LandscapeCallback",
                        "--trainer.callbacks.prob_size=4"])
    assert "prob_size" in capsys.readouterr().err


def test_print_config_lists_the_callback_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _fit(tmp_path, ["--trainer.callbacks+=landscape.integrations.LandscapeCallback",
                        "--trainer.callbacks.taylor_guard=1.0", "--print_config"])
    out = capsys.readouterr().out
    assert "class_path: landscape.integrations.LandscapeCallback" in out
    assert "taylor_guard: 1.0" in out and "every_n_steps: 1" in out
