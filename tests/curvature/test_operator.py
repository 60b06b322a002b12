"""Hessian / GGN operators against dense float64 ground truth (docs/curvature.md)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape.curvature import GGN, Hessian, hessian_trace, top_eigenvalues
from landscape.params import flatten, unflatten
from tests import models
from tests.curvature._dense import dense_ggn, dense_hessian

BACKENDS = ["func", "autograd", "auto"]


def _rand(op, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        unflatten(torch.randn(op.dim, generator=g, dtype=op.dtype), op.parameters) for _ in range(n)
    ]


def _check_products(op, dense, rtol=1e-10):
    vs = _rand(op, 3)
    outs = [*op.matmat(vs), op.matvec(vs[0])]
    for v, out in zip([*vs, vs[0]], outs):
        want = dense @ flatten(v)
        assert torch.allclose(flatten(out), want, rtol=rtol, atol=rtol * float(want.abs().max()))


def tiny_transformer():
    return models.TinyTransformer(vocab=5, d=4, heads=2, layers=1, seq=5, seed=0).double()


def tokens():
    return models.token_data(n=3, seq=5, vocab=5, seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_hessian_matches_dense(backend):
    model = models.mlp().double()
    x, y = models.classification_data()
    batch = (x.double(), y)
    op = Hessian(model, F.cross_entropy, batch, backend=backend)
    dense = dense_hessian(model, F.cross_entropy, batch)
    _check_products(op, dense)
    assert op.n_matvec == 4
    assert op.backend_used == backend
    eig = top_eigenvalues(op, k=3, tol=1e-8)
    want = torch.linalg.eigvalsh(dense).flip(0)[:3]
    assert torch.allclose(eig.values, want, rtol=1e-9)
    assert eig.converged and eig.values.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_cnn_batchnorm_uses_running_statistics(backend):
    model = models.cnn_bn().double()
    x, y = models.image_data()
    batch = (x.double(), y)
    op = Hessian(model, F.cross_entropy, batch, backend=backend)
    dense = dense_hessian(model, F.cross_entropy, batch)  # eval mode: running stats, no dropout
    _check_products(op, dense)
    eig = top_eigenvalues(op, k=2, which="both", tol=1e-8)
    ev = torch.linalg.eigvalsh(dense)
    assert torch.allclose(eig.values, ev.flip(0)[:2], rtol=1e-8)
    assert torch.allclose(eig.smallest.values, ev[:2], rtol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformer_with_sdpa_and_closure(backend):
    model = tiny_transformer()
    batch = tokens()
    op = Hessian(model, data=batch, closure=models.lm_loss, backend=backend)
    dense = dense_hessian(model, closure=models.lm_loss, batch=batch)
    _check_products(op, dense, rtol=1e-9)
    eig = top_eigenvalues(op, k=2, tol=1e-8)
    assert torch.allclose(eig.values, torch.linalg.eigvalsh(dense).flip(0)[:2], rtol=1e-8)


def test_loss_and_gradient_are_cached():
    model = models.mlp().double()
    x, y = models.classification_data()
    op = Hessian(model, F.cross_entropy, (x.double(), y))
    loss = op.loss()
    want = F.cross_entropy(model(x.double()), y)
    assert torch.allclose(loss, want)
    g = torch.autograd.grad(want, list(model.parameters()))
    for a, b in zip(op.gradient(), g):
        assert torch.allclose(a, b)
    assert op.gradient() is op.gradient()
    assert op.n_matvec == 0
    assert not any(t.requires_grad for t in op.gradient())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_ggn_matches_dense_jt_lambda_j(backend, loss):
    model = models.mlp().double()
    x, y = models.classification_data()
    x = x.double()
    if loss == "mse":
        loss_fn, targets = nn.MSELoss(), torch.randn(16, 3, dtype=torch.float64)
    else:
        loss_fn, targets = nn.CrossEntropyLoss(), y
    op = GGN(model, loss_fn, (x, targets), backend=backend)
    dense = dense_ggn(model, loss_fn, (x, targets))
    _check_products(op, dense)
    assert torch.linalg.eigvalsh(op.to_dense()).min() > -1e-12  # PSD
    assert torch.allclose(op.loss(), loss_fn(model(x), targets))


def test_ggn_forward_hook_for_language_models():
    model = tiny_transformer()
    batch = tokens()

    def forward(m, b):
        logits = m(b["ids"][:, :-1])
        return logits.reshape(-1, logits.shape[-1]), b["ids"][:, 1:].reshape(-1)

    op = GGN(model, F.cross_entropy, batch, forward=forward)
    ids = batch["ids"]

    # the same GGN through a custom forward: compare with a reshaping loss on plain batches
    def flat_ce(logits, targets):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    plain = GGN(model, flat_ce, (ids[:, :-1], ids[:, 1:]))
    v = _rand(op, 2)
    for a, b in zip(op.matmat(v), plain.matmat(v)):
        assert torch.allclose(flatten(a), flatten(b), rtol=1e-10, atol=1e-12)
    assert torch.allclose(op.loss(), models.lm_loss(model, batch))


def test_closed_form_linear_least_squares_t1():
    x = torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)) * 3**0.5  # X^T X / N
    x = torch.cat([x, torch.zeros(0, 3, dtype=torch.float64)])
    model = nn.Linear(3, 1, bias=False).double()
    y = torch.randn(3, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    half_mse = lambda z, t: 0.5 * ((z - t) ** 2).mean()  # noqa: E731
    for op in (Hessian(model, half_mse, (x, y)), GGN(model, half_mse, (x, y))):
        eig = top_eigenvalues(op, k=3, tol=1e-10)
        assert torch.allclose(eig.values, torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
        assert abs(abs(float(eig.vectors[0][0][0, 0])) - 1.0) < 1e-8
    # PyTorch's MSE has no 1/2 (docs/curvature.md, "Conventions")
    mse = Hessian(model, nn.MSELoss(), (x, y))
    assert torch.allclose(mse.to_dense(), 2 * torch.diag(torch.tensor([4.0, 1.0, 0.25])).double())


def test_closed_form_linear_softmax_at_zero_t2():
    x = torch.tensor([[2.0, 0], [0, 1], [-2, 0], [0, -1]], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    model = nn.Linear(2, 3, bias=False).double()
    nn.init.zeros_(model.weight)
    want = torch.tensor([0, 0, 1 / 6, 1 / 6, 2 / 3, 2 / 3], dtype=torch.float64)
    for op in (Hessian(model, F.cross_entropy, (x, y)), GGN(model, F.cross_entropy, (x, y))):
        assert torch.allclose(torch.linalg.eigvalsh(op.to_dense()), want, atol=1e-12)


class ScalarNet(nn.Module):
    def __init__(self, w1: float, w2: float) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor([w1], dtype=torch.float64))
        self.w2 = nn.Parameter(torch.tensor([w2], dtype=torch.float64))

    def forward(self, x):
        return self.w2 * self.w1 * x


@pytest.mark.parametrize(
    ("w1", "w2", "h_eigs", "g_eigs"),
    [
        (0.0, 0.0, [-1.0, 1.0], [0.0, 0.0]),
        (1.0, 1.0, [0.0, 2.0], [0.0, 2.0]),
        (1.0, 2.0, [-0.854101966, 5.854101966], [0.0, 5.0]),
    ],
)
def test_closed_form_two_layer_scalar_net_t3(w1, w2, h_eigs, g_eigs):
    model = ScalarNet(w1, w2)
    batch = (torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    half_se = lambda z, t: 0.5 * ((z - t) ** 2).sum()  # noqa: E731
    h = Hessian(model, half_se, batch)
    g = GGN(model, half_se, batch)
    assert torch.allclose(torch.linalg.eigvalsh(h.to_dense()), torch.tensor(h_eigs).double())
    assert torch.allclose(torch.linalg.eigvalsh(g.to_dense()), torch.tensor(g_eigs).double(),
                          atol=1e-12)
    eig = top_eigenvalues(h, k=1, which="both", tol=1e-10)
    assert abs(float(eig.values[0]) - h_eigs[1]) < 1e-9  # algebraic, not largest magnitude
    assert abs(float(eig.smallest.values[0]) - h_eigs[0]) < 1e-9


def test_loader_is_size_weighted_mean_of_batches():
    model = models.mlp().double()
    x, y = models.classification_data(n=16)
    x = x.double()
    whole = Hessian(model, F.cross_entropy, (x, y))
    pieces = [(x[:5], y[:5]), (x[5:7], y[5:7]), (x[7:], y[7:])]
    loader = Hessian(model, F.cross_entropy, iter(pieces))  # a one-shot iterator is fine
    assert loader.batch_weights == (5 / 16, 2 / 16, 9 / 16)
    v = _rand(whole, 2)
    for a, b in zip(whole.matmat(v), loader.matmat(v)):
        assert torch.allclose(flatten(a), flatten(b), rtol=1e-10, atol=1e-13)
    assert torch.allclose(whole.loss(), loader.loss())
    first_two = Hessian(model, F.cross_entropy, pieces, max_batches=2)
    sub = Hessian(model, F.cross_entropy, (x[:7], y[:7]))
    assert torch.allclose(flatten(first_two.matvec(v[0])), flatten(sub.matvec(v[0])))


def test_closure_batches_weighting_and_custom_batch_size():
    model = tiny_transformer()
    batches = [models.token_data(n=2, seq=5, vocab=5, seed=s) for s in (1, 2)]
    batches.append(models.token_data(n=4, seq=5, vocab=5, seed=3))
    op = Hessian(model, data=batches, closure=models.lm_loss)
    assert op.batch_weights == (0.25, 0.25, 0.5)
    whole = {"ids": torch.cat([b["ids"] for b in batches])}
    ref = Hessian(model, data=whole, closure=models.lm_loss)
    v = _rand(op, 1)[0]
    assert torch.allclose(flatten(op.matvec(v)), flatten(ref.matvec(v)), rtol=1e-9, atol=1e-12)
    equal = Hessian(model, data=batches, closure=models.lm_loss, batch_size=lambda b: None)
    assert equal.batch_weights == (1 / 3, 1 / 3, 1 / 3)


def test_parameter_subsets_are_dense_sub_blocks():
    model = models.mlp(depth=3).double()
    x, y = models.classification_data()
    batch = (x.double(), y)
    dense = dense_hessian(model, F.cross_entropy, batch)
    sizes = [p.numel() for p in model.parameters()]
    offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
    names = [n for n, _ in model.named_parameters()]
    for spec in ("2.*", model[4], ["0.weight", "4.bias"]):
        op = Hessian(model, F.cross_entropy, batch, params=spec)
        idx = torch.cat([
            torch.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(names) if n in op.names
        ])
        assert torch.allclose(op.to_dense(), dense[idx][:, idx], rtol=1e-10, atol=1e-13)
    full = Hessian(model, F.cross_entropy, batch)
    sub = full.subset("0.*")
    assert sub.names == ("0.weight", "0.bias") and sub.batch_weights == (1.0,)


def test_top_eigenvalues_by_group():
    from landscape.curvature import top_eigenvalues_by_group

    model = models.mlp(depth=3).double()
    x, y = models.classification_data()
    batch = (x.double(), y)
    res = top_eigenvalues_by_group(model, F.cross_entropy, batch, k=2, tol=1e-8)
    assert list(res) == ["0", "2", "4"]
    for label, r in res.items():
        block = dense_hessian(model, F.cross_entropy, batch, params=f"{label}.*")
        assert torch.allclose(r.values, torch.linalg.eigvalsh(block).flip(0)[:2], rtol=1e-8)
    named = top_eigenvalues_by_group(
        model, F.cross_entropy, batch, groups={"first": model[0], "rest": ["2.*", "4.*"]},
        curvature="ggn",
    )
    assert set(named) == {"first", "rest"}
    # a torch.compile'd model: grouped by the names of the module it compiled
    compiled = top_eigenvalues_by_group(torch.compile(model, backend="aot_eager"),
                                        F.cross_entropy, batch, k=2, tol=1e-8)
    assert list(compiled) == ["0", "2", "4"]
    for label, r in compiled.items():
        assert torch.allclose(r.values, res[label].values, rtol=1e-10)


def test_float32_model_agrees_with_float64_truth():
    model = models.mlp()
    x, y = models.classification_data()
    op = Hessian(model, F.cross_entropy, (x, y))
    assert op.dtype == torch.float32
    dense = dense_hessian(models.mlp().double(), F.cross_entropy, (x.double(), y))
    eig = top_eigenvalues(op, k=2)
    want = torch.linalg.eigvalsh(dense).flip(0)[:2]
    assert torch.allclose(eig.values, want, rtol=1e-4)
    assert eig.vectors[0][0].dtype == torch.float32


class NumpyModel(nn.Module):
    """Reads a parameter through numpy: torch.func cannot transform it, autograd can."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2).double()

    def forward(self, x):
        scale = 1.0 + 0.0 * float(self.lin.weight.detach().numpy().max())
        return self.lin(x) * scale


def test_auto_backend_falls_back_to_double_backward():
    model = NumpyModel()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(5, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1]))
    op = Hessian(model, F.cross_entropy, batch)
    out = op.matmat([op.parameters, op.parameters])
    assert op.backend_used == "autograd" and op.n_matvec == 2
    ref = Hessian(model, F.cross_entropy, batch, backend="autograd").matvec(op.parameters)
    assert torch.allclose(flatten(out[1]), flatten(ref))
    assert op.gradient() is not None
    with pytest.raises(RuntimeError):
        Hessian(model, F.cross_entropy, batch, backend="func").matvec(op.parameters)


def test_bad_arguments():
    model = models.mlp()
    x, y = models.classification_data()
    with pytest.raises(ValueError, match="exactly one"):
        Hessian(model, data=(x, y))
    with pytest.raises(ValueError, match="backend"):
        Hessian(model, F.cross_entropy, (x, y), backend="jax")
    with pytest.raises(ValueError, match="data"):
        Hessian(model, F.cross_entropy, None)
    with pytest.raises(ValueError, match="empty"):
        Hessian(model, F.cross_entropy, [])
    with pytest.raises(ValueError, match="params"):
        Hessian(model, F.cross_entropy, (x, y), params="nope.*")
    # (x1, x2, y) said only "an (inputs, targets) pair", not the form that works (review)
    with pytest.raises(ValueError, match=r"got 3 tensors: give several inputs as "
                                         r"\(\(x1, x2, \.\.\.\), y\)"):
        Hessian(model, F.cross_entropy, (x, x, y))
    op = Hessian(model, F.cross_entropy, (x, y))
    with pytest.raises(ValueError, match="expected a tuple"):
        op.matvec(torch.zeros(op.dim))
    with pytest.raises(ValueError, match="shape"):
        op.matvec(tuple(torch.zeros(3) for _ in op.shapes))


def test_cached_graph_follows_in_place_parameter_updates():
    model = models.mlp().double()
    x, y = models.classification_data()
    batch = (x.double(), y)
    op = Hessian(model, F.cross_entropy, batch, backend="autograd")
    v = _rand(op, 1)[0]
    first = op.matvec(v)
    assert torch.equal(flatten(first), flatten(op.matvec(v)))  # reuses the graph
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    F.cross_entropy(model(batch[0]), y).backward()
    opt.step()  # in-place update: version counters change
    fresh = Hessian(model, F.cross_entropy, batch, backend="autograd", cache_graph=False)
    moved = op.matvec(v)
    assert not torch.allclose(flatten(moved), flatten(first))
    assert torch.allclose(flatten(moved), flatten(fresh.matvec(v)), rtol=1e-12, atol=1e-14)
    op.refresh()
    assert op._graph is None


def test_an_operator_follows_parameters_replaced_through_data():
    """``p.data = ...`` bumps no version counter: the reused operator kept its cached loss,
    gradient and graph while its batched products read the new weights, so an eigenvalue
    matched neither set of weights and the trace mixed both (3.91 against 4.82)."""
    model = models.mlp().double()
    x, y = models.classification_data()
    batch = (x.double(), y)
    op = Hessian(model, F.cross_entropy, batch)
    before = (top_eigenvalues(op).lambda_max, hessian_trace(op).value, float(op.loss()))
    weight = next(model.parameters())
    weight.data = weight.data * 3
    fresh = Hessian(model, F.cross_entropy, batch)
    after = (top_eigenvalues(op).lambda_max, hessian_trace(op).value, float(op.loss()))
    expected = (top_eigenvalues(fresh).lambda_max, hessian_trace(fresh).value,
                float(fresh.loss()))
    assert after == pytest.approx(expected, rel=1e-9)
    assert all(abs(a - b) > 1e-3 * abs(b) for a, b in zip(after, before))


def test_a_model_with_a_sparse_buffer_has_curvature():
    """The cache key read every buffer's data_ptr, which a sparse tensor has none of: a
    graph network with a sparse adjacency buffer raised (own-diff review)."""

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            edges = torch.tensor([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0]])
            adjacency = torch.sparse_coo_tensor(edges, torch.ones(6), (6, 6),
                                                dtype=torch.float64, check_invariants=True)
            self.register_buffer("adjacency", adjacency)
            self.lin = torch.nn.Linear(4, 3).double()

        def forward(self, x):
            return torch.sparse.mm(self.adjacency, self.lin(x))

    model = Graph()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    adjacency = model.adjacency.to_dense()  # the same function, without the sparse buffer
    params = dict(model.named_parameters())
    h = torch.func.hessian(lambda p: F.cross_entropy(
        adjacency @ torch.func.functional_call(model.lin, {k[4:]: v for k, v in p.items()},
                                               (x,)), y))(params)
    names = list(params)
    n = sum(p.numel() for p in params.values())
    full = torch.cat([torch.cat([h[a][b].reshape(params[a].numel(), params[b].numel())
                                 for b in names], 1) for a in names], 0)
    assert full.shape == (n, n)
    top = top_eigenvalues(Hessian(model, F.cross_entropy, (x, y)), tol=1e-8).lambda_max
    assert top == pytest.approx(float(torch.linalg.eigvalsh(full)[-1]), rel=1e-6)


def test_float32_transformer_and_cnn():
    model = models.TinyTransformer(vocab=5, d=4, heads=2, layers=1, seq=5, seed=0)
    batch = tokens()
    dense = dense_hessian(tiny_transformer(), closure=models.lm_loss, batch=batch)
    eig = top_eigenvalues(Hessian(model, data=batch, closure=models.lm_loss), k=1, tol=1e-4)
    assert float(eig.values[0]) == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-4)
    cnn = models.cnn_bn()
    x, y = models.image_data()
    dense = dense_hessian(models.cnn_bn().double(), F.cross_entropy, (x.double(), y))
    eig = top_eigenvalues(Hessian(cnn, F.cross_entropy, (x, y)), k=1, tol=1e-4)
    assert float(eig.values[0]) == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-4)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2).double()
        self.b = nn.Linear(4, 2).double()

    def forward(self, u, w):
        return torch.tanh(self.a(u)) + self.b(w)


def test_data_loader_and_multi_input_batches():
    from torch.utils.data import DataLoader, TensorDataset

    model = models.mlp().double()
    x, y = models.classification_data(n=16)
    x = x.double()
    loader = DataLoader(TensorDataset(x, y), batch_size=5)  # batches of 5, 5, 5, 1
    op = Hessian(model, F.cross_entropy, loader)
    assert op.batch_weights == (5 / 16, 5 / 16, 5 / 16, 1 / 16)
    whole = Hessian(model, F.cross_entropy, (x, y))
    v = _rand(op, 1)[0]
    assert torch.allclose(flatten(op.matvec(v)), flatten(whole.matvec(v)), atol=1e-13)

    two = TwoInputs()
    g = torch.Generator().manual_seed(0)
    u, w = (torch.randn(6, d, generator=g, dtype=torch.float64) for d in (3, 4))
    t = torch.tensor([0, 1, 1, 0, 1, 0])
    single = Hessian(two, F.cross_entropy, ((u, w), t))  # one batch with two model inputs
    assert single.batch_weights == (1.0,)
    split = Hessian(two, F.cross_entropy, [((u[:2], w[:2]), t[:2]), ((u[2:], w[2:]), t[2:])])
    assert split.batch_weights == (2 / 6, 4 / 6)
    dense = dense_hessian(two, lambda out, tt: F.cross_entropy(out, tt), ((u, w), t))
    _check_products(single, dense)
    _check_products(split, dense)


# -- micro-batches ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_microbatches_give_the_whole_batch_operator(backend):
    model = models.mlp().double()
    x, y = models.classification_data()  # 16 samples: micro-batches of 5, 5, 5, 1
    batch = (x.double(), y)
    op = Hessian(model, F.cross_entropy, batch, backend=backend, microbatch_size=5)
    assert op.batch_weights == (5 / 16, 5 / 16, 5 / 16, 1 / 16)
    dense = dense_hessian(model, F.cross_entropy, batch)
    _check_products(op, dense)
    assert op._graph is None  # several micro-batches: nothing cached between products
    assert torch.allclose(op.loss(), F.cross_entropy(model(x.double()), y))
    eig = top_eigenvalues(op, k=2, tol=1e-8)
    assert torch.allclose(eig.values, torch.linalg.eigvalsh(dense).flip(0)[:2], rtol=1e-9)
    ggn = GGN(model, F.cross_entropy, batch, backend=backend, microbatch_size=3)
    _check_products(ggn, dense_ggn(model, F.cross_entropy, batch))


def test_microbatches_of_dict_batches_loaders_and_subsets():
    model = tiny_transformer()
    batches = [models.token_data(n=3, seq=5, vocab=5, seed=1),
               models.token_data(n=5, seq=5, vocab=5, seed=2)]
    op = Hessian(model, data=batches, closure=models.lm_loss, microbatch_size=2)
    # batch weights 3/8 and 5/8, each shared by its micro-batches by sample count
    assert op.batch_weights == pytest.approx((2 / 8, 1 / 8, 2 / 8, 2 / 8, 1 / 8))
    whole = {"ids": torch.cat([b["ids"] for b in batches])}
    dense = dense_hessian(model, closure=models.lm_loss, batch=whole)
    _check_products(op, dense, rtol=1e-9)
    names = [n for n, _ in model.named_parameters()][:2]
    sub = op.subset(names)
    assert sub.microbatch_size == 2 and len(sub.batch_weights) == 5
    _check_products(sub, dense_hessian(model, closure=models.lm_loss, batch=whole,
                                       params=names), rtol=1e-9)


def test_microbatches_keep_batchnorm_running_statistics_and_refuse_train_mode():
    model = models.cnn_bn().double()
    x, y = models.image_data()
    batch = (x.double(), y)
    op = Hessian(model, F.cross_entropy, batch, microbatch_size=3)
    _check_products(op, dense_hessian(model, F.cross_entropy, batch))
    with pytest.raises(ValueError, match="BatchNorm"):
        Hessian(model, F.cross_entropy, batch, microbatch_size=3, eval_mode=False)
    # without batch statistics, train mode is fine (dropout noise is seeded per product)
    xm, ym = models.classification_data()
    Hessian(models.mlp().double(), F.cross_entropy, (xm.double(), ym), microbatch_size=3,
            eval_mode=False)


def test_microbatch_bad_arguments():
    model = models.mlp().double()
    x, y = models.classification_data()
    with pytest.raises(ValueError, match="microbatch_size must be >= 1"):
        Hessian(model, F.cross_entropy, (x.double(), y), microbatch_size=0)
    with pytest.raises(ValueError, match="targets' leading dimension"):
        Hessian(model, F.cross_entropy, (x.double(), y[:4]), microbatch_size=3)
    with pytest.raises(ValueError, match="no batch dimension"):
        Hessian(model, data=(3.0, 4.0), closure=lambda m, b: m.net[0].weight.sum(),
                microbatch_size=3)


def test_microbatches_refuse_batchnorm_without_running_statistics():
    # such a BatchNorm normalises by the batch's statistics even in eval mode
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False),
                          nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = models.classification_data()
    with pytest.raises(ValueError, match="no running statistics"):
        Hessian(model, F.cross_entropy, (x.double(), y), microbatch_size=4)


@pytest.mark.parametrize("sizer", [None, lambda b: None, lambda b: 32, "tokens"])
def test_microbatch_weights_follow_samples_whatever_the_sizer(sizer):
    model = tiny_transformer()
    batches = [models.token_data(n=3, seq=5, vocab=5, seed=1),
               models.token_data(n=5, seq=5, vocab=5, seed=2)]
    if sizer == "tokens":  # additive: a piece's tokens are its share of the batch's
        sizer = lambda b: int(b["ids"].numel())  # noqa: E731
    whole = Hessian(model, data=batches, closure=models.lm_loss, batch_size=sizer)
    op = Hessian(model, data=batches, closure=models.lm_loss, batch_size=sizer,
                 microbatch_size=2)
    # within each batch the pieces share its weight by sample count (2 + 1, 2 + 2 + 1)
    w0, w1 = whole.batch_weights
    assert op.batch_weights == pytest.approx(
        (w0 * 2 / 3, w0 / 3, w1 * 2 / 5, w1 * 2 / 5, w1 / 5))
    assert op._reduce.rank_size == whole._reduce.rank_size  # N_r of the data, not of the pieces
    v = _rand(op, 1)[0]
    assert torch.allclose(flatten(op.matvec(v)), flatten(whole.matvec(v)), rtol=1e-9,
                          atol=1e-12)


def _padded_tokens():
    """An embedding LM batch of 10 rows whose last two hold only ignored (-100) targets."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(7, 5), nn.Tanh(), nn.Linear(5, 7)).double()
    ids, tgt = torch.randint(0, 7, (10, 6)), torch.randint(0, 7, (10, 6))
    for i, length in enumerate([6, 1, 2, 6, 5, 1, 3, 6, 0, 0]):
        tgt[i, length:] = -100

    def token_ce(out, t):
        return F.cross_entropy(out.reshape(-1, 7), t.reshape(-1), ignore_index=-100)

    return model, token_ce, ids, tgt


def valid_tokens(batch):
    return int((batch[1] != -100).sum())


def test_a_piece_or_batch_without_valid_tokens_weighs_nothing():
    # the piece of rows 8-9 has 0 tokens: weight 0, never evaluated (its mean loss is 0/0)
    model, token_ce, ids, tgt = _padded_tokens()
    truth = dense_hessian(model, token_ce, (ids, tgt))
    micro = Hessian(model, token_ce, (ids, tgt), microbatch_size=4, batch_size=valid_tokens)
    assert micro.batch_weights == pytest.approx((0.5, 0.5))
    assert torch.allclose(micro.to_dense(), truth, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        whole_loss = float(token_ce(model(ids), tgt))
    assert float(micro.loss()) == pytest.approx(whole_loss, rel=1e-12)
    loader = Hessian(model, token_ce, [(ids[:8], tgt[:8]), (ids[8:], tgt[8:])],
                     batch_size=valid_tokens)
    assert loader.batch_weights == pytest.approx((1.0,))
    assert torch.allclose(loader.to_dense(), truth, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="every batch has size 0"):
        Hessian(model, token_ce, [(ids[8:], tgt[8:])], batch_size=valid_tokens)


def test_batches_with_ignored_targets_and_no_token_count_are_warned_about():
    """Several batches are weighted by their rows; with -100 targets the loss averages over
    fewer, and the Hessian came out silently off (2.4e-2 in an audit's case)."""
    model, token_ce, ids, tgt = _padded_tokens()
    truth = dense_hessian(model, token_ce, (ids, tgt))
    halves = [(ids[:5], tgt[:5]), (ids[5:], tgt[5:])]
    with pytest.warns(RuntimeWarning, match="targets hold -100") as caught:
        off = Hessian(model, token_ce, halves).to_dense()
    assert caught[0].filename == __file__
    assert not torch.allclose(off, truth, rtol=1e-3)  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the fix, and one batch: no warning
        fixed = Hessian(model, token_ce, halves, batch_size=valid_tokens).to_dense()
        Hessian(model, token_ce, (ids, tgt))
        even = torch.randint(0, 7, tgt.shape)
        even[:, 3:] = -100  # the same share of every batch ignored: rows weigh right
        Hessian(model, token_ce, [(ids[:5], even[:5]), (ids[5:], even[5:])])
    assert torch.allclose(fixed, truth, rtol=1e-9, atol=1e-12)


def test_a_class_weighted_loss_over_batches_is_weighted_by_its_target_weights():
    """conventions.md: the weighted cross-entropy averages over the targets' class weights;
    a float batch_size says so and several batches give the one batch's Hessian."""
    import functools

    torch.manual_seed(0)
    model = models.mlp().double()
    x, y = models.classification_data(20)
    x = x.double()
    w = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    loss = functools.partial(F.cross_entropy, weight=w)
    truth = dense_hessian(model, loss, (x, y))
    halves = [(x[:10], y[:10]), (x[10:], y[10:])]
    by_weight = Hessian(model, loss, halves, batch_size=lambda b: float(w[b[1]].sum()))
    assert torch.allclose(by_weight.to_dense(), truth, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(Hessian(model, loss, halves).to_dense(), truth, rtol=1e-4)


def test_a_summed_loss_over_several_batches_is_refused():
    """Size-weighted batches of a summed loss gave neither the sum nor the mean (3 batches:
    a third of the one batch's curvature)."""
    import functools

    from landscape.surface import line

    model = models.mlp()
    x, y = models.classification_data(24)
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    for summed in (nn.CrossEntropyLoss(reduction="sum"),
                   functools.partial(F.cross_entropy, reduction="sum")):
        with pytest.raises(ValueError, match="reduction='sum' over several batches"):
            Hessian(model, summed, batches)
        with pytest.raises(ValueError, match="reduction='sum' over several batches"):
            line(model, summed, batches, steps=3, progress=False)
        line(model, summed, [(x, y)], steps=3, progress=False)  # a loader of one batch: fine
        one = top_eigenvalues(Hessian(model, summed, (x, y)), tol=1e-6).values[0]
        mean = top_eigenvalues(Hessian(model, F.cross_entropy, (x, y)), tol=1e-6).values[0]
        assert float(one) == pytest.approx(24 * float(mean), rel=1e-4)  # one batch: N x


@pytest.mark.parametrize("backend", ["auto", "func", "autograd", "first_order"])
@pytest.mark.parametrize("how", ["detach", "item"])
def test_a_loss_without_gradient_graph_is_refused_not_measured_as_zero(backend, how):
    """A loss_fn that detaches gave eigenvalues, traces and gradients of exactly 0 (the
    func and first-order paths differentiate it to zeros; "auto" fell back to first
    order on the autograd path's error and said the exact product was impossible)."""
    from landscape.curvature import LossWithoutGraphError, hessian_trace

    def loss_fn(out, y):
        value = F.cross_entropy(out, y)
        return value.detach() if how == "detach" else torch.tensor(value.item())

    model, (x, y) = models.mlp(), models.classification_data()
    for op in (Hessian(model, loss_fn, (x, y), backend=backend),
               GGN(model, loss_fn, (x, y))):
        for measure in (functools.partial(top_eigenvalues, op, k=1),
                        functools.partial(hessian_trace, op, n_matvec=4), op.gradient):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no "exact product impossible" either
                with pytest.raises(LossWithoutGraphError, match="no gradient graph"):
                    measure()
    # a selected subset the loss does not reach has zero curvature, and that is no error
    model.register_parameter("unused", nn.Parameter(torch.ones(3)))
    assert top_eigenvalues(Hessian(model, F.cross_entropy, (x, y), params=[model.unused]),
                           k=1).values.abs().max() == 0


def test_complex_parameters_are_refused_in_one_line():
    """A complex parameter was cast to its real part: eigenvalues of 1503 where the
    Hessian over the real and imaginary parts has 39 (API audit)."""
    from landscape import Monitor

    class Complex(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))

        def forward(self, x):
            return (x.to(torch.complex64) @ self.w).abs()

    model, x, y = Complex(), torch.randn(8, 4), torch.randint(0, 3, (8,))
    for make in (Hessian, GGN):
        with pytest.raises(ValueError, match=r"complex-valued parameters are not supported \(w\)"):
            make(model, F.cross_entropy, (x, y))
    with pytest.raises(ValueError, match="complex-valued parameters are not supported"):
        Monitor(model, F.cross_entropy).start()


def test_a_model_checkpointed_whole_and_reentrantly_is_named_as_such_not_as_a_detached_loss():
    """Every parameter inside a reentrant checkpoint whose inputs need no gradient leaves
    the loss without a graph too: the graph check blamed the loss_fn (review)."""
    from torch.utils.checkpoint import checkpoint

    from landscape.curvature._shifted import NoGradientError

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = models.mlp()

        def forward(self, x):
            return checkpoint(self.body, x, use_reentrant=True)

    x, y = models.classification_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "None of the inputs have requires_grad"
        for backend in ("auto", "first_order"):
            with pytest.raises(NoGradientError, match="reentrant activation checkpoint"):
                top_eigenvalues(Hessian(Checkpointed(), F.cross_entropy, (x, y),
                                        backend=backend), k=1)


def test_a_ggn_of_a_model_returning_a_dataclass_names_forward():
    """A dataclass is no pytree: torch.func fails on it and the autograd product raised
    "'Out' object has no attribute 'requires_grad'" (model-structures audit)."""
    import dataclasses

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            return Out(self.a(x))

    torch.manual_seed(0)
    model = Net().double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    G = GGN(model, lambda o, t: F.cross_entropy(o.logits, t), (x, y))
    with pytest.raises(TypeError, match=r"model's output \(Out\) is no tensor.*forward="):
        G.matvec(G.parameters)
    fixed = GGN(model, F.cross_entropy, (x, y), forward=lambda m, b: (m(b[0]).logits, b[1]))
    plain = GGN(model.a, F.cross_entropy, (x, y))
    torch.testing.assert_close(fixed.to_dense(), plain.to_dense())

    class DictNet(Net):  # a dict is a pytree: its exact GGN needs no forward= (review)
        def forward(self, x):
            return {"logits": self.a(x)}

    as_dict = DictNet().double()
    as_dict.load_state_dict(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        G = GGN(as_dict, lambda o, t: F.cross_entropy(o["logits"], t), (x, y))
        torch.testing.assert_close(G.to_dense(), plain.to_dense())
    assert G.backend_used != "first_order"


def test_a_block_the_loss_never_reaches_has_zero_curvature_without_a_fallback():
    """An auxiliary head the loss does not read: the exact product raised "element 0 of
    tensors does not require grad" and the operator warned it was impossible and took the
    first-order product (model-structures audit); the GGN was quiet already."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.aux = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x)

    torch.manual_seed(0)
    model = Net().double()
    batch = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for cls in (Hessian, GGN):
            op = cls(model, F.cross_entropy, batch, params="aux.*")
            assert all(not t.any() for t in op.matvec(op.parameters))
            assert float(top_eigenvalues(op, k=1).values[0]) == 0.0
            assert op.backend_used == "auto" and op.first_order_reason is None


def test_a_model_of_two_dtypes_is_told_to_select_a_block_of_one():
    """A float64 head on a float32 body: the refusal named the dtypes alone (model-structures
    audit); it names the parameters of each and params=, and a block of one dtype works."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3).double())
    body = model[0]
    model[0] = nn.Sequential(body, _ToDouble())
    batch = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match=r"mix dtypes .*torch.float32: 0\.0\.weight.*"
                                         r"torch.float64: 2\.weight.*params="):
        Hessian(model, F.cross_entropy, batch)
    head = Hessian(model, F.cross_entropy, batch, params="2.*")
    assert head.dtype == torch.float64 and head.dim == 6 * 3 + 3


class _ToDouble(nn.Module):
    def forward(self, x):
        return x.double()
