"""Documentation stays in step: relative links resolve, Python snippets compile, every command
and public name the docs mention exists."""

import re
from pathlib import Path

import pytest
from landscape_cli.main import cli

import landscape as ls

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
if (ROOT / "examples" / "README.md").exists():
    PAGES.append(ROOT / "examples" / "README.md")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PYTHON = re.compile(r"```python\n(.*?)```", re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name}: broken link {target}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_snippets_compile(page):
    for i, block in enumerate(PYTHON.findall(page.read_text())):
        compile(block, f"{page.name}[{i}]", "exec")


def test_readme_commands_and_names_exist():
    text = (ROOT / "README.md").read_text()
    for command in set(re.findall(r"^landscape (\w+)", text, re.M)):
        assert command in cli.list_commands(None), command
    for name in set(re.findall(r"\bls\.(\w+)", text)):
        assert hasattr(ls, name), name
