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


def _recorded_bars(monkeypatch) -> tuple[_Stream, list]:
    """A terminal on stderr, no delay, and every bar wanted (``enabled``) from now on."""
    tty = _Stream(tty=True)
    monkeypatch.setattr(progress.sys, "stderr", tty)
    monkeypatch.setattr(progress, "PRODUCTS_DELAY", 0.0)
    made = []
    real = progress.bar

    def recording(*args, **kwargs):
        drawn = real(*args, **{**kwargs, "mininterval": 0.0, "file": tty})
        if kwargs["enabled"]:
            made.append(drawn)
        return drawn

    monkeypatch.setattr(progress, "bar", recording)
    return tty, made


def test_curvature_solvers_count_their_products_on_a_bar_and_leave_the_operator_as_it_was(
        monkeypatch):
    import torch

    from landscape.curvature import MatrixOperator, hessian_trace, spectral_density, top_eigenvalues

    a = torch.randn(40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = a + a.T
    quiet = (top_eigenvalues(MatrixOperator(a), which="both", progress=False),
             hessian_trace(MatrixOperator(a), n_matvec=20, progress=False),
             spectral_density(MatrixOperator(a), lanczos_steps=10, n_probes=2, progress=False))
    tty, made = _recorded_bars(monkeypatch)
    ops = [MatrixOperator(a) for _ in range(3)]
    shown = (top_eigenvalues(ops[0], which="both"), hessian_trace(ops[1], n_matvec=20),
             spectral_density(ops[2], lanczos_steps=10, n_probes=2))
    # the same numbers, every product counted, the bar closed and the operator unhooked
    assert torch.equal(shown[0].values, quiet[0].values)
    assert shown[1].value == quiet[1].value
    assert torch.equal(shown[2].density, quiet[2].density)
    assert [b.n for b in made] == [r.n_matvec for r in shown] == [op.n_matvec for op in ops]
    assert all(b.disable for b in made)  # (closed)
    assert all(op._on_count is None for op in ops)
    out = tty.getvalue()
    for name in ("top_eigenvalues", "hessian_trace (krylov)", "spectral_density"):
        assert name in out
    largest, smallest = shown[0].values[0].item(), shown[0].smallest.values[0].item()
    assert f"{largest:.5g} (residual" in out and f"{smallest:.5g} (residual" in out


def test_quick_curvature_work_draws_no_bar_and_the_monitor_none_at_all(monkeypatch):
    import torch
    import torch.nn.functional as F

    import landscape as ls
    from landscape.curvature import MatrixOperator, top_eigenvalues

    tty = _Stream(tty=True)
    monkeypatch.setattr(progress.sys, "stderr", tty)
    top_eigenvalues(MatrixOperator(torch.eye(5, dtype=torch.float64)))
    assert tty.getvalue() == ""  # under PRODUCTS_DELAY: nothing drawn
    tty, made = _recorded_bars(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = [ls.metrics.Sharpness(), ls.metrics.HessianTrace(n_matvec=6),
               ls.metrics.SpectralDensity(lanczos_steps=4, n_probes=1)]
    with ls.Monitor(model, F.cross_entropy, None, metrics=metrics, optimizer=opt) as mon:
        for step in range(2):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            mon.step(step, batch=(x, y), loss=loss)
    assert made == [] and "product" not in tty.getvalue()  # the loop's own bar keeps its line


def test_a_surface_without_progress_draws_no_bar_for_its_eigen_directions(monkeypatch):
    import torch
    import torch.nn.functional as F

    import landscape as ls

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    data = (torch.randn(12, 3), torch.randint(0, 2, (12,)))
    tty, made = _recorded_bars(monkeypatch)
    ls.surface.line(model, F.cross_entropy, data, directions="eigen", steps=3, progress=False)
    assert made == [] and tty.getvalue() == ""
    ls.surface.line(model, F.cross_entropy, data, directions="eigen", steps=3)
    assert [b.desc for b in made][:1] == ["top_eigenvalues"]


def test_in_a_log_short_work_writes_no_bar_and_a_warning_draws_none(monkeypatch):
    """A surface of two seconds wrote ``surface plane: 0%|...| 0/2601`` and erased it into a
    CI log, and each warning of the demo redrew its training bar at 0 % there."""
    log = _Stream(tty=False)
    monkeypatch.setattr(progress.sys, "stderr", log)
    monkeypatch.delitem(progress.sys.modules, "ipykernel", raising=False)
    for leave in (False, True):
        work = progress.bar(range(50), enabled=True, desc="surface plane", leave=leave)
        for step in work:
            work.set_postfix_str(f"step {step}")  # (a redraw of its own: analyze's bar)
            with progress.above_bars():
                log.write("loop.py:3: UserWarning: loss spike\n")
    assert "surface plane" not in log.getvalue() and "%|" not in log.getvalue()
    assert log.getvalue().count("loss spike") == 100


def test_a_warning_is_written_above_a_bar_that_is_drawn(monkeypatch):
    tty = _Stream(tty=True)
    monkeypatch.setattr(progress.sys, "stderr", tty)
    drawn = progress.bar(total=10, enabled=True, desc="training", file=tty)
    drawn.update(3)
    before = tty.getvalue().count("training")
    with progress.above_bars():
        tty.write("a warning\n")
    after = tty.getvalue()
    drawn.close()
    assert after.count("training") == before + 1  # cleared, then drawn again below it
    assert after.rindex("a warning") < after.rindex("training")
