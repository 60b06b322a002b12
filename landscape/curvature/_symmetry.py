"""Is an operator's exact product symmetric? A check for second derivatives torch gets wrong.

A Hessian and a GGN are symmetric, so ``<u, A w> = <w, A u>`` for every pair of vectors. An
exact product that differentiates through a backward that is not itself differentiable
(a custom ``torch.autograd.Function`` whose backward is decorated with
``@once_differentiable``, or an operator whose double backward torch computes wrongly, such
as ``torch._weight_norm`` behind ``parametrizations.weight_norm`` in torch 2.13) raises no
error: it drops or garbles the second-order terms of that function, and every curvature
number comes out wrong. The dropped terms couple the parameters before the function with
those after it in one direction only, so the product loses its symmetry, which three products
with fixed random vectors show. Rounding can be as asymmetric (float32 near zero loss), so
an asymmetry counts only beside the products' rounding, which a fourth product, along the
sum of two of the vectors, measures (:func:`nonlinearity`; docs/curvature.md, "Products
torch differentiates wrongly").

A model whose broken function has no parameters after it keeps a symmetric (but still
wrong) product: the check cannot see that case.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "ASYMMETRY_TOLERANCE", "ROUNDING_MULTIPLE", "asymmetry", "nonlinearity", "rademacher",
    "remembered",
]

ASYMMETRY_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 2e-2,
}
"""Largest :func:`asymmetry` of a product that is symmetric up to rounding, per dtype.

Rounding gave at most 2e-16 (float64), 6e-7 (float32) and 5e-3 (bfloat16) on healthy
models away from zero loss, the broken products 0.008 to 0.44 (docs/curvature.md, "Products
torch differentiates wrongly"). Near zero loss float32 cancellation gives a correct product
0.019: an asymmetry above the tolerance counts only beside :data:`ROUNDING_MULTIPLE`."""

ROUNDING_MULTIPLE = 3.0
"""An :func:`asymmetry` above the tolerance is a wrong derivative only when it is also more
than this many times the product's :func:`nonlinearity` (its rounding). Correct products
gave 0.4 to 0.7 times it (float32 and bfloat16, at a loss of 1.4 and near zero), the
broken products above 20 times it (docs/curvature.md, "Products torch differentiates
wrongly")."""

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


def nonlinearity(product_u: Sequence[torch.Tensor], product_w: Sequence[torch.Tensor],
                 product_sum: Sequence[torch.Tensor]) -> float:
    """How far a product is from linear: the rounding level to hold :func:`asymmetry` against.

    ``||A(u + w) − Au − Aw||`` over ``sqrt(||Au||² + ||Aw||² + ||A(u + w)||²)``, sums in
    float64. Exact arithmetic gives 0 for any linear operator, a wrongly differentiated
    one included, so what it measures is rounding: about the relative rounding error of
    one product. Random rounding errors of that size give an :func:`asymmetry` of about
    0.7 times it (``<u, e>`` of a ±1 vector ``u`` and an error ``e`` has the size of
    ``||e||``), while a wrong derivative's asymmetry does not shrink with it: near zero
    loss, where the float32 products of a correct Hessian lose most of their digits to
    cancellation, both read about 1e-2 to 1e-1 (docs/curvature.md, "Products torch
    differentiates wrongly").

    Returns:
        The ratio (0 when every product is zero).
    """
    defect = [c.double() - a.double() - b.double()  # no rounding of its own (bfloat16)
              for a, b, c in zip(product_u, product_w, product_sum)]
    size = sum(_dot64(p, p) for p in (product_u, product_w, product_sum)) ** 0.5
    if not size > 0:
        return 0.0
    return _dot64(defect, defect) ** 0.5 / size


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
