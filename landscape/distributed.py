"""Data-parallel helpers over :mod:`torch.distributed` (docs/distributed.md).

landscape never starts a process group: when the user's program has called
``torch.distributed.init_process_group`` (``torchrun``, Slurm, Lightning, ...) the call sites
use these helpers so that every rank obtains the single-process result on the *union* of the
ranks' data:

* curvature operators (:mod:`landscape.curvature.operator`) all-reduce every matvec, loss and
  gradient, weighted by each rank's data size (:func:`all_reduce_weighted`);
* the monitor writes its file on rank 0 only and broadcasts rank 0's findings
  (:func:`broadcast_object`), so every rank can react to them (e.g. stop together);
* loss-surface grid points are split over the ranks (:func:`shard`) and collected on rank 0
  (:func:`gather_objects`), which writes the run file;
* FSDP2 (``fully_shard``) models hold ``DTensor`` parameters: :func:`is_sharded`,
  :func:`local_tensor`, :func:`shard_of`, :func:`full_tensor` (one parameter at a time) and
  :func:`sharded_sum` (shard-local partial sums, one all-reduce) let the call sites work on
  the shards without gathering the model.

The backend is never assumed: tensors are reduced on a device the process group's backend
supports (NCCL: the current CUDA device; gloo: the CPU) and moved back. Collectives are only
issued when a process group is initialized with more than one rank, and not inside
:func:`local` or where an operator was created with ``distributed=False``, so single-process
code pays nothing.

**Lock step.** A collective must be entered by every rank in the same order. The call sites
keep that property because the decisions that control the number of collectives (Lanczos
stopping, restarts, schedules) depend only on all-reduced values and on seeded
``torch.Generator`` probes (:mod:`landscape.curvature.spectrum` draws every random probe on the
CPU from ``torch.Generator().manual_seed(seed)``, hence the same bits on every rank and
device). :func:`same_on_all_ranks` checks a tensor is bitwise equal on all ranks.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "agreed",
    "all_gather_objects",
    "all_reduce_weighted",
    "broadcast_object",
    "broadcast_tensors_",
    "check_current_device",
    "compute_dtype",
    "enabled",
    "full_tensor",
    "gather_objects",
    "is_distributed",
    "is_sharded",
    "local",
    "local_tensor",
    "map_sharded",
    "rank",
    "raise_together",
    "reshard",
    "same_on_all_ranks",
    "shard",
    "shard_of",
    "sharded_sum",
    "step_range",
    "together",
    "total_weight",
    "unwrap",
    "world_size",
]

T = TypeVar("T")

_state = threading.local()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default process group (0 when not distributed)."""
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    """Number of ranks in the default process group (1 when not distributed)."""
    return dist.get_world_size() if _initialized() else 1


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialized (ignores :func:`local`)."""
    return _initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Within this block landscape issues no collective: each rank works on its own data.

    Use it when only some ranks run a diagnostic (``if rank == 0: ...``), which would
    otherwise wait forever for the others. Operators decide when they are created, so an
    operator built inside the block stays local when used outside it.
    """
    depth = getattr(_state, "local_depth", 0)
    _state.local_depth = depth + 1
    try:
        yield
    finally:
        _state.local_depth = depth


def enabled(option: bool | None = None) -> bool:
    """Resolve a call site's ``distributed`` option.

    ``None`` (auto): collectives when :func:`is_distributed` and not inside :func:`local`.
    ``False``: never. ``True``: required; raises ``ValueError`` when no process group is
    initialized (a world of one rank is accepted and needs no collective).
    """
    if option is None:
        return is_distributed() and getattr(_state, "local_depth", 0) == 0
    if option is False:
        return False
    if option is True:
        if not _initialized():
            raise ValueError(
                "distributed=True: torch.distributed is not initialized "
                "(call torch.distributed.init_process_group first)"
            )
        return dist.get_world_size() > 1
    raise ValueError(f"distributed must be None, True or False, got {option!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``.

    Evaluating the inner module keeps DDP's gradient hooks and buffer broadcasts out of the
    diagnostic computations; parameter names are the inner module's (no ``module.`` or
    ``_orig_mod.`` prefix). A ``torch.compile``d module is evaluated through the module it
    compiled (the same parameters and function): dynamo cannot trace the diagnostics'
    ``torch.func`` transforms or double backward, and a graph break there marks the
    user's own frame to run eagerly for the rest of the run. Lightning Fabric's
    ``_FabricModule`` (what ``fabric.setup`` returns) is looked through too: it redirects
    attribute writes to the module it wraps, so the weights a measurement substitutes
    were never put back (the model left holding plain tensors, cut off from its optimizer),
    and its precision casting is the training's, not the measurement's.
    """
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, parallel):
            model = model.module
        elif _compiled(model):
            model = model._orig_mod
        elif _fabric(model):
            model = model._forward_module
        else:
            return model


def _fabric(model: nn.Module) -> bool:
    """Whether ``model`` is Lightning Fabric's wrapper (without importing lightning)."""
    return type(model).__name__ == "_FabricModule" and isinstance(
        getattr(model, "_forward_module", None), nn.Module)


def _compiled(model: nn.Module) -> bool:
    """Whether ``model`` is ``torch.compile``'s wrapper (without importing dynamo)."""
    return type(model).__name__ == "OptimizedModule" and isinstance(
        getattr(model, "_orig_mod", None), nn.Module)


# --------------------------------------------------------------------------- tensors


def _comm_device(device: torch.device) -> torch.device:
    """A device the default group's backend can reduce on, given the tensors' device."""
    backend = str(dist.get_backend()).lower()
    if backend == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo" and device.type not in ("cpu", "cuda"):
        return torch.device("cpu")
    # "cpu:gloo,cuda:nccl" style groups route each device to its backend; MPI, XCCL and
    # others take their native device
    return device


def _all_reduce_sum(flat: torch.Tensor) -> torch.Tensor:
    target = _comm_device(flat.device)
    buf = flat.to(target) if target != flat.device else flat.clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(flat.device)


def total_weight(weight: float) -> float:
    """``sum`` of ``weight`` over the ranks (one all-reduce in float64)."""
    device = _tensor_device()
    t = torch.tensor([float(weight)], dtype=torch.float64, device=device)
    return float(_all_reduce_sum(t).item())


def _tensor_device() -> torch.device:
    backend = str(dist.get_backend()).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_weighted(
    tensors: Sequence[torch.Tensor], weight: float, *, total: float | None = None
) -> list[torch.Tensor]:
    """``sum_r w_r x_r / sum_r w_r`` over the ranks, for every tensor of ``tensors``.

    ``weight`` is this rank's weight ``w_r`` (e.g. its number of samples), ``total`` the sum
    of the weights over the ranks when already known (saves one all-reduce; see
    :func:`total_weight`). Each rank scales its tensors by ``w_r / total`` and the scaled
    tensors are summed in **one** all-reduce of a flat buffer per dtype (a float64 loss
    beside float32 products does not widen them; 16-bit floats are summed in float32,
    integers in float64), so a mean-reduced quantity
    (loss, gradient, Hessian-vector product) becomes that of the concatenated data:
    ``L = sum_r (n_r / N) L_r``. With equal weights on two ranks the scaling is by 0.5, exact
    in floating point. The result has the tensors' shapes, dtypes and devices and is the same
    on every rank. Every rank must pass tensors of the same dtypes in the same order (the
    buffers are matched by position), as every rank must for any collective. Without a
    process group of several ranks the tensors are returned as is.
    """
    tensors = list(tensors)
    if not is_distributed() or not tensors:
        return tensors
    if total is None:
        total = total_weight(weight)
    if not total > 0:
        raise ValueError(f"weight: the weights sum to {total} over the ranks; need > 0")
    scale = float(weight) / float(total)
    groups: dict[torch.dtype, list[int]] = {}  # in first-seen order, alike on every rank
    for i, t in enumerate(tensors):
        groups.setdefault(_reduction_dtype(t.dtype), []).append(i)
    device = tensors[0].device
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype, members in groups.items():
        flat = torch.cat([tensors[i].detach().to(device, dtype).reshape(-1) for i in members])
        summed = _all_reduce_sum(flat * scale)
        offset = 0
        for i in members:
            t = tensors[i]
            n = t.numel()
            out[i] = summed[offset:offset + n].view(t.shape).to(t.device, t.dtype)
            offset += n
    return [t for t in out if t is not None]


def _reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is summed over the ranks in.

    float32 for 16-bit floats (as every accumulation of a 16-bit model: docs/curvature.md,
    "Precision"), float64 for integers, else its own.
    """
    if dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype if dtype.is_floating_point or dtype.is_complex else torch.float64


def same_on_all_ranks(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds the same bits on every rank (True without a process group).

    Used to check that seeded probes agree; it costs one all-reduce of twice the tensor.
    """
    if not is_distributed():
        return True
    flat = tensor.detach().reshape(-1).double()
    both = torch.cat([flat, -flat])
    mx = _all_reduce_max(both)
    n = flat.numel()
    # max(x) == x and max(-x) == -x on every entry  <=>  min(x) == max(x)
    return bool(torch.equal(mx[:n], flat) and torch.equal(mx[n:], -flat))


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest of every rank's ``value`` (NaN counts as -inf); every rank must call it.

    Args:
        value: this rank's number.
        device: where the collective's tensor lives (the model's device).
    """
    number = value if value == value else -math.inf
    return float(_all_reduce_max(torch.tensor([number], dtype=torch.float64, device=device)))


def step_range(step: int) -> tuple[int, int]:
    """The smallest and the largest of every rank's ``step``; every rank must call it.

    One all-reduce of two numbers (float64: exact for steps below 2^53).
    """
    flat = torch.tensor([float(step), -float(step)], dtype=torch.float64,
                        device=_tensor_device())
    high, low = _all_reduce_max(flat).tolist()
    return int(-low), int(high)


def _all_reduce_max(flat: torch.Tensor) -> torch.Tensor:
    target = _comm_device(flat.device)
    buf = flat.to(target) if target != flat.device else flat.clone()
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return buf.to(flat.device)


# --------------------------------------------------------------------------- objects


def broadcast_tensors_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` with rank ``src``'s values, in place.

    One broadcast per device and dtype. Every rank passes tensors of the same dtypes,
    shapes and devices in the same order (the model's buffers, say); rank ``src``'s own
    are not written, nor tensors already equal to its values. A tensor made under
    ``torch.inference_mode`` is written there. Nothing without a process group of several
    ranks.
    """
    tensors = [t for t in tensors if t.numel()]
    if not is_distributed() or not tensors:
        return
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for members in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in members])
        target = _comm_device(flat.device)
        buf = flat.to(target) if target != flat.device else flat.clone()
        dist.broadcast(buf, src=src)
        if rank() == src:
            continue
        buf = buf.to(flat.device)
        offset = 0
        for t in members:
            n = t.numel()
            value = buf[offset:offset + n].view(t.shape)
            offset += n
            with torch.inference_mode() if t.is_inference() else torch.no_grad():
                if not torch.equal(t, value):
                    t.copy_(value)


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` from rank ``src`` on every rank (picklable objects; identity when local)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_object_device())
    return box[0]  # type: ignore[return-value]


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` as a list indexed by rank on ``dst``; ``None`` on the others.

    Without a process group: ``[obj]``.
    """
    if not is_distributed():
        return [obj]
    if str(dist.get_backend()).lower() == "nccl":
        # gather_object over NCCL needs a device per rank; all_gather_object is simpler and
        # equally cheap for the small payloads landscape sends
        out: list[Any] = [None] * world_size()
        dist.all_gather_object(out, obj)
        return out if rank() == dst else None
    out = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` as a list indexed by rank, on every rank (``[obj]`` when local)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def raise_together(error: BaseException | None, what: str, *,
                   unless_all: bool = False) -> None:
    """Raise on every rank when ``error`` was raised on any, so none waits in a collective.

    Every rank must call this at the same point, with its own ``error`` (None when it
    succeeded). The failing rank raises its own exception, the others a ``ValueError``
    naming it and its message (``what``: the work that failed, for that message); what is
    raised is marked :func:`agreed`. One all-reduce of one number (how many ranks failed)
    when none did, and an object all-gather of the messages when one did; nothing without
    a process group (a local ``error`` is raised). With ``unless_all``, when every rank
    failed nothing is raised: they go on together (to the same fallback).
    """
    if not is_distributed():
        if error is not None and not unless_all:
            raise error
        return
    flag = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64,
                        device=_tensor_device())
    failed = round(float(_all_reduce_sum(flag)))
    if not failed or (unless_all and failed == world_size()):
        return
    messages = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is None:
        who, message = next((r, m) for r, m in enumerate(messages) if m is not None)
        error = ValueError(f"{what} failed on rank {who}: {message}")
    error._landscape_agreed = True  # type: ignore[union-attr]
    raise error


def agreed(error: BaseException) -> bool:
    """Whether ``error`` was raised on every rank at one point by :func:`raise_together`.

    Every rank handles such an error alike; one raised on a single rank must be agreed on
    (:func:`raise_together`) before a rank takes another path than the others.
    """
    cause: BaseException | None = error
    while cause is not None:  # (re-raised from, e.g. the operator's own message)
        if getattr(cause, "_landscape_agreed", False):
            return True
        cause = cause.__cause__
    return False


def together(collective: bool, what: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``; with ``collective``, an error on any rank raises on every rank.

    For work each rank does alone before a collective (reading and cutting the probe
    data): one rank raising there alone would leave the others waiting in it
    (:func:`raise_together`, one object all-gather). ``what`` names the work in the
    other ranks' message. Every rank must call it with the same ``collective``.
    """
    if not collective:
        return fn(*args)
    error: BaseException | None = None
    result: Any = None
    try:
        result = fn(*args)
    except Exception as err:  # raised on every rank below
        if agreed(err):  # (already on every rank, by a vote inside fn)
            raise
        error = err
    raise_together(error, what)
    return result


def wrong_current_device(backend: str, current: int, devices: Sequence[torch.device]
                         ) -> str | None:
    """Why NCCL collectives would fail for a model on ``devices``, or ``None``.

    Under NCCL the helpers reduce and pickle on the current CUDA device, as
    ``torch.distributed``'s object collectives do: a rank whose model sits on another GPU
    than the current one (``model.to(rank)`` without ``torch.cuda.set_device(rank)``) puts
    its buffers on GPU ``current``, the same GPU as another rank's, and NCCL fails or hangs.

    Args:
        backend: the default group's backend.
        current: ``torch.cuda.current_device()``.
        devices: the devices of the model's parameters.
    """
    gpus = sorted({d.index for d in devices if d.type == "cuda" and d.index is not None})
    if "nccl" not in backend.lower() or "gloo" in backend.lower() or not gpus \
            or current in gpus:
        return None
    return (f"the model is on cuda:{gpus[0]} but the current CUDA device is cuda:{current}: "
            f"call torch.cuda.set_device(local_rank) before init_process_group('nccl') "
            f"(NCCL collectives run on the current device; docs/distributed.md)")


def check_current_device(model: nn.Module) -> None:
    """Raise :class:`ValueError` when NCCL's current CUDA device is not the model's.

    Only under a process group of several ranks (:func:`wrong_current_device`).
    """
    if not is_distributed() or not torch.cuda.is_initialized():
        return
    message = wrong_current_device(str(dist.get_backend()), torch.cuda.current_device(),
                                   [p.device for p in model.parameters()])
    if message is not None:
        raise ValueError(message)


def _object_device() -> torch.device | None:
    if str(dist.get_backend()).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def shard(indices: Sequence[T]) -> list[T]:
    """This rank's share of ``indices``: every ``world_size()``-th item from ``rank()``.

    Round robin, so neighbouring grid points (similar cost) land on different ranks; the
    shares of all ranks partition ``indices``. Without a process group: all of them.
    """
    return list(indices)[rank()::world_size()]


def map_sharded(
    items: Sequence[T],
    compute: Callable[[T], Any],
    collect: Callable[[T, Any], None] | None = None,
) -> None:
    """Evaluate ``compute(item)`` for ``items`` dealt round robin over the ranks.

    Work goes in rounds of ``world_size()`` items (item ``k * world_size() + rank()`` on
    this rank in round ``k``); after each round the results are all-gathered and rank 0
    calls ``collect(item, result)`` for each of them in item order, so whatever rank 0
    stores (e.g. a run file) is at most one round behind. Every rank must call this with
    the same ``items``. If ``compute`` raises on some rank, every rank raises at the end of
    that round (the failing rank its own exception, the others a ``RuntimeError`` naming
    it), so no rank is left waiting in a collective. Without a process group it is a plain
    loop with ``collect`` after each item. A sequence or an array is read in place; any
    other iterable (a map-style dataset too) is copied into a list first.
    """
    if not (isinstance(items, Sequence) or hasattr(items, "__array__")):
        items = list(items)  # (an index array is read in place: a grid's may hold 9M rows)
    if not is_distributed():
        for item in items:
            result = compute(item)
            if collect is not None:
                collect(item, result)
        return
    n_ranks, me = world_size(), rank()
    for start in range(0, len(items), n_ranks):
        index = start + me
        mine: tuple[int, Any, str | None] | None = None
        error: BaseException | None = None
        if index < len(items):
            try:
                mine = (index, compute(items[index]), None)
            except Exception as err:  # reported to every rank below
                error = err
                mine = (index, None, f"{type(err).__name__}: {err}")
        everyone = all_gather_objects(mine)
        failed = [(r, m[2]) for r, m in enumerate(everyone) if m is not None and m[2]]
        if failed:
            if error is not None:
                raise error
            who, what = failed[0]
            raise RuntimeError(f"rank {who} failed on item {everyone[who][0]}: {what}")
        if me == 0 and collect is not None:
            for entry in everyone:
                if entry is not None:
                    collect(items[entry[0]], entry[1])


# --------------------------------------------------------------------------- DTensor shards


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 ``fully_shard`` / tensor-parallel shard).

    FSDP2 registers every parameter of a ``fully_shard``-ed module as a ``DTensor`` whose
    local part is a ``Shard(0)`` chunk (PyTorch docs, "torch.distributed.fsdp.fully_shard";
    "torch.distributed.tensor").

    Args:
        tensor: any object (a parameter, a gradient, ...).

    Returns:
        True for a ``torch.distributed.tensor.DTensor``.
    """
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (the very storage, no copy), else ``tensor`` itself.

    Writing into the result under ``torch.no_grad()`` changes the shard FSDP all-gathers
    from, which is how perturbations are applied to a sharded model in place.

    Args:
        tensor: a tensor or DTensor.

    Returns:
        A plain tensor.
    """
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of a whole tensor ``full`` (the same on every rank), laid out as ``like``.

    No communication: every rank cuts its own chunk (``distribute_tensor`` with
    ``src_data_rank=None``).

    Args:
        full: a plain tensor of ``like``'s global shape, identical on all ranks.
        like: a DTensor (its mesh and placements), or a plain tensor (then ``full`` is
            returned as is).

    Returns:
        A plain tensor with the shape of ``like``'s local part.
    """
    if not is_sharded(like):
        return full
    if is_sharded(full):
        return full.to_local()
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        full.detach().to(like.device), like.device_mesh, like.placements, src_data_rank=None
    ).to_local()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor on every rank (one all-gather), else ``tensor``.

    FSDP2's ``Shard(0)`` layout (``torch.chunk`` rows, the last chunks shorter or empty) is
    gathered as equal, zero-padded chunks, since gloo's all-gather of uneven shards aborts;
    other layouts go through ``DTensor.full_tensor``. Every rank of the mesh must call it.
    Call sites gather one parameter at a time, never the whole model.

    Args:
        tensor: a tensor or DTensor.

    Returns:
        A plain tensor of the global shape (detached).
    """
    if not is_sharded(tensor):
        return tensor
    from torch.distributed.tensor import Shard

    mesh, placements = tensor.device_mesh, tensor.placements
    local = tensor.detach().to_local()
    if mesh.ndim == 1 and len(placements) == 1 and placements[0] == Shard(0):
        n, parts_n = tensor.shape[0], mesh.size()
        rows = -(-n // parts_n)
        padded = local.new_zeros((rows, *tensor.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(parts_n)]
        dist.all_gather(parts, padded.contiguous(), group=mesh.get_group())
        return torch.cat(parts)[:n]
    return tensor.detach().full_tensor()


def sharded_sum(values: Sequence[torch.Tensor], sharded: bool) -> torch.Tensor:
    """``sum`` over the ranks of shard-local partial sums (one all-reduce), as float64.

    For a norm of sharded parameters: each rank sums the squares of its shards, and the
    partial sums add up to the global sum (the shards partition every tensor).

    Args:
        values: this rank's partial sums (0-d or 1-d tensors, concatenated).
        sharded: whether the values are partial (reduce) or already global (returned as is).

    Returns:
        The float64 sums, on the CPU.
    """
    flat = torch.cat([torch.as_tensor(v).detach().double().reshape(-1).cpu() for v in values])
    if not sharded or not is_distributed():
        return flat
    return _all_reduce_sum(flat)


def compute_dtype(model: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The narrowest dtype the model computes in: ``dtype``, or an FSDP2 ``param_dtype``.

    ``fully_shard(module, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))``
    keeps float32 shards but all-gathers bfloat16 parameters for the forward and backward
    (PyTorch docs, ``MixedPrecisionPolicy``): the precision of what the model computes is
    then bfloat16's, whatever the stored parameters' dtype. The policy is read from each
    FSDP2 module's state, a private attribute: where it cannot be read, ``dtype``.

    Args:
        model: any module.
        dtype: the parameters' dtype.

    Returns:
        The dtype of largest unit roundoff among ``dtype`` and the policies' ``param_dtype``.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return dtype
    narrowest = dtype
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        try:
            policy_dtype = m._get_fsdp_state()._mp_policy.param_dtype
        except AttributeError:  # pragma: no cover - a torch without this private state
            continue
        if policy_dtype is not None and torch.finfo(policy_dtype).eps > torch.finfo(narrowest).eps:
            narrowest = policy_dtype
    return narrowest


def reshard(model: nn.Module) -> None:
    """Free the unsharded parameters FSDP2 may keep after a forward (the root's, by default).

    The next forward all-gathers the shards again, so values written into them in place
    (:func:`local_tensor`) are seen (PyTorch docs, ``FSDPModule.reshard``). No-op for a
    model without FSDP2 modules.

    Args:
        model: any module.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
