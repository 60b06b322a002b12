"""The framework-free helpers of landscape.integrations."""

from __future__ import annotations

import subprocess
import sys
from collections import namedtuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from landscape.integrations import (
    move_to_device,
    reaches,
    thin_metrics,
    thin_schedule,
    unwrap_optimizer,
)
from landscape.metrics import create
from landscape.schedules import Schedule, at, every, logspace, never, parse


class _Wrapper:
    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_importing_landscape_and_the_mirrors_pulls_in_no_dashboard_library():
    code = (
        "import sys, landscape, landscape.integrations.mirrors; "
        "bad = [m for m in ('tensorboard', 'torch.utils.tensorboard', 'wandb', 'mlflow', "
        "'tensorboardX') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_package_import_pulls_in_neither_framework():
    code = (
        "import sys, landscape.integrations as li; "
        "assert 'LandscapeCallback' in dir(li); "
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers') "
        "       if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@settings(max_examples=200, deadline=None)
@given(k=st.integers(1, 12), start=st.integers(0, 30), n=st.integers(1, 12))
def test_thinned_every_is_the_intersection_and_round_trips(k, start, n):
    original = every(k, start)
    thinned = thin_schedule(original, n)
    for s in range(400):
        assert thinned(s) == (original(s) and s % n == 0), s
    assert parse(str(thinned)) == thinned


def test_thinned_at_logspace_never_and_custom_schedules():
    assert thin_schedule(at([0, 3, 4, 8]), 4) == at([0, 4, 8])
    log = logspace(0, 1000, 12)
    assert thin_schedule(log, 2) == at(s for s in log.steps if s % 2 == 0)
    assert str(thin_schedule(never(), 3)) == "never()"

    class Odd(Schedule):
        def __call__(self, step):
            return step % 2 == 1

        def describe(self):
            return "odd"

    thinned = thin_schedule(Odd(), 3)
    assert [s for s in range(20) if thinned(s)] == [3, 9, 15]
    with pytest.raises(ValueError, match="every_n_steps"):
        thin_schedule(every(1), 0)


def test_thin_metrics_copies_and_leaves_the_callers_metrics_alone():
    mine = create("loss", schedule="every(3)")
    (copy,) = thin_metrics([mine], 2)
    assert str(copy.schedule) == "every(6)" and str(mine.schedule) == "every(3)"
    assert thin_metrics([mine], 1)[0] is mine


def test_unwrap_optimizer_reaches_the_torch_optimizer():
    opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    assert unwrap_optimizer(_Wrapper(_Wrapper(opt))) is opt
    assert unwrap_optimizer(opt) is opt and unwrap_optimizer(None) is None
    with pytest.raises(TypeError, match="optimizer"):
        unwrap_optimizer(object())


def test_move_to_device_keeps_containers():
    Pair = namedtuple("Pair", "x y")
    batch = {"a": (torch.zeros(1), [torch.ones(1)]), "b": Pair(torch.zeros(1), 3)}
    moved = move_to_device(batch, "meta")
    assert moved["a"][0].is_meta and moved["a"][1][0].is_meta
    assert isinstance(moved["b"], Pair) and moved["b"].x.is_meta and moved["b"].y == 3


def test_reaches_compares_severities():
    from landscape.findings import Finding

    warn = Finding(1, "r", "warning", "m", 1.0, 0.0, "msg")
    assert reaches([warn], "info") and reaches([warn], "warning")
    assert not reaches([warn], "error") and not reaches([warn], None)
    with pytest.raises(ValueError, match="severity"):
        reaches([warn], "fatal")


def test_a_resumed_run_emptied_by_mode_w_is_said_by_rank_zero_alone(monkeypatch):
    # every rank of a DDP job printed it (the framework audit)
    import warnings

    import landscape.integrations as integrations

    for rank, copies in ((0, 1), (1, 0)):
        monkeypatch.setattr(integrations._dist, "rank", lambda rank=rank: rank)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = integrations.resume_options({"mode": "w"}, "run.h5", 15)
        assert out == {"mode": "w"}
        assert sum("mode='w' empties" in str(w.message) for w in seen) == copies
