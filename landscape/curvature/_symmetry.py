"""Is an operator's exact product symmetric? A check for second derivatives torch gets wrong.

A Hessian and a GGN are symmetric, so ``<u, A w> = <w, A u>`` for every pair of vectors. An
exact product that differentiates through a backward that is not itself differentiable
(a custom ``torch.autograd.Function`` whose backward is decorated with
``@once_differentiable``, or an operator whose double backward torch computes wrongly, such
as ``torch._weight_norm`` behind ``parametrizations.weight_norm`` in torch 2.13) raises no
error: it drops or garbles the second-order terms of that function, and every curvature
number comes out wrong. The dropped terms couple the parameters before the function with
those after it in one direction only, so the product loses its symmetry, which three products
with fixed random vectors show (docs/curvature.md, "Products torch differentiates wrongly").

A model whose broken function has no parameters after it keeps a symmetric (but still
wrong) product: the check cannot see that case.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import torch

__all__ = ["ASYMMETRY_TOLERANCE", "asymmetry", "rademacher", "remembered"]

ASYMMETRY_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 2e-2,
}
"""Largest :func:`asymmetry` of a product that is symmetric up to rounding, per dtype.

Rounding gave at most 2e-16 (float64), 6e-7 (float32) and 5e-3 (bfloat16) on healthy
models, the broken products above 0.008 to 0.44 (docs/curvature.md, "Products torch
differentiates wrongly")."""

_SEEN: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], float]] = (
    weakref.WeakKeyDictionary()
)
"""Per model, the asymmetry of each (operator kind, parameters, product path) measured."""


def rademacher(shapes: Sequence[torch.Size], dtype: torch.dtype, device: torch.device,
               seed: int) -> tuple[torch.Tensor, ...]:
    """A vector of independent ±1 entries, drawn on the host from ``seed`` (no global RNG)."""
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randint(0, 2, tuple(s), generator=g) * 2 - 1).to(device, dtype)
                 for s in shapes)


def _dot64(u: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> float:
    return float(sum(float(torch.sum(a * b, dtype=torch.float64)) for a, b in zip(u, v)))


def asymmetry(vectors: Sequence[Sequence[torch.Tensor]],
              products: Sequence[Sequence[torch.Tensor]]) -> float:
    """How far from symmetric the operator is: about ``||K||_F / ||A||_F``, ``K = (A - Aᵀ)/2``.

    For independent vectors of ±1 entries, ``<u, A w> - <w, A u> = 2 <u, K w>`` has mean
    square ``4 ||K||_F²`` and ``||A u||²`` has mean ``||A||_F²``: the root mean square of the
    differences over every pair, over twice the root mean square of the products' norms,
    estimates the ratio without the ``sqrt(dim)`` that a Cauchy–Schwarz bound would divide
    it by. Rounding gives about the dtype's epsilon times the computation's depth. Sums in
    float64.

    Args:
        vectors: two or more vectors of independent ±1 entries.
        products: their products, in order.

    Returns:
        The estimate (0 when every product is zero).
    """
    n = len(vectors)
    squares = [(_dot64(vectors[i], products[j]) - _dot64(vectors[j], products[i])) ** 2
               for i in range(n) for j in range(i + 1, n)]
    size = (sum(_dot64(a, a) for a in products) / n) ** 0.5
    if not size > 0:
        return 0.0
    return (sum(squares) / len(squares)) ** 0.5 / (2 * size)


def remembered(model: Any, key: tuple[Any, ...], measure: Callable[[], float | None]
               ) -> float | None:
    """``measure()`` once per model and key (a monitor builds an operator per measurement).

    A measurement that gives no verdict (None) is not remembered.
    """
    seen = _SEEN.setdefault(model, {})
    if key not in seen:
        value = measure()
        if value is None:
            return None
        seen[key] = value
    return seen[key]
