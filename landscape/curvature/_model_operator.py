"""The machinery shared by the model operators :class:`Hessian` and :class:`GGN`.

:class:`ModelOperator` holds everything that is not the curvature product itself: the
shared options (:class:`OperatorOptions`), the probe data and its loop
(:mod:`landscape.curvature._batches`), the evaluation context
(:mod:`landscape.curvature._evaluation`), the choice between ``torch.func`` and autograd
(:mod:`landscape.curvature._backend`), the data-parallel reduction
(:mod:`landscape.curvature._reduction`), the cached loss and gradient, and :meth:`subset`.
A subclass writes the product hooks only: ``_func_product`` (one product on one batch by
``torch.func``, vmappable) and ``_autograd_product`` (the same by autograd).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ContextManager, TypeVar

import torch
from torch import nn
from torch.func import grad_and_value, vmap

from landscape import distributed as _dist
from landscape._checks import callables
from landscape._errors import LandscapeError
from landscape.batches import model_call
from landscape.curvature._backend import Backend
from landscape.curvature._batches import (
    BatchSize,
    ProbeData,
    check_microbatching,
    microbatches,
    probe_data,
    refuse_summed_loss,
    to_device,
)
from landscape.curvature._evaluation import detach_tree, evaluation, scalar_loss, zeros_for_none
from landscape.curvature._first_order import FirstOrder, sharded_reason
from landscape.curvature._reduction import RankReduction
from landscape.curvature._shifted import NoGradientError
from landscape.curvature._symmetry import (
    ASYMMETRY_TOLERANCE,
    ROUNDING_MULTIPLE,
    asymmetry,
    nonlinearity,
    rademacher,
    remembered,
)
from landscape.curvature.base import CurvatureOperator
from landscape.isolation import (
    differentiable,
    on_batch_statistics,
    overrides_train,
    same_rng,
    stateless_call,
    stateless_closure,
)
from landscape.params import ParamSpec, Vector, refuse_complex, select_named_parameters

__all__ = ["Closure", "Forward", "LossFn", "ModelOperator", "OperatorOptions"]

_NO_GRAD_INPUTS = "None of the inputs have requires_grad=True"  # torch.utils.checkpoint

LossFn = Callable[[Any, Any], torch.Tensor]
Closure = Callable[[nn.Module, Any], torch.Tensor]
Forward = Callable[[nn.Module, Any], "tuple[Any, Any]"]
Op = TypeVar("Op", bound="ModelOperator")
Tensors = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class OperatorOptions:
    """The keyword options every model operator takes (docs/curvature.md, "Operators").

    Attributes:
        params: which parameters (names, globs, modules; see
            :func:`landscape.params.select_named_parameters`); ``None`` for all trainable
            ones. A subset gives the diagonal block of the full operator.
        eval_mode: evaluate in eval mode (BatchNorm running statistics, dropout off).
        batch_statistics: in eval mode, BatchNorm and InstanceNorm normalise by the
            batch's statistics, as in train mode, and dropout stays off: the function the
            optimizer descends, without its noise (:func:`landscape.isolation.isolated`).
            No micro-batches then. No effect with ``eval_mode=False``.
        max_batches: keep the first ``max_batches`` batches of an iterable.
        backend: ``"auto"``, ``"exact"``, ``"func"``, ``"autograd"`` or ``"first_order"``
            (:mod:`landscape.curvature._backend`, :mod:`landscape.curvature._first_order`).
        batch_size: ``batch_size(batch) -> int | None``, a batch's weight (e.g. a token
            count); by default the leading dimension of the inputs (``loss_fn``) or of the
            batch (closure).
        single_batch: ``data`` is one batch; ``None`` guesses from its structure.
        seed: the noise of stochastic layers when ``eval_mode=False``.
        distributed: all-reduce over a ``torch.distributed`` group (``None``: when one of
            several ranks is initialized, outside :func:`landscape.distributed.local`); on an
            operator, the decision taken when it was built.
        microbatch_size: cut every batch into micro-batches of at most this many samples.
    """

    params: ParamSpec = None
    eval_mode: bool = True
    batch_statistics: bool = False
    max_batches: int | None = None
    backend: str = "auto"
    batch_size: BatchSize | None = None
    single_batch: bool | None = None
    seed: int = 0
    distributed: bool | None = None
    microbatch_size: int | None = None

    @classmethod
    def from_kwargs(cls, owner: str, kwargs: dict[str, Any]) -> OperatorOptions:
        """The options from an operator's keyword arguments.

        Args:
            owner: the operator's class name, for the error message.
            kwargs: the keyword arguments.

        Returns:
            The options.

        Raises:
            TypeError: an argument that is no option.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        for name in kwargs:
            if name not in known:
                raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}")
        return cls(**kwargs)


class LossWithoutGraphError(LandscapeError, ValueError):
    """The loss does not depend on the parameters: it carries no gradient graph.

    Args:
        what: what computed it (``"loss_fn"``, ``"the closure"``).
    """

    def __init__(self, what: str) -> None:
        super().__init__(
            f"the loss has no gradient graph: {what} returns a value that does not depend "
            "on the parameters (.detach(), .item(), a new torch.tensor or torch.no_grad() "
            "inside it?); every curvature of it would be 0")


def _storage(t: torch.Tensor) -> int:
    """Where ``t``'s values live, for a cache key; 0 when it has no storage of its own.

    A DTensor's ``data_ptr`` is 0 and a sparse tensor (a graph's adjacency buffer) has
    none: their versions alone key them.
    """
    if t.layout != torch.strided or _dist.is_sharded(t):
        return 0
    return t.data_ptr()


class ModelOperator(CurvatureOperator):
    """Common machinery of :class:`Hessian` and :class:`GGN`: data, isolation, backends.

    Args:
        model: the model (a ``DistributedDataParallel`` wrapper is evaluated through its
            ``.module``, so its hooks never fire).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, or ``None`` with ``closure``.
        data: one batch or an iterable of batches.
        closure: ``closure(model, batch) -> scalar loss``, instead of ``loss_fn``.
        forward: ``forward(model, batch) -> (outputs, targets)``, instead of
            ``(model(inputs), targets)``.
        **options: the :class:`OperatorOptions`.

    Raises:
        ValueError: no trainable parameters selected, mixed dtypes, an unknown backend, bad
            data, or micro-batches with a BatchNorm that normalises by batch statistics.
        TypeError: an unknown keyword argument.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        data: Any,
        *,
        closure: Closure | None = None,
        forward: Forward | None = None,
        **options: Any,
    ) -> None:
        owner = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
        callables(f"{owner}: ", loss_fn=loss_fn, closure=closure, forward=forward)
        opts = OperatorOptions.from_kwargs(owner, options)
        backend = Backend(opts.backend)
        self.model = _dist.unwrap(model)
        self.loss_fn = loss_fn
        self.closure = closure
        self.forward = forward
        self._bind(opts.params)
        if opts.microbatch_size is not None:
            check_microbatching(self.model, opts.eval_mode, opts.batch_statistics)
        closure_mode = closure is not None or forward is not None
        # torch.distributed: decided once, here; subset() inherits the decision
        reduce = _dist.enabled(opts.distributed)
        whole_data = probe_data(
            data, closure_mode=closure_mode, max_batches=opts.max_batches,
            single_batch=opts.single_batch, batch_size=opts.batch_size, microbatch_size=None,
            collective=reduce,
        )
        self._data: ProbeData = whole_data
        _dist.together(reduce, "checking the loss's reduction", lambda: refuse_summed_loss(
            loss_fn, len(whole_data.batches) > 1))
        if opts.microbatch_size is not None:
            pieces, weights = _dist.together(
                reduce, "cutting the probe data into micro-batches",
                lambda: microbatches(
                    list(whole_data.batches), list(whole_data.weights),
                    int(opts.microbatch_size), closure_mode=closure_mode,
                    batch_size=opts.batch_size,
                ),
            )
            self._data = ProbeData(tuple(pieces), tuple(weights), whole_data.rank_size,
                                   int(opts.microbatch_size))
        self._reduce = RankReduction(reduce, self._data.rank_size)
        self.options = dataclasses.replace(opts, distributed=self._reduce.enabled)
        self._backend = Backend(backend.name, type(self).__name__, self._impossible(),
                                model=self.model)
        self._use_first_order()
        self._backend.vote = self._reduce.vote_on_fallback
        self._graph_checked = False  # the loss has a gradient graph (_check_loss_graph)
        self._symmetry_checked: set[str] = set()  # product paths checked (_check_symmetric)
        self._checking_symmetry = False
        self.refresh()
        cut = len(self._data.batches) > len(whole_data.batches)
        if cut or (reduce and opts.microbatch_size is not None):
            # the pieces' weighted losses must add up to the batches' (on a sample of the
            # first batch: a few no-grad passes over two micro-batches); under a process
            # group on every rank, whether its own batches were cut or not, since the
            # check is collective (a rank with nothing cut compares a batch with itself)
            from landscape.curvature._profile import check_losses_add_up

            check_losses_add_up(self, whole_data.batches[0], int(opts.microbatch_size))

    def _impossible(self) -> str | None:
        """Why the exact product cannot work on this model (FSDP2 shards), or ``None``."""
        return sharded_reason(self._param_objects)

    def _use_first_order(self) -> None:
        """Build the first-order engine; FSDP2 shards are reduced by the backward itself."""
        self._first_order = FirstOrder(self)
        if self._first_order.sharded:
            if self.options.distributed is False and _dist.is_distributed():
                raise ValueError(
                    "distributed=False: an FSDP-sharded model is evaluated by all its ranks "
                    "together (its forward all-gathers the parameters)"
                )
            self._reduce = RankReduction(False, self._data.rank_size)
            self.options = dataclasses.replace(self.options, distributed=_dist.is_distributed())

    def _bind(self, params: ParamSpec) -> None:
        """Select the parameters the operator acts on (sets names, shapes, dim, ...)."""
        named = select_named_parameters(self.model, params)
        if not named:
            raise ValueError("params: the model has no trainable parameters")
        refuse_complex(named)
        dtypes = {p.dtype for p in named.values()}
        if len(dtypes) != 1:
            by_dtype: dict[str, list[str]] = {}
            for n, p in named.items():
                by_dtype.setdefault(str(p.dtype), []).append(n)
            blocks = "; ".join(f"{d}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                               for d, names in sorted(by_dtype.items()))
            raise ValueError(
                f"params: selected parameters mix dtypes {sorted(by_dtype)} ({blocks}): an "
                "operator acts on parameters of one dtype; select one block with params= "
                "(names or patterns such as 'head.*')")
        first = next(iter(named.values()))
        CurvatureOperator.__init__(
            self, list(named), [p.shape for p in named.values()], first.dtype, first.device
        )
        self._param_objects = tuple(named.values())

    def subset(self: Op, params: ParamSpec) -> Op:
        """The same operator on another parameter block, sharing this one's data.

        Args:
            params: the parameter selection of the block.

        Returns:
            A new operator of the same kind: the diagonal block of the full operator for
            ``params``, with its own product count and caches.

        Raises:
            ValueError: ``params`` selects no trainable parameter or mixes dtypes.
        """
        new = copy.copy(self)
        new.options = dataclasses.replace(self.options, params=params)
        new._bind(params)
        new._backend = Backend(
            self.options.backend, type(self).__name__, new._impossible(), warn=False
        )
        if self._backend.first_order and not new._backend.first_order:
            new._backend._switch(str(self._backend.first_order_reason), warn=False)
        new._reduce = RankReduction(self._reduce.enabled, self._data.rank_size)
        new._symmetry_checked = set()
        new._use_first_order()
        new._backend.vote = new._reduce.vote_on_fallback
        new.refresh()
        return new

    # -- public conveniences ---------------------------------------------------------------
    @property
    def parameters(self) -> Vector:
        """The current values of the selected parameters, detached."""
        return tuple(p.detach() for p in self._param_objects)

    @property
    def eval_mode(self) -> bool:
        """Whether the model is evaluated in eval mode (:class:`OperatorOptions`)."""
        return self.options.eval_mode

    @property
    def backend(self) -> str:
        """The backend asked for (:class:`OperatorOptions`)."""
        return self.options.backend

    @property
    def seed(self) -> int:
        """The seed of stochastic layers when ``eval_mode=False``."""
        return self.options.seed

    @property
    def microbatch_size(self) -> int | None:
        """The micro-batch size, or ``None``."""
        return self._data.microbatch_size

    @property
    def batch_weights(self) -> tuple[float, ...]:
        """Weight ``n_b / N`` of every batch (equal when sizes are unknown)."""
        return self._data.weights

    @property
    def backend_used(self) -> str | None:
        """How evaluations ran so far: a backend name, ``"first_order"`` or ``None``.

        One of ``"func"``, ``"autograd"``, ``"auto"``, ``"exact"``, ``"first_order"``.

        ``"auto"``: single products by double backward, batched ones by ``torch.func``;
        ``"autograd"`` under ``backend="auto"`` means ``torch.func`` failed on this model;
        ``"first_order"``: central differences of gradients, asked for or because the exact
        product is impossible (:attr:`first_order_reason`); ``None`` before any evaluation.
        """
        return self._backend.used

    @property
    def first_order_reason(self) -> str | None:
        """Why products are first-order (``"asked for"`` or the failure), else ``None``."""
        return self._backend.first_order_reason

    def matmat(self, vs: Sequence[Sequence[torch.Tensor]]) -> list[Vector]:
        """The products ``[A v for v in vs]``, batched by ``vmap`` where possible.

        Distributed, this rank's products take whichever local path applies, then one
        all-reduce of the stacked results in a fixed layout, so every rank issues the same
        collectives.

        Args:
            vs: parameter-space vectors.

        Returns:
            One product per vector, in order.
        """
        if not self._reduce.enabled:
            return super().matmat(vs)
        # a wrong vector raises here, on its rank alone, as it did before any collective
        vs = [self._check(v, f"vs[{i}]") for i, v in enumerate(vs)]
        if not vs:
            return []
        with self._reduce.guarded("the curvature products"):
            with self._reduce.deferred():
                outs = self._matmat(vs)
            outs = self._reduce.products(outs, len(self.shapes))
        self.n_matvec += len(vs)
        return outs

    def matvec(self, v: Sequence[torch.Tensor]) -> Vector:
        """:meth:`CurvatureOperator.matvec`; distributed, an error on one rank raises on all.

        A forward that fails on one rank (out of memory, a loss that fails on its data)
        raises on every rank rather than leave the others in the reduction
        (docs/distributed.md, "GPU / NCCL notes"); likewise :meth:`matmat` and the loss and
        gradient when they are computed.
        """
        v = self._check(v, "v")  # (on its rank alone, before any collective)
        with self._reduce.guarded("the curvature products"):
            out = self._matvec(v)
        self.n_matvec += 1
        return out

    def loss(self) -> torch.Tensor:
        """The (size-weighted mean) loss at the current parameters; cached until they change.

        Returns:
            A scalar tensor.
        """
        return self._loss_and_grad()[0]

    def gradient(self) -> Vector:
        """The gradient of the loss at the current parameters; cached until they change.

        Returns:
            A parameter-space vector.
        """
        return self._loss_and_grad()[1]

    def refresh(self) -> None:
        """Forget the cached loss, gradient and gradient graph (after parameters changed).

        Also what the first-order engine learned at the parameters (its step and
        ``L(θ)``), which it otherwise keys on the parameters' versions.
        """
        self._cache: tuple[torch.Tensor, Vector] | None = None
        self._cache_key: tuple[int, ...] | None = None
        self._graph: tuple[Any, ...] | None = None
        self._checkpoint_cut: dict[frozenset, bool] = {}  # _cut_by_checkpoint(), by leaves
        engine = getattr(self, "_first_order", None)
        if engine is not None:
            engine.reset()

    # -- the product hooks: what a subclass writes ---------------------------------------
    def _func_product(self, primal: Tensors, tangent: Tensors, batch: Any) -> Tensors:
        """One product on one batch by ``torch.func`` (vmappable over ``tangent``)."""
        raise NotImplementedError

    def _autograd_product(self, tangent: Tensors, batch: Any) -> list[torch.Tensor]:
        """One product on one batch by autograd, in parameter order."""
        raise NotImplementedError

    def _fast_matvec(self, v: Vector) -> Vector | None:
        """A product that needs no evaluation context (a cached graph), or ``None``."""
        return None

    def _first_order_product(self, v: Vector) -> Vector:
        """One product from gradients only (:mod:`landscape.curvature._first_order`)."""
        raise NotImplementedError

    def _prefers_single_products(self) -> bool:
        """Whether a batch of one vector should take :meth:`_matvec` rather than ``vmap``."""
        return False

    # -- evaluation ------------------------------------------------------------------------
    def _context(self) -> ContextManager[None]:
        return evaluation(self.model, eval_mode=self.options.eval_mode, seed=self.options.seed,
                          batch_statistics=self.options.batch_statistics)

    def _version_key(self) -> tuple[int, ...]:
        """Version counters and storages of the parameters and buffers.

        A counter changes on an in-place update (an optimizer step, ``p.mul_`` under
        ``no_grad``), the storage on an assignment ``p.data = new`` (which bumps no
        counter; a DTensor's or a sparse tensor's version alone is kept). An in-place
        write through ``p.data`` changes neither: ``refresh()``.

        With ``eval_mode=False`` BatchNorm normalises by batch statistics, so its running
        statistics are not part of the function and left out: a backward that recomputes
        a checkpointed forward writes them (and the evaluation puts them back). Not when a
        module overrides ``train()``: :func:`~landscape.isolation.isolated` honours it
        (a frozen BatchNorm reads its running statistics). With ``batch_statistics`` the
        layers it puts in train mode are left out alike.
        """
        buffers = list(self.model.buffers())
        opts = self.options
        if not opts.eval_mode:
            modules = list(self.model.modules())
            if not any(overrides_train(m) for m in modules):
                buffers = [b for m in modules for b in m._buffers.values() if b is not None
                           and not isinstance(m, nn.modules.batchnorm._NormBase)]
        elif opts.batch_statistics:
            trained = {id(m) for m in on_batch_statistics(self.model)}
            buffers = [b for m in self.model.modules() for b in m._buffers.values()
                       if b is not None and id(m) not in trained]
        return tuple(x for t in [*self._param_objects, *buffers] for x in (t._version, _storage(t)))

    def _current(self) -> Tensors:
        return {n: p.detach() for n, p in zip(self.names, self._param_objects)}

    def _leaves(self) -> Tensors:
        return {n: t.detach().requires_grad_(True) for n, t in self._current().items()}

    def _cut_by_checkpoint(self, batch: Any, leaves: Tensors) -> bool:
        """Whether a reentrant activation checkpoint receives inputs that need no gradient.

        ``torch.utils.checkpoint`` then warns "None of the inputs have requires_grad=True"
        and passes no gradient to the parameters inside it. One forward on ``batch`` with
        ``leaves`` substituted, its warnings recorded (not shown) and the RNG rewound after
        it; the answer is kept per set of leaves. Run only when a selected parameter
        received no gradient.
        """
        key = frozenset(leaves)
        if key not in self._checkpoint_cut:
            fresh = {n: t.detach().requires_grad_(True) for n, t in leaves.items()}
            with same_rng(self.model) as rewind, differentiable(), \
                    warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                try:
                    self._batch_loss(fresh, batch)
                finally:
                    rewind()
            self._checkpoint_cut[key] = any(_NO_GRAD_INPUTS in str(w.message) for w in seen)
        return self._checkpoint_cut[key]

    def _check_reached(self, grads: Sequence[Any], leaves: Tensors, batch: Any) -> None:
        """Raise when selected parameters are cut off from the loss by a checkpoint.

        A parameter without a gradient (``None`` from ``autograd.grad(...,
        allow_unused=True)``) is unused by the loss, or used where no gradient flows (an
        auxiliary head the loss does not read, a comparison), and its curvature is zero;
        or it sits inside a reentrant activation checkpoint whose inputs need no gradient
        (nothing upstream of it is selected), where a zero would be silently wrong
        (:meth:`_cut_by_checkpoint`). The first-order products then differentiate with
        respect to every trainable parameter, as training does.

        Args:
            grads: one gradient or ``None`` per leaf.
            leaves: the selected leaves, by name.
            batch: the batch they were evaluated on.

        Raises:
            NoGradientError: naming the parameters without a gradient.
        """
        missing = [n for n, g in zip(leaves, grads) if g is None]
        if missing and self._cut_by_checkpoint(batch, leaves):
            raise NoGradientError(missing)

    def _checked_nonzero(self, out: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """``out``, once checked: an all-zero first result may come from a loss without graph.

        ``torch.func`` differentiates a loss that does not depend on the parameters (a
        ``loss_fn`` that detaches) to zeros, and the first-order product does alike, so
        every curvature would be a silent 0. The first non-zero result ends the checks.
        """
        if not self._graph_checked:
            if any(bool(t.any()) for t in out):
                self._graph_checked = True
            else:
                self._check_loss_graph()
        return out

    def _check_loss_graph(self) -> None:
        """Raise :class:`LossWithoutGraphError` when the loss has no gradient graph.

        One forward of the loss on the first batch by autograd, every trainable parameter
        a leaf (selected parameters the loss does not reach have a curvature of 0, no
        error), run when a result was all zeros or the exact product raised, until a
        graph is seen. Every parameter inside a reentrant activation checkpoint whose
        inputs need no gradient leaves no graph either: :class:`NoGradientError` says so.
        """
        if self._graph_checked:
            return
        batch = to_device(self._data.batches[0], self.device)
        leaves = {n: p.detach().requires_grad_(True)
                  for n, p in self.model.named_parameters() if p.requires_grad}
        with self._context():
            value = self._batch_loss({**leaves, **self._leaves()}, batch)
        if not value.requires_grad:
            selected = self._leaves()
            if self._cut_by_checkpoint(batch, selected):  # the model's graph, not the loss's
                raise NoGradientError(list(selected))
            raise LossWithoutGraphError(
                "the closure" if self.closure is not None else "loss_fn")
        self._graph_checked = True

    def _model_output(self, p: Tensors, batch: Any) -> tuple[Any, Any]:
        """``(outputs, targets)`` with the parameters ``p`` substituted."""
        if self.forward is None:
            inputs, targets = batch
            return stateless_call(self.model, p, *model_call(self.model, inputs)), targets
        out, targets = stateless_closure(self.model, self.forward, p, batch)
        return out, detach_tree(targets)

    def _batch_loss(self, p: Tensors, batch: Any) -> torch.Tensor:
        if self.closure is not None:
            return scalar_loss(stateless_closure(self.model, self.closure, p, batch))
        return scalar_loss(self.loss_fn(*self._model_output(p, batch)))

    def _accumulate(self, per_batch: Callable[[Any], Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """The data loop: ``sum_b w_b per_batch(b)``, reduced over the ranks."""
        total: list[torch.Tensor] | None = None
        for batch, w in zip(self._data.batches, self._data.weights):
            part = per_batch(to_device(batch, self.device))
            if total is None:
                total = [t * w if w != 1.0 else t for t in part]
            else:
                total = [a + w * t for a, t in zip(total, part)]
        assert total is not None
        return self._reduce([t.detach() for t in total])

    def _loss_and_grad(self) -> tuple[torch.Tensor, Vector]:
        key = self._version_key()  # an in-place optimizer step changes the parameters
        if self._cache is not None and self._cache_key != key:
            self._cache = None
        if self._cache is None:
            self._cache_key = key

            def func_impl() -> list[torch.Tensor]:
                def one(batch: Any) -> list[torch.Tensor]:
                    g, value = grad_and_value(lambda q: self._batch_loss(q, batch))(
                        self._current()
                    )
                    return [value, *(g[n] for n in self.names)]

                return self._accumulate(one)

            def autograd_impl() -> list[torch.Tensor]:
                def one(batch: Any) -> list[torch.Tensor]:
                    leaves = self._leaves()
                    value = self._batch_loss(leaves, batch)
                    if value.requires_grad:
                        gs = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
                    else:
                        gs = (None,) * len(leaves)
                    self._check_reached(gs, leaves, batch)
                    return [value.detach(), *zeros_for_none(gs, leaves.values())]

                return self._accumulate(one)

            # guarded where it computes: a cached value needs no collective, and a rank
            # may read it alone
            with self._reduce.guarded("the loss and gradient"):
                out = self._backend.run(
                    self._context, func_impl, autograd_impl, self._first_order.loss_and_grad,
                    self._check_loss_graph,
                )
            self._checked_nonzero(out[1:])
            self._cache = (out[0], tuple(out[1:]))
        return self._cache

    # -- products ------------------------------------------------------------------------
    def _check_symmetric(self, batched: bool) -> None:
        """Check once per model and product path that the exact product is symmetric.

        Three products with fixed ±1 vectors and one along the sum of two (the products'
        rounding), not counted in ``n_matvec``, the first time a model's operator of this
        kind and parameters takes the path (:mod:`landscape.curvature._symmetry`). A
        product that is not symmetric beyond its rounding differentiates through a
        function torch cannot differentiate twice correctly: ``"auto"`` takes the
        first-order product, with one warning; a backend asked for by name is kept, with a
        warning that its numbers are wrong.
        """
        collective = self._reduce.enabled
        # over ranks, one check whatever path: ranks may take different local paths (a
        # cached graph on one batch, vmap on two) within one collective call
        path = "collective" if collective else "batched" if batched else "single"
        if self._checking_symmetry or path in self._symmetry_checked \
                or self._backend.first_order:
            return
        self._symmetry_checked.add(path)
        tolerance = ASYMMETRY_TOLERANCE.get(self.dtype, 1e-3)

        def local_products(vs: list[Vector]) -> list[Vector]:
            with self._reduce.deferred() if collective else contextlib.nullcontext():
                return self._matmat(vs) if batched else [self._matvec(v) for v in vs]

        def products_of(vs: list[Vector]) -> list[Vector]:
            self._checking_symmetry = True
            try:
                # the operator's first products: a forward that fails on one rank (its
                # probe of another width) fails every rank here, instead of leaving the
                # others in the reduction below (an unsharded model; an FSDP2 forward is
                # itself collective)
                products = _dist.together(collective, "the first curvature products",
                                          local_products, vs)
                # outside a public matmat: one all-reduce in a fixed layout; inside one
                # (already deferred) the products stay this rank's, each rank checks its
                # own operator, and the largest asymmetry decides for all
                if collective:
                    products = self._reduce.products(products, len(self.shapes))
            finally:
                self._checking_symmetry = False
            return products

        def decided(value: float) -> float:  # every rank decides alike
            return _dist.max_over_ranks(value, self.device) if collective else value

        def measure() -> float | None:
            vs = [rademacher(self.shapes, self.dtype, self.device, seed) for seed in (1, 2, 3)]
            # and along the sum of two, in the same call (the same path): the products' own
            # rounding, their departure from linearity (a wrong derivative is still
            # linear); near zero loss float32 cancellation makes a correct product as
            # asymmetric as it is nonlinear (docs/curvature.md)
            both = tuple(a + b for a, b in zip(vs[0], vs[1]))
            products = products_of([*vs, both])
            # an exact product raised on some rank meanwhile: no verdict on any
            if decided(float(self._backend.first_order)):
                return None
            value = decided(asymmetry(vs, products[:3]))
            noise = decided(nonlinearity(products[0], products[1], products[3]))
            return value if value > ROUNDING_MULTIPLE * noise else 0.0

        # the function differentiated: its modes (a function may run only in train mode),
        # whether a closure or forward replaces loss_fn; a collective check is remembered
        # apart (every rank must run it, also where one rank checked the model alone)
        opts = self.options
        key = (type(self).__name__, tuple(self.names), path, opts.eval_mode,
               opts.batch_statistics, self.closure is not None, self.forward is not None)
        try:
            value = remembered(self.model, key, measure)
        except BaseException:
            # not checked: the next products run the check again, with its guard that
            # fails every rank together (marked checked, a second call's failing forward
            # left the other ranks in an all-reduce)
            self._symmetry_checked.discard(path)
            raise
        if value is None or not value > tolerance or self._backend.first_order:
            return
        backend = self._backend
        if path == "batched" and backend.name in ("auto", "exact") \
                and backend.single_by_autograd and backend.vmap_failed is None:
            # the vmapped torch.func product is the wrong one (torch's forward-mode
            # derivative of some op at some shapes: BERT's, 2e-3 off in float64), not the
            # model's second derivative: batched products become a loop of exact
            # double-backward products, whose own symmetry is checked next
            backend.vmap_failed = RuntimeError(
                f"the vmapped torch.func products are not symmetric ({value:.2g})")
            if backend.say_once("vmapped products not symmetric"):  # (a monitor builds
                logging.getLogger("landscape").info(  # an operator at every measurement)
                    "landscape: %s: the vmapped torch.func curvature products are not "
                    "symmetric (%.2g of their size); using double-backward products one at "
                    "a time", type(self).__name__, value)
            self._check_symmetric(batched=False)
            return
        reason = (f"its products are not symmetric: <u, A w> and <w, A u> differ by "
                  f"{value:.2g} of the products' size, so the model differentiates through a "
                  "function whose backward is not differentiable (@once_differentiable) or "
                  "whose double backward torch computes wrongly (parametrizations.weight_norm)")
        if self._backend.name == "auto":
            self._backend._switch(reason, together=collective)  # (decided over the ranks)
        else:
            warnings.warn(
                f"{type(self).__name__}: backend={self._backend.name!r}: {reason}; its "
                "curvature is wrong: use backend='auto' or 'first_order' (docs/curvature.md, "
                "'Products torch differentiates wrongly')", RuntimeWarning, stacklevel=4)

    def _matvec(self, v: Vector) -> Vector:
        self._check_symmetric(batched=False)
        fast = self._fast_matvec(v)
        if fast is not None:
            return fast
        tangent = dict(zip(self.names, v))

        def func_impl() -> list[torch.Tensor]:
            def one(batch: Any) -> list[torch.Tensor]:
                out = self._func_product(self._current(), tangent, batch)
                return [out[n] for n in self.names]

            return self._accumulate(one)

        def autograd_impl() -> list[torch.Tensor]:
            return self._accumulate(lambda batch: self._autograd_product(tangent, batch))

        def first_order_impl() -> Vector:
            return self._first_order_product(v)

        out = tuple(self._backend.run(self._context, func_impl, autograd_impl,
                                      first_order_impl, self._check_loss_graph))
        return self._checked_nonzero(out)

    def _matmat(self, vs: list[Vector]) -> list[Vector]:
        if len(vs) == 1 and self._prefers_single_products():
            return [self._matvec(vs[0])]
        if self._backend.batched_by_vmap:
            self._check_symmetric(batched=True)
        stacked = {n: torch.stack([v[i] for v in vs]) for i, n in enumerate(self.names)}

        def vmapped() -> list[Vector]:
            def one(batch: Any) -> list[torch.Tensor]:
                primal = self._current()
                out = vmap(lambda t: self._func_product(primal, t, batch))(stacked)
                return [out[n] for n in self.names]

            flat = self._accumulate(one)
            return [tuple(t[i] for t in flat) for i in range(len(vs))]

        outs = self._backend.run_batched(
            self._context, vmapped, lambda: [self._matvec(v) for v in vs]
        )
        for out in outs:
            self._checked_nonzero(out)
        return outs
