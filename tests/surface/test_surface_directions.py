"""Directions: filter/layer/weight normalization, ignore policy, seeding, storage, eigenvectors."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from landscape.store import RunWriter
from landscape.surface import (
    Directions,
    as_directions,
    eigen_directions,
    evaluate_grid,
    line,
    normalize_direction,
    random_directions,
)
from tests import models


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=4).map(tuple),
    seed=st.integers(0, 2**16),
)
def test_filter_norms_equal_the_weights_per_filter(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    d = torch.randn(shape, generator=g, dtype=torch.float64)
    (out,) = normalize_direction([d], [w], "filter")
    for j in range(shape[0]):
        assert torch.allclose(out[j].norm(), w[j].norm(), rtol=1e-6)
        # the direction of each filter is kept (a positive rescaling)
        cos = torch.dot(out[j].reshape(-1), d[j].reshape(-1)) / (out[j].norm() * d[j].norm())
        assert cos == pytest.approx(1.0, abs=1e-9)


def test_random_directions_on_a_cnn_match_every_filter_and_ignore_biasbn():
    model = models.cnn_bn()
    dirs = random_directions(model, 2, seed=3)
    named = dict(model.named_parameters())
    assert dirs.names == tuple(named)
    for vec in dirs.vectors:
        for name, t in zip(dirs.names, vec):
            w = named[name].detach()
            if w.dim() <= 1:
                assert torch.count_nonzero(t) == 0, name  # biases and BN gains/shifts
            else:
                norms = t.reshape(t.shape[0], -1).norm(dim=1)
                wn = w.reshape(w.shape[0], -1).norm(dim=1)
                assert torch.allclose(norms, wn, rtol=1e-5), name


def test_ignore_none_copies_the_weights_into_one_dimensional_entries():
    model = models.cnn_bn()
    dirs = random_directions(model, 1, seed=0, ignore="none")
    for name, t in zip(dirs.names, dirs.vectors[0]):
        w = dict(model.named_parameters())[name].detach()
        if w.dim() <= 1:
            assert torch.equal(t, w)


def test_layer_and_weight_normalization():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    d = torch.randn(4, 3, generator=g, dtype=torch.float64)
    (lay,) = normalize_direction([d], [w], "layer")
    assert lay.norm() == pytest.approx(float(w.norm()), rel=1e-9)
    assert torch.allclose(lay / lay.norm(), d / d.norm())
    (wt,) = normalize_direction([d], [w], "weight")
    assert torch.equal(wt, d * w)
    (raw,) = normalize_direction([d], [w], "none")
    assert torch.equal(raw, d)


def test_bad_arguments_name_the_argument():
    w = [torch.ones(2, 2)]
    with pytest.raises(ValueError, match="normalization"):
        normalize_direction(w, w, "filters")
    with pytest.raises(ValueError, match="ignore"):
        normalize_direction(w, w, "filter", "bias")
    with pytest.raises(ValueError, match="n must be"):
        random_directions(models.mlp(), 3)


def test_seeded_draws_are_reproducible_and_differ_between_seeds():
    model = models.mlp()
    a = random_directions(model, 2, seed=5)
    b = random_directions(model, 2, seed=5)
    c = random_directions(model, 2, seed=6)
    for va, vb, vc in zip(a.vectors, b.vectors, c.vectors):
        assert all(torch.equal(s, t) for s, t in zip(va, vb))
        assert not all(torch.equal(s, t) for s, t in zip(va, vc))
    # delta and eta are different draws
    assert not torch.equal(a.vectors[0][0], a.vectors[1][0])


def test_params_restricts_the_directions():
    model = models.mlp()
    dirs = random_directions(model, 1, params="0.*")
    assert dirs.names == ("0.weight", "0.bias")
    with pytest.raises(ValueError, match="matches no trainable"):
        random_directions(model, 1, params="nothing.*")


def _cnn_with_head():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4),
                         nn.Linear(4, 2))


def test_a_parameters_draw_does_not_depend_on_which_others_are_frozen_or_selected():
    """Freezing a bias (never moved under biasbn) shifted every later tensor's draw: the
    same seed gave another plane (42 apart in loss at one point). Frozen parameters stay
    fixed; the rest keep the draws of the fully trainable model, as does params=."""
    full = random_directions(_cnn_with_head(), 2, seed=3)
    frozen_model = _cnn_with_head()
    frozen_model[0].bias.requires_grad_(False)
    frozen_model[3].weight.requires_grad_(False)
    frozen = random_directions(frozen_model, 2, seed=3)
    assert frozen.names == ("0.weight", "3.bias", "4.weight", "4.bias")
    chosen = random_directions(_cnn_with_head(), 2, seed=3, params=["4.*"])
    for k in range(2):
        whole = full.as_dict(k)
        for name, v in frozen.as_dict(k).items():
            assert torch.equal(v, whole[name]), name
        for name, v in chosen.as_dict(k).items():
            assert torch.equal(v, whole[name]), name


def test_a_float64_model_gets_the_float32_models_draw():
    """A float64 draw is another stream (cosine 0.08 with the float32 one for one seed)."""
    single = random_directions(_cnn_with_head(), 1, seed=0)
    double = random_directions(_cnn_with_head().double(), 1, seed=0)
    for a, b in zip(single.vectors[0], double.vectors[0]):
        assert b.dtype == torch.float64
        assert torch.allclose(a.double(), b, rtol=1e-6, atol=1e-7)


def test_a_model_frozen_for_inference_says_how_to_perturb_it():
    model = _cnn_with_head().requires_grad_(False)
    with pytest.raises(Exception, match=r"requires_grad_\(True\)"):
        random_directions(model, 1)


def test_scale_invariance_of_filter_normalized_curves():
    """Scale invariance: a bias-free ReLU MLP with layer 1 scaled by c and layer 2 by 1/c."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, 3, bias=False))
    scaled = nn.Sequential(nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, 3, bias=False))
    with torch.no_grad():
        scaled[0].weight.copy_(net[0].weight * 4.0)
        scaled[2].weight.copy_(net[2].weight / 4.0)
    x, y = models.classification_data(n=32, d_in=5)
    curves = {}
    for norm in ("filter", "none"):
        out = []
        for m in (net, scaled):
            s = line(m, F.cross_entropy, (x, y), steps=9, span=1.0, normalization=norm,
                     seed=2, progress=False)
            out.append(s.values["loss"])
        curves[norm] = out
    np.testing.assert_allclose(curves["filter"][0], curves["filter"][1], rtol=1e-5)
    assert not np.allclose(curves["none"][0], curves["none"][1], rtol=1e-3)


def test_as_directions_from_dicts_moves_only_the_named_parameters():
    model = models.mlp()
    d = {"2.weight": torch.ones_like(model[2].weight)}
    dirs = as_directions(model, [d])
    assert dirs.names == ("2.weight",)
    with pytest.raises(ValueError, match="unknown or frozen"):
        as_directions(model, [{"nope": torch.ones(1)}])


def test_directions_round_trip_through_the_run_file(tmp_path):
    model = models.cnn_bn()
    x, y = models.image_data()
    dirs = random_directions(model, 2, seed=9)
    surf = evaluate_grid(model, F.cross_entropy, (x, y), dirs, [0.0, 0.5], [0.0],
                         writer=tmp_path / "run.h5", name="p", progress=False)
    back = Directions.from_surface(surf, model)
    assert back.names == dirs.names and back.attrs["seed"] == 9
    for va, vb in zip(dirs.vectors, back.vectors):
        for s, t in zip(va, vb):
            assert s.shape == t.shape and s.dtype == t.dtype
            assert torch.equal(s, t)


def _fake_curvature(monkeypatch, vectors, values):
    """A stand-in for landscape.curvature with the agreed API (Hessian, top_eigenvalues)."""
    calls = {}

    class Hessian:
        def __init__(self, model, loss_fn=None, data=None, *, params=None, eval_mode=True,
                     closure=None):
            calls["params"] = params

    class EigenResult:
        def __init__(self):
            self.values = torch.tensor(values)
            self.vectors = vectors

    def top_eigenvalues(op, k, **kwargs):
        calls["k"] = k
        calls.update(kwargs)
        return EigenResult()

    mod = types.ModuleType("landscape.curvature")
    mod.Hessian, mod.top_eigenvalues = Hessian, top_eigenvalues
    monkeypatch.setitem(sys.modules, "landscape.curvature", mod)
    return calls


def test_eigen_directions_against_the_curvature_api(monkeypatch):
    model = models.mlp()
    x, y = models.classification_data()
    params = [p.detach() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    vecs = [tuple(torch.randn(p.shape, generator=g) for p in params) for _ in range(3)]
    calls = _fake_curvature(monkeypatch, vecs, [3.0, 2.0, 1.0])
    dirs = eigen_directions(model, F.cross_entropy, (x, y), 2, tol=1e-4)
    assert calls == {"params": None, "k": 2, "tol": 1e-4}
    assert dirs.attrs["eigenvalues"] == [3.0, 2.0] and dirs.kind == "eigen"
    for got, want in zip(dirs.vectors, vecs[:2]):
        assert all(torch.equal(a, b) for a, b in zip(got, want))  # raw, not renormalized


def test_eigen_directions_with_the_real_hessian_match_dense_eigenvectors():
    """The top-2 eigenvectors of the dense float64 Hessian (torch.func.hessian + eigh)."""
    torch.manual_seed(0)
    model = models.mlp(d_in=3, hidden=4, d_out=2).double()
    x, y = models.classification_data(n=10, d_in=3, n_classes=2)
    x = x.double()
    names = [n for n, _ in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def loss_of(flat):
        parts = torch.split(flat, [s.numel() for s in shapes])
        state = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return F.cross_entropy(torch.func.functional_call(model, state, (x,)), y)

    evals, evecs = torch.linalg.eigh(torch.func.hessian(loss_of)(flat0))
    dirs = eigen_directions(model, F.cross_entropy, (x, y), 2, tol=1e-10)
    for k in range(2):
        v = torch.cat([t.reshape(-1) for t in dirs.vectors[k]])
        assert abs(float(v @ evecs[:, -1 - k])) == pytest.approx(1.0, abs=1e-5)
        assert dirs.attrs["eigenvalues"][k] == pytest.approx(float(evals[-1 - k]), rel=1e-6)


def test_plane_of_eigen_directions_is_stored(monkeypatch):
    model = models.mlp()
    x, y = models.classification_data()
    params = [p.detach() for p in model.parameters()]
    vecs = [tuple(torch.ones_like(p) * (k + 1) for p in params) for k in range(2)]
    _fake_curvature(monkeypatch, vecs, [2.0, 1.0])
    from landscape.surface import plane

    w = RunWriter.memory()
    surf = plane(model, F.cross_entropy, (x, y), steps=3, span=0.1, directions="eigen",
                 writer=w, progress=False)
    assert surf.attrs["directions"]["kind"] == "eigen"
    np.testing.assert_allclose(surf.arrays["directions"][1], 2.0)


def test_a_float16_direction_with_a_zero_row_stays_finite():
    """The guard 1e-10 is 0 in float16: a zero row gave 0 * inf = NaN, and the surface was
    refused as 'directions are not finite' (CUDA audit)."""
    w = torch.randn(3, 4).half()
    d = torch.randn(3, 4).half()
    d[1] = 0
    for how in ("filter", "layer"):
        (out,) = normalize_direction([d], [w], how)
        assert out.dtype == torch.float16 and torch.isfinite(out).all(), how
        assert (out[1] == 0).all()
    (out,) = normalize_direction([d], [w], "filter")
    rows = out.float().norm(dim=1)
    torch.testing.assert_close(rows[[0, 2]], w.float().norm(dim=1)[[0, 2]], rtol=2e-3, atol=0)


def test_weights_whose_norm_overflows_a_float32_sum_of_squares_normalize_finitely():
    """Filters of entries 2e19 (finite; a high learning rate left them, and BatchNorm after
    the convolution makes the model evaluable) have norms of 1e20: their float32 sum of
    squares overflowed, and the surface was refused as 'directions are not finite'."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 5, generator=g) * 2e19
    d = torch.randn(4, 3, 5, generator=g)
    for how in ("filter", "layer"):
        (out,) = normalize_direction([d], [w], how)
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), how
    (out,) = normalize_direction([d], [w], "filter")
    want = w.double().reshape(4, -1).norm(dim=1)
    torch.testing.assert_close(out.double().reshape(4, -1).norm(dim=1), want, rtol=1e-6, atol=0)
    (out,) = normalize_direction([d], [w], "layer")
    torch.testing.assert_close(out.double().norm(), w.double().norm(), rtol=1e-6, atol=0)


def test_a_negative_seed_draws_as_torch_manual_seed_takes_it():
    model = _cnn_with_head()
    a, b = random_directions(model, 1, seed=-1), random_directions(model, 1, seed=-1)
    assert all(torch.equal(s, t) for s, t in zip(a.vectors[0], b.vectors[0]))
    assert not torch.equal(a.vectors[0][0], random_directions(model, 1, seed=1).vectors[0][0])
