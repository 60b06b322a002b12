"""``landscape watch RUN``: a live view of a run that is being written.

Every ``--interval`` seconds the run is opened in SWMR read mode, the rows and findings
committed since the last look are printed (the latest row of each metric that grew, and
every new finding), and the file is closed again. Not holding the file open between
looks matters: a writer that declares a metric or creates a surface briefly reopens the
file without SWMR, which an open reader's file lock would make fail, and the monitor
must never be disturbed by someone watching. Reopening also shows metric groups created
after the watch started, which a long-lived SWMR reader does not see.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np
from landscape_cli.app import CommandError, cli, run_file_errors, verbose_option
from landscape_cli.options import FiniteFloatRange

from landscape._errors import RunFileError
from landscape.findings import format_number
from landscape.store import Run
from landscape.store.recovery import holds_nothing
from landscape.store.writer_status import WriterStatus

EXIT_TIMED_OUT = 124
"""Exit status of ``--until-finished`` when ``--timeout`` runs out first (as ``timeout(1)``)."""

# seams for tests (no wall clock in the test suite)
_sleep = time.sleep
_clock = time.monotonic

_MAX_COMPONENTS = 4
MIN_INTERVAL = 0.01
"""The shortest ``--interval`` (seconds): 0 would read the file in a busy loop."""


def _format_value(value: np.ndarray | str) -> str:
    if isinstance(value, str):  # a string field (Run.series decodes them)
        return repr(value)
    arr = np.asarray(value)
    if arr.ndim == 0:
        return format_number(float(arr))
    flat = arr.reshape(-1).astype(np.float64)
    shown = ", ".join(format_number(float(v)) for v in flat[:_MAX_COMPONENTS])
    more = f", ... ({flat.size})" if flat.size > _MAX_COMPONENTS else ""
    return f"[{shown}{more}]"


FIRST_FINDINGS = 20
"""The latest findings the first look at a run prints (later looks print every new one)."""


class _View:
    """What has been printed so far: committed rows per metric and the number of findings."""

    def __init__(self, metrics: tuple[str, ...]) -> None:
        self.selected = metrics
        self.rows: dict[str, int] = {}
        self.findings = 0

    def _shows(self, metric: str) -> bool:
        """Whether a finding on ``metric`` (``name`` or ``name/field``) concerns the selection."""
        return not self.selected or metric.split("/", 1)[0] in self.selected

    def update(self, run: Run, *, first: bool) -> list[str]:
        """Lines describing what ``run`` committed since the last update (all or nothing)."""
        lines: list[str] = []
        rows = dict(self.rows)
        names = [m for m in self.selected if m in run.metrics()] if self.selected else run.metrics()
        for m in names:  # the last row only: a look costs the same at any run length
            n = run.rows(m)
            seen = rows.get(m)
            if seen is None and not first:
                lines.append(f"new metric {m}")
            seen = seen or 0
            if n < seen:
                lines.append(f"{m}: the run restarted ({seen} rows before, {n} now)")
                seen = 0
            rows[m] = n
            if n > seen:
                step, row = run.last_row(m)
                values = "  ".join(f"{name}={_format_value(v)}" for name, v in row.items())
                lines.append(f"{m}  step {step}  (+{n - seen})  {values}")
        # those added since the last look (fewer than seen: the run restarted); the first
        # look at a long run shows the latest few, not thousands of lines
        count = run.finding_count()
        start = self.findings if count >= self.findings else 0
        if first and count - start > FIRST_FINDINGS:
            lines.append(f"({count - FIRST_FINDINGS - start} earlier findings not shown; "
                         "`landscape check RUN --stored` lists them all)")
            start = count - FIRST_FINDINGS
        found = run.findings(start=start)
        lines.extend(f"finding {f.describe()}" for f in found if self._shows(f.metric))
        self.rows, self.findings = rows, start + len(found)
        return lines


def _wait_for(run_path: str, interval: float, timeout: float | None, quiet: bool,
              until_finished: bool = False) -> float:
    """Wait until ``run_path`` exists (a training job may not have created it yet).

    Returns the time it waited; raises a one-line error when ``timeout`` runs out first.
    """
    start = _clock()
    if Path(run_path).exists():
        return 0.0
    if not quiet:
        limit = f", up to {timeout:g}s" if timeout is not None else ""
        click.echo(f"waiting for {run_path} to be created{limit} (Ctrl-C to stop)", err=True)
    while not Path(run_path).exists():
        left = None if timeout is None else timeout - (_clock() - start)
        if left is not None and left <= 0:
            raise CommandError(  # --until-finished: the time ran out first, 124 as below
                f"{run_path}: no such file after waiting {timeout:g}s (--timeout)",
                EXIT_TIMED_OUT if until_finished else 1)
        _sleep(max(0.05, interval) if left is None else min(max(0.05, interval), left))
    return _clock() - start


def _holds_nothing(path: str) -> bool:
    """Whether ``path`` is a file its writer has created and not yet written a run into."""
    p = Path(path)
    try:
        return p.is_file() and holds_nothing(p)
    except OSError:
        return False


def _say_not_written(source: str, status: WriterStatus | None, said: str | None,
                     quiet: bool) -> str | None:
    """Without ``--until-finished``: a note, once per state, that no writer writes the run.

    A plain watch waits for rows as ``tail -f`` does; on a run whose writer closed it or
    ended, it would wait without a word (review). Returns the state said so far.
    """
    if status is None or status.state not in ("closed", "stopped", "ended"):
        return None
    if status.state != said and not quiet:
        click.echo(f"note: {source} is {status.describe()}; watching for a resume "
                   "(--until-finished exits here)", err=True)
    return status.state


def _end_if_finished(source: str, status: WriterStatus | None, quiet: bool) -> None:
    """With ``--until-finished``: exit 0 once the writer closed the finished run, 1 when
    training stopped (an exception, a signal) or the writer ended without closing it; go
    on while it writes (or cannot be told)."""
    if status is None or status.state not in ("closed", "stopped", "ended"):
        return
    if not quiet or not status.finished:
        click.echo(f"{source} is {status.describe()}", err=True)
    click.get_current_context().exit(0 if status.finished else 1)


@cli.command(epilog="\b\nExample:\n  landscape watch run.h5 --interval 5 -m loss")
@click.argument("run_path", metavar="RUN", type=click.Path())
@click.option(
    "--interval", type=FiniteFloatRange(min=MIN_INTERVAL, max=86400), default=2.0,
    show_default=True,
    help=f"Seconds between looks at the file (at least {MIN_INTERVAL:g}).",
)
@click.option("--once", is_flag=True, help="Print the current state and exit.")
@click.option(
    "--timeout", type=FiniteFloatRange(min=0.0), default=None,
    help="Stop after this many seconds, waiting for RUN to be created included "
    "(default: run until Ctrl-C).",
)
@click.option(
    "-m", "--metric", "metrics", multiple=True, metavar="METRIC",
    help="Only this metric (repeatable; default: every metric).",
)
@click.option(
    "--until-finished", is_flag=True,
    help="Stop once the run's writer has closed RUN at the end of training (exit 0), or "
         "training stopped (an exception, a signal) or its writer was killed (exit 1); "
         "with --timeout, exit 124 when the time runs out first.",
)
@click.option("-q", "--quiet", is_flag=True, help="No header and no closing line.")
@verbose_option
def watch(
    run_path: str,
    interval: float,
    once: bool,
    timeout: float | None,
    metrics: tuple[str, ...],
    until_finished: bool,
    quiet: bool,
) -> None:
    """Follow RUN while it is being written: new rows and findings as they are committed.

    Prints the latest row of every metric, then, every --interval seconds, the latest
    row of each metric that grew and every new finding. Stops on Ctrl-C, with --once,
    after --timeout seconds, or with --until-finished once the run's writer is done with
    RUN. When RUN does not exist yet, or its writer has only created it, waits for the
    run (except with --once).
    """
    view = _View(metrics)
    start = _clock()
    waited = 0.0
    if not once:
        try:
            waited = _wait_for(run_path, interval, timeout, quiet, until_finished)
        except KeyboardInterrupt:
            if not quiet:
                click.echo("stopped", err=True)
            return
    while True:
        try:
            run = Run.open(run_path)
            break
        except RunFileError:
            # a file that just appeared may not be readable yet, nor one whose writer has
            # only created it (no run in it yet: watched from its start); one that was
            # there with a run in it is broken
            starting = waited or (not once and _holds_nothing(run_path))
            if not starting or (timeout is not None and _clock() - start >= timeout):
                raise
            try:
                _sleep(max(0.05, interval))
            except KeyboardInterrupt:
                if not quiet:
                    click.echo("stopped", err=True)
                return
    with run_file_errors(run_path), run:
        unknown = [m for m in metrics if m not in run.metrics()]
        if unknown:
            known = ", ".join(run.metrics()) or "none"
            raise click.ClickException(
                f"no metric {', '.join(map(repr, unknown))} in {run.source} (metrics: {known})"
            )
        source = run.source
        lines = view.update(run, first=True)
        status = run.writer_status()
    if not quiet:
        click.echo(f"watching {source} (Ctrl-C to stop)" if not once else source)
    for line in lines or ["no rows yet"]:
        click.echo(line)
    if once:
        return
    said: str | None = None

    def follow(status: WriterStatus | None) -> None:
        """What the writer's state means: the end (``--until-finished``), or a note."""
        nonlocal said
        if until_finished:
            _end_if_finished(source, status, quiet)
        else:
            said = _say_not_written(source, status, said, quiet)

    follow(status)
    unreadable = False
    try:
        while True:
            left = None if timeout is None else timeout - (_clock() - start)
            if left is not None and left <= 0:
                if until_finished:  # not finished within the time: no pass for a CI wait
                    state = "" if status is None else f" (it is {status.describe()})"
                    raise CommandError(f"{source}: not finished after {timeout:g}s "
                                       f"(--timeout){state}", EXIT_TIMED_OUT)
                break
            _sleep(interval if left is None else min(interval, left))
            try:
                run = Run.open(run_path)
                try:
                    lines = view.update(run, first=False)
                    status = run.writer_status()
                finally:
                    run.close()
            except (RunFileError, OSError, KeyError, ValueError, TypeError, IndexError) as err:
                # e.g. the writer is changing the file's structure right now: look again later
                if not unreadable and not quiet:
                    click.echo(f"note: cannot read the run now ({err}); retrying", err=True)
                unreadable = True
                continue
            unreadable = False
            for line in lines:
                click.echo(line)
            follow(status)
    except KeyboardInterrupt:
        pass
    if not quiet:
        click.echo("stopped", err=True)
