"""FSDP2 (``fully_shard``) on 2 gloo ranks: first-order curvature equals the single-process
exact curvature on the union of the data, within the first-order tolerance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from landscape.curvature import GGN, Hessian, hessian_trace, top_eigenvalues
from landscape.params import flatten, unflatten
from tests.curvature._dense import dense_ggn, dense_hessian
from tests.distributed import _workers as W
from tests.distributed._launch import run_ranks

pytest.importorskip("torch.distributed.fsdp")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    run_ranks(W.fsdp_curvature_worker, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_fsdp_first_order_matches_one_process_exact(ranks):
    x, y = W.dataset()
    model = W.model()
    H = Hessian(model, F.cross_entropy, (x, y))  # exact, one process, the union
    G = GGN(model, F.cross_entropy, (x, y))
    vs = W.fsdp_vectors(H.dim)
    exact = [flatten(H.matvec(unflatten(v, H._like()))) for v in vs]
    exact_ggn = [flatten(G.matvec(unflatten(v, G._like()))) for v in vs]
    eig = top_eigenvalues(H, k=3, tol=1e-6)
    ggn = top_eigenvalues(G, k=2, tol=1e-6)
    block = top_eigenvalues(H.subset(["0.weight"]), k=1, tol=1e-6)
    trace = hessian_trace(H, "hutch++", n_matvec=12, seed=1)
    assert len(ranks[0]["warnings"]) == 1 and "FSDP-sharded" in ranks[0]["warnings"][0]
    assert ranks[1]["warnings"] == []  # said by rank 0 for every rank
    for r in ranks:
        assert r["backend_used"] == "first_order" and "FSDP" in r["reason"]
        assert "backend='exact'" in r["refused"] and "FSDP" in r["refused"]
        assert "FSDP2 shards" in r["sam"]  # sam_sharpness: not yet, said clearly
        assert r["shapes"] == H.shapes  # whole-parameter shapes, vectors replicated
        for got, want in zip(r["products"], exact):
            assert _rel(got, want) <= 1e-6
        for got, want in zip(r["ggn_products"], exact_ggn):
            assert _rel(got, want) <= 1e-6
        assert _rel(r["eig"], eig.values) <= 1e-6
        assert _rel(r["ggn"], ggn.values) <= 1e-6
        assert _rel(r["block"], block.values) <= 1e-6
        assert abs(r["trace"] - trace.value) <= 1e-6 * abs(trace.value)
        assert abs(float(r["loss"]) - float(H.loss())) <= 1e-12
        assert _rel(flatten(r["grad"]), flatten(H.gradient())) <= 1e-12
        # never left perturbed: the very bits; .grad as before (None)
        assert r["restored"] and r["grads_none"]
    r0, r1 = ranks
    assert torch.equal(r0["eig"], r1["eig"]) and r0["trace"] == r1["trace"]


def test_fsdp_refines_the_step_along_a_sharp_direction_when_the_root_holds_parameters(
    tmp_path,
):
    """The root keeps its gathered parameters after a forward without backward; the
    products must still see the perturbed shards (and L(θ) the unperturbed ones)."""
    run_ranks(W.fsdp_sharp_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    x, y = W.dataset()
    x, y = x.double(), F.one_hot(y, 3).double()
    model = W.SharpModel().double()
    dense = dense_hessian(model, F.mse_loss, (x, y))
    ggn = GGN(W.SharpModel(W.STEEP).double(), F.mse_loss, (x, y))
    for r in (r0, r1):
        assert r["refined"] == 1 and r["ratio"] < 1.0 and r["unchecked"] is None
        for got, v in zip(r["hessian"], W.sharp_directions().double()):
            assert _rel(got, dense @ v) <= 1e-3
        # the GGN's step refined alike on both ranks (its check's scalars are reduced)
        assert r["ggn_refined"] == 1 and r["ggn_ratio"] < 1.0
        for got, v in zip(r["ggn"], W.sharp_directions().double()):
            want = flatten(ggn.matvec(unflatten(v, ggn._like())))
            assert _rel(got, want) <= 1e-4
    assert torch.equal(r0["hessian"][0], r1["hessian"][0])
    assert torch.equal(r0["ggn"][0], r1["ggn"][0])


def test_fsdp_mixed_precision_sizes_the_step_for_the_compute_dtype(tmp_path):
    """bfloat16 forward and backward on float32 shards: a step sized for float32 moved the
    parameters below bfloat16's resolution and the products were 190-290 % off; sized for
    the policy's param_dtype they are within bfloat16's first-order accuracy."""
    run_ranks(W.fsdp_mixed_precision_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    x, y = W.dataset()
    dense = {"hessian": dense_hessian(W.model(), F.cross_entropy, (x, y)),
             "ggn": dense_ggn(W.model(), F.cross_entropy, (x, y))}
    for name in ("hessian", "ggn"):
        assert r0[f"{name}_dtypes"] == (torch.bfloat16, torch.float32)
        for got, other, v in zip(r0[name], r1[name], W.fsdp_vectors(dense[name].shape[0])):
            assert torch.equal(got, other)
            assert _rel(got, dense[name] @ v) <= 0.2
