import math

import pytest
import torch
from torch import nn

from landscape import params as P
from landscape.params import NORM_CHUNK, norm, tensor_norms


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



def test_a_tied_parameter_is_selected_by_either_name():
    """A language model's head tied to its embedding: ``head.weight`` is listed once, as
    ``emb.weight``, and selecting it by the head's name was 'matches no trainable'."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin = nn.Embedding(5, 3), nn.Linear(3, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight

    m = Tied()
    assert list(P.select_named_parameters(m, "head.weight")) == ["emb.weight"]
    assert list(P.select_named_parameters(m, "head.*")) == ["emb.weight"]
    assert list(P.select_named_parameters(m, m.head)) == ["emb.weight"]
    assert list(P.select_named_parameters(m, ["head.weight", "emb.weight"])) == ["emb.weight"]
    m.emb.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="matches no trainable"):
        P.select_named_parameters(m, "head.weight")

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
    w = P.gaussian_like(v, g)
    flat = P.flatten(v)
    assert torch.allclose(P.dot(v, w), flat @ P.flatten(w))
    assert torch.allclose(P.norm(v), flat.norm())
    back = P.unflatten(flat, v)
    assert all(torch.equal(a, b) for a, b in zip(back, v))


def test_tensor_norms_of_short_tensors_are_foreach_norms_bitwise():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(300, generator=g), torch.randn(64, 1024, generator=g),
          torch.randn(7, generator=g).double()]
    for got, ref in zip(tensor_norms(ts), torch._foreach_norm(ts)):
        assert torch.equal(got, ref)


def test_tensor_norms_of_long_tensors_are_accurate_and_in_order():
    # a float32 norm over millions of entries drifts (docstring); chunked, it does not
    g = torch.Generator().manual_seed(1)
    long32 = torch.randn(3 * NORM_CHUNK * 16 + 11, generator=g) * 0.02
    short = torch.randn(50, generator=g)
    long16 = torch.randn(NORM_CHUNK + 1, generator=g).bfloat16()
    got = tensor_norms([short, long32, long16])
    assert torch.equal(got[0], torch._foreach_norm([short])[0])
    assert float(got[1]) == pytest.approx(float(long32.double().norm()), rel=1e-6)
    assert got[2].dtype == torch.float32  # a 16-bit tensor's norm in float32
    assert float(got[2]) == pytest.approx(float(long16.double().norm()), rel=1e-5)
    vec = (short, long32)
    exact = math.sqrt(sum(float(t.double().pow(2).sum()) for t in vec))
    assert float(norm(vec)) == pytest.approx(exact, rel=1e-6)


def test_norms_of_16_bit_tensors_are_reduced_in_float32():
    """In their own dtype a bfloat16 gradient's norm was 0.2 % off and a float16 one of
    norm 94,868 read inf (CUDA audit, measured on the CPU)."""
    g = torch.Generator().manual_seed(0)
    bf = torch.randn(3000, generator=g).bfloat16()
    fp = torch.full((100,), 9486.8, dtype=torch.float16)
    got = tensor_norms([bf])[0], tensor_norms([fp])[0]
    assert all(n.dtype == torch.float32 for n in got)
    assert float(got[0]) == pytest.approx(float(bf.double().norm()), rel=1e-6)
    assert float(got[1]) == pytest.approx(float(fp.double().norm()), rel=1e-6)
    assert float(norm((bf,))) == pytest.approx(float(bf.double().norm()), rel=1e-6)
    assert float(torch._foreach_norm([bf])[0]) != pytest.approx(float(bf.double().norm()),
                                                               rel=1e-4)


def test_read_floats_reads_plain_tensors_at_once_and_subclasses_one_by_one():
    class Sub(torch.Tensor):
        pass

    plain = [torch.tensor(0.1, dtype=torch.float32), torch.tensor(3.0), torch.tensor(2.5)]
    assert P.read_floats(plain) == [float(t) for t in plain]
    mixed = [torch.tensor(1.5).as_subclass(Sub), torch.tensor(2.0)]
    assert P.read_floats(mixed) == [1.5, 2.0]
