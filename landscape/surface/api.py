"""One-call landscapes: a random plane or line, a PCA plane with its trajectory, an interpolation.

Each function builds :class:`~landscape.surface.directions.Directions`, chooses the grid and
calls :func:`~landscape.surface.grid.evaluate_grid`, which stores the directions and the grid in
the run file (``/surfaces/<name>``) and resumes an interrupted computation.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from itertools import chain
from typing import Any

import numpy as np
import torch
from torch import nn

from landscape._errors import LandscapeError
from landscape.findings import user_stacklevel
from landscape.loading import _strip_prefix
from landscape.params import ParamSpec
from landscape.store import Run, RunWriter, SurfaceData
from landscape.surface.directions import (
    Directions,
    as_directions,
    eigen_directions,
    random_directions,
)
from landscape.surface.grid import axis, evaluate_grid, grid_steps
from landscape.surface.pca import _load, pca_directions

__all__ = ["interpolate", "line", "plane", "project", "trajectory_plane"]

LossFn = Callable[..., torch.Tensor]


def _pair(value: Any, name: str) -> tuple[Any, Any]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name}: expected one value or a pair (x, y), got {len(value)}")
        return value[0], value[1]
    return value, value


def _directions(
    model: nn.Module, loss_fn: LossFn, data: Any, n: int, directions: Any, seed: int,
    normalization: str | None, ignore: str | None, params: ParamSpec,
    grid: Mapping[str, Any],
) -> Directions:
    random = isinstance(directions, str) and directions == "random"
    asked = {k: v for k, v in (("normalization", normalization), ("ignore", ignore))
             if v is not None and v != "none"}  # ("none": what the others get anyway)
    if not random and asked:
        # eigenvectors are unit vectors of the Hessian, and given directions are the
        # caller's: normalizing them would make them other directions
        kind = repr(directions) if isinstance(directions, str) else "given directions"
        raise ValueError(f"{next(iter(asked))}= applies to random directions only, not to "
                         f"{kind} (used as they are); to normalize others, build them with "
                         "eigen_directions(..., normalization=...) or as_directions(..., "
                         "normalization=...)")
    if isinstance(directions, Directions):
        if directions.ndim != n:
            raise ValueError(f"directions: {directions.ndim} given, {n} needed")
        return directions
    if isinstance(directions, str):
        if directions == "random":
            return random_directions(
                model, n, seed=seed,
                normalization="filter" if normalization is None else normalization,
                ignore="biasbn" if ignore is None else ignore, params=params)
        if directions == "eigen":
            # the Hessian of the loss the grid evaluates: same closure convention and mode
            # (and the grid's distributed setting: with False, on some ranks alone, the
            # Hessian all-reduced and waited for the others)
            return eigen_directions(model, loss_fn, data, n, params=params,
                                    closure=grid.get("closure"),
                                    eval_mode=grid.get("eval_mode", True),
                                    distributed=grid.get("distributed"),
                                    batch_size=grid.get("batch_size"),
                                    progress=grid.get("progress", True))
        raise ValueError(f"directions must be 'random', 'eigen' or vectors, got {directions!r}")
    vecs = list(directions)
    if len(vecs) != n:
        raise ValueError(f"directions: {len(vecs)} vectors given, {n} needed")
    return as_directions(model, vecs)


def plane(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    steps: int | tuple[int, int] = 51,
    span: float | tuple[float, float] = 1.0,
    *,
    x: Sequence[float] | None = None,
    y: Sequence[float] | None = None,
    directions: Any = "random",
    seed: int = 0,
    normalization: str | None = None,
    ignore: str | None = None,
    params: ParamSpec = None,
    writer: Any = None,
    name: str = "plane",
    **kwargs: Any,
) -> SurfaceData:
    """The loss on the plane ``theta* + alpha delta + beta eta`` (Li et al. 2018, Sec. 4).

    By default ``delta``, ``eta`` are filter-normalized Gaussian directions drawn with
    ``seed`` (biases and normalization parameters not moved: ``ignore="biasbn"``;
    ``normalization`` and ``ignore`` default to ``"filter"`` and ``"biasbn"``, and apply
    to random directions only: with any other ``directions`` they raise). The grid is
    ``steps`` points on ``[-span, span]`` per axis (``steps=(nx, ny)``, ``span=(sx, sy)`` for
    a non-square grid) unless ``x``/``y`` give the coordinates. ``directions`` may also be
    ``"eigen"`` (top-2 Hessian eigenvectors), a :class:`Directions` or two vectors.
    Other keywords go to :func:`evaluate_grid` (``writer``, ``eval_mode``, ``progress``, ...).
    """
    nx, ny = _pair(steps, "steps")
    sx, sy = _pair(span, "span")
    xs = axis(nx, sx) if x is None else x
    ys = axis(ny, sy) if y is None else y
    dirs = _directions(model, loss_fn, data, 2, directions, seed, normalization, ignore, params,
                       kwargs)
    return evaluate_grid(model, loss_fn, data, dirs, xs, ys, writer=writer, name=name, **kwargs)


def line(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    steps: int = 51,
    span: float = 1.0,
    *,
    x: Sequence[float] | None = None,
    directions: Any = "random",
    seed: int = 0,
    normalization: str | None = None,
    ignore: str | None = None,
    params: ParamSpec = None,
    writer: Any = None,
    name: str = "line",
    **kwargs: Any,
) -> SurfaceData:
    """The loss along ``theta* + alpha delta`` (Li et al. 2018, Sec. 4), 1-D.

    As :func:`plane` with one direction.
    """
    xs = axis(steps, span) if x is None else x
    dirs = _directions(model, loss_fn, data, 1, directions, seed, normalization, ignore, params,
                       kwargs)
    return evaluate_grid(model, loss_fn, data, dirs, xs, None, writer=writer, name=name, **kwargs)


def _state(source: Any, what: str) -> dict[str, torch.Tensor]:
    source = _load(source)
    if isinstance(source, nn.Module):
        return {**dict(source.named_parameters()), **dict(source.named_buffers())}
    if isinstance(source, Mapping):
        return {k: v for k, v in source.items() if isinstance(v, torch.Tensor)}
    raise ValueError(f"{what}: expected a module, a state dict or a checkpoint path, "
                     f"got {type(source).__name__}")


def interpolate(
    model: nn.Module,
    theta_a: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    theta_b: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    loss_fn: LossFn,
    data: Any,
    steps: int = 51,
    *,
    bounds: tuple[float, float] = (-0.5, 1.5),
    x: Sequence[float] | None = None,
    buffers: bool = True,
    writer: Any = None,
    name: str = "interpolation",
    **kwargs: Any,
) -> SurfaceData:
    """The loss on the line ``theta(alpha) = theta_a + alpha (theta_b - theta_a)`` (1-D).

    Goodfellow et al. 2015 ("Qualitatively characterizing neural network optimization
    problems") and Li et al. 2018, Sec. 3: ``alpha = 0`` is ``theta_a``, ``alpha = 1`` is
    ``theta_b``; the direction is not normalized. ``theta_a``/``theta_b`` are modules, state
    dicts or checkpoint paths (``weights_only=True``) for ``model``'s architecture (a
    wrapper's prefix, DDP's ``module.`` or ``torch.compile``'s ``_orig_mod.``, is read away
    as :func:`landscape.loading.load_state_into` reads it); ``model``
    itself is only the architecture and is not changed. With ``buffers=True`` floating-point
    buffers (BatchNorm statistics) are interpolated as well (the reference code's
    ``dir_type='states'``). The ``steps`` points on ``bounds`` always hold ``alpha = 0`` and
    ``1`` (added where the even spacing misses them: the default 51 points on (-0.5, 1.5)
    would evaluate neither checkpoint); ``x`` overrides them. A parameter that ``model``
    does not train and that neither state holds stays at ``model``'s value.
    """
    # a DDP, compiled or Lightning model's state dict (module.fc1.weight): read as the
    # model's keys, as landscape analyze and surface read such checkpoints
    own = dict.fromkeys(k for k, _ in chain(model.named_parameters(), model.named_buffers()))
    a = _strip_prefix(_state(theta_a, "theta_a"), own)
    b = _strip_prefix(_state(theta_b, "theta_b"), own)
    # a parameter the model does not train may be left out of both states (the frozen base
    # of PEFT adapter checkpoints): it stays at the model's value, out of the direction
    named = {k: p for k, p in model.named_parameters()
             if p.requires_grad or k in a or k in b}
    missing = [k for k in named if k not in a or k not in b]
    if missing:
        raise LandscapeError(f"interpolate: checkpoints lack parameters {missing[:3]}")
    for k, p in named.items():
        if tuple(a[k].shape) != tuple(p.shape) or tuple(b[k].shape) != tuple(p.shape):
            raise LandscapeError(f"interpolate: parameter {k!r} has another shape in a checkpoint")
    names = tuple(named)
    vec = tuple((b[k].detach().to(named[k].device, named[k].dtype)
                 - a[k].detach().to(named[k].device, named[k].dtype)) for k in names)
    bnames: tuple[str, ...] = ()
    bvec: tuple[torch.Tensor, ...] = ()
    if buffers:
        bufs = dict(model.named_buffers())
        bnames = tuple(k for k, v in bufs.items()
                       if v.is_floating_point() and k in a and k in b
                       and tuple(a[k].shape) == tuple(v.shape) == tuple(b[k].shape))
        bvec = tuple((b[k].detach().to(bufs[k].device, bufs[k].dtype)
                      - a[k].detach().to(bufs[k].device, bufs[k].dtype)) for k in bnames)
    _say_fixed_buffers(model, a, b)
    if all(not bool(v.any()) for v in (*vec, *bvec)):  # a segment of length zero
        raise LandscapeError("interpolate: the two checkpoints hold the same weights (the "
                             "same file twice, or a copy): the line between them is a point")
    dirs = Directions(names, (vec,), {"kind": "interpolation", "normalization": "none",
                                      "ignore": "none", "buffers": bool(buffers)},
                      bnames, (bvec,) if bnames else ())
    if x is None:
        lo, hi = bounds
        if not hi > lo:
            raise ValueError(f"bounds must be (low, high) with low < high, got {bounds!r}")
        even = np.linspace(float(lo), float(hi), grid_steps(steps, "steps"))
        x = _holding(even, (0.0, 1.0))
        stored = _stored_x(writer, name)
        if stored is not None and stored.shape == even.shape and np.allclose(stored, even):
            x = even  # resuming a surface begun on the even grid (before 0 and 1 were added)
    return evaluate_grid(model, loss_fn, data, dirs, x, None, center=a, writer=writer,
                         name=name, **kwargs)


def _say_fixed_buffers(model: nn.Module, a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    """Warn when integer or bool buffers differ between the checkpoints of an interpolation.

    They cannot be interpolated, so every point keeps theta_a's: alpha = 1 is then not
    theta_b where the model reads them in its forward (a step counter, a mask). BatchNorm's
    ``num_batches_tracked`` is left out: it differs between any two checkpoints and is read
    only in training mode with ``momentum=None``.
    """
    fixed = [k for k, v in model.named_buffers()
             if not v.is_floating_point() and not k.endswith("num_batches_tracked")
             and isinstance(a.get(k), torch.Tensor) and isinstance(b.get(k), torch.Tensor)
             and (a[k].shape != b[k].shape or not torch.equal(a[k].cpu(), b[k].cpu()))]
    if fixed:
        shown = ", ".join(fixed[:3]) + (", ..." if len(fixed) > 3 else "")
        warnings.warn(
            f"landscape: interpolate: the integer or bool buffers {shown} differ between the "
            "checkpoints and are not interpolated: every point keeps theta_a's, so alpha = 1 "
            "is theta_b's weights with theta_a's values of them", UserWarning,
            stacklevel=user_stacklevel())


def _stored_x(writer: Any, name: str) -> np.ndarray | None:
    """The x coordinates of surface ``name`` already in ``writer`` (a path or a writer)."""
    try:
        if isinstance(writer, RunWriter):
            run = writer.run()
            return run.surface(name).x if name in run.surfaces() else None
        if isinstance(writer, (str, os.PathLike)) and os.path.exists(writer):
            with Run.open(writer) as run:
                return run.surface(name).x if name in run.surfaces() else None
    except LandscapeError:  # unreadable: evaluate_grid says so in its own words
        return None
    return None


def _holding(grid: np.ndarray, values: Sequence[float]) -> np.ndarray:
    """``grid`` holding ``values`` exactly where within its range (snapped or added)."""
    points = grid.copy()
    tol = 1e-9 * float(points[-1] - points[0])
    extra = []
    for alpha in values:
        if not points[0] - tol <= alpha <= points[-1] + tol:
            continue
        near = np.abs(points - alpha) <= tol
        if near.any():
            points[near] = alpha
        else:
            extra.append(alpha)
    return np.sort(np.concatenate([points, extra])) if extra else points


def trajectory_plane(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    trajectory: Any,
    steps: int | tuple[int, int] = 51,
    *,
    margin: float = 0.25,
    x: Sequence[float] | None = None,
    y: Sequence[float] | None = None,
    ignore: str = "biasbn",
    params: ParamSpec = None,
    writer: Any = None,
    name: str = "pca",
    **kwargs: Any,
) -> SurfaceData:
    """The loss on the plane of the top-2 principal components of a trajectory, with its path.

    Li et al. 2018, Sec. 7 (docs/surfaces.md): directions from :func:`pca_directions` over the
    trajectory (checkpoint paths, state dicts, modules, tensor tuples or a ``(T, P)`` array of
    recorded weights), centred at its last point ``theta_n``; the grid covers the projected
    path with ``margin`` (a fraction of its extent) on each side, so it is non-square in
    general, and holds the origin (the last point, added where the even spacing misses it).
    ``x``/``y`` give the coordinates instead. Stored with the surface:
    ``arrays/trajectory`` (``(T, 2)``, the path), and the explained variance (ratio) in the
    attributes.
    """
    # an axis whose coordinates are given needs no number of steps
    counts = [None if given is not None else grid_steps(n, "steps")
              for n, given in zip(_pair(steps, "steps"), (x, y))]
    if isinstance(margin, bool) or not isinstance(margin, (int, float, np.integer, np.floating)) \
            or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0 (a fraction of the path's "
                         f"extent on each side), got {margin!r}")
    if not isinstance(trajectory, (np.ndarray, torch.Tensor)):
        trajectory = list(trajectory)  # read twice: the PCA, then the last point's buffers
        if trajectory:  # a checkpoint file is loaded once for both
            trajectory[-1] = _load(trajectory[-1])
    pca = pca_directions(trajectory, 2, model=model, ignore=ignore, params=params)
    path = pca.path
    axes = []
    for k, (n, given) in enumerate(zip(counts, (x, y))):
        if n is None:
            axes.append(given)
            continue
        lo, hi = float(min(path[:, k].min(), 0.0)), float(max(path[:, k].max(), 0.0))
        width = max(hi - lo, 1e-12)
        axes.append(_holding(np.linspace(lo - margin * width, hi + margin * width, n), (0.0,)))
    final = pca.final
    center = {}
    offset = 0
    named = dict(model.named_parameters())
    for k in pca.directions.names:
        p = named[k]
        center[k] = torch.from_numpy(final[offset:offset + p.numel()]).reshape(p.shape)
        offset += p.numel()
    last = trajectory[-1] if isinstance(trajectory, list) and trajectory else None
    if isinstance(last, (str, os.PathLike, Mapping, nn.Module)):
        # the rest of theta_n (BatchNorm statistics, frozen parameters) from the checkpoint too,
        # not from whatever state `model` is in
        center = {**_state(last, "trajectory[-1]"), **center}
    else:
        _say_foreign_buffers(model, center)
    attrs = {
        **dict(kwargs.pop("attrs", None) or {}),
        "explained_variance": [float(v) for v in pca.explained_variance],
        "explained_variance_ratio": [float(v) for v in pca.explained_variance_ratio],
        "singular_values": [float(v) for v in pca.singular_values],
    }
    return evaluate_grid(model, loss_fn, data, pca.directions, axes[0], axes[1], center=center,
                         writer=writer, name=name, attrs=attrs,
                         arrays={"trajectory": path}, **kwargs)


def _say_foreign_buffers(model: nn.Module, center: Mapping[str, torch.Tensor]) -> None:
    """Warn when recorded weights meet buffers that cannot be theta_n's.

    Weights alone (a ``(T, P)`` array, flat vectors) carry no BatchNorm statistics: the plane
    reads them from ``model``. A model whose weights are theta_n's was most likely loaded
    with its state, buffers included; one whose weights differ (a fresh instance) has
    other statistics, and the loss at the origin is not theta_n's (surfaces audit: 1.32
    where theta_n's was 0.0136).
    """
    buffers = [n for n, b in model.named_buffers() if b.is_floating_point()]
    if not buffers:
        return
    named = dict(model.named_parameters())
    # a loose match: weights recorded in half precision round at 1e-3, a fresh model's
    # differ by their whole size
    if all(torch.allclose(named[k].detach().to("cpu", torch.float64), v.to(torch.float64),
                          rtol=1e-2, atol=1e-3) for k, v in center.items()):
        return
    shown = ", ".join(buffers[:3]) + (", ..." if len(buffers) > 3 else "")
    warnings.warn(
        f"landscape: trajectory_plane: the trajectory holds weights only, and the "
        f"floating-point buffers of `model` ({shown}) belong to other weights than its last "
        "point's: the plane is evaluated with them, so the loss at its origin is not the "
        "last point's. Load the last point's state into `model` first, or give the "
        "trajectory as checkpoints, whose buffers are read",
        UserWarning, stacklevel=user_stacklevel())


def project(
    points: Any, directions: Directions, center: nn.Module | Mapping[str, torch.Tensor]
) -> np.ndarray:
    """Coordinates ``(T, k)`` of parameter points in the span of ``directions`` around ``center``.

    Least squares ``min_c ||theta_e - center - sum_k c_k d_k||`` (the reference code's
    'lstsq' projection), which equals the inner products for orthonormal directions (PCA).
    ``points``: modules, state dicts or checkpoint paths.
    """
    c = _state(center, "center")
    names = directions.names
    D = torch.stack([torch.cat([t.detach().reshape(-1).double().cpu() for t in v])
                     for v in directions.vectors], dim=1)
    base = torch.cat([c[k].detach().reshape(-1).double().cpu() for k in names])
    rows = []
    for e, pt in enumerate(points):
        s = _state(pt, f"points[{e}]")
        missing = [k for k in names if k not in s]
        if missing:
            raise LandscapeError(f"points[{e}] lacks parameters {missing[:3]}")
        rows.append(torch.cat([s[k].detach().reshape(-1).double().cpu() for k in names]) - base)
    if not rows:
        return np.zeros((0, directions.ndim))
    R = torch.stack(rows, dim=1)
    sol = torch.linalg.lstsq(D, R).solution
    return sol.T.numpy()
