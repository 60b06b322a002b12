"""Lanczos products to convergence from a Gaussian start and from a gradient start.

The gradient of a network's loss lies mostly in the top eigenspace of its Hessian
(Gur-Ari, Roberts & Dyer 2018, arXiv:1812.04754), so a start vector along it could reach
lambda_max in fewer products. The gradient start here is the unit gradient plus the unit
Gaussian start (every eigendirection keeps a component, so Lanczos still finds lambda_max
whatever the gradient). For the instability suite's tiny GPT and small CNN (at
initialisation and after 200 steps of their control runs) and the CIFAR-sized CNN of
``bench_monitor``, three seeds each, prints the products ``krylov_eigsh`` needs to reach a
relative residual of ``1e-3`` and ``1e-4`` (``stop="residual"``) from each start; the
gradient costs one more backward pass, not counted. docs/benchmarks.md ("Scale") has the
numbers and GPT-2 small (``bench_scale --sections top1 --start gradient``).

    .venv/bin/python -m tests.benchmarks.bench_start_vector
"""

from __future__ import annotations

import torch

from landscape.curvature import Hessian
from landscape.curvature.lanczos import krylov_eigsh
from landscape.params import flatten


def gradient_start(op: Hessian, gaussian: torch.Tensor) -> torch.Tensor:
    """The unit gradient of ``op``'s loss plus the unit ``gaussian``, in ``op``'s dtype."""
    g = flatten(op.gradient()).to(op.dtype)
    return g / g.norm() + gaussian / gaussian.norm()


def products_to(op: Hessian, start: torch.Tensor, tol: float) -> int:
    """Products ``krylov_eigsh`` spends until lambda_max's relative residual is ``tol``."""
    res = krylov_eigsh(op.flat_matvec, start, k=1, tol=tol, max_matvec=100, stop="residual")
    return res.n_matvec


def _trained(trial, steps: int):
    model, opt = trial.model, trial.optimizer
    for step in range(steps):
        x, y = trial.batch(step)
        for group in opt.param_groups:
            group["lr"] = trial.lr(step)
        loss = trial.loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def main() -> None:
    from tests.benchmarks.bench_monitor import SUITE, cifar_cnn_trial
    from tests.benchmarks.instability.scenarios import scenarios

    torch.set_num_threads(2)
    cases = {}
    for arch in ("gpt", "cnn"):
        for steps in (0, 200):
            trial = scenarios()[SUITE[arch]].build(1, False)
            model = _trained(trial, steps)
            batch = trial.probe if trial.probe is not None else trial.batch(999)
            cases[f"{arch} after {steps} steps"] = Hessian(model, trial.loss_fn, data=batch)
    cifar = cifar_cnn_trial()
    cases["cnn32 at init"] = Hessian(cifar.model, cifar.loss_fn, data=cifar.batch(0))
    for name, op in cases.items():
        for tol in (1e-3, 1e-4):
            pairs = []
            for seed in range(3):
                gen = torch.Generator().manual_seed(seed)
                gaussian = torch.randn(op.dim, generator=gen, dtype=torch.float64).to(op.dtype)
                pairs.append((products_to(op, gaussian, tol),
                              products_to(op, gradient_start(op, gaussian), tol)))
            print(f"{name:22s} tol {tol:.0e}  (Gaussian, gradient) products per seed: {pairs}",
                  flush=True)


if __name__ == "__main__":
    main()
