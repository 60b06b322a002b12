import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from landscape import schedules as S


def test_every_and_start():
    sch = S.every(3, start=2)
    assert [s for s in range(12) if sch(s)] == [2, 5, 8, 11]
    assert str(sch) == "every(3, start=2)"


def test_at_and_never():
    assert [s for s in range(10) if S.at([1, 4, 4, 9])(s)] == [1, 4, 9]
    assert not any(S.never()(s) for s in range(100))


def test_logspace_is_dense_early_and_hits_both_ends():
    sch = S.logspace(0, 1000, 10)
    due = sorted(sch.steps)
    assert due[0] == 0 and due[-1] == 1000
    gaps = [b - a for a, b in itertools.pairwise(due)]
    assert gaps == sorted(gaps)  # spacing grows with the step


@given(st.integers(1, 50), st.integers(0, 20))
def test_parse_round_trips(n, start):
    for sch in (S.every(n, start), S.at([n, n + start + 1]), S.never()):
        again = S.parse(str(sch))
        assert all(again(s) == sch(s) for s in range(120))


def test_parse_accepts_int_and_schedule():
    assert S.parse(5) == S.every(5)
    sch = S.at([3])
    assert S.parse(sch) is sch


@pytest.mark.parametrize("text", ["every(0)", "sometimes", "every(a)", "logspace(5, 1, 3)", "at(1"])
def test_parse_rejects_bad_text_with_value_error(text):
    with pytest.raises(ValueError):
        S.parse(text)


@pytest.mark.parametrize("make", [lambda: S.every(2.5), lambda: S.every(2, start=0.5),
                                  lambda: S.at([1, 2.5]), lambda: S.parse(True),
                                  lambda: S.parse("every(2.5)"), lambda: S.every(True)])
def test_a_fractional_or_boolean_schedule_is_refused_not_rounded(make):
    """every(2.5) was every(2), schedule=True every(1), "every(2.5)" int()'s own error."""
    with pytest.raises(ValueError, match=r"whole number|schedule"):
        make()


def test_whole_numbers_of_any_kind_and_one_step_alone():
    import numpy as np

    assert S.parse(np.int64(5)) == S.every(5)  # was refused while 5 was accepted
    assert S.every(4.0) == S.every(4)
    assert S.at(5) == S.at([5])  # was 'int' object is not iterable


def test_torch_integers_are_whole_numbers_too():
    import torch

    assert S.every(torch.tensor(5)) == S.every(5)
    assert S.at(torch.arange(0, 30, 10)) == S.at([0, 10, 20])
    assert S.at(torch.tensor(3)) == S.at(3.0) == S.at([3])  # one step alone, any kind


def test_one_step_of_a_string_or_a_0d_array_is_read_whole():
    import numpy as np
    import torch

    assert S.at(np.array(5.0)) == S.at(torch.tensor(5.0)) == S.at([5])
    with pytest.raises(ValueError, match="got '12'"):  # was "got '1'", letter by letter
        S.at("12")


def test_started_says_whether_a_schedule_is_on_by_a_step():
    """What the adaptive window reads: never() never, every(k, start=s) from s, at(...) from
    its first listed step to its last (a logspace asked for nothing beyond it)."""
    from landscape.schedules import at, every, logspace, never

    assert not never().started(0) and not never().started(10**6)
    assert not every(10, start=1000).started(999) and every(10, start=1000).started(1000)
    assert every(3).started(0) and every(3).started(10**6)
    assert [s for s in range(12) if at([5, 9]).started(s)] == [5, 6, 7, 8, 9]
    assert not logspace(0, 100, 5).started(101)


def test_first_due_is_the_first_step_the_schedule_is_due_in_a_range():
    """What the monitor reads to say which due steps fell between two calls."""
    from landscape.schedules import Schedule, at, every, never

    for schedule in (every(10), every(10, start=3), every(1), at([5, 9, 40]), never()):
        for first, last in ((0, 0), (0, 9), (4, 12), (11, 19), (41, 100), (6, 5)):
            want = next((s for s in range(first, last + 1) if schedule(s)), None)
            assert schedule.first_due(first, last) == want, (schedule, first, last)
            assert Schedule.first_due(schedule, first, last) == want  # the generic loop
