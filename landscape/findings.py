"""The record of one instability finding.

A :class:`Finding` is what an alarm rule produces (``landscape.alarms``), what the
monitor writes to ``/findings`` in the run file (``landscape.store``), and what
``landscape check`` prints. It is a plain value: comparing, sorting and serialising it
needs nothing but this module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

SEVERITIES: tuple[str, ...] = ("info", "warning", "error")
"""Severities from least to most serious."""


def severity_rank(severity: str) -> int:
    """Position of ``severity`` in :data:`SEVERITIES` (``ValueError`` if unknown)."""
    try:
        return SEVERITIES.index(severity)
    except ValueError:
        raise ValueError(
            f"severity must be one of {', '.join(SEVERITIES)}, got {severity!r}"
        ) from None


@dataclass(frozen=True)
class Finding:
    """One alarm: at ``step``, ``rule`` saw ``metric`` at ``value`` against ``threshold``."""

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
        out = asdict(self)
        out.pop("extra")
        return out

    def describe(self) -> str:
        """One line for terminals: step, severity, rule and message."""
        value = "nan" if math.isnan(self.value) else f"{self.value:.4g}"
        return f"step {self.step}: [{self.severity}] {self.rule}: {self.message} (value {value})"
