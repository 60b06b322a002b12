"""Shared checks for the functional tests: a model's observable state before/after a call."""

from __future__ import annotations

import torch
from torch import nn


def snapshot(model: nn.Module) -> dict:
    """Everything a diagnostic must leave untouched.

    docs/conventions.md, "Never perturb training".
    """
    params = list(model.parameters())
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "param_ids": [id(p) for p in params],
        "data_ptrs": [p.data_ptr() for p in params],
        "modes": [m.training for m in model.modules()],
        "flags": [p.requires_grad for p in params],
        "grad_ids": [None if p.grad is None else id(p.grad) for p in params],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
        "rng": torch.get_rng_state(),
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    }


def assert_untouched(model: nn.Module, snap: dict) -> None:
    now = snapshot(model)
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), f"{k} changed"
    for key in ("param_ids", "data_ptrs", "modes", "flags", "grad_ids", "hooks"):
        assert now[key] == snap[key], f"{key} changed"
    for a, b in zip(now["grads"], snap["grads"]):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b), "a .grad value changed"
    assert torch.equal(now["rng"], snap["rng"]), "global RNG state changed"


def prepare_dirty_model(model: nn.Module, seed: int = 0, freeze: str | None = None) -> nn.Module:
    """Train mode, existing .grad tensors on some parameters, a seeded global RNG and
    optionally one frozen parameter (``freeze`` names it)."""
    model.train()
    if freeze is not None:
        dict(model.named_parameters())[freeze].requires_grad_(False)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        if i % 2 == 0:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    torch.manual_seed(seed + 123)
    return model
