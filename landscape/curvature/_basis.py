"""The orthonormal basis of the Krylov solvers, on the device or offloaded to the host.

:func:`orthogonalize` is the Gram-Schmidt step (the three-term recurrence, then classical
Gram-Schmidt with the Daniel-Gragg-Kaufman-Stewart test); :class:`Basis` keeps the rows,
either as one device tensor grown on demand or in host memory streamed through the device
in chunks (docs/curvature.md, "Memory"); :func:`~landscape._sums.work_dtype` is the dtype
they are kept in (docs/curvature.md, "Precision").
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator

import torch

from landscape._sums import dots, flat_norm, work_dtype

Tensor = torch.Tensor

__all__ = ["Basis", "orthogonalize", "work_dtype"]


_DGKS = 2.0**-0.5


def orthogonalize(
    q: Tensor, w: Tensor, near: int | None = None, *, overwrite: bool = False
) -> tuple[Tensor, Tensor, float]:
    """``w`` minus its projection on the orthonormal rows ``q``.

    Also returns the float64 coefficients and the norm of what is left (the DGKS test
    computes it anyway). ``overwrite=True`` subtracts in ``w`` itself (the caller owns it
    and no longer needs it): bitwise the same result without a new vector per pass, the
    solvers' memory at scale (docs/curvature.md, "Memory").

    ``near``: index of the row whose product ``w`` is; its components along that row and
    the one before (the three-term recurrence, where almost all of ``A q_j`` lies) are
    removed first, at the cost of two dot products. Then classical Gram-Schmidt over all
    rows with the Daniel-Gragg-Kaufman-Stewart (1976) test: a second pass only when a pass
    removed more than ``1 - 1/sqrt(2)`` of the norm, the case where cancellation can leave
    a component along the rows ("twice is enough", Giraud et al. 2005). A full pass reads
    every row, so after the recurrence step the second one is rarely needed.
    """
    return _orthogonalize_pieces(lambda lo, hi: [(lo, q[lo:hi])], q.shape[0], w, near,
                                 overwrite)


Pieces = Callable[[int, int], Iterable[tuple[int, Tensor]]]
"""``pieces(lo, hi)``: ``(start, rows[start:stop])`` covering the rows ``[lo, hi)``."""


def _orthogonalize_pieces(
    pieces: Pieces, size: int, w: Tensor, near: int | None, overwrite: bool
) -> tuple[Tensor, Tensor, float]:
    """:func:`orthogonalize` against ``size`` rows given in pieces (one or many blocks)."""
    coef = torch.zeros(size, dtype=torch.float64, device=w.device)
    if not size:
        return w, coef, flat_norm(w)
    if near is not None:
        w = _project_out(pieces(max(0, near - 1), min(near + 1, size)), w, coef, overwrite)
        overwrite = True  # w is a new vector now, or was the caller's to overwrite
    after = flat_norm(w)
    for _ in range(2):
        before = after
        w = _project_out(pieces(0, size), w, coef, overwrite)
        overwrite = True
        after = flat_norm(w)
        if after >= _DGKS * before:
            break
    return w, coef, after


def _project_out(
    parts: Iterable[tuple[int, Tensor]], w: Tensor, coef: Tensor, overwrite: bool
) -> Tensor:
    """``w`` minus its components on the rows in ``parts``, added to ``coef``.

    Every coefficient is taken from the same ``w`` (classical Gram-Schmidt).
    """
    found = [(start, q, dots(q, w)) for start, q in parts]
    for start, q, c in found:
        w = _subtract(w, q, c.to(q.dtype), overwrite)
        overwrite = True
        coef[start : start + q.shape[0]] += c
    return w


def _subtract(w: Tensor, q: Tensor, c: Tensor, overwrite: bool) -> Tensor:
    """``w - q.T @ c``, written into ``w`` when ``overwrite`` (the same bits either way)."""
    if overwrite:
        return w.addmv_(q.T, c, alpha=-1.0)
    return torch.addmv(w, q.T, c, alpha=-1.0)


BLOCK_ROWS = 8
"""Rows per block of a basis kept on the device (:class:`Basis`), at least."""

BLOCK_ENTRIES = 2**22
"""Entries per block at least: a small operator's basis is one block (one matrix product
per Gram-Schmidt pass, as fast as an unblocked basis; 62 rows below 67k entries), a large
one's blocks are :data:`BLOCK_ROWS` rows."""


class Basis:
    """Orthonormal rows, on the operator's device or offloaded to host memory.

    On the device (``offload=False``) the rows live in blocks of :data:`BLOCK_ROWS` rows
    (more when ``n`` is small: at least :data:`BLOCK_ENTRIES` entries), allocated as the
    basis grows and freed when a thick restart shrinks it: a growing basis never copies its
    rows (a single tensor that doubles holds the old and the new rows at once: 22 + 44
    vectors where a run of 23 products needs 24), and holds at most ``block_rows - 1`` rows
    it does not use (7 on large operators; a small operator's single block is allocated
    whole, at most :data:`BLOCK_ENTRIES` entries), never more than ``limit`` rows (the most
    the solver can keep). Gram-Schmidt runs block by block, each coefficient from the same
    vector (classical Gram-Schmidt), so a basis of one block computes exactly what
    :func:`orthogonalize` does on the rows. Offloaded, the rows live in one host tensor
    (pinned when the device is CUDA) and only the last three rows used stay on the device;
    Gram-Schmidt streams the others through in chunks of ``chunk`` rows, so the device holds
    at most ``chunk + 4`` vectors of the basis whatever its size. ``device_vectors`` /
    ``peak_device_vectors`` count the vectors of length ``n`` the basis holds on the device
    (a test hook, not a timing).
    """

    def __init__(
        self,
        n: int,
        dtype: torch.dtype,
        device: torch.device,
        capacity: int,
        *,
        offload: bool = False,
        chunk: int = 4,
        limit: int | None = None,
    ) -> None:
        self.n, self.dtype, self.device = n, dtype, torch.device(device)
        self.limit = n if limit is None else max(1, min(int(limit), n))
        self.offload = bool(offload)
        self.chunk = max(1, int(chunk))
        self.block_rows = max(BLOCK_ROWS, BLOCK_ENTRIES // max(n, 1))
        self.blocks: list[Tensor] = []  # the rows on the device, block_rows each at most
        self._starts: list[int] = []  # the index of each block's first row
        self.rows: Tensor | None = None  # the rows in host memory (offloaded)
        if self.offload:
            pin = self.device.type == "cuda"
            self.rows = torch.empty((max(min(capacity, self.limit), 1), n), dtype=dtype,
                                    device="cpu", pin_memory=pin)
        self.size = 0
        self._recent: dict[int, Tensor] = {}
        self._transient = 0
        self.peak_device_vectors = 0
        self._note()

    # -- device accounting ---------------------------------------------------------------
    @property
    def device_vectors(self) -> int:
        """Vectors of length ``n`` the basis holds on the device now."""
        if not self.offload:
            return sum(int(b.shape[0]) for b in self.blocks) + self._transient
        return len(self._recent) + self._transient

    def _note(self) -> None:
        self.peak_device_vectors = max(self.peak_device_vectors, self.device_vectors)

    def holds(self, t: Tensor) -> bool:
        """Whether ``t`` shares memory with the rows (a view of a row, e.g.)."""
        ptr = t.untyped_storage().data_ptr()
        stores = self.blocks if not self.offload else [self.rows, *self._recent.values()]
        return any(b is not None and b.untyped_storage().data_ptr() == ptr for b in stores)

    # -- rows ----------------------------------------------------------------------------
    def row(self, i: int) -> Tensor:
        """Row ``i`` on the device."""
        if not self.offload:
            b = bisect.bisect_right(self._starts, i) - 1
            return self.blocks[b][i - self._starts[b]]
        got = self._recent.get(i)
        if got is None:
            assert self.rows is not None
            got = self.rows[i].to(self.device, non_blocking=True)
            self._remember(i, got)
        return got

    def _remember(self, i: int, v: Tensor) -> None:
        self._recent[i] = v
        while len(self._recent) > 3:
            self._recent.pop(min(self._recent))
        self._note()

    def append(self, v: Tensor, divisor: float | None = None) -> None:
        """Append the unit row ``v`` (a device tensor), or ``v / divisor``.

        With ``divisor`` the quotient is written straight into the new row (on the
        device; no temporary vector), bitwise ``v / divisor``.
        """
        if not self.offload:
            held = self._starts[-1] + self.blocks[-1].shape[0] if self.blocks else 0
            if self.size == held:
                rows = max(1, min(self.block_rows, self.limit - held))
                self.blocks.append(torch.empty((rows, self.n), dtype=self.dtype,
                                               device=self.device))
                self._starts.append(held)
                self._note()
            target = self.row(self.size)
            if divisor is not None:
                torch.div(v, divisor, out=target)
            else:
                target.copy_(v)
            self.size += 1
            return
        assert self.rows is not None
        if self.size == self.rows.shape[0]:
            grown = torch.empty(
                (min(2 * self.rows.shape[0], self.limit), self.n), dtype=self.dtype,
                device="cpu", pin_memory=self.rows.is_pinned(),
            )
            grown[: self.size] = self.rows[: self.size]
            self.rows = grown
        if divisor is not None:
            v = v / divisor
        self.rows[self.size] = v
        self._remember(self.size, v)
        self.size += 1

    def _pieces(self, lo: int, hi: int) -> Iterator[tuple[int, Tensor]]:
        """``(start, rows[start:stop])`` on the device, block by block, covering ``[lo, hi)``.

        Device blocks are views; offloaded rows are copied to the device a chunk at a time.
        """
        if not self.offload:
            for first, block in zip(self._starts, self.blocks):
                start, stop = max(lo, first), min(hi, first + block.shape[0])
                if start < stop:
                    yield start, block[start - first : stop - first]
            return
        assert self.rows is not None
        for start in range(lo, hi, self.chunk):
            stop = min(start + self.chunk, hi)
            self._transient += stop - start
            self._note()
            try:
                yield start, self.rows[start:stop].to(self.device, non_blocking=True)
            finally:
                self._transient -= stop - start

    def orthogonalize(
        self, w: Tensor, near: int | None = None, *, overwrite: bool = False
    ) -> tuple[Tensor, Tensor, float]:
        """``w`` minus its projection on the basis (:func:`orthogonalize`, block by block).

        Args:
            w: the vector, on the device.
            near: index of the row whose product ``w`` is.
            overwrite: ``w`` may be overwritten (on the device; :func:`orthogonalize`).

        Returns:
            The remainder, the float64 coefficients and the remainder's norm.
        """
        if not self.offload:
            return _orthogonalize_pieces(self._pieces, self.size, w, near, overwrite)
        coef = torch.zeros(self.size, dtype=torch.float64, device=w.device)
        if not self.size:
            return w, coef, flat_norm(w)
        if near is not None:
            for i in (near - 1, near) if near > 0 else (near,):
                q = self.row(i)
                c = dots(q, w)
                w = w - c.to(q.dtype) * q
                coef[i] += c
        after = flat_norm(w)
        for _ in range(2):
            before = after
            # classical Gram-Schmidt: every coefficient from the same w0, one stream
            w0 = w.clone()
            self._transient += 1
            self._note()
            for lo, q in self._pieces(0, self.size):
                c = dots(q, w0)
                w = torch.addmv(w, q.T, c.to(q.dtype), alpha=-1.0)
                coef[lo : lo + q.shape[0]] += c
            del w0
            self._transient -= 1
            after = flat_norm(w)
            if after >= _DGKS * before:
                break
        return w, coef, after

    def combine(self, s: Tensor, upto: int) -> Tensor:
        """``s.T @ rows[:upto]`` (``s``: ``(upto, k)``) on the device, block by block."""
        s = s.to(device=self.device, dtype=self.dtype)
        out = None
        for lo, q in self._pieces(0, upto):
            part = s[lo : lo + q.shape[0]].T
            out = part @ q if out is None else out.addmm_(part, q)  # no temporary
        if out is None:
            return torch.zeros((s.shape[1], self.n), dtype=self.dtype, device=self.device)
        return out

    def restart(self, s: Tensor, j: int) -> None:
        """Replace the first ``j`` rows by the ``p`` combinations ``s.T @ rows[:j]``.

        The rows after ``j`` (not yet multiplied) follow them. Computed where the rows
        live (on the host when offloaded), so the device holds no extra vector besides the
        ``p`` new rows; the rows after ``j`` move up one by one (``p <= j``), without a
        copy of them, and device blocks no longer needed are freed.
        """
        p = s.shape[1]
        if self.offload:
            assert self.rows is not None
            self.rows[:p] = s.to(dtype=self.dtype).T @ self.rows[:j]
        else:
            new = self.combine(s, j)
            for i in range(p):
                self.row(i).copy_(new[i])
            del new
        rest = self.size - j
        for i in range(p, p + rest):  # upwards: row i + j - p is read before it is written
            if self.offload:
                assert self.rows is not None
                self.rows[i].copy_(self.rows[i + j - p])
            else:
                self.row(i).copy_(self.row(i + j - p))
        self.size = p + rest
        while self._starts and self._starts[-1] >= self.size:  # blocks no longer needed
            self._starts.pop()
            self.blocks.pop()
        self._recent.clear()
