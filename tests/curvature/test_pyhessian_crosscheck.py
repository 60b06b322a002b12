"""Cross-check against PyHessian (optional extra) where it is right, and pin where it is not.

PyHessian's ``hessian(model, criterion, data=(x, y), cuda=False)`` runs ``loss.backward(
create_graph=True)`` on the model itself and leaves graph-carrying ``.grad`` behind, so it
always gets a deep copy here.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape.curvature import Hessian, hessian_trace, top_eigenvalues
from tests import models

pyhessian = pytest.importorskip("pyhessian")  # the optional extra; installed by `make test`


def _pyhessian(model, loss_fn, batch):
    return pyhessian.hessian(copy.deepcopy(model), loss_fn, data=batch, cuda=False)


def test_top_eigenvalue_and_trace_agree_on_a_small_mlp():
    model = models.mlp(d_in=6, hidden=12, d_out=3)
    x, y = models.classification_data(n=32)
    ours = top_eigenvalues(Hessian(model, F.cross_entropy, (x, y)), k=2, tol=1e-6)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # PyHessian draws its start vectors from the global RNG
        values, _ = _pyhessian(model, F.cross_entropy, (x, y)).eigenvalues(top_n=1, tol=1e-6,
                                                                         maxIter=500)
        samples = _pyhessian(model, F.cross_entropy, (x, y)).trace(maxIter=200, tol=1e-4)
    # here lambda_max is also the largest in magnitude, so power iteration finds it
    assert values[0] == pytest.approx(float(ours.values[0]), rel=1e-3)
    tr = hessian_trace(Hessian(model, F.cross_entropy, (x, y)), "hutch++", 60)
    hutch = torch.tensor(samples, dtype=torch.float64)
    band = 4 * (tr.stderr + float(hutch.std()) / len(samples) ** 0.5)
    assert abs(float(hutch.mean()) - tr.value) <= band


class Saddle(nn.Module):
    """Prediction ``-1.5 a^2 + 0.5 b^2``; with the identity loss the Hessian is diag(-3, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.3]))
        self.b = nn.Parameter(torch.tensor([0.2]))

    def forward(self, x):
        return (-1.5 * self.a**2 + 0.5 * self.b**2) * x


def test_pyhessian_reports_largest_magnitude_and_stops_early_on_negative_trace():
    model = Saddle()
    batch = (torch.ones(4), torch.zeros(4))
    loss = lambda out, _: out.mean()  # noqa: E731
    ours = top_eigenvalues(Hessian(model, loss, batch), k=1, which="both", tol=1e-8)
    assert float(ours.values[0]) == pytest.approx(1.0)
    assert float(ours.smallest.values[0]) == pytest.approx(-3.0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        values, _ = _pyhessian(model, loss, batch).eigenvalues(top_n=1)
        samples = _pyhessian(model, loss, batch).trace(maxIter=100, tol=1e-3)
    assert values[0] == pytest.approx(-3.0, rel=1e-2)  # the largest magnitude, not lambda_max
    # its stopping rule |mean - prev| / (prev + 1e-6) < tol is always true once the running
    # mean is negative: it returns after two samples whatever their spread
    assert len(samples) == 2
    assert hessian_trace(Hessian(model, loss, batch), "hutch++", 6).value == pytest.approx(-2.0)


def test_pyhessian_density_is_broken_on_current_torch():
    model = models.mlp()
    x, y = models.classification_data()
    with torch.random.fork_rng(), pytest.raises((AttributeError, RuntimeError)):
        _pyhessian(model, F.cross_entropy, (x, y)).density(iter=5, n_v=1)  # torch.eig is gone
