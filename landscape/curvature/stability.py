"""Linear-stability (edge-of-stability) thresholds per optimiser.

For the quadratic ``f = lambda theta^2 / 2`` the PyTorch update rules are stable iff the
curvature is below (Cohen et al. 2021, arXiv:2103.00065; Cohen et al. 2022,
arXiv:2207.14484; docs/curvature.md, "Preconditioned operator and stability thresholds",
has the update rules and the numeric check):

* gradient descent: ``2 / lr``;
* heavy ball (``SGD(momentum=b, dampening=d)``): ``(2 + 2b) / ((1 - d) lr)``;
* Nesterov (``nesterov=True``): ``(2 + 2b) / ((1 + 2b) lr)``;
* Adam / AdamW / RAdam / Adamax with a frozen preconditioner: ``(2 + 2 b1) / ((1 - b1) lr)``
  on the *preconditioned* sharpness ``lambda_max(P^-1 H)`` (38 / lr at b1 = 0.9), with ``P``
  the diagonal the optimiser divides its step by (:func:`landscape.curvature.preconditioned`;
  RAdam before its rectification starts is SGD with EMA momentum, ``P = 1``: the same value
  on the Hessian itself);
* NAdam: ``(2 + 2 b1) / ((c_g (1 + b1) + c_m (1 - b1)) lr)`` on the preconditioned sharpness,
  with ``c_g = 1 - mu_t`` and ``c_m = mu_{t+1}`` its momentum schedule at the latest step
  (``(2 + 2 b1) / ((1 - b1)(1 + 2 b1) lr)`` = 13.57 / lr in the limit ``mu -> b1``);
* RMSprop: ``(2 + 2 momentum) / lr`` on the preconditioned sharpness (2 / lr without momentum).

First-moment bias corrections (``1 - b1^t``, NAdam's ``1 - prod mu``) tend to 1 within a few
dozen steps and are left out, as in Cohen et al. 2022.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch

__all__ = ["STABILITY_SETTINGS", "learning_rate", "optimizer_kind", "reference_group",
           "sharded_state", "stability_settings", "stability_threshold", "training_groups"]

_ADAM = ("adam", "adamw", "nadam", "radam", "adamax")
_NAMES = ("gd", "sgd", "heavy_ball", "momentum", "nesterov", "rmsprop", *_ADAM)
# most derived first: AdamW subclasses Adam in torch 2.13
_CLASSES = (
    ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
    ("nadam", torch.optim.NAdam), ("radam", torch.optim.RAdam),
    ("adamax", torch.optim.Adamax), ("rmsprop", torch.optim.RMSprop),
)
PRECONDITIONED = ("adam", "adamw", "nadam", "radam", "adamax", "rmsprop")
"""The optimiser kinds whose threshold bounds the preconditioned sharpness (RAdam: once its
rectification is on; before, its ``P`` is 1)."""


def optimizer_kind(optimizer: Any) -> str | None:
    """The kind of ``optimizer`` this module knows, or None.

    ``"sgd"``, ``"adam"``, ``"adamw"``, ``"nadam"``, ``"radam"``, ``"adamax"`` or
    ``"rmsprop"``: the ``torch.optim`` class it is an instance of (subclasses included), else
    its class name when that is one of them (lower-cased). A ``ZeroRedundancyOptimizer``
    over SGD is ``"sgd"``: its parameter groups hold SGD's settings for every parameter,
    which is all SGD's threshold reads. Over an adaptive optimiser it is None: each rank
    holds the second moments of its own shard only, which the preconditioned sharpness
    needs for every parameter (:func:`sharded_state`).

    Args:
        optimizer: an optimizer.

    Returns:
        The kind, or None for an optimiser without a known threshold.
    """
    inner = sharded_state(optimizer)
    if inner is not None:
        return "sgd" if issubclass(inner, torch.optim.SGD) else None
    for name, cls in _CLASSES:
        if isinstance(optimizer, cls):
            return name
    name = type(optimizer).__name__.lower()
    return name if name in (*_ADAM, "sgd", "rmsprop") else None


def sharded_state(optimizer: Any) -> type | None:
    """The optimizer class a ``ZeroRedundancyOptimizer`` runs on each rank's shard, or None.

    ``torch.distributed.optim.ZeroRedundancyOptimizer`` (or a subclass) keeps the user's
    parameter groups (with every parameter and the inner optimiser's settings) and builds
    the inner one on each rank's shard of them, so its state is split over the ranks. With
    ``overlap_with_ddp=True`` it holds the functional twin of the class (``_FunctionalSGD``),
    given back here as the ``torch.optim`` class it stands for.
    """
    if not any(c.__name__ == "ZeroRedundancyOptimizer" for c in type(optimizer).__mro__):
        return None
    inner = getattr(optimizer, "_optim_constructor", None)
    if not isinstance(inner, type):
        return None
    if not issubclass(inner, torch.optim.Optimizer):
        try:
            from torch.distributed.optim.utils import functional_optim_map
        except ImportError:  # torch built without distributed: no such optimizer either
            return None
        inner = {f: cls for cls, f in functional_optim_map.items()}.get(inner, inner)
    return inner


def learning_rate(value: Any) -> float:
    """A parameter group's ``lr`` as a float (NaN when it is none).

    Whatever ``float()`` reads as one number: a float, an int, a numpy scalar or 0-d
    array, a ``Decimal``, a 1-element tensor (``torch.optim.Adam(lr=torch.tensor(...))``);
    not a string.

    Args:
        value: the ``lr`` entry of a parameter group.

    Returns:
        The learning rate (NaN: missing or unreadable).
    """
    if value is None or isinstance(value, (str, bytes)):
        return math.nan
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 else math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def latest_step(optimizer: torch.optim.Optimizer) -> int:
    """The step count in the optimizer's state (its first parameter's with one), 0 if none."""
    for state in optimizer.state.values():
        if isinstance(state, dict) and "step" in state:
            return int(float(state["step"]))
    return 0


Groups = Union[torch.optim.Optimizer, Sequence[Mapping[str, Any]]]
"""An optimizer, or parameter groups as ``param_groups`` holds them (or a saved state has)."""

STABILITY_SETTINGS = ("lr", "momentum", "dampening", "nesterov", "betas")
"""The settings of a parameter group that its stability threshold reads."""


def stability_settings(group: Mapping[str, Any]) -> tuple[str, ...]:
    """A group's :data:`STABILITY_SETTINGS`, comparable (``repr`` of each, learning rate first)."""
    return tuple(repr(group.get(k)) for k in STABILITY_SETTINGS)


def training_groups(groups: Groups) -> list[Mapping[str, Any]]:
    """The parameter groups that move their parameters: holding some, learning rate > 0.

    A group at learning rate 0 (a frozen backbone kept in the optimizer, a layer not yet
    warmed up) and a group without parameters do not take part in the dynamics.
    """
    return [g for g in getattr(groups, "param_groups", groups)
            if g.get("params") and learning_rate(g.get("lr")) > 0]


def reference_group(groups: Groups) -> Mapping[str, Any]:
    """The group whose settings give the optimizer's stability threshold.

    The first group that trains (:func:`training_groups`); the first group when none does
    (every learning rate 0: the first step of a warm-up from 0). The sharpness metric
    scales the other groups by their learning rates relative to this one's
    (docs/curvature.md, "Parameter groups with different learning rates").
    """
    training = training_groups(groups)
    return training[0] if training else getattr(groups, "param_groups", groups)[0]


def nadam_momentum(beta1: float, momentum_decay: float, step: float) -> float:
    """NAdam's ``mu_t = beta1 (1 - 0.5 * 0.96^(t * momentum_decay))`` (torch.optim.NAdam)."""
    return beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))


def _heavy_ball(lr: float, beta: float, dampening: float = 0.0) -> float:
    return (2.0 + 2.0 * beta) / ((1.0 - dampening) * lr)


def stability_threshold(
    optimizer_or_name: Any,
    lr: float | None = None,
    *,
    momentum: float | None = None,
    betas: Sequence[float] | None = None,
    nesterov: bool | None = None,
    dampening: float | None = None,
) -> float:
    """The largest stable curvature for an optimiser at learning rate ``lr``.

    ``optimizer_or_name`` is a ``torch.optim`` optimizer (``lr``, ``momentum``,
    ``dampening``, ``nesterov`` or ``betas`` are read from its first parameter group that
    trains, :func:`reference_group`, unless given) or a name: ``"gd"``/``"sgd"``
    (momentum 0 unless given), ``"heavy_ball"``/``"momentum"``, ``"nesterov"``,
    ``"adam"``/``"adamw"``/``"nadam"``/``"radam"``/``"adamax"`` (``betas`` default
    (0.9, 0.999)), ``"rmsprop"``. For Adam, AdamW, NAdam, RAdam, Adamax and RMSprop the
    threshold applies to the preconditioned sharpness
    ``lambda_max(P^-1 H)`` of :func:`landscape.curvature.preconditioned` with the same
    optimizer (Cohen et al. 2022, arXiv:2207.14484), whose ``P`` is the diagonal the optimiser
    divides its step by (1 for RAdam before its rectification starts, when it is SGD with
    EMA momentum and the same value bounds the Hessian itself). NAdam's depends on its
    momentum schedule ``mu_t``: given the optimizer, at its latest step (the first before
    any); given the name, in the limit ``mu_t -> beta1`` of long training. Unknown
    optimisers raise ``ValueError``.

    Args:
        optimizer_or_name: a ``torch.optim`` optimizer or an optimiser's name.
        lr: the learning rate (read from the optimizer when not given).
        momentum: the momentum (SGD, RMSprop).
        betas: Adam's betas; only ``betas[0]`` matters (NAdam: with its step and
            ``momentum_decay`` when an optimizer is given).
        nesterov: Nesterov momentum (SGD).
        dampening: SGD's dampening.

    Returns:
        The threshold on the sharpness (the preconditioned one for the adaptive optimisers).

    Raises:
        ValueError: an unknown optimiser, no or a non-positive learning rate, or momentum,
            dampening or ``betas[0]`` outside ``[0, 1)``.

    Example:
        >>> round(stability_threshold("adam", lr=0.01), 6)  # 38 / lr at b1 = 0.9
        3800.0
    """
    mu: tuple[float, float] | None = None  # NAdam's (mu_t, mu_{t+1})
    if isinstance(optimizer_or_name, torch.optim.Optimizer):
        group = reference_group(optimizer_or_name)
        cls = optimizer_kind(optimizer_or_name) or ""
        if lr is None:
            lr = group.get("lr")
        if cls == "sgd":
            momentum = group.get("momentum", 0.0) if momentum is None else momentum
            nesterov = group.get("nesterov", False) if nesterov is None else nesterov
            dampening = group.get("dampening", 0.0) if dampening is None else dampening
            name = "nesterov" if nesterov and momentum else "sgd"
        elif cls in _ADAM:
            betas = group.get("betas") if betas is None else betas
            name = cls
            if cls == "nadam" and betas is not None:
                decay = float(group.get("momentum_decay", 4e-3))
                t = max(latest_step(optimizer_or_name), 1)
                b1 = float(betas[0])
                mu = (nadam_momentum(b1, decay, t), nadam_momentum(b1, decay, t + 1))
        elif cls == "rmsprop":
            momentum = group.get("momentum", 0.0) if momentum is None else momentum
            name = cls
        else:
            raise ValueError(
                f"optimizer_or_name: no stability threshold known for "
                f"{type(optimizer_or_name).__name__}; known: SGD, Adam, AdamW, NAdam, RAdam, "
                "Adamax, RMSprop"
            )
    elif isinstance(optimizer_or_name, str):
        name = optimizer_or_name.lower().replace("-", "_")
        if name not in _NAMES:
            raise ValueError(
                f"optimizer_or_name: unknown optimizer {optimizer_or_name!r}; "
                f"known: {', '.join(_NAMES)}"
            )
    else:
        raise ValueError(
            "optimizer_or_name: expected a torch optimizer or a name, got "
            f"{type(optimizer_or_name).__name__}"
        )
    if lr is None:
        raise ValueError("lr: a learning rate is required")
    rate = learning_rate(lr)
    if math.isnan(rate):
        raise ValueError(f"lr must be a number, got {lr!r}")
    lr = rate
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    beta = float(momentum or 0.0)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {beta}")
    damp = float(dampening or 0.0)
    if not 0.0 <= damp < 1.0:
        raise ValueError(f"dampening must be in [0, 1), got {damp}")
    if name in ("heavy_ball", "momentum") and momentum is None:
        raise ValueError(f"momentum: required for {name!r}")
    if name == "nesterov" or (name in ("sgd", "gd") and nesterov and beta > 0):
        if momentum is None:
            raise ValueError("momentum: required for 'nesterov'")
        return (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * lr)
    if name in ("gd", "sgd", "heavy_ball", "momentum", "rmsprop"):
        # torch's SGD dampens only the momentum buffer: without momentum it is plain GD
        return _heavy_ball(lr, beta, damp if beta > 0 else 0.0)
    b1 = float((betas or (0.9, 0.999))[0])
    if not 0.0 <= b1 < 1.0:
        raise ValueError(f"betas[0] must be in [0, 1), got {b1}")
    if name == "nadam":
        # theta <- theta - lr P^-1 (c_g g + c_m m), m the EMA of g: on f = x theta^2 / 2 the
        # characteristic root reaches -1 at x lr (c_g (1 + b1) + c_m (1 - b1)) = 2 + 2 b1
        c_g, c_m = (1.0 - mu[0], mu[1]) if mu is not None else (1.0 - b1, b1)
        return (2.0 + 2.0 * b1) / ((c_g * (1.0 + b1) + c_m * (1.0 - b1)) * lr)
    return (2.0 + 2.0 * b1) / ((1.0 - b1) * lr)
