"""Batch structures shared by every consumer of user data.

Moving a nested batch to a device, reading its number of samples, splitting it into
micro-batches, and storing it in plain containers (and back).

A batch is a tensor, or tuples, lists and mappings of them (possibly nested), as a
``DataLoader`` with the default collate function yields them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from landscape._hf import peft_base
from landscape.distributed import unwrap

__all__ = [
    "PAIR_KEYS",
    "WHOLE_PAIR_KEYS",
    "cast_like",
    "head",
    "in_containers_of",
    "leading_size",
    "map_tensors",
    "model_call",
    "normal_tensors",
    "plain_containers",
    "rebuilt",
    "sample_sequences",
    "split",
    "takes_whole_batch",
    "to_device",
]


PAIR_KEYS = (("inputs", "targets"), ("x", "y"))  # dict batches of (inputs, targets)
WHOLE_PAIR_KEYS = (("image", "label"), ("images", "labels"))
"""Dict batches of (inputs, targets) when they are the dict's only keys: Hugging Face's
image datasets; beside other keys (a vision-language batch's ``input_ids``) they are
keyword arguments."""


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any], other: Callable[[Any], Any] | None
                = None) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it, the structure rebuilt.

    Tuples, lists and mappings are rebuilt with their own type where it can be (namedtuples,
    ``OrderedDict``, Hugging Face ``BatchEncoding``), else as a plain ``dict``; any other
    leaf goes through ``other`` (default: returned unchanged).
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return rebuilt(obj, {k: map_tensors(v, fn, other) for k, v in obj.items()})
    if isinstance(obj, (tuple, list)):
        return rebuilt(obj, [map_tensors(v, fn, other) for v in obj])
    return other(obj) if other is not None else obj


class _Unlike(Exception):
    """Two batches laid out differently (:func:`cast_like`)."""


def cast_like(obj: Any, like: Any) -> tuple[Any, list[torch.dtype]]:
    """``obj`` with each floating-point tensor in the dtype of the tensor at its place in ``like``.

    The places match when the two are laid out alike: mappings with the same keys (matched
    by key), sequences of the same length (matched by position), and tensors with the same
    number of dimensions (their sizes may differ); else ``obj`` is returned as it is. Only
    a floating-point tensor facing a floating-point tensor of another dtype is cast: a
    float32 validation batch next to the bfloat16 inputs of a model trained in bfloat16
    becomes bfloat16, while integer targets, masks, and float targets the loop keeps in
    float32 stay as they are.

    Returns:
        The batch (``obj`` itself when nothing was cast) and the dtypes that were cast.
    """
    cast: list[torch.dtype] = []

    def walk(a: Any, b: Any) -> Any:
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) \
                    or a.dim() != b.dim():
                raise _Unlike
            if a.is_floating_point() and b.is_floating_point() and a.dtype != b.dtype:
                if a.dtype not in cast:
                    cast.append(a.dtype)
                return a.to(b.dtype)
            return a
        if isinstance(a, Mapping) or isinstance(b, Mapping):
            if not (isinstance(a, Mapping) and isinstance(b, Mapping)) or set(a) != set(b):
                raise _Unlike
            return rebuilt(a, {k: walk(v, b[k]) for k, v in a.items()})
        if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
            if not (isinstance(a, (tuple, list)) and isinstance(b, (tuple, list))) \
                    or len(a) != len(b):
                raise _Unlike
            return rebuilt(a, [walk(x, y) for x, y in zip(a, b)])
        return a

    try:
        out = walk(obj, like)
    except _Unlike:
        return obj, []
    return (out, cast) if cast else (obj, cast)


def normal_tensors(obj: Any) -> Any:
    """``obj`` with each tensor made under ``torch.inference_mode()`` copied to a normal one.

    Autograd cannot save an inference tensor for backward, so a batch collated in an
    inference-mode block could not be differentiated through; ``obj`` itself when it holds
    none (the common case: no copy, no rebuilt containers).
    """
    found: list[bool] = []
    map_tensors(obj, lambda t: found.append(t.is_inference()))
    if not any(found):
        return obj
    with torch.inference_mode(False):
        return map_tensors(obj, lambda t: t.clone() if t.is_inference() else t)


def rebuilt(like: Any, items: Any) -> Any:
    """``items`` (a dict, or a list of a sequence's items) in the container type of ``like``.

    Namedtuples take their items as arguments; a mapping type that cannot be built from a
    dict leaves the plain ``dict``.
    """
    if isinstance(like, Mapping):
        try:
            return type(like)(items)
        except TypeError:
            return items
    if hasattr(like, "_fields"):  # a namedtuple
        return type(like)(*items)
    return type(like)(items)


def plain_containers(obj: Any) -> Any:
    """``obj`` on the CPU in plain dicts, tuples and lists, for ``torch.save``.

    A tokenizer's ``BatchEncoding`` or a namedtuple would not load back with
    ``torch.load(weights_only=True)``; :func:`in_containers_of` puts them back.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: plain_containers(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(plain_containers(v) for v in obj)
    if isinstance(obj, list):
        return [plain_containers(v) for v in obj]
    return obj


def in_containers_of(obj: Any, like: Any) -> Any:
    """``obj`` (plain containers) rebuilt in the container types of the batch ``like``.

    Where the two structures match (a closure may read ``batch.x`` or
    ``batch.input_ids``); elsewhere ``obj`` stays as it is.
    """
    if isinstance(like, Mapping) and isinstance(obj, Mapping):
        return rebuilt(like, {k: in_containers_of(v, like.get(k)) for k, v in obj.items()})
    if isinstance(like, (tuple, list)) and isinstance(obj, (tuple, list)) \
            and len(obj) == len(like):
        return rebuilt(like, [in_containers_of(v, u) for v, u in zip(obj, like)])
    return obj


def to_device(obj: Any, device: torch.device | str, *, non_blocking: bool = False) -> Any:
    """Move every tensor of a nested batch to ``device``.

    Tensors are mapped with :func:`map_tensors`; other objects with a ``.to`` method are moved
    with it, anything else is returned unchanged.

    Args:
        obj: a tensor, or tuples, lists and mappings of them (possibly nested).
        device: the target device.
        non_blocking: passed to ``Tensor.to``.

    Returns:
        ``obj`` with the same structure, its tensors on ``device``.
    """

    def other(leaf: Any) -> Any:
        to = getattr(leaf, "to", None)
        return to(device) if callable(to) else leaf

    return map_tensors(obj, lambda t: t.to(device, non_blocking=non_blocking), other)


def sample_sequences(obj: Any) -> tuple[int, set[int]] | None:
    """``(samples, ids)`` of the per-sample lists of a batch; None when it has none.

    torchvision's detection convention: an ``(images, targets)`` pair whose ``targets`` is
    a list (or tuple) of dicts with one set of keys, one per image, and whose ``images``
    may be a list of ``(C, H, W)`` tensors of the same length. Their length is the batch's
    size (the first tensor's leading dimension would be the channels), and they are cut
    by index (:func:`head`, :func:`split`). Nothing else is: a list of tensors alone is
    what a ``DataLoader`` collates, fields (``[inputs, targets]``), and a pair of
    tokenizer encodings inside the inputs is two inputs of the batch's samples; inputs
    whose first tensor leads with another length than the dicts' count are no such pair.
    A dict
    batch's list of dicts as long as its tensors' leading dimension (Hugging Face DETR's
    ``{"pixel_values", "labels": [{...}, ...]}``) is cut by index too.

    Returns:
        The samples, and the ``id`` of each per-sample list.
    """
    if isinstance(obj, Mapping):
        n = _first_leading(obj)
        found = {id(v) for v in obj.values() if _dicts_alike(v) and len(v) == n}
        return (n, found) if n is not None and found else None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        return None
    inputs, targets = obj
    if not _dicts_alike(targets):
        return None
    n = len(targets)
    ids = {id(targets)}
    if isinstance(inputs, (tuple, list)) and len(inputs) == n and all(
            isinstance(v, torch.Tensor) and v.dim() >= 1 for v in inputs) \
            and len({v.dim() for v in inputs}) == 1:
        ids.add(id(inputs))
    elif _first_leading(inputs) not in (None, n):  # (x of 32 samples, [2 dicts]): no
        return None
    return n, ids


def _dicts_alike(value: Any) -> bool:
    """Whether ``value`` is a non-empty list or tuple of dicts with one set of keys."""
    return isinstance(value, (tuple, list)) and bool(value) and all(
        isinstance(v, Mapping) for v in value) and len({frozenset(v) for v in value}) == 1


def _cut(obj: Any, start: int, stop: int) -> Any:
    """Samples ``start`` to ``stop`` of ``obj``.

    Per-sample lists by index, tensors along their leading dimension when it is the
    batch's (:func:`leading_size`).
    """
    found = sample_sequences(obj)
    size = found[0] if found is not None else _first_leading(obj)
    if size is None:
        return obj
    ids = found[1] if found is not None else set()

    def walk(value: Any) -> Any:
        if id(value) in ids:
            return rebuilt(value, list(value[start:stop]))
        if isinstance(value, torch.Tensor):
            return value[start:stop] if value.dim() > 0 and value.shape[0] == size else value
        if isinstance(value, Mapping):
            return rebuilt(value, {k: walk(v) for k, v in value.items()})
        if isinstance(value, (tuple, list)):
            return rebuilt(value, [walk(v) for v in value])
        return value

    return walk(obj)


def head(obj: Any, n: int) -> Any:
    """The first ``n`` samples of a batch (views).

    Every tensor whose leading length is the batch's (:func:`leading_size`: the first
    tensor's) is sliced; the others (a ``(T, T)`` attention mask shared by the samples, a
    one-element scale, 0-d tensors) and other values pass through. A mask whose side
    equals the batch's size cannot be told apart and is sliced too. Per-sample lists
    (:func:`sample_sequences`) keep their first ``n`` items.

    Args:
        obj: a tensor, or tuples, lists and mappings of them.
        n: how many samples to keep.

    Returns:
        ``obj`` with the same structure.
    """
    return _cut(obj, 0, n)


def split(obj: Any, size: int) -> list[Any]:
    """``obj`` cut into micro-batches of at most ``size`` samples, in order.

    The batch dimension is the leading dimension of the first tensor (:func:`leading_size`);
    every tensor whose leading dimension has that length is sliced along it, per-sample
    lists (:func:`sample_sequences`) by index, everything else (scalars, masks of another
    shape, non-tensors) is shared by all micro-batches.
    """
    if size < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {size}")
    n = leading_size(obj)
    if n is None:
        raise ValueError("cannot split a batch without tensors (no batch dimension found)")
    return [_cut(obj, start, start + size) for start in range(0, n, size)]


def leading_size(obj: Any) -> int | None:
    """Length of the first dimension of the first tensor found in ``obj`` (depth first).

    The batch's samples come first by convention (``(inputs, targets)``, ``input_ids``):
    a rule that counted the lengths most tensors share instead was tried and dropped, as
    the tensors inside per-sample lists (a detection batch's target dicts) and the
    positions of a one-sample batch outvote the samples. A batch holding per-sample lists
    (:func:`sample_sequences`: images and their target dicts) has their length.
    """
    found = sample_sequences(obj)
    if found is not None:
        return found[0]
    return _first_leading(obj)


def _first_leading(obj: Any) -> int | None:
    """The first tensor's leading length, depth first (:func:`leading_size`'s rule)."""
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0]) if obj.dim() > 0 else None
    values = obj.values() if isinstance(obj, Mapping) else obj
    if isinstance(obj, (Mapping, tuple, list)):
        for value in values:
            size = _first_leading(value)
            if size is not None:
                return size
    return None


def model_call(model: Callable[..., Any], inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` of ``model(*args, **kwargs)`` for a batch's ``inputs``.

    Read from the signature of the model's ``forward`` (of the module a wrapper such as
    DDP, ``torch.compile`` or a PEFT model passes its arguments to):

    * a tuple is several inputs, unpacked, ``((x1, x2), y)`` calling ``model(x1, x2)`` as
      the curvature operators always did (docs/curvature.md, "Data"), when the forward
      takes that many positional arguments (or its signature cannot be read); else one
      argument (a ``forward(self, pair)``);
    * a mapping whose keys all name parameters of a forward that has several (or one
      that takes ``**kwargs`` the keys it does not name; or keyword-only ones) is its
      keyword arguments: ``(tokenizer(texts), labels)`` calls ``model(**inputs)``, as a
      training loop does; any other mapping is one argument (a ``forward(self,
      features)`` of a dict of features, also ``{"features": ...}``);
    * anything else is one argument (a list stays one: torchvision's detection models take
      a list of images), named when the forward takes no positional argument and one
      keyword-only one without a default (``forward(self, *, x)``: ``model(x=inputs)``).
    """
    if isinstance(inputs, tuple):
        capacity = _signature(_forward_of(model))[1]
        return (inputs, {}) if capacity is None or capacity >= len(inputs) else ((inputs,), {})
    if isinstance(inputs, Mapping) and inputs and all(isinstance(k, str) for k in inputs):
        names, positional, more = _signature(_forward_of(model))
        keys = set(inputs)
        named = keys <= names or (more and bool(keys & names))  # **kwargs takes the rest
        if named and (len(names) > 1 or positional == 0):
            return (), dict(inputs)
    elif not isinstance(inputs, Mapping):
        _, positional, _, required = _parameters(_forward_of(model))
        if positional == 0 and len(required) == 1:  # forward(self, *, x): model(x=inputs)
            return (), {required[0]: inputs}
    return (inputs,), {}


def takes_whole_batch(model: Callable[..., Any], batch: Mapping[str, Any]) -> bool:
    """Whether ``model`` takes the dict ``batch`` itself as its one argument.

    A ``forward(self, batch)`` (a LightningModule's, reading ``batch["feats"]`` itself):
    one positional parameter, no ``**kwargs``, and no key that names it. Such a model
    cannot be called as ``model(**batch)``; a ``forward(self, input_ids)`` given
    ``{input_ids, attention_mask}`` is called so, and says which key it does not take.
    """
    names, positional, more = _signature(_forward_of(model))
    return positional == 1 and not more and not set(batch) & names


def _forward_of(model: Any) -> Any:
    """The ``forward`` whose signature says how ``model(...)`` is called (None: unknown).

    Wrappers whose own forward takes ``*args, **kwargs`` and passes them on are looked
    through: DDP, ``DataParallel``, ``torch.compile`` and Lightning Fabric
    (:func:`~landscape.distributed.unwrap`), FSDP's ``FullyShardedDataParallel`` and a
    PEFT model (its base model's forward). A
    TorchScript module's forward has no Python signature: unknown. A callable that is no
    module is itself.
    """
    if not isinstance(model, torch.nn.Module):
        return model
    module = unwrap(model)
    for _ in range(4):
        inner = _wrapped(module)
        if inner is None:
            break
        module = inner
    if isinstance(module, torch.jit.ScriptModule):
        return None
    return getattr(type(module), "forward", None)


def _wrapped(module: torch.nn.Module) -> torch.nn.Module | None:
    """The module a known pass-through wrapper holds, else None."""
    if isinstance(module, _fsdp_wrapper()):
        return module.module
    base = peft_base(module)
    return base if base is not module else None


@functools.cache
def _fsdp_wrapper() -> type | tuple:
    """FSDP's ``FullyShardedDataParallel`` class, looked up once.

    The ``from ... import`` costs ~60 µs a call; the forward is read at every step.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - a torch without distributed
        return ()
    return FullyShardedDataParallel


def _signature(function: Callable[..., Any] | None) -> tuple[frozenset[str], int | None, bool]:
    """``(names, positional, more)`` of ``function``'s parameters, ``self`` left out.

    ``names``: those a keyword can name; ``positional``: how many positional arguments it
    takes (None: any number, ``*args``, or no signature to read); ``more``: it takes
    ``**kwargs``.
    """
    return _parameters(function)[:3]


def _parameters(
    function: Callable[..., Any] | None,
) -> tuple[frozenset[str], int | None, bool, tuple[str, ...]]:
    """:func:`_signature` and the keyword-only parameters without a default.

    Read once per function: the monitor reads the model's forward at every step.
    """
    if function is None:
        return frozenset(), None, False, ()
    # a bound forward is read through its function: one entry per class, not per instance
    inner = getattr(function, "__func__", None)
    try:
        return _read_parameters(inner, True) if inner is not None \
            else _read_parameters(function, False)
    except TypeError:  # unhashable: an object whose __eq__ has no __hash__
        return _read_parameters.__wrapped__(function, False)


@functools.lru_cache(maxsize=256)
def _read_parameters(
    function: Callable[..., Any], bound: bool,
) -> tuple[frozenset[str], int | None, bool, tuple[str, ...]]:
    """:func:`_parameters` of ``function``; ``bound``: its first parameter is the instance."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature
        return frozenset(), None, False, ()
    if bound and parameters and parameters[0].kind in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        parameters = parameters[1:]
    parameters = [p for p in parameters if p.name != "self"]
    kind = inspect.Parameter
    names = frozenset(p.name for p in parameters
                      if p.kind in (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY))
    varargs = any(p.kind == kind.VAR_POSITIONAL for p in parameters)
    positional = None if varargs else sum(
        p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD) for p in parameters)
    required = tuple(p.name for p in parameters
                     if p.kind == kind.KEYWORD_ONLY and p.default is inspect.Parameter.empty)
    return names, positional, any(p.kind == kind.VAR_KEYWORD for p in parameters), required
