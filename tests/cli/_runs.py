"""Small run files for the tests of the commands that read runs (plot, report, check, watch)."""

from __future__ import annotations

import shutil

import h5py
import numpy as np

from landscape.findings import Finding
from landscape.store import RunWriter, SurfaceData

PNG = b"\x89PNG\r\n\x1a\n"

WARN = Finding(30, "loss_spike", "warning", "loss/value", 5.0, 3.0, "loss jumped", "lower lr")
ERR = Finding(60, "edge_of_stability", "error", "hessian/eigenvalues", 63.0, 40.0, "past 2/eta")


def write_run(path, *, nan_loss_at=None, findings=(), surface=False):
    """loss (100 steps), hessian eigenvalues (k=3, every 10), per-layer alignment (2 layers)."""
    with RunWriter(path, mode="w", config={"lr": 0.1, "note": "<b>&"}) as w:
        w.declare("loss", {"value": None}, schedule="every(1)")
        w.declare("hessian", {"eigenvalues": (3,), "n_matvec": None}, params={"k": 3})
        w.declare(
            "spectral_alignment", {"minority": (2,)}, params={"layers": ["fc1", "fc2"]}
        )
        for s in range(100):
            loss = np.nan if s == nan_loss_at else float(np.exp(-s / 40))
            w.append("loss", s, {"value": loss})
            if s % 10 == 0:
                w.append("hessian", s, {"eigenvalues": [3.0 + s, 2.0, 1.0], "n_matvec": 10})
                w.append("spectral_alignment", s, {"minority": [0.4, 0.3]})
        for f in findings:
            w.add_finding(f)
        if surface:
            w.create_surface("line", np.linspace(-1, 1, 5), attrs={"directions": "random"})
            w.create_surface("plane", np.linspace(-1, 1, 4), np.linspace(-1, 1, 3))
            for i in range(5):
                w.write_surface("line", i, {"loss": float(i)})
            w.write_surface("plane", (0, 0), {"loss": 1.0})
    return path


def bad_inputs(tmp_path):
    """``(path, what the error says)`` for a missing file, a directory and a non-HDF5 file."""
    bad = tmp_path / "corrupt.h5"
    bad.write_bytes(b"not hdf5 at all" * 64)
    return [
        (str(tmp_path / "missing.h5"), "no such file"),
        (str(tmp_path), "is a directory"),
        (str(bad), "not a readable HDF5 file"),
    ]


def damaged_run(run_file, tmp_path):
    """A copy of ``run_file`` whose structure is broken: no ``/findings`` table."""
    damaged = tmp_path / "damaged.h5"
    shutil.copy(run_file, damaged)
    with h5py.File(damaged, "a") as f:
        del f["findings"]
    return damaged


def tiny_surface():
    """A line of three points, loss x², built in memory."""
    x = np.linspace(-1, 1, 3)
    return SurfaceData("s", x, None, {"loss": x**2}, np.ones(3, bool),
                       {"directions": {"kind": "random"}}, {})


def add_line_and_plane(w):
    """A 7-point line (loss x², accuracy 1 − x²/2) and a 7x5 plane (loss x² + 2y²), computed."""
    x, y = np.linspace(-1, 1, 7), np.linspace(-1, 1, 5)
    w.create_surface("line", x, fields=("loss", "accuracy"), attrs={"directions": {}})
    w.create_surface("plane", x, y)
    for i, a in enumerate(x):
        w.write_surface("line", i, {"loss": a * a, "accuracy": 1 - a * a / 2})
        for j, b in enumerate(y):
            w.write_surface("plane", (j, i), {"loss": a * a + 2 * b * b})
    return w
