"""landscape: training diagnostics and loss-landscape analysis for PyTorch.

``import landscape as ls``; the public API, grouped:

* run files: :class:`Run` (reader), :class:`RunWriter`, :class:`Finding`, :func:`check`
* training loop: :class:`Monitor`, :mod:`ls.metrics <landscape.metrics>` (plugins, presets),
  :mod:`ls.schedules <landscape.schedules>` (``every``, ``at``, ``logspace``)
* curvature: :class:`Hessian`, :class:`GGN`, :func:`top_eigenvalues`, :func:`hessian_trace`,
  :func:`spectral_density`, :func:`stability_threshold` (from :mod:`landscape.curvature`)
* pure metrics: :mod:`ls.functional <landscape.functional>`
* landscapes and figures: :mod:`ls.surface <landscape.surface>`,
  :mod:`ls.plotting <landscape.plotting>`

Subpackages and the curvature names are imported on first use, so ``import landscape``
stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from landscape._errors import (
    InstabilityWarning,
    LandscapeError,
    NoRowYet,
    NotInRun,
    RuleError,
    RunFileError,
    StepOrderError,
)
from landscape._version import __version__
from landscape.findings import Finding
from landscape.schedules import at, every, logspace
from landscape.store import Run, RunWriter

_SUBMODULES = (
    "alarms", "capture", "curvature", "distributed", "functional", "isolation", "metrics",
    "monitor", "params",
    "plotting", "report", "schedules", "store", "surface",
)
_LAZY = {
    "Monitor": ("landscape.monitor", "Monitor"),
    "close_monitors": ("landscape.monitor", "close_monitors"),
    "check": ("landscape.alarms", "check"),
    "Hessian": ("landscape.curvature", "Hessian"),
    "GGN": ("landscape.curvature", "GGN"),
    "top_eigenvalues": ("landscape.curvature", "top_eigenvalues"),
    "hessian_trace": ("landscape.curvature", "hessian_trace"),
    "spectral_density": ("landscape.curvature", "spectral_density"),
    "stability_threshold": ("landscape.curvature", "stability_threshold"),
}

__all__ = [
    # run files
    "Finding",
    "Run",
    "RunWriter",
    "check",
    # training loop
    "Monitor",
    "close_monitors",
    "at",
    "every",
    "logspace",
    # curvature
    "GGN",
    "Hessian",
    "hessian_trace",
    "spectral_density",
    "stability_threshold",
    "top_eigenvalues",
    # errors and warnings
    "InstabilityWarning",
    "LandscapeError",
    "NoRowYet",
    "NotInRun",
    "RuleError",
    "RunFileError",
    "StepOrderError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"landscape.{name}")
    else:
        raise AttributeError(f"module 'landscape' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(_SUBMODULES))
