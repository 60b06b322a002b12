"""How far ahead of a blow-up the alarms warned: a helper of the demo and the examples.

Not a rule: :func:`warning_leads` reads a finished run and its findings and measures, for
each rule, the number of steps between its first warning and the loss blow-up.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from landscape.alarms.base import _finding_order
from landscape.alarms.online import _as_run
from landscape.findings import Finding, severity_rank

__all__ = ["warning_leads"]


def warning_leads(
    run: Any, findings: Iterable[Finding], *, after: int, factor: float = 10.0
) -> tuple[int | None, dict[str, int | None]]:
    """How many steps each rule warned before the loss blew up.

    The blow-up step is the first step ``>= after`` whose training loss exceeds ``factor``
    times the median loss of the 20 recorded steps before ``after`` (or is not finite).
    Used by the demo and the early-warning example.

    Args:
        run: a ``Run``, a ``RunWriter`` or a path to a run file with a ``loss`` metric.
        findings: the findings to measure (e.g. those of :func:`~landscape.alarms.check`).
        after: the first step a blow-up (and a warning) may be counted at.
        factor: how many times the baseline loss counts as a blow-up.

    Returns:
        ``(blowup_step, {rule: lead})``: the blow-up step (``None`` without one) and, per
        rule, the lead of its first finding of severity warning or above at or after
        ``after`` (``None`` when it fired only after the blow-up, or there was none).
    """
    steps, values = _as_run(run).series("loss", "value")
    before = values[(steps < after)][-20:]
    baseline = float(np.median(before)) if len(before) else math.nan
    blowup = None
    for s, v in zip(steps, values):
        if s >= after and (not math.isfinite(v) or v > factor * baseline):
            blowup = int(s)
            break
    leads: dict[str, int | None] = {}
    for f in sorted(findings, key=_finding_order):
        if f.step < after or severity_rank(f.severity) < severity_rank("warning"):
            continue
        if f.rule in leads:
            continue
        leads[f.rule] = None if blowup is None or f.step > blowup else blowup - f.step
    return blowup, leads
