"""PCA of trajectories (docs/surfaces.md), its sources, the PCA plane and projections."""

from __future__ import annotations

import os
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape import LandscapeError
from landscape.store import RunWriter
from landscape.surface import (
    interpolate,
    pca_directions,
    project,
    trajectory_from_run,
    trajectory_plane,
)
from tests import models


def _synthetic(model, T=9, seed=0):
    """theta_e = theta_n + a_e u + b_e w, orthonormal u, w on the weight matrices only."""
    named = dict(model.named_parameters())
    shapes = [p.shape for p in named.values()]
    P = sum(s.numel() for s in shapes)
    mask = torch.cat([torch.full((s.numel(),), float(len(s) > 1)) for s in shapes]).double()
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(P, 2, generator=g, dtype=torch.float64) * mask[:, None])
    u, w = q[:, 0], q[:, 1]
    t = torch.linspace(0, 1, T, dtype=torch.float64)
    a = 3.0 * torch.cos(3 * t)
    b = 0.5 * torch.sin(5 * t)
    a, b = a - a.mean(), b - b.mean()  # centred, uncorrelated coefficient sequences
    b = b - (b @ a) / (a @ a) * a
    final = torch.cat([p.detach().reshape(-1).double() for p in named.values()])
    rows = [final + a[e] * u + b[e] * w for e in range(T)]
    # the last row is theta_n itself: shift so that the final point has a = b = 0
    rows = [r - (a[-1] * u + b[-1] * w) for r in rows]
    states = []
    for r in rows:
        parts = torch.split(r, [s.numel() for s in shapes])
        states.append({n: v.reshape(s).float() for n, v, s in zip(named, parts, shapes)})
    return states, u, w, a - a[-1], b - b[-1]


def test_pca_recovers_the_plane_variances_and_path():
    model = models.mlp()
    states, u, w, a, b = _synthetic(model)
    res = pca_directions(states, model=model)
    pc = [torch.cat([t.reshape(-1).double() for t in v]) for v in res.directions.vectors]
    assert abs(float(pc[0] @ u)) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(pc[1] @ w)) == pytest.approx(1.0, abs=1e-5)
    T = len(states)
    var = np.array([a.var(unbiased=True), b.var(unbiased=True)])
    np.testing.assert_allclose(res.explained_variance, var, rtol=1e-4)
    np.testing.assert_allclose(res.explained_variance_ratio, var / var.sum(), rtol=1e-4)
    assert res.singular_values == pytest.approx(np.sqrt(var * (T - 1)), rel=1e-4)
    sign = np.sign([float(pc[0] @ u), float(pc[1] @ w)])
    np.testing.assert_allclose(res.path, np.stack([a, b], 1) * sign, atol=1e-4)
    assert res.path[-1] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert (res.path[0] >= 0).all()  # the sign convention
    assert res.directions.kind == "pca"


def test_pca_sources_agree(tmp_path):
    model = models.mlp()
    states, *_ = _synthetic(model)
    names = [n for n, _ in model.named_parameters()]
    ref = pca_directions(states, model=model)
    flat = np.stack([torch.cat([s[n].reshape(-1).double() for n in names]).numpy()
                     for s in states])
    for i, s in enumerate(states):
        torch.save(s, tmp_path / f"ckpt{i}.pt")
    sources = {
        "array": flat,
        "tuples": [tuple(s[n] for n in names) for s in states],
        "files": [tmp_path / f"ckpt{i}.pt" for i in range(len(states))],
        "final": (states[:-1], states[-1]),
    }
    with RunWriter(tmp_path / "run.h5") as w:
        w.declare("weights", {"theta": (flat.shape[1],)})
        for step, row in enumerate(flat):
            w.append("weights", step * 10, {"theta": row})
    steps, recorded = trajectory_from_run(tmp_path / "run.h5")
    assert list(steps) == [10 * i for i in range(len(states))]
    sources["run"] = recorded
    for label, src in sources.items():
        if label == "final":
            res = pca_directions(src[0], model=model, final=src[1])
        else:
            res = pca_directions(src, model=model)
        np.testing.assert_allclose(res.path, ref.path, atol=1e-5, err_msg=label)
        np.testing.assert_allclose(res.explained_variance_ratio, ref.explained_variance_ratio,
                                   rtol=1e-5, err_msg=label)


def test_pca_ignores_biases_by_default():
    model = models.mlp()
    states, *_ = _synthetic(model)
    for s in states:
        s["0.bias"] = s["0.bias"] + torch.randn(s["0.bias"].shape)
    res = pca_directions(states, model=model)
    assert torch.count_nonzero(res.directions.as_dict(0)["0.bias"]) == 0
    loud = pca_directions(states, model=model, ignore="none")
    assert torch.count_nonzero(loud.directions.as_dict(0)["0.bias"]) > 0


def test_pca_bad_trajectories():
    model = models.mlp()
    states, *_ = _synthetic(model)
    with pytest.raises(LandscapeError, match="at least 2"):
        pca_directions(states[:1], model=model)
    with pytest.raises(ValueError, match="needs model="):
        pca_directions(states)
    with pytest.raises(LandscapeError, match="fewer than 2"):
        pca_directions([states[0], states[-1]], model=model)
    with pytest.raises(LandscapeError, match="no such checkpoint"):
        pca_directions(["/nonexistent/ckpt.pt", states[0]], model=model)


def test_checkpoint_paths_with_the_weights_under_a_key_are_read_as_the_cli_reads_them(
        tmp_path):
    """{"model": state_dict, "step": n} files (as examples/posthoc_cli.py saves them) were
    refused by interpolate and trajectory_plane: 'checkpoints lack parameters'."""
    model = models.mlp()
    x, y = models.classification_data()
    states, *_ = _synthetic(model)
    paths = []
    for i, (key, state) in enumerate(zip(("model", "state_dict", "model_state_dict"), states)):
        paths.append(tmp_path / f"ckpt-{i}.pt")
        torch.save({key: state, "step": i}, paths[-1])
    got = interpolate(model, paths[0], paths[1], F.cross_entropy, (x, y), steps=3,
                      progress=False)
    want = interpolate(model, states[0], states[1], F.cross_entropy, (x, y), steps=3,
                       progress=False)
    np.testing.assert_array_equal(got.values["loss"], want.values["loss"])
    got = trajectory_plane(model, F.cross_entropy, (x, y), paths, steps=3, progress=False)
    want = trajectory_plane(model, F.cross_entropy, (x, y), states[:3], steps=3,
                            progress=False)
    np.testing.assert_array_equal(got.values["loss"], want.values["loss"])


def test_trajectory_plane_is_centred_at_the_final_point_and_stores_the_path():
    model = models.mlp()
    x, y = models.classification_data()
    states, *_ = _synthetic(model)
    arch = models.mlp(seed=3)  # only the architecture; the plane centres on states[-1]
    surf = trajectory_plane(arch, F.cross_entropy, (x, y), states, steps=(7, 5),
                            progress=False)
    # the grid holds the origin, the final point (an even spacing missed it: the centre's
    # loss could not be read off the surface), added where missing
    assert 0.0 in surf.x.tolist() and 0.0 in surf.y.tolist()
    assert surf.shape[0] in (5, 6) and surf.shape[1] in (7, 8)
    last = models.mlp()
    last.load_state_dict(states[-1])
    with torch.no_grad():
        final_loss = float(F.cross_entropy(last(x), y))
    origin = (surf.y.tolist().index(0.0), surf.x.tolist().index(0.0))
    assert surf.values["loss"][origin] == pytest.approx(final_loss, rel=1e-5)
    given = trajectory_plane(arch, F.cross_entropy, (x, y), states, x=[-1.0, 0.0, 2.0],
                             y=[0.0, 0.5], progress=False)  # a TypeError before
    assert given.shape == (2, 3) and given.x.tolist() == [-1.0, 0.0, 2.0]
    path = surf.arrays["trajectory"]
    assert path.shape == (len(states), 2)
    assert surf.x.min() < path[:, 0].min() and surf.x.max() > path[:, 0].max()
    assert surf.y.min() < path[:, 1].min() and surf.y.max() > path[:, 1].max()
    assert sum(surf.attrs["explained_variance_ratio"]) == pytest.approx(1.0, abs=1e-6)
    # the loss at the trajectory's points, evaluated on the plane, equals the checkpoints' loss
    from landscape.surface import Directions, evaluate_grid

    dirs = Directions.from_surface(surf, arch)
    for e in (0, len(states) // 2):
        s = evaluate_grid(arch, F.cross_entropy, (x, y), dirs, [path[e, 0]], [path[e, 1]],
                          center=states[-1], progress=False)
        m = models.mlp()
        m.load_state_dict(states[e])
        with torch.no_grad():
            want = float(F.cross_entropy(m(x), y))
        assert s.values["loss"][0, 0] == pytest.approx(want, rel=1e-4)


def test_project_recovers_coordinates_in_a_random_plane():
    from landscape.surface import random_directions

    model = models.mlp()
    dirs = random_directions(model, 2, seed=1)
    center = {n: p.detach().clone() for n, p in model.named_parameters()}
    coords = [(0.3, -0.2), (1.0, 2.0)]
    points = []
    for a, b in coords:
        pt = dict(center)
        for n, d1, d2 in zip(dirs.names, *dirs.vectors):
            pt[n] = center[n] + a * d1 + b * d2
        points.append(pt)
    np.testing.assert_allclose(project(points, dirs, center), coords, atol=1e-5)


def _bn_net():
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _bn_trajectory(steps=4):
    """A BatchNorm MLP trained ``steps`` SGD steps: the model, its data and each step's state."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 5) * 3 + 1, torch.randint(0, 3, (64,))
    model = _bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    states = []
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, x, y, states


def test_trajectory_plane_takes_the_last_checkpoints_buffers_too(tmp_path):
    """A fresh model as the architecture (as for interpolate): the centre mixed the last
    checkpoint's weights with the fresh model's BatchNorm statistics."""
    model, x, y, states = _bn_trajectory()
    net = _bn_net
    paths = []
    for step, state in enumerate(states):
        paths.append(tmp_path / f"c{step}.pt")
        torch.save(state, paths[-1])
    loads = []
    real_load = torch.load

    def counting_load(path, *args, **kwargs):
        loads.append(os.fspath(path))
        return real_load(path, *args, **kwargs)

    with mock.patch.object(torch, "load", counting_load):
        fresh = trajectory_plane(net(), F.cross_entropy, (x, y), paths, steps=3,
                                 progress=False)
    assert sorted(loads) == sorted(os.fspath(p) for p in paths)  # each checkpoint once
    at_last = trajectory_plane(model, F.cross_entropy, (x, y), paths, steps=3, progress=False)
    np.testing.assert_allclose(fresh.values["loss"], at_last.values["loss"], rtol=1e-6)


def test_recorded_weights_with_a_fresh_models_statistics_are_warned_about():
    """A (T, P) array carries no BatchNorm statistics: with a fresh model the plane took
    its statistics silently, and the loss at the origin was not the last point's."""
    model, x, y, states = _bn_trajectory()
    net = _bn_net
    names = [n for n, _ in model.named_parameters()]
    weights = np.stack([torch.cat([state[n].reshape(-1) for n in names]).numpy()
                        for state in states])
    with pytest.warns(UserWarning, match=r"buffers of `model` \(1.running_mean, 1.running_var"):
        trajectory_plane(net(), F.cross_entropy, (x, y), weights, steps=3, progress=False)
    # the trained model, its statistics theta_n's: no warning, and the origin is its loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        surf = trajectory_plane(model, F.cross_entropy, (x, y), weights, steps=3,
                                progress=False)
    with warnings.catch_warnings():  # recorded in half precision: still the same weights
        warnings.simplefilter("error")
        trajectory_plane(model, F.cross_entropy, (x, y), weights.astype(np.float16), steps=3,
                         progress=False)
    model.eval()
    with torch.no_grad():
        origin = surf.values["loss"][list(surf.y).index(0.0), list(surf.x).index(0.0)]
        assert origin == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-6)
    # no floating buffers: nothing to say
    plain = nn.Sequential(nn.Linear(5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trajectory_plane(plain, F.cross_entropy, (x, y), np.random.default_rng(0).normal(
            size=(4, 18)), steps=3, progress=False)


def test_wrapped_checkpoints_and_modules_give_the_plane_of_plain_state_dicts(tmp_path):
    """Untested until the coverage audit: {"state_dict": ...} files (Lightning's layout),
    modules without model=, and state dicts without it (refused, naming model=)."""
    model, (x, y) = models.mlp(), models.classification_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    plain, wrapped, modules = [], [], []
    for e in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        plain.append(tmp_path / f"p{e}.pt")
        torch.save(model.state_dict(), plain[-1])
        wrapped.append(tmp_path / f"w{e}.pt")
        torch.save({"state_dict": model.state_dict(), "epoch": e}, wrapped[-1])
        modules.append(models.mlp())
        modules[-1].load_state_dict(model.state_dict())
    a = trajectory_plane(models.mlp(seed=3), F.cross_entropy, (x, y), plain, steps=3,
                         progress=False)
    b = trajectory_plane(models.mlp(seed=3), F.cross_entropy, (x, y), wrapped, steps=3,
                         progress=False)
    np.testing.assert_allclose(b.values["loss"], a.values["loss"], rtol=1e-12)
    np.testing.assert_allclose(b.arrays["trajectory"], a.arrays["trajectory"], rtol=1e-12)
    np.testing.assert_allclose(pca_directions(modules).path, a.arrays["trajectory"],
                               rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="needs model= to pick the trainable parameters"):
        pca_directions([torch.load(p) for p in plain])


@pytest.mark.parametrize("bad", [{"margin": -2.0}, {"margin": float("nan")}, {"steps": 1},
                                 {"steps": (5, 0)}])
def test_trajectory_plane_refuses_a_grid_that_cannot_cover_the_path(bad):
    """margin=-2 gave a descending axis that missed the path; steps=0 an IndexError."""
    model = models.mlp()
    x, y = models.classification_data()
    states, *_ = _synthetic(model)
    with pytest.raises(ValueError, match=r"margin must be|steps must be"):
        trajectory_plane(models.mlp(seed=3), F.cross_entropy, (x, y), states, progress=False,
                         **bad)


def test_trajectory_plane_takes_integer_margins_and_given_coordinates_without_steps():
    model = models.mlp()
    x, y = models.classification_data()
    states, *_ = _synthetic(model)
    surf = trajectory_plane(models.mlp(seed=3), F.cross_entropy, (x, y), states,
                            margin=np.int64(0), steps=1, x=[-1.0, 0.0], y=[0.0, 1.0],
                            progress=False)
    assert surf.values["loss"].shape == (2, 2)


def test_trajectory_plane_needs_no_steps_on_an_axis_whose_coordinates_are_given():
    model = models.mlp()
    x, y = models.classification_data()
    states, *_ = _synthetic(model)
    arch = models.mlp(seed=3)
    both = trajectory_plane(arch, F.cross_entropy, (x, y), states, steps=None,
                            x=[-1.0, 0.0], y=[0.0, 1.0], progress=False)
    assert both.values["loss"].shape == (2, 2)
    one = trajectory_plane(arch, F.cross_entropy, (x, y), states, steps=(1, 3), x=[0.0, 1.0],
                           progress=False)
    assert one.values["loss"].shape[1] == 2 and one.values["loss"].shape[0] in (3, 4)  # (+0)
    with pytest.raises(ValueError, match="steps must be"):
        trajectory_plane(arch, F.cross_entropy, (x, y), states, steps=(3, 1), x=[0.0, 1.0],
                         progress=False)
