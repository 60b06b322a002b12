"""Curvature rules: the step is too large for the local curvature of the loss.

* :class:`EdgeOfStability` reads ``sharpness/ratio`` (top Hessian eigenvalue over the
  optimizer's linear-stability limit);
* :class:`TaylorRatio` reads ``taylor_radius/r`` (the step length in units of the softmax
  Taylor convergence radius).

Thresholds, their sources and what to do: ``docs/alarms.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from landscape.alarms.base import (
    SKIP,
    Row,
    Rule,
    Trigger,
    _Skip,
    check_number,
    check_positive_int,
    row_value,
)
from landscape.findings import format_number as _fmt

__all__ = ["EdgeOfStability", "TaylorRatio"]


@dataclass
class EdgeOfStability(Rule):
    """Sharpness far past the optimizer's linear-stability threshold.

    Reads ``sharpness/ratio`` = λ_max / threshold, where the threshold is the
    optimizer-specific stability limit at the current learning rate (2/η for GD,
    (2+2β)/η for heavy ball, (2+2β1)/((1−β1)η) for the preconditioned sharpness of Adam
    and the other adaptive optimizers of :func:`landscape.curvature.stability_threshold`; see
    ``docs/metrics.md``, "Sharpness", and Cohen et al. 2021 arXiv:2103.00065 and 2022
    arXiv:2207.14484). When ``ratio`` is NaN, ``lambda_max / threshold`` is used if both are
    finite.

    * ``ratio >= approach`` (default 0.9; ``None`` disables): info. The iterate is at or
      near the edge of stability: full-batch GD sharpens progressively to ratio 1 and
      hovers there while the loss keeps falling (Cohen et al. 2021), and minibatch SGD and
      AdamW at high learning rates trained healthily at ratios up to 9.7 on the probe
      (docs/benchmarks.md, "Healthy runs"). The level also keeps a ratio that hovers
      around 1 inside one episode.
    * ``ratio >= threshold`` (default 12.0): warning. Far past the edge: every abrupt
      learning-rate spike of the instability suite read 17.8–58 at its first step, no
      healthy run read more than 9.7 (docs/alarms.md, ``edge_of_stability``, for the
      measurements). ``threshold=1.0`` warns at the edge itself, the earlier default.

    Raises:
        ValueError: a setting is not a number, or ``approach`` exceeds ``threshold``.
    """

    threshold: float = 12.0
    approach: float | None = 0.9
    sustain: int = 1
    rearm: int = 3
    metrics: tuple[str, ...] = ("sharpness",)
    name: str = "edge_of_stability"

    def __post_init__(self) -> None:
        self._validate_common()
        check_number("threshold", self.threshold)
        check_number("approach", self.approach, allow_none=True)
        if self.approach is not None and self.approach > self.threshold:
            raise ValueError(
                f"approach ({self.approach}) must not exceed threshold ({self.threshold})"
            )

    def evaluate(self, metric: str, row: Row) -> Trigger | _Skip | None:
        """Compare the row's stability ratio with ``threshold`` and ``approach``.

        Args:
            metric: the metric name (``sharpness``).
            row: the row's numeric fields.

        Returns:
            A warning or info :class:`Trigger`, None, or :data:`SKIP` without a ratio.
        """
        ratio = row_value(row, "ratio")
        lam = row_value(row, "lambda_max")
        limit = row_value(row, "threshold")
        if ratio is None and lam is not None and limit is not None and limit > 0:
            ratio = lam / limit
        if ratio is None:
            return SKIP
        detail = (
            f" (lambda_max {_fmt(lam)} vs stability threshold {_fmt(limit)})"
            if lam is not None and limit is not None
            else ""
        )
        if ratio >= self.threshold:
            return Trigger(
                severity="warning",
                field="ratio",
                value=ratio,
                threshold=self.threshold,
                message=f"sharpness ratio {_fmt(ratio)} >= {_fmt(self.threshold)}: "
                f"{'far ' if self.threshold >= 2 else ''}past the optimizer's "
                f"linear-stability limit{detail}",
                hint="lower the learning rate or lengthen warm-up (a learning-rate spike, or "
                "a rate the curvature cannot absorb)",
            )
        if self.approach is not None and ratio >= self.approach:
            return Trigger(
                severity="info",
                field="ratio",
                value=ratio,
                threshold=self.approach,
                message=f"sharpness ratio {_fmt(ratio)} >= {_fmt(self.approach)}: "
                f"{'past' if ratio >= 1 else 'approaching'} the optimizer's stability limit "
                f"(the edge of stability){detail}",
                hint="expected in full-batch training and common at high learning rates; "
                "lower the learning rate if the loss oscillates or rises",
            )
        return None


@dataclass
class TaylorRatio(Rule):
    """The optimizer step leaves the softmax Taylor convergence disk.

    Reads ``taylor_radius/r`` = ||p|| / ρ_a, the step length in units of the convergence
    radius of the cross-entropy Taylor series along the step (Sao 2026, arXiv:2603.13552,
    Def. 5.1; see ``docs/metrics.md``, "Taylor radius of cross-entropy"). The paper's
    guidance: r = 0.5 is a safe target, r = 1 is the theoretical edge, r = 2 usually still
    works, r = 4 breaks.

    * ``r >= info`` (default 1.0): info. The step leaves the conservative disk; in early
      training large steps beyond it are common and still make progress.
    * ``r >= warn`` (default 2.0): warning ("usually still works" is the paper's limit).
    * ``r >= error`` (default 4.0): error.

    Warning and error read the median sample's ratio, ``robust_field`` (default
    ``"r_median"``), when the row has it; ``r`` is the largest over the batch's samples, which
    one hard sample or token decides (r = 9.2 on a healthy row whose median sample was at
    0.05; 186 warnings on 36 healthy runs of the ``standard`` preset), while a learning-rate
    spike moves every sample. Rows without it (files recorded before it) read ``r``; the
    info level always reads ``r``. ``robust_field=None`` reads ``r`` throughout. A median
    over fewer than ``min_samples`` samples (default 8; the row's ``samples``) is no more
    robust than the largest: such a row is info at most (a one-sample last batch of a
    loader that keeps its remainder gave an error, r_median = 4.7, on a healthy run).
    None: off.

    The metric was called ``taylor`` before it became ``taylor_radius``; the rule watches
    both names, so runs recorded under either give the same findings.

    Raises:
        ValueError: a setting is not a number, or ``error < warn``.
    """

    warn: float = 2.0
    error: float = 4.0
    info: float | None = 1.0
    robust_field: str | None = "r_median"
    min_samples: int | None = 8
    sustain: int = 1
    rearm: int = 3
    metrics: tuple[str, ...] = ("taylor_radius", "taylor")
    name: str = "taylor_ratio"

    def __post_init__(self) -> None:
        self._validate_common()
        check_number("warn", self.warn)
        check_number("error", self.error)
        check_number("info", self.info, allow_none=True)
        if self.min_samples is not None:
            check_positive_int("min_samples", self.min_samples)
        if self.info is not None and self.info > self.warn:
            raise ValueError(f"info ({self.info}) must be <= warn ({self.warn})")
        if self.error < self.warn:
            raise ValueError(f"error ({self.error}) must be >= warn ({self.warn})")

    def evaluate(self, metric: str, row: Row) -> Trigger | _Skip | None:
        """Compare the row's Taylor ratio ``r`` with ``warn`` and ``error``.

        Args:
            metric: the metric name (``taylor_radius`` or its old name ``taylor``).
            row: the row's numeric fields.

        Returns:
            An error or warning :class:`Trigger`, None, or :data:`SKIP` without ``r``.
        """
        r = row_value(row, "r")
        if r is None:
            return SKIP
        hint = (
            "lower the learning rate or add warm-up, or clip the step to the radius "
            "(the monitor's Taylor guard); r = 0.5 is a safe target"
        )
        robust = row_value(row, self.robust_field) if self.robust_field else None
        if robust is not None and not math.isfinite(robust):
            robust = None  # not measured on this row: the max decides, as before
        level, field = (r, "r") if robust is None else (robust, str(self.robust_field))
        what = "Taylor ratio" if robust is None else "Taylor ratio of the median sample"
        samples = row_value(row, "samples")

        def fired(severity: str, field: str, value: float, bar: float, what: str,
                  why: str) -> Trigger:
            return Trigger(severity=severity, field=field, value=value, threshold=bar,
                           message=f"{what} r = {_fmt(value)} >= {_fmt(bar)}{why}", hint=hint)

        if (self.min_samples is not None and samples is not None
                and samples < self.min_samples and level >= self.warn):
            return fired("info", field, level, self.warn, what,
                         f" on a batch of {samples:g} samples, whose median is no more robust "
                         f"than their largest (a warning from {self.min_samples} samples)")
        if level >= self.error:
            return fired("error", field, level, self.error, what,
                         ": the step is far outside the softmax convergence radius")
        if level >= self.warn:
            return fired("warning", field, level, self.warn, what,
                         ": the step leaves the softmax convergence radius")
        if self.info is not None and r >= self.info:
            return fired("info", "r", r, self.info, "Taylor ratio",
                         ": the step leaves the conservative softmax convergence disk")
        return None
