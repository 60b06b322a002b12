"""Forecast rules: warn while a quantity is on course to cross its limit, not on noise."""

import numpy as np
import pytest

from landscape.alarms import OnlineAlarms, SharpnessForecast, TaylorForecast, default_rules


def _run(rule, r, loss=None, start=0, update=None, lr=None):
    alarms = OnlineAlarms([rule])
    found = []
    for i, v in enumerate(r):
        row = {"r_secant": v, "probe_loss": 0.5 if loss is None else loss[i], "ratio": v}
        if update is not None:
            row["update_ratio"] = update[i]
        if lr is not None:
            row["lr"] = lr[i]
        found += alarms.observe(rule.metrics[0], start + i, row)
    return found


def test_a_geometric_ramp_is_forecast_before_it_reaches_the_limit():
    rng = np.random.default_rng(0)
    r = np.full(200, 0.2) * np.exp(0.1 * rng.standard_normal(200))
    r[150:] *= 1.19 ** np.arange(1, 51)  # a geometric learning-rate ramp
    (first, *_) = _run(TaylorForecast(trend=True), r)
    assert first.severity == "warning" and first.step < 160
    assert r[first.step] < 1.0  # before the limit itself
    assert 0 < first.extra["steps_to_limit"] <= 10
    # the log-linear trend of r is off by default: the level fires at r >= 1 only
    (default, *_) = _run(TaylorForecast(), r)
    assert r[default.step] >= 1.0


def test_a_growing_update_ratio_warns_before_r_reaches_the_limit():
    rng = np.random.default_rng(0)
    r = np.full(200, 0.3) * np.exp(0.2 * rng.standard_normal(200))
    u = np.full(200, 0.005) * np.exp(0.1 * rng.standard_normal(200))
    ramp = 1.12 ** np.arange(1, 51)  # a geometric learning-rate ramp, 12 % per step
    r[150:] *= ramp
    u[150:] *= ramp
    (first, *_) = _run(TaylorForecast(), r, update=u)
    assert first.severity == "warning" and "update-to-weight" in first.message
    assert first.step < 160 and r[first.step] < 1.0
    # the finding is the ratio's: its field, its value and the threshold it crossed
    median = np.median(u[max(0, first.step - 50):first.step])
    assert first.metric == "sentinels/update_ratio" and first.value == u[first.step]
    assert first.value >= first.threshold == pytest.approx(2 * median, rel=0.2)
    # the same noise without the ramp: nothing
    quiet = np.full(200, 0.005) * np.exp(0.1 * rng.standard_normal(200))
    assert _run(TaylorForecast(), np.full(200, 0.3), update=quiet) == []


def _scheduled_steps(lr, seed=0):
    """Update ratios of a step that is the learning rate times a steady direction."""
    rng = np.random.default_rng(seed)
    return lr * 0.05 * np.exp(0.1 * rng.standard_normal(len(lr)))


def test_growth_a_warm_restart_explains_is_info_and_a_ramp_past_it_warns():
    cycle = 0.1 * 0.5 * (1 + np.cos(np.pi * np.arange(100) / 100))  # cosine from 0.1 to ~0
    lr = np.concatenate([cycle, cycle, cycle])  # restarts at rows 100 and 200
    u, r = _scheduled_steps(lr), np.full(300, 0.6)  # r above update_confirm: not safe
    found = [f for f in _run(TaylorForecast(), r, update=u, lr=lr)
             if f.metric == "sentinels/update_ratio"]
    assert found and {f.step // 100 for f in found} == {1, 2}  # at both restarts
    assert all(f.severity == "info" and "warm restart" in f.message for f in found)
    # without the learning rate (run files before it, no optimizer) the same rows warn
    warned = [f for f in _run(TaylorForecast(), r, update=u) if f.severity == "warning"]
    assert {f.step // 100 for f in warned} == {1, 2}
    assert [f.step for f in _run(TaylorForecast(restart_info=False), r, update=u, lr=lr)
            if f.severity == "warning"] == [f.step for f in warned]
    # past every earlier learning rate (a ramp), the same growth warns
    ramp = lr.copy()
    ramp[200:] = 0.1 * 1.12 ** np.arange(1, 101)
    u = _scheduled_steps(ramp)
    late = [f for f in _run(TaylorForecast(), r, update=u, lr=ramp) if f.step >= 200]
    assert late[0].severity == "warning" and late[0].step < 210


@pytest.mark.parametrize("r, severity", [(0.45, "info"), (0.55, "warning")])
def test_a_step_that_grew_once_needs_r_at_the_safe_target_to_warn(r, severity):
    """update_confirm is the paper's safe target r = 0.5: a step that grew once (a smaller
    batch under Adam) at r = 0.42-0.47 is info, above 0.5 a warning."""
    u = np.full(300, 0.005)
    u[200:] = 0.0125  # 2.5x, at once and then flat: no climb, no decay
    (first, *_) = _run(TaylorForecast(), np.full(300, r), update=u)
    assert first.metric == "sentinels/update_ratio" and first.step == 202
    assert first.severity == severity
    if severity == "info":  # the hint does not tell to act on a step the message calls safe
        assert "still safe" in first.message and "healthy training" in first.hint
        (old, *_) = _run(TaylorForecast(update_confirm=0.4), np.full(300, r), update=u)
        assert old.severity == "warning" and "lower the learning rate" in old.hint
    else:
        assert first.hint.startswith("the step is outgrowing the softmax convergence radius")


def test_a_ramp_stepped_every_few_rows_is_not_a_restart():
    # a per-epoch ramp: x1.5 every 16 rows; on a stair's later rows the rate equals the
    # largest so far, but it rose past every earlier rate
    lr = np.full(300, 0.01)
    lr[200:] = 0.01 * 1.5 ** (np.arange(1, 101) // 16 + 1)
    u = _scheduled_steps(lr)
    found = [f for f in _run(TaylorForecast(), np.full(300, 0.6), update=u, lr=lr)
             if f.metric == "sentinels/update_ratio"]
    assert found and all("warm restart" not in f.message for f in found)
    assert found[0].severity == "warning"


def test_growth_at_a_constant_learning_rate_is_not_explained_and_warns_once_the_loss_rises():
    lr = np.full(300, 0.01)
    u = _scheduled_steps(lr)
    u[200:] *= 1.12 ** np.arange(1, 101)  # the step grows, the learning rate does not
    r = np.full(300, 0.6)
    found = [f for f in _run(TaylorForecast(), r, update=u, lr=lr)
             if f.metric == "sentinels/update_ratio"]
    # the probe loss flat: the loss does not confirm it (no warm restart either)
    assert found and all(f.severity == "info" for f in found)
    assert all("warm restart" not in f.message and "a burst the loss rode through"
               in f.message for f in found)
    loss = np.full(300, 0.5)
    loss[200:] *= 1.03 ** np.arange(1, 101)  # the loss turns up with the step
    found = [f for f in _run(TaylorForecast(), r, loss, update=u, lr=lr)
             if f.severity == "warning"]
    assert found and found[0].metric == "sentinels/update_ratio" and found[0].step < 215
    assert loss[found[0].step] >= 1.25 * 0.5


def test_momentum_building_a_step_up_at_a_constant_rate_is_not_a_ramp():
    """After one hard batch, momentum (beta 0.9) builds the step up over a few rows: the
    ratio rises on each of them at r ~ 0.01-0.1, as under a ramp, but the rate does not
    (memorising with AdamW, focal loss, SGD with momentum: three false warnings)."""
    lr = np.full(300, 0.01)
    u = np.full(300, 0.004) * np.exp(0.05 * np.random.default_rng(2).standard_normal(300))
    u[200:204] = [0.0085, 0.0092, 0.0105, 0.0119]  # >= 2x the median and rising
    u[204:] = 0.004
    r = np.full(300, 0.05)
    found = [f for f in _run(TaylorForecast(), r, update=u, lr=lr)
             if f.metric == "sentinels/update_ratio"]
    assert found and all(f.severity == "info" for f in found)
    # the same climb while the learning rate climbs too: a ramp, a warning
    ramp = lr.copy()
    ramp[195:] = 0.01 * 1.05 ** np.arange(1, 106)
    warned = [f for f in _run(TaylorForecast(), r, update=u, lr=ramp)
              if f.severity == "warning"]
    assert warned and warned[0].step == 202
    # and without a recorded learning rate the climb alone still warns (older files)
    assert _run(TaylorForecast(), r, update=u)[0].severity == "warning"
    assert _run(TaylorForecast(climb_with_lr=False), r, update=u, lr=lr)[0].severity == (
        "warning")


def test_a_gradient_burst_at_a_constant_rate_that_the_loss_rides_through_is_info():
    """A character LSTM trained with SGD at lr 1: the gradient norm grew 3-4x over a few
    steps, the update ratio stayed >= 2x its median for 3 rows at r = 1.39 and neither
    climbed nor decayed on each of them, while the probe loss stayed flat: a false warning
    on 3 of 12 healthy seeds, each a row past the ratio's peak (healthy-recipes audit).
    The same growth with the loss up 25 % still warns, and so does a step that keeps
    growing to new highs."""
    rng = np.random.default_rng(3)
    n = 200
    lr = np.full(n, 1.0)
    u = 0.024 * np.exp(0.05 * rng.standard_normal(n))
    u[150:155] = [0.040, 0.052, 0.0545, 0.050, 0.054]  # not rising on each, not decaying
    r = np.full(n, 0.45)
    r[150:155] = [0.9, 1.2, 1.39, 1.1, 1.2]
    loss = 1.6 * np.exp(0.02 * rng.standard_normal(n))
    found = [f for f in _run(TaylorForecast(), r, loss, update=u, lr=lr)
             if f.metric == "sentinels/update_ratio"]
    assert found and all(f.severity == "info" for f in found)
    assert "the learning rate has not risen and the probe loss is 1.013 x its median: a " \
        "burst the loss rode through" in found[0].message
    rising = loss.copy()
    rising[150:] *= 1.3
    warned = [f for f in _run(TaylorForecast(), r, rising, update=u, lr=lr)
              if f.severity == "warning"]
    assert warned and warned[0].step == 153  # the third row >= 2x the median
    # a step still growing to new highs at a constant rate past the radius keeps warning
    # with the loss flat (a loss summed over more and more micro-batches)
    climbing = u.copy()
    climbing[150:155] = [0.050, 0.052, 0.0545, 0.056, 0.060]
    warned = [f for f in _run(TaylorForecast(), r, loss, update=climbing, lr=lr)
              if f.severity == "warning"]
    assert warned and warned[0].step == 152
    # below the radius it needs the loss (since session 42: BatchNorm CNNs at batch 8
    # climb so for a few rows at r = 0.6-0.8 near zero loss)
    below = np.minimum(r, 0.8)
    found = _run(TaylorForecast(), below, loss, update=climbing, lr=lr)
    assert found and all(f.severity == "info" for f in found)
    # two bursts, the second a new high but not a climb on each row (hard batches of a
    # mixture of experts at a constant rate, the probe loss flat): info as well
    second = u.copy()
    second[149:155] = [0.080, 0.070, 0.064, 0.183, 0.030, 0.026]  # 0.0045, 0.0041, 0.0118
    found = [f for f in _run(TaylorForecast(), r, loss, update=second, lr=lr)
             if f.metric == "sentinels/update_ratio"]
    # one info episode: the jump at 152 (a new high after two falling rows) does not
    # raise it to a warning
    assert [(f.step, f.severity) for f in found] == [(151, "info")]
    # the setting off, or no learning rate recorded (older files): a warning as before
    assert _run(TaylorForecast(flat_lr_loss_rise=None), r, loss, update=u, lr=lr)[0] \
        .severity == "warning"
    assert _run(TaylorForecast(), r, loss, update=u)[0].severity == "warning"


def test_noise_a_decaying_burst_and_early_training_give_no_warning():
    rng = np.random.default_rng(1)
    r = 0.25 * np.exp(0.3 * rng.standard_normal(400))
    r[200:210] = 0.7 * 0.8 ** np.arange(10)  # a burst that decays (momentum, catapult)
    r[:60] = np.linspace(0.01, 1.5, 60)  # leaving initialisation
    assert [f for f in _run(TaylorForecast(trend=True), r) if f.severity != "info"] == []


def test_a_fast_falling_loss_demotes_the_forecast_to_info():
    r = 0.3 * 1.2 ** np.arange(30)
    loss = 2.0 * 0.9 ** np.arange(30)
    found = _run(TaylorForecast(warmup=0, trend=True), r, loss)
    assert found and all(f.severity == "info" for f in found)
    found = _run(TaylorForecast(warmup=0, trend=True), r)
    assert found[0].severity == "warning"


def test_an_abrupt_jump_warns_at_the_first_row():
    r = np.full(200, 0.2)
    r[150:] = 8.0
    (f, *_) = _run(TaylorForecast(), r)
    assert f.step == 150 and f.severity == "warning" and f.threshold == 2.0
    # the message names the bar that fired, as the threshold does (it said ">= 1")
    assert "secant Taylor ratio r = 8 >= 2 " in f.message, f.message


def test_sharpness_forecast_is_info_and_in_the_defaults():
    r = 0.3 * 1.1 ** np.arange(30)
    found = _run(SharpnessForecast(), r)
    assert found and {f.severity for f in found} == {"info"}
    names = [rule.name for rule in default_rules()]
    assert "taylor_forecast" in names and "sharpness_forecast" in names
    # no warm-up: as a warning its first rows are warnings, and no message says "early"
    found = _run(SharpnessForecast(severity="warning"), np.linspace(0.3, 0.9, 7))
    assert found and found[0].severity == "warning"
    assert not any("early training" in f.message for f in found)


@pytest.mark.parametrize(
    "bad", [{"floor": 2.0}, {"min_rows": 2}, {"window": 0}, {"update_window": 0}]
)
def test_bad_settings_raise(bad):
    with pytest.raises(ValueError):
        TaylorForecast(**bad)


@pytest.mark.parametrize(
    ("r", "says", "step"),
    [
        # a jump past the limit on one row: the level needs two rows, the trend fires
        ([0.3, 0.3, 0.3, 0.3, 0.35, 0.4, 2.48], "already above 1", 6),
        # the fit is past the limit, the row itself not yet
        ([0.2, 0.74, 0.76, 0.76, 0.94], "reach 1 within a step", 4),
        # one step to go
        (list(0.2 * 2.2 ** np.arange(3)), "reach 1 in about 1 step", 2),
    ],
)
def test_the_forecast_message_never_says_zero_steps(r, says, step):
    (f, *_) = _run(SharpnessForecast(), r)
    assert f.step == step and says in f.message, f.message
    assert "0 steps" not in f.message and "1 steps" not in f.message


@pytest.mark.parametrize("rate", [1.05, 1.03])
def test_a_slow_ramp_still_warns_once_r_is_far_past_the_limit(rate):
    # r >= 1 on two rows must also be 5x its own median, which a slow geometric ramp never
    # reaches (its median climbs along); past r = 10 on two rows it warns whatever the median
    rng = np.random.default_rng(0)
    n = int(np.ceil(np.log(50 / 0.2) / np.log(rate)))
    r = np.full(100 + n, 0.2) * np.exp(0.1 * rng.standard_normal(100 + n))
    r[100:] *= rate ** np.arange(1, n + 1)
    warnings_ = [f for f in _run(TaylorForecast(), r) if f.severity == "warning"]
    assert warnings_, "no warning on the whole ramp"
    assert r[warnings_[0].step] >= 10.0 and r[warnings_[0].step - 1] >= 10.0 * 0.9
    assert not [f for f in _run(TaylorForecast(level_cap=None), r) if f.severity == "warning"]


def test_a_level_above_the_cap_names_the_cap():
    """Two rows at r >= level_cap, under level_growth x the median: the bar that fired is
    the cap (10), which the message and threshold said was the limit (1) (review)."""
    r = np.array([4.0] * 60 + [11.0, 11.0])
    found = [f for f in _run(TaylorForecast(), r) if f.step == 61]
    assert found and found[0].threshold == 10.0
    assert "r = 11 >= 10 " in found[0].message, found[0].message


def test_growth_at_a_constant_learning_rate_names_the_other_causes():
    """The hint says to check the schedule; at a rate that never moved, the step grew by
    weight decay, clipping or a reset optimizer state (the alarm audit's weight-decay and
    clipped-RNN runs)."""
    rng = np.random.default_rng(0)
    r = np.full(200, 0.3) * np.exp(0.2 * rng.standard_normal(200))
    u = np.full(200, 0.005) * np.exp(0.1 * rng.standard_normal(200))
    ramp = 1.12 ** np.arange(1, 51)
    r[150:] *= ramp
    u[150:] *= ramp
    note = "the learning rate has not changed"
    loss = np.full(200, 0.5)
    loss[150:] *= ramp ** 0.5  # at a constant rate a warning needs the loss to confirm it
    warned = [f for f in _run(TaylorForecast(), r, loss, update=u, lr=np.full(200, 1e-3))
              if f.severity == "warning"]
    (flat, *_) = warned
    assert flat.metric == "sentinels/update_ratio" and note in flat.message
    lr = np.full(200, 1e-3)
    lr[150:] *= ramp  # the ramp is the schedule's: no such note
    (ramped, *_) = _run(TaylorForecast(), r, update=u, lr=lr)
    assert ramped.metric == "sentinels/update_ratio" and note not in ramped.message


def test_no_flat_rate_note_while_the_median_spans_a_jump_of_the_rate():
    """The note read only the last rows' rates: 22 rows after the rate jumped from 0.05 to
    2, with earlier rows still in the update median, a warning said 'the learning rate has
    not changed' (report review)."""
    rng = np.random.default_rng(1)
    n = 200
    r = np.full(n, 0.3) * np.exp(0.1 * rng.standard_normal(n))
    u = np.full(n, 0.005) * np.exp(0.05 * rng.standard_normal(n))
    lr = np.full(n, 0.05)
    lr[150:] = 2.0  # one jump, whose rows are still in the update median 22 rows later
    u[172:] *= 10  # when the step grows, with r past update_confirm: a warning
    r[172:] *= 3
    loss = np.full(n, 0.5)
    loss[172:] = 0.8  # the loss confirms it (the rate has not risen over the last rows)
    found = [f for f in _run(TaylorForecast(), r, loss, update=u, lr=lr)
             if f.metric == "sentinels/update_ratio" and f.severity == "warning"]
    assert found and found[0].step > 172, found
    assert all("the learning rate has not changed" not in f.message for f in found)


def test_a_jump_of_r_at_a_rate_that_has_not_risen_warns_only_when_the_loss_confirms_it():
    """Healthy runs at a constant or decaying rate jump to r = 1.4-8 for a row or two (an
    induction head forming, Adagrad and RAdam near zero loss, a BatchNorm CNN with weight
    decay: 23 of the healthy benchmark's 29 taylor_forecast warnings in session 41) while
    the probe loss stays at its level; near zero loss a rise of 30x its median is a rise of
    0.001. A learning-rate spike (the rate rose) warns at its first row as before."""
    n = 200
    r = np.full(n, 0.2)
    r[150] = 8.0  # one row, >= 20x its median: the jump
    lr = np.full(n, 0.01)
    loss = np.full(n, 0.5)
    (quiet, *_) = _run(TaylorForecast(), r, loss, lr=lr)
    assert quiet.step == 150 and quiet.severity == "info"
    assert "the learning rate has not risen and the probe loss is 1 x its median: a burst " \
        "the loss rode through" in quiet.message
    assert "healthy training also does this" in quiet.hint
    up = loss.copy()
    up[150] = 0.8  # the probe loss 1.6x its median, by 0.3 (60 % of its first value)
    assert _run(TaylorForecast(), r, up, lr=lr)[0].severity == "warning"
    # near zero loss: 30x its median, but by 0.0029 (0.6 % of the first value 0.5)
    tiny = np.full(n, 1e-4)
    tiny[0] = 0.5
    tiny[150] = 3e-3
    assert _run(TaylorForecast(), r, tiny, lr=lr)[0].severity == "info"
    assert _run(TaylorForecast(loss_rise_floor=None), r, tiny, lr=lr)[0].severity == "warning"
    # the rate jumped on that row (a spike), no rate recorded (older files), or the test off
    spike = lr.copy()
    spike[150:] = 1.0
    assert _run(TaylorForecast(), r, loss, lr=spike)[0].severity == "warning"
    assert _run(TaylorForecast(), r, loss)[0].severity == "warning"
    assert _run(TaylorForecast(flat_lr_loss_rise=None), r, loss, lr=lr)[0].severity == (
        "warning")


def test_at_a_rate_that_has_not_risen_a_held_level_the_cap_or_a_growing_step_warn_unconfirmed():
    """What the loss test must not hide (own-diff review): r held past the radius for
    flat_lr_rows rows while a loss of a large first value (an unnormalised MSE from 100)
    rises 30x; r past level_cap; and a step growing to new highs far past the radius."""
    n = 200
    lr = np.full(n, 0.01)
    loss = np.concatenate([np.geomspace(100, 0.1, 150), np.geomspace(0.1, 3.0, 50)])
    r = np.full(n, 0.2)
    r[150:] = np.linspace(1.5, 3.0, 50)
    found = _run(TaylorForecast(), r, loss, lr=lr)
    warned = [f.step for f in found if f.severity == "warning"]
    assert found[0].severity == "info" and warned and warned[0] == 155  # the 5th level row
    assert next(f.step for f in _run(TaylorForecast(flat_lr_rows=8), r, loss, lr=lr)
            if f.severity == "warning") == 158
    flat = np.full(n, 0.5)
    capped = np.full(n, 0.2)
    capped[150:] = 12.0  # >= level_cap on two rows: a warning whatever the loss
    assert [(f.step, f.severity) for f in _run(TaylorForecast(), capped, flat, lr=lr)][:2] == [
        (150, "info"), (151, "warning")]
    rng = np.random.default_rng(3)
    u = 0.024 * np.exp(0.05 * rng.standard_normal(n))
    u[150:155] = [0.050, 0.052, 0.0545, 0.056, 0.060]  # growing to new highs
    far = np.full(n, 0.45)
    far[150:155] = [0.9, 2.4, 2.6, 2.8, 3.0]  # and r >= 5x its median: the level fires too
    warned = [f for f in _run(TaylorForecast(), far, flat, update=u, lr=np.full(n, 1.0))
              if f.severity == "warning"]
    assert warned and warned[0].step == 152
