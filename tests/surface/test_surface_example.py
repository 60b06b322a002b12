"""Smoke test of examples/landscape_plots.py --small (the landscape pictures)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from landscape.store import Run

REPO = Path(__file__).resolve().parents[2]


def _load_example():
    spec = importlib.util.spec_from_file_location(
        "landscape_plots_example", REPO / "examples" / "landscape_plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_writes_the_run_file_and_pictures(tmp_path, capsys):
    example = _load_example()
    threads = torch.get_num_threads()
    try:
        example.main(["--small", "--no-progress", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert "explained variance ratio" in capsys.readouterr().out
    for name in ("plane_contour.png", "plane_contourf.png", "plane_3d.png",
                 "pca_trajectory.png", "interpolation.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (tmp_path / "plane.vtk").read_text().startswith("# vtk DataFile")
    with Run.open(tmp_path / "run.h5") as run:
        assert run.surfaces() == ["interpolation", "pca", "plane"]
        for name in run.surfaces():
            assert run.surface(name).complete
        assert run.surface("pca").arrays["trajectory"].shape == (5, 2)
        assert len(run.steps("weights")) == 5
