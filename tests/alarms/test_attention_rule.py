"""attention_logit_growth: fires (info) when sentinels/attention_logit_max grows past the
saturation level and past its own baseline; quiet on healthy series and without attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import landscape as ls
from landscape.alarms import RULES, check, default_rules
from landscape.alarms.representation_rules import AttentionLogitGrowth
from tests import models
from tests.alarms._support import NAN, findings_of, one


def _found(values, rule=None):
    cols = {"attention_logit_max": np.asarray(values, dtype=float)}
    found = findings_of({"sentinels": (np.arange(len(values)), cols)})
    if rule is not None:
        found = findings_of({"sentinels": (np.arange(len(values)), cols)}, [rule])
    return one("attention_logit_growth", found)


def test_fires_info_on_the_third_row_past_the_level_once_per_episode():
    rng = np.random.default_rng(0)
    early = 1.0 + 0.5 * rng.random(40)  # a network leaving its initialisation
    growth = np.geomspace(2.0, 400.0, 40)  # exponential growth, as without QK-layernorm
    values = np.concatenate([early, growth])
    found = _found(values)
    first_over = int(np.argmax(values >= 50))
    assert [(f.step, f.severity, f.threshold) for f in found] == [(first_over + 2, "info", 50.0)]
    assert found[0].metric == "sentinels/attention_logit_max"
    assert "QK-layernorm" in found[0].hint and "attention" in found[0].message


def test_quiet_on_healthy_series_dips_and_rows_without_attention():
    rng = np.random.default_rng(1)
    warm = np.linspace(0.5, 8.0, 50) + rng.standard_normal(50)  # logits sharpen while learning
    plateau = 9.0 + rng.standard_normal(300)
    assert _found(np.concatenate([warm, plateau])) == []
    spikes = np.full(100, 5.0)
    spikes[[30, 31, 60, 70, 71]] = 80.0  # never three rows in a row
    assert _found(spikes) == []
    assert _found(np.full(50, NAN)) == []  # an MLP: no attention, every row NaN


def test_the_growth_condition_keeps_sharp_pretrained_heads_quiet():
    pretrained = np.concatenate([np.full(30, 60.0), np.full(10, 200.0), np.full(10, 260.0)])
    found = _found(pretrained)
    assert [(f.step, f.threshold) for f in found] == [(42, 240.0)]  # 4 x the baseline 60
    # during the baseline rows the rule is quiet, even above the level
    assert _found(np.full(10, 500.0)) == []
    # growth=None: the level alone, from the first row
    level_only = AttentionLogitGrowth(growth=None, sustain=1)
    assert [f.step for f in _found(np.full(5, 60.0), level_only)] == [0]


def test_overflow_fires_and_severity_is_configurable():
    values = np.concatenate([np.full(10, 2.0), [np.inf, np.inf, np.inf]])
    (f,) = _found(values, AttentionLogitGrowth(severity="warning"))
    assert f.severity == "warning" and f.step == 12 and f.value == np.inf


def test_registered_in_the_defaults_and_settings_are_checked():
    assert RULES["attention_logit_growth"] is AttentionLogitGrowth
    assert "attention_logit_growth" in [r.name for r in default_rules()]
    by_name = {r.name: r for r in default_rules(attention_logit_growth={"max_logit": 30})}
    assert by_name["attention_logit_growth"].max_logit == 30
    for bad in ({"severity": "loud"}, {"growth": 0.0}, {"baseline_rows": 0},
                {"max_logit": float("nan")}):
        with pytest.raises(ValueError):
            AttentionLogitGrowth(**bad)


def test_a_monitored_transformer_with_sharp_attention_gets_the_finding():
    """End to end: the sentinels' field reaches the rule through a run."""
    model = models.TinyTransformer(vocab=11, d=8, heads=2, layers=1, seq=6, seed=0)
    with torch.no_grad():
        model.blocks[0].qkv.weight[:16].mul_(30.0)  # queries and keys x30: logits x900
    ids = torch.randint(0, 11, (8, 7), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1], ids[:, 1:]

    def loss_fn(logits, targets):
        return F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))

    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    rule = AttentionLogitGrowth(growth=None, sustain=1)
    sentinels = ls.metrics.Sentinels(attention_every=1)
    with ls.Monitor(model, loss_fn, optimizer=opt, metrics=[sentinels], probe=(x, y),
                    alarms=[rule], warn=False, strict=True) as mon:
        for step in range(2):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x, y), loss=loss)
        run = mon.run()
        _, att = run.series("sentinels", "attention_logit_max")
        assert (att > 50).all()
        assert [(f.rule, f.step) for f in check(run, [rule])] == [("attention_logit_growth", 0)]


def test_measured_every_tenth_step_only_measured_rows_count():
    # attention_every=10: NaN rows between the measured ones are skipped, they neither
    # fill the baseline nor break the run of three rows past the level
    measured = np.concatenate([np.full(10, 2.0), np.geomspace(4.0, 400.0, 10)])
    every_tenth = np.full(10 * len(measured), NAN)
    every_tenth[::10] = measured
    dense = _found(measured)
    sparse = _found(every_tenth)
    assert len(dense) == len(sparse) == 1
    assert sparse[0].step == 10 * dense[0].step  # the same measured row, 10x the step
    assert sparse[0].threshold == dense[0].threshold == 50.0  # baseline median 2.0
