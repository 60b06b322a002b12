"""Forecast rules: a principled quantity is on course to cross its limit.

* :class:`TaylorForecast` reads the every-step secant Taylor ratio ``sentinels/r_secant``
  (limit r = 1, Sao 2026, arXiv:2603.13552, Def. 5.1) together with the probe loss of the
  same row, so that large steps that still make fast progress are not reported as
  warnings;
* :class:`SharpnessForecast` reads ``sharpness/ratio`` (limit 1: the optimizer's
  linear-stability threshold; Cohen et al. 2021, arXiv:2103.00065).

Both fit a straight line to the logarithm of the quantity over the last ``window`` rows
(log-linear growth is what a geometric learning-rate ramp or progressive sharpening
produce) and say in how many steps the fit reaches the limit (the finding's
``extra["steps_to_limit"]``). Thresholds, their rationale and what to do: docs/alarms.md.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from landscape._deprecation import renamed_kwargs
from landscape.alarms.base import (
    SKIP,
    Evaluator,
    Row,
    Rule,
    Trigger,
    _Skip,
    check_count,
    check_number,
    check_positive_int,
    check_severity,
    row_value,
)
from landscape.alarms.statistics import RollingWindow
from landscape.findings import format_number as _fmt
from landscape.findings import severity_rank

__all__ = ["ForecastState", "LogLinearTrend", "SharpnessForecast", "TaylorForecast"]


class LogLinearTrend:
    """Least-squares line through ``(step, log value)`` of the last ``size`` points.

    Args:
        size: how many points are kept.
    """

    def __init__(self, size: int) -> None:
        self.points: deque[tuple[float, float]] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self.points)

    def append(self, step: float, value: float) -> None:
        """Add a point (``value`` > 0).

        Args:
            step: the row's step.
            value: the positive value; its logarithm is fitted.
        """
        self.points.append((float(step), math.log(value)))

    def fit(self) -> tuple[float, float, float]:
        """``(log value at the last step, slope per step, t statistic of the slope)``.

        Returns:
            The fitted log value at the newest point, the slope, and slope / its standard
            error (``inf`` for an exact fit, 0 with fewer than three points).
        """
        n = len(self.points)
        xs = [p[0] for p in self.points]
        ys = [p[1] for p in self.points]
        mx, my = sum(xs) / n, sum(ys) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        if n < 3 or sxx == 0:
            return ys[-1], 0.0, 0.0
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
        now = my + slope * (xs[-1] - mx)
        resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
        se = math.sqrt(resid / (n - 2) / sxx)
        t = math.inf if se == 0 else slope / se
        return now, slope, t


@dataclass
class TaylorForecast(Rule):
    """The secant Taylor ratio r is at, or on course to reach, the softmax radius (r = 1).

    Reads ``sentinels/r_secant`` (docs/monitor.md, "Sentinels") and ``sentinels/probe_loss``
    of the same row. Over the last ``window`` rows a line is fitted to log r:

    * **level**: the last two rows both have r >= ``limit`` (default 1) and r >=
      ``level_growth`` (default 5) times its median over the previous ``update_window``
      rows, or one row has r >= ``jump`` (default 2: an abrupt step, e.g. a learning-rate
      spike, detected at the first affected step) and >= ``jump_growth`` (default 20)
      times that median. A run that trains at a steady r of 1-3 (a large learning rate
      near zero loss, BatchNorm with weight decay) is not at a new limit; ramps and
      spikes lift r far above where it sat (33-160 x on the spikes). ``None``: no
      relative condition. Two rows at r >= ``level_cap`` (default 10) warn whatever the
      median: a slow ramp (3-5 % a row) lifts its own median along and never reaches 5x
      it, while healthy runs stay at r <= 3;
    * **forecast** (only with ``trend=True``; off by default, since on a healthy CNN near
      zero loss the noisy r rose to 0.6 three times in 300 steps and fired): the fitted r
      is >= ``floor`` (default 0.5, the paper's safe target),
      rising (slope t statistic >= ``min_t``, default 2), and the fit reaches ``limit``
      within ``horizon`` rows (default 10; in steps, the fitted rows' mean spacing each).

    * **update growth**: the update-to-weight ratio ``update_ratio`` of the same row is
      >= ``update_growth`` (default 2) times its median over the previous
      ``update_window`` rows (default 50) on ``update_sustain`` consecutive rows (default
      3). A geometric learning-rate ramp shows here first: the relative step grows
      smoothly and steadily, while r_secant is noisy (healthy controls reach r = 0.85).
      The step also grows in healthy training (warm restarts, Adam's adapting second
      moments), so this condition alone is info unless r on the row is at least
      ``update_confirm`` (default 0.5, the paper's safe target; None: always a warning)
      or the ratio rose on each of the last ``update_sustain`` rows within the first
      ``update_onset_rows`` (default 10) rows of the growth (``update_climb``, default
      True: a ramp climbs steadily from where it began, a restart jumps once and
      drifts), and, when the rows record ``lr``, the learning rate is above its lowest
      of the last ``update_onset_rows`` rows (``climb_with_lr``, default True: momentum
      also builds a step up over a few rows after one hard batch, at a constant rate;
      docs/alarms.md). With r >= ``update_confirm`` the
      growth is still info when the ratio fell on each of its grown rows
      (``update_confirm_rising``, default True: one large step that momentum carries
      over a few rows and that decays). Growth the schedule explains is info too
      (``restart_info``, default True): the row's learning rate (``sentinels/lr``) is no
      higher than the largest of the rows before its latest rise, and the ratio per unit
      of learning rate has not grown (< ``update_growth`` times its median): a warm
      restart back to a learning rate the run trained at. A ramp past every earlier
      learning rate (also one stepped every few rows), and growth at a constant one, are
      not explained.

    **At a rate that has not risen**, the level, the jump and the update growth warn only
    when the probe loss confirms them: the row's learning rate (as recorded) is the lowest
    of the last ``update_onset_rows`` rows (``None``: 10), and the row's probe loss is
    below ``flat_lr_loss_rise`` (default 1.25) times its median over the previous
    ``update_window`` rows, or above it by less than ``loss_rise_floor`` (default 0.01;
    None: no floor) times the first row's probe loss, so the finding is info. At a
    constant or decaying rate the step follows the gradient: bursts of large gradients
    (one hard batch; a recurrent network trained with SGD; Adam's and Adagrad's
    second moments near zero loss; an induction head forming) take r past the radius for
    a row or two while the loss rides through; near zero loss a probe loss 30 times its
    median is a rise of 0.001. Warnings without the loss, still: an update growth whose
    ratio keeps growing (a new high, risen on all but one of the last ``update_sustain``
    rows) with r >= ``limit`` on its row (a loss summed over more and more micro-batches,
    inputs whose scale drifts); the level or the jump held on ``flat_lr_rows`` (default 5)
    consecutive rows (a burst lasts one to four); two rows at r >= ``level_cap``. A row
    without a recorded rate or a probe loss, or with fewer than ``min(update_window, 20)``
    earlier ones, is judged without this test, and ``flat_lr_loss_rise=None`` turns it
    off.

    Any condition is a warning, **unless the probe loss is still falling fast** (its
    fitted log slope <= -``falling``, default 0.01: more than 1 % per step, with a
    t statistic <= -``min_t``): large steps
    that still make fast progress (early training, the end of warm-up) are reported as
    info. The warning's ``extra`` carries ``steps_to_limit``, ``slope`` (of log r per step)
    and ``fitted``.

    Raises:
        ValueError: a setting is out of range.
    """

    limit: float = 1.0
    jump: float | None = 2.0
    floor: float = 0.5
    window: int = 8
    min_rows: int = 5
    horizon: int = 10
    min_t: float = 2.0
    falling: float | None = 0.01
    growth: float = 1.5
    near_high: float = 0.8
    warmup: int = 100
    trend: bool = False
    update_growth: float | None = 2.0
    update_window: int = 50
    update_sustain: int = 3
    update_confirm: float | None = 0.5
    update_climb: bool = True
    update_confirm_rising: bool = True
    update_onset_rows: int | None = 10
    restart_info: bool = True
    level_growth: float | None = 5.0
    jump_growth: float | None = 20.0
    level_cap: float | None = 10.0
    climb_with_lr: bool = True
    flat_lr_loss_rise: float | None = 1.25
    loss_rise_floor: float | None = 0.01
    flat_lr_rows: int = 5
    field: str = "r_secant"
    sustain: int = 1
    rearm: int = 10
    metrics: tuple[str, ...] = ("sentinels",)
    name: str = "taylor_forecast"

    _what = "secant Taylor ratio r"
    _hint = (
        "the step is outgrowing the softmax convergence radius: lower the learning rate "
        "(check the schedule), add warm-up or clip the step to the radius (r = 0.5 is safe)"
    )
    _info_hint = (  # the same signal, read as healthy (the message says why)
        "healthy training also does this; act only if r keeps rising towards 1 or the loss "
        "turns up: then lower the learning rate or add warm-up"
    )

    def __post_init__(self) -> None:
        self._validate_common()
        for name in ("limit", "floor", "min_t"):
            check_number(name, getattr(self, name))
        check_number("jump", self.jump, allow_none=True)
        check_number("falling", self.falling, allow_none=True)
        check_number("update_growth", self.update_growth, allow_none=True)
        check_number("update_confirm", self.update_confirm, allow_none=True)
        check_number("level_growth", self.level_growth, allow_none=True)
        if self.update_onset_rows is not None:
            check_positive_int("update_onset_rows", self.update_onset_rows)
        check_number("jump_growth", self.jump_growth, allow_none=True)
        check_number("level_cap", self.level_cap, allow_none=True)
        check_number("flat_lr_loss_rise", self.flat_lr_loss_rise, allow_none=True)
        check_number("loss_rise_floor", self.loss_rise_floor, allow_none=True)
        if not isinstance(self.climb_with_lr, bool):
            raise ValueError(f"climb_with_lr must be True or False, got {self.climb_with_lr!r}")
        if not isinstance(self.restart_info, bool):
            raise ValueError(f"restart_info must be True or False, got {self.restart_info!r}")
        check_positive_int("update_window", self.update_window)
        check_positive_int("flat_lr_rows", self.flat_lr_rows)
        check_positive_int("update_sustain", self.update_sustain)
        check_positive_int("window", self.window)
        check_positive_int("horizon", self.horizon)
        check_positive_int("min_rows", self.min_rows)
        check_count("warmup", self.warmup)
        for name in ("growth", "near_high"):
            check_number(name, getattr(self, name))
        check_severity("severity", getattr(self, "severity", "warning"))
        if self.min_rows > self.window or self.min_rows < 3:
            raise ValueError(f"min_rows must be in [3, window], got {self.min_rows}")
        if not 0 < self.floor <= self.limit:
            raise ValueError(f"floor must be in (0, limit], got {self.floor}")

    @renamed_kwargs(params="config")
    def evaluator(self, metric: str, config: Mapping[str, Any]) -> Evaluator:
        """A fresh :class:`ForecastState` for one stream.

        Args:
            metric: the metric name.
            config: the metric's stored ``config()`` (unused).

        Returns:
            The stream's evaluator.
        """
        return ForecastState(self)


@dataclass
class SharpnessForecast(TaylorForecast):
    """λ_max is on course to reach the optimizer's stability threshold (ratio 1).

    :class:`TaylorForecast`'s trend test on ``sharpness/ratio`` (docs/metrics.md,
    "Sharpness"), without the loss condition (the row has no loss) and without a warm-up
    (sharpness rows are sparse: 100 of them are thousands of steps). Progressive
    sharpening towards the edge of stability is expected in full-batch training, so the
    default severity is info, as the crossing itself is for :class:`EdgeOfStability`
    (which warns only far past the edge).
    """

    jump: float | None = None
    warmup: int = 0
    floor: float = 0.5
    window: int = 5
    min_rows: int = 3
    horizon: int = 5
    falling: float | None = None
    trend: bool = True
    update_growth: float | None = None
    level_growth: float | None = None
    jump_growth: float | None = None
    level_cap: float | None = None
    flat_lr_loss_rise: float | None = None
    severity: str = "info"
    field: str = "ratio"
    rearm: int = 3
    metrics: tuple[str, ...] = ("sharpness",)
    name: str = "sharpness_forecast"

    _what = "sharpness ratio lambda_max / threshold"
    _hint = (
        "progressive sharpening towards the optimizer's stability limit: watch the loss; "
        "lower the learning rate if it starts to oscillate"
    )
    _info_hint = None  # info is its default severity: the hint above is written for it


def _hint_for(rule: TaylorForecast, severity: str) -> str:
    """The rule's hint, or its softer ``_info_hint`` on a finding that came down to info."""
    if severity_rank(severity) < severity_rank("warning") and rule._info_hint:
        return rule._info_hint
    return rule._hint


class ForecastState:
    """The evaluator of a forecast rule on one stream: the trend of the value and the loss.

    Args:
        rule: the rule's settings.
    """

    def __init__(self, rule: TaylorForecast) -> None:
        self.rule = rule
        self.trend = LogLinearTrend(rule.window)
        self.loss = LogLinearTrend(rule.window)
        self.previous: float | None = None
        self.rows = 0
        self.updates = RollingWindow(rule.update_window)
        self.ratios = RollingWindow(rule.update_window)  # the previous rows' r
        self.grown = 0  # consecutive rows with update_ratio >= update_growth x median
        self.update_rows = 0  # rows read for update_ratio alone (no valid ratio)
        self.per_lr = RollingWindow(rule.update_window)  # update_ratio / lr of earlier rows
        self.lr_high = -math.inf  # the largest learning rate of the earlier rows
        self.lr_last: float | None = None  # the previous row's learning rate
        self.lr_before_rise = -math.inf  # lr_high when the learning rate last rose
        self.restart: float | None = None  # this row's lr when the schedule explains growth
        self.lrs: deque[float] = deque(maxlen=(rule.update_onset_rows or 10) + 1)
        # the rates of the rows the update median spans, and this row's
        self.window_lrs: deque[float] = deque(maxlen=rule.update_window + 1)
        self.losses = RollingWindow(rule.update_window)  # the previous rows' probe loss
        # the probe loss of the first row with a valid r and a positive probe loss: the
        # scale of a rise (loss_rise_floor)
        self.first_loss: float | None = None
        self.level_rows = 0  # consecutive rows at the level (or the jump)

    def __call__(self, step: int, row: Row) -> Trigger | _Skip | None:
        """Evaluate one row.

        Args:
            step: the row's step.
            row: the row's numeric fields.

        Returns:
            A :class:`Trigger`, None, or :data:`SKIP` for a missing or non-positive value.
        """
        rule = self.rule
        x = row_value(row, rule.field)
        if x is None or not math.isfinite(x) or x <= 0:
            return self._update_only(row)
        self.trend.append(step, x)
        self.rows += 1
        loss = row_value(row, "probe_loss")
        usual_loss = None  # the probe loss's median over the previous rows
        if loss is not None and math.isfinite(loss) and loss > 0:
            if self.first_loss is None:
                self.first_loss = loss
            self.loss.append(step, loss)
            if len(self.losses) >= min(rule.update_window, 20):
                usual_loss = self.losses.median()
            self.losses.append(loss)
        previous, self.previous = self.previous, x
        grown = self._update_growth(row)
        # r relative to its own recent history: a run that trains at a high, steady r
        # (a large learning rate near zero loss, BatchNorm with weight decay) is not at a
        # new limit; a ramp or a spike moves r far above where it sat
        typical = self.ratios.median() if len(self.ratios) >= min(
            rule.update_window, 20) else 0.0
        self.ratios.append(x)
        both = -math.inf if previous is None else min(previous, x)  # the last two rows' lower
        grown_level = rule.level_growth is None or x >= rule.level_growth * typical
        capped = rule.level_cap is not None and both >= rule.level_cap
        two_rows = both >= rule.limit and (grown_level or capped)
        jumped = rule.jump is not None and x >= rule.jump and (
            rule.jump_growth is None or x >= rule.jump_growth * typical)
        level = two_rows or jumped
        self.level_rows = self.level_rows + 1 if level else 0
        steps_to = math.inf
        fitted = x
        slope = 0.0
        fit = len(self.trend) >= rule.min_rows
        if fit and rule.trend:
            now, slope, t = self.trend.fit()
            fitted = math.exp(now)
            span = self.trend.points[-1][0] - self.trend.points[0][0]
            high = max(math.exp(v) for _, v in self.trend.points)
            rising = (
                slope > 0
                and t >= rule.min_t
                and slope * span >= math.log(rule.growth)
                and min(fitted, x) >= rule.floor
                and x >= rule.near_high * high
            )
            if rising:
                steps_to = max(0.0, (math.log(rule.limit) - now) / slope)
        # the horizon counts rows (docs/alarms.md): in steps, the rows' mean spacing each
        spacing = (self.trend.points[-1][0] - self.trend.points[0][0]) / (len(self.trend) - 1) \
            if len(self.trend) > 1 else 1.0
        forecast = steps_to <= rule.horizon * spacing
        if not (level or forecast or grown):
            return None
        if fit and not rule.trend:  # without the trend test the fit only fills the finding
            now, slope, _ = self.trend.fit()
            fitted = math.exp(now)
        severity = getattr(rule, "severity", "warning")
        falling = False
        if rule.falling is not None and len(self.loss) >= rule.min_rows:
            _, loss_slope, loss_t = self.loss.fit()
            falling = loss_slope <= -rule.falling and loss_t <= -rule.min_t
            if falling:
                severity = "info"
        early = self.rows <= rule.warmup
        if early:
            severity = "info"
        field, value = rule.field, x
        # at a rate that has not risen, r past the radius for a row or two is a burst
        # (one hard batch, Adam's second moments near zero loss) until the loss confirms it
        quiet_burst = (level and severity_rank(severity) >= severity_rank("warning")
                       and not capped and self.level_rows < rule.flat_lr_rows
                       and not (grown and self._growing() and x >= rule.limit)
                       and self._loss_rode_through(loss, usual_loss))
        if quiet_burst:
            severity = "info"
        if level:
            # the bar that fired, in the message and as the threshold alike: two rows at
            # the limit, or one row at the jump
            threshold = (rule.limit if grown_level else rule.level_cap) if two_rows \
                else rule.jump
            message = f"{rule._what} = {_fmt(x)} >= {_fmt(threshold)}"
            if typical > 0:
                message += f" ({_fmt(x / typical)} x its median {_fmt(typical)})"
            if quiet_burst:
                message += self._burst_note(loss, usual_loss)
        elif not forecast:  # the update-to-weight ratio fired: its field, value, threshold
            message = self._growth_message(grown, f" (secant Taylor ratio r = {_fmt(x)})")
            field, value = "update_ratio", grown[0]
            threshold = rule.update_growth * grown[1]
            if self.restart is not None:
                severity = "info"
                message += self._restart_note()
            elif rule.update_confirm is not None and not self._climbing():
                if x < rule.update_confirm:
                    severity = "info"  # r small: a scheduled or adaptive step change
                    message += f"; r < {_fmt(rule.update_confirm)}, so the step is still safe"
                elif rule.update_confirm_rising and self._decaying():
                    # one large step that momentum carries over a few rows and that
                    # decays (a hard batch at a high learning rate), not a growing step
                    severity = "info"
                    message += "; the ratio is falling since it grew (one large step)"
                elif not (self._growing() and x >= rule.limit) \
                        and self._loss_rode_through(loss, usual_loss):
                    # at a rate that has not risen the step follows the gradient: bursts
                    # of large gradients (an SGD-trained LSTM, hard batches of a mixture
                    # of experts, BatchNorm at batch 8 near zero loss) until the loss
                    # confirms them; a step growing to new highs past the radius (a loss
                    # summed over more and more micro-batches) warns without it
                    severity = "info"
                    message += self._burst_note(loss, usual_loss)
            if severity_rank(severity) >= severity_rank("warning"):
                message += self._flat_lr_note()
        else:
            n_steps = math.ceil(steps_to)
            if x >= rule.limit:  # crossed on this row: the level needs two rows above it
                course = f"already above {_fmt(rule.limit)}"
            elif n_steps < 1:  # the fitted value is past the limit, this row not yet
                course = f"on course to reach {_fmt(rule.limit)} within a step"
            else:
                course = (f"on course to reach {_fmt(rule.limit)} in about {n_steps} "
                          f"step{'s' if n_steps != 1 else ''}")
            message = (
                f"{rule._what} = {_fmt(x)} (fitted {_fmt(fitted)}) rising "
                f"{_fmt(100 * (math.exp(slope) - 1))} % per step: {course}"
            )
            threshold = rule.floor
        if falling:
            message += " (while the loss still falls fast)"
        elif early:
            message += f" (within the first {rule.warmup} rows: early training)"
        return Trigger(
            severity=severity,
            field=field,
            value=value,
            threshold=float(threshold),
            message=message,
            hint=_hint_for(rule, severity),
            extra={"steps_to_limit": 0.0 if level else (
                       float(math.ceil(steps_to)) if forecast else math.nan),
                   "slope": slope, "fitted": fitted},
        )

    def _update_only(self, row: Row) -> Trigger | _Skip | None:
        """The update-growth condition alone, for a row without the ratio.

        A probe the model cannot read, or the first row: ``update_ratio`` needs no forward.
        """
        rule = self.rule
        u = row_value(row, "update_ratio")
        if rule.update_growth is None or u is None or not math.isfinite(u) or u <= 0:
            return SKIP
        self.update_rows += 1
        grown = self._update_growth(row)
        if grown is None:
            return None
        early = self.update_rows <= rule.warmup and self.rows <= rule.warmup
        message = self._growth_message(grown, "")
        unconfirmed = rule.update_confirm is not None and not self._climbing()
        if early:
            message += f" (within the first {rule.warmup} rows: early training)"
        elif self.restart is not None:
            message += self._restart_note()
        elif unconfirmed:
            message += " (no Taylor ratio on this row to confirm it)"
        quiet = early or unconfirmed or self.restart is not None
        severity = "info" if quiet else getattr(rule, "severity", "warning")
        return Trigger(
            severity=severity,
            field="update_ratio",
            value=grown[0],
            threshold=float(rule.update_growth * grown[1]),
            message=message,
            hint=_hint_for(rule, severity),
            extra={"steps_to_limit": math.nan, "slope": math.nan, "fitted": math.nan},
        )

    def _growth_message(self, grown: tuple[float, float], detail: str) -> str:
        ratio, med = grown
        return (
            f"update-to-weight ratio {_fmt(ratio)} >= {_fmt(self.rule.update_growth)} x its "
            f"median {_fmt(med)} for {self.rule.update_sustain} steps{detail}: the step size "
            "is growing"
        )

    def _flat_lr_note(self) -> str:
        """Where the hint's "check the schedule" does not apply: the rate did not move.

        The recorded learning rates (``lr``) all equal, over the rows the update median
        spans and this one: the step grew by other causes, which the note names. (Over the
        last rows alone it said "has not changed" 22 rows after a jump of the rate from
        0.05 to 2, whose earlier rows were still in the median.)
        """
        lrs = list(self.window_lrs)
        if len(lrs) < 2 or not all(math.isfinite(x) for x in lrs) or max(lrs) != min(lrs):
            return ""
        return ("; the learning rate has not changed: a momentum (or beta1) raised, a loss "
                "summed over accumulated micro-batches instead of averaged, inputs whose "
                "scale drifts, weight decay, gradient clipping or an optimizer whose state was "
                "reset can grow the step too")

    def _recorded_lrs(self) -> list[float] | None:
        """The learning rates of the last ``update_onset_rows`` rows and this one.

        None unless every one of them recorded one (``sentinels/lr``) and there are two.
        """
        lrs = [lr for lr in self.lrs if math.isfinite(lr)]
        return lrs if len(lrs) == len(self.lrs) and len(lrs) > 1 else None

    def _lr_not_risen(self) -> bool:
        """Whether the recorded learning rate has not risen: this row's is their lowest."""
        lrs = self._recorded_lrs()
        return lrs is not None and lrs[-1] <= min(lrs)

    def _loss_rode_through(self, loss: float | None, usual: float | None) -> bool:
        """Whether the learning rate has not risen and the probe loss has not risen with it.

        Not risen: this row's rate is the lowest of the last ``update_onset_rows`` rows
        (as recorded). The loss rose when it is >= ``flat_lr_loss_rise`` x its median over
        the previous rows and above it by >= ``loss_rise_floor`` x the first row's probe
        loss (near zero loss a ratio of 30 is a rise of 0.001). False without a recorded
        rate, a probe loss or ``flat_lr_loss_rise``.
        """
        rule = self.rule
        if rule.flat_lr_loss_rise is None or usual is None or loss is None \
                or not self._lr_not_risen():
            return False
        if loss < rule.flat_lr_loss_rise * usual:
            return True
        return (rule.loss_rise_floor is not None and self.first_loss is not None
                and loss - usual < rule.loss_rise_floor * self.first_loss)

    def _burst_note(self, loss: float, usual: float) -> str:
        return (f"; the learning rate has not risen and the probe loss is {_fmt(loss / usual)} "
                "x its median: a burst the loss rode through")

    def _restart_note(self) -> str:
        return (f"; the learning rate {_fmt(self.restart)} is back where the run trained "
                "before and the step per unit of it has not grown (a warm restart)")

    def _climbing(self) -> bool:
        """Whether the ratio rose on each of the last ``update_sustain`` rows: a ramp.

        Only within the first ``update_onset_rows`` rows of its growth.
        """
        rule = self.rule
        if not rule.update_climb:
            return False
        # a ramp climbs from where its growth began; inside a plateau that jumped up long
        # ago (a warm restart, a smaller batch) a few rising rows are noise
        if rule.update_onset_rows is not None and self.grown > rule.update_onset_rows:
            return False
        if not self._rising():
            return False
        # a ramp of the learning rate, when the row records it: momentum (SGD's buffer,
        # Adam's first moment) also builds the step up over a few rows after one hard
        # batch, at a constant rate
        lrs = self._recorded_lrs()
        if rule.climb_with_lr and lrs is not None:
            return lrs[-1] > min(lrs)
        return True

    def _recent_ratios(self) -> list[float]:
        """The update ratio of this row and the ``update_sustain`` rows before it."""
        return list(self.updates.order)[-(self.rule.update_sustain + 1):]

    def _growing(self) -> bool:
        """Whether the ratio grows as a step that keeps growing does.

        Not below one of the ``update_sustain`` rows before it, and higher than the row
        before on all but at most one of the last ``update_sustain`` rows (a steady growth
        with noise).
        """
        last = self._recent_ratios()
        if len(last) <= self.rule.update_sustain or last[-1] < max(last[:-1]):
            return False
        rises = sum(a < b for a, b in pairwise(last))
        return rises >= self.rule.update_sustain - 1

    def _rising(self) -> bool:
        """Whether the ratio rose on each of the last ``update_sustain`` rows."""
        last = self._recent_ratios()
        return len(last) > self.rule.update_sustain and all(a < b for a, b in pairwise(last))

    def _decaying(self) -> bool:
        """Whether the ratio fell on each of its grown rows.

        One large step that momentum carries over a few rows, decaying geometrically.
        """
        last = list(self.updates.order)[-self.rule.update_sustain:]
        return len(last) == self.rule.update_sustain and all(
            a > b for a, b in pairwise(last))

    def _update_growth(self, row: Row) -> tuple[float, float] | None:
        """``(ratio, median)`` once ``update_ratio`` has stayed >= growth x median.

        Also records the row's learning rate (every row, with or without a ratio) and
        whether a warm restart explains the growth (:attr:`restart`).
        """
        rule = self.rule
        lr = row_value(row, "lr")
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            lr = None
        # the rates are read on every row: the tests of a rate that has not risen need them
        self.lrs.append(math.nan if lr is None else lr)
        self.window_lrs.append(self.lrs[-1])
        self.restart = None
        u = row_value(row, "update_ratio")
        if rule.update_growth is None or u is None or not math.isfinite(u) or u <= 0:
            return None
        out = None
        enough = min(rule.update_window, 20)
        if len(self.updates) >= enough:
            med = self.updates.median()
            if u >= rule.update_growth * med:
                self.grown += 1
                if self.grown >= rule.update_sustain:
                    out = (u, med)
            else:
                self.grown = 0
        self.updates.append(u)
        # growth the learning rate explains: back to a rate of earlier rows, and no more
        # step per unit of it than usual (SGD's step is lr x momentum buffer, Adam's lr x
        # its normalised direction)
        if lr is not None:
            # compared with the rates before the latest rise: on the later rows of a stair
            # of a ramp stepped every k rows the rate equals the largest so far
            if self.lr_last is not None and lr > self.lr_last:
                self.lr_before_rise = self.lr_high
            if (out is not None and rule.restart_info and lr <= self.lr_before_rise
                    and len(self.per_lr) >= enough
                    and u / lr < rule.update_growth * self.per_lr.median()):
                self.restart = lr
            self.per_lr.append(u / lr)
            self.lr_high = max(self.lr_high, lr)
            self.lr_last = lr
        return out
