"""The orthonormal basis of the Krylov solvers, on the device or offloaded to the host.

:func:`orthogonalize` is the Gram-Schmidt step (the three-term recurrence, then classical
Gram-Schmidt with the Daniel-Gragg-Kaufman-Stewart test); :class:`Basis` keeps the rows,
either as one device tensor grown on demand or in host memory streamed through the device
in chunks (docs/curvature.md, "Memory"); :func:`work_dtype` is the dtype they are kept in
(docs/curvature.md, "Precision").
"""

from __future__ import annotations

from typing import Iterator

import torch

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
    coef = torch.zeros(q.shape[0], dtype=torch.float64, device=w.device)
    if not q.shape[0]:
        return w, coef, float(torch.linalg.vector_norm(w))
    if near is not None:
        lo, hi = max(0, near - 1), min(near + 1, q.shape[0])
        c = q[lo:hi] @ w
        w = _subtract(w, q[lo:hi], c, overwrite)
        coef[lo:hi] += c.double()
        overwrite = True  # w is a new vector now, or was the caller's to overwrite
    after = float(torch.linalg.vector_norm(w))
    for _ in range(2):
        before = after
        c = q @ w
        w = _subtract(w, q, c, overwrite)
        overwrite = True
        coef += c.double()
        after = float(torch.linalg.vector_norm(w))
        if after >= _DGKS * before:
            break
    return w, coef, after


def _subtract(w: Tensor, q: Tensor, c: Tensor, overwrite: bool) -> Tensor:
    """``w - q.T @ c``, written into ``w`` when ``overwrite`` (the same bits either way)."""
    if overwrite:
        return w.addmv_(q.T, c, alpha=-1.0)
    return torch.addmv(w, q.T, c, alpha=-1.0)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the solvers' vectors and reductions for an operator of ``dtype``.

    Products run in the operator's dtype; Krylov bases, Gram-Schmidt coefficients and dot
    products are kept in at least float32, so a bfloat16/float16 model is multiplied in
    its own dtype but orthogonalised in float32 (docs/curvature.md, "Precision").

    Args:
        dtype: the operator's dtype.

    Returns:
        ``float32`` for 16-bit floating dtypes, else ``dtype``.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class Basis:
    """Orthonormal rows, on the operator's device or offloaded to host memory.

    On the device (``offload=False``) the rows are one tensor grown on demand (capacity doubles,
    but never past ``limit``, the most rows the solver can keep; while it grows the old and the
    new tensor coexist). Offloaded, the rows live in host memory (pinned when the device is
    CUDA) and only the last three rows used stay on the device; Gram-Schmidt streams the others
    through in chunks of ``chunk`` rows, so the device holds at most ``chunk + 4`` vectors of
    the basis whatever its size. ``device_vectors`` / ``peak_device_vectors`` count the vectors
    of length ``n`` the basis holds on the device (a test hook, not a timing).
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
        pin = self.offload and self.device.type == "cuda"
        where = torch.device("cpu") if self.offload else self.device
        self.rows = torch.empty((max(capacity, 1), n), dtype=dtype, device=where, pin_memory=pin)
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
            return int(self.rows.shape[0]) + self._transient
        return len(self._recent) + self._transient

    def _note(self) -> None:
        self.peak_device_vectors = max(self.peak_device_vectors, self.device_vectors)

    # -- rows ----------------------------------------------------------------------------
    def row(self, i: int) -> Tensor:
        """Row ``i`` on the device."""
        if not self.offload:
            return self.rows[i]
        got = self._recent.get(i)
        if got is None:
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
        if self.size == self.rows.shape[0]:
            grown = torch.empty(
                (min(2 * self.rows.shape[0], self.limit), self.rows.shape[1]),
                dtype=self.rows.dtype, device=self.rows.device,
                pin_memory=self.rows.is_pinned(),
            )
            grown[: self.size] = self.rows[: self.size]
            self.rows = grown
            self._note()
        if divisor is not None and not self.offload:
            torch.div(v, divisor, out=self.rows[self.size])
        else:
            if divisor is not None:
                v = v / divisor
            self.rows[self.size] = v
            if self.offload:
                self._remember(self.size, v)
        self.size += 1

    def _chunks(self, upto: int) -> Iterator[tuple[int, Tensor]]:
        """``(lo, rows[lo:hi] on the device)`` for consecutive chunks of the first rows."""
        if not self.offload:
            yield 0, self.rows[:upto]
            return
        for lo in range(0, upto, self.chunk):
            hi = min(lo + self.chunk, upto)
            self._transient += hi - lo
            self._note()
            try:
                yield lo, self.rows[lo:hi].to(self.device, non_blocking=True)
            finally:
                self._transient -= hi - lo

    def orthogonalize(
        self, w: Tensor, near: int | None = None, *, overwrite: bool = False
    ) -> tuple[Tensor, Tensor, float]:
        """``w`` minus its projection on the basis (:func:`orthogonalize`, streamed).

        Args:
            w: the vector, on the device.
            near: index of the row whose product ``w`` is.
            overwrite: ``w`` may be overwritten (on the device; :func:`orthogonalize`).

        Returns:
            The remainder, the float64 coefficients and the remainder's norm.
        """
        if not self.offload:
            return orthogonalize(self.rows[: self.size], w, near, overwrite=overwrite)
        coef = torch.zeros(self.size, dtype=torch.float64, device=w.device)
        if not self.size:
            return w, coef, float(torch.linalg.vector_norm(w))
        if near is not None:
            for i in (near - 1, near) if near > 0 else (near,):
                q = self.row(i)
                c = torch.dot(q, w)
                w = w - c * q
                coef[i] += c.double()
        after = float(torch.linalg.vector_norm(w))
        for _ in range(2):
            before = after
            # classical Gram-Schmidt: every coefficient from the same w0, one stream
            w0 = w.clone()
            self._transient += 1
            self._note()
            for lo, q in self._chunks(self.size):
                c = q @ w0
                w = torch.addmv(w, q.T, c, alpha=-1.0)
                coef[lo : lo + q.shape[0]] += c.double()
            del w0
            self._transient -= 1
            after = float(torch.linalg.vector_norm(w))
            if after >= _DGKS * before:
                break
        return w, coef, after

    def combine(self, s: Tensor, upto: int) -> Tensor:
        """``s.T @ rows[:upto]`` (``s``: ``(upto, k)``) on the device, streamed."""
        s = s.to(device=self.device, dtype=self.dtype)
        out = torch.zeros((s.shape[1], self.n), dtype=self.dtype, device=self.device)
        for lo, q in self._chunks(upto):
            out += s[lo : lo + q.shape[0]].T @ q
        return out

    def restart(self, s: Tensor, j: int) -> None:
        """Replace the first ``j`` rows by the ``p`` combinations ``s.T @ rows[:j]``.

        The rows after ``j`` (not yet multiplied) follow them. Computed where the rows
        live (on the host when offloaded), so the device holds no extra vector; the rows
        after ``j`` move up one by one (``p <= j``), without a copy of them.
        """
        p = s.shape[1]
        new = s.to(device=self.rows.device, dtype=self.dtype).T @ self.rows[:j]
        self.rows[:p] = new
        del new
        rest = self.size - j
        for i in range(rest):
            if p + i != j + i:
                self.rows[p + i].copy_(self.rows[j + i])
        self.size = p + rest
        self._recent.clear()
