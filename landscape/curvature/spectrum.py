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
from typing import Any, Sequence

import torch

from landscape._deprecation import renamed_kwargs
from landscape.curvature.base import CurvatureOperator
from landscape.curvature.lanczos import krylov_basis, krylov_eigsh, lanczos_tridiagonal
from landscape.params import Vector, flatten, unflatten

__all__ = [
    "DensityResult",
    "EigenResult",
    "TraceResult",
    "hessian_trace",
    "spectral_density",
    "top_eigenvalues",
]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _rademacher(n_rows: int, op: CurvatureOperator, gen: torch.Generator) -> torch.Tensor:
    bits = torch.randint(0, 2, (n_rows, op.dim), generator=gen, dtype=torch.int8)
    return (bits.to(op.dtype) * 2 - 1).to(op.device)


def _to_vectors(rows: torch.Tensor, op: CurvatureOperator) -> list[Vector]:
    like = [torch.empty(s, device="meta") for s in op.shapes]
    return [tuple(t.clone() for t in unflatten(r, like)) for r in rows]


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
    most negative end as an :class:`EigenResult` (ascending). ``ritz_values``: all Ritz
    values of the final Krylov space (ascending).
    """

    values: torch.Tensor
    vectors: list[Vector]
    residuals: torch.Tensor
    n_matvec: int
    converged: bool
    smallest: EigenResult | None = None
    which: str = "largest"
    tol: float = 1e-3
    ritz_values: torch.Tensor | None = None

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue (``values[0]``) for the largest end."""
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
    else:
        vectors = list(warm_start)
    if not vectors:
        return None
    rows = []
    for i, v in enumerate(vectors):
        v = op._check(v, f"warm_start vector {i}")
        rows.append(flatten(v))
    return torch.stack(rows)


@renamed_kwargs(max_iter="max_matvec", min_iter="min_matvec")
def top_eigenvalues(
    op: CurvatureOperator,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_matvec: int | None = None,
    which: str = "largest",
    warm_start: EigenResult | Sequence[Sequence[torch.Tensor]] | None = None,
    seed: int = 0,
    min_matvec: int | None = None,
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
    its residual). See docs/curvature.md, "Top eigenvalues". The old keywords
    ``max_iter`` and ``min_iter`` still work and warn.

    Args:
        op: the operator.
        k: how many eigenpairs (at each end asked for).
        tol: the relative residual tolerance.
        max_matvec: the most products to spend (default ``min(dim, 60 + 20 k)``, with
            ``2 k`` for ``"both"``); ``converged=False`` when the cap is hit.
        which: ``"largest"``, ``"smallest"`` (most negative first) or ``"both"``.
        warm_start: a previous :class:`EigenResult` or a list of parameter-space vectors.
        seed: the seed of the cold start's Gaussian vector.
        min_matvec: the least number of products before convergence may be declared
            (default ``min(dim, k + 2)`` cold, 0 warm).

    Returns:
        The eigenpairs, their residuals and the products used; for ``"both"``, the
        smallest end in ``.smallest``.

    Raises:
        ValueError: ``k < 1``, ``tol <= 0``, an unknown ``which`` or ``max_matvec < 1``.

    Example:
        >>> import torch
        >>> from landscape.curvature import MatrixOperator, top_eigenvalues
        >>> op = MatrixOperator(torch.diag(torch.tensor([4.0, 2.0, -1.0], dtype=torch.float64)))
        >>> [round(v, 6) for v in top_eigenvalues(op, k=2).values.tolist()]
        [4.0, 2.0]
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if which not in ("largest", "smallest", "both"):
        raise ValueError(f"which must be 'largest', 'smallest' or 'both', got {which!r}")
    if max_matvec is not None and max_matvec < 1:
        raise ValueError(f"max_matvec must be >= 1, got {max_matvec}")
    gen = _generator(seed)
    start = _warm_rows(warm_start, op, which)
    cold = start is None
    if cold:
        start = torch.randn(op.dim, generator=gen, dtype=torch.float64).to(op.device, op.dtype)
    if max_matvec is None:
        max_matvec = min(op.dim, 60 + 20 * k * (2 if which == "both" else 1))
    if min_matvec is None:
        min_matvec = min(op.dim, k + 2) if cold else 0
    before = op.n_matvec
    res = krylov_eigsh(
        op.flat_matvec, start, k=k, which=which, tol=tol, max_matvec=max_matvec,
        min_matvec=min_matvec, generator=gen,
    )
    used = op.n_matvec - before

    def part(triple: tuple[torch.Tensor, torch.Tensor, torch.Tensor], end: str) -> EigenResult:
        values, rows, resid = triple
        return EigenResult(
            values=values, vectors=_to_vectors(rows, op), residuals=resid, n_matvec=used,
            converged=res.converged, which=end, tol=tol, ritz_values=res.ritz_values,
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


# ------------------------------------------------------------------------------------------
# trace
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TraceResult:
    """A stochastic estimate of the trace of a curvature operator.

    Attributes:
        value: the estimate (``float(result)`` gives it too).
        stderr: its standard error (NaN when it cannot be estimated).
        n_matvec: the products used.
        method: ``"hutchinson"``, ``"hutch++"`` or ``"krylov"``.
        samples: the per-probe quadratic forms of the stochastic part.
    """

    value: float
    stderr: float
    n_matvec: int
    method: str = "hutch++"
    samples: torch.Tensor | None = None

    def __float__(self) -> float:
        return float(self.value)

    def as_dict(self) -> dict[str, Any]:
        """Plain Python numbers: value, stderr, n_matvec, method."""
        return {"value": self.value, "stderr": self.stderr, "n_matvec": self.n_matvec,
                "method": self.method}


def _mean_and_stderr(samples: torch.Tensor) -> tuple[float, float]:
    n = samples.numel()
    mean = float(samples.mean())
    if n < 2:
        return mean, math.nan
    return mean, float(samples.std(unbiased=True)) / math.sqrt(n)


def hessian_trace(
    op: CurvatureOperator,
    method: str = "krylov",
    n_matvec: int = 60,
    *,
    seed: int = 0,
) -> TraceResult:
    """Stochastic estimate of ``tr(op)`` from exactly ``n_matvec`` products.

    ``method="hutchinson"``: ``(1/m) sum_j z_j^T A z_j`` with Rademacher ``z_j``;
    ``stderr`` = sample standard deviation / sqrt(m).

    ``method="hutch++"`` (Meyer et al. 2021, Alg. 1; the budget split of their
    ``simple_hutchplusplus.m``): ``s = n_matvec // 3`` Rademacher sketch vectors ``S``,
    ``Q = orth(A S)``, and ``g = n_matvec - 2 s`` Rademacher vectors ``G`` projected off
    ``Q``: ``tr(Q^T A Q) + (1/g) sum_j g_j^T A g_j`` with ``g_j = (I - Q Q^T) G_j``. The
    estimator is unbiased because ``Q`` is independent of ``G``. Its ``stderr`` is the
    standard error of the second (stochastic) term *given the sketch*: sample standard
    deviation of the ``g_j^T A g_j`` over sqrt(g). It excludes the variability of ``Q``
    (which affects the estimate only through which part is computed exactly); the tests
    check it is a valid error bar over seeds. Requires ``n_matvec >= 3``.

    ``method="krylov"``: Hutchinson deflated by a Krylov space (the deflation of Gambhir,
    Stathopoulos & Orginos, SISC 2017, with the Lanczos basis as the deflation space; cf.
    Chen & Hallman, SIMAX 2023, "Krylov-aware stochastic trace estimation"):
    ``m1 = n_matvec // 2`` Lanczos steps from a Rademacher start give an orthonormal basis
    ``Q`` and ``tr(Q^T A Q) = sum_j alpha_j`` exactly (the Rayleigh quotients the Lanczos
    steps compute anyway); the other ``n_matvec - m1`` Rademacher probes, projected off
    ``Q``, estimate the trace of the rest, as in Hutch++. Unbiased for the same reason
    (``Q`` is independent of the probes), same conditional ``stderr``. A Krylov space of
    ``m1`` products captures the extreme eigenvectors (both ends, for indefinite
    Hessians) far better than Hutch++'s one-pass sketch of ``n_matvec // 3`` columns,
    which needs ``2 n_matvec / 3`` products, so more of the budget is left for probes and
    less variance for them; docs/curvature.md and docs/benchmarks.md compare the three.
    Requires ``n_matvec >= 2``; the Lanczos steps are sequential single products.

    Args:
        op: the operator.
        method: ``"krylov"``, ``"hutch++"`` (or ``"hutchpp"``) or ``"hutchinson"``.
        n_matvec: the budget of products, all spent.
        seed: the seed of the probes.

    Returns:
        The estimate, its standard error and the per-probe samples.

    Raises:
        ValueError: an unknown method, or a budget below the method's least.

    Example:
        >>> import torch
        >>> from landscape.curvature import MatrixOperator, hessian_trace
        >>> op = MatrixOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> round(hessian_trace(op, "krylov", n_matvec=30).value, 6)  # Krylov space exact
        55.0
    """
    method = _TRACE_METHODS.get(method.lower().replace("_", "").replace("-", ""))
    if method is None:
        raise ValueError(
            f"method must be one of {', '.join(sorted(set(_TRACE_METHODS.values())))}"
        )
    least = {"hutchinson": 1, "hutch++": 3, "krylov": 2}[method]
    if n_matvec < least:
        raise ValueError(f"n_matvec must be >= {least} for {method}, got {n_matvec}")
    before = op.n_matvec
    gen = _generator(seed)
    if method == "hutchinson":
        z = _rademacher(n_matvec, op, gen)
        az = op.flat_matmat(z)
        samples = (z.double() * az.double()).sum(dim=1)
        value, stderr = _mean_and_stderr(samples)
        return TraceResult(value, stderr, op.n_matvec - before, "hutchinson", samples)
    if method == "hutch++":
        s = n_matvec // 3
        sketch = _rademacher(s, op, gen)
        probes = _rademacher(n_matvec - 2 * s, op, gen)
        a_s = op.flat_matmat(sketch).double()
        q, _ = torch.linalg.qr(a_s.T)  # (dim, s), float64
        a_q = op.flat_matmat(q.T.to(op.dtype).contiguous()).double()
        exact = float((q * a_q.T).sum())
        basis = q.T
    else:  # krylov: Lanczos basis from one random start, exact trace on its span
        start = _rademacher(1, op, gen)[0]
        rows, alphas, used = krylov_basis(op.flat_matvec, start, n_matvec // 2)
        exact = float(alphas.sum())
        basis = rows.double()
        probes = _rademacher(n_matvec - used, op, gen)
    pg = probes.double()
    pg = pg - (pg @ basis.T) @ basis
    a_g = op.flat_matmat(pg.to(op.dtype)).double()
    samples = (pg * a_g).sum(dim=1)
    mean, stderr = _mean_and_stderr(samples)
    return TraceResult(exact + mean, stderr, op.n_matvec - before, method, samples)


_TRACE_METHODS = {"hutchinson": "hutchinson", "hutch++": "hutch++", "hutchpp": "hutch++",
                  "krylov": "krylov"}


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
    ``n_matvec`` the products used.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    n_matvec: int
    sigma: float = 0.0
    dim: int = 0

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
        """Plain Python lists and numbers: nodes, weights, sigma, n_matvec, dim."""
        return {"nodes": self.nodes.tolist(), "weights": self.weights.tolist(),
                "sigma": self.sigma, "n_matvec": self.n_matvec, "dim": self.dim}


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


@renamed_kwargs(n_iter="lanczos_steps")
def spectral_density(
    op: CurvatureOperator,
    lanczos_steps: int = 80,
    n_probes: int = 4,
    *,
    grid: torch.Tensor | int | None = None,
    sigma: float | None = None,
    seed: int = 0,
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

    Args:
        op: the operator.
        lanczos_steps: Lanczos steps per probe (``lanczos_steps * n_probes`` products).
        n_probes: the number of random start vectors.
        grid: the points to evaluate the density at, or their number.
        sigma: the Gaussian kernel's standard deviation.
        seed: the seed of the probes.

    Returns:
        The smoothed density and its quadrature nodes and weights.

    Raises:
        ValueError: ``lanczos_steps < 1``, ``n_probes < 1``, ``sigma <= 0`` or a grid of
            fewer than 2 points.

    Example:
        >>> import torch
        >>> from landscape.curvature import MatrixOperator, spectral_density
        >>> op = MatrixOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> round(spectral_density(op, lanczos_steps=10, n_probes=2).trace, 6)
        55.0
    """
    if lanczos_steps < 1:
        raise ValueError(f"lanczos_steps must be >= 1, got {lanczos_steps}")
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    gen = _generator(seed)
    starts = _rademacher(n_probes, op, gen)
    starts = starts / math.sqrt(op.dim)
    before = op.n_matvec
    alphas, betas, _ = lanczos_tridiagonal(op.flat_matmat, starts, lanczos_steps)
    width = max(a.numel() for a in alphas)
    node_t = torch.full((n_probes, width), math.nan, dtype=torch.float64)
    weight_t = torch.zeros((n_probes, width), dtype=torch.float64)
    for i, (a, b) in enumerate(zip(alphas, betas)):
        t = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
        theta, s = torch.linalg.eigh(t)
        node_t[i, : theta.numel()] = theta
        weight_t[i, : theta.numel()] = s[0] ** 2 / n_probes
    mask = ~torch.isnan(node_t)
    lo, hi = float(node_t[mask].min()), float(node_t[mask].max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else 1e-3 * max(1.0, abs(hi))
    if grid is None or isinstance(grid, int):
        points = 1000 if grid is None else int(grid)
        if points < 2:
            raise ValueError(f"grid must have >= 2 points, got {points}")
        grid_t = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, points, dtype=torch.float64)
    else:
        grid_t = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
    density = gaussian_density(node_t[mask], weight_t[mask], grid_t, sigma)
    return DensityResult(
        grid=grid_t, density=density, nodes=node_t, weights=weight_t,
        n_matvec=op.n_matvec - before, sigma=float(sigma), dim=op.dim,
    )
