"""Neural collapse NC1–NC4 and VCI: docs/metrics.md (known answers, dense
float64 ground truth, invariances, edge cases)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from landscape.functional import (
    MetricError,
    nc1,
    ncc_mismatch,
    neural_collapse,
    variability_collapse_index,
)

SETTINGS = settings(max_examples=25, deadline=None)


# ----------------------------------------------------------------------------- helpers


def simplex_etf(c: int, p: int) -> torch.Tensor:
    """(p, C) columns: unit vectors with pairwise cosine -1/(C-1), embedded in R^p."""
    m = math.sqrt(c / (c - 1)) * (torch.eye(c, dtype=torch.float64) - 1.0 / c)
    out = torch.zeros(p, c, dtype=torch.float64)
    out[:c] = m
    return out


def random_data(seed: int, n_per: int, c: int, p: int, spread: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(c, p, generator=g, dtype=torch.float64) * 2
    labels = torch.arange(c).repeat_interleave(n_per)
    h = means[labels] + spread * torch.randn(len(labels), p, generator=g, dtype=torch.float64)
    return h, labels


def dense_cov(h: torch.Tensor, y: torch.Tensor):
    """Sigma_W (1/N), Sigma_B (mean of class means, 1/C), C; dense float64."""
    h = h.double()
    classes = y.unique()
    means = torch.stack([h[y == k].mean(0) for k in classes])
    mt = (means - means.mean(0)).T
    idx = torch.searchsorted(classes, y)
    within = h - means[idx]
    return within.T @ within / len(h), mt @ mt.T / len(classes), len(classes)


def dense_nc1(h, y):
    sw, sb, c = dense_cov(h, y)
    return float(torch.trace(sw @ torch.linalg.pinv(sb, hermitian=True, rtol=1e-9)) / c)


def dense_vci(h, y):
    sw, sb, c = dense_cov(h, y)
    st_ = sw + sb
    tr = torch.trace(torch.linalg.pinv(st_, hermitian=True, rtol=1e-12) @ sb)
    return float(1 - tr / min(h.shape[1], c - 1))


# ----------------------------------------------------------------------------- known answers


@pytest.mark.parametrize(("c", "p"), [(5, 5), (5, 9), (3, 4)])
def test_exact_simplex_etf_is_fully_collapsed(c, p):
    m = simplex_etf(c, p)
    offset = torch.zeros(p, dtype=torch.float64)
    offset[c:] = 3.0  # a common offset orthogonal to the ETF span
    if p == c:
        offset = 0.7 * torch.ones(p, dtype=torch.float64)  # ones ⊥ every centred column
    labels = torch.arange(c).repeat(4)
    h = 2.5 * m.T[labels] + offset
    w = 1.7 * m.T  # (C, p)
    res = neural_collapse(h, labels, w)
    assert res.ok and res.n_classes == c and res.nc1_rank == c - 1
    for name in (
        "nc1",
        "nc2_equinorm_means",
        "nc2_equinorm_weights",
        "nc2_equiangular_means",
        "nc2_equiangular_weights",
        "nc2_maxangle_means",
        "nc2_maxangle_weights",
        "nc2_etf_means",
        "nc2_etf_weights",
        "nc3",
        "nc3_zhu",
        "nc4",
    ):
        assert abs(float(getattr(res, name))) < 1e-12, name
    assert float(variability_collapse_index(h, labels)) == pytest.approx(0.0, abs=1e-12)


def test_one_dimensional_two_classes():
    a = 0.5
    h = torch.tensor([[-1 - a], [-1 + a], [1 - a], [1 + a]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    assert float(nc1(h, y)) == pytest.approx(a * a / 2, abs=1e-14)  # 0.125
    assert float(variability_collapse_index(h, y)) == pytest.approx(a * a / (1 + a * a))  # 0.2


def test_square_means_c4():
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    labels = torch.arange(4).repeat(3)
    h = rows[labels]
    res1 = neural_collapse(h, labels, rows, ddof=1)
    res0 = neural_collapse(h, labels, rows, ddof=0)
    assert float(res1.nc2_equinorm_means) == pytest.approx(0.0, abs=1e-15)
    assert float(res1.nc2_maxangle_means) == pytest.approx(4 / 9, abs=1e-12)
    assert float(res0.nc2_equiangular_means) == pytest.approx(0.471405, abs=1e-6)
    assert float(res1.nc2_equiangular_means) == pytest.approx(0.492366, abs=1e-6)
    assert float(res1.nc2_etf_weights) == pytest.approx(0.605811, abs=1e-6)
    assert float(res1.nc2_etf_means) == pytest.approx(0.605811, abs=1e-6)
    # p = 2 < C - 1 = 3: the truncation keeps the numerical rank, NC1 = 0 without crashing
    assert res1.nc1_rank == 2 and float(res1.nc1) == 0.0


def test_orthonormal_one_hot_means_form_an_etf():
    c = 6
    labels = torch.arange(c).repeat(2)
    h = torch.eye(c, dtype=torch.float64)[labels]
    res = neural_collapse(h, labels)
    for name in (
        "nc2_equinorm_means",
        "nc2_equiangular_means",
        "nc2_maxangle_means",
        "nc2_etf_means",
    ):
        assert abs(float(getattr(res, name))) < 1e-12, name


def test_nc4_agreement_and_swapped_rows():
    c, p = 4, 6
    m = simplex_etf(c, p)
    counts = [3, 5, 2, 6]
    labels = torch.cat([torch.full((k,), i) for i, k in enumerate(counts)])
    h = m.T[labels]
    w = m.T.clone()  # W = M~^T
    assert float(ncc_mismatch(h, labels, w)) == 0.0
    w_sw = w[[1, 0, 2, 3]]
    expected = (counts[0] + counts[1]) / sum(counts)
    assert float(ncc_mismatch(h, labels, w_sw)) == pytest.approx(expected)
    assert float(neural_collapse(h, labels, w_sw).nc4) == pytest.approx(expected)
    lin = nn.Linear(p, c).double()
    with torch.no_grad():
        lin.weight.copy_(w_sw)
        lin.bias.zero_()
    assert float(neural_collapse(h, labels, lin).nc4) == pytest.approx(expected)


def test_nc1_blind_to_variance_orthogonal_to_means_but_vci_too():
    a = 0.8
    means = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    h = means[labels] + torch.tensor([[0, a], [0, -a], [0, a], [0, -a]], dtype=torch.float64)
    assert float(nc1(h, labels)) == pytest.approx(0.0, abs=1e-15)
    assert float(variability_collapse_index(h, labels)) == pytest.approx(0.0, abs=1e-12)


def test_vci_zero_with_oblique_within_class_variance_while_nc1_is_not():
    w = torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    means = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    h = means[labels] + 0.7 * sign[:, None] * w
    assert float(nc1(h, labels)) == pytest.approx(0.1225, abs=1e-12)
    assert float(variability_collapse_index(h, labels)) == pytest.approx(0.0, abs=1e-12)


def test_features_independent_of_labels_are_rank_deficient():
    h = torch.ones(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    res = neural_collapse(h, y)
    assert res.reason == "rank_deficient" and math.isnan(float(res.nc1))
    v = variability_collapse_index(h, y)
    assert v.reason == "rank_deficient" and math.isnan(float(v))
    with pytest.raises(MetricError, match="rank_deficient"):
        variability_collapse_index(h, y, strict=True)
    with pytest.raises(ValueError, match="rank_deficient"):  # MetricError is a ValueError
        neural_collapse(h, y, strict=True)


# ----------------------------------------------------------------------------- dense ground truth


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    c=st.integers(2, 6),
    p=st.integers(1, 9),
    n_per=st.integers(1, 5),
)
def test_nc1_and_vci_match_dense_pinv(seed, c, p, n_per):
    h, y = random_data(seed, n_per, c, p)
    assert float(nc1(h, y)) == pytest.approx(dense_nc1(h, y), rel=1e-7, abs=1e-10)
    assert float(variability_collapse_index(h, y)) == pytest.approx(
        dense_vci(h, y), rel=1e-7, abs=1e-9
    )


def test_vci_wide_features_use_the_gram_path():
    h, y = random_data(3, 2, 4, 40)  # p = 40 > N + C = 12
    assert float(variability_collapse_index(h, y)) == pytest.approx(dense_vci(h, y), abs=1e-9)


@SETTINGS
@given(seed=st.integers(0, 10_000), c=st.integers(2, 5), extra=st.integers(0, 4))
def test_vci_is_normalised_linear_probe_mse_for_balanced_classes(seed, c, extra):
    p = c - 1 + extra
    h, y = random_data(seed, 6, c, p, spread=1.5)
    x = torch.cat([h, torch.ones(len(h), 1, dtype=torch.float64)], 1)
    onehot = torch.eye(c, dtype=torch.float64)[y]
    coef = torch.linalg.lstsq(x, onehot).solution
    mse = ((onehot - x @ coef) ** 2).sum() / len(h)
    const = ((onehot - onehot.mean(0)) ** 2).sum() / len(h)  # (C-1)/C
    assert float(variability_collapse_index(h, y)) == pytest.approx(float(mse / const), rel=1e-8)


# ----------------------------------------------------------------------------- invariances


def _rotation(p: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    return q


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    c=st.integers(2, 5),
    p=st.integers(2, 8),
    scale=st.floats(1e-3, 1e3),
)
def test_nc_metrics_invariant_to_rotation_scale_translation_and_permutation(seed, c, p, scale):
    h, y = random_data(seed, 4, c, p)
    g = torch.Generator().manual_seed(seed + 1)
    q = _rotation(p, g)
    shift = torch.randn(p, generator=g, dtype=torch.float64)
    perm = torch.randperm(len(h), generator=g)
    relabel = torch.randperm(c, generator=g)
    w = torch.randn(c, p, generator=g, dtype=torch.float64)
    base = neural_collapse(h, y, w)
    moved = neural_collapse(scale * h[perm] @ q.T + shift, y[perm], w @ q.T)
    for name in (
        "nc1",
        "nc2_equinorm_means",
        "nc2_equiangular_means",
        "nc2_maxangle_means",
        "nc2_etf_means",
        "nc2_equinorm_weights",
        "nc2_etf_weights",
        "nc3",
        "nc3_zhu",
    ):
        assert float(getattr(moved, name)) == pytest.approx(
            float(getattr(base, name)), rel=1e-7, abs=1e-10
        ), name
    # renaming the classes (and permuting the classifier rows alike) changes nothing
    y2 = relabel[y]
    w2 = torch.empty_like(w)
    w2[relabel] = w
    renamed = neural_collapse(h, y2, w2)
    for name in ("nc1", "nc2_etf_means", "nc3", "nc3_zhu", "nc4"):
        assert float(getattr(renamed, name)) == pytest.approx(
            float(getattr(base, name)), rel=1e-9, abs=1e-12
        ), name


@SETTINGS
@given(seed=st.integers(0, 10_000), c=st.integers(2, 5), p=st.integers(1, 7))
def test_vci_invariant_under_random_invertible_affine_maps(seed, c, p):
    h, y = random_data(seed, 5, c, p, spread=1.0)
    g = torch.Generator().manual_seed(seed + 7)
    # an invertible map with a controlled condition number (<= 100)
    u, v = _rotation(p, g), _rotation(p, g)
    s = torch.logspace(0, -2, p, dtype=torch.float64) * 10 ** (
        4 * torch.rand(1, generator=g).item() - 2
    )
    a = u @ torch.diag(s) @ v
    shift = torch.randn(p, generator=g, dtype=torch.float64) * 5
    before = float(variability_collapse_index(h, y))
    after = float(variability_collapse_index(h @ a.T + shift, y))
    assert after == pytest.approx(before, abs=1e-8)
    assert 0.0 - 1e-12 <= before <= 1.0 + 1e-12


@pytest.mark.parametrize("wide", [False, True])
def test_vci_invariant_to_a_feature_scaled_far_beyond_the_others(wide):
    """The pseudo-inverse's cut was relative to Sigma_T's largest eigenvalue, which is not
    scale-free: one feature 1e5x larger pushed every other direction under it (0.41, then
    0.71 at 1e6, instead of 0.20; review). Both the direct and the Gram path."""
    g = torch.Generator().manual_seed(5)
    p = 40 if wide else 5
    y = torch.arange(32) % 4
    h = (torch.randn(32, p, generator=g, dtype=torch.float64)
         + 2 * torch.randn(4, p, generator=g, dtype=torch.float64)[y])
    before = variability_collapse_index(h, y, denominator="rank")
    for s in (1e5, 1e6, 1e-6):
        d = torch.ones(p, dtype=torch.float64)
        d[0] = s
        after = variability_collapse_index(h * d, y, denominator="rank")
        assert float(after) == pytest.approx(float(before), abs=1e-9), s
        assert after.rank_b == before.rank_b
    constant = torch.cat([h, torch.full((32, 1), 3.0, dtype=torch.float64)], 1)
    assert float(variability_collapse_index(constant, y, denominator="rank")) == \
        pytest.approx(float(before), abs=1e-12)  # a feature without variance adds nothing


def test_a_class_mean_at_the_global_mean_has_no_angle_exactly_or_up_to_rounding():
    """Means (-1, 0, 1) gave NaN cosines, means (0.1, 0.2, 0.3), whose middle centred mean
    is 3e-17 of rounding, arbitrary finite ones (1.03 and 0.83; review)."""
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    noise = torch.tensor([1.0, -1, 1, -1, 1, -1], dtype=torch.float64)[:, None] * 0.01
    for mus in ([-1.0, 0.0, 1.0], [0.1, 0.2, 0.3]):
        m = torch.tensor(mus, dtype=torch.float64)[y][:, None]
        h = torch.cat([m, 2 * m], 1) + noise * torch.tensor([1.0, -1], dtype=torch.float64)
        r = neural_collapse(h, y)
        assert math.isnan(float(r.nc2_equiangular_means)), mus
        assert math.isnan(float(r.nc2_maxangle_means)), mus
        assert r.reason is None and math.isfinite(float(r.nc1))
        assert math.isfinite(float(r.nc2_equinorm_means))


def test_nc1_not_invariant_to_general_linear_maps_unlike_vci():
    h, y = random_data(11, 6, 3, 5, spread=1.0)
    g = torch.Generator().manual_seed(5)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    assert abs(float(nc1(h @ a.T, y)) - float(nc1(h, y))) > 1e-3
    assert float(variability_collapse_index(h @ a.T, y)) == pytest.approx(
        float(variability_collapse_index(h, y)), abs=1e-9
    )


# ----------------------------------------------------------------------------- edge cases


def test_empty_classes_are_dropped():
    h, y = random_data(1, 4, 3, 5)
    gappy = torch.tensor([0, 4, 7])[y]
    a, b = neural_collapse(h, y), neural_collapse(h, gappy)
    assert b.n_classes == 3
    assert float(a.nc1) == pytest.approx(float(b.nc1), rel=1e-12)
    assert float(variability_collapse_index(h, gappy)) == pytest.approx(
        float(variability_collapse_index(h, y)), rel=1e-12
    )


def test_classes_with_one_sample():
    h, y = random_data(2, 1, 5, 8)  # every class a single sample: Sigma_W = 0
    res = neural_collapse(h, y)
    assert res.ok and float(res.nc1) == 0.0
    assert float(variability_collapse_index(h, y)) == pytest.approx(0.0, abs=1e-10)
    h2 = torch.cat([h, h[:1] + 0.1])
    y2 = torch.cat([y, y[:1]])
    assert float(nc1(h2, y2)) == pytest.approx(dense_nc1(h2, y2), rel=1e-8)


def test_collinear_means_use_the_numerical_rank():
    means = torch.tensor([[0.0, 0, 0], [1, 1, 0], [2, 2, 0]], dtype=torch.float64)
    y = torch.arange(3).repeat(5)
    g = torch.Generator().manual_seed(4)
    h = means[y] + 0.2 * torch.randn(15, 3, generator=g, dtype=torch.float64)
    h = h - h.reshape(5, 3, 3).mean(0)[y] + means[y]  # class means exactly collinear
    res = neural_collapse(h, y)
    assert res.nc1_rank == 1
    assert float(res.nc1) == pytest.approx(dense_nc1(h, y), rel=1e-7)
    v = variability_collapse_index(h, y, denominator="rank")
    assert v.rank_b == 1 and v.denominator == 1 and 0.0 <= float(v) <= 1.0
    assert variability_collapse_index(h, y).denominator == 2  # min(p, C - 1), the default


def test_zero_features_and_single_class():
    z = torch.zeros(5, 4)
    y = torch.tensor([0, 1, 0, 1, 1])
    assert neural_collapse(z, y).reason == "rank_deficient"
    one = neural_collapse(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    assert one.reason == "single_class" and math.isnan(float(one.nc1))
    assert variability_collapse_index(
        torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    ).reason == ("single_class")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_are_computed_in_float64(dtype):
    h, y = random_data(9, 6, 4, 6)
    low = h.to(dtype)
    w = torch.randn(4, 6, dtype=torch.float64).to(dtype)
    res = neural_collapse(low, y, w)
    ref = neural_collapse(low.double(), y, w.double())
    assert res.nc1.dtype == torch.float64
    for name in ("nc1", "nc2_etf_means", "nc3", "nc4"):
        assert float(getattr(res, name)) == float(getattr(ref, name)), name
    assert float(variability_collapse_index(low, y)) == pytest.approx(
        float(variability_collapse_index(low.double(), y)), rel=1e-12
    )
    assert math.isfinite(float(res.nc1))


def test_global_mean_choice_matters_only_for_imbalanced_data():
    h, y = random_data(6, 4, 3, 5)
    a = neural_collapse(h, y, global_mean="samples")
    b = neural_collapse(h, y, global_mean="class_means")
    assert float(a.nc1) == pytest.approx(float(b.nc1), rel=1e-10)
    keep = torch.cat([torch.arange(4), torch.arange(4, 6), torch.arange(8, 9)])
    a = neural_collapse(h[keep], y[keep], global_mean="samples")
    b = neural_collapse(h[keep], y[keep], global_mean="class_means")
    assert abs(float(a.nc1) - float(b.nc1)) > 1e-6


def test_as_dict_flattens_to_floats():
    h, y = random_data(0, 3, 3, 4)
    d = neural_collapse(h, y, torch.randn(3, 4, dtype=torch.float64)).as_dict()
    assert isinstance(d["nc1"], float) and isinstance(d["nc4"], float)
    assert d["n_classes"] == 3 and "reason" not in d
    assert "nc3" not in neural_collapse(h, y).as_dict()
    v = variability_collapse_index(h, y).as_dict()
    assert set(v) == {"value", "trace", "denominator", "rank_b"}


# ----------------------------------------------------------------------------- bad input


def test_bad_shapes_and_labels_raise_value_error_naming_the_argument():
    h = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="features"):
        neural_collapse(h[0], y)
    with pytest.raises(ValueError, match="features"):
        variability_collapse_index(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="features"):
        neural_collapse(torch.arange(18).reshape(6, 3), y)  # integer features
    with pytest.raises(ValueError, match="labels"):
        neural_collapse(h, y[:5])
    with pytest.raises(ValueError, match="labels"):
        neural_collapse(h, y.float())
    with pytest.raises(ValueError, match="labels"):
        variability_collapse_index(h, y - 1)
    with pytest.raises(ValueError, match="labels"):
        neural_collapse(h, y, torch.randn(2, 3))  # label 2 >= 2 classifier rows
    with pytest.raises(ValueError, match="classifier"):
        neural_collapse(h, y, torch.randn(3, 4))
    with pytest.raises(ValueError, match="classifier"):
        neural_collapse(h, y, "fc")
    with pytest.raises(ValueError, match="bias"):
        neural_collapse(h, y, torch.randn(3, 3), bias=torch.randn(4))
    with pytest.raises(ValueError, match="bias"):
        neural_collapse(h, y, bias=torch.randn(3))
    with pytest.raises(ValueError, match="global_mean"):
        neural_collapse(h, y, global_mean="median")
    with pytest.raises(ValueError, match="denominator"):
        variability_collapse_index(h, y, denominator="all")


def test_inputs_with_autograd_history_are_detached():
    h, y = random_data(0, 3, 3, 4)
    leaf = h.clone().requires_grad_(True)
    feats = leaf * 2.0
    res = neural_collapse(feats, y, torch.randn(3, 4, dtype=torch.float64, requires_grad=True))
    assert res.nc1.grad_fn is None and res.nc3.grad_fn is None
    assert variability_collapse_index(feats, y).value.grad_fn is None


def test_a_zero_classifier_row_leaves_only_its_cosines_undefined():
    """docs/metrics.md, "Edge cases": one zero row, and a whole zero head."""
    torch.manual_seed(8)
    h = torch.randn(10, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    w = torch.randn(3, 4, dtype=torch.float64)
    w[1] = 0.0
    row = neural_collapse(h, y, w).as_dict()
    assert math.isnan(row["nc2_equiangular_weights"]) and math.isnan(row["nc2_maxangle_weights"])
    for name in ("nc2_equinorm_weights", "nc2_etf_weights", "nc3", "nc3_zhu", "nc1"):
        assert math.isfinite(row[name]), name
    head = neural_collapse(h, y, torch.zeros(3, 4, dtype=torch.float64))
    fields = head.as_dict()
    assert head.reason is None and math.isfinite(fields["nc1"])
    assert all(math.isnan(v) for k, v in fields.items() if k.endswith("_weights") or
               k in ("nc3", "nc3_zhu"))


# ----------------------------------------------------------------------------- rounding level


NC_MEAN_FIELDS = ("nc1", "nc2_equinorm_means", "nc2_equiangular_means", "nc2_maxangle_means",
                  "nc2_etf_means", "nc2_equinorm_weights", "nc2_etf_weights", "nc3", "nc3_zhu")


@pytest.mark.parametrize("global_mean", ["class_means", "samples"])
@pytest.mark.parametrize("value", [0.1, 0.7, 3.3])
@pytest.mark.parametrize("counts", [(3, 1, 1), (1, 6, 2), (3000, 5, 1000)])
def test_identical_rows_are_rank_deficient_although_rounding_separates_the_means(
    global_mean, value, counts
):
    """docs/metrics.md, "Edge cases": identical float64 rows have class means that differ
    by rounding only (a mean of n copies of 0.1 is up to ~n eps/10 off); that noise read as
    a finite NC1 (0.3 for 0.7 on counts (3, 1, 1)), NC2, NC3 and VCI with no reason."""
    y = torch.arange(3).repeat_interleave(torch.tensor(counts))
    h = torch.full((len(y), 4), value, dtype=torch.float64)
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = neural_collapse(h, y, w, global_mean=global_mean)
    assert res.reason == "rank_deficient" and res.nc1_rank == 0
    for name in NC_MEAN_FIELDS:
        assert math.isnan(float(getattr(res, name))), name
    assert math.isfinite(float(res.nc4))  # NC4 is still computed
    vci = variability_collapse_index(h, y, global_mean=global_mean)
    assert vci.reason == "rank_deficient" and vci.rank_b == 0 and math.isnan(float(vci))
    with pytest.raises(MetricError, match="equal"):
        neural_collapse(h, y, strict=True, global_mean=global_mean)
    with pytest.raises(MetricError, match="equal"):
        variability_collapse_index(h, y, strict=True, global_mean=global_mean)


def test_a_tiny_but_genuine_separation_of_the_means_is_kept():
    """Class means 2^-30 apart on features of size 1 (rounding: about N eps = 2e-15) give
    the values of the separation alone: the metrics are invariant to translation and scale.
    Two samples per class and four classes keep every mean exact in float64."""
    means = torch.tensor([[4.0, 0, 0], [0, 4, 0], [0, 0, 4], [-3, -3, -3]], dtype=torch.float64)
    noise = torch.tensor([[1.0, 2, 0], [0, 1, -1], [2, 0, 1], [1, 1, 2]], dtype=torch.float64)
    x = torch.cat([means + noise, means - noise])
    y = torch.arange(4).repeat(2)
    h = 1.0 + x * 2.0**-30  # exact
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got, ref = neural_collapse(h, y, w), neural_collapse(x, y, w)
    assert got.reason is None and got.nc1_rank == ref.nc1_rank == 3
    for name in NC_MEAN_FIELDS[1:]:
        assert float(getattr(got, name)) == float(getattr(ref, name)), name
    # NC1 projects h_i and mu_y separately (no (N, p) temporary): the offset 1 costs
    # eps / 2^-30 = 2e-7 of relative precision there
    assert float(got.nc1) == pytest.approx(float(ref.nc1), rel=1e-6)
    vci = variability_collapse_index(h, y)
    assert vci.reason is None and vci.rank_b == 3
    assert float(vci) == float(variability_collapse_index(x, y))


def test_a_large_constant_feature_leaves_the_separation_of_another_standing():
    """Each feature's means round on its own scale: a constant feature of 1e10 beside one
    whose class means differ by 1e-3 read as 'all class means equal' with one tolerance
    for all features."""
    n = 2000
    y = torch.arange(n) % 2
    g = torch.Generator().manual_seed(0)
    signal = y.double() * 1e-3 + 1e-4 * torch.randn(n, generator=g, dtype=torch.float64)
    h = torch.stack([torch.full((n,), 1e10, dtype=torch.float64), signal], 1)
    got, alone = neural_collapse(h, y), neural_collapse(signal[:, None], y)
    assert got.reason is None and variability_collapse_index(h, y).reason is None
    assert float(got.nc1) == pytest.approx(float(alone.nc1), rel=1e-9)


def test_features_without_columns_raise_value_error_naming_them():
    """(N, 0) features raised a RuntimeError (max of an empty tensor) or an IndexError."""
    y = torch.arange(6) % 2
    for fn in (neural_collapse, variability_collapse_index, nc1):
        with pytest.raises(ValueError, match="features"):
            fn(torch.zeros(6, 0), y)
    with pytest.raises(ValueError, match="features"):
        ncc_mismatch(torch.zeros(6, 0), y, torch.zeros(2, 0))


def test_rtol_must_be_a_number_in_zero_one():
    """rtol=nan gave a VCI of 1.0 (no direction kept)."""
    h, y = random_data(3, 5, 3, 4, spread=1.0)
    for bad in (float("nan"), -1e-3, 1.0, True):
        with pytest.raises(ValueError, match="rtol must be a number in"):
            variability_collapse_index(h, y, rtol=bad)
        with pytest.raises(ValueError, match="rtol must be a number in"):
            neural_collapse(h, y, rtol=bad)


def test_vci_keeps_a_real_feature_a_few_ulps_wide_in_bfloat16():
    """A floor on the spread (8 eps of the magnitude), tried against saturated units,
    dropped a real bfloat16 feature whose class means are 8 ulps apart: VCI 0.98 instead of
    0.16 (second review). Features are rescaled, never dropped for being narrow."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 2
    f = 10 + 0.5 * y + 0.1 * torch.randn(400, generator=g)
    h = torch.cat([f[:, None], torch.randn(400, 4, generator=g)], 1)
    low = float(variability_collapse_index(h.bfloat16(), y))
    full = float(variability_collapse_index(h, y))
    assert full < 0.3 and low == pytest.approx(full, abs=0.05)
