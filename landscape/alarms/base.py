"""The rule base: :class:`Rule`, :class:`Trigger`, :data:`SKIP` and the episode state machine.

A rule reads one *row* of a metric at a time (the values of every field of that metric at
one step) through an *evaluator*, which answers with a :class:`Trigger` (the row fires),
``None`` (a valid quiet row) or :data:`SKIP` (the row carries no usable value and is
ignored). :class:`EpisodeTracker` turns the answers of one (rule, metric) stream into
:class:`~landscape.findings.Finding` s, one per episode (see ``docs/alarms.md``, section
"Episodes").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Union

import numpy as np

from landscape._checks import positive_int
from landscape._deprecation import renamed_kwargs
from landscape.findings import SEVERITIES, Finding, severity_rank

__all__ = [
    "SKIP", "EpisodeTracker", "Evaluator", "Row", "Rule", "Trigger", "Value", "check_count",
    "check_number",
    "check_positive_int", "check_severity", "row_value",
]

Value = Union[float, np.ndarray]
"""One field of a row: a float, or an array for a vector field."""

Row = Mapping[str, Value]
"""The values of every numeric field of one metric at one step, by field name."""


class _Skip:
    """Sentinel type: the row carries no usable value for this rule (ignored)."""

    _instance: _Skip | None = None

    def __new__(cls) -> _Skip:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "SKIP"


SKIP = _Skip()
"""Returned by an evaluator for a row it ignores (missing or NaN values)."""


@dataclass(frozen=True)
class Trigger:
    """What one firing row reports; the episode logic turns it into a :class:`Finding`.

    Attributes:
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        field: the field of the watched metric that fired; the finding's ``metric`` becomes
            ``"<metric>/<field>"``.
        value: the value that crossed the threshold.
        threshold: the threshold it crossed.
        message: one line saying what happened.
        hint: what to do about it.
        extra: further values for the finding (not compared, not stored as columns).
    """

    severity: str
    field: str
    value: float
    threshold: float
    message: str
    hint: str
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        severity_rank(self.severity)  # ValueError naming the three severities
        for name in ("value", "threshold"):
            try:
                float(getattr(self, name))
            except (TypeError, ValueError):
                raise ValueError(f"Trigger.{name} must be a number, got "
                                 f"{getattr(self, name)!r}") from None


Evaluator = Callable[[int, Row], Union[Trigger, _Skip, None]]
"""``evaluate(step, row) -> Trigger | None | SKIP``: fire, do not fire, or ignore the row."""


def row_value(row: Row, name: str) -> float | None:
    """The scalar ``row[name]`` as a float (inf included); None when absent, not scalar or NaN.

    A rule's ``evaluate`` returns ``SKIP`` for ``None``: a row without a usable value (a
    failed measurement is NaN) is no evidence either way.
    """
    v = row.get(name)
    if v is None:
        return None
    if isinstance(v, np.ndarray):
        if v.size != 1:
            return None
        v = float(v.reshape(()))
    v = float(v)
    return None if math.isnan(v) else v


def check_positive_int(name: str, value: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer >= 1 (not a bool).

    For a rule's settings, in its dataclass ``__post_init__``.
    """
    positive_int(name, value)


def check_count(name: str, value: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer >= 0 (not a bool).

    For a rule's settings (a warm-up of rows), in its dataclass ``__post_init__``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def check_number(name: str, value: float | None, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a number, not NaN (or None).

    For a rule's settings, in its dataclass ``__post_init__``.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if math.isnan(float(value)):
        raise ValueError(f"{name} must not be NaN")


def check_severity(name: str, value: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a severity (info, warning, error).

    For a rule's settings, in its dataclass ``__post_init__``.
    """
    if value not in SEVERITIES:
        raise ValueError(f"{name} must be one of {', '.join(SEVERITIES)}, got {value!r}")


def _finding_order(f: Finding) -> tuple:
    """The sort key of findings: step, rule, metric, severity, message."""
    return (f.step, f.rule, f.metric, severity_rank(f.severity), f.message)


class Rule:
    """Base class of alarm rules.

    A rule is plain configuration (thresholds, ``sustain``, ``rearm``); the per-stream
    state lives in the evaluator that :meth:`evaluator` returns, so one rule object can
    serve many :class:`~landscape.alarms.OnlineAlarms`. Subclasses set ``name`` and
    ``metrics`` and either implement the stateless :meth:`evaluate` or override
    :meth:`evaluator` to keep state (a trailing window, a running maximum) in a small
    object of their own.

    Attributes:
        name: the rule's name in findings and in :func:`~landscape.alarms.default_rules`.
        metrics: the metric names the rule watches; each is its own stream.
        sustain: consecutive firing rows needed to open an episode (the finding is emitted
            at the row that completes it).
        rearm: consecutive valid non-firing rows that close an episode.
    """

    name: str = ""
    metrics: tuple[str, ...] = ()
    sustain: int = 1
    rearm: int = 3

    @renamed_kwargs(params="config")
    def evaluator(self, metric: str, config: Mapping[str, Any]) -> Evaluator:
        """A fresh evaluator for the rows of one metric.

        Args:
            metric: the metric name the rows belong to.
            config: the metric's stored ``config()`` (e.g. ``spectral_alignment``'s layer
                names; the run file keeps it as the table's ``params`` attribute).

        Returns:
            A callable ``(step, row) -> Trigger | None | SKIP`` holding the stream's state;
            the default one calls the stateless :meth:`evaluate`.
        """
        return lambda step, row: self.evaluate(metric, row)

    @property
    def episode_sustain(self) -> int:
        """Consecutive firing rows that open an episode: ``sustain``.

        A rule that applies ``sustain`` itself, more finely (per layer), says 1.
        """
        return self.sustain

    def evaluate(self, metric: str, row: Row) -> Trigger | _Skip | None:
        """Stateless evaluation of one row (override this or :meth:`evaluator`).

        Args:
            metric: the metric name the row belongs to.
            row: the row's numeric fields as float64.

        Returns:
            A :class:`Trigger` to fire, ``None`` for a valid quiet row, :data:`SKIP` to
            ignore the row.

        Raises:
            NotImplementedError: a subclass overrides neither this nor :meth:`evaluator`.
        """
        raise NotImplementedError

    def _validate_common(self) -> None:
        """Check ``name``, ``sustain``, ``rearm`` and ``metrics`` (``ValueError``)."""
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        check_positive_int("sustain", self.sustain)
        check_positive_int("rearm", self.rearm)
        if isinstance(self.metrics, str):
            raise ValueError("metrics must be a sequence of metric names, not a string")
        metrics = tuple(self.metrics)
        if not isinstance(self.metrics, tuple):
            # object.__setattr__: a frozen dataclass refuses the plain assignment (a
            # read-only property keeps its own value)
            with contextlib.suppress(AttributeError):
                object.__setattr__(self, "metrics", metrics)
        if not metrics or not all(isinstance(m, str) and m for m in metrics):
            raise ValueError(f"metrics must be non-empty metric names, got {self.metrics!r}")

    def config(self) -> dict[str, Any]:
        """The rule's settings as plain data (documentation, reports).

        Returns:
            ``{setting: value}``: every dataclass field, or ``name``, ``metrics``,
            ``sustain`` and ``rearm`` for a rule that is not a dataclass.
        """
        if is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: getattr(self, k) for k in ("name", "metrics", "sustain", "rearm")}


class EpisodeTracker:
    """One (rule, metric) stream: the rule's evaluator plus the episode state machine.

    A finding is emitted at the row that completes ``sustain`` consecutive firing rows,
    again only when the severity rises within the episode, and the episode ends after
    ``rearm`` consecutive valid rows on which the rule does not fire. Rows the evaluator
    answers with :data:`SKIP` change nothing.

    Args:
        rule: the rule.
        metric: the metric name of the stream.
        config: the metric's stored ``config()``, passed to :meth:`Rule.evaluator`.
    """

    def __init__(self, rule: Rule, metric: str, config: Mapping[str, Any]) -> None:
        self.rule = rule
        self.metric = metric
        self.evaluate = rule.evaluator(metric, config)
        self.active = False  # inside an episode
        self.emitted = -1  # highest severity rank emitted in the current episode
        self.firing_rows = 0  # consecutive firing rows (for sustain)
        self.quiet_rows = 0  # consecutive non-firing rows inside an episode (for rearm)
        self.failed = False  # the rule raised on this stream (OnlineAlarms(strict=False))

    def observe(self, step: int, row: Row) -> Finding | None:
        """Evaluate one row and advance the episode.

        Args:
            step: the row's step.
            row: the row's numeric fields as float64.

        Returns:
            The finding this row raises, or None.

        Raises:
            TypeError: the evaluator returned something other than a :class:`Trigger`,
                None or :data:`SKIP`.
        """
        result = self.evaluate(step, row)
        if result is SKIP:
            return None
        if result is None:
            self._quiet()
            return None
        if not isinstance(result, Trigger):
            raise TypeError(
                f"rule {self.rule.name!r} returned {result!r}; expected a Trigger, None or SKIP"
            )
        self.quiet_rows = 0
        self.firing_rows += 1
        rank = severity_rank(result.severity)
        if not self.active:
            if self.firing_rows < self.rule.episode_sustain:
                return None
            self.active = True
        elif rank <= self.emitted:
            return None
        self.emitted = rank
        return Finding(
            step=int(step),
            rule=self.rule.name,
            severity=result.severity,
            metric=f"{self.metric}/{result.field}",
            value=float(result.value),
            threshold=float(result.threshold),
            message=result.message,
            hint=result.hint,
            extra=dict(result.extra),
        )

    def _quiet(self) -> None:
        """A valid row on which the rule does not fire: count towards ``rearm``."""
        self.firing_rows = 0
        if self.active:
            self.quiet_rows += 1
            if self.quiet_rows >= self.rule.rearm:
                self.active = False
                self.emitted = -1
                self.quiet_rows = 0
