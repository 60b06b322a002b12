"""The worked examples of docs/architecture.md run as written (add a metric, a rule, a
curvature operator, a command)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
BLOCK = re.compile(r"```python\n# architecture example: (\w+)\n(.*?)```", re.S)


def _examples() -> dict[str, str]:
    return {name: code for name, code in BLOCK.findall(PAGE.read_text())}


def test_the_page_has_the_four_examples():
    assert set(_examples()) == {"metric", "rule", "operator", "command"}


def test_the_examples_run_in_order(tmp_path):
    """One test, in the page's order: the later examples read the run file the first one
    writes. As four parametrized tests, pytest-xdist could hand 'command' to a worker that
    had not run 'metric' (its run file missing)."""
    run_path = str(tmp_path / "run.h5")
    for name in ("metric", "rule", "operator", "command"):
        module = types.ModuleType(f"architecture_example_{name}")  # dataclasses need one
        module.RUN_PATH = run_path
        sys.modules[module.__name__] = module
        try:
            code = compile(_examples()[name], f"docs/architecture.md[{name}]", "exec")
            exec(code, module.__dict__)
        finally:
            del sys.modules[module.__name__]
