"""Dot products and norms of long vectors, summed accurately: the one home of both methods.

A float32 reduction over 10^8 entries loses most of its digits: measured on the CPU for a
GPT-2-small-sized vector (123.8M entries), ``torch.dot`` was 4.6e-4 off (relative), a
row-times-vector product 1.3e-3 and ``torch.linalg.vector_norm`` 1.3e-2, because partial
sums of that many terms grow until each new term is below their rounding (Higham, *Accuracy
and Stability of Numerical Algorithms*, 2nd ed., §4.2: the error bound of recursive
summation grows with the number of terms). Dot products summed as float32 partial results
over chunks of :data:`CHUNK` entries, added in float64, were 1.4e-9 and 5.6e-9 off (at most
3e-7 of the product of the norms on 1M-3M entries, where a plain float32 reduction was
1.3e-6 off); norms, whose float32 reduction over one chunk was still 1.2e-5 off, sum each
chunk's squares in float64 (7.5e-13 against the float64 norm of the same entries). The
Krylov solvers form their projected matrices, residuals and normalisations from such
reductions (docs/curvature.md, "Precision"), so they use these functions; a vector of at
most :data:`CHUNK` entries (and any float64 vector) is reduced exactly as before, in one
call.

Two shapes, two methods, each the cheapest accurate one for its callers:

* flat vectors and rows of a basis (the Krylov solvers): :func:`dots`, :func:`row_norms`,
  :func:`flat_norm`, in chunks of :data:`CHUNK` entries as above, and the squares of a
  list of tensors in float64 (:func:`squares_sum`, the first-order products' step);
* many parameter tensors at once (the monitor's gradient, update and parameter norms at
  every step): :func:`tensor_norms`, one fused ``torch._foreach_norm`` per call, long
  tensors cut into :data:`NORM_CHUNK`-entry views whose float32 norms are combined in
  float64 -- no float64 copy of 124M entries per training step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor

__all__ = [
    "CHUNK", "NORM_CHUNK", "dots", "flat_norm", "row_norms", "squares_sum", "tensor_norms",
    "work_dtype",
]

CHUNK = 2**20
"""Entries per partial sum of a long float32 (or 16-bit) reduction."""


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of long reductions and kept vectors for data of ``dtype``: at least float32.

    Products and forwards run in the model's own dtype; Krylov bases, Gram-Schmidt
    coefficients, dot products and the functional metrics' elementwise work are kept in
    at least float32, so a bfloat16/float16 model is multiplied in its own dtype but
    reduced in float32 (docs/conventions.md, "Precision"; docs/curvature.md, "Precision").

    Args:
        dtype: the data's (or the operator's) dtype.

    Returns:
        ``float32`` for 16-bit floats (and integers), else ``dtype`` (``float64`` stays).
    """
    return torch.promote_types(dtype, torch.float32)


def _chunked(n: int, dtype: torch.dtype) -> bool:
    return n > CHUNK and dtype != torch.float64


def dots(q: Tensor, w: Tensor) -> Tensor:
    """``q @ w`` in float64: rows ``q`` ``(m, n)`` (or one vector ``(n,)``) against ``w``.

    Args:
        q: the rows (or a vector).
        w: a vector of ``n`` entries.

    Returns:
        The ``m`` dot products (a 0-d tensor for a vector ``q``), float64, on ``w``'s device.
    """
    n = w.shape[-1]
    if not _chunked(n, w.dtype):
        return (q @ w).double()
    out = None
    for lo in range(0, n, CHUNK):
        part = (q[..., lo : lo + CHUNK] @ w[lo : lo + CHUNK]).double()
        out = part if out is None else out + part
    assert out is not None
    return out


def row_norms(x: Tensor) -> Tensor:
    """The Euclidean norm of each row of ``x`` ``(m, n)`` (or of a vector), float64."""
    if x.dim() == 0:
        return x.abs().double()
    n = x.shape[-1]
    if not _chunked(n, x.dtype):
        return torch.linalg.vector_norm(x, dim=-1).double()
    squares = None
    for lo in range(0, n, CHUNK):  # each chunk in float64 (a float32 norm of a whole
        # chunk was still 1.2e-5 off), a copy of at most CHUNK entries per row
        part = x[..., lo : lo + CHUNK].double().pow(2).sum(dim=-1)
        squares = part if squares is None else squares + part
    assert squares is not None
    return squares.sqrt()


def flat_norm(x: Tensor) -> float:
    """The Euclidean norm of one flat vector, as a float (:func:`row_norms`).

    Not :func:`landscape.params.norm`, which takes a list of parameter-shaped tensors.
    """
    return float(row_norms(x))


def squares_sum(tensors: Sequence[Tensor]) -> float:
    """The sum of the squares of every entry of ``tensors``, in float64, as a float.

    Widened :data:`CHUNK` entries at a time, so the float64 copies never hold more than
    one chunk and its squares (a float64 copy of all of GPT-2 small's parameters at once
    is 1 GB; of its token embedding alone 0.3 GB). A tensor of one chunk is summed as
    :func:`~landscape.params.dot` sums it (the same bits). The sums are kept per device;
    a model split over GPUs adds its devices' sums on the host.
    """
    sums: dict[torch.device, Tensor] = {}
    for t in tensors:
        for chunk in t.reshape(-1).split(CHUNK):
            wide = chunk.double()
            square = torch.sum(wide * wide)
            sums[t.device] = sums[t.device] + square if t.device in sums else square
    return sum(float(s) for s in sums.values())


NORM_CHUNK = 2**16
"""Entries per partial norm of a long tensor (:func:`tensor_norms`)."""


def _values(t: torch.Tensor) -> torch.Tensor:
    """``t``, or the stored values of a sparse ``t`` (COO coalesced first)."""
    if t.layout == torch.strided:
        return t
    return t.coalesce().values() if t.layout == torch.sparse_coo else t.values()


def tensor_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The Euclidean norm of each tensor, as ``torch._foreach_norm`` (one fused call).

    A float32 norm reduced over millions of entries loses digits: 2.4e-3 relative for a
    tensor of 38.6M entries (GPT-2 small's embedding) on the CPU, as any recursive sum of
    that many terms (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
    §4.2). A plain tensor of more than :data:`NORM_CHUNK` entries that is not float64 is
    therefore split into chunks of that size, whose norms (one more fused call) are
    combined in float64: 1.7e-7 there, for about 15 % more time on that tensor. Every
    other tensor's norm is bitwise ``torch._foreach_norm``'s.

    A sparse tensor (the gradient of ``nn.Embedding(sparse=True)``) counts by its stored
    values, duplicates summed (``coalesce``): the norm of the dense tensor it stands for.

    A 16-bit tensor (bfloat16, float16) is reduced in float32 and its norm returned in
    float32: in its own dtype a bfloat16 gradient's norm was 0.2 % off, and a float16
    one of norm 94,868 read inf (float16 ends at 65,504).

    Args:
        tensors: tensors of one device (as ``torch._foreach_norm`` needs).

    Returns:
        One 0-d tensor per input, in its dtype (float32 for a 16-bit one).
    """
    tensors = [_values(t) for t in tensors]
    long = [
        i for i, t in enumerate(tensors)
        if t.numel() > NORM_CHUNK and type(t) is torch.Tensor and t.dtype != torch.float64
    ]
    if not long:
        return _foreach_norms(tensors)
    is_long = set(long)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    short = [i for i in range(len(tensors)) if i not in is_long]
    if short:
        for i, n in zip(short, _foreach_norms([tensors[i] for i in short])):
            out[i] = n
    pieces = [list(tensors[i].reshape(-1).split(NORM_CHUNK)) for i in long]
    parts = _foreach_norms([c for chunks in pieces for c in chunks])
    at = 0
    for i, chunks in zip(long, pieces):
        squares = torch.stack(parts[at : at + len(chunks)]).double().pow(2).sum()
        out[i] = squares.sqrt().to(_norm_dtype(tensors[i].dtype))
        at += len(chunks)
    return [n for n in out if n is not None]


_HALF = (torch.float16, torch.bfloat16)


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor's norm is computed and returned in: float32 for 16-bit floats."""
    return torch.float32 if dtype in _HALF else dtype


def _foreach_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``torch._foreach_norm``, the 16-bit tensors among ``tensors`` reduced in float32."""
    half = [i for i, t in enumerate(tensors) if t.dtype in _HALF]
    if not half:
        return list(torch._foreach_norm(list(tensors)))
    out = list(tensors)
    rest = [i for i in range(len(tensors)) if i not in set(half)]
    if rest:
        for i, n in zip(rest, torch._foreach_norm([tensors[i] for i in rest])):
            out[i] = n
    try:
        wide = torch._foreach_norm([tensors[i] for i in half], 2, dtype=torch.float32)
    except TypeError:  # a torch whose _foreach_norm takes no dtype
        wide = [torch.linalg.vector_norm(tensors[i], dtype=torch.float32) for i in half]
    for i, n in zip(half, wide):
        out[i] = n
    return out
