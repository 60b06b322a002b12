"""``Monitor(output_fn=...)``: which tensor of the model's output holds the logits.

A model returning ``(features, logits)`` (a contrastive or distillation head beside the
classifier) is read through its first tensor by default, so its logit metrics would read
the features. With ``output_fn`` every metric that reads logits records what the same
network returning its logits alone records.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape as ls

FIELDS = {
    "sentinels": ("r_secant", "max_abs", "logsumexp_max", "probe_loss"),
    "logits": ("max_abs", "logsumexp_mean", "softmax_collapse"),
    "taylor_radius": ("r", "rho_a", "r_median"),
}


class Net(nn.Module):
    """Features (width 16) and the logits of 5 classes; ``pair`` returns both."""

    def __init__(self, pair: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 5)
        self.pair = pair

    def forward(self, x: torch.Tensor):
        features = self.body(x)
        logits = self.head(features)
        return (features, logits) if self.pair else logits


def _run(pair: bool, output_fn=None) -> dict[tuple[str, str], np.ndarray]:
    model = Net(pair)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def loss_fn(out, y):
        return F.cross_entropy(out[1] if pair else out, y)

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(12, 8, generator=g), torch.randint(0, 5, (12,), generator=g))
            for _ in range(4)]
    metrics = ls.metrics.preset("cheap", logits=1, taylor_radius=1)
    options = {} if output_fn is None else {"output_fn": output_fn}
    with ls.Monitor(model, loss_fn, optimizer=opt, metrics=metrics, warn=False,
                    **options) as mon:
        for step, (x, y) in enumerate(data):
            out = model(x)
            loss = loss_fn(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x, y), loss=loss, outputs=out)
        run = mon.run()
        return {(m, f): run.series(m, f)[1] for m, fields in FIELDS.items() for f in fields}


def test_output_fn_reads_the_logits_of_a_features_logits_pair():
    alone = _run(pair=False)
    chosen = _run(pair=True, output_fn=lambda out: out[1])
    for key, values in alone.items():
        assert np.isfinite(values[1:]).all(), key  # r_secant needs a previous call
        np.testing.assert_allclose(chosen[key], values, rtol=1e-6, err_msg=str(key))
    # the default reading takes the features: the fields differ
    default = _run(pair=True)
    assert not np.allclose(default[("sentinels", "max_abs")], alone[("sentinels", "max_abs")])


def test_output_fn_must_be_callable():
    with pytest.raises(TypeError, match="output_fn must be callable"):
        ls.Monitor(Net(True), F.cross_entropy, output_fn="logits")


def test_output_fn_that_finds_no_tensor_fails_the_logit_metrics_with_its_name():
    model = Net(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(6, 8), torch.randint(0, 5, (6,))
    with ls.Monitor(model, lambda out, t: F.cross_entropy(out[1], t), optimizer=opt,
                    metrics=[ls.metrics.Logits(schedule=ls.every(1))], warn=False,
                    output_fn=lambda out: None) as mon:
        loss = F.cross_entropy(model(x)[1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(0, batch=(x, y), loss=loss)
        failed = [f for f in mon.findings if f.rule == "metric_failed"]
        assert len(failed) == 1 and "output_fn=" in failed[0].message
        assert math.isnan(mon.run().series("logits", "max_abs")[1][0])


class Wrapper(nn.Module):
    """A LightningModule-like wrapper whose training step calls its ``net`` directly, and
    its loss module after it."""

    def __init__(self, pair: bool) -> None:
        super().__init__()
        self.net = Net(pair)
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor):
        return self.net(x)


@pytest.mark.parametrize("how", ["forward", "closure_on_a_child", "closure_and_a_loss_child"])
def test_output_fn_reads_the_logits_of_the_monitors_own_forward(how):
    """Without outputs=, the logits come from the monitor's forward: of the model (the
    capture of its output) or, under a closure that calls a child (self.net(x)), of that
    child; the child's output was read through first_tensor, ignoring output_fn, and then
    output_fn raised on a loss module's scalar (review)."""

    def logits_rows(pair, output_fn=None):
        model = Wrapper(pair)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)

        def loss_fn(out, y):
            return F.cross_entropy(out[1] if pair else out, y)

        options = {"output_fn": output_fn} if output_fn is not None else {}
        if how == "closure_on_a_child":
            options["closure"] = lambda m, b: loss_fn(m.net(b[0]), b[1])
        elif how == "closure_and_a_loss_child":  # output_fn cannot read the loss's scalar
            options["closure"] = lambda m, b: m.criterion(
                m.net(b[0])[1] if pair else m.net(b[0]), b[1])
        g = torch.Generator().manual_seed(1)
        with ls.Monitor(model, loss_fn, optimizer=opt, warn=False, strict=True,
                        metrics=[ls.metrics.Logits(schedule=ls.every(1))], **options) as mon:
            for step in range(3):
                x, y = torch.randn(12, 8, generator=g), torch.randint(0, 5, (12,), generator=g)
                loss = loss_fn(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(step, batch=(x, y), loss=loss)
            return mon.run().series("logits", "max_abs")[1]

    alone = logits_rows(False)
    assert np.isfinite(alone).all()
    np.testing.assert_allclose(logits_rows(True, lambda out: out[1]), alone, rtol=1e-6)


def second_of_pair(out):
    return out[1]


def test_a_resume_without_the_output_fn_of_the_run_before_is_warned_about(tmp_path):
    """Resumed without output_fn=, the sentinels read the features from then on, with no
    word; the run's config now records the output_fn and the resume compares it."""
    model = Net(pair=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    path = str(tmp_path / "run.h5")
    x, y = torch.randn(12, 8), torch.randint(0, 5, (12,))

    def steps(mon, start):
        for step in range(start, start + 2):
            out = model(x)
            loss = F.cross_entropy(out[1], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x, y), loss=loss)

    with ls.Monitor(model, None, path, optimizer=opt, warn=False,
                    output_fn=second_of_pair) as mon:
        steps(mon, 0)
    assert ls.Run.open(path).config["output_fn"] == "second_of_pair"
    with pytest.warns(RuntimeWarning, match="recorded with output_fn=second_of_pair and this "
                                            "run is appended with output_fn=None"):
        with ls.Monitor(model, None, path, optimizer=opt, warn=False) as mon:
            steps(mon, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same output_fn: nothing to say
        with ls.Monitor(model, None, path, optimizer=opt, warn=False,
                        output_fn=second_of_pair) as mon:
            steps(mon, 4)
