"""Shared helpers of the alarm tests: the metric naming contract, runs built from series,
synthetic series (smooth losses, sharpening, sign diversity) and a real full-batch GD run."""

from __future__ import annotations

import numpy as np
import pytest

from landscape._names import RENAMED_METRICS
from landscape.alarms import check, default_rules
from landscape.metrics import create
from landscape.store import RunWriter

NAN = float("nan")
INF = float("inf")

LAYERS = ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "head"]


def _contract() -> dict[str, dict[str, tuple[int, ...]]]:
    """metric name -> {field: row shape} for every metric a default rule reads.

    Taken from the metric classes' ``FIELDS`` (so that a field added to a metric reaches the
    online-equals-offline property test without anyone editing a list); spectral alignment's
    fields are per-layer vectors (one value per name in :data:`LAYERS`). ``taylor``, the old
    name of ``taylor_radius``, is still read by the rules.
    """
    contract = {}
    for name in sorted({m for rule in default_rules() for m in rule.metrics}):
        cls = type(create(RENAMED_METRICS.get(name, name)))
        shape = (len(LAYERS),) if name == "spectral_alignment" else ()
        fields = cls.FIELDS or tuple(cls().fields())
        contract[name] = dict.fromkeys(fields, shape)
    return contract


CONTRACT = _contract()


def make_writer(series, path=None):
    """A run with ``series = {metric: (steps, {field: values})}``; other fields are NaN."""
    w = RunWriter.memory() if path is None else RunWriter(path, mode="w")
    for name, (steps, cols) in series.items():
        fields = CONTRACT.get(name) or {k: np.shape(v[0]) for k, v in cols.items()}
        params = {"layers": LAYERS} if name == "spectral_alignment" else None
        w.declare(name, fields, params=params)
        for i, step in enumerate(steps):
            row = {f: np.full(shape, NAN) for f, shape in fields.items()}
            row.update({f: v[i] for f, v in cols.items()})
            w.append(name, int(step), row)
    return w


def findings_of(series, rules=None, path=None):
    return check(make_writer(series, path=path), rules)


def one(rule_name, findings):
    return [f for f in findings if f.rule == rule_name]


def smooth_loss(n, seed, noise=0.02):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 0.3 + 2.0 * np.exp(-t / 150) + noise * rng.standard_normal(n)



def sharpening(n_rise=150, n_hover=150, seed=0):
    """Ratio rising slowly from 0.5 past 1, then hovering around 1 (edge of stability)."""
    rng = np.random.default_rng(seed)
    rise = np.linspace(0.5, 1.08, n_rise)
    hover = 1.0 + 0.04 * np.sin(np.arange(n_hover) / 3)
    ratio = np.concatenate([rise, hover]) + 0.005 * rng.standard_normal(n_rise + n_hover)
    lr = 0.05
    lam = ratio * (2 / lr)
    return ratio, {"lambda_max": lam, "threshold": np.full_like(lam, 2 / lr), "ratio": ratio}



def minority_series(n=100, seed=3):
    rng = np.random.default_rng(seed)
    return 0.35 + 0.1 * rng.random((n, 3))



def full_batch_gd(lr_at, n_steps, every):
    """Full-batch GD on a small tanh MLP fitting random labels (float64).

    Returns the loss at every step and, every ``every`` steps, the exact top Hessian
    eigenvalue (dense autograd Hessian + ``eigvalsh``) with the GD threshold 2/lr.
    """
    torch = pytest.importorskip("torch")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        x = torch.randn(24, 3, dtype=torch.float64)
        y = torch.randn(24, 1, dtype=torch.float64)
        net = torch.nn.Sequential(torch.nn.Linear(3, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))
    theta = torch.cat([p.detach().double().flatten() for p in net.parameters()])

    def loss_of(t):
        w1, b1 = t[:36].view(12, 3), t[36:48]
        w2, b2 = t[48:60].view(1, 12), t[60:]
        return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean() / 2

    losses, sharp = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 61-parameter model: threads only add contention
    try:
        _gd_loop(torch, loss_of, theta, lr_at, n_steps, every, losses, sharp)
    finally:
        torch.set_num_threads(threads)
    return losses, sharp


def _gd_loop(torch, loss_of, theta, lr_at, n_steps, every, losses, sharp):
    for step in range(n_steps):
        lr = lr_at(step)
        loss = loss_of(theta)
        losses.append(loss.item())
        if step % every == 0:
            hess = torch.autograd.functional.hessian(loss_of, theta, vectorize=True)
            lam = torch.linalg.eigvalsh(hess)[-1].item()
            sharp.append((step, {"lambda_max": lam, "threshold": 2 / lr, "ratio": lam * lr / 2}))
        t = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of(t), t)
        theta = theta - lr * g

