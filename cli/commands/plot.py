"""``landscape plot RUN [RUN ...]``: metric timelines (findings marked), several runs on one
figure per metric, or a stored surface, to files."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import click
from landscape_cli.app import cli, run_file_errors, verbose_option
from landscape_cli.options import (
    FiniteFloatOr,
    findings_of,
    flag_pair,
    ignore_rule_option,
    load_rule_specs,
    named_output,
    output_directory,
    recompute_option,
    rules_option,
)

from landscape.alarms import rule_names
from landscape.plotting.compare import comparisons
from landscape.plotting.surfaces import export_vtk
from landscape.plotting.timelines import SAVE_FORMATS, metrics_with_rows, save_figure, timelines
from landscape.report import surface_figure
from landscape.store import Run, refuse_to_overwrite_hdf5


def _is_directory_target(out: str) -> bool:
    """``-o`` names a directory when it is one, ends with a slash, or has no file suffix."""
    path = Path(out)
    return out.endswith(("/", os.sep)) or path.is_dir() or not path.suffix


def _run_figures(run, metrics, to_directory, log, find) -> dict:
    """Timelines of the chosen metrics; with no -m and a directory, every surface as well.

    Without -m, metrics that have no rows yet are left out. ``find(run)``: the findings to
    mark.
    """
    unknown = [m for m in metrics if m not in run.metrics()]
    if unknown:
        raise click.ClickException(
            f"no metric {', '.join(map(repr, unknown))} in {run.source} "
            f"(metrics: {', '.join(run.metrics()) or 'none'})"
        )
    figures = {}
    names = list(metrics) or metrics_with_rows(run)
    if names:
        found = find(run)
        figures.update(timelines(run, names, log=log, findings=found))
    if not metrics and to_directory and run.surfaces():
        for name in run.surfaces():
            figures[f"surface-{name}"] = surface_figure(run.surface(name), log=log)
    if not figures:
        notes = [f"no rows yet: {', '.join(run.metrics())}"] if run.metrics() else []
        if run.surfaces():
            notes.append("its surfaces go into a directory: -o DIR")
        detail = f" ({'; '.join(notes)})" if notes else ""
        raise click.ClickException(f"{run.source}: the run holds no metrics to plot{detail}")
    return figures


# the library names its arguments in its errors; the command line, its options
_OPTION_OF = {"three_d: ": "--3d: ", "field: ": "--field: ", "path: ": "-o: ",
              "vmax: ": "--vmax: ", "levels: ": "--levels: "}


def _clip(vmax: float | str | None) -> float | str | None:
    """``--vmax`` as the library takes it: not given is ``"auto"``, ``none`` is None."""
    return {None: "auto", "none": None}.get(vmax, vmax)  # type: ignore[arg-type]


def _message(err: Exception) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = text.replace("leave out three_d", "leave out --3d")  # named inside the sentence
    for argument, option in _OPTION_OF.items():
        if text.startswith(argument):
            return option + text[len(argument):]
    return text


@cli.command(epilog="\b\nExample:\n  landscape plot run.h5 -m loss -o loss.png")
@click.argument("run_paths", metavar="RUN...", nargs=-1, required=True, type=click.Path())
@click.option(
    "-m", "--metric", "metrics", multiple=True, metavar="METRIC",
    help="Metric to plot (repeatable; default: every metric that has rows).",
)
@click.option("--surface", "surface_name", metavar="NAME", help="Plot this stored surface instead.")
@click.option("--3d", "three_d", is_flag=True, help="3-D view of a 2-D surface (with --surface).")
@click.option("--vmax", type=FiniteFloatOr("auto", "none"), default=None,
              help="Clip a surface's values at this, so that a diverged corner does not "
                   "flatten the rest (with --surface). Default auto: at the outlier fence "
                   "(upper quartile + 3 interquartile ranges) when values lie orders of "
                   "magnitude beyond it; none: never.")
@click.option("--levels", type=click.IntRange(2, 500), default=None,
              help="Contour levels of a 2-D surface (default 30; with --surface).")
@click.option(
    "--field", default=None,
    help="Which grid of the surface to draw (with --surface): loss (default) or accuracy, ...",
)
@flag_pair("--log/--linear", None,
           help="Logarithmic (symmetric-log around zero) or linear y axes on every "
                "timeline, log10 of a surface's values (default: logarithmic where a "
                "field's positive values span two decades or more; a .vtk file's heights "
                "linear).")
@recompute_option("Mark")
@click.option(
    "-o", "--out", "out", required=True, type=click.Path(),
    callback=named_output,
    help="Image file (.png, .pdf, .svg, .jpg; several metrics: FILE-METRIC.png each), a "
    "directory (existing, or ending in /) for one image per metric, or with --surface a .vtk "
    "file (a structured grid for ParaView).",
)
@click.option(
    "--format", "fmt", type=click.Choice(SAVE_FORMATS), default="png", show_default=True,
    help="Image format of the files written into a directory.",
)
@click.option("--dpi", type=click.IntRange(min=10, max=2400), default=120, show_default=True)
@rules_option
@ignore_rule_option
@click.option("-q", "--quiet", is_flag=True, help="Do not list the files written.")
@verbose_option
def plot(
    run_paths: tuple[str, ...],
    metrics: tuple[str, ...],
    surface_name: str | None,
    three_d: bool,
    vmax: float | str | None,
    levels: int | None,
    field: str | None,
    log: bool | None,
    recompute: bool,
    rule_specs: tuple[str, ...],
    ignore: tuple[str, ...],
    out: str,
    fmt: str,
    dpi: int,
    quiet: bool,
) -> None:
    """Plot the metric timelines of RUN, or one of its surfaces, into image files.

    One metric goes to one file; several go into a directory (one file per metric, named
    after it), or next to the file -o names (plot.png: plot-loss.png, plot-sharpness.png,
    ...). Findings are marked as vertical lines coloured by severity. Without --metric, a
    directory also receives every surface (surface-NAME.png).

    Several RUNs are compared: each metric's figure draws every run in a colour of its own
    (a vector field as each run's median with its min-max band), and each run's first
    warning as a dashed line in its colour.
    """
    if len(run_paths) > 1 and surface_name:
        raise click.UsageError("--surface plots a surface of one run: give one RUN")
    for option, given in (("--3d", three_d), ("--vmax", vmax is not None),
                          ("--levels", levels is not None)):
        if given and not surface_name:
            raise click.UsageError(f"{option} applies to surfaces only; add --surface NAME")
    if field is not None and not surface_name:
        raise click.UsageError(
            "--field applies to surfaces only; add --surface NAME (a metric's fields are "
            "all drawn)"
        )
    if surface_name and metrics:
        raise click.UsageError("use either --metric or --surface, not both")
    if three_d and levels is not None:  # (a 1-D surface with --3d: known once it is read)
        raise click.UsageError("--levels does not go with --3d: a 3-D view draws no contour "
                               "levels")
    target = Path(out)
    to_directory = _is_directory_target(out)
    given = click.get_current_context().get_parameter_source("fmt")
    same = {"jpeg": "jpg"}  # one format, two suffixes
    if not to_directory and given is click.core.ParameterSource.COMMANDLINE \
            and same.get(target.suffix.lower().lstrip("."), target.suffix.lower().lstrip(".")) \
            != same.get(fmt, fmt):
        raise click.UsageError(f"--format {fmt} names the format of files written into a "
                               f"directory; the file {target.name}'s own suffix sets its "
                               f"format: -o {target.with_suffix('.' + fmt).name}")
    rules = load_rule_specs(rule_specs, recompute)

    names: dict[int, set[str]] = {}  # each compared run's rules, read once

    def find(run: Run, compared: tuple[Run, ...] = ()) -> list:
        """The findings to mark on ``run``'s figures; ``--ignore-rule`` names a rule of any
        of the ``compared`` runs (one run may hold a rule of its own the others lack)."""
        known = None
        if ignore and compared:
            for r in compared:
                if id(r) not in names:
                    names[id(r)] = rule_names(r, rules)
            known = set().union(*(names[id(r)] for r in compared))
        return findings_of(run, recompute, rules, quiet, ignore, known)

    if not to_directory:  # -o run.h5 (also for several figures), before any work
        refuse_to_overwrite_hdf5(target, "a figure")
        suffix = target.suffix.lower().lstrip(".")
        if suffix not in (*SAVE_FORMATS, "vtk"):
            raise click.UsageError(
                f"-o {out}: cannot tell the image format of .{suffix}; use a suffix among "
                + ", ".join("." + s for s in SAVE_FORMATS) + " (or .vtk for a surface)")
    if target.suffix.lower() == ".vtk" and not to_directory:
        ctx = click.get_current_context()
        for option, name in (("--3d", "three_d"), ("--levels", "levels"), ("--dpi", "dpi")):
            if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
                raise click.UsageError(f"{option} does not apply to a .vtk file (a grid of "
                                       "heights, not an image)")
        _write_vtk(run_paths[0], surface_name, target, field, bool(log), _clip(vmax), quiet)
        return
    if len(run_paths) > 1:
        figures = _compared(run_paths, metrics, log, find)
    else:
        figures = _one_run(run_paths[0], metrics, surface_name, three_d, vmax, levels, field,
                           log, to_directory, find)
    _save(figures, target, to_directory, fmt, dpi, quiet)


def _compared(run_paths, metrics, log, find) -> dict:
    """The figures comparing several runs; a file that cannot be read is named alone."""
    seen: dict[Path, str] = {}
    for path in run_paths:
        key = Path(path).resolve()
        if key in seen:
            raise click.ClickException(f"{path}: the same run as {seen[key]}, given twice")
        seen[key] = path
    with contextlib.ExitStack() as stack:
        runs = []
        for path in run_paths:
            with run_file_errors(path):
                runs.append(stack.enter_context(Run.open(path)))
        unknown = [m for m in metrics if not any(m in run for run in runs)]
        if unknown:
            held = sorted({m for run in runs for m in run.metrics()})
            raise click.ClickException(
                f"no metric {', '.join(map(repr, unknown))} in any of the runs "
                f"(metrics: {', '.join(held) or 'none'})"
            )
        found = []
        for path, run in zip(run_paths, runs):
            with run_file_errors(path):
                found.append(find(run, tuple(runs)))
        with run_file_errors(" or ".join(run_paths)):
            try:
                figures = comparisons(runs, list(metrics) or None, findings=found, log=log)
            except (KeyError, ValueError) as err:
                raise click.ClickException(_message(err)) from None
    if not figures:
        raise click.ClickException("the runs hold no metrics to plot (no rows yet)")
    return figures


def _one_run(run_path, metrics, surface_name, three_d, vmax, levels, field, log,
             to_directory, find) -> dict:
    """The figures of one run: its timelines, or the surface it names."""
    with run_file_errors(run_path), Run.open(run_path) as run:
        try:
            if surface_name:
                surface = run.surface(surface_name)
                figures = {  # the name a directory of every figure gives it too
                    f"surface-{surface_name}": surface_figure(
                        surface, three_d=three_d, field=field, log=log, levels=levels,
                        vmax=_clip(vmax))
                }
            else:
                figures = _run_figures(run, metrics, to_directory, log, find)
        except (KeyError, ValueError) as err:
            raise click.ClickException(_message(err)) from None
    return figures


def _save(figures: dict, target: Path, to_directory: bool, fmt: str, dpi: int,
          quiet: bool) -> None:
    """Write each figure: into the directory, or as -o names it (FILE-METRIC for several)."""
    if to_directory:
        output_directory(target)
        paths = {name: target / f"{name}.{fmt}" for name in figures}
    else:
        if not target.parent.exists():
            raise click.ClickException(f"{target}: directory {target.parent} does not exist")
        if len(figures) == 1:
            paths = {name: target for name in figures}
        else:  # one image per metric, named after the file: plot.png -> plot-loss.png
            paths = {
                name: target.with_name(f"{target.stem}-{name}{target.suffix}") for name in figures
            }
    written = []
    try:
        for name, fig in figures.items():
            try:
                save_figure(fig, paths[name], dpi=dpi)
            except ValueError as err:
                raise click.ClickException(_message(err)) from None
            written.append(paths[name])
    finally:  # after the files: a closed pipe must not stop the writing
        if not quiet:
            for path in written:
                click.echo(f"wrote {path}")


def _write_vtk(run_path: str, surface_name: str | None, target: Path, field: str | None,
               log: bool, zmax: float | str | None, quiet: bool) -> None:
    """``-o NAME.vtk``: the surface as a VTK structured grid for ParaView (export_vtk)."""
    if not surface_name:
        raise click.UsageError("a .vtk file holds a surface: add --surface NAME")
    if not target.parent.exists():
        raise click.ClickException(f"{target}: directory {target.parent} does not exist")
    with Run.open(run_path) as run:
        try:
            path = export_vtk(run.surface(surface_name), target, field or "loss", log=log,
                              zmax=zmax)
        except (KeyError, ValueError) as err:
            raise click.ClickException(_message(err)) from None
    if not quiet:
        click.echo(f"wrote {path}")
