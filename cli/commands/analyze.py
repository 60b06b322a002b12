"""``landscape analyze``: curvature and representation metrics of checkpoints into one run."""

from __future__ import annotations

import click
from landscape_cli.app import cli, verbose_option
from landscape_cli.options import checkpoint_options, factory_options

from landscape._names import RENAMED_METRICS
from landscape.analysis import ANALYZE_METRICS, analyze
from landscape.loading import call_factory, resolve_loss
from landscape.store import Run

# the metric names -m takes; an old name (docs/vocabulary.md) still works, with a warning
METRIC_CHOICE = click.Choice(
    ANALYZE_METRICS + tuple(old for old, new in RENAMED_METRICS.items() if new in ANALYZE_METRICS)
)
EXAMPLE = ("landscape analyze ckpt-100.pt ckpt-200.pt --model factories.py:model "
           "--data factories.py:data -o run.h5")


@cli.command("analyze", epilog=f"\b\nExample:\n  {EXAMPLE}")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@factory_options
@click.option("-o", "--out", "out", default="run.h5", show_default=True, type=click.Path(),
              help="Run file to write (appended to when it exists: checkpoints already in "
                   "it are skipped).")
@click.option("--overwrite", is_flag=True,
              help="Start the run file over instead of appending to it.")
@click.option("-m", "--metric", "metrics", multiple=True,
              type=METRIC_CHOICE, metavar="METRIC",
              help=f"Metric to compute, repeatable: {', '.join(ANALYZE_METRICS)} "
                   "(default: all).")
@click.option("-k", "k", default=5, show_default=True, type=click.IntRange(1),
              help="Number of top Hessian eigenvalues.")
@click.option("--lr", type=float, default=None,
              help="SGD learning rate, for the sharpness metric's stability threshold.")
@click.option("--momentum", type=float, default=None, help="SGD momentum (with --lr).")
@click.option("--microbatch-size", type=click.IntRange(1), default=None,
              help="Curvature products in micro-batches of at most this many samples "
                   "(bounds their memory; slower).")
@checkpoint_options
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for the factories.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@verbose_option
def analyze_command(checkpoints, model_spec, data_spec, loss_spec, out, overwrite, metrics, k,
                    lr, momentum, microbatch_size, trust_checkpoint, device, seed, quiet):
    """Compute Hessian spectra, trace, density, sharpness and collapse metrics of CHECKPOINTS
    (ordered by training step) into one run file."""
    import torch

    torch.manual_seed(seed)
    model = call_factory(model_spec, "model factory")
    data = call_factory(data_spec, "data factory")
    optimizer = None if lr is None else {"name": "sgd", "lr": lr, "momentum": momentum}
    monitor = analyze(
        checkpoints, model, data, resolve_loss(loss_spec), out,
        metrics=metrics or ANALYZE_METRICS, k=k, optimizer=optimizer,
        trust=trust_checkpoint, device=device, progress=not quiet,
        microbatch_size=microbatch_size, mode="w" if overwrite else "a",
    )
    if not quiet:
        with Run.open(out) as run:  # the monitor is closed: read the file it wrote
            n_ckpt, names = len(run.checkpoints()), run.metrics()
        click.echo(f"wrote {out}: {n_ckpt} checkpoints, metrics {', '.join(names)}")
        for f in monitor.findings:
            click.echo(f.describe())
