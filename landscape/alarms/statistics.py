"""Robust statistics over a trailing window, for the spike rules.

:class:`RollingWindow` keeps the last ``size`` values in arrival order and sorted, so the
median and the median absolute deviation (MAD) of the window cost O(size) per row instead
of a sort (the spike rules of ``docs/alarms.md`` call it on every training step).
"""

from __future__ import annotations

import bisect
import math
from collections import deque

__all__ = ["RollingWindow"]


class RollingWindow:
    """The last ``size`` values, kept sorted too: median and MAD in O(size) per row.

    Args:
        size: the number of values kept; appending to a full window drops the oldest.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.order: deque[float] = deque()
        self.sorted: list[float] = []

    def __len__(self) -> int:
        return len(self.order)

    def append(self, x: float) -> None:
        """Add ``x``, dropping the oldest value when the window is full.

        Args:
            x: the new value (finite).
        """
        if len(self.order) == self.size:
            old = self.order.popleft()
            del self.sorted[bisect.bisect_left(self.sorted, old)]
        self.order.append(x)
        bisect.insort(self.sorted, x)

    def median(self) -> float:
        """The median of the values in the window (which must not be empty), as ``np.median``."""
        a = self.sorted
        h = len(a) // 2
        return a[h] if len(a) % 2 else 0.5 * (a[h - 1] + a[h])

    def median_mad(self) -> tuple[float, float]:
        """Median and median absolute deviation from it (both as in ``np.median``).

        The deviations left and right of the median are each sorted, so the middle one of
        all is found by a binary search over how many come from the left, in O(log size)
        (the k-th smallest of two sorted sequences) instead of merging them.

        Returns:
            ``(median, mad)`` of the values in the window (which must not be empty).
        """
        a = self.sorted
        n = len(a)
        h = n // 2
        med = self.median()
        right = bisect.bisect_left(a, med)
        if n % 2:
            return med, _kth_deviation(a, med, right, h)
        return med, 0.5 * (_kth_deviation(a, med, right, h - 1)
                           + _kth_deviation(a, med, right, h))

    def maximum(self, but_newest: bool = False) -> float:
        """The largest value in the window (``-inf`` when empty).

        Args:
            but_newest: leave the most recently appended value out.
        """
        a = self.sorted
        if but_newest and self.order:
            newest = self.order[-1]
            if a and a[-1] == newest:  # the newest is (one of) the largest
                return a[-2] if len(a) > 1 else -math.inf
        return a[-1] if a else -math.inf


def _kth_deviation(a: list[float], med: float, right: int, k: int) -> float:
    """The k-th smallest (from 0) of the deviations ``|x - med|`` of the sorted ``a``.

    Those left of ``right`` (``med - a[right - 1 - i]``, i = 0, 1, ...) and from ``right``
    on (``a[right + j] - med``) are each increasing: the k+1 smallest are the first ``i``
    of the left and the first ``k + 1 - i`` of the right for the smallest ``i`` whose next
    left deviation is not below the right's last taken one.
    """
    n_left, n_right = right, len(a) - right
    lo, hi = max(0, k + 1 - n_right), min(k + 1, n_left)
    while lo < hi:
        i = (lo + hi) // 2
        j = k + 1 - i
        if med - a[right - 1 - i] < a[right + j - 1] - med:
            lo = i + 1  # the left's next deviation is smaller: take more from the left
        else:
            hi = i
    i, j = lo, k + 1 - lo
    last_left = med - a[right - i] if i > 0 else -math.inf
    last_right = a[right + j - 1] - med if j > 0 else -math.inf
    return max(last_left, last_right)
