"""Progress bars on stderr that stay readable in a log file.

On a terminal a bar redraws its line in place; written to a file or a CI log, every redraw
is a new line, and nested bars add cursor-movement codes (an escape sequence) to each: a long
``landscape analyze`` filled logs with hundreds of lines. Off a terminal (and outside a
notebook, whose bars are widgets) a bar here redraws at most every
:data:`LOG_INTERVAL` seconds, and nested bars are not drawn.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["LOG_INTERVAL", "PRODUCTS_DELAY", "above_bars", "bar", "interactive", "products_bar"]

LOG_INTERVAL = 30.0
"""Seconds between the redraws of a bar written to a file or a log."""

PRODUCTS_DELAY = 2.0
"""Seconds a curvature computation runs before its bar of products appears."""


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
    if live:
        return tqdm(iterable, disable=disable, **kwargs)
    # a log: nothing for work shorter than LOG_INTERVAL, then a line that often
    kwargs.setdefault("mininterval", LOG_INTERVAL)
    kwargs.setdefault("delay", LOG_INTERVAL)
    return _log_bar(tqdm)(iterable, disable=disable, **kwargs)


@functools.cache
def _log_bar(base: type) -> type:
    """``base`` (a tqdm class) drawing nothing at all until its ``delay`` has passed.

    tqdm's ``delay`` holds back the redraws of ``update`` only: a ``set_postfix_str`` or
    the redraw after a warning (:func:`above_bars`) drew a 0 % line into the log at once,
    which ``close`` then neither ended nor cleared (its text ran on into the next line).
    """

    class LogBar(base):  # type: ignore[misc,valid-type]
        _landscape_drawn = False

        def refresh(self, *args: Any, **kwargs: Any) -> Any:
            start = getattr(self, "start_t", None)
            if start is not None and self._time() < start + self.delay:
                return False
            return super().refresh(*args, **kwargs)

        def display(self, *args: Any, **kwargs: Any) -> Any:
            self._landscape_drawn = True
            return super().display(*args, **kwargs)

        def close(self) -> None:
            if self._landscape_drawn and self.last_print_t < self.start_t + self.delay:
                self.last_print_t = self.start_t + self.delay  # drawn: end its line
            super().close()

    return LogBar


@contextlib.contextmanager
def above_bars() -> Iterator[None]:
    """Lines printed to stderr inside the block go above the ``tqdm`` bars being drawn.

    A warning printed while a bar is drawn (the user's ``tqdm(loader)``, a Hugging Face
    ``Trainer``'s or Lightning's bar) landed on the bar's line, after its text, and the next
    redraw overwrote it. The bars on stdout or stderr are cleared first and drawn again
    after the block, as ``tqdm.external_write_mode`` does, except those that have drawn
    nothing yet (:func:`_on_screen`); what prints the line is untouched (a warning keeps its
    filters, ``-W error`` and whoever records it). Nothing happens without a bar.
    """
    cls = getattr(sys.modules.get("tqdm"), "tqdm", None)  # never imported here: no bar
    drawn = [each for each in list(getattr(cls, "_instances", None) or ())
             if _on_screen(each) and each.fp in (sys.stdout, sys.stderr)]
    if cls is None or not drawn:
        yield
        return
    with cls.get_lock():
        for each in drawn:
            each.clear(nolock=True)
        try:
            yield
        finally:
            for each in drawn:
                each.refresh(nolock=True)


def _on_screen(bar: Any) -> bool:
    """Whether ``bar`` has drawn itself (and is not disabled).

    A bar of ours in a log records whether it drew (:func:`_log_bar`); any other bar has
    drawn once an update came past its ``delay``. A bar that has drawn nothing, redrawn
    after a warning (what ``tqdm.external_write_mode`` does to every bar), wrote its 0 %
    line once per warning into the log.
    """
    start = getattr(bar, "start_t", None)
    if start is None or bar.disable:
        return False
    drawn = getattr(bar, "_landscape_drawn", None)  # (a bar of ours in a log knows)
    return drawn if drawn is not None else bar.last_print_t >= start + getattr(bar, "delay", 0.0)


@contextlib.contextmanager
def products_bar(op: Any, *, total: int, desc: str, enabled: bool) -> Iterator[Any]:
    """A bar of the curvature products ``op`` makes inside the block.

    It appears only after :data:`PRODUCTS_DELAY` seconds, so a quick computation (a small
    model, a test) draws nothing, while a Lanczos run on a 100M-parameter model, minutes
    long, shows each product as it ends. Distributed, only rank 0 draws it. The bar follows
    ``op.n_matvec`` (a :class:`~landscape.curvature.CurvatureOperator` calls its
    ``_on_count`` at every change); ``op`` is left as it was on exit.

    Args:
        op: the operator whose products are counted (the one the solver multiplies by).
        total: the products expected (a cap: the bar may stop short of it, or pass it).
        desc: the bar's label.
        enabled: whether the caller wants a bar (``progress=``).

    Yields:
        The bar, for ``set_postfix_str`` (no bar drawn: a stand-in that ignores it).
    """
    from landscape import distributed

    if not enabled or distributed.rank() != 0:
        # no tqdm at all: its first import resets Python's once-per-location warning
        # registry (a catch_warnings), and the monitor measures inside the user's loop
        yield _NoBar()
        return
    drawn = bar(enabled=True, total=total, desc=desc, unit="product", leave=False,
                delay=PRODUCTS_DELAY)
    start, previous = op.n_matvec, op._on_count

    def counted(n: int) -> None:
        drawn.update(n - start - drawn.n)
        if previous is not None:
            previous(n)

    op._on_count = counted
    try:
        yield drawn
    finally:
        op._on_count = previous
        drawn.close()


class _NoBar:
    """What :func:`products_bar` yields when no bar is drawn: its postfix goes nowhere."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Nothing."""
