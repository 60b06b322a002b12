"""The hand-kept lists of built-in metrics and rules agree with the registries.

A built-in touches several lists (docs/architecture.md, "Adding a built-in"); each test
here fails when one of them is forgotten, so the checklist is checked, not only written.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import landscape as ls
from landscape.alarms import RULES
from landscape.metrics.base import _REGISTRY

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _built_ins() -> dict[str, type]:
    """The registry's metrics defined in the package (tests register their own too)."""
    return {n: c for n, c in _REGISTRY.items() if c.__module__.startswith("landscape.")}

MONITOR_MD = (DOCS / "monitor.md").read_text()
ALARMS_MD = (DOCS / "alarms.md").read_text()


def _table_row(text: str, first_cells: str) -> list[str]:
    """The cells of the markdown table row that starts with ``first_cells``."""
    for line in text.splitlines():
        if line.startswith(f"| {first_cells} |"):
            return [c.strip() for c in line.strip().strip("|").split(" | ")]
    raise AssertionError(f"no table row starts with {first_cells!r}")


@pytest.mark.parametrize("name", sorted(_built_ins()))
def test_every_built_in_metric_has_its_row_in_the_metric_table_of_monitor_md(name):
    cls = _built_ins()[name]
    cells = _table_row(MONITOR_MD, f"`{cls.__name__}` | `{name}`")
    fields, schedule = cells[2], cells[4]
    for field in cls.FIELDS:
        assert re.search(rf"\b{field}\b", fields), f"{name}: field {field} not in {fields!r}"
    assert schedule == str(cls.default_schedule), name


@pytest.mark.parametrize("name", sorted(_built_ins()))
def test_every_built_in_metric_is_exported_by_its_module_and_the_package(name):
    cls = _built_ins()[name]
    assert cls.__name__ in importlib.import_module(cls.__module__).__all__
    assert getattr(ls.metrics, cls.__name__) is cls
    assert cls.__name__ in ls.metrics.__all__


def test_the_preset_table_of_monitor_md_is_the_presets():
    header = _table_row(MONITOR_MD, "metric")
    presets = [re.match(r"`(\w+)`", cell).group(1) for cell in header[1:]]
    assert sorted(presets) == sorted(ls.metrics.PRESETS)
    documented: dict[str, dict[str, str]] = {p: {} for p in presets}
    for name in _built_ins():
        for preset, cell in zip(presets, _table_row(MONITOR_MD, f"`{name}`")[1:]):
            if cell != "—":
                documented[preset][name] = cell.strip("`")
    assert documented == ls.metrics.PRESETS


def test_the_monitor_options_of_integrations_md_are_the_callbacks_options():
    from landscape.integrations.options import MonitorOptions

    text = " ".join((DOCS / "integrations.md").read_text().split())
    listed = re.search(r"`monitor_options` are (.+?), passed to `Monitor` unchanged", text)
    assert listed, "integrations.md lists the monitor_options"
    names = set(re.findall(r"`(\w+)`(?! \()", re.sub(r"\([^)]*\)", "", listed.group(1))))
    assert names == set(MonitorOptions.__annotations__)


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_built_in_rule_is_exported_and_documented_in_alarms_md(name):
    cls = RULES[name]
    assert cls.__name__ in importlib.import_module(cls.__module__).__all__
    assert getattr(ls.alarms, cls.__name__) is cls and cls.__name__ in ls.alarms.__all__
    _table_row(ALARMS_MD, f"`{name}` (`{cls.__name__}`)")  # the rules table
    assert f"\n### `{name}`\n" in ALARMS_MD, f"no section for {name} in alarms.md"
    where = _table_row(ALARMS_MD, f"`{cls.__module__}`")  # "Where the code lives"
    assert f"`{cls.__name__}`" in where[1], (cls.__module__, where)


def test_the_monitor_s_lists_of_metrics_that_call_the_model_or_not_name_built_ins():
    """MODEL_FREE_METRICS and CALL_THE_MODEL (the warning for a model without forward())
    are hand-kept lists of names (docs/architecture.md's checklist names them)."""
    from landscape.monitor.arguments import CALL_THE_MODEL, MODEL_FREE_METRICS

    assert MODEL_FREE_METRICS <= set(_built_ins()) and CALL_THE_MODEL <= set(_built_ins())
    assert not MODEL_FREE_METRICS & CALL_THE_MODEL
    checklist = " ".join((DOCS / "architecture.md").read_text().split())
    assert "`MODEL_FREE_METRICS` in `landscape/monitor/arguments.py`" in checklist
    assert "`CALL_THE_MODEL`" in checklist
