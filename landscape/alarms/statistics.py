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

        Returns:
            ``(median, mad)`` of the values in the window (which must not be empty).
        """
        a = self.sorted
        n = len(a)
        h = n // 2
        med = self.median()
        # the deviations left and right of the median are each sorted: merge them up to
        # the middle one
        right = bisect.bisect_left(a, med)
        left = right - 1
        devs: list[float] = []
        while len(devs) <= h:
            if left >= 0 and (right >= n or med - a[left] <= a[right] - med):
                devs.append(med - a[left])
                left -= 1
            else:
                devs.append(a[right] - med)
                right += 1
        mad = devs[h] if n % 2 else 0.5 * (devs[h - 1] + devs[h])
        return med, mad

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
