"""Which optimizer steps came between two calls of ``Monitor.step``, and what step comes next.

The monitor's optimizer hooks see every ``optimizer.step()``; the training loop calls
``Monitor.step(step, ...)`` after some of them, numbering steps its own way (one call per
step, every ``n`` steps, per micro-batch, a Trainer's global step). :class:`StepClock` learns
the relation from the calls it has seen, so that the hooks can

- ask the metrics' schedules about the step the *next* call will have (a metric that needs
  the update Δθ must copy the parameters before the optimizer step that precedes it), and
- tell, at a call, whether an optimizer step applied this call's gradient (``False``: a
  ``GradScaler`` skipped it, or a micro-batch came in between), so the update metrics record
  NaN rather than a stale or empty update (docs/monitor.md, "Call `mon.step` after every
  optimizer step, or every `n`-th").
"""

from __future__ import annotations

__all__ = ["StepClock"]


class StepClock:
    """Optimizer steps counted by the hooks against the steps the caller gives.

    Attributes:
        last_step: the step of the last call (or the last recorded step of a resumed run);
            ``None`` before any.
        first_step: the step a first call is expected to have (0, or the step after a
            resumed run's last).
        optimizer_steps: optimizer steps since the last call.
    """

    def __init__(self) -> None:
        self.last_step: int | None = None
        self.first_step = 0
        self.optimizer_steps = 0
        self._stepped_once = False  # an optimizer step was seen (a call without one: a skip)
        self._per_call: int | None = None  # between the last two calls (None: unknown)
        self._steps_per_optimizer_step = 1.0  # as the caller numbers them
        self._last_gap: int | None = None  # steps between the last two calls
        # the last two full intervals had as many optimizer steps: one with fewer is short
        # (a count that varies by itself, 2, 3, 2, 3 under accumulation, is never short)
        self._steady = False

    def resume_after(self, step: int) -> None:
        """Continue a run whose last recorded step is ``step``."""
        self.last_step = step
        self.first_step = step + 1

    def next_step(self) -> int:
        """The step the next call will most likely have.

        After ``k`` optimizer steps since the last call, the last step plus ``k`` times the
        steps per optimizer step seen between earlier calls (1 until two calls with an
        optimizer step between them were seen).
        """
        k = max(self.optimizer_steps, 1)
        if self.last_step is None:  # nothing learned before the first call: one per step
            return self.first_step + k - 1
        return self.last_step + max(1, round(self._steps_per_optimizer_step * k))

    def optimizer_step(self) -> bool:
        """Count an optimizer step (before it runs); whether it may precede the next call.

        From the ``n``-th optimizer step since the last call on, ``n`` the count between the
        last two calls, every step may be the one right before the next call, and so is the
        first step of an interval: a call that comes earlier than the count says then
        measures the steps since the last call, rather than nothing. The steps in between
        are not (a sparse caller copies the parameters twice per call, not every step).
        """
        self.optimizer_steps += 1
        return not (self.optimizer_steps > 1 and self._per_call is not None
                    and self.optimizer_steps < self._per_call)

    def call(self, step: int, *, watching: bool) -> tuple[bool | None, bool]:
        """Record a call of ``Monitor.step`` at ``step``.

        Args:
            step: the call's step (already checked to come after ``last_step``).
            watching: the hooks saw every optimizer step since the last call (an
                optimizer was given, and the monitor did not start inside this call).

        Returns:
            ``(stepped, skipped)``: whether an optimizer step applied this call's gradient
            (``None`` when not watching), and whether none did although optimizer steps
            were seen before: a ``GradScaler`` skipped it, or a micro-batch came in between,
            so there is no update to measure. Called every ``n`` steps, a skipped step
            leaves ``n - 1`` optimizer steps since the last call where the previous
            interval of the same length had ``n``: such a short interval counts as not
            stepped, and teaches nothing about the caller's numbering. Only after two
            intervals with as many steps: a count that varies by itself (2, 3, 2, 3 steps
            between calls every 10 micro-batches under an accumulation of 4) is no skip.
        """
        stepped = self.optimizer_steps > 0 if watching else None
        gap = None if self.last_step is None else step - self.last_step
        short = (gap is not None and gap == self._last_gap and self._per_call is not None
                 and self._steady and 0 < self.optimizer_steps < self._per_call)
        self._last_gap = gap
        if stepped and short:
            stepped = False
        skipped = stepped is False and self._stepped_once and not short
        self._stepped_once = self._stepped_once or bool(stepped)
        if not short:
            if self.last_step is not None or self.optimizer_steps > 0:
                self._steady = self.optimizer_steps == self._per_call
                self._per_call = self.optimizer_steps  # since the last call, or the start
            if self.last_step is not None and self.optimizer_steps > 0:
                self._steps_per_optimizer_step = ((step - self.last_step)
                                                  / self.optimizer_steps)
        self.optimizer_steps = 0
        self.last_step = step
        return stepped, skipped
