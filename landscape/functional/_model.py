"""Parameter-dictionary helpers for the model-evaluating metrics (taylor.py, sharpness.py).

Isolation itself (RNG forked, modes/``requires_grad``/``.grad`` restored, cloned buffers,
``functional_call``) is :mod:`landscape.isolation`, the one mechanism of the project; this
module only adds what that lacks: detached parameter dictionaries, conversion of a
parameter-space vector given as a sequence or a mapping, and a float64 norm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from landscape.params import ParamSpec, select_named_parameters

ParamDict = dict[str, torch.Tensor]
OutputFn = Callable[[Any], torch.Tensor]


def detached_params(model: nn.Module, spec: ParamSpec = None) -> ParamDict:
    """Trainable parameters selected by ``spec`` (see ``select_named_parameters``), detached.

    These are the primal values a ``torch.func`` transform differentiates; parameters not
    in the dict are used as constants by :func:`landscape.isolation.stateless_call`.
    """
    return {n: p.detach() for n, p in select_named_parameters(model, spec).items()}


def as_param_dict(
    vector: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    like: ParamDict,
    name: str,
) -> ParamDict:
    """A parameter-space vector as a dict keyed like ``like`` (detached, ``like``'s dtype).

    A mapping may name any subset of ``like`` (missing entries are zero); a sequence must
    have one tensor per entry of ``like`` in order (docs/curvature.md, "Conventions").
    """
    if isinstance(vector, torch.Tensor):
        raise ValueError(
            f"{name} must be a sequence of tensors (one per trainable parameter) or a "
            "dict of them, got a single tensor"
        )
    if isinstance(vector, Mapping):
        unknown = [k for k in vector if k not in like]
        if unknown:
            raise ValueError(f"{name} names unknown or frozen parameters: {', '.join(unknown)}")
        items = {k: vector.get(k) for k in like}
    else:
        vector = list(vector)
        if len(vector) != len(like):
            raise ValueError(
                f"{name} has {len(vector)} tensors, expected {len(like)} "
                "(one per trainable parameter)"
            )
        items = dict(zip(like, vector))
    out: ParamDict = {}
    for k, ref in like.items():
        t = items[k]
        if t is None:
            out[k] = torch.zeros_like(ref)
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(ref.shape):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}[{k!r}] must have shape {tuple(ref.shape)}, got {shape}")
        out[k] = t.detach().to(device=ref.device, dtype=ref.dtype)
    return out


def vec_norm(v: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Euclidean norm over all tensors of a parameter dict, float64 (0 for an empty dict)."""
    total = torch.zeros((), dtype=torch.float64)
    for t in v.values():
        total = total + (t.double() ** 2).sum().cpu()
    return torch.sqrt(total)

