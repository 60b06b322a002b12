"""Memory profiles of a curvature operator: one product's measured peak, and the step's.

:func:`profile_memory` measures what the planners of :mod:`landscape.curvature.memory`
need before a run: one product on the operator's own batches, one on a micro-batch of an
eighth of them (a line that proposes micro-batch sizes) and, unless given, a training
step's peak. The :class:`MemoryProfile` keeps them, and what the planners measure later
(a micro-batch size before choosing it, two products at once, one first-order product),
so that a measurement repeated on the same data (the monitor's) measures nothing again.
Copies of an operator on micro-batches or another backend (:func:`with_microbatches`,
:func:`with_backend`) are what plans run and what is measured.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch

from landscape.curvature._peak import PeakMemory
from landscape.distributed import raise_together, together

__all__ = [
    "CPU_MARGIN", "MemoryProfile", "agree", "batch_rows", "profile_memory", "with_backend",
    "with_microbatches",
]


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
    from landscape.curvature._batches import samples_in

    op = _model_operator(op)
    if op is None:
        return None
    sizes = []
    for b in op._data.batches:
        n = samples_in(b, op.closure is not None or op.forward is not None)
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

    check_microbatching(op.model, op.options.eval_mode, op.options.batch_statistics)
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
    small._first_order._kinks_warned = True  # a memory probe: its product is not a result
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


def _fit_product(op: Any, batch: int, own: int | None = None) -> tuple[float, float, float]:
    """One product's measured peak on the whole batch, and a line to propose micro-batches.

    Returns ``(intercept, slope, whole)``: ``whole`` measured on the operator's own
    batches (``own`` samples; default ``batch``), the line through it and one micro-batch
    of ``batch // 8`` samples. The
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
    # ``whole`` was measured on this rank's own samples (``own``; ``batch``, the fewest any
    # rank holds, sets m alike on every rank)
    # (a rank holding m samples or fewer, one sample beside the others' eight: no span to
    # fit, and its ZeroDivisionError left the other ranks in the profile's all-reduce)
    span = (own or batch) - m
    slope = max(0.0, (whole - p1) / span) if span > 0 else 0.0
    return max(0.0, p1 - slope * m), slope, whole


def _microbatchable(op: Any) -> bool:
    """Whether plans may cut ``op``'s batches into micro-batches.

    Not with a BatchNorm on batch statistics, nor when the losses do not add up over
    micro-batches of an eighth of the batch (:func:`check_losses_add_up`; decided once per
    operator: it costs a few no-grad forward passes over a quarter of the first batch).
    """
    from landscape.curvature._batches import check_microbatching

    known = op.__dict__.get("_losses_add_up")
    if known is not None:
        return known
    try:
        check_microbatching(op.model, op.options.eval_mode, op.options.batch_statistics)
        rows = batch_rows(op)
        rows = least_rows(op, rows) if rows is not None else None
        size = max(1, (rows or 1) // 8)
        if rows is not None and size < rows:
            check_losses_add_up(op, op._data.batches[0], size)
    except ValueError as err:
        op._losses_add_up = False
        op._no_microbatches = str(err)  # said when a budget cannot be met without them
        return False
    op._losses_add_up = True
    return True


def no_microbatches_note(op: Any) -> str:
    """Why a plan could not cut ``op``'s batches, as a clause for an error (or ``""``)."""
    model_op = _model_operator(op)
    why = None if model_op is None else model_op.__dict__.get("_no_microbatches")
    return "" if why is None else f" (no micro-batches here: {why})"


def _eval_loss(op: Any, values: list[torch.Tensor] | None = None,
               data: Any = None, *, local: bool = False) -> float:
    """``L`` over a model operator's data, in eval mode, without gradients.

    At the parameters, or at ``values`` (one tensor per selected parameter, evaluated
    through ``functional_call``: the parameters are not written). On a copy of ``op`` with
    its own first-order engine (its no-grad loss,
    :class:`~landscape.curvature._first_order.FirstOrder`); the model is left as it was.
    ``local``: this rank's loss, not reduced over the ranks (an unsharded model only).
    """
    from landscape.curvature._reduction import RankReduction

    probe = copy.copy(op)
    probe.options = dataclasses.replace(op.options, eval_mode=True)
    if data is not None:
        probe._data = data
    if values is not None:
        probe._param_objects = values
    probe._use_first_order()
    if local:
        probe._reduce = RankReduction(False, probe._data.rank_size)
    probe.refresh()
    return probe._first_order._loss_at_theta()


def check_losses_add_up(op: Any, batch: Any, size: int) -> None:
    """Refuse micro-batches whose weighted losses do not add up to the batches' loss.

    Micro-batches weighted by their sample counts (or by an additive ``batch_size``)
    give the batches' operator only when each batch's loss is the mean of its samples'
    losses (docs/curvature.md, "Micro-batches"). A summed loss, or a mean over tokens
    whose count differs from sample to sample without a ``batch_size`` counting them,
    gives another operator, silently (a padded language-model batch: λ_max 1.2 % off; a
    summed loss: the Hessian 63 % off). The weighted losses are compared at the
    parameters and at a random point near them (each tensor moved by Gaussian noise of
    its own root-mean-square size, through ``functional_call``): at initialisation every
    token's loss is close to log(vocabulary), and a wrong weighting hardly shows in the
    loss there. On a bounded sample, the first batch's first two micro-batches as one
    batch and cut (never the whole-batch forward that micro-batches exist to avoid), in
    eval mode, without gradients (dropout would make the two differ by chance; a
    BatchNorm on batch statistics is refused before); a model whose eval-mode forward
    this loss cannot take is not checked. The tolerance is relative 1e-4, or four units
    of the parameters' precision for 16-bit models. Under a process group each rank checks
    its own batch (an unsharded model: no reduction, so a forward that fails on one rank
    leaves no other waiting) and a mismatch on any rank raises on every rank
    (:func:`landscape.distributed.raise_together`); an FSDP2-sharded model's forward is
    collective, and its losses are the ranks' together.

    Args:
        op: the model operator (its model, loss, options; its data are not read).
        batch: a whole batch of it (the first).
        size: the micro-batch size.

    Raises:
        ValueError: the losses differ beyond rounding.
    """
    collective = bool(op.options.distributed)  # every rank runs this check together
    one, parts = together(collective, "cutting the probe data for the micro-batch check",
                          _check_sample, op, batch, size)
    local = collective and not op._first_order.sharded
    error: ValueError | None = None
    try:
        _compare_losses(op, one, parts, local)
    except ValueError as err:
        error = err
    if local:
        raise_together(error, "checking that the micro-batches' losses add up")
    elif error is not None:
        raise error


def _check_sample(op: Any, batch: Any, size: int) -> tuple[Any, Any]:
    """The check's sample: the batch's leading two micro-batches, as one batch and cut.

    Bounded: the check must not run the whole-batch forward that micro-batches exist to
    avoid.
    """
    from landscape.curvature._batches import ProbeData, microbatches

    closure_mode = op.closure is not None or op.forward is not None
    sizer = op.options.batch_size
    head = microbatches([batch], [1.0], 2 * size, closure_mode=closure_mode,
                        batch_size=sizer)[0][:1]
    cut, cut_w = microbatches(head, [1.0], size, closure_mode=closure_mode, batch_size=sizer)
    one = ProbeData(tuple(head), (1.0,), op._data.rank_size, None)
    parts = ProbeData(tuple(cut), tuple(cut_w), op._data.rank_size, size)
    return one, parts


def _compare_losses(op: Any, one: Any, parts: Any, local: bool) -> None:
    """:func:`check_losses_add_up`'s comparison on this rank (``local``) or on all ranks."""
    sizer = op.options.batch_size
    try:
        pairs = [(_eval_loss(op, data=one, local=local),
                  _eval_loss(op, data=parts, local=local))]
        if not op._first_order.sharded:  # FSDP2 shards are evaluated in place: not moved
            gen = torch.Generator().manual_seed(0)
            moved = []
            for p in op._param_objects:
                p = p.detach()
                rms = float(p.double().pow(2).mean().sqrt()) if p.numel() else 0.0
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                moved.append(p + (noise * (rms or 0.02)).to(p.device, p.dtype))
            pairs.append((_eval_loss(op, moved, one, local=local),
                          _eval_loss(op, moved, parts, local=local)))
            del moved
    except Exception:  # an eval-mode forward this loss cannot take (train-mode-only models):
        return  # nothing to compare; the operator's own evaluations say what is wrong
    # rounding: relative 1e-4, or a few units of the parameters' precision (16-bit models)
    tol = max(1e-4, 4 * torch.finfo(op.dtype).eps)
    for full, parts in pairs:
        if math.isfinite(full) and not math.isclose(full, parts, rel_tol=tol, abs_tol=1e-9):
            weights = "a batch_size= count" if sizer is not None else "their samples"
            raise ValueError(
                f"microbatch_size: the micro-batches' losses weighted by {weights} give "
                f"{parts:.6g} where the whole batches give {full:.6g}: the loss is not a "
                "mean over what the weights count (a summed loss, or a mean over tokens); "
                "pass batch_size= counting what the loss averages over (e.g. the valid "
                "tokens), or no micro-batches"
            )


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
    ``torch.distributed`` every rank takes the largest value over the ranks, and which
    measurements run follows the fewest samples any rank holds (:func:`least_rows`), so
    all ranks measure and plan alike. Other operators measure nothing (a product is
    counted as its result alone).

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
    own_rows, rows = rows, least_rows(model_op, rows)  # plans alike on every rank
    batch = model_op.microbatch_size or rows
    # the whole-batch product runs micro-batches of at most microbatch_size of own_rows
    pi, ps, whole = _fit_product(model_op, batch, min(model_op.microbatch_size or own_rows,
                                                      own_rows))
    # a product holds at least the gradient and its result; a step, the gradient (the
    # resident set misses memory the allocator reuses, which matters on tiny models)
    pi, whole = max(pi, 2.0 * pbytes), max(whole, 2.0 * pbytes)
    if step_bytes is None:  # an Adam step: forward/backward, and two moments
        gi, gs = _fit(model_op, "gradient", rows)
        step_bytes = max(gi, float(pbytes)) + gs * own_rows + 2.0 * pbytes
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


def least_rows(op: Any, rows: int) -> int:
    """The fewest samples any rank's batches hold, when the operator reduces over them.

    The profile's choices that run collectives (a second measured point, the micro-batch
    check) are taken from it, so every rank takes them: a rank holding one sample (a
    1-sample shard of a probe, a short last batch) skipped a product and a check the others
    ran, and the job hung in them.
    """
    return int(-agree(op, (-float(rows),))[0])


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
