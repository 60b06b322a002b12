"""``landscape demo``: train a small model on built-in data and write a run."""

from __future__ import annotations

import click
from landscape_cli.app import cli

from landscape.demo import run_demo


@cli.command()
@click.option(
    "--out", "out_dir", default="demo-out", show_default=True, type=click.Path(file_okay=False)
)
@click.option("--steps", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
def demo(out_dir: str, steps: int, seed: int) -> None:
    """Train a small classifier with a learning-rate spike and record the run."""
    result = run_demo(out_dir, steps=steps, seed=seed, spike_step=min(150, max(1, steps * 3 // 4)))
    click.echo(
        f"wrote {result.run_path} ({result.steps} steps, final loss {result.final_loss:.4g})"
    )
    click.echo(f"inspect it with: landscape info {result.run_path}")
