"""``landscape check RUN``: the run's findings as a table; a non-zero exit as a gate.

Exit status: 0 when no finding reaches ``--fail-on``, 1 when one does (a job scheduler
or CI can stop or roll back the run), 2 with a one-line error when the run cannot be
checked (a missing or unreadable file, a bad option), so a gate can tell the two apart.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import click
from landscape_cli.app import CommandError, cli, input_errors, run_file_errors, verbose_option
from landscape_cli.options import (
    counted,
    findings_of,
    load_rule_specs,
    recompute_option,
    rules_option,
)

from landscape.findings import (
    SEVERITIES,
    Finding,
    at_or_above,
    count_by_severity,
    format_number,
)
from landscape.store import Run
from landscape.store.format import json_default

EXIT_FINDINGS = 1
"""Exit status when a finding reaches ``--fail-on``."""
EXIT_INPUT = 2
"""Exit status when the run cannot be checked (click's usage errors are 2 as well)."""

_COLUMNS = ("step", "severity", "rule", "metric", "value", "threshold", "message")


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else format_number(value)


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings, as ``value`` and ``threshold`` are."""
    if isinstance(value, float):
        return _json_number(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _as_json(f: Finding) -> dict:
    row = f.as_dict()
    row["value"] = _json_number(f.value)
    row["threshold"] = _json_number(f.threshold)
    # the rule's details (layer names, forecasts), as stored in the run file
    row["extra"] = _json_safe(json.loads(json.dumps(f.extra, default=json_default)))
    return row


def _table(findings: list[Finding]) -> list[str]:
    rows = [
        (str(f.step), f.severity, f.rule, f.metric, format_number(f.value),
         format_number(f.threshold), f.message)
        for f in findings
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLUMNS)]
    right = {0, 4, 5}

    def line(cells) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "  ".join(parts).rstrip()

    out = [line(_COLUMNS), line(["-" * w for w in widths])]
    indent = " " * (widths[0] + 2)
    for f, r in zip(findings, rows):
        out.append(line(r))
        if f.hint:
            out.append(f"{indent}hint: {f.hint}")
    return out


def _print(found: list, failing: list, source: str, fail_on: str, as_json: bool,
           quiet: bool) -> None:
    """The findings table (or JSON) and the verdict line."""
    counts = count_by_severity(found)
    if as_json:
        click.echo(json.dumps({"run": source, "fail_on": fail_on, "failed": bool(failing),
                               "counts": counts, "findings": [_as_json(f) for f in found]},
                              indent=2))
        return
    if found and not quiet:
        click.echo("\n".join(_table(found)))
    detail = ", ".join(f"{counts[s]} {s}" for s in reversed(SEVERITIES))
    verdict = "FAIL" if failing else "ok"
    click.echo(f"{source}: {counted(len(found), 'finding')} ({detail}); "
               f"{verdict} (fail on {fail_on} or worse)")


@cli.command(
    epilog="\b\nExit status:\n  0  no finding reaches --fail-on\n"
    "  1  a finding reaches --fail-on\n"
    "  2  RUN cannot be checked (missing or unreadable file, bad option),\n"
    "     or the output cannot be written\n\n"
    "\b\nExample:\n  landscape check run.h5 --fail-on error"
)
@click.argument("run_path", metavar="RUN", type=click.Path())
@click.option(
    "--fail-on", type=click.Choice(SEVERITIES), default="warning", show_default=True,
    help="Exit with status 1 when a finding has this severity or a more serious one.",
)
@recompute_option("List")
@rules_option
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option("-q", "--quiet", is_flag=True,
              help="Print only the verdict line (with --json: the whole document).")
@verbose_option
def check(run_path: str, fail_on: str, recompute: bool, rule_specs: tuple[str, ...],
          as_json: bool, quiet: bool) -> None:
    """List the findings of RUN and exit 1 when one reaches the --fail-on severity.

    Findings are those stored in the file (written online by the monitor) and, with
    --recompute, those the alarm rules find on the whole run; a finding is reported
    once per (step, rule, metric). A RUN that cannot be read, or holds no row yet, exits 2,
    not 1.
    """
    with input_errors(EXIT_INPUT):  # a rules module that cannot be loaded: exit 2
        rules = load_rule_specs(rule_specs, recompute)
    try:
        with input_errors(EXIT_INPUT), run_file_errors(run_path, EXIT_INPUT), \
                Run.open(run_path) as run:
            run.config  # noqa: B018 (a damaged config attribute: 2, as info and report say)
            found = findings_of(run, recompute, rules, quiet or as_json)
            source = run.source
            recorded = run.recorded()
    except OSError as err:  # one without a system error behind it (h5py's own)
        raise CommandError(f"{run_path}: cannot be read as a run file "
                           f"({type(err).__name__}: {err})", EXIT_INPUT) from None
    if not recorded and not found:  # a gate must not pass a job that recorded nothing
        raise CommandError(f"{run_path}: no rows recorded, nothing to check (the run stopped "
                           "before its first flush, or has not started)", EXIT_INPUT)
    failing = at_or_above(found, fail_on)
    try:  # exit 1 means a finding: an output that cannot be written is 2, as input errors
        with input_errors(EXIT_INPUT):
            _print(found, failing, source, fail_on, as_json, quiet)
            sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (| head): quietly, as click does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(EXIT_INPUT) from None
    if failing:
        click.get_current_context().exit(EXIT_FINDINGS)
