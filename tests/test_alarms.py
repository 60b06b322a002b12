"""Alarm rules: each trips on a run built to trip it and stays quiet otherwise; episodes;
NaN rows; online evaluation equals offline ``check`` (hypothesis); HDF5 files."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from landscape import StepOrderError
from landscape.alarms import (
    RULES,
    SKIP,
    EdgeOfStability,
    GradNormSpike,
    LogitGrowth,
    LossSpike,
    NonFinite,
    OnlineAlarms,
    RankCollapse,
    Rule,
    SignCollapse,
    TaylorRatio,
    Trigger,
    check,
    default_rules,
)
from landscape.findings import Finding
from landscape.store import Run, RunWriter

NAN = float("nan")
INF = float("inf")

# metric name -> {field: row shape} (the naming contract the monitor writes)
CONTRACT = {
    "loss": {"value": ()},
    "grad_norm": {"value": ()},
    "nonfinite": {"loss": (), "grad": ()},
    "logits": {
        "max_abs": (),
        "logsumexp_mean": (),
        "logsumexp_max": (),
        "softmax_collapse": (),
        "zloss": (),
    },
    "sharpness": {"lambda_max": (), "threshold": (), "ratio": ()},
    "taylor": {"r": (), "rho_a": (), "step_norm": ()},
    "spectral_alignment": {"minority": (3,), "entropy": (3,), "mean_abs_cos": (3,)},
    "representation": {"effective_rank": (), "uniformity": ()},
}
LAYERS = ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "head"]


def make_writer(series, path=None):
    """A run with ``series = {metric: (steps, {field: values})}``; other fields are 0."""
    w = RunWriter.memory() if path is None else RunWriter(path, mode="w")
    for name, (steps, cols) in series.items():
        fields = CONTRACT.get(name) or {k: np.shape(v[0]) for k, v in cols.items()}
        params = {"layers": LAYERS} if name == "spectral_alignment" else None
        w.declare(name, fields, params=params)
        for i, step in enumerate(steps):
            row = {f: np.zeros(shape) for f, shape in fields.items()}
            row.update({f: v[i] for f, v in cols.items()})
            w.append(name, int(step), row)
    return w


def findings_of(series, rules=None, path=None):
    return check(make_writer(series, path=path), rules)


def one(rule_name, findings):
    return [f for f in findings if f.rule == rule_name]


def smooth_loss(n, seed, noise=0.02):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 0.3 + 2.0 * np.exp(-t / 150) + noise * rng.standard_normal(n)


# --------------------------------------------------------------------------- edge of stability


def sharpening(n_rise=150, n_hover=150, seed=0):
    """Ratio rising slowly from 0.5 past 1, then hovering around 1 (edge of stability)."""
    rng = np.random.default_rng(seed)
    rise = np.linspace(0.5, 1.08, n_rise)
    hover = 1.0 + 0.04 * np.sin(np.arange(n_hover) / 3)
    ratio = np.concatenate([rise, hover]) + 0.005 * rng.standard_normal(n_rise + n_hover)
    lr = 0.05
    lam = ratio * (2 / lr)
    return ratio, {"lambda_max": lam, "threshold": np.full_like(lam, 2 / lr), "ratio": ratio}


def test_edge_of_stability_fires_once_when_sharpness_crosses_the_threshold():
    ratio, cols = sharpening()
    steps = np.arange(len(ratio)) * 10
    found = one("edge_of_stability", findings_of({"sharpness": (steps, cols)}))
    first_info = int(np.argmax(ratio >= 0.9))
    first_warn = int(np.argmax(ratio >= 1.0))
    assert [(f.severity, f.step) for f in found] == [
        ("info", steps[first_info]),
        ("warning", steps[first_warn]),
    ]
    warn = found[1]
    assert warn.metric == "sharpness/ratio" and warn.threshold == 1.0
    assert warn.value == pytest.approx(ratio[first_warn])
    assert "40" in warn.message  # the optimizer's threshold 2/lr is named
    assert warn.hint


def test_edge_of_stability_quiet_below_the_threshold_and_uses_lambda_over_threshold():
    rng = np.random.default_rng(1)
    ratio = 0.6 + 0.1 * rng.random(200)
    steps = np.arange(200)
    cols = {"lambda_max": ratio * 40, "threshold": np.full(200, 40.0), "ratio": ratio}
    assert findings_of({"sharpness": (steps, cols)}) == []
    # ratio missing (NaN) but lambda_max and threshold present: the rule divides
    cols = {"lambda_max": np.full(3, 44.0), "threshold": np.full(3, 40.0), "ratio": [NAN] * 3}
    (f,) = findings_of({"sharpness": ([0, 1, 2], cols)})
    assert f.severity == "warning" and f.value == pytest.approx(1.1) and f.step == 0


def test_edge_of_stability_approach_level_can_be_disabled():
    ratio, cols = sharpening()
    rules = [EdgeOfStability(approach=None)]
    found = findings_of({"sharpness": (np.arange(len(ratio)), cols)}, rules)
    assert found and all(f.severity == "warning" for f in found)


# --------------------------------------------------------------------------- taylor ratio


def test_taylor_ratio_warns_then_escalates_to_error_in_one_episode():
    r = np.full(100, 0.3)
    r[50], r[51], r[52] = 1.5, 5.0, 2.0
    r[80] = 1.2
    found = findings_of({"taylor": (np.arange(100), {"r": r})})
    assert [(f.step, f.severity, f.threshold) for f in found] == [
        (50, "warning", 1.0),
        (51, "error", 4.0),
        (80, "warning", 1.0),
    ]
    assert all(f.metric == "taylor/r" for f in found)


def test_taylor_ratio_quiet_inside_the_radius():
    rng = np.random.default_rng(2)
    assert findings_of({"taylor": (np.arange(300), {"r": 0.9 * rng.random(300)})}) == []


# --------------------------------------------------------------------------- sign collapse


def minority_series(n=100, seed=3):
    rng = np.random.default_rng(seed)
    return 0.35 + 0.1 * rng.random((n, 3))


def test_sign_collapse_fires_when_a_healthy_layer_loses_sign_diversity():
    m = minority_series()
    m[60:, 1] = 0.02
    found = findings_of({"spectral_alignment": (np.arange(100) * 5, {"minority": m})})
    assert len(found) == 1
    (f,) = found
    assert f.rule == "sign_collapse" and f.severity == "warning"
    assert f.step == 61 * 5  # sustain = 2 rows: emitted at the row completing it
    assert f.value == pytest.approx(0.02) and f.threshold == 0.05
    assert "blocks.0.mlp.fc1" in f.message and f.extra["layer"] == "blocks.0.mlp.fc1"


def test_sign_collapse_quiet_at_init_collapse_and_on_a_single_dip():
    m = minority_series()
    m[:, 0] = 0.01  # collapsed from the first row: never healthy, never fires
    m[40, 2] = 0.0  # one-row dip: below sustain
    assert findings_of({"spectral_alignment": (np.arange(100), {"minority": m})}) == []
    # healthy=None opts into firing on collapse at init
    rules = [SignCollapse(healthy=None)]
    found = findings_of({"spectral_alignment": (np.arange(100), {"minority": m})}, rules)
    assert [f.step for f in found] == [1]


# --------------------------------------------------------------------------- loss spike


@pytest.mark.parametrize("seed", range(5))
def test_loss_spike_quiet_on_a_smooth_noisy_loss(seed):
    loss = smooth_loss(1000, seed)
    found = findings_of({"loss": (np.arange(1000), {"value": loss})})
    assert found == []


def test_loss_spike_fires_on_a_spike_and_once_per_blow_up():
    loss = smooth_loss(600, 7)
    loss[300] *= 3  # isolated spike
    loss[450:] = 10 * loss[450:]  # blow-up that stays
    found = one("loss_spike", findings_of({"loss": (np.arange(600), {"value": loss})}))
    assert [f.step for f in found] == [300, 450]
    f = found[0]
    assert f.severity == "warning" and f.metric == "loss/value"
    assert f.value == pytest.approx(loss[300]) and f.threshold < f.value
    assert "median" in f.message and "learning rate" in f.hint


def test_loss_spike_needs_history_and_a_relative_jump():
    loss = smooth_loss(200, 8)
    loss[10] *= 5  # before min_history
    assert findings_of({"loss": (np.arange(200), {"value": loss})}) == []
    # a very smooth loss: a 20 % bump is a huge z-score but below 1.5 x the median
    loss = np.linspace(1.0, 0.9, 200)
    loss[150] *= 1.2
    assert findings_of({"loss": (np.arange(200), {"value": loss})}) == []
    loss[150] *= 2
    assert [f.step for f in findings_of({"loss": (np.arange(200), {"value": loss})})] == [150]


def test_loss_spike_cusum_catches_a_sustained_rise_the_zscore_misses():
    rng = np.random.default_rng(9)
    loss = 1.0 + 0.05 * rng.standard_normal(400)
    loss[200:] += 0.25  # +5 sigma plateau, only 1.25 x the median
    steps = np.arange(400)
    assert findings_of({"loss": (steps, {"value": loss})}) == []
    found = findings_of({"loss": (steps, {"value": loss})}, [LossSpike(method="cusum")])
    assert len(found) == 1 and 200 <= found[0].step <= 210
    assert found[0].threshold == 12.0 and "CUSUM" in found[0].message
    # and CUSUM stays quiet on a smooth noisy loss
    assert (
        findings_of(
            {"loss": (np.arange(1000), {"value": smooth_loss(1000, 3)})},
            [LossSpike(method="cusum")],
        )
        == []
    )


# --------------------------------------------------------------------------- grad-norm spike


def test_grad_norm_spike_fires_on_a_jump_and_not_on_heavy_tailed_noise():
    rng = np.random.default_rng(10)
    g = np.exp(0.25 * rng.standard_normal(800))  # log-normal minibatch gradient norms
    steps = np.arange(800)
    assert findings_of({"grad_norm": (steps, {"value": g})}) == []
    g[500] = 8 * np.median(g)
    found = findings_of({"grad_norm": (steps, {"value": g})})
    assert [(f.rule, f.step, f.metric) for f in found] == [
        ("grad_norm_spike", 500, "grad_norm/value")
    ]
    assert "clip" in found[0].hint


# --------------------------------------------------------------------------- logit growth


def test_logit_growth_fires_on_large_logits_and_softmax_collapse():
    max_abs = np.linspace(10, 150, 100)
    sc = np.zeros(100)
    found = findings_of({"logits": (np.arange(100), {"max_abs": max_abs, "softmax_collapse": sc})})
    assert [(f.step, f.metric) for f in found] == [
        (int(np.argmax(max_abs >= 100)), "logits/max_abs")
    ]
    sc[30:33] = 0.25
    found = findings_of(
        {"logits": (np.arange(100), {"max_abs": np.full(100, 20.0), "softmax_collapse": sc})}
    )
    assert [(f.step, f.metric, f.value) for f in found] == [(30, "logits/softmax_collapse", 0.25)]
    assert "25%" in found[0].message and "z-loss" in found[0].hint


def test_logit_growth_quiet_on_moderate_logits():
    rng = np.random.default_rng(11)
    cols = {"max_abs": 20 + 30 * rng.random(200), "softmax_collapse": np.zeros(200)}
    assert findings_of({"logits": (np.arange(200), cols)}) == []


# --------------------------------------------------------------------------- rank collapse


def test_rank_collapse_fires_after_warmup_when_rank_halves():
    rank = np.concatenate([np.linspace(5, 40, 5), np.full(50, 40.0), np.full(20, 15.0)])
    found = findings_of({"representation": (np.arange(len(rank)), {"effective_rank": rank})})
    assert [(f.rule, f.step, f.threshold) for f in found] == [("rank_collapse", 55, 20.0)]


def test_rank_collapse_quiet_on_warmup_transients_and_mild_decline():
    rank = np.concatenate(
        [[40.0, 30, 10, 12, 15], np.linspace(15, 40, 30), np.linspace(40, 25, 40)]
    )
    assert findings_of({"representation": (np.arange(len(rank)), {"effective_rank": rank})}) == []


# --------------------------------------------------------------------------- non-finite


def test_nonfinite_loss_and_flags_are_errors_once_per_episode():
    loss = smooth_loss(100, 12)
    loss[60:] = NAN  # diverged for good
    flags_grad = np.zeros(100)
    flags_grad[20] = 1.0
    flags_loss = np.zeros(100)
    flags_loss[60:] = 1.0
    found = findings_of(
        {
            "loss": (np.arange(100), {"value": loss}),
            "nonfinite": (np.arange(100), {"loss": flags_loss, "grad": flags_grad}),
        }
    )
    assert [(f.step, f.rule, f.severity, f.metric) for f in found] == [
        (20, "nonfinite", "error", "nonfinite/grad"),
        (60, "nonfinite", "error", "loss/value"),
        (60, "nonfinite", "error", "nonfinite/loss"),
    ]
    assert "nan" in found[1].message


def test_nonfinite_quiet_on_finite_values_and_failed_flags():
    cols = {"loss": [0.0, NAN, 0.0], "grad": [0.0, NAN, 0.0]}
    series = {
        "loss": ([0, 1, 2], {"value": [1.0, 0.9, 0.8]}),
        "nonfinite": ([0, 1, 2], cols),
    }
    assert findings_of(series) == []
    # inf loss fires too
    (f,) = findings_of({"loss": ([0, 1], {"value": [1.0, -INF]})})
    assert f.step == 1 and "-inf" in f.message


# --------------------------------------------------------------------------- NaN rows, episodes


def test_nan_rows_are_ignored_and_do_not_end_an_episode():
    n = 120
    nan_rows = np.zeros(n, bool)
    nan_rows[::7] = True
    loss = smooth_loss(n, 13)
    loss[nan_rows] = NAN  # only NonFinite may react to these
    series = {
        "sharpness": (np.arange(n), {"ratio": np.where(nan_rows, NAN, 0.5)}),
        "taylor": (np.arange(n), {"r": np.where(nan_rows, NAN, 0.2)}),
        "logits": (np.arange(n), {"max_abs": np.where(nan_rows, NAN, 5.0)}),
        "representation": (np.arange(n), {"effective_rank": np.where(nan_rows, NAN, 30.0)}),
        "spectral_alignment": (
            np.arange(n),
            {"minority": np.where(nan_rows[:, None], NAN, minority_series(n))},
        ),
        "grad_norm": (np.arange(n), {"value": np.where(nan_rows, NAN, 1.0)}),
        "nonfinite": (np.arange(n), {"loss": np.full(n, NAN), "grad": np.full(n, NAN)}),
        "loss": (np.arange(n), {"value": loss}),
    }
    rules = default_rules(nonfinite=None)
    assert findings_of(series, rules) == []
    # an episode with NaN rows in between: still one episode (NaN does not count as quiet)
    r = np.full(40, 0.2)
    r[10:13] = 2.0
    r[13:25] = NAN
    r[25] = 2.0
    assert [f.step for f in findings_of({"taylor": (np.arange(40), {"r": r})})] == [10]


def test_episodes_deduplicate_until_the_rule_clears_for_rearm_rows():
    r = np.full(60, 0.2)
    r[[5, 6, 8, 10]] = 2.0  # gaps of < 3 quiet rows: one episode
    r[[20, 40]] = 2.0  # separated by >= 3 quiet rows: new episodes
    found = findings_of({"taylor": (np.arange(60), {"r": r})})
    assert [f.step for f in found] == [5, 20, 40]
    found = findings_of({"taylor": (np.arange(60), {"r": r})}, [TaylorRatio(rearm=1)])
    assert [f.step for f in found] == [5, 8, 10, 20, 40]
    found = findings_of({"taylor": (np.arange(60), {"r": r})}, [TaylorRatio(rearm=30)])
    assert [f.step for f in found] == [5]


def test_absent_metrics_and_empty_runs_give_no_findings():
    assert check(RunWriter.memory()) == []
    w = make_writer({"loss": (np.arange(50), {"value": smooth_loss(50, 0)})})
    w.declare("taylor", CONTRACT["taylor"])  # declared, no rows
    w.declare("custom", {"v": None})
    w.append("custom", 0, {"v": 1e9})
    assert check(w) == []


# --------------------------------------------------------------------------- online == offline

FIELD_VALUES = st.one_of(
    st.floats(0.0, 2.0),
    st.sampled_from([NAN, INF, -INF, 0.0, 0.01, 1.0, 3.0, 5.0, 150.0, 1e6]),
)

SMALL_RULES = default_rules(
    loss_spike={"window": 6, "min_history": 3},
    grad_norm_spike={"window": 5, "min_history": 2, "method": "cusum", "cusum_h": 3.0},
    rank_collapse={"warmup": 1},
    sign_collapse={"healthy": 0.3},
    nonfinite={"metrics": ("nonfinite", "loss", "grad_norm")},
)


@st.composite
def random_runs(draw):
    """{metric: [(step, row)]} over a random subset of the contract, with NaN/inf rows."""
    names = draw(st.lists(st.sampled_from(sorted(CONTRACT)), unique=True, max_size=len(CONTRACT)))
    out = {}
    for name in names:
        steps = sorted(draw(st.sets(st.integers(0, 80), max_size=30)))
        rows = []
        for step in steps:
            row = {}
            for fname, shape in CONTRACT[name].items():
                if shape:
                    row[fname] = np.array([draw(FIELD_VALUES) for _ in range(shape[0])])
                else:
                    row[fname] = draw(FIELD_VALUES)
            rows.append((step, row))
        out[name] = rows
    return out


def _feed(run_rows, rules, order_seed):
    alarms = OnlineAlarms(rules)
    alarms.declare("spectral_alignment", {"layers": LAYERS})
    queue = [(name, i) for name, rows in run_rows.items() for i in range(len(rows))]
    random.Random(order_seed).shuffle(queue)
    # any interleaving of metrics, each metric's rows in order
    nxt = dict.fromkeys(run_rows, 0)
    emitted = []
    for name, _ in queue:
        step, row = run_rows[name][nxt[name]]
        nxt[name] += 1
        emitted.extend(alarms.observe(name, step, row))
    assert emitted == alarms.findings
    return emitted


def _writer_from_rows(run_rows, path=None):
    w = RunWriter.memory() if path is None else RunWriter(path, mode="w")
    for name, rows in run_rows.items():
        params = {"layers": LAYERS} if name == "spectral_alignment" else None
        w.declare(name, CONTRACT[name], params=params)
        for step, row in rows:
            w.append(name, step, row)
    return w


def _key(f: Finding):
    return (f.step, f.rule, f.metric, f.severity)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(run_rows=random_runs(), order_seed=st.integers(0, 2**16), small=st.booleans())
def test_online_findings_equal_offline_check(run_rows, order_seed, small):
    rules = SMALL_RULES if small else None
    online = _feed(run_rows, rules, order_seed)
    offline = check(_writer_from_rows(run_rows), rules)
    assert sorted(online, key=_key) == offline
    assert offline == sorted(offline, key=_key)


def test_online_equals_offline_on_a_realistic_run_and_an_hdf5_file(tmp_path):
    rng = np.random.default_rng(14)
    n = 400
    loss = smooth_loss(n, 14)
    loss[250] *= 4
    loss[380:] = NAN
    _, sharp = sharpening(n_rise=40, n_hover=0)
    m = minority_series(40)
    m[30:, 2] = 0.0
    run_rows = {
        "loss": [(s, {"value": loss[s]}) for s in range(n)],
        "grad_norm": [(s, {"value": float(np.exp(0.2 * rng.standard_normal()))}) for s in range(n)],
        "nonfinite": [(s, {"loss": float(s >= 380), "grad": float(s >= 380)}) for s in range(n)],
        "sharpness": [(10 * i, {k: v[i] for k, v in sharp.items()}) for i in range(40)],
        "spectral_alignment": [
            (10 * i, {"minority": m[i], "entropy": m[i], "mean_abs_cos": m[i]}) for i in range(40)
        ],
    }
    online = _feed(run_rows, None, 0)
    offline = check(_writer_from_rows(run_rows))
    path = tmp_path / "run.h5"
    _writer_from_rows(run_rows, path).close()
    from_file = check(path)
    with Run.open(path) as run:
        assert check(run) == from_file
    assert sorted(online, key=_key) == offline == from_file
    assert {f.rule for f in offline} == {
        "loss_spike",
        "nonfinite",
        "edge_of_stability",
        "sign_collapse",
    }
    # findings survive the store: writing them and reading them back gives equal values
    w = RunWriter(tmp_path / "with_findings.h5", mode="w")
    for f in offline:
        w.add_finding(f)
    w.close()
    with Run.open(tmp_path / "with_findings.h5") as run:
        assert run.findings() == offline


def test_replay_resumes_online_state():
    loss = smooth_loss(300, 15)
    loss[200] *= 3
    w = make_writer({"loss": (np.arange(150), {"value": loss[:150]})})
    alarms = OnlineAlarms()
    assert alarms.replay(w) == []
    found = [f for s in range(150, 300) for f in alarms.observe("loss", s, {"value": loss[s]})]
    assert [f.step for f in found] == [200]


def test_observe_accepts_tensors_and_checks_step_order():
    torch = pytest.importorskip("torch")
    alarms = OnlineAlarms([TaylorRatio()])
    assert alarms.observe("taylor", 0, {"r": torch.tensor(0.5)}) == []
    (f,) = alarms.observe("taylor", 1, {"r": torch.tensor([2.0])})
    assert f.value == 2.0
    assert alarms.observe("not_watched", 0, {"x": 1.0}) == []
    with pytest.raises(StepOrderError, match="step 1 does not come after its last step 1"):
        alarms.observe("taylor", 1, {"r": 0.1})


# --------------------------------------------------------------------------- configuration


def test_default_rules_are_the_eight_documented_rules_and_configurable():
    names = [r.name for r in default_rules()]
    assert names == list(RULES) and len(names) == 8
    rules = default_rules(loss_spike={"z": 8.0}, sign_collapse=None, taylor_ratio=False)
    by_name = {r.name: r for r in rules}
    assert by_name["loss_spike"].z == 8.0 and "sign_collapse" not in by_name
    assert "taylor_ratio" not in by_name
    assert isinstance(by_name["grad_norm_spike"], GradNormSpike)
    assert by_name["grad_norm_spike"].min_ratio == 2.0
    assert by_name["loss_spike"].config()["window"] == 50


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: default_rules(no_such_rule={}), "unknown rule"),
        (lambda: default_rules(loss_spike={"zz": 1}), "loss_spike: bad settings"),
        (lambda: default_rules(loss_spike=3), "loss_spike must be a mapping"),
        (lambda: LossSpike(window=10, min_history=20), "min_history"),
        (lambda: LossSpike(method="ewma"), "method"),
        (lambda: TaylorRatio(warn=2.0, error=1.0), "error"),
        (lambda: EdgeOfStability(approach=1.2), "approach"),
        (lambda: RankCollapse(ratio=1.5), "ratio"),
        (lambda: SignCollapse(healthy=0.01), "healthy"),
        (lambda: LogitGrowth(rearm=0), "rearm"),
        (lambda: NonFinite(metrics="loss"), "metrics"),
        (lambda: OnlineAlarms([TaylorRatio(), TaylorRatio()]), "two rules are named"),
        (lambda: OnlineAlarms(["taylor_ratio"]), "Rule objects"),
        (lambda: check(42), "run must be"),
    ],
)
def test_bad_configuration_is_a_value_error_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_custom_rule_in_a_few_lines():
    @dataclass
    class UpdateTooLarge(Rule):
        limit: float = 0.1
        metrics: tuple = ("update",)
        name: str = "update_too_large"

        def evaluate(self, metric, row):
            rel = row.get("relative")
            if rel is None or math.isnan(rel):
                return SKIP
            if rel > self.limit:
                return Trigger("warning", "relative", rel, self.limit, "big update", "lower lr")
            return None

    rel = np.full(20, 0.01)
    rel[7] = 0.5
    w = make_writer({"update": (np.arange(20), {"norm": np.ones(20), "relative": rel})})
    (f,) = check(w, [*default_rules(), UpdateTooLarge()])
    assert (f.rule, f.step, f.metric) == ("update_too_large", 7, "update/relative")


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 12),
    values=st.lists(
        st.one_of(st.floats(-5, 5, allow_nan=False), st.integers(-2, 2).map(float)),
        min_size=1,
        max_size=40,
    ),
)
def test_rolling_median_and_mad_match_numpy(size, values):
    from landscape.alarms import _RollingWindow

    w = _RollingWindow(size)
    for i, x in enumerate(values):
        w.append(x)
        a = np.asarray(values[max(0, i + 1 - size) : i + 1])
        med, mad = w.median_mad()
        assert len(w) == len(a)
        assert med == pytest.approx(np.median(a), abs=1e-12)
        assert mad == pytest.approx(np.median(np.abs(a - np.median(a))), abs=1e-12)


# --------------------------------------------------------------------------- real full-batch GD


def full_batch_gd(lr_at, n_steps, every):
    """Full-batch GD on a small tanh MLP fitting random labels (float64).

    Returns the loss at every step and, every ``every`` steps, the exact top Hessian
    eigenvalue (dense autograd Hessian + ``eigvalsh``) with the GD threshold 2/lr.
    """
    torch = pytest.importorskip("torch")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        x = torch.randn(24, 3, dtype=torch.float64)
        y = torch.randn(24, 1, dtype=torch.float64)
        net = torch.nn.Sequential(torch.nn.Linear(3, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))
    theta = torch.cat([p.detach().double().flatten() for p in net.parameters()])

    def loss_of(t):
        w1, b1 = t[:36].view(12, 3), t[36:48]
        w2, b2 = t[48:60].view(1, 12), t[60:]
        return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean() / 2

    losses, sharp = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 61-parameter model: threads only add contention
    try:
        _gd_loop(torch, loss_of, theta, lr_at, n_steps, every, losses, sharp)
    finally:
        torch.set_num_threads(threads)
    return losses, sharp


def _gd_loop(torch, loss_of, theta, lr_at, n_steps, every, losses, sharp):
    for step in range(n_steps):
        lr = lr_at(step)
        loss = loss_of(theta)
        losses.append(loss.item())
        if step % every == 0:
            hess = torch.autograd.functional.hessian(loss_of, theta, vectorize=True)
            lam = torch.linalg.eigvalsh(hess)[-1].item()
            sharp.append((step, {"lambda_max": lam, "threshold": 2 / lr, "ratio": lam * lr / 2}))
        t = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of(t), t)
        theta = theta - lr * g


def test_full_batch_gd_reaching_two_over_lr_fires_edge_of_stability():
    _, sharp = full_batch_gd(lambda s: 0.75, 250, every=10)
    ratios = np.array([row["ratio"] for _, row in sharp])
    assert ratios[0] < 0.9 and ratios.max() > 1.0  # progressive sharpening reaches 2/lr
    alarms = OnlineAlarms([EdgeOfStability()])
    found = [f for step, row in sharp for f in alarms.observe("sharpness", step, row)]
    warnings = [f for f in found if f.severity == "warning"]
    first_cross = sharp[int(np.argmax(ratios >= 1.0))][0]
    assert warnings[0].step == first_cross
    assert len(warnings) <= 2  # hovering at the edge does not flood
    assert all(f.step >= sharp[int(np.argmax(ratios >= 0.9))][0] for f in found)


def test_warnings_precede_the_blow_up_of_a_learning_rate_ramp():
    # the learning rate ramps up until GD diverges; sharpness is measured every 5 steps
    losses, sharp = full_batch_gd(lambda s: 0.2 + 0.005 * s, 160, every=5)
    w = make_writer(
        {
            "loss": (np.arange(len(losses)), {"value": losses}),
            "sharpness": (
                [s for s, _ in sharp],
                {k: [r[k] for _, r in sharp] for k in sharp[0][1]},
            ),
        }
    )
    found = check(w)
    eos = next(f for f in found if f.rule == "edge_of_stability" and f.severity == "warning")
    blow_up = next(f for f in found if f.rule in ("loss_spike", "nonfinite"))
    assert blow_up.step > 100 and losses[blow_up.step] > 1.5 * losses[blow_up.step - 30]
    assert eos.step < blow_up.step - 20  # the warning leads the blow-up by > 20 steps


def test_two_spike_rules_on_one_metric_need_distinct_names_and_both_report():
    rng = np.random.default_rng(16)
    loss = 1.0 + 0.05 * rng.standard_normal(300)
    loss[100] = 3.0  # isolated spike: z-score rule only
    loss[200:] += 0.25  # sustained rise: CUSUM only
    rules = [LossSpike(), LossSpike(method="cusum", name="loss_drift")]
    found = findings_of({"loss": (np.arange(300), {"value": loss})}, rules)
    assert [(f.rule, f.step) for f in found] == [("loss_spike", 100), ("loss_drift", 203)]


def test_a_rule_returning_garbage_is_a_type_error():
    @dataclass
    class Broken(Rule):
        metrics: tuple = ("loss",)
        name: str = "broken"

        def evaluate(self, metric, row):
            return True

    with pytest.raises(TypeError, match="expected a Trigger, None or SKIP"):
        OnlineAlarms([Broken()]).observe("loss", 0, {"value": 1.0})
