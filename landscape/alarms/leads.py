"""How far ahead of a blow-up the alarms warned: helpers of the demo and the examples.

Not rules: they read a finished run's losses and findings afterwards. The definitions are
the instability suite's (docs/benchmarks.md, "Instability suite"): the baseline is the
median loss of the 50 steps before the intervention, the onset the first step from which
the loss stays >= 1.25x the baseline for 3 steps, the explosion the first step >= 10x or
not finite. :func:`early_warning` measures the first warning against both;
:func:`rule_leads` and :func:`warning_leads` give each rule's lead before the explosion.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from landscape.alarms.base import _finding_order
from landscape.alarms.online import _as_run, unmeasured_rows
from landscape.findings import Finding, severity_rank

__all__ = ["EarlyWarning", "early_warning", "loss_milestones", "rule_leads", "warning_leads"]

ONSET, EXPLOSION, SUSTAIN, BASELINE_WINDOW = 1.25, 10.0, 3, 50
"""The instability suite's definitions: onset 1.25x the baseline for 3 steps, explosion 10x
(or not finite), baseline the median of the 50 steps before the intervention."""


@dataclass(frozen=True)
class EarlyWarning:
    """How long before the loss moved the first warning came.

    Attributes:
        start: the first step of the intervention (the learning-rate ramp).
        baseline: the median loss of the ``BASELINE_WINDOW`` steps before ``start``.
        first_step: the step of the first finding of severity warning or above at or
            after ``start`` (``None``: none).
        first_rule: that finding's rule (``None``: none).
        onset: the first step >= ``start`` from which the loss stays >= 1.25x ``baseline``
            for 3 steps, or is not finite (``None``: never).
        explosion: the first step >= ``start`` with loss >= 10x ``baseline`` or not finite.
        nonfinite: whether the loss at ``explosion`` is not finite.
        early: the warnings (and errors) raised before ``start``: false alarms.
        onset_factor: the onset's multiple of the baseline.
        explosion_factor: the explosion's multiple of the baseline.
    """

    start: int
    baseline: float
    first_step: int | None
    first_rule: str | None
    onset: int | None
    explosion: int | None
    nonfinite: bool = False
    early: tuple[Finding, ...] = ()
    onset_factor: float = ONSET
    explosion_factor: float = EXPLOSION

    @property
    def baseline_steps(self) -> int:
        """How many steps the baseline is the median of (fewer than 50 when ``start`` is)."""
        return min(BASELINE_WINDOW, self.start)

    @property
    def lead_to_onset(self) -> int | None:
        """Steps from the first warning to the loss onset (``None``: either is missing)."""
        if self.first_step is None or self.onset is None:
            return None
        return self.onset - self.first_step

    @property
    def lead_to_explosion(self) -> int | None:
        """Steps from the first warning to the explosion (``None``: either is missing)."""
        if self.first_step is None or self.explosion is None:
            return None
        return self.explosion - self.first_step

    def describe(self) -> str:
        """One line: the first warning, the onset, the explosion and the lead.

        Returns:
            e.g. ``"first warning at step 158 (taylor_forecast), loss 1.25x baseline at
            step 168, 10x at step 190: 10 steps of warning before the loss moved, 32
            before it exploded"``.
        """
        parts = [("no warning" if self.first_step is None else
                  f"first warning at step {self.first_step} ({self.first_rule})")]
        parts.append(f"loss {self.onset_factor:g}x baseline "
                     + ("never" if self.onset is None else f"at step {self.onset}"))
        blow = "non-finite" if self.nonfinite else f"{self.explosion_factor:g}x"
        parts.append(blow + (" never" if self.explosion is None else f" at step {self.explosion}"))
        line = ", ".join(parts)
        lead, lead_x = self.lead_to_onset, self.lead_to_explosion
        if lead is not None and lead >= 0:
            line += f": {lead} step{'' if lead == 1 else 's'} of warning before the loss moved"
            if lead_x is not None:
                line += f", {lead_x} before it exploded"
        elif lead is not None:
            line += f": the first warning came {-lead} steps after the loss moved"
            if lead_x is not None:
                line += (f", {lead_x} before it exploded" if lead_x >= 0 else
                         f", {-lead_x} after it exploded")
        elif lead_x is not None:
            line += (f": {lead_x} step{'' if lead_x == 1 else 's'} of warning before the loss "
                     "exploded" if lead_x >= 0
                     else f": the first warning came {-lead_x} steps after the loss exploded")
        return line


def loss_milestones(
    losses: Sequence[float],
    start: int,
    *,
    onset: float = ONSET,
    explosion: float = EXPLOSION,
    sustain: int = SUSTAIN,
    window: int = BASELINE_WINDOW,
) -> tuple[float, int | None, int | None]:
    """The baseline, onset and explosion of a loss that rose after ``start``.

    The definitions of the instability suite (docs/benchmarks.md): the baseline is the
    median of the ``window`` losses before ``start``; the onset is the first step >=
    ``start`` from which the loss stays >= ``onset`` x baseline for ``sustain`` steps (or
    the run ends), or is not finite; the explosion the first step >= ``start`` with loss
    >= ``explosion`` x baseline or not finite. A loss that explodes has passed its onset,
    so the onset is at most the explosion.

    Args:
        losses: the training loss of steps ``0, 1, ...``.
        start: the first step of the intervention.
        onset: the onset's multiple of the baseline.
        explosion: the explosion's multiple of the baseline.
        sustain: how many steps the onset's rise must last.
        window: how many steps before ``start`` make the baseline.

    Returns:
        ``(baseline, onset_step, explosion_step)``, the steps ``None`` where never reached.

    Raises:
        ValueError: ``start`` is not in ``1..len(losses) - 1``.
    """
    if not 0 < start < len(losses):
        raise ValueError(f"start must be in 1..{len(losses) - 1}, got {start}")
    base = _level(np.asarray(losses[max(0, start - window):start], dtype=float))
    first_onset = first_explosion = None
    for s in range(start, len(losses)):
        bad = not math.isfinite(losses[s])
        if first_explosion is None and (bad or losses[s] >= explosion * base):
            first_explosion = s
        if first_onset is None and all(
            not math.isfinite(v) or v >= onset * base for v in losses[s:s + sustain]
        ):
            first_onset = s
    if first_explosion is not None and (first_onset is None or first_onset > first_explosion):
        first_onset = first_explosion
    return base, first_onset, first_explosion


def _level(losses: np.ndarray) -> float:
    """The median of the finite losses (a NaN row, a step without a loss, is no level)."""
    finite = losses[np.isfinite(losses)]
    return float(np.median(finite)) if len(finite) else math.nan


def _warnings(findings: Iterable[Finding]) -> list[Finding]:
    """The findings of severity warning or above, by step."""
    rank = severity_rank("warning")
    return sorted((f for f in findings if severity_rank(f.severity) >= rank),
                  key=_finding_order)


def early_warning(losses: Sequence[float], findings: Iterable[Finding], start: int, *,
                  onset: float = ONSET, explosion: float = EXPLOSION) -> EarlyWarning:
    """The first warning at or after ``start`` against the loss onset and explosion.

    Args:
        losses: the training loss of steps ``0, 1, ...``.
        findings: the run's findings.
        start: the first step of the intervention.
        onset: the onset's multiple of the baseline (:func:`loss_milestones`).
        explosion: the explosion's multiple of the baseline.

    Returns:
        The :class:`EarlyWarning`; its ``early`` holds the warnings before ``start``.
    """
    base, on, ex = loss_milestones(losses, start, onset=onset, explosion=explosion)
    warned = _warnings(findings)
    after = [f for f in warned if f.step >= start]
    first = after[0] if after else None
    return EarlyWarning(
        start=start, baseline=base,
        first_step=None if first is None else first.step,
        first_rule=None if first is None else first.rule,
        onset=on, explosion=ex,
        nonfinite=ex is not None and not math.isfinite(losses[ex]),
        early=tuple(f for f in warned if f.step < start),
        onset_factor=onset, explosion_factor=explosion,
    )


def rule_leads(findings: Iterable[Finding], start: int,
               explosion: int | None) -> dict[str, int | None]:
    """Each rule's lead: steps from its first warning at or after ``start`` to ``explosion``.

    Args:
        findings: the run's findings.
        start: the first step a warning counts at.
        explosion: the explosion step (``None``: none).

    Returns:
        ``{rule: lead}`` in the order of the first warnings; ``None`` for a rule that first
        warned after the explosion, or when there was none.
    """
    leads: dict[str, int | None] = {}
    for f in _warnings(findings):
        if f.step >= start and f.rule not in leads:
            leads[f.rule] = None if explosion is None or f.step > explosion else explosion - f.step
    return leads


def warning_leads(
    run: Any, findings: Iterable[Finding], *, after: int, factor: float = 10.0
) -> tuple[int | None, dict[str, int | None]]:
    """How many steps each rule warned before the loss blew up.

    The blow-up step is the first step ``>= after`` whose training loss is at least
    ``factor`` times the median loss of the ``BASELINE_WINDOW`` (50) recorded steps before ``after``
    (or is not finite): the explosion of :func:`early_warning`, read from a run file. Rows
    the monitor wrote as not measured (a step without a loss: NaN) are neither.

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
    reader = _as_run(run)
    steps, values = reader.series("loss", "value")
    skip = {s for name, s in unmeasured_rows(reader) if name == "loss"}
    if skip:  # steps whose loss was not measured: NaN rows, neither level nor blow-up
        kept = np.array([int(s) not in skip for s in steps], dtype=bool)
        steps, values = steps[kept], values[kept]
    baseline = _level(values[(steps < after)][-BASELINE_WINDOW:])
    blowup = None
    for s, v in zip(steps, values):
        if s >= after and (not math.isfinite(v) or v >= factor * baseline):
            blowup = int(s)
            break
    return blowup, rule_leads(findings, after, blowup)
