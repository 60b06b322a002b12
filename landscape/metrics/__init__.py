"""Metrics: the :class:`Metric` interface, the built-in metrics, the registry and the presets.

Every built-in metric is a class named after what it measures; its registry name (the name
in the run file, presets, the command line and config files) is the snake_case of the class
name (docs/vocabulary.md)::

    import landscape as ls

    metrics = [ls.metrics.Loss(), ls.metrics.Sharpness(schedule=ls.every(15)),
               ls.metrics.TopEigenvalues(k=5, schedule="every(100)")]
    mon = ls.Monitor(model, loss_fn, "run.h5", optimizer=opt, metrics=metrics, probe=probe)

:func:`create` instantiates a metric by name (for the command line and config files);
:func:`preset` returns the instances of a named bundle. docs/monitor.md lists them all.
"""

from landscape._deprecation import module_getattr
from landscape._errors import MissingInput, NotApplicable
from landscape.metrics.base import (
    DATA_SOURCES,
    Metric,
    available,
    canonical_name,
    create,
    register,
    snake_case,
)
from landscape.metrics.batch_parts import split_batch
from landscape.metrics.context import StepContext
from landscape.metrics.curvature import HessianTrace, Sharpness, SpectralDensity, TopEigenvalues
from landscape.metrics.presets import PRESETS, MetricsLike, preset, resolve_metrics
from landscape.metrics.representation import Collapse, Representation, SpectralAlignment
from landscape.metrics.sentinels import Sentinels
from landscape.metrics.training import GradNorm, Logits, Loss, NonFinite, TaylorRadius, Update

__all__ = [
    # the interface
    "DATA_SOURCES",
    "Metric",
    "MissingInput",
    "NotApplicable",
    "StepContext",
    "split_batch",
    # the built-in metrics
    "Loss",
    "GradNorm",
    "NonFinite",
    "Update",
    "Logits",
    "Sentinels",
    "TaylorRadius",
    "TopEigenvalues",
    "Sharpness",
    "HessianTrace",
    "SpectralDensity",
    "SpectralAlignment",
    "Collapse",
    "Representation",
    # the registry and presets
    "MetricsLike",
    "PRESETS",
    "available",
    "canonical_name",
    "create",
    "preset",
    "register",
    "resolve_metrics",
    "snake_case",
]

__getattr__ = module_getattr(
    __name__,
    {
        "HessianSpectrum": "TopEigenvalues",
        "SpectralAlignmentMetric": "SpectralAlignment",
        "Taylor": "TaylorRadius",
    },
    globals(),
)
