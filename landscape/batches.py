"""Batch structures shared by every consumer of user data: moving a nested batch to a device
and reading its number of samples.

A batch is a tensor, or tuples, lists and mappings of them (possibly nested), as a
``DataLoader`` with the default collate function yields them.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

__all__ = ["leading_size", "to_device"]


def to_device(obj: Any, device: torch.device | str, *, non_blocking: bool = False) -> Any:
    """``obj`` with every tensor moved to ``device``.

    Tuples, lists and mappings are rebuilt with their own type where it can be (namedtuples,
    ``OrderedDict``, Hugging Face ``BatchEncoding``), else as a plain ``dict``; other objects
    with a ``.to`` method are moved with it; anything else is returned unchanged.
    """
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        moved = {k: to_device(v, device, non_blocking=non_blocking) for k, v in obj.items()}
        try:
            return type(obj)(moved)
        except TypeError:
            return moved
    if isinstance(obj, (tuple, list)):
        items = [to_device(v, device, non_blocking=non_blocking) for v in obj]
        if hasattr(obj, "_fields"):  # a namedtuple
            return type(obj)(*items)
        return type(obj)(items)
    to = getattr(obj, "to", None)
    return to(device) if callable(to) else obj


def leading_size(obj: Any) -> int | None:
    """Length of the first dimension of the first tensor found in ``obj`` (depth first)."""
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0]) if obj.dim() > 0 else None
    values = obj.values() if isinstance(obj, Mapping) else obj
    if isinstance(obj, (Mapping, tuple, list)):
        for value in values:
            size = leading_size(value)
            if size is not None:
                return size
    return None
