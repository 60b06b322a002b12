"""The curvature-operator interface and its simplest implementation, an explicit matrix.

A curvature operator is a symmetric linear map ``v -> A v`` on parameter-space vectors:
tuples of tensors in parameter order (:data:`landscape.params.Vector`; docs/curvature.md,
"Operators"). The eigen, trace and density routines of :mod:`landscape.curvature.spectrum`
only ever call :meth:`CurvatureOperator.matvec` / :meth:`CurvatureOperator.matmat` (or
their flat forms), so they work on every operator: :class:`MatrixOperator`,
:class:`~landscape.curvature.Hessian`, :class:`~landscape.curvature.GGN` and
:class:`~landscape.curvature.PreconditionedOperator`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from landscape._deprecation import deprecated_alias
from landscape.params import Vector, flatten, unflatten

__all__ = ["CurvatureOperator", "MatrixOperator"]


def check_operator(op: Any) -> None:
    """Refuse what is not a :class:`CurvatureOperator` with a line that says what to pass.

    Raises:
        TypeError: ``op`` is a model, a matrix or anything else.
    """
    if isinstance(op, CurvatureOperator):
        return
    hint = ""
    if isinstance(op, torch.nn.Module):
        hint = ": build one from the model, ls.Hessian(model, loss_fn, data)"
    elif isinstance(op, torch.Tensor):
        hint = ": wrap a symmetric matrix in landscape.curvature.MatrixOperator(matrix)"
    raise TypeError(f"op: expected a curvature operator, got {type(op).__name__}{hint}")


class CurvatureOperator:
    """A symmetric linear operator on parameter-space vectors.

    A subclass writes one product hook, ``_matvec(v)``, and optionally a batched
    ``_matmat(vs)``; the public :meth:`matvec` and :meth:`matmat` check the vectors' shapes,
    cast them to the operator's dtype and device, and count the products.

    Args:
        names: the names of the parameter tensors the operator acts on, in order.
        shapes: their shapes.
        dtype: the dtype of vectors and products.
        device: the device of vectors and products.

    Attributes:
        names: the parameter names, a tuple.
        shapes: the parameter shapes, a tuple of ``torch.Size``.
        dim: the total number of entries, ``sum(prod(shape))``.
        dtype: the dtype of vectors and products.
        device: the device of vectors and products.
        n_matvec: single-vector products so far (:meth:`matmat` adds its batch size).
    """

    def __init__(
        self,
        names: Sequence[str],
        shapes: Sequence[torch.Size],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.names = tuple(names)
        self.shapes = tuple(torch.Size(s) for s in shapes)
        self.dtype = dtype
        self.device = torch.device(device)
        self.dim = int(sum(math.prod(s) for s in self.shapes))
        self.n_matvec = 0

    # -- the product count ---------------------------------------------------------------
    _n_matvec = 0
    _on_count: Callable[[int], None] | None = None
    """Called with the new count whenever it changes (a progress bar; ``products_bar``)."""

    @property
    def n_matvec(self) -> int:
        """Single-vector products so far (:meth:`matmat` adds its batch size)."""
        return self._n_matvec

    @n_matvec.setter
    def n_matvec(self, value: int) -> None:
        self._n_matvec = value
        if self._on_count is not None:
            self._on_count(value)

    # -- the interface -------------------------------------------------------------------
    @property
    def parameters(self) -> Vector:
        """The current parameter values, detached (zeros for an operator without a model)."""
        return tuple(torch.zeros(s, dtype=self.dtype, device=self.device) for s in self.shapes)

    params = deprecated_alias("params", "parameters")

    def matvec(self, v: Sequence[torch.Tensor]) -> Vector:
        """The product ``A v`` for one parameter-space vector.

        Args:
            v: one tensor per parameter, in parameter order, of the parameter's shape.

        Returns:
            ``A v`` as a tuple of tensors in the operator's dtype and device.

        Raises:
            ValueError: ``v`` has the wrong number of tensors or a tensor the wrong shape.
        """
        v = self._check(v, "v")
        out = self._matvec(v)
        self.n_matvec += 1
        return out

    def matmat(self, vs: Sequence[Sequence[torch.Tensor]]) -> list[Vector]:
        """The products ``[A v for v in vs]``, batched where the operator supports it.

        Args:
            vs: parameter-space vectors, each as for :meth:`matvec`.

        Returns:
            One product per vector, in order (``[]`` for no vectors).

        Raises:
            ValueError: a vector has the wrong number of tensors or a tensor the wrong shape.
        """
        vs = [self._check(v, f"vs[{i}]") for i, v in enumerate(vs)]
        if not vs:
            return []
        out = self._matmat(vs)
        self.n_matvec += len(vs)
        return out

    def loss(self) -> torch.Tensor:
        """The loss the operator is the curvature of.

        Returns:
            A scalar tensor.

        Raises:
            NotImplementedError: the operator has no loss (an explicit matrix).
        """
        raise NotImplementedError(f"{type(self).__name__} has no loss")

    def gradient(self) -> Vector:
        """The gradient of :meth:`loss`.

        Returns:
            A parameter-space vector.

        Raises:
            NotImplementedError: the operator has no loss (an explicit matrix).
        """
        raise NotImplementedError(f"{type(self).__name__} has no gradient")

    # -- flat helpers used by the solvers ------------------------------------------------
    def flat_matvec(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`matvec` on a flat vector.

        Args:
            x: a 1-D tensor of length :attr:`dim` (the parameters' entries concatenated).

        Returns:
            ``A x``, flat.
        """
        return flatten(self.matvec(unflatten(x, self._like())))

    def flat_matmat(self, xs: torch.Tensor) -> torch.Tensor:
        """:meth:`matmat` on the rows of a matrix.

        Args:
            xs: a ``(b, dim)`` tensor, one flat vector per row.

        Returns:
            The ``(b, dim)`` tensor of products, row by row.
        """
        like = self._like()
        outs = self.matmat([unflatten(x, like) for x in xs])
        return torch.stack([flatten(o) for o in outs])

    def to_dense(self) -> torch.Tensor:
        """The ``dim x dim`` matrix, from ``dim`` products (for small operators and tests).

        Returns:
            The matrix ``A`` in the operator's dtype and device.
        """
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return self.flat_matmat(eye).T

    # -- the product hooks ---------------------------------------------------------------
    def _matvec(self, v: Vector) -> Vector:
        raise NotImplementedError

    def _matmat(self, vs: list[Vector]) -> list[Vector]:
        return [self._matvec(v) for v in vs]

    # -- internals -----------------------------------------------------------------------
    def _like(self) -> list[torch.Tensor]:
        return [torch.empty(s, dtype=self.dtype, device="meta") for s in self.shapes]

    def _check(self, v: Sequence[torch.Tensor], what: str) -> Vector:
        if isinstance(v, torch.Tensor) or len(v) != len(self.shapes):
            raise ValueError(
                f"{what}: expected a tuple of {len(self.shapes)} tensors in parameter order"
            )
        out = []
        for t, s, name in zip(v, self.shapes, self.names):
            if t.shape != s:
                raise ValueError(f"{what}: tensor for {name!r} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(s)}")
            out.append(t.to(device=self.device, dtype=self.dtype))
        return tuple(out)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(dim={self.dim}, dtype={self.dtype}, n_matvec={self.n_matvec})"


class MatrixOperator(CurvatureOperator):
    """An explicit symmetric matrix as an operator (closed-form cases, tests, small models).

    Args:
        matrix: a square ``(n, n)`` tensor; its dtype and device are the operator's.
        shapes: how a flat vector of length ``n`` splits into tensors (default: one tensor
            of length ``n``); the parameters are named ``p0``, ``p1``, ...

    Raises:
        ValueError: ``matrix`` is not square, or ``shapes`` do not hold ``n`` entries.

    Example:
        >>> import torch
        >>> op = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0])))
        >>> op.matvec((torch.tensor([1.0, 1.0]),))
        (tensor([3., 1.]),)
    """

    def __init__(self, matrix: torch.Tensor, shapes: Sequence[Sequence[int]] | None = None) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        shapes = [torch.Size(s) for s in (shapes or [(matrix.shape[0],)])]
        names = [f"p{i}" for i in range(len(shapes))]
        super().__init__(names, shapes, matrix.dtype, matrix.device)
        if self.dim != matrix.shape[0]:
            raise ValueError(f"shapes hold {self.dim} entries, matrix is {matrix.shape[0]}")
        self.matrix = matrix

    def _matvec(self, v: Vector) -> Vector:
        return unflatten(self.matrix @ flatten(v), v)

    def _matmat(self, vs: list[Vector]) -> list[Vector]:
        out = torch.stack([flatten(v) for v in vs]) @ self.matrix.T
        return [unflatten(o, vs[0]) for o in out]
