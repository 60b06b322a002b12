"""Timelines (landscape.plotting.timelines), the HTML report (landscape.report), and the
report rendered by a real browser: headless Chromium loads the file, the test reads back
the title, the findings table and every image's decoded size, and checks a screenshot.

Chromium is a test requirement (``make test`` installs Debian's ``chromium`` when it is
missing); the browser test fails rather than skips without it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import types
import warnings

import matplotlib.colors as mcolors
import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.figure import Figure

from landscape.findings import Finding
from landscape.plotting.timelines import (
    FEW_POINTS,
    SEVERITY_COLORS,
    figure_png,
    metrics_with_rows,
    save_figure,
    timeline,
    timelines,
)
from landscape.report import collect_findings, render_report, report_path, write_report
from landscape.store import Run, RunWriter
from tests.cli._runs import add_line_and_plane

PNG = b"\x89PNG\r\n\x1a\n"


def _writer(findings=(), *, config=None):
    w = RunWriter.memory(config=config or {"lr": 0.1, "model": "<mlp> & co"})
    w.declare("loss", {"value": None, "phase": "S16"})
    w.declare("hessian", {"eigenvalues": (3,), "n_matvec": None})
    w.declare("spectral_alignment", {"minority": (2,)}, params={"layers": ["fc1", "fc2"]})
    w.declare("wide", {"v": (20,)})
    for s in range(40):
        w.append("loss", s, {"value": np.nan if s == 25 else 1.0 / (s + 1), "phase": "train"})
        w.append("wide", s, {"v": np.arange(20.0) - 10 + s})
        if s % 10 == 0:
            w.append("hessian", s, {"eigenvalues": [s + 3.0, 2.0, 1.0], "n_matvec": 8})
            w.append("spectral_alignment", s, {"minority": [0.4, 0.1]})
    for f in findings:
        w.add_finding(f)
    return w


WARN = Finding(12, "loss_spike", "warning", "loss/value", 4.0, 3.0, "loss <jumped>", "lower lr")
ERR = Finding(20, "edge_of_stability", "error", "hessian/eigenvalues", 23.0, 20.0, "past 2/eta")
INFO = Finding(30, "rank_collapse", "info", "representation/erank", 2.0, 3.0, "rank fell")


# --------------------------------------------------------------------------- timelines


def _labels(ax):
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_timeline_has_one_subplot_per_numeric_field_and_one_line_per_component():
    run = _writer().run()
    fig = timeline(run, "hessian", findings=[])
    assert [ax.get_ylabel() for ax in fig.axes] == ["eigenvalues", "n_matvec"]
    assert _labels(fig.axes[0]) == ["eigenvalues[0]", "eigenvalues[1]", "eigenvalues[2]"]
    x, y = fig.axes[0].get_lines()[0].get_data()
    np.testing.assert_array_equal(x, [0, 10, 20, 30])
    np.testing.assert_array_equal(y, [3, 13, 23, 33])
    # string fields are not plotted; per-layer components are named after the layers
    assert [ax.get_ylabel() for ax in timeline(run, "loss").axes] == ["value"]
    labels = _labels(timeline(run, "spectral_alignment").axes[0])
    assert labels == ["minority[fc1]", "minority[fc2]"]


def test_context_fields_are_left_out_of_the_default_timeline():
    """A field the run records as context (the monitor's ``loss/samples``: how many samples
    the batch held) is stored and readable, but the default timeline draws only the
    measurements; asked for by name it is drawn."""
    w = RunWriter.memory()
    w.declare("loss", {"value": None, "samples": None}, context=("samples",))
    w.declare("only", {"n": None}, context=("n",))  # nothing but context: drawn after all
    for s in range(5):
        w.append("loss", s, {"value": 1.0 / (s + 1), "samples": 8.0})
        w.append("only", s, {"n": 8.0})
    run = w.run()
    assert run.metric_attrs("loss")["context"] == ["samples"]
    assert [ax.get_ylabel() for ax in timeline(run, "loss").axes] == ["value"]
    both = timeline(run, "loss", fields=["value", "samples"])
    assert [ax.get_ylabel() for ax in both.axes] == ["value", "samples"]
    assert [ax.get_ylabel() for ax in timeline(run, "only").axes] == ["n"]
    assert _writer().run().metric_attrs("loss")["context"] == []  # none recorded
    with pytest.raises(ValueError, match="context"):
        RunWriter.memory().declare("m", {"value": None}, context=("missing",))


def test_the_default_monitors_loss_timeline_is_the_loss_alone():
    import torch
    import torch.nn.functional as F

    import landscape as ls
    from tests import models

    model = models.mlp()
    x, y = models.classification_data(16)
    with ls.Monitor(model, F.cross_entropy, warn=False) as mon:
        for s in range(3):
            mon.step(s, batch=(x, y), loss=torch.tensor(1.0))
        run = mon.run()
        assert list(run.series("loss", "samples")[1]) == [16.0] * 3
        assert [ax.get_ylabel() for ax in timeline(run, "loss").axes] == ["value"]
        # the default probe's one-row note is no timeline (plot and report drew "probe: 1
        # rows"), though it can be asked for by name
        assert run.steps("probe").tolist() == [0]
        assert "probe" not in metrics_with_rows(run) and "probe" not in timelines(run)
        assert "probe" in timelines(run, ["probe"])
        assert 'id="timeline-probe"' not in render_report(run)


def test_wide_vector_fields_become_a_median_and_a_band():
    fig = timeline(_writer().run(), "wide", findings=[], max_lines=12)
    ax = fig.axes[0]
    assert _labels(ax) == ["v median"]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), np.arange(40) - 0.5)
    assert any(isinstance(c, PolyCollection) for c in ax.collections)
    assert len(timeline(_writer().run(), "wide", max_lines=20).axes[0].get_lines()) == 20


def _finding_lines(ax) -> dict[int, tuple]:
    """step -> (colour, line style) of the vertical finding lines (one LineCollection per
    severity and kind)."""
    out = {}
    for c in ax.collections:
        if isinstance(c, LineCollection):
            for seg in c.get_segments():
                out[int(seg[0][0])] = (c.get_colors()[0], c.get_linestyle()[0])
    return out


def test_findings_are_vertical_lines_coloured_by_severity():
    run = _writer((WARN, ERR, INFO)).run()
    ax = timeline(run, "loss").axes[0]
    vlines = _finding_lines(ax)
    assert sorted(vlines) == [12, 20, 30]
    for f in (WARN, ERR, INFO):
        assert mcolors.same_color(vlines[f.step][0][:3], SEVERITY_COLORS[f.severity])
    assert vlines[12][1][1] is None  # raised on loss itself: solid (no dash pattern)
    assert vlines[20][1][1] is not None  # on another metric: dashed
    assert not _finding_lines(timeline(run, "loss", findings=[]).axes[0])
    # a finding of another metric far beyond this metric's steps is left out
    far = Finding(5000, "rank_collapse", "info", "representation/erank", 2.0, 3.0, "later")
    assert not _finding_lines(timeline(run, "loss", findings=[far]).axes[0])
    own_far = Finding(5000, "loss_spike", "warning", "loss/value", 2.0, 3.0, "later")
    assert list(_finding_lines(timeline(run, "loss", findings=[own_far]).axes[0])) == [5000]


def test_finding_lines_leave_the_y_axis_to_the_data():
    """vlines(transform=...) counted its 0..1 as data on matplotlib < 3.8: a series at
    1000-1019 got y limits from -51."""
    w = RunWriter.memory()
    w.declare("loss", {"value": None})
    for s in range(20):
        w.append("loss", s, {"value": 1000.0 + s})
    ax = timeline(w.run(), "loss", findings=[WARN]).axes[0]
    assert ax.get_ylim()[0] > 990


def test_many_findings_are_drawn_as_a_few_collections():
    """A line artist per finding per axes: a run with 10k findings took minutes and GBs."""
    run = _writer().run()
    many = [Finding(s, "r", "warning", "loss/value", 1.0, 0.5, "m") for s in range(0, 40)]
    many += [Finding(s, "q", "info", "loss/value", 1.0, 0.5, "m") for s in range(0, 40, 2)]
    ax = timeline(run, "loss", findings=many).axes[0]
    assert sum(isinstance(c, LineCollection) for c in ax.collections) == 2
    assert len(_finding_lines(ax)) == 40


def test_log_scale_and_non_finite_marks():
    run = _writer().run()
    assert timeline(run, "hessian", log=True).axes[0].get_yscale() == "log"
    assert timeline(run, "wide", log=True).axes[0].get_yscale() == "symlog"  # values cross 0
    ax = timeline(run, "loss", findings=[]).axes[0]
    marks = [line for line in ax.get_lines() if line.get_marker() == "|"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [25]


def test_timeline_arguments_are_checked(tmp_path):
    run = _writer().run()
    with pytest.raises(ValueError, match=r"fields: .*'nope'"):
        timeline(run, "loss", fields=["nope"])
    with pytest.raises(ValueError, match="max_lines"):
        timeline(run, "loss", max_lines=0)
    with pytest.raises(ValueError, match="metrics: no metric 'nope'"):
        timelines(run, ["loss", "nope"])
    with pytest.raises(KeyError, match="no metric 'nope'"):
        timeline(run, "nope")
    assert sorted(timelines(run)) == ["hessian", "loss", "spectral_alignment", "wide"]
    fig = timeline(run, "loss")
    with pytest.raises(ValueError, match="path: cannot tell the image format"):
        save_figure(fig, tmp_path / "x.txt")
    assert save_figure(fig, tmp_path / "x.png").read_bytes().startswith(PNG)
    assert figure_png(fig).startswith(PNG)


def test_an_empty_metric_plots_a_placeholder():
    w = RunWriter.memory()
    w.declare("later", {"x": None})
    fig = timeline(w.run(), "later")
    assert "no rows yet" in [t.get_text() for t in fig.axes[0].texts]


def _visible_points(ax):
    """(x, y) of every point a line of ``ax`` makes visible: a marker, or a segment's end."""
    points = []
    for line in ax.get_lines():
        if line.get_marker() == "|":  # the non-finite ticks
            continue
        x, y = (np.asarray(a, dtype=float) for a in line.get_data())
        finite = np.isfinite(y)
        if line.get_marker() not in (None, "None", "", " ") and line.get_markersize() > 0:
            points += [(a, b) for a, b, f in zip(x, y, finite) if f]
        elif line.get_linestyle() not in ("None", "none", "", " "):
            both = finite[:-1] & finite[1:]  # a segment needs two finite neighbours
            points += [(x[i + k], y[i + k]) for i in np.flatnonzero(both) for k in (0, 1)]
    return set(points)


def test_a_single_row_and_isolated_points_are_visible():
    w = RunWriter.memory()
    w.declare("collapse", {"nc1": None, "per_class": (2,)})
    w.append("collapse", 119, {"nc1": 0.5, "per_class": [0.1, 0.2]})
    fig = timeline(w.run(), "collapse", findings=[])
    assert _visible_points(fig.axes[0]) == {(119.0, 0.5)}
    assert _visible_points(fig.axes[1]) == {(119.0, 0.1), (119.0, 0.2)}
    # a long series: finite points between NaNs get markers, the connected ones a line
    n = FEW_POINTS + 20
    values = np.full(n, np.nan)
    values[:10] = 1.0
    values[[20, 30]] = [2.0, 3.0]
    w.declare("gappy", {"v": None})
    for s, v in enumerate(values):
        w.append("gappy", s, {"v": v})
    ax = timeline(w.run(), "gappy", findings=[]).axes[0]
    seen = _visible_points(ax)
    assert {(20.0, 2.0), (30.0, 3.0)} <= seen and (0.0, 1.0) in seen
    assert _labels(ax) == ["v"]  # the isolated points add no legend entry


def test_nan_on_every_row_is_not_measured_and_only_real_blow_ups_are_ticked():
    w = RunWriter.memory()
    w.declare("sentinels", {"attention_logit_max": None, "act": None, "layers": (2,),
                            "every_10th": None, "loss": None})
    for s in range(30):
        w.append("sentinels", s, {
            "attention_logit_max": np.nan,  # no attention in this network
            "act": np.inf if s == 7 else (np.nan if s == 9 else 1.0 + s),
            "layers": [np.nan, 1.0],  # one layer never measured
            "every_10th": 1.0 if s % 10 == 0 else np.nan,  # measured every 10th row
            "loss": 1.0 if s < 25 else np.nan,  # a blow-up stays NaN
        })
    fig = timeline(w.run(), "sentinels", findings=[])
    att, act, layers, sparse, loss = fig.axes

    def ticks(ax):
        return [list(line.get_xdata()) for line in ax.get_lines() if line.get_marker() == "|"]

    assert ticks(att) == [] and not _visible_points(att)
    assert any(t.get_text() == "NaN on every row" for t in att.texts)
    assert ticks(act) == [[7, 9]]  # inf, and a NaN where every row has a value
    assert ticks(layers) == []  # the all-NaN component is not a blow-up
    assert ticks(sparse) == []  # NaN between every 10th row: nothing due there
    assert ticks(loss) == [[25, 26, 27, 28, 29]]
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert legend == ["non-finite"]
    # every value NaN everywhere: no "non-finite" legend at all
    only = RunWriter.memory()
    only.declare("sentinels", {"attention_logit_max": None})
    for s in range(5):
        only.append("sentinels", s, {"attention_logit_max": np.nan})
    assert not timeline(only.run(), "sentinels", findings=[]).legends


def test_metrics_without_rows_are_left_out_of_timelines_and_the_report():
    w = _writer()
    w.declare("adaptive", {"scale": None})  # a monitor declares it up front
    run = w.run()
    assert metrics_with_rows(run) == [m for m in run.metrics() if m != "adaptive"]
    assert "adaptive" in run.metrics()
    assert "adaptive" not in timelines(run)
    assert "adaptive" in timelines(run, ["adaptive", "loss"])  # asked for by name: drawn
    html = render_report(run)
    assert len(_images(html)) == 4 and 'id="timeline-adaptive"' not in html
    assert '<p id="no-rows">No rows yet: adaptive.</p>' in html
    # a table of strings only (the monitor's unmeasured steps) has rows but no timeline
    w.declare("unmeasured", {"metrics": "S16"})
    w.append("unmeasured", 0, {"metrics": "loss"})
    run = w.run()
    assert "unmeasured" not in metrics_with_rows(run)
    assert '<p id="no-rows">No rows yet: adaptive.</p>' in render_report(run)  # not listed


def test_report_path_reads_a_trailing_separator_or_a_directory_as_report_html(tmp_path):
    assert report_path(tmp_path) == tmp_path / "report.html"
    assert report_path(f"{tmp_path / 'new'}{os.sep}") == tmp_path / "new" / "report.html"
    assert report_path(tmp_path / "r.html") == tmp_path / "r.html"
    assert report_path(tmp_path / "new") == tmp_path / "new"  # not a directory: the file


# --------------------------------------------------------------------------- findings


def test_collect_findings_adds_recomputed_ones_once_per_step_rule_and_metric():
    online = Finding(25, "nonfinite", "error", "loss/value", float("nan"), 1.0, "seen online")
    run = _writer((WARN, online)).run()
    stored = collect_findings(run, recompute=False)
    assert [f.message for f in stored] == [WARN.message, online.message]
    found = collect_findings(run)
    keys = [(f.step, f.rule) for f in found]
    assert len(keys) == len(set(keys)) and (25, "nonfinite") in keys
    assert [f.message for f in found if (f.step, f.rule) == (25, "nonfinite")] == ["seen online"]
    assert [f.step for f in found] == sorted(f.step for f in found)
    # one rule firing on two sources at one step is two findings
    flag = Finding(25, "nonfinite", "error", "nonfinite/loss", 1.0, 1.0, "flagged")
    found = collect_findings(_writer((online, flag)).run(), recompute=False)
    assert [f.message for f in found] == ["seen online", "flagged"]


def test_a_finding_whose_field_was_renamed_since_the_file_was_written_is_one():
    # taylor_forecast's update-ratio findings named sentinels/r_secant before; a file written
    # then holds that one and the recomputation gives sentinels/update_ratio: one finding,
    # the stored one (the same table, another field). Here: nonfinite on the loss at step 25,
    # stored under another field of the loss table.
    old = Finding(25, "nonfinite", "error", "loss/phase", float("nan"), 1.0, "stored")
    found = [f for f in collect_findings(_writer((old,)).run()) if f.rule == "nonfinite"]
    assert [(f.step, f.metric, f.message) for f in found] == [(25, "loss/phase", "stored")]


def test_a_rule_of_the_users_replaces_the_stored_findings_of_its_name():
    # a rule given to collect_findings that is no built-in one as it is (a rule of the
    # user's, or a built-in with other settings) is the one to trust: its recomputed
    # findings replace what the file holds under its name (one finding, the recomputed)
    from landscape.alarms import Rule, Trigger

    class Rising(Rule):
        name = "rising"
        metrics = ("hessian",)

        def evaluate(self, metric, row):  # fires at step 20 alone (eigenvalue 23)
            top = float(row["eigenvalues"][0])
            fired = Trigger("warning", "n_matvec", 8.0, 1.0, "recomputed", "")
            return fired if top == 23 else None

    old = Finding(20, "rising", "warning", "hessian/eigenvalues", 23.0, 1.0, "stored")
    run = _writer((old,)).run()
    found = [f for f in collect_findings(run, rules=[Rising()]) if f.rule == "rising"]
    assert [(f.step, f.metric, f.message) for f in found] == [
        (20, "hessian/n_matvec", "recomputed")]
    found = [f for f in collect_findings(run) if f.rule == "rising"]  # not re-evaluated
    assert [f.message for f in found] == ["stored"]


# --------------------------------------------------------------------------- report


def _images(html):
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def test_report_embeds_every_plot_the_findings_and_the_config():
    html = render_report(_writer((WARN, ERR)).run(), title="T & <t>")
    assert html.startswith("<!DOCTYPE html>")
    assert "<title>T &amp; &lt;t&gt;</title>" in html
    images = _images(html)
    assert len(images) == 4 == html.count("<img ")
    for png in images:
        assert png.startswith(PNG)
        assert mpimg.imread(io.BytesIO(png), format="png").shape[0] > 100
    rows = re.findall(r'<tr class="sev-(\w+)"><td class=num>(\d+)</td><td>([^<]+)</td>', html)
    assert ("warning", "12", "loss_spike") in rows and ("error", "20", "edge_of_stability") in rows
    assert "loss &lt;jumped&gt;" in html and "lower lr" in html
    assert '&quot;model&quot;: &quot;&lt;mlp&gt; &amp; co&quot;' in html
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing external
    assert "<script" not in html
    # each table scrolls sideways in a focusable box named after it, not the whole page
    boxes = re.findall(r'<div class="wide" role="region" tabindex="0" aria-label="([^"]+)">'
                       r"<table", html)
    assert len(boxes) == html.count("<table") and "table" not in boxes
    assert boxes[0] == "Findings by rule"
    # the images' text says what each plots and the first finding marked on it
    alts = dict(re.findall(r'<figure id="timeline-(\w+)"><img alt="([^"]*)"', html))
    assert alts["loss"] == ("timeline of loss (value), steps 0 to 39; 2 findings on it, the "
                            "first error at step 25: nonfinite; 1 on other metrics, dashed")
    assert alts["wide"] == ("timeline of wide (v), steps 0 to 39; no finding on it; 3 on "
                            "other metrics, dashed")


def test_a_long_findings_table_is_folded_so_the_timelines_follow_it():
    """A run with hundreds of findings listed every one of them before its first timeline."""
    from landscape.report import FINDINGS_UNFOLDED

    short = render_report(_writer((WARN, ERR)).run(), findings=[WARN, ERR])
    assert "<details" not in short and '<table id="findings">' in short
    many = [Finding(s, "loss_spike", "warning", "loss/value", 4.0, 3.0, "m", "h")
            for s in range(FINDINGS_UNFOLDED + 1)]
    html = render_report(_writer().run(), findings=many)
    folded = re.search(r'<details id="all-findings"><summary>All 51 findings, in step order'
                       r".*?</summary>(.*?)</details>", html, re.S)
    assert folded and folded.group(1).count('<tr class="sev-warning">') == 51
    assert html.index("</details>") < html.index('<figure id="timeline-')
    assert ">51</td>" in html.split('id="findings-by-rule"')[1]  # counted at a glance


def _fake_surfaces(monkeypatch, fail=False):
    def draw(surface, field="loss", **_):
        if fail:
            raise RuntimeError("broken plot")
        fig = Figure(figsize=(2, 2))
        fig.add_subplot().plot(surface.x, surface.x)
        return fig

    module = types.ModuleType("landscape.plotting.surfaces")
    module.curve = module.contour = module.surface3d = draw
    monkeypatch.setattr("landscape.report._surface_plots", module)


def _with_surfaces():
    w = _writer()
    w.create_surface("line", np.linspace(-1, 1, 5))
    w.create_surface("plane", np.linspace(-1, 1, 4), np.linspace(-1, 1, 3))
    for i in range(5):
        w.write_surface("line", i, {"loss": float(i)})
    return w.run()


def test_report_embeds_surface_plots_when_available(monkeypatch):
    _fake_surfaces(monkeypatch)
    html = render_report(_with_surfaces())
    assert len(_images(html)) == 6
    assert "line: curve of loss, 5 of 5 points computed" in html
    assert "plane: contour map of loss, 0 of 12 points computed" in html


def test_report_with_the_real_surface_plots():
    w = add_line_and_plane(_writer())
    html = render_report(w.run())
    assert "could not be plotted" not in html and "not available" not in html
    images = _images(html)
    assert len(images) == 6 and all(png.startswith(PNG) for png in images)


def test_report_copes_with_a_broken_surface_plot(monkeypatch):
    _fake_surfaces(monkeypatch, fail=True)
    html = render_report(_with_surfaces())
    assert len(_images(html)) == 4 and "could not be plotted (broken plot)" in html


def test_write_report_refuses_a_directory(tmp_path):
    from landscape import LandscapeError

    with pytest.raises(LandscapeError, match="is a directory"):
        write_report(_writer().run(), tmp_path)


def test_the_report_of_a_run_files_path_is_the_report_of_its_run_and_leaves_it_closed(
        tmp_path):
    """``write_report("run.h5", ...)`` failed with "'str' object has no attribute 'summary'"
    where the timelines took a path."""
    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.declare("loss", {"value": None})
        for s in range(5):
            w.append("loss", s, {"value": 1.0 / (s + 1)})
    out = write_report(str(path), tmp_path / "r.html", title="t")
    with Run.open(path) as run:
        from_run = render_report(run, title="t")
    assert _images(out.read_text()) == _images(from_run)
    assert len(_images(from_run)) == 1
    with RunWriter(path) as w:  # the path's reader was closed: the file can be written
        w.append("loss", 5, {"value": 0.1})
    with RunWriter(path) as w:  # a writer (a Monitor likewise) gives its run
        w.append("loss", 6, {"value": 0.1})
        assert len(_images(render_report(w, title="t"))) == 1
    import torch
    import torch.nn.functional as F

    import landscape as ls

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with ls.Monitor(model, F.cross_entropy, None, optimizer=opt, metrics=["loss"]) as mon:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        mon.step(0, batch=(x, y), loss=loss)
        assert collect_findings(mon) == [] and ls.alarms.check(mon) == []
        assert len(_images(render_report(mon))) == 1
    with pytest.raises(TypeError, match="expected a Run, a run file's path, a Monitor"):
        render_report(3)


# --------------------------------------------------------------------------- browser


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is required for this test: run `make test` (installs it) "
                "or `apt-get install chromium`")


_PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({
    title: document.title,
    h1: document.querySelector("h1").textContent,
    images: imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
    findings: Array.from(document.querySelectorAll("#findings tbody tr"))
      .map(r => Array.from(r.cells).slice(0, 3).map(c => c.textContent)),
    resources: performance.getEntriesByType("resource").length,
    width: [document.documentElement.scrollWidth, window.innerWidth],
  });
  document.body.appendChild(probe);
});
</script>"""


def _run_chromium(args, tmp_path):
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--no-first-run", "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}", *args,
    ]
    env = {**os.environ, "HOME": str(tmp_path)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


def test_report_renders_in_headless_chromium(tmp_path):
    run = _writer((WARN, ERR, INFO)).run()
    report = write_report(run, tmp_path / "report.html", title="Browser check")

    # 1. the DOM after load: title, findings table, every image decoded (test-only copy)
    probe_copy = tmp_path / "probe.html"
    probe_copy.write_text(report.read_text().replace("</body>", _PROBE + "</body>"))
    dom = _run_chromium(
        ["--virtual-time-budget=10000", "--dump-dom", probe_copy.as_uri()], tmp_path
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert match, dom.stdout[-2000:]
    probe = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert probe["title"] == probe["h1"] == "Browser check"
    expected = [[str(f.step), f.rule, f.severity] for f in collect_findings(run)]
    assert probe["findings"] == expected
    for stored in (["12", "loss_spike", "warning"], ["20", "edge_of_stability", "error"],
                   ["30", "rank_collapse", "info"]):
        assert stored in expected
    assert len(expected) > 3  # and what the alarm rules recompute (the NaN loss at step 25)
    assert len(probe["images"]) == 4
    for complete, width, height in probe["images"]:
        assert complete and width > 300 and height > 100
    assert probe["resources"] == 0  # nothing fetched: the file is self-contained
    # on a narrow screen the wide tables scroll in their own box, the page does not (a
    # findings table 902 px wide made a 500 px phone page scroll sideways)
    narrow = _run_chromium(["--virtual-time-budget=10000", "--window-size=500,1000",
                            "--dump-dom", probe_copy.as_uri()], tmp_path)
    match = re.search(r'<pre id="probe">(.*?)</pre>', narrow.stdout, re.S)
    assert match, narrow.stdout[-2000:]
    page, viewport = json.loads(match.group(1).replace("&quot;", '"')
                                .replace("&amp;", "&"))["width"]
    assert page <= viewport, (page, viewport)

    # 2. a screenshot of the untouched report: the page painted text, plots and the table
    shot = tmp_path / "report.png"
    result = _run_chromium(
        [f"--screenshot={shot}", "--window-size=1200,1600", report.as_uri()], tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    pixels = (mpimg.imread(shot)[..., :3] * 255).round().astype(int)
    assert pixels.shape == (1600, 1200, 3)
    colours = {tuple(c) for c in pixels.reshape(-1, 3)[::7]}
    assert len(colours) > 50, "a blank or single-colour page"
    error_cell = np.all(pixels == (0xFB, 0xD5, 0xD5), axis=-1)  # tr.sev-error td.sev
    assert error_cell.sum() > 500, "the error rows of the findings table are not painted"
    if os.environ.get("LANDSCAPE_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["LANDSCAPE_KEEP_SCREENSHOT"])


def test_surface_plots_available_is_deprecated_and_true():
    from landscape.report import surface_plots_available

    with pytest.warns(DeprecationWarning, match="always installed"):
        assert surface_plots_available() is True


# --------------------------------------------------------------------------- at a glance


def _section(html, section_id):
    return re.search(rf'<section id="{section_id}">(.*?)</section>', html, re.S).group(1)


def _table(html, table_id):
    body = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', html, re.S).group(1)
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr.*?</tr>", body)]


def test_the_report_opens_with_the_first_warning_and_what_to_do():
    late_warn = Finding(33, "grad_norm_spike", "warning", "grad_norm/value", 9.0, 3.0, "big")
    html = render_report(_writer().run(), findings=[WARN, ERR, INFO, late_warn])
    glance = _section(html, "overview")
    assert html.index('id="overview"') < html.index('id="summary"')
    verdict = re.search(r'<p id="verdict">(.*?)</p>', glance, re.S).group(1)
    first, error = verdict.split("<br>")
    assert "First warning</span> at step 12: <b>loss_spike</b> on loss/value" in first
    assert "loss &lt;jumped&gt;. What to do: lower lr" in first
    assert "First error</span> at step 20: <b>edge_of_stability</b>" in error
    rows = _table(glance, "findings-by-rule")
    assert [r[:5] for r in rows] == [
        ["edge_of_stability", "error", "1", "20", "20"],
        ["loss_spike", "warning", "1", "12", "12"],
        ["grad_norm_spike", "warning", "1", "33", "33"],
        ["rank_collapse", "info", "1", "30", "30"],
    ]


def test_the_verdict_of_a_quiet_run_and_of_one_with_info_only():
    assert '<p id="verdict">No rule fired on this run.</p>' in render_report(
        _writer().run(), findings=[])
    only_info = render_report(_writer((INFO,)).run(), findings=[INFO, INFO])
    assert "No warning or error; 2 info findings (context, not alarms)." in only_info
    assert "First" not in _section(only_info, "overview")


def test_the_values_table_gives_each_scalar_fields_last_value_range_and_non_finite_rows():
    w = _writer()
    w.declare("gappy", {"a": None, "b": None, "samples": None}, context=("samples",))
    for s in range(6):
        w.append("gappy", s, {"a": [1.0, 5.0, np.inf, -2.0, 3.0, np.nan][s],
                              "b": np.nan, "samples": 8.0})
    rows = {(r[0], r[1]): r[2:] for r in _table(render_report(w.run(), findings=[]), "values")}
    # loss: 1/(s+1), NaN at step 25 (due: counted); the last finite value is at step 39
    assert rows[("loss", "value")] == ["0.025", "39", "0.025", "1", "1"]
    # a: the inf and the trailing NaN (due every row) are non-finite; min/max of the finite
    assert rows[("gappy", "a")] == ["3", "4", "-2", "5", "2"]
    assert ("gappy", "b") not in rows  # never measured: nothing to say
    assert ("gappy", "samples") not in rows  # a context field
    assert ("hessian", "eigenvalues") not in rows and ("wide", "v") not in rows  # vectors
    assert ("hessian", "n_matvec") in rows


def test_a_one_row_run_reads_as_one_row_of_a_whole_step():
    # the axis was ticked 6.56, 6.64, ... around step 7, the caption said "1 rows", and the
    # configuration showed "\u00e9dge" for "édge" (CLI audit)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    w = RunWriter.memory(config={"name": "édge"})
    w.declare("loss", {"value": None})
    w.append("loss", 7, {"value": 1.0})
    run = w.run()
    fig = timelines(run, ["loss"])["loss"]
    FigureCanvasAgg(fig).draw()
    ticks = [t.get_text() for t in fig.axes[-1].get_xticklabels()]
    assert ticks and all(re.fullmatch(r"−?\d+", t) for t in ticks), ticks
    html = render_report(run)
    assert "loss: 1 row;" in html
    assert "édge" in html and "\\u00e9" not in html


def test_names_that_are_not_utf8_are_escaped_in_the_report(tmp_path):
    # a checkpoint named with the byte 0xff (stored by analyze as a lone surrogate) made
    # report fail once the configuration was written unescaped; so did a run file's name in
    # the title (review)
    w = RunWriter.memory(config={"analysis": {"checkpoints": ["ckpt-\udcff-10.pt"]}})
    w.declare("loss", {"value": None})
    w.append("loss", 0, {"value": 1.0})
    out = write_report(w.run(), tmp_path / "r.html", title="run-\udce9")
    html = out.read_text(encoding="utf-8")
    assert "ckpt-\\udcff-10.pt" in html and "run-\\udce9" in html


def test_a_field_without_a_finite_value_is_still_said():
    # a loss of inf and NaN from its first row: the values table left it out and the
    # timeline drew an empty axis without a word (CLI audit)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    w = RunWriter.memory()
    w.declare("loss", {"value": None})
    for step in range(6):
        w.append("loss", step, {"value": np.inf if step % 2 else np.nan})
    run = w.run()
    fig = timelines(run, ["loss"])["loss"]
    FigureCanvasAgg(fig).draw()
    assert "no finite value (±inf or NaN)" in [t.get_text() for t in fig.axes[0].texts]
    html = render_report(run)
    row = re.search(r"<tr><td>loss</td><td>value</td>(.*?)</tr>", html)
    # every row: the NaN losses too, a loss is due at every step (3 counted the inf alone)
    assert row is not None and row.group(1).endswith("<td class=num>6</td>"), html[-2000:]


def test_the_values_table_counts_the_fields_of_a_run_non_finite_from_its_start():
    """A run whose loss was NaN from step 0 lost its loss and gradient-norm rows from the
    table (never finite read as never measured), and one +inf then NaN counted 1 of 30
    (report review). A never-finite field of a run whose loss is finite stays out."""
    for first in (np.nan, np.inf):
        w = RunWriter.memory()
        w.declare("loss", {"value": None})
        w.declare("grad_norm", {"value": None})
        w.declare("probe", {"attention": None})
        for s in range(30):
            w.append("loss", s, {"value": first if s == 0 else np.nan})
            w.append("grad_norm", s, {"value": np.nan})
            w.append("probe", s, {"attention": np.nan})
        rows = {(r[0], r[1]): r[2:] for r in _table(render_report(w.run(), findings=[]),
                                                   "values")}
        assert rows[("loss", "value")][-1] == "30" and rows[("grad_norm", "value")][-1] == "30"
    w = RunWriter.memory()
    w.declare("loss", {"value": None})
    w.declare("probe", {"attention": None})
    for s in range(5):
        w.append("loss", s, {"value": 1.0})
        w.append("probe", s, {"attention": np.nan})  # a field that does not apply here
    rows = {(r[0], r[1]) for r in _table(render_report(w.run(), findings=[]), "values")}
    assert ("probe", "attention") not in rows


def test_a_run_that_recorded_nothing_is_not_said_to_have_passed():
    """report said 'No rule fired on this run.' where check exits 2 (report review)."""
    w = RunWriter.memory()
    w.declare("loss", {"value": None})
    html = render_report(w.run(), findings=[])
    assert "Nothing recorded: this run holds no rows" in html
    assert "No rule fired" not in html


def test_the_sharpness_figure_draws_its_threshold_as_steps_and_keeps_lambda_readable():
    """The threshold panel drew a slope from 76 to 1.9 between two rows (the limit panel
    above drew the step), lambda_max of about 1 sat flat at 0 under a threshold of 76, and
    an all-NaN panel clipped the shared x axis to the end rows (report review)."""
    w = RunWriter.memory()
    w.declare("sharpness", {"lambda_max": None, "threshold": None, "eps_dominated": None})
    for s, (lam, thr) in zip((0, 85, 90, 95), ((0.8, 76.0), (0.8, 1.9), (0.6, 1.9), (0.9, 1.9))):
        w.append("sharpness", s, {"lambda_max": lam, "threshold": thr, "eps_dominated": np.nan})
    fig = timelines(w.run(), ["sharpness"])["sharpness"]
    top, threshold_ax, empty = fig.axes[:3]
    assert top.get_yscale() == "log"
    (line,) = [ln for ln in threshold_ax.get_lines() if ln.get_label() == "threshold"]
    assert line.get_drawstyle() == "steps-post"
    lo, hi = top.get_xlim()
    assert lo < -0.5 and hi > 95.5  # the margins of an axis with data, shared by all
    assert empty.get_xlim() == top.get_xlim()


@pytest.mark.parametrize("values", [(1e-20, 1e250), (-1.7e308, 1.0)])
def test_values_no_axis_can_show_give_a_figure_that_says_so(tmp_path, values):
    """report stopped with matplotlib's OverflowError (1e-20 to 1e250 on a log axis) or
    blamed the run file (-1.7e308: 'arange: cannot compute length'; store review)."""
    w = RunWriter.memory()
    w.declare("m", {"value": None})
    w.declare("loss", {"value": None})
    for s in range(20):
        w.append("m", s, {"value": values[s % 2]})
        w.append("loss", s, {"value": 1.0 / (s + 1)})
    run = w.run()
    html = render_report(run, findings=[])
    assert html.count("<img") >= 2  # the loss figure drawn beside the one that cannot be
    fig = timelines(run, ["m"])["m"]
    out = save_figure(fig, tmp_path / "m.png")
    assert out.exists()
    assert any("cannot be drawn" in t.get_text() for t in fig.texts)


def test_the_legend_says_what_the_faint_dashed_lines_are():
    """Findings on other metrics were drawn dashed and faint, explained only in the HTML
    caption, not in the figure (report review)."""
    w = _writer()
    own = Finding(20, "edge_of_stability", "error", "hessian/eigenvalues", 23.0, 20.0, "own")
    other = Finding(25, "loss_spike", "warning", "loss/value", 3.0, 2.0, "other")
    fig = timeline(w.run(), "hessian", findings=[own, other])
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert "finding on another metric" in legend and "finding: error" in legend
    alone = timeline(w.run(), "hessian", findings=[own])
    assert "finding on another metric" not in [t.get_text() for leg in alone.legends
                                                for t in leg.get_texts()]


def test_a_run_recorded_without_its_loss_has_no_non_finite_rows(tmp_path):
    """The rule for never-finite fields read the NaN loss rows of steps recorded without
    loss= as a diverged run, listing loss, nonfinite and attention rows (own-diff review)."""
    import torch

    from landscape import Monitor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Monitor(model, torch.nn.functional.cross_entropy, tmp_path / "r.h5",
                     optimizer=opt, metrics="cheap", probe=(x, y)) as mon:
            for s in range(6):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                mon.step(s, batch=(x, y))  # no loss=
            run = mon.run()
    rows = {(r[0], r[1]): r[2:] for r in _table(render_report(run, findings=[]), "values")}
    assert ("loss", "value") not in rows
    assert all(r[-1] == "" for r in rows.values()), rows


def test_unmeasured_rows_of_a_field_with_values_are_not_counted_non_finite():
    """A step recorded without its loss (NaN, listed in /metrics/unmeasured) counted as a
    non-finite loss row wherever the loss had finite rows too (second review)."""
    w = RunWriter.memory()
    w.declare("loss", {"value": None})
    w.declare("unmeasured", {"metrics": "S16"})
    for s in range(10):
        w.append("loss", s, {"value": np.nan if s == 5 else 1.0 / (s + 1)})
    w.append("unmeasured", 5, {"metrics": "loss"})
    rows = {(r[0], r[1]): r[2:] for r in _table(render_report(w.run(), findings=[]), "values")}
    assert rows[("loss", "value")][-1] == ""
