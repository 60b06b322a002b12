"""Cheap early-warning statistics of logits, attention and weights.

References:
* Wortsman et al., "Small-scale proxies for large-scale Transformer training
  instabilities", ICLR 2024 (arXiv:2309.14322): attention-logit growth, output-logit
  divergence, z-loss 1e-4 (log Z)^2.
* Prieto, Barsbey, Mediano & Birdal, "Grokking at the edge of numerical stability",
  ICLR 2025 (arXiv:2501.04697): softmax collapse (SC) and naive loss minimisation (NLM).
* Carbonnelle & De Vleeschouwer, "Layer rotation: a surprisingly simple indicator of
  generalization in deep networks?", arXiv:1806.01603 (2019).

Definitions follow docs/metrics.md, "Cheap early-warning signals". Every leading dimension
of a logits tensor of shape (..., C) is a sample (token).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch

from landscape._deprecation import module_getattr
from landscape.functional._common import (
    NAN,
    MetricResult,
    Scalar,
    all_finite,
    as_float_tensor,
    check_targets,
    f64,
    fail,
    nan_scalar,
    scalar,
    scale_rows,
)


def _flat_logits(logits: torch.Tensor, name: str = "logits") -> torch.Tensor:
    z = as_float_tensor(logits, name, min_ndim=1)
    if z.shape[-1] == 0 or z.numel() == 0:
        raise ValueError(
            f"{name} must have at least one sample and one class, got shape {tuple(z.shape)}"
        )
    return z.detach().reshape(-1, z.shape[-1])


@dataclasses.dataclass(frozen=True)
class SoftmaxCollapseResult(MetricResult):
    """The result of :func:`softmax_collapse`.

    ``fraction``: samples whose shifted partition sum equals 1 exactly (SC);
    ``zero_terms``: samples whose cross-entropy is exactly 0 (None without targets).
    """

    fraction: torch.Tensor
    zero_terms: torch.Tensor | None = None
    reason: str | None = None


def softmax_collapse(
    logits: torch.Tensor, targets: torch.Tensor | None = None, *, dtype: torch.dtype | None = None
) -> SoftmaxCollapseResult:
    """Softmax-collapse fraction (Prieto et al., ICLR 2025, arXiv:2501.04697).

    Per sample, in ``dtype`` (default: the logits' own dtype, i.e. the dtype the
    cross-entropy would run in): z' = z - max_k z, s = sum_k exp(z'_k) (``torch.sum``), and SC
    is the fraction of samples with s == 1 exactly: every non-maximal probability underflowed,
    so those samples have an exactly zero gradient. With ``targets`` also ``zero_terms``, the
    fraction with per-sample cross-entropy exactly 0 in that dtype, over the samples whose
    target is not negative (an ``ignore_index`` such as -100 leaves a position out). Exact
    float equality is the definition, so it depends on the dtype and the reduction order.
    Logits with a NaN or infinite entry give NaN fields with reason ``"non_finite"``
    (docs/metrics.md, "Conventions"): such a row is neither collapsed nor healthy. Every
    target ignored leaves ``zero_terms`` NaN and ``reason`` None (``fraction`` is defined).
    """
    z = _flat_logits(logits)
    if dtype is not None:
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating dtype, got {dtype!r}")
        z = z.to(dtype)
    y = None if targets is None else check_targets(targets, z.shape[0], z.shape[1])
    if not all_finite(z):
        nan = torch.tensor(NAN, dtype=torch.float64, device=z.device)
        return SoftmaxCollapseResult(nan, None if y is None else nan, "non_finite")
    zs = z - z.max(dim=1, keepdim=True).values
    s = torch.exp(zs).sum(dim=1)
    frac = (s == 1).to(torch.float64).mean()
    zero = None
    if y is not None:
        y = y.to(z.device)
        kept = y >= 0  # a negative target is an ignore_index (-100)
        ce = torch.nn.functional.cross_entropy(z[kept], y[kept], reduction="none")
        zero = (ce == 0).to(torch.float64).mean()  # NaN when every target is ignored
    return SoftmaxCollapseResult(frac, zero)


def softmax_collapse_fraction(logits: torch.Tensor, *, dtype: torch.dtype | None = None) -> Scalar:
    """The SC fraction of :func:`softmax_collapse` as a :class:`Scalar` (with its reason)."""
    res = softmax_collapse(logits, dtype=dtype)
    return Scalar(res.fraction, res.reason)


@dataclasses.dataclass(frozen=True)
class LogitStatsResult(MetricResult):
    """The result of :func:`logit_stats`.

    Output-logit statistics: log-partition log Z = logsumexp(z) per sample (mean, min,
    max), the z-loss coef * mean (log Z)^2, and the max logit and max |logit|.
    """

    log_z_mean: torch.Tensor
    log_z_min: torch.Tensor
    log_z_max: torch.Tensor
    z_loss: torch.Tensor
    max_logit: torch.Tensor
    max_abs_logit: torch.Tensor
    reason: str | None = None


def logit_stats(logits: torch.Tensor, *, z_loss_coef: float = 1e-4) -> LogitStatsResult:
    """Log-partition (z) and logit-size statistics (Wortsman et al., ICLR 2024).

    Computed in float32 or float64 whatever the logits' dtype. All-zero logits over V classes
    give log Z = log V; logits equal to log-probabilities give log Z = 0 and z-loss 0.
    Non-finite logits set the reason ``"non_finite"``; the fields are still computed from
    them (an infinite logit gives infinite fields, a NaN NaN ones, and logits masked with
    ``-inf`` keep a finite log Z but an infinite ``max_abs_logit``).
    """
    z = _flat_logits(logits)
    z = z.to(torch.float64 if z.dtype == torch.float64 else torch.float32)
    reason = None if bool(torch.isfinite(z).all()) else "non_finite"
    lz = f64(torch.logsumexp(z, dim=1))
    za = f64(z)
    return LogitStatsResult(
        lz.mean(),
        lz.min(),
        lz.max(),
        z_loss_coef * (lz * lz).mean(),
        za.max(),
        za.abs().max(),
        reason,
    )


@dataclasses.dataclass(frozen=True)
class AttentionStatsResult(MetricResult):
    """The result of :func:`attention_logit_stats`.

    Attention-logit statistics: ``max_abs_logit`` = max |q.k|/sqrt(d); ``bound`` =
    max|q| max|k|/sqrt(d) (what a fused kernel allows without the logits); attention entropy
    over keys per query, ``entropy_min`` and ``entropy_mean``; ``max_abs_logit_per_head``
    when the inputs are 4-D (batch, heads, T, d).
    """

    max_abs_logit: torch.Tensor
    bound: torch.Tensor
    entropy_min: torch.Tensor
    entropy_mean: torch.Tensor
    max_abs_logit_per_head: torch.Tensor | None = None
    reason: str | None = None


def attention_logit_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
) -> AttentionStatsResult:
    """Attention-logit growth statistics (Wortsman et al., ICLR 2024; Dehghani et al. 2023).

    ``q``: (..., T_q, d) and ``k``: (..., T_k, d) with equal leading dims; logits
    z_ij = scale * <q_i, k_j> with scale = 1/sqrt(d) by default; ``causal`` masks j > i
    (top-left aligned, as ``scaled_dot_product_attention`` with ``is_causal``). Returns
    max |z|, the cheap bound max|q| max|k| scale, and the entropy -sum_j a_ij log a_ij of
    each query's attention distribution (min and mean). Uniform attention over T keys has
    entropy log T; q = k = (a, 0, 0, 0) with d = 4 has z = a^2 / 2. A NaN or infinite
    entry in ``q`` or ``k``, or logits that overflow, give NaN fields with reason
    ``"non_finite"`` (docs/metrics.md, "Conventions").
    """
    q = as_float_tensor(q, "q", min_ndim=2, non_empty=True)
    k = as_float_tensor(k, "k", min_ndim=2, non_empty=True)
    if q.shape[-1] != k.shape[-1] or q.shape[:-2] != k.shape[:-2]:
        raise ValueError(
            f"q and k must agree in leading dims and head size, got "
            f"{tuple(q.shape)} and {tuple(k.shape)}"
        )
    d = q.shape[-1]
    sc = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dt = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
    qd, kd = q.to(dt), k.to(dt)
    z = (qd @ kd.transpose(-2, -1)) * sc
    if not all_finite(z):  # a NaN/inf in q or k reaches every logit of its row or column
        return _nan_attention_stats(z)
    tq, tk = z.shape[-2], z.shape[-1]
    if causal:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=z.device).tril()
        z_for_max = torch.where(mask, z.abs(), torch.zeros((), dtype=dt, device=z.device))
        z = z.masked_fill(~mask, -math.inf)
    else:
        z_for_max = z.abs()
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    ent = -(torch.where(p > 0, p * logp, torch.zeros((), dtype=dt, device=z.device))).sum(-1)
    bound = f64(qd.norm(dim=-1).max() * kd.norm(dim=-1).max() * abs(sc))
    per_head = None
    if z.dim() == 4:
        per_head = f64(z_for_max.amax(dim=(0, 2, 3)))
    return AttentionStatsResult(
        f64(z_for_max.max()), bound, f64(ent.min()), f64(ent.mean()), per_head
    )


def _nan_attention_stats(z: torch.Tensor) -> AttentionStatsResult:
    """The ``"non_finite"`` result of :func:`attention_logit_stats` for logits ``z``."""
    nan = torch.tensor(NAN, dtype=torch.float64, device=z.device)
    per_head = torch.full((z.shape[1],), NAN, dtype=torch.float64, device=z.device)
    return AttentionStatsResult(nan, nan, nan, nan, per_head if z.dim() == 4 else None,
                                "non_finite")


def layer_rotation(weight: torch.Tensor, initial: torch.Tensor, *, strict: bool = False) -> Scalar:
    """Layer rotation 1 - cos(w, w0) of one flattened kernel.

    Layer rotation 1 - cos(w, w0) of one flattened kernel (Carbonnelle & De Vleeschouwer
    2019). Range [0, 2]: 0 = same direction (any positive rescaling), 1 = orthogonal,
    2 = opposite. A zero vector gives NaN with reason ``"zero_norm"``, a NaN or infinite
    entry NaN with reason ``"non_finite"``. Passing the previous step's weight instead of
    the initial one gives the per-step rotation (a spike means an abnormally large update).
    """
    w = as_float_tensor(weight, "weight")
    w0 = as_float_tensor(initial, "initial")
    if w.shape != w0.shape:
        raise ValueError(
            f"weight and initial must have the same shape, got {tuple(w.shape)} "
            f"and {tuple(w0.shape)}"
        )
    a = f64(w.detach().reshape(-1))
    b = f64(w0.detach().reshape(-1)).to(a.device)
    if not (all_finite(a) and all_finite(b)):
        return nan_scalar(a.device, fail("non_finite", "a weight is not finite", strict))
    # each scaled by a power of two (exact; the cosine is scale-invariant): float64 entries
    # beyond ~1e154 overflowed the squared norm, parallel vectors gave NaN
    a, b = scale_rows(a[None])[0], scale_rows(b[None])[0]
    na, nb = a.norm(), b.norm()
    if not (na > 0 and nb > 0):
        return nan_scalar(a.device, fail("zero_norm", "a weight vector is zero", strict))
    cos = ((a @ b) / (na * nb)).clamp(-1.0, 1.0)
    return scalar(1.0 - cos, a.device)


def layer_rotations(
    weights: Mapping[str, torch.Tensor],
    initial: Mapping[str, torch.Tensor],
    *,
    min_dim: int = 2,
) -> dict[str, Scalar]:
    """:func:`layer_rotation` for every kernel of a model.

    :func:`layer_rotation` for every tensor of ``weights`` with at least ``min_dim``
    dimensions (kernels; biases and norm parameters are excluded, as in the reference code).
    ``initial`` must hold the same names.
    """
    missing = [n for n, w in weights.items() if w.dim() >= min_dim and n not in initial]
    if missing:
        raise ValueError(f"initial lacks tensors: {', '.join(missing)}")
    return {n: layer_rotation(w, initial[n]) for n, w in weights.items() if w.dim() >= min_dim}


@dataclasses.dataclass(frozen=True)
class NlmCosineResult(MetricResult):
    """The result of :func:`nlm_cosine`.

    ``cosine`` = cos(-grad, theta) over all tensors; ``per_tensor`` one cosine each (NaN
    for zero tensors).
    """

    cosine: torch.Tensor
    per_tensor: tuple[torch.Tensor, ...]
    reason: str | None = None


def _scaled_together(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors times one power of two that brings their largest |entry| into [0.5, 1).

    Exact, and every cosine among them is unchanged: only their sums of squares no longer
    overflow (float64 entries beyond ~1e154) or underflow (:func:`scale_rows` per vector).
    """
    largest = torch.stack([t.abs().amax() if t.numel() else t.new_zeros(()) for t in tensors])
    _, exponent = torch.frexp(largest.amax())
    k = (-exponent).clamp(max=math.frexp(torch.finfo(largest.dtype).max)[1] - 1)  # finite 2^k
    return [torch.ldexp(t, k) for t in tensors]


def nlm_cosine(
    grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *, strict: bool = False
) -> NlmCosineResult:
    """Naive-loss-minimisation alignment cos(-grad L, theta).

    Naive-loss-minimisation alignment cos(-grad L, theta) (our operationalisation of
    Prieto et al., ICLR 2025; docs/metrics.md).

    For positively homogeneous networks theta is the direction that only scales the logits;
    values near 1 mean the update mostly grows the logits (NLM). ``grads`` and ``params``
    are parameter-space vectors (matching tensors). Zero vectors give NaN with reason
    ``"zero_norm"``; a NaN or infinite entry anywhere gives NaN everywhere (``cosine`` and
    every ``per_tensor``) with reason ``"non_finite"``.
    """
    g = [f64(as_float_tensor(t, "grads").detach()) for t in grads]
    w = [f64(as_float_tensor(t, "params").detach()) for t in params]
    if len(g) != len(w) or not g:
        raise ValueError(
            f"grads and params must be non-empty and of equal length, got {len(g)} and {len(w)}"
        )
    for i, (a, b) in enumerate(zip(g, w)):
        if a.shape != b.shape:
            raise ValueError(
                f"grads[{i}] has shape {tuple(a.shape)}, params[{i}] has {tuple(b.shape)}"
            )
    if not all(all_finite(t) for t in (*g, *w)):
        reason = fail("non_finite", "the gradient or the parameters are not finite", strict)
        nan = torch.tensor(NAN, dtype=torch.float64, device=g[0].device)
        return NlmCosineResult(nan, tuple(torch.full_like(nan, NAN) for _ in g), reason)
    per = []
    num = torch.zeros((), dtype=torch.float64, device=g[0].device)
    ng = torch.zeros_like(num)
    nw = torch.zeros_like(num)
    # the sums on one scale for all tensors, each tensor's cosine on its own (exact powers
    # of two: float64 entries beyond ~1e154 overflowed the squares, parallel vectors gave NaN)
    for a, b, a_all, b_all in zip(g, w, _scaled_together(g), _scaled_together(w)):
        b, b_all = b.to(a.device), b_all.to(a.device)
        num = num - (a_all * b_all).sum()
        ng, nw = ng + (a_all * a_all).sum(), nw + (b_all * b_all).sum()
        (a,), (b,) = _scaled_together([a]), _scaled_together([b])
        sa, sb = (a * a).sum(), (b * b).sum()
        per.append(
            -(a * b).sum() / (sa.sqrt() * sb.sqrt())
            if sa > 0 and sb > 0
            else torch.tensor(math.nan, dtype=torch.float64, device=a.device)
        )
    if not (ng > 0 and nw > 0):
        reason = fail("zero_norm", "the gradient or the parameters are zero", strict)
        return NlmCosineResult(
            torch.tensor(math.nan, dtype=torch.float64, device=num.device), tuple(per), reason
        )
    return NlmCosineResult(num / (ng.sqrt() * nw.sqrt()), tuple(per))


__all__ = [
    "AttentionStatsResult",
    "LogitStatsResult",
    "NlmCosineResult",
    "SoftmaxCollapseResult",
    "attention_logit_stats",
    "layer_rotation",
    "layer_rotations",
    "logit_stats",
    "nlm_cosine",
    "softmax_collapse",
    "softmax_collapse_fraction",
]


# old result-class names, for one release (docs/vocabulary.md)
__getattr__ = module_getattr(
    __name__,
    {
        "SoftmaxCollapse": "SoftmaxCollapseResult",
        "LogitStats": "LogitStatsResult",
        "AttentionStats": "AttentionStatsResult",
        "NlmCosine": "NlmCosineResult",
    },
    globals(),
)
