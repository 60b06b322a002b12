"""The record of one instability finding.

A :class:`Finding` is what an alarm rule produces (``landscape.alarms``), what the
monitor writes to ``/findings`` in the run file (``landscape.store``), and what
``landscape check`` prints. It is a plain value: comparing, sorting and serialising it
needs nothing but this module.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

SEVERITIES: tuple[str, ...] = ("info", "warning", "error")
"""Severities from least to most serious."""


def severity_rank(severity: str) -> int:
    """Position of ``severity`` in :data:`SEVERITIES`.

    Args:
        severity: ``"info"``, ``"warning"`` or ``"error"``.

    Returns:
        0, 1 or 2.

    Raises:
        ValueError: an unknown severity.
    """
    try:
        return SEVERITIES.index(severity)
    except ValueError:
        raise ValueError(
            f"severity must be one of {', '.join(SEVERITIES)}, got {severity!r}"
        ) from None


#: the finding of an alarm rule that raised in the monitor and was switched off
#: (``OnlineAlarms(strict=False)``): recorded like a failed metric's, of severity warning
RULE_FAILED = "rule_failed"

#: the finding ``landscape check`` derives for a metric none of whose rows was measured (its
#: ``metric_failed`` is info; every rule reading it saw nothing): of severity warning
NEVER_MEASURED = "never_measured"


@dataclass(frozen=True)
class Finding:
    """One alarm: at ``step``, ``rule`` saw ``metric`` at ``value`` against ``threshold``.

    ``extra`` holds rule-specific details (the layer of a sign collapse, the robust z of a
    spike), JSON-able values; it is stored with the finding (``docs/file-format.md``) and
    read back by ``Run.findings()``, but takes no part in comparisons or hashing.

    Raises:
        ValueError: an unknown ``severity``.
    """

    step: int
    rule: str
    severity: str
    metric: str
    value: float
    threshold: float
    message: str
    hint: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        severity_rank(self.severity)

    def as_dict(self) -> dict:
        """The finding as a flat dict of its fields, ``extra`` left out.

        Returns:
            ``step``, ``rule``, ``severity``, ``metric``, ``value``, ``threshold``,
            ``message`` and ``hint``.
        """
        out = asdict(self)
        out.pop("extra")
        return out

    def describe(self) -> str:
        """One line for terminals: step, severity, rule and message.

        Returns:
            The line.
        """
        value = "nan" if math.isnan(self.value) else f"{self.value:.4g}"
        return f"step {self.step}: [{self.severity}] {self.rule}: {self.message} (value {value})"

    def __str__(self) -> str:
        """What ``print(finding)`` shows: :meth:`describe`, then the hint on its own line."""
        return self.describe() + (f"\n    hint: {self.hint}" if self.hint else "")


def finding_order(f: Finding) -> tuple:
    """The sort key of findings: step, rule, metric, severity, message.

    Args:
        f: a finding.

    Returns:
        The key.
    """
    return (f.step, f.rule, f.metric, severity_rank(f.severity), f.message)


def count_by_severity(findings: Iterable[Finding]) -> dict[str, int]:
    """``{severity: count}`` over :data:`landscape.findings.SEVERITIES` (zeros included)."""
    counts = dict.fromkeys(SEVERITIES, 0)
    for f in findings:
        counts[f.severity] += 1
    return counts


def at_or_above(findings: Iterable[Finding], severity: str) -> list[Finding]:
    """The findings whose severity is ``severity`` or more serious."""
    level = severity_rank(severity)
    return [f for f in findings if severity_rank(f.severity) >= level]


def format_number(value: float) -> str:
    """A short rendering of a finding's value or threshold (``nan``, ``inf`` kept)."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"


class Findings(list):
    """A list of :class:`Finding` that prints readably.

    ``print(ls.check("run.h5"))`` shows one line per finding and a count by severity
    instead of the ``Finding(...)`` reprs; it is a plain ``list`` otherwise (indexing,
    ``len``, comparison with lists).
    """

    def describe(self) -> str:
        """The findings one per line, then a count by severity.

        Returns:
            The text (``"no findings"`` for an empty list).
        """
        if not self:
            return "no findings"
        counts = count_by_severity(self)
        total = ", ".join(f"{counts[s]} {s}" for s in reversed(SEVERITIES) if counts[s])
        lines = [f.describe() if isinstance(f, Finding) else str(f) for f in self]
        noun = "finding" if len(self) == 1 else "findings"
        return "\n".join([*lines, f"{len(self)} {noun} ({total})"])

    def __str__(self) -> str:
        return self.describe()


def dedupe(findings: Iterable[Finding]) -> Findings:
    """One finding per ``(step, rule)``: the most severe, then the first by finding order.

    Ties of severity go to the first by :func:`finding_order`. A rule that watches several
    metrics (``nonfinite`` reads the ``nonfinite`` flags and the ``loss`` value) would
    otherwise report one NaN loss twice at the same step; the most severe is kept so that
    a warning on one metric is never dropped for an info on another.

    Args:
        findings: findings in any order.

    Returns:
        The kept findings, in their original order.
    """
    items = list(findings)
    best: dict[tuple[int, str], Finding] = {}

    def preference(f: Finding) -> tuple:
        return -severity_rank(f.severity), finding_order(f)

    for f in items:
        key = (f.step, f.rule)
        if key not in best or preference(f) < preference(best[key]):
            best[key] = f
    kept = {id(f) for f in best.values()}
    return Findings(f for f in items if id(f) in kept)


_FRAMEWORKS = ("torch", "lightning", "pytorch_lightning", "lightning_fabric", "transformers",
               "accelerate")


def _internal_dirs() -> tuple[str, ...]:
    dirs = [os.path.dirname(os.path.abspath(__file__)) + os.sep]
    for name in _FRAMEWORKS:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            dirs.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    # the exit of a with-block this package entered (a warning raised as it ends) is no line
    # of the user's either: contextlib's own file
    dirs.append(os.path.abspath(contextlib.__file__))
    return tuple(dirs)


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` that points at the user's code.

    Walks out of the frames of this package and of the training frameworks that call it
    (torch, Lightning, ``transformers``, ``accelerate``): in a plain loop the warning
    names the line that called ``Monitor.step``, under a framework the line that called
    ``trainer.fit``/``trainer.train``. Call it in the function that calls
    ``warnings.warn`` (Python's ``warnings.warn``, stacklevel semantics).

    Returns:
        The stack level, counted from the caller (1 when every frame is internal).
    """
    internal = _internal_dirs()
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(internal):
            return level
        frame = frame.f_back
        level += 1
    return 1
