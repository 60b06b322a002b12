"""``landscape demo``: train a small model under the default monitor while the learning
rate ramps up, write the run, plots and report, and print the findings and how long before
the loss moved the first warning came."""

from __future__ import annotations

import click
from click.core import ParameterSource
from landscape_cli.app import cli, verbose_option
from landscape_cli.options import SEED_MAX, FiniteFloatRange

from landscape.demo import run_demo


@cli.command(epilog="\b\nExample:\n  landscape demo --out demo-out")
@click.option("--out", "out_dir", default="demo-out", show_default=True,
              type=click.Path(file_okay=False), help="Directory for run.h5, plots and report.")
@click.option("--steps", default=220, show_default=True, type=click.IntRange(min=20))
@click.option("--ramp-step", "--spike-step", "ramp_step", default=None,
              type=click.IntRange(min=1),
              help="First step of the learning-rate ramp (default: --steps minus 70, at "
                   "least 1; the "
                   "taylor_forecast reads its first 100 rows as early training, info only).")
@click.option("--ramp-steps", default=60, show_default=True, type=click.IntRange(min=1),
              help="Steps the geometric ramp takes.")
# the rate (0.05) times the factor must stay a float32 number: 1e40 overflowed in SGD
@click.option("--ramp-factor", default=1000.0, show_default=True,
              type=FiniteFloatRange(min=0, min_open=True, max=1e30),
              help="The learning rate's multiple at the end of the ramp.")
@click.option("--spike-factor", default=None,
              type=FiniteFloatRange(min=0, min_open=True, max=1e30),
              help="Jump the learning rate by this factor at --ramp-step instead of ramping "
                   "(an abrupt spike: the detectors fire within a step or two of it).")
@click.option("--surface-steps", default=21, show_default=True, type=click.IntRange(min=0),
              help="Grid points per axis of the loss surface (0 or 1: none).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, SEED_MAX))
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@verbose_option
def demo(out_dir, steps, ramp_step, ramp_steps, ramp_factor, spike_factor, surface_steps, seed,
         quiet):
    """Train a small classifier under the default monitor while the learning rate ramps up;
    print what the alarms saw, how many steps before the loss moved they warned, and where
    the pictures and report are."""
    if not out_dir.strip():
        raise click.BadParameter("give a directory (an empty name would write into the "
                                 "current one)", param_hint="--out")
    start = ramp_step if ramp_step is not None else max(1, steps - 70)
    if start >= steps:
        raise click.BadParameter(f"must be < --steps ({steps})", param_hint="--ramp-step")
    ctx = click.get_current_context()
    ramp_given = [f"--{name.replace('_', '-')}" for name in ("ramp_factor", "ramp_steps")
                  if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT]
    if spike_factor is not None and ramp_given:
        raise click.UsageError(f"--spike-factor (a jump at one step) and {ramp_given[0]} (a "
                               "ramp) exclude each other")
    if spike_factor is not None:
        ramp_factor, ramp_steps = spike_factor, 1
    result = run_demo(out_dir, steps=steps, ramp_step=start, ramp_steps=ramp_steps,
                      ramp_factor=ramp_factor, surface_steps=surface_steps, seed=seed,
                      progress=not quiet)
    w = result.warning
    reached = min(ramp_steps, steps - start)  # a ramp cut short by the end of training
    change = (f"learning rate x{ramp_factor:g} at step {start}" if ramp_steps == 1 else
              f"learning rate ramped x{ramp_factor:g} over {ramp_steps} steps from step {start}"
              if reached == ramp_steps else
              f"learning rate ramped from step {start}, {reached} of its {ramp_steps} steps "
              f"(to x{ramp_factor ** (reached / ramp_steps):.3g} of x{ramp_factor:g}) before "
              "training ended")
    click.echo(f"trained {result.steps} steps; {change}; final loss {result.final_loss:.4g}")
    click.echo(f"findings ({len(result.findings)}):")
    for f in result.findings:
        click.echo(f"  {f.describe()}")
    if result.leads and w.explosion is not None:
        click.echo(f"warning lead before the loss reached {w.explosion_factor:g}x (steps):")
        for rule, lead in result.leads.items():
            click.echo(f"  {rule:<20} {'after it' if lead is None else lead}")
    window = ("the step" if w.baseline_steps == 1 else f"the {w.baseline_steps} steps")
    kind = "jump" if ramp_steps == 1 else "ramp"
    click.echo(f"baseline loss {w.baseline:.4g} (median of {window} before the {kind})"
               + (f"; warnings before the {kind}: {len(w.early)}" if w.early else
                  f"; no warning before the {kind}"))
    click.echo(w.describe())
    click.echo(f"wrote {result.run_path}")
    for path in result.files:
        click.echo(f"wrote {path}")
    click.echo(f"next: landscape check {result.run_path}; open {out_dir}/report.html")
