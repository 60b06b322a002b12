"""Exact products that torch differentiates wrongly without an error are caught by symmetry.

The truth is a twin model computing the same function with operations whose second
derivatives torch gets right (``torch.tanh`` for a ``@once_differentiable`` tanh, the weight
norm written out for ``parametrizations.weight_norm``), differentiated densely in float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from landscape.curvature import GGN, Hessian, hessian_trace, top_eigenvalues
from landscape.curvature._symmetry import asymmetry, rademacher
from tests.curvature._dense import dense_ggn, dense_hessian


class _OnceTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _Net(nn.Module):
    def __init__(self, once: bool):
        super().__init__()
        self.a, self.b, self.once = nn.Linear(3, 5), nn.Linear(5, 3), once

    def forward(self, x):
        h = self.a(x)
        return self.b(_OnceTanh.apply(h) if self.once else torch.tanh(h))


class _WrittenOutWeightNorm(nn.Module):
    """``w = g v / ||v||`` per output row, in plain differentiable operations."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        p = layer.parametrizations.weight
        self.g = nn.Parameter(p.original0.detach().clone())
        self.v = nn.Parameter(p.original1.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone())

    def forward(self, x):
        w = self.g * self.v / self.v.norm(dim=1, keepdim=True)
        return F.linear(x, w, self.bias)


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,),
                                                                              generator=g)


def _once_pair():
    torch.manual_seed(0)
    broken, twin = _Net(True).double(), _Net(False).double()
    twin.load_state_dict(broken.state_dict())
    return broken, twin


def _weight_norm_pair():
    torch.manual_seed(0)
    first = nn.utils.parametrizations.weight_norm(nn.Linear(3, 6))
    broken = nn.Sequential(first, nn.Tanh(), nn.Linear(6, 3)).double()
    twin = nn.Sequential(_WrittenOutWeightNorm(broken[0]), nn.Tanh(), nn.Linear(6, 3)).double()
    twin[2].load_state_dict(broken[2].state_dict())
    return broken, twin


@pytest.mark.parametrize("pair", [_once_pair, _weight_norm_pair])
def test_auto_takes_the_first_order_product_and_gets_the_truth(pair):
    broken, twin = pair()
    batch = _batch()
    truth = torch.linalg.eigvalsh(dense_hessian(twin, F.cross_entropy, batch)).flip(0)
    exact = Hessian(broken, F.cross_entropy, batch, backend="exact")
    with pytest.warns(RuntimeWarning, match="not symmetric"):
        wrong = top_eigenvalues(exact, k=2, tol=1e-8).values
    assert float(((wrong - truth[:2]) / truth[:2]).abs().max()) > 1e-3  # what it was
    op = Hessian(broken, F.cross_entropy, batch)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = top_eigenvalues(op, k=2, tol=1e-8).values
        trace = hessian_trace(op, "hutchinson", n_matvec=8, seed=0)
    assert op.backend_used == "first_order" and "not symmetric" in op.first_order_reason
    said = [w for w in seen if "not symmetric" in str(w.message)]
    assert len(said) == 1 and "first-order product" in str(said[0].message)  # once
    torch.testing.assert_close(got, truth[:2], rtol=1e-6, atol=1e-9)
    assert trace.n_matvec == 8


def test_the_ggn_of_a_once_differentiable_model_is_caught_too():
    broken, twin = _once_pair()
    batch = _batch()
    truth = dense_ggn(twin, F.cross_entropy, batch)
    with pytest.warns(RuntimeWarning, match="not symmetric"):
        op = GGN(broken, F.cross_entropy, batch)
        got = torch.stack([torch.cat([t.reshape(-1) for t in op.matvec(
            tuple(c.reshape(p.shape) for c, p in zip(col.split(
                [p.numel() for p in op.parameters]), op.parameters)))])
            for col in torch.eye(op.dim, dtype=torch.float64)], dim=1)
    assert op.backend_used == "first_order"
    torch.testing.assert_close(got, truth, rtol=1e-5, atol=1e-8)


def test_healthy_models_keep_the_exact_product_and_the_check_runs_once_per_model(
        monkeypatch):
    from landscape.curvature import _model_operator

    _, twin = _once_pair()
    batch = _batch()
    measured = []
    monkeypatch.setattr(_model_operator, "asymmetry",
                        lambda *a: measured.append(asymmetry(*a)) or measured[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        first = Hessian(twin, F.cross_entropy, batch)
        first.matvec(first.parameters)
        second = Hessian(twin, F.cross_entropy, batch)  # a monitor's next measurement
        second.matvec(second.parameters)
        second.matmat([second.parameters] * 2)  # the batched path: checked once too
        Hessian(twin, F.cross_entropy, batch).matmat([second.parameters] * 2)
    assert first.backend_used == second.backend_used == "auto"
    assert first.n_matvec == 1 and second.n_matvec == 3  # the check's products are not counted
    assert len(measured) == 2 and max(measured) < 1e-12  # one per product path, float64


def test_the_estimate_reads_the_antisymmetric_share_of_an_explicit_matrix():
    g = torch.Generator().manual_seed(0)
    n = 400
    s = torch.randn(n, n, generator=g, dtype=torch.float64)
    k = torch.randn(n, n, generator=g, dtype=torch.float64)
    sym, anti = s + s.T, k - k.T
    vs = [rademacher([torch.Size([n])], torch.float64, torch.device("cpu"), seed)
          for seed in (1, 2, 3)]

    def estimate(a):
        return asymmetry(vs, [(a @ v[0],) for v in vs])

    assert estimate(sym) < 1e-14
    for share in (0.01, 0.1, 0.5):
        a = sym + share * anti * sym.norm() / anti.norm()
        want = float(0.5 * (a - a.T).norm() / a.norm())
        assert 0.3 * want < estimate(a) < 3 * want
    assert asymmetry(vs, [(torch.zeros(n, dtype=torch.float64),)] * 3) == 0.0


class _BrokenInTraining(_Net):
    """The once-differentiable tanh only in train mode (eval mode takes torch.tanh)."""

    def forward(self, x):
        h = self.a(x)
        return self.b(_OnceTanh.apply(h) if self.training else torch.tanh(h))


def test_a_function_broken_only_in_train_mode_is_checked_for_that_mode():
    """The verdict was remembered per model and parameters alone: an eval-mode operator
    checked first left a later eval_mode=False operator wrong without a word (review)."""
    torch.manual_seed(0)
    model = _BrokenInTraining(once=True).double()
    batch = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        evaluated = Hessian(model, F.cross_entropy, batch)
        evaluated.matvec(evaluated.parameters)
    assert evaluated.backend_used == "auto"
    with pytest.warns(RuntimeWarning, match="not symmetric"):
        trained = Hessian(model, F.cross_entropy, batch, eval_mode=False)
        trained.matvec(trained.parameters)
    assert trained.backend_used == "first_order"


def _converged_mlp():
    """A float32 tanh classifier trained by L-BFGS to a loss near 1e-7 (separable data)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 8, generator=g)
    y = (x @ torch.randn(8, 4, generator=g)).argmax(1)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=40,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    return model, (x, y)


def test_rounding_near_zero_loss_is_not_taken_for_a_wrong_derivative():
    model, batch = _converged_mlp()
    assert F.cross_entropy(model(batch[0]), batch[1]) < 1e-6
    op = Hessian(model, F.cross_entropy, batch, backend="exact")
    vs = [rademacher(op.shapes, op.dtype, op.device, s) for s in (1, 2, 3)]
    assert asymmetry(vs, [op.matvec(v) for v in vs]) > 1e-3  # far above float32's 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        op = Hessian(model, F.cross_entropy, batch)
        got = float(top_eigenvalues(op, k=1).values[0])
    assert op.backend_used == "auto"  # the exact product kept
    wide = model.double()
    truth = float(torch.linalg.eigvalsh(dense_hessian(
        wide, F.cross_entropy, (batch[0].double(), batch[1])))[-1])
    assert got == pytest.approx(truth, rel=0.05)  # the first-order product gave half of it


class _DetachedTanh(torch.autograd.Function):
    """tanh whose backward takes the incoming gradient as a constant (once-differentiable)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g.detach() * (1 - y**2)


class _BrokenUnderFunc(nn.Module):
    """Differentiated wrongly under torch.func only: the vmapped path is broken, autograd's
    double backward is right."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        under_func = torch._C._functorch.is_functorch_wrapped_tensor(h)
        return self.b(_DetachedTanh.apply(h) if under_func else torch.tanh(h))


def test_the_rounding_is_measured_on_the_path_it_checks():
    """The product along the sum of two vectors must come from the checked path: from the
    other one, the difference between the paths read as rounding and cleared a wrong
    vmapped product. Caught, the batched products loop over exact double-backward ones
    (the first-order product before)."""
    torch.manual_seed(0)
    model = _BrokenUnderFunc().double()
    x, y = _batch()
    op = Hessian(model, F.cross_entropy, (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        op.matmat([op.parameters] * 2)
    assert op.backend_used == "autograd"
    truth = dense_hessian(model, F.cross_entropy, (x, y))
    u, w = (tuple(torch.randn_like(p) for p in op.parameters) for _ in range(2))
    flat = torch.cat([t.reshape(-1) for t in u])
    au, _ = op.matmat([u, w])
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in au]), truth @ flat,
                               rtol=1e-6, atol=1e-9)


class _WrongForwardMode(torch.autograd.Function):
    """y = a * b whose forward-mode derivative drops b's tangent; backward (and so double
    backward) is right: torch.func's forward-over-reverse product is wrong, autograd's not."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, b):
        return a * b

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return g * b, g * a

    @staticmethod
    def jvp(ctx, ta, tb):
        _, b = ctx.saved_tensors
        return ta * b


class _Gated(nn.Module):
    def __init__(self, wrong: bool):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 5), nn.Linear(3, 5), nn.Linear(5, 3)
        self.wrong = wrong

    def forward(self, x):
        u, v = torch.tanh(self.a(x)), torch.tanh(self.b(x))
        return self.c(_WrongForwardMode.apply(u, v) if self.wrong else u * v)


def test_an_asymmetric_batched_path_alone_keeps_the_exact_double_backward_product():
    """Only torch.func's vmapped products were wrong (BERT's, 2e-3 off in float64), yet
    "auto" dropped to the first-order product and blamed the model (integrations review):
    batched products now loop over exact double-backward ones."""
    torch.manual_seed(0)
    broken, twin = _Gated(True).double(), _Gated(False).double()
    twin.load_state_dict(broken.state_dict())
    batch = _batch()
    truth = dense_hessian(twin, F.cross_entropy, batch)
    with pytest.warns(RuntimeWarning, match="not symmetric"):  # func by name: said wrong
        Hessian(broken, F.cross_entropy, batch, backend="func").matmat(
            [rademacher([p.shape for p in broken.parameters()], torch.float64, "cpu", 9)] * 2)
    for backend in ("auto", "exact"):
        op = Hessian(broken, F.cross_entropy, batch, backend=backend)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            vs = [rademacher(op.shapes, torch.float64, "cpu", seed) for seed in (4, 5, 6)]
            got = op.matmat(vs)
        assert op.backend_used == "autograd"
        for v, hv in zip(vs, got):
            flat_v = torch.cat([t.reshape(-1) for t in v])
            torch.testing.assert_close(torch.cat([t.reshape(-1) for t in hv]), truth @ flat_v,
                                       rtol=1e-10, atol=1e-12)
