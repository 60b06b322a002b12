"""landscape: training diagnostics and loss-landscape analysis for PyTorch."""

from landscape._errors import InstabilityWarning, LandscapeError, RunFileError, StepOrderError
from landscape._version import __version__

__all__ = [
    "InstabilityWarning",
    "LandscapeError",
    "RunFileError",
    "StepOrderError",
    "__version__",
]
