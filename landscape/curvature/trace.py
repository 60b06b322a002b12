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

from landscape._checks import positive_int
from landscape._progress import products_bar
from landscape.curvature._probes import generator as _generator
from landscape.curvature._probes import rademacher as _rademacher
from landscape.curvature.base import CurvatureOperator, check_operator
from landscape.curvature.lanczos import finite_product, krylov_basis
from landscape.curvature.memory import (
    BUDGET_FLOOR,
    MemoryProfile,
    PeakMemory,
    agree,
    apply_plan,
    check_budget,
    plan_probes,
)
from landscape.isolation import without_autocast

__all__ = ["TraceResult", "hessian_trace", "trace_memory", "trace_method"]


# ------------------------------------------------------------------------------------------
# trace
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TraceResult:
    """A stochastic estimate of the trace of a curvature operator.

    Attributes:
        value: the estimate (``float(result)`` gives it too).
        stderr: its standard error (NaN when it cannot be estimated). ``value ± 1.96 stderr``
            is a normal-theory interval, too narrow for a few probes: :meth:`interval`.
        n_matvec: the products used.
        method: ``"hutchinson"``, ``"hutch++"`` or ``"krylov"``.
        samples: the per-probe quadratic forms of the stochastic part.
        peak_memory: the measured peak above the memory in use when the estimate began,
            in bytes (:class:`~landscape.curvature.memory.PeakMemory`).
        probe_batch: the most probes multiplied at once.
        memory_plan: the :class:`~landscape.curvature.memory.MemoryPlan` followed when a
            ``memory_budget`` was given.
    """

    value: float
    stderr: float
    n_matvec: int
    method: str = "hutch++"
    samples: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    peak_memory: int | None = None
    probe_batch: int | None = None
    memory_plan: Any = None

    def __float__(self) -> float:
        return float(self.value)

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """A Student-t confidence interval for the trace: ``value ± t·stderr``.

        ``t`` is the two-sided quantile of Student's t with ``len(samples) - 1`` degrees
        of freedom (Student 1908): ``stderr`` comes from that many probes' quadratic forms
        (all of them for Hutchinson, the projected ones for Hutch++ and Krylov), whose
        sample standard deviation is itself uncertain. With a few probes the normal
        quantile 1.96 covers too little (docs/curvature.md, "Error bars").

        Args:
            confidence: the coverage asked for, in (0, 1).

        Returns:
            ``(low, high)``; ``(nan, nan)`` with fewer than two probes.
        """
        if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
            raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
        n = 0 if self.samples is None else self.samples.numel()
        if n < 2 or not math.isfinite(self.stderr):
            return math.nan, math.nan
        from scipy import stats

        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * self.stderr
        return self.value - half, self.value + half

    def as_dict(self) -> dict[str, Any]:
        """Plain Python numbers: value, stderr, n_matvec, method, peak_memory."""
        return {"value": self.value, "stderr": self.stderr, "n_matvec": self.n_matvec,
                "method": self.method, "peak_memory": self.peak_memory}


def _mean_and_stderr(samples: torch.Tensor) -> tuple[float, float]:
    n = samples.numel()
    mean = float(samples.mean())
    if n < 2:
        return mean, math.nan
    return mean, float(samples.std(unbiased=True)) / math.sqrt(n)


def trace_method(method: object) -> str:
    """``method``'s canonical name (``"hutch++"`` for ``"hutchpp"``, ...).

    Raises:
        ValueError: no trace method of :func:`hessian_trace`.
    """
    name = _TRACE_METHODS.get(method.lower().replace("_", "").replace("-", "")) \
        if isinstance(method, str) else None
    if name is None:
        raise ValueError(
            f"method must be one of {', '.join(sorted(set(_TRACE_METHODS.values())))}, got "
            f"{method!r}" + (" (the probe count is n_matvec=)" if isinstance(method, int)
                             and not isinstance(method, bool) else ""))
    return name


@without_autocast
def hessian_trace(
    op: CurvatureOperator,
    method: str = "krylov",
    n_matvec: int = 60,
    *,
    seed: int = 0,
    probe_batch: int | None = None,
    memory_budget: int | float | str | None = None,
    memory_profile: MemoryProfile | None = None,
    progress: bool = True,
) -> TraceResult:
    """Stochastic estimate of ``tr(op)`` from ``n_matvec`` products (fewer on a tiny operator).

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
    check it is a valid error bar over seeds. Requires ``n_matvec >= 3``. On an operator
    of fewer than ``s`` dimensions ``Q`` has only ``dim`` columns and ``tr(Q^T A Q)`` is
    the exact trace, from fewer products than ``n_matvec`` (the result's ``n_matvec``
    says how many).

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

    Probes are drawn, projected and multiplied a batch at a time (a batch of ``c`` probes
    holds up to ``c`` products' memory); the batch size changes the rounding of the
    products, never the estimate's probes. By default the first probe is multiplied
    alone and its measured peak ``p`` sizes the batches: as many probes as fit in
    ``max(p, BUDGET_FLOOR)`` (256 MiB; docs/curvature.md, "Memory"), so a large model
    multiplies its probes one at a time and a small one all at once.

    Args:
        op: the operator.
        method: ``"krylov"``, ``"hutch++"`` (or ``"hutchpp"``) or ``"hutchinson"``.
        n_matvec: the budget of products, all spent.
        seed: the seed of the probes.
        probe_batch: multiply at most this many probes at once; ``None``: sized from the
            first product's measured peak (above).
        memory_budget: the most memory the estimate may take above what is in use: bytes,
            ``"<f>x step"`` or ``"auto"`` (:func:`~landscape.curvature.memory.parse_budget`);
            :func:`~landscape.curvature.memory.plan_probes` then picks the probe batch,
            micro-batches or the first-order product before the run, or raises.
            ``None``: no limit.
        memory_profile: a :class:`~landscape.curvature.memory.MemoryProfile` of ``op``
            measured before, reused by the plan (default: measured when a budget is given).
        progress: a bar of the products on stderr, drawn once the run has lasted 2 seconds.

    Returns:
        The estimate, its standard error and the per-probe samples.

    Raises:
        ValueError: an unknown method, or a budget below the method's least.
        MemoryBudgetError: nothing fits ``memory_budget`` (a ``LandscapeError``, one line).

    Example:
        >>> import torch
        >>> from landscape.curvature import MatrixOperator, hessian_trace
        >>> op = MatrixOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> round(hessian_trace(op, "krylov", n_matvec=30).value, 6)  # Krylov space exact
        55.0
    """
    check_operator(op)
    method = trace_method(method)
    least = {"hutchinson": 1, "hutch++": 3, "krylov": 2}[method]
    n_matvec = positive_int("n_matvec", n_matvec)
    if n_matvec < least:
        raise ValueError(f"n_matvec must be >= {least} for {method}, got {n_matvec}")
    if probe_batch is not None:
        probe_batch = positive_int("probe_batch", probe_batch)
    check_budget(memory_budget)
    plan = None
    run_op = op
    if memory_budget is not None:
        fixed, per_probe, batched = trace_memory(op, method, n_matvec)
        plan = plan_probes(op, budget=memory_budget, n_probes=batched, fixed_bytes=fixed,
                           probe_bytes=per_probe, what=f"hessian_trace ({method})",
                           profile=memory_profile)
        run_op = apply_plan(op, plan)
        probe_batch = min(probe_batch or n_matvec, plan.probe_batch or n_matvec)
    mult = _Multiplier(run_op, probe_batch)
    bars = products_bar(run_op, total=n_matvec, desc=f"hessian_trace ({method})",
                        enabled=progress)
    with bars, PeakMemory(op.device) as mem:
        result = _estimate(run_op, method, n_matvec, seed, mult)
    if run_op is not op:
        op.n_matvec += result.n_matvec
    return dataclasses.replace(result, peak_memory=mem.peak, probe_batch=mult.largest,
                               memory_plan=plan)


def trace_memory(op: CurvatureOperator, method: str, n_matvec: int) -> tuple[int, int, int]:
    """What :func:`hessian_trace` keeps, in bytes: ``(fixed, per probe, most probes)``.

    ``fixed``: the Krylov basis (``n_matvec // 2`` vectors in the solver's dtype and a
    float64 copy) or Hutch++'s sketch (the probes, their products, the float64
    orthonormal basis and the QR's copy); ``per probe``: a float64 projected probe, its
    product in float64 and their elementwise product, plus the probe and its product in
    the operator's dtype; ``most probes``: the largest batch the method multiplies at once.

    Args:
        op: the operator.
        method: ``"krylov"``, ``"hutch++"`` or ``"hutchinson"`` (canonical names).
        n_matvec: the products.

    Returns:
        ``(fixed_bytes, probe_bytes, n_probes)``.
    """
    from landscape.curvature.lanczos import work_dtype

    e = torch.empty((), dtype=op.dtype).element_size()
    w = torch.empty((), dtype=work_dtype(op.dtype)).element_size()
    per_probe = op.dim * (24 + 2 * e)
    if method == "hutchinson":
        return 0, per_probe, n_matvec
    if method == "hutch++":
        s = n_matvec // 3
        return op.dim * s * (24 + 2 * e), per_probe, max(s, n_matvec - 2 * s)
    m1 = n_matvec // 2
    return op.dim * m1 * (8 + (w if w != 8 else 0)), per_probe, n_matvec - m1


class _Multiplier:
    """Multiplies rows of probes in batches of ``size``, or sized from the first product.

    With ``size=None`` the first row is multiplied alone under
    :class:`~landscape.curvature.memory.PeakMemory`; its peak ``p`` (the largest over the
    ranks of a distributed operator, so that all ranks batch alike) gives the size
    ``max(p, BUDGET_FLOOR) // p``.
    """

    def __init__(self, op: CurvatureOperator, size: int | None) -> None:
        self.op = op
        self.size = size
        self.largest = 0

    def chunk(self, remaining: int) -> int:
        """How many probes to draw next (one before the batch size is known)."""
        return min(remaining, self.size or 1)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """The products of the rows of ``rows``, a batch at a time."""
        out = []
        i, n = 0, rows.shape[0]
        while i < n:
            if self.size is None:
                with PeakMemory(self.op.device) as mem:
                    out.append(self.op.flat_matmat(rows[i : i + 1]))
                (peak,) = agree(self.op, (float(mem.peak),))
                self.size = max(1, int(max(peak, BUDGET_FLOOR) // max(peak, 1)))
                self.largest = max(self.largest, 1)
                i += 1
                continue
            part = rows[i : i + self.size]
            out.append(self.op.flat_matmat(part))
            self.largest = max(self.largest, part.shape[0])
            i += part.shape[0]
        products = out[0] if len(out) == 1 else torch.cat(out)
        # one read-back: NaN or inf in any product raises the solvers' one clear error
        # (a NaN trace otherwise, or a QR that fails deep inside LAPACK for hutch++)
        finite_product(float(torch.linalg.vector_norm(products, math.inf))
                       if products.numel() else 0.0)  # (no copy of the block)
        return products


def _stochastic(
    op: CurvatureOperator, mult: _Multiplier, gen: torch.Generator, n: int,
    basis: torch.Tensor | None,
) -> torch.Tensor:
    """The quadratic forms of ``n`` Rademacher probes (projected off ``basis``), streamed."""
    samples = []
    done = 0
    while done < n:
        z = _rademacher(mult.chunk(n - done), op, gen)
        done += z.shape[0]
        if basis is None:
            az = mult(z)
            samples.append((z.double() * az.double()).sum(dim=1))
            continue
        pg = z.double()
        del z
        pg.sub_((pg @ basis.T) @ basis)
        a_g = mult(pg.to(op.dtype)).double()
        samples.append((pg * a_g).sum(dim=1))
    return samples[0] if len(samples) == 1 else torch.cat(samples)


def _estimate(
    op: CurvatureOperator, method: str, n_matvec: int, seed: int, mult: _Multiplier
) -> TraceResult:
    before = op.n_matvec
    gen = _generator(seed)
    if method == "hutchinson":
        samples = _stochastic(op, mult, gen, n_matvec, None)
        value, stderr = _mean_and_stderr(samples)
        return TraceResult(value, stderr, op.n_matvec - before, "hutchinson", samples)
    if method == "hutch++":
        s = n_matvec // 3
        sketch = _rademacher(s, op, gen)
        a_s = mult(sketch).double()
        del sketch
        q, _ = torch.linalg.qr(a_s.T)  # (dim, s), float64
        del a_s
        a_q = mult(q.T.to(op.dtype).contiguous()).double()
        exact = float((q * a_q.T).sum())
        del a_q
        basis = q.T
        n_probes = n_matvec - 2 * s
    else:  # krylov: Lanczos basis from one random start, exact trace on its span
        start = _rademacher(1, op, gen)[0]
        rows, alphas, used = krylov_basis(op.flat_matvec, start, n_matvec // 2)
        exact = float(alphas.sum())
        basis = rows.double()
        del rows
        n_probes = n_matvec - used
    samples = _stochastic(op, mult, gen, n_probes, basis)
    mean, stderr = _mean_and_stderr(samples)
    return TraceResult(exact + mean, stderr, op.n_matvec - before, method, samples)


_TRACE_METHODS = {"hutchinson": "hutchinson", "hutch++": "hutch++", "hutchpp": "hutch++",
                  "krylov": "krylov"}
