"""Argument checks shared by the library's entry points (one error naming the argument)."""

from __future__ import annotations

import math
import operator
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (the light CLI commands import this module without torch)
    import torch


def shown(value: object, limit: int = 80, *, typed: bool = False) -> str:
    """``value`` as an error message shows it: a tensor or array by its type and shape.

    A batch passed where a number belongs would otherwise fill the terminal with its
    entries; any other repr longer than ``limit`` characters is cut with ``...``. With
    ``typed``, the type's name comes first (``str '3'``), as it does for a tensor.
    """
    if getattr(value, "ndim", 0) and hasattr(value, "shape"):  # not a 0-d tensor: its value
        return f"{type(value).__name__} of shape {tuple(value.shape)}"  # type: ignore[attr-defined]
    if isinstance(value, (tuple, list)) and any(hasattr(v, "shape") for v in value):
        parts = ", ".join(shown(v, limit) for v in value[:4])
        return f"{type(value).__name__} ({parts}{', ...' if len(value) > 4 else ''})"
    text = repr(value)
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(value).__name__} {text}" if typed else text


def integer_at_least(name: str, value: object, least: int) -> int:
    """``value`` as an int >= ``least``: an int, a numpy or torch integer; not a bool or a float.

    Args:
        name: the argument's name, for the error.
        value: what was given.
        least: the smallest value allowed.

    Raises:
        ValueError: anything else.
    """
    if not isinstance(value, bool):
        try:
            number = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            number = least - 1
        if number >= least:
            return number
    raise ValueError(f"{name} must be an integer >= {least}, got {shown(value)}")


def positive_int(name: str, value: object) -> int:
    """``value`` as an int >= 1 (:func:`integer_at_least`)."""
    return integer_at_least(name, value, 1)


def positive_number(name: str, value: object) -> float:
    """``value`` as a finite float > 0: an int or a float of any kind; not a bool.

    Raises:
        ValueError: anything else (a string, NaN, 0, a negative number).
    """
    if not isinstance(value, (bool, str, bytes)):
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            number = math.nan
        if number > 0 and math.isfinite(number):
            return number
    raise ValueError(f"{name} must be a positive number, got {shown(value)}")


def seed_value(value: object) -> int:
    """``value`` as an int seed >= 0 (:func:`integer_at_least`)."""
    return integer_at_least("seed", value, 0)


def run_path(path: object) -> None:
    """Refuse a run file's ``path`` that is neither a path nor None (a run in memory).

    Raises:
        TypeError: naming what was given.
    """
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or os.PathLike), or None for a "
                        f"run in memory, got {shown(path, typed=True)}")


def callables(owner: str = "", **functions: object) -> None:
    """Refuse any of ``functions`` that is neither callable nor None.

    Args:
        owner: prefixed to the message (``"Hessian: "``), or nothing.
        **functions: the arguments by name.

    Raises:
        TypeError: naming the first argument that is not callable.
    """
    for name, fn in functions.items():
        if fn is not None and not callable(fn):
            raise TypeError(f"{owner}{name} must be callable, got {shown(fn, typed=True)}")


def integer_dtype(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` holds integers: class indices, token ids (not bool, float, complex)."""
    import torch

    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
