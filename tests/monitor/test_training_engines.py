"""Training-loop machinery around the monitor: autocast, 16-bit models, checkpointing.

Each test is a setup a training loop uses, checked against the same measurement without it.
"""

import contextlib
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape as ls
from landscape import Monitor


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 5))


def _batches(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(24, 12, generator=g), torch.randint(0, 5, (24,), generator=g))
            for _ in range(n)]


def _rows(run):
    """Every numeric field of every metric but the measured memory (the machine's)."""
    return {(m, f): run.series(m, f)[1] for m in run.metrics() for f in run.fields(m)
            if not run.fields(m)[f].is_string and f != "peak_memory"}


class _OwnAutocast(nn.Module):
    """An MLP whose forward opens its own bfloat16 autocast block."""

    def __init__(self):
        super().__init__()
        self.net = _mlp()

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.net(x).float()


def _autocast_run(inside, metrics=None, own_block=False, enabled=True):
    """An MLP trained under CPU bfloat16 autocast, the monitor called inside or after it."""
    model = _OwnAutocast() if own_block else _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = _batches()
    kw = {} if metrics is None else {"metrics": metrics, "probe": data[0]}
    with Monitor(model, F.cross_entropy, None, optimizer=opt, warn=False, **kw) as mon:
        for step, (x, y) in enumerate(data):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if inside:
                    mon.step(step, batch=(x, y), loss=loss)
            if not inside:
                mon.step(step, batch=(x, y), loss=loss)
        rows = _rows(mon.run())
    return model, rows


@pytest.mark.parametrize(("sharpness", "own_block", "enabled"), [
    (False, False, True), (True, False, True), (False, True, True), (False, True, False)],
    ids=["default", "sharpness", "model-opens-autocast", "loop-block-disabled"])
def test_the_monitor_called_inside_an_autocast_block_records_what_it_records_after_it(
        sharpness, own_block, enabled):
    # inside the block the sentinels read the bfloat16 copies autocast cached before the
    # optimizer step (one step late), and the curvature ran in bfloat16; a model that opens
    # its own autocast block in forward read those copies through it, also inside a loop's
    # disabled block (torch.autocast(..., enabled=use_amp))
    metrics = [ls.metrics.Sharpness(schedule=ls.every(2))] if sharpness else None
    after_model, after = _autocast_run(False, metrics, own_block, enabled)
    inside_model, inside = _autocast_run(True, metrics, own_block, enabled)
    assert after.keys() == inside.keys()
    for key, values in after.items():
        np.testing.assert_array_equal(inside[key], values, err_msg=str(key))
    for a, b in zip(after_model.parameters(), inside_model.parameters()):
        assert torch.equal(a, b)
    measured = ("sharpness", "lambda_max") if sharpness else ("sentinels", "probe_loss")
    assert np.isfinite(after[measured][-2:]).all()


def test_a_measurement_inside_autocast_runs_in_the_models_dtype_and_leaves_autocast_on():
    model = _mlp()
    x, y = _batches(1)[0]
    op = ls.Hessian(model, F.cross_entropy, (x, y))
    outside = ls.top_eigenvalues(op, k=2, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ls.top_eigenvalues(op, k=2, seed=0)
        assert torch.is_autocast_enabled("cpu")
        assert model(x).dtype == torch.bfloat16  # the caller's block is as it was
    np.testing.assert_array_equal(inside.values.numpy(), outside.values.numpy())
    assert inside.n_matvec == outside.n_matvec


def test_autocast_off_enters_nothing_where_autocast_is_off(monkeypatch):
    from landscape import isolation

    entered = []
    real = torch.autocast

    def spy(*args, **kwargs):
        entered.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "autocast", spy)
    with isolation.autocast_off({"cpu"}):
        pass
    assert entered == []  # leaving an outermost autocast block would clear its cache
    with contextlib.ExitStack() as stack:
        stack.enter_context(real("cpu", dtype=torch.bfloat16))
        with isolation.autocast_off({"cpu"}):
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")
    assert len(entered) == 1


class _Checkpointed(nn.Module):
    """An MLP whose middle block runs under activation checkpointing."""

    def __init__(self, reentrant):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.head = nn.Linear(12, 16), nn.Linear(16, 5)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.head(checkpoint(self.block, self.inp(x), use_reentrant=self.reentrant))


@pytest.mark.parametrize("metrics", [None, ["sharpness"]], ids=["default", "sharpness"])
def test_a_reentrant_checkpoint_raises_no_torch_note_from_the_monitors_passes(metrics):
    # "None of the inputs have requires_grad=True" concerns the monitor's no-grad forward
    # passes (and the first-order products' losses), not the user's training
    model = _Checkpointed(reentrant=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = _batches(4)
    kw = {} if metrics is None else {"metrics": metrics, "probe": data[0]}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with Monitor(model, F.cross_entropy, None, optimizer=opt, warn=False, **kw) as mon:
            for step, (x, y) in enumerate(data):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                warnings.warn("the loop's own note", stacklevel=1)  # still shown
                mon.step(step, batch=(x, y), loss=loss)
            rows = mon.run().series("sentinels" if metrics is None else "sharpness",
                                    "probe_loss" if metrics is None else "lambda_max")[1]
    notes = [str(w.message) for w in seen]
    assert not [n for n in notes if "requires_grad" in n], notes
    assert notes.count("the loop's own note") == 4
    assert np.isfinite(rows).all()


def test_a_weight_norm_layer_raises_no_vmap_note_from_the_batched_products():
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(12, 16)), nn.Tanh(),
                          nn.Linear(16, 5))
    op = ls.Hessian(model, F.cross_entropy, _batches(1)[0])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trace = ls.hessian_trace(op, n_matvec=8)
    assert not [w for w in seen if "batching rule" in str(w.message)]
    assert math.isfinite(trace.value)


SHOWN_ONCE = """
import warnings, torch, torch.nn.functional as F
import landscape as ls
from tests.monitor.test_training_engines import _Checkpointed, _batches
model = _Checkpointed(reentrant=True)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
data = _batches(4)
mon = ls.Monitor(model, F.cross_entropy, None, optimizer=opt, warn=False,
                 metrics=["sharpness"], probe=data[0])
for step, (x, y) in enumerate(data):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
    warnings.warn("the loop's own note")
    mon.step(step, batch=(x, y), loss=loss)
mon.close()
with torch.no_grad():  # the user's own evaluation: torch's note is the user's to see
    model(x)
"""


def test_the_loops_own_warnings_are_shown_once_under_pythons_default_filters():
    # a warnings.catch_warnings() inside a measurement resets Python's once-per-location
    # registry: the loop's warning came back after every measurement (here the
    # first-order products a reentrant checkpoint takes)
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", SHOWN_ONCE], cwd=root, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("UserWarning: the loop's own note") == 1, done.stderr[-2000:]
    # the measurements' own notes were ignored, not marked as shown at torch's line
    assert done.stderr.count("UserWarning: None of the inputs have requires_grad") == 1


DEFAULT_SHOWN_ONCE = """
import warnings, torch, torch.nn.functional as F
import landscape as ls
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
with ls.Monitor(model, F.cross_entropy, None, optimizer=opt, warn=False) as mon:
    for step in range(10):
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(); loss.backward(); opt.step()
        warnings.warn("the loop's own note")
        mon.step(step, batch=(x, y), loss=loss, outputs=out)
"""


def test_the_default_monitor_shows_the_loops_own_warning_once():
    """The loss metric's per-sample losses (a loss spike's outliers) ran the loss function
    inside catch_warnings(), which reset the registry: a user's warning of the loop came
    back 3 times in 10 steps with the default monitor (own-diff review)."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", DEFAULT_SHOWN_ONCE], cwd=root,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("UserWarning: the loop's own note") == 1, done.stderr[-2000:]


def test_the_notes_are_ignored_also_where_warnings_are_errors():
    # hidden at showwarning, the note was raised under an "error" filter (pytest -W
    # error) and the first-order products failed
    model = _Checkpointed(reentrant=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = _batches(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with Monitor(model, F.cross_entropy, None, optimizer=opt, warn=False,
                     metrics=["sharpness"], probe=data[0]) as mon:
            for step, (x, y) in enumerate(data):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(step, batch=(x, y), loss=loss)
            assert mon.findings == []
            assert np.isfinite(mon.run().series("sharpness", "lambda_max")[1]).all()
        with pytest.raises(UserWarning, match="None of the inputs"):  # the user's own
            with torch.no_grad():
                model(x)


def _bf16_run(probe, loss_fn=F.cross_entropy, data=None, metrics=None):
    """A bfloat16 MLP whose loop casts its inputs to bfloat16 (targets as they come)."""
    model = _mlp().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = data or [(x.to(torch.bfloat16), y) for x, y in _batches(4)]
    metrics = metrics or ["sentinels", ls.metrics.Sharpness(schedule=ls.every(2))]
    with Monitor(model, loss_fn, None, optimizer=opt, warn=False, probe=probe,
                 metrics=metrics) as mon:
        for step, (x, y) in enumerate(data):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x, y), loss=loss)
        return _rows(mon.run()), [f.rule for f in mon.findings], mon.probe


def test_a_float32_probe_of_a_bfloat16_model_is_cast_as_the_loop_casts_its_batches(caplog):
    # every probe metric failed on "mat1 and mat2 must have the same dtype"
    x, y = _batches(1, seed=7)[0]
    with caplog.at_level("INFO", logger="landscape"):
        rows, findings, _ = _bf16_run((x, y))
    assert "the probe's float32 input tensors are cast to the model's bfloat16" in caplog.text
    same, same_findings, _ = _bf16_run((x.to(torch.bfloat16), y))
    assert findings == same_findings == []
    for key, values in same.items():
        np.testing.assert_array_equal(rows[key], values, err_msg=str(key))
    assert np.isfinite(rows[("sentinels", "probe_loss")]).all()
    assert np.isfinite(rows[("sharpness", "lambda_max")]).all()
    # a probe given as a list of batches: each of them
    _, findings, probe = _bf16_run([(x[:12], y[:12]), (x[12:], y[12:])])
    assert findings == [] and [b[0].dtype for b in probe] == [torch.bfloat16] * 2


def test_float_targets_the_loop_keeps_in_float32_stay_float32():
    # a regression loop that casts only its inputs and upcasts the output for the loss
    def loss_fn(out, y):
        return F.mse_loss(out.float(), y)

    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(24, 12, generator=g).to(torch.bfloat16),
             300 + torch.randn(24, 5, generator=g)) for _ in range(3)]
    probe = (torch.randn(24, 12, generator=g), 300 + torch.randn(24, 5, generator=g))
    _, findings, kept = _bf16_run(probe, loss_fn, data,
                                  [ls.metrics.Sharpness(schedule=ls.every(2))])
    assert "metric_failed" not in findings
    assert kept[0].dtype == torch.bfloat16
    assert kept[1] is probe[1]  # not rounded to bfloat16 (300.0 + noise loses its digits)
    # a dict pair: its target key is a target too (it was rounded at the start, then cast
    # back to float32 at the first batch without its digits)
    _, findings, kept = _bf16_run({"x": probe[0], "y": probe[1]}, loss_fn, data,
                                  [ls.metrics.Sharpness(schedule=ls.every(2))])
    assert "metric_failed" not in findings
    assert kept["x"].dtype == torch.bfloat16 and kept["y"] is probe[1]


def test_the_probe_is_cast_before_the_taylor_guard_or_a_step_without_a_batch_reads_it():
    # the guard reads the probe inside the first optimizer step, before step(batch=): it
    # raised "mat1 and mat2 must have the same dtype" out of opt.step(); a loop that never
    # passes batch= had every probe metric fail
    x, y = _batches(1, seed=7)[0]
    for kw, with_batch in (({"taylor_guard": 1.0}, True), ({}, False)):
        model = _mlp().to(torch.bfloat16)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with Monitor(model, F.cross_entropy, None, optimizer=opt, warn=False, probe=(x, y),
                     metrics=["sentinels"], **kw) as mon:
            for step, (bx, by) in enumerate(_batches(3)):
                loss = F.cross_entropy(model(bx.to(torch.bfloat16)), by)
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(step, batch=(bx.to(torch.bfloat16), by) if with_batch else None,
                         loss=loss)
            assert mon.findings == []
            assert np.isfinite(mon.run().series("sentinels", "probe_loss")[1]).all()


def test_a_dict_probe_is_matched_to_the_batch_by_key():
    # matched by order, the target of {"y", "x"} took the inputs' bfloat16 (298.46 -> 298)
    from landscape.batches import cast_like

    x, y = torch.randn(4, 3), 300 + torch.randn(4, 2)
    probe = {"y": y, "x": x}
    cast, dtypes = cast_like(probe, {"x": x.to(torch.bfloat16), "y": y})
    assert list(cast) == ["y", "x"] and cast["y"] is y
    assert cast["x"].dtype == torch.bfloat16 and dtypes == [torch.float32]
    assert cast_like(probe, {"x": x, "z": y}) == (probe, [])  # other keys: as given


def test_a_probe_laid_out_unlike_the_batches_is_left_as_given():
    x, y = _batches(1)[0]
    probe = {"x": x, "y": y, "extra": torch.ones(3)}
    model = _mlp()
    mon = Monitor(model, F.cross_entropy, None, probe=probe, warn=False, metrics=["loss"])
    with mon:
        mon.step(0, batch=(x.double(), y), loss=1.0)
        assert mon.probe is probe


@pytest.mark.parametrize("to_none", [True, False], ids=["set_to_none", "zeros"])
def test_after_zero_grad_the_given_norm_tells_a_non_finite_gradient(to_none):
    # accelerate's loop zeroes the gradients inside accumulate() and calls the monitor
    # after, with what clip_grad_norm_ returned: nonfinite/grad was NaN at every step (and
    # 0.0 where zero_grad left zeros)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _batches(1)[0]
    flags = []
    with Monitor(model, F.cross_entropy, None, optimizer=opt, warn=False,
                 metrics=["nonfinite", "update"]) as mon:
        for step, poison in enumerate([False, True]):
            loss = F.cross_entropy(model(x), y) * (math.inf if poison else 1.0)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if not poison:
                opt.step()
            opt.zero_grad(set_to_none=to_none)
            mon.step(step, batch=(x, y), loss=loss, grad_norm=norm)
        flags = mon.run().series("nonfinite", "grad")[1].tolist()
        # the skipped step's update is no failure either (the inf loss is an alarm)
        assert [f.rule for f in mon.findings if f.rule == "metric_failed"] == []
    assert flags == [0.0, 1.0]


def test_an_infinite_given_norm_of_float16_gradients_is_not_known():
    from landscape.metrics.training import _given_norm_flag

    half, single = [torch.zeros(2, dtype=torch.float16)], [torch.zeros(2)]
    assert _given_norm_flag(math.inf, single) == 1.0 and _given_norm_flag(math.nan, half) == 1.0
    assert math.isnan(_given_norm_flag(math.inf, half))  # past 65504 with finite entries
    assert _given_norm_flag(3.0, half) == 0.0


def test_the_sentinels_lr_is_the_rate_of_the_step_they_follow():
    # a scheduler stepped between optimizer.step() and the call (Lightning steps its
    # interval="step" schedulers there) had set the next step's rate: one step ahead
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    used = []
    with Monitor(model, F.cross_entropy, None, optimizer=opt, warn=False,
                 metrics=["sentinels"]) as mon:
        for step, (x, y) in enumerate(_batches(6)):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            used.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            mon.step(step, batch=(x, y), loss=loss)
        recorded = mon.run().series("sentinels", "lr")[1].tolist()
    assert used == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    assert recorded == pytest.approx(used)


def test_a_batchs_inputs_are_its_first_item_or_a_dicts_non_target_entries():
    from landscape.metrics.batch_parts import inputs_in

    x, y, w = torch.randn(4, 3), 300 + torch.randn(4, 2), torch.rand(4)
    out, cast = inputs_in((x, y, w), torch.bfloat16)  # sample weights stay as given
    assert out[0].dtype == torch.bfloat16 and out[1] is y and out[2] is w
    assert cast == [torch.float32]
    out, _ = inputs_in({"x": x, "y": y}, torch.bfloat16)
    assert out["x"].dtype == torch.bfloat16 and out["y"] is y
    out, _ = inputs_in({"pixel_values": x, "labels": y}, torch.bfloat16)
    assert out["pixel_values"].dtype == torch.bfloat16 and out["labels"] is y
    assert inputs_in((x.bfloat16(), y), torch.bfloat16)[1] == []


JVP_FIRST = """
import torch, torch.nn.functional as F, landscape as ls
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
with ls.Monitor(model, F.cross_entropy, optimizer=opt, metrics=["taylor_radius"],
                warn=False, strict=True) as mon:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
    mon.step(0, batch=(x, y), loss=loss)
"""


def test_the_first_jvp_of_a_process_shows_none_of_torchs_own_deprecations():
    # the first forward-mode JVP loads torch's JVP decompositions, which call
    # torch.jit.script: 18 DeprecationWarnings under pytest (the recipes audit)
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-W", "always", "-c", JVP_FIRST], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch.jit.script" not in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("max_iter", [20, 1])
def test_lbfgs_steps_are_not_read_as_taylor_steps(max_iter):
    """One L-BFGS step runs up to max_iter line-searched iterations: its update is no
    learning-rate step, and its Taylor ratio (r = 8.4 on the first step of this healthy
    run) raised an error-level taylor_ratio finding. One iteration with a line search
    (r up to 2.1) is sized by the search too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 8, generator=g)
    y = (x @ torch.randn(8, 4, generator=g)).argmax(1)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=max_iter,
                            line_search_fn="strong_wolfe")
    metrics = ls.metrics.preset("standard", top_eigenvalues=None, hessian_trace=None,
                                sharpness=None, spectral_alignment=None, representation=None,
                                collapse=None, taylor_radius="every(1)")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with Monitor(model, F.cross_entropy, optimizer=opt, probe=(x, y),
                     metrics=metrics) as mon:
            for step in range(3):
                def closure():
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                loss = opt.step(closure)
                mon.step(step, batch=(x, y), loss=loss)
            run = mon.run()
    assert [f.severity for f in mon.findings if f.severity != "info"] == []
    assert not [w for w in seen if issubclass(w.category, ls.InstabilityWarning)]
    assert np.isnan(run.series("taylor_radius", "r")[1]).all()
    said = [f for f in mon.findings if f.rule == "metric_failed"]
    assert len(said) == 1 and "line search" in said[0].message
