"""Representation rules: what the network computes degenerates.

* :class:`SignCollapse` reads ``spectral_alignment/minority`` per layer;
* :class:`RankCollapse` reads ``representation/effective_rank``;
* :class:`LogitGrowth` reads ``logits/max_abs`` and ``logits/softmax_collapse``;
* :class:`AttentionLogitGrowth` reads ``sentinels/attention_logit_max``.

Thresholds, their sources and what to do: ``docs/alarms.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from landscape._deprecation import renamed_kwargs
from landscape.alarms.base import (
    SKIP,
    Evaluator,
    Row,
    Rule,
    Trigger,
    _Skip,
    check_count,
    check_number,
    check_positive_int,
    check_severity,
    row_value,
)
from landscape.findings import format_number as _fmt
from landscape.findings import severity_rank

__all__ = [
    "AttentionLogitGrowth",
    "AttentionLogitGrowthState",
    "LogitGrowth",
    "RankCollapse",
    "SignCollapse",
]


@dataclass
class LogitGrowth(Rule):
    """Output logits grow large, or the softmax saturates numerically.

    * ``logits/max_abs >= max_abs`` (default 100): ``max_abs_severity`` (default info: a
      classifier trained to near-zero loss with SGD reaches 100-340 while healthy, and
      on the learning-rate ramps it crossed 100 only after the loss had blown up). Logit
      growth precedes output-logit divergence (Wortsman et al. 2024, arXiv:2309.14322;
      ``docs/metrics.md``, "Cheap early-warning signals"); at |z| ~ 100 float32 softmax is
      one-hot for any runner-up gap above ~17.
    * ``logits/softmax_collapse > softmax_collapse`` (default 0): info. A non-zero
      fraction of samples whose softmax sums to exactly 1 in floating point means their
      gradient is exactly zero (Softmax Collapse, Prieto et al. 2025, arXiv:2501.04697);
      a classifier that becomes confident on easy samples gets there in healthy training,
      so it is info unless the fraction exceeds ``collapse_warn`` (default None: always
      info; a classifier at a training loss of 1e-4 has more than half of its samples
      collapsed).

    ``None`` disables either condition. When both fire, the more severe is reported
    (``max_abs`` on a tie).

    Raises:
        ValueError: a setting is not a number or None.
    """

    max_abs: float | None = 100.0
    max_abs_severity: str = "info"
    softmax_collapse: float | None = 0.0
    collapse_warn: float | None = None
    sustain: int = 1
    rearm: int = 3
    metrics: tuple[str, ...] = ("logits",)
    name: str = "logit_growth"

    def __post_init__(self) -> None:
        self._validate_common()
        check_number("max_abs", self.max_abs, allow_none=True)
        check_number("softmax_collapse", self.softmax_collapse, allow_none=True)
        check_number("collapse_warn", self.collapse_warn, allow_none=True)
        check_severity("max_abs_severity", self.max_abs_severity)

    def evaluate(self, metric: str, row: Row) -> Trigger | _Skip | None:
        """Compare the row's largest logit and softmax-collapse fraction with the limits.

        Args:
            metric: the metric name (``logits``).
            row: the row's numeric fields.

        Returns:
            A warning :class:`Trigger`, None, or :data:`SKIP` when neither enabled field
            has a value.
        """
        big = row_value(row, "max_abs")
        sc = row_value(row, "softmax_collapse")
        if (big is None or self.max_abs is None) and (sc is None or self.softmax_collapse is None):
            return SKIP
        hint = (
            "add a z-loss (1e-4 * logsumexp^2), qk-layernorm or weight decay, lower the "
            "learning rate, and compute the softmax/loss in float32"
        )
        found = []
        if self.max_abs is not None and big is not None and big >= self.max_abs:
            found.append(Trigger(
                severity=self.max_abs_severity,
                field="max_abs",
                value=big,
                threshold=self.max_abs,
                message=f"max |logit| {_fmt(big)} >= {_fmt(self.max_abs)}: output logits are "
                "growing",
                hint=hint,
            ))
        if self.softmax_collapse is not None and sc is not None and sc > self.softmax_collapse:
            warn = self.collapse_warn is not None and sc > self.collapse_warn
            found.append(Trigger(
                severity="warning" if warn else "info",
                field="softmax_collapse",
                value=sc,
                threshold=self.softmax_collapse,
                message=f"softmax collapse in {_fmt(100 * sc)}% of samples: their softmax "
                "rounds to one-hot and their gradient is exactly zero",
                hint=hint,
            ))
        if found:  # both: the more severe one (max_abs on a tie)
            return max(found, key=lambda t: severity_rank(t.severity))
        return None


@dataclass
class SignCollapse(Rule):
    """Spectral-alignment sign diversity collapses in some layer.

    Reads ``spectral_alignment/minority`` (one value per monitored layer; layer names
    from the metric's ``config()["layers"]``): the fraction of tokens whose alignment with
    the top singular direction of the layer's weight has the minority sign (0.5 balanced,
    0 collapsed). A collapse of this sign diversity predicts loss explosion hundreds to
    thousands of steps ahead (Qiu et al. 2025, arXiv:2510.04202). The statistic is our
    reading of the paper's abstract (``docs/metrics.md``, "Spectral alignment"), so the
    thresholds are provisional.

    Fires (info by default; ``severity="warning"`` to warn) when some layer's minority
    fraction is ``<= threshold`` (default 0.05) on ``sustain`` (default 2) consecutive rows
    of its own (two layers that each dip once, on successive rows, do not fire), **and
    that layer was healthy before**: its minority fraction exceeded ``healthy`` (default
    0.2) on an earlier row.
    The trend condition keeps the rule quiet at initialisation, where inputs with a
    non-zero mean (post-ReLU features) can align one-sidedly with a random top singular
    vector; what predicts divergence is *losing* a diversity the layer had. A layer that
    is collapsed from its first row never fires (``healthy=None`` drops the condition).

    Raises:
        ValueError: a setting is not a number, or ``healthy < threshold``.
    """

    threshold: float = 0.05
    healthy: float | None = 0.2
    severity: str = "info"
    sustain: int = 2
    rearm: int = 3
    metrics: tuple[str, ...] = ("spectral_alignment",)
    name: str = "sign_collapse"

    def __post_init__(self) -> None:
        self._validate_common()
        check_number("threshold", self.threshold)
        check_number("healthy", self.healthy, allow_none=True)
        if self.healthy is not None and self.healthy < self.threshold:
            raise ValueError(f"healthy ({self.healthy}) must be >= threshold ({self.threshold})")
        check_severity("severity", self.severity)

    @property
    def episode_sustain(self) -> int:
        """1: ``sustain`` counts each layer's own rows (:class:`SignCollapseState`)."""
        return 1

    @renamed_kwargs(params="config")
    def evaluator(self, metric: str, config: Mapping[str, Any]) -> Evaluator:
        """A fresh :class:`SignCollapseState` for one stream.

        Args:
            metric: the metric name (``spectral_alignment``).
            config: the metric's stored ``config()``; ``config["layers"]`` names the
                layers.

        Returns:
            The stream's evaluator.
        """
        layers = list(config.get("layers") or []) if isinstance(config, Mapping) else []
        return SignCollapseState(self, layers)


class SignCollapseState:
    """The evaluator of :class:`SignCollapse` on one stream.

    Args:
        rule: the rule's settings.
        layers: the layer names, by index of the ``minority`` vector.

    Attributes:
        seen_healthy: indices of the layers whose minority fraction exceeded
            ``rule.healthy`` on some earlier row.
        collapsed_rows: per layer index, its consecutive collapsed rows so far.
    """

    def __init__(self, rule: SignCollapse, layers: list[Any]) -> None:
        self.rule = rule
        self.layers = layers
        self.seen_healthy: set[int] = set()
        self.collapsed_rows: dict[int, int] = {}  # per layer: consecutive collapsed rows
        # the layers that fired, with their consecutive rows out of collapse since: a dip of
        # one of them (flickering) keeps the episode open; another layer's dip is noise
        self.fired: dict[int, int] = {}

    def __call__(self, step: int, row: Row) -> Trigger | _Skip | None:
        """Evaluate one row.

        Args:
            step: the row's step.
            row: the row's numeric fields.

        Returns:
            A warning :class:`Trigger` for the most collapsed layer that was healthy
            before, None, or :data:`SKIP` when no layer has a finite value.
        """
        rule = self.rule
        raw = row.get("minority")
        if raw is None:
            return SKIP
        m = np.atleast_1d(np.asarray(raw, dtype=np.float64))
        finite = np.isfinite(m)
        if not finite.any():
            return SKIP
        worst: tuple[float, int] | None = None
        dipped = False  # a layer that fired is collapsed again, not yet for sustain rows
        dip: tuple[float, int] | None = None
        # a fired layer's NaN row counts towards its rearm as the episode's quiet rows do:
        # its dip must never outlive the episode and open one alone
        for i in [i for i in self.fired if i < len(m) and not finite[i]]:
            self.fired[i] += 1
            if self.fired[i] >= rule.rearm:
                del self.fired[i]
        for i in np.flatnonzero(finite):
            v = float(m[i])
            low = v <= rule.threshold and (i in self.seen_healthy or rule.healthy is None)
            # sustain counts this layer's own consecutive rows: two layers that each dip
            # once, on successive rows, are two single noisy readings, not a collapse
            self.collapsed_rows[int(i)] = self.collapsed_rows.get(int(i), 0) + 1 if low else 0
            if low and self.collapsed_rows[int(i)] >= rule.sustain:
                self.fired[int(i)] = 0
                if worst is None or v < worst[0]:
                    worst = (v, int(i))
            elif low and int(i) in self.fired:
                self.fired[int(i)] = 0
                dipped = True
                if dip is None or v < dip[0]:
                    dip = (v, int(i))
            elif not low and int(i) in self.fired:
                self.fired[int(i)] += 1
                if self.fired[int(i)] >= rule.rearm:  # recovered: its episode may end
                    del self.fired[int(i)]
        if rule.healthy is not None:
            for i in np.flatnonzero(finite):
                if m[i] > rule.healthy:
                    self.seen_healthy.add(int(i))
        if worst is None:
            # a dip below sustain of a layer that fired neither fires nor counts as a quiet
            # row towards rearm: a layer collapsed on most rows keeps its episode open
            if not dipped:
                return None
            # the episode of that layer goes on: a firing row (no new finding inside it)
            # breaks the tracker's run of quiet rows as the layer's own counter is reset
            worst = dip
        v, i = worst
        known = i < len(self.layers)
        layer = str(self.layers[i]) if known else f"#{i}"
        named = repr(layer) if known else layer  # a Sequential's "7" reads as a count unquoted
        return Trigger(
            severity=rule.severity,
            field="minority",
            value=v,
            threshold=rule.threshold,
            message=f"spectral-alignment sign collapse in layer {named}: minority-sign "
            f"fraction {_fmt(v)} <= {_fmt(rule.threshold)}",
            hint="often precedes a loss explosion: lower the learning rate, check "
            "normalization (pre-LN, qk-layernorm) and mixed precision in this layer",
            extra={"layer": layer, "layer_index": i},
        )


@dataclass
class RankCollapse(Rule):
    """Effective rank of the representation falls far below its running maximum.

    Reads ``representation/effective_rank`` (RankMe, Garrido et al. 2023,
    arXiv:2210.02885; ``docs/metrics.md``, "Effective rank"). The first ``warmup`` valid
    rows (default 5) only pass by (the rank moves fast at initialisation); afterwards the
    running maximum of the rank is tracked, and the rule fires (warning) when the rank
    drops below ``ratio`` (default 0.5) times that maximum: the representation lost half
    of its dimensions (dimensional collapse). Late in classification training, neural
    collapse legitimately lowers the rank towards the number of classes; lower ``ratio``
    or disable the rule there.

    Raises:
        ValueError: ``ratio`` is not in (0, 1), or ``warmup`` is not an integer >= 0.
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
        check_number("ratio", self.ratio)
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")
        check_count("warmup", self.warmup)

    @renamed_kwargs(params="config")
    def evaluator(self, metric: str, config: Mapping[str, Any]) -> Evaluator:
        """A fresh :class:`RankCollapseState` for one stream.

        Args:
            metric: the metric name (``representation``).
            config: the metric's stored ``config()`` (unused).

        Returns:
            The stream's evaluator.
        """
        return RankCollapseState(self)


class RankCollapseState:
    """The evaluator of :class:`RankCollapse` on one stream.

    Args:
        rule: the rule's settings.

    Attributes:
        rows: valid rows seen so far (warm-up included).
        running_max: the largest rank after the warm-up (``-inf`` before).
    """

    def __init__(self, rule: RankCollapse) -> None:
        self.rule = rule
        self.rows = 0
        self.running_max = -math.inf

    def __call__(self, step: int, row: Row) -> Trigger | _Skip | None:
        """Evaluate one row.

        Args:
            step: the row's step.
            row: the row's numeric fields.

        Returns:
            A warning :class:`Trigger`, None, or :data:`SKIP` for a missing or
            non-finite rank.
        """
        rule = self.rule
        v = row_value(row, rule.field)
        if v is None or not math.isfinite(v):
            return SKIP
        self.rows += 1
        if self.rows <= rule.warmup:
            return None
        self.running_max = max(self.running_max, v)
        limit = rule.ratio * self.running_max
        if v < limit:
            return Trigger(
                severity="warning",
                field=rule.field,
                value=v,
                threshold=limit,
                message=f"effective rank {_fmt(v)} < {_fmt(rule.ratio)} x its running max "
                f"{_fmt(self.running_max)}: the representation is collapsing",
                hint="lower the learning rate, check for dead units and normalization; if "
                "neural collapse is expected late in training, lower ratio or disable",
            )
        return None


@dataclass
class AttentionLogitGrowth(Rule):
    """The largest pre-softmax attention logit grows past where the softmax saturates.

    Reads ``sentinels/attention_logit_max``: the largest q·kᵀ·scale (masks honoured) of the
    sentinels' forward pass on the probe subsample (docs/monitor.md, "Sentinels"). Growing
    attention logits collapse the attention entropy (one-hot attention) and precede loss
    divergence in Transformers trained without QK-layernorm (Dehghani et al. 2023,
    arXiv:2302.05442, §3.1.1; Wortsman et al. 2023, arXiv:2309.14322, §3.1).

    Fires when, on ``sustain`` consecutive rows (default 3), the value is ``>= max_logit``
    (default 50: a logit gap of 50 leaves the other keys a weight below e^-50 ≈ 2e-22, and
    a float32 softmax is exactly one-hot beyond a gap of about 17) **and** ``>= growth``
    (default 4) times its baseline, the median of the first ``baseline_rows`` (default 10)
    finite rows. The growth condition keeps a model whose heads were sharp from the start
    (a pretrained model being fine-tuned) quiet until its logits really grow; the rule
    stays quiet while the baseline is collected. ``growth=None`` uses the level alone.

    Severity ``info`` by default: the instability suite has no mechanism where attention
    logits drive the divergence at this size (docs/alarms.md, "attention_logit_growth"),
    so the threshold is not validated as an early warning.

    Raises:
        ValueError: a setting is out of range.
    """

    max_logit: float = 50.0
    growth: float | None = 4.0
    baseline_rows: int = 10
    severity: str = "info"
    sustain: int = 3
    rearm: int = 10
    metrics: tuple[str, ...] = ("sentinels",)
    name: str = "attention_logit_growth"

    def __post_init__(self) -> None:
        self._validate_common()
        check_number("max_logit", self.max_logit)
        check_number("growth", self.growth, allow_none=True)
        check_positive_int("baseline_rows", self.baseline_rows)
        if self.growth is not None and self.growth <= 0:
            raise ValueError(f"growth must be > 0 or None, got {self.growth}")
        check_severity("severity", self.severity)

    @renamed_kwargs(params="config")
    def evaluator(self, metric: str, config: Mapping[str, Any]) -> Evaluator:
        """A fresh :class:`AttentionLogitGrowthState` for one stream.

        Args:
            metric: the metric name (``sentinels``).
            config: the metric's stored ``config()`` (unused).

        Returns:
            The stream's evaluator.
        """
        return AttentionLogitGrowthState(self)


class AttentionLogitGrowthState:
    """The evaluator of :class:`AttentionLogitGrowth` on one stream.

    Args:
        rule: the rule's settings.

    Attributes:
        first: the first ``rule.baseline_rows`` finite values (the baseline's rows).
    """

    def __init__(self, rule: AttentionLogitGrowth) -> None:
        self.rule = rule
        self.first: list[float] = []
        self.base: float | None = None  # the baseline, once its rows are collected

    def __call__(self, step: int, row: Row) -> Trigger | _Skip | None:
        """Evaluate one row.

        Args:
            step: the row's step.
            row: the row's numeric fields.

        Returns:
            A :class:`Trigger` of the rule's severity, None, or :data:`SKIP` for a row
            without a value (no attention, or not measured at this step).
        """
        rule = self.rule
        v = row_value(row, "attention_logit_max")
        if v is None:
            return SKIP
        limit = rule.max_logit
        if rule.growth is not None:
            if self.base is None:
                if math.isfinite(v):
                    self.first.append(v)
                if len(self.first) == rule.baseline_rows:
                    self.base = float(np.median(self.first))
                return None
            limit = max(limit, rule.growth * self.base)
        if v < limit:
            return None
        return Trigger(
            severity=rule.severity,
            field="attention_logit_max",
            value=v,
            threshold=limit,
            message=f"max attention logit {_fmt(v)} >= {_fmt(limit)}: attention logits are "
            "growing and the attention softmax saturates",
            hint="add QK-layernorm (or a cap/tanh softcap on attention logits), lower the "
            "learning rate or raise weight decay; compute attention softmax in float32",
        )
