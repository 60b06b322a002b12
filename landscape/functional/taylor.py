"""Taylor convergence radius of the cross-entropy along a direction in parameter space.

Reference: Sao, "Ghosts of Softmax: complex singularities that limit safe step sizes in
cross-entropy", arXiv:2603.13552 (2026); conventions in docs/metrics.md, "Taylor radius of
cross-entropy".

Along a unit direction v the logits move, to first order, as z(t) = z(0) + a t with
a(x; v) = J_z(x) v (one forward-mode JVP for the whole batch). The cross-entropy
l(t) = -z_y(t) + log sum_k exp(z_k(t)) is singular where the partition function vanishes,
and that never happens inside |t| < pi / Delta_a(x; v), Delta_a = max_k a_k - min_k a_k
(Thm. 4.6). Over a set S of samples (every position of a sequence model counts),
rho_a(v) = pi / max_{x in S} Delta_a(x; v) (Def. 4.7). For a proposed step p the normalised
step is r = ||p|| / rho_a(p/||p||) = max_x spread(J_z(x) p) / pi (Def. 5.1): r < 1 is inside
the conservative disk, r >= 1 is where collapse appears.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from landscape import distributed as _dist
from landscape._deprecation import module_getattr
from landscape.capture import output_logits, predictions_per_sample
from landscape.functional._common import (
    MetricResult,
    all_finite,
    as_float_tensor,
    check_targets,
    fail,
)
from landscape.functional._model import (
    OutputFn,
    as_param_dict,
    detached_params,
    vec_norm,
)
from landscape.isolation import (
    isolated,
    no_grad_forward,
    rng_rewind,
    rnn_differentiable,
    sdpa_math,
    stateless_call,
)

PI = math.pi


def logit_spread(logit_derivatives: torch.Tensor) -> torch.Tensor:
    """Per-sample spread Delta_a = max_k a_k - min_k a_k over the last (class) dimension.

    ``logit_derivatives`` has shape (..., C), non-empty; every leading index is a sample.
    Returns a flat (S,) float64 tensor.
    """
    a = as_float_tensor(logit_derivatives, "logit_derivatives", min_ndim=1, non_empty=True)
    a = a.reshape(-1, a.shape[-1]).to(torch.float64)
    return a.max(dim=1).values - a.min(dim=1).values


def radius_from_spread(spread: torch.Tensor) -> torch.Tensor:
    """Pi / Delta_a elementwise (+inf where Delta_a = 0): the per-sample lower bound on rho*."""
    s = torch.as_tensor(spread, dtype=torch.float64)
    return torch.where(s > 0, PI / torch.where(s > 0, s, 1.0), math.inf)


def binary_radius(margin: torch.Tensor | float, slope_gap: torch.Tensor | float) -> torch.Tensor:
    """Exact two-class radius rho* = sqrt(delta^2 + pi^2) / |Delta_a| (Sao 2026, Thm. 4.3).

    ``margin`` delta = z_1(0) - z_2(0) and ``slope_gap`` Delta_a = a_1 - a_2; +inf where the
    slopes agree. For C > 2 with delta = z_y - z_c (c the runner-up) and Delta_{y,c} =
    a_y - a_c this is the paper's top-2 refinement (eq. 13), an estimate rather than a bound.
    """
    d = torch.as_tensor(margin, dtype=torch.float64)
    g = torch.as_tensor(slope_gap, dtype=torch.float64).abs()
    num = torch.sqrt(d * d + PI * PI)
    return torch.where(g > 0, num / torch.where(g > 0, g, 1.0), math.inf)


@dataclasses.dataclass(frozen=True)
class TaylorRadiusResult(MetricResult):
    """Taylor-radius diagnostics along a direction (all float64, on the logits' device).

    * ``rho_a``: pi / max_x Delta_a(x; v) for the unit direction v (+inf when no logit moves).
    * ``step_norm``: ||direction||; ``r``: step_norm / rho_a (the normalised step).
    * ``spread``: (S,) per-sample Delta_a(x; v) for the unit direction.
    * ``radius``: (S,) per-sample bounds pi / Delta_a(x; v).
    * ``radius_top2``: (S,) sqrt(delta^2 + pi^2) / |a_y - a_c| with y the target (or the
      predicted class) and c the strongest other class; exact for two classes.
    * ``quantile``: None, or the quantile of Delta_a used instead of the max (no guarantee).
    """

    rho_a: torch.Tensor
    r: torch.Tensor
    step_norm: torch.Tensor
    spread: torch.Tensor
    radius: torch.Tensor
    radius_top2: torch.Tensor
    quantile: float | None = None
    reason: str | None = None


def taylor_radius_from_logits(
    logits: torch.Tensor,
    logit_derivatives: torch.Tensor,
    *,
    step_norm: float | torch.Tensor = 1.0,
    targets: torch.Tensor | None = None,
    quantile: float | None = None,
    strict: bool = False,
) -> TaylorRadiusResult:
    """Taylor-radius diagnostics from logits z(0) and directional derivatives a = J_z p.

    ``logit_derivatives`` are along the *unnormalised* direction p of norm ``step_norm``
    (pass 1.0 when p is already a unit vector); both tensors have shape (..., C).
    ``targets`` (shape (...)) choose y in the top-2 radius; default: the predicted class,
    which also stands in for a negative target (an ``ignore_index`` such as -100); they
    must be integer class indices. ``quantile`` replaces the max over samples by that
    quantile of Delta_a (the FAQ's outlier-robust variant; the bound guarantee is lost).
    """
    z = as_float_tensor(logits, "logits", min_ndim=1, non_empty=True)
    a = as_float_tensor(logit_derivatives, "logit_derivatives", min_ndim=1)
    if z.shape != a.shape:
        raise ValueError(
            f"logits and logit_derivatives must have the same shape, got "
            f"{tuple(z.shape)} and {tuple(a.shape)}"
        )
    if quantile is not None and not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    c = z.shape[-1]
    z2 = z.reshape(-1, c).to(torch.float64)
    a2 = a.reshape(-1, c).to(torch.float64)
    dev = z2.device
    norm = torch.as_tensor(step_norm, dtype=torch.float64, device=dev)
    if norm.numel() != 1:
        raise ValueError(f"step_norm must be one number (a scalar), got shape "
                         f"{tuple(norm.shape)}")
    norm = norm.reshape(())
    if not (norm >= 0 and torch.isfinite(norm)):
        raise ValueError(f"step_norm must be finite and >= 0, got {float(norm)}")
    if targets is None:
        y = z2.argmax(1)
    else:
        y = check_targets(targets, z2.shape[0], c).to(dev)
        # a negative target is an ignore_index (-100, language-model padding): its
        # position takes the predicted class, as without targets
        y = torch.where(y < 0, z2.argmax(1), y)
    reason = None
    if not (all_finite(z2) and all_finite(a2)):
        reason = fail(
            "non_finite", "logits or their directional derivatives are not finite", strict
        )
        nan = torch.tensor(math.nan, dtype=torch.float64, device=dev)
        full = torch.full((z2.shape[0],), math.nan, dtype=torch.float64, device=dev)
        return TaylorRadiusResult(nan, nan, norm, full, full, full, quantile, reason)
    unit = a2 / norm if norm > 0 else torch.zeros_like(a2)
    spread = unit.max(1).values - unit.min(1).values
    agg = spread.max() if quantile is None else torch.quantile(spread, quantile)
    rho_a = PI / agg if agg > 0 else torch.tensor(math.inf, dtype=torch.float64, device=dev)
    r = norm * agg / PI
    # top-2: the strongest class other than y
    others = z2.scatter(1, y[:, None], -math.inf)
    cidx = others.argmax(1) if c > 1 else y
    margin = z2.gather(1, y[:, None])[:, 0] - z2.gather(1, cidx[:, None])[:, 0]
    gap = unit.gather(1, y[:, None])[:, 0] - unit.gather(1, cidx[:, None])[:, 0]
    return TaylorRadiusResult(
        rho_a,
        r,
        norm,
        spread,
        radius_from_spread(spread),
        binary_radius(margin, gap),
        quantile,
        None,
    )


def logits_call(
    model: nn.Module, inputs: Any, output_fn: OutputFn | None = None,
    keywords: Mapping[str, Any] | None = None,
) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """``params -> logits``: the model at ``params`` (:func:`stateless_call`), logits only.

    The logits are read from the output by ``output_fn``, by default through
    :func:`landscape.capture.output_logits` (a ``(logits, aux)`` tuple, a dict or a Hugging
    Face ``ModelOutput`` gives its logits), so a transform (``torch.func.jvp``) sees one
    tensor. A model whose ``forward`` takes ``use_cache`` (Hugging Face language models) is
    called with ``use_cache=False``: no key-value cache is built, nor returned.

    Args:
        model: the model.
        inputs: a tensor or a tuple of positional arguments.
        output_fn: extracts the logits from the model's output.
        keywords: keyword arguments of the model (a tokenizer's output).

    Returns:
        The function of a ``{name: tensor}`` mapping of (some of) the parameters.

    Raises:
        ValueError: the output holds no tensor (raised when the function is called).
    """
    kwargs = dict(keywords or {})
    if _takes_use_cache(model):
        kwargs["use_cache"] = False

    def call(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = stateless_call(model, params, inputs, kwargs)
        logits = output_fn(out) if output_fn is not None else output_logits(out)
        if not isinstance(logits, torch.Tensor):
            if output_fn is not None:
                how = f"output_fn= returned {type(logits).__name__}, not a tensor"
            elif predictions_per_sample(out):
                how = ("per-sample prediction dicts (a detection model in eval mode); "
                       "the Taylor radius needs logits")
            else:
                how = "pass output_fn= to extract it"
            raise ValueError(
                f"the model's output ({type(out).__name__}) holds no logits tensor: {how}")
        return logits

    return call


def _takes_use_cache(model: nn.Module) -> bool:
    """Whether ``model.forward`` names a ``use_cache`` parameter."""
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def directional_logit_derivatives(
    model: nn.Module,
    inputs: Any,
    direction: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    *,
    eval_mode: bool = True,
    output_fn: OutputFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, a = J_z direction, ||direction||) from one forward-mode JVP.

    ``direction`` is a parameter-space vector: a sequence with one tensor per trainable
    parameter (registration order), or a dict naming a subset (the rest is zero). The model
    is evaluated through :func:`landscape.isolation.stateless_call` (detached parameters,
    cloned buffers) inside :func:`landscape.isolation.isolated` (eval mode by default; modes,
    ``requires_grad``, ``.grad`` and the RNG restored) and :func:`~landscape.isolation.sdpa_math`
    (fused attention kernels have no forward-mode derivative); no ``.grad`` is created.
    ``inputs`` is a tensor or a tuple of positional arguments; ``output_fn`` extracts the
    logits from the model's output (default: :func:`landscape.capture.output_logits`, so a
    ``(logits, aux)`` tuple or a Hugging Face ``ModelOutput`` gives its logits; a model
    taking ``use_cache`` is called with ``use_cache=False``: :func:`logits_call`).
    """
    params = detached_params(model)
    if not params:
        raise ValueError("model has no trainable parameters")
    tangent = as_param_dict(direction, params, "direction")
    if isinstance(direction, Mapping):  # differentiate only the named tensors
        params = {k: v for k, v in params.items() if k in direction}
        tangent = {k: tangent[k] for k in params}
    f = logits_call(model, inputs, output_fn)

    with isolated(model, eval_mode=eval_mode), rnn_differentiable(model):
        logits, a = logit_tangent(f, params, tangent)
    return logits.detach(), a.detach(), vec_norm(tangent).to(logits.device)


def logit_tangent(
    logits_of: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    at: Mapping[str, torch.Tensor],
    direction: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z(at), J_z(at) p)``: the logits and their derivative along ``p = direction``.

    One forward-mode JVP (``torch.func.jvp``, under :func:`~landscape.isolation.sdpa_math`:
    fused attention kernels have no forward-mode derivative). Where forward-mode AD cannot
    go through the model (reentrant activation checkpointing and other custom autograd
    functions without ``setup_context``), a central difference of the logits instead,
    ``J p = (z(at + ε p) − z(at − ε p)) / 2ε`` with the step ``ε = u^{1/3} (1 + ‖at‖) /
    (8 ‖p‖)`` of the first-order curvature products (docs/curvature.md, "First-order
    products"): three no-grad forwards at substituted parameters, the error about
    ``u^{2/3}`` relative. The error of the JVP is raised when the difference fails too.

    Args:
        logits_of: the logits as a function of a ``{name: tensor}`` mapping of parameters
            (:func:`logits_call`).
        at: the parameters to differentiate at.
        direction: ``p``, the same names.

    Returns:
        The logits and the tangent ``J p``, in the logits' dtype.
    """
    # the difference's three forwards draw the noise the JVP's one forward drew (dropout
    # with eval_mode=False; the failed JVP drew it too): else the difference of two masks,
    # over 2 eps, is the tangent
    rewind = rng_rewind(at.values())

    try:
        with sdpa_math():
            return torch.func.jvp(logits_of, (dict(at),), (dict(direction),))
    except Exception as err:  # no forward-mode AD through the model
        try:
            return _central_difference(logits_of, at, direction, rewind)
        except Exception:
            raise err from None


def _central_difference(
    logits_of: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    at: Mapping[str, torch.Tensor],
    direction: Mapping[str, torch.Tensor],
    rewind: Callable[[], None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`logit_tangent` by a central difference (its docstring); the model untouched.

    ``rewind()`` puts the RNG back before each forward, so all three draw the same noise.
    """
    from landscape.curvature._step import step_size

    base = {k: t.detach() for k, t in at.items()}
    step = {k: direction[k].detach() for k in base}
    v_norm = float(vec_norm(step))
    eps = step_size(float(vec_norm(base)), v_norm, next(iter(base.values())).dtype) \
        if v_norm > 0 else 0.0

    def logits_at(alpha: float) -> torch.Tensor:
        rewind()
        moved = base if alpha == 0.0 else {
            k: (b.double() + alpha * step[k].double()).to(b.dtype) for k, b in base.items()}
        with no_grad_forward():
            return logits_of(moved).detach()

    return difference_tangent(logits_at, eps)


def difference_tangent(
    logits_at: Callable[[float], torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z(0), J p)`` from the logits ``z(α)`` at ``at + α p``, by a central difference.

    ``J p = (z(ε) − z(−ε)) / 2ε``, subtracted in float64, in the logits' dtype; zero when
    ``ε`` is 0 (no step). Shared by :func:`logit_tangent` and the FSDP2 path of the
    ``taylor_radius`` metric, which moves the shards in place.
    """
    logits = logits_at(0.0)
    if eps <= 0:
        return logits, torch.zeros_like(logits)
    tangent = (logits_at(eps).double() - logits_at(-eps).double()) / (2.0 * eps)
    return logits, tangent.to(logits.dtype)


def taylor_radius(
    model: nn.Module,
    inputs: Any,
    direction: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    *,
    targets: torch.Tensor | None = None,
    quantile: float | None = None,
    eval_mode: bool = True,
    output_fn: OutputFn | None = None,
    strict: bool = False,
) -> TaylorRadiusResult:
    """Taylor radius of cross-entropy along ``direction``, and the normalised step.

    Taylor radius rho_a = pi / max_x Delta_a(x; v) of cross-entropy along ``direction``
    (Sao 2026, arXiv:2603.13552, Def. 4.7), and the normalised step r = ||direction|| / rho_a.

    One JVP with the unnormalised direction p gives a = J_z p; Delta_a for the unit
    direction is spread(a) / ||p||. Pass the optimiser's actual update as ``direction`` to
    get r for that step (r >= 1: outside the safe disk), or the gradient for the GD
    direction. See :func:`directional_logit_derivatives` for the isolation guarantees and
    :class:`TaylorRadiusResult` for the fields. A zero direction gives rho_a = +inf and r = 0.
    Non-finite logits or derivatives give NaN with reason ``"non_finite"``.
    """
    if any(_dist.is_sharded(p) for p in model.parameters()):
        raise NotImplementedError(
            "taylor_radius: the model's parameters are FSDP2 shards (DTensor), which "
            "forward-mode AD cannot go through; the monitor's TaylorRadius metric measures "
            "the radius on such a model (docs/distributed.md, 'Taylor radius'), or call "
            "this on the unsharded model")
    logits, a, norm = directional_logit_derivatives(
        model, inputs, direction, eval_mode=eval_mode, output_fn=output_fn
    )
    return taylor_radius_from_logits(
        logits, a, step_norm=norm, targets=targets, quantile=quantile, strict=strict
    )


def clip_step(
    step: Sequence[torch.Tensor], rho_a: float | torch.Tensor, *, target: float = 1.0
) -> tuple[tuple[torch.Tensor, ...], float]:
    """Rescale a proposed step p to normalised size r <= ``target`` (Sao 2026, Prop. 5.2).

    s = min(1, target * rho_a / ||p||) and p~ = s p (new tensors; ``step`` is untouched).
    ``rho_a`` must be the radius along p's own direction. Returns (p~, s). The paper's clip
    uses target 1; its FAQ recommends 0.5 as a safety margin.
    """
    if target <= 0:
        raise ValueError(f"target must be > 0, got {target}")
    rho = float(rho_a)
    if math.isnan(rho) or rho <= 0:
        raise ValueError(f"rho_a must be > 0 (or +inf), got {rho}")
    step = tuple(step)
    norm = math.sqrt(sum(float((t.detach().double() ** 2).sum()) for t in step))
    s = 1.0 if norm == 0 or math.isinf(rho) else min(1.0, target * rho / norm)
    return tuple(t.detach() * s for t in step), s


def taylor_step_controller(
    model: nn.Module,
    inputs: Any,
    step: Sequence[torch.Tensor],
    *,
    target: float = 1.0,
    eval_mode: bool = True,
    output_fn: OutputFn | None = None,
) -> tuple[tuple[torch.Tensor, ...], float, TaylorRadiusResult]:
    """Measure r for a proposed step (one JVP) and rescale the step so that r <= ``target``.

    ``step`` has one tensor per trainable parameter in registration order (the optimiser's
    update Delta theta). Returns (scaled step, scale factor, the :class:`TaylorRadiusResult` of the
    unscaled step). The model is not modified; applying the step is the caller's business.
    A non-finite measurement leaves the step unscaled (scale 1) with the reason recorded.
    """
    res = taylor_radius(model, inputs, list(step), eval_mode=eval_mode, output_fn=output_fn)
    if res.reason is not None:
        return tuple(t.detach() for t in step), 1.0, res
    scaled, s = clip_step(step, res.rho_a, target=target)
    return scaled, s, res


__all__ = [
    "TaylorRadiusResult",
    "binary_radius",
    "clip_step",
    "directional_logit_derivatives",
    "logit_spread",
    "logits_call",
    "radius_from_spread",
    "taylor_radius",
    "taylor_radius_from_logits",
    "taylor_step_controller",
]


# old result-class names, for one release (docs/vocabulary.md)
__getattr__ = module_getattr(__name__, {"TaylorRadius": "TaylorRadiusResult"}, globals())
