"""Pure tensor functions for representation and step diagnostics (no hooks, no I/O).

Each function cites its paper and states its conventions in its docstring; the exact
definitions, and the choices made where the literature leaves them open, are in
docs/metrics.md. Degenerate inputs give NaN with a machine-readable ``reason`` (or raise
:class:`MetricError` with ``strict=True``); malformed arguments raise ``ValueError``.
"""

from landscape.functional._common import MetricError, MetricResult, Scalar
from landscape.functional.alignment import (
    SpectralAlignment,
    TopSingular,
    attention_projections,
    sign_diversity,
    spectral_alignment,
    top_singular_vector,
)
from landscape.functional.collapse import (
    NeuralCollapse,
    VariabilityCollapse,
    nc1,
    ncc_mismatch,
    neural_collapse,
    variability_collapse_index,
)
from landscape.functional.representation import (
    PowerLawFit,
    alignment,
    alpha_req,
    effective_rank,
    singular_values,
    uniformity,
    von_neumann_entropy,
    wasserstein_uniformity,
)
from landscape.functional.sharpness import (
    Sharpness,
    asam_sharpness,
    sam_sharpness,
    stability_ratio,
)
from landscape.functional.signals import (
    AttentionStats,
    LogitStats,
    NlmCosine,
    SoftmaxCollapse,
    attention_logit_stats,
    layer_rotation,
    layer_rotations,
    logit_stats,
    nlm_cosine,
    softmax_collapse,
    softmax_collapse_fraction,
)
from landscape.functional.taylor import (
    TaylorRadius,
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
    "NeuralCollapse",
    "VariabilityCollapse",
    "nc1",
    "ncc_mismatch",
    "neural_collapse",
    "variability_collapse_index",
    # representation spectra and geometry
    "PowerLawFit",
    "alignment",
    "alpha_req",
    "effective_rank",
    "singular_values",
    "uniformity",
    "von_neumann_entropy",
    "wasserstein_uniformity",
    # spectral alignment
    "SpectralAlignment",
    "TopSingular",
    "attention_projections",
    "sign_diversity",
    "spectral_alignment",
    "top_singular_vector",
    # Taylor radius of cross-entropy
    "TaylorRadius",
    "binary_radius",
    "clip_step",
    "directional_logit_derivatives",
    "logit_spread",
    "radius_from_spread",
    "taylor_radius",
    "taylor_radius_from_logits",
    "taylor_step_controller",
    # sharpness
    "Sharpness",
    "asam_sharpness",
    "sam_sharpness",
    "stability_ratio",
    # cheap early-warning signals
    "AttentionStats",
    "LogitStats",
    "NlmCosine",
    "SoftmaxCollapse",
    "attention_logit_stats",
    "layer_rotation",
    "layer_rotations",
    "logit_stats",
    "nlm_cosine",
    "softmax_collapse",
    "softmax_collapse_fraction",
]
