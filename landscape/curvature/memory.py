"""Memory of curvature measurements: measured peaks, budgets, and a plan that fits a budget.

A Krylov solver's memory is its basis (``dim`` entries per vector kept) plus one product's
(the gradient graph of the probe data, kept alive by a Hessian-vector product's double
backward). :class:`PeakMemory` (:mod:`landscape.curvature._peak`) measures a block's
peak above the memory in use when it began. :func:`plan_eigen` estimates a
``top_eigenvalues`` run before it starts -- the vectors it keeps plus one product's peak,
measured on the whole batch (and on any micro-batch size before a plan chooses it), times
:data:`CPU_MARGIN` on the CPU -- and picks the cheapest way to fit ``memory_budget``: the
whole basis, a host-offloaded basis (CUDA), a thick-restarted basis, micro-batches, or
the first-order product; or refuses with one :class:`~landscape.LandscapeError` line
(docs/curvature.md, "Memory"). :func:`plan_probes` does the same for the estimators that
multiply many independent probes (``hessian_trace``, ``spectral_density``): it picks how
many probes to multiply at once, and for ``spectral_density`` a Lanczos basis of two
vectors per probe when the whole one does not fit. The measured part of a plan is a
:class:`MemoryProfile` (:func:`profile_memory`, :mod:`landscape.curvature._profile`),
which callers measuring repeatedly (the monitor) keep and reuse; this module re-exports
both. A budget is bytes, ``"<f>x step"`` or ``"auto"``: one training step, but never less
than :data:`BUDGET_FLOOR`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Any

from landscape._errors import MemoryBudgetError
from landscape.curvature._peak import PeakMemory
from landscape.curvature._profile import (
    CPU_MARGIN,
    MemoryProfile,
    _first_order_product,
    _is_model_operator,
    _measure_pair,
    _measure_size,
    _microbatchable,
    _vector_bytes,
    agree,
    batch_rows,
    least_rows,
    no_microbatches_note,
    profile_memory,
    with_backend,
    with_microbatches,
)

__all__ = [
    "BUDGET_FLOOR",
    "CPU_MARGIN",
    "POSTHOC_SHARE",
    "MemoryBudgetError",
    "MemoryPlan",
    "MemoryProfile",
    "PeakMemory",
    "agree",
    "apply_plan",
    "batch_rows",
    "least_rows",
    "check_budget",
    "free_memory",
    "parse_budget",
    "plan_eigen",
    "plan_probes",
    "posthoc_budget",
    "profile_memory",
    "with_backend",
]

BUDGET_FLOOR = 256 * 2**20
"""The least ``"auto"`` budget, in bytes (256 MiB): below it memory is never limited.

On a small model one parameter-sized vector can outweigh a whole training step, and the
resident set's noise on the CPU is megabytes; a measurement under this size is allowed
whatever the step's memory.
"""

POSTHOC_SHARE = 0.5
"""The share of the memory free when a post-hoc analysis starts that its measurements may
take by default (:func:`posthoc_budget`)."""


def free_memory(device: Any) -> int | None:
    """Bytes free for new allocations on ``device`` now; None when it cannot be told.

    CUDA: the driver's free memory (``torch.cuda.mem_get_info``). CPU: the kernel's
    estimate of the memory available without swapping (``MemAvailable`` of
    ``/proc/meminfo`` on Linux), else the free physical pages (``os.sysconf``).
    """
    import os

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def posthoc_budget(device: Any) -> float | None:
    """The default budget of a measurement with no training beside it, in bytes.

    ``landscape analyze`` measures checkpoints alone: no training run shares the memory,
    so the training step (the monitor's ``"auto"``) is no limit it needs. Its default is
    :data:`POSTHOC_SHARE` of the memory free on ``device`` when it starts, never less than
    :data:`BUDGET_FLOOR`: a measurement that would exhaust the machine is refused with one
    line, one that fits is not refused for a step it does not share memory with.

    Returns:
        The budget, or None where the free memory cannot be told (MPS, XPU): the caller
        then keeps ``"auto"``.
    """
    free = free_memory(device)
    return None if free is None else max(float(BUDGET_FLOOR), POSTHOC_SHARE * free)


_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*x\s*step\s*$", re.IGNORECASE)


def check_budget(budget: int | float | str | None) -> None:
    """Refuse a malformed budget before anything is measured.

    Args:
        budget: bytes, ``"<f>x step"``, ``"auto"`` or ``None``.

    Raises:
        ValueError: anything else, or a non-positive number.
    """
    if budget is None or (isinstance(budget, str) and budget.strip().lower() == "auto"):
        return
    parse_budget(budget, 1.0)


def parse_budget(budget: int | float | str | None, step_bytes: float | None) -> float | None:
    """A memory budget in bytes: a number of bytes, ``"<f>x step"`` or ``"auto"``.

    Args:
        budget: bytes, ``"1.5x step"`` (a multiple of one training step's peak),
            ``"auto"`` (one step, at least :data:`BUDGET_FLOOR`; the floor alone when the
            step is unknown), or ``None`` (no limit).
        step_bytes: one training step's peak, needed for the ``"x step"`` form.

    Returns:
        The budget in bytes, or ``None``.

    Raises:
        ValueError: a malformed budget, or a non-positive one.
    """
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise ValueError(f"memory_budget: expected bytes, '<f>x step', 'auto' or None, "
                         f"got {budget!r}")
    if isinstance(budget, str) and budget.strip().lower() == "auto":
        step = float(step_bytes) if step_bytes is not None else math.nan
        return max(step, float(BUDGET_FLOOR)) if math.isfinite(step) else float(BUDGET_FLOOR)
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
        step_bytes: one training step's peak (given, or estimated by :func:`profile_memory`).
        product_bytes: one product's peak at the chosen micro-batch size, estimated.
        vector_bytes: bytes of one basis vector.
        vectors: vectors the solver keeps on the device at most (for :func:`plan_probes`,
            the vectors' bytes over ``vector_bytes``, rounded up).
        estimate: the estimated peak: ``product_bytes + vectors * vector_bytes`` for
            :func:`plan_eigen`; the fixed part plus ``probe_batch`` times (a probe's vectors
            and one product) for :func:`plan_probes`.
        microbatch_size: the micro-batch size to use (``None``: unchanged).
        max_basis: the basis bound (thick restart; ``None``: unbounded).
        offload: keep the basis in host memory.
        backend: the product's backend to switch to (``None``: unchanged).
        probe_batch: probes multiplied at once (:func:`plan_probes`; ``None``: unchanged).
        reorthogonalize: ``"local"`` when :func:`plan_probes` chose the estimator's
            bounded basis (``local_probe_bytes``); ``None``: unchanged.
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
    probe_batch: int | None = None
    reorthogonalize: str | None = None


def _limit(
    op: Any, budget: int | float | str, profile: MemoryProfile, what: str
) -> float:
    if isinstance(budget, str) and not math.isfinite(profile.step_bytes):
        if budget.strip().lower() != "auto":
            parse_budget(budget, 1.0)  # a malformed budget says so first
            raise MemoryBudgetError(
                f"memory_budget: {what} on this operator has no training step to compare "
                "with; give the budget in bytes")
    limit = parse_budget(budget, profile.step_bytes)
    assert limit is not None
    return limit


def _profile_for(
    op: Any, budget: int | float | str | None, profile: MemoryProfile | None,
    step_bytes: float | None,
) -> MemoryProfile:
    if profile is not None:
        if step_bytes is not None:
            profile = dataclasses.replace(profile, step_bytes=float(step_bytes))
        return profile
    return profile_memory(op, step_bytes=step_bytes)


def plan_eigen(
    op: Any,
    *,
    budget: int | float | str | None,
    basis_vectors: int,
    least_basis: int,
    extra_vectors: int = 4,
    step_bytes: float | None = None,
    profile: MemoryProfile | None = None,
) -> MemoryPlan:
    """Fit a Lanczos run of ``op`` into ``budget`` before it starts.

    The estimate is ``product + vectors * vector_bytes``: ``vectors`` is the basis
    (``basis_vectors``, or fewer with a thick restart, or ``chunk + 4`` on the device when
    offloaded) plus ``extra_vectors`` (``top_eigenvalues`` counts ``8 + k``: the product,
    its flat copy, the micro-batch sum, the Gram-Schmidt copy, the Ritz vectors; measured
    on ResNet-18, where ``3 + k`` underestimated the peak by a quarter);
    ``product`` is one product's peak (:meth:`MemoryProfile.product`): measured on the
    whole batch by :func:`profile_memory`; a micro-batch size is proposed by the line
    through that and an eighth of the batch, then measured (once per profile, a product
    over all its micro-batches) and chosen only if the measurement still fits; times
    :data:`CPU_MARGIN` on the CPU. In order,
    the first that fits: the whole basis on the device with whole batches; offloaded to
    host memory (CUDA only); a restarted basis of at least 20 vectors; smaller restarted
    bases, down to ``max(least_basis + 2, 4)``, with micro-batches halving down to one
    sample; the first-order product (when the operator has one).

    Args:
        op: the operator (a model operator; others are only checked for their basis).
        budget: bytes, ``"<f>x step"``, ``"auto"`` or ``None`` (no limit: the plan changes
            nothing and nothing is measured).
        basis_vectors: the vectors the unrestarted solver may keep.
        least_basis: the smallest basis the solver can restart with.
        extra_vectors: vectors besides the basis.
        step_bytes: one training step's peak (default: the profile's estimate).
        profile: a :class:`MemoryProfile` of ``op`` measured before (default: measure).

    Returns:
        The plan.

    Raises:
        MemoryBudgetError: nothing fits the budget (one line that says what it needs).
    """
    vbytes = _vector_bytes(op)
    if budget is None:
        return MemoryPlan(None, math.nan, math.nan, vbytes, basis_vectors + extra_vectors,
                          math.nan)
    prof = _profile_for(op, budget, profile, step_bytes)
    limit = _limit(op, budget, prof, "the measurement")
    step, mb = prof.step_bytes, prof.batch

    def plan(size: int | None, vectors: int, **kw: Any) -> MemoryPlan:
        product = prof.product(size) if prof.rows is not None else 0.0
        total = product + vectors * vbytes
        return MemoryPlan(limit, step, product, vbytes, vectors, total,
                          microbatch_size=size if size != mb else None, **kw)

    sizes = [mb] if mb is None or not prof.microbatchable else _halvings(mb)
    least = max(least_basis + 2, 4)
    # a restarted basis of >= 20 vectors costs a few products more; smaller micro-batches
    # cost every product a forward per micro-batch: prefer the first, down to 20 vectors
    def fitting(size: int | None, floor: int) -> MemoryPlan | None:
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
        return None

    for floor in (min(20, basis_vectors), least):
        for size in sizes:
            got = fitting(size, floor)
            # a size the line proposes is measured, then chosen only if it still fits
            if got is not None and _measure_size(op, prof, size):
                got = fitting(size, floor)
            if got is not None:
                return got
    need = plan(sizes[-1], least + extra_vectors, max_basis=least)
    how = f"one product of {_fmt(need.product_bytes)} {_on_batches(sizes[-1])}"
    if prof.rows is not None and _has_first_order(op):
        product = _first_order_product(op, prof)
        fo = MemoryPlan(limit, step, product, vbytes, least + extra_vectors,
                        product + (least + extra_vectors) * vbytes, max_basis=least,
                        backend="first_order")
        if fo.estimate <= limit:
            return fo
        if fo.estimate < need.estimate:
            need, how = fo, f"one first-order product of {_fmt(product)}"
    raise MemoryBudgetError(
        f"memory_budget: the measurement needs at least {_fmt(need.estimate)} "
        f"({least + extra_vectors} vectors of {_fmt(vbytes)} and {how}), "
        f"over the budget of {_fmt(limit)}; raise memory_budget= or select fewer "
        f"parameters (params=){no_microbatches_note(op)}"
    )


def _on_batches(size: int | None) -> str:
    """``"on micro-batches of n"``, or ``"on whole batches"`` for ``None``."""
    return "on whole batches" if size is None else f"on micro-batches of {size}"


def plan_probes(
    op: Any,
    *,
    budget: int | float | str | None,
    n_probes: int,
    fixed_bytes: float,
    probe_bytes: float,
    local_probe_bytes: float | None = None,
    what: str = "the measurement",
    step_bytes: float | None = None,
    profile: MemoryProfile | None = None,
) -> MemoryPlan:
    """Fit an estimator that multiplies ``n_probes`` independent probes into ``budget``.

    The estimate of multiplying ``c`` probes at once is ``fixed_bytes + c * (probe_bytes +
    product)``: ``fixed_bytes`` is what the estimator keeps throughout (a Krylov or sketch
    basis), ``probe_bytes`` the vectors each probe of a batch holds, and ``product`` one
    product's peak at the micro-batch size (:meth:`MemoryProfile.product`: measured, a
    proposed micro-batch size measured before it is chosen, as in :func:`plan_eigen`;
    times :data:`CPU_MARGIN` on the CPU). A batch of ``c >= 2`` products is vmapped: its
    product is :meth:`MemoryProfile.batched`, half of two products measured at once. In
    order, the first that fits: the most probes at once (at most ``n_probes``) with whole
    batches, then with ``local_probe_bytes`` per probe when given (a bounded Lanczos
    basis, ``reorthogonalize="local"``); the same on micro-batches halving down to one
    sample; the first-order product (one measured on the whole batch, at least a step), with
    ``probe_bytes``, then ``local_probe_bytes``.

    Args:
        op: the operator.
        budget: bytes, ``"<f>x step"``, ``"auto"`` or ``None`` (no limit: the plan changes
            nothing and nothing is measured).
        n_probes: the most probes the estimator would multiply at once.
        fixed_bytes: bytes the estimator keeps whatever the batch.
        probe_bytes: bytes each probe of a batch holds besides its product.
        local_probe_bytes: the same with the estimator's bounded basis (``None``: it has
            none, or it is already chosen).
        what: the measurement's name, for the refusal.
        step_bytes: one training step's peak (default: the profile's estimate).
        profile: a :class:`MemoryProfile` of ``op`` measured before (default: measure).

    Returns:
        The plan (``probe_batch`` the probes to multiply at once).

    Raises:
        MemoryBudgetError: not even one probe at a time fits (one line).
    """
    vbytes = _vector_bytes(op)
    n_probes = max(1, int(n_probes))
    if budget is None:
        vectors = math.ceil((fixed_bytes + n_probes * probe_bytes) / vbytes)
        return MemoryPlan(None, math.nan, math.nan, vbytes, vectors, math.nan)
    prof = _profile_for(op, budget, profile, step_bytes)
    limit = _limit(op, budget, prof, what)
    mb = prof.batch
    # (bytes per probe, the plan's reorthogonalize): the full basis first, then the local
    variants = [(probe_bytes, None)]
    if local_probe_bytes is not None and local_probe_bytes < probe_bytes:
        variants.append((local_probe_bytes, "local"))

    def plan(product: float, c: int, per_probe: float, **kw: Any) -> MemoryPlan:
        vectors = math.ceil((fixed_bytes + c * per_probe) / vbytes)
        return MemoryPlan(limit, prof.step_bytes, product, vbytes, vectors,
                          fixed_bytes + c * (per_probe + product), probe_batch=c, **kw)

    def most(product: float, per_probe: float) -> int:
        return min(n_probes, int((limit - fixed_bytes) // (per_probe + product)))

    sizes = [mb] if mb is None or not prof.microbatchable else _halvings(mb)
    for size in sizes:
        for per_probe, basis in variants:
            c = most(prof.product(size), per_probe)
            # a size the line proposes is measured, then chosen only if it still fits; a
            # batch of probes is measured as two products at once (the vmapped path)
            if c >= 1 and _measure_size(op, prof, size):
                c = most(prof.product(size), per_probe)
            if c >= 2 and _measure_pair(op, prof, size):
                c = max(1, most(prof.batched(size), per_probe))
            if c >= 1:
                product = prof.product(size) if c == 1 else prof.batched(size)
                return plan(product, c, per_probe, reorthogonalize=basis,
                            microbatch_size=size if size != mb else None)
    least = prof.product(sizes[-1])
    how = f"one product of {_fmt(least)} {_on_batches(sizes[-1])}"
    if prof.rows is not None and _has_first_order(op) and math.isfinite(prof.step_bytes):
        product = _first_order_product(op, prof)
        for per_probe, basis in variants:
            c = most(product, per_probe)
            if c >= 1:
                return plan(product, c, per_probe, reorthogonalize=basis,
                            backend="first_order")
        if product < least:
            least, how = product, f"one first-order product of {_fmt(product)}"
    lean = variants[-1][0]
    raise MemoryBudgetError(
        f"memory_budget: {what} needs at least {_fmt(fixed_bytes + lean + least)} "
        f"({_fmt(fixed_bytes)} kept, {_fmt(lean)} per probe and {how}), over the "
        f"budget of {_fmt(limit)}; raise memory_budget=, use fewer products (n_matvec=, "
        f"lanczos_steps=) or select fewer parameters (params=){no_microbatches_note(op)}"
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

    A wrapping operator (a preconditioned one) is copied around a planned copy of its
    ``base``.

    Args:
        op: the operator.
        plan: the plan from :func:`plan_eigen` or :func:`plan_probes`.

    Returns:
        The operator to run the solver on.
    """
    if plan.microbatch_size is None and plan.backend is None:
        return op
    if not _is_model_operator(op) and getattr(op, "base", None) is not None:
        new = copy.copy(op)
        new.base = apply_plan(op.base, plan)
        new.n_matvec = 0
        return new
    if plan.microbatch_size is not None:
        if not _microbatchable(op):  # a plan from a hand-made profile, which never looked
            raise MemoryBudgetError(
                f"memory_budget: the plan cuts the batches into micro-batches of "
                f"{plan.microbatch_size}, which this operator cannot take"
                f"{no_microbatches_note(op)}")
        op = with_microbatches(op, plan.microbatch_size)
    if plan.backend is not None:
        op = with_backend(op, plan.backend)
    return op


