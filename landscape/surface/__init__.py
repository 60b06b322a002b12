"""Loss landscapes: directions, resumable 1-D/2-D grids, PCA trajectories, interpolation.

Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets" (arXiv:1712.09913); the
definitions and the user guide are in docs/surfaces.md::

    import landscape as ls
    surf = ls.surface.plane(model, loss_fn, (x, y), steps=51, span=1.0, writer="run.h5")
    line = ls.surface.interpolate(model, "a.pt", "b.pt", loss_fn, (x, y))
"""

from landscape.store import SurfaceData
from landscape.surface.api import interpolate, line, plane, project, trajectory_plane
from landscape.surface.directions import (
    Directions,
    as_directions,
    eigen_directions,
    normalize_direction,
    random_directions,
)
from landscape.surface.grid import axis, evaluate_grid
from landscape.surface.pca import PCAResult, pca_directions, trajectory_from_run

__all__ = [
    "Directions",
    "PCAResult",
    "SurfaceData",
    "as_directions",
    "axis",
    "eigen_directions",
    "evaluate_grid",
    "interpolate",
    "line",
    "normalize_direction",
    "pca_directions",
    "plane",
    "project",
    "random_directions",
    "trajectory_from_run",
    "trajectory_plane",
]
