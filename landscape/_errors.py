"""Exceptions and warnings that landscape raises on purpose.

Every error a *user* can cause (bad file, bad argument, wrong factory) is a
:class:`LandscapeError` or a subclass: the command line prints its message as one
line and exits non-zero, never with a traceback.
"""

from __future__ import annotations


class LandscapeError(Exception):
    """A user-facing error: the message alone explains what went wrong."""


class RunFileError(LandscapeError):
    """A run file is missing, corrupt, foreign or of an unsupported format version."""


class StepOrderError(LandscapeError):
    """A step was appended that does not come after the last committed step."""


class InstabilityWarning(UserWarning):
    """A training-instability finding raised online by the monitor."""
