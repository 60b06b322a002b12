"""The Hessian's eigenvalue density, as PyHessian's ``get_esd_plot`` draws it.

Stochastic Lanczos quadrature (Ghorbani et al. 2019, arXiv:1901.10159, Sec. 3) gives nodes
``x_k`` and weights ``w_k``; the density is their Gaussian smoothing
``sum_k w_k N(t; x_k, sigma^2)`` (:func:`landscape.curvature.spectrum.smoothed_density`, the
convention of :func:`landscape.curvature.spectral_density`), drawn on a logarithmic y axis
so that the outliers' small mass stays visible next to the bulk near zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from landscape.store import Run

__all__ = ["density", "density_of_row", "is_density"]

_FLOOR = 1e-12  # the smallest density drawn on the log axis (the Gaussian tails underflow)


def is_density(run: Run, metric: str) -> bool:
    """Whether ``metric``'s rows are quadrature nodes and weights (``spectral_density``)."""
    return {"nodes", "weights"} <= set(run.fields(metric))


def density_of_row(
    run: Run, step: int | None = None, *, metric: str = "spectral_density", points: int = 1000,
    sigma: float | None = None,
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The density a run's ``spectral_density`` row at ``step`` gives.

    Without ``step``: the last row with a finite node (a failed measurement, or a diverged
    model, writes a row of NaN).

    Returns:
        ``(step, grid, density, nodes, weights)``: the density on ``points`` grid points,
        smoothed as :func:`landscape.curvature.spectral_density` smooths it
        (:func:`~landscape.curvature.spectrum.smoothed_density`), and the row's finite
        nodes and their weights.

    Raises:
        ValueError: no such row, or a row without a finite node (a failed measurement).
    """
    steps, nodes = run.series(metric, "nodes")
    _, weights = run.series(metric, "weights")
    if not len(steps):
        raise ValueError(f"{metric}: no rows in {run.source}")
    if step is None:
        finite = [i for i in range(len(steps)) if np.isfinite(nodes[i]).any()]
        at = finite[-1] if finite else len(steps) - 1
    else:
        hits = np.flatnonzero(steps == step).tolist()
        if not hits:
            raise ValueError(f"{metric}: no row at step {step} (rows at {steps[0]}.."
                             f"{steps[-1]})")
        at = hits[0]
    x = np.asarray(nodes[at], dtype=np.float64).reshape(-1)
    w = np.asarray(weights[at], dtype=np.float64).reshape(-1)
    keep = np.isfinite(x) & np.isfinite(w)
    x, w = x[keep], w[keep]
    if not x.size:
        raise ValueError(f"{metric}: the row at step {int(steps[at])} holds no finite node")
    import torch  # here: the figures and the report start without torch's second of import

    from landscape.curvature.spectrum import smoothed_density

    grid, rho, _ = smoothed_density(torch.from_numpy(x), torch.from_numpy(w), grid=int(points),
                                    sigma=sigma)
    return int(steps[at]), grid.numpy(), rho.numpy(), x, w


def density(
    source: Any, step: int | None = None, *, figsize: tuple[float, float] = (6.0, 4.0),
    **row: Any,
) -> Figure:
    """The eigenvalue density against the eigenvalue, log y axis, nodes marked below.

    Args:
        source: a :class:`~landscape.curvature.DensityResult` (``spectral_density``'s), or a
            run (a :class:`~landscape.store.Run` or a path) whose ``spectral_density`` row
            at ``step`` (default: the last) is drawn.
        step: the run's row.
        figsize: the figure's size in inches.
        **row: ``metric``, ``points``, ``sigma`` for :func:`density_of_row`.

    Returns:
        The figure.
    """
    title = "eigenvalue density"
    if hasattr(source, "density") and hasattr(source, "grid"):
        grid = np.asarray(source.grid, dtype=np.float64)
        rho = np.asarray(source.density, dtype=np.float64)
        nodes = np.asarray(source.nodes, dtype=np.float64).reshape(-1)
        nodes = nodes[np.isfinite(nodes)]
    else:
        run = source if isinstance(source, Run) else Run.open(source)
        try:
            at, grid, rho, nodes, _ = density_of_row(run, step, **row)
        finally:
            if run is not source:
                run.close()
        title += f" at step {at}"
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    ax.semilogy(grid, np.maximum(rho, _FLOOR), color="C0")
    ax.plot(nodes, np.full(nodes.shape, _FLOOR), "|", color="C1", markersize=10,
            label="quadrature nodes")
    ax.set_ylim(bottom=_FLOOR / 2)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log)")
    ax.set_title(title)
    ax.legend(loc="upper right")
    return fig
