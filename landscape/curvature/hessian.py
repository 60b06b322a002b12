"""The Hessian of the loss, as a matrix-free operator (Pearlmutter 1994).

``H v = d/dt grad L(theta + t v)`` at ``t = 0``: by forward-over-reverse
``torch.func.jvp(torch.func.grad(L), (theta,), (v,))``, batched over several ``v`` with
``torch.func.vmap``, or by double backward
``autograd.grad(autograd.grad(L, create_graph=True), grad_outputs=v)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.func import grad, jvp, vjp
from torch.nn.modules.module import register_module_forward_pre_hook

from landscape.curvature._evaluation import zeros_for_none
from landscape.curvature._model_operator import Closure, LossFn, ModelOperator, Tensors
from landscape.isolation import differentiable
from landscape.params import Vector

__all__ = ["Hessian"]


@contextlib.contextmanager
def _module_calls() -> Iterator[list[nn.Module]]:
    """Collect the modules whose forward runs inside a backward pass within the block.

    A global forward pre-hook, removed on exit, that counts a call only while this thread
    runs an autograd graph task (another thread's forward is not counted). A backward pass
    runs module code only when activation checkpointing recomputes a forward (of the
    model, or of any module its loss calls).
    """
    calls: list[nn.Module] = []

    def seen(module: nn.Module, args: Any) -> None:
        if torch._C._current_graph_task_id() != -1:
            calls.append(module)

    handle = register_module_forward_pre_hook(seen)
    try:
        yield calls
    finally:
        handle.remove()


class Hessian(ModelOperator):
    r"""The Hessian of the (size-weighted mean) loss w.r.t. the selected parameters.

    .. math::

        H = \nabla^2_\theta L(\theta), \qquad
        L(\theta) = \sum_b \frac{n_b}{N} \, \ell_b(\theta),

    with ``ell_b`` the mean-reduced loss of batch ``b`` of ``n_b`` samples. ``H v`` is
    computed matrix-free, never ``H`` itself (docs/curvature.md, "Operators").

    The loss is ``loss_fn(model(inputs), targets)`` on ``(inputs, targets)`` batches, or
    ``closure(model, batch)`` for other batch structures (dict inputs, language models,
    regularisers). ``data`` is read once and kept, so every product of a Krylov run sees
    the same data.

    Backends: ``"auto"`` (default) computes single products by double backward, the
    faster on CPU, and batched :meth:`matmat` by vmapped forward-over-reverse
    ``torch.func``, falling back to a loop of double-backward products when ``torch.func``
    cannot transform the model; ``"func"`` and ``"autograd"`` use one path everywhere.
    ``"first_order"`` takes central differences of gradients,
    ``(g(θ + εv) − g(θ − εv)) / 2ε`` (no double backward; relative error ~1e-5 in
    float32), which ``"auto"`` falls back to, with a warning, when the exact product is
    impossible (FSDP2-sharded parameters, no double backward); ``"exact"`` never does.

    With ``cache_graph`` (double-backward products on a single batch), the gradient's
    graph is kept between products, as PyHessian does, so a product is one backward pass;
    the graph is held by the operator only, rebuilt when a parameter or buffer changes in
    place (version counters) and dropped by :meth:`refresh`.

    ``microbatch_size`` bounds the memory of a product by that of one micro-batch, at the
    price of a forward and backward per micro-batch in every product (no cached graph); a
    BatchNorm normalising by batch statistics is refused (docs/curvature.md has the
    measurements). ``distributed`` all-reduces every loss, gradient and product, weighted
    by each rank's data size, so the operator is that of the union of the ranks' data
    (docs/distributed.md); all ranks must then run the same computations.

    Args:
        model: the model.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; give this or ``closure``.
        data: one batch or an iterable of batches (``max_batches`` keeps the first ones).
        closure: ``closure(model, batch) -> scalar loss``; give this or ``loss_fn``.
        cache_graph: keep the gradient's graph between products (single batch, autograd).
        **options: the shared options of :class:`~landscape.curvature.OperatorOptions`:
            ``params``, ``eval_mode``, ``batch_statistics``, ``max_batches``, ``backend``,
            ``batch_size``, ``single_batch``, ``seed``, ``distributed``, ``microbatch_size``.

    Raises:
        ValueError: not exactly one of ``loss_fn`` and ``closure``, or a bad option or data.
        TypeError: an unknown keyword argument.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from landscape.curvature import Hessian, top_eigenvalues
        >>> model = torch.nn.Linear(3, 1).double()
        >>> x = torch.eye(3, dtype=torch.float64)
        >>> H = Hessian(model, F.mse_loss, (x, torch.zeros(3, 1, dtype=torch.float64)))
        >>> H.dim
        4
        >>> round(top_eigenvalues(H, k=1).lambda_max, 4)  # 2/3 [[I, 1], [1^T, 3]]: 8/3
        2.6667
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        data: Any = None,
        *,
        closure: Closure | None = None,
        cache_graph: bool = True,
        **options: Any,
    ) -> None:
        if (loss_fn is None) == (closure is None):
            raise ValueError("Hessian: give exactly one of loss_fn and closure")
        self.cache_graph = cache_graph
        self._graph_runs_modules = False  # a backward through the cached graph runs modules
        super().__init__(model, loss_fn, data, closure=closure, **options)

    # -- the product hooks ---------------------------------------------------------------
    def _func_product(self, primal: Tensors, tangent: Tensors, batch: Any) -> Tensors:
        g = grad(lambda q: self._batch_loss(q, batch))
        if not self._backend.reverse_over_reverse:
            try:
                return jvp(g, (primal,), (tangent,))[1]
            except RuntimeError:
                # some losses lack a forward-mode derivative of their backward (F.mse_loss in
                # torch 2.13: "ZeroTensors are immutable"); H is symmetric, so the VJP of
                # the gradient gives the same product
                self._backend.reverse_over_reverse = True
        return vjp(g, primal)[1](tangent)[0]

    def _autograd_product(self, tangent: Tensors, batch: Any) -> list[torch.Tensor]:
        cache = self.cache_graph and len(self._data.batches) == 1
        graph = self._valid_graph() if cache else None
        if graph is not None:
            _, leaves, gs = graph
        else:
            key = self._version_key() if cache else None
            leaves = self._leaves()
            value = self._batch_loss(leaves, batch)
            if value.requires_grad:
                gs = torch.autograd.grad(
                    value, list(leaves.values()), create_graph=True, allow_unused=True
                )
            else:  # no selected parameter reaches the loss (an auxiliary head): zero
                gs = (None,) * len(leaves)
            self._check_reached(gs, leaves, batch)  # a block cut off is no zero curvature
            self._graph = (key, leaves, gs) if cache else None
        pairs = [
            (g, tangent[n]) for g, n in zip(gs, self.names) if g is not None and g.requires_grad
        ]
        if not pairs:
            return [torch.zeros_like(t) for t in leaves.values()]
        with _module_calls() as calls:
            hv = torch.autograd.grad(
                [g for g, _ in pairs], list(leaves.values()),
                grad_outputs=[t for _, t in pairs], allow_unused=True, retain_graph=cache,
            )
        if cache and graph is None:  # the product that built the graph
            self._graph_runs_modules = bool(calls)
        return zeros_for_none(hv, leaves.values())

    def _first_order_product(self, v: Vector) -> Vector:
        return self._first_order.hessian_product(v)

    def _fast_matvec(self, v: Vector) -> Vector | None:
        # The gradient's graph is built, so a product is one backward pass through it. That
        # usually runs no module code (no forward, RNG draw, mode switch, hook or .grad
        # write), hence needs no isolation context, whose save/restore is a sizeable share
        # of a product on small models (docs/benchmarks.md). Non-reentrant activation
        # checkpointing recomputes its forward inside every backward pass: seen in the
        # product that built the graph, the later ones run in the context too, so the
        # recomputation sees the modes, attention backend and RNG of the first forward.
        if self._valid_graph() is None:
            return None
        self._backend.ran = True
        scope = self._context() if self._graph_runs_modules else differentiable()
        with scope:
            out = self._autograd_product(dict(zip(self.names, v)), None)
        w = self._data.weights[0]
        return tuple(self._reduce([t * w if w != 1.0 else t for t in out]))

    def _prefers_single_products(self) -> bool:
        # One vector (SLQ with one probe, lock-step runs that lost their other probes): the
        # cached-graph backward pass is faster than a vmapped forward-over-reverse product
        # (docs/benchmarks.md).
        return self.options.backend == "auto" and self._graph_cacheable()

    # -- the gradient-graph cache --------------------------------------------------------
    def _graph_cacheable(self) -> bool:
        uses_autograd = self._backend.single_by_autograd
        return self.cache_graph and uses_autograd and len(self._data.batches) == 1

    def _valid_graph(self) -> tuple[Any, ...] | None:
        """The cached ``(key, leaves, gradient)`` if still valid for the current parameters."""
        if self._graph is None or not self._graph_cacheable():
            return None
        return self._graph if self._graph[0] == self._version_key() else None
