"""Metric names that changed, for one release of backward compatibility.

New runs write a metric under its new name; a reader asked for either name finds the group
under the other one in files written before or after the rename (see ``docs/vocabulary.md``).
"""

from __future__ import annotations

__all__ = ["RENAMED_METRICS", "metric_name_aliases"]

#: old registry name -> new registry name
RENAMED_METRICS: dict[str, str] = {
    "hessian": "top_eigenvalues",
    "taylor": "taylor_radius",
}


def metric_name_aliases(name: str) -> tuple[str, ...]:
    """Every name a metric group may carry in a run file, ``name`` first.

    Args:
        name: a metric name, old or new.

    Returns:
        ``(name,)`` for a name that never changed, else ``(name, other)`` where ``other`` is
        the new name of an old one or the old name of a new one.
    """
    if name in RENAMED_METRICS:
        return (name, RENAMED_METRICS[name])
    for old, new in RENAMED_METRICS.items():
        if name == new:
            return (name, old)
    return (name,)
