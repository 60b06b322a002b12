"""StepClock: the optimizer steps between calls of Monitor.step, exactly, in every calling pattern.

The monitor's end-to-end tests check the update rows these decisions produce; these check the
decisions themselves, step by step.
"""

from __future__ import annotations

from landscape.monitor.clock import StepClock


def _optimizer_steps(clock: StepClock, n: int) -> list[bool]:
    return [clock.optimizer_step() for _ in range(n)]


def test_a_call_after_every_optimizer_step():
    clock = StepClock()
    for step in range(5):
        assert _optimizer_steps(clock, 1) == [True]
        assert clock.next_step() == step
        assert clock.call(step, watching=True) == (True, False)
    assert clock.last_step == 4


def test_a_call_every_fourth_step_copies_twice_per_call_and_predicts_the_next():
    clock = StepClock()
    # before the first call nothing is known: every optimizer step may precede it
    assert _optimizer_steps(clock, 4) == [True] * 4
    assert clock.next_step() == 3
    assert clock.call(3, watching=True) == (True, False)
    # then: the interval's first step (a call might come early) and its last
    assert _optimizer_steps(clock, 4) == [True, False, False, True]
    assert clock.next_step() == 7
    assert clock.call(7, watching=True) == (True, False)
    _optimizer_steps(clock, 2)
    assert clock.next_step() == 9  # two optimizer steps at one step each


def test_steps_numbered_in_samples_are_predicted_in_samples():
    clock = StepClock()
    clock.optimizer_step()
    clock.call(0, watching=True)
    clock.optimizer_step()
    clock.call(32, watching=True)  # the caller counts 32 per optimizer step
    clock.optimizer_step()
    assert clock.next_step() == 64


def test_a_call_without_an_optimizer_step_is_a_skip_once_steps_were_seen():
    clock = StepClock()
    for step in range(3):
        clock.optimizer_step()
        clock.call(step, watching=True)
    # a GradScaler skipped the step: no optimizer step before this call
    assert clock.call(3, watching=True) == (False, True)
    # not watching (no optimizer, or the monitor started inside this call): unknown
    clock.optimizer_step()
    assert clock.call(4, watching=False) == (None, False)


def test_calls_before_any_optimizer_step_are_no_skip():
    clock = StepClock()
    assert clock.call(0, watching=True) == (False, False)  # nothing seen yet
    assert clock.call(1, watching=True) == (False, False)


def test_per_micro_batch_calls_mark_the_calls_between_optimizer_steps():
    clock = StepClock()
    got = []
    for step in range(8):  # the optimizer steps after every 4th micro-batch
        if step % 4 == 3:
            clock.optimizer_step()
        got.append(clock.call(step, watching=True))
    assert got == [(False, False)] * 3 + [(True, False)] + [(False, True)] * 3 + [(True, False)]


def test_a_short_interval_is_not_stepped_and_teaches_nothing():
    clock = StepClock()
    for step in (1, 3, 5):  # called every 2 optimizer steps
        _optimizer_steps(clock, 2)
        clock.call(step, watching=True)
    # a GradScaler skipped one of the next two: one optimizer step where 2 were due
    clock.optimizer_step()
    assert clock.call(7, watching=True) == (False, False)  # not stepped, not a skip either
    # the count per call is still 2: the next interval's second step may precede the call
    assert _optimizer_steps(clock, 2) == [True, True]
    assert clock.next_step() == 9


def test_a_count_that_varies_by_itself_is_no_short_interval():
    """Calls every 10 micro-batches under an accumulation of 4 see 2, 3, 2, 3 optimizer
    steps: every interval of 2 was read as a skipped step (NaN updates, nonfinite/skipped
    1) though none was skipped."""
    clock = StepClock()
    got = []
    for i, step in enumerate(range(9, 90, 10)):
        _optimizer_steps(clock, 2 if i % 2 == 0 else 3)
        got.append(clock.call(step, watching=True))
    assert got == [(True, False)] * len(got)


def test_a_resumed_clock_continues_after_the_recorded_step():
    clock = StepClock()
    clock.resume_after(41)
    assert (clock.last_step, clock.first_step) == (41, 42)
    clock.optimizer_step()
    assert clock.next_step() == 42
