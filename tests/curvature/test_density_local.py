"""Stochastic Lanczos quadrature in bounded memory: the local basis (``reorthogonalize``).

Local re-orthogonalisation keeps two vectors per probe. It loses orthogonality as Ritz
values converge, so converged eigenvalues come back as ghosts, but the quadrature's moments
``sum_k w_k theta_k^j = v^T A^j v`` stay exact to rounding (Greenbaum 1989). Checked against
moments computed in float64 from the matrix, against the fully re-orthogonalised run, and
the planner's choice on hand-made memory profiles.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from landscape.curvature import Hessian, MatrixOperator, spectral_density
from landscape.curvature.lanczos import lanczos_tridiagonal
from landscape.curvature.memory import MemoryBudgetError, MemoryProfile
from landscape.curvature.spectrum import density_probe_bytes
from landscape.metrics import SpectralDensity
from tests.models import classification_data, mlp


def _spiked(n: int = 400, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    """A Hessian-like symmetric matrix: a bulk on [-0.05, 0.3] and five outliers up to 40."""
    g = torch.Generator().manual_seed(seed)
    ev = torch.cat([torch.linspace(-0.05, 0.3, n - 5, dtype=torch.float64),
                    torch.tensor([1.0, 2.0, 5.0, 10.0, 40.0], dtype=torch.float64)])
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    a = (q * ev) @ q.T
    return ((a + a.T) / 2).to(dtype)


def _quadrature(a: torch.Tensor, start: torch.Tensor, steps: int, local: bool):
    alpha, beta, used = lanczos_tridiagonal(lambda x: x @ a, start[None], steps, local=local)
    t = torch.diag(alpha[0]) + torch.diag(beta[0], 1) + torch.diag(beta[0], -1)
    theta, s = torch.linalg.eigh(t)
    return theta, s[0] ** 2, used


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 5e-6)])
def test_local_quadrature_keeps_the_moments_despite_ghosts(dtype, tol):
    a = _spiked(dtype=dtype)
    start = torch.randn(400, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    start = (start / start.norm()).to(dtype)
    full = _quadrature(a, start, 80, local=False)
    local = _quadrature(a, start, 80, local=True)
    assert full[2] == local[2] == 80
    # orthogonality was really lost: lambda = 40 converged, then came back as ghosts
    near_top = [int((theta - 40).abs().lt(1e-2).sum()) for theta, _, _ in (full, local)]
    assert near_top[0] == 1 and near_top[1] >= 2
    # ... sharing its weight: together they weigh what the single full node weighs
    weight_top = [float(w[(theta - 40).abs() < 1e-2].sum()) for theta, w, _ in (full, local)]
    assert weight_top[1] == pytest.approx(weight_top[0], rel=10 * tol)
    exact_a, v = a.double(), start.double() / start.double().norm()
    x = v.clone()
    for j in range(12):  # v^T A^j v, j <= 11 (a Gauss rule of 80 nodes is exact to 159)
        exact = float(v @ x)
        for theta, w, _ in (full, local):
            assert float((w * theta**j).sum()) == pytest.approx(exact, rel=tol, abs=1e-300)
        x = exact_a @ x


def test_local_runs_start_bitwise_like_full_and_hold_two_vectors():
    a = _spiked(n=60)
    starts = torch.randn(3, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    starts = starts / starts.norm(dim=1, keepdim=True)
    full = lanczos_tridiagonal(lambda x: x @ a, starts, 2)
    local = lanczos_tridiagonal(lambda x: x @ a, starts, 2, local=True)
    for fa, la in zip(full[0] + full[1], local[0] + local[1]):
        assert torch.equal(fa, la)
    op = MatrixOperator(a)
    assert density_probe_bytes(op, 30, local=True) == (2 + 4) * 60 * 8
    assert density_probe_bytes(op, 30) == (30 + 4) * 60 * 8
    assert density_probe_bytes(op, 1, local=True) == (1 + 4) * 60 * 8


def _model_op():
    model = mlp(d_in=5, hidden=7, d_out=3, depth=3, seed=1).double()
    x, y = classification_data(n=24, d_in=5, n_classes=3, seed=2)
    return Hessian(model, F.cross_entropy, (x.double(), y))


def _profile(op):
    """A product of 340 kB whatever the micro-batch: only the basis decides."""
    return MemoryProfile(1e6, 3.4e5, 0.0, 24, None, op.dim * 8)


def test_the_plan_keeps_the_local_basis_only_when_the_full_one_does_not_fit():
    op = _model_op()
    steps, probes = 40, 2
    prof = _profile(op)
    fixed = probes * op.dim * 8
    product = prof.product(24)
    full_need = fixed + density_probe_bytes(op, steps) + product
    local_need = fixed + density_probe_bytes(op, steps, local=True) + product
    assert local_need < full_need
    free = spectral_density(op, steps, probes)
    assert free.reorthogonalize == "full"
    roomy = spectral_density(op, steps, probes, memory_budget=full_need, memory_profile=prof)
    assert roomy.reorthogonalize == "full" and roomy.memory_plan.reorthogonalize is None
    assert torch.allclose(roomy.nodes[roomy.valid], free.nodes[free.valid], rtol=1e-10)
    tight = spectral_density(op, steps, probes, memory_budget=local_need, memory_profile=prof)
    plan = tight.memory_plan
    assert tight.reorthogonalize == plan.reorthogonalize == "local"
    assert plan.probe_batch == 1 and plan.estimate <= local_need
    assert tight.n_matvec == free.n_matvec
    # the same moments (the first: the trace estimate) as the full basis; the nodes inside
    # the bulk sit elsewhere, which moves the smoothed density a little
    for j in range(6):
        assert tight.moment(j) == pytest.approx(free.moment(j), rel=1e-10)
    scale = float(free.density.max())
    assert float((tight.density - free.density).abs().max()) <= 1e-3 * scale
    # asked for explicitly, the full basis is refused where the local one would fit
    with pytest.raises(MemoryBudgetError, match="spectral_density"):
        spectral_density(op, steps, probes, reorthogonalize="full", memory_budget=local_need,
                         memory_profile=prof)
    # and "local" is local whatever the budget
    assert spectral_density(op, steps, probes, reorthogonalize="local").reorthogonalize == "local"
    with pytest.raises(MemoryBudgetError):
        spectral_density(op, steps, probes, memory_budget=local_need - 1, memory_profile=prof)


def test_reorthogonalize_is_checked_and_recorded_by_the_metric():
    with pytest.raises(ValueError, match="reorthogonalize"):
        spectral_density(MatrixOperator(torch.eye(3, dtype=torch.float64)), 2,
                         reorthogonalize="none")
    with pytest.raises(ValueError, match="reorthogonalize"):
        SpectralDensity(reorthogonalize="partial")
    assert "reorthogonalize" not in SpectralDensity().config()
    assert SpectralDensity(reorthogonalize="local").config()["reorthogonalize"] == "local"


def test_local_density_of_a_trained_model_matches_the_full_one():
    """A float32 model Hessian, with products from autograd: the same smoothed density."""
    torch.manual_seed(0)
    model = mlp(d_in=5, hidden=16, d_out=3, depth=3, seed=3)
    x, y = classification_data(n=64, d_in=5, n_classes=3, seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    op = Hessian(model, F.cross_entropy, (x, y))
    steps = min(60, op.dim)
    full = spectral_density(op, steps, 2, grid=400)
    local = spectral_density(op, steps, 2, grid=full.grid, sigma=full.sigma,
                             reorthogonalize="local")
    assert local.trace == pytest.approx(full.trace, rel=1e-4)
    scale = float(full.density.max())
    assert float((local.density - full.density).abs().max()) <= 1e-3 * scale
    assert math.isclose(float(local.weights.sum()), 1.0, rel_tol=1e-9)
