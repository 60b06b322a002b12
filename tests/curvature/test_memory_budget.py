"""Memory budgets of the trace and the density, the ``"auto"`` budget, the default probe batch.

Plans are checked on hand-made :class:`MemoryProfile` values (no measured memory in the
assertions: the resident set is noisy), results against the unbudgeted runs and, for the
trace, against the dense float64 Hessian.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from landscape import LandscapeError
from landscape.curvature import (
    Hessian,
    MatrixOperator,
    hessian_trace,
    preconditioned,
    spectral_density,
    top_eigenvalues,
)
from landscape.curvature import trace as trace_module
from landscape.curvature.memory import (
    BUDGET_FLOOR,
    MemoryBudgetError,
    MemoryProfile,
    apply_plan,
    check_budget,
    parse_budget,
    plan_probes,
    profile_memory,
)
from tests.curvature._dense import dense_hessian
from tests.models import classification_data, mlp

METHODS = ["hutchinson", "hutch++", "krylov"]


def _model_op(dtype=torch.float64, n=24):
    model = mlp(d_in=5, hidden=7, d_out=3, depth=3, seed=1).to(dtype)
    x, y = classification_data(n=n, d_in=5, n_classes=3, seed=2)
    return model, (x.to(dtype), y), Hessian(model, F.cross_entropy, (x.to(dtype), y))


def _profile(op, step=1e6, intercept=1e5, slope=1e4, rows=24):
    return MemoryProfile(step, intercept, slope, rows, None, op.dim * 8)


def test_auto_budget_is_one_step_with_a_floor():
    assert parse_budget("auto", 10.0) == BUDGET_FLOOR
    assert parse_budget("auto", 4e9) == 4e9
    assert parse_budget(" AUTO ", None) == BUDGET_FLOOR
    assert parse_budget("auto", math.nan) == BUDGET_FLOOR
    check_budget("auto")
    check_budget(None)
    check_budget("2x step")
    for bad in ("a lot", 0, -5, "x step", True, [1e9]):
        with pytest.raises(ValueError):
            check_budget(bad)


@pytest.mark.parametrize("method", METHODS)
def test_trace_probe_batches_never_change_the_probes(method):
    _, _, op = _model_op()
    whole = hessian_trace(op, method, n_matvec=21, seed=3, probe_batch=21)
    for batch in (1, 2, 5):
        part = hessian_trace(op, method, n_matvec=21, seed=3, probe_batch=batch)
        assert part.value == pytest.approx(whole.value, rel=1e-12)
        assert torch.allclose(part.samples, whole.samples, rtol=1e-10, atol=1e-14)
        assert part.probe_batch == batch and part.n_matvec == 21


def test_trace_probes_are_unbiased_against_the_dense_hessian():
    model, data, op = _model_op()
    truth = float(torch.trace(dense_hessian(model, F.cross_entropy, data)))
    # the Krylov space of n_matvec // 2 >= dim steps is the whole space: the trace is exact
    res = hessian_trace(op, "krylov", n_matvec=2 * op.dim + 2, probe_batch=3,
                        memory_budget="auto")
    assert res.value == pytest.approx(truth, rel=1e-8)


def test_default_probe_batch_is_sized_from_the_first_product(monkeypatch):
    _, _, op = _model_op()
    small = hessian_trace(op, "hutchinson", n_matvec=12)  # tiny products: all at once
    assert small.probe_batch == 11  # the first probe alone, then the other eleven
    monkeypatch.setattr(trace_module, "BUDGET_FLOOR", 1)  # every product "large"
    one = hessian_trace(op, "hutchinson", n_matvec=12)
    assert one.probe_batch == 1
    assert one.value == pytest.approx(small.value, rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_budgeted_trace_equals_the_unbudgeted_one(method):
    _, _, op = _model_op()
    free = hessian_trace(op, method, n_matvec=21, seed=3, probe_batch=21)
    fixed, per_probe, most = trace_module.trace_memory(op, method, 21)
    prof = _profile(op)
    one_probe = fixed + per_probe + prof.product(24)
    for budget, batch in ((10**12, most), (one_probe, 1), (one_probe + per_probe
                                                            + prof.product(24), 2)):
        res = hessian_trace(op, method, n_matvec=21, seed=3, memory_budget=budget,
                            memory_profile=prof)
        assert res.memory_plan.probe_batch == batch and res.probe_batch == batch
        assert res.memory_plan.estimate <= budget
        assert res.value == pytest.approx(free.value, rel=1e-12)
        assert res.n_matvec == 21


def test_probe_plan_choices_on_a_fake_budget():
    _, _, op = _model_op()
    prof = _profile(op, step=5e4, intercept=6e4, slope=1e4, rows=24)
    kw = dict(n_probes=10, fixed_bytes=1000.0, probe_bytes=100.0, profile=prof)
    whole = prof.product(24)  # 300,000 bytes
    plan = plan_probes(op, budget=1000 + 3 * (100 + whole) + 5, **kw)
    assert (plan.probe_batch, plan.microbatch_size, plan.backend) == (3, None, None)
    # below one probe on whole batches: the largest micro-batch that fits one probe
    plan = plan_probes(op, budget=1000 + 100 + prof.product(6) + 1, **kw)
    assert plan.microbatch_size == 6 and plan.probe_batch == 1
    # below a product on one sample: the first-order product (one step's peak)
    plan = plan_probes(op, budget=1000 + 100 + 5e4, **kw)
    assert plan.backend == "first_order" and plan.probe_batch == 1
    with pytest.raises(MemoryBudgetError) as err:
        plan_probes(op, budget=2000, what="hessian_trace (krylov)", **kw)
    msg = str(err.value)
    assert isinstance(err.value, LandscapeError) and "\n" not in msg
    assert msg.startswith("memory_budget: hessian_trace (krylov) needs at least")
    # "x step" and "auto" read the profile's step
    assert plan_probes(op, budget="2x step", **kw).budget == 1e5
    assert plan_probes(op, budget="auto", **kw).budget == BUDGET_FLOOR
    # no budget: nothing measured, nothing changed
    free = plan_probes(op, budget=None, n_probes=10, fixed_bytes=0.0, probe_bytes=1.0)
    assert free.probe_batch is None and free.microbatch_size is None


def test_trace_refuses_in_one_line():
    op = MatrixOperator(torch.eye(50, dtype=torch.float64))
    with pytest.raises(MemoryBudgetError) as err:
        hessian_trace(op, "krylov", n_matvec=20, memory_budget=50 * 8)
    assert "\n" not in str(err.value) and "hessian_trace (krylov)" in str(err.value)
    assert "on whole batches" in str(err.value) and "of whole" not in str(err.value)
    with pytest.raises(MemoryBudgetError, match="bytes"):
        hessian_trace(op, "krylov", n_matvec=20, memory_budget="1x step")
    # an explicit matrix has no step: "auto" is the floor, which fits
    auto = hessian_trace(op, "krylov", n_matvec=20, memory_budget="auto")
    assert auto.value == hessian_trace(op, "krylov", n_matvec=20).value


def test_budgeted_density_equals_the_unbudgeted_one():
    _, _, op = _model_op()
    free = spectral_density(op, lanczos_steps=12, n_probes=4)
    prof = _profile(op)
    fixed = 4 * op.dim * 8
    per = (12 + 4) * op.dim * 8 + prof.product(24)
    for budget, group in ((10**12, 4), (fixed + per, 1), (fixed + 2 * per + 1, 2)):
        res = spectral_density(op, lanczos_steps=12, n_probes=4, memory_budget=budget,
                               memory_profile=prof)
        assert res.probe_batch == group == res.memory_plan.probe_batch
        assert res.n_matvec == free.n_matvec and res.peak_memory >= 0
        mask = free.valid
        assert torch.equal(mask, res.valid)
        assert torch.allclose(res.nodes[mask], free.nodes[mask], rtol=1e-10, atol=1e-12)
        assert torch.allclose(res.weights, free.weights, rtol=1e-10, atol=1e-14)
    with pytest.raises(MemoryBudgetError, match="spectral_density"):
        spectral_density(op, lanczos_steps=12, n_probes=4, memory_budget=fixed,
                         memory_profile=prof)
    with pytest.raises(ValueError, match="probe_batch"):
        spectral_density(op, lanczos_steps=12, n_probes=4, probe_batch=0)


def test_a_first_order_plan_measures_that_product_once(monkeypatch):
    """With a measured profile the first-order product is measured (once), not one step."""
    from landscape.curvature import _profile as profiles
    from landscape.curvature import memory

    _, _, op = _model_op()
    prof = _profile(op, step=5e4, intercept=6e4, slope=1e4, rows=24)
    prof.measured[24] = prof.product_intercept + 24 * prof.product_slope  # "measured"
    calls = []

    def fake_peak(model_op, size, what, whole=False, rows=1):
        if what != "first_order":
            return 1e9  # no micro-batch size fits
        calls.append(size)
        return 8e4  # above the step: the product's own vectors

    monkeypatch.setattr(profiles, "_probe_peak", fake_peak)
    kw = dict(n_probes=10, fixed_bytes=1000.0, probe_bytes=100.0, profile=prof)
    plan = plan_probes(op, budget=1000 + 100 + 8e4, **kw)
    assert plan.backend == "first_order" and plan.product_bytes == 8e4
    assert plan.estimate == 1000 + 100 + 8e4
    with pytest.raises(MemoryBudgetError):  # one step's estimate would have passed it
        plan_probes(op, budget=1000 + 100 + 5e4 + 1, **kw)
    eig = memory.plan_eigen(op, budget=8e4 + 20 * op.dim * 8, basis_vectors=30,
                            least_basis=3, extra_vectors=9, profile=prof)
    assert eig.backend == "first_order" and eig.product_bytes == 8e4
    assert calls == [None]  # measured once on the whole batch, kept in the profile
    assert prof.first_order == {24: 8e4}


def test_micro_batched_plan_gives_the_same_trace():
    _, _, op = _model_op()
    free = hessian_trace(op, "krylov", n_matvec=12, seed=1, probe_batch=6)
    prof = _profile(op, intercept=0.0, slope=1e5, rows=24)
    fixed, per_probe, _ = trace_module.trace_memory(op, "krylov", 12)
    budget = fixed + per_probe + prof.product(6)  # one probe on micro-batches of 6
    res = hessian_trace(op, "krylov", n_matvec=12, seed=1, memory_budget=budget,
                        memory_profile=prof)
    assert res.memory_plan.microbatch_size == 6 and res.probe_batch == 1
    assert res.value == pytest.approx(free.value, rel=1e-10)
    assert op.microbatch_size is None and op.n_matvec >= res.n_matvec


def test_profile_of_a_preconditioned_operator_measures_its_base():
    _, _, op = _model_op(n=16)
    pre = preconditioned(op, [torch.full(s, 4.0, dtype=torch.float64) for s in op.shapes])
    prof = profile_memory(pre, step_bytes=1e6)
    assert prof.rows == 16 and prof.step_bytes == 1e6
    assert prof.product_intercept >= 2 * op.dim * 8  # the gradient and the result
    plan = plan_probes(pre, budget=10**12, n_probes=2, fixed_bytes=0.0, probe_bytes=1.0,
                       profile=dataclasses_replace(prof, microbatch_size=None))
    assert apply_plan(pre, plan) is pre
    small = apply_plan(pre, dataclasses_replace(plan, microbatch_size=4))
    assert small is not pre and small.base.microbatch_size == 4
    v = [torch.ones(s, dtype=torch.float64) for s in op.shapes]
    assert all(torch.allclose(a, b, rtol=1e-10)
               for a, b in zip(small.matvec(v), pre.matvec(v)))
    res = top_eigenvalues(pre, k=1, tol=1e-8, memory_budget="auto", memory_profile=prof)
    assert res.memory_plan.budget == BUDGET_FLOOR and res.memory_plan.max_basis is None


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def _padded_lm():
    """A token-mean loss over sequences of different lengths (padding ignored)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 11)).double()
    ids, tgt = torch.randint(0, 11, (24, 9)), torch.randint(0, 11, (24, 9))
    for i in range(24):
        tgt[i, 1 + (i * 5) % 9:] = -100

    def token_ce(out, t):
        return F.cross_entropy(out.reshape(-1, 11), t.reshape(-1), ignore_index=-100)

    return model, token_ce, (ids, tgt)


def test_a_loss_that_is_no_mean_over_the_samples_is_never_cut_silently():
    # micro-batches weighted by sample counts give another operator for a summed loss or a
    # token mean over sequences of different lengths: refused with explicit micro-batches,
    # never planned by a budget, refused when a hand-made profile's plan asks for them
    model, token_ce, batch = _padded_lm()
    with pytest.raises(ValueError, match="not a mean over what the weights count"):
        Hessian(model, token_ce, batch, microbatch_size=8)

    def summed(out, y):
        return F.cross_entropy(out, y, reduction="sum")

    cls, data, _ = _model_op()
    with pytest.raises(ValueError, match="not a mean over what the weights count"):
        Hessian(cls, summed, data, microbatch_size=8)
    # a sizer that counts the tokens makes the pieces add up: the dense truth
    tokens = Hessian(model, token_ce, batch, microbatch_size=8,
                     batch_size=lambda b: int((b[1] != -100).sum()))
    truth = dense_hessian(model, token_ce, batch)
    assert torch.allclose(tokens.to_dense(), truth, rtol=1e-9, atol=1e-12)
    # the planners' profile says it cannot be cut; a per-sample mean can
    op = Hessian(model, token_ce, batch)
    assert profile_memory(op, step_bytes=1e6).microbatchable is False
    assert profile_memory(_model_op()[2], step_bytes=1e6).microbatchable is True
    prof = _profile(op, intercept=0.0, slope=1e5, rows=24)  # hand-made: never looked
    fixed, per_probe, _ = trace_module.trace_memory(op, "krylov", 12)
    with pytest.raises(MemoryBudgetError, match="no micro-batches here: microbatch_size"):
        hessian_trace(op, "krylov", n_matvec=12, memory_profile=prof,
                      memory_budget=fixed + per_probe + prof.product(6))
    assert op.n_matvec == 0


def test_the_micro_batch_check_stays_within_two_micro_batches_and_16_bit_rounding():
    # it ran the whole batch forward (what micro-batches exist to avoid), refused valid
    # bf16/fp16 models on their rounding, and a model whose eval forward differs
    seen = []
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    handle = model.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[0]))
    x, y = torch.randn(256, 6), torch.randint(0, 3, (256,))
    try:
        Hessian(model, F.cross_entropy, (x, y), microbatch_size=8)
    finally:
        handle.remove()
    assert seen and max(seen) <= 16
    for dtype in (torch.bfloat16, torch.float16):
        Hessian(model.to(dtype), F.cross_entropy, (x.to(dtype), y), microbatch_size=32)

    class LossInTrainMode(torch.nn.Module):  # torchvision detection style
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 3)

        def forward(self, inputs):
            out = self.fc(inputs)
            return {"loss": out.pow(2).mean()} if self.training else [out]

    def closure(m, batch):
        return sum(m(batch[0]).values())

    Hessian(LossInTrainMode(), closure=closure, data=(x, y), eval_mode=False,
            microbatch_size=32)
