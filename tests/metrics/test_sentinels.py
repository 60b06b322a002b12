"""The every-step sentinels: the secant Taylor ratio against the exact JVP ratio."""

import math

import pytest
import torch
import torch.nn.functional as F

import landscape as ls
from landscape.batches import head
from landscape.isolation import stateless_call
from landscape.metrics import Sentinels
from landscape.metrics.sentinels import secant_ratio
from landscape.params import trainable_named_parameters
from tests import models


def _exact_and_secant(model, x, step_scale, seed=0):
    """Exact r = max spread(J p)/pi at theta, and the secant along the same step p."""
    named = trainable_named_parameters(model)
    names = list(named)
    theta = tuple(p.detach() for p in named.values())
    g = torch.Generator().manual_seed(seed)
    p = tuple(step_scale * torch.randn(t.shape, generator=g, dtype=t.dtype) for t in theta)

    def f(*flat):
        return stateless_call(model, dict(zip(names, flat)), (x,))

    z0, jp = torch.func.jvp(f, theta, p)
    exact = float((jp.max(-1).values - jp.min(-1).values).max()) / math.pi
    z1 = f(*(t + d for t, d in zip(theta, p)))
    return exact, secant_ratio(z0, z1)


def test_secant_agrees_with_the_jvp_ratio_to_second_order():
    model = models.mlp(d_in=6, hidden=16, d_out=4, seed=1).double().eval()
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    errors = []
    for scale in (1e-2, 5e-3, 2.5e-3):
        exact, secant = _exact_and_secant(model, x, scale)
        errors.append(abs(secant - exact))
        assert abs(secant - exact) <= 2 * exact**2 + 1e-12  # O(r^2)
    # halving the step divides the difference by about 4 (second order)
    assert errors[1] / errors[0] < 0.35 and errors[2] / errors[1] < 0.35


def test_secant_is_monotone_in_the_step_length_like_the_exact_ratio():
    model = models.mlp(d_in=6, hidden=16, d_out=4, seed=3).double().eval()
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    scales = [0.02, 0.05, 0.1, 0.2, 0.4]
    pairs = [_exact_and_secant(model, x, s) for s in scales]
    exact = [e for e, _ in pairs]
    secant = [s for _, s in pairs]
    assert exact == sorted(exact) and secant == sorted(secant)
    assert secant[-1] > 1.0 and 0.2 < secant[-1] / exact[-1] < 5  # same scale at large r


def test_sentinels_metric_matches_the_taylor_radius_metric_on_small_steps():
    torch.manual_seed(0)
    model = models.mlp(d_in=6, hidden=16, d_out=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = models.classification_data(16, seed=1)
    metrics = [Sentinels(subsample=16), ls.metrics.TaylorRadius(schedule=1, data="probe")]
    with ls.Monitor(model, F.cross_entropy, optimizer=opt, metrics=metrics, probe=(x, y),
                    warn=False, strict=True) as mon:
        for step in range(4):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x, y), loss=loss)
        run = mon.run()
    _, secant = run.series("sentinels", "r_secant")
    _, exact = run.series("taylor_radius", "r")
    assert math.isnan(secant[0])
    for s, e in zip(secant[1:], exact[1:]):
        assert abs(s - e) <= 0.05 * e + 4 * e**2
    _, gap = run.series("sentinels", "gap")
    assert list(gap[1:]) == [1.0, 1.0, 1.0]
    _, ratio = run.series("sentinels", "update_ratio")
    _, layer = run.series("sentinels", "update_layer")
    assert (ratio[1:] > 0).all() and set(layer[1:]) <= {0.0, 1.0, 2.0}


def test_head_slices_nested_batches():
    batch = {"x": torch.arange(10), "y": (torch.ones(10, 2), 3)}
    out = head(batch, 4)
    assert out["x"].tolist() == [0, 1, 2, 3] and out["y"][0].shape == (4, 2) and out["y"][1] == 3


def test_subsample_must_be_positive():
    with pytest.raises(ValueError, match="subsample"):
        Sentinels(subsample=0)
