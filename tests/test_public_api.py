"""Every name a package of ``landscape`` lists in ``__all__`` resolves, and the layout rules hold.

The import-layer rules are those of docs/architecture.md: pure math never imports the layers
above it, and the library never imports the CLI.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import warnings
from pathlib import Path

import pytest

import landscape

ROOT = Path(landscape.__file__).parent


def _modules() -> list[str]:
    names = ["landscape"]
    for info in pkgutil.walk_packages([str(ROOT)], prefix="landscape."):
        names.append(info.name)
    return sorted(names)


MODULES = _modules()


def test_the_package_tree_is_found():
    for expected in ("landscape.alarms", "landscape.store", "landscape.metrics",
                     "landscape.curvature", "landscape.functional", "landscape.surface"):
        assert expected in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_every_public_name_resolves(name):
    if name.startswith("landscape.integrations.") and name != "landscape.integrations":
        # the framework adapters import lightning / transformers; they have their own tests
        pytest.importorskip("lightning" if name.endswith("lightning") else "transformers")
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        return
    assert len(exported) == len(set(exported)), f"{name}.__all__ lists a name twice"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # __all__ holds no deprecated alias
        for attr in exported:
            assert getattr(module, attr) is not None, f"{name}.{attr}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "landscape":  # from landscape import metrics
                found.update(f"landscape.{a.name}" for a in node.names)
    return found


# the small shared helpers (architecture.md, the table's last rows): torch, numpy and
# each other only
HELPERS = ("params", "_sums", "_checks", "batches", "isolation", "capture", "schedules",
           "distributed", "findings", "_errors", "_names", "_deprecation", "_hf",
           "_interrupts", "_progress", "failures")
UPPER = ("landscape.monitor", "landscape.metrics", "landscape.alarms", "landscape.store",
         "landscape.surface", "landscape.curvature", "landscape.functional",
         "landscape.analysis", "landscape.checkpoints", "landscape.loading",
         "landscape.integrations", "landscape.report", "landscape.plotting",
         "landscape.demo", "landscape_cli")


@pytest.mark.parametrize("helper", HELPERS)
def test_the_shared_helpers_import_no_package_above_them(helper):
    path = ROOT / f"{helper}.py"
    above = sorted(m for m in _imports(path) if m.startswith(UPPER))
    assert not above, f"{path.relative_to(ROOT.parent)} imports {above}"


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        # pure tensor math: no monitor, store, alarms, metrics, CLI
        ("functional", ("landscape.monitor", "landscape.store", "landscape.alarms",
                        "landscape.metrics", "landscape_cli")),
        ("curvature", ("landscape.monitor", "landscape.store", "landscape.alarms",
                       "landscape.metrics", "landscape_cli")),
        # the file format knows nothing of how rows are computed
        ("store", ("landscape.monitor", "landscape.metrics", "landscape.curvature",
                   "landscape.alarms", "landscape_cli")),
        # rules read rows; they never compute metrics
        ("alarms", ("landscape.monitor", "landscape.metrics", "landscape.curvature",
                    "landscape_cli")),
        ("metrics", ("landscape.monitor", "landscape_cli")),
    ],
)
def test_layers_import_only_downwards(package, forbidden):
    for path in sorted((ROOT / package).rglob("*.py")):
        for imported in _imports(path):
            assert not imported.startswith(forbidden), (
                f"{path.relative_to(ROOT.parent)} imports {imported}"
            )


def test_the_library_never_imports_the_cli():
    for path in sorted(ROOT.rglob("*.py")):
        assert not any(m.startswith("landscape_cli") for m in _imports(path)), path


def test_every_package_folder_is_in_the_wheel():
    """pyproject.toml lists the packages by hand: a folder left out is missing from a wheel.

    An editable install imports it anyway, so only this comparison catches the omission
    (``landscape.checkpoints`` was missing: ``landscape analyze`` failed from a wheel).
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
        import tomli as tomllib
    repo = ROOT.parent
    setuptools = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = {"landscape": repo / "landscape", "landscape_cli": repo / "cli"}
    found = set()
    for top, folder in folders.items():
        assert setuptools["package-dir"][top] == folder.name
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            found.add(".".join((top, *parts)))
    assert found - listed == set(), "add these to [tool.setuptools] packages"
    assert listed - found == set(), "listed in pyproject.toml, but no such package"
