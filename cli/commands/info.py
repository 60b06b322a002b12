"""``landscape info RUN``: what a run file holds."""

from __future__ import annotations

import json

import click
from landscape_cli.app import cli, run_file_errors, verbose_option
from landscape_cli.options import counted, json_safe

from landscape.store import FieldSpec, Run
from landscape.store.format import MONITOR_TABLES
from landscape.store.reader import surface_source
from landscape.store.writer_status import WriterStatus


@cli.command(epilog="\b\nExample:\n  landscape info run.h5")
@click.argument("run_path", metavar="RUN", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@verbose_option
def info(run_path: str, as_json: bool) -> None:
    """Show the metrics, fields, step ranges, findings and surfaces of RUN."""
    with run_file_errors(run_path), Run.open(run_path) as run:
        summary = run.summary()
    if as_json:  # strict JSON: a NaN in a config is "nan", as check --json writes it
        click.echo(json.dumps(json_safe(summary), indent=2, default=str, allow_nan=False))
        return
    click.echo(f"{summary['source']}")
    click.echo(
        f"  format version {summary['format_version']}, written by landscape "
        f"{summary['library_version']} (torch {summary['torch_version']}) on {summary['created']}"
    )
    if summary["writer"] is not None:
        click.echo(f"  state: {WriterStatus(**summary['writer']).describe()}")
    if summary["config"]:
        click.echo(f"  config: {json.dumps(summary['config'], default=str)}")
    own = [n for n, m in summary["metrics"].items()  # not metrics: the monitor's records
           if n in MONITOR_TABLES and m.get("class") == "landscape.monitor.Monitor"]
    click.echo(f"  metrics: {len(summary['metrics']) - len(own)}"
               + (f" (and the monitor's own {', '.join(own)})" if own else ""))
    for name, m in sorted(summary["metrics"].items(), key=lambda item: item[0] in own):
        span = "no rows" if not m["rows"] else f"steps {m['first_step']}..{m['last_step']}"
        fields = ", ".join(f"{f} {FieldSpec.from_json(s)}" for f, s in m["fields"].items())
        schedule = f", schedule {m['schedule']}" if m.get("schedule") else ""
        click.echo(f"    {name}: {counted(m['rows'], 'row')}, {span}{schedule}; fields: {fields}")
    # the stored ones: check, report and plot evaluate the rules again over the whole run
    click.echo(f"  findings stored: {summary['findings']} (raised while the run was written; "
               "landscape check evaluates the rules on the whole run)")
    click.echo(f"  checkpoints: {summary['checkpoints']}")
    click.echo(f"  surfaces: {len(summary['surfaces'])}")
    for name, s in summary["surfaces"].items():
        shape = "x".join(map(str, s["shape"][::-1]))  # x by y, as `surface` prints it
        grid = f"{shape} grid" if len(s["shape"]) > 1 else f"line of {shape} points"
        click.echo(
            f"    {name}: {grid}, {s['computed']}/{s['total']} points computed; "
            f"fields: {', '.join(s['fields'])}"
        )
        origin = surface_source(s.get("source"))  # what `landscape surface` computed it from
        if origin:
            click.echo(f"      from {origin}")
