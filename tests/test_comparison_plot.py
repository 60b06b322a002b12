"""Several runs on one figure (landscape.plotting.compare): the lines drawn are each run's
rows, one colour per run, its first warning marked in that colour."""

from __future__ import annotations

import re

import matplotlib.colors as mcolors
import numpy as np
import pytest

from landscape.findings import Finding
from landscape.plotting.compare import comparison, comparisons, first_warning, run_labels
from landscape.store import Run, RunWriter

INFO = Finding(5, "logit_growth", "info", "logits/max_abs", 1.0, 1.0, "grew", "")
WARN = Finding(40, "loss_spike", "warning", "loss/value", 5.0, 3.0, "jumped", "lower lr")
ERR = Finding(70, "nonfinite", "error", "loss/value", 1.0, 1.0, "nan", "")


def _write(path, scale, steps=100, findings=(), layers=True):
    """loss scale * exp(-s/40) every step; a per-layer vector every 5 steps (3 layers)."""
    with RunWriter(path, mode="w") as w:
        w.declare("loss", {"value": None, "samples": None}, context=("samples",))
        if layers:
            w.declare("update", {"per_layer": (3,)})
        for s in range(steps):
            w.append("loss", s, {"value": scale * float(np.exp(-s / 40)), "samples": 8.0})
            if layers and s % 5 == 0:
                w.append("update", s, {"per_layer": [scale * s, 2.0 * scale * s, 0.5]})
        for f in findings:
            w.add_finding(f)
    return Run.open(path)


def _data_lines(ax):
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")
            and line.get_linestyle() == "-"]


def test_each_run_is_one_line_of_its_own_rows_in_its_own_colour(tmp_path):
    a = _write(tmp_path / "a.h5", 1.0, findings=(INFO, WARN, ERR))
    b = _write(tmp_path / "b.h5", 3.0, steps=60)
    fig = comparison([a, b], "loss")
    (ax,) = fig.axes
    assert ax.get_ylabel() == "value"  # samples is the rows' context: not drawn
    lines = _data_lines(ax)
    assert [line.get_label() for line in lines] == ["a", "b"]
    for line, run in zip(lines, (a, b)):
        steps, values = run.series("loss", "value")
        np.testing.assert_array_equal(line.get_xdata(), steps)
        np.testing.assert_allclose(line.get_ydata(), values)
    assert mcolors.to_hex(lines[0].get_color()) != mcolors.to_hex(lines[1].get_color())
    # a's first warning (step 40, not the info at 5): a dashed line in a's colour
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1
    assert list(dashed[0].get_xdata()) == [40, 40]
    assert mcolors.to_hex(dashed[0].get_color()) == mcolors.to_hex(lines[0].get_color())
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["a (100 rows)", "b (60 rows)", "a: first warning at 40 (loss_spike)"]
    assert fig._suptitle.get_text() == "loss"


def test_a_vector_field_is_each_runs_median_with_its_range(tmp_path):
    a = _write(tmp_path / "a.h5", 1.0)
    b = _write(tmp_path / "b.h5", 2.0)
    (ax,) = comparison([a, b], "update", findings=[[], []]).axes
    assert ax.get_ylabel() == "per_layer\n(median, min-max)"
    assert [line.get_label() for line in _data_lines(ax)] == ["a", "b"]
    for line, run in zip(_data_lines(ax), (a, b)):
        _, values = run.series("update", "per_layer")
        np.testing.assert_allclose(line.get_ydata(), np.median(values, axis=1))
    assert len(ax.collections) == 2  # one min-max band per run


def test_a_run_without_the_metric_is_left_out_and_a_metric_in_no_run_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = _write(tmp_path / "x" / "run.h5", 1.0)
    b = _write(tmp_path / "y" / "run.h5", 2.0, layers=False)
    fig = comparison([a, b], "update")
    assert [line.get_label() for line in _data_lines(fig.axes[0])] == ["x/run"]
    assert list(comparisons([a, b])) == ["loss", "update"]
    assert list(comparisons([b, a])) == ["loss", "update"]
    with pytest.raises(ValueError, match="no metric 'nope' in any of the runs"):
        comparison([a, b], "nope")
    with pytest.raises(ValueError, match="no metric 'nope' in any of the runs"):
        comparisons([a, b], ["loss", "nope"])
    with pytest.raises(ValueError, match="2 labels for 1 runs"):
        comparison([a], "loss", labels=["p", "q"])
    with pytest.raises(ValueError, match="at least one run"):
        comparison([], "loss")


def test_log_axis_when_the_runs_together_span_decades(tmp_path):
    a = _write(tmp_path / "a.h5", 1.0)
    b = _write(tmp_path / "b.h5", 1000.0)
    assert comparison([a, b], "loss").axes[0].get_yscale() == "log"
    assert comparison([a, b], "loss", log=False).axes[0].get_yscale() == "linear"
    assert comparison([a, a], "loss").axes[0].get_yscale() == "linear"  # e^-2.5 .. 1


def test_spectral_densities_are_compared_at_each_runs_last_row(tmp_path):
    runs = []
    for name, shift in (("p", 0.0), ("q", 5.0)):
        with RunWriter(tmp_path / f"{name}.h5", mode="w") as w:
            w.declare("spectral_density", {"nodes": (4,), "weights": (4,)})
            for s in (0, 10):
                w.append("spectral_density", s, {"nodes": [shift + s + d for d in (0, .1, .2, .3)],
                                                  "weights": [0.25] * 4})
        runs.append(Run.open(tmp_path / f"{name}.h5"))
    (ax,) = comparison(runs, "spectral_density").axes
    assert [line.get_label() for line in ax.get_lines()] == ["p (step 10)", "q (step 10)"]
    # each density peaks at its last row's nodes (10.0-10.3 and 15.0-15.3)
    peaks = [line.get_xdata()[np.argmax(line.get_ydata())] for line in ax.get_lines()]
    assert 10 <= peaks[0] <= 10.3 and 15 <= peaks[1] <= 15.3


def test_run_labels_are_the_shortest_distinct_path_ends():
    assert run_labels(["/r/a.h5", "/r/b.h5"]) == ["a", "b"]
    assert run_labels(["/r/x/run.h5", "/r/y/run.h5"]) == ["x/run", "y/run"]
    assert run_labels(["/p/x/run.h5", "/q/x/run.h5", "/c/run.h5"]) == [
        "p/x/run", "q/x/run", "/c/run"]
    assert run_labels(["run.h5", "run.h5"]) == ["run.h5", "run.h5"]  # the same file twice
    assert run_labels(["x/run.h5", "x/run.pt"]) == ["x/run.h5", "x/run.pt"]  # by suffix


def test_first_warning_is_the_earliest_warning_or_error():
    assert first_warning([ERR, WARN, INFO]) is WARN
    assert first_warning([INFO]) is None
    assert first_warning([ERR]) is ERR


def test_a_run_without_the_metric_is_left_out_of_its_figure_and_renamed_metrics_meet(tmp_path):
    """b has no update rows but a warning: no line, no first-warning mark, not in the title;
    an older file's "hessian" and a newer one's "top_eigenvalues" are one figure, without
    the rename's deprecation warning."""
    import warnings

    a = _write(tmp_path / "a.h5", 1.0)
    b = _write(tmp_path / "b.h5", 2.0, layers=False, findings=(WARN,))
    fig = comparison([a, b], "update")
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["a"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a (20 rows)"]
    runs = []
    for name, metric in (("old", "hessian"), ("new", "top_eigenvalues")):
        with RunWriter(tmp_path / f"{name}.h5", mode="w") as w:
            w.declare(metric, {"eigenvalues": (2,)})
            for s in range(3):
                w.append(metric, s, {"eigenvalues": [2.0 + s, 1.0]})
        runs.append(Run.open(tmp_path / f"{name}.h5"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figures = comparisons(runs)
        assert list(figures) == ["top_eigenvalues"]
        assert len(_data_lines(figures["top_eigenvalues"].axes[0])) == 2
        assert list(comparisons(runs, ["hessian"])) == ["top_eigenvalues"]


def test_many_runs_keep_distinct_styles_and_a_blow_up_is_marked(tmp_path):
    """Past ten runs matplotlib's colours repeat: tab20, then line styles; a run whose loss
    went non-finite gets crosses along the bottom in its colour (it looked shorter)."""
    from landscape.plotting.compare import run_color

    styles = {run_color(i, 25) for i in range(25)}
    assert len(styles) == 25 and run_color(3, 5) == ("C3", "-")
    runs = []
    for i in range(12):
        with RunWriter(tmp_path / f"r{i}.h5", mode="w") as w:
            w.declare("loss", {"value": None})
            for s in range(10):
                w.append("loss", s, {"value": float("nan") if (i == 0 and s >= 7) else 1.0 + i})
        runs.append(Run.open(tmp_path / f"r{i}.h5"))
    (ax,) = comparison(runs, "loss").axes
    colors = [mcolors.to_hex(line.get_color()) for line in _data_lines(ax)]
    assert len(colors) == 12 and len(set(colors)) == 12
    crosses = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [7, 8, 9]


def test_a_runs_isolated_points_stay_markers_in_its_line_style(tmp_path):
    """The run's line style was set on the last line drawn, which is the isolated points'
    markers when there are any: they were joined by a line, and the run's own kept '-'."""
    from landscape.plotting.compare import _draw_run
    from landscape.plotting.timelines import new_figure

    ax = new_figure().add_subplot()
    y = np.r_[np.ones(30), np.nan, 2.0, np.nan, np.ones(30)]
    assert _draw_run(ax, np.arange(len(y)), y, "a", "C0", ":")
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    assert styles["a"] == ":" and styles["_a isolated"] == "None"


def test_runs_named_by_path_draw_the_same_lines_and_are_closed_after(tmp_path):
    """As the CLI takes them: a path failed with "'str' object has no attribute 'source'"."""
    from landscape.plotting import timeline

    for name, scale in (("a", 1.0), ("b", 3.0)):
        _write(tmp_path / f"{name}.h5", scale).close()
    paths = [tmp_path / "a.h5", str(tmp_path / "b.h5")]
    by_path = comparison(paths, "loss")
    with Run.open(paths[0]) as a, Run.open(paths[1]) as b:
        by_run = comparison([a, b], "loss")
        one = timeline(a, "loss")
    for got, want in zip(_data_lines(by_path.axes[0]), _data_lines(by_run.axes[0])):
        assert got.get_label() == want.get_label()
        np.testing.assert_array_equal(got.get_ydata(), want.get_ydata())
    np.testing.assert_array_equal(_data_lines(timeline(paths[0], "loss").axes[0])[0].get_ydata(),
                                  _data_lines(one.axes[0])[0].get_ydata())
    assert set(comparisons(paths)) == {"loss", "update"}
    # by keyword, under each function's own name for it
    assert len(timeline(run=paths[0], metric="loss").axes) == 1
    assert len(comparison(runs=paths, metric="loss").axes) == 1
    with RunWriter(paths[0], mode="a"):  # closed after each call: the file can be written
        pass


def test_a_resumed_runs_rhythms_starting_over_are_no_blow_up(tmp_path):
    """After a resume the secant is NaN on its first row and an every-3rd-call field's
    rhythm starts over: the timeline, the comparison and the report marked both as
    non-finite (a resumed Hugging Face run looked like it blew up at the resume)."""
    from landscape.plotting.timelines import nonfinite_rows, session_starts, timeline
    from landscape.report import write_report

    path = tmp_path / "run.h5"
    for first, last in ((0, 10), (10, 20)):
        with RunWriter(path, mode="w" if first == 0 else "a") as w:
            w.declare("sentinels", {"r_secant": None, "attention": None})
            for s in range(first, last):
                call = s - first
                w.append("sentinels", s, {"r_secant": float("nan") if call == 0 else 0.5,
                                          "attention": 1.0 if call % 3 == 0 else float("nan")})
    with Run.open(path) as run:
        steps, secant = run.series("sentinels", "r_secant")
        _, every3 = run.series("sentinels", "attention")
        starts = session_starts(steps, run.resumed_after())
        assert starts == [10]
        assert nonfinite_rows(secant).tolist().count(True) == 1  # the old reading: step 10
        assert not nonfinite_rows(secant, starts).any()
        assert not nonfinite_rows(every3, starts).any()
        broken = every3.copy()
        broken[13] = np.nan  # a value due in the second session that did not come: marked
        assert np.flatnonzero(nonfinite_rows(broken, starts)).tolist() == [13]
        blown = secant.copy()
        blown[10:] = np.nan  # a resumed session NaN from its first row: a blow-up, marked
        assert np.flatnonzero(nonfinite_rows(blown, starts)).tolist() == list(range(10, 20))
        fig = timeline(run, "sentinels")
        assert not [line for ax in fig.axes for line in ax.get_lines()
                    if line.get_marker() == "|"]
        (ax, _) = comparison([run], "sentinels").axes
        assert not [line for line in ax.get_lines() if line.get_marker() == "x"]
    with Run.open(path) as run:
        write_report(run, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    for field in ("r_secant", "attention"):  # the values table's non-finite column: empty
        row = re.search(rf"<td>{field}</td>(.*?)</tr>", html)
        assert row is not None and row.group(1).endswith("<td class=num></td>"), row


@pytest.mark.parametrize("name, runs", [("lr{i}", 12), ("lr{i}_sgd_momentum0.9_seed11", 12),
                                        ("standard_preset_sgd_momentum0.9_lr0.{i}_seed0_"
                                         "batch64_width64_warmup100_cosine_decay_to_zero_"
                                         "label_smoothing0.1_dropout0.2", 3)])
def test_the_legend_of_a_sweep_stays_inside_its_figure(tmp_path, name, runs):
    """Twelve runs with 30-character names: the legend's three columns ran off both sides
    of the figure and no line could be told from another (review). Columns now follow the
    entries' length, and an entry wider than the figure is shortened in its middle."""
    opened = [_write(tmp_path / f"{name.format(i=i)}.h5", 1.0 + i, steps=50, layers=False,
                     findings=(WARN,) if i % 2 else ()) for i in range(runs)]
    fig = comparison(opened, "loss")
    fig.canvas.draw()
    box = fig.legends[0].get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width, (box, fig.bbox)
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(texts) == runs + runs // 2
    short = [t for t in texts if "\u2026" in t]
    assert bool(short) == (runs == 3)  # only names wider than the figure are shortened
    assert all(t.endswith("rows)") or t.endswith("(loss_spike)") for t in texts)
