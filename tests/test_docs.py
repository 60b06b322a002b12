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


def _synopsis(command: str) -> str:
    """The row of ``command`` in docs/cli.md's table of commands."""
    rows = [line for line in (ROOT / "docs" / "cli.md").read_text().splitlines()
            if line.startswith(f"| `landscape {command} ")]
    assert len(rows) == 1, f"docs/cli.md: no synopsis row for {command}"
    return rows[0]


@pytest.mark.parametrize("command", sorted(cli.list_commands(None)))
def test_every_option_of_a_command_is_in_its_synopsis_in_cli_md(command):
    """The table's rows of analyze and surface had drifted (a dozen options missing)."""
    import click

    row = _synopsis(command)
    ctx = click.Context(cli)
    for param in cli.get_command(ctx, command).params:
        if not isinstance(param, click.Option) or param.name in ("verbose", "help"):
            continue
        names = [*param.opts, *param.secondary_opts]
        if param.name == "quiet" and command not in ("check",):
            continue  # -q: the same on every command, said once above the table
        assert any(re.search(rf"{re.escape(n)}\b", row) for n in names), (command, names)


@pytest.mark.parametrize("command", sorted(cli.list_commands(None)))
def test_the_choices_a_synopsis_lists_are_the_options_choices(command):
    """Only option names were checked: a choice left out of a row (or one that no longer
    exists) passed (newcomer audit)."""
    import click

    row = _synopsis(command).replace("\\|", "|")
    ctx = click.Context(cli)
    for param in cli.get_command(ctx, command).params:
        if not isinstance(param, click.Option) or not isinstance(param.type, click.Choice):
            continue
        for name in param.opts:
            listed = re.search(rf"{re.escape(name)} ([\w.-]+(?:\|[\w.-]+)+)", row)
            if listed:
                assert set(listed.group(1).split("|")) == {str(c) for c in param.type.choices}, (
                    command, name, listed.group(1))


def _documented_signature(text: str) -> list[tuple[str, str, object]]:
    """``(name, kind, default)`` of each parameter of ``Name(params)`` as a page writes it."""
    import ast

    params = ast.parse(f"def f({text}): pass").body[0].args
    out = []
    defaults = [None] * (len(params.args) - len(params.defaults)) + list(params.defaults)
    for a, d in zip(params.args, defaults):
        out.append((a.arg, "POSITIONAL_OR_KEYWORD", _NONE if d is None else ast.literal_eval(d)))
    for a, d in zip(params.kwonlyargs, params.kw_defaults):
        out.append((a.arg, "KEYWORD_ONLY", _NONE if d is None else ast.literal_eval(d)))
    return out


_NONE = object()  # no default (a default of None is None)


def test_the_mirror_table_gives_each_mirrors_signature():
    import inspect

    from landscape.integrations import mirrors

    text = (ROOT / "docs" / "integrations.md").read_text()
    rows = re.findall(r"^\| `(\w+Mirror)\((.*?)\)` \|", text, re.M)
    assert {name for name, _ in rows} >= {"TensorBoardMirror", "WandbMirror", "MLflowMirror",
                                          "LightningLoggerMirror"}
    for name, params in rows:
        real = inspect.signature(getattr(mirrors, name))
        actual = [(p.name, p.kind.name, _NONE if p.default is p.empty else p.default)
                  for p in real.parameters.values()]
        assert _documented_signature(params) == actual, name
