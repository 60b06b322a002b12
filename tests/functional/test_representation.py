"""RankMe, VNE, alpha-ReQ, Wang–Isola alignment/uniformity, Wasserstein uniformity:
docs/metrics.md."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from landscape.functional import (
    MetricError,
    alignment,
    alpha_req,
    effective_rank,
    singular_values,
    uniformity,
    von_neumann_entropy,
    wasserstein_uniformity,
)

SETTINGS = settings(max_examples=25, deadline=None)


def _rotation(p: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    return q


def _random(seed: int, n: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------- RankMe


@pytest.mark.parametrize(
    ("z", "expected", "exact"),
    [
        (torch.eye(8), 8.0000069, 8.0),
        (torch.ones(8, 8), 1.0000112, 1.0),
        (torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0])), 2.0000063, 2.0),
    ],
)
def test_rankme_known_answers(z, expected, exact):
    assert float(effective_rank(z)) == pytest.approx(expected, abs=1e-6)
    assert float(effective_rank(z, eps=0.0)) == pytest.approx(exact, abs=1e-12)


def test_rankme_matches_entropy_of_svdvals():
    z = _random(0, 40, 12) @ torch.diag(torch.logspace(0, -3, 12, dtype=torch.float64))
    s = torch.linalg.svdvals(z)
    p = s / s.sum() + 1e-7
    assert float(effective_rank(z)) == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    assert torch.allclose(singular_values(z), s)


def test_rankme_zero_matrix_is_nan_with_reason():
    res = effective_rank(torch.zeros(5, 3))
    assert res.reason == "zero_matrix" and math.isnan(float(res))
    with pytest.raises(MetricError, match="zero_matrix"):
        effective_rank(torch.zeros(5, 3), strict=True)


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 20),
    d=st.integers(1, 8),
    scale=st.floats(1e-3, 1e3),
)
def test_rankme_invariant_to_rotations_scale_and_row_permutation(seed, n, d, scale):
    z = _random(seed, n, d)
    g = torch.Generator().manual_seed(seed + 1)
    moved = scale * _rotation(n, g)[torch.randperm(n, generator=g)] @ z @ _rotation(d, g)
    assert float(effective_rank(moved)) == pytest.approx(float(effective_rank(z)), rel=1e-9)
    assert 1.0 - 1e-9 <= float(effective_rank(z, eps=0)) <= min(n, d) + 1e-9


def test_rankme_centering_is_optional_and_off_by_default():
    z = _random(1, 30, 4) + 10.0
    assert float(effective_rank(z)) < float(effective_rank(z, center=True))


# ----------------------------------------------------------------------------- VNE


def test_vne_known_answers():
    d = 6
    assert float(von_neumann_entropy(torch.eye(d))) == pytest.approx(math.log(d), abs=1e-12)
    assert float(von_neumann_entropy(torch.ones(5, 3))) == pytest.approx(0.0, abs=1e-12)
    two = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 0.0], [0.0, 0.5]])
    assert float(von_neumann_entropy(two)) == pytest.approx(math.log(2), abs=1e-12)


def test_vne_zero_rows_left_out_and_all_zero_is_nan():
    h = torch.cat([torch.eye(3), torch.zeros(2, 3)])
    assert float(von_neumann_entropy(h)) == pytest.approx(math.log(3), abs=1e-12)
    assert von_neumann_entropy(torch.zeros(4, 3)).reason == "zero_matrix"


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(1, 15), d=st.integers(1, 6))
def test_vne_invariant_to_rotation_row_scaling_and_permutation(seed, n, d):
    h = _random(seed, n, d)
    g = torch.Generator().manual_seed(seed + 3)
    row_scale = torch.rand(n, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    moved = (row_scale * h)[torch.randperm(n, generator=g)] @ _rotation(d, g)
    v = float(von_neumann_entropy(h))
    assert float(von_neumann_entropy(moved)) == pytest.approx(v, abs=1e-10)
    assert -1e-12 <= v <= math.log(min(n, d)) + 1e-12


# ----------------------------------------------------------------------------- alpha-ReQ


def _with_covariance(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Z with zero column means and Z^T Z / N = diag(lam)."""
    k = lam.numel()
    n = k + 3
    g = torch.Generator().manual_seed(seed)
    basis = torch.cat([torch.ones(n, 1), torch.randn(n, k, generator=g)], 1).double()
    q, _ = torch.linalg.qr(basis)
    return q[:, 1 : k + 1] * torch.sqrt(n * lam)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.3])
@pytest.mark.parametrize("fit_range", [(1, None), (2, 7), (4, 12)])
def test_alpha_req_recovers_an_exact_power_law(alpha, fit_range):
    lam = torch.arange(1, 13, dtype=torch.float64) ** (-alpha)
    fit = alpha_req(_with_covariance(lam), fit_range=fit_range)
    assert float(fit) == pytest.approx(alpha, abs=1e-9)
    assert float(fit.intercept) == pytest.approx(0.0, abs=1e-8)
    uncentred = alpha_req(torch.diag(torch.sqrt(lam)), center=False, fit_range=fit_range)
    assert float(uncentred) == pytest.approx(alpha, abs=1e-9)


def test_alpha_req_rank_deficient_and_bad_range():
    assert alpha_req(torch.ones(5, 3)).reason == "rank_deficient"
    assert math.isnan(float(alpha_req(torch.ones(5, 3))))
    with pytest.raises(ValueError, match="fit_range"):
        alpha_req(_random(0, 5, 3), fit_range=(0, None))
    with pytest.raises(ValueError, match="fit_range"):
        alpha_req(_random(0, 5, 3), fit_range=(3, 3))


@SETTINGS
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3))
def test_alpha_req_invariant_to_rotation_and_scale(seed, scale):
    z = _random(seed, 30, 6) @ torch.diag(torch.arange(1, 7, dtype=torch.float64) ** -1.0)
    g = torch.Generator().manual_seed(seed)
    a = float(alpha_req(z))
    assert float(alpha_req(scale * z @ _rotation(6, g))) == pytest.approx(a, abs=1e-8)


# ----------------------------------------------------------------------------- Wang–Isola


def test_uniformity_known_answers():
    e = torch.eye(4, dtype=torch.float64)
    pair = torch.stack([e[0], -e[0]])
    assert float(uniformity(pair)) == pytest.approx(-8.0, abs=1e-12)
    assert float(uniformity(torch.cat([pair, pair]))) == pytest.approx(-1.097942, abs=1e-6)
    cross = torch.cat([e, -e])
    m = 4
    expected = math.log((m * math.exp(-8) + 2 * m * (m - 1) * math.exp(-4)) / (m * (2 * m - 1)))
    assert float(uniformity(cross)) == pytest.approx(expected, abs=1e-12)  # -4.151103
    assert float(uniformity(torch.ones(5, 3, dtype=torch.float64))) == pytest.approx(0, abs=1e-12)
    # float32 inputs run in float32: about 1e-6 absolute
    assert float(uniformity(cross.float())) == pytest.approx(expected, abs=1e-5)


def test_uniformity_matches_pdist_reference_and_scale_invariance():
    z = _random(0, 50, 5)
    zn = z / z.norm(dim=1, keepdim=True)
    ref = torch.pdist(zn, p=2).pow(2).mul(-2).exp().mean().log()
    assert float(uniformity(z)) == pytest.approx(float(ref), abs=1e-12)
    assert float(uniformity(7.0 * z, t=2.0)) == pytest.approx(float(ref), abs=1e-12)
    ref3 = torch.pdist(zn, p=2).pow(2).mul(-3).exp().mean().log()
    assert float(uniformity(z, t=3.0, block=7)) == pytest.approx(float(ref3), abs=1e-12)


def test_uniformity_subsamples_deterministically_above_max_samples():
    z = _random(1, 300, 3)
    exact = float(uniformity(z, max_samples=None))
    a = float(uniformity(z, max_samples=100))
    b = float(uniformity(z, max_samples=100))
    assert a == b and a == pytest.approx(exact, abs=0.1)
    assert float(uniformity(z, max_samples=300)) == exact


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(2, 20), d=st.integers(1, 6))
def test_uniformity_invariant_to_rotation_permutation_and_row_scale(seed, n, d):
    z = _random(seed, n, d)
    g = torch.Generator().manual_seed(seed)
    row_scale = torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.5
    moved = (row_scale * z)[torch.randperm(n, generator=g)] @ _rotation(d, g)
    u = float(uniformity(z))
    assert float(uniformity(moved)) == pytest.approx(u, abs=1e-10)
    assert u <= 1e-12


def test_uniformity_edge_cases():
    assert uniformity(torch.randn(1, 3)).reason == "too_few_samples"
    z = torch.cat([torch.zeros(3, 2), torch.tensor([[1.0, 0.0], [-1.0, 0.0]])]).double()
    assert float(uniformity(z)) == pytest.approx(-8.0, abs=1e-12)  # zero rows left out
    for dt in (torch.float16, torch.bfloat16):
        assert float(uniformity(z.to(dt))) == pytest.approx(-8.0, abs=1e-5)
    with pytest.raises(ValueError, match="features"):
        uniformity(torch.randn(3))
    with pytest.raises(ValueError, match="t must"):
        uniformity(torch.randn(3, 2), t=0.0)


def test_alignment_known_answers():
    e = torch.eye(3, dtype=torch.float64)
    assert float(alignment(e, e)) == 0.0
    assert float(alignment(e[:1], -e[:1])) == pytest.approx(4.0)
    assert float(alignment(e[:1], -3 * e[:1], alpha=1.0)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same shape"):
        alignment(e, e[:2])
    assert alignment(torch.zeros(2, 3), torch.ones(2, 3)).reason == "no_pairs"


# ----------------------------------------------------------------------------- Wasserstein


def test_wasserstein_uniformity_known_answers():
    e = torch.eye(4, dtype=torch.float64)
    cross = torch.cat([e, -e])
    assert float(wasserstein_uniformity(cross)) == pytest.approx(0.0, abs=1e-7)
    assert float(wasserstein_uniformity(torch.ones(5, 4))) == pytest.approx(math.sqrt(2))
    pair = torch.stack([e[0], -e[0]])
    assert float(wasserstein_uniformity(pair)) == pytest.approx(1.0, abs=1e-12)
    assert float(wasserstein_uniformity(torch.cat([cross, cross]))) == pytest.approx(0, abs=1e-7)


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(1, 20), d=st.integers(1, 6))
def test_wasserstein_invariant_to_permutation_replication_rotation(seed, n, d):
    z = _random(seed, n, d)
    g = torch.Generator().manual_seed(seed)
    w = float(wasserstein_uniformity(z))
    assert 0.0 <= w <= math.sqrt(2) + 1e-12
    moved = z[torch.randperm(n, generator=g)] @ _rotation(d, g)
    assert float(wasserstein_uniformity(moved)) == pytest.approx(w, abs=1e-9)
    assert float(wasserstein_uniformity(torch.cat([z, z, z]))) == pytest.approx(w, abs=1e-9)


def test_wasserstein_matches_dense_formula():
    z = _random(2, 40, 5)
    zn = z / z.norm(dim=1, keepdim=True)
    mu = zn.mean(0)
    cov = (zn - mu).T @ (zn - mu) / len(zn)
    lam = torch.linalg.eigvalsh(cov).clamp_min(0)
    w2 = mu @ mu + 1 + cov.trace() - 2 / math.sqrt(5) * lam.sqrt().sum()
    assert float(wasserstein_uniformity(z)) == pytest.approx(float(w2.sqrt()), rel=1e-10)
    assert wasserstein_uniformity(torch.zeros(3, 2)).reason == "zero_matrix"


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_match_float64_of_the_same_values(dtype):
    z = _random(5, 30, 6).to(dtype)
    ref = z.double()
    for fn in (effective_rank, von_neumann_entropy, wasserstein_uniformity):
        out = fn(z)
        assert out.value.dtype == torch.float64
        assert float(out) == pytest.approx(float(fn(ref)), rel=1e-12), fn.__name__
    assert float(alpha_req(z)) == pytest.approx(float(alpha_req(ref)), rel=1e-10)


def test_bad_shapes_raise_value_error_naming_the_argument():
    for fn in (effective_rank, von_neumann_entropy, wasserstein_uniformity, alpha_req):
        with pytest.raises(ValueError, match="features"):
            fn(torch.randn(3))
        with pytest.raises(ValueError, match="features"):
            fn(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="features"):
        effective_rank(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="eps"):
        effective_rank(torch.randn(3, 2), eps=-1.0)


def test_inputs_with_autograd_history_are_detached():
    z = _random(0, 12, 4).requires_grad_(True) * 1.5
    for fn in (effective_rank, von_neumann_entropy, uniformity, wasserstein_uniformity):
        assert fn(z).value.grad_fn is None, fn.__name__
    assert alpha_req(z).alpha.grad_fn is None


# ----------------------------------------------------------------------------- extreme scales


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [
        (torch.float32, 2.0**70),
        (torch.float32, 2.0**-100),
        (torch.bfloat16, 2.0**70),
        (torch.bfloat16, 2.0**-100),
        (torch.float64, 2.0**600),
        (torch.float64, 2.0**-600),
    ],
)
def test_rows_beyond_the_range_of_their_squares_normalise_exactly(dtype, scale):
    """The rows are L2-normalised, whose squares overflow above ~1.8e19 in float32 (1.3e154
    in float64) and underflow below ~1e-19 (1e-154): x1e20 read uniformity -4 and
    alignment 0, x1e-30 NaN ("too_few_samples", "no_pairs"). A power of two scales
    exactly, so the values must not move at all."""
    z, z2 = _random(2, 30, 6).to(dtype), _random(3, 30, 6).to(dtype)
    zs, z2s = z * scale, z2 * scale
    assert float(uniformity(zs)) == float(uniformity(z))
    assert float(alignment(zs, z2s)) == float(alignment(z, z2))
    assert float(alignment(zs, z2)) == float(alignment(z, z2))
    for fn in (von_neumann_entropy, wasserstein_uniformity):
        assert float(fn(zs)) == float(fn(z)), fn.__name__


@pytest.mark.parametrize("scale", [1e19, 1e20, 1e-20, 1e-30])
def test_float32_rows_at_extreme_scales_match_float64(scale):
    zs = (_random(2, 30, 6) * scale).float()
    z2s = (_random(3, 30, 6) * scale).float()
    u = uniformity(zs)
    assert u.reason is None
    assert float(u) == pytest.approx(float(uniformity(zs.double())), abs=1e-5)
    a = alignment(zs, z2s)
    assert a.reason is None
    assert float(a) == pytest.approx(float(alignment(zs.double(), z2s.double())), rel=1e-5)


def test_singular_values_of_a_non_finite_matrix_raise_value_error():
    """Raised torch's _LinAlgError ("failed to converge") from eigh."""
    z = torch.randn(5, 3)
    z[0, 0] = math.nan
    with pytest.raises(ValueError, match="z must be finite"):
        singular_values(z)
    z[0, 0] = math.inf
    with pytest.raises(ValueError, match="z must be finite"):
        singular_values(z)


@pytest.mark.parametrize("shape", [(5, 0), (0, 5)])
@pytest.mark.parametrize("fn", [
    von_neumann_entropy, uniformity, wasserstein_uniformity, alpha_req, singular_values,
    effective_rank, lambda z: alignment(z, z)])
def test_features_with_an_empty_dimension_are_malformed_input(fn, shape):
    """docs/metrics.md: an empty dimension is a ValueError naming the argument; all but
    effective_rank returned NaN with an unrelated reason ('zero_matrix', 'rank_deficient',
    'no_pairs') or an empty tensor (review)."""
    with pytest.raises(ValueError, match="must be non-empty"):
        fn(torch.randn(*shape))


def test_bad_settings_are_one_valueerror_naming_them():
    """A float fit_range gave 'slice indices must be integers', eps=nan a rank of 1.0, and
    centred constant features were called all zero (review)."""
    with pytest.raises(ValueError, match="fit_range must be"):
        alpha_req(torch.randn(10, 4), fit_range=(1.5, None))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        effective_rank(torch.randn(3, 5), eps=float("nan"))
    with pytest.raises(MetricError, match="features are constant"):
        effective_rank(torch.ones(3, 5), center=True, strict=True)


def test_fit_range_takes_numpy_integers():
    """The integer check refused np.int64 bounds, which it had taken before (review)."""
    import numpy as np

    z = torch.randn(40, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = alpha_req(z, fit_range=(np.int64(1), np.int64(6)))
    b = alpha_req(z, fit_range=(1, 6))
    assert float(a.alpha) == float(b.alpha)
