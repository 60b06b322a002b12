"""Instability alarms: rules that turn recorded metric series into :class:`Finding` s.

Each rule watches one or more metrics of the naming contract the monitor writes
(``/metrics/<name>`` with its fields, see ``docs/alarms.md``) and reads one *row* at a time:
the values of every field of that metric at one step. A rule is evaluated on each metric
*stream* separately and incrementally, so the same code serves both uses:

* online, :class:`OnlineAlarms` ``.observe(name, step, values)`` is called by the monitor
  for each appended row and returns the findings that row raises (cost O(window));
* offline, :func:`check` replays every committed row of a finished (or live) run through a
  fresh :class:`OnlineAlarms`.

Because the state of a stream depends only on the rows of its own metric, in step order,
feeding rows online in any interleaving of metrics yields exactly the findings that
:func:`check` computes from the run file (the invariant ``tests/test_alarms.py`` checks
with hypothesis). Values are compared as float64, the store's default field dtype.

Episodes. A rule that keeps firing does not flood: a finding is emitted at the first row
of an *episode* (after ``sustain`` consecutive firing rows), again only if the severity
rises within the episode (``info`` -> ``warning`` -> ``error``), and the episode ends
after ``rearm`` consecutive valid rows on which the rule does not fire. Rows whose watched
values are NaN (a metric that failed, e.g. out of memory) are *ignored*: they neither fire
nor count towards ``sustain``/``rearm``. Only :class:`NonFinite` looks at NaN on purpose,
and only in the training loss and the ``nonfinite`` flags.

The thresholds and their sources are documented on each rule and in ``docs/alarms.md``.
"""

from __future__ import annotations

import bisect
import math
import os
from collections import deque
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np

from landscape._errors import StepOrderError
from landscape.findings import Finding, severity_rank

__all__ = [
    "RULES",
    "SKIP",
    "EdgeOfStability",
    "GradNormSpike",
    "LogitGrowth",
    "LossSpike",
    "NonFinite",
    "OnlineAlarms",
    "RankCollapse",
    "Rule",
    "SignCollapse",
    "TaylorRatio",
    "Trigger",
    "check",
    "default_rules",
    "warning_leads",
]

Value = Union[float, np.ndarray]
Row = Mapping[str, Value]


class _Skip:
    """Sentinel type: the row carries no usable value for this rule (ignored)."""

    _instance: _Skip | None = None

    def __new__(cls) -> _Skip:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "SKIP"


SKIP = _Skip()
"""Returned by an evaluator for a row it ignores (missing or NaN values)."""


@dataclass(frozen=True)
class Trigger:
    """What one firing row reports; the episode logic turns it into a :class:`Finding`.

    ``field`` names the field of the watched metric (the finding's ``metric`` becomes
    ``"<metric>/<field>"``).
    """

    severity: str
    field: str
    value: float
    threshold: float
    message: str
    hint: str
    extra: dict = field(default_factory=dict)


Evaluator = Callable[[int, Row], Union[Trigger, _Skip, None]]
"""``evaluate(step, row) -> Trigger | None | SKIP``: fire, do not fire, or ignore the row."""


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _scalar(row: Row, name: str) -> float | None:
    """The finite-or-not scalar ``row[name]``; None when absent, not scalar or NaN."""
    v = row.get(name)
    if v is None:
        return None
    if isinstance(v, np.ndarray):
        if v.size != 1:
            return None
        v = float(v.reshape(()))
    v = float(v)
    return None if math.isnan(v) else v


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_number(name: str, value: float, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if math.isnan(float(value)):
        raise ValueError(f"{name} must not be NaN")


# --------------------------------------------------------------------------- rule base


class Rule:
    """Base class of alarm rules.

    A rule is plain configuration (thresholds, ``sustain``, ``rearm``); the per-stream
    state lives in the evaluator that :meth:`evaluator` returns, so one rule object can
    serve many :class:`OnlineAlarms`. Subclasses set ``name`` and ``metrics`` and either
    implement the stateless :meth:`evaluate` or override :meth:`evaluator` to keep state
    (a trailing window, a running maximum).

    ``sustain``: consecutive firing rows needed to open an episode (the finding is
    emitted at the row that completes it). ``rearm``: consecutive valid non-firing rows
    that close an episode.
    """

    name: str = ""
    metrics: tuple[str, ...] = ()
    sustain: int = 1
    rearm: int = 3

    def evaluator(self, metric: str, params: Mapping[str, Any]) -> Evaluator:
        """A fresh evaluator for the rows of ``metric`` (its declared ``params``)."""
        return lambda step, row: self.evaluate(metric, row)

    def evaluate(self, metric: str, row: Row) -> Trigger | _Skip | None:
        """Stateless evaluation of one row (override this or :meth:`evaluator`)."""
        raise NotImplementedError

    def _validate_common(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        _check_positive_int("sustain", self.sustain)
        _check_positive_int("rearm", self.rearm)
        if isinstance(self.metrics, str):
            raise ValueError("metrics must be a sequence of metric names, not a string")
        self.metrics = tuple(self.metrics)
        if not self.metrics or not all(isinstance(m, str) and m for m in self.metrics):
            raise ValueError(f"metrics must be non-empty metric names, got {self.metrics!r}")

    def config(self) -> dict[str, Any]:
        """The rule's settings as plain data (documentation, reports)."""
        if is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: getattr(self, k) for k in ("name", "metrics", "sustain", "rearm")}


# --------------------------------------------------------------------------- episodes


class _Stream:
    """One (rule, metric) pair: the rule's evaluator plus the episode state machine."""

    def __init__(self, rule: Rule, metric: str, params: Mapping[str, Any]) -> None:
        self.rule = rule
        self.metric = metric
        self.evaluate = rule.evaluator(metric, params)
        self.active = False  # inside an episode
        self.emitted = -1  # highest severity rank emitted in the current episode
        self.firing_rows = 0  # consecutive firing rows (for sustain)
        self.quiet_rows = 0  # consecutive non-firing rows inside an episode (for rearm)

    def observe(self, step: int, row: Row) -> Finding | None:
        result = self.evaluate(step, row)
        if result is SKIP:
            return None
        if result is None:
            self.firing_rows = 0
            if self.active:
                self.quiet_rows += 1
                if self.quiet_rows >= self.rule.rearm:
                    self.active = False
                    self.emitted = -1
                    self.quiet_rows = 0
            return None
        if not isinstance(result, Trigger):
            raise TypeError(
                f"rule {self.rule.name!r} returned {result!r}; expected a Trigger, None or SKIP"
            )
        self.quiet_rows = 0
        self.firing_rows += 1
        rank = severity_rank(result.severity)
        if not self.active:
            if self.firing_rows < self.rule.sustain:
                return None
            self.active = True
        elif rank <= self.emitted:
            return None
        self.emitted = rank
        return Finding(
            step=int(step),
            rule=self.rule.name,
            severity=result.severity,
            metric=f"{self.metric}/{result.field}",
            value=float(result.value),
            threshold=float(result.threshold),
            message=result.message,
            hint=result.hint,
            extra=dict(result.extra),
        )


# --------------------------------------------------------------------------- threshold rules


@dataclass
class EdgeOfStability(Rule):
    """Sharpness at or past the optimizer's linear-stability threshold.

    Reads ``sharpness/ratio`` = λ_max / threshold, where the threshold is the
    optimizer-specific stability limit at the current learning rate (2/η for GD,
    (2+2β)/η for heavy ball, (2+2β1)/((1−β1)η) for Adam's preconditioned sharpness;
    METRICS.md §1.6, Cohen et al. 2021 arXiv:2103.00065 and 2022 arXiv:2207.14484). When
    ``ratio`` is NaN, ``lambda_max / threshold`` is used if both are finite.

    * ``ratio >= threshold`` (default 1.0): warning. The iterate is past linear stability
      along the top eigenvector; full-batch GD "hovers" here (edge of stability), SGD
      usually stays below, and a jump well past 1 signals a learning-rate problem.
    * ``ratio >= approach`` (default 0.9; ``None`` disables): info, progressive
      sharpening is about to reach the limit. It also acts as hysteresis: a ratio that
      hovers around 1 keeps one episode open instead of re-firing.
    """

    threshold: float = 1.0
    approach: float | None = 0.9
    sustain: int = 1
    rearm: int = 3
    metrics: tuple[str, ...] = ("sharpness",)
    name: str = "edge_of_stability"

    def __post_init__(self) -> None:
        self._validate_common()
        _check_number("threshold", self.threshold)
        _check_number("approach", self.approach, allow_none=True)
        if self.approach is not None and self.approach > self.threshold:
            raise ValueError(
                f"approach ({self.approach}) must not exceed threshold ({self.threshold})"
            )

    def evaluate(self, metric: str, row: Row) -> Trigger | _Skip | None:
        ratio = _scalar(row, "ratio")
        lam = _scalar(row, "lambda_max")
        limit = _scalar(row, "threshold")
        if ratio is None and lam is not None and limit is not None and limit > 0:
            ratio = lam / limit
        if ratio is None:
            return SKIP
        detail = (
            f" (lambda_max {_fmt(lam)} vs stability threshold {_fmt(limit)})"
            if lam is not None and limit is not None
            else ""
        )
        if ratio >= self.threshold:
            return Trigger(
                "warning",
                "ratio",
                ratio,
                self.threshold,
                f"sharpness ratio {_fmt(ratio)} >= {_fmt(self.threshold)}: past the "
                f"optimizer's linear-stability limit{detail}",
                "expected at the edge of stability in full-batch GD; if the loss oscillates "
                "or rises, lower the learning rate or lengthen warm-up",
            )
        if self.approach is not None and ratio >= self.approach:
            return Trigger(
                "info",
                "ratio",
                ratio,
                self.approach,
                f"sharpness ratio {_fmt(ratio)} >= {_fmt(self.approach)}: approaching the "
                f"optimizer's stability limit{detail}",
                "progressive sharpening; watch the loss, and lower the learning rate "
                "if it starts to oscillate",
            )
        return None


@dataclass
class TaylorRatio(Rule):
    """The optimizer step leaves the softmax Taylor convergence disk.

    Reads ``taylor/r`` = ||p|| / ρ_a, the step length in units of the convergence radius
    of the cross-entropy Taylor series along the step (Sao 2026, arXiv:2603.13552,
    Def. 5.1; METRICS.md §5.2). The paper's guidance: r = 0.5 is a safe target, r = 1 is
    the theoretical edge, r = 2 usually still works, r = 4 breaks.

    * ``r >= warn`` (default 1.0): warning.
    * ``r >= error`` (default 4.0): error.
    """

    warn: float = 1.0
    error: float = 4.0
    sustain: int = 1
    rearm: int = 3
    metrics: tuple[str, ...] = ("taylor",)
    name: str = "taylor_ratio"

    def __post_init__(self) -> None:
        self._validate_common()
        _check_number("warn", self.warn)
        _check_number("error", self.error)
        if self.error < self.warn:
            raise ValueError(f"error ({self.error}) must be >= warn ({self.warn})")

    def evaluate(self, metric: str, row: Row) -> Trigger | _Skip | None:
        r = _scalar(row, "r")
        if r is None:
            return SKIP
        hint = (
            "lower the learning rate or add warm-up, or clip the step to the radius "
            "(the monitor's Taylor guard); r = 0.5 is a safe target"
        )
        if r >= self.error:
            return Trigger(
                "error",
                "r",
                r,
                self.error,
                f"Taylor ratio r = {_fmt(r)} >= {_fmt(self.error)}: the step is far outside "
                "the softmax convergence radius",
                hint,
            )
        if r >= self.warn:
            return Trigger(
                "warning",
                "r",
                r,
                self.warn,
                f"Taylor ratio r = {_fmt(r)} >= {_fmt(self.warn)}: the step leaves the "
                "softmax convergence radius",
                hint,
            )
        return None


@dataclass
class LogitGrowth(Rule):
    """Output logits grow large, or the softmax saturates numerically.

    * ``logits/max_abs >= max_abs`` (default 100): warning. Logit growth precedes
      output-logit divergence (Wortsman et al. 2024, arXiv:2309.14322; METRICS.md §11.1);
      at |z| ~ 100 float32 softmax is one-hot for any runner-up gap above ~17.
    * ``logits/softmax_collapse > softmax_collapse`` (default 0): warning. A non-zero
      fraction of samples whose softmax sums to exactly 1 in floating point means their
      gradient is exactly zero (Softmax Collapse, Prieto et al. 2025, arXiv:2501.04697;
      METRICS.md §11.2).

    ``None`` disables either condition. When both fire, ``max_abs`` is reported.
    """

    max_abs: float | None = 100.0
    softmax_collapse: float | None = 0.0
    sustain: int = 1
    rearm: int = 3
    metrics: tuple[str, ...] = ("logits",)
    name: str = "logit_growth"

    def __post_init__(self) -> None:
        self._validate_common()
        _check_number("max_abs", self.max_abs, allow_none=True)
        _check_number("softmax_collapse", self.softmax_collapse, allow_none=True)

    def evaluate(self, metric: str, row: Row) -> Trigger | _Skip | None:
        big = _scalar(row, "max_abs")
        sc = _scalar(row, "softmax_collapse")
        if (big is None or self.max_abs is None) and (sc is None or self.softmax_collapse is None):
            return SKIP
        hint = (
            "add a z-loss (1e-4 * logsumexp^2), qk-layernorm or weight decay, lower the "
            "learning rate, and compute the softmax/loss in float32"
        )
        if self.max_abs is not None and big is not None and big >= self.max_abs:
            return Trigger(
                "warning",
                "max_abs",
                big,
                self.max_abs,
                f"max |logit| {_fmt(big)} >= {_fmt(self.max_abs)}: output logits are growing",
                hint,
            )
        if self.softmax_collapse is not None and sc is not None and sc > self.softmax_collapse:
            return Trigger(
                "warning",
                "softmax_collapse",
                sc,
                self.softmax_collapse,
                f"softmax collapse in {_fmt(100 * sc)}% of samples: their softmax rounds to "
                "one-hot and their gradient is exactly zero",
                hint,
            )
        return None


@dataclass
class NonFinite(Rule):
    """NaN or infinite training loss or gradients (always an error).

    Sources (``metrics``, default ``("nonfinite", "loss")``):

    * ``nonfinite/loss`` and ``nonfinite/grad``: flags the monitor sets to 1.0 when the
      loss / any gradient entry is non-finite. A NaN *flag* means the check itself failed
      and is ignored.
    * ``loss/value`` (and ``grad_norm/value`` if you add ``"grad_norm"``): the value
      itself is NaN or ±inf. This is the one place where NaN fires instead of being
      ignored: the loss is what training produced, not a diagnostic that can fail.

    Each source is its own stream, so a NaN loss that the ``nonfinite`` metric also flags
    gives one finding per source at that step. The default ``rearm`` of 10 rows stops a
    run that stays NaN from repeating the error.
    """

    sustain: int = 1
    rearm: int = 10
    metrics: tuple[str, ...] = ("nonfinite", "loss")
    name: str = "nonfinite"

    def __post_init__(self) -> None:
        self._validate_common()

    _HINT = (
        "lower the learning rate, enable gradient clipping, keep the loss/softmax in float32, "
        "and check the batch for NaN/inf inputs (fp16 GradScaler skips are expected)"
    )

    def evaluate(self, metric: str, row: Row) -> Trigger | _Skip | None:
        if metric == "nonfinite":
            flags = [(f, _scalar(row, f)) for f in ("loss", "grad")]
            valid = [(f, v) for f, v in flags if v is not None]
            if not valid:
                return SKIP
            for f, v in valid:
                if v != 0:
                    what = "training loss" if f == "loss" else "gradient"
                    return Trigger(
                        "error",
                        f,
                        1.0,
                        1.0,
                        f"non-finite {what} (flagged by the nonfinite metric)",
                        self._HINT,
                    )
            return None
        raw = row.get("value")
        if raw is None:
            return SKIP
        arr = np.asarray(raw, dtype=np.float64)
        if arr.size == 0:
            return SKIP
        bad = arr[~np.isfinite(arr)]
        if bad.size == 0:
            return None
        what = "training loss" if metric == "loss" else f"{metric}"
        return Trigger(
            "error",
            "value",
            1.0,
            1.0,
            f"{what} is {bad.flat[0]}",
            self._HINT,
        )


# --------------------------------------------------------------------------- stateful rules


@dataclass
class SignCollapse(Rule):
    """Spectral-alignment sign diversity collapses in some layer.

    Reads ``spectral_alignment/minority`` (one value per monitored layer; layer names
    from the metric's ``params["layers"]``): the fraction of tokens whose alignment with
    the top singular direction of the layer's weight has the minority sign (0.5 balanced,
    0 collapsed). A collapse of this sign diversity predicts loss explosion hundreds to
    thousands of steps ahead (Qiu et al. 2025, arXiv:2510.04202; METRICS.md §4, whose
    statistic and thresholds are provisional).

    Fires (warning) when some layer's minority fraction is ``<= threshold`` (default
    0.05) on ``sustain`` (default 2) consecutive rows, **and that layer was healthy
    before**: its minority fraction exceeded ``healthy`` (default 0.2) on an earlier row.
    The trend condition keeps the rule quiet at initialisation, where inputs with a
    non-zero mean (post-ReLU features) can align one-sidedly with a random top singular
    vector; what predicts divergence is *losing* a diversity the layer had. A layer that
    is collapsed from its first row never fires (``healthy=None`` drops the condition).
    """

    threshold: float = 0.05
    healthy: float | None = 0.2
    sustain: int = 2
    rearm: int = 3
    metrics: tuple[str, ...] = ("spectral_alignment",)
    name: str = "sign_collapse"

    def __post_init__(self) -> None:
        self._validate_common()
        _check_number("threshold", self.threshold)
        _check_number("healthy", self.healthy, allow_none=True)
        if self.healthy is not None and self.healthy < self.threshold:
            raise ValueError(f"healthy ({self.healthy}) must be >= threshold ({self.threshold})")

    def evaluator(self, metric: str, params: Mapping[str, Any]) -> Evaluator:
        layers = list(params.get("layers") or []) if isinstance(params, Mapping) else []
        seen_healthy: set[int] = set()

        def evaluate(step: int, row: Row) -> Trigger | _Skip | None:
            raw = row.get("minority")
            if raw is None:
                return SKIP
            m = np.atleast_1d(np.asarray(raw, dtype=np.float64))
            finite = np.isfinite(m)
            if not finite.any():
                return SKIP
            worst: tuple[float, int] | None = None
            for i in np.flatnonzero(finite):
                v = float(m[i])
                if v <= self.threshold and (i in seen_healthy or self.healthy is None):
                    if worst is None or v < worst[0]:
                        worst = (v, int(i))
            if self.healthy is not None:
                for i in np.flatnonzero(finite):
                    if m[i] > self.healthy:
                        seen_healthy.add(int(i))
            if worst is None:
                return None
            v, i = worst
            layer = str(layers[i]) if i < len(layers) else f"#{i}"
            return Trigger(
                "warning",
                "minority",
                v,
                self.threshold,
                f"spectral-alignment sign collapse in layer {layer}: minority-sign fraction "
                f"{_fmt(v)} <= {_fmt(self.threshold)}",
                "often precedes a loss explosion: lower the learning rate, check "
                "normalization (pre-LN, qk-layernorm) and mixed precision in this layer",
                {"layer": layer, "layer_index": i},
            )

        return evaluate


@dataclass
class RankCollapse(Rule):
    """Effective rank of the representation falls far below its running maximum.

    Reads ``representation/effective_rank`` (RankMe, Garrido et al. 2023,
    arXiv:2210.02885; METRICS.md §8). The first ``warmup`` valid rows (default 5) only
    pass by (the rank moves fast at initialisation); afterwards the running maximum of
    the rank is tracked, and the rule fires (warning) when the rank drops below
    ``ratio`` (default 0.5) times that maximum: the representation lost half of its
    dimensions (dimensional collapse). Late in classification training, neural collapse
    legitimately lowers the rank towards the number of classes; lower ``ratio`` or
    disable the rule there.
    """

    ratio: float = 0.5
    warmup: int = 5
    field: str = "effective_rank"
    sustain: int = 1
    rearm: int = 3
    metrics: tuple[str, ...] = ("representation",)
    name: str = "rank_collapse"

    def __post_init__(self) -> None:
        self._validate_common()
        _check_number("ratio", self.ratio)
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")

    def evaluator(self, metric: str, params: Mapping[str, Any]) -> Evaluator:
        state = {"rows": 0, "max": -math.inf}

        def evaluate(step: int, row: Row) -> Trigger | _Skip | None:
            v = _scalar(row, self.field)
            if v is None or not math.isfinite(v):
                return SKIP
            state["rows"] += 1
            if state["rows"] <= self.warmup:
                return None
            state["max"] = max(state["max"], v)
            limit = self.ratio * state["max"]
            if v < limit:
                return Trigger(
                    "warning",
                    self.field,
                    v,
                    limit,
                    f"effective rank {_fmt(v)} < {_fmt(self.ratio)} x its running max "
                    f"{_fmt(state['max'])}: the representation is collapsing",
                    "lower the learning rate, check for dead units and normalization; if "
                    "neural collapse is expected late in training, lower ratio or disable",
                )
            return None

        return evaluate


class _RollingWindow:
    """The last ``size`` values, kept sorted too: median and MAD in O(size) per row."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.order: deque[float] = deque()
        self.sorted: list[float] = []

    def __len__(self) -> int:
        return len(self.order)

    def append(self, x: float) -> None:
        if len(self.order) == self.size:
            old = self.order.popleft()
            del self.sorted[bisect.bisect_left(self.sorted, old)]
        self.order.append(x)
        bisect.insort(self.sorted, x)

    def median_mad(self) -> tuple[float, float]:
        """Median and median absolute deviation from it (both as in ``np.median``)."""
        a = self.sorted
        n = len(a)
        h = n // 2
        med = a[h] if n % 2 else 0.5 * (a[h - 1] + a[h])
        # the deviations left and right of the median are each sorted: merge them up to
        # the middle one
        right = bisect.bisect_left(a, med)
        left = right - 1
        devs: list[float] = []
        while len(devs) <= h:
            if left >= 0 and (right >= n or med - a[left] <= a[right] - med):
                devs.append(med - a[left])
                left -= 1
            else:
                devs.append(a[right] - med)
                right += 1
        mad = devs[h] if n % 2 else 0.5 * (devs[h - 1] + devs[h])
        return med, mad


@dataclass
class LossSpike(Rule):
    """Sudden jump of the training loss above its recent level (robust z-score or CUSUM).

    Over a trailing window of the last ``window`` valid rows (default 50, not counting
    the current one) with median m and MAD, the robust z-score is
    z = (x − m) / max(1.4826·MAD, rel_floor·|m|, 1e-12) (Hampel's identifier; 1.4826
    makes MAD a consistent estimate of σ for Gaussian noise). Nothing fires before
    ``min_history`` (default 20) rows are in the window.

    * ``method="zscore"`` (default): warning when ``z >= z`` (default 6) **and**
      ``x >= m + (min_ratio − 1)·|m|`` (default ``min_ratio`` 1.5, i.e. 1.5 × the median
      for a positive loss). The z-score alone fires on a very smooth loss with a tiny
      MAD; the ratio alone fires on a noisy one; both together mean "large and
      unusual".
    * ``method="cusum"``: one-sided CUSUM of the robust z-scores (Page 1954),
      S ← max(0, S + min(z, cusum_clip) − cusum_k), warning when ``S >= cusum_h``
      (defaults k = 1, h = 12, clip 4): slower, sustained rises that no single row
      makes unusual. ``min_ratio`` does not apply.

    Non-finite values are ignored here (they are :class:`NonFinite`'s business) and do
    not enter the window.
    """

    window: int = 50
    min_history: int = 20
    z: float = 6.0
    min_ratio: float = 1.5
    method: str = "zscore"
    cusum_k: float = 1.0
    cusum_h: float = 12.0
    cusum_clip: float = 4.0
    rel_floor: float = 1e-3
    field: str = "value"
    sustain: int = 1
    rearm: int = 20
    metrics: tuple[str, ...] = ("loss",)
    name: str = "loss_spike"

    _what = "loss"
    _hint = (
        "lower the learning rate or add warm-up, enable gradient clipping, and check the "
        "batch at this step for bad data"
    )

    def __post_init__(self) -> None:
        self._validate_common()
        _check_positive_int("window", self.window)
        _check_positive_int("min_history", self.min_history)
        if self.min_history > self.window:
            raise ValueError(
                f"min_history ({self.min_history}) must not exceed window ({self.window})"
            )
        for name in ("z", "min_ratio", "cusum_k", "cusum_h", "cusum_clip", "rel_floor"):
            _check_number(name, getattr(self, name))
        if self.method not in ("zscore", "cusum"):
            raise ValueError(f"method must be 'zscore' or 'cusum', got {self.method!r}")
        if self.rel_floor < 0:
            raise ValueError(f"rel_floor must be >= 0, got {self.rel_floor}")

    def evaluator(self, metric: str, params: Mapping[str, Any]) -> Evaluator:
        history = _RollingWindow(self.window)
        cusum = [0.0]

        def evaluate(step: int, row: Row) -> Trigger | _Skip | None:
            x = _scalar(row, self.field)
            if x is None or not math.isfinite(x):
                return SKIP
            trigger = None
            if len(history) >= self.min_history:
                med, mad = history.median_mad()
                scale = max(1.4826 * mad, self.rel_floor * abs(med), 1e-12)
                z = (x - med) / scale
                if self.method == "zscore":
                    if z >= self.z and x - med >= (self.min_ratio - 1.0) * abs(med):
                        trigger = Trigger(
                            "warning",
                            self.field,
                            x,
                            med + (self.min_ratio - 1.0) * abs(med),
                            f"{self._what} spike: {_fmt(x)} vs median {_fmt(med)} of the "
                            f"last {len(history)} rows (robust z = {_fmt(z)} >= {_fmt(self.z)})",
                            self._hint,
                            {"z": z, "median": med},
                        )
                else:
                    cusum[0] = max(0.0, cusum[0] + min(z, self.cusum_clip) - self.cusum_k)
                    if cusum[0] >= self.cusum_h:
                        trigger = Trigger(
                            "warning",
                            self.field,
                            cusum[0],
                            self.cusum_h,
                            f"{self._what} drifting up: CUSUM {_fmt(cusum[0])} >= "
                            f"{_fmt(self.cusum_h)} ({_fmt(x)} vs median {_fmt(med)})",
                            self._hint,
                            {"z": z, "median": med},
                        )
            history.append(x)
            return trigger

        return evaluate


@dataclass
class GradNormSpike(LossSpike):
    """Sudden jump of the gradient norm: :class:`LossSpike`'s machinery on ``grad_norm``.

    Same defaults except ``min_ratio`` = 2.0: minibatch gradient norms are noisier and
    more heavy-tailed than the loss, and a doubling is the scale at which gradient
    clipping and loss blow-ups become relevant. A gradient spike usually precedes the
    loss spike by a step or more.
    """

    min_ratio: float = 2.0
    metrics: tuple[str, ...] = ("grad_norm",)
    name: str = "grad_norm_spike"

    _what = "gradient norm"
    _hint = (
        "enable gradient clipping (e.g. clip_grad_norm_ to 1.0), lower the learning rate "
        "or add warm-up, and check the batch at this step"
    )


# --------------------------------------------------------------------------- registry


RULES: dict[str, type[Rule]] = {
    cls.name: cls  # type: ignore[misc]
    for cls in (
        EdgeOfStability,
        TaylorRatio,
        SignCollapse,
        LossSpike,
        GradNormSpike,
        LogitGrowth,
        RankCollapse,
        NonFinite,
    )
}
"""Rule classes of :func:`default_rules` by rule name."""


def default_rules(**overrides: Mapping[str, Any] | bool | None) -> list[Rule]:
    """The eight built-in rules with their documented defaults.

    Keyword arguments, by rule name, change or disable a rule::

        default_rules(loss_spike={"z": 8, "window": 100}, sign_collapse=None)

    A mapping gives constructor arguments; ``None`` or ``False`` removes the rule;
    ``True`` keeps the defaults.
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


# --------------------------------------------------------------------------- online / offline


def _as_row(values: Mapping[str, Any]) -> dict[str, Value]:
    """Every numeric field of ``values`` as float64 (scalars as float, arrays as ndarray)."""
    if not isinstance(values, Mapping):
        raise ValueError(f"values must be a mapping of field name to value, got {values!r}")
    out: dict[str, Value] = {}
    for key, v in values.items():
        if key == "step":
            continue
        if hasattr(v, "detach"):  # a torch tensor, without importing torch
            v = v.detach().cpu().numpy()
        try:
            arr = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            continue  # strings and other non-numeric fields
        out[key] = float(arr) if arr.ndim == 0 else arr
    return out


def _sort_key(f: Finding) -> tuple:
    return (f.step, f.rule, f.metric, severity_rank(f.severity), f.message)


class OnlineAlarms:
    """Incremental evaluation of alarm rules on rows as they are appended.

    ``observe(name, step, values)`` takes one row of metric ``name`` (the same mapping of
    field to value that ``RunWriter.append`` takes) and returns the findings it raises,
    usually none. Per metric, steps must strictly increase; metrics interleave freely.
    Each call costs O(window) per rule watching that metric, independent of the run
    length. ``findings`` keeps everything emitted so far.

    Call :meth:`declare` with a metric's ``params`` before its first row when a rule uses
    them (``spectral_alignment``'s layer names), and :meth:`replay` to catch up with the
    rows of a resumed run.
    """

    def __init__(self, rules: Iterable[Rule] | None = None) -> None:
        self.rules: list[Rule] = default_rules() if rules is None else list(rules)
        names: set[str] = set()
        for rule in self.rules:
            if not isinstance(rule, Rule):
                raise ValueError(f"rules must contain Rule objects, got {rule!r}")
            if rule.name in names:
                raise ValueError(f"rules: two rules are named {rule.name!r}")
            names.add(rule.name)
        self._watchers: dict[str, list[Rule]] = {}
        for rule in self.rules:
            for metric in rule.metrics:
                self._watchers.setdefault(metric, []).append(rule)
        self._params: dict[str, dict] = {}
        self._streams: dict[str, list[_Stream]] = {}
        self._last: dict[str, int] = {}
        self.findings: list[Finding] = []

    @property
    def metrics(self) -> list[str]:
        """Metric names some rule watches."""
        return sorted(self._watchers)

    def declare(self, name: str, params: Mapping[str, Any] | None = None) -> None:
        """Record metric ``name``'s ``params`` (used when its first row arrives)."""
        if name in self._streams and dict(params or {}) != self._params.get(name, {}):
            raise ValueError(f"metric {name!r} already has rows; declare it before observing")
        self._params[name] = dict(params or {})

    def observe(self, name: str, step: int, values: Mapping[str, Any]) -> list[Finding]:
        """Evaluate one row of metric ``name`` at ``step``; return the findings it raises."""
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
        if streams is None:
            params = self._params.get(name, {})
            streams = [_Stream(rule, name, params) for rule in watchers]
            self._streams[name] = streams
        row = _as_row(values)
        out = [f for f in (s.observe(step, row) for s in streams) if f is not None]
        out.sort(key=_sort_key)
        self.findings.extend(out)
        return out

    def replay(self, run: Any) -> list[Finding]:
        """Feed every committed row of ``run`` (a ``Run``, a ``RunWriter`` or a path).

        Returns the findings those rows raise, sorted by step. Use it to resume online
        evaluation on a run that already has rows, or (on a fresh object) to re-evaluate a
        finished run, which is what :func:`check` does.
        """
        reader = _as_run(run)
        out: list[Finding] = []
        for name in reader.metrics():
            if name not in self._watchers:
                continue
            if name not in self._streams:
                params = reader.metric_attrs(name).get("params") or {}
                self._params[name] = dict(params) if isinstance(params, Mapping) else {}
            columns = {}
            steps = reader.steps(name)
            for fname, spec in reader.fields(name).items():
                if spec.is_string:
                    continue
                _, col = reader.series(name, fname)
                columns[fname] = col
            for i, step in enumerate(steps):
                out.extend(self.observe(name, int(step), {k: c[i] for k, c in columns.items()}))
        out.sort(key=_sort_key)
        return out


def _as_run(run: Any) -> Any:
    from landscape.store import Run, RunWriter

    if isinstance(run, Run):
        return run
    if isinstance(run, RunWriter):
        return run.run()
    if isinstance(run, (str, os.PathLike)):
        return Run.open(run)
    raise ValueError(f"run must be a Run, a RunWriter or a path to a run file, got {run!r}")


def check(run: Any, rules: Sequence[Rule] | None = None) -> list[Finding]:
    """Re-evaluate ``rules`` (default: :func:`default_rules`) over a whole run, offline.

    ``run`` is a :class:`~landscape.store.Run`, a ``RunWriter`` (its ``run()`` view) or a
    path to a run file. Metrics a rule watches that are absent are skipped. Returns the
    findings sorted by step; they are exactly what :class:`OnlineAlarms` emits when fed
    the same rows as they are appended. The findings already stored in the run are not
    read: this recomputes them.
    """
    return OnlineAlarms(rules).replay(run)


def warning_leads(
    run: Any, findings: Iterable[Finding], *, after: int, factor: float = 10.0
) -> tuple[int | None, dict[str, int | None]]:
    """How many steps each rule warned before the loss blew up.

    The blow-up step is the first step ``>= after`` whose training loss exceeds ``factor``
    times the median loss of the 20 recorded steps before ``after`` (or is not finite). Returns
    ``(blowup_step, {rule: lead})`` with the lead of each rule's first finding of severity
    warning or above at or after ``after`` (``None`` when it fired only after the blow-up or
    never). Used by the demo and the early-warning example.
    """
    steps, values = _as_run(run).series("loss", "value")
    before = values[(steps < after)][-20:]
    baseline = float(np.median(before)) if len(before) else math.nan
    blowup = None
    for s, v in zip(steps, values):
        if s >= after and (not math.isfinite(v) or v > factor * baseline):
            blowup = int(s)
            break
    leads: dict[str, int | None] = {}
    for f in sorted(findings, key=_sort_key):
        if f.step < after or severity_rank(f.severity) < severity_rank("warning"):
            continue
        if f.rule in leads:
            continue
        leads[f.rule] = None if blowup is None or f.step > blowup else blowup - f.step
    return blowup, leads
