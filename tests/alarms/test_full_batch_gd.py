"""Alarms on real full-batch gradient descent: edge of stability at 2/lr, and warnings that
lead the blow-up of a learning-rate ramp."""

from __future__ import annotations

import numpy as np

from landscape.alarms import EdgeOfStability, OnlineAlarms, check
from tests.alarms._support import full_batch_gd, make_writer

# --------------------------------------------------------------------------- real full-batch GD


def test_full_batch_gd_reaching_two_over_lr_is_one_info_finding():
    # constant learning rate: progressive sharpening to 2/lr, then hovering there while the
    # loss keeps falling (Cohen et al. 2021): healthy, so info, once
    _, sharp = full_batch_gd(lambda s: 0.75, 250, every=10)
    ratios = np.array([row["ratio"] for _, row in sharp])
    assert ratios[0] < 0.9 and ratios.max() > 1.0  # progressive sharpening reaches 2/lr
    alarms = OnlineAlarms([EdgeOfStability()])
    found = [f for step, row in sharp for f in alarms.observe("sharpness", step, row)]
    assert [(f.severity, f.step) for f in found] == [
        ("info", sharp[int(np.argmax(ratios >= 0.9))][0])
    ]
    # threshold=1.0 warns at the edge itself, at the first measured step past 2/lr
    alarms = OnlineAlarms([EdgeOfStability(threshold=1.0)])
    found = [f for step, row in sharp for f in alarms.observe("sharpness", step, row)]
    warnings = [f for f in found if f.severity == "warning"]
    assert warnings[0].step == sharp[int(np.argmax(ratios >= 1.0))][0]
    assert len(warnings) <= 2  # hovering at the edge does not flood


def test_edge_of_stability_leads_the_blow_up_of_a_learning_rate_ramp():
    # the learning rate ramps up until GD diverges; sharpness is measured every 5 steps. A
    # linear ramp alone catapults back (the loss spikes, the sharpness falls to the edge)
    # or diverges depending on the CPU's rounding (1e-13 changes to the start decide it):
    # from step 100 the rate grows 4 % a step, which no catapult outruns
    def lr_at(s):
        return 0.2 + 0.005 * s if s < 100 else 0.7 * 1.04 ** (s - 100)

    losses, sharp = full_batch_gd(lr_at, 160, every=5)
    w = make_writer(
        {
            "loss": (np.arange(len(losses)), {"value": losses}),
            "sharpness": (
                [s for s, _ in sharp],
                {k: [r[k] for _, r in sharp] for k in sharp[0][1]},
            ),
        }
    )
    found = check(w)
    blow_up = next(f for f in found if f.rule in ("loss_spike", "nonfinite"))
    assert blow_up.step > 100 and losses[blow_up.step] > 1.5 * losses[blow_up.step - 30]
    eos = [f for f in found if f.rule == "edge_of_stability"]
    # the edge is crossed about 50 steps before the blow-up (info); the warning comes far past it,
    # at ratio >= 12, once the iterate diverges
    assert eos[0].severity == "info" and eos[0].step < blow_up.step - 20
    warning = next(f for f in eos if f.severity == "warning")
    assert warning.value >= 12 and warning.step >= blow_up.step
    # threshold=1.0 makes the crossing itself the warning
    eos = [f for f in check(w, [EdgeOfStability(threshold=1.0)]) if f.severity == "warning"]
    assert eos[0].step < blow_up.step - 20
