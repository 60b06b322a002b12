"""Thinning long series for drawing: what is kept, and that the picture is the same."""

from __future__ import annotations

import io

import matplotlib.image as mpimg
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from landscape.findings import Finding
from landscape.plotting.thinning import THIN_ABOVE, thin, thin_marks
from landscape.plotting.timelines import timeline
from landscape.store import Run, RunWriter


def _slice_of(x, bins):
    span = x[-1] - x[0]
    return np.minimum(((x - x[0]) * (bins / span)).astype(np.int64), bins - 1)


def test_a_short_series_is_kept_whole():
    x = np.arange(THIN_ABOVE, dtype=float)
    y = np.random.default_rng(0).standard_normal(THIN_ABOVE)
    assert np.array_equal(thin(x, y), np.arange(THIN_ABOVE))
    assert np.array_equal(thin_marks(x), np.arange(THIN_ABOVE))


def test_unsorted_steps_are_kept_whole():
    x = np.arange(3 * THIN_ABOVE, dtype=float)[::-1]
    assert len(thin(x, np.zeros_like(x))) == len(x)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(THIN_ABOVE + 1, THIN_ABOVE + 3000),  # long enough to be thinned
    bins=st.integers(2, 40),
    gaps=st.floats(0.0, 0.3),
    seed=st.integers(0, 2**32 - 1),
    stride=st.integers(1, 7),
)
def test_every_slice_keeps_its_ends_extremes_and_first_gap(n, bins, gaps, seed, stride):
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.integers(1, 3, n) * stride).astype(float)  # uneven spacing
    y = np.cumsum(rng.standard_normal(n))
    y[rng.random(n) < gaps] = np.nan
    y[rng.random(n) < gaps / 10] = np.inf
    kept = thin(x, y, bins=bins)
    if n <= max(THIN_ABOVE, 4 * bins):
        assert np.array_equal(kept, np.arange(n))
        return
    # five a slice, and one gap between two of them at most
    assert np.array_equal(kept, np.unique(kept)) and len(kept) <= 10 * bins
    good = np.isfinite(y)
    joined = good[kept[:-1]] & good[kept[1:]]  # the thinned line's segments
    for i, j in zip(kept[:-1][joined], kept[1:][joined]):
        assert good[i:j + 1].all(), (i, j)  # the whole series draws it too: no gap bridged
    which = _slice_of(x, bins)
    for b in np.unique(which):
        members = np.flatnonzero(which == b)
        mine = set(kept[which[kept] == b])
        assert {members[0], members[-1]} <= mine
        finite = members[np.isfinite(y[members])]
        if finite.size:
            assert finite[np.argmin(y[finite])] in mine
            assert finite[np.argmax(y[finite])] in mine
        bad = members[~np.isfinite(y[members])]
        if bad.size:
            assert bad[0] in mine


def test_thin_marks_keeps_one_mark_per_slice():
    x = np.arange(10 * THIN_ABOVE, dtype=float)
    kept = thin_marks(x, bins=100)
    assert len(kept) == 100 and np.array_equal(np.unique(_slice_of(x, 100)[kept]), np.arange(100))


def _pixels(x, y, width_px=800):
    fig = Figure(figsize=(width_px / 100, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.plot(x, y, linewidth=1.0, color="k")
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(np.nanmin(y) - 1, np.nanmax(y) + 1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return mpimg.imread(io.BytesIO(buf.getvalue()))[..., :3]


def test_the_thinned_line_draws_the_same_picture():
    rng = np.random.default_rng(3)
    n = 200_000
    x = np.arange(n, dtype=float)
    y = np.cumsum(rng.standard_normal(n))
    y[rng.integers(0, n, 40)] += rng.standard_normal(40) * 200  # single-row spikes
    y[120_000:125_000] = np.nan  # a gap of 20 pixels
    full = _pixels(x, y)
    kept = thin(x, y)
    assert len(kept) < n / 10
    differs = np.abs(_pixels(x[kept], y[kept]) - full).max(axis=-1) > 0.25
    # the same number of points, taken evenly, loses the spikes: the comparison can fail
    even = np.linspace(0, n - 1, len(kept)).astype(int)
    naive = np.abs(_pixels(x[even], y[even]) - full).max(axis=-1) > 0.25
    assert differs.mean() < 0.005  # antialiased edges of the line
    assert naive.mean() > 10 * max(differs.mean(), 1e-4)


def test_a_long_run_draws_a_bounded_line_with_its_extremes_and_gaps(tmp_path):
    n = 5 * THIN_ABOVE
    rng = np.random.default_rng(1)
    loss = np.abs(rng.standard_normal(n)) + 1.0
    loss[n // 3] = 500.0  # a one-row spike: it must show
    loss[n // 2: n // 2 + 10] = np.nan
    path = tmp_path / "long.h5"
    with RunWriter(path, mode="w") as w:
        w.declare("loss", {"value": ()})
        for s in range(n):
            w.append("loss", s, {"value": float(loss[s])})
        w.add_finding(Finding(step=n // 3, rule="loss_spike", severity="warning",
                              metric="loss/value", value=500.0, threshold=10.0, message="x"))
    with Run.open(path) as run:
        fig = timeline(run, "loss", log=False)
    ax = fig.axes[0]
    line = ax.get_lines()[0]
    x, y = (np.asarray(a, dtype=float) for a in line.get_data())
    assert len(x) <= 5 * 4000 < n
    assert np.nanmax(y) == 500.0 and np.nanmin(y) == np.nanmin(loss)
    assert x[0] == 0 and x[-1] == n - 1
    assert np.isnan(y[(x >= n // 2) & (x < n // 2 + 10)]).any()  # the gap stays a gap
