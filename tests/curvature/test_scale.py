"""Curvature at scale: bounded Lanczos memory, the stopping rules, memory budgets, bf16.

Accuracy against dense float64 truth (``_dense.py``), device memory counted as tensors the
solver holds (a hook, never a timing).
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from landscape import LandscapeError
from landscape.curvature import (
    Hessian,
    MatrixOperator,
    _basis,
    hessian_trace,
    lanczos,
    spectral_density,
    top_eigenvalues,
)
from landscape.curvature.lanczos import krylov_eigsh, work_dtype
from landscape.curvature.memory import (
    MemoryBudgetError,
    PeakMemory,
    parse_budget,
    with_microbatches,
)
from tests.curvature._dense import dense_hessian
from tests.models import TinyTransformer, classification_data, lm_loss, mlp, token_data


def spectrum_matrix(n=240, top=(10.0, 9.5, 9.0, 8.0), seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.cat([torch.tensor(top, dtype=torch.float64),
                    torch.linspace(-3.0, 5.0, n - len(top), dtype=torch.float64)])
    return q @ torch.diag(ev) @ q.T, ev.sort(descending=True).values


def _models():
    model = mlp(d_in=5, hidden=7, d_out=3, depth=3, seed=1).double()
    x, y = classification_data(n=24, d_in=5, n_classes=3, seed=2)
    tr = TinyTransformer(vocab=11, d=8, heads=2, layers=1, seq=7).double()
    return [
        (model, dict(loss_fn=F.cross_entropy, data=(x.double(), y))),
        (tr, dict(closure=lm_loss, data=token_data(n=3, seq=7, vocab=11))),
    ]


@pytest.mark.parametrize("variant", [dict(offload=True, ), dict(max_basis=8),
                                     dict(max_basis=9, offload=True), dict(stop="value")])
def test_bounded_basis_keeps_dense_truth_eigenvalues(variant):
    for model, kw in _models():
        if "loss_fn" in kw:
            dense = dense_hessian(model, kw["loss_fn"], kw["data"])
        else:
            dense = dense_hessian(model, closure=kw["closure"], batch=kw["data"])
        truth = torch.linalg.eigvalsh(dense).flip(0)[:3]
        op = Hessian(model, **kw)
        plain = top_eigenvalues(op, k=3, tol=1e-6, max_matvec=op.dim)
        got = top_eigenvalues(op, k=3, tol=1e-6, max_matvec=op.dim, **variant)
        assert got.converged
        rel = ((got.values - truth).abs() / truth.abs()).max()
        assert rel <= 1e-6, (variant, got.values, truth)
        assert torch.allclose(got.values, plain.values, rtol=1e-6)
        for v in got.vectors:  # unit Ritz vectors in the operator's dtype
            assert v[0].dtype == torch.float64
            assert abs(sum(float((t * t).sum()) for t in v) - 1.0) < 1e-9


def _held_vectors(n, exclude):
    """Vectors of length ``n`` held by live tensors, except the storages in ``exclude``."""
    count = 0
    for obj in gc.get_objects():
        try:
            tensor = type(obj) is torch.Tensor or isinstance(obj, torch.nn.Parameter)
        except ReferenceError:  # a dead weak proxy
            continue
        if tensor and obj.numel() >= n and obj.numel() % n == 0:
            if obj.untyped_storage().data_ptr() in exclude:
                continue
            count += obj.numel() // n
    return count


def test_offloaded_basis_holds_a_few_device_vectors_whatever_the_iterations(monkeypatch):
    a, ev = spectrum_matrix(n=240)
    bases = []
    original = lanczos._Basis.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        bases.append(self)

    monkeypatch.setattr(lanczos._Basis, "__init__", spy)
    start = torch.randn(240, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    held = []
    # what other tests of this process left (fixtures, garbage not yet collected) is not
    # the solver's: counted once before, and taken off
    gc.collect()
    before = _held_vectors(240, {t.untyped_storage().data_ptr() for t in (a, start)})

    def count(info):
        basis = bases[-1]
        stores = [a, start, *basis.blocks] + ([] if basis.rows is None else [basis.rows])
        exclude = {t.untyped_storage().data_ptr() for t in stores}
        n = _held_vectors(240, exclude) - before
        if n > 12:  # garbage not yet collected is not held: count the live ones only
            gc.collect()
            n = _held_vectors(240, exclude) - before
        held.append(n)

    res = krylov_eigsh(lambda x: a @ x, start, k=2, tol=1e-14, max_matvec=120,
                       min_matvec=120, offload=True, chunk=3, callback=count)
    assert res.n_matvec == 120 and res.basis_size > 100
    assert res.peak_device_vectors <= 3 + 4
    # besides the host store: the recent rows, the last product and the Ritz work
    assert max(held) <= 12, held
    assert torch.allclose(res.largest[0], ev[:2], rtol=1e-12)
    kept = krylov_eigsh(lambda x: a @ x, start, k=2, tol=1e-14, max_matvec=120, min_matvec=120)
    assert kept.peak_device_vectors >= 120  # the unbounded basis lives on the device
    assert torch.allclose(kept.largest[0], res.largest[0], rtol=1e-12)


def test_basis_grows_no_further_than_the_rows_a_run_can_keep():
    # capacity doubles on demand (22 -> 44 rows here before), but a run of 30 products
    # from one start vector keeps at most 32 rows
    a, _ = spectrum_matrix(n=240)
    start = torch.randn(240, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res = krylov_eigsh(lambda x: a @ x, start, k=1, tol=1e-14, max_matvec=30, min_matvec=30)
    assert res.n_matvec == 30 and res.basis_size == 31
    assert res.peak_device_vectors <= 1 + 30 + 1
    bounded = krylov_eigsh(lambda x: a @ x, start, k=1, tol=1e-14, max_matvec=30,
                           min_matvec=30, max_basis=6)
    assert bounded.peak_device_vectors <= 6 + 1
    assert float(bounded.largest[0][0]) == pytest.approx(float(res.largest[0][0]), rel=1e-6)


@pytest.mark.parametrize("kw", [
    dict(k=2, max_matvec=60),  # 62 rows: eight blocks, the last one short
    dict(k=2, max_matvec=200, max_basis=11),  # restarts across a block boundary
    dict(k=1, max_matvec=800, max_basis=12, which="both"),  # dense low end: slow
    dict(k=2, max_matvec=80, warm=3),  # block Lanczos from three start rows
])
def test_a_basis_of_many_blocks_finds_the_dense_eigenvalues(monkeypatch, kw):
    # large operators keep the basis in blocks of 8 rows; a small one here, forced to
    monkeypatch.setattr(_basis, "BLOCK_ENTRIES", 1)
    kw = dict(kw)
    warm = kw.pop("warm", 1)
    a, _ = spectrum_matrix(n=240)
    truth = torch.linalg.eigvalsh(a)
    g = torch.Generator().manual_seed(3)
    start = torch.randn(warm, 240, dtype=torch.float64, generator=g).squeeze(0)
    res = krylov_eigsh(lambda x: a @ x, start, tol=1e-8, **kw)
    assert res.converged
    k = kw["k"]
    assert torch.allclose(res.largest[0], truth.flip(0)[:k], rtol=1e-9)
    if kw.get("which") == "both":
        assert torch.allclose(res.smallest[0], truth[:k], rtol=1e-7)
    bound = (kw.get("max_basis") or kw["max_matvec"] + 1) + warm
    assert res.peak_device_vectors <= bound  # blocks never hold rows past the limit
    vecs = res.largest[1]
    assert torch.allclose(vecs @ a @ vecs.T, torch.diag(res.largest[0]), atol=1e-8)


def test_products_the_solver_does_not_own_are_not_overwritten():
    # Gram-Schmidt subtracts in place only in a product it owns: never in the basis row
    # itself (identity), a stride-0 tensor, an inference tensor, or one the caller keeps
    start = torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res = krylov_eigsh(lambda x: x, start, k=1, tol=1e-10, max_matvec=5)
    assert res.converged and float(res.largest[0][0]) == pytest.approx(1.0, abs=1e-12)
    assert float(res.largest[2][0]) <= 1e-10
    for fresh in (False, True):  # the checks hold even against a wrong promise
        ones = krylov_eigsh(lambda x: x.sum().expand(20), start, k=1, tol=1e-10,
                            max_matvec=5, fresh_products=fresh)
        assert float(ones.largest[0][0]) == pytest.approx(20.0, rel=1e-12)
    a, ev = spectrum_matrix(n=60)
    s60 = torch.randn(60, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def inference(x):
        with torch.inference_mode():
            return a @ x

    got = krylov_eigsh(inference, s60, k=1, tol=1e-10, max_matvec=60, fresh_products=True)
    assert float(got.largest[0][0]) == pytest.approx(float(ev[0]), rel=1e-10)
    kept = []

    def logged(x):
        kept.append((a @ x, None))
        kept[-1] = (kept[-1][0], kept[-1][0].clone())
        return kept[-1][0]

    krylov_eigsh(logged, s60, k=1, tol=1e-10, max_matvec=10)
    assert all(torch.equal(out, copy) for out, copy in kept)


def test_top_eigenvalues_products_are_fresh_for_the_solver(monkeypatch):
    # flat_matvec concatenates (a new tensor): top_eigenvalues lets Gram-Schmidt write in it
    seen = []
    original = lanczos._owned

    def spy(w, fresh, basis):
        seen.append(fresh)
        return original(w, fresh, basis)

    a, ev = spectrum_matrix(n=40)
    op = MatrixOperator(a)
    monkeypatch.setattr(lanczos, "_owned", spy)
    res = top_eigenvalues(op, k=1, tol=1e-8)
    assert seen and all(seen)
    assert float(res.values[0]) == pytest.approx(float(ev[0]), rel=1e-8)


def test_thick_restart_bounds_the_basis_and_finds_both_ends():
    a, ev = spectrum_matrix(n=200, top=(10.0, 9.0, 7.0))
    op = MatrixOperator(a)
    res = top_eigenvalues(op, k=2, tol=1e-8, max_matvec=400, max_basis=12)
    assert res.converged and torch.allclose(res.values, ev[:2], rtol=1e-10)
    both = top_eigenvalues(op, k=1, which="both", tol=1e-8, max_matvec=600, max_basis=16)
    assert both.converged
    assert float(both.values[0]) == pytest.approx(10.0, rel=1e-10)
    assert float(both.smallest.values[0]) == pytest.approx(-3.0, rel=1e-8)
    with pytest.raises(ValueError, match="max_basis"):
        top_eigenvalues(op, k=3, max_basis=4)


def test_value_stopping_rule_spends_fewer_products_for_the_same_accuracy():
    a, _ev = spectrum_matrix(n=300, top=(10.0, 9.0))
    op = MatrixOperator(a)
    by_res = top_eigenvalues(op, k=1, tol=1e-4, stop="residual")
    by_val = top_eigenvalues(op, k=1, tol=1e-4, stop="value")
    auto = top_eigenvalues(op, k=1, tol=1e-4)  # the default: either rule (value at tol/2)
    assert by_val.n_matvec <= auto.n_matvec <= by_res.n_matvec
    assert abs(float(auto.values[0]) - 10.0) <= 0.5e-4 * 10.0
    assert by_val.converged and by_val.n_matvec < by_res.n_matvec
    err = abs(float(by_val.values[0]) - 10.0)
    assert err <= 1e-4 * 10.0  # the estimated eigenvalue error holds
    assert err <= float(by_val.residuals[0])  # and the certified bound
    with pytest.raises(ValueError, match="stop"):
        top_eigenvalues(op, stop="sometimes")


def test_bf16_model_products_in_bf16_reductions_in_float32():
    model = mlp(d_in=6, hidden=16, d_out=3, depth=2, seed=3)
    x, y = classification_data(n=64, d_in=6, n_classes=3, seed=4)
    truth = torch.linalg.eigvalsh(dense_hessian(model.double(), F.cross_entropy,
                                                (x.double(), y))).flip(0)
    low = mlp(d_in=6, hidden=16, d_out=3, depth=2, seed=3).to(torch.bfloat16)
    op = Hessian(low, F.cross_entropy, (x.to(torch.bfloat16), y))
    assert op.dtype == torch.bfloat16 and work_dtype(op.dtype) == torch.float32
    res = top_eigenvalues(op, k=2, tol=2e-2, max_matvec=60)
    assert not torch.isnan(res.values).any() and res.vectors[0][0].dtype == torch.bfloat16
    # bf16 keeps 8 bits: products carry ~1e-2 relative error, the eigenvalues about that
    assert torch.allclose(res.values, truth[:2], rtol=1e-2)
    tr = hessian_trace(op, "krylov", n_matvec=20)
    assert tr.value == pytest.approx(float(truth.sum()), rel=0.3, abs=0.05)
    dens = spectral_density(op, lanczos_steps=10, n_probes=2)
    assert not torch.isnan(dens.density).any()
    assert dens.trace == pytest.approx(float(truth.sum()), rel=0.5, abs=0.1)


def test_parse_budget():
    assert parse_budget(None, None) is None
    assert parse_budget(1000, None) == 1000.0
    assert parse_budget("1.5x step", 200.0) == 300.0
    assert parse_budget(" 2 X Step ", 10.0) == 20.0
    for bad in ("lots", "x step", -1, 0):
        with pytest.raises(ValueError):
            parse_budget(bad, 10.0)
    with pytest.raises(ValueError, match="step"):
        parse_budget("1x step", None)


def test_memory_budget_restarts_the_basis_or_refuses_in_one_line():
    a, _ev = spectrum_matrix(n=400, top=(10.0, 9.0))
    op = MatrixOperator(a)
    vec = 400 * 8
    res = top_eigenvalues(op, k=1, tol=1e-8, memory_budget=24 * vec)
    plan = res.memory_plan
    assert plan.max_basis is not None and plan.estimate <= 24 * vec
    assert res.converged and float(res.values[0]) == pytest.approx(10.0, rel=1e-8)
    assert res.peak_memory is not None and res.peak_memory >= 0
    with pytest.raises(MemoryBudgetError) as err:
        top_eigenvalues(op, k=1, memory_budget=5 * vec)
    assert isinstance(err.value, LandscapeError)
    assert "\n" not in str(err.value) and "memory_budget" in str(err.value)
    with pytest.raises(MemoryBudgetError, match="bytes"):
        top_eigenvalues(op, k=1, memory_budget="1x step")


def test_memory_budget_on_a_model_operator_plans_from_measured_products():
    model = mlp(d_in=5, hidden=7, d_out=3, depth=3, seed=1).double()
    x, y = classification_data(n=24, d_in=5, n_classes=3, seed=2)
    truth = torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, (x.double(), y)))
    op = Hessian(model, F.cross_entropy, (x.double(), y))
    res = top_eigenvalues(op, k=1, tol=1e-6, memory_budget=10**9)
    assert res.memory_plan.microbatch_size is None and res.memory_plan.max_basis is None
    assert float(res.values[0]) == pytest.approx(float(truth[-1]), rel=1e-6)
    assert op.n_matvec >= res.n_matvec
    # the micro-batched copy is the same operator
    small = with_microbatches(op, 5)
    got = top_eigenvalues(small, k=1, tol=1e-6)
    assert float(got.values[0]) == pytest.approx(float(truth[-1]), rel=1e-6)
    assert len(small._data.batches) == 5 and op.microbatch_size is None


def test_peak_memory_nests():
    with PeakMemory() as outer:
        big = torch.ones(40 * 2**20 // 8, dtype=torch.float64)  # 40 MB, touched
        del big
        with PeakMemory() as inner:
            small = torch.ones(1000)
            del small
    assert outer.peak >= 30 * 2**20
    assert inner.peak < 30 * 2**20


def test_run_file_rows_carry_the_measured_peak(tmp_path):
    import landscape as ls

    model = mlp(d_in=5, hidden=7, d_out=3, depth=2, seed=1)
    x, y = classification_data(n=16, d_in=5, n_classes=3, seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = [ls.metrics.TopEigenvalues(k=2, schedule=1),
               ls.metrics.HessianTrace(n_matvec=6, schedule=1)]
    with ls.Monitor(model, F.cross_entropy, path=str(tmp_path / "run.h5"), optimizer=opt,
                    metrics=metrics, probe=(x, y), alarms=False, warn=False) as mon:
        for step in range(2):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x, y), loss=loss)
    with ls.Run.open(str(tmp_path / "run.h5")) as run:
        for metric in ("top_eigenvalues", "hessian_trace"):
            steps, peaks = run.series(metric, "peak_memory")
            assert list(steps) == [0, 1] and (peaks >= 0).all()
        steps, values = run.series("top_eigenvalues", "eigenvalues")
        assert (values[:, 0] >= values[:, 1]).all()


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "krylov"])
def test_trace_probe_batches_give_the_same_estimate(method):
    a, _ = spectrum_matrix(n=60)
    op = MatrixOperator(a)
    whole = hessian_trace(op, method, n_matvec=21, seed=3)
    parts = hessian_trace(op, method, n_matvec=21, seed=3, probe_batch=4)
    assert parts.value == pytest.approx(whole.value, rel=1e-12)
    assert parts.n_matvec == whole.n_matvec == 21 and parts.peak_memory >= 0
    with pytest.raises(ValueError, match="probe_batch"):
        hessian_trace(op, method, n_matvec=21, probe_batch=0)


def test_a_plan_can_switch_to_the_first_order_product():
    from landscape.curvature.memory import MemoryPlan, apply_plan

    model = mlp(d_in=5, hidden=7, d_out=3, depth=2, seed=1).double()
    x, y = classification_data(n=24, d_in=5, n_classes=3, seed=2)
    truth = torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, (x.double(), y)))
    op = Hessian(model, F.cross_entropy, (x.double(), y))
    plan = MemoryPlan(1e9, 1.0, 1.0, 8 * op.dim, 10, 10.0, backend="first_order")
    fo = apply_plan(op, plan)
    assert fo is not op and fo.options.backend == "first_order"
    res = top_eigenvalues(fo, k=1, tol=1e-6)
    assert float(res.values[0]) == pytest.approx(float(truth[-1]), rel=1e-4)
    assert op.options.backend == "auto"  # the caller's operator is untouched
