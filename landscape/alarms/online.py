"""The drivers: :class:`OnlineAlarms` (row by row, as a run is written) and :func:`check`.

Also the registry of built-in rules (:data:`RULES`) and :func:`default_rules`. A rule is
evaluated on each metric *stream* separately and incrementally, so the online and offline
drivers give the same findings (``docs/alarms.md``, "How rules read a run").
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from landscape._deprecation import renamed_kwargs
from landscape._errors import RuleError, StepOrderError
from landscape.alarms.base import EpisodeTracker, Rule, Value, _finding_order
from landscape.alarms.curvature_rules import EdgeOfStability, TaylorRatio
from landscape.alarms.forecast_rules import SharpnessForecast, TaylorForecast
from landscape.alarms.representation_rules import (
    AttentionLogitGrowth,
    LogitGrowth,
    RankCollapse,
    SignCollapse,
)
from landscape.alarms.training_rules import (
    GradNormSpike,
    LossExplosion,
    LossRegression,
    LossSpike,
    NonFiniteValues,
)
from landscape.findings import (
    NEVER_MEASURED,
    RULE_FAILED,
    Finding,
    Findings,
    dedupe,
    severity_rank,
)
from landscape.store.format import as_numpy

if TYPE_CHECKING:
    from landscape.store import Run

__all__ = ["RULES", "OnlineAlarms", "check", "collect_findings", "default_rules", "rule_names",
           "with_rules"]


RULES: dict[str, type[Rule]] = {
    cls.name: cls  # type: ignore[misc]
    for cls in (
        EdgeOfStability,
        TaylorRatio,
        SignCollapse,
        LossSpike,
        LossRegression,
        LossExplosion,
        GradNormSpike,
        LogitGrowth,
        AttentionLogitGrowth,
        RankCollapse,
        NonFiniteValues,
        TaylorForecast,
        SharpnessForecast,
    )
}
"""Rule classes of :func:`default_rules` by rule name."""


def default_rules(**overrides: Mapping[str, Any] | bool | None) -> list[Rule]:
    """The built-in rules with their documented defaults.

    Keyword arguments, by rule name, change or disable a rule::

        default_rules(loss_spike={"z": 8, "window": 100}, sign_collapse=None)

    Args:
        **overrides: per rule name, a mapping of constructor arguments, ``None`` or
            ``False`` to remove the rule, or ``True`` to keep its defaults.

    Returns:
        The rules, in the order of :data:`RULES`.

    Raises:
        ValueError: an unknown rule name, a setting the rule does not take, or an
            override that is neither a mapping nor True/False/None.
    """
    unknown = sorted(set(overrides) - set(RULES))
    if unknown:
        raise ValueError(f"unknown rule(s) {', '.join(unknown)} (rules: {', '.join(RULES)})")
    rules: list[Rule] = []
    for name, cls in RULES.items():
        opt = overrides.get(name, True)
        if opt is None or opt is False:
            continue
        if opt is True:
            rules.append(cls())
        elif isinstance(opt, Mapping):
            try:
                rules.append(cls(**opt))
            except TypeError as err:
                raise ValueError(f"{name}: bad settings ({err})") from None
        else:
            raise ValueError(f"{name} must be a mapping of settings, True, False or None")
    return rules


def with_rules(extra: Iterable[Rule]) -> list[Rule]:
    """The built-in rules (:func:`default_rules`) and ``extra``.

    A rule of ``extra`` named like a built-in one replaces it (a ``LossSpike(z=10)`` keeps
    the name ``loss_spike``), in the built-in one's place; the others follow, in order.

    Args:
        extra: the rules to add.

    Returns:
        The rules, for :class:`OnlineAlarms`, :func:`check` or ``Monitor(alarms=...)``.
    """
    extra = list(extra)
    by_name = {r.name: r for r in extra}
    built_in = [by_name.pop(r.name, r) for r in default_rules()]
    return built_in + [r for r in extra if r.name in by_name]


def _as_row(values: Mapping[str, Any]) -> dict[str, Value]:
    """Every numeric field of ``values`` as float64 (scalars as float, arrays as ndarray)."""
    if type(values) is not dict and not isinstance(values, Mapping):  # a dict: no ABC check
        raise ValueError(f"values must be a mapping of field name to value, got {values!r}")
    out: dict[str, Value] = {}
    for key, v in values.items():
        if key == "step":
            continue
        if type(v) is float:  # the common case: a metric's scalar, as is
            out[key] = v
            continue
        try:
            arr = np.asarray(as_numpy(v), dtype=np.float64)
        except (TypeError, ValueError):
            continue  # strings and other non-numeric fields
        out[key] = float(arr) if arr.ndim == 0 else arr
    return out


def _users_code(rule: Rule) -> bool:
    """Whether the rule's ``evaluate`` or ``evaluator`` is defined outside landscape."""
    return any(not (getattr(getattr(type(rule), method), "__module__", None) or "").startswith(
        "landscape.") for method in ("evaluate", "evaluator"))


class _ReadRow(dict):
    """A row as a rule of the user's reads it: the field names asked for that it lacks.

    Fields the metric recorded but the rules do not read (strings) are no typo.
    """

    def __init__(self, row: Mapping[str, Value], recorded: frozenset[str]) -> None:
        super().__init__(row)
        self.recorded = recorded
        self.missing: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self and key not in self.recorded:
            self.missing.add(key)
        return super().get(key, default)


def _as_run(run: Any) -> Any:
    """``run`` as a readable ``Run``: itself, a path, a ``RunWriter``'s or ``Monitor``'s view."""
    from landscape.store import Run

    if isinstance(run, Run):
        return run
    if isinstance(run, (str, os.PathLike)):
        return Run.open(run)
    if callable(getattr(run, "run", None)):  # a RunWriter, a Monitor
        return run.run()
    raise ValueError("run must be a Run, a path to a run file, a RunWriter or a Monitor, got "
                     f"{run!r}")


def unmeasured_rows(reader: Any) -> set[tuple[str, int]]:
    """The ``(metric, step)`` rows a monitor wrote as NaN because the metric was not measured.

    Read from the monitor's ``unmeasured`` table (a file written before that name was
    reserved may hold a metric of that name without its ``metrics`` field: nothing is
    skipped then). Such a row is no value: a rule never sees it, and a blow-up is never
    read from it.

    Args:
        reader: a ``Run`` (or ``RunWriter``).

    Returns:
        The rows.
    """
    rows: set[tuple[str, int]] = set()
    if "unmeasured" in reader.metrics() and "metrics" in reader.fields("unmeasured"):
        for s, joined in zip(*reader.series("unmeasured", "metrics")):
            rows.update((n, int(s)) for n in str(joined).split(",") if n)
    return rows


LAST_ROWS_FAILED = (3, 0.1)
"""A metric failed on its last ``n >= 3`` rows, ``n >= 10 %`` of them: no longer measured."""


def never_measured(rows: Mapping[str, Sequence[int]], unmeasured: Collection[tuple[str, int]],
                   stored: Iterable[Finding], *, cite: bool = True) -> list[Finding]:
    """The ``never_measured`` warnings of metrics that failed on every row they have.

    Also of a metric that stopped being measured: it failed on its last rows, at least
    :data:`LAST_ROWS_FAILED` (3 rows and 10 % of its rows; a metric measured at step 0
    that fails on every later step: its rules went blind for the rest of the run).

    A metric that fails records a NaN row and one ``metric_failed`` *info* finding: one bad
    step (out of memory once, a probe not yet taken) is no reason to stop a job. A metric
    that failed on all of its rows (a custom metric's bug, no ``loss=`` in any call, a
    probe without labels) left every rule that reads it blind, and a gate that passed the
    run would vouch for checks that never ran: that is a warning. It is derived from the
    rows, so it is only known once the rows are (``landscape check``), not while the
    monitor runs. A metric whose first row came after the run's weights or loss turned
    non-finite is left out: the ``nonfinite`` error already says why nothing was measured
    (an info ``nonfinite`` finding, a GradScaler's skipped fp16 step, is no divergence).

    Args:
        rows: each metric's recorded steps.
        unmeasured: the ``(metric, step)`` rows written as not measured (the monitor's
            ``/metrics/unmeasured`` table).
        stored: the run's stored findings, whose first ``metric_failed`` of each metric
            says why it failed.
        cite: name the ``metric_failed`` finding that says why (False: quote its message,
            for a listing that leaves those findings out).

    Returns:
        One finding per such metric, at its first row's step.
    """
    stored = list(stored)
    diverged = min((int(f.step) for f in stored
                    if f.rule == "nonfinite" and f.severity == "error"), default=None)
    out = []
    least, share = LAST_ROWS_FAILED
    for metric in sorted({name for name, _ in unmeasured}):
        steps = [int(s) for s in rows.get(metric, ())]
        tail = 0
        while tail < len(steps) and (metric, steps[-1 - tail]) in unmeasured:
            tail += 1
        whole = tail == len(steps)
        if not steps or (not whole and (tail < least or tail < share * len(steps))):
            continue
        first = steps[-tail]
        if diverged is not None and diverged <= first:
            continue
        failed = [f for f in stored if f.rule == "metric_failed" and f.metric == metric]
        # the first failure says why of a metric never measured, the last of one that stopped
        why = (min if whole else max)(failed, key=lambda f: int(f.step)) if failed else None
        said = "" if why is None else (f" (the metric_failed finding at step {why.step} says "
                                       "why)" if cite else f": {why.message}")
        if whole:
            count = f"its {len(steps)} rows (steps {first} to {steps[-1]})" \
                if len(steps) > 1 else f"its one row (step {first})"
            message = (f"metric {metric!r} was not measured on any of {count}: every rule "
                       f"that reads it saw nothing{said}")
        else:
            message = (f"metric {metric!r} was not measured on its last {tail} of "
                       f"{len(steps)} rows (steps {first} to {steps[-1]}): every rule that "
                       f"reads it saw nothing from step {first} on{said}")
        hint = ("fix what made it fail; a run meant to go without this metric passes "
                "with --ignore-rule never_measured")
        out.append(Finding(step=first, rule=NEVER_MEASURED, severity="warning",
                           metric=metric, value=float(tail), threshold=math.nan,
                           message=message, hint=hint))
    return out


class OnlineAlarms:
    """Incremental evaluation of alarm rules on rows as they are appended.

    ``observe(name, step, values)`` takes one row of metric ``name`` (the same mapping of
    field to value that ``RunWriter.append`` takes) and returns the findings it raises,
    usually none. Per metric, steps must strictly increase; metrics interleave freely.
    Each call costs O(window) per rule watching that metric, independent of the run
    length. ``findings`` keeps everything emitted so far.

    Call :meth:`declare` with a metric's ``config()`` before its first row when a rule uses
    them (``spectral_alignment``'s layer names), and :meth:`replay` to catch up with the
    rows of a resumed run.

    Args:
        rules: the rules to evaluate (default: :func:`default_rules`); a single rule works.
        strict: a rule that raises (in ``evaluator`` or on a row) raises
            :class:`~landscape.RuleError` naming the rule, the metric and the step (default;
            offline :func:`check`). With ``False`` (the monitor's default) it warns once and
            is switched off for that metric: a diagnostic never stops training.
        say: warn about a rule that raised or read a field its metric lacks (the monitor
            passes ``False`` on the ranks other than the first: one warning per job).

    Raises:
        ValueError: an item of ``rules`` is not a :class:`Rule`, two rules share a name, or
            a rule's ``name``, ``metrics``, ``sustain`` or ``rearm`` is invalid.
    """

    def __init__(self, rules: Iterable[Rule] | Rule | None = None, *,
                 strict: bool = True, say: bool = True) -> None:
        if isinstance(rules, Rule):
            rules = [rules]
        if rules is not None and (isinstance(rules, (str, bytes))
                                  or not hasattr(rules, "__iter__")):
            raise ValueError(f"rules must be a list of Rule objects, got {rules!r}")
        self.rules: list[Rule] = default_rules() if rules is None else list(rules)
        self.strict = strict
        self.say = say
        names: set[str] = set()
        for rule in self.rules:
            if not isinstance(rule, Rule):
                raise ValueError(f"rules must contain Rule objects, got {rule!r}"
                                 + (" (a class: instantiate it)" if isinstance(rule, type)
                                    else ""))
            try:  # user rules do not call it themselves (only the built-ins' __post_init__)
                rule._validate_common()
            except ValueError as err:
                raise ValueError(f"rule {type(rule).__name__}: {err}") from None
            if rule.name in names:
                raise ValueError(f"rules: two rules are named {rule.name!r}")
            names.add(rule.name)
        self._watchers: dict[str, list[Rule]] = {}
        for rule in self.rules:
            for metric in rule.metrics:
                self._watchers.setdefault(metric, []).append(rule)
        self._configs: dict[str, dict] = {}
        self._streams: dict[str, list[EpisodeTracker]] = {}
        self._last: dict[str, int] = {}
        self.findings: list[Finding] = []
        #: ``rule_failed`` findings of rules that raised (``strict=False``), for the caller
        #: to record and clear
        self.failures: list[Finding] = []
        # the rules whose evaluation is the user's code (not a built-in's, nor a built-in's
        # subclass with other settings): the fields they read that a row lacks
        self._users = {r.name for r in self.rules if _users_code(r)}
        self._told_missing: set[tuple[str, str]] = set()
        self._fields: dict[str, frozenset[str]] = {}  # every metric's fields, as seen

    @property
    def metrics(self) -> list[str]:
        """Metric names some rule watches."""
        return sorted(self._watchers)

    @renamed_kwargs(params="config")
    def declare(self, name: str, config: Mapping[str, Any] | None = None) -> None:
        """Record metric ``name``'s ``config()`` (used when its first row arrives).

        Args:
            name: the metric name.
            config: the metric's stored ``config()`` (``None``: none; it was called
                ``params``, still accepted with a ``DeprecationWarning``).

        Raises:
            ValueError: the metric already has rows and ``config`` differs from the one it
                started with.
        """
        if name in self._streams and dict(config or {}) != self._configs.get(name, {}):
            raise ValueError(f"metric {name!r} already has rows; declare it before observing")
        self._configs[name] = dict(config or {})

    def observe(self, name: str, step: int, values: Mapping[str, Any]) -> list[Finding]:
        """Evaluate one row of metric ``name`` at ``step``.

        Args:
            name: the metric name; rows of metrics no rule watches are ignored.
            step: the row's step; it must come after the metric's previous step.
            values: field name -> value (floats, arrays, tensors; strings are skipped).

        Returns:
            The findings the row raises, sorted.

        Raises:
            StepOrderError: ``step`` does not come after the metric's last step.
            RuleError: a rule raised, with ``strict``.
            ValueError: ``values`` is not a mapping.
        """
        watchers = self._watchers.get(name)
        if not watchers:
            return []
        step = int(step)
        last = self._last.get(name)
        if last is not None and step <= last:
            raise StepOrderError(
                f"alarms: metric {name!r} step {step} does not come after its last step {last}"
            )
        self._last[name] = step
        streams = self._streams.get(name)
        out = []
        if streams is None:
            config = self._configs.get(name, {})
            streams = []
            for rule in watchers:
                try:  # a rule's evaluator(metric, config) is the user's code too
                    streams.append(EpisodeTracker(rule, name, config))
                except Exception as err:
                    self._failed(rule, name, step, err)
            self._streams[name] = streams
        row = _as_row(values)
        fields = self._fields.get(name, frozenset())
        if self._users and not fields.issuperset(values):  # only a user's rule is told
            fields = self._fields[name] = fields.union(values)
        for s in streams:
            if s.failed:
                continue
            read = _ReadRow(row, fields) if s.rule.name in self._users else row
            try:
                found = s.observe(step, read)
            except Exception as err:
                s.failed = True
                self._failed(s.rule, name, step, err)
                continue
            if read is not row and read.missing:
                self._say_missing(s.rule, name, read.missing)
            if found is not None:
                out.append(found)
        out.sort(key=_finding_order)
        self.findings.extend(out)
        return out

    def _say_missing(self, rule: Rule, name: str, missing: set[str]) -> None:
        """Warn once per (rule, field) a rule of the user's read that no metric it watches has.

        ``row_value`` reads such a field as None, as a NaN: a typo in a field's name would
        otherwise keep the rule quiet on every row, online and offline. A field of another
        metric the rule watches (a fallback between two) is no typo.
        """
        known = set().union(*(self._fields.get(m, ()) for m in rule.metrics))
        for field in sorted(missing - known) if self.say else ():
            if (rule.name, field) in self._told_missing:
                continue
            self._told_missing.add((rule.name, field))
            held = ", ".join(sorted(self._fields.get(name, ())))
            warnings.warn(
                f"landscape: alarm rule {rule.name!r} read field {field!r}, which the rows of "
                f"metric {name!r} do not have (its fields: {held}): it reads as None, as a "
                "NaN does, so the rule skips the row; a typo?", RuntimeWarning, stacklevel=3)

    def _failed(self, rule: Rule, name: str, step: int, err: Exception) -> None:
        """``rule`` raised on metric ``name``: :class:`RuleError` when strict.

        Else a warning, and a ``rule_failed`` finding of severity warning in
        :attr:`failures`, which the monitor stores as it stores a failed metric's (not a
        finding of the step: it neither stops training nor opens the adaptive window), so
        that a gate on the run does not pass because a rule of the user's died silently;
        the caller switches the rule off for that metric.
        """
        what = (f"alarm rule {rule.name!r} raised {type(err).__name__} on metric {name!r} at "
                f"step {step}: {err}")
        if self.strict:
            raise RuleError(what) from err
        if self.say:
            warnings.warn(f"landscape: {what}; it is switched off for that metric",
                          RuntimeWarning, stacklevel=3)
        self.failures.append(Finding(
            step=step, rule=RULE_FAILED, severity="warning", metric=name, value=math.nan,
            threshold=math.nan, message=f"{what}; it was switched off for that metric, so "
            "its findings from this step on are missing",
            hint="fix the rule; landscape.alarms.check(run, rules=[...]) re-runs it on the "
                 "run's rows and raises with the traceback",
            extra={"failed_rule": rule.name}))

    def replay(self, run: Any) -> list[Finding]:
        """Feed every committed row of a run.

        Use it to resume online evaluation on a run that already has rows, or (on a fresh
        object) to re-evaluate a finished run, which is what :func:`check` does.

        Args:
            run: a ``Run``, a path to a run file, a ``RunWriter`` or a ``Monitor``.

        Returns:
            The findings those rows raise, sorted by step.

        Raises:
            ValueError: ``run`` is none of the accepted kinds.
        """
        reader = _as_run(run)
        out: list[Finding] = []
        skip = unmeasured_rows(reader)  # the NaN rows of a failed metric: not observed
        for name in reader.metrics():
            if name not in self._watchers:
                continue
            if name not in self._streams:
                config = reader.metric_attrs(name).get("params") or {}  # the file's name
                self._configs[name] = dict(config) if isinstance(config, Mapping) else {}
            columns = {}
            steps = reader.steps(name)
            strings = []
            for fname, spec in reader.fields(name).items():
                if spec.is_string:  # not read by the rules, but a field of the row
                    strings.append(fname)
                    continue
                _, col = reader.series(name, fname)
                # a scalar column as Python floats: observe() takes them as they are
                columns[fname] = col.tolist() if getattr(col, "ndim", 0) == 1 \
                    and col.dtype.kind == "f" else col
            if self._users:
                self._fields[name] = self._fields.get(name, frozenset()).union(strings)
            for i, step in enumerate(steps):
                if (name, int(step)) in skip:
                    continue
                out.extend(self.observe(name, int(step), {k: c[i] for k, c in columns.items()}))
        out.sort(key=_finding_order)
        return out


def check(run: Any, rules: Sequence[Rule] | None = None) -> list[Finding]:
    """Re-evaluate alarm rules over a whole run, offline.

    Metrics a rule watches that are absent are skipped (a warning names a rule of
    ``rules`` other than a built-in one that finds none of its metrics in the run: a typo
    would otherwise pass without a word). The findings are exactly what
    :class:`OnlineAlarms` emits when fed the same rows as they are appended. The findings
    already stored in the run are not read: this recomputes them.

    Args:
        run: a :class:`~landscape.store.Run`, a path to a run file, or a ``RunWriter``
            or ``Monitor`` (its ``run()`` view).
        rules: the rules (default: :func:`default_rules`).

    Returns:
        The findings, sorted by step.

    Raises:
        ValueError: ``run`` is none of the accepted kinds, or ``rules`` is invalid.
    """
    alarms = OnlineAlarms(rules)
    reader = _as_run(run)
    if rules is not None:  # a typo in a rule of the user's: it would pass without a word
        held = set(reader.metrics())
        for rule in alarms.rules:
            if rule.name not in RULES and not held.intersection(rule.metrics):
                warnings.warn(
                    f"alarm rule {rule.name!r} watches {', '.join(rule.metrics)}, which this "
                    f"run does not hold ({', '.join(sorted(held)) or 'no metric'}): it was "
                    "not evaluated", UserWarning, stacklevel=2)
    return dedupe(alarms.replay(reader))  # one finding per (step, rule)


def collect_findings(
    run: Run | str | os.PathLike, *, recompute: bool = True, rules: Sequence[Any] | None = None,
    ignore: Collection[str] = (),
) -> Findings:
    """Return the run's findings, stored and (with ``recompute``) recomputed.

    Those stored in ``/findings`` plus, with ``recompute``, those that
    ``landscape.alarms.check(run, rules)`` finds on the whole run: what ``landscape check``
    lists. The stored ones include what only the monitor could see (a metric that failed,
    a rule of the training script's own). With or without ``recompute`` it adds one
    ``never_measured`` warning per metric that failed on every row it has
    (:func:`never_measured`): its rules saw nothing, and a gate must not
    pass the run for the warnings they could not raise.

    ``run``: a :class:`~landscape.store.Run`, a path to a run file, a ``RunWriter`` or a
    ``Monitor`` (what it wrote so far).

    A finding is identified by its step, rule and metric (the table, without the field): a
    recomputed finding that the file already holds is dropped (the stored one, written
    online, is kept). A rule of ``rules`` that differs from the built-in rule of its name
    (a rule of your own, or a built-in one with other settings, as ``with_rules`` and
    ``--rules`` pass them) and watches a metric the run holds replaces the stored findings
    of that name: ``EdgeOfStability(threshold=1.0)`` warns where the monitor stored the
    default rule's info finding. The metric is part of the key because one rule may fire on several
    sources at one step (the non-finite rule on the ``nonfinite`` flags and on the loss
    itself); the field is not, since a rule raises at most one finding per metric and
    step, and a file written before a rule changed the field it names (``taylor_forecast``
    naming ``update_ratio`` for its update-growth findings) would count one finding twice.
    The result (a :class:`~landscape.findings.Findings`, a list that prints one line per
    finding) is ordered by step, then by decreasing severity, then by rule.

    ``ignore`` names rules left out: not evaluated, and their stored findings not listed
    (``landscape check --ignore-rule``); each must be a rule :func:`rule_names` knows.

    Raises:
        ValueError: ``rules`` with ``recompute=False``, which evaluates no rule; a name of
            ``ignore`` that names no rule.
    """
    if rules is not None and not recompute:
        raise ValueError("rules: only evaluated with recompute=True (recompute=False lists "
                         "the stored findings)")
    run = _as_run(run)
    stored = list(run.findings())
    found = list(stored)
    ignore = set(ignore)
    if ignore:
        if isinstance(rules, Rule):
            rules = [rules]
        known = _rule_names(found, rules)
        unknown = sorted(ignore - known)
        if unknown:
            raise ValueError(f"ignore: no rule named {', '.join(unknown)} (rules: "
                             f"{', '.join(sorted(known))})")
        found = [f for f in found if f.rule not in ignore and _failed_rule(f) not in ignore]
        if recompute:
            listed = default_rules() if rules is None else list(rules)
            rules = [r for r in listed if getattr(r, "name", None) not in ignore]
    if recompute:
        replaced = _replacing_rules(run, rules)
        # a rule given again (fixed) replaces its findings and the record of its failure
        found = [f for f in found if f.rule not in replaced and _failed_rule(f) not in replaced]
        found.extend(check(run, rules=rules))
    if NEVER_MEASURED not in ignore:  # read from the rows, with or without recompute
        skipped = unmeasured_rows(run)
        rows = {name: run.steps(name) for name in {m for m, _ in skipped}
                if name in run.metrics()}
        # a divergence the rules found again offline says why too (a run without alarms)
        said = stored + [f for f in found if f.rule == "nonfinite"]
        found.extend(never_measured(rows, skipped, said, cite="metric_failed" not in ignore))
    unique: dict[tuple[int, str, str, str | None], Finding] = {}
    for f in found:
        unique.setdefault((int(f.step), f.rule, f.metric.split("/")[0], _failed_rule(f)), f)
    return Findings(sorted(unique.values(),
                           key=lambda f: (f.step, -severity_rank(f.severity), f.rule)))


def rule_names(run: Run, rules: Sequence[Any] | None = None) -> set[str]:
    """The names of the rules whose findings the run may hold or ``rules`` may raise.

    The built-in rules, ``metric_failed`` (a metric that raised), ``rule_failed`` (a rule
    that raised in the monitor), ``never_measured`` (a metric that failed on all its rows),
    the rules of ``rules``
    and those of the findings stored in the run (a training script's own rules).
    """
    return _rule_names(run.findings(), rules)


def _rule_names(stored: Iterable[Finding], rules: Sequence[Any] | None) -> set[str]:
    """:func:`rule_names` from the run's stored findings, already read."""
    stored = list(stored)
    names = set(RULES) | {"metric_failed", RULE_FAILED, NEVER_MEASURED}
    names |= {f.rule for f in stored}
    names |= {r for f in stored if (r := _failed_rule(f)) is not None}  # a rule that died
    listed = [rules] if isinstance(rules, Rule) else rules or ()
    return names | {r.name for r in listed if isinstance(r, Rule)}


def _failed_rule(finding: Finding) -> str | None:
    """The name of the rule a ``rule_failed`` finding records; None for another finding."""
    if finding.rule != RULE_FAILED:
        return None
    name = finding.extra.get("failed_rule")
    return name if isinstance(name, str) else None


def _replacing_rules(run: Run, rules: Sequence[Any] | None) -> set[str]:
    """The names of the rules of ``rules`` whose recomputed findings replace the stored ones.

    Those that differ from the built-in rule of their name (or have none) and watch a metric
    the run holds; a built-in rule as it is keeps the stored findings (a monitor's own
    settings of it, recorded online, are not overridden by the defaults).
    """
    if rules is None:
        return set()
    if isinstance(rules, Rule):
        rules = [rules]
    built_in = {r.name: r.config() for r in default_rules()}
    held = set(run.metrics())
    return {r.name for r in rules if isinstance(r, Rule)
            and built_in.get(r.name) != r.config() and held.intersection(r.metrics)}
