"""``landscape check RUN``: the run's findings as a table; a non-zero exit as a gate.

Exit status: 0 when no finding reaches ``--fail-on``, 1 when one does (a job scheduler
or CI can stop or roll back the run), 2 with a one-line error when the run cannot be
checked (a missing or unreadable file, a bad option), so a gate can tell the two apart.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import click
from landscape_cli.app import CommandError, cli, input_errors, run_file_errors, verbose_option
from landscape_cli.options import (
    counted,
    findings_of,
    ignore_rule_option,
    json_safe,
    load_rule_specs,
    recompute_option,
    rules_option,
    unfinished_note,
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


def _as_json(f: Finding) -> dict:
    row = f.as_dict()
    row["value"] = json_safe(f.value)
    row["threshold"] = json_safe(f.threshold)
    # the rule's details (layer names, forecasts), as stored in the run file
    row["extra"] = json_safe(json.loads(json.dumps(f.extra, default=json_default)))
    return row


def _table(findings: list[Finding], width: int | None = None) -> list[str]:
    """The findings as aligned columns, each hint on a line of its own.

    ``width``: the terminal's columns, to wrap messages and hints within: in the message
    column when it keeps at least 30 characters, else on lines of their own under the
    row's other columns; None: no wrapping (a pipe or a log, where a finding stays one
    line that ``grep`` finds whole).
    """
    rows = [
        (str(f.step), f.severity, f.rule, f.metric, format_number(f.value),
         format_number(f.threshold), f.message)
        for f in findings
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLUMNS)]
    right = {0, 4, 5}
    start = sum(widths[:-1]) + 2 * (len(widths) - 1)  # where the message column begins
    indent = " " * (widths[0] + 2)
    below = width is not None and width - start < 30  # the message under its row
    if width is not None and not below:
        widths[-1] = min(widths[-1], width - start)
    columns = len(_COLUMNS) - 1 if below else len(_COLUMNS)

    def line(cells) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells[:columns], widths))
        ]
        return "  ".join(parts).rstrip()

    def wrapped(text: str, at: int) -> list[str]:
        if width is None:
            return [text]
        return textwrap.wrap(text, max(width - at, 20), break_on_hyphens=False) or [""]

    out = [line(_COLUMNS), line(["-" * w for w in widths])]
    for f, r in zip(findings, rows):
        if below:
            out.append(line(r))
            out.extend(indent + text for text in wrapped(r[-1], len(indent)))
        else:
            first, *more = wrapped(r[-1], start)
            out.append(line((*r[:-1], first)))
            out.extend(" " * start + text for text in more)
        if f.hint:
            out.extend(indent + text for text in wrapped(f"hint: {f.hint}", len(indent)))
    return out


def _print(found: list, failing: list, checked: dict, fail_on: str, as_json: bool,
           quiet: bool, unfinished: str | None, documents: list | None = None) -> None:
    """The findings table (or JSON) and the verdict line.

    ``checked``: the run's ``source``, ``last_step``, ``recomputed`` and ``writer``;
    ``unfinished``: why the run fails ``--require-finished`` (None: it does not);
    ``documents``: a list the JSON document joins instead of being printed (several runs).
    """
    counts = count_by_severity(found)
    if as_json:
        document = {"run": checked["source"], "fail_on": fail_on,
                    "failed": bool(failing) or unfinished is not None,
                    "failed_because": [
                        *([f"a finding at {fail_on} or worse"] if failing else []),
                        *([f"not finished (--require-finished): the run is {unfinished}"]
                          if unfinished else [])],
                    "counts": counts, "last_step": checked["last_step"],
                    "recomputed": checked["recomputed"],
                    "writer": checked["writer"],
                    "findings": [_as_json(f) for f in found]}
        if documents is None:
            click.echo(json.dumps(document, indent=2))
        else:
            documents.append(document)
        return
    if found and not quiet:
        terminal = sys.stdout.isatty()
        click.echo("\n".join(_table(found, shutil.get_terminal_size().columns
                                     if terminal else None)))
    detail = ", ".join(f"{counts[s]} {s}" for s in reversed(SEVERITIES))
    verdict = "FAIL" if failing or unfinished else "ok"
    why = "; not finished, --require-finished" if unfinished else ""  # the note says why
    click.echo(f"{checked['source']}: {counted(len(found), 'finding')} ({detail}); "
               f"{verdict} (fail on {fail_on} or worse{why})")


@cli.command(
    epilog="\b\nExit status:\n  0  no finding reaches --fail-on\n"
    "  1  a finding reaches --fail-on (or, with --require-finished,\n"
    "     the run's writer did not close RUN)\n"
    "  2  RUN cannot be checked (missing or unreadable file, bad option),\n"
    "     or the output cannot be written\n"
    "  130, 143  interrupted (Ctrl-C, SIGTERM)\n"
    "With several runs (sweep/*.h5): the worst of theirs (2, then 1, then 0).\n\n"
    "\b\nExample:\n  landscape check run.h5 --fail-on error"
)
@click.argument("run_paths", metavar="RUN...", nargs=-1, required=True, type=click.Path())
@click.option(
    "--fail-on", type=click.Choice(SEVERITIES), default="warning", show_default=True,
    help="Exit with status 1 when a finding has this severity or a more serious one.",
)
@recompute_option("List")
@rules_option
@ignore_rule_option
@click.option("--require-finished", is_flag=True,
              help="Fail (exit 1) unless the run's writer closed RUN at the end of training: "
                   "not while it is still being written, nor when training stopped on an "
                   "exception or a signal, nor when its writer was killed.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the findings as JSON (several runs: a list of documents).")
@click.option("-q", "--quiet", is_flag=True,
              help="Print only the verdict line (with --json: the whole document).")
@verbose_option
def check(run_paths: tuple[str, ...], fail_on: str, recompute: bool,
          rule_specs: tuple[str, ...], ignore: tuple[str, ...], require_finished: bool,
          as_json: bool, quiet: bool) -> None:
    """List the findings of RUN and exit 1 when one reaches the --fail-on severity.

    Findings are those stored in the file (written online by the monitor) and, with
    --recompute, those the alarm rules find on the whole run; a finding is reported
    once per (step, rule, metric). A RUN that cannot be read, or holds no row yet, exits 2,
    not 1. Several runs (a sweep: sweep/*.h5) are checked one after another, each with its
    table and verdict line, then one line of totals; one that cannot be read is named on
    stderr and the others are still checked.
    """
    with input_errors(EXIT_INPUT):  # a rules module that cannot be loaded: exit 2
        rules = load_rule_specs(rule_specs, recompute)
    if len(run_paths) == 1:
        code = _check_one(run_paths[0], fail_on, recompute, rules, ignore, require_finished,
                          as_json, quiet)
        if code:
            click.get_current_context().exit(code)
        return
    known = _rules_of_runs(run_paths, rules) if ignore else None
    codes, documents = [], []
    unique: dict[Path, str] = {}  # a run given twice (run.h5 ./run.h5) is checked once
    for path in run_paths:
        unique.setdefault(Path(path).resolve(), path)
    for path in unique.values():
        try:
            codes.append(_check_one(path, fail_on, recompute, rules, ignore, require_finished,
                                    as_json, quiet, known, documents))
        except click.BadParameter:  # an option (--ignore-rule), not a run: the same for all
            raise
        except click.ClickException as err:  # this run only: named, and the others go on
            codes.append(err.exit_code)
            err.show()  # on stderr, with --json too: stdout holds the JSON alone
            if as_json:
                documents.append({"run": path, "error": err.format_message()})
    if as_json:
        click.echo(json.dumps(documents, indent=2))
    else:
        failed = sum(c == EXIT_FINDINGS for c in codes)
        unreadable = sum(c not in (0, EXIT_FINDINGS) for c in codes)
        click.echo(f"{counted(len(codes), 'run')}: {len(codes) - failed - unreadable} ok, "
                   f"{failed} FAIL" + (f", {unreadable} not checked" if unreadable else ""))
    worst = max(codes, key=lambda c: (c == EXIT_INPUT, c == EXIT_FINDINGS, c))
    if worst:
        click.get_current_context().exit(worst)


def _rules_of_runs(run_paths: tuple[str, ...], rules: list | None) -> set[str]:
    """The rules of every readable run: ``--ignore-rule`` may name one of any of them."""
    from landscape.alarms import rule_names

    known: set[str] = set()
    for path in run_paths:
        try:
            with Run.open(path) as run:
                known |= rule_names(run, rules)
        except Exception:  # an unreadable run is named when it is checked
            continue
    return known


def _check_one(run_path: str, fail_on: str, recompute: bool, rules: list | None,
               ignore: tuple[str, ...], require_finished: bool, as_json: bool, quiet: bool,
               known: set[str] | None = None, documents: list | None = None) -> int:
    """Check one run: print its table (or JSON) and verdict; its exit status.

    ``documents``: where several runs collect their JSON documents (printed together);
    None prints this run's at once.

    Raises:
        CommandError: the run cannot be checked (exit 2).
    """
    try:
        with input_errors(EXIT_INPUT), run_file_errors(run_path, EXIT_INPUT), \
                Run.open(run_path) as run:
            # (a damaged config attribute: 2, as info and report say)
            config = run.config
            alarms_off = isinstance(config, dict) and config.get("alarms") == "off"
            # the state before the rows: a writer that closes while the rules run wrote
            # rows this reader did not see, so the run is not called finished
            status = run.writer_status()
            found = findings_of(run, recompute, rules, quiet or as_json, ignore, known)
            recorded = run.recorded()
            checked = {"source": run.source, "last_step": run.last_step(),
                       "recomputed": recompute,
                       "writer": None if status is None else status.to_json()}
    except OSError as err:  # one without a system error behind it (h5py's own)
        raise CommandError(f"{run_path}: cannot be read as a run file "
                           f"({type(err).__name__}: {err})", EXIT_INPUT) from None
    if not recompute and alarms_off:  # --stored: no rule ran, so nothing could be stored
        raise CommandError(
            f"{run_path}: its monitor started with alarms=False (the run's config, which "
            "a resume keeps), so the stored findings do not cover its rows and --stored "
            "cannot gate it; drop --stored to evaluate the rules on its rows", EXIT_INPUT)
    if not recorded and not found:  # a gate must not pass a job that recorded nothing
        why = ("the run stopped before its first flush, or has not started"
               if status is None else f"the run is {status.describe()}")
        raise CommandError(f"{run_path}: no rows recorded, nothing to check ({why})",
                           EXIT_INPUT)
    state = None if status is None or status.finished else status.describe()
    if state:  # the rows alone do not tell a killed or live run from a finished one
        click.echo(unfinished_note(checked["source"], status, checked["last_step"], "checked"),
                   err=True)
    failing = at_or_above(found, fail_on)
    unfinished = state if require_finished else None
    try:  # exit 1 means a finding: an output that cannot be written is 2, as input errors
        with input_errors(EXIT_INPUT):
            _print(found, failing, checked, fail_on, as_json, quiet, unfinished, documents)
            sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (| head): quietly, as click does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(EXIT_INPUT) from None
    return EXIT_FINDINGS if failing or unfinished else 0
