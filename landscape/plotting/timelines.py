"""Metric timelines: one matplotlib figure per metric group of a run.

Each field of a metric is one subplot (sharing the step axis). A vector field (for
example the top-k Hessian eigenvalues, or one spectral-alignment value per monitored
layer) is drawn as one labelled line per component; a field with more components than
``max_lines`` is drawn as its median with a min-max band, so a figure stays legible.
Findings (``landscape.findings.Finding``) are vertical lines coloured by severity; those
raised on the plotted metric itself are drawn solid, the others (only those within the
metric's step range) dashed and faint.

A series of few points (at most ``FEW_POINTS`` finite values) is drawn with a marker on
every point, and a finite point between two non-finite ones gets a marker of its own, so a
single row or an isolated value is visible (a line needs two neighbours). Non-finite values
are ticks along the bottom of the axes: every ``±inf``, and a NaN on a row where the
component's own rhythm (every row, or every k-th) says a value was due, from its first
finite value on. A field that is NaN on every row (a metric not
applicable to this model, or a loss NaN from the start) is labelled "NaN on every row"
instead. :func:`timelines` leaves out metrics that have no rows yet.

Figures are built with :class:`matplotlib.figure.Figure` directly (no ``pyplot``, hence
no global figure registry and no GUI backend): they render through Agg. Nothing here
writes to the file system except :func:`save_figure`; a run given by path is opened for
the call (:func:`opens_paths`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from landscape._files import write_whole
from landscape.findings import SEVERITIES, Finding
from landscape.plotting.spectra import density, is_density
from landscape.plotting.thinning import thin, thin_marks
from landscape.store import Run, refuse_to_overwrite_hdf5
from landscape.store.format import component_names

SEVERITY_COLORS: dict[str, str] = {"info": "#7f7f7f", "warning": "#ff7f0e", "error": "#d62728"}
"""Colour of the vertical finding markers, by severity (info grey: the data lines are blue)."""

SAVE_FORMATS: tuple[str, ...] = ("png", "pdf", "svg", "jpg", "jpeg")
"""File suffixes :func:`save_figure` accepts."""

FEW_POINTS = 25
"""Series with at most this many finite values get a marker on every point."""

_NONFINITE_COLOR = "#7f0000"
_MARKER_SIZE = 3.5

T = TypeVar("T")


def opens_paths(fn: Callable[..., T]) -> Callable[..., T]:
    """Let ``fn``'s first argument, a run or a list of runs, name run files by path.

    A path is opened for the call and closed after it (the figure holds its data); a
    monitor or a writer gives its :meth:`run` (what it wrote so far, flushed first).
    """
    first = next(iter(inspect.signature(fn).parameters))  # "run" or "runs", by keyword too

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with contextlib.ExitStack() as stack:
            def opened(run: Any) -> Any:
                if isinstance(run, (str, os.PathLike)):
                    return stack.enter_context(Run.open(run))
                if not isinstance(run, Run) and callable(getattr(run, "run", None)):
                    return run.run()  # a Monitor, a RunWriter
                return run

            def each(runs: Any) -> Any:
                if isinstance(runs, (str, os.PathLike, Run)) or callable(
                        getattr(runs, "run", None)):
                    return opened(runs)
                if not hasattr(runs, "__iter__"):
                    raise TypeError(f"{first}: expected a Run, a run file's path, a Monitor "
                                    f"or a list of runs, got {type(runs).__name__}")
                return [opened(r) for r in runs]

            if args:
                args = (each(args[0]), *args[1:])
            elif first in kwargs:
                kwargs[first] = each(kwargs[first])
            return fn(*args, **kwargs)

    return wrapper


def new_figure(width: float = 8.0, height: float = 4.0) -> Figure:
    """A figure attached to an Agg canvas (usable without pyplot or a display)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plottable_fields(run: Run, metric: str) -> list[str]:
    """Numeric fields of ``metric`` (string fields such as labels cannot be plotted)."""
    return [name for name, spec in run.fields(metric).items() if not spec.is_string]


def default_fields(run: Run, metric: str) -> list[str]:
    """The fields a timeline draws unless told which.

    The numeric ones but those recording a row's conditions (``CONTEXT_FIELDS``), or all
    numeric ones when every one is such a field.
    """
    available = plottable_fields(run, metric)
    context = set(run.metric_attrs(metric).get("context", ()))
    return [f for f in available if f not in context] or available


def _component_labels(field: str, shape: tuple[int, ...], labels: Sequence[str] | None) -> list:
    n = int(np.prod(shape))
    if labels is not None and len(labels) == n:
        return [f"{field}[{lab}]" for lab in labels]
    return [f"{field}[{','.join(map(str, idx))}]" for idx in np.ndindex(*shape)]


def _field_labels(run: Run, metric: str, field: str) -> Sequence[str] | None:
    """Component names from the metric's stored configuration (:func:`component_names`)."""
    return component_names(run.metric_attrs(metric).get("params"), field,
                           tuple(run.fields(metric)[field].shape))


_LIMITS = {"lambda_max": "threshold"}
"""A field drawn with its limit on the same axis (sharpness: the stability threshold)."""

AUTO_LOG_RANGE = 100.0
"""``log=None`` draws a field on a log axis when its finite values are all positive and the
largest is at least this many times the smallest: a ratio that climbs from 0.02 to 3,500,
a loss that explodes, stay legible (on a linear axis their early rise is a flat line)."""


def spans_decades(values: np.ndarray) -> bool:
    """Whether ``values`` are positive and span :data:`AUTO_LOG_RANGE` (``log=None``)."""
    finite = values[np.isfinite(values)]
    return bool(finite.size > 1 and (finite > 0).all()
                and finite.max() >= AUTO_LOG_RANGE * finite.min())


def _set_log_scale(ax, values: np.ndarray) -> None:
    finite = values[np.isfinite(values)]
    if finite.size and (finite > 0).all():
        ax.set_yscale("log")
        return
    nonzero = np.abs(finite[finite != 0])
    # linear within the smallest magnitude, but never more than 3 decades below the largest
    linthresh = float(max(nonzero.min(), 1e-3 * nonzero.max())) if nonzero.size else 1.0
    ax.set_yscale("symlog", linthresh=linthresh)


def nonfinite_rows(values: np.ndarray, starts: Sequence[int] = ()) -> np.ndarray:
    """Rows to mark as non-finite: any ``±inf``, and NaN where a measurement was due.

    NaN in a metric row often means "not measured on this row": a field measured every
    k-th call, the secant before its second call, a metric that does not apply. So a
    component's NaN is marked only on the rows where its own rhythm says a value was due:
    from its first finite row on, every p-th row, p the smallest spacing of its finite
    rows (1 for a field measured every row). A component NaN on every row is not marked.
    A resumed run starts those rhythms over (``starts``: the rows where a session begins,
    :func:`session_starts`), so each session is read on its own.

    Args:
        values: the field's rows, shape ``(n, *shape)``.
        starts: the rows where a resumed session begins.

    Returns:
        A boolean array of length ``n``.
    """
    flat = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    bad = np.isinf(flat).any(axis=1)
    edges = [0, *sorted({int(i) for i in starts if 0 < int(i) < len(flat)}), len(flat)]
    for whole in flat.T:
        if not np.isfinite(whole).any():
            continue  # NaN on every row: not measured
        for lo, hi in itertools.pairwise(edges):
            column = whole[lo:hi]
            # a session without a finite value (a resumed run NaN from its first row) is
            # read by the whole series' rhythm: those NaN are a blow-up, not a restart
            rhythm = column if np.isfinite(column).any() else whole
            offset = 0 if rhythm is column else lo
            finite = np.flatnonzero(np.isfinite(rhythm))
            period = int(np.diff(finite).min()) if finite.size > 1 else 1
            rows = np.arange(hi - lo) + offset
            due = (rows >= finite[0]) & ((rows - finite[0]) % period == 0)
            bad[lo:hi] |= np.isnan(column) & due
    return bad


def session_starts(steps: np.ndarray, resumed_after: Sequence[int]) -> list[int]:
    """The rows of a series (its ``steps``) where a resumed session's rows begin.

    Args:
        steps: the series' steps, increasing.
        resumed_after: :meth:`~landscape.store.Run.resumed_after`.

    Returns:
        Row indices, increasing (none at the series' ends).
    """
    rows = np.searchsorted(np.asarray(steps), np.asarray(resumed_after, dtype=np.int64),
                           side="right")
    return sorted({int(i) for i in rows if 0 < i < len(steps)})


def _mark_nonfinite(ax, steps: np.ndarray, values: np.ndarray,
                    starts: Sequence[int] = ()) -> bool:
    """Tick marks along the bottom of ``ax`` at the :func:`nonfinite_rows`; True if any."""
    bad = np.flatnonzero(nonfinite_rows(values, starts))
    if not bad.size:
        return False
    bad = bad[thin_marks(steps[bad])]
    ax.plot(
        steps[bad],
        np.zeros(bad.size),
        linestyle="none",
        marker="|",
        markersize=10,
        color=_NONFINITE_COLOR,
        transform=ax.get_xaxis_transform(),
        clip_on=False,
    )
    return True


def _isolated(finite: np.ndarray) -> np.ndarray:
    """Finite points with no finite neighbour: a line through them draws nothing."""
    left = np.concatenate(([False], finite[:-1]))
    right = np.concatenate((finite[1:], [False]))
    return finite & ~left & ~right


def _draw_series(ax, steps: np.ndarray, y: np.ndarray, label: str, linewidth: float,
                 color: Any = None, linestyle: str = "-", drawstyle: str = "default") -> None:
    """One line; markers on every point when there are few, else on the isolated ones.

    A long series is drawn through the points that show (:func:`~.thinning.thin`).
    ``color``: the line's (default: the axes' next one); ``linestyle``: the line's (the
    isolated points' markers stand alone whatever it is); ``drawstyle="steps-post"`` for
    a value that holds from its row to the next (a stability threshold).
    """
    finite = np.isfinite(y)
    few = int(finite.sum()) <= FEW_POINTS
    style = {"marker": "o", "markersize": _MARKER_SIZE} if few else {}
    shown = thin(steps, y)
    (line,) = ax.plot(steps[shown], y[shown], label=label, linewidth=linewidth, color=color,
                      linestyle=linestyle, drawstyle=drawstyle, **style)
    alone = np.flatnonzero(_isolated(finite))
    if not few and alone.size:
        alone = alone[thin(steps[alone], y[alone])]
        ax.plot(steps[alone], y[alone], linestyle="none", marker="o", markersize=_MARKER_SIZE,
                color=line.get_color(), label=f"_{label} isolated")


def _finding_matches(finding: Finding, metric: str) -> bool:
    return finding.metric == metric or finding.metric.startswith(metric + "/")


def _draw_findings(
    ax, findings: Sequence[Finding], metric: str, span: tuple[int, int] | None
) -> set[str]:
    """Draw a vertical line for every finding on ``metric`` and the others inside ``span``.

    A finding far outside the metric's steps would only squeeze its curves, so those are left
    out. Returns the ``(severity, own)`` pairs drawn (``own``: raised on this metric, a
    solid line; else dashed and faint).
    """
    # one collection of lines per (severity, own) and each step once: a line artist per
    # finding made a run with 10k findings take minutes and gigabytes to draw
    steps: dict[tuple[str, bool], set[int]] = {}
    for f in findings:
        own = _finding_matches(f, metric)
        if not own and (span is None or not span[0] <= f.step <= span[1]):
            continue
        steps.setdefault((f.severity, own), set()).add(int(f.step))
    for (severity, own), at in steps.items():
        # x in data, y in axes coordinates; autolim off, as axvline: matplotlib < 3.8 read
        # the 0..1 of vlines(transform=...) as data and squashed the curves
        ax.add_collection(LineCollection(
            [[(x, 0.0), (x, 1.0)] for x in sorted(at)], transform=ax.get_xaxis_transform(),
            colors=SEVERITY_COLORS.get(severity, "grey"),
            linestyles="-" if own else "--",
            linewidths=1.4 if own else 0.8,
            alpha=0.9 if own else 0.45,
            zorder=0.5,
        ), autolim=False)
    return set(steps)


def _plot_field(
    ax, steps: np.ndarray, values: np.ndarray, field: str, labels, max_lines: int,
    log: bool | None, starts: Sequence[int] = (),
) -> tuple[bool, bool]:
    """Draw one field on ``ax`` (``starts``: :func:`session_starts`).

    Returns:
        Whether it drew several labelled artists (needs a legend), and whether it marked
        non-finite rows.
    """
    values = np.asarray(values, dtype=np.float64)
    shape = values.shape[1:]
    if not shape:  # a limit holds from its row to the next, as beside its quantity below
        _draw_series(ax, steps, values, field, 1.2,
                     drawstyle="steps-post" if field in _LIMITS.values() else "default")
    else:
        flat = values.reshape(len(steps), -1)
        if flat.shape[1] <= max_lines:
            for column, label in zip(flat.T, _component_labels(field, shape, labels)):
                _draw_series(ax, steps, column, label, 1.1)
        else:
            masked = np.where(np.isfinite(flat), flat, np.nan)
            with warnings.catch_warnings():  # all-NaN rows give NaN, which leaves a gap
                warnings.simplefilter("ignore", RuntimeWarning)
                lo, med, hi = (np.nanmin(masked, 1), np.nanmedian(masked, 1),
                               np.nanmax(masked, 1))
            shown = np.union1d(thin(steps, lo), thin(steps, hi))
            ax.fill_between(steps[shown], lo[shown], hi[shown], alpha=0.25,
                            label=f"{field} min-max ({flat.shape[1]})")
            _draw_series(ax, steps, med, f"{field} median", 1.2)
    marked = _mark_nonfinite(ax, steps, values, starts)
    if len(steps) and (log or (log is None and spans_decades(values))):
        _set_log_scale(ax, values)
    ax.set_ylabel(field)
    ax.grid(True, alpha=0.3)
    return bool(shape), marked


def metrics_with_rows(run: Run) -> list[str]:
    """The metrics of ``run`` with a numeric field and a row: what :func:`timelines` draws.

    A metric is declared before its first row (a monitor declares all of its metrics when it
    opens the file, ``adaptive`` included), so a run may hold metrics without rows; a
    metric of strings only (the monitor's ``unmeasured`` table) has nothing to draw, and
    the monitor's ``probe`` table (one row: how many samples its default probe kept) is a
    note, not a series.

    Args:
        run: the run.

    Returns:
        Their names, in the run's order.
    """
    return [m for m in run.metrics()
            if m != "probe" and run.rows(m)
            and any(not f.is_string for f in run.fields(m).values())]


@opens_paths
def timeline(
    run: Run | str | os.PathLike,
    metric: str,
    *,
    fields: Sequence[str] | None = None,
    findings: Iterable[Finding] | None = None,
    log: bool | None = None,
    max_lines: int = 12,
    width: float = 8.0,
    row_height: float = 2.4,
) -> Figure:
    """The timeline figure of one metric group: one subplot per field.

    ``run``: a :class:`~landscape.store.Run` or the path of a run file (opened for the
    call).
    ``fields``: which fields to draw (default: every numeric field but those the run
    records as the rows' context, such as ``loss/samples``). ``findings``: the
    findings to mark (default: the run's stored findings; pass ``[]`` for none).
    ``log``: logarithmic y axes (symmetric-log where a field has values <= 0); ``None``
    (default): a log axis for each field whose values are positive and span a factor of
    :data:`AUTO_LOG_RANGE` or more, linear otherwise; ``False``: linear everywhere.
    ``max_lines``: vector fields with more components are drawn as median and min-max band.
    """
    if max_lines < 1:
        raise ValueError(f"max_lines must be >= 1, got {max_lines}")
    available = plottable_fields(run, metric)  # raises KeyError for an unknown metric
    if fields is None:
        fields = default_fields(run, metric)
    else:
        unknown = [f for f in fields if f not in available]
        if unknown:
            raise ValueError(
                f"fields: metric {metric!r} has no numeric field {', '.join(map(repr, unknown))} "
                f"(numeric fields: {', '.join(available) or 'none'})"
            )
    marks = list(run.findings() if findings is None else findings)
    n = max(1, len(fields))
    fig = new_figure(width, row_height * n + 0.6)
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    all_steps = run.steps(metric)
    rows = len(all_steps)
    span = (int(all_steps[0]), int(all_steps[-1])) if rows else None
    counted = f"{rows} row{'s' if rows != 1 else ''}"
    fig.suptitle(f"{metric}  ({counted})" if fields else f"{metric}  (no numeric fields)")
    drawn: set[tuple[str, bool]] = set()
    nonfinite = False
    resumed = run.resumed_after()
    for ax, name in zip(axes, fields):
        steps, values = run.series(metric, name)
        numbers = np.asarray(values, dtype=np.float64)
        if len(steps) == 0 or not np.isfinite(numbers).any():
            # no rows, or NaN on every row: not measured here, or a run NaN from its start;
            # ±inf among the NaN rows: nothing finite to draw either
            text = ("no rows yet" if len(steps) == 0 else "NaN on every row"
                    if np.isnan(numbers).all() else "no finite value (±inf or NaN)")
            ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
            if len(steps):  # the steps' span, with the margins the other panels have (a
                # fixed xlim here clipped the shared axis of every panel to the end rows)
                ax.update_datalim([(float(steps[0]), 0.0), (float(steps[-1]), 0.0)])
                ax.autoscale_view()
            ax.set_ylabel(name)
        else:
            labels = _field_labels(run, metric, name)
            legend, marked = _plot_field(ax, steps, numbers, name, labels, max_lines, log,
                                         session_starts(steps, resumed))
            limit = _LIMITS.get(name)
            if limit is not None and limit in available and numbers.ndim == 1:
                # the quantity and the limit it must stay under, on one axis: where they
                # cross is the edge of stability (the edge_of_stability rule's ratio 1). The
                # limit holds from its row to the next (a learning rate changed between two
                # rows at once, not along a slope): drawn as steps
                _, bound = run.series(metric, limit)
                bound = np.asarray(bound, dtype=np.float64)
                shown = thin(steps, bound)
                ax.plot(steps[shown], bound[shown], linestyle="--", drawstyle="steps-post",
                        color=SEVERITY_COLORS["error"], lw=1.0, label=limit)
                both = np.concatenate([numbers, bound])
                if log is None and ax.get_yscale() == "linear" and spans_decades(both):
                    # a limit far above the quantity flattened it to a line at 0
                    _set_log_scale(ax, both)
                legend = True
            if legend:
                # "best" scans every point: affordable only on short series
                ax.legend(fontsize="small", loc="best" if len(steps) <= 2000 else "upper right")
            nonfinite |= marked
        drawn |= _draw_findings(ax, marks, metric, span)
    axes[-1].set_xlabel("step")
    # steps are whole: a one-row run had ticks at 6.56, 6.64, ...
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    severities = {severity for severity, _ in drawn}
    handles = [
        Line2D([], [], color=SEVERITY_COLORS[s], label=f"finding: {s}")
        for s in SEVERITIES
        if s in severities
    ]
    if any(not own for _, own in drawn):  # the faint dashed lines: said, not only in captions
        handles.append(Line2D([], [], color="grey", linestyle="--", alpha=0.6,
                              label="finding on another metric"))
    if nonfinite:
        handles.append(
            Line2D([], [], color=_NONFINITE_COLOR, marker="|", linestyle="none", label="non-finite")
        )
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles),
                   fontsize="small", frameon=False)
    return fig


@opens_paths
def timelines(
    run: Run | str | os.PathLike,
    metrics: Sequence[str] | None = None,
    *,
    log: bool | None = None,
    findings: Iterable[Finding] | None = None,
    max_lines: int = 12,
) -> dict[str, Figure]:
    """One :func:`timeline` figure per metric, by name.

    ``metrics``: the metrics to draw (default: every metric of the run that has rows, see
    :func:`metrics_with_rows`; a metric named here is drawn even without rows). A metric of
    quadrature nodes and weights (``spectral_density``) is drawn as the eigenvalue density
    of its last row instead (:func:`landscape.plotting.spectra.density`): a timeline of its
    nodes says nothing of the spectrum.
    """
    names = metrics_with_rows(run) if metrics is None else list(metrics)
    known = set(run.metrics())
    unknown = [m for m in names if m not in run]  # `in` also finds renamed metrics
    if unknown:
        raise ValueError(
            f"metrics: no metric {', '.join(map(repr, unknown))} in {run.source} "
            f"(metrics: {', '.join(sorted(known)) or 'none'})"
        )
    marks = list(run.findings() if findings is None else findings)
    return {m: _figure(run, m, marks, log, max_lines) for m in names}


def _figure(run: Run, metric: str, marks: list[Finding], log: bool | None,
            max_lines: int) -> Figure:
    """The density of a spectral_density metric's last measured row, else the timeline."""
    if run.rows(metric) and is_density(run, metric):
        try:
            return density(run, metric=metric)
        except ValueError:  # no row holds a finite node: every measurement failed
            pass
    return timeline(run, metric, findings=marks, log=log, max_lines=max_lines)


_DRAWABLE = 1e200
"""Magnitudes (and, on a log axis, ratios) past which matplotlib's ticks overflow."""


def _beyond_axes(fig: Figure) -> bool:
    """Whether an axis of ``fig`` holds values past what matplotlib can tick."""
    for ax in fig.axes:
        lo, hi = ax.dataLim.intervaly
        if not (np.isfinite(lo) and np.isfinite(hi)):
            continue  # no data on it
        if max(abs(lo), abs(hi)) > _DRAWABLE or (
                ax.get_yscale() == "log" and lo > 0 and hi / lo > _DRAWABLE):
            return True
    return False


def _savefig(fig: Figure, target: Any, **kwargs: Any) -> None:
    """``fig.savefig``; a figure whose values no axis can show says so in their place.

    Values matplotlib cannot place on an axis (a field from 1e-20 to 1e250 on a log axis,
    one reaching -1.7e308 on a linear one) fail its tick computation (OverflowError,
    ValueError): the report and ``plot`` stopped with a traceback, or blamed the run file.
    Such a figure is replaced by one line naming the cause; any other error is raised.
    """
    try:
        fig.savefig(target, **kwargs)
        return
    except (OverflowError, ValueError) as err:
        if not _beyond_axes(fig):
            raise
        cause = f"{type(err).__name__}: {err}"
    title = fig._suptitle.get_text() if fig._suptitle is not None else "figure"
    fig.clear()
    fig.text(0.5, 0.5, f"{title}: cannot be drawn, its values are beyond what an axis can "
             f"show ({cause})", ha="center", va="center", wrap=True)
    if isinstance(target, io.BytesIO):
        target.seek(0)
        target.truncate()
    fig.savefig(target, **kwargs)


def figure_png(fig: Figure, *, dpi: int = 100) -> bytes:
    """The figure rendered to PNG bytes in memory."""
    buf = io.BytesIO()
    _savefig(fig, buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path``; the format follows the suffix (see :data:`SAVE_FORMATS`)."""
    p = Path(path)
    refuse_to_overwrite_hdf5(p, "a figure")  # -o run.h5: the run itself
    fmt = p.suffix.lower().lstrip(".")
    if fmt not in SAVE_FORMATS:
        raise ValueError(
            f"path: cannot tell the image format of {str(p)!r}; use a suffix among "
            + ", ".join("." + s for s in SAVE_FORMATS)
        )
    buf = io.BytesIO()  # rendered whole first: a failed write leaves the old file as it was
    _savefig(fig, buf, format=fmt, dpi=dpi)
    return write_whole(p, buf.getvalue())
