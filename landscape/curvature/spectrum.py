"""Spectral quantities of a curvature operator: top eigenpairs, trace, spectral density.

* :func:`top_eigenvalues` -- algebraically largest (and/or smallest) eigenpairs by Lanczos
  with full re-orthogonalisation and residual-based stopping, warm-startable from previous
  Ritz vectors (docs/curvature.md, "Top eigenvalues").
* :func:`hessian_trace` -- Hutchinson (1989) with Rademacher probes, Hutch++ (Meyer,
  Musco, Musco & Woodruff, SOSA 2021, Algorithm 1), or Hutchinson deflated by a Lanczos
  basis (``"krylov"``), each with a standard error (docs/curvature.md, "Trace").
* :func:`spectral_density` -- stochastic Lanczos quadrature (Lin, Saad & Yang 2016;
  Ghorbani, Krishnan & Xiao 2019) with Gaussian smoothing (docs/curvature.md,
  "Spectral density").

Random probes come from a ``torch.Generator`` seeded with ``seed`` (drawn on the CPU, then
moved), never from the global RNG. Every result reports the matvecs it used.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from landscape._checks import positive_int, positive_number
from landscape._deprecation import renamed_kwargs
from landscape._progress import products_bar
from landscape.curvature._probes import generator as _generator
from landscape.curvature._probes import rademacher as _rademacher
from landscape.curvature._probes import to_vectors as _to_vectors
from landscape.curvature.base import CurvatureOperator, check_operator
from landscape.curvature.lanczos import KrylovResult, krylov_eigsh, lanczos_tridiagonal
from landscape.curvature.memory import (
    MemoryProfile,
    PeakMemory,
    apply_plan,
    check_budget,
    plan_eigen,
    plan_probes,
)
from landscape.curvature.trace import TraceResult, hessian_trace
from landscape.findings import user_stacklevel
from landscape.isolation import without_autocast
from landscape.params import Vector, flatten

__all__ = [
    "DensityResult",
    "EigenResult",
    "TraceResult",
    "hessian_trace",
    "spectral_density",
    "top_eigenvalues",
]

REORTHOGONALIZE = ("auto", "full", "local")
"""The bases :func:`spectral_density` may keep (its ``reorthogonalize``)."""


def check_reorthogonalize(value: str) -> str:
    """``value`` if it is one of :data:`REORTHOGONALIZE`; else ``ValueError``.

    Args:
        value: a ``reorthogonalize`` argument.

    Returns:
        ``value``.

    Raises:
        ValueError: an unknown value.
    """
    if value not in REORTHOGONALIZE:
        raise ValueError(f"reorthogonalize must be one of {', '.join(REORTHOGONALIZE)}, "
                         f"got {value!r}")
    return value


# ------------------------------------------------------------------------------------------
# eigenvalues
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EigenResult:
    """Extreme eigenpairs of a curvature operator.

    ``values``: float64 ``(k,)``, descending for the largest end (``which="largest"`` or
    ``"both"``), ascending (most negative first) for ``which="smallest"``. ``vectors``: unit
    eigenvector estimates (Ritz vectors) as parameter-space vectors. ``residuals``: float64
    ``||A y - theta y||`` per pair. ``n_matvec``: products used. ``converged``: every wanted
    pair met the stopping rule. ``smallest``: for ``which="smallest"`` or ``"both"``, the
    most negative end as an :class:`EigenResult` (ascending). ``tol``: the relative
    tolerance the run was given, as its stopping rule applied it, so ``residuals /
    |values|`` may exceed it: the ``"value"`` rule (and ``"auto"`` for one eigenvalue)
    judges the eigenvalue's error estimate min(r, r²/gap) rather than the residual r,
    and a residual at the products' rounding floor
    (:func:`~landscape.curvature.lanczos.residual_floor` of their dtype times the largest
    |Ritz value|) counts as converged, which decides only for eigenvalues near zero.
    ``ritz_values``: all Ritz
    values of the final Krylov space (ascending). ``peak_memory``: the run's measured peak
    above the memory in use when it began, in bytes (:class:`~landscape.curvature.memory.
    PeakMemory`); ``memory_plan``: the :class:`~landscape.curvature.memory.MemoryPlan`
    followed when a ``memory_budget`` was given.
    """

    values: torch.Tensor
    vectors: list[Vector] = dataclasses.field(repr=False)  # (parameter-sized: not in repr)
    residuals: torch.Tensor
    n_matvec: int
    converged: bool
    smallest: EigenResult | None = None
    which: str = "largest"
    tol: float = 1e-3
    ritz_values: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    peak_memory: int | None = None
    memory_plan: Any = None

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue (``values[0]``) for the largest end.

        Raises:
            ValueError: the result holds the smallest end only (``which="smallest"``),
                whose ``values[0]`` is the most negative eigenvalue.
        """
        if self.which == "smallest":
            raise ValueError("lambda_max: this result holds the smallest end "
                             "(which='smallest'); its values[0] is the most negative "
                             "eigenvalue; use which='largest' or 'both' for lambda_max")
        return float(self.values[0])

    def as_dict(self) -> dict[str, Any]:
        """Plain Python numbers (values, residuals, n_matvec, converged, smallest)."""
        out: dict[str, Any] = {
            "values": [float(v) for v in self.values],
            "residuals": [float(r) for r in self.residuals],
            "n_matvec": int(self.n_matvec),
            "converged": bool(self.converged),
            "which": self.which,
            "tol": float(self.tol),
            "peak_memory": self.peak_memory,
        }
        if self.smallest is not None:
            out["smallest"] = self.smallest.as_dict()
        return out


def _warm_rows(warm_start: Any, op: CurvatureOperator, which: str) -> torch.Tensor | None:
    if warm_start is None:
        return None
    if isinstance(warm_start, EigenResult):
        top = list(warm_start.vectors) if warm_start.which != "smallest" else []
        low = list(warm_start.smallest.vectors) if warm_start.smallest is not None else []
        if which == "largest":
            vectors = top or low
        elif which == "smallest":
            vectors = low or top
        else:
            vectors = top + low
    elif isinstance(warm_start, (list, tuple)):
        vectors = list(warm_start)
    else:
        raise ValueError(f"warm_start must be an EigenResult or a list of parameter-space "
                         f"vectors, got {type(warm_start).__name__}")
    if not vectors:
        return None
    rows = []
    for i, v in enumerate(vectors):
        v = op._check(v, f"warm_start vector {i}")
        rows.append(flatten(v))
    return torch.stack(rows)


@renamed_kwargs(max_iter="max_matvec", min_iter="min_matvec")  # outermost: its stacklevel
@without_autocast
def top_eigenvalues(
    op: CurvatureOperator,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_matvec: int | None = None,
    which: str = "largest",
    warm_start: EigenResult | Sequence[Sequence[torch.Tensor]] | None = None,
    seed: int = 0,
    block: int = 1,
    min_matvec: int | None = None,
    stop: str = "auto",
    max_basis: int | None = None,
    offload: bool = False,
    memory_budget: int | float | str | None = None,
    memory_profile: MemoryProfile | None = None,
    progress: bool = True,
) -> EigenResult:
    """The ``k`` algebraically largest eigenpairs of ``op`` (and/or the smallest).

    Lanczos with full re-orthogonalisation (:func:`~landscape.curvature.lanczos.krylov_eigsh`)
    stops when every wanted Ritz pair ``(theta, y)`` satisfies
    ``||op(y) - theta y|| <= max(tol * |theta|, 100 eps * max|theta_i|)`` (eps of the
    operator's dtype; the second term only matters for eigenvalues near 0). For a symmetric
    operator the residual bounds the distance from ``theta`` to the spectrum, and the
    eigenvalue error is at most ``residual^2 / gap`` (Kato-Temple), so values are
    typically far more accurate than ``tol``.

    A warm start from a previous :class:`EigenResult` (its Ritz vectors, also from nearby
    parameters) forms the start block, so tracking an eigenvalue over nearby training
    steps costs a few matvecs (the first product alone gives the Rayleigh quotient and
    its residual). See docs/curvature.md, "Top eigenvalues".

    A cold start from one vector finds one vector per eigenspace: an eigenvalue of
    multiplicity m (a multi-output least-squares layer repeats every eigenvalue once per
    output) appears once among ``values``, whose later entries are then the next
    eigenvalues down, each a true eigenpair with a small residual (``converged`` is
    True). ``block=b`` starts from ``b`` random vectors (block Lanczos), which finds
    multiplicities up to ``b`` for about twice the products at ``b = k`` (docs/curvature.md,
    "Repeated eigenvalues"). The old keywords
    ``max_iter`` and ``min_iter`` still work and warn.

    Args:
        op: the operator.
        k: how many eigenpairs (at each end asked for).
        tol: the relative residual tolerance.
        max_matvec: the most products to spend (default ``min(dim, 60 + 20 k)``, with
            ``2 k`` for ``"both"``); ``converged=False`` when the cap is hit. With
            first-order products, one more per end checks the step along the answer,
            and when the step was refined the solve runs again from the Ritz vectors,
            with the same cap (:func:`_check_step`).
        which: ``"largest"``, ``"smallest"`` (most negative first) or ``"both"``.
        warm_start: a previous :class:`EigenResult` or a list of parameter-space vectors.
        seed: the seed of the cold start's Gaussian vector(s).
        block: how many Gaussian vectors the cold start has (``1``: plain Lanczos; ``k``
            finds eigenvalues repeated up to ``k`` times); unused with ``warm_start``.
        min_matvec: the least number of products before convergence may be declared
            (default ``min(dim, max(k, block) + 2)`` cold, 0 warm).
        stop: ``"residual"`` (``||op(y) - theta y|| <= tol |theta|``), ``"value"``
            (the estimated eigenvalue error ``min(r, r^2 / gap) <= tol |theta|``) or
            ``"auto"`` (the residual rule; for ``k=1`` at one end also the value rule at
            ``tol / 10``); :func:`~landscape.curvature.lanczos.krylov_eigsh`.
        max_basis: keep at most this many basis vectors (thick restart); ``None``: all.
        offload: keep the basis in host memory (pinned on CUDA), streamed to the device.
        memory_budget: the most memory the run may take above what is in use, in bytes,
            as ``"<f>x step"`` (a multiple of one training step on the probe data) or
            ``"auto"`` (one step, at least 256 MiB; docs/curvature.md, "Memory");
            :func:`~landscape.curvature.memory.plan_eigen` then chooses the basis bound,
            offloading, micro-batches or the first-order product before the run, or
            raises. ``None``: no limit.
        memory_profile: a :class:`~landscape.curvature.memory.MemoryProfile` of ``op``
            measured before, reused by the plan (default: measured when a budget is given).
        progress: a bar of the products on stderr, with the current estimate and its
            relative residual, drawn once the run has lasted 2 seconds.

    Returns:
        The eigenpairs, their residuals and the products used; for ``"both"``, the
        smallest end in ``.smallest``.

    Raises:
        ValueError: ``k < 1``, ``tol <= 0``, an unknown ``which``, ``max_matvec < 1`` or
            ``block < 1``.
        MemoryBudgetError: nothing fits ``memory_budget`` (a ``LandscapeError``).

    Example:
        >>> import torch
        >>> from landscape.curvature import MatrixOperator, top_eigenvalues
        >>> op = MatrixOperator(torch.diag(torch.tensor([4.0, 2.0, -1.0], dtype=torch.float64)))
        >>> [round(v, 6) for v in top_eigenvalues(op, k=2).values.tolist()]
        [4.0, 2.0]
    """
    check_operator(op)
    k = positive_int("k", k)
    tol = positive_number("tol", tol)
    if which not in ("largest", "smallest", "both"):
        raise ValueError(f"which must be 'largest', 'smallest' or 'both', got {which!r}")
    if max_matvec is not None:
        max_matvec = positive_int("max_matvec", max_matvec)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an integer >= 1, got {block!r}")
    check_budget(memory_budget)
    if k > op.dim:
        warnings.warn(f"top_eigenvalues: k={k} exceeds the operator's {op.dim} dimensions; "
                      f"its {op.dim} eigenvalues are returned", RuntimeWarning,
                      stacklevel=user_stacklevel())
    gen = _generator(seed)
    start = _warm_rows(warm_start, op, which)
    cold = start is None
    if cold:
        shape = (op.dim,) if block == 1 else (min(block, op.dim), op.dim)
        start = torch.randn(shape, generator=gen, dtype=torch.float64).to(op.device, op.dtype)
    if max_matvec is None:
        max_matvec = min(op.dim, 60 + 20 * k * (2 if which == "both" else 1))
    if min_matvec is None:
        min_matvec = min(op.dim, max(k, block) + 2) if cold else 0
    plan = None
    run_op = op
    if memory_budget is not None:
        ends, b = (2 if which == "both" else 1), (start.shape[0] if start.dim() > 1 else 1)
        plan = plan_eigen(
            op, budget=memory_budget, basis_vectors=min(op.dim, max_matvec + b + 1),
            least_basis=ends * k + b, extra_vectors=8 + ends * k, profile=memory_profile,
        )
        run_op = apply_plan(op, plan)
        if plan.max_basis is not None:
            max_basis = plan.max_basis if max_basis is None else min(max_basis, plan.max_basis)
        offload = offload or plan.offload
    before = run_op.n_matvec

    def solve(rows: torch.Tensor, least: int) -> KrylovResult:
        return krylov_eigsh(
            run_op.flat_matvec, rows, k=k, which=which, tol=tol, max_matvec=max_matvec,
            min_matvec=least, generator=gen, stop=stop, max_basis=max_basis,
            offload=offload, fresh_products=True,  # flat_matvec's torch.cat is new
            callback=(lambda info: _show_estimate(bar, info, which)) if progress else None,
        )

    engine = _first_order_engine(run_op)
    bars = products_bar(run_op, total=max_matvec, desc="top_eigenvalues", enabled=progress)
    with bars as bar, PeakMemory(op.device) as mem:
        res = solve(start, min_matvec)
        refined = None if engine is None else engine.refined
        if engine is not None and _check_step(run_op, res) and engine.refined > refined:
            # the run's products came from another operator than the refined one: solve
            # again from the answer, every product at the refined step
            res = solve(torch.cat([t[1] for t in (res.largest, res.smallest) if t is not None]),
                        0)
    used = run_op.n_matvec - before
    if run_op is not op:
        op.n_matvec += used

    def part(triple: tuple[torch.Tensor, torch.Tensor, torch.Tensor], end: str) -> EigenResult:
        values, rows, resid = triple
        return EigenResult(
            values=values, vectors=_to_vectors(rows, op), residuals=resid, n_matvec=used,
            converged=res.converged, which=end, tol=tol, ritz_values=res.ritz_values,
            peak_memory=mem.peak, memory_plan=plan,
        )

    if which == "smallest":
        assert res.smallest is not None
        out = part(res.smallest, "smallest")
        out.smallest = part(res.smallest, "smallest")
        return out
    assert res.largest is not None
    out = part(res.largest, "largest")
    if which == "both":
        assert res.smallest is not None
        out.smallest = part(res.smallest, "smallest")
        out.which = "both"
    return out


def _show_estimate(bar: Any, info: dict, which: str) -> None:
    """The Lanczos run's current extreme estimate(s) and relative residual(s) on ``bar``."""
    theta, res = info["theta"], info["residuals"]
    ends = {"largest": [-1], "smallest": [0], "both": [-1, 0]}[which]
    bar.set_postfix_str(", ".join(
        f"{theta[i]:.5g} (residual {res[i] / max(abs(theta[i]), 1e-300):.1e})" for i in ends
    ), refresh=False)


def _first_order_engine(op: CurvatureOperator) -> Any:
    """The first-order engine of a model operator whose Hessian products may be first-order."""
    if getattr(op, "_backend", None) is None or not hasattr(op, "_first_order"):
        return None
    return op._first_order


def _check_step(op: CurvatureOperator, res: KrylovResult) -> bool:
    """One product along each end's first Ritz vector, when the products were first-order.

    A Lanczos vector holds only part of the top eigenvector, and the truncation check of
    a first-order product (:mod:`landscape.curvature._step`) sees a fraction ``α`` of a
    sharp direction as ``α⁴``: a run can end without any of its products refining the
    step, its eigenvalue biased by the truncation. A product along the answer checks the
    step where it matters. When this check refines the step, no product of the run was at
    the refined step, and the caller solves again from the Ritz vectors (on a 1M-parameter
    GPT-2 at initialisation: 0.9 % low and not converged in 40 products; after the check
    and 10 more, 11.1251 against the exact 11.1257). A step refined during the run is not
    solved again: the products after it, which shape the answer, were at the refined
    step, and the earlier ones were along near-random directions where the truncation is
    small. Measured on a 9M-parameter GPT-2, re-solving from the Ritz vector there made
    the answer worse (4.8e-4 relative against 1.1e-4): started from one vector, the new
    Krylov space is built from products whose rounding noise the refined step raised.

    Returns:
        Whether the check ran (the products were first-order).
    """
    if getattr(op, "backend_used", None) != "first_order":
        return False
    for end in (res.largest, res.smallest):
        if end is not None and end[1].shape[0]:
            op.flat_matvec(end[1][0])
    return True


# ------------------------------------------------------------------------------------------
# spectral density
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DensityResult:
    """Smoothed eigenvalue density from stochastic Lanczos quadrature.

    ``grid`` (float64) and ``density`` on it; ``nodes`` and ``weights``: float64 tables of
    shape ``(n_probes, m)``, one row per probe (``m`` the longest run, at most
    ``lanczos_steps``);
    a run that stopped early (breakdown) is padded with node ``NaN`` and weight ``0``. The
    weights of each row sum to ``1 / n_probes``, so all sum to 1, and
    ``density(t) = sum_k weights_k g_sigma(t - nodes_k)`` over the valid entries.
    ``sigma`` is the Gaussian kernel's standard deviation, ``dim`` the operator's dimension,
    ``n_matvec`` the products used. ``peak_memory``: the run's measured peak above the
    memory in use when it began, in bytes; ``probe_batch``: the most probes run in lock
    step; ``memory_plan``: the :class:`~landscape.curvature.memory.MemoryPlan` followed
    when a ``memory_budget`` was given; ``reorthogonalize``: ``"full"`` or ``"local"``,
    the basis the runs kept.
    """

    grid: torch.Tensor = dataclasses.field(repr=False)  # (long tables: not in repr)
    density: torch.Tensor = dataclasses.field(repr=False)
    nodes: torch.Tensor = dataclasses.field(repr=False)
    weights: torch.Tensor = dataclasses.field(repr=False)
    n_matvec: int
    sigma: float = 0.0
    dim: int = 0
    peak_memory: int | None = None
    probe_batch: int | None = None
    memory_plan: Any = None
    reorthogonalize: str = "full"

    @property
    def valid(self) -> torch.Tensor:
        """Boolean mask of the real (not padded) entries of ``nodes``/``weights``."""
        return ~torch.isnan(self.nodes)

    def moment(self, j: int) -> float:
        """Quadrature estimate of ``tr(A^j) / dim`` (exact per probe for j <= 2 m - 1).

        Args:
            j: the moment's order.

        Returns:
            The estimate.
        """
        mask = self.valid
        return float((self.weights[mask] * self.nodes[mask] ** j).sum())

    @property
    def trace(self) -> float:
        """``dim * sum_k weights_k nodes_k``: the SLQ estimate of the trace."""
        return self.dim * self.moment(1)

    def as_dict(self) -> dict[str, Any]:
        """Plain Python lists and numbers: nodes, weights, sigma, n_matvec, dim, peak_memory."""
        return {"nodes": self.nodes.tolist(), "weights": self.weights.tolist(),
                "sigma": self.sigma, "n_matvec": self.n_matvec, "dim": self.dim,
                "peak_memory": self.peak_memory}


def gaussian_density(
    nodes: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor, sigma: float
) -> torch.Tensor:
    """``sum_k w_k exp(-(t - x_k)^2 / (2 sigma^2)) / sqrt(2 pi sigma^2)`` on ``grid``.

    Args:
        nodes: the quadrature nodes ``x_k``.
        weights: their weights ``w_k``.
        grid: the points ``t``.
        sigma: the kernel's standard deviation.

    Returns:
        The density at each grid point.
    """
    diff = grid[:, None] - nodes[None, :]
    kern = torch.exp(-0.5 * (diff / sigma) ** 2) / math.sqrt(2 * math.pi * sigma**2)
    return kern @ weights


def smoothed_density(
    nodes: torch.Tensor, weights: torch.Tensor, *, grid: torch.Tensor | int | None = None,
    sigma: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Quadrature nodes and weights smoothed into a density, as :func:`spectral_density` does.

    Args:
        nodes: the finite nodes (float64).
        weights: their weights.
        grid: the points (default 1000, or this many, spanning the nodes plus ``5 sigma``).
        sigma: the kernel's width (default ``0.01 * (max node - min node)``, or
            ``1e-3 * max(1, |node|)`` for a single point).

    Returns:
        ``(grid, density, sigma)``.

    Raises:
        ValueError: a grid of fewer than 2 points.
    """
    # on the host, in float64: nodes, weights or a grid given on a device meet here
    nodes = nodes.detach().to("cpu", torch.float64)
    weights = weights.detach().to("cpu", torch.float64)
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else 1e-3 * max(1.0, abs(hi))
    if grid is None or isinstance(grid, int):
        points = 1000 if grid is None else int(grid)
        if points < 2:
            raise ValueError(f"grid must have >= 2 points, got {points}")
        grid_t = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, points, dtype=torch.float64)
    else:
        grid_t = torch.as_tensor(grid).detach().to("cpu", torch.float64).reshape(-1)
    return grid_t, gaussian_density(nodes, weights, grid_t, sigma), float(sigma)


@renamed_kwargs(n_iter="lanczos_steps")
@without_autocast
def spectral_density(
    op: CurvatureOperator,
    lanczos_steps: int = 80,
    n_probes: int = 4,
    *,
    grid: torch.Tensor | int | None = None,
    sigma: float | None = None,
    seed: int = 0,
    probe_batch: int | None = None,
    reorthogonalize: str = "auto",
    memory_budget: int | float | str | None = None,
    memory_profile: MemoryProfile | None = None,
    progress: bool = True,
) -> DensityResult:
    """Eigenvalue density of ``op`` by stochastic Lanczos quadrature.

    For each of ``n_probes`` Rademacher start vectors ``v`` (normalised),
    ``lanczos_steps`` Lanczos steps with full re-orthogonalisation (all probes in lock
    step, batched matvecs) give a tridiagonal ``T = S diag(theta) S^T``; the nodes are
    ``theta`` and the weights ``S[0, k]^2 / n_probes`` (``eigh``, float64), one row per
    probe. A run that breaks down (invariant Krylov space) stops early with exact nodes;
    its row is padded (NaN, 0). The
    density is the weighted sum of Gaussians of standard deviation ``sigma`` (default
    ``0.01 * (max node - min node)``, or ``1e-3 * max(1, |node|)`` for a single point), so
    it integrates to 1 over the real line;
    the default ``grid`` has 1000 points on [min node - 5 sigma, max node + 5 sigma]
    (``grid`` may be an int, the number of points, or a tensor of points). Quadrature
    identity: ``sum_k tau_k theta_k^j = v^T A^j v`` for ``j <= 2 m - 1``. The old keyword
    ``n_iter`` still works and warns.

    Memory: each probe keeps its basis of ``lanczos_steps`` vectors, and a lock step of
    ``c`` probes multiplies ``c`` vectors at once (up to ``c`` products' memory).
    ``probe_batch`` (or the plan for ``memory_budget``) runs the probes in groups of at
    most that many, one group after the other; the runs are independent, so only the
    products' rounding and the breakdown test's norm estimate (shared within a group) can
    differ from one lock step of all probes. ``reorthogonalize="local"`` keeps two basis
    vectors per probe instead of ``lanczos_steps`` (local re-orthogonalisation,
    :func:`~landscape.curvature.lanczos.lanczos_tridiagonal`): the quadrature stays
    accurate, and a converged eigenvalue may appear as two nearby nodes that share its
    weight (docs/curvature.md, "Spectral density").

    Args:
        op: the operator.
        lanczos_steps: Lanczos steps per probe (``lanczos_steps * n_probes`` products).
        n_probes: the number of random start vectors.
        grid: the points to evaluate the density at, or their number.
        sigma: the Gaussian kernel's standard deviation.
        seed: the seed of the probes.
        probe_batch: run at most this many probes in lock step (``None``: all).
        reorthogonalize: ``"full"`` (every basis vector kept), ``"local"`` (the last
            two) or ``"auto"``: full, unless a ``memory_budget`` cannot hold the whole
            basis at some micro-batch size where the local one fits.
        memory_budget: the most memory the run may take above what is in use: bytes,
            ``"<f>x step"`` or ``"auto"`` (docs/curvature.md, "Memory");
            :func:`~landscape.curvature.memory.plan_probes` then picks the group size,
            micro-batches, the local basis or the first-order product before the run,
            or raises. ``None``: no limit.
        memory_profile: a :class:`~landscape.curvature.memory.MemoryProfile` of ``op``
            measured before, reused by the plan (default: measured when a budget is given).
        progress: a bar of the products on stderr, drawn once the run has lasted 2 seconds.

    Returns:
        The smoothed density and its quadrature nodes and weights.

    Raises:
        ValueError: ``lanczos_steps < 1``, ``n_probes < 1``, ``probe_batch < 1``,
            ``sigma <= 0``, a grid of fewer than 2 points or an unknown
            ``reorthogonalize``.
        MemoryBudgetError: nothing fits ``memory_budget`` (a ``LandscapeError``, one line).

    Example:
        >>> import torch
        >>> from landscape.curvature import MatrixOperator, spectral_density
        >>> op = MatrixOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> round(spectral_density(op, lanczos_steps=10, n_probes=2).trace, 6)
        55.0
    """
    check_operator(op)
    lanczos_steps = positive_int("lanczos_steps", lanczos_steps)
    n_probes = positive_int("n_probes", n_probes)
    if sigma is not None:
        sigma = positive_number("sigma", sigma)
    if probe_batch is not None:
        probe_batch = positive_int("probe_batch", probe_batch)
    check_reorthogonalize(reorthogonalize)
    check_budget(memory_budget)
    plan = None
    run_op = op
    group = min(n_probes, probe_batch or n_probes)
    local = reorthogonalize == "local"
    if memory_budget is not None:
        plan = plan_probes(
            op, budget=memory_budget, n_probes=group,
            fixed_bytes=density_fixed_bytes(op, n_probes),
            probe_bytes=density_probe_bytes(op, lanczos_steps, local=local),
            local_probe_bytes=(density_probe_bytes(op, lanczos_steps, local=True)
                               if reorthogonalize == "auto" else None),
            what="spectral_density", profile=memory_profile,
        )
        run_op = apply_plan(op, plan)
        group = min(group, plan.probe_batch or group)
        local = local or plan.reorthogonalize == "local"
    gen = _generator(seed)
    starts = _rademacher(n_probes, op, gen)
    starts = starts / math.sqrt(op.dim)
    before = run_op.n_matvec
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    bars = products_bar(run_op, total=lanczos_steps * n_probes, desc="spectral_density",
                        enabled=progress)
    with bars, PeakMemory(op.device) as mem:
        for i in range(0, n_probes, group):
            a, b, _ = lanczos_tridiagonal(run_op.flat_matmat, starts[i : i + group],
                                          lanczos_steps, local=local)
            alphas += a
            betas += b
    used = run_op.n_matvec - before
    if run_op is not op:
        op.n_matvec += used
    width = max(a.numel() for a in alphas)
    node_t = torch.full((n_probes, width), math.nan, dtype=torch.float64)
    weight_t = torch.zeros((n_probes, width), dtype=torch.float64)
    for i, (a, b) in enumerate(zip(alphas, betas)):
        t = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
        theta, s = torch.linalg.eigh(t)
        node_t[i, : theta.numel()] = theta
        weight_t[i, : theta.numel()] = s[0] ** 2 / n_probes
    mask = ~torch.isnan(node_t)
    grid_t, density, sigma = smoothed_density(node_t[mask], weight_t[mask], grid=grid,
                                              sigma=sigma)
    return DensityResult(
        grid=grid_t, density=density, nodes=node_t, weights=weight_t,
        n_matvec=used, sigma=float(sigma), dim=op.dim, peak_memory=mem.peak,
        probe_batch=group, memory_plan=plan, reorthogonalize="local" if local else "full",
    )


def density_fixed_bytes(op: CurvatureOperator, n_probes: int) -> int:
    """Bytes :func:`spectral_density` keeps whatever its groups: the probes' start vectors.

    Args:
        op: the operator.
        n_probes: the probes.

    Returns:
        ``n_probes`` vectors in the operator's dtype.
    """
    return n_probes * op.dim * torch.empty((), dtype=op.dtype).element_size()


def density_probe_bytes(op: CurvatureOperator, lanczos_steps: int, *, local: bool = False) -> int:
    """Bytes one probe of a lock step holds besides its product.

    Its basis of ``lanczos_steps`` vectors (two with ``local=True``) and four more (the
    vector multiplied, its product, the Gram-Schmidt copy and its coefficients' update),
    in the solver's dtype (:func:`~landscape.curvature.lanczos.work_dtype`).

    Args:
        op: the operator.
        lanczos_steps: the Lanczos steps per probe.
        local: local re-orthogonalisation (:func:`spectral_density`).

    Returns:
        Bytes.
    """
    from landscape.curvature.lanczos import work_dtype

    w = torch.empty((), dtype=work_dtype(op.dtype)).element_size()
    basis = min(lanczos_steps, op.dim, 2 if local else lanczos_steps)
    return (basis + 4) * op.dim * w
