"""Surface plots: orientation of non-square grids, trajectory overlay, 3-D, VTK round trip."""

from __future__ import annotations

import io

import numpy as np
import pytest

from landscape.plotting import surfaces as plots
from landscape.store import RunWriter, SurfaceData


def _surface(nx=5, ny=3, f=lambda X, Y: X**2 + 0.0 * Y, name="s", acc=True, trajectory=None):
    x = np.linspace(-1.0, 2.0, nx)
    y = np.linspace(0.0, 0.5, ny)
    X, Y = np.meshgrid(x, y)
    values = {"loss": f(X, Y)}
    if acc:
        values["accuracy"] = 0.5 + 0.0 * X
    arrays = {} if trajectory is None else {"trajectory": np.asarray(trajectory)}
    return SurfaceData(name, x, y, values, np.ones((ny, nx), bool),
                       {"directions": {"kind": "random", "normalization": "filter"}}, arrays)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    return buf.getvalue()


def test_non_square_contours_put_x_on_the_horizontal_axis():
    surf = _surface(nx=7, ny=3, f=lambda X, Y: X + 0.0 * Y)  # depends on x only
    for filled in (False, True):
        fig = plots.contour(surf, filled=filled, levels=5)
        ax = fig.axes[0]
        assert ax.get_xlim() == (surf.x[0], surf.x[-1])
        assert ax.get_ylim() == (surf.y[0], surf.y[-1])
        if not filled:  # iso-lines of a function of x alone are vertical
            paths = [p for p in ax.collections[0].get_paths() if len(p.vertices)]
            assert paths
            for p in paths:
                assert np.ptp(p.vertices[:, 0]) < 1e-9
        assert _png(fig).startswith(b"\x89PNG")


def test_contour_overlays_the_stored_trajectory():
    path = np.array([[1.5, 0.4], [0.7, 0.2], [0.0, 0.0]])
    surf = _surface(trajectory=path)
    fig = plots.contourf(surf)
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "trajectory"]
    assert len(lines) == 1
    np.testing.assert_array_equal(lines[0].get_xdata(), path[:, 0])
    np.testing.assert_array_equal(lines[0].get_ydata(), path[:, 1])
    none = plots.contour(surf, trajectory=None)
    assert not [ln for ln in none.axes[0].get_lines() if ln.get_label() == "trajectory"]
    with pytest.raises(ValueError, match="trajectory"):
        plots.contour(surf, trajectory=np.zeros(3))


def test_partially_computed_surfaces_plot_with_gaps():
    surf = _surface(nx=6, ny=4)
    surf.done[2:, :] = False
    surf.values["loss"][2:, :] = np.nan
    for fig in (plots.contour(surf), plots.contourf(surf, log=True), plots.surface3d(surf)):
        assert _png(fig).startswith(b"\x89PNG")
        assert fig.axes[0].get_title().endswith("\n12 of 24 points computed")
    line = _surface(nx=6, ny=1)
    line = type(line)(line.name, line.x, None, {"loss": line.values["loss"][0]},
                      np.array([True] * 5 + [False]), line.attrs, {})
    assert plots.curve(line).axes[0].get_title() == "s: loss\n5 of 6 points computed"
    assert "computed" not in plots.contour(_surface()).axes[0].get_title()


def _exploded(n=21):
    """A bowl whose corner blows up by seven orders of magnitude, two points non-finite."""
    x = y = np.linspace(-1.0, 1.0, n)
    X, Y = np.meshgrid(x, y)
    bowl = 0.1 + 2 * X**2 + Y**2
    corner = (X > 0.6) & (Y > 0.5)
    z = np.where(corner, 1e7 * (1 + X + Y), bowl)
    z[-1, -1], z[-1, -2] = np.nan, np.inf
    done = np.ones_like(z, bool)
    done[:2, :3] = False
    surf = SurfaceData("s", x, y, {"loss": z}, done, {"directions": {"kind": "random"}})
    return surf, float(bowl[~corner].max())


def test_the_outlier_fence_clips_a_blown_up_corner_and_leaves_a_bowl_alone():
    surf, bowl_max = _exploded()
    z = surf.values["loss"]
    fence = plots.outlier_fence(np.where(surf.done, z, np.nan))
    assert bowl_max <= fence < 1e7
    x = np.linspace(-1, 1, 21)
    X, Y = np.meshgrid(x, x)
    bowls = (X**2 + Y**2, np.exp(2 * np.hypot(X, Y)), 1 - np.exp(-(X**2 + Y**2)),
             0.1 + np.abs(X) ** 8, np.hypot(X, Y) ** 10, np.exp(4 * X**2))
    for bowl in bowls:
        assert plots.outlier_fence(bowl) is None
    t = np.linspace(-1, 1, 41)
    assert plots.outlier_fence(0.1 + np.abs(t) ** 8) is None  # the 1-D case
    # an accuracy plane: chance around, a basin of 0.9 (above the fence, but in [0, 1])
    acc = np.where(X**2 + Y**2 < 0.2, 0.9, 0.1 + 0.02 * np.sin(7 * X))
    assert plots.outlier_fence(acc) is None
    assert plots.outlier_fence(np.array([1.0, 2.0, np.nan])) is None  # too few values
    assert plots.outlier_fence(np.r_[np.ones(20), 1e9]) is None  # no spread to measure


def _levels(fig):
    (contours,) = [c for c in fig.axes[0].get_children() if hasattr(c, "levels")]
    return np.asarray(contours.levels)


def test_a_blown_up_corner_no_longer_blanks_the_contour_map():
    surf, bowl_max = _exploded()
    for filled in (False, True):
        levels = _levels(plots.contour(surf, filled=filled))
        assert (levels < bowl_max).sum() >= 10  # the basin is drawn
        raw = _levels(plots.contour(surf, filled=filled, vmax=None))
        assert (raw < bowl_max).sum() <= 1  # to scale, one level or none below the rim
    title = plots.contour(surf).axes[0].get_title()
    assert title.startswith("s: loss\n") and "clipped at" in title
    assert "2 non-finite" in title and "435 of 441 points computed" in title
    assert "clipped" not in plots.contour(surf, vmax=None).axes[0].get_title()
    assert "clipped" not in plots.contour(_surface()).axes[0].get_title()


def test_non_finite_and_missing_points_are_marked_on_the_plane():
    surf, _ = _exploded()
    fig = plots.contourf(surf)
    marks = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    bad = marks["non-finite"]
    np.testing.assert_allclose(sorted(zip(bad.get_xdata(), bad.get_ydata())),
                               [(0.9, 1.0), (1.0, 1.0)])
    pending = marks["not computed"]
    assert len(pending.get_xdata()) == 6
    np.testing.assert_allclose(sorted(set(pending.get_ydata())), [-1.0, -0.9])
    assert {t.get_text() for t in fig.legends[0].get_texts()} >= {"non-finite", "not computed"}
    assert not fig.legends or "non-finite" not in str(plots.contour(_surface()).legends)


def test_a_curve_clips_a_blown_up_end_and_marks_it():
    x = np.linspace(-1, 1, 21)
    y = 0.2 + x**2
    y[-1], y[-2] = 1e6, np.nan
    surf = SurfaceData("line", x, None, {"loss": y}, np.ones(21, bool), {})
    ax = plots.curve(surf).axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert ax.get_ylim()[1] < 10  # the bowl fills the axes
    (above,) = [ln for label, ln in lines.items() if label.startswith("above ")]
    assert list(above.get_xdata()) == [1.0]
    np.testing.assert_allclose(lines["non-finite"].get_xdata(), [0.9])
    assert "1 non-finite" in ax.get_title() and "clipped at" in ax.get_title()
    assert plots.curve(surf, vmax=None).axes[0].get_ylim()[1] > 1e5
    with pytest.raises(ValueError, match="vmax"):
        plots.curve(surf, vmax="everything")


@pytest.mark.parametrize("vmax", ["auto", 5.0])
def test_an_overflow_stays_a_gap_where_values_are_clipped(vmax):
    """An inf was clipped like a large value: drawn at the limit and joined to the line."""
    x = np.linspace(-1, 1, 21)
    y = 0.2 + x**2
    y[-3], y[-2], y[-1] = 1e6, np.inf, np.inf
    surf = SurfaceData("line", x, None, {"loss": y}, np.ones(21, bool), {})
    ax = plots.curve(surf, vmax=vmax).axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert np.isinf(lines["loss"].get_ydata()[-2:]).all()  # not drawn: the line breaks
    (above,) = [ln for label, ln in lines.items() if label.startswith("above ")]
    np.testing.assert_allclose(above.get_xdata(), [0.8])  # the finite one only
    np.testing.assert_allclose(lines["non-finite"].get_xdata(), [0.9, 1.0])
    grid = np.add.outer(x**2, x**2) + 1.0
    grid[0, :3], grid[0, 0] = 1e9, np.inf
    drawn, _ = plots._drawn(SurfaceData("plane", x, x, {"loss": grid},
                                        np.ones((21, 21), bool), {}), "loss", False, vmax)
    assert np.isinf(drawn[0, 0]) and np.isfinite(drawn[0, 1]) and drawn[0, 1] < 1e9


def test_surface3d_axes_follow_x_and_y():
    surf = _surface(nx=8, ny=3)
    fig = plots.surface3d(surf, vmax=2.0)
    ax = fig.axes[0]
    assert ax.get_xlim3d()[0] <= surf.x[0] and ax.get_xlim3d()[1] >= surf.x[-1]
    assert ax.get_ylim3d()[0] <= surf.y[0] and ax.get_ylim3d()[1] >= surf.y[-1]
    assert ax.get_ylim3d()[1] < 1.0  # y spans [0, 0.5], not x's [-1, 2]
    assert _png(fig).startswith(b"\x89PNG")


def test_a_minimum_on_the_grids_edge_is_drawn_whole():
    """The star of a minimum on the edge (common on PCA planes) was cut in half."""
    surf = _surface(f=lambda X, Y: (X - 2.0) ** 2 + Y)  # minimum at the corner x=2, y=0
    (star,) = [ln for ln in plots.contour(surf).axes[0].get_lines()
               if ln.get_label().startswith("minimum")]
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (2.0, 0.0)
    assert not star.get_clip_on()


def test_curve_of_a_line_with_accuracy():
    x = np.linspace(-0.5, 1.5, 9)
    surf = SurfaceData("interp", x, None, {"loss": x**2, "accuracy": 1 - x**2 / 4},
                       np.ones(9, bool), {"directions": {"kind": "interpolation"}})
    fig = plots.curve(surf)
    line = fig.axes[0].get_lines()[0]
    np.testing.assert_array_equal(line.get_xdata(), x)
    np.testing.assert_array_equal(line.get_ydata(), x**2)
    assert len(fig.axes) == 2  # accuracy on a twin axis
    # the legend names both curves (it named the loss alone: the lines at alpha 0 and 1
    # made it, and the accuracy of the second axis was left out)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["loss", "accuracy"]
    alone = plots.curve(surf, accuracy=False)
    assert alone.axes[0].get_legend() is None  # one curve: no legend
    with pytest.raises(ValueError, match="1-D"):
        plots.contour(surf)
    with pytest.raises(ValueError, match="2-D"):
        plots.curve(_surface())
    with pytest.raises(ValueError, match="field"):
        plots.curve(surf, "nope")


def _parse_vtk(text: str):
    lines = text.splitlines()
    assert lines[0].startswith("# vtk DataFile Version")
    assert lines[2] == "ASCII" and lines[3] == "DATASET STRUCTURED_GRID"
    dims = [int(v) for v in lines[4].split()[1:]]
    kw, n, dtype = lines[5].split()
    assert kw == "POINTS" and dtype == "double"
    n = int(n)
    points = np.array([[float(v) for v in ln.split()] for ln in lines[6:6 + n]])
    i = 6 + n
    assert lines[i] == f"POINT_DATA {n}"
    i += 1
    scalars = {}
    while i < len(lines):
        _, name, _, comps = lines[i].split()
        assert comps == "1" and lines[i + 1] == "LOOKUP_TABLE default"
        scalars[name] = np.array([float(v) for v in lines[i + 2:i + 2 + n]])
        i += 2 + n
    return dims, points, scalars


def test_vtk_export_parses_back(tmp_path):
    surf = _surface(nx=4, ny=3, f=lambda X, Y: X**2 + 3 * Y)
    surf.done[0, 0] = False
    surf.values["loss"][0, 0] = np.nan
    surf.values["loss"][2, 3] = np.inf  # computed, diverged: told apart by "finite"
    path = plots.export_vtk(surf, tmp_path / "s.vtk")
    dims, points, scalars = _parse_vtk(path.read_text())
    assert dims == [4, 3, 1]
    X, Y = np.meshgrid(surf.x, surf.y)
    np.testing.assert_allclose(points[:, 0], X.reshape(-1))  # x varies fastest
    np.testing.assert_allclose(points[:, 1], Y.reshape(-1))
    z = surf.values["loss"].reshape(-1)
    ok = np.isfinite(z)
    np.testing.assert_allclose(points[ok, 2], z[ok], rtol=1e-8)
    assert points[0, 2] == pytest.approx(z[ok].max())  # not computed: at the top
    np.testing.assert_allclose(scalars["loss"][ok], z[ok], rtol=1e-8)
    np.testing.assert_array_equal(scalars["computed"], surf.done.reshape(-1).astype(float))
    assert scalars["finite"].tolist() == [0.0] + [1.0] * 10 + [0.0]
    np.testing.assert_allclose(scalars["accuracy"], 0.5)
    flat = _parse_vtk(plots.export_vtk(surf, tmp_path / "f.vtk", height=False).read_text())[1]
    assert (flat[:, 2] == 0).all()


def test_vtk_of_a_line(tmp_path):
    x = np.linspace(0, 1, 5)
    surf = SurfaceData("l", x, None, {"loss": x + 1}, np.ones(5, bool), {})
    dims, points, _ = _parse_vtk(plots.export_vtk(surf, tmp_path / "l.vtk").read_text())
    assert dims == [5, 1, 1]
    np.testing.assert_allclose(points[:, 2], x + 1)


def test_plots_read_surfaces_from_run_files(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        for name in ("a", "b"):
            s = w.create_surface(name, [0.0, 1.0, 2.0], [0.0, 1.0])
            for j in range(2):
                for i in range(3):
                    w.write_surface(name, (j, i), {"loss": float(i + j)})
    assert plots.load_surface(path, "b").name == "b"
    with pytest.raises(ValueError, match="2 surfaces"):
        plots.load_surface(path)
    fig = plots.contour(path, name="a")
    assert fig.axes[0].get_xlim() == (0.0, 2.0)
    assert s.shape == (2, 3)


def _basin(offset=0.01):
    """A trained model's plane: a smooth bowl from ``offset`` at (0.3, -0.2) to ~70."""
    x = np.linspace(-1.0, 1.0, 21)
    X, Y = np.meshgrid(x, x)
    loss = offset + 70 * ((X - 0.3) ** 2 + (Y + 0.2) ** 2) ** 1.5 / 2.5
    return SurfaceData("plane", x, x, {"loss": loss}, np.ones((21, 21), bool),
                       {"directions": {"kind": "random", "normalization": "filter"}}, {})


def test_a_basin_decades_below_the_rim_is_drawn_on_a_log_scale_by_default():
    """Linear levels 0, 2.5, 5, ... left everything below the chance loss one blank region
    (surfaces audit: a digits CNN from 0.0096 to 69, no level under 2.3)."""
    surf = _basin()
    assert plots.outlier_fence(surf.values["loss"]) is None  # nothing to clip: a bowl
    fig = plots.contour(surf)
    assert fig.axes[0].get_title().startswith("plane: log10 loss")
    assert (_levels(fig) < np.log10(2.3)).sum() >= 10  # the basin has levels of its own
    for linear in (plots.contour(surf, log=False), plots.contour(surf, vmax=None),
                   plots.contour(_basin(offset=-0.5))):  # told, to scale, or not positive
        assert linear.axes[0].get_title().startswith("plane: loss")
    assert plots.curve(SurfaceData("l", surf.x, None, {"loss": surf.values["loss"][10]},
                                   np.ones(21, bool), {})).axes[0].get_title() \
        .startswith("l: log10 loss")
    # the minimum is marked where it is, off the centre
    (star,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "minimum (0.01)"]
    assert (star.get_xdata()[0], star.get_ydata()[0]) == pytest.approx((0.3, -0.2))


def test_values_at_or_below_zero_on_a_log_scale_are_counted_and_marked():
    """log10 left the whole basin of an offset loss blank without a word."""
    surf = _basin(offset=-0.5)
    fig = plots.contour(surf, log=True)
    below = int((surf.values["loss"] <= 0).sum())
    assert f"{below} at or below 0, left out of the log scale" in fig.axes[0].get_title()
    marks = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert len(marks["≤ 0 (not on the log scale)"].get_xdata()) == below


def test_a_constant_surface_says_so():
    """A dead network's plane (one loss everywhere) was an empty frame without a word."""
    surf = _surface(f=lambda X, Y: 15.17 + 0.0 * X)
    fig = plots.contour(surf)
    ax = fig.axes[0]
    assert "constant: loss 15.17 at every computed point" in ax.get_title()
    assert any("15.17 at every computed point" in t.get_text() for t in ax.texts)
    assert "minimum" not in str([ln.get_label() for ln in ax.get_lines()])


def test_a_kind_the_labels_do_not_know_is_named_not_drawn_as_random():
    """A new kind of direction was labelled as a filter-normalized random one (newcomer
    audit): the axes now name it."""
    surf = _surface()
    surf.attrs["directions"] = {"kind": "gradient", "normalization": "filter"}
    assert plots._labels(surf) == ("α  (along δ, gradient direction, filter-normalized)",
                                   "β  (along η, gradient direction, filter-normalized)")
    surf.attrs["directions"] = {"kind": "random", "normalization": "filter"}
    assert plots._labels(surf)[0] == "α  (along δ, filter-normalized)"


def test_levels_given_as_values_keep_the_scale_linear_and_few_points_are_not_constant():
    """Review: under the default log scale, levels=[0.05, 0.5, 5, 50] were drawn as log10
    values; three computed points of a plane read 'loss 0.9 at every computed point'."""
    surf = _basin()
    levels = [0.05, 0.5, 5.0, 50.0]
    fig = plots.contour(surf, levels=levels)
    assert fig.axes[0].get_title().startswith("plane: loss")
    np.testing.assert_allclose(_levels(fig), levels)
    assert plots.contour(_basin(), levels=12).axes[0].get_title().startswith("plane: log10")
    partial = _surface(nx=5, ny=5, f=lambda X, Y: 0.5 + X**2 + Y)
    partial.done[:] = False
    partial.done[0, :3] = True
    ax = plots.contour(partial).axes[0]
    assert not ax.texts and "constant" not in ax.get_title()
    # a non-finite point is no minimum; an accuracy spanning decades stays linear
    inf = _basin()
    inf.values["loss"][0, 0] = -np.inf
    labels = [ln.get_label() for ln in plots.contour(inf).axes[0].get_lines()]
    assert "minimum (0.01)" in labels and "minimum (-inf)" not in labels
    acc = _basin()
    acc.values = {"accuracy": 1e-3 + 0.99 * (acc.values["loss"] / acc.values["loss"].max())}
    assert plots.contour(acc, "accuracy").axes[0].get_title().startswith("plane: accuracy")


def test_contour_labels_tell_the_levels_of_a_nearly_flat_surface_apart():
    """%.3g labelled every contour of a LoRA surface between 3.7479 and 3.7511 '3.75'."""
    surf = _surface(nx=9, ny=9, f=lambda X, Y: 3.7479 + 0.001 * (X**2 + Y**2))
    fig = plots.contour(surf, filled=False, levels=8)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert len(set(labels)) >= 5  # each labelled level its own text (a level may recur)
    assert plots.level_format([0.5, 1.0, 1.5]) == "%.3g"  # the short form where it suffices
    assert plots.level_format([3.748, 3.749, 3.750]) == "%.4g"
    assert plots.level_format([3.7479, 3.7483, 3.7487]) == "%.5g"


def test_a_vmax_above_every_value_clips_nothing_and_the_colour_bar_says_so():
    """--vmax 1.0 on a surface whose largest loss is 0.967 labelled the bar 'loss
    (clipped)' and drew an extended end (report review)."""
    surf = _surface(nx=6, ny=4)
    top = float(np.nanmax(surf.values["loss"]))
    for vmax, clipped in ((top * 1.5, False), (top * 0.5, True)):
        fig = plots.contour(surf, vmax=vmax)
        label = fig.axes[-1].get_ylabel()
        assert label.endswith("(clipped)") == clipped, (vmax, label)
