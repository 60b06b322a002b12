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
:func:`check` computes from the run file. Values are compared as float64, the store's
default field dtype.

Episodes. A rule that keeps firing does not flood: a finding is emitted at the first row
of an *episode* (after ``sustain`` consecutive firing rows), again only if the severity
rises within the episode (``info`` -> ``warning`` -> ``error``), and the episode ends
after ``rearm`` consecutive valid rows on which the rule does not fire. Rows whose watched
values are NaN (a metric that failed, e.g. out of memory) are *ignored*: they neither fire
nor count towards ``sustain``/``rearm``. Only :class:`NonFiniteValues` looks at NaN on
purpose, and only in the training loss and the ``nonfinite`` flags.

Modules:

* :mod:`~landscape.alarms.base`: :class:`Rule`, :class:`Trigger`, :data:`SKIP` and the
  episode state machine;
* :mod:`~landscape.alarms.curvature_rules`, :mod:`~landscape.alarms.forecast_rules`,
  :mod:`~landscape.alarms.representation_rules`, :mod:`~landscape.alarms.training_rules`:
  the built-in rules;
* :mod:`~landscape.alarms.statistics`: the rolling median/MAD of the spike rules;
* :mod:`~landscape.alarms.online`: :class:`OnlineAlarms`, :func:`check`, :data:`RULES`,
  :func:`default_rules`, and with your own rules :func:`with_rules`;
* :mod:`~landscape.alarms.leads`: :func:`early_warning`, :func:`rule_leads`,
  :func:`warning_leads`: how far ahead the warnings came (the demo, the benchmarks).

The thresholds and their sources are documented on each rule and in ``docs/alarms.md``.
"""

from __future__ import annotations

from landscape._deprecation import module_getattr
from landscape.alarms.base import (
    SKIP,
    Rule,
    Trigger,
    check_count,
    check_number,
    check_positive_int,
    check_severity,
    row_value,
)
from landscape.alarms.curvature_rules import EdgeOfStability, TaylorRatio
from landscape.alarms.forecast_rules import SharpnessForecast, TaylorForecast
from landscape.alarms.leads import (
    EarlyWarning,
    early_warning,
    loss_milestones,
    rule_leads,
    warning_leads,
)
from landscape.alarms.online import (
    RULES,
    OnlineAlarms,
    check,
    collect_findings,
    default_rules,
    rule_names,
    with_rules,
)
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

__all__ = [
    "RULES",
    "AttentionLogitGrowth",
    "SKIP",
    "SharpnessForecast",
    "EdgeOfStability",
    "GradNormSpike",
    "LogitGrowth",
    "LossExplosion",
    "LossRegression",
    "LossSpike",
    "NonFiniteValues",
    "OnlineAlarms",
    "RankCollapse",
    "Rule",
    "SignCollapse",
    "TaylorForecast",
    "TaylorRatio",
    "Trigger",
    "check",
    "check_count",
    "check_number",
    "check_severity",
    "check_positive_int",
    "row_value",
    "collect_findings",
    "default_rules",
    "rule_names",
    "with_rules",
    "EarlyWarning",
    "early_warning",
    "loss_milestones",
    "rule_leads",
    "warning_leads",
]

# old name -> new name; each old name works for one release (docs/vocabulary.md)
__getattr__ = module_getattr(__name__, {"NonFinite": "NonFiniteValues"}, globals())
