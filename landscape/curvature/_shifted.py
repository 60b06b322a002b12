r"""One model operator evaluated at shifted parameters ``θ + s · shift``.

The first-order products (:mod:`landscape.curvature._first_order`) difference losses,
gradients and outputs of the model at ``θ ± εv`` (and ``θ ± εv/2``); this module
evaluates them over the operator's data, reduced over the ranks, and leaves nothing
changed.

**Isolation.** Ordinary models are evaluated at ``θ ± εv`` through
:func:`torch.func.functional_call` with cloned buffers, exactly as the exact products
(the model is never touched). FSDP2 models are perturbed in place (their sharded DTensor
parameters cannot be substituted): each rank writes ``fl(θ ± εv)`` into its local shard,
and after every gradient the saved original shard is copied back, bit for bit (never
subtracted). Buffers are copied back too, ``.grad`` is restored by reference, modes and
RNG state as everywhere (:func:`landscape.isolation.isolated`), and both gradients of one
difference see the same RNG stream (dropout with ``eval_mode=False``).

**FSDP2.** The gradient comes from ``loss.backward()``, whose reduce-scatter averages over
the ``R`` data-parallel ranks of the mesh; the loss of rank ``r`` is scaled by
``R N_r / N`` first, so the average is the size-weighted mean of the ranks' gradients
(docs/distributed.md). Products are computed on the local shards and gathered one
parameter at a time (``DTensor.full_tensor``), so no rank ever holds more than one
unsharded parameter beyond the operator's replicated vectors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from landscape import distributed as _dist
from landscape._errors import LandscapeError
from landscape._sums import CHUNK, work_dtype
from landscape.batches import model_call
from landscape.curvature._batches import to_device
from landscape.curvature._evaluation import detach_tree, scalar_loss, seed_generators
from landscape.curvature._kinks import KinkedOps
from landscape.distributed import full_tensor, is_sharded, local_tensor
from landscape.isolation import (
    differentiable,
    isolated,
    no_grad_forward,
    rnn_differentiable,
    same_rng,
    stateless_closure,
)

if TYPE_CHECKING:  # pragma: no cover
    from landscape.curvature._model_operator import ModelOperator

__all__ = ["NoGradientError", "ShiftedEvaluation", "Tensors", "moved"]

Tensors = dict[str, torch.Tensor]


def moved(theta: torch.Tensor, shift: torch.Tensor, sign: float) -> torch.Tensor:
    """``fl(θ + sign · shift)``, summed in the shift's dtype, for ``sign`` ±1 or ±1/2.

    Returned in ``θ``'s dtype, rounded once: ``θ - s`` is bitwise ``θ + (-s)`` (IEEE 754),
    and ``θ ± s/2`` is formed without a copy of the halved shift (``s/2`` is exact but for
    subnormal halves, where the one rounding of ``θ + s/2`` is the more accurate).
    """
    return theta.to(shift.dtype).add(shift, alpha=sign).to(theta.dtype)


def _full(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor from this rank's shard ``local`` of the DTensor ``like``."""
    if not is_sharded(like):
        return local
    from torch.distributed.tensor import DTensor

    return full_tensor(
        DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape,
                           stride=like.stride())
    )


def _wide_dot(wide: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``Σ wide · other`` as a 0-d float64 tensor; ``other`` widened one chunk at a time.

    No output-sized copy for contiguous tensors (a dense non-contiguous one, e.g.
    channels-last, is flattened by a copy).
    """
    a, b = wide.reshape(-1), other.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for lo in range(0, a.numel(), CHUNK):
        total += torch.dot(a[lo : lo + CHUNK], b[lo : lo + CHUNK].to(a.device, torch.float64))
    return total


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a module's output (a tensor, or a tuple, list or dict of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _graph_leaves(value: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors whose ``.grad`` a ``value.backward()`` would accumulate into."""
    leaves: dict[int, torch.Tensor] = {}
    # the nodes themselves are kept: torch < 2.6 makes a new Python object for a node at
    # every access and frees it after, so a set of ids alone met a freed node's id again
    # in another node and stopped the walk early (a learnable tensor in the loss lost)
    seen: dict[int, Any] = {}
    stack = [value.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        variable = getattr(node, "variable", None)  # an AccumulateGrad node
        if isinstance(variable, torch.Tensor):
            leaves.setdefault(id(variable), variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(leaves.values())


@contextlib.contextmanager
def grads_of_other_leaves_kept(value: torch.Tensor, ours: Tensors) -> Iterator[None]:
    """Restore the ``.grad`` of every leaf ``value``'s graph reaches, but ``ours``.

    The same object, with its values: a backward accumulates in place into an existing
    ``.grad``. The leaves used only inside a reentrant activation checkpoint are not in
    the graph before the backward recomputes it; the model's parameters there are
    substituted by ``ours``.
    """
    mine = {id(t) for t in ours.values()}
    others = [t for t in _graph_leaves(value) if id(t) not in mine]
    saved = [(t, t.grad, None if t.grad is None else t.grad.detach().clone()) for t in others]
    try:
        yield
    finally:
        for t, grad, values in saved:
            if grad is not None and values is not None:
                grad.detach().copy_(values)
            t.grad = grad


class NoGradientError(LandscapeError, ValueError):
    """Selected parameters cut off from the loss by a reentrant activation checkpoint.

    Args:
        names: the parameters' names.
    """

    def __init__(self, names: list[str]) -> None:
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        super().__init__(
            f"no gradient reached {shown}: a reentrant activation checkpoint receives "
            "inputs that need no gradient (torch warns 'None of the inputs have "
            "requires_grad=True'); their curvature would be a silent zero. Use "
            "use_reentrant=False, or make the checkpoint's inputs require grad"
        )
        self.names = list(names)


class ShiftedEvaluation:
    """Losses, gradients and outputs of one model operator at ``θ + s · shift``.

    ``s`` is ``sign``: ±1, or ±1/2 (module docstring). Ordinary models are evaluated
    through ``functional_call`` on fresh leaves, FSDP2 models in place.

    Args:
        op: the operator (its model, data, options and parameter selection).

    Attributes:
        sharded: the parameters are DTensors: evaluate in place (FSDP2) rather than through
            ``functional_call``.
    """

    def __init__(self, op: ModelOperator) -> None:
        self.op = op
        self.sharded = any(is_sharded(p) for p in op._param_objects)
        self._total: float | None = None
        self._n_passes: int | None = None
        self._weight = 1.0  # FSDP: the current batch's weight, folded into the backward
        # reentrant activation checkpointing (_gradient_functional): every trainable
        # parameter a leaf
        self._widened = False
        self.kinks: set[str] = set()  # kinked ops the forward of _forward_dtype ran

    def _rekey(self, before: Any) -> None:
        """A hook after an in-place write-and-restore of the shards (FSDP2).

        ``before`` was the :meth:`_state_key` when the write began; a subclass re-keys what
        it keeps on it. Nothing here.
        """

    def _output_difference(
        self, batch: Any, shift: Tensors, rewind: Any, *, half: bool = False
    ) -> torch.Tensor:
        """``f(θ + s) − f(θ − s)`` in float64, both sides from the entry RNG state.

        ``s`` is the shift or, with ``half``, half of it (formed inside the sum, no copy).
        """
        sign = 0.5 if half else 1.0
        diff = self._output(batch, shift, sign)[0].to(torch.float64, copy=True)  # no alias
        rewind()
        diff.sub_(self._output(batch, shift, -sign)[0])
        rewind()
        return diff

    @property
    def _work_dtype(self) -> torch.dtype:
        """The parameters' dtype, at least float32 (bfloat16/float16 models work in float32)."""
        return work_dtype(self.op.dtype)

    def _output(
        self, batch: Any, shift: Tensors | None, sign: float = 1
    ) -> tuple[Any, Any, Tensors | None]:
        """``(outputs, targets, leaves)`` at ``θ ± shift`` (leaves: functional path only)."""
        op = self.op
        if self.sharded:
            with self._perturbed(shift, sign):
                out, targets = self._direct_output(batch)
            return out, targets, None
        leaves = self._shifted_leaves(shift, sign)
        out, targets = op._model_output(leaves, batch)
        return out, targets, leaves

    def _pullback(
        self, batch: Any, jv: torch.Tensor, diff: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """``[jvᵀ Λ jv, diffᵀ Λ jv, *J^T Λ jv]`` on one batch (``diff`` None: 0).

        ``Λ`` exact in output space, ``J^T`` by one backward; the two scalars summed in
        float64 over chunks, with no output-sized copy (:meth:`ggn_product`'s step check).
        """
        op = self.op
        if self.sharded:
            for p in op.model.parameters():
                p.grad = None
        scalars: list[torch.Tensor] = []

        def pull(model: nn.Module, b: Any) -> None:
            out, targets = self._direct_output(b)
            o = out.detach().requires_grad_(True)
            go = torch.autograd.grad(
                scalar_loss(op.loss_fn(o, targets)), o, create_graph=True
            )[0]
            if go.requires_grad:
                hjv = torch.autograd.grad(go, o, jv.to(o.dtype))[0]
            else:
                hjv = torch.zeros_like(o)
            lam = hjv.detach()
            zero = torch.zeros((), dtype=torch.float64, device=jv.device)
            scalars.extend([_wide_dot(jv, lam), zero if diff is None else _wide_dot(diff, lam)])
            if out.requires_grad:  # inside the substitution, as for the gradient
                ((out * hjv).sum() * self._backward_scale()).backward()

        def pull_at_theta() -> tuple[None, Tensors]:
            scalars.clear()  # a second run (widened) starts over
            leaves = self._shifted_leaves(None)
            stateless_closure(op.model, pull, self._with_others(leaves), batch)
            return None, leaves

        leaves = None
        if self.sharded:
            pull(op.model, batch)
        else:
            _, leaves = self._reaching(pull_at_theta, batch)
        if leaves is not None:
            return scalars + [torch.zeros_like(t) if t.grad is None else t.grad
                              for t in leaves.values()]
        grads = [
            torch.zeros_like(local_tensor(p.detach())) if p.grad is None
            else local_tensor(p.grad.detach()).clone()
            for p in op._param_objects
        ]
        for p in op.model.parameters():
            p.grad = None
        return scalars + grads

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        """The exact products' isolation, without the SDPA math switch (no double backward)."""
        op = self.op
        buffers = [(b, b.detach().clone()) for b in op.model.buffers()] if self.sharded else []
        try:
            with isolated(op.model, eval_mode=op.options.eval_mode,
                          batch_statistics=op.options.batch_statistics), \
                    rnn_differentiable(op.model), differentiable():
                if not op.options.eval_mode:
                    seed_generators(op.model, op.options.seed)
                yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:  # in-place evaluation: put the buffers back
                    b.copy_(saved)

    def _accumulate(self, per_batch: Any, *, scalars: int) -> list[torch.Tensor]:
        """``sum_b w_b per_batch(b)``, reduced over the ranks, whole tensors.

        ``per_batch`` returns ``scalars`` 0-d tensors (a loss, the GGN's step check), then
        one tensor per parameter. Summed in float64 over several batches; one batch is only
        weighted, in the dtype ``per_batch`` returns (no float64 copy of parameter-sized
        tensors). Reduced over the ranks in the dtypes one batch gives: ranks may hold
        different numbers of batches, and the all-reduce's buffers (one per dtype) must
        match.
        """
        op = self.op
        if self.sharded:
            return self._accumulate_sharded(per_batch, scalars=scalars)
        total: list[torch.Tensor] | None = None
        dtypes: list[torch.dtype] = []
        several = len(op._data.batches) > 1
        for batch, w in zip(op._data.batches, op._data.weights):
            part = list(per_batch(to_device(batch, op.device)))
            dtypes = dtypes or [t.dtype for t in part]
            part = [t.double() for t in part] if several else part
            if total is None:  # at weight 1 the part itself (no parameter-sized copy)
                total = part if w == 1.0 else [t * w for t in part]
            else:
                total = [a + w * t for a, t in zip(total, part)]
        assert total is not None
        if several and op._reduce.enabled:
            total = [t.to(d) for t, d in zip(total, dtypes)]
        return op._reduce(total)

    def _accumulate_sharded(self, per_batch: Any, *, scalars: int) -> list[torch.Tensor]:
        """The FSDP data loop: weights folded into each backward, matching passes.

        Every backward's reduce-scatter combines the ranks' batch ``b``, so each rank scales
        its loss by its own weight ``R (N_r / N) w_b`` before the backward and the gradients
        are summed unweighted; every rank runs as many passes as the rank with the most
        batches (zero-weight repeats of its first batch), since FSDP's collectives must
        match. The leading scalars (a loss) are weighted here and reduced over the ranks.
        """
        op = self.op
        batches = list(zip(op._data.batches, op._data.weights))
        total: list[torch.Tensor] | None = None
        for i in range(self._passes()):
            batch, w = batches[i] if i < len(batches) else (batches[0][0], 0.0)
            self._weight = w
            try:
                part = [t.double() for t in per_batch(to_device(batch, op.device))]
            finally:
                self._weight = 1.0
            part[:scalars] = [t * w for t in part[:scalars]]
            total = part if total is None else [a + t for a, t in zip(total, part)]
        assert total is not None
        full = [_full(g, p) for g, p in zip(total[scalars:], op._param_objects)]
        if not scalars or not _dist.is_distributed():
            return [*total[:scalars], *full]
        reduced = _dist.all_reduce_weighted(total[:scalars], op._data.rank_size,
                                            total=self._ranks_total())
        return [*reduced, *full]

    def _passes(self) -> int:
        """The most batches any rank holds (every rank runs that many passes)."""
        if self._n_passes is None:
            counts = _dist.all_gather_objects(len(self.op._data.batches))
            self._n_passes = max(counts)
        return self._n_passes

    def _ranks_total(self) -> float:
        if self._total is None:
            self._total = _dist.total_weight(self.op._data.rank_size)
        return self._total

    def _gradient(
        self, batch: Any, shift: Tensors | None, sign: float = 1
    ) -> list[torch.Tensor]:
        """``[loss, *g]`` on one batch at ``θ ± shift`` (local shards for FSDP)."""
        if self.sharded:
            return self._gradient_in_place(batch, shift, sign)
        return self._gradient_functional(batch, shift, sign)

    def _shifted_leaves(self, shift: Tensors | None, sign: float = 1) -> Tensors:
        """Fresh leaves ``fl(θ ± shift)`` requiring grad (the model is not touched)."""
        leaves = {}
        for n, p in zip(self.op.names, self.op._param_objects):
            t = p.detach()
            t = moved(t, shift[n], sign) if shift is not None else t.clone()
            leaves[n] = t.requires_grad_(True)
        return leaves

    def _backward_scale(self) -> float:
        """FSDP: ``R (N_r / N) w_b``: the reduce-scatter's mean is then the weighted sum."""
        if not self.sharded:
            return 1.0
        if not (self.op._data.rank_size and _dist.is_distributed()):
            return self._weight
        mesh = next(p.device_mesh for p in self.op._param_objects if is_sharded(p))
        return mesh.size() * self.op._data.rank_size / self._ranks_total() * self._weight

    def _gradient_functional(
        self, batch: Any, shift: Tensors | None, sign: float
    ) -> list[torch.Tensor]:
        value, leaves = self._reaching(
            lambda: self._backward_functional(batch, shift, sign), batch)
        grads = [torch.zeros_like(t) if t.grad is None else t.grad.detach()
                 for t in leaves.values()]
        return [value, *grads]

    def _reaching(
        self, run: Callable[[], tuple[Any, Tensors]], batch: Any
    ) -> tuple[Any, Tensors]:
        """``run()``: a value and the selected leaves, their ``.grad`` set, widened if needed.

        Reentrant activation checkpointing: a block whose inputs need no gradient passes
        none to its parameters. When :meth:`_cut_off` finds that, every trainable
        parameter becomes a leaf (:attr:`_widened`, for good) and ``run`` is repeated with
        the RNG rewound: the inputs of the blocks they follow then need a gradient, as in
        training. A selected parameter still cut off raises.

        Raises:
            NoGradientError: naming the parameters no gradient reaches.
        """
        with same_rng(self.op.model) as rewind:
            out = run()
            if not self._widened and self._cut_off(out[1], batch):
                self._widened = True
                rewind()
                out = run()
            missing = self._cut_off(out[1], batch)
            if missing:
                raise NoGradientError(missing)
        return out

    def _backward_functional(
        self, batch: Any, shift: Tensors | None, sign: float
    ) -> tuple[torch.Tensor, Tensors]:
        """The loss at ``θ ± shift`` and the selected leaves, their ``.grad`` set by one backward.

        After :attr:`_widened` every other trainable parameter is a leaf too (at ``θ``).
        """
        leaves = self._shifted_leaves(shift, sign)
        substituted = self._with_others(leaves)

        def loss_and_backward(model: nn.Module, b: Any) -> torch.Tensor:
            # the backward runs while the leaves are substituted: activation checkpointing
            # recomputes the forward in it; backward(), not autograd.grad, since reentrant
            # checkpointing allows only the former (nor backward(inputs=...)). The leaves
            # are fresh tensors; other leaves the loss reaches (a learnable temperature in
            # the loss function) get their .grad back as it was
            value = self._direct_loss(b)
            if value.requires_grad:
                with grads_of_other_leaves_kept(value, ours=substituted):
                    value.backward()
            return value.detach()

        value = stateless_closure(self.op.model, loss_and_backward, substituted, batch)
        return value.detach(), leaves

    def _with_others(self, leaves: Tensors) -> Tensors:
        """``leaves``, and after :attr:`_widened` fresh leaves of the other trainable parameters.

        Their gradients are computed and dropped: they only make the graph reach the
        selected parameters through reentrant activation checkpointing.
        """
        if not self._widened:
            return leaves
        others = {n: p.detach().requires_grad_(True)
                  for n, p in self.op.model.named_parameters()
                  if p.requires_grad and n not in leaves}
        return {**leaves, **others}

    def _cut_off(self, leaves: Tensors, batch: Any) -> list[str]:
        """The selected parameters without a gradient, if a reentrant checkpoint cut them off.

        A parameter without a gradient is either unused by the loss (its gradient and
        curvature are zero, as the exact products say) or inside a reentrant activation
        checkpoint whose inputs need no gradient, where zeros would be wrong
        (:meth:`~landscape.curvature._model_operator.ModelOperator._cut_by_checkpoint`,
        asked only when a gradient is missing).
        """
        missing = [n for n, t in leaves.items() if t.grad is None]
        if not missing or not self.op._cut_by_checkpoint(batch, self._with_others(leaves)):
            return []
        return missing

    def _gradient_in_place(
        self, batch: Any, shift: Tensors | None, sign: float
    ) -> list[torch.Tensor]:
        op = self.op
        model = op.model
        params = list(model.parameters())
        for p in params:
            p.grad = None  # isolated() puts the original .grad objects back
        scale = self._backward_scale()
        with self._perturbed(shift, sign):
            value = self._direct_loss(batch)
            if value.requires_grad:
                (value * scale).backward()
            grads = [
                torch.zeros_like(local_tensor(p.detach())) if p.grad is None
                else local_tensor(p.grad.detach()).clone()
                for p in op._param_objects
            ]
        for p in params:
            p.grad = None
        return [value.detach(), *grads]

    @contextlib.contextmanager
    def _perturbed(self, shift: Tensors | None, sign: float = 1) -> Iterator[None]:
        """Write ``fl(θ ± shift)`` into the local shards; copy the saved originals back."""
        if shift is None:
            yield
            return
        params = self.op._param_objects
        key = self._state_key()
        _dist.reshard(self.op.model)  # no stale gathered copy: the forward sees the writes
        with torch.no_grad():
            saved = [local_tensor(p.detach()).clone() for p in params]
        try:
            with torch.no_grad():
                for p, orig, n in zip(params, saved, self.op.names):
                    local_tensor(p.detach()).copy_(moved(orig, shift[n], sign))
            yield
        finally:
            with torch.no_grad():
                for p, orig in zip(params, saved):
                    local_tensor(p.detach()).copy_(orig)
            _dist.reshard(self.op.model)  # nor a gathered copy of the perturbed values
            self._rekey(key)

    def _forward_dtype(self) -> torch.dtype | None:
        """The narrowest floating dtype a module with parameters outputs, in one forward.

        One no-grad forward of the first batch at ``θ``, with a forward hook on every module
        that holds parameters: under ``torch.autocast`` (inside a closure or ``forward=``,
        where the operator cannot see it) their outputs are in the autocast dtype. The loss
        counts too: transformers computes a language model's loss from logits cast to
        float32, also for a float64 model, whose gradient then carries float32 rounding
        (a step sized for float64 left first-order products 10-28 % off). None when no
        such output was seen. The same forward lists the kinked ops it runs in
        :attr:`kinks` (:class:`~landscape.curvature._kinks.KinkedOps`). Every rank runs it
        at the same point (FSDP2's all-gathers).
        """
        model, seen = self.op.model, []

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            for t in _tensors(output):
                if t.is_floating_point():
                    seen.append(t.dtype)

        owners = [m for m in model.modules() if next(m.parameters(recurse=False), None)
                  is not None]
        handles = [m.register_forward_hook(hook) for m in owners]
        try:
            batch = to_device(self.op._data.batches[0], self.op.device)
            with self._context(), no_grad_forward(), KinkedOps() as kinks:
                if self.sharded:
                    loss = self._direct_loss(batch)
                    _dist.reshard(model)  # the root keeps no gathered copy
                else:
                    loss = stateless_closure(model, lambda m, b: self._direct_loss(b),
                                             self._shifted_leaves(None), batch)
            if isinstance(loss, torch.Tensor) and loss.is_floating_point():
                seen.append(loss.dtype)
        finally:
            for h in handles:
                h.remove()
        self.kinks = kinks.names
        return max(seen, key=lambda d: torch.finfo(d).eps) if seen else None

    def _direct_loss(self, batch: Any) -> torch.Tensor:
        """The batch loss through the model itself (its hooks run: FSDP's all-gathers)."""
        op = self.op
        if op.closure is not None:
            return scalar_loss(op.closure(op.model, batch))
        return scalar_loss(op.loss_fn(*self._direct_output(batch)))

    def _direct_output(self, batch: Any) -> tuple[Any, Any]:
        """``(outputs, targets)`` through the model itself."""
        op = self.op
        if op.forward is not None:
            out, targets = op.forward(op.model, batch)
            return out, detach_tree(targets)
        inputs, targets = batch
        args, kwargs = model_call(op.model, inputs)
        out = op.model(*args, **kwargs)
        return out, targets

    def _state_key(self) -> Any:
        """What identifies the parameters' values: the operator's versions and storages.

        The key of its cached loss and gradient (``ModelOperator._version_key``): a
        DTensor's own counter (an optimizer step bumps it; a local tensor taken from it
        has a fresh counter of its own), a plain tensor's storage too (``p.data = ...``).
        A sharded model's products write into its local shards and copy the originals
        back; should that bump a version, :meth:`_perturbed` re-keys what was learned
        before its own writes. An in-place write through ``p.data`` changes no key and
        needs :meth:`~landscape.curvature.operator.ModelOperator.refresh`, which calls
        :meth:`reset`.
        """
        return self.op._version_key()
