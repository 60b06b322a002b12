"""Adaptive schedules: measure the expensive metrics densely while the sentinels move.

When the sentinels' Taylor ratio of the realised step (``sentinels/r_secant``) reaches
:data:`DENSE_AT`, or a warning is raised, every metric with a ``dense_every`` is also measured
on the steps that are multiples of it, for :data:`DENSE_STEPS` steps after the last trigger
(docs/monitor.md, "Adaptive schedules"): the forecast rules then have rows to fit
(docs/alarms.md, ``sharpness_forecast``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from landscape.findings import RULE_FAILED, Finding, at_or_above
from landscape.metrics import Metric
from landscape.store import Run

__all__ = ["DENSE_AT", "DENSE_STEPS", "DenseWindow"]

DENSE_AT = 0.5  # sentinels/r_secant at which the expensive metrics are measured densely
DENSE_STEPS = 20  # for this many steps after the last trigger


class DenseWindow:
    """The steps through which the metrics with a ``dense_every`` are measured densely.

    Args:
        enabled: ``False`` keeps every metric on its own schedule.

    Attributes:
        until: the last step of the window (-1: closed).
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.until = -1

    def is_due(self, metric: Metric, step: int) -> bool:
        """On the metric's schedule, or a multiple of its ``dense_every`` in the window."""
        if metric.schedule(step):
            return True
        every = metric.dense_every
        # a metric switched off, or not started yet, stays so: the window adds to a schedule
        return bool(self.enabled and every and step <= self.until and step % every == 0
                    and metric.schedule.started(step))

    def observe_row(self, metric: str, step: int, row: dict[str, Any]) -> None:
        """A sentinels row whose ``r_secant`` reaches :data:`DENSE_AT` opens the window."""
        if self.enabled and metric == "sentinels":
            r = float(row.get("r_secant", math.nan))
            if r >= DENSE_AT:
                self.until = step + DENSE_STEPS

    def observe_findings(self, step: int, findings: Iterable[Finding]) -> None:
        """A warning or an error raised at ``step`` opens (or extends) the window."""
        if self.enabled and at_or_above(findings, "warning"):
            self.until = max(self.until, step + DENSE_STEPS)


def recorded_window_end(run: Run) -> int:
    """The end of the window that a run's recorded sentinel rows and warnings opened (or -1).

    A resumed monitor continues the window its run file had open.
    """
    # a rule that raised is no finding of its step (it opened no window when recorded)
    opened = [f.step for f in at_or_above(run.findings(), "warning") if f.rule != RULE_FAILED]
    if "sentinels" in run.metrics():
        steps, r = run.series("sentinels", "r_secant")
        opened += steps[np.nan_to_num(r, nan=-1.0) >= DENSE_AT].tolist()
    return int(max(opened)) + DENSE_STEPS if opened else -1
