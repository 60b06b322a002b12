"""The optimizer recorded next to the weights: hyper-parameters and Adam's second moments.

The edge-of-stability threshold of the ``sharpness`` metric needs the learning rate and the
momentum (SGD: ``(2 + 2 beta) / lr``) or Adam's ``beta1`` and its preconditioner (Cohen et
al. 2022, "Adaptive gradient methods at the edge of stability", arXiv:2207.14484). Lightning
checkpoints hold ``optimizer_states`` and Hugging Face ``Trainer`` checkpoint folders
``optimizer.pt``, both a torch ``Optimizer.state_dict()``
(https://pytorch.org/docs/stable/generated/torch.optim.Optimizer.state_dict.html).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

__all__ = ["load_second_moments", "optimizer_settings"]

_KEEP = ("lr", "momentum", "dampening", "nesterov", "betas", "eps", "weight_decay", "amsgrad")


def optimizer_settings(state: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``{"name": "sgd"|"adam", "lr": ..., ...}`` from an optimizer's ``state_dict``.

    The hyper-parameters of the first parameter group that trains (holding parameters, at
    a learning rate > 0; the first group when none does), as the sharpness threshold reads
    a live optimizer's (``landscape.curvature.stability.reference_group``); ``"adam"`` when
    it has ``betas`` (Adam, AdamW), ``"sgd"`` when it has ``momentum``. The state dict
    itself is kept under ``"state_dict"`` for :func:`load_second_moments`.

    Args:
        state: ``Optimizer.state_dict()`` as saved, or None.

    Returns:
        The settings, or None when the state holds no recognisable group.
    """
    from landscape.curvature.stability import learning_rate

    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    if not groups or not all(isinstance(g, Mapping) for g in groups) or "lr" not in groups[0]:
        return None
    group = next((g for g in groups if g.get("params") and learning_rate(g.get("lr")) > 0),
                 groups[0])
    if "betas" in group:
        name = "adam"
    elif "momentum" in group:
        name = "sgd"
    else:
        return None
    settings: dict[str, Any] = {"name": name}
    for key in _KEEP:
        value = group.get(key)
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if value is not None:
            settings[key] = tuple(value) if key == "betas" else value
    settings["state_dict"] = state
    return settings


def read_optimizer_file(path: Path) -> dict[str, Any] | None:
    """The settings of a Hugging Face ``optimizer.pt`` (weights only), or None.

    Args:
        path: the file.

    Returns:
        :func:`optimizer_settings` of it, None when absent or unreadable.
    """
    if not path.is_file():
        return None
    try:
        return optimizer_settings(torch.load(path, map_location="cpu", weights_only=True))
    except Exception:  # an optimizer we cannot read only costs the threshold
        return None


def load_second_moments(
    optimizer: torch.optim.Optimizer, saved: Mapping[str, Any],
    orders: Sequence[Sequence[torch.nn.Parameter]],
) -> bool:
    """Put a saved Adam state (``exp_avg_sq``, ``step``, ...) into ``optimizer``.

    The saved state numbers the parameters group after group; ``orders`` are candidate
    parameter orders (the model's; the Hugging Face ``Trainer``'s decay / no-decay split),
    the first whose every shape matches the saved moments is used.

    Args:
        optimizer: an Adam-type optimizer over the analyzed parameters.
        saved: the saved ``state_dict``.
        orders: candidate orders of the parameters.

    Returns:
        Whether a matching order was found and loaded.
    """
    ids = [i for g in saved.get("param_groups", []) for i in g.get("params", [])]
    states = saved.get("state", {})
    for order in orders:
        if len(order) != len(ids):
            continue
        pairs = list(zip(ids, order))
        if all(isinstance(states.get(i), Mapping) and "exp_avg_sq" in states[i]
               and tuple(states[i]["exp_avg_sq"].shape) == tuple(p.shape) for i, p in pairs):
            optimizer.state.clear()
            for i, p in pairs:
                optimizer.state[p] = {k: (v.to(p.device).clone() if isinstance(v, torch.Tensor)
                                          and v.dim() else v) for k, v in states[i].items()}
            return True
    return False
