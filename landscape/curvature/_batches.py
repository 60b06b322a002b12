"""Probe data for the curvature operators: one batch or a fixed list of batches.

A loader's curvature is the size-weighted mean of the per-batch curvatures (METRICS.md G4,
as PyHessian's ``dataloader_hv_product``): with mean-reduced per-batch losses
``L_b`` over ``n_b`` samples, ``L = sum_b (n_b / N) L_b``. The batches are read once and
kept, so every matvec of a Krylov run sees exactly the same data (a shuffling loader
would otherwise change the operator between iterations).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable, Mapping

import torch

from landscape.batches import leading_size, split, to_device

__all__ = [
    "BatchSize", "batch_sizes", "is_single_batch", "leading_size", "materialize", "microbatches",
    "to_device",
]

BatchSize = Callable[[Any], "int | None"]


def is_single_batch(data: Any, closure_mode: bool) -> bool:
    """Whether ``data`` is one batch rather than an iterable of batches.

    With ``loss_fn``: a tuple or list of length 2 whose first item is a tensor or a mapping,
    or a tuple of tensors followed by a tensor (several model inputs), is one
    ``(inputs, targets)`` batch. With a closure: a tensor, a mapping or a tuple is
    one batch; lists, loaders and other iterables are batches. Pass ``single_batch=`` to
    the operator to override.
    """
    if closure_mode:
        return isinstance(data, (torch.Tensor, Mapping, tuple))
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return False
    inputs, targets = data
    if isinstance(inputs, (torch.Tensor, Mapping)):
        return True
    # ((x1, x2), y): several model inputs and a tensor target; two batches would have a
    # pair, not a tensor, in second place
    return (
        isinstance(inputs, (tuple, list))
        and all(isinstance(t, torch.Tensor) for t in inputs)
        and isinstance(targets, torch.Tensor)
    )


def materialize(
    data: Any,
    *,
    closure_mode: bool,
    max_batches: int | None,
    single_batch: bool | None,
    batch_size: BatchSize | None,
) -> tuple[list[Any], list[float], float]:
    """The batches as a list, their weights ``n_b / N`` (equal if a size is unknown) and
    their total size ``N`` (the number of batches if a size is unknown)."""
    if data is None:
        raise ValueError("data: no probe data given (a batch or an iterable of batches)")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    single = is_single_batch(data, closure_mode) if single_batch is None else single_batch
    if single:
        batches = [data]
    else:
        if not isinstance(data, Iterable):
            raise ValueError(f"data: expected a batch or an iterable of batches, got {data!r}")
        batches = list(itertools.islice(iter(data), max_batches))
    if not batches:
        raise ValueError("data: the iterable of batches is empty")
    if not closure_mode:
        for b in batches:
            if not (isinstance(b, (tuple, list)) and len(b) == 2):
                raise ValueError(
                    "data: with loss_fn every batch must be an (inputs, targets) pair; "
                    "use closure= for other batch structures"
                )
    sizes = batch_sizes(batches, closure_mode, batch_size)
    if sizes is None:
        return batches, [1.0 / len(batches)] * len(batches), float(len(batches))
    total = sum(sizes)
    return batches, [s / total for s in sizes], total


def batch_sizes(
    batches: list[Any], closure_mode: bool, batch_size: BatchSize | None
) -> list[float] | None:
    """``batch_size(b)`` of every batch, by default the leading dimension of the inputs
    (``loss_fn``) or of the batch (closure); ``None`` when any size is unknown."""
    sizer = batch_size or (lambda b: leading_size(b if closure_mode else b[0]))
    sizes = [sizer(b) for b in batches]
    if any(s is None or s <= 0 for s in sizes):
        return None
    return [float(s) for s in sizes]


def microbatches(
    batches: list[Any],
    weights: list[float],
    size: int,
    *,
    closure_mode: bool,
    batch_size: BatchSize | None,
) -> tuple[list[Any], list[float]]:
    """Every batch cut into micro-batches of at most ``size`` samples, with weights.

    A micro-batch of batch ``b`` weighs ``w_b * n_c / n_b``, its share of the batch's samples,
    so the weighted sum of micro-batch losses is the weighted sum of batch losses whenever a
    batch's loss is the mean of per-sample losses -- the assumption under which loader
    weighting holds too. The share is measured by ``batch_size`` when it is additive over
    the pieces (a token count: the pieces' sizes sum to the batch's), else by the leading
    dimension (a sizer that returns ``None`` or a constant says nothing about the pieces).
    """
    if size < 1:
        raise ValueError(f"microbatch_size must be >= 1, got {size}")
    out_batches: list[Any] = []
    out_weights: list[float] = []
    for batch, w in zip(batches, weights):
        if closure_mode:
            pieces = split(batch, size)
        else:
            inputs, targets = batch
            n = leading_size(inputs)
            if n is None:
                raise ValueError("microbatch_size: the inputs have no batch dimension")
            pieces = [
                (i, t) for i, t in zip(split(inputs, size), _split_like(targets, n, size))
            ]
        sizes = _piece_sizes(batch, pieces, closure_mode, batch_size)
        total = float(sum(sizes))
        out_batches.extend(pieces)
        out_weights.extend(w * s / total for s in sizes)
    return out_batches, out_weights


def _piece_sizes(
    batch: Any, pieces: list[Any], closure_mode: bool, batch_size: BatchSize | None
) -> list[float]:
    """Sizes of the micro-batches of ``batch``: by ``batch_size`` if additive, else leading."""
    if batch_size is not None:
        sizes = batch_sizes(pieces, closure_mode, batch_size)
        whole = batch_size(batch)
        if sizes is not None and whole is not None and math.isclose(
            sum(sizes), float(whole), rel_tol=1e-9
        ):
            return sizes
    leading = batch_sizes(pieces, closure_mode, None)
    assert leading is not None  # split() found the batch dimension in every piece
    return leading


def _split_like(targets: Any, n: int, size: int) -> list[Any]:
    """Targets cut where the inputs were (``n`` samples in steps of ``size``)."""
    m = leading_size(targets)
    if m == n:
        return split(targets, size)
    if m is not None:
        raise ValueError(
            f"microbatch_size: the targets' leading dimension ({m}) is not the inputs' ({n}); "
            "give a closure= that splits such batches itself"
        )
    return [targets] * -(-n // size)
