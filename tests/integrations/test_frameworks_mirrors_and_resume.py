"""The callbacks with real frameworks: the Trainer's ``report_to`` and Lightning's loggers get
every row, and a resumed run continues its run file (truncated to the checkpoint's step)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape.store import Run
from tests.integrations import _readers

# ----------------------------------------------------------------------------- Hugging Face


def _hf():
    transformers = pytest.importorskip("transformers", reason="install the 'transformers' extra")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return transformers


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 50, (n, 12), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _hf_trainer(transformers, out, callbacks, max_steps, **args):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    arguments = transformers.TrainingArguments(
        output_dir=str(out), use_cpu=True, max_steps=max_steps, per_device_train_batch_size=4,
        logging_steps=1, disable_tqdm=True, seed=0, data_seed=0, learning_rate=1e-3, **args,
    )
    return transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=arguments,
                                train_dataset=Tokens(), callbacks=list(callbacks))


def test_hf_resume_from_a_checkpoint_truncates_the_run_file_by_itself(tmp_path):
    transformers = _hf()
    from landscape.integrations import LandscapeTrainerCallback

    path, out = tmp_path / "run.h5", tmp_path / "out"
    first = _hf_trainer(transformers, out, [LandscapeTrainerCallback(str(path), metrics="cheap")],
                        max_steps=5, report_to=[], save_strategy="steps", save_steps=2)
    first.train()
    with Run.open(path) as run:
        assert run.steps("loss").tolist() == [0, 1, 2, 3, 4]
    cb = LandscapeTrainerCallback(str(path), metrics="cheap")
    resumed = _hf_trainer(transformers, out, [cb], max_steps=5, report_to=[], save_strategy="no")
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    with Run.open(path) as run:
        assert run.steps("loss").tolist() == [0, 1, 2, 3, 4]
        assert run.steps("update").tolist() == [0, 1, 2, 3, 4]
    logged = [h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > 2]
    with Run.open(path) as run:  # rows 2.. are the resumed run's
        assert run.series("loss", "value")[1][2:].tolist() == pytest.approx(logged, abs=1e-3)


def test_hf_report_to_tensorboard_and_mlflow_receive_every_row(tmp_path, monkeypatch):
    transformers = _hf()
    pytest.importorskip("tensorboard", reason="install the 'tensorboard' extra")
    mlflow = pytest.importorskip("mlflow", reason="install the 'mlflow' extra")
    from landscape.integrations import LandscapeTrainerCallback

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DISABLE_MLFLOW_INTEGRATION", "false")
    mlflow.set_tracking_uri(uri)
    path, out = tmp_path / "run.h5", tmp_path / "out"
    cb = LandscapeTrainerCallback(str(path), metrics="cheap")
    trainer = _hf_trainer(transformers, out, [cb], max_steps=3,
                          report_to=["tensorboard", "mlflow"], save_strategy="no")
    trainer.train()
    while mlflow.active_run() is not None:
        mlflow.end_run()
    with Run.open(path) as run:
        steps, loss = run.series("loss", "value")
    # TensorBoard: the Trainer's own log directory holds the landscape scalars too
    (logdir,) = _readers.tensorboard_dirs(out / "runs")
    tb = _readers.tensorboard_scalars(logdir)
    assert [s for s, _ in tb["landscape/loss/value"]] == steps.tolist()
    assert [v for _, v in tb["landscape/loss/value"]] == pytest.approx(loss.tolist(), rel=1e-6)
    assert "train/loss" in tb  # the Trainer's own scalars, same directory
    # MLflow: the run the Trainer's MLflowCallback started
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run_info,) = client.search_runs(client.search_experiments()[0].experiment_id)
    history = client.get_metric_history(run_info.info.run_id, "landscape/loss/value")
    assert [m.step for m in history] == steps.tolist()
    assert [m.value for m in history] == pytest.approx(loss.tolist(), rel=1e-6)


def test_hf_mirrors_none_sends_nothing(tmp_path):
    transformers = _hf()
    pytest.importorskip("tensorboard", reason="install the 'tensorboard' extra")
    from landscape.integrations import LandscapeTrainerCallback

    out = tmp_path / "out"
    cb = LandscapeTrainerCallback(None, metrics=["loss"], mirrors=None)
    _hf_trainer(transformers, out, [cb], max_steps=2, report_to=["tensorboard"],
                save_strategy="no").train()
    (logdir,) = _readers.tensorboard_dirs(out / "runs")
    tb = _readers.tensorboard_scalars(logdir)
    assert "train/loss" in tb and not [t for t in tb if t.startswith("landscape/")]


# ----------------------------------------------------------------------------- Lightning


def _pl():
    return pytest.importorskip("lightning.pytorch", reason="install the 'lightning' extra")


def _module(pl):
    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Classifier()


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _pl_fit(pl, callbacks, max_steps, logger=False, ckpt_path=None):
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=list(callbacks),
                         log_every_n_steps=1)
    trainer.fit(_module(pl), _loader(), ckpt_path=ckpt_path)
    return trainer


def test_lightning_resume_from_an_earlier_checkpoint_truncates_the_run_file(tmp_path):
    pl = _pl()
    from landscape.integrations import LandscapeCallback

    path, ckpt = tmp_path / "run.h5", tmp_path / "three.ckpt"
    first = _pl_fit(pl, [LandscapeCallback(str(path), metrics=["loss"])], max_steps=3)
    first.save_checkpoint(ckpt)
    _pl_fit(pl, [LandscapeCallback(str(path), metrics=["loss"])], max_steps=5, ckpt_path=ckpt)
    with Run.open(path) as run:
        assert run.steps("loss").tolist() == [0, 1, 2, 3, 4]
    # the same checkpoint again: rows 3 and 4 are redone, not refused
    _pl_fit(pl, [LandscapeCallback(str(path), metrics=["loss", "update"])], max_steps=6,
            ckpt_path=ckpt)
    with Run.open(path) as run:
        assert run.steps("loss").tolist() == [0, 1, 2, 3, 4, 5]
        assert run.steps("update").tolist() == [3, 4, 5]


def test_lightning_logs_through_trainer_loggers_by_default(tmp_path):
    pl = _pl()
    pytest.importorskip("tensorboard", reason="install the 'tensorboard' extra")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from landscape.alarms import LogitGrowth
    from landscape.integrations import LandscapeCallback
    from landscape.metrics import create

    tb_logger = TensorBoardLogger(str(tmp_path), name="tb")
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    cb = LandscapeCallback(None, metrics=["loss", create("logits", schedule=1)],
                           alarms=[LogitGrowth(max_abs=0.0)], warn=False)
    _pl_fit(pl, [cb], max_steps=3, logger=[tb_logger, csv_logger])
    steps, loss = cb.run().series("loss", "value")
    tb = _readers.tensorboard_scalars(tb_logger.log_dir)
    assert [s for s, _ in tb["landscape/loss/value"]] == steps.tolist() == [0, 1, 2]
    assert [v for _, v in tb["landscape/loss/value"]] == pytest.approx(loss.tolist(), rel=1e-6)
    assert tb["landscape/findings/count"] == [(0, 1.0)]
    (text,) = _readers.tensorboard_texts(tb_logger.log_dir, "landscape/findings")
    assert "logit_growth" in text[1]
    import csv

    with open(f"{csv_logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("landscape/loss/value")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert [float(r["landscape/loss/value"]) for r in rows] == pytest.approx(loss.tolist())


def test_lightning_mirrors_none_keeps_the_loggers_clean(tmp_path):
    pl = _pl()
    pytest.importorskip("tensorboard", reason="install the 'tensorboard' extra")
    from lightning.pytorch.loggers import TensorBoardLogger

    from landscape.integrations import LandscapeCallback

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    cb = LandscapeCallback(None, metrics=["loss"], mirrors=None)
    _pl_fit(pl, [cb], max_steps=2, logger=logger)
    tb = _readers.tensorboard_scalars(logger.log_dir)
    assert not [t for t in tb if t.startswith("landscape/")]


# ----------------------------------------------------------------- flushed with checkpoints


def _committed(callback, metric="loss"):
    """Steps of ``metric`` already written to the run file (not in the writer's buffer)."""
    return callback.monitor.writer._backend.steps(f"metrics/{metric}").tolist()


def test_hf_checkpoints_flush_the_run_file(tmp_path):
    transformers = _hf()
    from landscape.integrations import LandscapeTrainerCallback

    cb = LandscapeTrainerCallback(str(tmp_path / "run.h5"), metrics=["loss"])
    seen = []

    class Spy(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            seen.append((state.global_step, _committed(cb)))

    trainer = _hf_trainer(transformers, tmp_path / "out", [cb, Spy()], max_steps=4,
                          report_to=[], save_strategy="steps", save_steps=2)
    trainer.train()
    assert seen == [(2, [0, 1]), (4, [0, 1, 2, 3])]


def test_lightning_checkpoints_flush_the_run_file(tmp_path):
    pl = _pl()
    from landscape.integrations import LandscapeCallback

    cb = LandscapeCallback(str(tmp_path / "run.h5"), metrics=["loss"])
    seen = []

    class Spy(pl.Callback):
        def on_save_checkpoint(self, trainer, module, checkpoint):
            seen.append((trainer.global_step, _committed(cb)))

    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2,
                                         save_top_k=-1)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb, Spy(), saver])
    trainer.fit(_module(pl), _loader())
    assert seen[:2] == [(2, [0, 1]), (4, [0, 1, 2, 3])]
