"""Cheap per-step training signals.

The loss, the gradient norm, non-finite flags, the update, logit growth and the Taylor radius
of the optimizer's actual step; definitions in docs/metrics.md.
"""

from __future__ import annotations

import collections
import copy
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from landscape import distributed as _dist
from landscape import functional as LF
from landscape._checks import integer_dtype
from landscape._deprecation import module_getattr
from landscape._errors import MissingInput
from landscape.batches import leading_size, model_call
from landscape.isolation import warnings_ignored
from landscape.metrics.base import Metric, register
from landscape.metrics.batch_parts import (
    batch_targets,
    classes_last,
    ids_and_labels,
    ignored_past_classes,
    keyword_batch,
    softmax_logits,
    split_batch,
    whole_dict_call,
    without_labels,
)
from landscape.metrics.context import StepContext
from landscape.params import norm, read_floats
from landscape.schedules import every

__all__ = [
    "GradNorm",
    "Logits",
    "Loss",
    "NonFinite",
    "TaylorRadius",
    "Update",
    "logit_row",
    "radius_along",
]


@register
class Loss(Metric):
    """The training loss the user passed to ``step(loss=...)`` (no recomputation).

    Fields: ``value``, the loss; ``samples``, the number of samples behind it:
    ``step(samples=...)`` when given (the Hugging Face and Lightning callbacks count every
    micro-batch of an accumulated step), else the leading size of ``step(batch=...)``
    (summed over a list of batches; NaN without one), which tells
    :class:`~landscape.alarms.LossSpike` how far one hard sample can move the mean.
    ``trimmed``: the mean of the batch's per-sample losses without its largest ``trim``
    share (5 %, at least one sample: Tukey's trimmed mean, upper side only), which tells
    :class:`~landscape.alarms.LossSpike` whether a few samples made the rise rather than
    the batch as a whole (a squared error under heavy-tailed noise has no bound, and one
    or two samples of a batch of 64 can lift its mean tenfold). It is measured from
    ``step(outputs=...)`` (no forward pass) on a row above every one of the last
    ``recent`` losses but the previous one (the only rows the rule's one-row test can
    warn on with its default settings; ``recent`` = 50, the rule's default window), for
    a ``loss_fn`` that is one of torch's losses at ``reduction="mean"`` (``F.mse_loss``,
    ``F.cross_entropy``, ``nn.CrossEntropyLoss(label_smoothing=0.1)``, ...; evaluated
    with ``reduction="none"``: the user's own function is never called, as it may keep
    state), and only where the per-sample losses reproduce the loss passed (their mean
    within 1e-3 of it); NaN elsewhere, and on a batch of fewer than 3 samples or a list
    of batches.
    ``samples`` and ``trimmed`` are context fields (``CONTEXT_FIELDS``): left out of the
    default plots and mirrors. Run files written before them have no such columns;
    resumed, their earlier rows read NaN.
    """

    name = "loss"
    FIELDS = ("value", "samples", "trimmed")
    CONTEXT_FIELDS = ("samples", "trimmed")
    default_data = "batch"
    #: how many of the latest losses a row must top for ``trimmed`` to be measured
    recent = 50
    #: the share of the batch's largest per-sample losses ``trimmed`` leaves out
    trim = 0.05

    def compute(self, ctx: StepContext) -> dict[str, float]:
        """The loss as a float (the mean of a non-scalar tensor) and the batch's samples.

        Raises:
            MissingInput: the step has no loss, with the monitor's ``no_loss_reason`` (a
                row of NaN the rules do not read: a NaN loss would be a non-finite one).
        """
        if ctx.loss is None:
            raise MissingInput(ctx.no_loss_reason)
        value = ctx.loss_value()
        trimmed = math.nan
        recent = ctx.state.setdefault(_RECENT_LOSSES, collections.deque(maxlen=self.recent))
        if math.isfinite(value):
            earlier = list(recent)[:-1]  # a second row in a row need not top the first
            if not earlier or value > max(earlier):
                trimmed = _trimmed_loss(ctx, value, self.trim)
            recent.append(value)
        return {"value": value, "samples": _samples(ctx), "trimmed": trimmed}


_RECENT_LOSSES = "loss_recent"  # the ``ctx.state`` key of the latest finite losses


_ELEMENTWISE = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss,
                F.binary_cross_entropy_with_logits, F.binary_cross_entropy)
_CLASSWISE = (F.cross_entropy, F.nll_loss)
_LOSS_MODULES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCEWithLogitsLoss,
                 nn.BCELoss, nn.CrossEntropyLoss, nn.NLLLoss)


def _per_sample_losses(loss_fn: Any, outputs: torch.Tensor,
                      targets: torch.Tensor) -> torch.Tensor | None:
    """The per-sample losses of a torch loss of ``reduction="mean"``; None for any other.

    Only torch's own losses are evaluated (``F.mse_loss``, ``F.cross_entropy``, ... and
    their ``nn`` modules at ``reduction="mean"``), with ``reduction="none"`` and the
    module's own settings (``weight``, ``label_smoothing``, ...), in float32 at least: a
    user's loss function may keep state (a running centre as a plain attribute, a list of
    logged values) or draw random numbers, which an extra call would change, so it is
    never called. The elementwise losses are averaged over every dimension but the first.

    Args:
        loss_fn: the monitor's loss function.
        outputs: the model's outputs, samples first.
        targets: the targets, samples first, as many as ``outputs``.

    Returns:
        The (n,) per-sample losses in float64, or None.
    """
    # torch's own classes only: a subclass may override forward and keep state
    if type(loss_fn) in _LOSS_MODULES and getattr(loss_fn, "reduction", None) == "mean":
        per_element = copy.copy(loss_fn)  # the same weights, its reduction alone changed
        per_element.reduction = "none"
        classwise = isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss))
    elif any(loss_fn is f for f in _ELEMENTWISE + _CLASSWISE):
        per_element = functools.partial(loss_fn, reduction="none")
        classwise = any(loss_fn is f for f in _CLASSWISE)
    else:
        return None
    if not outputs.is_floating_point():
        return None
    if classwise:
        if targets.is_floating_point() or outputs.ndim < 2 \
                or targets.shape != outputs.shape[:1] + outputs.shape[2:]:
            return None  # class probabilities, or a shape the loss would refuse
    elif targets.shape != outputs.shape:
        return None  # broadcast (a (n, 1) output against (n,) targets): not per sample
    wide = torch.promote_types(outputs.dtype, torch.float32)
    out = outputs.detach().to(wide)
    target = targets.detach().to(out.device)
    if target.is_floating_point():
        target = target.to(wide)
    with torch.no_grad(), warnings_ignored():  # (the user's warnings keep their registry)
        try:
            losses = per_element(out, target)
        except (RuntimeError, ValueError, TypeError, IndexError):
            return None
    if not isinstance(losses, torch.Tensor) or losses.ndim == 0 \
            or losses.shape[0] != outputs.shape[0]:
        return None
    return losses.reshape(losses.shape[0], -1).mean(dim=1).to(torch.float64)


def _trimmed_loss(ctx: StepContext, value: float, trim: float) -> float:
    """The mean of the step batch's per-sample losses without its largest; NaN when unknown.

    Leaves out the largest ``ceil(trim * n)`` of the n losses (at least one). Needs
    ``step(outputs=...)`` as a tensor, one ``(inputs, targets)`` batch of at least 3
    samples as many as the outputs, a torch loss as ``loss_fn`` (:func:`_per_sample_losses`;
    not a closure), and per-sample losses whose mean is ``value`` within 1e-3 relative
    (2e-2 for a bfloat16 or float16 loss; else the loss passed is not their mean).
    """
    if ctx.closure is not None or not isinstance(ctx.outputs, torch.Tensor):
        return math.nan
    batches = ctx.batches("batch")
    if len(batches) != 1:
        return math.nan
    try:
        targets = split_batch(batches[0])[1]
    except MissingInput:
        return math.nan
    outputs = ctx.outputs
    if (not isinstance(targets, torch.Tensor) or outputs.ndim == 0 or targets.ndim == 0
            or outputs.shape[0] != targets.shape[0] or outputs.shape[0] < 3):
        return math.nan
    losses = _per_sample_losses(ctx.loss_fn, outputs, targets)
    if losses is None or not bool(torch.isfinite(losses).all()):
        return math.nan
    n = losses.numel()
    low = outputs.dtype in (torch.bfloat16, torch.float16)
    if abs(float(losses.mean()) - value) > (2e-2 if low else 1e-3) * max(abs(value), 1e-12):
        return math.nan
    kept = n - max(1, math.ceil(trim * n))
    return float(losses.sort().values[:kept].mean())


def _samples(ctx: StepContext) -> float:
    """``step(samples=...)``, else the leading sizes of the step's batches summed; NaN."""
    if ctx.given_samples is not None:
        return float(ctx.given_samples)
    if ctx.batch is None:
        return math.nan
    sizes = [leading_size(b) for b in ctx.batches("batch")]
    return float(sum(sizes)) if sizes and None not in sizes else math.nan


def _no_update(ctx: StepContext, metric: str) -> str:
    """Why ``metric`` has no optimizer step to measure at this call."""
    if ctx.optimizer is None:
        return f"{metric} needs Monitor(optimizer=...) and an optimizer step"
    return (f"{metric}: the optimizer did not step since the previous call, or since the "
            "monitor started at the first call (the monitor "
            "called before optimizer.step() instead of after it, a GradScaler skipping a "
            "step, an optimizer that steps less often than the monitor is called, or "
            "optimizer= is not the optimizer that steps)")


@register
class GradNorm(Metric):
    """Euclidean norm of the gradient left in ``.grad`` by the user's backward.

    With gradient clipping ``.grad`` holds the clipped gradient, whose norm never exceeds
    the clipping threshold; ``Monitor.step(grad_norm=...)`` records the norm the caller
    passes instead (what ``torch.nn.utils.clip_grad_norm_`` returns: the norm before
    clipping), and the Lightning callback passes it when ``gradient_clip_val`` is set.
    ``samples``: the batch's samples, as the ``loss`` metric counts them (a context field):
    a mean over a batch far smaller than the usual one scatters further, which
    :class:`~landscape.alarms.GradNormSpike` reads (a loader's one-sample last batch).
    """

    name = "grad_norm"
    FIELDS = ("value", "samples")
    CONTEXT_FIELDS = ("samples",)
    default_data = "batch"

    def compute(self, ctx: StepContext) -> dict[str, float]:
        """||grad|| over the monitored parameters, or the norm the caller gave."""
        if ctx.given_grad_norm is not None:
            return {"value": ctx.given_grad_norm, "samples": _samples(ctx)}
        value = ctx.grad_norm()
        if value is None:
            raise MissingInput(
                "grad_norm needs .grad of the monitored parameters, and none has one: call "
                "mon.step() before optimizer.zero_grad(), or pass step(grad_norm=...) (what "
                "clip_grad_norm_ returns)")
        return {"value": value, "samples": _samples(ctx)}


def _given_norm_flag(norm: float, params: Sequence[torch.Tensor]) -> float:
    """Whether the gradient behind a given norm has a non-finite entry (NaN: not known).

    A NaN norm has one. An infinite one has one too, unless the gradients are float16:
    ``clip_grad_norm_`` then overflows to inf past 65504 with every entry finite.
    """
    if math.isnan(norm):
        return 1.0
    if math.isfinite(norm):
        return 0.0
    return math.nan if any(p.dtype == torch.float16 for p in params) else 1.0


@register
class NonFinite(Metric):
    """1.0 when the loss (resp. any gradient entry) is NaN or infinite, else 0.0.

    The gradient is read from ``.grad``; where no monitored parameter has one, or where it
    is all zeros and the norm passed as ``step(grad_norm=...)`` is not finite (the monitor
    called after ``optimizer.zero_grad()``), from that norm, which ``clip_grad_norm_``
    returns non-finite when any entry is (an infinite norm of float16 gradients may be an
    overflow of finite entries: NaN, not known).

    ``skipped`` says whether this gradient was left out of the weights. With a non-finite
    gradient it is 1.0 when every weight is still finite and none moved since the
    previous call: no step applied it (a GradScaler skipping an overflowed step, a fused
    optimizer told ``found_inf``, a micro-batch between optimizer steps); 0.0 when the
    weights are not finite or an optimizer step moved them (a sign-based optimizer such
    as Rprop applies an infinite gradient as a finite step). With a
    finite gradient it is 1.0 when the optimizer did not step since the monitor's previous
    call, 0.0 when it did, NaN when not known (no ``optimizer=``, the first call of a
    monitor that ``step()`` started). Run files written before it have NaN there.

    Its name, ``"nonfinite"``, predates the snake_case rule (docs/vocabulary.md) and is kept:
    run files and alarm rules read it.
    """

    name = "nonfinite"
    FIELDS = ("loss", "grad", "skipped")
    default_data = "batch"

    def compute(self, ctx: StepContext) -> dict[str, float]:
        """The ``loss``, ``grad`` and ``skipped`` flags (NaN when not known)."""
        loss_bad = math.nan if ctx.loss is None else float(not math.isfinite(ctx.loss_value()))
        gnorm = ctx.grad_norm()
        if ctx.given_norm_stands_in():  # .grad zeroed before the call: the norm says it
            grad_bad = _given_norm_flag(float(ctx.given_grad_norm), ctx.parameters)
        elif gnorm is None:
            grad_bad = math.nan
        elif math.isfinite(gnorm):  # a finite norm proves every entry finite
            grad_bad = 0.0
        else:  # NaN/inf entries, or finite entries whose squares overflowed: look
            grads = ctx.grads() or ()
            grad_bad = float(not all(bool(torch.isfinite(g).all()) for g in grads))
        stepped = ctx.optimizer_stepped
        if grad_bad == 1.0:  # did the non-finite gradient reach the weights?
            # a step that applies it makes them non-finite (or, sign-based like Rprop or
            # Lion, moves them); one that a GradScaler skips, a fused optimizer told
            # found_inf, or an accumulation micro-batch leaves them as they were
            finite = all(bool(torch.isfinite(p).all()) for p in ctx.parameters)
            moved = stepped is True and (ctx.update is None or any(
                bool(d.any()) for d in ctx.update))
            skipped = float(finite and not moved)
        else:
            skipped = math.nan if stepped is None else float(not stepped)
        return {"loss": loss_bad, "grad": grad_bad, "skipped": skipped}


@register
class Update(Metric):
    """Norm of the optimizer's actual step Δθ and its size relative to ||θ|| before it."""

    name = "update"
    FIELDS = ("norm", "relative")
    default_data = "batch"
    needs_update = True

    def compute(self, ctx: StepContext) -> dict[str, float]:
        """||Δθ|| and ||Δθ|| / ||θ_before||."""
        if ctx.update is None or not ctx.has_params_before:
            raise MissingInput(_no_update(ctx, "update"))
        per_step, per_base = ctx.tensor_norms("update"), ctx.tensor_norms("params_before")
        if per_step is None or per_base is None:  # mixed devices or dtypes, sharded tensors
            step_norm = float(norm(ctx.update).item())
            base = float(norm(ctx.params_before).item())
        else:  # the per-tensor norms shared with the sentinels: the same values as norm()
            step_norm, base = read_floats([torch.linalg.vector_norm(per_step),
                                           torch.linalg.vector_norm(per_base)])
        return {"norm": step_norm, "relative": step_norm / base if base > 0 else math.nan}


@register
class Logits(Metric):
    """Logit growth signals (Wortsman et al. 2024; Prieto et al. 2025).

    Max |logit|, the log-partition mean and max, the z-loss and the softmax-collapse
    fraction. A row of NaN (no finding) when the outputs are not softmax logits: a
    regression or single-logit head, float targets that are not class distributions
    (:func:`~landscape.metrics.batch_parts.softmax_logits`).
    """

    name = "logits"
    FIELDS = ("max_abs", "logsumexp_mean", "logsumexp_max", "zloss", "softmax_collapse")
    default_schedule = every(10)
    default_data = "batch"  # free when step(outputs=...) is passed; else one forward pass

    def compute(self, ctx: StepContext) -> dict[str, float]:
        """The logit statistics of the model's output on ``self.data``."""
        targets = ctx.given_targets(self.data)
        z = classes_last(ctx.logits(self.data), targets)  # (N, C, H, W): classes last
        if not softmax_logits(z, targets):
            return dict.fromkeys(self.FIELDS, math.nan)
        return logit_row(z)


def logit_row(z: torch.Tensor) -> dict[str, float]:
    """One row of the :class:`Logits` metric.

    Args:
        z: logits of any shape ``(..., C)``.

    Returns:
        The row.
    """
    stats = LF.logit_stats(z)
    return {
        "max_abs": float(stats.max_abs_logit),
        "logsumexp_mean": float(stats.log_z_mean),
        "logsumexp_max": float(stats.log_z_max),
        "zloss": float(stats.z_loss),
        "softmax_collapse": float(LF.softmax_collapse_fraction(z).value),
    }


@register
class TaylorRadius(Metric):
    """Taylor radius of cross-entropy along the optimizer's actual step (Sao 2026).

    One JVP at the parameters *before* the step gives the directional logit derivatives;
    rho_a = pi / max_i Delta_a,i and r = ||Δθ|| / rho_a (docs/metrics.md, Taylor radius).
    Formerly ``Taylor``, registered as ``"taylor"``.
    """

    dense_every = 1
    name = "taylor_radius"
    FIELDS = ("r", "rho_a", "step_norm", "r_median", "samples")
    CONTEXT_FIELDS = ("samples",)
    default_data = "batch"
    default_schedule = every(10)
    needs_update = True

    def compute(self, ctx: StepContext) -> dict[str, float]:
        """``r``, ``rho_a``, ``step_norm`` and ``r_median`` of the step on ``self.data``.

        ``r`` is the largest over the batch's samples (token positions for a sequence
        model), which one hard sample decides; ``r_median`` is the median over the samples
        (interpolated: the mean of the two middle ones for an even count), what the
        ``taylor_ratio`` rule warns on (docs/alarms.md); ``samples``, how many there are
        (a context field: over one or two the median is no more robust than the largest).
        """
        sized = _step_not_sized_by_a_rate(ctx.optimizer)
        if sized is not None:
            raise MissingInput(
                f"taylor_radius: {type(ctx.optimizer).__name__} {sized}: its step is sized "
                "by a line search or its curvature model, not by a learning rate a Taylor "
                "ratio could bound (docs/metrics.md, 'Taylor radius of cross-entropy')")
        if ctx.update is None or not ctx.has_params_before:
            raise MissingInput(_no_update(ctx, "taylor_radius"))
        # a list of micro-batches (gradient accumulation): the one step over all of them,
        # so r is the largest and rho_a the smallest over the micro-batches
        results = [_radius_on(ctx, batch) for batch in ctx.batches(self.data)]
        spread = torch.cat([r.spread.reshape(-1) for r in results])
        finite = spread.numel() > 0 and bool(torch.isfinite(spread).all())
        median = float(torch.quantile(spread.to(torch.float64), 0.5)) if finite else math.nan
        step_norm = float(results[0].step_norm)
        return {
            "r": max(float(r.r) for r in results),
            "rho_a": min(float(r.rho_a) for r in results),
            "step_norm": step_norm,
            "r_median": step_norm * median / math.pi,
            "samples": float(spread.numel()),
        }


def _step_not_sized_by_a_rate(optimizer: Any) -> str | None:
    """Why one ``optimizer.step()`` is no learning-rate step (L-BFGS), or None.

    Several iterations a step (``max_iter > 1``: the update is their sum) or a line search
    (``line_search_fn``) choose the step's length themselves.
    """
    for group in getattr(optimizer, "param_groups", None) or ():
        if int(group.get("max_iter") or 1) > 1:
            return f"runs up to {group['max_iter']} iterations in one step (max_iter)"
        if group.get("line_search_fn") is not None:
            return f"searches its step's length ({group['line_search_fn']!r})"
    return None


def _radius_on(ctx: StepContext, batch: Any) -> Any:
    """:func:`radius_along` of the step from ``ctx.params_before`` on one batch.

    The batch is read as the model takes it: the dict itself, a tokenizer's keywords, or
    ``(inputs, targets)``.
    """
    keywords = keyword_batch(batch)
    if whole_dict_call(ctx.model, batch):  # forward(self, batch): the dict itself
        return radius_along(ctx, (batch,), batch_targets(batch), ctx.params_before,
                            ctx.update, keywords={})
    if keywords:  # a tokenizer's output: model(**batch), logits only
        # labels left out: the model need not compute its loss, and a language model's
        # labels are not aligned with its logits (it shifts them itself)
        try:
            return radius_along(ctx, (), None, ctx.params_before, ctx.update,
                                keywords=without_labels(ctx.model, batch))
        except TypeError:
            if not ids_and_labels(batch):  # the one batch with a positional reading
                raise
    # (inputs, targets), also under a closure: model(inputs)'s logits
    inputs, targets = split_batch(batch)
    return radius_along(ctx, inputs, targets, ctx.params_before, ctx.update)


def radius_along(
    ctx: StepContext, inputs, targets, at, direction, keywords: Mapping[str, Any] | None = None
) -> Any:
    """Taylor radius at parameters ``at`` along ``direction``.

    The logit tangent ``J p`` of the logits (read by the monitor's ``output_fn``, by
    default :func:`landscape.capture.output_logits`) is
    :func:`landscape.functional.taylor.logit_tangent`'s: one ``torch.func.jvp``, or a
    central difference where forward-mode AD cannot go through the model (reentrant
    activation checkpointing); on FSDP2 models :func:`_radius_in_place`.

    Args:
        ctx: the step context (its model and parameter names).
        inputs: the batch's inputs (``()`` with ``keywords`` alone).
        targets: its targets (class indices, used when they match the logits' shape), or
            None.
        at: parameter tensors, in the order of ``ctx.names``.
        direction: the step, in the same order.
        keywords: keyword arguments of the model (``model(*inputs, **keywords)``).

    Returns:
        The result of :func:`landscape.functional.taylor_radius_from_logits`.

    Raises:
        MissingInput: the outputs are not softmax logits of ``targets``
            (:func:`~landscape.metrics.batch_parts.softmax_logits`: a regression head, ...).
    """
    from landscape.functional.taylor import logit_tangent, logits_call

    if keywords is None:
        args, keywords = model_call(ctx.model, inputs)
    else:
        args = tuple(inputs)
    keywords = keywords or None
    if any(_dist.is_sharded(t) for t in at):
        return _radius_in_place(ctx, args, keywords or {}, targets, at, direction)
    names = list(ctx.names)
    # the logits alone: a tuple, dict or ModelOutput is read through output_logits, and a
    # Hugging Face model builds no key-value cache (jvp accepts tensors only)
    call = logits_call(ctx.model, args, ctx.output_fn, keywords=keywords)
    logits, tangent = logit_tangent(call, dict(zip(names, at)), dict(zip(names, direction)))
    # a segmentation map's (N, C, H, W) logits of (N, H, W) targets: classes last
    logits, tangent = classes_last(logits, targets), classes_last(tangent, targets)
    if not softmax_logits(logits, targets):  # a regression head, ...: r means nothing
        raise MissingInput("taylor_radius: the model's outputs are not softmax logits of "
                           "these targets (docs/conventions.md, 'Which outputs are logits')")
    step_norm = norm(direction)
    return LF.taylor_radius_from_logits(
        logits.detach(), tangent.detach(), step_norm=step_norm,
        targets=_labels(targets, logits),
    )


def _labels(targets: Any, logits: torch.Tensor) -> torch.Tensor | None:
    """``targets`` when they are one integer class index per logit row, else None.

    One index past the classes is an ``ignore_index`` the training loss accepted (255 in
    VOC- and Cityscapes-style segmentation masks): ignored, as a negative one (-100) is
    (:func:`~landscape.metrics.batch_parts.ignored_past_classes`).
    """
    if not isinstance(targets, torch.Tensor) or targets.shape != logits.shape[:-1]:
        return None
    if not integer_dtype(targets.dtype):  # no class indices (softmax_logits says why)
        return None
    past = ignored_past_classes(targets, logits.shape[-1])
    if past is not None:
        return torch.where(past, torch.full_like(targets, -100), targets)
    return targets


def _radius_in_place(ctx: StepContext, args, keywords, targets, at, direction) -> Any:
    """:func:`radius_along` on an FSDP2 model: the logit tangent by a central difference.

    Forward-mode AD cannot go through DTensor parameters, so ``J p`` is
    ``(z(at + ε p) − z(at − ε p)) / 2ε`` with the step ``ε = u^{1/3} (1 + ‖at‖) / (8 ‖p‖)``
    of the first-order curvature products (Nocedal & Wright, *Numerical Optimization*,
    §8.1; docs/curvature.md, "First-order products"). The points are written into each
    rank's shards in place and the saved shards copied back, bit for bit; every rank runs
    the same three forward passes (FSDP's all-gathers).
    """
    from landscape.curvature._first_order import step_size
    from landscape.functional.taylor import difference_tangent

    model = ctx.model
    own = ctx._own()
    storage = [_dist.local_tensor(own[n].detach()) for n in ctx.names]
    base = [_dist.local_tensor(t.detach()) for t in at]
    step = [_dist.local_tensor(t.detach()) for t in direction]
    v_norm = float(norm(direction))  # DTensor norms: partial norms, one all-reduce
    step_norm = torch.tensor(v_norm, dtype=torch.float64)
    eps = step_size(float(norm(at)), v_norm, storage[0].dtype) if v_norm > 0 else 0.0
    saved = [t.clone() for t in storage]

    def logits_at(alpha: float) -> torch.Tensor:
        with torch.no_grad():
            for dst, b, d in zip(storage, base, step):
                dst.copy_((b.double() + alpha * d.double()).to(dst.dtype))
            _dist.reshard(model)  # FSDP2 may keep the root's unsharded copy after a forward
            out = ctx.logits_of(model(*args, **keywords))  # a tuple or ModelOutput: logits
            if out is None:
                raise ctx.no_logits("the model's forward returned no tensor to read logits "
                                    "from")
            return out.detach()

    try:
        logits, tangent = difference_tangent(logits_at, eps)
    finally:
        with torch.no_grad():
            for dst, orig in zip(storage, saved):
                dst.copy_(orig)
        _dist.reshard(model)
    return LF.taylor_radius_from_logits(
        logits, tangent, step_norm=step_norm, targets=_labels(targets, logits)
    )


__getattr__ = module_getattr(__name__, {"Taylor": "TaylorRadius"}, globals())
