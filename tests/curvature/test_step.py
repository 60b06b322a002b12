"""The first-order products' step refinement (landscape/curvature/_step.py), piece by piece."""

from __future__ import annotations

import math

import pytest
import torch

from landscape.curvature._step import (
    GENUINE,
    LOSS_NOISE,
    MIN_RATIO,
    REFINE_BELOW,
    displacement_error,
    genuine,
    ggn_genuine,
    ggn_negligible,
    ggn_ratio,
    refined_ratio,
    truncation,
)


def test_truncation_is_twice_the_gap_over_the_scale_beyond_the_losses_rounding():
    # a quartic along v: L(θ + sv) = a s² / 2 + b s⁴ / 24, so vᵀHv = a, ∇⁴L[v⁴] = b
    a, b, eps = 3.0, 500.0, 0.01
    loss = lambda s: a * s**2 / 2 + b * s**4 / 24  # noqa: E731
    second = (loss(eps) - 2 * loss(0.0) + loss(-eps)) / eps**2
    q = a + eps**2 * b / 6  # vᵀ (g(εv) − g(−εv)) / 2ε for this loss, exactly
    assert second == pytest.approx(a + eps**2 * b / 12, rel=1e-12)
    got = truncation(q, second, loss(eps) + loss(-eps), loss(0.0), eps, torch.float64)
    # the true relative error of the product along v is (ε² b / 6) / |q|
    assert got == pytest.approx((eps**2 * b / 6) / abs(q), rel=1e-6)
    # within the losses' rounding it is not seen
    noise = LOSS_NOISE * torch.finfo(torch.float32).eps / 2 * 4 * 10.0 / eps**2
    assert truncation(1.0 + noise / 2, 1.0, 20.0, 10.0, eps, torch.float32) == 0.0
    assert truncation(math.nan, 1.0, 2.0, 1.0, eps, torch.float32) == 0.0
    assert truncation(0.0, 1.0, 2.0, 1.0, eps, torch.float64) == 0.0


def test_refined_ratio():
    assert refined_ratio(0.0, 1e-5) is None
    assert refined_ratio(1e-4, 1e-4) is None  # sqrt(1) is not below REFINE_BELOW
    assert refined_ratio(0.77, 5.3e-5) == MIN_RATIO  # sqrt = 0.0083, clamped
    assert refined_ratio(1e-2, 1e-4) == pytest.approx(0.1)
    assert refined_ratio(1e-2, 1e-2 * REFINE_BELOW**2 * 1.01) is None
    assert refined_ratio(1.0, math.nan) is None


def test_displacement_error_is_exact_and_chunked(monkeypatch):
    from landscape import _sums

    theta = torch.tensor([1.0, 0.02, 0.0, -3.0], dtype=torch.float32)
    shift = torch.tensor([1e-9, 3e-6, 1e-7, 2e-7], dtype=torch.float32)

    def move(t, s):
        return t + s

    want = (theta + shift).double() - theta.double() - shift.double()
    err, size = displacement_error([(theta, shift)], move)
    assert err == pytest.approx(float(want.pow(2).sum()), rel=1e-12)
    assert size == pytest.approx(float(shift.double().pow(2).sum()), rel=1e-12)
    assert err > 0  # 1 + 1e-9 rounds to 1 in float32
    monkeypatch.setattr("landscape.curvature._step.CHUNK", 3)
    assert displacement_error([(theta, shift)], move) == (err, size)
    assert _sums.CHUNK == 2**20


def test_genuine_needs_the_gap_above_the_measured_rounding_and_a_moving_product():
    assert genuine(1e-3, 1e-3 / (2 * GENUINE), 5.0)
    assert not genuine(1e-3, 1e-3 / GENUINE, 5.0)
    assert not genuine(1e-3, 0.0, 5.0)  # nothing moved at the refined step
    assert not genuine(1e-3, 1e-9, 0.0)
    assert not genuine(math.nan, 1e-9, 1.0)


def test_ggn_ratio_brings_the_truncation_down_to_the_root_of_the_rounding():
    # t rho^2 = sqrt(r): the extrapolated product's error, ~t^2, then ~r
    rho = ggn_ratio(0.34, 5e-5)
    assert rho == pytest.approx(math.sqrt(math.sqrt(5e-5) / 0.34))
    assert 0.34 * rho**2 == pytest.approx(math.sqrt(5e-5))
    assert ggn_ratio(1e-3, 5e-5) is None  # already below sqrt(r): kept
    assert ggn_ratio(1e9, 5e-5) == MIN_RATIO
    assert ggn_ratio(math.nan, 5e-5) is None and ggn_ratio(0.0, 5e-5) is None
    assert ggn_ratio(0.3, math.inf) is None


def test_ggn_genuine_needs_the_truncation_to_fall():
    assert ggn_genuine(0.3, 0.3 * 0.1**2)  # fell as rho^2
    assert not ggn_genuine(0.3, 0.3 / 0.1)  # grew as 1/rho: rounding
    assert not ggn_genuine(0.3, 0.2)
    assert not ggn_genuine(0.3, math.nan)  # the outputs did not move
    assert not ggn_genuine(math.nan, 0.0)


def test_ggn_negligible_below_four_roots_of_the_unit_roundoff():
    u32 = torch.finfo(torch.float32).eps / 2
    assert ggn_negligible(3.9 * math.sqrt(u32), torch.float32)
    assert not ggn_negligible(4.1 * math.sqrt(u32), torch.float32)
    assert ggn_negligible(math.nan, torch.float32)
    assert not ggn_negligible(1e-6, torch.float64)  # float64: 4 sqrt(u) is 4.2e-8
