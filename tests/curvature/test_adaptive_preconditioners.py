"""Every adaptive optimizer's preconditioned sharpness against a dense float64 ground truth.

For each optimizer that ``stability_threshold`` bounds on the preconditioned sharpness
(Cohen et al. 2022, arXiv:2207.14484), ``P`` is written out here by hand from torch 2.13's
update rules and the optimizer's state, independently of ``landscape.curvature.precondition``:
``lambda_max(P^-1/2 H P^-1/2)`` by ``eigvalsh`` of the dense Hessian must equal the
library's preconditioned top eigenvalue and the ``Sharpness`` metric's ``lambda_max``, and
the metric's ratio must be that value over the hand-written threshold.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from landscape._errors import MissingInput, PartialRow
from landscape.curvature import Hessian, preconditioned, stability_threshold, top_eigenvalues
from landscape.metrics import Sharpness, StepContext
from tests import models
from tests.curvature._dense import dense_hessian

LR = 1e-2


def _nadam_mu(b1, decay, t):
    return b1 * (1 - 0.5 * 0.96 ** (t * decay))


def _radam_rho_rect(b2, t):
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
    if rho <= 5:
        return rho, None
    return rho, math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))


def _hand_p(opt, p):
    """The diagonal the optimizer divided its latest step by, from torch 2.13's rules."""
    g, s = opt.param_groups[0], opt.state[p]
    t, eps = float(s["step"]), g["eps"]
    if isinstance(opt, torch.optim.RMSprop):  # sqrt(E g^2 [- (E g)^2]) + eps
        v = s["square_avg"] - (s["grad_avg"] ** 2 if g["centered"] else 0)
        return v.sqrt() + eps
    if isinstance(opt, torch.optim.Adamax):  # lr / (1 - b1^t) * m / exp_inf
        return s["exp_inf"]
    b2 = g["betas"][1]
    if isinstance(opt, torch.optim.RAdam):  # lr * m_hat * r_t sqrt(1 - b2^t) / (sqrt(v) + eps)
        _, rect = _radam_rho_rect(b2, t)
        if rect is None:  # SGD with momentum: lr * m_hat
            return torch.ones_like(s["exp_avg_sq"])
        return (s["exp_avg_sq"].sqrt() + eps) / (rect * math.sqrt(1 - b2**t))
    return (s["exp_avg_sq"] / (1 - b2**t)).sqrt() + eps  # Adam, AdamW, NAdam


def _hand_threshold(opt):
    g = opt.param_groups[0]
    if isinstance(opt, torch.optim.RMSprop):  # heavy ball on P^-1 H
        return (2 + 2 * g["momentum"]) / LR
    b1 = g["betas"][0]
    if isinstance(opt, torch.optim.NAdam):  # lr P^-1 ((1 - mu_t) g + mu_{t+1} m)
        t = float(next(iter(opt.state.values()))["step"])
        mu, mu_next = (_nadam_mu(b1, g["momentum_decay"], t + k) for k in (0, 1))
        return (2 + 2 * b1) / (((1 - mu) * (1 + b1) + mu_next * (1 - b1)) * LR)
    return (2 + 2 * b1) / ((1 - b1) * LR)  # EMA momentum on P^-1 H (Adam, RAdam, Adamax)


CASES = {
    "adam": (lambda ps: torch.optim.Adam(ps, lr=LR, betas=(0.9, 0.99), eps=1e-3), 4),
    "nadam": (lambda ps: torch.optim.NAdam(ps, lr=LR, betas=(0.9, 0.99), eps=1e-3), 4),
    "radam_rectified": (lambda ps: torch.optim.RAdam(ps, lr=LR, eps=1e-3), 9),
    "radam_sgd": (lambda ps: torch.optim.RAdam(ps, lr=LR, eps=1e-3), 3),
    "adamax": (lambda ps: torch.optim.Adamax(ps, lr=LR, eps=1e-3), 4),
    "rmsprop": (lambda ps: torch.optim.RMSprop(ps, lr=LR, eps=1e-3), 4),
    "rmsprop_centered_momentum": (
        lambda ps: torch.optim.RMSprop(ps, lr=LR, eps=1e-3, centered=True, momentum=0.5), 4),
}


def _trained(make, steps):
    model = models.mlp(d_in=4, hidden=5, d_out=3, seed=3).double()
    x, y = models.classification_data(n=12, d_in=4, seed=4)
    batch = (x.double(), y)
    opt = make(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(batch[0]), y).backward()
        opt.step()
    return model, batch, opt


def _context(model, batch, opt):
    return StepContext.for_model(model, step=1, loss_fn=F.cross_entropy, optimizer=opt,
                                 probe=batch)


@pytest.mark.parametrize("case", list(CASES))
def test_preconditioned_sharpness_and_ratio_equal_the_dense_truth(case):
    make, steps = CASES[case]
    model, batch, opt = _trained(make, steps)
    if case.startswith("radam"):  # the case is in the regime it is named after
        assert (_radam_rho_rect(0.999, steps)[1] is None) == (case == "radam_sgd")
    d = torch.cat([_hand_p(opt, p).reshape(-1) for p in model.parameters()]).rsqrt()
    want = float(torch.linalg.eigvalsh(
        d[:, None] * dense_hessian(model, F.cross_entropy, batch) * d[None, :])[-1])

    op = preconditioned(Hessian(model, F.cross_entropy, batch), opt)
    assert float(top_eigenvalues(op, k=1, tol=1e-10).values[0]) == pytest.approx(want, rel=1e-7)

    row = Sharpness(tol=1e-10, adam_warmup=0, memory_budget=None).compute(
        _context(model, batch, opt))
    threshold = _hand_threshold(opt)
    assert row["lambda_max"] == pytest.approx(want, rel=1e-7)
    assert row["threshold"] == pytest.approx(threshold, rel=1e-12)
    assert stability_threshold(opt) == pytest.approx(threshold, rel=1e-12)
    assert row["ratio"] == pytest.approx(want / threshold, rel=1e-7)


def test_no_preconditioner_no_ratio_and_an_unknown_threshold_keeps_lambda_only():
    model, batch, _ = _trained(lambda ps: torch.optim.SGD(ps, lr=LR), 1)
    fresh = torch.optim.RMSprop(model.parameters(), lr=LR)  # no state: P cannot be read
    with pytest.raises(MissingInput, match="no preconditioned sharpness for RMSprop"):
        Sharpness(adam_warmup=0, memory_budget=None).compute(_context(model, batch, fresh))
    adagrad = torch.optim.Adagrad(model.parameters(), lr=LR)
    with pytest.raises(PartialRow) as caught:
        Sharpness(tol=1e-10, memory_budget=None).compute(_context(model, batch, adagrad))
    row = caught.value.row
    raw = float(torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, batch))[-1])
    assert row["lambda_max"] == pytest.approx(raw, rel=1e-7)
    assert math.isnan(row["threshold"]) and math.isnan(row["ratio"])
    assert "no stability threshold known for Adagrad" in str(caught.value.error)


@pytest.mark.parametrize("decay", [0.0, 1e3])  # mu_t = b1 / 2 throughout; mu_t = b1 at once
def test_nadam_threshold_matches_simulated_divergence(decay):
    """Real NAdam steps on ``f = lam theta^2 / 2``, where ``P = sqrt(v_hat) + eps = 1``.

    ``theta`` starts at 1e-100, so ``sqrt(v_hat)`` stays negligible beside ``eps = 1``
    through the bias corrections' transient; the envelope then decays below the threshold
    and grows above it.
    """
    lr = 0.1
    for margin, stable in ((0.97, True), (1.03, False)):
        theta = torch.nn.Parameter(torch.full((1,), 1e-100, dtype=torch.float64))
        opt = torch.optim.NAdam([theta], lr=lr, eps=1.0, momentum_decay=decay)
        (0.5 * theta**2).sum().backward()
        opt.step()  # one step to read the schedule at
        lam = margin * stability_threshold(opt)
        seen = []
        for _ in range(400):
            opt.zero_grad()
            (0.5 * lam * theta**2).sum().backward()
            opt.step()
            seen.append(abs(float(theta.detach())))
        assert (max(seen[350:]) < max(seen[150:200])) == stable, margin


def test_rmsprop_rows_wait_for_its_squared_gradient_average_by_default():
    """RMSprop corrects no bias: by default its rows start after 1 / (1 - alpha) steps
    (its first steps are up to ~3x larger); Adam's after 10; an explicit count is kept."""
    for alpha, wait in ((0.99, 100), (0.9, 10)):
        model, batch, opt = _trained(
            lambda ps, a=alpha: torch.optim.RMSprop(ps, lr=LR, alpha=a, eps=1e-3), 12)
        row = Sharpness(tol=1e-8, memory_budget=None).compute(_context(model, batch, opt))
        assert math.isnan(row["lambda_max"]) == (wait > 12), alpha
        assert Sharpness(adam_warmup=5, tol=1e-8, memory_budget=None).compute(
            _context(model, batch, opt))["lambda_max"] > 0
    model, batch, opt = _trained(CASES["adam"][0], 12)
    assert Sharpness(tol=1e-8, memory_budget=None).compute(
        _context(model, batch, opt))["lambda_max"] > 0


def test_an_overflowed_second_moment_or_an_infinite_entry_is_refused():
    """An inf second moment (fp16 training past |g| > 256) read as P = inf would drop the
    coordinates that blew up from the operator: a finite, too small sharpness."""
    model, batch, opt = _trained(lambda p: torch.optim.Adam(p, lr=1e-3), 3)
    op = Hessian(model, F.cross_entropy, batch)
    preconditioned(op, opt)  # finite: read
    first = next(iter(model.parameters()))
    opt.state[first]["exp_avg_sq"].fill_(math.inf)
    with pytest.raises(ValueError, match=r"second moment of .* is not finite"):
        preconditioned(op, opt)
    vector = [torch.ones_like(p) for p in model.parameters()]
    vector[0][0] = math.inf
    with pytest.raises(ValueError, match="finite and > 0"):
        preconditioned(op, vector)


def test_a_parameter_that_never_had_a_gradient_is_one_adam_never_moved():
    """torch's Adam makes no state for a parameter without ``.grad`` (an unused head): it
    is left out as a parameter the optimizer does not move, ``P = inf``."""
    torch.manual_seed(0)
    body = models.mlp(d_in=4, hidden=5, d_out=3, seed=3).double()
    model = torch.nn.ModuleDict({"body": body, "aux": torch.nn.Linear(5, 2).double()})
    x, y = models.classification_data(n=12, d_in=4, seed=4)
    batch = (x.double(), y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(body(batch[0]), y).backward()
        opt.step()
    assert not opt.state.get(model["aux"].weight)

    def loss_fn(model, batch):
        return F.cross_entropy(model["body"](batch[0]), batch[1])

    d = torch.cat([_hand_p(opt, p).reshape(-1) for p in body.parameters()]).rsqrt()
    want = float(torch.linalg.eigvalsh(
        d[:, None] * dense_hessian(body, F.cross_entropy, batch) * d[None, :])[-1])
    op = preconditioned(Hessian(model, closure=loss_fn, data=batch), opt)
    assert float(top_eigenvalues(op, k=1, tol=1e-10).values[0]) == pytest.approx(want, rel=1e-7)
    only_aux = Hessian(model, closure=loss_fn, data=batch, params="aux.*")
    with pytest.raises(ValueError, match="moves none"):
        preconditioned(only_aux, opt)
