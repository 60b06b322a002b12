r"""Curvature products from gradients only: central differences along ``v``.

.. math::

    H v \approx \frac{g(\theta + \varepsilon v) - g(\theta - \varepsilon v)}{2 \varepsilon},
    \qquad g = \nabla_\theta L,

needs one backward pass per gradient and no double backward, so it works where the exact
product cannot: models whose graph has no double backward (``torch.compile``, fused or
flash attention kernels, custom autograd functions, reentrant activation checkpointing)
and FSDP2-sharded models (``fully_shard``), whose DTensor parameters autograd cannot
differentiate twice (docs/curvature.md, "First-order products").

**Step size.** The error of the central difference in exact arithmetic is the truncation
``ε² ‖∇³L[v, v, v]‖ / 6`` (Taylor); in floating point each gradient carries a rounding
error of order ``u ‖g‖`` (``u`` the unit roundoff of the dtype), which the division by
``2ε`` amplifies into ``u ‖g‖ / ε``, and the perturbed parameters ``fl(θ ± εv)`` are off
by ``u |θ_i|`` per entry, a relative error of ``u ‖θ‖ / (ε ‖v‖)`` in the step. The sum is
smallest near ``ε ~ u^{1/3}`` on the natural scale of the problem (Nocedal & Wright,
*Numerical Optimization*, 2nd ed., §8.1, central differences), giving an error
``O(u^{2/3})``. The scale is that of the parameters, as for the forward-difference
Hessian-vector product of Hessian-free Newton (ibid., §7.1)::

    ε = eps^{1/3} (1 + ‖θ‖) / ‖v‖,

so every entry moves by about ``eps^{1/3}`` of its own magnitude (the ``1 +`` keeps an
absolute scale at ``θ ≈ 0``), whatever the model size; ``eps`` is the machine epsilon of
the parameters' dtype. Expected relative errors: ``~1e-5`` in float32 and ``~1e-10`` in
float64 (measured on the test models: docs/curvature.md). Along sharp directions the
truncation can be far larger than that scale suggests; each Hessian and GGN product checks
it and refines the step for the operator (:mod:`landscape.curvature._step`); the GGN's
``J v`` is Richardson-extrapolated besides (:meth:`FirstOrder.ggn_product`).

**Precision.** The shifts ``±εv``, the perturbed parameters and the difference of the two
gradients are computed in the parameters' dtype, at least float32 (bfloat16 and float16
models work in float32). Nothing is lost against float64: ``fl(θ ± εv)`` is stored in the
parameters' dtype either way, and the difference of two gradients of one dtype is exact
where they are within a factor of two (Sterbenz's lemma) and within one rounding of the
result elsewhere, far below the ``u^{2/3}`` error above. Over several batches the
weighted sum is accumulated in float64. On GPT-2 small (124M parameters) float64 copies
of the shifts and gradients held about 2 GB more than the training step
(docs/benchmarks.md, "Scale").

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
import math
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import nn

from landscape import distributed as _dist
from landscape._sums import CHUNK, dots
from landscape.curvature._batches import to_device
from landscape.curvature._evaluation import detach_tree, scalar_loss, seed_generators
from landscape.curvature._step import (
    MIN_RATIO,
    REFINE_BELOW,
    displacement_error,
    genuine,
    ggn_genuine,
    ggn_negligible,
    ggn_ratio,
    refined_ratio,
    step_size,
    truncation,
)
from landscape.distributed import full_tensor, is_sharded, local_tensor, shard_of, sharded_sum
from landscape.isolation import isolated, stateless_closure
from landscape.params import Vector

if TYPE_CHECKING:  # pragma: no cover
    from landscape.curvature._model_operator import ModelOperator

__all__ = ["FirstOrder", "is_sharded", "sharded_reason", "step_size"]

Tensors = dict[str, torch.Tensor]


def sharded_reason(params: Sequence[torch.Tensor]) -> str | None:
    """Why the exact product is impossible for these parameters, or ``None``.

    Args:
        params: the operator's parameters.

    Returns:
        A sentence naming the reason when a parameter is a ``DTensor`` (FSDP2
        ``fully_shard``): autograd cannot differentiate the gradient w.r.t. DTensor
        parameters, which only the all-gathered copies enter.
    """
    if any(is_sharded(p) for p in params):
        return "the model is FSDP-sharded (DTensor parameters have no double backward)"
    return None


def _moved(theta: torch.Tensor, shift: torch.Tensor, sign: float) -> torch.Tensor:
    """``fl(θ + sign · shift)``, summed in the shift's dtype, for ``sign`` ±1 or ±1/2.

    Returned in ``θ``'s dtype. ``sign · shift`` is exact (a power of two; IEEE 754), so
    ``θ - s`` is bitwise ``θ + (-s)`` and ``θ + s/2`` is ``θ`` plus the halved shift,
    without a copy of it.
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
    """``Σ wide · other`` as a 0-d float64 tensor; ``other`` widened one chunk at a time."""
    a, b = wide.reshape(-1), other.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for lo in range(0, a.numel(), CHUNK):
        total += torch.dot(a[lo : lo + CHUNK], b[lo : lo + CHUNK].to(a.device, torch.float64))
    return total


@contextlib.contextmanager
def _same_rng(model: nn.Module) -> Iterator[Any]:
    """Yield a function that rewinds the CPU (and model's CUDA) RNG to the entry state."""
    devices = sorted(
        {t.device.index or 0 for t in [*model.parameters(), *model.buffers()]
         if t.device.type == "cuda"}
    )
    cpu = torch.get_rng_state()
    cuda = [torch.cuda.get_rng_state(d) for d in devices]

    def rewind() -> None:
        torch.set_rng_state(cpu)
        for d, s in zip(devices, cuda):
            torch.cuda.set_rng_state(s, d)

    yield rewind


class FirstOrder:
    """Loss, gradient and central-difference products of one model operator.

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
        self._norm: tuple[tuple[int, ...], float] | None = None
        self._loss0: tuple[Any, float] | None = None
        self._learned: tuple[Any, float] | None = None  # (state, step / step_size())
        self._unchecked: Any = None  # a state whose check proved unreliable
        self.refined = 0  # products computed again at a refined step (_step.py)
        # the GGN's J v is extrapolated unless the parameters are 16-bit, whose displacement
        # rounding (~6e-2 in bf16) dominates any truncation and would be tripled
        self._extrapolates = torch.finfo(op.dtype).bits >= 32

    # -- public ------------------------------------------------------------------------
    def loss_and_grad(self) -> list[torch.Tensor]:
        """``[loss, *gradient]`` at the current parameters (whole tensors, reduced).

        Returns:
            The loss (scalar) and one gradient tensor per parameter, in the parameters'
            dtype.
        """
        with self._context():
            out = self._accumulate(lambda batch: self._gradient(batch, None), scalars=1)
        return [t.to(self.op.dtype) for t in out]

    def hessian_product(self, v: Vector) -> Vector:
        """``H v`` by a central difference of gradients (module docstring).

        The step is checked along ``v`` and, when the difference is truncation-bound
        there, the product is computed once more at a smaller step
        (:mod:`landscape.curvature._step`).

        Args:
            v: a parameter-space vector (whole tensors, the same on every rank).

        Returns:
            ``H v`` in the parameters' dtype.
        """
        steps = self._steps_along(v, self._ratio())
        if steps is None:
            return tuple(torch.zeros_like(t) for t in v)
        eps, shift = steps
        del steps
        product, losses = self._central_difference(eps, shift)
        check = self._refinement(v, eps, shift, product, losses)
        if check is not None:
            ratio, gap = check
            del shift, product  # not held while the product is computed again
            learned = self._ratio() * ratio
            eps1, shift = self._steps_along(v, learned)
            product, losses1 = self._central_difference(eps1, shift)
            q1, losses1 = self._reduced_scalars(self._dot(v, product), losses1)
            residual = losses1 - 2.0 * self._loss_at_theta() - eps1**2 * q1
            if genuine(gap * eps**2 / 2.0, residual, q1):
                self.refined += 1
                self._learned = (self._state_key(), learned)
            else:  # the losses' rounding posed as truncation: no more checks here, and
                # the product again at the step it had (once per parameter state)
                self._unchecked = self._state_key()
                del shift, product
                eps, shift = self._steps_along(v, self._ratio())
                product, _ = self._central_difference(eps, shift)
        return tuple(t.to(self.op.dtype) for t in product)

    def _central_difference(self, eps: float, shift: Tensors) -> tuple[list[torch.Tensor], float]:
        """``(g(θ + εv) − g(θ − εv)) / 2ε`` (:attr:`_work_dtype`) and ``L_+ + L_-``."""

        def per_batch(batch: Any) -> list[torch.Tensor]:
            with _same_rng(self.op.model) as rewind:
                plus_g = self._gradient(batch, shift)
                rewind()
                minus_g = self._gradient(batch, shift, sign=-1)
            # the difference of two float32 gradients is exact where they are close
            # (Sterbenz) and within one rounding of the result elsewhere: no float64 copy
            # of parameter-sized tensors is needed (module docstring, "Precision")
            acc = self._work_dtype
            return [plus_g[0].double() + minus_g[0].double()] + [
                (a.to(acc) - b.to(acc)) / (2.0 * eps) for a, b in zip(plus_g[1:], minus_g[1:])
            ]

        with self._context():
            out = self._accumulate(per_batch, scalars=1)
        return out[1:], float(out[0])

    def _refinement(
        self, v: Vector, eps: float, shift: Tensors, product: list[torch.Tensor], losses: float,
    ) -> tuple[float, float] | None:
        """``(ρ, 2 (Q − S))`` when the step should shrink by ``ρ`` (:mod:`._step`), else None.

        Every quantity is the same on every rank: whole tensors, the losses, ``Q`` and
        ``L(θ)`` reduced over the ranks (also inside a batch of products, whose own
        reduction is deferred) and partial sums of the shards, so all ranks decide alike
        and run the same passes. None without a check: the step is at its floor, or an
        earlier refinement at these parameters did not remove what the check saw.
        """
        current = self._ratio()
        if current <= MIN_RATIO or self._unchecked == self._state_key():
            return None
        loss0 = self._loss_at_theta()
        q = self._dot(v, product)
        losses, q = self._reduced_scalars(losses, q)
        second = (losses - 2.0 * loss0) / eps**2
        trunc = truncation(q, second, losses, loss0, eps, self.op.dtype)
        if trunc == 0.0:
            return None
        ratio = refined_ratio(trunc, self._rounding(shift))
        if ratio is None:
            return None
        ratio = max(ratio, MIN_RATIO / current)  # never below the floor in all
        # a shrink clamped to little is not worth two gradients (and its truncation,
        # ρ⁴ of the first, would not stand GENUINE times below the gap: _step.genuine)
        return (ratio, 2.0 * (q - second)) if ratio < REFINE_BELOW else None

    @staticmethod
    def _dot(v: Vector, product: list[torch.Tensor]) -> float:
        """``vᵀ P`` summed accurately (float64 over chunks)."""
        return float(sum(dots(a.reshape(-1).to(b.dtype), b.reshape(-1))
                         for a, b in zip(v, product)))

    def _reduced_scalars(self, *values: float) -> list[float]:
        """``values`` as the ranks' weighted mean when this rank's results are not reduced yet.

        A batch of products (``matmat``) defers the operator's reduction to one all-reduce
        after it; the step check inside needs the reduced values now
        (:meth:`~landscape.curvature._reduction.RankReduction.pending`).
        """
        got = self.op._reduce.pending([torch.tensor(values, dtype=torch.float64)])
        return [float(x) for x in got[0]]

    def reset(self) -> None:
        """Forget what was learned at the parameters: ``L(θ)``, ``‖θ‖`` and the step."""
        self._loss0 = None
        self._learned = None
        self._unchecked = None
        self._norm = None

    def _state_key(self) -> Any:
        """What identifies the parameters' values: their versions.

        A DTensor's own counter (an optimizer step bumps it; a local tensor taken from it
        has a fresh counter of its own). A sharded model's products write into its local
        shards and copy the originals back; should that bump a version, :meth:`_perturbed`
        re-keys what was learned before its own writes. A write that bumps no version
        (``p.data = ...``) needs :meth:`~landscape.curvature.operator.ModelOperator.
        refresh`, which calls :meth:`reset`.
        """
        return tuple(p._version for p in self.op._param_objects)

    def _rekey(self, before: Any) -> None:
        """After this engine's own write-and-restore: what was keyed ``before`` stays valid."""
        after = self._state_key()
        for name in ("_loss0", "_learned"):
            held = getattr(self, name)
            if held is not None and held[0] == before:
                setattr(self, name, (after, held[1]))
        if self._unchecked == before:
            self._unchecked = after

    def _ratio(self) -> float:
        """The learned step, as a fraction of ``step_size()``, at these parameters (or 1).

        Once a product's step was refined, every later product at the same parameters
        uses the refined step: Lanczos needs one linear operator, and products whose steps
        differ from one vector to the next are not (module :mod:`~landscape.curvature.
        _step`, "One step per operator").
        """
        if self._learned is not None and self._learned[0] == self._state_key():
            return self._learned[1]
        return 1.0

    def _loss_at_theta(self) -> float:
        """``L(θ)`` over the operator's data (reduced), kept while the parameters are unchanged."""
        params = self.op._param_objects
        key = self._state_key()
        if self._loss0 is not None and self._loss0[0] == key:
            return self._loss0[1]

        def per_batch(batch: Any) -> list[torch.Tensor]:
            with torch.no_grad():
                if self.sharded:
                    value = self._direct_loss(batch).detach().double()
                    # FSDP2 keeps the root's gathered copy after a forward without
                    # backward: the next write into the shards would not be seen
                    _dist.reshard(self.op.model)
                    return [value]
                leaves = {n: p.detach() for n, p in zip(self.op.names, params)}
                value = stateless_closure(self.op.model, lambda m, b: self._direct_loss(b),
                                          leaves, batch)
                return [value.detach().double()]

        with self._context():
            loss = float(self._accumulate(per_batch, scalars=1)[0])
        (loss,) = self._reduced_scalars(loss)
        self._loss0 = (key, loss)
        return loss

    def ggn_product(self, v: Vector) -> Vector:
        r"""``G v = J^T Λ J v`` with ``J v`` by an extrapolated difference of the model outputs.

        ``J v`` comes from the outputs at ``θ ± εv`` and ``θ ± εv/2`` (four no-grad forward
        passes): the central differences ``D(ε) = (f(θ + εv) − f(θ − εv)) / 2ε`` and
        ``D(ε/2)`` carry the truncations ``ε² ∇³f[v, v, v] / 6`` and a quarter of it, so
        Richardson's combination ``R = (4 D(ε/2) − D(ε)) / 3`` cancels it (the five-point
        stencil, error ``O(ε⁴)``). ``Λ R`` is exact (double backward through the loss of
        the outputs only, never through the model), and ``J^T Λ R`` is one backward pass of
        ``<f(θ), Λ R>``: first-order derivatives of the model only.

        The two differences also measure the truncation of ``D(ε)`` along ``v``,
        ``t = (4/3) |Rᵀ Λ (D(ε) − D(ε/2))| / |Rᵀ Λ R|``; where it is large the step is
        refined and learned for the operator as for Hessian products
        (:mod:`landscape.curvature._step`, "The GGN's step"; docs/curvature.md).

        Args:
            v: a parameter-space vector (whole tensors, the same on every rank).

        Returns:
            ``G v`` in the parameters' dtype.
        """
        steps = self._steps_along(v, self._ratio())
        if steps is None:
            return tuple(torch.zeros_like(t) for t in v)
        eps, shift = steps
        del steps
        product, trunc = self._extrapolated(eps, shift)
        ratio = self._ggn_refinement(trunc, shift)
        if ratio is not None:
            del shift, product  # not held while the product is computed again
            learned = self._ratio() * ratio
            eps, shift = self._steps_along(v, learned)
            product, trunc1 = self._extrapolated(eps, shift)
            if ggn_genuine(trunc, trunc1):
                self.refined += 1
                self._learned = (self._state_key(), learned)
            else:  # rounding posed as truncation: no more checks at these parameters
                self._unchecked = self._state_key()
                del shift, product
                eps, shift = self._steps_along(v, self._ratio())
                product, _ = self._extrapolated(eps, shift)
        return tuple(t.to(self.op.dtype) for t in product)

    def _extrapolated(self, eps: float, shift: Tensors) -> tuple[list[torch.Tensor], float]:
        """``J^T Λ R`` (:meth:`ggn_product`) and the relative truncation ``t`` of ``D(ε)``."""

        def per_batch(batch: Any) -> list[torch.Tensor]:
            with _same_rng(self.op.model) as rewind, torch.no_grad():
                wide: torch.Tensor | None = self._output_difference(batch, shift, rewind)
                if self._extrapolates:
                    jv = self._output_difference(batch, shift, rewind, half=True)
                    # with Δ the output differences, D(ε) − D(ε/2) = (Δ(ε) − 2 Δ(ε/2)) / 2ε
                    # (kept in `wide`) and R = (4 D(ε/2) − D(ε)) / 3 = D(ε/2) − wide / 3
                    wide.sub_(jv, alpha=2.0).div_(2.0 * eps)
                    jv.div_(eps).sub_(wide, alpha=1.0 / 3.0)
                else:  # 16-bit parameters: D(ε) alone, unchecked
                    jv, wide = wide.div_(2.0 * eps), None
            return self._pullback(batch, jv, wide)

        with self._context():
            out = self._accumulate(per_batch, scalars=2)
        along, cross = self._reduced_scalars(float(out[0]), float(out[1]))
        # NaN when the outputs did not move (a step below the compute precision)
        trunc = 4.0 / 3.0 * abs(cross) / abs(along) if along != 0.0 else math.nan
        return out[2:], trunc

    def _ggn_refinement(self, trunc: float, shift: Tensors) -> float | None:
        """The factor ``ρ`` to shrink the GGN's step by (:func:`ggn_ratio`), or None."""
        current = self._ratio()
        if current <= MIN_RATIO or self._unchecked == self._state_key():
            return None
        if ggn_negligible(trunc, self.op.dtype):  # no need to measure the rounding
            return None
        ratio = ggn_ratio(trunc, self._rounding(shift))
        if ratio is None:
            return None
        ratio = max(ratio, MIN_RATIO / current)  # never below the floor in all
        # a shrink clamped to little is not attempted: a real truncation would not fall
        # enough for ggn_genuine (nor is it worth four forwards and a backward)
        return ratio if ratio < REFINE_BELOW else None

    def _rounding(self, shift: Tensors) -> float:
        """``‖fl(θ + εv) − θ − εv‖ / ‖εv‖`` over all shards (:func:`displacement_error`)."""
        pairs = [(local_tensor(p.detach()), shift[n])
                 for n, p in zip(self.op.names, self.op._param_objects)]
        err, size = sharded_sum(
            [torch.tensor(displacement_error(pairs, lambda t, s: _moved(t, s, 1)))],
            self.sharded,
        ).tolist()
        return math.sqrt(err / size) if size > 0 else math.inf

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
        return torch.promote_types(self.op.dtype, torch.float32)

    def _steps_along(self, v: Vector, ratio: float = 1.0) -> tuple[float, Tensors] | None:
        """The step ``ε`` and the shift ``εv`` (this rank's shards, :attr:`_work_dtype`).

        ``ε`` is ``ratio`` times :func:`~landscape.curvature._step.step_size`. None for
        v = 0. The other side, ``θ - εv``, is formed with ``sign=-1`` from the same shift
        (bitwise what adding ``-εv`` gives; no negated copy of it).
        """
        v_norm = float(torch.sqrt(sum(t.double().pow(2).sum() for t in v)))
        if v_norm == 0.0:
            return None
        eps = ratio * step_size(self._theta_norm(), v_norm, self.op.dtype)
        shift = {
            n: shard_of(t, p).to(self._work_dtype) * eps
            for n, t, p in zip(self.op.names, v, self.op._param_objects)
        }
        return eps, shift

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

        leaves = None
        if self.sharded:
            pull(op.model, batch)
        else:
            leaves = self._shifted_leaves(None)
            stateless_closure(op.model, pull, leaves, batch)
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

    # -- evaluation --------------------------------------------------------------------
    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        """The exact products' isolation, without the SDPA math switch (no double backward)."""
        op = self.op
        buffers = [(b, b.detach().clone()) for b in op.model.buffers()] if self.sharded else []
        try:
            with isolated(op.model, eval_mode=op.options.eval_mode), torch.enable_grad():
                if not op.options.eval_mode:
                    seed_generators(op.model, op.options.seed)
                yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:  # in-place evaluation: put the buffers back
                    b.copy_(saved)

    def _theta_norm(self) -> float:
        """``‖θ‖`` in float64 (over all shards), cached while the parameters are unchanged."""
        params = self.op._param_objects
        key = self._state_key()
        if self._norm is not None and self._norm[0] == key and not self.sharded:
            return self._norm[1]
        if self.sharded:
            sq = torch.zeros((), dtype=torch.float64)
            for p in params:
                if is_sharded(p):
                    sq = sq + torch.linalg.vector_norm(p.detach().double()).full_tensor() ** 2
                else:
                    sq = sq + p.detach().double().pow(2).sum()
            norm = float(sq.sqrt())
        else:
            norm = float(torch.sqrt(sum(p.detach().double().pow(2).sum() for p in params)))
        self._norm = (key, norm)
        return norm

    def _accumulate(self, per_batch: Any, *, scalars: int) -> list[torch.Tensor]:
        """``sum_b w_b per_batch(b)``, reduced over the ranks, whole tensors.

        ``per_batch`` returns ``scalars`` 0-d tensors (a loss, the GGN's step check), then
        one tensor per parameter. Summed in float64 over several batches; one batch is only
        weighted, in the dtype ``per_batch`` returns (no float64 copy of parameter-sized
        tensors).
        """
        op = self.op
        if self.sharded:
            return self._accumulate_sharded(per_batch, scalars=scalars)
        total: list[torch.Tensor] | None = None
        several = len(op._data.batches) > 1
        for batch, w in zip(op._data.batches, op._data.weights):
            part = per_batch(to_device(batch, op.device))
            part = [t.double() for t in part] if several else list(part)
            if total is None:  # at weight 1 the part itself (no parameter-sized copy)
                total = part if w == 1.0 else [t * w for t in part]
            else:
                total = [a + w * t for a, t in zip(total, part)]
        assert total is not None
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
            t = _moved(t, shift[n], sign) if shift is not None else t.clone()
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
        leaves = self._shifted_leaves(shift, sign)

        def loss_and_backward(model: nn.Module, b: Any) -> torch.Tensor:
            # the backward runs while the leaves are substituted: activation checkpointing
            # recomputes the forward in it; backward(), not autograd.grad, since reentrant
            # checkpointing allows only the former (the leaves are fresh tensors, so
            # nothing else accumulates .grad)
            value = self._direct_loss(b)
            if value.requires_grad:
                value.backward()
            return value.detach()

        value = stateless_closure(self.op.model, loss_and_backward, leaves, batch)
        grads = [
            torch.zeros_like(t) if t.grad is None else t.grad.detach() for t in leaves.values()
        ]
        return [value.detach(), *grads]

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
                    local_tensor(p.detach()).copy_(_moved(orig, shift[n], sign))
            yield
        finally:
            with torch.no_grad():
                for p, orig in zip(params, saved):
                    local_tensor(p.detach()).copy_(orig)
            _dist.reshard(self.op.model)  # nor a gathered copy of the perturbed values
            self._rekey(key)

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
        out = op.model(*inputs) if isinstance(inputs, tuple) else op.model(inputs)
        return out, targets
