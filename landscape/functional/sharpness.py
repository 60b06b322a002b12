"""Sharpness: SAM epsilon-sharpness, adaptive (ASAM) sharpness, lambda_max vs. stability.

References:
* Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-aware minimization for efficiently
  improving generalization", ICLR 2021 (arXiv:2010.01412).
* Kwon, Kim, Park & Choi, "ASAM: adaptive sharpness-aware minimization for scale-invariant
  learning of deep neural networks", ICML 2021 (arXiv:2102.11600).
* Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient descent on neural networks typically
  occurs at the edge of stability", ICLR 2021 (arXiv:2103.00065), and Cohen et al.,
  "Adaptive gradient methods at the edge of stability" (arXiv:2207.14484): lambda_max
  compared with the optimiser's linear-stability threshold (docs/curvature.md).

Definitions follow docs/metrics.md, "Sharpness": the first-order maximiser
eps^ = rho sign(g) |g|^(q-1) / (||g||_q^q)^(1/p) of L(w + eps) over the p-norm ball
(eps^ = rho g / ||g|| for p = 2), and the metric S = L(w + eps^) - L(w) on the *same* batch.
The model is evaluated through ``torch.func.functional_call`` with a parameter dict (never a
``p.data`` write, no ``.grad`` left behind), in eval mode by default with modes and RNG
restored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from landscape import distributed as _dist
from landscape._deprecation import module_getattr
from landscape.batches import model_call
from landscape.functional._common import MetricResult, fail
from landscape.functional._model import as_param_dict, detached_params
from landscape.isolation import isolated, rnn_differentiable, same_rng, stateless_call
from landscape.params import ParamSpec

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class SharpnessResult(MetricResult):
    """The result of :func:`sam_sharpness` and :func:`asam_sharpness`.

    ``value`` = L(w + eps^) - L(w); ``loss`` = L(w); ``perturbed_loss`` = L(w + eps^);
    ``grad_norm`` = ||g||_2 (of the scaled gradient T g for ASAM); ``rho`` the radius;
    ``used_fallback`` whether the fallback direction replaced a zero gradient.
    """

    value: torch.Tensor
    loss: torch.Tensor
    perturbed_loss: torch.Tensor
    grad_norm: torch.Tensor
    rho: float
    used_fallback: bool = False
    reason: str | None = None

    def __float__(self) -> float:
        return float(self.value.item())


def _loss_and_grad(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    params: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = loss_fn(stateless_call(model, p, *model_call(model, inputs)), targets)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor (a mean-reduced loss), "
                             f"got {shape}: reduction='none'?")
        return loss

    grads, loss = torch.func.grad_and_value(f)(params)
    return loss.detach(), {k: g.detach() for k, g in grads.items()}


def _loss_at(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    params: dict[str, torch.Tensor],
) -> torch.Tensor:
    with torch.no_grad():
        return loss_fn(stateless_call(model, params, *model_call(model, inputs)),
                       targets).detach()


def _norm(v: Mapping[str, torch.Tensor], p: float = 2.0) -> torch.Tensor:
    flat = torch.cat([t.reshape(-1).double() for t in v.values()])
    return torch.linalg.vector_norm(flat, ord=p)


def _dual_direction(g: dict[str, torch.Tensor], p: float, rho: float) -> dict[str, torch.Tensor]:
    """Rho sign(g)|g|^(q-1) / (||g||_q^q)^(1/p), the maximiser of <g, e> over ||e||_p <= rho."""
    if math.isinf(p):
        return {k: rho * torch.sign(t) for k, t in g.items()}
    q = p / (p - 1.0)
    denom = float(_norm(g, q) ** (q / p))
    return {
        k: (rho * torch.sign(t) * t.abs() ** (q - 1.0) / denom).to(t.dtype) for k, t in g.items()
    }


def _scales(
    params: dict[str, torch.Tensor], normalization: str, eta: float, exclude_1d: bool
) -> dict[str, torch.Tensor]:
    """Diagonal of the ASAM operator T_w per parameter tensor."""
    out = {}
    for k, w in params.items():
        if exclude_1d and w.dim() <= 1:
            out[k] = torch.ones_like(w)
        elif normalization == "filter" and w.dim() >= 2:
            fn = w.reshape(w.shape[0], -1).norm(dim=1)
            out[k] = (fn.reshape((-1,) + (1,) * (w.dim() - 1)) + eta).expand_as(w)
        else:
            out[k] = w.abs() + eta
    return out


def _sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    *,
    rho: float,
    p: float,
    scales: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None,
    names: ParamSpec,
    fallback_direction: Any,
    eval_mode: bool,
    tol: float,
    strict: bool,
) -> SharpnessResult:
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if not p > 1:
        raise ValueError(f"p must be > 1 (2 or inf are usual), got {p}")
    params = detached_params(model, names)
    if not params:
        raise ValueError("model has no trainable parameters")
    if any(_dist.is_sharded(t) for t in params.values()):
        raise NotImplementedError(
            "sam_sharpness/asam_sharpness: the model's parameters are FSDP2 shards "
            "(DTensor), which torch.func differentiates only through the model's own "
            "forward; measure on the unsharded model (docs/distributed.md, 'Not yet')")
    # the same noise at w and at w + eps (dropout with eval_mode=False): a difference of
    # two losses under different dropout masks would not tend to 0 with rho
    with isolated(model, eval_mode=eval_mode), rnn_differentiable(model), \
            same_rng(model) as rewind:
        loss, g = _loss_and_grad(model, loss_fn, inputs, targets, params)
        t = scales(params) if scales is not None else None
        tg = {k: g[k] * t[k] for k in g} if t is not None else g  # T g
        gnorm = _norm(tg)
        used_fallback = False
        if not torch.isfinite(loss) or not torch.isfinite(gnorm):
            reason = fail("non_finite", "loss or gradient is not finite", strict)
            nan = torch.tensor(math.nan, dtype=torch.float64, device=loss.device)
            return SharpnessResult(
                nan, loss.double(), nan, gnorm.to(loss.device), rho, False, reason
            )
        if float(gnorm) <= tol:
            if fallback_direction is None:
                reason = fail(
                    "zero_gradient",
                    f"||g|| = {float(gnorm):.3g} <= tol; pass "
                    "fallback_direction (e.g. the top Hessian eigenvector)",
                    strict,
                )
                nan = torch.tensor(math.nan, dtype=torch.float64, device=loss.device)
                return SharpnessResult(
                    nan, loss.double(), nan, gnorm.to(loss.device), rho, False, reason
                )
            d = as_param_dict(fallback_direction, params, "fallback_direction")
            dn = float(_norm(d))
            if dn == 0:
                raise ValueError("fallback_direction must be non-zero")
            eps = {k: rho * v / dn for k, v in d.items()}
            used_fallback = True
        elif t is None:
            eps = _dual_direction(g, p, rho)
        else:
            # first-order maximiser over ||T^-1 e||_p <= rho:  e = T * dual(T g)
            e_t = _dual_direction(tg, p, rho)
            eps = {k: t[k] * e_t[k] for k in g}
        perturbed = {k: params[k] + eps[k] for k in params}
        rewind()
        ploss = _loss_at(model, loss_fn, inputs, targets, perturbed)
    loss64, ploss64 = loss.double(), ploss.double()
    return SharpnessResult(
        ploss64 - loss64, loss64, ploss64, gnorm.to(loss.device), rho, used_fallback
    )


def sam_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    *,
    rho: float = 0.05,
    p: float = 2.0,
    params: ParamSpec = None,
    fallback_direction: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | None = None,
    eval_mode: bool = True,
    tol: float = 1e-12,
    strict: bool = False,
) -> SharpnessResult:
    """First-order SAM epsilon-sharpness S = L(w + eps^) - L(w) (Foret et al., ICLR 2021).

    eps^ = rho g/||g||_2 for ``p=2`` (general p: the dual-norm maximiser; ``p=math.inf``
    gives rho sign(g)), with g = grad L(w) on the same batch ``(inputs, targets)``;
    ``loss_fn(outputs, targets)`` must be a mean-reduced scalar (docs/curvature.md, "Conventions").
    ``params`` restricts the perturbation to a selection of trainable parameters (names,
    glob patterns, submodules; see ``landscape.params.select_named_parameters``). When
    ||g|| <= ``tol`` (an exact minimum) eps^ is undefined: with ``fallback_direction``
    (e.g. the top Hessian eigenvector, exact for quadratics) eps^ = rho d/||d|| and
    ``used_fallback`` is set; otherwise NaN with reason ``"zero_gradient"``. The model is
    not modified (:mod:`landscape.isolation`: no ``.grad``, no ``p.data`` write, buffers
    cloned, modes and RNG restored).
    """
    return _sharpness(
        model,
        loss_fn,
        inputs,
        targets,
        rho=rho,
        p=p,
        scales=None,
        names=params,
        fallback_direction=fallback_direction,
        eval_mode=eval_mode,
        tol=tol,
        strict=strict,
    )


def asam_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    *,
    rho: float = 0.5,
    eta: float = 0.0,
    normalization: Literal["element", "filter"] = "element",
    exclude_1d: bool = False,
    p: float = 2.0,
    params: ParamSpec = None,
    fallback_direction: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | None = None,
    eval_mode: bool = True,
    tol: float = 1e-12,
    strict: bool = False,
) -> SharpnessResult:
    """First-order adaptive sharpness (ASAM; Kwon et al., ICML 2021, arXiv:2102.11600).

    S = max_{||T_w^-1 eps||_p <= rho} L(w + eps) - L(w) at the first-order maximiser
    eps^ = rho T_w^2 g / ||T_w g||_2 (p = 2). T_w is diagonal:

    * ``normalization="element"``: T = |w| + eta per entry;
    * ``normalization="filter"``: every entry of a filter (slice along dim 0 of a tensor with
      >= 2 dims) gets ||filter||_2 + eta; 1-D tensors use |w| + eta;
    * ``exclude_1d=True``: tensors with <= 1 dim (biases, norm scales) get T = 1, i.e. they
      are perturbed like plain SAM (the official code's rule is by name, "weight").

    Defaults: rho = 0.5 (the official class default) and eta = 0, for which the value is
    exactly invariant to function-preserving rescalings of ReLU layers (docs/metrics.md,
    "Sharpness").
    ``grad_norm`` reports ||T_w g||. Other arguments as in :func:`sam_sharpness`.
    """
    if normalization not in ("element", "filter"):
        raise ValueError(f"normalization must be 'element' or 'filter', got {normalization!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")

    def scales(pd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return _scales(pd, normalization, eta, exclude_1d)

    return _sharpness(
        model,
        loss_fn,
        inputs,
        targets,
        rho=rho,
        p=p,
        scales=scales,
        names=params,
        fallback_direction=fallback_direction,
        eval_mode=eval_mode,
        tol=tol,
        strict=strict,
    )


def stability_ratio(lambda_max: float | torch.Tensor, threshold: float | torch.Tensor) -> float:
    """lambda_max / threshold: curvature relative to the optimiser's stability threshold.

    ``threshold`` from :func:`landscape.curvature.stability_threshold` (e.g. 2/lr for GD,
    38/lr for Adam at beta1 = 0.9 with preconditioned sharpness; docs/curvature.md);
    ``lambda_max`` from the curvature engine (``landscape.top_eigenvalues``). A ratio >= 1
    means the edge of stability is reached. NaN lambda_max gives NaN; ``threshold`` must
    be finite and > 0.
    """
    thr = float(threshold)
    if not thr > 0 or math.isinf(thr):
        raise ValueError(f"threshold must be finite and > 0, got {thr}")
    return float(lambda_max) / thr


__all__ = [
    "SharpnessResult",
    "asam_sharpness",
    "sam_sharpness",
    "stability_ratio",
]


# old result-class names, for one release (docs/vocabulary.md)
__getattr__ = module_getattr(__name__, {"Sharpness": "SharpnessResult"}, globals())
