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

**Evaluation.** Losses, gradients and outputs at ``θ ± εv`` come from
:class:`~landscape.curvature._shifted.ShiftedEvaluation` (the functional and the in-place
FSDP2 paths, the data loop, isolation), which this engine extends with the differences,
their checks and the learned step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from landscape import distributed as _dist
from landscape._sums import dots, squares_sum
from landscape.curvature._shifted import ShiftedEvaluation, Tensors, moved
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
from landscape.distributed import is_sharded, local_tensor, shard_of, sharded_sum
from landscape.findings import user_stacklevel
from landscape.isolation import no_grad_forward, same_rng, stateless_closure
from landscape.params import Vector

if TYPE_CHECKING:  # pragma: no cover
    from landscape.curvature._model_operator import ModelOperator

__all__ = ["FirstOrder", "is_sharded", "sharded_reason", "step_size"]


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


class FirstOrder(ShiftedEvaluation):
    """Loss, gradient and central-difference products of one model operator.

    Args:
        op: the operator (its model, data, options and parameter selection).

    Attributes:
        refined: products computed again at a refined step (:mod:`._step`).
    """

    def __init__(self, op: ModelOperator) -> None:
        super().__init__(op)
        self._norm: tuple[tuple[int, ...], float] | None = None
        self._loss0: tuple[Any, float] | None = None
        self._learned: tuple[Any, float] | None = None  # (state, step / step_size())
        self._unchecked: Any = None  # a state whose check proved unreliable
        self.refined = 0  # products computed again at a refined step (_step.py)
        self._compute: torch.dtype | None = None  # compute_dtype, found at the first need
        self._kinks_warned = False

    @property
    def compute_dtype(self) -> torch.dtype:
        """The precision the model computes in, which sizes the step and the checks.

        The parameters' dtype, or a narrower one the model computes in: an FSDP2 mixed-
        precision policy's ``param_dtype`` (:func:`landscape.distributed.compute_dtype`),
        or what one forward pass shows, e.g. ``torch.autocast`` inside the closure
        (:meth:`~landscape.curvature._shifted.ShiftedEvaluation._forward_dtype`). A step
        sized for float32 moves a bfloat16 computation by less than its resolution: under
        bf16 autocast first-order products were 160-360 % off (docs/curvature.md,
        "Precision").
        """
        if self._compute is None:
            dtype = _dist.compute_dtype(self.op.model, self.op.dtype)
            if torch.finfo(dtype).bits >= 32:  # a narrower one may show in a forward
                seen = self._forward_dtype()  # which also lists the kinked ops (kinks)
                if seen is not None and torch.finfo(seen).eps > torch.finfo(dtype).eps:
                    dtype = seen
            self._compute = dtype
        return self._compute

    def _warn_kinks(self) -> None:
        """Warn once per model where first-order Hessian products are unreliable.

        In 16 bits (bf16 or fp16 parameters, or a policy computing in them): ``θ ± εv``
        rounded to 8 (or 11) bits leaves a difference of gradients far off along sharp
        directions; on a bf16 GPT-2 a reviewer measured 4 % off along a random direction
        but 97 % along the top eigenvector, and Lanczos returned a top eigenvalue 4x too
        small, unconverged (docs/curvature.md, "Precision"); that warning covers the kinks
        too. In float32 when the forward that sizes the step ran a kinked op
        (:mod:`landscape.curvature._kinks`): the step is large enough for many activations
        to cross their kink. Memory probes of a plan set ``_kinks_warned`` (their products
        are no result), and a model is warned about once (a monitor builds an operator at
        every measurement).
        """
        if self._kinks_warned:
            return
        self._kinks_warned = True
        dtype = str(self.compute_dtype).replace("torch.", "")
        sixteen = torch.finfo(self.compute_dtype).bits <= 16
        if not (sixteen or (torch.finfo(self.compute_dtype).bits <= 32 and self.kinks)):
            return
        # once per model: a monitor builds an operator at every measurement; once per job
        # (rank 0), as the switch to first-order products is said
        if not self.op._backend.say_once("first-order precision" if sixteen else "kinks") \
                or _dist.rank() != 0:
            return
        if sixteen:
            remedy = ("measure a float32 copy of the model"
                      if torch.finfo(self.op.dtype).bits <= 16 else
                      "measure outside autocast (or the mixed-precision policy), in the "
                      "parameters' own dtype")
            warnings.warn(
                f"{type(self.op).__name__}: first-order Hessian products in {dtype}: a "
                "difference of two gradients at weights perturbed in 16 bits can be far off "
                "along sharp directions (a top eigenvalue 4x too small on a bf16 GPT-2); "
                "prefer the exact product where it is possible (a reentrant checkpoint: "
                f"use_reentrant=False), or {remedy} (docs/curvature.md, 'Precision')",
                RuntimeWarning, stacklevel=user_stacklevel(),
            )
            return
        warnings.warn(
            f"{type(self.op).__name__}: first-order Hessian products in "
            f"{dtype} on a model with kinks "
            f"({', '.join(sorted(self.kinks))}): a difference of gradients across them can "
            "be far off (30 % on a ReLU MLP's top eigenvalue); prefer the exact product "
            "(a reentrant checkpoint: use_reentrant=False) or float64 (docs/curvature.md, "
            "'Limitation: kinks')", RuntimeWarning, stacklevel=user_stacklevel(),
        )

    @property
    def _extrapolates(self) -> bool:
        """Whether the GGN's ``J v`` is extrapolated.

        Not when the model computes in 16 bits, whose rounding (~6e-2 in bf16) dominates
        any truncation and would be tripled.
        """
        return torch.finfo(self.compute_dtype).bits >= 32

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
        self._warn_kinks()
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
            if not self._settle(learned, genuine(gap * eps**2 / 2.0, residual, q1)):
                # the losses' rounding posed as truncation: the product again at the step
                # it had (once per parameter state)
                del shift, product
                eps, shift = self._steps_along(v, self._ratio())
                product, _ = self._central_difference(eps, shift)
        return tuple(t.to(self.op.dtype) for t in product)

    def _settle(self, learned: float, genuine: bool) -> bool:
        """After a refined product: keep its step for the operator, or switch the check off.

        The check is switched off at these parameters when what it saw was not genuine
        truncation (:mod:`landscape.curvature._step`).

        Returns:
            ``genuine``.
        """
        if genuine:
            self.refined += 1
            self._learned = (self._state_key(), learned)
        else:
            self._unchecked = self._state_key()
        return genuine

    def _central_difference(self, eps: float, shift: Tensors) -> tuple[list[torch.Tensor], float]:
        """``(g(θ + εv) − g(θ − εv)) / 2ε`` (:attr:`_work_dtype`) and ``L_+ + L_-``."""

        def per_batch(batch: Any) -> list[torch.Tensor]:
            with same_rng(self.op.model) as rewind:
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
        trunc = truncation(q, second, losses, loss0, eps, self.compute_dtype)
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
            with no_grad_forward():
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
            if not self._settle(learned, ggn_genuine(trunc, trunc1)):
                # rounding posed as truncation: the product again at the step it had
                del shift, product
                eps, shift = self._steps_along(v, self._ratio())
                product, _ = self._extrapolated(eps, shift)
        return tuple(t.to(self.op.dtype) for t in product)

    def _extrapolated(self, eps: float, shift: Tensors) -> tuple[list[torch.Tensor], float]:
        """``J^T Λ R`` (:meth:`ggn_product`) and the relative truncation ``t`` of ``D(ε)``."""

        def per_batch(batch: Any) -> list[torch.Tensor]:
            with same_rng(self.op.model) as rewind, torch.no_grad():
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
        if ggn_negligible(trunc, self.compute_dtype):  # no need to measure the rounding
            return None
        ratio = ggn_ratio(trunc, self._rounding(shift))
        if ratio is None:
            return None
        ratio = max(ratio, MIN_RATIO / current)  # never below the floor in all
        # a shrink the floor clamped to ρ >= 1/2 is not attempted: the truncation would fall
        # by less than 4x (for ρ > 1/√2 by less than the half ggn_genuine asks), not worth
        # four forwards and a backward; near the floor the step so stays within 2x of it
        return ratio if ratio < REFINE_BELOW else None

    def _rounding(self, shift: Tensors) -> float:
        """``‖fl(θ + εv) − θ − εv‖ / ‖εv‖`` over all shards (:func:`displacement_error`)."""
        pairs = [(local_tensor(p.detach()), shift[n])
                 for n, p in zip(self.op.names, self.op._param_objects)]
        err, size = sharded_sum(
            [torch.tensor(displacement_error(pairs, lambda t, s: moved(t, s, 1)))],
            self.sharded,
        ).tolist()
        return math.sqrt(err / size) if size > 0 else math.inf

    def _steps_along(self, v: Vector, ratio: float = 1.0) -> tuple[float, Tensors] | None:
        """The step ``ε`` and the shift ``εv`` (this rank's shards, :attr:`_work_dtype`).

        ``ε`` is ``ratio`` times :func:`~landscape.curvature._step.step_size`. None for
        v = 0. The other side, ``θ - εv``, is formed with ``sign=-1`` from the same shift
        (bitwise what adding ``-εv`` gives; no negated copy of it).
        """
        v_norm = math.sqrt(squares_sum(v))
        if v_norm == 0.0:
            return None
        eps = ratio * step_size(self._theta_norm(), v_norm, self.compute_dtype)
        shift = {
            n: shard_of(t, p).to(self._work_dtype) * eps
            for n, t, p in zip(self.op.names, v, self.op._param_objects)
        }
        return eps, shift

    # -- evaluation --------------------------------------------------------------------
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
            norm = math.sqrt(squares_sum([p.detach() for p in params]))
        self._norm = (key, norm)
        return norm
