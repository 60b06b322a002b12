"""How a model operator evaluates its model: isolation, seeding and the loss's shape.

Every loss, gradient and product of :class:`~landscape.curvature.ModelOperator` runs inside
:func:`evaluation`: the model's observable state is saved and restored
(:func:`landscape.isolation.isolated`), attention runs on the SDPA math backend (the one
with double backward and forward-mode AD), and with ``eval_mode=False`` the stochastic
layers draw the same noise in every product (docs/curvature.md, "Operators").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from landscape.isolation import (
    cuda_devices,
    differentiable,
    isolated,
    on_batch_statistics,
    rnn_differentiable,
    sdpa_math,
)

__all__ = ["detach_tree", "evaluation", "scalar_loss", "seed_generators", "zeros_for_none"]


@contextlib.contextmanager
def evaluation(
    model: nn.Module, *, eval_mode: bool, seed: int, batch_statistics: bool = False
) -> Iterator[None]:
    """Evaluate ``model`` on the side, with gradients on.

    Args:
        model: the model the operator differentiates.
        eval_mode: evaluate in eval mode (BatchNorm running statistics, dropout off); when
            False the generators are re-seeded with ``seed`` on entry.
        seed: the seed of the stochastic layers' noise when ``eval_mode`` is False.
        batch_statistics: in eval mode, normalisation layers on batch statistics
            (:func:`landscape.isolation.isolated`).

    Yields:
        Nothing; the model's RNG state, modes and gradients are restored on exit.
    """
    # in eval mode only the normalisation layers batch_statistics trains can write buffers
    # (not one the user froze in eval mode)
    writers = on_batch_statistics(model) if eval_mode and batch_statistics else []
    with isolated(model, eval_mode=eval_mode, batch_statistics=batch_statistics), \
            sdpa_math(), rnn_differentiable(model), differentiable():
        if eval_mode and not writers:
            yield
            return
        if not eval_mode:
            seed_generators(model, seed)
        # the forward runs on cloned buffers (stateless_call), but a backward that
        # recomputes a checkpointed forward runs it on the module's own buffers: in train
        # mode BatchNorm updates its running statistics there, in a fused kernel that
        # bumps no version counter (hence the comparison of values), and a spectral norm
        # its power-iteration vectors. Every buffer is kept and put back through .data,
        # which adds no version bump of its own (the recomputation's in-place writes, such
        # as num_batches_tracked += 1, have bumped it already: the values are restored, not
        # the version counters)
        kept = [(b, b._version, b.clone(), isinstance(m, nn.modules.batchnorm._NormBase))
                for m in (writers or model.modules()) for b in m._buffers.values()
                if b is not None]
        try:
            yield
        finally:
            for b, version, saved, norm_stats in kept:
                if b._version != version or (norm_stats and not torch.equal(b, saved)):
                    b.data.copy_(saved)


def seed_generators(model: nn.Module, seed: int) -> None:
    """Seed the generators :func:`~landscape.isolation.isolated` forked: CPU, model's CUDA.

    Stochastic layers then see the same noise in every product; the global RNG outside the
    isolation block is untouched.

    Args:
        model: the model whose CUDA devices are seeded.
        seed: the seed.
    """
    torch.default_generator.manual_seed(seed)
    for index in cuda_devices([*model.parameters(), *model.buffers()]):
        torch.cuda.default_generators[index].manual_seed(seed)


def scalar_loss(value: Any) -> torch.Tensor:
    """The loss as a 0-d tensor; the one check that a loss function returned a scalar.

    Args:
        value: what the loss function or closure returned.

    Returns:
        ``value`` reshaped to ``()``.

    Raises:
        ValueError: ``value`` is not a tensor with exactly one element.
    """
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError("the loss must be a scalar tensor (mean-reduced over the batch)")
    return value.reshape(())


def zeros_for_none(gs: Sequence[torch.Tensor | None], like: Any) -> list[torch.Tensor]:
    """Detached gradients, with zeros where autograd returned ``None`` (unused inputs).

    Args:
        gs: gradients from ``torch.autograd.grad(..., allow_unused=True)``.
        like: the tensors they are gradients with respect to.

    Returns:
        One tensor per entry of ``like``.
    """
    return [torch.zeros_like(t) if g is None else g.detach() for g, t in zip(gs, like)]


def detach_tree(obj: Any) -> Any:
    """``obj`` with every tensor in nested tuples, lists and dicts detached.

    Args:
        obj: a tensor, or a nest of tuples, lists and dicts.

    Returns:
        The same structure.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(detach_tree(o) for o in obj)
    if isinstance(obj, dict):
        return {k: detach_tree(v) for k, v in obj.items()}
    return obj
