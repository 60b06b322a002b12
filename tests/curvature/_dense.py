"""Dense float64 ground truth for the curvature tests (torch.func.hessian / jacrev)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from landscape.isolation import isolated, sdpa_math, stateless_call, stateless_closure
from landscape.params import select_named_parameters


def _split(model: nn.Module, params: Any) -> tuple[list[str], list[torch.Size], torch.Tensor]:
    named = select_named_parameters(model, params)
    names = list(named)
    shapes = [p.shape for p in named.values()]
    flat = torch.cat([p.detach().reshape(-1) for p in named.values()])
    return names, shapes, flat


def _as_dict(flat: torch.Tensor, names: list[str], shapes: list[torch.Size]) -> dict:
    out, i = {}, 0
    for n, s in zip(names, shapes):
        k = int(torch.Size(s).numel())
        out[n] = flat[i : i + k].reshape(s)
        i += k
    return out


def dense_hessian(
    model: nn.Module,
    loss_fn: Callable | None = None,
    batch: Any = None,
    *,
    closure: Callable | None = None,
    params: Any = None,
) -> torch.Tensor:
    """Exact Hessian of the batch loss w.r.t. the selected parameters (eval mode)."""
    named = {n: p.detach() for n, p in select_named_parameters(model, params).items()}
    sizes = {n: p.numel() for n, p in named.items()}

    keys = list(named)

    def f(*tensors: torch.Tensor) -> torch.Tensor:
        p = dict(zip(keys, tensors))
        if closure is not None:
            return stateless_closure(model, closure, p, batch)
        return loss_fn(stateless_call(model, p, batch[0]), batch[1])

    # Reverse-over-reverse, one column at a time (torch.autograd.functional, not torch.func):
    # torch.func.hessian / jacrev(jacrev) give wrong, asymmetric LayerNorm-weight blocks on
    # the tiny transformer in torch 2.13, while double backward matches finite differences.
    with isolated(model), sdpa_math():
        blocks = torch.autograd.functional.hessian(f, tuple(named.values()), vectorize=False)
    rows = [
        torch.cat([blocks[i][j].reshape(sizes[a], sizes[b]) for j, b in enumerate(keys)], dim=1)
        for i, a in enumerate(keys)
    ]
    return torch.cat(rows, dim=0).detach()


def dense_ggn(model: nn.Module, loss_fn: Callable, batch: Any, *, params: Any = None):
    """J^T Lambda J with J = d output / d theta and Lambda = d^2 loss / d output^2."""
    names, shapes, flat = _split(model, params)
    inputs, targets = batch

    def out(x: torch.Tensor) -> torch.Tensor:
        return stateless_call(model, _as_dict(x, names, shapes), inputs)

    with isolated(model):
        z = out(flat).detach()
        jac = torch.func.jacrev(out)(flat).reshape(z.numel(), -1)
        lam = torch.func.hessian(lambda o: loss_fn(o.reshape(z.shape), targets))(z.reshape(-1))
    return jac.T @ lam.reshape(z.numel(), z.numel()) @ jac
