"""The instability suite's onset definition (tests/benchmarks/instability/harness.py) on
synthetic loss curves: a rise the matched control shares is not an onset, a rise of the
treatment alone is, and the explosion ignores the control."""

from __future__ import annotations

import math

import numpy as np

from tests.benchmarks.instability.harness import (
    onset_explosion,
    onset_step,
    pair_onsets,
)
from tests.benchmarks.instability.scenarios import scenarios

SC = scenarios(small=True)["cnn_sgd_eos"]
S0 = SC.intervention


def _noisy_flat(n: int, seed: int = 0) -> list[float]:
    """A near-zero loss with minibatch noise: 0.1 x (1 +- 10 %)."""
    rng = np.random.default_rng(seed)
    return [0.1 * (1 + 0.1 * float(u)) for u in rng.uniform(-1, 1, n)]


def _arms() -> tuple[list[float], list[float]]:
    """Both arms identical (the same seed) with a shared 3-step excursion to 1.6x at the
    intervention; the treatment alone then rises geometrically from S0 + 10 to 20x."""
    control = _noisy_flat(S0 + 40)
    for s in range(S0, S0 + 3):
        control[s] *= 1.6
    treatment = list(control[:S0 + 10])
    treatment += [control[s] * 1.3 ** (s - S0 - 9) for s in range(S0 + 10, S0 + 25)]
    return treatment, control


def test_a_shared_excursion_is_an_onset_for_the_loss_alone_but_not_against_the_control():
    treatment, control = _arms()
    base, alone, explosion = onset_explosion(treatment, SC)
    assert alone == S0  # the baseline-only definition is fooled by the shared noise
    _, paired, explosion_paired = onset_explosion(treatment, SC, control)
    # the first step of the treatment's own rise (1.3x the control, >= 1.25x baseline)
    assert paired == S0 + 10
    assert explosion_paired == explosion  # the explosion does not look at the control
    assert explosion is not None and treatment[explosion] >= 10 * base
    assert paired <= explosion


def test_the_treatment_must_clear_both_the_baseline_and_the_control():
    control = [1.0] * (S0 + 10)
    treatment = list(control)
    # 1.3x baseline but only 1.3 / 1.1 = 1.18x the control at the same steps: no onset
    for s in range(S0 + 2, S0 + 6):
        control[s], treatment[s] = 1.1, 1.3
    assert onset_step(treatment, 1.0, S0) == S0 + 2
    assert onset_step(treatment, 1.0, S0, control) is None
    # 2x the control but under 1.25x baseline (the control fell): no onset either
    control = [1.0] * S0 + [0.5] * 10
    treatment = [1.0] * S0 + [1.1] * 10
    assert onset_step(treatment, 1.0, S0, control) is None
    # sustained for 3 steps against both: onset at its first step
    treatment = [1.0] * S0 + [1.0, 1.3, 1.3, 1.3, 1.0]
    control = [1.0] * (S0 + 5)
    assert onset_step(treatment, 1.0, S0, control) == S0 + 1
    treatment[S0 + 3] = 1.2  # broken after 2 steps
    assert onset_step(treatment, 1.0, S0, control) is None


def test_non_finite_and_missing_control_steps():
    control = [1.0] * (S0 + 3)
    treatment = [1.0] * S0 + [1.0, math.nan]
    assert onset_step(treatment, 1.0, S0, control) == S0 + 1  # not finite: always raised
    # control shorter than the treatment: the baseline condition alone beyond its end
    treatment = [1.0] * S0 + [1.0, 1.0, 1.0, 1.5, 1.5, 1.5]
    assert onset_step(treatment, 1.0, S0, control) == S0 + 3


def test_pair_onsets_on_saved_runs():
    treatment, control = _arms()
    treatment[-1] = None  # a non-finite loss as the JSON stores it
    runs = [{"seed": 0, "treated": True, "losses": treatment},
            {"seed": 0, "treated": False, "losses": control},
            {"seed": 1, "treated": True, "losses": list(control)}]  # no matched control
    pair_onsets(SC, runs)
    assert (runs[0]["onset_alone"], runs[0]["onset"]) == (S0, S0 + 10)
    # the control is its own counterfactual: never an onset, though the loss alone says S0
    assert (runs[1]["onset_alone"], runs[1]["onset"]) == (S0, None)
    assert runs[2]["onset"] == runs[2]["onset_alone"] == S0  # the baseline alone
