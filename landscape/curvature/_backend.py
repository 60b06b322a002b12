"""Which differentiation path a model operator's products take.

``backend="func"`` computes every loss, gradient and product with ``torch.func``
(forward-over-reverse ``jvp(grad(L))`` for a Hessian product, batched by ``vmap``);
``"autograd"`` with double backward; ``"exact"`` single products by double backward (the
faster one on CPU) and batched ones by vmapped ``torch.func``; ``"first_order"`` by central
differences of gradients (:mod:`landscape.curvature._first_order`), no double backward.
``"auto"`` is ``"exact"`` while the exact product is possible: a model that ``torch.func``
cannot transform falls back to autograd for good, one that ``vmap`` cannot batch to a loop
of single products, and one with no double backward at all (or FSDP-sharded parameters) to
the first-order product, with one warning naming the reason (docs/curvature.md,
"Operators" and "First-order products").
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any, ContextManager

from landscape import distributed as _dist
from landscape._errors import LandscapeError
from landscape.findings import user_stacklevel

__all__ = ["BACKENDS", "Backend"]

BACKENDS = ("auto", "exact", "func", "autograd", "first_order")
_SAID: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
"""Per model, the reasons for the first-order product already warned about."""


class Backend:
    """The backend asked for and what has failed so far on this operator's model.

    Args:
        name: one of :data:`BACKENDS`.
        owner: the operator's class name, for messages.
        impossible: why the exact product cannot work on this model (FSDP-sharded
            parameters), known before any evaluation; ``None`` when it may.
        warn: warn when ``impossible`` makes ``"auto"`` take the first-order product.
        model: the model the operator differentiates: the switch is said once per model and
            reason (a monitor builds an operator at every measurement).

    Raises:
        ValueError: ``name`` is not one of these, or an exact backend was asked for where
            ``impossible`` says the exact product cannot work.

    Attributes:
        name: the backend asked for.
        func_failed: the error ``torch.func`` raised on this model (``"auto"`` only).
        vmap_failed: the error ``vmap`` raised on this model.
        reverse_over_reverse: forward-over-reverse failed (a loss without a forward-mode
            derivative of its backward), so the ``torch.func`` product is reverse-over-reverse.
        first_order_reason: why products are first-order: ``"asked for"``, or the reason
            the exact product is impossible; ``None`` while they are exact.
        ran: whether any evaluation has run.
        vote: called with an exact evaluation's error before anything else is tried (the
            operator's :meth:`~landscape.curvature._reduction.RankReduction.vote_on_fallback`:
            ranks fall back together or not at all); ``None``: nothing.
    """

    def __init__(
        self, name: str, owner: str = "operator", impossible: str | None = None,
        *, warn: bool = True, model: Any = None,
    ) -> None:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
        self.name = name
        self.owner = owner
        self.func_failed: BaseException | None = None
        self.vmap_failed: BaseException | None = None
        self.reverse_over_reverse = False
        self.first_order_reason: str | None = "asked for" if name == "first_order" else None
        self.ran = False
        self.vote: Callable[[BaseException], None] | None = None
        self._model = model
        if impossible is not None and name != "first_order":
            if name != "auto":
                raise ValueError(
                    f"backend={name!r}: the exact product is impossible here: {impossible}; "
                    "use backend='first_order' or 'auto'"
                )
            self._switch(impossible, warn=warn, together=True)  # the same model on every rank

    def _switch(self, reason: str, *, warn: bool = True, together: bool = False) -> None:
        self.first_order_reason = reason
        if warn:
            warn = self.say_once(reason)
        if warn and together and _dist.rank() != 0:  # decided alike: rank 0 says it for all
            warn = False
        if warn:
            warnings.warn(
                f"{self.owner}: the exact curvature product is impossible ({reason}); using "
                "the first-order product, central differences of gradients "
                "(backend_used='first_order'; docs/curvature.md, 'First-order products')",
                RuntimeWarning, stacklevel=user_stacklevel(),
            )

    def say_once(self, what: str) -> bool:
        """Whether ``what`` is to be said: the first time for this model (always without one)."""
        if self._model is None:
            return True
        said = _SAID.setdefault(self._model, set())
        fresh = what not in said
        said.add(what)
        return fresh

    @property
    def first_order(self) -> bool:
        """Whether evaluations take the first-order path (asked for or fallen back to)."""
        return self.first_order_reason is not None

    @property
    def used(self) -> str | None:
        """How evaluations ran so far: a backend name, ``"first_order"`` or ``None``.

        One of ``"func"``, ``"autograd"``, ``"auto"``, ``"exact"``, ``"first_order"``.

        ``"autograd"`` under ``"auto"`` (or ``"exact"``) means ``torch.func`` failed on
        this model, or its vmapped products were not symmetric (products one at a time),
        ``"first_order"`` that the exact product is impossible; ``None`` means nothing ran
        yet.
        """
        if not self.ran:
            return None
        if self.first_order:
            return "first_order"
        if self.func_failed or self.vmap_failed:
            return "autograd"
        return self.name

    @property
    def single_by_autograd(self) -> bool:
        """Whether single evaluations (loss, gradient, one product) use double backward."""
        if self.first_order:
            return False
        return self.name in ("autograd", "auto", "exact") or self.func_failed is not None

    @property
    def batched_by_vmap(self) -> bool:
        """Whether several products are batched by a vmapped ``torch.func`` product."""
        return (
            self.vmap_failed is None and self.name != "autograd" and not self.func_failed
            and not self.first_order
        )

    def run(
        self,
        context: Callable[[], ContextManager[Any]],
        func_impl: Callable[[], Any],
        autograd_impl: Callable[[], Any],
        first_order_impl: Callable[[], Any] | None = None,
        diagnose: Callable[[], None] | None = None,
    ) -> Any:
        """One evaluation by the chosen path, falling back under ``"auto"``.

        Under ``"auto"``, when the exact evaluation raises and ``first_order_impl``
        succeeds, the operator takes the first-order path for good and warns once; when
        both raise, the exact path's error is raised, unless the first-order path diagnosed
        the model (a :class:`~landscape._errors.LandscapeError`, e.g. parameters cut off
        from the loss's graph), whose error is raised from it.

        Args:
            context: the evaluation context, entered around each exact attempt.
            func_impl: the evaluation by ``torch.func``.
            autograd_impl: the evaluation by autograd.
            first_order_impl: the first-order evaluation (enters its own context), or
                ``None`` where there is none.
            diagnose: run when the exact evaluation raised, before the fallback; raises a
                :class:`~landscape._errors.LandscapeError` when the user's model or loss
                is what went wrong (a loss without a gradient graph), which no other
                product would fix.

        Returns:
            What the implementation that ran returned.
        """
        self.ran = True
        if self.first_order:
            if first_order_impl is None:
                raise ValueError(
                    f"{self.owner} has no first-order product ({self.first_order_reason})"
                )
            return first_order_impl()
        try:
            return self._run_exact(context, func_impl, autograd_impl)
        except Exception as err:
            if _dist.agreed(err):  # another rank failed: every rank leaves alike
                raise
            if self.vote is not None:  # a failure on some ranks only raises on all of them
                self.vote(err)
            if diagnose is not None:
                try:
                    diagnose()
                except LandscapeError as diagnosed:
                    raise diagnosed from err
                except Exception:  # the diagnosis failed itself: the fallback decides
                    pass
            if self.name != "auto" or first_order_impl is None:
                raise
            try:
                out = first_order_impl()
            except LandscapeError as diagnosed:  # it says what is wrong with the model
                raise diagnosed from err
            except Exception as fallback_failed:
                if _dist.agreed(fallback_failed):  # every rank left at that vote: as it is
                    raise
                raise err from None
            self._switch(f"{type(err).__name__}: {err}")
            return out

    def _run_exact(
        self,
        context: Callable[[], ContextManager[Any]],
        func_impl: Callable[[], Any],
        autograd_impl: Callable[[], Any],
    ) -> Any:
        if self.single_by_autograd:
            with context():
                return autograd_impl()
        try:
            with context():
                return func_impl()
        except Exception as err:
            if self.name == "func" or _dist.agreed(err):
                raise
            self.func_failed = err
            with context():
                return autograd_impl()

    def run_batched(
        self,
        context: Callable[[], ContextManager[Any]],
        vmapped: Callable[[], Any],
        loop: Callable[[], Any],
    ) -> Any:
        """Several products by ``vmap`` when possible, else (for good) by a loop.

        Args:
            context: the evaluation context, entered around the vmapped attempt.
            vmapped: the batched evaluation.
            loop: the loop of single products (enters its own contexts).

        Returns:
            What the implementation that ran returned.
        """
        if not self.batched_by_vmap:
            return loop()
        try:
            with context():
                self.ran = True
                return vmapped()
        except Exception as err:
            if _dist.agreed(err):
                raise
            self.vmap_failed = err
            return loop()
