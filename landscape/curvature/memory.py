"""Memory of curvature measurements: measured peaks, budgets, and a plan that fits a budget.

A Krylov solver's memory is its basis (``dim`` entries per vector kept) plus one product's
(the gradient graph of the probe data, kept alive by a Hessian-vector product's double
backward). :class:`PeakMemory` measures a block's peak above the memory in use when it
began: ``torch.cuda.max_memory_allocated`` on CUDA, the resident set's high-water mark
(``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs``; Linux
``proc(5)``) on the CPU, where torch's allocator returns large blocks to the system.
:func:`plan_eigen` estimates a ``top_eigenvalues`` run before it starts -- the vectors it
keeps plus one product's peak, measured on the whole batch (and on any micro-batch size
before a plan chooses it), times :data:`CPU_MARGIN` on the CPU -- and picks the cheapest
way to fit ``memory_budget``: the whole
basis, a host-offloaded basis (CUDA), a thick-restarted basis, micro-batches, or the
first-order product; or refuses with one :class:`~landscape.LandscapeError` line
(docs/curvature.md, "Memory"). :func:`plan_probes` does the same for the estimators that
multiply many independent probes (``hessian_trace``, ``spectral_density``): it picks how
many probes to multiply at once, and for ``spectral_density`` a Lanczos basis of two
vectors per probe when the whole one does not fit. The measured part of a plan is a
:class:`MemoryProfile` (:func:`profile_memory`), which callers measuring repeatedly (the
monitor) keep and reuse. A budget is bytes, ``"<f>x step"`` or ``"auto"``: one training
step, but never less than :data:`BUDGET_FLOOR`.
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
    "BUDGET_FLOOR",
    "CPU_MARGIN",
    "MemoryBudgetError",
    "MemoryPlan",
    "MemoryProfile",
    "PeakMemory",
    "agree",
    "apply_plan",
    "batch_rows",
    "check_budget",
    "parse_budget",
    "plan_eigen",
    "plan_probes",
    "profile_memory",
    "with_backend",
]

BUDGET_FLOOR = 256 * 2**20
"""The least ``"auto"`` budget, in bytes (256 MiB): below it memory is never limited.

On a small model one parameter-sized vector can outweigh a whole training step, and the
resident set's noise on the CPU is megabytes; a measurement under this size is allowed
whatever the step's memory.
"""

CPU_MARGIN = 1.5
"""What a product's measured peak is multiplied by on the CPU before it is planned with.

:class:`PeakMemory` reads the resident set there, and a run of many products holds more
of it than the one product :func:`profile_memory` measures: memory a product freed stays
resident in pieces the next one cannot all reuse (glibc's heap), and the measurement
itself varies by a fifth between processes. On a CIFAR-sized CNN (94,762 parameters,
batch 128, docs/curvature.md, "How the estimate is made") runs of 10 to 60 products
peaked at up to 1.43x the first product's measured peak over three processes (1.06x on
micro-batches of 32). On CUDA ``torch.cuda.max_memory_allocated`` counts allocated
bytes, which do not fragment, and no margin is applied (not measured here).
"""

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


@dataclasses.dataclass(frozen=True)
class MemoryProfile:
    """The measured part of a plan: one product's peak against the batch, and the step's.

    A product on ``s`` samples is estimated at ``product_intercept + product_slope * s``
    bytes (:func:`profile_memory`). Keep a profile to plan later measurements of the same
    operator and data without measuring again (the monitor measures once per data source).

    Attributes:
        step_bytes: one training step's peak (NaN: unknown, e.g. an explicit matrix).
        product_intercept: the product's peak at zero samples, in bytes.
        product_slope: its growth per sample, in bytes.
        rows: samples of the largest batch (``None``: not a model operator, or unknown).
        microbatch_size: the operator's micro-batch size when profiled (``None``: none).
        vector_bytes: bytes of one solver vector (:func:`~landscape.curvature.lanczos.
            work_dtype` of the operator's dtype).
        microbatchable: whether plans may cut the batches into micro-batches (not with a
            BatchNorm normalising by batch statistics).
        measured: one product's measured peak by micro-batch size, run as the estimators
            run it (the first product of a fresh copy, over all the batches); filled by
            :func:`profile_memory` (the operator's own batches) and by the planners (a
            micro-batch size they are about to choose), so each size is measured once;
            empty in a hand-made profile, which the planners then never measure.
        margin: the factor :meth:`product` applies to a measured or fitted peak
            (:data:`CPU_MARGIN` on the CPU, 1 on CUDA and for hand-made profiles).
        pairs: the measured peak of two products at once by micro-batch size (the
            vmapped batch of :func:`plan_probes`, which on whole batches does not take
            the cached graph of a single product); filled by :func:`plan_probes`.
        first_order: the measured peak of one first-order product on the whole batch
            (key: :attr:`batch`), filled by the planners when they consider that product;
            until then, and in a hand-made profile, it is estimated as one step.
    """

    step_bytes: float
    product_intercept: float
    product_slope: float
    rows: int | None
    microbatch_size: int | None
    vector_bytes: int
    microbatchable: bool = True
    measured: dict[int, float] = dataclasses.field(default_factory=dict, compare=False)
    margin: float = 1.0
    pairs: dict[int, float] = dataclasses.field(default_factory=dict, compare=False)
    first_order: dict[int, float] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def batch(self) -> int | None:
        """The samples one product runs on now: the micro-batch size, else ``rows``."""
        return self.microbatch_size or self.rows

    def product(self, size: int | None) -> float:
        """The peak of one product on micro-batches of ``size`` samples.

        The fitted line, or the measured peak when one was taken at that size and is
        larger (:attr:`measured`: the whole batch by :func:`profile_memory`, a planned
        micro-batch size by the planners; the line keeps one low reading of the noisy
        resident set from passing a size: measured on a small CNN, micro-batches of 32
        read 14 MB once and 23-42 MB otherwise); times :attr:`margin`.

        Args:
            size: samples per micro-batch (``None``: not a model operator).

        Returns:
            Bytes.
        """
        line = self.product_intercept + self.product_slope * (size or 0)
        if size is not None and size in self.measured:
            return self.margin * max(self.measured[size], line)
        return self.margin * line

    def batched(self, size: int | None) -> float:
        """The peak per product of a batch of two or more products at once.

        Half the measured peak of two products (:attr:`pairs`) times :attr:`margin`, but
        never less than :meth:`product`; :meth:`product` when no pair was measured.

        Args:
            size: samples per micro-batch.

        Returns:
            Bytes.
        """
        one = self.product(size)
        if size is None or size not in self.pairs:
            return one
        return max(one, self.margin * self.pairs[size] / 2)


def batch_rows(op: Any) -> int | None:
    """The number of samples of the largest batch of a model operator.

    Args:
        op: an operator.

    Returns:
        The samples, or ``None`` (not a model operator, or a batch without a sample size).
    """
    from landscape.curvature._batches import leading_size

    op = _model_operator(op)
    if op is None:
        return None
    sizes = []
    for b in op._data.batches:
        first = b if op.closure is not None or op.forward is not None else b[0]
        n = leading_size(first)
        if n is None:
            return None
        sizes.append(n)
    return max(sizes) if sizes else None


_batch_rows = batch_rows


def _is_model_operator(op: Any) -> bool:
    return hasattr(op, "_data") and hasattr(op, "options")


def _model_operator(op: Any) -> Any:
    """The model operator ``op`` is or wraps (a preconditioned operator's ``base``), or None."""
    while not _is_model_operator(op):
        op = getattr(op, "base", None)
        if op is None:
            return None
    return op


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
    new._use_first_order()  # its own engine, on the micro-batches (a copy shares op's)
    new.refresh()
    return new


def _probe_peak(
    op: Any, size: int | None, what: str, whole: bool = False, rows: int = 1
) -> float:
    """Peak of one product (``what="product"``, ``"first_order"``) or one gradient.

    A fresh copy of ``op`` (its own caches: the first product builds the gradient graph,
    the largest of a run's products) multiplies one vector through ``flat_matmat``, the
    path of ``hessian_trace`` and ``spectral_density`` (on micro-batches the vmapped
    ``torch.func`` product, whose peak measured above the autograd product of
    ``top_eigenvalues``). ``size=None``: on the operator's own batches; else on
    micro-batches of ``size`` samples: all of them (``whole=True``, the product a plan
    runs) or only the first (a point of the fitted line). ``rows``: vectors multiplied
    at once (2: the vmapped batch of ``plan_probes``).
    """
    if size is None:
        small = copy.copy(op)
        small.n_matvec = 0
        small._use_first_order()  # its own engine: refresh() resets an engine's state
        small.refresh()
    else:
        small = with_microbatches(op, size)
        if not whole:
            small._data = dataclasses.replace(small._data, batches=small._data.batches[:1],
                                              weights=(1.0,))
    g = torch.Generator().manual_seed(0)
    v = torch.randn(rows, small.dim, generator=g, dtype=torch.float64).to(op.device,
                                                                          op.dtype)
    if what == "first_order":
        small = with_backend(small, "first_order")
    with PeakMemory(op.device) as mem:
        if what in ("product", "first_order"):
            small.flat_matmat(v)
        else:
            small.gradient()
    small.refresh()
    return float(mem.peak)


def _fit(op: Any, what: str, rows: int) -> tuple[float, float]:
    """``(intercept, per-sample slope)`` of a gradient's peak, from m and 2m samples.

    ``m = max(1, rows // 8)``: large enough that the difference of the two peaks stands
    above the resident set's noise, small enough to cost a quarter of a gradient. A model
    that cannot be cut into micro-batches (BatchNorm on batch statistics) is measured
    once on its whole batches: the peak, with no slope.
    """
    if not _microbatchable(op):
        return _probe_peak(op, None, what), 0.0
    m = max(1, rows // 8)
    p1 = _probe_peak(op, m, what)
    if rows < 2 * m:
        return p1, 0.0
    p2 = _probe_peak(op, 2 * m, what)
    slope = max(0.0, (p2 - p1) / m)
    return max(0.0, p1 - slope * m), slope


def _fit_product(op: Any, batch: int) -> tuple[float, float, float]:
    """One product's measured peak on the whole batch, and a line to propose micro-batches.

    Returns ``(intercept, slope, whole)``: ``whole`` measured on the operator's own
    batches, the line through it and one micro-batch of ``batch // 8`` samples. The
    whole-batch product is what a plan without micro-batches runs, so its estimate is a
    measurement, not an extrapolation: on a CIFAR-sized CNN (94,762 parameters, batch
    128) the line through an eighth and a quarter of the batch put it at 269 MB where 355
    to 401 MB were measured (the resident set grows faster than linearly there). The line
    only proposes micro-batch sizes; the planners measure a size before choosing it
    (:func:`_measure_size`).
    """
    whole = _probe_peak(op, None, "product")
    m = max(1, batch // 8)
    if not _microbatchable(op) or m >= batch:
        return whole, 0.0, whole
    p1 = _probe_peak(op, m, "product")
    slope = max(0.0, (whole - p1) / (batch - m))
    return max(0.0, p1 - slope * m), slope, whole


def _microbatchable(op: Any) -> bool:
    from landscape.curvature._batches import check_microbatching

    try:
        check_microbatching(op.model, op.options.eval_mode)
    except ValueError:
        return False
    return True


def _vector_bytes(op: Any) -> int:
    from landscape.curvature.lanczos import work_dtype

    return int(op.dim * torch.empty((), dtype=work_dtype(op.dtype)).element_size())


def profile_memory(op: Any, *, step_bytes: float | None = None) -> MemoryProfile:
    """Measure what a plan needs: one product's peak against the batch, and the step's.

    A model operator (or one wrapping it, like a preconditioned operator) is measured by
    one product on its own batches (the first product of a fresh copy, which builds the
    gradient graph: what a plan without micro-batches runs) and one on a micro-batch of
    an eighth of the batch, which with it fixes a line that proposes micro-batch sizes
    (the planners measure a proposed size before choosing it); unless ``step_bytes`` is
    given, two gradients on an eighth and a quarter of the batch (a model with BatchNorm
    on batch statistics, which cannot be cut, is measured on its whole batches instead).
    In all about one and a half products. One product is taken to hold at least two
    parameter-sized vectors (the gradient and the result). The step is the fitted
    forward/backward peak at the whole batch plus Adam's two moments. Under
    ``torch.distributed`` every rank takes the largest value over the ranks, so all ranks
    plan alike. Other operators measure nothing (a product is counted as its result
    alone).

    Args:
        op: the operator.
        step_bytes: one training step's peak, if known (saves the two gradients).

    Returns:
        The profile.
    """
    vbytes = _vector_bytes(op)
    model_op = _model_operator(op)
    rows = batch_rows(op) if model_op is not None else None
    if model_op is None or rows is None:
        step = float(step_bytes) if step_bytes is not None else math.nan
        return MemoryProfile(step, float(op.dim * _element_size(op.dtype)), 0.0, rows,
                             None, vbytes)
    pbytes = model_op.dim * model_op.parameters[0].element_size()
    batch = model_op.microbatch_size or rows
    pi, ps, whole = _fit_product(model_op, batch)
    # a product holds at least the gradient and its result; a step, the gradient (the
    # resident set misses memory the allocator reuses, which matters on tiny models)
    pi, whole = max(pi, 2.0 * pbytes), max(whole, 2.0 * pbytes)
    if step_bytes is None:  # an Adam step: forward/backward, and two moments
        gi, gs = _fit(model_op, "gradient", rows)
        step_bytes = max(gi, float(pbytes)) + gs * rows + 2.0 * pbytes
    step, pi, ps, whole = agree(model_op, (float(step_bytes), pi, ps, whole))
    margin = CPU_MARGIN if model_op.device.type == "cpu" else 1.0
    return MemoryProfile(step, pi, ps, rows, model_op.microbatch_size, vbytes,
                         _microbatchable(model_op), {batch: whole}, margin)


def _unmeasured(op: Any, prof: MemoryProfile, size: int | None, taken: dict) -> Any:
    """The model operator to measure ``size`` on into ``taken``, or None.

    None when ``size`` is already in ``taken``, the profile was made by hand (nothing
    measured), or there is no model operator or batch to measure.
    """
    if size is None or size in taken or not prof.measured or prof.rows is None:
        return None
    return _model_operator(op)


def _measure_pair(op: Any, prof: MemoryProfile, size: int | None) -> bool:
    """Measure two products at once on micro-batches of ``size`` into ``prof.pairs``, once.

    A batch of probes is vmapped, and on whole batches a single product takes the
    cached gradient graph instead: measured on a small CNN, two probes of a spectral
    density at once peaked 1.8x one product's measured peak (docs/curvature.md).

    Returns:
        Whether a measurement was taken (as :func:`_measure_size`).
    """
    model_op = _unmeasured(op, prof, size, prof.pairs)
    if model_op is None:
        return False
    own = size == prof.batch and model_op.microbatch_size in (None, size)
    peak = _probe_peak(model_op, None if own else size, "product", whole=True, rows=2)
    (peak,) = agree(model_op, (peak,))
    prof.pairs[size] = peak
    return True


def _measure_size(op: Any, prof: MemoryProfile, size: int | None) -> bool:
    """Measure one product on micro-batches of ``size`` into ``prof.measured``, once.

    A plan's micro-batches run one after another, and their peak is not the line's: on
    the CIFAR-sized CNN two micro-batches of 64 peaked 5-25% above one, four of 32 up to
    40% above one (the resident set keeps what a finished micro-batch freed, in pieces the
    next one cannot all reuse). So the planners measure a size before they choose it: one
    product over all the micro-batches, on a copy of the operator.

    A profile without measurements (made by hand) is planned from its line alone.

    Returns:
        Whether a measurement was taken (``False``: already measured, a hand-made
        profile, or nothing to measure).
    """
    model_op = _unmeasured(op, prof, size, prof.measured)
    if model_op is None:
        return False
    peak = _probe_peak(model_op, size, "product", whole=True)
    pbytes = model_op.dim * model_op.parameters[0].element_size()
    (peak,) = agree(model_op, (max(peak, 2.0 * pbytes),))
    prof.measured[size] = peak
    return True


def _first_order_product(op: Any, prof: MemoryProfile) -> float:
    """One first-order product's peak: measured once on the whole batch, times the margin.

    A first-order product holds a step's activations plus its own vectors (the shift,
    the perturbed parameters, two gradients and their difference): on a 9M-parameter
    GPT-2, a plan that counted one step for it saw the run peak 1.2-1.4x its estimate.
    Never less than one step; one step for a hand-made profile (nothing measured).
    """
    step = prof.step_bytes
    model_op = _model_operator(op)
    if not prof.measured or prof.rows is None or model_op is None:
        return step
    key = prof.batch or 0
    if key not in prof.first_order:
        peak = _probe_peak(model_op, None, "first_order")
        (peak,) = agree(model_op, (peak,))
        prof.first_order[key] = peak
    return max(step, prof.margin * prof.first_order[key])


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def agree(op: Any, values: tuple[float, ...]) -> tuple[float, ...]:
    """The largest of ``values`` over the ranks when the operator reduces over them.

    Every decision taken from a rank's own memory reading goes through it: ranks that
    decide differently issue different collectives. ``op`` may wrap the model operator
    (a preconditioned operator); its reduction decides, and an FSDP-sharded one (whose
    backward reduces, not the operator) always agrees with its ranks.
    """
    from landscape import distributed

    model_op = _model_operator(op) or op
    reduce = getattr(model_op, "_reduce", None)
    engine = getattr(model_op, "_first_order", None)
    sharded = engine is not None and engine.sharded
    if not ((reduce is not None and reduce.enabled) or sharded):
        return values
    if not distributed.is_distributed():
        return values
    got = distributed._all_reduce_max(torch.tensor(values, dtype=torch.float64))
    return tuple(float(x) for x in got)


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
    how = f"one product of {_fmt(need.product_bytes)} on micro-batches of " + (
        f"{sizes[-1] or 'whole batches'}")
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
        "parameters (params=)"
    )


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
    how = f"one product of {_fmt(least)} on micro-batches of {sizes[-1] or 'whole batches'}"
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
        "lanczos_steps=) or select fewer parameters (params=)"
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
        op = with_microbatches(op, plan.microbatch_size)
    if plan.backend is not None:
        op = with_backend(op, plan.backend)
    return op


def with_backend(op: Any, backend: str) -> Any:
    """A copy of the model operator ``op`` whose products use ``backend``.

    Args:
        op: a model operator.
        backend: ``"exact"`` or ``"first_order"``.

    Returns:
        The copy (its own caches and product count).
    """
    from landscape.curvature._backend import Backend

    op = copy.copy(op)
    op.options = dataclasses.replace(op.options, backend=backend)
    op._backend = Backend(backend)
    op.n_matvec = 0
    op._use_first_order()  # its own engine (a copy shares the original's, and its state)
    op.refresh()
    return op
