"""Lanczos iterations on flat tensors: a Krylov eigen-solver and SLQ tridiagonals.

Pure functions over a symmetric linear map given as a callable on 1-D tensors (or on a
batch of them); nothing here knows about models. Three routines and their Gram-Schmidt step:

* :func:`krylov_eigsh` -- Lanczos with full re-orthogonalisation (:func:`orthogonalize`:
  the three-term recurrence, then classical Gram-Schmidt, twice when needed), written as
  a *block* Krylov method fed one matvec at a time so that it can start from several
  vectors (a warm start from previous Ritz vectors). With a single start vector it is
  exactly the Lanczos process (docs/curvature.md, "Top eigenvalues"; Paige 1972;
  Parlett, *The Symmetric Eigenvalue Problem*, ch. 13). Stopping on Ritz residuals.
* :func:`lanczos_tridiagonal` -- plain m-step Lanczos with full (or, in bounded memory,
  local) re-orthogonalisation for several independent start vectors in lock step
  (batched matvecs), returning the tridiagonals used by stochastic Lanczos quadrature
  (Golub & Meurant 1997; Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019).
* :func:`krylov_basis` -- the orthonormal Lanczos basis itself and the Rayleigh quotients
  of its vectors, for deflated trace estimation.

Basis vectors are kept in the operator's dtype; every small dense problem (projected
matrix, its eigen-decomposition, residuals) is float64 (docs/curvature.md, "Conventions").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch

from landscape._sums import dots, flat_norm, row_norms
from landscape.curvature._basis import Basis as _Basis
from landscape.curvature._basis import orthogonalize, work_dtype

Tensor = torch.Tensor

__all__ = [
    "STOPPING_RULES", "KrylovResult", "finite_product", "gap_estimate", "krylov_basis",
    "krylov_eigsh", "lanczos_tridiagonal", "orthogonalize", "residual_floor", "work_dtype",
]


def residual_floor(dtype: torch.dtype) -> float:
    """Relative size (w.r.t. the largest |Ritz value|) below which a residual is noise.

    ``100 eps`` of the dtype; for 16-bit products (bfloat16, float16), whose rounding
    error alone is ``eps`` relative, ``eps`` itself (docs/curvature.md, "Precision").
    """
    eps = torch.finfo(dtype).eps
    return eps if dtype in (torch.float16, torch.bfloat16) else 100.0 * eps


@dataclasses.dataclass
class KrylovResult:
    """Ritz pairs picked from the final Krylov space.

    ``largest``/``smallest``: ``(values, vectors, residuals)`` with float64 values in
    descending (largest) or ascending (smallest) order, vectors as rows ``(k, n)`` in the
    operator's dtype, float64 residual norms ``||A y - theta y||``. ``None`` when not asked.
    ``peak_device_vectors``: the most basis vectors held on the operator's device at once.
    """

    largest: tuple[Tensor, Tensor, Tensor] | None
    smallest: tuple[Tensor, Tensor, Tensor] | None
    n_matvec: int
    converged: bool
    ritz_values: Tensor
    basis_size: int
    peak_device_vectors: int = 0


def _pick(m: int, k: int, which: str) -> np.ndarray:
    """Indices of the ``k`` largest (descending) or smallest of ``m`` ascending values."""
    k = min(k, m)
    if which == "largest":
        return np.arange(m - 1, m - 1 - k, -1)
    return np.arange(0, k)


def _keep(m: int, keep: int, wanted: tuple[str, ...]) -> np.ndarray:
    """Ascending indices of the Ritz pairs a thick restart keeps (``keep`` of ``m``)."""
    if len(wanted) == 1:
        idx = _pick(m, keep, wanted[0])
    else:
        lo = _pick(m, keep // 2, "smallest")
        idx = np.union1d(lo, _pick(m, keep - lo.size, "largest"))
    return np.sort(idx)


def gap_estimate(theta: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Distance from each wanted Ritz value ``theta[idx]`` to the nearest other Ritz value.

    The gap of the eigenvalue error estimate ``residual^2 / gap`` (Kato-Temple; Parlett,
    *The Symmetric Eigenvalue Problem*, sec. 11.7); ``inf`` when there is one Ritz value
    (then ``r^2 / gap`` estimates nothing and the solver uses ``r``).
    """
    out = np.full(idx.size, np.inf)
    for i, t in enumerate(idx):
        others = np.delete(theta, t)
        if others.size:
            out[i] = float(np.abs(others - theta[t]).min())
    return out


STOPPING_RULES = ("auto", "residual", "value")


def finite_product(norm: float) -> float:
    """A product's norm, or a clear error when the product is not finite.

    Raises:
        ValueError: NaN or inf in the product (the model's weights, its data or its loss
            are not finite, or overflow): an eigen-solver fed it fails deep inside LAPACK
            ("Eigenvalues did not converge") or returns nothing.
    """
    if not math.isfinite(norm):
        raise ValueError(
            "a curvature product is not finite (NaN or inf): the model's weights, its data "
            "or its loss are not finite, or overflow in this dtype")
    return norm


def _owned(w: Tensor, fresh: bool, basis: _Basis) -> bool:
    """Whether Gram-Schmidt may subtract in the product ``w`` itself.

    Only a new tensor (``fresh``: the caller's promise, or a dtype conversion made here)
    that is dense, no view of the basis, and writable here (an inference tensor is not,
    outside inference mode).
    """
    if not fresh or not w.is_contiguous() or basis.holds(w):
        return False
    return not w.is_inference() or torch.is_inference_mode_enabled()


def krylov_eigsh(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    *,
    k: int = 1,
    which: str = "largest",
    tol: float = 1e-3,
    max_matvec: int = 100,
    min_matvec: int = 0,
    generator: torch.Generator | None = None,
    stop: str = "residual",
    max_basis: int | None = None,
    offload: bool = False,
    chunk: int = 4,
    callback: Callable[[dict], None] | None = None,
    fresh_products: bool = False,
) -> KrylovResult:
    """Extreme eigenpairs of a symmetric map by Lanczos with full re-orthogonalisation.

    ``start`` is one start vector ``(n,)`` or a block ``(b, n)`` (e.g. previous Ritz
    vectors); the rows are orthonormalised and multiplied one by one, and the part of each
    product orthogonal to the basis, normalised, is appended to the basis. After ``j``
    products ``A V_j = V_{j'} E`` holds exactly (``V_{j'}`` the whole basis, ``E`` the
    stored coefficients), so for a Ritz pair ``(theta, y = V_j s)`` of the projected matrix
    ``T = V_j^T A V_j`` the residual is ``||A y - theta y|| = ||E s - theta [s; 0]||``,
    computed without extra matvecs (for one start vector ``E`` is tridiagonal and this is
    the classical ``beta_j |s_j|``).

    Stopping rule (``stop="residual"``): every wanted Ritz pair satisfies
    ``||A y - theta y|| <= max(tol * |theta|, residual_floor(dtype) * max_i |theta_i|)``
    (the floor only matters for eigenvalues near 0), after at least ``min_matvec``
    products. ``stop="value"`` bounds the eigenvalue error instead of the residual: the
    test is ``min(r, r^2 / gap) <= tol * |theta|`` with ``r`` the residual and ``gap`` the
    distance to the nearest other Ritz value (:func:`gap_estimate`; Kato-Temple), taken
    once the projected matrix has at least 5 Ritz values (``r`` alone before), so the
    error certified by the residual alone is at most ``sqrt(tol * gap / |theta|)``
    relative, and the estimated one ``tol``. ``stop="auto"`` is the residual rule, and for
    one eigenvalue at one end (``k=1``, not ``"both"``) also stops when the value rule holds
    at ``tol / 10``: the estimated error of lambda_max is then 10x below ``tol`` while the
    residual may still be above ``tol``, the case of GPT-2 small, whose residual stalls
    above ``1e-3 |theta|`` while lambda_max is settled (docs/curvature.md, "Stopping rule
    at scale"). When the basis stops growing (an invariant subspace: exactly low-rank
    ``A``, or dependent start vectors) a fresh random vector from ``generator`` is added,
    so the solver also finds eigenvalues orthogonal to the start. ``which`` is
    ``"largest"``, ``"smallest"`` or ``"both"`` (algebraic order); ``k`` pairs at each
    wanted end.

    Memory: ``max_basis`` bounds the basis by a thick restart (Wu & Simon, SIMAX 2000):
    when it is full, the basis shrinks to the wanted Ritz vectors and the best others
    (half of it) plus the vectors not yet multiplied, and ``E`` to their Ritz values and
    residual couplings, so ``A V_j = V_{j'} E`` and the residual formula still hold.
    ``offload`` keeps the basis in host memory and streams it through the device in
    chunks of ``chunk`` rows (:class:`_Basis`). The basis is kept in :func:`work_dtype`
    of ``start``; ``matvec`` receives and may return the start's own dtype.
    ``callback(info)`` is called after every product with ``n_matvec``, ``theta``,
    ``residuals``, ``basis_size`` and ``device_vectors``. ``fresh_products=True`` says
    that ``matvec`` returns a new tensor at every call, which nobody else holds (as
    :meth:`~landscape.curvature.LinearOperator.flat_matvec` does): Gram-Schmidt then
    subtracts in it instead of in a copy, one vector less per product; otherwise only a
    product the solver converted to its dtype is overwritten.
    """
    if which not in ("largest", "smallest", "both"):
        raise ValueError(f"which must be 'largest', 'smallest' or 'both', got {which!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if stop not in STOPPING_RULES:
        raise ValueError(f"stop must be one of {STOPPING_RULES}, got {stop!r}")
    block = start.reshape(1, -1) if start.dim() == 1 else start
    n = block.shape[1]
    op_dtype, device = block.dtype, block.device
    dtype = work_dtype(op_dtype)
    block = block.to(dtype)
    max_matvec = max(1, int(max_matvec))
    wanted = ("largest", "smallest") if which == "both" else (which,)
    if max_basis is not None:
        least = len(wanted) * k + block.shape[0] + 2
        if max_basis < least:
            raise ValueError(f"max_basis must be >= {least} here, got {max_basis}")
        max_basis = min(int(max_basis), n)
    # the basis grows on demand (most runs stop far below max_matvec, and the basis is the
    # solver's main memory: a full preallocation was 161 vectors for k=5), never past `most`
    most = block.shape[0] + max_matvec + 1  # rows the run can ever keep
    if max_basis is not None:
        most = min(most, max_basis + block.shape[0])
    cap = min(n, most, 2 * block.shape[0] + 4 * k + 16)
    basis = _Basis(n, dtype, device, capacity=cap, offload=offload, chunk=chunk, limit=most)
    floor_rel = residual_floor(op_dtype)  # convergence: the products' noise
    break_rel = residual_floor(dtype)  # breakdown: the basis' rounding
    # the small dense problem (projected matrix, its eigh, Ritz residuals) lives in numpy,
    # float64 on the host, whatever the operator's device
    rows_max = (max_basis or max_matvec) + block.shape[0] + 1
    coeffs = np.zeros((rows_max, rows_max))
    norm_est = 0.0

    def add_unit(w: Tensor) -> None:
        """Orthogonalise a unit vector (a new one) against the basis and append what is left."""
        w, _, r = basis.orthogonalize(w, overwrite=True)
        if basis.size < n and r > break_rel:
            basis.append(w, divisor=r)

    for row in block:
        nrm = flat_norm(row)
        if nrm > 0:
            add_unit(row / nrm)
    j = 0  # rows multiplied (the leading j rows of the basis)
    used = 0  # products spent
    converged = False
    theta = np.zeros(0)
    svec = np.zeros((0, 0))
    res = np.zeros(0)
    while used < max_matvec:
        if j == basis.size:  # invariant subspace reached: restart with a random direction
            if basis.size >= n:
                break
            fresh = torch.randn(n, generator=generator, dtype=torch.float64).to(device, dtype)
            size_before = basis.size
            add_unit(fresh / row_norms(fresh).to(fresh.dtype))  # a device scalar
            if basis.size == size_before:
                break
        v = basis.row(j)
        raw = matvec(v.to(op_dtype))
        w = raw.to(dtype)
        owned = _owned(w, fresh_products or w is not raw, basis)
        del raw
        used += 1
        norm_est = max(norm_est, finite_product(flat_norm(w)))
        w, c, r = basis.orthogonalize(w, near=j, overwrite=owned)
        coeffs[: c.numel(), j] = c.cpu().numpy()
        if basis.size < n and r > break_rel * norm_est and r > 0:
            coeffs[basis.size, j] = r
            basis.append(w, divisor=r)
        del w
        j += 1
        proj = coeffs[:j, :j]
        theta, svec = np.linalg.eigh(0.5 * (proj + proj.T))
        resid = coeffs[: basis.size, :j] @ svec
        resid[:j] -= svec * theta
        res = np.linalg.norm(resid, axis=0)
        if callback is not None:
            callback({"n_matvec": used, "theta": theta.copy(), "residuals": res.copy(),
                      "basis_size": basis.size, "device_vectors": basis.device_vectors})
        if used >= min_matvec:
            scale = float(np.abs(theta).max())
            ok = True
            for end in wanted:
                idx = _pick(theta.size, k, end)
                if idx.size < min(k, n):
                    ok = False
                    break
                floor = floor_rel * scale
                r = res[idx]
                # r^2 / gap once the Krylov space holds 5 Ritz values (a smaller one
                # overstates the gap: its second Ritz value lies far below lambda_2)
                if theta.size >= 5:
                    # a zero gap (Ritz values repeated by a block start) gives inf: r rules
                    with np.errstate(divide="ignore", invalid="ignore"):
                        value = np.minimum(r, r**2 / gap_estimate(theta, idx))
                else:
                    value = r
                if stop == "value":
                    fail = value > np.maximum(tol * np.abs(theta[idx]), floor)
                else:
                    fail = r > np.maximum(tol * np.abs(theta[idx]), floor)
                    if stop == "auto" and k == 1 and len(wanted) == 1:
                        # lambda_max alone: its estimated error 10x below tol suffices
                        fail &= value > np.maximum(0.1 * tol * np.abs(theta[idx]), floor)
                if bool(fail.any()):
                    ok = False
            if ok:
                converged = True
                break
        if max_basis is not None and basis.size >= max_basis and used < max_matvec:
            keep = _keep(j, max(len(wanted) * k + 1, max_basis // 2), wanted)
            s_keep = svec[:, keep]
            tail = coeffs[j : basis.size, :j] @ s_keep
            basis.restart(torch.from_numpy(np.ascontiguousarray(s_keep)), j)
            p, rest = keep.size, tail.shape[0]
            coeffs[:] = 0.0
            coeffs[:p, :p] = np.diag(theta[keep])
            coeffs[p : p + rest, :p] = tail
            j = p
    if used == 0:
        raise ValueError("start: no nonzero start vector and no matvec budget")

    def collect(end: str) -> tuple[Tensor, Tensor, Tensor]:
        idx = _pick(theta.size, k, end)
        s = torch.from_numpy(np.ascontiguousarray(svec[:, idx]))
        vecs = basis.combine(s, j)
        scale = row_norms(vecs).clamp_min(1e-30).to(vecs.dtype)
        vecs = vecs / scale[:, None]
        vecs = vecs.to(op_dtype)
        return torch.from_numpy(theta[idx].copy()), vecs, torch.from_numpy(res[idx].copy())

    return KrylovResult(
        largest=collect("largest") if "largest" in wanted else None,
        smallest=collect("smallest") if "smallest" in wanted else None,
        n_matvec=used,
        converged=converged,
        ritz_values=torch.from_numpy(theta.copy()),
        basis_size=basis.size,
        peak_device_vectors=basis.peak_device_vectors,
    )


def lanczos_tridiagonal(
    matmat: Callable[[Tensor], Tensor], starts: Tensor, n_iter: int, *, local: bool = False
) -> tuple[list[Tensor], list[Tensor], int]:
    """``n_iter``-step Lanczos from each row of ``starts`` (unit norm), in lock step.

    ``matmat`` maps a ``(b, n)`` block to its images. Each run keeps its own basis and is
    fully re-orthogonalised against it (:func:`orthogonalize`). A run stops early at breakdown
    (``beta_j <= residual_floor * ||A||_est``: an invariant Krylov subspace, whose Ritz
    values are then exact). Returns per run the diagonal ``alpha`` (float64, length m_l)
    and off-diagonal ``beta`` (length m_l - 1), and the number of matvecs used. The
    bases are kept in :func:`work_dtype` of ``starts``; ``matmat`` gets the starts' dtype.

    ``local=True`` keeps only each run's last two vectors and re-orthogonalises against
    those (local re-orthogonalisation: Parlett, *The Symmetric Eigenvalue Problem*,
    ch. 13), so a run holds two vectors whatever ``n_iter``. Orthogonality to older vectors
    is then lost as Ritz values converge (Paige 1976), and a converged eigenvalue comes
    back as a near-copy ("ghost") that shares its quadrature weight; the Gauss quadrature
    of the tridiagonal stays accurate, as that of exact Lanczos on a matrix whose
    eigenvalues lie in tiny clusters around those of ``A`` (Greenbaum 1989; Knizhnerman
    1996). This is what stochastic Lanczos quadrature needs (docs/curvature.md,
    "Spectral density"); the runs' first two steps are bitwise those of ``local=False``.
    """
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    b, n = starts.shape
    n_iter = min(n_iter, n)
    keep = min(2, n_iter) if local else n_iter  # basis rows each run holds
    op_dtype = starts.dtype
    starts = starts.to(work_dtype(op_dtype))
    floor_rel = residual_floor(starts.dtype)
    bases = torch.zeros((b, keep, n), dtype=starts.dtype, device=starts.device)
    bases[:, 0] = starts / row_norms(starts).to(starts.dtype)[:, None]
    alphas: list[list[float]] = [[] for _ in range(b)]
    betas: list[list[float]] = [[] for _ in range(b)]
    active = list(range(b))
    norm_est = 0.0
    used = 0
    for step in range(n_iter):
        if not active:
            break
        at = min(step, keep - 1)  # the row of the vector multiplied at this step
        cur = bases[active, at]
        out = matmat(cur.to(op_dtype)).to(bases.dtype)
        used += len(active)
        norm_est = max(norm_est, finite_product(float(row_norms(out).max())))
        still = []
        for row, run in enumerate(active):
            w = out[row]
            q = bases[run, : at + 1]
            a = float(dots(w, bases[run, at]))
            alphas[run].append(a)
            w, _, beta = orthogonalize(q, w, near=at)
            if step + 1 < n_iter and beta > floor_rel * norm_est and beta > 0:
                betas[run].append(beta)
                if at + 1 == keep:  # local: drop the oldest of the two rows
                    bases[run, 0] = bases[run, 1]
                    bases[run, at] = w / beta
                else:
                    bases[run, at + 1] = w / beta
                still.append(run)
        active = still
    alpha_t = [torch.tensor(a, dtype=torch.float64) for a in alphas]
    beta_t = [torch.tensor(bt, dtype=torch.float64) for bt in betas]
    return alpha_t, beta_t, used


def krylov_basis(
    matvec: Callable[[Tensor], Tensor], start: Tensor, m: int
) -> tuple[Tensor, Tensor, int]:
    """Orthonormal basis ``Q`` (rows) of the Krylov space ``K_m(A, start)`` and ``diag(Q A Q^T)``.

    ``m`` Lanczos steps with full re-orthogonalisation; step ``j`` multiplies ``q_j`` and
    records ``alpha_j = q_j^T A q_j`` (float64), so ``sum(alpha) = tr(Q A Q^T)`` exactly --
    the part of ``tr(A)`` on the span of ``Q``. Stops early at an invariant subspace
    (then ``tr(Q A Q^T)`` is the trace of ``A`` on it). Returns ``(Q, alpha, matvecs)``
    with ``Q`` of shape ``(matvecs, n)`` in :func:`work_dtype` of ``start``.
    """
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    n = start.numel()
    m = min(m, n)
    op_dtype = start.dtype
    start = start.to(work_dtype(op_dtype))
    floor_rel = residual_floor(start.dtype)
    rows = torch.empty((m, n), dtype=start.dtype, device=start.device)
    rows[0] = start / row_norms(start).to(start.dtype)  # a device scalar: true division
    alphas = torch.zeros(m, dtype=torch.float64)
    norm_est = 0.0
    for j in range(m):
        w = matvec(rows[j].to(op_dtype)).to(rows.dtype)
        norm_est = max(norm_est, finite_product(flat_norm(w)))
        alphas[j] = float(dots(rows[j], w))
        if j + 1 == m:
            break
        w, _, beta = orthogonalize(rows[: j + 1], w, near=j)
        if not (beta > floor_rel * norm_est and beta > 0):
            return rows[: j + 1], alphas[: j + 1], j + 1
        rows[j + 1] = w / beta
    return rows, alphas, m
