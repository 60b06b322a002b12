"""Resumable evaluation of the loss (and accuracy) on 1-D and 2-D grids of parameters.

Li et al. 2018 (arXiv:1712.09913), Sec. 3: ``f(alpha) = L(theta* + alpha delta)`` and
``f(alpha, beta) = L(theta* + alpha delta + beta eta)`` (docs/surfaces.md, Grids). Every point is
evaluated under ``torch.no_grad`` on a *private* copy of the moving parameters, rebuilt in place
with ``torch._foreach`` ops (``theta = theta* + alpha delta + beta eta``, exactly, not by
accumulating steps) and substituted into the model the way :func:`torch.func.functional_call`
does it, once for the whole grid rather than at every call. The cost of a point is one forward
pass over the data plus three vector operations, and the user's model is never written.
Buffers are private clones restored before every point; the model is in eval mode by default
(docs/conventions.md, model mode); RNG state, modes, ``requires_grad`` and ``.grad`` are restored
(:func:`landscape.isolation.isolated`).

An FSDP2 model (``fully_shard``, DTensor parameters) cannot be substituted: its forward
all-gathers from the sharded parameters. There every rank writes ``theta* + alpha delta +
beta eta`` into its own shards in place (the directions cut to the shard), all ranks evaluate
every point together on their own data, the losses are combined over the ranks (size-weighted,
as the single-process mean over the union of the data) and the saved shards are copied back,
bit for bit, at the end (docs/distributed.md, "FSDP2").

Points are written into the run file as they are computed. Uncomputed points are NaN with
``done == 0``; running the same surface again (same run file and name) computes only the
missing points.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from landscape import distributed as _dist
from landscape._checks import shown
from landscape._errors import LandscapeError
from landscape.curvature._batches import refuse_summed_loss
from landscape.curvature._evaluation import seed_generators
from landscape.findings import user_stacklevel
from landscape.isolation import isolated
from landscape.store import RunWriter, SurfaceData
from landscape.store.writer import SURFACE_ELSEWHERE
from landscape.store.writer_status import stopped_how
from landscape.surface._evaluator import GridData, PointEvaluator
from landscape.surface.directions import Directions

__all__ = ["MAX_POINTS", "axis", "evaluate_grid"]

MAX_POINTS = 10_000_000  # grid points evaluate_grid accepts (one forward pass each)



# --------------------------------------------------------------------------- grid


def axis(steps: int, span: float) -> np.ndarray:
    """``steps`` evenly spaced coordinates on ``[-span, span]`` (odd ``steps`` include 0)."""
    steps = grid_steps(steps, "steps")
    if isinstance(span, bool) or not isinstance(span, (int, float, np.floating, np.integer)):
        raise ValueError(f"span must be a positive number, got {span!r}")
    if not np.isfinite(span) or span <= 0:
        raise ValueError(f"span must be a positive number, got {span!r}")
    xs = np.linspace(-float(span), float(span), steps)
    if steps % 2:
        xs[steps // 2] = 0.0  # exactly (linspace left 4.4e-16 at span 3.3, 51 steps)
    return xs


def grid_steps(value: Any, name: str) -> int:
    """``value`` as a number of grid points: an integer of at least 2 (an axis, not a point)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)) \
            or int(value) != value or value < 2:
        raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
    return int(value)


def _coords(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of coordinates")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    if np.any(np.diff(arr) <= 0):  # the plots draw and the VTK grid lays points in order
        raise ValueError(f"{name} must be strictly increasing (sorted, no coordinate twice), "
                         f"got {arr.tolist()}")
    return arr


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(
        abs(u - v) <= 1e-5 * max(1.0, abs(u), abs(v)) for u, v in zip(a, b)
    )


def _same_loss(a: float, b: float) -> bool:
    """Equal losses at the centre, to a relative 1e-5 (NaN equals NaN: a diverged model).

    Relative at any scale: a loss of 9.9e-6 on other data (3.4e-7) passed an absolute
    1e-5 below 1, and the resumed grid mixed the two data sets' points.
    """
    return (math.isnan(a) and math.isnan(b)) or a == b or abs(a - b) <= 1e-5 * max(abs(a), abs(b))


def _center_loss(evaluator: PointEvaluator, ndim: int, eval_mode: bool) -> float:
    """The loss at the grid's origin: one pass over the data, on every rank.

    Under a fixed seed (the caller's RNG restored), so that dropout with ``eval_mode=False``
    gives the same value at every call.
    """
    # isolated forks the generators the model draws from, seed_generators seeds them
    with isolated(evaluator.model, eval_mode=eval_mode), torch.no_grad(), evaluator.bind():
        seed_generators(evaluator.model, 0)
        evaluator.move((0.0,) * ndim)
        return float(evaluator.loss_and_accuracy()[0])


def _nonfinite_directions(name: str, directions: Directions) -> str:
    """The error for directions holding NaN or inf (normalized to weights that overflow)."""
    message = f"surface {name!r}: the directions are not finite"
    normalization = directions.attrs.get("normalization")
    if normalization in ("filter", "layer", "weight"):
        message += (
            f" ({normalization} normalization scales them by the weights' norms, which are "
            "not finite here: weights too large for their float type, or not finite)"
        )
    return message


def _open_writer(writer: Any) -> tuple[RunWriter, bool]:
    if writer is None:
        return RunWriter.memory(), True
    if isinstance(writer, RunWriter):
        return writer, False
    if isinstance(writer, (str, os.PathLike)):  # a surface is computed after training
        return RunWriter(writer, posthoc=True), True
    raise ValueError(f"writer: expected a RunWriter, a path or None, got {type(writer).__name__}")


def evaluate_grid(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    directions: Directions,
    x: Sequence[float],
    y: Sequence[float] | None = None,
    *,
    center: nn.Module | Mapping[str, torch.Tensor] | None = None,
    writer: Any = None,
    name: str = "surface",
    eval_mode: bool = True,
    accuracy: bool | None = None,
    closure: bool | None = None,
    progress: bool = True,
    attrs: Mapping[str, Any] | None = None,
    arrays: Mapping[str, np.ndarray] | None = None,
    distributed: bool | None = None,
    batch_size: Callable[[Any], int | None] | None = None,
) -> SurfaceData:
    """Loss (and accuracy) at every point of a 1-D or 2-D grid; resumable.

    ``f(x_i) = L(c + x_i delta)`` or ``f(x_i, y_j) = L(c + x_i delta + y_j eta)`` with ``c``
    the model's parameters (or ``center``: a module or state dict; buffers are taken from it
    when present) and ``delta``, ``eta`` the :class:`Directions` (Li et al. 2018, Sec. 3).

    ``data``: one batch or an iterable of batches (size-weighted mean over the batches).
    A batch's size is its first tensor's leading dimension, or ``batch_size(batch)`` when
    given (the curvature operators' argument: a dict batch whose first tensor the samples
    share, a token count); a batch of size 0 weighs nothing.
    ``loss_fn(outputs, targets)`` is called with ``outputs = model(*batch[:-1])`` and
    ``targets = batch[-1]``; with ``closure=True`` (the default for dict batches) it is called
    as ``loss_fn(model, batch)`` and returns the loss. ``accuracy`` (default: when the targets
    are integer class labels) stores the fraction of ``argmax(outputs, -1) == targets``.

    ``writer``: a :class:`~landscape.store.RunWriter`, a run-file path (opened for appending
    and closed afterwards), or ``None`` (in memory). The surface ``name`` is created in it, or
    resumed: only points not yet computed are evaluated, after checking that the stored
    directions and center match. Returns the stored surface: grids of shape ``(nx,)`` or
    ``(ny, nx)`` with ``Z[j, i] = f(x_i, y_j)``.

    ``distributed`` (``None``: when a ``torch.distributed`` group of several ranks is
    initialized; ``False``: never): the missing points are dealt round robin over the ranks,
    each evaluating its points on the whole ``data`` (give every rank the same data), and
    rank 0, the only one that opens ``writer``, stores them after every round; every rank
    returns the finished surface (docs/distributed.md). An FSDP2 (``fully_shard``) model is
    evaluated by all ranks together at every point instead: each rank on its own ``data``,
    the loss size-weighted over the ranks (the mean over the union of their data), rank 0
    writing; ``distributed=False`` is then refused.
    """
    xs = _coords(x, "x")
    ys = None if y is None else _coords(y, "y")
    points = xs.size * (1 if ys is None else ys.size)
    if points > MAX_POINTS:  # its arrays alone would not fit (and a forward pass a point)
        raise ValueError(f"a grid of {points:,} points is too large (at most {MAX_POINTS:,}); "
                         "use fewer steps")
    if not isinstance(directions, Directions):
        raise ValueError("directions: expected a Directions object (see random_directions)")
    if directions.ndim != (1 if ys is None else 2):
        raise ValueError(
            f"directions: {directions.ndim} direction(s) for a "
            f"{'1-D' if ys is None else '2-D'} grid"
            + ("; pass y= for a plane" if ys is None else "; a plane needs two directions")
        )
    if not callable(loss_fn):
        raise ValueError("loss_fn must be callable")
    if batch_size is not None and not callable(batch_size):
        raise ValueError(f"batch_size must be a function of the batch (batch -> its size), "
                         f"got {shown(batch_size)}")
    try:
        device = next(iter(model.parameters())).device
    except StopIteration:
        raise ValueError("model: has no parameters") from None
    batches = GridData(data, device)
    loader = batches.loader  # a loader is a size-weighted mean of its batches
    refuse_summed_loss(loss_fn, loader is not None and (
        not hasattr(loader, "__len__") or len(loader) > 1))
    if closure is None:
        closure = not isinstance(batches.first, (tuple, list))
    elif not closure and not isinstance(batches.first, (tuple, list)):
        raise ValueError("data: without closure=True a batch must be a tuple (*inputs, targets)")
    if not closure and len(batches.first) < 2:
        raise ValueError("data: a batch must hold inputs and targets, (*inputs, targets)")
    if accuracy is None:
        t = None if closure else batches.first[-1]
        accuracy = bool(t is not None and not t.is_floating_point() and not t.is_complex()
                        and t.dtype != torch.bool)
    elif accuracy and closure:
        raise ValueError("accuracy: needs (inputs, targets) batches, not a closure loss")

    evaluator = PointEvaluator(model, loss_fn, batches, directions, center, closure, accuracy,
                               batch_size)
    dist_on = _dist.enabled(distributed)
    if evaluator.reduce and not dist_on:
        raise ValueError(
            "distributed=False (or landscape.distributed.local()) on an FSDP-sharded model: "
            "its forward needs every rank; evaluate on all ranks together")
    dir_attrs, dir_arrays = directions.storage()
    if not all(np.isfinite(dir_attrs["direction_fingerprint"])):
        raise LandscapeError(_nonfinite_directions(name, directions))
    meta = {
        **dir_attrs,
        "center_fingerprint": evaluator.fingerprint(),
        "center_buffer_fingerprint": evaluator.buffer_fingerprint(),
        # the loss at the centre tells other data or another loss function from a resume
        "center_loss": _center_loss(evaluator, 1 if ys is None else 2, eval_mode),
        "eval_mode": bool(eval_mode),
        "closure": bool(closure),
        **dict(attrs or {}),
    }
    fields = ("loss", "accuracy") if accuracy else ("loss",)
    run_writer: RunWriter | None = None
    owned = computing = False
    try:
        failure: BaseException | None = None
        todo = np.zeros((0, 1), dtype=np.int64)
        try:
            # distributed: only rank 0 opens the run file (a file it cannot open fails every
            # rank below, not rank 0 alone); the other ranks work in memory
            run_writer, owned = _open_writer(writer if not dist_on or _dist.rank() == 0
                                             else None)
            surf = run_writer.create_surface(
                name, xs, ys, fields=fields, attrs=meta,
                arrays={**dir_arrays, **dict(arrays or {})},
            )
            if surf.done.any() or surf.attrs != meta:
                old = surf.attrs
                # the centre first: directions normalized to other weights differ as well
                if not _same(old.get("center_fingerprint", []), meta["center_fingerprint"]):
                    raise LandscapeError(
                        f"surface {name!r} exists in the run around other parameters (another "
                        f"checkpoint); {SURFACE_ELSEWHERE}")
                if not _same(old.get("direction_fingerprint", []), meta["direction_fingerprint"]):
                    was, now = dict(old.get("directions") or {}), meta["directions"]
                    if was.get("kind") == now.get("kind") == "random" \
                            and was.get("draw") != now.get("draw"):
                        raise LandscapeError(
                            f"surface {name!r} was begun by an earlier version of landscape, "
                            "whose random directions were drawn otherwise (this one draws each "
                            "parameter from a generator of its own), so it cannot be resumed; "
                            f"{SURFACE_ELSEWHERE}")
                    raise LandscapeError(
                        f"surface {name!r} exists in the run with other directions (the same "
                        f"seed and normalization resume it); {SURFACE_ELSEWHERE}")
                # buffers (BatchNorm statistics) at the centre and along the directions:
                # absent from surfaces of earlier versions, which are not checked for them
                for key, what in (("center_buffer_fingerprint", "other buffers at its centre "
                                   "(BatchNorm statistics of another checkpoint)"),
                                  ("buffer_direction_fingerprint", "other buffer directions "
                                   "(another second checkpoint, or buffers=True/False)")):
                    if key in old and not _same(old[key], meta[key]):
                        raise LandscapeError(
                            f"surface {name!r} exists in the run with {what}; "
                            f"{SURFACE_ELSEWHERE}")
                if bool(old.get("eval_mode", eval_mode)) != bool(eval_mode):
                    raise LandscapeError(
                        f"surface {name!r} exists in the run with eval_mode={old['eval_mode']}; "
                        f"{SURFACE_ELSEWHERE}")
                was = old.get("center_loss")  # absent in surfaces of earlier versions
                if was is not None and not _same_loss(float(was), meta["center_loss"]):
                    message = (f"surface {name!r} exists in the run with a loss of "
                               f"{float(was):.6g} at its centre, {meta['center_loss']:.6g} now")
                    if batches.repeatable:  # a batch or a list: the same data give the same loss
                        raise LandscapeError(
                            f"{message}: other data or another loss function (a loader that "
                            f"shuffles a subset or augments gives other data at each run); "
                            f"{SURFACE_ELSEWHERE}")
                    # a loader may shuffle or augment, so that no two passes agree
                    warnings.warn(f"landscape: {message}: other data or another loss "
                                  "function, or a loader that shuffles or augments; resuming",
                                  RuntimeWarning, stacklevel=user_stacklevel())
            # an index array, not a list of tuples: 9M points of the largest grid took
            # 1.6 GB and 20 s as tuples, 144 MB as an array
            todo = np.argwhere(~surf.done)
        except Exception as err:
            if not dist_on:
                raise
            failure = err
        if dist_on:
            # rank 0 read the run file: its errors and its missing points hold for all ranks
            shared = _dist.broadcast_object((failure, todo))
            if failure is not None or shared[0] is not None:
                raise failure if failure is not None else shared[0]
            todo = shared[1]
        assert run_writer is not None
        computing = True  # (a refusal before this point stopped nothing)
        try:
            _compute(evaluator, run_writer, name, xs, ys, todo, surf.done.size, eval_mode,
                     progress, dist_on)
        finally:
            run_writer.flush()
        if not dist_on:
            return run_writer.run().surface(name)
        # the other ranks hold only what they computed: they return rank 0's surface
        mine = run_writer.run().surface(name) if _dist.rank() == 0 else None
        return _dist.broadcast_object(mine)
    finally:
        if owned and run_writer is not None:  # an interrupted surface says so in the file
            run_writer.close(how=stopped_how(sys.exc_info()[1]) if computing else None)


def _compute(
    evaluator: PointEvaluator,
    writer: RunWriter,
    name: str,
    xs: np.ndarray,
    ys: np.ndarray | None,
    todo: np.ndarray,
    total: int,
    eval_mode: bool,
    progress: bool,
    dist_on: bool = False,
) -> None:
    from landscape._progress import bar as progress_bar

    quiet = not progress or not len(todo) or (dist_on and _dist.rank() != 0)
    bar = progress_bar(enabled=not quiet, total=total, initial=total - len(todo),
                       desc=f"surface {name}", unit="pt", leave=False)

    def point(row: np.ndarray) -> dict[str, float]:  # row: the point's grid index
        coords = (xs[row[0]],) if ys is None else (xs[row[1]], ys[row[0]])
        evaluator.move(coords)
        loss, acc = evaluator.loss_and_accuracy()
        values = {"loss": loss}
        if evaluator.accuracy:
            values["accuracy"] = acc
        return values

    def store(row: np.ndarray, values: dict[str, float]) -> None:
        idx = tuple(int(v) for v in row)  # (the writer takes Python integers)
        writer.write_surface(name, idx if ys is not None else idx[0], values)
        bar.update(1)

    try:
        with isolated(evaluator.model, eval_mode=eval_mode), torch.no_grad(), evaluator.bind():
            if dist_on and not evaluator.reduce:  # points dealt round robin, rank 0 stores
                _dist.map_sharded(todo, point, store)
            else:
                for row in todo:
                    store(row, point(row))
    finally:
        bar.close()
