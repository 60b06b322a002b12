"""Spectral alignment (docs/metrics.md): power iteration, per-token cosines, sign
diversity; the convention-independent known answers and the sign-flip invariance."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from landscape.functional import (
    MetricError,
    attention_projections,
    sign_diversity,
    spectral_alignment,
    top_singular_vector,
)
from landscape.functional.alignment import EXACT_SIDE

SETTINGS = settings(max_examples=25, deadline=None)
SUMMARY = ("frac_positive", "frac_negative", "minority_fraction", "sign_entropy", "mean_abs_cos")


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def _rank_one(seed: int = 0, d_out: int = 5, d_in: int = 7, sigma: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    u = _unit(torch.randn(d_out, generator=g, dtype=torch.float64))
    v = _unit(torch.randn(d_in, generator=g, dtype=torch.float64))
    if v[v.abs().argmax()] < 0:  # the cold-start sign convention
        u, v = -u, -v
    return sigma * torch.outer(u, v), u, v


def test_rank_one_cosines():
    w, _, v = _rank_one()
    g = torch.Generator().manual_seed(1)
    r = torch.randn(7, generator=g, dtype=torch.float64)
    ortho = r - (r @ v) * v
    res = spectral_alignment(w, torch.stack([v, -v, 2.5 * v, ortho]))
    assert float(res.v @ v) == pytest.approx(1.0, abs=1e-9)  # this v has its largest entry > 0
    assert torch.allclose(
        res.cosines, torch.tensor([1.0, -1.0, 1.0, 0.0], dtype=torch.float64), atol=1e-7
    )
    assert float(res.sigma) == pytest.approx(3.0, rel=1e-10)


def test_sign_diversity_known_answers():
    w, _, v = _rank_one()
    balanced = spectral_alignment(w, torch.stack([v, -v, v, -v]))
    assert float(balanced.minority_fraction) == pytest.approx(0.5)
    assert float(balanced.sign_entropy) == pytest.approx(math.log(2))
    collapsed = spectral_alignment(w, torch.stack([v, v, 3 * v, v]))
    assert float(collapsed.minority_fraction) == 0.0
    assert float(collapsed.sign_entropy) == 0.0
    assert float(collapsed.mean_abs_cos) == pytest.approx(1.0)
    d = sign_diversity(torch.tensor([0.5, -0.25, 0.0, 0.75]))  # the exact zero is left out
    assert float(d["frac_positive"]) == pytest.approx(2 / 3)
    assert float(d["minority_fraction"]) == pytest.approx(1 / 3)
    assert float(d["mean_abs_cos"]) == pytest.approx(0.5)


def test_flipping_the_singular_pair_leaves_the_summary_unchanged():
    w, _, v = _rank_one(2)
    g = torch.Generator().manual_seed(0)  # the global RNG: a tie at 0.5 in some orders
    x = torch.randn(51, 7, generator=g, dtype=torch.float64) + 0.3 * v
    a = spectral_alignment(w, x, v=v)
    b = spectral_alignment(w, x, v=-v)
    assert torch.allclose(a.cosines, -b.cosines)
    for k in ("minority_fraction", "sign_entropy", "mean_abs_cos"):
        assert float(getattr(a, k)) == pytest.approx(float(getattr(b, k)), abs=1e-15), k
    assert float(a.frac_positive) == float(b.frac_negative)
    assert 0.0 < float(a.minority_fraction) < 0.5


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    d_out=st.integers(1, 8),
    d_in=st.integers(1, 8),
    n=st.integers(1, 30),
    scale=st.floats(1e-2, 1e2),
)
def test_summary_invariant_to_sign_flip_token_permutation_and_scaling(seed, d_out, d_in, n, scale):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    top = top_singular_vector(w, max_iter=2000, tol=1e-14)
    base = spectral_alignment(w, x, v=top.v)
    perm = torch.randperm(n, generator=g)
    pos = torch.rand(n, 1, generator=g, dtype=torch.float64) * scale + 1e-3
    variants = [
        spectral_alignment(w, x, v=-top.v),  # the SVD sign ambiguity
        spectral_alignment(-w, x, v=top.v),  # -W has the same singular subspaces
        spectral_alignment(scale * w, (pos * x)[perm], v=top.v),
    ]
    for other in variants:
        assert float(other.minority_fraction) == float(base.minority_fraction)
        assert float(other.sign_entropy) == pytest.approx(float(base.sign_entropy), abs=1e-12)
        assert float(other.mean_abs_cos) == pytest.approx(float(base.mean_abs_cos), abs=1e-12)
    m, h = float(base.minority_fraction), float(base.sign_entropy)
    assert 0.0 <= m <= 0.5 and 0.0 <= h <= math.log(2) + 1e-15


# ----------------------------------------------------------------------------- power iteration


@pytest.mark.parametrize(("d_out", "d_in"), [(6, 9), (9, 6), (1, 5), (5, 1)])
def test_power_iteration_matches_svd_up_to_sign(d_out, d_in):
    g = torch.Generator().manual_seed(d_out * 10 + d_in)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    top = top_singular_vector(w, max_iter=5000, tol=1e-15)
    u, s, vh = torch.linalg.svd(w)
    assert float(top.sigma) == pytest.approx(float(s[0]), rel=1e-9)
    assert float((top.v @ vh[0]).abs()) == pytest.approx(1.0, abs=1e-9)
    assert float((top.u @ u[:, 0]).abs()) == pytest.approx(1.0, abs=1e-9)
    assert float(top.v.abs().max()) == float(top.v.max())  # cold start: largest entry > 0


def test_warm_start_converges_in_fewer_products_and_keeps_the_sign():
    g = torch.Generator().manual_seed(0)
    shape = (600, EXACT_SIDE + 44)  # larger than the exact path's: Lanczos
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    cold = top_singular_vector(w, max_iter=5000, tol=1e-12)
    w2 = w + 1e-3 * torch.randn(*shape, generator=g, dtype=torch.float64)  # one small step
    warm = top_singular_vector(w2, -cold.v, tol=1e-8)
    assert warm.converged and warm.n_iter < top_singular_vector(w2, tol=1e-8).n_iter
    assert float(warm.v @ -cold.v) > 0  # sign follows the warm start (continuous series)
    x = torch.randn(10, shape[1], dtype=torch.float64)
    res = spectral_alignment(w2, x, init=cold.v)
    assert res.n_iter < spectral_alignment(w2, x).n_iter and float(res.v @ cold.v) > 0


@pytest.mark.parametrize("width", [256, 512])
def test_a_freshly_initialised_wide_layer_gets_its_top_singular_vector(width):
    """Its top singular values are close (s_1/s_2 ~ 1.007): power iteration stopped on the
    change of its iterate ended far from v_1 (|<v, v_1>| = 0.56 at 768) and said converged.
    """
    torch.manual_seed(0)
    w = torch.nn.Linear(width, width).weight.detach()
    top = top_singular_vector(w)
    vh = torch.linalg.svd(w.double())[2]
    assert top.converged
    assert float((top.v.double() @ vh[0]).abs()) == pytest.approx(1.0, abs=1e-4)


def test_float32_weights_and_low_precision_inputs():
    w, _, v = _rank_one()
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.stack([v, -v, v]).to(dt)
        res = spectral_alignment(w.float(), x)
        assert res.cosines.dtype == torch.float32
        assert float(res.minority_fraction) == pytest.approx(1 / 3)
        assert torch.allclose(res.cosines.abs(), torch.ones(3), atol=1e-2)


def test_tokens_of_any_leading_shape():
    w, _, _ = _rank_one()
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    res = spectral_alignment(w, x)
    assert res.n_tokens == 12 and res.cosines.shape == (12,)
    flat = spectral_alignment(w, x.reshape(12, 7))
    assert torch.equal(res.cosines, flat.cosines)


# ----------------------------------------------------------------------------- edge cases


def test_zero_weight_and_zero_inputs():
    res = spectral_alignment(torch.zeros(3, 4), torch.randn(5, 4))
    assert res.reason == "zero_matrix" and math.isnan(float(res.minority_fraction))
    with pytest.raises(MetricError, match="zero_matrix"):
        spectral_alignment(torch.zeros(3, 4), torch.randn(5, 4), strict=True)
    res = spectral_alignment(torch.randn(3, 4), torch.zeros(5, 4))
    assert res.reason == "zero_inputs" and torch.equal(res.cosines, torch.zeros(5))
    assert math.isnan(float(res.sign_entropy))
    mixed = spectral_alignment(torch.randn(3, 4), torch.cat([torch.zeros(2, 4), torch.randn(3, 4)]))
    assert mixed.ok and mixed.n_tokens == 5


def test_bad_shapes_raise_value_error_naming_the_argument():
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="weight"):
        spectral_alignment(torch.randn(4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="inputs"):
        spectral_alignment(w, torch.randn(5, 3))
    with pytest.raises(ValueError, match="init"):
        spectral_alignment(w, torch.randn(5, 4), init=torch.randn(3))
    with pytest.raises(ValueError, match="init"):
        top_singular_vector(w, torch.zeros(4))
    with pytest.raises(ValueError, match="v must"):
        spectral_alignment(w, torch.randn(5, 4), v=torch.zeros(4))
    with pytest.raises(ValueError, match="inputs"):
        spectral_alignment(w, torch.ones(5, 4, dtype=torch.long))


def test_attention_projections():
    mha = nn.MultiheadAttention(8, 2)
    proj = attention_projections(mha)
    assert set(proj) == {"q", "k", "v", "out"}
    assert all(t.shape == (8, 8) for t in proj.values())
    assert torch.equal(proj["k"], mha.in_proj_weight[8:16])
    sep = attention_projections(nn.MultiheadAttention(8, 2, kdim=5, vdim=6))
    assert sep["k"].shape == (8, 5) and sep["v"].shape == (8, 6)
    lin = attention_projections(nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)))
    assert list(lin) == ["0.weight"]


def test_summary_and_as_dict():
    w, _, v = _rank_one()
    res = spectral_alignment(w, torch.stack([v, -v]))
    s = res.summary()
    assert set(s) == {*SUMMARY, "sigma"} and all(isinstance(x, float) for x in s.values())
    d = res.as_dict()
    assert isinstance(d["minority_fraction"], float) and d["cosines"].shape == (2,)


def test_a_non_finite_weight_has_no_top_singular_vector():
    """Lanczos returned a finite v for W with an inf entry (minority 0.433, no reason)."""
    w = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))
    w[3, 4] = math.inf
    top = top_singular_vector(w)
    assert top.reason == "non_finite" and torch.isnan(top.v).all()
    res = spectral_alignment(w, torch.randn(10, 9))
    assert res.reason == "non_finite" and math.isnan(float(res.minority_fraction))


@pytest.mark.parametrize("scale", [1e-25, 1e-14, 1e-8, 1e6, 1e12])
def test_tiny_and_huge_weights_get_their_top_singular_vector(scale):
    """W^T W under- or overflowed in float32: one product, 'converged', sigma 40 % off."""
    w = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)) * scale
    top = top_singular_vector(w)
    _, s, vh = torch.linalg.svd(w.double())
    assert top.converged
    assert float(top.sigma) == pytest.approx(float(s[0]), rel=1e-4)
    assert float((top.v.double() @ vh[0]).abs()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("shape", [(40, 8), (8, 40), (EXACT_SIDE, 300), (1, 5), (5, 1)])
def test_small_weights_get_the_exact_vector_without_products(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    top = top_singular_vector(w, init=torch.ones(shape[1]))
    _, s, vh = torch.linalg.svd(w.double())
    assert top.n_iter == 0 and top.converged
    assert float(top.sigma) == pytest.approx(float(s[0]), rel=1e-5)
    assert float(top.v.double() @ vh[0]) ** 2 == pytest.approx(1.0, abs=1e-6)
    assert float(top.v.double() @ torch.ones(shape[1], dtype=torch.float64)) >= 0  # init's sign


@pytest.mark.parametrize("scale", [2.0**70, 2.0**-100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_beyond_the_range_of_their_squares_give_the_same_cosines(scale, dtype):
    """The input norms squared overflowed in float32 above ~1.8e19 (x1e19 read minority 0.5
    for 0.433, x1e20 "zero_inputs") and underflowed below ~1e-19. A power of two scales
    exactly, so the cosines must not move at all."""
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(5, 6, generator=g), torch.randn(30, 6, generator=g).to(dtype)
    ref = spectral_alignment(w, x)
    res = spectral_alignment(w, x * scale)
    assert res.reason is None and torch.equal(res.cosines, ref.cosines)
    assert res.summary() == ref.summary()


@pytest.mark.parametrize("scale", [1e19, 1e20, 1e-30])
def test_float32_inputs_at_extreme_scales_match_float64(scale):
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(5, 6, generator=g), (torch.randn(30, 6, generator=g) * scale)
    res = spectral_alignment(w, x)
    ref = spectral_alignment(w.double(), x.double())
    assert res.reason is None
    assert torch.allclose(res.cosines.double(), ref.cosines, atol=1e-6)
    assert float(res.minority_fraction) == float(ref.minority_fraction)


def test_a_zero_weight_with_a_given_v_is_a_zero_matrix():
    """With v= the weight was not looked at: sigma 0 and a summary, no reason."""
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    res = spectral_alignment(torch.zeros(3, 4), x, v=torch.ones(4))
    assert res.reason == "zero_matrix" and float(res.sigma) == 0.0
    assert torch.isnan(res.cosines).all()
    assert all(math.isnan(float(getattr(res, k))) for k in SUMMARY)
    with pytest.raises(MetricError, match="zero_matrix"):
        spectral_alignment(torch.zeros(3, 4), x, v=torch.ones(4), strict=True)
    w = torch.randn(3, 4)
    w[0, 0] = math.inf
    bad = spectral_alignment(w, x, v=torch.ones(4))
    assert bad.reason == "non_finite" and torch.isnan(bad.cosines).all()


@pytest.mark.parametrize("shape", [(0, 4), (3, 0)])
def test_an_empty_weight_raises_value_error_naming_it(shape):
    """Raised a RuntimeError (max of an empty tensor, reshape of 0 elements)."""
    x = torch.randn(5, shape[1])
    with pytest.raises(ValueError, match="weight"):
        spectral_alignment(torch.zeros(shape), x)
    with pytest.raises(ValueError, match="weight"):
        spectral_alignment(torch.zeros(shape), x, v=torch.ones(shape[1]))
    with pytest.raises(ValueError, match="weight"):
        top_singular_vector(torch.zeros(shape))


def test_an_unconverged_top_vector_is_said_and_max_iter_must_allow_one_product():
    """spectral_alignment dropped the solver's converged flag: after 5 products on a
    300 x 300 matrix v was 0.16 aligned with v_1 and nothing said so (review)."""
    import landscape.functional as LF

    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 300, generator=g)
    x = torch.randn(5, 300, generator=g)
    v1 = torch.linalg.svd(w.double())[2][0]
    short = LF.spectral_alignment(w, x, max_iter=5)
    assert not short.converged and abs(float(short.v.double() @ v1)) < 0.9
    full = LF.spectral_alignment(w, x)
    assert full.converged and abs(float(full.v.double() @ v1)) > 1 - 1e-4
    assert LF.spectral_alignment(w, x, v=v1.float()).converged
    assert LF.spectral_alignment(w[:10], x[:, :300]).converged  # the exact path
    with pytest.raises(ValueError, match="max_iter must be an integer >= 1"):
        LF.spectral_alignment(w, x, max_iter=0)


def test_sign_diversity_of_cosines_holding_nan_is_nan():
    """A NaN cosine has no sign: [0.5, nan, nan] read as sign collapse (minority 0)."""
    from landscape.functional import sign_diversity

    out = sign_diversity(torch.tensor([0.5, float("nan"), float("nan")]))
    assert all(math.isnan(float(v)) for v in out.values())
