"""PCA of an optimization trajectory (Li et al. 2018, arXiv:1712.09913, Sec. 7; docs/surfaces.md).

Random directions in a high-dimensional space are nearly orthogonal to the path an optimizer
takes, so Li et al. plot trajectories in the plane of the top two principal components of
``M = [theta_0 - theta_n; ...; theta_{n-1} - theta_n]``. A trajectory comes from checkpoints
(files, state dicts, modules), from tuples of tensors, from a ``(T, P)`` array, or from a run
file that recorded flattened weights (:func:`trajectory_from_run`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from landscape._errors import LandscapeError
from landscape.params import ParamSpec
from landscape.surface.directions import IGNORES, Directions, select


@dataclass
class PCAResult:
    """Principal directions of a trajectory (Li et al. 2018, Sec. 7; docs/surfaces.md).

    ``directions``: the top-``n`` orthonormal components as :class:`Directions` (raw
    parameter units, not filter-normalized, like the reference). ``explained_variance``:
    ``s_k^2 / (T - 1)``; ``explained_variance_ratio``: its share of the total variance;
    ``singular_values``: ``s_k``; ``path``: ``(T, n)`` coordinates of every trajectory point
    relative to the final one, ``path[e, k] = <theta_e - theta_final, pc_k>``; ``final``: the
    final point ``theta_n`` flattened (float64), the centre of a PCA plane.
    """

    directions: Directions
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    singular_values: np.ndarray
    path: np.ndarray
    final: np.ndarray


def _load(point: Any) -> Any:
    """A checkpoint path's state dict, read as ``landscape analyze`` reads it.

    Tensors only (``weights_only``); the state dict also when it sits under one of
    :data:`landscape.loading.STATE_KEYS` (``{"model": sd, "step": n}``, as the examples
    save, and ``{"state_dict": ...}``); ``.safetensors`` files too.
    """
    if isinstance(point, (str, os.PathLike)):
        from landscape.loading import load_checkpoint

        return load_checkpoint(point).state_dict
    return point


def _trajectory_rows(
    trajectory: Any, model: nn.Module | None, params: ParamSpec
) -> tuple[list[str] | None, list[torch.Size] | None, list[torch.Tensor]]:
    """(names or None, parameter shapes or None, flat float64 rows)."""
    names: list[str] | None = None
    shapes: list[torch.Size] | None = None
    if model is not None:
        named = select(model, params)
        names, shapes = list(named), [p.shape for p in named.values()]
    if isinstance(trajectory, (np.ndarray, torch.Tensor)) and np.ndim(trajectory) == 2:
        mat = torch.as_tensor(np.asarray(trajectory) if isinstance(trajectory, np.ndarray)
                              else trajectory.detach().cpu(), dtype=torch.float64)
        if shapes is not None and mat.shape[1] != sum(s.numel() for s in shapes):
            raise ValueError(f"trajectory: rows have {mat.shape[1]} entries, the model's "
                             f"selected parameters {sum(s.numel() for s in shapes)}")
        return names, shapes, list(mat)
    rows: list[torch.Tensor] = []
    for e, pt in enumerate(trajectory):
        pt = _load(pt)
        if isinstance(pt, nn.Module):
            if names is None:
                named = select(pt, params)
                names, shapes = list(named), [p.shape for p in named.values()]
            pt = dict(pt.state_dict())
        if isinstance(pt, Mapping):
            if names is None:
                raise ValueError("trajectory: a list of state dicts needs model= to pick the "
                                 "trainable parameters")
            missing = [k for k in names if k not in pt]
            if missing:
                raise LandscapeError(f"trajectory[{e}] lacks parameters {missing[:3]}")
            tensors = [torch.as_tensor(pt[k]) for k in names]
        elif isinstance(pt, torch.Tensor) and pt.dim() == 1:
            tensors = [pt]
        else:
            tensors = [torch.as_tensor(t) for t in pt]
            if shapes is None:
                shapes = [t.shape for t in tensors]
        flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors])
        if shapes is not None:
            if flat.numel() != sum(s.numel() for s in shapes) or (
                len(tensors) > 1 and [t.shape for t in tensors] != list(shapes)
            ):
                raise LandscapeError(f"trajectory[{e}] does not match the parameter shapes")
        elif rows and flat.numel() != rows[0].numel():
            raise LandscapeError(f"trajectory[{e}] has {flat.numel()} entries, "
                                 f"trajectory[0] {rows[0].numel()}")
        rows.append(flat)
    return names, shapes, rows


def pca_directions(
    trajectory: Any,
    n: int = 2,
    *,
    model: nn.Module | None = None,
    final: Any = None,
    ignore: str = "biasbn",
    params: ParamSpec = None,
) -> PCAResult:
    """PCA of an optimization trajectory (Li et al. 2018, arXiv:1712.09913, Sec. 7).

    ``trajectory``: points in order, each a checkpoint path (loaded with
    ``weights_only=True``), a state dict or module (state dicts need ``model=``), a tuple of
    tensors in trainable-parameter order or a flat vector; or a ``(T, P)`` array of recorded
    weights. The last point is ``theta_n`` unless ``final`` is given. Rows
    ``d_e = theta_e - theta_n`` (entries of tensors with ``dim <= 1`` zeroed under
    ``ignore="biasbn"`` when the shapes are known) are centred by their mean and decomposed
    by SVD, as sklearn's PCA in the reference code; the components are orthonormal. The path
    is ``x_e = <d_e, pc_k>`` (the reference's "cos" projection with unit ``pc_k``). Signs are
    fixed so that the first point has non-negative coordinates (reproducible).
    """
    if ignore not in IGNORES:
        raise ValueError(f"ignore must be one of {IGNORES}, got {ignore!r}")
    if n not in (1, 2):
        raise ValueError(f"n must be 1 or 2, got {n}")
    names, shapes, rows = _trajectory_rows(trajectory, model, params)
    if final is not None:
        _, _, frows = _trajectory_rows([final], model, params)
        rows = [*rows, frows[0]]
    if len(rows) < 2:
        raise LandscapeError(f"trajectory: PCA needs at least 2 points, got {len(rows)}")
    mat = torch.stack(rows) - rows[-1]
    if ignore == "biasbn" and shapes is not None:
        mask = torch.cat([torch.full((s.numel(),), float(len(s) > 1), dtype=torch.float64)
                          for s in shapes])
        mat = mat * mask
    centred = mat - mat.mean(dim=0, keepdim=True)
    # SVD through the small T x T Gram matrix: component k is centred^T u_k / s_k.
    evals, evecs = torch.linalg.eigh(centred @ centred.T)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order].clamp_min(0), evecs[:, order]
    if int((evals > 1e-12 * max(float(evals[0]), 1e-300)).sum()) < n:
        raise LandscapeError(f"trajectory spans fewer than {n} dimensions; PCA is undefined")
    s = evals.sqrt()
    comps = []
    for k in range(n):
        c = centred.T @ evecs[:, k] / s[k]
        c = c / c.norm()
        lead = float(mat[0] @ c)
        if lead < 0 or (lead == 0 and float(c[c.abs().argmax()]) < 0):
            c = -c
        comps.append(c)
    path = torch.stack([mat @ c for c in comps], dim=1).numpy()
    total = float(evals.sum())
    var = (evals / (len(rows) - 1)).numpy()
    ratio = (evals[:n] / total).numpy() if total > 0 else np.full(n, np.nan)
    if shapes is None:
        shapes = [torch.Size([rows[0].numel()])]
        names = ["flat"]
    elif names is None:
        names = [f"p{i}" for i in range(len(shapes))]
    like = dict(model.named_parameters()) if model is not None else {}
    vectors = []
    for c in comps:
        parts = torch.split(c, [s_.numel() for s_ in shapes])
        vec = []
        for name, part, shp in zip(names, parts, shapes):
            t = part.reshape(shp)
            ref = like.get(name)
            vec.append(t.to(ref.device, ref.dtype) if ref is not None else t.float())
        vectors.append(tuple(vec))
    attrs = {"kind": "pca", "normalization": "none", "ignore": ignore,
             "n_points": len(rows), "explained_variance_ratio": [float(r) for r in ratio]}
    dirs = Directions(tuple(names), tuple(vectors), attrs)
    return PCAResult(dirs, var[:n].copy(), ratio, s[:n].numpy(), path, rows[-1].numpy().copy())


def trajectory_from_run(
    run: Any, metric: str = "weights", field: str = "theta"
) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, (T, P) weights)`` recorded in a run file (a path or an open ``Run``).

    The weights are a metric table whose field holds the flattened trainable parameters in
    parameter order (docs/conventions.md), one row per recorded step; pass the array to
    :func:`pca_directions` with ``model=``.
    """
    from landscape.store import Run

    owned = not hasattr(run, "series")
    r = Run.open(run) if owned else run
    try:
        steps, values = r.series(metric, field)
    finally:
        if owned:
            r.close()
    values = np.asarray(values, dtype=np.float64)
    return np.asarray(steps), values.reshape(len(values), -1)

