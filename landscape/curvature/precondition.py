"""The Adam-preconditioned curvature operator ``P^-1/2 A P^-1/2``.

See docs/curvature.md, "Preconditioned operator and stability thresholds".

Cohen et al., *Adaptive Gradient Methods at the Edge of Stability* (arXiv:2207.14484):
with Adam's preconditioner ``P = diag(sqrt(v_hat) + eps)``, ``v_hat = v / (1 - beta2^t)``
the bias-corrected second moment, the relevant sharpness is ``lambda_max(P^-1 H)``,
computed as ``lambda_max`` of the symmetric, similar operator ``u -> P^-1/2 H P^-1/2 u``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from landscape.curvature.base import CurvatureOperator
from landscape.params import Vector

__all__ = ["PreconditionedOperator", "preconditioned"]


class PreconditionedOperator(CurvatureOperator):
    """``u -> D A D u`` with ``D = P^-1/2`` diagonal (``scale`` holds ``D``'s entries).

    ``preconditioner`` holds ``P``'s entries; ``eps`` the optimiser's epsilon (when read
    from one) and ``dead_fraction`` the fraction of coordinates with ``sqrt(v_hat) < eps``,
    where ``P`` is dominated by ``eps`` and the preconditioned sharpness is inflated
    (report it alongside). ``loss()``/``gradient()`` are those of the base operator.
    """

    def __init__(
        self,
        base: CurvatureOperator,
        preconditioner: Sequence[torch.Tensor],
        *,
        eps: float | None = None,
        dead_fraction: float | None = None,
    ) -> None:
        super().__init__(base.names, base.shapes, base.dtype, base.device)
        p = base._check(preconditioner, "preconditioner")
        if any(bool((t <= 0).any()) or not bool(torch.isfinite(t).all()) for t in p):
            raise ValueError("preconditioner: entries must be finite and > 0")
        self.base = base
        self.preconditioner: Vector = p
        self.scale: Vector = tuple(t.rsqrt() for t in p)
        self.eps = eps
        self.dead_fraction = dead_fraction

    @property
    def parameters(self) -> Vector:
        """The base operator's current parameter values."""
        return self.base.parameters

    def loss(self) -> torch.Tensor:
        """The base operator's loss (:meth:`CurvatureOperator.loss`)."""
        return self.base.loss()

    def gradient(self) -> Vector:
        """The base operator's gradient (:meth:`CurvatureOperator.gradient`)."""
        return self.base.gradient()

    def _matvec(self, v: Vector) -> Vector:
        inner = self.base.matvec(tuple(d * t for d, t in zip(self.scale, v)))
        return tuple(d * t for d, t in zip(self.scale, inner))

    def _matmat(self, vs: list[Vector]) -> list[Vector]:
        inner = self.base.matmat([tuple(d * t for d, t in zip(self.scale, v)) for v in vs])
        return [tuple(d * t for d, t in zip(self.scale, w)) for w in inner]


def _adam_preconditioner(
    op: CurvatureOperator, optimizer: torch.optim.Optimizer
) -> tuple[Vector, float, float]:
    objects = getattr(op, "_param_objects", None)
    if objects is None:
        raise ValueError(
            "optimizer: the operator is not tied to model parameters; pass the "
            "preconditioner diagonal as a vector instead"
        )
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    diag, eps_seen, dead, total = [], set(), 0, 0
    for name, p in zip(op.names, objects):
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(f"optimizer: parameter {name!r} is not optimised by it")
        if "betas" not in group or "eps" not in group:
            raise ValueError(
                f"optimizer: {type(optimizer).__name__} has no Adam-style betas/eps"
            )
        state = optimizer.state.get(p, {})
        key = "max_exp_avg_sq" if group.get("amsgrad") and "max_exp_avg_sq" in state else (
            "exp_avg_sq"
        )
        if key not in state or "step" not in state:
            raise ValueError(
                f"optimizer: no second-moment state for parameter {name!r} yet "
                "(take at least one optimizer step first)"
            )
        step = float(state["step"])
        if step < 1:
            raise ValueError(f"optimizer: step count of {name!r} is {step}, expected >= 1")
        beta2 = float(group["betas"][1])
        eps = float(group["eps"])
        v_hat = state[key].detach().to(op.dtype) / (1.0 - beta2**step)
        root = v_hat.sqrt()
        dead += int((root < eps).sum())
        total += root.numel()
        diag.append((root + eps).to(op.device))
        eps_seen.add(eps)
    eps_value = eps_seen.pop() if len(eps_seen) == 1 else float("nan")
    return tuple(diag), eps_value, dead / max(total, 1)


def preconditioned(op: CurvatureOperator, optimizer: Any) -> PreconditionedOperator:
    """``P^-1/2 op P^-1/2`` with Adam's bias-corrected preconditioner (docs/curvature.md).

    ``optimizer`` is an Adam-family ``torch.optim`` optimizer (Adam, AdamW, NAdam, ... with
    ``exp_avg_sq`` state; ``max_exp_avg_sq`` with amsgrad) that has taken at least one
    step: ``P = sqrt(v / (1 - beta2^t)) + eps`` per parameter, exactly Adam's denominator.
    Alternatively pass ``P``'s diagonal directly as a parameter-space vector. Its largest
    eigenvalue is the preconditioned sharpness, compared with
    ``stability_threshold(optimizer)``.

    Args:
        op: the operator (a model operator when ``optimizer`` is an optimizer).
        optimizer: an Adam-family optimizer, or ``P``'s diagonal as a parameter-space vector.

    Returns:
        The preconditioned operator, with ``eps`` and ``dead_fraction`` from the optimizer.

    Raises:
        ValueError: the optimizer has no state yet, no Adam-style ``betas``/``eps``, or
            does not optimise the operator's parameters; or a preconditioner entry <= 0.
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        diag, eps, dead = _adam_preconditioner(op, optimizer)
        return PreconditionedOperator(op, diag, eps=eps, dead_fraction=dead)
    if isinstance(optimizer, (tuple, list)):
        return PreconditionedOperator(op, optimizer)
    raise ValueError(
        f"optimizer: expected a torch optimizer or a preconditioner vector, got "
        f"{type(optimizer).__name__}"
    )
