"""The memory plan's estimate against the measured peak of the run it plans (issue 16).

The peak is what the curvature functions report themselves (``peak_memory``, measured by
:class:`~landscape.curvature.memory.PeakMemory`: the resident set's high-water mark on
the CPU). Before the whole-batch product was measured (it was extrapolated from an eighth
and a quarter of the batch) and before :data:`~landscape.curvature.memory.CPU_MARGIN`,
these runs peaked above their plans: on the CIFAR-sized CNN of
``tests/benchmarks/bench_monitor.py`` a trace planned at 163 MiB peaked at 284 MiB.
The model here is a small CNN whose products take tens of megabytes, well above the
resident set's noise, at a few tenths of a second each.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape.curvature import Hessian, hessian_trace, spectral_density, top_eigenvalues
from landscape.curvature.memory import CPU_MARGIN, profile_memory

MB = 2**20


def _cnn_op() -> Hessian:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16 * 16, 10),
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    return Hessian(model, F.cross_entropy, (x, y))


RUNS = {
    "top_eigenvalues": lambda op, **kw: top_eigenvalues(op, k=2, max_matvec=12, **kw),
    "hessian_trace": lambda op, **kw: hessian_trace(op, "krylov", n_matvec=12, **kw),
    "spectral_density": lambda op, **kw: spectral_density(op, lanczos_steps=8, n_probes=2,
                                                          **kw),
}


# The resident set's high-water mark of one run varies by about a fifth between processes
# (allocator reuse, heap trimming). The plan is built to stay under its estimate (measured
# 0.55-0.82 of it on the CIFAR-sized CNN, 0.47-1.02 on this CNN: docs/curvature.md); a
# reading up to 20 % over is that noise, not a plan that runs low (before the fix the
# readings were 1.3-1.8x over).
RESIDENT_SET_NOISE = 1.2


def _peaks_within_plan(run, attempts: int = 3) -> tuple[object, list[float]]:
    """Run until a reading is within its plan, at most ``attempts`` times (fresh each).

    A micro-batched trace once read above 1.2x its plan in a parallel run of the curvature
    tests (the worker's heap as earlier tests left it), and passed on every rerun; a plan
    that runs low reads above it at every attempt. Returns the last result and the
    ratios read.
    """
    ratios: list[float] = []
    for _ in range(attempts):
        res = run()
        ratios.append(res.peak_memory / res.memory_plan.estimate)
        if 0 < res.peak_memory <= RESIDENT_SET_NOISE * res.memory_plan.estimate:
            break
    return res, ratios


@pytest.fixture
def cnn():
    """A fresh operator (no cached gradient graph) and its profile, per test."""
    op = _cnn_op()
    return op, profile_memory(op)


def test_the_profile_measures_the_whole_batch(cnn):
    op, prof = cnn
    assert set(prof.measured) == {64}  # measured, not extrapolated
    assert prof.margin == CPU_MARGIN
    # a product holds the graph of the batch: far above two parameter-sized vectors
    assert prof.measured[64] > 10 * 2 * op.dim * 4


@pytest.mark.parametrize("name", sorted(RUNS))
def test_whole_batch_plan_bounds_the_measured_peak(name):
    def run():
        op = _cnn_op()
        prof = profile_memory(op)
        res = RUNS[name](op, memory_budget=4 * 2**30, memory_profile=prof)
        assert res.memory_plan.microbatch_size is None and res.memory_plan.backend is None
        if (res.memory_plan.probe_batch or 1) > 1:  # vmapped probes: measured two at once
            assert 64 in prof.pairs
        return res

    res, ratios = _peaks_within_plan(run)
    assert 0 < res.peak_memory <= RESIDENT_SET_NOISE * res.memory_plan.estimate, ratios


@pytest.mark.parametrize("name", sorted(RUNS))
def test_microbatch_plan_bounds_the_measured_peak(name):
    def run():
        op = _cnn_op()
        prof = profile_memory(op)
        budget = 0.6 * prof.product(64)  # the whole batch does not fit: micro-batches must
        res = RUNS[name](op, memory_budget=budget, memory_profile=prof)
        plan = res.memory_plan
        assert plan.microbatch_size is not None and plan.microbatch_size < 64
        assert plan.microbatch_size in prof.measured  # measured before it was chosen
        assert plan.estimate <= budget
        return res

    res, ratios = _peaks_within_plan(run)
    assert 0 < res.peak_memory <= RESIDENT_SET_NOISE * res.memory_plan.estimate, ratios


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_generous_budget_changes_nothing(cnn, name):
    op, prof = cnn
    free = RUNS[name](op)
    planned = RUNS[name](op, memory_budget=4 * 2**30, memory_profile=prof)
    if name == "top_eigenvalues":
        assert torch.equal(planned.values, free.values)
        assert planned.n_matvec == free.n_matvec
    else:  # the same probes, grouped differently: float32 products round differently
        assert planned.n_matvec == free.n_matvec
        if name == "hessian_trace":
            assert planned.value == pytest.approx(free.value, rel=1e-6)
        else:
            assert torch.allclose(planned.nodes, free.nodes, rtol=1e-5, atol=1e-6,
                                  equal_nan=True)


def test_a_rank_holding_more_samples_than_the_fewest_keeps_its_own_slope(monkeypatch):
    """Under torch.distributed the profile's choices follow the fewest samples any rank
    holds (least_rows), but the whole-batch product is measured on the rank's own: the
    slope divided that peak of 64 samples by 16 - 2 (5.85 instead of 1.27 MB a sample)."""
    from landscape.curvature import _profile

    def peak(op, size, what, whole=False, rows=1):  # 1 MB and 0.1 MB a sample: the
        samples = _profile.batch_rows(op) if size is None else size  # resident set's
        return 1e6 + 1e5 * samples  # peaks vary by tens of MB under load

    monkeypatch.setattr(_profile, "_probe_peak", peak)
    alone = profile_memory(_cnn_op())
    monkeypatch.setattr(_profile, "least_rows", lambda op, rows: 16)  # another rank: 16
    beside = profile_memory(_cnn_op())
    assert (alone.rows, beside.rows) == (64, 16)
    assert alone.product_slope == pytest.approx(1e5)
    assert beside.product_slope == pytest.approx(1e5)
