import pytest
import torch
from torch import nn

from landscape import params as P


def _model():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_select_by_name_glob_module_and_parameter():
    m = _model()
    assert list(P.select_named_parameters(m)) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert list(P.select_named_parameters(m, "*.weight")) == ["0.weight", "2.weight"]
    assert list(P.select_named_parameters(m, m[2])) == ["2.weight", "2.bias"]
    assert list(P.select_named_parameters(m, [m[0].bias, "2.bias"])) == ["0.bias", "2.bias"]


def test_select_skips_frozen_and_names_bad_items():
    m = _model()
    m[0].weight.requires_grad_(False)
    assert "0.weight" not in P.select_named_parameters(m)
    with pytest.raises(ValueError, match="matches no trainable"):
        P.select_named_parameters(m, "0.weight")
    with pytest.raises(ValueError, match="empty"):
        P.select_named_parameters(m, [])


def test_group_named_parameters():
    names = ["blocks.0.a.weight", "blocks.0.b.bias", "blocks.1.a.weight", "head.weight"]
    assert P.group_named_parameters(names, depth=2) == {
        "blocks.0": ["blocks.0.a.weight", "blocks.0.b.bias"],
        "blocks.1": ["blocks.1.a.weight"],
        "head": ["head.weight"],
    }


def test_vector_algebra_and_flatten_round_trip():
    g = torch.Generator().manual_seed(0)
    v = P.gaussian_like([torch.zeros(2, 3), torch.zeros(4)], g)
    w = P.rademacher_like(v, g)
    assert all(set(a.unique().tolist()) <= {-1.0, 1.0} for a in w)
    flat = P.flatten(v)
    assert torch.allclose(P.dot(v, w), flat @ P.flatten(w))
    assert torch.allclose(P.norm(v), flat.norm())
    back = P.unflatten(flat, v)
    assert all(torch.equal(a, b) for a, b in zip(back, v))
    assert torch.allclose(P.flatten(P.add(v, w, alpha=2.0)), flat + 2 * P.flatten(w))
