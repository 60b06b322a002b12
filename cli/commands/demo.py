"""``landscape demo``: train a small model with the monitor, inject a learning-rate spike,
write the run, plots and report, and print the findings."""

from __future__ import annotations

import click
from landscape_cli.app import cli, verbose_option

from landscape.demo import run_demo


@cli.command(epilog="\b\nExample:\n  landscape demo --out demo-out --steps 120")
@click.option("--out", "out_dir", default="demo-out", show_default=True,
              type=click.Path(file_okay=False), help="Directory for run.h5, plots and report.")
@click.option("--steps", default=250, show_default=True, type=click.IntRange(min=20))
@click.option("--spike-step", default=None, type=click.IntRange(min=1),
              help="Step of the learning-rate spike (default: 60% of --steps).")
@click.option("--spike-factor", default=40.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True))
@click.option("--surface-steps", default=21, show_default=True, type=click.IntRange(min=0),
              help="Grid points per axis of the loss surface (0: none).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("-q", "--quiet", is_flag=True, help="Only the findings and file names.")
@verbose_option
def demo(out_dir, steps, spike_step, spike_factor, surface_steps, seed, quiet):
    """Train a small classifier under the monitor with a learning-rate spike; print what the
    alarms saw and where the pictures and report are."""
    spike = spike_step if spike_step is not None else max(1, steps * 3 // 5)
    if spike >= steps:
        raise click.BadParameter(f"must be < --steps ({steps})", param_hint="--spike-step")
    result = run_demo(out_dir, steps=steps, spike_step=spike, spike_factor=spike_factor,
                      surface_steps=surface_steps, seed=seed, progress=not quiet)
    click.echo(f"trained {result.steps} steps; learning rate x{spike_factor:g} at step "
               f"{result.spike_step}; final loss {result.final_loss:.4g}")
    if result.blowup_step is not None:
        click.echo(f"the loss blew up (3x its pre-spike level) at step {result.blowup_step}")
    click.echo(f"findings ({len(result.findings)}):")
    for f in result.findings:
        click.echo(f"  {f.describe()}")
    if result.leads:
        click.echo("warning lead before the blow-up (steps):")
        for rule, lead in result.leads.items():
            click.echo(f"  {rule:<20} {'after the blow-up' if lead is None else lead}")
    click.echo(f"wrote {result.run_path}")
    for path in result.files:
        click.echo(f"wrote {path}")
    click.echo(f"next: landscape check {result.run_path}; open {out_dir}/report.html")
