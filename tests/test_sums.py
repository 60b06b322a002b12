"""Accurate dot products and norms of long vectors (landscape/_sums.py)."""

from __future__ import annotations

import pytest
import torch

from landscape import _sums
from landscape._sums import CHUNK, dots, flat_norm, row_norms, tensor_norms


def _data(n, rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, n, generator=g)
    q = q / q.norm(dim=1, keepdim=True)
    # a product mostly along the first row (as A q is for a converged direction)
    w = 368.0 * q[0] + torch.randn(n, generator=g) * (20.0 / n**0.5)
    return q, w


def test_short_vectors_are_reduced_exactly_as_torch_does():
    q, w = _data(1000)
    assert torch.equal(dots(q, w), (q @ w).double())
    assert torch.equal(dots(q[1], w), (q[1] @ w).double())
    assert flat_norm(w) == float(torch.linalg.vector_norm(w))
    assert torch.equal(row_norms(q), torch.linalg.vector_norm(q, dim=1).double())
    assert flat_norm(torch.tensor(-3.0)) == 3.0  # a 0-d tensor, as vector_norm allows


@pytest.mark.parametrize("n", [CHUNK + 1, 3 * CHUNK + 5])
def test_long_float32_reductions_match_float64(n):
    q, w = _data(n)
    qd, wd = q.double(), w.double()
    exact = qd @ wd
    # a float32 chunk's own dot product is good to 1e-7 to 1.3e-5 of |q| |w| (the rows are
    # unit), depending on the BLAS's summation order (1.3e-5: MKL on AVX-512); the float64
    # sum of the chunks keeps it there, where one float32 dot of 3M entries is 1e-4 off
    scale = float(wd.norm())
    assert float((dots(q, w) - exact).abs().max()) <= 3e-5 * scale
    assert abs(float(dots(q[0], w)) - float(exact[0])) <= 3e-5 * scale
    assert flat_norm(w) == pytest.approx(float(wd.norm()), rel=1e-12)
    assert torch.allclose(row_norms(q), qd.norm(dim=1), rtol=1e-12)
    assert row_norms(q).dtype == torch.float64


def test_many_chunks_against_float64(monkeypatch):
    # a small chunk: the chunked path on every length, sums against the float64 truth
    monkeypatch.setattr(_sums, "CHUNK", 7)
    q, w = _data(100)
    assert torch.allclose(dots(q, w), q.double() @ w.double(), rtol=1e-6)
    assert flat_norm(w) == pytest.approx(float(w.double().norm()), rel=1e-12)
    assert torch.allclose(row_norms(q), q.double().norm(dim=1), rtol=1e-12)
    f64 = w.double()  # float64 vectors are never chunked: the plain reduction
    assert flat_norm(f64) == float(torch.linalg.vector_norm(f64))


def test_tensor_norms_of_sparse_gradients_are_the_dense_tensors_norms():
    """nn.Embedding(sparse=True) gives sparse COO gradients, with repeated indices."""
    dense = torch.zeros(10, 4)
    dense[2] = torch.tensor([1.0, -2.0, 0.5, 3.0])
    dense[7] = torch.tensor([0.0, 4.0, -1.0, 2.0])
    idx = torch.tensor([[2, 7, 2]])  # row 2 twice: halves that coalesce adds up
    vals = torch.stack([dense[2] / 2, dense[7], dense[2] / 2])
    coo = torch.sparse_coo_tensor(idx, vals, (10, 4))
    norms = tensor_norms([coo, dense, dense.to_sparse_csr()])
    assert [float(n) for n in norms] == pytest.approx([float(dense.norm())] * 3, rel=1e-6)
