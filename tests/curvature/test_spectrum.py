"""Lanczos eigenvalues, Hutchinson / Hutch++ traces and SLQ densities (docs/curvature.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from landscape.curvature import (
    Hessian,
    MatrixOperator,
    hessian_trace,
    spectral_density,
    top_eigenvalues,
)
from landscape.curvature.lanczos import krylov_eigsh, orthogonalize
from landscape.params import flatten
from tests import models


def sym(n, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (a + a.T) / 2 + shift * torch.eye(n, dtype=torch.float64)


def test_orthogonalize_removes_the_span_even_under_cancellation():
    # w lies almost entirely in span(q): one classical Gram-Schmidt pass leaves a component
    # of about eps * |w| / |result| along q; the DGKS test must trigger the second pass
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(400, 30, generator=g))[0].T.float()
    c = torch.randn(30, generator=g)
    r = torch.randn(400, generator=g)
    r -= q.T @ (q @ r)
    w = q.T @ c + 1e-4 * r / r.norm()
    for near in (None, 7):
        out, coef, left = orthogonalize(q, w.clone(), near=near)
        assert left == pytest.approx(float(out.norm()), rel=1e-6)
        assert float((q @ out).abs().max()) <= 1e-6 * float(out.norm())
        # forming w rounded it by ~eps * |q^T c| per entry: equal to that accuracy
        assert float((out - 1e-4 * r / r.norm()).norm()) <= 2e-2 * 1e-4
        assert torch.allclose(coef.float(), c, atol=1e-5)
    # nothing to remove: the input comes back unchanged, coefficients zero
    out, coef, _ = orthogonalize(q[:0], w)
    assert torch.equal(out, w) and coef.numel() == 0


@pytest.mark.parametrize("near", [None, 0, 7, 29])
def test_orthogonalize_in_place_is_bitwise_the_copying_one(near):
    # the solvers overwrite the product they own (one vector less per pass at scale)
    g = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(300, 30, generator=g))[0].T.float()
    w = q.T @ torch.randn(30, generator=g) + 1e-3 * torch.randn(300, generator=g)
    kept = w.clone()
    out, coef, left = orthogonalize(q, w, near=near)
    assert torch.equal(w, kept)  # the copying form leaves its input alone
    own = w.clone()
    out2, coef2, left2 = orthogonalize(q, own, near=near, overwrite=True)
    assert out2.data_ptr() == own.data_ptr()  # written in place
    assert torch.equal(out2, out) and torch.equal(coef2, coef) and left2 == left


def test_lanczos_basis_stays_orthogonal_on_a_clustered_spectrum():
    # many iterations on clustered eigenvalues is where Lanczos loses orthogonality first;
    # with full re-orthogonalisation the Ritz vectors stay orthonormal and the values exact
    g = torch.Generator().manual_seed(3)
    vals = torch.cat([torch.tensor([10.0, 9.999, 9.998]), torch.rand(297, generator=g)])
    u = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))[0]
    a = (u * vals.double()) @ u.T
    res = krylov_eigsh(lambda x: a @ x, torch.randn(300, generator=g, dtype=torch.float64),
                       k=3, tol=1e-10, max_matvec=300)
    values, vectors, _ = res.largest
    assert torch.allclose(values, vals[:3].double(), rtol=1e-9)
    gram = vectors @ vectors.T
    assert torch.allclose(gram, torch.eye(3, dtype=torch.float64), atol=1e-10)


def test_lanczos_largest_smallest_both_on_random_matrix():
    a = sym(120)
    ev = torch.linalg.eigvalsh(a)
    op = MatrixOperator(a)
    top = top_eigenvalues(op, k=4, tol=1e-10)
    assert torch.allclose(top.values, ev.flip(0)[:4], rtol=1e-12)
    assert top.converged and top.n_matvec == op.n_matvec <= 120
    assert (top.residuals <= 1e-10 * top.values.abs()).all()
    for y, lam in zip(top.vectors, top.values):
        hy = op.matvec(y)
        assert float(torch.linalg.vector_norm(flatten(hy) - lam * flatten(y))) < 1e-8
    low = top_eigenvalues(op, k=3, which="smallest", tol=1e-10)
    assert torch.allclose(low.values, ev[:3], rtol=1e-12)
    assert torch.allclose(low.smallest.values, ev[:3], rtol=1e-12)
    with pytest.raises(ValueError, match="smallest end"):
        _ = low.lambda_max  # its values[0] is the most negative eigenvalue
    both = top_eigenvalues(op, k=2, which="both", tol=1e-10)
    assert torch.allclose(both.values, ev.flip(0)[:2])
    assert torch.allclose(both.smallest.values, ev[:2])
    assert both.lambda_max == pytest.approx(float(ev[-1]))
    d = both.as_dict()
    assert d["smallest"]["values"][0] == pytest.approx(float(ev[0]))


def test_stopping_rule_is_the_documented_residual_test():
    a = sym(200, seed=3)
    res = top_eigenvalues(MatrixOperator(a), k=2, tol=1e-3)
    assert res.converged
    assert (res.residuals <= 1e-3 * res.values.abs()).all()
    # the error of a Ritz value is bounded by its residual (and typically residual^2 / gap)
    ev = torch.linalg.eigvalsh(a).flip(0)[:2]
    assert ((res.values - ev).abs() <= res.residuals).all()


def test_largest_is_algebraic_not_magnitude():
    a = torch.diag(torch.tensor([-10.0, -3.0, 0.5, 1.0, 2.0], dtype=torch.float64))
    res = top_eigenvalues(MatrixOperator(a), k=1, which="both", tol=1e-10)
    assert float(res.values[0]) == pytest.approx(2.0)
    assert float(res.smallest.values[0]) == pytest.approx(-10.0)


def test_zero_operator_t9_and_low_rank_restart():
    zero = MatrixOperator(torch.zeros(7, 7, dtype=torch.float64))
    res = top_eigenvalues(zero, k=2)
    assert res.converged and torch.equal(res.values, torch.zeros(2, dtype=torch.float64))
    assert not any(torch.isnan(t).any() for v in res.vectors for t in v)
    for method in ("hutch++", "krylov"):
        tr = hessian_trace(zero, method, 9)
        assert tr.value == 0.0 and tr.stderr == 0.0 and tr.n_matvec == 9
    u = torch.randn(30, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    low_rank = MatrixOperator(u @ torch.diag(torch.tensor([5.0, 2.0])).double() @ u.T)
    ev = torch.linalg.eigvalsh(low_rank.matrix).flip(0)
    res = top_eigenvalues(low_rank, k=4, tol=1e-8)  # Krylov space of rank 3: restarts
    assert torch.allclose(res.values, ev[:4], atol=1e-10)
    assert res.converged


def test_warm_start_tracks_lambda_max_in_a_few_matvecs():
    model = models.mlp(d_in=6, hidden=16, d_out=3).double()
    x, y = models.classification_data(n=64)
    x = x.double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    prev = None
    costs = []
    for _ in range(12):
        op = Hessian(model, F.cross_entropy, (x, y))
        res = top_eigenvalues(op, k=1, tol=1e-3, warm_start=prev)
        if prev is not None:
            costs.append(res.n_matvec)
        exact = float(torch.linalg.eigvalsh(op.to_dense())[-1])
        assert res.converged and abs(float(res.values[0]) - exact) <= 1e-3 * exact
        prev = res
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert sum(costs) / len(costs) <= 6, costs


def test_warm_start_from_vectors_and_shape_check():
    a = sym(50, seed=2)
    op = MatrixOperator(a)
    first = top_eigenvalues(op, k=2, tol=1e-8)
    again = top_eigenvalues(op, k=2, tol=1e-6, warm_start=first.vectors)
    assert again.n_matvec <= 3 and torch.allclose(again.values, first.values, rtol=1e-9)
    with pytest.raises(ValueError, match="warm_start"):
        top_eigenvalues(op, warm_start=[(torch.zeros(3, dtype=torch.float64),)])


def test_bad_arguments():
    op = MatrixOperator(sym(5))
    with pytest.raises(ValueError, match="k must"):
        top_eigenvalues(op, k=0)
    with pytest.raises(ValueError, match="which"):
        top_eigenvalues(op, which="LM")
    with pytest.raises(ValueError, match="method"):
        hessian_trace(op, "exact")
    with pytest.raises(ValueError, match="n_matvec"):
        hessian_trace(op, "hutch++", 2)
    with pytest.raises(ValueError, match="n_matvec"):
        hessian_trace(op, "krylov", 1)
    with pytest.raises(ValueError, match="lanczos_steps"):
        spectral_density(op, lanczos_steps=0)


@pytest.mark.parametrize(("call", "match"), [
    # each raised from deep inside (a TypeError of torch.empty, "'>' not supported", ...)
    (lambda op: top_eigenvalues(op, tol="x"), "tol must be a positive number"),
    (lambda op: top_eigenvalues(op, tol=float("nan")), "tol must be a positive number"),
    (lambda op: top_eigenvalues(op, seed="a"), "seed must be an integer >= 0"),
    (lambda op: top_eigenvalues(op, warm_start=5), "warm_start must be an EigenResult"),
    (lambda op: top_eigenvalues(op, max_matvec=2.5), "max_matvec must be an integer"),
    (lambda op: hessian_trace(op, 4), r"method must be one of .*got 4 \(the probe count is "
                                      r"n_matvec=\)"),
    (lambda op: hessian_trace(op, n_matvec=2.5), "n_matvec must be an integer"),
    (lambda op: hessian_trace(op, seed=None), "seed must be an integer >= 0"),
    (lambda op: spectral_density(op, lanczos_steps=2.5), "lanczos_steps must be an integer"),
    (lambda op: spectral_density(op, n_probes="2"), "n_probes must be an integer"),
    (lambda op: spectral_density(op, sigma=-1.0), "sigma must be a positive number"),
])
def test_arguments_of_the_wrong_kind_are_named_in_one_line(call, match):
    with pytest.raises(ValueError, match=match):
        call(MatrixOperator(sym(5)))


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 25), k=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_lanczos_matches_eigvalsh(n, k, seed):
    a = sym(n, seed=seed)
    ev = torch.linalg.eigvalsh(a)
    res = krylov_eigsh(lambda v: a @ v, torch.ones(n, dtype=torch.float64), k=k, which="both",
                       tol=1e-9, max_matvec=n, generator=torch.Generator().manual_seed(0))
    kk = min(k, n)
    assert torch.allclose(res.largest[0], ev.flip(0)[:kk], atol=1e-7)
    assert torch.allclose(res.smallest[0], ev[:kk], atol=1e-7)


# -- trace ------------------------------------------------------------------------------------
def test_hutchinson_exact_on_diagonal_t4():
    op = MatrixOperator(torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64)))
    res = hessian_trace(op, "hutchinson", 1)
    assert res.value == pytest.approx(21.0) and res.n_matvec == 1 and math.isnan(res.stderr)


def test_hutchpp_exact_for_low_rank_t5():
    u = torch.randn(40, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = u @ u.T * 3.0
    res = hessian_trace(MatrixOperator(a), "hutch++", 9)
    assert res.value == pytest.approx(float(a.trace()), rel=1e-12)
    assert res.n_matvec == 9 and res.stderr < 1e-10


def test_hutchpp_on_an_operator_smaller_than_its_sketch_is_exact_in_fewer_products():
    """n_matvec // 3 = 10 sketch vectors of a 5 x 5 operator: Q spans it, tr(QᵀAQ) is the
    trace, and the result counts the 25 products it used (documented), not the 30 asked."""
    a = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = a + a.T
    res = hessian_trace(MatrixOperator(a), "hutch++", 30)
    assert res.value == pytest.approx(float(a.trace()), rel=1e-12, abs=1e-12)
    assert res.n_matvec == 25


def test_krylov_trace_is_exact_once_the_krylov_space_is_invariant():
    # rank 3: the Lanczos basis spans the range after 3 steps (breakdown), its Rayleigh
    # quotients sum to the trace, and the probes projected off it see nothing
    u = torch.randn(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = u @ torch.diag(torch.tensor([4.0, -2.0, 1.0])).double() @ u.T
    res = hessian_trace(MatrixOperator(a), "krylov", 12)
    assert res.value == pytest.approx(float(a.trace()), rel=1e-10)
    assert res.n_matvec == 12 and res.method == "krylov" and res.stderr < 1e-9
    assert res.samples.numel() == 12 - 4  # 3 steps to the breakdown, 1 that detected it


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "krylov"])
def test_trace_unbiased_with_calibrated_stderr(method):
    a = sym(60, seed=5, shift=1.0)
    u = torch.randn(60, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    a = a + u @ torch.diag(torch.tensor([40.0, 30, 20, 10])).double() @ u.T  # a few outliers
    exact = float(a.trace())
    op = MatrixOperator(a)
    runs = [hessian_trace(op, method, 30, seed=s) for s in range(40)]
    values = torch.tensor([r.value for r in runs])
    errs = torch.tensor([r.stderr for r in runs])
    # unbiased: the mean over 40 seeds is within 4 standard errors of the mean
    assert abs(float(values.mean()) - exact) <= 4 * float(values.std()) / math.sqrt(40)
    # calibrated: most single estimates lie within 2 of their own error bars
    assert float(((values - exact).abs() <= 2 * errs).float().mean()) >= 0.8
    assert all(r.n_matvec == 30 for r in runs)


@pytest.mark.parametrize(("method", "n_matvec"), [("hutchinson", 9), ("hutch++", 15),
                                                   ("krylov", 15)])
def test_the_student_t_interval_covers_where_the_normal_one_is_too_narrow(method, n_matvec):
    # 9, 5 and 8 probes: value ± 1.96 stderr covered the trace 0.89, 0.86 and 0.91 of the time
    a = sym(60, seed=5, shift=1.0)
    u = torch.randn(60, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    a = a + u @ torch.diag(torch.tensor([40.0, 30, 20, 10])).double() @ u.T
    exact = float(a.trace())
    op = MatrixOperator(a)
    runs = [hessian_trace(op, method, n_matvec, seed=s) for s in range(400)]
    t_cover = sum(lo <= exact <= hi for lo, hi in (r.interval(0.95) for r in runs)) / 400
    normal_cover = sum(abs(r.value - exact) <= 1.96 * r.stderr for r in runs) / 400
    assert t_cover >= 0.92 and t_cover > normal_cover + 0.01
    r = runs[0]
    lo, hi = r.interval(0.95)
    assert lo < r.value < hi and hi - r.value == pytest.approx(r.value - lo)
    lo99, hi99 = r.interval(0.99)
    assert lo99 < lo and hi < hi99


def test_the_interval_of_fewer_than_two_probes_is_nan_and_confidence_is_checked():
    op = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)))
    one = hessian_trace(op, "hutchinson", 1)
    assert all(math.isnan(v) for v in one.interval())
    for bad in (0, 1, 1.5, "0.9", math.nan):
        with pytest.raises(ValueError, match="confidence"):
            one.interval(bad)


def test_deflated_estimators_beat_hutchinson_on_low_rank_plus_noise():
    u = torch.randn(80, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a = u @ torch.diag(torch.tensor([50.0, 40, 30, 20, 10])).double() @ u.T + 0.1 * sym(80, 4)
    exact = float(a.trace())
    op = MatrixOperator(a)
    err = {
        m: sum(abs(hessian_trace(op, m, 30, seed=s).value - exact) for s in range(20)) / 20
        for m in ("hutchinson", "hutch++", "krylov")
    }
    assert err["hutch++"] <= 0.5 * err["hutchinson"]
    assert err["krylov"] <= 0.75 * err["hutch++"]  # 15 Lanczos steps vs a 10-column sketch


def test_trace_of_model_hessian_within_error_bars():
    model = models.mlp().double()
    x, y = models.classification_data()
    op = Hessian(model, F.cross_entropy, (x.double(), y))
    exact = float(op.to_dense().trace())
    for method in ("hutch++", "krylov"):
        res = hessian_trace(op, method, 60, seed=3)
        assert abs(res.value - exact) <= 4 * res.stderr + 1e-9
        assert res.n_matvec == 60


# -- density ----------------------------------------------------------------------------------
def test_slq_exact_on_diagonal_t6():
    n = 12
    op = MatrixOperator(torch.diag(torch.arange(1.0, n + 1, dtype=torch.float64)))
    res = spectral_density(op, lanczos_steps=n, n_probes=1)
    assert res.nodes.shape == res.weights.shape == (1, n)
    assert torch.allclose(res.nodes[0], torch.arange(1.0, n + 1, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(res.weights[0], torch.full((n,), 1 / n, dtype=torch.float64), atol=1e-12)
    assert float(torch.trapezoid(res.density, res.grid)) == pytest.approx(1.0, abs=1e-6)


def test_slq_moments_match_the_dense_spectrum():
    model = models.mlp().double()
    x, y = models.classification_data()
    op = Hessian(model, F.cross_entropy, (x.double(), y))
    dense = op.to_dense()
    ev = torch.linalg.eigvalsh(dense)
    res = spectral_density(op, lanczos_steps=20, n_probes=4, seed=1)
    assert res.n_matvec == 80 and res.dim == op.dim
    assert float(res.weights.sum()) == pytest.approx(1.0)
    # quadrature identity per probe: sum_k tau_k theta_k^j = v^T H^j v for j <= 2m - 1
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(0, 2, (4, op.dim), generator=g, dtype=torch.int8)
    v = (bits.double() * 2 - 1) / math.sqrt(op.dim)
    for j in (1, 2, 3):
        quad = (res.weights * res.nodes**j).sum(dim=1) * 4
        want = torch.einsum("pi,ij,pj->p", v, torch.linalg.matrix_power(dense, j), v)
        assert torch.allclose(quad, want, rtol=1e-8, atol=1e-12)
    # and the moments estimate those of the spectrum
    assert res.moment(1) == pytest.approx(float(ev.mean()), abs=3 * float(ev.abs().max()) / 10)
    assert res.trace == pytest.approx(res.dim * res.moment(1))
    lo, hi = float(res.nodes.min()), float(res.nodes.max())
    assert lo >= float(ev[0]) - 1e-9 and hi <= float(ev[-1]) + 1e-9
    assert hi == pytest.approx(float(ev[-1]), rel=1e-6)
    assert float(torch.trapezoid(res.density, res.grid)) == pytest.approx(1.0, abs=1e-3)


def test_slq_breakdown_and_custom_grid():
    op = MatrixOperator(torch.diag(torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=torch.float64)))
    res = spectral_density(
        op, lanczos_steps=10, n_probes=2, grid=torch.linspace(0, 4, 401), sigma=0.05
    )
    assert res.n_matvec == 4  # two runs, each exhausts its 2-dimensional Krylov space
    assert res.nodes.shape == (2, 2) and bool(res.valid.all())
    assert set(torch.round(res.nodes, decimals=8).reshape(-1).tolist()) == {1.0, 3.0}
    assert res.grid.numel() == 401 and res.sigma == 0.05
    assert float(torch.trapezoid(res.density, res.grid)) == pytest.approx(1.0, abs=1e-6)


def test_budget_cap_reports_not_converged():
    a = sym(300, seed=7)
    res = top_eigenvalues(MatrixOperator(a), k=3, tol=1e-12, max_matvec=10)
    assert res.n_matvec == 10 and not res.converged
    assert res.values.shape == (3,) and (res.values[:-1] >= res.values[1:]).all()


def test_k_beyond_the_operators_dimension_says_so():
    """k=3 of a 2-dimensional operator returned 2 values as converged, without a word."""
    op = MatrixOperator(torch.diag(torch.tensor([4.0, 2.0], dtype=torch.float64)))
    with pytest.warns(RuntimeWarning, match="k=3 exceeds the operator's 2 dimensions") as w:
        res = top_eigenvalues(op, k=3)
    assert w[0].filename == __file__
    assert res.values.tolist() == pytest.approx([4.0, 2.0])
