"""Named bundles of metrics with schedules: ``cheap``, ``standard``, ``full``.

* ``cheap`` — every step: loss, gradient norm, non-finite flags, update size; logits every
  10 steps. Meant to cost well under 10% of a training step.
* ``standard`` — ``cheap`` plus the Taylor radius of the step and spectral alignment every
  10 steps, sharpness (warm-started lambda_max) every 100, effective rank and uniformity
  every 50, neural collapse every 100, top-3 Hessian eigenvalues and the trace every 500.
* ``full`` — denser: taylor, alignment and logits every 5, sharpness and representations
  every 25, collapse every 50, top-3 eigenvalues every 100, trace every 200, spectral
  density every 500.

Each schedule can be overridden by name: ``preset("standard", hessian="every(10)")``; a
name mapped to ``None`` drops that metric.
"""

from __future__ import annotations

from typing import Any

from landscape.metrics.base import Metric, create
from landscape.schedules import Schedule

__all__ = ["PRESETS", "preset"]

PRESETS: dict[str, dict[str, str]] = {
    "cheap": {
        "loss": "every(1)",
        "grad_norm": "every(1)",
        "nonfinite": "every(1)",
        "update": "every(1)",
        "logits": "every(10)",
    },
}
PRESETS["standard"] = {
    **PRESETS["cheap"],
    "taylor": "every(10)",
    "spectral_alignment": "every(10)",
    "hessian": "every(500)",
    "sharpness": "every(100)",
    "representation": "every(50)",
    "collapse": "every(100)",
    "hessian_trace": "every(500)",
}
PRESETS["full"] = {
    **PRESETS["cheap"],
    "logits": "every(5)",
    "taylor": "every(5)",
    "spectral_alignment": "every(5)",
    "hessian": "every(100)",
    "sharpness": "every(25)",
    "representation": "every(25)",
    "collapse": "every(50)",
    "hessian_trace": "every(200)",
    "spectral_density": "every(500)",
}


def preset(name: str, **schedules: Schedule | str | int | None) -> list[Metric]:
    """The metrics of preset ``name``, with optional per-metric schedule overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    table: dict[str, Any] = dict(PRESETS[name])
    for metric, schedule in schedules.items():
        if metric not in table and schedule is not None:
            create(metric)  # validates the name
        table[metric] = schedule
    return [create(m, schedule=s) for m, s in table.items() if s is not None]
