"""A monitored DDP run on 2 gloo ranks writes the file of the single-process run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from landscape.curvature import Hessian, top_eigenvalues
from landscape.store import Run
from tests.distributed import _workers as W
from tests.distributed._launch import run_ranks

# metrics that do not depend on the rank: DDP averages the gradients (grad_norm), and the
# curvature metrics are measured on the probe batch, which is the same on every rank. The
# loss metric is the rank's own batch loss and is left out.
RANK_INDEPENDENT = {
    "grad_norm": ("value",),
    "hessian": ("eigenvalues", "n_matvec"),
    "sharpness": ("lambda_max", "threshold", "ratio"),
    "hessian_trace": ("value", "stderr"),
}


def test_ddp_run_file_equals_the_single_process_file(tmp_path):
    run_ranks(W.monitor_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    single_path = str(tmp_path / "single.h5")
    single = W.train(W.model(), slice(0, W.N), single_path)  # the full batch, one process

    # training itself: DDP on two halves == full-batch SGD
    for a, b in zip(r0["params"], single["params"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    ddp, one = Run.open(tmp_path / "ddp.h5"), Run.open(single_path)
    try:
        for metric, fields in RANK_INDEPENDENT.items():
            np.testing.assert_array_equal(ddp.steps(metric), one.steps(metric))
            for field in fields:
                _, a = ddp.series(metric, field)
                _, b = one.series(metric, field)
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=metric + field)
        assert len(ddp.steps("hessian")) == W.STOP_AT + 1  # every step up to the stop
        key = [(f.step, f.rule, f.metric) for f in ddp.findings()]
        assert key == [(f.step, f.rule, f.metric) for f in one.findings()]
        assert (W.STOP_AT, "rank_zero_only", "grad_norm/value") in key
        # the file says its batch rows are one rank's of two (distributed review)
        assert ddp.config["distributed"] == {"world_size": 2, "sharded": False}
        assert one.config["distributed"] is None
    finally:
        ddp.close()
        one.close()

    # only rank 0 writes; rank 0's findings reach rank 1, which stops at the same step
    assert r0["writes"] is not None and r1["writes"] is None
    assert r0["stopped"] == r1["stopped"] == single["stopped"] == W.STOP_AT
    assert r1["heard"] == r0["heard"] == single["heard"]
    assert (W.STOP_AT, "rank_zero_only") in r1["heard"]
    assert r1["findings"] == r0["findings"]


def test_every_rank_keeps_rank_zeros_dense_window(tmp_path):
    """A rank whose own probe moves its sentinels does not measure densely alone (the
    curvature metrics' all-reduce would wait for the other ranks forever)."""
    run_ranks(W.dense_window_worker, tmp_path, timeout=60)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["windows"] == r1["windows"] == [-1] * 8


def test_taylor_guard_rescales_every_ranks_step_alike_with_per_rank_probes(tmp_path):
    """Each rank read r on its own probe and rescaled its own step: the DDP copies drifted
    apart (1.6e-4 after 6 steps), which DDP never repairs."""
    run_ranks(W.taylor_guard_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["rescaled"] > 0  # the guard acted
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)


def test_sharpness_under_a_zero_redundancy_optimizer_over_sgd_has_its_threshold(tmp_path):
    # ZeroRedundancyOptimizer's groups hold SGD's settings for every parameter: its
    # threshold 2(1 + beta)/lr was NaN, "no stability threshold known"; over AdamW each rank
    # holds its shard's second moments only, which the finding now says
    run_ranks(W.zero_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    sgd = r0["sgd"]["rows"]
    np.testing.assert_allclose(sgd["threshold"], 2 * (1 + 0.9) / 0.5, rtol=1e-12)
    assert np.isfinite(sgd["lambda_max"]).all() and r0["sgd"]["findings"] == []
    np.testing.assert_array_equal(r1["sgd"]["rows"]["lambda_max"], sgd["lambda_max"])
    adamw = r0["adamw"]
    assert np.isnan(adamw["rows"]["threshold"]).all()
    assert np.isfinite(adamw["rows"]["lambda_max"]).all()
    assert len(adamw["findings"]) == 1
    assert "ZeroRedundancyOptimizer shards AdamW's state over the ranks" in adamw["findings"][0]
    assert r0["kinds"] == ["sgd", None]


def test_the_default_probes_note_is_logged_by_rank_zero_alone(tmp_path):
    run_ranks(W.probe_note_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert len(r0["notes"]) == 2 and r1["notes"] == []  # the run's, the resume's
    # a resume takes new probes (rank 0's file holds none of them): said, by rank 0
    assert len(r0["resumed"]) == 1 and "not comparable across step 1" in r0["resumed"][0]
    assert r1["resumed"] == []


def test_a_rank_holding_one_probe_sample_measures_with_the_others(tmp_path):
    """Probe shards of 8 and 1 samples under the default memory budget: the job hung (the
    memory profile's branches followed each rank's own sample count); the sharpness is the
    single process's on the 9 samples together."""
    run_ranks(W.one_sample_shard_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    single = W.one_sample_probe_run(W.model(), slice(0, sum(W.ONE_SAMPLE_SHARDS)), None)
    assert torch.isfinite(single["lambda_max"]).all()
    for got in (r0["lambda_max"], r1["lambda_max"]):
        torch.testing.assert_close(got, single["lambda_max"], rtol=1e-7, atol=0)


def test_a_rank_whose_batch_shrinks_alone_measures_with_the_others(tmp_path):
    run_ranks(W.short_last_batch_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert torch.isfinite(r0["lambda_max"]).all() and len(r0["lambda_max"]) == 3
    torch.testing.assert_close(r0["lambda_max"], r1["lambda_max"], rtol=0, atol=0)


def test_a_monitor_built_before_the_process_group_writes_on_rank_zero_alone(tmp_path):
    run_ranks(W.built_before_init_worker, tmp_path, init=False)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["path"] == str(tmp_path / "run.h5") and r1["path"] is None
    assert r0["distributed"] and r1["distributed"]
    torch.testing.assert_close(r0["lambda_max"], r1["lambda_max"], rtol=0, atol=0)
    with Run.open(tmp_path / "run.h5") as run:
        assert list(run.steps("loss")) == [0, 1, 2]


def test_rank_zeros_findings_are_returned_everywhere_and_said_once(tmp_path):
    # every rank warned: N copies of each warning under torchrun (distributed audit)
    run_ranks(W.warned_once_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["returned"] == r1["returned"] == [(W.STOP_AT, "rank_zero_only")]
    assert len(r0["said"]) == 1 and "stop now" in r0["said"][0]
    assert r1["said"] == []


def test_metrics_left_out_of_a_preset_are_said_once(tmp_path):
    run_ranks(W.left_out_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert len(r0["said"]) >= 2 and r1["said"] == []  # spectral_alignment, collapse, ...


def test_the_ranks_measure_with_rank_zeros_batchnorm_statistics(tmp_path):
    run_ranks(W.batchnorm_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert not torch.equal(r0["state"]["1.running_var"], r1["state"]["1.running_var"])
    assert r0["kept"] and r1["kept"]  # each rank's own statistics back after the step
    net = W.bn_model()
    net.load_state_dict(r0["state"])
    x, y = W.dataset()
    H = Hessian(net, F.cross_entropy, (x[:8], y[:8]))  # eval mode: running statistics
    want = float(top_eigenvalues(H, k=1, tol=1e-10).values[0])
    assert abs(r0["value"] - want) <= 1e-8 * abs(want)


def test_ranks_whose_buffers_differ_in_shape_keep_their_own(tmp_path):
    run_ranks(W.grown_buffer_worker, tmp_path, timeout=90.0)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["failed"] == r1["failed"] == []
    assert r0["cache"].tolist() == [10.0] * 4 and r1["cache"].tolist() == [11.0] * 8
    assert r1["seen"] and all(c == [11.0] * 8 for c in r1["seen"])  # also while measuring


@pytest.mark.parametrize("sparse", [False, True], ids=["every_step", "every_5"])
def test_ranks_that_count_their_steps_apart_fail_with_the_two_steps_named(tmp_path, sparse):
    """Ranks whose step numbers differ (a counter resumed apart) run different schedules:
    their collectives mispair, which hangs or mixes the ranks' data without a word. With
    metrics due every 5 steps the ranks met DDP's all-reduce instead of the check, and gloo
    aborted (distributed review): the first call compares them, on every rank."""
    run_ranks(W.miscounted_step_worker, tmp_path, sparse, timeout=90)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["error"]
              for r in (0, 1))
    if sparse:
        for rank, error in enumerate((r0, r1)):
            assert error == (f"LandscapeError: the ranks are out of step: rank {rank} "
                             f"recorded step {rank} while the ranks' steps range from 0 to "
                             "1; under torch.distributed every rank calls Monitor.step() at "
                             "every step with the same step number (docs/distributed.md)")
    else:  # apart from step 2 on: the findings' broadcast of the step compares them
        assert r1.startswith("LandscapeError: the ranks are out of step: rank 1 recorded "
                             "step 3 while rank 0 recorded step 2")
        assert r0 is not None  # its next collective found rank 1 gone


def test_uneven_inputs_under_join_are_monitored_without_collectives(tmp_path):
    """``model.join()`` shadows DDP's own collectives for a rank that ran out of data, not
    the monitor's: with ``distributed=False`` (docs/distributed.md) nothing waits on it."""
    run_ranks(W.joined_uneven_worker, tmp_path, timeout=90)
    with Run.open(tmp_path / "joined.h5") as run:
        assert run.steps("loss").tolist() == list(range(10))
        assert np.isfinite(run.series("sentinels", "r_secant")[1][2:]).all()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))


def test_a_run_file_rank_zero_cannot_open_fails_every_rank(tmp_path):
    (tmp_path / "not_hdf5.h5").write_text("hi\n")
    run_ranks(W.unopenable_file_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert len(r0["errors"]) == len(r1["errors"]) == 2
    assert all(e.startswith("RunFileError") and "not_hdf5.h5" in e for e in r0["errors"])
    assert all("not_hdf5.h5" in e for e in r1["errors"]), r1["errors"]
    assert r1["errors"][0].startswith("ValueError: opening the run file failed on rank 0")
    torch.testing.assert_close(r0["loss"], r1["loss"], rtol=0, atol=0)
