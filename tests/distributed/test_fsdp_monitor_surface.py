"""FSDP2 (``fully_shard``) on 2 gloo ranks: a monitored run and loss surfaces equal the
single-process ones; whole-weight metrics gather one layer at a time."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from landscape.store import Run
from tests.distributed import _fsdp_workers as FW
from tests.distributed import _workers as W
from tests.distributed._launch import run_ranks

pytest.importorskip("torch.distributed.fsdp")

# the default metrics that do not depend on the rank's own batch (loss and logits do):
# the gradient after FSDP's reduce-scatter, the update, and the sentinels on the default
# probe (rank 0's first 32 samples == the single-process run's first 32 samples)
DEFAULT_SAME = ("grad_norm", "nonfinite", "update", "sentinels")
CURVATURE = {"sharpness": ("lambda_max", "threshold", "ratio"),
             "top_eigenvalues": ("eigenvalues",),
             "taylor_radius": ("r", "rho_a", "step_norm")}  # central-difference tangent
WHOLE_WEIGHT = ("spectral_alignment", "collapse")


def _compare(a: Run, b: Run, metric: str, fields: Any, rtol: float) -> None:
    np.testing.assert_array_equal(a.steps(metric), b.steps(metric))
    for field in fields:
        _, x = a.series(metric, field)
        _, y = b.series(metric, field)
        if field == "attention_logit_max":  # the MLP has no attention: NaN in both runs
            assert np.isnan(np.asarray(x, float)).all() and np.isnan(np.asarray(y, float)).all()
            continue
        assert np.isfinite(np.asarray(y, float)).any(), metric + field
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-12, err_msg=f"{metric}/{field}")





def test_fsdp_monitor_records_the_single_process_values(tmp_path):
    run_ranks(FW.monitor_worker, tmp_path, timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    single = {
        "default": FW.train(W.model(), slice(0, FW.N), str(tmp_path / "one_default.h5")),
        "curvature": FW.train(W.model(), slice(0, FW.N), str(tmp_path / "one_curvature.h5"),
                              metrics=FW.curvature_metrics(), probe=W.probe()),
        "adam": FW.train(W.model(), slice(0, FW.N), str(tmp_path / "one_adam.h5"),
                         adam=True, metrics=FW.adam_metrics(), probe=W.probe()),
    }
    for kind in ("default", "curvature", "adam"):
        assert r0[kind]["writes"] is not None and r1[kind]["writes"] is None  # rank 0 writes
        assert r0[kind]["failed"] == r1[kind]["failed"] == [] == single[kind]["failed"]
        for a, b in zip(r0[kind]["params"], single[kind]["params"]):  # training unchanged
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with Run.open(tmp_path / "default.h5") as fsdp, \
            Run.open(tmp_path / "one_default.h5") as one:
        assert set(fsdp.metrics()) == set(one.metrics())
        assert "sentinels" in one.metrics()
        for metric in DEFAULT_SAME:  # grad_norm's samples: the rank's batch, as the loss's
            _compare(fsdp, one, metric, [f for f in one.fields(metric)
                                         if (metric, f) != ("grad_norm", "samples")], 1e-9)
        assert (fsdp.series("grad_norm", "samples")[1] * 2
                == one.series("grad_norm", "samples")[1]).all()
        assert len(fsdp.steps("sentinels")) == FW.STEPS
        assert fsdp.config["probe"]["source"] == "first_batch"
    with Run.open(tmp_path / "curvature.h5") as fsdp, \
            Run.open(tmp_path / "one_curvature.h5") as one:
        for metric, fields in CURVATURE.items():  # first-order products: ~1e-10 in float64
            _compare(fsdp, one, metric, fields, 1e-6)
        for metric in WHOLE_WEIGHT:  # one layer gathered at a time
            _compare(fsdp, one, metric, one.fields(metric), 1e-9)
    with Run.open(tmp_path / "adam.h5") as fsdp, Run.open(tmp_path / "one_adam.h5") as one:
        # Adam's sharded second moments gathered one parameter at a time (they failed on
        # every row: a DTensor times the operator's whole vectors)
        _compare(fsdp, one, "sharpness", CURVATURE["sharpness"], 1e-6)


def test_a_root_only_fsdp_model_trains_on_after_the_monitors_forwards(tmp_path):
    """The capture forwards of the whole-weight metrics leave no gathered root copy (the
    next training forward mixed plain tensors and DTensors)."""
    run_ranks(FW.root_only_worker, tmp_path, timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    single = FW.train(W.model(), slice(0, FW.N), str(tmp_path / "one.h5"),
                      metrics=["loss", "sentinels", *FW.WHOLE_WEIGHT_METRICS], probe=W.probe())
    assert r0["failed"] == r1["failed"] == [] == single["failed"]
    for a, b in zip(r0["params"], single["params"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with Run.open(tmp_path / "root.h5") as fsdp, Run.open(tmp_path / "one.h5") as one:
        for metric in ("sentinels", *FW.WHOLE_WEIGHT_METRICS):
            _compare(fsdp, one, metric, one.fields(metric), 1e-9)


def test_a_local_monitor_on_an_fsdp_model_is_refused_not_left_waiting(tmp_path):
    run_ranks(FW.local_monitor_worker, tmp_path, timeout=120)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["after"] == r1["after"] == ["went on"] * 2
    assert "on an FSDP-sharded model" in r0["said"] and r0["said"] == r1["said"]


def test_a_monitor_started_after_an_evaluation_forward_sees_the_sharded_parameters(tmp_path):
    run_ranks(FW.evaluated_worker, tmp_path, timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    single = FW.train(W.model(), slice(0, FW.N), str(tmp_path / "one.h5"), adam=True,
                      evaluate_first=True, metrics=FW.evaluated_metrics(), probe=W.probe())
    assert r0["failed"] == r1["failed"] == [] == single["failed"]
    assert not [w for w in r0["warnings"] + r1["warnings"] if "does not hold" in w]
    with Run.open(tmp_path / "evaluated.h5") as fsdp, Run.open(tmp_path / "one.h5") as one:
        _compare(fsdp, one, "sharpness", CURVATURE["sharpness"], 1e-6)
        _compare(fsdp, one, "update", one.fields("update"), 1e-9)


def test_fsdp_surfaces_equal_the_single_process_surfaces(tmp_path):
    from landscape.surface import line, plane

    run_ranks(FW.surface_worker, tmp_path, timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    ref_plane = plane(W.model(), F.cross_entropy, W.dataset(), **FW.PLANE, progress=False)
    ref_line = line(W.model(), F.cross_entropy, W.dataset(), **FW.LINE, seed=3, progress=False)
    with Run.open(tmp_path / "plane.h5") as run:  # what rank 0 wrote
        stored = run.surface("plane")
    assert stored.complete
    np.testing.assert_array_equal(stored.arrays["directions"], ref_plane.arrays["directions"])
    for values in (stored.values, r0["plane"], r1["plane"]):
        # the union of the ranks' uneven shards == the whole data set in one process
        np.testing.assert_allclose(values["loss"], ref_plane.values["loss"], rtol=1e-12)
        np.testing.assert_array_equal(values["accuracy"], ref_plane.values["accuracy"])
    for r in (r0, r1):
        np.testing.assert_array_equal(r["plane_dirs"], ref_plane.arrays["directions"])
        np.testing.assert_allclose(r["line"]["loss"], ref_line.values["loss"], rtol=1e-12)
        np.testing.assert_array_equal(r["line"]["accuracy"], ref_line.values["accuracy"])
        assert r["restored"]  # the shards are the very bits of before
        assert "FSDP" in r["refused"]
    # the shard helpers: per-parameter gather, cut, partial sums
    first = next(W.model().parameters()).detach()
    for r in (r0, r1):
        assert torch.equal(r["helpers"]["full"], first) and r["helpers"]["shard_of"]
        torch.testing.assert_close(r["helpers"]["sum"][0], first.double().pow(2).sum())


def test_the_functional_metrics_say_what_to_do_with_sharded_weights(tmp_path):
    run_ranks(FW.functional_worker, tmp_path)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert len(got["said"]) == 2
        assert "TaylorRadius metric" in got["said"][0] and "full_tensor" in got["said"][1]
        whole, single = got["nc3"]
        assert whole == pytest.approx(single, rel=1e-12)
