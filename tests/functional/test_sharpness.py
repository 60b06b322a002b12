"""SAM / ASAM sharpness and stability thresholds (docs/metrics.md, docs/curvature.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from landscape.curvature import stability_threshold
from landscape.functional import (
    MetricError,
    asam_sharpness,
    sam_sharpness,
    stability_ratio,
)
from tests import models
from tests.functional._support import assert_untouched, prepare_dirty_model, snapshot

SETTINGS = settings(max_examples=20, deadline=None)


class Quadratic(nn.Module):
    """Outputs its parameter; with :func:`quad_loss` the loss is 1/2 w^T A w (A = targets)."""

    def __init__(self, w) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.float64).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w


def quad_loss(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return 0.5 * w @ a @ w


class Product(nn.Module):
    """f = w2 * w1 * x (docs/metrics.md, "Sharpness")."""

    def __init__(self, w1: float, w2: float) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor([w1], dtype=torch.float64))
        self.w2 = nn.Parameter(torch.tensor([w2], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2 * self.w1 * x


def half_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - target) ** 2).mean()


X1 = torch.ones(1, dtype=torch.float64)


# ----------------------------------------------------------------------------- SAM


def test_sam_quadratic_known_answer():
    a = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    res = sam_sharpness(Quadratic([1.0, 0.0]), quad_loss, X1, a, rho=0.1)
    assert float(res) == pytest.approx(0.42, abs=1e-14)
    assert float(res.loss) == 2.0 and float(res.grad_norm) == pytest.approx(4.0)


@SETTINGS
@given(seed=st.integers(0, 10_000), d=st.integers(1, 6), rho=st.floats(1e-3, 1.0))
def test_sam_first_order_closed_form_on_random_quadratics(seed, d, rho):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(d, d, generator=g, dtype=torch.float64)
    a = b @ b.T + 0.1 * torch.eye(d, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    aw = a @ w
    expected = rho * aw.norm() + 0.5 * rho**2 * (w @ a @ a @ a @ w) / (aw @ aw)
    res = sam_sharpness(Quadratic(w), quad_loss, X1, a, rho=rho)
    assert float(res) == pytest.approx(float(expected), rel=1e-10)


def test_sam_at_the_minimum_needs_a_fallback_direction():
    a = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    model = Quadratic([0.0, 0.0])
    res = sam_sharpness(model, quad_loss, X1, a, rho=0.1)
    assert res.reason == "zero_gradient" and math.isnan(float(res))
    with pytest.raises(MetricError, match="zero_gradient"):
        sam_sharpness(model, quad_loss, X1, a, rho=0.1, strict=True)
    top = [torch.tensor([1.0, 0.0], dtype=torch.float64)]  # top Hessian eigenvector
    res = sam_sharpness(model, quad_loss, X1, a, rho=0.1, fallback_direction=top)
    assert res.used_fallback and float(res) == pytest.approx(0.5 * 0.01 * 4.0)  # rho^2 lmax / 2


def test_sam_infinity_norm_ball():
    a = torch.diag(torch.tensor([4.0, 1.0, 2.0], dtype=torch.float64))
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    rho = 0.05
    eps = rho * torch.sign(a @ w)
    expected = quad_loss(w + eps, a) - quad_loss(w, a)
    res = sam_sharpness(Quadratic(w), quad_loss, X1, a, rho=rho, p=math.inf)
    assert float(res) == pytest.approx(float(expected), rel=1e-12)


# ----------------------------------------------------------------------------- ASAM


@pytest.mark.parametrize(
    ("w1", "w2", "sam", "asam"),
    [
        (1.0, 1.0, 0.083930, 0.083930),
        (3.0, 1 / 3, 0.197359, 0.083930),
        (0.1, 10.0, 1.000225, 0.083930),
    ],
)
def test_sam_vs_asam_on_a_rescaled_product(w1, w2, sam, asam):
    target = torch.tensor([0.5], dtype=torch.float64)
    model = Product(w1, w2)
    assert float(sam_sharpness(model, half_mse, X1, target, rho=0.1)) == pytest.approx(
        sam, abs=1e-6
    )
    assert float(asam_sharpness(model, half_mse, X1, target, rho=0.1, eta=0.0)) == pytest.approx(
        asam, abs=1e-6
    )


def test_asam_one_dimensional_known_answer():
    res = asam_sharpness(
        Quadratic([2.0]), quad_loss, X1, torch.eye(1, dtype=torch.float64), rho=0.5, eta=0.0
    )
    assert float(res) == pytest.approx(2.5, abs=1e-14)


def _relu_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()


@SETTINGS
@given(seed=st.integers(0, 1000), c=st.floats(0.05, 20.0))
def test_asam_invariant_to_function_preserving_relu_rescaling(seed, c):
    net = _relu_net(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=g)
    scaled = _relu_net(seed)
    with torch.no_grad():
        scaled[0].weight.mul_(c)
        scaled[0].bias.mul_(c)
        scaled[2].weight.div_(c)
    assert torch.allclose(net(x), scaled(x))
    a = asam_sharpness(net, F.cross_entropy, x, y, rho=0.5)
    b = asam_sharpness(scaled, F.cross_entropy, x, y, rho=0.5)
    assert float(b) == pytest.approx(float(a), rel=1e-8, abs=1e-14)


def test_asam_filter_normalisation_and_exclusions_match_a_manual_computation():
    net = _relu_net(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=g)
    params = dict(net.named_parameters())
    loss = F.cross_entropy(net(x), y)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    for normalization, exclude_1d, eta in [("filter", False, 0.0), ("element", True, 0.01)]:
        t = {}
        for k, w in params.items():
            w = w.detach()
            if exclude_1d and w.dim() == 1:
                t[k] = torch.ones_like(w)
            elif normalization == "filter" and w.dim() == 2:
                t[k] = w.norm(dim=1, keepdim=True).expand_as(w) + eta
            else:
                t[k] = w.abs() + eta
        tg_norm = math.sqrt(sum(float(((t[k] * grads[k]) ** 2).sum()) for k in params))
        eps = {k: 0.3 * t[k] ** 2 * grads[k] / tg_norm for k in params}
        with torch.no_grad():
            perturbed = torch.func.functional_call(
                net, {k: params[k] + eps[k] for k in params}, (x,)
            )
        expected = F.cross_entropy(perturbed, y) - loss
        res = asam_sharpness(
            net,
            F.cross_entropy,
            x,
            y,
            rho=0.3,
            eta=eta,
            normalization=normalization,
            exclude_1d=exclude_1d,
        )
        assert float(res) == pytest.approx(float(expected.detach()), rel=1e-9), normalization
        assert float(res.grad_norm) == pytest.approx(tg_norm, rel=1e-12)


def test_parameter_subset():
    net = _relu_net(1)
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    only_last = sam_sharpness(net, F.cross_entropy, x, y, params="2.*")
    by_module = sam_sharpness(net, F.cross_entropy, x, y, params=net[2])
    assert float(only_last) == pytest.approx(float(by_module), rel=1e-14)
    assert float(only_last) != pytest.approx(float(sam_sharpness(net, F.cross_entropy, x, y)))


# ----------------------------------------------------------------------------- isolation


def test_model_untouched():
    model = prepare_dirty_model(models.cnn_bn(), freeze="fc.bias")
    x, y = models.image_data()
    snap = snapshot(model)
    res = sam_sharpness(model, F.cross_entropy, x, y)
    assert_untouched(model, snap)
    assert res.ok and float(res) > 0
    asam_sharpness(model, F.cross_entropy, x, y, normalization="filter")
    assert_untouched(model, snap)
    sam_sharpness(model, F.cross_entropy, x, y, eval_mode=False)
    assert_untouched(model, snap)


def test_bad_arguments():
    model = Quadratic([1.0, 2.0])
    a = torch.eye(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="rho"):
        sam_sharpness(model, quad_loss, X1, a, rho=0.0)
    with pytest.raises(ValueError, match="p must"):
        sam_sharpness(model, quad_loss, X1, a, p=1.0)
    with pytest.raises(ValueError, match="normalization"):
        asam_sharpness(model, quad_loss, X1, a, normalization="layer")
    with pytest.raises(ValueError, match="eta"):
        asam_sharpness(model, quad_loss, X1, a, eta=-1.0)
    with pytest.raises(ValueError, match="fallback_direction"):
        sam_sharpness(Quadratic([0.0, 0.0]), quad_loss, X1, a, fallback_direction=[torch.ones(3)])
    with pytest.raises(ValueError, match="params"):
        sam_sharpness(model, quad_loss, X1, a, params="nope")


# ----------------------------------------------------------------------------- thresholds


def test_stability_ratio():
    assert stability_ratio(19.0, 38.0) == 0.5
    assert math.isnan(stability_ratio(math.nan, 2.0))
    with pytest.raises(ValueError, match="threshold"):
        stability_ratio(1.0, 0.0)
    with pytest.raises(ValueError, match="threshold"):
        stability_ratio(1.0, math.inf)


def _diverges(opt_factory, lam: float, steps: int = 400) -> bool:
    theta = nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = opt_factory([theta])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * lam * theta**2).sum().backward()
        opt.step()
    return bool(theta.abs() > 1.0)


@pytest.mark.parametrize(
    "factory",
    [
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, dampening=0.3),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    ],
)
def test_stability_ratio_one_separates_convergence_from_divergence(factory):
    """lambda_max relative to the optimiser's threshold (from the curvature engine):
    SGD on 1/2 lambda theta^2 converges at ratio 0.97 and diverges at 1.03."""
    threshold = stability_threshold(factory([nn.Parameter(torch.ones(1))]))
    for ratio, diverges in ((0.97, False), (1.03, True)):
        lam = ratio * threshold
        assert stability_ratio(lam, threshold) == pytest.approx(ratio)
        assert _diverges(factory, lam) is diverges


def test_train_mode_sharpness_sees_one_dropout_mask_at_both_points():
    """With ``eval_mode=False`` dropout is on: L(w) and L(w + eps) use the same mask, so
    the sharpness is first order in rho (rho * ||g|| to leading order) and tends to 0."""

    from landscape.functional import sam_sharpness

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3)).eval()
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    big = sam_sharpness(model, F.cross_entropy, x, y, rho=1e-2, eval_mode=False)
    small = sam_sharpness(model, F.cross_entropy, x, y, rho=1e-4, eval_mode=False)
    assert float(big.value) > 0 and float(small.value) > 0
    assert float(small.value) == pytest.approx(1e-2 * float(big.value), rel=0.05)
    assert float(small.value) == pytest.approx(1e-4 * float(small.grad_norm), rel=0.05)
    assert not model.training


def test_a_loss_that_is_not_a_scalar_is_named():
    """reduction='none' raised torch.func's 'grad_and_value ... must be a scalar' error."""
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor .* \(4, 2\)"):
        sam_sharpness(model, lambda o, t: (o - t).pow(2), x, y)
