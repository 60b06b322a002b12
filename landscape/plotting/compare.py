"""Several runs on one figure per metric: a run beside its control, before and after a change.

:func:`comparison` draws one metric of several runs, one subplot per field as
:func:`~landscape.plotting.timelines.timeline` does, each run in a colour of its own: a
scalar field as one line per run, a vector field (per-layer values, the top-k eigenvalues) as
each run's median over its components with a min-max band. A run's first finding of
severity warning or error is a dashed vertical line in the run's colour, labelled with its
step and rule: when each run was warned is what a comparison asks first. A spectral density
(``spectral_density``) is drawn as each run's density at its last measured row.

Steps are the runs' own: runs that started at step 0 line up; a resumed run keeps its steps.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import PurePath
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from landscape._names import RENAMED_METRICS
from landscape.findings import Finding, severity_rank
from landscape.plotting.spectra import _FLOOR, density_of_row, is_density
from landscape.plotting.thinning import thin, thin_marks
from landscape.plotting.timelines import (
    _draw_series,
    _set_log_scale,
    default_fields,
    metrics_with_rows,
    new_figure,
    nonfinite_rows,
    opens_paths,
    session_starts,
    spans_decades,
)
from landscape.store import Run

__all__ = ["comparison", "comparisons", "first_warning", "run_color", "run_labels"]


def current_name(metric: str) -> str:
    """``metric`` under its current name (a run file may hold a metric's old one)."""
    return RENAMED_METRICS.get(metric, metric)

_WARNING = severity_rank("warning")


def run_labels(sources: Sequence[str]) -> list[str]:
    """Short names that tell runs apart.

    Each path's file name without its suffix, with as many parent folders as it takes to
    make the names distinct (``a/run``, ``b/run``).

    Args:
        sources: the runs' paths (``Run.source``).

    Returns:
        One label per source, in order; paths that stay alike (one given twice, or
        differing only in their suffix) keep their whole form.
    """
    parts = [PurePath(s).with_suffix("").parts or (str(s),) for s in sources]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = [str(PurePath(*p[-depth:])) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    # names alike but for their suffix (run.h5, run.pt) or written differently (./run.h5)
    return [str(s) for s in sources]


def first_warning(findings: Iterable[Finding]) -> Finding | None:
    """The earliest finding of severity warning or error (the first by step), or None."""
    worst = [f for f in findings if severity_rank(f.severity) >= _WARNING]
    return min(worst, key=lambda f: f.step) if worst else None


def _fields(runs: Sequence[Run], metric: str) -> list[str]:
    """The fields drawn: every run's numeric fields but its rows' context, first seen first."""
    names: list[str] = []
    for run in runs:
        if metric not in run:
            continue
        for name in default_fields(run, metric):
            if name not in names:
                names.append(name)
    return names


_LINESTYLES = ("-", ":", "-.")


def run_color(i: int, n: int) -> tuple[Any, str]:
    """The colour and line style of run ``i`` of ``n``.

    Matplotlib's ten colours up to ten runs, tab20's twenty up to twenty, then those again
    in dotted and dash-dot lines (the first-warning marks are dashed).
    """
    if n <= 10:
        return f"C{i}", "-"
    colors = colormaps["tab20"].colors
    return colors[i % 20], _LINESTYLES[(i // 20) % len(_LINESTYLES)]


def _draw_run(ax, steps: np.ndarray, values: np.ndarray, label: str, color: Any,
              linestyle: str = "-", starts: Sequence[int] = ()) -> bool:
    """One run's field on ``ax`` in ``color``; False when it has no finite value to draw.

    Its non-finite rows (:func:`~.timelines.nonfinite_rows`: a run that blew up; ``starts``
    the rows where a resumed session begins) are crosses along the bottom of the axes in
    its colour.
    """
    values = np.asarray(values, dtype=np.float64)
    bad = (np.flatnonzero(nonfinite_rows(values, starts)) if len(steps)
           else np.array([], int))
    if bad.size:
        bad = bad[thin_marks(steps[bad])]
        ax.plot(steps[bad], np.zeros(bad.size), linestyle="none", marker="x", markersize=6,
                color=color, transform=ax.get_xaxis_transform(), clip_on=False)
    if not len(steps) or not np.isfinite(values).any():
        return False
    if values.ndim == 1:
        _draw_series(ax, steps, values, label, 1.2, color=color, linestyle=linestyle)
        return True
    flat = values.reshape(len(steps), -1)
    masked = np.where(np.isfinite(flat), flat, np.nan)
    with warnings.catch_warnings():  # all-NaN rows give NaN, which leaves a gap
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, med, hi = np.nanmin(masked, 1), np.nanmedian(masked, 1), np.nanmax(masked, 1)
    shown = np.union1d(thin(steps, lo), thin(steps, hi))
    ax.fill_between(steps[shown], lo[shown], hi[shown], alpha=0.15, color=color,
                    label=f"_{label} min-max")
    _draw_series(ax, steps, med, label, 1.2, color=color, linestyle=linestyle)
    return True


def _density_comparison(runs: Sequence[Run], metric: str, labels: Sequence[str]) -> Figure:
    """Each run's eigenvalue density at its last row with a finite node, on one log axis."""
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    drawn = 0
    for i, (run, label) in enumerate(zip(runs, labels)):
        if metric not in run or not run.rows(metric):
            continue
        try:
            at, grid, rho, _, _ = density_of_row(run, metric=metric)
        except ValueError:  # every measurement of this run failed
            continue
        color, linestyle = run_color(i, len(runs))
        ax.semilogy(grid, np.maximum(rho, _FLOOR), color=color, linestyle=linestyle,
                    label=f"{label} (step {at})")
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no finite density in any run", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.set_ylim(bottom=_FLOOR / 2)
        ax.legend(fontsize="small", loc="upper right")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log)")
    ax.set_title(f"{metric}: eigenvalue density at each run's last row")
    return fig


@opens_paths
def comparison(
    runs: Sequence[Run | str | os.PathLike],
    metric: str,
    *,
    labels: Sequence[str] | None = None,
    findings: Sequence[Iterable[Finding]] | None = None,
    log: bool | None = None,
    width: float = 8.0,
    row_height: float = 2.4,
) -> Figure:
    """One metric of several runs on one figure: one subplot per field, a colour per run.

    Args:
        runs: two or more runs or paths to run files (one works too); each need not hold
            ``metric``.
        metric: the metric group to draw.
        labels: the legend's name of each run (default: :func:`run_labels` of their paths).
        findings: per run, the findings whose first warning or error is marked (default:
            each run's stored findings; ``[[]] * len(runs)`` for none).
        log: logarithmic y axes; None (default) where a field's positive values, all runs
            together, span a factor of 100 or more; False: linear.
        width: the figure's width in inches.
        row_height: its height per field in inches.

    Returns:
        The figure.

    Raises:
        ValueError: no runs, labels or findings of another length than the runs, or
            ``metric`` in none of them.
    """
    runs = list(runs)
    metric = current_name(metric)
    if not runs:
        raise ValueError("runs: give at least one run")
    labels = run_labels([r.source for r in runs]) if labels is None else list(labels)
    if len(labels) != len(runs):
        raise ValueError(f"labels: {len(labels)} labels for {len(runs)} runs")
    marks = [list(r.findings()) for r in runs] if findings is None else [list(f) for f in findings]
    if len(marks) != len(runs):
        raise ValueError(f"findings: {len(marks)} lists for {len(runs)} runs")
    holding = [r for r in runs if metric in r]
    if not holding:
        raise ValueError(f"metrics: no metric {metric!r} in any of the runs")
    if any(r.rows(metric) and is_density(r, metric) for r in holding):
        return _density_comparison(runs, metric, labels)
    fields = _fields(runs, metric)
    n = max(1, len(fields))
    # a run without the metric is left out of its figure, its first warning too
    firsts = [first_warning(m) if metric in r else None for m, r in zip(marks, runs)]
    entries = len(holding) + sum(f is not None for f in firsts)
    # the legend's entries, written once: they size its columns before the figure exists
    rows = [r.rows(metric) if metric in r else 0 for r in runs]
    run_entries = {i: f"{labels[i]} ({rows[i]} row{'s' if rows[i] != 1 else ''})"
                   for i, r in enumerate(runs) if metric in r}
    first_entries = {i: f"{labels[i]}: first {f.severity} at {f.step} ({f.rule})"
                     for i, f in enumerate(firsts) if f is not None}
    columns, fit = legend_columns([*run_entries.values(), *first_entries.values()], width,
                                  most=2 if entries <= 12 else 3)
    legend_rows = -(-entries // columns)
    fig = new_figure(width, row_height * n + 0.6 + 0.22 * legend_rows)
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    styles = [run_color(i, len(runs)) for i in range(len(runs))]
    fig.suptitle(metric)
    shown: set[int] = set()  # the runs drawn on some axes: the legend's
    for ax, name in zip(axes, fields):
        drawn, vector = [], False
        for i, run in enumerate(runs):
            if metric not in run or name not in run.fields(metric):
                continue
            steps, values = run.series(metric, name)
            if _draw_run(ax, steps, values, labels[i], *styles[i],
                         starts=session_starts(steps, run.resumed_after())):
                drawn.append(np.asarray(values, dtype=np.float64))
                vector |= drawn[-1].ndim > 1
                shown.add(i)
        if not drawn:
            ax.text(0.5, 0.5, "no finite value in any run", ha="center", va="center",
                    transform=ax.transAxes)
        else:
            together = np.concatenate([v.ravel() for v in drawn])
            if log or (log is None and spans_decades(together)):
                _set_log_scale(ax, together)
        for i, first in enumerate(firsts):
            if first is not None:
                ax.axvline(first.step, color=styles[i][0], linestyle="--", linewidth=1.0,
                           alpha=0.8)
        # a vector field (one value per layer, the top-k eigenvalues): each run's median
        # over its components, its min-max as a band
        ax.set_ylabel(f"{name}\n(median, min-max)" if vector else name)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    handles = [Line2D([], [], color=styles[i][0], linestyle=styles[i][1],
                      label=fit(run_entries[i])) for i in sorted(shown)]
    handles += [Line2D([], [], color=styles[i][0], linestyle="--", label=fit(entry))
                for i, entry in first_entries.items()]
    if handles:
        fig.legend(handles=handles, loc="outside lower center",
                   ncol=min(len(handles), columns), fontsize="small", frameon=False)
    return fig


_LEGEND_CHAR = 0.068
"""Inches per character of a legend entry at ``fontsize="small"`` (DejaVu Sans, a bit
above its mean advance, so that a line of capitals and digits fits too)."""
_LEGEND_HANDLE = 0.75
"""Inches a legend column takes besides its text: the line sample and the spacing."""


def legend_columns(texts: Sequence[str], width: float, most: int = 2
                   ) -> tuple[int, Callable[[str], str]]:
    """How many legend columns fit ``width`` inches, and how to shorten an entry to fit.

    The most columns (up to ``most``) whose longest entry fits; with one column an entry
    longer than the figure is shortened in its middle ("lr0.1_seed…_batch64 (300 rows)"),
    where the names of a sweep's runs differ least (they share a prefix and end with
    their row counts and rules). A legend wider than its figure is cut at both sides.

    Returns:
        ``(columns, fit)``: ``fit`` returns an entry unchanged, or shortened to the width.
    """
    longest = max((len(t) for t in texts), default=0)
    columns = most
    while columns > 1 and columns * (longest * _LEGEND_CHAR + _LEGEND_HANDLE) > width:
        columns -= 1
    room = max(12, int((width / columns - _LEGEND_HANDLE) / _LEGEND_CHAR))

    def fit(text: str) -> str:
        if len(text) <= room:
            return text
        head = (room - 1) // 2
        return text[:head] + "\u2026" + text[len(text) - (room - 1 - head):]

    return columns, fit


@opens_paths
def comparisons(
    runs: Sequence[Run | str | os.PathLike],
    metrics: Sequence[str] | None = None,
    *,
    labels: Sequence[str] | None = None,
    findings: Sequence[Iterable[Finding]] | None = None,
    log: bool | None = None,
) -> dict[str, Figure]:
    """One :func:`comparison` figure per metric, by name.

    ``metrics``: default every metric with rows in any of the runs (in the first run's
    order, then the others'); one named here must be in at least one run. The other
    arguments are :func:`comparison`'s.
    """
    runs = list(runs)
    if metrics is None:
        # under today's names: a run recorded before a rename ("hessian") and one after
        # ("top_eigenvalues") share one figure
        names: list[str] = []
        for run in runs:
            names += [m for m in map(current_name, metrics_with_rows(run)) if m not in names]
    else:
        names = list(dict.fromkeys(map(current_name, metrics)))
        unknown = [m for m in names if not any(m in r for r in runs)]
        if unknown:
            raise ValueError(f"metrics: no metric {', '.join(map(repr, unknown))} in any of "
                             "the runs")
    # read once for every figure: a run's findings and labels do not change per metric
    findings = [list(r.findings()) for r in runs] if findings is None \
        else [list(f) for f in findings]
    labels = run_labels([r.source for r in runs]) if labels is None else list(labels)
    return {m: comparison(runs, m, labels=labels, findings=findings, log=log) for m in names}
