"""The generalised Gauss-Newton matrix, as a matrix-free operator (Schraudolph 2002).

``G v = sum_b (n_b / N) J_b^T Lambda_b J_b v`` with ``J_b`` the Jacobian of the model output
w.r.t. the parameters on batch ``b`` and ``Lambda_b`` the Hessian of the loss w.r.t. that
output (Martens 2020, "New insights and perspectives on the natural gradient method"): one
JVP, one output-space Hessian-vector product, one VJP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import grad, jvp, vjp

from landscape.curvature._evaluation import scalar_loss, zeros_for_none
from landscape.curvature._model_operator import Forward, LossFn, ModelOperator, Tensors
from landscape.isolation import same_rng
from landscape.params import Vector

__all__ = ["GGN"]


class GGN(ModelOperator):
    r"""The generalised Gauss-Newton matrix of the loss w.r.t. the selected parameters.

    .. math::

        G = \sum_b \frac{n_b}{N} J_b^\top \Lambda_b J_b, \qquad
        \Lambda_b = \nabla^2_{f} \, \ell_b(f, y) \big|_{f = f_\theta(x_b)},

    (docs/curvature.md, "Operators"). ``Lambda_b`` is obtained by automatic
    differentiation, so any loss of the outputs works: for mean ``MSELoss`` it is
    ``(2/C) I``, for softmax cross-entropy ``diag(p) - p p^T`` (the loss's own reduction is
    part of it). ``G`` is positive semi-definite when the loss is convex in the outputs,
    and equals the Hessian when the model is linear in its parameters.

    Args:
        model: the model.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (required: the GGN splits the
            model output from the loss).
        data: one batch or an iterable of batches.
        forward: ``forward(model, batch) -> (outputs, targets)``, replacing the default
            ``(model(inputs), targets)`` for other batch structures (e.g. a language model
            returning flattened logits and next tokens).
        **options: the shared options of :class:`~landscape.curvature.OperatorOptions`, as
            for :class:`~landscape.curvature.Hessian`.

    Raises:
        ValueError: ``loss_fn`` is missing, or a bad option or data.
        TypeError: an unknown keyword argument.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from landscape.curvature import GGN
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.eye(2, dtype=torch.float64)
        >>> G = GGN(model, F.mse_loss, (x, torch.zeros(2, 1, dtype=torch.float64)))
        >>> G.to_dense()  # (2/N) X^T X with N = 2
        tensor([[1., 0.],
                [0., 1.]], dtype=torch.float64)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any = None,
        *,
        forward: Forward | None = None,
        **options: Any,
    ) -> None:
        if loss_fn is None:
            raise ValueError("GGN: loss_fn is required (the GGN splits model output and loss)")
        super().__init__(model, loss_fn, data, forward=forward, **options)

    # -- the product hooks ---------------------------------------------------------------
    def _func_product(self, primal: Tensors, tangent: Tensors, batch: Any) -> Tensors:
        def fwd(q: Tensors) -> tuple[Any, Any]:
            return self._model_output(q, batch)

        # J v and J^T u come from two forwards; with stochastic layers (dropout with
        # eval_mode=False) both must draw the same noise, else the product is J_b^T L J_a
        # (not symmetric, not the GGN of either mask): rewind the RNG in between
        with same_rng(self.model) as rewind:
            out, jv, targets = jvp(fwd, (primal,), (tangent,), has_aux=True)
            # output-space Hessian (small, symmetric) by reverse-over-reverse: F.mse_loss has
            # no forward-mode derivative of its backward in torch 2.13
            hjv = vjp(grad(lambda o: scalar_loss(self.loss_fn(o, targets))), out)[1](jv)[0]
            if not self.options.eval_mode:
                rewind()
            _, pullback, _ = vjp(fwd, primal, has_aux=True)
        return pullback(hjv)[0]

    def _first_order_product(self, v: Vector) -> Vector:
        # J v by a central difference of the outputs, Lambda exact, J^T by one backward
        return self._first_order.ggn_product(v)

    def _autograd_product(self, tangent: Tensors, batch: Any) -> list[torch.Tensor]:
        leaves = self._leaves()
        out, targets = self._model_output(leaves, batch)
        if not isinstance(out, torch.Tensor):  # a dict or tuple: torch.func's product
            try:
                product = self._func_product(self._current(), tangent, batch)
            except Exception as err:  # a dataclass, no pytree: torch.func cannot either
                raise TypeError(
                    f"GGN: the model's output ({type(out).__name__}) is no tensor, nor a dict "
                    "or tuple of tensors, which the GGN differentiates: pass forward=lambda "
                    "model, batch: (model(inputs).logits, targets)") from err
            return [product[n] for n in self.names]
        if not out.requires_grad:
            # unused parameters, or cut off by a reentrant activation checkpoint: raises
            self._check_reached([None] * len(leaves), leaves, batch)
            return [torch.zeros_like(t) for t in leaves.values()]
        probe = torch.zeros_like(out, requires_grad=True)
        jt = torch.autograd.grad(
            out, list(leaves.values()), probe, create_graph=True, allow_unused=True
        )
        self._check_reached(jt, leaves, batch)
        pairs = [(g, tangent[n]) for g, n in zip(jt, self.names) if g is not None]
        jv = torch.autograd.grad([g for g, _ in pairs], probe, [t for _, t in pairs])[0]
        o = out.detach().requires_grad_(True)
        go = torch.autograd.grad(scalar_loss(self.loss_fn(o, targets)), o, create_graph=True)[0]
        hjv = torch.autograd.grad(go, o, jv)[0] if go.requires_grad else torch.zeros_like(o)
        res = torch.autograd.grad(out, list(leaves.values()), hjv, allow_unused=True)
        return zeros_for_none(res, leaves.values())
