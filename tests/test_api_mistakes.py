"""User mistakes at the Python API: one clear error naming the argument, never a wrong result.

Each case once ended in an error from deep inside torch, numpy or h5py, or in silence (an
audit of the public API): a negative field shape left the run file unreadable, NaN weights
gave "Eigenvalues did not converge", a step of 3.5 was stored as 3.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import landscape as ls
from landscape import functional as LF
from landscape import surface
from landscape.store import Run, RunWriter


def _model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    return model, (torch.randn(16, 4), torch.randint(0, 3, (16,)))


def test_a_bad_field_declaration_is_refused_before_the_file_is_touched(tmp_path):
    path = tmp_path / "r.h5"
    w = RunWriter(path, mode="w")
    w.declare("m", {"a": None})
    w.append("m", 0, {"a": 1.0})
    with pytest.raises(ValueError, match="field 'a': shape \\(-1,\\) has a negative size"):
        w.declare("ns", {"a": (-1,)})
    with pytest.raises(TypeError, match="fields: expected a mapping"):
        w.declare("t", ("a", "b"))  # a metric's FIELDS is a tuple: a natural slip
    w.close()
    with Run.open(path) as run:  # the good rows are still there
        assert run.metrics() == ["m"] and list(run.series("m", "a")[1]) == [1.0]


@pytest.mark.parametrize("step, match", [
    (3.5, "step must be an integer"), ("7", "step must be an integer"),
    (math.nan, "step must be an integer"), (True, "step must be an integer"),
    (2**70, "beyond the 64-bit integers"),
])
def test_a_step_that_is_no_integer_is_refused_by_the_writer(step, match):
    w = RunWriter.memory()
    w.declare("m", {"a": None})
    with pytest.raises(ValueError, match=match):
        w.append("m", step, {"a": 1.0})
    w.append("m", np.int64(4), {"a": 1.0})  # numpy integers and integral floats are steps
    w.append("m", 5.0, {"a": 1.0})
    assert list(w.run().steps("m")) == [4, 5]


def test_row_values_that_do_not_fit_name_their_field():
    w = RunWriter.memory()
    w.declare("m", {"a": None, "v": (2,)})
    with pytest.raises(TypeError, match="values: expected a mapping"):
        w.append("m", 0, [1.0, 2.0])
    with pytest.raises(ValueError, match="field 'a': 'x' is not a number"):
        w.append("m", 0, {"a": "x", "v": [1.0, 2.0]})
    with pytest.raises(ValueError, match="field 'a': a complex value"):
        w.append("m", 0, {"a": 1 + 2j, "v": [1.0, 2.0]})
    with pytest.raises(ValueError, match="field 'v': a value of shape \\(3,\\)"):
        w.append("m", 0, {"a": 1.0, "v": [1.0, 2.0, 3.0]})
    with pytest.raises(TypeError, match="source: expected the checkpoint's path"):
        w.record_checkpoint(0, 5)
    with pytest.raises(TypeError, match="path: expected a run file's path"):
        Run.open(5)


def test_a_monitor_refuses_negative_and_text_steps():
    model, (x, y) = _model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ls.Monitor(model, F.cross_entropy, optimizer=opt, alarms=False) as mon:
        for bad, match in ((-3, "step must be >= 0"), ("3", "step must be an integer")):
            with pytest.raises(ValueError, match=match):
                mon.step(bad, batch=(x, y), loss=1.0)
        mon.step(0, batch=(x, y), loss=1.0)
        assert len(mon.run().steps("loss")) == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"alarms": "yes"}, "alarms must be True, False or a list of rules"),
    ({"taylor_guard": -1.0}, "taylor_guard must be a positive number"),
    ({"taylor_guard": math.inf}, "taylor_guard must be a positive number"),
])
def test_monitor_settings_are_checked_when_it_is_built(kwargs, match):
    model, batch = _model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        ls.Monitor(model, F.cross_entropy, optimizer=opt, probe=batch, **kwargs)


def test_a_non_finite_model_is_one_clear_error_in_every_curvature_function():
    model, (x, y) = _model_and_data()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    op = ls.Hessian(model, F.cross_entropy, (x, y))
    for call in (lambda: ls.top_eigenvalues(op, k=1),
                 lambda: ls.spectral_density(op, lanczos_steps=5, n_probes=1),
                 lambda: ls.hessian_trace(op),
                 lambda: ls.hessian_trace(op, "hutchinson", n_matvec=4),  # NaN, silently
                 lambda: ls.hessian_trace(op, "hutch++", n_matvec=6)):
        with pytest.raises(ValueError, match="a curvature product is not finite"):
            call()


def test_the_curvature_functions_name_what_they_expected():
    model, batch = _model_and_data()
    with pytest.raises(TypeError, match=re.escape("ls.Hessian(model, loss_fn, data)")):
        ls.top_eigenvalues(model, k=1)
    with pytest.raises(TypeError, match="MatrixOperator"):
        ls.hessian_trace(torch.eye(3))
    with pytest.raises(ValueError, match=re.escape("k must be an integer >= 1, got 1.5")):
        ls.top_eigenvalues(ls.Hessian(model, F.cross_entropy, batch), k=1.5)


def test_surface_and_representation_arguments():
    model, (x, y) = _model_and_data()
    with pytest.raises(ValueError, match="the batch has no samples"):
        surface.line(model, F.cross_entropy, (x[:0], y[:0]), steps=3, progress=False)
    with pytest.raises(ValueError, match="span must be a positive number, got \\(1, 2\\)"):
        surface.line(model, F.cross_entropy, (x, y), steps=3, span=(1, 2), progress=False)
    for block in (0, -1, 2.5):
        with pytest.raises(ValueError, match="block must be an integer >= 1"):
            LF.uniformity(torch.randn(30, 5), block=block)


def test_a_probe_the_model_cannot_take_is_named_in_the_failure():
    model, (x, y) = _model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="failed at step 0 on the probe"):
        with ls.Monitor(model, F.cross_entropy, optimizer=opt, alarms=False,
                        probe=(torch.randn(8, 5), y[:8]), metrics=["loss", "sentinels"]) as mon:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            mon.step(0, batch=(x, y), loss=loss)
    (failed,) = [f for f in mon.findings if f.rule == "metric_failed"]
    assert "a probe must be a batch the model takes" in failed.hint
    # a dict probe of other keys ({"feats", "target"}) was told none of the keys that work
    assert "{inputs, targets}, {x, y}, {image, label}" in failed.hint


def test_a_run_built_from_a_path_says_how_to_open_one(tmp_path):
    # it failed at the first read: "'str' object has no attribute 'table_paths'"
    with pytest.raises(TypeError, match=re.escape("landscape.Run.open('run.h5')")):
        Run("run.h5")
    with pytest.raises(TypeError, match=r"open a run file with landscape\.Run\.open"):
        Run(tmp_path / "run.h5")


@pytest.mark.parametrize(("call", "error", "match"), [
    # each raised from deep inside (params.py, isolation.py, pathlib), or only later
    (lambda m, d: ls.Hessian(lambda t: t, F.cross_entropy, d), TypeError,
     "Hessian: model must be a torch.nn.Module, got function"),
    (lambda m, d: ls.Hessian(m, "cross_entropy", d), TypeError,
     "Hessian: loss_fn must be callable, got str"),
    (lambda m, d: ls.GGN(m, F.cross_entropy, d, forward=5), TypeError,
     "GGN: forward must be callable"),
    (lambda m, d: ls.Hessian(m, F.cross_entropy, d, params=5), ValueError,
     "params: cannot select parameters with int"),
    (lambda m, d: RunWriter(5), TypeError, "path must be a file path"),
    (lambda m, d: ls.alarms.OnlineAlarms(rules=5), ValueError,
     "rules must be a list of Rule objects"),
    (lambda m, d: ls.at([]), ValueError, "at least one step"),
    (lambda m, d: ls.at([-1, 3]), ValueError, r"steps are >= 0"),
])
def test_mistakes_in_building_operators_writers_rules_and_schedules(call, error, match):
    model, data = _model_and_data()
    with pytest.raises(error, match=match):
        call(model, data)


def test_a_callback_given_no_path_says_so_when_built():
    pytest.importorskip("lightning")
    from landscape.integrations.lightning import LandscapeCallback

    with pytest.raises(TypeError, match="path must be a file path"):
        LandscapeCallback(5)  # it failed only when fit() started


def test_an_optimizer_of_another_model_is_warned_about():
    """The update metrics blamed a GradScaler, the recorded lr was the other model's."""
    model, _ = _model_and_data()
    other, _ = _model_and_data()
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="the optimizer holds none of the model's "
                                            "trainable parameters"):
        ls.Monitor(model, F.cross_entropy, optimizer=opt, warn=False).start().close()
