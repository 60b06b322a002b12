"""Smoke test of the instability benchmark suite (tests/benchmarks/instability): the
``--small`` path end to end, on tiny models, one seed. No timing assertions."""

from __future__ import annotations

import math

import pytest
import torch

from tests.benchmarks.instability.__main__ import run_suite
from tests.benchmarks.instability.harness import onset_explosion
from tests.benchmarks.instability.report import markdown
from tests.benchmarks.instability.scenarios import scenarios

pytestmark = pytest.mark.slow

# At the --small size (60 steps before the intervention) the models barely learn: these
# treatments still reach 10x their baseline, the others only 1.25x (the full-size runs
# blow up, docs/benchmarks.md).
EXPLODE_SMALL = ("cnn_sgd_eos", "cnn_lr_spike", "gpt_fp16_overflow")
ONSET_SMALL = ("gpt_lr_ramp", "gpt_lr_spike", "gpt_corrupt_batches")


def test_onset_and_explosion_from_the_loss():
    sc = scenarios(small=True)["gpt_lr_ramp"]
    s0 = sc.intervention
    flat = [1.0] * s0
    base, onset, explosion = onset_explosion([*flat, 1.0, 1.3, 1.4, 1.5, 20.0], sc)
    assert base == 1.0 and onset == s0 + 1 and explosion == s0 + 4
    assert onset_explosion([*flat, 1.0, 1.3, 1.0, 1.1], sc)[1:] == (None, None)  # not sustained
    assert onset_explosion([*flat, 1.0, math.nan], sc)[1:] == (s0 + 1, s0 + 1)


def test_small_suite_end_to_end():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_suite(small=True, seeds=1, detector_names=["default", "zscore"],
                           timing=True, timing_steps=8, timing_repeats=1)
    finally:
        torch.set_num_threads(threads)
    names = set(scenarios(small=True))
    assert set(result["scenarios"]) == names and len(names) >= 6
    runs = {(r["scenario"], r["treated"]): r for r in result["runs"]}
    for name in names:
        control = runs[(name, False)]
        assert control["explosion"] is None and control["onset"] is None, name
        treated = runs[(name, True)]  # the paired onset is never earlier than the loss alone
        if treated["onset"] is not None:
            assert treated["onset_alone"] is not None, name
            assert treated["onset_alone"] <= treated["onset"], name
        assert set(control["detectors"]) == {"default", "zscore"}
    for name in EXPLODE_SMALL:
        treated = runs[(name, True)]
        assert treated["explosion"] is not None, name
        assert treated["onset"] is not None and treated["onset"] <= treated["explosion"]
    for name in ONSET_SMALL:
        assert runs[(name, True)]["onset"] is not None, name
    rows = [r for r in result["rows"] if r["rule"] == "any"]
    assert {(r["scenario"], r["detector"]) for r in rows} == {
        (n, d) for n in names for d in ("default", "zscore")}
    for r in rows:
        assert 0.0 <= r["detection_rate"] <= 1.0 and r["fa_per_1k_control"] >= 0.0
    assert set(result["overhead"]) == {"gpt", "cnn", "lstm"}
    assert set(result["overhead"]["gpt"]) == {"plain", "default", "zscore"}
    table = markdown(result)
    assert "| gpt_lr_ramp |" in table and "Overhead" in table
