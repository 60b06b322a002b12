"""A user's own metrics and alarm rules (docs/monitor.md, docs/alarms.md): their mistakes
never stop training, and the mistakes a newcomer makes give one clear error."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from landscape_cli.main import cli

import landscape as ls
from landscape.alarms import (
    SKIP,
    LossSpike,
    OnlineAlarms,
    Rule,
    Trigger,
    default_rules,
    row_value,
)
from landscape.metrics import Metric
from tests import models
from tests.alarms._support import make_writer


def _train(path, metrics, steps=3, **kwargs):
    """A short monitored run; returns the monitor and the trained parameters."""
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = models.classification_data()
    with ls.Monitor(model, F.cross_entropy, path, optimizer=opt, metrics=metrics,
                    probe=(x, y), warn=False, **kwargs) as mon:
        models.full_batch_steps(mon, model, opt, x, y, steps)
    return mon, [p.detach().clone() for p in model.parameters()]


class Misspelt(Metric):
    name = "misspelt"
    FIELDS = ("value",)

    def compute(self, ctx):
        return {"valeu": 1.0}


class WrongShape(Metric):
    name = "wrong_shape"

    def fields(self):
        return {"norms": (3,)}

    def compute(self, ctx):
        return {"norms": np.ones(4)}


class Overflows(Metric):
    name = "overflows"
    FIELDS = ("value",)

    def compute(self, ctx):
        return {"value": 10**400}  # no float64: OverflowError in NumPy


class OnMeta(Metric):
    name = "on_meta"
    FIELDS = ("value",)

    def compute(self, ctx):
        return {"value": torch.ones((), device="meta")}  # no data to copy to the host


class Nested(Metric):
    name = "nested"

    def fields(self):
        return {"v": (2,)}

    def compute(self, ctx):
        return {"v": torch.nested.nested_tensor([torch.ones(1), torch.ones(1)])}


@pytest.mark.parametrize("metric", [Misspelt(), WrongShape(), Overflows(), OnMeta(), Nested()],
                         ids=lambda m: m.name)
def test_a_row_that_does_not_fit_its_fields_is_the_metrics_failure(tmp_path, metric):
    """It was a ValueError out of mon.step from the writer: training stopped, half a step
    written. Now a NaN row and one metric_failed finding naming the class, as when
    compute() raises."""
    with pytest.warns(RuntimeWarning, match=f"{type(metric).__name__}.compute"):
        _, trained = _train(tmp_path / "run.h5", ["loss", metric])
    _, plain = _train(None, ["loss"])
    assert all(torch.equal(a, b) for a, b in zip(trained, plain))  # training went on
    run = ls.store.Run.open(tmp_path / "run.h5")
    assert run.steps(metric.name).tolist() == run.steps("loss").tolist() == [0, 1, 2]
    field = next(iter(metric.fields()))
    assert np.isnan(run.series(metric.name, field)[1]).all()
    failed = [f for f in run.findings() if f.rule == "metric_failed"]
    assert len(failed) == 1 and "does not fit its fields()" in failed[0].message
    with pytest.raises(ValueError, match="does not fit its fields"):
        _train(tmp_path / "strict.h5", ["loss", metric], strict=True)


class ReturnsFloat(Metric):
    name = "returns_float"
    FIELDS = ("value",)

    def compute(self, ctx):
        return 0.5


def test_a_metric_that_returns_no_dict_is_named_in_one_line(tmp_path):
    """compute() returning a float said "TypeError: 'float' object is not iterable", and
    under strict=True did not name the metric (newcomer review)."""
    said = "ReturnsFloat.compute\\(\\) must return a dict {field: value}, got float"
    with pytest.warns(RuntimeWarning, match=said):
        _, trained = _train(tmp_path / "run.h5", ["loss", ReturnsFloat()])
    _, plain = _train(None, ["loss"])
    assert all(torch.equal(a, b) for a, b in zip(trained, plain))
    run = ls.store.Run.open(tmp_path / "run.h5")
    assert np.isnan(run.series("returns_float", "value")[1]).all()
    with pytest.raises(TypeError, match=said):
        _train(tmp_path / "strict.h5", ["loss", ReturnsFloat()], strict=True)


class _Misread(Rule):
    metrics = ("loss",)
    name = "misread"

    def evaluate(self, metric, row):
        v = row_value(row, "valeu")  # the user's typo
        return SKIP if v is None else v > 1


def test_a_field_a_rule_of_the_users_reads_and_the_rows_lack_is_warned_about_once(tmp_path):
    """row_value gave None for a misspelt field on every row: the rule never fired, online,
    offline or in the CLI, without a word (newcomer review)."""
    said = "alarm rule 'misread' read field 'valeu', which the rows of metric 'loss' do not"
    with pytest.warns(RuntimeWarning, match=said) as caught:
        _train(tmp_path / "run.h5", ["loss"], steps=4, alarms=[*default_rules(), _Misread()])
    assert sum("'valeu'" in str(w.message) for w in caught) == 1
    with pytest.warns(RuntimeWarning, match=said):
        ls.check(tmp_path / "run.h5", rules=[_Misread()])
    with warnings.catch_warnings():  # the built-in rules read optional fields: no warning
        warnings.simplefilter("error")
        ls.check(tmp_path / "run.h5")


class _Fallback(Rule):
    metrics = ("loss", "grad_norm")
    name = "fallback"

    def evaluate(self, metric, row):
        return SKIP if row_value(row, "value") is None else None


def test_no_typo_warning_for_a_subclassed_built_in_or_a_field_of_another_watched_metric():
    """A subclass of a built-in with other settings reads the built-in's optional fields,
    and a rule over two metrics may read a field of either: no "a typo?" (own-diff
    review); under warnings-as-errors the warning does not switch the rule off."""
    class MySpike(ls.alarms.GradNormSpike):
        pass

    alarms = OnlineAlarms([MySpike(), _Fallback()], strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(30):
            alarms.observe("grad_norm", i, {"value": 1.0 + 0.01 * i})
            alarms.observe("loss", i, {"value": 2.0, "samples": 8.0})
    typo = OnlineAlarms([_Misread()], strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="'valeu'"):
            typo.observe("loss", 0, {"value": 2.0})
    assert typo.failures == [] and not typo._streams["loss"][0].failed
    # say=False (the monitor's ranks other than the first): no warning, the record kept
    quiet = OnlineAlarms([_Misread(), _Buggy()], strict=False, say=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.observe("loss", 0, {"value": 2.0})
    assert [f.extra["failed_rule"] for f in quiet.failures] == ["buggy"]


class _NoSuper(Metric):
    name = "no_super"
    FIELDS = ("value",)

    def __init__(self, scale):
        self.scale = scale  # forgot super().__init__()

    def compute(self, ctx):
        return {"value": self.scale}


def test_a_metric_that_did_not_call_super_init_is_named_at_construction(tmp_path):
    """AttributeError: 'NoSuper' object has no attribute 'data', from inside the monitor
    (newcomer review); and a repeated metric says how to keep two instances."""
    with pytest.raises(TypeError, match=r"_NoSuper.__init__ did not call super\(\).__init__"):
        _train(tmp_path / "run.h5", ["loss", _NoSuper(2.0)])
    with pytest.raises(TypeError, match="did not call super"):
        _train(tmp_path / "one.h5", _NoSuper(2.0))
    with pytest.raises(ValueError, match=r"repeated: misspelt; give a second instance a name"):
        _train(tmp_path / "twice.h5", [Misspelt(), Misspelt()])


class _ReadsAnUndeclaredLayer(Metric):
    name = "undeclared_layer"
    FIELDS = ("value",)

    def compute(self, ctx):
        return {"value": float(ctx.captured(self.data).outputs["0"].mean())}


def test_a_layer_read_without_captures_names_the_fix(tmp_path):
    """A metric reading a layer it did not list in captures() failed with KeyError: '0'
    (newcomer review)."""
    with pytest.raises(KeyError, match=r"the outputs of layer '0' were not captured: list "
                                       r"the layer in the metric's captures\(\)"):
        _train(tmp_path / "run.h5", ["loss", _ReadsAnUndeclaredLayer()], strict=True)


class _Buggy(Rule):
    metrics = ("loss",)
    name = "buggy"

    def evaluate(self, metric, row):
        return row["no_such_field"] > 1  # KeyError


def test_a_rule_that_raises_is_switched_off_with_one_warning(tmp_path):
    rules = [*default_rules(), _Buggy()]
    with pytest.warns(RuntimeWarning, match="alarm rule 'buggy' raised KeyError") as caught:
        _, trained = _train(tmp_path / "run.h5", ["loss"], steps=4, alarms=rules)
    assert sum("buggy" in str(w.message) for w in caught) == 1  # once, then off
    _, plain = _train(None, ["loss"], steps=4)
    assert all(torch.equal(a, b) for a, b in zip(trained, plain))
    _assert_the_gate_fails_on_the_failed_rule(tmp_path / "run.h5", "buggy")
    with pytest.raises(ls.RuleError, match="'buggy' raised KeyError on metric 'loss' at step 0"):
        _train(tmp_path / "strict.h5", ["loss"], alarms=rules, strict=True)
    with pytest.raises(ls.RuleError, match="no_such_field"):  # offline: strict by default
        OnlineAlarms([_Buggy()]).observe("loss", 0, {"value": 1.0})


class _BuggyEvaluator(Rule):
    metrics = ("loss",)
    name = "buggy_evaluator"

    def evaluator(self, metric, params):
        return undefined_name  # noqa: F821 - the user's bug


def test_a_rule_whose_evaluator_raises_is_switched_off_too(tmp_path):
    """evaluator(metric, params) ran outside the guard: a NameError out of mon.step."""
    with pytest.warns(RuntimeWarning, match="'buggy_evaluator' raised NameError"):
        _, trained = _train(tmp_path / "run.h5", ["loss"], steps=3,
                            alarms=[*default_rules(), _BuggyEvaluator()])
    _, plain = _train(None, ["loss"], steps=3)
    assert all(torch.equal(a, b) for a, b in zip(trained, plain))
    _assert_the_gate_fails_on_the_failed_rule(tmp_path / "run.h5", "buggy_evaluator")


def _assert_the_gate_fails_on_the_failed_rule(path, rule):
    """The run stores one rule_failed warning, and `landscape check` fails on it: the rule
    died at step 0 and left nothing, so the gate passed (newcomer review)."""
    failed = [f for f in ls.store.Run.open(path).findings() if f.rule == "rule_failed"]
    assert [(f.step, f.severity, f.metric, f.extra["failed_rule"]) for f in failed] == [
        (0, "warning", "loss", rule)]
    assert f"alarm rule {rule!r} raised" in failed[0].message
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 1 and "rule_failed" in result.stdout
    for name in ("rule_failed", rule):  # the record of failures, or the rule that failed
        ignored = CliRunner().invoke(cli, ["check", str(path), "--ignore-rule", name])
        assert ignored.exit_code == 0, ignored.output


class _BuggyToo(_Buggy):
    name = "buggy_too"


class _Fixed(Rule):
    metrics = ("loss",)

    def __init__(self, name):
        self.name = name

    def evaluate(self, metric, row):
        return None


def test_a_rule_s_failure_is_recorded_not_returned_and_each_failed_rule_once(tmp_path):
    """The rule_failed finding went out with the step's findings: Monitor.step returned it,
    so a callback's stop_on="warning" stopped training on a rule's bug, the adaptive window
    opened, and two rules failing at one step kept one finding (own-diff review)."""
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = models.classification_data()
    called = []
    with pytest.warns(RuntimeWarning, match="raised KeyError"):
        with ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5", optimizer=opt,
                        metrics=["loss"], alarms=[*default_rules(), _Buggy(), _BuggyToo()],
                        warn=False, on_finding=called.append) as mon:
            returned = []
            for step in range(3):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                returned += mon.step(step, batch=(x, y), loss=loss)
    assert returned == [] and mon._dense.until == -1
    assert sorted(f.extra["failed_rule"] for f in called) == ["buggy", "buggy_too"]
    found = ls.alarms.collect_findings(tmp_path / "run.h5")
    assert sorted(f.extra["failed_rule"] for f in found if f.rule == "rule_failed") == [
        "buggy", "buggy_too"]
    # a fixed rule given again replaces the record of its failure
    fixed = ls.alarms.collect_findings(tmp_path / "run.h5", rules=ls.alarms.with_rules(
        [_Fixed("buggy"), _Fixed("buggy_too")]))
    assert [f for f in fixed if f.rule == "rule_failed"] == []


@dataclass(frozen=True)
class _Frozen(Rule):
    metrics: tuple = ("loss",)
    name: str = "frozen"

    def evaluate(self, metric, row):
        return None


def test_a_frozen_dataclass_rule_is_accepted():
    """The validation assigned rule.metrics: FrozenInstanceError at start()."""
    assert OnlineAlarms([_Frozen()]).rules[0].metrics == ("loss",)


def test_a_trigger_checks_its_severity_and_numbers():
    with pytest.raises(ValueError, match="severity"):
        Trigger("critical", "value", 1.0, 0.5, "m", "h")
    with pytest.raises(ValueError, match=r"Trigger\.value must be a number"):
        Trigger("warning", "value", np.ones(3), 0.5, "m", "h")


@dataclass
class _UpdateTooLarge(Rule):
    limit: float = 0.1
    metrics: tuple = ("update",)
    name: str = "update_too_large"

    def evaluate(self, metric, row):
        rel = row.get("relative")
        if rel is None or math.isnan(rel) or rel <= self.limit:
            return None
        return Trigger("warning", "relative", rel, self.limit, "large update", "lower the lr")


def test_user_rules_are_validated_like_the_built_in_ones():
    with pytest.raises(ValueError, match="UpdateTooLarge: name must be a non-empty"):
        OnlineAlarms([_UpdateTooLarge(name="")])
    with pytest.raises(ValueError, match="metrics must be a sequence of metric names"):
        OnlineAlarms([_UpdateTooLarge(metrics="update")])  # watched 'u', 'p', 'd', ...
    with pytest.raises(ValueError, match="instantiate it"):
        OnlineAlarms([_UpdateTooLarge])
    assert OnlineAlarms(LossSpike()).rules[0].name == "loss_spike"  # one rule alone


def test_a_rule_watching_no_metric_warns_at_start(tmp_path):
    typo = _UpdateTooLarge(metrics=("updat",), name="typo")
    with pytest.warns(UserWarning, match="alarm rule 'typo' watches updat"):
        _train(tmp_path / "run.h5", ["loss"], steps=1, alarms=[*default_rules(), typo])
    with warnings.catch_warnings():  # the built-in rules watch registered metrics
        warnings.simplefilter("error", UserWarning)
        _train(tmp_path / "quiet.h5", ["loss"], steps=1)


def test_a_list_of_rules_without_any_built_in_one_says_it_replaces_them(tmp_path):
    """Monitor(alarms=[MyRule()]) silently dropped every built-in rule, the non-finite one
    too (landscape check --rules adds to them)."""
    mine = _UpdateTooLarge()
    with pytest.warns(UserWarning, match=r"replaces the built-in rules.*with_rules"):
        _train(tmp_path / "mine.h5", ["loss", "update"], steps=1, alarms=[mine])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mon, _ = _train(tmp_path / "both.h5", ["loss", "update"], steps=1,
                        alarms=ls.alarms.with_rules([mine]))
        assert {"nonfinite", "update_too_large"} <= {r.name for r in mon._alarms.rules}
        _train(tmp_path / "one.h5", ["loss"], steps=1, alarms=[LossSpike()])


def test_an_offline_rule_that_finds_none_of_its_metrics_says_so(tmp_path):
    """landscape check --rules with a misspelt metric passed a CI gate without a word."""
    _train(tmp_path / "run.h5", ["loss"], steps=3)
    typo = _UpdateTooLarge(metrics=("updat",), name="typo")
    with pytest.warns(UserWarning, match=r"alarm rule 'typo' watches updat, which this run "
                                         r"does not hold \(loss.*not evaluated"):
        assert ls.check(tmp_path / "run.h5", ls.alarms.with_rules([typo])) == []
    with warnings.catch_warnings():  # the built-in rules watch metrics a run may lack
        warnings.simplefilter("error", UserWarning)
        ls.check(tmp_path / "run.h5", ls.alarms.default_rules())
        ls.alarms.collect_findings(tmp_path / "run.h5")  # a path, as check takes


class _Probe(Metric):
    name = "probe"
    FIELDS = ("value",)

    def compute(self, ctx):
        return {"value": 1.0}


class _MyLoss(Metric):
    name = "loss"
    FIELDS = ("value",)

    def compute(self, ctx):
        return {"value": 1.0}


class _NoName(Metric):
    FIELDS = ("value",)


class _Slashed(Metric):
    name = "a/b"
    FIELDS = ("value",)


class _StringFields(Metric):
    name = "string_fields"
    FIELDS = "value"  # ("value",) without its comma


class _NoCompute(Metric):
    name = "no_compute"
    FIELDS = ("value",)


def test_the_mistakes_a_newcomer_makes_in_a_metric(tmp_path):
    with pytest.raises(ValueError, match="'probe' is reserved"):  # was 'already in the run'
        ls.Monitor(models.mlp(), F.cross_entropy, metrics=[_Probe()])
    with pytest.warns(UserWarning, match="_MyLoss is named 'loss'"):
        ls.Monitor(models.mlp(), F.cross_entropy, metrics=[_MyLoss()])
    # a metric without a name was refused; it is now named after its class
    assert _NoName.name == "no_name" and _MyLoss.name == "loss"  # (one it sets is kept)

    class ProbeStat(Metric):  # a base of the user's own: its subclasses get their names
        FIELDS = ("value",)

    class WeightMean(ProbeStat):
        pass

    class MySharpness(ls.metrics.Sharpness):  # a built-in's subclass keeps its name
        pass

    assert (ProbeStat.name, WeightMean.name, MySharpness.name) == (
        "probe_stat", "weight_mean", "sharpness")
    with pytest.raises(ValueError, match=r"_Slashed.name must be a non-empty name"):
        ls.Monitor(models.mlp(), F.cross_entropy, metrics=[_Slashed()])
    with pytest.raises(TypeError, match=r"write \('value',\)"):
        _train(tmp_path / "fields.h5", [_StringFields()])
    with pytest.warns(RuntimeWarning, match="_NoCompute does not define compute"):
        _train(tmp_path / "compute.h5", [_NoCompute()], steps=1)


def test_registering_the_same_class_again_replaces_it():
    """A notebook cell re-run (or importlib.reload) defines the class anew."""

    def define():
        @ls.metrics.register
        class ReRegistered(Metric):
            name = "re_registered_for_test"
            FIELDS = ("value",)

            def compute(self, ctx):
                return {"value": 0.0}

        return ReRegistered

    from landscape.metrics.base import _REGISTRY

    try:
        first, second = define(), define()  # the second was 'already registered'
        assert type(ls.metrics.create("re_registered_for_test")) is second is not first

        class Other(Metric):
            name = "re_registered_for_test"

        with pytest.raises(ValueError, match="already registered"):
            ls.metrics.register(Other)
    finally:
        _REGISTRY.pop("re_registered_for_test", None)


def test_a_data_loader_or_an_iterator_as_the_probe_is_refused_at_once():
    """It was accepted; every probe metric then recorded NaN and metric_failed."""
    x, y = models.classification_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    for probe in (loader, iter([(x, y)]), ((x[i:i + 4], y[i:i + 4]) for i in (0, 4))):
        with pytest.raises(ValueError, match="fixed batch or a list of batches"):
            ls.Monitor(models.mlp(), F.cross_entropy, probe=probe)
    ls.Monitor(models.mlp(), F.cross_entropy, probe=[(x, y), (x, y)])  # a list is fine


def test_an_instance_of_a_registered_class_defined_again_does_not_warn():
    """A notebook cell re-run: the old instance's class is not the registered one, but the
    same module and name (register() replaces it): no 'is named ..., the name of' warning."""
    from landscape.metrics.base import _REGISTRY

    def define():
        @ls.metrics.register
        class CellMetric(Metric):
            name = "cell_metric_for_test"
            FIELDS = ("value",)

            def compute(self, ctx):
                return {"value": 0.0}

        return CellMetric

    try:
        old = define()()
        define()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            ls.Monitor(models.mlp(), F.cross_entropy, metrics=[old])
    finally:
        _REGISTRY.pop("cell_metric_for_test", None)


def test_a_bfloat16_tensor_in_a_row_is_stored():
    """NumPy has no bfloat16: the row was a metric_failed 'does not fit its fields()'."""

    class Half(Metric):
        name = "half"
        FIELDS = ("value",)

        def compute(self, ctx):
            return {"value": torch.tensor(1.5, dtype=torch.bfloat16)}

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        mon, _ = _train(None, [Half()], steps=1)
    assert mon.run().series("half", "value")[1].tolist() == [1.5]


def test_a_step_without_its_loss_is_no_nan_loss_and_every_finding_is_called_back(tmp_path):
    """The failed loss metric's NaN row reached the rules: a 'training loss is nan' error.
    And on_finding never saw metric_failed findings."""
    seen = []
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = models.classification_data()
    with ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5", optimizer=opt,
                    on_finding=seen.append, warn=False) as mon:
        for step in range(3):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with pytest.warns(RuntimeWarning) if step == 0 else warnings.catch_warnings():
                mon.step(step, batch=(x, y))  # no loss=
    assert [(f.rule, f.metric) for f in mon.findings] == [("metric_failed", "loss")]
    assert seen == mon.findings


@pytest.mark.parametrize("resume", [False, True])
def test_steps_without_loss_do_not_hide_a_real_nan_loss_online_resumed_or_offline(tmp_path,
                                                                                   resume):
    """The failed rows were skipped online but replayed on resume and by check(): the
    replay opened a non-finite episode at step 0 (a false error offline) that swallowed
    the real NaN loss of step 6."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    path = tmp_path / "run.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = ls.Monitor(model, F.cross_entropy, path, metrics=["loss"], warn=False)
        for step in range(5):
            mon.step(step, batch=(x, y))  # no loss=: metric_failed, NaN rows
        if resume:
            mon.close()
            mon = ls.Monitor(model, F.cross_entropy, path, metrics=["loss"], mode="a",
                             warn=False)
        found = []
        for step in range(5, 9):
            loss = torch.tensor(math.nan if step == 6 else 1.0)
            found += mon.step(step, batch=(x, y), loss=loss)
        mon.close()
    assert [(f.rule, f.step) for f in found] == [("nonfinite", 6)]
    assert [(f.rule, f.step) for f in ls.check(path)] == [("nonfinite", 6)]
    assert ls.Run.open(path).steps("unmeasured").tolist() == [0, 1, 2, 3, 4]


def test_on_finding_sees_a_metric_failure_with_the_model_in_its_own_mode(tmp_path):
    """It ran inside the metrics' isolation (eval mode, a forked RNG)."""
    modes = []
    model = models.mlp()
    model.train()
    with ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5", metrics=["loss"],
                    on_finding=lambda f: modes.append(model.training), warn=False) as mon:
        with pytest.warns(RuntimeWarning):
            mon.step(0, batch=models.classification_data())
    assert modes == [True]


def test_a_bfloat16_value_watched_by_a_rule(tmp_path):
    """The rules' row conversion called .numpy() on it: every step raised."""

    class Half(Metric):
        name = "half"
        FIELDS = ("value",)

        def compute(self, ctx):
            return {"value": torch.tensor(1.5, dtype=torch.bfloat16)}

    @dataclass
    class Watch(Rule):
        metrics: tuple = ("half",)
        name: str = "watch"

        def evaluate(self, metric, row):
            return None if row["value"] == 1.5 else Trigger("info", "value", 0.0, 0.0, "", "")

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        mon, _ = _train(None, [Half()], steps=2, alarms=ls.alarms.with_rules([Watch()]))
    assert not mon.findings


def test_a_frozen_rule_given_a_list_of_metrics():
    @dataclass(frozen=True)
    class FrozenList(Rule):
        metrics: list = ("loss",)
        name: str = "frozen_list"

    assert OnlineAlarms([FrozenList(metrics=["loss"])]).rules[0].metrics == ("loss",)


def test_the_unmeasured_table_is_on_disk_with_the_step_and_sized_to_the_names(tmp_path):
    """A process killed right after its first failing step left the NaN row on disk and the
    unmeasured row in memory (check then read a NaN loss); the column was 1 KiB a row."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    path = tmp_path / "run.h5"
    script = textwrap.dedent(f"""
        import os, warnings, torch, torch.nn.functional as F, landscape as ls
        from tests import models
        warnings.simplefilter("ignore")
        model = models.mlp()
        x, y = models.classification_data()
        mon = ls.Monitor(model, F.cross_entropy, {str(path)!r}, metrics=["loss", "grad_norm"],
                         warn=False).start()
        for step in range(3):
            loss = F.cross_entropy(model(x), y)
            model.zero_grad()
            loss.backward()
            mon.step(step, batch=(x, y), loss=None if step == 2 else loss)
        os._exit(1)  # killed before the next automatic flush
    """)
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", script], cwd=root, check=False, timeout=300)
    run = ls.Run.open(path)
    assert run.steps("unmeasured").tolist() == [2]
    assert run.fields("unmeasured")["metrics"].dtype == "S16"  # "loss,grad_norm" fits
    assert ls.check(path) == []


def test_a_file_whose_own_metric_is_named_unmeasured_is_replayed_whole(tmp_path):
    """A file written before the name was reserved: check() raised KeyError."""
    from landscape.store import RunWriter

    with RunWriter(tmp_path / "old.h5", mode="w") as w:
        w.declare("unmeasured", {"fraction": ()}, cls="mylib.Unmeasured")
        w.declare("loss", {"value": ()}, cls="landscape.metrics.training.Loss")
        for step in range(5):
            w.append("unmeasured", step, {"fraction": 0.1})
            w.append("loss", step, {"value": math.nan if step == 3 else 1.0})
    assert [(f.rule, f.step) for f in ls.check(tmp_path / "old.h5")] == [("nonfinite", 3)]


def test_a_metric_name_with_a_comma_is_refused():
    class Commas(Metric):
        name = "loss,grad"
        FIELDS = ("value",)

    with pytest.raises(ValueError, match="without '/' or ','"):
        ls.Monitor(models.mlp(), F.cross_entropy, metrics=[Commas()])


class _FailsAt(Metric):
    """A metric of the user's with a bug that shows at one step."""

    name = "fails_at"
    FIELDS = ("value",)
    default_schedule = ls.every(1)
    default_data = "batch"

    def __init__(self, step: int, **kwargs):
        super().__init__(**kwargs)
        self.step = step

    def compute(self, ctx):
        if ctx.step == self.step:
            settings = {}
            return {"value": settings["lr"]}  # a KeyError says only 'lr'
        return {"value": 1.0}


def test_a_callback_that_stops_training_loses_none_of_the_steps_findings(tmp_path):
    """A callback that raises to stop training at a step's first finding lost the step's
    later ones: a NaN loss beside a failing metric left no error finding (interactive
    audit). Every finding is now recorded before any is said."""
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def stop(finding):
        raise RuntimeError(f"stop: {finding.rule}")

    mon = ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5", optimizer=opt,
                     metrics=[*ls.metrics.preset("cheap"), _FailsAt(5)], on_finding=stop)
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="stop: metric_failed"), mon:
            for step in range(8):
                x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(step, batch=(x, y), loss=loss if step != 5 else torch.tensor(math.nan))
    with ls.Run.open(tmp_path / "run.h5") as run:
        stored = {(f.step, f.rule) for f in run.findings()}
    assert {(5, "nonfinite"), (5, "metric_failed")} <= stored
    assert (5, "nonfinite") in {(f.step, f.rule) for f in mon.findings}


def test_a_failure_says_its_type_and_where_in_the_users_code(tmp_path):
    """A bare assert gave "failed at step 0 on the step's batch: " and a KeyError only its
    key, 'lr' (interactive audit): the type and the user's file and line are named."""
    model = models.mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5", metrics=[_FailsAt(0)],
                        warn=False) as mon:
            mon.step(0, batch=models.classification_data(), loss=1.0)
    message = next(f.message for f in mon.findings if f.rule == "metric_failed")
    line = _FailsAt.compute.__code__.co_firstlineno + 3
    assert message.endswith(f": KeyError: 'lr' (at test_user_extensions.py:{line})"), message


class _BackwardNorm(Metric):
    """The gradient norm of the probe's loss, by .backward() (the mistake) or autograd.grad."""

    name = "backward_norm"
    FIELDS = ("value",)
    default_schedule = ls.every(1)
    default_data = "batch"

    def __init__(self, by_backward: bool, **kwargs):
        super().__init__(**kwargs)
        self.by_backward = by_backward

    def compute(self, ctx):
        x, y = ctx.data(self.data)
        loss = F.cross_entropy(ctx.model(x), y)
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        if self.by_backward:
            loss.backward()
            grads = [p.grad for p in params]
        else:
            grads = torch.autograd.grad(loss, params)
        return {"value": float(torch.sqrt(sum((g * g).sum() for g in grads)))}


def _warnings_of_a_short_run(path, metric, grads_changed=None):
    """The warnings of three monitored SGD steps with ``metric``; with ``grads_changed``,
    each step also checks whether the monitor's call changed the training ``.grad``."""
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with ls.Monitor(model, F.cross_entropy, path, optimizer=opt,
                        metrics=["loss", metric], warn=False) as mon:
            for step in range(3):
                x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                before = [p.grad.clone() for p in model.parameters()]
                opt.step()
                mon.step(step, batch=(x, y), loss=loss)
                if grads_changed is not None:
                    changed = any(not torch.equal(b, p.grad)
                                  for b, p in zip(before, model.parameters()))
                    assert changed == grads_changed
    return [str(w.message) for w in seen]


@pytest.mark.parametrize("by_backward", [True, False])
def test_a_metric_that_writes_into_the_training_gradients_is_warned_about_once(
        tmp_path, by_backward):
    """A metric of the user's that calls .backward() accumulates into the training .grad in
    place, which the monitor restores by object, not by value (interactive audit)."""
    seen = _warnings_of_a_short_run(tmp_path / "run.h5", _BackwardNorm(by_backward),
                                    grads_changed=by_backward)
    said = [w for w in seen if "into the parameters' .grad" in w]
    assert len(said) == (1 if by_backward else 0)


class _Rescales(Metric):
    """Divides a tensor it is given by its norm, in place (a newcomer's bug)."""

    FIELDS = ("value",)
    needs_update = True

    def __init__(self, name, what):
        super().__init__()
        self.name, self.what = name, what

    def compute(self, ctx):
        t = ctx.parameters[0] if self.what == "parameters" else ctx.update[0]
        norm = t.norm()
        t /= norm
        return {"value": float(norm)}


@pytest.mark.parametrize("what", ["parameters", "update"])
def test_a_metric_that_changes_the_weights_or_the_update_in_place_is_warned_about_once(
        tmp_path, what):
    """ctx.parameters are the weights themselves and ctx.update what later metrics read: a
    metric that normalised one in place changed training, or zeroed update/norm, silently
    (newcomer review)."""
    seen = _warnings_of_a_short_run(tmp_path / "run.h5", _Rescales("rescales", what))
    said = [w for w in seen if "'rescales' wrote in place" in w]
    assert len(said) == 1
    assert ("model's parameters" if what == "parameters" else "ctx.update") in said[0]


class _RaisesAt(Metric):
    """Raises ``error`` at ``step`` (a metric's bug, or a Ctrl-C inside the loss)."""

    FIELDS = ("value",)

    def __init__(self, name, step, error):
        super().__init__()
        self.name, self.at, self.error = name, step, error

    def compute(self, ctx):
        if ctx.step == self.at and self.error is not None:
            raise self.error
        return {"value": float(ctx.step)}


def test_a_step_interrupted_inside_a_metric_leaves_no_row_but_its_finding(tmp_path):
    """A KeyboardInterrupt out of a metric (a second Ctrl-C, the loss function's) left
    the rows measured before it in the file, and a metric's first failure flushed the
    step's rows so far: half of step 2 stayed. Now none of its rows does; its finding, an
    event the monitor keeps, does, so the run goes on after step 2."""
    path = tmp_path / "run.h5"
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = models.classification_data()
    metrics = ["loss", _RaisesAt("broken", 2, ValueError("a bug")),
               _RaisesAt("stopper", 2, KeyboardInterrupt())]
    with pytest.raises(KeyboardInterrupt), pytest.warns(RuntimeWarning, match="a bug"), \
            ls.Monitor(model, F.cross_entropy, path, optimizer=opt, metrics=metrics,
                       warn=False) as mon:
        models.full_batch_steps(mon, model, opt, x, y, 4)
    with ls.store.Run.open(path) as run:
        assert {name: run.steps(name).tolist() for name in ("loss", "broken", "stopper")} \
            == {name: [0, 1] for name in ("loss", "broken", "stopper")}
        assert "unmeasured" not in run.metrics() or run.rows("unmeasured") == 0
        assert [(f.step, f.rule) for f in run.findings()] == [(2, "metric_failed")]
    metrics = ["loss", _RaisesAt("broken", 2, None), _RaisesAt("stopper", 2, None)]
    with ls.Monitor(model, F.cross_entropy, path, optimizer=opt, metrics=metrics,
                    warn=False) as mon:
        models.full_batch_steps(mon, model, opt, x, y, 2, start=3)
    with ls.store.Run.open(path) as run:
        assert run.steps("stopper").tolist() == run.steps("loss").tolist() == [0, 1, 3, 4]
        assert run.series("broken", "value")[1].tolist() == [0.0, 1.0, 3.0, 4.0]


class _Failing(ls.metrics.Metric):
    """A metric that always fails, under a name of the test's choosing."""

    default_data = "batch"
    FIELDS = ("value",)

    def __init__(self, name, **kwargs):
        super().__init__(**kwargs)
        self.name = name

    def compute(self, ctx):
        raise RuntimeError("boom")


def test_a_resumed_run_with_longer_failing_names_keeps_every_unmeasured_name(tmp_path):
    """The column's width was fixed by the first session (S16): a resume adding a failing
    metric of a long name cut the list ('a_rather_long...'), the step's unmeasured loss
    read as a NaN loss, and check failed the run with an error (store review)."""
    import torch.nn as nn

    path = tmp_path / "run.h5"
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sessions = ((["loss", _Failing("f")], range(0, 5), "w"),
                ([_Failing("a_rather_long_custom_metric_name"), "loss", _Failing("f")],
                 range(5, 10), "a"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for metrics, steps, mode in sessions:
            with ls.Monitor(model, nn.MSELoss(), path, optimizer=opt, metrics=metrics,
                            mode=mode, probe_size=None, warn=False) as mon:
                for s in steps:
                    x, y = torch.randn(8, 4), torch.randn(8, 2)
                    loss = F.mse_loss(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    mon.step(s, batch=(x, y), **({} if s == 7 else {"loss": loss}))
    run = ls.Run.open(path)
    names = dict(zip(*(a.tolist() for a in run.series("unmeasured", "metrics"))))
    assert names[7] == "a_rather_long_custom_metric_name,loss,f" and names[0] == "f"
    assert [f for f in ls.check(path) if f.severity == "error"] == []


@pytest.mark.parametrize("name", ["loss", "grad_norm", "nonfinite", "update", "logits",
                                  "sentinels", "taylor_radius", "spectral_alignment",
                                  "representation", "collapse", "top_eigenvalues"])
def test_a_metric_computed_on_a_context_for_the_model_equals_the_monitors_row(name):
    """``StepContext.for_model(model, metrics=[m], ...)``: what a metric's unit test builds.
    Its row equals the monitor's at the same step (same weights, batch, probe and update);
    the layer metrics need their setup and captures, which a first version left out (they
    raised, or gave an empty or NaN row)."""
    from landscape.metrics import StepContext, create

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3))
    model[0].bias.requires_grad_(False)  # a frozen parameter is no name of the context
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    mon = ls.Monitor(model, F.cross_entropy, None, optimizer=opt, probe=(x, y),
                     metrics=[create(name, schedule="every(1)")], warn=False,
                     strict=True).start()
    before = tuple(p.detach().clone() for p in model.parameters() if p.requires_grad)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    mon.step(0, batch=(x, y), loss=loss)
    step, recorded = mon.run().last_row(name)
    mon.close()
    metric = create(name)
    after = tuple(p.detach() for p in model.parameters() if p.requires_grad)
    ctx = StepContext.for_model(model, metrics=[metric], loss_fn=F.cross_entropy,
                                optimizer=opt, probe=(x, y), batch=(x, y), loss=loss,
                                params_before=before,
                                update=tuple(a - b for a, b in zip(after, before)),
                                optimizer_stepped=True)
    assert "0.bias" not in ctx.names and len(ctx.names) == 5
    row = metric.compute(ctx)
    assert step == 0 and row and set(row) <= set(recorded)
    for key, value in row.items():
        if key == "peak_memory":  # a measurement of this process's memory, not a value
            continue
        got, want = np.asarray(value, dtype=float), np.asarray(recorded[key], dtype=float)
        assert got.shape == want.shape, key
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7, equal_nan=True,
                                   err_msg=f"{name}/{key}")


def _documented_rule(heading_text: str) -> dict:
    """Run the first Python block after ``heading_text`` in docs/alarms.md; its names."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "alarms.md").read_text()
    block = text[text.index(heading_text):].split("```python\n", 1)[1].split("```", 1)[0]
    names = {"dataclass": dataclass, **{n: getattr(ls.alarms, n) for n in (
        "Rule", "Trigger", "SKIP", "row_value")}}
    exec(compile(block, "docs/alarms.md", "exec"), names)
    return names


def test_the_documented_hysteresis_rule_holds_its_episode_between_its_two_levels(tmp_path):
    rule = _documented_rule("Hysteresis (fire below one level")["LowGradNorm"]()
    # below 1e-4 for 3 rows (the episode opens at the 3rd), then between the two levels
    # and below again (held: no new finding), back above 1e-3 for 3 rows (closed), below
    # again for 3 rows (a second finding)
    norms = [1.0] * 5 + ([5e-5] * 3 + [2e-4] * 3) * 3 + [1.0] * 3 + [5e-5] * 3
    w = make_writer({"grad_norm": (np.arange(len(norms)), {"value": np.array(norms)})})
    found = [f for f in ls.check(w, ls.alarms.with_rules([rule])) if f.rule == rule.name]
    assert [f.step for f in found] == [7, len(norms) - 1]
    assert found[0].metric == "grad_norm/value" and found[0].value == 5e-5
    # without the release level each return below the threshold is an episode of its own
    rule.release = rule.threshold
    assert [f.step for f in ls.check(w, [rule])] == [7, 13, 19, len(norms) - 1]


class _GradientNoise(Metric):
    """The spread of the gradients of four pieces of the batch around their mean."""

    name = "gradient_noise"
    FIELDS = ("spread", "mean_norm")
    default_data = "batch"

    def compute(self, ctx):
        pieces = ls.batches.split(ctx.data(self.data), 4)
        grads = [torch.cat([g.reshape(-1) for g in ctx.hessian_on(p).gradient()])
                 for p in pieces]
        mean = torch.stack(grads).mean(0)
        spread = torch.stack([(g - mean).square().sum() for g in grads]).mean()
        return {"spread": spread.item(), "mean_norm": mean.norm().item()}


def test_a_metric_takes_the_gradient_of_pieces_of_the_batch_through_hessian_on(tmp_path):
    """``ctx.hessian_on(data)``: the step's loss on data a metric chooses (docs/monitor.md);
    the gradients equal autograd's on each piece, inside the monitor and on a context
    built for the model, and training is not perturbed."""
    from landscape.metrics import StepContext

    x, y = models.classification_data(n=16)

    def truth(model):
        params = [p for p in model.parameters()]
        grads = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            F.cross_entropy(model(x[i:i + 4]), y[i:i + 4]), params)]) for i in range(0, 16, 4)]
        mean = torch.stack(grads).mean(0)
        return (torch.stack([(g - mean).square().sum() for g in grads]).mean().item(),
                mean.norm().item())

    model = models.mlp()
    ctx = StepContext.for_model(model, loss_fn=F.cross_entropy, batch=(x, y))
    row = _GradientNoise().compute(ctx)
    np.testing.assert_allclose([row["spread"], row["mean_norm"]], truth(model), rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())

    _, params = _train(tmp_path / "run.h5", ["loss", _GradientNoise()], steps=3)
    _, plain = _train(tmp_path / "plain.h5", ["loss"], steps=3)
    assert all(torch.equal(a, b) for a, b in zip(params, plain))
    with ls.Run.open(tmp_path / "run.h5") as run:
        step, recorded = run.last_row("gradient_noise")
    trained = models.mlp()
    with torch.no_grad():
        for p, value in zip(trained.parameters(), params):
            p.copy_(value)
    assert step == 2
    np.testing.assert_allclose([recorded["spread"], recorded["mean_norm"]], truth(trained),
                               rtol=1e-5)


class SetupFails(Metric):
    name = "setup_fails"
    FIELDS = ("value",)

    def setup(self, model):
        raise AttributeError("no layer 'head'")

    def compute(self, ctx):
        return {"value": 1.0}


def test_an_error_in_a_metrics_setup_names_the_metric(tmp_path):
    """``AttributeError: no layer 'head'`` came out of the monitor's start with nothing
    naming the metric whose setup() raised (newcomer review)."""
    import sys

    with pytest.raises(AttributeError, match="no layer 'head'") as raised:
        _train(tmp_path / "run.h5", ["loss", SetupFails()])
    if sys.version_info >= (3, 11):
        assert raised.value.__notes__ == [
            "in SetupFails.setup(), the monitor's metric 'setup_fails'"]
