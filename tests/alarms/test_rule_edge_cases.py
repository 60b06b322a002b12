"""Rules against what docs/alarms.md says at their edges: the forecast horizon in rows, a
series at exactly zero, CUSUM's severity, settings checked when a rule is made, one finding
per step and rule (the most severe), the threshold a warning crossed, leads around steps
without a loss, a flickering layer's episode, and the Taylor level's growth condition."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from landscape.alarms import (
    SKIP,
    GradNormSpike,
    LossRegression,
    LossSpike,
    OnlineAlarms,
    Rule,
    SharpnessForecast,
    SignCollapse,
    TaylorForecast,
    Trigger,
    check,
    row_value,
    warning_leads,
)
from landscape.alarms.leads import loss_milestones
from landscape.findings import Finding
from landscape.store import RunWriter
from tests.alarms._support import make_writer

NAN = float("nan")


def _feed(rule, metric, rows):
    alarms = OnlineAlarms([rule])
    return [f for step, row in rows for f in alarms.observe(metric, step, row)]


def test_sharpness_forecast_horizon_counts_rows_whatever_their_spacing():
    """The ratio rises 20 % a row (0.4 -> 0.83): at 0.69 the fit reaches 1 within 2 rows.
    Rows a step apart or 100 steps apart (sharpness every 100) forecast at the same row."""
    ratios = [0.4, 0.48, 0.576, 0.691, 0.829]
    every_step = _feed(SharpnessForecast(), "sharpness",
                       [(i, {"ratio": v}) for i, v in enumerate(ratios)])
    assert [f.step for f in every_step] == [3]
    sparse = _feed(SharpnessForecast(), "sharpness",
                   [(100 * i, {"ratio": v}) for i, v in enumerate(ratios)])
    assert [f.step for f in sparse] == [300]
    # still said in steps: 2.03 rows, 3 steps rounded up a step apart, 203 a hundred apart
    assert 100 * (every_step[0].extra["steps_to_limit"] - 1) \
        < sparse[0].extra["steps_to_limit"] <= 100 * every_step[0].extra["steps_to_limit"]


@pytest.mark.parametrize(("rule", "metric"),
                         [(LossSpike(), "loss"), (GradNormSpike(), "grad_norm")])
def test_a_rise_from_a_series_at_exactly_zero_is_no_spike(rule, metric):
    """A hinge or masked loss at exactly 0, or the gradient norm of frozen parameters: no
    level to call a rise large by (it was a warning at z = 1000 for 1e-9)."""
    rows = [(s, {"value": 0.0}) for s in range(30)] + [(30, {"value": 1e-9}), (31, {"value": 1.0})]
    assert _feed(rule, metric, rows) == []


def test_cusum_findings_take_the_rules_severity():
    rng = np.random.default_rng(0)
    g = 1.0 + 0.05 * rng.standard_normal(200)
    g[100:] += 0.5
    rows = [(s, {"value": float(v)}) for s, v in enumerate(g)]
    found = _feed(GradNormSpike(method="cusum"), "grad_norm", rows)  # info by default
    assert found and {f.severity for f in found} == {"info"}
    found = _feed(LossSpike(method="cusum", severity="info"), "loss", rows)
    assert found and {f.severity for f in found} == {"info"}
    assert {f.severity for f in _feed(LossSpike(method="cusum"), "loss", rows)} == {"warning"}


@pytest.mark.parametrize(("make", "named"), [
    (lambda: SharpnessForecast(severity="warn"), "severity"),
    (lambda: TaylorForecast(warmup="100"), "warmup"),
    (lambda: TaylorForecast(warmup=-1), "warmup"),
    (lambda: TaylorForecast(trend=True, growth=None), "growth"),
    (lambda: TaylorForecast(trend=True, near_high=None), "near_high"),
])
def test_bad_forecast_settings_are_a_value_error_when_the_rule_is_made(make, named):
    """Not at the first row that fires (where the monitor would switch the rule off)."""
    with pytest.raises(ValueError, match=named):
        make()


def test_check_keeps_one_finding_per_step_and_rule_where_observe_gives_each_streams():
    """A NaN loss the nonfinite metric also flags: two streams of one rule (docs)."""
    alarms = OnlineAlarms()
    online = (alarms.observe("nonfinite", 5, {"loss": 1.0, "grad": 1.0})
              + alarms.observe("loss", 5, {"value": NAN}))
    assert sorted(f.metric for f in online) == ["loss/value", "nonfinite/loss"]
    w = make_writer({"nonfinite": ([5], {"loss": [1.0], "grad": [1.0]}),
                     "loss": ([5], {"value": [NAN]})})
    (kept,) = check(w)
    assert (kept.step, kept.rule, kept.severity) == (5, "nonfinite", "error")


@dataclass
class _Level(Rule):
    """A rule of the user's on two metrics: info from 0.1, a warning from 1."""

    metrics: tuple = ("update", "update_ema")
    name: str = "update_level"

    def evaluate(self, metric, row):
        v = row_value(row, "relative")
        if v is None:
            return SKIP
        if v < 0.1:
            return None
        return Trigger("warning" if v >= 1.0 else "info", "relative", v, 0.1, f"{metric} {v}",
                       "lower the lr")


def test_one_finding_per_step_and_rule_is_the_most_severe():
    """The first by metric name was kept: update's info hid update_ema's warning."""
    w = make_writer({"update": ([7], {"relative": [0.5]}),
                     "update_ema": ([7], {"relative": [5.0]})})
    (f,) = check(w, [_Level()])
    assert (f.severity, f.metric) == ("warning", "update_ema/relative")


def test_a_gradient_norm_warning_reports_the_threshold_it_crossed():
    """The warning is decided at warn_ratio (10x the level), not at the info's 2x."""
    rng = np.random.default_rng(0)
    g = np.exp(0.1 * rng.standard_normal(100))
    g[60] = 30.0
    (f,) = _feed(GradNormSpike(), "grad_norm", [(s, {"value": float(v)}) for s, v in enumerate(g)])
    assert f.severity == "warning"
    assert f.threshold == pytest.approx(10 * f.extra["median"])


def test_warning_leads_skip_the_steps_whose_loss_was_not_measured():
    """The monitor writes NaN for a step without a loss and lists it as unmeasured: that
    row is neither the blow-up nor part of the baseline."""
    w = RunWriter.memory()
    w.declare("loss", {"value": ()})
    w.declare("unmeasured", {"metrics": "S16"})
    for s in range(300):
        w.append("loss", s, {"value": NAN if s in (120, 180) else (
            1.0 if s < 200 else 1.1 ** (s - 200))})
    for s in (120, 180):
        w.append("unmeasured", s, {"metrics": "loss"})
    f = Finding(210, "taylor_forecast", "warning", "sentinels/r_secant", 1.0, 1.0, "m")
    assert warning_leads(w, [f], after=100) == (225, {"taylor_forecast": 15})
    # a NaN the training produced (not listed as unmeasured) is a blow-up
    w.append("loss", 300, {"value": NAN})
    assert warning_leads(w, [f], after=250) == (250, {})


def test_loss_milestones_baseline_leaves_out_non_finite_rows():
    losses = [1.0] * 150 + [NAN] + [1.0] * 49 + [1.1 ** k for k in range(100)]
    base, onset, explosion = loss_milestones(losses, 200)
    assert base == 1.0 and onset is not None and explosion == 225


def test_a_flickering_layer_keeps_its_sign_collapse_episode_open():
    """Layer a fires (rows 1-2), then never stays out of collapse for rearm (3) rows in a
    row: its one-row dips keep the episode open, so it does not fire again at row 8."""
    alarms = OnlineAlarms([SignCollapse()])
    alarms.declare("spectral_alignment", {"layers": ["a", "b"]})
    a = [0.3, 0.0, 0.0, 0.3, 0.0, 0.3, 0.3, 0.0, 0.0]
    found = [f.step for s, v in enumerate(a)
             for f in alarms.observe("spectral_alignment", s, {"minority": np.array([v, 0.3])})]
    assert found == [2]
    # out of collapse for rearm rows: a later collapse is a new episode
    later = [0.3, 0.3, 0.3, 0.0, 0.0]
    found = [f.step for s, v in enumerate(later, start=9)
             for f in alarms.observe("spectral_alignment", s, {"minority": np.array([v, 0.3])})]
    assert found == [13]


def test_taylor_forecast_level_reads_the_growth_on_the_second_row():
    """r >= 1 on two rows, the second >= 5x its median (docs): 1.2 (4x) then 1.6 (5.3x)."""
    rows = [(s, {"r_secant": 0.3, "probe_loss": 1.0}) for s in range(150)]
    rows += [(150, {"r_secant": 1.2, "probe_loss": 1.0}),
             (151, {"r_secant": 1.6, "probe_loss": 1.0})]
    (f,) = _feed(TaylorForecast(), "sentinels", rows)
    assert (f.step, f.severity) == (151, "warning")
    rows[-1] = (151, {"r_secant": 1.4, "probe_loss": 1.0})  # 4.7x: no growth on either
    assert _feed(TaylorForecast(), "sentinels", rows) == []


# --------------------------------------------------------------------- loss_regression


def _regression_rows(rise: float, rows: int, at: int = 300, n: int = 500, floor: float = 0.2,
                     seed: int = 0):
    """A loss falling from 2.3 to ``floor`` with 5 % noise, ``rise`` x higher from ``at``
    for ``rows`` rows."""
    rng = np.random.default_rng(seed)
    loss = floor + (2.3 - floor) * np.exp(-np.arange(n) / 40.0)
    loss = loss * np.exp(0.05 * rng.standard_normal(n))
    loss[at:at + rows] *= rise
    return [(s, {"value": float(v)}) for s, v in enumerate(loss)]


def test_loss_regression_warns_once_the_rolling_median_stays_up():
    """The loss back at 4 x its floor (0.8 against 0.2: 4 x the lowest median and 0.6 above
    it, more than a quarter of the initial 1.79) for 100 rows: one warning."""
    found = _feed(LossRegression(), "loss", _regression_rows(4.0, 100))
    (f,) = found
    assert f.severity == "warning" and f.metric == "loss/value"
    # the 20-row median crosses the bar 11 rows in (the median of 20 needs 11 high rows),
    # and the finding comes on the 10th row in a row above it
    assert f.step == 300 + 10 + 9
    assert f.extra["lowest"] == pytest.approx(0.2, rel=0.1)
    assert "x its lowest" in f.message and "the initial loss" in f.message


def test_loss_regression_is_quiet_on_short_excursions_small_rises_and_early_rows():
    rule = LossRegression()
    # 10 bad rows lift the 20-row median for 9 rows: fewer than sustain
    assert _feed(rule, "loss", _regression_rows(4.0, 10)) == []
    assert [f.step for f in _feed(rule, "loss", _regression_rows(4.0, 11))] == [319]
    # 2.5 x the floor is 0.3 above it: less than a quarter of the initial loss (1.79)
    assert _feed(rule, "loss", _regression_rows(2.5, 100)) == []
    assert _feed(rule, "loss", _regression_rows(1.0, 0)) == []  # a healthy fall
    # in the first 100 rows (warm-up) nothing fires, however far the loss goes back up
    assert _feed(rule, "loss", _regression_rows(4.0, 60, at=30)) == []
    # NaN rows are skipped (nonfinite's business), the rest still read
    rows = _regression_rows(4.0, 100)
    rows[310] = (310, {"value": NAN})
    assert [f.step for f in _feed(rule, "loss", rows)] == [320]


def test_loss_regression_needs_a_positive_lowest_median():
    """A negative log-likelihood below zero (or a policy-gradient loss) gives no scale."""
    rows = [(s, {"value": v["value"] - 1.0}) for s, v in _regression_rows(4.0, 100)]
    assert _feed(LossRegression(), "loss", rows) == []


@pytest.mark.parametrize("bad", [{"ratio": 1.0}, {"initial_share": -0.1}, {"warmup": -1},
                                 {"window": 0}, {"severity": "warn"}, {"sustain": 0}])
def test_loss_regression_settings_are_checked(bad):
    with pytest.raises(ValueError):
        LossRegression(**bad)


def test_loss_regression_is_quiet_on_a_long_stationary_noisy_loss():
    """Fine-tuning near its level (0.3 settling to 0.2) with lognormal batch noise: the
    lowest of thousands of rolling medians lies standard errors below the level, and the
    rule warned 1-34 times a run before the noise bar."""
    for sigma in (0.3, 0.5, 0.8):
        rng = np.random.default_rng(0)
        s = np.arange(5000)
        loss = (0.2 + 0.1 * np.exp(-s / 500)) * np.exp(sigma * rng.standard_normal(5000))
        rows = [(i, {"value": float(v)}) for i, v in enumerate(loss)]
        assert _feed(LossRegression(), "loss", rows) == [], sigma
        assert _feed(LossRegression(noise=0.0), "loss", rows)  # what the bar removes


def test_a_fired_layers_nan_rows_count_towards_its_rearm():
    """A dip after NaN rows of the fired layer opened an episode from one row (sustain 2)
    once the episode had closed on them."""
    alarms = OnlineAlarms([SignCollapse()])
    alarms.declare("spectral_alignment", {"layers": ["a", "b"]})
    a = [0.4, 0.4, 0.01, 0.01, 0.4, NAN, NAN, 0.01, 0.4]
    found = [f.step for s, v in enumerate(a)
             for f in alarms.observe("spectral_alignment", s, {"minority": np.array([v, 0.4])})]
    assert found == [3]


def test_an_info_gradient_norm_spike_reports_the_info_bar():
    """One row at 10x the median (one row: info) reports the 2x bar of an info finding."""
    rows = [(s, {"value": 1.0 + 0.01 * (s % 3)}) for s in range(30)] + [(30, {"value": 10.5})]
    (f,) = _feed(GradNormSpike(), "grad_norm", rows)
    assert f.severity == "info" and f.threshold == pytest.approx(2 * f.extra["median"])
