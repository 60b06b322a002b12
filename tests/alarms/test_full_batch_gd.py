"""Alarms on real full-batch gradient descent: edge of stability at 2/lr, and warnings that
lead the blow-up of a learning-rate ramp."""

from __future__ import annotations

import numpy as np

from landscape.alarms import EdgeOfStability, OnlineAlarms, check
from tests.alarms._support import full_batch_gd, make_writer

# --------------------------------------------------------------------------- real full-batch GD


def test_full_batch_gd_reaching_two_over_lr_fires_edge_of_stability():
    _, sharp = full_batch_gd(lambda s: 0.75, 250, every=10)
    ratios = np.array([row["ratio"] for _, row in sharp])
    assert ratios[0] < 0.9 and ratios.max() > 1.0  # progressive sharpening reaches 2/lr
    alarms = OnlineAlarms([EdgeOfStability()])
    found = [f for step, row in sharp for f in alarms.observe("sharpness", step, row)]
    warnings = [f for f in found if f.severity == "warning"]
    first_cross = sharp[int(np.argmax(ratios >= 1.0))][0]
    assert warnings[0].step == first_cross
    assert len(warnings) <= 2  # hovering at the edge does not flood
    assert all(f.step >= sharp[int(np.argmax(ratios >= 0.9))][0] for f in found)


def test_warnings_precede_the_blow_up_of_a_learning_rate_ramp():
    # the learning rate ramps up until GD diverges; sharpness is measured every 5 steps
    losses, sharp = full_batch_gd(lambda s: 0.2 + 0.005 * s, 160, every=5)
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
    eos = next(f for f in found if f.rule == "edge_of_stability" and f.severity == "warning")
    blow_up = next(f for f in found if f.rule in ("loss_spike", "nonfinite"))
    assert blow_up.step > 100 and losses[blow_up.step] > 1.5 * losses[blow_up.step - 30]
    assert eos.step < blow_up.step - 20  # the warning leads the blow-up by > 20 steps


