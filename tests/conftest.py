"""Test-session settings shared by every test module."""

import importlib.util
import sys
from pathlib import Path

import torch

# The suite runs as `pytest -n 2` on 2 cores: one intra-op thread per worker avoids
# oversubscription (which slows small-tensor code by an order of magnitude). Results do
# not depend on it.
torch.set_num_threads(1)


def _this_checkouts_cli() -> None:
    """Import ``landscape_cli`` from this checkout's ``cli/`` folder.

    The package is the folder ``cli/`` only through an editable install, which maps it to
    the checkout that was installed: a second checkout tested with ``PYTHONPATH`` and the
    same environment would test the first one's commands (docs/architecture.md).
    """
    own = Path(__file__).resolve().parents[1] / "cli"
    found = importlib.util.find_spec("landscape_cli")
    if found is not None and found.origin and Path(found.origin).resolve().parent == own:
        return
    spec = importlib.util.spec_from_file_location(
        "landscape_cli", own / "__init__.py", submodule_search_locations=[str(own)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["landscape_cli"] = module
    spec.loader.exec_module(module)


_this_checkouts_cli()
