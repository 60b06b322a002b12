"""Monitors left open: a notebook cell that builds one, run a second time.

The first monitor was never closed: its optimizer hooks run at every step and keep a copy of
the weights. The second one says so when it starts, and ``close_monitors`` closes those no
variable holds any more.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

import landscape as ls
from landscape.store import close_writers
from tests import models


def _train(model, opt, steps, mon, start=0):
    g = torch.Generator().manual_seed(start)
    for step in range(start, start + steps):
        x = torch.randn(16, 6, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(step, batch=(x, y), loss=loss)


def _hook_pairs(opt):
    assert len(opt._optimizer_step_pre_hooks) == len(opt._optimizer_step_post_hooks)
    return len(opt._optimizer_step_pre_hooks)


def _cell(model, opt, path=None):
    """The notebook cell: a default monitor and a few steps, never closed."""
    mon = ls.Monitor(model, F.cross_entropy, path, optimizer=opt)
    _train(model, opt, 3, mon)
    return mon


def test_a_cell_run_again_warns_and_close_monitors_keeps_the_new_one(tmp_path):
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = _cell(model, opt)
    with pytest.warns(RuntimeWarning, match=r"1 other Monitor\(s\) of this model .* "
                                            r"still open \(in memory\)") as caught:
        second = _cell(model, opt, tmp_path / "second.h5")
    assert "close_monitors(model, keep=mon)" in str(caught[0].message)
    assert _hook_pairs(opt) == 2  # the first one's hooks still run at every step

    assert ls.close_monitors(torch.compile(model), keep=second) == 1  # a wrapper: its model
    assert first.writer.closed and not second.writer.closed and _hook_pairs(opt) == 1
    _train(model, opt, 2, second, start=3)  # the new one goes on recording
    assert second.run().steps("loss").tolist() == [0, 1, 2, 3, 4]
    assert ls.close_monitors(model) == 1 and second.writer.closed and _hook_pairs(opt) == 0
    assert ls.close_monitors(model) == 0


def test_the_same_optimizer_on_a_wrapped_model_warns_too():
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = _cell(model, opt)
    wrapped = torch.nn.Sequential(model)  # another module object, one optimizer
    with pytest.warns(RuntimeWarning, match="other Monitor"):
        second = _cell(wrapped, opt)
    # with no model, every open monitor of the process (other tests' too)
    assert ls.close_monitors() >= 2 and first.writer.closed and second.writer.closed
    assert ls.close_monitors() == 0 and _hook_pairs(opt) == 0


def test_closed_monitors_and_other_models_do_not_warn():
    model, other = models.mlp(), models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ls.Monitor(model, F.cross_entropy, optimizer=opt) as mon:
        _train(model, opt, 2, mon)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with ls.Monitor(model, F.cross_entropy, optimizer=opt) as mon:  # the cell, again
            _train(model, opt, 2, mon)
        held = _cell(other, torch.optim.SGD(other.parameters(), lr=0.1))  # another model
        with ls.Monitor(model, F.cross_entropy, optimizer=opt) as mon:
            _train(model, opt, 2, mon)
    assert ls.close_monitors(model) == 0 and ls.close_monitors(other) == 1
    assert held.writer.closed


def test_a_monitor_whose_file_close_writers_closed_copies_nothing(tmp_path):
    """close_writers(path) closes the file of a monitor no variable holds: its hooks stop."""
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stale = _cell(model, opt, tmp_path / "run.h5")
    assert close_writers(tmp_path / "run.h5") == 1
    with warnings.catch_warnings():  # an inert monitor is not said to be open
        warnings.simplefilter("error", RuntimeWarning)
        fresh = _cell(model, opt, tmp_path / "run2.h5")
    # its hook ran at the new steps and kept no copy of the weights for an update
    assert stale._before is None
    fresh.close()
    stale.close()  # closing it later is harmless
    assert _hook_pairs(opt) == 0


def test_reading_a_file_a_monitor_of_this_process_still_buffers_says_so(tmp_path):
    """A training that raised left its monitor open: Run.open(path) showed no row (they
    were still in its buffer) without a word, while monitor.run() showed them all."""
    path = tmp_path / "run.h5"
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = ls.Monitor(model, F.cross_entropy, path, optimizer=opt, metrics=["loss"],
                     warn=False).start()
    _train(model, opt, 3, mon)
    with pytest.warns(RuntimeWarning, match=r"holds 3 row\(s\) or surface point\(s\) not "
                                            "written to the file yet"):
        ls.Run.open(path).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with mon.run() as run:  # writes them first: nothing to say
            assert run.rows("loss") == 3
        mon.close()
        with ls.Run.open(path) as run:
            assert run.rows("loss") == 3


def test_monitor_run_and_results_show_what_they_are_in_a_line(tmp_path):
    """A notebook shows the repr: a Monitor and a Run were ``<... object at 0x...>``, and an
    EigenResult of a 244-parameter model printed 9,974 characters (its vectors), a
    DensityResult 29,172 (its grid and tables)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    hessian = ls.Hessian(model, F.cross_entropy, (x, y))
    eig = ls.top_eigenvalues(hessian, k=2, which="both")
    results = (eig, ls.hessian_trace(hessian), ls.spectral_density(hessian, lanczos_steps=10))
    for result in results:
        assert len(repr(result)) < 700 and f"n_matvec={result.n_matvec}" in repr(result)
    assert f"{eig.values[0].item():.4f}" in repr(eig) and "vectors" not in repr(eig)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.h5"
    mon = ls.Monitor(model, F.cross_entropy, path, optimizer=opt, metrics=["loss"])
    assert repr(mon) == f"Monitor({str(path)!r}, metrics=['loss'], not started)"
    with mon:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(3, batch=(x, y), loss=loss)
        assert repr(mon).endswith("['loss'], open, last step 3)")
    assert repr(mon).endswith("['loss'], closed, last step 3)")
    run = ls.Run.open(path)
    assert repr(run) == f"Run({str(path)!r}, metrics=['loss'])"
    run.close()
    assert repr(run) == f"Run({str(path)!r}, closed)"
