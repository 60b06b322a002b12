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

import contextlib
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from landscape import distributed as _dist
from landscape._errors import LandscapeError
from landscape.batches import leading_size, to_device
from landscape.isolation import ClosureModule, isolated
from landscape.store import RunWriter, SurfaceData
from landscape.surface.directions import Directions

__all__ = ["axis", "evaluate_grid"]

# --------------------------------------------------------------------------- data


def _is_batch(obj: Any) -> bool:
    if isinstance(obj, (torch.Tensor, Mapping)):
        return True
    return (
        isinstance(obj, (tuple, list))
        and len(obj) > 0
        and all(isinstance(t, torch.Tensor) for t in obj)
    )


class _Data:
    """One batch (a tensor, a tuple of tensors, a dict) or an iterable of batches.

    A tuple or list of tensors is one batch ``(*inputs, targets)``; anything else iterable
    (a ``DataLoader``, a list of batches) is a loader, re-iterated at every grid point.
    Tensors are moved to the model's device.
    """

    def __init__(self, data: Any, device: torch.device) -> None:
        self.device = device
        if _is_batch(data):
            self.single: Any = to_device(data, device, non_blocking=True)
            self.loader = None
            first = self.single
        else:
            if not isinstance(data, Iterable):
                raise ValueError(
                    f"data: expected a batch or an iterable of batches, got {type(data).__name__}"
                )
            if isinstance(data, Iterator):  # one-shot: keep the batches for every grid point
                data = list(data)
            self.loader = data
            self.single = None
            # a DataLoader draws a seed from the global RNG for every iterator it makes
            with torch.random.fork_rng(devices=[]):
                first = next(iter(data), None)
            if first is None:
                raise ValueError("data: the loader yields no batches")
            if not _is_batch(first):
                raise ValueError(
                    f"data: a batch must be a tensor, a tuple of tensors or a dict, got "
                    f"{type(first).__name__}")
        self.first = first

    def __iter__(self) -> Iterator[Any]:
        if self.loader is None:
            yield self.single
            return
        for batch in self.loader:
            yield to_device(batch, self.device, non_blocking=True)


# --------------------------------------------------------------------------- evaluator


def _state_tensors(source: Any) -> dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return {**dict(source.named_parameters()), **dict(source.named_buffers())}
    if isinstance(source, Mapping):
        return dict(source)
    raise ValueError(f"center: expected a module or a state dict, got {type(source).__name__}")


class _PointEvaluator:
    """Evaluates the loss (and accuracy) at ``center + x delta + y eta``."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        data: _Data,
        directions: Directions,
        center: Mapping[str, torch.Tensor] | None,
        closure: bool,
        accuracy: bool,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.closure = closure
        self.accuracy = accuracy
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        given = _state_tensors(center) if center is not None else {}
        # FSDP2: evaluate through the model itself, shards rewritten in place (module docstring)
        self.sharded = any(_dist.is_sharded(p) for p in params.values())
        self.reduce = self.sharded and _dist.is_distributed()
        self._passes: int | None = None
        unknown = [n for n in directions.names if n not in params]
        if unknown:
            raise ValueError(f"directions: not parameters of the model: {unknown[:3]}")
        unknown = [n for n in directions.buffer_names if n not in buffers]
        if unknown:
            raise ValueError(f"directions: not buffers of the model: {unknown[:3]}")

        def base(name: str, ref: torch.Tensor) -> torch.Tensor:
            t = given.get(name, ref)
            if tuple(t.shape) != tuple(ref.shape):
                raise ValueError(f"center[{name!r}] has shape {tuple(t.shape)}, "
                                 f"expected {tuple(ref.shape)}")
            if self.sharded:  # this rank's part, a private copy
                src = t.detach() if _dist.is_sharded(t) else t.detach().to(ref.device, ref.dtype)
                return _dist.shard_of(src, ref).to(ref.dtype).clone()
            return t.detach().to(ref.device, ref.dtype)

        moving = set(directions.names)
        self.base = [base(n, params[n]) for n in directions.names]
        if self.sharded:  # the model's own shards, rewritten in place per point
            self.work = [_dist.local_tensor(params[n].detach()) for n in directions.names]
        else:
            self.work = [b.clone() for b in self.base]  # private, rewritten in place per point
        self.base_sharded = [_dist.is_sharded(params[n]) for n in directions.names]
        self.dirs = [[_dist.shard_of(t.detach(), params[n]).to(b.device, b.dtype)
                      for t, n, b in zip(v, directions.names, self.base)]
                     for v in directions.vectors]
        state: dict[str, torch.Tensor] = dict(zip(directions.names, self.work))
        for n, p in params.items():
            if n not in moving:
                state[n] = base(n, p)
        self.buf_base = [base(n, b) for n, b in buffers.items()]
        if self.sharded:  # FSDP2 keeps buffers whole: rewritten in place, restored on exit
            self.buf_work = [b.detach() for b in buffers.values()]
        else:
            self.buf_work = [b.clone() for b in self.buf_base]
        state.update(zip(buffers, self.buf_work))
        index = {n: i for i, n in enumerate(buffers)}
        self.buf_moving = [self.buf_work[index[n]] for n in directions.buffer_names]
        self.buf_moving_base = [self.buf_base[index[n]] for n in directions.buffer_names]
        self.buf_dirs = [[t.detach().to(b.device, b.dtype) for t, b in zip(v, self.buf_moving)]
                         for v in directions.buffer_vectors]
        self.state = state
        self.bound = False
        # sharded: every parameter's storage, and the center of the fixed ones when given
        self.storage = [_dist.local_tensor(p.detach()) for p in params.values()]
        self.fixed = [] if not (self.sharded and given) else [
            (_dist.local_tensor(p.detach()), state[n]) for n, p in params.items()
            if n not in moving
        ]
        if closure:
            self.wrapper: nn.Module = ClosureModule(model, loss_fn)
            self.call_state = {"inner." + k: v for k, v in state.items()}

    @contextlib.contextmanager
    def bind(self) -> Iterator[None]:
        """Substitute the private tensors once for the whole grid.

        ``functional_call`` swaps every parameter and buffer in and out at each call; since the
        private tensors are rewritten in place, the same substitution (torch's
        ``_reparametrize_module``, what ``functional_call`` runs inside) can stay in place for
        all points, which removes a per-point cost that is noticeable on small models. The
        original tensors are put back on exit, also on errors. Without that helper (a future
        torch), every point goes through ``functional_call``.
        """
        if self.sharded:
            with self._in_place():
                yield
            return
        try:
            from torch.nn.utils.stateless import _reparametrize_module
        except ImportError:  # pragma: no cover - torch internals moved
            yield
            return
        target = self.wrapper if self.closure else self.model
        state = self.call_state if self.closure else self.state
        with _reparametrize_module(target, state, tie_weights=True):
            self.bound = True
            try:
                yield
            finally:
                self.bound = False

    @contextlib.contextmanager
    def _in_place(self) -> Iterator[None]:
        """FSDP2: the model's shards and buffers saved, rewritten per point, copied back."""
        saved = [(t, t.clone()) for t in [*self.storage, *self.buf_work]]
        try:
            with torch.no_grad():
                for dst, src in self.fixed:
                    dst.copy_(src)
            self.bound = True
            yield
        finally:
            self.bound = False
            with torch.no_grad():
                for t, orig in saved:
                    t.copy_(orig)
            _dist.reshard(self.model)

    def fingerprint(self) -> list[float]:
        """Sum and squared norm of the center's moving parameters, over all shards."""
        if not self.reduce:
            return _fingerprint(self.base)
        parts = [t for t, s in zip(self.base, self.base_sharded) if s]
        whole = [t for t, s in zip(self.base, self.base_sharded) if not s]
        total = _dist.sharded_sum([torch.tensor(_fingerprint(parts) if parts else [0.0, 0.0])],
                                  True)
        rest = _fingerprint(whole) if whole else [0.0, 0.0]
        return [float(total[0]) + rest[0], float(total[1]) + rest[1]]

    def move(self, coords: Sequence[float]) -> None:
        if self.sharded:  # unsharded copies left by a forward would hide the new shards
            _dist.reshard(self.model)
        torch._foreach_copy_(self.work, self.base)
        for d, c in zip(self.dirs, coords):
            torch._foreach_add_(self.work, d, alpha=float(c))
        if self.buf_work:
            torch._foreach_copy_(self.buf_work, self.buf_base)
        if self.buf_dirs:
            torch._foreach_copy_(self.buf_moving, self.buf_moving_base)
            for d, c in zip(self.buf_dirs, coords):
                torch._foreach_add_(self.buf_moving, d, alpha=float(c))

    def _single(self, loss: torch.Tensor, out: Any, batch: Any) -> tuple[float, float]:
        acc = float("nan")
        if self.accuracy and isinstance(out, torch.Tensor) and out.shape[:-1] == batch[-1].shape:
            acc = int((out.argmax(dim=-1) == batch[-1]).sum()) / max(1, batch[-1].numel())
        return float(loss), acc

    def _forward(self, batch: Any) -> tuple[torch.Tensor, Any]:
        """``(loss, outputs)`` of one batch through the bound model (sharded evaluation)."""
        if self.closure:
            return self.wrapper(batch), None
        out = self.model(*tuple(batch[:-1]))
        return self.loss_fn(out, batch[-1]), out

    def _n_passes(self) -> int:
        """The most batches any rank holds: FSDP's collectives need matching passes."""
        if self._passes is None:
            loader = self.data.loader
            if loader is None:
                mine = 1
            elif hasattr(loader, "__len__"):
                mine = len(loader)
            else:
                mine = sum(1 for _ in loader)
            self._passes = max(_dist.all_gather_objects(mine))
        return self._passes

    def _reduced(self) -> tuple[float, float]:
        """FSDP2 on several ranks: this rank's data, combined over the ranks.

        The loss is ``sum_r sum_b n_b L_b / sum_r sum_b n_b``, the single-process mean over
        the union of the ranks' data; the accuracy pools the hits and counts. One all-reduce
        of five numbers per point. A rank with fewer batches repeats its first one (not
        counted) until every rank has run as many forward passes.
        """
        passes = self._n_passes()  # before any forward: a collective of its own
        loss_sum = torch.zeros((), dtype=torch.float64)
        n = correct = count = 0
        not_comparable = 0
        done = 0
        for batch in self.data:
            loss, out = self._forward(batch)
            bs = leading_size(batch) or 1
            loss_sum = loss_sum + loss.detach().reshape(()).double().cpu() * bs
            n += bs
            done += 1
            if self.accuracy and out is not None:
                target = batch[-1]
                if isinstance(out, torch.Tensor) and out.shape[:-1] == target.shape:
                    correct += int((out.argmax(dim=-1) == target).sum())
                    count += target.numel()
                else:
                    not_comparable = 1
        for _ in range(passes - done):  # match the other ranks' all-gathers
            self._forward(to_device(self.data.first, self.data.device))
        s = _dist.sharded_sum(
            [loss_sum, torch.tensor([n, correct, count, not_comparable], dtype=torch.float64)],
            True,
        )
        loss_value = float(s[0] / s[1]) if s[1] > 0 else float("nan")
        acc = float("nan")
        if self.accuracy and s[4] == 0 and s[3] > 0:
            acc = float(s[2] / s[3])
        return loss_value, acc

    def loss_and_accuracy(self) -> tuple[float, float]:
        if self.reduce:
            return self._reduced()
        total = None
        n = 0
        correct = None
        count = 0
        comparable = True
        for batch in self.data:
            if self.closure:
                out = None
                if self.bound:
                    loss = self.wrapper(batch)
                else:
                    loss = functional_call(self.wrapper, self.call_state, (batch,))
            else:
                inputs, target = tuple(batch[:-1]), batch[-1]
                if self.bound:
                    out = self.model(*inputs)
                else:
                    out = functional_call(self.model, self.state, inputs)
                loss = self.loss_fn(out, target)
            if self.data.loader is None:  # one batch: two host syncs and no bookkeeping
                return self._single(loss, out, batch)
            bs = leading_size(batch) or 1
            term = loss.detach().reshape(()).double() * bs
            total = term if total is None else total + term
            n += bs
            if self.accuracy and out is not None:
                if isinstance(out, torch.Tensor) and out.shape[:-1] == target.shape:
                    hits = (out.argmax(dim=-1) == target).sum()
                    correct = hits if correct is None else correct + hits
                    count += target.numel()
                else:
                    comparable = False  # the shapes allow no classification accuracy
        loss_value = float(total / n) if total is not None and n else float("nan")
        acc = float("nan")
        if comparable and correct is not None and count > 0:
            acc = float(correct) / count
        return loss_value, acc


# --------------------------------------------------------------------------- grid


def axis(steps: int, span: float) -> np.ndarray:
    """``steps`` evenly spaced coordinates on ``[-span, span]`` (odd ``steps`` include 0)."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not np.isfinite(span) or span <= 0:
        raise ValueError(f"span must be a positive number, got {span!r}")
    if steps == 1:
        return np.zeros(1)
    return np.linspace(-float(span), float(span), int(steps))


def _coords(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of coordinates")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr


def _fingerprint(tensors: Sequence[torch.Tensor]) -> list[float]:
    s = 0.0
    q = 0.0
    for t in tensors:
        f = t.detach().double()
        s += float(f.sum())
        q += float((f * f).sum())
    return [s, q]


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(
        abs(u - v) <= 1e-5 * max(1.0, abs(u), abs(v)) for u, v in zip(a, b)
    )


def _open_writer(writer: Any) -> tuple[RunWriter, bool]:
    if writer is None:
        return RunWriter.memory(), True
    if isinstance(writer, RunWriter):
        return writer, False
    if isinstance(writer, (str, os.PathLike)):
        return RunWriter(writer), True
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
) -> SurfaceData:
    """Loss (and accuracy) at every point of a 1-D or 2-D grid; resumable.

    ``f(x_i) = L(c + x_i delta)`` or ``f(x_i, y_j) = L(c + x_i delta + y_j eta)`` with ``c``
    the model's parameters (or ``center``: a module or state dict; buffers are taken from it
    when present) and ``delta``, ``eta`` the :class:`Directions` (Li et al. 2018, Sec. 3).

    ``data``: one batch or an iterable of batches (size-weighted mean over the batches).
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
    try:
        device = next(iter(model.parameters())).device
    except StopIteration:
        raise ValueError("model: has no parameters") from None
    batches = _Data(data, device)
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

    evaluator = _PointEvaluator(model, loss_fn, batches, directions, center, closure, accuracy)
    dist_on = _dist.enabled(distributed)
    if evaluator.reduce and not dist_on:
        raise ValueError(
            "distributed=False (or landscape.distributed.local()) on an FSDP-sharded model: "
            "its forward needs every rank; evaluate on all ranks together")
    dir_attrs, dir_arrays = directions.storage()
    meta = {
        **dir_attrs,
        "center_fingerprint": evaluator.fingerprint(),
        "eval_mode": bool(eval_mode),
        "closure": bool(closure),
        **dict(attrs or {}),
    }
    fields = ("loss", "accuracy") if accuracy else ("loss",)
    # distributed: only rank 0 opens the run file; the other ranks work in memory
    run_writer, owned = _open_writer(writer if not dist_on or _dist.rank() == 0 else None)
    try:
        failure: BaseException | None = None
        todo: list[tuple[int, ...]] = []
        try:
            surf = run_writer.create_surface(
                name, xs, ys, fields=fields, attrs=meta,
                arrays={**dir_arrays, **dict(arrays or {})},
            )
            if surf.done.any() or surf.attrs != meta:
                old = surf.attrs
                if not _same(old.get("direction_fingerprint", []), meta["direction_fingerprint"]):
                    raise LandscapeError(
                        f"surface {name!r} exists in the run with other directions; choose "
                        "another name (or the same seed/normalization to resume)")
                if not _same(old.get("center_fingerprint", []), meta["center_fingerprint"]):
                    raise LandscapeError(
                        f"surface {name!r} exists in the run around other parameters; choose "
                        "another name")
                if bool(old.get("eval_mode", eval_mode)) != bool(eval_mode):
                    raise LandscapeError(
                        f"surface {name!r} exists in the run with eval_mode={old['eval_mode']}")
            todo = [tuple(int(v) for v in idx) for idx in np.argwhere(~surf.done)]
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
        if owned:
            run_writer.close()


def _compute(
    evaluator: _PointEvaluator,
    writer: RunWriter,
    name: str,
    xs: np.ndarray,
    ys: np.ndarray | None,
    todo: list[tuple[int, ...]],
    total: int,
    eval_mode: bool,
    progress: bool,
    dist_on: bool = False,
) -> None:
    from tqdm import tqdm

    quiet = not progress or not todo or (dist_on and _dist.rank() != 0)
    bar = tqdm(total=total, initial=total - len(todo), disable=quiet,
               desc=f"surface {name}", unit="pt", leave=False)

    def point(idx: tuple[int, ...]) -> dict[str, float]:
        coords = (xs[idx[0]],) if ys is None else (xs[idx[1]], ys[idx[0]])
        evaluator.move(coords)
        loss, acc = evaluator.loss_and_accuracy()
        values = {"loss": loss}
        if evaluator.accuracy:
            values["accuracy"] = acc
        return values

    def store(idx: tuple[int, ...], values: dict[str, float]) -> None:
        writer.write_surface(name, idx if ys is not None else idx[0], values)
        bar.update(1)

    try:
        with isolated(evaluator.model, eval_mode=eval_mode), torch.no_grad(), evaluator.bind():
            if dist_on and not evaluator.reduce:  # points dealt round robin, rank 0 stores
                _dist.map_sharded(todo, point, store)
            else:
                for idx in todo:
                    store(idx, point(idx))
    finally:
        bar.close()
