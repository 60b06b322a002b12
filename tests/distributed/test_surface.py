"""A 2-D surface over 2 gloo ranks equals the single-process surface point by point."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from landscape.store import Run
from tests.distributed import _workers as W
from tests.distributed._launch import run_ranks


class _Interrupt(Exception):
    pass


def test_sharded_surface_equals_one_process_and_resumes(tmp_path):
    reference = W.evaluate_plane(None)  # one process, in memory
    assert reference.complete

    # an interrupted single-process run leaves 7 of the 20 points in partial.h5 (the loss
    # at the centre, checked on resume, is evaluated first)
    seen: list[int] = []

    def stops_after_7(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if len(seen) == 8:
            raise _Interrupt
        seen.append(1)
        return F.cross_entropy(out, target)

    with pytest.raises(_Interrupt):
        W.evaluate_plane(str(tmp_path / "partial.h5"), stops_after_7)
    with Run.open(tmp_path / "partial.h5") as run:
        assert int(run.surface("plane").done.sum()) == 7

    run_ranks(W.surface_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    # the points are split over the ranks: 10 + 10 fresh, 13 missing ones when resuming;
    # every rank evaluates the centre once besides
    assert (r0["n_fresh"], r1["n_fresh"]) == (11, 11)
    assert r0["n_resumed"] + r1["n_resumed"] == 13 + 2
    assert abs(r0["n_resumed"] - r1["n_resumed"]) <= 1
    for path in ("fresh.h5", "partial.h5"):  # what rank 0 wrote
        with Run.open(tmp_path / path) as run:
            stored = run.surface("plane")
        assert stored.complete
        for field in ("loss", "accuracy"):
            np.testing.assert_array_equal(stored.values[field], reference.values[field])
    for r in (r0, r1):  # what every rank returned
        for key in ("fresh", "resumed"):
            assert r[key].complete
            for field in ("loss", "accuracy"):
                np.testing.assert_array_equal(r[key].values[field], reference.values[field])


def test_an_eigen_plane_on_one_rank_with_distributed_false_needs_no_other_rank(tmp_path):
    run_ranks(W.eigen_plane_on_rank_0_worker, tmp_path, timeout=120.0)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["after"] == r1["after"] == ["went on"] * 2
    from landscape.surface import plane

    x, y = W.dataset()
    alone = plane(W.model(), F.cross_entropy, (x[:8], y[:8]), steps=3, directions="eigen",
                  progress=False).values["loss"]
    np.testing.assert_allclose(r0["values"], alone, rtol=1e-10)
