"""Training-loop machinery around the monitor: autocast, 16-bit models, checkpointing.

Each test is a setup a training loop uses, checked against the same measurement without it.
"""

import contextlib

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


def _autocast_run(inside, metrics=None):
    """An MLP trained under CPU bfloat16 autocast, the monitor called inside or after it."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = _batches()
    kw = {} if metrics is None else {"metrics": metrics, "probe": data[0]}
    with Monitor(model, F.cross_entropy, None, optimizer=opt, warn=False, **kw) as mon:
        for step, (x, y) in enumerate(data):
            with torch.autocast("cpu", dtype=torch.bfloat16):
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


@pytest.mark.parametrize("sharpness", [False, True], ids=["default", "sharpness"])
def test_the_monitor_called_inside_an_autocast_block_records_what_it_records_after_it(
        sharpness):
    # inside the block the sentinels read the bfloat16 copies autocast cached before the
    # optimizer step (one step late), and the curvature ran in bfloat16
    metrics = [ls.metrics.Sharpness(schedule=ls.every(2))] if sharpness else None
    after_model, after = _autocast_run(False, metrics)
    inside_model, inside = _autocast_run(True, metrics)
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
