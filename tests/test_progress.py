"""Progress bars: in place on a terminal, sparse in a log file (no nested bars there)."""

from __future__ import annotations

import io

import landscape._progress as progress


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_bars_in_a_log_redraw_rarely_and_nested_ones_are_not_drawn(monkeypatch):
    log = _Stream(tty=False)
    monkeypatch.setattr(progress.sys, "stderr", log)
    monkeypatch.delitem(progress.sys.modules, "ipykernel", raising=False)
    assert not progress.interactive()
    outer = progress.bar(enabled=True, total=500, file=log)
    inner = progress.bar(enabled=True, nested=True, total=10, file=log, position=1)
    assert inner.disable and not outer.disable
    for _ in range(500):
        outer.update()
        inner.update()
    outer.close()
    inner.close()
    assert outer.mininterval == progress.LOG_INTERVAL
    assert log.getvalue().count("\n") <= 3 and "\x1b[A" not in log.getvalue()


def test_bars_on_a_terminal_are_drawn_in_place_and_off_when_not_wanted(monkeypatch):
    tty = _Stream(tty=True)
    monkeypatch.setattr(progress.sys, "stderr", tty)
    assert progress.interactive()
    nested = progress.bar(enabled=True, nested=True, total=3, file=tty, position=1)
    assert not nested.disable and nested.mininterval < progress.LOG_INTERVAL
    nested.close()
    assert progress.bar(enabled=False, total=3, file=tty).disable
    assert list(progress.bar(range(3), enabled=False)) == [0, 1, 2]


def _warning_after_a_bar(monkeypatch, in_monitor: bool) -> str:
    """What stderr shows when the monitor warns while a training loop's tqdm bar is drawn."""
    import sys
    import warnings

    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    import landscape as ls

    terminal = _Stream(tty=True)
    monkeypatch.setattr(sys, "stderr", terminal)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    spike = ls.alarms.LossSpike(window=5, min_history=5, single_row=None)
    mon = ls.Monitor(model, F.cross_entropy, None, optimizer=opt, metrics=["loss"],
                     alarms=[spike])
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # the standard display (pytest records warnings instead of printing them)
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(m, c, f, n, line))
        with mon:
            for step in tqdm(range(12), file=sys.stderr, mininterval=0):
                loss = F.cross_entropy(model(x), y) * (100.0 if step == 10 else 1.0)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if in_monitor:
                    mon.step(step, batch=(x, y), loss=loss)
                elif step == 10:  # what the monitor did before: the warning as it comes
                    warnings.warn(ls.InstabilityWarning("step 10: loss spike"), stacklevel=1)
    return terminal.getvalue()


def test_a_warning_raised_while_a_training_loop_draws_a_bar_goes_above_it(monkeypatch):
    """It was printed after the bar's text, on the bar's line, which the next redraw hid."""
    shown = _warning_after_a_bar(monkeypatch, in_monitor=True)
    before, found, after = shown.partition("InstabilityWarning: step 10")
    assert found, shown
    line = before.rsplit("\n", 1)[-1]  # the warning's line up to the warning
    cleared = line.rsplit("\r", 1)
    assert len(cleared) == 2 and "it/s" not in cleared[1], repr(line)  # the bar was wiped
    assert "12/12" in after  # and drawn again below, to its end
    # the same warning without the monitor's clearing lands on the bar's line
    plain = _warning_after_a_bar(monkeypatch, in_monitor=False)
    line = plain.partition("InstabilityWarning")[0].rsplit("\n", 1)[-1]
    assert "it/s" in line.rsplit("\r", 1)[-1], repr(line)
