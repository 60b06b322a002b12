"""``landscape surface``: a filter-normalized 1-D/2-D loss landscape of checkpoints."""

from __future__ import annotations

import os

import click
from click.core import ParameterSource
from landscape_cli.app import cli, interrupted, verbose_option
from landscape_cli.options import (
    SEED_MAX,
    FiniteFloatRange,
    checkpoint_options,
    factory_options,
    load_inputs,
    run_output,
)

from landscape._errors import LandscapeError
from landscape.analysis import check_loss, discard_if_empty
from landscape.loading import load_state_into
from landscape.surface.directions import IGNORES, NORMALIZATIONS

DIRECTIONS = ("random", "eigen", "pca", "interpolate")
# what --span and --dims mean for the kinds whose grid is not around the last checkpoint
# along drawn directions: the only --dims value each takes, and what sets its extent instead
_FIXED_GRID = {
    "interpolate": (1, "a line from -0.5 to 1.5 along the segment between the two checkpoints"),
    "pca": (2, "a plane of the top two principal components that covers the projected "
               "trajectory"),
}
EXAMPLE = ("landscape surface ckpt-200.pt --model factories.py:model --data factories.py:data "
           "--steps 21 -o run.h5")


def _surface_name(value: str | None) -> str | None:
    """Refuse an empty ``--name`` (it silently took the kind's name)."""
    if value is not None and not value.strip():
        raise click.BadParameter("give a name (an empty one would be the kind's)")
    return value


@cli.command("surface", epilog=f"\b\nExample:\n  {EXAMPLE}")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@factory_options
@click.option("--dims", type=click.IntRange(1, 2), default=2, show_default=True,
              help="1: a line, 2: a plane (random, eigen; interpolate is a line, pca a "
                   "plane).")
@click.option("--steps", type=click.IntRange(2, 3001), default=51, show_default=True,
              help="Grid points per axis.")
@click.option("--span", type=FiniteFloatRange(min=0, max=1e6, min_open=True), default=1.0,
              show_default=True,
              help="Half-width of the grid in direction units (random, eigen).")
@click.option("--directions", type=click.Choice(DIRECTIONS), default="random",
              show_default=True,
              help="random: filter-normalized Gaussian; eigen: top Hessian eigenvectors; "
                   "pca: principal components of the CHECKPOINTS trajectory; interpolate: "
                   "the line between two CHECKPOINTS.")
@click.option("--normalization", type=click.Choice(NORMALIZATIONS), default="filter",
              show_default=True,
              help="How random directions are scaled to the weights (Li et al. 2018): per "
                   "filter, per layer, per weight entry, or not at all (random only).")
@click.option("--ignore", type=click.Choice(IGNORES), default="biasbn", show_default=True,
              help="biasbn: biases and normalization parameters are not moved (the reference "
                   "code's --xignore biasbn); none: every parameter moves (random only).")
@click.option("--name", default=None, callback=lambda ctx, param, value: _surface_name(value),
              help="Surface name in the run file (default: the kind of directions, "
                   "random-line or eigen-line for --dims 1).")
@click.option("-o", "--out", default="run.h5", show_default=True, type=click.Path(),
              callback=run_output,
              help="Run file to write into (resumes an interrupted surface of that name).")
@click.option("--replace", is_flag=True,
              help="Compute the surface named --name (default: the kind) again from scratch, "
                   "keeping everything else in the run file.")
@click.option("--overwrite", is_flag=True,
              help="Start the whole run file over (every metric and surface in it is "
                   "deleted) instead of adding to it.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, SEED_MAX),
              help="Seed of the factories (--model, --data) and of the random directions "
                   "(the other kinds draw none).")
@checkpoint_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@verbose_option
def surface_command(checkpoints, model_spec, data_spec, tokens, text, seq_len, batch_size,
                    n_batches, pad_id, loss_spec, dims, steps, span, directions,
                    normalization, ignore, name, out, replace, overwrite, seed,
                    trust_checkpoint, device, threads, quiet):
    """Evaluate the loss (and accuracy) on a grid around the last of CHECKPOINTS.

    CHECKPOINTS are as for analyze: state-dict files, Hugging Face model folders, PEFT
    adapter folders, Trainer output folders or Lightning .ckpt files. --directions pca and
    interpolate set their own grid: --span does not apply to them, nor --dims 1 to pca or
    --dims 2 to interpolate.
    """
    ctx = click.get_current_context()
    _refuse_fixed_grid_options(ctx, directions, dims)
    if replace and overwrite:
        raise click.UsageError("--replace and --overwrite do not go together: --overwrite "
                               "deletes the whole run file, --replace one surface of it")
    for option in ("normalization", "ignore"):
        if directions != "random" and _given(ctx, option):
            raise click.UsageError(f"--{option} applies to --directions random only")
    import torch

    from landscape import surface
    from landscape.analysis import order_checkpoints

    torch.manual_seed(seed)
    opened, batches, loss_fn, closure = load_inputs(
        checkpoints, model_spec, data_spec, loss_spec, tokens, text, seq_len, batch_size,
        n_batches, trust_checkpoint, device, threads, pad_id)
    model = opened.model
    data = batches[0] if len(batches) == 1 else batches
    if directions == "interpolate" and len(checkpoints) == 2 == len(opened.checkpoints):
        ckpts = list(opened.checkpoints)  # alpha = 0 is the first given, whatever its step
    else:  # (an interpolation needs no steps: net18_init.pt net18_final.pt as given)
        ckpts = [c for _, c in order_checkpoints(
            opened.checkpoints, given_order_if_unknown=directions == "interpolate")]
    if directions == "interpolate" and len(ckpts) != 2:
        twice = len(checkpoints) == 2 and len(ckpts) == 1
        raise LandscapeError("--directions interpolate needs exactly two checkpoints" + (
            ": the two given are one checkpoint" if twice else ""))
    if directions == "interpolate" and not quiet:  # a glob lists ckpt-12 before ckpt-3
        click.echo(f"interpolating from {ckpts[0].path} (alpha 0) to {ckpts[1].path} "
                   "(alpha 1)", err=True)
    if directions == "pca" and len(ckpts) < 3:
        raise LandscapeError("--directions pca needs at least three checkpoints (a trajectory)")
    states = []  # as loaded: wrapper prefixes (module., model.) removed, tied weights restored
    # of a PEFT run's adapter checkpoints, what the grid moves (and the buffers): the frozen
    # base weights are the model's in every checkpoint, and one copy per checkpoint would
    # be T copies of the base model; of whole checkpoints, everything (frozen weights that
    # differ between them are part of an interpolation)
    trained = {n for n, p in model.named_parameters() if p.requires_grad} | {
        n for n, _ in model.named_buffers()}
    # every checkpoint the grid uses must fit the model and give a finite loss: all of them
    # for pca and interpolate, the last (the centre) for random and eigen directions
    used = ckpts if directions in _FIXED_GRID else ckpts[-1:]
    for c in used:
        load_state_into(model, c)
        check_loss(model, loss_fn, batches, c, closure)
        if directions in _FIXED_GRID:
            # on the host, as the checkpoints are: T copies of the model on the device
            # would not fit (pca reads every checkpoint; the grid moves the centre back)
            states.append({k: v.detach().to('cpu', copy=True)
                           for k, v in model.state_dict().items()
                           if k in trained or not c.partial})
            c.release()
    # a line drawn along the same kind of directions as a plane is another surface: the
    # default 1-D name once collided with the 2-D one (and --replace deleted the plane)
    label = name or (f"{directions}-line" if dims == 1 and directions not in _FIXED_GRID
                     else directions)
    # where the surface comes from, for the figure of a paper: `info` and the report's
    # caption show it
    source = {"checkpoints": [str(c.path) for c in used], "model": model_spec,
              "data": data_spec or tokens or text, "loss": loss_spec}
    common = {"writer": out, "name": label, "progress": not quiet,
              "attrs": {"source": {k: v for k, v in source.items() if v is not None}}}
    if closure is not None:  # dict batches: the grid calls closure(model, batch)
        loss_fn, common["closure"] = closure, True
    complete_before = not (overwrite or replace) and _complete(out, label)
    try:
        with discard_if_empty(out):
            if overwrite:
                from landscape.store import RunWriter

                RunWriter(out, mode="w", posthoc=True).close()
            elif replace and os.path.exists(out):
                from landscape.store import RunWriter

                with RunWriter(out, posthoc=True) as writer:
                    writer.remove_surface(label)
            if directions == "interpolate":
                surf = surface.interpolate(model, states[0], states[1], loss_fn, data, steps,
                                           **common)
            elif directions == "pca":
                surf = surface.trajectory_plane(model, loss_fn, data,
                                                states, steps, **common)
            else:
                # the library's name of the kind: one it does not know is its error, never
                # a random plane stored under another kind's name
                scaling = ({"normalization": normalization, "ignore": ignore}
                           if directions == "random" else {})  # (eigenvectors as they are)
                if dims == 1:
                    surf = surface.line(model, loss_fn, data, steps, span,
                                        directions=directions, seed=seed, **scaling, **common)
                else:
                    surf = surface.plane(model, loss_fn, data, steps, span,
                                         directions=directions, seed=seed, **scaling, **common)
    except KeyboardInterrupt as err:  # as analyze: what is stored, and how to go on
        starts_over = "--overwrite" if overwrite else "--replace" if replace else None
        raise interrupted(err, _stored_points(out, label), starts_over) from None
    import numpy as np

    loss = np.asarray(surf.values["loss"], dtype=np.float64)
    finite = loss[np.isfinite(loss)]
    if not finite.size:
        raise LandscapeError(f"surface {label!r} in {out}: the loss is not finite anywhere on "
                             "the grid (try a smaller --span)")
    if not quiet:
        shape = "x".join(str(n) for n in loss.shape[::-1])  # nx x ny
        nan = f", {loss.size - finite.size} not finite" if finite.size < loss.size else ""
        values = (f"loss {finite.min():.6g} at every point" if finite.min() == finite.max()
                  else f"loss {finite.min():.4g} to {finite.max():.4g}")
        what = f"({shape} points, {values}{nan})"
        if complete_before:
            click.echo(f"surface {label!r} in {out} was complete already {what}: nothing "
                       "computed (--replace computes it again)")
        else:
            click.echo(f"wrote surface {label!r} {what} to {out}")


def _complete(out: str, label: str) -> bool:
    """Whether the run file ``out`` holds surface ``label`` with every point computed."""
    if not os.path.isfile(out):
        return False
    try:
        from landscape.store import Run

        with Run.open(out) as run:
            return label in run.surfaces() and bool(run.surface(label).done.all())
    except Exception:  # not a run file yet: the command's own checks say so
        return False


def _stored_points(out: str, label: str) -> str:
    """How many points of surface ``label`` the file ``out`` holds, in words."""
    try:
        from landscape.store import Run

        with Run.open(out) as run:
            done = run.surface(label).done
            return f"{int(done.sum())} of {done.size} points of surface {label!r} stored in {out}"
    except Exception:
        return "no point stored"


def _given(ctx: click.Context, name: str) -> bool:
    """Whether the option ``name`` was given (command line or environment), not defaulted."""
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE,
                                              ParameterSource.ENVIRONMENT)


def _refuse_fixed_grid_options(ctx: click.Context, directions: str, dims: int) -> None:
    """A one-line error for --span or --dims given to a kind whose grid they do not set."""
    if directions not in _FIXED_GRID:
        return
    n_dims, grid = _FIXED_GRID[directions]
    if _given(ctx, "span"):
        raise click.UsageError(
            f"--span does not apply to --directions {directions}: its grid is {grid}"
        )
    if _given(ctx, "dims") and dims != n_dims:
        raise click.UsageError(
            f"--dims {dims} does not apply to --directions {directions}: its grid is {grid}"
        )
