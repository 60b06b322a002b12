"""Neural collapse (NC1–NC4) and the variability-collapse index (VCI).

References:
* Papyan, Han & Donoho, "Prevalence of neural collapse during the terminal phase of deep
  learning training", PNAS 117(40), 2020 (arXiv:2008.08186): NC1–NC4.
* Zhu et al., "A geometric analysis of neural collapse with unconstrained features",
  NeurIPS 2021 (arXiv:2105.02375): the simplex-ETF distances ``nc2_etf_*`` and ``nc3_zhu``.
* Xu & Liu, "Quantifying the variability collapse of neural networks", ICML 2023
  (arXiv:2306.03440): VCI.

Notation and conventions follow docs/metrics.md (neural collapse, VCI): features ``h`` of
shape (N, p), C = number of classes *present* (empty classes are dropped), class means mu_c,
global mean mu_G (default: the mean of class means), centred means M~ (p x C),
Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T and Sigma_B = M~ M~^T / C.
All second-moment algebra runs in float64.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from landscape import distributed as _dist
from landscape._deprecation import module_getattr
from landscape.functional._common import (
    NAN,
    MetricResult,
    Scalar,
    all_finite,
    as_float_tensor,
    check_labels,
    f64,
    fail,
)

GlobalMean = Literal["class_means", "samples"]


@dataclasses.dataclass(frozen=True)
class _ClassStats:
    h: torch.Tensor  # (N, p) float64 features
    idx: torch.Tensor  # (N,) class index in 0..C-1 (into ``present``)
    present: torch.Tensor  # (C,) original label ids, sorted
    counts: torch.Tensor  # (C,) float64
    means: torch.Tensor  # (C, p) class means
    centred_means: torch.Tensor  # (C, p) rows mu_c - mu_G (M~ transposed)

    def within(self) -> torch.Tensor:
        """(N, p) deviations h_i - mu_{y_i} (a new tensor; only VCI needs it whole)."""
        return self.h - self.means[self.idx]

    @property
    def n(self) -> int:
        return self.h.shape[0]

    @property
    def c(self) -> int:
        return self.present.shape[0]

    @property
    def p(self) -> int:
        return self.h.shape[1]


def _class_stats(
    features: torch.Tensor, labels: torch.Tensor, global_mean: GlobalMean, num_classes: int | None
) -> _ClassStats:
    features = as_float_tensor(features, "features", ndim=2)
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(
            "features must contain at least one sample and one feature, got shape "
            f"{tuple(features.shape)}"
        )
    if global_mean not in ("class_means", "samples"):
        raise ValueError(f"global_mean must be 'class_means' or 'samples', got {global_mean!r}")
    labels = check_labels(labels, features.shape[0], num_classes).to(features.device)
    h = f64(features)
    present, idx = torch.unique(labels, sorted=True, return_inverse=True)
    c = present.shape[0]
    counts = torch.bincount(idx, minlength=c).to(torch.float64)
    sums = torch.zeros(c, h.shape[1], dtype=torch.float64, device=h.device).index_add_(0, idx, h)
    means = sums / counts[:, None]
    mu_g = means.mean(0) if global_mean == "class_means" else h.mean(0)
    return _ClassStats(h, idx, present, counts, means, means - mu_g)


def _means_coincide(stats: _ClassStats) -> bool:
    """Whether all class means are equal up to the rounding of their computation (Sigma_B = 0).

    Identical rows do not give exactly equal means: a mean of n copies of 0.1 is up to about
    n eps / 10 off (8,500 eps at n = 10^5), and that noise read as a finite NC1, NC2, NC3
    and VCI. The bound on the rounding of a sum of n terms is about n u sum |x_i| (u = eps/2,
    recursive summation), so each centred mean mu_cj - mu_Gj (n_c samples, then C means or
    N samples for mu_G) is off by at most about (N + C) u a_j, with a_j the largest mean
    |h_ij| over a class c, per feature j: each feature's sums round on their own scale (a
    constant feature of 1e10 says nothing of the rounding of one of size 1e-3). Means
    whose every feature lies within (N + C) eps a_j of the others count as equal;
    genuinely separated means sit far above that (means 2^-30 apart on features of size 1
    against 2.7e-15 at N = 8, C = 4). docs/metrics.md, "Edge cases".
    """
    return bool(_at_the_global_mean(stats).all())


def _at_the_global_mean(stats: _ClassStats) -> torch.Tensor:
    """(C,) whether each class mean equals the global mean up to rounding.

    The rule of :func:`_means_coincide`, per class: such a centred mean is rounding noise,
    whose direction is none.
    """
    abs_sums = torch.zeros_like(stats.means).index_add_(0, stats.idx, stats.h.abs())
    scale = (abs_sums / stats.counts[:, None]).amax(dim=0)  # a_j, per feature
    tol = (stats.n + stats.c) * torch.finfo(torch.float64).eps * scale
    return (stats.centred_means.abs() <= tol).all(dim=1)


def _check_rtol(rtol: float) -> None:
    """A relative cut must be a number in [0, 1) (NaN kept every direction, or none)."""
    if not (isinstance(rtol, (int, float)) and not isinstance(rtol, bool) and 0 <= rtol < 1):
        raise ValueError(f"rtol must be a number in [0, 1), got {rtol!r}")


def _between_svd(stats: _ClassStats, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values s_k and input-space vectors u_k of M~ kept by the truncation rule.

    Keeps at most min(p, C - 1) components, each with s_k > rtol * s_1.
    """
    _, s, vh = torch.linalg.svd(stats.centred_means, full_matrices=False)
    k_max = min(stats.p, stats.c - 1)
    keep = s[:k_max] > rtol * s[0] if s.numel() and s[0] > 0 else torch.zeros(0, dtype=torch.bool)
    k = int(keep.sum())
    return s[:k], vh[:k].T  # (k,), (p, k)


def _coefficient_of_variation(x: torch.Tensor, ddof: int) -> torch.Tensor:
    """Coefficient of variation std/mean of a 1-D tensor (NaN when undefined)."""
    if x.numel() - ddof <= 0:
        return torch.tensor(NAN, dtype=torch.float64, device=x.device)
    m = x.mean()
    if m <= 0:
        return torch.tensor(NAN, dtype=torch.float64, device=x.device)
    return x.std(correction=ddof) / m


def _angle_stats(rows: torch.Tensor, ddof: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(std of off-diagonal cosines, mean |cos + 1/(C-1)|) of the rows of a C x p matrix."""
    c = rows.shape[0]
    nrm = rows.norm(dim=1, keepdim=True)
    if c < 2 or bool((nrm == 0).any()):
        nan = torch.tensor(NAN, dtype=torch.float64, device=rows.device)
        return nan, nan
    v = rows / nrm
    g = v @ v.T
    off = g[~torch.eye(c, dtype=torch.bool, device=g.device)]
    std = (
        off.std(correction=ddof)
        if off.numel() - ddof > 0
        else torch.tensor(NAN, dtype=torch.float64, device=rows.device)
    )
    coherence = (off + 1.0 / (c - 1)).abs().mean()
    return std, coherence


def _etf_target(c: int, device: torch.device) -> torch.Tensor:
    eye = torch.eye(c, dtype=torch.float64, device=device)
    return (eye - 1.0 / c) / (c - 1) ** 0.5


def _etf_distance(gram: torch.Tensor) -> torch.Tensor:
    """|| G/||G||_F - (I - 11^T/C)/sqrt(C-1) ||_F (Zhu et al. ``compute_ETF``)."""
    c = gram.shape[0]
    nrm = torch.linalg.matrix_norm(gram)
    if c < 2 or nrm == 0:
        return torch.tensor(NAN, dtype=torch.float64, device=gram.device)
    return torch.linalg.matrix_norm(gram / nrm - _etf_target(c, gram.device))


def _split_classifier(
    classifier: nn.Module | torch.Tensor | None, bias: torch.Tensor | None, p: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if classifier is None:
        if bias is not None:
            raise ValueError("bias was given without a classifier")
        return None, None
    if isinstance(classifier, torch.Tensor):
        weight = classifier
    elif isinstance(getattr(classifier, "weight", None), torch.Tensor):
        weight = classifier.weight
        if bias is None and isinstance(getattr(classifier, "bias", None), torch.Tensor):
            bias = classifier.bias
    else:
        raise ValueError(
            "classifier must be a 2-D weight tensor or a module with a .weight "
            f"(such as nn.Linear), got {type(classifier).__name__}"
        )
    if any(_dist.is_sharded(t) for t in (weight, bias) if t is not None):
        raise ValueError("classifier: its weight is an FSDP2 shard (DTensor); pass the whole "
                         "weight and bias, landscape.distributed.full_tensor(layer.weight) "
                         "gathered on every rank")
    weight = as_float_tensor(weight, "classifier weight", ndim=2)
    if weight.shape[1] != p:
        raise ValueError(
            f"classifier weight must have shape (num_classes, {p}) to match "
            f"features, got {tuple(weight.shape)}"
        )
    if bias is not None:
        bias = as_float_tensor(bias, "bias", ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        bias = f64(bias.detach())
    return f64(weight.detach()), bias


@dataclasses.dataclass(frozen=True)
class NeuralCollapseResult(MetricResult):
    """NC1–NC4 (Papyan et al. 2020) and the simplex-ETF distances of Zhu et al. (2021).

    Fields (0-d float64 tensors on the features' device; classifier fields are ``None``
    when no classifier is given):

    * ``nc1``: Tr(Sigma_W Sigma_B^+)/C; ``nc1_rank``: components of Sigma_B used.
    * ``nc2_equinorm_means`` / ``nc2_equinorm_weights``: CoV of ||mu_c - mu_G|| / ||w_c||.
    * ``nc2_equiangular_means`` / ``..._weights``: std over c != c' of the cosines.
    * ``nc2_maxangle_means`` / ``..._weights``: mean over c != c' of |cos + 1/(C-1)|.
    * ``nc2_etf_means`` / ``nc2_etf_weights``: Zhu et al.'s distance of the normalised Gram
      matrix to the simplex ETF.
    * ``nc3``: ||W^T/||W||_F - M~/||M~||_F||_F^2 (Papyan, squared); ``nc3_zhu``: Zhu's
      ||W M~/||W M~||_F - (I - 11^T/C)/sqrt(C-1)||_F.
    * ``nc4``: fraction of samples where the nearest class centre disagrees with the
      classifier's prediction argmax_c (W h + b)_c.
    * ``n_classes``: the number C of classes present.

    A classifier row of zero norm makes the weights' cosine fields NaN; a head of zero
    norm (zero-initialised) makes every weight field and ``nc3``/``nc3_zhu`` NaN; neither
    sets ``reason``, which describes the features (docs/metrics.md, "Edge cases").
    """

    nc1: torch.Tensor
    nc1_rank: int
    nc2_equinorm_means: torch.Tensor
    nc2_equiangular_means: torch.Tensor
    nc2_maxangle_means: torch.Tensor
    nc2_etf_means: torch.Tensor
    n_classes: int
    nc2_equinorm_weights: torch.Tensor | None = None
    nc2_equiangular_weights: torch.Tensor | None = None
    nc2_maxangle_weights: torch.Tensor | None = None
    nc2_etf_weights: torch.Tensor | None = None
    nc3: torch.Tensor | None = None
    nc3_zhu: torch.Tensor | None = None
    nc4: torch.Tensor | None = None
    reason: str | None = None


def _nc1(stats: _ClassStats, rtol: float) -> tuple[torch.Tensor, int]:
    s, u = _between_svd(stats, rtol)
    if s.numel() == 0:
        return torch.tensor(NAN, dtype=torch.float64, device=stats.h.device), 0
    # u_k^T Sigma_W u_k = (1/N) sum_i ((h_i - mu_{y_i}) . u_k)^2 ; NC1 = sum_k that / s_k^2.
    # (h_i - mu_y) . u = h_i . u - mu_y . u: an (N, k) product, no (N, p) temporary.
    proj = stats.h @ u - (stats.means @ u)[stats.idx]
    quad = (proj * proj).sum(0) / stats.n
    return (quad / (s * s)).sum(), int(s.numel())


def ncc_mismatch(
    features: torch.Tensor,
    labels: torch.Tensor,
    classifier: nn.Module | torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """NC4 (Papyan et al. 2020): the nearest-class-centre mismatch.

    NC4 (Papyan et al. 2020): fraction of samples whose nearest class centre
    (Euclidean, over the classes present) differs from the classifier's prediction.

    Agreement is with the network's prediction argmax_c (W h + b)_c, not with the label.
    Returns a 0-d float64 tensor.
    """
    stats = _class_stats(features, labels, "class_means", None)
    w, b = _split_classifier(classifier, bias, stats.p)
    check_labels(labels, stats.n, w.shape[0])
    if not _all_finite(stats, w, b):  # a NaN row has no nearest mean (docs/metrics.md)
        return torch.tensor(NAN, dtype=torch.float64, device=stats.h.device)
    return _nc4(stats, w.to(stats.h.device), None if b is None else b.to(stats.h.device))


def _all_finite(stats: _ClassStats, w: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether the features, the classifier weight and its bias (when given) are finite."""
    return all(all_finite(t) for t in (stats.h, w, b) if t is not None)


def _nc4(stats: _ClassStats, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    h, mu = stats.h, stats.means
    # argmin_c ||h - mu_c||^2 = argmin_c (||mu_c||^2 - 2 h . mu_c): one (N, C + K) product
    prod = h @ torch.cat([mu, w]).T
    c = mu.shape[0]
    ncc = stats.present[((mu * mu).sum(1)[None, :] - 2 * prod[:, :c]).argmin(1)]
    logits = prod[:, c:]
    if b is not None:
        logits = logits + b
    pred = logits.argmax(1)
    return (ncc != pred).to(torch.float64).mean()


def neural_collapse(
    features: torch.Tensor,
    labels: torch.Tensor,
    classifier: nn.Module | torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    global_mean: GlobalMean = "class_means",
    ddof: int = 1,
    rtol: float = 1e-6,
    strict: bool = False,
) -> NeuralCollapseResult:
    """Neural-collapse metrics NC1–NC4 of last-layer features.

    Papyan, Han & Donoho, PNAS 2020 (arXiv:2008.08186); the ETF distances follow
    Zhu et al., NeurIPS 2021 (arXiv:2105.02375). Conventions: docs/metrics.md, "Neural collapse".

    Args:
        features: (N, p) penultimate features (any float dtype; computed in float64).
        labels: (N,) integer class labels; classes without samples are dropped (C shrinks).
        classifier: optional ``nn.Linear``-like module (``.weight`` of shape (K, p), optional
            ``.bias``) or a (K, p) weight tensor; needed for NC2-weights, NC3 and NC4.
            Rows of the classes present are used for NC2/NC3; NC4 uses all K rows.
        bias: classifier bias when ``classifier`` is a tensor (overrides a module's bias).
        global_mean: ``"class_means"`` (default, Papyan's code; keeps the ETF geometry for
            imbalanced data) or ``"samples"`` (the paper's text).
        ddof: degrees of freedom of the standard deviations in NC2 (1 = ``torch.std``).
        rtol: NC1 keeps at most min(p, C - 1) singular directions of M~, each with singular
            value > ``rtol`` * largest (the pseudo-inverse truncation rule). ``nc1_rank``
            reports how many were kept.
        strict: raise :class:`MetricError` instead of returning NaN with a ``reason``.

    Returns:
        :class:`NeuralCollapseResult`. ``nc1 = Tr(Sigma_W Sigma_B^+)/C`` (with the 1/C of the
        paper's figures). Degenerate cases: fewer than two classes (``"single_class"``) or
        identical class means (``"rank_deficient"``) give NaN for NC1–NC3.
    """
    _check_rtol(rtol)
    stats = _class_stats(features, labels, global_mean, None)
    w_full, b = _split_classifier(classifier, bias, stats.p)
    dev = stats.h.device
    if w_full is not None:
        check_labels(labels, stats.n, w_full.shape[0])
        w_full = w_full.to(dev)
        b = None if b is None else b.to(dev)
    nan = torch.tensor(NAN, dtype=torch.float64, device=dev)
    reason: str | None = None
    finite = _all_finite(stats, w_full, b)
    if not finite:
        reason = fail("non_finite", "features or classifier (weight, bias) are not finite",
                      strict)
    elif stats.c < 2:
        reason = fail("single_class", "neural collapse needs at least two classes present", strict)
    elif _means_coincide(stats):
        reason = fail("rank_deficient", "all class means are equal (Sigma_B = 0)", strict)

    nc4 = None
    if w_full is not None:
        nc4 = _nc4(stats, w_full, b) if finite else nan
    if reason is not None:
        with_w = w_full is not None
        return NeuralCollapseResult(
            nc1=nan,
            nc1_rank=0,
            nc2_equinorm_means=nan,
            nc2_equiangular_means=nan,
            nc2_maxangle_means=nan,
            nc2_etf_means=nan,
            n_classes=stats.c,
            nc2_equinorm_weights=nan if with_w else None,
            nc2_equiangular_weights=nan if with_w else None,
            nc2_maxangle_weights=nan if with_w else None,
            nc2_etf_weights=nan if with_w else None,
            nc3=nan if with_w else None,
            nc3_zhu=nan if with_w else None,
            nc4=nc4,
            reason=reason,
        )

    nc1, rank = _nc1(stats, rtol)
    mt = stats.centred_means
    # a class mean at the global mean has no direction: its cosines are NaN, exactly there
    # and where rounding left it a few eps off (arbitrary cosines before)
    eq_m, mx_m = _angle_stats(mt.masked_fill(_at_the_global_mean(stats)[:, None], 0.0), ddof)
    fields: dict[str, object] = dict(
        nc1=nc1,
        nc1_rank=rank,
        nc2_equinorm_means=_coefficient_of_variation(mt.norm(dim=1), ddof),
        nc2_equiangular_means=eq_m,
        nc2_maxangle_means=mx_m,
        nc2_etf_means=_etf_distance(mt @ mt.T),
        n_classes=stats.c,
        nc4=nc4,
    )
    if w_full is not None:
        w = w_full[stats.present]
        eq_w, mx_w = _angle_stats(w, ddof)
        w_n = torch.linalg.matrix_norm(w)
        m_n = torch.linalg.matrix_norm(mt)
        nc3 = torch.linalg.matrix_norm(w / w_n - mt / m_n) ** 2 if w_n > 0 else nan
        fields.update(
            nc2_equinorm_weights=_coefficient_of_variation(w.norm(dim=1), ddof),
            nc2_equiangular_weights=eq_w,
            nc2_maxangle_weights=mx_w,
            nc2_etf_weights=_etf_distance(w @ w.T),
            nc3=nc3,
            nc3_zhu=_etf_distance(w @ mt.T),  # Zhu's compute_W_H_relation
        )
    return NeuralCollapseResult(**fields)  # type: ignore[arg-type]


def nc1(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    global_mean: GlobalMean = "class_means",
    rtol: float = 1e-6,
    strict: bool = False,
) -> Scalar:
    """NC1 = Tr(Sigma_W Sigma_B^+)/C (Papyan et al. 2020), computed without a p x p inverse.

    With the thin SVD M~ = U S V^T (truncated as in :func:`neural_collapse`),
    NC1 = sum_k (u_k^T Sigma_W u_k) / s_k^2 at cost O(N p C). NC1 is blind to within-class
    variance orthogonal to span(M~) and is not invariant to invertible linear maps of the
    features (use :func:`variability_collapse_index` for that).
    """
    res = neural_collapse(features, labels, global_mean=global_mean, rtol=rtol, strict=strict)
    return Scalar(res.nc1, res.reason)


VciDenominator = Literal["min", "rank", "classes"]


@dataclasses.dataclass(frozen=True)
class VariabilityCollapseResult(MetricResult):
    """VCI = 1 - Tr(Sigma_T^+ Sigma_B) / denominator (Xu & Liu 2023).

    ``trace`` is Tr(Sigma_T^+ Sigma_B); ``denominator`` the number it was divided by;
    ``rank_b`` the numerical rank of Sigma_B.
    """

    value: torch.Tensor
    trace: torch.Tensor
    denominator: int
    rank_b: int
    reason: str | None = None

    def __float__(self) -> float:
        return float(self.value.item())


def variability_collapse_index(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    denominator: VciDenominator = "min",
    global_mean: GlobalMean = "class_means",
    rtol: float = 1e-10,
    strict: bool = False,
) -> VariabilityCollapseResult:
    """Variability-collapse index (Xu & Liu, ICML 2023, arXiv:2306.03440).

    VCI = 1 - Tr(Sigma_T^+ Sigma_B) / d with Sigma_T = Sigma_W + Sigma_B (docs/metrics.md).
    For balanced classes it is the optimal affine linear-probe MSE on one-hot labels divided
    by the MSE of the constant predictor: 0 = a perfect linear probe (full collapse along the
    label-relevant directions), 1 = no linearly decodable label information. It is invariant
    to h -> A h + c for invertible A, and stable because Sigma_T >= Sigma_B.

    Args:
        features: (N, p) features, any float dtype (computed in float64).
        labels: (N,) integer labels; empty classes are dropped.
        denominator: ``"min"`` (default) d = min(p, C - 1), as in the reference
            re-implementation; ``"rank"`` d = numerical rank of Sigma_B (keeps VCI in [0, 1]
            with 0 attainable even for collinear means); ``"classes"`` d = C - 1 (the exact
            normalised probe MSE when p < C - 1 or means are collinear). The three agree
            when p >= C - 1 and the class means are in general position.
        global_mean: see :func:`neural_collapse`.
        rtol: eigenvalues of Sigma_T below ``rtol`` * largest are treated as zero (pinv).
        strict: raise instead of returning NaN.

    Computed as Tr(Sigma_T^+ Sigma_B) = (1/C) ||Lambda^{-1/2} E^T M~||_F^2 from the
    eigendecomposition Sigma_T = E Lambda E^T; when p > N + C the same quantity is computed
    from the (N + C) x (N + C) Gram matrix of the stacked centred data. Each feature is
    first divided by its total standard deviation (features without variance left out), so
    ``rtol`` and the rank of Sigma_B do not depend on the features' scales.
    Degenerate: fewer than two classes (``"single_class"``) or Sigma_B = 0
    (``"rank_deficient"``) give NaN.
    """
    if denominator not in ("min", "rank", "classes"):
        raise ValueError(f"denominator must be 'min', 'rank' or 'classes', got {denominator!r}")
    _check_rtol(rtol)
    stats = _class_stats(features, labels, global_mean, None)
    dev = stats.h.device
    nan = torch.tensor(NAN, dtype=torch.float64, device=dev)
    if not all_finite(stats.h):
        reason = fail("non_finite", "features are not finite", strict)
        return VariabilityCollapseResult(nan, nan, 0, 0, reason)
    if stats.c < 2:
        reason = fail("single_class", "VCI needs at least two classes present", strict)
        return VariabilityCollapseResult(nan, nan, 0, 0, reason)
    if _means_coincide(stats):
        reason = fail("rank_deficient", "all class means are equal (Sigma_B = 0)", strict)
        return VariabilityCollapseResult(nan, nan, 0, 0, reason)
    c, n, p = stats.c, stats.n, stats.p
    mt, within = stats.centred_means, stats.within()  # (C, p), (N, p)
    # each feature divided by its total standard deviation (diag Sigma_T), those without
    # variance left out: the index is invariant to it (an invertible diagonal map), and
    # rtol and the rank's cut are then relative to comparable scales (a feature 1e6 larger
    # than the others had pushed every other direction under rtol)
    scale = ((within * within).sum(0) / n + (mt * mt).sum(0) / c).sqrt()
    varies = scale > 0
    mt, within = mt[:, varies] / scale[varies], within[:, varies] / scale[varies]
    s_b = torch.linalg.svdvals(mt)
    rank_b = int((s_b[: min(p, c - 1)] > 1e-6 * s_b[0]).sum())
    if mt.shape[1] > n + c:
        x = torch.cat([within / n**0.5, mt / c**0.5], 0)  # Sigma_T = X^T X
        lam, a = torch.linalg.eigh(x @ x.T)
        keep = lam > rtol * lam[-1]
        lam, a = lam[keep], a[:, keep]
        proj = (mt @ x.T) @ a / lam  # = Mt X^T A S^-2
    else:
        sigma_t = (within.T @ within) / n + (mt.T @ mt) / c
        lam, e = torch.linalg.eigh(sigma_t)
        keep = lam > rtol * lam[-1]
        lam, e = lam[keep], e[:, keep]
        proj = (mt @ e) / lam.sqrt()
    trace = (proj * proj).sum() / c
    d = {"min": min(p, c - 1), "rank": rank_b, "classes": c - 1}[denominator]
    return VariabilityCollapseResult(1.0 - trace / d, trace, d, rank_b, None)


__all__ = [
    "NeuralCollapseResult",
    "VariabilityCollapseResult",
    "nc1",
    "ncc_mismatch",
    "neural_collapse",
    "variability_collapse_index",
]


# old result-class names, for one release (docs/vocabulary.md)
__getattr__ = module_getattr(
    __name__,
    {
        "NeuralCollapse": "NeuralCollapseResult",
        "VariabilityCollapse": "VariabilityCollapseResult",
    },
    globals(),
)
