"""Progress bars on stderr that stay readable in a log file.

On a terminal a bar redraws its line in place; written to a file or a CI log, every redraw
is a new line, and nested bars add cursor-movement codes (an escape sequence) to each: a long
``landscape analyze`` filled logs with hundreds of lines. Off a terminal (and outside a
notebook, whose bars are widgets) a bar here redraws at most every
:data:`LOG_INTERVAL` seconds, and nested bars are not drawn.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["LOG_INTERVAL", "above_bars", "bar", "interactive"]

LOG_INTERVAL = 30.0
"""Seconds between the redraws of a bar written to a file or a log."""


def interactive() -> bool:
    """Whether bars are drawn in place: stderr is a terminal, or a notebook shows them."""
    if "ipykernel" in sys.modules:
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def bar(iterable: Any = None, *, enabled: bool, nested: bool = False, **kwargs: Any) -> Any:
    """A ``tqdm.auto`` bar, drawn only when ``enabled``; see the module docstring.

    Args:
        iterable: what to iterate over, as ``tqdm``'s (None: update by hand).
        enabled: whether the caller wants a bar at all (``progress=``, not ``-q``).
        nested: a bar below another (``position=1``): drawn only in place.
        **kwargs: passed to ``tqdm``.

    Returns:
        The bar (disabled: every update does nothing).
    """
    from tqdm.auto import tqdm

    live = interactive()
    disable = not enabled or (nested and not live)
    if not live:
        kwargs.setdefault("mininterval", LOG_INTERVAL)
    return tqdm(iterable, disable=disable, **kwargs)


@contextlib.contextmanager
def above_bars() -> Iterator[None]:
    """Lines printed to stderr inside the block go above the ``tqdm`` bars being drawn.

    A warning printed while a bar is drawn (the user's ``tqdm(loader)``, a Hugging Face
    ``Trainer``'s or Lightning's bar) landed on the bar's line, after its text, and the next
    redraw overwrote it. The bars are cleared first and drawn again after the block
    (``tqdm.external_write_mode``); what prints the line is untouched (a warning keeps its
    filters, ``-W error`` and whoever records it). Nothing happens without a bar.
    """
    cls = getattr(sys.modules.get("tqdm"), "tqdm", None)  # never imported here: no bar
    if cls is None or not getattr(cls, "_instances", None):
        yield
        return
    with cls.external_write_mode(file=sys.stderr):
        yield
