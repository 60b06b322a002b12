"""Alarm rules: each trips on a run built to trip it and stays quiet otherwise; old and new
metric names give the same findings; the deprecated rule name still works."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import landscape as ls
import landscape.alarms as ls_alarms
from landscape._names import metric_name_aliases
from landscape.alarms import (
    RULES,
    EdgeOfStability,
    LossExplosion,
    LossSpike,
    NonFiniteValues,
    OnlineAlarms,
    SignCollapse,
    TaylorRatio,
    default_rules,
)
from tests.alarms._support import (
    INF,
    NAN,
    findings_of,
    minority_series,
    one,
    sharpening,
    smooth_loss,
)

# --------------------------------------------------------------------------- edge of stability



def test_edge_of_stability_reads_the_edge_as_info_once_while_the_ratio_hovers_there():
    # progressive sharpening to the edge, then hovering around 1 for 150 rows: what full-batch
    # gradient descent does while its loss keeps falling (Cohen et al. 2021)
    ratio, cols = sharpening()
    steps = np.arange(len(ratio)) * 10
    found = one("edge_of_stability", findings_of({"sharpness": (steps, cols)}))
    first_info = int(np.argmax(ratio >= 0.9))
    assert [(f.severity, f.step) for f in found] == [("info", steps[first_info])]
    info = found[0]
    assert info.metric == "sharpness/ratio" and info.threshold == 0.9
    assert info.value == pytest.approx(ratio[first_info])
    assert "40" in info.message and "edge of stability" in info.message  # 2/lr is named
    assert "approaching" in info.message  # ratio < 1
    assert info.hint


def test_edge_of_stability_warns_far_past_the_edge_within_the_same_episode():
    ratio, cols = sharpening()
    ratio[200], ratio[201] = 11.9, 12.5  # a learning-rate spike on the hovering iterate
    cols = {**cols, "lambda_max": ratio * 40, "ratio": ratio}
    steps = np.arange(len(ratio))
    found = one("edge_of_stability", findings_of({"sharpness": (steps, cols)}))
    assert [(f.severity, f.step) for f in found] == [
        ("info", int(np.argmax(ratio >= 0.9))),
        ("warning", 201),
    ]
    warn = found[1]
    assert warn.threshold == 12.0 and warn.value == pytest.approx(12.5)
    assert "far past" in warn.message and "500" in warn.message  # lambda_max 12.5 * 40


def test_edge_of_stability_threshold_one_warns_at_the_edge_itself():
    ratio, cols = sharpening()
    steps = np.arange(len(ratio)) * 10
    rules = [EdgeOfStability(threshold=1.0)]
    found = findings_of({"sharpness": (steps, cols)}, rules)
    assert [(f.severity, f.step) for f in found] == [
        ("info", steps[int(np.argmax(ratio >= 0.9))]),
        ("warning", steps[int(np.argmax(ratio >= 1.0))]),
    ]
    assert "past the optimizer's linear-stability limit" in found[1].message
    assert "far past" not in found[1].message  # at the edge itself, not far past it


def test_edge_of_stability_quiet_below_the_threshold_and_uses_lambda_over_threshold():
    rng = np.random.default_rng(1)
    ratio = 0.6 + 0.1 * rng.random(200)
    steps = np.arange(200)
    cols = {"lambda_max": ratio * 40, "threshold": np.full(200, 40.0), "ratio": ratio}
    assert findings_of({"sharpness": (steps, cols)}) == []
    # ratio missing (NaN) but lambda_max and threshold present: the rule divides
    cols = {"lambda_max": np.array([44.0, 44.0, 520.0]), "threshold": np.full(3, 40.0),
            "ratio": [NAN] * 3}
    found = findings_of({"sharpness": ([0, 1, 2], cols)})
    assert [(f.severity, f.step) for f in found] == [("info", 0), ("warning", 2)]
    assert "1.1 >= 0.9: past the optimizer's stability limit" in found[0].message
    assert found[0].value == pytest.approx(1.1) and found[1].value == pytest.approx(13.0)


def test_edge_of_stability_approach_level_can_be_disabled():
    ratio, cols = sharpening()
    steps = np.arange(len(ratio))
    assert findings_of({"sharpness": (steps, cols)}, [EdgeOfStability(approach=None)]) == []
    rules = [EdgeOfStability(threshold=1.0, approach=None)]
    found = findings_of({"sharpness": (steps, cols)}, rules)
    assert found and all(f.severity == "warning" for f in found)


# --------------------------------------------------------------------------- taylor ratio


def test_taylor_ratio_informs_then_escalates_to_warning_and_error_in_one_episode():
    r = np.full(100, 0.3)
    r[50], r[51], r[52] = 1.5, 5.0, 2.0
    r[80], r[90] = 1.2, 2.5
    found = findings_of({"taylor": (np.arange(100), {"r": r})})
    assert [(f.step, f.severity, f.threshold) for f in found] == [
        (50, "info", 1.0),
        (51, "error", 4.0),
        (80, "info", 1.0),
        (90, "warning", 2.0),
    ]
    assert all(f.metric == "taylor/r" for f in found)


def test_taylor_ratio_quiet_inside_the_radius():
    rng = np.random.default_rng(2)
    assert findings_of({"taylor": (np.arange(300), {"r": 0.9 * rng.random(300)})}) == []


# --------------------------------------------------------------------------- sign collapse



def test_sign_collapse_fires_when_a_healthy_layer_loses_sign_diversity():
    m = minority_series()
    m[60:, 1] = 0.02
    found = findings_of({"spectral_alignment": (np.arange(100) * 5, {"minority": m})})
    assert len(found) == 1
    (f,) = found
    # info by default: on healthy runs (digits MLPs, a tiny LM) the statistic collapses on
    # post-ReLU/GELU inputs while the loss falls; severity="warning" restores the warning
    assert f.rule == "sign_collapse" and f.severity == "info"
    assert f.step == 61 * 5  # sustain = 2 rows: emitted at the row completing it
    assert f.value == pytest.approx(0.02) and f.threshold == 0.05
    assert "layer 'blocks.0.mlp.fc1':" in f.message and f.extra["layer"] == "blocks.0.mlp.fc1"


def test_sign_collapse_severity_can_be_raised_to_warning():
    m = minority_series()
    m[60:, 1] = 0.02
    found = findings_of({"spectral_alignment": (np.arange(100) * 5, {"minority": m})},
                        [SignCollapse(severity="warning")])
    assert [(f.severity, f.step) for f in found] == [("warning", 61 * 5)]
    with pytest.raises(ValueError, match="severity"):
        SignCollapse(severity="loud")


@pytest.mark.parametrize("make", [
    lambda: SignCollapse(severity="loud"),
    lambda: ls_alarms.GradNormSpike(severity="Warning"),
    lambda: ls_alarms.AttentionLogitGrowth(severity="warn"),
    lambda: ls_alarms.LossSpike(severity="critical"),
    lambda: ls_alarms.LogitGrowth(max_abs_severity="high"),
])
def test_a_bad_severity_setting_is_one_error_naming_it(make):
    with pytest.raises(ValueError, match=r"severity must be one of info, warning, error, got"):
        make()


def test_sign_collapse_stays_one_episode_on_a_layer_that_flickers_into_collapse():
    """Collapsed on 3 rows of every 5: a dip below sustain counted as a quiet row towards
    rearm, so the episode closed and fired again every 5 rows."""
    from landscape.alarms import OnlineAlarms

    alarms = OnlineAlarms([SignCollapse()])
    alarms.declare("spectral_alignment", {"layers": ["a", "b"]})
    rows = [[0.3, 0.3]] + [[v, 0.3] for _ in range(8) for v in (0.0, 0.0, 0.3, 0.0, 0.3)]
    found = [f.step for s, r in enumerate(rows)
             for f in alarms.observe("spectral_alignment", s, {"minority": np.array(r)})]
    assert found == [2]


def test_sign_collapse_episode_ends_while_other_layers_dip_once_each():
    """Single dips of other layers held A's episode open for ever (every row a SKIP), so
    D's real collapse 40 rows later raised nothing."""
    from landscape.alarms import OnlineAlarms

    alarms = OnlineAlarms([SignCollapse()])
    alarms.declare("spectral_alignment", {"layers": ["a", "b", "c", "d"]})
    rows = [[0.5] * 4] * 3 + [[0.0, 0.5, 0.5, 0.5]] * 2
    rows += [[0.5, 0.0, 0.5, 0.5] if k % 2 == 0 else [0.5, 0.5, 0.0, 0.5] for k in range(40)]
    rows += [[0.5, 0.5, 0.5, 0.0]] * 10
    found = [(f.step, f.extra["layer"]) for s, r in enumerate(rows)
             for f in alarms.observe("spectral_alignment", s, {"minority": np.array(r)})]
    assert found == [(4, "a"), (46, "d")]


def test_sign_collapse_quiet_at_init_collapse_and_on_a_single_dip():
    m = minority_series()
    m[:, 0] = 0.01  # collapsed from the first row: never healthy, never fires
    m[40, 2] = 0.0  # one-row dip: below sustain
    m[41, 1] = 0.0  # and another layer's, on the next row: sustain is per layer
    assert findings_of({"spectral_alignment": (np.arange(100), {"minority": m})}) == []
    # healthy=None opts into firing on collapse at init
    rules = [SignCollapse(healthy=None)]
    found = findings_of({"spectral_alignment": (np.arange(100), {"minority": m})}, rules)
    assert [f.step for f in found] == [1]


# --------------------------------------------------------------------------- loss spike


@pytest.mark.parametrize("seed", range(5))
def test_loss_spike_quiet_on_a_smooth_noisy_loss(seed):
    loss = smooth_loss(1000, seed)
    found = findings_of({"loss": (np.arange(1000), {"value": loss})})
    assert found == []


def test_loss_spike_fires_on_a_spike_and_once_per_blow_up():
    loss = smooth_loss(600, 7)
    loss[300] *= 3  # isolated spike
    loss[450:] = 10 * loss[450:]  # blow-up that stays
    found = one("loss_spike", findings_of({"loss": (np.arange(600), {"value": loss})}))
    assert [f.step for f in found] == [300, 450]
    # one row that rises by less than the initial loss is info (a hard batch); the
    # blow-up rises by more than the initial loss and warns on its first row
    assert [f.severity for f in found] == ["info", "warning"]
    f = found[0]
    assert f.metric == "loss/value" and "one row" in f.message
    assert f.value == pytest.approx(loss[300]) and f.threshold < f.value
    assert "median" in f.message and "learning rate" in f.hint


def test_loss_spike_on_two_rows_in_a_row_is_a_warning():
    loss = smooth_loss(600, 7)
    loss[300:302] *= 3  # two rows: info on the first, a warning on the second
    found = one("loss_spike", findings_of({"loss": (np.arange(600), {"value": loss})}))
    assert [(f.step, f.severity) for f in found] == [(300, "info"), (301, "warning")]
    assert "two rows in a row" in found[1].message


def hard_batches(n=600, seed=7, every=25, factor=8.0):
    """A loss trained from 2.3 to near zero, one hard batch (``factor`` x) every ``every`` rows.

    The hard batches (from row 200) rise by less than the initial loss: each is info.
    """
    rng = np.random.default_rng(seed)
    loss = 0.05 + 2.25 * np.exp(-np.arange(n) / 50) + 0.002 * rng.standard_normal(n)
    loss[200::every] *= factor
    return loss


def test_two_hard_batches_in_a_row_within_the_recent_range_are_info():
    # a batch of 8 near zero loss: a hard batch every 25 rows sets the window's range,
    # and two in a row that stay below it are no blow-up
    loss, clean = hard_batches(), hard_batches(every=10**6)
    loss[321:323] = 6.0 * clean[321:323]  # below the 8x hard batches
    found = one("loss_spike", findings_of({"loss": (np.arange(600), {"value": loss})}))
    assert 321 in [f.step for f in found] and all(f.severity == "info" for f in found)
    evaluate = LossSpike().evaluator("loss", {})  # the second row, as the rule sees it
    second = [evaluate(step, {"value": x}) for step, x in enumerate(loss)][322]
    assert second.severity == "info" and "within the range" in second.message
    # the same pair above every hard batch of the window warns on its second row
    loss[321:323] = 12.0 * clean[321:323]
    found = one("loss_spike", findings_of({"loss": (np.arange(600), {"value": loss})}))
    assert [(f.step, f.severity) for f in found if f.severity == "warning"] == [(322, "warning")]
    # new_high=False: any two rows in a row warn, as before
    loss[321:323] = 6.0 * clean[321:323]
    found = one("loss_spike", findings_of({"loss": (np.arange(600), {"value": loss})},
                                           [LossSpike(new_high=False)]))
    assert (322, "warning") in [(f.step, f.severity) for f in found]


def test_a_pair_whose_second_row_falls_back_into_the_range_is_info():
    loss = hard_batches()
    loss[321] = 12.0 * loss[321]  # above every hard batch
    loss[322] = 6.0 * loss[322]  # but the next row is within their range
    found = one("loss_spike", findings_of({"loss": (np.arange(600), {"value": loss})}))
    assert 321 in [f.step for f in found] and all(f.severity == "info" for f in found)


def test_a_plateau_within_the_range_of_hard_batches_warns_on_its_third_row():
    loss, clean = hard_batches(), hard_batches(every=10**6)
    loss[321:345] = 6.0 * clean[321:345]  # stays at 6x, below the 8x hard batches
    found = one("loss_spike", findings_of({"loss": (np.arange(600), {"value": loss})}))
    warned = [f for f in found if f.severity == "warning"]
    assert warned and warned[0].step == 323 and "3 rows in a row" in warned[0].message


def test_one_row_within_three_times_the_windows_largest_is_info():
    """Hard batches back at the untrained loss (batch 8 near zero loss) set the window's
    range; one row above the initial loss but under 3x that range is info, one above it
    (a corrupted batch, a learning-rate spike) warns at once."""
    loss = hard_batches()
    loss[200::25] = 2.0  # every 25th row: a hard batch near the untrained loss
    evaluate = LossSpike().evaluator("loss", {})
    quiet = loss.copy()
    quiet[321] = 4.0  # rises by more than the initial loss (about 2.2), under 3 x 2.0
    rows = [evaluate(step, {"value": x}) for step, x in enumerate(quiet)]
    assert rows[321].severity == "info" and "one row" in rows[321].message
    plain = LossSpike(single_row_outlier=None).evaluator("loss", {})
    assert [plain(step, {"value": x}) for step, x in enumerate(quiet)][321].severity == "warning"
    loud = loss.copy()
    loud[321] = 6.5  # above 3 x the window's largest
    evaluate = LossSpike().evaluator("loss", {})
    rows = [evaluate(step, {"value": x}) for step, x in enumerate(loud)]
    assert rows[321].severity == "warning" and "rows in a row" not in rows[321].message
    stays = loss.copy()
    stays[321:323] = 4.0  # the same row, and the next as high: a blow-up
    evaluate = LossSpike().evaluator("loss", {})
    rows = [evaluate(step, {"value": x}) for step, x in enumerate(stays)]
    assert (rows[321].severity, rows[322].severity) == ("info", "warning")
    assert "two rows in a row" in rows[322].message
    # two hard batches in a row, both above the initial loss but below the window's
    # largest: the two-row test holds them back too
    pair = loss.copy()
    pair[200::25] = 2.6
    pair[321:323] = 2.4
    evaluate = LossSpike().evaluator("loss", {})
    rows = [evaluate(step, {"value": x}) for step, x in enumerate(pair)]
    assert (rows[321].severity, rows[322].severity) == ("info", "info")
    assert "within the range" in rows[322].message
    # an outlier right after a row inside the range warns at once (a blow-up's first
    # row often still looks like a hard batch)
    jump = loss.copy()
    jump[321], jump[322] = 1.5, 30.0
    evaluate = LossSpike().evaluator("loss", {})
    rows = [evaluate(step, {"value": x}) for step, x in enumerate(jump)]
    assert (rows[321].severity, rows[322].severity) == ("info", "warning")
    with pytest.raises(ValueError, match="single_row_outlier"):
        LossSpike(single_row_outlier=-1.0)


def test_two_rows_one_hard_sample_each_explains_are_info_for_a_small_batch():
    """A batch of 8 near zero loss, no hard batch in the window: two rows in a row rising
    0.45 and 0.55 (one confidently wrong sample in each batch) are new highs, but one
    sample of a batch of 8 moves the mean by up to 3 x the initial loss / 8 (about 0.86
    here): info. The same rows in batches of 32 (0.22), or with no batch size, warn on the
    second row; a third row in a row warns whatever the batch."""
    clean = hard_batches(every=10**6)
    pair = clean.copy()
    pair[321:323] = [0.45, 0.55]

    def severities(loss, samples, **kw):
        evaluate = LossSpike(**kw).evaluator("loss", {})
        row = {} if samples is None else {"samples": float(samples)}
        return [(t.severity, t.message) if t else None
                for t in (evaluate(s, {"value": x, **row}) for s, x in enumerate(loss))]

    small = severities(pair, 8)
    assert [r[0] for r in small[321:323]] == ["info", "info"]
    assert "one hard sample in a batch of 8" in small[322][1]
    assert severities(pair, 32)[322][0] == "warning"
    assert severities(pair, None)[322][0] == "warning"
    assert severities(pair, 8, single_sample=None)[322][0] == "warning"
    # one of the two rows beyond one sample's reach: the pair warns
    beyond = clean.copy()
    beyond[321:323] = [0.45, 1.2]
    assert severities(beyond, 8)[322][0] == "warning"
    plateau = clean.copy()
    plateau[321:324] = [0.45, 0.55, 0.5]
    rows = severities(plateau, 8)
    assert rows[323][0] == "warning" and "3 rows in a row" in rows[323][1]
    # a jump by more than the untrained loss: one sample of 8 cannot explain it; one sample
    # of a batch of 1 or 2 can (a sample at p = 1e-3 has 3 x the untrained loss): there it
    # is info until a third row in a row, as a batch of 2 near zero loss with one
    # confidently wrong sample in two batches in a row does (the recipes audit: 2.40 and
    # 1.86 over a median of 0.015, an initial loss of 2.23, warned on a healthy run)
    jump = clean.copy()
    jump[321] = 5.0
    assert severities(jump, 8)[321][0] == "warning"
    assert severities(jump, 1)[321][0] == "info"
    two = clean.copy()
    two[321:323] = [2.40, 1.86]
    assert [r[0] for r in severities(two, 2)[321:323]] == ["info", "info"]
    assert severities(two, 8)[322][0] == "warning"
    stays = clean.copy()
    stays[321:324] = 5.0
    assert severities(stays, 1)[323][0] == "warning"
    far = clean.copy()  # beyond one sample's reach even in a batch of 1
    far[321] = 30.0
    assert severities(far, 1)[321][0] == "warning"
    assert severities(pair, 1)[322][0] == "info"  # a smaller pair: one sample of 1 explains it
    with pytest.raises(ValueError, match="single_sample"):
        LossSpike(single_sample=0.0)


@pytest.mark.parametrize("shift", [0.0, -3.0])
def test_the_range_of_one_row_does_not_depend_on_where_the_loss_sits(shift):
    """A negative log-likelihood of a density may be negative: shifted below zero, the
    window's range still holds the hard batch back and lets the outlier warn (the range
    was once a multiple of the window's maximum, which a negative maximum inverts)."""
    loss = hard_batches()
    loss[200::25] = 2.0
    loss[321], loss[400] = 4.0, 6.5  # within the range (info); an outlier (a warning)
    evaluate = LossSpike(initial_floor=None).evaluator("loss", {})
    rows = [evaluate(step, {"value": x + shift}) for step, x in enumerate(loss)]
    assert (rows[321].severity, rows[400].severity) == ("info", "warning")


def test_loss_spike_needs_history_and_a_relative_jump():
    loss = smooth_loss(200, 8)
    loss[10] *= 5  # before min_history
    assert findings_of({"loss": (np.arange(200), {"value": loss})}) == []
    # a very smooth loss: a 20 % bump is a huge z-score but below 1.5 x the median
    loss = np.linspace(1.0, 0.9, 200)
    loss[150] *= 1.2
    assert findings_of({"loss": (np.arange(200), {"value": loss})}) == []
    loss[150] *= 2
    assert [f.step for f in findings_of({"loss": (np.arange(200), {"value": loss})})] == [150]


def test_loss_spike_cusum_catches_a_sustained_rise_the_zscore_misses():
    rng = np.random.default_rng(9)
    loss = 1.0 + 0.05 * rng.standard_normal(400)
    loss[200:] += 0.25  # +5 sigma plateau, only 1.25 x the median
    steps = np.arange(400)
    assert findings_of({"loss": (steps, {"value": loss})}) == []
    found = findings_of({"loss": (steps, {"value": loss})}, [LossSpike(method="cusum")])
    assert len(found) == 1 and 200 <= found[0].step <= 210
    assert found[0].threshold == 12.0 and "CUSUM" in found[0].message
    # and CUSUM stays quiet on a smooth noisy loss
    assert (
        findings_of(
            {"loss": (np.arange(1000), {"value": smooth_loss(1000, 3)})},
            [LossSpike(method="cusum")],
        )
        == []
    )


# --------------------------------------------------------------------------- grad-norm spike


def test_grad_norm_spike_fires_on_a_jump_and_not_on_heavy_tailed_noise():
    rng = np.random.default_rng(10)
    g = np.exp(0.25 * rng.standard_normal(800))  # log-normal minibatch gradient norms
    steps = np.arange(800)
    assert findings_of({"grad_norm": (steps, {"value": g})}) == []
    g[500] = 8 * np.median(g)
    found = findings_of({"grad_norm": (steps, {"value": g})})
    assert [(f.rule, f.step, f.metric) for f in found] == [
        ("grad_norm_spike", 500, "grad_norm/value")
    ]
    assert "clip" in found[0].hint


# --------------------------------------------------------------------------- logit growth


def test_logit_growth_fires_on_large_logits_and_softmax_collapse():
    max_abs = np.linspace(10, 150, 100)
    sc = np.zeros(100)
    found = findings_of({"logits": (np.arange(100), {"max_abs": max_abs, "softmax_collapse": sc})})
    assert [(f.step, f.metric) for f in found] == [
        (int(np.argmax(max_abs >= 100)), "logits/max_abs")
    ]
    sc[30:33] = 0.25
    found = findings_of(
        {"logits": (np.arange(100), {"max_abs": np.full(100, 20.0), "softmax_collapse": sc})}
    )
    assert [(f.step, f.metric, f.value) for f in found] == [(30, "logits/softmax_collapse", 0.25)]
    assert "25%" in found[0].message and "z-loss" in found[0].hint


def test_logit_growth_quiet_on_moderate_logits():
    rng = np.random.default_rng(11)
    cols = {"max_abs": 20 + 30 * rng.random(200), "softmax_collapse": np.zeros(200)}
    assert findings_of({"logits": (np.arange(200), cols)}) == []


# --------------------------------------------------------------------------- rank collapse


def test_rank_collapse_fires_after_warmup_when_rank_halves():
    rank = np.concatenate([np.linspace(5, 40, 5), np.full(50, 40.0), np.full(20, 15.0)])
    found = findings_of({"representation": (np.arange(len(rank)), {"effective_rank": rank})})
    assert [(f.rule, f.step, f.threshold) for f in found] == [("rank_collapse", 55, 20.0)]


def test_rank_collapse_quiet_on_warmup_transients_and_mild_decline():
    rank = np.concatenate(
        [[40.0, 30, 10, 12, 15], np.linspace(15, 40, 30), np.linspace(40, 25, 40)]
    )
    assert findings_of({"representation": (np.arange(len(rank)), {"effective_rank": rank})}) == []


# --------------------------------------------------------------------------- non-finite


def test_nonfinite_loss_and_flags_are_errors_once_per_episode():
    loss = smooth_loss(100, 12)
    loss[60:] = NAN  # diverged for good
    flags_grad = np.zeros(100)
    flags_grad[20] = 1.0
    flags_loss = np.zeros(100)
    flags_loss[60:] = 1.0
    found = findings_of(
        {
            "loss": (np.arange(100), {"value": loss}),
            "nonfinite": (np.arange(100), {"loss": flags_loss, "grad": flags_grad}),
        }
    )
    assert [(f.step, f.rule, f.severity, f.metric) for f in found] == [
        (20, "nonfinite", "error", "nonfinite/grad"),
        (60, "nonfinite", "error", "loss/value"),  # the flag at 60 says the same: not repeated
    ]
    assert "nan" in found[1].message


def test_nonfinite_quiet_on_finite_values_and_failed_flags():
    cols = {"loss": [0.0, NAN, 0.0], "grad": [0.0, NAN, 0.0]}
    series = {
        "loss": ([0, 1, 2], {"value": [1.0, 0.9, 0.8]}),
        "nonfinite": ([0, 1, 2], cols),
    }
    assert findings_of(series) == []
    # inf loss fires too
    (f,) = findings_of({"loss": ([0, 1], {"value": [1.0, -INF]})})
    assert f.step == 1 and "-inf" in f.message




def test_two_spike_rules_on_one_metric_need_distinct_names_and_both_report():
    rng = np.random.default_rng(16)
    loss = 1.0 + 0.05 * rng.standard_normal(300)
    loss[100] = 3.0  # isolated spike: z-score rule only
    loss[200:] += 0.25  # sustained rise: CUSUM only
    rules = [LossSpike(), LossSpike(method="cusum", name="loss_drift")]
    found = findings_of({"loss": (np.arange(300), {"value": loss})}, rules)
    assert [(f.rule, f.step) for f in found] == [("loss_spike", 100), ("loss_drift", 203)]




# --------------------------------------------------------------------------- renamed names


def test_old_and_new_metric_names_give_the_same_findings():
    """``taylor`` became ``taylor_radius``: a run recorded under either name is checked alike."""
    r = np.full(100, 0.3)
    r[50], r[51], r[52] = 1.5, 5.0, 2.0
    r[80] = 1.2
    old = findings_of({"taylor": (np.arange(100), {"r": r})})
    new = findings_of({"taylor_radius": (np.arange(100), {"r": r})})
    assert [(f.step, f.severity, f.threshold) for f in new] == [
        (50, "info", 1.0),
        (51, "error", 4.0),
        (80, "info", 1.0),
    ]
    assert all(f.metric == "taylor/r" for f in old)
    assert all(f.metric == "taylor_radius/r" for f in new)
    as_new = [replace(f, metric=f.metric.replace("taylor/", "taylor_radius/")) for f in old]
    assert as_new == new
    assert [f.message for f in old] == [f.message for f in new]
    # online too: the rule watches both names
    alarms = OnlineAlarms([TaylorRatio()])
    assert [f.step for f in alarms.observe("taylor_radius", 0, {"r": 2.0})] == [0]
    assert [f.step for f in alarms.observe("taylor", 0, {"r": 2.0})] == [0]


def test_every_default_rule_watches_both_names_of_a_renamed_metric():
    for rule in default_rules():
        for metric in rule.metrics:
            assert set(metric_name_aliases(metric)) <= set(rule.metrics), rule.name
    assert TaylorRatio().metrics == ("taylor_radius", "taylor")


def test_nonfinite_rule_is_now_nonfinite_values_and_the_old_name_warns():
    import landscape.alarms as alarms

    with pytest.warns(DeprecationWarning, match="NonFiniteValues"):
        old = alarms.NonFinite
    assert old is NonFiniteValues
    with pytest.warns(DeprecationWarning, match="NonFiniteValues"):
        from landscape.alarms import NonFinite  # noqa: F401
    # the rule's name in findings and in default_rules is unchanged
    assert NonFiniteValues().name == "nonfinite" and RULES["nonfinite"] is NonFiniteValues
    with pytest.raises(AttributeError, match="no_such_name"):
        alarms.no_such_name  # noqa: B018


def test_one_hard_sample_near_zero_loss_is_not_a_spike_but_a_blow_up_is():
    # a classifier from 2.3 (median of its first 20 rows 1.4) down to a cross-entropy of
    # ~0.02 (batch 32), where one sample with loss 5.5 lifts the batch loss to 0.18:
    # far above the window's noise, yet a healthy run
    rng = np.random.default_rng(0)
    loss = np.concatenate([2.3 * np.exp(-np.arange(100) / 20),
                           0.021 * np.exp(0.2 * rng.standard_normal(300))])
    hard = loss.copy()
    hard[250] = 0.182
    steps = np.arange(len(loss))

    def spikes(values, **settings):
        alarms = OnlineAlarms(default_rules(**({"loss_spike": settings} if settings else {})))
        for s, v in zip(steps, values):
            alarms.observe("loss", int(s), {"value": float(v)})
        return [f for f in alarms.findings if f.rule == "loss_spike"]

    assert not spikes(hard)
    assert [f.step for f in spikes(hard, initial_floor=0.05)] == [250]  # the old floor
    blow_up = loss.copy()
    blow_up[250:] = 1.5  # an abrupt jump to 2/3 of the initial loss: at the first step
    assert [f.step for f in spikes(blow_up)] == [250]


def test_with_rules_adds_the_users_rules_and_replaces_a_built_in_by_name():
    from landscape.alarms import LossSpike, NonFiniteValues, default_rules, with_rules

    mine = NonFiniteValues(name="nonfinite_again")
    rules = with_rules([mine, LossSpike(z=10)])
    names = [r.name for r in rules]
    assert names == [r.name for r in default_rules()] + ["nonfinite_again"]
    spike = rules[names.index("loss_spike")]
    assert spike.z == 10 and rules[-1] is mine


def test_logit_growth_reports_the_more_severe_of_its_two_conditions():
    from landscape.alarms import LogitGrowth, OnlineAlarms

    row = {"max_abs": 150.0, "softmax_collapse": 0.8}
    (f,) = OnlineAlarms([LogitGrowth(collapse_warn=0.5)]).observe("logits", 0, row)
    assert (f.severity, f.metric) == ("warning", "logits/softmax_collapse")
    (f,) = OnlineAlarms([LogitGrowth()]).observe("logits", 0, row)  # both info: max_abs
    assert (f.severity, f.metric) == ("info", "logits/max_abs")


def test_taylor_ratio_warns_on_the_median_sample_and_keeps_the_max_for_info():
    """One hard sample decides the max over the batch (r = 10 on a healthy row whose median
    sample is at 0.1): info. A step that moves the whole batch (median 3) warns. Rows
    recorded before r_median existed read r, as before."""
    from landscape.alarms import OnlineAlarms, TaylorRatio

    alarms = OnlineAlarms([TaylorRatio()])
    rows = [(10.0, 0.1), (0.1, 0.05), (0.1, 0.05), (0.1, 0.05), (10.0, 3.0)]
    found = [f for i, (r, med) in enumerate(rows)
             for f in alarms.observe("taylor_radius", 10 * i, {"r": r, "r_median": med})]
    assert [(f.step, f.severity) for f in found] == [(0, "info"), (40, "warning")]
    assert found[1].metric == "taylor_radius/r_median" and found[1].value == 3.0
    old = OnlineAlarms([TaylorRatio()]).observe("taylor_radius", 0, {"r": 10.0})
    assert [(f.severity, f.value) for f in old] == [("error", 10.0)]
    legacy = OnlineAlarms([TaylorRatio(robust_field=None)]).observe(
        "taylor_radius", 0, {"r": 10.0, "r_median": 0.1})
    assert [f.severity for f in legacy] == ["error"]


def test_taylor_ratio_of_a_median_over_a_few_samples_is_info():
    """A loader's one-sample last batch: its median sample is its only one, as fragile as
    the largest (an error, r_median = 4.7, on a healthy run; review). From 8 samples on
    the median warns and errs as before; rows without ``samples`` as before."""
    from landscape.alarms import OnlineAlarms, TaylorRatio

    def severities(samples, rule=None):
        alarms = OnlineAlarms([rule or TaylorRatio()])
        row = {"r": 4.7, "r_median": 4.7}
        if samples is not None:
            row["samples"] = samples
        return [(f.severity, f.metric) for f in alarms.observe("taylor_radius", 0, row)]

    assert severities(1.0) == [("info", "taylor_radius/r_median")]
    assert severities(7.0) == [("info", "taylor_radius/r_median")]
    assert severities(8.0) == [("error", "taylor_radius/r_median")]
    assert severities(None) == [("error", "taylor_radius/r_median")]
    assert severities(1.0, TaylorRatio(min_samples=None)) == [("error", "taylor_radius/r_median")]
    with pytest.raises(ValueError, match="min_samples"):
        TaylorRatio(min_samples=0)


def test_a_rules_evaluator_still_takes_params_with_a_deprecation_warning():
    """The argument was renamed config; a user rule calling
    super().evaluator(metric, params=...) broke without a deprecation period."""
    rule = SignCollapse()
    with pytest.warns(DeprecationWarning, match="'params' is deprecated, use 'config'"):
        evaluate = rule.evaluator("spectral_alignment", params={"layers": ["a", "b"]})
    assert callable(evaluate)
    assert callable(ls_alarms.LossSpike().evaluator("loss", config={}))


def test_a_batch_far_smaller_than_the_usual_one_is_no_spike_warning():
    """A loader's one-sample last batch every 24 steps (``drop_last=False``): its gradient
    norm, a mean over 1 sample instead of 64, warned on a healthy run (review: 16.4 against
    a median of 0.74). The same jump on a batch of the usual size still warns."""
    rng = np.random.default_rng(3)
    n = 300
    g = np.exp(0.2 * rng.standard_normal(n))
    samples = np.full(n, 64.0)
    samples[23::24] = 1.0
    g[23::24] *= 8.0  # a one-sample mean: 8 times the spread (sqrt 64)
    g[47] = 25 * np.median(g)  # the second, as high as the review's
    series = {"grad_norm": (np.arange(n), {"value": g, "samples": samples})}
    found = [f for f in findings_of(series) if f.rule == "grad_norm_spike"]
    assert all(f.severity == "info" for f in found)
    (at_47,) = [f for f in found if f.step == 47]
    assert "on a batch of 1 samples, the usual being 64" in at_47.message
    samples[47] = 64.0  # the same rise on a full batch: a warning
    found = findings_of({"grad_norm": (np.arange(n), {"value": g, "samples": samples})})
    assert [(f.step, f.severity) for f in found if f.severity == "warning"] == [(47, "warning")]
    # the loss rule reads it too, and small_batch=None turns it off
    off = findings_of(series, [ls.alarms.GradNormSpike(small_batch=None)])
    assert (47, "warning") in [(f.step, f.severity) for f in off]


def test_small_batches_between_usual_ones_neither_count_nor_break_a_run_of_high_rows():
    """A loader that alternates batches of 64 and 8 (bucketing by length): a real blow-up
    from step 200 gave info findings only, each small row having ended the run of high
    rows the next usual one needed (review). It warns at 220, as without small_batch."""
    rng = np.random.default_rng(0)
    n = 300
    g = np.exp(0.1 * rng.standard_normal(n))
    samples = np.where(np.arange(n) % 2 == 0, 64.0, 8.0)
    g[200:] *= np.linspace(3, 50, n - 200)
    series = {"grad_norm": (np.arange(n), {"value": g, "samples": samples})}
    warned = [f.step for f in findings_of(series) if f.severity == "warning"]
    off = [f.step for f in findings_of(series, [ls.alarms.GradNormSpike(small_batch=None)])
           if f.severity == "warning"]
    assert warned and warned[0] == off[0] == 220


def _heavy_tailed_rows(steps, batch, seed, dof=3.0):
    """Batch means of squared errors under Student-t noise, and their 5 %-trimmed means."""
    rng = np.random.default_rng(seed)
    errors = 0.2 * rng.standard_normal((steps, batch)) + 0.3 * rng.standard_t(dof, (steps, batch))
    losses = np.sort(errors**2, axis=1)
    kept = batch - max(1, int(np.ceil(0.05 * batch)))
    return losses.mean(axis=1), losses[:, :kept].mean(axis=1)


def test_heavy_tailed_regression_noise_is_no_spike_but_a_broad_rise_is():
    """A squared error under Student-t(3) noise has no bound on one sample's loss: one or
    two samples lift a batch of 64 tenfold now and then, and the one-row test warned about
    4 times per 1,000 steps on a healthy run (review: 3.6). The batch's trimmed mean (the
    loss metric's ``trimmed``) shows the rest of the batch did not rise: info. A rise of
    the whole batch (its trimmed mean rising with it) still warns at its first row."""
    value, trimmed = _heavy_tailed_rows(8000, 64, seed=0)
    rows = {"value": value, "samples": np.full(value.size, 64.0), "trimmed": trimmed}
    series = {"loss": (np.arange(value.size), rows)}

    def warnings(rules=None):
        return [f for f in findings_of(series, rules) if f.rule == "loss_spike"
                and f.severity == "warning"]

    before = warnings([LossSpike(trimmed_mean=False)])
    assert len(before) >= 16  # >= 2 per 1,000 steps without the trimmed mean
    # a tenth of that: what is left are two heavy-tailed rows in a row, both above the
    # window, which the two-row test judges as it judges a ramp's first rows
    assert len(warnings()) <= len(before) // 8
    infos = [f for f in findings_of(series) if f.rule == "loss_spike"]
    assert any("is no spike: a few samples?" in f.message for f in infos)
    # the same noise, and the whole batch rising fivefold at step 6000: a warning there
    value[6000:], trimmed[6000:] = 5 * value[6000:], 5 * trimmed[6000:]
    assert 6000 in [f.step for f in warnings()]


def test_a_trimmed_mean_that_is_itself_a_spike_keeps_the_row_a_warning():
    """Only a trimmed mean short of a spike holds a row back: a corrupted batch lifts
    every sample (trimmed ~ value), and a row without the field is judged as before."""
    value, trimmed = _heavy_tailed_rows(400, 64, seed=1, dof=30.0)  # near Gaussian
    value[300] = trimmed[300] = 20 * np.median(value)
    for fields in ({"trimmed": trimmed}, {}):
        rows = {"value": value, **fields}
        found = findings_of({"loss": (np.arange(value.size), rows)})
        assert (300, "warning") in [(f.step, f.severity) for f in found]
    with pytest.raises(ValueError, match="trimmed_mean"):
        LossSpike(trimmed_mean=1)


def test_a_loss_that_explodes_in_its_first_steps_warns_within_a_few_rows():
    """A learning rate far too high: 2.3 -> 600 within 10 steps, then a plateau of
    hundreds. The spike rule's window and the regression rule's lowest median already
    held the explosion, and a 300-step run passed the default gate (review)."""
    rng = np.random.default_rng(0)
    first = [2.31, 3.24, 33.34, 112.12, 153.74, 332.53, 559.7, 742.95]  # the review's lr 10
    loss = np.concatenate([first, 1000 * np.exp(0.3 * rng.standard_normal(292))])
    found = findings_of({"loss": (np.arange(loss.size), {"value": loss})})
    boom = [f for f in found if f.rule == "loss_explosion"]
    assert [(f.step, f.severity) for f in boom] == [(8, "warning")]  # rows 6, 7, 8
    assert "times the initial loss 33.34 (the largest of the first 3 rows)" in boom[0].message
    assert boom[0].extra["initial"] == 33.34
    # without it, nothing reaches a warning: the gap it closes
    rules = [r for r in ls_alarms.default_rules() if r.name != "loss_explosion"]
    assert not [f for f in findings_of({"loss": (np.arange(loss.size), {"value": loss})},
                                       rules) if f.severity != "info"]


def test_loss_explosion_quiet_on_hard_batches_a_catapult_and_a_loss_without_scale():
    """Also on batches of one sample, whose first losses scatter over orders of magnitude:
    the lowest of the first 3 rows (0.004 after 2.87) warned on healthy runs (own-diff
    review); their largest does not."""
    rng = np.random.default_rng(1)
    single = 8 * rng.chisquare(1, size=(20, 300)) * np.exp(-np.arange(300) / 100)
    single[:, :3] = [2.872, 0.004, 0.343]
    for loss in single:
        assert findings_of({"loss": (np.arange(loss.size), {"value": loss})},
                           [LossExplosion()]) == []
    healthy = 2.3 * np.exp(-np.arange(400) / 80) + 0.05 * rng.random(400)
    healthy[[150, 151, 300]] = 40.0  # two hard batches in a row, and one more: not 3
    catapult = healthy.copy()
    catapult[20:26] = [5, 9, 14, 12, 6, 3]  # a catapult: up to 6 x, back within steps
    negative = healthy - 3.0  # a log-likelihood below zero: no scale
    for loss in (healthy, catapult, negative):
        found = findings_of({"loss": (np.arange(loss.size), {"value": loss})},
                            [LossExplosion()])
        assert found == []
    with pytest.raises(ValueError, match="ratio"):
        LossExplosion(ratio=1.0)
    with pytest.raises(ValueError, match="initial_rows"):
        LossExplosion(initial_rows=0)
