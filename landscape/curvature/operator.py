"""Matrix-free curvature operators: the loss Hessian and the generalised Gauss-Newton matrix.

Every operator is a symmetric linear map on parameter-space vectors (tuples of tensors in
parameter order, METRICS.md G1) with ``matvec``, batched ``matmat`` and a matvec counter,
so the eigen, trace and density routines of :mod:`landscape.curvature.spectrum` work on
any of them.

* :class:`Hessian` -- ``H v = d/dt grad L(theta + t v)`` (Pearlmutter 1994), by
  forward-over-reverse ``torch.func.jvp(torch.func.grad(L), (theta,), (v,))``, batched
  over several ``v`` with ``torch.func.vmap``; double backward
  (``autograd.grad(autograd.grad(L, create_graph=True), grad_outputs=v)``) as fallback.
* :class:`GGN` -- ``G v = (1/N) sum_i J_i^T Lambda_i J_i v`` with ``Lambda_i`` the Hessian
  of the loss w.r.t. the model output (Schraudolph 2002; Martens 2020): one JVP, one
  output-space HVP, one VJP. Works for any loss that is a function of the outputs (MSE,
  cross-entropy, BCE, ...); it is PSD when the loss is convex in the outputs.

All evaluation goes through :mod:`landscape.isolation`: parameters are substituted with
``functional_call`` (cloned buffers, so BatchNorm statistics stay put), RNG state, module
modes, ``requires_grad`` and ``.grad`` are restored after every product, attention runs on
the SDPA math backend while differentiating, and no graph outlives a call.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.func import grad, grad_and_value, jvp, vjp, vmap

from landscape import distributed as _dist
from landscape.curvature._batches import (
    BatchSize,
    is_single_batch,
    materialize,
    microbatches,
    to_device,
)
from landscape.isolation import isolated, sdpa_math, stateless_call, stateless_closure
from landscape.params import ParamSpec, Vector, flatten, select_named_parameters, unflatten

__all__ = ["GGN", "CurvatureOperator", "Hessian", "MatrixOperator", "ModelOperator"]

LossFn = Callable[[Any, Any], torch.Tensor]
Closure = Callable[[nn.Module, Any], torch.Tensor]
Forward = Callable[[nn.Module, Any], "tuple[Any, Any]"]
_BACKENDS = ("auto", "func", "autograd")


class CurvatureOperator:
    """A symmetric linear operator on parameter-space vectors.

    Attributes: ``names`` and ``shapes`` of the parameter tensors it acts on, ``dim`` (the
    total number of entries), ``dtype``, ``device``, ``params`` (the current parameter
    values, detached) and ``n_matvec`` (single-vector products so far; ``matmat`` adds its
    batch size). Subclasses implement ``_matvec`` and optionally ``_matmat``.
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

    # -- the interface -------------------------------------------------------------------
    @property
    def params(self) -> Vector:
        return tuple(torch.zeros(s, dtype=self.dtype, device=self.device) for s in self.shapes)

    def matvec(self, v: Sequence[torch.Tensor]) -> Vector:
        """``A v`` for one parameter-space vector."""
        v = self._check(v, "v")
        out = self._matvec(v)
        self.n_matvec += 1
        return out

    def matmat(self, vs: Sequence[Sequence[torch.Tensor]]) -> list[Vector]:
        """``[A v for v in vs]``, batched where the operator supports it."""
        vs = [self._check(v, f"vs[{i}]") for i, v in enumerate(vs)]
        if not vs:
            return []
        out = self._matmat(vs)
        self.n_matvec += len(vs)
        return out

    def loss(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no loss")

    def gradient(self) -> Vector:
        raise NotImplementedError(f"{type(self).__name__} has no gradient")

    # -- flat helpers used by the solvers ------------------------------------------------
    def flat_matvec(self, x: torch.Tensor) -> torch.Tensor:
        return flatten(self.matvec(unflatten(x, self._like())))

    def flat_matmat(self, xs: torch.Tensor) -> torch.Tensor:
        like = self._like()
        outs = self.matmat([unflatten(x, like) for x in xs])
        return torch.stack([flatten(o) for o in outs])

    def to_dense(self) -> torch.Tensor:
        """The ``dim x dim`` matrix (``dim`` matvecs; for small operators and tests)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return self.flat_matmat(eye).T

    # -- internals -----------------------------------------------------------------------
    def _matvec(self, v: Vector) -> Vector:
        raise NotImplementedError

    def _matmat(self, vs: list[Vector]) -> list[Vector]:
        return [self._matvec(v) for v in vs]

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

    ``shapes`` splits the flat vector into tensors (default: one tensor of length ``n``).
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


class ModelOperator(CurvatureOperator):
    """Common machinery of :class:`Hessian` and :class:`GGN` (data, isolation, backends)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        data: Any,
        *,
        closure: Closure | None = None,
        params: ParamSpec = None,
        eval_mode: bool = True,
        max_batches: int | None = None,
        backend: str = "auto",
        batch_size: BatchSize | None = None,
        single_batch: bool | None = None,
        seed: int = 0,
        distributed: bool | None = None,
        microbatch_size: int | None = None,
    ) -> None:
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        # a DDP wrapper's forward would fire its gradient hooks and buffer broadcasts; the
        # functional evaluation uses the inner module (names without the "module." prefix)
        model = _dist.unwrap(model)
        named = select_named_parameters(model, params)
        if not named:
            raise ValueError("params: the model has no trainable parameters")
        dtypes = {p.dtype for p in named.values()}
        if len(dtypes) != 1:
            raise ValueError(f"params: selected parameters mix dtypes {sorted(map(str, dtypes))}")
        first = next(iter(named.values()))
        super().__init__(list(named), [p.shape for p in named.values()], first.dtype, first.device)
        self.model = model
        self.loss_fn = loss_fn
        self.closure = closure
        self.eval_mode = eval_mode
        self.backend = backend
        self.seed = seed
        self._param_objects = tuple(named.values())
        closure_mode = closure is not None or getattr(self, "forward", None) is not None
        # _rank_size: N_r of this rank, of the batches as given (before any cutting); see
        # _reduce_ranks
        self._batches, self._weights, self._rank_size = materialize(
            data,
            closure_mode=closure_mode,
            max_batches=max_batches,
            single_batch=single_batch,
            batch_size=batch_size,
        )
        if microbatch_size is not None:
            self._check_microbatching(eval_mode)
            self._batches, self._weights = microbatches(
                self._batches, self._weights, int(microbatch_size),
                closure_mode=closure_mode, batch_size=batch_size,
            )
        self.microbatch_size = microbatch_size
        self._options = dict(
            params=params, eval_mode=eval_mode, max_batches=max_batches, backend=backend,
            batch_size=batch_size, single_batch=single_batch, seed=seed, distributed=distributed,
            microbatch_size=microbatch_size,
        )
        # torch.distributed: decided once, here (so `landscape.distributed.local()` around the
        # construction keeps the operator local); see _accumulate
        self._distributed = _dist.enabled(distributed)
        self._options["distributed"] = self._distributed  # subset() inherits the decision
        self._rank_total: float | None = None
        self._deferred = False  # inside matmat: reduce once at the end
        self._func_failed: BaseException | None = None
        self._reverse_over_reverse = False
        self._graph: tuple[Any, ...] | None = None
        self._vmap_failed: BaseException | None = None
        self._cache: tuple[torch.Tensor, Vector] | None = None

    def _check_microbatching(self, eval_mode: bool) -> None:
        """Micro-batches change what a layer normalising by batch statistics computes: any
        BatchNorm in train mode, and one without running statistics in eval mode too."""
        for name, module in self.model.named_modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            if not eval_mode or module.running_mean is None:
                when = ("with eval_mode=False" if not eval_mode
                        else "(it has no running statistics)")
                raise ValueError(
                    f"microbatch_size: {name or 'the model'} ({type(module).__name__}) "
                    f"{when} would normalise each micro-batch by its own statistics, a "
                    "different operator; use running statistics or no micro-batches"
                )

    def _share_data(self, other: ModelOperator) -> None:
        """Give ``other`` (a :meth:`subset` built on one batch) this operator's batches,
        weights and rank size: the batches are already cut, so they are copied rather than
        cut again."""
        other._batches, other._weights = list(self._batches), list(self._weights)
        other._rank_size = self._rank_size
        other.microbatch_size = self.microbatch_size
        other._options["microbatch_size"] = self.microbatch_size

    # -- public conveniences ---------------------------------------------------------------
    @property
    def params(self) -> Vector:
        return tuple(p.detach() for p in self._param_objects)

    def matmat(self, vs: Sequence[Sequence[torch.Tensor]]) -> list[Vector]:
        if not self._distributed:
            return super().matmat(vs)
        # Distributed: this rank's products by whichever local path applies (vmapped, a loop,
        # the cached graph; it may differ between ranks with different batch counts), then
        # ONE all-reduce of the stacked results in a fixed layout (parameter-major, as the
        # vmapped path), so every rank issues the same collectives.
        self._deferred = True
        try:
            outs = super().matmat(vs)
        finally:
            self._deferred = False
        if not outs:
            return outs
        stacked = [torch.stack([o[i] for o in outs]) for i in range(len(self.shapes))]
        reduced = self._reduce_ranks(stacked)
        return [tuple(t[j] for t in reduced) for j in range(len(outs))]

    @property
    def batch_weights(self) -> tuple[float, ...]:
        """Weight ``n_b / N`` of every batch (equal when sizes are unknown)."""
        return tuple(self._weights)

    @property
    def backend_used(self) -> str | None:
        """How products ran so far: ``"func"``, ``"autograd"`` or ``"auto"`` (single products
        by double backward, batched ones by ``torch.func``); ``None`` before any product.
        ``"autograd"`` under ``backend="auto"`` means ``torch.func`` failed on this model."""
        if not self._ran:
            return None
        if self._func_failed or self._vmap_failed:
            return "autograd"
        return self.backend

    _ran = False

    def loss(self) -> torch.Tensor:
        """The (weighted mean) loss at the current parameters; computed once and cached."""
        return self._loss_and_grad()[0]

    def gradient(self) -> Vector:
        """The gradient of the loss at the current parameters; computed once and cached."""
        return self._loss_and_grad()[1]

    def refresh(self) -> None:
        """Forget the cached loss, gradient and gradient graph."""
        self._cache = None
        self._graph = None

    def _version_key(self) -> tuple[int, ...]:
        """Version counters of the parameters and buffers: they change on in-place updates."""
        tensors = [*self._param_objects, *self.model.buffers()]
        return tuple(t._version for t in tensors)

    # -- evaluation scaffolding ------------------------------------------------------------
    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with isolated(self.model, eval_mode=self.eval_mode), sdpa_math(), torch.enable_grad():
            if not self.eval_mode:
                # stochastic layers see the same noise in every product; only the generators
                # that `isolated` forked (CPU and the model's CUDA devices) are re-seeded
                torch.default_generator.manual_seed(self.seed)
                for index in self._cuda_devices():
                    torch.cuda.default_generators[index].manual_seed(self.seed)
            yield

    def _cuda_devices(self) -> list[int]:
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})

    def _current(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in zip(self.names, self._param_objects)}

    def _batch_loss(self, p: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        if self.closure is not None:
            out = stateless_closure(self.model, self.closure, p, batch)
        else:
            inputs, targets = batch
            out = self.loss_fn(stateless_call(self.model, p, inputs), targets)
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise ValueError("the loss must be a scalar tensor (mean-reduced over the batch)")
        return out.reshape(())

    def _run(self, func_impl: Callable[[], Any], autograd_impl: Callable[[], Any]) -> Any:
        self._ran = True
        if self.backend in ("autograd", "auto") or self._func_failed:
            with self._context():
                return autograd_impl()
        try:
            with self._context():
                return func_impl()
        except Exception as err:
            if self.backend == "func":
                raise
            self._func_failed = err
            with self._context():
                return autograd_impl()

    def _accumulate(self, per_batch: Callable[[Any], Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        total: list[torch.Tensor] | None = None
        for batch, w in zip(self._batches, self._weights):
            part = per_batch(to_device(batch, self.device))
            if total is None:
                total = [t * w if w != 1.0 else t for t in part]
            else:
                total = [a + w * t for a, t in zip(total, part)]
        assert total is not None
        return self._reduce_ranks([t.detach() for t in total])

    def _reduce_ranks(self, total: list[torch.Tensor]) -> list[torch.Tensor]:
        """Data parallel: every loss, gradient and product (all of them pass here) becomes
        the size-weighted mean over the ranks, sum_r (N_r / N) x_r, i.e. the value on the
        union of the ranks' data; one all-reduce of the flat result per call
        (landscape/distributed.py). All ranks run the same solver steps in lock step."""
        if not self._distributed or self._deferred:
            return total
        weight = self._rank_weight()
        if self._rank_total is None:
            self._rank_total = _dist.total_weight(weight)
        return _dist.all_reduce_weighted(total, weight, total=self._rank_total)

    def _rank_weight(self) -> float:
        """This rank's data size ``N_r`` (computed when the operator was built)."""
        return self._rank_size

    # -- loss and gradient -------------------------------------------------------------------
    def _loss_and_grad(self) -> tuple[torch.Tensor, Vector]:
        if self._cache is None:
            names = self.names

            def func_impl() -> list[torch.Tensor]:
                def one(batch: Any) -> list[torch.Tensor]:
                    g, value = grad_and_value(lambda q: self._batch_loss(q, batch))(
                        self._current()
                    )
                    return [value, *(g[n] for n in names)]

                return self._accumulate(one)

            def autograd_impl() -> list[torch.Tensor]:
                def one(batch: Any) -> list[torch.Tensor]:
                    leaves = self._leaves()
                    value = self._batch_loss(leaves, batch)
                    gs = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
                    return [value.detach(), *_zeros_for_none(gs, leaves.values())]

                return self._accumulate(one)

            out = self._run(func_impl, autograd_impl)
            self._cache = (out[0], tuple(out[1:]))
        return self._cache

    def _leaves(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().requires_grad_(True) for n, t in self._current().items()}

    # -- products ------------------------------------------------------------------------------
    def _matvec(self, v: Vector) -> Vector:
        tangent = dict(zip(self.names, v))

        def func_impl() -> list[torch.Tensor]:
            def one(batch: Any) -> list[torch.Tensor]:
                out = self._func_product(self._current(), tangent, batch)
                return [out[n] for n in self.names]

            return self._accumulate(one)

        def autograd_impl() -> list[torch.Tensor]:
            return self._accumulate(lambda batch: self._autograd_product(tangent, batch))

        return tuple(self._run(func_impl, autograd_impl))

    def _matmat(self, vs: list[Vector]) -> list[Vector]:
        if self._vmap_failed is not None or self.backend == "autograd" or self._func_failed:
            return [self._matvec(v) for v in vs]
        stacked = {n: torch.stack([v[i] for v in vs]) for i, n in enumerate(self.names)}
        try:
            with self._context():
                self._ran = True

                def one(batch: Any) -> list[torch.Tensor]:
                    primal = self._current()
                    out = vmap(lambda t: self._func_product(primal, t, batch))(stacked)
                    return [out[n] for n in self.names]

                flat = self._accumulate(one)
        except Exception as err:
            self._vmap_failed = err
            return [self._matvec(v) for v in vs]
        return [tuple(t[i] for t in flat) for i in range(len(vs))]

    def _func_product(
        self, primal: dict[str, torch.Tensor], tangent: dict[str, torch.Tensor], batch: Any
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _autograd_product(self, tangent: dict[str, torch.Tensor], batch: Any) -> list[torch.Tensor]:
        raise NotImplementedError


def _zeros_for_none(
    gs: Sequence[torch.Tensor | None], like: Any
) -> list[torch.Tensor]:
    return [torch.zeros_like(t) if g is None else g.detach() for g, t in zip(gs, like)]


class Hessian(ModelOperator):
    """The Hessian of the (mean) loss w.r.t. the selected parameters, matrix-free.

    ``Hessian(model, loss_fn, data)`` with ``loss_fn(model(inputs), targets)``, or
    ``Hessian(model, data=batches, closure=fn)`` with ``fn(model, batch) -> scalar loss``
    (dict inputs, language models, regularisers). ``data`` is one batch or an iterable of
    batches (read once and kept; the loss is the size-weighted mean of per-batch losses;
    ``max_batches`` keeps the first ones). Batch sizes come from the leading dimension of
    the first tensor in the inputs (loss_fn) or in the batch (closure), or from
    ``batch_size(batch) -> int`` (e.g. a token count); when a size is unknown all batches
    weigh the same. ``params`` selects a parameter subset (names, globs, modules; see
    :func:`landscape.params.select_named_parameters`): the operator is then the diagonal
    block of the full Hessian. ``eval_mode`` (default) evaluates with BatchNorm running
    statistics and dropout off. ``backend``: ``"func"`` (forward-over-reverse
    ``jvp(grad(L))`` everywhere, ``matmat`` batched by ``vmap``), ``"autograd"`` (double
    backward everywhere, ``matmat`` a loop) or ``"auto"`` (default: single products by
    double backward, the faster one on CPU, batched ``matmat`` by vmapped ``torch.func``;
    when ``torch.func`` cannot transform the model, ``matmat`` falls back to a loop of
    double-backward products). ``seed`` fixes the noise
    of stochastic layers when ``eval_mode=False`` (the global RNG is left untouched).
    ``cache_graph`` (double-backward products on a single batch): keep the gradient's graph
    between products, as PyHessian does, so a product is one backward pass; the graph is
    held by the operator only (never by the model), rebuilt when a parameter or buffer
    changes in place (version counters) and dropped by :meth:`refresh`.
    ``microbatch_size``: cut every batch into micro-batches of at most this many samples
    (tensors sliced along the leading dimension, weights by sample count), evaluated one
    after the other and summed. Peak memory is then that of one micro-batch's
    double-backward graph instead of the whole batch's, at the price of a forward and
    backward per micro-batch in every product (no cached graph); the operator is the same
    whenever the loss is a per-sample mean (a BatchNorm normalising by batch statistics --
    ``eval_mode=False``, or no running statistics -- is refused: they would change).
    docs/curvature.md has measurements.
    ``distributed`` (``None``: when a ``torch.distributed`` process group of several ranks
    is initialized, outside :func:`landscape.distributed.local`; ``False``: never): every
    loss, gradient and product is all-reduced over the ranks, weighted by each rank's data
    size, so the operator is that of the union of the ranks' data (docs/distributed.md);
    all ranks must then run the same computations. A ``DistributedDataParallel`` model is
    evaluated through its ``.module``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        data: Any = None,
        *,
        closure: Closure | None = None,
        params: ParamSpec = None,
        eval_mode: bool = True,
        max_batches: int | None = None,
        backend: str = "auto",
        batch_size: BatchSize | None = None,
        single_batch: bool | None = None,
        seed: int = 0,
        cache_graph: bool = True,
        distributed: bool | None = None,
        microbatch_size: int | None = None,
    ) -> None:
        if (loss_fn is None) == (closure is None):
            raise ValueError("Hessian: give exactly one of loss_fn and closure")
        self.cache_graph = cache_graph
        super().__init__(
            model, loss_fn, data, closure=closure, params=params, eval_mode=eval_mode,
            max_batches=max_batches, backend=backend, batch_size=batch_size,
            single_batch=single_batch, seed=seed, distributed=distributed,
            microbatch_size=microbatch_size,
        )

    def subset(self, params: ParamSpec) -> Hessian:
        new = Hessian(
            self.model, self.loss_fn, self._batches[0], closure=self.closure,
            cache_graph=self.cache_graph,
            **dict(self._options, params=params, single_batch=True, microbatch_size=None),
        )
        self._share_data(new)
        return new

    def _func_product(
        self, primal: dict[str, torch.Tensor], tangent: dict[str, torch.Tensor], batch: Any
    ) -> dict[str, torch.Tensor]:
        g = grad(lambda q: self._batch_loss(q, batch))
        if not self._reverse_over_reverse:
            try:
                return jvp(g, (primal,), (tangent,))[1]
            except RuntimeError:
                # some losses lack a forward-mode derivative of their backward (F.mse_loss in
                # torch 2.13: "ZeroTensors are immutable"); H is symmetric, so the VJP of
                # the gradient gives the same product
                self._reverse_over_reverse = True
        return vjp(g, primal)[1](tangent)[0]

    def _matvec(self, v: Vector) -> Vector:
        if self._valid_graph() is not None:
            # Fast path: the gradient's graph is built, so a product is one backward pass
            # through it. That runs no module code (no forward, RNG draw, mode switch, hook
            # or .grad write), hence needs no isolation context, whose save/restore costs
            # ~8% of a product on a 26k-parameter MLP.
            self._ran = True
            with torch.enable_grad():
                out = self._autograd_product(dict(zip(self.names, v)), None)
            w = self._weights[0]
            return tuple(self._reduce_ranks([t * w if w != 1.0 else t for t in out]))
        return super()._matvec(v)

    def _matmat(self, vs: list[Vector]) -> list[Vector]:
        if len(vs) == 1 and self.backend == "auto" and self._graph_cacheable():
            # One vector (SLQ with one probe, lock-step runs that lost their other probes):
            # the cached-graph backward pass is 2.5x faster than a vmapped forward-over-
            # reverse product (CPU, one thread: 29 vs 75 ms on a 26k-parameter MLP, 79 vs
            # 184 ms on a 46k-parameter transformer).
            return [self._matvec(vs[0])]
        return super()._matmat(vs)

    def _graph_cacheable(self) -> bool:
        uses_autograd = self.backend in ("autograd", "auto") or self._func_failed is not None
        return self.cache_graph and uses_autograd and len(self._batches) == 1

    def _valid_graph(self) -> tuple[Any, ...] | None:
        """The cached ``(key, leaves, gradient)`` if still valid for the current parameters."""
        if self._graph is None or not self._graph_cacheable():
            return None
        return self._graph if self._graph[0] == self._version_key() else None

    def _autograd_product(self, tangent: dict[str, torch.Tensor], batch: Any) -> list[torch.Tensor]:
        cache = self.cache_graph and len(self._batches) == 1
        graph = self._valid_graph() if cache else None
        if graph is not None:
            _, leaves, gs = graph
        else:
            key = self._version_key() if cache else None
            leaves = self._leaves()
            value = self._batch_loss(leaves, batch)
            gs = torch.autograd.grad(
                value, list(leaves.values()), create_graph=True, allow_unused=True
            )
            self._graph = (key, leaves, gs) if cache else None
        pairs = [
            (g, tangent[n]) for g, n in zip(gs, self.names) if g is not None and g.requires_grad
        ]
        if not pairs:
            return [torch.zeros_like(t) for t in leaves.values()]
        hv = torch.autograd.grad(
            [g for g, _ in pairs], list(leaves.values()),
            grad_outputs=[t for _, t in pairs], allow_unused=True, retain_graph=cache,
        )
        return _zeros_for_none(hv, leaves.values())


class GGN(ModelOperator):
    """The generalised Gauss-Newton matrix ``(1/N) sum_i J_i^T Lambda_i J_i`` (METRICS.md 1.2).

    ``Lambda_i`` is the Hessian of ``loss_fn`` w.r.t. the model output, obtained by
    automatic differentiation, so any loss of the outputs works: for mean ``MSELoss`` it is
    ``(2/C) I``, for softmax cross-entropy ``diag(p) - p p^T`` (the loss's own reduction is
    part of it). ``forward(model, batch) -> (outputs, targets)`` replaces the default
    ``(model(inputs), targets)`` for other batch structures (e.g. language models returning
    flattened logits and next tokens). Other arguments as in :class:`Hessian`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any = None,
        *,
        forward: Forward | None = None,
        params: ParamSpec = None,
        eval_mode: bool = True,
        max_batches: int | None = None,
        backend: str = "auto",
        batch_size: BatchSize | None = None,
        single_batch: bool | None = None,
        seed: int = 0,
        distributed: bool | None = None,
        microbatch_size: int | None = None,
    ) -> None:
        if loss_fn is None:
            raise ValueError("GGN: loss_fn is required (the GGN splits model output and loss)")
        self.forward = forward
        if forward is not None and single_batch is None:
            single_batch = is_single_batch(data, closure_mode=True)
        super().__init__(
            model, loss_fn, data, closure=None, params=params, eval_mode=eval_mode,
            max_batches=max_batches, backend=backend, batch_size=batch_size,
            single_batch=single_batch, seed=seed, distributed=distributed,
            microbatch_size=microbatch_size,
        )

    def subset(self, params: ParamSpec) -> GGN:
        new = GGN(
            self.model, self.loss_fn, self._batches[0], forward=self.forward,
            **dict(self._options, params=params, single_batch=True, microbatch_size=None),
        )
        self._share_data(new)
        return new

    def _model_output(self, p: dict[str, torch.Tensor], batch: Any) -> tuple[Any, Any]:
        """``(outputs, targets)`` with the parameters ``p`` substituted."""
        if self.forward is None:
            inputs, targets = batch
            return stateless_call(self.model, p, inputs), targets
        out, targets = stateless_closure(self.model, self.forward, p, batch)
        return out, _detach_tree(targets)

    def _batch_loss(self, p: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        out, targets = self._model_output(p, batch)
        value = self.loss_fn(out, targets)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError("the loss must be a scalar tensor (mean-reduced over the batch)")
        return value.reshape(())

    def _func_product(
        self, primal: dict[str, torch.Tensor], tangent: dict[str, torch.Tensor], batch: Any
    ) -> dict[str, torch.Tensor]:
        def fwd(q: dict[str, torch.Tensor]) -> tuple[Any, Any]:
            return self._model_output(q, batch)

        out, jv, targets = jvp(fwd, (primal,), (tangent,), has_aux=True)
        # output-space Hessian (small, symmetric) by reverse-over-reverse: F.mse_loss has no
        # forward-mode derivative of its backward in torch 2.13
        hjv = vjp(grad(lambda o: self.loss_fn(o, targets).reshape(())), out)[1](jv)[0]
        _, pullback, _ = vjp(fwd, primal, has_aux=True)
        return pullback(hjv)[0]

    def _autograd_product(self, tangent: dict[str, torch.Tensor], batch: Any) -> list[torch.Tensor]:
        leaves = self._leaves()
        out, targets = self._model_output(leaves, batch)
        if not out.requires_grad:
            return [torch.zeros_like(t) for t in leaves.values()]
        probe = torch.zeros_like(out, requires_grad=True)
        jt = torch.autograd.grad(
            out, list(leaves.values()), probe, create_graph=True, allow_unused=True
        )
        pairs = [(g, tangent[n]) for g, n in zip(jt, self.names) if g is not None]
        jv = torch.autograd.grad([g for g, _ in pairs], probe, [t for _, t in pairs])[0]
        o = out.detach().requires_grad_(True)
        go = torch.autograd.grad(self.loss_fn(o, targets).reshape(()), o, create_graph=True)[0]
        hjv = torch.autograd.grad(go, o, jv)[0] if go.requires_grad else torch.zeros_like(o)
        res = torch.autograd.grad(out, list(leaves.values()), hjv, allow_unused=True)
        return _zeros_for_none(res, leaves.values())


def _detach_tree(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach_tree(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detach_tree(v) for k, v in obj.items()}
    return obj
