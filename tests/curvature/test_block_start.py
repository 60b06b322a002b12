"""top_eigenvalues(block=b): a cold start from b vectors finds eigenvalues repeated up to b times.

Against the dense float64 Hessian of a least-squares layer with 4 outputs, whose every
eigenvalue is repeated 4 times (H = I_4 ⊗ XᵀX / n), and a matrix with a chosen spectrum.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from landscape import Hessian, top_eigenvalues
from landscape.curvature import MatrixOperator
from tests.curvature._dense import dense_hessian


def _least_squares(outputs: int = 4):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, outputs).double()
    x = torch.randn(32, 5, dtype=torch.float64)
    t = torch.randn(32, outputs, dtype=torch.float64)
    return model, (x, t)


def test_a_block_of_k_finds_an_eigenvalue_repeated_k_times():
    model, batch = _least_squares()
    truth = torch.linalg.eigvalsh(dense_hessian(model, F.mse_loss, batch)).flip(0)
    assert torch.allclose(truth[:4], truth[0].expand(4), rtol=1e-12)  # four copies
    op = Hessian(model, F.mse_loss, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy division warning from the zero gaps
        got = top_eigenvalues(op, k=4, block=4)
    assert got.converged
    assert torch.allclose(got.values, truth[:4], rtol=1e-8, atol=0)
    # one vector finds one copy of each (documented): the second value is the next eigenvalue
    single = top_eigenvalues(op, k=4)
    assert single.values[1] < 0.9 * truth[0]
    # a block of 2 finds two copies of each
    pair = top_eigenvalues(op, k=4, block=2)
    assert torch.allclose(pair.values, truth[[0, 1, 4, 5]], rtol=1e-8, atol=0)


@pytest.mark.parametrize("which", ["smallest", "both"])
def test_a_block_finds_repeats_at_the_low_end_too(which):
    spectrum = torch.cat([torch.tensor([-3.0, -3.0, -3.0, -1.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]),
                          torch.linspace(-0.9, 0.9, 40)]).double()
    q, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(1)))
    op = MatrixOperator(q @ torch.diag(spectrum) @ q.T)
    got = top_eigenvalues(op, k=3, which=which, block=3, tol=1e-8)
    low = got if which == "smallest" else got.smallest
    assert torch.allclose(low.values, torch.tensor([-3.0] * 3, dtype=torch.float64), atol=1e-8)
    if which == "both":
        assert torch.allclose(got.values, torch.tensor([4.0] * 3, dtype=torch.float64),
                              atol=1e-8)


def test_block_one_is_the_single_vector_start():
    model, batch = _least_squares(outputs=2)
    op = Hessian(model, F.mse_loss, batch)
    a, b = top_eigenvalues(op, k=2), top_eigenvalues(op, k=2, block=1)
    assert a.n_matvec == b.n_matvec and torch.equal(a.values, b.values)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_block_must_be_a_positive_integer(bad):
    op = MatrixOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="block must be an integer >= 1"):
        top_eigenvalues(op, block=bad)
