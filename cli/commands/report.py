"""``landscape report RUN -o report.html``: one self-contained HTML report."""

from __future__ import annotations

from pathlib import Path

import click
from landscape_cli.app import cli, run_file_errors, verbose_option
from landscape_cli.options import (
    counted,
    findings_of,
    flag_pair,
    ignore_rule_option,
    load_rule_specs,
    named_output,
    output_directory,
    recompute_option,
    rules_option,
    unfinished_note,
)

from landscape.findings import count_by_severity
from landscape.plotting.timelines import metrics_with_rows
from landscape.report import check_report_target, report_path, write_report
from landscape.store import Run


@cli.command(epilog="\b\nExample:\n  landscape report run.h5 -o report.html")
@click.argument("run_paths", metavar="RUN", nargs=-1, required=True, type=click.Path())
@click.option(
    "-o", "--out", default="report.html", show_default=True, type=click.Path(),
    callback=named_output,
    help="The HTML file to write, or a directory (existing, or ending in /; created like "
    "plot's) to write report.html into.",
)
@click.option("--title", help="Title of the report (default: from the run's file name).")
@flag_pair("--log/--linear", None,
           help="Logarithmic (or linear) y axes on every timeline, log10 of the surfaces "
                "(default: logarithmic where a field's positive values span two decades "
                "or more).")
@recompute_option("List")
@rules_option
@ignore_rule_option
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@verbose_option
def report(run_paths: tuple[str, ...], out: str, title: str | None, log: bool | None,
           recompute: bool, rule_specs: tuple[str, ...], ignore: tuple[str, ...],
           quiet: bool):
    """Write an HTML report of RUN: summary, findings, timelines, surfaces, configuration.

    Every plot is embedded in the file, which needs nothing else to be viewed. Metrics
    without rows yet get no timeline (the report names them in one line).
    """
    if len(run_paths) > 1:  # click said "Got unexpected extra argument"
        raise click.UsageError(
            f"a report is of one RUN, got {len(run_paths)}: name its file with -o FILE.html; "
            "to compare runs, plot them together: landscape plot RUN1 RUN2 ... -o DIR/")
    run_path = run_paths[0]
    target = report_path(out)
    rules = load_rule_specs(rule_specs, recompute)
    if target == Path(out):  # a file named: checked before the work (a directory: created)
        check_report_target(target)
    with run_file_errors(run_path), Run.open(run_path) as run:
        status = run.writer_status()  # before the rows, as check reads it
        found = findings_of(run, recompute, rules, quiet, ignore)
        if target != Path(out):  # a directory: created as plot creates its output directory
            output_directory(target.parent)
        path = write_report(run, target, title=title, findings=found, log=log,
                            ignored_rules=ignore)
        n_metrics, n_surfaces = len(metrics_with_rows(run)), len(run.surfaces())
        note = unfinished_note(run.source, status, run.last_step(), "reported")
    if note and not quiet:
        click.echo(note, err=True)
    if not quiet:
        if not n_metrics and not n_surfaces and not found:  # (check exits 2 on such a run)
            click.echo(f"note: {run_path} holds no rows, surfaces or findings yet: the "
                       "report shows its configuration only", err=True)
        counts = count_by_severity(found)
        detail = ", ".join(f"{counts[s]} {s}" for s in ("error", "warning", "info") if counts[s])
        click.echo(
            f"wrote {path}: {counted(n_metrics, 'timeline')}, "
            f"{counted(n_surfaces, 'surface')}, {counted(len(found), 'finding')}"
            + (f" ({detail})" if detail else "")
        )
