"""The preconditioned curvature operator ``P^-1/2 A P^-1/2`` of an adaptive optimizer.

See docs/curvature.md, "Preconditioned operator and stability thresholds".

Cohen et al., *Adaptive Gradient Methods at the Edge of Stability* (arXiv:2207.14484):
with an adaptive optimiser's diagonal preconditioner ``P`` (Adam's ``sqrt(v_hat) + eps``,
``v_hat = v / (1 - beta2^t)`` the bias-corrected second moment) the relevant sharpness is
``lambda_max(P^-1 H)``, computed as ``lambda_max`` of the symmetric, similar operator
``u -> P^-1/2 H P^-1/2 u``. :func:`preconditioned` reads ``P`` from Adam, AdamW, NAdam,
RAdam, Adamax and RMSprop, each as its torch 2.13 update divides by it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from landscape.curvature.base import CurvatureOperator
from landscape.curvature.stability import optimizer_kind
from landscape.distributed import full_tensor, is_sharded
from landscape.params import Vector

__all__ = ["OptimizerSettingsError", "PreconditionedOperator", "divides_by_preconditioner",
           "preconditioned"]


class OptimizerSettingsError(ValueError):
    """The optimizer's settings or state cannot scale or precondition the operator.

    Its learning rates are not numbers, no group trains, it holds none of the operator's
    parameters, it has no second moments yet. A ``ValueError``; the sharpness metric tells
    it from an error of the operator itself (parameters that no longer match the model).
    """


class PreconditionedOperator(CurvatureOperator):
    """``u -> D A D u`` with ``D = P^-1/2`` diagonal (``scale`` holds ``D``'s entries).

    ``preconditioner`` holds ``P``'s entries, finite and > 0; with ``frozen=True`` also
    ``inf`` where the optimizer does not move a coordinate (a group at learning rate 0:
    ``D`` is 0 there, which removes it from the operator exactly); ``eps`` the
    optimiser's epsilon (when read from one) and ``dead_fraction`` the fraction of
    coordinates where ``P`` is dominated by ``eps`` (``sqrt(v_hat) < eps`` for Adam) and
    the preconditioned sharpness is inflated (report it alongside). ``loss()`` and
    ``gradient()`` are those of the base operator.
    """

    def __init__(
        self,
        base: CurvatureOperator,
        preconditioner: Sequence[torch.Tensor],
        *,
        eps: float | None = None,
        dead_fraction: float | None = None,
        frozen: bool = False,
    ) -> None:
        super().__init__(base.names, base.shapes, base.dtype, base.device)
        p = base._check(preconditioner, "preconditioner")
        # (an overflowed second moment is inf too: only the caller that set it may pass it)
        ok = (lambda t: bool((t > 0).all())) if frozen else (
            lambda t: bool((t > 0).all()) and bool(torch.isfinite(t).all()))
        if not all(ok(t) for t in p):  # NaN fails too
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


def _radam_rect(group: dict[str, Any], step: float) -> float | None:
    """RAdam's rectification ``r_t`` at step ``t``, or None while ``rho_t <= 5`` (SGD)."""
    beta2 = float(group["betas"][1])
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2**step / (1.0 - beta2**step)
    if not rho_t > 5.0:
        return None
    return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5


def divides_by_preconditioner(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the adaptive ``optimizer`` divided its latest step by a preconditioner.

    Always, except RAdam while its rectification is off (``rho_t <= 5``, which includes
    before its first step): then it is SGD with EMA momentum, ``P = 1``, and its threshold
    bounds the Hessian's own sharpness.
    """
    if optimizer_kind(optimizer) != "radam":
        return True
    for group in optimizer.param_groups:
        for p in group["params"]:
            step = float(optimizer.state.get(p, {}).get("step", 0))
            if step >= 1 and _radam_rect(group, step) is not None:
                return True
    return False


def _needs(state: dict, keys: tuple[str, ...], name: str, kind: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise OptimizerSettingsError(
            f"optimizer: no {'/'.join(missing)} state of {kind} for parameter {name!r} yet "
            "(no second-moment state: take at least one optimizer step first)"
        )
    step = float(state["step"])
    if step < 1:
        raise OptimizerSettingsError(f"optimizer: step count of {name!r} is {step}, expected >= 1")


_DIAGONAL_STATE = frozenset(
    {"step", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "square_avg", "grad_avg"})
"""The optimizer state entries :func:`_diagonal` reads."""


def _diagonal(
    kind: str, cls: str, group: dict[str, Any], state: dict, name: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``P``'s entries for one parameter, the mask of eps-dominated ones and the eps.

    ``P`` is the diagonal the optimiser's step at its latest step ``t`` divides by, read
    from torch 2.13's update rules (torch/optim/{adam,nadam,radam,adamax,rmsprop}.py).
    """
    eps = float(group["eps"])
    if kind in ("adam", "adamw", "nadam", "generic"):
        # Adam, AdamW, NAdam: sqrt(v / (1 - beta2^t)) + eps (max_exp_avg_sq with amsgrad)
        key = "max_exp_avg_sq" if group.get("amsgrad") and "max_exp_avg_sq" in state else (
            "exp_avg_sq"
        )
        _needs(state, (key, "step"), name, cls)
        step = float(state["step"])
        root = (state[key].detach().to(dtype) / (1.0 - float(group["betas"][1]) ** step)).sqrt()
        return root + eps, root < eps, eps
    if kind == "radam":
        # rho_t > 5: lr * r_t * m_hat * sqrt(1 - beta2^t) / (sqrt(v) + eps), so
        # P = (sqrt(v) + eps) / (r_t sqrt(1 - beta2^t)); otherwise lr * m_hat: P = 1
        _needs(state, ("exp_avg_sq", "step"), name, cls)
        step = float(state["step"])
        rect = _radam_rect(group, step)
        v = state["exp_avg_sq"].detach().to(dtype)
        if rect is None:
            return torch.ones_like(v), torch.zeros_like(v, dtype=torch.bool), eps
        root = v.sqrt()
        scale = rect * (1.0 - float(group["betas"][1]) ** step) ** 0.5
        return (root + eps) / scale, root < eps, eps
    if kind == "adamax":
        # lr / (1 - beta1^t) * m / u with u = max(beta2 u, |g| + eps): P = u (eps is inside;
        # the first moment's bias correction is a step size, as Adam's)
        _needs(state, ("exp_inf", "step"), name, cls)
        u = state["exp_inf"].detach().to(dtype)
        return u, u < 2.0 * eps, eps
    # RMSprop: sqrt(square_avg [- grad_avg^2 when centered]) + eps, no bias correction
    keys = ("square_avg", "grad_avg", "step") if group.get("centered") else (
        "square_avg", "step")
    _needs(state, keys, name, cls)
    v = state["square_avg"].detach().to(dtype)
    if group.get("centered"):
        v = v - state["grad_avg"].detach().to(dtype) ** 2
    root = v.clamp_min(0).sqrt()  # >= 0 exactly; rounding only where torch would give NaN
    return root + eps, root < eps, eps


def _objects(op: CurvatureOperator) -> Sequence[torch.nn.Parameter]:
    objects = getattr(op, "_param_objects", None)
    if objects is None:
        raise OptimizerSettingsError(
            "optimizer: the operator is not tied to model parameters; pass the "
            "preconditioner diagonal as a vector instead"
        )
    return objects


def _rates(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    """Each held parameter's learning rate, by ``id``."""
    from landscape.curvature.stability import learning_rate

    return {id(p): learning_rate(g.get("lr")) for g in optimizer.param_groups
            for p in g["params"]}


def _group_lr_factors(op: CurvatureOperator, optimizer: torch.optim.Optimizer) -> list[float]:
    """Per operator parameter: the reference group's learning rate over its own group's.

    The reference is the first group that trains (``stability.reference_group``); a group at
    learning rate 0 does not move its parameters, nor does the optimizer move a parameter
    it does not hold: ``inf`` (``D = 0``).

    Raises:
        ValueError: no group that trains, or a learning rate that is not a number >= 0.
    """
    from landscape.curvature.stability import learning_rate, reference_group

    first = learning_rate(reference_group(optimizer).get("lr"))
    if not first > 0:
        raise OptimizerSettingsError(
            f"optimizer: no parameter group trains (learning rate {first})")
    lr_of = _rates(optimizer)
    factors = []
    for name, p in zip(op.names, _objects(op)):
        lr = lr_of.get(id(p), 0.0)  # (a parameter outside the optimizer: not moved by it)
        if not lr >= 0:
            raise OptimizerSettingsError(
                f"optimizer: learning rates must be numbers >= 0 to compare groups, got {lr} "
                f"for {name!r}")
        factors.append(first / lr if lr > 0 else math.inf)
    return _moving(factors)


def _moving_factors(op: CurvatureOperator, optimizer: torch.optim.Optimizer) -> list[float]:
    """Per operator parameter: 1 where the optimizer moves it, ``inf`` (``D = 0``) where not.

    Not moved: a parameter it does not hold, or one in a group at learning rate 0 while
    another group trains (when none does, the first step of a warm-up from 0, every held
    parameter counts as moving: the step's shape is still the optimizer's).

    Raises:
        ValueError: the optimizer moves none of the operator's parameters.
    """
    from landscape.curvature.stability import training_groups

    trains = bool(training_groups(optimizer))
    lr_of = _rates(optimizer)
    return _moving([1.0 if id(p) in lr_of and not (trains and lr_of[id(p)] == 0) else math.inf
                    for p in _objects(op)])


def _moving(factors: list[float]) -> list[float]:
    """``factors``, refused when the optimizer moves none of the operator's parameters."""
    if factors and all(f == math.inf for f in factors):
        raise OptimizerSettingsError("optimizer: it moves none of the operator's parameters")
    return factors


def group_learning_rates(op: CurvatureOperator, optimizer: torch.optim.Optimizer, *,
                         rates: bool = True) -> PreconditionedOperator:
    """``D^1/2 op D^1/2`` with ``D`` each parameter's learning rate over the reference group's.

    SGD with parameter groups of different learning rates (a new head trained faster than
    a fine-tuned body, layer-wise decay) steps ``θ ← θ − η_g b``: on a quadratic it is
    stable while ``λ_max(D^1/2 H D^1/2) < (2 + 2β)/((1 − d) η_1)``, the first group's
    threshold, when the groups share their momentum (the 1-D argument of
    docs/curvature.md, "Preconditioned operator and stability thresholds", on the
    eigenvectors of ``D^1/2 H D^1/2``). So the operator is :class:`PreconditionedOperator`
    with ``P = η_1 / η_g`` per parameter, ``η_1`` the first group that trains
    (``stability.reference_group``); a group at learning rate 0, and a parameter the
    optimizer does not hold, have ``D = 0``. With ``rates=False`` only those are left out
    (``D`` is 1 elsewhere): groups that differ in momentum have no common scaled threshold,
    but what the optimizer does not move still has no part in its stability.

    Raises:
        ValueError: the optimizer moves none of the operator's parameters; with ``rates``,
            no group that trains, or a learning rate that is not a number >= 0.
    """
    diag = tuple(torch.full(shape, f, dtype=op.dtype, device=op.device)
                 for shape, f in zip(op.shapes, _group_lr_factors(op, optimizer) if rates
                                     else _moving_factors(op, optimizer)))
    return PreconditionedOperator(op, diag, frozen=True)


def _optimizer_preconditioner(
    op: CurvatureOperator, optimizer: torch.optim.Optimizer, group_lr: bool = False,
) -> tuple[Vector, float, float]:
    objects = _objects(op)
    factors = (_group_lr_factors if group_lr else _moving_factors)(op, optimizer)
    cls = type(optimizer).__name__
    kind = optimizer_kind(optimizer)
    if kind == "sgd":
        raise OptimizerSettingsError(
            f"optimizer: {cls} does not precondition its steps (no Adam-style betas/eps "
            "or second moments); its sharpness is that of the operator itself"
        )
    if kind is None:
        kind = "generic"  # an Adam-style optimiser we do not know: Adam's denominator
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    # torch's adaptive optimizers make a parameter's state at its first gradient: one
    # without state after others have theirs never had a gradient (an unused head, an idle
    # expert) and was never moved
    if any(optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"]):
        factors = _moving([math.inf if not optimizer.state.get(p) else f
                           for p, f in zip(objects, factors)])
    diag, eps_seen, dead, total = [], set(), 0, 0
    for name, shape, p, factor in zip(op.names, op.shapes, objects, factors):
        if factor == math.inf:  # not moved (a group at rate 0, not held, no state): D = 0
            diag.append(torch.full(shape, math.inf, dtype=op.dtype, device=op.device))
            continue
        group = group_of[id(p)]
        if "eps" not in group or (kind not in ("adamax", "rmsprop") and "betas" not in group):
            raise OptimizerSettingsError(f"optimizer: {cls} has no Adam-style betas/eps")
        state = optimizer.state.get(p, {})
        if any(is_sharded(v) for v in state.values()):  # FSDP2: this rank's rows of each
            # moment; the operator's vectors are whole (one parameter gathered at a time,
            # only the second moments the diagonal reads, not Adam's first)
            state = {k: full_tensor(v) if is_sharded(v) else v for k, v in state.items()
                     if k in _DIAGONAL_STATE}
        entries, small, eps = _diagonal(kind, cls, group, state, name, op.dtype)
        if not bool(torch.isfinite(entries).all()):
            raise OptimizerSettingsError(
                f"optimizer: the second moment of {name!r} is not finite (an overflow): no "
                "preconditioner to read")
        dead += int(small.sum())
        total += entries.numel()
        diag.append((entries if factor == 1.0 else entries * factor).to(op.device))
        eps_seen.add(eps)
    eps_value = eps_seen.pop() if len(eps_seen) == 1 else float("nan")
    return tuple(diag), eps_value, dead / max(total, 1)


def preconditioned(op: CurvatureOperator, optimizer: Any, *,
                   group_lr: bool = False) -> PreconditionedOperator:
    """``P^-1/2 op P^-1/2`` with the optimizer's own preconditioner (docs/curvature.md).

    ``P`` is the diagonal the optimizer divided its step by at its latest step ``t``, read
    from the state of a ``torch.optim`` optimizer that has taken at least one step (torch
    2.13's update rules; Cohen et al. 2022, *Adaptive Gradient Methods at the Edge of
    Stability*, arXiv:2207.14484, for the preconditioned sharpness ``lambda_max(P^-1 H)``):

    * Adam, AdamW, NAdam: ``sqrt(v / (1 - beta2^t)) + eps`` (``max_exp_avg_sq`` with amsgrad);
    * RAdam (Liu et al. 2020, arXiv:1908.03265): ``(sqrt(v) + eps) / (r_t sqrt(1 - beta2^t))``
      while its rectification is on (``rho_t > 5``; ``r_t`` is a step-size factor it applies
      with ``P``, folded in so that one threshold holds in both regimes); before, RAdam is
      SGD with EMA momentum and ``P = 1`` (the operator itself);
    * Adamax: its infinity norm ``u = max(beta2 u, |g| + eps)`` (``exp_inf``; eps is inside,
      its first-moment bias correction is a step size as Adam's);
    * RMSprop: ``sqrt(square_avg) + eps``, ``sqrt(square_avg - grad_avg^2) + eps`` with
      ``centered=True``; no bias correction.

    Another optimizer with Adam-style ``betas``, ``eps`` and ``exp_avg_sq`` state gets Adam's
    ``P``; SGD, which does not precondition, raises. Alternatively pass ``P``'s diagonal as a
    parameter-space vector. The largest eigenvalue is the preconditioned sharpness, compared
    with ``stability_threshold(optimizer)``. The first-moment bias corrections and the
    momentum (NAdam's schedule included) belong to the threshold, not to ``P``.

    Args:
        op: the operator (a model operator when ``optimizer`` is an optimizer).
        optimizer: an adaptive optimizer, or ``P``'s diagonal as a parameter-space vector.
        group_lr: fold each parameter group's learning rate relative to the first
            training group's into ``P`` (``P · η_1/η_g``), so that that group's threshold
            bounds the operator when the groups' learning rates differ
            (:func:`group_learning_rates`).

    Returns:
        The preconditioned operator, with ``eps`` and ``dead_fraction`` (the fraction of
        entries where eps dominates ``P``: the root below eps, Adamax's ``u`` below 2 eps)
        from the optimizer.

    Raises:
        ValueError: the optimizer has no state yet, is SGD or has no Adam-style
            ``betas``/``eps``, or moves none of the operator's parameters; or a
            preconditioner entry is not finite and > 0. (A parameter of the operator that
            the optimizer does not hold, holds at learning rate 0 while another group
            trains, or holds without state while others have theirs is not moved by it:
            ``P = inf``.)
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        diag, eps, dead = _optimizer_preconditioner(op, optimizer, group_lr)
        return PreconditionedOperator(op, diag, eps=eps, dead_fraction=dead, frozen=True)
    if isinstance(optimizer, (tuple, list)):
        return PreconditionedOperator(op, optimizer)
    raise OptimizerSettingsError(
        f"optimizer: expected a torch optimizer or a preconditioner vector, got "
        f"{type(optimizer).__name__}"
    )
