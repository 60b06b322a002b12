"""Probe data for the curvature operators: one batch or a fixed list of batches.

A loader's curvature is the size-weighted mean of the per-batch curvatures
(docs/curvature.md, "Operators"; as PyHessian's ``dataloader_hv_product``): with
mean-reduced per-batch losses ``L_b`` over ``n_b`` samples, ``L = sum_b (n_b / N) L_b``.
The batches are read once and kept, so every matvec of a Krylov run sees exactly the same
data (a shuffling loader would otherwise change the operator between iterations).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from landscape.batches import leading_size, normal_tensors, sample_sequences, split, to_device
from landscape.distributed import all_gather_objects, rank, together
from landscape.findings import user_stacklevel
from landscape.isolation import loader_randomness_kept, on_batch_statistics

__all__ = [
    "BatchSize", "ProbeData", "batch_sizes", "check_microbatching", "is_single_batch",
    "leading_size", "materialize", "microbatches", "probe_data", "sample_sequences",
    "samples_in", "to_device",
]

BatchSize = Callable[[Any], "int | None"]


@dataclasses.dataclass(frozen=True)
class ProbeData:
    """The batches an operator evaluates, read once and kept.

    Attributes:
        batches: the batches (micro-batches when ``microbatch_size`` is set).
        weights: the weight ``n_b / N`` of each.
        rank_size: this rank's data size ``N_r`` of the batches as given (before any cut);
            the number of batches when a size is unknown.
        microbatch_size: the micro-batch size, or ``None``.
    """

    batches: tuple[Any, ...]
    weights: tuple[float, ...]
    rank_size: float
    microbatch_size: int | None = None


def probe_data(
    data: Any,
    *,
    closure_mode: bool,
    max_batches: int | None,
    single_batch: bool | None,
    batch_size: BatchSize | None,
    microbatch_size: int | None,
    collective: bool = False,
) -> ProbeData:
    """Read the probe data: :func:`materialize`, then :func:`microbatches` when asked.

    Args:
        data: one batch or an iterable of batches.
        closure_mode: batches go to a closure (or a ``forward``), not to ``loss_fn``.
        max_batches: keep the first ones only.
        single_batch: ``data`` is one batch (``None``: :func:`is_single_batch` guesses).
        batch_size: ``batch_size(batch) -> int | None``, by default the leading dimension.
        microbatch_size: cut every batch into micro-batches of at most this many samples.
        collective: the ranks of a process group read their data together (see
            :func:`materialize`).

    Returns:
        The batches, their weights and this rank's data size.

    Raises:
        ValueError: no data, an empty iterable, malformed batches, or bad sizes.
    """
    batches, weights, rank_size = materialize(
        data, closure_mode=closure_mode, max_batches=max_batches, single_batch=single_batch,
        batch_size=batch_size, collective=collective,
    )
    batches = [normal_tensors(b) for b in batches]  # a batch collated in inference mode
    if microbatch_size is not None:
        batches, weights = together(
            collective, "cutting the probe data into micro-batches",
            lambda: microbatches(batches, weights, int(microbatch_size),
                                 closure_mode=closure_mode, batch_size=batch_size),
        )
    return ProbeData(tuple(batches), tuple(weights), rank_size, microbatch_size)


def check_microbatching(
    model: nn.Module, eval_mode: bool, batch_statistics: bool = False
) -> None:
    """Refuse micro-batches where they would change the operator.

    Micro-batches change what a layer normalising by batch statistics computes: any
    BatchNorm in train mode (or with ``batch_statistics``, unless the user froze it in
    eval mode: :func:`~landscape.isolation.on_batch_statistics`), and one without running
    statistics in eval mode too.

    Args:
        model: the model.
        eval_mode: whether the operator evaluates in eval mode.
        batch_statistics: the operator's option of that name (normalisation layers on
            batch statistics in eval mode).

    Raises:
        ValueError: the model has such a layer.
    """
    trained = {id(m) for m in on_batch_statistics(model)} if batch_statistics else set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        on_batch = id(module) in trained
        if not eval_mode or on_batch or module.running_mean is None:
            when = ("with eval_mode=False" if not eval_mode
                    else "with batch_statistics=True" if on_batch
                    else "(it has no running statistics)")
            raise ValueError(
                f"microbatch_size: {name or 'the model'} ({type(module).__name__}) "
                f"{when} would normalise each micro-batch by its own statistics, a "
                "different operator; use running statistics or no micro-batches"
            )


def is_single_batch(data: Any, closure_mode: bool) -> bool:
    """Whether ``data`` is one batch rather than an iterable of batches.

    With ``loss_fn``: a tuple or list of length 2 whose first item is a tensor, or a
    mapping followed by targets that are not one (two dict batches are two), or a tuple of
    tensors followed by a tensor (several model inputs), is one ``(inputs, targets)``
    batch. With a closure: a tensor, a mapping or a tuple is
    one batch; lists, loaders and other iterables are batches. Pass ``single_batch=`` to
    the operator to override.

    Args:
        data: what was passed as ``data``.
        closure_mode: batches go to a closure (or a ``forward``), not to ``loss_fn``.

    Returns:
        True for one batch.
    """
    if closure_mode:
        return isinstance(data, (torch.Tensor, Mapping, tuple))
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return False
    inputs, targets = data
    if isinstance(inputs, torch.Tensor):
        return True
    if isinstance(inputs, Mapping):  # (inputs_dict, targets); two dict batches are a pair too
        return not isinstance(targets, Mapping)
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
    collective: bool = False,
) -> tuple[list[Any], list[float], float]:
    """The batches as a list, their weights and their total size.

    With ``collective`` (the operator reduces over the ranks of a process group) every rank
    calls this together, and bad data on one rank (no batch, a sizer that counts nothing:
    every token of its batches ignored) raises on every rank
    (:func:`landscape.distributed.raise_together`): alone, that rank would leave the
    others waiting in the first reduction.

    Args:
        data: one batch or an iterable of batches.
        closure_mode: batches go to a closure (or a ``forward``), not to ``loss_fn``.
        max_batches: keep the first ones only.
        single_batch: ``data`` is one batch (``None``: :func:`is_single_batch` guesses).
        batch_size: ``batch_size(batch) -> int | None``, by default the leading dimension.
        collective: check the data on every rank together (above).

    Returns:
        ``(batches, weights, total)``: the weights ``n_b / N`` (equal if a size is unknown)
        and the total size ``N`` (the number of batches if a size is unknown).

    Raises:
        ValueError: no data, an empty iterable, a batch that is not an ``(inputs,
            targets)`` pair with ``loss_fn``, or nothing to count (on any rank, with
            ``collective``).
    """
    batches, weights, total = together(collective, "reading the probe data", _materialize,
                                       data, closure_mode, max_batches, single_batch,
                                       batch_size, collective)
    if collective and batch_size is None:
        # the ranks' batches are several batches of one probe: weighted by their samples
        shares = all_gather_objects(_ignored_shares(batches))
        if rank() == 0 and all(s is not None for s in shares) \
                and len(set().union(*shares)) > 1:
            _warn_uneven("the ranks' batches")
    return batches, weights, total


def _materialize(
    data: Any, closure_mode: bool, max_batches: int | None, single_batch: bool | None,
    batch_size: BatchSize | None, collective: bool = False,
) -> tuple[list[Any], list[float], float]:
    """:func:`materialize` on this rank alone (the ranks' shares compared after it)."""
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
        with loader_randomness_kept(data):
            batches = list(itertools.islice(iter(data), max_batches))
    if not batches:
        raise ValueError("data: the iterable of batches is empty")
    if not closure_mode:
        for b in batches:
            if not (isinstance(b, (tuple, list)) and len(b) == 2):
                flat = next((t for t in (b, data) if isinstance(t, (tuple, list))
                             and len(t) > 2 and all(isinstance(x, torch.Tensor) for x in t)),
                            None)  # (x1, x2, y): read as batches, or one of 3 items
                raise ValueError(
                    "data: with loss_fn every batch must be an (inputs, targets) pair"
                    + (f", got {len(flat)} tensors: give several inputs as ((x1, x2, ...), y)"
                       if flat is not None else "")
                    + "; use closure= for other batch structures"
                )
    if batch_size is None and not collective and len(batches) > 1 \
            and len(_ignored_shares(batches) or ()) > 1:
        _warn_uneven("the batches")
    sizes = batch_sizes(batches, closure_mode, batch_size)
    if sizes is None:
        return batches, [1.0 / len(batches)] * len(batches), float(len(batches))
    total = sum(sizes)
    if total == 0:
        raise ValueError("batch_size: every batch has size 0 (no sample or token counts)")
    # a batch of size 0 (every token ignored) weighs nothing; its mean loss is 0/0
    kept = [(b, s) for b, s in zip(batches, sizes) if s > 0]
    return [b for b, _ in kept], [s / total for _, s in kept], total


def refuse_summed_loss(loss_fn: Any, several: bool) -> None:
    """Refuse a loss that sums over its samples (``reduction="sum"``) for several batches.

    Batches are averaged by their sizes (docs/conventions.md, "Loss reduction"): with a
    summed loss that is neither the sum nor the mean (3 batches gave a third of the one
    batch's curvature). One batch is fine: its curvature is ``N`` times the mean's.

    Raises:
        ValueError: ``several`` batches and a loss module or ``functools.partial`` with
            ``reduction="sum"``.
    """
    reduction = getattr(loss_fn, "reduction", None)
    if reduction is None and isinstance(loss_fn, functools.partial):
        reduction = loss_fn.keywords.get("reduction")
    if several and reduction == "sum":
        raise ValueError(
            "loss_fn: reduction='sum' over several batches: they are averaged by their sizes, "
            "which gives neither the sum nor the mean; use reduction='mean' (the curvature of "
            "the sum is N times it) or one batch (docs/conventions.md, 'Loss reduction')")


def _ignored_shares(batches: list[Any]) -> set[float] | None:
    """The shares of the batches' integer targets that are not -100, per row.

    Targets are ``(inputs, targets)``'s second item or a dict's ``labels``; -100 is
    ``F.cross_entropy``'s default ``ignore_index`` and the label of positions Hugging Face
    models leave out of their loss. Weighting by rows is right when every batch counts the
    same share of its targets (no -100 at all, or as many per row): one share. ``None``
    when a batch has no such targets.
    """
    shares = set()
    for batch in batches:
        targets = batch.get("labels") if isinstance(batch, Mapping) else (
            batch[1] if isinstance(batch, (tuple, list)) and len(batch) == 2 else None)
        if not isinstance(targets, torch.Tensor) or targets.is_floating_point() \
                or targets.dim() == 0 or targets.shape[0] == 0:
            return None
        counted = int((targets != -100).sum())
        shares.add(round(counted / targets.shape[0], 9))
    return shares


def _warn_uneven(where: str) -> None:
    """Warn that ``where`` hold -100 in unequal shares (:func:`_ignored_shares`)."""
    warnings.warn(
        f"data: the targets hold -100 (ignored positions, such as padding) in unequal "
        f"shares of {where}: they are weighted by their samples, not by the targets the "
        f"loss averages over, so the curvature of several batches is off; pass "
        f"batch_size=lambda b: <the count of targets that are not -100>, or give one "
        f"batch, or batches with equal shares (docs/conventions.md, 'Loss reduction')",
        RuntimeWarning, stacklevel=user_stacklevel())


def samples_in(batch: Any, closure_mode: bool) -> int | None:
    """The samples of one batch: its leading size (:func:`leading_size`).

    Of the whole batch when it goes to a closure or holds per-sample lists (images and
    their target dicts, :func:`sample_sequences`), else of its inputs (``loss_fn``'s
    ``(inputs, targets)``).
    """
    whole = closure_mode or sample_sequences(batch)
    return leading_size(batch if whole else batch[0])


def batch_sizes(
    batches: list[Any], closure_mode: bool, batch_size: BatchSize | None
) -> list[float] | None:
    """The size of every batch.

    Args:
        batches: the batches.
        closure_mode: batches go to a closure (size of the batch) or to ``loss_fn`` (size of
            the inputs).
        batch_size: ``batch_size(b) -> int | None``, by default the leading dimension.

    Returns:
        The sizes as floats (0 for a batch with nothing to count, e.g. every token
        ignored), or ``None`` when any size is unknown (or negative).
    """
    sizer = batch_size or (lambda b: samples_in(b, closure_mode))
    sizes = [sizer(b) for b in batches]
    if any(s is None or s < 0 for s in sizes):
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

    Args:
        batches: the batches.
        weights: their weights.
        size: the largest micro-batch, in samples.
        closure_mode: batches go to a closure (cut whole) or are ``(inputs, targets)``
            pairs (targets cut where the inputs are).
        batch_size: the operator's sizer, used for the shares when additive.

    Returns:
        ``(micro_batches, weights)``.

    Raises:
        ValueError: ``size < 1``, inputs without a batch dimension, or targets whose
            leading dimension differs from the inputs'.
    """
    if size < 1:
        raise ValueError(f"microbatch_size must be >= 1, got {size}")
    out_batches: list[Any] = []
    out_weights: list[float] = []
    for batch, w in zip(batches, weights):
        if closure_mode or sample_sequences(batch):  # images with their target dicts: cut
            pieces = split(batch, size)  # together, by index
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
        for piece, s in zip(pieces, sizes):
            if s > 0:  # a piece of size 0 (every token ignored) weighs nothing: left out
                out_batches.append(piece)
                out_weights.append(w * s / total)
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
