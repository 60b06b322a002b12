"""Sharpness with parameter groups of different learning rates: the ratio is exact.

SGD with a head trained at 10x the body's rate is stable on a quadratic exactly while
lambda_max(D^1/2 H D^1/2) < (2 + 2 beta)/eta_1, D the groups' rates over the first's
(docs/curvature.md). The first group's threshold against the Hessian's own lambda_max
(what the metric recorded before, with a warning) overstates the margin by the factor the
head's rate brings.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape as ls
from landscape.metrics import Sharpness
from tests.models import full_batch_steps


def _regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.randn(64, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 2)).double()  # deep linear: quartic
    return model, (x, y)


def _dense_ratio(model, batch, lrs, beta, lr_of=None):
    """lambda_max(D^1/2 H D^1/2) * eta_1 / (2 + 2 beta) from the dense Hessian.

    ``lrs`` are the two layers' rates; ``lr_of`` overrides them per parameter name.
    """
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    x, y = batch

    def loss(*flat):
        out = torch.func.functional_call(model, dict(zip(names, flat)), (x,))
        return F.mse_loss(out, y)

    blocks = torch.func.hessian(loss, argnums=tuple(range(len(names))))(*params.values())
    sizes = [p.numel() for p in params.values()]
    h = torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j])
                              for j in range(len(sizes))], 1) for i in range(len(sizes))])
    group = {"0.weight": 0, "0.bias": 0, "1.weight": 1, "1.bias": 1}
    ref = next(lr for lr in lrs if lr > 0)  # the first group that trains
    lr_of = lr_of or {n: lrs[group[n]] for n in names}
    d = torch.cat([torch.full((s,), lr_of[n] / ref, dtype=torch.float64)
                   for n, s in zip(names, sizes)])
    scaled = d.sqrt()[:, None] * h * d.sqrt()[None, :]
    return float(torch.linalg.eigvalsh(scaled)[-1]) * ref / (2 + 2 * beta)


def _flat_hessian(model, x, y) -> torch.Tensor:
    """The dense Hessian of the MSE loss over every parameter, flattened in model order."""
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def loss_of(v):
        parts, at = {}, 0
        for n, sh in zip(names, shapes):
            parts[n] = v[at: at + sh.numel()].reshape(sh)
            at += sh.numel()
        return F.mse_loss(torch.func.functional_call(model, parts, (x,)), y)

    return torch.func.hessian(loss_of)(flat)


def _sharpness_row(model, opt, batch) -> dict[str, float]:
    with ls.Monitor(model, F.mse_loss, optimizer=opt, probe=batch, alarms=False,
                    metrics=[Sharpness(tol=1e-10, schedule=1)]) as mon:
        mon.step(0, batch=batch, loss=1.0)
        run = mon.run()
        return {f: float(run.series("sharpness", f)[1][0])
                for f in ("lambda_max", "threshold", "ratio")}


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_the_ratio_of_groups_with_different_learning_rates_is_the_scaled_operators(beta):
    model, batch = _regression()
    lrs = (0.01, 0.1)  # the head at 10x the body's rate
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": lrs[0]},
                           {"params": model[1].parameters(), "lr": lrs[1]}], momentum=beta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "groups differ" warning: the ratio is exact
        with ls.Monitor(model, F.mse_loss, optimizer=opt, probe=batch, alarms=False,
                        metrics=[Sharpness(tol=1e-10, schedule=1)]) as mon:
            mon.step(0, batch=batch, loss=1.0)
            (row,) = [dict(zip(("lambda_max", "threshold", "ratio"), v))
                      for v in zip(*(mon.run().series("sharpness", f)[1]
                                     for f in ("lambda_max", "threshold", "ratio")))]
    assert row["threshold"] == pytest.approx((2 + 2 * beta) / lrs[0])
    assert row["ratio"] == pytest.approx(_dense_ratio(model, batch, lrs, beta), rel=1e-8)


def test_at_the_ratio_one_the_two_group_iteration_turns_unstable():
    """Gradient descent with the two groups' rates on a linear least-squares model (a
    quadratic, convex loss): below ratio 1 the iterates settle, above it they grow,
    whatever the Hessian's own lambda_max says."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64) + 2.0  # a large bias curvature
    y = torch.randn(64, 2, generator=g, dtype=torch.float64)
    model = nn.Linear(5, 2).double()
    lrs = (0.01, 0.1)  # weight at the first rate, bias at 10x
    opt = torch.optim.SGD([{"params": [model.weight], "lr": lrs[0]},
                           {"params": [model.bias], "lr": lrs[1]}])
    with ls.Monitor(model, F.mse_loss, optimizer=opt, probe=(x, y), alarms=False,
                    metrics=[Sharpness(tol=1e-10, schedule=1)]) as mon:
        mon.step(0, batch=(x, y), loss=1.0)
        _, (ratio,) = mon.run().series("sharpness", "ratio")

    def loss(flat):
        parts = {"weight": flat[:10].reshape(2, 5), "bias": flat[10:]}
        return F.mse_loss(torch.func.functional_call(model, parts, (x,)), y)

    theta = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    h = torch.func.hessian(loss)(theta)
    # the first group's rate against the Hessian's own lambda_max: a margin 1.5x too wide
    assert float(torch.linalg.eigvalsh(h)[-1]) * lrs[0] / 2 < ratio / 1.4
    for factor, grows in ((0.97, False), (1.03, True)):
        lr = torch.full_like(theta, lrs[0] * factor / ratio)
        lr[10:] = lrs[1] * factor / ratio
        v = torch.randn(theta.numel(), dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
        for _ in range(4000):  # the deviation from the minimum: v <- (I - diag(lr) H) v
            v = v - lr * (h @ v)
            if v.norm() > 1e6:
                break
        assert (v.norm() > 1e6) == grows, factor
        assert (v.norm() < 1e-3) == (not grows), factor  # below the edge: it settles


@pytest.mark.parametrize("lrs", [(1e-3, 5e-3), (1e-3, 0.0), (0.0, 1e-3)])
def test_adams_groups_fold_their_rates_into_the_preconditioner(lrs):
    model, batch = _regression(1)
    betas, eps = (0.9, 0.999), 1e-8
    opt = torch.optim.Adam([{"params": model[0].parameters(), "lr": lrs[0]},
                            {"params": model[1].parameters(), "lr": lrs[1]}], betas=betas,
                           eps=eps)
    x, y = batch
    with ls.Monitor(model, F.mse_loss, optimizer=opt, probe=batch, alarms=False,
                    metrics=[Sharpness(tol=1e-10, schedule=1, adam_warmup=1)]) as mon:
        full_batch_steps(mon, model, opt, x, y, 3, loss_fn=F.mse_loss)
        _, ratios = mon.run().series("sharpness", "ratio")
    # dense: lambda_max(S H S), S = sqrt(eta_g / eta_1 / P), P = sqrt(v_hat) + eps
    scale = []
    for i, layer in enumerate(model):
        for p in layer.parameters():
            st = opt.state[p]
            v_hat = st["exp_avg_sq"] / (1 - betas[1] ** float(st["step"]))
            ref = max(lrs) if lrs[0] == 0 else lrs[0]  # the first group that trains
            scale.append((lrs[i] / ref / (v_hat.sqrt() + eps)).sqrt().flatten())
    s = torch.cat(scale)
    h = _flat_hessian(model, x, y)
    lam = float(torch.linalg.eigvalsh(s[:, None] * h * s[None, :])[-1])
    threshold = (2 + 2 * betas[0]) / ((1 - betas[0]) * (lrs[0] or lrs[1]))
    assert ratios[-1] == pytest.approx(lam / threshold, rel=1e-7)


@pytest.mark.parametrize("lrs", [(0.01, 0.0), (0.0, 0.1)])
def test_a_group_at_learning_rate_zero_does_not_move_and_leaves_the_operator(lrs):
    """A frozen group kept in the optimizer (lr 0) was counted at the first group's rate,
    or, first itself, made the threshold infinite and the ratio 0 whatever the head did."""
    model, batch = _regression(2)
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": lrs[0]},
                           {"params": model[1].parameters(), "lr": lrs[1]}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact: no "groups differ" warning
        row = _sharpness_row(model, opt, batch)
    assert row["threshold"] == pytest.approx(2 / max(lrs))
    assert row["ratio"] == pytest.approx(_dense_ratio(model, batch, lrs, 0.0), rel=1e-8)


def test_an_empty_first_group_gives_no_setting_to_the_threshold():
    """The threshold read the first group's momentum even when it held no parameter: a
    ratio 1.9x too small here, without a warning."""
    model, batch = _regression(3)
    lrs = (0.01, 0.1)
    opt = torch.optim.SGD([{"params": [], "lr": 0.5, "momentum": 0.9},
                           {"params": model[0].parameters(), "lr": lrs[0]},
                           {"params": model[1].parameters(), "lr": lrs[1]}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = _sharpness_row(model, opt, batch)
    assert row["threshold"] == pytest.approx(2 / lrs[0])
    assert row["ratio"] == pytest.approx(_dense_ratio(model, batch, lrs, 0.0), rel=1e-8)


@pytest.mark.parametrize("rates", [(0.01, 0.1), (0.01, 0.01)])
def test_a_trainable_parameter_outside_the_optimizer_is_left_out(rates):
    """The optimizer never moves a parameter it does not hold: D = 0 there. With groups of
    different rates every row failed; with one rate it was the whole Hessian's, silently
    (2.2x too high for a head trained alone on a backbone left requiring grad)."""
    model, batch = _regression(4)
    opt = torch.optim.SGD([{"params": [model[0].weight], "lr": rates[0]},
                           {"params": model[1].parameters(), "lr": rates[1]}])  # 0.bias out
    with pytest.warns(RuntimeWarning, match=r"does not hold 1 .*'0\.bias'"):
        row = _sharpness_row(model, opt, batch)
    lr_of = {"0.weight": rates[0], "0.bias": 0.0, "1.weight": rates[1], "1.bias": rates[1]}
    assert row["ratio"] == pytest.approx(_dense_ratio(model, batch, rates, 0.0, lr_of),
                                         rel=1e-8)


def test_an_adaptive_optimizer_holding_some_parameters_leaves_the_others_out():
    """It failed every row ('parameter ... is not optimised by it')."""
    model, batch = _regression(5)
    opt = torch.optim.Adam(model[1].parameters(), lr=1e-3)  # the head alone
    x, y = batch
    with pytest.warns(RuntimeWarning, match="does not hold 2"), \
            ls.Monitor(model, F.mse_loss, optimizer=opt, probe=batch, alarms=False,
                       metrics=[Sharpness(tol=1e-10, schedule=1, adam_warmup=1)]) as mon:
        for step in range(2):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
            mon.step(step, batch=batch, loss=1.0)
        _, ratios = mon.run().series("sharpness", "ratio")
    head = {n: p for n, p in model.named_parameters() if n.startswith("1.")}
    p_hat = torch.cat([(opt.state[p]["exp_avg_sq"] / (1 - 0.999 ** float(opt.state[p]["step"])))
                       .sqrt().flatten() + 1e-8 for p in head.values()])
    h = _flat_hessian(model, x, y)
    inner = sum(p.numel() for n, p in model.named_parameters() if n.startswith("0."))
    s = p_hat.rsqrt()
    lam = float(torch.linalg.eigvalsh(s[:, None] * h[inner:, inner:] * s[None, :])[-1])
    assert ratios[-1] == pytest.approx(lam / (3.8 / (0.1 * 1e-3)), rel=1e-7)


def test_groups_of_other_momenta_leave_out_what_does_not_move_unscaled():
    """Groups differing in momentum have no common scaled threshold: the Hessian's own
    lambda_max (with a warning). A parameter outside the optimizer switched it to the
    rate-scaled operator (7.7x higher); it only leaves that parameter out."""
    model, batch = _regression(6)
    opt = torch.optim.SGD([{"params": [model[0].weight], "lr": 0.01, "momentum": 0.9},
                           {"params": model[1].parameters(), "lr": 0.1}])  # 0.bias out
    with pytest.warns(RuntimeWarning, match="differ in momentum"):
        row = _sharpness_row(model, opt, batch)
    lr_of = {"0.weight": 1.0, "0.bias": 0.0, "1.weight": 1.0, "1.bias": 1.0}  # D: 1 or 0
    hessian_moving = _dense_ratio(model, batch, (1.0, 1.0), 0.0, lr_of) * 2  # lambda_max
    assert row["lambda_max"] == pytest.approx(hessian_moving, rel=1e-8)
    assert row["threshold"] == pytest.approx(3.8 / 0.01)


def test_an_optimizer_holding_none_of_the_parameters_gives_no_row():
    model, batch = _regression(7)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="holds none of the model's trainable"):
        row = _sharpness_row(model, other, batch)
    assert all(v != v for v in row.values())  # NaN: the metric failed, saying why


def test_an_optimizer_that_maximizes_gives_no_row_and_says_why():
    """``SGD(maximize=True)`` on J takes the steps plain SGD takes on -J: the Hessian of J
    would give -lambda_min of the bounding one (0.10 falling to 0.013 where the run on -J
    read 0.17 and 0.16)."""
    model, batch = _regression(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, maximize=True)
    with pytest.warns(RuntimeWarning, match=r"maximize=True\) climbs the loss"):
        row = _sharpness_row(model, opt, batch)
    assert all(v != v for v in row.values())


def test_the_row_records_the_fraction_of_coordinates_where_eps_dominates():
    """eps_dominated: the share of the moving coordinates with sqrt(v_hat) < eps, where the
    preconditioned sharpness depends on eps (NaN for SGD, which does not precondition)."""
    model, (x, y) = _regression(2)
    x[:, 3] = 0.0  # the weights reading this input get no gradient: v = 0 < eps
    batch = (x, y)
    eps = 1e-3
    opt = torch.optim.Adam(model.parameters(), lr=0.01, eps=eps)
    sgd_model, _ = _regression(2)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.01)
    rows = {}
    for name, net, optimizer in (("adam", model, opt), ("sgd", sgd_model, sgd)):
        with ls.Monitor(net, F.mse_loss, optimizer=optimizer, probe=batch, alarms=False,
                        metrics=[Sharpness(schedule=1, adam_warmup=1)]) as mon:
            full_batch_steps(mon, net, optimizer, x, y, 2, loss_fn=F.mse_loss)
            rows[name] = mon.run().series("sharpness", "eps_dominated")[1]
    small = total = 0
    for p in model.parameters():
        st = opt.state[p]
        root = (st["exp_avg_sq"] / (1 - 0.999 ** float(st["step"]))).sqrt()
        small += int((root < eps).sum())
        total += root.numel()
    assert small >= 4  # the zeroed input's column, at least
    assert float(rows["adam"][-1]) == pytest.approx(small / total, abs=1e-7)
    assert all(v != v for v in rows["sgd"])  # NaN
