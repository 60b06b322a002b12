"""``landscape analyze``: curvature and representation metrics of checkpoints into one run."""

from __future__ import annotations

import datetime
from collections import Counter

import click
from landscape_cli.app import cli, interrupted, verbose_option
from landscape_cli.options import (
    SEED_MAX,
    FiniteFloatRange,
    MemorySize,
    checkpoint_options,
    counted,
    factory_options,
    load_inputs,
    run_output,
)

from landscape._names import RENAMED_METRICS
from landscape.analysis import ANALYZE_METRICS, DEFAULT_METRICS, analyze
from landscape.store import Run

# the metric names -m takes; an old name (docs/vocabulary.md) still works, with a warning
METRIC_CHOICE = click.Choice(
    ANALYZE_METRICS + tuple(old for old, new in RENAMED_METRICS.items() if new in ANALYZE_METRICS)
)
EXAMPLE = ("landscape analyze ckpt-100.pt ckpt-200.pt --model factories.py:model "
           "--data factories.py:data -o run.h5")


def _created_before(created: object, started: datetime.datetime) -> bool:
    """Whether a run file's ``created`` attribute (ISO 8601) is before ``started``.

    One without a UTC offset is read as UTC; one that is no date says nothing (False).
    """
    try:
        when = datetime.datetime.fromisoformat(str(created))
    except ValueError:
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when < started


@cli.command("analyze", epilog=f"\b\nExample:\n  {EXAMPLE}")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@factory_options
@click.option("-o", "--out", "out", default="run.h5", show_default=True, type=click.Path(),
              callback=run_output,
              help="Run file to write (appended to when it exists: checkpoints already in "
                   "it are skipped).")
@click.option("--overwrite", is_flag=True,
              help="Start the run file over instead of appending to it.")
@click.option("-m", "--metric", "metrics", multiple=True,
              type=METRIC_CHOICE, metavar="METRIC",
              help=f"Metric to compute, repeatable: {', '.join(ANALYZE_METRICS)} "
                   f"(default: {', '.join(DEFAULT_METRICS)}; spectral_density is the slowest).")
@click.option("-k", "k", default=3, show_default=True, type=click.IntRange(1),
              help="Number of top Hessian eigenvalues.")
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="SGD learning rate, for the sharpness metric's stability threshold "
                   "(default: the optimizer state saved in the checkpoints; without one "
                   "the threshold is NaN, with a warning).")
@click.option("--momentum", type=FiniteFloatRange(min=0, max=1, max_open=True), default=None,
              help="SGD momentum (with --lr; default 0: plain SGD, which a warning says when "
                   "the checkpoints saved another).")
@click.option("--microbatch-size", type=click.IntRange(1), default=None,
              help="Curvature products in micro-batches of at most this many samples "
                   "(bounds their memory; slower).")
@click.option("--memory-budget", type=MemorySize(), default="free", show_default=True,
              help="The most memory one curvature measurement may take: a size (4GB, "
                   "512MiB), free (half the memory free when the analysis starts), auto "
                   "(one training step on the data, at least 256 MiB: the monitor's), or "
                   "none (no limit). Over it, the metric records NaN and a warning says "
                   "what it needs.")
@checkpoint_options
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, SEED_MAX),
              help="Seed for the factories.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@verbose_option
def analyze_command(checkpoints, model_spec, data_spec, tokens, text, seq_len, batch_size,
                    n_batches, pad_id, loss_spec, out, overwrite, metrics, k, lr, momentum,
                    microbatch_size, memory_budget, trust_checkpoint, device, threads, seed,
                    quiet):
    """Compute Hessian spectra, trace, sharpness and collapse metrics of CHECKPOINTS
    (ordered by training step) into one run file.

    CHECKPOINTS are state-dict files, Hugging Face model folders, PEFT adapter folders (on
    the base model their config names), Trainer output folders (every checkpoint-N inside)
    or Lightning .ckpt files. Rows are committed per checkpoint:
    after Ctrl-C or SIGTERM, the same command continues where it stopped.
    """
    if momentum is not None and lr is None:
        raise click.UsageError("--momentum needs --lr (the SGD settings go together)")
    import torch

    torch.manual_seed(seed)
    opened, batches, loss_fn, closure = load_inputs(
        checkpoints, model_spec, data_spec, loss_spec, tokens, text, seq_len, batch_size,
        n_batches, trust_checkpoint, device, threads, pad_id)
    optimizer = None if lr is None else {"name": "sgd", "lr": lr, "momentum": momentum}
    before = 0 if overwrite else _checkpoints_in(out)
    # (whole seconds, as the file's "created" attribute: --overwrite started it over since)
    started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    try:
        monitor = analyze(
            opened.checkpoints, opened.model, batches, loss_fn, out,
            metrics=metrics or DEFAULT_METRICS, k=k, optimizer=optimizer,
            trust=trust_checkpoint, device=device, progress=not quiet,
            microbatch_size=microbatch_size, mode="w" if overwrite else "a",
            closure=closure, memory_budget=memory_budget,
        )
    except KeyboardInterrupt as err:
        done = 0
        earlier = False  # --overwrite stopped before it started the file over
        try:
            with Run.open(out) as run:
                done = len(run.checkpoints())
                created = run.attrs.get("created")
            earlier = overwrite and _created_before(created, started)
            counted_done = f"{done} checkpoint{'s' if done != 1 else ''}"
            where = (f"nothing recorded: {out} is as it was (the {counted_done} of an "
                     "earlier analysis)" if earlier else f"{counted_done} recorded in {out}")
        except Exception:
            where = "no checkpoint recorded"
        raise interrupted(err, where, "--overwrite" if overwrite and not earlier
                          else None) from None
    if not quiet:
        from landscape.alarms.online import unmeasured_rows

        with Run.open(out) as run:  # the monitor is closed: read the file it wrote
            wanted = {RENAMED_METRICS.get(m, m) for m in metrics or DEFAULT_METRICS}
            n_ckpt = len(run.checkpoints())
            names = [m for m in run.metrics() if m in wanted]
            unmeasured = Counter(m for m, _ in unmeasured_rows(run) if m in wanted)
        if n_ckpt == before:  # every checkpoint given was recorded already
            click.echo(f"nothing new: {out} holds its {counted(n_ckpt, 'checkpoint')} already, "
                       f"metrics {', '.join(names)} (--overwrite computes them again)")
        else:  # this command's checkpoints, and the file's when it held some before
            held = f" ({n_ckpt} in the file)" if before else ""
            click.echo(f"wrote {out}: {counted(n_ckpt - before, 'checkpoint')}{held}, "
                       f"metrics {', '.join(names)}")
        for name, n in sorted(unmeasured.items()):  # NaN rows: a warning above says why
            click.echo(f"note: {name} not measured at {n} of {counted(n_ckpt, 'checkpoint')} "
                       f"(NaN rows; landscape check {out} lists why)", err=True)
        for f in monitor.findings[monitor.findings_recorded:]:  # this call's
            click.echo(f.describe())
        if monitor.findings_recorded:
            click.echo(f"{counted(monitor.findings_recorded, 'finding')} recorded before "
                       f"(landscape check {out} lists every one)")


def _checkpoints_in(out: str) -> int:
    """How many checkpoints the run file ``out`` records (0: none, or no run there)."""
    try:
        with Run.open(out) as run:
            return len(run.checkpoints())
    except Exception:
        return 0
