"""Spectral alignment of a linear layer's inputs with its top singular direction.

Reference: Qiu, Wu, Tan, Wang & Yao, "Spectral alignment as predictor of loss explosion in
neural network training", arXiv:2510.04202 (2025). Only the abstract was available when this
was written (docs/metrics.md, "Spectral alignment"), so the statistic below is *our* documented
definition, chosen to match the abstract ("distributional alignment between layer inputs and
the principal singular vectors of weight matrices"; "a collapse in the sign diversity of this
alignment" predicts divergence):

* For y = W x + b with W of shape (d_out, d_in) (PyTorch storage), W = sum_k s_k u_k v_k^T.
  The per-token alignment is the cosine SA(x) = <x, v_1> / ||x|| with v_1 the top *right*
  singular vector (it lives in input space). In the row-vector convention y = x W this is
  the "left" singular vector. sign(SA) equals sign(cos(W x, u_1)) when b = 0, so sign
  statistics agree across conventions; we use the input-side cosine because it needs no
  second matmul and is bounded in [-1, 1] independently of the bias.
* Sign diversity over all tokens (every leading dimension is a token): p+ and p- are the
  fractions of strictly positive and negative cosines (exact zeros, and zero inputs, are left
  out); the minority fraction m = min(p+, p-) in [0, 1/2] (0 = collapsed to one sign); the
  sign entropy H = -p+ log p+ - p- log p- in [0, log 2]; and the mean |cos|. All three are
  invariant to the sign ambiguity (u_1, v_1) -> (-u_1, -v_1) of the SVD.
* v_1 by Lanczos on W^T W, warm-started from the previous step's vector; its sign is
  fixed to agree with the warm start (continuous time series) or, cold, to make the
  largest-magnitude entry positive.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from landscape import distributed as _dist
from landscape._deprecation import module_getattr
from landscape._sums import work_dtype
from landscape.functional._common import (
    MetricResult,
    all_finite,
    as_float_tensor,
    fail,
    scale_rows,
)


@dataclasses.dataclass(frozen=True)
class TopSingularResult(MetricResult):
    """Top singular triple of W: ``sigma``, ``u`` (output space), ``v`` (input space).

    ``n_iter`` products with W^T W were used; ``converged`` says whether the residual
    fell below ``tol`` (:func:`top_singular_vector`).
    """

    sigma: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    n_iter: int
    converged: bool
    reason: str | None = None


def _fix_sign(v: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    if ref is not None:
        return -v if float(v @ ref) < 0 else v
    k = int(v.abs().argmax())
    return -v if float(v[k]) < 0 else v


EXACT_SIDE = 256
"""Weights with a side of at most this many get v_1 exactly (:func:`top_singular_vector`)."""


def _exact_top_right(w: torch.Tensor) -> torch.Tensor:
    """The top right singular vector of ``w``, normalised.

    From the float64 eigendecomposition of its smaller Gram matrix (W^T W, or W W^T mapped
    back through W^T).
    """
    g = w.to(torch.float64)
    if g.shape[1] <= g.shape[0]:
        return torch.linalg.eigh(g.T @ g).eigenvectors[:, -1]
    v = g.T @ torch.linalg.eigh(g @ g.T).eigenvectors[:, -1]
    n = v.norm()
    return v / n if n > 0 else v


def top_singular_vector(
    weight: torch.Tensor,
    init: torch.Tensor | None = None,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
    strict: bool = False,
) -> TopSingularResult:
    """Top singular value and vectors of a 2-D ``weight``.

    A weight with a side of at most :data:`EXACT_SIDE` (256) gets v_1 exactly, from the
    float64 eigendecomposition of its smaller Gram matrix (``n_iter`` 0; ``init``,
    ``max_iter`` and ``tol`` then only fix the sign); a few hundred microseconds, where the
    Lanczos solver below spends about a millisecond of Python per product. A larger one:
    the top eigenvector of W^T W by Lanczos with full reorthogonalisation
    (:func:`landscape.curvature.lanczos.krylov_eigsh`), which needs about the square root
    of the products power iteration needs when the top singular values are close (a freshly
    initialised wide layer: s_1/s_2 ~ 1.007 on a 512 x 512 layer, where 100 power
    iterations ended at |<v, v_1>| = 0.56 and Lanczos converges in 43 products). ``init``
    (shape (d_in,)) warm-starts it, typically with the previous step's ``v``; a cold start
    draws a Gaussian vector from ``generator`` (default seed 0, drawn on the CPU so results
    do not depend on the device). Each product with W^T W costs two mat-vecs. Stops when
    the residual ||W^T W v - s^2 v|| <= ``tol`` s^2 (at least the rounding floor of the
    dtype, 100 eps) or after ``max_iter`` products (``n_iter``; ``converged`` says which).

    The sign of v is fixed to agree with ``init`` when given, else to make its largest
    entry positive; u = W v / sigma. Computed in float32 (float64 for float64 weights).
    W = 0 gives sigma = 0, NaN vectors and reason ``"zero_matrix"``.
    """
    w = as_float_tensor(_dist.full_tensor(weight), "weight", ndim=2, non_empty=True)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    w = w.to(work_dtype(w.dtype))
    d_in = w.shape[1]
    if init is not None:
        init = as_float_tensor(init, "init", ndim=1).detach()
        if init.shape[0] != d_in:
            raise ValueError(
                f"init must have shape ({d_in},) to match weight, got {tuple(init.shape)}"
            )
        v = init.to(device=w.device, dtype=w.dtype)
    else:
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        v = torch.randn(d_in, generator=generator, dtype=torch.float64).to(w.device, w.dtype)
    ref = v.clone() if init is not None else None
    nv = v.norm()
    if not (all_finite(v) and nv > 0):
        raise ValueError("init must be a finite non-zero vector")
    if not all_finite(w):  # a diverged layer: no v_1 (Lanczos would return one)
        reason = fail("non_finite", "weight is not finite", strict)
        nan_v = torch.full_like(v, math.nan)
        nan_u = torch.full((w.shape[0],), math.nan, dtype=w.dtype, device=w.device)
        return TopSingularResult(torch.tensor(math.nan, dtype=w.dtype, device=w.device),
                                 nan_u, nan_v, 0, False, reason)
    # W^T W squares the entries: scaled to max |w| = 1 it neither overflows nor underflows
    # (weights outside ~[1e-11, 1e8] stopped after one product at a wrong v_1, "converged")
    scale = w.abs().max()
    ws = w / scale if scale > 0 else w
    if min(w.shape) <= EXACT_SIDE:
        v, it, converged = _exact_top_right(ws).to(w.dtype), 0, True
    else:
        from landscape.curvature.lanczos import krylov_eigsh

        found = krylov_eigsh(lambda x: ws.T @ (ws @ x), v / nv, k=1, tol=tol,
                             max_matvec=max_iter, generator=generator)
        assert found.largest is not None
        v = found.largest[1][0].to(w.dtype)
        it, converged = found.n_matvec, found.converged
    v = _fix_sign(v, ref)
    wv = ws @ v  # scaled, so a tiny weight's sigma does not underflow to 0 in its dtype
    sigma = wv.norm() * scale if scale > 0 else wv.norm()
    if not sigma > 0:
        reason = fail("zero_matrix", "weight maps the iterate to zero (W = 0?)", strict)
        nan_v = torch.full_like(v, math.nan)
        return TopSingularResult(
            sigma,
            torch.full((w.shape[0],), math.nan, dtype=w.dtype, device=w.device),
            nan_v,
            it,
            False,
            reason,
        )
    u = wv / wv.norm()
    return TopSingularResult(sigma, u, v, it, converged)


@dataclasses.dataclass(frozen=True)
class SpectralAlignmentResult(MetricResult):
    """Per-token cosines with the top right singular vector and their sign-diversity summary.

    * ``cosines``: (T,) cosines <x_t, v_1>/||x_t|| over all tokens (0 for zero inputs).
    * ``frac_positive`` / ``frac_negative``: fractions over non-zero cosines.
    * ``minority_fraction``: min(p+, p-) in [0, 0.5]; 0 = sign collapse.
    * ``sign_entropy``: -p+ log p+ - p- log p- in [0, log 2].
    * ``mean_abs_cos``: mean |cos| over non-zero inputs.
    * ``sigma``, ``v`` (keep ``v`` to warm-start the next call), ``n_iter``; these two in
      the solver's dtype (float32, float64 for float64 weights or inputs).
    * ``converged``: whether the solver met its tolerance (True for an exact or given
      v_1). An unconverged v_1 gives cosines with an approximate direction: warm-start
      the next call from its ``v`` or raise ``max_iter``.
    """

    cosines: torch.Tensor
    frac_positive: torch.Tensor
    frac_negative: torch.Tensor
    minority_fraction: torch.Tensor
    sign_entropy: torch.Tensor
    mean_abs_cos: torch.Tensor
    sigma: torch.Tensor
    v: torch.Tensor
    n_iter: int
    n_tokens: int
    reason: str | None = None
    converged: bool = True

    def summary(self) -> dict[str, float]:
        """The scalar fields only, as Python floats (for logging)."""
        keys = (
            "frac_positive",
            "frac_negative",
            "minority_fraction",
            "sign_entropy",
            "mean_abs_cos",
            "sigma",
        )
        return {k: float(getattr(self, k)) for k in keys}


def sign_diversity(cosines: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sign-diversity summary of a set of alignment values (see module docstring).

    Returns ``frac_positive``, ``frac_negative``, ``minority_fraction``, ``sign_entropy``
    and ``mean_abs_cos`` as 0-d float64 tensors; exact zeros are left out of the fractions.
    With no non-zero value, or a NaN among the values (whose sign is unknown), all are NaN.
    """
    c = as_float_tensor(cosines, "cosines").reshape(-1).to(torch.float64)
    pos = (c > 0).sum()
    neg = (c < 0).sum()
    nz = pos + neg
    if int(nz) == 0 or bool(torch.isnan(c).any()):
        nan = torch.tensor(math.nan, dtype=torch.float64, device=c.device)
        return dict(
            frac_positive=nan,
            frac_negative=nan,
            minority_fraction=nan,
            sign_entropy=nan,
            mean_abs_cos=nan,
        )
    p_pos = pos.to(torch.float64) / nz
    p_neg = neg.to(torch.float64) / nz
    ent = torch.zeros((), dtype=torch.float64, device=c.device)
    for q in (p_pos, p_neg):
        if q > 0:
            ent = ent - q * torch.log(q)
    return dict(
        frac_positive=p_pos,
        frac_negative=p_neg,
        minority_fraction=torch.minimum(p_pos, p_neg),
        sign_entropy=ent,
        mean_abs_cos=c.abs().sum() / nz,
    )


def _given_top_vector(
    w: torch.Tensor, v: torch.Tensor, dt: torch.dtype, strict: bool
) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """(unit v, sigma = ||W v||, reason) for a top right singular vector passed as ``v=``.

    The weight is still checked: a NaN/inf entry gives ``"non_finite"`` and W = 0
    ``"zero_matrix"``, as from :func:`top_singular_vector`.
    """
    vec = as_float_tensor(v, "v", ndim=1)
    if vec.shape[0] != w.shape[1]:
        raise ValueError(f"v must have shape ({w.shape[1]},), got {tuple(vec.shape)}")
    if not (all_finite(vec) and vec.norm() > 0):
        raise ValueError("v must be a finite non-zero vector")
    vec = vec / vec.norm()
    wd = w.to(dt)
    sigma = (wd @ vec.to(w.device, dt)).norm()
    reason = None
    if not all_finite(wd):
        reason = fail("non_finite", "weight is not finite", strict)
        sigma = torch.full_like(sigma, math.nan)
    elif not bool(wd.any()):
        reason = fail("zero_matrix", "weight is zero", strict)
    return vec, sigma, reason


def spectral_alignment(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    *,
    init: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-6,
    strict: bool = False,
) -> SpectralAlignmentResult:
    """Spectral alignment of a linear layer (Qiu et al. 2025, arXiv:2510.04202; our definition).

    Args:
        weight: (d_out, d_in) weight of y = W x + b (PyTorch storage). For attention, pass
            one projection (see :func:`attention_projections`). An FSDP2 shard (DTensor)
            is gathered, this one weight only (:func:`landscape.distributed.full_tensor`;
            every rank of its mesh must call).
        inputs: (..., d_in) layer inputs; every leading index is a token.
        init: warm start for the Lanczos solver (the previous call's ``v``).
        v: use this top right singular vector as is (skips the solver; the weight is
            still checked: NaN/inf gives ``"non_finite"``, W = 0 ``"zero_matrix"``).
        max_iter: products with W^T W at most (:func:`top_singular_vector`; products with
            the weight matrix, not curvature products, hence not ``max_matvec``).
        tol: the solver's relative residual tolerance (:func:`top_singular_vector`).
        strict: raise instead of returning NaN with a ``reason``.

    Returns:
        :class:`SpectralAlignmentResult`. The statistic's definition and why it was chosen
        are in the module docstring and docs/metrics.md. W = 0 gives NaN (``"zero_matrix"``);
        all-zero inputs give NaN summaries (``"zero_inputs"``).
    """
    w = as_float_tensor(_dist.full_tensor(weight), "weight", ndim=2, non_empty=True)
    x = as_float_tensor(inputs, "inputs", min_ndim=1)
    if x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"inputs must have last dimension {w.shape[1]} (weight's d_in), got "
            f"shape {tuple(x.shape)}"
        )
    x = x.detach().reshape(-1, w.shape[1])
    dt = torch.float64 if torch.float64 in (w.dtype, x.dtype) else torch.float32
    if v is None:
        top = top_singular_vector(w, init, max_iter=max_iter, tol=tol, strict=strict)
        sigma, vec, n_iter, reason = top.sigma, top.v, top.n_iter, top.reason
        converged = top.converged
    else:
        vec, sigma, reason = _given_top_vector(w, v, dt, strict)
        n_iter, converged = 0, True
    vec = vec.to(device=x.device, dtype=dt)
    # each token scaled by a power of two first (exact; the cosine is scale-invariant), so
    # that its squared norm neither over- nor underflows (float32 tokens beyond ~1e19)
    xd = scale_rows(x.to(dt))
    nrm = xd.norm(dim=1)
    cos = torch.where(nrm > 0, (xd @ vec) / torch.where(nrm > 0, nrm, 1.0), 0.0)
    summary = sign_diversity(cos)
    if reason is None and not all_finite(xd):
        # a NaN/inf token has no cosine: do not count it as a zero input (nrm > 0 is False)
        reason = fail("non_finite", "inputs are not finite", strict)
        nan = torch.tensor(math.nan, dtype=torch.float64, device=x.device)
        summary = {k: nan for k in summary}
    if reason is None and bool(torch.isnan(summary["minority_fraction"])):
        reason = fail("zero_inputs", "no input has a non-zero cosine", strict)
    if reason in ("zero_matrix", "non_finite"):
        cos = torch.full_like(cos, math.nan)
        nan = torch.tensor(math.nan, dtype=torch.float64, device=x.device)
        summary = {k: nan for k in summary}
    return SpectralAlignmentResult(
        cosines=cos,
        sigma=sigma,
        v=vec,
        n_iter=n_iter,
        n_tokens=x.shape[0],
        reason=reason,
        converged=converged,
        **summary,
    )


def attention_projections(module: nn.Module) -> dict[str, torch.Tensor]:
    """The (d_out, d_in) projection weights of an attention module, by name.

    ``nn.MultiheadAttention`` with a packed ``in_proj_weight`` gives ``q``, ``k``, ``v`` (the
    three row blocks) and ``out``; separate ``q_proj_weight``/``k_proj_weight``/
    ``v_proj_weight`` are used when present. Any other module: every 2-D parameter whose name
    ends in ``weight``. Tensors are views of the parameters (detached), never copies.
    """
    out: dict[str, torch.Tensor] = {}
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            q, k, v = module.in_proj_weight.detach().chunk(3, dim=0)
            out.update(q=q, k=k, v=v)
        else:
            out.update(
                q=module.q_proj_weight.detach(),
                k=module.k_proj_weight.detach(),
                v=module.v_proj_weight.detach(),
            )
        out["out"] = module.out_proj.weight.detach()
        return out
    for name, p in module.named_parameters():
        if p.dim() == 2 and name.endswith("weight"):
            out[name] = p.detach()
    return out


__all__ = [
    "SpectralAlignmentResult",
    "TopSingularResult",
    "attention_projections",
    "sign_diversity",
    "spectral_alignment",
    "top_singular_vector",
]


# old result-class names, for one release (docs/vocabulary.md)
__getattr__ = module_getattr(
    __name__,
    {
        "SpectralAlignment": "SpectralAlignmentResult",
        "TopSingular": "TopSingularResult",
    },
    globals(),
)
