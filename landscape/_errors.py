"""Exceptions and warnings that landscape raises on purpose.

Every error a *user* can cause (bad file, bad argument, wrong factory) is a
:class:`LandscapeError` or a subclass: the command line prints its message as one
line and exits non-zero, never with a traceback.
"""

from __future__ import annotations


class LandscapeError(Exception):
    """A user-facing error: the message alone explains what went wrong."""


class MemoryBudgetError(LandscapeError, ValueError):
    """A curvature measurement cannot fit the memory budget it was given.

    Raised by :mod:`landscape.curvature.memory` (and importable from there); defined here
    so that the failure reports (``landscape.failures``) can tell it apart.
    """


class RunFileError(LandscapeError):
    """A run file is missing, corrupt, foreign or of an unsupported format version."""


class NotInRun(LandscapeError, KeyError):
    """A metric, field or surface the run does not hold; the message says what it holds.

    A ``KeyError`` too, as the lookup of a name.
    """

    def __str__(self) -> str:  # KeyError's own would print the message in quotes
        return str(self.args[0]) if self.args else ""


class NoRowYet(LandscapeError, ValueError):
    """A metric of the run that has no committed row yet (a live run, a failed start)."""


class StepOrderError(LandscapeError):
    """A step was appended that does not come after the last committed step."""


class RuleError(LandscapeError):
    """An alarm rule raised (strict evaluation: offline ``check``, ``Monitor(strict=True)``).

    The message names the rule, the metric and the step; the rule's own exception is the
    ``__cause__``.
    """


class InstabilityWarning(UserWarning):
    """A training-instability finding raised online by the monitor."""


class MetricError(LandscapeError, ValueError):
    """A metric is undefined for this input and the caller asked for ``strict=True``.

    The pure functions of :mod:`landscape.functional` raise it (``docs/metrics.md``, failure
    policy); ``reason`` is the same machine-readable string the non-strict call returns.

    Args:
        reason: the machine-readable reason, e.g. ``"zero_matrix"``.
        message: what was wrong with the input, for people.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class MissingInput(LandscapeError):
    """A metric needs something this step did not provide (a probe batch, ``loss=``, ...).

    :class:`landscape.Monitor` records a NaN row and one ``metric_failed`` finding for it
    (``docs/monitor.md``) instead of stopping training.
    """


class NotApplicable(LandscapeError, ValueError):
    """A metric that picks its layers by itself finds none on this model (no ``nn.Linear``).

    :class:`landscape.Monitor` leaves such a metric out with one warning when it starts (a
    preset on a fully convolutional model), unless ``strict=True``; a layer named
    explicitly that does not exist is a plain ``ValueError`` (a mistake to fix).
    """


class PartialRow(Exception):
    """A metric measured some of its fields and failed on the others.

    Raised from :meth:`landscape.metrics.Metric.compute` with the fields it has (the rest
    NaN) and the error behind the missing ones: :class:`landscape.Monitor` records that
    row, not an all-NaN one, and the failure as for any other (one ``metric_failed``
    finding; re-raised with ``strict=True``). The sentinels use it so that a probe the
    model cannot read does not also lose the update ratios, which need no forward pass.

    Args:
        row: every field of the metric, NaN where it failed.
        error: what failed.
    """

    def __init__(self, row: dict, error: Exception) -> None:
        super().__init__(str(error))
        self.row = row
        self.error = error


def first_line(err: BaseException, empty: str | None = None) -> str:
    """The first line of ``err``'s message, for an error said in one line.

    Args:
        err: the exception.
        empty: what an empty message gives (default: the exception's class name).
    """
    lines = str(err).strip().splitlines()
    return lines[0] if lines else (type(err).__name__ if empty is None else empty)
