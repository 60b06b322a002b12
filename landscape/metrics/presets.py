"""Named bundles of metrics with schedules, and the resolution of a ``metrics=`` argument.

* ``cheap`` (the default) — the every-step sentinels (secant Taylor ratio, logit growth,
  update ratios) and training signals (loss, gradient norm, non-finite flags, update
  size), logits at intervals. About 1 to 3 ms of fixed work per step: a fifth of a 13 ms
  step of a tiny transformer, half of a 2 ms step of a tiny CNN, less on real models
  (docs/benchmarks.md).
* ``standard`` — ``cheap`` plus the Taylor radius of the step, spectral alignment,
  sharpness (warm-started lambda_max), effective rank and uniformity, neural collapse, the
  top-3 Hessian eigenvalues and the trace, each at its own interval.
* ``full`` — all of them more densely, and the spectral density.

A metric runs on its class's ``default_schedule`` unless the preset's table below says
otherwise, so each schedule is written once; :data:`PRESETS` and the table in
docs/monitor.md ("Metrics and presets") list the resulting schedules. Each can be
overridden by metric name: ``preset("standard", top_eigenvalues="every(10)")``; a name
mapped to ``None`` drops that metric.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from landscape.metrics.base import Metric, canonical_name, create
from landscape.metrics.curvature import HessianTrace, Sharpness, SpectralDensity, TopEigenvalues
from landscape.metrics.representation import Collapse, Representation, SpectralAlignment
from landscape.metrics.sentinels import Sentinels
from landscape.metrics.training import GradNorm, Logits, Loss, NonFinite, TaylorRadius, Update
from landscape.schedules import Schedule

__all__ = ["PRESETS", "MetricsLike", "preset", "resolve_metrics"]

#: What ``Monitor(metrics=...)`` accepts: a preset name, a metric name, a metric, a list of
#: metric names and metrics, a mapping of metric name to schedule, or None (the ``cheap``
#: preset).
MetricsLike = str | Metric | Iterable[str | Metric] | Mapping[str, Any] | None

_DEFAULT = None  # in a table: the class's default_schedule

# preset -> {metric class: schedule where the preset differs from the class default}
_TABLES: dict[str, dict[type[Metric], str | None]] = {
    "cheap": dict.fromkeys((Loss, GradNorm, NonFinite, Update, Sentinels, Logits), _DEFAULT),
}
_TABLES["standard"] = {
    **_TABLES["cheap"],
    TaylorRadius: _DEFAULT,
    SpectralAlignment: _DEFAULT,
    TopEigenvalues: "every(500)",
    Sharpness: "every(100)",
    Representation: _DEFAULT,
    Collapse: _DEFAULT,
    HessianTrace: "every(500)",
}
_TABLES["full"] = {
    **_TABLES["cheap"],
    Logits: "every(5)",
    TaylorRadius: "every(5)",
    SpectralAlignment: "every(5)",
    TopEigenvalues: "every(100)",
    Sharpness: "every(25)",
    Representation: "every(25)",
    Collapse: "every(50)",
    HessianTrace: "every(200)",
    SpectralDensity: "every(500)",
}

#: preset -> {metric name: schedule}, derived from the tables and the classes' defaults.
PRESETS: dict[str, dict[str, str]] = {
    name: {cls.name: str(cls.default_schedule if s is None else s) for cls, s in table.items()}
    for name, table in _TABLES.items()
}


def preset(name: str, **schedules: Schedule | str | int | None) -> list[Metric]:
    """The metrics of preset ``name``, with optional per-metric schedule overrides.

    Args:
        name: ``"cheap"``, ``"standard"`` or ``"full"``.
        **schedules: ``metric_name=schedule`` overrides; ``None`` drops the metric, a metric
            not in the preset is added. Old metric names (``hessian=``) warn and apply to
            the renamed metric.

    Returns:
        New metric instances, in the preset's order, added metrics last.

    Raises:
        ValueError: unknown preset or metric name.

    Example:
        >>> import landscape as ls
        >>> [m.name for m in ls.metrics.preset("cheap", logits=None)]
        ['loss', 'grad_norm', 'nonfinite', 'update', 'sentinels']
    """
    if name not in _TABLES:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(_TABLES)}")
    classes = {cls.name: cls for cls in _TABLES[name]}
    table: dict[str, Any] = {
        cls.name: cls.default_schedule if s is None else s for cls, s in _TABLES[name].items()
    }
    for metric_name, schedule in schedules.items():
        metric_name = canonical_name(metric_name)
        if metric_name not in table and schedule is not None:
            create(metric_name)  # validates the name
        table[metric_name] = schedule
    return [
        classes[m](schedule=s) if m in classes else create(m, schedule=s)
        for m, s in table.items()
        if s is not None
    ]


def resolve_metrics(metrics: MetricsLike) -> list[Metric]:
    """Metric instances from a ``metrics=`` argument, checked, without repeats.

    Args:
        metrics: a preset name, a metric name, a :class:`Metric`, a list of metric names
            and metrics, a mapping of metric name to schedule (as :data:`PRESETS` lists
            them; ``None`` leaves the metric out), or None for the ``cheap`` preset.

    Returns:
        The metrics (names instantiated with their default settings).

    Raises:
        TypeError: an item is neither a name nor a :class:`Metric`.
        ValueError: an unknown name, or a metric named twice.
    """
    if metrics is None:
        return preset("cheap")
    if isinstance(metrics, str):
        if metrics in _TABLES:
            return preset(metrics)
        try:
            return [create(metrics)]
        except ValueError as err:  # a mistyped preset ("standrad") is no metric either
            raise ValueError(f"metrics: {metrics!r} is neither a preset "
                             f"({', '.join(_TABLES)}) nor a metric name: {err}") from None
    if isinstance(metrics, Metric):
        return resolve_metrics([metrics])
    if isinstance(metrics, Mapping):  # {name: schedule}, as PRESETS lists them
        out = [create(name, schedule=schedule) for name, schedule in metrics.items()
               if schedule is not None]
        return resolve_metrics(out)
    if not isinstance(metrics, Iterable):
        raise TypeError(f"metrics: expected a preset name, a metric, or a list of metrics and "
                        f"names, got {type(metrics).__name__} {metrics!r}")
    out = [create(m) if isinstance(m, str) else m for m in metrics]
    for m in out:
        if not isinstance(m, Metric):
            raise TypeError(f"metrics: expected Metric instances or names, got {m!r}")
        if not (hasattr(m, "schedule") and hasattr(m, "data")):  # Metric.__init__ sets them
            raise TypeError(f"metrics: {type(m).__name__}.__init__ did not call "
                            "super().__init__() (the metric has no schedule nor data)")
    metric_names = [m.name for m in out]
    dupes = sorted({n for n in metric_names if metric_names.count(n) > 1})
    if dupes:
        raise ValueError(f"metrics: each metric may appear once, repeated: {', '.join(dupes)}; "
                         "give a second instance a name of its own (metric.name = '...')")
    return out
