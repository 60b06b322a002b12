"""Vectors in parameter space.

A parameter-space vector is a tuple of tensors with the shapes of the parameters it
belongs to (docs/conventions.md, parameter vector). These helpers are the one place for the
inner product, norms and linear combinations over such tuples, so every module agrees on
them (the long sums themselves are :mod:`landscape._sums`'s). They never touch ``.data``
of a model: they work on plain tensors.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Union

import torch
from torch import nn

# the per-tensor norms live with the solvers' accurate sums (landscape/_sums.py)
from landscape._sums import NORM_CHUNK, tensor_norms  # noqa: F401 (re-exported)

Vector = tuple[torch.Tensor, ...]


def trainable_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Named parameters with ``requires_grad=True`` in registration order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def weights_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype | None:
    """The one floating dtype of ``tensors``; None when they hold several (or none).

    The dtype a model's inputs are read in (the probe, the batches of a wrapper that casts
    them on the way in).
    """
    floating = {t.dtype for t in tensors if t.is_floating_point()}
    return next(iter(floating)) if len(floating) == 1 else None


def refuse_complex(named: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the complex-valued parameters among ``named``.

    Curvature, norms and update ratios are defined here for real parameters: a complex
    one was cast to its real part without a word, which gave eigenvalues 40 times the
    true ones (the Hessian over real and imaginary parts).
    """
    complex_ = [n for n, p in named.items() if p.is_complex()]
    if complex_:
        shown = ", ".join(complex_[:4]) + (f" and {len(complex_) - 4} more"
                                           if len(complex_) > 4 else "")
        raise ValueError(
            f"complex-valued parameters are not supported ({shown}): hold each as a real "
            "pair (a parameter of shape (..., 2), read with torch.view_as_complex)")


def has_lazy_parameters(model: nn.Module) -> bool:
    """Whether ``model`` holds lazy parameters without a shape yet.

    ``nn.LazyLinear`` and its kind take their shapes in their first forward pass.
    """
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())


def dot(u: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> torch.Tensor:
    """<u, v> summed over all tensors (a 0-d tensor).

    Tensors on several devices (a model split over GPUs) are summed on the host in float64:
    a 0-d tensor of one GPU cannot be added to another's.
    """
    if len(u) != len(v):
        raise ValueError(f"vectors have {len(u)} and {len(v)} tensors")
    if len({a.device for a in u}) > 1:
        return sum((torch.sum(a * b).to("cpu", torch.float64) for a, b in zip(u, v)),
                   torch.zeros((), dtype=torch.float64))
    return sum(
        (torch.sum(a * b) for a, b in zip(u, v)),
        torch.zeros((), dtype=u[0].dtype, device=u[0].device),
    )


def read_floats(tensors: Sequence[torch.Tensor]) -> list[float]:
    """0-d tensors as Python floats: one read-back for plain tensors of one device.

    On a GPU each ``float()`` waits for the device, so plain tensors are stacked and read
    at once (the values are the same). Tensor subclasses (the DTensor norms of an FSDP2
    model's shards) and tensors on several devices are read one by one, as ``float()``
    reads them.
    """
    if all(type(t) is torch.Tensor for t in tensors) and len({t.device for t in tensors}) == 1:
        return torch.stack([t.reshape(()) for t in tensors]).tolist()
    return [float(t) for t in tensors]


def stackable(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether per-tensor results of ``tensors`` stack into one tensor.

    True for a non-empty sequence of plain tensors (no DTensor shards) on one device, in
    one dtype: their fused norms (:func:`tensor_norms`) then stack.
    """
    return (bool(tensors) and all(type(t) is torch.Tensor for t in tensors)
            and len({(t.device, t.dtype) for t in tensors}) == 1)


def norm(v: Sequence[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm over all tensors (a 0-d tensor), in one fused pass where possible.

    Long tensors are reduced in chunks (:func:`tensor_norms`).
    """
    tensors = list(v)
    if not tensors:
        raise ValueError("norm of an empty vector")
    if len({(a.device, a.dtype) for a in tensors}) == 1:
        return torch.linalg.vector_norm(torch.stack(tensor_norms(tensors)))
    return torch.sqrt(dot(tensors, tensors))


def gradient_norm(params: Iterable[torch.Tensor]) -> float | None:
    """||grad|| over ``params``: a missing ``.grad`` counts as zero; None when none has one.

    Computed without gradients (the values of the detached ``.grad``, without a detached
    view of each: the monitor reads it at every step).
    """
    present = [g for p in params if (g := p.grad) is not None]
    if not present:
        return None
    with torch.no_grad():
        return float(norm(present))


def difference(u: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> Vector:
    """U - v (fused over the tensors)."""
    if len(u) != len(v):
        raise ValueError(f"vectors have {len(u)} and {len(v)} tensors")
    return tuple(torch._foreach_sub(list(u), list(v)))


def scale(v: Sequence[torch.Tensor], alpha: float | torch.Tensor) -> Vector:
    """Alpha * v."""
    return tuple(alpha * a for a in v)


def flatten(v: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate a parameter-space vector into one 1-D tensor.

    A sparse entry (the gradient, or a Hessian-vector product, of
    ``nn.Embedding(sparse=True)``) enters as the dense tensor it stands for.
    """
    return torch.cat([(a if a.layout == torch.strided else a.to_dense()).reshape(-1)
                      for a in v])


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> Vector:
    """Split a 1-D tensor back into the shapes of ``like``."""
    sizes = [a.numel() for a in like]
    if flat.numel() != sum(sizes):
        raise ValueError(f"flat vector has {flat.numel()} entries, expected {sum(sizes)}")
    return tuple(piece.reshape(a.shape) for piece, a in zip(torch.split(flat, sizes), like))


def gaussian_like(v: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> Vector:
    """Independent N(0, 1) entries with the shapes, dtype and device of ``v``.

    Drawn on the CPU in float32, then cast (float32 for an integer tensor), so one generator
    state gives the same numbers, to the dtype's rounding, on any device and in any dtype
    (a float64 draw is another stream altogether).
    """
    return tuple(
        torch.randn(a.shape, generator=generator, dtype=torch.float32).to(
            a.device, a.dtype if a.is_floating_point() else torch.float32)
        for a in v
    )


ParamSpec = Union[str, nn.Module, nn.Parameter, Iterable[Union[str, nn.Module, nn.Parameter]], None]


def select_named_parameters(model: nn.Module, spec: ParamSpec = None) -> dict[str, nn.Parameter]:
    """Trainable named parameters of ``model`` picked by ``spec``, in registration order.

    ``spec`` is ``None`` (all trainable parameters), or one or several of: an exact
    parameter name, a glob pattern over names (``"blocks.0.*"``, ``"*.weight"``), a
    submodule of ``model`` (all its trainable parameters) or a parameter object. A tied
    parameter is selected by any of its names and listed under its first one
    (``head.weight`` tied to ``emb.weight`` selects ``emb.weight``). Every item must match
    at least one trainable parameter, otherwise ``ValueError`` names it.
    """
    named = trainable_named_parameters(model)
    if spec is None:
        return named
    if isinstance(spec, (str, nn.Module, torch.Tensor)):
        items = [spec]
    elif hasattr(spec, "__iter__"):
        items = list(spec)
    else:
        raise ValueError(f"params: cannot select parameters with {type(spec).__name__}")
    if not items:
        raise ValueError("params: empty parameter selection")
    by_id = {id(p): n for n, p in named.items()}
    # every name a parameter has: a tied weight (a language model's output head sharing the
    # embedding) is listed once, under its first name, and selected by either
    aliases = {n: by_id[id(p)] for n, p in model.named_parameters(remove_duplicate=False)
               if id(p) in by_id}
    keep: set[str] = set()
    for item in items:
        if isinstance(item, str):
            hits = {canon for n, canon in aliases.items()
                    if n == item or fnmatch.fnmatchcase(n, item)}
        elif isinstance(item, nn.Module):
            hits = {by_id[id(p)] for p in item.parameters() if id(p) in by_id}
        elif isinstance(item, torch.Tensor):
            hits = {by_id[id(item)]} if id(item) in by_id else set()
        else:
            raise ValueError(f"params: cannot select parameters with {type(item).__name__}")
        if not hits:
            label = item if isinstance(item, str) else type(item).__name__
            raise ValueError(f"params: {label!r} matches no trainable parameter of the model")
        keep |= hits
    return {n: p for n, p in named.items() if n in keep}


def group_named_parameters(
    names: Iterable[str], depth: int = 1
) -> dict[str, list[str]]:
    """Group parameter names by their first ``depth`` dotted components (in first-seen order).

    ``["0.weight", "0.bias", "2.weight"]`` with ``depth=1`` gives
    ``{"0": ["0.weight", "0.bias"], "2": ["2.weight"]}``. A name with fewer components
    than ``depth + 1`` is grouped under its module path (everything but the last part).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        key = ".".join(parts[: min(depth, max(len(parts) - 1, 1))])
        groups.setdefault(key, []).append(name)
    return groups
