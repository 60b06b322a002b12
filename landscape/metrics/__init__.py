"""Metric plugins: the :class:`Metric` interface, the registry, the built-in metrics and the
presets used by :class:`landscape.Monitor`."""

from landscape.metrics import curvature as _curvature  # noqa: F401  (registers)
from landscape.metrics import representation as _representation  # noqa: F401
from landscape.metrics import training as _training  # noqa: F401
from landscape.metrics.base import DATA_SOURCES, Metric, available, create, register
from landscape.metrics.context import MissingInput, StepContext, split_batch
from landscape.metrics.presets import PRESETS, preset

__all__ = [
    "DATA_SOURCES",
    "PRESETS",
    "Metric",
    "MissingInput",
    "StepContext",
    "available",
    "create",
    "preset",
    "register",
    "split_batch",
]
