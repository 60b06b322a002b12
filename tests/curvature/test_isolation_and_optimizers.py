"""The operators leave the model untouched; Adam preconditioning; stability thresholds."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape.curvature import (
    GGN,
    Hessian,
    MatrixOperator,
    hessian_trace,
    preconditioned,
    spectral_density,
    stability_threshold,
    top_eigenvalues,
)
from landscape.isolation import isolated
from landscape.params import flatten
from tests import models
from tests.curvature._dense import dense_hessian


def _snapshot(model):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "param_ids": [id(p) for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "grad_values": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    }


def _assert_same(before, model):
    after = _snapshot(model)
    assert after["param_ids"] == before["param_ids"]
    assert all(torch.equal(a, b) for a, b in zip(before["params"], after["params"]))
    assert after["requires_grad"] == before["requires_grad"]
    assert all(a is b for a, b in zip(before["grads"], after["grads"]))
    for a, b in zip(before["grad_values"], after["grad_values"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert all(torch.equal(before["buffers"][n], b) for n, b in after["buffers"].items())
    assert after["modes"] == before["modes"]
    assert torch.equal(after["rng"], before["rng"])
    assert after["hooks"] == before["hooks"]
    assert all(p.grad is None or p.grad.grad_fn is None for p in model.parameters())


@pytest.mark.parametrize("backend", ["auto", "autograd"])
def test_model_is_untouched_cnn_in_train_mode_with_grads(backend):
    model = models.cnn_bn().double()  # SmallCNN calls torch.manual_seed in __init__
    x, y = models.image_data()
    x = x.double()
    model.train()
    F.cross_entropy(model(x), y).backward()  # populated .grad; BN stats move in train mode
    model.bn.weight.grad = None  # one parameter without a gradient
    model.conv.bias.requires_grad_(False)
    before = _snapshot(model)
    for op in (Hessian(model, F.cross_entropy, (x, y), backend=backend),
               GGN(model, F.cross_entropy, [(x[:6], y[:6]), (x[6:], y[6:])], backend=backend)):
        op.loss()
        op.gradient()
        top_eigenvalues(op, k=2, which="both", max_matvec=20)
        hessian_trace(op, "hutch++", 6)
        spectral_density(op, lanczos_steps=5, n_probes=2)
        _assert_same(before, model)
    assert "conv.bias" not in op.names


def test_model_is_untouched_transformer_and_eval_mode_false_is_deterministic():
    model = models.TinyTransformer(vocab=5, d=4, heads=2, seq=5, dropout=0.3).double()
    batch = models.token_data(n=2, seq=5, vocab=5)
    before = _snapshot(model)
    op = Hessian(model, data=batch, closure=models.lm_loss, eval_mode=False)
    v = op.parameters
    a, b = op.matvec(v), op.matvec(v)  # the same dropout masks for every product
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    top_eigenvalues(op, k=1, max_matvec=10)
    _assert_same(before, model)
    evals = Hessian(model, data=batch, closure=models.lm_loss)
    assert not all(torch.equal(s, t) for s, t in zip(a, evals.matvec(v)))  # dropout was on



def test_ggn_in_train_mode_draws_one_dropout_mask_per_product_on_every_backend():
    """The func backend runs the model twice per product (J v, then J^T u): both forwards
    draw the same mask, so the product is J^T Lambda J of that mask (symmetric), as with
    the autograd backend's single forward. Was J_b^T Lambda J_a: asymmetric by 1e-1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    want = GGN(model, F.cross_entropy, (x, y), eval_mode=False, backend="autograd").to_dense()
    got = GGN(model, F.cross_entropy, (x, y), eval_mode=False, backend="func").to_dense()
    assert torch.allclose(want, want.T, atol=1e-14)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    evals = GGN(model, F.cross_entropy, (x, y), backend="func").to_dense()
    assert not torch.allclose(evals, want)  # dropout was on

@pytest.mark.parametrize("caller", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("backend", ["auto", "first_order"])
def test_a_no_grad_or_inference_mode_caller_gets_the_same_products(caller, backend):
    """Under inference_mode the exact product failed (nothing differentiable), the automatic
    fallback to first-order products then returned zeros: lambda_max = 0, silently."""
    model = models.mlp().double()
    x, y = models.classification_data()
    op = Hessian(model, F.cross_entropy, (x.double(), y), backend=backend)
    want = op.matvec(op.parameters)
    with caller():
        inside = Hessian(model, F.cross_entropy, (x.double(), y), backend=backend)
        out = inside.matvec(inside.parameters)
        g = inside.gradient()
    assert all(not t.requires_grad for t in (*out, *g))
    for a, b in zip(out, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# -- Adam preconditioning ---------------------------------------------------------------------
def test_adam_preconditioned_operator_equals_dense_d_h_d():
    model = models.mlp().double()
    x, y = models.classification_data()
    batch = (x.double(), y)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-3)
    with pytest.raises(ValueError, match="optimizer step"):
        preconditioned(Hessian(model, F.cross_entropy, batch), opt)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(batch[0]), y).backward()
        opt.step()
    op = preconditioned(Hessian(model, F.cross_entropy, batch), opt)
    p_diag = torch.cat([
        ((opt.state[p]["exp_avg_sq"] / (1 - 0.99**3)).sqrt() + 1e-3).reshape(-1)
        for p in model.parameters()
    ])
    d = torch.diag(p_diag.rsqrt())
    want = d @ dense_hessian(model, F.cross_entropy, batch) @ d
    assert torch.allclose(op.to_dense(), want, rtol=1e-10, atol=1e-12)
    eig = top_eigenvalues(op, k=1, tol=1e-9)
    assert float(eig.values[0]) == pytest.approx(float(torch.linalg.eigvalsh(want)[-1]), rel=1e-8)
    assert op.eps == 1e-3 and 0.0 <= op.dead_fraction <= 1.0
    assert torch.equal(op.loss(), op.base.loss())
    sub = Hessian(model, F.cross_entropy, batch, params="2.*")  # a subset works too
    assert preconditioned(sub, opt).dim == sub.dim
    with pytest.raises(ValueError, match="betas/eps"):
        preconditioned(sub, torch.optim.SGD(model.parameters(), lr=0.1))


def test_preconditioned_sharpness_closed_form_t8():
    op = MatrixOperator(torch.diag(torch.tensor([2.0, 8.0], dtype=torch.float64)))
    pre = preconditioned(op, [torch.tensor([1.0, 4.0], dtype=torch.float64)])
    assert float(top_eigenvalues(pre, k=1, tol=1e-12).values[0]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="> 0"):
        preconditioned(op, [torch.tensor([1.0, 0.0], dtype=torch.float64)])


# -- stability thresholds (T7) ----------------------------------------------------------------
def test_thresholds_by_name_t7():
    assert stability_threshold("gd", 0.01) == pytest.approx(200.0)
    assert stability_threshold("heavy_ball", 0.01, momentum=0.9) == pytest.approx(380.0)
    assert stability_threshold("nesterov", 0.01, momentum=0.9) == pytest.approx(135.714285714)
    assert stability_threshold("adam", 0.01, betas=(0.9, 0.999)) == pytest.approx(3800.0)
    assert stability_threshold("adam", 1.0) == pytest.approx(38.0)
    assert stability_threshold("rmsprop", 0.1) == pytest.approx(20.0)


def test_thresholds_from_optimizers():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert stability_threshold(torch.optim.SGD(params, lr=0.1)) == pytest.approx(20.0)
    sgd = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    assert stability_threshold(sgd) == pytest.approx(380.0)
    assert stability_threshold(sgd, lr=0.02) == pytest.approx(190.0)
    damp = torch.optim.SGD(params, lr=0.01, momentum=0.9, dampening=0.5)
    assert stability_threshold(damp) == pytest.approx(760.0)
    # torch dampens the momentum buffer only: without momentum dampening changes nothing
    # (a quadratic at 0.97 x the 40 it gave diverges under torch's SGD)
    plain = torch.optim.SGD(params, lr=0.1, momentum=0.0, dampening=0.5)
    assert stability_threshold(plain) == pytest.approx(20.0)
    assert stability_threshold("sgd", 0.1, dampening=0.5) == pytest.approx(20.0)
    nest = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True)
    assert stability_threshold(nest) == pytest.approx(135.714285714)
    adamw = torch.optim.AdamW(params, lr=torch.tensor(0.01), betas=(0.8, 0.99))
    assert stability_threshold(adamw) == pytest.approx(3.6 / 0.2 / 0.01)


def test_learning_rate_reads_every_form_a_parameter_group_holds():
    from decimal import Decimal

    import numpy as np

    from landscape.curvature.stability import learning_rate

    assert learning_rate(0.1) == 0.1 and learning_rate(1) == 1.0
    assert learning_rate(np.float32(0.5)) == 0.5 and learning_rate(np.array(0.5)) == 0.5
    assert learning_rate(Decimal("0.1")) == 0.1
    assert learning_rate(torch.tensor(3e-4)) == pytest.approx(3e-4)
    for unreadable in (None, "0.1", torch.ones(2), np.ones(2), object()):
        assert math.isnan(learning_rate(unreadable))
    assert stability_threshold("gd", np.array(0.1)) == pytest.approx(20.0)
    with pytest.raises(ValueError, match=r"lr must be a number, got '0\.1'"):
        stability_threshold("gd", "0.1")  # a string is no learning rate


def test_threshold_matches_simulated_divergence_of_heavy_ball():
    lr, beta = 0.01, 0.9
    limit = stability_threshold("heavy_ball", lr, momentum=beta)
    for lam, stable in ((0.9 * limit, True), (1.1 * limit, False)):
        theta = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
        opt = torch.optim.SGD([theta], lr=lr, momentum=beta)
        for _ in range(300):
            opt.zero_grad()
            (0.5 * lam * theta**2).sum().backward()
            opt.step()
        assert (abs(float(theta)) < 1.0) == stable


def test_threshold_errors():
    with pytest.raises(ValueError, match="unknown optimizer"):
        stability_threshold("lion", 0.1)
    with pytest.raises(ValueError, match="lr"):
        stability_threshold("gd")
    with pytest.raises(ValueError, match="momentum"):
        stability_threshold("heavy_ball", 0.1)
    with pytest.raises(ValueError, match="no stability threshold"):
        stability_threshold(torch.optim.LBFGS([torch.nn.Parameter(torch.zeros(1))]))
    with pytest.raises(ValueError, match="lr must"):
        stability_threshold("gd", -1.0)


def test_flat_helpers_roundtrip():
    op = MatrixOperator(torch.eye(6, dtype=torch.float64) * 2, shapes=[(2, 2), (2,)])
    v = (torch.ones(2, 2, dtype=torch.float64), torch.arange(2.0, dtype=torch.float64))
    assert torch.equal(flatten(op.matvec(v)), 2 * flatten(v))


def test_loss_and_gradient_follow_an_in_place_optimizer_step():
    """``loss()`` and ``gradient()`` are cached until the parameters change, as products are."""
    model = models.mlp()
    x, y = models.classification_data()
    op = Hessian(model, F.cross_entropy, (x, y))
    before = float(op.loss())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert float(op.loss()) == pytest.approx(float(loss), rel=1e-6)
    assert float(op.loss()) != pytest.approx(before, rel=1e-6)
    torch.testing.assert_close(flatten(op.gradient()),
                               flatten([p.grad for p in model.parameters()]))


# -- normalisation on batch statistics ---------------------------------------------------------
def _bn_dropout_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.5),
                          nn.Linear(5, 3)).double()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 3, (12,))
    with torch.no_grad():  # running statistics away from the batch's
        for _ in range(3):
            model(2.0 * torch.randn(12, 3, dtype=torch.float64) + 1.0)
    return model, (x, y)


def test_batch_statistics_is_the_train_mode_normalisation_without_dropout():
    """Dense float64 truth: BatchNorm in train mode, every other module in eval mode."""
    import copy

    model, (x, y) = _bn_dropout_mlp()
    before = _snapshot(model)
    got = Hessian(model, F.cross_entropy, (x, y), batch_statistics=True).to_dense()
    _assert_same(before, model)  # running statistics, modes, RNG all as they were
    truth = copy.deepcopy(model).eval()
    truth[1].train()
    names = [n for n, _ in truth.named_parameters()]
    buffers = {n: b.clone() for n, b in truth.named_buffers()}

    def loss(*tensors):
        out = torch.func.functional_call(truth, ({**dict(zip(names, tensors)), **buffers}), (x,))
        return F.cross_entropy(out, y)

    blocks = torch.autograd.functional.hessian(loss, tuple(p.detach() for p in truth.parameters()))
    sizes = [p.numel() for p in truth.parameters()]
    want = torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j])
                                 for j in range(len(sizes))], 1) for i in range(len(sizes))])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # neither eval mode (running statistics) nor train mode (dropout on) is this function
    assert not torch.allclose(Hessian(model, F.cross_entropy, (x, y)).to_dense(), want)
    train = Hessian(model, F.cross_entropy, (x, y), eval_mode=False).to_dense()
    assert not torch.allclose(train, want)
    # the first-order product evaluates the same function
    v = Hessian(model, F.cross_entropy, (x, y)).parameters
    first = Hessian(model, F.cross_entropy, (x, y), batch_statistics=True, backend="first_order")
    torch.testing.assert_close(flatten(first.matvec(v)), want @ flatten(v), rtol=1e-5, atol=1e-7)
    _assert_same(before, model)


def test_batch_statistics_refuses_micro_batches_in_one_line():
    model, batch = _bn_dropout_mlp()
    with pytest.raises(ValueError, match="with batch_statistics=True would normalise each"):
        Hessian(model, F.cross_entropy, batch, batch_statistics=True, microbatch_size=4)
    Hessian(model, F.cross_entropy, batch, microbatch_size=4)  # running statistics: fine
    # inside an enclosing block (the monitor's eval block) the modes before it count
    with isolated(model), pytest.raises(ValueError, match="batch_statistics=True"):
        Hessian(model, F.cross_entropy, batch, batch_statistics=True, microbatch_size=4)


def test_batch_statistics_takes_micro_batches_when_the_batchnorm_is_frozen():
    """A BatchNorm the user froze in eval mode (fine-tuning) keeps its running statistics
    under batch_statistics, so micro-batches give the whole batch's operator."""
    model, batch = _bn_dropout_mlp()
    model[1].eval()  # frozen; the rest trains
    whole = Hessian(model, F.cross_entropy, batch, batch_statistics=True).to_dense()
    micro = Hessian(model, F.cross_entropy, batch, batch_statistics=True, microbatch_size=4)
    torch.testing.assert_close(micro.to_dense(), whole, rtol=1e-10, atol=1e-12)
    with isolated(model):  # the monitor's block: the frozen mode is read from before it
        inside = Hessian(model, F.cross_entropy, batch, batch_statistics=True,
                         microbatch_size=4).to_dense()
    torch.testing.assert_close(inside, whole, rtol=1e-10, atol=1e-12)


class _Masked(nn.Module):
    """A linear layer behind a fixed mask buffer (as a causal mask or a rotary cache)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("mask", (torch.arange(4) % 2).float())

    def forward(self, x):
        return self.lin(x * self.mask)


def test_batch_statistics_copies_no_buffer_of_a_model_without_normalisation(monkeypatch):
    """Only the layers it trains can write buffers: the mask is not cloned for it."""
    torch.manual_seed(0)
    model = _Masked().double()
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    mask = model.mask.data_ptr()
    copied = []
    clone = torch.Tensor.clone

    def counting_clone(self, *args, **kwargs):
        if self.data_ptr() == mask:
            copied.append(1)
        return clone(self, *args, **kwargs)

    counts = []
    for options in ({}, {"batch_statistics": True}):
        op = Hessian(model, F.cross_entropy, batch, backend="func", **options)
        v = op.parameters
        op.matvec(v)  # the first product of a model checks its symmetry first
        monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
        copied.clear()
        op.matvec(v)
        monkeypatch.undo()
        counts.append(len(copied))
    assert counts[1] == counts[0]  # what eval mode copies anyway (functional_call), no more


def test_batch_statistics_copies_no_statistics_of_a_frozen_batchnorm(monkeypatch):
    """A frozen BatchNorm reads its running statistics and writes none: they are copied
    no more than any eval-mode product copies them, while a training one's are."""
    counts = []
    for frozen, options in ((False, {"batch_statistics": True}),
                            (True, {"batch_statistics": True}), (True, {})):
        model, batch = _bn_dropout_mlp()
        if frozen:
            model[1].eval()
        stats = model[1].running_mean.data_ptr()
        copied: list[int] = []

        def counting_clone(self, *args, _stats=stats, _copied=copied,
                           _clone=torch.Tensor.clone, **kwargs):
            if self.data_ptr() == _stats:
                _copied.append(1)
            return _clone(self, *args, **kwargs)

        op = Hessian(model, F.cross_entropy, batch, backend="func", **options)
        v = op.parameters
        monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
        op.matvec(v)
        monkeypatch.undo()
        counts.append(len(copied))
    assert counts[1] == counts[2] < counts[0]
