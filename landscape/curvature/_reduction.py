"""Data-parallel reduction of a model operator's losses, gradients and products.

With ``torch.distributed`` (docs/distributed.md) every rank holds its own probe data of size
``N_r``; each loss, gradient and product becomes the size-weighted mean over the ranks,
``sum_r (N_r / N) x_r``, i.e. the value on the union of the ranks' data, by one all-reduce
of the flat result per call (one per dtype in it). All ranks run the same solver steps in lock step.

A failure on one rank must not leave the others waiting in a reduction: inside
:meth:`RankReduction.guarded` (every product, loss and gradient the operator is asked for)
each reduction is preceded by a vote (one all-reduce of one number), and a rank that
raises casts its vote in the guard instead, so every rank raises together
(:func:`landscape.distributed.raise_together`; docs/distributed.md, "GPU / NCCL notes").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from landscape import distributed as _dist
from landscape.params import Vector

__all__ = ["RankReduction"]


class RankReduction:
    """The all-reduce every loss, gradient and product of one operator passes through.

    Args:
        enabled: whether to reduce over the ranks (decided once, when the operator is built,
            so :func:`landscape.distributed.local` around the construction keeps it local).
        rank_size: this rank's data size ``N_r``, of the batches as given (before any cut
            into micro-batches).

    Attributes:
        enabled: whether results are reduced.
        rank_size: ``N_r``.
    """

    def __init__(self, enabled: bool, rank_size: float) -> None:
        self.enabled = enabled
        self.rank_size = rank_size
        self._total: float | None = None
        self._deferred = False
        self._guard: str | None = None  # what the guarded block computes, inside one

    def __call__(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The size-weighted mean over the ranks of each tensor (as is when not enabled).

        Args:
            tensors: this rank's results.

        Returns:
            The reduced results (the same list inside :meth:`deferred`).
        """
        if not self.enabled or self._deferred:
            return tensors
        return self._all_reduce(tensors)

    def pending(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Reduce now what a :meth:`deferred` block leaves unreduced; as is otherwise.

        For values a computation inside a batch of products needs reduced before the
        batch's own all-reduce (results outside such a block are reduced already).

        Args:
            tensors: this rank's results.

        Returns:
            The reduced results inside :meth:`deferred` (when enabled), else ``tensors``.
        """
        if not (self.enabled and self._deferred):
            return tensors
        return self._all_reduce(tensors)

    def _all_reduce(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._guard is not None:  # this rank got here: no error since the last vote
            _dist.raise_together(None, self._guard)
        if self._total is None:
            self._total = _dist.total_weight(self.rank_size)
        return _dist.all_reduce_weighted(tensors, self.rank_size, total=self._total)

    def vote_on_fallback(self, error: BaseException) -> None:
        """Inside a guarded block: ``error``, raised on this rank alone, raises on every rank.

        Unless every rank raised it at this point (a model no exact product works on): they
        then take the same fallback together. A rank that fell back alone (first-order
        products) issued other collectives than the rest. Outside a block, nothing.
        """
        if self._guard is not None:  # (set only when enabled)
            _dist.raise_together(error, self._guard, unless_all=True)

    @contextlib.contextmanager
    def guarded(self, what: str) -> Iterator[None]:
        """An error raised in the block on any rank raises on every rank (when enabled).

        Every reduction in the block is preceded by a vote: a rank that raises votes in
        its place, the others raise a ``ValueError`` naming it and its message (``what``:
        the work, for that message). An error every rank raised together (a vote's)
        passes as it is. A block inside another is the outer one's. What follows a
        block's last reduction works on the reduced values, the same on every rank, so
        its end casts no vote (one all-reduce less per product): an error there on one
        rank alone (none is known) would still leave the others waiting.

        Yields:
            Nothing.
        """
        if not self.enabled or self._guard is not None:
            yield
            return
        self._guard = what
        error: Exception | None = None
        try:
            yield
        except Exception as err:
            error = err
        finally:
            self._guard = None
        if error is not None:
            if _dist.agreed(error):
                raise error
            _dist.raise_together(error, what)  # (raises it here, the others at their vote)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Skip the reductions inside the block (a batch of products is reduced once after).

        Yields:
            Nothing.
        """
        outer, self._deferred = self._deferred, True
        try:
            yield
        finally:
            self._deferred = outer  # a block inside another leaves the outer one deferred

    def products(self, outs: list[Vector], n_tensors: int) -> list[Vector]:
        """Reduce a batch of products with one all-reduce (per dtype) in a fixed layout.

        The layout is parameter-major, as the vmapped path produces it, so every rank issues
        the same collectives whichever local path (vmapped, a loop, a cached graph) it took.

        Args:
            outs: this rank's products, one vector per input vector.
            n_tensors: the number of tensors in a vector.

        Returns:
            The reduced products, in order.
        """
        if not outs:
            return outs
        stacked = [torch.stack([o[i] for o in outs]) for i in range(n_tensors)]
        reduced = self(stacked)
        return [tuple(t[j] for t in reduced) for j in range(len(outs))]
