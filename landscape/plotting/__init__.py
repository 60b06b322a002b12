"""Matplotlib figures: metric timelines, loss surfaces and the Hessian's eigenvalue density.

:mod:`.timelines`, :mod:`.compare` (several runs on one figure), :mod:`.surfaces` and
:mod:`.spectra`.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (Agg), so it
works headless; save it with ``fig.savefig(...)`` or :func:`save_figure`.
"""

from landscape.plotting.compare import comparison
from landscape.plotting.spectra import density
from landscape.plotting.surfaces import contour, contourf, curve, export_vtk, surface3d
from landscape.plotting.timelines import figure_png, save_figure, timeline

__all__ = [
    # timelines
    "figure_png",
    "save_figure",
    "timeline",
    "comparison",
    # surfaces
    "contour",
    "contourf",
    "curve",
    "export_vtk",
    "surface3d",
    # spectra
    "density",
]
