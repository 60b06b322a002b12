"""Figures of stored loss surfaces: 1-D curves, contours with trajectories, 3-D views, VTK.

Every function takes a :class:`~landscape.store.SurfaceData` (what ``landscape.surface``
returns and ``Run.surface(name)`` reads back), or a run (a path or an open ``Run``) plus the
surface name. Grids are ``(ny, nx)`` with ``Z[j, i] = f(x_i, y_j)`` (docs/surfaces.md, Grids),
so ``x`` runs along the horizontal axis for square and non-square grids alike. Points not yet
computed are masked. Figures are built with :class:`matplotlib.figure.Figure` (no pyplot, no GUI
backend), as in Li et al. 2018 (arXiv:1712.09913), Figs. 1-9: curves, contour lines, filled
contours, 3-D surfaces; the VTK file opens in ParaView like the reference code's ``h52vtp``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from landscape._files import write_whole
from landscape.plotting.timelines import spans_decades
from landscape.store import Run, SurfaceData, refuse_to_overwrite_hdf5

__all__ = ["contour", "contourf", "curve", "export_vtk", "load_surface", "surface3d"]


def load_surface(surface: Any, name: str | None = None) -> SurfaceData:
    """A ``SurfaceData`` from itself, or from a run (path or ``Run``) and a surface name."""
    if isinstance(surface, SurfaceData):
        return surface
    if isinstance(surface, Run):
        return surface.surface(_pick(surface, name))
    if isinstance(surface, (str, os.PathLike)):
        with Run.open(surface) as run:
            return run.surface(_pick(run, name))
    raise ValueError(f"surface: expected SurfaceData, a Run or a run path, got "
                     f"{type(surface).__name__}")


def _pick(run: Run, name: str | None) -> str:
    if name is not None:
        return name
    names = run.surfaces()
    if len(names) != 1:
        raise ValueError(f"name: the run holds {len(names)} surfaces ({', '.join(names)}); "
                         "say which")
    return names[0]


def _values(surf: SurfaceData, field: str, log: bool, vmax: float | None) -> np.ndarray:
    if field not in surf.values:
        raise ValueError(f"field: surface {surf.name!r} has no {field!r} "
                         f"(fields: {', '.join(surf.values)})")
    z = np.array(surf.values[field], dtype=np.float64)
    z[~surf.done] = np.nan
    if vmax is not None:
        z = _clip(z, vmax)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(z > 0, np.log10(np.where(z > 0, z, 1.0)), np.nan)
    return z


def _clip(z: np.ndarray, limit: float) -> np.ndarray:
    """``z`` with finite values above ``limit`` set to it; an overflow (inf) stays a gap."""
    return np.where(np.isfinite(z), np.minimum(z, limit), z)


AUTO = "auto"
"""``vmax="auto"``: clip at :func:`outlier_fence` when values lie beyond it (the default)."""

FAR_OUT = 3.0
"""Interquartile ranges above the upper quartile where :func:`outlier_fence` sits."""

FAR_BEYOND = 10.0
"""How far beyond the fence the largest value must lie for :func:`outlier_fence` to clip."""


def outlier_fence(z: np.ndarray) -> float | None:
    """Where a surface's values stop being its landscape and become a diverged region.

    Tukey's "far out" fence, the upper quartile plus :data:`FAR_OUT` interquartile ranges
    of the finite values (Tukey 1977, *Exploratory Data Analysis*, ch. 2), used only when
    the largest value lies :data:`FAR_BEYOND` times beyond it (measured from the smallest
    value): a loss that explodes by orders of magnitude in a corner, which drawn to scale
    leaves the rest one flat colour. A steep bowl (``|t|^8``, ``exp(4 t^2)``) reaches past
    the fence by a small factor and is drawn whole.

    Args:
        z: the values as drawn (``log10`` of them on a log plot).

    Returns:
        The fence when clipping there helps, else None (nothing far beyond it, fewer than
        four finite values, half of them equal, or a field within [0, 1] such as an
        accuracy, which cannot explode).
    """
    finite = z[np.isfinite(z)]
    if finite.size < 4:
        return None
    low, high = float(finite.min()), float(finite.max())
    if low >= 0.0 and high <= 1.0:
        return None
    q1, q3 = np.percentile(finite, [25.0, 75.0])
    if not q3 > q1:
        return None
    fence = float(q3 + FAR_OUT * (q3 - q1))
    return fence if high - low > FAR_BEYOND * (fence - low) else None


def _log_scale(
    surf: SurfaceData, field: str, log: bool | None, vmax: Any, levels: Any = None
) -> bool:
    """``log``; for None, whether the default picture is drawn on a log10 scale.

    A trained model's basin sits orders of magnitude below the loss at the grid's edges
    (0.01 against 69 on a digits CNN at span 1): evenly spaced contour levels from the
    minimum to the maximum leave it one blank region, while log10 resolves it. So with
    the default ``vmax="auto"``, a field whose values are positive and span two decades
    (:func:`~landscape.plotting.timelines.spans_decades`) is drawn as log10, unless a
    diverged region lies far beyond the rest (:func:`outlier_fence`), which the linear
    picture clips instead. A value at or below zero keeps the scale linear (log10 would
    leave it out), and so do a ``vmax`` given (a number, or None: to scale), contour
    ``levels`` given as values (in the field's units) and an accuracy (bounded by 1).
    """
    if log is not None:
        return bool(log)
    if not (isinstance(vmax, str) and vmax == AUTO) or field == "accuracy" \
            or not isinstance(levels, (int, type(None))):
        return False
    raw = _values(surf, field, False, None)
    return outlier_fence(raw) is None and spans_decades(raw)


def _drawn(
    surf: SurfaceData, field: str, log: bool, vmax: float | str | None
) -> tuple[np.ndarray, float | None]:
    """The values to draw and the value they are clipped at (None: not clipped)."""
    if isinstance(vmax, str):
        if vmax != AUTO:
            raise ValueError(f"vmax: expected a number, {AUTO!r} or None, got {vmax!r}")
        z = _values(surf, field, log, None)
        fence = outlier_fence(z)
        return (z, None) if fence is None else (_clip(z, fence), fence)
    if vmax is not None:  # a clip at or below every value would draw one flat colour
        raw = _values(surf, field, False, None)
        finite = raw[np.isfinite(raw)]
        if finite.size and vmax <= finite.min():
            raise ValueError(f"vmax {vmax:g} is at or below the smallest {field} "
                             f"({finite.min():.4g}): nothing would be drawn; give a value "
                             f"between {finite.min():.4g} and {finite.max():.4g}")
    z = _values(surf, field, log, vmax)
    if vmax is None:
        return z, None
    return z, (float(np.log10(vmax)) if vmax > 0 else None) if log else float(vmax)


def _diverged(surf: SurfaceData, field: str) -> np.ndarray:
    """Computed points whose value is not finite (the loss overflowed there)."""
    return surf.done & ~np.isfinite(np.asarray(surf.values[field], dtype=np.float64))


def _not_positive(surf: SurfaceData, field: str) -> np.ndarray:
    """Computed points whose value is at or below zero: no log10 (a log plot's gaps)."""
    z = np.asarray(surf.values[field], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return surf.done & np.isfinite(z) & (z <= 0)


def _clip_note(surf: SurfaceData, field: str, log: bool, clipped: float | None) -> str:
    """``"clipped at V (max M)"`` when values were clipped, else ``""``."""
    if clipped is None:
        return ""
    z = _values(surf, field, log, None)
    finite = z[np.isfinite(z)]
    if not finite.size or float(finite.max()) <= clipped:
        return ""
    return f"clipped at {clipped:.3g} (max {float(finite.max()):.3g})"


def _labels(surf: SurfaceData) -> tuple[str, str]:
    d = surf.attrs.get("directions", {})
    kind = d.get("kind", "custom")
    if kind == "pca":
        r = surf.attrs.get("explained_variance_ratio") or d.get("explained_variance_ratio", [])
        names = [f"PC{k + 1}" + (f" ({100 * r[k]:.1f}% of variance)" if k < len(r) else "")
                 for k in range(2)]
        return names[0], names[1]
    if kind == "eigen":
        ev = d.get("eigenvalues", [])
        names = [f"Hessian eigenvector {k + 1}" + (f" (λ={ev[k]:.3g})" if k < len(ev) else "")
                 for k in range(2)]
        return names[0], names[1]
    if kind == "interpolation":
        return "α  (0: θ_a, 1: θ_b)", ""
    norm = d.get("normalization", "none")
    what = [] if kind in ("random", "custom") else [f"{kind} direction"]  # a kind of its own
    what += [f"{norm}-normalized"] if norm not in ("none", None) else []
    suffix = "".join(f", {w}" for w in what)
    return f"α  (along δ{suffix})", f"β  (along η{suffix})"


def _title(surf: SurfaceData, field: str, log: bool, clipped: float | None = None) -> str:
    """The surface and field, and below them what the picture leaves out, if anything."""
    notes = []
    done, total = int(surf.done.sum()), int(surf.done.size)
    if done < total:  # an interrupted or still-running grid: say how much the gaps hide
        notes.append(f"{done} of {total} points computed")
    diverged = int(_diverged(surf, field).sum())
    if diverged:
        notes.append(f"{diverged} non-finite")
    if log:
        below = int(_not_positive(surf, field).sum())
        if below:
            notes.append(f"{below} at or below 0, left out of the log scale")
    raw = _values(surf, field, False, None)
    finite = raw[np.isfinite(raw)]
    if finite.size > 1 and float(finite.min()) == float(finite.max()):
        notes.append(f"constant: {field} {float(finite[0]):.6g} at every computed point")
    clip = _clip_note(surf, field, log, clipped)
    if clip:
        notes.append(clip)
    title = f"{surf.name}: {'log10 ' if log else ''}{field}"
    lines: list[str] = []
    for note in notes:  # a note is never split; a line holds those that fit 50 characters
        if lines and len(lines[-1]) + 2 + len(note) <= 50:
            lines[-1] += "; " + note
        else:
            lines.append(note)
    return "\n".join([title, *lines])


_NONFINITE_COLOR = "#7f0000"  # as the timelines' non-finite ticks


def _mark_points(ax, surf: SurfaceData, field: str, log: bool) -> bool:
    """Mark the grid points a 2-D picture leaves blank, and the minimum; True if any."""
    assert surf.y is not None
    X, Y = np.meshgrid(surf.x, surf.y)
    marked = False
    raw = np.asarray(surf.values[field], dtype=np.float64)
    raw = np.where(surf.done & np.isfinite(raw), raw, np.nan)
    # the minimum of a loss (of an accuracy, the worst point: not marked)
    if field != "accuracy" and np.isfinite(raw).sum() > 1 and np.nanmin(raw) < np.nanmax(raw):
        j, i = np.unravel_index(int(np.nanargmin(raw)), raw.shape)
        if (surf.x[i], surf.y[j]) != (0.0, 0.0):  # the centre's "+" is drawn anyway
            # drawn whole also on the grid's edge (a PCA plane's minimum often is)
            ax.plot(X[j, i], Y[j, i], ls="none", marker="*", ms=11, color="w", mec="k",
                    mew=0.8, clip_on=False, zorder=5,
                    label=f"minimum ({float(raw[j, i]):.3g})")
            marked = True
    if log:
        below = _not_positive(surf, field)
        if below.any():
            ax.plot(X[below], Y[below], ls="none", marker="v", ms=4, color="0.35",
                    label="≤ 0 (not on the log scale)")
            marked = True
    pending = ~surf.done
    if pending.any():
        ax.plot(X[pending], Y[pending], ls="none", marker=".", ms=2.5, color="0.6",
                label="not computed")
        marked = True
    diverged = _diverged(surf, field)
    if diverged.any():
        ax.plot(X[diverged], Y[diverged], ls="none", marker="x", ms=5, mew=1.2,
                color=_NONFINITE_COLOR, label="non-finite")
        marked = True
    return marked


def curve(
    surface: Any,
    field: str = "loss",
    *,
    name: str | None = None,
    log: bool | None = None,
    vmax: float | str | None = AUTO,
    accuracy: bool = True,
    figsize: tuple[float, float] = (6.0, 4.0),
) -> Figure:
    """A 1-D surface as a curve; the accuracy (if stored) on a second axis, dashed.

    ``vmax`` clips large values: a number, ``"auto"`` (default: at :func:`outlier_fence`
    when values lie beyond it) or None. Clipped points are drawn as triangles at the
    limit, non-finite ones as ticks along the bottom. ``log``: log10 of the values; None
    (default): when they are positive, span two decades and no diverged end is clipped
    (:func:`_log_scale`).
    """
    surf = load_surface(surface, name)
    if surf.ndim != 1:
        raise ValueError(f"curve: surface {surf.name!r} is 2-D; use contour or surface3d")
    log = _log_scale(surf, field, log, vmax)
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    z, clipped = _drawn(surf, field, log, vmax)
    ax.plot(surf.x, z, color="C0", marker="." if len(surf.x) <= 60 else None, label=field)
    if clipped is not None:
        unclipped = _values(surf, field, log, None)
        above = np.isfinite(unclipped) & (unclipped > clipped)
        if above.any():
            ax.plot(surf.x[above], z[above], ls="none", marker="^", ms=6, color="C0",
                    label=f"above {clipped:.3g}")
    diverged = _diverged(surf, field)
    if diverged.any():
        ax.plot(surf.x[diverged], np.zeros(int(diverged.sum())), ls="none", marker="|",
                ms=10, color=_NONFINITE_COLOR, transform=ax.get_xaxis_transform(),
                clip_on=False, label="non-finite")
    ax.set_xlabel(_labels(surf)[0])
    ax.set_ylabel(("log10 " if log else "") + field, color="C0")
    ax.set_title(_title(surf, field, log, clipped))
    if surf.attrs.get("directions", {}).get("kind") == "interpolation":
        for a in (0.0, 1.0):
            ax.axvline(a, color="0.6", lw=0.8, ls=":")
    axes = [ax]
    if accuracy and field != "accuracy" and "accuracy" in surf.values:
        ax2 = ax.twinx()
        ax2.plot(surf.x, _values(surf, "accuracy", False, None), color="C1", ls="--",
                 label="accuracy")
        ax2.set_ylabel("accuracy", color="C1")
        ax2.set_ylim(-0.02, 1.02)
        axes.append(ax2)
    # the labelled lines of both axes (an interpolation's unlabelled lines at alpha 0 and 1
    # had made a legend of the loss alone, without the accuracy of the second axis)
    lines = [ln for a in axes for ln in a.get_lines() if not ln.get_label().startswith("_")]
    if len(lines) > 1:
        ax.legend(lines, [ln.get_label() for ln in lines], loc="upper left", fontsize=8)
    return fig


def _trajectory(surf: SurfaceData, trajectory: Any) -> np.ndarray | None:
    if trajectory is None or trajectory is False:
        return None
    if trajectory is True or (isinstance(trajectory, str) and trajectory == "auto"):
        path = surf.arrays.get("trajectory")
        return None if path is None else np.asarray(path, dtype=np.float64)[:, :2]
    path = np.asarray(trajectory, dtype=np.float64)
    if path.ndim != 2 or path.shape[1] < 2:
        raise ValueError("trajectory: expected a (T, 2) array of plane coordinates")
    return path[:, :2]


def contour(
    surface: Any,
    field: str = "loss",
    *,
    name: str | None = None,
    filled: bool = False,
    levels: int | np.ndarray = 30,
    trajectory: Any = "auto",
    log: bool | None = None,
    vmax: float | str | None = AUTO,
    figsize: tuple[float, float] = (6.0, 5.0),
) -> Figure:
    """Contour lines or filled contours (``filled=True``) of a 2-D surface, with a colour bar.

    ``trajectory``: ``"auto"`` overlays the projected path stored with the surface (PCA
    planes), or give a ``(T, 2)`` array of plane coordinates; ``None`` for none. The path is
    drawn from its first point (open circle) to its last (filled). ``vmax`` clips large
    values (as the reference code's ``--vmax``): a number, ``"auto"`` (default: at
    :func:`outlier_fence` when values lie beyond it, so a diverged corner does not leave
    the rest of the plane one colour) or None; ``log`` plots ``log10`` (None, the default:
    when the values are positive and span two decades and ``vmax`` clips nothing, so the
    basin of a trained model gets levels of its own; :func:`_log_scale`). Points not
    computed (grey dots), points whose value is not finite (crosses), the minimum (a star)
    and, on a log scale, points at or below zero (triangles) are marked; a constant surface
    says so in its title.
    """
    surf = load_surface(surface, name)
    if surf.ndim != 2:
        raise ValueError(f"contour: surface {surf.name!r} is 1-D; use curve")
    assert surf.y is not None
    log = _log_scale(surf, field, log, vmax, levels)
    drawn, clipped = _drawn(surf, field, log, vmax)
    z = np.ma.masked_invalid(drawn)
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    if z.count() >= 4 and np.ptp(z.compressed()) > 0:
        label = ("log10 " if log else "") + field
        # clipped only where a value was: a --vmax above the largest clips nothing
        said = _clip_note(surf, field, log, clipped)
        if filled:
            cs = ax.contourf(surf.x, surf.y, z, levels=levels, cmap="viridis",
                             extend="max" if said else "neither")
        else:
            cs = ax.contour(surf.x, surf.y, z, levels=levels, cmap="viridis", linewidths=0.9)
            labelled = cs.levels[:: max(1, len(cs.levels) // 8)]
            ax.clabel(cs, labelled, inline=True, fontsize=7, fmt=level_format(labelled))
        fig.colorbar(cs, ax=ax, label=f"{label} (clipped)" if said else label)
    elif z.count() and np.ptp(z.compressed()) == 0:  # one value: no level, say so there
        ax.text(0.5, 0.5, f"{field} {float(z.compressed()[0]):.6g} at every computed point",
                transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.3")
    ax.plot([0.0], [0.0], marker="+", color="k", ms=9, ls="none", label="center")
    legend = _mark_points(ax, surf, field, log)
    path = _trajectory(surf, trajectory)
    if path is not None and len(path):
        ax.plot(path[:, 0], path[:, 1], color="C3", lw=1.2, marker=".", ms=4, label="trajectory")
        ax.plot(path[0, 0], path[0, 1], "o", mfc="none", mec="C3", ms=8)
        ax.plot(path[-1, 0], path[-1, 1], "o", color="C3", ms=6)
        legend = True
    if legend:  # below the axes: inside, it would hide the marks it explains
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=len(handles),
                   fontsize=8, frameon=False)
    ax.set_xlim(float(surf.x[0]), float(surf.x[-1]))
    ax.set_ylim(float(surf.y[0]), float(surf.y[-1]))
    xl, yl = _labels(surf)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title(_title(surf, field, log, clipped))
    return fig


def contourf(surface: Any, field: str = "loss", **kwargs: Any) -> Figure:
    """Filled contours: :func:`contour` with ``filled=True``."""
    return contour(surface, field, filled=True, **kwargs)


def surface3d(
    surface: Any,
    field: str = "loss",
    *,
    name: str | None = None,
    log: bool | None = None,
    vmax: float | str | None = AUTO,
    elev: float = 35.0,
    azim: float = -60.0,
    figsize: tuple[float, float] = (7.0, 5.5),
) -> Figure:
    """A 2-D surface as a 3-D plot (``meshgrid(x, y)``, so x stays the first axis).

    ``vmax`` clips large values and ``log`` draws log10, as in :func:`contour` (defaults
    ``"auto"`` and None).
    """
    surf = load_surface(surface, name)
    if surf.ndim != 2:
        raise ValueError(f"surface3d: surface {surf.name!r} is 1-D; use curve")
    assert surf.y is not None
    log = _log_scale(surf, field, log, vmax)
    z, clipped = _drawn(surf, field, log, vmax)
    X, Y = np.meshgrid(surf.x, surf.y)  # (ny, nx), like z
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(X, Y, np.ma.masked_invalid(z), cmap="viridis", linewidth=0,
                    antialiased=True, rcount=min(100, z.shape[0]), ccount=min(100, z.shape[1]))
    ax.view_init(elev=elev, azim=azim)
    xl, yl = _labels(surf)
    ax.set_xlabel(xl, fontsize=8)
    ax.set_ylabel(yl, fontsize=8)
    ax.set_zlabel(("log10 " if log else "") + field)
    ax.set_title(_title(surf, field, log, clipped))
    return fig


def level_format(levels: Any) -> str:
    """A ``%g`` format with enough significant digits to tell ``levels`` apart (3 at least).

    ``%.3g`` labelled every contour of a surface between 3.7479 and 3.7511 "3.75".
    """
    values = [float(v) for v in np.asarray(levels, dtype=float).ravel()]
    for digits in range(3, 16):
        if len({f"{v:.{digits}g}" for v in values}) == len(set(values)):
            return f"%.{digits}g"
    return "%.16g"


def _fmt(v: float) -> str:
    return f"{v:.9g}" if math.isfinite(v) else "0"


def export_vtk(
    surface: Any,
    path: str | os.PathLike,
    field: str = "loss",
    *,
    name: str | None = None,
    log: bool = False,
    zmax: float | str | None = AUTO,
    height: bool = True,
) -> Path:
    """Write a surface as a legacy ASCII VTK structured grid (opens in ParaView).

    Points are ``(x_i, y_j, z)`` with ``x`` varying fastest (VTK's order), ``z`` the value
    (``height=False``: 0, a flat sheet); ``zmax`` clips the height as ``vmax`` clips the
    plots (a number, ``"auto"``, the default: at :func:`outlier_fence` when a diverged
    region lies far beyond the rest, or None), points not computed sit at the largest
    finite height. Every stored field is attached as point data, so ParaView can
    colour by loss or accuracy; no NaN is written (not every VTK reader parses it): values
    not computed or not finite take the field's largest finite value, and the ``computed``
    array (1/0: evaluated) and the ``finite`` array (1/0: ``field``'s value is a number, 0
    for a diverged point that was computed) tell them apart. A 1-D surface becomes a curve
    (``DIMENSIONS nx 1 1``).
    """
    surf = load_surface(surface, name)
    z, _ = _drawn(surf, field, log, zmax)
    ys = surf.y if surf.y is not None else np.zeros(1)
    Z = z.reshape(len(ys), len(surf.x))
    finite = Z[np.isfinite(Z)]
    fill = float(finite.max()) if finite.size else 0.0
    heights = np.where(np.isfinite(Z), Z, fill) if height else np.zeros_like(Z)
    n = Z.size
    lines = [
        "# vtk DataFile Version 3.0",
        f"landscape surface {surf.name} ({'log10 ' if log else ''}{field})",
        "ASCII",
        "DATASET STRUCTURED_GRID",
        f"DIMENSIONS {len(surf.x)} {len(ys)} 1",
        f"POINTS {n} double",
    ]
    for j, yv in enumerate(ys):
        for i, xv in enumerate(surf.x):
            lines.append(f"{_fmt(float(xv))} {_fmt(float(yv))} {_fmt(float(heights[j, i]))}")
    lines.append(f"POINT_DATA {n}")
    for fname in surf.values:
        vals = _values(surf, fname, log and fname == field, None).reshape(-1)
        ok = vals[np.isfinite(vals)]
        vals = np.where(np.isfinite(vals), vals, float(ok.max()) if ok.size else 0.0)
        lines += [f"SCALARS {fname} double 1", "LOOKUP_TABLE default"]
        lines += [_fmt(float(v)) for v in vals]
    lines += ["SCALARS computed int 1", "LOOKUP_TABLE default"]
    lines += [str(int(v)) for v in surf.done.reshape(-1)]
    lines += ["SCALARS finite int 1", "LOOKUP_TABLE default"]
    lines += [str(int(v)) for v in np.isfinite(z).reshape(-1)]
    out = Path(path)
    refuse_to_overwrite_hdf5(out, "the VTK file")
    write_whole(out, "\n".join(lines) + "\n")
    return out
