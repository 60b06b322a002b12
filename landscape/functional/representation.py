"""Spectral and geometric summaries of a representation matrix Z (N samples x K features).

References:
* Garrido, Balestriero, Najman & LeCun, "RankMe", ICML 2023 (arXiv:2210.02885).
* Roy & Vetterli, "The effective rank", EUSIPCO 2007 (RankMe with eps = 0).
* Agrawal, Mondal, Ghosh & Richards, "alpha-ReQ", NeurIPS 2022.
* Kim, Kang, Hwang, Shin & Rhee, "VNE", CVPR 2023 (arXiv:2304.01434).
* Wang & Isola, "Understanding contrastive representation learning through alignment and
  uniformity on the hypersphere", ICML 2020 (arXiv:2005.10242).
* Fang, Li, Sun & Wang, "Rethinking the uniformity metric in self-supervised learning",
  ICLR 2024 (arXiv:2403.00642).

Definitions follow docs/metrics.md (effective rank to uniformity). Everything spectral runs
in float64: the eigenvalues lambda_k of Z^T Z come from ``eigvalsh`` of the Gram matrix of
the smaller side (K x K when N >= K; cost O(N K min(N, K)), about twice as fast as an SVD),
clamped at 0, and eigenvalues below the Gram route's rounding level max(N, K) * eps_64 *
lambda_1 are set to exactly 0 (so rank-deficient inputs have exact zeros; singular values
below about 1.5e-6 * s_1 at N = 10^4 are treated as 0). Singular values are sqrt(lambda_k).
Metrics on the hypersphere L2-normalise the rows first; rows that are exactly zero have no
direction and are left out (documented per function).
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch

from landscape._checks import positive_int
from landscape._deprecation import module_getattr
from landscape._sums import work_dtype
from landscape.functional._common import (
    MetricResult,
    Scalar,
    all_finite,
    as_float_tensor,
    f64,
    fail,
    nan_scalar,
    safe_log_term,
    scalar,
    scale_rows,
)


def _gram_eigvals(z: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of Z^T Z by the smaller Gram matrix.

    Eigenvalues (descending, float64) of Z^T Z via the smaller Gram matrix, clamped at 0,
    with those below the rounding level max(N, K) * eps * lambda_1 set to 0.
    """
    z = f64(z)
    g = z.T @ z if z.shape[0] >= z.shape[1] else z @ z.T
    lam = torch.linalg.eigvalsh(g).flip(0).clamp_min(0.0)
    if lam.numel():
        floor = max(z.shape) * torch.finfo(torch.float64).eps * lam[0]
        lam = torch.where(lam > floor, lam, torch.zeros_like(lam))
    return lam


def singular_values(z: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D tensor by the Gram route.

    Singular values of a 2-D tensor, descending, float64, by the Gram route of this module
    (values below about sqrt(max(N, K) eps) * s_1 are 0); ``torch.linalg.svdvals`` is the
    accurate but slower alternative.
    """
    z = as_float_tensor(z, "z", ndim=2, non_empty=True)
    if not all_finite(z):  # eigh fails to converge on NaN (torch's _LinAlgError)
        raise ValueError("z must be finite, got a NaN or infinite entry")
    return _gram_eigvals(z).sqrt()


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm; exactly-zero rows are dropped.

    Each row is first scaled by a power of two (:func:`scale_rows`), so rows whose squared
    entries would over- or underflow in their dtype normalise too.
    """
    x = scale_rows(x)
    nrm = x.norm(dim=1)
    nonzero = nrm > 0
    if bool(nonzero.all()):
        return x.div_(nrm[:, None])
    return x[nonzero] / nrm[nonzero, None]


def _is_int(x: object) -> bool:
    """An integer, numpy's included (``operator.index`` takes it), not a bool."""
    if isinstance(x, bool):
        return False
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def effective_rank(
    features: torch.Tensor, *, eps: float = 1e-7, center: bool = False, strict: bool = False
) -> Scalar:
    """RankMe (Garrido et al., ICML 2023, arXiv:2210.02885).

    p_k = sigma_k / ||sigma||_1 + eps and RankMe = exp(-sum_k p_k log p_k) over the
    min(N, K) singular values of the (N, K) embedding matrix. ``eps = 1e-7`` follows the
    reproduction code (it adds about (K - rank) * eps * |log eps| to the value); ``eps = 0``
    gives the Roy–Vetterli effective rank exactly. The original definition does not centre
    Z (``center=False``). Range about [1, min(N, K)]; a drop signals dimensional collapse.

    Invariant to orthogonal maps on either side and to scaling. Z = 0 gives NaN with reason
    ``"zero_matrix"``.
    """
    z = as_float_tensor(features, "features", ndim=2, non_empty=True)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if not all_finite(z):
        return nan_scalar(z.device, fail("non_finite", "features are not finite", strict))
    z = f64(z)
    if center:
        z = z - z.mean(0)
    s = _gram_eigvals(z).sqrt()
    total = s.sum()
    if not total > 0:
        said = "features are constant (all zero once centred)" if center else \
            "features are all zero"
        return nan_scalar(z.device, fail("zero_matrix", said, strict))
    p = s / total + eps
    return scalar(torch.exp(-safe_log_term(p).sum()), z.device)


def von_neumann_entropy(features: torch.Tensor, *, strict: bool = False) -> Scalar:
    """Von Neumann entropy of the representation (VNE; Kim et al., CVPR 2023, arXiv:2304.01434).

    Rows are L2-normalised, C = H^T H / N (uncentred autocorrelation, trace 1) and
    VNE = -sum_j lambda_j log lambda_j with 0 log 0 = 0. Range [0, log min(N, d)]; higher
    means a more uniform spectrum. Zero rows are left out (they have no direction); all
    rows zero gives NaN with reason ``"zero_matrix"``. Invariant to orthogonal maps, to
    per-row positive scaling and to row permutation.
    """
    h = as_float_tensor(features, "features", ndim=2, non_empty=True)
    if not all_finite(h):
        return nan_scalar(h.device, fail("non_finite", "features are not finite", strict))
    h = _unit_rows(f64(h))
    if h.shape[0] == 0:
        return nan_scalar(features.device, fail("zero_matrix", "all feature rows are zero", strict))
    lam = _gram_eigvals(h) / h.shape[0]
    lam = lam / lam.sum()  # exact trace 1 against rounding
    return scalar(-safe_log_term(lam).sum(), h.device)


@dataclasses.dataclass(frozen=True)
class PowerLawFitResult(MetricResult):
    """alpha-ReQ fit: lambda_i ~ c * i^(-alpha) on indices ``first..last`` (1-based)."""

    alpha: torch.Tensor
    intercept: torch.Tensor
    first: int
    last: int
    reason: str | None = None

    def __float__(self) -> float:
        return float(self.alpha.item())


def alpha_req(
    features: torch.Tensor,
    *,
    fit_range: tuple[int, int | None] = (1, None),
    center: bool = True,
    rtol: float = 1e-12,
    strict: bool = False,
) -> PowerLawFitResult:
    """alpha-ReQ: the power-law decay exponent of the eigenspectrum.

    alpha-ReQ: power-law decay exponent of the representation's eigenspectrum
    (Agrawal et al., NeurIPS 2022).

    The eigenvalues lambda_1 >= lambda_2 >= ... of the covariance Z^T Z / N (centred by
    default) are fitted as log lambda_i = b - alpha log i by ordinary least squares over the
    1-based indices ``fit_range = (first, last)``; ``last=None`` means the numerical rank
    (eigenvalues above ``rtol`` * lambda_1; zeros cannot enter a log-log fit). The paper's
    fitting range is not pinned down (docs/metrics.md, "α-ReQ"); the default uses every non-zero
    eigenvalue. alpha near 1 is reported as best; alpha >> 1 is collapse-like.
    Fewer than two usable eigenvalues give NaN with reason ``"rank_deficient"``.
    """
    z = as_float_tensor(features, "features", ndim=2, non_empty=True)
    first, last = fit_range
    if (not _is_int(first) or (last is not None and not _is_int(last)) or first < 1
            or (last is not None and last < first + 1)):
        raise ValueError(f"fit_range must be (first >= 1, last > first or None), got {fit_range}")
    if not all_finite(z):
        nan = torch.tensor(math.nan, dtype=torch.float64, device=z.device)
        reason = fail("non_finite", "features are not finite", strict)
        return PowerLawFitResult(nan, nan, first, 0, reason)
    z = f64(z)
    if center:
        z = z - z.mean(0)
    lam = _gram_eigvals(z) / max(z.shape[0], 1)
    dev = z.device
    nan = torch.tensor(math.nan, dtype=torch.float64, device=dev)
    rank = int((lam > rtol * lam[0]).sum()) if lam.numel() and lam[0] > 0 else 0
    stop = rank if last is None else min(last, rank)
    if stop - first + 1 < 2:
        reason = fail(
            "rank_deficient", f"fewer than two non-zero eigenvalues in {fit_range}", strict
        )
        return PowerLawFitResult(nan, nan, first, stop, reason)
    i = torch.arange(first, stop + 1, dtype=torch.float64, device=dev)
    x = torch.log(i)
    y = torch.log(lam[first - 1 : stop])
    xm, ym = x.mean(), y.mean()
    slope = ((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum()
    return PowerLawFitResult(-slope, ym - slope * xm, first, stop)


def alignment(
    x: torch.Tensor, y: torch.Tensor, *, alpha: float = 2.0, strict: bool = False
) -> Scalar:
    """Wang & Isola (ICML 2020) alignment: E ||f(x) - f(y)||_2^alpha over positive pairs.

    ``x`` and ``y`` are (N, d) and row i of each forms a positive pair; rows are
    L2-normalised first. Pairs where either row is zero are left out. Range [0, 2^alpha];
    0 = perfectly aligned. No pairs left gives NaN with reason ``"no_pairs"``.
    """
    x = as_float_tensor(x, "x", ndim=2, non_empty=True)
    y = as_float_tensor(y, "y", ndim=2, non_empty=True)
    if x.shape != y.shape:
        raise ValueError(
            f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not (all_finite(x) and all_finite(y)):
        return nan_scalar(x.device, fail("non_finite", "x or y is not finite", strict))
    # row scales by powers of two: the norms neither over- nor underflow (:func:`scale_rows`)
    xd, yd = scale_rows(x.to(work_dtype(x.dtype))), scale_rows(y.to(work_dtype(y.dtype)))
    nx, ny = xd.norm(dim=1), yd.norm(dim=1)
    keep = (nx > 0) & (ny > 0)
    if not bool(keep.any()):
        return nan_scalar(x.device, fail("no_pairs", "no pair of non-zero rows", strict))
    d = xd[keep] / nx[keep, None] - yd[keep] / ny[keep, None]
    return scalar(f64(d.norm(dim=1)).pow(alpha).mean(), x.device)


def uniformity(
    features: torch.Tensor,
    *,
    t: float = 2.0,
    max_samples: int | None = 4096,
    generator: torch.Generator | None = None,
    block: int = 512,
    strict: bool = False,
) -> Scalar:
    """Wang & Isola (ICML 2020) uniformity: log E_{i<j} exp(-t ||f_i - f_j||^2).

    Rows are L2-normalised (zero rows are left out) and the mean runs over the N(N-1)/2
    unordered pairs without self-pairs, as ``torch.pdist`` in the reference code. It is <= 0;
    more negative is more uniform; 0 means collapsed to one point.

    The exact value costs O(N^2 d). When N > ``max_samples`` (default 4096) the pairs of a
    uniformly drawn subset of ``max_samples`` rows are used instead, an unbiased estimate of
    the pair mean (the paper evaluates it per mini-batch anyway). The subset is drawn from
    ``generator`` (default: a fixed seed 0, so repeated calls agree). ``max_samples=None``
    always computes all pairs. Fewer than two rows give NaN with reason ``"too_few_samples"``.

    Uses ||a - b||^2 = 2 - 2 <a, b> (clamped at 0) for unit rows, with blocked Gram products
    so memory stays O(block * N). Runs in float32 for float32/float16/bfloat16 inputs (an
    absolute error of about 1e-6) and in float64 for float64 inputs; the sum is float64.
    """
    z = as_float_tensor(features, "features", ndim=2, non_empty=True)
    if t <= 0:
        raise ValueError(f"t must be > 0, got {t}")
    if not all_finite(z):
        return nan_scalar(z.device, fail("non_finite", "features are not finite", strict))
    dt = work_dtype(z.dtype)
    z = _unit_rows(z.to(dt))
    n = z.shape[0]
    if n < 2:
        return nan_scalar(
            features.device, fail("too_few_samples", "need two non-zero rows", strict)
        )
    if max_samples is not None and n > max_samples:
        if max_samples < 2:
            raise ValueError(f"max_samples must be >= 2, got {max_samples}")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        pick = torch.randperm(n, generator=generator)[:max_samples].to(z.device)
        z = z[pick]
        n = max_samples
    total = torch.zeros((), dtype=torch.float64, device=z.device)
    block = positive_int("block", block)
    for i0 in range(0, n, block):
        b = min(block, n - i0)
        g = z[i0 : i0 + b] @ z[i0:].T  # rows i in the block, columns j >= i0
        # exp(-t ||a - b||^2) with ||a - b||^2 = 2 - 2 <a, b> >= 0 (never overflows)
        g.mul_(-2.0).add_(2.0).clamp_min_(0.0).mul_(-t).exp_()
        # keep the pairs j > i: drop the lower triangle (with diagonal) of the leading square
        total += g.sum(dtype=torch.float64) - torch.tril(g[:, :b]).sum(dtype=torch.float64)
    mean = total / (n * (n - 1) / 2)
    return scalar(torch.log(mean), z.device)


def wasserstein_uniformity(features: torch.Tensor, *, strict: bool = False) -> Scalar:
    """Wasserstein uniformity distance W2 (Fang et al., ICLR 2024, arXiv:2403.00642).

    Rows are L2-normalised (zero rows left out). With mu = mean(z) and the biased covariance
    Sigma (1/N), W2 is the 2-Wasserstein distance between N(mu, Sigma) and the ideal
    N(0, I/m) in dimension m:

        W2 = sqrt(||mu||^2 + 1 + tr(Sigma) - (2/sqrt(m)) tr(Sigma^{1/2})).

    Returns W2 (range [0, sqrt 2]; 0 = uniform, sqrt 2 = collapsed to one point). The
    paper's uniformity *score* is -W2 (higher is better). Eigenvalues come from ``eigvalsh``
    in float64 and are clamped at 0, as is the radicand. Invariant to sample permutation,
    sample replication and orthogonal maps. No non-zero rows gives NaN (``"zero_matrix"``).
    """
    z = as_float_tensor(features, "features", ndim=2, non_empty=True)
    if not all_finite(z):
        return nan_scalar(z.device, fail("non_finite", "features are not finite", strict))
    z = _unit_rows(f64(z))
    n, m = z.shape
    if n == 0:
        return nan_scalar(features.device, fail("zero_matrix", "all feature rows are zero", strict))
    mu = z.mean(0)
    lam = _gram_eigvals(z - mu) / n  # eigenvalues of Sigma
    radicand = (mu @ mu) + 1.0 + lam.sum() - (2.0 / math.sqrt(m)) * lam.sqrt().sum()
    return scalar(radicand.clamp_min(0.0).sqrt(), z.device)


__all__ = [
    "PowerLawFitResult",
    "alignment",
    "alpha_req",
    "effective_rank",
    "singular_values",
    "uniformity",
    "von_neumann_entropy",
    "wasserstein_uniformity",
]


# old result-class names, for one release (docs/vocabulary.md)
__getattr__ = module_getattr(__name__, {"PowerLawFit": "PowerLawFitResult"}, globals())
