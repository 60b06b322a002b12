"""The demo's pure helpers: the learning-rate ramp, the loss onset and explosion, the lead.

The demo itself runs end to end in tests/cli/test_info_and_demo.py.
"""

from __future__ import annotations

import math

import pytest

from landscape.alarms import (
    EarlyWarning,
    early_warning,
    loss_milestones,
    rule_leads,
    warning_leads,
)
from landscape.demo import ramp_lr
from landscape.findings import Finding


def _finding(step: int, rule: str, severity: str = "warning") -> Finding:
    return Finding(step, rule, severity, "sentinels", 1.0, 1.0, "m")


def test_ramp_lr_is_geometric_from_its_first_step():
    lrs = [ramp_lr(s, 0.1, start=10, steps=4, factor=16.0) for s in range(8, 16)]
    assert lrs[:2] == [0.1, 0.1]  # steps 8, 9: before the ramp
    assert lrs[2:6] == pytest.approx([0.2, 0.4, 0.8, 1.6])  # x2 a step, 16x at 13
    assert lrs[6:] == pytest.approx([1.6, 1.6])
    assert ramp_lr(9, 0.1, 10, 1, 40.0) == 0.1 and ramp_lr(10, 0.1, 10, 1, 40.0) == 4.0


def test_loss_milestones_onset_is_sustained_and_explosion_may_be_nonfinite():
    losses = [1.0] * 50 + [1.0, 1.3, 1.0, 1.3, 1.3, 1.3, 5.0, math.nan]
    base, onset, explosion = loss_milestones(losses, 50)
    assert base == 1.0
    assert onset == 53  # 51 is a single step above 1.25x, 53..55 stay there
    assert explosion == 57  # 5.0 < 10x; the NaN explodes
    assert loss_milestones([1.0] * 60, 50) == (1.0, None, None)
    # a jump straight to 10x is the onset too
    assert loss_milestones([1.0] * 50 + [20.0], 50)[1:] == (50, 50)
    with pytest.raises(ValueError, match="start"):
        loss_milestones([1.0] * 10, 10)


def test_early_warning_lead_and_false_alarms():
    losses = [1.0] * 60 + [1.0] * 5 + [2.0] * 5 + [20.0]
    findings = [_finding(30, "loss_spike"), _finding(40, "grad_norm_spike", "info"),
                _finding(62, "taylor_forecast"), _finding(66, "loss_spike"),
                _finding(61, "logit_growth", "info")]
    w = early_warning(losses, findings, 60)
    assert (w.first_step, w.first_rule, w.onset, w.explosion) == (62, "taylor_forecast", 65, 70)
    assert (w.lead_to_onset, w.lead_to_explosion) == (3, 8)
    assert [f.step for f in w.early] == [30]  # info findings are no false alarms
    assert w.describe() == (
        "first warning at step 62 (taylor_forecast), loss 1.25x baseline at step 65, "
        "10x at step 70: 3 steps of warning before the loss moved, 8 before it exploded")
    assert rule_leads(findings, 60, w.explosion) == {"taylor_forecast": 8, "loss_spike": 4}
    assert rule_leads(findings, 60, None) == {"taylor_forecast": None, "loss_spike": None}


def test_warning_leads_reads_a_run_file_as_early_warning_reads_losses(tmp_path):
    """Untested, it took its baseline from 20 steps where every other lead uses 50: a loss
    that fell 10-fold in the 20 steps before the ramp put its explosion 3 steps early."""
    from landscape.store import RunWriter

    losses = [1.0] * 40 + [0.1] * 20 + [0.1] * 5 + [2.0] * 3 + [40.0]
    findings = [_finding(61, "taylor_forecast"), _finding(66, "loss_spike")]
    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.declare("loss", {"value": None})
        for step, loss in enumerate(losses):
            w.append("loss", step, {"value": loss})
    explosion, leads = warning_leads(path, findings, after=60)
    want = early_warning(losses, findings, 60)
    assert want.baseline == 1.0 and want.explosion == 68  # 2.0 was 20x the 20-step median
    assert (explosion, leads) == (want.explosion, rule_leads(findings, 60, want.explosion))


def test_early_warning_describes_what_is_missing():
    quiet = EarlyWarning(start=10, baseline=1.0, first_step=None, first_rule=None, onset=None,
                         explosion=None)
    assert quiet.describe() == "no warning, loss 1.25x baseline never, 10x never"
    assert quiet.lead_to_onset is None and quiet.lead_to_explosion is None
    late = EarlyWarning(10, 1.0, 20, "loss_spike", onset=12, explosion=15, nonfinite=True)
    assert late.lead_to_onset == -8
    assert late.describe().endswith("non-finite at step 15: the first warning came 8 steps "
                                    "after the loss moved, 5 after it exploded")
    no_onset = EarlyWarning(10, 1.0, 11, "loss_spike", onset=None, explosion=None)
    assert no_onset.describe() == ("first warning at step 11 (loss_spike), loss 1.25x baseline "
                                   "never, 10x never")
    one = EarlyWarning(10, 1.0, 11, "loss_spike", onset=12, explosion=None)  # not "1 steps"
    assert one.describe().endswith("10x never: 1 step of warning before the loss moved")
    one_x = EarlyWarning(10, 1.0, 11, "loss_spike", onset=None, explosion=12)
    assert one_x.describe().endswith(": 1 step of warning before the loss exploded")


def test_the_lead_figure_names_a_jump_and_counts_one_step_in_the_singular(tmp_path,
                                                                         monkeypatch):
    """With --spike-factor the figure said 'LR ramp from 150' and '1 steps before the loss
    moved' (report review)."""
    import numpy as np

    from landscape.alarms.leads import early_warning
    from landscape.demo import plot_lead
    from landscape.findings import Finding
    from landscape.plotting import timelines
    from landscape.store import RunWriter

    saved = []
    real = timelines.save_figure
    monkeypatch.setattr(timelines, "save_figure",
                        lambda fig, path, **kw: saved.append(fig) or real(fig, path, **kw))

    w = RunWriter.memory()
    w.declare("loss", {"value": None})
    losses = np.r_[np.full(150, 1.0), 1.1, 1.5, 12.0, 30.0]
    for s, v in enumerate(losses):
        w.append("loss", s, {"value": float(v)})
    found = [Finding(150, "taylor_forecast", "warning", "sentinels/r_secant", 1.2, 1.0, "m")]
    warning = early_warning(losses, found, 150)
    assert warning.lead_to_onset == 1
    fig_path = plot_lead(w.run(), warning, tmp_path / "w.png", change="LR jump")
    assert fig_path.exists()
    (fig,) = saved
    assert fig._suptitle.get_text() == "Early warning: 1 step before the loss moved"
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "LR jump at 150" in labels
