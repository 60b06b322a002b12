"""Cheap early-warning signals (docs/metrics.md): softmax collapse, log-partition and
z-loss, attention-logit growth, layer rotation, NLM cosine."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from landscape.functional import (
    MetricError,
    attention_logit_stats,
    layer_rotation,
    layer_rotations,
    logit_stats,
    nlm_cosine,
    softmax_collapse,
    softmax_collapse_fraction,
)


def _two_class(gap: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([[gap, 0.0]], dtype=dtype)


@pytest.mark.parametrize(
    ("dtype", "collapsed", "healthy"),
    [
        (torch.float16, 8.0, 5.0),
        (torch.float32, 16.7, 16.5),
        (torch.float64, 37.0, 36.0),
    ],
)
def test_softmax_collapse_thresholds(dtype, collapsed, healthy):
    assert float(softmax_collapse_fraction(_two_class(collapsed, dtype))) == 1.0
    assert float(softmax_collapse_fraction(_two_class(healthy, dtype))) == 0.0


def test_softmax_collapse_fraction_and_zero_terms():
    z = torch.tensor([[20.0, 0.0], [1.0, 0.0], [0.0, 30.0], [0.0, 0.0]])
    res = softmax_collapse(z, torch.tensor([0, 0, 0, 1]))
    assert float(res.fraction) == 0.5  # rows 0 and 2
    assert float(res.zero_terms) == 0.25  # row 0: correct and collapsed
    # computed in the requested dtype: float64 does not collapse at gap 20
    assert float(softmax_collapse_fraction(z, dtype=torch.float64)) == 0.0
    seq = torch.zeros(2, 3, 4)
    seq[0, 0, 0] = 50.0
    assert float(softmax_collapse_fraction(seq)) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="targets"):
        softmax_collapse(z, torch.tensor([0, 2, 0, 0]))
    with pytest.raises(ValueError, match="targets"):
        softmax_collapse(z, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="logits"):
        softmax_collapse(torch.zeros(3, 0))



def test_softmax_collapse_leaves_ignored_targets_out_of_zero_terms():
    """A negative target is cross-entropy's ignore_index (-100: language-model padding)."""
    z = torch.tensor([[20.0, 0.0], [1.0, 0.0], [0.0, 30.0], [0.0, 0.0]])
    res = softmax_collapse(z, torch.tensor([0, -100, 1, -100]))  # was: a ValueError
    assert float(res.fraction) == 0.5  # every row counts here
    assert float(res.zero_terms) == 1.0  # rows 0 and 2, both correct and collapsed
    assert math.isnan(float(softmax_collapse(z, torch.full((4,), -100)).zero_terms))

def test_logit_stats_known_answers():
    v = 7
    s = logit_stats(torch.zeros(5, v))
    assert float(s.log_z_mean) == pytest.approx(math.log(v))
    assert float(s.z_loss) == pytest.approx(1e-4 * math.log(v) ** 2)
    logp = torch.log_softmax(torch.randn(6, v, dtype=torch.float64), dim=1)
    s = logit_stats(logp)
    assert abs(float(s.log_z_max)) < 1e-12 and float(s.z_loss) < 1e-24
    z = torch.tensor([[1.0, -9.0], [3.0, 2.0]])
    s = logit_stats(z)
    assert float(s.max_logit) == 3.0 and float(s.max_abs_logit) == 9.0
    assert float(s.log_z_min) == pytest.approx(math.log(math.exp(1) + math.exp(-9)), rel=1e-6)
    half = logit_stats(torch.zeros(5, v, dtype=torch.bfloat16))
    assert half.log_z_mean.dtype == torch.float64
    assert float(half.log_z_mean) == pytest.approx(math.log(v), rel=1e-6)
    assert logit_stats(torch.tensor([[math.inf, 0.0]])).reason == "non_finite"
    d = s.as_dict()
    assert set(d) == {
        "log_z_mean",
        "log_z_min",
        "log_z_max",
        "z_loss",
        "max_logit",
        "max_abs_logit",
    }
    assert all(isinstance(x, float) for x in d.values())


def test_attention_logit_stats():
    a = 3.0
    q = torch.tensor([[[a, 0.0, 0.0, 0.0]]])
    res = attention_logit_stats(q, q)
    assert float(res.max_abs_logit) == pytest.approx(a * a / 2)
    assert float(res.bound) == pytest.approx(a * a / 2)
    t = 5
    uniform = attention_logit_stats(torch.zeros(2, t, 4), torch.randn(2, t, 4))
    assert float(uniform.entropy_min) == pytest.approx(math.log(t))
    causal = attention_logit_stats(torch.zeros(1, t, 4), torch.randn(1, t, 4), causal=True)
    assert float(causal.entropy_min) == pytest.approx(0.0, abs=1e-7)  # query 0 sees one key
    assert float(causal.entropy_mean) == pytest.approx(
        sum(math.log(i) for i in range(1, t + 1)) / t
    )
    g = torch.Generator().manual_seed(0)
    q4, k4 = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 6, 8, generator=g)
    res = attention_logit_stats(q4, k4)
    ref = (q4 @ k4.transpose(-1, -2) / math.sqrt(8)).abs()
    assert float(res.max_abs_logit) == pytest.approx(float(ref.max()), rel=1e-6)
    assert res.max_abs_logit_per_head.shape == (3,)
    assert float(res.bound) >= float(res.max_abs_logit)
    ent = -(
        F.softmax(q4 @ k4.transpose(-1, -2) / math.sqrt(8), -1)
        * F.log_softmax(q4 @ k4.transpose(-1, -2) / math.sqrt(8), -1)
    ).sum(-1)
    assert float(res.entropy_mean) == pytest.approx(float(ent.mean()), rel=1e-5)
    with pytest.raises(ValueError, match="q and k"):
        attention_logit_stats(torch.randn(2, 3, 4), torch.randn(2, 3, 5))


def test_layer_rotation_known_answers():
    w0 = torch.randn(4, 3)
    assert float(layer_rotation(2.5 * w0, w0)) == pytest.approx(0.0, abs=1e-7)
    assert float(layer_rotation(-w0, w0)) == pytest.approx(2.0)
    e = torch.eye(2)
    assert float(layer_rotation(e[0], e[1])) == pytest.approx(1.0)
    assert layer_rotation(torch.zeros(4, 3), w0).reason == "zero_norm"
    assert math.isnan(float(layer_rotation(torch.zeros(4, 3), w0)))
    with pytest.raises(ValueError, match="same shape"):
        layer_rotation(w0, w0.T)
    rot = layer_rotations({"fc.weight": -w0, "fc.bias": torch.ones(3)}, {"fc.weight": w0})
    assert list(rot) == ["fc.weight"] and float(rot["fc.weight"]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="initial"):
        layer_rotations({"fc.weight": w0}, {})


def test_nlm_cosine_one_parameter_model():
    u = torch.tensor([[2.0, 0.5, -1.0]], dtype=torch.float64)
    theta = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    loss = F.cross_entropy(theta * u, torch.tensor([0]))  # argmax u = y
    (grad,) = torch.autograd.grad(loss, theta)
    res = nlm_cosine([grad], [theta.detach()])
    assert float(res.cosine) == pytest.approx(1.0, abs=1e-15)
    assert float(res.per_tensor[0]) == pytest.approx(1.0, abs=1e-15)
    two = nlm_cosine(
        [torch.tensor([1.0, 0.0]), torch.zeros(2)], [torch.tensor([0.0, 1.0]), torch.ones(2)]
    )
    assert float(two.cosine) == 0.0 and math.isnan(float(two.per_tensor[1]))
    assert nlm_cosine([torch.zeros(2)], [torch.ones(2)]).reason == "zero_norm"
    with pytest.raises(ValueError, match="grads"):
        nlm_cosine([torch.zeros(2)], [torch.ones(3)])


# ----------------------------------------------------------------------------- non-finite input


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("which", ["q", "k"])
def test_attention_logit_stats_of_non_finite_inputs_are_nan(bad, which):
    """A NaN or inf in q gave entropy_min 0 (the broken query counted as fully collapsed
    attention) and a finite entropy_mean, with no reason."""
    g = torch.Generator().manual_seed(5)
    qk = {"q": torch.randn(1, 2, 4, 8, generator=g), "k": torch.randn(1, 2, 4, 8, generator=g)}
    qk[which][0, 0, 0, 0] = bad
    res = attention_logit_stats(qk["q"], qk["k"])
    assert res.reason == "non_finite"
    for name in ("max_abs_logit", "bound", "entropy_min", "entropy_mean"):
        assert math.isnan(float(getattr(res, name))), name
    assert res.max_abs_logit_per_head.shape == (2,)
    assert torch.isnan(res.max_abs_logit_per_head).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_softmax_collapse_of_non_finite_logits_is_nan(bad):
    """The row was counted as not collapsed: fraction 0.5 for two collapsed rows of four."""
    z = torch.tensor([[100.0, 0.0], [100.0, 0.0], [bad, 0.0], [1.0, 0.0]])
    res = softmax_collapse(z, torch.tensor([0, 0, 0, 0]))
    assert res.reason == "non_finite"
    assert math.isnan(float(res.fraction)) and math.isnan(float(res.zero_terms))
    frac = softmax_collapse_fraction(z)
    assert frac.reason == "non_finite" and math.isnan(float(frac))
    assert softmax_collapse_fraction(z[:2]).reason is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_layer_rotation_and_nlm_cosine_of_non_finite_tensors_are_nan(bad):
    """A NaN entry was reported as "zero_norm", an inf one as NaN with no reason."""
    w0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    w = w0.clone()
    w[0, 0] = bad
    for a, b in ((w, w0), (w0, w)):
        rot = layer_rotation(a, b)
        assert rot.reason == "non_finite" and math.isnan(float(rot))
        with pytest.raises(MetricError, match="not finite"):
            layer_rotation(a, b, strict=True)
        nlm = nlm_cosine([a, w0], [b, w0])
        assert nlm.reason == "non_finite" and math.isnan(float(nlm.cosine))
        assert all(math.isnan(float(c)) for c in nlm.per_tensor)
        with pytest.raises(MetricError, match="not finite"):
            nlm_cosine([a], [b], strict=True)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "name"),
    [((1, 3, 4), (1, 0, 4), "k"), ((1, 0, 4), (1, 3, 4), "q"), ((1, 3, 0), (1, 3, 0), "q"),
     ((0, 3, 4), (0, 3, 4), "q")],
)
def test_attention_logit_stats_of_empty_inputs_raise_value_error(q_shape, k_shape, name):
    """T_k = 0 raised a RuntimeError (max of an empty tensor); d = 0 a ZeroDivisionError."""
    with pytest.raises(ValueError, match=f"^{name} must"):
        attention_logit_stats(torch.randn(q_shape), torch.randn(k_shape))


def test_softmax_collapse_targets_must_be_integer_class_indices():
    z = torch.tensor([[20.0, 0.0], [1.0, 0.0]])
    for bad in (torch.tensor([True, False]), torch.tensor([0.0, 1.0])):
        with pytest.raises(ValueError, match="targets must be an integer tensor"):
            softmax_collapse(z, bad)


def test_cosines_of_huge_float64_entries_do_not_overflow():
    """Parallel float64 vectors of 1e200 gave NaN (the squared norms overflowed): the
    cosine is scale-invariant, so each is scaled by a power of two first (review)."""
    from landscape.functional import layer_rotation, nlm_cosine

    big = torch.full((2,), 1e200, dtype=torch.float64)
    small = torch.full((3,), 1e-170, dtype=torch.float64)
    assert float(nlm_cosine([big], [big]).cosine) == pytest.approx(-1.0, abs=1e-15)
    assert float(layer_rotation(big, big).value) == pytest.approx(0.0, abs=1e-15)
    assert float(layer_rotation(big, -big).value) == pytest.approx(2.0, abs=1e-15)
    mixed = nlm_cosine([small, big], [small, -big])
    assert float(mixed.cosine) == pytest.approx(1.0, abs=1e-15)
    assert [float(c) for c in mixed.per_tensor] == pytest.approx([-1.0, 1.0], abs=1e-15)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(2)]
    params = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(2)]
    a, b = torch.cat(grads), torch.cat(params)
    assert float(nlm_cosine(grads, params).cosine) == pytest.approx(
        float(-(a @ b) / (a.norm() * b.norm())), rel=1e-14)


def test_softmax_collapse_takes_floating_dtypes_only():
    """dtype=torch.int64 returned 0.0, torch.bool raised torch's subtraction error."""
    from landscape.functional import softmax_collapse_fraction

    for dtype in (torch.int64, torch.bool):
        with pytest.raises(ValueError, match="dtype must be a floating dtype"):
            softmax_collapse_fraction(torch.tensor([[0.5, 0.0]]), dtype=dtype)
