"""Stochastic trace estimation of a curvature operator, with a standard error.

Hutchinson (1989) with Rademacher probes, Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA
2021, Algorithm 1), or Hutchinson deflated by a Lanczos basis (``"krylov"``, the default);
docs/curvature.md, "Trace", compares them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from landscape.curvature._probes import generator as _generator
from landscape.curvature._probes import rademacher as _rademacher
from landscape.curvature.base import CurvatureOperator
from landscape.curvature.lanczos import krylov_basis
from landscape.curvature.memory import PeakMemory

__all__ = ["TraceResult", "hessian_trace"]


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
        peak_memory: the measured peak above the memory in use when the estimate began,
            in bytes (:class:`~landscape.curvature.memory.PeakMemory`).
    """

    value: float
    stderr: float
    n_matvec: int
    method: str = "hutch++"
    samples: torch.Tensor | None = None
    peak_memory: int | None = None

    def __float__(self) -> float:
        return float(self.value)

    def as_dict(self) -> dict[str, Any]:
        """Plain Python numbers: value, stderr, n_matvec, method."""
        return {"value": self.value, "stderr": self.stderr, "n_matvec": self.n_matvec,
                "method": self.method, "peak_memory": self.peak_memory}


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
    probe_batch: int | None = None,
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
        probe_batch: multiply at most this many probes at once (their products are
            batched, each costing one product's memory); ``None``: all at once.

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
    if probe_batch is not None and probe_batch < 1:
        raise ValueError(f"probe_batch must be >= 1, got {probe_batch}")
    with PeakMemory(op.device) as mem:
        result = _estimate(op, method, n_matvec, seed, probe_batch)
    return dataclasses.replace(result, peak_memory=mem.peak)


def _estimate(
    op: CurvatureOperator, method: str, n_matvec: int, seed: int, probe_batch: int | None
) -> TraceResult:
    def matmat(rows: torch.Tensor) -> torch.Tensor:
        size = probe_batch or rows.shape[0]
        return torch.cat([op.flat_matmat(rows[i : i + size])
                          for i in range(0, rows.shape[0], size)])

    before = op.n_matvec
    gen = _generator(seed)
    if method == "hutchinson":
        z = _rademacher(n_matvec, op, gen)
        az = matmat(z)
        samples = (z.double() * az.double()).sum(dim=1)
        value, stderr = _mean_and_stderr(samples)
        return TraceResult(value, stderr, op.n_matvec - before, "hutchinson", samples)
    if method == "hutch++":
        s = n_matvec // 3
        sketch = _rademacher(s, op, gen)
        probes = _rademacher(n_matvec - 2 * s, op, gen)
        a_s = matmat(sketch).double()
        q, _ = torch.linalg.qr(a_s.T)  # (dim, s), float64
        a_q = matmat(q.T.to(op.dtype).contiguous()).double()
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
    a_g = matmat(pg.to(op.dtype)).double()
    samples = (pg * a_g).sum(dim=1)
    mean, stderr = _mean_and_stderr(samples)
    return TraceResult(exact + mean, stderr, op.n_matvec - before, method, samples)


_TRACE_METHODS = {"hutchinson": "hutchinson", "hutch++": "hutch++", "hutchpp": "hutch++",
                  "krylov": "krylov"}
