"""LandscapeCallback with the real Lightning Trainer on a tiny classifier (CPU, a few steps)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape import InstabilityWarning, StepOrderError
from landscape.alarms import LogitGrowth
from landscape.metrics import create
from landscape.store import Run

pl = pytest.importorskip("lightning.pytorch", reason="install the 'lightning' extra")
from landscape.integrations import LandscapeCallback  # noqa: E402
from landscape.integrations.lightning import training_step_loss  # noqa: E402


class Classifier(pl.LightningModule):
    """BatchNorm + dropout MLP; records every loss it backpropagates and logs it."""

    def __init__(self, optimizer: str = "sgd", fail_at: int | None = None,
                 manual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(),
                                 nn.Dropout(0.3), nn.Linear(16, 3))
        self.optimizer_name = optimizer
        self.fail_at = fail_at
        self.automatic_optimization = not manual
        self.losses: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("simulated failure")
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        if self.training:  # not when the monitor evaluates training_step on the probe
            self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _data(n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


PROBE = tuple(t[:32] for t in _data(64, seed=1))


def _fit(module, callbacks=(), max_steps=6, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    x, y = _data()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True
    )
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        deterministic=True, callbacks=list(callbacks), **trainer_kwargs,
    )
    trainer.fit(module, loader)
    return trainer


def _no_hooks_left(trainer, module):
    opt = trainer.optimizers[0]
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert all(not m._forward_hooks for m in module.modules())


def test_records_every_optimizer_step_with_the_loss_lightning_backpropagated(tmp_path):
    path = tmp_path / "run.h5"
    module = Classifier()
    cb = LandscapeCallback(str(path), F.cross_entropy, probe=PROBE, metrics="cheap")
    trainer = _fit(module, [cb])
    with Run.open(path) as run:
        assert {"loss", "grad_norm", "nonfinite", "update", "logits"} <= set(run.metrics())
        assert list(run.steps("loss")) == list(range(6))
        assert list(run.steps("logits")) == [0]
        _, losses = run.series("loss", "value")
        assert losses.tolist() == pytest.approx(module.losses, rel=1e-7)
        # the monitor's step hooks fired through Lightning's optimizer.step(closure)
        _, norms = run.series("update", "norm")
        assert (norms > 0).all()
        assert math.isfinite(run.series("grad_norm", "value")[1][-1])
        config = run.config
        assert config["integration"] == "lightning" and config["optimizer"]["class"] == "SGD"
    _no_hooks_left(trainer, module)


def test_the_run_files_folder_is_created_as_the_frameworks_create_theirs(tmp_path):
    """A run file under a log folder that Lightning creates later was refused at the
    start of training ('directory ... does not exist')."""
    path = tmp_path / "logs" / "version_0" / "run.h5"
    _fit(Classifier(), [LandscapeCallback(str(path), F.cross_entropy, probe=PROBE)], max_steps=2)
    with Run.open(path) as run:
        assert list(run.steps("loss")) == [0, 1]


@pytest.mark.parametrize(
    ("optimizer", "metrics", "closure"),
    [("sgd", "full", None), ("adam", "standard", training_step_loss)],
    ids=["sgd-full-loss_fn", "adam-standard-training_step_loss"],
)
def test_monitored_fit_gives_bitwise_the_unmonitored_parameters(optimizer, metrics, closure):
    plain = Classifier(optimizer)
    _fit(plain)
    watched = Classifier(optimizer)
    loss_fn = F.cross_entropy if closure is None else None
    cb = LandscapeCallback(None, loss_fn, closure=closure, probe=PROBE, metrics=metrics,
                           alarms=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # taylor_radius: no (x, y) loss_fn
        _fit(watched, [cb])
    assert plain.losses == watched.losses
    for (name, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), name
    _, eig = cb.run().series("top_eigenvalues", "eigenvalues")
    assert np.isfinite(eig[0]).all()


def test_with_gradient_clipping_grad_norm_is_the_norm_before_clipping():
    seen = []

    class BeforeClipping(pl.Callback):  # Lightning clips after this hook
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))

    cb = LandscapeCallback(None, F.cross_entropy, metrics=["grad_norm"], alarms=False)
    _fit(Classifier(), [BeforeClipping(), cb], max_steps=4, gradient_clip_val=1e-3)
    _, norms = cb.run().series("grad_norm", "value")
    assert norms.tolist() == pytest.approx(seen, rel=1e-6)
    assert min(seen) > 0.01  # far above the clipped norm of 1e-3


def test_gradient_accumulation_records_one_row_per_optimizer_step_with_the_mean_loss():
    module = Classifier()
    cb = LandscapeCallback(None, F.cross_entropy, metrics=["loss", "update"], alarms=False)
    _fit(module, [cb], max_steps=3, accumulate_grad_batches=2)
    steps, losses = cb.run().series("loss", "value")
    assert steps.tolist() == [0, 1, 2]
    expected = [(module.losses[2 * i] + module.losses[2 * i + 1]) / 2 for i in range(3)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert len(cb.run().steps("update")) == 3


def test_the_short_accumulation_window_that_ends_an_epoch_records_its_mean_loss():
    # 96 samples in batches of 16: 6 per epoch, accumulated by 4, so each epoch's second
    # optimizer step has only 2 batches (Lightning still divides them by 4)
    module = Classifier()
    cb = LandscapeCallback(None, F.cross_entropy, metrics=["loss"], alarms=False)
    _fit(module, [cb], max_steps=4, accumulate_grad_batches=4)
    steps, losses = cb.run().series("loss", "value")
    assert steps.tolist() == [0, 1, 2, 3]
    windows = [module.losses[0:4], module.losses[4:6], module.losses[6:10], module.losses[10:12]]
    expected = [sum(w) / len(w) for w in windows]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    # loss/samples counts every batch of the window (batches of 16), not the last one
    assert cb.run().series("loss", "samples")[1].tolist() == [64.0, 32.0, 64.0, 32.0]


class _SkipsOddBatches(Classifier):
    """Returns None for odd batches: Lightning skips their backward (automatic optimization)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx % 2 else loss


def test_a_batch_whose_training_step_returned_none_is_not_counted_in_samples():
    cb = LandscapeCallback(None, F.cross_entropy, metrics=["loss"], alarms=False)
    _fit(_SkipsOddBatches(), [cb], max_steps=2, accumulate_grad_batches=2)
    assert cb.run().series("loss", "samples")[1].tolist() == [16.0, 16.0]  # was 32


def test_a_step_whose_every_training_step_returned_none_is_skipped_without_a_word():
    # Lightning's documented way to skip a batch: three warnings said to return the loss,
    # to call mon.step(..., loss=loss) and to call it before zero_grad
    cb = LandscapeCallback(None, F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", module="lightning")  # its own notes on the loader
        _fit(_SkipsOddBatches(), [cb], max_steps=4)
    run = cb.run()
    assert run.steps("loss").tolist() == [0, 2]  # the trained steps
    assert np.isfinite(run.series("loss", "value")[1]).all()
    assert np.isfinite(run.series("grad_norm", "value")[1]).all()
    assert run.findings() == []


class _ParamSpy(pl.Callback):
    """Parameters after every optimizer step (list index = step)."""

    def __init__(self):
        self.after: list[torch.Tensor] = []

    def on_fit_start(self, trainer, module):
        self.initial = torch.cat([p.detach().flatten().clone() for p in module.parameters()])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after.append(torch.cat([p.detach().flatten().clone() for p in module.parameters()]))


def test_every_n_steps_records_multiples_and_keeps_single_step_updates():
    spy = _ParamSpy()
    cb = LandscapeCallback(None, F.cross_entropy, metrics=["loss", "update"], every_n_steps=2,
                           alarms=False)
    _fit(Classifier(), [spy, cb])
    run = cb.run()
    assert run.steps("loss").tolist() == [0, 2, 4]
    steps, norms = run.series("update", "norm")
    for s, value in zip(steps.tolist(), norms.tolist()):
        before = spy.initial if s == 0 else spy.after[s - 1]
        assert value == pytest.approx(float((spy.after[s] - before).norm()), rel=1e-5)
    assert run.metric_attrs("update")["schedule"] == "every(2)"


def test_a_finding_reaches_the_trainer_warns_calls_back_and_stops_training():
    seen = []
    cb = LandscapeCallback(
        None, F.cross_entropy, probe=PROBE, metrics=["loss", create("logits", schedule=1)],
        alarms=[LogitGrowth(max_abs=0.0, max_abs_severity="warning")], on_finding=seen.append,
        stop_on="warning",
    )
    with pytest.warns(InstabilityWarning, match="logit"):
        trainer = _fit(Classifier(), [cb])
    assert [(f.step, f.rule) for f in seen] == [(0, "logit_growth")]
    assert trainer.global_step == 1  # should_stop after the first step
    assert [f.rule for f in cb.run().findings()] == ["logit_growth"]


def test_an_exception_in_training_closes_the_file_and_removes_the_hooks(tmp_path):
    path = tmp_path / "run.h5"
    module = Classifier(fail_at=3)
    cb = LandscapeCallback(str(path), F.cross_entropy, metrics=["loss", "update"])
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[cb])
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    with pytest.raises(RuntimeError, match="simulated failure"):
        trainer.fit(module, loader)
    with Run.open(path) as run:
        assert run.steps("loss").tolist() == [0, 1, 2]
    _no_hooks_left(trainer, module)


def test_training_step_loss_keeps_the_probe_out_of_the_users_logs():
    module = Classifier()
    cb = LandscapeCallback(None, closure=training_step_loss, probe=PROBE, alarms=False,
                           metrics=["loss", create("top_eigenvalues", k=1, schedule=1)])
    trainer = _fit(module, [cb], max_steps=2)
    _, eig = cb.run().series("top_eigenvalues", "eigenvalues")
    assert eig.shape == (2, 1) and (eig > 0).all()
    # the logged value is the last training loss, not a loss on the probe
    assert float(trainer.callback_metrics["train_loss"]) == pytest.approx(module.losses[-1])
    assert len(module.losses) == 2


class _CallsItsNet(Classifier):
    """A training_step that calls the submodule, self.net(x), not self(x); a loss module
    called after it returns a scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.criterion = nn.CrossEntropyLoss()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.criterion(self.net(x), y)


def test_under_training_step_loss_the_logits_come_from_the_submodule_it_calls():
    """The logits metric read the root module's output, which such a closure never makes:
    NaN rows and a metric_failed finding in the default preset."""
    rows = {}
    for how in ({"loss_fn": F.cross_entropy}, {"closure": training_step_loss}):
        cb = LandscapeCallback(None, probe=PROBE, metrics=["logits"], alarms=False, **how)
        _fit(_CallsItsNet(), [cb], max_steps=2)
        assert not [f for f in cb.monitor.findings if f.rule == "metric_failed"]
        rows[next(iter(how))] = cb.run().series("logits", "max_abs")[1]
    assert np.isfinite(rows["closure"]).all()
    np.testing.assert_array_equal(rows["closure"], rows["loss_fn"])


def test_without_a_loss_the_cheap_metrics_run_and_curvature_says_what_it_needs():
    cb = LandscapeCallback(None, probe=PROBE,
                           metrics=["loss", "update", "logits", "top_eigenvalues"])
    with pytest.warns(RuntimeWarning, match="pass loss_fn= or closure="):
        _fit(Classifier(), [cb], max_steps=2)
    run = cb.run()
    assert np.isfinite(run.series("update", "norm")[1]).all()
    assert np.isfinite(run.series("logits", "max_abs")[1]).all()
    assert np.isnan(run.series("top_eigenvalues", "eigenvalues")[1]).all()
    assert [f.rule for f in run.findings()] == ["metric_failed"]


def test_without_a_loss_a_dict_probe_gets_the_same_reason():
    # the data check's reason came first: "with loss_fn every batch must be an
    # (inputs, targets) pair"
    x, y = PROBE
    cb = LandscapeCallback(None, probe={"features": x, "mask": torch.ones_like(x),
                                        "labels": y}, metrics=["top_eigenvalues"])
    with pytest.warns(RuntimeWarning, match="pass loss_fn= or closure= to LandscapeCallback"):
        _fit(Classifier(), [cb], max_steps=1)
    assert [f.rule for f in cb.run().findings()] == ["metric_failed"]


def test_training_step_loss_is_refused_with_manual_optimization():
    cb = LandscapeCallback(None, closure=training_step_loss)
    with pytest.raises(ValueError, match="manual optimization"):
        _fit(Classifier(manual=True), [cb], max_steps=1)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="every_n_steps"):
        LandscapeCallback(None, every_n_steps=0)
    with pytest.raises(ValueError, match="severity"):
        LandscapeCallback(None, stop_on="fatal")
    with pytest.raises(ValueError, match="optimiser"):
        LandscapeCallback(None, optimiser=None)


def test_a_fit_resumed_from_a_checkpoint_continues_the_run_file(tmp_path):
    path, ckpt = tmp_path / "run.h5", tmp_path / "three.ckpt"
    first = _fit(Classifier(), [LandscapeCallback(str(path), metrics=["loss"])], max_steps=3)
    first.save_checkpoint(ckpt)
    pl.seed_everything(0, verbose=False)
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[LandscapeCallback(str(path), metrics=["loss"])])
    trainer.fit(Classifier(), loader, ckpt_path=ckpt)
    with Run.open(path) as run:
        assert run.steps("loss").tolist() == [0, 1, 2, 3, 4]
    # the examples' mode="w" on a resumed fit empties the file: said, not silent
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[LandscapeCallback(str(path), metrics=["loss"], mode="w")])
    with pytest.warns(RuntimeWarning, match="resumes at step 3, and mode='w' empties"):
        trainer.fit(Classifier(), loader, ckpt_path=ckpt)
    with Run.open(path) as run:
        assert run.steps("loss").tolist() == [3, 4]


def test_a_fresh_fit_into_a_file_of_an_earlier_run_is_refused_before_it_trains(tmp_path):
    """It failed at the first optimizer step, after the model had moved."""
    path = tmp_path / "run.h5"
    _fit(Classifier(), [LandscapeCallback(str(path), metrics=["loss"])], max_steps=3)
    module = Classifier()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(StepOrderError, match=r"already holds steps up to 2, and this "
                                             r"training starts at step 0: pass another path"
                       ) as refused:
        _fit(module, [LandscapeCallback(str(path), metrics=["loss"])], max_steps=3)
    # a resume with ckpt_path="last" in a new logger version restores nothing (review)
    assert "ckpt_path='last' looks in the folder of the logger's new version" in str(
        refused.value)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert all(not m._forward_hooks for m in module.modules())
    with Run.open(path) as run:  # the earlier run's file is as it was
        assert run.steps("loss").tolist() == [0, 1, 2]


class _TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers (a GAN's shape): two optimizer steps a batch
    (the second one every ``second_every`` batches)."""

    second_every = 1

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        first, second = self.optimizers()
        loss = F.cross_entropy(self(x), y)
        first.zero_grad()
        self.manual_backward(loss)
        first.step()
        if batch_idx % self.second_every == 0:
            other = F.cross_entropy(self.head(self.body(x).detach()), y)
            second.zero_grad()
            self.manual_backward(other)
            second.step()
        return {"loss": loss.detach()}

    def configure_optimizers(self):
        return (torch.optim.SGD(self.body.parameters(), lr=0.05),
                torch.optim.SGD(self.head.parameters(), lr=0.05))


class _TwoOptimizersNorms(_TwoOptimizers):
    """Keeps the norm of the first optimizer's gradient as it steps."""

    def training_step(self, batch, batch_idx):
        first, _ = self.optimizers()
        real_step = first.step

        def step(*args, **kwargs):
            grads = [p.grad for p in self.body.parameters()]
            self.norms.append(float(torch.linalg.vector_norm(torch.cat(
                [g.reshape(-1) for g in grads]))))
            return real_step(*args, **kwargs)

        first.step = step
        try:
            return super().training_step(batch, batch_idx)
        finally:
            del first.step


def test_with_two_optimizers_grad_norm_is_the_first_ones_gradient():
    # it was the norm over every parameter: the second optimizer's gradients included
    module = _TwoOptimizersNorms()
    module.norms = []
    callback = LandscapeCallback(None, metrics=["grad_norm"], alarms=False)
    _fit(module, [callback], max_steps=6)
    steps, norms = callback.run().series("grad_norm", "value")
    assert steps.tolist() == [1, 3, 5]
    np.testing.assert_allclose(norms, module.norms, rtol=1e-6)


def test_two_optimizers_record_at_lightnings_global_step(tmp_path):
    """Manual optimization with two optimizers: trainer.global_step counts both steps, and
    the rows follow it (documented in docs/integrations.md, with schedules to match)."""
    path = tmp_path / "run.h5"
    callback = LandscapeCallback(str(path), metrics=["loss"])
    trainer = _fit(_TwoOptimizers(), [callback], max_steps=12)
    assert trainer.global_step == 12  # six batches, two optimizer steps each
    with Run.open(path) as run:
        assert run.steps("loss").tolist() == [1, 3, 5, 7, 9, 11]


def test_an_every_n_steps_that_no_recorded_step_meets_is_said():
    """Two optimizers put the rows on odd steps: every_n_steps=2 recorded nothing, silently."""
    callback = LandscapeCallback(None, metrics=["loss"], every_n_steps=2)
    with pytest.warns(RuntimeWarning, match=r"advances by 2 per batch.*every_n_steps=2, and "
                                            r"nothing will be recorded"):
        _fit(_TwoOptimizers(), [callback], max_steps=8)
    assert callback.run().steps("loss").tolist() == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        callback = LandscapeCallback(None, metrics=["loss"], every_n_steps=3)
        _fit(_TwoOptimizers(), [callback], max_steps=12)
    assert callback.run().steps("loss").tolist() == [3, 9]
    with warnings.catch_warnings():  # optimizers at different rates reach even steps too
        warnings.simplefilter("error", RuntimeWarning)
        callback = LandscapeCallback(None, metrics=["loss"], every_n_steps=2)
        _fit(_UnevenOptimizers(), [callback], max_steps=9)
    steps = callback.run().steps("loss").tolist()
    assert steps and all(s % 2 == 0 for s in steps)


def test_a_metric_schedule_that_no_recorded_step_meets_is_said():
    # the default logits metric, every(10), got no row under two optimizers, silently
    callback = LandscapeCallback(None, metrics=["loss", "logits"])
    with pytest.warns(RuntimeWarning, match=r"advances by 2 per batch.*logits \(every\(10\)\) "
                                            r"will never run"):
        _fit(_TwoOptimizers(), [callback], max_steps=8)
    assert callback.run().steps("logits").tolist() == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # every(3) meets odd steps
        callback = LandscapeCallback(None, metrics=["loss", create("logits", schedule=3)])
        _fit(_TwoOptimizers(), [callback], max_steps=8)
    assert callback.run().steps("logits").tolist() == [3]


class _UnevenOptimizers(_TwoOptimizers):
    """The second optimizer steps every other batch only (a WGAN's generator)."""

    second_every = 2


class _ManualAccumulation(Classifier):
    """Lightning's manual-optimization pattern: step and zero the gradients every 2 batches."""

    def __init__(self) -> None:
        super().__init__(manual=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.manual_backward(loss / 2)
        if batch_idx % 2 == 1:
            self.seen_norms.append(float(torch.linalg.vector_norm(torch.cat(
                [p.grad.flatten() for p in self.parameters()]))))
            opt = self.optimizers()
            opt.step()
            opt.zero_grad()
        return loss.detach()

    seen_norms: list[float]


def test_manual_optimization_that_zeroes_the_gradients_keeps_grad_norm():
    """grad_norm was NaN at every row: the callback read .grad after opt.zero_grad()."""
    module = _ManualAccumulation()
    module.seen_norms = []
    callback = LandscapeCallback(None, metrics=["loss", "grad_norm"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer = _fit(module, [callback], max_steps=3)
    assert trainer.global_step == 3
    np.testing.assert_allclose(callback.run().series("grad_norm", "value")[1],
                               module.seen_norms, rtol=1e-5)


def test_a_bf16_true_fit_casts_the_probe_as_it_casts_the_batches():
    """precision='bf16-true': the float32 probe failed every probe metric (dtype mismatch)."""
    callback = LandscapeCallback(None, F.cross_entropy, probe=PROBE, strict=True,
                                 metrics=["sentinels", "top_eigenvalues"])
    _fit(Classifier(), [callback], max_steps=3, precision="bf16-true")
    run = callback.run()
    assert np.isfinite(run.series("top_eigenvalues", "eigenvalues")[1]).all()
    assert np.isfinite(run.series("sentinels", "r_secant")[1][1:]).all()


def test_run_reads_the_file_when_the_fit_ran_in_spawned_processes(tmp_path):
    """ddp_spawn: the callback in the launching process never held a monitor, and run()
    said 'nothing recorded yet' although rank 0 had written the file."""
    import os
    import time

    from landscape.store import RunWriter

    path = tmp_path / "run.h5"
    callback = LandscapeCallback(str(path), metrics=["loss"])
    with RunWriter(path, mode="w") as w:  # what rank 0 wrote in its own process
        w.declare("loss", {"value": ()})
        w.append("loss", 0, {"value": 1.0})
    assert callback.run().steps("loss").tolist() == [0]
    # an older run's file at the path is not this callback's (a fit that failed early)
    old = time.time() - 3600
    os.utime(path, (old, old))
    with pytest.raises(RuntimeError, match="nothing recorded yet"):
        callback.run()


class _ReturnsNothing(_TwoOptimizers):
    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)  # the usual manual-optimization step: no return


def test_a_training_step_without_a_returned_loss_is_named_once(tmp_path):
    """The only message was the loss metric's 'needs step(..., loss=loss)': the Monitor's
    API, not the LightningModule's."""
    callback = LandscapeCallback(str(tmp_path / "run.h5"), metrics=["loss"])
    with pytest.warns(RuntimeWarning) as caught:
        _fit(_ReturnsNothing(), [callback], max_steps=6)
    hints = [w for w in caught if "training_step returned no loss" in str(w.message)]
    assert len(hints) == 1
    # and nothing else: the loss metric's own warning said "needs step(..., loss=loss)"
    assert [str(w.message) for w in caught if "landscape" in str(w.message)] == \
        [str(hints[0].message)]
    assert ["training_step returned no loss" in f.message
            for f in callback.run().findings()] == [True]


def _fabric_fit(metrics=None, precision="32-true", probe=None):
    """Three SGD steps of a Fabric loop; monitored with ``metrics`` unless None.

    Returns the trained module, the monitor's findings and its run (None unmonitored).
    """
    from lightning.fabric import Fabric

    from landscape import Monitor

    fabric = Fabric(accelerator="cpu", devices=1, precision=precision)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    model, opt = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    x, y = _data(48)
    mon = None if metrics is None else Monitor(
        model, F.cross_entropy, None, optimizer=opt, probe=probe, warn=False,
        metrics=metrics).start()
    for step in range(3):
        batch = (x[16 * step:16 * (step + 1)], y[16 * step:16 * (step + 1)])
        loss = F.cross_entropy(model(batch[0]), batch[1])
        opt.zero_grad()
        fabric.backward(loss)
        opt.step()
        if mon is not None:
            mon.step(step, batch=batch, loss=loss)
    if mon is None:
        return net, [], None
    findings, run = list(mon.findings), mon.run()
    mon.close()
    return net, findings, run


def test_a_fabric_model_is_measured_through_the_module_it_wraps():
    # the wrapper redirects attribute writes: the weights a measurement substituted were
    # never put back, and the next backward failed ("does not require grad")
    plain, _, _ = _fabric_fit()
    monitored, findings, _ = _fabric_fit(
        ["taylor_radius", "representation", "hessian_trace", "sentinels"], probe=PROBE)
    assert findings == []
    for a, b in zip(plain.parameters(), monitored.parameters()):
        assert torch.equal(a, b)


class _ReadsTheDict(pl.LightningModule):
    """forward(self, batch) reads the dict batch's own keys."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, batch):
        return self.net(batch["feats"])

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_forward_that_takes_the_dict_batch_itself_is_called_so():
    # logits and taylor_radius called module(**batch): "unexpected keyword argument 'feats'"
    x, y = _data()

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"feats": x[i], "label": y[i]}

    data = torch.utils.data.DataLoader(Dicts(), batch_size=16)
    cb = LandscapeCallback(None, closure=training_step_loss, alarms=False,
                           probe={"feats": x[:16], "label": y[:16]},
                           metrics=[create("logits", schedule=1), "taylor_radius"])
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb])
    trainer.fit(_ReadsTheDict(), data)
    run = cb.run()
    assert run.findings() == []
    assert np.isfinite(run.series("logits", "max_abs")[1]).all()
    assert np.isfinite(run.series("taylor_radius", "r")[1][1:]).all()  # from the 2nd step


def test_a_fabric_bf16_true_loop_is_measured_in_the_weights_dtype():
    # Fabric casts the loop's float32 batches inside the wrapper the monitor looks through:
    # the default probe and the batch's forward passes failed on the dtypes
    _, findings, run = _fabric_fit(
        ["sentinels", create("logits", schedule=1), "taylor_radius"], precision="bf16-true")
    assert findings == []
    assert np.isfinite(run.series("sentinels", "probe_loss")[1]).all()
    assert np.isfinite(run.series("logits", "max_abs")[1]).all()
    assert np.isfinite(run.series("taylor_radius", "r")[1][1:]).all()


class _ManualClipping(Classifier):
    """Manual optimization clipping as Lightning documents it: ``self.clip_gradients``
    between ``manual_backward`` and ``opt.step()``."""

    def __init__(self) -> None:
        super().__init__(manual=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        self.seen_norms.append(float(torch.linalg.vector_norm(torch.cat(
            [p.grad.flatten() for p in self.parameters()]))))
        self.clip_gradients(opt, gradient_clip_val=0.01, gradient_clip_algorithm="norm")
        opt.step()
        return loss.detach()

    seen_norms: list[float]


def test_manual_clipping_records_the_norm_before_it():
    """grad_norm read 0.01, the clipped norm, at every row."""
    module = _ManualClipping()
    module.seen_norms = []
    callback = LandscapeCallback(None, metrics=["grad_norm"], alarms=False)
    _fit(module, [callback], max_steps=4)
    norms = callback.run().series("grad_norm", "value")[1]
    assert min(module.seen_norms) > 0.1  # clipping changed every step's gradient
    np.testing.assert_allclose(norms, module.seen_norms, rtol=1e-6)


class _FirstStepsEveryOtherBatch(_TwoOptimizersNorms):
    """The watched (first) optimizer steps every other batch, the second every batch."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        first, second = self.optimizers()
        if batch_idx % 2 == 0:
            loss = F.cross_entropy(self(x), y)
            first.zero_grad()
            self.manual_backward(loss)
            self.norms.append(float(torch.linalg.vector_norm(torch.cat(
                [p.grad.reshape(-1) for p in self.body.parameters()]))))
            first.step()
        other = F.cross_entropy(self.head(self.body(x).detach()), y)
        second.zero_grad()
        self.manual_backward(other)
        second.step()
        return {"loss": other.detach()}


def test_a_batch_where_the_watched_optimizer_did_not_step_has_no_row():
    """Such rows reported a gradient norm of no optimizer's step (stale and other gradients
    together) and the watched optimizer's learning rate."""
    module = _FirstStepsEveryOtherBatch()
    module.norms = []
    callback = LandscapeCallback(None, metrics=["grad_norm", "update"], alarms=False)
    trainer = _fit(module, [callback], max_steps=9)
    assert trainer.global_step == 9  # batches 0, 2, 4: two steps each; 1, 3, 5: one
    steps, norms = callback.run().series("grad_norm", "value")
    assert steps.tolist() == [1, 4, 7]
    np.testing.assert_allclose(norms, module.norms, rtol=1e-6)


def test_a_fast_dev_run_writes_no_file_and_the_real_fit_after_it_starts_it(tmp_path):
    """Lightning's smoke test logs and saves nothing; its row at step 0 was written, and
    the real fit of the same script stopped with StepOrderError."""
    path = tmp_path / "run.h5"
    smoke = LandscapeCallback(str(path), metrics=["loss"])
    _fit(Classifier(), [smoke], fast_dev_run=True)
    assert not path.exists()
    assert smoke.run().steps("loss").tolist() == [0]  # kept in memory
    callback = LandscapeCallback(str(path), metrics=["loss"])
    _fit(Classifier(), [callback], max_steps=3)
    with Run.open(path) as run:
        assert run.steps("loss").tolist() == [0, 1, 2]


def test_a_bf16_true_step_loss_is_summed_without_bfloat16_rounding():
    """The accumulated batches' losses were summed in bfloat16 (0.2 % off their mean)."""
    module = Classifier()
    callback = LandscapeCallback(None, metrics=["loss"], alarms=False)
    _fit(module, [callback], max_steps=4, precision="bf16-true", accumulate_grad_batches=2)
    pairs = np.array(module.losses, dtype=np.float64).reshape(-1, 2)  # exact bf16 values
    np.testing.assert_allclose(callback.run().series("loss", "value")[1], pairs.mean(1),
                               rtol=1e-12)


class _ManualMixedPrecision(Classifier):
    """Manual optimization under a GradScaler: the gradients after manual_backward are
    scaled; Lightning unscales them inside the optimizer step."""

    def __init__(self) -> None:
        super().__init__(manual=True)
        self.seen_norms: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        loss = F.cross_entropy(self(x), y)
        self.manual_backward(loss)
        scale = self.trainer.precision_plugin.scaler.get_scale()
        self.seen_norms.append(float(torch.linalg.vector_norm(torch.cat(
            [p.grad.flatten() for p in self.parameters()]))) / scale)
        opt.step()
        return loss.detach()


def test_manual_optimization_under_a_grad_scaler_records_the_unscaled_norm():
    """The norm after manual_backward was the scaled one: 65536 times too large."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = _ManualMixedPrecision()
    callback = LandscapeCallback(None, metrics=["grad_norm"], alarms=False)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    _fit(module, [callback], max_steps=3, plugins=[plugin])
    np.testing.assert_allclose(callback.run().series("grad_norm", "value")[1],
                               module.seen_norms, rtol=1e-5)


class _SecondStage(Classifier):
    """Manual optimization that replaces its optimizer mid-fit (a second training stage)."""

    def __init__(self) -> None:
        super().__init__(manual=True)

    def training_step(self, batch, batch_idx):
        if batch_idx == 2:
            self.trainer.strategy.optimizers = [torch.optim.Adam(self.parameters(), lr=1e-3)]
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        loss = F.cross_entropy(self(x), y)
        self.manual_backward(loss)
        opt.step()
        return loss.detach()


def test_a_replaced_optimizer_keeps_the_rows_coming_and_is_warned_about():
    """Rows stopped at the replacement, as if only other optimizers stepped, and the
    monitor's warning to call set_optimizer never came."""
    callback = LandscapeCallback(None, metrics=["loss", "update"], alarms=False)
    with pytest.warns(RuntimeWarning, match="set_optimizer"):
        _fit(_SecondStage(), [callback], max_steps=5)
    assert callback.run().steps("loss").tolist() == [0, 1, 2, 3, 4]


class _TwoLoaders(Classifier):
    """A training_step over one batch of each of two loaders, as a list or a dict."""

    def training_step(self, batch, batch_idx):
        parts = list(batch.values() if isinstance(batch, dict) else batch)
        loss = sum(F.cross_entropy(self(x), y) for x, y in parts) / len(parts)
        if self.training:
            self.losses.append(float(loss.detach()))
        return loss


@pytest.mark.parametrize("structure", ["list", "dict", "list of one", "dict of one"])
def test_several_training_loaders_give_the_monitor_a_list_of_their_batches(tmp_path, structure):
    """Lightning's combined batch [[x1, y1], [x2, y2]] was read as (inputs, targets) =
    ([x1, y1], [x2, y2]): the default monitor's sentinels and logits were NaN for the whole
    run, its one explanation a TypeError in the user's forward, and the step counted 16
    samples of 32 (integrations review)."""
    path = tmp_path / "run.h5"
    module = _TwoLoaders()
    loaders = [torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data(seed=s)),
                                           batch_size=16) for s in (0, 1)]
    cb = LandscapeCallback(str(path), F.cross_entropy)  # the defaults
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb])
    if structure.endswith("of one"):  # fit(m, [dl]) hands over [[x, y]] (review)
        loaders = loaders[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no metric fails
        trainer.fit(module, loaders if structure.startswith("list")
                    else dict(zip("ab", loaders)))
    with Run.open(path) as run:
        assert run.series("loss", "samples")[1].tolist() == [16.0 * len(loaders)] * 4
        assert run.series("loss", "value")[1].tolist() == pytest.approx(module.losses, rel=1e-7)
        r = run.series("sentinels", "r_secant")[1]
        assert np.isfinite(r[1:]).all() and np.isfinite(run.series("sentinels", "max_abs")[1]).all()
        assert not [f for f in run.findings() if f.rule == "metric_failed"]
    _no_hooks_left(trainer, module)


def test_the_callbacks_findings_are_its_run_files_after_a_fast_dev_run(tmp_path):
    """The documented smoke test, then the real fit with the same callback: the list kept
    the smoke test's findings beside the fit's (6 against the file's 3; review)."""
    path = tmp_path / "run.h5"
    callback = LandscapeCallback(str(path), metrics=["loss", "sharpness"])  # no loss_fn: a
    with warnings.catch_warnings():  # finding per measured step
        warnings.simplefilter("ignore")
        _fit(Classifier(), [callback], fast_dev_run=True)
        assert [f.rule for f in callback.findings] == ["metric_failed"]
        _fit(Classifier(), [callback], max_steps=3)
    with Run.open(path) as run:
        stored = [(f.step, f.rule) for f in run.findings()]
    assert stored and [(f.step, f.rule) for f in callback.findings] == stored
