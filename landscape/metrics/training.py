"""Cheap per-step training signals: loss, gradient norm, non-finite flags, the update, logits,
and the Taylor radius of the optimizer's actual step."""

from __future__ import annotations

import math
from typing import Any

import torch

from landscape import functional as LF
from landscape.metrics.base import Metric, register
from landscape.metrics.context import MissingInput, StepContext, split_batch
from landscape.params import norm
from landscape.schedules import every


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean().item())
    return float(value)


@register
class Loss(Metric):
    """The training loss the user passed to ``step(loss=...)`` (no recomputation)."""

    name = "loss"
    FIELDS = ("value",)
    default_data = "batch"

    def compute(self, ctx: StepContext) -> dict[str, float]:
        if ctx.loss is None:
            raise MissingInput("the loss metric needs step(..., loss=loss)")
        return {"value": _as_float(ctx.loss)}


@register
class GradNorm(Metric):
    """Euclidean norm of the gradient left in ``.grad`` by the user's backward."""

    name = "grad_norm"
    FIELDS = ("value",)
    default_data = "batch"

    def compute(self, ctx: StepContext) -> dict[str, float]:
        value = ctx.grad_norm()
        if value is None:
            raise MissingInput("grad_norm needs .grad of every monitored parameter")
        return {"value": value}


@register
class NonFinite(Metric):
    """1.0 when the loss (resp. any gradient entry) is NaN or infinite, else 0.0."""

    name = "nonfinite"
    FIELDS = ("loss", "grad")
    default_data = "batch"

    def compute(self, ctx: StepContext) -> dict[str, float]:
        loss_bad = math.nan if ctx.loss is None else float(not math.isfinite(_as_float(ctx.loss)))
        gnorm = ctx.grad_norm()
        if gnorm is None:
            grad_bad = math.nan
        elif math.isfinite(gnorm):  # a finite norm proves every entry finite
            grad_bad = 0.0
        else:  # NaN/inf entries, or finite entries whose squares overflowed: look
            grads = ctx.grads() or ()
            grad_bad = float(not all(bool(torch.isfinite(g).all()) for g in grads))
        return {"loss": loss_bad, "grad": grad_bad}


@register
class Update(Metric):
    """Norm of the optimizer's actual step Δθ and its size relative to ||θ|| before it."""

    name = "update"
    FIELDS = ("norm", "relative")
    default_data = "batch"
    needs_update = True

    def compute(self, ctx: StepContext) -> dict[str, float]:
        if ctx.update is None or ctx.params_before is None:
            raise MissingInput("update needs Monitor(optimizer=...) and an optimizer step")
        step_norm = float(norm(ctx.update).item())
        base = float(norm(ctx.params_before).item())
        return {"norm": step_norm, "relative": step_norm / base if base > 0 else math.nan}


@register
class Logits(Metric):
    """Logit growth signals (Wortsman et al. 2024; Prieto et al. 2025): max |logit|, the
    log-partition mean and max, the z-loss and the softmax-collapse fraction."""

    name = "logits"
    FIELDS = ("max_abs", "logsumexp_mean", "logsumexp_max", "zloss", "softmax_collapse")
    default_schedule = every(10)
    default_data = "batch"  # free when step(outputs=...) is passed; else one forward pass

    def compute(self, ctx: StepContext) -> dict[str, float]:
        return logit_row(ctx.logits(self.data))


def logit_row(z: torch.Tensor) -> dict[str, float]:
    """One row of the :class:`Logits` metric from logits ``z`` (any shape ``(..., C)``)."""
    stats = LF.logit_stats(z)
    return {
        "max_abs": float(stats.max_abs_logit),
        "logsumexp_mean": float(stats.log_z_mean),
        "logsumexp_max": float(stats.log_z_max),
        "zloss": float(stats.z_loss),
        "softmax_collapse": float(LF.softmax_collapse_fraction(z).value),
    }


@register
class Taylor(Metric):
    """Taylor radius of cross-entropy along the optimizer's actual step (Sao 2026).

    One JVP at the parameters *before* the step gives the directional logit derivatives;
    rho_a = pi / max_i Delta_a,i and r = ||Δθ|| / rho_a (METRICS.md section 5).
    """

    name = "taylor"
    FIELDS = ("r", "rho_a", "step_norm")
    default_data = "batch"
    default_schedule = every(10)
    needs_update = True

    def compute(self, ctx: StepContext) -> dict[str, float]:
        if ctx.update is None or ctx.params_before is None:
            raise MissingInput("taylor needs Monitor(optimizer=...) and an optimizer step")
        if ctx.closure is not None:
            raise MissingInput("taylor needs loss_fn-style (inputs, targets) batches")
        inputs, targets = split_batch(ctx.data(self.data))
        result = radius_along(ctx, inputs, targets, ctx.params_before, ctx.update)
        return {
            "r": float(result.r),
            "rho_a": float(result.rho_a),
            "step_norm": float(result.step_norm),
        }


def radius_along(ctx: StepContext, inputs, targets, at, direction) -> LF.TaylorRadius:
    """Taylor radius at parameters ``at`` along ``direction`` (both Vectors in ``ctx.names``)."""
    from landscape.isolation import sdpa_math, stateless_call

    names = list(ctx.names)

    def logits_of(*flat):
        return stateless_call(ctx.model, dict(zip(names, flat)), (inputs,))

    with sdpa_math():
        logits, tangent = torch.func.jvp(logits_of, tuple(at), tuple(direction))
    step_norm = norm(direction)
    labels = targets if targets.shape == logits.shape[:-1] else None
    return LF.taylor_radius_from_logits(
        logits.detach(), tangent.detach(), step_norm=step_norm, targets=labels
    )
