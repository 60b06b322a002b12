"""Alarm drivers: episodes; NaN rows; online evaluation equals offline ``check``
(hypothesis); HDF5 files; replay; configuration; custom rules; the rolling median."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import landscape as ls
from landscape import RuleError, StepOrderError
from landscape.alarms import (
    RULES,
    SKIP,
    EdgeOfStability,
    GradNormSpike,
    LogitGrowth,
    LossSpike,
    NonFiniteValues,
    OnlineAlarms,
    RankCollapse,
    Rule,
    SignCollapse,
    TaylorRatio,
    Trigger,
    check,
    collect_findings,
    default_rules,
    with_rules,
)
from landscape.findings import Finding, dedupe
from landscape.store import Run, RunWriter
from tests.alarms._support import (
    CONTRACT,
    INF,
    LAYERS,
    NAN,
    findings_of,
    make_writer,
    minority_series,
    sharpening,
    smooth_loss,
)

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
    return dedupe(emitted)  # as the monitor and check() do: one per (step, rule)


def _writer_from_rows(run_rows, path=None):
    w = RunWriter.memory() if path is None else RunWriter(path, mode="w")
    for name, rows in run_rows.items():
        params = {"layers": LAYERS} if name == "spectral_alignment" else None
        w.declare(name, CONTRACT[name], params=params)
        for step, row in rows:
            missing = {f: np.full(shape, NAN) for f, shape in CONTRACT[name].items()}
            w.append(name, step, {**missing, **row})  # a field the row lacks is NaN
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
        "sharpness_forecast",  # info: the sharpening ratio is on course to reach 1
    }
    assert {f.severity for f in offline if f.rule == "sharpness_forecast"} == {"info"}
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


def test_default_rules_are_the_documented_rules_and_configurable():
    names = [r.name for r in default_rules()]
    assert names == list(RULES)
    exported_rules = {c for n in ls.alarms.__all__ if isinstance(c := getattr(ls.alarms, n), type)
                      and issubclass(c, Rule) and c is not Rule}
    assert exported_rules == set(RULES.values())  # every exported rule is a default rule
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
        (lambda: EdgeOfStability(approach=13.0), "approach"),
        (lambda: RankCollapse(ratio=1.5), "ratio"),
        (lambda: SignCollapse(healthy=0.01), "healthy"),
        (lambda: LogitGrowth(rearm=0), "rearm"),
        (lambda: NonFiniteValues(metrics="loss"), "metrics"),
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
                return Trigger(
                    severity="warning",
                    field="relative",
                    value=rel,
                    threshold=self.limit,
                    message="big update",
                    hint="lower lr",
                )
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
    from landscape.alarms.statistics import RollingWindow

    w = RollingWindow(size)
    for i, x in enumerate(values):
        w.append(x)
        a = np.asarray(values[max(0, i + 1 - size) : i + 1])
        med, mad = w.median_mad()
        assert len(w) == len(a)
        assert med == w.median() == pytest.approx(np.median(a), abs=1e-12)
        assert mad == pytest.approx(np.median(np.abs(a - np.median(a))), abs=1e-12)
        assert w.maximum() == a.max()
        # the window without its newest value (a repeated maximum stays)
        assert w.maximum(but_newest=True) == (a[:-1].max() if len(a) > 1 else -np.inf)


def _mad_by_merging(values):
    """The median and MAD by merging the deviations left and right of the median."""
    a = sorted(values)
    n, h = len(a), len(a) // 2
    med = a[h] if n % 2 else 0.5 * (a[h - 1] + a[h])
    right = int(np.searchsorted(a, med, side="left"))
    left, devs = right - 1, []
    while len(devs) <= h:
        if left >= 0 and (right >= n or med - a[left] <= a[right] - med):
            devs.append(med - a[left])
            left -= 1
        else:
            devs.append(a[right] - med)
            right += 1
    return med, (devs[h] if n % 2 else 0.5 * (devs[h - 1] + devs[h]))


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.one_of(st.floats(-1e6, 1e6, allow_nan=False),
                                 st.integers(-3, 3).map(float)), min_size=1, max_size=80))
def test_the_mad_by_binary_search_is_bitwise_the_merged_one(values):
    """The spike rules' statistics must not move by one rounding: findings would."""
    from landscape.alarms.statistics import RollingWindow

    w = RollingWindow(len(values))
    for x in values:
        w.append(x)
    assert w.median_mad() == _mad_by_merging(values)


def test_a_rule_returning_garbage_is_a_rule_error_naming_the_type_error():
    @dataclass
    class Broken(Rule):
        metrics: tuple = ("loss",)
        name: str = "broken"

        def evaluate(self, metric, row):
            return True

    with pytest.raises(RuleError, match=r"raised TypeError.*expected a Trigger, None or SKIP"):
        OnlineAlarms([Broken()]).observe("loss", 0, {"value": 1.0})


def test_the_report_always_has_the_alarm_rules():
    from landscape.report import alarms_available

    with pytest.warns(DeprecationWarning, match="always installed"):
        assert alarms_available() is True


def test_a_rule_given_with_other_settings_replaces_the_stored_findings_of_its_name():
    # the monitor stored the default rule's info at the edge; a gate asks for a warning there
    ratio = np.array([0.5, 1.1, 1.2, 0.5, 0.5, 0.5])
    w = make_writer({"sharpness": (np.arange(6) * 10, {"ratio": ratio}),
                     "loss": (np.arange(60), {"value": np.ones(60)})})
    for f in check(w):
        w.add_finding(f)
    w.add_finding(Finding(30, "loss_spike", "warning", "loss/value", 9.0, 6.0, "online"))
    stored = [(f.step, f.rule, f.severity) for f in w.run().findings()]
    assert (10, "edge_of_stability", "info") in stored
    found = [(f.step, f.rule, f.severity) for f in collect_findings(w)]
    assert found == sorted(stored)  # the default path: the stored findings stand
    # printed one line per finding, as `landscape check` lists them (the README's print)
    assert str(collect_findings(w)).splitlines()[0].startswith("step 10: [info] edge_of_stab")
    found = [(f.step, f.rule, f.severity)
             for f in collect_findings(w, rules=with_rules([EdgeOfStability(threshold=1.0)]))]
    assert [x for x in found if x[1] == "edge_of_stability"] == [(10, "edge_of_stability",
                                                                  "warning")]
    # a built-in rule given as it is keeps the stored findings of its name (a monitor's own
    # settings of it, recorded online), as the default path does
    assert (30, "loss_spike", "warning") in found
    found = collect_findings(w, rules=default_rules())
    assert (10, "edge_of_stability", "info") in [(f.step, f.rule, f.severity) for f in found]
    # a rule watching no metric of the run replaces nothing
    found = collect_findings(w, rules=[*default_rules(loss_spike=None),
                                       LossSpike(z=99.0, metrics=("grad_norm",))])
    assert (30, "loss_spike", "warning") in [(f.step, f.rule, f.severity) for f in found]
