"""Features with a NaN or inf entry (a diverged run) give NaN with the reason
``"non_finite"`` (docs/metrics.md, "Degenerate inputs"), never a finite number computed
from the other rows nor a LinAlgError; ``strict=True`` raises ``MetricError``."""

from __future__ import annotations

import math

import pytest
import torch

import landscape.functional as LF
from landscape.functional import MetricError

LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
WEIGHT = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))

# name -> (call on features and strict, the result's value)
CASES = {
    "effective_rank": (lambda z, s: LF.effective_rank(z, strict=s), lambda r: r.value),
    "von_neumann_entropy": (lambda z, s: LF.von_neumann_entropy(z, strict=s), lambda r: r.value),
    "alpha_req": (lambda z, s: LF.alpha_req(z, strict=s), lambda r: r.alpha),
    "uniformity": (lambda z, s: LF.uniformity(z, strict=s), lambda r: r.value),
    "wasserstein_uniformity": (lambda z, s: LF.wasserstein_uniformity(z, strict=s),
                               lambda r: r.value),
    "alignment": (lambda z, s: LF.alignment(z, z.nan_to_num(0.0, 0.0, 0.0), strict=s),
                  lambda r: r.value),
    "spectral_alignment": (lambda z, s: LF.spectral_alignment(WEIGHT, z, strict=s),
                           lambda r: r.minority_fraction),
    "neural_collapse": (lambda z, s: LF.neural_collapse(z, LABELS, strict=s), lambda r: r.nc1),
    "variability_collapse_index": (
        lambda z, s: LF.variability_collapse_index(z, LABELS, strict=s), lambda r: r.value),
}


def _features(bad: float) -> torch.Tensor:
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    z[0, 0] = bad
    return z


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", sorted(CASES))
def test_one_non_finite_entry_gives_nan_and_the_reason(name, bad):
    call, value = CASES[name]
    result = call(_features(bad), False)  # was: the value without row 0, or a LinAlgError
    assert math.isnan(float(value(result)))
    assert result.reason == "non_finite"
    with pytest.raises(MetricError, match="not finite"):
        call(_features(bad), True)


def test_finite_features_are_unaffected():
    z = _features(0.5)
    for name, (call, value) in CASES.items():
        result = call(z, False)
        assert math.isfinite(float(value(result))), name
        assert result.reason is None, name


def test_neural_collapse_with_a_non_finite_classifier_has_no_nc4():
    z = _features(0.5)
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    w[1, 1] = math.nan
    result = LF.neural_collapse(z, LABELS, classifier=w)
    assert result.reason == "non_finite"
    assert result.nc4 is None or math.isnan(float(result.nc4))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_ncc_mismatch_of_non_finite_features_is_nan(bad):
    """ncc_mismatch (NC4 alone) read 0.75 for a NaN entry: its row was mismatched."""
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    assert math.isnan(float(LF.ncc_mismatch(_features(bad), LABELS, w)))
    w[1, 1] = bad
    assert math.isnan(float(LF.ncc_mismatch(_features(0.5), LABELS, w)))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_bias_gives_nan_and_the_reason(bad):
    """A NaN or infinite bias gave a finite nc4 (0.75) with no reason."""
    z = _features(0.5)
    head = torch.nn.Linear(4, 4)
    with torch.no_grad():
        head.bias[1] = bad
    for kwargs in ({"classifier": head}, {"classifier": head.weight, "bias": head.bias}):
        result = LF.neural_collapse(z, LABELS, **kwargs)
        assert result.reason == "non_finite"
        assert all(math.isnan(v) for v in result.as_dict().values() if isinstance(v, float))
        with pytest.raises(MetricError, match="not finite"):
            LF.neural_collapse(z, LABELS, strict=True, **kwargs)
        assert math.isnan(float(LF.ncc_mismatch(z, LABELS, **kwargs)))
