"""Taylor convergence radius of cross-entropy (docs/metrics.md): JVP derivatives against
finite differences and the dense Jacobian, the exact binary radius, aggregation, the step
controller, isolation of the model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from landscape.functional import (
    binary_radius,
    clip_step,
    directional_logit_derivatives,
    logit_spread,
    radius_from_spread,
    taylor_radius,
    taylor_radius_from_logits,
    taylor_step_controller,
)
from landscape.params import gaussian_like, norm, scale
from tests import models
from tests.functional._support import assert_untouched, prepare_dirty_model, snapshot


def _direction(model: nn.Module, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return gaussian_like([p for p in model.parameters() if p.requires_grad], g)


# ----------------------------------------------------------------------------- derivatives


def test_jvp_matches_central_finite_differences_and_the_dense_jacobian():
    model = models.mlp(d_in=6, hidden=8, d_out=3).double()
    x, _ = models.classification_data(n=10)
    x = x.double()
    v = _direction(model)
    logits, a, n = directional_logit_derivatives(model, x, v)
    assert float(n) == pytest.approx(float(norm(v)))
    names = [k for k, _ in model.named_parameters()]
    theta = {k: p.detach() for k, p in model.named_parameters()}

    def z(params):
        return functional_call(model, params, (x,))

    h = 1e-5
    plus = z({k: theta[k] + h * t for k, t in zip(names, v)})
    minus = z({k: theta[k] - h * t for k, t in zip(names, v)})
    assert torch.allclose(a, (plus - minus) / (2 * h), atol=1e-8, rtol=1e-7)
    jac = jacrev(z)(theta)  # dict of (N, C, *shape)
    dense = sum((jac[k].reshape(10, 3, -1) @ t.reshape(-1)) for k, t in zip(names, v))
    assert torch.allclose(a, dense, atol=1e-12, rtol=1e-10)
    assert torch.equal(logits, z(theta))


def test_linear_model_closed_form():
    d, c = 5, 4
    model = nn.Linear(d, c, bias=False).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, d, generator=g, dtype=torch.float64)
    v = torch.randn(c, d, generator=g, dtype=torch.float64)
    v = v / v.norm()  # unit Frobenius norm
    res = taylor_radius(model, x, [v])
    a = x @ v.T  # a = V x per sample
    spread = a.max(1).values - a.min(1).values
    assert torch.allclose(res.spread, spread, atol=1e-14)
    assert float(res.rho_a) == pytest.approx(math.pi / float(spread.max()), rel=1e-12)
    assert float(res.r) == pytest.approx(float(spread.max()) / math.pi, rel=1e-12)


def test_sequence_model_counts_every_position_and_uses_a_differentiable_attention():
    model = models.TinyTransformer().double()
    ids = models.token_data()["ids"][:, :-1]
    v = _direction(model, 1)
    logits, a, _ = directional_logit_derivatives(model, ids, v)
    assert logits.shape == a.shape == (4, 6, 11)
    named = dict(model.named_parameters())
    h = 1e-5
    with torch.no_grad():
        plus = functional_call(model, {k: p + h * t for (k, p), t in zip(named.items(), v)}, ids)
        minus = functional_call(model, {k: p - h * t for (k, p), t in zip(named.items(), v)}, ids)
    assert torch.allclose(a, (plus - minus) / (2 * h), atol=1e-7)
    res = taylor_radius(model, ids, v, targets=ids)
    assert res.spread.shape == (24,)
    assert float(res.rho_a) == pytest.approx(
        math.pi / float(logit_spread(a).max()) * float(norm(v))
    )


def test_named_subset_direction_equals_full_direction_with_zeros():
    model = models.mlp().double()
    x, _ = models.classification_data()
    x = x.double()
    v = _direction(model, 2)
    names = [k for k, _ in model.named_parameters()]
    sub = {names[0]: v[0], names[3]: v[3]}
    full = [t if k in sub else torch.zeros_like(t) for k, t in zip(names, v)]
    a_sub = taylor_radius(model, x, sub)
    a_full = taylor_radius(model, x, full)
    assert torch.allclose(a_sub.spread, a_full.spread, atol=1e-14)
    assert float(a_sub.step_norm) == pytest.approx(float(a_full.step_norm))


# ----------------------------------------------------------------------------- known answers


def test_binary_exact_radius_and_its_taylor_coefficients():
    delta, gap = 2.0, 1.0
    rho = float(binary_radius(delta, gap))
    assert rho == pytest.approx(math.sqrt(4 + math.pi**2), abs=1e-12)  # 3.724192
    assert rho == pytest.approx(3.724192, abs=1e-6)
    # from logits: z = (delta, 0), a = (gap, 0); the bound is pi / Delta_a = 3.141593
    res = taylor_radius_from_logits(torch.tensor([[delta, 0.0]]), torch.tensor([[gap, 0.0]]))
    assert float(res.rho_a) == pytest.approx(math.pi)
    assert float(res.radius_top2[0]) == pytest.approx(rho)
    # Cauchy–Hadamard: coefficients c_n of l'(t) = -gap sigmoid(-(delta + gap t)) satisfy
    # |c_n| R^n flat at R = rho*, decaying below it and growing above it.
    n_fft, r = 1024, 0.9 * rho
    t = r * np.exp(2j * np.pi * np.arange(n_fft) / n_fft)
    c = np.fft.fft(-gap / (1 + np.exp(delta + gap * t)))[:128] / n_fft / r ** np.arange(128)

    def peak(radius, start):
        k = np.arange(start, start + 20)
        return float(np.max(np.abs(c[k]) * radius**k))

    flat = [peak(rho, s) for s in (10, 40, 70)]
    assert max(flat) / min(flat) < 1.05
    assert peak(0.95 * rho, 70) < 0.1 * peak(0.95 * rho, 10)
    assert peak(1.05 * rho, 70) > 10 * peak(1.05 * rho, 10)


def test_three_classes_bound_below_exact_radius():
    z = torch.zeros(1, 3)
    a = torch.tensor([[1.0, 0.0, -1.0]])
    res = taylor_radius_from_logits(z, a)
    assert float(res.rho_a) == pytest.approx(math.pi / 2)  # 1.570796
    exact = 2 * math.pi / 3  # zeros of F(t) = 1 + 2 cosh t at +-2 pi i / 3
    t0 = 1j * exact
    assert abs(1 + np.exp(t0) + np.exp(-t0)) < 1e-12
    assert float(res.rho_a) <= exact


def test_logit_spread_api_and_aggregation():
    z = torch.tensor([[0.0, math.pi]])
    assert float(taylor_radius_from_logits(z, z).rho_a) == pytest.approx(1.0)
    a = torch.tensor([[0.0, 1.0, 0.5], [4.0, 0.0, 2.0]])
    res = taylor_radius_from_logits(torch.zeros(2, 3), a)
    assert torch.allclose(res.spread, torch.tensor([1.0, 4.0], dtype=torch.float64))
    assert float(res.rho_a) == pytest.approx(math.pi / 4)
    assert torch.allclose(res.radius, torch.tensor([math.pi, math.pi / 4], dtype=torch.float64))
    q = taylor_radius_from_logits(torch.zeros(2, 3), a, quantile=1.0)
    assert float(q.rho_a) == float(res.rho_a)
    q0 = taylor_radius_from_logits(torch.zeros(2, 3), a, quantile=0.0)
    assert float(q0.rho_a) == pytest.approx(math.pi)
    # the derivatives along p with ||p|| = 2: Delta for the unit direction halves
    scaled = taylor_radius_from_logits(torch.zeros(2, 3), 2 * a, step_norm=2.0)
    assert float(scaled.rho_a) == pytest.approx(math.pi / 4)
    assert float(scaled.r) == pytest.approx(2 * 4 / math.pi)


def test_radius_helpers_and_degenerate_directions():
    assert torch.isinf(radius_from_spread(torch.tensor([0.0])))[0]
    assert torch.isinf(binary_radius(1.0, 0.0))
    assert float(binary_radius(0.0, -2.0)) == pytest.approx(math.pi / 2)  # delta = 0: the bound
    res = taylor_radius_from_logits(torch.randn(4, 3), torch.zeros(4, 3))
    assert math.isinf(float(res.rho_a)) and float(res.r) == 0.0
    model = models.mlp().double()
    x, _ = models.classification_data()
    zero = [torch.zeros_like(p) for p in model.parameters()]
    res = taylor_radius(model, x.double(), zero)
    assert math.isinf(float(res.rho_a)) and float(res.r) == 0.0
    bad = taylor_radius_from_logits(torch.tensor([[0.0, math.inf]]), torch.ones(1, 2))
    assert bad.reason == "non_finite" and math.isnan(float(bad.rho_a))


def test_top2_radius_uses_targets():
    z = torch.tensor([[3.0, 1.0, 0.0]])
    a = torch.tensor([[0.0, 2.0, 1.0]])
    pred = taylor_radius_from_logits(z, a)  # y = 0, runner-up c = 1
    assert float(pred.radius_top2[0]) == pytest.approx(math.sqrt(4 + math.pi**2) / 2)
    tgt = taylor_radius_from_logits(z, a, targets=torch.tensor([2]))  # y = 2, c = 0
    assert float(tgt.radius_top2[0]) == pytest.approx(math.sqrt(9 + math.pi**2) / 1)


# ----------------------------------------------------------------------------- controller


def test_clip_rescales_three_radii_to_exactly_one():
    model = models.mlp().double()
    x, _ = models.classification_data()
    x = x.double()
    v = _direction(model, 4)
    v = scale(v, 1.0 / norm(v))
    rho = float(taylor_radius(model, x, v).rho_a)
    p = scale(v, 3 * rho)
    scaled, s, before = taylor_step_controller(model, x, p)
    assert s == pytest.approx(1 / 3, rel=1e-10)
    assert float(before.r) == pytest.approx(3.0, rel=1e-10)
    assert all(torch.allclose(a, b / 3) for a, b in zip(scaled, p))
    assert float(taylor_radius(model, x, scaled).r) == pytest.approx(1.0, rel=1e-10)
    half, _, _ = taylor_step_controller(model, x, p, target=0.5)
    assert float(taylor_radius(model, x, half).r) == pytest.approx(0.5, rel=1e-10)


def test_controller_leaves_small_steps_alone_and_never_exceeds_one():
    model = models.mlp().double()
    x, _ = models.classification_data()
    x = x.double()
    for seed, size in [(0, 1e-3), (1, 0.1), (2, 10.0), (3, 1e3)]:
        v = _direction(model, seed)
        p = scale(v, size / float(norm(v)))
        scaled, s, res = taylor_step_controller(model, x, p)
        r_after = float(taylor_radius(model, x, scaled).r)
        assert r_after <= 1.0 + 1e-9
        if float(res.r) <= 1.0:
            assert s == 1.0 and all(torch.equal(a, b) for a, b in zip(scaled, p))
    _, s = clip_step([torch.ones(3)], math.inf)
    assert s == 1.0
    with pytest.raises(ValueError, match="rho_a"):
        clip_step([torch.ones(3)], 0.0)
    with pytest.raises(ValueError, match="target"):
        clip_step([torch.ones(3)], 1.0, target=0.0)


# ----------------------------------------------------------------------------- isolation


def test_model_untouched_and_eval_mode_by_default():
    model = prepare_dirty_model(models.cnn_bn(), freeze="conv.bias")
    x, y = models.image_data()
    v = _direction(model)
    snap = snapshot(model)
    res = taylor_radius(model, x, v, targets=y)
    assert_untouched(model, snap)
    taylor_step_controller(model, x, v)
    assert_untouched(model, snap)
    train = taylor_radius(model, x, v, eval_mode=False)  # batch statistics, dropout on
    assert_untouched(model, snap)
    assert not torch.allclose(train.spread, res.spread)
    # eval-mode default = the model evaluated in eval() (running statistics, no dropout)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    model.train()
    logits, _, _ = directional_logit_derivatives(model, x, v)
    assert torch.allclose(logits, ref)
    assert_untouched(model, snap)


# ----------------------------------------------------------------------------- bad input


def test_bad_arguments_raise_value_error_naming_them():
    model = models.mlp()
    x, _ = models.classification_data()
    v = _direction(model)
    with pytest.raises(ValueError, match="direction"):
        taylor_radius(model, x, v[:-1])
    with pytest.raises(ValueError, match="direction"):
        taylor_radius(model, x, [torch.zeros(2), *v[1:]])
    with pytest.raises(ValueError, match="direction"):
        taylor_radius(model, x, {"nope": v[0]})
    with pytest.raises(ValueError, match="direction"):
        taylor_radius(model, x, v[0])
    with pytest.raises(ValueError, match="logit_derivatives"):
        taylor_radius_from_logits(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="targets"):
        taylor_radius_from_logits(
            torch.zeros(2, 3), torch.zeros(2, 3), targets=torch.tensor([0, 3])
        )
    with pytest.raises(ValueError, match="targets"):
        taylor_radius_from_logits(torch.zeros(2, 3), torch.zeros(2, 3), targets=torch.tensor([0]))
    with pytest.raises(ValueError, match="quantile"):
        taylor_radius_from_logits(torch.zeros(2, 3), torch.zeros(2, 3), quantile=1.5)
    with pytest.raises(ValueError, match="step_norm"):
        taylor_radius_from_logits(torch.zeros(2, 3), torch.zeros(2, 3), step_norm=-1.0)
    with pytest.raises(ValueError, match="step_norm must be one number"):  # was torch's
        taylor_radius_from_logits(torch.zeros(2, 3), torch.zeros(2, 3),  # 'ambiguous'
                                  step_norm=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="logits"):
        taylor_radius_from_logits(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))


def test_low_precision_logits_are_computed_in_float64():
    a = torch.tensor([[0.0, 1.0, 0.5], [4.0, 0.0, 2.0]])
    for dt in (torch.float16, torch.bfloat16):
        res = taylor_radius_from_logits(torch.zeros(2, 3, dtype=dt), a.to(dt))
        assert res.rho_a.dtype == torch.float64
        assert float(res.rho_a) == pytest.approx(math.pi / 4)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-8), (torch.float32, 1e-3)])
def test_derivatives_through_reentrant_checkpointing_come_from_a_central_difference(dtype, rtol):
    plain, ckpt = models.CheckpointedMLP(False).to(dtype), models.CheckpointedMLP(True).to(dtype)
    x, _ = models.classification_data(n=10)
    x = x.to(dtype)
    v = _direction(plain)
    with pytest.raises(Exception, match="setup_context"):  # the JVP alone cannot
        torch.func.jvp(lambda p: functional_call(ckpt, p, (x,)),
                       (dict(ckpt.named_parameters()),), (dict(zip(
                           [k for k, _ in ckpt.named_parameters()], v)),))
    want_logits, want, _ = directional_logit_derivatives(plain, x, v)
    before = snapshot(ckpt)
    logits, a, n = directional_logit_derivatives(ckpt, x, v)  # was: the JVP's error
    assert torch.equal(logits, want_logits)
    torch.testing.assert_close(a, want, rtol=rtol, atol=rtol * float(want.abs().max()))
    assert float(n) == pytest.approx(float(norm(v)))
    assert_untouched(ckpt, before)
    # and the radius that rests on it
    r_plain = taylor_radius(plain, x, v).r
    assert float(taylor_radius(ckpt, x, v).r) == pytest.approx(float(r_plain), rel=rtol)



def test_a_negative_target_takes_the_predicted_class_in_the_top2_radius():
    """-100 (language-model padding) is ignored as by cross-entropy, not an error."""
    g = torch.Generator().manual_seed(0)
    z, a = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y = torch.tensor([1, -100, 3, 0, -1, 2])
    got = taylor_radius_from_logits(z, a, targets=y)  # was: a ValueError
    filled = torch.where(y < 0, z.argmax(1), y)
    want = taylor_radius_from_logits(z, a, targets=filled)
    for field in ("rho_a", "r", "spread", "radius_top2"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=0)
    zeros = torch.zeros(6, dtype=torch.long)
    assert not torch.equal(want.radius_top2,
                           taylor_radius_from_logits(z, a, targets=zeros).radius_top2)
    with pytest.raises(ValueError, match="targets"):
        taylor_radius_from_logits(z, a, targets=torch.tensor([0, 0, 0, 0, 0, 4]))


def test_the_central_difference_draws_one_dropout_mask_in_train_mode():
    """With eval_mode=False each of its three forwards drew its own mask: |J p| 41.4 where
    the JVP (one forward) gives 0.09."""

    class Dropped(models.CheckpointedMLP):
        def __init__(self, checkpointed):
            super().__init__(checkpointed)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return super().forward(self.drop(x))

    plain, ckpt = Dropped(False).double(), Dropped(True).double()
    x, _ = models.classification_data(n=10)
    v = _direction(plain)
    torch.manual_seed(7)
    _, want, _ = directional_logit_derivatives(plain, x.double(), v, eval_mode=False)
    torch.manual_seed(7)
    _, got, _ = directional_logit_derivatives(ckpt, x.double(), v, eval_mode=False)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_targets_must_be_integer_class_indices():
    """Float targets were truncated silently (1.7 -> class 1); bool ones read as 0/1."""
    z, a = torch.zeros(3, 3), torch.ones(3, 3)
    for bad in (torch.tensor([0.0, 1.7, 2.2]), torch.tensor([0.0, 1.0, 2.0]),
                torch.tensor([True, False, True])):
        with pytest.raises(ValueError, match="targets must be an integer tensor"):
            taylor_radius_from_logits(z, a, targets=bad)


def test_logits_without_classes_raise_value_error_naming_them():
    """C = 0 raised a RuntimeError (reshape of 0 elements into [-1, 0])."""
    with pytest.raises(ValueError, match="logit_derivatives must"):
        logit_spread(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="logits must"):
        taylor_radius_from_logits(torch.zeros(3, 0), torch.zeros(3, 0))
    with pytest.raises(ValueError, match="logits must"):
        taylor_radius_from_logits(torch.zeros(0, 3), torch.zeros(0, 3))
