"""Training-signal rules: the loss and the gradients themselves go wrong.

* :class:`LossSpike` reads ``loss/value`` (robust z-score or CUSUM over a trailing window);
* :class:`GradNormSpike` reads ``grad_norm/value`` with the same machinery;
* :class:`LossRegression` reads ``loss/value``: its rolling median back well above its best;
* :class:`NonFiniteValues` reads the ``nonfinite`` flags and the loss itself.

Thresholds, their sources and what to do: ``docs/alarms.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

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

__all__ = ["GradNormSpike", "LossExplosion", "LossRegression", "LossSpike", "NonFiniteValues",
           "SpikeState"]


@dataclass
class LossSpike(Rule):
    """Sudden jump of the training loss above its recent level (robust z-score or CUSUM).

    Over a trailing window of the last ``window`` valid rows (default 50, not counting
    the current one) with median m and MAD, the robust z-score is
    z = (x − m) / max(1.4826·MAD, rel_floor·|m|, 1e-12) (Hampel's identifier; 1.4826
    makes MAD a consistent estimate of σ for Gaussian noise). Nothing fires before
    ``min_history`` (default 20) rows are in the window.

    * ``method="zscore"`` (default): warning when ``z >= z`` (default 6) **and**
      ``x >= m + (min_ratio − 1)·|m|`` (default ``min_ratio`` 1.5, i.e. 1.5 × the median
      for a positive loss). The z-score alone fires on a very smooth loss with a tiny
      MAD; the ratio alone fires on a noisy one; both together mean "large and
      unusual".
    * ``method="cusum"``: one-sided CUSUM of the robust z-scores (Page 1954),
      S ← max(0, S + min(z, cusum_clip) − cusum_k), warning when ``S >= cusum_h``
      (defaults k = 1, h = 12, clip 4): slower, sustained rises that no single row
      makes unusual. ``min_ratio`` does not apply.

    The "large" condition compares the rise with max(|m|, ``initial_floor`` × the median of
    the first ``min_history`` rows) (default 0.25): a loss trained close to zero (0.02)
    that doubles, one hard sample in its batch, is noise, not a spike. ``severity`` is the
    finding's severity (default warning); a rise to ``warn_ratio`` times that level is
    always a warning.

    **One row is not enough** unless it is very large: near zero loss a single hard sample
    decides a minibatch's loss (or gradient norm), and that row is both large and unusual.
    A warning from one row alone needs a rise of at least ``single_row`` (default 1.0)
    times the initial level (the median of the first ``min_history`` rows: for a
    classifier, a jump back above its untrained loss), and a rise above the median of at
    least ``single_row_outlier`` (default 3) times the window's largest rise (its
    maximum minus its median): small batches have heavy tails, which the window shows
    (a hard batch of 8 near zero loss rises 0.9-2.7 times as far as the largest of the
    50 rows before it, once 5.8 times, and up to 16 times once a step decay has drawn
    the loss down; a learning-rate spike or a corrupted batch 22-480 times;
    docs/alarms.md). A row short of either is **info** on its own and becomes a warning
    when the next row fires too (a blow-up stays high, a hard batch does not); a later
    row of such a run that is itself inside the range must pass the two-row test below.
    ``None``: no such condition (``single_row=None``: every firing row is at the full
    severity).

    **One hard sample per batch is not a spike either.** The loss of a batch of n samples
    is their mean, so one sample the model gets confidently wrong lifts it by up to about
    its own loss over n. With ``single_sample`` (default 3: a sample at ``p = 1e-3`` on its
    class among 10 has 3 times the untrained loss ln 10), a row whose rise above the median
    is less than ``single_sample`` × the initial level / n (above the initial level for a
    batch of 1 or 2, where one sample's loss is most of the row), n read from the row's
    ``samples`` (``step(samples=...)``, else the
    leading size of the batch passed to ``step``), is held to the run test below like a row
    inside the window's range, and two such rows in a row are info too: a batch of 8 near
    zero loss rises by 0.3-0.6 on two rows when one hard sample lands in each (0.75 is one
    sample's reach there), where the instability suite's blow-ups rise 0.8-0.9 on their
    second row with batches of 32 (0.27). A row without ``samples`` (neither ``batch=`` nor
    ``samples=``, a grad-norm stream) has no such condition; None: off. With
    ``new_high`` (default True) the two rows must also each be above every other value of
    the window: a blow-up climbs out of the range the recent rows set, while two hard
    batches in a row (a batch of 8 near zero loss) stay within the range earlier hard
    batches set, and are info; a third row in a row warns whatever the range (a plateau).

    **Nor are a few samples of a heavy-tailed loss.** A squared error has no bound on one
    sample's loss: under Student-t(3) target noise one or two samples lift a batch of 64
    tenfold now and then, which the one-row test above passed about 3.6 times per 1,000
    steps of a healthy regression. With ``trimmed_mean`` (default True) a row on its own
    whose batch without its largest per-sample losses (the loss metric's ``trimmed``
    field, measured from ``step(outputs=...)``) would be no spike by the z-score test is
    info, a warning if the next row is as high. A corrupted batch or a learning-rate spike
    lifts the whole batch, its trimmed mean with it; the second row of a run is judged as
    before (a ramp's first rows are a few samples' too). A row without the field (NaN) is
    judged as before. False: off.

    **A batch much smaller than the usual one is no spike on its own.** A mean over n
    samples scatters as 1/sqrt(n): the one-sample last batch of a loader that keeps its
    remainder (``drop_last=False``) has 8 times the spread of the batches of 64 around it.
    A row whose ``samples`` are at most ``small_batch`` (default 0.25) times the median of
    the window's (the last ``window`` rows that had them) is info however high it goes
    (a gradient norm of 16.4 against a median of 0.74 on a 1-sample batch of a healthy
    run; 0.08 warnings per 1,000 steps before). None: off.

    Non-finite values are ignored here (they are :class:`NonFiniteValues`' business) and
    do not enter the window.

    Raises:
        ValueError: a setting is out of range, ``min_history > window``, or ``method`` is
            not ``"zscore"`` or ``"cusum"``.
    """

    window: int = 50
    min_history: int = 20
    z: float = 6.0
    min_ratio: float = 1.5
    method: str = "zscore"
    cusum_k: float = 1.0
    cusum_h: float = 12.0
    cusum_clip: float = 4.0
    rel_floor: float = 1e-3
    initial_floor: float | None = 0.25
    severity: str = "warning"
    warn_ratio: float | None = None
    single_row: float | None = 1.0
    single_row_outlier: float | None = 3.0
    single_sample: float | None = 3.0
    trimmed_mean: bool = True
    small_batch: float | None = 0.25
    new_high: bool = True
    field: str = "value"
    sustain: int = 1
    rearm: int = 20
    metrics: tuple[str, ...] = ("loss",)
    name: str = "loss_spike"

    _what = "loss"
    _hint = (
        "lower the learning rate or add warm-up, enable gradient clipping, and check the "
        "batch at this step for bad data"
    )

    def __post_init__(self) -> None:
        self._validate_common()
        check_positive_int("window", self.window)
        check_positive_int("min_history", self.min_history)
        if self.min_history > self.window:
            raise ValueError(
                f"min_history ({self.min_history}) must not exceed window ({self.window})"
            )
        for name in ("z", "min_ratio", "cusum_k", "cusum_h", "cusum_clip", "rel_floor"):
            check_number(name, getattr(self, name))
        check_number("initial_floor", self.initial_floor, allow_none=True)
        check_number("warn_ratio", self.warn_ratio, allow_none=True)
        check_number("single_row", self.single_row, allow_none=True)
        for name in ("single_row_outlier", "single_sample", "small_batch"):  # None or > 0
            value = getattr(self, name)
            check_number(name, value, allow_none=True)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        check_severity("severity", self.severity)
        for name in ("new_high", "trimmed_mean"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.method not in ("zscore", "cusum"):
            raise ValueError(f"method must be 'zscore' or 'cusum', got {self.method!r}")
        if self.rel_floor < 0:
            raise ValueError(f"rel_floor must be >= 0, got {self.rel_floor}")

    @renamed_kwargs(params="config")
    def evaluator(self, metric: str, config: Mapping[str, Any]) -> Evaluator:
        """A fresh :class:`SpikeState` for one stream.

        Args:
            metric: the metric name (``loss``, ``grad_norm``, ...).
            config: the metric's stored ``config()`` (unused).

        Returns:
            The stream's evaluator.
        """
        return SpikeState(self)


class SpikeState:
    """The evaluator of :class:`LossSpike` (and :class:`GradNormSpike`) on one stream.

    Args:
        rule: the rule's settings.

    Attributes:
        history: the trailing window of valid values (the current row excluded).
        cusum: the CUSUM statistic S (``method="cusum"`` only).
    """

    def __init__(self, rule: LossSpike) -> None:
        self.rule = rule
        self.history = RollingWindow(rule.window)
        self.cusum = 0.0
        self.initial: float | None = None  # median of the first min_history values
        self.run = 0  # consecutive valid rows up to the previous one that met the warning
        self.previous_high = False  # the previous one of them was above the rest of its window
        self.previous_one_sample = False  # one hard sample explains the previous one's rise
        self.samples: float | None = None  # the current row's batch size (``samples``)
        self.sizes = RollingWindow(rule.window)  # the batch sizes of the window's rows
        self.small = False  # the current row's batch is far smaller than the usual one
        self.usual: float | None = None  # the window's median batch size
        self.high = False  # the current row is above the window (but the previous row)
        self.trimmed: float | None = None  # the row's batch mean without its largest losses

    def __call__(self, step: int, row: Row) -> Trigger | _Skip | None:
        """Evaluate one row, then add its value to the window.

        Args:
            step: the row's step.
            row: the row's numeric fields.

        Returns:
            A warning :class:`Trigger`, None, or :data:`SKIP` for a missing or
            non-finite value.
        """
        rule = self.rule
        x = row_value(row, rule.field)
        if x is None or not math.isfinite(x):
            return SKIP
        trigger = None
        samples = row_value(row, "samples")
        self.samples = samples if samples is not None and samples >= 1 else None
        trimmed = row_value(row, "trimmed") if rule.field == "value" else None
        self.trimmed = trimmed if trimmed is not None and math.isfinite(trimmed) else None
        usual = self.sizes.median() if len(self.sizes) else None
        self.small = (rule.small_batch is not None and self.samples is not None
                      and usual is not None and self.samples <= rule.small_batch * usual)
        self.usual = usual
        if self.samples is not None:
            self.sizes.append(self.samples)
        if len(self.history) >= rule.min_history:
            med, mad = self.history.median_mad()
            if self.initial is None:
                self.initial = abs(med)
            scale = max(1.4826 * mad, rule.rel_floor * abs(med), 1e-12)
            z = (x - med) / scale
            # a pair of rows is compared with the window without its other row
            self.high = x > self.history.maximum(but_newest=self.run > 0)
            if rule.method == "zscore":
                trigger = self._zscore(x, med, z)
            else:
                trigger = self._cusum(x, med, z)
        self.history.append(x)
        return trigger

    def _zscore(self, x: float, med: float, z: float) -> Trigger | None:
        """The z-score test: unusual (``z``) and large (``min_ratio``) together."""
        rule = self.rule
        level = abs(med)
        if rule.initial_floor is not None and self.initial is not None:
            level = max(level, rule.initial_floor * self.initial)
        previous_high, self.previous_high = self.previous_high, False
        previous_one, self.previous_one_sample = self.previous_one_sample, False
        run, self.run = self.run, 0
        # level 0 (a median and an initial level of exactly 0): no scale to call a rise large
        if level > 0 and z >= rule.z and x - med >= (rule.min_ratio - 1.0) * level:
            severity = rule.severity
            warned_at_ratio = False  # a warning of a rule that is info at min_ratio
            if rule.warn_ratio is not None and x - med >= (rule.warn_ratio - 1.0) * level:
                warned_at_ratio = severity != "warning"
                severity = "warning"
            note = ""
            if severity == "warning":
                one_sample = self._one_sample(x, med)
                # a few samples' rise holds back a row on its own, not the second row of a
                # run (the first rows of a blow-up may be a few samples' too: a ramp)
                left_out = self._few_samples(x, med, z, level) if run == 0 else None
                few = left_out is not None
                self.run, self.previous_high = run + 1, self.high
                self.previous_one_sample = one_sample
                # a row is also judged against the largest of the window before it: one
                # inside that range warns only as part of a run (the two-row test below)
                if rule.single_row is not None and self.initial is not None and (
                        x - med < rule.single_row * self.initial
                        or self._within_range(x, med) or one_sample or few):
                    if run == 0:
                        severity = "info"
                        note = (" on one row (a single hard batch? a warning if the next row "
                                "is as high)")
                        if few:
                            note = (" on one row; without its largest losses the batch's "
                                    f"mean, {_fmt(left_out)}, is no spike: a few "
                                    "samples? (a warning if the next row is as high)")
                    elif self.run == 2 and previous_one and one_sample:
                        # a third row in a row warns whatever the rise: a plateau
                        severity = "info"
                        note = (" on two rows in a row, each within what one hard sample "
                                f"in a batch of {self.samples:g} explains (a warning if the "
                                "next row is as high)")
                    elif rule.new_high and self.run == 2 and not (previous_high and self.high):
                        # a third row in a row warns whatever the range: a plateau
                        severity = "info"
                        note = (" on two rows in a row, within the range of the window (hard "
                                "batches? a warning if the next row is as high)")
                    else:
                        note = (" on two rows in a row" if self.run == 2
                                else f" on {self.run} rows in a row")
                if self.small and severity == "warning":
                    # counted in a run of high rows as any row, but no warning itself: the
                    # next row of the usual size decides (a loader bucketing by length)
                    severity = "info"
                    note = (f" on a batch of {self.samples:g} samples, the usual being "
                            f"{self.usual:g} (its mean scatters sqrt("
                            f"{self.usual / self.samples:.3g}) times as far; a warning if a "
                            "batch of the usual size is as high)")
            return Trigger(
                severity=severity,
                field=rule.field,
                value=x,
                # the bar of the severity given: warn_ratio's for such a warning
                threshold=med + ((rule.warn_ratio if warned_at_ratio and severity == "warning"
                                  else rule.min_ratio) - 1.0) * level,
                message=f"{rule._what} spike: {_fmt(x)} vs median {_fmt(med)} of the "
                f"last {len(self.history)} rows (robust z = {_fmt(z)} >= {_fmt(rule.z)})"
                + note,
                hint=rule._hint,
                extra={"z": z, "median": med},
            )
        return None

    def _one_sample(self, x: float, med: float) -> bool:
        """Whether one hard sample in the row's batch explains ``x``'s rise above ``med``.

        Within ``single_sample`` times the initial level over the row's ``samples``; False
        when the row has no batch size or the rule no ``single_sample``.
        """
        factor = self.rule.single_sample
        if factor is None or self.samples is None or self.initial is None:
            return False
        return x - med < factor / self.samples * self.initial

    def _few_samples(self, x: float, med: float, z: float, level: float) -> float | None:
        """The row's trimmed mean when a few samples of its batch made its rise; else None.

        The batch without its largest per-sample losses (the loss metric's ``trimmed``
        field) would be no spike by the z-score test: its robust z-score on the window's
        scale (``z`` is the row's own) below ``rule.z``, or its rise below ``min_ratio``'s.
        None too when the row has no such measurement or ``trimmed_mean`` is off.
        """
        rule = self.rule
        if not rule.trimmed_mean or self.trimmed is None or not x > med or not z > 0:
            return None
        w = self.trimmed
        z_w = (w - med) / ((x - med) / z)
        if z_w >= rule.z and w - med >= (rule.min_ratio - 1.0) * level:
            return None
        return w

    def _within_range(self, x: float, med: float) -> bool:
        """Whether ``x``'s rise above the median ``med`` is within the window's range.

        Within: less than ``single_row_outlier`` times the window's largest rise (its
        maximum minus its median). Shifting every value alike changes nothing.
        """
        factor = self.rule.single_row_outlier
        return factor is not None and x - med < factor * (self.history.maximum() - med)

    def _cusum(self, x: float, med: float, z: float) -> Trigger | None:
        """Advance the one-sided CUSUM by this row's clipped z-score and test it."""
        rule = self.rule
        self.cusum = max(0.0, self.cusum + min(z, rule.cusum_clip) - rule.cusum_k)
        if self.cusum >= rule.cusum_h:
            return Trigger(
                severity=rule.severity,
                field=rule.field,
                value=self.cusum,
                threshold=rule.cusum_h,
                message=f"{rule._what} drifting up: CUSUM {_fmt(self.cusum)} >= "
                f"{_fmt(rule.cusum_h)} ({_fmt(x)} vs median {_fmt(med)})",
                hint=rule._hint,
                extra={"z": z, "median": med},
            )
        return None


@dataclass
class GradNormSpike(LossSpike):
    """Sudden jump of the gradient norm: :class:`LossSpike`'s machinery on ``grad_norm``.

    Same defaults except ``min_ratio`` = 2.0: minibatch gradient norms are noisier and
    more heavy-tailed than the loss, and a doubling is the scale at which gradient
    clipping and loss blow-ups become relevant. A doubling is reported as **info**: the
    gradient norm of healthy training doubles too (leaving initialisation, the end of
    warm-up, while the loss falls fast). A jump to ``warn_ratio`` (default 10) times the
    median is a warning. Near zero loss the gradient norm is tiny and heavy-tailed, so the
    rise is measured against at least 0.25 × its early level too (``initial_floor``).
    A warning needs two rows in a row at ``warn_ratio`` unless one row rises by at least
    ``single_row`` (default 10) times the early level and 3 times as far as the window's
    largest (``single_row_outlier``; see :class:`LossSpike`).
    """

    min_ratio: float = 2.0
    severity: str = "info"
    warn_ratio: float | None = 10.0
    single_row: float | None = 10.0
    single_sample: float | None = None
    metrics: tuple[str, ...] = ("grad_norm",)
    name: str = "grad_norm_spike"

    _what = "gradient norm"
    _hint = (
        "enable gradient clipping (e.g. clip_grad_norm_ to 1.0; with clipping on, pass the "
        "norm it returns, step(..., grad_norm=norm), or this is the clipped norm), lower "
        "the learning rate or add warm-up, and check the batch at this step"
    )


@dataclass
class LossExplosion(Rule):
    """The training loss has exploded: ``ratio`` times its initial level, and it stays.

    The initial level m₀ is the largest of the first ``initial_rows`` valid rows (default
    3): the loss of a batch of one or two samples scatters over orders of magnitude, and
    the lowest of its first rows can be near 0, which warned on healthy runs; a loss that
    explodes from its second step on is compared with an exploded level and warns later,
    if at all. The rule fires on every later row at or above ``ratio`` × m₀ (default 10,
    the instability suite's own definition of an explosion) and warns after ``sustain``
    rows in a row (default 3: one hard batch does not stay). It watches from the 4th
    row: the other loss rules need a history (``loss_spike`` 20 rows,
    ``loss_regression`` 100) whose median an explosion in the first steps already holds,
    and a learning rate 100 times too high took a classifier from 2.3 to 600 within 10
    steps without a warning from either (review of session 41). Quiet while m₀ is at or
    below 0 (a negative log-likelihood, a policy-gradient loss: no scale to call a rise
    tenfold). NaN and inf are :class:`NonFiniteValues`' business and do not count as rows
    here.

    Raises:
        ValueError: a setting is out of range.
    """

    ratio: float = 10.0
    initial_rows: int = 3
    severity: str = "warning"
    sustain: int = 3
    rearm: int = 20
    metrics: tuple[str, ...] = ("loss",)
    name: str = "loss_explosion"

    def __post_init__(self) -> None:
        self._validate_common()
        check_number("ratio", self.ratio)
        if self.ratio <= 1.0:
            raise ValueError(f"ratio must be > 1, got {self.ratio}")
        check_positive_int("initial_rows", self.initial_rows)
        check_severity("severity", self.severity)

    @renamed_kwargs(params="config")
    def evaluator(self, metric: str, config: Mapping[str, Any]) -> Evaluator:
        """A fresh evaluator for one stream: it keeps the initial level.

        Args:
            metric: the metric name (``loss``).
            config: the metric's stored ``config()`` (unused).

        Returns:
            The stream's evaluator.
        """
        first: list[float] = []

        def evaluate(step: int, row: Row) -> Trigger | _Skip | None:
            x = row_value(row, "value")
            if x is None or not math.isfinite(x):
                return SKIP
            if len(first) < self.initial_rows:
                first.append(x)
                return None
            initial = max(first)
            if not initial > 0 or x < self.ratio * initial:
                return None
            return Trigger(
                severity=self.severity,
                field="value",
                value=x,
                threshold=self.ratio * initial,
                message=f"loss explosion: {_fmt(x)} is {_fmt(x / initial)} times the initial "
                f"loss {_fmt(initial)} (the largest of the first {len(first)} rows)",
                hint="the run has diverged: lower the learning rate (a sweep's largest "
                "values) or add warm-up, enable gradient clipping, and check the data and "
                "the loss's scale",
                extra={"initial": initial},
            )

        return evaluate


@dataclass
class LossRegression(Rule):
    """The training loss has gone back up and stays up: training is undoing itself.

    The median of the last ``window`` valid rows (default 20, the current one included)
    is at least ``ratio`` (default 1.5) times the lowest such median so far **and** above
    it by at least ``initial_share`` (default 0.25) times the initial loss (the median of
    the first ``window`` rows) and by at least ``noise`` (default 8) standard errors of
    the rolling median (1.2533 × 1.4826 × the window's MAD / √window: the lowest median of
    a long, stationary, noisy run, a fine-tuning run near its level, lies a few of them
    below where it fluctuates), on ``sustain`` rows in a row (default 10: a regression
    stays; the rolling median of a loss as noisy as CutMix's crosses the bar for a few
    rows now and then). Nothing fires in the first ``warmup`` rows (default 100):
    the loss of early training moves fast both ways. A rolling median ignores single hard
    batches (:class:`LossSpike`'s business); what this catches is slower: a learning rate
    (or a warm-up's peak) too high that walks a network back towards its untrained loss
    without a spike or a 10x explosion (an audit of mechanisms outside the instability
    suite: a tiny GPT warmed up to 300x its rate, a CNN to 15x; docs/alarms.md). The
    ratio needs a positive scale: while the lowest median is at or below 0 (a negative
    log-likelihood below zero, a policy-gradient loss) the rule is quiet. NaN and inf are
    :class:`NonFiniteValues`' business and do not enter the window.

    Raises:
        ValueError: a setting is out of range.
    """

    window: int = 20
    ratio: float = 1.5
    initial_share: float = 0.25
    noise: float = 8.0
    warmup: int = 100
    severity: str = "warning"
    sustain: int = 10
    rearm: int = 20
    metrics: tuple[str, ...] = ("loss",)
    name: str = "loss_regression"

    def __post_init__(self) -> None:
        self._validate_common()
        check_positive_int("window", self.window)
        check_number("ratio", self.ratio)
        check_number("initial_share", self.initial_share)
        check_number("noise", self.noise)
        if self.ratio <= 1.0:
            raise ValueError(f"ratio must be > 1, got {self.ratio}")
        if self.initial_share < 0:
            raise ValueError(f"initial_share must be >= 0, got {self.initial_share}")
        check_count("warmup", self.warmup)
        check_severity("severity", self.severity)

    @renamed_kwargs(params="config")
    def evaluator(self, metric: str, config: Mapping[str, Any]) -> Evaluator:
        """A fresh :class:`RegressionState` for one stream.

        Args:
            metric: the metric name (``loss``).
            config: the metric's stored ``config()`` (unused).

        Returns:
            The stream's evaluator.
        """
        return RegressionState(self)


class RegressionState:
    """The evaluator of :class:`LossRegression` on one stream.

    Args:
        rule: the rule's settings.
    """

    def __init__(self, rule: LossRegression) -> None:
        self.rule = rule
        self.window = RollingWindow(rule.window)
        self.rows = 0  # valid rows read
        self.initial: float | None = None  # median of the first ``window`` rows
        self.best = math.inf  # the lowest rolling median so far
        self.best_step: int | None = None

    def __call__(self, step: int, row: Row) -> Trigger | _Skip | None:
        """Evaluate one row.

        Args:
            step: the row's step.
            row: the row's numeric fields.

        Returns:
            A :class:`Trigger`, None, or :data:`SKIP` for a missing or non-finite value.
        """
        rule = self.rule
        x = row_value(row, "value")
        if x is None or not math.isfinite(x):
            return SKIP
        self.window.append(x)
        self.rows += 1
        if len(self.window) < rule.window:
            return None
        med = self.window.median()
        if self.initial is None:
            self.initial = med
        best, best_step = self.best, self.best_step
        if med < self.best:
            self.best, self.best_step = med, step
        if self.rows <= rule.warmup or not best > 0:
            return None
        rise = med - best
        if med < rule.ratio * best or rise < rule.initial_share * abs(self.initial):
            return None
        # the rolling median's own sampling noise: its standard error, 1.2533 sigma /
        # sqrt(window) for sigma = 1.4826 MAD of the window (Gaussian rows); the lowest
        # median of a long noisy run lies a few of them below the level it fluctuates at
        _, mad = self.window.median_mad()
        spread = 1.2533 * 1.4826 * mad / math.sqrt(rule.window)
        if rise >= rule.noise * spread:
            return Trigger(
                severity=rule.severity,
                field="value",
                value=med,
                threshold=best + max((rule.ratio - 1.0) * best,
                                     rule.initial_share * abs(self.initial),
                                     rule.noise * spread),
                message=f"loss regression: the median of the last {rule.window} rows, "
                f"{_fmt(med)}, is {_fmt(med / best)} x its lowest {_fmt(best)} (at step "
                f"{best_step}) and {_fmt(rise / abs(self.initial))} x the initial loss "
                f"{_fmt(self.initial)} above it",
                hint="the run is undoing its training: a learning rate (or a warm-up's peak) "
                "too high is the usual cause; lower it or lengthen warm-up, and check the "
                "data since the lowest point",
                extra={"lowest": best, "lowest_step": best_step, "initial": self.initial},
            )
        return None


@dataclass
class NonFiniteValues(Rule):
    """NaN or infinite training loss or gradients (always an error).

    Formerly ``NonFinite`` (that name still works, with a ``DeprecationWarning``); its
    rule name in findings and in :func:`~landscape.alarms.default_rules` stays
    ``"nonfinite"``.

    Sources (``metrics``, default ``("nonfinite", "loss")``):

    * ``nonfinite/loss`` and ``nonfinite/grad``: flags the monitor sets to 1.0 when the
      loss / any gradient entry is non-finite. A NaN *flag* means the check itself failed
      and is ignored.
    * ``loss/value`` (and ``grad_norm/value`` if you add ``"grad_norm"``): the value
      itself is NaN or ±inf. This is the one place where NaN fires instead of being
      ignored: the loss is what training produced, not a diagnostic that can fail.

    Each source is its own stream, so a NaN loss that the ``nonfinite`` metric also flags
    gives one finding per source at that step. The default ``rearm`` of 10 rows stops a
    run that stays NaN from repeating the error.
    """

    sustain: int = 1
    rearm: int = 10
    metrics: tuple[str, ...] = ("nonfinite", "loss")
    name: str = "nonfinite"

    def __post_init__(self) -> None:
        self._validate_common()

    _HINT = (
        "lower the learning rate, enable gradient clipping, keep the loss/softmax in float32, "
        "and check the batch for NaN/inf inputs"
    )

    def evaluate(self, metric: str, row: Row) -> Trigger | _Skip | None:
        """Fire on a set ``nonfinite`` flag or on a non-finite ``value``.

        Args:
            metric: ``nonfinite`` (flags), or a metric whose ``value`` field is checked.
            row: the row's numeric fields.

        Returns:
            An error :class:`Trigger`, None, or :data:`SKIP` when the row has nothing to
            check (all flags NaN, no value).
        """
        if metric == "nonfinite":
            flags = [(f, row_value(row, f)) for f in ("loss", "grad")]
            valid = [(f, v) for f, v in flags if v is not None]
            if not valid:
                return SKIP
            skipped = row_value(row, "skipped") == 1.0
            for f, v in valid:
                if v != 0:
                    what = "training loss" if f == "loss" else "gradient"
                    if f == "grad" and skipped:  # never reached the weights
                        return Trigger(
                            severity="info",
                            field=f,
                            value=1.0,
                            threshold=1.0,
                            message="non-finite gradient on a step the optimizer skipped "
                            "(a GradScaler backing off its loss scale); not applied",
                            hint="expected now and then with fp16 and a GradScaler; if it "
                            "repeats every step, " + self._HINT,
                        )
                    return Trigger(
                        severity="error",
                        field=f,
                        value=1.0,
                        threshold=1.0,
                        message=f"non-finite {what} (flagged by the nonfinite metric)",
                        hint=self._HINT,
                    )
            return None
        raw = row.get("value")
        if raw is None:
            return SKIP
        if type(raw) is float and math.isfinite(raw):  # the common case, without numpy
            return None
        arr = np.asarray(raw, dtype=np.float64)
        if arr.size == 0:
            return SKIP
        bad = arr[~np.isfinite(arr)]
        if bad.size == 0:
            return None
        what = "training loss" if metric == "loss" else f"{metric}"
        return Trigger(
            severity="error",
            field="value",
            value=1.0,
            threshold=1.0,
            message=f"{what} is {bad.flat[0]}",
            hint=self._HINT,
        )
