"""Argument checks shared by the library's entry points (one error naming the argument)."""

from __future__ import annotations

import operator


def positive_int(name: str, value: object) -> int:
    """``value`` as an int >= 1: an int, a numpy or torch integer; not a bool or a float.

    Args:
        name: the argument's name, for the error.
        value: what was given.

    Raises:
        ValueError: anything else.
    """
    if not isinstance(value, bool):
        try:
            number = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            number = 0
        if number >= 1:
            return number
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
