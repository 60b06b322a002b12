"""Grid evaluation: center, isolation, resume, analytic surfaces, orientation, data forms."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape import LandscapeError
from landscape.store import Run, RunWriter
from landscape.surface import (
    as_directions,
    evaluate_grid,
    interpolate,
    line,
    plane,
    random_directions,
)
from tests import models


def _ce(out, y):
    return F.cross_entropy(out, y)


def test_grid_center_equals_the_models_loss_and_accuracy():
    model = models.cnn_bn()
    x, y = models.image_data()
    surf = plane(model, _ce, (x, y), steps=(5, 3), span=(1.0, 0.5), progress=False)
    model.eval()
    with torch.no_grad():
        out = model(x)
    want = float(F.cross_entropy(out, y))
    assert surf.shape == (3, 5)
    assert surf.values["loss"][1, 2] == pytest.approx(want, rel=1e-6)
    acc = float((out.argmax(1) == y).float().mean())
    assert surf.values["accuracy"][1, 2] == pytest.approx(acc)
    assert surf.complete and surf.attrs["eval_mode"] is True


def _snapshot(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "objects": [(n, p) for n, p in model.named_parameters()]
        + [(n, b) for n, b in model.named_buffers()],
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": [m.training for m in model.modules()],
        "grads": [p.grad for p in model.parameters()],
        "grad_values": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "flags": [p.requires_grad for p in model.parameters()],
        "rng": torch.get_rng_state(),
    }


def _assert_same(model, snap):
    now = [(n, p) for n, p in model.named_parameters()] + list(model.named_buffers())
    assert [n for n, _ in now] == [n for n, _ in snap["objects"]]
    assert all(a is b for (_, a), (_, b) in zip(now, snap["objects"]))  # the same objects
    for n, p in model.named_parameters():
        assert isinstance(p, nn.Parameter)
        assert torch.equal(p, snap["params"][n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, snap["buffers"][n]), n
    assert [m.training for m in model.modules()] == snap["modes"]
    for p, g, v in zip(model.parameters(), snap["grads"], snap["grad_values"]):
        assert p.grad is g
        if g is not None:
            assert torch.equal(p.grad, v)
    assert [p.requires_grad for p in model.parameters()] == snap["flags"]
    assert torch.equal(torch.get_rng_state(), snap["rng"])


@pytest.mark.parametrize("eval_mode", [True, False])
def test_the_model_is_unchanged_afterwards(eval_mode):
    model = models.cnn_bn()
    model.train()  # dropout and BatchNorm active
    x, y = models.image_data()
    model.conv.weight.grad = torch.ones_like(model.conv.weight)
    model.fc.bias.requires_grad_(False)
    snap = _snapshot(model)
    surf = plane(model, _ce, (x, y), steps=3, span=0.5, eval_mode=eval_mode, progress=False)
    assert surf.complete
    _assert_same(model, snap)


def test_the_model_is_unchanged_when_the_loss_raises():
    model = models.cnn_bn().train()
    x, y = models.image_data()
    snap = _snapshot(model)

    def bad(out, target):
        torch.rand(3)  # consumes RNG inside
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        plane(model, bad, (x, y), steps=3, span=0.5, progress=False)
    _assert_same(model, snap)


class _Counting:
    """A loss that counts its calls and raises after ``fail_after`` of them."""

    def __init__(self, fail_after=None):
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, out, target):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("interrupted")
        self.calls += 1
        return F.cross_entropy(out, target)


def test_resume_computes_only_the_missing_points(tmp_path):
    path = tmp_path / "run.h5"
    model = models.mlp()
    x, y = models.classification_data()
    first = _Counting(fail_after=8)  # the loss at the centre (checked on resume), 7 points
    with pytest.raises(KeyboardInterrupt):
        plane(model, first, (x, y), steps=(4, 3), span=1.0, writer=path, seed=1, progress=False)
    with Run.open(path) as run:
        part = run.surface("plane")
    assert int(part.done.sum()) == 7
    assert np.isnan(part.values["loss"][~part.done]).all()
    assert np.isfinite(part.values["loss"][part.done]).all()

    second = _Counting()
    done = plane(model, second, (x, y), steps=(4, 3), span=1.0, writer=path, seed=1,
                 progress=False)
    assert second.calls == 1 + 12 - 7
    assert done.complete
    fresh = plane(model, _ce, (x, y), steps=(4, 3), span=1.0, seed=1, progress=False)
    np.testing.assert_allclose(done.values["loss"], fresh.values["loss"], rtol=1e-6)
    np.testing.assert_array_equal(done.values["loss"][part.done], part.values["loss"][part.done])

    third = _Counting()
    plane(model, third, (x, y), steps=(4, 3), span=1.0, writer=path, seed=1, progress=False)
    assert third.calls == 1  # nothing left to compute but the centre's check


def test_resume_refuses_other_directions_or_center(tmp_path):
    path = tmp_path / "run.h5"
    model = models.mlp()
    x, y = models.classification_data()
    line(model, _ce, (x, y), steps=5, writer=path, seed=1, progress=False)
    with pytest.raises(LandscapeError, match="other directions"):
        line(model, _ce, (x, y), steps=5, writer=path, seed=2, progress=False)
    with torch.no_grad():
        model[0].bias.add_(1.0)  # directions (biasbn) unchanged, the center moved
    with pytest.raises(LandscapeError, match="other parameters"):
        line(model, _ce, (x, y), steps=5, writer=path, seed=1, progress=False)


def test_resume_refuses_other_data_or_another_loss(tmp_path):
    """Only the centre, directions and mode were compared: the same name on other data
    returned the stored surface, and a resumed one mixed the two data sets' points."""
    path = tmp_path / "run.h5"
    model = models.mlp()
    x, y = models.classification_data(24)
    half = line(model, _ce, (x, y), steps=7, writer=path, seed=1, progress=False)
    x2, y2 = models.classification_data(24, seed=5)
    with pytest.raises(LandscapeError, match="other data or another loss function"):
        line(model, _ce, (x2, y2), steps=7, writer=path, seed=1, progress=False)

    def smoothed(out, t):
        return F.cross_entropy(out, t, label_smoothing=0.1)

    with pytest.raises(LandscapeError, match="other data or another loss function"):
        line(model, smoothed, (x, y), steps=7, writer=path, seed=1, progress=False)
    # the same data as a loader of two batches: the same loss, a resume
    again = line(model, _ce, [(x[:12], y[:12]), (x[12:], y[12:])], steps=7, writer=path,
                 seed=1, progress=False)
    np.testing.assert_allclose(again.values["loss"], half.values["loss"], rtol=1e-12)
    # a list of batches is the same data at every pass: other data are refused (they were
    # resumed with a warning, a surface of two data sets)
    with pytest.raises(LandscapeError, match="other data or another loss function"):
        line(model, _ce, [(x2[:12], y2[:12]), (x2[12:], y2[12:])], steps=7, writer=path,
             seed=1, progress=False)
    # a loader may shuffle or augment: another loss at the centre is said, not refused
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x2, y2), batch_size=12)
    with pytest.warns(RuntimeWarning, match="a loader that shuffles or augments; resuming"):
        line(model, _ce, loader, steps=7, writer=path, seed=1, progress=False)


def test_a_dropout_surface_in_train_mode_resumes_whatever_the_callers_rng(tmp_path):
    """The centre's loss drew dropout from the caller's RNG: a resume after another seed
    was refused as other data."""
    path = tmp_path / "run.h5"
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 3))
    x, y = models.classification_data(24)
    torch.manual_seed(1)
    line(model, _ce, (x, y), steps=5, writer=path, eval_mode=False, progress=False)
    torch.manual_seed(123)
    line(model, _ce, (x, y), steps=5, writer=path, eval_mode=False, progress=False)


class _Quadratic(nn.Module):
    """A model whose output is its parameter: L = 0.5 (theta - theta*)^T H (theta - theta*)."""

    def __init__(self, theta0):
        super().__init__()
        self.theta = nn.Parameter(theta0.clone())

    def forward(self, _x):
        return self.theta


def test_a_quadratic_loss_gives_the_analytic_surface():
    g = torch.Generator().manual_seed(0)
    p = 6
    a = torch.randn(p, p, generator=g, dtype=torch.float64)
    H = a @ a.T + 0.1 * torch.eye(p, dtype=torch.float64)
    star = torch.randn(p, generator=g, dtype=torch.float64)
    model = _Quadratic(torch.randn(p, generator=g, dtype=torch.float64).reshape(2, 3))

    def loss(theta, _t):
        r = theta.reshape(-1) - star
        return 0.5 * r @ H @ r

    d = torch.randn(2, 3, generator=g, dtype=torch.float64)
    e = torch.randn(2, 3, generator=g, dtype=torch.float64)
    dirs = as_directions(model, [(d,), (e,)])
    xs, ys = np.linspace(-1.5, 1.0, 6), np.linspace(-0.5, 2.0, 4)
    surf = evaluate_grid(model, loss, (torch.zeros(1), torch.zeros(1)), dirs, xs, ys,
                         progress=False)
    r0 = model.theta.detach().reshape(-1) - star
    dv, ev = d.reshape(-1), e.reshape(-1)
    for j, b in enumerate(ys):
        for i, al in enumerate(xs):
            r = r0 + al * dv + b * ev
            assert surf.values["loss"][j, i] == pytest.approx(float(0.5 * r @ H @ r), rel=1e-12)
    # at a minimum the 2-D surface is ½[α β] Q [α β]ᵀ, Q the Hessian restricted to the plane
    with torch.no_grad():
        model.theta.copy_(star.reshape(2, 3))
    surf = evaluate_grid(model, loss, (torch.zeros(1), torch.zeros(1)), dirs, xs, ys,
                         progress=False)
    M = torch.tensor([[dv @ H @ dv, dv @ H @ ev], [ev @ H @ dv, ev @ H @ ev]])
    for j, b in enumerate(ys):
        for i, al in enumerate(xs):
            c = torch.tensor([al, b], dtype=torch.float64)
            assert surf.values["loss"][j, i] == pytest.approx(float(0.5 * c @ M @ c), rel=1e-10)


def test_a_non_square_grid_is_not_transposed():
    """Z[j, i] = f(x_i, y_j); a loss depending on alpha only has constant columns."""
    model = _Quadratic(torch.zeros(2, dtype=torch.float64).reshape(1, 2))

    def loss(theta, _t):
        return theta[0, 0] ** 2 + 10 * theta[0, 1]  # x moves theta[0,0], y moves theta[0,1]

    dirs = as_directions(model, [(torch.tensor([[1.0, 0.0]]),), (torch.tensor([[0.0, 1.0]]),)])
    xs, ys = np.linspace(-2, 2, 5), np.linspace(0, 1, 3)
    surf = evaluate_grid(model, loss, (torch.zeros(1), torch.zeros(1)), dirs, xs, ys,
                         progress=False)
    z = surf.values["loss"]
    assert z.shape == (3, 5)
    np.testing.assert_allclose(z, xs[None, :] ** 2 + 10 * ys[:, None], rtol=1e-12)
    # and a loss of alpha alone: every row (along y) is the same curve
    surf = evaluate_grid(model, lambda t, _y: t[0, 0] ** 2, (torch.zeros(1), torch.zeros(1)),
                         dirs, xs, ys, progress=False, name="alpha")
    np.testing.assert_allclose(surf.values["loss"], np.tile(xs**2, (3, 1)))


def test_a_loader_gives_the_size_weighted_mean_of_one_big_batch():
    model = models.mlp()
    x, y = models.classification_data(n=20)
    batches = [(x[:7], y[:7]), (x[7:16], y[7:16]), (x[16:], y[16:])]
    dirs = random_directions(model, 2, seed=0)
    whole = evaluate_grid(model, _ce, (x, y), dirs, [-0.5, 0.0, 0.5], [0.0, 1.0],
                          progress=False)
    parts = evaluate_grid(model, _ce, batches, dirs, [-0.5, 0.0, 0.5], [0.0, 1.0],
                          progress=False)
    gen = evaluate_grid(model, _ce, iter(batches), dirs, [-0.5, 0.0, 0.5], [0.0, 1.0],
                        progress=False)
    for f in ("loss", "accuracy"):
        np.testing.assert_allclose(parts.values[f], whole.values[f], rtol=1e-6)
        np.testing.assert_allclose(gen.values[f], whole.values[f], rtol=1e-6)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6,
                                         shuffle=True)
    rng = torch.get_rng_state()
    dl = evaluate_grid(model, _ce, loader, dirs, [-0.5, 0.0, 0.5], [0.0, 1.0], progress=False)
    assert torch.equal(torch.get_rng_state(), rng)  # shuffling drew from a forked RNG
    np.testing.assert_allclose(dl.values["loss"], whole.values["loss"], rtol=1e-6)


def test_an_empty_batch_among_the_batches_weighs_nothing():
    """An empty batch after the first made every point NaN (its mean loss is 0/0), each
    marked computed, so a resume never redid them (review)."""
    model = models.mlp()
    x, y = models.classification_data(n=20)
    dirs = random_directions(model, 1, seed=0)
    whole = evaluate_grid(model, _ce, (x, y), dirs, [-0.5, 0.0, 0.5], progress=False)
    for batches in ([(x[:12], y[:12]), (x[12:12], y[12:12]), (x[12:], y[12:])],
                    [(x[:12], y[:12]), (x[12:], y[12:]), (x[:0], y[:0])]):
        parts = evaluate_grid(model, _ce, batches, dirs, [-0.5, 0.0, 0.5], progress=False)
        for f in ("loss", "accuracy"):
            np.testing.assert_allclose(parts.values[f], whole.values[f], rtol=1e-6)


def test_batch_size_weighs_batches_whose_first_tensor_the_samples_share():
    """A dict batch whose first tensor is shared (a table) gave batches of 16 and 4
    samples equal weights: the centre was 1.071 where the loss is 1.107, and surfaces had
    no batch_size= as the curvature operators have (review)."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))

    def closure(m, b):
        return F.cross_entropy(m(b["x"]) @ b["table"], b["y"])

    table = torch.eye(3)
    batches = [{"table": table, "x": x[:16], "y": y[:16]},
               {"table": table, "x": x[16:], "y": y[16:]}]
    whole = line(model, closure, {"table": table, "x": x, "y": y}, steps=3, progress=False)
    equal = line(model, closure, batches, steps=3, progress=False)  # the documented rule
    assert abs(equal.values["loss"][1] - whole.values["loss"][1]) > 1e-3
    for size in (lambda b: len(b["y"]), lambda b: np.int64(len(b["y"])),
                 lambda b: torch.tensor(len(b["y"]))):
        weighted = line(model, closure, batches, steps=3, progress=False, batch_size=size)
        np.testing.assert_allclose(weighted.values["loss"], whole.values["loss"], rtol=1e-6)
    # eigen directions: the Hessian of the loss the grid evaluates, same weights (review)
    from landscape.surface import eigen_directions

    sizes = lambda b: len(b["y"])  # noqa: E731
    eigen = line(model, closure, batches, steps=3, progress=False, batch_size=sizes,
                 directions="eigen")
    weighted = eigen_directions(model, closure, batches, 1, batch_size=sizes)
    given = line(model, closure, batches, steps=3, progress=False, batch_size=sizes,
                 directions=weighted)
    np.testing.assert_allclose(eigen.values["loss"], given.values["loss"], rtol=1e-5)
    equal = eigen_directions(model, closure, batches, 1)  # (a list of dict batches: closure)
    assert abs(weighted.attrs["eigenvalues"][0] - equal.attrs["eigenvalues"][0]) > 1e-3
    with pytest.raises(ValueError, match="batch_size must be a function"):
        line(model, closure, batches, steps=3, progress=False, batch_size=16)
    with pytest.raises(ValueError, match=r"must return a whole size >= 0 or None, got "
                                         r"float 2.5"):
        line(model, closure, batches, steps=3, progress=False, batch_size=lambda b: 2.5)


def test_a_loss_that_is_not_a_scalar_is_refused_in_one_line():
    """reduction="none" failed in torch's words: "only one element tensors can be
    converted to Python scalars", or "shape '[]' is invalid" over several batches."""
    model = models.mlp()
    x, y = models.classification_data(n=12)
    per_sample = nn.CrossEntropyLoss(reduction="none")
    for data in ((x, y), [(x[:6], y[:6]), (x[6:], y[6:])]):
        with pytest.raises(ValueError, match="the loss must be a scalar tensor"):
            line(model, per_sample, data, steps=3, progress=False)
    # a closure's loss as a Python number (loss.item()) is one number per batch: taken
    whole = line(model, _ce, (x, y), steps=3, progress=False)
    for data in ({"x": x, "y": y}, [{"x": x[:6], "y": y[:6]}, {"x": x[6:], "y": y[6:]}]):
        as_number = line(model, lambda m, b: _ce(m(b["x"]), b["y"]).item(), data, steps=3,
                         closure=True, progress=False)
        np.testing.assert_allclose(as_number.values["loss"], whole.values["loss"], rtol=1e-6)


def test_closure_losses_on_dict_batches_and_no_accuracy():
    model = models.TinyTransformer()
    batch = models.token_data()
    surf = line(model, models.lm_loss, batch, steps=3, span=0.5, progress=False)
    assert list(surf.values) == ["loss"]
    model.eval()
    with torch.no_grad():
        want = float(models.lm_loss(model, batch))
    assert surf.values["loss"][1] == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="accuracy"):
        line(model, models.lm_loss, batch, steps=3, accuracy=True, progress=False)


def test_float_targets_store_no_accuracy_and_mse_works():
    model = models.mlp(d_out=2)
    x = torch.randn(8, 6)
    t = torch.randn(8, 2)
    surf = line(model, F.mse_loss, (x, t), steps=3, progress=False)
    assert list(surf.values) == ["loss"]


def test_bad_input_is_named():
    model = models.mlp()
    x, y = models.classification_data()
    dirs = random_directions(model, 2)
    with pytest.raises(ValueError, match="pass y="):
        evaluate_grid(model, _ce, (x, y), dirs, [0.0])
    with pytest.raises(ValueError, match="x must be"):
        evaluate_grid(model, _ce, (x, y), dirs, [], [0.0])
    # coordinates out of order: every plot and the VTK grid drew them in the order given
    for xs, ys in (([0.5, -0.5, 0.0], [0.0]), ([0.0], [1.0, 1.0]), ([0.0, 0.0], [0.0])):
        with pytest.raises(ValueError, match="must be strictly increasing"):
            evaluate_grid(model, _ce, (x, y), dirs, xs, ys)
    with pytest.raises(ValueError, match="x must be strictly increasing"):
        line(model, _ce, (x, y), x=[0.5, -0.5, 0.0, 1.0, -1.0], progress=False)
    with pytest.raises(ValueError, match="steps"):
        plane(model, _ce, (x, y), steps=0)
    with pytest.raises(ValueError, match="span"):
        plane(model, _ce, (x, y), span=-1)
    with pytest.raises(ValueError, match="no batches"):
        evaluate_grid(model, _ce, [], dirs, [0.0], [0.0])
    with pytest.raises(ValueError, match="writer"):
        evaluate_grid(model, _ce, (x, y), dirs, [0.0], [0.0], writer=3)


def test_progress_bar_writes_to_stderr_and_can_be_disabled(capsys, monkeypatch):
    import landscape._progress as progress

    model = models.mlp()
    x, y = models.classification_data()
    line(model, _ce, (x, y), steps=3, progress=True)
    assert capsys.readouterr().err == ""  # a log: nothing for work under LOG_INTERVAL
    monkeypatch.setattr(progress, "interactive", lambda: True)  # a terminal
    line(model, _ce, (x, y), steps=3, progress=True)
    assert "surface line" in capsys.readouterr().err
    line(model, _ce, (x, y), steps=3, progress=False)
    assert capsys.readouterr().err == ""


def test_interpolation_endpoints_are_the_two_checkpoints(tmp_path):
    a, b = models.cnn_bn(seed=0), models.cnn_bn(seed=1)
    with torch.no_grad():
        b.bn.running_mean.add_(1.0)
    x, y = models.image_data()
    torch.save(b.state_dict(), tmp_path / "b.pt")
    arch = models.cnn_bn(seed=5)
    snap = _snapshot(arch)
    surf = interpolate(arch, a.state_dict(), tmp_path / "b.pt", _ce, (x, y), steps=5,
                       bounds=(0.0, 1.0), writer=tmp_path / "run.h5", progress=False)
    _assert_same(arch, snap)
    want = []
    for m in (a, b):
        m.eval()
        with torch.no_grad():
            want.append(float(F.cross_entropy(m(x), y)))
    assert surf.values["loss"][0] == pytest.approx(want[0], rel=1e-6)
    assert surf.values["loss"][-1] == pytest.approx(want[1], rel=1e-6)
    assert surf.attrs["directions"]["kind"] == "interpolation"
    assert "bn.running_mean" in surf.attrs["buffer_names"]
    # without buffer interpolation theta_b's weights meet theta_a's statistics
    nobuf = interpolate(arch, a, b, _ce, (x, y), x=[1.0], buffers=False, progress=False)
    assert nobuf.values["loss"][0] != pytest.approx(want[1], rel=1e-6)
    # a DDP model's state dict (module.-prefixed keys) is read as the model's (it was
    # "checkpoints lack parameters"), and so is torch.compile's _orig_mod.
    wrapped = {f"module.{k}": v for k, v in a.state_dict().items()}
    compiled = {f"_orig_mod.{k}": v for k, v in b.state_dict().items()}
    again = interpolate(arch, wrapped, compiled, _ce, (x, y), steps=5, bounds=(0.0, 1.0),
                        progress=False)
    np.testing.assert_array_equal(again.values["loss"], surf.values["loss"])


def test_the_default_interpolation_evaluates_both_checkpoints_and_stays_finite():
    """The default 51 points on (-0.5, 1.5) missed alpha = 0 and 1; extrapolated BatchNorm
    variances crossed zero beyond them and the loss was NaN there."""
    a, b = models.cnn_bn(seed=0), models.cnn_bn(seed=1)
    with torch.no_grad():
        a.bn.running_var.fill_(0.2)
        b.bn.running_var.fill_(1.0)  # alpha < -0.25 extrapolates a negative variance
    x, y = models.image_data()
    surf = interpolate(models.cnn_bn(seed=5), a, b, _ce, (x, y), progress=False)
    assert len(surf.x) == 53 and {0.0, 1.0} <= set(surf.x.tolist())
    assert np.isfinite(surf.values["loss"]).all()
    want = []
    for m in (a, b):
        m.eval()
        with torch.no_grad():
            want.append(float(F.cross_entropy(m(x), y)))
    got = dict(zip(surf.x.tolist(), surf.values["loss"].tolist()))
    assert got[0.0] == pytest.approx(want[0], rel=1e-6)
    assert got[1.0] == pytest.approx(want[1], rel=1e-6)


def test_an_extrapolated_variance_is_held_at_the_smaller_checkpoints_value():
    """Clamped at 0 it made a cliff past theta_b (BatchNorm dividing by sqrt(eps)): a loss of
    67 at alpha 1.1 where the weights there with theta_b's statistics gave 0.018."""
    a, b = models.cnn_bn(seed=0), models.cnn_bn(seed=1)
    with torch.no_grad():
        a.bn.running_var.copy_(torch.tensor([1.0, 2.0, 0.5]))
        b.bn.running_var.copy_(torch.tensor([0.2, 2.5, 0.6]))  # the first shrinks 5-fold
    x, y = models.image_data()
    alphas = [-0.5, 0.5, 1.5]
    surf = interpolate(models.cnn_bn(seed=5), a, b, _ce, (x, y), x=alphas, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    for alpha, got in zip(alphas, surf.values["loss"]):
        m = models.cnn_bn(seed=5)
        state = {k: sa[k] + alpha * (sb[k] - sa[k]) if sa[k].is_floating_point() else sa[k]
                 for k in sa}
        low = torch.minimum(sa["bn.running_var"], sb["bn.running_var"])
        state["bn.running_var"] = torch.maximum(state["bn.running_var"], low)
        m.load_state_dict(state)
        m.eval()
        with torch.no_grad():
            assert got == pytest.approx(float(F.cross_entropy(m(x), y)), rel=1e-5), alpha
    # at 1.5 the first channel's variance extrapolates to -0.2 and is held at 0.2; the
    # other two stay as extrapolated (2.75 and 0.65), and at -0.5 none is held (1.4, ...)


def test_an_interpolation_begun_on_the_even_grid_resumes_on_it(tmp_path):
    """Resuming one begun before 0 and 1 were added: 'already exists with a different grid'."""
    a, b = models.mlp(seed=0), models.mlp(seed=1)
    x, y = models.classification_data()
    path = tmp_path / "run.h5"
    even = np.linspace(-0.5, 1.5, 51)
    with pytest.raises(KeyboardInterrupt):  # as an earlier version began it
        interpolate(models.mlp(seed=5), a, b, _Counting(fail_after=6), (x, y), x=even,
                    writer=path, progress=False)
    surf = interpolate(models.mlp(seed=5), a, b, _ce, (x, y), writer=path, progress=False)
    np.testing.assert_array_equal(surf.x, even)
    assert surf.complete


def test_written_into_the_writer_given(tmp_path):
    with RunWriter(tmp_path / "run.h5") as w:
        model = models.mlp()
        x, y = models.classification_data()
        line(model, _ce, (x, y), steps=3, writer=w, name="a", progress=False)
        line(model, _ce, (x, y), steps=3, writer=w, name="b", seed=4, progress=False)
    with Run.open(tmp_path / "run.h5") as run:
        assert run.surfaces() == ["a", "b"]
        assert run.surface("b").attrs["directions"]["seed"] == 4


def test_resume_around_another_checkpoint_says_so_not_other_directions(tmp_path):
    # filter-normalized directions follow the weights: scaled weights (another checkpoint)
    # give other directions too, but the cause to name is the centre
    path = tmp_path / "run.h5"
    model = models.mlp()
    x, y = models.classification_data()
    line(model, _ce, (x, y), steps=5, writer=path, seed=1, progress=False)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    with pytest.raises(LandscapeError, match=r"around other parameters \(another checkpoint\)"):
        line(model, _ce, (x, y), steps=5, writer=path, seed=1, progress=False)


def test_directions_normalized_to_overflowing_weights_are_refused(tmp_path):
    # a weight row whose norm overflows float32 gives inf/NaN directions: a grid of NaN,
    # and a resume check that NaN fingerprints always fail ("exists ... other directions")
    path = tmp_path / "run.h5"
    model = models.mlp()
    x, y = models.classification_data()
    with torch.no_grad():
        model[2].weight[0].fill_(3e38)  # finite; its norm and the direction scaled to it are not
    with pytest.raises(LandscapeError, match=r"directions are not finite \(filter normalization"):
        plane(model, _ce, (x, y), steps=3, writer=path, progress=False)
    assert not path.exists() or "plane" not in Run.open(path).surfaces()
    with pytest.raises(LandscapeError, match="directions are not finite"):
        plane(model, _ce, (x, y), steps=3, progress=False)  # in memory as well


def test_a_single_logit_has_no_accuracy():
    """argmax over one logit is always class 0: the 'accuracy' was the share of label 0."""
    model = models.mlp(d_out=1)
    x = torch.randn(16, 6)
    y = (x[:, 0] > 0).long()
    surf = line(model, lambda out, t: F.binary_cross_entropy_with_logits(out[:, 0], t.float()),
                (x, y), steps=3, progress=False)
    assert np.isnan(surf.values["accuracy"]).all()


def test_eigen_directions_use_the_grids_closure_and_mode():
    """directions='eigen' guessed the loss convention from the data (a dict), so a closure on
    tuple batches, or on a list of dict batches, raised where random directions worked."""
    # closure=True: loss_fn is called as loss_fn(model, batch)
    torch.manual_seed(0)
    model = models.mlp()
    x, y = models.classification_data()
    batches = [{"x": x[:8], "y": y[:8]}, {"x": x[8:], "y": y[8:]}]

    def closure(m, b):
        return F.cross_entropy(m(b["x"]), b["y"])

    surf = line(model, closure, batches, steps=3, directions="eigen", closure=True,
                progress=False)
    model.eval()
    with torch.no_grad():
        want = (closure(model, batches[0]) + closure(model, batches[1])) / 2
    assert surf.values["loss"][1] == pytest.approx(float(want), rel=1e-6)
    tuple_closure = line(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y), steps=3,
                         directions="eigen", closure=True, progress=False)
    assert tuple_closure.values["loss"][1] == pytest.approx(
        float(F.cross_entropy(model(x), y)), rel=1e-6)


def test_directions_given_as_an_object_or_vectors_give_the_random_plane():
    """Documented, untested until the coverage audit: directions= other than a name."""
    model = models.mlp()
    x, y = models.classification_data()
    want = plane(model, _ce, (x, y), steps=3, seed=4, progress=False)
    dirs = random_directions(model, 2, seed=4)
    by_object = plane(model, _ce, (x, y), steps=3, directions=dirs, progress=False)
    by_vectors = plane(model, _ce, (x, y), steps=3, directions=list(dirs.vectors),
                       progress=False)
    for got in (by_object, by_vectors):
        np.testing.assert_allclose(got.values["loss"], want.values["loss"], rtol=1e-12)
    with pytest.raises(ValueError, match="1 given, 2 needed"):
        plane(model, _ce, (x, y), steps=3, directions=random_directions(model, 1),
              progress=False)
    with pytest.raises(ValueError, match="must be 'random', 'eigen' or vectors"):
        plane(model, _ce, (x, y), steps=3, directions="pca", progress=False)


@pytest.mark.parametrize("batches", [1, 2])
def test_the_accuracy_of_a_model_returning_a_dict_or_tuple_reads_its_logits(batches):
    """Surfaces stored NaN accuracy, silently, for a dict's "logits" (model-structures
    audit); a tuple's first tensor may be features, and keeps NaN (review)."""
    class Net(nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.a, self.kind = nn.Linear(3, 3), kind

        def forward(self, x):
            out = self.a(x)
            return {"logits": out} if self.kind == "dict" else \
                (out, x.sum()) if self.kind == "tuple" else out

    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randint(0, 3, (16,))
    data = (x, y) if batches == 1 else [(x[:8], y[:8]), (x[8:], y[8:])]
    plain = Net("tensor")
    accuracy = line(plain, F.cross_entropy, data, steps=5, progress=False,
                            seed=3).values["accuracy"]
    assert np.isfinite(accuracy).all()
    for kind, read in (("dict", lambda o: o["logits"]), ("tuple", lambda o: o[0])):
        model = Net(kind)
        model.load_state_dict(plain.state_dict())
        got = line(model, lambda o, t, read=read: F.cross_entropy(read(o), t), data,
                           steps=5, progress=False, seed=3).values["accuracy"]
        if kind == "dict":
            np.testing.assert_array_equal(got, accuracy)
        else:  # a tuple's first tensor may be features ((features, logits)): no accuracy
            assert np.isnan(got).all()


@pytest.mark.parametrize("steps", [0, 1, -5, 2.5, True])
def test_an_interpolation_of_fewer_than_two_points_is_refused(steps):
    """steps=0 was a bare IndexError, -5 numpy's error, and 1 evaluated alpha = -0.5 alone
    (the docs promise both checkpoints)."""
    a, b = models.mlp(seed=1), models.mlp(seed=2)
    x, y = models.classification_data()
    with pytest.raises(ValueError, match="steps must be an integer >= 2"):
        interpolate(models.mlp(), a, b, _ce, (x, y), steps=steps, progress=False)


@pytest.mark.parametrize("call", [plane, line])
@pytest.mark.parametrize("directions", ["eigen", "vectors"])
def test_normalization_of_directions_that_are_not_random_is_refused(call, directions):
    """They were ignored without a word: eigenvectors and given vectors are used as they are."""
    model = models.mlp()
    x, y = models.classification_data()
    n = 2 if call is plane else 1
    if directions == "vectors":
        directions = random_directions(model, n, seed=1).vectors
    for option in ({"normalization": "filter"}, {"ignore": "biasbn"}):
        with pytest.raises(ValueError, match="applies to random directions only"):
            call(model, _ce, (x, y), 3, directions=directions, progress=False, **option)
    # the defaults stay usable with every kind
    assert call(model, _ce, (x, y), 3, directions=directions, progress=False).values


def test_a_surface_begun_with_the_earlier_draw_says_why_it_cannot_resume(tmp_path):
    """Directions drawn otherwise by an earlier version: 'other directions (the same seed
    and normalization resume it)' told the user to do what they had done."""
    from landscape.surface import Directions

    model = models.mlp()
    x, y = models.classification_data()
    path = tmp_path / "run.h5"
    now = random_directions(model, 2, seed=0)
    earlier = {k: v for k, v in now.attrs.items() if k != "draw"}
    old = Directions(now.names, tuple(tuple(-t for t in v) for v in now.vectors), earlier)
    evaluate_grid(model, _ce, (x, y), old, [-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0], writer=path,
                  name="plane", progress=False)
    with pytest.raises(LandscapeError, match="begun by an earlier version"):
        plane(model, _ce, (x, y), 3, writer=path, progress=False)
    # the same draw with another normalization: the usual message
    plane(model, _ce, (x, y), 3, seed=1, normalization="layer", writer=tmp_path / "b.h5",
          progress=False)
    with pytest.raises(LandscapeError, match="the same seed and normalization resume it"):
        plane(model, _ce, (x, y), 3, seed=1, writer=tmp_path / "b.h5", progress=False)


def test_normalization_none_with_given_directions_is_what_they_get_anyway():
    model = models.mlp()
    x, y = models.classification_data()
    vectors = random_directions(model, 2, seed=1).vectors
    surf = plane(model, _ce, (x, y), 3, directions=vectors, normalization="none",
                 ignore="none", progress=False)
    assert np.isfinite(surf.values["loss"]).all()


@pytest.mark.parametrize("steps", [0, 1, 2.5, True])
def test_a_plane_or_line_of_fewer_than_two_points_per_axis_is_refused(steps):
    """plane and line took steps=1 and steps=True (a one-point "plane"), where interpolate
    and the command line refuse them (review)."""
    x, y = models.classification_data()
    for call in (plane, line):
        with pytest.raises(ValueError, match="steps must be an integer >= 2"):
            call(models.mlp(), _ce, (x, y), steps=steps, progress=False)


def test_odd_steps_put_the_centre_exactly_at_zero():
    """linspace(-3.3, 3.3, 51) holds 4.4e-16 in the middle, not 0 (review)."""
    from landscape.surface.grid import axis

    for span, steps in ((3.3, 51), (1.0, 51), (0.7, 7), (1e-3, 9)):
        xs = axis(steps, span)
        assert xs[steps // 2] == 0.0 and xs[0] == -span and xs[-1] == span
        np.testing.assert_allclose(xs, np.linspace(-span, span, steps), atol=1e-15)


def test_resume_compares_small_centre_losses_relatively(tmp_path):
    """The centre loss was compared to 1e-5 absolute below 1: a loss of 9.9e-6 resumed on
    data whose loss is 3.4e-7, and the grid mixed the two data sets (review; 5.5e-6 here)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, x2 = torch.randn(50, 3), torch.randn(50, 3)
    with torch.no_grad():
        y = model(x) + 2e-3 * torch.randn(50, 1)
        y2 = model(x2) + 5e-4 * torch.randn(50, 1)
    path = tmp_path / "run.h5"
    first = line(model, F.mse_loss, (x, y), steps=5, span=0.01, writer=path, progress=False)
    assert first.attrs["center_loss"] < 1e-4
    with pytest.raises(LandscapeError, match="other data or another loss function"):
        line(model, F.mse_loss, (x2, y2), steps=5, span=0.01, writer=path, progress=False)
    again = line(model, F.mse_loss, (x, y), steps=5, span=0.01, writer=path, progress=False)
    np.testing.assert_array_equal(again.values["loss"], first.values["loss"])


def test_an_interpolation_resumes_only_with_the_same_buffers(tmp_path):
    """The resume compared parameters alone: buffers=False resumed a buffers=True curve
    (alpha = 1 read 0.53 where theta_b's loss is 0.27), and so did a theta_b differing in
    its BatchNorm statistics only (review)."""
    a, b = models.cnn_bn(seed=0), models.cnn_bn(seed=1)
    x, y = models.image_data()
    path = tmp_path / "run.h5"
    kw = dict(steps=5, bounds=(0.0, 1.0), writer=path, progress=False)
    interpolate(models.cnn_bn(seed=5), a, b, _ce, (x, y), **kw)
    with pytest.raises(LandscapeError, match="other buffer directions"):
        interpolate(models.cnn_bn(seed=5), a, b, _ce, (x, y), buffers=False, **kw)
    other_b = models.cnn_bn(seed=1)
    with torch.no_grad():
        other_b.bn.running_var.mul_(2.0)
    with pytest.raises(LandscapeError, match="other buffer directions"):
        interpolate(models.cnn_bn(seed=5), a, other_b, _ce, (x, y), **kw)
    other_a = models.cnn_bn(seed=0)
    with torch.no_grad():
        other_a.bn.running_mean.add_(0.5)
    with pytest.raises(LandscapeError, match="other buffers at its centre"):
        interpolate(models.cnn_bn(seed=5), other_a, b, _ce, (x, y), **kw)
    interpolate(models.cnn_bn(seed=5), a, b, _ce, (x, y), **kw)  # the same: a resume


def test_interpolate_says_when_integer_buffers_differ_between_the_checkpoints():
    """Integer buffers keep theta_a's value at every alpha: a forward reading one made
    alpha = 1 differ from theta_b's loss without a word (review)."""

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)
            self.register_buffer("shift", torch.tensor(0))

        def forward(self, x):
            return self.fc(x) + self.shift

    x, y = models.classification_data()
    a, b = Shifted(), Shifted()
    b.shift.fill_(1)
    with pytest.warns(UserWarning, match="the integer or bool buffers shift differ"):
        interpolate(Shifted(), a, b, _ce, (x, y), steps=3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # BatchNorm's num_batches_tracked is not said
        c, d = models.cnn_bn(seed=0), models.cnn_bn(seed=1)
        d.bn.num_batches_tracked.fill_(7)
        interpolate(models.cnn_bn(seed=5), c, d, _ce, models.image_data(), steps=3,
                    progress=False)


def _training_run(path, how=None):
    """A run a training session wrote and closed (``how``: why it stopped early)."""
    with RunWriter(path, mode="w") as w:
        w.declare("loss", {"value": None})
        for step in range(3):
            w.append("loss", step, {"value": 1.0})
        if how is not None:
            w.close(how=how)
    return path


def test_a_surface_after_training_leaves_how_training_ended_as_it_was(tmp_path):
    """A surface added to a run whose training crashed made it read as finished (the
    reopening cleared ``closed_how``), and a surface refused at its start (another grid
    under its name) marked a finished run as stopped (review)."""
    model = models.mlp()
    x, y = models.classification_data()
    crashed = _training_run(tmp_path / "crashed.h5", how="stopped on RuntimeError: gloo")
    plane(model, _ce, (x, y), steps=3, span=0.5, writer=crashed, progress=False)
    with Run.open(crashed) as run:
        assert run.surface("plane").complete
        status = run.writer_status()
    assert (status.state, status.reason) == ("stopped", "stopped on RuntimeError: gloo")

    finished = _training_run(tmp_path / "finished.h5")
    plane(model, _ce, (x, y), steps=3, span=0.5, writer=finished, progress=False)
    with pytest.raises(LandscapeError, match="already exists"):
        plane(model, _ce, (x, y), steps=5, span=0.5, writer=finished, progress=False)
    with pytest.raises(KeyboardInterrupt):  # interrupted half-way: a surface, not training
        plane(model, _Counting(fail_after=3), (x, y), steps=4, span=0.5, writer=finished,
              name="other", progress=False)
    with Run.open(finished) as run:
        assert run.writer_status().state == "closed"

    # a run no training wrote: the surface's session is the run's own, stopped or not
    only = tmp_path / "only.h5"
    plane(model, _ce, (x, y), steps=3, span=0.5, writer=only, progress=False)
    with pytest.raises(LandscapeError, match="already exists"):
        plane(model, _ce, (x, y), steps=5, span=0.5, writer=only, progress=False)
    with Run.open(only) as run:
        assert run.writer_status().state == "closed"  # refused before its first point
    with pytest.raises(KeyboardInterrupt):
        plane(model, _Counting(fail_after=3), (x, y), steps=4, span=0.5, writer=only,
              name="other", progress=False)
    with Run.open(only) as run:
        status = run.writer_status()
    assert status.state == "stopped" and "Ctrl-C" in status.reason
    # a refusal leaves that stop said; the same surface resumed to its end clears it
    with pytest.raises(LandscapeError, match="already exists"):
        plane(model, _ce, (x, y), steps=5, span=0.5, writer=only, progress=False)
    with Run.open(only) as run:
        assert run.writer_status().state == "stopped"
    plane(model, _ce, (x, y), steps=4, span=0.5, writer=only, name="other", progress=False)
    with Run.open(only) as run:
        assert run.writer_status().state == "closed" and run.surface("other").complete
