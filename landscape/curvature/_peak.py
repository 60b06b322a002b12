"""Peak memory of a block of code, above the memory in use when it began.

:class:`PeakMemory` reads ``torch.cuda.max_memory_allocated`` on CUDA and, on the CPU, the
resident set's high-water mark (``VmHWM`` in ``/proc/self/status``, reset through
``/proc/self/clear_refs``; Linux ``proc(5)``), since torch's CPU allocator returns large
blocks to the system. The memory planner (:mod:`landscape.curvature.memory`) measures
products with it, and every curvature result reports its run's peak.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["PeakMemory"]


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _trim() -> None:
    """Return the C heap's free memory to the system (glibc ``malloc_trim``), if any."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _reset_cpu_peak() -> None:
    _trim()  # freed memory the heap kept would otherwise be reused without being counted
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set (proc(5))
    except OSError:
        pass


class PeakMemory:
    """Peak memory of a block above the memory in use when it began, in bytes.

    Use as ``with PeakMemory(device) as mem: ...; mem.peak``. Nested blocks are safe: an
    inner block hands the high-water mark it is about to reset to the blocks around it.

    Args:
        device: where to measure (``None``: the CPU).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.peak = 0
        self._base = 0
        self._seen = 0

    def _mark(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _status_bytes("VmHWM") or 0

    def _now(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return _status_bytes("VmRSS") or 0

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_cpu_peak()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        mark = self._mark()
        for outer in _ACTIVE:
            if outer.device == self.device:
                outer._seen = max(outer._seen, mark)
        self._reset()
        self._base = self._now()
        self._seen = self._base
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        mark = self._mark()
        _ACTIVE.remove(self)
        for outer in _ACTIVE:
            if outer.device == self.device:
                outer._seen = max(outer._seen, mark)
        self.peak = max(0, max(self._seen, mark) - self._base)


_ACTIVE: list[PeakMemory] = []
