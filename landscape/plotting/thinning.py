"""Thinning long series before they are drawn: per-bin first, last, minimum and maximum.

A line through a million points draws no more than the figure has pixel columns: within one
column only the points that set its ends and its vertical extent show. Keeping, in each of
``bins`` equal slices of the step axis, the first and last point and those with the
smallest and largest value draws the same picture as the whole series when the figure has
at most ``bins`` pixel columns (the M4 aggregation of Jugel et al. 2014, "M4: a
visualization-oriented time series data aggregation", PVLDB 7(10)), at a drawing cost that
no longer grows with the run's length (docs/benchmarks.md, "Long runs").

A gap stays a gap: a slice that holds a non-finite value keeps its first one, and two kept
points with a non-finite value between them keep one of those too, so the line breaks
wherever it breaks through the whole series. Series of at most ``THIN_ABOVE`` points
are returned whole.
"""

from __future__ import annotations

import numpy as np

THIN_BINS = 4000
"""Slices of the step axis: the widest figure drawn without a visible change, in pixels."""

THIN_ABOVE = 4 * THIN_BINS
"""Series with more points than this are thinned (up to five points a slice are kept)."""


def _slices(x: np.ndarray, bins: int) -> np.ndarray | None:
    """The first index of each non-empty slice of ``x`` (non-decreasing), or None if unsorted."""
    span = float(x[-1] - x[0])
    if not np.isfinite(span) or span <= 0 or bool((np.diff(x) < 0).any()):
        return None  # unsorted steps (never written by a run) or a single step: no slicing
    which = np.minimum(((x - x[0]) * (bins / span)).astype(np.int64), bins - 1)
    return np.flatnonzero(np.concatenate(([True], which[1:] != which[:-1])))


def _first_per_slice(hits: np.ndarray, slice_of: np.ndarray) -> np.ndarray:
    """Of the indices ``hits`` (increasing), the first one in each slice."""
    if hits.size == 0:
        return hits
    where = slice_of[hits]
    return hits[np.concatenate(([True], where[1:] != where[:-1]))]


def thin(x: np.ndarray, y: np.ndarray, bins: int = THIN_BINS) -> np.ndarray:
    """The indices of the points of ``(x, y)`` that draw the same line.

    Args:
        x: the steps, non-decreasing (a run's rows are).
        y: the values, same length; non-finite values are gaps.
        bins: the slices of the step axis.

    Returns:
        Increasing indices into ``x``: every index when the series has at most
        :data:`THIN_ABOVE` points (or ``4 * bins``) or ``x`` is not sorted; else, per slice,
        the first and last point, the first with the smallest and the first with the
        largest finite value, and the first non-finite one; and a non-finite one between
        any two of those the series breaks between.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(x)
    if n <= max(THIN_ABOVE, 4 * bins):
        return np.arange(n)
    starts = _slices(x, bins)
    if starts is None:
        return np.arange(n)
    lengths = np.diff(np.concatenate((starts, [n])))
    slice_of = np.repeat(np.arange(len(starts)), lengths)
    finite = np.isfinite(y)
    low = np.where(finite, y, np.inf)
    high = np.where(finite, y, -np.inf)
    lowest = np.minimum.reduceat(low, starts)[slice_of]
    highest = np.maximum.reduceat(high, starts)[slice_of]
    keep = [
        starts,
        starts + lengths - 1,
        _first_per_slice(np.flatnonzero(finite & (low == lowest)), slice_of),
        _first_per_slice(np.flatnonzero(finite & (high == highest)), slice_of),
        _first_per_slice(np.flatnonzero(~finite), slice_of),
    ]
    return _gaps_kept(np.unique(np.concatenate(keep)), finite)


def _gaps_kept(kept: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """``kept`` with a non-finite index between two kept points the series breaks between.

    Two finite kept points with a non-finite value between them, none of it kept, would be
    joined by a line the whole series does not draw: the first non-finite index after the
    first of them is added (at most one per kept point).
    """
    gaps = np.flatnonzero(~finite)
    if gaps.size == 0:
        return kept
    before = np.cumsum(~finite)  # non-finite values up to and including each index
    a, b = kept[:-1], kept[1:]
    broken = finite[a] & finite[b] & (before[b - 1] - before[a] > 0)  # a gap between
    if not broken.any():
        return kept
    added = gaps[np.searchsorted(gaps, a[broken], side="right")]
    return np.unique(np.concatenate((kept, added)))


def thin_marks(x: np.ndarray, bins: int = THIN_BINS) -> np.ndarray:
    """The indices of the first mark at ``x`` in each slice, for marks drawn at one height.

    A tick drawn at a step hides the others within its pixel column, so one per slice
    draws the same row of ticks. Every index when there are at most :data:`THIN_ABOVE`.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n <= max(THIN_ABOVE, 4 * bins):
        return np.arange(n)
    starts = _slices(x, bins)
    return np.arange(n) if starts is None else starts
