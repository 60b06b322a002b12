"""Monitor mechanics: rows per schedule, NaN rows on failure, hooks removed, resume, registry."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import landscape as ls
from landscape._errors import StepOrderError
from landscape.metrics import Metric, preset, register
from landscape.monitor import Monitor
from landscape.monitor.arguments import step_index
from landscape.store.format import step_value
from tests import models


def _train(model, opt, steps, mon=None, data_seed=0, start=0):
    g = torch.Generator().manual_seed(data_seed)
    for step in range(start, start + steps):
        x = torch.randn(16, 6, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(step, batch=(x, y), loss=loss, outputs=out)


def test_cheap_preset_records_one_row_per_due_step_and_removes_hooks():
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probe = models.classification_data(32, seed=5)
    with Monitor(model, F.cross_entropy, optimizer=opt, probe=probe, alarms=False) as mon:
        _train(model, opt, 12, mon)
        run = mon.run()
    assert set(run.metrics()) == {"loss", "grad_norm", "nonfinite", "update", "sentinels",
                                  "logits"}
    assert list(run.steps("loss")) == list(range(12))
    assert list(run.steps("logits")) == [0, 10]
    _, norms = run.series("update", "norm")
    assert np.all(np.isfinite(norms)) and np.all(norms > 0)
    _, bad = run.series("nonfinite", "loss")
    assert np.all(bad == 0)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("to_file", [True, False])
def test_run_reads_the_recorded_rows_after_close(tmp_path, to_file):
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.h5" if to_file else None
    with Monitor(model, F.cross_entropy, path, optimizer=opt, probe_size=None,
                 warn=False) as mon:
        _train(model, opt, 3, mon)
    assert mon.run().steps("loss").tolist() == [0, 1, 2]


def test_grad_norm_records_the_norm_before_clipping_when_given():
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = models.classification_data(16)
    with Monitor(model, F.cross_entropy, optimizer=opt, metrics=["grad_norm"],
                 alarms=False) as mon:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
        mon.step(0, batch=(x, y), loss=loss, grad_norm=total)
        mon.step(1, batch=(x, y), loss=loss)  # not given: the clipped .grad
        with pytest.raises(ValueError, match="grad_norm"):
            mon.step(2, loss=loss, grad_norm="large")
        mon.step(2, loss=loss)  # nothing was recorded for the refused call
        _, norms = mon.run().series("grad_norm", "value")
    assert norms[0] == pytest.approx(float(total)) and float(total) > 0.01
    assert norms[1] == pytest.approx(1e-3, rel=1e-3)


def test_update_norm_equals_the_actual_parameter_change():
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with Monitor(model, F.cross_entropy, optimizer=opt, metrics=["loss", "update"],
                 alarms=False) as mon:
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        _train(model, opt, 1, mon)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        _, norms = mon.run().series("update", "norm")
    assert norms[0] == pytest.approx(float((after - before).norm()), rel=1e-6)



def test_one_copy_of_the_parameters_gives_the_update_and_the_parameters_before_it():
    """The copy taken before the optimizer step becomes Δθ in place; the parameters before
    the step are rebuilt only for a metric that reads them (the default metrics do not)."""
    seen = []

    class Reader(Metric):
        name = "reader"
        FIELDS = ("x",)
        needs_update = True

        def compute(self, ctx):
            built_by_defaults = isinstance(ctx._params_before, tuple)
            before = ctx.params_before
            assert isinstance(before, tuple)  # torch.stack, _foreach_* take it
            torch._foreach_norm(before)
            seen.append((built_by_defaults, [u.clone() for u in ctx.update],
                         [b.clone() for b in before]))
            return {"x": 0.0}

    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = models.classification_data()
    exact = []
    with Monitor(model, F.cross_entropy, optimizer=opt, alarms=False,
                 metrics=["loss", "nonfinite", "update", "sentinels", Reader()],
                 probe=(x, y)) as mon:
        for step in range(3):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            after = [p.detach().clone() for p in model.parameters()]
            mon.step(step, batch=(x, y), loss=loss)
            built, update, rebuilt = seen[-1]
            assert not built
            for u, b, a, r in zip(update, before, after, rebuilt):
                assert torch.equal(u, a - b)  # bitwise the step
                # θ_after − Δθ is exact where a weight moved by less than a factor two
                # (Sterbenz), within a rounding of its terms elsewhere
                near = (b / 2 <= a) & (a <= 2 * b) | (2 * b <= a) & (a <= b / 2)
                assert torch.equal(r[near], b[near])
                exact.append(near.float().mean())
                eps = torch.finfo(a.dtype).eps
                assert ((r - b).abs() <= eps * (a.abs() + u.abs())).all()
        _, relative = mon.run().series("update", "relative")
    assert float(torch.stack(exact).mean()) > 0.9  # most weights: bitwise
    flat = torch.cat([u.flatten() for u in update])
    base = torch.cat([b.flatten() for b in before])
    assert relative[-1] == pytest.approx(float(flat.norm() / base.norm()), rel=1e-6)


def test_the_parameters_before_the_step_are_not_read_after_a_forward_renormalised_them():
    """An embedding with ``max_norm`` renormalises the rows a forward looks up, in place,
    until the monitor puts them back at the end of its step: the parameters before the
    step were rebuilt from those renormalised weights when a metric read them after the
    logits' forward (0.03 off)."""
    truth = []

    class Reader(Metric):
        name = "reader"
        FIELDS = ("error",)
        needs_update = True

        def compute(self, ctx):
            return {"error": max(float((a - b).abs().max())
                                 for a, b in zip(ctx.params_before, truth[-1]))}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 8, max_norm=1.0)
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.emb(x).mean(1))

    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 50, (64, 5), generator=g), torch.randint(0, 3, (64,), generator=g)
    probe = (torch.randint(0, 50, (64, 5), generator=g), torch.randint(0, 3, (64,), generator=g))
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    with Monitor(model, F.cross_entropy, optimizer=opt, probe=probe, alarms=False,
                 metrics=["logits", Reader()]) as mon:
        for step in range(4):
            batch = (x[8 * step:8 * step + 8], y[8 * step:8 * step + 8])
            opt.zero_grad()
            loss = F.cross_entropy(model(batch[0]), batch[1])
            loss.backward()
            truth.append([p.detach().clone() for p in model.parameters()])
            opt.step()
            mon.step(step, batch=batch, loss=loss)
        _, error = mon.run().series("reader", "error")
    assert (error < 1e-6).all(), error  # rounding of θ_after − Δθ only


def test_a_failing_metric_records_nan_a_warning_and_one_finding():
    @register(replace=True)
    class Broken(Metric):
        name = "test_broken"
        FIELDS = ("value",)

        def compute(self, ctx):
            raise RuntimeError("out of memory (simulated)")

    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, F.cross_entropy, optimizer=opt, metrics=["loss", "test_broken"],
                  alarms=False)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        _train(model, opt, 3, mon.start())
    run = mon.run()
    assert np.all(np.isnan(run.series("test_broken", "value")[1]))
    assert len(run.series("loss", "value")[1]) == 3
    assert [f.rule for f in run.findings()] == ["metric_failed"]
    mon.close()

    strict = Monitor(models.mlp(), F.cross_entropy, metrics=["test_broken"], strict=True,
                     alarms=False)
    with pytest.raises(RuntimeError, match="simulated"):
        strict.step(0)
    strict.close()


def test_registry_refuses_silent_overwrite_and_user_metric_in_a_few_lines():
    with pytest.raises(ValueError, match="already registered"):
        @register
        class Again(Metric):
            name = "loss"
            FIELDS = ("value",)

    @register(replace=True)
    class WeightNorm(Metric):
        name = "test_weight_norm"
        FIELDS = ("value",)

        def compute(self, ctx):
            return {"value": ls.params.norm(ctx.parameters).item()}

    model = models.mlp()
    with Monitor(model, F.cross_entropy, metrics=["test_weight_norm"], alarms=False) as mon:
        mon.step(0)
        value = mon.run().series("test_weight_norm", "value")[1][0]
    expected = torch.cat([p.detach().flatten() for p in model.parameters()]).norm()
    assert value == pytest.approx(float(expected))


def test_steps_must_increase_and_resume_continues(tmp_path):
    path = tmp_path / "run.h5"
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, F.cross_entropy, path=str(path), optimizer=opt, alarms=False) as mon:
        _train(model, opt, 3, mon)
        with pytest.raises(StepOrderError):
            mon.step(1, loss=1.0)
    with Monitor(model, F.cross_entropy, path=str(path), optimizer=opt, alarms=False) as mon:
        with pytest.raises(StepOrderError):
            mon.step(2, loss=1.0)
        mon.step(3, loss=torch.tensor(0.5))
    run = ls.Run.open(path)
    assert list(run.steps("loss")) == [0, 1, 2, 3]
    assert run.config["optimizer"]["class"] == "SGD"


def test_a_closed_monitor_says_so_and_a_nested_with_leaves_it_open(tmp_path):
    """`with mon:` twice, or start() after close(), failed at the next step with "the run
    writer is closed"; a nested `with mon:` closed it for the outer block (API audit)."""
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, F.cross_entropy, path=str(tmp_path / "run.h5"), optimizer=opt,
                  alarms=False)
    with mon:
        with mon:
            _train(model, opt, 2, mon)
        _train(model, opt, 1, mon, start=2)  # still open after the inner block
    with pytest.raises(RuntimeError, match="this Monitor was closed; build a new one"):
        with mon:
            pass
    with pytest.raises(RuntimeError, match="this Monitor was closed"):
        mon.start()
    # a step after close() measured everything, then said "the run writer is closed"
    # (interactive audit): it says what start() says, before measuring anything
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(RuntimeError, match="this Monitor was closed; build a new one"):
        _train(model, opt, 1, mon, start=3)
    assert len(calls) == 1  # the training step's own forward
    assert list(ls.Run.open(tmp_path / "run.h5").steps("loss")) == [0, 1, 2]


def test_a_step_recorded_already_is_told_to_go_on_not_to_start_the_file_over(tmp_path):
    """A notebook cell run again after an interrupt repeats a step: the message advised
    mode='w' first, which deletes the run (interactive audit)."""
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, F.cross_entropy, path=str(tmp_path / "run.h5"), optimizer=opt,
                 alarms=False) as mon:
        _train(model, opt, 4, mon)
        with pytest.raises(StepOrderError) as err:
            mon.step(3, loss=1.0)
    message = str(err.value)
    assert "go on from step 4" in message and "truncate_from=3" in message
    assert message.index("go on") < message.index("mode='w'")


def test_the_config_names_each_parameter_groups_own_settings():
    model = models.mlp()
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    opt = torch.optim.SGD([{"params": layers[0].parameters(), "lr": 0.0},
                           {"params": layers[-1].parameters(), "lr": 0.1}],
                          lr=0.01, momentum=0.9)
    with Monitor(model, F.cross_entropy, optimizer=opt, alarms=False) as mon:
        config = mon.run().config["optimizer"]
    assert config["param_group_0"]["lr"] == 0.0 and config["param_group_0"]["momentum"] == 0.9
    assert config["param_groups"] == [{"params": 2}, {"params": 2, "lr": 0.1}]
    with Monitor(model, F.cross_entropy, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                 alarms=False) as mon:
        assert "param_groups" not in mon.run().config["optimizer"]  # one group: as before


def test_a_resume_with_other_metrics_continues_after_every_recorded_table(tmp_path):
    """Only the resumed metrics' own last steps were checked: a monitor with another metric
    set accepted steps 0, 1, ... into a file recorded to step 12 and died at its first
    finding ("findings: step 1 does not come after the last step 12") mid-training."""
    path = tmp_path / "run.h5"
    with ls.RunWriter(path, mode="w") as w:
        w.declare("loss", {"value": None})
        for step in range(10):
            w.append("loss", step, {"value": 1.0})
        w.add_finding(ls.Finding(step=12, rule="r", metric="loss/value", severity="info",
                                 message="m", value=1.0, threshold=0.5))
    model = models.mlp()
    with Monitor(model, F.cross_entropy, path=str(path), metrics=["grad_norm"],
                 alarms=False) as mon:
        assert mon.last_step == 12
        with pytest.raises(StepOrderError, match="last recorded step 12"):
            mon.step(0, loss=1.0)
        mon.step(13, loss=1.0)


def test_a_resume_refused_for_a_metrics_fields_drops_no_rows(tmp_path):
    """truncate_from dropped the rows from its step on, then a metric declared with other
    fields refused the resume: the run lost half its rows for a refusal (crash review)."""
    path = tmp_path / "run.h5"
    with ls.RunWriter(path, mode="w") as w:
        w.declare("custom", {"a": None, "b": None})
        w.declare("loss", {"value": None, "samples": None})
        for step in range(100):
            w.append("custom", step, {"a": 1.0, "b": 2.0})
            w.append("loss", step, {"value": 1.0, "samples": 16.0})

    class Custom(Metric):
        name = "custom"

        def fields(self):
            return {"a": None}  # "b" is gone: other settings than the run's

        def compute(self, ctx):
            return {"a": 0.0}

    model = models.mlp()
    mon = Monitor(model, F.cross_entropy, path=str(path), metrics=["loss", Custom()],
                  truncate_from=50, alarms=False)
    with pytest.raises(ls.RunFileError, match="already in the run with fields"):
        mon.start()
    with ls.Run.open(path) as run:
        assert len(run.steps("custom")) == len(run.steps("loss")) == 100
    # the resume that fits drops them, as asked
    with Monitor(model, F.cross_entropy, path=str(path), metrics=["loss"], truncate_from=50,
                 alarms=False) as mon:
        assert mon.last_step == 49
    with ls.Run.open(path) as run:
        assert list(run.steps("custom")) == list(range(50)) == list(run.steps("loss"))


def test_missing_inputs_give_nan_rows_not_crashes():
    model = models.mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Monitor(model, F.cross_entropy, metrics=["loss", "logits"], alarms=False) as mon:
            mon.step(0)  # no loss, no probe
            run = mon.run()
    assert math.isnan(run.series("loss", "value")[1][0])
    assert math.isnan(run.series("logits", "max_abs")[1][0])
    assert sum("cannot run" in str(w.message) for w in caught) == 2


def test_a_batch_given_as_the_step_is_told_where_it_goes_in_one_line():
    """``mon.step((x, y), loss=loss)`` printed every entry of both tensors in the error."""
    model = models.mlp()
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    with Monitor(model, F.cross_entropy, warn=False) as mon:
        with pytest.raises(ValueError) as caught:
            mon.step((x, y), loss=torch.tensor(1.0))
        with pytest.raises(ValueError, match=r"got Tensor of shape \(64, 6\): the batch"):
            mon.step(x)
    message = str(caught.value)
    assert message == ("step must be an integer (the optimizer step's index), got tuple "
                       "(Tensor of shape (64, 6), Tensor of shape (64,)): the batch goes in "
                       "batch=, as in monitor.step(step, batch=(x, y), loss=loss)")
    assert step_index(torch.tensor([5])) == 5  # one element: a step, as before
    with pytest.raises(ValueError, match=r"got str '3'$"):  # other values as before
        step_value("3")
    with pytest.raises(ValueError, match=r"got str 'x{76}\.\.\.$"):  # cut
        step_value("x" * 1000)


def test_bad_arguments_are_value_errors():
    model = models.mlp()
    with pytest.raises(ValueError, match="unknown preset"):
        preset("fast")
    with pytest.raises(ValueError, match="unknown metric"):
        Monitor(model, F.cross_entropy, metrics=["nope"])
    # a mistyped preset named only the metrics
    with pytest.raises(ValueError, match=r"'standrad' is neither a preset \(cheap, standard"):
        Monitor(model, F.cross_entropy, metrics="standrad")


@pytest.mark.parametrize(("setting", "match"), [
    # each was accepted and failed later, or silently did something else (API audit)
    ({"mirrors": 5}, "mirrors must be a list"),
    ({"mirrors": ["tensorboard"]}, "mirrors must hold objects with on_row"),
    ({"config": [1, 2]}, "config must be a mapping"),
    ({"truncate_from": -5}, "truncate_from must be a step"),
    ({"truncate_from": 2.5}, "truncate_from must be a step"),
    ({"flush_every": 2.5}, "flush_every must be an integer >= 1"),
    ({"probe_size": True}, "probe_size must be an integer >= 1"),
    ({"strict": "no"}, "strict must be True or False"),
    ({"adaptive": "yes"}, "adaptive must be True or False"),
    ({"warn": None}, "warn must be True or False"),
    ({"probe": (torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))}, "holds no samples"),
])
def test_settings_of_the_wrong_kind_are_refused_in_one_line(setting, match):
    with pytest.raises(ValueError, match=match):
        Monitor(models.mlp(), F.cross_entropy, **setting)


def test_mirrors_given_as_a_generator_are_kept():
    """The settings check read the generator, and the monitor got none (review)."""

    class Mirror:
        def on_row(self, name, step, row):
            pass

    mirror = Mirror()
    assert Monitor(models.mlp(), F.cross_entropy, mirrors=(m for m in [mirror])).mirrors \
        == [mirror]


def test_nonfinite_flags_nan_gradients_but_not_large_finite_ones():
    model = models.mlp()
    with Monitor(model, F.cross_entropy, metrics=["nonfinite", "grad_norm"], alarms=False) as mon:
        for p in model.parameters():
            p.grad = torch.full_like(p, 3e30)  # finite entries whose squares overflow float32
        mon.step(0, loss=1.0)
        next(model.parameters()).grad[0, 0] = float("nan")
        mon.step(1, loss=float("inf"))
        run = mon.run()
    assert list(run.series("nonfinite", "grad")[1]) == [0.0, 1.0]
    assert list(run.series("nonfinite", "loss")[1]) == [0.0, 1.0]


def test_a_float64_loss_is_recorded_exactly_and_a_large_one_is_not_called_infinite():
    model = models.mlp()
    exact = torch.tensor(1.3957952044868938, dtype=torch.float64)
    huge = torch.tensor(4.66e39, dtype=torch.float64)  # finite in float64, inf in float32
    wide = torch.full((4,), 3e38, dtype=torch.float32)  # finite entries, their sum is not
    with Monitor(model, F.cross_entropy, metrics=["loss", "nonfinite"], alarms=False) as mon:
        for step, loss in enumerate((exact, huge, wide)):
            mon.step(step, loss=loss)
        run = mon.run()
    assert list(run.series("loss", "value")[1]) == [exact.item(), 4.66e39, wide[0].item()]
    assert list(run.series("nonfinite", "loss")[1]) == [0.0, 0.0, 0.0]


def test_a_full_disk_stops_the_writing_not_the_training(tmp_path, monkeypatch):
    """HDF5 crashed the training process (a segfault) when the run file filled its disk."""
    import shutil
    from collections import namedtuple

    from landscape.store import writer as writer_module

    usage = namedtuple("usage", "total used free")
    free = {"bytes": 10**12}
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(0, 0, free["bytes"]))
    path = tmp_path / "run.h5"
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, F.cross_entropy, path=str(path), optimizer=opt, flush_every=1) as mon:
        _train(model, opt, 3, mon)
        free["bytes"] = writer_module.DISK_MARGIN - 1  # the disk fills up
        with pytest.warns(RuntimeWarning, match="too little to write more.*training goes on") \
                as full:
            _train(model, opt, 3, mon, start=3)
        assert full[0].filename == __file__  # the loop's line (it named contextlib's)
        _train(model, opt, 2, mon, start=6)  # said once; training goes on
        mon.writer.declare("late", {"v": None})  # a table declared on the full disk: known
        mon.writer.append("late", 8, {"v": 1.0})  # (rows dropped), never a crash
    with ls.Run.open(path) as run:
        assert list(run.steps("loss")) == [0, 1, 2]  # what was written stays readable
    with pytest.raises(ls.RunFileError, match="too little to write more"):
        with ls.RunWriter(tmp_path / "other.h5") as w:  # the library's default: one line
            w.declare("m", {"v": None})
            w.append("m", 0, {"v": 1.0})


class _AllConv(torch.nn.Module):
    """A fully convolutional classifier (a segmentation-style head): no nn.Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(),
                                        torch.nn.Conv2d(4, 3, 1))

    def forward(self, x):
        return self.body(x).mean(dim=(2, 3))


@pytest.mark.parametrize("preset_name", ["standard", "full"])
def test_a_preset_on_a_model_without_linear_layers_leaves_out_what_it_cannot_place(preset_name):
    model = _AllConv()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    with pytest.warns(RuntimeWarning, match="metric 'spectral_alignment' is left out: .*no "
                                            "nn.Linear layer"):
        mon = Monitor(model, F.cross_entropy, optimizer=opt, metrics=preset_name,
                      probe=(x, y), warn=False).start()
    names = [m.name for m in mon.metrics]
    assert {"spectral_alignment", "collapse", "representation"}.isdisjoint(names)
    assert "sharpness" in names and set(mon.timings) == set(names)
    out = model(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    opt.step()
    mon.step(0, batch=(x, y), loss=loss, outputs=out)
    run = mon.run()
    assert [m["name"] for m in run.config["metrics"]] == names
    assert np.isfinite(run.series("sharpness", "lambda_max")[1]).all()
    mon.close()


def test_strict_or_a_named_layer_that_does_not_exist_still_raises():
    model = _AllConv()
    with pytest.raises(ls.metrics.NotApplicable, match=r"no nn\.Linear"):
        Monitor(model, F.cross_entropy, metrics="standard", strict=True).start()
    with pytest.raises(ValueError, match="not a submodule"):
        Monitor(model, F.cross_entropy,
                metrics=[ls.metrics.create("spectral_alignment", layers=["head"])]).start()


class _LossReads(TorchDispatchMode):
    """Counts the reads of one tensor's value to the host (each a device sync on a GPU)."""

    def __init__(self, tensor):
        super().__init__()
        self.tensor, self.reads = tensor, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0] is self.tensor:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_the_default_monitor_reads_the_loss_once_a_step():
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = models.classification_data(16, seed=1)
    with Monitor(model, F.cross_entropy, optimizer=opt, warn=False) as mon:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with _LossReads(loss) as reads:
            mon.step(0, batch=(x, y), loss=loss)
        run = mon.run()
    assert reads.reads == 1  # the loss and nonfinite metrics share one read
    assert run.series("loss", "value")[1][0] == loss.item()
    assert run.series("nonfinite", "loss")[1][0] == 0.0


def test_the_config_stores_tensor_settings_as_their_numbers():
    model = models.mlp()
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(3.3e-4),
                           betas=(torch.tensor(0.9), torch.tensor(0.95)))
    with Monitor(model, F.cross_entropy, optimizer=opt, alarms=False) as mon:
        config = mon.run().config["optimizer"]["param_group_0"]
    assert config["lr"] == pytest.approx(3.3e-4, rel=1e-7)  # was the string 'tensor(0.0003)'
    assert config["betas"] == pytest.approx([0.9, 0.95], rel=1e-7)
    opt.param_groups[0]["custom"] = {(1, 2): 3}  # JSON has no tuple keys: its string
    with Monitor(model, F.cross_entropy, optimizer=opt, alarms=False) as mon:
        assert mon.run().config["optimizer"]["param_group_0"]["custom"] == "{(1, 2): 3}"


def test_a_resumed_monitor_holds_the_findings_recorded_before(tmp_path):
    """mon.findings was empty after a resume while the file held the run's findings; the
    docs said it keeps every finding of the run (long-run audit)."""
    path = tmp_path / "run.h5"
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Monitor(model, F.cross_entropy, path=str(path), optimizer=opt) as mon:
            _train(model, opt, 3, mon)
            mon.step(3, loss=torch.tensor(float("nan")))  # a non-finite loss: an error
            before = list(mon.findings)
    assert before and [f.rule for f in before] == [f.rule for f in ls.Run.open(path).findings()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Monitor(model, F.cross_entropy, path=str(path), optimizer=opt) as mon:
            assert [(f.step, f.rule) for f in mon.findings] == \
                [(f.step, f.rule) for f in before]
            mon.step(4, loss=torch.tensor(float("nan")))
            assert len(mon.findings) >= len(before)
            assert [f.rule for f in mon.findings] == \
                [f.rule for f in ls.Run.open(path).findings()]


def test_sparse_calls_never_record_an_interval_with_a_skipped_step_as_one_step():
    """Called every 3rd step with optimizer step 7 skipped (a GradScaler on overflow): the
    interval counts as not stepped, and its update is NaN, not the sum of steps 6 and 8."""
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    one_step = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ls.Monitor(model, F.cross_entropy, optimizer=opt, warn=False,
                        metrics=["update", "nonfinite"]) as mon:
            for step in range(12):
                x, y = torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
                before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                if step != 7:
                    opt.step()
                after = torch.cat([p.detach().flatten() for p in model.parameters()])
                one_step[step] = float((after - before).norm())
                if step % 3 == 2:
                    mon.step(step, batch=(x, y), loss=loss)
            run = mon.run()
    rows = dict(zip(*(a.tolist() for a in run.series("update", "norm"))))
    assert math.isnan(rows[8])
    for step in (2, 5, 11):  # whole intervals: the last optimizer step alone
        assert rows[step] == pytest.approx(one_step[step], rel=1e-5)


def test_rules_given_as_a_generator_are_all_built():
    """The run's config read alarms= first, so a generator of rules reached the alarms
    empty: no rule ran, not even nonfinite (review)."""
    from landscape.alarms import default_rules

    model = models.mlp()
    mon = Monitor(model, F.cross_entropy, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                  metrics=["loss"], alarms=(rule for rule in default_rules()))
    with pytest.warns(ls.InstabilityWarning, match="nonfinite: training loss is nan"), mon:
        for step in range(3):
            mon.step(step, loss=torch.tensor(float("nan") if step == 2 else 1.0))
    assert [f.rule for f in mon.findings] == ["nonfinite"]
    assert len(mon.run().config["alarms"]) == len(default_rules())
