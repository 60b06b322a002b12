"""Memory of curvature measurements: measured peaks, budgets, and a plan that fits a budget.

A Krylov solver's memory is its basis (``dim`` entries per vector kept) plus one product's
(the gradient graph of the probe data, kept alive by a Hessian-vector product's double
backward). :class:`PeakMemory` measures a block's peak above the memory in use when it
began: ``torch.cuda.max_memory_allocated`` on CUDA, the resident set's high-water mark
(``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs``; Linux
``proc(5)``) on the CPU, where torch's allocator returns large blocks to the system.
:func:`plan_eigen` estimates a ``top_eigenvalues`` run before it starts -- the vectors it
keeps plus one product's peak, fitted from products on two small micro-batches and scaled
to the batch -- and picks the cheapest way to fit ``memory_budget``: the whole
basis, a host-offloaded basis (CUDA), a thick-restarted basis, micro-batches, or the
first-order product; or refuses with one :class:`~landscape.LandscapeError` line
(docs/curvature.md, "Memory").
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Any

import torch

from landscape._errors import LandscapeError

__all__ = [
    "MemoryBudgetError",
    "MemoryPlan",
    "PeakMemory",
    "apply_plan",
    "parse_budget",
    "plan_eigen",
]

_ACTIVE: list[PeakMemory] = []


class MemoryBudgetError(LandscapeError, ValueError):
    """A curvature measurement cannot fit the memory budget it was given."""


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _trim() -> None:
    """Return the C heap's free memory to the system (glibc ``malloc_trim``), if any."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _reset_cpu_peak() -> None:
    _trim()  # freed memory the heap kept would otherwise be reused without being counted
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set (proc(5))
    except OSError:
        pass


class PeakMemory:
    """Peak memory of a block above the memory in use when it began, in bytes.

    Use as ``with PeakMemory(device) as mem: ...; mem.peak``. Nested blocks are safe: an
    inner block hands the high-water mark it is about to reset to the blocks around it.

    Args:
        device: where to measure (``None``: the CPU).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.peak = 0
        self._base = 0
        self._seen = 0

    def _mark(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _status_bytes("VmHWM") or 0

    def _now(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return _status_bytes("VmRSS") or 0

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_cpu_peak()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        mark = self._mark()
        for outer in _ACTIVE:
            if outer.device == self.device:
                outer._seen = max(outer._seen, mark)
        self._reset()
        self._base = self._now()
        self._seen = self._base
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        mark = self._mark()
        _ACTIVE.remove(self)
        for outer in _ACTIVE:
            if outer.device == self.device:
                outer._seen = max(outer._seen, mark)
        self.peak = max(0, max(self._seen, mark) - self._base)


_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*x\s*step\s*$", re.IGNORECASE)


def parse_budget(budget: int | float | str | None, step_bytes: float | None) -> float | None:
    """A memory budget in bytes: a number of bytes, or ``"<f>x step"``.

    Args:
        budget: bytes, ``"1.5x step"`` (a multiple of one training step's peak), or ``None``
            (no limit).
        step_bytes: one training step's peak, needed for the ``"x step"`` form.

    Returns:
        The budget in bytes, or ``None``.

    Raises:
        ValueError: a malformed budget, or a non-positive one.
    """
    if budget is None:
        return None
    if isinstance(budget, str):
        m = _BUDGET.match(budget)
        if m is None:
            raise ValueError(f"memory_budget: expected bytes or '<f>x step', got {budget!r}")
        if step_bytes is None:
            raise ValueError("memory_budget: an 'x step' budget needs the step's memory")
        value = float(m.group(1)) * float(step_bytes)
    else:
        value = float(budget)
    if not value > 0:
        raise ValueError(f"memory_budget must be > 0, got {budget!r}")
    return value


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """How a measurement fits its budget, and what it is expected to take.

    Attributes:
        budget: the budget in bytes (``None``: no limit).
        step_bytes: one training step's peak (given, or estimated by :func:`plan_eigen`).
        product_bytes: one product's peak at the chosen micro-batch size, estimated.
        vector_bytes: bytes of one basis vector.
        vectors: vectors the solver keeps on the device at most.
        estimate: the estimated peak, ``product_bytes + vectors * vector_bytes``.
        microbatch_size: the micro-batch size to use (``None``: unchanged).
        max_basis: the basis bound (thick restart; ``None``: unbounded).
        offload: keep the basis in host memory.
        backend: the product's backend to switch to (``None``: unchanged).
    """

    budget: float | None
    step_bytes: float
    product_bytes: float
    vector_bytes: int
    vectors: int
    estimate: float
    microbatch_size: int | None = None
    max_basis: int | None = None
    offload: bool = False
    backend: str | None = None


def _batch_rows(op: Any) -> int | None:
    """The number of samples of the largest batch of a model operator (None: unknown)."""
    from landscape.curvature._batches import leading_size

    sizes = []
    for b in op._data.batches:
        first = b if op.closure is not None or op.forward is not None else b[0]
        n = leading_size(first)
        if n is None:
            return None
        sizes.append(n)
    return max(sizes) if sizes else None


def with_microbatches(op: Any, size: int) -> Any:
    """A copy of the model operator ``op`` over micro-batches of at most ``size`` samples.

    Args:
        op: a :class:`~landscape.curvature.operator.ModelOperator`.
        size: the micro-batch size.

    Returns:
        The copy (same parameters, data, weights and options; its own caches and count).
    """
    from landscape.curvature._batches import ProbeData, check_microbatching, microbatches

    check_microbatching(op.model, op.options.eval_mode)
    closure_mode = op.closure is not None or op.forward is not None
    batches, weights = microbatches(
        list(op._data.batches), list(op._data.weights), int(size),
        closure_mode=closure_mode, batch_size=op.options.batch_size,
    )
    new = copy.copy(op)
    new._data = ProbeData(tuple(batches), tuple(weights), op._data.rank_size, int(size))
    new.options = dataclasses.replace(op.options, microbatch_size=int(size))
    new.n_matvec = 0
    new.refresh()
    return new


def _probe_peak(op: Any, size: int, what: str) -> float:
    """Peak of one product (``what="product"``) or one gradient on one micro-batch."""
    small = with_microbatches(op, size)
    small._data = dataclasses.replace(small._data, batches=small._data.batches[:1],
                                      weights=(1.0,))
    g = torch.Generator().manual_seed(0)
    v = tuple(torch.randn(s, generator=g, dtype=torch.float64).to(op.device, op.dtype)
              for s in op.shapes)
    with PeakMemory(op.device) as mem:
        if what == "product":
            small.matvec(v)
        else:
            small.gradient()
    small.refresh()
    return float(mem.peak)


def _fit(op: Any, what: str, rows: int) -> tuple[float, float]:
    """``(intercept, per-sample slope)`` of a peak, from micro-batches of m and 2m samples.

    ``m = max(1, rows // 8)``: large enough that the difference of the two peaks stands
    above the resident set's noise, small enough to cost a quarter of a product.
    """
    m = max(1, rows // 8)
    p1 = _probe_peak(op, m, what)
    if rows < 2 * m:
        return p1, 0.0
    p2 = _probe_peak(op, 2 * m, what)
    slope = max(0.0, (p2 - p1) / m)
    return max(0.0, p1 - slope * m), slope


def plan_eigen(
    op: Any,
    *,
    budget: int | float | str | None,
    basis_vectors: int,
    least_basis: int,
    extra_vectors: int = 4,
    step_bytes: float | None = None,
) -> MemoryPlan:
    """Fit a Lanczos run of ``op`` into ``budget`` before it starts.

    The estimate is ``product + vectors * vector_bytes``: ``vectors`` is the basis
    (``basis_vectors``, or fewer with a thick restart, or ``chunk + 4`` on the device when
    offloaded) plus ``extra_vectors`` (``top_eigenvalues`` counts ``8 + k``: the product,
    its flat copy, the micro-batch sum, the Gram-Schmidt copy, the Ritz vectors; measured
    on ResNet-18, where ``3 + k`` underestimated the peak by a quarter);
    ``product`` is one product's peak, fitted on micro-batches of ``m`` and ``2m`` samples
    (``m`` an eighth of the batch) and scaled linearly to the micro-batch size. In order,
    the first that fits: the whole basis on the device with whole batches; offloaded to
    host memory (CUDA only); a restarted basis of at least 20 vectors; smaller restarted
    bases, down to ``max(least_basis + 2, 4)``, with micro-batches halving down to one
    sample; the first-order product (when the operator has one).

    Args:
        op: the operator (a model operator; others are only checked for their basis).
        budget: bytes, ``"<f>x step"`` or ``None`` (no limit: the plan changes nothing).
        basis_vectors: the vectors the unrestarted solver may keep.
        least_basis: the smallest basis the solver can restart with.
        extra_vectors: vectors besides the basis.
        step_bytes: one training step's peak (default: the peak of a forward/backward on
            the probe data, estimated the same way, plus Adam's two moments).

    Returns:
        The plan.

    Raises:
        MemoryBudgetError: nothing fits the budget (one line that says what it needs).
    """
    from landscape.curvature.lanczos import work_dtype

    vbytes = op.dim * torch.empty((), dtype=work_dtype(op.dtype)).element_size()
    model_op = hasattr(op, "_data") and hasattr(op, "options")
    rows = _batch_rows(op) if model_op else None
    if budget is None:
        return MemoryPlan(None, math.nan, math.nan, vbytes, basis_vectors + extra_vectors,
                          math.nan)
    if model_op and rows is not None:
        pbytes = op.dim * op.parameters[0].element_size()
        pi, ps = _fit(op, "product", rows)
        # a product holds at least the gradient and its result; a step, the gradient (the
        # resident set misses memory the allocator reuses, which matters on tiny models)
        pi = max(pi, 2.0 * pbytes)
        mb = op.microbatch_size or rows
        if step_bytes is None:  # an Adam step: forward/backward, and two moments
            gi, gs = _fit(op, "gradient", rows)
            step_bytes = max(gi, float(pbytes)) + gs * rows + 2.0 * pbytes
    else:
        pi, ps, mb = 0.0, 0.0, None
        if step_bytes is None and isinstance(budget, str):
            raise MemoryBudgetError(
                "memory_budget: this operator has no training step to compare with; give "
                "the budget in bytes")
    limit = parse_budget(budget, step_bytes)
    assert limit is not None
    step = float(step_bytes) if step_bytes is not None else math.nan

    def plan(size: int | None, vectors: int, **kw: Any) -> MemoryPlan:
        product = pi + ps * (size if size is not None else 0)
        total = product + vectors * vbytes
        return MemoryPlan(limit, step, product, vbytes, vectors, total,
                          microbatch_size=size if size != mb else None, **kw)

    sizes = [mb] if mb is None else _halvings(mb)
    least = max(least_basis + 2, 4)
    # a restarted basis of >= 20 vectors costs a few products more; smaller micro-batches
    # cost every product a forward per micro-batch: prefer the first, down to 20 vectors
    for floor in (min(20, basis_vectors), least):
        for size in sizes:
            full = plan(size, basis_vectors + extra_vectors)
            if full.estimate <= limit:
                return full
            if op.device.type == "cuda":
                off = plan(size, 8 + extra_vectors, offload=True)
                if off.estimate <= limit:
                    return off
            fit = int((limit - full.product_bytes) // vbytes) - extra_vectors
            if fit >= max(floor, least):
                bound = min(fit, basis_vectors)
                return plan(size, bound + extra_vectors, max_basis=bound)
    if model_op and rows is not None and _has_first_order(op):
        fo = MemoryPlan(limit, step, step, vbytes, least + extra_vectors,
                        step + (least + extra_vectors) * vbytes, max_basis=least,
                        backend="first_order")
        if fo.estimate <= limit:
            return fo
    need = plan(sizes[-1], least + extra_vectors, max_basis=least)
    raise MemoryBudgetError(
        f"memory_budget: the measurement needs at least {_fmt(need.estimate)} "
        f"({least + extra_vectors} vectors of {_fmt(vbytes)} and one product of "
        f"{_fmt(need.product_bytes)} on micro-batches of {sizes[-1] or 'whole batches'}), "
        f"over the budget of {_fmt(limit)}; raise memory_budget= or select fewer "
        "parameters (params=)"
    )


def _halvings(n: int) -> list[int]:
    out = [int(n)]
    while out[-1] > 1:
        out.append(max(1, out[-1] // 2))
    return out


def _has_first_order(op: Any) -> bool:
    from landscape.curvature import _backend

    return "first_order" in getattr(_backend, "BACKENDS", ())


def _fmt(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(nbytes) < 1024 or unit == "GB":
            return f"{nbytes:.3g} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.3g} GB"


def apply_plan(op: Any, plan: MemoryPlan) -> Any:
    """The operator the plan asks for: ``op`` itself, or a copy with micro-batches/backend.

    Args:
        op: the operator.
        plan: the plan from :func:`plan_eigen`.

    Returns:
        The operator to run the solver on.
    """
    if plan.microbatch_size is not None:
        op = with_microbatches(op, plan.microbatch_size)
    if plan.backend is not None:
        from landscape.curvature._backend import Backend

        op = copy.copy(op)
        op.options = dataclasses.replace(op.options, backend=plan.backend)
        op._backend = Backend(plan.backend)
        op.n_matvec = 0
        op.refresh()
    return op
