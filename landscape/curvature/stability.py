"""Linear-stability (edge-of-stability) thresholds per optimiser.

For the quadratic ``f = lambda theta^2 / 2`` the PyTorch update rules are stable iff the
curvature is below (Cohen et al. 2021, arXiv:2103.00065; Cohen et al. 2022,
arXiv:2207.14484; docs/curvature.md, "Preconditioned operator and stability thresholds",
has the update rules and the numeric check):

* gradient descent: ``2 / lr``;
* heavy ball (``SGD(momentum=b, dampening=d)``): ``(2 + 2b) / ((1 - d) lr)``;
* Nesterov (``nesterov=True``): ``(2 + 2b) / ((1 + 2b) lr)``;
* Adam / AdamW / NAdam with a frozen preconditioner: ``(2 + 2 b1) / ((1 - b1) lr)`` on the
  *preconditioned* sharpness ``lambda_max(P^-1 H)`` (38 / lr at b1 = 0.9);
* RMSprop: ``2 / lr`` on the preconditioned sharpness (heavy-ball form with momentum).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["stability_threshold"]

_ADAM = ("adam", "adamw", "nadam", "radam", "adamax")
_NAMES = ("gd", "sgd", "heavy_ball", "momentum", "nesterov", "rmsprop", *_ADAM)


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
    ``dampening``, ``nesterov`` or ``betas`` are read from its first parameter group
    unless given) or a name: ``"gd"``/``"sgd"`` (momentum 0 unless given),
    ``"heavy_ball"``/``"momentum"``, ``"nesterov"``, ``"adam"``/``"adamw"``/``"nadam"``/
    ``"radam"``/``"adamax"`` (``betas`` default (0.9, 0.999)), ``"rmsprop"``. For Adam-type
    optimisers the threshold applies to the preconditioned sharpness
    (:func:`landscape.curvature.preconditioned`). Unknown optimisers raise ``ValueError``.

    Args:
        optimizer_or_name: a ``torch.optim`` optimizer or an optimiser's name.
        lr: the learning rate (read from the optimizer when not given).
        momentum: the momentum (SGD, RMSprop).
        betas: Adam's betas; only ``betas[0]`` matters.
        nesterov: Nesterov momentum (SGD).
        dampening: SGD's dampening.

    Returns:
        The threshold on the (preconditioned, for Adam and RMSprop) sharpness.

    Raises:
        ValueError: an unknown optimiser, no or a non-positive learning rate, or momentum,
            dampening or ``betas[0]`` outside ``[0, 1)``.

    Example:
        >>> round(stability_threshold("adam", lr=0.01), 6)  # 38 / lr at b1 = 0.9
        3800.0
    """
    if isinstance(optimizer_or_name, torch.optim.Optimizer):
        group = optimizer_or_name.param_groups[0]
        cls = type(optimizer_or_name).__name__.lower()
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
    lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
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
        return _heavy_ball(lr, beta, damp)
    b1 = float((betas or (0.9, 0.999))[0])
    if not 0.0 <= b1 < 1.0:
        raise ValueError(f"betas[0] must be in [0, 1), got {b1}")
    return (2.0 + 2.0 * b1) / ((1.0 - b1) * lr)
