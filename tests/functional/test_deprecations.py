"""The result classes end in ``Result`` (docs/vocabulary.md); the old names still resolve,
from the package and from their module, with a DeprecationWarning naming the new one."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

import landscape.functional as F

RENAMED = {
    "alignment": ["SpectralAlignment", "TopSingular"],
    "collapse": ["NeuralCollapse", "VariabilityCollapse"],
    "representation": ["PowerLawFit"],
    "sharpness": ["Sharpness"],
    "signals": ["SoftmaxCollapse", "LogitStats", "AttentionStats", "NlmCosine"],
    "taylor": ["TaylorRadius"],
}
PAIRS = [(m, old) for m, olds in RENAMED.items() for old in olds]


@pytest.mark.parametrize(("module", "old"), PAIRS)
def test_old_result_names_warn_and_resolve(module, old):
    mod = importlib.import_module(f"landscape.functional.{module}")
    new = getattr(mod, f"{old}Result")
    with pytest.warns(DeprecationWarning, match=rf"'{old}'.*'{old}Result'"):
        assert getattr(mod, old) is new
    with pytest.warns(DeprecationWarning, match=rf"'{old}Result'"):
        assert getattr(F, old) is new
    assert f"{old}Result" in F.__all__ and old not in F.__all__


def test_from_import_of_an_old_name_still_works():
    with pytest.warns(DeprecationWarning, match="SharpnessResult"):
        from landscape.functional import Sharpness
    assert Sharpness is F.SharpnessResult


def test_new_names_do_not_warn_and_unknown_names_raise():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert F.NeuralCollapseResult.__name__ == "NeuralCollapseResult"
    with pytest.raises(AttributeError):
        F.NoSuchResult  # noqa: B018


def test_results_are_returned_under_their_new_names():
    res = F.logit_stats(torch.zeros(3, 4))
    assert type(res).__name__ == "LogitStatsResult"


def test_coefficient_of_variation_renamed():
    from landscape.functional import collapse

    x = torch.tensor([1.0, 3.0], dtype=torch.float64)
    assert float(collapse._coefficient_of_variation(x, 0)) == pytest.approx(0.5)
    assert not hasattr(collapse, "_cov")
