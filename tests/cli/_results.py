"""Assertions on the results of ``CliRunner.invoke``: how a command reports a user mistake."""

from __future__ import annotations


def one_line_error(result, *fragments):
    """A failure whose whole stderr is one ``Error:`` line naming every fragment."""
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for f in fragments:
        assert f in lines[0], lines[0]
    assert "Traceback" not in result.output


def error_line(result, *fragments, no_warnings=False):
    """Exit 1 with one ``Error:`` line naming every fragment among other lines of stderr.

    For commands that print progress and warnings before they fail (``analyze``,
    ``surface``); ``no_warnings``: and no ``warning:`` line (progress bars are left out).
    """
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and "it/s" not in ln]
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 1 and all(f in errors[0] for f in fragments), result.stderr
    if no_warnings:
        assert not [ln for ln in lines if ln.startswith("warning:")], result.stderr


def usage_error(result, *fragments):
    """Click's usage error: exit 2, the usage line, then one ``Error:`` line."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Usage: "), result.stderr
    assert lines[-1].startswith("Error: ") and all(f in lines[-1] for f in fragments), lines
    assert "Traceback" not in result.output
