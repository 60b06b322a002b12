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
