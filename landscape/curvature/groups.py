"""Per-layer / per-block spectra in one call: the diagonal blocks of the curvature."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from landscape.curvature.ggn import GGN
from landscape.curvature.hessian import Hessian
from landscape.curvature.spectrum import EigenResult, top_eigenvalues
from landscape.distributed import unwrap
from landscape.params import ParamSpec, group_named_parameters, trainable_named_parameters

__all__ = ["top_eigenvalues_by_group"]


def top_eigenvalues_by_group(
    model: nn.Module,
    loss_fn: Any = None,
    data: Any = None,
    *,
    groups: Mapping[str, ParamSpec] | int | None = None,
    k: int = 1,
    curvature: str = "hessian",
    closure: Any = None,
    operator_kwargs: Mapping[str, Any] | None = None,
    **eigen_kwargs: Any,
) -> dict[str, EigenResult]:
    """Top eigenvalues of the diagonal block of the Hessian (or GGN) for each group.

    ``groups`` maps a label to a parameter selection (names, globs, modules; see
    :func:`landscape.params.select_named_parameters`), or is an int ``depth`` to group by
    the first ``depth`` components of the parameter names (default 1: one group per
    top-level module; a tied parameter, listed once, belongs to the group of its first
    name: a head tied to the embedding is in the embedding's). The data are read once and
    shared by all groups. ``curvature`` is
    ``"hessian"`` or ``"ggn"``; ``operator_kwargs`` go to the operator (``eval_mode``,
    ``max_batches``, ...) and ``eigen_kwargs`` to :func:`top_eigenvalues` (``tol``,
    ``which``, ``seed``, ...). Returns ``{label: EigenResult}`` in the groups' order.
    """
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
    if curvature == "ggn" and closure is not None:
        raise ValueError("closure: the GGN needs loss_fn; pass operator_kwargs={'forward': ...}")
    model = unwrap(model)  # DDP, torch.compile: group by the wrapped module's names
    if groups is None or isinstance(groups, int):
        depth = 1 if groups is None else groups
        names = list(trainable_named_parameters(model))
        groups = dict(group_named_parameters(names, depth=depth))
    if not groups:
        raise ValueError("groups: no parameter groups")
    opts = dict(operator_kwargs or {})
    labels = list(groups)
    first = groups[labels[0]]
    if curvature == "hessian":
        base = Hessian(model, loss_fn, data, closure=closure, params=first, **opts)
    else:
        base = GGN(model, loss_fn, data, params=first, **opts)
    out: dict[str, EigenResult] = {}
    for i, label in enumerate(labels):
        op = base if i == 0 else base.subset(groups[label])
        out[label] = top_eigenvalues(op, k=k, **eigen_kwargs)
    return out
