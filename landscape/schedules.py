"""When a metric is due: ``every(n)``, ``at(steps)``, ``logspace(first, last, num)``.

A schedule is a predicate on the training step. Off-steps cost one call of that predicate
and nothing else, which is what keeps a monitored training loop cheap.
"""

from __future__ import annotations

import math
import numbers
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass


class Schedule:
    """Base class: ``schedule(step) -> bool`` and a string that round-trips via :func:`parse`."""

    def __call__(self, step: int) -> bool:  # pragma: no cover - abstract
        """Return whether the schedule is due at ``step``."""
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        """Return the string form, e.g. ``"every(10)"``, that :func:`parse` reads back."""
        raise NotImplementedError

    def started(self, step: int) -> bool:
        """Whether the schedule is on by ``step``: not switched off, and past its start.

        The monitor's adaptive window adds measurements off the schedule only where it is.
        """
        return True

    def first_due(self, first: int, last: int) -> int | None:
        """The first step from ``first`` to ``last`` (both included) that is due, or None.

        The monitor tells a loop that calls it every n-th step which due steps fell
        between its calls. This one tries the steps in turn (at most 100,000 of them).
        """
        return next((s for s in range(first, min(last, first + 99_999) + 1) if self(s)), None)

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True)
class Every(Schedule):
    """Due when ``step >= start`` and ``(step - start) % n == 0``."""

    n: int
    start: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"every(n): n must be >= 1, got {self.n}")

    def __call__(self, step: int) -> bool:
        """Return whether ``step`` is on the schedule."""
        return step >= self.start and (step - self.start) % self.n == 0

    def started(self, step: int) -> bool:
        """Whether ``step`` is at or past ``start``."""
        return step >= self.start

    def first_due(self, first: int, last: int) -> int | None:
        """The first due step from ``first`` to ``last`` (both included), or None."""
        s = max(first, self.start)
        s += -(s - self.start) % self.n
        return s if s <= last else None

    def describe(self) -> str:
        """Return ``"every(n)"`` or ``"every(n, start=s)"``."""
        return f"every({self.n})" if self.start == 0 else f"every({self.n}, start={self.start})"


@dataclass(frozen=True)
class At(Schedule):
    """Due exactly at the listed steps."""

    steps: frozenset[int]

    def __call__(self, step: int) -> bool:
        """Return whether ``step`` is one of the listed steps."""
        return step in self.steps

    def started(self, step: int) -> bool:
        """Whether ``step`` is from the first listed step to the last.

        A list (a logspace) asked for no measurement before or beyond it.
        """
        return bool(self.steps) and min(self.steps) <= step <= max(self.steps)

    def first_due(self, first: int, last: int) -> int | None:
        """The first listed step from ``first`` to ``last`` (both included), or None."""
        return min((s for s in self.steps if first <= s <= last), default=None)

    def describe(self) -> str:
        """Return ``"at(s1, s2, ...)"``."""
        return f"at({', '.join(str(s) for s in sorted(self.steps))})"


@dataclass(frozen=True)
class Never(Schedule):
    """Never due: a metric that is declared but switched off."""

    def __call__(self, step: int) -> bool:
        """Return ``False``."""
        return False

    def started(self, step: int) -> bool:
        """Never: the metric is switched off."""
        return False

    def first_due(self, first: int, last: int) -> int | None:
        """None: never due."""
        return None

    def describe(self) -> str:
        """Return ``"never()"``."""
        return "never()"


def _whole(name: str, value: object) -> int:
    """``value`` as an int; a bool or a fractional number is a ``ValueError``."""
    if not isinstance(value, bool):
        try:  # int, numpy and torch integers (a 0-d integer tensor of at(torch.arange(...)))
            return operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return int(value)
    raise ValueError(f"{name} must be a whole number, got {value!r}")


def every(n: int, start: int = 0) -> Every:
    """Every ``n`` steps from ``start`` on."""
    return Every(_whole("every(n): n", n), _whole("every(n, start): start", start))


def at(steps: Iterable[int] | int) -> At:
    """At the given steps (one step may be given alone: ``at(5)``)."""
    if getattr(steps, "ndim", None) == 0:  # a 0-d array or tensor: one step
        steps = [steps.item()]  # type: ignore[union-attr]
    elif isinstance(steps, (numbers.Number, str, bytes)) or not hasattr(steps, "__iter__"):
        steps = [steps]  # one step alone: 5, 5.0 (a string is refused whole, not per letter)
    chosen = frozenset(_whole("at(...): a step", s) for s in steps)
    if not chosen:
        raise ValueError("at(...) needs at least one step (a schedule that is never due is "
                         "landscape.schedules.never())")
    if min(chosen) < 0:
        raise ValueError(f"at(...): steps are >= 0 (optimizer steps), got {min(chosen)}")
    return At(chosen)


def logspace(first: int, last: int, num: int) -> At:
    """About ``num`` steps spaced evenly in log(step + 1) between ``first`` and ``last``.

    Dense early in training where things change fast, sparse later. Rounded to integers;
    duplicates collapse, so fewer than ``num`` steps may result for short ranges.
    """
    if first < 0 or last < first or num < 1:
        raise ValueError(
            f"logspace needs 0 <= first <= last and num >= 1, got {first}, {last}, {num}"
        )
    if num == 1:
        return at([first])
    lo, hi = math.log1p(first), math.log1p(last)
    return at(round(math.expm1(lo + (hi - lo) * i / (num - 1))) for i in range(num))


def never() -> Never:
    """Never (a metric declared but switched off)."""
    return Never()


_PATTERN = re.compile(r"^\s*(every|at|logspace|never)\s*\((.*)\)\s*$")


def parse(text: str | int | Schedule) -> Schedule:
    """Parse a schedule string.

    Accepts ``"every(10)"``, ``"every(10, start=5)"``, ``"at(1, 5, 9)"`` and
    ``"logspace(0, 1000, 20)"``. A bare integer means ``every(n)``; a :class:`Schedule`
    is returned unchanged.
    """
    if isinstance(text, Schedule):
        return text
    if isinstance(text, bool):
        raise ValueError(f"cannot use {text!r} as a schedule; use every(n), at(...), "
                         "logspace(a, b, n) or never()")
    if isinstance(text, numbers.Integral):  # int, numpy integers
        return every(int(text))
    match = _PATTERN.match(str(text))
    if not match:
        raise ValueError(
            f"cannot parse schedule {text!r}; use every(n), at(...), logspace(a, b, n)"
        )
    kind, args = match.groups()
    positional: list[int] = []
    keywords: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in args.split(","))):
        try:
            if "=" in part:
                key, value = (s.strip() for s in part.split("=", 1))
                keywords[key] = int(value)
            else:
                positional.append(int(part))
        except ValueError:
            raise ValueError(f"cannot parse schedule {text!r}: {part!r} is not a whole "
                             "number") from None
    try:
        if kind == "every":
            return every(*positional, **keywords)
        if kind == "at":
            return at(positional)
        if kind == "logspace":
            return logspace(*positional, **keywords)
        return never()
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot parse schedule {text!r}: {err}") from None
