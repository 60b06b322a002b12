"""Random probe vectors of the spectral estimators, drawn from their own generator.

Every stochastic estimator takes an explicit seed and draws on the CPU from a
``torch.Generator`` seeded with it, never from the global RNG (docs/curvature.md,
"Conventions"); probes are Rademacher (+-1) unless stated otherwise.
"""

from __future__ import annotations

import torch

from landscape._checks import seed_value
from landscape.curvature.base import CurvatureOperator
from landscape.params import Vector, unflatten

__all__ = ["generator", "rademacher", "to_vectors"]


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (``ValueError`` for a seed that is no integer)."""
    return torch.Generator().manual_seed(seed_value(seed))


def rademacher(n_rows: int, op: CurvatureOperator, gen: torch.Generator) -> torch.Tensor:
    """``(n_rows, op.dim)`` Rademacher rows in the operator's dtype and device."""
    bits = torch.randint(0, 2, (n_rows, op.dim), generator=gen, dtype=torch.int8)
    return (bits.to(op.dtype) * 2 - 1).to(op.device)


def to_vectors(rows: torch.Tensor, op: CurvatureOperator) -> list[Vector]:
    """The rows of a ``(b, dim)`` tensor as parameter-space vectors (copies)."""
    like = [torch.empty(s, device="meta") for s in op.shapes]
    return [tuple(t.clone() for t in unflatten(r, like)) for r in rows]
