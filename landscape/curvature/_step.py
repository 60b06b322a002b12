r"""The central-difference step of first-order curvature products, and its refinement.

**The step.** :func:`step_size` gives ``ε₀ = u^{1/3} (1 + ‖θ‖) / (8 ‖v‖)``, which balances
the truncation and the rounding of ``(g(θ + εv) − g(θ − εv)) / 2ε`` on the scale of the
parameters (docs/curvature.md, "First-order products"; Nocedal & Wright, *Numerical
Optimization*, 2nd ed., §8.1).

**Its refinement along one direction.** The truncation error is set by the loss's fourth
derivative along ``v``, which the parameters' scale does not see: along the sharpest
directions, the ones Lanczos converges to, it can be far larger. On a 9M-parameter GPT-2
at random initialisation the product along the top Hessian eigenvector was 55 % off at
``ε₀`` (its error falling as ``ε²``: 8e-2 at ``0.3 ε₀``, 1e-2 at ``0.1 ε₀``, 1.4e-4 at
``0.01 ε₀``), while along a random direction it was 1.5e-4, rounding-bound (growing as
``1/ε`` below ``ε₀``). No single step suits both, so the step is checked per product,
with what the product computes anyway plus the loss at ``θ`` (one forward, kept while
the parameters do not change). By Taylor's theorem, with ``L_±`` the losses at
``θ ± εv``, ``g_±`` their gradients and ``P = (g_+ − g_−) / 2ε`` the product,

.. math::

    S = \frac{L_+ - 2 L(θ) + L_-}{ε^2} = v^T H v + \frac{ε^2}{12} ∇^4 L[v, v, v, v]
        + O(ε^4), \qquad
    Q = v^T P = v^T H v + \frac{ε^2}{6} ∇^4 L[v, v, v, v] + O(ε^4),

so ``Q − S`` is a twelfth of ``ε² ∇⁴L[v⁴]`` and the product's error along ``v`` is
``2 (Q − S)``. The truncation estimate ``t`` (:func:`truncation`) is that relative to
``|Q|``, not to ``‖P‖ ‖v‖``: when ``v`` holds a fraction ``α`` of a sharp direction
that dominates the product, the error vector is ``∝ α³`` and the product ``∝ α``, so
the relative error is ``∝ α²``, which ``2 (Q − S) / Q`` (``∝ α⁴ / α²``) follows and
``2 (Q − S) / ‖P‖`` (``∝ α⁴ / α``) would underestimate by ``α``. It counts only beyond
the rounding of ``S`` (the losses' relative rounding ``u`` amplified by ``1/ε²``). The
displacement's own rounding, ``r = ‖fl(θ + εv) − θ − εv‖ / ‖εv‖`` (the perturbed
parameters are stored in their dtype), is computed exactly (:func:`displacement_error`).
When ``t`` is large the step shrinks by ``sqrt(r / t)`` (:func:`refined_ratio`), to where
the truncation estimate is down to ``r``, and the product is computed once more (two
more gradients); never below ``ε₀ / 100``.

Why ``sqrt(r / t)`` and not the step minimising ``t (ε/ε₀)² + r ε₀/ε``: ``r`` is the
error of the *input*, and the product's rounding error is ``H e / ε`` for the
displacement error ``e``, a quasi-random vector that ``H`` scales like any other, far
less than the sharp ``v`` it is compared with. On the GPT-2 above, along the top
eigenvector, ``t = 0.77`` and ``r = 5.3e-5``: the minimiser of the model (``0.032 ε₀``)
left an error of 1.0e-3, ``sqrt(r / t)`` (clamped to ``0.01 ε₀``) 1.4e-4.

**One step per operator.** Lanczos needs one linear operator. Refining the step of each
product on its own (``ε₀`` for random-like vectors, less for sharp ones) made the
products of different vectors inconsistent, and on that GPT-2 Lanczos then settled on
λ₂ = 66.73 and never found λ₁ = 68.04 in 70 products; with one step for all products
(``0.01 ε₀``) it converged to 68.038 in 37 products, like the exact product (68.040,
37). So the refined step is *learned*: once a product refines it, every later product at
the same parameters uses it (and may refine it further); a product along a random-like
direction then carries more rounding (1.4e-2 relative at ``0.01 ε₀`` on that model,
unbiased, against 1.5e-4 at ``ε₀``), which Lanczos and the quadratures average, while
the truncation it removes is a systematic bias.

**The GGN's step.** A GGN product differentiates the model outputs once, ``J v``, and
takes it from four outputs, at ``θ ± εv`` and ``θ ± εv/2``: the two central differences
``D(ε)`` and ``D(ε/2)`` carry the truncations ``ε² ∇³f[v, v, v] / 6`` and a quarter of
it, so Richardson's combination ``R = (4 D(ε/2) − D(ε)) / 3`` cancels it, and
``(4/3) (D(ε) − D(ε/2))`` *is* the truncation of ``D(ε)``. Along ``v``, in the product's
own metric, ``t = (4/3) |Rᵀ Λ (D(ε) − D(ε/2))| / |Rᵀ Λ R|`` (``Rᵀ Λ R = vᵀ G v``; relative
to it for the reason given above for ``Q``). What Richardson leaves is of order ``t²``:
against the central difference's own error ``e`` along the top GGN eigenvector (a steep
cosine; GPT-2 of 1M and 9M parameters, ``e`` = 0.019-0.34 at ``ε₀``), ``R``'s error was
0.1-0.6 ``e²``. The
step therefore shrinks until ``t`` is down to ``sqrt(r)`` (:func:`ggn_ratio`), where
``R``'s error is down to about ``r``; it is learned for the operator as above. No loss at
``θ`` is needed, and the refined product checks itself: a real truncation falls as
``ρ²``, rounding posing as one grows as ``1/ρ`` (:func:`ggn_genuine`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from landscape._sums import CHUNK

__all__ = [
    "GENUINE", "LOSS_NOISE", "MIN_RATIO", "REFINE_BELOW", "displacement_error", "genuine",
    "ggn_genuine", "ggn_negligible", "ggn_ratio", "refined_ratio", "step_size", "truncation",
]

LOSS_NOISE = 8.0
"""Multiple of ``u (|L_+| + 2|L(θ)| + |L_-|) / ε²`` taken as the rounding of ``S``.

Measured on a 1M-parameter GPT-2 (float32, steps from ``ε₀`` down to ``ε₀/100``), where
the truncation part of ``S`` is known from the exact product: the rest, its rounding, was
0.6-0.8 of that unit. 8 leaves a margin of ten; at 64 the 3 % truncation of that model's
top direction went unseen."""

REFINE_BELOW = 0.5
"""A product is computed again only when the best step is below this fraction of ``ε₀``."""

MIN_RATIO = 0.01
"""The smallest refined step, as a fraction of ``ε₀`` (of one refinement and of all)."""


def step_size(theta_norm: float, v_norm: float, dtype: torch.dtype) -> float:
    """The central-difference step ``u^{1/3} (1 + ‖θ‖) / (8 ‖v‖)`` (module docstring).

    Args:
        theta_norm: ``‖θ‖`` of the operator's parameters.
        v_norm: ``‖v‖``, positive.
        dtype: the parameters' floating dtype (its unit roundoff ``u``).

    Returns:
        ``ε``, a positive float.
    """
    u = torch.finfo(dtype).eps / 2.0  # unit roundoff
    return u ** (1.0 / 3.0) / 8.0 * (1.0 + theta_norm) / v_norm


def truncation(
    q: float, second: float, loss_sum: float, loss0: float, eps: float, dtype: torch.dtype,
) -> float:
    """The relative truncation error of a central-difference product along ``v``.

    Args:
        q: ``vᵀ P`` (``P`` the product).
        second: ``(L_+ − 2 L(θ) + L_-) / ε²``.
        loss_sum: ``L_+ + L_-`` (for the rounding of ``second``).
        loss0: ``L(θ)``.
        eps: the step.
        dtype: the dtype the losses are computed in.

    Returns:
        ``2 |q − second| / |q|``, or 0 when ``|q − second|`` is within the rounding of
        ``second`` or a value is not finite (module docstring).
    """
    u = torch.finfo(dtype).eps / 2.0
    noise = LOSS_NOISE * u * (abs(loss_sum) + 2.0 * abs(loss0)) / eps**2
    gap = abs(q - second)
    if not (math.isfinite(gap) and math.isfinite(noise) and q != 0.0 and gap > noise):
        return 0.0
    return 2.0 * gap / abs(q)


def refined_ratio(trunc: float, rounding: float) -> float | None:
    """The factor ``sqrt(rounding / trunc)`` to shrink the step by, or None to keep it.

    Args:
        trunc: the relative truncation error at the current step (:func:`truncation`).
        rounding: the relative rounding of the displacement there (:func:`displacement_error`).

    Returns:
        ``sqrt(rounding / trunc)``, at least :data:`MIN_RATIO`, when it is below
        :data:`REFINE_BELOW`; None otherwise (module docstring).
    """
    if not trunc > 0 or not math.isfinite(rounding):
        return None
    ratio = max(math.sqrt(max(rounding, 0.0) / trunc), MIN_RATIO)
    return ratio if ratio < REFINE_BELOW else None


def ggn_ratio(trunc: float, rounding: float) -> float | None:
    """The factor to shrink the GGN's step by, ``sqrt(sqrt(rounding) / trunc)``, or None.

    Args:
        trunc: ``t``, the relative truncation of ``D(ε)`` along ``v`` (module docstring,
            "The GGN's step"); NaN or 0 when unknown.
        rounding: the relative rounding of the displacement (:func:`displacement_error`).

    Returns:
        ``sqrt(sqrt(rounding) / trunc)``, at least :data:`MIN_RATIO`, when it is below
        :data:`REFINE_BELOW`; None otherwise.
    """
    if not math.isfinite(trunc) or not math.isfinite(rounding):
        return None
    return refined_ratio(trunc, math.sqrt(max(rounding, 0.0)))


def ggn_negligible(trunc: float, dtype: torch.dtype) -> bool:
    """Whether the GGN's truncation ``t`` is too small for a refinement to matter.

    What Richardson's combination leaves is below ``t²`` (module docstring, "The GGN's
    step"), so for ``t <= 4 sqrt(u)`` it is below ``16 u``, about the rounding of the
    outputs themselves: the rounding of the displacement need not be measured (a pass
    over the parameters). NaN (outputs that did not move) is negligible too.

    Args:
        trunc: ``t`` at the current step.
        dtype: the parameters' dtype (its unit roundoff ``u``).

    Returns:
        True when ``t <= 4 sqrt(u)`` or ``t`` is NaN.
    """
    u = torch.finfo(dtype).eps / 2.0
    return not trunc > 4.0 * math.sqrt(u)


def ggn_genuine(trunc: float, refined: float) -> bool:
    """Whether a refinement of the GGN's step removed a real truncation.

    A truncation falls as ``ρ²`` (at most a quarter: :data:`REFINE_BELOW`), rounding that
    posed as one grows as ``1 / ρ``, so the refined ``t`` must at least halve.

    Args:
        trunc: ``t`` at the first step.
        refined: ``t`` at the refined step (NaN: the outputs did not move there).

    Returns:
        True when both are finite and ``refined <= trunc / 2``.
    """
    return math.isfinite(trunc) and math.isfinite(refined) and refined <= trunc / 2.0


GENUINE = 8.0
"""How far above the losses' measured rounding the gap must have stood (:func:`genuine`)."""


def genuine(gap: float, residual: float, q1: float) -> bool:
    """Whether the truncation a refinement removed was real, not the losses' rounding.

    At the refined step ``ε₁`` the curvature term of ``L_+ + L_- − 2 L(θ)`` is
    ``ε₁² Q₁`` up to a truncation ``ρ⁴`` times the first one's, so what is left,
    ``residual = L_+ + L_- − 2 L(θ) − ε₁² Q₁``, is the losses' rounding, measured. The
    gap at the first step, in the same units (``ε₀² (Q₀ − S₀)``, ``gap``), must stand
    :data:`GENUINE` times above it. Under bf16 autocast or TF32 the losses carry far more
    rounding than the parameters' ``u`` says, and the check saw that; the refinement is
    then not kept (docs/curvature.md, "The step along sharp directions"). Nor when the
    refined step moved nothing: a zero ``Q₁`` or an exactly zero residual means the losses
    and gradients at ``θ ± ε₁ v`` were those at ``θ`` (a perturbation below the compute
    precision, as under bf16 autocast), not that the truncation went away.

    Args:
        gap: ``ε₀² (Q₀ − S₀)`` at the first step.
        residual: ``L_+ + L_- − 2 L(θ) − ε₁² Q₁`` at the refined step.
        q1: ``Q₁``, the refined product along ``v``.

    Returns:
        True when ``|gap| > GENUINE |residual|`` and neither ``Q₁`` nor the residual is 0.
    """
    if not (math.isfinite(gap) and math.isfinite(residual)) or q1 == 0.0 or residual == 0.0:
        return False
    return abs(gap) > GENUINE * abs(residual)


def displacement_error(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    move: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[float, float]:
    """Squared norms of ``fl(θ + s) − θ − s`` and of ``s`` over ``(θ, s)`` pairs, in float64.

    Summed in chunks of :data:`~landscape._sums.CHUNK` entries, so at most one chunk is
    held in float64 at a time.

    Args:
        pairs: ``(θ, s)`` per tensor (this rank's shards for a sharded model).
        move: ``move(θ, s)`` is ``fl(θ + s)`` as the product forms it.

    Returns:
        ``(Σ ‖fl(θ + s) − θ − s‖², Σ ‖s‖²)``.
    """
    err = torch.zeros((), dtype=torch.float64)
    size = torch.zeros((), dtype=torch.float64)
    for theta, shift in pairs:
        flat_t, flat_s = theta.detach().reshape(-1), shift.reshape(-1)
        for lo in range(0, flat_t.numel(), CHUNK):
            t, s = flat_t[lo : lo + CHUNK], flat_s[lo : lo + CHUNK]
            wide = s.double()
            moved = move(t, s).double()
            err += (moved - t.double() - wide).pow(2).sum().cpu()
            size += wide.pow(2).sum().cpu()
    return float(err), float(size)
