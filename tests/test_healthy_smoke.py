"""Smoke test of the healthy-run benchmark (tests/benchmarks/healthy).

The health criterion on made-up curves, then the ``--small`` path end to end in-process (a
few setups, 120 steps, one seed: seconds). No timing assertions.
"""

from __future__ import annotations

import math

import torch

# isort: split
# (tests is first-party in the repository, third-party to ruff run elsewhere)
from tests.benchmarks.healthy.__main__ import main, run_benchmark
from tests.benchmarks.healthy.harness import SKIP, SUSTAIN, health
from tests.benchmarks.healthy.report import markdown
from tests.benchmarks.healthy.setups import SETUPS, SMALL, SMALL_STEPS, resolve


def test_health_criterion():
    """Falling, noisy and near-zero curves are healthy; a sustained climb or a NaN is not."""
    falling = [2.0 * 0.99 ** i for i in range(300)]
    assert health(falling)["healthy"]
    spiky = list(falling)
    spiky[200:205] = [5.0] * 5  # five bad batches: the 20-step median does not move
    assert health(spiky)["healthy"]
    # a loss near zero that doubles and stays there: 1.25x, but far below 5 % of 2.0
    tiny = [*falling[:100], *([1e-4] * 100), *([2e-4] * 100)]
    assert health(tiny)["healthy"]
    climb = [*falling[:150], *([1.0] * 150)]  # from ~0.44 back up to 1.0 for good
    h = health(climb)
    assert not h["healthy"] and h["worst_ratio"] >= 1.25 and "at step" in h["why"]
    # the rise must last SUSTAIN steps of the rolling median, from SKIP on
    short = [*falling[:150], *([1.0] * (SUSTAIN - 5)), *falling[150:]]
    assert health(short)["healthy"]
    early = [*([1.0] * 15), *([3.0] * (SKIP - 15)), *([0.5] * 100)]
    assert health(early)["healthy"]  # raised for 35 steps, but only 10 from step SKIP on
    assert not health([*([1.0] * SKIP), *early])["healthy"]  # the same climb later
    h = health([*falling[:100], math.nan, *falling[100:]])
    assert not h["healthy"] and h["why"] == "non-finite loss" and h["worst_ratio"] is None


def test_setups_resolve_by_name_and_hunt_key():
    """58 setups, found by name or by the hunt's key; three excluded by design."""
    assert len(SETUPS) == 58 and set(SMALL) <= set(SETUPS)
    assert [s.name for s in resolve(["bn_cnn_small_batch", "bn_cnn_bs8"])] == ["bn_cnn_bs8"] * 2
    excluded = {n for n, s in SETUPS.items() if s.excluded}
    assert excluded == {"curriculum", "curriculum_noise", "grokking_tf"}


def test_small_benchmark_end_to_end(capsys):
    """--small in-process: a row per setup, decided health, integer counts, no warning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_benchmark(small=True, seeds=1)
        again = run_benchmark(small=True, seeds=1, setup_names=["grad_accum"])
        printed = main(["--small", "--setups", "clip_grad"])
    finally:
        torch.set_num_threads(threads)
    assert result["setups"] == list(SMALL)
    rows = {r["setup"]: r for r in result["rows"]}
    assert set(rows) == set(SMALL)
    for name, row in rows.items():
        assert row["seeds"] == 1 and row["steps"] == SMALL_STEPS, name
        assert row["health"] in ("H", "u") and isinstance(row["counted_runs"], int)
        assert isinstance(row["info"], int) and row["info"] >= 0
        assert all(isinstance(n, int) for n in row["warnings"].values())
    for r in result["runs"]:
        assert isinstance(r["healthy"], bool) and len(r["losses"]) == r["steps"]
        assert all(math.isfinite(v) for v in r["losses"])
        assert r["loss_last"] < r["loss_first"], r["setup"]  # they learn in 120 steps
    # on these setups at this size the default monitor is quiet and every run is healthy
    total = result["total"]
    assert total["counted_runs"] == len(SMALL) and total["warnings"] == 0, total
    assert {r["setup"]: r["warnings"] for r in result["runs"] if r["warnings"]} == {}
    # deterministic: the same setup and seed gives the same losses
    accum = next(r for r in result["runs"] if r["setup"] == "grad_accum_k4")
    assert again["runs"][0]["losses"] == accum["losses"]
    # fp32 gradients times 2^127 stay finite: the scaler skips nothing (setups.py says so)
    scaled = next(r for r in result["runs"] if r["setup"] == "gradscaler_skips")
    assert scaled["extra"] == {"skipped": 0}
    table = markdown(result)
    assert table.count("\n| ") == len(SMALL) + 1  # header and one row per setup
    assert f"**Total: 0 warnings on {len(SMALL)} healthy runs**" in table
    assert printed["setups"] == ["clip_grad"]
    assert "| clip_grad | 1 | 120 | H |" in capsys.readouterr().out
    assert "taylor_radius" not in accum["metrics"] and "sentinels" in accum["metrics"]


def test_small_benchmark_with_a_preset_tries_the_rules_of_its_metrics(capsys):
    """--preset standard: the monitor records taylor_radius, sharpness, ... on the setups."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        printed = main(["--small", "--setups", "clip_grad", "--preset", "standard"])
    finally:
        torch.set_num_threads(threads)
    (run,) = printed["runs"]
    assert printed["preset"] == "standard"
    assert {"taylor_radius", "spectral_alignment", "sharpness"} <= set(run["metrics"])
    assert "`Monitor(..., metrics='standard')`" in capsys.readouterr().out


def test_the_second_audits_recipes_train_under_the_default_monitor():
    """Each recipe of tests/benchmarks/healthy/recipes.py builds and takes a few optimizer
    steps under the default monitor (harness.run; the benchmark runs them in full)."""
    from tests.benchmarks.healthy.harness import run
    from tests.benchmarks.healthy.recipes import RECIPES

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for setup in RECIPES:
            result = run(setup, 0, 4)
            assert result["steps"] == 4, setup.name
            assert all(math.isfinite(v) for v in result["losses"]), setup.name
    finally:
        torch.set_num_threads(threads)
