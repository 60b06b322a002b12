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
