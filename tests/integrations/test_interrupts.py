"""Ctrl-C and SIGTERM sent to a real child process running a monitored loop leave a valid file
with every completed row, a rerun continues it, and ``landscape watch`` polling a file that
another process is writing never disturbs the writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from landscape.store import Run

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # child processes: an interpreter start-up each

LOOP = textwrap.dedent("""
    import sys, time
    import torch, torch.nn.functional as F
    import landscape as ls

    path, n_steps, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    flush_every = int(sys.argv[4]) if len(sys.argv) > 4 else 256
    start = 0
    try:
        with ls.Run.open(path) as run:
            start = int(run.steps("loss")[-1]) + 1
    except Exception:
        pass
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    try:
        with ls.Monitor(model, F.cross_entropy, path, optimizer=opt, warn=False,
                        metrics=["loss", "grad_norm", "update"],
                        flush_every=flush_every) as mon:
            print("started", start, flush=True)
            for step in range(start, start + n_steps):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(); loss.backward(); opt.step()
                mon.step(step, batch=(x, y), loss=loss)
                print("done", step, flush=True)
                time.sleep(pause)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
""")


def _child(tmp_path, *args):
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, step):
    for line in proc.stdout:
        if line.split() == ["done", str(step)]:
            return
    raise AssertionError(f"the child ended before step {step}: {proc.stderr.read()}")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_leaves_every_completed_row_and_a_rerun_continues(tmp_path, sig):
    path = tmp_path / "run.h5"
    proc = _child(tmp_path, path, 100000, 0.005)  # rows stay buffered (flush_every=256)
    try:
        _wait_for_step(proc, 15)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in out, err
    else:
        assert proc.returncode == -signal.SIGTERM, err  # ended by the signal, as by default
    done = [int(line.split()[1]) for line in out.splitlines() if line.startswith("done")]
    with Run.open(path) as run:
        steps = run.steps("loss").tolist()
        assert steps == list(range(len(steps))) and len(steps) >= 16
        assert steps[-1] >= max(done, default=15)  # every step the child finished is there
        for name in ("grad_norm", "update"):
            assert run.steps(name).tolist() == steps
    rerun = _child(tmp_path, path, 3, 0.0)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    with Run.open(path) as run:
        assert run.steps("loss").tolist() == list(range(len(steps) + 3))


def test_landscape_watch_polling_never_disturbs_the_writer(tmp_path):
    path = tmp_path / "run.h5"
    writer = _child(tmp_path, path, 60, 0.01, 1)  # a flush (and a file change) every row
    try:
        _wait_for_step(writer, 0)
        watch = subprocess.run(
            [sys.executable, "-c", "from landscape_cli.main import main; main()", "watch",
             str(path), "--interval", "0.01", "--timeout", "1.5", "-m", "loss"],
            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
            timeout=120,
        )
        _out, err = writer.communicate(timeout=120)
    finally:
        writer.kill()
    assert writer.returncode == 0, err
    assert watch.returncode == 0, watch.stderr
    assert "Traceback" not in watch.stderr and "loss" in watch.stdout
    with Run.open(path) as run:
        assert run.steps("loss").tolist() == list(range(60))


def test_a_handler_replaced_between_steps_is_put_back_at_the_next_step(tmp_path):
    """Jupyter's kernel sets SIGINT's handler before every cell: the monitor's, installed by
    the cell that started it, was gone in the training cell, and an interrupt there left
    half a step's rows unflushed (interactive audit)."""
    import torch
    import torch.nn.functional as F

    import landscape as ls
    from tests import models

    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = signal.getsignal(signal.SIGINT)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    mon = ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5", optimizer=opt, warn=False)
    try:
        mon.step(0, batch=(x, y), loss=1.0)
        ours = signal.getsignal(signal.SIGINT)
        assert ours not in (before, signal.default_int_handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next cell begins
        mon.step(1, batch=(x, y), loss=1.0)
        assert signal.getsignal(signal.SIGINT) == ours
        mon.close()
        # the handler it replaced (the cell's) is what close() puts back
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        mon.close()
        signal.signal(signal.SIGINT, before)


def test_two_monitors_stepping_together_end_in_one_keyboard_interrupt(tmp_path):
    """A GAN's two monitors: each step put its handler back in front of the other's, the
    two then called each other, and Ctrl-C raised RecursionError after ~500 flushes
    (review of the handler that is put back at every step)."""
    import time

    import torch
    import torch.nn.functional as F

    import landscape as ls

    before = signal.getsignal(signal.SIGINT)
    models_ = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models_]
    losses = [F.mse_loss, F.cross_entropy]
    mons = [ls.Monitor(m, f, tmp_path / f"{i}.h5", optimizer=o, warn=False)
            for i, (m, f, o) in enumerate(zip(models_, losses, opts))]
    try:
        for step in range(3):
            for m, model, opt, f in zip(mons, models_, opts, losses):
                x = torch.randn(8, 4)
                y = torch.randn(8, 4) if f is F.mse_loss else torch.randint(0, 2, (8,))
                loss = f(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                m.step(step, batch=(x, y), loss=loss)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        for i in range(2):  # both files were flushed: every step's rows are there
            assert Run.open(tmp_path / f"{i}.h5").steps("loss").tolist() == [0, 1, 2]
    finally:
        for m in mons:
            m.close()
        signal.signal(signal.SIGINT, before)
