"""Pure tensor functions for representation and step diagnostics (no hooks, no I/O).

Each function cites its paper and states its conventions in its docstring; the exact
definitions, and the choices made where the literature leaves them open, are in
docs/metrics.md. Degenerate inputs give NaN with a machine-readable ``reason`` (or raise
:class:`MetricError` with ``strict=True``); malformed arguments raise ``ValueError``.
"""

from landscape._deprecation import module_getattr
from landscape.functional._common import MetricError, MetricResult, Scalar
from landscape.functional.alignment import (
    SpectralAlignmentResult,
    TopSingularResult,
    attention_projections,
    sign_diversity,
    spectral_alignment,
    top_singular_vector,
)
from landscape.functional.collapse import (
    NeuralCollapseResult,
    VariabilityCollapseResult,
    nc1,
    ncc_mismatch,
    neural_collapse,
    variability_collapse_index,
)
from landscape.functional.representation import (
    PowerLawFitResult,
    alignment,
    alpha_req,
    effective_rank,
    singular_values,
    uniformity,
    von_neumann_entropy,
    wasserstein_uniformity,
)
from landscape.functional.sharpness import (
    SharpnessResult,
    asam_sharpness,
    sam_sharpness,
    stability_ratio,
)
from landscape.functional.signals import (
    AttentionStatsResult,
    LogitStatsResult,
    NlmCosineResult,
    SoftmaxCollapseResult,
    attention_logit_stats,
    layer_rotation,
    layer_rotations,
    logit_stats,
    nlm_cosine,
    softmax_collapse,
    softmax_collapse_fraction,
)
from landscape.functional.taylor import (
    TaylorRadiusResult,
    binary_radius,
    clip_step,
    directional_logit_derivatives,
    logit_spread,
    radius_from_spread,
    taylor_radius,
    taylor_radius_from_logits,
    taylor_step_controller,
)

__all__ = [
    # result types and errors
    "MetricError",
    "MetricResult",
    "Scalar",
    # neural collapse and variability collapse
    "NeuralCollapseResult",
    "VariabilityCollapseResult",
    "nc1",
    "ncc_mismatch",
    "neural_collapse",
    "variability_collapse_index",
    # representation spectra and geometry
    "PowerLawFitResult",
    "alignment",
    "alpha_req",
    "effective_rank",
    "singular_values",
    "uniformity",
    "von_neumann_entropy",
    "wasserstein_uniformity",
    # spectral alignment
    "SpectralAlignmentResult",
    "TopSingularResult",
    "attention_projections",
    "sign_diversity",
    "spectral_alignment",
    "top_singular_vector",
    # Taylor radius of cross-entropy
    "TaylorRadiusResult",
    "binary_radius",
    "clip_step",
    "directional_logit_derivatives",
    "logit_spread",
    "radius_from_spread",
    "taylor_radius",
    "taylor_radius_from_logits",
    "taylor_step_controller",
    # sharpness
    "SharpnessResult",
    "asam_sharpness",
    "sam_sharpness",
    "stability_ratio",
    # cheap early-warning signals
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
    __name__, {old: f"{old}Result" for old in (
        "SpectralAlignment",
        "TopSingular",
        "NeuralCollapse",
        "VariabilityCollapse",
        "PowerLawFit",
        "Sharpness",
        "SoftmaxCollapse",
        "LogitStats",
        "AttentionStats",
        "NlmCosine",
        "TaylorRadius",
    )}, globals()
)
