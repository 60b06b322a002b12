"""The optimizer recorded next to the weights: hyper-parameters and Adam's second moments.

The edge-of-stability threshold of the ``sharpness`` metric needs the learning rate and the
momentum (SGD: ``(2 + 2 beta) / lr``) or Adam's ``beta1`` and its preconditioner (Cohen et
al. 2022, "Adaptive gradient methods at the edge of stability", arXiv:2207.14484). Lightning
checkpoints hold ``optimizer_states`` and Hugging Face ``Trainer`` checkpoint folders
``optimizer.pt``, both a torch ``Optimizer.state_dict()``
(https://pytorch.org/docs/stable/generated/torch.optim.Optimizer.state_dict.html).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_second_moments", "optimizer_settings", "saved_parameters"]

_KEEP = ("lr", "momentum", "dampening", "nesterov", "betas", "eps", "weight_decay", "amsgrad")


def optimizer_settings(state: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``{"name": "sgd"|"adam"|"adamw", "lr": ..., ...}`` from an optimizer's ``state_dict``.

    The hyper-parameters of the first parameter group that trains (holding parameters, at
    a learning rate > 0; the first group when none does), as the sharpness threshold reads
    a live optimizer's (``landscape.curvature.stability.reference_group``); ``"adam"`` for
    Adam's kind, ``"adamw"`` for a group that says ``decoupled_weight_decay`` (torch's
    AdamW), ``"sgd"`` for SGD (told apart from NAdam, RAdam, Adamax, RMSprop by the
    keys they save, :func:`_saved_kind`). Another optimizer gives ``{"name": None,
    "unread": its name}``: no threshold is read for it. The state dict itself is kept
    under ``"state_dict"`` for :func:`load_second_moments`.

    Args:
        state: ``Optimizer.state_dict()`` as saved, or None.

    Returns:
        The settings, or None when the state holds no recognisable group.
    """
    from landscape.curvature.stability import reference_group

    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    if not groups or not all(isinstance(g, Mapping) for g in groups) or "lr" not in groups[0]:
        return None
    group = reference_group(groups)
    kind = _saved_kind(group, state.get("state"))
    if kind not in ("adam", "sgd"):  # read wrongly as Adam or SGD before (its threshold
        # 10x off for NAdam, an RMSprop checkpoint failed): said, and no threshold
        return {"name": None, "unread": kind, "state_dict": state}
    if kind == "adam" and group.get("decoupled_weight_decay"):  # torch's AdamW saves it
        kind = "adamw"  # the same threshold; the run's provenance names the class it was
    settings: dict[str, Any] = {"name": kind}
    for key in _KEEP:
        value = group.get(key)
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if value is not None:
            settings[key] = tuple(value) if key == "betas" else value
    settings["state_dict"] = state
    return settings


_ADAM_KEYS = ("amsgrad", "bias_correction", "correct_bias")
"""Group keys only Adam's kind saves beside ``betas``: torch's Adam and AdamW
(``amsgrad``), apex's and DeepSpeed's FusedAdam (``bias_correction``), transformers' old
AdamW (``correct_bias``)."""

_BEFORE_KEYS = (("grad_averaging", "LAMB"), ("max_grad_norm", "LAMB"),
                ("norm_type", "NovoGrad"), ("init_zero", "NovoGrad"),
                ("ns_steps", "Muon"), ("ns_coefficients", "Muon"))
"""Keys of optimizers that also save Adam's or SGD's (``bias_correction``, ``betas``;
``momentum``, ``nesterov``) but step otherwise: apex's and DeepSpeed's LAMB (a layer-wise
trust ratio), apex's NovoGrad, torch's Muon (orthogonalised updates)."""

_OTHER_KEYS = (("lr_decay", "Adagrad"), ("initial_accumulator_value", "Adagrad"),
               ("lambd", "ASGD"), ("etas", "Rprop"), ("history_size", "LBFGS"),
               ("rho", "Adadelta"), ("relative_step", "Adafactor"),
               ("beta2_decay", "Adafactor"))
"""A group key and the optimizer it names, among those analyze reads no threshold of."""


def _saved_kind(group: Mapping[str, Any], states: Any) -> str:
    """``"adam"`` (Adam, AdamW), ``"sgd"``, or the name of another optimizer.

    From the keys optimizers save in a group (and Adamax's ``exp_inf`` state): Adam's kind
    keeps one of :data:`_ADAM_KEYS` beside ``betas``, NAdam ``momentum_decay``; RAdam,
    SparseAdam and third-party optimizers with ``betas`` (Lion) none of them; SGD
    ``dampening``/``nesterov`` beside ``momentum``, RMSprop ``alpha`` and ``centered``;
    others by :data:`_OTHER_KEYS`, or their keys.
    """
    for key, name in _BEFORE_KEYS:  # optimizers saving keys of the kinds read below
        if key in group:
            return name
    if "betas" in group:
        if "momentum_decay" in group:
            return "NAdam"
        saved = states.values() if isinstance(states, Mapping) else ()
        if any(isinstance(st, Mapping) and "exp_inf" in st for st in saved):
            return "Adamax"
        if not any(k in group for k in _ADAM_KEYS):
            return "an optimizer with betas other than Adam (RAdam, Adamax, Lion, ...)"
        return "adam"
    if "momentum" in group:
        if "alpha" in group or "centered" in group:
            return "RMSprop"
        if "dampening" in group or "nesterov" in group:
            return "sgd"
        return "an optimizer with momentum other than SGD"
    for key, name in _OTHER_KEYS:
        if key in group:
            return name
    keys = ", ".join(sorted(str(k) for k in group if k != "params"))
    return f"an optimizer analyze does not know (its groups hold {keys})"


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


def saved_parameters(
    saved: Mapping[str, Any], orders: Sequence[Sequence[torch.nn.Parameter]],
    needs: Sequence[str] = (),
) -> dict[Any, torch.nn.Parameter] | None:
    """The parameters a saved optimizer ``state_dict``'s numbers stand for, or None.

    The saved state numbers the parameters group after group, by position only; ``orders``
    are candidate parameter orders (the model's; the Hugging Face ``Trainer``'s decay /
    no-decay split): the first in which every parameter's saved state holds the entries
    ``needs`` and tensors of that parameter's shape only (the evidence that the numbers
    mean those parameters) is taken.

    Args:
        saved: the saved ``state_dict``.
        orders: candidate orders of the parameters.
        needs: state entries every parameter must have (Adam's ``exp_avg_sq``).

    When no order fits but the parameters' shapes are all distinct, each saved state is
    the one parameter of its tensors' shape: groups listed in another order than the
    model's (a head first, at its own rate) are matched that way.

    Returns:
        ``{saved number: parameter}``, or None when no order fits.
    """
    ids = [i for g in saved.get("param_groups", []) for i in g.get("params", [])]
    states = saved.get("state", {})
    for order in orders:
        if len(order) == len(ids):
            of = dict(zip(ids, order))
            if all(_state_fits(states.get(i), p, needs) for i, p in of.items()):
                return of
    return _by_unique_shape(ids, states, orders[0] if orders else (), needs)


def _by_unique_shape(ids: Sequence[Any], states: Mapping[Any, Any],
                     params: Sequence[torch.nn.Parameter], needs: Sequence[str]
                     ) -> dict[Any, torch.nn.Parameter] | None:
    """Each saved number's parameter by the shape of its state, where no two share one."""
    by_shape = {tuple(p.shape): p for p in params}
    if len(by_shape) != len(params) or len(ids) != len(params):
        return None  # two parameters of one shape: which is which is not borne out
    of: dict[Any, torch.nn.Parameter] = {}
    for i in ids:
        state = states.get(i)
        if not isinstance(state, Mapping):
            return None
        shapes = {tuple(v.shape) for v in state.values() if isinstance(v, torch.Tensor)
                  and v.dim()}
        param = by_shape.get(next(iter(shapes))) if len(shapes) == 1 else None
        if param is None or not _state_fits(state, param, needs):
            return None
        of[i] = param
    return of if len({id(p) for p in of.values()}) == len(ids) else None


def _state_fits(state: Any, param: torch.nn.Parameter, needs: Sequence[str]) -> bool:
    """Whether a parameter's saved state holds ``needs`` and tensors, all of its shape."""
    if not isinstance(state, Mapping) or any(k not in state for k in needs):
        return False
    shapes = [tuple(v.shape) for v in state.values() if isinstance(v, torch.Tensor) and v.dim()]
    return bool(shapes) and all(shape == tuple(param.shape) for shape in shapes)


def load_second_moments(
    optimizer: torch.optim.Optimizer, saved: Mapping[str, Any],
    orders: Sequence[Sequence[torch.nn.Parameter]],
) -> bool:
    """Put a saved Adam state (``exp_avg_sq``, ``step``, ...) into ``optimizer``.

    The parameters are those :func:`saved_parameters` finds in ``orders`` for the saved
    moments.

    Args:
        optimizer: an Adam-type optimizer over the analyzed parameters.
        saved: the saved ``state_dict``.
        orders: candidate orders of the parameters.

    Returns:
        Whether a matching order was found and loaded.
    """
    of = saved_parameters(saved, orders, needs=("exp_avg_sq",))
    if of is None:
        return False
    states = saved.get("state", {})
    optimizer.state.clear()
    for i, p in of.items():
        optimizer.state[p] = {k: (v.to(p.device).clone() if isinstance(v, torch.Tensor)
                                  and v.dim() else v) for k, v in states[i].items()}
    return True
