"""Which differentiation path a model operator's products take: ``torch.func`` or autograd.

``backend="func"`` computes every loss, gradient and product with ``torch.func``
(forward-over-reverse ``jvp(grad(L))`` for a Hessian product, batched by ``vmap``);
``"autograd"`` with double backward; ``"auto"`` single products by double backward (the
faster one on CPU) and batched ones by vmapped ``torch.func``. Under ``"auto"`` a model that
``torch.func`` cannot transform falls back to autograd for good, and a model that ``vmap``
cannot batch falls back to a loop of single products (docs/curvature.md, "Operators").
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager

__all__ = ["BACKENDS", "Backend"]

BACKENDS = ("auto", "func", "autograd")


class Backend:
    """The backend asked for and what has failed so far on this operator's model.

    Args:
        name: ``"auto"``, ``"func"`` or ``"autograd"``.

    Raises:
        ValueError: ``name`` is not one of these.

    Attributes:
        name: the backend asked for.
        func_failed: the error ``torch.func`` raised on this model (``"auto"`` only).
        vmap_failed: the error ``vmap`` raised on this model.
        reverse_over_reverse: forward-over-reverse failed (a loss without a forward-mode
            derivative of its backward), so the ``torch.func`` product is reverse-over-reverse.
        ran: whether any evaluation has run.
    """

    def __init__(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
        self.name = name
        self.func_failed: BaseException | None = None
        self.vmap_failed: BaseException | None = None
        self.reverse_over_reverse = False
        self.ran = False

    @property
    def used(self) -> str | None:
        """How evaluations ran so far: ``"func"``, ``"autograd"``, ``"auto"`` or ``None``.

        ``"autograd"`` under ``"auto"`` means ``torch.func`` failed on this model; ``None``
        means nothing ran yet.
        """
        if not self.ran:
            return None
        if self.func_failed or self.vmap_failed:
            return "autograd"
        return self.name

    @property
    def single_by_autograd(self) -> bool:
        """Whether single evaluations (loss, gradient, one product) use double backward."""
        return self.name in ("autograd", "auto") or self.func_failed is not None

    @property
    def batched_by_vmap(self) -> bool:
        """Whether several products are batched by a vmapped ``torch.func`` product."""
        return self.vmap_failed is None and self.name != "autograd" and not self.func_failed

    def run(
        self,
        context: Callable[[], ContextManager[Any]],
        func_impl: Callable[[], Any],
        autograd_impl: Callable[[], Any],
    ) -> Any:
        """One evaluation by the chosen path, falling back to autograd under ``"auto"``.

        Args:
            context: the evaluation context, entered around each attempt.
            func_impl: the evaluation by ``torch.func``.
            autograd_impl: the evaluation by autograd.

        Returns:
            What the implementation that ran returned.
        """
        self.ran = True
        if self.single_by_autograd:
            with context():
                return autograd_impl()
        try:
            with context():
                return func_impl()
        except Exception as err:
            if self.name == "func":
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
            self.vmap_failed = err
            return loop()
