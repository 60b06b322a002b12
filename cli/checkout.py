"""Make ``landscape_cli`` this checkout's ``cli/`` folder, whatever is installed.

The folder is the package ``landscape_cli`` only through an editable install, which maps it
to the checkout that was installed. A second checkout run with the first one's environment
(``PYTHONPATH=<checkout>``, or ``python -m cli`` from its root) would otherwise mix its own
``landscape`` with the installed checkout's commands (docs/architecture.md, "Writing code
here"). Used by ``python -m cli`` and by the test suite's ``conftest.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["use_this_checkout"]

_OWN = Path(__file__).resolve().parent


def use_this_checkout() -> None:
    """Import ``landscape_cli`` from this folder unless it already resolves here."""
    loaded = sys.modules.get("landscape_cli")
    if loaded is not None:
        if Path(loaded.__file__ or "").resolve().parent == _OWN:
            return
        raise RuntimeError(f"landscape_cli is already imported from {loaded.__file__}")
    found = importlib.util.find_spec("landscape_cli")
    if found is not None and found.origin and Path(found.origin).resolve().parent == _OWN:
        return
    spec = importlib.util.spec_from_file_location(
        "landscape_cli", _OWN / "__init__.py", submodule_search_locations=[str(_OWN)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["landscape_cli"] = module
    spec.loader.exec_module(module)
