"""End to end: the monitor's numbers equal direct computations, the edge-of-stability finding on
full-batch GD, and the Taylor guard. (Warnings before a learning-rate-spike blow-up: the demo
test in tests/cli/test_info_and_demo.py.)"""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape import functional as LF
from landscape.curvature import stability_threshold
from landscape.metrics import create
from landscape.monitor import Monitor
from tests import models


def _tiny_regression():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        x = torch.randn(24, 3, dtype=torch.float64)
        y = torch.randn(24, 1, dtype=torch.float64)
        net = nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 1)).double()
    return net, x, y


def _dense_lambda_max(net, x, y):
    params = tuple(p.detach() for p in net.parameters())
    names = [n for n, _ in net.named_parameters()]

    def loss_of(*flat):
        out = torch.func.functional_call(net, dict(zip(names, flat)), (x,))
        return F.mse_loss(out, y) / 2

    h = torch.autograd.functional.hessian(loss_of, params)
    n = sum(p.numel() for p in params)
    dense = torch.cat([torch.cat([h[i][j].reshape(params[i].numel(), -1)
                                  for j in range(len(params))], 1)
                       for i in range(len(params))], 0)
    assert dense.shape == (n, n)
    return float(torch.linalg.eigvalsh(dense)[-1])


def test_full_batch_gd_sharpness_reaches_two_over_lr_and_the_finding_appears():
    net, x, y = _tiny_regression()
    lr = 0.75
    opt = torch.optim.SGD(net.parameters(), lr=lr)

    def loss_fn(out, target):
        return F.mse_loss(out, target) / 2

    metrics = [create("loss"), create("top_eigenvalues", k=1, tol=1e-6, schedule=10),
               create("sharpness", tol=1e-6, schedule=10)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Monitor(net, loss_fn, optimizer=opt, metrics=metrics, probe=(x, y)) as mon:
            # 60 steps: past the threshold (from step ~40) the trajectory is chaotic, and
            # the catapult that follows (near step 90) comes earlier or later with the
            # CPU's rounding (AVX2 against AVX-512 kernels)
            for step in range(60):
                loss = loss_fn(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(step, batch=(x, y), loss=loss)
                if step == 50:
                    dense_50 = _dense_lambda_max(net, x, y)
            run = mon.run()
    steps, lam = run.series("sharpness", "lambda_max")
    _, thr = run.series("sharpness", "threshold")
    assert np.allclose(thr, 2 / lr)
    assert lam[list(steps).index(50)] == pytest.approx(dense_50, rel=1e-5)
    assert lam[0] < 0.9 * 2 / lr and lam.max() >= 2 / lr  # progressive sharpening to the edge
    # the edge is healthy here (the loss keeps falling): one info finding, no warning raised
    eos = [f for f in mon.findings if f.rule == "edge_of_stability"]
    assert [(f.severity, f.step) for f in eos] == [("info", steps[np.argmax(lam >= 0.9 * 2 / lr)])]
    assert not any("edge_of_stability" in str(w.message) for w in caught)


def _classifier_step(lr):
    model = models.mlp(d_in=6, hidden=16, d_out=3)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = models.classification_data(32, seed=4)
    return model, opt, x, y


def test_taylor_metric_equals_the_functional_radius_along_the_actual_step():
    model, opt, x, y = _classifier_step(lr=2.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with Monitor(model, F.cross_entropy, optimizer=opt, metrics=["taylor_radius", "update"],
                 strict=True) as mon:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(0, batch=(x, y), loss=loss)
        run = mon.run()
    step = [p.detach() - before[n] for n, p in model.named_parameters()]
    ref = models.mlp(d_in=6, hidden=16, d_out=3)
    ref.load_state_dict(before)
    direct = LF.taylor_radius(ref, x, step, targets=y)
    assert run.series("taylor_radius", "r")[1][0] == pytest.approx(float(direct.r), rel=1e-6)
    assert run.series("taylor_radius", "step_norm")[1][0] == pytest.approx(
        run.series("update", "norm")[1][0], rel=1e-6)


def test_taylor_guard_rescales_a_step_beyond_the_radius_to_r_one():
    model, opt, x, y = _classifier_step(lr=50.0)
    before = [p.detach().clone() for p in model.parameters()]
    with Monitor(model, F.cross_entropy, optimizer=opt, metrics=["loss"], probe=(x, y),
                 taylor_guard=1.0) as mon:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        mon.step(0, batch=(x, y), loss=loss)
    applied = [p.detach() - b for p, b in zip(model.parameters(), before)]
    proposed = [-50.0 * g for g in grads]
    ref = models.mlp(d_in=6, hidden=16, d_out=3)
    ref.load_state_dict(dict(zip([n for n, _ in model.named_parameters()], before)))
    r_proposed = float(LF.taylor_radius(ref, x, proposed, targets=y).r)
    r_applied = float(LF.taylor_radius(ref, x, applied, targets=y).r)
    assert r_proposed > 1.5
    assert r_applied == pytest.approx(1.0, rel=1e-5)
    cos = sum((a * b).sum() for a, b in zip(applied, proposed)) / math.sqrt(
        sum((a * a).sum() for a in applied) * sum((b * b).sum() for b in proposed))
    assert float(cos) == pytest.approx(1.0, abs=1e-9)  # same direction, shorter


def test_sharpness_threshold_follows_the_optimizer_and_its_learning_rate():
    model, _, x, y = _classifier_step(lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with Monitor(model, F.cross_entropy, optimizer=opt, metrics=[create("sharpness", schedule=1)],
                 probe=(x, y),
                 strict=True) as mon:
        mon.step(0)
        opt.param_groups[0]["lr"] = 0.2
        mon.step(1)
        _, thr = mon.run().series("sharpness", "threshold")
    assert thr[0] == pytest.approx(stability_threshold("sgd", 0.1, momentum=0.9))
    assert thr[0] == pytest.approx(3.8 / 0.1) and thr[1] == pytest.approx(3.8 / 0.2)


def test_sharpness_says_once_when_parameter_groups_differ_in_momentum_too():
    """Groups that differ in learning rate alone get an exact ratio (each scaled by its
    rate, tests/metrics/test_sharpness_groups.py); groups that differ in momentum as well
    have no single threshold: the first group's is reported, and said once."""
    model, _, x, y = _classifier_step(lr=0.1)
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params[:-2], "lr": 0.01, "momentum": 0.9},
                           {"params": params[-2:], "lr": 0.1, "momentum": 0.5}])
    with pytest.warns(RuntimeWarning, match=r"learning rates 0.01, 0.1\); the threshold is "
                                            "the first group's") as caught, \
            Monitor(model, F.cross_entropy, optimizer=opt, probe=(x, y), warn=False,
                    metrics=[create("sharpness", schedule=1)]) as mon:
        mon.step(0)
        mon.step(1)
    assert sum("parameter groups differ" in str(w.message) for w in caught) == 1
    assert caught[0].filename == __file__
    _, thr = mon.run().series("sharpness", "threshold")
    assert thr[0] == pytest.approx(3.8 / 0.01)
    with warnings.catch_warnings():  # one group, or groups differing in weight decay only
        warnings.simplefilter("error", RuntimeWarning)
        same = torch.optim.SGD([{"params": params[:-2], "weight_decay": 0.1},
                                {"params": params[-2:]}], lr=0.1)
        with Monitor(model, F.cross_entropy, optimizer=same, probe=(x, y), warn=False,
                     metrics=[create("sharpness", schedule=1)]) as mon:
            mon.step(0)


def test_microbatched_curvature_metrics_record_the_same_numbers():
    net, x, y = _tiny_regression()

    def loss_fn(out, target):
        return F.mse_loss(out, target) / 2

    def record(**options):
        metrics = [create("top_eigenvalues", schedule=1, k=2, tol=1e-9),
                   create("hessian_trace", schedule=1, n_matvec=12)]
        with Monitor(net, loss_fn, metrics=metrics, probe=(x, y), strict=True,
                     **options) as mon:
            mon.step(0)
            run = mon.run()
            return (run.series("top_eigenvalues", "eigenvalues")[1][0],
                    run.series("hessian_trace", "value")[1][0], run.config)

    whole_eigs, whole_trace, _ = record()
    micro_eigs, micro_trace, config = record(microbatch_size=5)
    assert config["microbatch_size"] == 5
    assert np.allclose(micro_eigs, whole_eigs, rtol=1e-8)
    assert whole_eigs[0] == pytest.approx(_dense_lambda_max(net, x, y), rel=1e-8)
    assert micro_trace == pytest.approx(whole_trace, rel=1e-9)  # same probes, same operator
    with pytest.raises(ValueError, match="microbatch_size"):
        Monitor(net, loss_fn, microbatch_size=0)


def test_a_token_count_sizer_lets_a_padded_token_mean_loss_use_micro_batches():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(7, 4), nn.Tanh(), nn.Linear(4, 7)).double()
    x = torch.randint(0, 7, (6, 5))
    y = torch.randint(0, 7, (6, 5))
    y[0, 1:] = y[3, 3:] = -100  # padding: the samples hold 1 to 5 target tokens

    def loss_fn(out, target):  # a mean over the target tokens, as Hugging Face's LM loss
        return F.cross_entropy(out.reshape(-1, 7), target.reshape(-1), ignore_index=-100)

    def tokens(batch):
        return int((batch[1] != -100).sum())

    def record(**options):
        metric = create("top_eigenvalues", schedule=1, k=1, tol=1e-9)
        with Monitor(net, loss_fn, metrics=[metric], probe=(x, y), warn=False,
                     **options) as mon:
            mon.step(0)
            return mon.run().series("top_eigenvalues", "eigenvalues")[1][0][0], mon.findings

    whole, _ = record()
    # weighted by samples, two micro-batches of 3 are not the token mean: refused, one line
    with pytest.warns(RuntimeWarning, match="not a mean over what the weights count"):
        refused, found = record(microbatch_size=3)
    assert math.isnan(refused) and "not a mean" in found[0].message
    micro, found = record(microbatch_size=3, batch_size=tokens)
    assert found == [] and micro == pytest.approx(whole, rel=1e-8)
    with Monitor(net, loss_fn, batch_size=tokens) as mon:
        assert mon.run().config["batch_size"].endswith("tokens")  # recorded by name
    with pytest.raises(ValueError, match="batch_size must be a function"):
        Monitor(net, loss_fn, batch_size=3)
