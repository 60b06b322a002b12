"""The worked examples of docs/architecture.md run as written (add a metric, a rule, a
curvature operator, a command)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
BLOCK = re.compile(r"```python\n# architecture example: (\w+)\n(.*?)```", re.S)


def _examples() -> dict[str, str]:
    return {name: code for name, code in BLOCK.findall(PAGE.read_text())}


def test_the_page_has_the_four_examples():
    assert set(_examples()) == {"metric", "rule", "operator", "command"}


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    return str(tmp_path_factory.mktemp("architecture") / "run.h5")


# in order: later ones reuse the run file of the first
@pytest.mark.parametrize("name", ["metric", "rule", "operator", "command"])
def test_example_runs(name, run_path):
    module = types.ModuleType(f"architecture_example_{name}")  # dataclasses need a real module
    module.RUN_PATH = run_path
    sys.modules[module.__name__] = module
    try:
        code = compile(_examples()[name], f"docs/architecture.md[{name}]", "exec")
        exec(code, module.__dict__)
    finally:
        del sys.modules[module.__name__]
