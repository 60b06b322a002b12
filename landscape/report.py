"""The HTML report of a run: one self-contained file.

Everything the report shows is inside the file: plots are PNG images embedded as base64
``data:`` URIs, the style sheet is inline, there is no script and no external resource,
so the file can be mailed, archived or opened offline. Sections:

* at a glance: the first warning (or error) with its message and what to do, the findings
  by rule (worst severity, count, first and last step), and the last, smallest and largest
  value of every scalar field (with its count of non-finite rows);
* a summary: where the run comes from, its metric groups (fields, rows, step range,
  schedule) and surfaces;
* the findings table (step, rule, severity, metric, value, threshold, message, hint):
  the findings stored in the file plus those the rules of :mod:`landscape.alarms`
  recompute on the whole run (see :func:`collect_findings`), folded behind one click when
  it holds more than :data:`FINDINGS_UNFOLDED` rows;
* one timeline figure per metric that has rows (:mod:`landscape.plotting.timelines`); the
  metrics declared without any row yet (a monitor declares ``adaptive`` up front) are named
  in one line instead;
* one figure per surface (:mod:`landscape.plotting.surfaces`);
* the run's configuration as pretty-printed JSON.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from landscape._errors import LandscapeError
from landscape._files import write_whole
from landscape._version import __version__
from landscape.alarms import collect_findings
from landscape.findings import (
    SEVERITIES,
    Finding,
    at_or_above,  # noqa: F401 (its old home; it lives in findings)
    count_by_severity,
    format_number,
    severity_rank,
)
from landscape.plotting import surfaces as _surface_plots
from landscape.plotting.spectra import is_density
from landscape.plotting.timelines import (
    default_fields,
    figure_png,
    metrics_with_rows,
    nonfinite_rows,
    opens_paths,
    session_starts,
    timelines,
)
from landscape.store import FieldSpec, Run, SurfaceData, refuse_to_overwrite_hdf5
from landscape.store.reader import surface_source

# --------------------------------------------------------------------------- findings


def alarms_available() -> bool:
    """Deprecated: always True, the alarm rules (:mod:`landscape.alarms`) are part of landscape.

    Returns:
        True.
    """
    import warnings

    warnings.warn(
        "landscape.report.alarms_available() is deprecated: landscape.alarms is always "
        "installed",
        DeprecationWarning,
        stacklevel=2,
    )
    return True


# --------------------------------------------------------------------------- surfaces


def surface_plots_available() -> bool:
    """Deprecated: always True, the surface plots are part of landscape.

    Returns:
        True.
    """
    import warnings

    warnings.warn(
        "landscape.report.surface_plots_available() is deprecated: the surface plots are "
        "always installed",
        DeprecationWarning,
        stacklevel=2,
    )
    return True


def _as_figure(obj: Any):
    if hasattr(obj, "savefig"):
        return obj
    figure = getattr(obj, "figure", None) or getattr(obj, "get_figure", lambda: None)()
    if figure is None or not hasattr(figure, "savefig"):
        raise TypeError(f"the surface plot returned {type(obj).__name__}, not a figure")
    return figure


def surface_figure(
    surface: SurfaceData, *, three_d: bool = False, field: str | None = None,
    log: bool | None = None,
    vmax: float | str | None = "auto", levels: int | None = None,
):
    """The figure of a stored surface: a curve (1-D), a contour map or a 3-D view (2-D).

    Args:
        surface: the stored surface.
        three_d: a 3-D view of a 2-D surface instead of a contour map.
        field: which stored grid to draw (default ``loss``, or the first one stored when
            there is no loss).
        log: draw log10 of the values; None (default): when they are positive and span
            two decades (:func:`landscape.plotting.surfaces.contour`).
        vmax: clip the values at this; ``"auto"`` (default): at the outlier fence when
            values lie beyond it, so a diverged corner does not flatten the rest
            (:func:`landscape.plotting.surfaces.outlier_fence`); None: never.
        levels: contour levels of a 2-D contour map (default: :func:`contour`'s).

    Returns:
        A matplotlib figure.

    Raises:
        ValueError: an unknown field, ``three_d`` or ``levels`` on a 1-D surface, or
            ``levels`` with ``three_d``.
    """
    plots = _surface_plots
    if field is None:
        field = "loss" if "loss" in surface.values else next(iter(surface.values))
    if field not in surface.values:
        raise ValueError(
            f"field: surface {surface.name!r} has no field {field!r} "
            f"(fields: {', '.join(surface.values)})"
        )
    if surface.ndim == 1:
        for name, given in (("three_d", three_d), ("levels", levels is not None)):
            if given:
                raise ValueError(f"{name}: surface {surface.name!r} is 1-D; it applies to 2-D")
        return _as_figure(plots.curve(surface, field, log=log, vmax=vmax))
    if three_d:
        if levels is not None:  # a 3-D view has no contour levels: not ignored in silence
            raise ValueError("levels: a 3-D view draws no contour levels; leave out three_d "
                             "for a contour map")
        return _as_figure(plots.surface3d(surface, field, log=log, vmax=vmax))
    shape = {} if levels is None else {"levels": levels}
    return _as_figure(plots.contour(surface, field, log=log, vmax=vmax, **shape))


def _release(fig: Any) -> None:
    """Forget a figure that pyplot may have registered (ours are not; theirs may be)."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)


# --------------------------------------------------------------------------- HTML

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.9em; }
div.wide { max-width: 100%; overflow-x: auto; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.sev-error td.sev { background: #fbd5d5; font-weight: bold; }
tr.sev-warning td.sev { background: #fde8c8; }
tr.sev-info td.sev { background: #dbe9f6; }
span.sev-error { background: #fbd5d5; font-weight: bold; padding: 0 0.3em; }
span.sev-warning { background: #fde8c8; padding: 0 0.3em; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
.note { color: #8a5a00; }
caption { text-align: left; color: #555; padding-bottom: 0.3em;
          position: sticky; left: 0; max-width: calc(100vw - 3em); }
"""


_TABLE = re.compile(r"<table(?P<attrs>[^>]*)>(?P<body>.*?)</table>", re.S)
_CAPTION = re.compile(r"<caption>(.*?)</caption>", re.S)


def _scrolling(page: str) -> str:
    """Each table in a box of its own that scrolls sideways, named for assistive tools.

    A findings table 902 px wide made a 500 px screen's whole page scroll sideways. The
    box (not the table itself, whose ``display: block`` drops its table semantics for some
    screen readers) is focusable, so a keyboard can scroll it, and named after the table's
    caption (its ``id`` without one).
    """
    def wrap(m: re.Match) -> str:
        caption = _CAPTION.search(m.group("body"))
        named = re.search(r'id="([^"]*)"', m.group("attrs"))
        label = (re.sub(r"<[^>]+>", "", caption.group(1)) if caption
                 else named.group(1).replace("-", " ") if named else "table")
        return (f'<div class="wide" role="region" tabindex="0" aria-label="{label}">'
                f"{m.group(0)}</div>")

    return _TABLE.sub(wrap, page)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _verdict_html(findings: Sequence[Finding], recorded: bool = True) -> str:
    """One paragraph: the first warning or error and what to do, or that there is none.

    ``recorded``: whether the run holds a row or a computed surface point; a run that
    recorded nothing is said to have, not to have passed (``check`` refuses it).
    """
    alarming = [f for f in findings if severity_rank(f.severity) >= severity_rank("warning")]
    if not findings and not recorded:
        return ('<p id="verdict">Nothing recorded: this run holds no rows (it stopped before '
                "its first flush, or has not started), so there is nothing to judge.</p>")
    if not findings:
        return '<p id="verdict">No rule fired on this run.</p>'
    if not alarming:
        return (f'<p id="verdict">No warning or error; {len(findings)} info '
                f"finding{'s' if len(findings) != 1 else ''} (context, not alarms).</p>")
    lines = []
    first = min(alarming, key=lambda f: (f.step, -severity_rank(f.severity), f.rule))
    errors = [f for f in alarming if f.severity == "error"]
    shown = [first] + ([min(errors, key=lambda f: (f.step, f.rule))]
                       if errors and first.severity != "error" else [])
    for f in shown:
        hint = f" What to do: {_e(f.hint)}" if f.hint else ""
        lines.append(f'<span class="sev-{_e(f.severity)}">First {_e(f.severity)}</span> at '
                     f"step {f.step}: <b>{_e(f.rule)}</b> on {_e(f.metric)}: "
                     f"{_e(f.message)}.{hint}")
    return '<p id="verdict">' + "<br>".join(lines) + "</p>"


def _rules_html(findings: Sequence[Finding]) -> list[str]:
    """The findings by rule: worst severity, count, first and last step, metrics."""
    if not findings:
        return []
    by_rule: dict[str, list[Finding]] = {}
    for f in findings:
        by_rule.setdefault(f.rule, []).append(f)
    out = ['<table id="findings-by-rule"><caption>Findings by rule</caption>'
           "<thead><tr><th>rule</th><th>worst</th>"
           "<th>findings</th><th>first step</th><th>last step</th><th>metrics</th>"
           "</tr></thead><tbody>"]
    rows = sorted(by_rule.items(), key=lambda item: (
        -max(severity_rank(f.severity) for f in item[1]), min(f.step for f in item[1])))
    for rule, found in rows:
        worst = max((f.severity for f in found), key=severity_rank)
        metrics = ", ".join(sorted({f.metric for f in found}))
        out.append(
            f'<tr class="sev-{_e(worst)}"><td>{_e(rule)}</td><td class=sev>{_e(worst)}</td>'
            f"<td class=num>{len(found)}</td>"
            f"<td class=num>{min(f.step for f in found)}</td>"
            f"<td class=num>{max(f.step for f in found)}</td><td>{_e(metrics)}</td></tr>")
    out.append("</tbody></table>")
    return out


def _unmeasured_steps(run: Run) -> dict[str, np.ndarray]:
    """Per metric, the steps the monitor wrote as not measured (``/metrics/unmeasured``)."""
    from landscape.alarms.online import unmeasured_rows

    by_metric: dict[str, list[int]] = {}
    for metric, step in unmeasured_rows(run):
        by_metric.setdefault(metric, []).append(step)
    return {m: np.asarray(s, dtype=np.int64) for m, s in by_metric.items()}


def _measured(steps: np.ndarray, unmeasured: np.ndarray | None) -> np.ndarray:
    """Which of a metric's ``steps`` hold a measurement (not in ``unmeasured``)."""
    steps = np.asarray(steps)
    return np.ones(len(steps), dtype=bool) if unmeasured is None else ~np.isin(steps, unmeasured)


def _diverged_steps(run: Run, unmeasured: dict[str, np.ndarray]) -> np.ndarray:
    """The steps whose training loss is not finite (``loss/value``; empty without it).

    A step recorded without a loss (``unmeasured``: its NaN row is no value) is none.
    """
    if "loss" not in run.metrics() or "value" not in run.fields("loss"):
        return np.zeros(0, dtype=np.int64)
    steps, values = run.series("loss", "value")
    steps = np.asarray(steps)
    bad = ~np.isfinite(np.asarray(values, dtype=np.float64)) & _measured(
        steps, unmeasured.get("loss"))
    return steps[bad]


def _values_html(run: Run) -> list[str]:
    """Last, smallest and largest value of every scalar numeric field, non-finite rows.

    The rows the monitor wrote as not measured (``unmeasured``: a step recorded without
    its loss) are never counted. A field never finite is listed when some of its rows are
    non-finite: ±inf, or NaN at a step whose training loss is not finite (a run
    non-finite from its start: the loss, gradient norm and update fields); NaN on every
    row of a healthy run means not measured (a field that does not apply), and is left out.
    """
    rows = []
    unmeasured = _unmeasured_steps(run)
    diverged = _diverged_steps(run, unmeasured)
    resumed = run.resumed_after()  # rhythms start over there: NaN is no blow-up
    for metric in metrics_with_rows(run):
        if is_density(run, metric):
            continue
        context = set(run.metric_attrs(metric).get("context", ()))
        for name, spec in run.fields(metric).items():
            if spec.is_string or spec.shape or name in context:
                continue
            steps, values = run.series(metric, name)
            values = np.asarray(values, dtype=np.float64)
            finite = np.isfinite(values)
            # rows the monitor wrote as not measured are no values (a step without its loss)
            measured = _measured(steps, unmeasured.get(metric))
            # ±inf, and NaN where a value was due
            bad = int((nonfinite_rows(values, session_starts(steps, resumed))
                       & measured).sum())
            if not finite.any():
                flat = values.reshape(len(values), -1)
                bad = int((np.isinf(flat).any(axis=1) | (
                    np.isnan(flat).any(axis=1) & np.isin(steps, diverged) & measured)).sum())
                if bad:  # a run non-finite from its start: its count is the news
                    dash = "<td class=num>&ndash;</td>"
                    rows.append(f"<tr><td>{_e(metric)}</td><td>{_e(name)}</td>{dash * 4}"
                                f"<td class=num>{bad}</td></tr>")
                continue  # not measured here (NaN on every row): nothing to say
            last = int(np.flatnonzero(finite)[-1])
            rows.append(
                f"<tr><td>{_e(metric)}</td><td>{_e(name)}</td>"
                f"<td class=num>{format_number(float(values[last]))}</td>"
                f"<td class=num>{int(steps[last])}</td>"
                f"<td class=num>{format_number(float(values[finite].min()))}</td>"
                f"<td class=num>{format_number(float(values[finite].max()))}</td>"
                f"<td class=num>{bad or ''}</td></tr>")
    if not rows:
        return []
    return ['<table id="values"><caption>Every scalar field: its last finite value, its '
            "range, and its non-finite rows (±inf, or NaN where a value was due)</caption>"
            "<thead><tr><th>metric</th><th>field</th><th>last</th>"
            "<th>at step</th><th>min</th><th>max</th><th>non-finite rows</th></tr></thead>"
            "<tbody>", *rows, "</tbody></table>"]


def _state_html(run: Run) -> list[str]:
    """A paragraph when the run did not finish: killed, stopped on an error, still written.

    The rows alone do not tell such a run from a finished one (``landscape check`` prints
    the same line as a note); nothing for a finished run or a file without a writer record.
    """
    status = run.writer_status()
    if status is None or status.finished:
        return []
    upto = run.last_step()
    return [f'<p id="run-state"><span class="sev-warning">Not finished:</span> this run is '
            f"{_e(status.describe())}"
            + ("" if upto is None else f"; this report covers it up to step {upto}")
            + ".</p>"]


def _overview_html(run: Run, findings: Sequence[Finding]) -> list[str]:
    return ['<section id="overview"><h2>At a glance</h2>', *_state_html(run),
            _verdict_html(findings, run.recorded()),
            *_rules_html(findings), *_values_html(run), "</section>"]


def _summary_html(summary: dict, counts: dict[str, int]) -> list[str]:
    out = ['<section id="summary"><h2>Summary</h2>']
    metrics = summary["metrics"]
    if metrics:
        out.append(
            '<table id="metric-tables"><thead><tr><th>metric</th><th>fields</th><th>rows</th>'
            "<th>steps</th>"
            "<th>schedule</th><th>class</th></tr></thead><tbody>"
        )
        for name, m in metrics.items():
            fields = ", ".join(f"{f} {FieldSpec.from_json(s)}" for f, s in m["fields"].items())
            span = "&ndash;" if not m["rows"] else f"{m['first_step']} &hellip; {m['last_step']}"
            out.append(
                f"<tr><td>{_e(name)}</td><td>{_e(fields)}</td><td class=num>{m['rows']}</td>"
                f"<td>{span}</td><td>{_e(m.get('schedule', ''))}</td>"
                f"<td>{_e(m.get('class', ''))}</td></tr>"
            )
        out.append("</tbody></table>")
    else:
        out.append("<p>The run holds no metrics.</p>")
    surfaces = summary["surfaces"]
    if surfaces:
        out.append(
            '<table id="surface-grids"><thead><tr><th>surface</th><th>grid</th><th>computed</th>'
            "<th>fields</th></tr></thead><tbody>"
        )
        for name, s in surfaces.items():
            grid = " &times; ".join(map(str, s["shape"]))
            out.append(
                f"<tr><td>{_e(name)}</td><td>{grid}</td>"
                f"<td class=num>{s['computed']} / {s['total']}</td>"
                f"<td>{_e(', '.join(s['fields']))}</td></tr>"
            )
        out.append("</tbody></table>")
    total = sum(counts.values())
    parts = ", ".join(f"{counts[s]} {s}" for s in reversed(SEVERITIES))
    out.append(f"<p>Findings: {total} ({parts}); checkpoints: {summary['checkpoints']}.</p>")
    out.append("</section>")
    return out


FINDINGS_UNFOLDED = 50
"""Findings listed open in a report; a longer table is folded (``<details>``), one click
away, so that the timelines come next."""


def _findings_html(findings: Sequence[Finding], ignored_rules: Sequence[str] = ()) -> list[str]:
    out = ['<section id="findings-section"><h2>Findings</h2>']
    if ignored_rules:
        names = ", ".join(_e(r) for r in ignored_rules)
        out.append(f'<p id="ignored-rules">Left out (ignored): the findings of {names}.</p>')
    if not findings:
        out.append('<p id="no-findings">No findings.</p></section>')
        return out
    folded = len(findings) > FINDINGS_UNFOLDED
    if folded:  # thousands of rows would push the timelines out of sight
        out.append(f'<details id="all-findings"><summary>All {len(findings):,} findings, in '
                   "step order (counted by rule under \"At a glance\")</summary>")
    out.append(
        '<table id="findings"><thead><tr><th>step</th><th>rule</th><th>severity</th>'
        "<th>metric</th><th>value</th><th>threshold</th><th>message</th><th>hint</th>"
        "</tr></thead><tbody>"
    )
    for f in findings:
        out.append(
            f'<tr class="sev-{_e(f.severity)}"><td class=num>{f.step}</td><td>{_e(f.rule)}</td>'
            f"<td class=sev>{_e(f.severity)}</td><td>{_e(f.metric)}</td>"
            f"<td class=num>{format_number(f.value)}</td>"
            f"<td class=num>{format_number(f.threshold)}</td>"
            f"<td>{_e(f.message)}</td><td>{_e(f.hint)}</td></tr>"
        )
    out.append("</tbody></table>" + ("</details>" if folded else "") + "</section>")
    return out


def _timeline_alt(run: Run, metric: str, findings: Sequence[Finding]) -> str:
    """A timeline's alternative text: what it plots and the findings marked on it.

    "timeline of loss" said nothing a screen reader's user (or a text dump of the page)
    could act on; the first finding of the metric is what its figure is looked at for.
    """
    steps = run.steps(metric)
    span = f", steps {int(steps[0])} to {int(steps[-1])}" if len(steps) else ""
    fields = ", ".join(default_fields(run, metric))  # those the figure draws
    own = [f for f in findings if f.metric.split("/")[0] == metric]
    if not own:
        marked = "no finding on it"
    else:
        worst = max(severity_rank(f.severity) for f in own)
        first = min((f for f in own if severity_rank(f.severity) == worst),
                    key=lambda f: (f.step, f.rule))
        marked = (f"{len(own)} finding{'s' if len(own) != 1 else ''} on it, the first "
                  f"{first.severity} at step {first.step}: {first.rule}")
    others = len(findings) - len(own)
    if others:  # drawn as faint dashed lines on every timeline
        marked += f"; {others} on other metrics, dashed"
    return f"timeline of {metric} ({fields}){span}; {marked}"


def _timelines_html(run: Run, findings: Sequence[Finding], log: bool | None,
                    dpi: int) -> list[str]:
    out = ['<section id="timelines"><h2>Timelines</h2>']
    drawn = metrics_with_rows(run)
    empty = [m for m in run.metrics() if not run.rows(m)]
    if empty:
        out.append(f'<p id="no-rows">No rows yet: {_e(", ".join(empty))}.</p>')
    if not drawn:
        if not empty:
            out.append("<p>No metrics to plot.</p>")
        out.append("</section>")
        return out
    for name, fig in timelines(run, drawn, findings=findings, log=log).items():
        n = run.rows(name)
        rows = f"{n} row" if n == 1 else f"{n} rows"
        if is_density(run, name):  # drawn as the density of its last row
            img = _img(figure_png(fig, dpi=dpi), f"eigenvalue density of {name}")
            caption = (f"{_e(name)}: {rows}; the eigenvalue density of the last, the "
                       "quadrature nodes marked at the bottom.")
        else:
            img = _img(figure_png(fig, dpi=dpi), _timeline_alt(run, name, findings))
            caption = (f"{_e(name)}: {rows}; vertical lines mark findings (grey info, "
                       "orange warning, red error; solid when raised on this metric).")
        out.append(f'<figure id="timeline-{_e(name)}">{img}<figcaption>{caption}'
                   "</figcaption></figure>")
        _release(fig)
    out.append("</section>")
    return out


def _surfaces_html(run: Run, dpi: int, log: bool | None = None) -> list[str]:
    names = run.surfaces()
    if not names:
        return []
    out = ['<section id="surfaces"><h2>Surfaces</h2>']
    for name in names:
        surface = run.surface(name)
        kind = "curve" if surface.ndim == 1 else "contour map"
        field = "loss" if "loss" in surface.values else next(iter(surface.values))
        try:
            fig = surface_figure(surface, field=field, log=log)
        except Exception as err:  # one broken plot must not lose the rest of the report
            out.append(f'<p class="note">Surface {_e(name)}: could not be plotted ({_e(err)}).</p>')
            continue
        done = int(surface.done.sum())
        origin = surface_source(surface.attrs.get("source"))
        grid = " by ".join(map(str, surface.done.shape[::-1]))
        img = _img(figure_png(fig, dpi=dpi),
                   f"surface {name}: {kind} of the {field} over {grid} points, {done} of "
                   f"them computed")
        out.append(
            f'<figure id="surface-{_e(name)}">{img}'
            f"<figcaption>{_e(name)}: {kind} of {_e(field)}, {done} of {surface.done.size} "
            "points computed" + (f"; from {_e(origin)}" if origin else "") + "."
            "</figcaption></figure>"
        )
        _release(fig)
    out.append("</section>")
    return out


@opens_paths
def render_report(
    run: Run | str | os.PathLike,
    *,
    title: str | None = None,
    findings: Sequence[Finding] | None = None,
    log: bool | None = None,
    dpi: int = 90,
    ignored_rules: Sequence[str] = (),
) -> str:
    """The report of ``run`` as one HTML document (a string).

    ``run``: a :class:`~landscape.store.Run` or the path of a run file (opened for the call).
    ``findings``: the findings to list and mark (default :func:`collect_findings`, leaving
    out ``ignored_rules``). ``ignored_rules``: rules whose findings were left out
    (``landscape report --ignore-rule``); the findings section names them.
    ``log``: logarithmic y axes on the timelines and log10 of the surfaces (``None``, the
    default: where a field's positive values span two decades,
    :func:`landscape.plotting.timelines.timeline`, :func:`~landscape.plotting.surfaces.contour`).
    ``dpi``: resolution of the images.
    """
    if dpi < 10:
        raise ValueError(f"dpi must be >= 10, got {dpi}")
    summary = run.summary()
    ignored_rules = sorted(set(ignored_rules))
    found = list(collect_findings(run, ignore=ignored_rules) if findings is None else findings)
    counts = count_by_severity(found)
    if title is None:
        title = f"landscape report: {Path(summary['source']).name}"
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    meta = (
        f"Run {_e(summary['source'])}, format version {summary['format_version']}, "
        f"written by landscape {_e(summary['library_version'])} "
        f"(torch {_e(summary['torch_version'])}) on {_e(summary['created'])}. "
        f"Report generated by landscape {_e(__version__)} at {now}."
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">{meta}</p>',
    ]
    parts += _overview_html(run, found)
    parts += _summary_html(summary, counts)
    parts += _findings_html(found, ignored_rules)
    parts += _timelines_html(run, found, log, dpi)
    parts += _surfaces_html(run, dpi, log)
    config = json.dumps(summary["config"], indent=2, sort_keys=True, default=str,
                        ensure_ascii=False)  # the page is UTF-8: "édge", not "\u00e9dge"
    parts.append(f'<section id="config"><h2>Configuration</h2><pre>{_e(config)}</pre></section>')
    parts.append("</body></html>")
    # a name that is not UTF-8 (a run file's or a checkpoint's path, in the title, the
    # source line or the config) holds lone surrogates: escaped, so the page can be written
    page = _scrolling("\n".join(parts))
    return page.encode("utf-8", "backslashreplace").decode("utf-8")


REPORT_NAME = "report.html"
"""The file name :func:`report_path` gives a report written into a directory."""


def report_path(path: str | os.PathLike) -> Path:
    """The file a report written to ``path`` goes to (as ``landscape report -o`` reads it).

    A path that ends with a separator (``out/``) or names an existing directory means
    ``<dir>/report.html``; any other path is the file itself.

    Args:
        path: the file or directory given.

    Returns:
        The report's file path.
    """
    text = os.fspath(path)
    seps = (os.sep, os.altsep) if os.altsep else (os.sep,)
    p = Path(text)
    if text.endswith(seps) or p.is_dir():
        return p / REPORT_NAME
    return p


def _refuse_to_overwrite_other_than_html(path: Path) -> None:
    """Refuse to write the report over an existing file that is not an HTML page.

    ``-o ckpt-100.pt`` or ``-o mypkg.py`` replaced the checkpoint or the code; an earlier
    report (or any HTML page) is replaced, as asked.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as fh:
        head = fh.read(512).lstrip().lower()
    if not head.startswith((b"<!doctype html", b"<html")):
        raise LandscapeError(f"{path}: exists and is not an HTML page (a checkpoint, code?); "
                             "not overwritten by the report: give another -o")


OTHER_FORMATS = (".pdf", ".png", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".md", ".txt",
                 ".docx", ".tex", ".json")
"""Suffixes of formats a report is not: ``-o report.pdf`` wrote an HTML page named .pdf."""


def check_report_target(path: str | os.PathLike) -> Path:
    """The file ``path`` names, when a report may be written to it.

    Checked before any work (``landscape report``) and by :func:`write_report`.

    Raises:
        LandscapeError: ``path`` is a directory, its directory does not exist, it names
            another format (:data:`OTHER_FORMATS`), or it is an HDF5 file (a run file,
            which the report would replace) or another existing file that is not HTML.
    """
    p = Path(path)
    if p.is_dir():
        raise LandscapeError(f"{p}: is a directory, expected the report's file name")
    if not p.parent.exists():
        raise LandscapeError(f"{p}: directory {p.parent} does not exist")
    if p.suffix.lower() in OTHER_FORMATS:
        raise LandscapeError(f"{p}: the report is an HTML page (its plots embedded); name "
                             f"it {p.with_suffix('.html').name}")
    refuse_to_overwrite_hdf5(p, "the report")  # -o run.h5: the run itself
    _refuse_to_overwrite_other_than_html(p)
    return p


@opens_paths
def write_report(
    run: Run | str | os.PathLike,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    findings: Sequence[Finding] | None = None,
    log: bool | None = None,
    dpi: int = 90,
    ignored_rules: Sequence[str] = (),
) -> Path:
    """Write the self-contained HTML report of ``run`` to ``path`` (see :func:`render_report`).

    ``run``: a :class:`~landscape.store.Run` or the path of a run file (opened for the call).
    ``path`` is the file; :func:`report_path` turns a directory into the file in it.

    Example::

        from landscape.report import write_report
        write_report("run.h5", "report.html")  # also while the run is being written

    Raises:
        LandscapeError: ``path`` cannot take a report (:func:`check_report_target`).
    """
    p = check_report_target(path)
    text = render_report(run, title=title, findings=findings, log=log, dpi=dpi,
                         ignored_rules=ignored_rules)
    return write_whole(p, text)  # a full disk or Ctrl-C leaves the old report as it was
